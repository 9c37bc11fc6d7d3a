//! Prologue relocation at the listing level: which functions of plain builds become
//! relocated sites, and the precise refusals of the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use patchbay_agent::sites::{FunctionSite, SiteKind, analyze_elf};

/// Plain C: no instrumentation. Each function exercises one case of the analysis.
const C_SOURCE: &str = r#"#include <stdio.h>
#include <stdlib.h>
int counter;
__attribute__((noinline)) int add(int a, int b) { return a + b; }
__attribute__((noinline)) int rip_load(int x) { return counter + x; }
__attribute__((noinline)) int other(int x) { return x * 7 + counter; }
__attribute__((noinline)) int tail(int x) { return other(x + 3); }
__attribute__((noinline)) int cond(int x) { if (x > 10) return other(x); return x * 2 + 1; }
__attribute__((noinline)) unsigned collatz(unsigned x) {
    unsigned n = 0;
    while (x != 1) { x = (x & 1) ? 3 * x + 1 : x / 2; n++; }
    return n;
}
__attribute__((noinline)) int sw(int x) {
    switch (x) {
    case 0: return counter + 11;
    case 1: return counter * 3;
    case 2: return other(x) + 5;
    case 3: return counter - 7;
    case 4: return counter ^ 0x55;
    case 5: return other(counter);
    case 6: return counter << 3;
    case 7: return 99;
    default: return -1;
    }
}
__attribute__((cold, noinline)) void report(int x) { fprintf(stderr, "big %d\n", x); }
__attribute__((noinline)) int framed(int x) {
    int r = other(x) + other(x + 1);
    if (x > 1000) { report(r); report(x + 1); return -x; }
    return r + other(r);
}
__attribute__((noinline)) void wait_zero(volatile int *p) { while (*p) ; }
/* A loop back into the replaced bytes: `mov eax,edi; 1: dec eax; test eax,eax; jnz 1b; ret`. */
__asm__(".text\n.globl spin\n.type spin,@function\nspin:\n"
        "\tmov %edi,%eax\n1:\tdec %eax\n\ttest %eax,%eax\n\tjnz 1b\n\tret\n.size spin,.-spin\n");
int spin(int);
/* Another function jumps into the prologue of `entered` (as glibc's mempcpy does into
   memmove): `mov eax,edi; add eax,1; add eax,2; ret`, and `jumper` goes to +2. */
__asm__(".text\n.globl entered\n.type entered,@function\nentered:\n"
        "\tmov %edi,%eax\n\tadd $1,%eax\n\tadd $2,%eax\n\tret\n.size entered,.-entered\n"
        ".globl jumper\n.type jumper,@function\njumper:\n"
        "\tmov $7,%edi\n\tmov %edi,%eax\n\tjmp entered+2\n.size jumper,.-jumper\n");
int entered(int);
int jumper(void);
int main(int argc, char **argv) {
    (void)argv;
    int s = 0;
    for (int i = 0; i < 10; i++) s += add(i, argc) + rip_load(i) + tail(i) + cond(i * 3) + (int)collatz(i + 1) + sw(i);
    int z = 0; wait_zero(&z);
    volatile int sink = framed(argc); (void)sink;
    printf("%d\n", s + spin(3) + entered(1) + jumper() - 14);
    return 0;
}
"#;

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the C fixture with `flags` (and checks that it runs).
fn build_c(name: &str, flags: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("relocated-fixtures")
        .join(name);
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    let src = dir.join("plain.c");
    std::fs::write(&src, C_SOURCE).expect("write source");
    let exe = dir.join(name);
    run(Command::new("gcc")
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&exe));
    assert_eq!(run(&mut Command::new(&exe)), "1756\n");
    exe
}

fn listing(path: &Path) -> (Vec<u8>, Vec<FunctionSite>) {
    let data = std::fs::read(path).expect("read fixture");
    let sites = analyze_elf(&data, path, 0).expect("analyze fixture");
    (data, sites)
}

fn site<'a>(sites: &'a [FunctionSite], name: &str) -> &'a FunctionSite {
    sites
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no function {name}"))
}

/// (offset of the patch from the entry, prologue length), or the refusal.
type Outcome = Result<(u64, usize), String>;

/// What the listing says of a function.
fn outcome(sites: &[FunctionSite], name: &str) -> Outcome {
    let s = site(sites, name);
    match s.kind {
        SiteKind::Relocated => {
            assert!(s.patchable && s.reason.is_none(), "{s:?}");
            Ok((s.address - s.function_address, s.bytes.len()))
        }
        SiteKind::None => {
            assert!(!s.patchable, "{s:?}");
            Err(s.reason.clone().unwrap())
        }
        k => panic!("{name}: unexpected kind {k}"),
    }
}

