//! x86_64 machine code for trampolines, specialized per callback group.
//!
//! A site is a 5-byte `call tramp` at a function's entry, so a trampoline starts with
//! the site's return address (site + 5) on top of the stack and the traced function's
//! arguments untouched in registers; it ends with `ret`, back into the function body.
//!
//! * [`count_trampoline`]: increments one per-thread counter (see [`crate::tls`] for
//!   the design) with no call at all: 27 bytes and 7 instructions on the fast path,
//!   touching only `r11` (pushed and popped, for `preserve_most` callers) and the
//!   flags, which are dead at a function entry. A thread's first traced call takes a
//!   slow path that saves the argument registers and registers the thread.
//! * [`group_trampoline`]: saves what a SysV `extern "C"` callback may clobber and the
//!   traced function needs (`rdi rsi rdx rcx r8 r9 rax r10 r11`, `xmm0-7`), aligns the
//!   stack to 16, builds a [`CallCtx`] in place, bumps the thread's nesting counter and
//!   calls each [`Hook`] in order: unrolled up to [`UNROLL_MAX`] hooks, otherwise
//!   through [`dispatch_list`] over a list stored in the trampoline itself. If the
//!   thread is already inside a callback (nesting > 0) the hooks are skipped and the
//!   block's recursion-miss counter is bumped (ftrace's recursion protection).
//!
//! Not preserved: the upper halves of `ymm`/`zmm` registers and `xmm8-15` (a callback
//! compiled for AVX, or calling a libc routine that ends in `vzeroupper`, would break a
//! function taking `__m256` by value, or a `preserve_all` function); an `xsave`-based
//! variant is future work.
//!
//! Code is produced as a [`Code`]: bytes plus relocations that are resolved against the
//! final slot address by [`Code::link`], after the slot is allocated.

use crate::tls::{self, BlockAccess, CounterId};

/// More hooks than this go through [`dispatch_list`].
pub const UNROLL_MAX: usize = 4;

/// What a callback sees: the traced function's argument registers at entry and where
/// it was called from. Lives on the trampoline's stack for the duration of the calls.
#[repr(C, align(16))]
#[derive(Debug)]
pub struct CallCtx {
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub r8: u64,
    pub r9: u64,
    /// `al` is the number of vector registers used by a varargs call.
    pub rax: u64,
    /// Static chain pointer (nested C functions).
    pub r10: u64,
    pub r11: u64,
    /// Address of the patched site (the traced function's entry).
    pub site: u64,
    /// The traced function's return address (into its caller).
    pub return_address: u64,
    /// The traced function's stack pointer at entry (points at `return_address`);
    /// stack arguments start at `entry_sp + 8`.
    pub entry_sp: u64,
    /// `xmm0`..`xmm7` (floating-point and vector arguments).
    pub xmm: [[u8; 16]; 8],
}

const CTX_SIZE: i32 = std::mem::size_of::<CallCtx>() as i32;
const OFF_GPR: [(u8, i32); 9] = [
    (RDI, 0),
    (RSI, 8),
    (RDX, 16),
    (RCX, 24),
    (R8, 32),
    (R9, 40),
    (RAX, 48),
    (R10, 56),
    (R11, 64),
];
const OFF_SITE: i32 = 72;
const OFF_RET: i32 = 80;
const OFF_SP: i32 = 88;
const OFF_XMM: i32 = 96;

/// A tracing callback: `ctx` is valid for the duration of the call; `data` is the
/// value given in its [`Hook`]. Must not unwind.
pub type Callback = extern "C" fn(ctx: &CallCtx, data: usize);

/// One callback of a group and its data word.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub func: Callback,
    pub data: usize,
}

/// Errors of code generation and linking.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodegenError {
    #[error("a group trampoline needs at least one hook")]
    NoHooks,
    #[error("rel32 at offset {at} cannot reach {target:#x} from slot {base:#x}")]
    OutOfReach {
        at: usize,
        target: usize,
        base: usize,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// A relocation resolved when the slot address is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reloc {
    /// The 4 bytes at `at` become `target - (base + at + 4)` (call/jmp rel32 to an
    /// absolute address outside the trampoline).
    Rel32 { at: usize, target: usize },
}

