//! Harness for multi-process tests of patchbay: it finds the workspace binaries, runs a
//! real `patchbayd` on a private socket, drives scripted agents (`script-agent`), real
//! traced programs with the agent preloaded (`fixtures`, `target`) and the `patchbay`
//! CLI, and waits on conditions with deadlines (never a bare sleep).

pub mod agent;
pub mod bins;
pub mod fixtures;
pub mod ops;
pub mod run;
pub mod server;
pub mod target;
pub mod uds;
pub mod wait;

pub use agent::ScriptAgent;
pub use server::{Control, TestServer};
pub use target::{Target, wait_agent};
pub use uds::{control_client, uds_channel};
pub use wait::{wait_for, wait_for_sync, wait_until, wait_until_sync};

/// The generated wire types (`patchbay.v1`).
pub use patchbay_proto as proto;
