//! Exit hooks: the static return stub, the exit table, and the shadow-stack push and
//! pop (issue 12).
//!
//! A traced call whose trampoline has exit actions (`latency`) is hooked by the
//! dispatcher at entry ([`hook`]): the real return address, the stack slot that held it,
//! the site and a TSC stamp go on the thread's shadow stack (`block::Frame`), and the
//! slot gets the address of the return stub. The function returns into the stub (agent
//! text, never freed), which saves the return registers, finds the frame by its slot,
//! runs the exit actions and jumps to the real return address.
//!
//! A frame names its trampoline by an **exit-table token**, never by a pointer: the
//! table entry is cleared when the trampoline is retired (before the epoch bump that
//! starts its grace period), so a frame in flight across a detach finds its entry gone
//! and its exit is dropped (counted in [`ORPHANED`]); the stub never runs trampoline
//! code or reads a freed descriptor. The grace-period rules are unchanged: a thread in
//! the stub raises its dispatch depth before it reads the table, like the entry stub.
//!
//! Frames left without returning through the stub (`longjmp`, an exception or a panic
//! unwinding, a coroutine switch) are **abandoned** by the stack-pointer rule: a frame
//! whose slot is at or below a new entry's slot, or below the slot of a returning frame
//! found deeper in the shadow stack, lies in stack memory the program has left. Only
//! frames within [`SAME_STACK`] bytes of the current slot are judged so (frames of
//! another stack, e.g. a suspended coroutine's, are kept until they return). Abandoned
//! frames count in their latency tracer's `abandoned` slot.
//!
//! A call that finds the shadow stack full is traced at entry only and counted
//! (`OVERFLOW` slot).
//!
//! Everything a program thread runs here is async-signal-safe (no allocation, locks or
//! system calls; the fatal lost-frame path writes and dies like a premature free).

use std::sync::atomic::{AtomicU64, Ordering};

use super::block::{self, Frame, Header, SHADOW_FRAMES};
use super::dispatch::{Action, Descriptor};
use super::qs;

/// Layout of a `latency` tracer's counters for one site (consecutive counter indexes
/// from the site's base; every slot is summed over threads but [`lat::MIN_INV`] and
/// [`lat::MAX`], whose totals are maxima).
pub mod lat {
    /// Calls hooked at entry (including the ones the full shadow stack left unhooked).
    pub const ENTRIES: usize = 0;
    /// Calls that returned through the stub (each counted in one bucket).
    pub const CALLS: usize = 1;
    /// Sum of their durations, in TSC cycles.
    pub const TOTAL: usize = 2;
    /// `u64::MAX - shortest duration` (0: none yet), so that the total is a maximum.
    pub const MIN_INV: usize = 3;
    /// Longest duration, in cycles.
    pub const MAX: usize = 4;
    /// Frames abandoned (left by longjmp, unwinding, a context switch).
    pub const ABANDONED: usize = 5;
    /// Entries not hooked because the shadow stack was full.
    pub const OVERFLOW: usize = 6;
    /// First histogram bucket (`patchbay_proto::latency`).
    pub const BUCKET0: usize = 7;
    /// Counter slots per site.
    pub const SLOTS: usize = BUCKET0 + patchbay_proto::latency::BUCKETS;
    /// Whether the total of slot `k` is a maximum (else a sum).
    pub const fn is_max(k: usize) -> bool {
        k == MIN_INV || k == MAX
    }
}

/// Frames of another stack are never judged abandoned: a frame is compared by stack
/// pointer with the current one only when its slot lies less than this many bytes
/// below (a coroutine's or signal stack allocated farther away is kept).
pub const SAME_STACK: u64 = 256 * 1024;

/// Entries of the exit table.
pub const MAX_EXITS: usize = 4096;
/// Bit 47 of an entry: allocated (pointers of user space are below 2^47).
const ALLOCATED: u64 = 1 << 47;
const PTR_MASK: u64 = ALLOCATED - 1;

/// The exit table: per entry `generation << 48 | ALLOCATED | descriptor` (descriptor 0
/// once retired). A token is `generation << 32 | index`.
static EXITS: [AtomicU64; MAX_EXITS] = [const { AtomicU64::new(0) }; MAX_EXITS];

