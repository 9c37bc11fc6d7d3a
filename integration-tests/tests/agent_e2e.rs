//! The agent end to end: real programs (C and Rust fixtures built by this crate, see
//! `integration_tests::fixtures`) started with `LD_PRELOAD=libpatchbay_agent.so`, a real
//! `patchbayd` per test on its own socket, exact counts, trace events, attach/detach
//! under load, grace periods with blocked threads, server absence and restarts, fork
//! and exec, and what the agent refuses to patch.
//!
//! The tests of this file run one at a time (they share 2 cores and some run 8 busy
//! threads); each stays well under 20 s in a debug build.

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

/// `median …, p90 …, max …` of durations.
fn summary(d: &mut [Duration]) -> String {
    d.sort_unstable();
    let at = |q: f64| d[((d.len() - 1) as f64 * q) as usize];
    format!("median {:?}, p90 {:?}, max {:?}", at(0.5), at(0.9), at(1.0))
}

// ------------------------------------------------------------- exact counts

/// `run 1 100000` then `run 8 50000`: the count tracer on `work` sees exactly every
/// call, and `other` (not traced) none.
async fn exact_counts(mode: Build, kind: SiteKind) {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(mode).await;
    let pid = t.pid();
    let f = function(&mut c, pid, mode.work()).await;
    assert!(
        f.patchable,
        "{mode:?}: {} is not patchable: {:?} (kind {:?})",
        f.name,
        f.reason,
        f.site_kind()
    );
    assert_eq!(f.site_kind(), kind, "{f:?}");
    let id = attach_count(&mut c, pid, mode.work(), 1).await;

    t.run(1, 100_000).await;
    let r = wait_total(&c, id, 100_000).await;
    assert_eq!(count_of(&r, mode.work()), 100_000, "{r:?}");

    t.run(8, 50_000).await;
    let r = wait_total(&c, id, 500_000).await;
    assert_eq!(count_of(&r, mode.work()), 500_000, "{r:?}");
    assert_eq!(count_of(&r, mode.other()), 0, "{r:?}");
    quit_ok(&mut t).await;
}

#[tokio::test]
async fn exact_counts_nop5() {
    exact_counts(Build::Nop5, SiteKind::Nop5).await;
}

#[tokio::test]
async fn exact_counts_fentry_call() {
    exact_counts(Build::FentryCall, SiteKind::Fentry).await;
}

#[tokio::test]
async fn exact_counts_rust() {
    exact_counts(Build::Rust, SiteKind::Nop5).await;
}

/// PIE `-pg -mfentry`: `call *__fentry__@GOTPCREL(%rip)` (6 bytes). The agent turns it
/// into a 5-byte nop + a 1-byte nop and patches the first 5 bytes.
#[tokio::test]
async fn exact_counts_pie_got_fentry() {
    exact_counts(Build::PieGot, SiteKind::FentryGot).await;
}

// -------------------------------------------------- attach/detach under load

#[tokio::test]
async fn attach_detach_cycles_while_hammering() {
    const CYCLES: usize = 200;
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    t.expect("hammer 8", "hammering").await;
    let started = Instant::now();
    let (mut attach_times, mut detach_times) = (Vec::new(), Vec::new());
    for i in 0..CYCLES {
        let t0 = Instant::now();
        let id = attach_count(&mut c, pid, "work", 1).await;
        let t1 = Instant::now();
        let d = detach_wait(&mut c, id, &format!("cycle {i}")).await;
        attach_times.push(t1 - t0);
        detach_times.push(t1.elapsed());
        assert_eq!(d.retired.len(), 1, "cycle {i}: {d:?}");
    }
    eprintln!(
        "{CYCLES} attach/detach(wait) cycles with 8 hammering threads: {:?}; attach {}; detach {}",
        started.elapsed(),
        summary(&mut attach_times),
        summary(&mut detach_times)
    );
    synchronize(&mut c, GP_TIMEOUT).await;
    let left = trampolines_of(&mut c, pid, false).await;
    assert!(
        left.is_empty(),
        "trampolines left after the last detach and a Synchronize: {left:?}"
    );
    let stopped = t.expect("stop", "stopped work=").await;
    let made: u64 = field(&stopped, "work").unwrap().parse().unwrap();
    assert!(made > 0, "the hammer threads made no call: {stopped}");

    // A final exact round.
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(8, 10_000).await;
    wait_total(&c, id, 80_000).await;
    quit_ok(&mut t).await;
}

