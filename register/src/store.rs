//! Sessions in RocksDB: the sessions column family (one key per session, see `keys.rs`), the
//! by_room index (a room's sessions in a slot), and a small meta record of the slot map the data
//! was valid for.
//!
//! Durability: the WAL is on but writes are not fsynced one by one; after a crash the last moments
//! of writes may be lost and the rooms' digests and syncs rebuild them (DESIGN.md §4). Callers
//! serialise writes that must not interleave (Sync vs Attach in one slot) with their own lock.

use std::collections::BTreeSet;
use std::path::Path;

use longlink_proto::registerpb::Session;
use longlink_proto::registerpb::SessionKey;
use prost::Message;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::Options;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use serde::Deserialize;
use serde::Serialize;

use crate::error::Error;
use crate::error::Result;
use crate::keys;
use longlink_common::Digest;

const CF_SESSIONS: &str = "sessions";
const CF_BY_ROOM: &str = "by_room";
const CF_META: &str = "meta";
const META_KEY: &[u8] = b"slots";

/// What the data on disk was valid for when last written: the slot-map epoch and the slots this
/// register owned and had finished rebuilding at that epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub epoch: u64,
    pub ready: Vec<u16>,
}

/// The column families that sessions are written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cf {
    Sessions,
    ByRoom,
}

/// What one write does to one key.
enum Op<'a> {
    /// Put the encoded session.
    Session(&'a Session),
    /// Put an empty value (an index entry).
    Mark,
    Delete,
}

/// The operations of one write, handed to RocksDB sorted by key: the memtable skip list keeps the
/// position of its last insert, so a batch in key order finds each next position from the previous
/// one instead of from the top of the list (random keys made the skip-list search the biggest cost
/// of an attach). Values are encoded only when the batch is built, into one reused buffer.
struct Ops<'a>(Vec<(Cf, Vec<u8>, Op<'a>)>);

impl<'a> Ops<'a> {
    fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    fn push(&mut self, cf: Cf, key: Vec<u8>, op: Op<'a>) {
        self.0.push((cf, key, op));
    }
}

/// The RocksDB session store.
pub struct Store {
    db: DB,
}

impl Store {
    /// Opens (or creates) the store under `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_enable_pipelined_write(true);
        let mut sessions = Options::default();
        sessions.set_write_buffer_size(64 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_SESSIONS, sessions),
            ColumnFamilyDescriptor::new(CF_BY_ROOM, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self { db })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        // WAL on, no fsync per write: see the module comment.
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        // Batches written concurrently go into the memtable in parallel; this keeps each batch's
        // last insert position so its sorted keys still find their places cheaply (see [`Ops`]).
        opts.set_memtable_insert_hint_per_batch(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    fn put_session<'a>(&self, batch: &mut Ops<'a>, slot: u16, s: &'a Session) {
        batch.push(
            Cf::Sessions,
            keys::session_key(slot, &s.app, &s.user, s.conn_id, &s.room_id),
            Op::Session(s),
        );
        batch.push(
            Cf::ByRoom,
            keys::room_key(slot, &s.room_id, &s.app, &s.user, s.conn_id),
            Op::Mark,
        );
    }

    fn delete_session(
        &self,
        batch: &mut Ops<'_>,
        slot: u16,
        app: &str,
        user: &str,
        conn_id: u64,
        room: &str,
    ) {
        batch.push(
            Cf::Sessions,
            keys::session_key(slot, app, user, conn_id, room),
            Op::Delete,
        );
        batch.push(
            Cf::ByRoom,
            keys::room_key(slot, room, app, user, conn_id),
            Op::Delete,
        );
    }

    /// Writes `ops` in one atomic batch, in key order (see [`Ops`]).
    fn write_ops(&self, mut ops: Ops<'_>) -> Result<()> {
        // Stable: of two operations on one key, the later one still wins.
        ops.0.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let bytes: usize = ops.0.iter().map(|(_, k, _)| k.len() + 96).sum();
        let mut batch = WriteBatch::with_capacity_bytes(bytes);
        let mut value = Vec::new();
        let (sessions, by_room) = (self.cf(CF_SESSIONS), self.cf(CF_BY_ROOM));
        for (cf, key, op) in &ops.0 {
            let cf = match cf {
                Cf::Sessions => sessions,
                Cf::ByRoom => by_room,
            };
            match op {
                Op::Session(s) => {
                    value.clear();
                    s.encode(&mut value).expect("a Vec grows as needed");
                    batch.put_cf(cf, key, &value);
                }
                Op::Mark => batch.put_cf(cf, key, []),
                Op::Delete => batch.delete_cf(cf, key),
            }
        }
        self.write(batch)
    }

