//! The few parts of systemd's protocols `patchbayd` speaks, without libsystemd:
//!
//! - socket activation (`sd_listen_fds(3)`): `LISTEN_PID` names this process and
//!   `LISTEN_FDS` counts the sockets passed from fd 3 on; `patchbayd` takes one listening
//!   Unix stream socket (the socket unit's `ListenStream=/run/patchbay/patchbayd.sock`);
//! - readiness (`sd_notify(3)`): datagrams such as `READY=1` to `$NOTIFY_SOCKET` (a path,
//!   or `@name` in the abstract namespace);
//! - whether stderr is the journal (`$JOURNAL_STREAM` = `DEV:INODE` of stderr).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

use thiserror::Error;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error(
        "systemd passed {0} sockets: patchbayd takes exactly one listening Unix stream socket \
         (one ListenStream=PATH in the socket unit); serve TCP with --listen"
    )]
    Count(usize),
    #[error(
        "the socket systemd passed (fd {fd}) is not a listening Unix stream socket: \
         use ListenStream=/PATH in the socket unit, and --listen for TCP ({reason})"
    )]
    NotUnixStream { fd: RawFd, reason: String },
}

/// The fds passed to this process by socket activation, from the values of `LISTEN_PID`
/// and `LISTEN_FDS`: none when `LISTEN_PID` is unset or names another process (the
/// variables were inherited by mistake), else `LISTEN_FDS_START..LISTEN_FDS_START+n`.
pub fn listen_fds_from(
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    my_pid: u32,
) -> Result<std::ops::Range<RawFd>, ActivationError> {
    let none = LISTEN_FDS_START..LISTEN_FDS_START;
    let pid = listen_pid.and_then(OsStr::to_str).map(str::trim);
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(my_pid) {
        return Ok(none);
    }
    let Some(count) = listen_fds else {
        return Ok(none);
    };
    let text = count.to_string_lossy();
    let n: RawFd = text
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| ActivationError::BadCount(text.into_owned()))?;
    Ok(LISTEN_FDS_START..LISTEN_FDS_START + n)
}

/// The listening Unix socket systemd passed to this process, if any (the environment's
/// `LISTEN_PID`/`LISTEN_FDS`). Call once, before other threads open files: the fds are
/// taken over (closed on exec from then on).
pub fn activated_listener() -> Result<Option<UnixListener>, ActivationError> {
    let fds = listen_fds_from(
        std::env::var_os("LISTEN_PID").as_deref(),
        std::env::var_os("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?;
    match fds.len() {
        0 => return Ok(None),
        1 => {}
        n => return Err(ActivationError::Count(n)),
    }
    let fd = fds.start;
    // SAFETY: under the socket-activation protocol (LISTEN_PID is our pid) fd 3 was
    // passed to this process for it to own; nothing else in patchbayd uses fds it did not
    // open, and this function runs once (main, before the runtime starts).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_unix_stream_listener(&owned)
        .map_err(|reason| ActivationError::NotUnixStream { fd, reason })?;
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| ActivationError::NotUnixStream {
        fd,
        reason: e.to_string(),
    })?;
    let listener = UnixListener::from(owned);
    listener
        .set_nonblocking(true)
        .map_err(|e| ActivationError::NotUnixStream {
            fd,
            reason: e.to_string(),
        })?;
    Ok(Some(listener))
}

fn check_unix_stream_listener(fd: &OwnedFd) -> Result<(), String> {
    use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};
    use nix::sys::socket::{getsockname, getsockopt};
    use std::os::fd::AsRawFd;
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(format!("address family {:?}", addr.family()));
    }
    if getsockopt(fd, sockopt::SockType).map_err(|e| e.to_string())? != SockType::Stream {
        return Err("not SOCK_STREAM".into());
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(|e| e.to_string())? {
        return Err("not listening".into());
    }
    Ok(())
}

/// Sends `state` (e.g. `"READY=1"`) to the service manager at `$NOTIFY_SOCKET`. Returns
/// `false` when not run by a service manager that listens (no variable).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(addr) if !addr.is_empty() => notify_to(&addr, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `addr` (a path, or `@name` for the abstract
/// namespace), as one datagram.
pub fn notify_to(addr: &OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = addr.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(addr))?
    };
    if sent != state.len() {
        return Err(io::Error::other("short write to NOTIFY_SOCKET"));
    }
    Ok(())
}

/// Whether stderr is connected to the journal: `$JOURNAL_STREAM` (`DEV:INODE`, set by
/// systemd for a service whose output goes to the journal) names stderr's device and
/// inode.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value, stat.st_dev, stat.st_ino)
}

/// `JOURNAL_STREAM`'s value `DEV:INODE` names the file `(dev, ino)`.
pub fn journal_stream_matches(value: &OsStr, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_follow_the_protocol() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert_eq!(listen_fds_from(s("42"), s("1"), 42), Ok(3..4));
        assert_eq!(listen_fds_from(s("42"), s("2"), 42), Ok(3..5));
        // Another process's variables (inherited): ignored.
        assert_eq!(listen_fds_from(s("41"), s("1"), 42), Ok(3..3));
        assert_eq!(listen_fds_from(None, s("1"), 42), Ok(3..3));
        assert_eq!(listen_fds_from(s("42"), None, 42), Ok(3..3));
        assert_eq!(
            listen_fds_from(s("42"), s("x"), 42),
            Err(ActivationError::BadCount("x".into()))
        );
        assert_eq!(
            listen_fds_from(s("42"), s("-1"), 42),
            Err(ActivationError::BadCount("-1".into()))
        );
    }

    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("patchbay-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        // Nobody listening: an error, which the server logs and survives.
        assert!(notify_to(dir.path().join("none").as_os_str(), "READY=1").is_err());
    }

    #[test]
    fn journal_stream() {
        assert!(journal_stream_matches(OsStr::new("8:1234"), 8, 1234));
        assert!(!journal_stream_matches(OsStr::new("8:1234"), 8, 1235));
        assert!(!journal_stream_matches(OsStr::new("garbage"), 8, 1234));
    }

    #[test]
    fn passed_fds_must_be_listening_unix_stream_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        assert_eq!(check_unix_stream_listener(&OwnedFd::from(listener)), Ok(()));
        let dgram = UnixDatagram::bind(dir.path().join("d")).unwrap();
        assert_eq!(
            check_unix_stream_listener(&OwnedFd::from(dgram)),
            Err("not SOCK_STREAM".into())
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = check_unix_stream_listener(&OwnedFd::from(tcp)).unwrap_err();
        assert!(err.starts_with("address family"), "{err}");
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(check_unix_stream_listener(&OwnedFd::from(file)).is_err());
    }
}
