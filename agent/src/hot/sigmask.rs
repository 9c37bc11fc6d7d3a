//! Signal masks the program sets keep SIGTRAP deliverable.
//!
//! The patcher keeps an `int3` at a site for a few serializations (single-instruction
//! sites) or a whole grace period (relocated prologues, nop sleds), and the kernel
//! kills a thread that traps with SIGTRAP blocked (`force_sig` resets it to the default
//! action). Programs block "every signal" (`sigfillset`) around critical sections, in
//! worker threads, in `ppoll`/`pselect`/`epoll_pwait`/`sigsuspend` waits and in
//! `ucontext` masks, and then call functions the patcher may be installing on.
//!
//! So the mask-setting functions are interposed and pass the program's mask on
//! without SIGTRAP: `pthread_sigmask`, `sigprocmask`, `sigsuspend`, `ppoll`, `pselect`,
//! `epoll_pwait`, `epoll_pwait2`, `setcontext`, `swapcontext` (program handlers'
//! `sa_mask` lose it in `hot::sigwrap`). The program's view is kept per thread
//! ([`view`]: whether it believes SIGTRAP blocked); queries of the mask through
//! `pthread_sigmask`/`sigprocmask` report it, so a program sees the mask it set. A
//! thread started by the interposed `pthread_create` inherits its creator's view (and
//! a SIGTRAP blocked by `pthread_attr_setsigmask_np` is unblocked and recorded there);
//! the thread running the agent's start (a process spawned with SIGTRAP blocked)
//! likewise. A SIGTRAP the program sends itself while it believes it blocked is
//! delivered (to its handler, chained behind the agent's, or the default action)
//! instead of staying pending; `/proc/self/status` shows the kernel's mask; a
//! `ucontext`'s `uc_sigmask` is edited in place (SIGTRAP removed) when passed to
//! `setcontext`/`swapcontext`. Raw `rt_sigprocmask` system calls, and the deprecated
//! `sigblock`/`sigsetmask`/`sighold`, are not seen (README, "Bounds").
//!
//! `pthread_sigmask` and `sigprocmask` are the `rt_sigprocmask` system call here (with
//! glibc's filtering of its two internal signals, 32 and 33); the others call libc's
//! with a copy of the mask. Everything here is async-signal-safe (the masks are copied
//! on the stack, the view is a thread-local `Cell` with no destructor; libc's functions
//! are resolved at agent start, [`resolve`]).

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::AtomicUsize;

use crate::sys;

thread_local! {
    /// Whether the program believes this thread blocks SIGTRAP.
    static VIEW: Cell<bool> = const { Cell::new(false) };
}

/// glibc's internal signals (SIGCANCEL, SIGSETXID), never blocked by its
/// `pthread_sigmask`.
const INTERNAL: [c_int; 2] = [32, 33];

/// Whether the program believes the calling thread blocks SIGTRAP.
pub(crate) fn view() -> bool {
    VIEW.with(|v| v.get())
}

/// Sets the program's view of the calling thread (a signal handler's changes end
/// with it: `hot::sigwrap` puts the interrupted view back).
pub(crate) fn set_view(b: bool) {
    VIEW.with(|v| v.set(b));
}

fn raw(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    // SAFETY: rt_sigprocmask with null or valid sets of at least 8 bytes (the kernel's
    // sigset size); the kernel validates `how`.
    let rc = unsafe { libc::syscall(libc::SYS_rt_sigprocmask, how, set, old, 8usize) };
    if rc != 0 { sys::errno() } else { 0 }
}

/// Whether the calling thread's kernel mask blocks SIGTRAP.
fn kernel_blocks_sigtrap() -> bool {
    // SAFETY: a query into a valid set.
    unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        raw(libc::SIG_BLOCK, std::ptr::null(), &mut cur) == 0
            && libc::sigismember(&cur, libc::SIGTRAP) == 1
    }
}

/// Unblocks SIGTRAP in the calling thread if its kernel mask blocks it, and makes that
/// the program's view (the agent's start, a new thread). Returns whether it was
/// blocked.
pub(crate) fn adopt() -> bool {
    if !kernel_blocks_sigtrap() {
        return false;
    }
    // SAFETY: building a one-signal set on the stack.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGTRAP);
        raw(libc::SIG_UNBLOCK, &s, std::ptr::null_mut());
    }
    set_view(true);
    true
}

