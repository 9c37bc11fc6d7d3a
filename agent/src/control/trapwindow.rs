//! Trap windows: the patcher's `int3`s never meet code that glibc runs with every
//! signal blocked.
//!
//! While a batch of the patcher holds an `int3` at a site (a few serializations for a
//! single-instruction site, a whole grace period for a relocated prologue or a nop
//! sled), a thread that reaches the site with SIGTRAP blocked is killed by the kernel
//! (`force_sig` resets a blocked SIGTRAP to its default action). Masks the program sets
//! itself keep SIGTRAP deliverable (`hot::sigmask`), but glibc blocks every signal with
//! raw system calls in a few places and runs ordinary, patchable functions meanwhile
//! (reached through hidden aliases: the same code as the exported functions):
//!
//! - `pthread_create`: the creating thread from before `clone` until after it, and the
//!   new thread from its first instruction until it restores its mask, just before the
//!   start routine (`clone`, `__ctype_init`, `_setjmp`, …);
//! - a thread's exit, after its start routine returned or it called `pthread_exit`
//!   (`madvise`, `munmap`, `free`, the exit lock's `__lll_lock_wait_private`, …);
//! - `posix_spawn`/`posix_spawnp` (and `system`/`popen`, built on them): the child
//!   shares the parent's memory until it executes, runs with every signal blocked and
//!   with its signal handlers reset to the default (so the agent's trap handler is not
//!   there either) and calls `sigaction`, `close`, `dup2`, `open`, `chdir`, `execve`, …;
//! - `pthread_kill`/`pthread_sigqueue` to another thread (`getpid`, the exit lock).
//!
//! The interposed entry points of those windows (`interpose::windows`) hold a gate
//! around them: [`enter`]/[`leave`] count calls in flight, [`exiting`] records the tid
//! of a thread from the end of its start routine until the kernel no longer knows it.
//! The patcher opens a window ([`open`]) before writing any `int3`: it marks the window
//! open, waits (bounded) until nothing is in flight and every exiting thread is gone,
//! and closes the window when the batch is done; a call reaching the gate while a
//! window is open waits (a futex wait: the thread counts as quiescent for the grace
//! period the window may hold) until it closes. The two sides use sequentially
//! consistent operations in opposite orders (flag then count, count then flag), so at
//! least one of them sees the other.
//!
//! The thread holding a window passes the gate (it is the patcher, which starts no
//! such window while it patches). Not covered (README, "Bounds"): threads created
//! before the agent started (an injected agent) exit without the gate; threads that
//! glibc creates for itself (`timer_create`'s `SIGEV_THREAD` helper, `aio`, `mq_notify`)
//! run with every signal blocked for good: the patcher refuses while they exist
//! ([`PatchError::SigtrapBlocked`](super::patch::PatchError::SigtrapBlocked)); a raw
//! `rt_sigprocmask` system call of the program.
//!
//! Everything a program thread runs here ([`enter`], [`leave`], [`exiting`]) is
//! async-signal-safe: atomics and futex calls.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::sys;

/// 1 while a window is open (the futex word waiters sleep on).
static OPEN: AtomicU32 = AtomicU32::new(0);
/// Gate holders in flight (a `pthread_create` counts 2: its caller and its new thread).
static IN_FLIGHT: AtomicU32 = AtomicU32::new(0);
/// The tid of the thread holding the window (0: none).
static HOLDER: AtomicU32 = AtomicU32::new(0);
/// Tids of threads past the end of their start routine, until they are gone.
static EXITING: [AtomicU32; 128] = [const { AtomicU32::new(0) }; 128];

/// The longest [`open`] waits for calls in flight to leave.
pub(crate) const OPEN_WAIT: Duration = Duration::from_secs(2);

fn futex_wait(word: &AtomicU32, val: u32) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 with a relative timeout; a spurious
    // or early return only makes the caller look again.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            &ts as *const libc::timespec,
        );
    }
}

fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

fn wait_closed() {
    while OPEN.load(Ordering::SeqCst) != 0 {
        futex_wait(&OPEN, 1);
    }
}

/// Whether the calling thread holds the window (and so passes the gate).
fn holding() -> bool {
    let h = HOLDER.load(Ordering::Acquire);
    h != 0 && h == sys::tid()
}

/// Enters the gate for `n` holders (waits while a window is open). Returns whether
/// it entered (false for the window's holder, which must not [`leave`]).
/// Async-signal-safe.
pub(crate) fn enter(n: u32) -> bool {
    if holding() {
        return false;
    }
    loop {
        wait_closed();
        IN_FLIGHT.fetch_add(n, Ordering::SeqCst);
        if OPEN.load(Ordering::SeqCst) == 0 {
            return true;
        }
        IN_FLIGHT.fetch_sub(n, Ordering::SeqCst);
    }
}

/// Leaves the gate for `n` holders. Async-signal-safe.
pub(crate) fn leave(n: u32) {
    IN_FLIGHT.fetch_sub(n, Ordering::SeqCst);
}

