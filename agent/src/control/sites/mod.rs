//! Site discovery: which function entries of which loaded objects can be patched, and how.
//!
//! - [`analyze_elf`] is pure: ELF bytes + load bias in, [`FunctionSite`]s out.
//! - [`Discoverer`] walks the objects loaded in this process (`dl_iterate_phdr`), reads
//!   every file once (cached by path, device and inode) and remembers what it has
//!   scanned, so that [`Discoverer::discover_new`] reports only objects loaded since
//!   (after a `dlopen`).
//! - [`filter`] selects sites with a glob over demangled names.
//!
//! Kinds of sites, by how the program was built (see DESIGN.md, "Patching"):
//!
//! | build | bytes at entry | listed in | [`SiteKind`] |
//! | --- | --- | --- | --- |
//! | gcc `-pg -mfentry -mrecord-mcount`, non-PIC | `e8 rel32` (`call __fentry__`) | `__mcount_loc` | `Fentry` |
//! | same, PIC/PIE (gcc 12) | `ff 15 disp32` (`call *__fentry__@GOTPCREL(%rip)`) | `__mcount_loc` | `FentryGot` |
//! | gcc `… -mnop-mcount` | `0f 1f 44 00 00` | `__mcount_loc` | `Nop5` |
//! | clang/rustc `-fpatchable-function-entry=5` | `0f 1f 44 00 xx` | `__patchable_function_entries` | `Nop5` |
//! | gcc `-fpatchable-function-entry=5` | `90 90 90 90 90` | `__patchable_function_entries` | `NopSled` |
//! | nothing | the function's own code | `.symtab`/`.dynsym` (sized `FUNC`), `.eh_frame` | `Relocated` when its prologue can be moved, else `None` with the refusal |

mod ehframe;
mod elf;
mod ffi;

/// Changes whenever an object is loaded or unloaded (see `ffi::load_counts`).
pub fn load_generation() -> (u64, u64) {
    ffi::load_counts()
}
mod process;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use elf::analyze_elf;
pub use process::{Discoverer, LoadedObject, SkippedObject, discover_all};

/// How the reason of an uninstrumented function whose prologue cannot be relocated
/// starts; a [`crate::tramp::relocate::Refusal`] follows.
pub const CANNOT_RELOCATE: &str = "cannot relocate the prologue: ";

/// What is at a function's entry, which decides how it is patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKind {
    /// `e8 rel32`: a direct call to `__fentry__` (or `mcount`). One instruction; it is
    /// turned into a 5-byte nop (`0f 1f 44 00 00`) at agent start, then behaves as
    /// [`SiteKind::Nop5`].
    Fentry,
    /// `ff 15 disp32`: an indirect call to `__fentry__` through the GOT, as gcc 12 emits
    /// for `-pg -mfentry` in position-independent code. One 6-byte instruction; it is
    /// turned into a 5-byte nop followed by a 1-byte nop (`0f 1f 44 00 00 90`) at agent
    /// start, after which the first 5 bytes behave as [`SiteKind::Nop5`] (a call
    /// patched there returns to the 1-byte nop, an instruction boundary).
    FentryGot,
    /// A single 5-byte nop `0f 1f 44 00 xx` (rustc emits `xx = 08`). Patched with the
    /// int3 protocol.
    Nop5,
    /// Five 1-byte nops (gcc `-fpatchable-function-entry=5`). A thread may be stopped
    /// between two of them, so it needs the grace-period-guarded protocol; never patch
    /// it like a [`SiteKind::Nop5`].
    NopSled,
    /// No instrumentation at the entry, and the prologue can be relocated (issue 11):
    /// whole instructions covering at least 5 bytes at `address` (after an `endbr64`)
    /// are moved into the trampoline and replaced by `jmp rel32` to it. `bytes` holds
    /// the replaced bytes as found in the file (their count is the prologue length).
    /// Several instructions are replaced, so it needs the grace-period-guarded protocol.
    Relocated,
    /// No instrumentation at the entry and not relocatable (`reason` says why).
    None,
}

