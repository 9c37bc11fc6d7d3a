//! Installing and removing trampolines: resolving a callback group, planning slots
//! (runs of sites within rel32 reach of one arena window), generating and writing the
//! code, patching the sites, and later unpatching them and — on the server's word only
//! — freeing the memory, the descriptor and the counter indexes.
//!
//! Invariants:
//! - a trampoline's memory and descriptor are released only in [`Installer::free`],
//!   i.e. after the server saw every thread quiescent since the trampoline's
//!   retirement; freed memory is poisoned (int3);
//! - the epoch is bumped only after an unpatch batch completed (the patcher serializes
//!   every core after its last write), so stamps `>= e` prove a thread is outside.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;

use super::catalogue::Catalogue;
use super::grace::Grace;
use crate::control::arena::{Arena, Slot, Window};
use crate::control::callbacks;
use crate::control::counters::Counters;
use crate::control::patch::relocated::RelocOp;
use crate::control::patch::{self, Op, PatchError, Patcher};
use crate::control::sites::{FunctionSite, SiteKind};
use crate::control::{log, timeline};
use crate::hot::dispatch::{self, Action, Descriptor};
use crate::hot::qs::EPOCH;
use crate::hot::{ranges, stats};
use crate::tramp::relocate::{self, Prologue};
use crate::tramp::{self, Layout, Thunk};

/// Sites per trampoline slot (a slot must fit in an arena chunk).
const SITES_PER_SLOT: usize = 1000;

enum TState {
    Live,
    Retired { epoch: u64, tids: Vec<u32> },
}

struct Tramp {
    group: Vec<pb::TracerRef>,
    /// Sites calling it now.
    sites: BTreeSet<u64>,
    /// Its relocated sites: site -> (its thunk, the prologue bytes the jump replaced).
    relocated: BTreeMap<u64, (usize, Vec<u8>)>,
    slots: Vec<Slot>,
    desc: Box<Descriptor>,
    state: TState,
    /// (tracer, site, counter index) of its `count` tracers.
    counts: Vec<(u64, u64, u32)>,
    /// (tracer, counter index) of its `trace` tracers' drops.
    drops: Vec<(u64, u32)>,
    /// (tracer, site, counter range base) of its `latency` tracers.
    latency: Vec<(u64, u64, u32)>,
}

/// The final totals of a freed trampoline's counters.
pub(crate) struct Freed {
    /// (tracer, site, count).
    pub counts: Vec<(u64, u64, u64)>,
    /// (tracer, dropped events).
    pub drops: Vec<(u64, u64)>,
    /// (tracer, site, totals of the latency range: layout `exit::lat`).
    pub latency: Vec<(u64, u64, Vec<u64>)>,
}

/// A callback group resolved for the hot path, with the counter indexes it holds.
struct Group {
    /// Moved into the trampoline's descriptor.
    actions: Vec<Action>,
    /// (tracer, site, counter index) of its `count` tracers, in site order per tracer.
    counts: Vec<(u64, u64, u32)>,
    /// (tracer, counter index) of its `trace` tracers' drops.
    drops: Vec<(u64, u32)>,
    /// (tracer, site, counter range base) of its `latency` tracers.
    latency: Vec<(u64, u64, u32)>,
}

impl Group {
    /// Gives its counter indexes back (the install failed; nothing counted in them).
    fn release(&self, counters: &mut Counters) {
        for &(_, _, x) in &self.counts {
            counters.free(x);
        }
        for &(_, x) in &self.drops {
            counters.free(x);
        }
        for &(_, _, b) in &self.latency {
            counters.free_range(b);
        }
    }
}

/// The trampolines of this process, from install to free.
pub(crate) struct Installer {
    arena: Arena,
    ranges_registered: usize,
    tramps: BTreeMap<u64, Tramp>,
    /// The trampoline each patched site calls.
    owner: HashMap<u64, u64>,
    counters: Counters,
    /// `fs`-relative offset of the thread's block pointer, for the count and trace
    /// stubs (None: every group goes through the generic stub).
    tls_offset: Option<i32>,
    /// Live trampolines whose `Remove` was refused for a passing reason (a thread
    /// blocking SIGTRAP): retried on every tick.
    pending_removes: BTreeSet<u64>,
    /// The thread whose blocking of SIGTRAP deferred them.
    sigtrap_blocker: Option<u32>,
}

fn report(id: u64, r: pb::trampoline_report::Report) -> FromAgent {
    FromAgent::Trampoline(pb::TrampolineReport {
        trampoline_id: id,
        report: Some(r),
    })
}

fn failed(id: u64, reason: String) -> FromAgent {
    report(
        id,
        pb::trampoline_report::Report::Failed(pb::InstallFailed { reason }),
    )
}

