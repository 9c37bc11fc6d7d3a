//! Test fixtures: functions with patchable entries, defined in assembly so their first
//! bytes are exactly known, and the shared set-up of the patcher's tests. Trampolines
//! here are the production ones: `tramp::generate` code in the `arena`, a `dispatch`
//! descriptor, the static entry stub and dispatcher, laid out and freed the way
//! `Runtime::try_install` / `Runtime::authorize_free` do it.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

use super::relocated::RelocOp;
use super::{Op, Patcher};
use crate::control::arena::{self, Arena, Slot, Window};
use crate::control::counters::Counters;
use crate::control::observer::Observer;
use crate::control::threads::Threads;
use crate::hot::block;
use crate::hot::dispatch::Registered;
use crate::hot::dispatch::{self, Action, Callback, DESC_DEAD, DESC_LIVE, Descriptor};
use crate::hot::qs::{self, EPOCH};
use crate::tramp::relocate::{self, Prologue};
use crate::tramp::{self, Layout, Thunk};

// Each fixture is used by one test only (tests run in parallel in one process).
std::arch::global_asm!(
    ".pushsection .text.patchbay_fixtures,\"ax\",@progbits",
    // fn(u64) -> u64 { x + 1 } with a 5-byte nop entry: the stress test.
    ".p2align 4",
    ".globl patchbay_fx_stress",
    "patchbay_fx_stress:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    // Same, for the deterministic emulation test.
    ".p2align 4",
    ".globl patchbay_fx_emul",
    "patchbay_fx_emul:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    // Same, for the benchmark.
    ".p2align 4",
    ".globl patchbay_fx_bench",
    "patchbay_fx_bench:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x08",
    "lea rax, [rdi + 1]",
    "ret",
    // Same, for thread-exit accounting.
    ".p2align 4",
    ".globl patchbay_fx_exit",
    "patchbay_fx_exit:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    // Same, called through a dead descriptor (premature-free detection).
    ".p2align 4",
    ".globl patchbay_fx_dead",
    "patchbay_fx_dead:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    // fn(a, b, c, d, e, f: u64, x: f64) -> u64: a + 2b + 3c + 4d + 5e + 6f + 7*(x as u64).
    ".p2align 4",
    ".globl patchbay_fx_args",
    "patchbay_fx_args:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov rax, rdi",
    "lea rax, [rax + 2*rsi]",
    "imul rdx, rdx, 3",
    "add rax, rdx",
    "lea rax, [rax + 4*rcx]",
    "imul r8, r8, 5",
    "add rax, r8",
    "imul r9, r9, 6",
    "add rax, r9",
    "cvttsd2si r10, xmm0",
    "imul r10, r10, 7",
    "add rax, r10",
    "ret",
    // Stores rdi rsi rdx rcx r8 r9 rax r10 r11 and xmm0-7 into patchbay_fx_regs_out:
    // checks that trampolines preserve every register the function may read.
    ".p2align 4",
    ".globl patchbay_fx_regs",
    "patchbay_fx_regs:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov [rip + patchbay_fx_regs_out + 0], rdi",
    "mov [rip + patchbay_fx_regs_out + 8], rsi",
    "mov [rip + patchbay_fx_regs_out + 16], rdx",
    "mov [rip + patchbay_fx_regs_out + 24], rcx",
    "mov [rip + patchbay_fx_regs_out + 32], r8",
    "mov [rip + patchbay_fx_regs_out + 40], r9",
    "mov [rip + patchbay_fx_regs_out + 48], rax",
    "mov [rip + patchbay_fx_regs_out + 56], r10",
    "mov [rip + patchbay_fx_regs_out + 64], r11",
    "movups [rip + patchbay_fx_regs_out + 80], xmm0",
    "movups [rip + patchbay_fx_regs_out + 96], xmm1",
    "movups [rip + patchbay_fx_regs_out + 112], xmm2",
    "movups [rip + patchbay_fx_regs_out + 128], xmm3",
    "movups [rip + patchbay_fx_regs_out + 144], xmm4",
    "movups [rip + patchbay_fx_regs_out + 160], xmm5",
    "movups [rip + patchbay_fx_regs_out + 176], xmm6",
    "movups [rip + patchbay_fx_regs_out + 192], xmm7",
    "ret",
    // Stores ymm0-7 in full into patchbay_fx_ymm_out (AVX CPUs only): vector arguments
    // survive callbacks that end with `vzeroupper`.
    ".p2align 4",
    ".globl patchbay_fx_ymm",
    "patchbay_fx_ymm:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "vmovdqu [rip + patchbay_fx_ymm_out + 0], ymm0",
    "vmovdqu [rip + patchbay_fx_ymm_out + 32], ymm1",
    "vmovdqu [rip + patchbay_fx_ymm_out + 64], ymm2",
    "vmovdqu [rip + patchbay_fx_ymm_out + 96], ymm3",
    "vmovdqu [rip + patchbay_fx_ymm_out + 128], ymm4",
    "vmovdqu [rip + patchbay_fx_ymm_out + 160], ymm5",
    "vmovdqu [rip + patchbay_fx_ymm_out + 192], ymm6",
    "vmovdqu [rip + patchbay_fx_ymm_out + 224], ymm7",
    "ret",
    // fn(u64) -> u64 { x + 2 }, for the group-order and the exact-count tests.
    ".p2align 4",
    ".globl patchbay_fx_list",
    "patchbay_fx_list:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 2]",
    "ret",
    ".p2align 4",
    ".globl patchbay_fx_exact",
    "patchbay_fx_exact:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 2]",
    "ret",
    // Recursion: a callback calls this function again.
    ".p2align 4",
    ".globl patchbay_fx_recurse",
    "patchbay_fx_recurse:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 2]",
    "ret",
    // gcc -pg -mfentry style: `call __fentry__` at entry (to a local stand-in).
    ".p2align 4",
    ".globl patchbay_fx_fentry",
    "patchbay_fx_fentry:",
    "call patchbay_fx_fentry_stub",
    "lea rax, [rdi + 3]",
    "ret",
    ".p2align 4",
    "patchbay_fx_fentry_stub:",
    "lock inc qword ptr [rip + patchbay_fx_fentry_hits]",
    "ret",
    // gcc -fpatchable-function-entry=5: five 1-byte nops.
    ".p2align 4",
    ".globl patchbay_fx_sled",
    "patchbay_fx_sled:",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    "ret",
    // Same, returning x + 1: sled conversion while threads run through it.
    ".p2align 4",
    ".globl patchbay_fx_sled_stress",
    "patchbay_fx_sled_stress:",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    "lea rax, [rdi + 1]",
    "ret",
    // A sled whose transition the handler test sets (never executed).
    ".p2align 4",
    ".globl patchbay_fx_sled_ctx",
    "patchbay_fx_sled_ctx:",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    "ret",
    // MANY_SITES functions of 16 bytes each: batch patching speed.
    ".p2align 4",
    ".globl patchbay_fx_many",
    "patchbay_fx_many:",
    ".rept 10000",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    ".p2align 4, 0xcc",
    ".endr",
    // Functions built without instrumentation (issue 11), whose prologues are relocated.
    // fn(u64) -> u64 { x + 1 }: endbr64, then two moved instructions (a thread can be
    // stopped between them), the second RIP-relative: the relocated-site stress test.
    ".p2align 4",
    ".globl patchbay_fx_rel_stress",
    "patchbay_fx_rel_stress:",
    "endbr64",
    "lea rax, [rdi + 1]",
    "add rax, qword ptr [rip + patchbay_fx_rel_zero]",
    "ret",
    ".globl patchbay_fx_rel_stress_end",
    "patchbay_fx_rel_stress_end:",
    // Same as patchbay_fx_rel_stress, for the test that stops threads inside it.
    ".p2align 4",
    ".globl patchbay_fx_rel_step",
    "patchbay_fx_rel_step:",
    "endbr64",
    "lea rax, [rdi + 1]",
    "add rax, qword ptr [rip + patchbay_fx_rel_zero]",
    "ret",
    ".globl patchbay_fx_rel_step_end",
    "patchbay_fx_rel_step_end:",
    // fn(a, b) -> u64 { if a == 0 { 100 } else { a + b } }: a conditional branch among
    // the moved instructions, re-targeted to the original code.
    ".p2align 4",
    ".globl patchbay_fx_rel_branch",
    "patchbay_fx_rel_branch:",
    "test rdi, rdi",
    "jz 2f",
    "lea rax, [rdi + rsi]",
    "ret",
    "2:",
    "mov eax, 100",
    "ret",
    ".globl patchbay_fx_rel_branch_end",
    "patchbay_fx_rel_branch_end:",
    // fn(flag: *const u8) -> u64 { while *flag == 0 {} 7 }: the loop lies entirely in the
    // moved bytes (nop; 1: cmp byte [rdi], 0; je 1b), re-targeted inside the copy; a
    // thread spinning there is stopped strictly inside the replaced bytes.
    ".p2align 4",
    ".globl patchbay_fx_rel_spin",
    "patchbay_fx_rel_spin:",
    "nop",
    "3:",
    "cmp byte ptr [rdi], 0",
    "je 3b",
    "mov eax, 7",
    "ret",
    ".globl patchbay_fx_rel_spin_end",
    "patchbay_fx_rel_spin_end:",
    // fn(u64) -> u64 { x + 1 }, for the premature-free check of a relocated site.
    ".p2align 4",
    ".globl patchbay_fx_rel_dead",
    "patchbay_fx_rel_dead:",
    "lea rax, [rdi + 1]",
    "add rax, qword ptr [rip + patchbay_fx_rel_zero]",
    "ret",
    ".globl patchbay_fx_rel_dead_end",
    "patchbay_fx_rel_dead_end:",
    // fn(a, b) -> u64 { a + 1 + b }: built without instrumentation (endbr64, two moved
    // instructions) and with a 5-byte nop entry, for the relocated-site benchmark.
    ".p2align 4",
    ".globl patchbay_fx_bench_rel",
    "patchbay_fx_bench_rel:",
    "endbr64",
    "lea rax, [rdi + 1]",
    "add rax, rsi",
    "ret",
    ".globl patchbay_fx_bench_rel_end",
    "patchbay_fx_bench_rel_end:",
    ".p2align 4",
    ".globl patchbay_fx_bench_nop",
    "patchbay_fx_bench_nop:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "add rax, rsi",
    "ret",
    // fn(u64) -> u64 { x + 1 } with a 5-byte nop entry: called by an agent thread.
    ".p2align 4",
    ".globl patchbay_fx_agent",
    "patchbay_fx_agent:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 1]",
    "ret",
    // A foreign int3 (not a site): must reach the previous SIGTRAP handler.
    ".p2align 4",
    ".globl patchbay_fx_int3",
    "patchbay_fx_int3:",
    "int3",
    "ret",
    // A C callback (ctx): stores rsp % 16 at entry into patchbay_fx_align_out (8 when
    // the caller aligned the stack to 16 before its call).
    ".p2align 4",
    ".globl patchbay_fx_align_cb",
    "patchbay_fx_align_cb:",
    "mov rax, rsp",
    "and rax, 15",
    "mov [rip + patchbay_fx_align_out], rax",
    "ret",
    ".popsection",
    ".pushsection .data.patchbay_fixtures,\"aw\",@progbits",
    ".p2align 5",
    ".globl patchbay_fx_regs_out",
    "patchbay_fx_regs_out:",
    ".zero 208",
    ".p2align 5",
    ".globl patchbay_fx_ymm_out",
    "patchbay_fx_ymm_out:",
    ".zero 256",
    ".globl patchbay_fx_fentry_hits",
    "patchbay_fx_fentry_hits:",
    ".quad 0",
    ".globl patchbay_fx_align_out",
    "patchbay_fx_align_out:",
    ".quad 99",
    ".globl patchbay_fx_rel_zero",
    "patchbay_fx_rel_zero:",
    ".quad 0",
    ".popsection",
);

