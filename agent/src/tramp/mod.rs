//! Machine code of trampolines (pure: bytes for a given slot address, unit-tested).
//!
//! A trampoline slot serves one callback group for the sites within rel32 reach of it:
//! ```text
//!   +0   descriptor pointer   (data)
//!   +8   entry stub address   (data: dispatch::generic_entry)
//!   +16  generic stub:  push qword [rip-22] ; jmp qword [rip-20]
//!   +32  count stubs, one per site (single-`count` groups only), COUNT_STUB bytes each:
//!          push r11
//!          mov  r11, fs:[TLS]          ; this thread's counters (null: no block yet)
//!          test r11, r11
//!          jz   slow
//!          inc  qword [r11 + 8*idx]    ; exact, owner-only, no lock
//!          pop  r11
//!          ret
//!    slow: pop  r11
//!          jmp  generic stub           ; dispatch claims a block and counts
//!   +32  or, for a group of one `trace` tracer, one trace stub shared by all sites
//!        ([`trace_stub`]): it writes the entry event straight into the thread's ring
//!        (rdtsc, site = return address - 5, tracer, tid, the first `nargs` argument
//!        registers) or bumps the tracer's dropped-events counter when the ring is full.
//!   then, in a slot serving relocated prologues (issue 11), after the stubs (and, for a
//!   trace group, a second trace stub that takes the site from the thunk's record), one
//!   thunk per relocated site, 16-byte aligned (`generate_with_thunks`):
//!   -24  record: replaced length, moved-instruction count, (old, new) offsets of
//!        their boundaries (`ThunkRecord`, read by the quiescent-state handler)
//!   -8   the site's address (data: what events and callbacks name)
//!   +0   call <the site's count stub / the thunk trace stub / the generic stub>
//!   +5   the relocated prologue, ending with `jmp` back to the function
//! ```
//! A relocated site is `jmp thunk`: at the thunk's `call` the stack is the function's
//! entry stack, so the stubs see the frame an fentry site gives them, with a return
//! address into the thunk; the dispatcher and the thunk trace stub read the site from
//! the word just before the `call` (`[ret - 13]`), the fentry trace stub keeps
//! `ret - 5`.
//!
//! Sites call the generic stub (any group) or their own count / the trace stub. The
//! generic stub pushes the descriptor and jumps to the static entry stub, so a thread
//! spends only two instructions in trampoline memory per call on that path.
//!
//! The count and trace stubs call nothing and touch only the registers they push (and
//! the flags, dead at a function entry), so the traced function's vector arguments need
//! no saving; a thread executing them is inside trampoline memory for the quiescent-state
//! check (its PC says so), like any trampoline code.

use crate::hot::block::{self, Header};
use relocate::{Prologue, Refusal};

/// Prologue relocation for functions built without instrumentation (issue 11: analysis
/// and re-encoding are done and tested here; the installer does not use them yet).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod relocate;

/// Offset of the generic stub in a slot.
pub const GENERIC: usize = 16;
/// Offset of the first count stub.
pub const COUNT_BASE: usize = 32;
/// Bytes per count stub.
pub const COUNT_STUB: usize = 48;

/// What a slot contains.
pub enum Layout<'a> {
    /// Only the generic stub.
    Generic,
    /// Count stubs for these counter indexes (one per site, in site order).
    Count { idx: &'a [u32], tls_offset: i32 },
    /// One trace stub for every site of the slot.
    Trace {
        tracer: u64,
        nargs: u32,
        dropped_idx: u32,
        tls_offset: i32,
    },
}

/// Bytes needed for a slot.
pub fn slot_len(layout: &Layout<'_>) -> usize {
    match layout {
        Layout::Generic => COUNT_BASE,
        Layout::Count { idx, .. } => COUNT_BASE + idx.len() * COUNT_STUB,
        Layout::Trace { nargs, .. } => COUNT_BASE + trace_stub(0, *nargs, 0, 0).len(),
    }
}

/// Offset of the code site `i` must call.
pub fn site_entry(layout: &Layout<'_>, i: usize) -> usize {
    match layout {
        Layout::Generic => GENERIC,
        Layout::Count { .. } => COUNT_BASE + i * COUNT_STUB,
        Layout::Trace { .. } => COUNT_BASE,
    }
}

