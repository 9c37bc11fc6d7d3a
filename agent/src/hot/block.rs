//! Per-thread blocks: the state a program thread shares with trampolines and with the
//! agent thread. One block per thread, taken from a pool the agent thread keeps
//! filled (so that a program thread never makes a system call or allocates to get one).
//!
//! Layout of a block (one mmap'd region, `BLOCK_BYTES`, pages touched lazily):
//! ```text
//!   [Header: 64 bytes][counters: COUNTERS x u64][event ring: RING_SLOTS x EVENT_BYTES]
//!   [shadow stack: SHADOW_FRAMES x Frame]
//! ```
//! The shadow stack holds the real return addresses of the traced calls in flight
//! whose return address was replaced by the static return stub (`hot/exit.rs`); its
//! depth is [`Header::shadow_top`]. Only the owner thread touches it, and only with its
//! dispatch depth raised to [`IN_DISPATCH`] (the dispatcher, the return stub), so a
//! signal handler's traced calls never interleave with a push or a pop.
//! A thread's TLS word [`TLS`] points at `counters[0]` (so that a `count` trampoline
//! reaches its counter with one TLS load: `mov r11, fs:[OFF]; inc qword [r11 + 8*idx]`).
//! The header sits just below it.
//!
//! Invariants:
//! - a block is owned by one thread at a time (tid in the header); only that thread
//!   writes its counters, `nesting` and `seq`; the agent thread only reads them (and
//!   zeroes a counter index only after a grace period proves no thread uses it);
//! - blocks are never unmapped: an exited thread's block is folded into the totals and
//!   returned to the pool.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Counter slots per thread block (indexes handed out per (tracer, site)).
pub const COUNTERS: usize = 1 << 16;
/// Event slots of a thread's ring (single producer: the thread; single consumer: the
/// agent thread).
pub const RING_SLOTS: usize = 4096;
/// Bytes of one event record in the ring (see `ring.rs`, `control/drain.rs`).
pub const EVENT_BYTES: usize = 80;
/// Frames of a thread's shadow stack: traced calls with exit hooks deeper than this
/// are traced at entry only (counted, see `hot/exit.rs`).
pub const SHADOW_FRAMES: usize = 256;
/// Bytes of one block: header + counters + ring + shadow stack.
pub const BLOCK_BYTES: usize = HEADER_BYTES
    + COUNTERS * 8
    + RING_SLOTS * EVENT_BYTES
    + SHADOW_FRAMES * std::mem::size_of::<Frame>();
pub const HEADER_BYTES: usize = 64;
/// Threads that can hold a block at once.
pub const MAX_BLOCKS: usize = 16384;

/// The part of a block other threads may read.
#[repr(C, align(64))]
pub struct Header {
    /// Owner thread (0 when free).
    pub tid: AtomicU32,
    /// Depth of callback dispatch on this thread (0: not inside any).
    pub nesting: AtomicU32,
    /// Bumped at every dispatch entry: lets another thread check that no dispatch
    /// started or ended between two reads.
    pub seq: AtomicU64,
    /// Unused (the deferred quiescent state is the thread-local [`DEFERRED`]): keeps
    /// the offsets below, which generated code uses, where they are.
    _reserved: u64,
    /// Highest epoch at which this thread was seen quiescent (explicit call, signal, or
    /// deferred exit).
    pub qs_epoch: AtomicU64,
    /// Events written to the ring (producer position, owner thread only).
    pub ring_head: AtomicU64,
    /// Events consumed from the ring (agent thread only).
    pub ring_tail: AtomicU64,
    /// Frames in use of the shadow stack (owner thread only, see the module comment).
    pub shadow_top: AtomicU64,
    _pad: u64,
}

/// One frame of a thread's shadow stack: a traced call in flight whose return address
/// the dispatcher replaced with the return stub's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// The real return address (into the traced function's caller).
    pub ret: u64,
    /// Address of the stack slot that held it (and now holds the return stub's): the
    /// stack pointer at the function's entry. Identifies the frame at its return.
    pub slot: u64,
    /// TSC at entry.
    pub tsc: u64,
    /// The traced function (its patch site).
    pub site: u64,
    /// The exit-table token of the trampoline that hooked the call (`hot/exit.rs`).
    pub token: u64,
    /// The site's position in that trampoline's descriptor.
    pub pos: u64,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);

