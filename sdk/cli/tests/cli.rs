//! The `patchbay` binary against a scripted Control server: output for people and for
//! scripts, exit codes, and error messages.

// The scripted Control server shared with the SDK's own tests.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Output;

use common::{Fake, serve_unix};
use serde_json::Value;

async fn patchbay(socket: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("PATCHBAY_TOKEN_FILE")
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[tokio::test]
async fn tables_for_people() {
    let server = serve_unix(Fake::default()).await;
    let s = &server.socket;

    let o = patchbay(s, &["agents"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("/usr/bin/demo"), "{}", stdout(&o));

    let o = patchbay(s, &["tracers"]).await;
    let out = stdout(&o);
    assert!(
        out.starts_with("ID  NAME  STATE   CALLBACK  TARGET    PATTERN"),
        "{out}"
    );
    assert!(
        out.contains("demo  active  count     pid 4242  work*"),
        "{out}"
    );

    let o = patchbay(s, &["counts", "1"]).await;
    let out = stdout(&o);
    let functions: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(functions, ["hot", "warm", "rare", "total:"], "{out}");

    let o = patchbay(
        s,
        &["attach", "--pid", "4242", "--trace", "--args", "2", "work*"],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("tracer 1 attached: trace(args=2) of `work*` in pid 4242\n"));

    let o = patchbay(s, &["detach", "1", "--wait"]).await;
    assert_eq!(
        stdout(&o),
        "tracer 1 detached: 1 trampoline retired, grace period over (may be freed)\n"
    );

    let o = patchbay(s, &["gp"]).await;
    let out = stdout(&o);
    assert!(out.contains("free trampoline 7"), "{out}");
    assert!(out.contains("0x7f0000001000  trampoline #7"), "{out}");

    let o = patchbay(s, &["sync"]).await;
    assert_eq!(
        stdout(&o),
        "grace period complete: 1 agent, 2 threads in 0us\n"
    );

    let o = patchbay(s, &["trampolines", "--all"]).await;
    let out = stdout(&o);
    assert!(out.contains(" live ") && out.contains(" freed "), "{out}");

    let o = patchbay(s, &["functions", "--pid", "4242", "wo*", "--limit", "1"]).await;
    let out = stdout(&o);
    assert!(out.contains("match:wo*"), "{out}");
    assert!(out.contains("showing 1 of 11 matching functions"), "{out}");

    let o = patchbay(s, &["watch", "1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "1.000000001  pid=4242  tid=4243  work(0x1)\n1.000000002  pid=4242  tid=4243  work(0x2)\n"
    );
    let err = stderr(&o);
    assert!(
        err.contains("warning: pid 4242 dropped 3 events of tracer 1"),
        "{err}"
    );
    assert!(err.contains("the event stream of tracer 1 ended"), "{err}");
}

#[tokio::test]
async fn json_for_scripts() {
    let server = serve_unix(Fake::default()).await;
    let s = &server.socket;

    let v = json(&patchbay(s, &["--json", "agents"]).await);
    assert_eq!(v["agents"][0]["pid"], 4242);
    assert_eq!(v["agents"][0]["callbacks"][0], "mine");

    let v = json(&patchbay(s, &["tracers", "--json"]).await);
    assert_eq!(v["tracers"][0]["state"], "active");
    assert_eq!(v["tracers"][0]["spec"]["callback"]["kind"], "count");
    assert_eq!(v["tracers"][0]["spec"]["target"]["pid"], 4242);

    let v = json(&patchbay(s, &["--json", "counts", "1"]).await);
    assert_eq!(v["counts"][0]["function"], "hot");
    assert_eq!(v["total"], 111);

    let v = json(&patchbay(s, &["--json", "latency", "1"]).await);
    assert_eq!(v["functions"][0]["function"], "slow");
    assert_eq!(v["functions"][0]["p50_ns"], 1_000);
    assert_eq!(v["functions"][0]["abandoned"], 1);
    let o = patchbay(s, &["latency", "1", "--function", "slow"]).await;
    let out = stdout(&o);
    assert!(out.contains("[768ns, 1.024us)"), "{out}");
    let o = patchbay(s, &["latency", "1", "--function", "nope"]).await;
    assert!(!o.status.success(), "an unknown function is an error");

    let v = json(
        &patchbay(
            s,
            &[
                "--json",
                "attach",
                "--exe",
                "/opt/app",
                "--custom",
                "mine",
                "f",
                "--timeout-ms",
                "700",
            ],
        )
        .await,
    );
    assert_eq!(v["tracer"]["spec"]["target"]["exe"], "/opt/app");
    assert_eq!(v["tracer"]["spec"]["callback"]["custom_name"], "mine");
    assert_eq!(v["results"][0]["sites_patched"], 700);

    let v = json(&patchbay(s, &["--json", "trampolines", "--pid", "4242"]).await);
    assert_eq!(v["trampolines"][0]["state"], "live");
    assert_eq!(v["trampolines"][0]["pid"], 4242);

    let v = json(&patchbay(s, &["--json", "gp"]).await);
    assert_eq!(v["pending"][0]["trampoline_id"], 7);
    assert_eq!(v["pending"][0]["holdouts"][0]["stall"]["duration_ms"], 1500);

    let v = json(&patchbay(s, &["--json", "sync", "--timeout-ms", "40"]).await);
    assert_eq!(v["elapsed_us"], 40);

    let v = json(&patchbay(s, &["--json", "detach", "1"]).await);
    assert_eq!(v["complete"], false);
    assert_eq!(v["retired"][0]["trampoline_id"], 7);

    let v = json(&patchbay(s, &["--json", "functions", "--pid", "4242"]).await);
    assert_eq!(v["functions"][0]["site_kind"], "nop5");

    let o = patchbay(s, &["--json", "watch", "1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["function"], "work");
    assert_eq!(lines[1]["args"][0], 2);
}

#[tokio::test]
async fn errors_exit_1_with_an_actionable_message() {
    let server = serve_unix(Fake::default()).await;
    let s = &server.socket;

    let o = patchbay(s, &["functions", "--pid", "7"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert_eq!(
        stderr(&o),
        "error: no agent in pid 7: start the program with `patchbay run` or LD_PRELOAD=libpatchbay_agent.so\n"
    );

    let o = patchbay(s, &["sync", "--timeout-ms", "1"]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with("error: synchronize: tid 43 of pid 4242 not quiescent\n"),
        "{err}"
    );
    assert!(err.contains("`patchbay gp`"), "{err}");

    let o = patchbay(s, &["detach", "1", "--wait", "--timeout-ms", "1"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("its grace period continues"),
        "{}",
        stderr(&o)
    );

    let o = patchbay(s, &["watch", "99"]).await;
    assert_eq!(
        (o.status.code(), stderr(&o).as_str()),
        (Some(1), "error: no tracer 99\n")
    );

    let missing = server.dir.path().join("none.sock");
    let o = patchbay(&missing, &["agents"]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach patchbayd at {}: is it running? start it with `patchbayd`\n  cause: ",
            missing.display()
        )),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");

    let o = patchbay(s, &["attach", "--pid", "1", "f*"]).await;
    assert_eq!(o.status.code(), Some(2), "usage errors exit 2");

    let o = patchbay(s, &["--token-file", "/nonexistent/token", "agents"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: cannot read the token file /nonexistent/token\n"),
        "{}",
        stderr(&o)
    );
}
