//! The torture test (`src/bin/torture`) in its short mode, and proof that it catches a
//! real bug: with patchbayd's test-only fault switch `--fault-skip-grace-period`
//! (retired trampolines freed without a grace period) the same run must fail with a
//! premature free detected (a thread executed the int3 poison of a freed trampoline)
//! or a crash, while without it the run passes every check.
//!
//! The two tests run one at a time (each keeps 16 busy threads on the 2 cores).

use std::process::Command;
use std::time::Instant;

use integration_tests::bins;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Run {
    success: bool,
    report: serde_json::Value,
    output: String,
}

fn torture(args: &[&str]) -> Run {
    let exe = bins::bin("torture");
    let t0 = Instant::now();
    let out = Command::new(&exe)
        .args(args)
        .env_remove("PATCHBAY_SOCKET")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    let output = format!(
        "$ torture {}  ({:.1} s, {})\n--- stdout ---\n{}--- stderr ---\n{}",
        args.join(" "),
        t0.elapsed().as_secs_f64(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{output}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TORTURE-REPORT "))
        .unwrap_or_else(|| panic!("no TORTURE-REPORT line\n{output}"));
    let report = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("TORTURE-REPORT is not JSON ({e})\n{output}"));
    Run {
        success: out.status.success(),
        report,
        output,
    }
}

fn num(r: &serde_json::Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report has no number {key}: {r}"))
}

#[test]
fn short_torture_passes_every_check() {
    short_torture(&[]);
}

/// The same on a target built without instrumentation: relocated prologues.
#[test]
fn short_torture_of_plain_code_passes_every_check() {
    short_torture(&["--plain"]);
}

fn short_torture(extra: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec![
        "--threads",
        "16",
        "--functions",
        "200",
        "--seconds",
        "10",
        "--assert",
    ];
    args.extend_from_slice(extra);
    let run = torture(&args);
    let r = &run.report;
    assert!(run.success, "the torture failed:\n{}", run.output);
    assert_eq!(num(r, "premature_frees"), 0, "{}", run.output);
    assert_eq!(num(r, "crashes"), 0, "{}", run.output);
    assert_eq!(num(r, "leftover_trampolines_server"), 0, "{}", run.output);
    assert_eq!(num(r, "leftover_trampolines_agent"), 0, "{}", run.output);
    assert_eq!(num(r, "leftover_slots_agent"), 0, "{}", run.output);
    assert!(num(r, "cycles") >= 1, "{}", run.output);
    assert!(num(r, "trampolines_freed") >= 10, "{}", run.output);
    assert!(num(r, "count_calls_checked") > 0, "{}", run.output);
    assert!(num(r, "tally_calls_checked") > 0, "{}", run.output);
    assert_eq!(
        num(r, "trampolines_installed"),
        num(r, "trampolines_freed"),
        "{}",
        run.output
    );
}

#[test]
fn torture_catches_freeing_without_grace_period() {
    fault_caught(&[]);
}

/// The fault switch must make the plain (relocated prologues) mode fail too: the
/// relocated copy lives in the trampoline, so a premature free is executed poison.
#[test]
fn torture_of_plain_code_catches_freeing_without_grace_period() {
    fault_caught(&["--plain"]);
}

fn fault_caught(extra: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec![
        "--threads",
        "16",
        "--functions",
        "200",
        "--seconds",
        "20",
        "--assert",
        "--fault-skip-grace-period",
    ];
    args.extend_from_slice(extra);
    let run = torture(&args);
    let r = &run.report;
    assert!(
        !run.success,
        "the torture passed although patchbayd freed trampolines without grace periods:\n{}",
        run.output
    );
    assert!(
        num(r, "premature_frees") > 0 || num(r, "crashes") > 0,
        "the run failed, but not by a premature free or a crash:\n{}",
        run.output
    );
}
