//! Faults with real processes (C fixture `integration-tests/fixtures/target.c` with the
//! agent preloaded, a real `patchbayd` per test): a thread held inside a callback, the
//! traced process killed during a grace period, a server that stops answering while a
//! `trace` tracer produces events, thread churn during grace periods, a thread that
//! blocks every signal, fork and exec.
//!
//! Every wait is a condition with a deadline. The tests of this file run one at a time
//! (2 cores); each stays well under 30 s in a debug build.

use std::time::{Duration, Instant};

use integration_tests::fixtures::Build;
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::server::Control;
use integration_tests::target::*;
use integration_tests::{Target, TestServer, wait_for};
use tonic::Code;

/// Tests of this file run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stalls are reported after this long (server flag), to keep the tests short.
const STALL_MS: &str = "200";

/// The grace period of trampoline `tramp` in `pid`, when pending.
fn gp_of(all: &[GracePeriodInfo], pid: u32, tramp: u64) -> Option<GracePeriodInfo> {
    all.iter()
        .find(|g| {
            g.pid == pid && g.purpose == Some(grace_period_info::Purpose::TrampolineId(tramp))
        })
        .cloned()
}

/// Waits until the grace period of `tramp` in `pid` shows thread `tid` as a stalled
/// holdout for which `ok` holds; returns that stall.
async fn wait_stall(
    c: &Control,
    pid: u32,
    tramp: u64,
    tid: u32,
    ok: impl Fn(&Stall) -> bool,
) -> Stall {
    wait_for(
        STATE_TIMEOUT,
        &format!("a stall of thread {tid} in the grace period of trampoline {tramp} of pid {pid}"),
        || {
            let mut c = c.clone();
            let ok = &ok;
            async move {
                let all = grace_periods(&mut c).await;
                let stall = gp_of(&all, pid, tramp).and_then(|g| {
                    g.holdouts
                        .into_iter()
                        .find(|h| h.tid == tid)
                        .and_then(|h| h.stall)
                });
                match stall {
                    Some(s) if ok(&s) => Ok(s),
                    _ => Err(all),
                }
            }
        },
    )
    .await
}

/// Waits until trampoline `tramp` of `pid` is FREED.
async fn wait_freed(c: &Control, pid: u32, tramp: u64) {
    wait_for(
        GP_TIMEOUT,
        &format!("trampoline {tramp} of pid {pid} to be freed"),
        || {
            let mut c = c.clone();
            async move {
                let all = trampolines_of(&mut c, pid, true).await;
                match all.iter().find(|x| x.trampoline_id == tramp) {
                    Some(x) if state(x) == TrampolineState::Freed => Ok(()),
                    _ => Err(all),
                }
            }
        },
    )
    .await
}

/// The one trampoline of `pid` that is not freed.
async fn only_trampoline(c: &mut Control, pid: u32) -> TrampolineInfo {
    let all = trampolines_of(c, pid, false).await;
    match all.as_slice() {
        [t] => t.clone(),
        _ => panic!("expected exactly one trampoline in pid {pid}: {all:?}"),
    }
}

/// Attaches the fixture's `hold` callback to `gate` in `pid` (after the agent announced
/// it); returns the tracer id.
async fn attach_hold(c: &mut Control, pid: u32) -> u64 {
    wait_for(
        AGENT_TIMEOUT,
        &format!("pid {pid} to announce its `hold` callback"),
        || {
            let mut c = c.clone();
            async move {
                let a = agents(&mut c).await;
                if a.iter()
                    .any(|x| x.pid == pid && x.callbacks.iter().any(|n| n == "hold"))
                {
                    Ok(())
                } else {
                    Err(a)
                }
            }
        },
    )
    .await;
    let mut spec = spec_pid(pid, "gate", CallbackKind::Custom);
    spec.callback.as_mut().unwrap().custom_name = "hold".into();
    let (id, resp) = attach(c, spec).await;
    assert_eq!(resp.results.len(), 1, "{resp:?}");
    assert!(resp.results[0].error.is_empty(), "{resp:?}");
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    id
}

/// `enter`: a thread of the target blocks inside the `hold` callback; returns its tid.
async fn enter(t: &mut Target) -> u32 {
    let a = t.expect("enter", "entered tid=").await;
    let tid: u32 = field(&a, "tid").unwrap().parse().unwrap();
    assert_ne!(tid, 0, "{a}");
    tid
}

