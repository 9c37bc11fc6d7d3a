//! `dlopen` and `dlmopen`, interposed: after libc's returns a handle and the set of
//! loaded objects grew, the calling thread asks the agent thread to discover the new
//! objects now and waits (at most `control::loads::WAIT`) until the tracers meant for
//! this process cover them (`FunctionsAdded{sequence}` → the server's installs →
//! `Covered{sequence}`). So calls made right after `dlopen` returns are traced.
//!
//! **The caller is preserved.** glibc's `dlopen` takes its return address as the
//! caller: it decides the namespace (`dlopen` loads into the caller's) and whose
//! `DT_RUNPATH`/`DT_RPATH`/`$ORIGIN` a bare name is searched in. A wrapper that called
//! libc's `dlopen` would make the agent the caller (a program loading plugins by bare
//! name through its `RUNPATH` would fail). So `dlopen`/`dlmopen` are naked thunks: at
//! entry `[rsp]` is the program's return address `R`; the thunk leaves it there,
//! pushes its continuation `C` and then `G`, the address of a `ret` byte inside the
//! object containing `R` (`sys::dl::ret_gadget`), and jumps to libc's function with the
//! arguments untouched (the stack is aligned as at entry). libc sees `G`, in the
//! caller's object, as its caller and returns there; the `ret` at `G` pops `C`, where
//! `[rsp]` is `R` again: the post-hook runs and the thunk returns to `R`. Re-entrant:
//! nothing is kept per call but on the stack. With a user shadow stack enabled (CET),
//! a return to `G` would fault: the thunk then calls libc's function plainly (the agent
//! is the caller; documented).
//!
//! No wait when no session is open, from the agent's own threads, inside a dispatch
//! (a callback calling `dlopen`), or for a nested `dlopen` (a constructor of the
//! loaded object calling it, or a destructor run by `dlclose`: the loader lock or
//! the patcher's unmap lock is held then). The periodic poll of the load counters
//! stays the fallback.
//!
//! `dlclose` is interposed too (a plain wrapper: libc's does not look at its caller):
//! libc's runs with the patcher held off, and the objects it unmapped are recorded so
//! that their sites are never written again (`control::unmapped`); the agent thread
//! is woken to forget them and tell the server.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};

use crate::control::{link, loads, sites, threads, unmapped};
use crate::hot::block;
use crate::sys;

thread_local! {
    /// Depth of interposed `dlopen`/`dlmopen`/`dlclose` calls on this thread (a
    /// constructor or destructor run by the loader may call `dlopen` again).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The loader's counters before the outermost `dlopen` of this thread.
    static BEFORE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// What the thunk needs from [`enter`]: the `ret` to pass as the caller (0: call libc
/// plainly) and libc's function.
#[repr(C)]
struct Enter {
    gadget: usize,
    real: usize,
}

/// Pre-hook of the thunks (`ret`: the program's return address `R`): the gadget for
/// `R` and libc's function, the depth raised. With no gadget (or a shadow stack) the
/// depth is left alone and the thunk goes to the plain path, which does the rest.
fn enter(ret: usize, real: usize) -> Enter {
    if real == 0 || sys::dl::shadow_stack_enabled() {
        return Enter { gadget: 0, real };
    }
    let gadget = sys::dl::ret_gadget(ret);
    if gadget == 0 {
        return Enter { gadget: 0, real };
    }
    opened();
    Enter { gadget, real }
}

/// Raises this thread's depth; the outermost call remembers the loader's counters.
fn opened() {
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    // Only the outermost call looks: `dl_iterate_phdr` takes the loader's lock, which a
    // nested call's thread holds (a recursive lock: it would not block, but a nested
    // call does not wait anyway).
    if depth == 0 {
        BEFORE.with(|b| b.set(sites::load_generation()));
    }
}

/// Post-hook (`handle`: what libc returned): lowers the depth; for the outermost call
/// that loaded something, waits for the tracers to cover it. Changes neither errno nor
/// the `dlerror` state (no `dl*` call but `dl_iterate_phdr`).
fn leave(handle: *mut c_void) {
    let depth = DEPTH.with(|d| {
        let v = d.get().saturating_sub(1);
        d.set(v);
        v
    });
    if depth > 0 || handle.is_null() || !link::connected() {
        return;
    }
    if threads::is_agent_thread(sys::tid()) || block::NEST.with(|n| n.get()) > 0 {
        return;
    }
    // Objects were added (a handle to an object already loaded adds none).
    if sites::load_generation().0 == BEFORE.with(Cell::get).0 {
        return;
    }
    let errno = sys::errno();
    loads::wait_covered();
    sys::set_errno(errno);
}

extern "C" fn enter_dlopen(ret: usize) -> Enter {
    enter(ret, sys::dl::real_dlopen())
}

extern "C" fn enter_dlmopen(ret: usize) -> Enter {
    enter(ret, sys::dl::real_dlmopen())
}

extern "C" fn leave_open(handle: *mut c_void) {
    leave(handle)
}

type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
type DlmopenFn = unsafe extern "C" fn(libc::Lmid_t, *const c_char, c_int) -> *mut c_void;

/// The plain path of the `dlopen` thunk (no gadget, or a shadow stack): libc's
/// `dlopen` called from here, so the agent is the caller.
unsafe extern "C" fn plain_dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    let real = sys::dl::real_dlopen();
    if real == 0 {
        return std::ptr::null_mut();
    }
    opened();
    // SAFETY: `real` is libc's dlopen, which has this signature; forwarded as given.
    let handle = unsafe { std::mem::transmute::<usize, DlopenFn>(real)(file, mode) };
    leave(handle);
    handle
}

