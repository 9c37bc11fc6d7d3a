//! In-process tests of patching, the trap handler and generated trampolines: every
//! trampoline here is really executed through a patched fixture function.

use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::fixtures::*;
use super::*;
use crate::codegen::{self, Asm, CallCtx, Callback, Hook};
use crate::control::arena::{self, Window};
use crate::tls::{self, BlockAccess};

fn site_of(f: *const ()) -> usize {
    addr(f)
}

fn bytes_at(site: usize) -> [u8; 5] {
    // SAFETY: fixture functions are mapped text.
    unsafe { read_site(site) }
}

fn count_tramp(site: usize) -> (tls::CounterId, crate::arena::Slot) {
    let access = tls::init().unwrap();
    let id = tls::alloc_counter().unwrap();
    let slot = install_for(site, &codegen::count_trampoline(access, id));
    (id, slot)
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// 8 threads call the fixture in a loop while the main thread patches and unpatches
/// it hundreds of times. Each thread reads its own counter around every call: the
/// delta is 0 or 1, exactly 1 for a call made entirely inside a stable patched window
/// and exactly 0 inside a stable unpatched window; the global total equals the sum of
/// the deltas the threads observed.
#[test]
fn stress_patch_unpatch_while_8_threads_call() {
    const THREADS: usize = 8;
    const ITERATIONS: u64 = 300;
    const TRANSITION: u64 = 0;
    const PATCHED: u64 = 1;
    const UNPATCHED: u64 = 2;
    static PHASE: AtomicU64 = AtomicU64::new(UNPATCHED);
    static STOP: AtomicBool = AtomicBool::new(false);
    static FAILED: Mutex<Option<String>> = Mutex::new(None);
    static STABLE_CALLS: AtomicU64 = AtomicU64::new(0);

    let p = patcher();
    let site = site_of(patchbay_fx_stress as *const ());
    let original = bytes_at(site);
    let (id, slot) = count_tramp(site);
    let traps_before = crate::trap::stats();

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let (mut observed, mut ambiguous, mut stable_p, mut stable_u) =
                    (0u64, 0u64, 0u64, 0u64);
                let mut x = t as u64;
                while !STOP.load(Ordering::Relaxed) {
                    let p1 = PHASE.load(Ordering::SeqCst);
                    let c1 = tls::current_thread_counter(id);
                    // SAFETY: the fixture is a plain function of one u64.
                    let r = unsafe { patchbay_fx_stress(black_box(x)) };
                    let c2 = tls::current_thread_counter(id);
                    let p2 = PHASE.load(Ordering::SeqCst);
                    let d = c2.wrapping_sub(c1);
                    let bad = if r != x + 1 {
                        Some(format!("wrong result {r} for {x}"))
                    } else if d > 1 {
                        Some(format!("delta {d} for one call"))
                    } else if p1 == p2 && p1 & 3 == PATCHED && d != 1 {
                        Some(format!("call in stable patched phase {p1:#x} not counted"))
                    } else if p1 == p2 && p1 & 3 == UNPATCHED && d != 0 {
                        Some(format!("call in stable unpatched phase {p1:#x} counted"))
                    } else {
                        None
                    };
                    if let Some(msg) = bad {
                        *FAILED.lock().unwrap() = Some(format!("thread {t}: {msg}"));
                        STOP.store(true, Ordering::SeqCst);
                        break;
                    }
                    if p1 == p2 && p1 & 3 == PATCHED {
                        stable_p += 1;
                        STABLE_CALLS.fetch_add(1, Ordering::Relaxed);
                    } else if p1 == p2 && p1 & 3 == UNPATCHED {
                        stable_u += 1;
                        STABLE_CALLS.fetch_add(1, Ordering::Relaxed);
                    } else {
                        ambiguous += 1;
                    }
                    observed += d;
                    x = x.wrapping_add(1) & 0xffff_ffff;
                }
                (observed, ambiguous, stable_p, stable_u)
            })
        })
        .collect();

    let end = deadline(120);
    let wait_progress = || {
        let start = STABLE_CALLS.load(Ordering::Relaxed);
        while STABLE_CALLS.load(Ordering::Relaxed) < start + 16 {
            if STOP.load(Ordering::SeqCst) {
                return;
            }
            assert!(Instant::now() < end, "no progress before the deadline");
            std::thread::yield_now();
        }
    };
    for i in 0..ITERATIONS {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        PHASE.store(i << 2 | TRANSITION, Ordering::SeqCst);
        let r = p
            .apply(&[Op::Call {
                site,
                target: slot.addr(),
            }])
            .unwrap();
        assert_eq!(r.changed, 1);
        PHASE.store(i << 2 | PATCHED, Ordering::SeqCst);
        wait_progress();
        PHASE.store(i << 2 | 3, Ordering::SeqCst);
        p.apply(&[Op::Nop { site }]).unwrap();
        PHASE.store(i << 2 | UNPATCHED, Ordering::SeqCst);
        wait_progress();
    }
    STOP.store(true, Ordering::SeqCst);
    let results: Vec<_> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    if let Some(msg) = FAILED.lock().unwrap().take() {
        panic!("{msg}");
    }
    let observed: u64 = results.iter().map(|r| r.0).sum();
    let ambiguous: u64 = results.iter().map(|r| r.1).sum();
    let stable_p: u64 = results.iter().map(|r| r.2).sum();
    let stable_u: u64 = results.iter().map(|r| r.3).sum();
    let total = tls::counter_total(id);
    let traps = crate::trap::stats();
    eprintln!(
        "stress: {ITERATIONS} patch/unpatch cycles, counted {total} = observed {observed}; \
         stable patched calls {stable_p}, stable unpatched {stable_u}, ambiguous {ambiguous}; \
         traps emulated: {} calls, {} nops, {} restarts",
        traps.emulated_calls - traps_before.emulated_calls,
        traps.emulated_nops - traps_before.emulated_nops,
        traps.restarted - traps_before.restarted,
    );
    assert_eq!(
        total, observed,
        "global count equals the sum of per-call deltas"
    );
    assert!(stable_p > 0 && stable_u > 0);
    assert!(total >= stable_p);
    assert_eq!(
        bytes_at(site),
        original,
        "unpatched site has its original nop"
    );
    // Every thread that could run the trampoline has been joined: free it.
    let (a, l) = (slot.addr(), slot.len());
    arena().free(slot).unwrap();
    assert!(arena::is_poisoned(a, l), "freed trampoline is all int3");
    tls::free_counter(id);
}