/// A copy of `*set` without SIGTRAP (and, with `internal`, without glibc's internal
/// signals).
///
/// # Safety
/// `set` is valid.
unsafe fn stripped(set: *const libc::sigset_t, internal: bool) -> libc::sigset_t {
    // SAFETY: valid (caller); editing a copy on the stack.
    unsafe {
        let mut s = *set;
        libc::sigdelset(&mut s, libc::SIGTRAP);
        if internal {
            for sig in INTERNAL {
                libc::sigdelset(&mut s, sig);
            }
        }
        s
    }
}

/// `pthread_sigmask` without SIGTRAP (see the module documentation); returns 0 or an
/// errno value.
///
/// # Safety
/// `set` and `old` are null or valid.
unsafe fn set_mask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    let was = view();
    let (copy, wants) = if set.is_null() {
        (None, false)
    } else {
        // SAFETY: valid (caller).
        unsafe {
            let wants = libc::sigismember(set, libc::SIGTRAP) == 1;
            let mut copy = stripped(set, true);
            // Unblocking SIGTRAP is always allowed through: it may really be blocked
            // (a raw rt_sigprocmask, an inherited mask), and it must become deliverable.
            if how == libc::SIG_UNBLOCK && wants {
                libc::sigaddset(&mut copy, libc::SIGTRAP);
            }
            (Some(copy), wants)
        }
    };
    let p = copy.as_ref().map_or(std::ptr::null(), |s| s as *const _);
    let rc = raw(how, p, old);
    if rc != 0 {
        return rc;
    }
    if !old.is_null() {
        // SAFETY: valid (caller), just written by the kernel.
        unsafe {
            if was {
                libc::sigaddset(old, libc::SIGTRAP);
            } else {
                libc::sigdelset(old, libc::SIGTRAP);
            }
        }
    }
    if copy.is_some() {
        match how {
            libc::SIG_BLOCK if wants => set_view(true),
            libc::SIG_UNBLOCK if wants => set_view(false),
            libc::SIG_SETMASK => set_view(wants),
            _ => {}
        }
    }
    0
}

/// `pthread_sigmask(3)`, interposed (see the module documentation).
///
/// # Safety
/// As `pthread_sigmask(3)`.
// SAFETY: exporting `pthread_sigmask` replaces libc's for the whole process: same
// signature, return value and effect on every signal but SIGTRAP, which stays
// deliverable while the program sees it as it set it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: forwarded as given.
    unsafe { set_mask(how, set, old) }
}

/// `sigprocmask(2)`, interposed (see the module documentation).
///
/// # Safety
/// As `sigprocmask(2)`.
// SAFETY: exporting `sigprocmask` replaces libc's: as `pthread_sigmask` above, with
// sigprocmask's -1/errno convention.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: forwarded as given.
    match unsafe { set_mask(how, set, old) } {
        0 => 0,
        e => {
            sys::set_errno(e);
            -1
        }
    }
}

static SIGSUSPEND: AtomicUsize = AtomicUsize::new(0);
static PPOLL: AtomicUsize = AtomicUsize::new(0);
static PSELECT: AtomicUsize = AtomicUsize::new(0);
static EPOLL_PWAIT: AtomicUsize = AtomicUsize::new(0);
static EPOLL_PWAIT2: AtomicUsize = AtomicUsize::new(0);
static SETCONTEXT: AtomicUsize = AtomicUsize::new(0);
static SWAPCONTEXT: AtomicUsize = AtomicUsize::new(0);

/// Resolves libc's functions wrapped here (at agent start: a `dlsym` in a signal
/// handler would not be async-signal-safe).
pub(crate) fn resolve() {
    sys::dl::next(&SIGSUSPEND, c"sigsuspend");
    sys::dl::next(&PPOLL, c"ppoll");
    sys::dl::next(&PSELECT, c"pselect");
    sys::dl::next(&EPOLL_PWAIT, c"epoll_pwait");
    sys::dl::next(&EPOLL_PWAIT2, c"epoll_pwait2");
    sys::dl::next(&SETCONTEXT, c"setcontext");
    sys::dl::next(&SWAPCONTEXT, c"swapcontext");
}

/// libc's function in `slot` (resolved now if [`resolve`] has not run), or `None`
/// (errno ENOSYS) when libc has none.
fn real(slot: &AtomicUsize, name: &std::ffi::CStr) -> Option<usize> {
    match sys::dl::next(slot, name) {
        0 => {
            sys::set_errno(libc::ENOSYS);
            None
        }
        f => Some(f),
    }
}

/// A pointer to a SIGTRAP-less copy of `*set` kept in `buf` (null stays null).
///
/// # Safety
/// `set` is null or valid.
unsafe fn strip_into(
    set: *const libc::sigset_t,
    buf: &mut libc::sigset_t,
) -> *const libc::sigset_t {
    if set.is_null() {
        return set;
    }
    // SAFETY: valid (caller).
    *buf = unsafe { stripped(set, false) };
    buf
}

