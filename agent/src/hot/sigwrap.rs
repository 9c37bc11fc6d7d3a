//! The program's own signal handlers, wrapped.
//!
//! A program signal handler that interrupts a thread inside trampoline code (a count or
//! trace stub, the generic stub, the static entry stub before it raised `NEST`, or a gcc
//! nop sled being converted) runs with that trampoline frame below it: the thread is not
//! quiescent until the handler returns *and* the thread leaves the trampoline. Without
//! help, both quiescent-state sources would be fooled by the handler: the agent's signal
//! would see the handler's PC (outside) and stamp, and the blocked-in-a-syscall probe
//! would see a handler blocked in, say, `write` (outside) and stamp. A trampoline freed
//! on such a stamp kills the program when the handler returns (integration test
//! `program_signal_handlers_interrupting_trampolines` reproduces it within a second).
//!
//! So the agent interposes `sigaction` (and the `signal` family built on it): a program
//! handler is installed behind [`wrapper`] with *every* signal in the kernel's mask, so
//! nothing can interrupt the wrapper before it has decided. The wrapper looks at the
//! interrupted PC; when it is inside trampoline code, or the thread is inside a
//! dispatch (`NEST` > 0), it raises the thread's dispatch depth (`NEST`, and `nesting`/`seq` in the thread's block, which the probe reads) for
//! the duration of the handler, so no source stamps the thread meanwhile. Then it sets
//! the mask the program asked for (the interrupted mask + its `sa_mask` + the signal
//! unless `SA_NODEFER`) plus the agent's quiescent-state signal (kept pending until the
//! handler returns, then delivered with the interrupted context's own PC; a program
//! that unblocks it inside its handler gets a deferred stamp), and calls the handler.
//! `sigreturn` restores the interrupted mask as usual.
//! Queries through `sigaction` report the program's own handler, flags and mask.
//! Handlers installed before the agent started, or later with a raw `rt_sigaction`
//! system call, are found and wrapped by [`reclaim`] (at start, every tick and before
//! each grace period).
//!
//! The quiescent-state signal stays the agent's: a program's action on it (handler,
//! flags, mask, or SIG_DFL/SIG_IGN) is only recorded, and queries return it. The agent
//! sends its own instances with `rt_tgsigqueueinfo` marked (`qs::send`: `SI_QUEUE`,
//! its pid, a 64-bit magic); [`qs_entry`] hands every other instance to the program's
//! action, run as the kernel would have run it (the same [`run_program`] as
//! [`wrapper`]; `SA_RESETHAND` emulated; SIG_IGN: nothing; SIG_DFL: the default
//! action, see [`default_action`]). One difference remains: the agent's handler has
//! `SA_RESTART`, so a system call interrupted by the program's own instance of that
//! signal is restarted even if the program's flags lack it.
//!
//! Not covered: SIGTRAP (the agent's trap handler chains to the program's), and a raw
//! `rt_sigaction` until the next [`reclaim`]. A handler that leaves by `siglongjmp` after
//! interrupting trampoline code leaves the depth raised: the thread then holds up grace
//! periods (reported as a stall) instead of risking a premature free.
//!
//! Everything here that runs in a signal handler ([`wrapper`]) is async-signal-safe; the
//! interposed functions are too (a spin lock taken with every signal blocked, which a
//! forked child takes over from a parent thread that held it).

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

use super::block;
use super::ranges::in_trampoline;
use super::{qs, sigmask, trap};
use crate::sys::signal::real_sigaction;

const NSIG: usize = 65;

/// The program's handler per signal (0: none recorded).
static HANDLER: [AtomicUsize; NSIG] = [const { AtomicUsize::new(0) }; NSIG];
/// The program's `sa_flags` and `sa_mask` (bit `s - 1` for signal `s`) per signal.
static FLAGS: [AtomicI32; NSIG] = [const { AtomicI32::new(0) }; NSIG];
static MASK: [AtomicU64; NSIG] = [const { AtomicU64::new(0) }; NSIG];
/// The interposition's lock: 0 when free, else `pid << 32 | tid` of the holder (so a
/// child forked while a parent thread held it can take it over).
static LOCK: AtomicU64 = AtomicU64::new(0);
/// Program handler runs that interrupted trampoline code or a dispatch (the torture
/// reports it).
pub static INSIDE_RUNS: AtomicU64 = AtomicU64::new(0);

type Handler3 = extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void);

/// Signals whose handlers are wrapped.
fn wrapped(sig: c_int) -> bool {
    let qs_sig = qs::signal();
    (1..NSIG as c_int).contains(&sig)
        && sig != libc::SIGKILL
        && sig != libc::SIGSTOP
        && sig != libc::SIGTRAP
        && sig != qs_sig
}