/// Executes the site at every stage of the protocol, while it holds `0xCC`: the trap
/// handler emulates the call (patching) or the nop (unpatching).
#[test]
fn int3_emulation_at_every_stage() {
    let p = patcher();
    let site = site_of(patchbay_fx_emul as *const ());
    let (id, slot) = count_tramp(site);
    let before = crate::trap::stats();
    let mut seen = Vec::new();
    let mut probe = |st: Stage| {
        let first = bytes_at(site)[0];
        let c0 = tls::current_thread_counter(id);
        // SAFETY: plain fixture function.
        let r = unsafe { patchbay_fx_emul(black_box(41)) };
        seen.push((st, first, tls::current_thread_counter(id) - c0, r));
    };
    p.apply_observed(
        &[Op::Call {
            site,
            target: slot.addr(),
        }],
        &mut probe,
    )
    .unwrap();
    p.apply_observed(&[Op::Nop { site }], &mut probe).unwrap();
    use Stage::*;
    assert_eq!(
        seen,
        vec![
            (Int3Written, 0xCC, 1, 42),
            (TailWritten, 0xCC, 1, 42),
            (FirstByteWritten, 0xE8, 1, 42),
            (Int3Written, 0xCC, 0, 42),
            (TailWritten, 0xCC, 0, 42),
            (FirstByteWritten, 0x0F, 0, 42),
        ]
    );
    let after = crate::trap::stats();
    assert!(after.emulated_calls >= before.emulated_calls + 2);
    assert!(after.emulated_nops >= before.emulated_nops + 2);
    assert_eq!(
        crate::trap::transition(site),
        Some(crate::trap::Transition::Idle)
    );
    arena().free(slot).unwrap();
    tls::free_counter(id);
}

/// What the recording callback saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Seen {
    args: [u64; 6],
    x0: f64,
    site: u64,
    ret_matches_sp: bool,
    nesting: u64,
}
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