/// A program signal handler that interrupts a thread inside a trampoline runs on the
/// interrupted thread's stack with the trampoline frame below it: the thread is not
/// quiescent until the handler returns and the trampoline is left. Here the program's
/// SIGUSR1 handler spins, then sleeps in `nanosleep`, 3 ms at a time on the hammer
/// threads (so the agent's quiescent-state signal often lands inside it, or its probe
/// finds the thread blocked in the handler's system call) while count tracers are
/// attached and detached: a trampoline freed on such a stamp is poisoned, and the
/// thread dies on its return (both modes did, within a second, before `sigwrap`).
#[tokio::test]
async fn program_signal_handlers_interrupting_trampolines() {
    const CYCLES: usize = 40;
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    t.expect("hammer 2", "hammering").await;
    for (mode, what) in [(0, "spinning"), (1, "sleeping")] {
        t.expect(&format!("sighog 3000 {mode}"), "sighogging").await;
        for i in 0..CYCLES {
            let id = attach_count(&mut c, pid, "work", 1).await;
            let d = detach_wait(&mut c, id, &format!("{what} cycle {i}")).await;
            assert_eq!(d.retired.len(), 1, "{what} cycle {i}: {d:?}");
        }
        let hog = t.expect("sighogstop", "sighogged").await;
        let handled: u64 = field(&hog, "handled").unwrap().parse().unwrap();
        assert!(handled > 0, "the program's handler never ran: {hog}");
        eprintln!("{CYCLES} cycles with threads {what} in a signal handler: {hog}");
    }
    synchronize(&mut c, GP_TIMEOUT).await;
    let left = trampolines_of(&mut c, pid, false).await;
    assert!(left.is_empty(), "trampolines left: {left:?}");
    t.expect("stop", "stopped work=").await;
    quit_ok(&mut t).await;
}

// -------------------------------------------------------------------- trace

#[tokio::test]
async fn trace_events_with_arguments() {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let mut spec = spec_pid(pid, "work", CallbackKind::Trace);
    spec.callback.as_mut().unwrap().arg_count = 2;
    let (id, resp) = attach(&mut c, spec).await;
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    let mut stream = c
        .watch_events(WatchEventsRequest { tracer_id: id })
        .await
        .expect("WatchEvents")
        .into_inner();

    let tids = t.run(1, 1000).await;
    assert_eq!(tids.len(), 1);
    let worker = tids[0];

    let deadline = Instant::now() + COUNT_TIMEOUT;
    let mut events: Vec<Event> = Vec::new();
    while events.len() < 1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => panic!("the event stream ended after {} events", events.len()),
            Ok(Err(s)) => panic!(
                "the event stream failed after {} events: {s:?}",
                events.len()
            ),
            Err(_) => panic!(
                "only {} of 1000 events within {COUNT_TIMEOUT:?}",
                events.len()
            ),
        };
        assert_eq!(batch.tracer_id, id, "{batch:?}");
        assert_eq!(batch.pid, pid, "{batch:?}");
        assert_eq!(batch.dropped, 0, "events dropped: {batch:?}");
        events.extend(batch.events);
    }
    assert_eq!(events.len(), 1000, "more events than calls");
    let mut seen = vec![false; 1000];
    let mut last_ts = 0;
    for (n, e) in events.iter().enumerate() {
        assert_eq!(e.function, "work", "event {n}: {e:?}");
        assert_eq!(e.tid, worker, "event {n}: {e:?}");
        assert_eq!(e.args.len(), 2, "event {n}: {e:?}");
        let i = e.args[0];
        assert!(i < 1000, "event {n}: args[0] out of range: {e:?}");
        assert!(!seen[i as usize], "event {n}: work({i}, 0) reported twice");
        seen[i as usize] = true;
        assert_eq!(e.args[1], 0, "event {n}: the thread index argument: {e:?}");
        assert!(
            e.timestamp_ns >= last_ts,
            "event {n}: timestamp went back from {last_ts}: {e:?}"
        );
        last_ts = e.timestamp_ns;
    }
    let tracer = tracers(&mut c)
        .await
        .into_iter()
        .find(|x| x.tracer_id == id)
        .expect("the tracer is listed");
    assert_eq!(tracer.dropped, 0, "{tracer:?}");
    quit_ok(&mut t).await;
}

