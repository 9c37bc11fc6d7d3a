//! Trampoline memory within ±2 GiB of the code it serves (reachable by `call rel32`).
//!
//! Memory comes in chunks of [`CHUNK_BYTES`], mapped with `MAP_FIXED_NOREPLACE` in the
//! free gap of `/proc/self/maps` closest to the code (below it first, which keeps clear
//! of a `brk` heap that grows up from the executable; never within 256 MiB below the
//! main stack). A chunk is handed out in slots of whole [`GRANULE`]s, first fit.
//!
//! W^X: a new chunk is mapped read-write and filled with `0xCC`; the first slot written
//! into it is copied directly, then the chunk is made read-execute for good. Later
//! slots of a read-execute chunk (and poisoning) are written through `/proc/self/mem`
//! (see [`crate::control::patch::poke`]), which writes through page protections, so no page is
//! ever writable and executable at once, and no page that may be executing is ever
//! made non-executable. A new slot is not reachable by any thread until a site is
//! patched to call it, and the patching protocol serializes every core first.
//!
//! [`Arena::free`] poisons a slot with `0xCC` (int3) before it can be reused, so a
//! thread that returns into freed trampoline memory traps loudly. Chunks are never
//! unmapped.

use std::sync::Mutex;

use crate::sys::errno;
use crate::sys::procfs::{self, Mapping};

/// Size of one chunk of trampoline memory.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Allocation unit (and slot alignment).
pub const GRANULE: usize = 64;
const GRANULES: usize = CHUNK_BYTES / GRANULE;
const LOWEST: usize = 1 << 20;
const TASK_TOP: usize = 0x7fff_ffff_f000;
const STACK_KEEPOUT: usize = 256 << 20;

/// Whether `disp = to - next_ip` fits a rel32.
#[cfg(test)]
pub fn rel32_reachable(next_ip: usize, to: usize) -> bool {
    i32::try_from((to as i64).wrapping_sub(next_ip as i64)).is_ok()
}

/// A range `[lo, hi)` of acceptable slot start addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub lo: usize,
    pub hi: usize,
}

impl Window {
    /// Slot addresses a `call rel32` at `site` (5 bytes long) can reach.
    pub fn for_call_from(site: usize) -> Window {
        let next = site + 5;
        Window {
            lo: next.saturating_sub(1 << 31),
            hi: next.saturating_add((1 << 31) - 1),
        }
    }
    /// Slot addresses reachable from every site in `sites` (None if they are too far
    /// apart to share a trampoline).
    pub fn for_calls_from(sites: &[usize]) -> Option<Window> {
        let mut w = Window {
            lo: 0,
            hi: usize::MAX,
        };
        for &s in sites {
            w = w.intersect(Window::for_call_from(s))?;
        }
        Some(w)
    }
    pub fn intersect(self, o: Window) -> Option<Window> {
        let w = Window {
            lo: self.lo.max(o.lo),
            hi: self.hi.min(o.hi),
        };
        (w.lo < w.hi).then_some(w)
    }
    pub fn contains(&self, a: usize) -> bool {
        self.lo <= a && a < self.hi
    }
    fn center(&self) -> usize {
        self.lo + (self.hi - self.lo) / 2
    }
}

/// A piece of trampoline memory. Not `Clone`: freeing consumes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    addr: usize,
    len: usize,
}

impl Slot {
    pub fn addr(&self) -> usize {
        self.addr
    }
    /// Length in bytes (whole granules).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }
}

/// Errors of the arena.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ArenaError {
    #[error("a slot of {0} bytes is larger than a chunk ({CHUNK_BYTES} bytes)")]
    TooLarge(usize),
    #[error("no free address space within ±2 GiB of {near:#x}")]
    NoSpaceNear { near: usize },
    #[error("{op} failed with errno {errno}")]
    Os { op: &'static str, errno: i32 },
    #[error("slot {addr:#x}+{len} does not belong to this arena")]
    NotOurs { addr: usize, len: usize },
}

struct Chunk {
    base: usize,
    sealed: bool,
    used: [u64; GRANULES / 64],
}

impl Chunk {
    fn is_used(&self, g: usize) -> bool {
        self.used[g / 64] & (1 << (g % 64)) != 0
    }
    fn set(&mut self, g: usize, n: usize, v: bool) {
        for i in g..g + n {
            if v {
                self.used[i / 64] |= 1 << (i % 64);
            } else {
                self.used[i / 64] &= !(1 << (i % 64));
            }
        }
    }
    /// First run of `n` free granules whose address lies in `w`.
    fn find(&self, n: usize, w: Window) -> Option<usize> {
        let mut g = 0;
        while g + n <= GRANULES {
            let addr = self.base + g * GRANULE;
            if !w.contains(addr) {
                g += 1;
                continue;
            }
            match (g..g + n).find(|&i| self.is_used(i)) {
                Some(u) => g = u + 1,
                None => return Some(g),
            }
        }
        None
    }
}

