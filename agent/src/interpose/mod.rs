//! Interpositions of libc functions that run on program threads *outside* signal
//! handlers and traced calls: unlike `hot/`, code here may allocate, lock and wait
//! (bounded), as the functions it wraps do; unlike `control/`, it runs on the
//! program's threads, never on the agent's. Imports `control/` (to hand work to the
//! agent thread) and `sys/`.
//!
//! - [`dl`]: `dlopen`/`dlmopen`, so that a newly loaded object is covered by the
//!   tracers meant for the process before `dlopen` returns.
//! - [`windows`]: the entry points of glibc's all-signals-blocked windows
//!   (`pthread_create`, thread exit, `posix_spawn`, `pthread_kill`, …), held off while
//!   the patcher has an `int3` out (`control::trapwindow`).
//! - [`inject`]: the entry the ptrace injector calls on a hijacked program thread
//!   (`patchbay_agent_injected`), which hands the start to a new thread.
//! - [`unwind`]: the unwinder's entry points, so that exceptions, panics and backtraces
//!   see real return addresses where calls are hooked for their exit.

pub(crate) mod dl;
pub(crate) mod inject;
pub(crate) mod unwind;
pub(crate) mod windows;
