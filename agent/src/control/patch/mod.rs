//! Cross-modifying the program's code: the int3 protocol, in batches.
//!
//! Code is written with `pwrite` on `/proc/self/mem`, which writes through page
//! protections (text pages are never made writable, nor ever non-executable); each
//! step writes coalesced spans of nearby sites ([`coalesce`]). For a
//! batch of single-instruction 5-byte sites:
//!
//! 1. publish each site's transition in the trap table ([`crate::hot::trap`]);
//! 2. write `0xCC` at every site, serialize all cores;
//! 3. write the 4 tail bytes, serialize;
//! 4. write the first byte (`0xE8` for `call rel32`, `0x0F` for the nop), serialize;
//! 5. mark the sites idle.
//!
//! "Serialize" is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`: every core
//! running a thread of this process executes a core-serializing instruction, and
//! threads not running do before they run again. A thread reaching a site between
//! steps 2 and 4 traps and the handler emulates what the site is becoming.
//!
//! Sites: a 5-byte nop (`0f 1f 44 00 xx`), or a `call rel32` (to `__fentry__`, or to a
//! trampoline). `Op::Call` installs or replaces a call; `Op::Nop` restores the nop the
//! site had when first patched (or the canonical `0f 1f 44 00 00` for a site that was
//! a call, e.g. `call __fentry__`). Five 1-byte nops (gcc's
//! `-fpatchable-function-entry=5`) get [`PatchError::Unsupported`] here: they are first
//! turned into one 5-byte nop by [`Patcher::convert_sleds`], the grace-period-guarded
//! multi-instruction protocol, after which they are ordinary sites.
//!
//! A batch is validated completely before anything is written: a bad site or target
//! changes nothing. If a write or a membarrier fails in the middle of a batch (not
//! seen in practice), the sites keep their published transition, so the trap handler
//! keeps emulating any `0xCC` left behind; the error says which address failed.
//!
//! Before writing, the patcher opens a trap window ([`open_trap_window`],
//! `control::trapwindow`): no thread is inside one of glibc's all-signals-blocked
//! windows until the batch is done; and it refuses (with [`PatchError::SigtrapBlocked`])
//! while a thread blocks SIGTRAP anyway: the kernel kills a process whose thread hits
//! an `int3` with SIGTRAP blocked. It also re-installs the trap handler if the program replaced it
//! (chaining to the replacement).
//!
//! Every batch holds `control::unmapped`'s lock (the interposed `dlclose` holds it
//! around libc's): no object is unmapped during a batch, and the sites of objects
//! unmapped since the agent thread last drained them are skipped unread (counted as
//! unchanged).
//!
//! Relocated prologues (several instructions replaced by a `jmp` to a thunk) have
//! their own batch, [`relocated`], with a grace period when installing.
//!
//! Cost: three membarriers per batch, and per step one `pwrite` per span (sites of one
//! object within 4 KiB of each other share a span) plus a `pread` of its current bytes.

pub(crate) mod coalesce;
#[cfg(test)]
mod exit_tests;
#[cfg(test)]
pub(crate) mod fixtures;
pub(crate) mod relocated;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

use crate::control::{trapwindow, unmapped};
use crate::hot::trap::{self, Transition};
use crate::sys::{self, procfs};

/// The canonical 5-byte nop.
pub const NOP5: [u8; 5] = [0x0F, 0x1F, 0x44, 0x00, 0x00];

/// What a site's bytes are now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteKind {
    /// `0f 1f 44 00 xx`.
    Nop5([u8; 5]),
    /// `e8 rel32`, with its absolute target.
    Call { target: usize },
    /// `90 90 90 90 90` (gcc): not patchable with this protocol.
    NopSled,
    /// Anything else.
    Other([u8; 5]),
}

/// Classifies 5 bytes found at `site`.
pub fn classify_bytes(site: usize, b: [u8; 5]) -> SiteKind {
    match b {
        [0x0F, 0x1F, 0x44, 0x00, _] => SiteKind::Nop5(b),
        [0xE8, d0, d1, d2, d3] => SiteKind::Call {
            target: (site as i64 + 5 + i32::from_le_bytes([d0, d1, d2, d3]) as i64) as usize,
        },
        [0x90, 0x90, 0x90, 0x90, 0x90] => SiteKind::NopSled,
        _ => SiteKind::Other(b),
    }
}

