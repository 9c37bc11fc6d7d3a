//! In-process tests of exit hooks (issue 12): production trampolines with a `latency`
//! action, really patched into fixture functions and really returning through the
//! static return stub: durations, return registers, the shadow stack's bound,
//! frames abandoned by a `longjmp` (detected at exit and at entry), and a detach while
//! a call is in flight (its exit dropped, the thread returning through the static stub
//! after its trampoline was freed and poisoned).

use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::fixtures::*;
use crate::control::observer::Observer;
use crate::hot::block::{self, SHADOW_FRAMES};
use crate::hot::dispatch::Action;
use crate::hot::exit::{self, lat};

std::arch::global_asm!(
    ".pushsection .text.patchbay_exit_fixtures,\"ax\",@progbits",
    // fn(n) -> (3n, n): spins n iterations.
    ".p2align 4",
    ".globl patchbay_fx_lat",
    "patchbay_fx_lat:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov rcx, rdi",
    "3:",
    "test rcx, rcx",
    "jz 4f",
    "dec rcx",
    "jmp 3b",
    "4:",
    "lea rax, [rdi + 2*rdi]",
    "mov rdx, rdi",
    "ret",
    // fn(n) -> f64: n * 1.5 (xmm0), with rax clobbered.
    ".p2align 4",
    ".globl patchbay_fx_latf",
    "patchbay_fx_latf:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "cvtsi2sd xmm0, rdi",
    "mov rax, 0x3ff8000000000000",
    "movq xmm1, rax",
    "mulsd xmm0, xmm1",
    "mov rax, -1",
    "ret",
    // fn(n, jump) -> u64: calls deep(n, jump); 7 when deep jumped back here.
    ".p2align 4",
    ".globl patchbay_fx_lj_outer",
    "patchbay_fx_lj_outer:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "push rbx",
    "mov qword ptr [rip + patchbay_fx_lj_sp], rsp",
    "call patchbay_fx_lj_deep",
    "pop rbx",
    "ret",
    "patchbay_fx_lj_land:",
    "mov eax, 7",
    "pop rbx",
    "ret",
    // deep(n, jump): n == 0 ? (jump ? longjmp to outer's landing : 0) : deep(n-1) + 1.
    ".p2align 4",
    ".globl patchbay_fx_lj_deep",
    "patchbay_fx_lj_deep:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "test rdi, rdi",
    "jnz 5f",
    "test rsi, rsi",
    "jz 6f",
    "mov rsp, qword ptr [rip + patchbay_fx_lj_sp]",
    "jmp patchbay_fx_lj_land",
    "6:",
    "xor eax, eax",
    "ret",
    "5:",
    "push rbx",
    "dec rdi",
    "call patchbay_fx_lj_deep",
    "inc rax",
    "pop rbx",
    "ret",
    // fn(flag: *const u8) -> 42 once *flag != 0.
    ".p2align 4",
    ".globl patchbay_fx_xspin",
    "patchbay_fx_xspin:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "7:",
    "pause",
    "cmp byte ptr [rdi], 0",
    "je 7b",
    "mov eax, 42",
    "ret",
    // fn(f: extern "C-unwind" fn()): calls f; with unwind info, so a panic in f unwinds
    // through it.
    ".p2align 4",
    ".globl patchbay_fx_callcb",
    "patchbay_fx_callcb:",
    ".cfi_startproc",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "push rbx",
    ".cfi_adjust_cfa_offset 8",
    ".cfi_rel_offset rbx, 0",
    "call rdi",
    "pop rbx",
    ".cfi_adjust_cfa_offset -8",
    ".cfi_restore rbx",
    "mov eax, 5",
    "ret",
    ".cfi_endproc",
    ".popsection",
    ".pushsection .data.patchbay_exit_fixtures,\"aw\",@progbits",
    ".p2align 3",
    "patchbay_fx_lj_sp:",
    ".quad 0",
    ".popsection",
);

#[repr(C)]
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Two {
    a: u64,
    b: u64,
}

unsafe extern "C" {
    fn patchbay_fx_lat(n: u64) -> Two;
    fn patchbay_fx_latf(n: u64) -> f64;
    fn patchbay_fx_lj_outer(n: u64, jump: u64) -> u64;
    fn patchbay_fx_lj_deep(n: u64, jump: u64) -> u64;
    fn patchbay_fx_xspin(flag: *const u8) -> u64;
}

