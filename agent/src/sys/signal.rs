//! libc's `sigaction`, bypassing the agent's interposition of it (`hot::sigwrap`), for
//! the agent's own handlers. Async-signal-safe.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

/// libc's `sigaction` (resolved with `dlsym(RTLD_NEXT)`), 0 until resolved.
static REAL: AtomicUsize = AtomicUsize::new(0);

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;

/// libc's `sigaction`. `RTLD_NEXT` searches the objects loaded after the one holding
/// this code, so it never finds the agent's own interposed `sigaction`.
fn real() -> Option<SigactionFn> {
    let mut f = REAL.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with a valid NUL-terminated name; RTLD_NEXT finds the next
        // definition after this object (libc's).
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"sigaction".as_ptr()) } as usize;
        if f == 0 {
            return None;
        }
        REAL.store(f, Ordering::Release);
    }
    // SAFETY: `f` is libc's sigaction, which has this signature.
    Some(unsafe { std::mem::transmute::<usize, SigactionFn>(f) })
}

/// libc's `sigaction`, bypassing the interposition (for the agent's own handlers).
///
/// # Safety
/// As `sigaction(2)`: `act` and `old` are null or valid.
pub(crate) unsafe fn real_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    match real() {
        // SAFETY: forwarded as given.
        Some(f) => unsafe { f(sig, act, old) },
        None => {
            super::set_errno(libc::ENOSYS);
            -1
        }
    }
}

/// Fills `set` with the mask every agent handler runs with: every signal but SIGTRAP.
/// SIGTRAP stays deliverable so that a thread reaching a site that holds a transient
/// `int3` (a relocated prologue keeps one through a grace period) is emulated even
/// while one of the agent's handlers runs, or returns through libc's signal-return
/// trampoline (`__restore_rt`, itself patchable) with the handler's mask: the kernel
/// kills a process whose thread traps with SIGTRAP blocked. The trap handler is
/// re-entrant (table lookups and a PC change), so a nested trap is emulated too.
pub fn handler_mask(set: &mut libc::sigset_t) {
    // SAFETY: filling and editing a valid sigset_t the caller owns.
    unsafe {
        libc::sigfillset(set);
        libc::sigdelset(set, libc::SIGTRAP);
    }
}
