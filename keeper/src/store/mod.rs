//! The keeper's replicated state machine: an etcd-v3-compatible revisioned key-value store
//! with leases, applied by raft-store and read by the gRPC layer.
//!
//! Everything here is pure and deterministic: the same commands in the same order give the
//! same state, byte for byte, on every replica. A command that fails is answered with a
//! [`StoreError`] inside the [`Response`] and changes nothing but the applied index.
//!
//! Watches are served from [`KeeperState::events`]: after applying, the server compares
//! [`KeeperState::revision`] with what each watcher has seen and reads the new events.

mod command;
mod key;
mod lease;
mod mvcc;
mod txn;

pub use command::{
    Command, Compare, CompareResult, CompareTarget, DeleteOp, DeleteResponse, Op, OpResponse,
    PutOp, PutResponse, RangeOp, Reply, Response, Result, StoreError, TxnOp, TxnResponse,
};
pub use lease::LeaseInfo;
pub use mvcc::{Event, EventKind, KeyValue, RangeResult};
pub use txn::{validate_delete, validate_put, validate_txn};

use serde::{Deserialize, Serialize};

use lease::LeaseTable;
use mvcc::{KeyRange, Mvcc, WriteBatch};

/// Bumped when the snapshot encoding changes, so an old node refuses a snapshot it would
/// misread instead of restoring garbage. Format 1 (before `member_ids`) is still read.
const SNAPSHOT_FORMAT: u32 = 2;

/// The whole replicated state of a keeper.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperState {
    mvcc: Mvcc,
    /// Every key attached to a lease is in that lease's key set, and only live keys are.
    leases: LeaseTable,
    /// The log index of the last command applied, so a restored snapshot says where the log
    /// must resume.
    applied_index: u64,
    /// The highest member id issued by [`Command::IssueMemberId`].
    member_ids: u64,
}

/// [`KeeperState`] as snapshot format 1 encoded it.
#[derive(Deserialize)]
struct KeeperStateV1 {
    mvcc: Mvcc,
    leases: LeaseTable,
    applied_index: u64,
}

#[derive(Serialize)]
struct SnapshotRef<'a, S> {
    format: u32,
    state: &'a S,
}

#[derive(Deserialize)]
struct SnapshotOwned<S> {
    /// Read first, on its own, by [`KeeperState::restore`].
    _format: u32,
    state: S,
}

impl KeeperState {
    /// An empty store at revision 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current revision: 1 for an empty store, +1 for every command that changed a key.
    pub fn revision(&self) -> i64 {
        self.mvcc.revision()
    }

