//! In-process tests of patching, the trap handler and trampolines: every trampoline
//! here is a production one (count stubs, trace stub, or the generic stub through the
//! static entry stub and the dispatcher; see `fixtures::Tramp`), really executed
//! through a patched fixture function.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::fixtures::*;
use super::relocated::RelocOp;
use super::*;
use crate::control::drain as ring;
use crate::control::observer::Observer;
use crate::hot::block;
use crate::hot::dispatch::{Action, CallCtx};
use crate::hot::qs::EPOCH;

fn site_of(f: *const ()) -> usize {
    addr(f)
}

fn bytes_at(site: usize) -> [u8; 5] {
    // SAFETY: fixture functions are mapped text.
    unsafe { read_site(site) }
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// A count trampoline of one site: count stubs (`stubs`) or the generic stub.
fn count_tramp(site: usize, stubs: bool) -> (u32, Tramp) {
    let idx = alloc_counter();
    let t = Tramp::new(&[site], vec![Action::Count { idx: [idx].into() }], stubs);
    (idx, t)
}

// ---------------------------------------------------------------- the stress test

/// What the stress test's site calls, in its phase word.
const UNPATCHED: u64 = 0;
const COUNT_STUB: u64 = 1;
const TRACE_STUB: u64 = 2;
const GENERIC: u64 = 3;

/// What one call through the stress site does for each target: (count increments,
/// events written, custom callback runs).
fn effect(kind: u64) -> (u64, u64, u64) {
    match kind {
        UNPATCHED => (0, 0, 0),
        COUNT_STUB => (1, 0, 0),
        TRACE_STUB => (0, 1, 0),
        _ => (1, 1, 1),
    }
}

/// Phase word: `seq << 5 | stable << 4 | from << 2 | to`.
fn phase(seq: u64, from: u64, to: u64) -> u64 {
    seq << 5 | u64::from(from == to) << 4 | from << 2 | to
}

static STRESS_FAILED: Mutex<Option<String>> = Mutex::new(None);
static STRESS_STOP: AtomicBool = AtomicBool::new(false);

fn stress_fail(msg: String) {
    STRESS_FAILED.lock().unwrap().get_or_insert(msg);
    STRESS_STOP.store(true, Ordering::SeqCst);
}

thread_local! {
    /// The argument of the call in progress on this thread (stress workers).
    static EXPECT_ARG: Cell<u64> = const { Cell::new(0) };
    static CUSTOM_RUNS: Cell<u64> = const { Cell::new(0) };
}

/// The site the stress test patches (its custom callback checks it).
static STRESS_SITE: AtomicU64 = AtomicU64::new(0);

/// The stress group's custom callback: checks what it is given, counts its runs, and
/// every 4th run yields the CPU three times (a callback that sleeps): threads are often
/// descheduled inside a dispatch, also after a quiescent-state signal was handled there
/// (a free that does not wait for them is then caught by the descriptor check after
/// the callback).
fn stress_custom(ctx: &CallCtx<'_>) {
    let site = STRESS_SITE.load(Ordering::Relaxed);
    if ctx.site != site || ctx.args[0] != EXPECT_ARG.get() || ctx.tid != crate::sys::tid() {
        stress_fail(format!(
            "custom callback saw site {:#x} arg {} tid {}",
            ctx.site, ctx.args[0], ctx.tid
        ));
    }
    let n = CUSTOM_RUNS.get() + 1;
    CUSTOM_RUNS.set(n);
    if n.is_multiple_of(4) {
        for _ in 0..3 {
            std::thread::yield_now();
        }
    }
}

/// The patcher, the trap handler, the three kinds of trampolines and their life cycle,
/// under fire. 4 threads (twice the cores of the reference VM, so they are often
/// preempted mid-call) call one fixture in a loop while the main thread, for
/// `CYCLES` cycles, patches the site to a fresh trampoline, retargets it to a fresh
/// one of another kind (call to call), and unpatches it; the kinds rotate through
/// count stub, trace stub and generic stub (a count + trace + custom group through
/// the dispatcher). Each trampoline that lost its sites is retired like the runtime
/// does it: epoch bump, a real grace period (the `Observer`, signals and all), then
/// freed (slots poisoned, descriptor dead), and the memory is reused only after every
/// thread has completed a call since (so a thread wrongly left inside runs into the
/// poison or the dead descriptor: FATAL premature free).
///
/// Each thread checks every call: the result; what the call did (counter delta,
/// events in its own ring, custom runs) is exactly one target's effect, the current
/// one in a stable phase and the old or the new one in a transition; every event
/// carries the right site, tracer, tid and argument. Totals: the counter's total is
/// the sum of the deltas; no event was dropped.
///
/// Guards: freeing only after a grace period (NEST raised by the entry stub, deferred
/// stamps, trampoline ranges known to the signal handler) and the int3 protocol (a
/// thread executing a half-written site dies or computes garbage): broken by hand, each
/// was caught in every run, within a second; the stubs' and the dispatcher's exact
/// effects; the trap handler's emulation (also checked deterministically by
/// `int3_emulation_at_every_stage`; here the workers hit sites in transition dozens of
/// times in 60 cycles, a few times in 20). Not caught: skipping the core serialization
/// (`membarrier`), which this hardware does not need in practice. Sized to 60 cycles
/// or 3 s (at least 20 cycles) on the 2-core VM; the old test made 80 M calls.
#[test]
fn stress_patch_retarget_unpatch_free_while_threads_call() {
    if passes_in_child("stress_patch_retarget_unpatch_free_while_threads_call") {
        return;
    }
    stress_cycles(false);
}

/// The same for a relocated prologue (`endbr64`, then two moved instructions, one of
/// them RIP-relative): installed over the prologue with a grace period (the real
/// `Observer`) while the threads call, moved from thunk to thunk, restored; every
/// result, count and event (naming the patch point) checked as above.
#[test]
fn stress_relocate_move_restore_free_while_threads_call() {
    if passes_in_child("stress_relocate_move_restore_free_while_threads_call") {
        return;
    }
    stress_cycles(true);
}

fn stress_cycles(reloc: bool) {
    const THREADS: usize = 4;
    // 60 cycles, or fewer (at least 20) past 3 s on a loaded machine.
    const CYCLES: usize = 60;
    const MIN_CYCLES: usize = 20;
    const BUDGET: Duration = Duration::from_secs(3);
    const TRACER: u64 = 0x7ace;
    static PHASE: AtomicU64 = AtomicU64::new(0);
    static CALLS: [AtomicU64; THREADS] = [const { AtomicU64::new(0) }; THREADS];
    static STABLE_CALLS: AtomicU64 = AtomicU64::new(0);

    let p = patcher();
    refill_blocks(THREADS + 8);
    let rel = reloc.then(rel_stress);
    let site = rel
        .as_ref()
        .map_or(site_of(patchbay_fx_stress as *const ()), |f| f.site());
    let func: unsafe extern "C" fn(u64) -> u64 = if reloc {
        patchbay_fx_rel_stress
    } else {
        patchbay_fx_stress
    };
    let original = bytes_n(site, rel.as_ref().map_or(5, |f| f.original.len()));
    STRESS_SITE.store(site as u64, Ordering::Relaxed);
    let count_idx = alloc_counter();
    let dropped_idx = alloc_counter();
    let traps_before = crate::hot::trap::stats();
    let (tx, rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let tid = crate::sys::tid();
                let h = block::claim(tid).expect("a free thread block");
                tx.send(tid).unwrap();
                let (mut counted, mut events, mut stable, mut ambiguous) = (0u64, 0u64, 0u64, 0u64);
                let mut x = t as u64;
                while !STRESS_STOP.load(Ordering::Relaxed) {
                    let p1 = PHASE.load(Ordering::SeqCst);
                    let (c1, u1) = (h.counter(count_idx), CUSTOM_RUNS.get());
                    EXPECT_ARG.set(x);
                    // SAFETY: the fixture is a plain function of one u64.
                    let r = unsafe { func(black_box(x)) };
                    let p2 = PHASE.load(Ordering::SeqCst);
                    let dc = h.counter(count_idx).wrapping_sub(c1);
                    let du = CUSTOM_RUNS.get() - u1;
                    let mut de = 0;
                    let mut bad_event = None;
                    ring::drain(h, |e| {
                        de += 1;
                        if e.site != site as u64
                            || e.tracer != TRACER
                            || e.tid != tid
                            || e.nargs != 1
                            || e.args[0] != x
                        {
                            bad_event = Some(e);
                        }
                    });
                    let got = (dc, de, du);
                    let valid = [UNPATCHED, COUNT_STUB, TRACE_STUB, GENERIC].map(effect);
                    let bad = if r != x + 1 {
                        Some(format!("wrong result {r} for {x}"))
                    } else if let Some(e) = bad_event {
                        Some(format!("bad event {e:?} for {x}"))
                    } else if !valid.contains(&got) {
                        Some(format!("one call did {got:?} (phases {p1:#x}..{p2:#x})"))
                    } else if p1 == p2 && p1 & 16 != 0 && got != effect(p1 & 3) {
                        Some(format!("call in stable phase {p1:#x} did {got:?}"))
                    } else if p1 == p2 && got != effect(p1 & 3) && got != effect(p1 >> 2 & 3) {
                        Some(format!("call in transition {p1:#x} did {got:?}"))
                    } else {
                        None
                    };
                    if let Some(msg) = bad {
                        stress_fail(format!("thread {t}: {msg}"));
                        break;
                    }
                    if p1 == p2 && p1 & 16 != 0 {
                        stable += 1;
                        STABLE_CALLS.fetch_add(1, Ordering::Relaxed);
                    } else {
                        ambiguous += 1;
                    }
                    counted += dc;
                    events += de;
                    CALLS[t].fetch_add(1, Ordering::Release);
                    x = x.wrapping_add(1) & 0xffff_ffff;
                }
                (counted, events, stable, ambiguous)
            })
        })
        .collect();
    let tids: BTreeSet<u32> = (0..THREADS).map(|_| rx.recv().unwrap()).collect();

    let end = deadline(60);
    // Some calls land in the current phase, and after a free every thread completes
    // at least two calls (so none is still inside code that was freed before).
    let wait_progress = |freed: bool| {
        let start: Vec<u64> = CALLS.iter().map(|c| c.load(Ordering::Acquire)).collect();
        let stable = STABLE_CALLS.load(Ordering::Relaxed);
        while freed
            && CALLS
                .iter()
                .zip(&start)
                .any(|(c, s)| c.load(Ordering::Acquire) < s + 2)
            || STABLE_CALLS.load(Ordering::Relaxed) < stable + 8
        {
            if STRESS_STOP.load(Ordering::SeqCst) {
                return;
            }
            assert!(Instant::now() < end, "no progress before the deadline");
            std::thread::yield_now();
        }
    };
    let build = |kind: u64| {
        let count = || Action::Count {
            idx: [count_idx].into(),
        };
        let trace = || Action::Trace {
            tracer: TRACER,
            nargs: 1,
            dropped_idx,
        };
        let actions = match kind {
            COUNT_STUB => vec![count()],
            TRACE_STUB => vec![trace()],
            _ => vec![count(), trace(), custom(stress_custom)],
        };
        match &rel {
            Some(f) => Tramp::relocated(&[f], actions, kind != GENERIC),
            None => Tramp::new(&[site], actions, kind != GENERIC),
        }
    };
    let mut obs = Observer::new();
    let mut current: Option<(u64, Tramp)> = None;
    let mut seq = 0;
    let mut worst_grace = Duration::ZERO;
    let kinds = [COUNT_STUB, TRACE_STUB, GENERIC];
    let started = Instant::now();
    let mut cycles = 0;
    'cycles: for i in 0..CYCLES {
        if i >= MIN_CYCLES && started.elapsed() > BUDGET {
            break;
        }
        cycles += 1;
        for next in [Some(kinds[i % 3]), Some(kinds[(i + 1) % 3]), None] {
            if STRESS_STOP.load(Ordering::SeqCst) {
                break 'cycles;
            }
            let from = current.as_ref().map_or(UNPATCHED, |c| c.0);
            let to = next.unwrap_or(UNPATCHED);
            let new = next.map(build);
            seq += 1;
            PHASE.store(phase(seq, from, to), Ordering::SeqCst);
            let changed = if let Some(f) = &rel {
                let op = match (&new, &current) {
                    (Some(t), _) => RelocOp::Jump {
                        site,
                        thunk: t.entry(site),
                        original: &f.original,
                    },
                    (None, Some((_, old))) => RelocOp::Restore {
                        site,
                        thunk: old.entry(site),
                        original: &f.original,
                    },
                    (None, None) => unreachable!("a cycle ends with the site patched"),
                };
                match p.relocate(&[op], &mut || grace_period(&mut obs, &tids)) {
                    Ok(r) => r.changed,
                    Err(e) => {
                        stress_fail(format!("relocate: {e}"));
                        break 'cycles;
                    }
                }
            } else {
                let op = match &new {
                    Some(t) => Op::Call {
                        site,
                        target: t.entry(site),
                    },
                    None => Op::Nop { site },
                };
                p.apply(&[op]).unwrap().changed
            };
            assert_eq!(changed, 1);
            PHASE.store(phase(seq, to, to), Ordering::SeqCst);
            let freed = current.is_some();
            if let Some((_, old)) = current.take() {
                let t = Instant::now();
                if let Err(e) = grace_period(&mut obs, &tids) {
                    stress_fail(e);
                    break 'cycles;
                }
                worst_grace = worst_grace.max(t.elapsed());
                old.free();
            }
            current = new.map(|t| (to, t));
            wait_progress(freed);
        }
    }
    STRESS_STOP.store(true, Ordering::SeqCst);
    let results: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    if let Some(msg) = STRESS_FAILED.lock().unwrap().take() {
        panic!("{msg}");
    }
    if let Some((_, t)) = current.take() {
        match &rel {
            Some(f) => {
                p.relocate(&t.restore_ops(&[f]), &mut || Ok(())).unwrap();
            }
            None => {
                p.apply(&t.nop_ops()).unwrap();
            }
        }
        t.free(); // every caller has been joined
    }
    let counted: u64 = results.iter().map(|r| r.0).sum();
    let events: u64 = results.iter().map(|r| r.1).sum();
    let stable: u64 = results.iter().map(|r| r.2).sum();
    let ambiguous: u64 = results.iter().map(|r| r.3).sum();
    let total = counter_total(count_idx);
    let traps = crate::hot::trap::stats();
    eprintln!(
        "stress: {cycles} cycles (patch, retarget, unpatch, 2 grace periods and frees; worst \
         grace period {worst_grace:?}): counted {total} = observed {counted}, {events} \
         events; {stable} calls in stable phases, {ambiguous} ambiguous; traps emulated: \
         {} calls, {} nops and jumps, {} restarts; {} signals; {} threads moved out of \
         the prologue",
        traps.emulated_calls - traps_before.emulated_calls,
        traps.emulated_nops - traps_before.emulated_nops,
        traps.restarted - traps_before.restarted,
        obs.signals,
        crate::hot::stats::snapshot().reloc_exits,
    );
    assert_eq!(
        total, counted,
        "global count equals the sum of per-call deltas"
    );
    assert_eq!(counter_total(dropped_idx), 0, "no event dropped");
    assert!(events > 0 && stable > 0);
    assert_eq!(
        bytes_n(site, original.len()),
        original,
        "unpatched site has its original bytes"
    );
}

