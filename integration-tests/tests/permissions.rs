//! Peer credentials: a client of another uid sees nothing of ours and may change nothing.
//! Tests run as root; the other user is `nobody` (65534), through the `patchbay` CLI and
//! `control-probe` (one raw Control call, for exact status codes).
//!
//! The rule: listings (agents, tracers, trampolines, grace periods) are filtered to what
//! the caller's uid owns (root sees everything); naming something of another uid
//! directly (a pid to list or attach, a tracer to detach, watch or count) is refused
//! with PERMISSION_DENIED; a tracer of a non-root uid reaches only that uid's
//! processes, whatever its target says (`all`, an exe path); an agent may register
//! only its own pid and uid (SO_PEERCRED).

use std::os::unix::fs::PermissionsExt;

use integration_tests::agent::LINE_TIMEOUT as T;
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::{ScriptAgent, TestServer};

const NOBODY: u32 = 65534;

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_uid_sees_nothing_and_changes_nothing() {
    assert!(nix::unistd::getuid().is_root(), "this test needs root");
    let server = TestServer::start_with(&["--socket-mode", "666"]);
    let mode = std::fs::metadata(server.socket_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666, "--socket-mode 666");
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo,bar", "--threads", "2"],
    )
    .await;
    let (tracer, _) = attach(&mut c, spec_pid(agent.pid(), "foo", CallbackKind::Count)).await;
    agent.expect_line("install ", T).await;
    let before = snapshot(&mut c).await;
    let pid = agent.pid().to_string();
    let tracer_s = tracer.to_string();

    // The CLI, as nobody: sees no agents, tracers or trampolines.
    for (cmd, key) in [
        ("agents", "agents"),
        ("tracers", "tracers"),
        ("trampolines", "trampolines"),
        ("gp", "pending"),
    ] {
        let out = server.cli_as(NOBODY, NOBODY, &["--json", cmd]).await;
        let v = stdout_json(&out);
        assert_eq!(
            v[key],
            serde_json::json!([]),
            "nobody sees root's {cmd}: {v}"
        );
    }
    // ... and fails to detach our tracer or to attach to our pid.
    for args in [
        vec!["detach", tracer_s.as_str()],
        vec!["attach", "--pid", pid.as_str(), "--count", "foo"],
        vec!["counts", tracer_s.as_str()],
    ] {
        let out = server.cli_as(NOBODY, NOBODY, &args).await;
        assert!(
            !out.status.success(),
            "patchbay {args:?} as nobody succeeded"
        );
        assert_eq!(out.status.code(), Some(1), "patchbay {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("uid"), "patchbay {args:?}: {err}");
    }

    // Exact codes through raw calls.
    for call in [
        vec!["detach", tracer_s.as_str()],
        vec!["attach-pid", pid.as_str(), "foo"],
        vec!["functions", pid.as_str(), "*"],
        vec!["counts", tracer_s.as_str()],
        vec!["watch", tracer_s.as_str()],
    ] {
        let line = server.probe_as(NOBODY, NOBODY, &call).await;
        assert!(
            line.starts_with("error PermissionDenied "),
            "{call:?} as nobody: {line}"
        );
    }
    for call in ["agents", "tracers", "trampolines", "gp"] {
        let line = server.probe_as(NOBODY, NOBODY, &[call]).await;
        assert_eq!(line, "ok []", "{call} as nobody");
    }
    // Naming our pid does not make our trampolines visible.
    let line = server
        .probe_as(NOBODY, NOBODY, &["trampolines-pid", pid.as_str()])
        .await;
    assert_eq!(line, "ok []", "trampolines of pid {pid} as nobody");
    // A Synchronize by nobody covers nobody's agents (none): it must not wait for ours.
    let line = server.probe_as(NOBODY, NOBODY, &["sync", "2000"]).await;
    assert!(line.starts_with("ok "), "sync as nobody: {line}");

    agent
        .assert_no_lines(&mut c, &["remove ", "install "])
        .await;
    assert_eq!(
        snapshot(&mut c).await,
        before,
        "nobody changed root's state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_uid_tracers_reach_only_their_own_processes() {
    assert!(nix::unistd::getuid().is_root(), "this test needs root");
    let server = TestServer::start_with(&["--socket-mode", "666"]);
    let mut c = server.control().await;
    let (mut ours, _) =
        ScriptAgent::connect(server.socket_path(), &["--functions", "foo,bar"]).await;
    let mut theirs = ScriptAgent::spawn_as(
        server.socket_path(),
        NOBODY,
        NOBODY,
        &["--functions", "foo,bar"],
    );
    theirs.expect_line("welcome ", T).await;
    let (our_pid, their_pid) = (ours.pid(), theirs.pid());
    let all = agents(&mut c).await;
    assert_eq!(all.len(), 2, "root sees both agents: {all:?}");
    let their_uid = all.iter().find(|a| a.pid == their_pid).map(|a| a.uid);
    assert_eq!(their_uid, Some(NOBODY), "{all:?}");
    let exe = all
        .iter()
        .find(|a| a.pid == our_pid)
        .map(|a| a.exe.clone())
        .expect("our agent");

    // nobody lists only its own agent.
    let line = server.probe_as(NOBODY, NOBODY, &["agents"]).await;
    assert!(
        line.contains(&format!("pid: {their_pid},")) && !line.contains(&format!("pid: {our_pid},")),
        "agents as nobody: {line}"
    );

    // nobody's tracers for `all` and for our executable reach only nobody's process.
    for call in [
        vec!["attach-all", "foo"],
        vec!["attach-exe", exe.as_str(), "bar"],
    ] {
        let line = server.probe_as(NOBODY, NOBODY, &call).await;
        assert!(line.starts_with("ok "), "{call:?} as nobody: {line}");
        assert!(
            line.contains(&format!("pid: {their_pid},"))
                && !line.contains(&format!("pid: {our_pid},")),
            "{call:?} as nobody reached: {line}"
        );
        theirs.expect_line("install ", T).await;
    }
    ours.assert_no_line(&mut c, "install ").await;
    let t = trampolines(&mut c, false).await;
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(
        t.iter().all(|t| t.pid == their_pid),
        "nobody's tracers reached us: {t:?}"
    );
    let their_tracers = tracers(&mut c).await;
    assert!(
        their_tracers.len() == 2 && their_tracers.iter().all(|t| t.owner_uid == NOBODY),
        "{their_tracers:?}"
    );

    // Root may trace nobody's process; nobody may not touch root's tracer even though
    // it runs in nobody's own process.
    let (root_tracer, _) = attach(&mut c, spec_pid(their_pid, "bar", CallbackKind::Count)).await;
    // `bar` moves to a trampoline calling both tracers; the old one is removed.
    theirs.expect_line("install ", T).await;
    theirs.expect_line("remove ", T).await;
    let before = snapshot(&mut c).await;
    let root_tracer = root_tracer.to_string();
    for call in [
        vec!["detach", root_tracer.as_str()],
        vec!["counts", root_tracer.as_str()],
        vec!["watch", root_tracer.as_str()],
    ] {
        let line = server.probe_as(NOBODY, NOBODY, &call).await;
        assert!(
            line.starts_with("error PermissionDenied ") && line.contains("uid"),
            "{call:?} as nobody: {line}"
        );
    }
    let line = server.probe_as(NOBODY, NOBODY, &["tracers"]).await;
    assert!(
        !line.contains(&format!("tracer_id: {root_tracer},")),
        "nobody sees root's tracer: {line}"
    );
    theirs.assert_no_line(&mut c, "remove ").await;
    assert_eq!(
        snapshot(&mut c).await,
        before,
        "nobody changed root's state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_of_other_uid_cannot_claim_our_pid_or_uid() {
    assert!(nix::unistd::getuid().is_root(), "this test needs root");
    let server = TestServer::start_with(&["--socket-mode", "666"]);
    let mut c = server.control().await;
    let (mut ours, our_id) =
        ScriptAgent::connect(server.socket_path(), &["--functions", "foo"]).await;
    let our_pid = ours.pid().to_string();
    for (args, needle) in [
        (
            ["--functions", "foo", "--pid-override", our_pid.as_str()],
            "pid",
        ),
        (["--functions", "foo", "--uid-override", "0"], "uid"),
    ] {
        let mut impostor = ScriptAgent::spawn_as(server.socket_path(), NOBODY, NOBODY, &args);
        let line = impostor.expect_line("error ", T).await;
        assert!(
            line.starts_with("error PermissionDenied ") && line.contains(needle),
            "{args:?} as nobody: {line}"
        );
        impostor.assert_no_line_without_session("welcome ").await;
    }
    // Our agent was neither replaced nor disturbed.
    sync_point(&mut c, &mut ours).await;
    let a = agents(&mut c).await;
    assert!(
        a.len() == 1 && a[0].agent_id == our_id && a[0].connected && a[0].uid == 0,
        "{a:?}"
    );
    // The same agent, honest about who it is, is admitted.
    let mut honest = ScriptAgent::spawn_as(
        server.socket_path(),
        NOBODY,
        NOBODY,
        &["--functions", "foo"],
    );
    honest.expect_line("welcome ", T).await;
    let a = agents(&mut c).await;
    assert!(
        a.iter()
            .any(|x| x.pid == honest.pid() && x.uid == NOBODY && x.connected),
        "{a:?}"
    );
}