/// The plain path of the `dlmopen` thunk.
unsafe extern "C" fn plain_dlmopen(
    lmid: libc::Lmid_t,
    file: *const c_char,
    mode: c_int,
) -> *mut c_void {
    let real = sys::dl::real_dlmopen();
    if real == 0 {
        return std::ptr::null_mut();
    }
    opened();
    // SAFETY: `real` is libc's dlmopen, which has this signature; forwarded as given.
    let handle = unsafe { std::mem::transmute::<usize, DlmopenFn>(real)(lmid, file, mode) };
    leave(handle);
    handle
}

/// The caller-preserving thunk (see the module docs). At entry `rsp ≡ 8 (mod 16)`,
/// `[rsp]` = R; `rdi`, `rsi`, `rdx` hold the arguments (`dlmopen` has three).
macro_rules! thunk {
    () => {
        concat!(
            "endbr64\n",
            // Keep the arguments; rsp ≡ 0 (mod 16) for the call.
            "push rdi\n",
            "push rsi\n",
            "push rdx\n",
            "mov rdi, [rsp + 24]\n",
            "call {enter}\n",
            // rax = G (0: plain path), rdx = libc's function.
            "mov r11, rdx\n",
            "pop rdx\n",
            "pop rsi\n",
            "pop rdi\n",
            "test rax, rax\n",
            "jz {plain}\n",
            "lea r10, [rip + 2f]\n",
            "push r10\n",
            "push rax\n",
            // [rsp] = G, [rsp+8] = C, [rsp+16] = R; rsp ≡ 8 (mod 16) as at entry.
            "jmp r11\n",
            "2:\n",
            // Returned through G's `ret`: [rsp] = R, rax = the handle.
            "push rax\n",
            "mov rdi, rax\n",
            "call {leave}\n",
            "pop rax\n",
            "ret\n",
        )
    };
}

/// As `dlopen(3)`, with the program's caller preserved.
// SAFETY: exporting `dlopen` replaces libc's for the whole process: same signature and
// contract (the handle, `dlerror` and errno as libc's left them, the caller's object
// seen by libc), reaching libc's own through `dlsym(RTLD_NEXT)`, never itself. The
// thunk keeps the stack aligned and the argument registers as they came, and uses only
// call-clobbered registers that carry no argument (r10, r11).
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(file: *const c_char, mode: c_int) -> *mut c_void {
    core::arch::naked_asm!(
        thunk!(),
        enter = sym enter_dlopen,
        plain = sym plain_dlopen,
        leave = sym leave_open,
    )
}

/// As `dlmopen(3)`, with the program's caller preserved.
// SAFETY: as `dlopen` above, for `dlmopen`.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlmopen(
    lmid: libc::Lmid_t,
    file: *const c_char,
    mode: c_int,
) -> *mut c_void {
    core::arch::naked_asm!(
        thunk!(),
        enter = sym enter_dlmopen,
        plain = sym plain_dlmopen,
        leave = sym leave_open,
    )
}

/// As `dlclose(3)`.
// SAFETY: exporting `dlclose` replaces libc's for the whole process: same signature and
// contract (the result, `dlerror` and errno as libc's left them), reaching libc's own
// through `dlsym(RTLD_NEXT)` (resolved at start), never itself.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    // A `dlopen` from a destructor run by this call is nested: it must not wait for the
    // agent thread, whose patcher this call holds off.
    DEPTH.with(|d| d.set(d.get() + 1));
    let before = sites::load_generation();
    // SAFETY: forwarded as given.
    let r = unmapped::closing(|| unsafe { sys::dl::real_dlclose(handle) });
    DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    if sites::load_generation().1 != before.1 {
        let errno = sys::errno();
        // The agent thread forgets the unmapped objects' sites and tells the server.
        loads::WAKE.notify_one();
        sys::set_errno(errno);
    }
    r
}