/// Executes the site at every stage of the protocol, while it holds `0xCC`: the trap
/// handler emulates the call (patching, and retargeting from a count-stub trampoline
/// to a generic one) or the nop (unpatching).
#[test]
fn int3_emulation_at_every_stage() {
    let p = patcher();
    let site = site_of(patchbay_fx_emul as *const ());
    let (a, ta) = count_tramp(site, true);
    let (b, tb) = count_tramp(site, false);
    let before = crate::hot::trap::stats();
    let mut seen = Vec::new();
    let mut probe = |st: Stage| {
        let first = bytes_at(site)[0];
        let (a0, b0) = (thread_counter(a), thread_counter(b));
        // SAFETY: plain fixture function.
        let r = unsafe { patchbay_fx_emul(black_box(41)) };
        seen.push((st, first, thread_counter(a) - a0, thread_counter(b) - b0, r));
    };
    p.apply_observed(&ta.call_ops(), &mut probe).unwrap();
    p.apply_observed(&tb.call_ops(), &mut probe).unwrap();
    p.apply_observed(&tb.nop_ops(), &mut probe).unwrap();
    use Stage::*;
    assert_eq!(
        seen,
        vec![
            (Int3Written, 0xCC, 1, 0, 42),
            (TailWritten, 0xCC, 1, 0, 42),
            (FirstByteWritten, 0xE8, 1, 0, 42),
            (Int3Written, 0xCC, 0, 1, 42),
            (TailWritten, 0xCC, 0, 1, 42),
            (FirstByteWritten, 0xE8, 0, 1, 42),
            (Int3Written, 0xCC, 0, 0, 42),
            (TailWritten, 0xCC, 0, 0, 42),
            (FirstByteWritten, 0x0F, 0, 0, 42),
        ]
    );
    let after = crate::hot::trap::stats();
    assert!(after.emulated_calls >= before.emulated_calls + 4);
    assert!(after.emulated_nops >= before.emulated_nops + 2);
    assert_eq!(
        crate::hot::trap::transition(site),
        Some(crate::hot::trap::Transition::Idle)
    );
    assert_eq!((counter_total(a), counter_total(b)), (3, 3));
    ta.free();
    tb.free();
}

// ------------------------------------------------- the generic stub and the dispatcher

/// What the recording callback saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Seen {
    args: [u64; 6],
    site: u64,
    tid: u32,
    nesting: u32,
    nest: u64,
}
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