unsafe extern "C-unwind" {
    fn patchbay_fx_callcb(f: extern "C-unwind" fn()) -> u64;
}

extern "C-unwind" fn boom() {
    std::panic::panic_any("boom through a hooked frame");
}

extern "C-unwind" fn calm() {}

/// A Rust panic unwinds through a hooked frame (whose return address is the stub's) to
/// `catch_unwind`: the unwinder interposition restores the real return address first.
/// Without it the unwinder finds no unwind information at the stub and the process
/// aborts ("failed to initiate panic"; checked by disabling `unhook_all` in
/// `_Unwind_RaiseException`, with `RUST_BACKTRACE=0`: with backtraces on, the panic
/// hook's `_Unwind_Backtrace` restores them first).
#[test]
fn a_panic_unwinds_through_a_hooked_frame_to_catch_unwind() {
    let p = patcher();
    let site = addr(patchbay_fx_callcb as *const ());
    let (bases, t) = lat_tramp(&[site]);
    let b = bases[0];
    p.apply(&t.call_ops()).unwrap();
    for round in 1..=3u64 {
        let r = std::panic::catch_unwind(|| {
            // SAFETY: fixture function; `boom` unwinds through it (it has unwind info).
            unsafe { patchbay_fx_callcb(boom) }
        });
        let payload = r.expect_err("the panic reaches catch_unwind");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"boom through a hooked frame")
        );
        assert_eq!(shadow_depth(), 0);
        assert_eq!(mine(b, lat::ENTRIES), 2 * round - 1);
        assert_eq!(mine(b, lat::ABANDONED), round);
        // SAFETY: as above.
        assert_eq!(unsafe { patchbay_fx_callcb(calm) }, 5);
        assert_eq!(mine(b, lat::CALLS), round);
    }
    p.apply(&t.nop_ops()).unwrap();
    t.free();
}

/// A `latency` trampoline over `sites` (sorted); the counter range base of each.
fn lat_tramp(sites: &[usize]) -> (Vec<u32>, Tramp) {
    patcher();
    let bases: Vec<u32> = {
        let mut c = counters();
        sites
            .iter()
            .map(|_| c.alloc_range().expect("counters"))
            .collect()
    };
    let t = Tramp::new(
        sites,
        vec![Action::Latency {
            base: bases.clone().into(),
        }],
        false,
    );
    (bases, t)
}

/// Slot `k` of the latency range at `base`, in this thread's block.
fn mine(base: u32, k: usize) -> u64 {
    thread_counter(base + k as u32)
}

fn histogram_calls(base: u32) -> u64 {
    (0..patchbay_proto::latency::BUCKETS)
        .map(|b| mine(base, lat::BUCKET0 + b))
        .sum()
}

fn shadow_depth() -> u64 {
    block::current().map_or(0, |h| h.shadow_top.load(Ordering::Relaxed))
}

#[test]
fn latency_measures_every_call_and_returns_keep_their_registers() {
    let p = patcher();
    let mut sites = [
        addr(patchbay_fx_lat as *const ()),
        addr(patchbay_fx_latf as *const ()),
    ];
    sites.sort_unstable();
    let (bases, t) = lat_tramp(&sites);
    let base_of = |f: *const ()| bases[sites.iter().position(|&s| s == addr(f)).unwrap()];
    let (lat_b, latf_b) = (
        base_of(patchbay_fx_lat as *const ()),
        base_of(patchbay_fx_latf as *const ()),
    );
    p.apply(&t.call_ops()).unwrap();
    for n in 0..1000u64 {
        // SAFETY: fixture functions.
        let two = unsafe { patchbay_fx_lat(black_box(n)) };
        assert_eq!(two, Two { a: 3 * n, b: n }, "rax and rdx come back");
        // SAFETY: as above.
        let f = unsafe { patchbay_fx_latf(black_box(n)) };
        assert_eq!(f, n as f64 * 1.5, "xmm0 comes back");
        assert_eq!(shadow_depth(), 0);
    }
    // One long call: a million iterations of a 4-instruction loop (at most a few
    // iterations per TSC cycle, whatever the core's clock).
    // SAFETY: as above.
    assert_eq!(unsafe { patchbay_fx_lat(1_000_000) }.b, 1_000_000);
    p.apply(&t.nop_ops()).unwrap();
    assert_eq!(mine(lat_b, lat::ENTRIES), 1001);
    assert_eq!(mine(lat_b, lat::CALLS), 1001);
    assert_eq!(histogram_calls(lat_b), 1001);
    assert_eq!(mine(latf_b, lat::CALLS), 1000);
    assert_eq!(histogram_calls(latf_b), 1000);
    let max = mine(lat_b, lat::MAX);
    let min = u64::MAX - mine(lat_b, lat::MIN_INV);
    assert!(max >= 200_000, "longest call {max} cycles");
    assert!(min < 20_000, "shortest call {min} cycles");
    assert!(mine(lat_b, lat::TOTAL) >= max);
    assert_eq!(
        mine(
            lat_b,
            lat::BUCKET0 + patchbay_proto::latency::bucket_of(max)
        ),
        1,
        "the long call has its bucket to itself"
    );
    assert_eq!(mine(lat_b, lat::ABANDONED) + mine(lat_b, lat::OVERFLOW), 0);
    assert_eq!(block::NEST.with(|n| n.get()), 0);
    t.free();
}

