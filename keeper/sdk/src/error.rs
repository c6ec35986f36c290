//! The SDK's errors: one enum, every fallible call returns [`Result`].

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No endpoint answered (connect refused, node down, no leader) within the call's timeout.
    #[error("keeper unavailable: {0}")]
    Unavailable(String),
    /// A call did not finish within its timeout.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// `config()` found no document under `/config/{service}` (use `config_or_default`).
    #[error("no config document for service {service:?}")]
    NoConfig { service: String },
    /// A config document did not parse or validate into the service's type.
    #[error("config {service:?} version {version} rejected: {message}")]
    Parse {
        service: String,
        version: u64,
        message: String,
    },
    /// Bad input from the caller (empty name, bad endpoint, a key with '/' in a name...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A watch asked for history older than what the keeper retains.
    #[error("watch history compacted: oldest retained revision is {compact_revision}")]
    Compacted { compact_revision: i64 },
    /// A conditional write lost a race or found the state it did not expect.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A value stored under a layout key is not the JSON the layout says.
    #[error("bad value under {key}: {message}")]
    Decode { key: String, message: String },
    /// The background task behind a handle has stopped (the handle outlived its `Keeper`'s
    /// runtime, or the handle was shut down).
    #[error("{0} closed")]
    Closed(&'static str),
    /// Any other gRPC status the keeper answered with.
    #[error("keeper answered {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

impl Error {
    /// Whether another endpoint (or a later attempt) might succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable(_) | Error::Timeout { .. } => true,
            Error::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        }
    }
}
