//! Tooling in another language: the Python client of `sdk/python/` against a real
//! patchbayd. Needs python3 with grpcio, grpcio-tools, grpcio-reflection and
//! grpcio-status: `bash .ci/python-env` puts them in a venv under `target/python` (CI does
//! it in `.ci/run`); `PATCHBAY_PYTHON` names another interpreter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::fixtures::Build;
use integration_tests::{Target, TestServer, wait_agent};

/// Bound on one Python run (stub generation, the full cycle with its own 60 s waits,
/// interpreter start-up).
const PYTHON_TIMEOUT: Duration = Duration::from_secs(300);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The interpreter to use, checked to have the packages; panics with what to do when
/// it is missing.
fn python() -> PathBuf {
    let venv = workspace().join("target/python/bin/python");
    let python = match std::env::var_os("PATCHBAY_PYTHON") {
        Some(p) => PathBuf::from(p),
        None if venv.exists() => venv,
        None => PathBuf::from("python3"),
    };
    let check = std::process::Command::new(&python)
        .args([
            "-c",
            "import grpc, grpc_tools, grpc_reflection, grpc_status",
        ])
        .output();
    match check {
        Ok(out) if out.status.success() => python,
        Ok(out) => panic!(
            "{} lacks the Python client's packages ({}): run `bash .ci/python-env` (a venv in \
             target/python with grpcio grpcio-tools grpcio-reflection grpcio-status), or set \
             PATCHBAY_PYTHON to an interpreter that has them",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no error output")
        ),
        Err(e) => panic!(
            "cannot run {} ({e}): install python3 and run `bash .ci/python-env`, or set \
             PATCHBAY_PYTHON",
            python.display()
        ),
    }
}

/// Runs `sdk/python/SCRIPT ARGS...` and returns its stdout; panics with its stderr when
/// it fails or overruns [`PYTHON_TIMEOUT`].
async fn run_python(script: &str, args: &[&str]) -> String {
    let path = workspace().join("sdk/python").join(script);
    let child = tokio::process::Command::new(python())
        .arg(&path)
        .args(args)
        .env_remove("PATCHBAY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
    let out = tokio::time::timeout(PYTHON_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} ran longer than {PYTHON_TIMEOUT:?}"))
        .expect("wait for python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_a_full_cycle() {
    let server = TestServer::start();
    let c = server.control().await;
    let mut t = Target::start(Build::Nop5, server.socket_path()).await;
    let pid = t.pid();
    wait_agent(&c, pid).await;
    // Two threads call `work` until `stop`: counts and events keep coming.
    t.expect("hammer 2", "hammering").await;
    let socket = server.socket_path().to_str().expect("utf-8 socket path");
    let out = run_python(
        "patchbay_example.py",
        // Generous waits: attaches and detaches take seconds on a loaded machine.
        &[
            "--socket",
            socket,
            "--pid",
            &pid.to_string(),
            "--events",
            "5",
            "--timeout",
            "60",
        ],
    )
    .await;
    let stopped = t.expect("stop", "stopped ").await;
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("the example's stdout is not JSON ({e}): {out}"));
    eprintln!("python example: {v}\nfixture: {stopped}");

    assert!(
        v["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .any(|a| a["pid"] == pid && a["connected"] == true),
        "{v}"
    );
    assert_eq!(v["error_example"]["code"], "NOT_FOUND", "{v}");
    assert_eq!(v["error_example"]["reason"], "UNKNOWN_TRACER", "{v}");
    assert!(v["count_tracer"]["sites"].as_u64() >= Some(1), "{v}");
    let total = v["count_tracer"]["total"].as_u64().expect("total");
    assert!(total > 0, "no counts within the deadline: {v}");
    assert_eq!(
        v["count_tracer"]["counts"]["work"].as_u64(),
        Some(total),
        "{v}"
    );
    let events = v["trace_tracer"]["events"].as_array().expect("events");
    assert_eq!(events.len(), 5, "{v}");
    for e in events {
        assert_eq!(e["function"], "work", "{v}");
        assert_eq!(e["args"].as_array().map(Vec::len), Some(2), "{v}");
    }
    for d in v["detached"].as_array().expect("detached") {
        assert_eq!(
            d["complete"], true,
            "detach with wait did not complete: {v}"
        );
        assert!(d["retired"].as_u64() >= Some(1), "{v}");
    }
    for (id, state) in v["tracers_left"].as_object().expect("tracers_left") {
        assert_eq!(state, "TRACER_STATE_DETACHING", "tracer {id}: {v}");
    }
    let _ = t.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_lists_services_through_reflection() {
    let server = TestServer::start();
    let socket = server.socket_path().to_str().expect("utf-8 socket path");
    let out = run_python("reflection_list.py", &["--socket", socket]).await;
    let lines: BTreeSet<&str> = out.lines().collect();
    let services: BTreeSet<&str> = lines.iter().copied().filter(|l| !l.contains('/')).collect();
    assert_eq!(
        services,
        BTreeSet::from([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "patchbay.v1.Control",
        ]),
        "{out}"
    );
    // The methods come from the served descriptors (Control's file and its imports).
    for m in ["Attach", "Detach", "Counts", "WatchEvents", "ListAgents"] {
        assert!(
            lines.contains(format!("patchbay.v1.Control/{m}").as_str()),
            "{m} missing: {out}"
        );
    }
}
