//! The lease table: which leases exist, their granted TTL and the keys attached to each.
//!
//! Time is not tracked here. The leader runs the timers and proposes
//! [`Command::LeaseExpire`](super::Command::LeaseExpire), so every replica drops a lease at
//! the same log position.

use std::collections::BTreeSet;

use imbl::OrdMap;
use imbl::OrdSet;

use serde::{Deserialize, Serialize};

use super::command::{Result, StoreError};

/// A lease as the read API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub id: i64,
    /// The TTL granted, in seconds (the remaining time is known only to the leader's timers).
    pub ttl: i64,
    /// Attached keys, sorted.
    pub keys: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    ttl: i64,
    /// Exactly the live keys whose `lease` field is this lease's id; sorted so revocation
    /// deletes them in key order (as etcd does) on every replica.
    keys: OrdSet<Vec<u8>>,
}

/// All live leases by id (persistent maps: see `Mvcc::keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaseTable {
    leases: OrdMap<i64, Lease>,
}

impl LeaseTable {
    pub(crate) fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Id 0 means "no lease" in a put, so it cannot be granted (etcd answers "not found" too).
    pub(crate) fn check_grant(&self, id: i64) -> Result<()> {
        if id == 0 {
            Err(StoreError::LeaseNotFound)
        } else if self.contains(id) {
            Err(StoreError::LeaseExists)
        } else {
            Ok(())
        }
    }

    pub(crate) fn grant(&mut self, id: i64, ttl: i64) -> Result<()> {
        self.check_grant(id)?;
        self.leases.insert(
            id,
            Lease {
                ttl,
                keys: OrdSet::new(),
            },
        );
        Ok(())
    }

    /// Removes the lease and returns its keys in key order.
    pub(crate) fn remove(&mut self, id: i64) -> Option<BTreeSet<Vec<u8>>> {
        self.leases
            .remove(&id)
            .map(|lease| lease.keys.into_iter().collect())
    }

    /// Moves `key` from lease `from` to lease `to` (either may be 0 for "none").
    pub(crate) fn reattach(&mut self, key: &[u8], from: i64, to: i64) {
        if from == to {
            return;
        }
        if from != 0 {
            self.detach(from, key);
        }
        if let Some(lease) = self.leases.get_mut(&to) {
            lease.keys.insert(key.to_vec());
        }
    }

    pub(crate) fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys.remove(key);
        }
    }

    pub(crate) fn info(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.get(&id).map(|lease| to_info(id, lease))
    }

    /// Every lease, sorted by id.
    pub(crate) fn infos(&self) -> Vec<LeaseInfo> {
        self.leases
            .iter()
            .map(|(&id, lease)| to_info(id, lease))
            .collect()
    }

    /// Every lease's id and granted TTL, sorted by id, without copying attached keys.
    pub(crate) fn ttls(&self) -> Vec<(i64, i64)> {
        self.leases
            .iter()
            .map(|(&id, lease)| (id, lease.ttl))
            .collect()
    }
}

