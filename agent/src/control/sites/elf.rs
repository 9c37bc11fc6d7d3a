//! Pure analysis of one ELF file: its function entries and what is at each of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, SectionHeader, Sym};
use object::{
    Endianness, Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationFlags,
    RelocationTarget,
};

use super::ehframe::{self, EhError};
use super::{CANNOT_RELOCATE, FunctionSite, SiteKind, SitesError};
use crate::control::demangle::demangle;
use crate::tramp::relocate::{self, JumpTable, Refusal, TableForm};

/// Names of the profiling hooks whose calls gcc records in `__mcount_loc`.
const FENTRY_NAMES: &[&str] = &["__fentry__", "mcount", "_mcount", "__mcount"];

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// How far before a function's entry a patchable area (prefix nops of
/// `-fpatchable-function-entry=N,M`, M > 0) is still attributed to that function.
const MAX_PREFIX: u64 = 64;

/// Reads the sites and functions of an ELF file loaded at `bias` (run-time address =
/// link-time address + bias; 0 for a non-PIE executable).
///
/// Sites come from `__mcount_loc` and `__patchable_function_entries`, whose entries are
/// read from the file with the dynamic relocations that target them applied
/// (`R_X86_64_RELATIVE`, and `R_X86_64_64` against a defined symbol): bfd ld stores
/// the value in the section as well, lld leaves zeros there. Functions with no site
/// are analyzed for prologue relocation (`tramp::relocate`): [`SiteKind::Relocated`]
/// when their first instructions can be moved, else [`SiteKind::None`] with the
/// refusal. Functions of stripped objects that only `.eh_frame` knows are named
/// `<file name>+0x<link-time address>`. The result is sorted by address.
pub fn analyze_elf(data: &[u8], path: &Path, bias: u64) -> Result<Vec<FunctionSite>, SitesError> {
    let mut sites = analyze_link_time(data, path, Relocation::Analyze)?;
    rebase(&mut sites, bias);
    Ok(sites)
}

/// Adds `bias` to the run-time addresses of link-time sites.
pub(crate) fn rebase(sites: &mut [FunctionSite], bias: u64) {
    for s in sites {
        s.address = s.address.wrapping_add(bias);
        s.function_address = s.function_address.wrapping_add(bias);
        for t in &mut s.known_targets {
            *t = t.wrapping_add(bias);
        }
    }
}

/// Whether uninstrumented functions are analyzed for prologue relocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relocation {
    Analyze,
    /// The agent's own shared object: never traced, so not analyzed (listed with
    /// [`OWN_CODE`]); its analysis would cost more than all the rest of most processes.
    OwnCode,
}

/// Reason given for the functions of the agent's own shared object.
pub(crate) const OWN_CODE: &str = "the agent's own code is never traced";

/// [`analyze_elf`] with a bias of 0: addresses are the file's virtual addresses.
pub(crate) fn analyze_link_time(
    data: &[u8],
    path: &Path,
    relocation: Relocation,
) -> Result<Vec<FunctionSite>, SitesError> {
    let image = Image::parse(data, path, relocation)?;
    Ok(image.sites(path))
}

/// Which table listed a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    McountLoc,
    PatchableEntries,
}

/// A dynamic relocation, by the address it patches.
struct Reloc {
    r_type: elf::RelocationType,
    addend: i64,
    /// Name of the symbol, when it has one.
    sym_name: Option<String>,
    /// Value of the symbol, when it is defined in this object.
    sym_value: Option<u64>,
}

/// A function: all symbols at one address.
#[derive(Default)]
struct Func {
    /// (rank, mangled name); the lowest rank names the function.
    names: Vec<((u8, usize, usize), String)>,
    /// Largest size among the symbols.
    size: u64,
}

impl Func {
    fn best(&self) -> &str {
        self.names
            .iter()
            .min()
            .map(|(_, n)| n.as_str())
            .unwrap_or("")
    }
}

struct Section<'d> {
    name: String,
    address: u64,
    data: &'d [u8],
    exec: bool,
}

