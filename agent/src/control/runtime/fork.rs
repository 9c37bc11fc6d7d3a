//! A forked child inherits the parent's memory: its thread blocks (owned by threads
//! that do not exist here), counters and trampolines. The child is a new process with
//! one thread that counts from zero.

use std::sync::atomic::Ordering;

use crate::hot::block::{self, Header};

/// Gives the calling thread's block (if any) to it under its new tid, and returns the
/// blocks of the parent's other threads to the pool.
pub(crate) fn adopt_blocks() {
    let me = crate::sys::tid();
    let mine = block::current().map(|h| h as *const Header);
    for h in block::all() {
        if Some(h as *const Header) == mine {
            h.tid.store(me, Ordering::Release);
            h.qs_epoch.store(0, Ordering::Release);
        } else if h.tid.load(Ordering::Acquire) != 0 && !h.is_overflow() {
            h.release(std::iter::empty());
        }
    }
}

/// Zeroes counter indexes in every block (this process has counted nothing yet).
pub(crate) fn zero_counters(indexes: impl Iterator<Item = u32>) {
    for idx in indexes {
        for h in block::all() {
            h.reset_counter(idx);
        }
    }
}
