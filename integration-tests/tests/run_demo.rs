//! `patchbay run` end to end on the demo program (`demo/hotloop.c`, built here with
//! `demo/build.sh`), with a real agent and the embedded server: the program is held
//! before `main` until the tracer is live, so every call is counted, from `main` on,
//! and the final counts equal the program's own.

use std::path::PathBuf;

use integration_tests::fixtures;
use integration_tests::run::run_counting;

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

#[tokio::test]
async fn run_counts_every_call_from_main_on() {
    let demo = demo();
    // No start delay: the threads call at once.
    let run = run_counting("*", &demo, &["20000", "0"], &[]).await;
    let own = run.hotloop_counts();
    let counted = run.counted();
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
    assert_eq!(run.json["status"], 0);
}
