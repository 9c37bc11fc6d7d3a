//! Driving `script-agent` processes from tests.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bins;
use crate::server::Control;

/// Default time to wait for a line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `script-agent` with piped stdin/stdout. Stdout lines are collected by a
/// reader thread; [`ScriptAgent::expect_line`] takes the first unconsumed line with a
/// prefix, so lines may be awaited in any order. Killed (and reaped) on drop.
pub struct ScriptAgent {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::UnboundedReceiver<String>,
    /// Lines received and not yet consumed by `expect_line`.
    pending: VecDeque<String>,
    /// Every line seen, for failure messages.
    seen: Vec<String>,
    eof: bool,
    stderr: tempfile::NamedTempFile,
    pid: u32,
}

impl ScriptAgent {
    /// Spawns `script-agent --socket SOCKET ARGS...` without waiting for anything.
    pub fn spawn(socket: &Path, args: &[&str]) -> ScriptAgent {
        ScriptAgent::spawn_with(socket, args, None)
    }

    /// Like [`ScriptAgent::spawn`], running as user (uid, gid) (the test runs as root).
    pub fn spawn_as(socket: &Path, uid: u32, gid: u32, args: &[&str]) -> ScriptAgent {
        ScriptAgent::spawn_with(socket, args, Some((uid, gid)))
    }