extern "C" fn record(ctx: &CallCtx, _data: usize) {
    // SAFETY: entry_sp points at the traced function's return address on its stack.
    let ret = unsafe { *(ctx.entry_sp as *const u64) };
    SEEN.lock().unwrap().push(Seen {
        args: [ctx.rdi, ctx.rsi, ctx.rdx, ctx.rcx, ctx.r8, ctx.r9],
        x0: f64::from_le_bytes(ctx.xmm[0][..8].try_into().unwrap()),
        site: ctx.site,
        ret_matches_sp: ret == ctx.return_address,
        nesting: tls::current_nesting(),
    });
}

/// Clobbers every register a SysV callee may clobber.
extern "C" fn trash(_ctx: &CallCtx, _data: usize) {
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
}

fn align_hook(cell: &AtomicU64) -> Hook {
    Hook {
        // SAFETY: the asm callback has the Callback ABI (ctx pointer, data word).
        func: unsafe {
            std::mem::transmute::<unsafe extern "C" fn(*const CallCtx, usize), Callback>(
                patchbay_fx_align_cb,
            )
        },
        data: cell as *const AtomicU64 as usize,
    }
}

/// A group trampoline (unrolled) passes the arguments to callbacks, keeps the stack
/// aligned, and restores every argument register after callbacks clobbered them.
#[test]
fn group_trampoline_preserves_registers_and_sees_args() {
    let p = patcher();
    let access = tls::init().unwrap();
    static ALIGN: AtomicU64 = AtomicU64::new(99);
    let hooks = [
        Hook {
            func: record,
            data: 0,
        },
        Hook {
            func: trash,
            data: 0,
        },
        align_hook(&ALIGN),
    ];
    // Arguments seen by callbacks and result of the function.
    let site = site_of(patchbay_fx_args as *const ());
    let code = codegen::group_trampoline(access, &hooks).unwrap();
    let slot = install_for(site, &code);
    SEEN.lock().unwrap().clear();
    p.apply(&[Op::Call {
        site,
        target: slot.addr(),
    }])
    .unwrap();
    // SAFETY: plain fixture function.
    let r = unsafe { patchbay_fx_args(1, 2, 3, 4, 5, 6, black_box(7.9)) };
    p.apply(&[Op::Nop { site }]).unwrap();
    assert_eq!(r, 1 + 4 + 9 + 16 + 25 + 36 + 49);
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].args, [1, 2, 3, 4, 5, 6]);
    assert_eq!(seen[0].x0, 7.9);
    assert_eq!(seen[0].site, site as u64);
    assert!(seen[0].ret_matches_sp);
    assert_eq!(seen[0].nesting, 1, "inside a callback");
    assert_eq!(
        ALIGN.load(Ordering::SeqCst),
        8,
        "rsp % 16 == 8 at callback entry"
    );
    assert_eq!(tls::current_nesting(), 0);

    // Every register the function may read survives the trampoline.
    let rsite = site_of(patchbay_fx_regs as *const ());
    let rslot = install_for(rsite, &code);
    let call_regs = || {
        use std::arch::x86_64::_mm_set_epi64x;
        // SAFETY: calls the fixture with chosen register values; the fixture only
        // writes its output area; all caller-saved registers are declared clobbered.
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
    };
    let untraced = call_regs();
    p.apply(&[Op::Call {
        site: rsite,
        target: rslot.addr(),
    }])
    .unwrap();
    SEEN.lock().unwrap().clear();
    let traced = call_regs();
    p.apply(&[Op::Nop { site: rsite }]).unwrap();
    assert_eq!(SEEN.lock().unwrap().len(), 1, "the trampoline ran");
    let want: Vec<u64> = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0]
        .into_iter()
        .chain((0..8).flat_map(|i| [0x100 + 0x10 * i, 0x101 + 0x10 * i]))
        .collect();
    assert_eq!(untraced.to_vec(), want);
    assert_eq!(traced.to_vec(), want);
    arena().free(slot).unwrap();
    arena().free(rslot).unwrap();
}

static ORDER: Mutex<Vec<usize>> = Mutex::new(Vec::new());
extern "C" fn push_order(_ctx: &CallCtx, data: usize) {
    ORDER.lock().unwrap().push(data);
}