fn is_function(h: usize) -> bool {
    h != libc::SIG_DFL && h != libc::SIG_IGN && h != libc::SIG_ERR
}

struct Locked(libc::sigset_t);

fn lock() -> Locked {
    // SAFETY: blocking every signal but SIGTRAP in this thread (restored by `Drop`) so
    // that a handler calling sigaction cannot spin on a lock its own thread holds (the
    // trap handler never takes it).
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        // All but SIGTRAP: the libc functions called under the lock may be patched.
        crate::sys::signal::handler_mask(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    };
    // SAFETY: getpid and gettid have no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    let me = (pid << 32) | crate::sys::tid() as u64;
    loop {
        match LOCK.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => break,
            // Held by a thread of the parent process when it forked: that thread does
            // not exist here, so the lock is free for the child.
            Err(held)
                if held != 0
                    && held >> 32 != pid
                    && LOCK
                        .compare_exchange(held, me, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok() =>
            {
                break;
            }
            Err(_) => std::hint::spin_loop(),
        }
    }
    Locked(old)
}

impl Drop for Locked {
    fn drop(&mut self) {
        LOCK.store(0, Ordering::Release);
        // SAFETY: restoring the mask saved by `lock`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// The interposed `sigaction`. Async-signal-safe.
///
/// # Safety
/// As `sigaction(2)`.
pub unsafe fn interposed(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if sig > 0 && sig == qs::signal() {
        // SAFETY: forwarded as given.
        return unsafe { qs_interposed(sig, act, old) };
    }
    if !wrapped(sig) {
        // SAFETY: forwarded as given.
        return unsafe { real_sigaction(sig, act, old) };
    }
    let _g = lock();
    let i = sig as usize;
    // The program's view of the current action, for `old`.
    // SAFETY: querying into a valid out pointer.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: libc's sigaction with a null action and a valid out pointer only queries.
    if unsafe { real_sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
        return -1;
    }
    let was = program_view(sig, cur);
    if !act.is_null() {
        // SAFETY: the caller passes a valid action.
        let mut a = unsafe { *act };
        if is_function(a.sa_sigaction) {
            HANDLER[i].store(a.sa_sigaction, Ordering::Release);
            FLAGS[i].store(a.sa_flags, Ordering::Release);
            MASK[i].store(bits_of(&a.sa_mask), Ordering::Release);
            a.sa_sigaction = wrapper as *const () as usize;
            a.sa_flags |= libc::SA_SIGINFO;
            crate::sys::signal::handler_mask(&mut a.sa_mask);
        }
        // SAFETY: installing a valid action.
        if unsafe { real_sigaction(sig, &a, std::ptr::null_mut()) } != 0 {
            return -1;
        }
    }
    if !old.is_null() {
        // SAFETY: the caller passes a valid out pointer.
        unsafe { *old = was };
    }
    0
}

/// What the program installed, given the kernel's current action.
fn program_view(sig: c_int, mut cur: libc::sigaction) -> libc::sigaction {
    let i = sig as usize;
    if cur.sa_sigaction == wrapper as *const () as usize {
        cur.sa_sigaction = HANDLER[i].load(Ordering::Acquire);
        cur.sa_flags = FLAGS[i].load(Ordering::Acquire);
        set_bits(&mut cur.sa_mask, MASK[i].load(Ordering::Acquire));
    }
    cur
}

/// Signals 1..=64 of a set as bits (`s - 1`). Async-signal-safe.
fn bits_of(set: &libc::sigset_t) -> u64 {
    let mut b = 0u64;
    for s in 1..NSIG as c_int {
        // SAFETY: querying a valid sigset_t.
        if unsafe { libc::sigismember(set, s) } == 1 {
            b |= 1 << (s - 1);
        }
    }
    b
}

/// Makes `set` hold exactly the signals of `bits`. Async-signal-safe.
fn set_bits(set: &mut libc::sigset_t, bits: u64) {
    // SAFETY: updating a valid sigset_t.
    unsafe {
        libc::sigemptyset(set);
        for s in 1..NSIG as c_int {
            if bits & (1 << (s - 1)) != 0 {
                libc::sigaddset(set, s);
            }
        }
    }
}

/// Whether `pc` is trampoline code a thread must leave before it is quiescent (or a
/// sled being converted, or a prologue being relocated: bytes about to be replaced).
/// Async-signal-safe.
fn inside(pc: u64) -> bool {
    in_trampoline(pc)
        || trap::sled_exit(pc as usize).is_some()
        || trap::reloc_exit(pc as usize) != trap::RelocPc::Outside
}

/// The handler the kernel runs for every wrapped signal. Async-signal-safe.
extern "C" fn wrapper(sig: c_int, info: *mut libc::siginfo_t, uctx: *mut c_void) {
    let i = sig as usize;
    if i >= NSIG {
        return;
    }
    let h = HANDLER[i].load(Ordering::Acquire);
    let flags = FLAGS[i].load(Ordering::Acquire);
    let mask = MASK[i].load(Ordering::Acquire);
    run_program(sig, h, flags, mask, info, uctx);
}

/// Runs the program's handler `h` for `sig` as the kernel would have (every signal is
/// blocked on entry): the dispatch depth raised when the interrupted context is inside
/// trampoline code or a dispatch, the mask the program asked for, then the handler.
/// Async-signal-safe.
fn run_program(
    sig: c_int,
    h: usize,
    flags: c_int,
    mask: u64,
    info: *mut libc::siginfo_t,
    uctx: *mut c_void,
) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
    let uc = unsafe { &*uctx.cast::<libc::ucontext_t>() };
    let pc = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    // Inside trampoline code, or inside a dispatch (NEST > 0): between the entry stub's
    // NEST increment and the dispatcher's `nesting` increment, a thread whose handler
    // blocks in a system call would look quiescent to the probe (it reads `nesting`;
    // the dispatcher itself makes no system call there). The torture caught exactly
    // that: a dispatch resumed on a descriptor freed while its handler slept.
    let raised = (inside(pc) || block::nest_fast() > 0).then(raise);
    // Every signal is blocked so far: now the mask the program asked for, plus the
    // agent's signal (pending until the handler returns) unless it is this very signal
    // with SA_NODEFER.
    // SIGTRAP is taken out of the program's `sa_mask` (a `sigfillset` mask is common):
    // the handler may call a function whose patch holds a transient `int3`, and a trap
    // with SIGTRAP blocked kills the process (see `sys::signal::handler_mask`).
    let mut want = bits_of(&uc.uc_sigmask) | (mask & !(1 << (libc::SIGTRAP - 1)));
    let nodefer = flags & libc::SA_NODEFER != 0;
    if !nodefer {
        want |= 1 << (sig - 1);
    }
    let qs_sig = qs::signal();
    if qs_sig > 0 && !(qs_sig == sig && nodefer) {
        want |= 1 << (qs_sig - 1);
    }
    // The program's view of SIGTRAP (`hot::sigmask`): blocked in the handler if it was
    // where it interrupted or the handler's `sa_mask` has it; the interrupted view is
    // back when the handler returns (as the kernel puts the interrupted mask back).
    let interrupted_view = sigmask::view();
    let handler_view = interrupted_view || mask & (1 << (libc::SIGTRAP - 1)) != 0;
    // SAFETY: a zeroed sigset_t is filled by set_bits; setting this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        set_bits(&mut set, want);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    sigmask::set_view(handler_view);
    if is_function(h) {
        // SAFETY: `h` is the program's handler. Called with three arguments whatever
        // its kind: on x86-64 a one-argument handler ignores the other two.
        let f = unsafe { std::mem::transmute::<usize, Handler3>(h) };
        f(sig, info, uctx);
    }
    sigmask::set_view(interrupted_view);
    if let Some(b) = raised {
        lower(b);
    }
}

// ------------------------------------------------------ the quiescent-state signal

/// Installs the agent's handler for the quiescent-state signal `signal` (once); an
/// action the program had installed before is recorded as the program's.
/// Agent thread only.
pub fn install_qs_signal(signal: c_int) -> std::io::Result<()> {
    if !(1..NSIG as c_int).contains(&signal)
        || [libc::SIGKILL, libc::SIGSTOP, libc::SIGTRAP].contains(&signal)
    {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    if !qs::claim_signal(signal) {
        return Ok(());
    }
    let _g = lock();
    let mut old: libc::sigaction = unsafe_zeroed();
    // SAFETY: installing a valid action, the previous one into a valid out pointer.
    if unsafe { real_sigaction(signal, &qs_action(), &mut old) } != 0 {
        let e = std::io::Error::last_os_error();
        qs::unclaim_signal();
        return Err(e);
    }
    if old.sa_sigaction != qs_entry as *const () as usize {
        record(signal, &old);
    }
    Ok(())
}

fn unsafe_zeroed() -> libc::sigaction {
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, no flags, empty mask).
    unsafe { std::mem::zeroed() }
}

/// The agent's action on its quiescent-state signal: every signal masked while it
/// runs (no program handler may run nested in ours: it would see our handler's PC,
/// not the trampoline PC ours interrupted).
fn qs_action() -> libc::sigaction {
    let mut sa = unsafe_zeroed();
    sa.sa_sigaction = qs_entry as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    crate::sys::signal::handler_mask(&mut sa.sa_mask);
    sa
}

/// Records `a` as the program's action on `sig` (handler, flags, mask).
fn record(sig: c_int, a: &libc::sigaction) {
    let i = sig as usize;
    HANDLER[i].store(a.sa_sigaction, Ordering::Release);
    FLAGS[i].store(a.sa_flags, Ordering::Release);
    MASK[i].store(bits_of(&a.sa_mask), Ordering::Release);
}

/// The program's recorded action on `sig`.
fn recorded(sig: c_int) -> libc::sigaction {
    let i = sig as usize;
    let mut a = unsafe_zeroed();
    a.sa_sigaction = HANDLER[i].load(Ordering::Acquire);
    a.sa_flags = FLAGS[i].load(Ordering::Acquire);
    set_bits(&mut a.sa_mask, MASK[i].load(Ordering::Acquire));
    a
}

/// `sigaction` on the quiescent-state signal: the program's action is recorded (and
/// its previous one returned), the kernel's stays the agent's. Async-signal-safe.
///
/// # Safety
/// As `sigaction(2)`.
unsafe fn qs_interposed(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let _g = lock();
    let was = recorded(sig);
    if !act.is_null() {
        // SAFETY: the caller passes a valid action.
        record(sig, unsafe { &*act });
    }
    if !old.is_null() {
        // SAFETY: the caller passes a valid out pointer.
        unsafe { *old = was };
    }
    0
}

/// The kernel's handler of the quiescent-state signal: the agent's own instances (sent
/// by [`qs::send`]) go to [`qs::on_signal`]; any other is the program's and gets the
/// program's action, as the kernel would have run it. Async-signal-safe.
extern "C" fn qs_entry(sig: c_int, info: *mut libc::siginfo_t, uctx: *mut c_void) {
    // SAFETY: the kernel passes its siginfo_t to an SA_SIGINFO handler.
    if unsafe { qs::is_agents(info) } {
        qs::on_signal(uctx);
        return;
    }
    let i = sig as usize;
    let h = HANDLER[i].load(Ordering::Acquire);
    let flags = FLAGS[i].load(Ordering::Acquire);
    let mask = MASK[i].load(Ordering::Acquire);
    if h == libc::SIG_IGN {
        return;
    }
    if h == libc::SIG_DFL {
        default_action(sig);
        return;
    }
    if flags & libc::SA_RESETHAND != 0 {
        // One-shot: the program's action reverts to SIG_DFL before its handler runs.
        let _ = HANDLER[i].compare_exchange(h, libc::SIG_DFL, Ordering::AcqRel, Ordering::Relaxed);
    }
    run_program(sig, h, flags, mask, info, uctx);
}

/// The default action of `sig`, for a program whose action on the quiescent-state
/// signal is SIG_DFL: nothing for the signals the kernel ignores by default; otherwise
/// (real-time signals: terminate) as the kernel does it: the kernel's action reset to
/// SIG_DFL, the signal unblocked and raised again on this thread. If the process
/// survives that (a stop, then SIGCONT), the agent's handler is installed again.
/// Async-signal-safe.
fn default_action(sig: c_int) {
    if [libc::SIGCHLD, libc::SIGURG, libc::SIGWINCH, libc::SIGCONT].contains(&sig) {
        return;
    }
    let dfl = unsafe_zeroed();
    // SAFETY: installing SIG_DFL, unblocking `sig` on this thread and sending it to this
    // thread: the kernel then applies the default action, as it would have without us.
    unsafe {
        real_sigaction(sig, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            crate::sys::tid_now() as c_int,
            sig,
        );
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        real_sigaction(sig, &qs_action(), std::ptr::null_mut());
    }
}

/// Finds actions installed behind the interposition's back (a raw `rt_sigaction`
/// system call): the kernel's current action on each signal is compared with what the
/// agent installed there; a foreign handler is recorded as the program's and the
/// wrapper (or, on the quiescent-state signal, the agent's handler) installed in its
/// place. Returns how many were found. Agent thread only (called every tick and before
/// each grace period starts).
pub fn reclaim() -> usize {
    let qs_sig = qs::signal();
    let mut found = 0;
    let _g = lock();
    for sig in 1..NSIG as c_int {
        let is_qs = sig == qs_sig;
        if !is_qs && !wrapped(sig) {
            continue;
        }
        let mut cur = unsafe_zeroed();
        // SAFETY: libc's sigaction with a null action and a valid out pointer queries.
        if unsafe { real_sigaction(sig, std::ptr::null(), &mut cur) } != 0 {
            continue;
        }
        if is_qs {
            if cur.sa_sigaction == qs_entry as *const () as usize {
                continue;
            }
            record(sig, &cur);
            // SAFETY: installing a valid action.
            unsafe { real_sigaction(sig, &qs_action(), std::ptr::null_mut()) };
            found += 1;
        } else if is_function(cur.sa_sigaction) && cur.sa_sigaction != wrapper as *const () as usize
        {
            let mut a = cur;
            record(sig, &cur);
            a.sa_sigaction = wrapper as *const () as usize;
            a.sa_flags |= libc::SA_SIGINFO;
            crate::sys::signal::handler_mask(&mut a.sa_mask);
            // SAFETY: installing a valid action.
            unsafe { real_sigaction(sig, &a, std::ptr::null_mut()) };
            found += 1;
        }
    }
    if found > 0 {
        RECLAIMED.fetch_add(found as u64, Ordering::Relaxed);
    }
    found
}

/// Foreign actions found and taken back by [`reclaim`] so far.
pub static RECLAIMED: AtomicU64 = AtomicU64::new(0);

/// Raises this thread's dispatch depth: `NEST` (read by the agent's signal handler)
/// and the block's `nesting` (read by the blocked-thread probe). Async-signal-safe.
fn raise() -> Option<&'static block::Header> {
    INSIDE_RUNS.fetch_add(1, Ordering::Relaxed);
    block::NEST.with(|n| n.set(n.get() + 1));
    let h = block::current_fast().or_else(|| block::claim(crate::sys::tid()));
    if let Some(h) = h {
        h.seq.fetch_add(1, Ordering::AcqRel);
        h.nesting.fetch_add(1, Ordering::AcqRel);
        h.seq.fetch_add(1, Ordering::AcqRel);
    }
    h
}

