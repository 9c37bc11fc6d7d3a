//! The grace-period engine of one agent: pure logic, no I/O.
//!
//! A grace period starts at an agent epoch `e` with a set of holdout threads. It
//! completes exactly when every holdout has been reported quiescent at an epoch `>= e`
//! or has exited. Quiescent reports may arrive before the grace period they satisfy
//! (the agent stamps an observation with the epoch it read; the `Retired` report that
//! names that epoch can come later), so the engine remembers each thread's highest
//! reported epoch.
//!
//! Invariants:
//! - a grace period never completes while a holdout has neither a quiescent stamp
//!   `>= epoch` nor an exit report received through [`Grace`];
//! - [`Grace::forget_evidence`] drops every stamp (used on reconnect), so nothing is
//!   ever completed on evidence from an earlier connection.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Kernel thread id.
pub type Tid = u32;

/// What a grace period is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
    /// Freeing a retired trampoline of this agent.
    Trampoline(u64),
    /// A `Synchronize` call.
    Sync(u64),
}

/// One grace period in progress.
#[derive(Clone, Debug)]
pub struct GracePeriod {
    pub purpose: Purpose,
    pub epoch: u64,
    pub holdouts: BTreeSet<Tid>,
    pub started: Instant,
}

/// Grace-period state of one agent.
#[derive(Clone, Debug, Default)]
pub struct Grace {
    /// Threads alive as far as we know, with their highest quiescent stamp.
    threads: BTreeMap<Tid, Option<u64>>,
    pending: BTreeMap<Purpose, GracePeriod>,
}