    /// Stores sessions (already validated, with their slots) in one write.
    pub fn attach(&self, sessions: &[(u16, &Session)]) -> Result<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut batch = Ops::with_capacity(2 * sessions.len());
        for (slot, s) in sessions {
            self.put_session(&mut batch, *slot, s);
        }
        self.write_ops(batch)
    }

    /// Removes sessions (already validated, with their slots) in one write.
    pub fn detach(&self, sessions: &[(u16, &SessionKey)]) -> Result<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut batch = Ops::with_capacity(2 * sessions.len());
        for (slot, k) in sessions {
            self.delete_session(&mut batch, *slot, &k.app, &k.user, k.conn_id, &k.room_id);
        }
        self.write_ops(batch)
    }

    /// Every session of `(app, user)`.
    pub fn lookup(&self, slot: u16, app: &str, user: &str) -> Result<Vec<Session>> {
        let prefix = keys::user_prefix(slot, app, user);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(CF_SESSIONS),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(Session::decode(&*v).map_err(|e| Error::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// Calls `f` with every by_room entry of `room` in `slot`.
    fn for_room_entries(
        &self,
        slot: u16,
        room: &str,
        mut f: impl FnMut(keys::RoomEntry<'_>),
    ) -> Result<()> {
        let prefix = keys::room_prefix(slot, room);
        let iter = self.db.iterator_cf(
            self.cf(CF_BY_ROOM),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let e = keys::parse_room_key(&k)
                .ok_or_else(|| Error::Corrupt(format!("bad by_room key {k:?}")))?;
            f(e);
        }
        Ok(())
    }

    /// Replaces every session of `room` in `slot` with `sessions` (validated: all in `slot`, all of
    /// `room`) in one atomic write; returns how many are stored.
    pub fn sync(&self, slot: u16, room: &str, sessions: &[Session]) -> Result<u64> {
        let mut batch = Ops::with_capacity(2 * sessions.len());
        self.for_room_entries(slot, room, |e| {
            let (app, user, conn) = (e.app.to_string(), e.user.to_string(), e.conn_id);
            self.delete_session(&mut batch, slot, &app, &user, conn, room);
        })?;
        // Puts after deletes in the same batch win, so sessions that stay are rewritten.
        for s in sessions {
            self.put_session(&mut batch, slot, s);
        }
        self.write_ops(batch)?;
        Ok(sessions.len() as u64)
    }

    /// The digest of `room`'s sessions in `slot` (see `digest.rs`).
    pub fn room_digest(&self, slot: u16, room: &str) -> Result<Digest> {
        let mut d = Digest::default();
        self.for_room_entries(slot, room, |e| d.add(e.app, e.user, e.conn_id))?;
        Ok(d)
    }

    /// Deletes every session of `slot` (a slot this register lost or holds stale data for).
    pub fn drop_slot(&self, slot: u16) -> Result<()> {
        let start = keys::slot_prefix(slot).to_vec();
        let end = keys::prefix_end(&start);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_SESSIONS), &start, &end);
        batch.delete_range_cf(self.cf(CF_BY_ROOM), &start, &end);
        self.write(batch)
    }

    /// The distinct rooms with sessions in `slot` (one seek per room).
    pub fn rooms_in_slot(&self, slot: u16) -> Result<BTreeSet<String>> {
        let slot_prefix = keys::slot_prefix(slot);
        let mut rooms = BTreeSet::new();
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_BY_ROOM));
        iter.seek(slot_prefix);
        while iter.valid() {
            let Some(k) = iter.key() else { break };
            if !k.starts_with(&slot_prefix) {
                break;
            }
            let e = keys::parse_room_key(k)
                .ok_or_else(|| Error::Corrupt(format!("bad by_room key {k:?}")))?;
            let room = e.room.to_string();
            iter.seek(keys::prefix_end(&keys::room_prefix(slot, &room)));
            rooms.insert(room);
        }
        iter.status()?;
        Ok(rooms)
    }

    /// Deletes `room`'s sessions in `slot`; returns how many.
    pub fn drop_room_in_slot(&self, slot: u16, room: &str) -> Result<u64> {
        let mut batch = Ops::with_capacity(0);
        let mut n = 0;
        self.for_room_entries(slot, room, |e| {
            let (app, user, conn) = (e.app.to_string(), e.user.to_string(), e.conn_id);
            self.delete_session(&mut batch, slot, &app, &user, conn, room);
            n += 1;
        })?;
        self.write_ops(batch)?;
        Ok(n)
    }

    /// Number of sessions in `slot` (a key scan: for status pages, not the hot path).
    pub fn slot_sessions(&self, slot: u16) -> Result<u64> {
        let prefix = keys::slot_prefix(slot);
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_SESSIONS));
        iter.seek(prefix);
        let mut n = 0;
        while iter.valid() {
            match iter.key() {
                Some(k) if k.starts_with(&prefix) => n += 1,
                _ => break,
            }
            iter.next();
        }
        iter.status()?;
        Ok(n)
    }

    /// RocksDB's estimate of the number of stored sessions.
    pub fn estimate_sessions(&self) -> u64 {
        self.db
            .property_int_value_cf(self.cf(CF_SESSIONS), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    pub fn load_meta(&self) -> Result<Option<Meta>> {
        match self.db.get_cf(self.cf(CF_META), META_KEY)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("meta: {e}"))),
            None => Ok(None),
        }
    }

    /// Records what the data is valid for. Not fsynced: the WAL is one ordered log, so after a
    /// crash the surviving writes are a prefix of what was written, and a meta record that
    /// survived never describes session writes that did not.
    pub fn save_meta(&self, meta: &Meta) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            META_KEY,
            serde_json::to_vec(meta).expect("meta serialises"),
        );
        self.write(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use longlink_common::slot_of;

    fn session(app: &str, user: &str, room: &str, conn: u64) -> Session {
        Session {
            app: app.into(),
            user: user.into(),
            room_id: room.into(),
            conn_id: conn,
            device: format!("dev-{conn}"),
            ..Default::default()
        }
    }

    fn attach(store: &Store, sessions: &[Session]) {
        let with_slots: Vec<(u16, &Session)> = sessions
            .iter()
            .map(|s| (slot_of(&s.app, &s.user), s))
            .collect();
        store.attach(&with_slots).unwrap();
    }

    #[test]
    fn attach_lookup_detach() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = session("demo", "alice", "r1", 1);
        let b = session("demo", "alice", "r2", 1); // same conn id in another room: distinct
        let c = session("demo", "alicex", "r1", 2);
        attach(&store, &[a.clone(), b.clone(), c.clone()]);
        let slot = slot_of("demo", "alice");
        let mut found = store.lookup(slot, "demo", "alice").unwrap();
        found.sort_by(|x, y| x.room_id.cmp(&y.room_id));
        assert_eq!(found, vec![a.clone(), b.clone()]);
        // Attaching again is idempotent.
        attach(&store, std::slice::from_ref(&a));
        assert_eq!(store.lookup(slot, "demo", "alice").unwrap().len(), 2);

        let key = SessionKey {
            app: "demo".into(),
            user: "alice".into(),
            room_id: "r1".into(),
            conn_id: 1,
        };
        store.detach(&[(slot, &key)]).unwrap();
        assert_eq!(store.lookup(slot, "demo", "alice").unwrap(), vec![b]);
        assert_eq!(store.room_digest(slot, "r1").unwrap(), Digest::default());
    }

    #[test]
    fn sync_replaces_one_rooms_sessions_in_one_slot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Find three users of one slot.
        let slot = slot_of("demo", "u0");
        let users: Vec<String> = (0..100_000)
            .map(|i| format!("u{i}"))
            .filter(|u| slot_of("demo", u) == slot)
            .take(3)
            .collect();
        let old = session("demo", &users[0], "r1", 1);
        let kept = session("demo", &users[1], "r1", 2);
        let other_room = session("demo", &users[0], "r2", 9);
        attach(&store, &[old.clone(), kept.clone(), other_room.clone()]);
        let new = session("demo", &users[2], "r1", 3);
        assert_eq!(
            store
                .sync(slot, "r1", &[kept.clone(), new.clone()])
                .unwrap(),
            2
        );

        assert_eq!(
            store.lookup(slot, "demo", &users[0]).unwrap(),
            vec![other_room.clone()]
        );
        assert_eq!(
            store.lookup(slot, "demo", &users[1]).unwrap(),
            vec![kept.clone()]
        );
        let mut expect = Digest::default();
        expect.add("demo", &users[1], 2);
        expect.add("demo", &users[2], 3);
        assert_eq!(store.room_digest(slot, "r1").unwrap(), expect);
        let rooms = store.rooms_in_slot(slot).unwrap();
        assert_eq!(rooms.into_iter().collect::<Vec<_>>(), vec!["r1", "r2"]);

        assert_eq!(store.drop_room_in_slot(slot, "r1").unwrap(), 2);
        assert_eq!(store.slot_sessions(slot).unwrap(), 1);
        store.drop_slot(slot).unwrap();
        assert_eq!(store.slot_sessions(slot).unwrap(), 0);
        assert!(store.rooms_in_slot(slot).unwrap().is_empty());
    }

    #[test]
    fn data_and_meta_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = session("demo", "bob", "r1", 5);
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.load_meta().unwrap(), None);
            attach(&store, std::slice::from_ref(&s));
            store
                .save_meta(&Meta {
                    epoch: 7,
                    ready: vec![1, 2],
                })
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.load_meta().unwrap(),
            Some(Meta {
                epoch: 7,
                ready: vec![1, 2]
            })
        );
        assert_eq!(
            store.lookup(slot_of("demo", "bob"), "demo", "bob").unwrap(),
            vec![s]
        );
    }
}
