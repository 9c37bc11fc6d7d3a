use super::*;
use iced_x86::{Encoder, MemoryOperand};
use proptest::prelude::*;

const BASE: u64 = 0x40_1000;

fn enc(instrs: &[Instruction], at: u64) -> Vec<u8> {
    BlockEncoder::encode(
        64,
        InstructionBlock::new(instrs, at),
        BlockEncoderOptions::NONE,
    )
    .unwrap()
    .code_buffer
}

fn asm(bytes: &[&[u8]]) -> Vec<u8> {
    bytes.concat()
}

#[test]
fn simple_prologue_moves_whole_instructions() {
    // push rbp; mov rbp,rsp; mov eax,edi; pop rbp; ret
    let code = asm(&[b"\x55", b"\x48\x89\xe5", b"\x89\xf8", b"\x5d", b"\xc3"]);
    let p = analyze(&code, BASE, &[]).unwrap();
    assert_eq!((p.entry, p.patch_at, p.len), (BASE, BASE, 6));
    assert_eq!(p.boundaries().collect::<Vec<_>>(), vec![0, 1, 4]);
    let r = p.relocate(0x7000_0000).unwrap();
    // the three instructions unchanged, then jmp back to BASE+6
    assert_eq!(&r.code[..6], &code[..6]);
    assert_eq!(r.code[6], 0xe9);
    let rel = i32::from_le_bytes(r.code[7..11].try_into().unwrap()) as i64;
    assert_eq!((0x7000_0000u64 + 11).wrapping_add(rel as u64), BASE + 6);
    assert_eq!(r.map_pc(&p, BASE + 1), Some(0x7000_0001));
    assert_eq!(r.map_pc(&p, BASE + 2), None, "not a boundary");
}

#[test]
fn endbr64_stays_at_the_entry() {
    let code = asm(&[&ENDBR64, b"\x48\x8b\x05\x10\x00\x00\x00", b"\xc3"]);
    let p = analyze(&code, BASE, &[]).unwrap();
    assert_eq!((p.patch_at, p.len), (BASE + 4, 7));
    // mov rax,[rip+0x10] re-targeted to the same absolute address.
    let at = 0x7000_0000;
    let r = p.relocate(at).unwrap();
    let i = Decoder::with_ip(64, &r.code, at, DecoderOptions::NONE).decode();
    assert_eq!(i.ip_rel_memory_address(), BASE + 4 + 7 + 0x10);
}

#[test]
fn refusals_are_precise() {
    // too short: xor eax,eax; ret
    assert_eq!(
        analyze(b"\x31\xc0\xc3", BASE, &[]).unwrap_err(),
        Refusal::TooShort { size: 3 }
    );
    assert_eq!(
        analyze(&asm(&[&ENDBR64, b"\x31\xc0\xc3"]), BASE, &[]).unwrap_err(),
        Refusal::TooShort { size: 3 }
    );
    // a loop back into the prologue: L: dec edi (2); jnz L+1?  use: test edi,edi (2);
    // L2: dec edi (2); jnz L2 (2); ret  -> jnz targets +2, inside the 6 replaced bytes
    let code = asm(&[
        b"\x85\xff",
        b"\xff\xcf",
        b"\x89\xf8",
        b"\x90",
        b"\x75\xf9",
        b"\xc3",
    ]);
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::BranchIntoPatch { from: 7, to: 2 }
    );
    // the same loop, all of it among the moved bytes, is re-targeted inside the copy
    let code = asm(&[b"\x85\xff", b"\xff\xcf", b"\x75\xfc", b"\xc3"]);
    let p = analyze(&code, BASE, &[]).unwrap();
    let r = p.relocate(0x7000_0000).unwrap();
    let mut d = Decoder::with_ip(64, &r.code, 0x7000_0000, DecoderOptions::NONE);
    let (_, _, jnz) = (d.decode(), d.decode(), d.decode());
    assert_eq!(jnz.near_branch_target(), 0x7000_0002);
    // a jump back to the entry
    let code = asm(&[b"\xff\xcf", b"\x85\xff", b"\x90", b"\x75\xf9", b"\xc3"]);
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::BranchToEntry { from: 5 }
    );
    // a call among the moved bytes
    let code = asm(&[b"\xe8\x00\x00\x00\x00", b"\xc3"]);
    assert!(matches!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::Unmovable { offset: 0, .. }
    ));
    // jump table: jmp rax
    let code = asm(&[b"\x48\x89\xf8", b"\x48\x89\xf8", b"\xff\xe0"]);
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::IndirectJump { offset: 6 }
    );
    // a tail call through the GOT is fine: mov eax,edi (2); mov eax,edi; jmp [rip+0]
    let code = asm(&[
        b"\x89\xf8",
        b"\x89\xf8",
        b"\x89\xf8",
        b"\xff\x25\x00\x00\x00\x00",
    ]);
    assert!(analyze(&code, BASE, &[]).is_ok());
    // undecodable body
    let code = asm(&[b"\x48\x89\xe5", b"\x48\x89\xe5", b"\x0f\x0b"]);
    assert!(matches!(
        analyze(&asm(&[&code, b"\x0f\xff\xff\xff"]), BASE, &[]).unwrap_err(),
        Refusal::Undecodable { .. } | Refusal::PastEnd { .. }
    ));
    // body cut mid-instruction
    assert_eq!(
        analyze(b"\x48\x89\xe5\x48\x89\xe5\x48\x8b", BASE, &[]).unwrap_err(),
        Refusal::PastEnd { offset: 6, size: 8 }
    );
    // a landing pad inside the replaced bytes
    let code = asm(&[b"\x55", b"\x48\x89\xe5", b"\x89\xf8", b"\x5d", b"\xc3"]);
    assert_eq!(
        analyze(&code, BASE, &[BASE + 4]).unwrap_err(),
        Refusal::TargetInPatch { offset: 4 }
    );
    assert!(analyze(&code, BASE, &[BASE + 6]).is_ok());
    // reading its own replaced bytes: mov rax,[rip-7] (reads BASE)
    let code = asm(&[b"\x48\x8b\x05\xf9\xff\xff\xff", b"\xc3"]);
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::TouchesPatch { from: 0, to: 0 }
    );
}

