//! The SDK's error type: connection failures and gRPC statuses mapped to variants a
//! caller can match on.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use tonic::Code;
use tonic_types::StatusExt;

/// Result of every SDK operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The server's message of an error status, and the machine-readable reason the server
/// put in its `google.rpc.ErrorInfo` (see [`patchbay_proto::errors`]). Dereferences to the
/// message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detail {
    message: String,
    reason: Option<String>,
    metadata: BTreeMap<String, String>,
}

impl Detail {
    /// The message, written for people.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `ErrorInfo.reason` (e.g. `NO_AGENT`), when the server sent one in the
    /// patchbay domain.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The `ErrorInfo.metadata` (e.g. `pid`, `tracer_id`); empty without a reason.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
}

impl From<String> for Detail {
    fn from(message: String) -> Self {
        Detail {
            message,
            ..Detail::default()
        }
    }
}

impl From<&str> for Detail {
    fn from(message: &str) -> Self {
        Detail::from(message.to_owned())
    }
}

impl Deref for Detail {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl PartialEq<str> for Detail {
    fn eq(&self, other: &str) -> bool {
        self.message == other
    }
}

impl PartialEq<&str> for Detail {
    fn eq(&self, other: &&str) -> bool {
        self.message == *other
    }
}

/// What went wrong talking to `patchbayd`.
///
/// Status variants carry the server's message, which is written for people and says what
/// to do next (for example "no agent in pid 123: start the program with ..."), and the
/// machine-readable reason of [`Error::reason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached (no socket, connection refused, ...).
    #[error("cannot reach patchbayd at {target}: is it running? start it with `patchbayd`")]
    Connect {
        /// The address that was tried, as shown to people.
        target: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server address itself is malformed.
    #[error("invalid patchbayd address `{target}`: {reason}")]
    InvalidTarget {
        /// The address as given.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Unknown pid, tracer or function (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(Detail),
    /// A malformed request (`INVALID_ARGUMENT`): bad glob, missing target, ...
    #[error("{0}")]
    InvalidArgument(Detail),
    /// The object belongs to another user (`PERMISSION_DENIED`).
    #[error("{0}")]
    PermissionDenied(Detail),
    /// The request cannot be served in the current state, e.g. a protocol version
    /// mismatch (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(Detail),
    /// A wait ran out (`DEADLINE_EXCEEDED`); the server's message names what it waited for.
    #[error("{0}")]
    DeadlineExceeded(Detail),
    /// A TCP request without a valid token (`UNAUTHENTICATED`).
    #[error("{0}")]
    Unauthenticated(Detail),
    /// The server went away or refused the call (`UNAVAILABLE`).
    #[error("patchbayd is unavailable: {0}")]
    Unavailable(Detail),
    /// Any other status.
    #[error("{message} (status {code:?})")]
    Other {
        /// The status code.
        code: Code,
        /// The server's message.
        message: Detail,
    },
    /// The server answered, but without what the call needs (a server that does not
    /// follow the protocol).
    #[error("patchbayd sent an unexpected answer: {0}")]
    UnexpectedResponse(String),
    /// The agent could not be injected into a process that has none
    /// ([`crate::Attach::inject`]); the message says why and what to do.
    #[error(transparent)]
    Inject(#[from] crate::inject::InjectError),
}

impl Error {
    /// The gRPC status code this error stands for (`None` for errors raised before any
    /// request was made, or about an answer).
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            Error::Connect { .. }
            | Error::InvalidTarget { .. }
            | Error::UnexpectedResponse(_)
            | Error::Inject(_) => {
                return None;
            }
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Other { code, .. } => *code,
        })
    }

    /// The server's message and reason, for errors that are statuses.
    pub fn detail(&self) -> Option<&Detail> {
        match self {
            Error::NotFound(d)
            | Error::InvalidArgument(d)
            | Error::PermissionDenied(d)
            | Error::FailedPrecondition(d)
            | Error::DeadlineExceeded(d)
            | Error::Unauthenticated(d)
            | Error::Unavailable(d)
            | Error::Other { message: d, .. } => Some(d),
            Error::Connect { .. }
            | Error::InvalidTarget { .. }
            | Error::UnexpectedResponse(_)
            | Error::Inject(_) => None,
        }
    }

