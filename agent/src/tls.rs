//! Per-thread blocks: the nesting counter and the count tracer's counters.
//!
//! # The counter design (why `fs`-relative TLS)
//!
//! A count trampoline must add about one nanosecond, so it cannot call anything, and
//! it must not share a cache line between threads. Measured here (release build,
//! `patch::tests::bench_count_ns_per_call`, untraced call 1.35 ns): this design adds
//! **+1.1 ns** per call with one or two threads; one shared counter with `lock inc`
//! adds +1.1 ns with one thread but **+11.9 ns** with two threads calling the same
//! site (the line bounces); a trampoline calling a helper to find the block adds
//! +9 ns. Per-CPU stripes chosen with `rdpid`/rseq would avoid most bouncing but still
//! need the `lock` prefix (a thread can migrate between reading its CPU number and
//! the increment) and rseq's restart machinery to drop it. Instead every thread owns
//! a [`BLOCK_BYTES`] block of memory, and the trampoline reaches it through the thread
//! pointer:
//!
//! ```text
//! push r11
//! mov  r11, fs:[OFF]          ; this thread's block (0 until it registers)
//! test r11, r11
//! jz   slow                   ; first traced call of this thread: register, retry
//! inc  qword [r11 + 64 + 8*counter]
//! pop  r11
//! ret
//! ```
//!
//! `OFF` is the distance between the thread pointer (`fs:0`, the TCB self pointer on
//! glibc and musl) and the agent's `thread_local!` slot [`BLOCK`]. For static TLS (the
//! executable, the libraries it was linked with, and `LD_PRELOAD`ed libraries: every
//! way the agent is normally loaded) that distance is the same in every thread,
//! including threads the agent never saw, and the slot is zero in a new thread because
//! it lives in `.tbss`. [`init`] measures the offset in the calling thread and in a
//! fresh thread; only when both agree does it choose [`BlockAccess::Fs`]. Otherwise
//! (an agent `dlopen`ed late gets dynamic TLS, allocated lazily by `__tls_get_addr`)
//! it chooses [`BlockAccess::Helper`], and trampolines fetch the block by calling
//! [`patchbay_thread_block`] (the count tracer then becomes an ordinary callback).
//!
//! The block is an anonymous `mmap` of 512 KiB (`MAP_NORESERVE`: only touched pages
//! use memory), owned by the agent and not by the thread, so counts survive the
//! thread. A `pthread` key destructor marks the block dead at thread exit; a dead
//! block's counts are folded into a global accumulator under the registry lock and the
//! block is recycled for a new thread. Counters are plain (non-atomic) increments done
//! by one thread only, read by the agent with 8-byte atomic loads: exact, with no
//! shared cache line on the hot path.
//!
//! Registration allocates no heap memory (malloc may be the traced function or hold a
//! lock): it uses `mmap` and `pthread_setspecific` (keys below 32 never allocate).
//! While a thread registers, its slot points at a shared discard block, so a traced
//! function called during registration finds a non-null block and does not recurse;
//! those few calls are not counted. Calls are lost only in these cases: during
//! registration, during thread teardown after the key destructor ran, or for threads
//! that could not get a block (registry full, mmap failed: see
//! [`failed_registrations`]).

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Size of one thread block (header + counters).
pub const BLOCK_BYTES: usize = 512 * 1024;
/// Size of the block header; counters start here.
pub const HEADER_BYTES: usize = 64;
/// Offset of the nesting counter (u64) in a block.
pub const NESTING_OFFSET: i32 = 0;
/// Offset of the recursion-miss counter (u64): callbacks skipped because the thread
/// was already inside a callback.
pub const RECURSION_OFFSET: i32 = 8;
const STATE_OFFSET: usize = 16;
const TID_OFFSET: usize = 20;
/// How many counters one block holds.
pub const MAX_COUNTERS: usize = (BLOCK_BYTES - HEADER_BYTES) / 8;
/// How many thread blocks may exist at once (live, dead or free).
pub const MAX_THREADS: usize = 8192;

const FREE: u32 = 0;
const LIVE: u32 = 1;
const DEAD: u32 = 2;