/// Counts of a listing: relocated, and refused by reason (offsets and names removed).
fn census(sites: &[FunctionSite]) -> (usize, BTreeMap<String, usize>) {
    let mut reasons = BTreeMap::new();
    let mut relocated = 0;
    for s in sites {
        if s.kind == SiteKind::Relocated {
            relocated += 1;
            continue;
        }
        let r = normalize(s.reason.as_deref().unwrap_or_default());
        *reasons.entry(r).or_insert(0) += 1;
    }
    (relocated, reasons)
}

/// A reason with the function's name, offsets and instruction text left out.
fn normalize(reason: &str) -> String {
    let reason = match reason
        .find(" is a ")
        .or_else(|| reason.find(" does not start"))
    {
        Some(i) if !reason.starts_with("cannot") => &reason[i + 1..],
        _ => reason,
    };
    let mut out = String::new();
    let mut quoted = false;
    for part in reason.split('`') {
        out.push_str(if quoted { "`…`" } else { part });
        quoted = !quoted;
    }
    out.split(' ')
        .map(|w| if w.contains("0x") { "…" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn libc_and_ls_census() {
    for path in ["/lib/x86_64-linux-gnu/libc.so.6", "/bin/ls"] {
        let data = std::fs::read(path).unwrap();
        let t = std::time::Instant::now();
        let sites = analyze_elf(&data, Path::new(path), 0).unwrap();
        let took = t.elapsed();
        let (relocated, reasons) = census(&sites);
        eprintln!(
            "{path}: {} functions, {relocated} relocated, in {took:?}",
            sites.len()
        );
        for (r, n) in &reasons {
            eprintln!("  {n:6} {r}");
        }
        // Most functions of ordinary code are relocated.
        assert!(
            relocated * 10 > sites.len() * 8,
            "{relocated} of {}",
            sites.len()
        );
    }
}

const RUST_SOURCE: &str = r#"
pub mod module {
    #[inline(never)]
    pub fn function(x: u64) -> u64 { x.wrapping_mul(31).rotate_left(7) }
    #[inline(never)]
    pub fn checked(v: Vec<u64>, i: usize) -> u64 {
        // v is dropped if the index panics: a landing pad.
        let x = v[i] * 3;
        std::hint::black_box(&v);
        x
    }
}
fn main() {
    let n = std::hint::black_box(std::env::args().count() as u64);
    let v = vec![n; 4];
    println!("{}", module::function(n) + module::checked(v, 1));
}
"#;

fn bytes_at(data: &[u8], addr: u64, len: usize) -> &[u8] {
    use object::{Object, ObjectSegment};
    let file = object::File::parse(data).expect("parse");
    for seg in file.segments() {
        let (off, size) = seg.file_range();
        if addr >= seg.address() && addr + len as u64 <= seg.address() + size {
            let start = (off + addr - seg.address()) as usize;
            return &data[start..start + len];
        }
    }
    panic!("{addr:#x} is not in the file");
}

#[test]
fn plain_gcc_builds() {
    const CUT: &str = "cannot relocate the prologue: ";
    let too_short =
        format!("{CUT}function is 4 bytes after its entry marker, shorter than the 5-byte jump");
    // spin: `mov eax,edi; 1: dec eax; test eax,eax; jnz 1b` (not compiled: no endbr64)
    let spin = format!("{CUT}a jump at +0x6 targets +0x2, inside the bytes the patch replaces");
    let o2 = build_c("O2", &["-O2"]);
    let (data, sites) = listing(&o2);
    let expect: [(&str, Outcome); 9] = [
        // lea eax,[rdi+rsi]; ret
        ("add", Err(too_short.clone())),
        // mov eax,[rip+counter] (6 bytes)
        ("rip_load", Ok((0, 6))),
        // add edi,3; jmp other: the tail jump moves, re-targeted
        ("tail", Ok((0, 5))),
        // cmp edi,10; jg: the conditional branch moves
        ("cond", Ok((0, 5))),
        // xor eax,eax; cmp edi,1; the loop is after the replaced bytes
        ("collatz", Ok((0, 5))),
        // cmp edi,7; ja sw.cold (6 bytes): then the jump table
        ("sw", Ok((0, 9))),
        // mov eax,[rdi]; test eax,eax; jne <entry>: the whole loop moves
        ("wait_zero", Ok((0, 6))),
        ("spin", Err(spin.clone())),
        ("main", Ok((0, 6))),
    ];
    for (name, want) in &expect {
        assert_eq!(&outcome(&sites, name), want, "-O2 {name}");
    }
    // A jump from another function into the replaced bytes.
    assert_eq!(
        outcome(&sites, "entered"),
        Err(format!(
            "{CUT}control may enter at +0x2, inside the replaced bytes (another symbol, a landing pad, a jump-table target, a jump from another function or a taken address)"
        ))
    );
    // mov edi,7 (5 bytes); the jump into `entered` stays
    assert_eq!(outcome(&sites, "jumper"), Ok((0, 5)));
    // The replaced bytes are the file's.
    let sw = site(&sites, "sw");
    assert_eq!(bytes_at(&data, sw.address, 9), sw.bytes);
    // The switch's known targets are its table's 8 entries: `lea rdx,[rip+T]` at +9.
    let lea = bytes_at(&data, sw.function_address + 9, 7);
    assert_eq!(lea[..3], [0x48, 0x8d, 0x15]);
    let table = sw.function_address + 16 + i32::from_le_bytes(lea[3..].try_into().unwrap()) as u64;
    let mut targets: Vec<u64> = bytes_at(&data, table, 32)
        .chunks(4)
        .map(|b| table.wrapping_add(i32::from_le_bytes(b.try_into().unwrap()) as u64))
        .collect();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), 8);
    assert_eq!(sw.known_targets, targets);
    let cold = site(&sites, "sw.cold");
    assert!(
        cold.reason.as_deref().unwrap().contains("cold part"),
        "{cold:?}"
    );

    let o0 = build_c("O0", &["-O0"]);
    let (_, sites) = listing(&o0);
    let expect: [(&str, Outcome); 6] = [
        // push rbp; mov rbp,rsp; mov [rbp-4],edi (1 + 3 + 3)
        ("add", Ok((0, 7))),
        ("rip_load", Ok((0, 7))),
        ("collatz", Ok((0, 7))),
        // -O0 loads the table entry through other registers: not the recognized form
        (
            "sw",
            Err(format!(
                "{CUT}indirect jump at +0x36 that is not a recognized jump table (an indirect tail call, a computed goto or an unusual table): its targets are unknown"
            )),
        ),
        ("spin", Err(spin.clone())),
        ("main", Ok((0, 5))),
    ];
    for (name, want) in &expect {
        assert_eq!(&outcome(&sites, name), want, "-O0 {name}");
    }

    let cet = build_c("cet", &["-O2", "-fcf-protection=full"]);
    let (data, sites) = listing(&cet);
    let expect: [(&str, Outcome); 9] = [
        ("add", Err(too_short)),
        // patched after endbr64
        ("rip_load", Ok((4, 6))),
        ("tail", Ok((4, 5))),
        ("cond", Ok((4, 5))),
        ("collatz", Ok((4, 5))),
        ("sw", Ok((4, 9))),
        // endbr64; nopl; 1: mov eax,[rdi]; test; jne 1b: the loop comes back to +8
        (
            "wait_zero",
            Err(format!(
                "{CUT}a jump at +0xc targets +0x8, inside the bytes the patch replaces"
            )),
        ),
        ("spin", Err(spin)),
        ("main", Ok((4, 6))),
    ];
    for (name, want) in &expect {
        assert_eq!(&outcome(&sites, name), want, "cet {name}");
    }
    let s = site(&sites, "rip_load");
    assert_eq!(
        bytes_at(&data, s.function_address, 4),
        [0xf3, 0x0f, 0x1e, 0xfa]
    );
    assert_eq!(bytes_at(&data, s.address, 6), s.bytes);
    assert_eq!(site(&sites, "sw").known_targets.len(), 8);
}

#[test]
fn plain_rust_build() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("relocated-fixtures/rust");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("fixture.rs");
    std::fs::write(&src, RUST_SOURCE).unwrap();
    let exe = dir.join("fixture");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    run(Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-name",
            "fixture",
            "-C",
            "opt-level=2",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&exe));
    run(&mut Command::new(&exe));
    let (_, sites) = listing(&exe);
    // mov rax,rdi; shl rax,5 (3 + 4 bytes)
    assert_eq!(outcome(&sites, "fixture::module::function"), Ok((0, 7)));
    // push r14; push rbx; push rax; mov rbx,rdi (2 + 1 + 1 + 3 bytes)
    assert_eq!(outcome(&sites, "fixture::module::checked"), Ok((0, 7)));
    // The landing pad that drops `v` when the index panics, from the LSDA.
    let checked = site(&sites, "fixture::module::checked");
    assert_eq!(checked.known_targets.len(), 1, "{checked:x?}");
    let pad = checked.known_targets[0];
    assert!(pad > checked.address + 7 && pad < checked.function_address + checked.size);
    // Precompiled std, built the normal way: most of it is relocated.
    let std: Vec<_> = sites
        .iter()
        .filter(|s| s.name.starts_with("std::"))
        .collect();
    let relocated = std.iter().filter(|s| s.kind == SiteKind::Relocated).count();
    assert!(
        relocated * 10 > std.len() * 8,
        "{relocated} of {}",
        std.len()
    );
}