thread_local! {
    /// Points at `counters[0]` of this thread's block, or null. Const-initialized and
    /// without a destructor, so it is a plain `fs`-relative word: readable from
    /// generated code and from signal handlers.
    pub static TLS: Cell<*mut u64> = const { Cell::new(std::ptr::null_mut()) };
    /// Dispatch depth of this thread, raised by the static entry stub *before* any
    /// callback code runs and lowered after. Read by this thread's signal handler.
    pub static NEST: Cell<u64> = const { Cell::new(0) };
    /// Set by the quiescent-state signal handler when it found the thread inside a
    /// dispatch: the outermost dispatch stamps a quiescent state when it is done.
    pub static DEFERRED: Cell<u64> = const { Cell::new(0) };
}

/// Added to [`NEST`] by the dispatcher while it runs a call's actions: a thread found
/// at or above it is inside a dispatch (a callback, or the dispatcher's own calls,
/// reached a traced function; or a signal handler did meanwhile), and the dispatcher
/// runs nothing for it, so tracing the libraries the agent and callbacks use cannot
/// recurse or deadlock. (The entry stub and the signal wrapper add 1: a program's
/// signal handler is traced as usual.)
pub const IN_DISPATCH: u64 = 1 << 24;

/// [`NEST`] of the agent's own threads, raised for good when they start (above
/// [`IN_DISPATCH`]: the dispatcher runs nothing for them), and such a thread never
/// claims a block (so the count and trace stubs, which find no block, send it to the
/// dispatcher): calls made by the agent's threads are never traced.
pub const AGENT_NEST: u64 = 1 << 40;

/// Marks the calling thread as one of the agent's own (see [`AGENT_NEST`]).
pub fn mark_agent_thread() {
    NEST.with(|n| n.set(AGENT_NEST));
}

/// Offset of a thread-local from the thread pointer (`fs:0`), for generated code.
/// Returns None when it is not the same in every thread (the agent was not loaded at
/// start-up, so its TLS is dynamic).
pub fn fs_offset_of<T>(addr: *const T) -> i64 {
    let tp: u64;
    // SAFETY: on x86_64 Linux, fs:0 holds the thread pointer (the TCB's self pointer).
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    addr as i64 - tp as i64
}

/// The `fs`-relative offsets of [`TLS`] and [`NEST`], checked to be the same in this
/// thread and in a fresh one (static TLS).
/// Agent thread only (it may allocate or lock).
pub fn tls_offsets() -> Option<(i32, i32)> {
    let here = (
        TLS.with(|t| fs_offset_of(t as *const _)),
        NEST.with(|t| fs_offset_of(t as *const _)),
    );
    let there = std::thread::spawn(|| {
        (
            TLS.with(|t| fs_offset_of(t as *const _)),
            NEST.with(|t| fs_offset_of(t as *const _)),
        )
    })
    .join()
    .ok()?;
    if here != there {
        return None;
    }
    Some((i32::try_from(here.0).ok()?, i32::try_from(here.1).ok()?))
}

/// `fs`-relative offsets of [`TLS`], [`NEST`] and [`DEFERRED`], set by
/// [`init_fast_tls`] once they are known to be static (0: not set; thread-locals sit
/// below the thread pointer, never at offset 0). With them the dispatcher reads its
/// thread-locals with one `fs`-relative load each instead of a `__tls_get_addr` call
/// (the agent is a shared object: its thread-locals use the general-dynamic model).
static FAST_TLS: AtomicI64 = AtomicI64::new(0);
static FAST_NEST: AtomicI64 = AtomicI64::new(0);
static FAST_DEFERRED: AtomicI64 = AtomicI64::new(0);

fn offsets3() -> (i64, i64, i64) {
    (
        TLS.with(|t| fs_offset_of(t as *const _)),
        NEST.with(|t| fs_offset_of(t as *const _)),
        DEFERRED.with(|t| fs_offset_of(t as *const _)),
    )
}

/// Records the `fs`-relative offsets of the dispatcher's thread-locals when they are
/// the same in this thread and in a fresh one (static TLS). Returns whether it did.
/// Agent thread only (it may allocate or lock).
pub fn init_fast_tls() -> bool {
    let here = offsets3();
    let Ok(there) = std::thread::spawn(offsets3).join() else {
        return false;
    };
    if here != there || here.0 == 0 || here.1 == 0 || here.2 == 0 {
        return false;
    }
    FAST_TLS.store(here.0, Ordering::Release);
    FAST_NEST.store(here.1, Ordering::Release);
    FAST_DEFERRED.store(here.2, Ordering::Release);
    true
}