unsafe extern "C" {
    pub fn patchbay_fx_stress(x: u64) -> u64;
    pub fn patchbay_fx_emul(x: u64) -> u64;
    pub fn patchbay_fx_bench(x: u64) -> u64;
    pub fn patchbay_fx_exit(x: u64) -> u64;
    pub fn patchbay_fx_dead(x: u64) -> u64;
    pub fn patchbay_fx_args(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, x: f64) -> u64;
    pub fn patchbay_fx_regs();
    pub fn patchbay_fx_ymm();
    pub fn patchbay_fx_list(x: u64) -> u64;
    pub fn patchbay_fx_exact(x: u64) -> u64;
    pub fn patchbay_fx_recurse(x: u64) -> u64;
    pub fn patchbay_fx_fentry(x: u64) -> u64;
    pub fn patchbay_fx_sled();
    pub fn patchbay_fx_sled_stress(x: u64) -> u64;
    pub fn patchbay_fx_sled_ctx();
    pub fn patchbay_fx_int3();
    pub fn patchbay_fx_agent(x: u64) -> u64;
    pub fn patchbay_fx_bench_rel(a: u64, b: u64) -> u64;
    pub fn patchbay_fx_bench_nop(a: u64, b: u64) -> u64;
    static patchbay_fx_bench_rel_end: u8;
    pub fn patchbay_fx_rel_stress(x: u64) -> u64;
    pub fn patchbay_fx_rel_branch(a: u64, b: u64) -> u64;
    pub fn patchbay_fx_rel_step(x: u64) -> u64;
    static patchbay_fx_rel_step_end: u8;
    pub fn patchbay_fx_rel_spin(flag: *const u8) -> u64;
    pub fn patchbay_fx_rel_dead(x: u64) -> u64;
    static patchbay_fx_rel_stress_end: u8;
    static patchbay_fx_rel_branch_end: u8;
    static patchbay_fx_rel_spin_end: u8;
    static patchbay_fx_rel_dead_end: u8;
    pub fn patchbay_fx_many(x: u64) -> u64;
    /// Safe: it reads no memory and writes only its own output word.
    pub safe fn patchbay_fx_align_cb(ctx: *const dispatch::CallCtx<'static>);
    pub static patchbay_fx_regs_out: [u64; 26];
    pub static patchbay_fx_ymm_out: [u64; 32];
    pub static patchbay_fx_fentry_hits: AtomicU64;
    pub static patchbay_fx_align_out: AtomicU64;
}

/// Number of functions at `patchbay_fx_many` (16 bytes apart).
pub const MANY_SITES: usize = 10_000;

/// Sites per trampoline slot, as in `Runtime::try_install` (a slot of count stubs must
/// fit in an arena chunk).
pub const SITES_PER_SLOT: usize = 1000;

/// Address of a fixture function.
pub fn addr(f: *const ()) -> usize {
    f as usize
}

/// SIGTRAPs from `int3` seen by the handler installed before the agent's (chaining
/// test).
pub static PREV_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);