// ------------------------------------------------ a thread held in a callback

/// A thread blocked inside a callback keeps the retired trampoline allocated, shows
/// up as a stall (tid, pc inside the callback, symbol), makes a Synchronize time out
/// naming it; once it leaves, the grace period completes and the trampoline is freed.
#[tokio::test]
async fn thread_held_in_a_callback_keeps_its_trampoline_until_it_leaves() {
    let _serial = SERIAL.lock().await;
    let (server, mut c, mut t) = setup_with(Build::Nop5, &["--stall-threshold-ms", STALL_MS]).await;
    let pid = t.pid();
    let id = attach_hold(&mut c, pid).await;
    let held = enter(&mut t).await;
    let tramp = only_trampoline(&mut c, pid).await;
    assert_eq!(state(&tramp), TrampolineState::Live, "{tramp:?}");
    let tramp = tramp.trampoline_id;

    let d = detach(&mut c, id).await;
    assert!(!d.complete, "{d:?}");
    assert_eq!(
        d.retired
            .iter()
            .map(|r| r.trampoline_id)
            .collect::<Vec<_>>(),
        vec![tramp],
        "{d:?}"
    );
    let stall = wait_stall(&c, pid, tramp, held, |s| s.pc != 0).await;
    eprintln!("stall: {stall:?}");
    assert_eq!(stall.tid, held, "{stall:?}");
    assert_eq!(
        stall.symbol, "hold_callback",
        "the pc should be inside the callback: {stall:?}"
    );
    assert!(
        stall.reason.contains("inside"),
        "the reason should say the thread is inside a callback: {stall:?}"
    );
    // The trampoline is retired, waiting for exactly that thread.
    let x = only_trampoline(&mut c, pid).await;
    assert_eq!(state(&x), TrampolineState::Retired, "{x:?}");
    assert_eq!(holdouts(&x), vec![held], "{x:?}");
    // A Synchronize cannot complete either, and says who holds it up.
    let r = c.synchronize(SynchronizeRequest { timeout_ms: 2000 }).await;
    assert_status(r, Code::DeadlineExceeded, &[&held.to_string()]);
    let x = only_trampoline(&mut c, pid).await;
    assert_eq!(state(&x), TrampolineState::Retired, "still held: {x:?}");

    // The CLI shows the same.
    let gp = server.cli_json(&["gp", "--json"]).await;
    let pending = gp["pending"].as_array().expect("pending list");
    let g = pending
        .iter()
        .find(|g| g["pid"] == pid && g["trampoline_id"] == tramp)
        .unwrap_or_else(|| panic!("no grace period of trampoline {tramp} in {gp}"));
    let h = g["holdouts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["tid"] == held)
        .unwrap_or_else(|| panic!("thread {held} is not a holdout in {g}"));
    assert_eq!(h["stall"]["symbol"], "hold_callback", "{h}");

    // It leaves the callback (and parks, blocked outside): the trampoline is freed.
    t.expect("release", &format!("released tid={held}")).await;
    wait_freed(&c, pid, tramp).await;
    let left = grace_periods(&mut c).await;
    assert!(gp_of(&left, pid, tramp).is_none(), "{left:?}");
    wait_for(STATE_TIMEOUT, "the detached tracer to go", || {
        let mut c = c.clone();
        async move {
            let all = tracers(&mut c).await;
            if all.iter().any(|x| x.tracer_id == id) {
                Err(all)
            } else {
                Ok(())
            }
        }
    })
    .await;
    t.run(2, 1000).await;
    quit_ok(&mut t).await;
}

// ------------------------------------- the process killed in a grace period

/// The traced process is killed (SIGKILL) while one of its threads holds a grace
/// period inside a callback and a Detach(wait) waits on it: the server drops the
/// agent with its trampolines and grace periods, the detach completes, nothing about
/// the process is left, and another agent is served exactly throughout.
#[tokio::test]
async fn process_killed_during_a_grace_period() {
    let _serial = SERIAL.lock().await;
    let (server, mut c, mut a) = setup_with(Build::Nop5, &["--stall-threshold-ms", STALL_MS]).await;
    let mut b = Target::start(Build::Nop5, server.socket_path()).await;
    let (pa, pb) = (a.pid(), b.pid());
    wait_agent(&c, pb).await;
    let counter = attach_count(&mut c, pb, "work", 1).await;
    b.run(1, 1000).await;
    wait_total(&c, counter, 1000).await;

    let hold = attach_hold(&mut c, pa).await;
    let held = enter(&mut a).await;
    let tramp = only_trampoline(&mut c, pa).await.trampoline_id;
    let waiting = {
        let mut c = c.clone();
        tokio::spawn(async move { try_detach(&mut c, hold, true, 20_000).await })
    };
    wait_stall(&c, pa, tramp, held, |_| true).await;
    assert!(
        !waiting.is_finished(),
        "the detach returned while a thread is held"
    );

    let status = a.kill();
    eprintln!("pid {pa} killed: {status}");
    let d = tokio::time::timeout(GP_TIMEOUT, waiting)
        .await
        .expect("the pending detach returns once the process is gone")
        .expect("join")
        .expect("the pending detach succeeds");
    eprintln!("detach answer after the kill: {d:?}");
    assert!(d.complete, "{d:?}");
    assert_eq!(
        d.retired
            .iter()
            .map(|r| r.trampoline_id)
            .collect::<Vec<_>>(),
        vec![tramp],
        "{d:?}"
    );
    wait_for(
        STATE_TIMEOUT,
        &format!("pid {pa} to leave ListAgents"),
        || {
            let mut c = c.clone();
            async move {
                let all = agents(&mut c).await;
                if all.iter().any(|x| x.pid == pa) {
                    Err(all)
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
    let left = trampolines_of(&mut c, pa, true).await;
    assert!(left.is_empty(), "trampolines of the dead process: {left:?}");
    let gps = grace_periods(&mut c).await;
    assert!(gps.iter().all(|g| g.pid != pa), "{gps:?}");
    let ts = tracers(&mut c).await;
    assert!(ts.iter().all(|x| x.tracer_id != hold), "{ts:?}");
    assert_eq!(
        ts.iter().map(|x| x.tracer_id).collect::<Vec<_>>(),
        vec![counter],
        "{ts:?}"
    );

    // The other agent was and is served exactly.
    b.run(2, 1000).await;
    wait_total(&c, counter, 3000).await;
    synchronize(&mut c, GP_TIMEOUT).await;
    detach_wait(&mut c, counter, "the other agent's tracer").await;
    wait_for(STATE_TIMEOUT, "every trampoline to be freed", || {
        let mut c = c.clone();
        async move {
            let all = trampolines(&mut c, false).await;
            if all.is_empty() { Ok(()) } else { Err(all) }
        }
    })
    .await;
    let agents_left = agents(&mut c).await;
    assert_eq!(
        agents_left.iter().map(|x| x.pid).collect::<Vec<_>>(),
        vec![pb],
        "{agents_left:?}"
    );
    quit_ok(&mut b).await;
}

// ------------------------------------------- a thread that blocks every signal

/// Queued signals of `pid`'s real uid (`SigQ` in its status).
fn queued_signals(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let q = s
        .lines()
        .find_map(|l| l.strip_prefix("SigQ:"))
        .expect("SigQ line");
    q.trim().split('/').next().unwrap().parse().unwrap()
}

/// A running thread that blocks every signal. While it blocks SIGTRAP the agent
/// refuses to unpatch (an int3 it hit would kill the process): the detach times out
/// saying so and naming the thread, and the trampoline stays live. Once it unblocks
/// SIGTRAP only, the deferred unpatch goes through, and the thread (still blocking the
/// quiescent-state signal) is reported as a stall whose reason says so; the agent does
/// not pile up signals on it. Once it unblocks everything, the grace period completes.
#[tokio::test]
async fn thread_blocking_every_signal_is_reported_until_it_unblocks() {
    let _serial = SERIAL.lock().await;
    let (server, mut c, mut t) = setup_with(Build::Nop5, &["--stall-threshold-ms", STALL_MS]).await;
    let pid = t.pid();
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(1, 1000).await;
    wait_total(&c, id, 1000).await;
    let tramp = only_trampoline(&mut c, pid).await.trampoline_id;
    let a = t.expect("sigblock", "sigblocked tid=").await;
    let blocker: u32 = field(&a, "tid").unwrap().parse().unwrap();
    assert_ne!(blocker, 0, "{a}");

    // 1. Everything blocked, SIGTRAP included: the unpatch is deferred.
    let r = try_detach(&mut c, id, true, 5000).await;
    assert_status(
        r,
        Code::DeadlineExceeded,
        &[
            &format!("trampoline {tramp} is not unpatched"),
            "sigtrap",
            &format!("thread {blocker}"),
        ],
    );
    let x = only_trampoline(&mut c, pid).await;
    assert_eq!(state(&x), TrampolineState::Retiring, "{x:?}");
    // The program runs on, through its still patched site.
    t.run(1, 1000).await;
    wait_total(&c, id, 2000).await;

    // 2. SIGTRAP unblocked, the quiescent-state signal still blocked.
    t.expect("sigtrap", &format!("sigtrap unblocked tid={blocker}"))
        .await;
    let stall = wait_stall(&c, pid, tramp, blocker, |s| s.reason.contains("signal")).await;
    eprintln!("stall: {stall:?}");
    assert!(
        stall.reason.contains("blocks"),
        "the reason should say the thread blocks the signal: {stall:?}"
    );
    let x = only_trampoline(&mut c, pid).await;
    assert_eq!(state(&x), TrampolineState::Retired, "{x:?}");
    assert_eq!(holdouts(&x), vec![blocker], "{x:?}");
    let out = server.cli(&["gp"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&blocker.to_string()) && text.contains("blocks the quiescent-state signal"),
        "`patchbay gp` should show the stall and its reason:\n{text}"
    );
    // Unpatched: calls are no longer counted.
    t.run(2, 1000).await;
    // Real-time signals queue against the uid's RLIMIT_SIGPENDING: the agent keeps at
    // most one pending on a thread that blocks it (it used to send one every 200 µs:
    // ~70 after 200 ms, hundreds after a second). The count is per uid, so other
    // processes of the machine add noise: measured after a stall of 1 s, with margin.
    let long = wait_stall(&c, pid, tramp, blocker, |s| s.duration_ms >= 1000).await;
    let queued = queued_signals(pid);
    assert!(
        queued <= 64,
        "{queued} signals queued for the uid of pid {pid} after a stall of {} ms",
        long.duration_ms
    );

    // 3. Everything unblocked: the pending signal is handled, the grace period ends.
    let u = t
        .expect("unblock", &format!("unblocked tid={blocker}"))
        .await;
    eprintln!("{u}");
    wait_freed(&c, pid, tramp).await;
    let left = grace_periods(&mut c).await;
    assert!(left.iter().all(|g| g.pid != pid), "{left:?}");
    quit_ok(&mut t).await;
}

// ----------------------------------------------------------------- thread churn

/// Threads are created and exit continuously (each calling `work` 1000 times) while
/// tracers are attached and detached: every detach completes (exited threads release
/// grace periods), a `count` tracer attached throughout counts every call exactly
/// although its sites move between trampolines, and the server's thread count ends
/// equal to the process's.
#[tokio::test]
async fn thread_churn_during_grace_periods() {
    const CYCLES: usize = 100;
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let total = attach_count(&mut c, pid, "work", 1).await;
    // Four threads each create a thread (1000 calls), join it and pause 1 ms: a few
    // thousand threads per second.
    t.expect("churn 4 1000 1000", "churning").await;
    let started = Instant::now();
    let mut detach_times = Vec::new();
    for i in 0..CYCLES {
        let kind = if i % 2 == 0 {
            CallbackKind::Count
        } else {
            CallbackKind::Trace
        };
        let (id, resp) = attach(&mut c, spec_pid(pid, "work", kind)).await;
        assert_eq!(resp.results[0].sites_patched, 1, "cycle {i}: {resp:?}");
        let t0 = Instant::now();
        detach_wait(&mut c, id, &format!("cycle {i}")).await;
        detach_times.push(t0.elapsed());
        if i % 10 == 9 {
            synchronize(&mut c, GP_TIMEOUT).await;
        }
    }
    let stopped = t.expect("churnstop", "churned ").await;
    let threads: u64 = field(&stopped, "threads").unwrap().parse().unwrap();
    let calls: u64 = field(&stopped, "work").unwrap().parse().unwrap();
    detach_times.sort_unstable();
    eprintln!(
        "{CYCLES} attach/detach cycles during churn in {:?} ({threads} threads created, {calls} calls); detach median {:?}, max {:?}",
        started.elapsed(),
        detach_times[CYCLES / 2],
        detach_times[CYCLES - 1]
    );
    assert!(
        threads >= 10,
        "too little churn to test anything: {stopped}"
    );
    assert_eq!(calls, threads * 1000, "{stopped}");
    wait_total(&c, total, calls).await;

    // The server's view of the threads ends equal to the process's (no leaked tid).
    let program_threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .map(|c| !c.starts_with("patchbay"))
                    .unwrap_or(false)
            })
            .count() as u32
    };
    wait_for(
        STATE_TIMEOUT,
        "the server's thread count of the agent to equal the process's",
        || {
            let mut c = c.clone();
            async move {
                let all = agents(&mut c).await;
                let a = all.iter().find(|a| a.pid == pid).expect("agent listed");
                let real = program_threads();
                if a.threads == real {
                    Ok(())
                } else {
                    Err((a.threads, real))
                }
            }
        },
    )
    .await;
    detach_wait(&mut c, total, "the tracer attached throughout").await;
    wait_for(STATE_TIMEOUT, "every trampoline to be freed", || {
        let mut c = c.clone();
        async move {
            let all = trampolines_of(&mut c, pid, false).await;
            if all.is_empty() { Ok(()) } else { Err(all) }
        }
    })
    .await;
    quit_ok(&mut t).await;
}

// ---------------------------------------------------------------- fork and exec

/// Lines of the server log saying that `pid`'s agent connected.
fn connections(server: &TestServer, pid: u32) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| l.contains("agent connected") && l.contains(&format!("pid={pid} ")))
        .map(str::to_string)
        .collect()
}

