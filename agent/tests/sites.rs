//! Site discovery on real binaries built by gcc and rustc, and on this test process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSection, ObjectSegment};
use patchbay_agent::sites::{
    Discoverer, FunctionSite, SiteKind, analyze_elf, discover_all, filter,
};

const C_SOURCE: &str = r#"
#include <stdio.h>
__attribute__((noinline)) int add(int a, int b) { return a + b; }
__attribute__((noinline)) int mul(int a, int b) { return a * b; }
static __attribute__((noinline)) int helper(int x) { return x * 3 + 1; }
int main(int argc, char **argv) {
    (void)argv;
    printf("%d\n", add(argc, 2) + mul(argc, 3) + helper(argc));
    return 0;
}
"#;

const RUST_SOURCE: &str = r#"
pub mod module {
    #[inline(never)]
    pub fn function(x: u64) -> u64 { x.wrapping_mul(31).rotate_left(7) }
    #[inline(never)]
    pub fn other_function(x: u64) -> u64 { x ^ 0x5555 }
}
fn main() {
    let n = std::hint::black_box(std::env::args().count() as u64);
    println!("{}", module::function(n) + module::other_function(n));
}
"#;

const ENTRY_FUNCTIONS: [&str; 4] = ["add", "helper", "main", "mul"];

fn fixture_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sites-fixtures")
        .join(name);
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `source` to `dir/name.c` and returns the path.
fn write_source(dir: &Path, name: &str, source: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, source).expect("write source");
    path
}

/// Compiles the C fixture with `cflags`, then links it with `ldflags` (never with
/// `-pg`: gcrt1 would start gprof).
fn build_c(name: &str, cflags: &[&str], ldflags: &[&str]) -> PathBuf {
    let dir = fixture_dir(name);
    let src = write_source(&dir, "f.c", C_SOURCE);
    let obj = dir.join("f.o");
    let exe = dir.join(name);
    run(Command::new("gcc")
        .args(cflags)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj));
    run(Command::new("gcc")
        .args(ldflags)
        .arg(&obj)
        .arg("-o")
        .arg(&exe));
    // The fixture must run untraced (glibc exports __fentry__ and mcount).
    run(&mut Command::new(&exe));
    exe
}

fn analyze(path: &Path, bias: u64) -> (Vec<u8>, Vec<FunctionSite>) {
    let data = std::fs::read(path).expect("read fixture");
    let sites = analyze_elf(&data, path, bias).expect("analyze fixture");
    (data, sites)
}

/// The file offset of link-time address `addr`, found through the program headers
/// (independently of the sections the analysis uses).
fn file_offset(data: &[u8], addr: u64) -> usize {
    let file = object::File::parse(data).expect("parse");
    for seg in file.segments() {
        let (off, size) = seg.file_range();
        if addr >= seg.address() && addr < seg.address() + size {
            return (off + addr - seg.address()) as usize;
        }
    }
    panic!("{addr:#x} is not in any file-backed segment");
}

/// The bytes of the file at link-time address `addr`.
fn file_bytes_at(data: &[u8], addr: u64, len: usize) -> Vec<u8> {
    let start = file_offset(data, addr);
    data[start..start + len].to_vec()
}

/// Checks every site's recorded bytes against the file, and returns the
/// instrumented functions by name.
fn instrumented(data: &[u8], sites: &[FunctionSite], bias: u64) -> BTreeMap<String, SiteKind> {
    let mut out = BTreeMap::new();
    for s in sites {
        if s.kind == SiteKind::None {
            assert!(!s.patchable, "{s:?}");
            assert!(s.bytes.is_empty(), "{s:?}");
            continue;
        }
        if s.kind == SiteKind::Relocated {
            assert!(s.patchable, "{s:?}");
            assert!(s.bytes.len() >= 5, "{s:?}");
            assert_eq!(
                file_bytes_at(data, s.address - bias, s.bytes.len()),
                s.bytes,
                "bytes of {}",
                s.name
            );
            continue;
        }
        assert_eq!(s.bytes.len(), s.kind.len(), "{s:?}");
        assert_eq!(
            file_bytes_at(data, s.address - bias, s.kind.len()),
            s.bytes,
            "bytes of {}",
            s.name
        );
        assert!(
            out.insert(s.name.clone(), s.kind).is_none(),
            "{} listed twice",
            s.name
        );
    }
    out
}