/// Position-independent code plus relocations.
#[derive(Clone, Debug)]
pub struct Code {
    bytes: Vec<u8>,
    relocs: Vec<Reloc>,
}

impl Code {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The bytes before relocation.
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }
    pub fn relocs(&self) -> &[Reloc] {
        &self.relocs
    }
    /// The final bytes for a slot at `base`.
    pub fn link(&self, base: usize) -> Result<Vec<u8>, CodegenError> {
        let mut out = self.bytes.clone();
        for r in &self.relocs {
            match *r {
                Reloc::Rel32 { at, target } => {
                    let next = base.wrapping_add(at + 4) as i64;
                    let disp = i32::try_from((target as i64).wrapping_sub(next))
                        .map_err(|_| CodegenError::OutOfReach { at, target, base })?;
                    out[at..at + 4].copy_from_slice(&disp.to_le_bytes());
                }
            }
        }
        Ok(out)
    }
}

// Register numbers.
const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RSP: u8 = 4;
const RBP: u8 = 5;
const RSI: u8 = 6;
const RDI: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;
const R11: u8 = 11;

/// A label inside the code being assembled.
#[derive(Clone, Copy, Debug)]
pub struct Label(usize);

/// A minimal assembler for the instructions trampolines use (memory operands are
/// `[base + disp8/disp32]`).
#[derive(Default)]
pub struct Asm {
    buf: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
    relocs: Vec<Reloc>,
}