impl SiteKind {
    /// Number of bytes at the site that a patch rewrites (0 for [`SiteKind::None`]).
    pub fn len(self) -> usize {
        match self {
            SiteKind::Fentry | SiteKind::Nop5 | SiteKind::NopSled => 5,
            SiteKind::FentryGot => 6,
            // The jump; the replaced prologue is `FunctionSite::bytes` (>= 5).
            SiteKind::Relocated => 5,
            SiteKind::None => 0,
        }
    }

    /// True for [`SiteKind::None`].
    pub fn is_empty(self) -> bool {
        self == SiteKind::None
    }

    /// Whether replacing the site's bytes needs a grace period after the int3 step
    /// (several instructions are replaced, and a thread may be stopped inside them).
    pub fn needs_grace_period(self) -> bool {
        matches!(
            self,
            SiteKind::NopSled | SiteKind::Relocated | SiteKind::None
        )
    }

    /// Whether the site must be rewritten once at agent start (a call to `__fentry__`
    /// becomes a nop).
    pub fn needs_initial_nop(self) -> bool {
        matches!(self, SiteKind::Fentry | SiteKind::FentryGot)
    }

    /// A short lowercase name for tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Fentry => "fentry",
            SiteKind::FentryGot => "fentry-got",
            SiteKind::Nop5 => "nop5",
            SiteKind::NopSled => "nop-sled",
            SiteKind::Relocated => "relocated",
            SiteKind::None => "none",
        }
    }
}

impl std::fmt::Display for SiteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One function entry of one loaded object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSite {
    /// Demangled name (`crate::module::function`, `ns::f(int)`, `main`). A site with no
    /// symbol is named `<file name>+0x<link-time address>`.
    pub name: String,
    /// The name as in the symbol table (empty when there is no symbol).
    pub mangled: String,
    /// Demangled names of other symbols at the same address (aliases), sorted.
    pub aliases: Vec<String>,
    /// Run-time address of the site: where the patch is written. For
    /// [`SiteKind::None`] it is the function's first byte.
    pub address: u64,
    /// Run-time address of the function symbol (equal to `address`, or 4 less when
    /// the function starts with `endbr64`); equal to `address` when there is no symbol.
    pub function_address: u64,
    /// Size of the function symbol in bytes (0 when unknown).
    pub size: u64,
    /// The object (executable or shared object) the function belongs to.
    pub object: Arc<Path>,
    /// What is at the site.
    pub kind: SiteKind,
    /// The site's bytes as found in the file (`kind.len()` of them); the patcher checks
    /// that memory still holds them before it writes.
    pub bytes: Vec<u8>,
    /// Whether the agent can patch this site today.
    pub patchable: bool,
    /// Why the site is not patchable, or a caveat for one that is (a nop sled).
    pub reason: Option<String>,
    /// For [`SiteKind::Relocated`] (and refused uninstrumented functions): run-time
    /// addresses strictly inside `[function_address, function_address + size)` where
    /// control may arrive other than through the entry (other symbols, `.eh_frame`
    /// starts, exception landing pads, jump-table targets), sorted. The installer passes
    /// them to `tramp::relocate::analyze` again when it reads the code from memory.
    /// Empty for instrumented kinds.
    pub known_targets: Vec<u64>,
}

impl FunctionSite {
    /// All demangled names of the function: `name` then the aliases.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// Errors of site discovery. Every variant names the object concerned.
#[derive(Debug, thiserror::Error)]
pub enum SitesError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid ELF file: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error(
        "{}: unsupported object ({what}); only x86_64 ELF64 executables and shared objects are supported",
        path.display()
    )]
    Unsupported { path: PathBuf, what: String },
    #[error(
        "{}: the file on disk is not the one loaded in memory ({what}); it was replaced or deleted since it was loaded — restart the program to trace it",
        path.display()
    )]
    Replaced { path: PathBuf, what: String },
    #[error("object loaded at {bias:#x} has no file-backed mapping (vdso or anonymous memory)")]
    NotFileBacked { bias: u64 },
    #[error("cannot find the main executable of this process: {0}")]
    MainExecutable(String),
}

/// A malformed glob pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid function pattern {pattern:?}: {message} at character {position}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// Zero-based position of the error in the pattern.
    pub position: usize,
    /// What is wrong.
    pub message: String,
}

