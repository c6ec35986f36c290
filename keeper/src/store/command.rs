//! What the keeper replicates through the Raft log (commands) and what applying one returns.
//!
//! The shapes follow etcd's v3 `KV` and `Lease` requests so the gRPC layer converts field by
//! field; only what the state machine needs is here (sorting and min/max revision filters of a
//! `RangeRequest` are applied by the gRPC layer on the returned keys).

use serde::{Deserialize, Serialize};

use super::mvcc::{KeyValue, RangeResult};

/// Errors a command or a read can fail with. A failed command leaves the state unchanged.
///
/// The texts are etcd's: etcd clients match on them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// `compact_revision` is the oldest revision still readable (and watchable).
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A put with `ignore_value` also carried a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A put with `ignore_lease` also carried a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
}

/// Shorthand used throughout the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A command recorded in the Raft log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Put(PutOp),
    DeleteRange(DeleteOp),
    Txn(TxnOp),
    /// Drops history older than `revision`; reads and watches from `revision` on stay exact.
    Compact {
        revision: i64,
    },
    /// `id` is chosen by the proposer (never 0, which means "no lease"); `ttl` is in seconds and
    /// only recorded: expiry is the leader's decision, replicated as [`Command::LeaseExpire`].
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// Proposed by the leader when its timers fire. Ids that are already gone are skipped, so a
    /// stale or duplicate proposal is harmless.
    LeaseExpire {
        ids: Vec<i64>,
    },
    /// Issues the id of a member about to be added: one above both `above` (the highest id in
    /// the proposer's view of membership) and every id issued before, so an id is never reused
    /// after its member was removed.
    IssueMemberId {
        above: u64,
    },
}

/// etcd `RangeRequest` (without sorting and revision filters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeOp {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Empty: exactly `key`; `[0]`: every key >= `key`; otherwise `[key, range_end)`.
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// 0 (or negative) reads the current revision.
    pub revision: i64,
    /// 0 (or negative) means no limit.
    pub limit: i64,
    pub keys_only: bool,
    pub count_only: bool,
}

/// etcd `PutRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOp {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// 0 detaches the key from any lease; otherwise the lease must exist.
    pub lease: i64,
    pub prev_kv: bool,
    /// Keep the current value (the key must exist and `value` must be empty).
    pub ignore_value: bool,
    /// Keep the current lease (the key must exist and `lease` must be 0).
    pub ignore_lease: bool,
}

/// etcd `DeleteRangeRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOp {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Same rules as [`RangeOp::range_end`].
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

/// etcd `TxnRequest`: if every compare holds run `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOp {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

/// One operation inside a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Range(RangeOp),
    Put(PutOp),
    DeleteRange(DeleteOp),
    Txn(TxnOp),
}

/// etcd `Compare`: `<field of key> <result> <target>`, e.g. `version(key) == 0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Same rules as [`RangeOp::range_end`]; every key in the range must satisfy the compare.
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub target: CompareTarget,
    pub result: CompareResult,
}

/// The field compared and the value it is compared with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(i64),
}

/// How the key's field must relate to the target (`Greater`: field > target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// What applying a [`Command`] returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The store revision after applying (unchanged if the command failed or wrote nothing).
    pub revision: i64,
    pub result: Result<Reply>,
}

/// The successful outcome of a [`Command`], one variant per command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Put(PutResponse),
    DeleteRange(DeleteResponse),
    Txn(TxnResponse),
    Compact,
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// `deleted` keys were attached to the lease.
    LeaseRevoke {
        deleted: i64,
    },
    /// The ids that existed and are now gone, in the order given.
    LeaseExpire {
        expired: Vec<i64>,
    },
    MemberId {
        id: u64,
    },
}

/// etcd `PutResponse` (the revision is in [`Response::revision`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PutResponse {
    /// Only filled when [`PutOp::prev_kv`] was asked and the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// etcd `DeleteRangeResponse`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub deleted: i64,
    /// Only filled when [`DeleteOp::prev_kv`] was asked; in key order.
    pub prev_kvs: Vec<KeyValue>,
}

/// etcd `TxnResponse`: which branch ran and one response per op of that branch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<OpResponse>,
}

/// The response of one [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpResponse {
    Range(RangeResult),
    Put(PutResponse),
    DeleteRange(DeleteResponse),
    Txn(TxnResponse),
}
