//! Transactions: request validation, compare evaluation and execution of the chosen branches.
//!
//! As in etcd, a transaction runs in three steps so that a rejected one changes nothing:
//! every compare (nested ones included) is evaluated against the state before the transaction,
//! which fixes the branch taken at every level; the ops on that path are checked (leases exist,
//! read revisions are valid, `ignore_*` keys exist); only then are they executed, in order, all
//! at one new revision, each read seeing the writes made before it.

use std::collections::HashSet;

use super::KeeperState;
use super::command::{
    Compare, CompareResult, CompareTarget, DeleteOp, Op, OpResponse, PutOp, Reply, Result,
    StoreError, TxnOp, TxnResponse,
};
use super::mvcc::{KeyRange, KvRef, Mvcc, WriteBatch};

/// The request checks etcd's gRPC layer makes on a put before proposing it.
pub fn validate_put(put: &PutOp) -> Result<()> {
    if put.key.is_empty() {
        Err(StoreError::EmptyKey)
    } else if put.ignore_value && !put.value.is_empty() {
        Err(StoreError::ValueProvided)
    } else if put.ignore_lease && put.lease != 0 {
        Err(StoreError::LeaseProvided)
    } else {
        Ok(())
    }
}

/// The request checks etcd's gRPC layer makes on a delete before proposing it.
pub fn validate_delete(delete: &DeleteOp) -> Result<()> {
    if delete.key.is_empty() {
        Err(StoreError::EmptyKey)
    } else {
        Ok(())
    }
}

/// The request checks etcd's gRPC layer makes on a transaction before proposing it: no empty
/// keys anywhere, and no key put twice or both put and deleted on one path (etcd's "duplicate
/// key given in txn request"). The state machine repeats them when applying.
pub fn validate_txn(txn: &TxnOp) -> Result<()> {
    validate_ops(txn)?;
    check_intervals(&txn.success)?;
    check_intervals(&txn.failure)?;
    Ok(())
}

fn validate_ops(txn: &TxnOp) -> Result<()> {
    if txn.compares.iter().any(|c| c.key.is_empty()) {
        return Err(StoreError::EmptyKey);
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Range(range) if range.key.is_empty() => return Err(StoreError::EmptyKey),
            Op::Range(_) => {}
            Op::Put(put) => validate_put(put)?,
            Op::DeleteRange(delete) => validate_delete(delete)?,
            Op::Txn(nested) => validate_ops(nested)?,
        }
    }
    Ok(())
}

