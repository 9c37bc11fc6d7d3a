//! Where `patchbayd` listens by default: the one rule the server, the agent and every
//! client follow.

use std::ffi::OsString;
use std::path::PathBuf;

/// Environment variable that names the server's socket (agents and clients read it;
/// the server listens there unless told otherwise).
pub const SOCKET_ENV: &str = "PATCHBAY_SOCKET";

/// File name of the socket inside its private directory.
pub const SOCKET_FILE: &str = "patchbayd.sock";

/// The socket of the system server (`patchbayd.socket`, systemd's socket unit of the
/// Debian package): clients and agents fall back to it (see [`connect_socket_path`]).
pub const SYSTEM_SOCKET: &str = "/run/patchbay/patchbayd.sock";

/// The socket clients and agents connect to: [`default_socket_path`] when
/// `$PATCHBAY_SOCKET` names one or when that socket exists, else [`SYSTEM_SOCKET`] when
/// it exists (a system server, possibly socket-activated), else [`default_socket_path`]
/// (so that errors name the per-user socket).
pub fn connect_socket_path() -> PathBuf {
    let own = default_socket_path();
    let explicit = std::env::var_os(SOCKET_ENV).is_some_and(|v| !v.is_empty());
    connect_rule(
        own,
        explicit,
        |p| p.exists(),
        std::path::Path::new(SYSTEM_SOCKET),
    )
}

/// [`connect_socket_path`]'s choice over explicit inputs.
pub fn connect_rule(
    own: PathBuf,
    explicit: bool,
    exists: impl Fn(&std::path::Path) -> bool,
    system: &std::path::Path,
) -> PathBuf {
    if explicit || exists(&own) || !exists(system) {
        own
    } else {
        system.to_path_buf()
    }
}

/// The default socket a server listens on: `$PATCHBAY_SOCKET`, else `$XDG_RUNTIME_DIR/patchbay/patchbayd.sock`,
/// else `/tmp/patchbay-$UID/patchbayd.sock` (`$UID` the real uid of this process).
pub fn default_socket_path() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    socket_path_from(
        std::env::var_os(SOCKET_ENV),
        std::env::var_os("XDG_RUNTIME_DIR"),
        uid,
    )
}

/// The default-socket rule over explicit inputs (an empty variable counts as unset).
pub fn socket_path_from(
    socket_env: Option<OsString>,
    runtime_dir: Option<OsString>,
    uid: u32,
) -> PathBuf {
    let non_empty = |v: Option<OsString>| v.filter(|v| !v.is_empty());
    if let Some(path) = non_empty(socket_env) {
        return PathBuf::from(path);
    }
    match non_empty(runtime_dir) {
        Some(dir) => PathBuf::from(dir).join("patchbay").join(SOCKET_FILE),
        None => PathBuf::from(format!("/tmp/patchbay-{uid}")).join(SOCKET_FILE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(
            socket_path_from(s("/x/s.sock"), s("/run/user/1"), 5),
            PathBuf::from("/x/s.sock")
        );
        assert_eq!(
            socket_path_from(s(""), s("/run/user/1"), 5),
            PathBuf::from("/run/user/1/patchbay/patchbayd.sock")
        );
        assert_eq!(
            socket_path_from(None, s(""), 5),
            PathBuf::from("/tmp/patchbay-5/patchbayd.sock")
        );
    }

    #[test]
    fn clients_fall_back_to_the_system_socket() {
        let own = PathBuf::from("/tmp/patchbay-5/patchbayd.sock");
        let system = std::path::Path::new(SYSTEM_SOCKET);
        let only = |set: &'static [&'static str]| {
            move |p: &std::path::Path| set.iter().any(|s| p == std::path::Path::new(s))
        };
        // The per-user socket exists: it wins.
        let both: &[&str] = &["/tmp/patchbay-5/patchbayd.sock", SYSTEM_SOCKET];
        assert_eq!(connect_rule(own.clone(), false, only(both), system), own);
        // Only the system socket exists: the fallback.
        let sys: &[&str] = &[SYSTEM_SOCKET];
        assert_eq!(connect_rule(own.clone(), false, only(sys), system), system);
        // $PATCHBAY_SOCKET is never overridden, even when it does not exist.
        assert_eq!(connect_rule(own.clone(), true, only(sys), system), own);
        // Neither exists: the per-user socket, which the error message then names.
        assert_eq!(connect_rule(own.clone(), false, only(&[]), system), own);
    }
}
