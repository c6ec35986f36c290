//! Adapts an application [`StateMachine`] to openraft's state-machine storage.
//!
//! The application state lives in memory behind a lock; durability comes from the log plus the
//! latest snapshot, which is kept in RocksDB (column family `snapshot`, written around the WAL and
//! flushed at once). On open, the snapshot is restored and openraft replays the log entries after
//! it.

use std::io;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use rocksdb::DB;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use tokio::sync::watch;

use crate::StateMachine;
use crate::db::CF_SNAPSHOT;
use crate::error::Error;
use crate::types::LogId;
use crate::types::Snapshot;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::TypeConfig;
use crate::types::decode;
use crate::types::encode;

const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// The application state plus what openraft needs to know about it.
pub(crate) struct Applied<M> {
    pub(crate) sm: M,
    /// The last log id applied to `sm`; reads served after a ReadIndex wait for this to pass it.
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership,
}

pub(crate) struct Shared<M> {
    pub(crate) state: RwLock<Applied<M>>,
    /// The index of the last applied entry, for readers waiting on a ReadIndex and for watchers.
    pub(crate) applied_tx: watch::Sender<u64>,
}

/// openraft's handle on the state machine. Cheap to clone.
pub struct SmStore<M> {
    pub(crate) shared: Arc<Shared<M>>,
    db: Arc<DB>,
    /// Bytes of the last snapshot built or installed: the next one is encoded into a buffer of
    /// about that size, allocated once.
    snapshot_bytes: Arc<AtomicUsize>,
}

impl<M> Clone for SmStore<M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            db: self.db.clone(),
            snapshot_bytes: self.snapshot_bytes.clone(),
        }
    }
}

impl<M: StateMachine> SmStore<M> {
    /// Loads the latest snapshot (if any) into `sm`.
    pub(crate) fn open(db: Arc<DB>, mut sm: M) -> crate::Result<Self> {
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        let mut snapshot_bytes = 0;
        if let Some(snapshot) = read_snapshot(&db).map_err(Error::storage)? {
            snapshot_bytes = snapshot.snapshot.len();
            sm.restore(&snapshot.snapshot).map_err(Error::Codec)?;
            last_applied = snapshot.meta.last_log_id;
            membership = snapshot.meta.last_membership;
        }
        let applied_index = last_applied.as_ref().map(|id| id.index()).unwrap_or(0);
        let (applied_tx, _) = watch::channel(applied_index);
        Ok(Self {
            shared: Arc::new(Shared {
                state: RwLock::new(Applied {
                    sm,
                    last_applied,
                    membership,
                }),
                applied_tx,
            }),
            db,
            snapshot_bytes: Arc::new(AtomicUsize::new(snapshot_bytes)),
        })
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Applied<M>> {
        self.shared
            .state
            .read()
            .expect("state machine lock poisoned")
    }
}

fn read_snapshot(db: &DB) -> Result<Option<Snapshot>, String> {
    let cf = db.cf_handle(CF_SNAPSHOT).expect("snapshot column family");
    let Some(meta) = db
        .get_cf(cf, KEY_SNAPSHOT_META)
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let meta: SnapshotMeta = decode(&meta)?;
    let data = db
        .get_cf(cf, KEY_SNAPSHOT_DATA)
        .map_err(|e| e.to_string())?
        .ok_or("snapshot metadata without data")?;
    Ok(Some(Snapshot {
        meta,
        snapshot: data,
    }))
}

/// Stores a snapshot durably and hands the data back, so the caller keeps it without a copy.
///
/// Metadata and data go in one batch that bypasses the WAL, and the snapshot column family is then
/// flushed to an SST file (the flush waits and syncs; one memtable, so both keys land together or
/// not at all). Through the WAL, tens of megabytes would sit in front of the log appends'
/// group-commit fsync, which covers everything written before it.
async fn write_snapshot(db: Arc<DB>, meta: &SnapshotMeta, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let meta = encode(meta).map_err(io::Error::other)?;
    tokio::task::spawn_blocking(move || {
        let cf = db.cf_handle(CF_SNAPSHOT).expect("snapshot column family");
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, KEY_SNAPSHOT_META, meta);
        batch.put_cf(cf, KEY_SNAPSHOT_DATA, &data);
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        db.write_opt(batch, &no_wal).map_err(io::Error::other)?;
        db.flush_cf(cf).map_err(io::Error::other)?;
        Ok(data)
    })
    .await
    .map_err(io::Error::other)?
}

impl<M: StateMachine> RaftSnapshotBuilder<TypeConfig> for SmStore<M> {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        // Only the copy is made under the lock; applies resume while it is encoded.
        let (meta, frozen) = {
            let state = self.read();
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
            };
            (meta, state.sm.freeze())
        };
        let started = std::time::Instant::now();
        let previous = self.snapshot_bytes.load(Ordering::Relaxed);
        let hint = previous + previous / 8;
        let data = tokio::task::spawn_blocking(move || M::encode_frozen(frozen, hint))
            .await
            .map_err(|e| io::Error::other(format!("snapshot encoding failed: {e}")))?;
        self.snapshot_bytes.store(data.len(), Ordering::Relaxed);
        let data = write_snapshot(self.db.clone(), &meta, data).await?;
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = data.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl<M: StateMachine> RaftStateMachine<TypeConfig> for SmStore<M> {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let state = self.read();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<S>(&mut self, entries: S) -> io::Result<()>
    where
        S: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let batch: Vec<EntryResponder<TypeConfig>> = entries.try_collect().await?;
        let mut replies = Vec::with_capacity(batch.len());
        let last_index;
        {
            let mut state = self
                .shared
                .state
                .write()
                .expect("state machine lock poisoned");
            for (entry, responder) in batch {
                let log_id = entry.log_id();
                let index = log_id.index();
                let reply = match entry.payload {
                    EntryPayload::Blank => Vec::new(),
                    EntryPayload::Normal(command) => {
                        let outcome: Result<M::Response, String> =
                            decode::<M::Command>(&command.0).map(|cmd| state.sm.apply(index, cmd));
                        encode(&outcome).map_err(io::Error::other)?
                    }
                    EntryPayload::Membership(membership) => {
                        state.membership = StoredMembership::new(Some(log_id), membership);
                        Vec::new()
                    }
                };
                state.last_applied = Some(log_id);
                if let Some(responder) = responder {
                    replies.push((responder, reply));
                }
            }
            last_index = state
                .last_applied
                .as_ref()
                .map(|id| id.index())
                .unwrap_or(0);
        }
        self.shared.applied_tx.send_replace(last_index);
        for (responder, reply) in replies {
            responder.send(reply);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Vec<u8>) -> io::Result<()> {
        {
            let mut state = self
                .shared
                .state
                .write()
                .expect("state machine lock poisoned");
            state
                .sm
                .restore(&snapshot)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
        }
        self.snapshot_bytes.store(snapshot.len(), Ordering::Relaxed);
        write_snapshot(self.db.clone(), meta, snapshot).await?;
        let index = meta.last_log_id.as_ref().map(|id| id.index()).unwrap_or(0);
        self.shared.applied_tx.send_replace(index);
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read_snapshot(&db))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)
    }
}
