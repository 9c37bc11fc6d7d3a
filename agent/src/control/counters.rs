//! Counter indexes and count totals (agent thread only).
//!
//! Each (trampoline, count tracer, site) gets an index into every thread block's
//! counter array; a trace tracer gets one index per trampoline for its drops. The
//! total of an index is what exited threads left behind plus the sum over the blocks
//! of live threads. When a trampoline is freed (after its grace period, so no thread
//! can still increment its indexes) its totals are folded into per-(tracer, site)
//! totals and the indexes are zeroed and reused.
//!
//! A `latency` tracer takes a range of `exit::lat::SLOTS` consecutive indexes per
//! (trampoline, site) ([`Counters::alloc_range`]); two of them hold maxima (the longest
//! call, and the shortest one stored inverted), whose total over threads is their
//! maximum, not their sum.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use crate::hot::block::{self, COUNTERS};
use crate::hot::exit::lat;

#[derive(Debug, thiserror::Error)]
#[error("all {COUNTERS} counters are in use: detach some tracers")]
pub struct Exhausted;

#[derive(Default)]
pub struct Counters {
    free: Vec<u32>,
    next: u32,
    /// Left behind by exited threads, per live index.
    exited: HashMap<u32, u64>,
    /// Live indexes (a set: freeing the 10,000 indexes of a big trampoline must not
    /// be quadratic).
    live: BTreeSet<u32>,
    /// Bases of free latency ranges (each `lat::SLOTS` indexes).
    free_ranges: Vec<u32>,
    /// Indexes whose totals are maxima.
    maxima: BTreeSet<u32>,
}

impl Counters {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn alloc(&mut self) -> Result<u32, Exhausted> {
        let i = match self.free.pop() {
            Some(i) => i,
            None if (self.next as usize) < COUNTERS => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(Exhausted),
        };
        self.live.insert(i);
        Ok(i)
    }

    /// A range of `lat::SLOTS` consecutive indexes for one latency (tracer, site);
    /// returns its base.
    pub fn alloc_range(&mut self) -> Result<u32, Exhausted> {
        let base = match self.free_ranges.pop() {
            Some(b) => b,
            None if self.next as usize + lat::SLOTS <= COUNTERS => {
                self.next += lat::SLOTS as u32;
                self.next - lat::SLOTS as u32
            }
            None => return Err(Exhausted),
        };
        for k in 0..lat::SLOTS {
            self.live.insert(base + k as u32);
            if lat::is_max(k) {
                self.maxima.insert(base + k as u32);
            }
        }
        Ok(base)
    }

    /// Frees a range of [`Counters::alloc_range`] (no thread can write it any more);
    /// returns its final totals.
    pub fn free_range(&mut self, base: u32) -> Vec<u64> {
        let totals = (0..lat::SLOTS as u32)
            .map(|k| self.total(base + k))
            .collect();
        for k in 0..lat::SLOTS as u32 {
            let i = base + k;
            self.exited.remove(&i);
            for h in block::all() {
                h.reset_counter(i);
            }
            self.live.remove(&i);
            self.maxima.remove(&i);
        }
        self.free_ranges.push(base);
        totals
    }

    /// Current total of index `i` (a sum, or for the maxima of latency ranges the
    /// maximum).
    pub fn total(&self, i: u32) -> u64 {
        let max = self.maxima.contains(&i);
        let mut sum = self.exited.get(&i).copied().unwrap_or(0);
        for h in block::all() {
            if h.tid.load(Ordering::Acquire) != 0 {
                let v = h.counter(i);
                sum = if max { sum.max(v) } else { sum.wrapping_add(v) };
            }
        }
        sum
    }

    /// A thread exited: keep what its block counted, then return the block.
    pub fn fold_exited_block(&mut self, h: &block::Header) {
        for &i in &self.live {
            let v = h.counter(i);
            if v != 0 {
                let e = self.exited.entry(i).or_insert(0);
                *e = if self.maxima.contains(&i) {
                    (*e).max(v)
                } else {
                    *e + v
                };
            }
        }
        h.release(self.live.iter().copied());
    }

    /// Drops the totals of exited threads (a forked child counts from zero).
    pub fn forget_exited(&mut self) {
        self.exited.clear();
    }

    /// Frees index `i` (no thread can increment it any more); returns its final total.
    pub fn free(&mut self, i: u32) -> u64 {
        let total = self.total(i);
        self.exited.remove(&i);
        for h in block::all() {
            h.reset_counter(i);
        }
        if self.live.remove(&i) {
            self.free.push(i);
        }
        total
    }
}
