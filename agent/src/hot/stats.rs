//! Process-wide counters of trampoline memory: what was installed, freed and is still
//! allocated, and how many times a thread executed poisoned (freed or never written)
//! trampoline memory. Read by programs that link the agent (the torture test's target
//! reports them) through [`snapshot`]. Updating them is a relaxed atomic add.

use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) static TRAMPOLINES_INSTALLED: AtomicU64 = AtomicU64::new(0);
pub(crate) static TRAMPOLINES_FREED: AtomicU64 = AtomicU64::new(0);
pub(crate) static SLOTS_ALLOCATED: AtomicU64 = AtomicU64::new(0);
pub(crate) static SLOTS_FREED: AtomicU64 = AtomicU64::new(0);
pub(crate) static POISON_TRAPS: AtomicU64 = AtomicU64::new(0);
pub(crate) static SLED_EXITS: AtomicU64 = AtomicU64::new(0);
pub(crate) static RELOC_EXITS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Trampolines installed (live at some point).
    pub trampolines_installed: u64,
    /// Trampolines freed after the server authorized it.
    pub trampolines_freed: u64,
    /// Arena slots allocated (a trampoline has one slot per group of nearby sites).
    pub slots_allocated: u64,
    /// Arena slots poisoned and returned.
    pub slots_freed: u64,
    /// `int3` traps taken in trampoline memory: a thread executed a freed (poisoned)
    /// slot. Always 0 in a correct run; the trap handler kills the process after
    /// counting one (see `trap.rs`), so a survivor only ever reads 0.
    pub poison_traps: u64,
    /// Threads the quiescent-state handler found between two nops of a sled being
    /// converted and moved past it.
    pub sled_exits: u64,
    /// Threads the quiescent-state handler found inside a prologue being relocated and
    /// moved to the same point of its relocated copy.
    pub reloc_exits: u64,
}

impl Stats {
    /// Arena slots allocated and not freed.
    pub fn slots_in_use(&self) -> u64 {
        self.slots_allocated - self.slots_freed
    }
    /// Trampolines installed and not freed (live or retired).
    pub fn trampolines_allocated(&self) -> u64 {
        self.trampolines_installed - self.trampolines_freed
    }
}

/// The counters now.
pub fn snapshot() -> Stats {
    Stats {
        trampolines_installed: TRAMPOLINES_INSTALLED.load(Ordering::Relaxed),
        trampolines_freed: TRAMPOLINES_FREED.load(Ordering::Relaxed),
        slots_allocated: SLOTS_ALLOCATED.load(Ordering::Relaxed),
        slots_freed: SLOTS_FREED.load(Ordering::Relaxed),
        poison_traps: POISON_TRAPS.load(Ordering::Relaxed),
        sled_exits: SLED_EXITS.load(Ordering::Relaxed),
        reloc_exits: RELOC_EXITS.load(Ordering::Relaxed),
    }
}

/// Adds one. Async-signal-safe.
#[inline]
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