    /// The oldest revision still readable and watchable; 0 if never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.mvcc.compact_revision()
    }

    /// The `index` of the last [`raft_store::StateMachine::apply`] call (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.mvcc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mvcc.len() == 0
    }

    /// A digest of the live keys (with all their fields) and the revision: replicas that
    /// applied the same commands report the same value.
    pub fn hash(&self) -> u64 {
        self.mvcc.hash()
    }

    /// Reads keys as of `revision` (0 = current). `range_end`: empty = exactly `key`, `[0]` =
    /// every key >= `key`, else `[key, range_end)`. `limit` 0 = no limit.
    pub fn range(
        &self,
        key: &[u8],
        range_end: &[u8],
        revision: i64,
        limit: i64,
        keys_only: bool,
        count_only: bool,
    ) -> Result<RangeResult> {
        let revision = self.mvcc.read_revision(revision)?;
        Ok(self.mvcc.range_at(
            KeyRange::new(key, range_end),
            revision,
            limit,
            keys_only,
            count_only,
        ))
    }

    /// Every event at revision >= `from_revision` on keys in the range, in revision order and
    /// in the order the command made them within a revision. `from_revision` 0 means "from
    /// now": nothing. Below [`KeeperState::compact_revision`] the answer is
    /// [`StoreError::Compacted`]; watching from the compact revision itself works.
    /// `limit_events` (0 = none) is checked between revisions, never splitting one, so a
    /// watcher resumes from the last event's revision + 1.
    pub fn events(
        &self,
        from_revision: i64,
        key: &[u8],
        range_end: &[u8],
        limit_events: usize,
    ) -> Result<Vec<Event>> {
        self.mvcc
            .events(from_revision, KeyRange::new(key, range_end), limit_events)
    }

    pub fn lease(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.info(id)
    }

    /// Every lease, sorted by id.
    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.leases.infos()
    }

    /// Every lease as (id, granted TTL), sorted by id: what timers and listings need, without
    /// copying each lease's attached keys.
    pub fn lease_ttls(&self) -> Vec<(i64, i64)> {
        self.leases.ttls()
    }

    fn check_put(&self, put: &PutOp) -> Result<()> {
        validate_put(put)?;
        if (put.ignore_value || put.ignore_lease) && !self.mvcc.exists(&put.key) {
            return Err(StoreError::KeyNotFound);
        }
        if put.lease != 0 && !self.leases.contains(put.lease) {
            return Err(StoreError::LeaseNotFound);
        }
        Ok(())
    }

    /// Puts a checked op and keeps the lease table in step.
    fn put_in(&mut self, batch: &mut WriteBatch, put: PutOp) -> PutResponse {
        let value = (!put.ignore_value).then_some(put.value);
        let lease = (!put.ignore_lease).then_some(put.lease);
        let outcome = self.mvcc.put(batch, put.key, value, lease, put.prev_kv);
        self.leases
            .reattach(batch.last_key(), outcome.prev_lease, outcome.lease);
        PutResponse {
            prev_kv: outcome.prev_kv,
        }
    }

    fn delete_in(&mut self, batch: &mut WriteBatch, delete: &DeleteOp) -> DeleteResponse {
        let outcome = self.mvcc.delete_range(
            batch,
            KeyRange::new(&delete.key, &delete.range_end),
            delete.prev_kv,
        );
        for (lease, key) in &outcome.detached {
            self.leases.detach(*lease, key);
        }
        DeleteResponse {
            deleted: outcome.deleted,
            prev_kvs: outcome.prev_kvs,
        }
    }

    fn apply_put(&mut self, put: PutOp) -> Result<Reply> {
        self.check_put(&put)?;
        let mut batch = self.mvcc.begin();
        let response = self.put_in(&mut batch, put);
        self.mvcc.commit(batch);
        Ok(Reply::Put(response))
    }

    fn apply_delete(&mut self, delete: DeleteOp) -> Result<Reply> {
        validate_delete(&delete)?;
        let mut batch = self.mvcc.begin();
        let response = self.delete_in(&mut batch, &delete);
        self.mvcc.commit(batch);
        Ok(Reply::DeleteRange(response))
    }

    /// Drops lease `id` and deletes its keys in key order; returns how many, or `None` if the
    /// lease does not exist.
    fn drop_lease(&mut self, batch: &mut WriteBatch, id: i64) -> Option<i64> {
        let keys = self.leases.remove(id)?;
        let mut deleted = 0;
        for key in &keys {
            deleted += self
                .mvcc
                .delete_range(batch, KeyRange::Single(key), false)
                .deleted;
        }
        Some(deleted)
    }

    fn apply_revoke(&mut self, id: i64) -> Result<Reply> {
        if !self.leases.contains(id) {
            return Err(StoreError::LeaseNotFound);
        }
        let mut batch = self.mvcc.begin();
        let deleted = self.drop_lease(&mut batch, id).unwrap_or(0);
        self.mvcc.commit(batch);
        Ok(Reply::LeaseRevoke { deleted })
    }

    fn apply_expire(&mut self, ids: Vec<i64>) -> Reply {
        let mut batch = self.mvcc.begin();
        let expired = ids
            .into_iter()
            .filter(|&id| self.drop_lease(&mut batch, id).is_some())
            .collect();
        self.mvcc.commit(batch);
        Reply::LeaseExpire { expired }
    }
}

impl raft_store::StateMachine for KeeperState {
    type Command = Command;
    type Response = Response;

    fn apply(&mut self, index: u64, command: Command) -> Response {
        self.applied_index = index;
        let result = match command {
            Command::Put(put) => self.apply_put(put),
            Command::DeleteRange(delete) => self.apply_delete(delete),
            Command::Txn(txn) => self.apply_txn(txn),
            Command::Compact { revision } => self.mvcc.compact(revision).map(|()| Reply::Compact),
            Command::LeaseGrant { id, ttl } => self
                .leases
                .grant(id, ttl)
                .map(|()| Reply::LeaseGrant { id, ttl }),
            Command::LeaseRevoke { id } => self.apply_revoke(id),
            Command::LeaseExpire { ids } => Ok(self.apply_expire(ids)),
            Command::IssueMemberId { above } => {
                self.member_ids = self.member_ids.max(above) + 1;
                Ok(Reply::MemberId {
                    id: self.member_ids,
                })
            }
        };
        Response {
            revision: self.mvcc.revision(),
            result,
        }
    }

    /// O(1): the big maps are persistent and share structure with the live state.
    type Frozen = KeeperState;

    fn freeze(&self) -> KeeperState {
        self.clone()
    }

