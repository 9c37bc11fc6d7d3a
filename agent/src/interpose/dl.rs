//! `dlopen` and `dlmopen`, interposed: after libc's returns a handle and the set of
//! loaded objects grew, the calling thread asks the agent thread to discover the new
//! objects now and waits (at most `control::loads::WAIT`) until the tracers meant for
//! this process cover them (`FunctionsAdded{sequence}` → the server's installs →
//! `Covered{sequence}`). So calls made right after `dlopen` returns are traced.
//!
//! No wait when no session is open, from the agent's own threads, inside a dispatch
//! (a callback calling `dlopen`), or for a nested `dlopen` (a constructor of the
//! loaded object calling it: the loader lock is held then, and the agent thread's
//! discovery takes it). The periodic poll of the load counters stays the fallback.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};

use crate::control::{link, loads, sites, threads};
use crate::hot::block;
use crate::sys;

thread_local! {
    /// Depth of interposed `dlopen`s on this thread (a constructor run by the loader
    /// may call `dlopen` again).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs the real `open` with this thread's depth raised; then, for the outermost call
/// that loaded something, waits for the tracers to cover it.
fn covered_open(open: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    let outermost = depth == 0;
    // Only the outermost call looks: `dl_iterate_phdr` takes the loader lock, which a
    // nested call's thread holds (a recursive lock: it would not block, but a nested
    // call does not wait anyway).
    let before = outermost.then(sites::load_generation);
    let handle = open();
    DEPTH.with(|d| d.set(depth));
    let Some(before) = before else {
        return handle;
    };
    if handle.is_null() || !link::connected() {
        return handle;
    }
    if threads::is_agent_thread(sys::tid()) || block::NEST.with(|n| n.get()) > 0 {
        return handle;
    }
    // Objects were added (a handle to an object already loaded adds none).
    if sites::load_generation().0 == before.0 {
        return handle;
    }
    // errno as libc's dlopen left it.
    let errno = sys::errno();
    loads::wait_covered();
    sys::set_errno(errno);
    handle
}

/// As `dlopen(3)`.
// SAFETY: exporting `dlopen` replaces libc's for the whole process: same signature and
// contract (the handle, `dlerror` and errno as libc's left them), and reaches libc's
// own through `dlsym(RTLD_NEXT)`, never itself.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    // SAFETY: forwarded as given.
    covered_open(|| unsafe { sys::dl::real_dlopen(file, mode) })
}

/// As `dlmopen(3)`.
// SAFETY: as `dlopen` above, for `dlmopen`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlmopen(
    lmid: libc::Lmid_t,
    file: *const c_char,
    mode: c_int,
) -> *mut c_void {
    // SAFETY: forwarded as given.
    covered_open(|| unsafe { sys::dl::real_dlmopen(lmid, file, mode) })
}
