//! The SIGTRAP handler that makes the int3 patching protocol safe, and the lock-free
//! table of sites it reads.
//!
//! While a site is rewritten (see `control::patch`) its first byte is `0xCC` for a
//! while. A thread that executes it traps; the handler looks the site up and emulates
//! the instruction the site is becoming:
//! * becoming `call tramp`: push site + 5 on the interrupted stack, continue at `tramp`;
//! * becoming a nop: continue at site + 5;
//! * no longer in transition (the trap was taken before the final byte was written but
//!   the handler runs only now, e.g. the thread was preempted in between): the byte is
//!   no longer `0xCC`, so continue at the site and execute whatever is there now.
//!
//! Anything else (a `0xCC` that is not one of our sites, a `SIGTRAP` sent with `kill`,
//! a debugger's trap) is passed to the handler that was installed before ours:
//! `sa_sigaction` or `sa_handler`; `SIG_DFL` is honoured by restoring the default
//! action and re-raising, and so is `SIG_IGN` for a trap raised by an instruction (the
//! kernel would have forced the default action there too).
//!
//! The table is an append-only chain of open-addressing hash tables of
//! `(site, state)` atomics; a site's entry is never removed and its state is a single
//! `AtomicU64` (kind in the top byte, target address below), so the handler can never
//! see a half-written entry and needs neither a lock nor a retry loop. Tables are
//! never freed. Writers are serialized by a mutex the handler never takes.
//!
//! Installation flags: `SA_SIGINFO` (we need `ucontext`), `SA_RESTART` (harmless;
//! matters only for a chained handler of an asynchronous SIGTRAP that interrupted a
//! system call), `SA_ONSTACK` (a site hit with an almost exhausted stack can still be
//! emulated when the thread has an alternate stack, as Rust threads do; emulation
//! writes only 8 bytes below the interrupted `rsp`, where a real `call` would have
//! written), and a full `sa_mask` but SIGTRAP (`sys::signal::handler_mask`: a nested
//! trap is emulated, never fatal): no other signal handler, in particular the
//! quiescent-state probe, runs while the handler is between looking a site up and
//! redirecting the thread, so a thread is never judged to be outside a trampoline it
//! is about to enter.
//!
//! Known hazard: the kernel delivers an instruction trap to a thread that *blocks*
//! SIGTRAP by resetting the action to `SIG_DFL`, which kills the process. The patcher
//! therefore refuses to patch while any thread blocks SIGTRAP.

use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use super::ranges::in_trampoline;
use super::stats;
use crate::sys;

/// `si_code` of a trap raised by an `int3` instruction.
pub const SI_KERNEL: i32 = 0x80;

const KIND_SHIFT: u32 = 56;
const ADDR_MASK: u64 = (1 << KIND_SHIFT) - 1;
const KIND_CALL: u64 = 1;
const KIND_NOP: u64 = 2;
const KIND_NOP6: u64 = 3;
const KIND_SLED: u64 = 4;
const KIND_RELOC_IN: u64 = 5;
const KIND_JUMP: u64 = 6;
const KIND_RELOC_OUT: u64 = 7;

/// What a site is turning into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Not being rewritten.
    Idle,
    /// Becoming (or staying) `call target`.
    ToCall(usize),
    /// Becoming a 5-byte nop.
    ToNop,
    /// A 6-byte `call *__fentry__@GOTPCREL(%rip)` becoming a 5-byte nop and a 1-byte
    /// nop: skip all 6 bytes.
    ToNop6,
    /// Five 1-byte nops (gcc) becoming one 5-byte nop under a grace period (see
    /// `control::patch::Patcher::convert_sleds`): a trap at the first byte skips all 5,
    /// and a thread found *inside* the sled is moved past it ([`sled_exit`]).
    SledToNop,
    /// A relocated prologue (see `control::patch::relocated`) becoming `jmp thunk`: a
    /// trap at the patch point continues at the thunk (already live); a thread found
    /// strictly inside the replaced bytes is moved to the same point of the thunk's
    /// relocated copy by the quiescent-state handler ([`reloc_exit`]).
    RelocIn(usize),
    /// A relocated site's `jmp` moving to another thunk (one instruction: no thread
    /// can be inside it): a trap continues at the new thunk.
    Jump(usize),
    /// A relocated site getting its original prologue back: a trap continues at the
    /// relocated copy (given) of the thunk the site jumped to, which is still live.
    RelocOut(usize),
}

