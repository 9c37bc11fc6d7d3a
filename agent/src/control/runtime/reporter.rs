//! Reporting what the program did: count snapshots per tracer (only those that
//! changed), event batches drained from the per-thread rings (bounded while the server
//! does not read, losses counted), and the totals of freed trampolines.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;

use super::catalogue::Catalogue;
use super::installer::{Freed, Installer};
use crate::control::drain::{self, Clock};
use crate::control::link;
use crate::hot::block;
use crate::hot::exit::lat;

/// Events buffered per tracer while the server is away or does not read; more stay in
/// the per-thread rings, whose overflow the program's trace stub drops and counts
/// (`PATCHBAY_EVENT_BUFFER` overrides it).
const EVENT_BUFFER: usize = 1 << 16;
/// Bytes queued for the server on one stream and not yet taken by the transport above
/// which what goes on that stream is held back (counts on `Session`; events, in the
/// bounded buffer above, on `Events`) until it reads again.
const LINK_BACKLOG: u64 = 1 << 20;
/// Records per event batch.
const EVENTS_PER_BATCH: usize = 4096;

/// Counts and events on their way to the server.
pub(crate) struct Reporter {
    /// Final counts of freed trampolines per (tracer, site).
    folded: BTreeMap<(u64, u64), u64>,
    /// Drops of freed trampolines per tracer.
    folded_drops: BTreeMap<u64, u64>,
    /// Tracers whose folded counts changed since the last flush (or since the last
    /// hello): a flush reports these and the tracers of live trampolines, not every
    /// tracer ever seen (the server keeps the last report of each).
    folded_dirty: BTreeSet<u64>,
    clock: Clock,
    /// Per tracer: packed records waiting to be sent, their count, and drops.
    events: BTreeMap<u64, (Vec<u8>, u32)>,
    lost_events: BTreeMap<u64, u64>,
    /// Events buffered per tracer at most.
    event_buffer: usize,
    last_flush: Instant,
    /// Most events a drain of the last tick took from one thread's ring: when rings
    /// fill fast, the agent ticks faster so that fewer events are dropped.
    ring_peak: usize,
    /// Count totals last sent per tracer (reports are full snapshots; an unchanged
    /// snapshot is not sent again). Cleared at every hello: a new connection gets
    /// everything.
    sent_counts: BTreeMap<u64, BTreeMap<u64, u64>>,
    /// Final latency slots (layout `exit::lat`) of freed trampolines per (tracer, site).
    folded_latency: BTreeMap<(u64, u64), Vec<u64>>,
    /// Latency slots last sent per tracer (as `sent_counts`).
    sent_latency: BTreeMap<u64, BTreeMap<u64, Vec<u64>>>,
}

/// Adds latency slots `b` into `a` (sums, and maxima for the slots that hold them).
fn merge_latency(a: &mut Vec<u64>, b: &[u64]) {
    a.resize(lat::SLOTS, 0);
    for (k, (x, y)) in a.iter_mut().zip(b).enumerate() {
        *x = if lat::is_max(k) {
            (*x).max(*y)
        } else {
            x.wrapping_add(*y)
        };
    }
}

impl Reporter {
    pub(crate) fn new() -> Reporter {
        Reporter {
            folded: BTreeMap::new(),
            folded_drops: BTreeMap::new(),
            folded_dirty: BTreeSet::new(),
            clock: Clock::new(),
            events: BTreeMap::new(),
            lost_events: BTreeMap::new(),
            event_buffer: std::env::var("PATCHBAY_EVENT_BUFFER")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(EVENT_BUFFER),
            last_flush: Instant::now(),
            ring_peak: 0,
            sent_counts: BTreeMap::new(),
            folded_latency: BTreeMap::new(),
            sent_latency: BTreeMap::new(),
        }
    }

    /// A new session: report every tracer's counts again.
    pub(crate) fn new_session(&mut self) {
        self.folded_dirty = self.folded.keys().map(|(tracer, _)| *tracer).collect();
        self.sent_counts.clear();
        self.sent_latency.clear();
    }

    /// In a forked child: this process has counted nothing and traced nothing yet.
    pub(crate) fn forked_child(&mut self) {
        self.folded.clear();
        self.folded_drops.clear();
        self.folded_dirty.clear();
        self.folded_latency.clear();
        self.events.clear();
        self.lost_events.clear();
    }

