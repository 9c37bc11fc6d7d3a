//! Launching the program: where the agent library is, the environment that preloads it,
//! and what the program's exit status means.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use anyhow::bail;

/// The file name of the agent library.
pub const AGENT_FILE: &str = "libpatchbay_agent.so";

/// Where packages install the agent library (`/usr/lib/patchbay/`).
pub const SYSTEM_AGENT_DIR: &str = "/usr/lib/patchbay";

/// Where the agent library is looked for when neither `--agent` nor `PATCHBAY_AGENT` names
/// it, in this order: next to the `patchbay` executable (a cargo target directory), in
/// `../lib/patchbay/` of the executable's directory (an installation prefix), in
/// `~/.local/lib/patchbay/` (a user install), in `/usr/lib/patchbay/` (the package).
pub fn agent_candidates(exe: Option<&Path>, home: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        dirs.push(dir.to_path_buf());
        if let Some(prefix) = dir.parent() {
            dirs.push(prefix.join("lib").join("patchbay"));
        }
    }
    if let Some(home) = home.filter(|h| h.is_absolute()) {
        dirs.push(home.join(".local").join("lib").join("patchbay"));
    }
    dirs.push(PathBuf::from(SYSTEM_AGENT_DIR));
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        let file = dir.join(AGENT_FILE);
        if !candidates.contains(&file) {
            candidates.push(file);
        }
    }
    candidates
}

/// The agent library to preload: `explicit` (from `--agent` or `PATCHBAY_AGENT`), else the
/// first of [`agent_candidates`] (of the running executable `exe` and the home directory
/// `home`) that `is_file`.
pub fn find_agent(
    explicit: Option<&Path>,
    exe: Option<&Path>,
    home: Option<&Path>,
    is_file: impl Fn(&Path) -> bool,
) -> anyhow::Result<PathBuf> {
    let found = match explicit {
        Some(path) => {
            if !is_file(path) {
                bail!(
                    "the agent library {} (from --agent or PATCHBAY_AGENT) does not exist: \
                     build it with `cargo build -p patchbay-agent` or fix the path",
                    path.display()
                );
            }
            path.to_path_buf()
        }
        None => {
            let candidates = agent_candidates(exe, home);
            match candidates.iter().find(|c| is_file(c)) {
                Some(found) => found.clone(),
                None => {
                    let looked: Vec<String> =
                        candidates.iter().map(|c| c.display().to_string()).collect();
                    bail!(
                        "cannot find {AGENT_FILE}: install the patchbay package, or build it \
                         with `cargo build --release -p patchbay-agent` and copy it to \
                         ~/.local/lib/patchbay/, or pass --agent PATH (looked for {})",
                        looked.join(", ")
                    );
                }
            }
        }
    };
    check_preloadable(&found)?;
    Ok(found)
}

/// `LD_PRELOAD` separates entries with colons and spaces, so a path containing either
/// cannot be preloaded.
fn check_preloadable(path: &Path) -> anyhow::Result<()> {
    if path
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| *b == b':' || *b == b' ')
    {
        bail!(
            "the agent library path {} contains a space or a colon, which LD_PRELOAD cannot \
             express: copy or link the library to another path and pass --agent",
            path.display()
        );
    }
    Ok(())
}

/// The program's `LD_PRELOAD`: the agent first, then what was already preloaded.
pub fn ld_preload(agent: &Path, existing: Option<&OsStr>) -> OsString {
    let mut value = agent.as_os_str().to_os_string();
    if let Some(existing) = existing.filter(|e| !e.as_bytes().iter().all(u8::is_ascii_whitespace)) {
        value.push(":");
        value.push(existing);
    }
    value
}

/// How the program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Unknown (waiting for it failed).
    Unknown,
}

