//! openraft log storage on RocksDB: the vote, log entries, the committed id and purge/truncate.
//!
//! Durability rules, kept here and nowhere else:
//! - `save_vote` writes the vote and fsyncs the WAL before it returns: a node must never vote
//!   twice in one term, even across a crash.
//! - `append` writes the entries to RocksDB (memtable + WAL buffer) before returning, so they are
//!   readable at once, and reports them flushed only after a WAL fsync that covers them. The fsync
//!   runs on one flusher thread that takes every append queued since its last fsync: concurrent
//!   client writes share one fsync (group commit) instead of paying one each.
//! - `truncate_after` and `purge` are not fsynced: openraft tolerates losing them, and the WAL
//!   keeps their order relative to later writes.
//! - `save_committed` only notes the committed id; it is written in the same batch as the next
//!   append (and when the store closes). openraft allows a stored committed id that lags: a
//!   restarted node applies up to it and learns the rest from the leader. A RocksDB write of its
//!   own on every commit cost 2-3% of a node's CPU under load. Because it lags, a restarted
//!   leader must not restore its leadership (`enable_leader_restore` is off in node.rs): it
//!   would answer ReadIndex with the lagging id.
//!
//! Recently appended entries are also kept in memory ([`RecentEntries`]): the state machine reads
//! every committed entry back to apply it, and the leader reads every entry to replicate it, just
//! after appending it. Served from memory, that is a clone instead of a RocksDB iterator and a
//! decode per entry.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::entry::RaftEntry;
use openraft::storage::RaftLogStorage;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::WriteBatch;

use crate::db::CF_LOGS;
use crate::db::CF_META;
use crate::types::Entry;
use crate::types::IoFlushed;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;
use crate::types::decode;
use crate::types::encode;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// At most this many recently appended entries are kept in memory...
const RECENT_MAX_ENTRIES: usize = 8192;
/// ...and at most this many bytes of their commands (a command may be up to a few MiB).
const RECENT_MAX_BYTES: usize = 32 << 20;

/// The Raft log of one node. Cheap to clone: clones share the database, the flusher and the
/// in-memory tail.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// Appends waiting for the group-commit fsync; shared by all clones.
    flusher: Arc<Flusher>,
    recent: Arc<Mutex<RecentEntries>>,
    purges: Purges,
}

/// How many times the log was purged; shared with the code that proposes writes.
///
/// openraft answers a pending write whose entry a purge removed with "forward to leader", the
/// answer it gives a write it never accepted. That happens on a former leader that installs a
/// snapshot while its own proposals wait: the snapshot may well contain them (the new leader
/// committed them), so such a write may have been applied. openraft purges the log before it
/// answers those writes, so a "not leader" that arrives after the count moved may be one of
/// them, and must not be retried on the new leader (it could apply twice). See
/// [`crate::node::write_many`].
#[derive(Clone, Default)]
pub(crate) struct Purges(Arc<AtomicU64>);

impl Purges {
    pub(crate) fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn record(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The newest entries of the log, contiguous by index, as appended (the log's tail in memory).
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index())
    }

    fn push(&mut self, entry: Entry) {
        // Entries follow the tail, or openraft truncated first; anything else starts afresh.
        let follows = match self.entries.back() {
            None => true,
            Some(last) => last.index() + 1 == entry.index(),
        };
        if !follows {
            self.entries.clear();
            self.bytes = 0;
        }
        self.bytes += command_bytes(&entry);
        self.entries.push_back(entry);
        while self.entries.len() > RECENT_MAX_ENTRIES || self.bytes > RECENT_MAX_BYTES {
            self.pop_front();
        }
    }

    /// Drops entries after `index` (all of them for `None`).
    fn truncate_after(&mut self, index: Option<u64>) {
        while let Some(last) = self.entries.back() {
            if index.is_some_and(|i| last.index() <= i) {
                break;
            }
            let old = self.entries.pop_back().expect("checked above");
            self.bytes -= command_bytes(&old);
        }
    }

    /// Drops entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(old) = self.entries.pop_front() {
            self.bytes -= command_bytes(&old);
        }
    }

    /// The entries in `start..end`, if memory holds every one of them that exists.
    fn get(&self, start: u64, end: Bound<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let from = (start - first) as usize;
        let to = match end {
            Bound::Included(e) => (e.saturating_add(1).saturating_sub(first)) as usize,
            Bound::Excluded(e) => e.saturating_sub(first) as usize,
            Bound::Unbounded => self.entries.len(),
        }
        .min(self.entries.len());
        if from >= to {
            return Some(Vec::new());
        }
        Some(self.entries.range(from..to).cloned().collect())
    }
}

fn command_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(c) => c.0.len(),
        _ => 0,
    }
}

