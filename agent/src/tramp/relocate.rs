//! Prologue relocation for functions built without instrumentation: which first
//! instructions of a function can be moved into a trampoline (so that a 5-byte `jmp`
//! can take their place), and their re-encoding at the trampoline's address, followed
//! by a jump back. Pure: it reads the bytes it is given and nothing else; no process
//! state, no I/O. It never guesses: whatever it cannot prove safe is a [`Refusal`]
//! with a precise reason.
//!
//! Safe means: after the first `len` bytes at `patch_at` are replaced by a `jmp`, no
//! path of the function (nor any known landing pad) reaches bytes `patch_at+1 ..
//! patch_at+len`, the moved instructions compute the same thing at their new address
//! (RIP-relative operands and relative branches re-targeted by iced-x86's block
//! encoder), and no moved instruction leaves a return address inside the moved bytes
//! (a `call` among them is refused: the return would land in trampoline memory).

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Formatter,
    Instruction, InstructionBlock, IntelFormatter, OpKind, Register,
};

/// Bytes of the jump that replaces the prologue (`e9 rel32`).
pub const JMP_LEN: u32 = 5;

/// `endbr64`: kept at the entry (indirect calls under CET land on it); the jump goes after it.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Why a function's prologue cannot be relocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "function is {size} bytes after its entry marker, shorter than the {JMP_LEN}-byte jump"
    )]
    TooShort { size: u32 },
    #[error("cannot decode the instruction at +{offset:#x}: refusing rather than guessing")]
    Undecodable { offset: u32 },
    #[error("the instruction at +{offset:#x} runs past the function's end (+{size:#x})")]
    PastEnd { offset: u32, size: u32 },
    #[error("a jump at +{from:#x} targets +{to:#x}, inside the bytes the patch replaces")]
    BranchIntoPatch { from: u32, to: u32 },
    #[error("a jump at +{from:#x} goes back to the entry: it would be counted as a call")]
    BranchToEntry { from: u32 },
    #[error(
        "indirect jump at +{offset:#x} that is not a recognized jump table (an indirect tail call, a computed goto or an unusual table): its targets are unknown"
    )]
    IndirectJump { offset: u32 },
    #[error("`{text}` at +{offset:#x} cannot be moved: {why}")]
    Unmovable {
        offset: u32,
        text: String,
        why: &'static str,
    },
    #[error("an instruction at +{from:#x} reads or writes the replaced bytes (+{to:#x})")]
    TouchesPatch { from: u32, to: u32 },
    #[error(
        "control may enter at +{offset:#x}, inside the replaced bytes (another symbol, a landing pad, a jump-table target, a jump from another function or a taken address)"
    )]
    TargetInPatch { offset: u32 },
    #[error("re-encoding at {at:#x} failed: {why}")]
    Encode { at: u64, why: String },
    #[error(
        "the jump table at {table:#x} used by the indirect jump at +{offset:#x} cannot be read: {why}"
    )]
    JumpTable {
        offset: u32,
        table: u64,
        why: String,
    },
    #[error("the unwind information cannot be read ({why}): landing pads unknown")]
    UnwindInfo { why: String },
}

/// How the entries of a [`JumpTable`] give their targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableForm {
    /// Signed 32-bit offsets from the table's own address (PIC: `lea rX,[rip+T];
    /// movsxd rY,dword [rX+rZ*4]; add rY,rX; jmp rY`).
    Rel32,
    /// Absolute 64-bit addresses (non-PIC: `jmp qword [T+rZ*8]`).
    Abs64,
}

/// A jump table recognized at an indirect `jmp`: the index is bounded by a dominating
/// `cmp rZ,N; ja default`, so the table has exactly `entries = N + 1` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpTable {
    /// Address of the indirect `jmp`.
    pub jump: u64,
    /// Link-time or run-time address of the table (as the code computes it).
    pub table: u64,
    /// Number of entries.
    pub entries: u32,
    pub form: TableForm,
}