fn record(ctx: &CallCtx<'_>) {
    SEEN.lock().unwrap().push(Seen {
        args: *ctx.args,
        site: ctx.site,
        tid: ctx.tid,
        nesting: block::current().map_or(0, |h| h.nesting.load(Ordering::Relaxed)),
        nest: block::NEST.with(|n| n.get()),
    });
}

/// Clobbers every register a SysV callee may clobber, and the upper halves of the
/// vector registers (`vzeroupper`, as glibc's AVX2 string functions end).
fn trash(_ctx: &CallCtx<'_>) {
    // SAFETY: only caller-saved registers are written, declared via clobber_abi.
    unsafe {
        std::arch::asm!(
            "mov rdi, -1",
            "mov rsi, -1",
            "mov rdx, -1",
            "mov rcx, -1",
            "mov r8, -1",
            "mov r9, -1",
            "mov rax, -1",
            "mov r10, -1",
            "mov r11, -1",
            "pcmpeqd xmm0, xmm0",
            "pcmpeqd xmm1, xmm1",
            "pcmpeqd xmm2, xmm2",
            "pcmpeqd xmm3, xmm3",
            "pcmpeqd xmm4, xmm4",
            "pcmpeqd xmm5, xmm5",
            "pcmpeqd xmm6, xmm6",
            "pcmpeqd xmm7, xmm7",
            "pcmpeqd xmm8, xmm8",
            "pcmpeqd xmm15, xmm15",
            clobber_abi("C"),
        );
    }
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is available; vzeroupper only clears caller-saved vector state.
        unsafe { std::arch::asm!("vzeroupper", clobber_abi("C")) };
    }
}

/// Calls `patchbay_fx_regs` with chosen values in every register it stores.
fn call_regs() -> [u64; 26] {
    use std::arch::x86_64::_mm_set_epi64x;
    // SAFETY: calls the fixture with chosen register values; the fixture only writes
    // its output area; all caller-saved registers are declared clobbered.
    unsafe {
        std::arch::asm!(
            "call {f}",
            f = in(reg) patchbay_fx_regs as *const () as usize,
            in("rdi") 0x11u64, in("rsi") 0x22u64, in("rdx") 0x33u64, in("rcx") 0x44u64,
            in("r8") 0x55u64, in("r9") 0x66u64, in("rax") 0x77u64, in("r10") 0x88u64,
            in("r11") 0x99u64,
            in("xmm0") _mm_set_epi64x(0x101, 0x100), in("xmm1") _mm_set_epi64x(0x111, 0x110),
            in("xmm2") _mm_set_epi64x(0x121, 0x120), in("xmm3") _mm_set_epi64x(0x131, 0x130),
            in("xmm4") _mm_set_epi64x(0x141, 0x140), in("xmm5") _mm_set_epi64x(0x151, 0x150),
            in("xmm6") _mm_set_epi64x(0x161, 0x160), in("xmm7") _mm_set_epi64x(0x171, 0x170),
            clobber_abi("C"),
        );
        std::ptr::read_volatile(&raw const patchbay_fx_regs_out)
    }
}

/// Calls `patchbay_fx_ymm` with chosen values in all of ymm0-7 (AVX CPUs only).
fn call_ymm() -> [u64; 32] {
    let src: [u64; 32] = std::array::from_fn(|i| 0x1000 + i as u64);
    // SAFETY: the caller checked AVX; loads ymm0-7 from `src` and calls the fixture,
    // which only writes its output area; all caller-saved registers are declared
    // clobbered (clobber_abi covers the full vector registers).
    unsafe {
        std::arch::asm!(
            "vmovdqu ymm0, [{s}]",
            "vmovdqu ymm1, [{s} + 32]",
            "vmovdqu ymm2, [{s} + 64]",
            "vmovdqu ymm3, [{s} + 96]",
            "vmovdqu ymm4, [{s} + 128]",
            "vmovdqu ymm5, [{s} + 160]",
            "vmovdqu ymm6, [{s} + 192]",
            "vmovdqu ymm7, [{s} + 224]",
            "call {f}",
            s = in(reg) src.as_ptr(),
            f = in(reg) patchbay_fx_ymm as *const () as usize,
            clobber_abi("C"),
        );
        std::ptr::read_volatile(&raw const patchbay_fx_ymm_out)
    }
}

/// The generic stub and the dispatcher pass the arguments, site and tid to callbacks,
/// with the thread's nesting and `NEST` raised and the stack aligned; every register
/// the traced function may read (argument registers, rax, r10, r11, xmm0-7, and ymm0-7
/// in full on AVX CPUs) survives callbacks that clobber them, through each kind of
/// trampoline (count stub, trace stub, generic stub).
#[test]
fn trampolines_preserve_registers_and_callbacks_see_args() {
    let p = patcher();
    let site = site_of(patchbay_fx_args as *const ());
    let idx = alloc_counter();
    let dropped_idx = alloc_counter();
    let group = |sites: usize| {
        vec![
            custom(record),
            custom(trash),
            Action::Custom {
                f: crate::hot::dispatch::Registered::C(patchbay_fx_align_cb),
            },
            Action::Count {
                idx: vec![idx; sites].into(),
            },
            Action::Trace {
                tracer: 77,
                nargs: 6,
                dropped_idx,
            },
        ]
    };
    let t = Tramp::new(&[site], group(1), true);
    SEEN.lock().unwrap().clear();
    p.apply(&t.call_ops()).unwrap();
    // SAFETY: plain fixture function.
    let r = unsafe { patchbay_fx_args(1, 2, 3, 4, 5, 6, black_box(7.9)) };
    p.apply(&t.nop_ops()).unwrap();
    assert_eq!(r, 1 + 4 + 9 + 16 + 25 + 36 + 49);
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![Seen {
            args: [1, 2, 3, 4, 5, 6],
            site: site as u64,
            tid: crate::sys::tid(),
            nesting: 1,
            nest: 1 + block::IN_DISPATCH,
        }]
    );
    assert_eq!(
        // SAFETY: the fixture's output word, only accessed atomically.
        unsafe { patchbay_fx_align_out.load(Ordering::SeqCst) },
        8,
        "rsp % 16 == 8 at callback entry"
    );
    assert_eq!(thread_counter(idx), 1);
    let h = block::current().expect("the dispatcher gave this thread a block");
    let mut events = Vec::new();
    ring::drain(h, |e| events.push(e));
    assert_eq!(events.len(), 1);
    assert_eq!(
        (
            events[0].site,
            events[0].tracer,
            events[0].tid,
            events[0].args
        ),
        (site as u64, 77, crate::sys::tid(), [1, 2, 3, 4, 5, 6])
    );
    assert_eq!(h.nesting.load(Ordering::Relaxed), 0);
    assert_eq!(block::NEST.with(|n| n.get()), 0);
    t.free();

    // Every register the function may read survives each kind of trampoline.
    let want: Vec<u64> = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0]
        .into_iter()
        .chain((0..8).flat_map(|i| [0x100 + 0x10 * i, 0x101 + 0x10 * i]))
        .collect();
    assert_eq!(call_regs().to_vec(), want, "untraced");
    let avx = std::arch::is_x86_feature_detected!("avx");
    let ymm_want: Vec<u64> = (0..32).map(|i| 0x1000 + i).collect();
    if avx {
        assert_eq!(call_ymm().to_vec(), ymm_want, "untraced");
    }
    let rsite = site_of(patchbay_fx_regs as *const ());
    let ysite = site_of(patchbay_fx_ymm as *const ());
    let count_group = || {
        vec![Action::Count {
            idx: [idx, idx].into(),
        }]
    };
    let trace_group = || {
        vec![Action::Trace {
            tracer: 78,
            nargs: 6,
            dropped_idx,
        }]
    };
    let calls = if avx { 2 } else { 1 };
    for (name, actions) in [
        ("count stub", count_group()),
        ("trace stub", trace_group()),
        ("generic stub", group(2)),
    ] {
        let t = Tramp::new(&[rsite.min(ysite), rsite.max(ysite)], actions, true);
        p.apply(&t.call_ops()).unwrap();
        SEEN.lock().unwrap().clear();
        let c0 = thread_counter(idx);
        let traced = call_regs();
        let ymm = avx.then(call_ymm);
        p.apply(&t.nop_ops()).unwrap();
        t.free();
        let mut events = 0;
        ring::drain(h, |_| events += 1);
        let ran = match name {
            "count stub" => thread_counter(idx) - c0,
            "trace stub" => events,
            _ => SEEN.lock().unwrap().len() as u64,
        };
        assert_eq!(ran, calls, "{name}: the trampoline ran");
        assert_eq!(traced.to_vec(), want, "{name}");
        if let Some(ymm) = ymm {
            assert_eq!(ymm.to_vec(), ymm_want, "{name}: ymm0-7 in full");
        }
    }
    assert_eq!(counter_total(dropped_idx), 0);
}