/// `si_code` of a single-step trap (the trap flag).
const TRAP_TRACE: i32 = 2;
/// The trap flag in RFLAGS.
const TF: i64 = 0x100;

/// The nop sled that single-stepping threads stop in (0: none), see [`call_stopping`].
pub static STEP_SLED: AtomicUsize = AtomicUsize::new(0);
/// How long a stepping thread stays stopped between two nops of [`STEP_SLED`].
pub const STEP_HOLD: Duration = Duration::from_micros(200);
/// Times a stepping thread was held between two nops of the sled.
pub static STEP_HOLDS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Offset (1..=4) in [`STEP_SLED`] at which this thread stops.
    static STEP_AT: Cell<usize> = const { Cell::new(1) };
}

/// The "program's" SIGTRAP handler, installed before the agent's, which chains the
/// traps that are not its own to it: counts `int3`s ([`PREV_HANDLER_HITS`]); for a
/// single-step trap (see [`call_stepping`]) it keeps the thread stepping until it
/// reaches its stop inside [`STEP_SLED`], then clears the trap flag and sends the
/// thread SIGUSR1, delivered as soon as this handler returns, with the thread at its
/// stop: [`hold_handler`] holds it there (not this handler: a thread in a SIGTRAP
/// handler blocks SIGTRAP, and the patcher rightly refuses to patch meanwhile).
extern "C" fn prev_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel (through the agent's chaining handler) passes valid siginfo
    // and ucontext pointers to an SA_SIGINFO handler.
    let (code, uc) = unsafe { ((*info).si_code, &mut *uc.cast::<libc::ucontext_t>()) };
    if code != TRAP_TRACE {
        PREV_HANDLER_HITS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let pc = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
    let site = STEP_SLED.load(Ordering::Relaxed);
    let stop = site + STEP_AT.with(|s| s.get());
    if site != 0 && (site..stop).contains(&pc) {
        return; // one more step
    }
    if site != 0 && pc == stop {
        // SAFETY: a signal to this very thread, whose handler the test installed.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::syscall(libc::SYS_gettid),
                libc::SIGUSR1,
            )
        };
    }
    uc.uc_mcontext.gregs[libc::REG_EFL as usize] &= !TF;
}