#[test]
fn relative_branches_in_the_prologue_are_retargeted() {
    // test edi,edi (2); je +1 (2); ret (1); L: mov eax,1 (5); ret
    let code = asm(&[
        b"\x85\xff",
        b"\x74\x01",
        b"\xc3",
        b"\xb8\x01\x00\x00\x00",
        b"\xc3",
    ]);
    let p = analyze(&code, BASE, &[]).unwrap();
    assert_eq!(p.len, 5);
    let at = 0x7000_0000;
    let r = p.relocate(at).unwrap();
    let mut d = Decoder::with_ip(64, &r.code, at, DecoderOptions::NONE);
    let _test = d.decode();
    let je = d.decode();
    assert_eq!(je.near_branch_target(), BASE + 5);
}

// ---------------------------------------------------------------------------------
// Execution: random instruction sequences run at their original address and, with
// their prologue relocated, from a copy 1 GiB away; registers, flags and memory
// must come out the same.

/// Registers loaded before and stored after a run (rsp excluded), then rflags.
const NREGS: usize = 15;
const REGS: [Register; NREGS] = [
    Register::RAX,
    Register::RBX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::RBP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

std::arch::global_asm!(
    ".globl reloc_test_run",
    "reloc_test_run:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rsi",
    "push rdi",
    "mov rax, rsi",
    "mov rbx, [rax+8]",
    "mov rcx, [rax+16]",
    "mov rdx, [rax+24]",
    "mov rsi, [rax+32]",
    "mov rdi, [rax+40]",
    "mov rbp, [rax+48]",
    "mov r8, [rax+56]",
    "mov r9, [rax+64]",
    "mov r10, [rax+72]",
    "mov r11, [rax+80]",
    "mov r12, [rax+88]",
    "mov r13, [rax+96]",
    "mov r14, [rax+104]",
    "mov r15, [rax+112]",
    "mov rax, [rax]",
    "call qword ptr [rsp]",
    "pushfq",
    "xchg rax, [rsp+16]",
    "mov [rax+8], rbx",
    "mov [rax+16], rcx",
    "mov [rax+24], rdx",
    "mov [rax+32], rsi",
    "mov [rax+40], rdi",
    "mov [rax+48], rbp",
    "mov [rax+56], r8",
    "mov [rax+64], r9",
    "mov [rax+72], r10",
    "mov [rax+80], r11",
    "mov [rax+88], r12",
    "mov [rax+96], r13",
    "mov [rax+104], r14",
    "mov [rax+112], r15",
    "pop rbx",
    "and rbx, 0x8d5",
    "mov [rax+120], rbx",
    "mov rbx, [rsp+8]",
    "mov [rax], rbx",
    "add rsp, 16",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);

unsafe extern "C" {
    /// Loads the 15 registers from `regs`, calls `code`, stores them back, then the
    /// arithmetic flags at `regs[15]`.
    fn reloc_test_run(code: u64, regs: *mut [u64; NREGS + 1]);
}

struct Exec {
    base: *mut u8,
    far: *mut u8,
}

const PAGE: usize = 4096;
/// Layout of the near mapping: code at 0, data at DATA.
const DATA: usize = 2 * PAGE;
const DATA_WORDS: usize = 64;
/// Data word (after the random ones) counting down the backward branches.
const COUNTER: usize = DATA_WORDS;
const FAR: usize = 1 << 30;

impl Exec {
    fn new() -> Exec {
        // SAFETY: fresh anonymous mappings; no existing memory is touched.
        unsafe {
            let prot = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            let base = libc::mmap(std::ptr::null_mut(), 3 * PAGE, prot, flags, -1, 0);
            assert_ne!(base, libc::MAP_FAILED);
            let hint = (base as usize + FAR) as *mut libc::c_void;
            let far = libc::mmap(hint, PAGE, prot, flags | libc::MAP_FIXED_NOREPLACE, -1, 0);
            assert_ne!(far, libc::MAP_FAILED, "no room 1 GiB away");
            Exec {
                base: base as *mut u8,
                far: far as *mut u8,
            }
        }
    }

    fn data_addr(&self) -> u64 {
        self.base as u64 + DATA as u64
    }

    fn run(&self, code_at: u64, regs: &[u64; NREGS], data: &[u64; DATA_WORDS]) -> Vec<u64> {
        let mut r = [0u64; NREGS + 1];
        r[..NREGS].copy_from_slice(regs);
        // SAFETY: the data area is ours (inside the near mapping, DATA_WORDS words).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.data_addr() as *mut u64, DATA_WORDS);
            (self.data_addr() as *mut u64).add(COUNTER).write(3);
        };
        // SAFETY: `code_at` holds a sequence the test generated from instructions that
        // touch only registers (not rsp) and the data area, and end in `ret`.
        unsafe { reloc_test_run(code_at, &mut r) };
        let mut out = r.to_vec();
        // SAFETY: as above.
        let mem =
            unsafe { std::slice::from_raw_parts(self.data_addr() as *const u64, DATA_WORDS + 1) };
        out.extend_from_slice(mem);
        out
    }

    fn write(&self, at: *mut u8, code: &[u8]) {
        assert!(code.len() <= PAGE);
        // SAFETY: within our own RWX mappings.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), at, code.len()) };
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, 3 * PAGE);
            libc::munmap(self.far as *mut libc::c_void, PAGE);
        }
    }
}

