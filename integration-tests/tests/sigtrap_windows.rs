//! The SIGTRAP hazard of relocated installs (issue 11): an install keeps an `int3` at
//! a function entry through a grace period, and the kernel kills a thread that traps
//! with SIGTRAP blocked. Programs block every signal (`sigfillset` masks), and glibc
//! runs code with every signal blocked (the windows of `pthread_create`, a thread's
//! exit, `posix_spawn`'s child, `pthread_kill`). Each test attaches and detaches a
//! `count` tracer on functions run in such windows, in cycles, while the fixture
//! (`fixtures/masks.c`) runs them in a loop: the program must survive every cycle,
//! every attach must succeed, and the program must see the masks it set.

use std::process::Command;
use std::time::Duration;

use integration_tests::ops::{attach, detach, spec_pid};
use integration_tests::server::TestServer;
use integration_tests::target::{Target, field, quit_ok, wait_agent};
use integration_tests::{bins, fixtures};
use patchbay_proto::CallbackKind;

/// Attach/detach cycles per test.
const CYCLES: usize = 15;

async fn start(socket: &std::path::Path, mode: &str) -> Target {
    let mut cmd = Command::new(fixtures::masks_program());
    cmd.arg(mode)
        .env("LD_PRELOAD", bins::agent_lib())
        .env("PATCHBAY_SOCKET", socket)
        .env("PATCHBAY_AGENT_LOG", "info");
    Target::spawn(cmd).await
}

fn num(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Runs `CYCLES` attach/detach cycles of one `count` tracer per pattern on a fixture
/// in `mode`, checking after each that the program is alive and still making
/// progress; then that it saw no mask or spawn error, and exits 0.
async fn cycles(mode: &str, patterns: &[&str]) {
    let server = TestServer::start();
    let mut t = start(server.socket_path(), mode).await;
    let c = server.control().await;
    wait_agent(&c, t.pid()).await;
    let mut c = c;
    let mut last = 0;
    for cycle in 0..CYCLES {
        let mut ids = Vec::new();
        for p in patterns {
            let (id, resp) = attach(&mut c, spec_pid(t.pid(), p, CallbackKind::Count)).await;
            let r = resp.results.first().expect("one agent");
            assert!(
                r.error.is_empty() && r.sites_patched > 0,
                "cycle {cycle}: {p} patched nothing: {resp:?}\n{}",
                t.stderr()
            );
            ids.push(id);
        }
        assert!(t.alive(), "cycle {cycle}: the target died\n{}", t.stderr());
        for id in ids {
            detach(&mut c, id).await;
        }
        assert!(t.alive(), "cycle {cycle}: the target died\n{}", t.stderr());
        // Progress: the loops went on (waits on the condition, bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = t.cmd("status").await;
            let loops = num(&s, "loops");
            assert_eq!(num(&s, "view_errors"), 0, "{s}");
            assert_eq!(num(&s, "spawn_errors"), 0, "{s}");
            if loops > last {
                last = loops;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cycle {cycle}: no progress ({s})\n{}",
                t.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    quit_ok(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_called_with_every_signal_blocked_by_the_program() {
    cycles("mask", &["masked_work"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_spawn_child_runs_attached_functions_with_signals_blocked() {
    cycles("spawn", &["dup2", "execve", "__close_nocancel"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_creation_and_exit_run_attached_functions_with_signals_blocked() {
    cycles("threads", &["__ctype_init", "madvise", "thread_work"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pthread_kill_runs_attached_functions_with_signals_blocked() {
    cycles("kill", &["getpid", "masked_work"]).await;
}
