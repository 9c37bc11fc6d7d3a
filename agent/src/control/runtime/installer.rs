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
use crate::control::log;
use crate::control::patch::{Op, PatchError, Patcher};
use crate::control::sites::SiteKind;
use crate::hot::dispatch::{self, Action, Descriptor};
use crate::hot::qs::EPOCH;
use crate::hot::{ranges, stats};
use crate::tramp::{self, Layout};

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
    slots: Vec<Slot>,
    desc: Box<Descriptor>,
    state: TState,
    /// (tracer, site, counter index) of its `count` tracers.
    counts: Vec<(u64, u64, u32)>,
    /// (tracer, counter index) of its `trace` tracers' drops.
    drops: Vec<(u64, u32)>,
}

/// The final totals of a freed trampoline's counters.
pub(crate) struct Freed {
    /// (tracer, site, count).
    pub counts: Vec<(u64, u64, u64)>,
    /// (tracer, dropped events).
    pub drops: Vec<(u64, u64)>,
}

/// A callback group resolved for the hot path, with the counter indexes it holds.
struct Group {
    /// Moved into the trampoline's descriptor.
    actions: Vec<Action>,
    /// (tracer, site, counter index) of its `count` tracers, in site order per tracer.
    counts: Vec<(u64, u64, u32)>,
    /// (tracer, counter index) of its `trace` tracers' drops.
    drops: Vec<(u64, u32)>,
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
            Some(f) if f.kind == SiteKind::Relocated => skipped.push(pb::SiteError {
                site: Some(s.clone()),
                reason: "relocated prologues are not installed yet".into(),
            }),
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
        let mut group = self.resolve_group(&i.tracers, &sites)?;
        let desc = Box::new(Descriptor {
            live: std::sync::atomic::AtomicU64::new(dispatch::DESC_LIVE),
            sites: sites.clone().into(),
            actions: std::mem::take(&mut group.actions).into(),
        });
        let (slots, ops) = match self.write_slots(&sites, &desc, &group.counts) {
            Ok(x) => x,
            Err(e) => {
                group.release(&mut self.counters);
                return Err(e);
            }
        };
        self.register_ranges();
        let patched = Patcher::global()
            .map_err(|e| e.to_string())
            .and_then(|p| p.apply(&ops).map_err(|e| e.to_string()));
        if let Err(e) = patched {
            // Nothing was patched (the patcher validates a batch before writing).
            for s in slots {
                let _ = self.arena.free(s);
            }
            group.release(&mut self.counters);
            return Err(format!("patching failed: {e}"));
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
                slots,
                desc,
                state: TState::Live,
                counts: group.counts,
                drops: group.drops,
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
    fn write_slots(
        &mut self,
        sites: &[u64],
        desc: &Descriptor,
        counts: &[(u64, u64, u32)],
    ) -> Result<(Vec<Slot>, Vec<Op>), String> {
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
        let mut slots = Vec::new();
        let mut ops = Vec::new();
        let mut pos = 0;
        while pos < sites.len() {
            let mut end = pos + 1;
            while end < sites.len()
                && end - pos < SITES_PER_SLOT
                && window_of(&sites[pos..=end]).is_some()
            {
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
            let code = tramp::generate(&layout, desc_ptr, dispatch::generic_entry());
            let slot = match self.arena.alloc(window, code.len()) {
                Ok(s) => s,
                Err(e) => {
                    for s in slots {
                        let _ = self.arena.free(s);
                    }
                    return Err(format!("no trampoline memory near the code: {e}"));
                }
            };
            if let Err(e) = self.arena.write_and_seal(&slot, &code) {
                let _ = self.arena.free(slot);
                for s in slots {
                    let _ = self.arena.free(s);
                }
                return Err(format!("writing the trampoline failed: {e}"));
            }
            for (k, &s) in chunk.iter().enumerate() {
                ops.push(Op::Call {
                    site: s as usize,
                    target: slot.addr() + tramp::site_entry(&layout, k),
                });
            }
            slots.push(slot);
            pos = end;
        }
        Ok((slots, ops))
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
            .map(|&s| Op::Nop { site: s as usize })
            .collect();
        if !ops.is_empty()
            && let Err(e) = Patcher::global().and_then(|p| p.apply(&ops))
        {
            // The trampoline stays live and allocated: never retire what may still be
            // entered.
            // A thread blocking SIGTRAP would be killed by an int3 of the unpatch:
            // the remove is deferred and retried on every tick until no thread
            // blocks it (never dropped: the server waits for its `Retired`).
            if let PatchError::SigtrapBlocked { tid } = e {
                self.sigtrap_blocker = Some(tid);
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
        // The unpatch is complete and every core serialized: a new epoch begins.
        super::grace::reclaim_signals();
        let epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
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
        };
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
