//! openraft log storage on RocksDB: the vote, log entries, the committed id and purge/truncate.
//!
//! Durability rules, kept here and nowhere else:
//! - `save_vote` writes the vote and fsyncs the WAL before it returns: a node must never vote
//!   twice in one term, even across a crash.
//! - `append` writes the entries to RocksDB's memtable (without RocksDB's WAL) before returning,
//!   so they are readable at once, and reports them flushed only after the log's own journal
//!   (journal.rs) holds them on disk. The journal is written and synced by one flusher thread that
//!   takes every append queued since its last sync: concurrent client writes share one write and
//!   one fsync (group commit) instead of paying one each. A restarted node replays the journal
//!   into RocksDB before anything reads the log.
//! - `truncate_after` and `purge` are journaled but not synced: openraft tolerates losing either.
//!   The journal keeps their order relative to later appends, whose sync makes them durable too.
//!   (A purge is also a RocksDB write, as the log's reads need it at once.)
//! - `save_committed` only notes the committed id; it is journaled with the next append (and
//!   when the store closes). openraft allows a stored committed id that lags: a restarted node
//!   applies up to it and learns the rest from the leader. A write of its own on every commit cost
//!   2-3% of a node's CPU under load. Because it lags, a restarted leader must not restore its
//!   leadership (`enable_leader_restore` is off in node.rs): it would answer ReadIndex with the
//!   lagging id.
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
use std::path::Path;
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
use crate::journal;
use crate::journal::Journal;
use crate::journal::Record;
use crate::journal::index_key;
use crate::types::Entry;
use crate::types::IoFlushed;
use crate::types::LogId;
use crate::types::TypeConfig;
use crate::types::Vote;
use crate::types::decode;
use crate::types::encode;

const KEY_VOTE: &[u8] = b"vote";
pub(crate) const KEY_COMMITTED: &[u8] = b"committed";
pub(crate) const KEY_LAST_PURGED: &[u8] = b"last_purged";

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

/// Work for the flusher thread: records to journal, and what to tell openraft once they are on
/// disk (nothing for a truncation or a committed id, which ride along with the next sync).
struct Job {
    records: Vec<Record>,
    flushed: Option<IoFlushed>,
}

/// The group-commit thread. Dropping the last handle closes the queue and joins the thread, so
/// its reference to the database is gone before the store is: a thread still inside RocksDB while
/// the process exits makes RocksDB abort ("pthread lock: Invalid argument").
///
/// It also keeps the committed id openraft last reported while it is not yet journaled (`Some`),
/// which the next append or the close journals.
struct Flusher {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    unwritten_committed: Mutex<Option<Option<LogId>>>,
}

impl Flusher {
    fn unwritten_committed(&self) -> std::sync::MutexGuard<'_, Option<Option<LogId>>> {
        self.unwritten_committed
            .lock()
            .expect("committed lock poisoned")
    }

    /// Adds the unjournaled committed id, if there is one, to `records`.
    fn take_committed_into(&self, records: &mut Vec<Record>) -> io::Result<()> {
        let mut unwritten = self.unwritten_committed();
        if let Some(committed) = *unwritten {
            records.push(Record::Committed(encode(&committed).map_err(invalid_data)?));
            *unwritten = None;
        }
        Ok(())
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.tx
            .as_ref()
            .expect("sender lives until the flusher drops")
            .send(job)
            .map_err(|_| io::Error::other("log flusher thread has stopped"))
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        let mut records = Vec::new();
        let sent = self
            .take_committed_into(&mut records)
            .and_then(|()| match records.is_empty() {
                true => Ok(()),
                false => self.send(Job {
                    records,
                    flushed: None,
                }),
            });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not journal the committed log id on close");
        }
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl LogStore {
    /// Opens the log of the node whose data directory is `dir`: replays its journal into `db`
    /// and starts the flusher thread.
    pub(crate) fn open(db: Arc<DB>, dir: &Path) -> io::Result<Self> {
        Self::open_with(db, dir, journal::SEGMENT_BYTES)
    }

    pub(crate) fn open_with(db: Arc<DB>, dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        let purged: Option<LogId> = get_meta(&db, KEY_LAST_PURGED)?;
        let journal = Journal::open(
            &dir.join("raft-journal"),
            db.clone(),
            purged.map(|id| id.index()),
            segment_bytes,
        )?;
        let (flush_tx, flush_rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || group_commit(journal, flush_rx))?;
        Ok(Self {
            db,
            flusher: Arc::new(Flusher {
                tx: Some(flush_tx),
                thread: Some(thread),
                unwritten_committed: Mutex::new(None),
            }),
            recent: Arc::default(),
            purges: Purges::default(),
        })
    }

    /// The purge count of this store (and every clone of it).
    pub(crate) fn purges(&self) -> Purges {
        self.purges.clone()
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.recent.lock().expect("recent entries lock poisoned")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        get_meta(&self.db, key)
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        let cf = self.db.cf_handle(CF_META).expect("meta column family");
        let bytes = encode(value).map_err(invalid_data)?;
        self.db.put_cf(cf, key, bytes).map_err(io::Error::other)
    }
}