/// A program's SIGUSR1 handler (wrapped by the agent's `sigwrap` like any) that holds
/// the thread it interrupted for [`STEP_HOLD`], spinning (as a preemption would, or a
/// long handler).
extern "C" fn hold_handler(_sig: libc::c_int) {
    STEP_HOLDS.fetch_add(1, Ordering::Relaxed);
    let t = Instant::now();
    while t.elapsed() < STEP_HOLD {
        std::hint::spin_loop();
    }
}

/// Installs [`hold_handler`] for SIGUSR1 (through the agent's interposition).
pub fn install_hold_handler() {
    // SAFETY: installing a plain handler with a valid action.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = hold_handler as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Calls `f(x)` (the fixture of [`STEP_SLED`]) with the trap flag set: the thread
/// single-steps into the function, stops between nops `stop - 1` and `stop` of the sled
/// (if it is still a sled) for [`STEP_HOLD`] in [`hold_handler`] (installed by the
/// caller), then runs on normally.
pub fn call_stepping(f: unsafe extern "C" fn(u64) -> u64, x: u64, stop: usize) -> u64 {
    assert!((1..16).contains(&stop));
    STEP_AT.with(|s| s.set(stop));
    let r: u64;
    // SAFETY: sets the trap flag right before the call (the first trap comes after the
    // `call`, at the function's entry); the SIGTRAP handler clears it on the way out of
    // the sled. `f` is a fixture of one u64 argument; caller-saved registers are
    // declared clobbered.
    unsafe {
        std::arch::asm!(
            "pushfq",
            "or qword ptr [rsp], 0x100",
            "popfq",
            "call {f}",
            f = in(reg) f as usize,
            inlateout("rdi") x => _,
            out("rax") r,
            clobber_abi("C"),
        );
    }
    r
}

/// `fs`-relative offset of `block::TLS` (what count and trace stubs read).
static TLS_OFFSET: OnceLock<i32> = OnceLock::new();

/// Prepares the process as `init::start` does (without the agent thread): installs a
/// "program" SIGTRAP handler first (the patcher chains to it), the dispatcher's TLS
/// offsets, a pool of thread blocks and the overflow block, the quiescent-state signal
/// handler; then keeps at least 16 blocks free; returns the patcher.
pub fn patcher() -> &'static Patcher {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing a valid SA_SIGINFO action for SIGTRAP, before the agent's.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = prev_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()), 0);
        }
        let (tls, nest) = block::tls_offsets().expect("static TLS in the test binary");
        dispatch::PATCHBAY_NEST_OFFSET.store(nest as i64, Ordering::Release);
        assert!(block::init_fast_tls(), "static TLS in the test binary");
        TLS_OFFSET.set(tls).expect("set once");
        refill_blocks(64);
        block::init_overflow().expect("overflow block");
        crate::hot::sigwrap::install_qs_signal(qs::default_signal())
            .expect("quiescent-state signal");
    });
    refill_blocks(16);
    Patcher::global().expect("patcher")
}