/// Reads the u64 thread-local at `fs:[off]`.
///
/// # Safety
/// `off` must be the `fs`-relative offset of a u64-sized thread-local of this module,
/// recorded by [`init_fast_tls`] (static TLS: the same in every thread).
#[inline(always)]
unsafe fn fs_read(off: i64) -> u64 {
    let v: u64;
    // SAFETY: caller's precondition: fs:[off] is this thread's copy of the variable.
    unsafe {
        std::arch::asm!("mov {v}, qword ptr fs:[{o}]", v = out(reg) v, o = in(reg) off,
            options(nostack, readonly, preserves_flags))
    };
    v
}

/// [`current`] without a `__tls_get_addr` call once [`init_fast_tls`] succeeded.
/// Async-signal-safe.
#[inline(always)]
pub fn current_fast() -> Option<&'static Header> {
    let off = FAST_TLS.load(Ordering::Relaxed);
    if off == 0 {
        return current();
    }
    // SAFETY: `off` was recorded by init_fast_tls for TLS (a `Cell<*mut u64>`).
    let p = unsafe { fs_read(off) } as *mut u64;
    if p.is_null() {
        None
    } else {
        // SAFETY: a non-null TLS value was stored by `claim`.
        Some(unsafe { header_of(p) })
    }
}

/// This thread's [`NEST`] (fast path as in [`current_fast`]). Async-signal-safe.
#[inline(always)]
pub fn nest_fast() -> u64 {
    let off = FAST_NEST.load(Ordering::Relaxed);
    if off == 0 {
        return NEST.with(|n| n.get());
    }
    // SAFETY: `off` was recorded by init_fast_tls for NEST (a `Cell<u64>`).
    unsafe { fs_read(off) }
}

/// Adds `delta` (wrapping) to this thread's [`NEST`] with one instruction (a signal
/// handler on this thread, which restores what it changes before returning, sees the
/// value before or after). Async-signal-safe.
#[inline(always)]
pub fn nest_add_fast(delta: u64) {
    let off = FAST_NEST.load(Ordering::Relaxed);
    if off == 0 {
        NEST.with(|n| n.set(n.get().wrapping_add(delta)));
        return;
    }
    // SAFETY: `off` was recorded by init_fast_tls for NEST (a `Cell<u64>`); only this
    // thread (and its signal handlers, which restore it) writes it.
    unsafe {
        std::arch::asm!("add qword ptr fs:[{o}], {d}", o = in(reg) off, d = in(reg) delta,
            options(nostack))
    };
}

/// Takes this thread's [`DEFERRED`] flag (returns it and clears it). Async-signal-safe.
#[inline(always)]
pub fn take_deferred_fast() -> u64 {
    let off = FAST_DEFERRED.load(Ordering::Relaxed);
    if off == 0 {
        return DEFERRED.with(|d| d.replace(0));
    }
    // SAFETY: `off` was recorded by init_fast_tls for DEFERRED (a `Cell<u64>`).
    let v = unsafe { fs_read(off) };
    if v != 0 {
        // SAFETY: `off` was recorded by init_fast_tls for DEFERRED (a `Cell<u64>`); only
        // this thread (and its signal handler, which only sets it to 1, like the
        // `Cell::replace` this replaces) writes it.
        unsafe {
            std::arch::asm!("mov qword ptr fs:[{o}], 0", o = in(reg) off,
                options(nostack, preserves_flags))
        };
    }
    v
}

/// Every block ever mapped (index = block number). Never shrinks.
static BLOCKS: [AtomicPtr<Header>; MAX_BLOCKS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_BLOCKS];
/// Number of entries of `BLOCKS` in use.
static MAPPED: AtomicUsize = AtomicUsize::new(0);

/// The header of the block whose counters start at `counters`.
///
/// # Safety
/// `counters` must be a value stored in [`TLS`] by [`claim`] (non-null).
#[inline(always)]
pub unsafe fn header_of(counters: *mut u64) -> &'static Header {
    // SAFETY: blocks are never unmapped and the header is HEADER_BYTES below the
    // counters (caller's precondition).
    unsafe { &*(counters.cast::<u8>().sub(HEADER_BYTES).cast::<Header>()) }
}

/// The calling thread's header, if it has a block. Async-signal-safe.
#[inline(always)]
pub fn current() -> Option<&'static Header> {
    let p = TLS.with(|t| t.get());
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null TLS values are only ever set by `claim`.
        Some(unsafe { header_of(p) })
    }
}