impl JumpTable {
    /// Bytes per entry.
    pub fn entry_size(&self) -> usize {
        match self.form {
            TableForm::Rel32 => 4,
            TableForm::Abs64 => 8,
        }
    }
}

/// Largest switch bound accepted in a recognized jump table.
const MAX_TABLE_ENTRIES: u64 = 1 << 16;

/// The relocatable prologue of one function.
#[derive(Debug, Clone)]
pub struct Prologue {
    /// The function's entry (its symbol address).
    pub entry: u64,
    /// Where the jump is written: the entry, or just after an `endbr64`.
    pub patch_at: u64,
    /// Bytes replaced at `patch_at`: whole instructions, at least [`JMP_LEN`].
    pub len: u32,
    /// The moved instructions, decoded at their original addresses.
    moved: Vec<Instruction>,
}

/// A prologue re-encoded at a new address, ending with a jump back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocated {
    /// Address the code was encoded for.
    pub at: u64,
    pub code: Vec<u8>,
    /// For each moved instruction: (offset from `patch_at`, offset in `code`). A thread
    /// stopped at an original instruction boundary resumes at the matching one.
    pub boundaries: Vec<(u32, u32)>,
}

fn offset(entry: u64, ip: u64) -> u32 {
    ip.wrapping_sub(entry) as u32
}

fn text(i: &Instruction) -> String {
    let mut s = String::new();
    IntelFormatter::new().format(i, &mut s);
    s
}

/// Analyzes the function `code` (its whole body, as long as its symbol says) loaded at
/// `entry`. `known_targets` are other addresses control may reach in the function
/// (exception landing pads, symbols or `.eh_frame` starts inside it, targets of its
/// jump tables): one inside the replaced bytes refuses.
///
/// An indirect `jmp` is accepted only where it is a recognized jump table (see
/// [`JumpTable`]); this function does not read tables, so the caller must include every
/// target of every recognized table that lies inside the function in `known_targets`
/// ([`analyze_with_tables`] reads them and returns them).
pub fn analyze(code: &[u8], entry: u64, known_targets: &[u64]) -> Result<Prologue, Refusal> {
    analyze_with_tables(code, entry, known_targets, &mut |_| Ok(Vec::new())).map(|(p, _)| p)
}

