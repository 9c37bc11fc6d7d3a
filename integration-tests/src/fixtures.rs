//! Traced programs built by the test crate itself: the C program
//! `integration-tests/fixtures/target.c` in several instrumentation modes and the Rust
//! program `integration-tests/fixtures/rtarget.rs`, compiled once per test process (the
//! sources may change between runs) into a cache directory of the test executable under
//! `target/tmp` (cargo's `CARGO_TARGET_TMPDIR`).
//!
//! Both programs speak the same line protocol on stdin/stdout; see the header of
//! `target.c` and [`crate::target::Target`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::bins;

/// How a fixture is built, i.e. what the agent finds at each function entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Build {
    /// gcc `-O2 -pg -mfentry -mrecord-mcount -mnop-mcount -fno-pie -no-pie`: a 5-byte
    /// nop (`0f 1f 44 00 00`) at every entry, listed in `__mcount_loc`.
    Nop5,
    /// gcc `-O2 -pg -mfentry -mrecord-mcount -fno-pie -no-pie`: `call __fentry__`
    /// (`e8 rel32`) at every entry; the agent turns them into nops at start.
    FentryCall,
    /// gcc `-O2 -fpatchable-function-entry=5 -fno-pie -no-pie`: five 1-byte nops, which
    /// the agent must refuse to patch like a 5-byte nop.
    NopSled,
    /// gcc `-O2 -pg -mfentry -mrecord-mcount`, PIE (the default), linked with
    /// `-Wl,-z,notext`: `call *__fentry__@GOTPCREL(%rip)` (`ff 15 disp32`, 6 bytes).
    PieGot,
    /// `RUSTC_BOOTSTRAP=1 rustc -O -Z patchable-function-entry=5`: one 5-byte nop
    /// (`0f 1f 44 00 08`) per function, listed in `__patchable_function_entries`.
    Rust,
}

impl Build {
    /// Every build mode.
    pub const ALL: [Build; 5] = [
        Build::Nop5,
        Build::FentryCall,
        Build::NopSled,
        Build::PieGot,
        Build::Rust,
    ];

    /// File name of the built program.
    pub fn file_name(self) -> &'static str {
        match self {
            Build::Nop5 => "target-nop5",
            Build::FentryCall => "target-fentry",
            Build::NopSled => "target-nopsled",
            Build::PieGot => "target-pie-got",
            Build::Rust => "rtarget",
        }
    }

    /// Compiler flags (gcc: for the compile step; the link step never gets `-pg`,
    /// which would start gprof via gcrt1).
    pub fn cflags(self) -> &'static [&'static str] {
        match self {
            Build::Nop5 => &[
                "-O2",
                "-pg",
                "-mfentry",
                "-mrecord-mcount",
                "-mnop-mcount",
                "-fno-pie",
            ],
            Build::FentryCall => &["-O2", "-pg", "-mfentry", "-mrecord-mcount", "-fno-pie"],
            Build::NopSled => &["-O2", "-fpatchable-function-entry=5", "-fno-pie"],
            Build::PieGot => &["-O2", "-pg", "-mfentry", "-mrecord-mcount"],
            Build::Rust => &[
                "-O",
                "-Z",
                "patchable-function-entry=5",
                "--edition",
                "2024",
            ],
        }
    }

    /// gcc link flags (before the object; `-lpthread` is always added after it).
    pub fn ldflags(self) -> &'static [&'static str] {
        match self {
            Build::Nop5 | Build::FentryCall | Build::NopSled => &["-no-pie"],
            Build::PieGot => &["-Wl,-z,notext"],
            Build::Rust => &[],
        }
    }

    /// Demangled name of the fixture's `work` function (what patterns match).
    pub fn work(self) -> &'static str {
        match self {
            Build::Rust => "rtarget::traced::work",
            _ => "work",
        }
    }

    /// Demangled name of the fixture's `other` function.
    pub fn other(self) -> &'static str {
        match self {
            Build::Rust => "rtarget::traced::other",
            _ => "other",
        }
    }
}