impl Transition {
    /// Async-signal-safe.
    fn encode(self) -> u64 {
        match self {
            Transition::Idle => 0,
            Transition::ToCall(t) => (KIND_CALL << KIND_SHIFT) | (t as u64 & ADDR_MASK),
            Transition::ToNop => KIND_NOP << KIND_SHIFT,
            Transition::ToNop6 => KIND_NOP6 << KIND_SHIFT,
            Transition::SledToNop => KIND_SLED << KIND_SHIFT,
            Transition::RelocIn(t) => (KIND_RELOC_IN << KIND_SHIFT) | (t as u64 & ADDR_MASK),
            Transition::Jump(t) => (KIND_JUMP << KIND_SHIFT) | (t as u64 & ADDR_MASK),
            Transition::RelocOut(t) => (KIND_RELOC_OUT << KIND_SHIFT) | (t as u64 & ADDR_MASK),
        }
    }
    /// Async-signal-safe.
    fn decode(v: u64) -> Self {
        match v >> KIND_SHIFT {
            KIND_CALL => Transition::ToCall((v & ADDR_MASK) as usize),
            KIND_NOP => Transition::ToNop,
            KIND_NOP6 => Transition::ToNop6,
            KIND_SLED => Transition::SledToNop,
            KIND_RELOC_IN => Transition::RelocIn((v & ADDR_MASK) as usize),
            KIND_JUMP => Transition::Jump((v & ADDR_MASK) as usize),
            KIND_RELOC_OUT => Transition::RelocOut((v & ADDR_MASK) as usize),
            _ => Transition::Idle,
        }
    }
}

struct Entry {
    site: AtomicUsize,
    state: AtomicU64,
}

struct Table {
    mask: usize,
    next: AtomicPtr<Table>,
    entries: Box<[Entry]>,
}

static HEAD: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

struct Writer {
    newest: *mut Table,
    used: usize,
}
// SAFETY: the raw pointer refers to a leaked, never-freed table; access is serialized
// by the WRITER mutex.
unsafe impl Send for Writer {}

static WRITER: Mutex<Writer> = Mutex::new(Writer {
    newest: std::ptr::null_mut(),
    used: 0,
});

const FIRST_CAPACITY: usize = 4096;

/// Async-signal-safe.
fn hash(site: usize, mask: usize) -> usize {
    ((site as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 29) as usize & mask
}

/// Async-signal-safe.
fn find(site: usize) -> Option<&'static Entry> {
    let mut t = HEAD.load(Ordering::Acquire);
    while !t.is_null() {
        // SAFETY: tables are leaked and never freed; `t` was published with Release
        // after it was fully initialized.
        let table = unsafe { &*t };
        let mut i = hash(site, table.mask);
        for _ in 0..=table.mask {
            let e = &table.entries[i];
            match e.site.load(Ordering::Acquire) {
                0 => break,
                s if s == site => return Some(e),
                _ => i = (i + 1) & table.mask,
            }
        }
        t = table.next.load(Ordering::Acquire);
    }
    None
}

/// The state of a known site, or `None` if the site was never patched.
///
/// Async-signal-safe.
pub fn transition(site: usize) -> Option<Transition> {
    find(site).map(|e| Transition::decode(e.state.load(Ordering::Acquire)))
}

/// For a `pc` strictly inside a nop sled that is being converted
/// ([`Transition::SledToNop`]), the address just past the sled, when every byte from
/// `pc` to there is still a 1-byte nop: continuing there is exactly what executing
/// the remaining nops would do. `None` anywhere else.
///
/// Async-signal-safe.
pub fn sled_exit(pc: usize) -> Option<usize> {
    for k in 1..5 {
        let site = pc.checked_sub(k)?;
        if site != 0
            && find(site).map(|e| Transition::decode(e.state.load(Ordering::Acquire)))
                == Some(Transition::SledToNop)
        {
            let end = site + 5;
            // SAFETY: `site` is a patch site the patcher published (loaded, readable
            // code); `pc..end` lies within its 5 bytes.
            let all_nops =
                (pc..end).all(|a| unsafe { std::ptr::read_volatile(a as *const u8) } == 0x90);
            return all_nops.then_some(end);
        }
    }
    None
}