/// Runs on the flusher thread: one journal write and fsync for every batch of appends that queued
/// up while the previous one ran.
fn group_commit(mut journal: Journal, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next {
            for record in &job.records {
                journal.push(record);
            }
            waiting.extend(job.flushed);
            next = rx.try_recv().ok();
        }
        if waiting.is_empty() {
            continue;
        }
        let result = journal.sync().map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing the raft log journal failed");
        }
        for callback in waiting {
            callback.io_completed(result.clone().map_err(io::Error::other));
        }
    }
    // Closed: what is left (a truncation, the committed id) is written before the store closes.
    if let Err(e) = journal.sync().and_then(|()| journal.close()) {
        tracing::warn!(error = %e, "closing the raft log journal failed");
    }
}

fn get_meta<T: serde::de::DeserializeOwned>(db: &DB, key: &[u8]) -> io::Result<Option<T>> {
    let cf = db.cf_handle(CF_META).expect("meta column family");
    match db.get_cf(cf, key).map_err(io::Error::other)? {
        None => Ok(None),
        Some(bytes) => decode(&bytes).map(Some).map_err(invalid_data),
    }
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
        let mut records = Vec::new();
        for entry in entries {
            let bytes = encode(&entry).map_err(invalid_data)?;
            batch.put_cf(cf, index_key(entry.index()), &bytes);
            records.push(Record::Entry {
                index: entry.index(),
                bytes,
            });
            appended.push(entry);
        }
        self.flusher.take_committed_into(&mut records)?;
        // Written to RocksDB before they are journaled: a retired journal segment's entries are
        // all in the memtable its retirement flushes (journal.rs). Readable at once; durable only
        // after the flusher's sync, which is when openraft learns about it through `callback`.
        self.db
            .write_opt(batch, &journal::without_wal())
            .map_err(io::Error::other)?;
        {
            let mut recent = self.recent();
            for entry in appended {
                recent.push(entry);
            }
        }
        self.flusher.send(Job {
            records,
            flushed: Some(callback),
        })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        self.recent()
            .truncate_after(last_log_id.map(|id| id.index()));
        let mut batch = WriteBatch::default();
        journal::delete_from(&self.db, &mut batch, from);
        self.db
            .write_opt(batch, &journal::without_wal())
            .map_err(io::Error::other)?;
        // Journaled after the RocksDB write, like an append, and before any later append.
        self.flusher.send(Job {
            records: vec![Record::TruncateFrom(from)],
            flushed: None,
        })
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // Counted first: whatever openraft answers after this purge sees the new count.
        self.purges.record();
        // The purge marker goes first: openraft ignores logs at or below it, so a crash between
        // the two writes leaves only ignorable garbage.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.recent().purge(log_id.index());
        let mut batch = WriteBatch::default();
        journal::delete_through(&self.db, &mut batch, log_id.index());
        self.db.write(batch).map_err(io::Error::other)?;
        // Journaled too, before any later append: those appends' sync then makes the purge
        // durable with them, as the entries they follow are gone (journal.rs).
        self.flusher.send(Job {
            records: vec![Record::Purge {
                index: log_id.index(),
                log_id: encode(&log_id).map_err(invalid_data)?,
            }],
            flushed: None,
        })
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
        let mut store = open_store(dir.path());
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

    fn open_store(dir: &Path) -> LogStore {
        LogStore::open(crate::db::open(dir).unwrap(), dir).unwrap()
    }

    fn entry_in_term(term: u64, index: u64) -> Entry {
        Entry::new_normal(
            log_id::<TypeConfig>(term, 1, index),
            Command(vec![term as u8; 100]),
        )
    }

    async fn append_durably(store: &mut LogStore, entries: Vec<Entry>) {
        let (tx, flushed) = TypeConfig::oneshot();
        store.append(entries, IoFlushed::signal(tx)).await.unwrap();
        flushed.await.unwrap().unwrap();
    }

    /// What a crash leaves: the files as they are while the store is open. Entries that are
    /// only in RocksDB's memtable are not in it. A file that background work (a retirement, a
    /// spare renamed into place) removes while the copy runs is left out, as if that had happened
    /// just before the crash.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for item in std::fs::read_dir(from).unwrap() {
            let item = item.unwrap();
            let target = to.join(item.file_name());
            if item.file_type().unwrap().is_dir() {
                crash_image(&item.path(), &target);
            } else {
                match std::fs::copy(item.path(), target) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    other => drop(other.unwrap()),
                }
            }
        }
    }

    /// Takes the crash image of `store`'s directory `dir` into a new directory, then closes it.
    fn crashed(store: LogStore, dir: &Path) -> tempfile::TempDir {
        let image = tempfile::TempDir::new().unwrap();
        crash_image(dir, image.path());
        drop(store);
        image
    }

    /// The journal's segments (not its spare).
    fn journal_files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("raft-journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "journal"))
            .collect();
        files.sort();
        files
    }

    /// Retirement runs in the background: waits until only the current segment is left.
    async fn wait_for_retirement(store: &mut LogStore, dir: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while journal_files(dir).len() > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "old segments were not retired: {:?}",
                journal_files(dir)
            );
            append_durably(store, Vec::new()).await;
            tokio::task::yield_now().await;
        }
    }

    async fn log_of(store: &mut LogStore) -> Vec<(u64, u64)> {
        let entries = store.try_get_log_entries(0..u64::MAX).await.unwrap();
        entries
            .iter()
            .map(|e| (e.log_id().leader_id.term, e.index()))
            .collect()
    }

    /// Entries reported durable, a truncation and the entries that replaced what it removed,
    /// and the committed id all come back from the journal after a crash, though RocksDB itself
    /// never held them on disk.
    #[tokio::test]
    async fn a_crash_loses_nothing_reported_durable() {
        let dir = tempfile::TempDir::new().unwrap();
        let committed = Some(log_id::<TypeConfig>(2, 1, 255));
        let mut store = open_store(dir.path());
        for start in (1..=300).step_by(50) {
            let batch = (start..start + 50).map(|i| entry_in_term(1, i)).collect();
            append_durably(&mut store, batch).await;
        }
        store
            .truncate_after(Some(log_id::<TypeConfig>(1, 1, 250)))
            .await
            .unwrap();
        append_durably(
            &mut store,
            (251..=260).map(|i| entry_in_term(2, i)).collect(),
        )
        .await;
        store.save_committed(committed).await.unwrap();
        append_durably(&mut store, vec![entry_in_term(2, 261)]).await;
        let crashed = crashed(store, dir.path());

        // RocksDB alone has none of it: the test would pass without the journal otherwise.
        {
            let db = crate::db::open(crashed.path()).unwrap();
            let cf = db.cf_handle(CF_LOGS).unwrap();
            assert!(db.iterator_cf(cf, IteratorMode::Start).next().is_none());
        }
        let mut store = open_store(crashed.path());
        let mut want: Vec<(u64, u64)> = (1..=250).map(|i| (1, i)).collect();
        want.extend((251..=261).map(|i| (2, i)));
        assert_eq!(log_of(&mut store).await, want);
        assert_eq!(store.read_committed().await.unwrap(), committed);
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id::<TypeConfig>(2, 1, 261)));
        // The replay left one fresh segment; the replayed ones are gone.
        assert_eq!(journal_files(crashed.path()).len(), 1);
    }

    /// A purge past the log's end (what installing a snapshot does) followed by appends: a crash
    /// that loses RocksDB's unsynced WAL, and with it the purge marker, must not leave the old
    /// entries and the new ones with a gap between them.
    #[tokio::test]
    async fn a_crash_cannot_keep_appends_and_lose_the_purge_before_them() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut store = open_store(dir.path());
        append_durably(&mut store, (1..=20).map(|i| entry_in_term(1, i)).collect()).await;
        let snapshot_last = log_id::<TypeConfig>(2, 1, 100);
        store.purge(snapshot_last).await.unwrap();
        append_durably(
            &mut store,
            (101..=110).map(|i| entry_in_term(2, i)).collect(),
        )
        .await;
        let crashed = crashed(store, dir.path());
        // The operating system lost what RocksDB's WAL had not synced: the purge marker.
        for item in std::fs::read_dir(crashed.path().join("raft")).unwrap() {
            let path = item.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                std::fs::write(&path, b"").unwrap();
            }
        }
        let mut store = open_store(crashed.path());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(snapshot_last));
        assert_eq!(
            log_of(&mut store).await,
            (101..=110).map(|i| (2, i)).collect::<Vec<_>>()
        );
    }

    /// A purge that reached RocksDB but not the journal (killed before the next sync): the
    /// journal's older purge record must not take the marker back below the entries RocksDB
    /// already deleted.
    #[tokio::test]
    async fn replay_never_moves_the_purge_marker_back() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut store = open_store(dir.path());
        append_durably(&mut store, (1..=100).map(|i| entry_in_term(1, i)).collect()).await;
        store.purge(log_id::<TypeConfig>(1, 1, 40)).await.unwrap();
        append_durably(
            &mut store,
            (101..=110).map(|i| entry_in_term(1, i)).collect(),
        )
        .await;
        // Journaled only with the next sync, which never comes.
        store.purge(log_id::<TypeConfig>(1, 1, 80)).await.unwrap();
        let crashed = crashed(store, dir.path());
        let mut store = open_store(crashed.path());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(
            state.last_purged_log_id,
            Some(log_id::<TypeConfig>(1, 1, 80))
        );
        assert_eq!(
            log_of(&mut store).await,
            (81..=110).map(|i| (1, i)).collect::<Vec<_>>()
        );
    }

    /// A write torn by a crash ends the journal where it starts; what came before it is intact.
    /// Damage in a segment that newer segments follow is refused, not skipped.
    #[tokio::test]
    async fn a_torn_tail_is_dropped_and_older_damage_is_refused() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut store = open_store(dir.path());
        append_durably(&mut store, (1..=20).map(|i| entry_in_term(1, i)).collect()).await;
        let crashed = crashed(store, dir.path());
        let segment = journal_files(crashed.path()).pop().unwrap();
        let mut bytes = std::fs::read(&segment).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
        // A record header promising more than was written, then garbage.
        bytes.truncate(end);
        bytes.extend_from_slice(&500u32.to_le_bytes());
        bytes.extend_from_slice(&[0xab; 100]);
        std::fs::write(&segment, &bytes).unwrap();
        let mut store = open_store(crashed.path());
        assert_eq!(
            log_of(&mut store).await,
            (1..=20).map(|i| (1, i)).collect::<Vec<_>>()
        );
        drop(store);

        // The same damage in a segment that is not the last one.
        let again = tempfile::TempDir::new().unwrap();
        crash_image(dir.path(), again.path());
        let damaged = journal_files(again.path()).pop().unwrap();
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&damaged, &bytes).unwrap();
        std::fs::write(
            again
                .path()
                .join("raft-journal")
                .join(format!("{:020}.journal", u64::MAX - 1)),
            [0u8; 4096],
        )
        .unwrap();
        let err = LogStore::open(crate::db::open(again.path()).unwrap(), again.path())
            .err()
            .expect("damage before the last segment is refused");
        assert!(err.to_string().contains("is damaged at byte"), "{err}");
    }

    /// Full segments are retired (their entries flushed into RocksDB, the files deleted) while
    /// appends go on, and a crash after that still finds every entry.
    #[tokio::test]
    async fn full_segments_are_retired_without_losing_entries() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut store =
            LogStore::open_with(crate::db::open(dir.path()).unwrap(), dir.path(), 64 << 10)
                .unwrap();
        // ~2 000 records of ~150 bytes: about five segments of 64 KiB.
        for start in (1..=2000).step_by(20) {
            let batch = (start..start + 20).map(|i| entry_in_term(1, i)).collect();
            append_durably(&mut store, batch).await;
        }
        wait_for_retirement(&mut store, dir.path()).await;
        let first_live = journal_files(dir.path())[0].clone();
        assert_ne!(
            first_live.file_name().unwrap(),
            format!("{:020}.journal", 1).as_str(),
            "no segment was ever retired"
        );
        let crashed = crashed(store, dir.path());
        let mut store = open_store(crashed.path());
        assert_eq!(
            log_of(&mut store).await,
            (1..=2000).map(|i| (1, i)).collect::<Vec<_>>()
        );
    }

    /// Once the journal has run for a while its segments are zero-filled spares, written into
    /// rather than extended; their zeros end the replay, and a crash loses nothing. A spare left
    /// half-filled by a crash is removed at open, a whole one becomes the first segment.
    #[tokio::test]
    async fn segments_are_zero_filled_spares_and_replay_stops_at_the_zeros() {
        const SEGMENT: u64 = 64 << 10;
        let dir = tempfile::TempDir::new().unwrap();
        let mut store =
            LogStore::open_with(crate::db::open(dir.path()).unwrap(), dir.path(), SEGMENT).unwrap();
        // A spare holds a segment and 1 MiB of slack; an extended segment ends near its size.
        let is_spare = |path: &std::path::PathBuf| {
            // (Retirement may delete a listed segment before it is looked at.)
            std::fs::metadata(path).is_ok_and(|m| m.len() >= SEGMENT + (1 << 20))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut next = 1;
        while !journal_files(dir.path()).iter().any(is_spare) {
            assert!(
                std::time::Instant::now() < deadline,
                "no segment was a zero-filled spare: {:?}",
                journal_files(dir.path())
            );
            let batch = (next..next + 20).map(|i| entry_in_term(1, i)).collect();
            append_durably(&mut store, batch).await;
            next += 20;
            tokio::task::yield_now().await;
        }
        // (A crash image taken while segments are deleted would not be one moment's files.)
        wait_for_retirement(&mut store, dir.path()).await;
        // A few records into the spare, then a crash.
        let batch = (next..next + 5).map(|i| entry_in_term(1, i)).collect();
        append_durably(&mut store, batch).await;
        let last = next + 4;
        let crashed = crashed(store, dir.path());
        let journal = crashed.path().join("raft-journal");
        std::fs::write(journal.join("spare.tmp"), [1u8; 100]).unwrap();
        std::fs::write(journal.join("spare"), vec![0u8; 8192]).unwrap();
        let mut store = open_store(crashed.path());
        assert_eq!(
            log_of(&mut store).await,
            (1..=last).map(|i| (1, i)).collect::<Vec<_>>()
        );
        let names: Vec<_> = std::fs::read_dir(&journal)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("spare")),
            "spares left after open: {names:?}"
        );
        let first = journal_files(crashed.path()).pop().unwrap();
        assert_eq!(
            std::fs::metadata(&first).unwrap().len(),
            8192,
            "the whole spare was not used"
        );
        append_durably(&mut store, vec![entry_in_term(1, last + 1)]).await;
        drop(store);
        let mut store = open_store(crashed.path());
        assert_eq!(log_of(&mut store).await.last(), Some(&(1, last + 1)));
    }

    /// The tail in memory and RocksDB give the same answers, including for ranges that start
    /// before the tail, and the committed id noted without a write survives a close.
    #[tokio::test]
    async fn reads_match_rocksdb_and_the_committed_id_survives_a_close() {
        let dir = tempfile::TempDir::new().unwrap();
        let committed = Some(log_id::<TypeConfig>(1, 1, 40));
        {
            let mut store = open_store(dir.path());
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
        let mut store = open_store(dir.path());
        assert_eq!(store.read_committed().await.unwrap(), committed);
        // Nothing in memory after a restart: every read comes from RocksDB.
        let tail = store.try_get_log_entries(8000..8010).await.unwrap();
        assert_eq!(indexes(&tail), (8000..8010).collect::<Vec<_>>());
    }
}