/// One generated instruction: a recipe resolved once the code address is known.
#[derive(Debug, Clone)]
enum Op {
    MovImm(usize, i32),
    Add(usize, usize),
    Xor32(usize, usize),
    Imul(usize, usize, i32),
    LeaRip(usize, usize),
    LoadRip(usize, usize),
    AddRip(usize, usize),
    StoreRip(usize, usize),
    CmpImm(usize, i8),
    /// jcc (condition index) forward over `n` following ops
    Jcc(u8, usize),
    JmpFwd(usize),
    Nop,
    /// `dec dword [rip+counter]; jns` back to the start of op `k` (at most this op):
    /// loops end when the shared counter goes negative.
    Back(usize),
}

fn reg(i: usize) -> Register {
    REGS[i % NREGS]
}

const JCC: [Code; 6] = [
    Code::Je_rel32_64,
    Code::Jne_rel32_64,
    Code::Jl_rel32_64,
    Code::Jae_rel32_64,
    Code::Js_rel32_64,
    Code::Jbe_rel32_64,
];

fn op_strategy() -> impl Strategy<Value = Op> {
    let r = 0..NREGS;
    let w = 0..DATA_WORDS;
    prop_oneof![
        (r.clone(), any::<i32>()).prop_map(|(a, v)| Op::MovImm(a, v)),
        (r.clone(), r.clone()).prop_map(|(a, b)| Op::Add(a, b)),
        (r.clone(), r.clone()).prop_map(|(a, b)| Op::Xor32(a, b)),
        (r.clone(), r.clone(), any::<i32>()).prop_map(|(a, b, v)| Op::Imul(a, b, v)),
        (r.clone(), w.clone()).prop_map(|(a, k)| Op::LeaRip(a, k)),
        (r.clone(), w.clone()).prop_map(|(a, k)| Op::LoadRip(a, k)),
        (r.clone(), w.clone()).prop_map(|(a, k)| Op::AddRip(a, k)),
        (r.clone(), w.clone()).prop_map(|(a, k)| Op::StoreRip(a, k)),
        (r.clone(), any::<i8>()).prop_map(|(a, v)| Op::CmpImm(a, v)),
        (0..JCC.len() as u8, 0usize..4).prop_map(|(c, n)| Op::Jcc(c, n)),
        (0usize..3).prop_map(Op::JmpFwd),
        Just(Op::Nop),
        (0usize..14).prop_map(Op::Back),
    ]
}

