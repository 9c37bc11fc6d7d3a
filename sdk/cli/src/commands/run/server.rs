//! The server `patchbay run` talks to: a running `patchbayd` when one answers, else an
//! embedded one served by this process on a fresh private socket.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use patchbay_sdk::{Client, Error, ServerTarget};
use patchbay_server::daemon::{Config, DaemonError, Server};
use patchbay_server::listen::ensure_private_dir;
use patchbay_server::registry::Settings;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The socket file of the embedded server, inside its private directory.
use patchbay_proto::socket::SOCKET_FILE;

/// A connected server, and the embedded one to shut down if this process runs it.
pub struct Connection {
    pub client: Client,
    /// The Unix socket agents connect to (absolute).
    pub socket: PathBuf,
    embedded: Option<Embedded>,
}

struct Embedded {
    dir: PathBuf,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl Connection {
    /// Uses the server at `socket` (from `--socket` or `PATCHBAY_SOCKET`; `None`: the default
    /// socket) if it accepts a connection, else starts an embedded one. Says which on stderr.
    pub async fn open(socket: Option<&str>, token: Option<&str>) -> anyhow::Result<Connection> {
        let target = match socket {
            Some(socket) => ServerTarget::parse(socket)?,
            None => ServerTarget::default(),
        };
        let path = match &target {
            ServerTarget::Unix(path) => std::path::absolute(path)
                .with_context(|| format!("cannot resolve the socket path {}", path.display()))?,
            ServerTarget::Tcp(uri) => bail!(
                "patchbay run needs the server's Unix socket, not {uri}: the program's agent \
                 connects over a Unix socket (pass --socket PATH, or none for an embedded server)"
            ),
        };
        let mut builder = Client::builder(ServerTarget::Unix(path.clone()));
        if let Some(token) = token {
            builder = builder.token(token);
        }
        match builder.connect().await {
            Ok(client) => match client.agents().await {
                Ok(_) => {
                    eprintln!("patchbay: using server at {}", path.display());
                    return Ok(Connection {
                        client,
                        socket: path,
                        embedded: None,
                    });
                }
                Err(Error::Unavailable(_)) => {}
                Err(err) => {
                    return Err(anyhow::Error::from(err).context(format!(
                        "the server at {} answers but cannot be used",
                        path.display()
                    )));
                }
            },
            Err(Error::Connect { .. }) => {}
            Err(err) => return Err(err.into()),
        }
        let connection = Connection::embedded().await?;
        if socket.is_some() {
            eprintln!(
                "patchbay: no server answers at {}; started an embedded server at {}",
                path.display(),
                connection.socket.display()
            );
        } else {
            eprintln!(
                "patchbay: started an embedded server at {}",
                connection.socket.display()
            );
        }
        Ok(connection)
    }

    async fn embedded() -> anyhow::Result<Connection> {
        let dir = create_private_dir(&run_dir(
            std::env::var_os("XDG_RUNTIME_DIR"),
            nix::unistd::getuid().as_raw(),
            std::process::id(),
        ))?;
        let socket = dir.join(SOCKET_FILE);
        let mut embedded = Embedded {
            dir,
            socket: socket.clone(),
            stop: None,
            task: None,
        };
        let server = Server::bind(Config {
            socket: socket.clone(),
            inherited: None,
            socket_mode: 0o600,
            tcp: None,
            settings: Settings::default(),
            // The embedded server lives for one `patchbay run`: its tracers die with it.
            state_dir: None,
        })
        .await
        .context("cannot start the embedded server")?;
        let (stop, stopped) = oneshot::channel::<()>();
        embedded.stop = Some(stop);
        embedded.task = Some(tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        })));
        let client = Client::builder(ServerTarget::Unix(socket.clone()))
            .connect()
            .await?;
        Ok(Connection {
            client,
            socket,
            embedded: Some(embedded),
        })
    }

    /// Stops the embedded server, if any, and removes its socket and directory.
    pub async fn shutdown(mut self) {
        let Some(mut embedded) = self.embedded.take() else {
            return;
        };
        if let Some(stop) = embedded.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = embedded.task.take() {
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(Ok(Err(err))) => eprintln!("patchbay: the embedded server failed: {err}"),
                Ok(_) => {}
                Err(_) => eprintln!("patchbay: the embedded server did not stop within 5 s"),
            }
        }
        embedded.clean();
    }
}