/// [`analyze`], reading the targets of each recognized jump table with `read_table`
/// (a [`Refusal::JumpTable`] when it cannot). Returns the prologue and the sorted
/// table targets strictly inside the function (after the entry), which are to be
/// passed as known targets to [`analyze`] later to reach the same answer.
pub fn analyze_with_tables(
    code: &[u8],
    entry: u64,
    known_targets: &[u64],
    read_table: &mut dyn FnMut(&JumpTable) -> Result<Vec<u64>, Refusal>,
) -> Result<(Prologue, Vec<u64>), Refusal> {
    let size = code.len() as u32;
    let skip = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    if size < skip + JMP_LEN {
        return Err(Refusal::TooShort { size: size - skip });
    }
    let patch_at = entry + skip as u64;
    // Decode the whole body, linearly: code built by compilers for x86_64 keeps data
    // out of .text; anything that does not decode cleanly is refused.
    let mut body = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            let off = offset(entry, i.ip());
            return Err(
                if decoder.last_error() == iced_x86::DecoderError::NoMoreBytes {
                    Refusal::PastEnd { offset: off, size }
                } else {
                    Refusal::Undecodable { offset: off }
                },
            );
        }
        body.push(i);
    }
    // The moved instructions: whole instructions from patch_at covering JMP_LEN bytes.
    let mut len = 0u32;
    let mut moved = Vec::new();
    for i in body.iter().filter(|i| i.ip() >= patch_at) {
        if len >= JMP_LEN {
            break;
        }
        moved.push(*i);
        len += i.len() as u32;
    }
    if len < JMP_LEN {
        return Err(Refusal::TooShort { size: size - skip });
    }
    let patch_end = patch_at + len as u64;
    for i in &moved {
        check_movable(entry, i)?;
        // A moved instruction that ends the function's flow (ret, jmp) leaves the
        // bytes after it unreachable from it; those must still not be targets: checked below.
    }
    let inside = |a: u64| a > patch_at && a < patch_end;
    let moved_ip = |ip: u64| ip >= patch_at && ip < patch_end;
    let end = entry + size as u64;
    // Addresses control may reach other than by falling through or a direct branch:
    // the known targets, then also the targets of the jump tables found.
    let mut extra: Vec<u64> = known_targets.to_vec();
    extra.sort_unstable();
    extra.dedup();
    let mut tables = Vec::new();
    for k in 0..body.len() {
        if body[k].flow_control() == FlowControl::IndirectBranch && !is_got_tail_call(&body[k]) {
            let Some(t) = jump_table(&body, k, &extra) else {
                return Err(Refusal::IndirectJump {
                    offset: offset(entry, body[k].ip()),
                });
            };
            tables.push(t);
        }
    }
    let mut table_targets = Vec::new();
    for t in &tables {
        for a in read_table(t)? {
            let from = offset(entry, t.jump);
            if inside(a) {
                return Err(Refusal::BranchIntoPatch {
                    from,
                    to: offset(entry, a),
                });
            }
            if a >= entry && a <= patch_at {
                return Err(Refusal::BranchToEntry { from });
            }
            if a > patch_at && a < end {
                table_targets.push(a);
            }
        }
    }
    table_targets.sort_unstable();
    table_targets.dedup();
    if !table_targets.is_empty() {
        // A table's target may land inside another table's dispatch: recognize again
        // with every target known, as `analyze` will with them among `known_targets`.
        extra.extend(&table_targets);
        extra.sort_unstable();
        extra.dedup();
        for t in &tables {
            let k = body.iter().position(|i| i.ip() == t.jump).unwrap_or(0);
            if jump_table(&body, k, &extra).as_ref() != Some(t) {
                return Err(Refusal::IndirectJump {
                    offset: offset(entry, t.jump),
                });
            }
        }
    }
    for i in &body {
        let from = offset(entry, i.ip());
        // A branch among the moved instructions to another of them is re-targeted
        // inside the copy by the block encoder; one to the entry (or into endbr64)
        // would pass the jump again and count a call that did not happen.
        if moved_ip(i.ip()) && is_near_branch(i) && moved_ip(i.near_branch_target()) {
            continue;
        }
        match i.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                if is_near_branch(i) {
                    let t = i.near_branch_target();
                    if inside(t) {
                        return Err(Refusal::BranchIntoPatch {
                            from,
                            to: offset(entry, t),
                        });
                    }
                    if t >= entry && t <= patch_at {
                        return Err(Refusal::BranchToEntry { from });
                    }
                } else if i.flow_control() == FlowControl::UnconditionalBranch {
                    // far jumps: nothing compilers emit in user code.
                    return Err(Refusal::Unmovable {
                        offset: from,
                        text: text(i),
                        why: "far jump",
                    });
                }
            }
            FlowControl::Call if is_near_branch(i) && inside(i.near_branch_target()) => {
                return Err(Refusal::BranchIntoPatch {
                    from,
                    to: offset(entry, i.near_branch_target()),
                });
            }
            // Indirect jumps: GOT tail calls and recognized jump tables, checked above.
            FlowControl::XbeginXabortXend
                if i.code() == Code::Xbegin_rel32 || i.code() == Code::Xbegin_rel16 =>
            {
                let t = i.near_branch_target();
                if inside(t) || (t >= entry && t <= patch_at) {
                    return Err(Refusal::BranchIntoPatch {
                        from,
                        to: offset(entry, t),
                    });
                }
            }
            _ => {}
        }
        if i.is_ip_rel_memory_operand() {
            let a = i.ip_rel_memory_address();
            if a >= patch_at && a < patch_end {
                return Err(Refusal::TouchesPatch {
                    from,
                    to: offset(entry, a),
                });
            }
        }
    }
    if let Some(t) = known_targets.iter().find(|t| inside(**t)) {
        return Err(Refusal::TargetInPatch {
            offset: offset(entry, *t),
        });
    }
    Ok((
        Prologue {
            entry,
            patch_at,
            len,
            moved,
        },
        table_targets,
    ))
}

