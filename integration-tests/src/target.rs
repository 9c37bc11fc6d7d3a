//! Real traced programs: a fixture (see [`crate::fixtures`]) started with the agent
//! preloaded, driven line by line over stdin/stdout, plus waits on what the server
//! shows about them.

use std::fs::File;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use patchbay_proto::*;
use tokio::sync::mpsc;

use crate::bins;
use crate::fixtures::{self, Build};
use crate::server::Control;
use crate::wait::wait_for;

/// Default deadline for one command's answer.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent has to connect (it retries with a backoff of at most 2 s).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long counts have to reach their expected value (agents flush every 100 ms).
pub const COUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// A fixture program running with `LD_PRELOAD=libpatchbay_agent.so` and
/// `PATCHBAY_SOCKET` set, with piped stdin/stdout (stdout lines go through a reader
/// thread into a channel) and stderr (the agent's diagnostics) in a temporary file that
/// is printed when the test panics. Killed and reaped on drop.
pub struct Target {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::UnboundedReceiver<String>,
    stderr: tempfile::NamedTempFile,
    pid: u32,
    exe: String,
    preamble: Vec<String>,
}

/// Lines a launcher may print before the program's ready line.
const PREAMBLE_LINES: usize = 20;

impl Target {
    /// Starts the fixture built in `mode` against the server socket `socket` (nothing
    /// needs to listen there yet) and waits for its `ready pid=` line.
    pub async fn start(mode: Build, socket: &Path) -> Target {
        Target::start_env(mode, socket, &[]).await
    }

    /// [`Target::start`] with extra environment variables.
    pub async fn start_env(mode: Build, socket: &Path, env: &[(&str, &str)]) -> Target {
        let exe = fixtures::fixture(mode);
        let t = Target::start_program(&exe, Some(socket), env).await;
        assert_eq!(
            t.pid,
            t.child.as_ref().expect("child").id(),
            "{} reported another pid than its own\n{}",
            t.exe,
            t.stderr()
        );
        t
    }

    /// Starts program `exe` (any program speaking the fixtures' line protocol) with
    /// extra environment variables; with `socket`, preloads the agent pointed at that
    /// server socket (agent log level `PATCHBAY_AGENT_LOG`, default `debug`; `env` may
    /// override it). Waits for its `ready pid=` line.
    pub async fn start_program(exe: &Path, socket: Option<&Path>, env: &[(&str, &str)]) -> Target {
        let mut cmd = Command::new(exe);
        if let Some(socket) = socket {
            cmd.env("LD_PRELOAD", bins::agent_lib())
                .env("PATCHBAY_SOCKET", socket)
                .env(
                    "PATCHBAY_AGENT_LOG",
                    std::env::var("PATCHBAY_AGENT_LOG").unwrap_or_else(|_| "debug".into()),
                );
        }
        cmd.envs(env.iter().copied());
        Target::spawn(cmd).await
    }

    /// Spawns `cmd` (stdin, stdout and stderr are set here) and waits for its
    /// `ready pid=<pid>` line. The pid of the target is the one the program reports,
    /// which differs from the spawned process's when `cmd` is a launcher (such as
    /// `uftrace record PROGRAM`).
    pub async fn spawn(mut cmd: Command) -> Target {
        let exe = cmd.get_program().to_string_lossy().into_owned();
        let stderr = tempfile::NamedTempFile::new().expect("target stderr file");
        cmd.env("RUST_BACKTRACE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                File::options()
                    .append(true)
                    .open(stderr.path())
                    .expect("open target stderr"),
            );
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {exe}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let pid = child.id();
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name(format!("target-{pid}"))
            .spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .expect("reader thread");
        let mut t = Target {
            child: Some(child),
            stdin,
            rx,
            stderr,
            pid,
            exe,
            preamble: Vec::new(),
        };
        // A launcher may print lines of its own first (bpftrace: "Attaching 1 probe...").
        for _ in 0..PREAMBLE_LINES {
            let line = t.line("the ready line", CMD_TIMEOUT).await;
            match line.strip_prefix("ready pid=").map(str::parse::<u32>) {
                Some(Ok(p)) => {
                    t.pid = p;
                    return t;
                }
                Some(Err(_)) => break,
                None => t.preamble.push(line),
            }
        }
        panic!(
            "no `ready pid=` line from {} (got {:?})\n{}",
            t.exe,
            t.preamble,
            t.stderr()
        )
    }

    /// Lines the program (or its launcher) printed before its ready line.
    pub fn preamble(&self) -> &[String] {
        &self.preamble
    }