/// Where the quiescent-state handler finds a thread, relative to the relocated
/// prologues being installed ([`Transition::RelocIn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocPc {
    /// Not strictly inside the replaced bytes of a prologue being installed.
    Outside,
    /// At an instruction boundary strictly inside them: continuing at this address of
    /// the thunk's relocated copy is what executing the original instructions does.
    Moved(usize),
    /// Strictly inside them but at no instruction boundary of the moved code (never
    /// seen: a thread executing the original code stops only at boundaries): the
    /// thread is not moved, and must not be counted as quiescent.
    Stuck,
}

/// Maps a `pc` strictly inside the replaced bytes of a relocated prologue being
/// installed to the same point of its relocated copy, from the map the thunk carries
/// just before its code (`tramp::THUNK_RECORD`; trampoline memory, which stays valid
/// until a grace period after its trampoline retired, longer than any handler that
/// read the transition naming it can run).
///
/// Async-signal-safe: at most `tramp::MAX_REPLACED` lookups in the trap table, reads of
/// the thunk's record.
pub fn reloc_exit(pc: usize) -> RelocPc {
    for k in 1..crate::tramp::MAX_REPLACED {
        let Some(site) = pc.checked_sub(k) else {
            return RelocPc::Outside;
        };
        if site == 0 {
            return RelocPc::Outside;
        }
        let Some(Transition::RelocIn(thunk)) =
            find(site).map(|e| Transition::decode(e.state.load(Ordering::Acquire)))
        else {
            continue;
        };
        // SAFETY: `thunk` was published for a site being installed: a live thunk of a
        // live trampoline, preceded by its record (see `tramp::thunk_record`).
        let rec = unsafe { crate::tramp::read_thunk_record(thunk) };
        if k >= rec.len as usize {
            // The nearest prologue being installed ends before `pc`; functions do not
            // overlap, so no earlier one covers it.
            return RelocPc::Outside;
        }
        return match rec.map(k as u8) {
            Some(new) => RelocPc::Moved(thunk + crate::tramp::THUNK_CALL + new as usize),
            None => RelocPc::Stuck,
        };
    }
    RelocPc::Outside
}

fn new_table(cap: usize) -> *mut Table {
    let entries: Box<[Entry]> = (0..cap)
        .map(|_| Entry {
            site: AtomicUsize::new(0),
            state: AtomicU64::new(0),
        })
        .collect();
    Box::into_raw(Box::new(Table {
        mask: cap - 1,
        next: AtomicPtr::new(std::ptr::null_mut()),
        entries,
    }))
}

/// Publishes a site's state (inserting the site if new). The store is `Release` and
/// precedes, in program order, every code write of the transition.
/// Agent thread only (it may allocate or lock).
pub fn set_transition(site: usize, t: Transition) {
    assert!(site != 0 && (site as u64) <= ADDR_MASK);
    let mut w = WRITER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = find(site) {
        e.state.store(t.encode(), Ordering::Release);
        return;
    }
    if w.newest.is_null() || w.used * 2 >= table_len(w.newest) {
        let cap = if w.newest.is_null() {
            FIRST_CAPACITY
        } else {
            table_len(w.newest) * 2
        };
        let t = new_table(cap);
        if w.newest.is_null() {
            HEAD.store(t, Ordering::Release);
        } else {
            // SAFETY: `newest` is a leaked table owned by the writer side.
            unsafe { (*w.newest).next.store(t, Ordering::Release) };
        }
        w.newest = t;
        w.used = 0;
    }
    // SAFETY: `newest` is a leaked, never-freed table; only writers (serialized by the
    // WRITER mutex held here) mutate its entries' keys.
    let table = unsafe { &*w.newest };
    let mut i = hash(site, table.mask);
    while table.entries[i].site.load(Ordering::Relaxed) != 0 {
        i = (i + 1) & table.mask;
    }
    table.entries[i].state.store(t.encode(), Ordering::Relaxed);
    table.entries[i].site.store(site, Ordering::Release);
    w.used += 1;
}