/// The slot's bytes (position-independent: only RIP-relative references inside the
/// slot, so the slot address is not needed).
pub fn generate(layout: &Layout<'_>, descriptor: u64, entry: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(slot_len(layout));
    b.extend_from_slice(&descriptor.to_le_bytes());
    b.extend_from_slice(&entry.to_le_bytes());
    // push qword [rip + (0 - 22)]
    b.extend_from_slice(&[0xFF, 0x35]);
    b.extend_from_slice(&(0i32 - (GENERIC as i32 + 6)).to_le_bytes());
    // jmp qword [rip + (8 - 28)]
    b.extend_from_slice(&[0xFF, 0x25]);
    b.extend_from_slice(&(8i32 - (GENERIC as i32 + 12)).to_le_bytes());
    b.resize(COUNT_BASE, 0xCC);
    if let Layout::Count { idx, tls_offset } = layout {
        for &i in idx.iter() {
            let start = b.len();
            b.extend_from_slice(&[0x41, 0x53]); // push r11
            b.extend_from_slice(&[0x64, 0x4C, 0x8B, 0x1C, 0x25]); // mov r11, fs:[disp32]
            b.extend_from_slice(&tls_offset.to_le_bytes());
            b.extend_from_slice(&[0x4D, 0x85, 0xDB]); // test r11, r11
            b.extend_from_slice(&[0x74, 10]); // jz slow (+10: inc 7, pop 2, ret 1)
            b.extend_from_slice(&[0x49, 0xFF, 0x83]); // inc qword [r11 + disp32]
            b.extend_from_slice(&(i as i32 * 8).to_le_bytes());
            b.extend_from_slice(&[0x41, 0x5B, 0xC3]); // pop r11; ret
            b.extend_from_slice(&[0x41, 0x5B]); // slow: pop r11
            let next = b.len() + 5;
            b.push(0xE9); // jmp GENERIC
            b.extend_from_slice(&(GENERIC as i32 - next as i32).to_le_bytes());
            b.resize(start + COUNT_STUB, 0xCC);
        }
    }
    if let Layout::Trace {
        tracer,
        nargs,
        dropped_idx,
        tls_offset,
    } = layout
    {
        b.extend_from_slice(&trace_stub(*tracer, *nargs, *dropped_idx, *tls_offset));
    }
    b
}

/// Offsets from a block's `counters[0]` (where the thread's TLS word points) of the
/// header fields the trace stub uses, from the header's own layout.
const HDR_TID: i8 = from_counters(std::mem::offset_of!(Header, tid));
const HDR_RING_HEAD: i8 = from_counters(std::mem::offset_of!(Header, ring_head));
const HDR_RING_TAIL: i8 = from_counters(std::mem::offset_of!(Header, ring_tail));

/// The displacement from `counters[0]` of the header field at offset `off` (the header
/// sits just below the counters), checked at compile time to fit the stub's `disp8`.
const fn from_counters(off: usize) -> i8 {
    let d = off as isize - block::HEADER_BYTES as isize;
    assert!(
        d >= i8::MIN as isize && d < 0,
        "header field out of disp8 reach"
    );
    d as i8
}
const RING_FROM_COUNTERS: u32 = (block::COUNTERS * 8) as u32;
const _: () = {
    assert!(block::RING_SLOTS.is_power_of_two() && block::RING_SLOTS < 1 << 31);
    assert!(block::EVENT_BYTES == 80);
    assert!(block::HEADER_BYTES == 64);
};

/// The trace stub (position-independent; its slow path jumps to the slot's generic
/// stub at [`GENERIC`], so it must sit at [`COUNT_BASE`]). The event layout is
/// `hot::ring`'s: `[tsc, site, tracer, tid | nargs << 32, args[0..6]]`.
///
/// ```text
///        push r11
///        mov  r11, fs:[TLS]              ; counters[0] of this thread's block, or null
///        test r11, r11
///        jz   slow
///        push rax ; push rcx ; push rdx ; push rsi
///        mov  rsi, [r11 + HEAD]
///        mov  rcx, rsi
///        sub  rcx, [r11 + TAIL]
///        cmp  rcx, RING_SLOTS
///        jae  full
///        mov  eax, esi ; and eax, RING_SLOTS - 1 ; imul eax, eax, 80
///        lea  rcx, [r11 + rax + RING]      ; the event
///        mov  [rcx + 32 + 8i], arg i       ; i < nargs (rsi, rdx, rcx from the stack)
///        mov  rax, [rsp + 40] ; sub rax, 5 ; mov [rcx + 8], rax     ; site
///        mov  rax, tracer ; mov [rcx + 16], rax
///        mov  eax, [r11 + TID] ; mov [rcx + 24], eax ; mov dword [rcx + 28], nargs
///        rdtsc ; shl rdx, 32 ; or rax, rdx ; mov [rcx], rax
///        inc  rsi ; mov [r11 + HEAD], rsi  ; publish (x86 stores are not reordered)
///   out: pop rsi ; pop rdx ; pop rcx ; pop rax ; pop r11 ; ret
///  full: inc  qword [r11 + 8*dropped_idx] ; jmp out
///  slow: pop  r11 ; jmp GENERIC          ; the dispatcher claims a block and traces
/// ```
/// Only the owner thread writes `ring_head` and its counters (see `block.rs`); the agent
/// thread reads `ring_head` and then the events before it. The new head is stored as
/// computed from the value read (not `inc [head]`): if a signal handler on this thread
/// traces a call in between, its event is overwritten by this one (lost) but no slot is
/// ever published unwritten (the same as `ring::push`).
pub fn trace_stub(tracer: u64, nargs: u32, dropped_idx: u32, tls_offset: i32) -> Vec<u8> {
    trace_stub_at(tracer, nargs, dropped_idx, tls_offset, COUNT_BASE, false)
}

