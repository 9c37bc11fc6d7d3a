//! The tracer store across server restarts, with scripted agents: a server killed
//! during a grace period and restarted on the same socket and state directory knows
//! its tracers again (ids, specs), keeps the trampolines the agent re-reports for
//! them, authorizes nothing on evidence from before the restart, and a damaged store
//! stops the server with a precise error. (Real programs: see `agent_e2e.rs`.)

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use integration_tests::agent::{LINE_TIMEOUT as T, field};
use integration_tests::ops::*;
use integration_tests::proto::*;
use integration_tests::server::Control;
use integration_tests::{ScriptAgent, TestServer, bins, wait_for};
use serde_json::json;
use tonic::Code;

/// Waits until trampoline `id` is in `want` state with exactly `holdouts` (sorted).
async fn wait_trampoline(
    c: &Control,
    id: u64,
    want: TrampolineState,
    holdouts_want: &[u32],
) -> TrampolineInfo {
    wait_for(
        STATE_TIMEOUT,
        &format!("trampoline {id} {want:?} with holdouts {holdouts_want:?}"),
        || {
            let mut c = c.clone();
            let holdouts_want = holdouts_want.to_vec();
            async move {
                let all = trampolines(&mut c, false).await;
                match all.iter().find(|t| t.trampoline_id == id) {
                    Some(t) if state(t) == want && holdouts(t) == holdouts_want => Ok(t.clone()),
                    _ => Err(all),
                }
            }
        },
    )
    .await
}

async fn wait_count(c: &Control, tracer: u64, total: u64) {
    wait_for(
        STATE_TIMEOUT,
        &format!("tracer {tracer} to count {total}"),
        || {
            let mut c = c.clone();
            async move {
                let r = c
                    .counts(CountsRequest { tracer_id: tracer })
                    .await
                    .expect("Counts")
                    .into_inner();
                if r.total == total { Ok(()) } else { Err(r) }
            }
        },
    )
    .await;
}

fn tramp_of(line: &str) -> u64 {
    field(line, "tramp").unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_during_a_grace_period_comes_back_with_its_tracers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let state_dir = dir.path().join("state");
    let state = state_dir.to_str().unwrap();
    let mut first = TestServer::start_at(&socket, &["--state-dir", state]);
    let mut c = first.control().await;
    let (mut agent, _) =
        ScriptAgent::connect(&socket, &["--functions", "foo,bar", "--threads", "2"]).await;
    let pid = agent.pid();

    let (kept, _) = attach(&mut c, spec_pid(pid, "foo", CallbackKind::Count)).await;
    let live = tramp_of(&agent.expect_line("install ", T).await);
    let (gone, _) = attach(&mut c, spec_pid(pid, "bar", CallbackKind::Count)).await;
    let retired = tramp_of(&agent.expect_line("install ", T).await);
    // `gone` is detached; its trampoline waits for threads 100001 and 100002. Only
    // 100001 reports before the server dies.
    let d = try_detach(&mut c, gone, false, 0).await.expect("detach");
    assert!(!d.complete, "{d:?}");
    agent
        .expect_line(&format!("remove tramp={retired}"), T)
        .await;
    agent
        .expect_line(&format!("retired tramp={retired}"), T)
        .await;
    wait_trampoline(&c, retired, TrampolineState::Retired, &[100001, 100002]).await;
    agent.cmd("qs 100001").await;
    wait_trampoline(&c, retired, TrampolineState::Retired, &[100002]).await;
    agent.cmd(&format!("counts {kept} foo 500")).await;
    wait_count(&c, kept, 500).await;

    first.kill();
    drop(c);
    // The stream ends (cleanly or not) with the server.
    agent
        .expect("the end of the stream", T, |l| {
            l == "closed" || l.starts_with("error ")
        })
        .await;
    let second = TestServer::start_at(&socket, &["--state-dir", state]);
    let mut c = second.control().await;
    agent.send("reconnect");
    agent.expect_line("welcome agent=1 resumed=false", T).await;
    agent.expect_line("ok reconnect", T).await;

    // The attached tracer is back with its id and spec; the detached one is not.
    let listed = tracers(&mut c).await;
    let [t] = listed.as_slice() else {
        panic!("expected only tracer {kept}: {listed:?}")
    };
    assert_eq!(t.tracer_id, kept, "{t:?}");
    assert_eq!(t.state(), TracerState::Active, "{t:?}");
    assert_eq!(t.spec, Some(spec_pid(pid, "foo", CallbackKind::Count)));
    // `patchbay tracers` shows it.
    let v = second.cli_json(&["--json", "tracers"]).await;
    assert_eq!(v["tracers"][0]["tracer_id"], json!(kept), "{v}");
    assert_eq!(v["tracers"][0]["spec"]["pattern"], json!("foo"), "{v}");

    // Evidence from before the restart is not trusted: both threads hold the retired
    // trampoline again.
    wait_trampoline(&c, retired, TrampolineState::Retired, &[100001, 100002]).await;
    // The live trampoline stays the restored tracer's: nothing reinstalled or removed.
    agent
        .assert_no_lines(&mut c, &["install ", "remove "])
        .await;
    let live_info = wait_trampoline(&c, live, TrampolineState::Live, &[]).await;
    assert_eq!(
        (live_info.tracer_ids.clone(), live_info.sites),
        (vec![kept], 1),
        "{live_info:?}"
    );
    let t = &tracers(&mut c).await[0];
    assert_eq!((t.agents, t.sites), (1, 1), "{t:?}");

    // Counts continue from the agent's cumulative counters.
    agent.cmd(&format!("counts {kept} foo 700")).await;
    wait_count(&c, kept, 700).await;

    // Nothing is authorized until a grace period completes after the restart.
    agent.cmd("qs 100002").await;
    wait_trampoline(&c, retired, TrampolineState::Retired, &[100001]).await;
    agent.assert_no_line(&mut c, "authorize ").await;
    agent.cmd("qs 100001").await;
    agent
        .expect_line(&format!("authorize tramp={retired}"), T)
        .await;

    // New tracer ids never reuse a detached one's.
    let (next, _) = attach(&mut c, spec_pid(pid, "bar", CallbackKind::Count)).await;
    assert!(next > gone, "tracer id {next} reuses or precedes {gone}");
    agent.expect_line("install ", T).await;
}

