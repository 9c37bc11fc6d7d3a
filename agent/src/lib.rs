//! The in-process agent of patchbay.
//!
//! Loaded with `LD_PRELOAD=libpatchbay_agent.so` (it starts itself), or linked into a
//! Rust program as a library: call [`start`], mark quiescent points with
//! [`quiescent`], register callbacks with [`register_callback`]. See ARCHITECTURE.md.

pub mod arena;
pub mod block;
pub mod callbacks;
pub mod coalesce;
pub mod counters;
pub mod demangle;
pub mod dispatch;
pub mod hold;
pub mod init;
pub mod link;
mod log;
pub mod patch;
pub mod procfs;
pub mod qs;
pub mod ring;
pub mod runtime;
pub mod sigwrap;
pub mod sites;
pub mod stats;
pub mod threads;
pub mod tramp;
pub mod trap;

pub use dispatch::{CallCtx, Callback};
pub use init::{StartError, start};

/// Marks a quiescent point of the calling thread: it is outside every traced function
/// and callback (QSBR style; the cheapest way to end grace periods).
pub fn quiescent() {
    qs::quiescent()
}

/// Registers a callback tools can attach by `name` (`patchbay attach --custom NAME`).
pub fn register_callback(name: &str, f: Callback) {
    callbacks::register(name, f)
}

/// Starts the agent when this library was preloaded (`LD_PRELOAD`): the constructor
/// of `libpatchbay_agent.so`. In a program that links the crate it does nothing; the
/// program calls [`start`].
extern "C" fn preload_constructor() {
    let preloaded = std::env::var("LD_PRELOAD").is_ok_and(|p| p.contains("libpatchbay_agent"));
    if !preloaded {
        return;
    }
    // SAFETY: the constructor runs before `main` and before the agent's threads start;
    // nothing else touches the environment meanwhile.
    let gate = unsafe { hold::Gate::take_from_env() };
    if std::env::var_os("PATCHBAY_DISABLE").is_some() {
        if let Some(g) = gate {
            g.close();
        }
        return;
    }
    match start() {
        // `patchbay run`: wait before `main` until its tracers are attached.
        Ok(()) => {
            if let Some(g) = gate {
                g.wait();
            }
        }
        Err(e) => {
            if let Some(g) = gate {
                g.close();
            }
            log::warn(&format!("agent not started: {e}"));
        }
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static PRELOAD_CONSTRUCTOR: extern "C" fn() = preload_constructor;