/// A forked child is a new agent: its inherited trampoline is listed under its own pid,
/// retired by reconcile (the tracer targets the parent) and freed after the child's own
/// grace period; its calls never count for the parent. After an exec with the agent
/// still preloaded, the new image is an agent again (same pid and start time: the
/// server resumes it), traceable exactly. When the child exits, nothing of it is left.
#[tokio::test]
async fn forked_and_execd_children_are_agents_and_leave_nothing() {
    let _serial = SERIAL.lock().await;
    let (server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let parent_agent = wait_agent(&c, pid).await.agent_id;
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(1, 1000).await;
    wait_total(&c, id, 1000).await;
    let inherited = only_trampoline(&mut c, pid).await.trampoline_id;

    // fork: the child calls work() 1000 times through the inherited patched site.
    let a = t.expect("child", "child pid=").await;
    let child: u32 = field(&a, "pid").unwrap().parse().unwrap();
    let info = wait_agent(&c, child).await;
    eprintln!("child agent: {info:?}");
    assert_ne!(info.agent_id, parent_agent, "{info:?}");
    assert_eq!(
        std::fs::canonicalize(&info.exe).ok(),
        std::fs::canonicalize(integration_tests::fixtures::fixture(Build::Nop5)).ok(),
        "{info:?}"
    );
    wait_for(
        STATE_TIMEOUT,
        &format!("the child's inherited trampoline {inherited} to be retired and freed"),
        || {
            let mut c = c.clone();
            async move {
                let all = trampolines_of(&mut c, child, true).await;
                let freed = all.iter().any(|x| {
                    x.trampoline_id == inherited
                        && state(x) == TrampolineState::Freed
                        && x.retired_epoch > 0
                });
                let unfreed = all.iter().any(|x| state(x) != TrampolineState::Freed);
                if freed && !unfreed { Ok(()) } else { Err(all) }
            }
        },
    )
    .await;
    let info = wait_agent(&c, child).await;
    assert_eq!(info.trampolines, 0, "{info:?}");
    // The parent's trampoline is untouched and its count exact.
    let x = only_trampoline(&mut c, pid).await;
    assert_eq!(
        (x.trampoline_id, state(&x)),
        (inherited, TrampolineState::Live),
        "{x:?}"
    );
    t.expect("childrun", "child ran work=1000").await;
    synchronize(&mut c, GP_TIMEOUT).await;
    assert_eq!(
        counts(&mut c, id).await.total,
        1000,
        "the child's calls leaked"
    );

    // exec: the new image (LD_PRELOAD kept) connects as the same process, resumed.
    let before = connections(&server, child).len();
    t.expect("childexec", "child execd").await;
    wait_for(AGENT_TIMEOUT, "the exec'd child's agent to connect", || {
        let server = &server;
        async move {
            let lines = connections(server, child);
            if lines.len() > before {
                Ok(lines)
            } else {
                Err(lines)
            }
        }
    })
    .await;
    let execd = wait_agent(&c, child).await;
    eprintln!("exec'd child agent: {execd:?}");
    // Same pid and start time: the same agent, resumed, with the new image's epoch
    // (it counts from 1 again) and none of the old image's callbacks or trampolines.
    assert_eq!(execd.agent_id, info.agent_id, "{execd:?}");
    assert!(execd.epoch < 5, "the new image's epoch: {execd:?}");
    assert!(execd.callbacks.is_empty(), "{execd:?}");
    assert_eq!(execd.trampolines, 0, "{execd:?}");
    let cid = attach_count(&mut c, child, "work", 1).await;
    t.expect("childrun", "child ran work=1000").await;
    wait_total(&c, cid, 1000).await;
    synchronize(&mut c, GP_TIMEOUT).await;
    assert_eq!(
        counts(&mut c, id).await.total,
        1000,
        "the child's calls leaked"
    );

    // exit: nothing of the child is left.
    t.expect("childquit", "child status=0").await;
    wait_for(
        STATE_TIMEOUT,
        &format!("pid {child} to leave ListAgents"),
        || {
            let mut c = c.clone();
            async move {
                let all = agents(&mut c).await;
                if all.iter().any(|x| x.pid == child) {
                    Err(all)
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
    let left = trampolines_of(&mut c, child, true).await;
    assert!(left.is_empty(), "{left:?}");
    let gps = grace_periods(&mut c).await;
    assert!(gps.iter().all(|g| g.pid != child), "{gps:?}");
    // What the child counted stays with its tracer.
    assert_eq!(counts(&mut c, cid).await.total, 1000);
    detach_wait(&mut c, cid, "the tracer of the gone child").await;

    // The parent stays exact.
    t.run(2, 1000).await;
    wait_total(&c, id, 3000).await;
    let all = agents(&mut c).await;
    assert_eq!(
        all.iter().map(|a| a.pid).collect::<Vec<_>>(),
        vec![pid],
        "{all:?}"
    );
    quit_ok(&mut t).await;
}

// ------------------------------------------------------ a server that stops reading

/// Receives batches of `tracer` until `done(events, last dropped)` holds; returns the
/// events and the last `dropped` seen (cumulative).
async fn collect_events(
    stream: &mut tonic::Streaming<EventBatchView>,
    tracer: u64,
    what: &str,
    done: impl Fn(&[Event], u64) -> bool,
) -> (Vec<Event>, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    let mut dropped = 0;
    while !done(&events, dropped) {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => panic!(
                "{what}: the event stream ended after {} events",
                events.len()
            ),
            Ok(Err(s)) => panic!("{what}: the event stream failed: {s:?}"),
            Err(_) => panic!(
                "{what}: timed out with {} events, {dropped} dropped",
                events.len()
            ),
        };
        assert_eq!(batch.tracer_id, tracer, "{batch:?}");
        assert!(
            batch.dropped >= dropped,
            "the dropped count went back: {batch:?}"
        );
        dropped = batch.dropped;
        events.extend(batch.events);
    }
    (events, dropped)
}

/// Checks events of round `round` (`work(i, round)` for i in 0..n): each at most once.
fn check_round(events: &[Event], round: u64, n: u64) {
    let mut seen = vec![false; n as usize];
    for e in events {
        assert_eq!(e.function, "work", "{e:?}");
        assert_eq!(e.args.len(), 2, "{e:?}");
        assert_eq!(e.args[1], round, "an event of another round: {e:?}");
        let i = e.args[0];
        assert!(i < n, "{e:?}");
        assert!(!seen[i as usize], "work({i}, {round}) reported twice");
        seen[i as usize] = true;
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// The server stops reading (SIGSTOP) while a `trace` tracer is attached: the program
/// runs on unaffected (exact answers), the agent holds back events in a bounded
/// buffer (`PATCHBAY_EVENT_BUFFER`=20000 here) instead of queueing them without bound,
/// and counts what it dropped; once the server reads again (SIGCONT) the buffered
/// events arrive, the loss is visible in the batches and in ListTracers, and
/// delivered + dropped equals exactly the calls made. Afterwards nothing is lost.
#[tokio::test]
async fn server_that_stops_reading_gets_bounded_events_and_the_exact_loss() {
    const STOPPED_CALLS: u64 = 200_000;
    let _serial = SERIAL.lock().await;
    let server = TestServer::start();
    let mut c = server.control().await;
    let mut t = Target::start_env(
        Build::Nop5,
        server.socket_path(),
        &[("PATCHBAY_EVENT_BUFFER", "20000")],
    )
    .await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    let mut spec = spec_pid(pid, "work", CallbackKind::Trace);
    spec.callback.as_mut().unwrap().arg_count = 2;
    let (id, resp) = attach(&mut c, spec).await;
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    let mut stream = c
        .watch_events(WatchEventsRequest { tracer_id: id })
        .await
        .expect("WatchEvents")
        .into_inner();

    // Connected, the paced calls lose nothing (the per-thread rings keep up).
    t.expect("trickle 20000 50 1", "trickled work=20000").await;
    let (ev, dropped) = collect_events(&mut stream, id, "round 1", |e, _| e.len() >= 20_000).await;
    assert_eq!((ev.len(), dropped), (20_000, 0));
    check_round(&ev, 1, 20_000);

    // The server stops reading; the program runs on exactly.
    signal(server.pid(), nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    t.expect(
        &format!("trickle {STOPPED_CALLS} 100 2"),
        &format!("trickled work={STOPPED_CALLS}"),
    )
    .await;
    t.run(2, 1000).await;
    eprintln!(
        "the program ran {STOPPED_CALLS} traced calls in {:?} with the server stopped",
        stopped.elapsed()
    );
    signal(server.pid(), nix::sys::signal::Signal::SIGCONT);

    // Every call is either delivered or counted as dropped. `run 2 1000` made 2000
    // more calls (round 0 and 1): keep them apart.
    let (ev, dropped) = collect_events(&mut stream, id, "round 2", |e, d| {
        e.len() as u64 + d >= STOPPED_CALLS + 2000
    })
    .await;
    let round2: Vec<Event> = ev.iter().filter(|x| x.args[1] == 2).cloned().collect();
    eprintln!(
        "after the stop: {} events delivered ({} of round 2), {dropped} dropped",
        ev.len(),
        round2.len()
    );
    assert_eq!(
        ev.len() as u64 + dropped,
        STOPPED_CALLS + 2000,
        "delivered + dropped"
    );
    assert!(
        dropped > 0,
        "nothing was dropped: the agent buffered without bound"
    );
    assert!(
        round2.len() >= 20_000,
        "the bounded buffer (20000 events) was not delivered: {}",
        round2.len()
    );
    check_round(&round2, 2, STOPPED_CALLS);
    let tracer = tracers(&mut c)
        .await
        .into_iter()
        .find(|x| x.tracer_id == id)
        .expect("the tracer is listed");
    assert_eq!(tracer.dropped, dropped, "{tracer:?}");

    // Reading again: nothing more is lost.
    t.expect("trickle 10000 50 3", "trickled work=10000").await;
    let (ev, d) = collect_events(&mut stream, id, "round 3", |e, _| e.len() >= 10_000).await;
    assert_eq!((ev.len(), d), (10_000, dropped));
    check_round(&ev, 3, 10_000);
    quit_ok(&mut t).await;
}

/// Threads created as fast as four threads can (no pause) outrun the agent's
/// recycling of thread blocks: calls that find the pool empty count in the shared
/// overflow block, so the count stays exact (the agent logs that it happened).
#[tokio::test]
async fn thread_churn_faster_than_block_recycling_still_counts_exactly() {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let total = attach_count(&mut c, pid, "work", 1).await;
    t.expect("churn 4 1000 0", "churning").await;
    let started = Instant::now();
    integration_tests::wait_until(
        Duration::from_secs(15),
        "the agent to report calls that found no free thread block",
        || {
            let log = t.stderr();
            async move { log.contains("found no free thread block") }
        },
    )
    .await;
    let stopped = t.expect("churnstop", "churned ").await;
    let threads: u64 = field(&stopped, "threads").unwrap().parse().unwrap();
    let calls: u64 = field(&stopped, "work").unwrap().parse().unwrap();
    eprintln!("{stopped} in {:?}", started.elapsed());
    assert_eq!(calls, threads * 1000, "{stopped}");
    wait_total(&c, total, calls).await;
    detach_wait(&mut c, total, "after the churn").await;
    quit_ok(&mut t).await;
}
