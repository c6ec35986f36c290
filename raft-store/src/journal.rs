//! The Raft log's journal: what makes appended entries durable.
//!
//! Log entries live in RocksDB's `logs` column family, written there without RocksDB's WAL; this
//! journal is their write-ahead log instead. RocksDB's WAL is a buffered file: every append went
//! through the page cache and every group commit made the kernel write those pages back and then
//! flush the device. The journal writes whole 4 KiB blocks with `O_DIRECT` from the flusher
//! thread, one write and one `fdatasync` per group commit, and nothing else touches the disk for
//! an append (docs/benchmarks.md, session 18; docs/decisions.md).
//!
//! Format: segment files `<seq>.journal` (20 digits) in the journal directory, each a sequence of
//! records `len: u32 LE (never 0) | crc32: u32 LE of body | body`, where the body is a kind byte
//! and its payload: an entry (index u64 LE and the entry as stored in RocksDB), a truncation (the
//! first index removed) or the committed log id. A segment is written in whole blocks: the last
//! block is zero padded and rewritten, with the same bytes in front, by the next write, so a
//! length of 0 ends the segment, and a write torn by a crash can only damage records that were
//! never reported durable. Replay stops at the first record whose length or checksum is wrong.
//!
//! Replay (at open) writes every record of every segment into RocksDB in order, skipping entries
//! the log has already purged, then flushes the `logs` column family, stores the last committed
//! id, deletes the segments and starts a new one. Replaying records RocksDB already holds is
//! harmless: the records are applied in their original order, so each index ends as its last
//! record left it. While running, a segment that reached its size is retired the same way, in a
//! background thread: the `logs` column family is flushed (it then holds every entry of the old
//! segments, which were written to RocksDB before they were journaled), and the old segments are
//! deleted.
//!
//! Segments are zero-filled before use. Writing past a file's end (or into `fallocate`d space)
//! changes its size or extents, so each `fdatasync` also had to commit ext4's journal, which every
//! process on the file system shares; overwriting blocks already written needs only the device
//! flush (`fdatasync` p50 76 us -> 32 us under the keeper bench, docs/benchmarks.md, session 19).
//! Once the current segment holds a few MiB, a background thread writes the next one
//! (`spare.tmp`, renamed to `spare` when it is synced whole) and the rotation renames it into
//! place. A segment that was not zero-filled (the first one of a store, or one started while its
//! spare was not ready) is rotated as soon as the spare is ready; one that outgrows its zeros is
//! extended. The zeros read as the end of the segment (a length of 0). A store that never writes
//! a few MiB (most tests) never writes a spare.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use rocksdb::DB;
use rocksdb::FlushOptions;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;

use crate::db::CF_LOGS;
use crate::db::CF_META;

/// The unit of every journal write: `O_DIRECT` needs block-aligned buffers, offsets and lengths.
const BLOCK: usize = 4096;
/// A segment is retired once it holds this much.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
const SUFFIX: &str = ".journal";
/// The next segment while it is being zero-filled, and once it is ready. Neither name ends in
/// [`SUFFIX`], so replay never reads them.
const SPARE_TMP: &str = "spare.tmp";
const SPARE: &str = "spare";
/// A spare holds this much more than the segment size: the write that crosses the size still
/// lands in zeros unless it is larger than this.
const SPARE_SLACK: u64 = 1 << 20;
/// Zeros go to a spare this many bytes at a time, with [`SPARE_PAUSE`] between writes: the device
/// serves the flusher's small writes between them instead of queueing them behind one big write.
const SPARE_CHUNK: usize = 256 << 10;
const SPARE_PAUSE: Duration = Duration::from_millis(2);
/// The next spare is filled once the current segment holds this much (or half its size, if
/// that is less).
const SPARE_AFTER: u64 = 4 << 20;

const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_COMMITTED: u8 = 3;
const KIND_PURGE: u8 = 4;

