//! The machine-readable reasons of patchbay's errors.
//!
//! Every error status the server returns for a known cause carries a
//! `google.rpc.ErrorInfo` in its details (the `grpc-status-details-bin` trailer) with
//! [`DOMAIN`], one of the [`Reason`]s below, and metadata naming the object involved
//! (`pid`, `tracer_id`, `agent_id`, `pattern`). Reasons are part of the `patchbay.v1`
//! contract: they are never renamed or removed, and new ones may be added (a client
//! treats an unknown reason like a missing one and falls back on the status code).

use tonic::Code;

/// `ErrorInfo.domain` of every patchbay error.
pub const DOMAIN: &str = "patchbay.dev";

macro_rules! reasons {
    ($($(#[doc = $doc:literal])+ $variant:ident = $name:literal, $code:ident;)+) => {
        /// Why a call failed, as sent in `ErrorInfo.reason`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Reason {
            /// Every reason, in the order of the API reference.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)+];

            /// The `ErrorInfo.reason` string (UPPER_SNAKE_CASE).
            pub const fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $name,)+ }
            }

            /// The status code errors with this reason carry.
            pub const fn code(self) -> Code {
                match self { $(Reason::$variant => Code::$code,)+ }
            }

            /// What the reason means, for the API reference.
            pub fn description(self) -> &'static str {
                match self { $(Reason::$variant => concat!($($doc),+).trim(),)+ }
            }

            /// The reason named `s`, if this version knows it.
            pub fn parse(s: &str) -> Option<Reason> {
                Reason::ALL.iter().copied().find(|r| r.as_str() == s)
            }
        }
    };
}

reasons! {
    /// No agent runs in the process `pid` (start it with `patchbay run` or
    /// `LD_PRELOAD=libpatchbay_agent.so`). Metadata: `pid`.
    NoAgent = "NO_AGENT", NotFound;
    /// No agent has the id `agent_id` (it is gone, or was never there). Metadata: `agent_id`.
    UnknownAgent = "UNKNOWN_AGENT", NotFound;
    /// No tracer has the id `tracer_id` (detached, or never attached). Metadata: `tracer_id`.
    UnknownTracer = "UNKNOWN_TRACER", NotFound;
    /// The pattern matches no patchable function in the process (none of that name, or
    /// the matches have no patchable entry: build with `-pg -mfentry -mrecord-mcount` or
    /// `-fpatchable-function-entry=5`). Metadata: `pattern`, `pid`.
    NotPatchable = "NOT_PATCHABLE", NotFound;
    /// The function pattern is not a valid glob. Metadata: `pattern`.
    BadPattern = "BAD_PATTERN", InvalidArgument;
    /// A required field is missing or a value is out of range; the message names it.
    InvalidRequest = "INVALID_REQUEST", InvalidArgument;
    /// The object belongs to another uid than the caller's (over the Unix socket a client
    /// sees its own uid's agents and tracers only; root sees all).
    Permission = "PERMISSION", PermissionDenied;
    /// Over TCP: the `authorization: Bearer TOKEN` metadata is missing or wrong, or the
    /// server accepts no TCP clients.
    Unauthenticated = "UNAUTHENTICATED", Unauthenticated;
    /// The client's `x-patchbay-protocol` (or an agent's `Hello.protocol_version`) is not
    /// the server's. Metadata: `server_version`.
    ProtocolVersion = "PROTOCOL_VERSION", FailedPrecondition;
    /// The target's agent reported a failure (e.g. it could not write the patch).
    /// Metadata: `pid`.
    AgentFailed = "AGENT_FAILED", FailedPrecondition;
    /// The target's agent disconnected before it answered. Metadata: `pid`.
    AgentLost = "AGENT_LOST", Unavailable;
    /// The tracer store could not save a change (disk full, store removed): a new tracer
    /// was withdrawn; other changes hold until the server restarts.
    NotSaved = "NOT_SAVED", Unavailable;
    /// A wait ran out (the `timeout_ms` of the request, or the server's default); the
    /// message names what it waited for.
    Timeout = "TIMEOUT", DeadlineExceeded;
    /// An agent for this process is already connected (agents only). Metadata: `pid`.
    AlreadyConnected = "ALREADY_CONNECTED", AlreadyExists;
    /// An agent broke the Agent protocol (agents only).
    AgentProtocol = "AGENT_PROTOCOL", InvalidArgument;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reasons are a stable contract: renaming or removing one breaks clients that match
    /// on it. Adding one means adding it here too.
    #[test]
    fn reasons_are_stable() {
        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "NO_AGENT",
                "UNKNOWN_AGENT",
                "UNKNOWN_TRACER",
                "NOT_PATCHABLE",
                "BAD_PATTERN",
                "INVALID_REQUEST",
                "PERMISSION",
                "UNAUTHENTICATED",
                "PROTOCOL_VERSION",
                "AGENT_FAILED",
                "AGENT_LOST",
                "NOT_SAVED",
                "TIMEOUT",
                "ALREADY_CONNECTED",
                "AGENT_PROTOCOL",
            ]
        );
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert!(!r.description().is_empty());
            assert!(
                r.as_str().len() <= 63,
                "ErrorInfo limits reasons to 63 chars"
            );
        }
        assert_eq!(Reason::parse("NOPE"), None);
    }
}
