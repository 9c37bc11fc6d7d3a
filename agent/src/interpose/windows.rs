//! The entry points of glibc's all-signals-blocked windows, interposed to hold the
//! trap-window gate (`control::trapwindow`, which says why): `pthread_create` (its
//! caller until libc's returns, its new thread until the start routine runs),
//! `pthread_exit` and the return of a start routine (until the thread is gone),
//! `posix_spawn`, `posix_spawnp`, `system`, `popen` (until libc's returns: the child
//! has executed or exited by then), `pthread_kill` and `pthread_sigqueue` to another
//! thread. Each waits while the patcher holds a window open (at most a grace period,
//! bounded by its timeout) and otherwise adds two atomic operations to the call.
//!
//! The start routine of a thread created here runs behind [`thread_start`], which
//! also gives the new thread its creator's view of SIGTRAP (`hot::sigmask`) and keeps
//! SIGTRAP deliverable in it if `pthread_attr_setsigmask_np` blocked it.
//! `system` holds the gate for the whole command (libc's runs the spawn inside and
//! then waits for it): the patcher waits at most `trapwindow::OPEN_WAIT` and then
//! refuses with the reason.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::AtomicUsize;

use crate::control::trapwindow;
use crate::hot::sigmask;
use crate::sys;

static PTHREAD_CREATE: AtomicUsize = AtomicUsize::new(0);
static PTHREAD_EXIT: AtomicUsize = AtomicUsize::new(0);
static POSIX_SPAWN: AtomicUsize = AtomicUsize::new(0);
static POSIX_SPAWNP: AtomicUsize = AtomicUsize::new(0);
static SYSTEM: AtomicUsize = AtomicUsize::new(0);
static POPEN: AtomicUsize = AtomicUsize::new(0);
static PTHREAD_KILL: AtomicUsize = AtomicUsize::new(0);
static PTHREAD_SIGQUEUE: AtomicUsize = AtomicUsize::new(0);

/// Resolves libc's functions wrapped here (at agent start).
pub(crate) fn resolve() {
    sys::dl::next(&PTHREAD_CREATE, c"pthread_create");
    sys::dl::next(&PTHREAD_EXIT, c"pthread_exit");
    sys::dl::next(&POSIX_SPAWN, c"posix_spawn");
    sys::dl::next(&POSIX_SPAWNP, c"posix_spawnp");
    sys::dl::next(&SYSTEM, c"system");
    sys::dl::next(&POPEN, c"popen");
    sys::dl::next(&PTHREAD_KILL, c"pthread_kill");
    sys::dl::next(&PTHREAD_SIGQUEUE, c"pthread_sigqueue");
}

type StartFn = unsafe extern "C-unwind" fn(*mut c_void) -> *mut c_void;

/// What [`thread_start`] needs (allocated by the creator, freed by the new thread).
struct Start {
    f: StartFn,
    arg: *mut c_void,
    /// The creator's view of SIGTRAP.
    view: bool,
    /// The creator entered the gate for the new thread (it leaves it).
    entered: bool,
}

/// The new thread's first code of its own (glibc restored its mask just before):
/// leaves the gate, runs the program's start routine, and enters the exit window.
/// `C-unwind`: `pthread_exit` and cancellation unwind through it (it holds nothing
/// that needs dropping across the call).
unsafe extern "C-unwind" fn thread_start(p: *mut c_void) -> *mut c_void {
    // SAFETY: `p` is the `Start` the creator leaked for this thread, taken once.
    let Start {
        f,
        arg,
        view,
        entered,
    } = *unsafe { Box::from_raw(p.cast::<Start>()) };
    if !sigmask::adopt() {
        sigmask::set_view(view);
    }
    if entered {
        trapwindow::leave(1);
    }
    // SAFETY: the program's start routine with its argument, as it asked.
    let r = unsafe { f(arg) };
    trapwindow::exiting();
    r
}

/// `pthread_create(3)`, interposed (see the module documentation).
///
/// # Safety
/// As `pthread_create(3)`.
// SAFETY: exporting `pthread_create` replaces libc's: same signature and result; libc's
// own creates the thread, which runs the program's routine with its argument behind
// `thread_start`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    f: StartFn,
    arg: *mut c_void,
) -> c_int {
    type F = unsafe extern "C" fn(
        *mut libc::pthread_t,
        *const libc::pthread_attr_t,
        StartFn,
        *mut c_void,
    ) -> c_int;
    let real = sys::dl::next(&PTHREAD_CREATE, c"pthread_create");
    if real == 0 {
        return libc::EAGAIN;
    }
    let entered = trapwindow::enter(2);
    let start = Box::into_raw(Box::new(Start {
        f,
        arg,
        view: sigmask::view(),
        entered,
    }));
    // SAFETY: `real` is libc's pthread_create; the arguments are the caller's but for
    // the routine, `thread_start` with the `Start` it takes ownership of.
    let rc =
        unsafe { std::mem::transmute::<usize, F>(real)(thread, attr, thread_start, start.cast()) };
    if rc != 0 {
        // SAFETY: no thread was created: the `Start` is still ours.
        drop(unsafe { Box::from_raw(start) });
    }
    if entered {
        trapwindow::leave(if rc == 0 { 1 } else { 2 });
    }
    rc
}