/// Compiles a glob pattern over demangled names (`*`, `?`, `[…]`, `[!…]`; `*` also
/// matches `::` and `/`). `**` is only accepted as a whole pattern or between `/`s, as
/// in the glob crate.
pub fn compile_pattern(pattern: &str) -> Result<glob::Pattern, PatternError> {
    glob::Pattern::new(pattern).map_err(|e| PatternError {
        pattern: pattern.to_owned(),
        position: e.pos,
        message: e.msg.to_owned(),
    })
}

/// The sites whose demangled name (or one of its aliases) matches the glob `pattern`.
/// Non-patchable sites are returned too; callers decide what to do with them.
pub fn filter<'a>(
    sites: &'a [FunctionSite],
    pattern: &str,
) -> Result<Vec<&'a FunctionSite>, PatternError> {
    let pat = compile_pattern(pattern)?;
    Ok(sites
        .iter()
        .filter(|s| s.names().any(|n| pat.matches(n)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, aliases: &[&str]) -> FunctionSite {
        FunctionSite {
            name: name.into(),
            mangled: name.into(),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
            address: 0x1000,
            function_address: 0x1000,
            size: 16,
            object: Arc::from(Path::new("/bin/x")),
            kind: SiteKind::Nop5,
            bytes: vec![0x0f, 0x1f, 0x44, 0x00, 0x00],
            patchable: true,
            reason: None,
            known_targets: Vec::new(),
        }
    }

    #[test]
    fn filter_matches_names_and_aliases() {
        let sites = vec![
            site("sqlite3_open", &[]),
            site("sqlite3_close", &[]),
            site("__libc_malloc", &["malloc"]),
            site("fixture::module::function", &[]),
        ];
        let names = |v: Vec<&FunctionSite>| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(filter(&sites, "sqlite3*").unwrap()),
            ["sqlite3_open", "sqlite3_close"]
        );
        assert_eq!(names(filter(&sites, "malloc").unwrap()), ["__libc_malloc"]);
        assert_eq!(
            names(filter(&sites, "fixture::*").unwrap()),
            ["fixture::module::function"]
        );
        assert!(filter(&sites, "nothing*").unwrap().is_empty());
    }

    #[test]
    fn malformed_pattern_is_a_precise_error() {
        let err = filter(&[], "foo[").unwrap_err();
        assert_eq!(err.pattern, "foo[");
        assert_eq!(err.position, 3);
        assert!(err.to_string().contains("foo["), "{err}");
        let err = filter(&[], "a***b").unwrap_err();
        assert_eq!(err.position, 3, "{err}");
    }

    /// The installer re-runs the analysis on the code in memory with the listed known
    /// targets: for every relocated function of this process (libc, the test binary),
    /// it must reach the same prologue.
    #[test]
    fn relocated_sites_analyze_the_same_from_memory() {
        let sites = discover_all().expect("discover");
        let mut relocated = 0;
        for s in sites.iter().filter(|s| s.kind == SiteKind::Relocated) {
            // SAFETY: the function's bytes are mapped code of a loaded object for the
            // whole test (nothing is unloaded), read only.
            let code = unsafe {
                std::slice::from_raw_parts(s.function_address as *const u8, s.size as usize)
            };
            let p = crate::tramp::relocate::analyze(code, s.function_address, &s.known_targets)
                .unwrap_or_else(|r| panic!("{}: {r}", s.name));
            assert_eq!(p.patch_at, s.address, "{}", s.name);
            assert_eq!(p.len as usize, s.bytes.len(), "{}", s.name);
            assert_eq!(
                &code[(s.address - s.function_address) as usize..][..s.bytes.len()],
                s.bytes
            );
            assert!(
                s.known_targets
                    .iter()
                    .all(|&t| t > s.function_address && t < s.function_address + s.size)
            );
            relocated += 1;
        }
        assert!(relocated > 3000, "{relocated}");
    }

    #[test]
    fn kinds() {
        assert_eq!(SiteKind::Fentry.len(), 5);
        assert_eq!(SiteKind::FentryGot.len(), 6);
        assert!(SiteKind::NopSled.needs_grace_period());
        assert!(!SiteKind::Nop5.needs_grace_period());
        assert!(SiteKind::Fentry.needs_initial_nop());
        assert_eq!(SiteKind::NopSled.to_string(), "nop-sled");
    }
}
