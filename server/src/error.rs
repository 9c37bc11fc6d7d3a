//! Errors of the server core, each mapped to a precise gRPC status by the shell.

use std::collections::HashMap;

use patchbay_proto::errors::{DOMAIN, Reason};
use thiserror::Error;
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    #[error(
        "no agent in pid {0}: start the program with `patchbay run -- PROGRAM` or with LD_PRELOAD=libpatchbay_agent.so"
    )]
    NoAgent(u32),
    #[error("no agent with id {0}: list agents with `patchbay agents`")]
    UnknownAgent(u64),
    #[error("no tracer with id {0}: list tracers with `patchbay tracers`")]
    UnknownTracer(u64),
    #[error("pattern '{pattern}' matches no patchable function in pid {pid}{hint}")]
    NoMatch {
        pattern: String,
        pid: u32,
        hint: String,
    },
    #[error("malformed pattern '{pattern}': {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("agent in pid {pid} disconnected before answering")]
    AgentLost { pid: u32 },
    #[error("agent in pid {pid} failed: {message}")]
    AgentFailed { pid: u32, message: String },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    VersionMismatch(String),
    #[error("an agent for pid {0} is already connected")]
    AlreadyConnected(u32),
    /// An agent sent a message that breaks the protocol (unknown ids, impossible
    /// transitions, stale epochs); the message was ignored and changed nothing.
    #[error("agent protocol violation: {0}")]
    Protocol(String),
}

impl CoreError {
    /// The machine-readable reason and the metadata of its `google.rpc.ErrorInfo`.
    pub fn reason(&self) -> (Reason, Vec<(&'static str, String)>) {
        match self {
            CoreError::NoAgent(pid) => (Reason::NoAgent, vec![("pid", pid.to_string())]),
            CoreError::UnknownAgent(id) => {
                (Reason::UnknownAgent, vec![("agent_id", id.to_string())])
            }
            CoreError::UnknownTracer(id) => {
                (Reason::UnknownTracer, vec![("tracer_id", id.to_string())])
            }
            CoreError::NoMatch { pattern, pid, .. } => (
                Reason::NotPatchable,
                vec![("pattern", pattern.clone()), ("pid", pid.to_string())],
            ),
            CoreError::BadPattern { pattern, .. } => {
                (Reason::BadPattern, vec![("pattern", pattern.clone())])
            }
            CoreError::Invalid(_) => (Reason::InvalidRequest, vec![]),
            CoreError::PermissionDenied(_) => (Reason::Permission, vec![]),
            CoreError::AgentLost { pid } => (Reason::AgentLost, vec![("pid", pid.to_string())]),
            CoreError::AgentFailed { pid, .. } => {
                (Reason::AgentFailed, vec![("pid", pid.to_string())])
            }
            CoreError::Timeout(_) => (Reason::Timeout, vec![]),
            CoreError::VersionMismatch(_) => (
                Reason::ProtocolVersion,
                vec![(
                    "server_version",
                    patchbay_proto::PROTOCOL_VERSION.to_string(),
                )],
            ),
            CoreError::AlreadyConnected(pid) => {
                (Reason::AlreadyConnected, vec![("pid", pid.to_string())])
            }
            CoreError::Protocol(_) => (Reason::AgentProtocol, vec![]),
        }
    }
}

/// A status with `reason`'s code and a `google.rpc.ErrorInfo` (domain
/// [`DOMAIN`](patchbay_proto::errors::DOMAIN), `reason`, `metadata`) in its details.
pub fn status(
    reason: Reason,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (&'static str, String)>,
) -> tonic::Status {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    tonic::Status::with_error_details(
        reason.code(),
        message,
        ErrorDetails::with_error_info(reason.as_str(), DOMAIN, metadata),
    )
}

impl From<CoreError> for tonic::Status {
    fn from(e: CoreError) -> Self {
        let (reason, metadata) = e.reason();
        status(reason, e.to_string(), metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn info(s: &tonic::Status) -> tonic_types::ErrorInfo {
        s.get_error_details()
            .error_info()
            .cloned()
            .expect("an ErrorInfo in the details")
    }

    #[test]
    fn statuses_carry_an_error_info() {
        let s = tonic::Status::from(CoreError::NoAgent(42));
        assert_eq!(s.code(), Code::NotFound);
        assert!(
            s.message().starts_with("no agent in pid 42"),
            "{}",
            s.message()
        );
        let i = info(&s);
        assert_eq!((i.reason.as_str(), i.domain.as_str()), ("NO_AGENT", DOMAIN));
        assert_eq!(i.metadata.get("pid").map(String::as_str), Some("42"));

        let s = tonic::Status::from(CoreError::NoMatch {
            pattern: "foo*".into(),
            pid: 7,
            hint: String::new(),
        });
        let i = info(&s);
        assert_eq!(i.reason, "NOT_PATCHABLE");
        assert_eq!(i.metadata.get("pattern").map(String::as_str), Some("foo*"));
    }

    /// The code of every variant is the one its reason documents.
    #[test]
    fn codes_follow_the_reasons() {
        let all = [
            CoreError::NoAgent(1),
            CoreError::UnknownAgent(1),
            CoreError::UnknownTracer(1),
            CoreError::NoMatch {
                pattern: "x".into(),
                pid: 1,
                hint: String::new(),
            },
            CoreError::BadPattern {
                pattern: "[".into(),
                reason: "unclosed".into(),
            },
            CoreError::Invalid("x".into()),
            CoreError::PermissionDenied("x".into()),
            CoreError::AgentLost { pid: 1 },
            CoreError::AgentFailed {
                pid: 1,
                message: "x".into(),
            },
            CoreError::Timeout("x".into()),
            CoreError::VersionMismatch("x".into()),
            CoreError::AlreadyConnected(1),
            CoreError::Protocol("x".into()),
        ];
        for e in all {
            let (reason, _) = e.reason();
            let s = tonic::Status::from(e.clone());
            assert_eq!(s.code(), reason.code(), "{e:?}");
            assert_eq!(info(&s).reason, reason.as_str(), "{e:?}");
        }
    }
}
