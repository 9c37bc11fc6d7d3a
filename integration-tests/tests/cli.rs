//! The `patchbay` CLI against a real server and scripted agents: `--json` output parsed
//! with serde_json, non-zero exit codes on errors.

use integration_tests::agent::LINE_TIMEOUT as T;
use integration_tests::ops::*;
use integration_tests::{ScriptAgent, TestServer, wait_for};
use serde_json::{Value, json};

fn parse(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[track_caller]
fn assert_fails(out: &std::process::Output, needles: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}: {err}");
    }
}

async fn trampolines_json(server: &TestServer, all: bool) -> Vec<Value> {
    let mut args = vec!["--json", "trampolines"];
    if all {
        args.push("--all");
    }
    parse(&server.cli(&args).await)["trampolines"]
        .as_array()
        .expect("trampolines array")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_detach_and_grace_period_through_the_cli() {
    let server = TestServer::start_with(&["--stall-threshold-ms", "100"]);
    let (mut agent, agent_id) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo,bar,baz", "--threads", "2"],
    )
    .await;
    let pid = agent.pid().to_string();

    let v = parse(&server.cli(&["--json", "agents"]).await);
    assert_eq!(v["agents"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["agents"][0]["pid"], json!(agent.pid()));
    assert_eq!(v["agents"][0]["connected"], json!(true));
    assert_eq!(v["agents"][0]["threads"], json!(2));

    let v = parse(
        &server
            .cli(&["--json", "functions", "--pid", &pid, "ba*"])
            .await,
    );
    assert_eq!(v["total"], json!(2), "{v}");

    let v = parse(
        &server
            .cli(&["--json", "attach", "--pid", &pid, "--count", "ba*"])
            .await,
    );
    let tracer = v["tracer"]["tracer_id"].as_u64().expect("tracer id");
    assert_eq!(v["results"][0]["sites_patched"], json!(2), "{v}");
    assert_eq!(v["tracer"]["state"], json!("active"), "{v}");
    let line = agent.expect_line("install ", T).await;
    let tramp: u64 = integration_tests::agent::field(&line, "tramp")
        .unwrap()
        .parse()
        .unwrap();

    let t = trampolines_json(&server, false).await;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["state"], json!("live"));
    assert_eq!(t[0]["trampoline_id"], json!(tramp));
    assert_eq!(t[0]["sites"], json!(2));
    let v = parse(&server.cli(&["--json", "tracers"]).await);
    assert_eq!(v["tracers"][0]["tracer_id"], json!(tracer), "{v}");
    assert_eq!(v["tracers"][0]["sites"], json!(2), "{v}");

    let v = parse(&server.cli(&["--json", "detach", &tracer.to_string()]).await);
    assert_eq!(
        v["retired"],
        json!([{ "agent_id": agent_id, "trampoline_id": tramp }]),
        "{v}"
    );
    assert_eq!(v["complete"], json!(false), "{v}");
    agent
        .expect_line(&format!("retired tramp={tramp}"), T)
        .await;

    // RETIRED with both threads as holdouts, then one reports and the other stalls.
    agent.cmd("qs 100001").await;
    agent.cmd("stall 100002 0x4242 trampoline#1 300").await;
    let t = wait_for(STATE_TIMEOUT, "one holdout left in the CLI", || {
        let server = &server;
        async move {
            let t = trampolines_json(server, false).await;
            if t.len() == 1
                && t[0]["state"] == json!("retired")
                && t[0]["holdouts"] == json!([100002])
            {
                Ok(t)
            } else {
                Err(t)
            }
        }
    })
    .await;
    assert_eq!(t[0]["retired_epoch"], json!(1), "{t:?}");
    let gp = wait_for(STATE_TIMEOUT, "the stall in `patchbay gp`", || {
        let server = &server;
        async move {
            let v = parse(&server.cli(&["--json", "gp"]).await);
            if v["pending"][0]["holdouts"][0]["stall"].is_object() {
                Ok(v)
            } else {
                Err(v)
            }
        }
    })
    .await;
    let g = &gp["pending"][0];
    assert_eq!(g["trampoline_id"], json!(tramp), "{gp}");
    assert_eq!(g["holdouts"][0]["tid"], json!(100002), "{gp}");
    assert_eq!(
        g["holdouts"][0]["stall"]["symbol"],
        json!("trampoline#1"),
        "{gp}"
    );
    assert_eq!(g["holdouts"][0]["stall"]["pc"], json!(0x4242), "{gp}");
    // The table form names the stalled thread too.
    let out = server.cli(&["gp"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("100002"), "{text}");
    agent
        .assert_no_line(&mut server.control().await, "authorize ")
        .await;

    agent.cmd("qs 100002").await;
    agent
        .expect_line(&format!("authorize tramp={tramp}"), T)
        .await;
    wait_for(STATE_TIMEOUT, "no trampoline left", || {
        let server = &server;
        async move {
            let t = trampolines_json(server, false).await;
            if t.is_empty() { Ok(()) } else { Err(t) }
        }
    })
    .await;
    for t in trampolines_json(&server, true).await {
        assert_eq!(t["state"], json!("freed"), "{t}");
    }
    let v = parse(&server.cli(&["--json", "gp"]).await);
    assert_eq!(v["pending"], json!([]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_wait_and_sync_through_the_cli() {
    let server = TestServer::start();
    let (mut agent, _) = ScriptAgent::connect(
        server.socket_path(),
        &["--functions", "foo", "--threads", "2"],
    )
    .await;
    let pid = agent.pid().to_string();
    let v = parse(
        &server
            .cli(&["--json", "attach", "--pid", &pid, "--count", "foo"])
            .await,
    );
    let tracer = v["tracer"]["tracer_id"].as_u64().unwrap().to_string();
    agent.expect_line("install ", T).await;

    // `detach --wait` with a short timeout fails (exit 1) and names the holdouts.
    let out = server
        .cli(&["detach", "--wait", "--timeout-ms", "300", &tracer])
        .await;
    assert_fails(&out, &[]);
    // `sync` too.
    let sync = server.cli(&["--json", "sync", "--timeout-ms", "300"]);
    let (out, _) = tokio::join!(sync, agent.expect_line("barrier ", T));
    assert_fails(&out, &["100001"]);

    // With every thread reporting, `sync` succeeds.
    let sync = server.cli(&["--json", "sync", "--timeout-ms", "10000"]);
    let answer = async {
        agent.expect_line("barrier ", T).await;
        agent.cmd("qs-all").await;
    };
    let (out, ()) = tokio::join!(sync, answer);
    let v = parse(&out);
    assert_eq!(
        (v["agents"].clone(), v["threads"].clone()),
        (json!(1), json!(2)),
        "{v}"
    );
    // The retired trampoline was freed by the same reports.
    agent.expect_line("authorize ", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_through_the_cli() {
    let server = TestServer::start();
    let (mut agent, _) =
        ScriptAgent::connect(server.socket_path(), &["--functions", "foo,bar"]).await;
    let pid = agent.pid().to_string();
    let v = parse(
        &server
            .cli(&["--json", "attach", "--pid", &pid, "--count", "*"])
            .await,
    );
    let tracer = v["tracer"]["tracer_id"].as_u64().unwrap();
    agent.expect_line("install ", T).await;
    agent.cmd(&format!("counts {tracer} foo 3")).await;
    agent.cmd(&format!("counts {tracer} bar 40")).await;
    let v = wait_for(STATE_TIMEOUT, "counts in the CLI", || {
        let server = &server;
        async move {
            let v = parse(&server.cli(&["--json", "counts", &tracer.to_string()]).await);
            if v["total"] == json!(43) {
                Ok(v)
            } else {
                Err(v)
            }
        }
    })
    .await;
    assert_eq!(
        v["counts"][0],
        json!({ "function": "bar", "count": 40, "agents": 1 }),
        "{v}"
    );
    assert_eq!(
        v["counts"][1],
        json!({ "function": "foo", "count": 3, "agents": 1 }),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_events_as_json_lines() {
    use tokio::io::AsyncBufReadExt;

    let server = TestServer::start();
    let (mut agent, agent_id) =
        ScriptAgent::connect(server.socket_path(), &["--functions", "foo,bar"]).await;
    let pid = agent.pid().to_string();
    let v = parse(
        &server
            .cli(&[
                "--json", "attach", "--pid", &pid, "--trace", "--args", "2", "foo",
            ])
            .await,
    );
    let tracer = v["tracer"]["tracer_id"].as_u64().unwrap();
    agent.expect_line("install ", T).await;

    let mut watch = server
        .cli_command(&["--json", "watch", &tracer.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn patchbay watch");
    let mut lines = tokio::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    // `watch` subscribes some time after it starts: send one-event batches until one is
    // printed.
    let deadline = std::time::Instant::now() + STATE_TIMEOUT;
    let first = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "patchbay watch printed nothing"
        );
        agent.cmd(&format!("events {tracer} 1 0")).await;
        if let Ok(line) =
            tokio::time::timeout(std::time::Duration::from_millis(200), lines.next_line()).await
        {
            break line.expect("read watch output").expect("watch ended");
        }
    };
    let e: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(
        e,
        json!({
            "agent_id": agent_id, "pid": agent.pid(), "tracer_id": tracer,
            "timestamp_ns": 1_000_000, "tid": 100001, "address": 0x1000,
            "function": "foo", "args": [], "dropped": 0,
        })
    );
    // Later batches stream through, in order, with their drop count.
    agent.cmd(&format!("events {tracer} 3 7")).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let line = tokio::time::timeout(T, lines.next_line())
            .await
            .expect("watch output")
            .unwrap()
            .expect("watch ended");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["dropped"] == json!(7) {
            got.push(v);
        }
    }
    assert_eq!(got[2]["args"], json!([32, 33]), "{got:?}");
    assert_eq!(got[1]["args"], json!([16]), "{got:?}");
    watch.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_exit_non_zero_and_change_nothing() {
    let server = TestServer::start();
    let mut c = server.control().await;
    let (mut agent, _) = ScriptAgent::connect(server.socket_path(), &["--functions", "foo"]).await;
    let pid = agent.pid().to_string();
    let before = snapshot(&mut c).await;

    assert_fails(&server.cli(&["detach", "4242"]).await, &["4242"]);
    assert_fails(&server.cli(&["counts", "4242"]).await, &["4242"]);
    assert_fails(
        &server
            .cli(&["attach", "--pid", "2147483632", "--count", "foo"])
            .await,
        &["no agent in pid 2147483632"],
    );
    assert_fails(
        &server
            .cli(&["attach", "--pid", &pid, "--count", "foo["])
            .await,
        &["foo["],
    );
    assert_fails(
        &server
            .cli(&["attach", "--pid", &pid, "--count", "nothing*"])
            .await,
        &[],
    );
    assert_fails(
        &server
            .cli(&["--json", "functions", "--pid", "2147483632", "*"])
            .await,
        &["no agent in pid 2147483632"],
    );
    // A usage error is exit 2 (clap).
    let out = server.cli(&["attach", "--count", "foo"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    agent.assert_no_line(&mut c, "install ").await;
    assert_eq!(snapshot(&mut c).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_without_server_fails_clearly() {
    let server = TestServer::start();
    let socket = server.dir().join("nobody-listens.sock");
    let out = tokio::process::Command::new(integration_tests::bins::patchbay())
        .arg("--socket")
        .arg(&socket)
        .arg("agents")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("patchbayd"), "{err}");
}