/// The key of log entry `index` in the `logs` column family.
pub(crate) fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Removes every entry from `from` on (`delete_range` excludes its end key, hence the second
/// delete).
pub(crate) fn delete_from(db: &DB, batch: &mut WriteBatch, from: u64) {
    let cf = db.cf_handle(CF_LOGS).expect("logs column family");
    batch.delete_range_cf(cf, index_key(from), index_key(u64::MAX));
    batch.delete_cf(cf, index_key(u64::MAX));
}

/// Removes every entry up to and including `index` (a purge).
pub(crate) fn delete_through(db: &DB, batch: &mut WriteBatch, index: u64) {
    let cf = db.cf_handle(CF_LOGS).expect("logs column family");
    batch.delete_range_cf(cf, index_key(0), index_key(index + 1));
}

/// Writes that skip RocksDB's WAL: the journal stands in for it.
pub(crate) fn without_wal() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.disable_wal(true);
    options
}

/// A byte buffer whose contents start at a block boundary in memory, zero past its length.
struct BlockBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl BlockBuf {
    fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.div_ceil(BLOCK) * BLOCK;
        let storage = vec![0u8; capacity + BLOCK];
        let start = storage.as_ptr().align_offset(BLOCK);
        BlockBuf {
            storage,
            start,
            len: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.storage.len() - BLOCK
    }

    fn push(&mut self, bytes: &[u8]) {
        let needed = self.len + bytes.len();
        if needed > self.capacity() {
            let mut bigger = BlockBuf::with_capacity(needed.max(2 * self.capacity()));
            bigger.storage[bigger.start..bigger.start + self.len]
                .copy_from_slice(&self.storage[self.start..self.start + self.len]);
            bigger.len = self.len;
            *self = bigger;
        }
        let at = self.start + self.len;
        self.storage[at..at + bytes.len()].copy_from_slice(bytes);
        self.len = needed;
    }

    fn contents(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The contents padded with zeros to whole blocks.
    fn blocks(&self) -> &[u8] {
        let padded = self.len.div_ceil(BLOCK) * BLOCK;
        &self.storage[self.start..self.start + padded]
    }

    /// Drops the whole blocks in front, keeping the last partial one; returns the bytes dropped.
    fn keep_partial_block(&mut self) -> usize {
        let whole = self.len / BLOCK * BLOCK;
        let rest = self.len - whole;
        let base = self.start;
        self.storage
            .copy_within(base + whole..base + self.len, base);
        self.storage[base + rest..base + self.len].fill(0);
        self.len = rest;
        whole
    }

    fn clear(&mut self) {
        let base = self.start;
        self.storage[base..base + self.len].fill(0);
        self.len = 0;
    }
}

/// One record of the journal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// Log entry `index`, encoded as the `logs` column family stores it.
    Entry { index: u64, bytes: Vec<u8> },
    /// Every entry from this index on was removed.
    TruncateFrom(u64),
    /// The committed log id, encoded as the meta column family stores it.
    Committed(Vec<u8>),
    /// Every entry up to `index` was removed; `log_id` is the purge marker as the meta column
    /// family stores it. Journaled so that a crash cannot keep the entries appended after a purge
    /// and lose the purge (a log with a gap).
    Purge { index: u64, log_id: Vec<u8> },
}