/// Makes sure at least `n` thread blocks are free in the pool. `block::refill` is the
/// agent thread's (it is not safe to run twice at once): the fixtures take turns.
pub fn refill_blocks(n: usize) {
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    block::refill(n).expect("thread blocks");
}

/// One arena for all tests.
pub fn arena() -> &'static Arena {
    static A: OnceLock<Arena> = OnceLock::new();
    A.get_or_init(Arena::new)
}

/// Counter indexes of all tests (the runtime's allocator and totals).
pub fn counters() -> MutexGuard<'static, Counters> {
    static C: LazyLock<Mutex<Counters>> = LazyLock::new(|| Mutex::new(Counters::new()));
    C.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh counter index.
pub fn alloc_counter() -> u32 {
    counters().alloc().expect("counter index")
}

/// Total of counter `idx` over every thread, live and exited (as the agent reports it).
pub fn counter_total(idx: u32) -> u64 {
    counters().total(idx)
}

/// The calling thread's value of counter `idx` (0 before it has a block).
pub fn thread_counter(idx: u32) -> u64 {
    block::current().map_or(0, |h| h.counter(idx))
}

/// A custom (program-registered) callback action.
pub fn custom(f: Callback) -> Action {
    Action::Custom {
        f: Registered::Rust(f),
    }
}

