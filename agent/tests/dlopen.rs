//! A library loaded with dlopen is found by `Discoverer::discover_new`. In its own test
//! binary, so that no other test loads objects concurrently.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use patchbay_agent::sites::{Discoverer, SiteKind};

const LIB_SOURCE: &str = r#"
__attribute__((noinline)) int lib_one(int a) { return a + 1; }
__attribute__((noinline)) int lib_two(int a) { return a * 7; }
static __attribute__((noinline)) int lib_helper(int x) { return x ^ 5; }
int lib_three(int x) { return lib_helper(x) + lib_one(x); }
"#;

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dlopen_is_discovered_as_new() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sites-fixtures/dlopen");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("lib.c");
    std::fs::write(&src, LIB_SOURCE).unwrap();
    let lib = dir.join("libpbfixture.so");
    run(Command::new("gcc")
        .args([
            "-O2",
            "-pg",
            "-mfentry",
            "-mrecord-mcount",
            "-fPIC",
            "-shared",
            "-Wl,-z,notext",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&lib));

    let mut d = Discoverer::new();
    let before = d.discover_new().unwrap();
    assert!(!before.is_empty());
    assert!(!before.iter().any(|s| *s.object == *lib));

    let cpath = std::ffi::CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: loading a library built above whose constructors are gcc's defaults.
    let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {}", lib.display());

    let new = d.discover_new().unwrap();
    let lib_sites: Vec<_> = new.iter().filter(|s| *s.object == *lib).collect();
    let inst: BTreeMap<_, _> = lib_sites
        .iter()
        .filter(|s| s.kind != SiteKind::None)
        .map(|s| (s.name.as_str(), s.kind))
        .collect();
    assert_eq!(
        inst,
        BTreeMap::from([
            ("lib_helper", SiteKind::FentryGot),
            ("lib_one", SiteKind::FentryGot),
            ("lib_three", SiteKind::FentryGot),
            ("lib_two", SiteKind::FentryGot),
        ])
    );
    for name in ["lib_one", "lib_two", "lib_three"] {
        let s = lib_sites.iter().find(|s| s.name == name).unwrap();
        assert!(s.patchable, "{s:?}");
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: `handle` is a live handle from dlopen and `cname` a C string.
        let sym = unsafe { libc::dlsym(handle, cname.as_ptr()) };
        assert_eq!(s.address, sym as u64, "{name}");
        // The bytes in memory are those read from the file.
        // SAFETY: `sym` is the start of a loaded function with at least 6 bytes of code.
        let mem = unsafe { std::slice::from_raw_parts(sym as *const u8, s.bytes.len()) };
        assert_eq!(mem, s.bytes.as_slice());
    }
    assert!(new.iter().all(|s| *s.object == *lib), "only the new object");
    assert!(d.discover_new().unwrap().is_empty());
}
