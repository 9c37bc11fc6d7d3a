//! The start gate of `patchbay run`: the program's main thread waits in the preloaded
//! library's constructor, before `main`, until the tool that launched it has attached
//! its tracers, so that not even the first call goes uncounted.
//!
//! The launcher passes the read end of a pipe (`PATCHBAY_HOLD_FD`) and a bound
//! (`PATCHBAY_HOLD_MS`, default 10 s). The constructor starts the agent (its thread
//! connects and takes the installs meanwhile), then waits until the pipe is readable:
//! the launcher closes its write end once its attach answered, failed, or the launcher
//! died. The variables are removed and the descriptor closed before `main`, so the
//! program sees neither and its own children are not held. Anything malformed (not a
//! number, not a pipe) is ignored: the program starts at once.

use std::time::Duration;

/// Default bound of the wait.
const DEFAULT_HOLD: Duration = Duration::from_secs(10);

/// The variable that makes every process of a followed tree wait before `main` until
/// the server covered it (`patchbay run`'s default): its value is the bound in
/// milliseconds. Unlike the gate's, it stays in the environment, so that descendants
/// (children, exec'd images) inherit it.
pub const FOLLOW_VAR: &str = "PATCHBAY_FOLLOW_MS";

/// How long a follower waits at most for its session to open: a server that does not
/// answer must not delay every process of the tree by the whole bound.
pub const FOLLOW_CONNECT: Duration = Duration::from_secs(1);

/// Set in a process of a followed tree: at exit, its last counts wait (bounded) for a
/// session if none is open yet (a short-lived forked child), so that they are not lost.
pub static FOLLOWING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// At exit in a process of a followed tree with no session yet: waits (at most
/// [`FOLLOW_CONNECT`]) for one, so that the final flush has somewhere to go.
pub fn exit_wait_for_session() {
    if !FOLLOWING.load(std::sync::atomic::Ordering::Acquire) {
        return;
    }
    use crate::control::link;
    let deadline = std::time::Instant::now() + FOLLOW_CONNECT;
    // Not once the link failed: a server that is gone must not delay every exit.
    while !link::connected() && !link::failed_once() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bound of a follower's wait (pure): `None` when not following. Malformed values
/// mean no wait; the bound is capped at [`DEFAULT_HOLD`].
pub fn follow_bound(value: Option<&str>) -> Option<Duration> {
    let ms: u64 = value?.trim().parse().ok()?;
    Some(Duration::from_millis(ms).min(DEFAULT_HOLD))
}

/// Before `main` in a process of a followed tree (no gate of its own): waits until the
/// server attached the tracers meant for it, so that its first call is counted. A
/// process no tracer concerns waits one round trip (the server answers at once); a
/// process with no session within [`FOLLOW_CONNECT`] goes on.
pub fn follow_wait(bound: Duration) {
    use crate::control::loads::{self, Outcome};
    match loads::wait_first_cover(bound, FOLLOW_CONNECT) {
        Outcome::Covered | Outcome::SessionEnded => {}
        Outcome::TimedOut => crate::control::log::debug(&format!(
            "not covered by the server within {bound:?}: starting the program anyway"
        )),
    }
}

/// A start gate taken from the environment.
#[derive(Debug, PartialEq, Eq)]
pub struct Gate {
    fd: i32,
    timeout: Duration,
}

/// Parses the two variables (pure).
pub fn parse(fd: Option<&str>, ms: Option<&str>) -> Option<(i32, Duration)> {
    let fd: i32 = fd?.trim().parse().ok().filter(|fd| *fd > 2)?;
    let timeout = ms
        .and_then(|m| m.trim().parse::<u64>().ok())
        .map_or(DEFAULT_HOLD, Duration::from_millis);
    Some((fd, timeout))
}

impl Gate {
    /// Takes the gate from the environment, removing its variables.
    ///
    /// # Safety
    /// Must run while no other thread of the process reads or writes the environment:
    /// the preloaded library's constructor, before the agent's own threads start.
    pub unsafe fn take_from_env() -> Option<Gate> {
        let fd = std::env::var("PATCHBAY_HOLD_FD").ok();
        let ms = std::env::var("PATCHBAY_HOLD_MS").ok();
        if fd.is_none() && ms.is_none() {
            return None;
        }
        // SAFETY: the caller guarantees no concurrent access to the environment.
        unsafe {
            std::env::remove_var("PATCHBAY_HOLD_FD");
            std::env::remove_var("PATCHBAY_HOLD_MS");
        }
        let (fd, timeout) = parse(fd.as_deref(), ms.as_deref())?;
        // SAFETY: fstat writes only the stat buffer we own.
        let is_pipe = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO
        };
        is_pipe.then_some(Gate { fd, timeout })
    }

    /// Waits until the launcher releases the program (or the bound passes), then closes
    /// the descriptor.
    pub fn wait(self) {
        let ms = i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX);
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up: a wait never ends before the bound.
            let wait = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(ms);
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, wait) };
            let interrupted = rc < 0 && crate::sys::errno() == libc::EINTR;
            if !interrupted || left.is_zero() {
                break;
            }
        }
        if std::time::Instant::now() >= deadline {
            crate::control::log::warn(&format!(
                "the launcher did not release the program within {:?}: starting it anyway",
                self.timeout
            ));
        }
        self.close();
    }

    /// Closes the descriptor without waiting.
    pub fn close(self) {
        // SAFETY: the descriptor was handed to this process for the gate only.
        unsafe { libc::close(self.fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_follow_bound() {
        assert_eq!(follow_bound(Some("250")), Some(Duration::from_millis(250)));
        assert_eq!(follow_bound(Some("99999999")), Some(DEFAULT_HOLD));
        assert_eq!(follow_bound(Some("x")), None);
        assert_eq!(follow_bound(None), None);
    }

    #[test]
    fn parses_the_variables() {
        assert_eq!(
            parse(Some("7"), Some("250")),
            Some((7, Duration::from_millis(250)))
        );
        assert_eq!(parse(Some(" 9 "), None), Some((9, DEFAULT_HOLD)));
        assert_eq!(parse(Some("9"), Some("x")), Some((9, DEFAULT_HOLD)));
        // stdin/stdout/stderr, junk and absence: no gate.
        assert_eq!(parse(Some("1"), None), None);
        assert_eq!(parse(Some("-4"), None), None);
        assert_eq!(parse(Some("fd"), None), None);
        assert_eq!(parse(None, Some("100")), None);
    }

    #[test]
    fn waits_until_the_write_end_closes_and_is_bounded() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (r, w) = (fds[0], fds[1]);
        let t = std::time::Instant::now();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: our own write end.
            unsafe { libc::close(w) };
        });
        Gate {
            fd: r,
            timeout: Duration::from_secs(10),
        }
        .wait();
        let waited = t.elapsed();
        closer.join().unwrap();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // Nobody closes: the bound ends the wait.
        // SAFETY: pipe with a valid out array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let t = std::time::Instant::now();
        Gate {
            fd: fds[0],
            timeout: Duration::from_millis(150),
        }
        .wait();
        assert!(t.elapsed() >= Duration::from_millis(150));
        // SAFETY: closing the write end of the pipe this test created.
        unsafe { libc::close(fds[1]) };
    }
}