/// Records the arena's new chunks in the quiescent-state range table, as
/// `Runtime::register_ranges` does before patching: a thread whose PC is in one is not
/// quiescent, and an int3 there is the poison of a freed slot.
fn register_ranges() {
    static REGISTERED: Mutex<usize> = Mutex::new(0);
    let mut done = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    let ranges = arena().chunk_ranges();
    for &(s, e) in &ranges[(*done).min(ranges.len())..] {
        assert!(
            crate::hot::ranges::add_range(s as u64, e as u64),
            "range table full"
        );
    }
    *done = ranges.len();
}

/// A relocatable fixture function: its entry, its analysed prologue, and the bytes the
/// jump replaces.
pub struct RelFn {
    pub entry: usize,
    /// Bytes from the entry to the end label.
    pub size: usize,
    pub prologue: Prologue,
    pub original: Vec<u8>,
}

impl RelFn {
    /// The patch point (after an `endbr64`): the site.
    pub fn site(&self) -> usize {
        self.prologue.patch_at as usize
    }
}

/// Analyses a fixture function from its code in memory, as the installer does.
fn rel_fn(f: *const (), end: *const u8) -> RelFn {
    let (entry, end) = (f as usize, end as usize);
    // SAFETY: the fixture's code, from its label to its end label, in loaded text.
    let code = unsafe { std::slice::from_raw_parts(entry as *const u8, end - entry) };
    let prologue = relocate::analyze(code, entry as u64, &[]).expect("relocatable fixture");
    let at = prologue.patch_at as usize - entry;
    let original = code[at..at + prologue.len as usize].to_vec();
    RelFn {
        entry,
        size: end - entry,
        prologue,
        original,
    }
}

/// The relocatable fixtures, by name.
pub fn rel_stress() -> RelFn {
    rel_fn(
        patchbay_fx_rel_stress as *const (),
        &raw const patchbay_fx_rel_stress_end,
    )
}
pub fn rel_step() -> RelFn {
    rel_fn(
        patchbay_fx_rel_step as *const (),
        &raw const patchbay_fx_rel_step_end,
    )
}
pub fn rel_branch() -> RelFn {
    rel_fn(
        patchbay_fx_rel_branch as *const (),
        &raw const patchbay_fx_rel_branch_end,
    )
}
pub fn rel_spin() -> RelFn {
    rel_fn(
        patchbay_fx_rel_spin as *const (),
        &raw const patchbay_fx_rel_spin_end,
    )
}
pub fn rel_bench() -> RelFn {
    rel_fn(
        patchbay_fx_bench_rel as *const (),
        &raw const patchbay_fx_bench_rel_end,
    )
}
pub fn rel_dead() -> RelFn {
    rel_fn(
        patchbay_fx_rel_dead as *const (),
        &raw const patchbay_fx_rel_dead_end,
    )
}

/// A production trampoline for some fixture sites.
pub struct Tramp {
    sites: Vec<usize>,
    /// What each site calls.
    entries: Vec<usize>,
    slots: Vec<Slot>,
    desc: Box<Descriptor>,
}

impl Tramp {
    /// Builds a trampoline running `actions` for `sites` (sorted, distinct), as
    /// `Runtime::try_install` does: slots of at most [`SITES_PER_SLOT`] sites; with
    /// `stubs` (the runtime's static-TLS case) a group of one count action gets count
    /// stubs and a group of one trace action a trace stub; any other group, or any
    /// group without `stubs`, goes through the generic stub and the dispatcher.
    pub fn new(sites: &[usize], actions: Vec<Action>, stubs: bool) -> Tramp {
        Tramp::build(sites, &[], actions, stubs)
    }