struct Image<'d> {
    sections: Vec<Section<'d>>,
    funcs: BTreeMap<u64, Func>,
    /// `STT_GNU_IFUNC` symbols (their resolvers) by address, where no function symbol is.
    ifuncs: BTreeMap<u64, Func>,
    relocs: HashMap<u64, Reloc>,
    /// (address, source) of every table entry, in table order, deduplicated.
    entries: Vec<(u64, Source)>,
    /// The FDEs of `.eh_frame`, sorted by start, and every landing pad of their LSDAs
    /// (sorted); the error when they cannot be read.
    unwind: Result<Unwind, EhError>,
    /// See [`entry_points`].
    entry_points: Vec<u64>,
    relocation: Relocation,
}

/// What `.eh_frame` says about an object.
#[derive(Default)]
struct Unwind {
    fdes: Vec<ehframe::Fde>,
    pads: Vec<u64>,
}

/// Where control may enter code of the object other than at a function's entry, as
/// seen from all of its code: jumps and calls from one function into another, labels
/// whose address is taken (`lea` from code, `R_X86_64_RELATIVE` from data). Sorted.
fn entry_points(image: &Image<'_>) -> Vec<u64> {
    let mut ranges: Vec<(u64, u64)> = image
        .funcs
        .iter()
        .chain(&image.ifuncs)
        .map(|(&a, f)| (a, f.size))
        .collect();
    if let Ok(u) = &image.unwind {
        ranges.extend(u.fdes.iter().map(|f| (f.start, f.len)));
    }
    ranges.sort_unstable();
    ranges.dedup();
    let mut out = Vec::new();
    for (start, size) in ranges {
        let Some(code) = image.code_at(start) else {
            continue;
        };
        let len = usize::try_from(size).map_or(code.len(), |n| n.min(code.len()));
        relocate::outside_targets(&code[..len], start, &mut out);
    }
    out.extend(
        image
            .relocs
            .values()
            .filter(|r| r.r_type == elf::R_X86_64_RELATIVE)
            .map(|r| r.addend as u64),
    );
    out.sort_unstable();
    out.dedup();
    out
}

impl<'d> Image<'d> {
    fn parse(data: &'d [u8], path: &Path, relocation: Relocation) -> Result<Self, SitesError> {
        let parse_err = |e: object::Error| SitesError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let unsupported = |what: String| SitesError::Unsupported {
            path: path.to_owned(),
            what,
        };
        if data.len() < 5 || &data[..4] != b"\x7fELF" {
            return Err(SitesError::Parse {
                path: path.to_owned(),
                message: "no ELF magic".into(),
            });
        }
        if data[4] != elf::ELFCLASS64.0 {
            return Err(unsupported("32-bit ELF".into()));
        }
        let file = ElfFile64::<Endianness>::parse(data).map_err(parse_err)?;
        let endian = file.endian();
        if !file.is_little_endian() {
            return Err(unsupported("big-endian".into()));
        }
        let header = file.elf_header();
        let machine = header.e_machine(endian);
        if machine != elf::EM_X86_64 {
            return Err(unsupported(format!("machine {machine:?}, not x86_64")));
        }
        let e_type = header.e_type(endian);
        if e_type != elf::ET_EXEC && e_type != elf::ET_DYN {
            return Err(unsupported(format!(
                "ELF type {e_type:?}, not an executable or shared object"
            )));
        }

        let mut sections = Vec::new();
        let mut exec_index = HashSet::new();
        for s in file.sections() {
            let hdr = s.elf_section_header();
            let flags = hdr.sh_flags(endian);
            if !flags.contains(elf::SHF_ALLOC) || hdr.sh_type(endian) == elf::SHT_NOBITS {
                continue;
            }
            let exec = flags.contains(elf::SHF_EXECINSTR);
            if exec {
                exec_index.insert(s.index());
            }
            sections.push(Section {
                name: s.name().unwrap_or("").to_owned(),
                address: s.address(),
                data: s.data().map_err(parse_err)?,
                exec,
            });
        }

        let (funcs, mut ifuncs) = collect_functions(&file, &exec_index);
        ifuncs.retain(|a, _| !funcs.contains_key(a));
        let relocs = collect_relocations(&file);
        let mut image = Image {
            sections,
            funcs,
            ifuncs,
            relocs,
            entries: Vec::new(),
            unwind: Ok(Unwind::default()),
            entry_points: Vec::new(),
            relocation,
        };
        if relocation == Relocation::Analyze {
            image.unwind = image.read_unwind();
            image.entry_points = entry_points(&image);
        }

        let mut seen = HashSet::new();
        for (name, source) in [
            ("__mcount_loc", Source::McountLoc),
            ("__patchable_function_entries", Source::PatchableEntries),
        ] {
            let tables: Vec<(u64, usize)> = image
                .sections
                .iter()
                .filter(|s| s.name == name)
                .map(|s| (s.address, s.data.len()))
                .collect();
            for (addr, len) in tables {
                for i in 0..len / 8 {
                    let slot = addr + 8 * i as u64;
                    match image.table_value(slot) {
                        Some(v) if v != 0 && seen.insert(v) => image.entries.push((v, source)),
                        _ => {}
                    }
                }
            }
        }
        Ok(image)
    }

