//! `patchbay attach --pid` on processes started without any agent (issue 13): the agent
//! is injected with ptrace, the calls made after the attach are counted exactly, and the
//! program notices nothing — same output, same exit status as untraced, and no system
//! call it made returned EINTR (`fixtures/inject_target.c` counts them). The refusals,
//! each with its message.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use integration_tests::bins;
use integration_tests::fixtures;
use integration_tests::server::TestServer;
use integration_tests::wait::{wait_for, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const WAIT: Duration = Duration::from_secs(20);

struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

async fn spawn(exe: &Path, mode: &str) -> Target {
    let mut child = Command::new(exe)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .env_remove("LD_PRELOAD")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn inject_target");
    let pid = child.id().unwrap();
    let stdin = child.stdin.take();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ready\n", "{mode}");
    Target {
        child,
        stdin,
        stdout,
        pid,
    }
}

impl Target {
    async fn go(&mut self) -> Vec<String> {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
        let mut lines = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            self.stdout.read_line(&mut line).await.unwrap();
            lines.push(line);
        }
        lines
    }

    async fn finish(mut self) -> (Vec<String>, i32) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("target exits")
            .unwrap();
        (Vec::new(), status.code().unwrap_or(-1))
    }
}

/// The main thread's state in `/proc/PID/syscall`: "running" or the syscall number.
fn syscall_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// What the program prints and its exit status, untraced.
async fn untraced(mode: &str) -> (Vec<String>, i32) {
    let mut t = spawn(&fixtures::inject_target(false), mode).await;
    let lines = t.go().await;
    let (_, status) = t.finish().await;
    (lines, status)
}

fn agent() -> String {
    bins::agent_lib().display().to_string()
}