fn table_len(t: *mut Table) -> usize {
    // SAFETY: `t` is a leaked, live table.
    unsafe { (*t).mask + 1 }
}

/// What the handler does with a trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Push `ret` and continue at `target`.
    EmulateCall { target: usize, ret: usize },
    /// Continue at `to` (nop emulation, or re-executing a site that changed).
    Resume { to: usize },
    /// Not ours.
    Chain,
}

/// Decides what to do with a trap at `pc` (the address after the `int3`), given the
/// site's state and the byte now at `pc - 1`.
///
/// Async-signal-safe.
pub fn decide(si_code: i32, pc: usize, state: Option<Transition>, byte_now: u8) -> Action {
    if si_code != SI_KERNEL {
        return Action::Chain;
    }
    let site = pc.wrapping_sub(1);
    match state {
        None => Action::Chain,
        Some(Transition::ToCall(target)) => Action::EmulateCall {
            target,
            ret: site + 5,
        },
        Some(Transition::ToNop) => Action::Resume { to: site + 5 },
        Some(Transition::ToNop6) => Action::Resume { to: site + 6 },
        Some(Transition::SledToNop) => Action::Resume { to: site + 5 },
        // A `jmp` (being installed, or retargeted): the thunk is already live.
        Some(Transition::RelocIn(thunk)) | Some(Transition::Jump(thunk)) => {
            Action::Resume { to: thunk }
        }
        // The original prologue coming back: run the relocated copy of the thunk the
        // site jumped to (the call to the stubs is skipped: the site is leaving).
        Some(Transition::RelocOut(copy)) => Action::Resume { to: copy },
        Some(Transition::Idle) if byte_now != 0xCC => Action::Resume { to: site },
        Some(Transition::Idle) => Action::Chain,
    }
}

/// Counters of what the handler did.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapStats {
    pub emulated_calls: u64,
    pub emulated_nops: u64,
    pub restarted: u64,
    pub chained: u64,
}

static EMULATED_CALLS: AtomicU64 = AtomicU64::new(0);
static EMULATED_NOPS: AtomicU64 = AtomicU64::new(0);
static RESTARTED: AtomicU64 = AtomicU64::new(0);
static CHAINED: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
pub fn stats() -> TrapStats {
    TrapStats {
        emulated_calls: EMULATED_CALLS.load(Ordering::Relaxed),
        emulated_nops: EMULATED_NOPS.load(Ordering::Relaxed),
        restarted: RESTARTED.load(Ordering::Relaxed),
        chained: CHAINED.load(Ordering::Relaxed),
    }
}

/// The handler installed before ours (leaked, replaced only by [`ensure_installed`]).
static PREV: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Mutex<()> = Mutex::new(());

/// Errors of installation.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TrapError {
    #[error("sigaction(SIGTRAP) failed with errno {0}")]
    Sigaction(i32),
}

type SigAction = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
type SigHandler = extern "C" fn(libc::c_int);

