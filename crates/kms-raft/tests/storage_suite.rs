//! openraft 0.9's storage conformance suite (`openraft::testing::Suite`) against our log store
//! and state machine, on every storage engine of `kms-store`.

use std::sync::Arc;

use kms_raft::log_store::LogStore;
use kms_raft::state_machine::StateMachineStore;
use kms_raft::TypeConfig;
use kms_store::{FileStorage, MemoryStorage, SledStorage, Storage};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};

type Error = StorageError<kms_raft::NodeId>;

/// Which engine a builder makes stores on.
#[derive(Clone, Copy)]
enum Engine {
    Memory,
    File,
    Sled,
}

struct Builder(Engine);

fn store_err(e: impl std::fmt::Display) -> Error {
    StorageIOError::write(openraft::AnyError::error(e.to_string())).into()
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, Option<tempfile::TempDir>> for Builder {
    async fn build(
        &self,
    ) -> Result<(Option<tempfile::TempDir>, LogStore, StateMachineStore), Error> {
        // Log and state machine share one storage, as in the daemon.
        let (guard, storage): (_, Arc<dyn Storage>) = match self.0 {
            Engine::Memory => (None, Arc::new(MemoryStorage::default())),
            Engine::File => {
                let dir = tempfile::tempdir().map_err(store_err)?;
                let storage = FileStorage::open(dir.path()).map_err(store_err)?;
                (Some(dir), Arc::new(storage))
            }
            Engine::Sled => {
                let dir = tempfile::tempdir().map_err(store_err)?;
                let storage = SledStorage::open(dir.path()).map_err(store_err)?;
                (Some(dir), Arc::new(storage))
            }
        };
        let sm = StateMachineStore::open(storage.clone()).map_err(store_err)?;
        Ok((guard, LogStore::new(storage), sm))
    }
}

fn run(engine: Engine) {
    Suite::test_all(Builder(engine)).expect("openraft storage suite");
}

#[test]
fn openraft_suite_memory() {
    run(Engine::Memory);
}

#[test]
fn openraft_suite_file() {
    run(Engine::File);
}

#[test]
fn openraft_suite_sled() {
    run(Engine::Sled);
}