/// The group-order test's counter and fixture site.
static ORDER_IDX: AtomicU32 = AtomicU32::new(0);
/// (callback, this thread's counter, its ring head) at each custom callback.
static ORDER: Mutex<Vec<(usize, u64, u64)>> = Mutex::new(Vec::new());

fn push_order<const N: usize>(_ctx: &CallCtx<'_>) {
    let h = block::current().expect("inside a dispatch");
    ORDER.lock().unwrap().push((
        N,
        h.counter(ORDER_IDX.load(Ordering::Relaxed)),
        h.ring_head.load(Ordering::Relaxed),
    ));
}

/// The dispatcher runs a group's actions in order, whatever their kinds, and a
/// callback that clobbers registers in the middle changes nothing for the others or
/// for the traced function.
#[test]
fn dispatcher_runs_a_group_in_order() {
    let p = patcher();
    let idx = alloc_counter();
    let dropped_idx = alloc_counter();
    ORDER_IDX.store(idx, Ordering::Relaxed);
    let site = site_of(patchbay_fx_list as *const ());
    let t = Tramp::new(
        &[site],
        vec![
            custom(push_order::<0>),
            custom(push_order::<1>),
            Action::Count { idx: [idx].into() },
            custom(push_order::<2>),
            custom(trash),
            Action::Trace {
                tracer: 5,
                nargs: 1,
                dropped_idx,
            },
            custom(push_order::<4>),
            custom(push_order::<5>),
        ],
        true,
    );
    p.apply(&t.call_ops()).unwrap();
    ORDER.lock().unwrap().clear();
    // SAFETY: plain fixture function.
    let r = unsafe { patchbay_fx_list(black_box(40)) };
    p.apply(&t.nop_ops()).unwrap();
    t.free();
    assert_eq!(r, 42);
    let h = block::current().expect("the dispatcher gave this thread a block");
    let head = h.ring_head.load(Ordering::Relaxed);
    let order = ORDER.lock().unwrap().clone();
    assert_eq!(
        order,
        vec![
            (0, 0, head - 1),
            (1, 0, head - 1),
            (2, 1, head - 1),
            (4, 1, head),
            (5, 1, head),
        ]
    );
    let mut events = Vec::new();
    ring::drain(h, |e| events.push((e.tracer, e.args[0])));
    assert_eq!(events, vec![(5, 40)]);
}

/// Counts are exact whatever the path, from threads that have no block yet (their
/// first call takes a count stub's slow path into the generic stub, where the
/// dispatcher claims a block): count stubs, and a count through the generic stub (the
/// runtime's choice when the agent's TLS is not static).
#[test]
fn counts_through_stubs_and_dispatcher_are_exact_across_threads() {
    let p = patcher();
    let site = site_of(patchbay_fx_exact as *const ());
    for stubs in [true, false] {
        refill_blocks(8);
        let (idx, t) = count_tramp(site, stubs);
        p.apply(&t.call_ops()).unwrap();
        let hs: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    assert!(block::current().is_none(), "a new thread has no block");
                    for i in 0..1000 * (t + 1) {
                        // SAFETY: plain fixture function.
                        assert_eq!(unsafe { patchbay_fx_exact(black_box(i)) }, i + 2);
                    }
                    assert_eq!(block::NEST.with(|n| n.get()), 0);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        p.apply(&t.nop_ops()).unwrap();
        t.free();
        assert_eq!(
            counter_total(idx),
            1000 + 2000 + 3000 + 4000,
            "stubs: {stubs}"
        );
    }
}

static RECURSE_CALLS: AtomicU64 = AtomicU64::new(0);
/// (nesting, NEST, this thread's stamp) seen by the callback at each depth, and the
/// stamp after the nested call returned.
static RECURSE_SEEN: Mutex<Vec<(u32, u64, u64)>> = Mutex::new(Vec::new());

fn recurse(_ctx: &CallCtx<'_>) {
    let h = block::current().expect("inside a dispatch");
    let depth = RECURSE_CALLS.fetch_add(1, Ordering::SeqCst);
    RECURSE_SEEN.lock().unwrap().push((
        h.nesting.load(Ordering::Relaxed),
        block::NEST.with(|n| n.get()),
        h.qs_epoch.load(Ordering::Relaxed),
    ));
    if depth == 0 {
        // The quiescent-state signal lands now: inside a dispatch, it is deferred.
        // SAFETY: a zeroed ucontext_t is a valid value; the handler only reads its RIP.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        crate::hot::qs::on_signal((&raw mut uc).cast());
        // SAFETY: plain fixture function (traced: a nested dispatch).
        let r = unsafe { patchbay_fx_recurse(black_box(1)) };
        assert_eq!(r, 3);
        RECURSE_SEEN.lock().unwrap().push((
            h.nesting.load(Ordering::Relaxed),
            block::NEST.with(|n| n.get()),
            h.qs_epoch.load(Ordering::Relaxed),
        ));
    }
}

/// A callback that calls a traced function does not trace it again: the nested call
/// goes through the entry stub but the dispatcher runs nothing for a thread already
/// inside a dispatch (`block::IN_DISPATCH`) (no recursion: the agent and callbacks call libc, which
/// may be traced). A quiescent-state signal deferred inside is stamped only when the
/// outermost dispatch leaves, not when the nested one does. Fails with the guard
/// removed (the callback runs twice, the count is 2).
#[test]
fn callback_calling_a_traced_function_is_not_traced_again() {
    let p = patcher();
    let site = site_of(patchbay_fx_recurse as *const ());
    let idx = alloc_counter();
    let t = Tramp::new(
        &[site],
        vec![custom(recurse), Action::Count { idx: [idx].into() }],
        true,
    );
    p.apply(&t.call_ops()).unwrap();
    // A thread with a block, not stamped at the new epoch yet.
    let h = block::current()
        .or_else(|| block::claim(crate::sys::tid()))
        .expect("a thread block");
    let e = EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
    let before = h.qs_epoch.load(Ordering::Relaxed);
    assert!(before < e);
    // SAFETY: plain fixture function.
    let r = unsafe { patchbay_fx_recurse(black_box(5)) };
    p.apply(&t.nop_ops()).unwrap();
    t.free();
    assert_eq!(r, 7);
    assert_eq!(RECURSE_CALLS.load(Ordering::SeqCst), 1, "not traced again");
    assert_eq!(
        *RECURSE_SEEN.lock().unwrap(),
        vec![
            (1, 1 + block::IN_DISPATCH, before),
            (1, 1 + block::IN_DISPATCH, before)
        ],
        "no stamp before the outermost dispatch left"
    );
    assert!(
        h.qs_epoch.load(Ordering::Relaxed) >= e,
        "stamped on the way out"
    );
    assert_eq!(block::DEFERRED.with(|d| d.get()), 0);
    assert_eq!(block::NEST.with(|n| n.get()), 0);
    assert_eq!(h.nesting.load(Ordering::Relaxed), 0);
    assert_eq!(counter_total(idx), 1);
}

/// A dispatch through a descriptor whose trampoline was freed (its live word says
/// dead) is a premature free: reported on stderr, and the process dies by SIGTRAP.
/// Runs in a child process.
#[test]
fn dispatch_through_a_dead_descriptor_is_a_fatal_premature_free() {
    use std::os::unix::process::ExitStatusExt;
    let name = "dispatch_through_a_dead_descriptor_is_a_fatal_premature_free";
    let Some(out) = in_child(name) else {
        let p = patcher();
        let site = site_of(patchbay_fx_dead as *const ());
        let (_, t) = count_tramp(site, false);
        p.apply(&t.call_ops()).unwrap();
        // SAFETY: plain fixture function: it runs through the trampoline.
        assert_eq!(unsafe { patchbay_fx_dead(black_box(1)) }, 2);
        t.kill_descriptor();
        // SAFETY: as above; the dispatcher finds the descriptor dead and kills us.
        unsafe { patchbay_fx_dead(black_box(1)) };
        std::process::exit(3);
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTRAP),
        "child status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(crate::hot::trap::POISON_MARKER)
            && stderr.contains("used a freed trampoline descriptor"),
        "{stderr}"
    );
}

