//! Thin wrappers over the operating system, shared by both worlds of the agent: the
//! calling thread's id, `errno`, libc's own `sigaction`, `membarrier`, and the
//! `/proc/self` parsers. A leaf: it imports nothing of the crate.
//!
//! [`tid`], [`errno`], [`set_errno`], [`membarrier`] and [`signal::real_sigaction`]
//! are async-signal-safe (no allocation, no lock); the [`procfs`] readers allocate and
//! are for the agent thread only (their parsers are pure).

pub(crate) mod dl;
pub(crate) mod procfs;
pub(crate) mod signal;
mod static_tls;

use std::cell::Cell;

std::thread_local! {
    /// The calling thread's kernel id, 0 until first asked (and after a fork).
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// The calling thread's kernel id, cached per thread. Async-signal-safe.
#[inline]
pub(crate) fn tid() -> u32 {
    TID.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        let v = tid_now();
        t.set(v);
        v
    })
}

/// The calling thread's kernel id, asked from the kernel (not the cache): for the
/// fatal paths, which must be right even in a child forked without the agent's fork
/// hook (whose cache still holds the parent thread's id). Async-signal-safe.
pub(crate) fn tid_now() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// Forgets the cached tid (in a forked child, whose only thread has a new id).
pub(crate) fn reset_tid() {
    TID.with(|t| t.set(0));
}

/// This thread's `errno`. Async-signal-safe.
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Sets this thread's `errno`. Async-signal-safe.
pub(crate) fn set_errno(e: i32) {
    // SAFETY: __errno_location returns this thread's errno word, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`: serializes every core
/// running a thread of this process.
pub(crate) const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
/// Registration for [`MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`] (per process).
pub(crate) const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

/// `membarrier(cmd, 0, 0)`; the error is the errno. Async-signal-safe.
pub(crate) fn membarrier(cmd: libc::c_int) -> Result<(), i32> {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) and touches no user memory.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) };
    if rc != 0 {
        return Err(errno());
    }
    Ok(())
}