/// Exits dropped because their trampoline was retired while the call was in flight.
pub static ORPHANED: AtomicU64 = AtomicU64::new(0);
/// Frames abandoned whose trampoline was retired (not attributable to a tracer).
pub static ABANDONED_ORPHANS: AtomicU64 = AtomicU64::new(0);

/// Takes a free entry of the exit table for `desc` (install). Returns its token, or
/// None when the table is full. Agent thread only.
pub fn register(desc: &Descriptor) -> Option<u64> {
    let ptr = desc as *const Descriptor as u64;
    debug_assert_eq!(ptr & !PTR_MASK, 0);
    for (i, e) in EXITS.iter().enumerate() {
        let w = e.load(Ordering::Acquire);
        if w & ALLOCATED != 0 {
            continue;
        }
        let generation = ((w >> 48) + 1) & 0xFFFF;
        e.store(generation << 48 | ALLOCATED | ptr, Ordering::Release);
        return Some(generation << 32 | i as u64);
    }
    None
}

/// Retires the entry of `token` (the trampoline was unpatched; before the epoch bump):
/// frames in flight find it gone and drop their exits. Agent thread only.
pub fn retire(token: u64) {
    let e = &EXITS[(token & 0xFFFF_FFFF) as usize % MAX_EXITS];
    e.store(
        ((token >> 32) & 0xFFFF) << 48 | ALLOCATED,
        Ordering::Release,
    );
}

/// Frees the entry of `token` (the trampoline was freed: every thread was seen outside
/// the stub since [`retire`]). Agent thread only.
pub fn release(token: u64) {
    let e = &EXITS[(token & 0xFFFF_FFFF) as usize % MAX_EXITS];
    e.store(((token >> 32) & 0xFFFF) << 48, Ordering::Release);
}

/// The descriptor of a live token. The caller's dispatch depth is raised (so the
/// descriptor cannot be freed while it is used). Async-signal-safe.
#[inline]
fn lookup(token: u64) -> Option<&'static Descriptor> {
    let i = (token & 0xFFFF_FFFF) as usize;
    let w = EXITS.get(i)?.load(Ordering::Acquire);
    if w >> 48 != (token >> 32) & 0xFFFF || w & PTR_MASK == 0 {
        return None;
    }
    // SAFETY: a live entry points at the descriptor of a trampoline not yet retired; it
    // is freed only after a grace period that began after `retire` cleared the entry,
    // and this thread's raised dispatch depth holds that grace period off.
    Some(unsafe { &*((w & PTR_MASK) as *const Descriptor) })
}

/// Adds 1 to counter `idx` of the owner thread's block.
#[inline(always)]
fn bump(h: &Header, idx: usize) {
    // SAFETY: indexes come from `counters.rs` (< COUNTERS); only the owner writes.
    unsafe {
        let c = h.counters().add(idx);
        c.write_volatile(c.read_volatile() + 1);
    }
}

