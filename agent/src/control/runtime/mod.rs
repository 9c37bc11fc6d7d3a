//! The agent's brain on its own thread: answers the server ([`link::Handler`]), plans
//! and applies patches, owns trampolines until the server authorizes freeing them,
//! runs the quiescent-state observer, and flushes counts and events.
//!
//! Invariants:
//! - a trampoline's memory and descriptor are released only in `authorize_free`, i.e.
//!   after the server saw every thread quiescent since the trampoline's retirement;
//! - the epoch is bumped only after an unpatch batch completed (the patcher serializes
//!   every core after its last write), so stamps `>= e` prove a thread is outside;
//! - the program never waits on this thread: program threads only touch their own
//!   blocks, rings and TLS.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;
use pb::server_message::Body as ToAgent;

use crate::control::arena::{Arena, Slot, Window};
use crate::control::counters::Counters;
use crate::control::drain::{self, Clock};
use crate::control::observer::Observer;
use crate::control::patch::{Op, Patcher};
use crate::control::sites::{self, Discoverer, FunctionSite, SiteKind};
use crate::control::threads::Threads;
use crate::control::{callbacks, link, log};
use crate::hot::block;
use crate::hot::dispatch::{self, Action, Descriptor};
use crate::hot::qs::EPOCH;
use crate::hot::ranges;
use crate::sys::procfs;
use crate::tramp::{self, Layout};

/// Sites per trampoline slot (a slot must fit in an arena chunk).
const SITES_PER_SLOT: usize = 1000;
/// Events buffered per tracer while the server is away or does not read; more are
/// dropped and counted (`PATCHBAY_EVENT_BUFFER` overrides it).
const EVENT_BUFFER: usize = 1 << 16;
/// Bytes queued for the server and not yet taken by the transport above which counts
/// and events are held back (in the bounded buffer above) until it reads again.
const LINK_BACKLOG: u64 = 1 << 20;
/// Bound on the grace period of a nop-sled conversion.
const LOCAL_GRACE_TIMEOUT: Duration = Duration::from_secs(2);
/// Records per event batch.
const EVENTS_PER_BATCH: usize = 4096;
/// Free thread blocks kept ready, at least.
const SPARE_BLOCKS: usize = 64;
/// At most (blocks are ~850 KiB of mostly untouched address space each).
const MAX_SPARE_BLOCKS: usize = 4096;

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

pub struct Runtime {
    discoverer: Discoverer,
    functions: Vec<FunctionSite>,
    by_addr: HashMap<u64, usize>,
    discovered: bool,
    /// `sites::load_generation()` read before the last discovery.
    load_seen: (u64, u64),
    /// Functions discovered in objects loaded after the first discovery and not yet
    /// announced to the server (`FunctionsAdded`).
    unannounced: u32,
    arena: Arena,
    ranges_registered: usize,
    tramps: BTreeMap<u64, Tramp>,
    owner: HashMap<u64, u64>,
    counters: Counters,
    /// Final counts of freed trampolines per (tracer, site).
    folded: BTreeMap<(u64, u64), u64>,
    /// Drops of freed trampolines per tracer.
    folded_drops: BTreeMap<u64, u64>,
    /// Tracers whose folded counts changed since the last flush (or since the last
    /// hello): a flush reports these and the tracers of live trampolines, not every
    /// tracer ever seen (the server keeps the last report of each).
    folded_dirty: BTreeSet<u64>,
    threads: Threads,
    observer: Observer,
    clock: Clock,
    /// Per tracer: packed records waiting to be sent, their count, and drops.
    events: BTreeMap<u64, (Vec<u8>, u32)>,
    lost_events: BTreeMap<u64, u64>,
    /// Events buffered per tracer at most.
    event_buffer: usize,
    /// Barriers whose epoch threads must still reach.
    barriers: Vec<u64>,
    /// Live trampolines whose `Remove` was refused for a passing reason (a thread
    /// blocking SIGTRAP): retried on every tick.
    pending_removes: BTreeSet<u64>,
    /// The thread whose blocking of SIGTRAP deferred them.
    sigtrap_blocker: Option<u32>,
    /// Free thread blocks to keep ready (grows with thread turnover).
    spare_blocks: usize,
    /// `dispatch::MISSED` as last seen.
    missed_seen: u64,
    settings: pb::AgentSettings,
    tls_offset: Option<i32>,
    last_flush: Instant,
    /// Most events a drain of the last tick took from one thread's ring: when rings
    /// fill fast, the agent ticks faster so that fewer events are dropped.
    ring_peak: usize,
    /// Count totals last sent per tracer (reports are full snapshots; an unchanged
    /// snapshot is not sent again). Cleared at every hello: a new connection gets
    /// everything.
    sent_counts: BTreeMap<u64, BTreeMap<u64, u64>>,
    last_stall_report: Instant,
    /// Callback registry generation last announced to the server.
    callbacks_announced: u64,
}