fn rex(w: bool, reg: u8, base: u8) -> Option<u8> {
    let r = 0x40 | ((w as u8) << 3) | (((reg >> 3) & 1) << 2) | ((base >> 3) & 1);
    (r != 0x40).then_some(r)
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    fn b(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
    fn rex(&mut self, w: bool, reg: u8, base: u8) {
        if let Some(r) = rex(w, reg, base) {
            self.buf.push(r);
        }
    }
    /// ModRM [+ SIB] + disp8 or disp32 for `[base + disp]`.
    fn mem(&mut self, reg: u8, base: u8, disp: i32) {
        let short = i8::try_from(disp).ok();
        let md = if short.is_some() { 0x40 } else { 0x80 };
        self.buf.push(md | ((reg & 7) << 3) | (base & 7));
        if base & 7 == RSP {
            self.buf.push(0x24);
        }
        match short {
            Some(d) => self.buf.push(d as u8),
            None => self.b(&disp.to_le_bytes()),
        }
    }
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.buf.len());
    }
    fn rel_to(&mut self, l: Label) {
        self.fixups.push((self.buf.len(), l));
        self.b(&[0; 4]);
    }
    pub fn push(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.buf.push(0x50 + (r & 7));
    }
    pub fn pop(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.buf.push(0x58 + (r & 7));
    }
    /// `mov [base+disp], src`
    pub fn store(&mut self, base: u8, disp: i32, src: u8) {
        self.rex(true, src, base);
        self.buf.push(0x89);
        self.mem(src, base, disp);
    }
    /// `mov dst, [base+disp]`
    pub fn load(&mut self, dst: u8, base: u8, disp: i32) {
        self.rex(true, dst, base);
        self.buf.push(0x8B);
        self.mem(dst, base, disp);
    }
    /// `lea dst, [base+disp]`
    pub fn lea(&mut self, dst: u8, base: u8, disp: i32) {
        self.rex(true, dst, base);
        self.buf.push(0x8D);
        self.mem(dst, base, disp);
    }
    /// `movups [base+disp], xmm`
    pub fn store_xmm(&mut self, base: u8, disp: i32, xmm: u8) {
        self.rex(false, xmm, base);
        self.b(&[0x0F, 0x11]);
        self.mem(xmm, base, disp);
    }
    /// `movups xmm, [base+disp]`
    pub fn load_xmm(&mut self, xmm: u8, base: u8, disp: i32) {
        self.rex(false, xmm, base);
        self.b(&[0x0F, 0x10]);
        self.mem(xmm, base, disp);
    }
    /// `mov dst, imm64`
    pub fn mov_imm64(&mut self, dst: u8, imm: u64) {
        self.buf.push(0x48 | ((dst >> 3) & 1));
        self.buf.push(0xB8 + (dst & 7));
        self.b(&imm.to_le_bytes());
    }
    /// `mov dst, src` (64-bit)
    pub fn mov_rr(&mut self, dst: u8, src: u8) {
        self.rex(true, src, dst);
        self.buf.push(0x89);
        self.buf.push(0xC0 | ((src & 7) << 3) | (dst & 7));
    }
    /// `test a, a`
    pub fn test_self(&mut self, a: u8) {
        self.rex(true, a, a);
        self.buf.push(0x85);
        self.buf.push(0xC0 | ((a & 7) << 3) | (a & 7));
    }
    /// `mov dst, fs:[disp]` (absolute disp32, sign-extended)
    pub fn load_fs(&mut self, dst: u8, disp: i32) {
        self.buf.push(0x64);
        self.buf.push(0x48 | (((dst >> 3) & 1) << 2));
        self.buf.push(0x8B);
        self.buf.push(0x04 | ((dst & 7) << 3));
        self.buf.push(0x25);
        self.b(&disp.to_le_bytes());
    }
    /// `inc qword [base+disp]`
    pub fn inc_mem(&mut self, base: u8, disp: i32) {
        self.rex(true, 0, base);
        self.buf.push(0xFF);
        self.mem(0, base, disp);
    }
    /// `lock inc qword [base+disp]`
    pub fn lock_inc_mem(&mut self, base: u8, disp: i32) {
        self.buf.push(0xF0);
        self.inc_mem(base, disp);
    }
    /// `dec qword [base+disp]`
    pub fn dec_mem(&mut self, base: u8, disp: i32) {
        self.rex(true, 1, base);
        self.buf.push(0xFF);
        self.mem(1, base, disp);
    }
    /// `cmp qword [base+disp], imm8`
    pub fn cmp_mem_imm8(&mut self, base: u8, disp: i32, imm: i8) {
        self.rex(true, 7, base);
        self.buf.push(0x83);
        self.mem(7, base, disp);
        self.buf.push(imm as u8);
    }
    /// `sub r, imm32`
    pub fn sub_imm32(&mut self, r: u8, imm: i32) {
        self.rex(true, 0, r);
        self.buf.push(0x81);
        self.buf.push(0xE8 | (r & 7));
        self.b(&imm.to_le_bytes());
    }
    /// `and r, imm8` (sign-extended)
    pub fn and_imm8(&mut self, r: u8, imm: i8) {
        self.rex(true, 0, r);
        self.buf.push(0x83);
        self.buf.push(0xE0 | (r & 7));
        self.buf.push(imm as u8);
    }
    /// `call r`
    pub fn call_reg(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.buf.push(0xFF);
        self.buf.push(0xD0 | (r & 7));
    }
    /// `call rel32` to an absolute address (relocated at link time).
    pub fn call_abs(&mut self, target: usize) {
        self.buf.push(0xE8);
        self.relocs.push(Reloc::Rel32 {
            at: self.buf.len(),
            target,
        });
        self.b(&[0; 4]);
    }
    /// `jmp rel32` to an absolute address (relocated at link time).
    pub fn jmp_abs(&mut self, target: usize) {
        self.buf.push(0xE9);
        self.relocs.push(Reloc::Rel32 {
            at: self.buf.len(),
            target,
        });
        self.b(&[0; 4]);
    }
    pub fn jmp(&mut self, l: Label) {
        self.buf.push(0xE9);
        self.rel_to(l);
    }
    pub fn jz(&mut self, l: Label) {
        self.b(&[0x0F, 0x84]);
        self.rel_to(l);
    }
    pub fn jnz(&mut self, l: Label) {
        self.b(&[0x0F, 0x85]);
        self.rel_to(l);
    }
    /// `lea dst, [rip + label]`
    pub fn lea_label(&mut self, dst: u8, l: Label) {
        self.rex(true, dst, 0);
        self.buf.push(0x8D);
        self.buf.push(0x05 | ((dst & 7) << 3));
        self.rel_to(l);
    }
    pub fn ret(&mut self) {
        self.buf.push(0xC3);
    }
    pub fn leave(&mut self) {
        self.buf.push(0xC9);
    }
    pub fn align(&mut self, n: usize) {
        while !self.buf.len().is_multiple_of(n) {
            self.buf.push(0xCC);
        }
    }
    pub fn data_u64(&mut self, v: u64) {
        self.b(&v.to_le_bytes());
    }
    /// Resolves labels. Panics on an unbound label (a bug in this module).
    pub fn finish(mut self) -> Code {
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0].expect("unbound label");
            let disp = target as i64 - (at as i64 + 4);
            self.buf[at..at + 4].copy_from_slice(&(disp as i32).to_le_bytes());
        }
        Code {
            bytes: self.buf,
            relocs: self.relocs,
        }
    }
}