/// Gives the calling thread a block from the pool, if it has none. Lock-free, no
/// system call, no allocation. Async-signal-safe. Returns None when the pool is empty.
pub fn claim(tid: u32) -> Option<&'static Header> {
    if let Some(h) = current() {
        return Some(h);
    }
    if nest_fast() >= AGENT_NEST {
        // The agent's own threads never get a block (see `AGENT_NEST`).
        return None;
    }
    let n = MAPPED.load(Ordering::Acquire);
    for b in BLOCKS.iter().take(n) {
        let h = b.load(Ordering::Acquire);
        if h.is_null() {
            continue;
        }
        // SAFETY: mapped blocks are never unmapped.
        let header = unsafe { &*h };
        if header
            .tid
            .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: counters follow the header inside the same mapping.
            let counters = unsafe { h.cast::<u8>().add(HEADER_BYTES).cast::<u64>() };
            TLS.with(|t| t.set(counters));
            return Some(header);
        }
    }
    None
}

/// `tid` of the shared overflow block: never a thread id (tids are < 2^22).
pub const OVERFLOW_TID: u32 = u32::MAX;
/// The shared overflow block (null until [`init_overflow`]).
static OVERFLOW: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());

/// Reserves the shared overflow block (agent start, once): threads that find the pool
/// empty (short-lived threads created faster than the agent thread recycles blocks)
/// count there with atomic adds instead of losing their calls. It is never claimed by
/// a thread, never released, and never looked up by tid.
/// Agent thread only (it may allocate or lock).
pub fn init_overflow() -> std::io::Result<()> {
    if !OVERFLOW.load(Ordering::Acquire).is_null() {
        return Ok(());
    }
    refill(1)?;
    for h in all() {
        if h.tid
            .compare_exchange(0, OVERFLOW_TID, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            OVERFLOW.store(h as *const Header as *mut Header, Ordering::Release);
            return Ok(());
        }
    }
    Err(std::io::Error::other(
        "no free thread block for the overflow block",
    ))
}

/// The shared overflow block, once reserved. Async-signal-safe.
#[inline]
pub fn overflow() -> Option<&'static Header> {
    let p = OVERFLOW.load(Ordering::Acquire);
    // SAFETY: a non-null value is a mapped block header; blocks are never unmapped.
    (!p.is_null()).then(|| unsafe { &*p })
}

impl Header {
    /// Whether this is the shared overflow block (see [`init_overflow`]).
    pub fn is_overflow(&self) -> bool {
        self.tid.load(Ordering::Acquire) == OVERFLOW_TID
    }

    /// Adds 1 to counter `idx` atomically (the overflow block has many writers).
    /// Async-signal-safe.
    #[inline]
    pub fn counter_add_atomic(&self, idx: u32) {
        // SAFETY: idx < COUNTERS (handed out by `counters.rs`); the counter is an
        // 8-byte aligned u64 inside this block's mapping, and every writer of the
        // overflow block's counters goes through this atomic add.
        unsafe { AtomicU64::from_ptr(self.counters().add(idx as usize)) }
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Number of free blocks in the pool.
/// Agent thread only (it may allocate or lock).
pub fn free_blocks() -> usize {
    all().filter(|h| h.tid.load(Ordering::Acquire) == 0).count()
}

/// Maps blocks until at least `want` are free.
/// Agent thread only (it may allocate or lock).
pub fn refill(want: usize) -> std::io::Result<()> {
    let mut free = free_blocks();
    while free < want {
        let n = MAPPED.load(Ordering::Acquire);
        if n >= MAX_BLOCKS {
            return Err(std::io::Error::other("thread block table full"));
        }
        // SAFETY: anonymous private mapping, no address hint; checked for failure.
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
            return Err(std::io::Error::last_os_error());
        }
        BLOCKS[n].store(p.cast(), Ordering::Release);
        MAPPED.store(n + 1, Ordering::Release);
        free += 1;
    }
    Ok(())
}

/// Every mapped block's header.
pub fn all() -> impl Iterator<Item = &'static Header> {
    let n = MAPPED.load(Ordering::Acquire);
    BLOCKS.iter().take(n).filter_map(|b| {
        let h = b.load(Ordering::Acquire);
        // SAFETY: mapped blocks are never unmapped.
        (!h.is_null()).then(|| unsafe { &*h })
    })
}

