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
