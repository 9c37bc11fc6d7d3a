//! The agent thread's side of quiescent-state detection (`hot::qs` is the program
//! threads' side): decides, for each thread, how to observe it (its block's stamp,
//! blocked in a system call outside trampolines, or a signal), collects the stamps to
//! report, and keeps the threads holding up grace periods (stalls).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::hot::block::{self, Header};
use crate::hot::qs::{EPOCH, SIGNAL};
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
    /// Signals sent so far.
    pub signals: u64,
    /// Quiescent states found through the blocked-in-syscall path.
    pub blocked_seen: u64,
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
    }

    /// One observation round. `need` is the epoch grace periods wait for (0: none).
    /// Returns new `(tid, epoch)` stamps to report. With `active`, threads not yet
    /// seen at `need` are probed (blocked check, else signal).
    pub fn round(&mut self, threads: &BTreeSet<u32>, need: u64, active: bool) -> Vec<(u32, u64)> {
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
        for &tid in threads {
            let h = by_tid.get(&tid).copied();
            let mut best = h.map_or(0, |h| h.qs_epoch.load(Ordering::Acquire));
            let known = self.reported.get(&tid).copied().unwrap_or(0);
            if active && best.max(known) < need {
                // Blocked in a system call, outside, with no dispatch in progress?
                let e0 = EPOCH.load(Ordering::Acquire);
                let before = probe(h);
                let state = procfs::syscall_state(tid);
                let h2 = block::all().find(|x| x.tid.load(Ordering::Acquire) == tid);
                let after = probe(h2);
                match state {
                    SyscallState::Blocked { nr, pc, .. }
                        if nr != libc::SYS_gettid
                            && !in_trampoline(pc)
                            && trap::sled_exit(pc as usize).is_none()
                            && before == after
                            && matches!(
                                before,
                                Probe::NoBlock | Probe::Block { nesting: 0, .. }
                            ) =>
                    {
                        best = best.max(e0);
                        self.blocked_seen += 1;
                    }
                    SyscallState::Blocked { pc, .. } => {
                        self.note_holdout(tid, now, pc);
                    }
                    SyscallState::Running => {
                        self.note_holdout(tid, now, 0);
                        let last = self.signalled.get(&tid).copied();
                        let due = last
                            .is_none_or(|t| now.duration_since(t) >= Duration::from_micros(200));
                        // Real-time signals queue: a thread that blocks ours (or has not
                        // run since) would pile them up against the user's
                        // RLIMIT_SIGPENDING. Keep at most one pending per thread.
                        let pending = due && last.is_some() && procfs::signal_pending(tid, signal);
                        if signal != 0 && due && !pending {
                            // SAFETY: tgkill to a thread of our own process with a
                            // signal whose handler we installed.
                            unsafe {
                                libc::syscall(
                                    libc::SYS_tgkill,
                                    libc::getpid(),
                                    tid as libc::c_int,
                                    signal,
                                );
                            }
                            self.signals += 1;
                            self.signalled.insert(tid, now);
                        }
                    }
                    SyscallState::Gone => {}
                }
            }
            if best > known {
                self.reported.insert(tid, best);
                out.push((tid, best));
            }
            if best.max(known) >= need {
                self.holdouts.remove(&tid);
            }
        }
        self.holdouts.retain(|t, _| threads.contains(t));
        out
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
    use crate::hot::qs::{default_signal, install_signal, quiescent};
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
}
