//! Locates the workspace binaries (`patchbayd`, `patchbay`, `script-agent`) and the
//! agent library (`libpatchbay_agent.so`), building them once per test process with the
//! test executable's profile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The server binary.
pub const PATCHBAYD: &str = "patchbayd";
/// The CLI binary.
pub const PATCHBAY: &str = "patchbay";
/// One raw Control call as a process (to run it as another uid).
pub const CONTROL_PROBE: &str = "control-probe";
/// The scripted agent of this crate.
pub const SCRIPT_AGENT: &str = "script-agent";

/// `target/<profile>` of the running test executable (`target/<profile>/deps/<test>`
/// for integration tests, `target/<profile>/<bin>` for binaries).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

fn build_once() -> &'static Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = profile_dir();
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args([
                "-p",
                "patchbay-server",
                "-p",
                "patchbay-cli",
                "-p",
                "integration-tests",
                "-p",
                "patchbay-agent",
            ])
            .args(["--bins", "--lib"]);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        // Build into the same target directory as the running test.
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        eprintln!("integration-tests: building binaries: {cmd:?}");
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("{cmd:?} failed: {s}")),
            Err(e) => Err(format!("cannot run {cmd:?}: {e}")),
        }
    })
}

/// Path of workspace binary `name`. The first call in a test process runs `cargo
/// build` for the binaries (a quick no-op when they are up to date), so tests never run
/// stale binaries.
pub fn bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    if let Err(e) = build_once() {
        panic!(
            "binary {name} not found at {} and building it failed: {e}",
            path.display()
        );
    }
    if path.is_file() {
        return path;
    }
    panic!(
        "binary {name} not found at {} even after `cargo build -p patchbay-server -p patchbay-cli -p integration-tests -p patchbay-agent --bins --lib`",
        path.display()
    );
}

/// File name of the agent's preloadable library.
pub const AGENT_LIB: &str = "libpatchbay_agent.so";

/// Path of the agent cdylib, `target/<profile>/libpatchbay_agent.so` (built like the
/// binaries, once per test process).
pub fn agent_lib() -> PathBuf {
    bin(AGENT_LIB)
}

/// Path of `control-probe`.
pub fn control_probe() -> PathBuf {
    bin(CONTROL_PROBE)
}

/// Path of `patchbayd`.
pub fn patchbayd() -> PathBuf {
    bin(PATCHBAYD)
}

/// Path of the `patchbay` CLI.
pub fn patchbay() -> PathBuf {
    bin(PATCHBAY)
}

/// Path of `script-agent`.
pub fn script_agent() -> PathBuf {
    bin(SCRIPT_AGENT)
}
