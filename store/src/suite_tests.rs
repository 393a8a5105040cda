//! openraft's storage test suite against the RocksDB log store and state machine.

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

use crate::db::{self, DbUser};
use crate::log_store::LogStore;
use crate::state_machine::{SmConfig, StateMachineStore};
use crate::types::TypeConfig;

/// Builds a log store and a state machine on a fresh RocksDB in a temporary directory.
struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = TempDir::new().expect("temp dir");
        let db = Arc::new(db::open(&dir.path().join("db")).expect("open rocksdb"));
        let (user, _users) = DbUser::new();
        let log_store = LogStore::new(db.clone(), true, user.clone());
        let (sm, _shared) = StateMachineStore::open(
            db,
            SmConfig {
                snapshot_dir: dir.path().join("snapshot"),
                history_size: 100,
                watch_channel_capacity: 16,
            },
            user,
        )
        .expect("open state machine");
        Ok((dir, log_store, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RocksBuilder).expect("openraft storage suite");
}
