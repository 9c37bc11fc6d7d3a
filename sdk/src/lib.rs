//! Typed async client of `patchbayd`'s Control service, used by the `patchbay` CLI and by
//! tools that drive patchbay programmatically.
//!
//! ```no_run
//! # async fn demo() -> patchbay_sdk::Result<()> {
//! use patchbay_sdk::{Client, TracerSpecBuilder, default_socket_path, spec};
//!
//! let client = Client::connect(&default_socket_path().to_string_lossy()).await?;
//! let spec = TracerSpecBuilder::new(spec::pid(4242), "sqlite3*").count().build();
//! let attached = client.attach(spec, None).await?;
//! let tracer = attached.tracer.map(|t| t.tracer_id).unwrap_or_default();
//! for row in client.counts(tracer).await?.counts {
//!     println!("{} {}", row.function, row.count);
//! }
//! client.detach(tracer, true, None).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Messages are the generated `patchbay-proto` types, re-exported as [`proto`]; this crate
//! defines no wire structs of its own.

pub mod client;
pub mod error;
pub mod names;
pub mod spec;
pub mod target;

pub use client::{Client, EventStream};
pub use error::{Error, Result};
pub use patchbay_proto as proto;
pub use spec::TracerSpecBuilder;
pub use target::{ServerTarget, current_uid, default_socket_path};
