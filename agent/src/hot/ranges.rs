//! Where trampoline code lives: a lock-free table of the arena's chunks, and the
//! static entry stub's address range (`dispatch.rs`). Read by the signal handlers to
//! tell whether an interrupted PC is trampoline code. Async-signal-safe; the agent
//! thread appends chunks with [`add_range`] (lock-free, never removed: chunks are never
//! unmapped).

use std::sync::atomic::{AtomicU64, Ordering};

unsafe extern "C" {
    // Labels around the static entry stubs (`dispatch.rs`'s `global_asm!`).
    static patchbay_stubs_start: u8;
    static patchbay_stubs_end: u8;
}

/// The static stub's address range. Async-signal-safe.
#[inline]
pub(crate) fn stub_range() -> (u64, u64) {
    // Taking the address of the stub's labels; never read through.
    (
        &raw const patchbay_stubs_start as u64,
        &raw const patchbay_stubs_end as u64,
    )
}

/// Lock-free table of trampoline address ranges, for the signal handler.
const RANGES: usize = 1024;
static RANGE_START: [AtomicU64; RANGES] = [const { AtomicU64::new(0) }; RANGES];
static RANGE_END: [AtomicU64; RANGES] = [const { AtomicU64::new(0) }; RANGES];

/// Records a region of trampoline memory (never removed: regions are never unmapped).
/// Agent thread (lock-free).
pub(crate) fn add_range(start: u64, end: u64) -> bool {
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
pub(crate) fn in_trampoline(pc: u64) -> bool {
    let (s, e) = stub_range();
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