/// Source directory of the fixtures.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The cache directory of this test executable: `target/tmp/patchbay-fixtures/<exe>`
/// (`target/tmp` is cargo's `CARGO_TARGET_TMPDIR`, which only test code can read with
/// `env!`; it is derived here from the running executable's location).
pub fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into());
    bins::profile_dir()
        .parent()
        .expect("the profile directory has a parent (the target directory)")
        .join("tmp")
        .join("patchbay-fixtures")
        .join(name)
}

/// Path of the fixture built in `mode`, compiling it on the first call in this
/// process. Panics with the compiler's output when the build fails.
pub fn fixture(mode: Build) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<Build, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    // Builds are serialized: parallel tests wanting the same mode wait for one build.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&mode) {
        return p.clone();
    }
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create fixture cache {}: {e}", dir.display()));
    let out = dir.join(mode.file_name());
    match mode {
        Build::Rust => build_rust(mode, &out),
        _ => build_c(mode, &dir, &out),
    }
    built.insert(mode, out.clone());
    out
}

fn run(mut cmd: Command, what: &str) {
    let shown = format!("{cmd:?}");
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run the compiler for fixture {what} ({e}): is it installed? command: {shown}"
        )
    });
    if !output.status.success() {
        panic!(
            "building fixture {what} failed ({}):\n$ {shown}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn build_c(mode: Build, dir: &Path, out: &Path) {
    let src = source_dir().join("target.c");
    let obj = dir.join(format!("{}.o", mode.file_name()));
    let tmp = dir.join(format!("{}.tmp", mode.file_name()));
    let mut cc = Command::new("gcc");
    cc.args(mode.cflags())
        .args(["-Wall", "-Wextra", "-Werror", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj);
    run(cc, &format!("{mode:?} (compile {})", src.display()));
    let mut ld = Command::new("gcc");
    ld.args(mode.ldflags())
        .arg(&obj)
        .arg("-o")
        .arg(&tmp)
        .arg("-lpthread");
    run(ld, &format!("{mode:?} (link)"));
    std::fs::rename(&tmp, out)
        .unwrap_or_else(|e| panic!("cannot move {} to {}: {e}", tmp.display(), out.display()));
}

fn build_rust(mode: Build, out: &Path) {
    let src = source_dir().join("rtarget.rs");
    let tmp = out.with_extension("tmp");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.env("RUSTC_BOOTSTRAP", "1")
        .args(mode.cflags())
        .arg("--crate-name")
        .arg("rtarget")
        .arg("-o")
        .arg(&tmp)
        .arg(&src);
    run(cmd, &format!("{mode:?} ({})", src.display()));
    std::fs::rename(&tmp, out)
        .unwrap_or_else(|e| panic!("cannot move {} to {}: {e}", tmp.display(), out.display()));
}

/// `cache_dir()/name`, built once per test process: `build(cache_dir, tmp)` writes the
/// result to `tmp`, which then takes its place (an interrupted build never leaves a
/// half-written fixture under the final name).
fn build_once(cell: &OnceLock<PathBuf>, name: &str, build: impl FnOnce(&Path, &Path)) -> PathBuf {
    cell.get_or_init(|| {
        let dir = cache_dir();
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create fixture cache {}: {e}", dir.display()));
        let out = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        build(&dir, &tmp);
        std::fs::rename(&tmp, &out)
            .unwrap_or_else(|e| panic!("cannot move {} to {}: {e}", tmp.display(), out.display()));
        out
    })
    .clone()
}

/// The shared object `fixtures/dlib.c` (exports `dl_work`), built once per test process
/// with `gcc -O2 -fPIC -pg -mfentry -mrecord-mcount -shared -Wl,-z,notext`: its entries
/// are PIE-style `call *__fentry__@GOTPCREL(%rip)` sites ([`Build::PieGot`]'s kind).
/// The C fixture loads it with its `dlopen PATH` command.
pub fn shared_object() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_once(&BUILT, "libdlib.so", |_, tmp| {
        let src = source_dir().join("dlib.c");
        let mut cc = Command::new("gcc");
        cc.args(["-O2", "-fPIC", "-pg", "-mfentry", "-mrecord-mcount"])
            .args(["-Wall", "-Wextra", "-Werror", "-shared", "-Wl,-z,notext"])
            .arg(&src)
            .arg("-o")
            .arg(tmp);
        run(cc, &format!("shared object ({})", src.display()));
    })
}

/// The program `fixtures/qs_target.c` (its own handler on the agent's default
/// quiescent-state signal, four busy threads calling `work`), built once per test
/// process with [`Build::Nop5`]'s flags. Its first argument says how it installs the
/// handler: `sigaction`, `signal` or `raw` (an `rt_sigaction` system call).
pub fn qs_target() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_once(&BUILT, "qs_target", |dir, tmp| {
        let src = source_dir().join("qs_target.c");
        let obj = dir.join("qs_target.o");
        let mut cc = Command::new("gcc");
        cc.args(Build::Nop5.cflags())
            .args(["-Wall", "-Wextra", "-Werror", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj);
        run(cc, &format!("qs_target (compile {})", src.display()));
        let mut ld = Command::new("gcc");
        ld.args(Build::Nop5.ldflags())
            .arg(&obj)
            .arg("-o")
            .arg(tmp)
            .arg("-lpthread");
        run(ld, "qs_target (link)");
    })
}

/// The program `fixtures/tree_prog.c` (process-tree tests: it forks workers and prints
/// its own counts of `tree_f1`/`tree_f2`), built once per test process with
/// [`Build::FentryCall`]'s flags.
pub fn tree_prog() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_once(&BUILT, "tree_prog", |dir, tmp| {
        let src = source_dir().join("tree_prog.c");
        let obj = dir.join("tree_prog.o");
        let mut cc = Command::new("gcc");
        cc.args(Build::FentryCall.cflags())
            .args(["-Wall", "-Wextra", "-Werror", "-c"])
            .arg(&src)
            .arg("-o")
            .arg(&obj);
        run(cc, &format!("tree_prog (compile {})", src.display()));
        let mut ld = Command::new("gcc");
        ld.args(Build::FentryCall.ldflags())
            .arg(&obj)
            .arg("-o")
            .arg(tmp);
        run(ld, "tree_prog (link)");
    })
}

