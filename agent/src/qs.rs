//! Quiescent states: the agent's epoch, and the four ways a thread is seen outside
//! every trampoline and callback (DESIGN.md, "Quiescent states"):
//!
//! 1. explicit: [`quiescent`], called by the program (QSBR style);
//! 2. blocked: `/proc/self/task/TID/syscall` shows the thread blocked in a system call
//!    at a PC outside trampolines, with no dispatch in progress — seen without
//!    disturbing it (threads blocked in a syscall are never signalled: `nanosleep`,
//!    `poll`, `epoll_wait` would fail with EINTR even under SA_RESTART);
//! 3. interrupted: running threads get a real-time signal; the handler reads the
//!    interrupted PC from the `ucontext` and the thread's dispatch depth; inside a
//!    dispatch it defers, and the outermost dispatch stamps on its way out; a thread
//!    between two nops of a sled being converted is first moved past the sled;
//! 4. exit: an exited thread is quiescent for ever (reported by the thread scan).
//!
//! Every observation is stamped with the epoch read *before* the observation, so a
//! stamp `>= e` proves the thread was seen outside after epoch `e` began (the epoch is
//! bumped only after an unpatch completed and all cores were serialized).
//!
//! Remaining race, documented: a thread may block in a system call between our read of
//! its `syscall` file ("running") and the signal's arrival; the signal then interrupts
//! that system call. The window is the few microseconds between the read and
//! `tgkill`; `Observer::signals` counts the signals sent so tests can measure it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::block::{self, Header};
use crate::dispatch;
use crate::sys::procfs::{self, SyscallState};

/// The agent's epoch. Bumped after every completed unpatch (and every barrier).
pub static EPOCH: AtomicU64 = AtomicU64::new(1);

/// The real-time signal used to observe running threads (0: not installed).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Lock-free table of trampoline address ranges, for the signal handler.
const RANGES: usize = 1024;
static RANGE_START: [AtomicU64; RANGES] = [const { AtomicU64::new(0) }; RANGES];
static RANGE_END: [AtomicU64; RANGES] = [const { AtomicU64::new(0) }; RANGES];

/// Records a region of trampoline memory (never removed: regions are never unmapped).
pub fn add_range(start: u64, end: u64) -> bool {
    for i in 0..RANGES {
        if RANGE_START[i]
            .compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            RANGE_END[i].store(end, Ordering::Release);
            return true;
        }
    }
    false
}

/// Whether `pc` is in trampoline memory or in the static entry stub.
/// Async-signal-safe.
#[inline]
pub fn in_trampoline(pc: u64) -> bool {
    let (s, e) = dispatch::stub_range();
    if pc >= s && pc < e {
        return true;
    }
    for i in 0..RANGES {
        let start = RANGE_START[i].load(Ordering::Acquire);
        if start == 0 {
            return false;
        }
        let end = RANGE_END[i].load(Ordering::Acquire);
        // A range being added has end 0 for an instant: treat it as covering
        // everything after start (conservative).
        if pc >= start && (end == 0 || pc < end) {
            return true;
        }
    }
    false
}

/// Stamps a quiescent state of the calling thread (owner-only write).
/// Async-signal-safe.
#[inline]
pub fn stamp(h: &Header) {
    let e = EPOCH.load(Ordering::Acquire);
    if h.qs_epoch.load(Ordering::Relaxed) < e {
        h.qs_epoch.store(e, Ordering::Release);
    }
}

/// Explicit quiescent state: the calling thread says it is outside every traced
/// function and callback. Cheap (a TLS load and a store); does nothing inside a
/// callback.
pub fn quiescent() {
    if block::NEST.with(|n| n.get()) != 0 {
        return;
    }
    if let Some(h) = block::current().or_else(|| block::claim(crate::sys::tid())) {
        stamp(h);
    }
}

/// The quiescent-state signal handler. Async-signal-safe: reads the epoch, the
/// interrupted PC and this thread's TLS; writes this thread's block.
pub(crate) extern "C" fn on_signal(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    uctx: *mut libc::c_void,
) {
    let e = EPOCH.load(Ordering::Acquire);
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let pc = unsafe { (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] }
        as u64;
    if block::NEST.with(|n| n.get()) > 0 {
        // Inside a dispatch: its outermost level stamps on the way out.
        block::DEFERRED.with(|d| d.set(1));
        return;
    }
    if let Some(next) = crate::trap::sled_exit(pc as usize) {
        // Between two 1-byte nops of a sled being converted: skip the remaining nops
        // (exactly what executing them does), so the thread is outside the bytes about
        // to be replaced and may be stamped.
        // SAFETY: the kernel passes a valid, writable ucontext_t; the new PC is the
        // next instruction boundary of the code the thread was executing.
        unsafe {
            (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] =
                next as i64;
        }
        crate::stats::bump(&crate::stats::SLED_EXITS);
    }
    if in_trampoline(pc) {
        // In a trampoline's own few instructions (e.g. a count fast path): it will be
        // out in nanoseconds; the agent looks again.
        return;
    }
    if let Some(h) = block::current().or_else(|| block::claim(crate::sys::tid()))
        && h.qs_epoch.load(Ordering::Relaxed) < e
    {
        h.qs_epoch.store(e, Ordering::Release);
    }
}

/// Installs the handler for real-time signal `SIGRTMIN + offset` (once).
pub fn install_signal(signal: i32) -> std::io::Result<()> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid starting point; we set the handler, flags
    // and a full mask: no program handler may run nested in ours (it would see our
    // handler's PC, not the trampoline PC ours interrupted; see `sigwrap`).
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        crate::sys::signal::real_sigaction(signal, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        INSTALLED.store(false, Ordering::Release);
        return Err(std::io::Error::last_os_error());
    }
    SIGNAL.store(signal, Ordering::Release);
    Ok(())
}

/// The quiescent-state signal, once installed (0 before).
pub fn signal() -> i32 {
    SIGNAL.load(Ordering::Acquire)
}

/// The default quiescent-state signal: SIGRTMIN + 3.
pub fn default_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

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
                            && crate::trap::sled_exit(pc as usize).is_none()
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
