//! Relocated prologues (issue 11): a function built without instrumentation gets its
//! first instructions (`len` bytes at the patch point, after an `endbr64`) replaced by
//! `jmp thunk` and `int3` padding; the thunk (in its trampoline, see `tramp`) calls the
//! site's stub, runs the relocated copy of those instructions and jumps back.
//!
//! Installing replaces several instructions, and a thread may be stopped between two
//! of them, so it takes a grace period local to the process (as
//! [`Patcher::convert_sleds`]); one per batch:
//!
//! 1. publish [`Transition::RelocIn`]`(thunk)` for every site: a trap at the patch
//!    point continues at the thunk (already live), and the quiescent-state handler
//!    moves a thread found strictly inside the replaced bytes, at an instruction
//!    boundary, to the same point of the thunk's copy ([`trap::reloc_exit`], from the
//!    map the thunk carries);
//! 2. write `0xCC` at every patch point, serialize: no thread enters the bytes again;
//! 3. `grace()`: every thread was seen outside them since (moved, or elsewhere);
//! 4. write the tails (rel32 and `int3` padding), serialize; the first bytes `e9`,
//!    serialize.
//!
//! A failed grace period puts the first bytes back and the sites are as before.
//!
//! Moving a site to another thunk (its callback group changed) rewrites only the
//! 5-byte `jmp`, one instruction: the int3 protocol without a grace period
//! ([`Transition::Jump`]: a trap continues at the new thunk). Restoring the original
//! bytes needs none either (no thread is ever inside a `jmp`): `int3` (a trap runs the
//! copy in the thunk the site jumped to, [`Transition::RelocOut`]; that trampoline is
//! freed only after a grace period, on the server's word), then bytes `1..len`, then
//! byte 0. The patcher does not keep the original bytes: the caller gives them (the
//! site's `bytes` from discovery, checked against memory before installing).

use std::collections::HashSet;

use super::{BatchReport, PatchError, Patcher, Stage, coalesce, sync_cores, write_step};
use crate::control::unmapped;
use crate::hot::trap::{self, Transition};
use crate::sys::procfs;

const INT3: u8 = 0xCC;
const JMP: u8 = 0xE9;

/// One relocated site of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelocOp<'a> {
    /// Make the site `jmp thunk` (installing over `original`, or moving the jump).
    Jump {
        site: usize,
        thunk: usize,
        original: &'a [u8],
    },
    /// Put `original` back; the site jumps to `thunk` now (whose copy a trap runs).
    Restore {
        site: usize,
        thunk: usize,
        original: &'a [u8],
    },
}

impl RelocOp<'_> {
    fn site(&self) -> usize {
        match *self {
            RelocOp::Jump { site, .. } | RelocOp::Restore { site, .. } => site,
        }
    }
}

/// The bytes of a site that jumps to `thunk` and replaces `len` bytes.
pub fn jump_bytes(site: usize, thunk: usize, len: usize) -> Result<Vec<u8>, PatchError> {
    let disp =
        i32::try_from(thunk as i64 - (site as i64 + 5)).map_err(|_| PatchError::OutOfReach {
            site,
            target: thunk,
        })?;
    let mut b = Vec::with_capacity(len);
    b.push(JMP);
    b.extend_from_slice(&disp.to_le_bytes());
    b.resize(len, INT3);
    Ok(b)
}

/// The target of a `jmp rel32` at `site` with bytes `b`, if it is one.
fn jump_target(site: usize, b: &[u8]) -> Option<usize> {
    match b {
        [JMP, d0, d1, d2, d3, ..] => {
            Some((site as i64 + 5 + i32::from_le_bytes([*d0, *d1, *d2, *d3]) as i64) as usize)
        }
        _ => None,
    }
}

/// Reads `len` bytes at `site`.
///
/// # Safety
/// `site..site+len` is mapped, readable code.
unsafe fn read_bytes(site: usize, len: usize) -> Vec<u8> {
    (0..len)
        // SAFETY: readable (caller).
        .map(|i| unsafe { std::ptr::read_volatile((site + i) as *const u8) })
        .collect()
}

struct Planned {
    site: usize,
    /// The final bytes.
    new: Vec<u8>,
    /// Replaces the original prologue (needs the grace period).
    install: bool,
    /// Byte 0 now (put back if the grace period fails).
    first: u8,
    transition: Transition,
}

