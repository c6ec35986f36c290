//! Runs openraft's storage conformance suite against the RocksDB log store and the snapshot
//! store, with a small counter state machine standing in for the application.

use openraft::StorageError;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use serde::Deserialize;
use serde::Serialize;
use tempfile::TempDir;

use crate::StateMachine;
use crate::log_store::LogStore;
use crate::sm_store::SmStore;
use crate::types::TypeConfig;

/// Adds numbers; enough to check that snapshots carry state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Counter {
    pub(crate) total: u64,
}

impl StateMachine for Counter {
    type Command = u64;
    type Response = u64;

    fn apply(&mut self, _index: u64, command: u64) -> u64 {
        self.total += command;
        self.total
    }

    type Frozen = u64;

    fn freeze(&self) -> u64 {
        self.total
    }

    fn write_frozen(total: u64, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        out.write_all(&total.to_be_bytes())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = snapshot
            .try_into()
            .map_err(|_| "counter snapshot is not 8 bytes")?;
        self.total = u64::from_be_bytes(bytes);
        Ok(())
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, SmStore<Counter>, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, SmStore<Counter>), StorageError<TypeConfig>> {
        let dir = TempDir::new().expect("temp dir");
        let db = crate::db::open(dir.path()).expect("open rocksdb");
        let log = LogStore::open(db.clone(), dir.path()).expect("open the log");
        let sm =
            SmStore::open(db, dir.path(), Counter::default()).expect("open state machine store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        Suite::test_all(Builder)
            .await
            .expect("openraft conformance suite")
    });
}
