//! Adapts an application [`StateMachine`] to openraft's state-machine storage.
//!
//! The application state lives in memory behind a lock; durability comes from the log plus the
//! latest snapshot, which is kept in a file of its own next to the RocksDB directory
//! (`<data_dir>/raft-snapshot`, see [`SnapshotFile`]). On open, the snapshot is restored and
//! openraft replays the log entries after it.

use std::io;
use std::io::Seek;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;
use std::sync::atomic::AtomicBool;
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

/// Where snapshots were kept before they moved to a file; still read when there is no file.
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// The snapshot file, in the node's data directory.
const SNAPSHOT_FILE: &str = "raft-snapshot";
/// The first bytes of a snapshot file (format 1).
const SNAPSHOT_MAGIC: &[u8; 8] = b"LLSNAP01";
/// Magic, then meta length, data length and the XXH3 of meta followed by data (little endian).
const SNAPSHOT_HEADER: usize = 8 + 3 * 8;

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
    snapshots: Arc<SnapshotFile>,
}

impl<M> Clone for SmStore<M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            snapshots: self.snapshots.clone(),
        }
    }
}

/// Where a node's latest snapshot is stored: a file in its data directory, or (written by an
/// older version) two keys in RocksDB.
struct SnapshotFile {
    db: Arc<DB>,
    path: PathBuf,
    /// A snapshot an older version kept in RocksDB is still there: the next snapshot written
    /// deletes it (once, not on every snapshot).
    legacy: AtomicBool,
}

impl<M: StateMachine> SmStore<M> {
    /// Loads the latest snapshot (if any) of the node whose data directory is `dir` into `sm`.
    pub(crate) fn open(db: Arc<DB>, dir: &Path, mut sm: M) -> crate::Result<Self> {
        let snapshots = SnapshotFile::open(db, dir).map_err(Error::storage)?;
        let mut last_applied = None;
        let mut membership = StoredMembership::default();
        if let Some(snapshot) = snapshots.read().map_err(Error::storage)? {
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
            snapshots: Arc::new(snapshots),
        })
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Applied<M>> {
        self.shared
            .state
            .read()
            .expect("state machine lock poisoned")
    }
}

impl SnapshotFile {
    /// The snapshot store of the node whose data directory is `dir`.
    fn open(db: Arc<DB>, dir: &Path) -> Result<Self, String> {
        let legacy = has_legacy_snapshot(&db)?;
        Ok(Self {
            db,
            path: dir.join(SNAPSHOT_FILE),
            legacy: AtomicBool::new(legacy),
        })
    }

    /// The latest stored snapshot: the file, or else one kept in RocksDB by an older version.
    fn read(&self) -> Result<Option<Snapshot>, String> {
        let (db, path) = (&self.db, &self.path);
        match std::fs::read(path) {
            Ok(bytes) => return parse_snapshot(bytes, path).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
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
}

/// Whether either key of an older version's snapshot is still in RocksDB (a crash between the
/// two deletes can leave one).
fn has_legacy_snapshot(db: &DB) -> Result<bool, String> {
    let cf = db.cf_handle(CF_SNAPSHOT).expect("snapshot column family");
    for key in [KEY_SNAPSHOT_META, KEY_SNAPSHOT_DATA] {
        if db
            .get_pinned_cf(cf, key)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Checks and splits a snapshot file's bytes; the data stays in the same buffer (a snapshot is
/// tens of megabytes, read at start-up and whenever a peer needs it).
fn parse_snapshot(mut bytes: Vec<u8>, path: &Path) -> Result<Snapshot, String> {
    let bad = |what: &str| format!("snapshot file {}: {what}", path.display());
    if bytes.len() < SNAPSHOT_HEADER || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(bad("not a snapshot (no LLSNAP01 header)"));
    }
    let word =
        |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
    let (meta_len, data_len, checksum) = (word(0), word(1), word(2));
    let body = &bytes[SNAPSHOT_HEADER..];
    if meta_len.checked_add(data_len) != Some(body.len() as u64) {
        return Err(bad(&format!(
            "header says {meta_len} + {data_len} bytes, file holds {}",
            body.len()
        )));
    }
    if xxhash_rust::xxh3::xxh3_64(body) != checksum {
        return Err(bad("checksum mismatch"));
    }
    let meta = decode(&body[..meta_len as usize])?;
    bytes.drain(..SNAPSHOT_HEADER + meta_len as usize);
    Ok(Snapshot {
        meta,
        snapshot: bytes,
    })
}

/// Runs `work` on a thread of its own at the lowest CPU priority and waits for its result.
///
/// Encoding a snapshot is whole-state work (0.3-0.8 s of CPU for 30 MB) that nobody waits for. At
/// normal priority it competed with the appends, replication and applies of every request: a
/// snapshot inside a 5 s put phase at 64 clients cost it ~7% of its puts. At nice 19 it takes what
/// they leave idle, and that phase did ~4% more puts (docs/benchmarks.md, "Session 9").
async fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(work());
        })
        .map_err(|e| io::Error::other(format!("cannot start the {name} thread: {e}")))?;
    rx.await
        .map_err(|_| io::Error::other(format!("the {name} thread ended without a result")))
}