    /// Keeps the final totals of a freed trampoline.
    pub(crate) fn fold(&mut self, freed: Freed) {
        for (tracer, site, n) in freed.counts {
            *self.folded.entry((tracer, site)).or_insert(0) += n;
            self.folded_dirty.insert(tracer);
        }
        for (tracer, n) in freed.drops {
            *self.folded_drops.entry(tracer).or_insert(0) += n;
        }
        for (tracer, site, slots) in freed.latency {
            merge_latency(
                self.folded_latency.entry((tracer, site)).or_default(),
                &slots,
            );
        }
    }

    /// A tick begins: the ring peak is measured afresh.
    pub(crate) fn start_tick(&mut self) {
        self.ring_peak = 0;
    }

    /// Whether events came in fast during the last tick (tick faster to drain them).
    pub(crate) fn events_fast(&self) -> bool {
        self.ring_peak >= block::RING_SLOTS / 8
    }

    /// Takes the events of every thread's ring into the per-tracer buffers. The ring
    /// of a thread in `live` is taken only up to its first record of a tracer whose
    /// buffer is full: the rest stays, the ring fills, and the program's trace stub
    /// counts what it drops (so an event flood that the server cannot take costs this
    /// thread nothing, and it stays prompt for grace periods). Every other ring (its
    /// thread exited, or `live` is `None`: the final flush) is emptied, what the
    /// buffers cannot take counted as dropped.
    pub(crate) fn drain_rings(&mut self, live: Option<&BTreeSet<u32>>) {
        self.clock.recalibrate();
        let clock = self.clock;
        let events = &mut self.events;
        let lost = &mut self.lost_events;
        let event_buffer = self.event_buffer;
        let mut peak = 0;
        for h in block::all() {
            let tid = h.tid.load(Ordering::Acquire);
            if tid == 0 {
                continue;
            }
            let hold = live.is_some_and(|l| l.contains(&tid));
            let n = drain::drain_while(h, |r| {
                let (buf, n) = events.entry(r.tracer).or_default();
                if *n as usize >= event_buffer {
                    if hold {
                        return false;
                    }
                    *lost.entry(r.tracer).or_insert(0) += 1;
                    return true;
                }
                let nargs = (r.nargs as usize).min(r.args.len());
                pb::events::encode(buf, clock.to_ns(r.tsc), r.site, r.tid, &r.args[..nargs]);
                *n += 1;
                true
            });
            peak = peak.max(n);
        }
        // The most of any drain of this tick (a later drain in the same tick finds
        // the rings nearly empty).
        self.ring_peak = self.ring_peak.max(peak);
    }

    fn dropped(&self, tracer: u64, installer: &Installer) -> u64 {
        let mut d = self.folded_drops.get(&tracer).copied().unwrap_or(0)
            + self.lost_events.get(&tracer).copied().unwrap_or(0);
        for (tr, idx) in installer.drops() {
            if tr == tracer {
                d += installer.counters().total(idx);
            }
        }
        d
    }

    /// Sends the count snapshots that changed and every buffered event (rings
    /// drained as [`Reporter::drain_rings`] says for `live`).
    pub(crate) fn flush(
        &mut self,
        installer: &Installer,
        catalogue: &Catalogue,
        live: Option<&BTreeSet<u32>>,
        out: &mut Vec<FromAgent>,
    ) {
        self.flush_counts(installer, catalogue, out);
        self.flush_latency(installer, catalogue, out);
        self.flush_events(installer, live, out);
    }

    /// Sends the latency snapshots that changed: per tracer, per site, the slots of
    /// live trampolines (summed over threads) merged with those of freed ones.
    fn flush_latency(
        &mut self,
        installer: &Installer,
        catalogue: &Catalogue,
        out: &mut Vec<FromAgent>,
    ) {
        let mut totals: BTreeMap<u64, BTreeMap<u64, Vec<u64>>> = BTreeMap::new();
        for ((tracer, site), slots) in &self.folded_latency {
            merge_latency(
                totals.entry(*tracer).or_default().entry(*site).or_default(),
                slots,
            );
        }
        for (tracer, site, base) in installer.latency() {
            let slots: Vec<u64> = (0..lat::SLOTS as u32)
                .map(|k| installer.counters().total(base + k))
                .collect();
            merge_latency(
                totals.entry(tracer).or_default().entry(site).or_default(),
                &slots,
            );
        }
        self.sent_latency.retain(|t, _| totals.contains_key(t));
        self.clock.recalibrate();
        let clock = self.clock;
        for (tracer, sites) in totals {
            if self.sent_latency.get(&tracer) == Some(&sites) {
                continue;
            }
            self.sent_latency.insert(tracer, sites.clone());
            out.push(FromAgent::Latency(pb::LatencyReport {
                tracer_id: tracer,
                tsc_hz: (1e9 / clock.ns_per_tick()) as u64,
                sites: sites
                    .into_iter()
                    .filter(|(_, v)| v[lat::ENTRIES] != 0)
                    .map(|(s, v)| site_latency(catalogue.site(s), &v, clock))
                    .collect(),
            }));
        }
    }