/// `push rbp; mov rbp, rsp; sub; and rsp,-16`, save registers and fill the
/// [`CallCtx`] at `[rsp]`. Expects `[rsp]` = site + 5 on entry.
fn emit_save(a: &mut Asm) {
    a.push(RBP);
    a.mov_rr(RBP, RSP);
    a.sub_imm32(RSP, CTX_SIZE);
    a.and_imm8(RSP, -16);
    for (r, off) in OFF_GPR {
        a.store(RSP, off, r);
    }
    for x in 0..8u8 {
        a.store_xmm(RSP, OFF_XMM + 16 * x as i32, x);
    }
    a.load(RAX, RBP, 8);
    a.sub_imm32(RAX, 5);
    a.store(RSP, OFF_SITE, RAX);
    a.load(RAX, RBP, 16);
    a.store(RSP, OFF_RET, RAX);
    a.lea(RAX, RBP, 16);
    a.store(RSP, OFF_SP, RAX);
}

/// Restore what [`emit_save`] saved and `leave` (the return address is on top).
fn emit_restore(a: &mut Asm) {
    for x in 0..8u8 {
        a.load_xmm(x, RSP, OFF_XMM + 16 * x as i32);
    }
    for (r, off) in OFF_GPR {
        a.load(r, RSP, off);
    }
    a.leave();
}

/// Puts the thread's block into r11 (registers saved; clobbers rax..r11).
fn emit_block(a: &mut Asm, access: BlockAccess) {
    let helper = tls::patchbay_thread_block as *const () as u64;
    match access {
        BlockAccess::Fs(off) => {
            let have = a.label();
            a.load_fs(R11, off);
            a.test_self(R11);
            a.jnz(have);
            a.mov_imm64(RAX, helper);
            a.call_reg(RAX);
            a.mov_rr(R11, RAX);
            a.bind(have);
        }
        BlockAccess::Helper => {
            a.mov_imm64(RAX, helper);
            a.call_reg(RAX);
            a.mov_rr(R11, RAX);
        }
    }
}