/// Appends `record` to `out`: the body straight into the buffer, then its length and checksum
/// into the header in front of it (no copy of an entry's bytes on the way).
fn encode_record(record: &Record, out: &mut BlockBuf) {
    let header = out.len;
    out.push(&[0; 8]);
    match record {
        Record::Entry { index, bytes } => {
            out.push(&[KIND_ENTRY]);
            out.push(&index.to_le_bytes());
            out.push(bytes);
        }
        Record::TruncateFrom(from) => {
            out.push(&[KIND_TRUNCATE]);
            out.push(&from.to_le_bytes());
        }
        Record::Committed(bytes) => {
            out.push(&[KIND_COMMITTED]);
            out.push(bytes);
        }
        Record::Purge { index, log_id } => {
            out.push(&[KIND_PURGE]);
            out.push(&index.to_le_bytes());
            out.push(log_id);
        }
    }
    let body = &out.contents()[header + 8..];
    let len = u32::try_from(body.len()).expect("a journal record is far below 4 GiB");
    let crc = crc32fast::hash(body);
    let at = out.start + header;
    out.storage[at..at + 4].copy_from_slice(&len.to_le_bytes());
    out.storage[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The records of one segment, up to its end or its first damaged record; the second value is
/// the offset where reading stopped and whether it stopped at damage rather than at the end.
fn decode_segment(bytes: &[u8]) -> (Vec<Record>, usize, bool) {
    let mut records = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = bytes.get(at..at + 8) else {
            return (records, at, false);
        };
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            return (records, at, false);
        }
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            return (records, at, true);
        };
        if crc32fast::hash(body) != crc {
            return (records, at, true);
        }
        let record = match (body[0], &body[1..]) {
            (KIND_ENTRY, rest) if rest.len() >= 8 => Record::Entry {
                index: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                bytes: rest[8..].to_vec(),
            },
            (KIND_TRUNCATE, rest) if rest.len() == 8 => {
                Record::TruncateFrom(u64::from_le_bytes(rest.try_into().expect("8 bytes")))
            }
            (KIND_COMMITTED, rest) => Record::Committed(rest.to_vec()),
            (KIND_PURGE, rest) if rest.len() >= 8 => Record::Purge {
                index: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                log_id: rest[8..].to_vec(),
            },
            _ => return (records, at, true),
        };
        records.push(record);
        at += 8 + len;
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SUFFIX}"))
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            found.push((seq, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Opens a new segment for writing, with `O_DIRECT` where the file system supports it (tmpfs
/// did not before Linux 6.6; there the page cache and `fdatasync` do the same job, slower).
fn create_segment(dir: &Path, seq: u64) -> io::Result<File> {
    let path = segment_path(dir, seq);
    let file = open_direct(&path, OpenOptions::new().write(true).create_new(true))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Opens `path` for writing with `O_DIRECT` where the file system supports it.
fn open_direct(path: &Path, options: &OpenOptions) -> io::Result<File> {
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => options.open(path),
        other => other,
    }
}

/// Writes a zero-filled spare segment of `bytes` (rounded up to whole chunks) as `dir/spare`.
/// Gives up early, with no spare, once `stop` is set.
fn prepare_spare(dir: &Path, bytes: u64, stop: &AtomicBool) -> io::Result<()> {
    let tmp = dir.join(SPARE_TMP);
    let file = open_direct(
        &tmp,
        OpenOptions::new().write(true).create(true).truncate(true),
    )?;
    let zeros = BlockBuf::with_capacity(SPARE_CHUNK);
    let chunk = &zeros.storage[zeros.start..zeros.start + SPARE_CHUNK];
    let mut at = 0;
    while at < bytes {
        if stop.load(Ordering::Relaxed) {
            drop(file);
            return std::fs::remove_file(&tmp);
        }
        file.write_all_at(chunk, at)?;
        at += SPARE_CHUNK as u64;
        std::thread::sleep(SPARE_PAUSE);
    }
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(SPARE))?;
    File::open(dir)?.sync_all()
}

/// Makes the ready spare segment `seq` and opens it for writing; `None` if there is no spare.
fn use_spare(dir: &Path, seq: u64) -> io::Result<Option<File>> {
    let path = segment_path(dir, seq);
    match std::fs::rename(dir.join(SPARE), &path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other?,
    }
    File::open(dir)?.sync_all()?;
    open_direct(&path, OpenOptions::new().write(true)).map(Some)
}

/// Starts segment `seq`: the spare if `try_spare` and there is one, else a new empty file. The
/// second value says whether the segment is zero-filled.
fn start_segment(dir: &Path, seq: u64, try_spare: bool) -> io::Result<(File, bool)> {
    if try_spare && let Some(file) = use_spare(dir, seq)? {
        return Ok((file, true));
    }
    Ok((create_segment(dir, seq)?, false))
}

/// The zero-filling of the next segment, on a thread of its own.
struct SparePrep {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<()>>,
}

impl SparePrep {
    fn start(dir: &Path, bytes: u64) -> io::Result<SparePrep> {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, flag) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("raft-journal-spare".into())
            .spawn(move || {
                crate::sm_store::lower_priority();
                prepare_spare(&dir, bytes, &flag)
            })?;
        Ok(SparePrep { stop, thread })
    }

    /// Waits for the thread, stopping it first if `stop`; whether the spare is ready. A failure
    /// is logged: the journal then extends its segments, as it did without spares.
    fn finish(self, stop: bool) -> bool {
        if stop {
            self.stop.store(true, Ordering::Relaxed);
        }
        match self.thread.join() {
            Ok(Ok(())) => !stop,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "preparing the next raft log journal segment failed");
                false
            }
            Err(_) => {
                tracing::warn!("the raft log journal's spare segment thread panicked");
                false
            }
        }
    }
}