/// Lowers the calling thread (only it: on Linux a thread has its own nice value) to nice 19.
/// Lowering one's own priority needs no privilege; if it fails anyway, the work runs as before.
pub(crate) fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority only reads its integer arguments.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not lower a background thread's priority");
    }
}

/// The snapshot file is written back to the disk every this many bytes (see [`PacedFile`]).
const PACE_STEP: usize = 1 << 20;

/// A snapshot file being written: every byte goes through the checksum, and every
/// [`PACE_STEP`] bytes are written back to the disk (`sync_file_range`) before more are taken.
///
/// Written in one go, a 30 MB snapshot reached the disk as one burst at the final sync, and the
/// WAL's fsyncs of every node sharing the disk queued behind it: put p99 at 64 clients went from
/// ~14 ms to 16-21 ms in a phase with a snapshot. In steps it stays at ~14 ms (docs/benchmarks.md,
/// "Session 9"). Pacing is best effort: if the call fails the data is still synced at the end.
struct PacedFile {
    file: std::fs::File,
    hasher: xxhash_rust::xxh3::Xxh3,
    /// The file offset after the last byte written.
    offset: u64,
    /// The offset from which bytes have not been written back yet.
    unsynced_from: u64,
}

impl PacedFile {
    fn new(file: std::fs::File, offset: u64) -> Self {
        Self {
            file,
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            offset,
            unsynced_from: offset,
        }
    }

    fn write_back(&mut self) {
        use std::os::fd::AsRawFd;
        let len = self.offset - self.unsynced_from;
        if len == 0 {
            return;
        }
        // SAFETY: the descriptor belongs to `self.file`, open for the whole call; the range is
        // plain integers.
        let paced = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.unsynced_from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        if paced != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "snapshot write not paced");
        }
        self.unsynced_from = self.offset;
    }
}

