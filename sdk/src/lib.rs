//! Typed async client of `patchbayd`, the server of patchbay (a function tracer for
//! running Linux programs). Attach a tracer to the functions of a process, read its counts
//! or stream its events, detach it:
//!
//! ```no_run
//! use patchbay_sdk::{Client, Target, Tracer};
//!
//! # async fn demo(pid: u32) -> patchbay_sdk::Result<()> {
//! let client = Client::connect_default().await?;
//! let tracer = client.attach(Tracer::count(Target::pid(pid), "sqlite3*")).await?;
//! for row in tracer.counts().await?.counts {
//!     println!("{:>10} {}", row.count, row.function);
//! }
//! // Dropping the handle would leave the tracer in place: tracers persist by design.
//! tracer.detach().wait().await?;
//! # Ok(())
//! # }
//! ```
//!
//! - [`Client`] is the connection (Unix socket by default, TCP with a token); its listing
//!   calls return the wire messages of [`proto`].
//! - [`Tracer`] builds the spec of a tracer ([`Tracer::count`], [`Tracer::trace`],
//!   [`Tracer::custom`] on a [`Target`]) and is the handle of an attached one
//!   ([`Tracer::counts`], [`Tracer::events`], [`Tracer::detach`]); [`Client::tracer`]
//!   reopens one by its [`TracerId`].
//! - Requests with options ([`Attach`], [`Detach`], [`Synchronize`], [`Functions`],
//!   [`Trampolines`]) are builders that do nothing until awaited.
//! - Every error is an [`Error`] whose variant says what class of failure it is and whose
//!   message says what to do next.
//!
//! `examples/live_counts.rs` attaches a counting tracer, prints its counts live and
//! detaches. Messages are the generated `patchbay-proto` types, re-exported as [`proto`];
//! this crate defines no wire structs of its own.

#![deny(missing_docs)]

mod client;
mod error;
pub mod inject;
pub mod names;
mod spec;
mod target;
pub mod timeline;
mod tracer;

pub use client::{
    Attach, Client, ClientBuilder, Functions, MAX_DECODING_MESSAGE_SIZE, Synchronize, Trampolines,
};
pub use error::{Detail, Error, Result};
pub use patchbay_proto as proto;
pub use spec::{Target, TracerSpec};
pub use target::{SOCKET_ENV, ServerTarget, connect_socket_path, current_uid, default_socket_path};
pub use tracer::{Detach, EventStream, Tracer, TracerId};
