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
//! `tgkill`; `control::observer::Observer::signals` counts the signals sent so tests
//! can measure it.
//!
//! This module is the program threads' side (the epoch, stamps, the handler); the agent
//! thread's side, which decides how to observe each thread, is `control::observer`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use super::block::{self, Header};
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
/// Agent thread only (it may allocate or lock).
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
