//! Trampoline life cycle against a real patchbayd and scripted agents: attach -> Live,
//! detach -> Retired, free authorized only after every listed thread reported a
//! quiescent state at the retirement epoch (or exited), stalls, disconnects, reconnects.

use integration_tests::agent::{LINE_TIMEOUT as T, field};
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::{ScriptAgent, TestServer, wait_for};

const FNS: &[&str] = &["--functions", "foo,bar,baz", "--threads", "3"];

fn sorted_list(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .split(',')
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// Parses `install tramp=N tracers=.. sites=..` and returns (tramp, tracers, sites).
fn parse_install(line: &str) -> (u64, Vec<String>, Vec<String>) {
    let tramp = field(line, "tramp").unwrap().parse().unwrap();
    (
        tramp,
        sorted_list(field(line, "tracers").unwrap_or("")),
        sorted_list(field(line, "sites").unwrap_or("")),
    )
}

/// Waits until trampoline `id` (of the only agent) is RETIRED with exactly `expected`
/// holdouts.
async fn wait_holdouts(c: &mut Control, id: u64, expected: &[u32]) -> TrampolineInfo {
    wait_holdouts_in(c, None, id, expected).await
}

/// Waits until trampoline `id` of agent `agent` (any agent: None) is RETIRED with exactly
/// `expected` holdouts.
async fn wait_holdouts_in(
    c: &mut Control,
    agent: Option<u64>,
    id: u64,
    expected: &[u32],
) -> TrampolineInfo {
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    wait_for(
        STATE_TIMEOUT,
        &format!("trampoline {id} (agent {agent:?}) RETIRED with holdouts {expected:?}"),
        || {
            let mut c = c.clone();
            let expected = expected.clone();
            async move {
                let all = trampolines(&mut c, false).await;
                let mine: Vec<_> = all
                    .iter()
                    .filter(|t| t.trampoline_id == id && agent.is_none_or(|a| a == t.agent_id))
                    .collect();
                match mine.as_slice() {
                    [t] if state(t) == TrampolineState::Retired && holdouts(t) == expected => {
                        Ok((*t).clone())
                    }
                    _ => Err(all),
                }
            }
        },
    )
    .await
}

/// Waits until no unfreed trampoline is left.
async fn wait_no_trampolines(c: &mut Control) {
    wait_for(STATE_TIMEOUT, "every trampoline freed/removed", || {
        let mut c = c.clone();
        async move {
            let all = trampolines(&mut c, false).await;
            if all.is_empty() { Ok(()) } else { Err(all) }
        }
    })
    .await
}

use integration_tests::server::Control;

/// Attach a count tracer on `pattern` in one agent; returns (tracer, trampoline).
async fn attach_one(c: &mut Control, agent: &mut ScriptAgent, pattern: &str) -> (u64, u64) {
    let (tracer, _) = attach(c, spec_pid(agent.pid(), pattern, CallbackKind::Count)).await;
    let line = agent.expect_line("install ", T).await;
    (tracer, parse_install(&line).0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_goes_live() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, agent_id) = ScriptAgent::connect(server.socket_path(), FNS).await;

    let a = agents(&mut c).await;
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].agent_id, agent_id);
    assert_eq!(a[0].pid, agent.pid());
    assert_eq!(a[0].uid, 0);
    assert!(a[0].connected, "{a:?}");
    assert_eq!(a[0].threads, 3, "{a:?}");
    assert_eq!(a[0].trampolines, 0, "{a:?}");
    assert!(a[0].exe.ends_with("script-agent"), "{a:?}");
    assert!(a[0].start_time > 0, "{a:?}");

    let (tracer, resp) = attach(&mut c, spec_pid(agent.pid(), "ba*", CallbackKind::Count)).await;
    assert_eq!(tracer, 1, "tracer ids start at 1");
    assert_eq!(resp.results.len(), 1, "{resp:?}");
    let r = &resp.results[0];
    assert_eq!(
        (
            r.agent_id,
            r.pid,
            r.sites_patched,
            r.sites_skipped,
            r.error.as_str()
        ),
        (agent_id, agent.pid(), 2, 0, ""),
        "{resp:?}"
    );

    let (tramp, tracers_seen, sites) = parse_install(&agent.expect_line("install ", T).await);
    assert_eq!(tracers_seen, vec!["1"]);
    assert_eq!(sites, vec!["bar", "baz"]);

    // Attach answers only after the agent reported Live: no waiting needed.
    let t = trampolines(&mut c, false).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(state(&t[0]), TrampolineState::Live, "{t:?}");
    assert_eq!(
        (t[0].agent_id, t[0].pid, t[0].trampoline_id, t[0].sites),
        (agent_id, agent.pid(), tramp, 2),
        "{t:?}"
    );
    assert_eq!(t[0].tracer_ids, vec![tracer], "{t:?}");
    assert!(t[0].holdouts.is_empty(), "{t:?}");

    let tr = tracers(&mut c).await;
    assert_eq!(tr.len(), 1, "{tr:?}");
    assert_eq!(tr[0].tracer_id, tracer);
    assert_eq!(tr[0].state(), TracerState::Active, "{tr:?}");
    assert_eq!(
        (tr[0].agents, tr[0].sites, tr[0].owner_uid),
        (1, 2, 0),
        "{tr:?}"
    );
    assert_eq!(tr[0].spec.as_ref().unwrap().pattern, "ba*");

    let a = agents(&mut c).await;
    assert_eq!(a[0].trampolines, 1, "{a:?}");
    // Nothing was retired or authorized.
    agent
        .assert_no_lines(&mut c, &["remove ", "authorize "])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_retires_and_frees_only_after_every_thread_reported() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, agent_id) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;

    let d = detach(&mut c, tracer).await;
    assert_eq!(
        d.retired,
        vec![TrampolineRef {
            agent_id,
            trampoline_id: tramp
        }],
        "{d:?}"
    );
    assert!(!d.complete, "nothing reported quiescent yet: {d:?}");
    agent.expect_line(&format!("remove tramp={tramp}"), T).await;
    agent
        .expect_line(
            &format!("retired tramp={tramp} epoch=1 tids=100001,100002,100003"),
            T,
        )
        .await;

    let t = wait_holdouts(&mut c, tramp, &[100001, 100002, 100003]).await;
    assert_eq!(t.retired_epoch, 1, "{t:?}");
    let a = agents(&mut c).await;
    assert_eq!(a[0].epoch, 1, "the last epoch the agent reported: {a:?}");
    let tr = tracers(&mut c).await;
    assert!(
        tr.iter()
            .all(|t| t.tracer_id != tracer || t.state() == TracerState::Detaching),
        "a detached tracer whose trampoline is in its grace period is DETACHING: {tr:?}"
    );

    agent.cmd("qs 100001").await;
    agent.cmd("qs 100002").await;
    wait_holdouts(&mut c, tramp, &[100003]).await;
    // A report stamped before the retirement epoch proves nothing.
    agent.cmd("qs 100003 0").await;
    agent.assert_no_line(&mut c, "authorize ").await;
    wait_holdouts(&mut c, tramp, &[100003]).await;
    // Neither does a report for a thread the retirement does not list.
    agent.cmd("qs 100099").await;
    agent.assert_no_line(&mut c, "authorize ").await;

    agent.cmd("qs 100003").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    wait_no_trampolines(&mut c).await;
    for t in trampolines(&mut c, true).await {
        assert_eq!(state(&t), TrampolineState::Freed, "{t:?}");
    }
    assert!(grace_periods(&mut c).await.is_empty());
    let a = agents(&mut c).await;
    assert_eq!(a[0].trampolines, 0, "{a:?}");
    // Its last trampoline freed, the detached tracer is gone.
    wait_for(STATE_TIMEOUT, "the detached tracer to disappear", || {
        let mut c = c.clone();
        async move {
            let t = tracers(&mut c).await;
            if t.iter().all(|t| t.tracer_id != tracer) {
                Ok(())
            } else {
                Err(t)
            }
        }
    })
    .await;
    // Authorized exactly once.
    agent.assert_no_line(&mut c, "authorize ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_wait_answers_after_grace_period() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, agent_id) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;

    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { try_detach(&mut c2, tracer, true, 20_000).await });
    agent
        .expect_line(&format!("retired tramp={tramp}"), T)
        .await;
    agent.cmd("qs 100001").await;
    agent.cmd("qs 100002").await;
    wait_holdouts(&mut c, tramp, &[100003]).await;
    assert!(
        !waiting.is_finished(),
        "Detach(wait) answered during the grace period"
    );
    agent.cmd("qs 100003").await;
    let d = tokio::time::timeout(T, waiting)
        .await
        .expect("Detach(wait) did not answer after the grace period")
        .unwrap()
        .expect("Detach(wait)");
    assert!(d.complete, "{d:?}");
    assert_eq!(
        d.retired,
        vec![TrampolineRef {
            agent_id,
            trampoline_id: tramp
        }]
    );
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_wait_deadline_leaves_grace_period_running() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;

    let started = std::time::Instant::now();
    let r = try_detach(&mut c, tracer, true, 300).await;
    assert_status(r, tonic::Code::DeadlineExceeded, &[]);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(290),
        "answered before the deadline"
    );
    // The detach happened; the grace period continues.
    wait_holdouts(&mut c, tramp, &[100001, 100002, 100003]).await;
    agent.assert_no_line(&mut c, "authorize ").await;
    agent.cmd("qs-all").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    wait_no_trampolines(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_exit_releases() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;
    detach(&mut c, tracer).await;
    agent
        .expect_line(&format!("retired tramp={tramp}"), T)
        .await;
    agent.cmd("qs 100001").await;
    agent.cmd("exit 100002").await;
    wait_holdouts(&mut c, tramp, &[100003]).await;
    agent.assert_no_line(&mut c, "authorize ").await;
    agent.cmd("exit 100003").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    wait_no_trampolines(&mut c).await;
    let a = agents(&mut c).await;
    assert_eq!(a[0].threads, 1, "two of three threads exited: {a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_born_before_retirement_are_waited_for_and_after_are_not() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--threads", "1"],
    )
    .await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;
    agent.cmd("born 100077").await;
    detach(&mut c, tracer).await;
    agent
        .expect_line(
            &format!("retired tramp={tramp} epoch=1 tids=100001,100077"),
            T,
        )
        .await;
    wait_holdouts(&mut c, tramp, &[100001, 100077]).await;
    // Born after the retirement: cannot be inside, never a holdout.
    agent.cmd("born 100088").await;
    agent.cmd("qs 100001").await;
    wait_holdouts(&mut c, tramp, &[100077]).await;
    agent.assert_no_line(&mut c, "authorize ").await;
    agent.cmd("qs 100077").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    let a = agents(&mut c).await;
    assert_eq!(a[0].threads, 3, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_thread_holds_its_trampoline_and_shows_in_grace_periods() {
    let server = TestServer::start_with(&["--stall-threshold-ms", "100"]);
    let mut c = server.control().await;
    let (mut agent, agent_id) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;
    detach(&mut c, tracer).await;
    agent
        .expect_line(&format!("retired tramp={tramp}"), T)
        .await;
    agent.cmd("qs 100001").await;
    agent.cmd("qs 100003").await;
    agent
        .cmd("stall 100002 0x7f0000001234 trampoline#1 250")
        .await;
    let gp = wait_for(STATE_TIMEOUT, "a stall on thread 100002", || {
        let mut c = c.clone();
        async move {
            let gp = grace_periods(&mut c).await;
            let found = gp.iter().any(|g| {
                g.holdouts
                    .iter()
                    .any(|h| h.tid == 100002 && h.stall.is_some())
            });
            if found { Ok(gp) } else { Err(gp) }
        }
    })
    .await;
    let g = gp
        .iter()
        .find(|g| g.purpose == Some(grace_period_info::Purpose::TrampolineId(tramp)))
        .unwrap_or_else(|| panic!("no grace period for trampoline {tramp}: {gp:?}"));
    assert_eq!(
        (g.agent_id, g.pid, g.epoch),
        (agent_id, agent.pid(), 1),
        "{g:?}"
    );
    assert_eq!(g.holdouts.len(), 1, "{g:?}");
    let stall = g.holdouts[0].stall.as_ref().unwrap();
    assert_eq!(
        (stall.tid, stall.pc, stall.symbol.as_str()),
        (100002, 0x7f00_0000_1234, "trampoline#1"),
        "{g:?}"
    );
    assert!(stall.duration_ms >= 250, "{g:?}");
    // The stalled thread still holds the trampoline.
    let t = wait_holdouts(&mut c, tramp, &[100002]).await;
    assert_eq!(state(&t), TrampolineState::Retired);
    agent.assert_no_line(&mut c, "authorize ").await;

    agent.cmd("qs 100002").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    wait_for(STATE_TIMEOUT, "no pending grace period", || {
        let mut c = c.clone();
        async move {
            let gp = grace_periods(&mut c).await;
            if gp.is_empty() { Ok(()) } else { Err(gp) }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_carries_the_stall_threshold() {
    let server = TestServer::start_with(&["--stall-threshold-ms", "100"]);
    let mut agent = ScriptAgent::spawn(server.socket_path(), FNS);
    agent
        .expect_line("welcome agent=1 resumed=false stall_threshold_ms=100", T)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_death_removes_its_trampolines() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(server.socket_path(), FNS).await;
    // One live trampoline and one in its grace period.
    let (_live_tracer, _) = attach_one(&mut c, &mut agent, "foo").await;
    let (tracer2, tramp2) = attach_one(&mut c, &mut agent, "bar").await;
    detach(&mut c, tracer2).await;
    wait_holdouts(&mut c, tramp2, &[100001, 100002, 100003]).await;
    assert_eq!(trampolines(&mut c, false).await.len(), 2);

    agent.kill();
    wait_for(STATE_TIMEOUT, "the dead agent to be removed", || {
        let mut c = c.clone();
        async move {
            let s = snapshot(&mut c).await;
            if s.agents.is_empty()
                && s.trampolines
                    .iter()
                    .all(|t| state(t) == TrampolineState::Freed)
            {
                Ok(())
            } else {
                Err(s)
            }
        }
    })
    .await;
    wait_no_trampolines(&mut c).await;
    assert!(grace_periods(&mut c).await.is_empty());
    for t in tracers(&mut c).await {
        assert_eq!(
            (t.agents, t.sites),
            (0, 0),
            "tracer still counts a dead agent: {t:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_live_process_keeps_its_trampolines_and_resumes() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, agent_id) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (_live, live_tramp) = attach_one(&mut c, &mut agent, "foo").await;
    let (tracer2, tramp2) = attach_one(&mut c, &mut agent, "bar").await;
    detach(&mut c, tracer2).await;
    wait_holdouts(&mut c, tramp2, &[100001, 100002, 100003]).await;
    agent.cmd("qs 100001").await;
    wait_holdouts(&mut c, tramp2, &[100002, 100003]).await;

    agent.cmd("disconnect").await;
    wait_for(STATE_TIMEOUT, "agent shown disconnected", || {
        let mut c = c.clone();
        async move {
            let a = agents(&mut c).await;
            if a.len() == 1 && !a[0].connected {
                Ok(())
            } else {
                Err(a)
            }
        }
    })
    .await;
    // The process lives: nothing is forgotten and nothing is authorized.
    let t = trampolines(&mut c, false).await;
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(
        t.iter()
            .any(|t| t.trampoline_id == live_tramp && state(t) == TrampolineState::Live)
    );
    assert!(
        t.iter()
            .any(|t| t.trampoline_id == tramp2 && state(t) == TrampolineState::Retired)
    );
    agent.assert_no_line_without_session("authorize ").await;

    agent.send("reconnect");
    agent
        .expect_line(&format!("welcome agent={agent_id} resumed=true"), T)
        .await;
    agent.expect_line("ok reconnect", T).await;
    // No quiescent evidence from before the reconnect is trusted.
    wait_holdouts(&mut c, tramp2, &[100001, 100002, 100003]).await;
    let a = agents(&mut c).await;
    assert!(
        a.len() == 1 && a[0].connected && a[0].agent_id == agent_id,
        "{a:?}"
    );
    agent.cmd("qs 100002").await;
    agent.cmd("qs 100003").await;
    wait_holdouts(&mut c, tramp2, &[100001]).await;
    agent.assert_no_line(&mut c, "authorize ").await;
    agent.cmd("qs 100001").await;
    agent
        .expect_line(&format!("authorize tramp={tramp2}"), T)
        .await;
    // The live trampoline survived the reconnect; the retired one is freed.
    wait_for(STATE_TIMEOUT, "only the live trampoline left", || {
        let mut c = c.clone();
        async move {
            let t = trampolines(&mut c, false).await;
            match t.as_slice() {
                [t] if t.trampoline_id == live_tramp && state(t) == TrampolineState::Live => Ok(()),
                _ => Err(t),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_have_independent_grace_periods() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut a, a_id) = ScriptAgent::connect(server.socket_path(), FNS).await;
    let (mut b, b_id) = ScriptAgent::connect(
        server.socket_path(),
        &[
            "--functions",
            "foo,bar",
            "--threads",
            "2",
            "--tid-base",
            "200001",
        ],
    )
    .await;
    assert_ne!(a_id, b_id);

    let (tracer, resp) = attach(&mut c, spec_all("foo", CallbackKind::Count)).await;
    let mut results: Vec<_> = resp
        .results
        .iter()
        .map(|r| (r.agent_id, r.sites_patched, r.error.clone()))
        .collect();
    results.sort();
    assert_eq!(
        results,
        vec![(a_id, 1, String::new()), (b_id, 1, String::new())]
    );
    let (ta, _, sa) = parse_install(&a.expect_line("install ", T).await);
    let (tb, _, sb) = parse_install(&b.expect_line("install ", T).await);
    assert_eq!((sa, sb), (vec!["foo".to_string()], vec!["foo".to_string()]));
    let tr = tracers(&mut c).await;
    assert_eq!((tr[0].agents, tr[0].sites), (2, 2), "{tr:?}");

    let d = detach(&mut c, tracer).await;
    let mut refs: Vec<_> = d
        .retired
        .iter()
        .map(|r| (r.agent_id, r.trampoline_id))
        .collect();
    refs.sort();
    let mut want = vec![(a_id, ta), (b_id, tb)];
    want.sort();
    assert_eq!(refs, want);
    a.expect_line(
        &format!("retired tramp={ta} epoch=1 tids=100001,100002,100003"),
        T,
    )
    .await;
    b.expect_line(&format!("retired tramp={tb} epoch=1 tids=200001,200002"), T)
        .await;

    a.cmd("qs-all").await;
    a.expect_line(&format!("authorize tramp={ta}"), T).await;
    wait_holdouts_in(&mut c, Some(b_id), tb, &[200001, 200002]).await;
    b.assert_no_line(&mut c, "authorize ").await;
    b.cmd("qs-all").await;
    b.expect_line(&format!("authorize tramp={tb}"), T).await;
    wait_no_trampolines(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_select_agents_now_and_later() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut a, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--exe", "/opt/x/a"],
    )
    .await;
    let (mut b, _) = ScriptAgent::connect(
        server.socket_path(),
        &[
            "--functions",
            "foo",
            "--exe",
            "/opt/x/b",
            "--tid-base",
            "200001",
        ],
    )
    .await;

    // A pid tracer touches that process only.
    attach(&mut c, spec_pid(a.pid(), "foo", CallbackKind::Count)).await;
    a.expect_line("install ", T).await;
    b.assert_no_line(&mut c, "install ").await;

    // An exe tracer: the matching agents now, and one that connects later.
    let (tracer, resp) = attach(
        &mut c,
        spec(
            target::Target::Exe("/opt/x/b".into()),
            "foo",
            CallbackKind::Trace,
        ),
    )
    .await;
    assert_eq!(resp.results.len(), 1, "{resp:?}");
    b.expect_line("install ", T).await;
    a.assert_no_line(&mut c, "install ").await;
    // An exe tracer with no agent now is still created.
    let (_, resp) = attach(
        &mut c,
        spec(
            target::Target::Exe("/opt/none".into()),
            "foo",
            CallbackKind::Count,
        ),
    )
    .await;
    assert!(resp.results.is_empty(), "{resp:?}");
    let tr = tracers(&mut c).await;
    assert_eq!(tr.len(), 3, "{tr:?}");
    let _ = tracer;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_connecting_later_get_exe_and_all_tracers() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (exe_tracer, resp) = attach(
        &mut c,
        spec(
            target::Target::Exe("/opt/x/b".into()),
            "foo",
            CallbackKind::Count,
        ),
    )
    .await;
    assert!(resp.results.is_empty(), "no agent yet: {resp:?}");
    let (all_tracer, _) = attach(&mut c, spec_all("bar", CallbackKind::Count)).await;

    let (mut late, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo,bar", "--exe", "/opt/x/b"],
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let (_, tracers, sites) = parse_install(&late.expect_line("install ", T).await);
        got.push((tracers, sites));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (vec![exe_tracer.to_string()], vec!["foo".to_string()]),
            (vec![all_tracer.to_string()], vec!["bar".to_string()]),
        ]
    );
    // Another exe only gets the `all` tracer.
    let (mut other, _) = ScriptAgent::connect(
        server.socket_path(),
        &[
            "--functions",
            "foo,bar",
            "--exe",
            "/opt/x/c",
            "--tid-base",
            "200001",
        ],
    )
    .await;
    let (_, tracers, _) = parse_install(&other.expect_line("install ", T).await);
    assert_eq!(tracers, vec![all_tracer.to_string()]);
    other.assert_no_line(&mut c, "install ").await;
    wait_for(STATE_TIMEOUT, "3 live trampolines", || {
        let mut c = c.clone();
        async move {
            let t = trampolines(&mut c, false).await;
            if t.len() == 3 && t.iter().all(|t| state(t) == TrampolineState::Live) {
                Ok(())
            } else {
                Err(t)
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_the_server_knows_are_waited_for_even_if_the_retirement_omits_them() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--threads", "2"],
    )
    .await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;
    agent.cmd("born 100005").await;
    agent.cmd("omit 100002").await;
    agent.cmd("omit 100005").await;
    detach(&mut c, tracer).await;
    agent
        .expect_line(&format!("retired tramp={tramp} epoch=1 tids=100001"), T)
        .await;
    // 100002 (from Hello) and 100005 (born) were alive as far as the server knew.
    wait_holdouts(&mut c, tramp, &[100001, 100002, 100005]).await;
    agent.cmd("qs 100001").await;
    agent.cmd("qs 100005").await;
    wait_holdouts(&mut c, tramp, &[100002]).await;
    agent.assert_no_line(&mut c, "authorize ").await;
    agent.cmd("qs 100002").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_tids_in_two_agents_are_different_threads() {
    // Agents in different pid namespaces may report the same thread ids.
    let server = TestServer::start();
    let mut c = server.control().await;
    let args = ["--functions", "foo", "--threads", "2"];
    let (mut a, a_id) = ScriptAgent::connect(server.socket_path(), &args).await;
    let (mut b, b_id) = ScriptAgent::connect(server.socket_path(), &args).await;
    let (tracer, _) = attach(&mut c, spec_all("foo", CallbackKind::Count)).await;
    let (ta, _, _) = parse_install(&a.expect_line("install ", T).await);
    let (tb, _, _) = parse_install(&b.expect_line("install ", T).await);

    // ListTrampolines filters by pid.
    let only_b = c
        .list_trampolines(ListTrampolinesRequest {
            pid: b.pid(),
            include_freed: false,
        })
        .await
        .unwrap()
        .into_inner()
        .trampolines;
    assert_eq!(only_b.len(), 1, "{only_b:?}");
    assert_eq!((only_b[0].agent_id, only_b[0].trampoline_id), (b_id, tb));

    detach(&mut c, tracer).await;
    a.expect_line(&format!("retired tramp={ta}"), T).await;
    b.expect_line(&format!("retired tramp={tb}"), T).await;
    a.cmd("qs-all").await;
    a.expect_line(&format!("authorize tramp={ta}"), T).await;
    // B's threads 100001 and 100002 are not A's.
    wait_holdouts_in(&mut c, Some(b_id), tb, &[100001, 100002]).await;
    b.assert_no_line(&mut c, "authorize ").await;
    b.cmd("qs-all").await;
    b.expect_line(&format!("authorize tramp={tb}"), T).await;
    let _ = a_id;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_stamped_before_the_retirement_epoch_do_not_count() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--threads", "1"],
    )
    .await;
    // Two Synchronize calls move the agent's epoch to 2.
    for epoch in 1..=2 {
        let mut c2 = c.clone();
        let waiting = tokio::spawn(async move {
            c2.synchronize(SynchronizeRequest { timeout_ms: 10_000 })
                .await
        });
        agent.expect_line("barrier id=", T).await;
        agent.cmd("qs-all").await;
        waiting.await.unwrap().expect("Synchronize");
        agent.cmd("epoch").await;
        agent.expect_line(&format!("epoch {epoch}"), T).await;
    }
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;
    detach(&mut c, tracer).await;
    agent
        .expect_line(&format!("retired tramp={tramp} epoch=3 tids=100001"), T)
        .await;
    agent.cmd("qs 100001 2").await;
    agent.assert_no_line(&mut c, "authorize ").await;
    wait_holdouts(&mut c, tramp, &[100001]).await;
    agent.cmd("qs 100001 3").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_site_moves_to_a_new_trampoline_when_its_callbacks_change() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo,bar", "--threads", "1"],
    )
    .await;
    let (t1, tramp1) = attach_one(&mut c, &mut agent, "foo").await;
    // A second tracer on the same site: one trampoline for the group {t1, t2}, and the
    // old one retired.
    let (t2, _) = attach(&mut c, spec_pid(agent.pid(), "foo", CallbackKind::Trace)).await;
    let (tramp2, tracers2, sites2) = parse_install(&agent.expect_line("install ", T).await);
    assert_ne!(tramp2, tramp1);
    assert_eq!(tracers2, vec![t1.to_string(), t2.to_string()]);
    assert_eq!(sites2, vec!["foo"]);
    agent
        .expect_line(&format!("remove tramp={tramp1}"), T)
        .await;
    wait_holdouts(&mut c, tramp1, &[100001]).await;
    let t = trampolines(&mut c, false).await;
    let live: Vec<_> = t
        .iter()
        .filter(|t| state(t) == TrampolineState::Live)
        .collect();
    assert_eq!(live.len(), 1, "{t:?}");
    assert_eq!(
        (live[0].trampoline_id, live[0].tracer_ids.clone()),
        (tramp2, vec![t1, t2])
    );

    // Detaching t1 moves foo to a trampoline of {t2} alone.
    detach(&mut c, t1).await;
    let (tramp3, tracers3, sites3) = parse_install(&agent.expect_line("install ", T).await);
    assert_eq!(
        (tracers3, sites3),
        (vec![t2.to_string()], vec!["foo".to_string()])
    );
    agent
        .expect_line(&format!("remove tramp={tramp2}"), T)
        .await;
    agent.cmd("qs-all").await;
    agent
        .expect_line(&format!("authorize tramp={tramp1}"), T)
        .await;
    agent
        .expect_line(&format!("authorize tramp={tramp2}"), T)
        .await;
    wait_for(STATE_TIMEOUT, "one live trampoline of t2", || {
        let mut c = c.clone();
        async move {
            let t = trampolines(&mut c, false).await;
            if t.len() == 1 && t[0].trampoline_id == tramp3 && t[0].tracer_ids == vec![t2] {
                Ok(())
            } else {
                Err(t)
            }
        }
    })
    .await;
    let tr = tracers(&mut c).await;
    let t2_info = tr.iter().find(|t| t.tracer_id == t2).expect("t2 listed");
    assert_eq!(
        (t2_info.state(), t2_info.sites),
        (TracerState::Active, 1),
        "{tr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_while_disconnected_retires_on_reconnect() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, agent_id) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--threads", "2"],
    )
    .await;
    let (tracer, tramp) = attach_one(&mut c, &mut agent, "foo").await;
    agent.cmd("disconnect").await;
    wait_for(STATE_TIMEOUT, "agent shown disconnected", || {
        let mut c = c.clone();
        async move {
            let a = agents(&mut c).await;
            if a.len() == 1 && !a[0].connected {
                Ok(())
            } else {
                Err(a)
            }
        }
    })
    .await;
    let d = detach(&mut c, tracer).await;
    assert!(!d.complete, "{d:?}");
    // Nothing can be authorized while the agent cannot even unpatch.
    agent.send("reconnect");
    agent
        .expect_line(&format!("welcome agent={agent_id} resumed=true"), T)
        .await;
    eprintln!(
        "after detach and reconnect: {:?} {:?}",
        tracers(&mut c).await,
        trampolines(&mut c, true).await
    );
    agent.expect_line(&format!("remove tramp={tramp}"), T).await;
    agent
        .expect_line(&format!("retired tramp={tramp}"), T)
        .await;
    wait_holdouts(&mut c, tramp, &[100001, 100002]).await;
    agent.cmd("qs-all").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    wait_no_trampolines(&mut c).await;
}