/// The count-only trampoline for one counter. In [`BlockAccess::Helper`] mode this is
/// a group trampoline calling [`count_hook`].
pub fn count_trampoline(access: BlockAccess, counter: CounterId) -> Code {
    let BlockAccess::Fs(off) = access else {
        return group_trampoline(
            access,
            &[Hook {
                func: count_hook,
                data: counter.index(),
            }],
        )
        .expect("one hook");
    };
    let mut a = Asm::new();
    let top = a.label();
    let slow = a.label();
    a.bind(top);
    a.push(R11);
    a.load_fs(R11, off);
    a.test_self(R11);
    a.jz(slow);
    a.inc_mem(R11, counter.block_offset());
    a.pop(R11);
    a.ret();
    // First traced call of this thread: register it, retry. Saves what the SysV
    // helper may clobber (r11 is still pushed), with pushes to keep the code small.
    a.bind(slow);
    for r in [RAX, RCX, RDX, RSI, RDI, R8, R9, R10] {
        a.push(r);
    }
    a.push(RBP);
    a.mov_rr(RBP, RSP);
    a.and_imm8(RSP, -16);
    a.sub_imm32(RSP, 128);
    for x in 0..8u8 {
        a.store_xmm(RSP, 16 * x as i32, x);
    }
    a.mov_imm64(RAX, tls::patchbay_thread_block as *const () as u64);
    a.call_reg(RAX);
    for x in 0..8u8 {
        a.load_xmm(x, RSP, 16 * x as i32);
    }
    a.leave();
    for r in [R10, R9, R8, RDI, RSI, RDX, RCX, RAX, R11] {
        a.pop(r);
    }
    a.jmp(top);
    a.finish()
}

/// The count tracer as a callback (`data` is the counter index).
pub extern "C" fn count_hook(_ctx: &CallCtx, data: usize) {
    tls::bump(CounterId::from_index(data));
}

/// A trampoline calling `hooks` in order (unrolled up to [`UNROLL_MAX`]).
pub fn group_trampoline(access: BlockAccess, hooks: &[Hook]) -> Result<Code, CodegenError> {
    build_group(access, hooks, hooks.len() > UNROLL_MAX)
}

/// A trampoline that always dispatches through [`dispatch_list`] (for tests and for
/// groups that change often).
pub fn list_trampoline(access: BlockAccess, hooks: &[Hook]) -> Result<Code, CodegenError> {
    build_group(access, hooks, true)
}

fn build_group(access: BlockAccess, hooks: &[Hook], list: bool) -> Result<Code, CodegenError> {
    if hooks.is_empty() {
        return Err(CodegenError::NoHooks);
    }
    let mut a = Asm::new();
    let recursed = a.label();
    let out = a.label();
    let list_label = a.label();
    emit_save(&mut a);
    emit_block(&mut a, access);
    a.cmp_mem_imm8(R11, tls::NESTING_OFFSET, 0);
    a.jnz(recursed);
    a.inc_mem(R11, tls::NESTING_OFFSET);
    if list {
        a.mov_rr(RDI, RSP);
        a.lea_label(RSI, list_label);
        a.mov_imm64(RAX, dispatch_list as *const () as u64);
        a.call_reg(RAX);
    } else {
        for h in hooks {
            a.mov_rr(RDI, RSP);
            a.mov_imm64(RSI, h.data as u64);
            a.mov_imm64(RAX, h.func as *const () as u64);
            a.call_reg(RAX);
        }
    }
    emit_block(&mut a, access);
    a.dec_mem(R11, tls::NESTING_OFFSET);
    a.jmp(out);
    a.bind(recursed);
    a.inc_mem(R11, tls::RECURSION_OFFSET);
    a.bind(out);
    emit_restore(&mut a);
    a.ret();
    if list {
        a.align(8);
        a.bind(list_label);
        a.data_u64(hooks.len() as u64);
        for h in hooks {
            a.data_u64(h.func as *const () as u64);
            a.data_u64(h.data as u64);
        }
    }
    Ok(a.finish())
}