/// `call __fentry__` sites become nops with the same protocol, can be traced, and bad
/// batches are refused without changing anything.
#[test]
fn fentry_call_becomes_nop_and_bad_batches_change_nothing() {
    let p = patcher();
    let site = site_of(patchbay_fx_fentry as *const ());
    let sled = site_of(patchbay_fx_sled as *const ());
    let int3 = site_of(patchbay_fx_int3 as *const ());
    let hits = || {
        // SAFETY: the fixture's counter, only accessed atomically.
        unsafe { patchbay_fx_fentry_hits.load(Ordering::SeqCst) }
    };
    let call = |x| {
        // SAFETY: plain fixture function.
        unsafe { patchbay_fx_fentry(black_box(x)) }
    };
    let original = bytes_at(site);
    assert!(matches!(
        classify_bytes(site, original),
        SiteKind::Call { .. }
    ));
    let h0 = hits();
    assert_eq!(call(1), 4);
    assert_eq!(hits(), h0 + 1);

    // Refused batches: nothing written.
    assert_eq!(
        p.apply(&[
            Op::Nop { site },
            Op::Call {
                site: sled,
                target: site
            }
        ]),
        Err(PatchError::Unsupported { site: sled })
    );
    assert_eq!(
        p.apply(&[Op::Nop { site }, Op::Nop { site }]),
        Err(PatchError::Duplicate { site })
    );
    assert!(matches!(
        p.apply(&[Op::Nop { site }, Op::Nop { site: int3 }]),
        Err(PatchError::NotASite { .. })
    ));
    assert_eq!(
        p.apply(&[Op::Call {
            site,
            target: site + (3 << 30)
        }]),
        Err(PatchError::OutOfReach {
            site,
            target: site + (3 << 30)
        })
    );
    assert_eq!(bytes_at(site), original);
    assert_eq!(call(1), 4);
    assert_eq!(hits(), h0 + 2);

    // Turn the fentry call into a nop.
    assert_eq!(p.apply(&[Op::Nop { site }]).unwrap().changed, 1);
    assert_eq!(bytes_at(site), NOP5);
    assert_eq!(call(2), 5);
    assert_eq!(hits(), h0 + 2);
    assert_eq!(p.apply(&[Op::Nop { site }]).unwrap().unchanged, 1);

    // Trace it (count stub), then detach.
    let (idx, t) = count_tramp(site, true);
    p.apply(&t.call_ops()).unwrap();
    for i in 0..10 {
        assert_eq!(call(i), i + 3);
    }
    p.apply(&t.nop_ops()).unwrap();
    t.free();
    assert_eq!(bytes_at(site), NOP5);
    assert_eq!(counter_total(idx), 10);
    assert_eq!(hits(), h0 + 2);
}

/// A foreign int3 (not a site) reaches the handler that was installed before ours.
#[test]
fn foreign_int3_is_chained_to_previous_handler() {
    patcher();
    let before = PREV_HANDLER_HITS.load(Ordering::SeqCst);
    // SAFETY: `int3; ret`: the previous handler counts and returns past the int3.
    unsafe { patchbay_fx_int3() };
    assert_eq!(PREV_HANDLER_HITS.load(Ordering::SeqCst), before + 1);
}

/// With no earlier handler (SIG_DFL), a foreign int3 still kills the process with
/// SIGTRAP. Runs itself in a child process.
#[test]
fn foreign_int3_with_default_action_kills_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let Some(out) = in_child("foreign_int3_with_default_action_kills_the_process") else {
        Patcher::global().unwrap();
        // SAFETY: `int3; ret` with the default action: the process dies here.
        unsafe { patchbay_fx_int3() };
        std::process::exit(3);
    };
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTRAP),
        "child status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Counts of threads that exited are kept, through block recycling: each round's
/// threads exit, their blocks' counts are folded and the blocks returned to the pool
/// (what `Runtime::scan_threads` does for threads that are gone), and the next round's
/// threads take them again. Runs in a child process (exact pool accounting).
#[test]
fn counts_of_exited_threads_are_kept() {
    if passes_in_child("counts_of_exited_threads_are_kept") {
        return;
    }
    let p = patcher();
    let site = site_of(patchbay_fx_exit as *const ());
    let (idx, t) = count_tramp(site, true);
    p.apply(&t.call_ops()).unwrap();
    refill_blocks(8);
    let free = block::free_blocks();
    let mut expected = 0;
    for round in 0..5u64 {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..(100 * round + t) {
                        // SAFETY: plain fixture function.
                        unsafe { patchbay_fx_exit(black_box(i)) };
                    }
                    crate::sys::tid()
                })
            })
            .collect();
        let gone: BTreeSet<u32> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        expected += (0..4).map(|t| 100 * round + t).sum::<u64>();
        assert_eq!(
            counter_total(idx),
            expected,
            "round {round}, before folding"
        );
        let mut c = counters();
        for h in block::all() {
            if gone.contains(&h.tid.load(Ordering::Acquire)) {
                c.fold_exited_block(h);
            }
        }
        drop(c);
        assert_eq!(counter_total(idx), expected, "round {round}, after folding");
        assert_eq!(
            block::free_blocks(),
            free,
            "every block came back to the pool"
        );
    }
    p.apply(&t.nop_ops()).unwrap();
    t.free();
}

/// Best of 3 runs of `n` calls on each of `threads` threads at once, in ns per call.
fn ns_per_call(n: u64, threads: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        refill_blocks(threads + 2);
        let barrier = std::sync::Barrier::new(threads);
        let ns = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t = Instant::now();
                        let mut x = 0u64;
                        for _ in 0..n {
                            // SAFETY: plain fixture function.
                            x = unsafe { patchbay_fx_bench(black_box(x)) };
                        }
                        black_box(x);
                        t.elapsed().as_nanos() as f64 / n as f64
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0.0, f64::max)
        });
        best = best.min(ns);
    }
    best
}

/// Prints ns/call untraced, through a count stub and through the generic stub and the
/// dispatcher (run with `--nocapture`; best of 3; in this debug build the dispatcher is
/// unoptimized: the release figures are the README's Performance tables), and checks
/// that every count is exact with one and two threads calling at once.
#[test]
fn bench_count_ns_per_call() {
    let p = patcher();
    let site = site_of(patchbay_fx_bench as *const ());
    let n = 200_000;
    let mut line = String::new();
    for threads in [1, 2] {
        refill_blocks(threads + 4);
        let untraced = ns_per_call(n, threads);
        let measure = |stubs: bool| {
            let (idx, t) = count_tramp(site, stubs);
            p.apply(&t.call_ops()).unwrap();
            let ns = ns_per_call(n, threads);
            p.apply(&t.nop_ops()).unwrap();
            t.free();
            assert_eq!(counter_total(idx), 3 * n * threads as u64, "stubs: {stubs}");
            ns
        };
        let stub = measure(true);
        let generic = measure(false);
        line += &format!(
            "\n  {threads} thread(s): untraced {untraced:.2}; count stub {stub:.2} (+{:.2}); \
             count through the dispatcher {generic:.2} (+{:.2})",
            stub - untraced,
            generic - untraced,
        );
    }
    eprintln!("ns/call, best of 3:{line}");
}

/// 10,000 sites patched and unpatched in one batch each (DESIGN target: < 50 ms),
/// with count stubs in slots of 1,000 sites as the runtime lays them out; each site
/// counts in its own counter.
#[test]
fn batch_of_10000_sites() {
    let p = patcher();
    let base = site_of(patchbay_fx_many as *const ());
    let sites: Vec<usize> = (0..MANY_SITES).map(|i| base + 16 * i).collect();
    let idx: Vec<u32> = (0..MANY_SITES).map(|_| alloc_counter()).collect();
    let t = Tramp::new(
        &sites,
        vec![Action::Count {
            idx: idx.clone().into(),
        }],
        true,
    );
    let tm = Instant::now();
    assert_eq!(p.apply(&t.call_ops()).unwrap().changed, MANY_SITES);
    let patch_ms = tm.elapsed().as_secs_f64() * 1e3;
    for (k, &site) in sites.iter().enumerate() {
        // SAFETY: each site starts a fixture function of one u64.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(site) };
        for _ in 0..k % 3 {
            assert_eq!(f(black_box(1)), 2);
        }
    }
    let tm = Instant::now();
    assert_eq!(p.apply(&t.nop_ops()).unwrap().changed, MANY_SITES);
    let unpatch_ms = tm.elapsed().as_secs_f64() * 1e3;
    assert!(sites.iter().all(|&s| bytes_at(s) == NOP5));
    t.free();
    let mut c = counters();
    for (k, &i) in idx.iter().enumerate() {
        assert_eq!(c.free(i), (k % 3) as u64, "site {k}");
    }
    drop(c);
    eprintln!("{MANY_SITES} sites: patch {patch_ms:.1} ms, unpatch {unpatch_ms:.1} ms");
}

#[test]
fn sigblk_parsing() {
    let st = "Name:\tx\nSigPnd:\t0000000000000000\nSigBlk:\t0000000000000010\n";
    assert!(status_blocks_sigtrap(st));
    assert!(!status_blocks_sigtrap("SigBlk:\tfffffffffffeffef\n"));
    assert!(status_blocks_sigtrap("SigBlk:\tffffffffffffffff\n"));
    assert!(!status_blocks_sigtrap("Name: x\n"));
    // The test threads block nothing.
    assert!(threads_blocking_sigtrap().is_empty());
}

/// Puts a converted sled back (test only): `0f 1f 44 00 00` → five `90`s with the int3
/// protocol. No grace period is needed this way round: nobody can be inside a single
/// 5-byte nop.
fn restore_sled(p: &Patcher, site: usize) {
    let _g = p.originals.lock().unwrap().remove(&site);
    trap::set_transition(site, Transition::ToNop);
    poke(site, &[0xCC]).unwrap();
    sync_cores().unwrap();
    poke(site + 1, &[0x90; 4]).unwrap();
    sync_cores().unwrap();
    poke(site, &[0x90]).unwrap();
    sync_cores().unwrap();
    trap::set_transition(site, Transition::Idle);
}

