//! Errors of the server core, each mapped to a precise gRPC status by the shell.

use thiserror::Error;

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

impl From<CoreError> for tonic::Status {
    fn from(e: CoreError) -> Self {
        use tonic::Code;
        let code = match &e {
            CoreError::NoAgent(_)
            | CoreError::UnknownAgent(_)
            | CoreError::UnknownTracer(_)
            | CoreError::NoMatch { .. } => Code::NotFound,
            CoreError::BadPattern { .. } | CoreError::Invalid(_) | CoreError::Protocol(_) => {
                Code::InvalidArgument
            }
            CoreError::PermissionDenied(_) => Code::PermissionDenied,
            CoreError::AgentLost { .. } => Code::Unavailable,
            CoreError::AgentFailed { .. } | CoreError::VersionMismatch(_) => {
                Code::FailedPrecondition
            }
            CoreError::Timeout(_) => Code::DeadlineExceeded,
            CoreError::AlreadyConnected(_) => Code::AlreadyExists,
        };
        tonic::Status::new(code, e.to_string())
    }
}