/// Reports new `(tid, epoch)` quiescent stamps, if any, in one batch.
fn push_quiescent(stamps: Vec<(u32, u64)>, out: &mut Vec<FromAgent>) {
    if !stamps.is_empty() {
        out.push(FromAgent::Quiescent(pb::QuiescentBatch {
            reports: stamps
                .into_iter()
                .map(|(tid, epoch)| pb::Quiescent { tid, epoch })
                .collect(),
        }));
    }
}

fn report(id: u64, r: pb::trampoline_report::Report) -> FromAgent {
    FromAgent::Trampoline(pb::TrampolineReport {
        trampoline_id: id,
        report: Some(r),
    })
}

impl Runtime {
    pub fn new(tls_offset: Option<i32>) -> Runtime {
        Runtime {
            discoverer: Discoverer::new(),
            functions: Vec::new(),
            by_addr: HashMap::new(),
            discovered: false,
            load_seen: (0, 0),
            unannounced: 0,
            arena: Arena::new(),
            ranges_registered: 0,
            tramps: BTreeMap::new(),
            owner: HashMap::new(),
            counters: Counters::new(),
            folded: BTreeMap::new(),
            folded_drops: BTreeMap::new(),
            folded_dirty: BTreeSet::new(),
            threads: Threads::new(),
            observer: Observer::new(),
            clock: Clock::new(),
            events: BTreeMap::new(),
            lost_events: BTreeMap::new(),
            event_buffer: std::env::var("PATCHBAY_EVENT_BUFFER")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(EVENT_BUFFER),
            barriers: Vec::new(),
            pending_removes: BTreeSet::new(),
            sigtrap_blocker: None,
            spare_blocks: SPARE_BLOCKS,
            missed_seen: 0,
            settings: pb::AgentSettings {
                qs_signal: 0,
                stall_threshold_ms: 1000,
                flush_interval_ms: 100,
            },
            tls_offset,
            last_flush: Instant::now(),
            ring_peak: 0,
            sent_counts: BTreeMap::new(),
            last_stall_report: Instant::now(),
            callbacks_announced: 0,
        }
    }

    // ------------------------------------------------------------- functions

