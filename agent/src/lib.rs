//! The in-process agent of patchbay.
//!
//! Loaded with `LD_PRELOAD=libpatchbay_agent.so` (it starts itself), or linked into a
//! Rust program as a library: call [`start`], mark quiescent points with
//! [`quiescent`], register callbacks with [`register_callback`]. See ARCHITECTURE.md.
//!
//! The folders say where code runs:
//! - `sys/`: thin OS wrappers (gettid, errno, libc's `sigaction`, `/proc` parsers), a
//!   leaf;
//! - `hot/`: code that runs on program threads, in trampolines and in signal handlers
//!   (async-signal-safe: no allocation, no locks, no panics); imports only `hot/` and
//!   `sys/`;
//! - `tramp/`: the pure trampoline code generator;
//! - `interpose/`: libc functions interposed that run on program threads outside
//!   signal handlers (`dlopen`): they may lock and wait (bounded) for the agent thread;
//! - `control/`: the agent's own thread (may allocate, lock and do I/O).

mod control;
mod hot;
mod interpose;
mod sys;
mod tramp;

pub use control::init::{StartError, start};
/// Site discovery (public for tests and tools: `agent/tests/sites.rs`, `dlopen.rs`).
pub use control::sites;
pub use hot::dispatch::{CallCtx, Callback};
/// Counters of trampoline memory (public for tests and tools: the torture target
/// reports them).
pub use hot::stats;

/// Public for tests and tools: the torture target reports how often a program signal
/// handler interrupted trampoline code or a dispatch.
pub mod sigwrap {
    pub use crate::hot::sigwrap::INSIDE_RUNS;
}

/// Marks a quiescent point of the calling thread: it is outside every traced function
/// and callback (QSBR style; the cheapest way to end grace periods).
pub fn quiescent() {
    hot::qs::quiescent()
}

/// Registers a callback tools can attach by `name` (`patchbay attach --custom NAME`).
pub fn register_callback(name: &str, f: Callback) {
    control::callbacks::register(name, f)
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
    let gate = unsafe { control::hold::Gate::take_from_env() };
    if std::env::var_os("PATCHBAY_DISABLE").is_some() {
        if let Some(g) = gate {
            g.close();
        }
        return;
    }
    let follow =
        control::hold::follow_bound(std::env::var(control::hold::FOLLOW_VAR).ok().as_deref());
    match control::init::start_as(patchbay_proto::Arrival::Preloaded, None) {
        // `patchbay run`: wait before `main` until its tracers are attached.
        Ok(()) => {
            if follow.is_some() {
                control::hold::FOLLOWING.store(true, std::sync::atomic::Ordering::Release);
            }
            if let Some(g) = gate {
                g.wait();
            } else if let Some(bound) = follow {
                // A descendant in a followed tree: held until its tracers are live.
                control::hold::follow_wait(bound);
            }
        }
        Err(e) => {
            if let Some(g) = gate {
                g.close();
            }
            control::log::warn(&format!("agent not started: {e}"));
        }
    }
}

// SAFETY: an `.init_array` entry is a plain `extern "C" fn()` the loader calls once,
// before `main`; `preload_constructor` takes no arguments and does not unwind.
#[used]
#[unsafe(link_section = ".init_array")]
static PRELOAD_CONSTRUCTOR: extern "C" fn() = preload_constructor;