/// etcd's `checkIntervals`: returns the keys put and the ranges deleted by `ops` (nested
/// transactions included), failing on a key put twice or put inside a deleted range. The two
/// branches of a nested transaction may put the same key since only one of them runs.
///
/// A delete's range is taken literally as `[key, range_end)` (a point when `range_end` is
/// empty), as etcd does, so a from-key delete (`range_end == [0]`) conflicts with nothing.
fn check_intervals(ops: &[Op]) -> Result<(HashSet<&[u8]>, Vec<KeyRange<'_>>)> {
    let mut dels: Vec<KeyRange<'_>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::DeleteRange(d) if d.range_end.is_empty() => Some(KeyRange::Single(&d.key)),
            Op::DeleteRange(d) => Some(KeyRange::Between(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[KeyRange<'_>], key: &[u8]| dels.iter().any(|r| r.contains(key));
    let mut puts: HashSet<&[u8]> = HashSet::new();
    for op in ops {
        let Op::Txn(nested) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&nested.success)?;
        let (puts_else, dels_else) = check_intervals(&nested.failure)?;
        for &key in &puts_then {
            if puts.contains(key) || deleted(&dels, key) {
                return Err(StoreError::DuplicateKey);
            }
            puts.insert(key);
        }
        for &key in &puts_else {
            if (puts.contains(key) && !puts_then.contains(key)) || deleted(&dels, key) {
                return Err(StoreError::DuplicateKey);
            }
            puts.insert(key);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Op::Put(put) = op else { continue };
        if puts.contains(put.key.as_slice()) || deleted(&dels, &put.key) {
            return Err(StoreError::DuplicateKey);
        }
        puts.insert(&put.key);
    }
    Ok((puts, dels))
}

/// etcd's `applyCompare`: every key of the range must satisfy the compare; an empty range
/// compares as a key whose fields are all zero, except that a value compare then fails.
pub(crate) fn compare(mvcc: &Mvcc, c: &Compare) -> bool {
    let mut matched = false;
    for kv in mvcc.iter_at(KeyRange::new(&c.key, &c.range_end), mvcc.revision()) {
        matched = true;
        if !compare_kv(c, Some(&kv)) {
            return false;
        }
    }
    matched || (!matches!(c.target, CompareTarget::Value(_)) && compare_kv(c, None))
}

fn compare_kv(c: &Compare, kv: Option<&KvRef<'_>>) -> bool {
    let field = |f: fn(&KvRef<'_>) -> i64| kv.map_or(0, f);
    let ordering = match &c.target {
        CompareTarget::Version(target) => field(|kv| kv.live.version).cmp(target),
        CompareTarget::CreateRevision(target) => field(|kv| kv.live.create_revision).cmp(target),
        CompareTarget::ModRevision(target) => field(|kv| kv.mod_revision).cmp(target),
        CompareTarget::Lease(target) => field(|kv| kv.live.lease).cmp(target),
        CompareTarget::Value(target) => {
            let value: &[u8] = kv.map_or(&[], |kv| &kv.live.value);
            value.cmp(target.as_slice())
        }
    };
    match c.result {
        CompareResult::Equal => ordering.is_eq(),
        CompareResult::NotEqual => ordering.is_ne(),
        CompareResult::Greater => ordering.is_gt(),
        CompareResult::Less => ordering.is_lt(),
    }
}

/// The branch taken by `txn` and each nested transaction on the path, in depth-first order.
fn compare_path(mvcc: &Mvcc, txn: &TxnOp, path: &mut Vec<bool>) {
    let succeeded = txn.compares.iter().all(|c| compare(mvcc, c));
    path.push(succeeded);
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    for op in ops {
        if let Op::Txn(nested) = op {
            compare_path(mvcc, nested, path);
        }
    }
}

/// Walks `path` one step; a path is always as long as the walk that built it.
fn next_branch(path: &[bool], cursor: &mut usize) -> bool {
    let succeeded = path.get(*cursor).copied().unwrap_or(false);
    *cursor += 1;
    succeeded
}

impl KeeperState {
    pub(super) fn apply_txn(&mut self, txn: TxnOp) -> Result<Reply> {
        validate_txn(&txn)?;
        let mut path = Vec::new();
        compare_path(&self.mvcc, &txn, &mut path);
        self.check_path(&txn, &path, &mut 0)?;
        let mut batch = self.mvcc.begin();
        let response = self.execute(&mut batch, txn, &path, &mut 0);
        self.mvcc.commit(batch);
        Ok(Reply::Txn(response))
    }

    /// Checks, against the state before the transaction, every op that will run.
    fn check_path(&self, txn: &TxnOp, path: &[bool], cursor: &mut usize) -> Result<()> {
        let ops = if next_branch(path, cursor) {
            &txn.success
        } else {
            &txn.failure
        };
        for op in ops {
            match op {
                Op::Range(range) => {
                    self.mvcc.read_revision(range.revision)?;
                }
                Op::Put(put) => self.check_put(put)?,
                Op::DeleteRange(_) => {}
                Op::Txn(nested) => self.check_path(nested, path, cursor)?,
            }
        }
        Ok(())
    }

    /// Runs the checked path; cannot fail.
    fn execute(
        &mut self,
        batch: &mut WriteBatch,
        txn: TxnOp,
        path: &[bool],
        cursor: &mut usize,
    ) -> TxnResponse {
        let succeeded = next_branch(path, cursor);
        let ops = if succeeded { txn.success } else { txn.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                Op::Range(range) => {
                    // Revision 0 reads the batch's revision, so earlier writes are visible.
                    let revision = if range.revision > 0 {
                        range.revision
                    } else {
                        batch.revision()
                    };
                    OpResponse::Range(self.mvcc.range_at(
                        KeyRange::new(&range.key, &range.range_end),
                        revision,
                        range.limit,
                        range.keys_only,
                        range.count_only,
                    ))
                }
                Op::Put(put) => OpResponse::Put(self.put_in(batch, put)),
                Op::DeleteRange(delete) => OpResponse::DeleteRange(self.delete_in(batch, &delete)),
                Op::Txn(nested) => OpResponse::Txn(self.execute(batch, nested, path, cursor)),
            });
        }
        TxnResponse {
            succeeded,
            responses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Command, KeeperState, PutResponse, RangeOp, RangeResult};
    use super::*;

    fn cmp(key: &str, target: CompareTarget, result: CompareResult) -> Compare {
        Compare {
            key: key.into(),
            range_end: Vec::new(),
            target,
            result,
        }
    }

    fn range_op(key: &str) -> RangeOp {
        RangeOp {
            key: key.into(),
            ..RangeOp::default()
        }
    }

    fn txn(compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op>) -> TxnOp {
        TxnOp {
            compares,
            success,
            failure,
        }
    }

    fn run(state: &mut KeeperState, t: TxnOp) -> (i64, Result<TxnResponse>) {
        let response = apply(state, Command::Txn(t));
        let result = response.result.map(|reply| match reply {
            Reply::Txn(txn) => txn,
            other => panic!("{other:?}"),
        });
        (response.revision, result)
    }

    fn range_of(response: &OpResponse) -> &RangeResult {
        match response {
            OpResponse::Range(range) => range,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_if_absent_takes_each_branch() {
        let mut state = KeeperState::new();
        let create = txn(
            vec![cmp("lock", CompareTarget::Version(0), CompareResult::Equal)],
            vec![Op::Put(put_op("lock", "me"))],
            vec![Op::Range(range_op("lock"))],
        );
        let (revision, result) = run(&mut state, create.clone());
        let result = result.unwrap();
        assert!(result.succeeded);
        assert_eq!(revision, 2);
        assert_eq!(result.responses, [OpResponse::Put(PutResponse::default())]);

        let (revision, result) = run(&mut state, create);
        let result = result.unwrap();
        assert!(!result.succeeded);
        assert_eq!(revision, 2, "a txn that only reads does not bump");
        let range = range_of(&result.responses[0]);
        assert_eq!(range.kvs[0].value, b"me");
    }

    #[test]
    fn compares_on_each_target() {
        let mut state = KeeperState::new();
        grant(&mut state, 4);
        put(&mut state, "a", "m"); // 2
        put_with_lease(&mut state, "b", 4).result.unwrap(); // 3
        put(&mut state, "a", "n"); // 4
        use CompareResult::*;
        use CompareTarget::*;
        let holds = |c: Compare| compare(&state.mvcc, &c);
        assert!(holds(cmp("a", Value(b"n".to_vec()), Equal)));
        assert!(holds(cmp("a", Value(b"m".to_vec()), Greater)));
        assert!(holds(cmp("a", Value(b"z".to_vec()), Less)));
        assert!(holds(cmp("a", Value(b"m".to_vec()), NotEqual)));
        assert!(holds(cmp("a", Version(2), Equal)));
        assert!(holds(cmp("a", CreateRevision(2), Equal)));
        assert!(holds(cmp("a", ModRevision(3), Greater)));
        assert!(holds(cmp("a", Lease(0), Equal)));
        assert!(holds(cmp("b", Lease(4), Equal)));
        assert!(!holds(cmp("b", Lease(4), NotEqual)));
        // A missing key has zero fields, and a value compare on it is false whatever it asks.
        assert!(holds(cmp("zz", Version(0), Equal)));
        assert!(holds(cmp("zz", ModRevision(1), Less)));
        assert!(holds(cmp("zz", CreateRevision(0), Equal)));
        assert!(!holds(cmp("zz", Value(Vec::new()), Equal)));
        assert!(!holds(cmp("zz", Value(b"x".to_vec()), NotEqual)));
        // With a range every key must satisfy; an empty range compares as a missing key.
        let ranged = |target, result, end: &str| Compare {
            range_end: end.into(),
            ..cmp("a", target, result)
        };
        assert!(holds(ranged(Version(0), Greater, "c")));
        assert!(!holds(ranged(Version(1), Greater, "c")));
        assert!(holds(ranged(ModRevision(5), Less, "\0")));
        assert!(holds(Compare {
            key: b"x".to_vec(),
            ..ranged(Version(0), Equal, "y")
        }));
        assert!(!holds(Compare {
            key: b"x".to_vec(),
            ..ranged(Value(Vec::new()), Equal, "y")
        }));
    }

    #[test]
    fn reads_see_earlier_writes_of_the_same_txn() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "old"); // 2
        put(&mut state, "gone", "x"); // 3
        let t = txn(
            vec![],
            vec![
                Op::Range(range_op("a")),
                Op::Put(PutOp {
                    prev_kv: true,
                    ..put_op("a", "new")
                }),
                Op::Put(put_op("b", "1")),
                Op::DeleteRange(DeleteOp {
                    prev_kv: true,
                    ..delete_op("gone", "")
                }),
                Op::Range(RangeOp {
                    range_end: vec![0],
                    ..range_op("a")
                }),
                Op::Range(RangeOp {
                    revision: 3,
                    ..range_op("a")
                }),
            ],
            vec![],
        );
        let (revision, result) = run(&mut state, t);
        assert_eq!(revision, 4, "several writes, one revision");
        let responses = result.unwrap().responses;
        assert_eq!(range_of(&responses[0]).kvs[0].value, b"old");
        let OpResponse::Put(put) = &responses[1] else {
            panic!()
        };
        assert_eq!(put.prev_kv.as_ref().unwrap().value, b"old");
        let OpResponse::DeleteRange(deleted) = &responses[3] else {
            panic!()
        };
        assert_eq!(deleted.deleted, 1);
        assert_eq!(deleted.prev_kvs[0].value, b"x");
        let after = range_of(&responses[4]);
        let seen: Vec<_> = after
            .kvs
            .iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.clone(),
                    kv.mod_revision,
                    kv.version,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (b"a".to_vec(), b"new".to_vec(), 4, 2),
                (b"b".to_vec(), b"1".to_vec(), 4, 1)
            ]
        );
        assert_eq!(range_of(&responses[5]).kvs[0].value, b"old");
        assert_eq!(state.events(4, b"\0", b"\0", 0).unwrap().len(), 3);
    }

    #[test]
    fn txn_without_effective_writes_does_not_bump() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        let t = txn(
            vec![],
            vec![Op::DeleteRange(delete_op("missing", ""))],
            vec![],
        );
        let (revision, result) = run(&mut state, t);
        assert_eq!(revision, 2);
        assert!(result.unwrap().succeeded);
        let (revision, _) = run(&mut state, TxnOp::default());
        assert_eq!(revision, 2);
        assert!(state.events(3, b"\0", b"\0", 0).unwrap().is_empty());
    }

    #[test]
    fn nested_txn_compares_see_the_state_before_the_txn() {
        let mut state = KeeperState::new();
        put(&mut state, "flag", "0"); // 2
        let nested = txn(
            // Evaluated before the outer put of "flag", as etcd does.
            vec![cmp(
                "flag",
                CompareTarget::Value(b"0".to_vec()),
                CompareResult::Equal,
            )],
            vec![
                Op::Put(put_op("inner", "then")),
                Op::Range(range_op("flag")),
            ],
            vec![Op::Put(put_op("inner", "else"))],
        );
        let t = txn(
            vec![cmp("flag", CompareTarget::Version(1), CompareResult::Equal)],
            vec![Op::Put(put_op("flag", "1")), Op::Txn(nested)],
            vec![],
        );
        let (revision, result) = run(&mut state, t);
        assert_eq!(revision, 3);
        let result = result.unwrap();
        assert!(result.succeeded);
        let OpResponse::Txn(inner) = &result.responses[1] else {
            panic!("{result:?}")
        };
        assert!(inner.succeeded);
        assert_eq!(range_of(&inner.responses[1]).kvs[0].value, b"1");
        assert_eq!(get(&state, "inner").unwrap().value, b"then");
        assert_eq!(get(&state, "flag").unwrap().value, b"1");
    }

    #[test]
    fn duplicate_keys_are_rejected_without_changes() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1");
        let before = state.clone();
        let nested = |ops: Vec<Op>| Op::Txn(txn(vec![], ops, vec![]));
        let rejected = [
            vec![Op::Put(put_op("a", "1")), Op::Put(put_op("a", "2"))],
            vec![
                Op::Put(put_op("b", "1")),
                Op::DeleteRange(delete_op("a", "c")),
            ],
            vec![
                Op::DeleteRange(delete_op("b", "")),
                Op::Put(put_op("b", "1")),
            ],
            vec![
                Op::Put(put_op("a", "1")),
                nested(vec![Op::Put(put_op("a", "2"))]),
            ],
            vec![
                Op::DeleteRange(delete_op("a", "")),
                nested(vec![Op::Put(put_op("a", "2"))]),
            ],
            vec![
                nested(vec![Op::DeleteRange(delete_op("a", ""))]),
                Op::Put(put_op("a", "2")),
            ],
            vec![
                nested(vec![Op::Put(put_op("a", "1"))]),
                nested(vec![Op::Put(put_op("a", "2"))]),
            ],
        ];
        for ops in rejected {
            let (revision, result) = run(&mut state, txn(vec![], vec![], ops.clone()));
            assert_eq!(result, Err(StoreError::DuplicateKey), "{ops:?}");
            assert_eq!(revision, 2);
            assert_unchanged(&before, &state);
        }

        // Both branches of one nested txn may put the same key: only one runs.
        let either = Op::Txn(txn(
            vec![],
            vec![Op::Put(put_op("a", "then"))],
            vec![Op::Put(put_op("a", "else"))],
        ));
        assert!(validate_txn(&txn(vec![], vec![either], vec![])).is_ok());
        // So may the two top-level branches.
        let t = txn(
            vec![],
            vec![Op::Put(put_op("a", "2"))],
            vec![Op::Put(put_op("a", "3"))],
        );
        assert!(validate_txn(&t).is_ok());
        // A from-key delete does not conflict, as in etcd.
        let t = txn(
            vec![],
            vec![
                Op::DeleteRange(delete_op("a", "\0")),
                Op::Put(put_op("b", "1")),
            ],
            vec![],
        );
        assert!(validate_txn(&t).is_ok());
    }

    #[test]
    fn put_then_delete_in_sibling_txns_keeps_both_changes() {
        // etcd's check lets a key be put by one nested txn and deleted by a later one.
        let mut state = KeeperState::new();
        put(&mut state, "a", "1"); // 2
        let t = txn(
            vec![],
            vec![
                Op::Txn(txn(vec![], vec![Op::Put(put_op("a", "2"))], vec![])),
                Op::Txn(txn(
                    vec![],
                    vec![Op::DeleteRange(delete_op("a", ""))],
                    vec![],
                )),
            ],
            vec![],
        );
        let (revision, result) = run(&mut state, t);
        assert!(result.is_ok());
        assert_eq!(revision, 3);
        assert_eq!(get(&state, "a"), None);
        assert_eq!(state.len(), 0);
        let events = state.events(3, b"a", b"", 0).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b"1");
        assert_eq!(events[1].prev_kv.as_ref().unwrap().value, b"2");
        assert_eq!(keys_at(&state, "a", b"", 2), ["a"]);
    }

    #[test]
    fn failing_checks_on_the_taken_branch_reject_the_txn() {
        let mut state = KeeperState::new();
        put(&mut state, "a", "1");
        let before = state.clone();
        let leased = Op::Put(PutOp {
            lease: 77,
            ..put_op("b", "1")
        });
        // Taken branch: rejected, even though an earlier op would have succeeded.
        let t = txn(
            vec![],
            vec![Op::Put(put_op("c", "1")), leased.clone()],
            vec![],
        );
        assert_eq!(run(&mut state, t).1, Err(StoreError::LeaseNotFound));
        let nested = Op::Txn(txn(vec![], vec![leased.clone()], vec![]));
        let t = txn(vec![], vec![Op::Put(put_op("c", "1")), nested], vec![]);
        assert_eq!(run(&mut state, t).1, Err(StoreError::LeaseNotFound));
        let future = Op::Range(RangeOp {
            revision: 3,
            ..range_op("a")
        });
        let t = txn(vec![], vec![Op::Put(put_op("c", "1")), future], vec![]);
        assert_eq!(run(&mut state, t).1, Err(StoreError::FutureRevision));
        let ignore = Op::Put(PutOp {
            ignore_value: true,
            ..put_op("missing", "")
        });
        let t = txn(vec![], vec![ignore], vec![]);
        assert_eq!(run(&mut state, t).1, Err(StoreError::KeyNotFound));
        let t = txn(vec![], vec![Op::Put(put_op("", "1"))], vec![]);
        assert_eq!(run(&mut state, t).1, Err(StoreError::EmptyKey));
        assert_unchanged(&before, &state);

        // Branch not taken: its ops are not checked against the state.
        let t = txn(
            vec![cmp("a", CompareTarget::Version(1), CompareResult::Equal)],
            vec![Op::Put(put_op("c", "1"))],
            vec![leased],
        );
        let (revision, result) = run(&mut state, t);
        assert!(result.unwrap().succeeded);
        assert_eq!(revision, 3);
    }
}