    /// [`Tramp::new`] for relocated sites: one thunk per function (sorted by site),
    /// which its site jumps to ([`Tramp::entry`]).
    pub fn relocated(fns: &[&RelFn], actions: Vec<Action>, stubs: bool) -> Tramp {
        let sites: Vec<usize> = fns.iter().map(|f| f.site()).collect();
        let prologues: Vec<&Prologue> = fns.iter().map(|f| &f.prologue).collect();
        Tramp::build(&sites, &prologues, actions, stubs)
    }

    fn build(sites: &[usize], prologues: &[&Prologue], actions: Vec<Action>, stubs: bool) -> Tramp {
        patcher();
        assert!(
            sites.windows(2).all(|w| w[0] < w[1]),
            "sorted, distinct sites"
        );
        let tls = stubs.then(|| *TLS_OFFSET.get().expect("set by patcher()"));
        let count_idx: Option<Vec<u32>> = match actions.as_slice() {
            [Action::Count { idx }] => Some(idx.to_vec()),
            _ => None,
        };
        let trace = match actions.as_slice() {
            [
                Action::Trace {
                    tracer,
                    nargs,
                    dropped_idx,
                },
            ] => Some((*tracer, *nargs, *dropped_idx)),
            _ => None,
        };
        let hooks_exit = actions.iter().any(Action::hooks_exit);
        let mut desc = Box::new(Descriptor {
            live: AtomicU64::new(DESC_LIVE),
            sites: sites.iter().map(|&s| s as u64).collect(),
            actions: actions.into(),
            exit: 0,
        });
        if hooks_exit {
            crate::hot::exit::init();
            desc.exit = crate::hot::exit::register(&desc).expect("exit table entry");
        }
        let desc_ptr = &*desc as *const Descriptor as u64;
        let mut slots = Vec::new();
        let mut entries = Vec::with_capacity(sites.len());
        for (c, chunk) in sites.chunks(SITES_PER_SLOT).enumerate() {
            let idx = count_idx
                .as_ref()
                .map(|v| &v[c * SITES_PER_SLOT..c * SITES_PER_SLOT + chunk.len()]);
            let layout = match (idx, trace, tls) {
                (Some(idx), _, Some(tls_offset)) => Layout::Count { idx, tls_offset },
                (_, Some((tracer, nargs, dropped_idx)), Some(tls_offset)) => Layout::Trace {
                    tracer,
                    nargs,
                    dropped_idx,
                    tls_offset,
                },
                _ => Layout::Generic,
            };
            let window = Window::for_calls_from(chunk).expect("fixture sites share a window");
            if prologues.is_empty() {
                let code = tramp::generate(&layout, desc_ptr, dispatch::generic_entry());
                let slot = arena()
                    .alloc(window, code.len())
                    .expect("trampoline memory");
                arena()
                    .write_and_seal(&slot, &code)
                    .expect("write trampoline");
                entries
                    .extend((0..chunk.len()).map(|k| slot.addr() + tramp::site_entry(&layout, k)));
                slots.push(slot);
                continue;
            }
            let mine = &prologues[c * SITES_PER_SLOT..c * SITES_PER_SLOT + chunk.len()];
            let thunks: Vec<Thunk<'_>> = mine
                .iter()
                .enumerate()
                .map(|(index, &prologue)| Thunk { index, prologue })
                .collect();
            let lens: Vec<usize> = mine
                .iter()
                .map(|p| tramp::thunk_len(p).expect("relocatable"))
                .collect();
            let slot = arena()
                .alloc(window, tramp::slot_len_with(&layout, &lens))
                .expect("trampoline memory");
            let (code, offsets) = tramp::generate_with_thunks(
                &layout,
                desc_ptr,
                dispatch::generic_entry(),
                slot.addr() as u64,
                &thunks,
                &lens,
            )
            .expect("relocated at the slot");
            arena()
                .write_and_seal(&slot, &code)
                .expect("write trampoline");
            entries.extend(offsets.iter().map(|o| slot.addr() + o));
            slots.push(slot);
        }
        register_ranges();
        Tramp {
            sites: sites.to_vec(),
            entries,
            slots,
            desc,
        }
    }

    /// What `site` must call.
    pub fn entry(&self, site: usize) -> usize {
        let i = self
            .sites
            .binary_search(&site)
            .expect("a site of this trampoline");
        self.entries[i]
    }