/// The trampoline arena.
#[derive(Default)]
pub struct Arena {
    chunks: Mutex<Vec<Chunk>>,
}

impl Arena {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocates `len` bytes whose start address lies in `w`.
    pub fn alloc(&self, w: Window, len: usize) -> Result<Slot, ArenaError> {
        if len > CHUNK_BYTES || len == 0 {
            return Err(ArenaError::TooLarge(len));
        }
        let n = len.div_ceil(GRANULE);
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        for c in chunks.iter_mut() {
            if let Some(g) = c.find(n, w) {
                c.set(g, n, true);
                crate::hot::stats::bump(&crate::hot::stats::SLOTS_ALLOCATED);
                return Ok(Slot {
                    addr: c.base + g * GRANULE,
                    len: n * GRANULE,
                });
            }
        }
        let base = map_chunk_in(w)?;
        let mut c = Chunk {
            base,
            sealed: false,
            used: [0; GRANULES / 64],
        };
        let g = c
            .find(n, w)
            .ok_or(ArenaError::NoSpaceNear { near: w.center() })?;
        c.set(g, n, true);
        chunks.push(c);
        crate::hot::stats::bump(&crate::hot::stats::SLOTS_ALLOCATED);
        Ok(Slot {
            addr: base + g * GRANULE,
            len: n * GRANULE,
        })
    }

    /// Writes `bytes` at the start of `slot` and makes its chunk executable.
    pub fn write_and_seal(&self, slot: &Slot, bytes: &[u8]) -> Result<(), ArenaError> {
        assert!(bytes.len() <= slot.len, "code larger than its slot");
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let c = chunk_of(&mut chunks, slot)?;
        if c.sealed {
            crate::control::patch::poke(slot.addr, bytes).map_err(|e| ArenaError::Os {
                op: "pwrite /proc/self/mem",
                errno: e.raw_os_error().unwrap_or(0),
            })?;
        } else {
            // SAFETY: the chunk is still read-write and not executable, no thread can
            // run it, and the slot lies inside it and is reserved for this caller.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.addr as *mut u8, bytes.len())
            };
            // SAFETY: the chunk is our own mapping of CHUNK_BYTES at `base`.
            let rc = unsafe {
                libc::mprotect(
                    c.base as *mut libc::c_void,
                    CHUNK_BYTES,
                    libc::PROT_READ | libc::PROT_EXEC,
                )
            };
            if rc != 0 {
                return Err(ArenaError::Os {
                    op: "mprotect",
                    errno: errno(),
                });
            }
            c.sealed = true;
        }
        Ok(())
    }

    /// Poisons `slot` with `0xCC` and returns it to the free space. The caller
    /// guarantees (grace period) that no thread executes or returns into it.
    pub fn free(&self, slot: Slot) -> Result<(), ArenaError> {
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let c = chunk_of(&mut chunks, &slot)?;
        let poison = vec![0xCCu8; slot.len];
        if c.sealed {
            crate::control::patch::poke(slot.addr, &poison).map_err(|e| ArenaError::Os {
                op: "pwrite /proc/self/mem",
                errno: e.raw_os_error().unwrap_or(0),
            })?;
        } else {
            // SAFETY: unsealed chunk: writable, never executed; the slot is ours.
            unsafe { std::ptr::write_bytes(slot.addr as *mut u8, 0xCC, slot.len) };
        }
        let g = (slot.addr - c.base) / GRANULE;
        c.set(g, slot.len / GRANULE, false);
        crate::hot::stats::bump(&crate::hot::stats::SLOTS_FREED);
        Ok(())
    }

    /// Address ranges of every chunk mapped so far, in mapping order (chunks are never
    /// unmapped, so a prefix seen earlier stays the same).
    pub fn chunk_ranges(&self) -> Vec<(usize, usize)> {
        let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        chunks
            .iter()
            .map(|c| (c.base, c.base + CHUNK_BYTES))
            .collect()
    }

    /// Number of chunks mapped.
    #[cfg(test)]
    pub fn chunk_count(&self) -> usize {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn chunk_of<'a>(chunks: &'a mut [Chunk], slot: &Slot) -> Result<&'a mut Chunk, ArenaError> {
    chunks
        .iter_mut()
        .find(|c| c.base <= slot.addr && slot.addr + slot.len <= c.base + CHUNK_BYTES)
        .ok_or(ArenaError::NotOurs {
            addr: slot.addr,
            len: slot.len,
        })
}