/// The SIGTRAP handler.
///
/// Async-signal-safe.
extern "C" fn on_sigtrap(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO
    // handler; they stay valid until the handler returns.
    let (code, uc) = unsafe { ((*info).si_code, &mut *(uctx as *mut libc::ucontext_t)) };
    let pc = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    let state = if code == SI_KERNEL {
        transition(pc.wrapping_sub(1))
    } else {
        None
    };
    if code == SI_KERNEL && state.is_none() && in_trampoline(pc.wrapping_sub(1) as u64) {
        // An int3 in trampoline memory: the poison of a freed slot (nothing else there
        // is ever executed). Never resumable: report and die.
        premature_free(b"executed freed (int3-poisoned) trampoline memory", pc - 1);
        return;
    }
    let byte = match state {
        // SAFETY: the address is a known site: mapped, readable text.
        Some(_) => unsafe { std::ptr::read_volatile((pc - 1) as *const u8) },
        None => 0,
    };
    match decide(code, pc, state, byte) {
        Action::EmulateCall { target, ret } => {
            let sp = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as usize - 8;
            // SAFETY: the interrupted thread was about to execute `call`, which would
            // have pushed the same word at the same place on its own stack; the
            // handler runs on another frame (below the red zone, or on the altstack).
            unsafe { std::ptr::write(sp as *mut u64, ret as u64) };
            uc.uc_mcontext.gregs[libc::REG_RSP as usize] = sp as i64;
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] = target as i64;
            EMULATED_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        Action::Resume { to } => {
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] = to as i64;
            if to == pc - 1 {
                RESTARTED.fetch_add(1, Ordering::Relaxed);
            } else {
                EMULATED_NOPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        Action::Chain => {
            CHAINED.fetch_add(1, Ordering::Relaxed);
            chain(sig, info, uctx);
        }
    }
}

/// Start of the line written to stderr when a thread executes poisoned trampoline
/// memory (a trampoline freed while a thread could still run in it).
pub const POISON_MARKER: &str = "patchbay-agent: FATAL: premature free:";

/// A thread executed the `int3` poison of freed trampoline memory, or used a freed
/// trampoline descriptor, at `addr`: counts it, writes [`POISON_MARKER`] with `what`,
/// the address and the thread id to stderr, and kills the process with the default
/// action of SIGTRAP (core dump), whatever handler the program had installed before
/// ours. (In the SIGTRAP handler the re-raised signal is delivered when it returns;
/// elsewhere at once.)
///
/// Async-signal-safe: formats into a stack buffer, then `write`, `sigaction`, `tgkill`.
pub fn premature_free(what: &[u8], addr: usize) {
    stats::bump(&stats::POISON_TRAPS);
    let mut buf = [0u8; 192];
    let mut n = 0;
    let mut put = |b: &[u8]| {
        let k = b.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&b[..k]);
        n += k;
    };
    put(POISON_MARKER.as_bytes());
    put(b" thread ");
    let (digits, first) = decimal(sys::tid_now() as u64);
    put(&digits[first..]);
    put(b" ");
    put(what);
    put(b" at 0x");
    put(&hex(addr as u64));
    put(b"\n");
    // SAFETY: write(2) of a valid stack buffer; the result is irrelevant (we die next).
    unsafe { libc::write(2, buf.as_ptr().cast(), n) };
    die_by_default(libc::SIGTRAP);
}

/// Digits of `v` at the end of a buffer; returns the buffer and the first digit's index.
/// Async-signal-safe.
fn decimal(mut v: u64) -> ([u8; 20], usize) {
    let mut out = [0u8; 20];
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return (out, i);
        }
    }
}

/// Async-signal-safe.
fn hex(v: u64) -> [u8; 16] {
    let mut out = [b'0'; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let d = ((v >> (60 - 4 * i)) & 0xF) as u8;
        *o = if d < 10 { b'0' + d } else { b'a' + d - 10 };
    }
    out
}

/// Restores the default action of `sig` and sends it to this thread; it is delivered
/// (blocked while the handler runs) as soon as the handler returns.
///
/// Async-signal-safe.
fn die_by_default(sig: libc::c_int) {
    // SAFETY: sigaction and tgkill are async-signal-safe system calls.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        sys::signal::real_sigaction(sig, &dfl, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            sys::tid_now() as libc::c_long,
            sig,
        );
    }
}

/// Passes a trap that is not ours to the previous handler.
///
/// Async-signal-safe.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    let prev = PREV.load(Ordering::Acquire);
    // SAFETY: PREV is null or a leaked, never-freed sigaction.
    let (handler, flags) = match unsafe { prev.as_ref() } {
        Some(p) => (p.sa_sigaction, p.sa_flags),
        None => (libc::SIG_DFL, 0),
    };
    // SAFETY: `info` is the kernel's siginfo for this signal.
    let synchronous = unsafe { (*info).si_code } == SI_KERNEL;
    if handler == libc::SIG_IGN && !synchronous {
        return;
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // The signal is blocked while we run, so the re-raised one is delivered with
        // the default action as soon as the handler returns.
        die_by_default(sig);
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the previous handler has the three-argument form.
        let f: SigAction = unsafe { std::mem::transmute::<usize, SigAction>(handler) };
        f(sig, info, uctx);
    } else {
        // SAFETY: without SA_SIGINFO it is a one-argument handler.
        let f: SigHandler = unsafe { std::mem::transmute::<usize, SigHandler>(handler) };
        f(sig);
    }
}