#[test]
fn stripped_objects_are_reached_through_eh_frame() {
    let o2 = build_c("O2", &["-O2"]);
    let stripped = o2.with_file_name("O2-stripped");
    run(Command::new("strip").arg(&o2).arg("-o").arg(&stripped));
    let (_, full) = listing(&o2);
    let (_, bare) = listing(&stripped);
    // Every function of the fixture with an FDE is listed by address, with the same
    // analysis; `spin` (assembly without CFI) has none and is not listed.
    for name in [
        "rip_load",
        "tail",
        "cond",
        "collatz",
        "sw",
        "wait_zero",
        "main",
    ] {
        let f = site(&full, name);
        let unnamed = format!("O2-stripped+{:#x}", f.function_address);
        let s = site(&bare, &unnamed);
        assert_eq!(
            (s.kind, &s.bytes, s.address, &s.known_targets),
            (f.kind, &f.bytes, f.address, &f.known_targets),
            "{name}"
        );
        assert_eq!(s.size, f.size, "{name}: the FDE covers the symbol");
        assert!(s.mangled.is_empty());
    }
    let spin = site(&full, "spin");
    assert!(
        !bare
            .iter()
            .any(|s| s.function_address == spin.function_address)
    );
    // The cold part of `framed` starts mid-frame (after `push`es): not an entry. (That
    // of `sw`, which has no frame, cannot be told from a function without its symbol.)
    let cold = site(&full, "framed.cold");
    let s = site(&bare, &format!("O2-stripped+{:#x}", cold.function_address));
    assert_eq!(s.kind, SiteKind::None);
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("does not start like a function entry"),
        "{s:?}"
    );
}