/// The trace stub placed at offset `at` of its slot; with `from_thunk` it is the one
/// relocated sites' thunks call: the site is the word the thunk keeps just before its
/// `call` (`mov rax, [rax - 13]` in place of `sub rax, 5`: same length, same cost).
pub fn trace_stub_at(
    tracer: u64,
    nargs: u32,
    dropped_idx: u32,
    tls_offset: i32,
    at: usize,
    from_thunk: bool,
) -> Vec<u8> {
    let nargs = nargs.min(6);
    let mut b = Vec::with_capacity(160);
    b.extend_from_slice(&[0x41, 0x53]); // push r11
    b.extend_from_slice(&[0x64, 0x4C, 0x8B, 0x1C, 0x25]); // mov r11, fs:[disp32]
    b.extend_from_slice(&tls_offset.to_le_bytes());
    b.extend_from_slice(&[0x4D, 0x85, 0xDB]); // test r11, r11
    b.extend_from_slice(&[0x0F, 0x84]); // jz slow (rel32, patched below)
    let jz_slow = b.len();
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&[0x50, 0x51, 0x52, 0x56]); // push rax; push rcx; push rdx; push rsi
    b.extend_from_slice(&[0x49, 0x8B, 0x73, HDR_RING_HEAD as u8]); // mov rsi, [r11+HEAD]
    b.extend_from_slice(&[0x48, 0x89, 0xF1]); // mov rcx, rsi
    b.extend_from_slice(&[0x49, 0x2B, 0x4B, HDR_RING_TAIL as u8]); // sub rcx, [r11+TAIL]
    b.extend_from_slice(&[0x48, 0x81, 0xF9]); // cmp rcx, imm32
    b.extend_from_slice(&(block::RING_SLOTS as u32).to_le_bytes());
    b.extend_from_slice(&[0x0F, 0x83]); // jae full (rel32, patched below)
    let jae_full = b.len();
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&[0x89, 0xF0]); // mov eax, esi
    b.push(0x25); // and eax, imm32
    b.extend_from_slice(&(block::RING_SLOTS as u32 - 1).to_le_bytes());
    b.extend_from_slice(&[0x6B, 0xC0, block::EVENT_BYTES as u8]); // imul eax, eax, 80
    b.extend_from_slice(&[0x49, 0x8D, 0x8C, 0x03]); // lea rcx, [r11 + rax + disp32]
    b.extend_from_slice(&RING_FROM_COUNTERS.to_le_bytes());
    for i in 0..nargs {
        let disp = 32 + 8 * i as u8;
        match i {
            0 => b.extend_from_slice(&[0x48, 0x89, 0x79, disp]), // mov [rcx+d], rdi
            4 => b.extend_from_slice(&[0x4C, 0x89, 0x41, disp]), // mov [rcx+d], r8
            5 => b.extend_from_slice(&[0x4C, 0x89, 0x49, disp]), // mov [rcx+d], r9
            _ => {
                // rsi / rdx / rcx as pushed: [rsp] / [rsp + 8] / [rsp + 16]
                b.extend_from_slice(&[0x48, 0x8B, 0x44, 0x24, 8 * (i as u8 - 1)]); // mov rax, [rsp+d8]
                b.extend_from_slice(&[0x48, 0x89, 0x41, disp]); // mov [rcx+d], rax
            }
        }
    }
    b.extend_from_slice(&[0x48, 0x8B, 0x44, 0x24, 40]); // mov rax, [rsp+40] (site + 5)
    if from_thunk {
        b.extend_from_slice(&[0x48, 0x8B, 0x40, (-13i8) as u8]); // mov rax, [rax-13]
    } else {
        b.extend_from_slice(&[0x48, 0x83, 0xE8, 0x05]); // sub rax, 5
    }
    b.extend_from_slice(&[0x48, 0x89, 0x41, 0x08]); // mov [rcx+8], rax
    b.extend_from_slice(&[0x48, 0xB8]); // mov rax, imm64
    b.extend_from_slice(&tracer.to_le_bytes());
    b.extend_from_slice(&[0x48, 0x89, 0x41, 0x10]); // mov [rcx+16], rax
    b.extend_from_slice(&[0x41, 0x8B, 0x43, HDR_TID as u8]); // mov eax, [r11+TID]
    b.extend_from_slice(&[0x89, 0x41, 0x18]); // mov [rcx+24], eax
    b.extend_from_slice(&[0xC7, 0x41, 0x1C]); // mov dword [rcx+28], imm32
    b.extend_from_slice(&nargs.to_le_bytes());
    b.extend_from_slice(&[0x0F, 0x31]); // rdtsc
    b.extend_from_slice(&[0x48, 0xC1, 0xE2, 0x20]); // shl rdx, 32
    b.extend_from_slice(&[0x48, 0x09, 0xD0]); // or rax, rdx
    b.extend_from_slice(&[0x48, 0x89, 0x01]); // mov [rcx], rax
    b.extend_from_slice(&[0x48, 0xFF, 0xC6]); // inc rsi
    b.extend_from_slice(&[0x49, 0x89, 0x73, HDR_RING_HEAD as u8]); // mov [r11+HEAD], rsi
    let out = b.len();
    b.extend_from_slice(&[0x5E, 0x5A, 0x59, 0x58, 0x41, 0x5B, 0xC3]); // pop rsi,rdx,rcx,rax,r11; ret
    let full = b.len();
    b.extend_from_slice(&[0x49, 0xFF, 0x83]); // inc qword [r11 + disp32]
    b.extend_from_slice(&(dropped_idx as i32 * 8).to_le_bytes());
    b.push(0xE9); // jmp out
    let next = b.len() + 4;
    b.extend_from_slice(&(out as i32 - next as i32).to_le_bytes());
    let slow = b.len();
    b.extend_from_slice(&[0x41, 0x5B]); // pop r11
    b.push(0xE9); // jmp GENERIC (relative to the slot: this stub starts at `at`)
    let next = at + b.len() + 4;
    b.extend_from_slice(&(GENERIC as i32 - next as i32).to_le_bytes());
    let rel = |b: &mut Vec<u8>, at: usize, to: usize| {
        let d = to as i32 - (at as i32 + 4);
        b[at..at + 4].copy_from_slice(&d.to_le_bytes());
    };
    rel(&mut b, jz_slow, slow);
    rel(&mut b, jae_full, full);
    b
}