/// Builds the instructions (op `k` starts at fake ip 0x1000 + 16*k; branch targets
/// name those ips; the block encoder resolves them) followed by `ret`.
fn build(ops: &[Op], data: u64) -> Vec<Instruction> {
    let ip = |k: usize| 0x1000 + 16 * k as u64;
    let n = ops.len();
    let mem =
        |k: usize| MemoryOperand::with_base_displ(Register::RIP, (data + 8 * k as u64) as i64);
    let mut out = Vec::new();
    for (k, op) in ops.iter().enumerate() {
        let target = |skip: usize| ip((k + 1 + skip).min(n));
        let mut first = match op {
            Op::MovImm(a, v) => Instruction::with2(Code::Mov_rm64_imm32, reg(*a), *v),
            Op::Add(a, b) => Instruction::with2(Code::Add_rm64_r64, reg(*a), reg(*b)),
            Op::Xor32(a, b) => Instruction::with2(
                Code::Xor_rm32_r32,
                reg(*a).full_register32(),
                reg(*b).full_register32(),
            ),
            Op::Imul(a, b, v) => {
                Instruction::with3(Code::Imul_r64_rm64_imm32, reg(*a), reg(*b), *v)
            }
            Op::LeaRip(a, k) => Instruction::with2(Code::Lea_r64_m, reg(*a), mem(*k)),
            Op::LoadRip(a, k) => Instruction::with2(Code::Mov_r64_rm64, reg(*a), mem(*k)),
            Op::AddRip(a, k) => Instruction::with2(Code::Add_r64_rm64, reg(*a), mem(*k)),
            Op::StoreRip(a, k) => Instruction::with2(Code::Mov_rm64_r64, mem(*k), reg(*a)),
            Op::CmpImm(a, v) => Instruction::with2(Code::Cmp_rm64_imm8, reg(*a), *v as i32),
            Op::Jcc(c, skip) => Instruction::with_branch(JCC[*c as usize], target(*skip)),
            Op::JmpFwd(skip) => Instruction::with_branch(Code::Jmp_rel32_64, target(*skip)),
            Op::Nop => Ok(Instruction::with(Code::Nopd)),
            Op::Back(_) => {
                let counter = MemoryOperand::with_base_displ(
                    Register::RIP,
                    (data + 8 * COUNTER as u64) as i64,
                );
                Instruction::with1(Code::Dec_rm32, counter)
            }
        }
        .unwrap();
        first.set_ip(ip(k));
        out.push(first);
        if let Op::Back(to) = op {
            let mut j = Instruction::with_branch(Code::Jns_rel32_64, ip(*to.min(&k))).unwrap();
            j.set_ip(ip(k) + 8);
            out.push(j);
        }
    }
    let mut ret = Instruction::with(Code::Retnq);
    ret.set_ip(ip(n));
    out.push(ret);
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn relocated_prologues_compute_the_same(
        ops in prop::collection::vec(op_strategy(), 2..14),
        endbr in any::<bool>(),
        regs in prop::array::uniform15(any::<u64>()),
        data in prop::collection::vec(any::<u64>(), DATA_WORDS),
    ) {
        let x = Exec::new();
        let data: [u64; DATA_WORDS] = data.try_into().unwrap();
        let code_at = x.base as u64;
        let instrs = build(&ops, x.data_addr());
        let mut code = Vec::new();
        if endbr {
            code.extend_from_slice(&ENDBR64);
        }
        let body_at = code_at + code.len() as u64;
        code.extend(enc(&instrs, body_at));
        x.write(x.base, &code);
        let want = x.run(code_at, &regs, &data);

        match analyze(&code, code_at, &[]) {
            Ok(p) => {
                let far = x.far as u64;
                let r = p.relocate(far).unwrap();
                x.write(x.far, &r.code);
                // The copy is entered as the patched jump enters it (after endbr64,
                // which is a nop here).
                // Patch the original as the agent does: a jump to the copy, the rest of
                // the replaced bytes int3 (a path into them traps: the test dies loudly).
                let mut patch = vec![0xcc; p.len as usize];
                patch[0] = 0xe9;
                let rel = far.wrapping_sub(p.patch_at + 5) as i64;
                prop_assert!(i32::try_from(rel).is_ok());
                patch[1..5].copy_from_slice(&(rel as i32).to_le_bytes());
                let patch_off = (p.patch_at - code_at) as usize;
                // SAFETY: inside our own near mapping.
                x.write(unsafe { x.base.add(patch_off) }, &patch);
                let got = x.run(code_at, &regs, &data);
                prop_assert_eq!(&got, &want, "ops {:?}\ncode {:02x?}\ncopy {:02x?}", ops, code, r.code);
                // Every moved boundary maps into the copy.
                for b in p.boundaries() {
                    prop_assert!(r.map_pc(&p, p.patch_at + b as u64).is_some());
                }
            }
            Err(Refusal::BranchIntoPatch { .. })
            | Err(Refusal::BranchToEntry { .. })
            | Err(Refusal::TooShort { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected refusal {e} for {:?}", ops),
        }
    }
}

#[test]
fn encoder_sanity() {
    // keeps `Encoder` in use for readers who want single-instruction checks
    let mut e = Encoder::new(64);
    let i = Instruction::with(Code::Retnq);
    e.encode(&i, 0).unwrap();
    assert_eq!(e.take_buffer(), vec![0xc3]);
}

/// `mov rbp,rsp` ×2 (the 6 replaced bytes); `cmp edi,3; ja +27; lea rdx,[rip+T];
/// movsxd rax,[rdx+rdi*4]; add rax,rdx; jmp rax` (at +25); `ret` at +27; then `tail`.
fn pic_switch(tail: &[u8]) -> Vec<u8> {
    let disp = (0x1000i32 - 18).to_le_bytes();
    asm(&[
        b"\x48\x89\xe5\x48\x89\xe5",
        b"\x83\xff\x03",
        b"\x77\x10",
        b"\x48\x8d\x15",
        &disp,
        b"\x48\x63\x04\xba",
        b"\x48\x01\xd0",
        b"\xff\xe0",
        b"\xc3",
        tail,
    ])
}

const TABLE: u64 = BASE + 0x1000;

#[test]
fn jump_tables_are_recognized_and_their_targets_checked() {
    let code = pic_switch(&[0xc3; 8]);
    let mut seen = Vec::new();
    let targets = [BASE + 27, BASE + 28, BASE + 29, BASE + 0x5000];
    let (p, inside) = analyze_with_tables(&code, BASE, &[], &mut |t| {
        seen.push(*t);
        Ok(targets.to_vec())
    })
    .unwrap();
    assert_eq!(p.len, 6);
    assert_eq!(
        seen,
        [JumpTable {
            jump: BASE + 25,
            table: TABLE,
            entries: 4,
            form: TableForm::Rel32
        }]
    );
    // Targets outside the function (a cold part) are not known targets.
    assert_eq!(inside, [BASE + 27, BASE + 28, BASE + 29]);
    // `analyze` recognizes the same table and trusts the caller for its targets.
    assert_eq!(analyze(&code, BASE, &inside).unwrap().len, 6);

    // A target in the replaced bytes, or at the entry, refuses.
    let with = |t: Vec<u64>| analyze_with_tables(&code, BASE, &[], &mut |_| Ok(t.clone()));
    assert_eq!(
        with(vec![BASE + 27, BASE + 3]).unwrap_err(),
        Refusal::BranchIntoPatch { from: 25, to: 3 }
    );
    assert_eq!(
        with(vec![BASE]).unwrap_err(),
        Refusal::BranchToEntry { from: 25 }
    );
    // A target inside the dispatch itself: the bound no longer holds on that path.
    assert_eq!(
        with(vec![BASE + 22]).unwrap_err(),
        Refusal::IndirectJump { offset: 25 }
    );
    // A table that cannot be read refuses with the reader's reason.
    let unreadable = Refusal::JumpTable {
        offset: 25,
        table: TABLE,
        why: "gone".into(),
    };
    assert_eq!(
        analyze_with_tables(&code, BASE, &[], &mut |_| Err(unreadable.clone())).unwrap_err(),
        unreadable
    );
}

#[test]
fn jump_table_guards() {
    // Another path into the dispatch guarded the same way: `cmp edi,2; jbe dispatch`.
    let code = pic_switch(b"\x83\xff\x02\x76\xea\xc3");
    assert!(analyze(&code, BASE, &[]).is_ok());
    // A guard with a larger bound than the table's: the table could be overrun.
    let code = pic_switch(b"\x83\xff\x09\x76\xea\xc3");
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::IndirectJump { offset: 25 }
    );
    // An unguarded jump into the dispatch: `jmp dispatch`.
    let code = pic_switch(b"\xeb\xed\xc3");
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::IndirectJump { offset: 25 }
    );
    // A landing pad (known target) on the `ja`: flags from elsewhere.
    let code = pic_switch(&[0xc3; 4]);
    assert_eq!(
        analyze(&code, BASE, &[BASE + 9]).unwrap_err(),
        Refusal::IndirectJump { offset: 25 }
    );
    // No bound at all: `movsxd; add; jmp` alone.
    let code = asm(&[
        b"\x48\x89\xe5\x48\x89\xe5",
        b"\x48\x8d\x15\x00\x10\x00\x00",
        b"\x48\x63\x04\xba\x48\x01\xd0\xff\xe0",
    ]);
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::IndirectJump { offset: 20 }
    );
    // The index compared is not the one used: `cmp esi,3`.
    let mut code = pic_switch(&[0xc3; 4]);
    code[7] = 0xfe;
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::IndirectJump { offset: 25 }
    );
    // An indirect tail call: `pop rbp; jmp rax`.
    let code = asm(&[b"\x48\x89\xe5\x48\x89\xe5", b"\x5d\xff\xe0"]);
    assert_eq!(
        analyze(&code, BASE, &[]).unwrap_err(),
        Refusal::IndirectJump { offset: 7 }
    );
}

