//! The loader's functions the agent interposes (`interpose::dl`), reached bypassing the
//! interposition (`dlsym(RTLD_NEXT)`, resolved once), and what the caller-preserving
//! `dlopen` thunk needs: a `ret` instruction inside the caller's object
//! ([`ret_gadget`]) and whether user shadow stacks are on ([`shadow_stack_enabled`]).

use std::ffi::{CStr, c_int, c_void};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Resolves `name` after this object (libc's definition), caching it in `slot`.
pub(crate) fn next(slot: &AtomicUsize, name: &CStr) -> usize {
    let mut f = slot.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with a valid NUL-terminated name; RTLD_NEXT finds the next
        // definition after this object (libc's), never the agent's own.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
        slot.store(f, Ordering::Release);
    }
    f
}

static DLOPEN: AtomicUsize = AtomicUsize::new(0);
static DLMOPEN: AtomicUsize = AtomicUsize::new(0);
static DLCLOSE: AtomicUsize = AtomicUsize::new(0);

/// Resolves libc's `dlopen`, `dlmopen` and `dlclose` now (at agent start), so that the
/// interposed calls never call `dlsym` themselves: a `dlsym` clears the error a
/// program's failed `dlopen` left for its `dlerror()`.
pub(crate) fn resolve() {
    next(&DLOPEN, c"dlopen");
    next(&DLMOPEN, c"dlmopen");
    next(&DLCLOSE, c"dlclose");
}

/// The address of libc's `dlopen` (0: not resolvable; libc without `dlopen` cannot
/// have loaded this agent).
pub(crate) fn real_dlopen() -> usize {
    next(&DLOPEN, c"dlopen")
}

/// The address of libc's `dlmopen` (0: not resolvable).
pub(crate) fn real_dlmopen() -> usize {
    next(&DLMOPEN, c"dlmopen")
}

type DlcloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;

/// libc's `dlclose` (-1 when it cannot be resolved, as for a bad handle).
///
/// # Safety
/// As `dlclose(3)`: `handle` came from `dlopen`/`dlmopen` and is closed once.
pub(crate) unsafe fn real_dlclose(handle: *mut c_void) -> c_int {
    match next(&DLCLOSE, c"dlclose") {
        0 => -1,
        // SAFETY: `f` is libc's dlclose, which has this signature; forwarded as given.
        f => unsafe { std::mem::transmute::<usize, DlcloseFn>(f)(handle) },
    }
}

/// The address span of one loaded object: its load bias and the lowest and highest
/// addresses of its `PT_LOAD` segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub bias: u64,
    pub start: u64,
    pub end: u64,
}

/// The span of every loaded object, in the loader's order (allocates: not for signal
/// handlers).
pub(crate) fn spans() -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    // SAFETY: `spans_callback` matches the signature dl_iterate_phdr expects, and `data`
    // points to `out`, used only by the callback during the call, on this thread.
    unsafe {
        libc::dl_iterate_phdr(Some(spans_callback), (&raw mut out).cast::<c_void>());
    }
    out
}

unsafe extern "C" fn spans_callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the `&mut Vec<Span>` of `spans`; the loader passes a valid
    // `dl_phdr_info` whose `dlpi_phdr` array has `dlpi_phnum` entries.
    unsafe {
        let out = &mut *data.cast::<Vec<Span>>();
        let info = &*info;
        let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
        let bias = info.dlpi_addr;
        let loads = phdrs.iter().filter(|p| p.p_type == PT_LOAD);
        let start = loads.clone().map(|p| p.p_vaddr).min();
        let end = loads.map(|p| p.p_vaddr + p.p_memsz).max();
        if let (Some(start), Some(end)) = (start, end) {
            out.push(Span {
                bias,
                start: bias.wrapping_add(start),
                end: bias.wrapping_add(end),
            });
        }
    }
    0
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;

struct GadgetSearch {
    pc: usize,
    /// A `ret` in the object containing `pc`.
    found: usize,
    /// A `ret` in the main executable (the first object), the fallback.
    main: usize,
    first: bool,
}

/// The address of a `0xC3` byte in an executable `PT_LOAD` of the object that contains
/// `pc`, or of the main executable when `pc` is in no object (0 if neither has one).
/// glibc takes `dlopen`'s return address as the caller: it decides the namespace and
/// whose `DT_RUNPATH`/`DT_RPATH`/`$ORIGIN` a bare name is searched in; a return
/// address there makes the loader see the program's object as the caller. Walks the
/// loader's list (its lock, briefly); no allocation.
pub(crate) fn ret_gadget(pc: usize) -> usize {
    let mut s = GadgetSearch {
        pc,
        found: 0,
        main: 0,
        first: true,
    };
    // SAFETY: `gadget_callback` matches the signature dl_iterate_phdr expects, and
    // `data` points to `s`, used only by the callback during the call, on this thread.
    unsafe {
        libc::dl_iterate_phdr(Some(gadget_callback), (&raw mut s).cast::<c_void>());
    }
    if s.found != 0 { s.found } else { s.main }
}

unsafe extern "C" fn gadget_callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the `&mut GadgetSearch` of `ret_gadget`; the loader passes a
    // valid `dl_phdr_info` whose `dlpi_phdr` array has `dlpi_phnum` entries, and the
    // object's segments are mapped while the callback runs (the loader's lock).
    unsafe {
        let s = &mut *data.cast::<GadgetSearch>();
        let info = &*info;
        let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
        let base = info.dlpi_addr as usize;
        let first = std::mem::replace(&mut s.first, false);
        let contains = phdrs.iter().any(|p| {
            p.p_type == PT_LOAD
                && s.pc.wrapping_sub(base.wrapping_add(p.p_vaddr as usize)) < p.p_memsz as usize
        });
        if !contains && !first {
            return 0;
        }
        let mut gadget = 0;
        for p in phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0)
        {
            let start = base.wrapping_add(p.p_vaddr as usize);
            let bytes = std::slice::from_raw_parts(start as *const u8, p.p_filesz as usize);
            if let Some(i) = bytes.iter().position(|&b| b == 0xc3) {
                gadget = start + i;
                break;
            }
        }
        if first {
            s.main = gadget;
        }
        if contains {
            s.found = gadget;
            return 1;
        }
        0
    }
}

const ARCH_SHSTK_STATUS: libc::c_int = 0x5005;
const ARCH_SHSTK_SHSTK: u64 = 1;

/// 0: not asked yet; 1: off; 2: on.
static SHSTK: AtomicU8 = AtomicU8::new(0);

/// Whether the kernel reports a user shadow stack enabled for this thread
/// (`arch_prctl(ARCH_SHSTK_STATUS)`; asked once: glibc enables it for the whole process
/// at start or never). With one, a `ret` to an address the matching `call` did not
/// push faults, so the caller-preserving `dlopen` thunk cannot be used.
pub(crate) fn shadow_stack_enabled() -> bool {
    match SHSTK.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let mut features: u64 = 0;
            // SAFETY: arch_prctl(ARCH_SHSTK_STATUS, &u64) writes the enabled features to
            // the u64; kernels without shadow stack support fail with EINVAL and write
            // nothing.
            let r = unsafe {
                libc::syscall(libc::SYS_arch_prctl, ARCH_SHSTK_STATUS, &raw mut features)
            };
            let on = r == 0 && features & ARCH_SHSTK_SHSTK != 0;
            SHSTK.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}