/// gcc's five 1-byte nops converted to one 5-byte nop, `CYCLES` times, while 4 threads
/// run through the sled and check every result; one call in 16 single-steps into the
/// sled and is held for 200 us between two nops by a program signal handler (see
/// `fixtures::call_stepping`), as a preempted thread would be: nearly always some
/// thread is inside the sled. The grace period (the real `Observer`, signals and all)
/// must see each thread outside the sled: the agent's signal stays blocked while the
/// program's handler runs (sigwrap) and is delivered when it returns, and its handler
/// moves a thread found between two nops past them. Without the grace period (or without that
/// move), a thread resumes in the middle of `1f 44 00 00` and dies (SIGILL, SIGSEGV) or
/// computes garbage. A thread that never reports makes the conversion fail and leaves
/// the sled as it was. Runs in a child process. Sized to ~1 s (the old test made 280 M
/// calls in 300 cycles without ever finding a thread inside the sled).
#[test]
fn sled_conversion_while_threads_run_through_it() {
    if passes_in_child("sled_conversion_while_threads_run_through_it") {
        return;
    }
    const THREADS: usize = 4;
    const CYCLES: usize = 40;
    static STOP: AtomicBool = AtomicBool::new(false);
    static BAD: AtomicU64 = AtomicU64::new(0);
    let p = patcher();
    refill_blocks(THREADS + 4);
    let site = site_of(patchbay_fx_sled_stress as *const ());
    assert_eq!(bytes_at(site), [0x90; 5]);
    STEP_SLED.store(site, Ordering::Relaxed);
    install_hold_handler();
    let (tx, rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                tx.send(crate::sys::tid()).unwrap();
                let mut calls = 0u64;
                while !STOP.load(Ordering::Relaxed) {
                    let r = if calls.is_multiple_of(16) {
                        let stop = 1 + (calls / 16 % 4) as usize;
                        call_stepping(patchbay_fx_sled_stress, black_box(calls), stop)
                    } else {
                        // SAFETY: the fixture is `fn(u64) -> u64 { x + 1 }`.
                        unsafe { patchbay_fx_sled_stress(black_box(calls)) }
                    };
                    if r != calls + 1 {
                        BAD.fetch_add(1, Ordering::Relaxed);
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let tids: BTreeSet<u32> = (0..THREADS).map(|_| rx.recv().unwrap()).collect();
    let holds_before = STEP_HOLDS.load(Ordering::Relaxed);
    let exits_before = crate::hot::stats::snapshot().sled_exits;
    let mut obs = Observer::new();
    let mut worst = Duration::ZERO;
    for cycle in 0..CYCLES {
        let t = Instant::now();
        let mut grace = || grace_period(&mut obs, &tids).map_err(|e| format!("cycle {cycle}: {e}"));
        let r = p.convert_sleds(&[site], &mut grace).unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(r.changed, 1);
        assert_eq!(bytes_at(site), NOP5);
        // Converted: an ordinary site now (a second conversion changes nothing).
        assert_eq!(
            p.convert_sleds(&[site], &mut || Ok(())).unwrap().unchanged,
            1
        );
        restore_sled(p, site);
        assert_eq!(bytes_at(site), [0x90; 5]);
        assert_eq!(BAD.load(Ordering::Relaxed), 0, "wrong results");
    }
    // A grace period that fails leaves the sled as it was.
    let err = p
        .convert_sleds(&[site], &mut || Err("a holdout".into()))
        .unwrap_err();
    assert!(
        matches!(err, PatchError::GracePeriod { sites: 1, .. }),
        "{err}"
    );
    assert_eq!(bytes_at(site), [0x90; 5]);
    STOP.store(true, Ordering::Relaxed);
    let calls: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(BAD.load(Ordering::Relaxed), 0, "wrong results");
    let moved = crate::hot::stats::snapshot().sled_exits - exits_before;
    let holds = STEP_HOLDS.load(Ordering::Relaxed) - holds_before;
    eprintln!(
        "{CYCLES} sled conversions while {THREADS} threads made {calls} calls, {holds} held \
         inside the sled: worst {worst:?}, {moved} threads moved out of the sled by the \
         quiescent-state handler, {} quiescent-state signals",
        obs.signals
    );
    assert!(calls > 0);
    assert!(
        moved > 0,
        "no thread was found inside the sled in conversion"
    );
}

/// The quiescent-state handler, given an interrupted context inside a sled being
/// converted, moves its PC past the sled (and only then); deterministic counterpart of
/// the stress test above, where such a thread usually leaves the sled by itself before
/// the tail is written.
#[test]
fn qs_handler_moves_a_thread_out_of_a_sled_in_conversion() {
    refill_blocks(4);
    let site = site_of(patchbay_fx_sled_ctx as *const ());
    assert_eq!(bytes_at(site), [0x90; 5]);
    let run = |pc: usize| -> usize {
        // SAFETY: a zeroed ucontext_t is a valid value; the handler only reads and
        // writes its RIP.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = pc as i64;
        crate::hot::qs::on_signal((&raw mut uc).cast());
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize
    };
    // Not in conversion: nothing moves.
    assert_eq!(run(site + 2), site + 2);
    trap::set_transition(site, Transition::SledToNop);
    for k in 1..5 {
        assert_eq!(run(site + k), site + 5, "pc at sled byte {k}");
    }
    // At the first byte (it traps on the int3) or past the sled: unchanged.
    assert_eq!(run(site), site);
    assert_eq!(run(site + 5), site + 5);
    trap::set_transition(site, Transition::Idle);
    assert_eq!(run(site + 3), site + 3);
}

// ------------------------------------------------------------ relocated prologues

/// What the relocated-site callback saw: (site, args[0], args[1]).
static REL_SEEN: Mutex<Vec<(u64, u64, u64)>> = Mutex::new(Vec::new());

fn rel_record(ctx: &CallCtx<'_>) {
    REL_SEEN
        .lock()
        .unwrap()
        .push((ctx.site, ctx.args[0], ctx.args[1]));
}

/// Reads the `len` bytes at `site`.
fn bytes_n(site: usize, len: usize) -> Vec<u8> {
    // SAFETY: fixture code, loaded text.
    (0..len)
        .map(|i| unsafe { std::ptr::read_volatile((site + i) as *const u8) })
        .collect()
}

/// A function built without instrumentation (a conditional branch among its moved
/// instructions) through the three kinds of trampolines: installed over its prologue,
/// moved from one thunk to the next (count stub, trace stub, generic stub with a custom
/// callback), then restored. Counts are exact; events and callbacks name the function's
/// site (the patch point, not the thunk) with the argument registers; the function
/// computes the same at every stage of every protocol step (a trap at the patch point
/// runs the thunk, or the old copy while restoring).
#[test]
fn relocated_site_counts_traces_and_calls_back_naming_its_function() {
    let p = patcher();
    let f = rel_branch();
    let site = f.site();
    assert_eq!(site, f.entry, "no endbr64: the patch point is the entry");
    let call = |a: u64, b: u64| {
        // SAFETY: plain fixture function of two u64.
        unsafe { patchbay_fx_rel_branch(black_box(a), black_box(b)) }
    };
    let check = |_: Stage| {
        assert_eq!(call(0, 9), 100);
        assert_eq!(call(3, 4), 7);
    };
    let h = block::current()
        .or_else(|| block::claim(crate::sys::tid()))
        .expect("a thread block");
    let idx = alloc_counter();
    let count = Tramp::relocated(&[&f], vec![Action::Count { idx: [idx].into() }], true);
    let mut no_thread_inside = || Ok(());
    let r = p
        .relocate_observed(&count.jump_ops(&[&f]), &mut no_thread_inside, &mut {
            check
        })
        .unwrap();
    assert_eq!(r.changed, 1);
    assert_eq!(bytes_n(site, 1), [0xE9]);
    for i in 0..1000 {
        assert_eq!(call(i, 1), if i == 0 { 100 } else { i + 1 });
    }
    // Calls made at the three stages of the install (2 each), all through the thunk: after
    // the int3 and after the tail by the trap handler, after the first byte by the jump.
    assert_eq!(h.counter(idx), 1000 + 6);

    // Moved to a trace-stub trampoline: one instruction, no grace period needed.
    const TRACER: u64 = 0x7e1;
    let dropped = alloc_counter();
    let trace = Tramp::relocated(
        &[&f],
        vec![Action::Trace {
            tracer: TRACER,
            nargs: 2,
            dropped_idx: dropped,
        }],
        true,
    );
    let mut never = || -> Result<(), String> { panic!("a move needs no grace period") };
    ring::drain(h, |_| {});
    p.relocate_observed(&trace.jump_ops(&[&f]), &mut never, &mut { check })
        .unwrap();
    let counted = h.counter(idx);
    assert_eq!(call(0, 9), 100);
    assert_eq!(call(5, 6), 11);
    let mut events = Vec::new();
    ring::drain(h, |e| events.push(e));
    let tail: Vec<_> = events[events.len() - 2..]
        .iter()
        .map(|e| (e.site, e.tracer, e.nargs, e.args[0], e.args[1]))
        .collect();
    assert_eq!(
        tail,
        [
            (site as u64, TRACER, 2, 0, 9),
            (site as u64, TRACER, 2, 5, 6)
        ],
        "events name the function's site and carry the arguments"
    );
    assert!(events.iter().all(|e| e.site == site as u64));
    assert_eq!(
        h.counter(idx),
        counted,
        "the old count stub is no longer called"
    );

    // Moved to the generic stub: the dispatcher reads the site from the thunk.
    let generic = Tramp::relocated(&[&f], vec![custom(rel_record)], false);
    p.relocate(&generic.jump_ops(&[&f]), &mut never).unwrap();
    REL_SEEN.lock().unwrap().clear();
    assert_eq!(call(8, 1), 9);
    assert_eq!(*REL_SEEN.lock().unwrap(), [(site as u64, 8, 1)]);

    // Restored: the original bytes, nothing traced any more.
    p.relocate_observed(&generic.restore_ops(&[&f]), &mut never, &mut { check })
        .unwrap();
    assert_eq!(bytes_n(site, f.original.len()), f.original);
    REL_SEEN.lock().unwrap().clear();
    assert_eq!(call(2, 2), 4);
    assert!(REL_SEEN.lock().unwrap().is_empty());
    // A restore of a restored site, or a jump over bytes that are not the prologue,
    // changes nothing.
    assert_eq!(
        p.relocate(&generic.restore_ops(&[&f]), &mut never)
            .unwrap()
            .unchanged,
        1
    );
    let wrong = [0x90u8; 5];
    assert!(matches!(
        p.relocate(
            &[RelocOp::Jump {
                site,
                thunk: count.entry(site),
                original: &wrong
            }],
            &mut never
        ),
        Err(PatchError::NotASite { .. })
    ));
    assert_eq!(bytes_n(site, f.original.len()), f.original);
    for t in [count, trace, generic] {
        t.free(); // only this thread called, and it is outside
    }
}

/// A thread spinning inside the replaced bytes (a loop entirely among the moved
/// instructions) when the prologue is relocated: the grace period's quiescent-state
/// handler moves it to the same point of the relocated copy, where it keeps spinning,
/// and returns correctly once released. Without the move (broken by hand: `reloc_exit`
/// answering `Outside`), the thread resumes in the `jmp`'s displacement bytes and the
/// test fails. Runs in a child process.
#[test]
fn thread_spinning_inside_the_prologue_is_moved_into_the_copy() {
    if passes_in_child("thread_spinning_inside_the_prologue_is_moved_into_the_copy") {
        return;
    }
    static FLAG: AtomicU64 = AtomicU64::new(0);
    static SEEN_PC: AtomicU64 = AtomicU64::new(0);
    extern "C" fn where_am_i(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
        let pc =
            unsafe { (*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RIP as usize] };
        SEEN_PC.store(pc as u64, Ordering::SeqCst);
    }
    let p = patcher();
    let f = rel_spin();
    assert!(f.prologue.len >= 5 && f.original.len() == 6);
    // SAFETY: installing a plain SA_SIGINFO handler for SIGUSR2 in this child process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = where_am_i as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let spinner = std::thread::spawn(move || {
        block::claim(crate::sys::tid()).expect("a thread block");
        tx.send(crate::sys::tid()).unwrap();
        // SAFETY: the fixture reads the byte `FLAG` points to (its low byte).
        unsafe { patchbay_fx_rel_spin(FLAG.as_ptr().cast()) }
    });
    let tid = rx.recv().unwrap();
    // Wait until the thread is seen strictly inside the replaced bytes.
    let end = deadline(10);
    let inside = f.site() + 1..f.site() + f.original.len();
    loop {
        SEEN_PC.store(0, Ordering::SeqCst);
        // SAFETY: a signal to a thread of this process, whose handler is installed.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR2) };
        while SEEN_PC.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < end, "the thread never answered");
            std::thread::yield_now();
        }
        if inside.contains(&(SEEN_PC.load(Ordering::SeqCst) as usize)) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the thread never spun inside the prologue"
        );
    }
    let idx = alloc_counter();
    let t = Tramp::relocated(&[&f], vec![Action::Count { idx: [idx].into() }], true);
    let tids: BTreeSet<u32> = [tid].into();
    let mut obs = Observer::new();
    let moved_before = crate::hot::stats::snapshot().reloc_exits;
    p.relocate(&t.jump_ops(&[&f]), &mut || grace_period(&mut obs, &tids))
        .unwrap();
    assert_eq!(
        crate::hot::stats::snapshot().reloc_exits - moved_before,
        1,
        "the spinning thread was moved"
    );
    // It spins on in the copy: seen in trampoline memory, never in the original bytes.
    for _ in 0..20 {
        SEEN_PC.store(0, Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR2) };
        while SEEN_PC.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < end, "the thread never answered");
            std::thread::yield_now();
        }
        let pc = SEEN_PC.load(Ordering::SeqCst);
        assert!(
            crate::hot::ranges::in_trampoline(pc),
            "thread at {pc:#x}, outside the copy"
        );
    }
    assert!(!spinner.is_finished());
    FLAG.store(1, Ordering::SeqCst);
    assert_eq!(spinner.join().unwrap(), 7, "released, it returns normally");
    // The call it was in when the site was patched is not counted; a new one is.
    assert_eq!(counter_total(idx), 0);
    // SAFETY: as above; the flag is set, so the call returns at once.
    assert_eq!(unsafe { patchbay_fx_rel_spin(FLAG.as_ptr().cast()) }, 7);
    assert_eq!(thread_counter(idx), 1);
    p.relocate(&t.restore_ops(&[&f]), &mut || Ok(())).unwrap();
    assert_eq!(bytes_n(f.site(), f.original.len()), f.original);
    t.free(); // the spinner was joined
}