/// Calls every hook of a list laid out as `[n, func0, data0, func1, data1, ...]`.
///
/// # Safety
/// `list` points at such a list of valid [`Callback`]s (inside a live trampoline).
pub unsafe extern "C" fn dispatch_list(ctx: &CallCtx, list: *const u64) {
    // SAFETY: the caller (generated code) passes its own embedded list.
    let n = unsafe { *list } as usize;
    for i in 0..n {
        // SAFETY: entries 1..=2n exist; each func word is a Callback's address.
        let (f, d) = unsafe { (*list.add(1 + 2 * i), *list.add(2 + 2 * i)) };
        // SAFETY: the word was written from a `Callback` by `build_group`.
        let f: Callback = unsafe { std::mem::transmute::<usize, Callback>(f as usize) };
        f(ctx, d as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let mut a = Asm::new();
        a.store(RSP, 8, RDI);
        a.load(R11, RSP, 64);
        a.store_xmm(RSP, 96, 7);
        a.load_fs(R11, -8);
        a.inc_mem(R11, 64);
        a.push(R11);
        a.pop(R11);
        a.call_reg(RAX);
        a.mov_rr(R11, RAX);
        a.test_self(R11);
        a.cmp_mem_imm8(R11, 0, 0);
        a.lock_inc_mem(R11, 0);
        a.inc_mem(R11, 512);
        let c = a.finish();
        let want: &[u8] = &[
            0x48, 0x89, 0x7C, 0x24, 8, // mov [rsp+8], rdi
            0x4C, 0x8B, 0x5C, 0x24, 64, // mov r11, [rsp+64]
            0x0F, 0x11, 0x7C, 0x24, 96, // movups [rsp+96], xmm7
            0x64, 0x4C, 0x8B, 0x1C, 0x25, 0xF8, 0xFF, 0xFF, 0xFF, // mov r11, fs:[-8]
            0x49, 0xFF, 0x43, 64, // inc qword [r11+64]
            0x41, 0x53, 0x41, 0x5B, // push r11; pop r11
            0xFF, 0xD0, // call rax
            0x49, 0x89, 0xC3, // mov r11, rax
            0x4D, 0x85, 0xDB, // test r11, r11
            0x49, 0x83, 0x7B, 0, 0, // cmp qword [r11+0], 0
            0xF0, 0x49, 0xFF, 0x43, 0, // lock inc qword [r11+0]
            0x49, 0xFF, 0x83, 0, 2, 0, 0, // inc qword [r11+512]
        ];
        assert_eq!(c.raw(), want);
    }

    #[test]
    fn ctx_layout() {
        assert_eq!(std::mem::offset_of!(CallCtx, r11), 64);
        assert_eq!(std::mem::offset_of!(CallCtx, site), OFF_SITE as usize);
        assert_eq!(
            std::mem::offset_of!(CallCtx, return_address),
            OFF_RET as usize
        );
        assert_eq!(std::mem::offset_of!(CallCtx, entry_sp), OFF_SP as usize);
        assert_eq!(std::mem::offset_of!(CallCtx, xmm), OFF_XMM as usize);
        assert_eq!(CTX_SIZE % 16, 0);
    }

    #[test]
    fn rel32_relocation_against_slot_address() {
        let mut a = Asm::new();
        a.call_abs(0x1000_0000);
        a.jmp_abs(0x0fff_0000);
        let c = a.finish();
        let base = 0x1000_1000usize;
        let b = c.link(base).unwrap();
        assert_eq!(b[0], 0xE8);
        let d1 = i32::from_le_bytes(b[1..5].try_into().unwrap()) as i64;
        assert_eq!(base as i64 + 5 + d1, 0x1000_0000);
        let d2 = i32::from_le_bytes(b[6..10].try_into().unwrap()) as i64;
        assert_eq!(base as i64 + 10 + d2, 0x0fff_0000);
        assert!(matches!(
            c.link(0x7f00_0000_0000),
            Err(CodegenError::OutOfReach { .. })
        ));
    }

    #[test]
    fn count_trampoline_fits_a_small_slot() {
        let id = tls::alloc_counter().unwrap();
        let c = count_trampoline(BlockAccess::Fs(-64), id);
        assert!(c.len() <= 192, "{}", c.len());
        tls::free_counter(id);
        assert!(matches!(
            group_trampoline(BlockAccess::Helper, &[]),
            Err(CodegenError::NoHooks)
        ));
    }
}
