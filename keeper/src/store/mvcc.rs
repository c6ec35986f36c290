//! The revisioned key space: each key's history by revision, the changes made at each revision
//! (from which watch events are rebuilt), and compaction of both.
//!
//! Every write lands in a [`WriteBatch`]: all the changes of one command share the revision that
//! follows the current one, each with its own position (`sub`) so a key changed twice in one
//! transaction keeps both changes, as etcd's (main, sub) revisions do. Events are not stored:
//! a revision records which keys it changed, and the key's history holds the value before and
//! after, so values are kept once.

use std::ops::Bound;

use imbl::OrdMap;
use imbl::Vector;
use serde::{Deserialize, Serialize};

use super::command::{Result, StoreError};
use super::key::Key;

/// etcd `mvccpb.KeyValue`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// Number of puts since the key was (re)created; 1 after the first put.
    pub version: i64,
    /// 0 when the key is not attached to a lease.
    pub lease: i64,
}

/// What a watched change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// etcd `mvccpb.Event`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete, only `key` and `mod_revision` (the deletion revision) are set, as in etcd.
    pub kv: KeyValue,
    /// The key as it was just before this change, if it existed.
    pub prev_kv: Option<KeyValue>,
}

/// The answer to a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResult {
    /// In key order; empty for `count_only`; at most `limit` entries.
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// Every key that matched, ignoring `limit`.
    pub count: i64,
}

/// Start and end bounds of a [`KeyRange`], as `BTreeMap::range` takes them.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// A key range with etcd's `range_end` conventions.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRange<'a> {
    /// Empty `range_end`: exactly this key.
    Single(&'a [u8]),
    /// `range_end == [0]`: every key from this one on.
    From(&'a [u8]),
    /// `[key, range_end)`; empty when `key >= range_end`.
    Between(&'a [u8], &'a [u8]),
}

impl<'a> KeyRange<'a> {
    pub(crate) fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key),
            [0] => KeyRange::From(key),
            end => KeyRange::Between(key, end),
        }
    }

    pub(crate) fn contains(&self, k: &[u8]) -> bool {
        match *self {
            KeyRange::Single(key) => k == key,
            KeyRange::From(key) => k >= key,
            KeyRange::Between(key, end) => k >= key && k < end,
        }
    }

    /// Bounds for `BTreeMap::range`, `None` when the range is empty (the map would panic).
    fn bounds(&self) -> Option<KeyBounds<'a>> {
        match *self {
            KeyRange::Single(key) => Some((Bound::Included(key), Bound::Included(key))),
            KeyRange::From(key) => Some((Bound::Included(key), Bound::Unbounded)),
            KeyRange::Between(key, end) if key < end => {
                Some((Bound::Included(key), Bound::Excluded(end)))
            }
            KeyRange::Between(..) => None,
        }
    }
}

/// A key's state as of one change; `None` in [`Entry::live`] is a deletion (tombstone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Live {
    #[serde(with = "serde_bytes")]
    pub(crate) value: Vec<u8>,
    pub(crate) create_revision: i64,
    pub(crate) version: i64,
    pub(crate) lease: i64,
}

impl Live {
    /// A key that did not exist (or was deleted) put at `revision`: version 1. No value (a put
    /// with `ignore_value`) is an empty one.
    fn created(value: Option<Vec<u8>>, revision: i64, lease: i64) -> Self {
        Live {
            value: value.unwrap_or_default(),
            create_revision: revision,
            version: 1,
            lease,
        }
    }
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    revision: i64,
    /// Position of this change among the changes of `revision` (index into [`Change::keys`]).
    sub: u32,
    live: Option<Live>,
}

impl Entry {
    fn to_kv(&self, key: &[u8], live: &Live, keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if keys_only {
                Vec::new()
            } else {
                live.value.clone()
            },
            create_revision: live.create_revision,
            mod_revision: self.revision,
            version: live.version,
            lease: live.lease,
        }
    }

    fn live_kv(&self, key: &[u8]) -> Option<KeyValue> {
        self.live.as_ref().map(|live| self.to_kv(key, live, false))
    }
}

