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
//!    between two nops of a sled being converted is first moved past the sled, one
//!    inside a prologue being relocated to the same point of its relocated copy;
//! 4. exit: an exited thread is quiescent for ever (reported by the thread scan).
//!
//! Every observation is stamped with the epoch read *before* the observation, so a
//! stamp `>= e` proves the thread was seen outside after epoch `e` began (the epoch is
//! bumped only after an unpatch completed and all cores were serialized).
//!
//! Remaining race, documented: a thread may block in a system call between our read of
//! its `syscall` file ("running") and the signal's arrival; the signal then interrupts
//! that system call. The window is the few microseconds between the read and
//! `tgkill`; `control::observer::Observer::signals` counts the signals sent so tests
//! can measure it.
//!
//! This module is the program threads' side (the epoch, stamps, the handler); the agent
//! thread's side, which decides how to observe each thread, is `control::observer`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use super::block::{self, Header};
use super::qswake::{self, Seen};
use super::ranges::in_trampoline;
use super::{stats, trap};

/// The agent's epoch. Bumped after every completed unpatch (and every barrier).
pub static EPOCH: AtomicU64 = AtomicU64::new(1);

/// The real-time signal used to observe running threads (0: not installed).
pub(crate) static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Stamps a quiescent state of the calling thread (owner-only write).
/// Async-signal-safe.
#[inline]
pub fn stamp(h: &Header) {
    let e = EPOCH.load(Ordering::Acquire);
    let old = h.qs_epoch.load(Ordering::Relaxed);
    if old < e {
        h.qs_epoch.store(e, Ordering::Release);
        qswake::stamped(old, e);
    }
}

/// The deferred stamp of the outermost dispatch (the handler found the thread inside):
/// stamps, logs it for the timeline and wakes the agent thread if it waits for it.
/// Async-signal-safe.
pub(crate) fn stamp_deferred(h: &Header) {
    stamp(h);
    qswake::log(h.tid.load(Ordering::Relaxed), Seen::DeferredStamped);
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

/// The agent's mark on its own quiescent-state signals: `si_code == SI_QUEUE`, `si_pid`
/// = this process and this value in `si_value` ([`send`]). Any other instance of the
/// signal is the program's (`sigwrap` runs the program's action for it).
pub(crate) const MAGIC: u64 = 0x7062_6173_5153_6967; // "pbasQSig"

/// The real-time-signal members of a `siginfo_t` (x86-64 layout, 128 bytes), which the
/// `libc` crate does not expose as fields.
#[repr(C)]
pub(crate) struct QueueInfo {
    pub signo: i32,
    pub errno: i32,
    pub code: i32,
    _pad: i32,
    pub pid: i32,
    pub uid: u32,
    pub value: u64,
    _rest: [u64; 12],
}

const _: () = assert!(std::mem::size_of::<QueueInfo>() == std::mem::size_of::<libc::siginfo_t>());

/// Whether `info` is one of the agent's own signals ([`send`]). Async-signal-safe.
///
/// # Safety
/// `info` is null or the `siginfo_t` the kernel passed to an `SA_SIGINFO` handler.
pub(crate) unsafe fn is_agents(info: *const libc::siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: the caller passes the kernel's siginfo_t, which has QueueInfo's size and
    // layout.
    let q = unsafe { &*info.cast::<QueueInfo>() };
    // SAFETY: getpid has no preconditions.
    q.code == libc::SI_QUEUE && q.value == MAGIC && q.pid == unsafe { libc::getpid() }
}

/// Sends the agent's quiescent-state signal to thread `tid` of this process with
/// `rt_tgsigqueueinfo`, marked as the agent's ([`is_agents`]). Async-signal-safe.
pub(crate) fn send(tid: u32) -> Result<(), i32> {
    let sig = signal();
    // SAFETY: getpid and getuid have no preconditions.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    let info = QueueInfo {
        signo: sig,
        errno: 0,
        code: libc::SI_QUEUE,
        _pad: 0,
        pid,
        uid,
        value: MAGIC,
        _rest: [0; 12],
    };
    // SAFETY: rt_tgsigqueueinfo(tgid, tid, sig, info) to a thread of this process, with
    // a fully initialized siginfo_t-sized buffer; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            pid,
            tid as libc::c_int,
            sig,
            &raw const info,
        )
    };
    if rc != 0 {
        return Err(crate::sys::errno());
    }
    Ok(())
}