    fn write_frozen(state: KeeperState, mut out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let snapshot = SnapshotRef {
            format: SNAPSHOT_FORMAT,
            state: &state,
        };
        // Plain in-memory data with known lengths: only the writer can fail.
        bincode::serde::encode_into_std_write(&snapshot, &mut out, bincode::config::standard())
            .map(drop)
            .map_err(std::io::Error::other)
    }

    fn restore(&mut self, snapshot: &[u8]) -> std::result::Result<(), String> {
        // The format comes first in every encoding; it says how to read the rest.
        let (format, _): (u32, usize) =
            bincode::serde::decode_from_slice(snapshot, bincode::config::standard())
                .map_err(|e| format!("keeper snapshot: {e}"))?;
        let state = match format {
            SNAPSHOT_FORMAT => decode_whole::<KeeperState>(snapshot)?,
            1 => {
                let v1 = decode_whole::<KeeperStateV1>(snapshot)?;
                KeeperState {
                    mvcc: v1.mvcc,
                    leases: v1.leases,
                    applied_index: v1.applied_index,
                    member_ids: 0,
                }
            }
            other => {
                return Err(format!(
                    "keeper snapshot: format {other} (this build reads 1 and {SNAPSHOT_FORMAT})"
                ));
            }
        };
        *self = state;
        Ok(())
    }
}

/// Decodes a whole snapshot whose state is an `S`; trailing bytes are an error.
fn decode_whole<S: serde::de::DeserializeOwned>(snapshot: &[u8]) -> std::result::Result<S, String> {
    let (decoded, read): (SnapshotOwned<S>, usize) =
        bincode::serde::decode_from_slice(snapshot, bincode::config::standard())
            .map_err(|e| format!("keeper snapshot: {e}"))?;
    if read != snapshot.len() {
        return Err(format!(
            "keeper snapshot: {} trailing bytes",
            snapshot.len() - read
        ));
    }
    Ok(decoded.state)
}

/// Helpers shared by the store's unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use raft_store::StateMachine;

    use super::*;

    /// Applies `command` at the next log index.
    pub(crate) fn apply(state: &mut KeeperState, command: Command) -> Response {
        let index = state.applied_index() + 1;
        state.apply(index, command)
    }

    pub(crate) fn put_op(key: &str, value: &str) -> PutOp {
        PutOp {
            key: key.into(),
            value: value.into(),
            ..PutOp::default()
        }
    }

    pub(crate) fn delete_op(key: &str, range_end: &str) -> DeleteOp {
        DeleteOp {
            key: key.into(),
            range_end: range_end.into(),
            prev_kv: false,
        }
    }

    /// Puts and returns the new revision; panics if the put fails.
    pub(crate) fn put(state: &mut KeeperState, key: &str, value: &str) -> i64 {
        let response = apply(state, Command::Put(put_op(key, value)));
        assert!(response.result.is_ok(), "{response:?}");
        response.revision
    }

    pub(crate) fn put_with_lease(state: &mut KeeperState, key: &str, lease: i64) -> Response {
        apply(
            state,
            Command::Put(PutOp {
                lease,
                ..put_op(key, "v")
            }),
        )
    }

    pub(crate) fn delete(state: &mut KeeperState, key: &str, range_end: &str) -> Response {
        apply(state, Command::DeleteRange(delete_op(key, range_end)))
    }

    pub(crate) fn grant(state: &mut KeeperState, id: i64) {
        let response = apply(state, Command::LeaseGrant { id, ttl: 10 });
        assert!(response.result.is_ok(), "{response:?}");
    }

    /// The current kv of `key`, if it exists.
    pub(crate) fn get(state: &KeeperState, key: &str) -> Option<KeyValue> {
        let mut result = state
            .range(key.as_bytes(), b"", 0, 0, false, false)
            .unwrap();
        result.kvs.pop()
    }

    /// Keys in `[key, range_end)` (etcd rules) at `revision`, as strings.
    pub(crate) fn keys_at(
        state: &KeeperState,
        key: &str,
        range_end: &[u8],
        revision: i64,
    ) -> Vec<String> {
        state
            .range(key.as_bytes(), range_end, revision, 0, true, false)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    }

    /// Everything that must not change when a command is rejected.
    pub(crate) fn assert_unchanged(before: &KeeperState, after: &KeeperState) {
        assert_eq!(before.mvcc, after.mvcc);
        assert_eq!(before.leases, after.leases);
    }
}

#[cfg(test)]
mod tests {
    use raft_store::StateMachine;

    use super::testutil::*;
    use super::*;

