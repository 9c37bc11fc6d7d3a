//! A real `patchbayd` on a private socket in a temporary directory.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

pub use crate::uds::Control;
use crate::{bins, wait};

/// How long a server has to start accepting on its socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `patchbayd --no-config --socket <tempdir>/s.sock --state-dir <tempdir>/state`, killed
/// on drop. Its stderr goes to `<tempdir>/patchbayd.log` and is printed when the test
/// panics. Pass `--state-dir DIR` among the arguments to use another state directory
/// (e.g. the one of a server that was killed, see [`TestServer::state_dir`]).
pub struct TestServer {
    child: Option<Child>,
    dir: TempDir,
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl TestServer {
    /// Starts a server with default options.
    pub fn start() -> TestServer {
        TestServer::start_with(&[])
    }

    /// Starts a server with extra arguments (e.g. `["--socket-mode", "666"]`). The
    /// temporary directory is mode 0755 so that other uids can reach a socket whose
    /// mode allows it.
    pub fn start_with(args: &[&str]) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("patchbay-it-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let socket = dir.path().join("s.sock");
        TestServer::spawn(dir, socket, args)
    }

    /// Starts a server listening on `socket` (a path the test chose, e.g. one a traced
    /// program already points at, or the socket of a server that was killed); its log
    /// goes to a fresh temporary directory. The socket's directory must exist.
    pub fn start_at(socket: &Path, args: &[&str]) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("patchbay-it-")
            .tempdir()
            .expect("tempdir");
        TestServer::spawn(dir, socket.to_path_buf(), args)
    }

    fn spawn(dir: TempDir, socket: PathBuf, args: &[&str]) -> TestServer {
        let log = dir.path().join("patchbayd.log");
        let (state, default_state) = match args.iter().position(|a| *a == "--state-dir") {
            Some(i) => (PathBuf::from(args[i + 1]), None),
            None => {
                let s = dir.path().join("state");
                (s.clone(), Some(s))
            }
        };
        let stderr = File::create(&log).expect("create server log");
        let exe = bins::patchbayd();
        let mut cmd = Command::new(&exe);
        // No configuration file of the host (e.g. an installed package's) changes a test.
        cmd.arg("--no-config").arg("--socket").arg(&socket);
        if let Some(s) = &default_state {
            cmd.arg("--state-dir").arg(s);
        }
        let child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| {
                    "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info".into()
                }),
            )
            .env("RUST_BACKTRACE", "1")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("dup log"))
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", exe.display()));
        let mut server = TestServer {
            child: Some(child),
            dir,
            socket,
            state,
            log,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let socket = self.socket.clone();
        let child = self.child.as_mut().expect("child");
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let why = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("patchbayd exited early with {status}");
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                break format!(
                    "patchbayd did not accept on {} within {START_TIMEOUT:?}",
                    socket.display()
                );
            }
            std::thread::sleep(wait::POLL);
        };
        panic!("{why}\n--- patchbayd log ---\n{}", self.log());
    }

    /// The server's Unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The server's state directory (its tracer store).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The temporary directory holding the socket and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server wrote to stderr/stdout so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// Pid of the server process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// A raw gRPC Control client (protocol metadata set) connected to this server.
    pub async fn control(&self) -> Control {
        crate::uds::control_client(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connect control client: {e:#}\n{}", self.log()))
    }

    /// The SDK client connected to this server.
    pub async fn client(&self) -> patchbay_sdk::Client {
        patchbay_sdk::Client::connect(&self.socket.to_string_lossy())
            .await
            .unwrap_or_else(|e| panic!("connect SDK client: {e}\n{}", self.log()))
    }

    /// Runs the `patchbay` CLI with `--socket <socket>` followed by `args`.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.cli_cmd(args, None).await
    }

    /// A `patchbay --socket <socket> ARGS...` command to spawn (for long-running commands
    /// such as `watch`); killed on drop.
    pub fn cli_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bins::patchbay());
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("PATCHBAY_SOCKET")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs the `patchbay` CLI as another user (uid, gid).
    pub async fn cli_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        self.cli_cmd(args, Some((uid, gid))).await
    }

    /// Runs `control-probe --socket <socket> CALL...` as user (uid, gid) and returns its
    /// one line: `ok ...` or `error <Code> <message>`.
    pub async fn probe_as(&self, uid: u32, gid: u32, call: &[&str]) -> String {
        let out = self
            .run(bins::control_probe(), call, Some((uid, gid)))
            .await;
        assert!(
            out.status.success(),
            "control-probe {call:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    async fn cli_cmd(&self, args: &[&str], ids: Option<(u32, u32)>) -> Output {
        self.run(bins::patchbay(), args, ids).await
    }

    async fn run(&self, exe: PathBuf, args: &[&str], ids: Option<(u32, u32)>) -> Output {
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = Command::new(&exe);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("PATCHBAY_SOCKET")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = ids {
            // std drops the supplementary groups when root sets a uid.
            cmd.gid(gid).uid(uid);
            cmd.env("HOME", "/").env_remove("XDG_RUNTIME_DIR");
        }
        let what = format!("{cmd:?}");
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        eprintln!(
            "$ {name} {}\n  -> {}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        out
    }

    /// Runs the CLI and parses its stdout as JSON; panics (with stderr) on a non-zero exit.
    pub async fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "patchbay {args:?} failed: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "patchbay {args:?}: stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Kills the server with SIGKILL (no shutdown of any kind: the socket file stays)
    /// and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the server with SIGTERM and waits for it; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.try_wait().expect("wait server") {
                return s;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "patchbayd did not exit within 10 s of SIGTERM\n{}",
                    self.log()
                );
            }
            std::thread::sleep(wait::POLL);
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A debug patchbayd checks its registry after every change and logs this.
        let log = self.log();
        if !std::thread::panicking()
            && let Some(line) = log
                .lines()
                .find(|l| l.contains("registry invariant broken"))
        {
            panic!("patchbayd broke a registry invariant: {line}\n--- patchbayd log ---\n{log}");
        }
        if std::thread::panicking() {
            eprintln!(
                "--- patchbayd log ({}) ---\n{}--- end of patchbayd log ---",
                self.log.display(),
                self.log()
            );
        }
    }
}