/// `pthread_exit(3)`, interposed: the thread enters the exit window first.
///
/// # Safety
/// As `pthread_exit(3)`.
// SAFETY: exporting `pthread_exit` replaces libc's: same signature; libc's own ends the
// thread (unwinding through this frame, which holds nothing to drop).
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pthread_exit(r: *mut c_void) -> ! {
    type F = unsafe extern "C-unwind" fn(*mut c_void) -> !;
    trapwindow::exiting();
    let real = sys::dl::next(&PTHREAD_EXIT, c"pthread_exit");
    if real == 0 {
        // SAFETY: no libc pthread_exit: end the thread with the system call.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
        unreachable!("exit returned");
    }
    // SAFETY: `real` is libc's pthread_exit.
    unsafe { std::mem::transmute::<usize, F>(real)(r) }
}

/// Runs `call` inside the gate.
fn gated<R>(call: impl FnOnce() -> R) -> R {
    let entered = trapwindow::enter(1);
    let r = call();
    if entered {
        trapwindow::leave(1);
    }
    r
}

type SpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut c_char,
    *const *mut c_char,
) -> c_int;

/// `posix_spawn(3)`, interposed (gated).
///
/// # Safety
/// As `posix_spawn(3)`.
// SAFETY: exporting `posix_spawn` replaces libc's: same signature and result, libc's
// own called with the same arguments inside the gate.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    match sys::dl::next(&POSIX_SPAWN, c"posix_spawn") {
        0 => libc::ENOSYS,
        // SAFETY: `f` is libc's posix_spawn; forwarded as given.
        f => gated(|| unsafe {
            std::mem::transmute::<usize, SpawnFn>(f)(pid, path, fa, attr, argv, envp)
        }),
    }
}

/// `posix_spawnp(3)`, interposed (gated).
///
/// # Safety
/// As `posix_spawnp(3)`.
// SAFETY: exporting `posix_spawnp` replaces libc's: same signature and result, libc's
// own called with the same arguments inside the gate.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    match sys::dl::next(&POSIX_SPAWNP, c"posix_spawnp") {
        0 => libc::ENOSYS,
        // SAFETY: `f` is libc's posix_spawnp; forwarded as given.
        f => gated(|| unsafe {
            std::mem::transmute::<usize, SpawnFn>(f)(pid, file, fa, attr, argv, envp)
        }),
    }
}

/// `system(3)`, interposed (gated for the whole command).
///
/// # Safety
/// As `system(3)`.
// SAFETY: exporting `system` replaces libc's: same signature and result, libc's own
// called with the same argument inside the gate.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn system(cmd: *const c_char) -> c_int {
    type F = unsafe extern "C" fn(*const c_char) -> c_int;
    match sys::dl::next(&SYSTEM, c"system") {
        0 => -1,
        // SAFETY: `f` is libc's system; forwarded as given.
        f => gated(|| unsafe { std::mem::transmute::<usize, F>(f)(cmd) }),
    }
}

/// `popen(3)`, interposed (gated).
///
/// # Safety
/// As `popen(3)`.
// SAFETY: exporting `popen` replaces libc's: same signature and result, libc's own
// called with the same arguments inside the gate.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn popen(cmd: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    type F = unsafe extern "C" fn(*const c_char, *const c_char) -> *mut libc::FILE;
    match sys::dl::next(&POPEN, c"popen") {
        0 => std::ptr::null_mut(),
        // SAFETY: `f` is libc's popen; forwarded as given.
        f => gated(|| unsafe { std::mem::transmute::<usize, F>(f)(cmd, mode) }),
    }
}

/// `pthread_kill(3)`, interposed (gated when the target is another thread).
///
/// # Safety
/// As `pthread_kill(3)`.
// SAFETY: exporting `pthread_kill` replaces libc's: same signature and result, libc's
// own called with the same arguments (inside the gate for another thread).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_kill(t: libc::pthread_t, sig: c_int) -> c_int {
    type F = unsafe extern "C" fn(libc::pthread_t, c_int) -> c_int;
    let f = match sys::dl::next(&PTHREAD_KILL, c"pthread_kill") {
        0 => return libc::ENOSYS,
        f => f,
    };
    // SAFETY: `f` is libc's pthread_kill; forwarded as given.
    let call = || unsafe { std::mem::transmute::<usize, F>(f)(t, sig) };
    // SAFETY: pthread_self has no preconditions.
    if t == unsafe { libc::pthread_self() } {
        call()
    } else {
        gated(call)
    }
}

/// `pthread_sigqueue(3)`, interposed (gated when the target is another thread).
///
/// # Safety
/// As `pthread_sigqueue(3)`.
// SAFETY: exporting `pthread_sigqueue` replaces libc's: same signature and result,
// libc's own called with the same arguments (inside the gate for another thread).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigqueue(
    t: libc::pthread_t,
    sig: c_int,
    value: libc::sigval,
) -> c_int {
    type F = unsafe extern "C" fn(libc::pthread_t, c_int, libc::sigval) -> c_int;
    let f = match sys::dl::next(&PTHREAD_SIGQUEUE, c"pthread_sigqueue") {
        0 => return libc::ENOSYS,
        f => f,
    };
    // SAFETY: `f` is libc's pthread_sigqueue; forwarded as given.
    let call = || unsafe { std::mem::transmute::<usize, F>(f)(t, sig, value) };
    // SAFETY: pthread_self has no preconditions.
    if t == unsafe { libc::pthread_self() } {
        call()
    } else {
        gated(call)
    }
}