    /// The batch that makes every site call this trampoline.
    pub fn call_ops(&self) -> Vec<Op> {
        self.sites
            .iter()
            .zip(&self.entries)
            .map(|(&site, &target)| Op::Call { site, target })
            .collect()
    }

    /// The batch that makes every relocated site jump to this trampoline's thunk.
    pub fn jump_ops<'a>(&self, fns: &[&'a RelFn]) -> Vec<RelocOp<'a>> {
        fns.iter()
            .map(|f| RelocOp::Jump {
                site: f.site(),
                thunk: self.entry(f.site()),
                original: &f.original,
            })
            .collect()
    }

    /// The batch that gives every relocated site its original prologue back.
    pub fn restore_ops<'a>(&self, fns: &[&'a RelFn]) -> Vec<RelocOp<'a>> {
        fns.iter()
            .map(|f| RelocOp::Restore {
                site: f.site(),
                thunk: self.entry(f.site()),
                original: &f.original,
            })
            .collect()
    }

    /// The batch that makes every site a nop again.
    pub fn nop_ops(&self) -> Vec<Op> {
        self.sites.iter().map(|&site| Op::Nop { site }).collect()
    }

    /// Retires its exit-table entry (as the runtime does when it unpatches, before the
    /// epoch bump): calls in flight drop their exits.
    pub fn retire_exits(&self) {
        if self.desc.exit != 0 {
            crate::hot::exit::retire(self.desc.exit);
        }
    }

    /// Marks the descriptor dead without freeing anything (the premature-free test).
    pub fn kill_descriptor(&self) {
        self.desc.live.store(DESC_DEAD, Ordering::Relaxed);
    }

    /// Frees the trampoline as `Runtime::authorize_free` does; the caller guarantees
    /// that no thread can run in it any more (a grace period, or every caller joined).
    /// Its slots are poisoned (checked) and its descriptor marked dead. The
    /// descriptor's memory is kept (leaked, a few bytes per test), so a thread that
    /// wrongly still uses it reads `DESC_DEAD` and dies with a premature-free report,
    /// instead of reading freed memory that may look live.
    pub fn free(self) {
        if self.desc.exit != 0 {
            crate::hot::exit::retire(self.desc.exit);
            crate::hot::exit::release(self.desc.exit);
        }
        for s in self.slots {
            let (a, l) = (s.addr(), s.len());
            arena().free(s).expect("free slot");
            assert!(arena::is_poisoned(a, l), "freed trampoline is all int3");
        }
        self.desc.live.store(DESC_DEAD, Ordering::Relaxed);
        Box::leak(self.desc);
    }
}

/// A grace period over `tids`, as the agent runs one after an unpatch: bumps the epoch
/// (the caller's unpatch batch completed, every core serialized) and observes the
/// threads (blocked in a system call, or signalled) until each has a quiescent stamp at
/// the new epoch or has exited. Fails after 10 s.
pub fn grace_period(obs: &mut Observer, tids: &BTreeSet<u32>) -> Result<(), String> {
    let e = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        obs.round(tids, e, true);
        if tids
            .iter()
            .all(|&t| obs.reported(t) >= e || !Threads::alive(t))
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("grace period at epoch {e} not over in 10 s"));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

const CHILD_ENV: &str = "PATCHBAY_PATCH_TEST_CHILD";

/// Runs test `name` (of `control::patch::tests`, or a full path) alone in a child process: `None` in that child
/// (run the test's body), the child's output in the parent. Stress tests run this way,
/// so that a premature free (which kills the process with SIGTRAP) fails that test with
/// its report instead of killing the whole test binary, and so that no other test
/// competes for thread blocks meanwhile.
pub fn in_child(name: &str) -> Option<std::process::Output> {
    if std::env::var(CHILD_ENV).is_ok_and(|v| v == name) {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setting a resource limit of this (child) process.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        return None;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            &if name.contains("::") {
                name.to_string()
            } else {
                format!("control::patch::tests::{name}")
            },
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, name)
        .output()
        .expect("run the test binary");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Some(out)
}

/// [`in_child`] for a test that must pass: true in the parent (after checking that the
/// child passed), false in the child.
pub fn passes_in_child(name: &str) -> bool {
    let Some(out) = in_child(name) else {
        return false;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} failed in its child process ({:?}); stdout:\n{stdout}",
        out.status
    );
    true
}
