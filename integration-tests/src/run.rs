//! `patchbay --json run --count PATTERN -- PROGRAM ARGS` end to end, with the embedded
//! server (no server answers on the private socket it is pointed at), and what such a run
//! prints: the final JSON document and the program's own output lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use crate::bins;

/// What a finished `patchbay --json run` printed.
pub struct RunOutput {
    /// The final `--json` document (`pid`, `status`, `counts`, `total`, …).
    pub json: serde_json::Value,
    /// Every other line of standard output: the program's own.
    pub program: Vec<String>,
    /// How `patchbay` exited.
    pub status: std::process::ExitStatus,
    /// Its standard error.
    pub stderr: String,
}

impl RunOutput {
    /// `function -> count` of the document's `counts` (every function, not only the top).
    pub fn counted(&self) -> BTreeMap<String, u64> {
        self.json["counts"]
            .as_array()
            .unwrap_or_else(|| panic!("no counts: {}", self.json))
            .iter()
            .map(|c| {
                (
                    c["function"].as_str().unwrap().to_owned(),
                    c["count"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// The `name=count` pairs of the demo program's `hotloop: calls …` line.
    pub fn hotloop_counts(&self) -> BTreeMap<String, u64> {
        self.program
            .iter()
            .find_map(|l| l.strip_prefix("hotloop: calls "))
            .unwrap_or_else(|| panic!("no counts from the program: {:?}", self.program))
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }
}

/// Runs `patchbay --json run --count PATTERN --agent <this build's agent> -- PROGRAM
/// ARGS` with `envs` set, on a private runtime directory where no server answers (so the
/// CLI starts its embedded one); panics with both outputs unless it succeeds.
pub async fn run_counting(
    pattern: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> RunOutput {
    run_tracing("--count", pattern, program, args, envs).await
}

/// [`run_counting`] with another tracer flag of `patchbay run` (`--count`, `--latency`).
pub async fn run_tracing(
    flag: &str,
    pattern: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> RunOutput {
    let out = run_full(&[], flag, pattern, program, args, envs).await;
    assert!(
        out.status.success() && !out.json.is_null(),
        "patchbay run failed: {}\n{:?}",
        out.stderr,
        out.program
    );
    out
}

/// Like [`run_counting`] with more `run` flags (`--no-follow`, `--per-process`), and
/// whatever the outcome: `json` is `Null` when no document was printed.
pub async fn run_with(
    flags: &[&str],
    pattern: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> RunOutput {
    run_full(flags, "--count", pattern, program, args, envs).await
}

/// `patchbay --json run FLAGS TRACER_FLAG PATTERN --agent … -- PROGRAM ARGS`, whatever the
/// outcome.
async fn run_full(
    flags: &[&str],
    tracer_flag: &str,
    pattern: &str,
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> RunOutput {
    let dir = tempfile::tempdir().unwrap();
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let o = tokio::process::Command::new(bins::patchbay())
        .args(["--json", "run"])
        .args(flags)
        .args([tracer_flag, pattern, "--agent"])
        .arg(bins::agent_lib())
        .arg("--")
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .env("XDG_RUNTIME_DIR", &xdg)
        .env("PATCHBAY_SOCKET", dir.path().join("none.sock"))
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let json_line = out.lines().rfind(|l| l.starts_with("{\""));
    RunOutput {
        json: json_line
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap_or(serde_json::Value::Null),
        program: out
            .lines()
            .filter(|l| Some(*l) != json_line)
            .map(str::to_owned)
            .collect(),
        status: o.status,
        stderr,
    }
}