    #[test]
    fn empty_store_starts_at_revision_one() {
        let state = KeeperState::new();
        assert_eq!(state.revision(), 1);
        assert_eq!(state.compact_revision(), 0);
        assert_eq!(state.applied_index(), 0);
        assert!(state.is_empty());
        assert!(keys_at(&state, "\0", b"\0", 0).is_empty());
        assert_eq!(state.events(1, b"\0", b"\0", 0).unwrap(), vec![]);
    }

    #[test]
    fn put_creates_then_versions() {
        let mut state = KeeperState::new();
        let response = apply(&mut state, Command::Put(put_op("a", "1")));
        assert_eq!(response.revision, 2);
        assert_eq!(
            response.result,
            Ok(Reply::Put(PutResponse { prev_kv: None }))
        );
        let kv = get(&state, "a").unwrap();
        assert_eq!(
            kv,
            KeyValue {
                key: b"a".to_vec(),
                value: b"1".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                lease: 0,
            }
        );

        let response = apply(
            &mut state,
            Command::Put(PutOp {
                prev_kv: true,
                ..put_op("a", "2")
            }),
        );
        assert_eq!(response.revision, 3);
        assert_eq!(
            response.result,
            Ok(Reply::Put(PutResponse { prev_kv: Some(kv) }))
        );
        let kv = get(&state, "a").unwrap();
        assert_eq!(
            (
                kv.value.as_slice(),
                kv.create_revision,
                kv.mod_revision,
                kv.version
            ),
            (&b"2"[..], 2, 3, 2)
        );

        // The same value again is still a write.
        assert_eq!(put(&mut state, "a", "2"), 4);
        assert_eq!(get(&state, "a").unwrap().version, 3);
        assert_eq!(state.len(), 1);
        assert_eq!(state.applied_index(), 3);
    }

    #[test]
    fn range_end_rules() {
        let mut state = KeeperState::new();
        for key in ["a", "ab", "abc", "b", "c"] {
            put(&mut state, key, key);
        }
        assert_eq!(keys_at(&state, "ab", b"", 0), ["ab"]);
        assert!(keys_at(&state, "zz", b"", 0).is_empty());
        assert_eq!(keys_at(&state, "a", b"b", 0), ["a", "ab", "abc"]);
        assert_eq!(keys_at(&state, "ab", b"ac", 0), ["ab", "abc"]);
        assert_eq!(keys_at(&state, "ab", b"\0", 0), ["ab", "abc", "b", "c"]);
        assert_eq!(
            keys_at(&state, "\0", b"\0", 0),
            ["a", "ab", "abc", "b", "c"]
        );
        // key >= range_end is an empty range, not a panic.
        assert!(keys_at(&state, "c", b"a", 0).is_empty());
        assert!(keys_at(&state, "b", b"b", 0).is_empty());
        // Values are returned unless keys_only.
        let result = state.range(b"b", b"", 0, 0, false, false).unwrap();
        assert_eq!(result.kvs[0].value, b"b");
        let result = state.range(b"b", b"", 0, 0, true, false).unwrap();
        assert!(result.kvs[0].value.is_empty());
    }

    #[test]
    fn limit_more_and_count() {
        let mut state = KeeperState::new();
        for key in ["k1", "k2", "k3", "k4", "k5"] {
            put(&mut state, key, "v");
        }
        let result = state.range(b"k", b"l", 0, 2, false, false).unwrap();
        assert_eq!(result.kvs.len(), 2);
        assert_eq!(result.kvs[1].key, b"k2");
        assert!(result.more);
        assert_eq!(result.count, 5);

        let result = state.range(b"k", b"l", 0, 5, false, false).unwrap();
        assert_eq!((result.kvs.len(), result.more, result.count), (5, false, 5));
        let result = state.range(b"k", b"l", 0, 0, false, false).unwrap();
        assert_eq!((result.kvs.len(), result.more, result.count), (5, false, 5));

        let result = state.range(b"k", b"l", 0, 2, false, true).unwrap();
        assert!(result.kvs.is_empty());
        assert_eq!((result.more, result.count), (false, 5));
    }