/// The agent's part of the quiescent-state signal handler (`sigwrap` calls it for the
/// agent's own signals). Async-signal-safe: reads the epoch, the interrupted PC and
/// this thread's TLS; writes this thread's block.
pub(crate) fn on_signal(uctx: *mut libc::c_void) {
    let e = EPOCH.load(Ordering::Acquire);
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let pc = unsafe { (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] }
        as u64;
    if block::NEST.with(|n| n.get()) > 0 {
        // Inside a dispatch: its outermost level stamps on the way out.
        block::DEFERRED.with(|d| d.set(1));
        qswake::log(crate::sys::tid(), Seen::Deferred);
        return;
    }
    if let Some(next) = trap::sled_exit(pc as usize) {
        // Between two 1-byte nops of a sled being converted: skip the remaining nops
        // (exactly what executing them does), so the thread is outside the bytes about
        // to be replaced and may be stamped.
        // SAFETY: the kernel passes a valid, writable ucontext_t; the new PC is the
        // next instruction boundary of the code the thread was executing.
        unsafe {
            (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] =
                next as i64;
        }
        stats::bump(&stats::SLED_EXITS);
    }
    match trap::reloc_exit(pc as usize) {
        trap::RelocPc::Outside => {}
        trap::RelocPc::Moved(to) => {
            // At an instruction boundary inside a prologue being relocated: continue at
            // the same point of its relocated copy (what the original instructions do),
            // so the thread is outside the bytes about to be replaced. It is now in the
            // copy of a live trampoline (the one being installed), with no trampoline
            // frame on its stack (it was in the program's code): outside every retired
            // trampoline, so it may be stamped.
            // SAFETY: the kernel passes a valid, writable ucontext_t; the new PC is the
            // matching instruction boundary of the copy, which is live code.
            unsafe {
                (*uctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] =
                    to as i64;
            }
            stats::bump(&stats::RELOC_EXITS);
            stamp_now(e);
            return;
        }
        // Inside, but not at a boundary (never seen): not quiescent, the agent looks again.
        trap::RelocPc::Stuck => {
            qswake::log(crate::sys::tid(), Seen::Inside);
            qswake::retry();
            return;
        }
    }
    if in_trampoline(pc) {
        // In a trampoline's own few instructions (e.g. a count fast path): it will be
        // out in nanoseconds; the agent looks again at once.
        qswake::log(crate::sys::tid(), Seen::Inside);
        qswake::retry();
        return;
    }
    stamp_now(e);
}

/// Stamps epoch `e` (read before the observation) for the calling thread.
/// Async-signal-safe.
fn stamp_now(e: u64) {
    let tid = crate::sys::tid();
    if let Some(h) = block::current().or_else(|| block::claim(tid)) {
        let old = h.qs_epoch.load(Ordering::Relaxed);
        if old < e {
            h.qs_epoch.store(e, Ordering::Release);
            qswake::log(tid, Seen::Stamped);
            qswake::stamped(old, e);
        }
    }
}

/// Claims `signal` as the quiescent-state signal (once; `sigwrap::install_qs_signal`
/// installs the handler). Returns false if a signal was already claimed.
pub(crate) fn claim_signal(signal: i32) -> bool {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return false;
    }
    SIGNAL.store(signal, Ordering::Release);
    true
}

/// Undoes [`claim_signal`] (installing the handler failed).
pub(crate) fn unclaim_signal() {
    SIGNAL.store(0, Ordering::Release);
    INSTALLED.store(false, Ordering::Release);
}

/// The quiescent-state signal, once installed (0 before).
pub fn signal() -> i32 {
    SIGNAL.load(Ordering::Acquire)
}

/// The default quiescent-state signal: SIGRTMIN + 3.
pub fn default_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_quiescent_state_stamps_the_current_epoch() {
        block::refill(2).unwrap();
        std::thread::spawn(|| {
            let e = EPOCH.load(Ordering::Acquire);
            quiescent();
            let h = block::current().expect("claimed a block");
            assert!(h.qs_epoch.load(Ordering::Acquire) >= e);
            // Inside a dispatch, nothing is stamped.
            h.qs_epoch.store(0, Ordering::Release);
            block::NEST.with(|n| n.set(1));
            quiescent();
            assert_eq!(h.qs_epoch.load(Ordering::Acquire), 0);
            block::NEST.with(|n| n.set(0));
            h.release(std::iter::empty());
        })
        .join()
        .unwrap();
    }
}
