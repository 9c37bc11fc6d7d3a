//! The static entry stub and the callback dispatcher. Both are part of the agent's own
//! text and are never freed: a dynamic trampoline only pushes its descriptor and jumps
//! here, so no frame of trampoline memory stays on a thread's stack while callbacks
//! run. The stub raises the thread's dispatch depth ([`block::NEST`]) before any
//! callback code runs and lowers it after, which is what the quiescent-state machinery
//! reads.
//!
//! Everything in this module runs on program threads inside traced calls: it is
//! async-signal-safe (no allocation, no locks, no system call but a one-time `gettid`,
//! no panics across the FFI boundary).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::block::{self, Header};
use super::ranges::in_trampoline;
use super::{exit, qs, ring, trap};

/// `fs`-relative offset of [`block::NEST`], set once at agent start before any
/// trampoline exists. Read by the stub.
pub static PATCHBAY_NEST_OFFSET: AtomicI64 = AtomicI64::new(0);

/// Calls that found no thread block (pool exhausted): they counted in the overflow
/// block, their trace events were dropped (and counted), custom callbacks skipped.
pub static MISSED: AtomicU64 = AtomicU64::new(0);

/// Registers saved by the stub, in memory order (lowest address first).
#[repr(C)]
pub struct Regs {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rax: u64,
}

// The entry stub passes `rbp - 72` (its nine pushes) as `&Regs`.
const _: () = assert!(std::mem::size_of::<Regs>() == 72);

impl Regs {
    /// The integer argument registers in ABI order.
    pub fn args(&self) -> [u64; 6] {
        [self.rdi, self.rsi, self.rdx, self.rcx, self.r8, self.r9]
    }
}

/// What a registered (custom) callback receives.
#[repr(C)]
pub struct CallCtx<'a> {
    /// Entry address of the traced function (its patch site).
    pub site: u64,
    /// Kernel thread id of the caller.
    pub tid: u32,
    /// Integer argument registers (rdi, rsi, rdx, rcx, r8, r9).
    pub args: &'a [u64; 6],
}