/// The thunk of a relocated site lives in its trampoline, which is poisoned when freed:
/// a site still jumping there (the fault here: the trampoline freed before its site was
/// restored) runs into the poison and the process dies with a premature-free report.
/// Runs in a child process.
#[test]
fn relocated_site_into_a_freed_thunk_is_a_fatal_premature_free() {
    use std::os::unix::process::ExitStatusExt;
    let name = "relocated_site_into_a_freed_thunk_is_a_fatal_premature_free";
    let Some(out) = in_child(name) else {
        let p = patcher();
        let f = rel_dead();
        let idx = alloc_counter();
        let t = Tramp::relocated(&[&f], vec![Action::Count { idx: [idx].into() }], true);
        p.relocate(&t.jump_ops(&[&f]), &mut || Ok(())).unwrap();
        // SAFETY: plain fixture function: it runs through the thunk.
        assert_eq!(unsafe { patchbay_fx_rel_dead(black_box(1)) }, 2);
        assert_eq!(thread_counter(idx), 1);
        t.free();
        // SAFETY: as above; the site jumps into poisoned memory: the trap handler kills us.
        unsafe { patchbay_fx_rel_dead(black_box(1)) };
        std::process::exit(3);
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTRAP),
        "child status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(crate::hot::trap::POISON_MARKER)
            && stderr.contains("executed freed (int3-poisoned) trampoline memory"),
        "{stderr}"
    );
}

/// Calls made by the agent's own threads are never traced: through count stubs (no
/// block: the slow path) and through the dispatcher alike, the call runs untraced and
/// the thread never gets a block. A program thread's calls are counted. Fails with the
/// dispatcher's depth check removed (the agent thread claims a block and counts).
#[test]
fn agent_threads_are_never_traced() {
    let p = patcher();
    let site = site_of(patchbay_fx_agent as *const ());
    static RUNS: AtomicU64 = AtomicU64::new(0);
    fn runs(_: &CallCtx<'_>) {
        RUNS.fetch_add(1, Ordering::SeqCst);
    }
    for stubs in [true, false] {
        let idx = alloc_counter();
        let actions = if stubs {
            vec![Action::Count { idx: [idx].into() }]
        } else {
            vec![Action::Count { idx: [idx].into() }, custom(runs)]
        };
        let t = Tramp::new(&[site], actions, stubs);
        p.apply(&t.call_ops()).unwrap();
        let agent = std::thread::spawn(|| {
            block::mark_agent_thread();
            for i in 0..100 {
                // SAFETY: plain fixture function.
                assert_eq!(unsafe { patchbay_fx_agent(black_box(i)) }, i + 1);
            }
            block::current().is_none()
        });
        assert!(agent.join().unwrap(), "an agent thread never gets a block");
        assert_eq!(counter_total(idx), 0, "agent calls are not counted");
        assert_eq!(RUNS.load(Ordering::SeqCst), 0);
        // SAFETY: plain fixture function.
        assert_eq!(unsafe { patchbay_fx_agent(black_box(1)) }, 2);
        assert_eq!(thread_counter(idx), 1, "a program thread's call is");
        p.apply(&t.nop_ops()).unwrap();
        t.free(); // the agent thread was joined, this one is outside
        RUNS.store(0, Ordering::SeqCst);
    }
}