/// More than UNROLL_MAX hooks go through the list dispatcher, in order.
#[test]
fn list_dispatcher_calls_hooks_in_order() {
    let p = patcher();
    let access = tls::init().unwrap();
    let hooks: Vec<Hook> = (0..7)
        .map(|i| Hook {
            func: if i == 3 { trash } else { push_order },
            data: i,
        })
        .collect();
    let site = site_of(patchbay_fx_list as *const ());
    let slot = install_for(site, &codegen::group_trampoline(access, &hooks).unwrap());
    p.apply(&[Op::Call {
        site,
        target: slot.addr(),
    }])
    .unwrap();
    ORDER.lock().unwrap().clear();
    // SAFETY: plain fixture function.
    let r = unsafe { patchbay_fx_list(black_box(40)) };
    p.apply(&[Op::Nop { site }]).unwrap();
    assert_eq!(r, 42);
    assert_eq!(*ORDER.lock().unwrap(), vec![0, 1, 2, 4, 5, 6]);
    arena().free(slot).unwrap();
}

/// Dynamic-TLS fallback: the block is fetched by calling the helper, and the count
/// tracer is a callback.
#[test]
fn helper_mode_count_is_exact_across_threads() {
    let p = patcher();
    let site = site_of(patchbay_fx_helper as *const ());
    let id = tls::alloc_counter().unwrap();
    let slot = install_for(site, &codegen::count_trampoline(BlockAccess::Helper, id));
    p.apply(&[Op::Call {
        site,
        target: slot.addr(),
    }])
    .unwrap();
    let hs: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..1000 * (t + 1) {
                    // SAFETY: plain fixture function.
                    assert_eq!(unsafe { patchbay_fx_helper(black_box(i)) }, i + 2);
                }
                assert_eq!(tls::current_nesting(), 0);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    p.apply(&[Op::Nop { site }]).unwrap();
    assert_eq!(tls::counter_total(id), 1000 + 2000 + 3000 + 4000);
    arena().free(slot).unwrap();
    tls::free_counter(id);
}

static RECURSE_CALLS: AtomicUsize = AtomicUsize::new(0);
extern "C" fn recurse(_ctx: &CallCtx, _data: usize) {
    RECURSE_CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: plain fixture function (traced: its trampoline sees nesting 1).
    let r = unsafe { patchbay_fx_recurse(black_box(1)) };
    assert_eq!(r, 3);
}

