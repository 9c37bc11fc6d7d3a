//! `patchbayd` as a systemd service, with systemd's own tools instead of a running systemd:
//! socket activation through `systemd-socket-activate` (Debian's `systemd` package; CI
//! installs it), readiness and reload notifications on a `NOTIFY_SOCKET` of the test, a
//! traced program reaching the activated server; and the configuration precedence
//! (flags > environment > file) seen on the socket file the server creates.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{bins, fixtures, wait};

const TIMEOUT: Duration = Duration::from_secs(20);

/// `systemd-socket-activate`, or `None` (with the reason printed) when it is not
/// installed outside CI; in CI (`CI` set) its absence fails the test.
fn socket_activate() -> Option<PathBuf> {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join("systemd-socket-activate");
        if p.is_file() {
            return Some(p);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "systemd-socket-activate is missing in CI: .ci/run must install Debian's systemd package"
    );
    eprintln!(
        "SKIPPED: systemd-socket-activate is not installed (apt-get install systemd); \
         .ci/run installs it"
    );
    None
}

/// A notification socket the server writes to; collects the datagrams.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram whose lines include `line`; returns the datagram.
    fn wait_for(&mut self, line: &str, log: &Path) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 4096];
        loop {
            if let Some(found) = self.seen.iter().position(|d| d.lines().any(|l| l == line)) {
                return self.seen.remove(found);
            }
            assert!(
                Instant::now() < deadline,
                "no {line} notification within {TIMEOUT:?}; got {:?}\n--- log ---\n{}",
                self.seen,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `demo/build.sh` into this test's cache directory; the program's path.
fn demo() -> PathBuf {
    let out = fixtures::cache_dir();
    std::fs::create_dir_all(&out).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../demo/build.sh");
    let o = Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", &out)
        .output()
        .expect("run demo/build.sh");
    assert!(
        o.status.success(),
        "demo/build.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn socket_activated_server_serves_agents_notifies_reloads_and_stops() {
    let Some(activate) = socket_activate() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/patchbayd.sock");
    std::fs::create_dir(dir.path().join("run")).unwrap();
    let config = dir.path().join("patchbayd.toml");
    std::fs::write(&config, "log = \"info\"\n").unwrap();
    let log = dir.path().join("patchbayd.log");
    let mut notify = Notify::new(dir.path());
    // systemd-socket-activate binds the socket, waits for a first connection, then
    // execs patchbayd with LISTEN_FDS=1 and LISTEN_PID set (as the socket unit does).
    let child = Command::new(&activate)
        .arg("-l")
        .arg(&socket)
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.path.display()))
        .arg("--setenv=NO_COLOR=1")
        .arg(bins::patchbayd())
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("PATCHBAY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let pid = child.0.id();
    wait::wait_until_sync(TIMEOUT, "the activator to listen", || {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("systemd-socket-activate exited: {status}\n{}", log_of(&log));
        }
        socket.exists()
    });
    assert!(
        notify.seen.is_empty(),
        "patchbayd started before any connection"
    );

    // A traced program, through `patchbay run` on the activated socket: its first
    // connection starts patchbayd, whose agent then connects to the same socket.
    let o = tokio::process::Command::new(bins::patchbay())
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "run", "--count", "*", "--agent"])
        .arg(bins::agent_lib())
        .arg("--")
        .arg(demo())
        .args(["2000", "0"])
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "patchbay run on the activated server: {err}\n--- patchbayd ---\n{}",
        log_of(&log)
    );
    assert!(
        err.contains(&format!("using server at {}", socket.display())),
        "{err}"
    );
    let ready = notify.wait_for("READY=1", &log);
    assert!(
        ready.contains(&format!("STATUS=listening on {}", socket.display())),
        "{ready}"
    );
    let text = log_of(&log);
    assert!(text.contains("activated=true"), "{text}");

    // SIGHUP: the file is read again; a changed log filter applies, a changed socket
    // mode is reported as needing a restart.
    std::fs::write(&config, "log = \"debug\"\nsocket-mode = \"666\"\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    notify.wait_for("RELOADING=1", &log);
    notify.wait_for("READY=1", &log);
    let text = log_of(&log);
    assert!(
        text.contains("SIGHUP: configuration reloaded") && text.contains("log=\"debug\""),
        "{text}"
    );
    assert!(
        text.contains("option=\"socket-mode\"") && text.contains("applies after a restart"),
        "{text}"
    );
    // A bad file on reload changes nothing and names the line.
    std::fs::write(&config, "log = \"info\"\nbogus = 1\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    notify.wait_for("RELOADING=1", &log);
    notify.wait_for("READY=1", &log);
    let text = log_of(&log);
    assert!(
        text.contains("configuration not reloaded, nothing changed") && text.contains("line 2"),
        "{text}"
    );

    // SIGTERM: STOPPING=1, a clean exit, and the socket (systemd's) left in place.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    notify.wait_for("STOPPING=1", &log);
    let status = wait::wait_for_sync(TIMEOUT, "patchbayd to exit", || {
        child
            .0
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "running".to_string())
    });
    assert!(status.success(), "{status}\n{}", log_of(&log));
    assert!(
        socket.exists(),
        "the activated socket belongs to the socket unit and must stay"
    );
}

/// Starts `patchbayd` with `args` and `envs` on a socket of `dir` and returns the mode
/// of the socket file it creates (then stops it).
fn socket_mode_with(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> u32 {
    let socket = dir.join("s.sock");
    let log = dir.join("mode.log");
    let child = Command::new(bins::patchbayd())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .env_remove("PATCHBAYD_SOCKET_MODE")
        .env_remove("PATCHBAYD_CONFIG")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    wait::wait_until_sync(TIMEOUT, "patchbayd to listen", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait::wait_for_sync(TIMEOUT, "patchbayd to exit", || {
        child
            .0
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "running".to_string())
    });
    assert!(status.success(), "{status}: {}", log_of(&log));
    mode
}

#[test]
fn flags_over_environment_over_file_on_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("patchbayd.toml");
    std::fs::write(&config, "# test\nsocket-mode = \"640\"\n").unwrap();
    let c = config.to_str().unwrap();
    assert_eq!(socket_mode_with(dir.path(), &["--no-config"], &[]), 0o600);
    assert_eq!(socket_mode_with(dir.path(), &["--config", c], &[]), 0o640);
    // $PATCHBAYD_CONFIG names the file too.
    assert_eq!(
        socket_mode_with(dir.path(), &[], &[("PATCHBAYD_CONFIG", c)]),
        0o640
    );
    let env = [("PATCHBAYD_SOCKET_MODE", "604")];
    assert_eq!(socket_mode_with(dir.path(), &["--config", c], &env), 0o604);
    assert_eq!(
        socket_mode_with(dir.path(), &["--config", c, "--socket-mode", "660"], &env),
        0o660
    );
}

#[test]
fn a_bad_configuration_file_stops_the_server_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("patchbayd.toml");
    std::fs::write(
        &config,
        "socket-mode = \"600\"\nstall-threshold-ms = \"soon\"\n",
    )
    .unwrap();
    let socket = dir.path().join("s.sock");
    let o = Command::new(bins::patchbayd())
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("configuration file {}", config.display())) && err.contains("line 2"),
        "{err}"
    );
    assert!(!socket.exists(), "a refused configuration must not listen");
    // A named file that does not exist is an error too (a default one is not).
    let o = Command::new(bins::patchbayd())
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read the configuration file"), "{err}");
}