    /// After the program ended: every stdout line not read yet (what a launcher such as
    /// bpftrace prints at exit), waiting at most `timeout` for the end of the output.
    pub async fn remaining_lines(&mut self, timeout: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while let Ok(Some(l)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(l);
        }
        out
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the program (and its agent) wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_else(|e| format!("<{e}>"))
    }

    async fn line(&mut self, what: &str, timeout: Duration) -> String {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                let status = self.child.as_mut().and_then(|c| c.try_wait().ok());
                panic!(
                    "{} (pid {}) closed stdout while we waited for {what} (exit: {status:?})\n--- stderr ---\n{}",
                    self.exe,
                    self.pid,
                    self.stderr()
                )
            }
            Err(_) => panic!(
                "{} (pid {}) gave no {what} within {timeout:?}\n--- stderr ---\n{}",
                self.exe,
                self.pid,
                self.stderr()
            ),
        }
    }

    /// Sends one command line and returns its answer line (deadline [`CMD_TIMEOUT`]).
    pub async fn cmd(&mut self, line: &str) -> String {
        self.cmd_within(line, CMD_TIMEOUT).await
    }

    /// Sends one command line and returns its answer line within `timeout`.
    pub async fn cmd_within(&mut self, line: &str, timeout: Duration) -> String {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        if let Err(e) = writeln!(stdin, "{line}").and_then(|_| stdin.flush()) {
            panic!(
                "cannot write {line:?} to {} (pid {}): {e}\n--- stderr ---\n{}",
                self.exe,
                self.pid,
                self.stderr()
            );
        }
        self.line(&format!("the answer to {line:?}"), timeout).await
    }

    /// Sends a command and asserts its answer starts with `prefix`; returns the answer.
    pub async fn expect(&mut self, line: &str, prefix: &str) -> String {
        let answer = self.cmd(line).await;
        assert!(
            answer.starts_with(prefix),
            "{} (pid {}) answered {answer:?} to {line:?}, expected {prefix:?}…\n--- stderr ---\n{}",
            self.exe,
            self.pid,
            self.stderr()
        );
        answer
    }

    /// `run T N`; asserts the program made exactly `T*N` calls of `work` and returns
    /// the worker threads' ids.
    pub async fn run(&mut self, threads: u64, n: u64) -> Vec<u32> {
        let answer = self.expect(&format!("run {threads} {n}"), "ran ").await;
        assert_eq!(
            field(&answer, "work"),
            Some((threads * n).to_string().as_str()),
            "{answer}"
        );
        field(&answer, "tids")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("tid"))
            .collect()
    }

    /// Whether the process is still running (not exited, not a zombie we reaped).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the process with SIGKILL and reaps it; returns its exit status.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the target was already reaped");
        self.stdin = None;
        let _ = child.kill();
        child.wait().expect("reap the killed target")
    }

    /// Sends `quit` and waits (bounded) for the exit status.
    pub async fn quit(&mut self) -> std::process::ExitStatus {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "quit").expect("write quit");
        stdin.flush().expect("flush quit");
        self.stdin = None;
        let child = self.child.as_mut().expect("child");
        let deadline = std::time::Instant::now() + CMD_TIMEOUT;
        loop {
            if let Some(s) = child.try_wait().expect("wait target") {
                return s;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "{} (pid {}) did not exit within {CMD_TIMEOUT:?} of `quit`\n--- stderr ---\n{}",
                    self.exe,
                    self.pid,
                    self.stderr()
                );
            }
            tokio::time::sleep(crate::wait::POLL).await;
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- stderr of {} (pid {}) ---\n{}--- end of stderr ---",
                self.exe,
                self.pid,
                self.stderr()
            );
        }
    }
}

/// The value of `key=` in a space-separated answer line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Waits (deadline [`AGENT_TIMEOUT`]) until ListAgents shows `pid` connected; returns it.
pub async fn wait_agent(c: &Control, pid: u32) -> AgentInfo {
    wait_for(
        AGENT_TIMEOUT,
        &format!("the agent of pid {pid} to connect"),
        || {
            let mut c = c.clone();
            async move {
                let agents = crate::ops::agents(&mut c).await;
                match agents.iter().find(|a| a.pid == pid && a.connected) {
                    Some(a) => Ok(a.clone()),
                    None => Err(agents),
                }
            }
        },
    )
    .await
}

/// Counts of a `count` tracer.
pub async fn counts(c: &mut Control, tracer: u64) -> CountsResponse {
    c.counts(CountsRequest { tracer_id: tracer })
        .await
        .unwrap_or_else(|s| panic!("Counts({tracer}) failed: {s:?}"))
        .into_inner()
}