impl Exit {
    pub fn from_status(status: ExitStatus) -> Exit {
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(signal)) => Exit::Signal(signal),
            (None, None) => Exit::Unknown,
        }
    }

    /// The exit status of `patchbay run`: the program's own, or 128 + the signal that
    /// killed it (as shells report it); 1 when unknown.
    pub fn code(self) -> u8 {
        match self {
            Exit::Code(code) => (code & 0xff) as u8,
            Exit::Signal(signal) => u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(255),
            Exit::Unknown => 1,
        }
    }

    /// The exit status when tracing failed: the program's own when it is an error, else 1.
    pub fn failure_code(self) -> u8 {
        match self.code() {
            0 => 1,
            code => code,
        }
    }

    /// The signal that killed the program, if any.
    pub fn signal(self) -> Option<i32> {
        match self {
            Exit::Signal(signal) => Some(signal),
            _ => None,
        }
    }

    /// `status 3`, `signal 9 (SIGKILL)`, `an unknown status`.
    pub fn describe(self) -> String {
        match self {
            Exit::Code(code) => format!("status {code}"),
            Exit::Signal(signal) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(name) => format!("signal {signal} ({})", name.as_str()),
                Err(_) => format!("signal {signal}"),
            },
            Exit::Unknown => "an unknown status".to_owned(),
        }
    }

    /// `exited with status 3`, `was killed by signal 9 (SIGKILL)`.
    pub fn sentence(self) -> String {
        match self {
            Exit::Signal(_) => format!("was killed by {}", self.describe()),
            _ => format!("exited with {}", self.describe()),
        }
    }
}