/// A callback that calls a traced function does not recurse into callbacks.
#[test]
fn recursion_from_a_callback_is_skipped_and_counted() {
    let p = patcher();
    let access = tls::init().unwrap();
    let site = site_of(patchbay_fx_recurse as *const ());
    let code = codegen::group_trampoline(
        access,
        &[Hook {
            func: recurse,
            data: 0,
        }],
    )
    .unwrap();
    let slot = install_for(site, &code);
    p.apply(&[Op::Call {
        site,
        target: slot.addr(),
    }])
    .unwrap();
    let misses = tls::current_recursion_misses();
    // SAFETY: plain fixture function.
    let r = unsafe { patchbay_fx_recurse(black_box(5)) };
    p.apply(&[Op::Nop { site }]).unwrap();
    assert_eq!(r, 7);
    assert_eq!(RECURSE_CALLS.load(Ordering::SeqCst), 1);
    assert_eq!(tls::current_recursion_misses(), misses + 1);
    assert_eq!(tls::current_nesting(), 0);
    arena().free(slot).unwrap();
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

    // Trace it, then detach.
    let (id, slot) = count_tramp(site);
    p.apply(&[Op::Call {
        site,
        target: slot.addr(),
    }])
    .unwrap();
    for i in 0..10 {
        assert_eq!(call(i), i + 3);
    }
    p.apply(&[Op::Nop { site }]).unwrap();
    assert_eq!(bytes_at(site), NOP5);
    assert_eq!(tls::counter_total(id), 10);
    assert_eq!(hits(), h0 + 2);
    arena().free(slot).unwrap();
    tls::free_counter(id);
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

const CHILD_ENV: &str = "PATCHBAY_TRAP_CHILD";

/// With no earlier handler (SIG_DFL), a foreign int3 still kills the process with
/// SIGTRAP. Runs itself in a child process.
#[test]
fn foreign_int3_with_default_action_kills_the_process() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os(CHILD_ENV).is_some() {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setting a resource limit of this (child) process.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        Patcher::global().unwrap();
        // SAFETY: `int3; ret` with the default action: the process dies here.
        unsafe { patchbay_fx_int3() };
        std::process::exit(3);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "patch::tests::foreign_int3_with_default_action_kills_the_process",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGTRAP),
        "child status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Counts of threads that exited are kept, through block recycling.
#[test]
fn counts_of_exited_threads_are_kept() {
    let p = patcher();
    let site = site_of(patchbay_fx_exit as *const ());
    let (id, slot) = count_tramp(site);
    p.apply(&[Op::Call {
        site,
        target: slot.addr(),
    }])
    .unwrap();
    let mut expected = 0;
    for round in 0..5u64 {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..(100 * round + t) {
                        // SAFETY: plain fixture function.
                        unsafe { patchbay_fx_exit(black_box(i)) };
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        expected += (0..4).map(|t| 100 * round + t).sum::<u64>();
        assert_eq!(tls::counter_total(id), expected);
    }
    p.apply(&[Op::Nop { site }]).unwrap();
    arena().free(slot).unwrap();
    tls::free_counter(id);
}

/// Best of 5 runs of `n` calls on each of `threads` threads at once, in ns per call.
fn ns_per_call(n: u64, threads: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
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

/// Prints ns/call untraced vs traced (run with `--nocapture`; best of 5). Also
/// measures the alternative designs: a shared `lock inc`, and the helper call.
#[test]
fn bench_count_ns_per_call() {
    let p = patcher();
    let access = tls::init().unwrap();
    let site = site_of(patchbay_fx_bench as *const ());
    let n = 2_000_000;
    let mut line = String::new();
    for threads in [1, 2] {
        let untraced = ns_per_call(n, threads);
        let measure = |code: &codegen::Code| {
            let slot = install_for(site, code);
            p.apply(&[Op::Call {
                site,
                target: slot.addr(),
            }])
            .unwrap();
            let ns = ns_per_call(n, threads);
            p.apply(&[Op::Nop { site }]).unwrap();
            arena().free(slot).unwrap();
            ns
        };
        let calls = 5 * n * threads as u64;
        let id = tls::alloc_counter().unwrap();
        let count = measure(&codegen::count_trampoline(access, id));
        assert_eq!(tls::counter_total(id), calls);
        let helper = measure(&codegen::count_trampoline(BlockAccess::Helper, id));
        assert_eq!(tls::counter_total(id), 2 * calls);
        tls::free_counter(id);
        // The rejected alternative: one shared counter with `lock inc`.
        let shared = Box::leak(Box::new(AtomicU64::new(0)));
        let mut a = Asm::new();
        a.push(11);
        a.mov_imm64(11, shared as *const AtomicU64 as u64);
        a.lock_inc_mem(11, 0);
        a.pop(11);
        a.ret();
        let locked = measure(&a.finish());
        assert_eq!(shared.load(Ordering::Relaxed), calls);
        line += &format!(
            "\n  {threads} thread(s): untraced {untraced:.2}; count (fs TLS, no call) {count:.2} \
             (+{:.2}); shared lock inc {locked:.2} (+{:.2}); count through helper call \
             {helper:.2} (+{:.2})",
            count - untraced,
            locked - untraced,
            helper - untraced
        );
    }
    eprintln!("ns/call, best of 5:{line}");
}

/// 10,000 sites patched and unpatched in one batch each (DESIGN target: < 50 ms).
#[test]
fn batch_of_10000_sites() {
    let p = patcher();
    let base = site_of(patchbay_fx_many as *const ());
    let sites: Vec<usize> = (0..MANY_SITES).map(|i| base + 16 * i).collect();
    let (id, slot) = count_tramp(base);
    assert!(
        Window::for_calls_from(&sites)
            .unwrap()
            .contains(slot.addr())
    );
    let call_ops: Vec<Op> = sites
        .iter()
        .map(|&site| Op::Call {
            site,
            target: slot.addr(),
        })
        .collect();
    let nop_ops: Vec<Op> = sites.iter().map(|&site| Op::Nop { site }).collect();
    let t = Instant::now();
    assert_eq!(p.apply(&call_ops).unwrap().changed, MANY_SITES);
    let patch_ms = t.elapsed().as_secs_f64() * 1e3;
    for &site in &sites {
        // SAFETY: each site starts a fixture function of one u64.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(site) };
        assert_eq!(f(black_box(1)), 2);
    }
    assert_eq!(tls::counter_total(id), MANY_SITES as u64);
    let t = Instant::now();
    assert_eq!(p.apply(&nop_ops).unwrap().changed, MANY_SITES);
    let unpatch_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(sites.iter().all(|&s| bytes_at(s) == NOP5));
    eprintln!("{MANY_SITES} sites: patch {patch_ms:.1} ms, unpatch {unpatch_ms:.1} ms");
    arena().free(slot).unwrap();
    tls::free_counter(id);
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

/// gcc's five 1-byte nops converted to one 5-byte nop, hundreds of times, while 4
/// threads run through the sled and check every result: the grace period (the real
/// `Observer`, signals and all) must see each thread outside the sled, the signal
/// handler moving a thread found between two nops past them. Without that move, or
/// without the grace period, a thread resumes in the middle of `1f 44 00 00` and dies
/// (SIGILL) or computes garbage. A thread that never reports makes the conversion fail
/// and leaves the sled as it was.
#[test]
fn sled_conversion_while_threads_run_through_it() {
    const THREADS: usize = 4;
    const CYCLES: usize = 300;
    static STOP: AtomicBool = AtomicBool::new(false);
    static BAD: AtomicU64 = AtomicU64::new(0);
    let p = patcher();
    crate::block::refill(THREADS + 4).unwrap();
    crate::qs::install_signal(crate::qs::default_signal()).unwrap();
    let site = site_of(patchbay_fx_sled_stress as *const ());
    assert_eq!(bytes_at(site), [0x90; 5]);
    let (tx, rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                tx.send(crate::dispatch::tid()).unwrap();
                let mut calls = 0u64;
                while !STOP.load(Ordering::Relaxed) {
                    // SAFETY: the fixture is `fn(u64) -> u64 { x + 1 }`.
                    if unsafe { patchbay_fx_sled_stress(black_box(calls)) } != calls + 1 {
                        BAD.fetch_add(1, Ordering::Relaxed);
                    }
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let tids: std::collections::BTreeSet<u32> = (0..THREADS).map(|_| rx.recv().unwrap()).collect();
    let exits_before = crate::stats::snapshot().sled_exits;
    let mut obs = crate::qs::Observer::new();
    let mut worst = Duration::ZERO;
    for cycle in 0..CYCLES {
        let t = Instant::now();
        let mut grace = || -> Result<(), String> {
            let e = crate::qs::EPOCH.fetch_add(1, Ordering::AcqRel) + 1;
            let end = deadline(10);
            loop {
                obs.round(&tids, e, true);
                if tids.iter().all(|t| obs.reported(*t) >= e) {
                    return Ok(());
                }
                if Instant::now() > end {
                    return Err(format!("cycle {cycle}: grace period not over in 10 s"));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        };
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
    let moved = crate::stats::snapshot().sled_exits - exits_before;
    eprintln!(
        "{CYCLES} sled conversions while {THREADS} threads made {calls} calls: worst {worst:?}, \
         {moved} threads moved out of the sled by the signal handler, {} signals",
        obs.signals
    );
    assert!(calls > 0);
}

/// The quiescent-state handler, given an interrupted context inside a sled being
/// converted, moves its PC past the sled (and only then); deterministic counterpart of
/// the stress test above, where such a thread usually leaves the sled by itself before
/// the tail is written.
#[test]
fn qs_handler_moves_a_thread_out_of_a_sled_in_conversion() {
    crate::block::refill(4).unwrap();
    let site = site_of(patchbay_fx_sled_ctx as *const ());
    assert_eq!(bytes_at(site), [0x90; 5]);
    let run = |pc: usize| -> usize {
        // SAFETY: a zeroed ucontext_t is a valid value; the handler only reads and
        // writes its RIP.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] = pc as i64;
        crate::qs::on_signal(0, std::ptr::null_mut(), (&raw mut uc).cast());
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