/// Counts an abandoned frame in its tracers, or as an orphan.
fn abandon(h: &Header, f: &Frame) {
    match lookup(f.token) {
        Some(desc) => {
            for a in desc.actions.iter() {
                if let Action::Latency { base } = a
                    && let Some(&b) = base.get(f.pos as usize)
                {
                    bump(h, b as usize + lat::ABANDONED);
                }
            }
        }
        None => {
            ABANDONED_ORPHANS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Hooks the return of a call at entry: called by the dispatcher (dispatch depth
/// raised, `h` this thread's block) after the entry actions, for a trampoline with
/// exit actions. `slot` is the stack slot of the traced function's return address.
/// Async-signal-safe.
#[inline]
pub fn hook(h: &Header, desc: &Descriptor, token: u64, pos: usize, site: u64, slot: *mut u64) {
    let frames = h.shadow();
    let mut top = h.shadow_top.load(Ordering::Relaxed) as usize;
    let s = slot as u64;
    // The stack-pointer rule: frames at or below this entry's slot were left.
    while top > 0 {
        // SAFETY: top <= SHADOW_FRAMES; the owner thread's shadow stack.
        let f = unsafe { &*frames.add(top - 1) };
        if f.slot <= s && s - f.slot < SAME_STACK {
            abandon(h, f);
            top -= 1;
        } else {
            break;
        }
    }
    if top >= SHADOW_FRAMES {
        h.shadow_top.store(top as u64, Ordering::Relaxed);
        for a in desc.actions.iter() {
            if let Action::Latency { base } = a {
                bump(h, base[pos] as usize + lat::ENTRIES);
                bump(h, base[pos] as usize + lat::OVERFLOW);
            }
        }
        return;
    }
    for a in desc.actions.iter() {
        if let Action::Latency { base } = a {
            bump(h, base[pos] as usize + lat::ENTRIES);
        }
    }
    // SAFETY: `slot` is the return-address slot of the traced call on this thread's
    // stack (computed by the dispatcher from the entry stub's frame).
    let ret = unsafe { slot.read() };
    // SAFETY: top < SHADOW_FRAMES.
    unsafe {
        frames.add(top).write(Frame {
            ret,
            slot: s,
            tsc: 0,
            site,
            token,
            pos: pos as u64,
        })
    };
    h.shadow_top.store(top as u64 + 1, Ordering::Relaxed);
    // SAFETY: as above; the stub's address replaces the return address.
    unsafe { slot.write(return_stub()) };
    // Last: the function's time starts here.
    // SAFETY: as above.
    unsafe { (*frames.add(top)).tsc = rdtsc() };
}

/// Frames of the current stack are restored by [`unhook_all`] up to this far above the
/// caller (the default thread stack size).
pub const RESTORE_SPAN: u64 = 8 << 20;

/// Gives every hooked frame of this thread's current stack its real return address back
/// and drops it from the shadow stack, counted as abandoned (an unwinder is about to
/// walk the stack: it must see the real return addresses, and the frames it unwinds
/// never return through the stub). `sp` is the caller's stack pointer: frames whose
/// slot lies above it (within [`RESTORE_SPAN`]) are live and restored; frames below it
/// on this stack were left before. Frames of other stacks are kept. Called on the
/// program's thread from the unwinder interposition (`interpose::unwind`), outside any
/// dispatch. Async-signal-safe.
pub fn unhook_all(sp: u64) {
    let Some(h) = block::current_fast() else {
        return;
    };
    if block::nest_fast() >= block::IN_DISPATCH {
        // Inside a dispatch (a callback unwinding inside itself): no frame of this
        // dispatch is hooked, and the shadow stack is being changed below us.
        return;
    }
    block::nest_add_fast(block::IN_DISPATCH);
    let frames = h.shadow();
    let top = h.shadow_top.load(Ordering::Relaxed) as usize;
    let stub = return_stub();
    let mut w = 0;
    for j in 0..top {
        // SAFETY: j < top <= SHADOW_FRAMES; the owner thread's shadow stack.
        let f = unsafe { *frames.add(j) };
        let live_here = f.slot > sp && f.slot - sp < RESTORE_SPAN;
        let left_here = f.slot <= sp && sp - f.slot < SAME_STACK;
        if live_here {
            // SAFETY: the slot lies on this thread's current stack above its stack
            // pointer (a live frame's return-address slot).
            unsafe {
                let p = f.slot as *mut u64;
                if p.read_volatile() == stub {
                    p.write_volatile(f.ret);
                }
            }
            abandon(h, &f);
        } else if left_here {
            abandon(h, &f);
        } else {
            // SAFETY: w <= j < top.
            unsafe { frames.add(w).write(f) };
            w += 1;
        }
    }
    h.shadow_top.store(w as u64, Ordering::Relaxed);
    block::nest_add_fast(block::IN_DISPATCH.wrapping_neg());
}

#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// Registers the return stub saved, in memory order (lowest address first).
#[repr(C)]
pub struct RetRegs {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rax: u64,
}

const _: () = assert!(std::mem::size_of::<RetRegs>() == 72);

/// Called by the return stub with the slot the traced function returned from and the
/// saved registers (`vec`: xmm0 first); returns the real return address. The stub has
/// raised `NEST` by 1. Async-signal-safe.
extern "C" fn patchbay_exit(slot: u64, _regs: *const RetRegs, _vec: *const u8) -> u64 {
    let now = rdtsc();
    block::nest_add_fast(block::IN_DISPATCH);
    let Some(h) = block::current_fast() else {
        lost(slot);
    };
    dispatch_seq(h, true);
    let frames = h.shadow();
    let top = h.shadow_top.load(Ordering::Relaxed) as usize;
    let mut i = top;
    let found = loop {
        if i == 0 {
            break None;
        }
        i -= 1;
        // SAFETY: i < top <= SHADOW_FRAMES; the owner thread's shadow stack.
        let f = unsafe { *frames.add(i) };
        if f.slot == slot {
            break Some(f);
        }
    };
    let Some(f) = found else {
        lost(slot);
    };
    // Frames above it: those of this stack below the slot were left (longjmp,
    // unwinding); others (another stack's) are kept, moved down.
    let mut w = i;
    for j in i + 1..top {
        // SAFETY: j < top.
        let g = unsafe { *frames.add(j) };
        if g.slot < slot && slot - g.slot < SAME_STACK {
            abandon(h, &g);
        } else {
            // SAFETY: w < j < top.
            unsafe { frames.add(w).write(g) };
            w += 1;
        }
    }
    h.shadow_top.store(w as u64, Ordering::Relaxed);
    match lookup(f.token) {
        Some(desc) => run_exit_actions(h, desc, &f, now.wrapping_sub(f.tsc)),
        None => {
            ORPHANED.fetch_add(1, Ordering::Relaxed);
        }
    }
    dispatch_seq(h, false);
    block::nest_add_fast(block::IN_DISPATCH.wrapping_neg());
    if block::nest_fast() == 1 && block::take_deferred_fast() != 0 {
        qs::stamp(h);
    }
    f.ret
}

/// The dispatch bracket of the block (seq, nesting) read by the blocked-thread probe.
#[inline(always)]
fn dispatch_seq(h: &Header, enter: bool) {
    // Single writer (the owner thread): see dispatch.rs `single_writer`.
    h.seq
        .store(h.seq.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    let n = h.nesting.load(Ordering::Relaxed);
    h.nesting
        .store(if enter { n + 1 } else { n - 1 }, Ordering::Relaxed);
}

fn run_exit_actions(h: &Header, desc: &Descriptor, f: &Frame, cycles: u64) {
    for a in desc.actions.iter() {
        if let Action::Latency { base } = a
            && let Some(&b) = base.get(f.pos as usize)
        {
            let c = h.counters();
            let b = b as usize;
            // SAFETY: b + SLOTS <= COUNTERS (a range of `counters.rs`); owner only.
            unsafe {
                let p = c.add(b + lat::CALLS);
                p.write_volatile(p.read_volatile() + 1);
                let p = c.add(b + lat::TOTAL);
                p.write_volatile(p.read_volatile().wrapping_add(cycles));
                let p = c.add(b + lat::MIN_INV);
                let inv = u64::MAX - cycles;
                if p.read_volatile() < inv {
                    p.write_volatile(inv);
                }
                let p = c.add(b + lat::MAX);
                if p.read_volatile() < cycles {
                    p.write_volatile(cycles);
                }
                let p = c.add(b + lat::BUCKET0 + patchbay_proto::latency::bucket_of(cycles));
                p.write_volatile(p.read_volatile() + 1);
            }
        }
    }
}

/// No frame for a return through the stub: the real return address is lost, the
/// thread cannot continue. Never happens unless a frame was wrongly judged abandoned.
fn lost(slot: u64) -> ! {
    super::trap::premature_free(
        b"returned through the exit stub with no shadow frame",
        slot as usize,
    );
    // SAFETY: abort is async-signal-safe; premature_free does not return in practice.
    unsafe { libc::abort() }
}

/// The static return stub, one variant per vector register width (as the entry stub:
/// code the exit path calls may clear upper halves). It saves every register a return
/// may carry a value in or a caller may rely on (rax, rdx, rcx, rsi, rdi, r8-r11,
/// vector 0-7), raises `NEST`, calls [`patchbay_exit`] and returns to the address it
/// gives back through the slot the traced function's `ret` popped.
macro_rules! return_stub {
    ($name:literal, $size:literal, [$($save:literal),*], [$($restore:literal),*]) => {
        concat!(
            ".globl ", $name, "\n",
            ".hidden ", $name, "\n",
            ".balign 16\n",
            $name, ":\n",
            // rsp = slot + 8: the slot becomes the real return address's place.
            "sub rsp, 8\n",
            "push rbp\n",
            "mov rbp, rsp\n",
            "push rax\n",
            "push rdx\n",
            "push rcx\n",
            "push rsi\n",
            "push rdi\n",
            "push r8\n",
            "push r9\n",
            "push r10\n",
            "push r11\n",
            "mov r11, qword ptr [rip + {nest}]\n",
            "inc qword ptr fs:[r11]\n",
            "sub rsp, ", $size, "\n",
            "and rsp, -64\n",
            $($save, "\n",)*
            "lea rdi, [rbp + 8]\n",
            "lea rsi, [rbp - 72]\n",
            "mov rdx, rsp\n",
            "call {exit}\n",
            "mov qword ptr [rbp + 8], rax\n",
            $($restore, "\n",)*
            "mov r11, qword ptr [rip + {nest}]\n",
            "dec qword ptr fs:[r11]\n",
            "lea rsp, [rbp - 72]\n",
            "pop r11\n",
            "pop r10\n",
            "pop r9\n",
            "pop r8\n",
            "pop rdi\n",
            "pop rsi\n",
            "pop rcx\n",
            "pop rdx\n",
            "pop rax\n",
            "pop rbp\n",
            "ret\n",
        )
    };
}

// Its own section, outside the entry stubs' range (`ranges::stub_range`): a thread
// in the return stub before it raised `NEST` is quiescent (it reads no trampoline
// memory or descriptor before that).
std::arch::global_asm!(
    ".pushsection .text.patchbay_return,\"ax\",@progbits",
    return_stub!(
        "patchbay_return",
        "128",
        [
            "movdqu xmmword ptr [rsp], xmm0",
            "movdqu xmmword ptr [rsp + 16], xmm1",
            "movdqu xmmword ptr [rsp + 32], xmm2",
            "movdqu xmmword ptr [rsp + 48], xmm3",
            "movdqu xmmword ptr [rsp + 64], xmm4",
            "movdqu xmmword ptr [rsp + 80], xmm5",
            "movdqu xmmword ptr [rsp + 96], xmm6",
            "movdqu xmmword ptr [rsp + 112], xmm7"
        ],
        [
            "movdqu xmm0, xmmword ptr [rsp]",
            "movdqu xmm1, xmmword ptr [rsp + 16]",
            "movdqu xmm2, xmmword ptr [rsp + 32]",
            "movdqu xmm3, xmmword ptr [rsp + 48]",
            "movdqu xmm4, xmmword ptr [rsp + 64]",
            "movdqu xmm5, xmmword ptr [rsp + 80]",
            "movdqu xmm6, xmmword ptr [rsp + 96]",
            "movdqu xmm7, xmmword ptr [rsp + 112]"
        ]
    ),
    return_stub!(
        "patchbay_return_avx",
        "256",
        [
            "vmovdqu ymmword ptr [rsp], ymm0",
            "vmovdqu ymmword ptr [rsp + 32], ymm1",
            "vmovdqu ymmword ptr [rsp + 64], ymm2",
            "vmovdqu ymmword ptr [rsp + 96], ymm3",
            "vmovdqu ymmword ptr [rsp + 128], ymm4",
            "vmovdqu ymmword ptr [rsp + 160], ymm5",
            "vmovdqu ymmword ptr [rsp + 192], ymm6",
            "vmovdqu ymmword ptr [rsp + 224], ymm7"
        ],
        [
            "vmovdqu ymm0, ymmword ptr [rsp]",
            "vmovdqu ymm1, ymmword ptr [rsp + 32]",
            "vmovdqu ymm2, ymmword ptr [rsp + 64]",
            "vmovdqu ymm3, ymmword ptr [rsp + 96]",
            "vmovdqu ymm4, ymmword ptr [rsp + 128]",
            "vmovdqu ymm5, ymmword ptr [rsp + 160]",
            "vmovdqu ymm6, ymmword ptr [rsp + 192]",
            "vmovdqu ymm7, ymmword ptr [rsp + 224]"
        ]
    ),
    return_stub!(
        "patchbay_return_avx512",
        "512",
        [
            "vmovdqu64 zmmword ptr [rsp], zmm0",
            "vmovdqu64 zmmword ptr [rsp + 64], zmm1",
            "vmovdqu64 zmmword ptr [rsp + 128], zmm2",
            "vmovdqu64 zmmword ptr [rsp + 192], zmm3",
            "vmovdqu64 zmmword ptr [rsp + 256], zmm4",
            "vmovdqu64 zmmword ptr [rsp + 320], zmm5",
            "vmovdqu64 zmmword ptr [rsp + 384], zmm6",
            "vmovdqu64 zmmword ptr [rsp + 448], zmm7"
        ],
        [
            "vmovdqu64 zmm0, zmmword ptr [rsp]",
            "vmovdqu64 zmm1, zmmword ptr [rsp + 64]",
            "vmovdqu64 zmm2, zmmword ptr [rsp + 128]",
            "vmovdqu64 zmm3, zmmword ptr [rsp + 192]",
            "vmovdqu64 zmm4, zmmword ptr [rsp + 256]",
            "vmovdqu64 zmm5, zmmword ptr [rsp + 320]",
            "vmovdqu64 zmm6, zmmword ptr [rsp + 384]",
            "vmovdqu64 zmm7, zmmword ptr [rsp + 448]"
        ]
    ),
    // As `patchbay_generic_entry_dyn512`: the zmm variant only while AVX-512 state is
    // in use (XGETBV(1) bit 6), else ymm (bit 2) or xmm. Runs before any register is
    // saved, so it preserves rax/rcx/rdx itself, below the slot (rsp = slot + 8).
    ".balign 16",
    ".globl patchbay_return_dyn512",
    ".hidden patchbay_return_dyn512",
    "patchbay_return_dyn512:",
    "sub rsp, 8",
    "push rax",
    "push rcx",
    "push rdx",
    "mov ecx, 1",
    "xgetbv",
    "mov ecx, eax",
    "pop rdx",
    "test ecx, 0x40",
    "jnz 2f",
    "test ecx, 0x04",
    "pop rcx",
    "pop rax",
    "lea rsp, [rsp + 8]",
    "jnz patchbay_return_avx",
    "jmp patchbay_return",
    "2:",
    "pop rcx",
    "pop rax",
    "lea rsp, [rsp + 8]",
    "jmp patchbay_return_avx512",
    ".popsection",
    nest = sym super::dispatch::PATCHBAY_NEST_OFFSET,
    exit = sym patchbay_exit,
);

unsafe extern "C" {
    fn patchbay_return();
    fn patchbay_return_avx();
    fn patchbay_return_avx512();
    fn patchbay_return_dyn512();
}

/// The return stub's address, the variant for this CPU (set by [`init`]; the xmm one
/// until then). Async-signal-safe.
static RETURN_STUB: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
fn return_stub() -> u64 {
    let a = RETURN_STUB.load(Ordering::Relaxed);
    if a != 0 {
        a
    } else {
        patchbay_return as *const () as u64
    }
}

/// Picks the return stub variant as `dispatch::generic_entry` picks the entry stub's.
/// Agent thread only (before the first exit hook).
pub fn init() {
    let xinuse = std::arch::x86_64::__cpuid_count(0xD, 1).eax & 4 != 0;
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    let avx = std::arch::is_x86_feature_detected!("avx");
    let stub: unsafe extern "C" fn() = match (avx512, avx, xinuse) {
        (true, _, true) => patchbay_return_dyn512,
        (true, _, false) => patchbay_return_avx512,
        (false, true, _) => patchbay_return_avx,
        (false, false, _) => patchbay_return,
    };
    RETURN_STUB.store(stub as *const () as u64, Ordering::Relaxed);
}
