//! The rendezvous between a program thread that just `dlopen`ed new objects
//! (`interpose::dl`) and the agent thread, which discovers them, says
//! `FunctionsAdded{sequence}` and wakes the waiter when the server's `Covered{sequence}`
//! arrives (every install resulting from it applied: the agent applies the stream in
//! order). The waiter is bounded ([`WAIT`]) and released at once when the session ends.
//!
//! Deadlock freedom: the waiter holds none of the agent's locks (only this module's
//! mutex, released while it waits) and no loader lock (the real `dlopen` returned);
//! the agent thread never waits on program threads (a local grace period counts a
//! thread blocked in the futex of [`wait_covered`] as quiescent, like any blocked one).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a program thread waits in `dlopen` at most.
pub(crate) const WAIT: Duration = Duration::from_secs(2);

struct State {
    /// The last sequence a waiter took.
    asked: u64,
    /// The highest sequence the server said `Covered`.
    covered: u64,
    /// Bumped when a session ends: its waiters give up.
    session: u64,
}

static STATE: Mutex<State> = Mutex::new(State {
    asked: 0,
    covered: 0,
    session: 0,
});
static COVERED: Condvar = Condvar::new();

/// Wakes the agent thread: a waiter took a sequence.
pub(crate) static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a wait in `dlopen` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The tracers meant for this process cover what was loaded.
    Covered,
    /// The session ended meanwhile.
    SessionEnded,
    /// [`WAIT`] passed.
    TimedOut,
}

/// On a program thread, after a `dlopen` that loaded objects: asks the agent thread to
/// cover them and waits (at most [`WAIT`]).
pub(crate) fn wait_covered() -> Outcome {
    let mut st = state();
    st.asked += 1;
    let seq = st.asked;
    let session = st.session;
    WAKE.notify_one();
    let deadline = Instant::now() + WAIT;
    loop {
        if st.covered >= seq {
            return Outcome::Covered;
        }
        if st.session != session {
            return Outcome::SessionEnded;
        }
        let now = Instant::now();
        if now >= deadline {
            return Outcome::TimedOut;
        }
        st = COVERED
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// In the constructor of a process started under a tree tracer (`hold::follow_bound`),
/// before `main`: waits until the server covered the process (every tracer meant for
/// it installed, or none meant for it: one round trip), the session ended, no session
/// opened within `connect`, or `bound` passed. Same rendezvous as `dlopen`'s.
pub(crate) fn wait_first_cover(bound: Duration, connect: Duration) -> Outcome {
    let start = Instant::now();
    let mut st = state();
    st.asked += 1;
    let seq = st.asked;
    let session = st.session;
    WAKE.notify_one();
    let deadline = start + bound;
    loop {
        if st.covered >= seq {
            return Outcome::Covered;
        }
        if st.session != session {
            return Outcome::SessionEnded;
        }
        let now = Instant::now();
        let link_down = !crate::control::link::connected()
            && (now >= start + connect || crate::control::link::failed_once());
        if now >= deadline || link_down {
            return Outcome::TimedOut;
        }
        // Short slices while no session is open: the link does not signal connecting.
        let slice = if crate::control::link::connected() {
            deadline - now
        } else {
            (deadline - now).min(Duration::from_millis(5))
        };
        st = COVERED
            .wait_timeout(st, slice)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// On the agent thread, before discovering: the last sequence taken (every waiter up to
/// it loaded its objects before).
pub(crate) fn asked() -> u64 {
    state().asked
}

/// On the agent thread: the server covered up to `sequence`.
pub(crate) fn covered(sequence: u64) {
    let mut st = state();
    st.covered = st.covered.max(sequence);
    drop(st);
    COVERED.notify_all();
}

/// On the agent thread: the session ended; its waiters are released.
pub(crate) fn session_ended() {
    let mut st = state();
    st.session += 1;
    drop(st);
    COVERED.notify_all();
}

thread_local! {
    /// The state's lock, held by the forking thread across `fork` (so that a child
    /// never inherits it locked by a thread it does not have).
    static HELD: std::cell::RefCell<Option<MutexGuard<'static, State>>> =
        const { std::cell::RefCell::new(None) };
}

/// Before `fork` (after the runtime's fork lock: the agent thread takes them in that
/// order too).
pub(crate) fn before_fork() {
    let g = state();
    HELD.with(|h| *h.borrow_mut() = Some(g));
}

/// After `fork`, in the parent and in the child (on the forking thread).
pub(crate) fn after_fork() {
    HELD.with(|h| h.borrow_mut().take());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_released_by_their_marker_or_the_end_of_the_session() {
        // One test: the state is global.
        let t = std::thread::spawn(wait_covered);
        while asked() == 0 {
            std::thread::yield_now();
        }
        covered(asked());
        assert_eq!(t.join().unwrap(), Outcome::Covered);

        let t = std::thread::spawn(wait_covered);
        let before = asked();
        while asked() == before {
            std::thread::yield_now();
        }
        // A marker of an earlier sequence releases nobody later.
        covered(before);
        session_ended();
        assert_eq!(t.join().unwrap(), Outcome::SessionEnded);
    }
}