/// The program `fixtures/runpath/main.c`, built once per test process into
/// `runpath/runpath_target` with `DT_RUNPATH` `$ORIGIN/lib` (the only way it finds its
/// plugin `lib/libpbplugin.so` by bare name), the plugin with `DT_RUNPATH`
/// `$ORIGIN/sub` (the only way it finds `lib/sub/libpbsibling.so`).
pub fn runpath_program() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = cache_dir().join("runpath");
            let sub = dir.join("lib").join("sub");
            std::fs::create_dir_all(&sub)
                .unwrap_or_else(|e| panic!("cannot create fixture cache {}: {e}", sub.display()));
            let src = source_dir().join("runpath");
            let gcc = |what: &str, args: &[&str], source: &str, out: &Path| {
                let tmp = out.with_extension("tmp");
                let mut cc = Command::new("gcc");
                cc.args(["-O2", "-Wall", "-Wextra", "-Werror"])
                    .args(args)
                    .arg(src.join(source))
                    .arg("-o")
                    .arg(&tmp);
                run(cc, what);
                std::fs::rename(&tmp, out).unwrap_or_else(|e| {
                    panic!("cannot move {} to {}: {e}", tmp.display(), out.display())
                });
            };
            let shared = ["-fPIC", "-shared"];
            gcc(
                "runpath sibling",
                &shared,
                "sibling.c",
                &sub.join("libpbsibling.so"),
            );
            gcc(
                "runpath plugin",
                &[&shared[..], &["-Wl,-rpath,$ORIGIN/sub,--enable-new-dtags"]].concat(),
                "plugin.c",
                &dir.join("lib").join("libpbplugin.so"),
            );
            let exe = dir.join("runpath_target");
            gcc(
                "runpath program",
                &["-Wl,-rpath,$ORIGIN/lib,--enable-new-dtags"],
                "main.c",
                &exe,
            );
            exe
        })
        .clone()
}

