//! Code built without any instrumentation (issue 11): `patchbay run` relocates function
//! prologues, in the program and in every library it loads, libc included.
//!
//! - the demo program built with plain `gcc -O2`: every call of its own functions and of
//!   a libc function (`strtoul`: twice per parsed record, once per argument) counted
//!   exactly, from `main` on, with `--count '*'` patching everything patchable (libc's
//!   3,000-odd relocatable functions included);
//! - `/bin/ls -la /usr` (stripped: its own functions are known from `.eh_frame` only)
//!   under `--count '*'` prints exactly what it prints untraced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use integration_tests::{bins, fixtures};

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

/// `patchbay --json run --count PATTERN -- PROGRAM ARGS` with the embedded server.
async fn run_counting(pattern: &str, program: &Path, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    tokio::process::Command::new(bins::patchbay())
        .args(["--json", "run", "--count", pattern, "--agent"])
        .arg(bins::agent_lib())
        .arg("--")
        .arg(program)
        .args(args)
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("PATCHBAY_SOCKET", dir.path().join("none.sock"))
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// The final JSON line of `patchbay --json run` and the program's own output lines.
fn split(o: &Output) -> (serde_json::Value, Vec<String>) {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "patchbay run failed: {err}\n{out}");
    let json_line = out
        .lines()
        .rfind(|l| l.starts_with("{\""))
        .unwrap_or_else(|| panic!("no JSON: {out}\n{err}"));
    let json = serde_json::from_str(json_line).unwrap();
    let program = out
        .lines()
        .filter(|l| *l != json_line)
        .map(str::to_owned)
        .collect();
    (json, program)
}

fn counted(json: &serde_json::Value) -> BTreeMap<String, u64> {
    json["counts"]
        .as_array()
        .unwrap_or_else(|| panic!("no counts: {json}"))
        .iter()
        .map(|c| {
            (
                c["function"].as_str().unwrap().to_owned(),
                c["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_build_and_its_libc_are_counted_exactly() {
    let demo = plain_demo();
    let o = run_counting("*", &demo, &["20000", "0"]).await;
    let (json, program) = split(&o);
    let own: BTreeMap<String, u64> = program
        .iter()
        .find_map(|l| l.strip_prefix("hotloop: calls "))
        .unwrap_or_else(|| panic!("no counts from the program: {program:?}"))
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect();
    let counted = counted(&json);
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
    assert_eq!(json["status"], 0);
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
    let o = {
        // The same environment for the traced run (ls sorts by locale).
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().join("xdg");
        std::fs::create_dir(&xdg).unwrap();
        std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        tokio::process::Command::new(bins::patchbay())
            .args(["--json", "run", "--count", "*", "--agent"])
            .arg(bins::agent_lib())
            .arg("--")
            .arg(ls)
            .args(args)
            .env("LC_ALL", "C")
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("PATCHBAY_SOCKET", dir.path().join("none.sock"))
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .unwrap()
    };
    let (json, program) = split(&o);
    let untraced: Vec<String> = String::from_utf8_lossy(&plain.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(program, untraced, "ls printed something else when traced");
    let counted = counted(&json);
    // ls's own functions (no symbols: named from .eh_frame) and libc's were patched and
    // called.
    assert!(
        counted.keys().any(|f| f.starts_with("ls+0x")),
        "no function of ls itself counted: {counted:?}"
    );
    assert!(counted.get("malloc").is_some_and(|&n| n > 0), "{counted:?}");
    assert_eq!(json["status"], 0);
}