fn kinds_of(names: &[&str], kind: SiteKind) -> BTreeMap<String, SiteKind> {
    names.iter().map(|n| (n.to_string(), kind)).collect()
}

fn by_name<'a>(sites: &'a [FunctionSite], name: &str) -> &'a FunctionSite {
    sites
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no function {name} in {sites:#?}"))
}

/// The fixture's own functions that carry no site are the uninstrumented CRT ones
/// (`_start`): their prologue is relocated, after the `endbr64` when there is one.
fn assert_uninstrumented_rest(sites: &[FunctionSite]) {
    let start = by_name(sites, "_start");
    assert_eq!(start.kind, SiteKind::Relocated, "{start:?}");
    assert!(start.patchable);
    assert_eq!(start.reason, None);
    assert!(start.size > 0);
    assert!(start.bytes.len() >= 5);
}

#[test]
fn fentry_pie_linked_with_notext() {
    // (a) gcc -pg -mfentry -mrecord-mcount -c, then a PIE link without -pg.
    let dir = fixture_dir("fentry-pie");
    let src = write_source(&dir, "f.c", C_SOURCE);
    let obj = dir.join("f.o");
    let exe = dir.join("fentry-pie");
    run(Command::new("gcc")
        .args(["-O2", "-pg", "-mfentry", "-mrecord-mcount", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj));
    run(Command::new("gcc")
        .args(["-pie", "-Wl,-z,notext"])
        .arg(&obj)
        .arg("-o")
        .arg(&exe));
    run(&mut Command::new(&exe));

    let bias = 0x5555_5555_4000;
    let (data, sites) = analyze(&exe, bias);
    // gcc 12 calls __fentry__ through the GOT in position-independent code:
    // `ff 15 disp32`, 6 bytes, which the analysis recognizes through the GLOB_DAT
    // relocation of the slot.
    assert_eq!(
        instrumented(&data, &sites, bias),
        kinds_of(&ENTRY_FUNCTIONS, SiteKind::FentryGot)
    );
    for name in ENTRY_FUNCTIONS {
        let s = by_name(&sites, name);
        assert!(s.patchable, "{s:?}");
        assert_eq!(s.reason, None);
        assert_eq!(&s.bytes[..2], &[0xff, 0x15]);
        assert_eq!(s.address, s.function_address);
        assert!(s.address > bias, "run-time address includes the bias");
        assert_eq!(&*s.object, exe.as_path());
    }
    assert_uninstrumented_rest(&sites);
}

#[test]
fn fentry_direct_call_no_pie() {
    // gcc -pg -mfentry -mrecord-mcount without PIE: `e8 rel32` to __fentry__@plt.
    let exe = build_c(
        "fentry-nopie",
        &["-O2", "-pg", "-mfentry", "-mrecord-mcount", "-fno-pie"],
        &["-no-pie"],
    );
    let (data, sites) = analyze(&exe, 0);
    assert_eq!(
        instrumented(&data, &sites, 0),
        kinds_of(&ENTRY_FUNCTIONS, SiteKind::Fentry)
    );
    for name in ENTRY_FUNCTIONS {
        let s = by_name(&sites, name);
        assert!(s.patchable, "{s:?}");
        assert_eq!(s.bytes[0], 0xe8);
    }
    assert_uninstrumented_rest(&sites);

    // A call to anything but __fentry__ is never taken for a site.
    let add = by_name(&sites, "add").clone();
    let mul = by_name(&sites, "mul").clone();
    let mut bad = data.clone();
    let off = file_offset(&data, add.address);
    let rel = (mul.function_address as i64 - (add.address as i64 + 5)) as i32;
    bad[off + 1..off + 5].copy_from_slice(&rel.to_le_bytes());
    let bad_sites = analyze_elf(&bad, &exe, 0).unwrap();
    let s = by_name(&bad_sites, "add");
    assert_eq!(s.kind, SiteKind::Fentry);
    assert!(!s.patchable);
    assert!(
        s.reason.as_deref().unwrap().contains("goes to mul"),
        "{s:?}"
    );

    // A table entry inside a function is not an entry.
    let file = object::File::parse(&*data).unwrap();
    let table = file.section_by_name("__mcount_loc").unwrap();
    let (toff, tsize) = table.file_range().unwrap();
    let mut moved = data.clone();
    let slots = moved[toff as usize..(toff + tsize) as usize].chunks_exact_mut(8);
    for slot in slots {
        if u64::from_le_bytes(slot[..].try_into().unwrap()) == add.address {
            slot.copy_from_slice(&(add.address + 3).to_le_bytes());
        }
    }
    let moved_sites = analyze_elf(&moved, &exe, 0).unwrap();
    let s = by_name(&moved_sites, "add");
    assert_eq!(s.address, add.address + 3);
    assert!(!s.patchable);
    assert!(s.reason.as_deref().unwrap().contains("add+0x3"), "{s:?}");
}

#[test]
fn mcount_nops_no_pie() {
    // (b) -mnop-mcount: a 5-byte nop at every entry, listed in __mcount_loc.
    let exe = build_c(
        "mnop-mcount",
        &[
            "-O2",
            "-pg",
            "-mfentry",
            "-mrecord-mcount",
            "-mnop-mcount",
            "-fno-pie",
        ],
        &["-no-pie"],
    );
    let (data, sites) = analyze(&exe, 0);
    assert_eq!(
        instrumented(&data, &sites, 0),
        kinds_of(&ENTRY_FUNCTIONS, SiteKind::Nop5)
    );
    for name in ENTRY_FUNCTIONS {
        let s = by_name(&sites, name);
        assert!(s.patchable);
        assert_eq!(s.bytes, [0x0f, 0x1f, 0x44, 0x00, 0x00]);
    }
    assert_uninstrumented_rest(&sites);
}

#[test]
fn gcc_patchable_function_entry_is_a_nop_sled() {
    // (c) gcc -fpatchable-function-entry=5: five 1-byte nops.
    let exe = build_c("pfe-gcc", &["-O2", "-fpatchable-function-entry=5"], &[]);
    let (data, sites) = analyze(&exe, 0);
    let expected = kinds_of(&ENTRY_FUNCTIONS, SiteKind::NopSled);
    assert_eq!(instrumented(&data, &sites, 0), expected);
    for name in ENTRY_FUNCTIONS {
        let s = by_name(&sites, name);
        assert_eq!(s.bytes, [0x90; 5]);
        assert!(s.kind.needs_grace_period());
        assert!(
            s.reason.as_deref().unwrap().contains("grace period"),
            "{s:?}"
        );
    }
    assert_uninstrumented_rest(&sites);

    // The same file with the section contents zeroed, as lld leaves them: the values
    // come from the R_X86_64_RELATIVE addends in .rela.dyn.
    let file = object::File::parse(&*data).unwrap();
    let sec = file
        .section_by_name("__patchable_function_entries")
        .expect("section");
    let (off, size) = sec.file_range().unwrap();
    assert!(
        data[off as usize..(off + size) as usize]
            .iter()
            .any(|&b| b != 0),
        "bfd ld writes the addends into the section"
    );
    let mut zeroed = data.clone();
    zeroed[off as usize..(off + size) as usize].fill(0);
    let again = analyze_elf(&zeroed, &exe, 0).unwrap();
    assert_eq!(again, sites);
}

#[test]
fn no_instrumentation() {
    // (d) a plain build: every function is listed, and relocated unless refused
    // (relocated.rs checks the kinds and refusals of plain builds in detail).
    let exe = build_c("plain", &["-O2"], &[]);
    let (data, sites) = analyze(&exe, 0);
    assert!(instrumented(&data, &sites, 0).is_empty());
    for name in ["main", "_start", "mul"] {
        let s = by_name(&sites, name);
        assert_eq!(s.kind, SiteKind::Relocated, "{s:?}");
        assert!(s.patchable);
    }
    // mul: `mov eax,edi; imul eax,esi` (2 + 3 bytes) move; `ret` stays.
    assert_eq!(by_name(&sites, "mul").bytes.len(), 5);
    // add is 4 bytes (`lea eax,[rdi+rsi]; ret`), too short for the jump.
    let s = by_name(&sites, "add");
    assert_eq!(s.kind, SiteKind::None, "{s:?}");
    assert_eq!(
        s.reason.as_deref(),
        Some(
            "cannot relocate the prologue: function is 4 bytes after its entry marker, shorter than the 5-byte jump"
        )
    );
    // Only functions with a size are listed.
    assert!(sites.iter().all(|s| s.size > 0));
    assert!(!sites.iter().any(|s| s.name == "_init"));
}

#[test]
fn rust_patchable_function_entry() {
    let dir = fixture_dir("rust");
    let src = write_source(&dir, "fixture.rs", RUST_SOURCE);
    let exe = dir.join("fixture");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    run(Command::new(rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "--edition",
            "2021",
            "--crate-name",
            "fixture",
            "-Z",
            "patchable-function-entry=5",
            "-C",
            "opt-level=2",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&exe));
    run(&mut Command::new(&exe));

    let (data, sites) = analyze(&exe, 0);
    let inst = instrumented(&data, &sites, 0);
    for name in [
        "fixture::module::function",
        "fixture::module::other_function",
        "fixture::main",
    ] {
        assert_eq!(inst.get(name), Some(&SiteKind::Nop5), "{name}: {inst:#?}");
        let s = by_name(&sites, name);
        assert!(s.patchable);
        assert_eq!(s.bytes, [0x0f, 0x1f, 0x44, 0x00, 0x08]);
        assert!(s.mangled.starts_with("_R") || s.mangled.starts_with("_ZN"));
    }
    // Every entry of __patchable_function_entries is a function of this crate
    // (including generic std code instantiated here and the allocator shims), each a
    // rustc 5-byte nop.
    let file = object::File::parse(&*data).unwrap();
    let table = file
        .section_by_name("__patchable_function_entries")
        .expect("section");
    assert_eq!(inst.len() as u64, table.size() / 8, "{inst:#?}");
    assert!(inst.values().all(|k| *k == SiteKind::Nop5), "{inst:#?}");
    assert_eq!(
        inst.get("std::rt::lang_start::<()>::{closure#0}"),
        Some(&SiteKind::Nop5)
    );
    // Precompiled std is not instrumented: its prologues are relocated.
    let print = by_name(&sites, "std::io::stdio::_print");
    assert_eq!(print.kind, SiteKind::Relocated, "{print:?}");
    assert!(print.patchable);

    let matched = filter(&sites, "fixture::module::*").unwrap();
    let mut names: Vec<_> = matched.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "fixture::module::function",
            "fixture::module::other_function"
        ]
    );
    assert!(filter(&sites, "fixture::[").is_err());
}