// -------------------------------------------------------------- grace periods

#[tokio::test]
async fn thread_blocked_in_a_syscall_does_not_hold_up_a_grace_period() {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let blocked = t.expect("block", "blocked tid=").await;
    let blocked: u32 = field(&blocked, "tid").unwrap().parse().unwrap();
    assert_ne!(blocked, 0);
    let id = attach_count(&mut c, pid, "work", 1).await;
    let started = Instant::now();
    let d = detach_wait(&mut c, id, "detach with a blocked thread").await;
    let took = started.elapsed();
    assert_eq!(d.retired.len(), 1, "{d:?}");
    assert!(
        took < Duration::from_secs(5),
        "the grace period took {took:?} with thread {blocked} blocked in poll()"
    );
    let pending: Vec<_> = grace_periods(&mut c)
        .await
        .into_iter()
        .filter(|g| g.pid == pid)
        .collect();
    assert!(
        pending.is_empty(),
        "grace periods still pending: {pending:?}"
    );
    // The blocked thread was observed without being signalled (poll() would have
    // failed with EINTR).
    assert_eq!(t.cmd("eintr").await, "eintr=0");
    quit_ok(&mut t).await;
}

// ------------------------------------------------------- server availability

#[tokio::test]
async fn target_started_before_the_server() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("patchbay-it-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("late.sock");
    let mut t = Target::start(Build::Nop5, &socket).await;
    let pid = t.pid();
    // No server: the program is unaffected.
    t.run(1, 1000).await;
    t.run(4, 1000).await;

    let server = TestServer::start_at(&socket, &[]);
    let mut c = server.control().await;
    let started = Instant::now();
    wait_agent(&c, pid).await;
    eprintln!(
        "the agent connected {:?} after the server started",
        started.elapsed()
    );
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(1, 1000).await;
    wait_total(&c, id, 1000).await;
    quit_ok(&mut t).await;
}

#[tokio::test]
async fn server_killed_and_restarted_while_a_tracer_is_attached() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("patchbay-it-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("s.sock");
    let state_dir = dir.path().join("state");
    let state_arg = ["--state-dir", state_dir.to_str().unwrap()];
    let mut first = TestServer::start_at(&socket, &state_arg);
    let mut c = first.control().await;
    let mut t = Target::start(Build::Nop5, &socket).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(1, 1000).await;
    wait_total(&c, id, 1000).await;
    let before = trampolines_of(&mut c, pid, false).await;
    let [tramp] = before.as_slice() else {
        panic!("expected one trampoline: {before:?}")
    };
    assert_eq!(state(tramp), TrampolineState::Live, "{tramp:?}");
    let tramp_id = tramp.trampoline_id;

    first.kill();
    drop(c);
    // No server: the program runs unchanged, through its patched site (the agent
    // keeps counting).
    t.run(1, 1000).await;

    let second = TestServer::start_at(&socket, &state_arg);
    let mut c = second.control().await;
    wait_agent(&c, pid).await;
    // The tracer is restored from the store and keeps the trampoline the agent
    // re-reports: same id, still live, no reinstall.
    let back = tracers(&mut c).await;
    assert!(
        back.len() == 1 && back[0].tracer_id == id,
        "the restarted server should know tracer {id}: {back:?}"
    );
    wait_for(
        COUNT_TIMEOUT,
        &format!("trampoline {tramp_id} of pid {pid} re-reported live for tracer {id}"),
        || {
            let mut c = c.clone();
            async move {
                let all = trampolines_of(&mut c, pid, true).await;
                match all.as_slice() {
                    [x] if x.trampoline_id == tramp_id
                        && state(x) == TrampolineState::Live
                        && x.tracer_ids == vec![id]
                        && x.sites == 1 =>
                    {
                        Ok(())
                    }
                    _ => Err(all),
                }
            }
        },
    )
    .await;
    // Counts continue exactly: the calls made while no server ran included.
    wait_total(&c, id, 2000).await;
    t.run(1, 1000).await;
    let r = wait_total(&c, id, 3000).await;
    assert_eq!(count_of(&r, "work"), 3000, "{r:?}");
    let all = trampolines_of(&mut c, pid, true).await;
    assert_eq!(all.len(), 1, "no trampoline was reinstalled: {all:?}");
    // And it detaches normally under the new server.
    let d = detach_wait(&mut c, id, "detach after the restart").await;
    assert_eq!(d.retired.len(), 1, "{d:?}");
    wait_for(COUNT_TIMEOUT, "the detached tracer gone once freed", || {
        let mut c = c.clone();
        async move {
            let left = tracers(&mut c).await;
            if left.is_empty() { Ok(()) } else { Err(left) }
        }
    })
    .await;
    t.run(1, 1000).await;
    quit_ok(&mut t).await;
}

