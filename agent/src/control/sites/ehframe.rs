//! A small reader of `.eh_frame` (FDE ranges, whether an FDE starts like a function
//! entry, and its LSDA) and of the LSDA call-site tables in `.gcc_except_table`
//! (exception landing pads). Only what site discovery needs: where functions start and
//! where else control may arrive inside them.
//!
//! A hand-written reader rather than `gimli`: `gimli` parses `.eh_frame` but not the
//! LSDA (a GCC format), which is needed anyway, and the part of `.eh_frame` used here
//! (CIE augmentation, FDE ranges, the instructions before the first advance) is small.
//!
//! An object without `.eh_frame` (or a function without an FDE) has no landing pads to
//! miss: the unwinder needs the FDE to reach a landing pad at all. Such functions are
//! analyzed from their symbols alone.

use std::collections::HashMap;

/// `DW_EH_PE_omit`.
const OMIT: u8 = 0xff;

/// One FDE: a range of code with unwind information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fde {
    /// Link-time address of the first byte.
    pub start: u64,
    /// Bytes covered.
    pub len: u64,
    /// Whether the CFA at `start` is the one of a function entry (`rsp+8`, return
    /// address at `cfa-8`): the CIE's rule, unchanged before the first advance. A
    /// split-off part of a function (gcc's `.cold` partition) starts mid-frame.
    pub entry_like: bool,
    /// Link-time address of the LSDA in `.gcc_except_table`, when there is one.
    pub lsda: Option<u64>,
}

/// Why `.eh_frame` or an LSDA could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at {at:#x}")]
pub struct EhError {
    pub what: &'static str,
    pub at: u64,
}

fn err<T>(what: &'static str, at: u64) -> Result<T, EhError> {
    Err(EhError { what, at })
}

/// A cursor over bytes that live at a link-time address.
struct Cursor<'d> {
    data: &'d [u8],
    base: u64,
    pos: usize,
}

impl<'d> Cursor<'d> {
    fn at(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn bytes(&mut self, n: usize) -> Result<&'d [u8], EhError> {
        let at = self.at();
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(e) => {
                let b = &self.data[self.pos..e];
                self.pos = e;
                Ok(b)
            }
            None => err("truncated data", at),
        }
    }

    fn u8(&mut self) -> Result<u8, EhError> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, EhError> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, EhError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, EhError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }

    fn uleb(&mut self) -> Result<u64, EhError> {
        let at = self.at();
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= u64::from(b & 0x7f) << shift;
            } else if b & 0x7f != 0 {
                return err("LEB128 value overflows 64 bits", at);
            }
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
    }

    fn sleb(&mut self) -> Result<i64, EhError> {
        let (mut v, mut shift) = (0i64, 0u32);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1i64 << shift;
                }
                return Ok(v);
            }
        }
    }

    /// A pointer in encoding `enc` (`DW_EH_PE_*`); `func` is the start of the function
    /// for `DW_EH_PE_funcrel`. Indirect and data-relative pointers are refused (not
    /// emitted for the fields read here on x86_64).
    fn pointer(&mut self, enc: u8, func: Option<u64>) -> Result<u64, EhError> {
        Ok(self.pointer_raw(enc, func)?.1)
    }

    /// [`Cursor::pointer`], with the value as stored (before its base is added).
    fn pointer_raw(&mut self, enc: u8, func: Option<u64>) -> Result<(u64, u64), EhError> {
        let at = self.at();
        if enc == OMIT {
            return err("omitted pointer read", at);
        }
        let raw = match enc & 0x0f {
            0x00 | 0x04 => self.u64()?,
            0x01 => self.uleb()?,
            0x02 => u64::from(self.u16()?),
            0x03 => u64::from(self.u32()?),
            0x09 => self.sleb()? as u64,
            0x0a => self.u16()? as i16 as i64 as u64,
            0x0b => self.u32()? as i32 as i64 as u64,
            0x0c => self.u64()?,
            _ => return err("unknown pointer encoding", at),
        };
        let base = match enc & 0x70 {
            0x00 => 0,
            0x10 => at,
            0x40 => match func {
                Some(f) => f,
                None => return err("function-relative pointer outside an FDE", at),
            },
            _ => return err("unsupported pointer application", at),
        };
        if enc & 0x80 != 0 {
            return err("indirect pointer", at);
        }
        Ok((raw, base.wrapping_add(raw)))
    }
}

/// What an FDE needs from its CIE.
#[derive(Clone, Copy)]
struct Cie {
    fde_enc: u8,
    lsda_enc: u8,
    has_aug_data: bool,
    /// The initial rule is CFA = rsp+8 with the return address at cfa-8.
    entry_rule: bool,
}