    /// Sends the count snapshots that changed.
    fn flush_counts(
        &mut self,
        installer: &Installer,
        catalogue: &Catalogue,
        out: &mut Vec<FromAgent>,
    ) {
        // Counts: cumulative per (tracer, site) over live and freed trampolines.
        let mut totals: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
        let mut report: BTreeSet<u64> = std::mem::take(&mut self.folded_dirty);
        report.extend(installer.counts().map(|(tracer, _, _)| tracer));
        for &tracer in &report {
            for ((_, site), n) in self.folded.range((tracer, 0)..=(tracer, u64::MAX)) {
                *totals.entry(tracer).or_default().entry(*site).or_insert(0) += n;
            }
        }
        for (tracer, site, idx) in installer.counts() {
            *totals.entry(tracer).or_default().entry(site).or_insert(0) +=
                installer.counters().total(idx);
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
                        site: Some(catalogue.site(s)),
                        count,
                    })
                    .collect(),
            }));
        }
    }

    /// Drains the rings and sends every buffered event.
    fn flush_events(
        &mut self,
        installer: &Installer,
        live: Option<&BTreeSet<u32>>,
        out: &mut Vec<FromAgent>,
    ) {
        self.drain_rings(live);
        let tracers: Vec<u64> = self.events.keys().copied().collect();
        for tracer in tracers {
            let dropped = self.dropped(tracer, installer);
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

    /// The periodic flush (every `every`, or at once when a full batch of events is
    /// waiting). A server that does not read (stopped, hung, or slower than the
    /// program) must not make the agent queue without bound: counts are held
    /// (cumulative, nothing is lost) while the `Session` stream's backlog is over
    /// [`LINK_BACKLOG`], and events buffered (bounded, losses counted) while the
    /// `Events` stream's is.
    pub(crate) fn tick(
        &mut self,
        connected: bool,
        every: Duration,
        installer: &Installer,
        catalogue: &Catalogue,
        live: &BTreeSet<u32>,
        out: &mut Vec<FromAgent>,
    ) {
        // A full batch of events goes out at once rather than at the next interval.
        let full_batch = self
            .events
            .values()
            .any(|(_, n)| *n as usize >= EVENTS_PER_BATCH);
        if self.last_flush.elapsed() >= every || (connected && full_batch) {
            self.last_flush = Instant::now();
            if connected && link::session_backlog_bytes() <= LINK_BACKLOG {
                self.flush_counts(installer, catalogue, out);
                self.flush_latency(installer, catalogue, out);
            }
            if connected && link::events_backlog_bytes() <= LINK_BACKLOG {
                self.flush_events(installer, Some(live), out);
            } else {
                self.drain_rings(Some(live));
            }
        }
    }
}

/// The wire form of one site's latency slots (layout `exit::lat`).
fn site_latency(site: pb::Site, v: &[u64], clock: Clock) -> pb::SiteLatency {
    let calls = v[lat::CALLS];
    let mut buckets: Vec<u64> = v[lat::BUCKET0..lat::SLOTS].to_vec();
    while buckets.last() == Some(&0) {
        buckets.pop();
    }
    pb::SiteLatency {
        site: Some(site),
        entries: v[lat::ENTRIES],
        calls,
        total_ns: clock.duration_ns(v[lat::TOTAL]),
        min_ns: if calls == 0 {
            0
        } else {
            clock.duration_ns(u64::MAX - v[lat::MIN_INV])
        },
        max_ns: clock.duration_ns(v[lat::MAX]),
        abandoned: v[lat::ABANDONED],
        overflow: v[lat::OVERFLOW],
        buckets,
    }
}