fn to_info(id: i64, lease: &Lease) -> LeaseInfo {
    LeaseInfo {
        id,
        ttl: lease.ttl,
        keys: lease.keys.iter().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_rejects_zero_and_duplicates() {
        let mut table = LeaseTable::default();
        assert_eq!(table.grant(0, 10), Err(StoreError::LeaseNotFound));
        table.grant(7, 10).unwrap();
        assert_eq!(table.grant(7, 20), Err(StoreError::LeaseExists));
        assert_eq!(table.info(7).unwrap().ttl, 10);
    }

    #[test]
    fn reattach_moves_keys_between_leases() {
        let mut table = LeaseTable::default();
        table.grant(1, 10).unwrap();
        table.grant(2, 10).unwrap();
        table.reattach(b"k", 0, 1);
        assert_eq!(table.info(1).unwrap().keys, vec![b"k".to_vec()]);
        table.reattach(b"k", 1, 2);
        assert!(table.info(1).unwrap().keys.is_empty());
        assert_eq!(table.info(2).unwrap().keys, vec![b"k".to_vec()]);
        table.reattach(b"k", 2, 0);
        assert!(table.info(2).unwrap().keys.is_empty());
        let ids: Vec<i64> = table.infos().iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(table.remove(1), Some(BTreeSet::new()));
        assert!(!table.contains(1));
    }

    mod commands {
        use crate::store::testutil::*;
        use crate::store::{Command, EventKind, KeeperState, Reply, StoreError};

        #[test]
        fn grant_twice_and_unknown_leases() {
            let mut state = KeeperState::new();
            let response = apply(&mut state, Command::LeaseGrant { id: 5, ttl: 30 });
            assert_eq!(response.result, Ok(Reply::LeaseGrant { id: 5, ttl: 30 }));
            assert_eq!(response.revision, 1, "granting does not bump the revision");
            let response = apply(&mut state, Command::LeaseGrant { id: 5, ttl: 60 });
            assert_eq!(response.result, Err(StoreError::LeaseExists));
            assert_eq!(state.lease(5).unwrap().ttl, 30);
            let response = apply(&mut state, Command::LeaseRevoke { id: 6 });
            assert_eq!(response.result, Err(StoreError::LeaseNotFound));
            assert_eq!(state.lease(6), None);
        }

        #[test]
        fn put_with_unknown_lease_is_rejected() {
            let mut state = KeeperState::new();
            put(&mut state, "a", "1");
            let before = state.clone();
            let response = put_with_lease(&mut state, "a", 9);
            assert_eq!(response.result, Err(StoreError::LeaseNotFound));
            assert_eq!(response.revision, 2);
            assert_unchanged(&before, &state);
        }

        #[test]
        fn revoke_deletes_attached_keys_in_one_revision() {
            let mut state = KeeperState::new();
            grant(&mut state, 1);
            put_with_lease(&mut state, "b", 1).result.unwrap(); // 2
            put_with_lease(&mut state, "a", 1).result.unwrap(); // 3
            put(&mut state, "c", "free"); // 4
            assert_eq!(state.lease(1).unwrap().keys, [b"a".to_vec(), b"b".to_vec()]);
            assert_eq!(state.leases().len(), 1);
            let response = apply(&mut state, Command::LeaseRevoke { id: 1 });
            assert_eq!(response.result, Ok(Reply::LeaseRevoke { deleted: 2 }));
            assert_eq!(response.revision, 5);
            assert_eq!(keys_at(&state, "\0", b"\0", 0), ["c"]);
            assert_eq!(state.lease(1), None);
            let events = state.events(5, b"\0", b"\0", 0).unwrap();
            let deleted: Vec<_> = events
                .iter()
                .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
                .collect();
            assert_eq!(
                deleted,
                [
                    (EventKind::Delete, b"a".to_vec(), 5),
                    (EventKind::Delete, b"b".to_vec(), 5)
                ]
            );

            // A lease without keys revokes without a new revision.
            grant(&mut state, 2);
            let response = apply(&mut state, Command::LeaseRevoke { id: 2 });
            assert_eq!(
                (response.revision, response.result),
                (5, Ok(Reply::LeaseRevoke { deleted: 0 }))
            );
        }

        #[test]
        fn expire_skips_unknown_ids_and_uses_one_revision() {
            let mut state = KeeperState::new();
            grant(&mut state, 1);
            grant(&mut state, 2);
            grant(&mut state, 3);
            put_with_lease(&mut state, "x1", 1).result.unwrap(); // 2
            put_with_lease(&mut state, "x2", 2).result.unwrap(); // 3
            put_with_lease(&mut state, "x3", 3).result.unwrap(); // 4
            let response = apply(
                &mut state,
                Command::LeaseExpire {
                    ids: vec![2, 99, 1, 2],
                },
            );
            assert_eq!(
                response.result,
                Ok(Reply::LeaseExpire {
                    expired: vec![2, 1]
                })
            );
            assert_eq!(response.revision, 5);
            assert_eq!(keys_at(&state, "\0", b"\0", 0), ["x3"]);
            let ids: Vec<i64> = state.leases().iter().map(|l| l.id).collect();
            assert_eq!(ids, [3]);
            let keys: Vec<_> = state
                .events(5, b"\0", b"\0", 0)
                .unwrap()
                .into_iter()
                .map(|e| e.kv.key)
                .collect();
            assert_eq!(keys, [b"x2".to_vec(), b"x1".to_vec()]);

            // Nothing left to expire: no new revision, no error.
            let response = apply(&mut state, Command::LeaseExpire { ids: vec![1, 2] });
            assert_eq!(
                (response.revision, response.result),
                (5, Ok(Reply::LeaseExpire { expired: vec![] }))
            );
        }

        #[test]
        fn keys_move_between_leases_and_leave_on_delete() {
            let mut state = KeeperState::new();
            grant(&mut state, 1);
            grant(&mut state, 2);
            put_with_lease(&mut state, "k", 1).result.unwrap();
            put_with_lease(&mut state, "k", 2).result.unwrap();
            assert!(state.lease(1).unwrap().keys.is_empty());
            assert_eq!(state.lease(2).unwrap().keys, [b"k".to_vec()]);
            assert_eq!(get(&state, "k").unwrap().lease, 2);

            // Revoking the old lease leaves the key alone.
            apply(&mut state, Command::LeaseRevoke { id: 1 })
                .result
                .unwrap();
            assert!(get(&state, "k").is_some());

            // A plain put detaches.
            put(&mut state, "k", "plain");
            assert!(state.lease(2).unwrap().keys.is_empty());
            assert_eq!(get(&state, "k").unwrap().lease, 0);

            // A delete detaches, so a later revoke does not touch the recreated key.
            put_with_lease(&mut state, "k", 2).result.unwrap();
            delete(&mut state, "k", "");
            assert!(state.lease(2).unwrap().keys.is_empty());
            put(&mut state, "k", "again");
            let revision = state.revision();
            apply(&mut state, Command::LeaseRevoke { id: 2 })
                .result
                .unwrap();
            assert_eq!(state.revision(), revision);
            assert_eq!(get(&state, "k").unwrap().value, b"again");
        }
    }
}