thread_local! {
    /// This thread's block, or null before registration. Reached by trampolines as
    /// `fs:[OFF]`; see the module doc.
    static BLOCK: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

#[repr(C, align(4096))]
struct Discard(UnsafeCell<[u8; BLOCK_BYTES]>);
// SAFETY: the discard block is only written by generated code and by nothing in Rust;
// its contents are never read as meaningful data, so racing writes are harmless.
unsafe impl Sync for Discard {}
static DISCARD: Discard = Discard(UnsafeCell::new([0; BLOCK_BYTES]));

fn discard() -> *mut u8 {
    DISCARD.0.get().cast()
}

/// Every block ever mapped; indices below `NUM_BLOCKS` may be set (or still null
/// while being published).
static BLOCKS: [AtomicPtr<u8>; MAX_THREADS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_THREADS];
static NUM_BLOCKS: AtomicUsize = AtomicUsize::new(0);
/// Registrations that failed (registry full or mmap failed): those threads count into
/// the discard block.
static FAILED_REGISTRATIONS: AtomicU64 = AtomicU64::new(0);

/// How generated code finds the current thread's block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAccess {
    /// `mov r11, fs:[off]` (static TLS: the offset is the same in every thread).
    Fs(i32),
    /// Call [`patchbay_thread_block`] (dynamic TLS).
    Helper,
}

/// A counter slot, the same index in every thread's block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterId(u32);

impl CounterId {
    /// The index of this counter.
    pub fn index(self) -> usize {
        self.0 as usize
    }
    /// The id of index `i` (as passed through a hook's data word).
    pub(crate) fn from_index(i: usize) -> Self {
        CounterId(i as u32)
    }
    /// Its byte offset in a thread block.
    pub fn block_offset(self) -> i32 {
        (HEADER_BYTES + 8 * self.0 as usize) as i32
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TlsError {
    #[error("all {MAX_COUNTERS} counter slots are in use: detach some count tracers")]
    CountersExhausted,
    #[error("pthread_key_create failed with errno {0}")]
    Key(i32),
}

struct Registry {
    /// Counts folded from dead blocks, indexed by counter.
    acc: Vec<u64>,
    next_id: u32,
    free_ids: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    acc: Vec::new(),
    next_id: 0,
    free_ids: Vec::new(),
});

struct Init {
    access: BlockAccess,
    key: libc::pthread_key_t,
}

static INIT: OnceLock<Result<Init, TlsError>> = OnceLock::new();

/// The thread pointer (`fs:0` holds its own address on x86_64 glibc and musl).
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reading fs:0 is valid in every thread set up by the C library: it is
    // the TCB's self pointer. The asm touches no other state.
    unsafe {
        std::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

/// Distance between the thread pointer and this thread's [`BLOCK`] slot.
fn slot_offset() -> isize {
    let slot = BLOCK.with(|c| c as *const Cell<*mut u8> as usize);
    slot as isize - thread_pointer() as isize
}

/// Chooses the block access method and creates the thread-exit key. Idempotent; must
/// run (it may spawn a short-lived thread) before any trampoline is generated.
pub fn init() -> Result<BlockAccess, TlsError> {
    let r = INIT.get_or_init(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out pointer; the destructor has the C signature.
        let rc = unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) };
        if rc != 0 {
            return Err(TlsError::Key(rc));
        }
        let here = slot_offset();
        let there = std::thread::spawn(slot_offset).join().ok();
        let access = match (there, i32::try_from(here)) {
            (Some(t), Ok(off)) if t == here => BlockAccess::Fs(off),
            _ => BlockAccess::Helper,
        };
        Ok(Init { access, key })
    });
    r.as_ref().map(|i| i.access).map_err(Clone::clone)
}

/// The access method chosen by [`init`] (which it runs if needed).
pub fn block_access() -> Result<BlockAccess, TlsError> {
    init()
}

fn header_u32(block: *mut u8, off: usize) -> &'static AtomicU32 {
    // SAFETY: `block` is a live mapping of BLOCK_BYTES (blocks are never unmapped) and
    // `off` is a 4-aligned offset inside the header.
    unsafe { &*(block.add(off) as *const AtomicU32) }
}

