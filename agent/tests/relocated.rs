//! Prologue relocation at the listing level: which functions of plain builds become
//! relocated sites, and the precise refusals of the others.

use std::collections::BTreeMap;
use std::path::Path;

use patchbay_agent::sites::{FunctionSite, SiteKind, analyze_elf};

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