async fn count_of(server: &TestServer, tracer: u64) -> u64 {
    let v = server
        .cli_json(&["--json", "counts", &tracer.to_string()])
        .await;
    v["counts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["function"] == "pbinj_work")
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum()
}

/// One plain program in `mode`, blocked (or running) as `expect` says: attach by pid,
/// the calls after the attach counted exactly, detach, the output and exit status of an
/// untraced run, no EINTR.
async fn injected_run(mode: &str, expect: &str) {
    let server = TestServer::start();
    let (want_lines, want_status) = untraced(mode).await;
    assert_eq!(want_lines[1], "eintr 0\n", "untraced {mode}");

    let mut t = spawn(&fixtures::inject_target(false), mode).await;
    let pid = t.pid;
    wait_until(WAIT, &format!("{mode}: main thread {expect}"), || async {
        syscall_of(pid) == expect
    })
    .await;
    let v = server
        .cli_json(&[
            "--json",
            "attach",
            "--pid",
            &pid.to_string(),
            "--count",
            "pbinj_work",
            "--agent",
            &agent(),
        ])
        .await;
    let tracer = v["tracer"]["tracer_id"].as_u64().expect("tracer id");
    assert_eq!(v["results"][0]["sites_patched"], 1, "{v}");
    let agents = server.cli_json(&["--json", "agents"]).await;
    let me = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["pid"] == pid)
        .cloned()
        .expect("the injected agent is listed");
    assert_eq!(me["arrival"], "injected", "{me}");

    let lines = t.go().await;
    let calls: u64 = lines[0].split_whitespace().nth(1).unwrap().parse().unwrap();
    let seen = wait_for(WAIT, "the counts of the calls after the attach", || async {
        let n = count_of(&server, tracer).await;
        if n >= calls { Ok(n) } else { Err(n) }
    })
    .await;
    assert_eq!(seen, calls, "{mode}: exact count");
    let out = server.cli(&["detach", &tracer.to_string()]).await;
    assert!(out.status.success(), "detach");
    let (_, status) = t.finish().await;
    assert_eq!(lines, want_lines, "{mode}: same output as untraced");
    assert_eq!(lines[1], "eintr 0\n", "{mode}: no EINTR");
    assert_eq!(status, want_status, "{mode}: same exit status as untraced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_in_read() {
    injected_run("read", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_in_nanosleep() {
    // glibc's nanosleep is clock_nanosleep.
    injected_run("nanosleep", &libc::SYS_clock_nanosleep.to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_in_a_loop() {
    injected_run("busy", "running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_in_futex_waits() {
    injected_run("futex", &libc::SYS_futex.to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_in_epoll_wait() {
    injected_run("epoll", &libc::SYS_epoll_wait.to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_in_poll() {
    injected_run("poll", &libc::SYS_poll.to_string()).await;
}

/// Injecting twice loads nothing twice: the second attach finds the agent connected;
/// the SDK's injector finds it mapped and loads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injecting_twice_loads_nothing_twice() {
    let server = TestServer::start();
    let t = spawn(&fixtures::inject_target(false), "read").await;
    let pid = t.pid.to_string();
    for pattern in ["pbinj_work", "pbinj_*"] {
        server
            .cli_json(&[
                "--json",
                "attach",
                "--pid",
                &pid,
                "--count",
                pattern,
                "--agent",
                &agent(),
            ])
            .await;
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let agent_maps: std::collections::BTreeSet<&str> = maps
        .lines()
        .filter(|l| l.contains("libpatchbay_agent"))
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    assert_eq!(agent_maps.len(), 1, "{maps}");
    let opts = patchbay_sdk::inject::InjectOptions {
        agent: bins::agent_lib(),
        socket: server.socket_path().to_path_buf(),
        timeout: Duration::from_secs(10),
    };
    let again = patchbay_sdk::inject::inject(t.pid, &opts).unwrap();
    assert_eq!(again, patchbay_sdk::inject::Injected::AlreadyThere);
    let agents = server.cli_json(&["--json", "agents"]).await;
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1, "{agents}");
}

async fn refusal(server: &TestServer, uid: Option<u32>, pid: u32) -> String {
    let pid = pid.to_string();
    let agent = agent();
    let args = [
        "attach",
        "--pid",
        &pid,
        "--count",
        "pbinj_work",
        "--agent",
        &agent,
    ];
    let out = match uid {
        Some(uid) => server.cli_as(uid, uid, &args).await,
        None => server.cli(&args).await,
    };
    assert!(!out.status.success(), "attach must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why() {
    let server = TestServer::start_with(&["--socket-mode", "666"]);
    // A statically linked program has no dynamic loader.
    let t = spawn(&fixtures::inject_target(true), "read").await;
    let e = refusal(&server, None, t.pid).await;
    assert!(
        e.contains(&format!(
            "cannot inject the agent into pid {}: no C library",
            t.pid
        )),
        "{e}"
    );
    assert!(e.contains("statically linked"), "{e}");

    // A seccomp filter.
    let t = spawn(&fixtures::inject_target(false), "seccomp").await;
    let e = refusal(&server, None, t.pid).await;
    assert!(e.contains("it runs under seccomp (mode 2)"), "{e}");

    // Another uid: the program runs as root, the caller is nobody.
    let t = spawn(&fixtures::inject_target(false), "read").await;
    let e = refusal(&server, Some(65534), t.pid).await;
    assert!(e.contains("it runs as uid 0 and you are uid 65534"), "{e}");
    assert!(
        !std::fs::read_to_string(format!("/proc/{}/maps", t.pid))
            .unwrap()
            .contains("libpatchbay_agent")
    );

    // Already traced by a debugger: this test process seizes it first.
    let t = spawn(&fixtures::inject_target(false), "read").await;
    let tid = t.pid as i32;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(i64, i32)>();
    let tracer = std::thread::spawn(move || {
        // SAFETY: PTRACE_SEIZE takes no pointers; the tracee is our child.
        let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) };
        // SAFETY: gettid cannot fail. (The tracer is this thread: TracerPid names it.)
        ready_tx.send((r, unsafe { libc::gettid() })).unwrap();
        // Hold the tracer until the test is done (its exit detaches).
        let _ = rx.recv();
    });
    let (seized, tracer_tid) = ready_rx.recv().unwrap();
    assert_eq!(seized, 0, "seize the target");
    let e = refusal(&server, None, t.pid).await;
    assert!(
        e.contains(&format!("it is already traced by pid {tracer_tid}")),
        "{e}"
    );
    assert!(e.contains("detach the debugger first"), "{e}");
    tx.send(()).unwrap();
    tracer.join().unwrap();

    // --no-inject keeps the old answer.
    let t = spawn(&fixtures::inject_target(false), "read").await;
    let pid = t.pid.to_string();
    let out = server
        .cli(&[
            "attach",
            "--pid",
            &pid,
            "--count",
            "pbinj_work",
            "--no-inject",
        ])
        .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no agent in pid {pid}")));
}

/// A process that is gone by the time of the injection: a precise error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exited_is_reported() {
    let server = TestServer::start();
    let t = spawn(&fixtures::inject_target(false), "read").await;
    let pid = t.pid;
    let (_, _) = t.finish().await;
    let e = refusal(&server, None, pid).await;
    // No process to inject into: the server's NO_AGENT answer stands.
    assert!(e.contains(&format!("no agent in pid {pid}")), "{e}");
}