impl Header {
    /// The counters of this block.
    pub fn counters(&self) -> *mut u64 {
        // SAFETY: counters follow the header inside the same mapping.
        unsafe {
            (self as *const Header as *mut u8)
                .add(HEADER_BYTES)
                .cast::<u64>()
        }
    }

    /// The event ring's slots.
    pub fn ring(&self) -> *mut u8 {
        // SAFETY: the ring follows the counters inside the same mapping.
        unsafe { self.counters().add(COUNTERS).cast::<u8>() }
    }

    /// The shadow stack's frames (owner thread only, see the module comment).
    pub fn shadow(&self) -> *mut Frame {
        // SAFETY: the shadow stack follows the ring inside the same mapping.
        unsafe { self.ring().add(RING_SLOTS * EVENT_BYTES).cast::<Frame>() }
    }

    /// Reads counter `idx` (written only by the owner thread; an aligned 8-byte load is
    /// never torn on x86_64).
    pub fn counter(&self, idx: u32) -> u64 {
        debug_assert!((idx as usize) < COUNTERS);
        // SAFETY: idx < COUNTERS; the volatile read keeps the compiler from caching a
        // value another thread keeps changing.
        unsafe { self.counters().add(idx as usize).read_volatile() }
    }

    /// Zeroes counter `idx`. Only when no thread can increment it (after a grace
    /// period, or for a free block).
    pub fn reset_counter(&self, idx: u32) {
        // SAFETY: as in `counter`; no concurrent writer by the caller's precondition.
        unsafe { self.counters().add(idx as usize).write_volatile(0) }
    }

    /// Returns the block to the pool (its thread exited). The caller folded its
    /// counters first; they are zeroed here for the next owner.
    pub fn release(&self, live_indexes: impl Iterator<Item = u32>) {
        for i in live_indexes {
            self.reset_counter(i);
        }
        self.nesting.store(0, Ordering::Relaxed);
        self.qs_epoch.store(0, Ordering::Relaxed);
        self.seq.store(0, Ordering::Relaxed);
        self.ring_head.store(0, Ordering::Relaxed);
        self.ring_tail.store(0, Ordering::Relaxed);
        self.shadow_top.store(0, Ordering::Relaxed);
        self.tid.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_block_is_reserved_once_counts_atomically_and_is_never_claimed() {
        init_overflow().unwrap();
        let o = overflow().expect("reserved");
        assert!(o.is_overflow());
        init_overflow().unwrap();
        assert!(std::ptr::eq(o, overflow().unwrap()), "reserved once");
        // A high index no other test of this process uses.
        let idx = (COUNTERS - 7) as u32;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        overflow().unwrap().counter_add_atomic(idx);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(o.counter(idx), 40_000, "no increment lost");
        o.reset_counter(idx);
        // Threads claiming blocks never get it.
        let claimed = std::thread::spawn(|| claim(4242).map(|h| h as *const Header as usize))
            .join()
            .unwrap();
        if let Some(h) = claimed {
            assert_ne!(h, o as *const Header as usize);
            // SAFETY: the block the thread claimed; it has exited.
            unsafe { &*(h as *const Header) }.release(std::iter::empty());
        }
    }

    #[test]
    fn tls_offsets_are_static() {
        let (tls, nest) = tls_offsets().expect("static TLS");
        assert_ne!(tls, nest);
        // Reading through fs with the offset gives the same value as the thread-local.
        NEST.with(|n| n.set(42));
        let v: u64;
        // SAFETY: the offset was just computed for this thread's static TLS block.
        unsafe {
            std::arch::asm!("mov {v}, qword ptr fs:[{o}]", v = out(reg) v, o = in(reg) nest as i64)
        };
        assert_eq!(v, 42);
        NEST.with(|n| n.set(0));
    }

    #[test]
    fn threads_claim_distinct_blocks_without_syscalls() {
        refill(4).unwrap();
        let a = std::thread::spawn(|| claim(111).map(|h| h as *const Header as usize))
            .join()
            .unwrap()
            .unwrap();
        let b = std::thread::spawn(|| claim(222).map(|h| h as *const Header as usize))
            .join()
            .unwrap()
            .unwrap();
        assert_ne!(a, b);
        let owners: Vec<u32> = all().map(|h| h.tid.load(Ordering::Relaxed)).collect();
        assert!(owners.contains(&111) && owners.contains(&222));
        for h in all() {
            let t = h.tid.load(Ordering::Relaxed);
            if t == 111 || t == 222 {
                h.release(std::iter::empty());
            }
        }
    }
}