/// The server is killed while a grace period waits for a thread (it spins with every
/// signal blocked, so the agent cannot see it quiescent) and restarted on the same
/// socket and state directory: the agent re-registers, the still-attached tracer comes
/// back with exact counts, and the retired trampoline is freed only after a grace
/// period of the new server completes (when the spinning thread exits).
#[tokio::test]
async fn server_killed_during_a_grace_period_and_restarted() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("patchbay-it-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("s.sock");
    let state_dir = dir.path().join("state");
    let state_arg = ["--state-dir", state_dir.to_str().unwrap()];
    let mut first = TestServer::start_at(&socket, &state_arg);
    let mut c = first.control().await;
    let mut t = Target::start(Build::Nop5, &socket).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    let kept = attach_count(&mut c, pid, "work", 1).await;
    let gone = attach_count(&mut c, pid, "other", 1).await;
    t.run(1, 1000).await;
    wait_total(&c, kept, 1000).await;
    let spinning = t.expect("spin", "spinning tid=").await;
    let spinner: u32 = field(&spinning, "tid").unwrap().parse().unwrap();
    let live = trampolines_of(&mut c, pid, false).await;
    let kept_tramp = live
        .iter()
        .find(|x| x.tracer_ids == vec![kept])
        .unwrap_or_else(|| panic!("no trampoline of tracer {kept}: {live:?}"))
        .trampoline_id;
    let d = try_detach(&mut c, gone, false, 0).await.expect("detach");
    let [retired] = d.retired.as_slice() else {
        panic!("expected one retired trampoline: {d:?}")
    };
    let retired = retired.trampoline_id;
    // The grace period waits for the spinning thread only.
    let waits_for_spinner = |c: &Control, when: &'static str| {
        let c = c.clone();
        async move {
            wait_for(
                GP_TIMEOUT,
                &format!("{when}: trampoline {retired} retired, waiting for thread {spinner} only"),
                || {
                    let mut c = c.clone();
                    async move {
                        let all = trampolines_of(&mut c, pid, true).await;
                        match all.iter().find(|x| x.trampoline_id == retired) {
                            Some(x)
                                if state(x) == TrampolineState::Retired
                                    && x.holdouts == vec![spinner] =>
                            {
                                Ok(())
                            }
                            _ => Err(all),
                        }
                    }
                },
            )
            .await
        }
    };
    waits_for_spinner(&c, "before the restart").await;

    first.kill();
    drop(c);
    t.run(1, 1000).await;

    let second = TestServer::start_at(&socket, &state_arg);
    let mut c = second.control().await;
    wait_agent(&c, pid).await;
    let back = tracers(&mut c).await;
    assert!(
        back.len() == 1 && back[0].tracer_id == kept,
        "only tracer {kept} comes back: {back:?}"
    );
    waits_for_spinner(&c, "after the restart").await;
    // Counts continue exactly, through the same live trampoline.
    wait_total(&c, kept, 2000).await;
    t.run(2, 1000).await;
    let r = wait_total(&c, kept, 4000).await;
    assert_eq!(count_of(&r, "work"), 4000, "{r:?}");
    let all = trampolines_of(&mut c, pid, true).await;
    assert!(
        all.iter().any(|x| x.trampoline_id == kept_tramp
            && state(x) == TrampolineState::Live
            && x.tracer_ids == vec![kept]),
        "{all:?}"
    );
    assert_eq!(all.len(), 2, "nothing reinstalled: {all:?}");
    // Still held: the thread was never seen quiescent.
    waits_for_spinner(&c, "after more calls").await;
    t.expect("unspin", "unspun").await;
    wait_for(
        GP_TIMEOUT,
        &format!("trampoline {retired} freed once thread {spinner} exited"),
        || {
            let mut c = c.clone();
            async move {
                let all = trampolines_of(&mut c, pid, true).await;
                match all.iter().find(|x| x.trampoline_id == retired) {
                    Some(x) if state(x) == TrampolineState::Freed => Ok(()),
                    _ => Err(all),
                }
            }
        },
    )
    .await;
    t.run(1, 1000).await;
    wait_total(&c, kept, 5000).await;
    quit_ok(&mut t).await;
}

