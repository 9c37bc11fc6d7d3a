//! The torture target as a child process: line commands over stdin/stdout, stderr in a
//! file, and death detection (a crash is a result here, not a panic).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::sync::mpsc;

/// Deadline of one command's answer (a pause waits for 16 preempted threads).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TargetProc {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::UnboundedReceiver<String>,
    stderr_path: std::path::PathBuf,
    /// Set by the stdout reader when the target closed its stdout (exited or died).
    pub closed: Arc<AtomicBool>,
    pub pid: u32,
    pub tids: Vec<u32>,
}

impl TargetProc {
    pub async fn start(
        exe: &Path,
        socket: &Path,
        threads: usize,
        seed: u64,
        cold: usize,
        stderr_path: &Path,
    ) -> anyhow::Result<TargetProc> {
        let stderr = File::create(stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut child = Command::new(exe)
            .arg(threads.to_string())
            .arg(seed.to_string())
            .arg(cold.to_string())
            .env("PATCHBAY_SOCKET", socket)
            .env(
                "PATCHBAY_AGENT_LOG",
                std::env::var("PATCHBAY_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let stdin = child.stdin.take();
        let pid = child.id();
        let closed = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::unbounded_channel();
        let flag = closed.clone();
        std::thread::Builder::new()
            .name("torture-target-stdout".into())
            .spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
                flag.store(true, Ordering::Release);
            })
            .context("stdout reader thread")?;
        let mut t = TargetProc {
            child,
            stdin,
            rx,
            stderr_path: stderr_path.to_path_buf(),
            closed,
            pid,
            tids: Vec::new(),
        };
        let ready = t.line("the ready line").await?;
        if !ready.starts_with(&format!("ready pid={pid} ")) {
            bail!("unexpected first line of the target: {ready:?}");
        }
        let tids = t.cmd("tids").await?;
        t.tids = tids
            .strip_prefix("tids ")
            .ok_or_else(|| anyhow!("bad tids answer {tids:?}"))?
            .split(',')
            .map(|s| s.parse().with_context(|| format!("bad tid in {tids:?}")))
            .collect::<anyhow::Result<_>>()?;
        if t.tids.len() != threads {
            bail!("the target reports {} workers, not {threads}", t.tids.len());
        }
        Ok(t)
    }

    async fn line(&mut self, what: &str) -> anyhow::Result<String> {
        match tokio::time::timeout(CMD_TIMEOUT, self.rx.recv()).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(anyhow!(
                "the target closed its stdout while we waited for {what}"
            )),
            Err(_) => Err(anyhow!("the target gave no {what} within {CMD_TIMEOUT:?}")),
        }
    }

    /// Sends a command, returns its answer line.
    pub async fn cmd(&mut self, line: &str) -> anyhow::Result<String> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing {line:?} to the target"))?;
        let answer = self.line(&format!("answer to {line:?}")).await?;
        if answer.starts_with("error") {
            bail!("the target answered {answer:?} to {line:?}");
        }
        Ok(answer)
    }

    /// Whether the target's stdout is closed (it exited or died).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The exit status if the target has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (bounded) for the target to exit; kills it after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait for the killed target");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `quit`, expects `bye`, and returns the exit status.
    pub async fn quit(&mut self) -> anyhow::Result<ExitStatus> {
        let bye = self.cmd("quit").await;
        self.stdin = None;
        let status = self.wait_exit(CMD_TIMEOUT).await;
        match bye {
            Ok(b) if b == "bye" => Ok(status),
            Ok(b) => bail!("the target answered {b:?} to quit"),
            Err(e) => Err(e),
        }
    }

    /// What the target (and its agent) wrote to stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_else(|e| format!("<{e}>"))
    }
}

impl Drop for TargetProc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