/// A callback a program registers by name. It runs inside traced calls: it must not
/// unwind, and should not block (a blocked callback holds up grace periods).
pub type Callback = fn(&CallCtx<'_>);

/// A C callback: receives a pointer to the call's context.
pub type CCallback = extern "C" fn(*const CallCtx<'static>);

/// A registered callback.
#[derive(Clone, Copy)]
pub enum Registered {
    Rust(Callback),
    C(CCallback),
}

/// One tracer of a callback group, resolved for the hot path.
pub enum Action {
    /// Bump counter `idx[site position]` of this thread.
    Count { idx: Box<[u32]> },
    /// Write an entry event with `nargs` argument registers; drops go to counter
    /// `dropped_idx`.
    Trace {
        tracer: u64,
        nargs: u32,
        dropped_idx: u32,
    },
    /// A program-registered callback.
    Custom { f: Registered },
    /// `latency`: the call's return is hooked (`hot/exit.rs`); its duration goes into
    /// the site's counters from `base[site position]` (layout `exit::lat`).
    Latency { base: Box<[u32]> },
}

impl Action {
    /// Whether the action needs the call's return hooked.
    pub fn hooks_exit(&self) -> bool {
        matches!(self, Action::Latency { .. })
    }
}

/// [`Descriptor::live`] of a descriptor in use.
pub const DESC_LIVE: u64 = 0x5041_5443_4842_4159;
/// [`Descriptor::live`] of a descriptor about to be freed.
pub const DESC_DEAD: u64 = 0xDEAD_F4EE_DEAD_F4EE;

/// Everything a trampoline's calls need; owned by the trampoline and freed with it
/// (after its grace period).
pub struct Descriptor {
    /// [`DESC_LIVE`] until the descriptor is freed ([`DESC_DEAD`] just before): a thread
    /// that finds anything else here is using a freed descriptor, i.e. its trampoline
    /// was freed while the thread could still run in it (a premature free, reported
    /// loudly like an int3 in freed trampoline memory).
    pub live: AtomicU64,
    /// Site addresses, sorted.
    pub sites: Box<[u64]>,
    pub actions: Box<[Action]>,
    /// The exit-table token of a descriptor with exit actions (`exit::register`), 0
    /// for none.
    pub exit: u64,
}

impl Descriptor {
    fn position(&self, site: u64) -> Option<usize> {
        self.sites.binary_search(&site).ok()
    }

    /// The site a call through this trampoline is for, from the return address its
    /// `call` pushed, and the site's position: `ret - 5` for a call at the site
    /// (fentry, nop), or, for the thunk of a relocated site (its `call` is in
    /// trampoline memory), the site word the thunk keeps just before its `call`.
    /// Async-signal-safe.
    #[inline]
    fn site_of(&self, ret: u64) -> Option<(usize, u64)> {
        let site = ret.wrapping_sub(5);
        if let Some(pos) = self.position(site) {
            return Some((pos, site));
        }
        if !in_trampoline(site) {
            return None;
        }
        // SAFETY: a call from trampoline memory is a thunk's (see `tramp`): the 8 bytes
        // before its `call` are its site word, in the same live slot.
        let site = unsafe {
            std::ptr::read_unaligned(site.wrapping_sub(crate::tramp::THUNK_SITE_BACK) as *const u64)
        };
        self.position(site).map(|pos| (pos, site))
    }

    /// Dies with a premature-free report unless the descriptor is live.
    /// Async-signal-safe.
    #[inline]
    fn check_live(&self) {
        if self.live.load(Ordering::Relaxed) != DESC_LIVE {
            trap::premature_free(
                b"used a freed trampoline descriptor",
                self as *const Descriptor as usize,
            );
        }
    }
}

/// The generic entry stub, in one variant per vector register width: every argument
/// register of the traced function is saved before the dispatcher runs and restored
/// after, and the argument vector registers (xmm0-7, ymm0-7 or zmm0-7) in full, since the
/// dispatcher and callbacks may call code (glibc's AVX2 `memcpy` ends with `vzeroupper`)
/// that clears their upper halves. [`generic_entry`] picks the widest the CPU and OS
/// enable, behind a check of which are in use where the CPU can tell (below).
macro_rules! entry_stub {
    ($name:literal, $size:literal, [$($save:literal),*], [$($restore:literal),*]) => {
        concat!(
            ".globl ", $name, "\n",
            ".hidden ", $name, "\n",
            ".balign 16\n",
            $name, ":\n",
            // [rsp] = descriptor, [rsp+8] = site+5 (return into the traced function)
            "push rbp\n",
            "mov rbp, rsp\n",
            "push rax\n",
            "push rdi\n",
            "push rsi\n",
            "push rdx\n",
            "push rcx\n",
            "push r8\n",
            "push r9\n",
            "push r10\n",
            "push r11\n",
            "mov r11, qword ptr [rip + {nest}]\n",
            "inc qword ptr fs:[r11]\n",
            "sub rsp, ", $size, "\n",
            "and rsp, -64\n",
            $($save, "\n",)*
            "mov rdi, qword ptr [rbp + 8]\n",
            "lea rsi, [rbp - 72]\n",
            "mov rdx, qword ptr [rbp + 16]\n",
            "call {dispatch}\n",
            $($restore, "\n",)*
            "mov r11, qword ptr [rip + {nest}]\n",
            "dec qword ptr fs:[r11]\n",
            "lea rsp, [rbp - 72]\n",
            "pop r11\n",
            "pop r10\n",
            "pop r9\n",
            "pop r8\n",
            "pop rcx\n",
            "pop rdx\n",
            "pop rsi\n",
            "pop rdi\n",
            "pop rax\n",
            "pop rbp\n",
            "lea rsp, [rsp + 8]\n",
            "ret\n",
        )
    };
}

std::arch::global_asm!(
    ".pushsection .text.patchbay_stubs,\"ax\",@progbits",
    ".balign 16",
    ".globl patchbay_stubs_start",
    ".hidden patchbay_stubs_start",
    "patchbay_stubs_start:",
    entry_stub!(
        "patchbay_generic_entry",
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
    entry_stub!(
        "patchbay_generic_entry_avx",
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
    entry_stub!(
        "patchbay_generic_entry_avx512",
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
    // On AVX-512 CPUs where XGETBV(1) tells which state components are in use (not in
    // their initial state): a program with no live upper ymm/zmm halves (most of the
    // time, as compilers end AVX code with `vzeroupper`) goes through the xmm stub, so
    // the agent never puts the AVX-512 state in use itself (that state makes every
    // context switch and signal frame of the thread larger). Bit 2: AVX (upper halves
    // of ymm0-15); bit 6: ZMM_Hi256 (upper halves of zmm0-15). A clear bit is exact
    // (the component is in its initial state: zero), a set one may be conservative.
    ".balign 16",
    ".globl patchbay_generic_entry_dyn512",
    ".hidden patchbay_generic_entry_dyn512",
    "patchbay_generic_entry_dyn512:",
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
    "jnz patchbay_generic_entry_avx",
    "jmp patchbay_generic_entry",
    "2:",
    "pop rcx",
    "pop rax",
    "jmp patchbay_generic_entry_avx512",
    ".globl patchbay_stubs_end",
    ".hidden patchbay_stubs_end",
    "patchbay_stubs_end:",
    ".popsection",
    nest = sym PATCHBAY_NEST_OFFSET,
    dispatch = sym patchbay_dispatch,
);

unsafe extern "C" {
    fn patchbay_generic_entry();
    fn patchbay_generic_entry_avx();
    fn patchbay_generic_entry_avx512();
    fn patchbay_generic_entry_dyn512();
}

/// Address of the static entry stub (jumped to by trampolines): the variant that saves
/// the widest vector registers this CPU and OS enable.
/// Agent thread only (it may allocate or lock).
pub fn generic_entry() -> u64 {
    static ENTRY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ENTRY.get_or_init(|| {
        // CPUID.(EAX=0DH, ECX=1):EAX[2]: XGETBV with ECX=1 (the in-use bitmap). Leaf
        // 0Dh exists on every CPU with XSAVE, which AVX implies; the result is only
        // used when AVX is enabled.
        let xinuse = std::arch::x86_64::__cpuid_count(0xD, 1).eax & 4 != 0;
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx = std::arch::is_x86_feature_detected!("avx");
        // Measured on the reference VM (AVX-512): always saving zmm0-7 puts the AVX-512
        // state in use and halved the torture's call throughput (larger context
        // switches and signal frames); the XGETBV check costs ~7 ns per call instead.
        // Without AVX-512, saving ymm0-7 always is cheap (~1 ns) and exact. (Saving only
        // ymm on an AVX-512 machine would zero the upper halves of zmm arguments.)
        let stub: unsafe extern "C" fn() = match (avx512, avx, xinuse) {
            (true, _, true) => patchbay_generic_entry_dyn512,
            (true, _, false) => patchbay_generic_entry_avx512,
            (false, true, _) => patchbay_generic_entry_avx,
            (false, false, _) => patchbay_generic_entry,
        };
        stub as *const () as u64
    })
}

/// Called by the stub with the trampoline's descriptor, the saved registers, and the
/// return address into the traced function (site + 5). Async-signal-safe.
extern "C" fn patchbay_dispatch(desc: *const Descriptor, regs: *const Regs, ret: u64) {
    // SAFETY: the trampoline pushed a pointer to its live descriptor; the descriptor is
    // freed only after a grace period, and this thread's NEST > 0 (raised by the stub)
    // keeps that grace period from completing while we run.
    let desc = unsafe { &*desc };
    desc.check_live();
    if block::nest_fast() >= block::IN_DISPATCH {
        // Already inside a dispatch (a callback, or the dispatcher's own calls, reached
        // a traced function), or an agent thread (whose depth is raised for good, see
        // `block::AGENT_NEST`): never traced again, so tracing the libraries the agent
        // and callbacks use cannot recurse or deadlock.
        return;
    }
    block::nest_add_fast(block::IN_DISPATCH);
    dispatch(desc, regs, ret);
    block::nest_add_fast(block::IN_DISPATCH.wrapping_neg());
    // The outermost dispatch stamps a deferred quiescent state: from here on this
    // thread touches neither the descriptor nor trampoline memory.
    if block::nest_fast() == 1
        && block::take_deferred_fast() != 0
        && let Some(h) = block::current_fast()
    {
        qs::stamp_deferred(h);
    }
}

/// The dispatch proper, with [`block::IN_DISPATCH`] raised. Async-signal-safe.
#[inline(always)]
fn dispatch(desc: &Descriptor, regs: *const Regs, ret: u64) {
    // SAFETY: the stub passes a pointer to the registers it saved on this stack.
    let regs = unsafe { &*regs };
    let Some(h) = block::current_fast().or_else(|| block::claim(crate::sys::tid())) else {
        // The pool is empty: count in the shared overflow block (atomically), so the
        // call is not lost; trace events have no ring here and count as dropped;
        // custom callbacks are skipped (see `run_overflow_actions`).
        MISSED.fetch_add(1, Ordering::Relaxed);
        if let (Some(o), Some((pos, _))) = (block::overflow(), desc.site_of(ret)) {
            run_overflow_actions(o, desc, pos);
        }
        return;
    };
    single_writer::inc_u64(&h.seq);
    single_writer::inc_u32(&h.nesting);
    if let Some((pos, site)) = desc.site_of(ret) {
        run_actions(h, desc, pos, site, regs);
        if desc.exit != 0 {
            exit::hook(h, desc, desc.exit, pos, site, ret_slot(regs));
        }
    }
    single_writer::dec_u32(&h.nesting);
    single_writer::inc_u64(&h.seq);
}

/// The stack slot of the traced function's return address: the entry stub's frame is
/// `[rbp] old rbp, [rbp+8] descriptor, [rbp+16] return into the site, [rbp+24] the
/// function's return address`, and `regs` is `rbp - 72`.
#[inline(always)]
fn ret_slot(regs: *const Regs) -> *mut u64 {
    (regs as u64 + 72 + 24) as *mut u64
}

/// [`run_actions`] for a thread without a block of its own: atomic adds only, no
/// system call. Custom callbacks are skipped: without a block, the thread's dispatch
/// depth is invisible to the blocked-in-a-syscall check, so a callback that blocked
/// here could be taken for quiescent. Async-signal-safe.
fn run_overflow_actions(o: &Header, desc: &Descriptor, pos: usize) {
    for action in desc.actions.iter() {
        match action {
            Action::Count { idx } => o.counter_add_atomic(idx[pos]),
            Action::Trace { dropped_idx, .. } => o.counter_add_atomic(*dropped_idx),
            // No shadow stack without a block: the entry is counted, not hooked.
            Action::Latency { base } => {
                o.counter_add_atomic(base[pos] + exit::lat::ENTRIES as u32);
                o.counter_add_atomic(base[pos] + exit::lat::OVERFLOW as u32);
            }
            Action::Custom { .. } => {}
        }
    }
}

fn call_custom(f: &Registered, site: u64, regs: &Regs) {
    let args = regs.args();
    let ctx = CallCtx {
        site,
        tid: crate::sys::tid(),
        args: &args,
    };
    match f {
        Registered::Rust(f) => {
            // A panicking callback must not unwind into the traced program.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&ctx))).is_err() {
                MISSED.fetch_add(1, Ordering::Relaxed);
            }
        }
        Registered::C(f) => {
            // SAFETY: the context outlives the call; C callbacks get a pointer valid
            // for the duration of the call only.
            let p = (&ctx as *const CallCtx<'_>).cast::<CallCtx<'static>>();
            f(p)
        }
    }
}

/// Increments of a thread's own `seq` and `nesting` on the hot path.
///
/// Only the owner thread writes them (the agent thread resets a block only after its
/// thread exited), so they need no locked read-modify-write (a `lock` prefix costs
/// several ns per call, four times per dispatch). Each update is one unlocked `inc`/`dec`
/// instruction on the memory operand: a signal handler on this thread (which may run
/// a nested dispatch) sees the value before or after it, never a torn or lost update.
/// Other threads read these fields only for a thread they found blocked in a system
/// call (`control::observer`'s probe around the read of
/// `/proc/self/task/TID/syscall`); a thread is
/// switched out through the scheduler's full barriers, so its stores are visible by
/// then, exactly as with the locked form. x86-64 stores are not reordered with older
/// stores, so `seq` is visible no later than the `nesting` change after it.
mod single_writer {
    use std::sync::atomic::{AtomicU32, AtomicU64};

    #[inline(always)]
    pub fn inc_u64(v: &AtomicU64) {
        // SAFETY: `v` is a valid, aligned u64 of this thread's block (single writer:
        // see the module comment); `inc` touches only it and the flags.
        unsafe { std::arch::asm!("inc qword ptr [{p}]", p = in(reg) v.as_ptr(), options(nostack)) }
    }

    #[inline(always)]
    pub fn inc_u32(v: &AtomicU32) {
        // SAFETY: as in `inc_u64`, for an aligned u32.
        unsafe { std::arch::asm!("inc dword ptr [{p}]", p = in(reg) v.as_ptr(), options(nostack)) }
    }

    #[inline(always)]
    pub fn dec_u32(v: &AtomicU32) {
        // SAFETY: as in `inc_u64`, for an aligned u32.
        unsafe { std::arch::asm!("dec dword ptr [{p}]", p = in(reg) v.as_ptr(), options(nostack)) }
    }
}

fn run_actions(h: &Header, desc: &Descriptor, pos: usize, site: u64, regs: &Regs) {
    for action in desc.actions.iter() {
        match action {
            Action::Count { idx } => {
                let i = idx[pos] as usize;
                // SAFETY: indexes are < COUNTERS (allocated by `counters.rs`); only the
                // owner thread writes its counters.
                unsafe {
                    let c = h.counters().add(i);
                    c.write_volatile(c.read_volatile() + 1);
                }
            }
            Action::Trace {
                tracer,
                nargs,
                dropped_idx,
            } => {
                let args = regs.args();
                // The block's owner is this thread: its tid without a TLS lookup.
                let tid = h.tid.load(Ordering::Relaxed);
                if !ring::push(h, *tracer, site, tid, &args, *nargs) {
                    // SAFETY: `dropped_idx` < COUNTERS (allocated by `counters.rs`); only the
                    // owner thread writes its counters.
                    unsafe {
                        let c = h.counters().add(*dropped_idx as usize);
                        c.write_volatile(c.read_volatile() + 1);
                    }
                }
            }
            // Counted at entry by `exit::hook`, measured at the return.
            Action::Latency { .. } => {}
            Action::Custom { f } => {
                call_custom(f, site, regs);
                // A callback may run long (or sleep): the descriptor must still be live.
                desc.check_live();
            }
        }
    }
}