/// The retained changes of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct KeyHistory {
    /// Ordered by (revision, sub). Never empty while the key is in the map. After compaction at
    /// `c` it holds every change at or after `c` plus the latest change before `c` if that one
    /// is live (it is what a read at `c` sees, and the `prev_kv` of the next change).
    entries: Vec<Entry>,
}

impl KeyHistory {
    #[cfg(test)]
    fn latest(&self) -> Option<&Entry> {
        self.entries.last()
    }

    fn latest_live(&self) -> Option<(&Entry, &Live)> {
        let entry = self.entries.last()?;
        entry.live.as_ref().map(|live| (entry, live))
    }

    /// The key as a read at `revision` sees it.
    fn visible_at(&self, revision: i64) -> Option<(&Entry, &Live)> {
        // Reads at the current revision are the common case: the last entry answers them.
        let entry = match self.entries.last() {
            Some(last) if last.revision <= revision => last,
            _ => {
                let idx = self.entries.partition_point(|e| e.revision <= revision);
                self.entries.get(idx.checked_sub(1)?)?
            }
        };
        entry.live.as_ref().map(|live| (entry, live))
    }

    /// Whether [`KeyHistory::compact`] at `revision` would drop anything: two entries before
    /// `revision` (the older is unreachable), or one that is a deletion (nothing reads it).
    fn drops_at(&self, revision: i64) -> bool {
        let before = self
            .entries
            .iter()
            .take(2)
            .filter(|e| e.revision < revision)
            .count();
        before == 2 || (before == 1 && self.entries[0].live.is_none())
    }

    /// Drops what compaction at `revision` makes unreachable; false when nothing is left.
    fn compact(&mut self, revision: i64) -> bool {
        let first_kept = self.entries.partition_point(|e| e.revision < revision);
        let mut drop = first_kept;
        if first_kept > 0 && self.entries[first_kept - 1].live.is_some() {
            drop -= 1;
        }
        if drop > 0 {
            self.entries.drain(..drop);
            if self.entries.capacity() > 4 * self.entries.len().max(4) {
                self.entries.shrink_to_fit();
            }
        }
        !self.entries.is_empty()
    }
}

/// The keys changed at one revision, in the order the command changed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Change {
    revision: i64,
    keys: Vec<Vec<u8>>,
}

/// A key as a read sees it, borrowed from the store.
pub(crate) struct KvRef<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) mod_revision: i64,
    pub(crate) live: &'a Live,
}

/// The writes of one command in progress. Writes go to the key histories at once (so later
/// reads of the same command see them) and the revision moves when [`Mvcc::commit`] is called;
/// a batch must therefore only be started once the command is known to succeed.
#[must_use]
pub(crate) struct WriteBatch {
    /// The revision every change of this batch carries: current + 1.
    revision: i64,
    /// Keys changed so far, in order; the index is the change's `sub`.
    keys: Vec<Vec<u8>>,
}

impl WriteBatch {
    /// The revision a read inside the batch uses to see the batch's own writes.
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// The key of the latest change.
    pub(crate) fn last_key(&self) -> &[u8] {
        self.keys.last().map_or(&[], Vec::as_slice)
    }
}

/// What a put replaced, for the response and for lease bookkeeping.
pub(crate) struct PutOutcome {
    pub(crate) prev_kv: Option<KeyValue>,
    /// 0 if the key did not exist or had no lease.
    pub(crate) prev_lease: i64,
    pub(crate) lease: i64,
}

/// What a delete removed.
#[derive(Default)]
pub(crate) struct DeleteOutcome {
    pub(crate) deleted: i64,
    /// Filled only when asked.
    pub(crate) prev_kvs: Vec<KeyValue>,
    /// (lease, key) for each deleted key that was attached to a lease.
    pub(crate) detached: Vec<(i64, Vec<u8>)>,
}