/// Runs `patchbayd --socket S --state-dir DIR` and expects it to fail at startup.
async fn startup_failure(dir: &Path, state: &Path) -> String {
    let socket = dir.join("s.sock");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(bins::patchbayd())
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("patchbayd did not exit within 20 s")
    .expect("run patchbayd");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "patchbayd started: {stderr}");
    assert!(
        !socket.exists(),
        "patchbayd listened before failing: {stderr}"
    );
    stderr
}

#[tokio::test]
async fn a_damaged_store_is_a_precise_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // A store with one tracer, written by a real server.
    {
        let server = TestServer::start_with(&["--state-dir", state.to_str().unwrap()]);
        let mut c = server.control().await;
        attach(&mut c, spec_all("foo", CallbackKind::Count)).await;
    }
    let file = state.join("tracers.pb");
    let good = std::fs::read(&file).expect("the store file exists");

    std::fs::write(&file, &good[..good.len() - 1]).unwrap();
    let err = startup_failure(dir.path(), &state).await;
    assert!(
        err.contains(&format!("the tracer store {} is corrupt", file.display()))
            && err.contains("payload bytes")
            && err.contains("no tracer was restored"),
        "{err}"
    );

    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    std::fs::write(&file, &flipped).unwrap();
    let err = startup_failure(dir.path(), &state).await;
    assert!(
        err.contains("is corrupt") && err.contains("checksum"),
        "{err}"
    );

    std::fs::write(&file, b"not a store at all").unwrap();
    let err = startup_failure(dir.path(), &state).await;
    assert!(err.contains("PBTRACE1"), "{err}");

    // The intact file starts a server that knows the tracer again.
    std::fs::write(&file, &good).unwrap();
    let server = TestServer::start_with(&["--state-dir", state.to_str().unwrap()]);
    let mut c = server.control().await;
    let t = tracers(&mut c).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].spec.as_ref().unwrap().pattern, "foo");

    // A second server on the same state directory is refused.
    let err = startup_failure(dir.path(), &state).await;
    assert!(err.contains("in use by another patchbayd"), "{err}");
}

/// A change the store cannot hold is refused (attach) or reported (detach), and the
/// next successful save writes the whole current set.
#[tokio::test]
async fn an_unwritable_store_refuses_attaches_and_reports_detaches() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let state = dir.path().join("state");
    let state_arg = ["--state-dir", state.to_str().unwrap()];
    let mut first = TestServer::start_at(&socket, &state_arg);
    let mut c = first.control().await;
    let (a, _) = attach(&mut c, spec_all("foo", CallbackKind::Count)).await;

    // The state directory disappears under the running server.
    std::fs::remove_dir_all(&state).unwrap();
    let r = try_attach(&mut c, spec_all("bar", CallbackKind::Count)).await;
    assert_status(r, Code::Unavailable, &["not attached", "tracers.pb"]);
    let listed: Vec<u64> = tracers(&mut c).await.iter().map(|t| t.tracer_id).collect();
    assert_eq!(listed, vec![a], "the refused tracer must not run");
    let r = try_detach(&mut c, a, false, 0).await;
    assert_status(r, Code::Unavailable, &["not saved", "restarted server"]);

    // Back: the next change saves everything (a's detach included).
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&state)
        .unwrap();
    let (b, _) = attach(&mut c, spec_all("baz", CallbackKind::Count)).await;
    first.kill();
    let second = TestServer::start_at(&socket, &state_arg);
    let mut c = second.control().await;
    let listed: Vec<u64> = tracers(&mut c).await.iter().map(|t| t.tracer_id).collect();
    assert_eq!(listed, vec![b]);
}
