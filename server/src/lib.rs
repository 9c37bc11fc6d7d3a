//! patchbayd: the registry of agents, threads, tracers and trampolines, the
//! grace-period engine, and the tonic services over them.
//!
//! - [`grace`] and [`registry`] are the pure core (no I/O, unit- and property-tested);
//! - [`engine`] wraps the registry for concurrent use and carries out its effects;
//! - [`service`] holds the tonic services (thin shells);
//! - [`listen`] owns sockets, peer credentials and the default socket path;
//! - [`timeline`] keeps the newest grace periods' timelines (pure, diagnostic);
//! - [`store`] keeps the active tracers under the state directory across restarts;
//! - [`config`] merges flags, environment and configuration file (pure);
//! - [`systemd`] speaks socket activation, readiness notification and journal detection.

pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod grace;
pub mod listen;
pub mod registry;
pub mod service;
pub mod store;
pub mod systemd;
pub mod timeline;
