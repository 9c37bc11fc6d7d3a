//! Event-driven grace periods, the program threads' side: the stamp that completes
//! what the agent thread waits for wakes it (an `eventfd` write), and what the
//! quiescent-state handler saw is logged with a monotonic timestamp for the grace-period
//! timeline (`control::timeline`).
//!
//! Async-signal-safe throughout (atomics, `clock_gettime` through the vDSO, and one
//! `write` to the agent's `eventfd`, errno preserved), except the agent-thread entry
//! points [`set_wake_fd`], [`arm`] and [`drain_log`], which say so.
//!
//! The wake is a hint, never evidence: the agent thread decides from the stamps in the
//! blocks alone; a lost or spurious wake only changes *when* it looks (its periodic tick
//! stays as the fallback).

use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};

/// The agent's `eventfd` (-1: none; the agent thread then ticks only).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The epoch the agent thread waits for (0: none) ...
static WAIT_EPOCH: AtomicU64 = AtomicU64::new(0);
/// ... and how many of its holdouts it has not yet seen stamped at that epoch.
static WAIT_LEFT: AtomicI64 = AtomicI64::new(0);
/// Bumped when the handler found a thread inside trampoline code (no stamp): the agent
/// thread signals such a thread again at once instead of after its rate limit.
pub(crate) static RETRY: AtomicU64 = AtomicU64::new(0);
/// Wakes written (for tests and the timeline's counters).
pub(crate) static WAKES: AtomicU64 = AtomicU64::new(0);

/// What the handler saw, as logged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Seen {
    /// Outside every trampoline and dispatch: stamped.
    Stamped = 1,
    /// Inside a dispatch: the outermost dispatch stamps on its way out.
    Deferred = 2,
    /// In trampoline code: not stamped, the agent signals again.
    Inside = 3,
    /// A deferred stamp taken when the outermost dispatch left.
    DeferredStamped = 4,
}

impl Seen {
    fn from_u8(v: u8) -> Option<Seen> {
        match v {
            1 => Some(Seen::Stamped),
            2 => Some(Seen::Deferred),
            3 => Some(Seen::Inside),
            4 => Some(Seen::DeferredStamped),
            _ => None,
        }
    }
}

/// Entries of the handler log (a power of two).
const LOG_LEN: usize = 1024;
/// Slot reservations so far.
static LOG_HEAD: AtomicU64 = AtomicU64::new(0);
/// Per slot: `[meta, ns]`; `meta` = `(index + 1) << 40 | kind << 32 | tid`, written
/// last (and cleared first), so a reader checks that a slot holds the entry it expects.
static LOG: [[AtomicU64; 2]; LOG_LEN] = [const { [AtomicU64::new(0), AtomicU64::new(0)] }; LOG_LEN];

/// CLOCK_MONOTONIC in nanoseconds (the vDSO: no system call). Async-signal-safe.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Logs what the handler (or the deferred stamp) saw on thread `tid`. Async-signal-safe.
pub(crate) fn log(tid: u32, seen: Seen) {
    let ns = now_ns();
    let idx = LOG_HEAD.fetch_add(1, Ordering::AcqRel);
    let slot = &LOG[(idx as usize) & (LOG_LEN - 1)];
    slot[0].store(0, Ordering::Release);
    slot[1].store(ns, Ordering::Release);
    let meta = ((idx + 1) & 0xFF_FFFF) << 40 | (seen as u64) << 32 | u64::from(tid);
    slot[0].store(meta, Ordering::Release);
}

/// Reads the handler log from position `from` on (agent thread). Returns the entries
/// still readable, `(ns, tid, seen)`, and the position to read from next. Entries
/// overwritten before they were read are skipped.
pub(crate) fn drain_log(from: u64) -> (Vec<(u64, u32, Seen)>, u64) {
    let head = LOG_HEAD.load(Ordering::Acquire);
    let start = from.max(head.saturating_sub(LOG_LEN as u64));
    let mut out = Vec::new();
    for idx in start..head {
        let slot = &LOG[(idx as usize) & (LOG_LEN - 1)];
        let m1 = slot[0].load(Ordering::Acquire);
        let ns = slot[1].load(Ordering::Acquire);
        let m2 = slot[0].load(Ordering::Acquire);
        if m1 != m2 || m1 >> 40 != (idx + 1) & 0xFF_FFFF {
            // Not written yet, or overwritten meanwhile.
            continue;
        }
        if let Some(seen) = Seen::from_u8((m1 >> 32) as u8) {
            out.push((ns, m1 as u32, seen));
        }
    }
    (out, head)
}