/// The group-commit thread. Dropping the last handle closes the queue and joins the thread, so
/// its reference to the database is gone before the store is: a thread still inside RocksDB while
/// the process exits makes RocksDB abort ("pthread lock: Invalid argument").
///
/// It also keeps the committed id openraft last reported while it is not yet written (`Some`),
/// which the next append or the close writes.
struct Flusher {
    tx: Option<mpsc::Sender<IoFlushed>>,
    thread: Option<std::thread::JoinHandle<()>>,
    db: Arc<DB>,
    unwritten_committed: Mutex<Option<Option<LogId>>>,
}

impl Flusher {
    fn unwritten_committed(&self) -> std::sync::MutexGuard<'_, Option<Option<LogId>>> {
        self.unwritten_committed
            .lock()
            .expect("committed lock poisoned")
    }

    /// Adds the unwritten committed id, if there is one, to `batch`.
    fn write_committed_into(&self, batch: &mut WriteBatch) -> io::Result<()> {
        let mut unwritten = self.unwritten_committed();
        if let Some(committed) = *unwritten {
            let cf = self.db.cf_handle(CF_META).expect("meta column family");
            batch.put_cf(cf, KEY_COMMITTED, encode(&committed).map_err(invalid_data)?);
            *unwritten = None;
        }
        Ok(())
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let mut batch = WriteBatch::default();
        let written = self
            .write_committed_into(&mut batch)
            .and_then(|()| match batch.is_empty() {
                true => Ok(()),
                false => self.db.write(batch).map_err(io::Error::other),
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not store the committed log id on close");
        }
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        let (flush_tx, flush_rx) = mpsc::channel::<IoFlushed>();
        let flusher_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("raft-wal-flush".into())
            .spawn(move || group_commit(flusher_db, flush_rx))
            .expect("spawn WAL flusher thread");
        let flusher = Arc::new(Flusher {
            tx: Some(flush_tx),
            thread: Some(thread),
            db: db.clone(),
            unwritten_committed: Mutex::new(None),
        });
        Self {
            db,
            flusher,
            recent: Arc::default(),
            purges: Purges::default(),
        }
    }

    /// The purge count of this store (and every clone of it).
    pub(crate) fn purges(&self) -> Purges {
        self.purges.clone()
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.recent.lock().expect("recent entries lock poisoned")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        let cf = self.db.cf_handle(CF_META).expect("meta column family");
        match self.db.get_cf(cf, key).map_err(io::Error::other)? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).map_err(invalid_data),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        let cf = self.db.cf_handle(CF_META).expect("meta column family");
        let bytes = encode(value).map_err(invalid_data)?;
        self.db.put_cf(cf, key, bytes).map_err(io::Error::other)
    }
}