/// Bytes of a thunk's record, just before its `call`.
pub const THUNK_RECORD: usize = 24;
/// Bytes of the thunk's `call` to its stub; the relocated copy follows.
pub const THUNK_CALL: usize = 5;
/// The thunk's site word is this many bytes before its `call`.
pub const THUNK_SITE_BACK: u64 = 8;
/// Upper bound (exclusive) of the replaced length of a prologue: whole instructions
/// covering at least 5 bytes, so at most 4 bytes and one 15-byte instruction.
pub const MAX_REPLACED: usize = relocate::JMP_LEN as usize - 1 + 15 + 1;
/// Moved instructions a record can map (at most 5 cover 5 bytes).
const RECORD_PAIRS: usize = 7;

/// A thunk's map of the moved instructions' boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThunkRecord {
    /// Bytes replaced at the site.
    pub len: u8,
    /// Boundaries in `pairs`.
    pub n: u8,
    /// (offset from the site, offset in the relocated copy) of each moved instruction.
    pub pairs: [(u8, u8); RECORD_PAIRS],
}

impl ThunkRecord {
    /// The copy's offset of the moved instruction at `old` bytes from the site.
    /// Async-signal-safe.
    pub fn map(&self, old: u8) -> Option<u8> {
        self.pairs[..(self.n as usize).min(RECORD_PAIRS)]
            .iter()
            .find(|p| p.0 == old)
            .map(|p| p.1)
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0xCC; 16];
        b[0] = self.len;
        b[1] = self.n;
        for (i, (o, n)) in self.pairs.iter().enumerate().take(self.n as usize) {
            b[2 + 2 * i] = *o;
            b[3 + 2 * i] = *n;
        }
        b
    }
}

