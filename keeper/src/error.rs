//! The keeper's errors and the one place they become gRPC statuses.
//!
//! Messages follow etcd's wording where etcd clients (and `etcdctl`) match on it.

use tonic::Code;
use tonic::Status;

use crate::store::StoreError;

pub type Result<T, E = KeeperError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request broke a size limit; the message names the limit.
    #[error("{0}")]
    Limit(String),
    /// A malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The write may or may not have been applied (etcd's `ErrLeaderChanged`); clients must
    /// not assume either.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<raft_store::Error> for KeeperError {
    fn from(e: raft_store::Error) -> Self {
        match e {
            raft_store::Error::NoLeader => KeeperError::NoLeader,
            raft_store::Error::Timeout(_) => KeeperError::Timeout,
            raft_store::Error::LeaderChanged => KeeperError::LeaderChanged,
            raft_store::Error::LeaderUnreachable { .. } => KeeperError::Unavailable(e.to_string()),
            raft_store::Error::Raft(m) if m.contains("not found") => KeeperError::MemberNotFound,
            other => KeeperError::Internal(other.to_string()),
        }
    }
}

impl From<KeeperError> for Status {
    fn from(e: KeeperError) -> Self {
        let code = match &e {
            KeeperError::Store(s) => match s {
                StoreError::FutureRevision | StoreError::Compacted { .. } => Code::OutOfRange,
                StoreError::LeaseNotFound => Code::NotFound,
                StoreError::LeaseExists => Code::FailedPrecondition,
                _ => Code::InvalidArgument,
            },
            KeeperError::Limit(_) | KeeperError::InvalidArgument(_) => Code::InvalidArgument,
            KeeperError::NoLeader
            | KeeperError::Timeout
            | KeeperError::LeaderChanged
            | KeeperError::Unavailable(_) => Code::Unavailable,
            KeeperError::MemberNotFound => Code::NotFound,
            KeeperError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_of_unknown_outcome_is_etcds_leader_changed() {
        let status = Status::from(KeeperError::from(raft_store::Error::LeaderChanged));
        // etcd's Go client does not retry a mutation on this: it may have been applied.
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "etcdserver: leader changed");
    }
}