impl Grace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Threads known alive.
    pub fn threads(&self) -> impl Iterator<Item = Tid> + '_ {
        self.threads.keys().copied()
    }

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    pub fn pending(&self) -> impl Iterator<Item = &GracePeriod> {
        self.pending.values()
    }

    pub fn get(&self, purpose: Purpose) -> Option<&GracePeriod> {
        self.pending.get(&purpose)
    }

    /// A thread was created. It carries no quiescent evidence yet.
    pub fn thread_born(&mut self, tid: Tid) {
        self.threads.entry(tid).or_insert(None);
    }

    /// A thread exited: quiescent for ever. Returns the grace periods that completed.
    pub fn thread_exited(&mut self, tid: Tid) -> Vec<GracePeriod> {
        self.threads.remove(&tid);
        self.release(|gp| gp.holdouts.remove(&tid))
    }

    /// A thread was observed quiescent at `epoch`. Returns the grace periods that completed.
    /// A report about a thread not known alive (it exited, or its birth is not yet
    /// reported) is ignored: it must never bring a dead thread back.
    pub fn quiescent(&mut self, tid: Tid, epoch: u64) -> Vec<GracePeriod> {
        let Some(stamp) = self.threads.get_mut(&tid) else {
            return Vec::new();
        };
        *stamp = Some(stamp.map_or(epoch, |s| s.max(epoch)));
        self.release(|gp| gp.epoch <= epoch && gp.holdouts.remove(&tid))
    }

    /// Starts a grace period at `epoch`. Holdouts are `tids` plus every thread known
    /// alive, minus threads whose stamp already reaches `epoch`. Returns it at once if
    /// it is already complete. Starting a purpose that is already pending replaces it
    /// (its evidence starts from scratch, which can only delay completion).
    pub fn start(
        &mut self,
        purpose: Purpose,
        epoch: u64,
        tids: impl IntoIterator<Item = Tid>,
        now: Instant,
    ) -> Option<GracePeriod> {
        let mut holdouts: BTreeSet<Tid> = self.threads.keys().copied().collect();
        for tid in tids {
            holdouts.insert(tid);
            self.threads.entry(tid).or_insert(None);
        }
        holdouts.retain(|tid| !matches!(self.threads.get(tid), Some(Some(s)) if *s >= epoch));
        let gp = GracePeriod {
            purpose,
            epoch,
            holdouts,
            started: now,
        };
        if gp.holdouts.is_empty() {
            self.pending.remove(&purpose);
            return Some(gp);
        }
        self.pending.insert(purpose, gp);
        None
    }

    /// Abandons a grace period (its waiter went away). Nothing is authorized by this.
    pub fn cancel(&mut self, purpose: Purpose) -> Option<GracePeriod> {
        self.pending.remove(&purpose)
    }

    /// Drops every quiescent stamp and every pending grace period, and replaces the
    /// thread set: used when an agent reconnects. Pending work must be restarted from
    /// the agent's re-report.
    pub fn forget_evidence(&mut self, live: impl IntoIterator<Item = Tid>) -> Vec<GracePeriod> {
        self.threads = live.into_iter().map(|t| (t, None)).collect();
        std::mem::take(&mut self.pending).into_values().collect()
    }

    fn release(&mut self, mut step: impl FnMut(&mut GracePeriod) -> bool) -> Vec<GracePeriod> {
        let mut done = Vec::new();
        for gp in self.pending.values_mut() {
            step(gp);
        }
        let complete: Vec<Purpose> = self
            .pending
            .iter()
            .filter(|(_, gp)| gp.holdouts.is_empty())
            .map(|(p, _)| *p)
            .collect();
        for p in complete {
            if let Some(gp) = self.pending.remove(&p) {
                done.push(gp);
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn completes_only_after_every_holdout() {
        let mut g = Grace::new();
        g.thread_born(1);
        g.thread_born(2);
        assert!(g.start(Purpose::Trampoline(7), 3, [1, 2], now()).is_none());
        assert!(g.quiescent(1, 2).is_empty(), "stale epoch must not count");
        assert!(g.quiescent(1, 3).is_empty());
        let done = g.quiescent(2, 4);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].purpose, Purpose::Trampoline(7));
    }

    #[test]
    fn early_stamp_counts_and_exit_releases() {
        let mut g = Grace::new();
        g.thread_born(1);
        g.quiescent(1, 5);
        g.thread_born(2);
        assert!(g.start(Purpose::Sync(1), 5, [1, 2], now()).is_none());
        assert_eq!(
            g.get(Purpose::Sync(1)).unwrap().holdouts,
            BTreeSet::from([2])
        );
        assert_eq!(g.thread_exited(2).len(), 1);
    }

    #[test]
    fn known_threads_are_waited_for_even_if_unlisted() {
        let mut g = Grace::new();
        g.thread_born(9);
        assert!(g.start(Purpose::Trampoline(1), 1, [], now()).is_none());
        assert_eq!(g.quiescent(9, 1).len(), 1);
    }

    #[test]
    fn empty_completes_at_once_and_forget_drops_evidence() {
        let mut g = Grace::new();
        assert!(g.start(Purpose::Trampoline(1), 1, [], now()).is_some());
        g.thread_born(4);
        g.quiescent(4, 10);
        let dropped = g.forget_evidence([4]);
        assert!(dropped.is_empty());
        assert!(g.start(Purpose::Trampoline(2), 10, [4], now()).is_none());
    }

    /// An operation of the random interleavings.
    #[derive(Clone, Debug)]
    enum Op {
        /// A thread is created.
        Born,
        /// Thread #i (modulo live count) exits.
        Exit(usize),
        /// The agent observes thread #i quiescent now; the report is queued.
        Observe(usize),
        /// Deliver the oldest queued report (reports from one agent arrive in order).
        Deliver,
        /// Retire a new trampoline: bump the epoch, report it with the live threads.
        Retire,
        /// The connection drops and comes back: queued reports are lost, evidence is
        /// forgotten, pending trampolines are re-reported.
        Reconnect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Born),
            1 => any::<usize>().prop_map(Op::Exit),
            6 => any::<usize>().prop_map(Op::Observe),
            6 => Just(Op::Deliver),
            2 => Just(Op::Retire),
            1 => Just(Op::Reconnect),
        ]
    }

    /// The truth the engine must respect, kept naively: for each retired trampoline,
    /// the threads that must still be seen (live at retirement, or born before it and
    /// known), and whether each was seen after it with a delivered report.
    #[derive(Default)]
    struct Model {
        epoch: u64,
        next_tid: Tid,
        live: Vec<Tid>,
        queue: std::collections::VecDeque<(Tid, u64)>,
        /// trampoline -> (epoch, threads not yet proven quiescent through delivered
        /// reports received on the current connection)
        retired: BTreeMap<u64, (u64, BTreeSet<Tid>)>,
        authorized: BTreeSet<u64>,
        next_tramp: u64,
    }

    fn apply(m: &mut Model, g: &mut Grace, op: &Op) -> Vec<GracePeriod> {
        let t0 = Instant::now();
        match op {
            Op::Born => {
                m.next_tid += 1;
                m.live.push(m.next_tid);
                g.thread_born(m.next_tid);
                vec![]
            }
            Op::Exit(i) if !m.live.is_empty() => {
                let tid = m.live.remove(i % m.live.len());
                // An exit is reported in stream order after earlier queued reports.
                let mut done = Vec::new();
                while let Some((t, e)) = m.queue.pop_front() {
                    done.extend(deliver(m, g, t, e));
                }
                for (_, (_, need)) in m.retired.iter_mut() {
                    need.remove(&tid);
                }
                done.extend(g.thread_exited(tid));
                done
            }
            Op::Exit(_) => vec![],
            Op::Observe(i) if !m.live.is_empty() => {
                let tid = m.live[i % m.live.len()];
                m.queue.push_back((tid, m.epoch));
                vec![]
            }
            Op::Observe(_) => vec![],
            Op::Deliver => match m.queue.pop_front() {
                Some((t, e)) => deliver(m, g, t, e),
                None => vec![],
            },
            Op::Retire => {
                m.epoch += 1;
                m.next_tramp += 1;
                let need: BTreeSet<Tid> = m.live.iter().copied().collect();
                m.retired.insert(m.next_tramp, (m.epoch, need));
                g.start(
                    Purpose::Trampoline(m.next_tramp),
                    m.epoch,
                    m.live.clone(),
                    t0,
                )
                .into_iter()
                .collect()
            }
            Op::Reconnect => {
                m.queue.clear();
                g.forget_evidence(m.live.clone());
                let mut done = Vec::new();
                for (id, (epoch, need)) in m.retired.iter_mut() {
                    if m.authorized.contains(id) {
                        continue;
                    }
                    // Nothing counts from before the reconnect.
                    *need = m.live.iter().copied().collect();
                    done.extend(g.start(Purpose::Trampoline(*id), *epoch, m.live.clone(), t0));
                }
                done
            }
        }
    }

    fn deliver(m: &mut Model, g: &mut Grace, tid: Tid, epoch: u64) -> Vec<GracePeriod> {
        for (_, (e, need)) in m.retired.iter_mut() {
            if epoch >= *e {
                need.remove(&tid);
            }
        }
        g.quiescent(tid, epoch)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// Never authorized early; always authorized once every thread has reported.
        #[test]
        fn never_early_always_eventually(ops in proptest::collection::vec(op(), 1..120)) {
            let mut m = Model::default();
            let mut g = Grace::new();
            for op in &ops {
                for gp in apply(&mut m, &mut g, op) {
                    if let Purpose::Trampoline(id) = gp.purpose {
                        let (_, need) = &m.retired[&id];
                        prop_assert!(need.is_empty(), "trampoline {id} authorized early: {need:?} unseen ({op:?})");
                        prop_assert!(m.authorized.insert(id), "trampoline {id} authorized twice");
                    }
                }
            }
            // Every live thread reports at the current epoch; everything completes.
            for tid in m.live.clone() {
                m.queue.push_back((tid, m.epoch));
            }
            while let Some((t, e)) = m.queue.pop_front() {
                for gp in deliver(&mut m, &mut g, t, e) {
                    if let Purpose::Trampoline(id) = gp.purpose {
                        prop_assert!(m.authorized.insert(id));
                    }
                }
            }
            for id in m.retired.keys() {
                prop_assert!(m.authorized.contains(id), "trampoline {id} never authorized");
            }
            prop_assert_eq!(g.pending().count(), 0);
        }
    }
}