    fn discover(&mut self) {
        // Read first: an object loaded during the scan is seen by the next one.
        self.load_seen = sites::load_generation();
        let later = self.discovered;
        let new = if self.discovered {
            self.discoverer.discover_new()
        } else {
            self.discovered = true;
            self.discoverer.discover_all()
        };
        match new {
            Ok(list) => {
                if later {
                    self.unannounced = self
                        .unannounced
                        .saturating_add(u32::try_from(list.len()).unwrap_or(u32::MAX));
                }
                let mut neutralize = Vec::new();
                for mut f in list {
                    if f.name.starts_with("patchbay_agent::") {
                        f.patchable = false;
                        f.reason = Some("the agent's own code is never traced".into());
                    }
                    if f.patchable && matches!(f.kind, SiteKind::Fentry) {
                        neutralize.push(Op::Nop {
                            site: f.address as usize,
                        });
                    }
                    if f.patchable && f.kind == SiteKind::FentryGot {
                        neutralize.push(Op::NopFentryGot {
                            site: f.address as usize,
                        });
                    }
                    self.by_addr.insert(f.address, self.functions.len());
                    self.functions.push(f);
                }
                // `call __fentry__` sites become nops now, once: cheaper untraced calls,
                // and the form every later patch starts from.
                if !neutralize.is_empty() {
                    match Patcher::global().and_then(|p| p.apply(&neutralize)) {
                        Ok(r) => {
                            log::debug(&format!("{} fentry calls turned into nops", r.changed))
                        }
                        Err(e) => {
                            log::warn(&format!("cannot neutralize fentry calls: {e}"));
                            for op in neutralize {
                                if let Some(&i) = self.by_addr.get(&(op.site() as u64)) {
                                    self.functions[i].patchable = false;
                                    self.functions[i].reason = Some(format!("cannot patch: {e}"));
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => log::warn(&format!("site discovery failed: {e}")),
        }
    }

    fn list_functions(&mut self, l: pb::ListFunctions) -> FromAgent {
        self.discover();
        let answer = match sites::filter(&self.functions, &l.pattern) {
            Ok(found) => {
                // Attaching needs only patchable functions; when none matches, a few
                // unpatchable ones go along so the server can say why.
                let any_patchable = found.iter().any(|f| f.patchable);
                let mut examples = 0;
                let keep: Vec<&FunctionSite> = found
                    .iter()
                    .copied()
                    .filter(|f| {
                        if f.patchable || !l.patchable_only {
                            return true;
                        }
                        examples += 1;
                        !any_patchable && examples <= 5
                    })
                    .collect();
                let unpatchable_matches = if l.patchable_only {
                    (found.len() - keep.len()) as u32
                } else {
                    0
                };
                pb::FunctionList {
                    request_id: l.request_id,
                    unpatchable_matches,
                    functions: keep
                        .into_iter()
                        .map(|f| pb::Function {
                            name: f.name.clone(),
                            mangled: f.mangled.clone(),
                            address: f.address,
                            object: f.object.display().to_string(),
                            patchable: f.patchable,
                            site_kind: match f.kind {
                                SiteKind::Fentry | SiteKind::FentryGot => pb::SiteKind::Fentry,
                                SiteKind::Nop5 => pb::SiteKind::Nop5,
                                SiteKind::NopSled => pb::SiteKind::NopSled,
                                SiteKind::None => pb::SiteKind::Unspecified,
                            } as i32,
                            reason: f.reason.clone().unwrap_or_default(),
                        })
                        .collect(),
                    error: String::new(),
                }
            }
            Err(e) => pb::FunctionList {
                request_id: l.request_id,
                functions: vec![],
                error: e.to_string(),
                unpatchable_matches: 0,
            },
        };
        FromAgent::FunctionList(answer)
    }

    fn name_of(&self, site: u64) -> String {
        self.by_addr
            .get(&site)
            .map(|&i| self.functions[i].name.clone())
            .unwrap_or_default()
    }

    // --------------------------------------------------------------- install

    fn install(&mut self, i: pb::Install, out: &mut Vec<FromAgent>) -> FromAgent {
        let id = i.trampoline_id;
        if self.tramps.contains_key(&id) {
            return report(
                id,
                pb::trampoline_report::Report::Failed(pb::InstallFailed {
                    reason: format!("trampoline {id} already exists"),
                }),
            );
        }
        match self.try_install(&i, out) {
            Ok((sites, skipped)) => report(
                id,
                pb::trampoline_report::Report::Live(pb::Live { sites, skipped }),
            ),
            Err(reason) => report(
                id,
                pb::trampoline_report::Report::Failed(pb::InstallFailed { reason }),
            ),
        }
    }

    fn try_install(
        &mut self,
        i: &pb::Install,
        out: &mut Vec<FromAgent>,
    ) -> Result<(Vec<pb::Site>, Vec<pb::SiteError>), String> {
        let id = i.trampoline_id;
        let mut skipped = Vec::new();
        let mut sites: Vec<u64> = Vec::new();
        for s in &i.sites {
            match self.by_addr.get(&s.address).map(|&x| &self.functions[x]) {
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
        // gcc nop sleds become 5-byte nops first (once per site, under a grace period).
        let sleds: Vec<usize> = sites
            .iter()
            .filter(|s| {
                self.by_addr
                    .get(s)
                    .is_some_and(|&x| self.functions[x].kind == SiteKind::NopSled)
            })
            .map(|&s| s as usize)
            .collect();
        if !sleds.is_empty() {
            self.convert_sleds(&sleds, out)?;
        }
        // Resolve the callback group.
        let mut actions = Vec::new();
        let mut counts = Vec::new();
        let mut drops = Vec::new();
        let mut allocated = Vec::new();
        let fail = |counters: &mut Counters, allocated: &mut Vec<u32>, msg: String| {
            for x in allocated.drain(..) {
                counters.free(x);
            }
            Err::<(Vec<pb::Site>, Vec<pb::SiteError>), String>(msg)
        };
        for t in &i.tracers {
            let cb = t.callback.clone().unwrap_or_default();
            match pb::CallbackKind::try_from(cb.kind) {
                Ok(pb::CallbackKind::Count) => {
                    let mut idx = Vec::with_capacity(sites.len());
                    for &s in &sites {
                        match self.counters.alloc() {
                            Ok(x) => {
                                allocated.push(x);
                                idx.push(x);
                                counts.push((t.tracer_id, s, x));
                            }
                            Err(e) => {
                                return fail(&mut self.counters, &mut allocated, e.to_string());
                            }
                        }
                    }
                    actions.push(Action::Count { idx: idx.into() });
                }
                Ok(pb::CallbackKind::Trace) => {
                    let x = match self.counters.alloc() {
                        Ok(x) => x,
                        Err(e) => return fail(&mut self.counters, &mut allocated, e.to_string()),
                    };
                    allocated.push(x);
                    drops.push((t.tracer_id, x));
                    actions.push(Action::Trace {
                        tracer: t.tracer_id,
                        nargs: cb.arg_count.min(6),
                        dropped_idx: x,
                    });
                }
                Ok(pb::CallbackKind::Custom) => match callbacks::get(&cb.custom_name) {
                    Some(f) => actions.push(Action::Custom { f }),
                    None => {
                        return fail(
                            &mut self.counters,
                            &mut allocated,
                            format!(
                                "no callback named '{}' is registered in this program",
                                cb.custom_name
                            ),
                        );
                    }
                },
                _ => {
                    return fail(
                        &mut self.counters,
                        &mut allocated,
                        format!(
                            "callback kind {} is not supported by this agent yet",
                            cb.kind
                        ),
                    );
                }
            }
        }
        let count_only = actions.len() == 1 && matches!(actions[0], Action::Count { .. });
        // One trace tracer: a trace stub writes the event itself (no dispatch).
        let trace_only = match actions.as_slice() {
            [
                Action::Trace {
                    tracer,
                    nargs,
                    dropped_idx,
                },
            ] => Some((*tracer, *nargs, *dropped_idx)),
            _ => None,
        };
        let desc = Box::new(Descriptor {
            live: std::sync::atomic::AtomicU64::new(dispatch::DESC_LIVE),
            sites: sites.clone().into(),
            actions: actions.into(),
        });
        let desc_ptr = &*desc as *const Descriptor as u64;
        // Slots: runs of sites within rel32 reach of one window, at most SITES_PER_SLOT.
        let mut slots = Vec::new();
        let mut ops = Vec::new();
        let mut pos = 0;
        while pos < sites.len() {
            let mut end = pos + 1;
            while end < sites.len()
                && end - pos < SITES_PER_SLOT
                && Window::for_calls_from(
                    &sites[pos..=end]
                        .iter()
                        .map(|s| *s as usize)
                        .collect::<Vec<_>>(),
                )
                .is_some()
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
            let window =
                Window::for_calls_from(&chunk.iter().map(|s| *s as usize).collect::<Vec<_>>())
                    .expect("checked above");
            let code = tramp::generate(&layout, desc_ptr, dispatch::generic_entry());
            let slot = match self.arena.alloc(window, code.len()) {
                Ok(s) => s,
                Err(e) => {
                    for s in slots {
                        let _ = self.arena.free(s);
                    }
                    return fail(
                        &mut self.counters,
                        &mut allocated,
                        format!("no trampoline memory near the code: {e}"),
                    );
                }
            };
            if let Err(e) = self.arena.write_and_seal(&slot, &code) {
                let _ = self.arena.free(slot);
                for s in slots {
                    let _ = self.arena.free(s);
                }
                return fail(
                    &mut self.counters,
                    &mut allocated,
                    format!("writing the trampoline failed: {e}"),
                );
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
        self.register_ranges();
        let patched = Patcher::global()
            .map_err(|e| e.to_string())
            .and_then(|p| p.apply(&ops).map_err(|e| e.to_string()));
        if let Err(e) = patched {
            // Nothing was patched (the patcher validates a batch before writing).
            for s in slots {
                let _ = self.arena.free(s);
            }
            return fail(
                &mut self.counters,
                &mut allocated,
                format!("patching failed: {e}"),
            );
        }
        for &s in &sites {
            if let Some(old) = self.owner.insert(s, id)
                && let Some(t) = self.tramps.get_mut(&old)
            {
                t.sites.remove(&s);
            }
        }
        crate::hot::stats::bump(&crate::hot::stats::TRAMPOLINES_INSTALLED);
        self.tramps.insert(
            id,
            Tramp {
                group: i.tracers.clone(),
                sites: sites.iter().copied().collect(),
                slots,
                desc,
                state: TState::Live,
                counts,
                drops,
            },
        );
        let live = sites
            .iter()
            .map(|&s| pb::Site {
                address: s,
                name: self.name_of(s),
            })
            .collect();
        Ok((live, skipped))
    }

    /// Converts gcc nop sleds into 5-byte nops ([`Patcher::convert_sleds`]), with a
    /// grace period local to this process in the middle.
    fn convert_sleds(&mut self, sleds: &[usize], out: &mut Vec<FromAgent>) -> Result<(), String> {
        let patcher = Patcher::global().map_err(|e| e.to_string())?;
        let r = patcher
            .convert_sleds(sleds, &mut || self.local_grace(out))
            .map_err(|e| format!("patching failed: {e}"))?;
        log::debug(&format!(
            "{} nop sleds converted to 5-byte nops ({} already were)",
            r.changed, r.unchanged
        ));
        Ok(())
    }

    /// A grace period of this process alone, for the sled protocol: bumps the epoch
    /// and waits (bounded by [`LOCAL_GRACE_TIMEOUT`]) until every thread alive now has
    /// a quiescent state stamped at the new epoch or exited, observing them the usual
    /// ways (the stamps also go to the server, as valid as any). Blocks the agent
    /// thread meanwhile: typically a few milliseconds.
    fn local_grace(&mut self, out: &mut Vec<FromAgent>) -> Result<(), String> {
        let epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        let start = Instant::now();
        loop {
            self.scan_and_report(out);
            let known = self.threads.known().clone();
            let stamps = self.observer.round(&known, epoch, true);
            push_quiescent(stamps, out);
            let holdouts: Vec<u32> = known
                .iter()
                .copied()
                .filter(|t| self.observer.reported(*t) < epoch)
                .collect();
            if holdouts.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= LOCAL_GRACE_TIMEOUT {
                return Err(format!(
                    "thread(s) {holdouts:?} not seen outside the sleds within {LOCAL_GRACE_TIMEOUT:?} (blocking the quiescent-state signal, or stopped?)"
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn register_ranges(&mut self) {
        let ranges = self.arena.chunk_ranges();
        for &(s, e) in &ranges[self.ranges_registered.min(ranges.len())..] {
            if !ranges::add_range(s as u64, e as u64) {
                log::warn("trampoline range table full");
            }
        }
        self.ranges_registered = ranges.len();
    }

    // ---------------------------------------------------------------- remove

    fn remove(&mut self, r: pb::Remove, out: &mut Vec<FromAgent>) {
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
        self.try_remove(id, out);
    }

    /// Unpatches the sites of live trampoline `id` and reports it retired; on failure
    /// it stays live (and is retried when the failure is a SIGTRAP blocker).
    fn try_remove(&mut self, id: u64, out: &mut Vec<FromAgent>) {
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
            if let crate::control::patch::PatchError::SigtrapBlocked { tid } = e {
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
        let epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        // Births and deaths since the last scan go out before the report, so that the
        // server never waits for a thread whose exit it was not told about.
        self.scan_and_report(out);
        let tids: Vec<u32> = self.threads.known().iter().copied().collect();
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
    fn retry_removes(&mut self, out: &mut Vec<FromAgent>) {
        if self.pending_removes.is_empty() {
            return;
        }
        if let Some(tid) = self.sigtrap_blocker
            && procfs::blocks_signal(tid, libc::SIGTRAP)
        {
            return;
        }
        self.sigtrap_blocker = None;
        let ids: Vec<u64> = self.pending_removes.iter().copied().collect();
        for id in ids {
            self.try_remove(id, out);
        }
    }

    fn authorize_free(&mut self, ids: Vec<u64>, out: &mut Vec<FromAgent>) {
        for id in ids {
            let Some(t) = self.tramps.get(&id) else {
                continue;
            };
            if !matches!(t.state, TState::Retired { .. }) {
                out.push(FromAgent::Error(pb::AgentError {
                    message: format!(
                        "authorize-free of trampoline {id} which is not retired: ignored"
                    ),
                }));
                continue;
            }
            // Events still in rings reference no trampoline memory; drain anyway so that
            // they are attributed before the counters go.
            self.drain_rings();
            let t = self.tramps.remove(&id).expect("checked");
            for (tracer, site, idx) in &t.counts {
                *self.folded.entry((*tracer, *site)).or_insert(0) += self.counters.free(*idx);
                self.folded_dirty.insert(*tracer);
            }
            for (tracer, idx) in &t.drops {
                *self.folded_drops.entry(*tracer).or_insert(0) += self.counters.free(*idx);
            }
            for s in t.slots {
                if let Err(e) = self.arena.free(s) {
                    log::warn(&format!("freeing trampoline {id}: {e}"));
                }
            }
            t.desc.live.store(dispatch::DESC_DEAD, Ordering::Relaxed);
            drop(t.desc);
            crate::hot::stats::bump(&crate::hot::stats::TRAMPOLINES_FREED);
            out.push(report(
                id,
                pb::trampoline_report::Report::Freed(pb::Freed {}),
            ));
        }
    }

    // ------------------------------------------------------------------ tick

    /// The epoch threads must reach for pending grace periods (0: none).
    fn need(&self) -> u64 {
        let t = self
            .tramps
            .values()
            .filter_map(|t| match t.state {
                TState::Retired { epoch, .. } => Some(epoch),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        t.max(self.barriers.iter().copied().max().unwrap_or(0))
    }

    fn drain_rings(&mut self) {
        self.clock.recalibrate();
        let clock = self.clock;
        let events = &mut self.events;
        let lost = &mut self.lost_events;
        let event_buffer = self.event_buffer;
        let mut peak = 0;
        for h in block::all() {
            if h.tid.load(Ordering::Acquire) == 0 {
                continue;
            }
            let n = drain::drain(h, |r| {
                let (buf, n) = events.entry(r.tracer).or_default();
                if *n as usize >= event_buffer {
                    *lost.entry(r.tracer).or_insert(0) += 1;
                    return;
                }
                let nargs = (r.nargs as usize).min(r.args.len());
                pb::events::encode(buf, clock.to_ns(r.tsc), r.site, r.tid, &r.args[..nargs]);
                *n += 1;
            });
            peak = peak.max(n);
        }
        // The most of any drain of this tick (a later drain in the same tick finds
        // the rings nearly empty).
        self.ring_peak = self.ring_peak.max(peak);
    }

    fn dropped(&self, tracer: u64) -> u64 {
        let mut d = self.folded_drops.get(&tracer).copied().unwrap_or(0)
            + self.lost_events.get(&tracer).copied().unwrap_or(0);
        for t in self.tramps.values() {
            for (tr, idx) in &t.drops {
                if *tr == tracer {
                    d += self.counters.total(*idx);
                }
            }
        }
        d
    }

    fn flush(&mut self, out: &mut Vec<FromAgent>) {
        // Counts: cumulative per (tracer, site) over live and freed trampolines.
        let mut totals: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut report: BTreeSet<u64> = std::mem::take(&mut self.folded_dirty);
        for t in self.tramps.values() {
            report.extend(t.counts.iter().map(|(tracer, _, _)| *tracer));
        }
        for &tracer in &report {
            for ((_, site), n) in self.folded.range((tracer, 0)..=(tracer, u64::MAX)) {
                *totals.entry(tracer).or_default().entry(*site).or_insert(0) += n;
            }
        }
        for t in self.tramps.values() {
            for (tracer, site, idx) in &t.counts {
                *totals.entry(*tracer).or_default().entry(*site).or_insert(0) +=
                    self.counters.total(*idx);
            }
        }
        self.sent_counts.retain(|t, _| totals.contains_key(t));
        for (tracer, sites) in totals {
            if self.sent_counts.get(&tracer) == Some(&sites) {
                continue;
            }
            self.sent_counts.insert(tracer, sites.clone());
            out.push(FromAgent::Counts(pb::CountReport {
                tracer_id: tracer,
                counts: sites
                    .into_iter()
                    .map(|(s, count)| pb::SiteCount {
                        site: Some(pb::Site {
                            address: s,
                            name: self.name_of(s),
                        }),
                        count,
                    })
                    .collect(),
            }));
        }
        self.drain_rings();
        let tracers: Vec<u64> = self.events.keys().copied().collect();
        for tracer in tracers {
            let dropped = self.dropped(tracer);
            let (buf, n) = self.events.remove(&tracer).unwrap_or_default();
            if n == 0 {
                continue;
            }
            // Split into batches on record boundaries (the records were written by
            // `encode` just above: they always cut).
            for (data, record_count) in
                pb::events::Batches::new(&buf, n, EVENTS_PER_BATCH as u32).flatten()
            {
                out.push(FromAgent::Events(pb::EventBatch {
                    tracer_id: tracer,
                    data: data.to_vec(),
                    record_count,
                    dropped,
                }));
            }
        }
    }

    /// Rescans the program's threads and reports births and deaths. Every scan goes
    /// through here: a scan whose changes were not reported would hide an exit from
    /// the server, which would then wait for that thread for ever.
    fn scan_and_report(&mut self, out: &mut Vec<FromAgent>) {
        let changes = self.threads.scan();
        if !changes.born.is_empty() {
            out.push(FromAgent::ThreadsBorn(pb::ThreadsBorn {
                tids: changes.born,
            }));
        }
        if !changes.exited.is_empty() {
            for t in &changes.exited {
                self.observer.thread_exited(*t);
            }
            out.push(FromAgent::ThreadsExited(pb::ThreadsExited {
                tids: changes.exited,
            }));
        }
    }

    fn scan_threads(&mut self, out: &mut Vec<FromAgent>) {
        self.scan_and_report(out);
        // Blocks of threads that are gone: keep their counts, recycle them.
        self.drain_rings();
        let known = self.threads.known().clone();
        let mut recycled = 0;
        for h in block::all() {
            let tid = h.tid.load(Ordering::Acquire);
            if tid != 0
                && tid != block::OVERFLOW_TID
                && !known.contains(&tid)
                && !Threads::alive(tid)
            {
                self.counters.fold_exited_block(h);
                recycled += 1;
            }
        }
        // Threads claim blocks between two ticks faster than they come back when
        // short-lived threads churn: keep twice the last tick's turnover spare, and
        // double the reserve whenever a call found the pool empty (it then counted in
        // the shared overflow block, slower, and its trace events were dropped).
        let missed = dispatch::MISSED.load(Ordering::Relaxed);
        if missed != self.missed_seen {
            log::warn(&format!(
                "{} traced calls found no free thread block (threads are created faster than the agent recycles their blocks): counted in the shared overflow block, trace events dropped",
                missed - self.missed_seen
            ));
            self.missed_seen = missed;
            self.spare_blocks = (self.spare_blocks * 2).min(MAX_SPARE_BLOCKS);
        }
        self.spare_blocks = self.spare_blocks.max((2 * recycled).min(MAX_SPARE_BLOCKS));
        if let Err(e) = block::refill(self.spare_blocks) {
            log::warn(&format!("cannot map thread blocks: {e}"));
        }
    }

    fn observe(&mut self, out: &mut Vec<FromAgent>) {
        let need = self.need();
        let stamps = self.observer.round(self.threads.known(), need, need > 0);
        push_quiescent(stamps, out);
        // Barriers every thread has passed are done.
        let min_seen = self
            .threads
            .known()
            .iter()
            .map(|t| self.observer.reported(*t))
            .min()
            .unwrap_or(u64::MAX);
        self.barriers.retain(|e| *e > min_seen);
        let threshold = Duration::from_millis(self.settings.stall_threshold_ms.max(1) as u64);
        if self.last_stall_report.elapsed() >= threshold / 2 {
            let stalls = self.observer.stalls(threshold);
            if !stalls.is_empty() {
                self.last_stall_report = Instant::now();
                out.push(FromAgent::Stalls(pb::StallReport {
                    stalls: stalls
                        .into_iter()
                        .map(|h| pb::Stall {
                            tid: h.tid,
                            pc: h.pc,
                            symbol: self.symbol(h.pc),
                            duration_ms: h.since.elapsed().as_millis() as u64,
                            reason: if h.blocks_signal {
                                "the thread blocks the quiescent-state signal".into()
                            } else if h.pc != 0 {
                                "blocked inside a traced call or callback".into()
                            } else {
                                "running inside a traced call or callback".into()
                            },
                        })
                        .collect(),
                }));
            }
        }
    }

    fn symbol(&self, pc: u64) -> String {
        if pc == 0 {
            return String::new();
        }
        if ranges::in_trampoline(pc) {
            return "<trampoline>".into();
        }
        self.functions
            .iter()
            .find(|f| f.function_address <= pc && pc < f.function_address + f.size.max(1))
            .map(|f| f.name.clone())
            .unwrap_or_default()
    }

    fn hello(&mut self) -> pb::Hello {
        self.threads.scan();
        self.observer.forget_reports();
        // A new session: report every tracer's counts again.
        self.folded_dirty = self.folded.keys().map(|(tracer, _)| *tracer).collect();
        self.sent_counts.clear();
        let trampolines = self
            .tramps
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
                    sites: t
                        .sites
                        .iter()
                        .map(|&s| pb::Site {
                            address: s,
                            name: self.name_of(s),
                        })
                        .collect(),
                    retired_epoch: epoch,
                    retired_tids: tids,
                }
            })
            .collect();
        pb::Hello {
            protocol_version: pb::PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            start_time: procfs::start_time(),
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
            exe: std::fs::read_link("/proc/self/exe")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            build_id: String::new(),
            tids: self.threads.known().iter().copied().collect(),
            epoch: EPOCH.load(Ordering::Acquire),
            trampolines,
            callbacks: {
                self.callbacks_announced = callbacks::generation();
                callbacks::names()
            },
        }
    }
}

impl link::Handler for Runtime {
    fn hello(&mut self) -> pb::Hello {
        Runtime::hello(self)
    }

    fn welcome(&mut self, w: &pb::Welcome) {
        if let Some(s) = w.settings {
            self.settings = s;
        }
        log::debug(&format!("welcomed as agent {}", w.agent_id));
    }

    fn message(&mut self, msg: ToAgent, out: &mut Vec<FromAgent>) {
        match msg {
            ToAgent::ListFunctions(l) => out.push(self.list_functions(l)),
            ToAgent::Install(i) => {
                self.discover_if_needed();
                let r = self.install(i, out);
                out.push(r);
            }
            ToAgent::Remove(r) => {
                self.remove(r, out);
                // Look at every thread at once: the expedited path.
                self.observe(out);
            }
            ToAgent::AuthorizeFree(a) => {
                // Counts of what is freed go out first, so totals never step back.
                self.flush(out);
                self.authorize_free(a.trampoline_ids, out);
            }
            ToAgent::Barrier(b) => {
                let epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
                self.scan_and_report(out);
                self.barriers.push(epoch);
                out.push(FromAgent::Barrier(pb::BarrierReport {
                    barrier_id: b.barrier_id,
                    epoch,
                    tids: self.threads.known().iter().copied().collect(),
                }));
                self.observe(out);
            }
            ToAgent::Expedite(_) => self.observe(out),
            ToAgent::Welcome(_) | ToAgent::Shutdown(_) => {}
        }
    }

    fn tick(&mut self, connected: bool, out: &mut Vec<FromAgent>) {
        self.ring_peak = 0;
        let generation = callbacks::generation();
        if generation != self.callbacks_announced {
            self.callbacks_announced = generation;
            out.push(FromAgent::Callbacks(pb::Callbacks {
                names: callbacks::names(),
            }));
        }
        self.scan_threads(out);
        self.retry_removes(out);
        self.observe(out);
        // Objects loaded (dlopen) since the last discovery: discover them, and have the
        // server extend the tracers meant for this process to their functions.
        if self.discovered && sites::load_generation() != self.load_seen {
            self.discover();
        }
        if self.unannounced > 0 && connected {
            out.push(FromAgent::FunctionsAdded(pb::FunctionsAdded {
                count: std::mem::take(&mut self.unannounced),
            }));
        }
        let every = Duration::from_millis(self.settings.flush_interval_ms.max(1) as u64);
        // A full batch of events goes out at once rather than at the next interval.
        let full_batch = self
            .events
            .values()
            .any(|(_, n)| *n as usize >= EVENTS_PER_BATCH);
        if self.last_flush.elapsed() >= every || (connected && full_batch) {
            self.last_flush = Instant::now();
            // A server that does not read (stopped, hung, or slower than the program)
            // must not make the agent queue without bound: hold counts (cumulative,
            // nothing is lost) and events (bounded, losses counted) until it reads.
            if connected && link::backlog_bytes() <= LINK_BACKLOG {
                self.flush(out);
            } else {
                self.drain_rings();
            }
        }
        if !connected {
            out.clear();
        }
    }

    fn tick_interval(&self) -> Duration {
        if self.need() > 0 {
            Duration::from_micros(500)
        } else if self.ring_peak >= block::RING_SLOTS / 8 {
            // Events are coming in fast: drain the rings before they fill.
            Duration::from_millis(1)
        } else {
            Duration::from_millis(20)
        }
    }

    fn disconnected(&mut self, why: &str) {
        log::debug(&format!("disconnected: {why}"));
    }
}

impl Runtime {
    fn discover_if_needed(&mut self) {
        if !self.discovered {
            self.discover();
        }
    }

    /// Final flush at exit: counts and events still in rings.
    pub fn final_flush(&mut self) -> Vec<FromAgent> {
        let mut out = Vec::new();
        self.flush(&mut out);
        out
    }
}

impl Runtime {
    /// In a forked child: a new process with one thread, the inherited trampolines and
    /// patched code. Counts start from zero; the blocks of threads that do not exist
    /// here are returned.
    pub fn forked_child(&mut self) {
        let me = crate::sys::tid();
        let mine = block::current().map(|h| h as *const block::Header);
        for h in block::all() {
            if Some(h as *const block::Header) == mine {
                h.tid.store(me, Ordering::Release);
                h.qs_epoch.store(0, Ordering::Release);
            } else if h.tid.load(Ordering::Acquire) != 0 && !h.is_overflow() {
                h.release(std::iter::empty());
            }
        }
        // Zero every counter index in use (this process has counted nothing yet).
        for t in self.tramps.values() {
            for (_, _, idx) in &t.counts {
                for h in block::all() {
                    h.reset_counter(*idx);
                }
            }
        }
        self.counters.forget_exited();
        self.folded.clear();
        self.folded_drops.clear();
        self.folded_dirty.clear();
        self.events.clear();
        self.lost_events.clear();
        self.threads = Threads::new();
        self.observer = Observer::new();
        self.barriers.clear();
        self.pending_removes.clear();
    }
}