#[test]
fn this_process() {
    let sites = discover_all().expect("discover_all");
    let mut d = Discoverer::new();
    let again = d.discover_all().expect("discover_all");
    assert_eq!(sites.len(), again.len());
    // libc is loaded, has no instrumentation, and is named from .dynsym.
    let libc_obj = d
        .loaded()
        .iter()
        .find(|o| o.path.to_string_lossy().contains("libc.so"))
        .unwrap_or_else(|| panic!("no libc in {:#?}", d.loaded()));
    let libc_sites: Vec<_> = again
        .iter()
        .filter(|s| *s.object == *libc_obj.path)
        .collect();
    assert!(libc_sites.len() > 500, "{}", libc_sites.len());
    assert!(
        libc_sites
            .iter()
            .all(|s| matches!(s.kind, SiteKind::None | SiteKind::Relocated))
    );
    // The bias is right: the listed address of malloc is the real one.
    let malloc = libc_sites
        .iter()
        .find(|s| s.names().any(|n| n == "malloc"))
        .expect("malloc in libc");
    assert_eq!(malloc.address, libc::malloc as *const () as u64);
    // Only the vdso may be skipped.
    for s in d.skipped() {
        assert!(s.name.contains("vdso"), "{} skipped: {}", s.name, s.error);
    }
    // The test binary itself is listed, with this test's function.
    let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    assert!(
        d.loaded().iter().any(|o| *o.path == *me),
        "{:#?}",
        d.loaded()
    );
    assert!(
        // (`this_process` itself may be inlined into its test closure: the agent's
        // package builds at opt-level 1 in the dev profile.)
        again
            .iter()
            .any(|s| s.name.starts_with("sites::") && *s.object == *me),
        "no function of this test binary found"
    );
    // Nothing new since.
    assert!(d.discover_new().unwrap().is_empty());
    assert!(d.loaded().is_empty());
}