/// The patchable sites of an install (sorted, unique), and why the others are skipped.
fn resolve_sites(
    i: &pb::Install,
    catalogue: &Catalogue,
) -> Result<(Vec<u64>, Vec<pb::SiteError>), String> {
    let mut skipped = Vec::new();
    let mut sites: Vec<u64> = Vec::new();
    for s in &i.sites {
        match catalogue.get(s.address) {
            Some(f) if f.patchable => sites.push(s.address),
            Some(f) => skipped.push(pb::SiteError {
                site: Some(s.clone()),
                reason: f.reason.clone().unwrap_or_else(|| "not patchable".into()),
            }),
            None => skipped.push(pb::SiteError {
                site: Some(s.clone()),
                reason: "no patchable function at this address in this process".into(),
            }),
        }
    }
    sites.sort_unstable();
    sites.dedup();
    if sites.is_empty() {
        return Err("no site of this install is patchable here".into());
    }
    Ok((sites, skipped))
}

/// The arena window of a run of sites, if one window reaches them all.
fn window_of(sites: &[u64]) -> Option<Window> {
    Window::for_calls_from(&sites.iter().map(|s| *s as usize).collect::<Vec<_>>())
}

impl Installer {
    pub(crate) fn new(tls_offset: Option<i32>) -> Installer {
        crate::hot::exit::init();
        Installer {
            arena: Arena::new(),
            ranges_registered: 0,
            tramps: BTreeMap::new(),
            owner: HashMap::new(),
            counters: Counters::new(),
            tls_offset,
            pending_removes: BTreeSet::new(),
            sigtrap_blocker: None,
        }
    }

    /// The counter indexes of every trampoline.
    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(crate) fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// (tracer, site, counter index) of the `count` tracers of every trampoline.
    pub(crate) fn counts(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.tramps.values().flat_map(|t| t.counts.iter().copied())
    }

    /// (tracer, counter index) of the dropped events of every trampoline's `trace`
    /// tracers.
    pub(crate) fn drops(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.tramps.values().flat_map(|t| t.drops.iter().copied())
    }

    /// (tracer, site, counter range base) of the `latency` tracers of every trampoline.
    pub(crate) fn latency(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.tramps.values().flat_map(|t| t.latency.iter().copied())
    }