/// Whether `len` bytes at `addr` (readable memory) are all `0xCC`.
#[cfg(test)]
pub fn is_poisoned(addr: usize, len: usize) -> bool {
    (0..len).all(|i| {
        // SAFETY: the caller passes readable memory (an arena slot: never unmapped).
        unsafe { std::ptr::read_volatile((addr + i) as *const u8) == 0xCC }
    })
}

/// `/proc/self/maps` as sorted `(start, end, is_main_stack)` ranges.
pub(crate) fn ranges_of(maps: &[Mapping]) -> Vec<(usize, usize, bool)> {
    let mut v: Vec<(usize, usize, bool)> = maps
        .iter()
        .map(|m| {
            let stack = m.path.as_deref().is_some_and(|p| p.ends_with("[stack]"));
            (m.start as usize, m.end as usize, stack)
        })
        .collect();
    v.sort_unstable();
    v
}

/// Candidate chunk bases inside `w`, best first: the closest free gap below the
/// window's center, then above it.
pub fn candidates(maps: &[(usize, usize, bool)], w: Window) -> Vec<usize> {
    let center = w.center();
    let mut gaps = Vec::new();
    let mut prev_end = LOWEST;
    let mut keepout = Vec::new();
    for &(a, b, stack) in maps {
        if stack {
            keepout.push((a.saturating_sub(STACK_KEEPOUT), b));
        }
        if a > prev_end {
            gaps.push((prev_end, a));
        }
        prev_end = prev_end.max(b);
    }
    if prev_end < TASK_TOP {
        gaps.push((prev_end, TASK_TOP));
    }
    let align_up = |x: usize| x.div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
    let align_down = |x: usize| x / CHUNK_BYTES * CHUNK_BYTES;
    let mut below = Vec::new();
    let mut above = Vec::new();
    for (g0, g1) in gaps {
        let lo = align_up(g0.max(w.lo));
        let hi = align_down(g1.min(w.hi));
        if hi < lo + CHUNK_BYTES {
            continue;
        }
        // Closest to the center within this gap.
        let base = if hi <= center {
            hi - CHUNK_BYTES
        } else if lo >= center {
            lo
        } else {
            align_down(center).clamp(lo, hi - CHUNK_BYTES)
        };
        if keepout
            .iter()
            .any(|&(k0, k1)| base < k1 && base + CHUNK_BYTES > k0)
        {
            continue;
        }
        if base < center {
            below.push((center - base, base));
        } else {
            above.push((base - center, base));
        }
    }
    below.sort_unstable();
    above.sort_unstable();
    below.into_iter().chain(above).map(|(_, b)| b).collect()
}