fn word(block: *mut u8, off: usize) -> &'static AtomicU64 {
    debug_assert!(off + 8 <= BLOCK_BYTES && off.is_multiple_of(8));
    // SAFETY: `block` is a block mapping (or the discard block) of BLOCK_BYTES that is
    // never unmapped, `off` is 8-aligned and in range. Generated code writes these
    // words with plain 8-byte stores, which are single-copy atomic on x86_64.
    unsafe { &*(block.add(off) as *const AtomicU64) }
}

/// Returns the calling thread's block, registering the thread first if needed. Called
/// by trampolines (slow path, or every time in [`BlockAccess::Helper`] mode); never
/// returns null.
pub extern "C" fn patchbay_thread_block() -> *mut u8 {
    let cur = BLOCK.get();
    if !cur.is_null() {
        return cur;
    }
    // Recursion guard: anything traced that runs during registration counts into the
    // discard block instead of registering again.
    BLOCK.set(discard());
    let Some(Ok(init)) = INIT.get() else {
        FAILED_REGISTRATIONS.fetch_add(1, Ordering::Relaxed);
        return discard();
    };
    match acquire_block() {
        Some(b) => {
            header_u32(b, TID_OFFSET).store(gettid(), Ordering::Relaxed);
            // SAFETY: the key was created by `init`; the value is our block pointer.
            unsafe { libc::pthread_setspecific(init.key, b as *const libc::c_void) };
            BLOCK.set(b);
            b
        }
        None => {
            FAILED_REGISTRATIONS.fetch_add(1, Ordering::Relaxed);
            discard()
        }
    }
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Takes a free block or maps a new one, in state LIVE. No heap allocation.
fn acquire_block() -> Option<*mut u8> {
    let n = NUM_BLOCKS.load(Ordering::Acquire).min(MAX_THREADS);
    for slot in &BLOCKS[..n] {
        let b = slot.load(Ordering::Acquire);
        if !b.is_null()
            && header_u32(b, STATE_OFFSET)
                .compare_exchange(FREE, LIVE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(b);
        }
    }
    // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            BLOCK_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let b = p as *mut u8;
    let idx = NUM_BLOCKS.fetch_add(1, Ordering::AcqRel);
    if idx >= MAX_THREADS {
        // SAFETY: `p` is the mapping made above, not yet shared with anyone.
        unsafe { libc::munmap(p, BLOCK_BYTES) };
        return None;
    }
    header_u32(b, STATE_OFFSET).store(LIVE, Ordering::Relaxed);
    BLOCKS[idx].store(b, Ordering::Release);
    Some(b)
}

/// pthread key destructor: the thread is exiting.
extern "C" fn thread_exit(value: *mut libc::c_void) {
    BLOCK.set(discard());
    if !value.is_null() {
        header_u32(value.cast(), STATE_OFFSET).store(DEAD, Ordering::Release);
    }
}

fn for_each_block(mut f: impl FnMut(*mut u8)) {
    let n = NUM_BLOCKS.load(Ordering::Acquire).min(MAX_THREADS);
    for slot in &BLOCKS[..n] {
        let b = slot.load(Ordering::Acquire);
        if !b.is_null() {
            f(b);
        }
    }
}

/// Folds dead blocks into the accumulator and frees them. Registry lock held.
fn reap(reg: &mut Registry) {
    let used = reg.next_id as usize;
    for_each_block(|b| {
        if header_u32(b, STATE_OFFSET).load(Ordering::Acquire) != DEAD {
            return;
        }
        for (i, acc) in reg.acc.iter_mut().enumerate().take(used) {
            *acc += word(b, HEADER_BYTES + 8 * i).load(Ordering::Relaxed);
        }
        // SAFETY: the block is DEAD: its thread has exited and no other thread uses
        // it; MADV_DONTNEED on a private anonymous mapping zeroes it, which also sets
        // its state to FREE (0), publishing it for reuse.
        unsafe { libc::madvise(b.cast(), BLOCK_BYTES, libc::MADV_DONTNEED) };
    });
}

/// Allocates a counter slot (zero in every thread).
pub fn alloc_counter() -> Result<CounterId, TlsError> {
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(id) = reg.free_ids.pop() {
        return Ok(CounterId(id));
    }
    if reg.next_id as usize >= MAX_COUNTERS {
        return Err(TlsError::CountersExhausted);
    }
    let id = reg.next_id;
    reg.next_id += 1;
    reg.acc.push(0);
    Ok(CounterId(id))
}

/// Frees a counter slot. The caller guarantees that no trampoline that increments it
/// can still run (its trampolines are past their grace period).
pub fn free_counter(id: CounterId) {
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let off = HEADER_BYTES + 8 * id.index();
    for_each_block(|b| word(b, off).store(0, Ordering::Relaxed));
    reg.acc[id.index()] = 0;
    reg.free_ids.push(id.0);
}

/// Sum of a counter over all threads, live and exited.
pub fn counter_total(id: CounterId) -> u64 {
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    reap(&mut reg);
    let off = HEADER_BYTES + 8 * id.index();
    let mut sum = reg.acc[id.index()];
    for_each_block(|b| {
        if header_u32(b, STATE_OFFSET).load(Ordering::Acquire) != FREE {
            sum += word(b, off).load(Ordering::Relaxed);
        }
    });
    sum
}

/// The calling thread's value of a counter (0 before it registered).
pub fn current_thread_counter(id: CounterId) -> u64 {
    let b = BLOCK.get();
    if b.is_null() || b == discard() {
        return 0;
    }
    word(b, HEADER_BYTES + 8 * id.index()).load(Ordering::Relaxed)
}

/// The calling thread's nesting counter (> 0 inside a callback).
pub fn current_nesting() -> u64 {
    let b = BLOCK.get();
    if b.is_null() || b == discard() {
        return 0;
    }
    word(b, NESTING_OFFSET as usize).load(Ordering::Relaxed)
}

/// The calling thread's recursion-miss count.
pub fn current_recursion_misses() -> u64 {
    let b = BLOCK.get();
    if b.is_null() || b == discard() {
        return 0;
    }
    word(b, RECURSION_OFFSET as usize).load(Ordering::Relaxed)
}

/// Adds one to a counter of the calling thread (the count tracer as a callback, in
/// [`BlockAccess::Helper`] mode).
pub fn bump(id: CounterId) {
    let b = patchbay_thread_block();
    let w = word(b, HEADER_BYTES + 8 * id.index());
    // Only this thread writes its own block (the discard block is garbage anyway).
    w.store(w.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Threads that could not get a block and count into the discard block.
pub fn failed_registrations() -> u64 {
    FAILED_REGISTRATIONS.load(Ordering::Relaxed)
}

/// Number of blocks mapped so far (live, dead or free).
pub fn blocks_mapped() -> usize {
    NUM_BLOCKS.load(Ordering::Acquire).min(MAX_THREADS)
}

/// Whether counts can be lost: true if some thread failed to register.
pub fn unregistered_calls_possible() -> bool {
    failed_registrations() > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_is_constant_across_threads() {
        let a = init().unwrap();
        assert!(
            matches!(a, BlockAccess::Fs(_)),
            "test binaries use static TLS: {a:?}"
        );
        let here = slot_offset();
        let others: Vec<isize> = (0..4)
            .map(|_| std::thread::spawn(slot_offset).join().unwrap())
            .collect();
        assert!(others.iter().all(|&o| o == here));
    }

    #[test]
    fn counts_survive_thread_exit_and_blocks_are_recycled() {
        init().unwrap();
        let id = alloc_counter().unwrap();
        let n_threads = 6;
        for round in 0..3u64 {
            let hs: Vec<_> = (0..n_threads)
                .map(|t| {
                    std::thread::spawn(move || {
                        for _ in 0..(t + 1) * 10 {
                            bump(id);
                        }
                        assert_eq!(current_thread_counter(id), (t + 1) * 10);
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            let per_round: u64 = (1..=n_threads).map(|t| t * 10).sum();
            assert_eq!(counter_total(id), per_round * (round + 1));
        }
        // Blocks were recycled: not one block per thread ever started.
        assert!(blocks_mapped() < 3 * n_threads as usize + 16);
        free_counter(id);
        let id2 = alloc_counter().unwrap();
        assert_eq!(counter_total(id2), 0);
        free_counter(id2);
    }
}