/// `ah`, `bh`, `ch`, `dh`: bits 8..16 of their full register.
fn is_high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::BH | Register::CH | Register::DH)
}

/// `jmp [rip+x]` is a tail call through a GOT slot: its target is a function's entry,
/// never bytes inside another function's prologue.
fn is_got_tail_call(i: &Instruction) -> bool {
    i.op0_kind() == OpKind::Memory
        && i.memory_base() == Register::RIP
        && i.memory_index() == Register::None
}

/// The jump table dispatched by the indirect jump `body[k]`, when it has one of the
/// two standard forms, bounded by `cmp rZ,N; ja` with nothing but the dispatch between
/// (no address of `targets` inside it, so the bound holds on every path):
///
/// - PIC: `cmp; ja; [lea rX,[rip+T]]; [mov copies]; movsxd rY,dword [rX+rZ*4];
///   add rY,rX; jmp rY` (the `lea` may also come right before the `cmp`);
/// - non-PIC: `cmp; ja; [mov copies]; jmp qword [T+rZ*8]`.
///
/// `mov` copies between registers carry the bounded index (a 32-bit `mov` zero-extends,
/// which keeps a value below N). The only other way into the dispatch accepted is a
/// `cmp` of the same register with a bound no larger, then `jbe` to its first
/// instruction (gcc re-checks the index on another path). Anything else is not
/// recognized. `extra` (sorted) are the addresses control may reach other than by
/// direct branches.
fn jump_table(body: &[Instruction], k: usize, extra: &[u64]) -> Option<JumpTable> {
    let jmp = &body[k];
    let reg = |i: &Instruction, n: u32| i.op_register(n).full_register();
    let direct_target = |ip: u64| {
        body.iter()
            .any(|i| is_near_branch(i) && i.near_branch_target() == ip)
    };
    let is_target = |ip: u64| extra.binary_search(&ip).is_ok() || direct_target(ip);
    if jmp.code() != Code::Jmp_rm64 {
        return None;
    }
    let (mut j, mut index, form, mut table, mut base) = if jmp.op0_kind() == OpKind::Register {
        // PIC form: add rY,rX before, movsxd rY,[rX+rZ*4] before that.
        let ry = reg(jmp, 0);
        let add = body.get(k.checked_sub(1)?)?;
        let rx = match add.code() {
            Code::Add_r64_rm64 | Code::Add_rm64_r64
                if add.op1_kind() == OpKind::Register && reg(add, 0) == ry =>
            {
                reg(add, 1)
            }
            _ => return None,
        };
        let ld = body.get(k.checked_sub(2)?)?;
        if ld.code() != Code::Movsxd_r64_rm32
            || reg(ld, 0) != ry
            || ld.op1_kind() != OpKind::Memory
            || ld.memory_base() != rx
            || ld.memory_index_scale() != 4
            || ld.memory_displacement64() != 0
            || ld.segment_prefix() != Register::None
            || rx == ry
        {
            return None;
        }
        let rz = ld.memory_index().full_register();
        (k.checked_sub(3)?, rz, TableForm::Rel32, None, Some(rx))
    } else if jmp.op0_kind() == OpKind::Memory
        && jmp.memory_base() == Register::None
        && jmp.memory_index_scale() == 8
        && jmp.memory_index() != Register::None
        && matches!(jmp.segment_prefix(), Register::None | Register::DS)
    {
        let t = jmp.memory_displacement64();
        (
            k.checked_sub(1)?,
            jmp.memory_index().full_register(),
            TableForm::Abs64,
            Some(t),
            None,
        )
    } else {
        return None;
    };
    if index == Register::None || index == Register::RSP {
        return None;
    }
    // Walk back to the `ja`, through the `lea` of the table and register copies.
    loop {
        let i = body.get(j)?;
        match i.code() {
            Code::Ja_rel8_64 | Code::Ja_rel32_64 => break,
            Code::Lea_r64_m
                if table.is_none()
                    && Some(reg(i, 0)) == base
                    && i.memory_base() == Register::RIP
                    && i.memory_index() == Register::None =>
            {
                table = Some(i.memory_displacement64());
                base = None;
            }
            Code::Mov_r32_rm32
            | Code::Mov_rm32_r32
            | Code::Mov_r64_rm64
            | Code::Mov_rm64_r64
            | Code::Movzx_r32_rm8
            | Code::Movzx_r64_rm8
            | Code::Movzx_r32_rm16
            | Code::Movzx_r64_rm16
                if i.op1_kind() == OpKind::Register && !is_high_byte(i.op1_register()) =>
            {
                let (dst, src) = (reg(i, 0), reg(i, 1));
                if Some(dst) == base {
                    return None;
                }
                if dst == index {
                    index = src;
                }
            }
            _ => return None,
        }
        j = j.checked_sub(1)?;
    }
    let cmp_at = j.checked_sub(1)?;
    let cmp = &body[cmp_at];
    // `cmp index,N` (register, immediate): N.
    let bound_of = |cmp: &Instruction| match cmp.code() {
        Code::Cmp_rm8_imm8
        | Code::Cmp_AL_imm8
        | Code::Cmp_rm16_imm8
        | Code::Cmp_rm16_imm16
        | Code::Cmp_AX_imm16
        | Code::Cmp_rm32_imm8
        | Code::Cmp_rm32_imm32
        | Code::Cmp_rm64_imm8
        | Code::Cmp_rm64_imm32
        | Code::Cmp_EAX_imm32
        | Code::Cmp_RAX_imm32
            if cmp.op0_kind() == OpKind::Register
                && !is_high_byte(cmp.op0_register())
                && reg(cmp, 0) == index =>
        {
            // The immediate as the compare sees it (sign-extended to the operand size,
            // compared unsigned by `ja`): a negative one is a huge bound.
            let bits = cmp.op0_register().size() * 8;
            Some(cmp.immediate(1) & (u64::MAX >> (64 - bits)))
        }
        _ => None,
    };
    let bound = bound_of(cmp)?;
    // A compare narrower than the index bounds its low part; as compilers emit it, the
    // rest is zero (a `movzx` or 32-bit `mov` in the dispatch, or an earlier write).
    if bound >= MAX_TABLE_ENTRIES {
        return None;
    }
    // No path reaches the `ja` other than from the `cmp`, nor the dispatch other than
    // from the `ja` or an equally guarded `jbe`.
    let (ja_ip, dispatch) = (body[j].ip(), body[j].next_ip());
    // With the `lea` of the table before the `cmp`, a `jbe` to the dispatch skips it.
    let lea_before_cmp = table.is_none();
    if extra.iter().any(|&t| t > cmp.ip() && t <= jmp.ip()) {
        return None;
    }
    for (n, b) in body.iter().enumerate() {
        if !is_near_branch(b) {
            continue;
        }
        let t = b.near_branch_target();
        if t <= cmp.ip() || t > jmp.ip() {
            continue;
        }
        let guarded = t == dispatch
            && !lea_before_cmp
            && t != ja_ip
            && matches!(b.code(), Code::Jbe_rel8_64 | Code::Jbe_rel32_64)
            && !is_target(b.ip())
            && n.checked_sub(1)
                .and_then(|p| bound_of(&body[p]))
                .is_some_and(|m| m <= bound);
        if !guarded {
            return None;
        }
    }
    if table.is_none() {
        // `lea rX,[rip+T]` right before the `cmp`, nothing jumping between.
        let lea = body.get(cmp_at.checked_sub(1)?)?;
        if lea.code() != Code::Lea_r64_m
            || Some(reg(lea, 0)) != base
            || lea.memory_base() != Register::RIP
            || lea.memory_index() != Register::None
            || reg(cmp, 0) == reg(lea, 0)
            || is_target(cmp.ip())
        {
            return None;
        }
        table = Some(lea.memory_displacement64());
    }
    Some(JumpTable {
        jump: jmp.ip(),
        table: table?,
        entries: bound as u32 + 1,
        form,
    })
}

