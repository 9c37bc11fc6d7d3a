//! libc's `dlopen` and `dlmopen`, bypassing the agent's interposition of
//! them (`interpose::dl`). Resolved once with `dlsym(RTLD_NEXT)`.

use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Resolves `name` after this object (libc's definition), caching it in `slot`.
fn next(slot: &AtomicUsize, name: &std::ffi::CStr) -> usize {
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

type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
type DlmopenFn = unsafe extern "C" fn(libc::Lmid_t, *const c_char, c_int) -> *mut c_void;

/// libc's `dlopen` (null with nothing resolvable: `dlerror` then says nothing useful,
/// but libc without `dlopen` cannot have loaded this agent).
///
/// # Safety
/// As `dlopen(3)`: `file` is null or a NUL-terminated string.
pub(crate) unsafe fn real_dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    match next(&DLOPEN, c"dlopen") {
        0 => std::ptr::null_mut(),
        // SAFETY: `f` is libc's dlopen, which has this signature; forwarded as given.
        f => unsafe { std::mem::transmute::<usize, DlopenFn>(f)(file, mode) },
    }
}

/// libc's `dlmopen`.
///
/// # Safety
/// As `dlmopen(3)`.
pub(crate) unsafe fn real_dlmopen(
    lmid: libc::Lmid_t,
    file: *const c_char,
    mode: c_int,
) -> *mut c_void {
    match next(&DLMOPEN, c"dlmopen") {
        0 => std::ptr::null_mut(),
        // SAFETY: `f` is libc's dlmopen, which has this signature; forwarded as given.
        f => unsafe { std::mem::transmute::<usize, DlmopenFn>(f)(lmid, file, mode) },
    }
}
