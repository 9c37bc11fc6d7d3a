//! Peer credentials: a client of another uid sees nothing of ours and may change nothing.
//! Tests run as root; the other user is `nobody` (65534), through the `patchbay` CLI and
//! `control-probe` (one raw Control call, for exact status codes).

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
    // A Synchronize by nobody covers nobody's agents (none): it must not wait for ours.
    let line = server.probe_as(NOBODY, NOBODY, &["sync", "2000"]).await;
    assert!(line.starts_with("ok "), "sync as nobody: {line}");

    sync_point(&mut c, &mut agent).await;
    agent.assert_no_line("remove ");
    agent.assert_no_line("install ");
    assert_eq!(
        snapshot(&mut c).await,
        before,
        "nobody changed root's state"
    );
}