fn our_action() -> libc::sigaction {
    // SAFETY: sigaction is plain data; zeroed is a valid starting point.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigtrap as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
    crate::sys::signal::handler_mask(&mut sa.sa_mask);
    sa
}

/// Installs the handler if it is not the current SIGTRAP action (first call, or the
/// program replaced it since: the replacement becomes the handler we chain to).
/// Agent thread only (it may allocate or lock).
pub fn ensure_installed() -> Result<(), TrapError> {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: querying the current action into a valid out pointer.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: real_sigaction with a null action and a valid out pointer only queries.
    if unsafe { sys::signal::real_sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) } != 0 {
        return Err(TrapError::Sigaction(sys::errno()));
    }
    if cur.sa_sigaction == on_sigtrap as *const () as usize {
        return Ok(());
    }
    // Publish the previous action before any trap can reach our handler.
    PREV.store(Box::into_raw(Box::new(cur)), Ordering::Release);
    let sa = our_action();
    // SAFETY: installing a valid action for SIGTRAP.
    if unsafe { sys::signal::real_sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()) } != 0 {
        return Err(TrapError::Sigaction(sys::errno()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode() {
        for t in [
            Transition::Idle,
            Transition::ToNop,
            Transition::ToCall(0x7fff_1234_5640),
            Transition::RelocIn(0x7fff_1234_5650),
            Transition::Jump(0x7fff_1234_5660),
            Transition::RelocOut(0x7fff_1234_5675),
        ] {
            assert_eq!(Transition::decode(t.encode()), t);
        }
    }

    #[test]
    fn decisions() {
        let pc = 0x5000_0001;
        let call = Some(Transition::ToCall(0x6000_0000));
        assert_eq!(
            decide(SI_KERNEL, pc, call, 0xCC),
            Action::EmulateCall {
                target: 0x6000_0000,
                ret: 0x5000_0005
            }
        );
        assert_eq!(
            decide(SI_KERNEL, pc, Some(Transition::ToNop), 0xCC),
            Action::Resume { to: 0x5000_0005 }
        );
        // Stale trap: the site has its final bytes now; re-execute it.
        assert_eq!(
            decide(SI_KERNEL, pc, Some(Transition::Idle), 0xE8),
            Action::Resume { to: 0x5000_0000 }
        );
        assert_eq!(
            decide(SI_KERNEL, pc, Some(Transition::Idle), 0xCC),
            Action::Chain
        );
        assert_eq!(decide(SI_KERNEL, pc, None, 0), Action::Chain);
        // Relocated prologues: installing or moving the jump continues at the thunk;
        // restoring the prologue runs the old thunk's copy.
        for t in [
            Transition::RelocIn(0x6000_0040),
            Transition::Jump(0x6000_0040),
        ] {
            assert_eq!(
                decide(SI_KERNEL, pc, Some(t), 0xCC),
                Action::Resume { to: 0x6000_0040 }
            );
        }
        assert_eq!(
            decide(SI_KERNEL, pc, Some(Transition::RelocOut(0x6000_0045)), 0xCC),
            Action::Resume { to: 0x6000_0045 }
        );
        // SIGTRAP sent with kill/tgkill: never ours.
        assert_eq!(decide(0, pc, call, 0xCC), Action::Chain);
    }

    #[test]
    fn signal_safe_number_formatting() {
        for v in [0u64, 7, 10, 4_294_967_295, u64::MAX] {
            let (d, first) = decimal(v);
            assert_eq!(std::str::from_utf8(&d[first..]).unwrap(), v.to_string());
        }
        assert_eq!(&hex(0x7f12_3456_abcd), b"00007f123456abcd");
    }

    #[test]
    fn table_grows_and_finds_every_site() {
        // Addresses no other test uses (never executed: only the table is exercised).
        let base = 0x1_0000_0000usize;
        let n = FIRST_CAPACITY * 3;
        for i in 0..n {
            set_transition(base + 16 * i, Transition::ToCall(base + i));
        }
        for i in 0..n {
            assert_eq!(
                transition(base + 16 * i),
                Some(Transition::ToCall(base + i))
            );
            set_transition(base + 16 * i, Transition::Idle);
        }
        assert_eq!(transition(base + 16 * 5), Some(Transition::Idle));
        assert_eq!(transition(base + 8), None);
    }
}