/// A plain `-O2` program with `n` small functions (as the issue's attach target).
fn generated(n: usize) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("relocated-fixtures/gen{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("gen");
    if exe.exists() {
        return exe;
    }
    let mut c = String::from("#include <stdio.h>\nint g[16];\n");
    for i in 0..n {
        c.push_str(&format!(
            "__attribute__((noinline)) int f{i}(int x) {{ return x * {} + g[{}]; }}\n",
            i + 3,
            i % 16
        ));
    }
    c.push_str("int (*const table[])(int) = {");
    for i in 0..n {
        c.push_str(&format!("f{i},"));
    }
    c.push_str(
        "};\nint main(int argc, char **argv) {\n (void)argv; int s = 0;\n for (unsigned i = 0; i < sizeof table / sizeof *table; i++) s += table[i](argc);\n printf(\"%d\\n\", s != 0);\n return 0;\n}\n",
    );
    let src = dir.join("gen.c");
    std::fs::write(&src, c).unwrap();
    let tmp = dir.join("gen.tmp");
    run(Command::new("gcc").arg("-O2").arg(&src).arg("-o").arg(&tmp));
    std::fs::rename(&tmp, &exe).unwrap();
    exe
}

#[test]
fn ten_thousand_plain_functions() {
    let exe = generated(10_000);
    let data = std::fs::read(&exe).unwrap();
    let t = std::time::Instant::now();
    let sites = analyze_elf(&data, &exe, 0).unwrap();
    eprintln!(
        "{}: {} functions analyzed in {:?}",
        exe.display(),
        sites.len(),
        t.elapsed()
    );
    let generated: Vec<_> = sites
        .iter()
        .filter(|s| s.name.starts_with('f') && s.name[1..].parse::<u32>().is_ok())
        .collect();
    assert_eq!(generated.len(), 10_000);
    // imul eax,edi,N (3 or 6 bytes); add eax,[rip+g] (6 bytes)
    for s in &generated {
        assert_eq!(s.kind, SiteKind::Relocated, "{s:?}");
        assert!(s.bytes.len() >= 5 && s.bytes.len() <= 12, "{s:?}");
    }
}