/// Addresses the code at `at` may send control to, other than by falling through:
/// direct branch and call targets outside `[at, at + code.len())` (a jump into another
/// function), and every address taken by a RIP-relative `lea` (a label whose address
/// may reach an indirect jump), appended to `out`. Decoding stops at the first
/// undecodable instruction.
pub fn outside_targets(code: &[u8], at: u64, out: &mut Vec<u64>) {
    let end = at + code.len() as u64;
    let mut decoder = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
    let mut i = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut i);
        if i.is_invalid() {
            return;
        }
        if is_near_branch(&i) {
            let t = i.near_branch_target();
            if t < at || t >= end {
                out.push(t);
            }
        } else if i.code() == Code::Lea_r64_m && i.is_ip_rel_memory_operand() {
            out.push(i.ip_rel_memory_address());
        }
    }
}

fn is_near_branch(i: &Instruction) -> bool {
    matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
}

fn check_movable(entry: u64, i: &Instruction) -> Result<(), Refusal> {
    let why = match i.flow_control() {
        FlowControl::Call | FlowControl::IndirectCall => {
            Some("a call there would return into the trampoline")
        }
        FlowControl::Interrupt => Some("a trap there would report the trampoline's address"),
        FlowControl::XbeginXabortXend => Some("transactional regions are not moved"),
        FlowControl::Exception => Some("an undefined instruction is not moved"),
        _ => None,
    };
    match why {
        Some(why) => Err(Refusal::Unmovable {
            offset: offset(entry, i.ip()),
            text: text(i),
            why,
        }),
        None => Ok(()),
    }
}