/// Reads the 5 bytes at `site`.
///
/// # Safety
/// `site..site+5` must be mapped and readable (a site in loaded text).
pub unsafe fn read_site(site: usize) -> [u8; 5] {
    let mut b = [0u8; 5];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: guaranteed readable by the caller.
        *x = unsafe { std::ptr::read_volatile((site + i) as *const u8) };
    }
    b
}

/// One change of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Make the site `call target`.
    Call { site: usize, target: usize },
    /// Make the site a 5-byte nop.
    Nop { site: usize },
    /// Turn a 6-byte `call *__fentry__@GOTPCREL(%rip)` (`ff 15 disp32`, PIC/PIE
    /// `-pg -mfentry`; the caller checked the GOT slot is `__fentry__`'s) into a 5-byte
    /// nop and a 1-byte nop. Afterwards the site is an ordinary 5-byte nop site.
    NopFentryGot { site: usize },
}

impl Op {
    pub fn site(&self) -> usize {
        match *self {
            Op::Call { site, .. } | Op::Nop { site } | Op::NopFentryGot { site } => site,
        }
    }
}

/// A point of the protocol, reported to [`Patcher::apply_observed`]'s observer after
/// the step and its core serialization.
// The names say what was written (the tests match on them).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Int3Written,
    TailWritten,
    FirstByteWritten,
}

/// Errors of patching. All but `Io` and `Membarrier` leave every site unchanged.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PatchError {
    #[error(
        "site {site:#x} is five 1-byte nops (gcc -fpatchable-function-entry): it must be \
         converted to a 5-byte nop first (Patcher::convert_sleds)"
    )]
    Unsupported { site: usize },
    #[error(
        "converting {sites} nop sled(s) needs a grace period, which did not complete: \
         {reason}; the sleds are unchanged"
    )]
    GracePeriod { sites: usize, reason: String },
    #[error("{site:#x} is not a patchable site: bytes {bytes:02x?}")]
    NotASite { site: usize, bytes: [u8; 5] },
    #[error("trampoline {target:#x} is out of rel32 reach of site {site:#x}")]
    OutOfReach { site: usize, target: usize },
    #[error("site {site:#x} appears twice in one batch")]
    Duplicate { site: usize },
    #[error(
        "thread {tid} blocks SIGTRAP: an int3 it hit would kill the process; \
         patching refused"
    )]
    SigtrapBlocked { tid: u32 },
    #[error(
        "{in_flight} call(s) of pthread_create/posix_spawn/system/popen/pthread_kill and \
         {exiting} exiting thread(s) stayed inside glibc's all-signals-blocked windows \
         for {waited_ms} ms: an int3 they hit would kill the process; patching deferred \
         (retry when they are done)"
    )]
    TrapWindowBusy {
        in_flight: u32,
        exiting: usize,
        waited_ms: u64,
    },
    #[error("membarrier: {what} failed with errno {errno} (needs Linux >= 4.16)")]
    Membarrier { what: &'static str, errno: i32 },
    #[error("writing code through /proc/self/mem failed with errno {errno} at {addr:#x}")]
    Io { addr: usize, errno: i32 },
    #[error("opening /proc/self/mem failed with errno {0}")]
    Open(i32),
    #[error(transparent)]
    Trap(#[from] trap::TrapError),
}

/// What a batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Sites rewritten.
    pub changed: usize,
    /// Sites already in the requested state.
    pub unchanged: usize,
}

/// `/proc/self/mem` of *this* process, with the pid it was opened in. A forked child
/// inherits the parent's descriptor, which still names the parent's memory: writing
/// through it would patch the parent. So the descriptor is reopened whenever the pid
/// changed.
static MEM: Mutex<Option<(u32, std::fs::File)>> = Mutex::new(None);

fn with_mem<R>(f: impl FnOnce(&std::fs::File) -> std::io::Result<R>) -> std::io::Result<R> {
    let mut g = MEM.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if g.as_ref().is_none_or(|(p, _)| *p != pid) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")?;
        *g = Some((pid, f));
        let before = OPENED_IN.swap(pid, std::sync::atomic::Ordering::AcqRel);
        if before != 0 {
            // A forked child: membarrier registration is per process, register it too.
            let _ = sys::membarrier(sys::MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE);
        }
    }
    f(&g.as_ref().expect("opened above").1)
}

