//! raft-store's error type.

use crate::types::NodeId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB or the file system failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// No leader is known right now (election in progress or no quorum).
    #[error("no leader is known (election in progress or no quorum)")]
    NoLeader,
    /// The request must be sent to the leader and forwarding failed.
    #[error("leader {leader} is unreachable: {reason}")]
    LeaderUnreachable { leader: NodeId, reason: String },
    /// The request did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The leader changed while the write was pending and it may or may not have been applied:
    /// not retried, since applying it twice could be wrong (etcd's "leader changed").
    #[error("leader changed while the write was pending; it may or may not have been applied")]
    LeaderChanged,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Raft itself reported an error (including shutdown).
    #[error("raft: {0}")]
    Raft(String),
}

impl Error {
    pub(crate) fn storage(e: impl std::fmt::Display) -> Self {
        Error::Storage(e.to_string())
    }

    /// Whether retrying the same request later (possibly elsewhere) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NoLeader | Error::LeaderUnreachable { .. } | Error::Timeout(_)
        )
    }
}