/// Reads the record of the thunk at `thunk`.
///
/// # Safety
/// `thunk` is the address of a thunk written by [`generate_with_thunks`] whose
/// trampoline memory is still allocated. Async-signal-safe.
pub unsafe fn read_thunk_record(thunk: usize) -> ThunkRecord {
    let base = thunk - THUNK_RECORD;
    // SAFETY: the record's 16 bytes precede the thunk in the same slot (caller).
    let b: [u8; 16] =
        std::array::from_fn(|i| unsafe { std::ptr::read_volatile((base + i) as *const u8) });
    let mut pairs = [(0u8, 0u8); RECORD_PAIRS];
    for (i, p) in pairs.iter_mut().enumerate() {
        *p = (b[2 + 2 * i], b[3 + 2 * i]);
    }
    ThunkRecord {
        len: b[0],
        n: b[1],
        pairs,
    }
}

/// One relocated site of a slot.
pub struct Thunk<'a> {
    /// The site's index in the slot (which count stub it calls).
    pub index: usize,
    /// The site (the patch point: `prologue.patch_at`).
    pub prologue: &'a Prologue,
}

/// Bytes reserved for the thunk of `p` (record, call, relocated copy, 16-byte aligned
/// with room for a re-encoding a few bytes longer at the slot's final address).
pub fn thunk_len(p: &Prologue) -> Result<usize, Refusal> {
    let probe = p.relocate(p.patch_at + 0x10000)?;
    Ok((THUNK_RECORD + THUNK_CALL + probe.code.len() + 8).next_multiple_of(16))
}

/// Offset of the first thunk in a slot with this layout (after the stubs, and the
/// thunk trace stub of a trace group).
pub fn thunks_base(layout: &Layout<'_>) -> usize {
    let mut n = slot_len(layout);
    if let Layout::Trace { nargs, .. } = layout {
        n += trace_stub(0, *nargs, 0, 0).len();
    }
    n.next_multiple_of(16)
}

/// Offset of the stub the thunk of site `i` calls.
pub fn thunk_entry(layout: &Layout<'_>, i: usize) -> usize {
    match layout {
        Layout::Trace { .. } => slot_len(layout),
        _ => site_entry(layout, i),
    }
}

/// Bytes of a slot with these thunks (each [`thunk_len`]).
pub fn slot_len_with(layout: &Layout<'_>, thunk_lens: &[usize]) -> usize {
    if thunk_lens.is_empty() {
        return slot_len(layout);
    }
    thunks_base(layout) + thunk_lens.iter().sum::<usize>()
}