/// The process `/proc/self/mem` was first opened in (0: never).
static OPENED_IN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Writes `bytes` at `addr` in this process through `/proc/self/mem` (works on
/// read-only and read-execute pages). Does not serialize other cores.
pub fn poke(addr: usize, bytes: &[u8]) -> std::io::Result<()> {
    with_mem(|m| m.write_all_at(bytes, addr as u64))
}

/// Reads `len` bytes at `addr` of this process through `/proc/self/mem` (an address
/// that is not mapped gives an error, never a fault).
pub fn peek(addr: usize, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    with_mem(|m| m.read_exact_at(&mut b, addr as u64))?;
    Ok(b)
}

const INT3: [u8; 1] = [0xCC];

/// Batches with at least this many sites write coalesced spans (see [`coalesce`]).
const COALESCE_FROM: usize = 4;

/// Writes one step of the protocol: `writes` (address, bytes), coalesced into spans
/// within the read-only mappings `ro` (empty: one write each). The bytes between the
/// writes of a span are re-read through `/proc/self/mem` just before (a mapping that
/// vanished meanwhile gives an error, never a fault in the agent).
fn write_step<'a>(
    writes: impl Iterator<Item = (usize, &'a [u8])>,
    ro: &[(usize, usize)],
) -> Result<(), PatchError> {
    let io = |addr: usize| {
        move |e: std::io::Error| PatchError::Io {
            addr,
            errno: e.raw_os_error().unwrap_or(0),
        }
    };
    let mut writes: Vec<coalesce::Write<'a>> = writes
        .map(|(addr, bytes)| coalesce::Write { addr, bytes })
        .collect();
    for span in coalesce::spans(&mut writes, ro) {
        if span.last - span.first == 1 {
            let w = writes[span.first];
            poke(w.addr, w.bytes).map_err(io(w.addr))?;
            continue;
        }
        let mut current = vec![0u8; span.end - span.start];
        with_mem(|m| m.read_exact_at(&mut current, span.start as u64)).map_err(io(span.start))?;
        let bytes = coalesce::span_bytes(&span, &writes, &current);
        poke(span.start, &bytes).map_err(io(span.start))?;
    }
    Ok(())
}

/// Serializes every core running a thread of this process.
pub fn sync_cores() -> Result<(), PatchError> {
    sys::membarrier(sys::MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE).map_err(|errno| {
        PatchError::Membarrier {
            what: "PRIVATE_EXPEDITED_SYNC_CORE",
            errno,
        }
    })
}

/// Threads of this process that block SIGTRAP (from `/proc/self/task/*/status`).
pub fn threads_blocking_sigtrap() -> Vec<u32> {
    procfs::thread_ids()
        .into_iter()
        .filter(|&t| procfs::blocks_signal(t, libc::SIGTRAP))
        .collect()
}

/// Fails if a thread blocks SIGTRAP for more than a moment. `pthread_create` blocks
/// every signal in a new thread until it has set the thread up (before any program
/// code runs there; on a busy machine it may wait a while to be scheduled), so a
/// blocker is re-checked for up to 250 ms before it counts.
pub(crate) fn check_no_thread_blocks_sigtrap() -> Result<(), PatchError> {
    let mut blockers = threads_blocking_sigtrap();
    let end = std::time::Instant::now() + std::time::Duration::from_millis(250);
    while let Some(&tid) = blockers.first() {
        if std::time::Instant::now() >= end {
            return Err(PatchError::SigtrapBlocked { tid });
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        blockers.retain(|&t| procfs::blocks_signal(t, libc::SIGTRAP));
    }
    Ok(())
}

/// Opens a trap window (`control::trapwindow`) for a batch about to write `int3`s, then
/// checks that no thread blocks SIGTRAP. The window closes when the guard drops (after
/// the batch's last step).
pub(crate) fn open_trap_window() -> Result<trapwindow::Window, PatchError> {
    let w = trapwindow::open(trapwindow::OPEN_WAIT).map_err(|b| PatchError::TrapWindowBusy {
        in_flight: b.in_flight,
        exiting: b.exiting,
        waited_ms: trapwindow::OPEN_WAIT.as_millis() as u64,
    })?;
    check_no_thread_blocks_sigtrap()?;
    Ok(w)
}

/// Whether a `/proc/.../status` text has SIGTRAP in its `SigBlk` mask.
#[cfg(test)]
pub fn status_blocks_sigtrap(status: &str) -> bool {
    procfs::status_has_signal(status, "SigBlk:", libc::SIGTRAP)
}

/// The process-wide patcher (one, because the trap table and handler are global).
pub struct Patcher {
    /// Original nop bytes of sites patched so far.
    pub(crate) originals: Mutex<HashMap<usize, [u8; 5]>>,
}

static GLOBAL: OnceLock<Result<Patcher, PatchError>> = OnceLock::new();

struct Planned {
    site: usize,
    /// New bytes: 5, or 6 for a former `ff 15` fentry call.
    new: Vec<u8>,
    transition: Transition,
}

impl Patcher {
    /// The patcher, initialized on first use: opens `/proc/self/mem`, registers for
    /// core-serializing membarriers and installs the SIGTRAP handler.
    pub fn global() -> Result<&'static Patcher, PatchError> {
        GLOBAL
            .get_or_init(|| {
                with_mem(|_| Ok(()))
                    .map_err(|e| PatchError::Open(e.raw_os_error().unwrap_or(0)))?;
                sys::membarrier(sys::MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE).map_err(
                    |errno| PatchError::Membarrier {
                        what: "REGISTER_PRIVATE_EXPEDITED_SYNC_CORE",
                        errno,
                    },
                )?;
                trap::ensure_installed()?;
                Ok(Patcher {
                    originals: Mutex::new(HashMap::new()),
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Forgets the original bytes of sites in `[start, end)` (an unmapped object's: a
    /// later object mapped there has its own).
    pub fn forget_range(&self, start: usize, end: usize) {
        let mut originals = self.originals.lock().unwrap_or_else(|e| e.into_inner());
        originals.retain(|&site, _| !(start <= site && site < end));
    }

    /// Applies a batch.
    pub fn apply(&self, ops: &[Op]) -> Result<BatchReport, PatchError> {
        self.apply_observed(ops, &mut |_| {})
    }

    /// Applies a batch, calling `observer` after each protocol step (tests use it to
    /// execute sites while they hold `0xCC`).
    pub fn apply_observed(
        &self,
        ops: &[Op],
        observer: &mut dyn FnMut(Stage),
    ) -> Result<BatchReport, PatchError> {
        let mut originals = self.originals.lock().unwrap_or_else(|e| e.into_inner());
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
            // SAFETY: sites come from site discovery (loaded text) or tests.
            let cur = unsafe { read_site(site) };
            if let Op::NopFentryGot { .. } = *op {
                // SAFETY: a discovered `ff 15` site: loaded text, and its instruction is 6
                // bytes long, so byte 5 is readable.
                let sixth = unsafe { std::ptr::read_volatile((site + 5) as *const u8) };
                let target = [0x0F, 0x1F, 0x44, 0x00, 0x00, 0x90];
                let now = [cur[0], cur[1], cur[2], cur[3], cur[4], sixth];
                if now == target {
                    report.unchanged += 1;
                    continue;
                }
                if cur[..2] != [0xFF, 0x15] {
                    return Err(PatchError::NotASite { site, bytes: cur });
                }
                plan.push((
                    Planned {
                        site,
                        new: target.to_vec(),
                        transition: Transition::ToNop6,
                    },
                    SiteKind::Other(cur),
                ));
                continue;
            }
            let kind = classify_bytes(site, cur);
            match kind {
                SiteKind::NopSled => return Err(PatchError::Unsupported { site }),
                SiteKind::Other(bytes) => return Err(PatchError::NotASite { site, bytes }),
                _ => {}
            }
            let (new, transition) = match *op {
                Op::Call { target, .. } => {
                    let disp = i32::try_from(target as i64 - (site as i64 + 5))
                        .map_err(|_| PatchError::OutOfReach { site, target })?;
                    let d = disp.to_le_bytes();
                    ([0xE8, d[0], d[1], d[2], d[3]], Transition::ToCall(target))
                }
                Op::Nop { .. } | Op::NopFentryGot { .. } => {
                    let nop = match (originals.get(&site), kind) {
                        (Some(o), _) => *o,
                        (None, SiteKind::Nop5(b)) => b,
                        _ => NOP5,
                    };
                    (nop, Transition::ToNop)
                }
            };
            if new == cur {
                report.unchanged += 1;
                continue;
            }
            plan.push((
                Planned {
                    site,
                    new: new.to_vec(),
                    transition,
                },
                kind,
            ));
        }
        if plan.is_empty() {
            return Ok(report);
        }
        let _window = open_trap_window()?;
        trap::ensure_installed()?;
        for (p, kind) in &plan {
            if let SiteKind::Nop5(b) = kind {
                originals.entry(p.site).or_insert(*b);
            }
            trap::set_transition(p.site, p.transition);
        }
        // The read-only mappings (see `coalesce`): taken once per batch, the patcher
        // being the only writer of read-only code.
        let ro = if plan.len() >= COALESCE_FROM {
            procfs::read_maps()
                .map(|m| coalesce::readonly_mappings(&m))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        write_step(plan.iter().map(|(p, _)| (p.site, &INT3[..])), &ro)?;
        sync_cores()?;
        observer(Stage::Int3Written);
        write_step(plan.iter().map(|(p, _)| (p.site + 1, &p.new[1..])), &ro)?;
        sync_cores()?;
        observer(Stage::TailWritten);
        write_step(plan.iter().map(|(p, _)| (p.site, &p.new[..1])), &ro)?;
        sync_cores()?;
        observer(Stage::FirstByteWritten);
        for (p, _) in &plan {
            trap::set_transition(p.site, Transition::Idle);
        }
        report.changed = plan.len();
        Ok(report)
    }
}

impl Patcher {
    /// Turns gcc nop sleds (five 1-byte nops) into the canonical 5-byte nop, after
    /// which each is an ordinary single-instruction site (and the nop a later unpatch
    /// restores). A thread may have executed some of a sled's nops and be stopped
    /// before the others, so the bytes it has yet to execute may not be replaced under
    /// it (the kernel's optprobes wait for RCU-Tasks for the same reason):
    ///
    /// 1. publish [`Transition::SledToNop`] for every sled (a trap at the first byte
    ///    skips the sled; the quiescent-state signal handler moves a thread found
    ///    inside a sled past it, see [`trap::sled_exit`]);
    /// 2. write `0xCC` at every first byte, serialize: no thread enters a sled again;
    /// 3. `grace()`: wait until every thread was seen outside since (the caller bumps
    ///    the epoch and waits for a quiescent state of every thread);
    /// 4. write the tails `1f 44 00 00`, serialize; write the first bytes `0f`,
    ///    serialize.
    ///
    /// If the grace period fails (a thread blocking the signal stays inside, say), the
    /// first bytes go back to `0x90` and the sleds are exactly as before:
    /// [`PatchError::GracePeriod`]. Sites already converted count as unchanged.
    pub fn convert_sleds(
        &self,
        sites: &[usize],
        grace: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<BatchReport, PatchError> {
        let mut originals = self.originals.lock().unwrap_or_else(|e| e.into_inner());
        let held = unmapped::hold();
        let mut report = BatchReport::default();
        let mut seen = HashSet::with_capacity(sites.len());
        let mut plan = Vec::with_capacity(sites.len());
        for &site in sites {
            if !seen.insert(site) {
                return Err(PatchError::Duplicate { site });
            }
            if held.gone(site) {
                report.unchanged += 1;
                continue;
            }
            // SAFETY: sites come from site discovery (loaded text) or tests.
            let cur = unsafe { read_site(site) };
            match classify_bytes(site, cur) {
                SiteKind::NopSled => plan.push(site),
                SiteKind::Nop5(_) => report.unchanged += 1,
                _ => return Err(PatchError::NotASite { site, bytes: cur }),
            }
        }
        if plan.is_empty() {
            return Ok(report);
        }
        let _window = open_trap_window()?;
        trap::ensure_installed()?;
        for &site in &plan {
            trap::set_transition(site, Transition::SledToNop);
        }
        let ro = procfs::read_maps()
            .map(|m| coalesce::readonly_mappings(&m))
            .unwrap_or_default();
        write_step(plan.iter().map(|&site| (site, &INT3[..])), &ro)?;
        sync_cores()?;
        if let Err(reason) = grace() {
            // No thread ran into a sled since the int3s: putting the first nops back
            // is a single-byte write each, and the sleds are as they were.
            write_step(plan.iter().map(|&site| (site, &[0x90u8][..])), &ro)?;
            sync_cores()?;
            for &site in &plan {
                trap::set_transition(site, Transition::Idle);
            }
            return Err(PatchError::GracePeriod {
                sites: plan.len(),
                reason,
            });
        }
        write_step(plan.iter().map(|&site| (site + 1, &NOP5[1..])), &ro)?;
        sync_cores()?;
        write_step(plan.iter().map(|&site| (site, &NOP5[..1])), &ro)?;
        sync_cores()?;
        for &site in &plan {
            trap::set_transition(site, Transition::Idle);
            originals.insert(site, NOP5);
        }
        report.changed = plan.len();
        Ok(report)
    }
}
