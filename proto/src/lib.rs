//! The wire contract of patchbay (package `patchbay.v1`), generated at build time from
//! `proto/patchbay/v1/*.proto`. This crate is the single source of truth for the wire:
//! nothing else defines message structs.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

tonic::include_proto!("patchbay.v1");

pub mod errors;
pub mod events;
pub mod latency;
pub mod socket;

/// Version of the Agent and Control protocols. An agent's `Hello.protocol_version` and a
/// client's `x-patchbay-protocol` metadata must equal it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Metadata key a client uses to announce its protocol version.
pub const PROTOCOL_METADATA_KEY: &str = "x-patchbay-protocol";

/// The encoded `FileDescriptorSet` of `patchbay.v1` (every file, with source info: the
/// comments), as compiled by `build.rs`. Served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/patchbay_v1.binpb"));