/// Where the journal's next segment stands.
enum Spare {
    /// Not started in the current segment.
    Idle,
    Filling(SparePrep),
    /// Zero-filled and synced, waiting for the rotation.
    Ready,
    /// Filling it failed; tried again in the next segment.
    Failed,
}

fn flush_logs(db: &DB) -> io::Result<()> {
    let cf = db.cf_handle(CF_LOGS).expect("logs column family");
    let mut options = FlushOptions::default();
    options.set_wait(true);
    db.flush_cf_opt(cf, &options).map_err(io::Error::other)
}

fn remove_segments_before(dir: &Path, seq: u64) -> io::Result<()> {
    for (old, path) in segments(dir)? {
        if old < seq {
            std::fs::remove_file(path)?;
        }
    }
    File::open(dir)?.sync_all()
}

/// The journal writer. Owned by the flusher thread.
pub(crate) struct Journal {
    dir: PathBuf,
    db: Arc<DB>,
    file: File,
    seq: u64,
    /// Bytes from `offset` in the segment on: the last written partial block, then records not
    /// yet written.
    buf: BlockBuf,
    offset: u64,
    /// Whether `buf` holds records not yet written.
    dirty: bool,
    segment_bytes: u64,
    /// The latest committed record, journaled again at the start of every segment.
    committed: Option<Vec<u8>>,
    /// Retires the segments before the current one.
    retiring: Option<JoinHandle<io::Result<()>>>,
    /// Whether the current segment was zero-filled before use.
    prefilled: bool,
    spare: Spare,
}