/// A tracer for an executable path, attached before any such program runs, survives
/// a server restart and applies to the program when it starts.
#[tokio::test]
async fn exe_tracer_attached_before_the_program_starts_survives_a_restart() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::Builder::new()
        .prefix("patchbay-it-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("s.sock");
    let state_dir = dir.path().join("state");
    let state_arg = ["--state-dir", state_dir.to_str().unwrap()];
    let exe = std::fs::canonicalize(integration_tests::fixtures::fixture(Build::Nop5))
        .expect("fixture path");
    let exe = exe.to_str().unwrap().to_string();
    let mut first = TestServer::start_at(&socket, &state_arg);
    let mut c = first.control().await;
    let (id, resp) = attach(
        &mut c,
        spec(
            target::Target::Exe(exe.clone()),
            "work",
            CallbackKind::Count,
        ),
    )
    .await;
    assert!(resp.results.is_empty(), "no program runs yet: {resp:?}");
    first.kill();
    drop(c);

    let second = TestServer::start_at(&socket, &state_arg);
    let c = second.control().await;
    let out = second.cli(&["tracers"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains(&exe) && table.contains("work"),
        "`patchbay tracers` should show the restored tracer: {table}"
    );
    let mut t = Target::start(Build::Nop5, &socket).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    wait_for(
        COUNT_TIMEOUT,
        &format!("restored tracer {id} live in pid {pid}"),
        || {
            let mut c = c.clone();
            async move {
                let all = trampolines_of(&mut c, pid, false).await;
                if all
                    .iter()
                    .any(|x| state(x) == TrampolineState::Live && x.tracer_ids == vec![id])
                {
                    Ok(())
                } else {
                    Err(all)
                }
            }
        },
    )
    .await;
    t.run(2, 1000).await;
    let r = wait_total(&c, id, 2000).await;
    assert_eq!(count_of(&r, "work"), 2000, "{r:?}");
    quit_ok(&mut t).await;
}

// -------------------------------------------------------------- fork and exec

#[tokio::test]
async fn fork_and_exec_keep_the_parent_exact() {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(1, 1000).await;
    wait_total(&c, id, 1000).await;
    // The child calls work() 1000 times (through the inherited patched site), lingers
    // 300 ms (its agent connects and flushes meanwhile), then execs /bin/true with the
    // agent still preloaded.
    t.expect("fork", "forked status=0").await;
    t.run(1, 500).await;
    wait_total(&c, id, 1500).await;
    // Everything every agent sent before is in: the child's calls are not the parent's.
    synchronize(&mut c, GP_TIMEOUT).await;
    eprintln!("agents after the fork: {:?}", agents(&mut c).await);
    let r = counts(&mut c, id).await;
    assert_eq!(
        r.total, 1500,
        "the child's calls leaked into the parent's tracer: {r:?}"
    );
    assert_eq!(count_of(&r, "work"), 1500, "{r:?}");
    t.run(2, 1000).await;
    wait_total(&c, id, 3500).await;
    quit_ok(&mut t).await;
}

// ------------------------------------------------------------ list functions

#[tokio::test]
async fn list_functions_of_a_nop5_fixture() {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::Nop5).await;
    let pid = t.pid();
    let exe = integration_tests::fixtures::fixture(Build::Nop5);
    for name in ["work", "other"] {
        let f = function(&mut c, pid, name).await;
        assert!(f.patchable, "{f:?}");
        assert_eq!(f.site_kind(), SiteKind::Nop5, "{f:?}");
        assert!(f.reason.is_empty(), "{f:?}");
        assert_ne!(f.address, 0, "{f:?}");
        assert_eq!(
            std::fs::canonicalize(&f.object).ok(),
            std::fs::canonicalize(&exe).ok(),
            "{f:?}"
        );
    }
    let both = functions(&mut c, pid, "[wo][ot]*[kr]").await;
    let mut names: Vec<&str> = both.iter().map(|f| f.name.as_str()).collect();
    names.sort_unstable();
    assert!(
        names.contains(&"work") && names.contains(&"other"),
        "{names:?}"
    );
    let r = c
        .list_functions(ListFunctionsRequest {
            pid,
            pattern: "work[".into(),
            limit: 0,
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["work["]);
    // Nothing changed: the program still runs.
    t.run(1, 10).await;
    quit_ok(&mut t).await;
}

// ------------------------------------------------------------- gcc nop sleds

/// gcc `-fpatchable-function-entry=5` leaves five 1-byte nops: a thread may be stopped
/// between two of them. The first attach turns the sled into one 5-byte nop under a
/// grace period (listed as patchable, with that caveat); counts are then exact.
#[tokio::test]
async fn exact_counts_nop_sled() {
    exact_counts(Build::NopSled, SiteKind::NopSled).await;
}

/// The sled conversion while 8 threads hammer the function (some are inside the sled
/// when the int3 goes in), then attach/detach cycles on the converted site, then an
/// exact round.
#[tokio::test]
async fn nop_sled_converted_while_hammering() {
    let _serial = SERIAL.lock().await;
    let (_server, mut c, mut t) = setup(Build::NopSled).await;
    let pid = t.pid();
    let f = function(&mut c, pid, "work").await;
    assert!(f.patchable, "{f:?}");
    assert!(f.reason.contains("grace period"), "the caveat: {f:?}");
    t.expect("hammer 8", "hammering").await;
    for i in 0..20 {
        let id = attach_count(&mut c, pid, "work", 1).await;
        detach_wait(&mut c, id, &format!("cycle {i}")).await;
    }
    let stopped = t.expect("stop", "stopped work=").await;
    let made: u64 = field(&stopped, "work").unwrap().parse().unwrap();
    assert!(made > 0, "the hammer threads made no call: {stopped}");
    let id = attach_count(&mut c, pid, "work", 1).await;
    t.run(8, 10_000).await;
    let r = wait_total(&c, id, 80_000).await;
    assert_eq!(count_of(&r, "work"), 80_000, "{r:?}");
    quit_ok(&mut t).await;
}

// ------------------------------------------------------- vector arguments

/// A traced function whose arguments are two `__m256d` (the full ymm0 and ymm1): the
/// `trace` path with six argument registers (the agent's dispatcher and event ring)
/// and the `count` path leave them intact, so every result is right. glibc is told to
/// pick its AVX2 string functions (which end with `vzeroupper`, clearing the upper
/// halves the entry stub does not save) even on an AVX-512 machine, so that a call to
/// one of them on the hot path shows.
#[tokio::test]
async fn vector_arguments_survive_tracing() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start();
    let mut c = server.control().await;
    let mut t = Target::start_env(
        Build::Nop5,
        server.socket_path(),
        &[(
            "GLIBC_TUNABLES",
            "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD",
        )],
    )
    .await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    let probe = t.expect("avx 1", "avx").await;
    if probe.contains("unsupported") {
        eprintln!("skipped: this CPU has no AVX");
        quit_ok(&mut t).await;
        return;
    }
    assert!(probe.contains("bad=0"), "untraced: {probe}");
    let mut spec = spec_pid(pid, "vsum", CallbackKind::Trace);
    spec.callback.as_mut().unwrap().arg_count = 6;
    let (trace, resp) = attach(&mut c, spec).await;
    assert_eq!(resp.results[0].sites_patched, 1, "{resp:?}");
    let count = attach_count(&mut c, pid, "vsum", 1).await;
    let r = t.expect("avx 20000", "avx calls=").await;
    assert_eq!(r, "avx calls=20000 bad=0", "traced by trace + count");
    let totals = wait_total(&c, count, 20_000).await;
    assert_eq!(count_of(&totals, "vsum"), 20_000, "{totals:?}");
    detach_wait(&mut c, trace, "trace").await;
    detach_wait(&mut c, count, "count").await;
    quit_ok(&mut t).await;
}
