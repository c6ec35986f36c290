//! register's error type; mapped to `tonic::Status` in one place (`service.rs`).

use std::path::PathBuf;

/// Result with register's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open session store at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("session store: {0}")]
    Store(#[from] rocksdb::Error),
    #[error("corrupt record in session store: {0}")]
    Corrupt(String),
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("keeper: {0}")]
    Keeper(String),
    #[error("gRPC server: {0}")]
    Server(String),
}