#[test]
fn endbr64_comes_before_the_site() {
    // -fcf-protection puts `endbr64` first; the site follows it, 4 bytes in. The
    // non-PIE call goes to an IBT PLT stub (`endbr64; bnd jmp *GOT`).
    let exe = build_c(
        "cet-mcount",
        &[
            "-O2",
            "-fcf-protection",
            "-pg",
            "-mfentry",
            "-mrecord-mcount",
            "-fno-pie",
        ],
        &["-no-pie"],
    );
    let (data, sites) = analyze(&exe, 0);
    assert_eq!(
        instrumented(&data, &sites, 0),
        kinds_of(&ENTRY_FUNCTIONS, SiteKind::Fentry)
    );
    let exe2 = build_c(
        "cet-pfe",
        &["-O2", "-fcf-protection", "-fpatchable-function-entry=5"],
        &[],
    );
    let (data2, sites2) = analyze(&exe2, 0);
    assert_eq!(
        instrumented(&data2, &sites2, 0),
        kinds_of(&ENTRY_FUNCTIONS, SiteKind::NopSled)
    );
    for (data, sites) in [(&data, &sites), (&data2, &sites2)] {
        for name in ENTRY_FUNCTIONS {
            let s = by_name(sites, name);
            assert!(s.patchable, "{s:?}");
            // gcc leaves endbr64 out of a static function whose address is not taken.
            let endbr = name != "helper";
            assert_eq!(
                file_bytes_at(data, s.function_address, 4) == [0xf3, 0x0f, 0x1e, 0xfa],
                endbr,
                "{s:?}"
            );
            let offset = if endbr { 4 } else { 0 };
            assert_eq!(s.address, s.function_address + offset, "{s:?}");
        }
    }
}