#[inline(never)]
fn call_outer(n: u64, jump: u64) -> u64 {
    // SAFETY: fixture function (its longjmp lands in itself).
    unsafe { patchbay_fx_lj_outer(black_box(n), black_box(jump)) }
}

#[test]
fn longjmp_over_hooked_frames_abandons_them_exactly() {
    let p = patcher();
    let mut sites = [
        addr(patchbay_fx_lj_outer as *const ()),
        addr(patchbay_fx_lj_deep as *const ()),
    ];
    sites.sort_unstable();
    // 1. Outer and deep hooked: outer's return finds deep's four frames left below it.
    let (bases, t) = lat_tramp(&sites);
    let base_of = |f: *const ()| bases[sites.iter().position(|&s| s == addr(f)).unwrap()];
    let (outer, deep) = (
        base_of(patchbay_fx_lj_outer as *const ()),
        base_of(patchbay_fx_lj_deep as *const ()),
    );
    p.apply(&t.call_ops()).unwrap();
    for round in 1..=3u64 {
        assert_eq!(
            call_outer(3, 1),
            7,
            "the longjmp lands where it would untraced"
        );
        assert_eq!(shadow_depth(), 0);
        assert_eq!(mine(outer, lat::CALLS), round);
        assert_eq!(mine(deep, lat::ENTRIES), 4 * round);
        assert_eq!(mine(deep, lat::ABANDONED), 4 * round);
        assert_eq!(mine(deep, lat::CALLS), 0);
    }
    assert_eq!(call_outer(3, 0), 3);
    assert_eq!(mine(deep, lat::CALLS), 4);
    p.apply(&t.nop_ops()).unwrap();
    t.free();

    // 2. Only deep hooked: its abandoned frames are found at the next entry from the
    // same stack depth (the stack-pointer rule).
    let site = addr(patchbay_fx_lj_deep as *const ());
    let (bases, t) = lat_tramp(&[site]);
    let deep = bases[0];
    p.apply(&t.call_ops()).unwrap();
    assert_eq!(call_outer(3, 1), 7);
    assert_eq!(shadow_depth(), 4, "nothing returned through the stub yet");
    assert_eq!(mine(deep, lat::ABANDONED), 0);
    assert_eq!(call_outer(2, 0), 2);
    assert_eq!(shadow_depth(), 0);
    assert_eq!(mine(deep, lat::ABANDONED), 4);
    assert_eq!(mine(deep, lat::CALLS), 3);
    assert_eq!(mine(deep, lat::ENTRIES), 7);
    p.apply(&t.nop_ops()).unwrap();
    t.free();
}