/// Runs on the flusher thread: one WAL fsync for every batch of appends that queued up while the
/// previous fsync ran.
fn group_commit(db: Arc<DB>, rx: mpsc::Receiver<IoFlushed>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let result = db.flush_wal(true).map_err(|e| e.to_string());
        for callback in waiting {
            callback.io_completed(result.clone().map_err(io::Error::other));
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn invalid_data(e: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        if let Some(entries) = self.recent().get(start, range.end_bound().cloned()) {
            return Ok(entries);
        }
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        let mut entries = Vec::new();
        let iter = self.db.iterator_cf(
            cf,
            IteratorMode::From(&index_key(start), Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(io::Error::other)?;
            let index =
                u64::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                    invalid_data(format!("log key of {} bytes, want 8", key.len()))
                })?);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = decode(&value).map_err(invalid_data)?;
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        let last = match self.db.iterator_cf(cf, IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, value) = item.map_err(io::Error::other)?;
                let entry: Entry = decode(&value).map_err(invalid_data)?;
                Some(entry.log_id())
            }
        };
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last_log_id = last.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        self.put_meta(KEY_VOTE, vote)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush_wal(true).map_err(io::Error::other))
            .await
            .map_err(io::Error::other)?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        *self.flusher.unwritten_committed() = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let unwritten = *self.flusher.unwritten_committed();
        if let Some(committed) = unwritten {
            return Ok(committed);
        }
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IoFlushed) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        let mut batch = WriteBatch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = encode(&entry).map_err(invalid_data)?;
            batch.put_cf(cf, index_key(entry.index()), bytes);
            appended.push(entry);
        }
        self.flusher.write_committed_into(&mut batch)?;
        // Written before returning so the entries are readable at once; durable only after the
        // flusher's fsync, which is when openraft learns about it through `callback`.
        self.db.write(batch).map_err(io::Error::other)?;
        {
            let mut recent = self.recent();
            for entry in appended {
                recent.push(entry);
            }
        }
        let tx = self
            .flusher
            .tx
            .as_ref()
            .expect("sender lives until the flusher drops");
        tx.send(callback)
            .map_err(|_| io::Error::other("WAL flusher thread has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        self.recent()
            .truncate_after(last_log_id.map(|id| id.index()));
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        self.db
            .delete_range_cf(cf, index_key(from), index_key(u64::MAX))
            .map_err(io::Error::other)?;
        // delete_range excludes its end key.
        self.db
            .delete_cf(cf, index_key(u64::MAX))
            .map_err(io::Error::other)
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // Counted first: whatever openraft answers after this purge sees the new count.
        self.purges.record();
        // The purge marker goes first: openraft ignores logs at or below it, so a crash between
        // the two writes leaves only ignorable garbage.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.recent().purge(log_id.index());
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        self.db
            .delete_range_cf(cf, index_key(0), index_key(log_id.index() + 1))
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::log_id;
    use openraft::type_config::TypeConfigExt;

    use super::*;
    use crate::types::Command;

    fn entry(index: u64, bytes: usize) -> Entry {
        Entry::new_normal(log_id::<TypeConfig>(1, 1, index), Command(vec![7; bytes]))
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.index()).collect()
    }

    #[tokio::test]
    async fn purges_are_counted_across_clones() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut store = LogStore::new(crate::db::open(dir.path()).unwrap());
        let purges = store.purges();
        let clone = store.clone();
        assert_eq!(purges.count(), 0);
        store.purge(log_id::<TypeConfig>(1, 1, 3)).await.unwrap();
        assert_eq!(purges.count(), 1);
        assert_eq!(clone.purges().count(), 1);
    }

    #[test]
    fn recent_entries_serve_only_ranges_they_hold_whole() {
        let mut recent = RecentEntries::default();
        for i in 5..10 {
            recent.push(entry(i, 10));
        }
        let got = recent.get(6, Bound::Included(8)).expect("held");
        assert_eq!(indexes(&got), [6, 7, 8]);
        let got = recent.get(7, Bound::Unbounded).expect("held");
        assert_eq!(indexes(&got), [7, 8, 9]);
        // Past the tail there is nothing to read, in memory or on disk.
        assert!(
            recent
                .get(12, Bound::Excluded(20))
                .expect("held")
                .is_empty()
        );
        // Before the first held entry: the caller must read RocksDB.
        assert!(recent.get(4, Bound::Excluded(7)).is_none());

        recent.truncate_after(Some(7));
        assert_eq!(
            indexes(&recent.get(5, Bound::Unbounded).unwrap()),
            [5, 6, 7]
        );
        recent.purge(5);
        assert_eq!(recent.first_index(), Some(6));
        assert_eq!(recent.bytes, 20);
        // An entry that does not follow the tail (a gap) starts the tail afresh.
        recent.push(entry(30, 10));
        assert_eq!(recent.first_index(), Some(30));
        assert_eq!(recent.bytes, 10);
        recent.truncate_after(None);
        assert_eq!(recent.first_index(), None);
        assert_eq!(recent.bytes, 0);
    }

    #[test]
    fn recent_entries_evict_the_oldest_past_the_byte_bound() {
        let mut recent = RecentEntries::default();
        let big = RECENT_MAX_BYTES / 4;
        for i in 1..=5 {
            recent.push(entry(i, big));
        }
        assert_eq!(recent.first_index(), Some(2));
        assert_eq!(recent.bytes, 4 * big);
        for i in 6..(6 + RECENT_MAX_ENTRIES as u64) {
            recent.push(entry(i, 0));
        }
        assert_eq!(recent.entries.len(), RECENT_MAX_ENTRIES);
        assert_eq!(recent.bytes, 0);
    }

    /// The tail in memory and RocksDB give the same answers, including for ranges that start
    /// before the tail, and the committed id noted without a write survives a close.
    #[tokio::test]
    async fn reads_match_rocksdb_and_the_committed_id_survives_a_close() {
        let dir = tempfile::TempDir::new().unwrap();
        let committed = Some(log_id::<TypeConfig>(1, 1, 40));
        {
            let mut store = LogStore::new(crate::db::open(dir.path()).unwrap());
            for chunk in (1..=RECENT_MAX_ENTRIES as u64 + 100)
                .collect::<Vec<_>>()
                .chunks(500)
            {
                let entries: Vec<Entry> = chunk.iter().map(|i| entry(*i, 3)).collect();
                let (tx, flushed) = TypeConfig::oneshot();
                store.append(entries, IoFlushed::signal(tx)).await.unwrap();
                flushed.await.unwrap().unwrap();
            }
            // Held in memory: the newest entries. Not held: the first 100.
            let tail = store.try_get_log_entries(8000..8010).await.unwrap();
            assert_eq!(indexes(&tail), (8000..8010).collect::<Vec<_>>());
            let head = store.try_get_log_entries(95..105).await.unwrap();
            assert_eq!(indexes(&head), (95..105).collect::<Vec<_>>());
            store.save_committed(committed).await.unwrap();
            assert_eq!(store.read_committed().await.unwrap(), committed);
        }
        let mut store = LogStore::new(crate::db::open(dir.path()).unwrap());
        assert_eq!(store.read_committed().await.unwrap(), committed);
        // Nothing in memory after a restart: every read comes from RocksDB.
        let tail = store.try_get_log_entries(8000..8010).await.unwrap();
        assert_eq!(indexes(&tail), (8000..8010).collect::<Vec<_>>());
    }
}
