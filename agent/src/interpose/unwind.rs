//! The unwinder's entry points, interposed (issue 12): before an exception or a panic
//! starts unwinding (`_Unwind_RaiseException`), or a backtrace walks the stack
//! (`_Unwind_Backtrace`), the thread's hooked frames get their real return addresses
//! back (`hot::exit::unhook_all`; counted as abandoned), so the unwinder finds every
//! frame's unwind information and the exception lands in the same handler as untraced.
//! The unwinder's own functions are reached through `dlsym(RTLD_NEXT)` (resolved at
//! agent start, [`resolve`]).
//!
//! Reach: calls that go through the dynamic linker to these symbols (libstdc++'s
//! `__cxa_throw`, Rust's `std` panics, a program calling them); glibc's `backtrace()`
//! and `pthread_exit`/cancellation reach libgcc_s through their own `dlsym` and are not
//! seen, nor is an agent injected after the program resolved them.

use std::ffi::{CStr, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

static RAISE: AtomicUsize = AtomicUsize::new(0);
static BACKTRACE: AtomicUsize = AtomicUsize::new(0);

fn next(slot: &AtomicUsize, name: &CStr) -> usize {
    let mut f = slot.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with a valid NUL-terminated name; RTLD_NEXT finds the next
        // definition after this object (libgcc_s's), never the agent's own.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        slot.store(f, Ordering::Release);
    }
    f
}

/// Resolves the unwinder's functions now (agent start): the interposed calls then never
/// call `dlsym`.
pub(crate) fn resolve() {
    next(&RAISE, c"_Unwind_RaiseException");
    next(&BACKTRACE, c"_Unwind_Backtrace");
}

/// The caller's stack pointer, near enough: the address of a local of this frame lies
/// below every frame of its callers.
#[inline(always)]
fn here() -> u64 {
    let x = 0u8;
    std::hint::black_box(&x) as *const u8 as u64
}

type RaiseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type BacktraceFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;

/// `_URC_FATAL_PHASE1_ERROR`: what the unwinder answers when it cannot work.
const URC_FATAL_PHASE1_ERROR: c_int = 3;

// SAFETY (no_mangle): the unwinder's exported name and ABI; it calls the next
// definition (libgcc_s's), never itself.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _Unwind_RaiseException(exception: *mut c_void) -> c_int {
    crate::hot::exit::unhook_all(here());
    let f = next(&RAISE, c"_Unwind_RaiseException");
    if f == 0 {
        return URC_FATAL_PHASE1_ERROR;
    }
    // SAFETY: libgcc_s's `_Unwind_RaiseException`, with the caller's argument.
    unsafe { std::mem::transmute::<usize, RaiseFn>(f)(exception) }
}

// SAFETY (no_mangle): as above.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _Unwind_Backtrace(trace: *mut c_void, arg: *mut c_void) -> c_int {
    crate::hot::exit::unhook_all(here());
    let f = next(&BACKTRACE, c"_Unwind_Backtrace");
    if f == 0 {
        return URC_FATAL_PHASE1_ERROR;
    }
    // SAFETY: libgcc_s's `_Unwind_Backtrace`, with the caller's arguments.
    unsafe { std::mem::transmute::<usize, BacktraceFn>(f)(trace, arg) }
}
