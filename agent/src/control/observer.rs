//! The agent thread's side of quiescent-state detection (`hot::qs` is the program
//! threads' side): decides, for each thread, how to observe it (its block's stamp,
//! blocked in a system call outside trampolines, or a signal), collects the stamps to
//! report, and keeps the threads holding up grace periods (stalls).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use patchbay_proto::GraceStep as Step;

use crate::control::timeline;
use crate::hot::block::{self, Header};
use crate::hot::qs::{self, EPOCH, SIGNAL};
use crate::hot::qswake;
use crate::hot::ranges::in_trampoline;
use crate::hot::trap;
use crate::sys::procfs::{self, SyscallState};

/// A snapshot of a thread's dispatch state read from another thread.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Probe {
    NoBlock,
    Block { seq: u64, nesting: u32 },
}

fn probe(h: Option<&Header>) -> Probe {
    match h {
        None => Probe::NoBlock,
        Some(h) => Probe::Block {
            seq: h.seq.load(Ordering::Acquire),
            nesting: h.nesting.load(Ordering::Acquire),
        },
    }
}

/// A thread the current grace periods still wait for, as seen by the agent.
#[derive(Clone, Debug)]
pub struct Holdout {
    pub tid: u32,
    pub since: Instant,
    pub pc: u64,
    pub blocks_signal: bool,
}

/// The agent thread's side: decides, for each thread, how to observe it, and collects
/// the stamps to report. Runs on the agent thread only.
#[derive(Default)]
pub struct Observer {
    /// Highest stamp reported to the server per thread.
    reported: HashMap<u32, u64>,
    /// When each thread was last signalled (rate limit).
    signalled: HashMap<u32, Instant>,
    /// Threads that have been holding up a grace period, since when.
    holdouts: HashMap<u32, Holdout>,
    /// Threads found running (not blocked in a system call) by their last probe.
    running: HashSet<u32>,
    /// `qswake::RETRY` as last seen.
    retry_seen: u64,
    /// Signals sent so far.
    pub signals: u64,
    /// Quiescent states found through the blocked-in-syscall path.
    pub blocked_seen: u64,
    /// Rounds in which a running thread was not signalled because it blocks the signal.
    pub blocked_skipped: u64,
}

