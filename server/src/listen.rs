//! Sockets: the default Unix socket path, its private directory, stale-socket
//! handling, and who the peer of a request is.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use tonic::transport::server::{TcpConnectInfo, UdsConnectInfo};

pub use patchbay_proto::socket::default_socket_path;

/// Creates the socket's directory 0700 if it does not exist; refuses a directory
/// that other users can write to or that we do not own.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let md = std::fs::metadata(dir)?;
    let me = nix::unistd::getuid().as_raw();
    if md.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to us (uid {me}): pass --socket in a directory you own",
                dir.display(),
                md.uid()
            ),
        ));
    }
    if md.permissions().mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by others: chmod 700 it or pass --socket elsewhere",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Binds a Unix listener at `path`, replacing a stale socket file but never one a
/// live server listens on. Sets the socket file's mode.
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another patchbayd is listening on {}: stop it or pass another --socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The peer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Over the Unix socket, with SO_PEERCRED credentials.
    Unix { pid: Option<u32>, uid: u32 },
    /// Over TCP (token-authenticated by the service).
    Tcp,
}

pub fn peer_of<T>(req: &tonic::Request<T>) -> Option<Peer> {
    if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
        let cred = info.peer_cred?;
        return Some(Peer::Unix {
            pid: cred.pid().map(|p| p as u32),
            uid: cred.uid(),
        });
    }
    if req.extensions().get::<TcpConnectInfo>().is_some() {
        return Some(Peer::Tcp);
    }
    None
}