impl Write for PacedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = PACE_STEP - (self.offset - self.unsynced_from) as usize;
        let written = self.file.write(&buf[..buf.len().min(room)])?;
        self.hasher.update(&buf[..written]);
        self.offset += written as u64;
        if self.offset - self.unsynced_from >= PACE_STEP as u64 {
            self.write_back();
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl SnapshotFile {
    /// Stores a snapshot durably: `meta` (encoded) and the data `fill` writes. Returns the data's
    /// size. Blocking: run it off the async workers.
    ///
    /// The data streams into the file through a 1 MiB buffer, so a snapshot of any size costs no
    /// memory of its size: an in-memory copy of a 30 MB state was 30 MB of freshly faulted pages per
    /// snapshot, and zeroing those was most of a snapshot's CPU (docs/benchmarks.md, "Session 10").
    /// The file is written under a temporary name, synced and then renamed over the previous one (and
    /// the directory synced), so a crash leaves the old snapshot or the new one, whole. Kept in
    /// RocksDB, as before, tens of megabytes were copied into a memtable, compressed into an SST and
    /// written again on every snapshot; a file is written once. Meta and data share the file, so they
    /// always match.
    fn store(
        &self,
        meta: &[u8],
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<u64> {
        let (db, path) = (&self.db, &self.path);
        let tmp = path.with_extension("tmp");
        let failed = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("{what} snapshot file {}: {e}", tmp.display()),
            )
        };
        let write = || -> io::Result<u64> {
            let mut file = std::fs::File::create(&tmp)?;
            // The header comes last, once the lengths and the checksum are known.
            file.write_all(&[0; SNAPSHOT_HEADER])?;
            let mut out = io::BufWriter::with_capacity(
                PACE_STEP,
                PacedFile::new(file, SNAPSHOT_HEADER as u64),
            );
            out.write_all(meta)?;
            fill(&mut out)?;
            let mut paced = out.into_inner().map_err(|e| e.into_error())?;
            paced.write_back();
            let data_len = paced.offset - (SNAPSHOT_HEADER + meta.len()) as u64;
            let mut header = Vec::with_capacity(SNAPSHOT_HEADER);
            header.extend_from_slice(SNAPSHOT_MAGIC);
            header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
            header.extend_from_slice(&data_len.to_le_bytes());
            header.extend_from_slice(&paced.hasher.digest().to_le_bytes());
            let mut file = paced.file;
            file.seek(io::SeekFrom::Start(0))?;
            file.write_all(&header)?;
            file.sync_all()?;
            Ok(data_len)
        };
        let data_len = write().map_err(|e| failed("writing", e))?;
        std::fs::rename(&tmp, path).map_err(|e| failed("renaming", e))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| failed("syncing the directory of", e))?;
        }
        // A snapshot an older version kept in RocksDB is superseded now.
        if self.legacy.load(Ordering::Relaxed) {
            let cf = db.cf_handle(CF_SNAPSHOT).expect("snapshot column family");
            db.delete_cf(cf, KEY_SNAPSHOT_META)
                .map_err(io::Error::other)?;
            db.delete_cf(cf, KEY_SNAPSHOT_DATA)
                .map_err(io::Error::other)?;
            self.legacy.store(false, Ordering::Relaxed);
        }
        Ok(data_len)
    }

    /// Stores a snapshot received whole (from the leader) with [`SnapshotFile::store`].
    async fn write(self: Arc<Self>, meta: &SnapshotMeta, data: Vec<u8>) -> io::Result<()> {
        let meta = encode(meta).map_err(io::Error::other)?;
        tokio::task::spawn_blocking(move || self.store(&meta, |out| out.write_all(&data)).map(drop))
            .await
            .map_err(io::Error::other)?
    }
}

impl<M: StateMachine> RaftSnapshotBuilder<TypeConfig> for SmStore<M> {
    type SnapshotData = Vec<u8>;

    /// Streams the state into the snapshot file and returns the snapshot's meta with **empty
    /// data**: openraft (pinned, 0.10.0-alpha.34) reads only the meta of a snapshot it had built
    /// (`core/sm/worker.rs`, `storage/helper.rs`); a peer that needs the data gets it from
    /// [`RaftStateMachine::get_current_snapshot`], which reads the file. Holding a copy here would
    /// cost the snapshot's size in memory for nothing.
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
        let encoded_meta = encode(&meta).map_err(io::Error::other)?;
        let snapshots = self.snapshots.clone();
        let bytes = in_background("raft-snapshot", move || {
            snapshots.store(&encoded_meta, |out| M::write_frozen(frozen, out))
        })
        .await??;
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Vec::new(),
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
                        // Only the node that proposed the entry has someone to answer.
                        match responder {
                            Some(_) => encode(&outcome).map_err(io::Error::other)?,
                            None => Vec::new(),
                        }
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
        self.snapshots.clone().write(meta, snapshot).await?;
        let index = meta.last_log_id.as_ref().map(|id| id.index()).unwrap_or(0);
        self.shared.applied_tx.send_replace(index);
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let snapshots = self.snapshots.clone();
        tokio::task::spawn_blocking(move || snapshots.read())
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::log_id;

