//! The entry the injector calls (issue 13): `patchbay_agent_injected(socket)`, run by
//! `patchbay attach --pid` on a thread of a running program it stopped with ptrace,
//! right after making it `dlopen` this library (whose constructor does nothing then:
//! the program was not started with `LD_PRELOAD`).
//!
//! It runs on the program's hijacked thread, which the injector holds stopped for as
//! long as this call lasts, so it only copies the socket path and hands the start to a
//! new thread: the start itself (thread blocks, handlers, discovery, the link thread)
//! runs while the program runs on. It returns at once, without unwinding.

use std::ffi::{CStr, c_char};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::control::{init, log};

/// Agent already started in this process (preloaded, linked or injected before).
pub const ALREADY_STARTED: i32 = 1;
/// Started: the agent's start thread is on its way.
pub const STARTING: i32 = 0;
/// The start thread could not be created.
pub const NO_THREAD: i32 = -1;

/// Starts the agent of an injected library, connecting to `socket` (a NUL-terminated
/// path; null: the default socket). Returns [`STARTING`], [`ALREADY_STARTED`] or
/// [`NO_THREAD`].
///
/// # Safety
/// `socket` is null or points at a NUL-terminated string readable for this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn patchbay_agent_injected(socket: *const c_char) -> i32 {
    let socket = (!socket.is_null()).then(|| {
        // SAFETY: the caller's precondition.
        let bytes = unsafe { CStr::from_ptr(socket) }.to_bytes();
        PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
    });
    std::panic::catch_unwind(move || {
        if init::started() {
            return ALREADY_STARTED;
        }
        let spawned = std::thread::Builder::new()
            .name("patchbay-start".into())
            .spawn(move || {
                if let Err(e) = init::start_as(patchbay_proto::Arrival::Injected, socket) {
                    log::warn(&format!("injected agent not started: {e}"));
                }
            });
        match spawned {
            Ok(_) => STARTING,
            Err(_) => NO_THREAD,
        }
    })
    .unwrap_or(NO_THREAD)
}