/// The calling thread is about to exit (its start routine returned, or it calls
/// `pthread_exit`): waits while a window is open, then records its tid until the
/// kernel no longer knows it. Idempotent per thread. Async-signal-safe.
pub(crate) fn exiting() {
    if holding() {
        return;
    }
    let me = sys::tid_now();
    // SAFETY: getpid has no preconditions.
    if me == unsafe { libc::getpid() } as u32 {
        // The main thread: its `pthread_exit` blocks no signals, and the kernel keeps
        // it (a zombie) until the whole process exits.
        return;
    }
    if EXITING.iter().any(|s| s.load(Ordering::SeqCst) == me) {
        return;
    }
    loop {
        wait_closed();
        let slot = EXITING.iter().find(|s| {
            s.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        let Some(slot) = slot else {
            // Every slot taken by exiting threads: let them go first.
            sweep();
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
            continue;
        };
        if OPEN.load(Ordering::SeqCst) == 0 {
            return;
        }
        slot.store(0, Ordering::SeqCst);
    }
}

/// Frees the slots of exiting threads the kernel no longer knows; returns how many
/// are still there.
fn sweep() -> usize {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut left = 0;
    for s in &EXITING {
        let t = s.load(Ordering::SeqCst);
        if t == 0 {
            continue;
        }
        // SAFETY: tgkill with signal 0 only checks that the thread exists.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, t as libc::c_int, 0) };
        if rc != 0 && sys::errno() == libc::ESRCH {
            let _ = s.compare_exchange(t, 0, Ordering::SeqCst, Ordering::SeqCst);
        } else {
            left += 1;
        }
    }
    left
}

/// What kept a window from opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Busy {
    /// Gate holders still in flight.
    pub in_flight: u32,
    /// Exiting threads still there.
    pub exiting: usize,
}

/// An open window: no gate holder is inside a glibc all-signals-blocked window until
/// it is dropped. Agent thread only.
pub(crate) struct Window(());

/// Opens a window: waits at most `wait` until no call is in flight and every exiting
/// thread is gone. Agent thread only (one window at a time: the patcher's lock).
pub(crate) fn open(wait: Duration) -> Result<Window, Busy> {
    HOLDER.store(sys::tid(), Ordering::Release);
    OPEN.store(1, Ordering::SeqCst);
    let end = Instant::now() + wait;
    let mut pause = Duration::from_micros(20);
    loop {
        let in_flight = IN_FLIGHT.load(Ordering::SeqCst);
        let exiting = if in_flight == 0 { sweep() } else { usize::MAX };
        if in_flight == 0 && exiting == 0 {
            return Ok(Window(()));
        }
        if Instant::now() >= end {
            close();
            return Err(Busy {
                in_flight,
                exiting: if exiting == usize::MAX {
                    sweep()
                } else {
                    exiting
                },
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

fn close() {
    OPEN.store(0, Ordering::SeqCst);
    HOLDER.store(0, Ordering::Release);
    futex_wake_all(&OPEN);
}

impl Drop for Window {
    fn drop(&mut self) {
        close();
    }
}

/// In a forked child: the parent's other threads (in flight, exiting, or holding a
/// window) do not exist here.
pub(crate) fn forked_child() {
    IN_FLIGHT.store(0, Ordering::SeqCst);
    for s in &EXITING {
        s.store(0, Ordering::SeqCst);
    }
    OPEN.store(0, Ordering::SeqCst);
    HOLDER.store(0, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    /// The tests share the gate's globals: one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn a_window_waits_for_calls_in_flight_and_holds_new_ones() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        assert!(enter(1));
        // In flight: the window cannot open.
        // (The test harness's own thread creations pass the gate too: at least 1.)
        let busy = open(Duration::from_millis(20)).err().expect("busy");
        assert!(busy.in_flight >= 1, "{busy:?}");
        leave(1);
        let w = open(Duration::from_secs(1)).expect("opens");
        // A call reaching the gate now waits until the window closes.
        let entered = Arc::new(AtomicBool::new(false));
        let e2 = entered.clone();
        let t = std::thread::spawn(move || {
            assert!(enter(1));
            e2.store(true, Ordering::SeqCst);
            leave(1);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "entered an open window");
        // The holder itself passes.
        assert!(!enter(1));
        drop(w);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn an_exiting_thread_holds_windows_off_until_it_is_gone() {
        let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (rec_tx, rec_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            exiting();
            rec_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        });
        rec_rx.recv().unwrap();
        let busy = open(Duration::from_millis(20)).err().expect("busy");
        assert_eq!(
            busy,
            Busy {
                in_flight: 0,
                exiting: 1
            }
        );
        go_tx.send(()).unwrap();
        t.join().unwrap();
        // Joined: the kernel may still hold the task a moment; the window opens once
        // it is gone (bounded wait).
        let w = open(Duration::from_secs(5)).expect("opens once the thread is gone");
        drop(w);
    }
}
