//! Exit tracing end to end (issue 12): `patchbay --json run --latency` on
//! `fixtures/exits.c` (5-byte nop entries): functions that take a known time (a
//! calibrated busy loop, no sleep) are measured within bounds, every call counted
//! exactly, and the frames left by `longjmp` and `siglongjmp` counted as abandoned
//! exactly, while the program does exactly what it does untraced.

use std::path::PathBuf;
use std::process::Command;

use integration_tests::fixtures::{self, Build};
use integration_tests::run::run_tracing;

/// `fixtures/exits.c` built with [`Build::Nop5`]'s flags into the fixture cache.
fn exits_program() -> PathBuf {
    build("gcc", "exits.c", "exits")
}

/// Builds fixture `src` with `cc` and [`Build::Nop5`]'s flags into the fixture cache.
fn build(cc: &str, src: &str, name: &str) -> PathBuf {
    let dir = fixtures::cache_dir().join("exits");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures::source_dir().join(src);
    let obj = dir.join(format!("{name}.o"));
    let tmp = dir.join(format!("{name}.tmp"));
    let exe = dir.join(name);
    let o = Command::new(cc)
        .args(Build::Nop5.cflags())
        .args(["-Wall", "-Wextra", "-Werror", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("run gcc");
    assert!(
        o.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(cc)
        .args(Build::Nop5.ldflags())
        .arg(&obj)
        .arg("-o")
        .arg(&tmp)
        .output()
        .expect("run gcc");
    assert!(
        o.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::rename(&tmp, &exe).unwrap();
    exe
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_measured_and_longjmp_frames_are_abandoned_exactly() {
    let exe = exits_program();
    let untraced = Command::new(&exe).arg("10").output().unwrap();
    let untraced = String::from_utf8_lossy(&untraced.stdout).into_owned();
    assert_eq!(
        untraced.trim(),
        "exits: jumped=10 sjumped=10 short=200 long=5"
    );

    let run = run_tracing("--latency", "pbx_*", &exe, &["10"], &[]).await;
    assert_eq!(
        run.program,
        [untraced.trim()],
        "the program behaves as untraced"
    );
    let rows = run.json["latency"]
        .as_array()
        .unwrap_or_else(|| panic!("no latency rows: {}", run.json));
    let row = |f: &str| {
        rows.iter()
            .find(|r| r["function"] == f)
            .unwrap_or_else(|| panic!("no row for {f}: {}", run.json))
            .clone()
    };
    let n = |r: &serde_json::Value, k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    // Every field the issue names is there.
    for r in rows {
        for k in [
            "calls",
            "total_ns",
            "min_ns",
            "max_ns",
            "p50_ns",
            "p90_ns",
            "p99_ns",
            "abandoned",
        ] {
            n(r, k);
        }
    }
    let short = row("pbx_short");
    let long = row("pbx_long");
    let spin = row("pbx_spin");
    let dive = row("pbx_dive");
    assert_eq!(n(&short, "calls"), 200);
    assert_eq!(n(&long, "calls"), 5);
    assert_eq!(n(&spin, "calls"), 205);
    // Bounds, not exact values: the TSC is converted with a calibrated frequency.
    assert!(n(&short, "min_ns") >= 18_000, "{short}");
    assert!(
        n(&short, "p50_ns") >= 18_000 && n(&short, "p50_ns") < 20_000_000,
        "{short}"
    );
    assert!(n(&long, "min_ns") >= 1_800_000, "{long}");
    assert!(n(&long, "max_ns") < 1_000_000_000, "{long}");
    assert!(n(&short, "min_ns") <= n(&short, "p50_ns"));
    assert!(n(&short, "p50_ns") <= n(&short, "p99_ns"));
    assert!(n(&short, "p99_ns") <= n(&short, "max_ns"));
    assert!(n(&short, "total_ns") >= 200 * n(&short, "min_ns"));
    // longjmp: 10 x 4 frames; siglongjmp: 10 x 3; none returned.
    assert_eq!(n(&dive, "calls"), 0, "{dive}");
    assert_eq!(n(&dive, "entries"), 70, "{dive}");
    assert_eq!(n(&dive, "abandoned"), 70, "{dive}");
    for r in [&short, &long, &spin] {
        assert_eq!(n(r, "abandoned"), 0, "{r}");
        assert_eq!(n(r, "entries"), n(r, "calls"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpp_exceptions_through_hooked_frames_land_in_the_same_handlers() {
    let exe = build("g++", "exits_cpp.cpp", "exits_cpp");
    let untraced = Command::new(&exe).arg("10").output().unwrap();
    let untraced = String::from_utf8_lossy(&untraced.stdout).into_owned();
    assert_eq!(untraced.trim(), "cpp: caught=10 inner=10");

    let run = run_tracing("--latency", "pbx_*", &exe, &["10"], &[]).await;
    assert_eq!(
        run.program,
        [untraced.trim()],
        "the program behaves as untraced"
    );
    let rows = run.json["latency"].as_array().unwrap();
    let row = |f: &str| {
        rows.iter()
            .find(|r| r["function"] == f)
            .unwrap_or_else(|| panic!("no row for {f}: {}", run.json))
            .clone()
    };
    let thrower = row("pbx_thrower");
    let catcher = row("pbx_catcher");
    // 10 x 4 frames unwound to main, 10 x 3 to pbx_catcher: all abandoned. The catcher's
    // own frame got its return address back before the unwind and returns unmeasured:
    // it counts as abandoned too (the unwinder interposition restores every frame).
    assert_eq!(thrower["entries"], 70, "{thrower}");
    assert_eq!(thrower["abandoned"], 70, "{thrower}");
    assert_eq!(thrower["calls"], 0, "{thrower}");
    assert_eq!(catcher["entries"], 10, "{catcher}");
    assert_eq!(catcher["abandoned"], 10, "{catcher}");
}