#[test]
fn other_jump_table_forms() {
    // 8-bit compare, then movzx: `cmp dil,3; ja; lea; movzx edi,dil; movsxd; add; jmp`.
    let disp = (0x1000i32 - 19).to_le_bytes();
    let code = asm(&[
        b"\x48\x89\xe5\x48\x89\xe5",
        b"\x40\x80\xff\x03",
        b"\x77\x14",
        b"\x48\x8d\x15",
        &disp,
        b"\x40\x0f\xb6\xff",
        b"\x48\x63\x04\xba\x48\x01\xd0\xff\xe0",
        b"\xc3",
    ]);
    let mut seen = Vec::new();
    analyze_with_tables(&code, BASE, &[], &mut |t| {
        seen.push(*t);
        Ok(vec![])
    })
    .unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].table, seen[0].entries), (TABLE, 4));
    // `cmp dil,-1`: the bound is 255.
    let mut neg = code.clone();
    neg[9] = 0xff;
    seen.clear();
    let _ = analyze_with_tables(&neg, BASE, &[], &mut |t| {
        seen.push(*t);
        Ok(vec![])
    });
    assert_eq!(seen[0].entries, 256);
    // Non-PIC: `cmp edi,3; ja; jmp qword [rdi*8+0x600000]`.
    let code = asm(&[
        b"\x48\x89\xe5\x48\x89\xe5",
        b"\x83\xff\x03",
        b"\x77\x07",
        b"\xff\x24\xfd\x00\x00\x60\x00",
        b"\xc3",
    ]);
    seen.clear();
    analyze_with_tables(&code, BASE, &[], &mut |t| {
        seen.push(*t);
        Ok(vec![BASE + 18])
    })
    .unwrap();
    assert_eq!(
        seen,
        [JumpTable {
            jump: BASE + 11,
            table: 0x60_0000,
            entries: 4,
            form: TableForm::Abs64
        }]
    );
}
