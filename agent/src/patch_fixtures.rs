//! Test fixtures: functions with patchable entries, defined in assembly so their first
//! bytes are exactly known, and a shared test set-up.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::codegen::Code;
use crate::control::arena::{Arena, Slot, Window};
use crate::patch::Patcher;

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
    // fn(u64) -> u64 { x + 2 }, for the list dispatcher and the helper-mode tests.
    ".p2align 4",
    ".globl patchbay_fx_list",
    "patchbay_fx_list:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "lea rax, [rdi + 2]",
    "ret",
    ".p2align 4",
    ".globl patchbay_fx_helper",
    "patchbay_fx_helper:",
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
    // A foreign int3 (not a site): must reach the previous SIGTRAP handler.
    ".p2align 4",
    ".globl patchbay_fx_int3",
    "patchbay_fx_int3:",
    "int3",
    "ret",
    // Callback (ctx, data: *mut u64): stores rsp % 16 at entry (8 when the caller
    // aligned the stack to 16 before its call).
    ".p2align 4",
    ".globl patchbay_fx_align_cb",
    "patchbay_fx_align_cb:",
    "mov rax, rsp",
    "and rax, 15",
    "mov [rsi], rax",
    "ret",
    ".popsection",
    ".pushsection .data.patchbay_fixtures,\"aw\",@progbits",
    ".p2align 4",
    ".globl patchbay_fx_regs_out",
    "patchbay_fx_regs_out:",
    ".zero 208",
    ".globl patchbay_fx_fentry_hits",
    "patchbay_fx_fentry_hits:",
    ".quad 0",
    ".popsection",
);

unsafe extern "C" {
    pub fn patchbay_fx_stress(x: u64) -> u64;
    pub fn patchbay_fx_emul(x: u64) -> u64;
    pub fn patchbay_fx_bench(x: u64) -> u64;
    pub fn patchbay_fx_exit(x: u64) -> u64;
    pub fn patchbay_fx_args(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, x: f64) -> u64;
    pub fn patchbay_fx_regs();
    pub fn patchbay_fx_list(x: u64) -> u64;
    pub fn patchbay_fx_helper(x: u64) -> u64;
    pub fn patchbay_fx_recurse(x: u64) -> u64;
    pub fn patchbay_fx_fentry(x: u64) -> u64;
    pub fn patchbay_fx_sled();
    pub fn patchbay_fx_sled_stress(x: u64) -> u64;
    pub fn patchbay_fx_sled_ctx();
    pub fn patchbay_fx_int3();
    pub fn patchbay_fx_many(x: u64) -> u64;
    pub fn patchbay_fx_align_cb(ctx: *const crate::codegen::CallCtx, data: usize);
    pub static patchbay_fx_regs_out: [u64; 26];
    pub static patchbay_fx_fentry_hits: AtomicU64;
}

/// Number of functions at `patchbay_fx_many` (16 bytes apart).
pub const MANY_SITES: usize = 10_000;

/// Address of a fixture function.
pub fn addr(f: *const ()) -> usize {
    f as usize
}

/// SIGTRAPs seen by the handler installed before the agent's (chaining test).
pub static PREV_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);

extern "C" fn prev_handler(_sig: libc::c_int, _info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    PREV_HANDLER_HITS.fetch_add(1, Ordering::Relaxed);
}

/// Installs a "program" SIGTRAP handler, then the patcher (which chains to it).
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
    });
    crate::tls::init().expect("tls init");
    Patcher::global().expect("patcher")
}

/// One arena for all tests.
pub fn arena() -> &'static Arena {
    static A: std::sync::OnceLock<Arena> = std::sync::OnceLock::new();
    A.get_or_init(Arena::new)
}

/// Installs `code` in a slot reachable from `site`.
pub fn install_for(site: usize, code: &Code) -> Slot {
    arena()
        .install(Window::for_call_from(site), code)
        .expect("install trampoline")
}