/// `sigsuspend(2)`, interposed: waits with the program's mask minus SIGTRAP.
///
/// # Safety
/// As `sigsuspend(2)`.
// SAFETY: exporting `sigsuspend` replaces libc's: same signature and contract, libc's
// own called with a copy of the mask without SIGTRAP.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigsuspend(set: *const libc::sigset_t) -> c_int {
    let Some(f) = real(&SIGSUSPEND, c"sigsuspend") else {
        return -1;
    };
    // SAFETY: zeroed bytes are a valid sigset_t.
    let mut buf: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as given; `f` is libc's sigsuspend.
    unsafe {
        let p = strip_into(set, &mut buf);
        std::mem::transmute::<usize, unsafe extern "C" fn(*const libc::sigset_t) -> c_int>(f)(p)
    }
}

/// `ppoll(2)`, interposed: waits with the program's mask minus SIGTRAP.
///
/// # Safety
/// As `ppoll(2)`.
// SAFETY: exporting `ppoll` replaces libc's: same signature and contract, libc's own
// called with a copy of the mask without SIGTRAP.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const libc::timespec,
    set: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        *mut libc::pollfd,
        libc::nfds_t,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    let Some(f) = real(&PPOLL, c"ppoll") else {
        return -1;
    };
    // SAFETY: zeroed bytes are a valid sigset_t.
    let mut buf: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as given; `f` is libc's ppoll.
    unsafe {
        let p = strip_into(set, &mut buf);
        std::mem::transmute::<usize, F>(f)(fds, n, tmo, p)
    }
}

/// `pselect(2)`, interposed: waits with the program's mask minus SIGTRAP.
///
/// # Safety
/// As `pselect(2)`.
// SAFETY: exporting `pselect` replaces libc's: same signature and contract, libc's
// own called with a copy of the mask without SIGTRAP.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tmo: *const libc::timespec,
    set: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *mut libc::fd_set,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    let Some(f) = real(&PSELECT, c"pselect") else {
        return -1;
    };
    // SAFETY: zeroed bytes are a valid sigset_t.
    let mut buf: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as given; `f` is libc's pselect.
    unsafe {
        let p = strip_into(set, &mut buf);
        std::mem::transmute::<usize, F>(f)(nfds, r, w, e, tmo, p)
    }
}

/// `epoll_pwait(2)`, interposed: waits with the program's mask minus SIGTRAP.
///
/// # Safety
/// As `epoll_pwait(2)`.
// SAFETY: exporting `epoll_pwait` replaces libc's: same signature and contract,
// libc's own called with a copy of the mask without SIGTRAP.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    set: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        c_int,
        *const libc::sigset_t,
    ) -> c_int;
    let Some(f) = real(&EPOLL_PWAIT, c"epoll_pwait") else {
        return -1;
    };
    // SAFETY: zeroed bytes are a valid sigset_t.
    let mut buf: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as given; `f` is libc's epoll_pwait.
    unsafe {
        let p = strip_into(set, &mut buf);
        std::mem::transmute::<usize, F>(f)(epfd, events, max, timeout, p)
    }
}

/// `epoll_pwait2(2)`, interposed: waits with the program's mask minus SIGTRAP.
///
/// # Safety
/// As `epoll_pwait2(2)`.
// SAFETY: exporting `epoll_pwait2` replaces libc's: same signature and contract,
// libc's own called with a copy of the mask without SIGTRAP.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    tmo: *const libc::timespec,
    set: *const libc::sigset_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut libc::epoll_event,
        c_int,
        *const libc::timespec,
        *const libc::sigset_t,
    ) -> c_int;
    let Some(f) = real(&EPOLL_PWAIT2, c"epoll_pwait2") else {
        return -1;
    };
    // SAFETY: zeroed bytes are a valid sigset_t.
    let mut buf: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as given; `f` is libc's epoll_pwait2.
    unsafe {
        let p = strip_into(set, &mut buf);
        std::mem::transmute::<usize, F>(f)(epfd, events, max, tmo, p)
    }
}

/// Removes SIGTRAP from a `ucontext`'s mask, in place.
///
/// # Safety
/// `uc` is null or a valid context.
unsafe fn strip_context(uc: *const libc::ucontext_t) {
    if !uc.is_null() {
        // SAFETY: valid (caller); the program handed it to be switched to (the
        // documented in-place edit).
        unsafe {
            libc::sigdelset(
                &mut (*(uc as *mut libc::ucontext_t)).uc_sigmask,
                libc::SIGTRAP,
            )
        };
    }
}

