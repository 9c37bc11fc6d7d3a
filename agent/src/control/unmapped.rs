//! Objects unmapped by `dlclose`: their sites must never be written again (a patch or
//! an unpatch into an unmapped range, or into another object mapped there later,
//! would fault or corrupt it).
//!
//! One lock orders the two sides: the patcher holds it around every batch
//! ([`hold`]; `Patcher::apply_observed` and `convert_sleds` take it at entry, and skip
//! the sites [`Held::gone`] names without reading them), and the interposed `dlclose`
//! (`interpose::dl`) holds it around libc's [`closing`]: no object vanishes during a
//! batch, and the spans of those that vanished are recorded before any later batch.
//! The agent thread takes them ([`drain`]) together with the discovery snapshot that
//! follows (no `dlclose` can run in between), so a span drained names only objects
//! discovered before, and an object mapped there later is discovered after it (the
//! catalogue forgets the old functions, the installer their sites, and the server is
//! told `FunctionsRemoved`).
//!
//! A `dlclose` waits for at most one batch of the patcher (a nop sled conversion with
//! its grace period, 2 s, is the longest; a thread blocked in that wait counts as
//! quiescent). A `dlclose` nested in a destructor run by an outer one does not take
//! the lock again (the outer call's comparison sees what it unmapped).

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::{Mutex, MutexGuard};

use crate::sys::dl::{Span, spans};

/// Spans of objects unmapped since the agent thread last took them.
#[derive(Default)]
pub(crate) struct Unmapped {
    spans: Vec<Span>,
}

static STATE: Mutex<Unmapped> = Mutex::new(Unmapped { spans: Vec::new() });

thread_local! {
    /// This thread is inside an interposed `dlclose` (holds the lock).
    static CLOSING: Cell<bool> = const { Cell::new(false) };
}

fn lock() -> MutexGuard<'static, Unmapped> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lock, held by the patcher around a batch.
pub(crate) struct Held(MutexGuard<'static, Unmapped>);

impl Held {
    /// Whether `site` lies in an object unmapped since the agent thread last drained:
    /// never read nor write it.
    pub(crate) fn gone(&self, site: usize) -> bool {
        let site = site as u64;
        self.0.spans.iter().any(|s| s.start <= site && site < s.end)
    }
}

/// Holds off `dlclose` (the patcher, around a batch; never from a program thread).
pub(crate) fn hold() -> Held {
    Held(lock())
}

/// On a program thread: runs `close` (libc's `dlclose`) with the patcher held off and
/// records the objects it unmapped.
pub(crate) fn closing(close: impl FnOnce() -> c_int) -> c_int {
    if CLOSING.with(Cell::get) {
        return close();
    }
    let mut st = lock();
    CLOSING.with(|c| c.set(true));
    let before = spans();
    let r = close();
    CLOSING.with(|c| c.set(false));
    let after = spans();
    st.spans
        .extend(before.into_iter().filter(|b| !after.contains(b)));
    r
}

/// On the agent thread: the spans of objects unmapped since the last call, and what
/// `then` (given them) returned, run while no `dlclose` can unmap anything (the discovery
/// snapshot).
pub(crate) fn drain<T>(then: impl FnOnce(&[Span]) -> T) -> (Vec<Span>, T) {
    let mut st = lock();
    let gone = std::mem::take(&mut st.spans);
    let r = then(&gone);
    (gone, r)
}

thread_local! {
    /// The lock, held by the forking thread across `fork` (a child never inherits it
    /// locked by a thread it does not have).
    static FORK_HELD: std::cell::RefCell<Option<MutexGuard<'static, Unmapped>>> =
        const { std::cell::RefCell::new(None) };
}

/// Before `fork` (after the runtime's fork lock, which the patcher's batches run
/// under: the same order as the agent thread).
pub(crate) fn before_fork() {
    if CLOSING.with(Cell::get) {
        // A destructor run by this thread's dlclose forks: the lock is this thread's.
        return;
    }
    let g = lock();
    FORK_HELD.with(|h| *h.borrow_mut() = Some(g));
}

/// After `fork`, in the parent and in the child (on the forking thread).
pub(crate) fn after_fork() {
    FORK_HELD.with(|h| h.borrow_mut().take());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_unmapped_by_a_close_are_gone_until_drained() {
        // A "close" that unmaps nothing records nothing.
        let r = closing(|| 0);
        assert_eq!(r, 0);
        let (gone, ()) = drain(|_| ());
        assert!(gone.is_empty(), "{gone:?}");
        // One recorded as if unmapped: the patcher skips its sites until drained.
        lock().spans.push(Span {
            bias: 0x7000_0000,
            start: 0x7000_1000,
            end: 0x7000_3000,
        });
        let held = hold();
        assert!(held.gone(0x7000_1000));
        assert!(held.gone(0x7000_2fff));
        assert!(!held.gone(0x7000_3000));
        assert!(!held.gone(0x7000_0fff));
        drop(held);
        let (gone, n) = drain(|g| g.len() + 4);
        assert_eq!((gone.len(), n), (1, 5));
        assert!(!hold().gone(0x7000_1000));
        // A nested close (a destructor's) does not take the lock again.
        let r = closing(|| closing(|| 3));
        assert_eq!(r, 3);
    }
}
