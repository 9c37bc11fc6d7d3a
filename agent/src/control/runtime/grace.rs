//! The program's threads as the runtime sees them: scans (births and exits reported to
//! the server), their quiescent states (the observer's rounds, stall reports), barriers,
//! the thread-block pool, and grace periods local to this process (the nop-sled
//! protocol).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use patchbay_proto as pb;
use pb::agent_message::Body as FromAgent;

use crate::control::counters::Counters;
use crate::control::observer::Observer;
use crate::control::threads::Threads;
use crate::control::{log, timeline};
use crate::hot::qs::EPOCH;
use crate::hot::{block, dispatch, sigwrap};

/// Bound on the grace period of a nop-sled conversion.
const LOCAL_GRACE_TIMEOUT: Duration = Duration::from_secs(2);
/// Free thread blocks kept ready, at least.
const SPARE_BLOCKS: usize = 64;
/// At most (blocks are ~850 KiB of mostly untouched address space each).
const MAX_SPARE_BLOCKS: usize = 4096;

/// Threads, their quiescent states and the block pool.
pub(crate) struct Grace {
    threads: Threads,
    observer: Observer,
    /// Barriers whose epoch threads must still reach.
    barriers: Vec<u64>,
    /// Free thread blocks to keep ready (grows with thread turnover).
    spare_blocks: usize,
    /// `dispatch::MISSED` as last seen.
    missed_seen: u64,
    last_stall_report: Instant,
    /// When a tick last checked the signal actions ([`reclaim_signals`]).
    last_reclaim: Instant,
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

/// Ticks check the signal actions at most this often: a check queries the kernel's 64
/// actions (~27 µs, release build), and ticks come every 0.5 ms during grace periods.
pub(crate) const RECLAIM_EVERY: Duration = Duration::from_millis(10);

/// Takes back the signal actions installed behind the interposition's back (a raw
/// `rt_sigaction`): called before each grace period starts and from ticks (at most
/// every [`RECLAIM_EVERY`]), so that a
/// foreign handler on the quiescent-state signal never sees the agent's signals of a
/// grace period, and a foreign handler of another signal is wrapped before a grace
/// period could trust a stamp taken while it ran on a trampoline frame.
pub(crate) fn reclaim_signals() {
    let found = sigwrap::reclaim();
    if found > 0 {
        log::debug(&format!(
            "{found} signal action(s) installed with a raw rt_sigaction taken back"
        ));
    }
}

impl Grace {
    pub(crate) fn new() -> Grace {
        Grace {
            threads: Threads::new(),
            observer: Observer::new(),
            barriers: Vec::new(),
            spare_blocks: SPARE_BLOCKS,
            missed_seen: 0,
            last_stall_report: Instant::now(),
            last_reclaim: Instant::now(),
        }
    }

    /// A tick's check of the signal actions, at most every [`RECLAIM_EVERY`].
    pub(crate) fn tick_reclaim(&mut self) {
        if self.last_reclaim.elapsed() >= RECLAIM_EVERY {
            reclaim_signals();
            self.last_reclaim = Instant::now();
        }
    }

    /// The program's threads as of the last scan.
    pub(crate) fn known(&self) -> &BTreeSet<u32> {
        self.threads.known()
    }

    /// The highest epoch a barrier waits for (0: none).
    pub(crate) fn barrier_need(&self) -> u64 {
        self.barriers.iter().copied().max().unwrap_or(0)
    }

    /// A new session: rescan, and report every stamp afresh.
    pub(crate) fn new_session(&mut self) {
        self.threads.scan();
        self.observer.forget_reports();
    }

    /// In a forked child: one thread, nothing observed or waited for yet.
    pub(crate) fn forked_child(&mut self) {
        self.threads = Threads::new();
        self.observer = Observer::new();
        self.barriers.clear();
    }

    /// Rescans the program's threads and reports births and deaths. Every scan goes
    /// through here: a scan whose changes were not reported would hide an exit from
    /// the server, which would then wait for that thread for ever.
    pub(crate) fn scan_and_report(&mut self, out: &mut Vec<FromAgent>) {
        let changes = self.threads.scan();
        if !changes.born.is_empty() {
            out.push(FromAgent::ThreadsBorn(pb::ThreadsBorn {
                tids: changes.born,
            }));
        }
        if !changes.exited.is_empty() {
            for t in &changes.exited {
                self.observer.thread_exited(*t);
                timeline::note(pb::GraceStep::AgentThreadExited, *t);
            }
            out.push(FromAgent::ThreadsExited(pb::ThreadsExited {
                tids: changes.exited,
            }));
        }
    }

    /// Returns the blocks of threads that are gone to the pool (their counts folded
    /// into `counters`; the caller drained their rings first) and keeps enough free
    /// blocks ready.
    pub(crate) fn recycle_blocks(&mut self, counters: &mut Counters) {
        let known = self.threads.known();
        let mut recycled = 0;
        for h in block::all() {
            let tid = h.tid.load(Ordering::Acquire);
            if tid != 0
                && tid != block::OVERFLOW_TID
                && !known.contains(&tid)
                && !Threads::alive(tid)
            {
                counters.fold_exited_block(h);
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

    /// Starts a barrier: a new epoch every thread known now must reach. Reports it.
    pub(crate) fn barrier(&mut self, barrier_id: u64, out: &mut Vec<FromAgent>) {
        reclaim_signals();
        let epoch = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        self.scan_and_report(out);
        self.barriers.push(epoch);
        out.push(FromAgent::Barrier(pb::BarrierReport {
            barrier_id,
            epoch,
            tids: self.threads.known().iter().copied().collect(),
        }));
    }

    /// One observation round for grace periods waiting for epoch `need` (0: none):
    /// reports new stamps, ends barriers every thread passed, and reports threads
    /// holding up a grace period for `stall_threshold` (named with `symbol`).
    pub(crate) fn observe(
        &mut self,
        need: u64,
        stall_threshold: Duration,
        symbol: impl Fn(u64) -> String,
        out: &mut Vec<FromAgent>,
    ) {
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
        let threshold = stall_threshold;
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
                            symbol: symbol(h.pc),
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

    /// A grace period of this process alone, for the sled protocol: bumps the epoch
    /// and waits (bounded by [`LOCAL_GRACE_TIMEOUT`]) until every thread alive now has
    /// a quiescent state stamped at the new epoch or exited, observing them the usual
    /// ways (the stamps also go to the server, as valid as any). Blocks the agent
    /// thread meanwhile: typically a few milliseconds.
    pub(crate) fn local_grace(&mut self, out: &mut Vec<FromAgent>) -> Result<(), String> {
        reclaim_signals();
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
                    "thread(s) {holdouts:?} not seen outside the code being replaced (nop sleds, relocated prologues) within {LOCAL_GRACE_TIMEOUT:?} (blocking the quiescent-state signal, or stopped?)"
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}