impl Patcher {
    /// Applies a batch of relocated-site changes (see the module comment). Validated
    /// completely before anything is written: a site whose bytes are neither its
    /// original prologue nor a `jmp` (a `jmp` to the given thunk, for a restore) is
    /// [`PatchError::NotASite`] and nothing changes. `grace` runs only when the batch
    /// installs at least one site.
    pub fn relocate(
        &self,
        ops: &[RelocOp<'_>],
        grace: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<BatchReport, PatchError> {
        self.relocate_observed(ops, grace, &mut |_| {})
    }

    /// [`Patcher::relocate`], calling `observer` after each step (tests execute the
    /// sites in between).
    pub fn relocate_observed(
        &self,
        ops: &[RelocOp<'_>],
        grace: &mut dyn FnMut() -> Result<(), String>,
        observer: &mut dyn FnMut(Stage),
    ) -> Result<BatchReport, PatchError> {
        // Serializes with every other batch of the patcher.
        let _g = self.originals.lock().unwrap_or_else(|e| e.into_inner());
        // No object is unmapped (`dlclose`) during the batch (`control::unmapped`).
        let held = unmapped::hold();
        let mut report = BatchReport::default();
        let mut seen = HashSet::with_capacity(ops.len());
        let mut plan = Vec::with_capacity(ops.len());
        for op in ops {
            let site = op.site();
            if !seen.insert(site) {
                return Err(PatchError::Duplicate { site });
            }
            if held.gone(site) {
                // Its object was unmapped: never read nor written again.
                report.unchanged += 1;
                continue;
            }
            let (RelocOp::Jump { original, .. } | RelocOp::Restore { original, .. }) = *op;
            if original.len() < 5 || original.len() >= crate::tramp::MAX_REPLACED {
                return Err(PatchError::NotASite {
                    site,
                    bytes: first5(original),
                });
            }
            // SAFETY: sites come from site discovery (loaded text, `original.len()`
            // bytes of the function) or tests.
            let cur = unsafe { read_bytes(site, original.len()) };
            let bad = || PatchError::NotASite {
                site,
                bytes: first5(&cur),
            };
            let now_jumps = jump_target(site, &cur).filter(|_| cur[5..].iter().all(|&b| b == INT3));
            let p = match *op {
                RelocOp::Jump {
                    thunk, original, ..
                } => {
                    let new = jump_bytes(site, thunk, original.len())?;
                    if cur == new {
                        report.unchanged += 1;
                        continue;
                    }
                    let install = cur == original;
                    if !install && now_jumps.is_none() {
                        return Err(bad());
                    }
                    Planned {
                        site,
                        new,
                        install,
                        first: cur[0],
                        transition: if install {
                            Transition::RelocIn(thunk)
                        } else {
                            Transition::Jump(thunk)
                        },
                    }
                }
                RelocOp::Restore {
                    thunk, original, ..
                } => {
                    if cur == original {
                        report.unchanged += 1;
                        continue;
                    }
                    if now_jumps != Some(thunk) {
                        return Err(bad());
                    }
                    Planned {
                        site,
                        new: original.to_vec(),
                        install: false,
                        first: cur[0],
                        transition: Transition::RelocOut(thunk + crate::tramp::THUNK_CALL),
                    }
                }
            };
            plan.push(p);
        }
        if plan.is_empty() {
            return Ok(report);
        }
        let _window = super::open_trap_window()?;
        trap::ensure_installed()?;
        for p in &plan {
            trap::set_transition(p.site, p.transition);
        }
        let ro = procfs::read_maps()
            .map(|m| coalesce::readonly_mappings(&m))
            .unwrap_or_default();
        write_step(plan.iter().map(|p| (p.site, &[INT3][..])), &ro)?;
        sync_cores()?;
        observer(Stage::Int3Written);
        if plan.iter().any(|p| p.install)
            && let Err(reason) = grace()
        {
            // No thread entered the replaced bytes since the int3s (a thread found
            // inside was moved out, or the grace period failed for it; either way the
            // original instructions are still all there): each first byte goes back.
            write_step(
                plan.iter()
                    .map(|p| (p.site, std::slice::from_ref(&p.first))),
                &ro,
            )?;
            sync_cores()?;
            for p in &plan {
                trap::set_transition(p.site, Transition::Idle);
            }
            return Err(PatchError::GracePeriod {
                sites: plan.len(),
                reason,
            });
        }
        write_step(plan.iter().map(|p| (p.site + 1, &p.new[1..])), &ro)?;
        sync_cores()?;
        observer(Stage::TailWritten);
        write_step(plan.iter().map(|p| (p.site, &p.new[..1])), &ro)?;
        sync_cores()?;
        observer(Stage::FirstByteWritten);
        for p in &plan {
            trap::set_transition(p.site, Transition::Idle);
        }
        report.changed = plan.len();
        Ok(report)
    }
}

fn first5(b: &[u8]) -> [u8; 5] {
    let mut out = [0u8; 5];
    for (o, x) in out.iter_mut().zip(b) {
        *o = *x;
    }
    out
}
