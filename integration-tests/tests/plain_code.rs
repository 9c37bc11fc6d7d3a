//! Code built without any instrumentation (issue 11): `patchbay run` relocates function
//! prologues, in the program and in every library it loads, libc included.
//!
//! - the demo program built with plain `gcc -O2`: every call of its own functions and of
//!   a libc function (`strtoul`: twice per parsed record, once per argument) counted
//!   exactly, from `main` on, with `--count '*'` patching everything patchable (libc's
//!   3,000-odd relocatable functions included);
//! - `/bin/ls -la /usr` (stripped: its own functions are known from `.eh_frame` only)
//!   under `--count '*'` prints exactly what it prints untraced.

use std::path::{Path, PathBuf};

use integration_tests::fixtures;
use integration_tests::run::run_counting;

/// `demo/hotloop.c` built with plain `gcc -O2` (no `-pg`, no patchable entries) into
/// this test's cache directory.
fn plain_demo() -> PathBuf {
    let out = fixtures::cache_dir().join("plain-demo");
    std::fs::create_dir_all(&out).unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../demo/hotloop.c");
    let exe = out.join("hotloop-plain");
    let tmp = out.join("hotloop-plain.tmp");
    let o = std::process::Command::new("gcc")
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("run gcc");
    assert!(
        o.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::rename(&tmp, &exe).unwrap();
    exe
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_build_and_its_libc_are_counted_exactly() {
    let demo = plain_demo();
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
    // Held before main: main is counted once, and libc's strtoul exactly as often as
    // the program calls it: twice per parsed record (its `id=` and `value=` fields, every
    // line of hotloop.c's LINES has both) and once per command-line argument (2).
    assert_eq!(counted.get("main"), Some(&1), "{counted:?}");
    assert_eq!(
        counted.get("strtoul").copied(),
        Some(2 * own["parse_record"] + 2),
        "strtoul"
    );
    assert_eq!(run.json["status"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_under_count_star_prints_what_it_prints_untraced() {
    let ls = Path::new("/bin/ls");
    let args = ["-la", "/usr"];
    let plain = std::process::Command::new(ls)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(plain.status.success());
    // The same environment for the traced run (ls sorts by locale).
    let run = run_counting("*", ls, &args, &[("LC_ALL", "C")]).await;
    let untraced: Vec<String> = String::from_utf8_lossy(&plain.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        run.program, untraced,
        "ls printed something else when traced"
    );
    let counted = run.counted();
    // ls's own functions (no symbols: named from .eh_frame) and libc's were patched and
    // called.
    assert!(
        counted.keys().any(|f| f.starts_with("ls+0x")),
        "no function of ls itself counted: {counted:?}"
    );
    assert!(counted.get("malloc").is_some_and(|&n| n > 0), "{counted:?}");
    assert_eq!(run.json["status"], 0);
}