/// The revisioned key-value store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mvcc {
    /// Every key with a retained change, live or deleted. A persistent map, so that a snapshot
    /// can take a copy in O(1) while applies wait and encode it after they resume.
    keys: OrdMap<Key, KeyHistory>,
    /// One element per revision in `max(compact_revision, 2)..=revision`, ascending: every
    /// revision after the initial one was made by exactly one command that changed something.
    changes: Vector<Change>,
    /// Starts at 1 (an empty store), as in etcd.
    revision: i64,
    /// Oldest revision still readable; 0 until the first compaction.
    compact_revision: i64,
    /// Keys whose latest change is a put; kept so `len` is O(1).
    live_keys: usize,
}

impl Default for Mvcc {
    fn default() -> Self {
        Mvcc {
            keys: OrdMap::new(),
            changes: Vector::new(),
            revision: 1,
            compact_revision: 0,
            live_keys: 0,
        }
    }
}

impl Mvcc {
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    pub(crate) fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    pub(crate) fn len(&self) -> usize {
        self.live_keys
    }

    /// Checks a requested read revision and turns 0 (or negative) into the current one.
    pub(crate) fn read_revision(&self, revision: i64) -> Result<i64> {
        if revision <= 0 {
            Ok(self.revision)
        } else if revision > self.revision {
            Err(StoreError::FutureRevision)
        } else if revision < self.compact_revision {
            Err(StoreError::Compacted {
                compact_revision: self.compact_revision,
            })
        } else {
            Ok(revision)
        }
    }