    /// The machine-readable reason the server gave (`NO_AGENT`, `UNKNOWN_TRACER`, ...;
    /// listed in `docs/api.md`), if any.
    pub fn reason(&self) -> Option<&str> {
        self.detail().and_then(Detail::reason)
    }

    /// Maps a status to its variant. An empty status message is replaced by the code's
    /// generic description so that no error prints as an empty line.
    pub fn from_status(status: tonic::Status) -> Self {
        let code = status.code();
        let message = if status.message().trim().is_empty() {
            code.description().to_owned()
        } else {
            status.message().to_owned()
        };
        let info = status
            .get_error_details()
            .error_info()
            .filter(|i| i.domain == patchbay_proto::errors::DOMAIN)
            .cloned();
        let message = Detail {
            message,
            reason: info.as_ref().map(|i| i.reason.clone()),
            metadata: info
                .map(|i| i.metadata.into_iter().collect())
                .unwrap_or_default(),
        };
        match code {
            Code::NotFound => Error::NotFound(message),
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::Unavailable => Error::Unavailable(message),
            code => Error::Other { code, message },
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::from_status(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn statuses_map_to_variants() {
        let cases = [
            (Code::NotFound, "no agent in pid 7"),
            (Code::InvalidArgument, "bad glob"),
            (Code::PermissionDenied, "not yours"),
            (Code::FailedPrecondition, "protocol 2"),
            (Code::DeadlineExceeded, "holdouts: 12"),
            (Code::Unauthenticated, "token"),
            (Code::Unavailable, "gone"),
            (Code::Internal, "bug"),
            (Code::Cancelled, "cancelled"),
        ];
        for (code, msg) in cases {
            let err = Error::from(Status::new(code, msg));
            assert_eq!(err.code(), Some(code), "{err:?}");
            assert!(err.to_string().contains(msg), "{err}");
        }
        assert!(matches!(
            Error::from(Status::not_found("x")),
            Error::NotFound(m) if m == "x"
        ));
        assert!(matches!(
            Error::from(Status::internal("boom")),
            Error::Other { code: Code::Internal, message } if message == "boom"
        ));
    }

    #[test]
    fn server_messages_are_shown_verbatim() {
        let msg = "no agent in pid 123: start the program with `patchbay run` or LD_PRELOAD=libpatchbay_agent.so";
        assert_eq!(Error::from(Status::not_found(msg)).to_string(), msg);
        assert_eq!(
            Error::from(Status::unavailable("connection reset")).to_string(),
            "patchbayd is unavailable: connection reset"
        );
        assert_eq!(
            Error::from(Status::internal("boom")).to_string(),
            "boom (status Internal)"
        );
    }

    #[test]
    fn reasons_are_read_from_the_error_info() {
        use tonic_types::ErrorDetails;
        let md = std::collections::HashMap::from([("pid".to_owned(), "7".to_owned())]);
        let status = Status::with_error_details(
            Code::NotFound,
            "no agent in pid 7",
            ErrorDetails::with_error_info("NO_AGENT", patchbay_proto::errors::DOMAIN, md),
        );
        let err = Error::from(status);
        assert_eq!(err.reason(), Some("NO_AGENT"));
        let d = err.detail().expect("a status");
        assert_eq!(d.metadata().get("pid").map(String::as_str), Some("7"));
        assert_eq!(err.to_string(), "no agent in pid 7");
        // Another domain's reason is not ours.
        let status = Status::with_error_details(
            Code::NotFound,
            "x",
            ErrorDetails::with_error_info(
                "NO_AGENT",
                "example.com",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(Error::from(status).reason(), None);
        assert_eq!(Error::from(Status::not_found("x")).reason(), None);
    }

    #[test]
    fn empty_messages_get_a_description() {
        let err = Error::from(Status::new(Code::PermissionDenied, ""));
        assert_eq!(err.to_string(), Code::PermissionDenied.description());
    }
}