impl Observer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets what was reported (a new connection: everything is reported afresh).
    pub fn forget_reports(&mut self) {
        self.reported.clear();
    }

    /// Highest stamp reported for `tid` (0: none).
    pub fn reported(&self, tid: u32) -> u64 {
        self.reported.get(&tid).copied().unwrap_or(0)
    }

    pub fn thread_exited(&mut self, tid: u32) {
        self.reported.remove(&tid);
        self.signalled.remove(&tid);
        self.holdouts.remove(&tid);
        self.running.remove(&tid);
    }

    /// One observation round. `need` is the epoch grace periods wait for (0: none).
    /// Returns new `(tid, epoch)` stamps to report. With `active`, threads not yet
    /// seen at `need` are probed (blocked check, else signal): the threads found running
    /// last time first, so that their signals are on their way while the others are
    /// probed. Before probing, the round arms `hot::qswake` with the number of threads
    /// it waits for, so that the stamp of the last of them wakes the agent thread.
    pub fn round(&mut self, threads: &BTreeSet<u32>, need: u64, active: bool) -> Vec<(u32, u64)> {
        timeline::pull();
        let mut by_tid: HashMap<u32, &'static Header> = HashMap::new();
        for h in block::all() {
            let t = h.tid.load(Ordering::Acquire);
            if t != 0 {
                by_tid.insert(t, h);
            }
        }
        let signal = SIGNAL.load(Ordering::Acquire);
        let now = Instant::now();
        let mut out = Vec::new();
        // Threads already seen, and the ones this round must look at.
        let mut todo = Vec::new();
        for &tid in threads {
            let h = by_tid.get(&tid).copied();
            let best = h.map_or(0, |h| h.qs_epoch.load(Ordering::Acquire));
            let known = self.reported.get(&tid).copied().unwrap_or(0);
            if active && best.max(known) < need {
                todo.push(tid);
            } else {
                self.seen(tid, best, known, need, &mut out);
            }
        }
        if !active || need == 0 {
            qswake::arm(0, 0);
        } else {
            qswake::arm(need, todo.len() as i64);
        }
        // Running last time first (likely running now: signal them early).
        todo.sort_by_key(|t| !self.running.contains(t));
        let retry = qswake::RETRY.load(Ordering::Acquire);
        let retry_now = retry != self.retry_seen;
        self.retry_seen = retry;
        for tid in todo {
            let h = by_tid.get(&tid).copied();
            let known = self.reported.get(&tid).copied().unwrap_or(0);
            // Blocked in a system call, outside, with no dispatch in progress?
            let e0 = EPOCH.load(Ordering::Acquire);
            let before = probe(h);
            let state = procfs::syscall_state(tid);
            let h2 = block::all().find(|x| x.tid.load(Ordering::Acquire) == tid);
            let after = probe(h2);
            let mut best = h.map_or(0, |h| h.qs_epoch.load(Ordering::Acquire));
            match state {
                SyscallState::Blocked { nr, pc, .. }
                    if nr != libc::SYS_gettid
                        && !in_trampoline(pc)
                        && trap::sled_exit(pc as usize).is_none()
                        && before == after
                        && matches!(before, Probe::NoBlock | Probe::Block { nesting: 0, .. }) =>
                {
                    self.running.remove(&tid);
                    if best < e0 {
                        timeline::note(Step::AgentProbeBlocked, tid);
                    }
                    best = best.max(e0);
                    self.blocked_seen += 1;
                }
                SyscallState::Blocked { pc, .. } => {
                    self.running.remove(&tid);
                    timeline::note(Step::AgentProbeInside, tid);
                    self.note_holdout(tid, now, pc);
                }
                SyscallState::Running => {
                    self.running.insert(tid);
                    self.note_holdout(tid, now, 0);
                    let last = self.signalled.get(&tid).copied();
                    // Again at once when the handler found a thread in trampoline code
                    // (it is out in nanoseconds); otherwise at most every 200 µs.
                    let due = retry_now
                        || last.is_none_or(|t| now.duration_since(t) >= Duration::from_micros(200));
                    if signal != 0 && due && self.may_signal(tid, signal, last.is_some()) {
                        // A failure (the thread just exited, or RLIMIT_SIGPENDING
                        // reached) is retried at the next round.
                        if qs::send(tid).is_ok() {
                            self.signals += 1;
                            timeline::note(Step::AgentSignalSent, tid);
                        }
                        self.signalled.insert(tid, now);
                    } else {
                        timeline::note(Step::AgentSignalSkipped, tid);
                    }
                }
                SyscallState::Gone => {
                    self.running.remove(&tid);
                }
            }
            // A stamp taken meanwhile (the handler of a signal just sent) counts too.
            best = best.max(h.map_or(0, |h| h.qs_epoch.load(Ordering::Acquire)));
            self.seen(tid, best, known, need, &mut out);
        }
        self.holdouts.retain(|t, _| threads.contains(t));
        out
    }

    /// `tid`'s best evidence is `best` (reported so far: `known`): reports it when new.
    fn seen(&mut self, tid: u32, best: u64, known: u64, need: u64, out: &mut Vec<(u32, u64)>) {
        if best > known {
            self.reported.insert(tid, best);
            out.push((tid, best));
            if need > 0 && known < need && best >= need {
                timeline::note(Step::AgentStampSeen, tid);
            }
        }
        if best.max(known) >= need {
            self.holdouts.remove(&tid);
        }
    }

    /// Whether `tid` may get the agent's signal now. Not when it blocks the signal
    /// (`sigprocmask`/`pthread_sigmask`): the signal would stay pending in the program's
    /// view (`sigpending`, `sigwaitinfo`); such a thread is seen by the blocked-in-a-
    /// system-call probe only, and is a stall only while it holds a grace period. Nor,
    /// after a first signal, while one is still pending: real-time signals queue, and a
    /// thread that has not run since would pile them up against the user's
    /// RLIMIT_SIGPENDING. One read of the thread's `status` answers both.
    fn may_signal(&mut self, tid: u32, signal: i32, signalled_before: bool) -> bool {
        let Some(status) = procfs::thread_status(tid) else {
            return false;
        };
        if procfs::status_has_signal(&status, "SigBlk:", signal) {
            self.blocked_skipped += 1;
            if let Some(h) = self.holdouts.get_mut(&tid) {
                h.blocks_signal = true;
            }
            return false;
        }
        !(signalled_before && procfs::status_has_signal(&status, "SigPnd:", signal))
    }

    fn note_holdout(&mut self, tid: u32, now: Instant, pc: u64) {
        let sig = SIGNAL.load(Ordering::Acquire);
        let h = self.holdouts.entry(tid).or_insert(Holdout {
            tid,
            since: now,
            pc,
            blocks_signal: false,
        });
        if pc != 0 {
            h.pc = pc;
        }
        if sig != 0 && now.duration_since(h.since) > Duration::from_millis(50) {
            h.blocks_signal = procfs::blocks_signal(tid, sig);
        }
    }

    /// Threads holding up grace periods for at least `threshold`.
    pub fn stalls(&self, threshold: Duration) -> Vec<Holdout> {
        let now = Instant::now();
        self.holdouts
            .values()
            .filter(|h| now.duration_since(h.since) >= threshold)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::qs::{default_signal, quiescent};
    use crate::hot::sigwrap::install_qs_signal as install_signal;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn explicit_blocked_and_signalled_threads_are_seen() {
        block::refill(8).unwrap();
        install_signal(default_signal()).unwrap();
        let need = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        let stop = Arc::new(AtomicBool::new(false));
        // A spinning thread (needs the signal), a blocked one, an explicit one.
        let (tx, rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let t1 = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                tx.send(crate::sys::tid()).unwrap();
                while !s.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let (btx, brx) = std::sync::mpsc::channel::<()>();
        let t2 = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                tx.send(crate::sys::tid()).unwrap();
                let _ = brx.recv();
            })
        };
        let t3 = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                quiescent();
                tx.send(crate::sys::tid()).unwrap();
            })
        };
        let tids: BTreeSet<u32> = (0..3).map(|_| rx.recv().unwrap()).collect();
        t3.join().unwrap();
        let mut obs = Observer::new();
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.len() < 3 {
            for (t, e) in obs.round(&tids, need, true) {
                assert!(e >= need);
                seen.insert(t);
            }
            assert!(Instant::now() < deadline, "seen only {seen:?} of {tids:?}");
            std::thread::yield_now();
        }
        assert!(obs.signals >= 1);
        stop.store(true, Ordering::Relaxed);
        drop(btx);
        t1.join().unwrap();
        t2.join().unwrap();
    }

    /// A running thread that blocks the agent's signal is not signalled (nothing would
    /// pend in its `sigpending`); it holds the grace period while it runs (a stall with
    /// `blocks_signal`), and is seen by the probe as soon as it blocks in a system call;
    /// then it is no stall any more.
    #[test]
    fn a_thread_blocking_the_signal_is_probed_not_signalled() {
        block::refill(8).unwrap();
        install_signal(default_signal()).unwrap();
        let sig = SIGNAL.load(Ordering::Acquire);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (btx, brx) = std::sync::mpsc::channel::<()>();
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            // SAFETY: blocking one signal in this thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            tx.send(crate::sys::tid()).unwrap();
            while !s.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            let _ = brx.recv();
        });
        let tid = rx.recv().unwrap();
        let tids: BTreeSet<u32> = [tid].into();
        let need = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
        let mut obs = Observer::new();
        // Running with the signal blocked: never signalled, never stamped.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(80) {
            assert!(obs.round(&tids, need, true).is_empty());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(obs.signals, 0);
        assert!(obs.blocked_skipped > 0);
        let stalls = obs.stalls(Duration::from_millis(50));
        assert_eq!(stalls.len(), 1, "{stalls:?}");
        assert!(stalls[0].blocks_signal);
        assert!(!procfs::status_has_signal(
            &procfs::thread_status(tid).unwrap(),
            "SigPnd:",
            sig
        ));
        // Blocked in a system call: seen by the probe; no stall left.
        stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if obs
                .round(&tids, need, true)
                .iter()
                .any(|&(t, e)| t == tid && e >= need)
            {
                break;
            }
            assert!(Instant::now() < deadline, "never seen blocked");
            std::thread::yield_now();
        }
        assert_eq!(obs.signals, 0);
        assert!(obs.stalls(Duration::ZERO).is_empty());
        drop(btx);
        t.join().unwrap();
    }
}