    use super::*;
    use crate::types::TypeConfig;

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(log_id::<TypeConfig>(2, 1, index)),
            last_membership: StoredMembership::default(),
        }
    }

    #[tokio::test]
    async fn background_work_runs_on_its_own_thread_at_the_lowest_priority() {
        let caller = std::thread::current().id();
        let (thread, name, nice) = in_background("bg-test", || {
            // SAFETY: as in lower_priority.
            let nice =
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            let me = std::thread::current();
            (me.id(), me.name().map(str::to_owned), nice)
        })
        .await
        .unwrap();
        assert_ne!(thread, caller);
        assert_eq!(name.as_deref(), Some("bg-test"));
        assert_eq!(nice, 19);
    }

    #[tokio::test]
    async fn snapshot_file_round_trips_and_rejects_damage() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let snapshots = Arc::new(SnapshotFile::open(db, dir.path()).unwrap());
        let path = snapshots.path.clone();
        assert!(snapshots.read().unwrap().is_none());

        // Over two pacing steps, so a step boundary falls inside the data.
        let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        snapshots
            .clone()
            .write(&meta(7), data.clone())
            .await
            .unwrap();
        let back = snapshots.read().unwrap().expect("stored");
        assert_eq!(back.meta, meta(7));
        assert_eq!(back.snapshot, data);
        assert!(!path.with_extension("tmp").exists());

        let good = std::fs::read(path.as_path()).unwrap();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(path.as_path(), &flipped).unwrap();
        let err = snapshots.read().unwrap_err();
        assert!(err.contains("checksum mismatch"), "{err}");
        std::fs::write(path.as_path(), &good[..good.len() - 10]).unwrap();
        let err = snapshots.read().unwrap_err();
        assert!(err.contains("file holds"), "{err}");
        std::fs::write(path.as_path(), b"garbage").unwrap();
        let err = snapshots.read().unwrap_err();
        assert!(err.contains("not a snapshot"), "{err}");
    }

    /// A data directory written before snapshots moved to a file still opens with its snapshot,
    /// and the first new snapshot replaces it for good.
    #[tokio::test]
    async fn snapshot_kept_in_rocksdb_by_an_older_version_is_read_then_superseded() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let cf = db.cf_handle(CF_SNAPSHOT).unwrap();
        db.put_cf(cf, KEY_SNAPSHOT_META, encode(&meta(3)).unwrap())
            .unwrap();
        db.put_cf(cf, KEY_SNAPSHOT_DATA, b"old state").unwrap();
        let snapshots = Arc::new(SnapshotFile::open(db.clone(), dir.path()).unwrap());
        let old = snapshots.read().unwrap().expect("legacy snapshot");
        assert_eq!((old.meta, old.snapshot), (meta(3), b"old state".to_vec()));
        assert!(snapshots.legacy.load(Ordering::Relaxed));

        snapshots
            .clone()
            .write(&meta(9), b"new state".to_vec())
            .await
            .unwrap();
        assert!(db.get_cf(cf, KEY_SNAPSHOT_DATA).unwrap().is_none());
        // Deleted once: later snapshots leave RocksDB alone.
        assert!(!snapshots.legacy.load(Ordering::Relaxed));
        assert!(!has_legacy_snapshot(&db).unwrap());
        std::fs::remove_file(&snapshots.path).unwrap();
        assert!(snapshots.read().unwrap().is_none());
    }
}