fn map_chunk_in(w: Window) -> Result<usize, ArenaError> {
    for _attempt in 0..8 {
        let maps = procfs::read_maps().map_err(|e| ArenaError::Os {
            op: "read /proc/self/maps",
            errno: e.raw_os_error().unwrap_or(0),
        })?;
        let cands = candidates(&ranges_of(&maps), w);
        if cands.is_empty() {
            break;
        }
        for base in cands.into_iter().take(4) {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; on old
            // kernels that ignore it the result is checked below.
            let p = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    CHUNK_BYTES,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                continue; // EEXIST: raced with another mapping; try the next.
            }
            if p as usize != base || !w.contains(base) {
                // SAFETY: `p` is the mapping we just made and nobody else knows it.
                unsafe { libc::munmap(p, CHUNK_BYTES) };
                continue;
            }
            // SAFETY: fresh read-write mapping of CHUNK_BYTES.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0xCC, CHUNK_BYTES) };
            return Ok(base);
        }
    }
    Err(ArenaError::NoSpaceNear { near: w.center() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms_of(addr: usize) -> String {
        for m in procfs::read_maps().unwrap() {
            if m.start as usize <= addr && addr < m.end as usize {
                return String::from_utf8_lossy(&m.perms).into_owned();
            }
        }
        panic!("{addr:#x} not mapped");
    }

    #[inline(never)]
    fn some_code() -> usize {
        some_code as *const () as usize
    }

    #[test]
    fn slots_are_reachable_executable_and_poisoned_when_freed() {
        let arena = Arena::new();
        for near in [some_code(), libc::getpid as *const () as usize] {
            let w = Window::for_call_from(near);
            // mov eax, 42; ret
            let code = [0xB8, 42, 0, 0, 0, 0xC3];
            let install = || {
                let slot = arena.alloc(w, code.len()).unwrap();
                arena.write_and_seal(&slot, &code).unwrap();
                slot
            };
            let slot = install();
            assert!(rel32_reachable(near + 5, slot.addr()));
            assert_eq!(slot.addr() % GRANULE, 0);
            assert_eq!(perms_of(slot.addr()), "r-xp", "W^X: sealed chunk is r-x");
            // SAFETY: the slot holds `mov rax, 42; ret`, sealed executable.
            let f: extern "C" fn() -> u64 = unsafe { std::mem::transmute(slot.addr()) };
            assert_eq!(f(), 42);
            // A second slot goes into the sealed chunk through /proc/self/mem.
            let slot2 = install();
            assert_ne!(slot2.addr(), slot.addr());
            // SAFETY: the second slot holds the same `mov rax, 42; ret`, sealed executable.
            let f2: extern "C" fn() -> u64 = unsafe { std::mem::transmute(slot2.addr()) };
            assert_eq!(f2(), 42);
            let (addr, len) = (slot.addr(), slot.len());
            arena.free(slot).unwrap();
            assert!(is_poisoned(addr, len), "freed slot is all int3");
            assert_eq!(perms_of(addr), "r-xp");
            // The freed space is reused.
            let again = arena.alloc(w, len).unwrap();
            assert_eq!(again.addr(), addr);
            arena.free(again).unwrap();
            arena.free(slot2).unwrap();
        }
        assert!(arena.chunk_count() >= 1);
    }

    #[test]
    fn unsealed_slot_is_poisoned_too() {
        let arena = Arena::new();
        let w = Window::for_call_from(some_code());
        let s = arena.alloc(w, 100).unwrap();
        assert_eq!(s.len(), 128);
        assert_eq!(perms_of(s.addr()), "rw-p");
        let (a, l) = (s.addr(), s.len());
        arena.free(s).unwrap();
        assert!(is_poisoned(a, l));
    }

    #[test]
    fn windows_and_candidates() {
        let w = Window::for_call_from(0x5555_0000_0000);
        assert!(w.contains(0x5555_0000_0005 - (1 << 31)));
        assert!(!w.contains(0x5555_0000_0004 - (1 << 31)));
        assert!(Window::for_calls_from(&[0x1000_0000, 0x1_9000_0000]).is_none());
        let maps = ranges_of(&procfs::parse_maps(
            "555500000000-555500100000 r-xp 0 0:0 0 /bin/x\n\
             555500100000-555500200000 rw-p 0 0:0 0 [heap]\n\
             7ffff0000000-7ffff0021000 rw-p 0 0:0 0 [stack]\n",
        ));
        let c = candidates(&maps, w);
        assert_eq!(c[0], 0x5555_0000_0000 - CHUNK_BYTES, "closest below first");
        assert!(c.iter().all(|&b| w.contains(b) && b % CHUNK_BYTES == 0));
        // Nothing inside the stack keep-out.
        let ws = Window::for_call_from(0x7fff_e000_0000);
        assert!(
            candidates(&maps, ws)
                .iter()
                .all(|&b| b + CHUNK_BYTES <= 0x7fff_f000_0000 - STACK_KEEPOUT
                    || b >= 0x7fff_f002_1000)
        );
        let big = Arena::new();
        assert!(matches!(
            big.alloc(w, CHUNK_BYTES + 1),
            Err(ArenaError::TooLarge(_))
        ));
    }

    /// A thread that executes freed (poisoned) trampoline memory is reported on stderr
    /// and the process dies by SIGTRAP (run in a forked child): the trap
    /// handler (`hot::trap`) recognizes the arena's poison.
    #[test]
    fn executing_a_freed_slot_is_reported_and_fatal() {
        use crate::hot::trap::{POISON_MARKER, ensure_installed};
        let arena = Arena::new();
        let near = executing_a_freed_slot_is_reported_and_fatal as *const () as usize;
        let slot = arena.alloc(Window::for_call_from(near), 64).unwrap();
        // `ret`: a valid function until freed.
        arena.write_and_seal(&slot, &[0xC3]).unwrap();
        let addr = slot.addr();
        arena.free(slot).unwrap();
        assert!(is_poisoned(addr, 64));
        for (s, e) in arena.chunk_ranges() {
            assert!(crate::hot::ranges::add_range(s as u64, e as u64));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe with a valid out array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only calls async-signal-safe functions and our handler
        // installation (sigaction, one allocation) before it dies.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: in the child: redirect stderr, install the handler, call the
            // poisoned slot (it traps at once).
            unsafe {
                libc::dup2(fds[1], 2);
                if ensure_installed().is_err() {
                    libc::_exit(3);
                }
                let f: extern "C" fn() = std::mem::transmute(addr);
                f();
                libc::_exit(4);
            }
        }
        // SAFETY: closing our copy of the write end; waiting for our child.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waiting for our own child, with a valid status out pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: reading into a valid buffer from our pipe.
            let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        let text = String::from_utf8_lossy(&out);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTRAP,
            "child status {status:#x}, stderr {text:?}"
        );
        assert!(text.starts_with(POISON_MARKER), "{text:?}");
        assert!(
            text.contains(&format!("trampoline memory at 0x{addr:016x}")),
            "{text:?}"
        );
    }
}