    fn spawn_with(socket: &Path, args: &[&str], ids: Option<(u32, u32)>) -> ScriptAgent {
        use std::os::unix::process::CommandExt;
        let stderr = tempfile::NamedTempFile::new().expect("agent stderr file");
        let exe = bins::script_agent();
        let mut cmd = Command::new(&exe);
        if let Some((uid, gid)) = ids {
            // std drops the supplementary groups when root sets a uid.
            cmd.gid(gid).uid(uid);
        }
        let mut child = cmd
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                File::options()
                    .append(true)
                    .open(stderr.path())
                    .expect("open"),
            )
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", exe.display()));
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::unbounded_channel();
        let pid = child.id();
        std::thread::Builder::new()
            .name(format!("script-agent-{pid}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .expect("reader thread");
        ScriptAgent {
            child: Some(child),
            stdin,
            rx,
            pending: VecDeque::new(),
            seen: Vec::new(),
            eof: false,
            stderr,
            pid,
        }
    }

    /// Spawns an agent and waits for its `welcome` line; returns it and its agent id.
    pub async fn connect(socket: &Path, args: &[&str]) -> (ScriptAgent, u64) {
        let mut agent = ScriptAgent::spawn(socket, args);
        let line = agent.expect_line("welcome ", LINE_TIMEOUT).await;
        let id = field(&line, "agent")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no agent id in {line:?}"));
        (agent, id)
    }

    /// Process id of the agent (what it reports in Hello unless `--pid-override`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Writes one command line to the agent's stdin.
    pub fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("agent stdin closed");
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("write {cmd:?} to script-agent {}: {e}", self.pid));
    }

    /// Sends a command and waits for its `ok CMD` acknowledgement.
    pub async fn cmd(&mut self, cmd: &str) {
        self.send(cmd);
        self.expect_line(&format!("ok {cmd}"), LINE_TIMEOUT).await;
    }

    fn drain(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(line) => self.push(line),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.eof = true;
                    return;
                }
            }
        }
    }

    fn push(&mut self, line: String) {
        self.seen.push(line.clone());
        if line.starts_with("bad-") {
            panic!(
                "script-agent {} saw a protocol violation by the server: {line}\n{}",
                self.pid,
                self.report()
            );
        }
        self.pending.push_back(line);
    }

    fn take(&mut self, pred: &impl Fn(&str) -> bool) -> Option<String> {
        let i = self.pending.iter().position(|l| pred(l))?;
        self.pending.remove(i)
    }

    /// Whether an unconsumed line starting with `prefix` has arrived (does not wait,
    /// does not consume).
    pub fn has_line(&mut self, prefix: &str) -> bool {
        self.drain();
        self.pending.iter().any(|l| l.starts_with(prefix))
    }

    /// Waits up to `timeout` for a line starting with `prefix`, consumes and returns it.
    /// Panics with every line seen when it does not come.
    pub async fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect(&format!("{prefix:?}"), timeout, |l| l.starts_with(prefix))
            .await
    }

    /// Waits up to `timeout` for a line for which `pred` holds, consumes and returns it.
    /// Panics with every line seen when it does not come (`what` describes it).
    pub async fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(line) = self.take(&pred) {
                return line;
            }
            if self.eof {
                panic!(
                    "script-agent {} ended before printing {what}\n{}",
                    self.pid,
                    self.report()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "script-agent {} did not print {what} within {timeout:?}\n{}",
                    self.pid,
                    self.report()
                );
            }
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(line)) => self.push(line),
                Ok(None) => self.eof = true,
                Err(_) => {}
            }
        }
    }

    /// Negative check: asserts that no unconsumed line starts with `prefix`, after a sync
    /// point ([`ScriptAgent::sync`]) so that every message the server sent this agent
    /// before it has been printed (a forbidden message still in flight fails the check).
    pub async fn assert_no_line(&mut self, c: &mut Control, prefix: &str) {
        self.assert_no_lines(c, &[prefix]).await;
    }

    /// [`ScriptAgent::assert_no_line`] for several prefixes, after one sync point.
    pub async fn assert_no_lines(&mut self, c: &mut Control, prefixes: &[&str]) {
        self.sync(c).await;
        self.check_no_line(prefixes);
    }

    /// Negative check for an agent without a session (the server refused its Hello or
    /// ended the stream: an `error ...` or `closed` line, or it was told to `disconnect`):
    /// no server message can reach it. A stdin round trip (`epoch`) makes sure its loop
    /// printed every line it had, then no unconsumed line may start with `prefix`.
    pub async fn assert_no_line_without_session(&mut self, prefix: &str) {
        self.drain();
        if !self.session_ended() {
            panic!(
                "script-agent {}: its session has not ended, a negative check needs a sync \
                 point (assert_no_line)\n{}",
                self.pid,
                self.report()
            );
        }
        self.cmd("epoch").await;
        self.check_no_line(&[prefix]);
    }

    /// A sync point: a round trip through the server that this agent answers after every
    /// message the server queued for it before (a `ListFunctions` of a pattern no fake
    /// function matches; the server sends messages to an agent in order on one stream).
    /// Every effect on this agent of the requests answered before has been printed when it
    /// returns.
    pub async fn sync(&mut self, c: &mut Control) {
        crate::ops::sync_point(c, self).await;
    }

    /// Whether the last line about the session says it ended.
    fn session_ended(&self) -> bool {
        self.seen
            .iter()
            .rev()
            .find_map(|l| {
                if l.starts_with("welcome ") || l == "ok reconnect" {
                    Some(false)
                } else if l.starts_with("error ") || l == "closed" || l == "ok disconnect" {
                    Some(true)
                } else {
                    None
                }
            })
            .unwrap_or(false)
    }

    fn check_no_line(&mut self, prefixes: &[&str]) {
        self.drain();
        let found = self
            .pending
            .iter()
            .find(|l| prefixes.iter().any(|p| l.starts_with(p)));
        if let Some(l) = found {
            panic!(
                "script-agent {} printed unexpected {l:?}\n{}",
                self.pid,
                self.report()
            );
        }
    }

    /// Every line printed so far.
    pub fn lines(&mut self) -> &[String] {
        self.drain();
        &self.seen
    }

    /// Lines seen and the agent's stderr, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- script-agent {} stdout ---\n{}\n--- script-agent stderr ---\n{}",
            self.pid,
            self.seen.join("\n"),
            std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
        )
    }

    /// Kills the agent with SIGKILL and reaps it (so that /proc/PID disappears).
    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `quit` and waits for the process to exit on its own.
    pub async fn quit(&mut self) {
        self.send("quit");
        self.stdin = None;
        let mut child = self.child.take().expect("agent already gone");
        crate::wait::wait_for(LINE_TIMEOUT, "script-agent to exit", || {
            let r = child.try_wait();
            async move {
                match r {
                    Ok(Some(s)) => Ok(s),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }
}

impl Drop for ScriptAgent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.drain();
            eprintln!("{}", self.report());
        }
    }
}

/// Value of `key=value` in a script-agent line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