impl Embedded {
    fn clean(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        for result in [
            std::fs::remove_file(&self.socket),
            std::fs::remove_dir(&self.dir),
        ] {
            if let Err(err) = result
                && err.kind() != io::ErrorKind::NotFound
            {
                eprintln!(
                    "patchbay: cannot remove the embedded server's {}: {err}",
                    self.dir.display()
                );
            }
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if self.dir.exists() {
            self.clean();
        }
    }
}

/// Where the embedded server's directory goes: `$XDG_RUNTIME_DIR/patchbay/run-PID`, else
/// `/tmp/patchbay-run-UID-PID`.
pub fn run_dir(runtime_dir: Option<OsString>, uid: u32, pid: u32) -> PathBuf {
    match runtime_dir.filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir)
            .join("patchbay")
            .join(format!("run-{pid}")),
        None => PathBuf::from(format!("/tmp/patchbay-run-{uid}-{pid}")),
    }
}

/// Creates a fresh 0700 directory at `path`, or at `path.1`, `path.2`, ... when a file of
/// that name exists (a leftover, or someone else's: never reused). The parent of an
/// `$XDG_RUNTIME_DIR/patchbay/...` path is created private first.
fn create_private_dir(path: &Path) -> anyhow::Result<PathBuf> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    if parent.file_name().is_some_and(|n| n == "patchbay") {
        ensure_private_dir(parent).with_context(|| format!("preparing {}", parent.display()))?;
    }
    let name = path.file_name().unwrap_or_default().to_os_string();
    for attempt in 0..100 {
        let mut candidate = name.clone();
        if attempt > 0 {
            candidate.push(format!(".{attempt}"));
        }
        let candidate = parent.join(candidate);
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => {
                // The umask may have removed bits we need; nobody else may have any.
                std::fs::set_permissions(&candidate, std::fs::Permissions::from_mode(0o700))?;
                let md = std::fs::symlink_metadata(&candidate)?;
                if !md.is_dir() || md.uid() != nix::unistd::getuid().as_raw() {
                    bail!("{} was replaced while being created", candidate.display());
                }
                return Ok(candidate);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot create a directory for the embedded server at {}",
                        candidate.display()
                    )
                });
            }
        }
    }
    bail!(
        "cannot create a directory for the embedded server: {}.1 to .99 all exist",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_prefers_the_runtime_dir() {
        assert_eq!(
            run_dir(Some("/run/user/1000".into()), 1000, 42),
            PathBuf::from("/run/user/1000/patchbay/run-42")
        );
        assert_eq!(
            run_dir(Some("".into()), 1000, 42),
            PathBuf::from("/tmp/patchbay-run-1000-42")
        );
        assert_eq!(run_dir(None, 0, 7), PathBuf::from("/tmp/patchbay-run-0-7"));
    }

    #[test]
    fn private_dirs_are_fresh_and_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let want = run_dir(Some(tmp.path().into()), 1, 99);
        let first = create_private_dir(&want).unwrap();
        assert_eq!(first, want);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&first), 0o700);
        assert_eq!(mode(first.parent().unwrap()), 0o700);
        // An existing directory (or a symlink planted there) is never reused.
        let second = create_private_dir(&want).unwrap();
        assert_eq!(second, tmp.path().join("patchbay/run-99.1"));
        let planted = tmp.path().join("patchbay/run-5");
        std::os::unix::fs::symlink(tmp.path(), &planted).unwrap();
        let third = create_private_dir(&planted).unwrap();
        assert_eq!(third, tmp.path().join("patchbay/run-5.1"));
    }
}