/// A duration in whole milliseconds as seconds for people: `10 s`, `0.2 s`, `1.25 s`.
pub fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        let text = format!("{:.3}", ms as f64 / 1000.0);
        format!("{} s", text.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn exists(paths: &[&str]) -> impl Fn(&Path) -> bool {
        let set: HashSet<PathBuf> = paths.iter().map(PathBuf::from).collect();
        move |p: &Path| set.contains(p)
    }

    #[test]
    fn agent_lookup_order() {
        let exe = Path::new("/opt/pb/bin/patchbay");
        let home = Path::new("/home/u");
        let next_to = "/opt/pb/bin/libpatchbay_agent.so";
        let lib = "/opt/pb/lib/patchbay/libpatchbay_agent.so";
        let user = "/home/u/.local/lib/patchbay/libpatchbay_agent.so";
        let system = "/usr/lib/patchbay/libpatchbay_agent.so";
        let explicit = Path::new("/x/libpatchbay_agent.so");
        let all = [explicit.to_str().unwrap(), next_to, lib, user, system];

        // --agent / PATCHBAY_AGENT wins over everything.
        let found = find_agent(Some(explicit), Some(exe), Some(home), exists(&all)).unwrap();
        assert_eq!(found, explicit);
        // Then next to the executable, ../lib/patchbay/, ~/.local/lib/patchbay/,
        // /usr/lib/patchbay/.
        for (i, want) in [next_to, lib, user, system].iter().enumerate() {
            let found = find_agent(None, Some(exe), Some(home), exists(&all[1 + i..])).unwrap();
            assert_eq!(found, Path::new(want));
        }
        // The package's /usr/bin/patchbay: ../lib/patchbay is /usr/lib/patchbay, listed once.
        assert_eq!(
            agent_candidates(Some(Path::new("/usr/bin/patchbay")), None),
            [
                PathBuf::from("/usr/bin/libpatchbay_agent.so"),
                PathBuf::from(system)
            ]
        );
        // A relative $HOME is ignored.
        assert_eq!(
            agent_candidates(None, Some(Path::new("rel"))),
            [PathBuf::from(system)]
        );
    }

    #[test]
    fn agent_lookup_errors_say_what_to_do() {
        let exe = Path::new("/opt/pb/bin/patchbay");
        let err = find_agent(None, Some(exe), Some(Path::new("/h")), exists(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot find libpatchbay_agent.so: install the patchbay package, or build it with \
             `cargo build --release -p patchbay-agent` and copy it to ~/.local/lib/patchbay/, \
             or pass --agent PATH (looked for /opt/pb/bin/libpatchbay_agent.so, \
             /opt/pb/lib/patchbay/libpatchbay_agent.so, \
             /h/.local/lib/patchbay/libpatchbay_agent.so, /usr/lib/patchbay/libpatchbay_agent.so)"
        );
        let err = find_agent(None, None, None, exists(&[])).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("(looked for /usr/lib/patchbay/libpatchbay_agent.so)"),
            "{err}"
        );
        // An explicit path that is missing is an error, not a reason to look elsewhere.
        let err = find_agent(
            Some(Path::new("/nonexistent.so")),
            Some(exe),
            None,
            exists(&["/opt/pb/bin/libpatchbay_agent.so"]),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "the agent library /nonexistent.so (from --agent or PATCHBAY_AGENT) does not exist"
            ),
            "{err}"
        );
        for bad in ["/a b/libpatchbay_agent.so", "/a:b/libpatchbay_agent.so"] {
            let err = find_agent(Some(Path::new(bad)), None, None, exists(&[bad])).unwrap_err();
            assert!(err.to_string().contains("LD_PRELOAD cannot"), "{err}");
        }
    }

    #[test]
    fn ld_preload_puts_the_agent_first() {
        let agent = Path::new("/t/libpatchbay_agent.so");
        assert_eq!(ld_preload(agent, None), "/t/libpatchbay_agent.so");
        assert_eq!(
            ld_preload(agent, Some(OsStr::new(""))),
            "/t/libpatchbay_agent.so"
        );
        assert_eq!(
            ld_preload(agent, Some(OsStr::new("  "))),
            "/t/libpatchbay_agent.so"
        );
        assert_eq!(
            ld_preload(agent, Some(OsStr::new("libasan.so:/x/y.so"))),
            "/t/libpatchbay_agent.so:libasan.so:/x/y.so"
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(Exit::Code(0).code(), 0);
        assert_eq!(Exit::Code(3).code(), 3);
        assert_eq!(Exit::Code(255).code(), 255);
        assert_eq!(Exit::Signal(2).code(), 130);
        assert_eq!(Exit::Signal(9).code(), 137);
        assert_eq!(Exit::Signal(15).code(), 143);
        assert_eq!(Exit::Unknown.code(), 1);
        assert_eq!(Exit::Code(0).failure_code(), 1);
        assert_eq!(Exit::Code(3).failure_code(), 3);
        assert_eq!(Exit::Signal(9).failure_code(), 137);
        assert_eq!(Exit::Signal(9).signal(), Some(9));
        assert_eq!(Exit::Code(9).signal(), None);
    }

    #[test]
    fn exits_are_described() {
        assert_eq!(Exit::Code(3).describe(), "status 3");
        assert_eq!(Exit::Signal(9).describe(), "signal 9 (SIGKILL)");
        assert_eq!(Exit::Signal(99).describe(), "signal 99");
        assert_eq!(Exit::Code(0).sentence(), "exited with status 0");
        assert_eq!(
            Exit::Signal(11).sentence(),
            "was killed by signal 11 (SIGSEGV)"
        );
    }

    #[test]
    fn statuses_map_to_exits() {
        // Wait statuses as the kernel encodes them.
        assert_eq!(
            Exit::from_status(ExitStatus::from_raw(3 << 8)),
            Exit::Code(3)
        );
        assert_eq!(Exit::from_status(ExitStatus::from_raw(9)), Exit::Signal(9));
    }

    #[test]
    fn seconds_for_people() {
        assert_eq!(seconds(10_000), "10 s");
        assert_eq!(seconds(0), "0 s");
        assert_eq!(seconds(200), "0.2 s");
        assert_eq!(seconds(1250), "1.25 s");
        assert_eq!(seconds(1), "0.001 s");
    }
}