#[test]
fn prefix_nops_are_skipped() {
    // -fpatchable-function-entry=7,2: 2 nops before the symbol, 5 after; the table
    // lists the first of them, the site is at the symbol.
    let exe = build_c(
        "pfe-prefix",
        &["-O2", "-fpatchable-function-entry=7,2"],
        &[],
    );
    let (data, sites) = analyze(&exe, 0);
    assert_eq!(
        instrumented(&data, &sites, 0),
        kinds_of(&ENTRY_FUNCTIONS, SiteKind::NopSled)
    );
    for name in ENTRY_FUNCTIONS {
        let s = by_name(&sites, name);
        assert!(s.patchable, "{s:?}");
        assert_eq!(s.address, s.function_address);
        assert_eq!(file_bytes_at(&data, s.address - 2, 2), [0x90, 0x90]);
    }
}

#[test]
fn cold_parts_are_not_entries() {
    let dir = fixture_dir("cold");
    let src = write_source(
        &dir,
        "cold.c",
        r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((cold, noinline)) void report(int x) { fprintf(stderr, "big %d\n", x); }
__attribute__((noinline)) int check(int x) {
    if (x > 1000) { report(x); report(x + 1); return -x; }
    return x + 1;
}
int main(int argc, char **argv) { (void)argv; return check(argc) == 0; }
"#,
    );
    let exe = dir.join("cold");
    run(Command::new("gcc")
        .args(["-O2", "-fpatchable-function-entry=5"])
        .arg(&src)
        .arg("-o")
        .arg(&exe));
    let (data, sites) = analyze(&exe, 0);
    assert_eq!(
        instrumented(&data, &sites, 0),
        kinds_of(&["check", "main", "report"], SiteKind::NopSled)
    );
    let cold = by_name(&sites, "check.cold");
    assert!(!cold.patchable);
    assert!(
        cold.reason.as_deref().unwrap().contains("cold part"),
        "{cold:?}"
    );
}
