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
//! ```
//! Sites call the generic stub (any group) or their own count stub. The generic stub
//! pushes the descriptor and jumps to the static entry stub, so a thread spends only
//! two instructions in trampoline memory per call on that path.

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
}

/// Bytes needed for a slot.
pub fn slot_len(layout: &Layout<'_>) -> usize {
    match layout {
        Layout::Generic => COUNT_BASE,
        Layout::Count { idx, .. } => COUNT_BASE + idx.len() * COUNT_STUB,
    }
}

/// Offset of the code site `i` must call.
pub fn site_entry(layout: &Layout<'_>, i: usize) -> usize {
    match layout {
        Layout::Generic => GENERIC,
        Layout::Count { .. } => COUNT_BASE + i * COUNT_STUB,
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
    b
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
}
