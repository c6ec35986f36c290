//! openraft log storage on RocksDB: the vote, log entries, the committed id and purge/truncate.
//!
//! Durability rules, kept here and nowhere else:
//! - `save_vote` writes the vote and fsyncs the WAL before it returns: a node must never vote
//!   twice in one term, even across a crash.
//! - `append` writes the entries to RocksDB (memtable + WAL buffer) before returning, so they are
//!   readable at once, and reports them flushed only after a WAL fsync that covers them. The fsync
//!   runs on one flusher thread that takes every append queued since its last fsync: concurrent
//!   client writes share one fsync (group commit) instead of paying one each.
//! - `save_committed`, `truncate_after` and `purge` are not fsynced: openraft tolerates losing
//!   them, and the WAL keeps their order relative to later writes.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::Arc;
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

/// The Raft log of one node. Cheap to clone: clones share the database and the flusher.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// Appends waiting for the group-commit fsync; shared by all clones.
    flusher: Arc<Flusher>,
}

/// The group-commit thread. Dropping the last handle closes the queue and joins the thread, so
/// its reference to the database is gone before the store is: a thread still inside RocksDB while
/// the process exits makes RocksDB abort ("pthread lock: Invalid argument").
struct Flusher {
    tx: Option<mpsc::Sender<IoFlushed>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
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
        });
        Self { db, flusher }
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
            std::ops::Bound::Included(x) => *x,
            std::ops::Bound::Excluded(x) => *x + 1,
            std::ops::Bound::Unbounded => 0,
        };
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
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IoFlushed) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(invalid_data)?;
            batch.put_cf(cf, index_key(entry.index()), bytes);
        }
        // Written before returning so the entries are readable at once; durable only after the
        // flusher's fsync, which is when openraft learns about it through `callback`.
        self.db.write(batch).map_err(io::Error::other)?;
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
        // The purge marker goes first: openraft ignores logs at or below it, so a crash between
        // the two writes leaves only ignorable garbage.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        let cf = self.db.cf_handle(CF_LOGS).expect("logs column family");
        self.db
            .delete_range_cf(cf, index_key(0), index_key(log_id.index() + 1))
            .map_err(io::Error::other)
    }
}
