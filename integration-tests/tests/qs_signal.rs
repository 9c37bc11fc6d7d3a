//! A program that uses the agent's default quiescent-state signal (SIGRTMIN+3) for its
//! own purposes (`fixtures/qs_target.c`: its own handler on that signal, four busy
//! threads calling `work`, and a noise thread raising the signal on them every ~0.5 ms),
//! with its handler installed three ways: `sigaction`, `signal()`, and a raw
//! `rt_sigaction` system call behind the agent's interposition. Under 100 attach/detach
//! cycles (count tracer, `detach --wait` each): every detach completes within 1 s, the
//! program's handler runs exactly as often as the program raised the signal, and it
//! never sees one of the agent's.

use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::target::*;
use integration_tests::{Target, TestServer, bins, fixtures, wait_agent};

/// Tests of this file run one at a time (each runs five busy threads on 2 cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CYCLES: usize = 100;
const DETACH_BOUND: Duration = Duration::from_secs(1);

async fn program_keeps_its_signal(mode: &str) {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(&[]);
    let mut c = server.control().await;
    let mut cmd = Command::new(fixtures::qs_target());
    cmd.arg(mode)
        .env("LD_PRELOAD", bins::agent_lib())
        .env("PATCHBAY_SOCKET", server.socket_path())
        .env(
            "PATCHBAY_AGENT_LOG",
            std::env::var("PATCHBAY_AGENT_LOG").unwrap_or_else(|_| "debug".into()),
        );
    let mut t = Target::spawn(cmd).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    // The program sees its own action (for `raw`: once the agent took it back, which
    // happens before any grace period).
    t.expect("noise", "noising").await;
    let mut detach_times = Vec::with_capacity(CYCLES);
    let started = Instant::now();
    for i in 0..CYCLES {
        let id = attach_count(&mut c, pid, "work", 1).await;
        let t0 = Instant::now();
        let d = detach_wait(&mut c, id, &format!("{mode} cycle {i}")).await;
        let took = t0.elapsed();
        assert_eq!(d.retired.len(), 1, "{mode} cycle {i}: {d:?}");
        assert!(
            took < DETACH_BOUND,
            "{mode} cycle {i}: detach --wait took {took:?}\n{}",
            t.stderr()
        );
        detach_times.push(took);
    }
    let quiet = t.expect("quiet", "quiet ").await;
    let num = |k: &str| -> u64 { field(&quiet, k).unwrap().parse().unwrap() };
    let max = detach_times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{mode}: {CYCLES} attach/detach(wait) cycles in {:?}, max detach {max:?}; {quiet}",
        started.elapsed()
    );
    assert!(num("sent") > 0, "the program raised nothing: {quiet}");
    assert!(num("work") > 0, "the busy threads made no call: {quiet}");
    assert_eq!(
        num("received"),
        num("sent"),
        "{mode}: the program's handler ran another number of times than it raised the signal: {quiet}"
    );
    assert_eq!(
        num("foreign"),
        0,
        "{mode}: agent signals reached the program: {quiet}"
    );
    let q = t.expect("query", "query ").await;
    assert_eq!(q, "query handler=own", "{mode}: sigaction's view");
    quit_ok(&mut t).await;
}

#[tokio::test]
async fn program_handler_installed_with_sigaction_keeps_its_signal() {
    program_keeps_its_signal("sigaction").await;
}

#[tokio::test]
async fn program_handler_installed_with_signal_keeps_its_signal() {
    program_keeps_its_signal("signal").await;
}

#[tokio::test]
async fn program_handler_installed_with_raw_rt_sigaction_keeps_its_signal() {
    program_keeps_its_signal("raw").await;
}
