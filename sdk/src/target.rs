//! Where `patchbayd` listens: parsing of server addresses and the default socket path.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// Environment variable naming the server socket (shared with `patchbayd`).
pub use patchbay_proto::socket::SOCKET_ENV;

/// A parsed server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTarget {
    /// A Unix socket path (the default and the only transport agents use).
    Unix(PathBuf),
    /// A TCP endpoint as an `http://host:port` URI (opt-in on the server; needs a token).
    Tcp(String),
}

impl ServerTarget {
    /// Parses an address:
    /// - `unix:PATH` or `unix://PATH`: a Unix socket;
    /// - `http://HOST:PORT` or `tcp://HOST:PORT` (the server's `--listen` syntax): TCP;
    /// - anything else: a Unix socket path.
    pub fn parse(target: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidTarget {
            target: target.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = target.trim();
        if trimmed.is_empty() {
            return Err(invalid("it is empty"));
        }
        if let Some(rest) = trimmed.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(invalid("the socket path after `unix:` is empty"));
            }
            return Ok(ServerTarget::Unix(PathBuf::from(path)));
        }
        if trimmed.starts_with("https://") {
            return Err(invalid(
                "TLS is not supported: use http://HOST:PORT (with a token) or the Unix socket",
            ));
        }
        let authority = trimmed
            .strip_prefix("http://")
            .or_else(|| trimmed.strip_prefix("tcp://"));
        if let Some(authority) = authority {
            let authority = authority.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') {
                return Err(invalid("expected http://HOST:PORT"));
            }
            let (host, port) = authority
                .rsplit_once(':')
                .ok_or_else(|| invalid("the port is missing: expected http://HOST:PORT"))?;
            if host.is_empty() {
                return Err(invalid("the host is missing: expected http://HOST:PORT"));
            }
            if port.parse::<u16>().is_err() {
                return Err(invalid("the port must be a number from 0 to 65535"));
            }
            let uri = format!("http://{authority}");
            // Reject what tonic would reject later, with our own message.
            if uri.parse::<tonic::transport::Uri>().is_err() {
                return Err(invalid("expected http://HOST:PORT"));
            }
            return Ok(ServerTarget::Tcp(uri));
        }
        if let Some((scheme, _)) = trimmed.split_once("://") {
            return Err(invalid(&format!(
                "unsupported scheme `{scheme}`: use a socket path, unix:PATH or http://HOST:PORT"
            )));
        }
        Ok(ServerTarget::Unix(PathBuf::from(target)))
    }

    /// True for a TCP endpoint.
    pub fn is_tcp(&self) -> bool {
        matches!(self, ServerTarget::Tcp(_))
    }
}

impl Default for ServerTarget {
    /// The socket clients connect to by default, [`connect_socket_path`]: the per-user
    /// [`default_socket_path`], or the system server's `/run/patchbay/patchbayd.sock` when
    /// only that one exists.
    fn default() -> Self {
        ServerTarget::Unix(connect_socket_path())
    }
}

impl FromStr for ServerTarget {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        ServerTarget::parse(s)
    }
}

impl fmt::Display for ServerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerTarget::Unix(path) => write!(f, "{}", path.display()),
            ServerTarget::Tcp(uri) => f.write_str(uri),
        }
    }
}

/// The socket `patchbayd` listens on by default: `$PATCHBAY_SOCKET` if set, else
/// `$XDG_RUNTIME_DIR/patchbay/patchbayd.sock`, else `/tmp/patchbay-$UID/patchbayd.sock`
/// (the one rule, shared with the server and the agent).
pub use patchbay_proto::socket::default_socket_path;

/// The socket clients and agents connect to when none is named: [`default_socket_path`]
/// if `$PATCHBAY_SOCKET` is set or that socket exists, else the system server's
/// `/run/patchbay/patchbayd.sock` if it exists, else [`default_socket_path`].
pub use patchbay_proto::socket::connect_socket_path;

/// The real uid of this process, read from `/proc/self/status` (falling back to the owner
/// of `/proc/self`); `None` when `/proc` is not mounted.
pub fn current_uid() -> Option<u32> {
    if let Some(uid) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_uid(&s))
    {
        return Some(uid);
    }
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The real uid from the text of `/proc/PID/status` (`Uid:\treal\teffective\tsaved\tfs`).
fn parse_status_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|real| real.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(p: &str) -> ServerTarget {
        ServerTarget::Unix(PathBuf::from(p))
    }

    #[test]
    fn parses_unix_targets() {
        assert_eq!(
            ServerTarget::parse("/run/p.sock").unwrap(),
            unix("/run/p.sock")
        );
        assert_eq!(
            ServerTarget::parse("rel/p.sock").unwrap(),
            unix("rel/p.sock")
        );
        assert_eq!(
            ServerTarget::parse("unix:/run/p.sock").unwrap(),
            unix("/run/p.sock")
        );
        assert_eq!(
            ServerTarget::parse("unix:///run/p.sock").unwrap(),
            unix("/run/p.sock")
        );
        assert_eq!(ServerTarget::parse("unix:p.sock").unwrap(), unix("p.sock"));
        // A path with spaces is kept as is.
        assert_eq!(
            ServerTarget::parse("/tmp/a b.sock").unwrap(),
            unix("/tmp/a b.sock")
        );
    }

    #[test]
    fn parses_tcp_targets() {
        let tcp = |s: &str| ServerTarget::Tcp(s.to_owned());
        assert_eq!(
            ServerTarget::parse("http://127.0.0.1:7777").unwrap(),
            tcp("http://127.0.0.1:7777")
        );
        assert_eq!(
            ServerTarget::parse("http://localhost:7777/").unwrap(),
            tcp("http://localhost:7777")
        );
        assert_eq!(
            ServerTarget::parse("tcp://[::1]:7777").unwrap(),
            tcp("http://[::1]:7777")
        );
        assert!(ServerTarget::parse("http://h:1").unwrap().is_tcp());
        assert!(!ServerTarget::parse("/s").unwrap().is_tcp());
    }

    #[test]
    fn rejects_bad_targets() {
        for bad in [
            "",
            "   ",
            "unix:",
            "unix://",
            "http://",
            "http://host",
            "http://:80",
            "http://host:port",
            "http://host:99999",
            "http://host:80/path",
            "https://host:443",
            "ftp://host:21",
        ] {
            let err = ServerTarget::parse(bad).expect_err(bad);
            assert!(matches!(err, Error::InvalidTarget { .. }), "{bad}: {err:?}");
            assert!(
                err.to_string().starts_with("invalid patchbayd address"),
                "{err}"
            );
        }
    }

    #[test]
    fn displays_for_people() {
        assert_eq!(
            ServerTarget::parse("unix:/a/b").unwrap().to_string(),
            "/a/b"
        );
        assert_eq!(
            ServerTarget::parse("tcp://h:1").unwrap().to_string(),
            "http://h:1"
        );
        assert_eq!("/x".parse::<ServerTarget>().unwrap(), unix("/x"));
    }

    #[test]
    fn parses_uid_from_proc_status() {
        let status = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\nUid:\t1000\t0\t1000\t1000\nGid:\t100\t100\t100\t100\n";
        assert_eq!(parse_status_uid(status), Some(1000));
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
        assert_eq!(parse_status_uid("Uid:\tabc\n"), None);
    }

    #[test]
    fn current_uid_matches_proc_self_owner() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata("/proc/self").unwrap().uid();
        // /proc/self is owned by the effective uid; tests do not run setuid.
        assert_eq!(current_uid(), Some(owner));
    }
}
