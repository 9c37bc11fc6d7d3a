//! Keeps the `bench` binary from rotting: runs it in `--quick` mode (peers skipped)
//! and checks that its JSON holds every figure with sane values — counts that match
//! the calls made, every site attached, events received. Timings are not asserted.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound on the whole quick run (it takes well under 30 s on 2 cores in a debug build).
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn run_quick(json: &std::path::Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--quick")
        .arg("--json")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bench");
    let started = Instant::now();
    let status = integration_tests::wait_for_sync(RUN_TIMEOUT, "bench --quick to exit", || {
        match child.try_wait().expect("wait bench") {
            Some(s) => Ok(s),
            None => Err(format!("running for {:?}", started.elapsed())),
        }
    });
    let out = child.wait_with_output().expect("bench output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("bench --quick took {:?}\n{stdout}", started.elapsed());
    assert!(status.success(), "bench --quick failed: {status}\n{stderr}");
    stdout
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[test]
fn bench_quick_reports_every_figure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let stdout = run_quick(&json);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("bench wrote its JSON"))
            .expect("the JSON parses");
    assert_eq!(doc["quick"], Value::Bool(true));
    let cores = num(&doc["machine"], "cores") as u32;
    assert!(cores >= 1);
    let figures: HashMap<String, Value> = doc["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .map(|f| (f["id"].as_str().expect("id").to_string(), f.clone()))
        .collect();
    let fig = |id: &str| -> &Value {
        figures
            .get(id)
            .unwrap_or_else(|| panic!("figure {id} missing; have {:?}", figures.keys()))
    };
    // A measured figure: a finite positive median, every sample too, not skipped.
    let measured = |id: &str| -> &Value {
        let f = fig(id);
        assert!(f["skipped"].is_null(), "{id} skipped: {f}");
        let m = num(f, "median");
        assert!(m.is_finite() && m > 0.0, "{id}: median {m}");
        let samples = f["samples"].as_array().expect("samples");
        assert!(!samples.is_empty(), "{id}: no samples");
        assert!(
            samples.iter().all(|s| s.as_f64().is_some_and(|x| x > 0.0)),
            "{id}: {samples:?}"
        );
        assert!(
            stdout.contains(f["label"].as_str().expect("label")),
            "{id} not in the table"
        );
        f
    };

    let mut threads = vec![1];
    if cores > 1 {
        threads.push(cores);
    }
    for t in &threads {
        for config in ["untraced", "not_attached", "count", "trace2"] {
            measured(&format!("percall.{config}.t{t}"));
        }
        let count = &measured(&format!("percall.count.t{t}"))["detail"];
        assert_eq!(
            num(count, "counted"),
            num(count, "calls"),
            "count saw every call: {count}"
        );
        assert_eq!(num(count, "sites_patched"), 1.0);
        let trace = &measured(&format!("percall.trace2.t{t}"))["detail"];
        assert!(num(trace, "dropped") <= num(trace, "calls"), "{trace}");
        // Peers are skipped in quick mode, and say why.
        for peer in ["bpftrace", "uftrace", "uftrace_plain"] {
            let f = fig(&format!("peers.{peer}.t{t}"));
            assert!(
                f["skipped"].as_str().is_some_and(|s| s.contains("--quick")),
                "{f}"
            );
        }
    }
    assert!(stdout.contains("skipped: --quick"), "{stdout}");

    for size in [10, 1000] {
        let a = measured(&format!("sites.attach.{size}"));
        assert_eq!(num(&a["detail"], "sites_patched"), size as f64, "{a}");
        assert_eq!(
            num(&a["detail"], "counted_after_one_call_each"),
            size as f64,
            "{a}"
        );
        measured(&format!("sites.detach_authorized.{size}"));
        measured(&format!("sites.detach_freed.{size}"));
    }
    measured("sites.cold_attach");

    for kind in ["expedited", "no-expedite"] {
        for n in [1, 16] {
            let f = measured(&format!("grace.{kind}.t{n}"));
            let d = &f["detail"];
            assert_eq!(
                num(d, "busy") + num(d, "blocked") + num(d, "idle"),
                n as f64,
                "{f}"
            );
            assert!(num(d, "busy_calls") > 0.0, "busy threads made calls: {f}");
        }
    }

    measured("events.gp.idle");
    let f = measured("events.gp.flood");
    assert!(
        num(&f["detail"], "received") > 0.0,
        "the flood delivered events: {f}"
    );

    for id in ["events.full", "events.paced.100000"] {
        let f = measured(id);
        let d = &f["detail"];
        let calls: u64 = d["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        let received: u64 = d["received"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        let dropped: u64 = d["dropped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        assert!(received > 0, "{id}: no event received: {f}");
        assert!(
            received + dropped <= calls,
            "{id}: more events than calls: {f}"
        );
    }
}