/// Reads every FDE of the `.eh_frame` section `data` at link-time address `base`.
pub fn fdes(data: &[u8], base: u64) -> Result<Vec<Fde>, EhError> {
    let mut cies: HashMap<usize, Cie> = HashMap::new();
    let mut out = Vec::new();
    let mut c = Cursor { data, base, pos: 0 };
    while c.pos < data.len() {
        let record = c.pos;
        let mut len = u64::from(c.u32()?);
        if len == 0 {
            // The terminator (crtend's zero word); anything after is not ours to read.
            break;
        }
        if len == 0xffff_ffff {
            len = c.u64()?;
        }
        let body = c.pos;
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| body.checked_add(l))
            .filter(|&e| e <= data.len())
        else {
            return err("record runs past the end of .eh_frame", c.at());
        };
        let id = c.u32()?;
        if id == 0 {
            let cie = cie(&mut c, end)?;
            cies.insert(record, cie);
        } else {
            let Some(cie) = body
                .checked_sub(id as usize)
                .and_then(|p| cies.get(&p).copied())
            else {
                return err("FDE names no CIE read before it", c.at());
            };
            let start = c.pointer(cie.fde_enc, None)?;
            let len = c.pointer(cie.fde_enc & 0x0f, None)?;
            let mut lsda = None;
            if cie.has_aug_data {
                let aug_len = c.uleb()? as usize;
                let aug_end = c.pos.checked_add(aug_len).filter(|&e| e <= end);
                let Some(aug_end) = aug_end else {
                    return err("FDE augmentation runs past its record", c.at());
                };
                if cie.lsda_enc != OMIT && aug_len > 0 {
                    let (raw, p) = c.pointer_raw(cie.lsda_enc, Some(start))?;
                    // A null LSDA pointer means none (some assemblers write one).
                    if raw != 0 {
                        lsda = Some(p);
                    }
                }
                c.pos = aug_end;
            }
            let entry_like = cie.entry_rule && only_nops_before_advance(&data[c.pos..end]);
            if len != 0 {
                out.push(Fde {
                    start,
                    len,
                    entry_like,
                    lsda,
                });
            }
        }
        c.pos = end;
    }
    Ok(out)
}

fn cie(c: &mut Cursor<'_>, end: usize) -> Result<Cie, EhError> {
    let version = c.u8()?;
    if version != 1 && version != 3 {
        return err("unsupported CIE version", c.at());
    }
    let mut aug = Vec::new();
    loop {
        let b = c.u8()?;
        if b == 0 {
            break;
        }
        aug.push(b);
    }
    if aug.starts_with(b"eh") {
        return err("obsolete \"eh\" augmentation", c.at());
    }
    let code_align = c.uleb()?;
    let data_align = c.sleb()?;
    let ra = if version == 1 {
        u64::from(c.u8()?)
    } else {
        c.uleb()?
    };
    let mut cie = Cie {
        fde_enc: 0,
        lsda_enc: OMIT,
        has_aug_data: false,
        entry_rule: false,
    };
    if aug.first() == Some(&b'z') {
        cie.has_aug_data = true;
        let aug_len = c.uleb()? as usize;
        let aug_end = c.pos + aug_len;
        for &ch in &aug[1..] {
            match ch {
                b'L' => cie.lsda_enc = c.u8()?,
                b'R' => cie.fde_enc = c.u8()?,
                b'P' => {
                    let enc = c.u8()?;
                    // The personality routine's address: read to skip it, whatever it is.
                    c.pointer(enc & 0x7f, Some(0))?;
                }
                b'S' | b'B' | b'G' => {}
                _ => return err("unknown CIE augmentation", c.at()),
            }
        }
        c.pos = aug_end;
    } else if !aug.is_empty() {
        return err("unknown CIE augmentation", c.at());
    }
    // The x86_64 entry rule: DW_CFA_def_cfa rsp(7), 8; DW_CFA_offset rip(16), 1 (×-8).
    let initial = &c.data[c.pos.min(end)..end];
    cie.entry_rule = ra == 16
        && code_align == 1
        && data_align == -8
        && initial.len() >= 5
        && initial[..3] == [0x0c, 0x07, 0x08]
        && initial[3..5] == [0x90, 0x01];
    Ok(cie)
}

/// True when the FDE's instructions change nothing before the first advance of the
/// location (only `DW_CFA_nop`s, or nothing at all).
fn only_nops_before_advance(instrs: &[u8]) -> bool {
    for &op in instrs {
        match op {
            0x00 => continue,
            // DW_CFA_advance_loc (high bits 01), advance_loc1/2/4
            0x40..=0x7f | 0x02..=0x04 => return true,
            _ => return false,
        }
    }
    true
}