/// `setcontext(3)`, interposed: the context's mask loses SIGTRAP (in place).
///
/// # Safety
/// As `setcontext(3)`.
// SAFETY: exporting `setcontext` replaces libc's: same signature and contract; libc's
// own switches to the context (this frame is left, as by libc's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setcontext(uc: *const libc::ucontext_t) -> c_int {
    let Some(f) = real(&SETCONTEXT, c"setcontext") else {
        return -1;
    };
    // SAFETY: as given; `f` is libc's setcontext.
    unsafe {
        strip_context(uc);
        std::mem::transmute::<usize, unsafe extern "C" fn(*const libc::ucontext_t) -> c_int>(f)(uc)
    }
}

/// `swapcontext(3)`, interposed: the new context's mask loses SIGTRAP (in place).
///
/// # Safety
/// As `swapcontext(3)`.
// SAFETY: exporting `swapcontext` replaces libc's: same signature and contract; the
// saved context resumes inside this frame, which then returns like libc's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn swapcontext(
    old: *mut libc::ucontext_t,
    uc: *const libc::ucontext_t,
) -> c_int {
    type F = unsafe extern "C" fn(*mut libc::ucontext_t, *const libc::ucontext_t) -> c_int;
    let Some(f) = real(&SWAPCONTEXT, c"swapcontext") else {
        return -1;
    };
    // SAFETY: as given; `f` is libc's swapcontext.
    unsafe {
        strip_context(uc);
        std::mem::transmute::<usize, F>(f)(old, uc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_mask() -> libc::sigset_t {
        // SAFETY: a query into a valid set.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            assert_eq!(raw(libc::SIG_BLOCK, std::ptr::null(), &mut cur), 0);
            cur
        }
    }

    #[test]
    fn a_full_mask_keeps_sigtrap_deliverable_and_the_program_sees_it_blocked() {
        std::thread::spawn(|| {
            // SAFETY: valid sets on the stack.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                let mut old: libc::sigset_t = std::mem::zeroed();
                let mut seen: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                assert_eq!(pthread_sigmask(libc::SIG_SETMASK, &all, &mut old), 0);
                let k = kernel_mask();
                assert_eq!(
                    libc::sigismember(&k, libc::SIGTRAP),
                    0,
                    "kernel blocks SIGTRAP"
                );
                assert_eq!(libc::sigismember(&k, libc::SIGUSR1), 1);
                assert_eq!(libc::sigismember(&k, 32), 0, "glibc's SIGCANCEL stays open");
                assert_eq!(sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut seen), 0);
                assert_eq!(libc::sigismember(&seen, libc::SIGTRAP), 1, "view");
                assert_eq!(libc::sigismember(&old, libc::SIGTRAP), 0);
                // Unblocking SIGTRAP alone changes the view only.
                let mut t: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut t);
                libc::sigaddset(&mut t, libc::SIGTRAP);
                assert_eq!(pthread_sigmask(libc::SIG_UNBLOCK, &t, &mut seen), 0);
                assert_eq!(libc::sigismember(&seen, libc::SIGTRAP), 1, "old view");
                assert_eq!(
                    pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut seen),
                    0
                );
                assert_eq!(libc::sigismember(&seen, libc::SIGTRAP), 0);
                assert_eq!(libc::sigismember(&seen, libc::SIGUSR1), 1);
                // Restore: the view follows SIG_SETMASK.
                assert_eq!(
                    pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()),
                    0
                );
                assert!(!view());
                // Bad `how`: EINVAL, nothing changed.
                assert_eq!(
                    pthread_sigmask(99, &all, std::ptr::null_mut()),
                    libc::EINVAL
                );
                assert_eq!(sigprocmask(99, &all, std::ptr::null_mut()), -1);
                assert_eq!(sys::errno(), libc::EINVAL);
                assert!(!view());
                assert_eq!(libc::sigismember(&kernel_mask(), libc::SIGUSR1), 0);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn adopt_unblocks_an_inherited_sigtrap() {
        std::thread::spawn(|| {
            // SAFETY: valid sets on the stack.
            unsafe {
                let mut t: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut t);
                libc::sigaddset(&mut t, libc::SIGTRAP);
                assert_eq!(raw(libc::SIG_BLOCK, &t, std::ptr::null_mut()), 0);
                assert!(adopt());
                assert_eq!(libc::sigismember(&kernel_mask(), libc::SIGTRAP), 0);
                assert!(view());
                assert!(!adopt());
            }
        })
        .join()
        .unwrap();
    }
}