    /// Live keys of `range` as of `revision` (already checked), in key order.
    pub(crate) fn iter_at<'s>(
        &'s self,
        range: KeyRange<'_>,
        revision: i64,
    ) -> impl Iterator<Item = KvRef<'s>> + use<'s> {
        // The map's range iterator does not borrow the bounds, so neither does the result.
        let keys = range.bounds().map(|b| self.keys.range::<_, [u8]>(b));
        keys.into_iter()
            .flatten()
            .filter_map(move |(key, history)| {
                history.visible_at(revision).map(|(entry, live)| KvRef {
                    key: key.as_bytes(),
                    mod_revision: entry.revision,
                    live,
                })
            })
    }

    /// A range read at `revision` (already checked).
    pub(crate) fn range_at(
        &self,
        range: KeyRange<'_>,
        revision: i64,
        limit: i64,
        keys_only: bool,
        count_only: bool,
    ) -> RangeResult {
        let cap = if limit > 0 {
            usize::try_from(limit).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        let mut result = RangeResult::default();
        for kv in self.iter_at(range, revision) {
            result.count += 1;
            if !count_only && result.kvs.len() < cap {
                result.kvs.push(KeyValue {
                    key: kv.key.to_vec(),
                    value: if keys_only {
                        Vec::new()
                    } else {
                        kv.live.value.clone()
                    },
                    create_revision: kv.live.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.live.version,
                    lease: kv.live.lease,
                });
            }
        }
        result.more = !count_only && limit > 0 && result.count > limit;
        result
    }

    /// Whether `key` currently exists.
    pub(crate) fn exists(&self, key: &[u8]) -> bool {
        self.keys
            .get(key)
            .is_some_and(|h| h.latest_live().is_some())
    }

    pub(crate) fn begin(&self) -> WriteBatch {
        WriteBatch {
            revision: self.revision + 1,
            keys: Vec::new(),
        }
    }

    /// Puts `key`. `value: None` keeps the current value and `lease: None` the current lease
    /// (the caller has checked the key exists; if not, they read as empty and 0).
    pub(crate) fn put(
        &mut self,
        batch: &mut WriteBatch,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        lease: Option<i64>,
        want_prev: bool,
    ) -> PutOutcome {
        let sub = batch_sub(batch);
        let revision = batch.revision;
        // One map traversal for a key that exists, two (a miss, then the insert) for a new one:
        // the map's entry API walks the tree three times. Searching by `Key` rather than by
        // bytes lets each step compare the inline heads first (see key.rs).
        let key = Key::new(key);
        let outcome = match self.keys.get_mut(&key) {
            Some(history) => {
                let prev = history.latest_live();
                let prev_kv = match prev {
                    Some((entry, live)) if want_prev => {
                        Some(entry.to_kv(key.as_bytes(), live, false))
                    }
                    _ => None,
                };
                let prev_lease = prev.map_or(0, |(_, live)| live.lease);
                let lease = lease.unwrap_or(prev_lease);
                let live = match prev {
                    Some((_, p)) => Live {
                        value: value.unwrap_or_else(|| p.value.clone()),
                        create_revision: p.create_revision,
                        version: p.version + 1,
                        lease,
                    },
                    // The key's latest change deleted it: it lives again from here.
                    None => {
                        self.live_keys += 1;
                        Live::created(value, revision, lease)
                    }
                };
                history.entries.push(Entry {
                    revision,
                    sub,
                    live: Some(live),
                });
                PutOutcome {
                    prev_kv,
                    prev_lease,
                    lease,
                }
            }
            None => {
                self.live_keys += 1;
                let lease = lease.unwrap_or(0);
                let history = KeyHistory {
                    entries: vec![Entry {
                        revision,
                        sub,
                        live: Some(Live::created(value, revision, lease)),
                    }],
                };
                self.keys.insert(key.clone(), history);
                PutOutcome {
                    prev_kv: None,
                    prev_lease: 0,
                    lease,
                }
            }
        };
        batch.keys.push(key.into_bytes());
        outcome
    }

    /// Deletes every live key in `range`.
    pub(crate) fn delete_range(
        &mut self,
        batch: &mut WriteBatch,
        range: KeyRange<'_>,
        want_prev: bool,
    ) -> DeleteOutcome {
        let mut out = DeleteOutcome::default();
        let Some(bounds) = range.bounds() else {
            return out;
        };
        // The persistent map has no range_mut: find the live keys first, then change each.
        let targets: Vec<Vec<u8>> = self
            .keys
            .range::<_, [u8]>(bounds)
            .filter(|(_, history)| history.latest_live().is_some())
            .map(|(key, _)| key.as_bytes().to_vec())
            .collect();
        for key in targets {
            let Some(history) = self.keys.get_mut(&key[..]) else {
                continue;
            };
            let Some((entry, live)) = history.latest_live() else {
                continue;
            };
            if want_prev {
                out.prev_kvs.push(entry.to_kv(&key, live, false));
            }
            if live.lease != 0 {
                out.detached.push((live.lease, key.clone()));
            }
            let sub = batch_sub(batch);
            batch.keys.push(key.clone());
            history.entries.push(Entry {
                revision: batch.revision,
                sub,
                live: None,
            });
            out.deleted += 1;
            self.live_keys -= 1;
        }
        out
    }

    /// Ends a batch; the revision moves iff it changed something. Returns whether it did.
    pub(crate) fn commit(&mut self, batch: WriteBatch) -> bool {
        if batch.keys.is_empty() {
            return false;
        }
        self.revision = batch.revision;
        self.changes.push_back(Change {
            revision: batch.revision,
            keys: batch.keys,
        });
        true
    }

    /// Forgets history before `revision`; reads and events from `revision` on stay exact.
    pub(crate) fn compact(&mut self, revision: i64) -> Result<()> {
        if revision > self.revision {
            return Err(StoreError::FutureRevision);
        }
        if revision <= self.compact_revision {
            return Err(StoreError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        // Only keys changed at a dropped revision can have something to drop: every older entry
        // was already kept by an earlier compaction as the latest live one, and stays so unless
        // the key changed again, which puts it in a dropped change now. So compaction costs the
        // changes it drops, not the size of the key space (it runs under the apply lock). Most
        // of those keys hold one live entry, which stays: a lookup tells, and only a history
        // with something to drop is taken for writing (which copies the map's path to it while
        // a snapshot shares the map). A key in several dropped changes is compacted at the
        // first and found with nothing to drop at the others.
        while self
            .changes
            .front()
            .is_some_and(|change| change.revision < revision)
        {
            let Some(change) = self.changes.pop_front() else {
                break;
            };
            for key in change.keys {
                // By `Key`, as a put searches: most steps compare inline heads (see key.rs).
                let key = Key::new(key);
                let drops = self
                    .keys
                    .get(&key)
                    .is_some_and(|history| history.drops_at(revision));
                if !drops {
                    continue;
                }
                let keep = self
                    .keys
                    .get_mut(&key)
                    .is_some_and(|history| history.compact(revision));
                if !keep {
                    self.keys.remove(&key);
                }
            }
        }
        self.compact_revision = revision;
        Ok(())
    }

    /// Every change with revision >= `from_revision` to a key in `range`, in (revision, order
    /// within the revision) order. `from_revision <= 0` means "from now on": nothing yet.
    /// `limit` (0 = none) is checked between revisions, so a revision is never split and a
    /// watcher can resume from the last revision it got + 1.
    pub(crate) fn events(
        &self,
        from_revision: i64,
        range: KeyRange<'_>,
        limit: usize,
    ) -> Result<Vec<Event>> {
        if from_revision <= 0 {
            return Ok(Vec::new());
        }
        if from_revision < self.compact_revision {
            return Err(StoreError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        let start = self
            .changes
            .binary_search_by(|c| {
                if c.revision < from_revision {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            })
            .unwrap_or_else(|i| i);
        let mut events = Vec::new();
        for i in start..self.changes.len() {
            let change = &self.changes[i];
            if limit > 0 && events.len() >= limit {
                break;
            }
            for (sub, key) in change.keys.iter().enumerate() {
                if range.contains(key) {
                    events.extend(self.event(key, change.revision, sub));
                }
            }
        }
        Ok(events)
    }

    /// Rebuilds the event of the `sub`-th change of `revision`, which changed `key`.
    fn event(&self, key: &[u8], revision: i64, sub: usize) -> Option<Event> {
        let history = self.keys.get(key)?;
        let idx = history
            .entries
            .binary_search_by(|e| (e.revision, e.sub as usize).cmp(&(revision, sub)))
            .ok()?;
        let entry = &history.entries[idx];
        let prev_kv = idx
            .checked_sub(1)
            .and_then(|p| history.entries[p].live_kv(key));
        Some(match &entry.live {
            Some(live) => Event {
                kind: EventKind::Put,
                kv: entry.to_kv(key, live, false),
                prev_kv,
            },
            None => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.to_vec(),
                    mod_revision: revision,
                    ..KeyValue::default()
                },
                prev_kv,
            },
        })
    }

    /// A digest of the live key space and the revision; equal states give equal digests.
    pub(crate) fn hash(&self) -> u64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&self.revision.to_le_bytes());
        for (key, history) in &self.keys {
            let Some((entry, live)) = history.latest_live() else {
                continue;
            };
            // Lengths first so (key, value) boundaries cannot shift between different states.
            let key = key.as_bytes();
            hasher.update(&(key.len() as u64).to_le_bytes());
            hasher.update(key);
            hasher.update(&(live.value.len() as u64).to_le_bytes());
            hasher.update(&live.value);
            for n in [
                live.create_revision,
                entry.revision,
                live.version,
                live.lease,
            ] {
                hasher.update(&n.to_le_bytes());
            }
        }
        hasher.digest()
    }

    /// The latest change of `key`, for tests.
    #[cfg(test)]
    fn latest_revision(&self, key: &[u8]) -> Option<i64> {
        self.keys.get(key)?.latest().map(|e| e.revision)
    }

    #[cfg(test)]
    fn retained_entries(&self, key: &[u8]) -> usize {
        self.keys.get(key).map_or(0, |h| h.entries.len())
    }

    #[cfg(test)]
    fn retained_changes(&self) -> usize {
        self.changes.len()
    }
}

fn batch_sub(batch: &WriteBatch) -> u32 {
    // A command changing more than u32::MAX keys cannot fit in a Raft entry.
    u32::try_from(batch.keys.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Live` as encoded before its value was marked as bytes.
    #[derive(Serialize, Deserialize)]
    struct OldLive {
        value: Vec<u8>,
        create_revision: i64,
        version: i64,
        lease: i64,
    }

    #[test]
    fn values_encode_as_before_so_old_snapshots_stay_readable() {
        let config = bincode::config::standard();
        let value: Vec<u8> = (0..=255).collect();
        let new = Live {
            value: value.clone(),
            create_revision: 7,
            version: 2,
            lease: 0,
        };
        let old = OldLive {
            value: value.clone(),
            create_revision: 7,
            version: 2,
            lease: 0,
        };
        let old_bytes = bincode::serde::encode_to_vec(&old, config).unwrap();
        assert_eq!(
            bincode::serde::encode_to_vec(&new, config).unwrap(),
            old_bytes
        );
        let (back, _): (Live, usize) =
            bincode::serde::decode_from_slice(&old_bytes, config).unwrap();
        assert_eq!(back, new);
    }

    fn put(mvcc: &mut Mvcc, key: &str, value: &str) {
        let mut batch = mvcc.begin();
        let _ = mvcc.put(&mut batch, key.into(), Some(value.into()), Some(0), false);
        assert!(mvcc.commit(batch));
    }

    fn delete(mvcc: &mut Mvcc, key: &str) {
        let mut batch = mvcc.begin();
        mvcc.delete_range(&mut batch, KeyRange::Single(key.as_bytes()), false);
        mvcc.commit(batch);
    }

    #[test]
    fn key_range_follows_etcd_rules() {
        let single = KeyRange::new(b"ab", b"");
        assert!(single.contains(b"ab"));
        assert!(!single.contains(b"abc"));
        let from = KeyRange::new(b"ab", b"\0");
        assert!(from.contains(b"ab") && from.contains(b"zzz") && !from.contains(b"aa"));
        let between = KeyRange::new(b"ab", b"ac");
        assert!(between.contains(b"ab") && between.contains(b"ab\xff") && !between.contains(b"ac"));
        let inverted = KeyRange::new(b"b", b"a");
        assert!(inverted.bounds().is_none());
        assert!(!inverted.contains(b"b"));
    }

    /// Compaction the slow way: every key's history, whatever changed.
    fn compact_every_key(mvcc: &mut Mvcc, revision: i64) {
        mvcc.keys = std::mem::take(&mut mvcc.keys)
            .into_iter()
            .filter_map(|(key, mut history)| history.compact(revision).then_some((key, history)))
            .collect();
        while mvcc.changes.front().is_some_and(|c| c.revision < revision) {
            mvcc.changes.pop_front();
        }
        mvcc.compact_revision = revision;
    }

    #[test]
    fn compacting_only_changed_keys_equals_compacting_every_key() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut fast = Mvcc::default();
        let mut slow = Mvcc::default();
        for step in 0..3_000 {
            let key = format!("k{}", next(40));
            if next(4) == 0 {
                delete(&mut fast, &key);
                delete(&mut slow, &key);
            } else {
                put(&mut fast, &key, &step.to_string());
                put(&mut slow, &key, &step.to_string());
            }
            if step % 97 == 0 && fast.revision > fast.compact_revision + 5 {
                let at = fast.compact_revision.max(1) + 1 + next(5) as i64;
                fast.compact(at).unwrap();
                compact_every_key(&mut slow, at);
                assert_eq!(fast, slow, "after compacting at {at}");
            }
        }
    }

    #[test]
    fn compaction_that_drops_no_history_leaves_a_shared_map_shared() {
        let mut mvcc = Mvcc::default();
        for i in 0..1_000 {
            put(&mut mvcc, &format!("k{i}"), "v");
        }
        put(&mut mvcc, "k7", "again");
        // What a snapshot holds while the state machine goes on applying.
        let snapshot = mvcc.keys.clone();
        mvcc.compact(500).unwrap();
        assert_eq!(mvcc.retained_changes(), 503);
        // Every key changed before 500 holds one live entry, which stays: nothing was written.
        assert!(
            mvcc.keys.ptr_eq(&snapshot),
            "compaction copied the shared map"
        );
        put(&mut mvcc, "other", "v");
        mvcc.compact(1_003).unwrap();
        // "k7" lost its first value (revision 9; nothing reads it at 1 003): that took a write.
        assert!(!mvcc.keys.ptr_eq(&snapshot));
        assert_eq!(mvcc.retained_entries(b"k7"), 1);
        assert_eq!(mvcc.retained_entries(b"k8"), 1);
        assert_eq!(mvcc.len(), 1_001);
    }

    #[test]
    fn compaction_keeps_only_what_is_reachable() {
        let mut mvcc = Mvcc::default();
        put(&mut mvcc, "a", "1"); // 2
        put(&mut mvcc, "a", "2"); // 3
        put(&mut mvcc, "b", "1"); // 4
        delete(&mut mvcc, "b"); // 5
        put(&mut mvcc, "c", "1"); // 6
        delete(&mut mvcc, "c"); // 7
        put(&mut mvcc, "a", "3"); // 8
        assert_eq!(mvcc.retained_changes(), 7);

        mvcc.compact(7).unwrap();
        // "a": the live value before 7 (read at 7, prev of 8) and 8.
        assert_eq!(mvcc.retained_entries(b"a"), 2);
        // "b": deleted before 7, nothing reachable.
        assert_eq!(mvcc.retained_entries(b"b"), 0);
        // "c": the deletion at 7 (an event at 7) and the value it deleted (its prev_kv).
        assert_eq!(mvcc.retained_entries(b"c"), 2);
        assert_eq!(mvcc.retained_changes(), 2);
        assert_eq!(mvcc.latest_revision(b"a"), Some(8));

        mvcc.compact(8).unwrap();
        assert_eq!(mvcc.retained_entries(b"a"), 2);
        assert_eq!(mvcc.retained_entries(b"c"), 0);
        assert_eq!(mvcc.retained_changes(), 1);
        assert_eq!(mvcc.len(), 1);

        let events = mvcc.events(8, KeyRange::From(b"\0"), 0).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b"2");
    }

    #[test]
    fn put_keeps_creation_across_versions_in_one_batch() {
        let mut mvcc = Mvcc::default();
        let mut batch = mvcc.begin();
        let first = mvcc.put(
            &mut batch,
            b"k".to_vec(),
            Some(b"1".to_vec()),
            Some(0),
            true,
        );
        assert!(first.prev_kv.is_none());
        let second = mvcc.put(
            &mut batch,
            b"k".to_vec(),
            Some(b"2".to_vec()),
            Some(0),
            true,
        );
        let prev = second.prev_kv.unwrap();
        assert_eq!((prev.version, prev.mod_revision), (1, 2));
        assert!(mvcc.commit(batch));
        let result = mvcc.range_at(KeyRange::Single(b"k"), 2, 0, false, false);
        assert_eq!(result.kvs[0].version, 2);
        assert_eq!(result.kvs[0].create_revision, 2);
        assert_eq!(mvcc.events(2, KeyRange::Single(b"k"), 0).unwrap().len(), 2);
        // An empty batch commits nothing.
        let batch = mvcc.begin();
        assert!(!mvcc.commit(batch));
        assert_eq!(mvcc.revision(), 2);
    }
}