/// The program `fixtures/masks.c` (threads that run code with every signal blocked:
/// masked calls, `posix_spawn`, `pthread_create`, `pthread_kill`), built once per test
/// process with plain `gcc -O2` (its functions are relocated sites).
pub fn masks_program() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_once(&BUILT, "masks", |_, tmp| {
        let src = source_dir().join("masks.c");
        let mut cc = Command::new("gcc");
        cc.args(["-O2", "-Wall", "-Wextra", "-Werror", "-pthread"])
            .arg(&src)
            .arg("-o")
            .arg(tmp);
        run(cc, &format!("masks ({})", src.display()));
    })
}

/// Name of function `i` of [`many_functions_program`].
pub fn many_functions_name(i: u32) -> String {
    format!("patchbay_generated_function_with_a_long_name_{i:06}")
}

/// A program with `n` small functions ([`many_functions_name`]) built with plain
/// `gcc -O1` (relocated sites), speaking the fixtures' line protocol (`ready pid=`,
/// `quit`). Built once per `n` (kept in the cache directory while its source is the
/// same: 24,000 functions take ~10 s to compile).
pub fn many_functions_program(n: u32) -> PathBuf {
    use std::fmt::Write as _;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create fixture cache {}: {e}", dir.display()));
    let mut src = String::from("#include <stdio.h>\n#include <string.h>\n#include <unistd.h>\n");
    for i in 0..n {
        let _ = writeln!(
            src,
            "__attribute__((noinline)) unsigned long {}(unsigned long x) \
             {{ __asm__ volatile(\"\" : : \"r\"(x)); return x * {}u + {i}u; }}",
            many_functions_name(i),
            i + 3
        );
    }
    src.push_str(
        "int main(void) {\n  char line[64];\n  printf(\"ready pid=%d\\n\", (int)getpid());\n  \
         fflush(stdout);\n  while (fgets(line, sizeof line, stdin))\n    \
         if (!strncmp(line, \"quit\", 4)) return 0;\n  return 0;\n}\n",
    );
    let c = dir.join(format!("many{n}.c"));
    let out = dir.join(format!("many{n}"));
    if out.exists() && std::fs::read_to_string(&c).is_ok_and(|old| old == src) {
        return out;
    }
    std::fs::write(&c, &src).unwrap_or_else(|e| panic!("cannot write {}: {e}", c.display()));
    let tmp = dir.join(format!("many{n}.tmp"));
    let mut cc = Command::new("gcc");
    cc.args(["-O1", "-o"]).arg(&tmp).arg(&c);
    run(cc, &format!("many_functions_program({n})"));
    std::fs::rename(&tmp, &out)
        .unwrap_or_else(|e| panic!("cannot move {} to {}: {e}", tmp.display(), out.display()));
    out
}

/// The program `fixtures/inject_target.c` (issue 13): a plain `-O2` build with no agent
/// and no instrumentation, or (`statically`) the same linked with `-static`. Built once
/// per test process.
pub fn inject_target(statically: bool) -> PathBuf {
    static BUILT: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    let name = if statically {
        "inject_target_static"
    } else {
        "inject_target"
    };
    build_once(&BUILT[statically as usize], name, |_, tmp| {
        let src = source_dir().join("inject_target.c");
        let mut cc = Command::new("gcc");
        cc.args(["-O2", "-Wall", "-Wextra", "-Werror"]);
        if statically {
            cc.arg("-static");
        }
        cc.arg(&src).arg("-o").arg(tmp).arg("-lpthread");
        run(cc, &format!("{name} (build {})", src.display()));
    })
}