#[test]
fn recursion_deeper_than_the_shadow_stack_is_counted_not_hooked() {
    let p = patcher();
    let site = addr(patchbay_fx_lj_deep as *const ());
    // Shares its fixture with the longjmp test: run alone in a child.
    let Some(out) = in_child(
        "control::patch::exit_tests::recursion_deeper_than_the_shadow_stack_is_counted_not_hooked",
    ) else {
        let (bases, t) = lat_tramp(&[site]);
        let b = bases[0];
        p.apply(&t.call_ops()).unwrap();
        let depth = SHADOW_FRAMES as u64 + 44;
        // SAFETY: fixture function (no jump).
        assert_eq!(unsafe { patchbay_fx_lj_deep(black_box(depth), 0) }, depth);
        assert_eq!(shadow_depth(), 0);
        assert_eq!(mine(b, lat::ENTRIES), depth + 1);
        assert_eq!(mine(b, lat::CALLS), SHADOW_FRAMES as u64);
        assert_eq!(mine(b, lat::OVERFLOW), 45);
        assert_eq!(mine(b, lat::ABANDONED), 0);
        p.apply(&t.nop_ops()).unwrap();
        t.free();
        return;
    };
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn detach_with_a_call_in_flight_returns_through_the_static_stub() {
    let Some(out) = in_child(
        "control::patch::exit_tests::detach_with_a_call_in_flight_returns_through_the_static_stub",
    ) else {
        let p = patcher();
        let site = addr(patchbay_fx_xspin as *const ());
        let (bases, t) = lat_tramp(&[site]);
        let b = bases[0];
        p.apply(&t.call_ops()).unwrap();
        static FLAG: AtomicU8 = AtomicU8::new(0);
        let (tx, rx) = std::sync::mpsc::channel();
        let th = std::thread::spawn(move || {
            tx.send(crate::sys::tid()).unwrap();
            // SAFETY: fixture function; FLAG outlives the call.
            let first = unsafe { patchbay_fx_xspin(FLAG.as_ptr()) };
            // SAFETY: as above (unpatched by now).
            let second = unsafe { patchbay_fx_xspin(FLAG.as_ptr()) };
            (
                first,
                second,
                block::current().map(|h| h.shadow_top.load(Ordering::Relaxed)),
            )
        });
        let tid = rx.recv().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while counter_total(b + lat::ENTRIES as u32) == 0 {
            assert!(Instant::now() < end, "the thread never entered");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The thread spins inside the traced function, its return hooked. Detach as the
        // runtime does: unpatch, retire the exit entry, grace period, free (poisoned).
        let orphans = exit::ORPHANED.load(Ordering::Relaxed);
        p.apply(&t.nop_ops()).unwrap();
        t.retire_exits();
        let mut obs = Observer::new();
        grace_period(&mut obs, &BTreeSet::from([tid])).expect("grace period");
        t.free();
        FLAG.store(1, Ordering::Release);
        let (first, second, depth) = th.join().unwrap();
        assert_eq!((first, second), (42, 42));
        assert_eq!(depth, Some(0));
        assert_eq!(
            exit::ORPHANED.load(Ordering::Relaxed),
            orphans + 1,
            "its exit was dropped"
        );
        return;
    };
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// ns per call of `f(0)` over `n` calls (median of 5 runs).
fn ns_per_call(f: &dyn Fn(), n: u64) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

/// Cost of a `latency` call (entry + exit hook, two TSC reads, histogram update) over
/// an untraced call, with `rdtsc` measured in the same run. A figure only in a release
/// build: `cargo test --release -p patchbay-agent --lib bench_latency -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn bench_latency_ns_per_call() {
    let p = patcher();
    let site = addr(patchbay_fx_latf as *const ());
    const N: u64 = 2_000_000;
    let call = || {
        // SAFETY: fixture function.
        black_box(unsafe { patchbay_fx_latf(black_box(1)) });
    };
    let rdtsc = ns_per_call(
        &|| {
            // SAFETY: rdtsc has no preconditions.
            black_box(unsafe { std::arch::x86_64::_rdtsc() });
        },
        N,
    );
    let plain = ns_per_call(&call, N);
    let (_, t) = lat_tramp(&[site]);
    p.apply(&t.call_ops()).unwrap();
    let traced = ns_per_call(&call, N);
    p.apply(&t.nop_ops()).unwrap();
    t.free();
    eprintln!(
        "latency bench: untraced {plain:.2} ns/call, latency {traced:.2} ns/call (+{:.2} ns, {:.1}x); rdtsc {rdtsc:.2} ns; target <= 25 ns or <= 2 x rdtsc + 8 = {:.1} ns",
        traced - plain,
        traced / plain,
        2.0 * rdtsc + 8.0
    );
}
