//! Opens the one RocksDB instance a Raft node keeps its log, vote and snapshots in.

use std::path::Path;
use std::sync::Arc;

use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Options;

use crate::error::Error;
use crate::error::Result;

/// Log entries keyed by big-endian index, so iteration order is log order.
pub(crate) const CF_LOGS: &str = "logs";
/// Vote, committed log id, last purged log id.
pub(crate) const CF_META: &str = "meta";
/// The latest state-machine snapshot: its metadata and its data.
pub(crate) const CF_SNAPSHOT: &str = "snapshot";

pub(crate) fn open(dir: &Path) -> Result<Arc<DB>> {
    std::fs::create_dir_all(dir).map_err(Error::storage)?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_keep_log_file_num(4);
    let cfs = [CF_LOGS, CF_META, CF_SNAPSHOT].map(|name| {
        let mut cf_opts = Options::default();
        cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        ColumnFamilyDescriptor::new(name, cf_opts)
    });
    let db = DB::open_cf_descriptors(&opts, dir.join("raft"), cfs).map_err(Error::storage)?;
    Ok(Arc::new(db))
}
