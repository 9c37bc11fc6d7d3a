//! `patchbay run` end to end on the demo program (`demo/hotloop.c`, built here with
//! `demo/build.sh`), with a real agent and the embedded server: the program is held
//! before `main` until the tracer is live, so every call is counted, from `main` on,
//! and the final counts equal the program's own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use integration_tests::{bins, fixtures};

/// `demo/build.sh` into this test's cache directory; the program's path.
fn demo() -> PathBuf {
    let out = fixtures::cache_dir();
    std::fs::create_dir_all(&out).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../demo/build.sh");
    let o = std::process::Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", &out)
        .output()
        .expect("run demo/build.sh");
    assert!(
        o.status.success(),
        "demo/build.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

/// `name=count` pairs of the program's `hotloop: calls …` line.
fn own_counts(line: &str) -> BTreeMap<String, u64> {
    line.trim_start_matches("hotloop: calls ")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

#[tokio::test]
async fn run_counts_every_call_from_main_on() {
    let demo = demo();
    let dir = tempfile::tempdir().unwrap();
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // No start delay: the threads call at once.
    let o = tokio::process::Command::new(bins::patchbay())
        .args(["--json", "run", "--count", "*", "--agent"])
        .arg(bins::agent_lib())
        .arg("--")
        .arg(&demo)
        .args(["20000", "0"])
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("PATCHBAY_SOCKET", dir.path().join("none.sock"))
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "patchbay run failed: {err}\n{out}");
    let own = own_counts(
        out.lines()
            .find(|l| l.starts_with("hotloop: calls "))
            .unwrap_or_else(|| panic!("no counts from the program: {out}")),
    );
    let json: serde_json::Value = serde_json::from_str(
        out.lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON: {out}\n{err}")),
    )
    .unwrap();
    let counted: BTreeMap<String, u64> = json["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["function"].as_str().unwrap().to_owned(),
                c["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(own.len(), 5, "{own:?}");
    for (f, n) in &own {
        assert_eq!(
            counted.get(f),
            Some(n),
            "{f}: program {n}, patchbay {counted:?}"
        );
    }
    // Held before main: main itself and the argument parsing are counted too.
    assert_eq!(counted.get("main"), Some(&1), "{counted:?}");
    assert_eq!(counted.get("parse_arg"), Some(&2), "{counted:?}");
    assert_eq!(json["status"], 0);
}
