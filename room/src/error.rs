//! room's error type, and the protocol error codes sent to devices in `error` frames.

use std::net::SocketAddr;

/// Errors that stop the room (startup, keeper, listeners).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("keeper: {0}")]
    Keeper(String),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("grpc server: {0}")]
    Grpc(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Codes of `error` frames (docs/protocol.md lists them with their meaning).
pub mod code {
    /// Bad signature, malformed token or missing claims.
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const TOKEN_EXPIRED: &str = "token_expired";
    pub const UNKNOWN_APP: &str = "unknown_app";
    /// The first frame was not `auth`.
    pub const AUTH_REQUIRED: &str = "auth_required";
    pub const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";
    pub const FRAME_TOO_LARGE: &str = "frame_too_large";
    pub const BAD_FRAME: &str = "bad_frame";
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";
    pub const TOO_MANY_FROM_IP: &str = "too_many_connections_from_ip";
    pub const FORBIDDEN: &str = "forbidden";
    /// The session could not be registered; retry later.
    pub const UNAVAILABLE: &str = "unavailable";
    pub const SHUTTING_DOWN: &str = "shutting_down";
}
