//! Per-thread event rings, the producer side: single producer (the thread, inside
//! traced calls), single consumer (the agent thread, `control::drain`). Fixed 80-byte records, no allocation, no locks: a full
//! ring drops the event and the caller counts the drop.
//!
//! Record (little-endian): u64 tsc, u64 site, u64 tracer, u32 tid, u32 nargs,
//! 6 x u64 args.

use std::sync::atomic::Ordering;

use super::block::{EVENT_BYTES, Header, RING_SLOTS};

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Appends an event. Returns false (and writes nothing) when the ring is full.
/// Async-signal-safe; owner thread only.
#[inline]
pub fn push(h: &Header, tracer: u64, site: u64, tid: u32, args: &[u64; 6], nargs: u32) -> bool {
    let nargs = nargs.min(6);
    let head = h.ring_head.load(Ordering::Relaxed);
    let tail = h.ring_tail.load(Ordering::Acquire);
    if head.wrapping_sub(tail) >= RING_SLOTS as u64 {
        return false;
    }
    let slot = (head % RING_SLOTS as u64) as usize;
    // SAFETY: slot < RING_SLOTS; the consumer does not read slots at or past `head`.
    unsafe {
        let p = h.ring().add(slot * EVENT_BYTES).cast::<u64>();
        p.write(rdtsc());
        p.add(1).write(site);
        p.add(2).write(tracer);
        p.add(3).write((tid as u64) | ((nargs as u64) << 32));
        // All six, a fixed-size copy: never a call to `memcpy`, whose AVX variants end
        // with `vzeroupper` and would clobber the traced function's vector arguments
        // (ymm0-7 upper halves), which the entry stub does not save.
        p.add(4).cast::<[u64; 6]>().write_unaligned(*args);
    }
    h.ring_head.store(head.wrapping_add(1), Ordering::Release);
    true
}