/// A slot's bytes with the thunks of its relocated sites (see the module comment),
/// for a slot at `slot_addr`: the relocated copies are position-dependent. Returns the
/// code and each thunk's offset (what its site jumps to). `thunk_lens` are the
/// [`thunk_len`]s the slot was sized with; a copy that no longer fits is an error.
pub fn generate_with_thunks(
    layout: &Layout<'_>,
    descriptor: u64,
    entry: u64,
    slot_addr: u64,
    thunks: &[Thunk<'_>],
    thunk_lens: &[usize],
) -> Result<(Vec<u8>, Vec<usize>), Refusal> {
    let mut b = generate(layout, descriptor, entry);
    if thunks.is_empty() {
        return Ok((b, Vec::new()));
    }
    if let Layout::Trace {
        tracer,
        nargs,
        dropped_idx,
        tls_offset,
    } = layout
    {
        let at = b.len();
        b.extend_from_slice(&trace_stub_at(
            *tracer,
            *nargs,
            *dropped_idx,
            *tls_offset,
            at,
            true,
        ));
    }
    b.resize(thunks_base(layout), 0xCC);
    let mut offsets = Vec::with_capacity(thunks.len());
    for (t, &reserved) in thunks.iter().zip(thunk_lens) {
        let start = b.len();
        let thunk = start + THUNK_RECORD;
        let p = t.prologue;
        let copy_at = slot_addr + (thunk + THUNK_CALL) as u64;
        let r = p.relocate(copy_at)?;
        let too_big = |why: String| Refusal::Encode { at: copy_at, why };
        if THUNK_RECORD + THUNK_CALL + r.code.len() > reserved {
            return Err(too_big(format!(
                "the copy is {} bytes, more than the {reserved} reserved",
                r.code.len()
            )));
        }
        if r.boundaries.len() > RECORD_PAIRS || p.len as usize >= MAX_REPLACED {
            return Err(too_big(format!(
                "{} moved instructions over {} bytes do not fit a thunk record",
                r.boundaries.len(),
                p.len
            )));
        }
        let mut rec = ThunkRecord {
            len: p.len as u8,
            n: r.boundaries.len() as u8,
            pairs: [(0, 0); RECORD_PAIRS],
        };
        for (slot, &(old, new)) in rec.pairs.iter_mut().zip(&r.boundaries) {
            let new = u8::try_from(new).map_err(|_| too_big("copy offset > 255".into()))?;
            *slot = (old as u8, new);
        }
        b.extend_from_slice(&rec.bytes());
        b.extend_from_slice(&p.patch_at.to_le_bytes());
        debug_assert_eq!(b.len(), thunk);
        b.push(0xE8);
        let d = thunk_entry(layout, t.index) as i64 - (thunk + THUNK_CALL) as i64;
        b.extend_from_slice(&(d as i32).to_le_bytes());
        b.extend_from_slice(&r.code);
        b.resize(start + reserved, 0xCC);
        offsets.push(thunk);
    }
    Ok((b, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_stub_refers_to_its_data() {
        let code = generate(&Layout::Generic, 0x1111, 0x2222);
        assert_eq!(code.len(), slot_len(&Layout::Generic));
        assert_eq!(&code[..8], &0x1111u64.to_le_bytes());
        // push [rip+disp]: rip after the instruction is GENERIC+6; target 0.
        let d = i32::from_le_bytes(code[GENERIC + 2..GENERIC + 6].try_into().unwrap());
        assert_eq!(GENERIC as i32 + 6 + d, 0);
        let d = i32::from_le_bytes(code[GENERIC + 8..GENERIC + 12].try_into().unwrap());
        assert_eq!(GENERIC as i32 + 12 + d, 8);
    }

    #[test]
    fn count_stub_encodes_index_and_jumps_back() {
        let layout = Layout::Count {
            idx: &[3, 70000],
            tls_offset: -0x80,
        };
        let code = generate(&layout, 1, 2);
        assert_eq!(code.len(), slot_len(&layout));
        let s = site_entry(&layout, 1);
        assert_eq!(&code[s..s + 2], &[0x41, 0x53]);
        assert_eq!(
            i32::from_le_bytes(code[s + 7..s + 11].try_into().unwrap()),
            -0x80
        );
        let inc = s + 16;
        assert_eq!(&code[inc..inc + 3], &[0x49, 0xFF, 0x83]);
        assert_eq!(
            i32::from_le_bytes(code[inc + 3..inc + 7].try_into().unwrap()),
            70000 * 8
        );
        // jz lands on the slow path: pop r11; jmp GENERIC
        let jz = s + 14;
        let slow = jz + 2 + code[jz + 1] as usize;
        assert_eq!(&code[slow..slow + 2], &[0x41, 0x5B]);
        let d = i32::from_le_bytes(code[slow + 3..slow + 7].try_into().unwrap());
        assert_eq!((slow + 7) as i32 + d, GENERIC as i32);
    }

    #[test]
    fn trace_stub_jumps_land_on_their_paths() {
        let layout = Layout::Trace {
            tracer: 9,
            nargs: 2,
            dropped_idx: 5,
            tls_offset: -0x40,
        };
        let code = generate(&layout, 1, 2);
        assert_eq!(code.len(), slot_len(&layout));
        assert_eq!(site_entry(&layout, 0), COUNT_BASE);
        assert_eq!(site_entry(&layout, 3), COUNT_BASE);
        let s = &code[COUNT_BASE..];
        // jz slow: pop r11; jmp GENERIC
        let d = i32::from_le_bytes(s[16..20].try_into().unwrap());
        let slow = (20 + d) as usize;
        assert_eq!(&s[slow..slow + 3], &[0x41, 0x5B, 0xE9]);
        let d = i32::from_le_bytes(s[slow + 3..slow + 7].try_into().unwrap());
        assert_eq!(COUNT_BASE as i32 + slow as i32 + 7 + d, GENERIC as i32);
        // fewer arguments, shorter stub
        assert!(trace_stub(9, 0, 5, 0).len() < trace_stub(9, 6, 5, 0).len());
    }

    /// A thread blocked in a system call, or interrupted by a signal, inside the bytes a
    /// relocated prologue replaces would be resumed there after the grace period (the
    /// observer sees it blocked, or in its handler, outside): a `syscall` (or `int`)
    /// among the moved instructions is refused, so a thread's saved PC after one is at
    /// the patch point at most, never strictly inside.
    #[test]
    fn syscalls_are_never_moved() {
        for code in [
            &[0x0f, 0x05, 0x90, 0x90, 0x90, 0x90, 0xc3][..], // syscall
            &[0x90, 0x0f, 0x05, 0x90, 0x90, 0x90, 0xc3][..], // nop; syscall
            &[0x90, 0xcd, 0x80, 0x90, 0x90, 0x90, 0xc3][..], // nop; int 0x80
            &[0x90, 0x0f, 0x34, 0x90, 0x90, 0x90, 0xc3][..], // nop; sysenter
        ] {
            let r = relocate::analyze(code, 0x40_0000, &[]);
            assert!(
                matches!(r, Err(Refusal::Unmovable { .. })),
                "{code:02x?}: {r:?}"
            );
        }
    }

    /// The thunk layout: record, site word just before the `call`, the call to the
    /// site's stub, the relocated copy; the record maps every moved instruction.
    #[test]
    fn thunks_carry_their_site_and_map() {
        // endbr64; lea rax, [rdi+1]; add rax, [rip+0x100]; ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x8d, 0x47, 0x01, 0x48, 0x03, 0x05, 0x00, 0x01, 0x00,
            0x00, 0xc3,
        ];
        let entry = 0x40_1000u64;
        let p = relocate::analyze(&code, entry, &[]).unwrap();
        assert_eq!((p.patch_at, p.len), (entry + 4, 11));
        let slot = 0x50_0000u64;
        let lens = [thunk_len(&p).unwrap()];
        for layout in [
            Layout::Generic,
            Layout::Count {
                idx: &[7],
                tls_offset: -0x40,
            },
            Layout::Trace {
                tracer: 1,
                nargs: 2,
                dropped_idx: 3,
                tls_offset: -0x40,
            },
        ] {
            let thunks = [Thunk {
                index: 0,
                prologue: &p,
            }];
            let (b, offs) = generate_with_thunks(&layout, 1, 2, slot, &thunks, &lens).unwrap();
            assert_eq!(b.len(), slot_len_with(&layout, &lens));
            let t = offs[0];
            assert_eq!(t % 8, 0);
            let site = u64::from_le_bytes(b[t - 8..t].try_into().unwrap());
            assert_eq!(site, p.patch_at, "the site word");
            assert_eq!(b[t], 0xE8);
            let d = i32::from_le_bytes(b[t + 1..t + 5].try_into().unwrap());
            assert_eq!((t + 5) as i64 + d as i64, thunk_entry(&layout, 0) as i64);
            // SAFETY: `b` is a live buffer holding the thunk at offset `t`.
            let rec = unsafe { read_thunk_record(b.as_ptr() as usize + t) };
            assert_eq!((rec.len, rec.n), (11, 2));
            assert_eq!(rec.map(0), Some(0));
            assert_eq!(rec.map(4), Some(4), "lea is 4 bytes in the copy too");
            assert_eq!(rec.map(2), None, "not a boundary");
            if let Layout::Trace { .. } = layout {
                // The thunk trace stub takes the site from the thunk: mov rax, [rax-13].
                let s = &b[thunk_entry(&layout, 0)..];
                assert!(s.windows(4).any(|w| w == [0x48, 0x8B, 0x40, 0xF3]));
                assert!(
                    !s[..trace_stub(0, 2, 0, 0).len()]
                        .windows(4)
                        .any(|w| w == [0x48, 0x83, 0xE8, 0x05])
                );
            }
        }
    }

    // Runs the stub for real: a fake thread block behind this test thread's TLS word.
    mod exec {
        use super::super::*;
        use crate::hot::block;

        /// Word indexes of the header fields the stub uses, in the fake block.
        const TID: usize = std::mem::offset_of!(Header, tid) / 4;
        const HEAD: usize = std::mem::offset_of!(Header, ring_head) / 8;
        const TAIL: usize = std::mem::offset_of!(Header, ring_tail) / 8;

        std::arch::global_asm!(
            ".globl pb_tramp_test_entry",
            ".hidden pb_tramp_test_entry",
            "pb_tramp_test_entry:",
            "mov rax, qword ptr [rsp]", // the descriptor word the generic stub pushed
            "add rsp, 8",
            "ret",
        );
        unsafe extern "C" {
            fn pb_tramp_test_entry();
        }

        struct Mapped(*mut u8, usize);
        impl Drop for Mapped {
            fn drop(&mut self) {
                // SAFETY: unmapping the mapping this test created.
                unsafe { libc::munmap(self.0.cast(), self.1) };
            }
        }

        fn map_code(code: &[u8]) -> Mapped {
            let len = 4096;
            // SAFETY: a fresh anonymous mapping; written, then made read+execute.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                std::ptr::copy_nonoverlapping(code.as_ptr(), p.cast::<u8>(), code.len());
                assert_eq!(libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC), 0);
                Mapped(p.cast(), len)
            }
        }

        /// Calls `entry` with the six argument registers set, returns (the registers
        /// after the call in the same order + rax + r11, the return address).
        fn call(entry: usize, args: [u64; 6]) -> ([u64; 8], u64) {
            let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5] = args;
            let mut rax = 0xAAAA_0000_u64;
            let mut r11 = 0xBBBB_0000_u64;
            let ra: u64;
            // SAFETY: `entry` is a stub that preserves every register but the flags
            // (checked by the caller through the outputs) and returns to its caller.
            unsafe {
                std::arch::asm!(
                    "lea {ra}, [rip + 2f]",
                    "call {f}",
                    "2:",
                    f = in(reg) entry,
                    ra = out(reg) ra,
                    inout("rdi") a0, inout("rsi") a1, inout("rdx") a2, inout("rcx") a3,
                    inout("r8") a4, inout("r9") a5, inout("rax") rax, inout("r11") r11,
                );
            }
            ([a0, a1, a2, a3, a4, a5, rax, r11], ra)
        }

        #[test]
        fn trace_stub_writes_events_counts_drops_and_falls_back() {
            let (tls, _) = block::tls_offsets().expect("static TLS in the test binary");
            let tracer = 0x1122_3344_5566_7788;
            let code = generate(
                &Layout::Trace {
                    tracer,
                    nargs: 4,
                    dropped_idx: 7,
                    tls_offset: tls,
                },
                0xD00D,
                pb_tramp_test_entry as *const () as u64,
            );
            let m = map_code(&code);
            let stub = m.0 as usize + COUNT_BASE;
            let mut blk = vec![0u64; block::BLOCK_BYTES / 8];
            let base = blk.as_mut_ptr();
            // SAFETY: header words of the fake block (tid, ring_head, ring_tail).
            unsafe {
                base.cast::<u32>().add(TID).write(4242);
                base.add(HEAD).write(4094); // head
                base.add(TAIL).write(0); // tail
            }
            // SAFETY: counters[0] of the fake block, which outlives the calls below.
            let counters = unsafe { base.add(block::HEADER_BYTES / 8) };
            block::TLS.with(|t| t.set(counters));
            let args = [11, 22, 33, 44, 55, 66];
            let before = crate::hot::ring::rdtsc();
            let (regs, ra) = call(stub, args);
            assert_eq!(regs, [11, 22, 33, 44, 55, 66, 0xAAAA_0000, 0xBBBB_0000]);
            let ev = |slot: usize| {
                // SAFETY: slot < RING_SLOTS: inside the fake block's ring.
                unsafe {
                    let p = counters
                        .cast::<u8>()
                        .add(block::COUNTERS * 8 + slot * block::EVENT_BYTES)
                        .cast::<u64>();
                    std::array::from_fn::<u64, 10, _>(|i| p.add(i).read())
                }
            };
            let e = ev(4094);
            assert!(e[0] >= before, "tsc {} < {before}", e[0]);
            assert_eq!(e[1], ra - 5, "site = return address - 5");
            assert_eq!(e[2], tracer);
            assert_eq!(e[3], 4242 | (4 << 32));
            assert_eq!(&e[4..8], &[11, 22, 33, 44]);
            assert_eq!(&e[8..10], &[0, 0], "only nargs arguments are written");
            // SAFETY: header and counter words of the fake block.
            let (head, dropped) = unsafe { (base.add(HEAD).read(), counters.add(7).read()) };
            assert_eq!((head, dropped), (4095, 0));
            // The ring wraps: slot 4095, then slot 0 once the consumer moved on.
            call(stub, [1, 2, 3, 4, 5, 6]);
            // SAFETY: the tail word of the fake block's header, which outlives the calls.
            unsafe { base.add(TAIL).write(1) };
            call(stub, [7, 8, 9, 10, 11, 12]);
            assert_eq!(&ev(4095)[4..8], &[1, 2, 3, 4]);
            assert_eq!(&ev(0)[4..8], &[7, 8, 9, 10]);
            // Full ring (head - tail == RING_SLOTS): the drop is counted, nothing written.
            let (regs, _) = call(stub, [0; 6]);
            assert_eq!(regs[6..], [0xAAAA_0000, 0xBBBB_0000]);
            // SAFETY: header and counter words of the fake block, which is still alive.
            let (head, dropped) = unsafe { (base.add(HEAD).read(), counters.add(7).read()) };
            assert_eq!((head, dropped), (4097, 1));
            assert_eq!(&ev(1)[4..8], &[0, 0, 0, 0]);
            // No block: the generic stub pushes the descriptor and jumps to the entry.
            block::TLS.with(|t| t.set(std::ptr::null_mut()));
            let (regs, _) = call(stub, [1, 2, 3, 4, 5, 6]);
            assert_eq!(regs[..6], [1, 2, 3, 4, 5, 6]);
            assert_eq!(regs[6], 0xD00D, "reached the entry with the descriptor");
            assert_eq!(regs[7], 0xBBBB_0000);
            // SAFETY: the head word of the fake block's header (`blk` is dropped below).
            assert_eq!(unsafe { base.add(HEAD).read() }, 4097);
            drop(blk);
        }
    }
}
