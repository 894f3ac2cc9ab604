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
        let sm = StateMachineStore::open(storage.clone(), Default::default()).map_err(store_err)?;
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

/// The suite builds fresh stores only; this is what it cannot see: after a restart (the
/// storage reopened from its files) the log store and the state machine report what was
/// made durable before.
async fn survives_reopen(engine: Engine) {
    use openraft::storage::{RaftLogStorage, RaftStateMachine};
    use openraft::testing::log_id;
    use openraft::{RaftLogReader, RaftSnapshotBuilder, Vote};

    type S = Suite<TypeConfig, LogStore, StateMachineStore, Builder, Option<tempfile::TempDir>>;
    let dir = tempfile::tempdir().unwrap();
    let open = || -> Arc<dyn Storage> {
        match engine {
            Engine::File => Arc::new(FileStorage::open(dir.path()).unwrap()),
            Engine::Sled => Arc::new(SledStorage::open(dir.path()).unwrap()),
            Engine::Memory => unreachable!("nothing to reopen"),
        }
    };
    let snapshot_meta = {
        let storage = open();
        let mut store = LogStore::new(storage.clone());
        // Entries 0..=10 of term 1 and a vote (the suite's own helper).
        S::feed_10_logs_vote_self(&mut store).await.unwrap();
        store.save_committed(Some(log_id(1, 0, 8))).await.unwrap();
        store.purge(log_id(1, 0, 3)).await.unwrap();
        store.truncate(log_id(1, 0, 9)).await.unwrap();
        let mut sm = StateMachineStore::open(storage, Default::default()).unwrap();
        let entries = store.try_get_log_entries(4..=8).await.unwrap();
        sm.apply(entries).await.unwrap();
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        snapshot.meta
    };
    let storage = open();
    let mut store = LogStore::new(storage.clone());
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 0, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 0, 8)));
    assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(1, 0)));
    assert_eq!(store.read_committed().await.unwrap(), Some(log_id(1, 0, 8)));
    let entries = store.try_get_log_entries(0..100).await.unwrap();
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, vec![4, 5, 6, 7, 8]);
    let mut sm = StateMachineStore::open(storage, Default::default()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 0, 8)));
    let current = sm.get_current_snapshot().await.unwrap().expect("snapshot");
    assert_eq!(current.meta, snapshot_meta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_engine_survives_reopen() {
    survives_reopen(Engine::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_engine_survives_reopen() {
    survives_reopen(Engine::Sled).await;
}