/// Waits (deadline [`COUNT_TIMEOUT`]) until the total of tracer `tracer` is exactly
/// `expected`; panics at once if it goes beyond.
pub async fn wait_total(c: &Control, tracer: u64, expected: u64) -> CountsResponse {
    wait_for(
        COUNT_TIMEOUT,
        &format!("tracer {tracer} to count exactly {expected} calls"),
        || {
            let mut c = c.clone();
            async move {
                let r = counts(&mut c, tracer).await;
                assert!(
                    r.total <= expected,
                    "tracer {tracer} counted {} calls, more than the {expected} made: {r:?}",
                    r.total
                );
                if r.total == expected { Ok(r) } else { Err(r) }
            }
        },
    )
    .await
}

/// Functions of `pid` matching `pattern`.
pub async fn functions(c: &mut Control, pid: u32, pattern: &str) -> Vec<Function> {
    c.list_functions(ListFunctionsRequest {
        pid,
        pattern: pattern.into(),
        limit: 0,
    })
    .await
    .unwrap_or_else(|s| panic!("ListFunctions(pid {pid}, {pattern:?}) failed: {s:?}"))
    .into_inner()
    .functions
}

/// The one function of `pid` named exactly `name`.
pub async fn function(c: &mut Control, pid: u32, name: &str) -> Function {
    let all = functions(c, pid, name).await;
    let found: Vec<&Function> = all.iter().filter(|f| f.name == name).collect();
    match found.as_slice() {
        [f] => (*f).clone(),
        _ => panic!("expected exactly one function named {name:?} in pid {pid}, got {all:?}"),
    }
}

/// Trampolines of one process.
pub async fn trampolines_of(c: &mut Control, pid: u32, include_freed: bool) -> Vec<TrampolineInfo> {
    c.list_trampolines(ListTrampolinesRequest { pid, include_freed })
        .await
        .expect("ListTrampolines")
        .into_inner()
        .trampolines
}

/// Synchronize (bounded by `timeout`), panicking on error.
pub async fn synchronize(c: &mut Control, timeout: Duration) -> SynchronizeResponse {
    c.synchronize(SynchronizeRequest {
        timeout_ms: timeout.as_millis() as u32,
    })
    .await
    .unwrap_or_else(|s| panic!("Synchronize failed: {s:?}"))
    .into_inner()
}

// ------------------------------------------------------ shared test steps

/// Bound on one `Detach(wait)` and on a Synchronize.
pub const GP_TIMEOUT: Duration = Duration::from_secs(10);

/// A server, a Control client, and a fixture built in `mode` whose agent is connected.
pub async fn setup(mode: Build) -> (crate::TestServer, Control, Target) {
    setup_with(mode, &[]).await
}

/// [`setup`] with extra server arguments (e.g. `["--stall-threshold-ms", "200"]`).
pub async fn setup_with(mode: Build, server_args: &[&str]) -> (crate::TestServer, Control, Target) {
    let server = crate::TestServer::start_with(server_args);
    let c = server.control().await;
    let target = Target::start(mode, server.socket_path()).await;
    wait_agent(&c, target.pid()).await;
    (server, c, target)
}

/// Attaches a `count` tracer on `pattern` in `pid`; asserts exactly `sites` sites
/// were patched in that one agent.
pub async fn attach_count(c: &mut Control, pid: u32, pattern: &str, sites: u32) -> u64 {
    let (id, resp) =
        crate::ops::attach(c, crate::ops::spec_pid(pid, pattern, CallbackKind::Count)).await;
    assert_eq!(resp.results.len(), 1, "{resp:?}");
    let r = &resp.results[0];
    assert_eq!(r.pid, pid, "{resp:?}");
    assert!(r.error.is_empty(), "attach failed in the agent: {resp:?}");
    assert_eq!(r.sites_patched, sites, "{resp:?}");
    id
}

/// Detaches with `wait` and asserts the grace period completed within [`GP_TIMEOUT`].
pub async fn detach_wait(c: &mut Control, tracer: u64, what: &str) -> DetachResponse {
    let d = crate::ops::try_detach(c, tracer, true, GP_TIMEOUT.as_millis() as u32)
        .await
        .unwrap_or_else(|s| panic!("{what}: detach(wait) of tracer {tracer} failed: {s:?}"));
    assert!(
        d.complete,
        "{what}: detach of tracer {tracer} not complete: {d:?}"
    );
    d
}

/// The count of `function` in a Counts answer (0 when absent).
pub fn count_of(r: &CountsResponse, function: &str) -> u64 {
    r.counts
        .iter()
        .filter(|f| f.function == function)
        .map(|f| f.count)
        .sum()
}

/// Sends `quit` and asserts the target was alive and exits with status 0.
pub async fn quit_ok(t: &mut Target) {
    assert!(t.alive(), "the target died");
    let status = t.quit().await;
    assert!(status.success(), "the target exited with {status}");
}