impl Prologue {
    /// Offsets (from `patch_at`) of the moved instructions.
    pub fn boundaries(&self) -> impl Iterator<Item = u32> + '_ {
        self.moved.iter().map(|i| offset(self.patch_at, i.ip()))
    }

    /// The moved instructions re-encoded to run at `at`, then a jump back to
    /// `patch_at + len`. `at` must be within ±2 GiB of every RIP-relative operand.
    pub fn relocate(&self, at: u64) -> Result<Relocated, Refusal> {
        let back = self.patch_at + self.len as u64;
        let mut block = self.moved.clone();
        let jmp =
            Instruction::with_branch(Code::Jmp_rel32_64, back).map_err(|e| Refusal::Encode {
                at,
                why: e.to_string(),
            })?;
        block.push(jmp);
        let r = BlockEncoder::encode(
            64,
            InstructionBlock::new(&block, at),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(|e| Refusal::Encode {
            at,
            why: e.to_string(),
        })?;
        let mut boundaries = Vec::with_capacity(self.moved.len());
        for (i, new) in self.moved.iter().zip(&r.new_instruction_offsets) {
            if *new == u32::MAX {
                // Rewritten into several instructions: no single point to resume at.
                return Err(Refusal::Encode {
                    at,
                    why: format!("`{}` had to be rewritten", text(i)),
                });
            }
            boundaries.push((offset(self.patch_at, i.ip()), *new));
        }
        Ok(Relocated {
            at,
            code: r.code_buffer,
            boundaries,
        })
    }
}

impl Relocated {
    /// Where a thread stopped at original address `pc` (inside the replaced bytes of
    /// `p`) resumes in the relocated copy; `None` if `pc` is not an instruction boundary
    /// of the moved bytes (`patch_at` itself maps to the copy's start).
    pub fn map_pc(&self, p: &Prologue, pc: u64) -> Option<u64> {
        let off = pc.checked_sub(p.patch_at)?;
        self.boundaries
            .iter()
            .find(|(old, _)| *old as u64 == off)
            .map(|(_, new)| self.at + *new as u64)
    }
}

#[cfg(test)]
mod tests;