/// ns per call of `f`, single thread: the best of 5 runs of `n` calls made in bursts of
/// 2,048 (half an event ring), the ring drained between bursts (not timed), so no
/// trace event is dropped.
fn ns_per_call_bursts(f: unsafe extern "C" fn(u64, u64) -> u64, n: u64) -> f64 {
    const BURST: u64 = 2048;
    let h = block::current().or_else(|| block::claim(crate::sys::tid()));
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut spent = Duration::ZERO;
        let mut x = 0u64;
        for _ in 0..n / BURST {
            let t = Instant::now();
            for i in 0..BURST {
                // SAFETY: a fixture function of two u64.
                x = unsafe { f(black_box(x), black_box(i)) };
            }
            spent += t.elapsed();
            if let Some(h) = h {
                ring::drain(h, |_| {});
            }
        }
        black_box(x);
        best = best.min(spent.as_nanos() as f64 / (n / BURST * BURST) as f64);
    }
    best
}

/// Per-call cost of `count` and `trace` (2 argument registers) on a relocated site, side
/// by side with the same function's fentry build (a 5-byte nop entry) and the plain
/// call, and the cost of `rdtsc` on this machine (the trace stubs execute one). Prints
/// the figures (run in release with `--nocapture` for meaningful numbers) and checks
/// the counts and events are exact.
#[test]
fn bench_relocated_vs_fentry_ns_per_call() {
    let p = patcher();
    refill_blocks(4);
    let f = rel_bench();
    let nop = site_of(patchbay_fx_bench_nop as *const ());
    let n = 1 << 18;
    let rdtsc = {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..n {
                // SAFETY: rdtsc has no preconditions.
                black_box(unsafe { std::arch::x86_64::_rdtsc() });
            }
            best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
        best
    };
    let plain = ns_per_call_bursts(patchbay_fx_bench_rel, n);
    let fentry_off = ns_per_call_bursts(patchbay_fx_bench_nop, n);
    let h = block::current().expect("a block");
    let calls = 5 * (n / 2048 * 2048);
    let measure = |reloc: bool, trace: bool| {
        let idx = alloc_counter();
        let action = if trace {
            Action::Trace {
                tracer: 0xbe,
                nargs: 2,
                dropped_idx: idx,
            }
        } else {
            Action::Count { idx: [idx].into() }
        };
        ring::drain(h, |_| {});
        let ns = if reloc {
            let t = Tramp::relocated(&[&f], vec![action], true);
            p.relocate(&t.jump_ops(&[&f]), &mut || Ok(())).unwrap();
            let ns = ns_per_call_bursts(patchbay_fx_bench_rel, n);
            p.relocate(&t.restore_ops(&[&f]), &mut || Ok(())).unwrap();
            t.free();
            ns
        } else {
            let t = Tramp::new(&[nop], vec![action], true);
            p.apply(&t.call_ops()).unwrap();
            let ns = ns_per_call_bursts(patchbay_fx_bench_nop, n);
            p.apply(&t.nop_ops()).unwrap();
            t.free();
            ns
        };
        let total = counter_total(idx);
        if trace {
            assert_eq!(total, 0, "no event dropped");
        } else {
            assert_eq!(total, calls, "exact count");
        }
        ns
    };
    let count_fentry = measure(false, false);
    let count_rel = measure(true, false);
    let trace_fentry = measure(false, true);
    let trace_rel = measure(true, true);
    eprintln!(
        "ns/call (best of 5, 1 thread): plain {plain:.2}; fentry build untraced \
         {fentry_off:.2}; count: fentry {count_fentry:.2} (+{:.2}), relocated {count_rel:.2} \
         (+{:.2}); trace 2 args: fentry {trace_fentry:.2} (+{:.2}), relocated \
         {trace_rel:.2} (+{:.2}); rdtsc {rdtsc:.2}",
        count_fentry - plain,
        count_rel - plain,
        trace_fentry - plain,
        trace_rel - plain,
    );
}

/// Relocation while threads stop inside the prologue: 4 threads call a relocatable
/// function (`endbr64; lea; add [rip]`); one call in 16 single-steps into it and is held
/// for 200 us between the two moved instructions by a program signal handler (as a
/// preempted thread, or a long handler, would be). Each cycle installs the prologue's
/// jump to a `count` thunk under a real grace period (the `Observer`, signals and all),
/// restores the prologue, and frees the trampoline after another grace period. A thread
/// held inside is moved to the same point of the copy once its handler returns (the
/// agent's signal stays pending meanwhile; the wrapper keeps it from being counted as
/// quiescent): every result is right, and threads were moved. A failed grace period
/// leaves the prologue as it was. Without the move (broken by hand: `reloc_exit` never
/// maps), the threads resume in the jump's displacement and the test fails. Runs in a
/// child process.
#[test]
fn relocation_while_threads_stop_inside_the_prologue() {
    if passes_in_child("relocation_while_threads_stop_inside_the_prologue") {
        return;
    }
    const THREADS: usize = 4;
    const CYCLES: usize = 30;
    static STOP: AtomicBool = AtomicBool::new(false);
    static BAD: AtomicU64 = AtomicU64::new(0);
    let p = patcher();
    refill_blocks(THREADS + 4);
    let f = rel_step();
    // Stepping starts at the entry (endbr64) and stops between `lea` and `add`.
    let stop = f.site() + 4 - f.entry;
    STEP_SLED.store(f.entry, Ordering::Relaxed);
    install_hold_handler();
    let (tx, rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                block::claim(crate::sys::tid()).expect("a thread block");
                tx.send(crate::sys::tid()).unwrap();
                let mut calls = 0u64;
                while !STOP.load(Ordering::Relaxed) {
                    let r = if calls.is_multiple_of(16) {
                        call_stepping(patchbay_fx_rel_step, black_box(calls), stop)
                    } else {
                        // SAFETY: the fixture is `fn(u64) -> u64 { x + 1 }`.
                        unsafe { patchbay_fx_rel_step(black_box(calls)) }
                    };
                    if r != calls + 1 {
                        BAD.fetch_add(1, Ordering::Relaxed);
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let tids: BTreeSet<u32> = (0..THREADS).map(|_| rx.recv().unwrap()).collect();
    let holds_before = STEP_HOLDS.load(Ordering::Relaxed);
    let moved_before = crate::hot::stats::snapshot().reloc_exits;
    let mut obs = Observer::new();
    let mut worst = Duration::ZERO;
    let idx = alloc_counter();
    for cycle in 0..CYCLES {
        let t = Tramp::relocated(&[&f], vec![Action::Count { idx: [idx].into() }], true);
        let started = Instant::now();
        let mut grace = || grace_period(&mut obs, &tids).map_err(|e| format!("cycle {cycle}: {e}"));
        assert_eq!(
            p.relocate(&t.jump_ops(&[&f]), &mut grace).unwrap().changed,
            1
        );
        worst = worst.max(started.elapsed());
        assert_eq!(bytes_n(f.site(), 1), [0xE9]);
        p.relocate(&t.restore_ops(&[&f]), &mut || Ok(())).unwrap();
        assert_eq!(bytes_n(f.site(), f.original.len()), f.original);
        grace_period(&mut obs, &tids).unwrap();
        t.free();
        assert_eq!(BAD.load(Ordering::Relaxed), 0, "wrong results");
    }
    // A grace period that fails leaves the prologue as it was.
    let t = Tramp::relocated(&[&f], vec![Action::Count { idx: [idx].into() }], true);
    let err = p
        .relocate(&t.jump_ops(&[&f]), &mut || Err("a holdout".into()))
        .unwrap_err();
    assert!(
        matches!(err, PatchError::GracePeriod { sites: 1, .. }),
        "{err}"
    );
    assert_eq!(bytes_n(f.site(), f.original.len()), f.original);
    STOP.store(true, Ordering::Relaxed);
    let calls: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    t.free(); // every caller joined
    assert_eq!(BAD.load(Ordering::Relaxed), 0, "wrong results");
    let moved = crate::hot::stats::snapshot().reloc_exits - moved_before;
    let holds = STEP_HOLDS.load(Ordering::Relaxed) - holds_before;
    eprintln!(
        "{CYCLES} relocations while {THREADS} threads made {calls} calls ({} counted), \
         {holds} held inside the prologue: worst install {worst:?}, {moved} threads moved \
         into the copy by the quiescent-state handler, {} quiescent-state signals",
        counter_total(idx),
        obs.signals
    );
    assert!(calls > 0 && holds > 0);
    assert!(moved > 0, "no thread was found inside the prologue");
}