    #[test]
    fn range_at_historical_revisions() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        put(&mut state, "a", "2"); // 3
        put(&mut state, "b", "1"); // 4
        delete(&mut state, "a", ""); // 5
        let value_at = |state: &KeeperState, rev| {
            state
                .range(b"a", b"", rev, 0, false, false)
                .unwrap()
                .kvs
                .first()
                .map(|kv| (String::from_utf8(kv.value.clone()).unwrap(), kv.version))
        };
        assert_eq!(value_at(&state, 1), None);
        assert_eq!(value_at(&state, 2), Some(("1".into(), 1)));
        assert_eq!(value_at(&state, 3), Some(("2".into(), 2)));
        assert_eq!(value_at(&state, 5), None);
        assert_eq!(keys_at(&state, "\0", b"\0", 4), ["a", "b"]);
        assert_eq!(keys_at(&state, "\0", b"\0", 5), ["b"]);
        assert_eq!(keys_at(&state, "\0", b"\0", 0), ["b"]);
        assert_eq!(
            state.range(b"a", b"", 6, 0, false, false),
            Err(StoreError::FutureRevision)
        );
    }

    #[test]
    fn delete_and_recreate_resets_create_revision_and_version() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        put(&mut state, "a", "2"); // 3
        put(&mut state, "b", "1"); // 4
        let response = apply(
            &mut state,
            Command::DeleteRange(DeleteOp {
                prev_kv: true,
                ..delete_op("a", "c")
            }),
        );
        assert_eq!(response.revision, 5);
        let Ok(Reply::DeleteRange(deleted)) = response.result else {
            panic!("{response:?}")
        };
        assert_eq!(deleted.deleted, 2);
        let prev: Vec<_> = deleted
            .prev_kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.mod_revision))
            .collect();
        assert_eq!(prev, [(b"a".to_vec(), 3), (b"b".to_vec(), 4)]);
        assert!(state.is_empty());

        // Deleting nothing does not move the revision.
        let response = delete(&mut state, "a", "");
        assert_eq!(response.revision, 5);
        assert_eq!(
            response.result,
            Ok(Reply::DeleteRange(DeleteResponse::default()))
        );

        put(&mut state, "a", "3"); // 6
        let kv = get(&state, "a").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (6, 6, 1));
        assert_eq!(state.len(), 1);
    }

    #[test]
    fn empty_keys_are_rejected() {
        let mut state = KeeperState::new();
        let response = apply(&mut state, Command::Put(put_op("", "v")));
        assert_eq!(response.result, Err(StoreError::EmptyKey));
        let response = delete(&mut state, "", "\0");
        assert_eq!(response.result, Err(StoreError::EmptyKey));
        assert_eq!(state.revision(), 1);
    }

    #[test]
    fn ignore_value_and_ignore_lease() {
        let mut state = KeeperState::new();
        grant(&mut state, 7);
        let before = state.clone();
        let ignore_value = PutOp {
            ignore_value: true,
            ..put_op("a", "")
        };
        let response = apply(&mut state, Command::Put(ignore_value.clone()));
        assert_eq!(response.result, Err(StoreError::KeyNotFound));
        let ignore_lease = PutOp {
            ignore_lease: true,
            ..put_op("a", "x")
        };
        let response = apply(&mut state, Command::Put(ignore_lease.clone()));
        assert_eq!(response.result, Err(StoreError::KeyNotFound));
        assert_unchanged(&before, &state);

        let response = apply(
            &mut state,
            Command::Put(PutOp {
                ignore_value: true,
                ..put_op("a", "x")
            }),
        );
        assert_eq!(response.result, Err(StoreError::ValueProvided));
        let response = apply(
            &mut state,
            Command::Put(PutOp {
                ignore_lease: true,
                lease: 7,
                ..put_op("a", "x")
            }),
        );
        assert_eq!(response.result, Err(StoreError::LeaseProvided));

        put_with_lease(&mut state, "a", 7).result.unwrap();
        // Keeps the value, drops the lease (lease 0 given).
        apply(&mut state, Command::Put(ignore_value))
            .result
            .unwrap();
        let kv = get(&state, "a").unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.lease, kv.version),
            (&b"v"[..], 0, 2)
        );
        assert!(state.lease(7).unwrap().keys.is_empty());

        put_with_lease(&mut state, "a", 7).result.unwrap();
        // Keeps the lease, changes the value.
        apply(&mut state, Command::Put(ignore_lease))
            .result
            .unwrap();
        let kv = get(&state, "a").unwrap();
        assert_eq!(
            (kv.value.as_slice(), kv.lease, kv.version),
            (&b"x"[..], 7, 4)
        );
        assert_eq!(state.lease(7).unwrap().keys, [b"a".to_vec()]);
    }

    #[test]
    fn compact_checks_revision_and_keeps_latest_values() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        put(&mut state, "a", "2"); // 3
        put(&mut state, "b", "1"); // 4
        delete(&mut state, "b", ""); // 5
        put(&mut state, "a", "3"); // 6
        put(&mut state, "c", "1"); // 7

        let response = apply(&mut state, Command::Compact { revision: 8 });
        assert_eq!(response.result, Err(StoreError::FutureRevision));
        let response = apply(&mut state, Command::Compact { revision: 5 });
        assert_eq!(
            (response.revision, response.result),
            (7, Ok(Reply::Compact))
        );
        assert_eq!(state.compact_revision(), 5);
        for revision in [5, 4, 1] {
            let response = apply(&mut state, Command::Compact { revision });
            assert_eq!(
                response.result,
                Err(StoreError::Compacted {
                    compact_revision: 5
                })
            );
        }

        // Reads at and after the compact revision are exact.
        let at5 = state.range(b"\0", b"\0", 5, 0, false, false).unwrap();
        assert_eq!(at5.kvs.len(), 1);
        assert_eq!(
            (
                at5.kvs[0].value.as_slice(),
                at5.kvs[0].mod_revision,
                at5.kvs[0].version
            ),
            (&b"2"[..], 3, 2)
        );
        assert_eq!(keys_at(&state, "\0", b"\0", 6), ["a"]);
        assert_eq!(keys_at(&state, "\0", b"\0", 0), ["a", "c"]);
        let kv = get(&state, "a").unwrap();
        assert_eq!((kv.create_revision, kv.version), (2, 3));
        assert_eq!(
            state.range(b"a", b"", 4, 0, false, false),
            Err(StoreError::Compacted {
                compact_revision: 5
            })
        );
        // Compaction does not move the revision, and writes continue from it.
        assert_eq!(put(&mut state, "a", "4"), 8);
        apply(&mut state, Command::Compact { revision: 8 })
            .result
            .unwrap();
        assert_eq!(get(&state, "a").unwrap().version, 4);
        assert_eq!(state.len(), 2);
    }

    #[test]
    fn events_in_order_with_prev_kv() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        put(&mut state, "b", "1"); // 3
        put(&mut state, "a", "2"); // 4
        delete(&mut state, "a", ""); // 5
        put(&mut state, "other", "x"); // 6

        let events = state.events(2, b"a", b"b", 0).unwrap();
        let summary: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.kind,
                    e.kv.mod_revision,
                    e.prev_kv.as_ref().map(|p| p.value.clone()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (EventKind::Put, 2, None),
                (EventKind::Put, 4, Some(b"1".to_vec())),
                (EventKind::Delete, 5, Some(b"2".to_vec())),
            ]
        );
        // A delete event carries only key and revision.
        assert_eq!(
            events[2].kv,
            KeyValue {
                key: b"a".to_vec(),
                mod_revision: 5,
                ..KeyValue::default()
            }
        );
        assert_eq!(events[1].kv.version, 2);
        assert_eq!(events[1].kv.create_revision, 2);

        let all = state.events(1, b"\0", b"\0", 0).unwrap();
        assert_eq!(all.len(), 5);
        assert!(
            all.windows(2)
                .all(|w| w[0].kv.mod_revision < w[1].kv.mod_revision)
        );
        assert_eq!(state.events(4, b"\0", b"\0", 0).unwrap().len(), 3);
        assert_eq!(state.events(7, b"\0", b"\0", 0).unwrap(), vec![]);
        assert_eq!(state.events(0, b"\0", b"\0", 0).unwrap(), vec![]);
        assert_eq!(state.events(3, b"b", b"", 0).unwrap().len(), 1);
        // Limits cut between revisions.
        let limited = state.events(1, b"\0", b"\0", 2).unwrap();
        assert_eq!(limited.len(), 2);
        assert_eq!(limited[1].kv.mod_revision, 3);
    }

    #[test]
    fn events_of_one_revision_share_it_in_op_order() {
        let mut state = KeeperState::new();
        put(&mut state, "x", "0"); // 2
        let txn = TxnOp {
            success: vec![
                Op::Put(put_op("b", "1")),
                Op::Put(put_op("a", "1")),
                Op::DeleteRange(delete_op("x", "")),
            ],
            ..TxnOp::default()
        };
        let response = apply(&mut state, Command::Txn(txn));
        assert_eq!(response.revision, 3);
        let events = state.events(3, b"\0", b"\0", 0).unwrap();
        let summary: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
            .collect();
        assert_eq!(
            summary,
            [
                (EventKind::Put, b"b".to_vec(), 3),
                (EventKind::Put, b"a".to_vec(), 3),
                (EventKind::Delete, b"x".to_vec(), 3),
            ]
        );
        assert_eq!(events[2].prev_kv.as_ref().unwrap().value, b"0");
        // A limit of 1 still returns the whole revision.
        assert_eq!(state.events(3, b"\0", b"\0", 1).unwrap().len(), 3);
    }

    #[test]
    fn events_before_compaction_are_gone() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        put(&mut state, "a", "2"); // 3
        delete(&mut state, "a", ""); // 4
        put(&mut state, "a", "3"); // 5
        apply(&mut state, Command::Compact { revision: 4 })
            .result
            .unwrap();
        assert_eq!(
            state.events(3, b"a", b"", 0),
            Err(StoreError::Compacted {
                compact_revision: 4
            })
        );
        // Watching from the compact revision itself works, prev_kv included.
        let events = state.events(4, b"a", b"", 0).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, EventKind::Delete);
        assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b"2");
        assert_eq!(events[1].kind, EventKind::Put);
        assert_eq!(events[1].prev_kv, None);
        assert_eq!((events[1].kv.create_revision, events[1].kv.version), (5, 1));
    }

    /// A state with every kind of content: history, tombstones, compaction, leases.
    fn busy_state() -> KeeperState {
        let mut state = KeeperState::new();
        for i in 0..50 {
            put(&mut state, &format!("k{:02}", i % 17), &format!("v{i}"));
        }
        delete(&mut state, "k03", "k05");
        grant(&mut state, 1);
        grant(&mut state, 2);
        put_with_lease(&mut state, "leased/a", 1).result.unwrap();
        put_with_lease(&mut state, "leased/b", 2).result.unwrap();
        apply(&mut state, Command::Compact { revision: 30 })
            .result
            .unwrap();
        apply(
            &mut state,
            Command::Txn(TxnOp {
                success: vec![
                    Op::Put(put_op("t1", "x")),
                    Op::DeleteRange(delete_op("k10", "")),
                ],
                ..TxnOp::default()
            }),
        )
        .result
        .unwrap();
        apply(&mut state, Command::LeaseRevoke { id: 2 })
            .result
            .unwrap();
        state
    }

    #[test]
    fn a_snapshot_is_the_versioned_encoding_of_the_state() {
        let state = busy_state();
        let plain = bincode::serde::encode_to_vec(
            SnapshotRef {
                format: SNAPSHOT_FORMAT,
                state: &state,
            },
            bincode::config::standard(),
        )
        .unwrap();
        assert_eq!(state.snapshot(), plain);
    }

    #[test]
    fn frozen_copy_ignores_later_writes() {
        // Snapshots encode a frozen copy while applies go on: the copy must not see them.
        let mut state = busy_state();
        let frozen = state.freeze();
        let expected = state.clone();
        put(&mut state, "after/freeze", "x");
        put(&mut state, "a", "changed after freeze");
        let mut restored = KeeperState::new();
        let mut bytes = Vec::new();
        KeeperState::write_frozen(frozen, &mut bytes).unwrap();
        restored.restore(&bytes).unwrap();
        assert_eq!(restored, expected);
        assert_ne!(restored.hash(), state.hash());
    }

    #[test]
    fn snapshot_restore_round_trip() {
        let state = busy_state();
        let bytes = state.snapshot();
        let mut restored = KeeperState::new();
        put(&mut restored, "junk", "to be replaced");
        restored.restore(&bytes).unwrap();
        assert_eq!(restored, state);
        assert_eq!(restored.hash(), state.hash());
        assert_eq!(restored.revision(), state.revision());
        assert_eq!(restored.compact_revision(), 30);
        assert_eq!(restored.applied_index(), state.applied_index());
        assert_eq!(restored.leases(), state.leases());
        assert_eq!(
            restored.events(30, b"\0", b"\0", 0).unwrap(),
            state.events(30, b"\0", b"\0", 0).unwrap()
        );
        assert_eq!(
            restored.range(b"\0", b"\0", 31, 0, false, false),
            state.range(b"\0", b"\0", 31, 0, false, false)
        );
        assert_eq!(restored.snapshot(), bytes);

        // Both continue identically.
        let mut original = state;
        assert_eq!(put(&mut original, "n", "1"), put(&mut restored, "n", "1"));
        assert_eq!(original, restored);
    }

    #[test]
    fn member_ids_are_never_issued_twice() {
        let mut state = KeeperState::new();
        let issue =
            |state: &mut KeeperState, above| match apply(state, Command::IssueMemberId { above })
                .result
            {
                Ok(Reply::MemberId { id }) => id,
                other => panic!("unexpected {other:?}"),
            };
        // Founders 1..=3: the first joiner is 4.
        assert_eq!(issue(&mut state, 3), 4);
        // Member 4 was removed, so the proposer's highest member is 3 again: still not 4.
        assert_eq!(issue(&mut state, 3), 5);
        // A membership that grew outside this counter (founders 1..=9) is respected.
        assert_eq!(issue(&mut state, 9), 10);
        let revision = state.revision();
        assert_eq!(revision, 1, "issuing an id changes no key");
        // The counter survives a snapshot.
        let mut restored = KeeperState::new();
        restored.restore(&state.snapshot()).unwrap();
        assert_eq!(issue(&mut restored, 3), 11);
    }

    #[test]
    fn a_format_1_snapshot_still_restores() {
        #[derive(Serialize)]
        struct StateV1<'a> {
            mvcc: &'a Mvcc,
            leases: &'a LeaseTable,
            applied_index: u64,
        }
        let state = busy_state();
        let v1 = SnapshotRef {
            format: 1,
            state: &StateV1 {
                mvcc: &state.mvcc,
                leases: &state.leases,
                applied_index: state.applied_index,
            },
        };
        let bytes = bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap();
        let mut restored = KeeperState::new();
        restored.restore(&bytes).unwrap();
        assert_eq!(restored, state);
        let mut future = bytes.clone();
        future[0] = 9;
        let err = restored.restore(&future).unwrap_err();
        assert!(err.contains("format 9"), "{err}");
    }

    #[test]
    fn restore_rejects_garbage_and_keeps_state() {
        let mut state = busy_state();
        let before = state.clone();
        assert!(state.restore(b"not a snapshot").is_err());
        let mut bytes = before.snapshot();
        bytes.push(0);
        assert!(state.restore(&bytes).is_err());
        bytes.truncate(bytes.len() / 2);
        assert!(state.restore(&bytes).is_err());
        assert_eq!(state, before);
    }

    /// A deterministic mix of every command, some of which fail.
    fn scripted_commands(seed: u64, n: usize) -> Vec<Command> {
        let mut x = seed;
        let mut next = move |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        (0..n)
            .map(|i| {
                let key = format!("k{}", next(20));
                match next(10) {
                    0..=3 => Command::Put(PutOp {
                        lease: if next(4) == 0 { next(4) as i64 } else { 0 },
                        prev_kv: next(2) == 0,
                        ..put_op(&key, &format!("v{i}"))
                    }),
                    4 => Command::DeleteRange(delete_op(&key, &format!("k{}", next(20)))),
                    5 => Command::Txn(TxnOp {
                        compares: vec![Compare {
                            key: key.clone().into(),
                            range_end: vec![],
                            target: CompareTarget::Version(next(3) as i64),
                            result: CompareResult::Greater,
                        }],
                        success: vec![
                            Op::Put(put_op(&key, "s")),
                            Op::Range(RangeOp {
                                key: key.clone().into(),
                                ..RangeOp::default()
                            }),
                        ],
                        failure: vec![Op::DeleteRange(delete_op("k1", "k2"))],
                    }),
                    6 => Command::LeaseGrant {
                        id: next(4) as i64,
                        ttl: 5,
                    },
                    7 => Command::LeaseExpire {
                        ids: vec![next(4) as i64, next(4) as i64],
                    },
                    8 => Command::LeaseRevoke { id: next(4) as i64 },
                    _ => Command::Compact {
                        revision: i as i64 / 2,
                    },
                }
            })
            .collect()
    }

    #[test]
    fn same_commands_give_same_state() {
        let commands = scripted_commands(42, 2000);
        let mut a = KeeperState::new();
        let mut b = KeeperState::new();
        let mut responses_a = Vec::new();
        for (i, command) in commands.iter().enumerate() {
            responses_a.push(a.apply(i as u64 + 1, command.clone()));
            let response_b = b.apply(i as u64 + 1, command.clone());
            assert_eq!(responses_a[i], response_b);
        }
        assert!(responses_a.iter().any(|r| r.result.is_err()));
        assert!(a.revision() > 100);
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.snapshot(), b.snapshot());

        let mut c = KeeperState::new();
        for (i, command) in scripted_commands(43, 2000).into_iter().enumerate() {
            c.apply(i as u64 + 1, command);
        }
        assert_ne!(a.hash(), c.hash());

        // The hash covers values and revision.
        let mut d = a.clone();
        put(&mut d, "k1", "changed");
        assert_ne!(a.hash(), d.hash());
    }

    #[test]
    fn lease_keys_match_live_keys_after_random_commands() {
        let mut state = KeeperState::new();
        for command in scripted_commands(7, 3000) {
            apply(&mut state, command);
            for lease in state.leases() {
                for key in &lease.keys {
                    let kv = state.range(key, b"", 0, 0, true, false).unwrap().kvs;
                    assert_eq!(kv.len(), 1, "leased key {key:?} is gone");
                    assert_eq!(kv[0].lease, lease.id);
                }
            }
            let all = state.range(b"\0", b"\0", 0, 0, true, false).unwrap();
            assert_eq!(all.count as usize, state.len());
            for kv in all.kvs.iter().filter(|kv| kv.lease != 0) {
                assert!(state.lease(kv.lease).unwrap().keys.contains(&kv.key));
            }
        }
    }
}