/// Registers the agent thread's `eventfd` (agent thread; -1: none; never closed while
/// registered). Returns the one it replaces.
pub(crate) fn set_wake_fd(fd: i32) -> i32 {
    WAKE_FD.swap(fd, Ordering::AcqRel)
}

/// The agent thread waits for `left` threads to be stamped at epoch `need` (0: waits
/// for nothing). Agent thread.
pub(crate) fn arm(need: u64, left: i64) {
    WAIT_EPOCH.store(0, Ordering::Release);
    WAIT_LEFT.store(left, Ordering::Release);
    WAIT_EPOCH.store(need, Ordering::Release);
}

/// A thread's stamp went from `old` to `new`: if that completes what the agent thread
/// waits for, wake it. Async-signal-safe.
#[inline]
pub(crate) fn stamped(old: u64, new: u64) {
    if completes(&WAIT_EPOCH, &WAIT_LEFT, old, new) {
        wake();
    }
}

/// Whether a stamp from `old` to `new` is the last one awaited (`need`, `left`): counts
/// it down if it is awaited at all. Async-signal-safe.
#[inline]
fn completes(need: &AtomicU64, left: &AtomicI64, old: u64, new: u64) -> bool {
    let need = need.load(Ordering::Acquire);
    need != 0 && old < need && new >= need && left.fetch_sub(1, Ordering::AcqRel) == 1
}

/// The handler found a thread in trampoline code: have the agent look again at once.
/// Async-signal-safe.
pub(crate) fn retry() {
    RETRY.fetch_add(1, Ordering::AcqRel);
    if WAIT_EPOCH.load(Ordering::Acquire) != 0 {
        wake();
    }
}

/// Writes to the agent's `eventfd`, errno preserved. Async-signal-safe.
pub(crate) fn wake() {
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let saved = crate::sys::errno();
    let one: u64 = 1;
    // SAFETY: write(2) of 8 bytes from a local to an eventfd; async-signal-safe. A
    // failure (EAGAIN: the counter is saturated, i.e. the agent has a wake pending;
    // EBADF in a race with a replaced fd) loses nothing that matters: wakes are hints.
    unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    crate::sys::set_errno(saved);
    WAKES.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_returns_what_was_written_in_order() {
        let (_, from) = drain_log(0);
        log(7, Seen::Stamped);
        log(8, Seen::Inside);
        let (got, next) = drain_log(from);
        let mine: Vec<(u32, Seen)> = got
            .iter()
            .map(|&(_, t, s)| (t, s))
            .filter(|(t, _)| *t == 7 || *t == 8)
            .collect();
        assert_eq!(mine, vec![(7, Seen::Stamped), (8, Seen::Inside)]);
        assert!(got.windows(2).all(|w| w[0].0 <= w[1].0 || w[0].1 != 7));
        assert!(next >= from + 2);
    }

    #[test]
    fn only_the_last_awaited_stamp_completes() {
        let (need, left) = (AtomicU64::new(5), AtomicI64::new(2));
        assert!(!completes(&need, &left, 4, 5), "one of two");
        assert!(
            !completes(&need, &left, 5, 6),
            "already at the epoch: not counted"
        );
        assert!(
            !completes(&need, &left, 3, 4),
            "below the epoch: not counted"
        );
        assert!(completes(&need, &left, 1, 7), "the last one");
        assert!(
            !completes(&need, &left, 1, 7),
            "a spurious extra one wakes nobody"
        );
        let none = AtomicU64::new(0);
        assert!(
            !completes(&none, &AtomicI64::new(1), 0, 9),
            "nothing awaited"
        );
    }

    #[test]
    fn a_wake_writes_the_eventfd() {
        // SAFETY: eventfd has no preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        let old = set_wake_fd(fd);
        crate::sys::set_errno(1234);
        wake();
        assert_eq!(crate::sys::errno(), 1234, "errno preserved");
        set_wake_fd(old);
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a local from our eventfd.
        let r = unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
        assert_eq!(r, 8);
        assert!(v >= 1);
        // Never closed: a handler of another test may have loaded its number (the
        // same rule as the agent's own eventfd).
    }
}
