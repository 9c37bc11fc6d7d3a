//! Code that runs on program threads: inside traced calls (the entry stub and the
//! dispatcher, the ring producer, per-thread blocks), in trampolines' data, and in
//! signal handlers (the SIGTRAP handler of the int3 protocol, the quiescent-state
//! handler, the wrapper of the program's own handlers).
//!
//! The rule of this folder: everything a program thread may execute here is
//! async-signal-safe — no allocation, no locks, no panics, and no system calls but the
//! few named where they are made (a one-time `gettid`, `tgkill`/`sigaction`/`write` on
//! the fatal premature-free path, `sigprocmask` in the signal wrapper, `write` to the
//! agent's `eventfd` in `qswake`). It imports only
//! `hot/` and `sys/`. The few functions here that the agent thread calls to set things
//! up or publish state (mapping blocks, installing handlers, appending to the lock-free
//! tables) say so in their documentation ("agent thread only").

pub(crate) mod block;
pub(crate) mod dispatch;
pub(crate) mod exit;
pub(crate) mod qs;
pub(crate) mod qswake;
pub(crate) mod ranges;
pub(crate) mod ring;
pub(crate) mod sigmask;
pub(crate) mod sigwrap;
pub mod stats;
pub(crate) mod trap;