impl Journal {
    /// Replays the journal in `dir` into `db` (entries at or below `purged` are skipped: the log
    /// no longer holds them) and starts a new segment.
    pub(crate) fn open(
        dir: &Path,
        db: Arc<DB>,
        purged: Option<u64>,
        segment_bytes: u64,
    ) -> io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        // A spare that was still being filled is incomplete; a renamed one is whole and is used.
        match std::fs::remove_file(dir.join(SPARE_TMP)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let started = std::time::Instant::now();
        let found = segments(dir)?;
        let mut replayed = 0usize;
        let mut committed = None;
        let mut purge_marker = None;
        let last = found.len().checked_sub(1);
        for (i, (_, path)) in found.iter().enumerate() {
            let bytes = std::fs::read(path)?;
            let (records, stop, damaged) = decode_segment(&bytes);
            if damaged && Some(i) != last {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "raft log journal segment {} is damaged at byte {stop} and newer segments \
                         follow it: entries reported durable would be lost",
                        path.display()
                    ),
                ));
            }
            if damaged {
                tracing::warn!(segment = %path.display(), at = stop, "the journal ends in a torn write (a crash during a write); the records after it were never reported durable");
            }
            let cf = db.cf_handle(CF_LOGS).expect("logs column family");
            let mut batch = WriteBatch::default();
            replayed += records.len();
            for record in records {
                match record {
                    Record::Entry { index, bytes } => {
                        if purged.is_none_or(|p| index > p) {
                            batch.put_cf(cf, index_key(index), bytes);
                        }
                    }
                    Record::TruncateFrom(from) => delete_from(&db, &mut batch, from),
                    Record::Committed(bytes) => committed = Some(bytes),
                    Record::Purge { index, log_id } => {
                        delete_through(&db, &mut batch, index);
                        // RocksDB may hold a newer marker than the journal: a purge writes it
                        // there at once and journals it with the next sync, which a crash can
                        // prevent. The marker must never go back (the log would start after it,
                        // with a gap); the deletions it made are in RocksDB already.
                        if purged.is_none_or(|p| index > p) {
                            purge_marker = Some(log_id);
                        }
                    }
                }
            }
            db.write_opt(batch, &without_wal())
                .map_err(io::Error::other)?;
        }
        let seq = found.last().map_or(1, |(seq, _)| seq + 1);
        if !found.is_empty() {
            flush_logs(&db)?;
            let meta = db.cf_handle(CF_META).expect("meta column family");
            let mut batch = WriteBatch::default();
            if let Some(bytes) = &committed {
                batch.put_cf(meta, crate::log_store::KEY_COMMITTED, bytes);
            }
            if let Some(bytes) = &purge_marker {
                batch.put_cf(meta, crate::log_store::KEY_LAST_PURGED, bytes);
            }
            db.write(batch).map_err(io::Error::other)?;
            db.flush_wal(true).map_err(io::Error::other)?;
            remove_segments_before(dir, seq)?;
            tracing::info!(
                segments = found.len(),
                records = replayed,
                ms = started.elapsed().as_millis() as u64,
                "raft log journal replayed"
            );
        }
        let (file, prefilled) = start_segment(dir, seq, true)?;
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            db,
            file,
            seq,
            buf: BlockBuf::with_capacity(1 << 20),
            offset: 0,
            dirty: false,
            segment_bytes,
            committed: None,
            retiring: None,
            prefilled,
            spare: Spare::Idle,
        };
        if let Some(bytes) = committed {
            journal.push(&Record::Committed(bytes));
        }
        Ok(journal)
    }

    /// Adds a record; durable after the next [`Journal::sync`].
    pub(crate) fn push(&mut self, record: &Record) {
        if let Record::Committed(bytes) = record {
            self.committed = Some(bytes.clone());
        }
        encode_record(record, &mut self.buf);
        self.dirty = true;
    }

    /// Writes every pushed record and waits until the disk holds them.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.file.write_all_at(self.buf.blocks(), self.offset)?;
        self.file.sync_data()?;
        self.dirty = false;
        self.offset += self.buf.keep_partial_block() as u64;
        if self.offset + self.buf.len as u64 >= self.segment_bytes
            || (!self.prefilled && self.spare_ready())
        {
            self.next_segment()?;
        } else if matches!(self.spare, Spare::Idle)
            && self.offset >= SPARE_AFTER.min(self.segment_bytes / 2)
        {
            let prep = SparePrep::start(&self.dir, self.segment_bytes + SPARE_SLACK)?;
            self.spare = Spare::Filling(prep);
        }
        Ok(())
    }

    /// Whether the spare is ready (collecting a filling that has ended).
    fn spare_ready(&mut self) -> bool {
        if let Spare::Filling(prep) = &self.spare
            && prep.thread.is_finished()
        {
            let Spare::Filling(prep) = std::mem::replace(&mut self.spare, Spare::Idle) else {
                unreachable!("matched above")
            };
            self.spare = match prep.finish(false) {
                true => Spare::Ready,
                false => Spare::Failed,
            };
        }
        matches!(self.spare, Spare::Ready)
    }

    /// Starts a new segment and retires the older ones in the background, unless the last
    /// retirement is still running (the current segment then grows until it is done).
    fn next_segment(&mut self) -> io::Result<()> {
        if let Some(retiring) = self.retiring.take() {
            if !retiring.is_finished() {
                self.retiring = Some(retiring);
                return Ok(());
            }
            retiring
                .join()
                .map_err(|_| io::Error::other("journal retirement thread panicked"))??;
        }
        let seq = self.seq + 1;
        // Still filling: this segment is extended and rotated once the spare is ready.
        let ready = self.spare_ready();
        let (file, prefilled) = start_segment(&self.dir, seq, ready)?;
        if !matches!(self.spare, Spare::Filling(_)) {
            self.spare = Spare::Idle;
        }
        (self.file, self.prefilled) = (file, prefilled);
        self.seq = seq;
        self.offset = 0;
        self.buf.clear();
        if let Some(bytes) = self.committed.take() {
            self.push(&Record::Committed(bytes));
        }
        let (db, dir) = (self.db.clone(), self.dir.clone());
        self.retiring = Some(
            std::thread::Builder::new()
                .name("raft-journal-retire".into())
                .spawn(move || {
                    flush_logs(&db)?;
                    // The purge markers those segments journaled live on in RocksDB's meta column
                    // family, written with its WAL but not synced: synced here, before the records
                    // go, so the flushed deletions never outlive their marker (a log with a gap).
                    db.flush_wal(true).map_err(io::Error::other)?;
                    remove_segments_before(&dir, seq)
                })?,
        );
        Ok(())
    }

    /// Waits for a retirement in progress and stops the filling of a spare.
    pub(crate) fn close(mut self) -> io::Result<()> {
        if let Spare::Filling(prep) = std::mem::replace(&mut self.spare, Spare::Idle) {
            prep.finish(true);
        }
        match self.retiring.take() {
            None => Ok(()),
            Some(retiring) => retiring
                .join()
                .map_err(|_| io::Error::other("journal retirement thread panicked"))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_zero_length_ends_a_segment() {
        let records = vec![
            Record::Entry {
                index: 7,
                bytes: vec![1, 2, 3],
            },
            Record::TruncateFrom(5),
            Record::Committed(vec![9; 40]),
            Record::Purge {
                index: 3,
                log_id: vec![4; 20],
            },
            Record::Entry {
                index: 5,
                bytes: vec![0; 5000],
            },
        ];
        let mut buf = BlockBuf::with_capacity(16);
        for r in &records {
            encode_record(r, &mut buf);
        }
        let blocks = buf.blocks().to_vec();
        assert_eq!(blocks.len() % BLOCK, 0);
        let (decoded, stop, damaged) = decode_segment(&blocks);
        assert_eq!(decoded, records);
        assert_eq!(stop, buf.len);
        assert!(!damaged);
    }

    #[test]
    fn zeros_after_the_records_end_a_segment() {
        let mut buf = BlockBuf::with_capacity(16);
        encode_record(&Record::TruncateFrom(4), &mut buf);
        let mut bytes = buf.blocks().to_vec();
        bytes.resize(bytes.len() + 3 * BLOCK, 0);
        let (decoded, stop, damaged) = decode_segment(&bytes);
        assert_eq!(decoded, vec![Record::TruncateFrom(4)]);
        assert_eq!(stop, buf.len);
        assert!(!damaged);
        assert_eq!(decode_segment(&[0; BLOCK]), (Vec::new(), 0, false));
    }

    #[test]
    fn a_damaged_record_ends_the_replay_there() {
        let mut buf = BlockBuf::with_capacity(16);
        encode_record(&Record::TruncateFrom(1), &mut buf);
        let first = buf.len;
        encode_record(&Record::TruncateFrom(2), &mut buf);
        encode_record(&Record::TruncateFrom(3), &mut buf);
        let mut bytes = buf.blocks().to_vec();
        bytes[first + 9] ^= 0xff;
        let (decoded, stop, damaged) = decode_segment(&bytes);
        assert_eq!(decoded, vec![Record::TruncateFrom(1)]);
        assert_eq!(stop, first);
        assert!(damaged);
        // A length that runs past the end is damage too.
        let (decoded, _, damaged) = decode_segment(&bytes[..first + 12]);
        assert_eq!(decoded.len(), 1);
        assert!(damaged);
    }

    #[test]
    fn the_partial_block_stays_in_front_and_the_rest_is_zero() {
        let mut buf = BlockBuf::with_capacity(BLOCK);
        buf.push(&vec![7u8; BLOCK + 100]);
        assert_eq!(buf.blocks().len(), 2 * BLOCK);
        assert_eq!(buf.keep_partial_block(), BLOCK);
        assert_eq!(buf.len, 100);
        assert_eq!(buf.blocks().len(), BLOCK);
        assert!(buf.blocks()[..100].iter().all(|b| *b == 7));
        assert!(buf.blocks()[100..].iter().all(|b| *b == 0));
        assert_eq!(buf.blocks().as_ptr().align_offset(BLOCK), 0);
    }
}