    /// The highest epoch a retired trampoline's grace period waits for (0: none).
    pub(crate) fn retired_need(&self) -> u64 {
        self.tramps
            .values()
            .filter_map(|t| match t.state {
                TState::Retired { epoch, .. } => Some(epoch),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Every trampoline, for the hello of a new session.
    pub(crate) fn statuses(&self, catalogue: &Catalogue) -> Vec<pb::TrampolineStatus> {
        self.tramps
            .iter()
            .map(|(id, t)| {
                let (state, epoch, tids) = match &t.state {
                    TState::Live => (pb::TrampolineState::Live, 0, vec![]),
                    TState::Retired { epoch, tids } => {
                        (pb::TrampolineState::Retired, *epoch, tids.clone())
                    }
                };
                pb::TrampolineStatus {
                    trampoline_id: *id,
                    state: state as i32,
                    tracers: t.group.clone(),
                    sites: t.sites.iter().map(|&s| catalogue.site(s)).collect(),
                    retired_epoch: epoch,
                    retired_tids: tids,
                }
            })
            .collect()
    }

    /// In a forked child: the inherited trampolines stay (their code is patched in),
    /// but nothing has counted yet (the caller zeroed the blocks' counters) and no
    /// remove is pending.
    pub(crate) fn forked_child(&mut self) {
        self.counters.forget_exited();
        self.pending_removes.clear();
    }

    // --------------------------------------------------------------- install

    /// Installs trampoline `i.trampoline_id`; returns its `Live` or `Failed` report.
    pub(crate) fn install(
        &mut self,
        i: pb::Install,
        catalogue: &Catalogue,
        grace: &mut Grace,
        out: &mut Vec<FromAgent>,
    ) -> FromAgent {
        let id = i.trampoline_id;
        if self.tramps.contains_key(&id) {
            return failed(id, format!("trampoline {id} already exists"));
        }
        match self.try_install(&i, catalogue, grace, out) {
            Ok((sites, skipped)) => report(
                id,
                pb::trampoline_report::Report::Live(pb::Live { sites, skipped }),
            ),
            Err(reason) => failed(id, reason),
        }
    }

    fn try_install(
        &mut self,
        i: &pb::Install,
        catalogue: &Catalogue,
        grace: &mut Grace,
        out: &mut Vec<FromAgent>,
    ) -> Result<(Vec<pb::Site>, Vec<pb::SiteError>), String> {
        let id = i.trampoline_id;
        let (sites, skipped) = resolve_sites(i, catalogue)?;
        // gcc nop sleds become 5-byte nops first (once per site, under a grace period).
        let sleds: Vec<usize> = sites
            .iter()
            .filter(|&&s| {
                catalogue
                    .get(s)
                    .is_some_and(|f| f.kind == SiteKind::NopSled)
            })
            .map(|&s| s as usize)
            .collect();
        if !sleds.is_empty() {
            convert_sleds(&sleds, grace, out)?;
        }
        // Relocated prologues: checked in memory and analysed again; a site that fails
        // is skipped with the reason.
        let mut skipped = skipped;
        let mut prologues: HashMap<u64, (Prologue, Vec<u8>)> = HashMap::new();
        let mut sites = sites;
        sites.retain(|&s| {
            let Some(f) = catalogue.get(s).filter(|f| f.kind == SiteKind::Relocated) else {
                return true;
            };
            match self.check_prologue(f) {
                Ok(p) => {
                    prologues.insert(s, (p, f.bytes.clone()));
                    true
                }
                Err(reason) => {
                    skipped.push(pb::SiteError {
                        site: Some(catalogue.site(s)),
                        reason,
                    });
                    false
                }
            }
        });
        if sites.is_empty() {
            return Err(format!(
                "no site of this install is patchable here: {}",
                skipped
                    .iter()
                    .map(|e| e.reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        let mut group = self.resolve_group(&i.tracers, &sites)?;
        let hooks_exit = group.actions.iter().any(Action::hooks_exit);
        let mut desc = Box::new(Descriptor {
            live: std::sync::atomic::AtomicU64::new(dispatch::DESC_LIVE),
            sites: sites.clone().into(),
            actions: std::mem::take(&mut group.actions).into(),
            exit: 0,
        });
        if hooks_exit {
            match crate::hot::exit::register(&desc) {
                Some(token) => desc.exit = token,
                None => {
                    group.release(&mut self.counters);
                    return Err(format!(
                        "all {} exit-hooked trampolines of this process are in use: detach \
                         some latency tracers",
                        crate::hot::exit::MAX_EXITS
                    ));
                }
            }
        }
        let (slots, ops, thunks) = match self.write_slots(&sites, &desc, &group.counts, &prologues)
        {
            Ok(x) => x,
            Err(e) => {
                group.release(&mut self.counters);
                release_exit(&desc);
                return Err(e);
            }
        };
        self.register_ranges();
        let relocated: BTreeMap<u64, (usize, Vec<u8>)> = thunks
            .iter()
            .map(|&(s, thunk)| (s, (thunk, prologues[&s].1.clone())))
            .collect();
        if let Err(e) = self.patch_install(&ops, &relocated, grace, out) {
            if e.wrote {
                // Threads may have run the new thunks (a trap at a patch point jumps
                // there) and may still: the memory, descriptor and counters stay
                // allocated for good (never seen in practice: a grace period that
                // failed, or a failed write).
                log::warn(&format!(
                    "trampoline {id}: install failed after code was written; its memory \
                     is kept: {}",
                    e.message
                ));
                Box::leak(desc);
                return Err(format!("patching failed: {}", e.message));
            }
            // Nothing was patched (the patcher validates a batch before writing).
            for s in slots {
                let _ = self.arena.free(s);
            }
            group.release(&mut self.counters);
            release_exit(&desc);
            return Err(format!("patching failed: {}", e.message));
        }
        for &s in &sites {
            if let Some(old) = self.owner.insert(s, id)
                && let Some(t) = self.tramps.get_mut(&old)
            {
                t.sites.remove(&s);
            }
        }
        stats::bump(&stats::TRAMPOLINES_INSTALLED);
        self.tramps.insert(
            id,
            Tramp {
                group: i.tracers.clone(),
                sites: sites.iter().copied().collect(),
                relocated,
                slots,
                desc,
                state: TState::Live,
                counts: group.counts,
                drops: group.drops,
                latency: group.latency,
            },
        );
        let live = sites.iter().map(|&s| catalogue.site(s)).collect();
        Ok((live, skipped))
    }

    /// Resolves the tracers of a group into hot-path actions, allocating their counter
    /// indexes (given back on failure).
    fn resolve_group(&mut self, tracers: &[pb::TracerRef], sites: &[u64]) -> Result<Group, String> {
        let mut group = Group {
            actions: Vec::new(),
            counts: Vec::new(),
            drops: Vec::new(),
            latency: Vec::new(),
        };
        for t in tracers {
            if let Err(e) = self.resolve_tracer(t, sites, &mut group) {
                group.release(&mut self.counters);
                return Err(e);
            }
        }
        Ok(group)
    }

    fn resolve_tracer(
        &mut self,
        t: &pb::TracerRef,
        sites: &[u64],
        group: &mut Group,
    ) -> Result<(), String> {
        let cb = t.callback.clone().unwrap_or_default();
        match pb::CallbackKind::try_from(cb.kind) {
            Ok(pb::CallbackKind::Count) => {
                let mut idx = Vec::with_capacity(sites.len());
                for &s in sites {
                    let x = self.counters.alloc().map_err(|e| e.to_string())?;
                    idx.push(x);
                    group.counts.push((t.tracer_id, s, x));
                }
                group.actions.push(Action::Count { idx: idx.into() });
            }
            Ok(pb::CallbackKind::Trace) => {
                let x = self.counters.alloc().map_err(|e| e.to_string())?;
                group.drops.push((t.tracer_id, x));
                group.actions.push(Action::Trace {
                    tracer: t.tracer_id,
                    nargs: cb.arg_count.min(6),
                    dropped_idx: x,
                });
            }
            Ok(pb::CallbackKind::Latency) => {
                let mut base = Vec::with_capacity(sites.len());
                for &s in sites {
                    let b = self.counters.alloc_range().map_err(|e| e.to_string())?;
                    base.push(b);
                    group.latency.push((t.tracer_id, s, b));
                }
                group.actions.push(Action::Latency { base: base.into() });
            }
            Ok(pb::CallbackKind::Custom) => match callbacks::get(&cb.custom_name) {
                Some(f) => group.actions.push(Action::Custom { f }),
                None => {
                    return Err(format!(
                        "no callback named '{}' is registered in this program",
                        cb.custom_name
                    ));
                }
            },
            _ => {
                return Err(format!(
                    "callback kind {} is not supported by this agent yet",
                    cb.kind
                ));
            }
        }
        Ok(())
    }

    /// Plans the slots of a trampoline (runs of sites within rel32 reach of one window,
    /// at most [`SITES_PER_SLOT`]), generates and writes their code, and returns them
    /// with the patch ops that make the sites call them. Nothing is left allocated on
    /// failure.
    #[allow(clippy::type_complexity)]
    fn write_slots(
        &mut self,
        sites: &[u64],
        desc: &Descriptor,
        counts: &[(u64, u64, u32)],
        prologues: &HashMap<u64, (Prologue, Vec<u8>)>,
    ) -> Result<(Vec<Slot>, Vec<Op>, Vec<(u64, usize)>), String> {
        let desc_ptr = desc as *const Descriptor as u64;
        let actions = &desc.actions;
        let count_only = actions.len() == 1 && matches!(actions[0], Action::Count { .. });
        // One trace tracer: a trace stub writes the event itself (no dispatch).
        let trace_only = match &actions[..] {
            [
                Action::Trace {
                    tracer,
                    nargs,
                    dropped_idx,
                },
            ] => Some((*tracer, *nargs, *dropped_idx)),
            _ => None,
        };
        // Thunk sizes of the relocated sites (a slot must fit in an arena chunk).
        let mut thunk_lens = HashMap::with_capacity(prologues.len());
        for (&s, (p, _)) in prologues {
            let n = tramp::thunk_len(p).map_err(|e| format!("site {s:#x}: {e}"))?;
            thunk_lens.insert(s, n);
        }
        // Bytes a site adds to its slot: its count stub, its thunk.
        let cost = |s: u64| {
            (if count_only { tramp::COUNT_STUB } else { 0 })
                + thunk_lens.get(&s).copied().unwrap_or(0)
        };
        let fixed = tramp::thunks_base(&Layout::Trace {
            tracer: 0,
            nargs: 6,
            dropped_idx: 0,
            tls_offset: 0,
        });
        let mut slots = Vec::new();
        let mut ops = Vec::new();
        let mut thunks_out = Vec::new();
        let mut pos = 0;
        let free_all = |arena: &mut Arena, slots: Vec<Slot>| {
            for s in slots {
                let _ = arena.free(s);
            }
        };
        while pos < sites.len() {
            let mut end = pos + 1;
            let mut bytes = fixed + cost(sites[pos]);
            while end < sites.len()
                && end - pos < SITES_PER_SLOT
                && bytes + cost(sites[end]) <= crate::control::arena::CHUNK_BYTES
                && window_of(&sites[pos..=end]).is_some()
            {
                bytes += cost(sites[end]);
                end += 1;
            }
            let chunk = &sites[pos..end];
            let idx: Vec<u32> = if count_only {
                // One count tracer: `counts` holds its counters in `sites` order.
                counts[pos..end]
                    .iter()
                    .zip(chunk)
                    .map(|(c, s)| {
                        debug_assert_eq!(c.1, *s);
                        c.2
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let layout = match (count_only, trace_only, self.tls_offset) {
                (true, _, Some(off)) => Layout::Count {
                    idx: &idx,
                    tls_offset: off,
                },
                (_, Some((tracer, nargs, dropped_idx)), Some(off)) => Layout::Trace {
                    tracer,
                    nargs,
                    dropped_idx,
                    tls_offset: off,
                },
                _ => Layout::Generic,
            };
            let window = window_of(chunk).expect("checked above");
            let thunks: Vec<Thunk<'_>> = chunk
                .iter()
                .enumerate()
                .filter_map(|(index, s)| {
                    prologues
                        .get(s)
                        .map(|(prologue, _)| Thunk { index, prologue })
                })
                .collect();
            let lens: Vec<usize> = thunks
                .iter()
                .map(|t| thunk_lens[&t.prologue.patch_at])
                .collect();
            let slot = match self
                .arena
                .alloc(window, tramp::slot_len_with(&layout, &lens))
            {
                Ok(s) => s,
                Err(e) => {
                    free_all(&mut self.arena, slots);
                    return Err(format!("no trampoline memory near the code: {e}"));
                }
            };
            let code = match tramp::generate_with_thunks(
                &layout,
                desc_ptr,
                dispatch::generic_entry(),
                slot.addr() as u64,
                &thunks,
                &lens,
            ) {
                Ok(x) => x,
                Err(e) => {
                    let _ = self.arena.free(slot);
                    free_all(&mut self.arena, slots);
                    return Err(format!("relocating a prologue into the trampoline: {e}"));
                }
            };
            if let Err(e) = self.arena.write_and_seal(&slot, &code.0) {
                let _ = self.arena.free(slot);
                free_all(&mut self.arena, slots);
                return Err(format!("writing the trampoline failed: {e}"));
            }
            let mut thunk_at = thunks.iter().zip(&code.1).peekable();
            for (k, &s) in chunk.iter().enumerate() {
                if let Some((t, off)) = thunk_at.next_if(|(t, _)| t.index == k) {
                    debug_assert_eq!(t.prologue.patch_at, s);
                    thunks_out.push((s, slot.addr() + off));
                    continue;
                }
                ops.push(Op::Call {
                    site: s as usize,
                    target: slot.addr() + tramp::site_entry(&layout, k),
                });
            }
            slots.push(slot);
            pos = end;
        }
        Ok((slots, ops, thunks_out))
    }

    /// The prologue of relocated site `f`, read from memory and analysed again (what
    /// discovery saw in the file may have changed: a refusal or a mismatch skips the
    /// site with the reason). A site this agent already made jump to a thunk is
    /// analysed with its original bytes in place of the jump.
    fn check_prologue(&self, f: &FunctionSite) -> Result<Prologue, String> {
        let len = f.bytes.len();
        let at = f.address.wrapping_sub(f.function_address) as usize;
        if f.size == 0 || f.address < f.function_address || (at + len) as u64 > f.size {
            return Err(format!(
                "relocated site {:#x}: its {len} prologue bytes are not inside the function \
                 ({:#x}, {} bytes)",
                f.address, f.function_address, f.size
            ));
        }
        let mut code = patch::peek(f.function_address as usize, f.size as usize)
            .map_err(|e| format!("reading the function's code failed: {e}"))?;
        let now = &code[at..at + len];
        if now != f.bytes.as_slice() {
            let ours = self
                .owner
                .get(&f.address)
                .and_then(|id| self.tramps.get(id))
                .is_some_and(|t| t.relocated.contains_key(&f.address));
            if !ours {
                return Err(format!(
                    "the prologue in memory ({now:02x?}) is not the one in the file \
                     ({:02x?}): the code changed since it was loaded",
                    f.bytes
                ));
            }
            code[at..at + len].copy_from_slice(&f.bytes);
        }
        let p = relocate::analyze(&code, f.function_address, &f.known_targets)
            .map_err(|r| format!("prologue not relocatable: {r}"))?;
        if p.patch_at != f.address || p.len as usize != len {
            return Err(format!(
                "the prologue analysed in memory is {} bytes at {:#x}, discovery said {len} at \
                 {:#x}",
                p.len, p.patch_at, f.address
            ));
        }
        Ok(p)
    }

    /// Patches an install: the relocated sites first (a grace period local to the
    /// process when one is installed over its prologue), then the call sites. If the
    /// call batch fails, the relocated sites go back to what they were.
    fn patch_install(
        &self,
        ops: &[Op],
        relocated: &BTreeMap<u64, (usize, Vec<u8>)>,
        grace: &mut Grace,
        out: &mut Vec<FromAgent>,
    ) -> Result<(), InstallPatchError> {
        let p = Patcher::global().map_err(|e| InstallPatchError::new(e, false))?;
        let jumps: Vec<RelocOp<'_>> = relocated
            .iter()
            .map(|(&s, (thunk, original))| RelocOp::Jump {
                site: s as usize,
                thunk: *thunk,
                original,
            })
            .collect();
        if !jumps.is_empty() {
            p.relocate(&jumps, &mut || grace.local_grace(out))
                .map_err(|e| InstallPatchError::new(e, true))?;
        }
        if ops.is_empty() {
            return Ok(());
        }
        let Err(e) = p.apply(ops) else {
            return Ok(());
        };
        // Put the relocated sites back: to the thunk they jumped to before, or their
        // prologue (moves and restores: no grace period).
        let back: Vec<RelocOp<'_>> = relocated
            .iter()
            .map(|(&s, (thunk, original))| {
                let before = self
                    .owner
                    .get(&s)
                    .and_then(|id| self.tramps.get(id))
                    .and_then(|t| t.relocated.get(&s));
                match before {
                    Some((old, _)) => RelocOp::Jump {
                        site: s as usize,
                        thunk: *old,
                        original,
                    },
                    None => RelocOp::Restore {
                        site: s as usize,
                        thunk: *thunk,
                        original,
                    },
                }
            })
            .collect();
        let wrote = !jumps.is_empty();
        if let Err(e2) = p.relocate(&back, &mut || Ok(())) {
            log::warn(&format!("putting relocated sites back failed: {e2}"));
        }
        Err(InstallPatchError::new(e, wrote))
    }

    /// Publishes the arena's new chunks to the signal handlers' code-range table.
    fn register_ranges(&mut self) {
        let ranges = self.arena.chunk_ranges();
        for &(s, e) in &ranges[self.ranges_registered.min(ranges.len())..] {
            if !ranges::add_range(s as u64, e as u64) {
                log::warn("trampoline range table full");
            }
        }
        self.ranges_registered = ranges.len();
    }

    /// Drops `sites` (of unloaded objects: never written again) from the trampolines
    /// that patched them; the trampolines themselves live on until removed and freed
    /// as usual.
    pub(crate) fn forget_sites(&mut self, sites: &[u64]) {
        for s in sites {
            if let Some(id) = self.owner.remove(s)
                && let Some(t) = self.tramps.get_mut(&id)
            {
                t.sites.remove(s);
                // A relocated site is never restored either: its range may hold another
                // object by now.
                t.relocated.remove(s);
            }
        }
    }

    // ---------------------------------------------------------------- remove

    /// Unpatches trampoline `r.trampoline_id` and reports it retired.
    pub(crate) fn remove(&mut self, r: pb::Remove, grace: &mut Grace, out: &mut Vec<FromAgent>) {
        let id = r.trampoline_id;
        let Some(t) = self.tramps.get(&id) else {
            out.push(FromAgent::Error(pb::AgentError {
                message: format!("remove: unknown trampoline {id}"),
            }));
            return;
        };
        if !matches!(t.state, TState::Live) {
            out.push(FromAgent::Error(pb::AgentError {
                message: format!("remove: trampoline {id} is already retired"),
            }));
            return;
        }
        if self.pending_removes.contains(&id) {
            // Already deferred (a repeated request after a reconnect): its `Retired`
            // goes out when the retry succeeds.
            return;
        }
        self.try_remove(id, grace, out);
    }

    /// Unpatches the sites of live trampoline `id` and reports it retired; on failure
    /// it stays live (and is retried when the failure is a SIGTRAP blocker).
    fn try_remove(&mut self, id: u64, grace: &mut Grace, out: &mut Vec<FromAgent>) {
        let Some(t) = self.tramps.get(&id) else {
            self.pending_removes.remove(&id);
            return;
        };
        let ops: Vec<Op> = t
            .sites
            .iter()
            .filter(|s| !t.relocated.contains_key(s))
            .map(|&s| Op::Nop { site: s as usize })
            .collect();
        // Relocated sites get their prologue back (no grace period: no thread is ever
        // inside a `jmp`; a trap meanwhile runs this trampoline's copy).
        let restores: Vec<RelocOp<'_>> = t
            .relocated
            .iter()
            .filter(|(s, _)| t.sites.contains(s))
            .map(|(&s, (thunk, original))| RelocOp::Restore {
                site: s as usize,
                thunk: *thunk,
                original,
            })
            .collect();
        let unpatched = Patcher::global().and_then(|p| {
            if !restores.is_empty() {
                p.relocate(&restores, &mut || Ok(()))?;
            }
            if !ops.is_empty() {
                p.apply(&ops)?;
            }
            Ok(())
        });
        if let Err(e) = unpatched {
            // The trampoline stays live and allocated: never retire what may still be
            // entered.
            // A thread blocking SIGTRAP would be killed by an int3 of the unpatch:
            // the remove is deferred and retried on every tick until no thread
            // blocks it (never dropped: the server waits for its `Retired`).
            if let PatchError::SigtrapBlocked { .. } | PatchError::TrapWindowBusy { .. } = e {
                if let PatchError::SigtrapBlocked { tid } = e {
                    self.sigtrap_blocker = Some(tid);
                }
                if self.pending_removes.insert(id) {
                    out.push(FromAgent::Error(pb::AgentError {
                        message: format!(
                            "remove of trampoline {id} deferred, it stays live until retried: {e}"
                        ),
                    }));
                }
            } else {
                self.pending_removes.remove(&id);
                out.push(FromAgent::Error(pb::AgentError {
                    message: format!("remove of trampoline {id} failed, it stays live: {e}"),
                }));
            }
            return;
        }
        self.pending_removes.remove(&id);
        timeline::mark(id, pb::GraceStep::AgentUnpatched);
        // Calls in flight through it drop their exits from now on. Before the epoch
        // bump: a thread stamped at the new epoch reads the cleared entry afterwards,
        // and one that read it live before is in the return path with its dispatch
        // depth raised, which holds the grace period off.
        if let Some(t) = self.tramps.get(&id)
            && t.desc.exit != 0
        {
            crate::hot::exit::retire(t.desc.exit);
        }
        // The unpatch is complete and every core serialized: a new epoch begins.
        super::grace::reclaim_signals();
        let epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        timeline::mark(id, pb::GraceStep::AgentEpochBumped);
        // Births and deaths since the last scan go out before the report, so that the
        // server never waits for a thread whose exit it was not told about.
        grace.scan_and_report(out);
        let tids: Vec<u32> = grace.known().iter().copied().collect();
        let t = self.tramps.get_mut(&id).expect("checked");
        for s in std::mem::take(&mut t.sites) {
            self.owner.remove(&s);
        }
        t.state = TState::Retired {
            epoch,
            tids: tids.clone(),
        };
        out.push(report(
            id,
            pb::trampoline_report::Report::Retired(pb::Retired { epoch, tids }),
        ));
        timeline::mark(id, pb::GraceStep::AgentRetiredSent);
    }

    /// Retries deferred removes once the thread that blocked SIGTRAP no longer does
    /// (threads blocking it for a moment, e.g. in `pthread_create`, are waited out by
    /// the patcher itself).
    pub(crate) fn retry_removes(&mut self, grace: &mut Grace, out: &mut Vec<FromAgent>) {
        if self.pending_removes.is_empty() {
            return;
        }
        if let Some(tid) = self.sigtrap_blocker
            && crate::sys::procfs::blocks_signal(tid, libc::SIGTRAP)
        {
            return;
        }
        self.sigtrap_blocker = None;
        let ids: Vec<u64> = self.pending_removes.iter().copied().collect();
        for id in ids {
            self.try_remove(id, grace, out);
        }
    }

    // ------------------------------------------------------------------ free

    /// Frees retired trampoline `id` (the server authorized it: its grace period is
    /// complete): its slots are poisoned and returned, its descriptor marked dead and
    /// dropped, its counter indexes freed. Returns their final totals. `before` runs
    /// first (the caller drains the rings, so events are attributed before the
    /// counters go).
    pub(crate) fn free(
        &mut self,
        id: u64,
        before: impl FnOnce(),
        out: &mut Vec<FromAgent>,
    ) -> Option<Freed> {
        let t = self.tramps.get(&id)?;
        if !matches!(t.state, TState::Retired { .. }) {
            out.push(FromAgent::Error(pb::AgentError {
                message: format!("authorize-free of trampoline {id} which is not retired: ignored"),
            }));
            return None;
        }
        before();
        let t = self.tramps.remove(&id).expect("checked");
        let freed = Freed {
            counts: t
                .counts
                .iter()
                .map(|&(tracer, site, idx)| (tracer, site, self.counters.free(idx)))
                .collect(),
            drops: t
                .drops
                .iter()
                .map(|&(tracer, idx)| (tracer, self.counters.free(idx)))
                .collect(),
            latency: t
                .latency
                .iter()
                .map(|&(tracer, site, b)| (tracer, site, self.counters.free_range(b)))
                .collect(),
        };
        release_exit(&t.desc);
        for s in t.slots {
            if let Err(e) = self.arena.free(s) {
                log::warn(&format!("freeing trampoline {id}: {e}"));
            }
        }
        t.desc.live.store(dispatch::DESC_DEAD, Ordering::Relaxed);
        drop(t.desc);
        stats::bump(&stats::TRAMPOLINES_FREED);
        out.push(report(
            id,
            pb::trampoline_report::Report::Freed(pb::Freed {}),
        ));
        Some(freed)
    }
}

/// Gives the exit-table entry of a descriptor back (its trampoline is freed, or was
/// never patched in).
fn release_exit(desc: &Descriptor) {
    if desc.exit != 0 {
        crate::hot::exit::retire(desc.exit);
        crate::hot::exit::release(desc.exit);
    }
}

/// A failed install patch: the message, and whether code was written (threads may
/// have run the new trampoline, which must then not be freed).
struct InstallPatchError {
    message: String,
    wrote: bool,
}

impl InstallPatchError {
    fn new(e: PatchError, after_write: bool) -> Self {
        // Errors of validation change nothing; the others come after a write.
        let wrote = after_write
            && matches!(
                e,
                PatchError::GracePeriod { .. }
                    | PatchError::Io { .. }
                    | PatchError::Membarrier { .. }
            );
        InstallPatchError {
            message: e.to_string(),
            wrote,
        }
    }
}

/// Converts gcc nop sleds into 5-byte nops ([`Patcher::convert_sleds`]), with a grace
/// period local to this process in the middle.
fn convert_sleds(
    sleds: &[usize],
    grace: &mut Grace,
    out: &mut Vec<FromAgent>,
) -> Result<(), String> {
    let patcher = Patcher::global().map_err(|e| e.to_string())?;
    let r = patcher
        .convert_sleds(sleds, &mut || grace.local_grace(out))
        .map_err(|e| format!("patching failed: {e}"))?;
    log::debug(&format!(
        "{} nop sleds converted to 5-byte nops ({} already were)",
        r.changed, r.unchanged
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::control::drain;
    use crate::control::patch::fixtures::{
        passes_in_child, patchbay_fx_rel_branch, patcher, rel_branch, rel_spin,
    };
    use crate::hot::block;

    fn function(address: u64, entry: u64, size: u64, bytes: Vec<u8>) -> FunctionSite {
        FunctionSite {
            name: format!("fx_{address:x}"),
            mangled: String::new(),
            aliases: Vec::new(),
            address,
            function_address: entry,
            size,
            object: Arc::from(Path::new("/fixture")),
            kind: SiteKind::Relocated,
            bytes,
            patchable: true,
            reason: None,
            known_targets: Vec::new(),
        }
    }

    fn install(id: u64, kind: pb::CallbackKind, nargs: u32, site: u64) -> pb::Install {
        pb::Install {
            trampoline_id: id,
            tracers: vec![pb::TracerRef {
                tracer_id: id,
                callback: Some(pb::CallbackSpec {
                    kind: kind as i32,
                    custom_name: String::new(),
                    arg_count: nargs,
                }),
            }],
            sites: vec![pb::Site {
                address: site,
                name: String::new(),
            }],
        }
    }

    fn report_of(r: &FromAgent) -> &pb::trampoline_report::Report {
        match r {
            FromAgent::Trampoline(pb::TrampolineReport {
                report: Some(rep), ..
            }) => rep,
            other => panic!("not a trampoline report: {other:?}"),
        }
    }

    fn code(at: u64, len: usize) -> Vec<u8> {
        patch::peek(at as usize, len).expect("readable code")
    }

    /// The runtime's installer on a relocated site (a function discovery found
    /// uninstrumented, entered by hand here): installs a `count` trampoline over the
    /// prologue (a real local grace period), moves the site to a `trace` trampoline
    /// (events name the site, with both arguments), restores the prologue on remove, and
    /// frees both; a site whose prologue in memory differs from discovery's is skipped
    /// with the reason. Runs in a child process (the local grace period waits for every
    /// thread of the process).
    #[test]
    fn relocated_site_installed_moved_restored_and_freed() {
        if passes_in_child(
            "control::runtime::installer::tests::relocated_site_installed_moved_restored_and_freed",
        ) {
            return;
        }
        patcher();
        let f = rel_branch();
        let (site, entry) = (f.site() as u64, f.entry as u64);
        let mut cat = Catalogue::new();
        cat.insert_for_test(function(site, entry, f.size as u64, f.original.clone()));
        let spin = rel_spin();
        let mut wrong = spin.original.clone();
        wrong[0] ^= 0xFF;
        let (spin_site, spin_entry) = (spin.site() as u64, spin.entry as u64);
        cat.insert_for_test(function(spin_site, spin_entry, spin.size as u64, wrong));
        let (tls, _) = block::tls_offsets().expect("static TLS");
        let mut inst = Installer::new(Some(tls));
        let mut grace = Grace::new();
        let mut out = Vec::new();
        let call = |a: u64, b: u64| {
            // SAFETY: plain fixture function of two u64.
            unsafe { patchbay_fx_rel_branch(black_box(a), black_box(b)) }
        };

        let r = inst.install(
            install(1, pb::CallbackKind::Count, 0, site),
            &cat,
            &mut grace,
            &mut out,
        );
        assert!(
            matches!(report_of(&r), pb::trampoline_report::Report::Live(l) if l.sites.len() == 1),
            "{r:?}"
        );
        assert_eq!(code(site, 1), [0xE9]);
        for i in 0..100 {
            assert_eq!(call(i, 1), if i == 0 { 100 } else { i + 1 });
        }
        let (_, _, idx) = inst.counts().find(|c| c.0 == 1).expect("its counter");
        assert_eq!(inst.counters().total(idx), 100);

        // Another group on the same site: only the jump moves.
        let r = inst.install(
            install(2, pb::CallbackKind::Trace, 2, site),
            &cat,
            &mut grace,
            &mut out,
        );
        assert!(
            matches!(report_of(&r), pb::trampoline_report::Report::Live(_)),
            "{r:?}"
        );
        let h = block::current().expect("a block");
        drain::drain(h, |_| {});
        assert_eq!(call(7, 8), 15);
        let mut events = Vec::new();
        drain::drain(h, |e| events.push((e.site, e.tracer, e.args[0], e.args[1])));
        assert_eq!(events, [(site, 2, 7, 8)]);
        assert_eq!(
            inst.counters().total(idx),
            100,
            "the old trampoline is left"
        );

        // Remove: the site gets its prologue back.
        inst.remove(pb::Remove { trampoline_id: 2 }, &mut grace, &mut out);
        inst.remove(pb::Remove { trampoline_id: 1 }, &mut grace, &mut out);
        assert_eq!(code(site, f.original.len()), f.original);
        assert_eq!(call(3, 4), 7);
        for id in [1, 2] {
            assert!(inst.free(id, || {}, &mut out).is_some());
        }
        assert!(
            !out.iter().any(|m| matches!(m, FromAgent::Error(_))),
            "{out:?}"
        );

        // A prologue that is not what discovery saw: skipped, with the reason.
        let r = inst.install(
            install(3, pb::CallbackKind::Count, 0, spin.site() as u64),
            &cat,
            &mut grace,
            &mut out,
        );
        match report_of(&r) {
            pb::trampoline_report::Report::Failed(e) => assert!(
                e.reason.contains("is not the one in the file"),
                "{}",
                e.reason
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(code(spin.site() as u64, spin.original.len()), spin.original);
    }
}