/// Undoes [`raise`] without stamping (the interrupted context is still inside).
fn lower(h: Option<&'static block::Header>) {
    if let Some(h) = h {
        h.seq.fetch_add(1, Ordering::AcqRel);
        h.nesting.fetch_sub(1, Ordering::AcqRel);
        h.seq.fetch_add(1, Ordering::AcqRel);
    }
    block::NEST.with(|n| n.set(n.get() - 1));
}

// ------------------------------------------------------------------ interposed symbols

/// `sigaction(2)`, interposed (see the module documentation).
///
/// # Safety
/// As `sigaction(2)`.
// SAFETY: exporting `sigaction` replaces libc's for the whole process: this one has
// libc's signature and contract (same arguments, return value and errno), and reaches
// libc's own through `dlsym(RTLD_NEXT)`, never itself.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    // SAFETY: forwarded as given.
    unsafe { interposed(sig, act, old) }
}

fn install_simple(sig: c_int, handler: usize, flags: c_int, mask_self: bool) -> usize {
    // SAFETY: building a valid action and installing it through the interposition.
    unsafe {
        let mut a: libc::sigaction = std::mem::zeroed();
        a.sa_sigaction = handler;
        a.sa_flags = flags;
        libc::sigemptyset(&mut a.sa_mask);
        if mask_self && sig > 0 && (sig as usize) < NSIG {
            libc::sigaddset(&mut a.sa_mask, sig);
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        if interposed(sig, &a, &mut old) != 0 {
            return libc::SIG_ERR;
        }
        old.sa_sigaction
    }
}

/// `signal(3)` with glibc's (BSD) semantics, interposed.
// SAFETY: exporting `signal` replaces libc's: same signature, and glibc's semantics
// (SA_RESTART, the signal masked in its handler), built on the interposed `sigaction`.
#[unsafe(no_mangle)]
pub extern "C" fn signal(sig: c_int, handler: usize) -> usize {
    install_simple(sig, handler, libc::SA_RESTART, true)
}

/// `bsd_signal(3)`, interposed.
// SAFETY: exporting `bsd_signal` replaces libc's: same signature and semantics as
// glibc's `signal` (which is what glibc's `bsd_signal` is), through `sigaction` above.
#[unsafe(no_mangle)]
pub extern "C" fn bsd_signal(sig: c_int, handler: usize) -> usize {
    install_simple(sig, handler, libc::SA_RESTART, true)
}

/// `sysv_signal(3)` (one-shot, not masked, not restarted), interposed.
// SAFETY: exporting `sysv_signal` replaces libc's: same signature and System V
// semantics (SA_RESETHAND | SA_NODEFER, no SA_RESTART), through `sigaction` above.
#[unsafe(no_mangle)]
pub extern "C" fn sysv_signal(sig: c_int, handler: usize) -> usize {
    install_simple(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER, false)
}

/// `__sysv_signal`, glibc's name for [`sysv_signal`], interposed.
// SAFETY: exporting `__sysv_signal` replaces glibc's internal alias of `sysv_signal`
// (what `signal` compiles to under `_XOPEN_SOURCE`) with this same-signature forward.
#[unsafe(no_mangle)]
pub extern "C" fn __sysv_signal(sig: c_int, handler: usize) -> usize {
    sysv_signal(sig, handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    static SEEN_SIG: AtomicI32 = AtomicI32::new(0);
    static SEEN_NEST: AtomicU64 = AtomicU64::new(u64::MAX);
    static SEEN_NESTING: AtomicU32 = AtomicU32::new(u32::MAX);
    static SEEN_MASK: AtomicU64 = AtomicU64::new(0);

    extern "C" fn program_handler(sig: c_int) {
        SEEN_SIG.store(sig, Ordering::SeqCst);
        SEEN_NEST.store(block::NEST.with(|n| n.get()), Ordering::SeqCst);
        let nesting = block::current().map_or(u32::MAX, |h| h.nesting.load(Ordering::SeqCst));
        SEEN_NESTING.store(nesting, Ordering::SeqCst);
        // SAFETY: querying this thread's mask into a valid set.
        let mask = unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            bits_of(&cur)
        };
        SEEN_MASK.store(mask, Ordering::SeqCst);
    }

    fn query_real(sig: c_int) -> libc::sigaction {
        // SAFETY: querying into a valid out pointer.
        unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            assert_eq!(real_sigaction(sig, std::ptr::null(), &mut cur), 0);
            cur
        }
    }

    // One test: the signals and the static tables are process-wide.
    #[test]
    fn handlers_are_wrapped_reported_as_installed_and_raise_depth_inside_trampolines() {
        let sig = libc::SIGUSR2;
        // SAFETY: installing and querying actions with valid pointers; the handler is a
        // plain function that only stores atomics.
        unsafe {
            let mut a: libc::sigaction = std::mem::zeroed();
            a.sa_sigaction = program_handler as *const () as usize;
            a.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut a.sa_mask);
            libc::sigaddset(&mut a.sa_mask, libc::SIGWINCH);
            assert_eq!(libc::sigaction(sig, &a, std::ptr::null_mut()), 0);
            // The kernel runs the wrapper; the program sees its own action.
            assert_eq!(query_real(sig).sa_sigaction, wrapper as *const () as usize);
            assert_ne!(query_real(sig).sa_flags & libc::SA_SIGINFO, 0);
            let mut seen: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut seen), 0);
            assert_eq!(seen.sa_sigaction, program_handler as *const () as usize);
            assert_eq!(seen.sa_flags, libc::SA_RESTART);
            assert_eq!(bits_of(&seen.sa_mask), 1 << (libc::SIGWINCH - 1));
            // The kernel blocks everything while the wrapper decides.
            assert_eq!(
                libc::sigismember(&query_real(sig).sa_mask, libc::SIGUSR1),
                1
            );
            // Delivered through the wrapper, outside any trampoline: no depth raised.
            assert_eq!(libc::raise(sig), 0);
            assert_eq!(SEEN_SIG.load(Ordering::SeqCst), sig);
            assert_eq!(SEEN_NEST.load(Ordering::SeqCst), 0);
            // The handler runs with the mask the program asked for (+ the QS signal).
            let m = SEEN_MASK.load(Ordering::SeqCst);
            assert_ne!(m & (1 << (sig - 1)), 0, "the signal itself: {m:#x}");
            assert_ne!(m & (1 << (libc::SIGWINCH - 1)), 0, "its sa_mask: {m:#x}");
            assert_eq!(m & (1 << (libc::SIGUSR1 - 1)), 0, "nothing else: {m:#x}");
            if qs::signal() > 0 {
                assert_ne!(m & (1 << (qs::signal() - 1)), 0, "the QS signal: {m:#x}");
            }

            // An interrupted PC inside trampoline memory raises NEST and the block's
            // nesting for the handler's duration, and restores both after.
            block::refill(4).unwrap();
            let h = block::claim(crate::sys::tid()).expect("a block");
            assert!(crate::hot::ranges::add_range(0x1000, 0x2000));
            let mut uc: libc::ucontext_t = std::mem::zeroed();
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] = 0x1800;
            let n0 = h.nesting.load(Ordering::SeqCst);
            wrapper(sig, std::ptr::null_mut(), (&raw mut uc).cast());
            assert_eq!(SEEN_NEST.load(Ordering::SeqCst), 1);
            assert_eq!(SEEN_NESTING.load(Ordering::SeqCst), n0 + 1);
            assert_eq!(block::NEST.with(|n| n.get()), 0);
            assert_eq!(h.nesting.load(Ordering::SeqCst), n0);

            // Outside trampoline code but inside a dispatch (NEST > 0, the dispatcher
            // not yet at its `nesting` increment): raised too.
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] = 0x3800;
            block::NEST.with(|n| n.set(1));
            wrapper(sig, std::ptr::null_mut(), (&raw mut uc).cast());
            assert_eq!(SEEN_NEST.load(Ordering::SeqCst), 2);
            assert_eq!(SEEN_NESTING.load(Ordering::SeqCst), n0 + 1);
            block::NEST.with(|n| n.set(0));
            assert_eq!(h.nesting.load(Ordering::SeqCst), n0);
            // Neither: nothing raised.
            wrapper(sig, std::ptr::null_mut(), (&raw mut uc).cast());
            assert_eq!(SEEN_NEST.load(Ordering::SeqCst), 0);
            assert_eq!(SEEN_NESTING.load(Ordering::SeqCst), n0);

            // signal() reports the previous handler and restores the default.
            let prev = signal(sig, libc::SIG_DFL);
            assert_eq!(prev, program_handler as *const () as usize);
            assert_eq!(query_real(sig).sa_sigaction, libc::SIG_DFL);
            // A lock left held by a thread of a parent process (fork) is taken over.
            let other = ((libc::getpid() as u64 + 1) << 32) | 4242;
            LOCK.store(other, Ordering::SeqCst);
            assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut seen), 0);
            assert_eq!(LOCK.load(Ordering::SeqCst), 0);
            // SIGTRAP and SIGKILL pass through untouched (SIGKILL: EINVAL).
            assert_eq!(libc::sigaction(libc::SIGKILL, &a, std::ptr::null_mut()), -1);
        }
    }

    static QS_SEEN: AtomicU64 = AtomicU64::new(0);
    static QS_MASK: AtomicU64 = AtomicU64::new(0);
    static QS_VALUE: AtomicU64 = AtomicU64::new(0);

    extern "C" fn qs_program_handler(_sig: c_int, info: *mut libc::siginfo_t, _uc: *mut c_void) {
        QS_SEEN.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the kernel's siginfo_t (our wrapper passes it through).
        let v = unsafe { (*info.cast::<qs::QueueInfo>()).value };
        QS_VALUE.store(v, Ordering::SeqCst);
        // SAFETY: querying this thread's mask into a valid set.
        let mask = unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            bits_of(&cur)
        };
        QS_MASK.store(mask, Ordering::SeqCst);
    }

    /// Sends `sig` to this thread as a program would (`SI_QUEUE`, value `v`).
    fn queue_to_self(sig: c_int, v: u64) {
        // SAFETY: building a zeroed QueueInfo and sending it to this thread.
        unsafe {
            let mut q: qs::QueueInfo = std::mem::zeroed();
            q.signo = sig;
            q.code = libc::SI_QUEUE;
            q.pid = libc::getpid();
            q.value = v;
            let rc = libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                libc::getpid(),
                crate::sys::tid_now() as c_int,
                sig,
                &raw const q,
            );
            assert_eq!(rc, 0);
        }
    }

    fn tkill_self(sig: c_int) {
        // SAFETY: a signal to this thread, whose action the test set.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                crate::sys::tid_now() as c_int,
                sig,
            )
        };
    }

    const SA_RESTORER: c_int = 0x0400_0000;

    /// The kernel's `struct sigaction` for a raw `rt_sigaction` system call.
    #[repr(C)]
    struct KernelAction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }

    /// Installs `handler` on `sig` with a raw `rt_sigaction`, behind the interposition's
    /// back (the restorer is libc's, read from the agent's action on its signal).
    fn raw_install(sig: c_int, handler: usize) {
        let restorer = query_real(qs::signal())
            .sa_restorer
            .map_or(0, |f| f as usize);
        assert_ne!(restorer, 0);
        let k = KernelAction {
            handler,
            flags: (libc::SA_SIGINFO | SA_RESTORER) as u64,
            restorer,
            mask: 0,
        };
        // SAFETY: rt_sigaction with a valid kernel action, no old action, an 8-byte set.
        let rc =
            unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, &raw const k, 0usize, 8usize) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn the_quiescent_state_signal_stays_the_agents_and_the_program_keeps_its_own() {
        install_qs_signal(qs::default_signal()).unwrap();
        let sig = qs::signal();
        let entry = qs_entry as *const () as usize;
        block::refill(4).unwrap();
        let h = block::claim(crate::sys::tid()).expect("a block");
        // SAFETY: installing and querying actions with valid pointers; the handlers
        // only store atomics.
        unsafe {
            let mut a: libc::sigaction = std::mem::zeroed();
            a.sa_sigaction = qs_program_handler as *const () as usize;
            a.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut a.sa_mask);
            libc::sigaddset(&mut a.sa_mask, libc::SIGWINCH);
            let mut was: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, &a, &mut was), 0);
            assert_eq!(was.sa_sigaction, libc::SIG_DFL);
            // The kernel keeps the agent's handler; the program sees its own action.
            assert_eq!(query_real(sig).sa_sigaction, entry);
            let mut seen: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut seen), 0);
            assert_eq!(seen.sa_sigaction, qs_program_handler as *const () as usize);
            assert_eq!(seen.sa_flags, libc::SA_SIGINFO | libc::SA_RESTART);
            assert_eq!(bits_of(&seen.sa_mask), 1 << (libc::SIGWINCH - 1));

            // The agent's signal stamps and never reaches the program.
            let e = qs::EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
            qs::send(crate::sys::tid()).unwrap();
            assert!(h.qs_epoch.load(Ordering::SeqCst) >= e);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 0);
            // A queued signal with another value, or its own tgkill, is the program's:
            // its handler runs with its mask (interrupted + sa_mask + the signal).
            let e = qs::EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
            queue_to_self(sig, 77);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 1);
            assert_eq!(QS_VALUE.load(Ordering::SeqCst), 77);
            assert!(h.qs_epoch.load(Ordering::SeqCst) < e, "not an agent stamp");
            tkill_self(sig);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 2);
            let m = QS_MASK.load(Ordering::SeqCst);
            assert_ne!(m & (1 << (sig - 1)), 0, "the signal itself: {m:#x}");
            assert_ne!(m & (1 << (libc::SIGWINCH - 1)), 0, "its sa_mask: {m:#x}");
            assert_eq!(m & (1 << (libc::SIGUSR1 - 1)), 0, "nothing else: {m:#x}");

            // sysv_signal: SA_RESETHAND | SA_NODEFER: once, unmasked, then SIG_DFL.
            let prev = sysv_signal(sig, qs_program_handler as *const () as usize);
            assert_eq!(prev, qs_program_handler as *const () as usize);
            tkill_self(sig);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 3);
            let m = QS_MASK.load(Ordering::SeqCst);
            assert_eq!(m & (1 << (sig - 1)), 0, "SA_NODEFER: {m:#x}");
            assert_eq!(signal(sig, libc::SIG_IGN), libc::SIG_DFL, "SA_RESETHAND");
            // SIG_IGN: nothing happens.
            tkill_self(sig);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 3);
            assert_eq!(query_real(sig).sa_sigaction, entry);

            // A raw rt_sigaction on the QS signal is found, recorded as the program's
            // and replaced by the agent's handler; likewise on a wrapped signal.
            raw_install(sig, qs_program_handler as *const () as usize);
            raw_install(libc::SIGPWR, qs_program_handler as *const () as usize);
            assert_eq!(reclaim(), 2);
            assert_eq!(reclaim(), 0);
            assert_eq!(query_real(sig).sa_sigaction, entry);
            assert_eq!(
                query_real(libc::SIGPWR).sa_sigaction,
                wrapper as *const () as usize
            );
            assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut seen), 0);
            assert_eq!(seen.sa_sigaction, qs_program_handler as *const () as usize);
            assert_eq!(
                libc::sigaction(libc::SIGPWR, std::ptr::null(), &mut seen),
                0
            );
            assert_eq!(seen.sa_sigaction, qs_program_handler as *const () as usize);
            qs::send(crate::sys::tid()).unwrap();
            assert_eq!(
                QS_SEEN.load(Ordering::SeqCst),
                3,
                "the agent's: not the program's"
            );
            tkill_self(sig);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 4);
            tkill_self(libc::SIGPWR);
            assert_eq!(QS_SEEN.load(Ordering::SeqCst), 5);
            signal(libc::SIGPWR, libc::SIG_DFL);

            // SIG_DFL: a child that raises the signal dies of it, as without the agent.
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY (child): async-signal-safe calls only.
                signal(sig, libc::SIG_DFL);
                tkill_self(sig);
                libc::_exit(7);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == sig,
                "child status {status:#x}"
            );
            signal(sig, libc::SIG_DFL);
        }
    }
}