    /// FDEs and landing pads from `.eh_frame` and `.gcc_except_table` (none when the
    /// object has no `.eh_frame`).
    fn read_unwind(&self) -> Result<Unwind, EhError> {
        let mut u = Unwind::default();
        for s in self.sections.iter().filter(|s| s.name == ".eh_frame") {
            u.fdes.extend(ehframe::fdes(s.data, s.address)?);
        }
        u.fdes.sort_by_key(|f| f.start);
        for f in &u.fdes {
            if let Some(lsda) = f.lsda {
                let Some((sec, _)) = self.locate(lsda) else {
                    return Err(EhError {
                        what: "LSDA outside the object's sections",
                        at: lsda,
                    });
                };
                u.pads
                    .extend(ehframe::landing_pads(sec.data, sec.address, lsda, f.start)?);
            }
        }
        u.pads.sort_unstable();
        u.pads.dedup();
        Ok(u)
    }

    /// Link-time addresses strictly inside `(fa, fa + size)` where control may arrive
    /// other than through the entry: other symbols, FDE starts, landing pads, and
    /// [`entry_points`] (jumps from other functions, addresses taken).
    fn known_targets(&self, fa: u64, size: u64) -> Result<Vec<u64>, Refusal> {
        let unwind = self.unwind.as_ref().map_err(|e| Refusal::UnwindInfo {
            why: format!(".eh_frame: {e}"),
        })?;
        let range = fa + 1..fa.saturating_add(size);
        let mut out: Vec<u64> = self
            .funcs
            .range(range.clone())
            .map(|(&a, _)| a)
            .chain(self.ifuncs.range(range.clone()).map(|(&a, _)| a))
            .collect();
        let from = unwind.fdes.partition_point(|f| f.start < range.start);
        out.extend(
            unwind.fdes[from..]
                .iter()
                .map(|f| f.start)
                .take_while(|a| range.contains(a)),
        );
        for list in [&unwind.pads, &self.entry_points] {
            let from = list.partition_point(|&p| p < range.start);
            out.extend(
                list[from..]
                    .iter()
                    .copied()
                    .take_while(|a| range.contains(a)),
            );
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The targets of a jump table, read from the file (relocations applied).
    fn table_targets(&self, t: &JumpTable, entry: u64) -> Result<Vec<u64>, Refusal> {
        let fail = |why: &str| Refusal::JumpTable {
            offset: t.jump.wrapping_sub(entry) as u32,
            table: t.table,
            why: why.to_owned(),
        };
        let n = t.entries as usize * t.entry_size();
        let (sec, off) = self
            .locate(t.table)
            .ok_or_else(|| fail("not in a section of the file"))?;
        let bytes = sec
            .data
            .get(off..off + n)
            .ok_or_else(|| fail("it runs past the end of its section"))?;
        let targets: Vec<u64> = match t.form {
            TableForm::Rel32 => bytes
                .chunks_exact(4)
                .map(|b| {
                    let d = i32::from_le_bytes(b.try_into().unwrap());
                    t.table.wrapping_add(d as i64 as u64)
                })
                .collect(),
            TableForm::Abs64 => (0..t.entries as u64)
                .map(|i| {
                    self.table_value(t.table + 8 * i)
                        .ok_or_else(|| fail("an entry is relocated against another object"))
                })
                .collect::<Result<_, _>>()?,
        };
        // A table as recognized sends control to code of this object, nowhere else.
        if targets
            .iter()
            .any(|&a| !self.locate(a).is_some_and(|(s, _)| s.exec))
        {
            return Err(fail("an entry does not point to code of this object"));
        }
        Ok(targets)
    }

    /// Whether the prologue of the function at `fa` (`size` bytes) can be relocated:
    /// (kind, bytes, patchable, reason, site address, known targets).
    fn relocation(
        &self,
        fa: u64,
        size: u64,
    ) -> (SiteKind, Vec<u8>, bool, Option<String>, u64, Vec<u64>) {
        if self.relocation == Relocation::OwnCode {
            return (
                SiteKind::None,
                Vec::new(),
                false,
                Some(OWN_CODE.to_owned()),
                fa,
                Vec::new(),
            );
        }
        let refused = |r: Refusal, known: Vec<u64>| {
            (
                SiteKind::None,
                Vec::new(),
                false,
                Some(format!("{CANNOT_RELOCATE}{r}")),
                fa,
                known,
            )
        };
        let code = self.code_at(fa).unwrap_or(&[]);
        let Ok(len) = usize::try_from(size) else {
            return refused(
                Refusal::PastEnd {
                    offset: 0,
                    size: u32::MAX,
                },
                Vec::new(),
            );
        };
        if code.len() < len {
            let r = Refusal::PastEnd {
                offset: code.len() as u32,
                size: size as u32,
            };
            return refused(r, Vec::new());
        }
        let mut known = match self.known_targets(fa, size) {
            Ok(k) => k,
            Err(r) => return refused(r, Vec::new()),
        };
        let mut read = |t: &JumpTable| self.table_targets(t, fa);
        match relocate::analyze_with_tables(&code[..len], fa, &known, &mut read) {
            Ok((p, table_targets)) => {
                known.extend(table_targets);
                known.sort_unstable();
                known.dedup();
                let skip = (p.patch_at - fa) as usize;
                let bytes = code[skip..skip + p.len as usize].to_vec();
                (SiteKind::Relocated, bytes, true, None, p.patch_at, known)
            }
            Err(r) => refused(r, known),
        }
    }

    /// The section holding `addr`, and the offset of `addr` in it.
    fn locate(&self, addr: u64) -> Option<(&Section<'d>, usize)> {
        self.sections.iter().find_map(|s| {
            let off = addr.checked_sub(s.address)?;
            (off < s.data.len() as u64).then_some((s, off as usize))
        })
    }

    /// The bytes of executable code from `addr` to the end of its section.
    fn code_at(&self, addr: u64) -> Option<&'d [u8]> {
        let (s, off) = self.locate(addr)?;
        s.exec.then(|| &s.data[off..])
    }

    fn read_u64(&self, addr: u64) -> Option<u64> {
        let (s, off) = self.locate(addr)?;
        let b = s.data.get(off..off + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The link-time value of the pointer stored at `slot`, relocations applied.
    fn table_value(&self, slot: u64) -> Option<u64> {
        match self.relocs.get(&slot) {
            Some(r) if r.r_type == elf::R_X86_64_RELATIVE => Some(r.addend as u64),
            Some(r) if r.r_type == elf::R_X86_64_64 => {
                r.sym_value.map(|v| v.wrapping_add(r.addend as u64))
            }
            // Another relocation (against an undefined symbol): not a local address.
            Some(_) => None,
            None => self.read_u64(slot),
        }
    }

    /// Names of whatever the GOT slot at `slot` points to.
    fn got_target_names(&self, slot: u64) -> Vec<String> {
        if let Some(r) = self.relocs.get(&slot) {
            if let Some(n) = &r.sym_name {
                return vec![n.clone()];
            }
            if r.r_type == elf::R_X86_64_RELATIVE {
                return self.func_names(r.addend as u64);
            }
            return Vec::new();
        }
        self.read_u64(slot)
            .map(|v| self.func_names(v))
            .unwrap_or_default()
    }

    fn func_names(&self, addr: u64) -> Vec<String> {
        self.funcs
            .get(&addr)
            .map(|f| f.names.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// Names of the function a direct call to `target` reaches: a symbol there, or the
    /// symbol a PLT stub there jumps to (`[endbr64] [bnd] jmp *disp32(%rip)`).
    fn call_target_names(&self, target: u64) -> Vec<String> {
        let direct = self.func_names(target);
        if !direct.is_empty() {
            return direct;
        }
        let Some((sec, off)) = self.locate(target) else {
            return Vec::new();
        };
        if !sec.exec || !sec.name.starts_with(".plt") {
            return Vec::new();
        }
        let stub = &sec.data[off..sec.data.len().min(off + 16)];
        for i in 0..stub.len().saturating_sub(5) {
            if stub[i] == 0xff && stub[i + 1] == 0x25 {
                let disp = i32::from_le_bytes(stub[i + 2..i + 6].try_into().unwrap());
                let slot = (target + i as u64 + 6).wrapping_add(disp as i64 as u64);
                return self.got_target_names(slot);
            }
        }
        Vec::new()
    }

    /// Classifies the entry at `addr`: (kind, bytes, patchable, reason).
    fn classify(
        &self,
        addr: u64,
        source: Source,
    ) -> Option<(SiteKind, Vec<u8>, bool, Option<String>)> {
        let code = self.code_at(addr)?;
        let unexpected = |table: &str| {
            let shown = &code[..code.len().min(6)];
            (
                SiteKind::None,
                Vec::new(),
                false,
                Some(format!(
                    "unexpected bytes {} at a {table} site; not patched",
                    hex(shown)
                )),
            )
        };
        let fentry_check = |kind: SiteKind, names: Vec<String>, what: String| {
            let bytes = code[..kind.len()].to_vec();
            if names.iter().any(|n| FENTRY_NAMES.contains(&n.as_str())) {
                (kind, bytes, true, None)
            } else if let Some(n) = names.first() {
                let reason =
                    format!("the call at the site goes to {n}, not __fentry__; not patched");
                (kind, bytes, false, Some(reason))
            } else {
                let reason = format!(
                    "the call at the site goes to {what}, which could not be identified as __fentry__; not patched"
                );
                (kind, bytes, false, Some(reason))
            }
        };
        let nop5 = code.len() >= 5 && code[..4] == [0x0f, 0x1f, 0x44, 0x00];
        Some(match source {
            Source::McountLoc => {
                if nop5 {
                    (SiteKind::Nop5, code[..5].to_vec(), true, None)
                } else if code.len() >= 5 && code[0] == 0xe8 {
                    let rel = i32::from_le_bytes(code[1..5].try_into().unwrap());
                    let target = (addr + 5).wrapping_add(rel as i64 as u64);
                    fentry_check(
                        SiteKind::Fentry,
                        self.call_target_names(target),
                        format!("{target:#x}"),
                    )
                } else if code.len() >= 6 && code[..2] == [0xff, 0x15] {
                    let disp = i32::from_le_bytes(code[2..6].try_into().unwrap());
                    let slot = (addr + 6).wrapping_add(disp as i64 as u64);
                    fentry_check(
                        SiteKind::FentryGot,
                        self.got_target_names(slot),
                        format!("the pointer at {slot:#x}"),
                    )
                } else {
                    unexpected("__mcount_loc")
                }
            }
            Source::PatchableEntries => {
                if nop5 {
                    (SiteKind::Nop5, code[..5].to_vec(), true, None)
                } else if code.len() >= 5 && code[..5] == [0x90; 5] {
                    (
                        SiteKind::NopSled,
                        code[..5].to_vec(),
                        true,
                        Some("five 1-byte nops (gcc -fpatchable-function-entry=5): turned into a 5-byte nop under a grace period at its first attach".into()),
                    )
                } else {
                    unexpected("__patchable_function_entries")
                }
            }
        })
    }

    fn sites(&self, path: &Path) -> Vec<FunctionSite> {
        let object: Arc<Path> = Arc::from(path);
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let mut out = Vec::new();
        let mut covered = HashSet::new();

        for &(entry, source) in &self.entries {
            let placement = self.function_of(entry);
            let addr = match placement {
                Some((fa, _, Placement::Before)) => fa,
                _ => entry,
            };
            let Some((kind, bytes, mut patchable, mut reason)) = self.classify(addr, source) else {
                // Not in code (an entry of a function removed by --gc-sections, …).
                continue;
            };
            let (func_addr, func) = match placement {
                Some((fa, f, placement)) => {
                    if !covered.insert(fa) {
                        // A second entry for the same function: the first one wins.
                        continue;
                    }
                    if let Placement::Interior(off) = placement {
                        patchable = false;
                        reason = Some(format!(
                            "the site is at {}+{off:#x}, not at the function's entry; not patched",
                            demangle(f.best())
                        ));
                    }
                    (fa, Some(f))
                }
                None => (addr, None),
            };
            let (name, mangled, aliases) = match func {
                Some(f) => names_of(f),
                None => (format!("{file_name}+{addr:#x}"), String::new(), Vec::new()),
            };
            out.push(FunctionSite {
                name,
                mangled,
                aliases,
                address: addr,
                function_address: func_addr,
                size: func.map_or(0, |f| f.size),
                object: object.clone(),
                kind,
                bytes,
                patchable,
                reason,
                known_targets: Vec::new(),
            });
        }

        for (&fa, f) in &self.funcs {
            if f.size == 0 || covered.contains(&fa) {
                continue;
            }
            let (name, mangled, aliases) = names_of(f);
            // gcc splits cold paths into `f.cold` symbols typed as functions: they are
            // jumped into from `f`, never called.
            let (kind, bytes, patchable, reason, address, known_targets) = if is_cold_part(&mangled)
            {
                let reason = format!(
                    "{name} is a cold part split off a function by the compiler, not a function entry"
                );
                (
                    SiteKind::None,
                    Vec::new(),
                    false,
                    Some(reason),
                    fa,
                    Vec::new(),
                )
            } else {
                self.relocation(fa, f.size)
            };
            out.push(FunctionSite {
                name,
                mangled,
                aliases,
                address,
                function_address: fa,
                size: f.size,
                object: object.clone(),
                kind,
                bytes,
                patchable,
                reason,
                known_targets,
            });
        }

        // Indirect functions: the symbol is the resolver's.
        for (&fa, f) in &self.ifuncs {
            let (name, mangled, aliases) = names_of(f);
            let reason = format!(
                "{name} is a GNU indirect function (STT_GNU_IFUNC): its symbol is the resolver, run once at load time; the implementation it selects is listed under its own name or address"
            );
            out.push(FunctionSite {
                name,
                mangled,
                aliases,
                address: fa,
                function_address: fa,
                size: f.size,
                object: object.clone(),
                kind: SiteKind::None,
                bytes: Vec::new(),
                patchable: false,
                reason: Some(reason),
                known_targets: Vec::new(),
            });
        }

        // Functions only `.eh_frame` knows (stripped objects): an FDE that starts
        // outside every symbol's range.
        if let Ok(unwind) = &self.unwind {
            let listed: HashSet<u64> = out.iter().map(|s| s.function_address).collect();
            for fde in &unwind.fdes {
                let fa = fde.start;
                if listed.contains(&fa) || self.enclosing(fa) {
                    continue;
                }
                match self.locate(fa) {
                    Some((sec, _)) if sec.exec && !sec.name.starts_with(".plt") => {}
                    _ => continue,
                }
                let name = format!("{file_name}+{fa:#x}");
                let (kind, bytes, patchable, reason, address, known_targets) = if fde.entry_like {
                    self.relocation(fa, fde.len)
                } else {
                    let reason = format!(
                        "{name} does not start like a function entry (its unwind information starts mid-frame): a part split off a function, not an entry"
                    );
                    (
                        SiteKind::None,
                        Vec::new(),
                        false,
                        Some(reason),
                        fa,
                        Vec::new(),
                    )
                };
                out.push(FunctionSite {
                    name,
                    mangled: String::new(),
                    aliases: Vec::new(),
                    address,
                    function_address: fa,
                    size: fde.len,
                    object: object.clone(),
                    kind,
                    bytes,
                    patchable,
                    reason,
                    known_targets,
                });
            }
        }
        out.sort_by_key(|s| (s.address, s.function_address));
        out
    }

    /// Whether `addr` is strictly inside a sized function symbol's range.
    fn enclosing(&self, addr: u64) -> bool {
        [&self.funcs, &self.ifuncs].iter().any(|m| {
            m.range(..addr)
                .next_back()
                .is_some_and(|(&fa, f)| addr - fa < f.size)
        })
    }

    /// The function a table entry belongs to, and where the entry is relative to it.
    fn function_of(&self, addr: u64) -> Option<(u64, &Func, Placement)> {
        if let Some(f) = self.funcs.get(&addr) {
            return Some((addr, f, Placement::Entry));
        }
        if let Some((&fa, f)) = self.funcs.range(..addr).next_back()
            && addr - fa < f.size
        {
            let off = addr - fa;
            let after_endbr = off == 4 && self.code_at(fa).is_some_and(|c| c.starts_with(&ENDBR64));
            let placement = if after_endbr {
                Placement::Entry
            } else {
                Placement::Interior(off)
            };
            return Some((fa, f, placement));
        }
        if let Some((&na, f)) = self.funcs.range(addr..).next()
            && na - addr <= MAX_PREFIX
        {
            return Some((na, f, Placement::Before));
        }
        None
    }
}

/// Where a table entry is relative to the function it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// At the entry (possibly right after an `endbr64`).
    Entry,
    /// Inside the function, this many bytes after its start.
    Interior(u64),
    /// Before the symbol: `-fpatchable-function-entry=N,M` with M > 0 puts M nops
    /// before the entry and N-M after it; the site is then taken at the entry.
    Before,
}

/// (demangled name, mangled name, demangled aliases) of a function.
fn names_of(f: &Func) -> (String, String, Vec<String>) {
    let mangled = f.best().to_owned();
    let name = demangle(&mangled);
    let mut aliases: Vec<String> = f
        .names
        .iter()
        .map(|(_, n)| demangle(n))
        .filter(|n| *n != name)
        .collect();
    aliases.sort();
    aliases.dedup();
    (name, mangled, aliases)
}

/// Function symbols (STT_FUNC, defined in an executable section) by address, from
/// `.symtab` and `.dynsym` together (a stripped object keeps only `.dynsym`; a static
/// function is only in `.symtab`), and `STT_GNU_IFUNC` symbols apart: their address is
/// the resolver's, not the function's.
fn collect_functions(
    file: &ElfFile64<'_, Endianness>,
    exec_sections: &HashSet<object::SectionIndex>,
) -> (BTreeMap<u64, Func>, BTreeMap<u64, Func>) {
    let endian = file.endian();
    let mut funcs: BTreeMap<u64, Func> = BTreeMap::new();
    let mut ifuncs: BTreeMap<u64, Func> = BTreeMap::new();
    for sym in file.symbols().chain(file.dynamic_symbols()) {
        let raw = sym.elf_symbol();
        let map = match raw.st_type() {
            elf::STT_FUNC => &mut funcs,
            elf::STT_GNU_IFUNC => &mut ifuncs,
            _ => continue,
        };
        let Some(idx) = sym.section_index() else {
            continue;
        };
        if !exec_sections.contains(&idx) || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if name.is_empty() {
            continue;
        }
        let bind_rank = match raw.st_bind() {
            elf::STB_GLOBAL => 0,
            elf::STB_WEAK => 1,
            _ => 2,
        };
        let underscores = name.bytes().take_while(|&b| b == b'_').count();
        let f = map.entry(sym.address()).or_default();
        f.size = f.size.max(raw.st_size(endian));
        f.names
            .push(((bind_rank, underscores, name.len()), name.to_owned()));
    }
    for f in funcs.values_mut().chain(ifuncs.values_mut()) {
        // The same name from both tables: keep its best rank.
        f.names.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        f.names.dedup_by(|a, b| a.1 == b.1);
        f.names.sort();
    }
    (funcs, ifuncs)
}

/// Dynamic relocations (`.rela.dyn`, `.rela.plt`) by the address they patch.
fn collect_relocations(file: &ElfFile64<'_, Endianness>) -> HashMap<u64, Reloc> {
    let mut out = HashMap::new();
    let Some(relocs) = file.dynamic_relocations() else {
        return out;
    };
    let dynsym = file.dynamic_symbol_table();
    for (offset, r) in relocs {
        let RelocationFlags::Elf { r_type } = r.flags() else {
            continue;
        };
        let (mut sym_name, mut sym_value) = (None, None);
        if let RelocationTarget::Symbol(idx) = r.target()
            && let Some(sym) = dynsym.as_ref().and_then(|t| t.symbol_by_index(idx).ok())
        {
            sym_name = sym.name().ok().filter(|n| !n.is_empty()).map(str::to_owned);
            if !sym.is_undefined() {
                sym_value = Some(sym.address());
            }
        }
        out.insert(
            offset,
            Reloc {
                r_type,
                addend: r.addend(),
                sym_name,
                sym_value,
            },
        );
    }
    out
}

/// `f.cold`, `f.cold.3`, `f.part.0.cold`: a compiler-split cold part.
fn is_cold_part(name: &str) -> bool {
    name.ends_with(".cold") || name.contains(".cold.")
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