/// Landing pads (link-time addresses) of the LSDA at `lsda` (`data` is the section that
/// holds it, at link-time address `base`) for the function that starts at `func`.
pub fn landing_pads(data: &[u8], base: u64, lsda: u64, func: u64) -> Result<Vec<u64>, EhError> {
    let Some(pos) = lsda
        .checked_sub(base)
        .and_then(|o| usize::try_from(o).ok())
        .filter(|&o| o < data.len())
    else {
        return err("LSDA outside its section", lsda);
    };
    let mut c = Cursor { data, base, pos };
    let lp_enc = c.u8()?;
    let lp_start = if lp_enc == OMIT {
        func
    } else {
        c.pointer(lp_enc, Some(func))?
    };
    let tt_enc = c.u8()?;
    if tt_enc != OMIT {
        c.uleb()?;
    }
    let cs_enc = c.u8()?;
    let cs_len = c.uleb()? as usize;
    let Some(cs_end) = c.pos.checked_add(cs_len).filter(|&e| e <= data.len()) else {
        return err("call-site table runs past its section", c.at());
    };
    let mut pads = Vec::new();
    while c.pos < cs_end {
        let _start = c.pointer(cs_enc, Some(func))?;
        let _len = c.pointer(cs_enc & 0x0f, None)?;
        let pad = c.pointer(cs_enc & 0x0f, None)?;
        c.uleb()?;
        if pad != 0 {
            pads.push(lp_start.wrapping_add(pad));
        }
    }
    if c.pos != cs_end {
        return err("call-site table ends inside a record", c.at());
    }
    Ok(pads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, ObjectSection};

    #[test]
    fn lsda_call_sites() {
        // lpstart omitted (= the function), no type table, uleb128 call sites:
        // [0x10,+5) -> pad 0x30, [0x20,+4) -> no pad, [0x28,+2) -> pad 0x40.
        let lsda = [
            0xff, 0xff, 0x01, 12, 0x10, 0x05, 0x30, 0x00, 0x20, 0x04, 0x00, 0x00, 0x28, 0x02, 0x40,
            0x01,
        ];
        assert_eq!(
            landing_pads(&lsda, 0x9000, 0x9000, 0x1000).unwrap(),
            [0x1030, 0x1040]
        );
        // udata4 call sites, type table present, at an offset in its section.
        let mut sec = vec![0u8; 4];
        sec.extend([0xff, 0x9b, 0x05, 0x03, 13]);
        for v in [0x10u32, 5, 0x30] {
            sec.extend(v.to_le_bytes());
        }
        sec.push(0);
        assert_eq!(
            landing_pads(&sec, 0x9000, 0x9004, 0x2000).unwrap(),
            [0x2030]
        );
        // A call-site table that runs past its section.
        let e = landing_pads(&lsda[..10], 0x9000, 0x9000, 0x1000).unwrap_err();
        assert_eq!(e.what, "call-site table runs past its section");
    }

    /// FDE ranges as `readelf --debug-dump=frames` prints them (`pc=START..END`).
    fn readelf_fdes(path: &str) -> Vec<(u64, u64)> {
        let out = std::process::Command::new("readelf")
            .args(["--debug-dump=frames", path])
            .output()
            .expect("readelf");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut v: Vec<(u64, u64)> = text
            .lines()
            .filter(|l| l.contains(" FDE "))
            .filter_map(|l| {
                let pc = l.split("pc=").nth(1)?;
                let (a, b) = pc.split_once("..")?;
                let a = u64::from_str_radix(a.trim(), 16).ok()?;
                let b = u64::from_str_radix(b.trim(), 16).ok()?;
                Some((a, b - a))
            })
            .filter(|&(_, len)| len != 0)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn fdes_match_readelf_and_landing_pads_fall_in_their_functions() {
        for path in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        ] {
            let data = std::fs::read(path).unwrap();
            let file = object::File::parse(&*data).unwrap();
            let eh = file.section_by_name(".eh_frame").unwrap();
            let mut got = fdes(eh.data().unwrap(), eh.address()).unwrap();
            got.sort_by_key(|f| f.start);
            let ranges: Vec<(u64, u64)> = got.iter().map(|f| (f.start, f.len)).collect();
            assert_eq!(ranges, readelf_fdes(path), "{path}");
            let table = file.section_by_name(".gcc_except_table");
            let mut pads = 0;
            for f in got.iter().filter(|f| f.lsda.is_some()) {
                let t = table.as_ref().expect("LSDAs live in .gcc_except_table");
                let lsda = f.lsda.unwrap();
                for p in landing_pads(t.data().unwrap(), t.address(), lsda, f.start).unwrap() {
                    pads += 1;
                    // A landing pad is code of some FDE (the function, or its cold part).
                    assert!(
                        got.iter().any(|g| p >= g.start && p < g.start + g.len),
                        "{path}: pad {p:#x} of the FDE at {:#x}",
                        f.start
                    );
                }
            }
            if path.contains("stdc++") {
                assert!(pads > 1000, "{pads}");
            }
            // Most FDEs start like a function entry.
            let entries = got.iter().filter(|f| f.entry_like).count();
            assert!(entries * 10 > got.len() * 8, "{entries} of {}", got.len());
        }
    }
}
