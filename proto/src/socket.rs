//! Where `patchbayd` listens by default: the one rule the server, the agent and every
//! client follow.

use std::ffi::OsString;
use std::path::PathBuf;

/// Environment variable that names the server's socket (agents and clients read it;
/// the server listens there unless told otherwise).
pub const SOCKET_ENV: &str = "PATCHBAY_SOCKET";

/// File name of the socket inside its private directory.
pub const SOCKET_FILE: &str = "patchbayd.sock";

/// The default socket: `$PATCHBAY_SOCKET`, else `$XDG_RUNTIME_DIR/patchbay/patchbayd.sock`,
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
}
