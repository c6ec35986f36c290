//! The one place openraft's type configuration is declared, with the aliases raft-store uses.
//!
//! Commands and responses travel through openraft as opaque bytes: the application's typed
//! [`crate::StateMachine`] commands are encoded by raft-store before proposing and decoded just
//! before applying. That keeps a single non-generic `TypeConfig` and keeps openraft types out of
//! every crate but this one.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

/// An encoded application command, as stored in the log. Encoded as bytes (one copy), not as a
/// sequence of u8 (one call per byte); bincode writes both the same way, so logs written before
/// stay readable (see the test below).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.0.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for every Longlink Raft group.
    pub TypeConfig:
        D = Command,
        R = Vec<u8>,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft<SM> = openraft::Raft<TypeConfig, SM>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Vec<u8>>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type IoFlushed = openraft::storage::IOFlushed<TypeConfig>;
pub type RpcError<E = openraft::errors::Infallible> = openraft::errors::RPCError<TypeConfig, E>;
pub type StreamingError = openraft::errors::StreamingError<TypeConfig>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<TypeConfig>;
pub type VoteRequest = openraft::raft::VoteRequest<TypeConfig>;
pub type VoteResponse = openraft::raft::VoteResponse<TypeConfig>;
pub type SnapshotResponse = openraft::raft::SnapshotResponse<TypeConfig>;
pub type StreamAppendResult = openraft::raft::StreamAppendResult<TypeConfig>;
pub type TransferLeaderRequest = openraft::raft::TransferLeaderRequest<TypeConfig>;
pub type TransferLeaderResponse = openraft::raft::TransferLeaderResponse<TypeConfig>;

/// Encodes a value for the log, a snapshot or the peer wire.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

/// Decodes a value written by [`encode`].
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a command was encoded before it was marked as bytes.
    #[derive(Serialize, Deserialize)]
    struct OldCommand(Vec<u8>);

    #[test]
    fn commands_encode_as_before_so_old_logs_stay_readable() {
        let payload: Vec<u8> = (0..=255).chain(0..44).collect();
        let new = encode(&Command(payload.clone())).unwrap();
        assert_eq!(new, encode(&OldCommand(payload.clone())).unwrap());
        let back: Command = decode(&encode(&OldCommand(payload.clone())).unwrap()).unwrap();
        assert_eq!(back.0, payload);
    }
}
