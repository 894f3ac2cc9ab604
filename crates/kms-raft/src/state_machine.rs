//! The Raft state machine: committed `kms_core::Command`s applied to `kms_core::State`.
//!
//! The state lives in memory (shared read-only with the KMS listeners and the admin API);
//! snapshots are streamed to a file through [`Storage::write_snapshot`]. After a restart the
//! state is the last snapshot plus the committed log entries openraft re-applies.

use std::io::Cursor;
use std::sync::Arc;

use std::collections::HashMap;

use kms_core::State;
use kms_store::Storage;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use tokio::sync::{watch, RwLock};

use crate::auth::{CertDirectory, PeerAuth};
use crate::types::{
    ApplyResult, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// What has been applied (published to waiters and status).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// State machine handle (cheap to clone; a clone is also the snapshot builder).
#[derive(Clone)]
pub struct StateMachineStore {
    state: Arc<RwLock<State>>,
    applied: Arc<watch::Sender<Applied>>,
    storage: Arc<dyn Storage>,
    /// The node certificates the state records, published for the transport's peer checks.
    certs: CertDirectory,
}

/// Publishes the state's node certificates for the transport.
fn publish_certs(state: &State, certs: &CertDirectory) {
    let directory: HashMap<_, _> = state
        .security()
        .node_certs()
        .map(|(id, fp)| (*fp, id))
        .collect();
    PeerAuth::publish_certs(certs, directory);
}

impl StateMachineStore {
    /// Loads the last snapshot from `storage`, if any.
    pub fn open(storage: Arc<dyn Storage>, certs: CertDirectory) -> Result<Self, String> {
        let (state, applied) = match storage.read_snapshot().map_err(|e| e.to_string())? {
            Some((meta, body)) => {
                let meta: SnapshotMeta =
                    postcard::from_bytes(&meta).map_err(|e| format!("snapshot meta: {e}"))?;
                let state = State::from_snapshot(&body).map_err(|e| format!("snapshot: {e}"))?;
                (
                    state,
                    Applied {
                        last_applied: meta.last_log_id,
                        membership: meta.last_membership,
                    },
                )
            }
            None => (State::default(), Applied::default()),
        };
        let (applied_tx, _) = watch::channel(applied);
        publish_certs(&state, &certs);
        Ok(Self {
            state: Arc::new(RwLock::new(state)),
            applied: Arc::new(applied_tx),
            storage,
            certs,
        })
    }

    /// The applied state, for readers.
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.state.clone()
    }

    /// Watches the last applied log id and membership.
    pub fn applied(&self) -> watch::Receiver<Applied> {
        self.applied.subscribe()
    }

    /// Writes the current state as the snapshot file and returns its meta and size.
    async fn write_current(&self) -> Result<(SnapshotMeta, u64), StorageError> {
        // The read lock keeps `applied` and the state consistent while streaming.
        let guard = self.state.clone().read_owned().await;
        let applied = self.applied.borrow().clone();
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                applied.last_applied.map(|l| l.leader_id.term).unwrap_or(0),
                applied.last_applied.map(|l| l.index).unwrap_or(0)
            ),
        };
        let meta_bytes =
            postcard::to_allocvec(&meta).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let storage = self.storage.clone();
        let started = std::time::Instant::now();
        let size = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let mut counter = CountingWriter::default();
            storage
                .write_snapshot(&meta_bytes, &mut |out| {
                    let mut tee = Tee {
                        inner: out,
                        counter: &mut counter,
                    };
                    guard
                        .write_snapshot(&mut tee)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .map_err(|e| e.to_string())?;
            drop(guard);
            Ok(counter.0)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?
        .map_err(|e| StorageIOError::write_snapshot(None, openraft::AnyError::error(e)))?;
        metrics::histogram!("kms_snapshot_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("kms_snapshot_size_bytes").set(size as f64);
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes = size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok((meta, size))
    }
}

/// Counts the bytes of the streamed state.
#[derive(Default)]
struct CountingWriter(u64);

struct Tee<'a> {
    inner: &'a mut dyn std::io::Write,
    counter: &'a mut CountingWriter,
}

impl std::io::Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.counter.0 += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, _size) = self.write_current().await?;
        // openraft 0.9 keeps only the meta of a snapshot it had built; followers get the
        // bytes from `get_current_snapshot`, which reads the file. Not loading a second copy
        // of the state here keeps the resident size down.
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.applied.borrow();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        let mut state = self.state.write().await;
        let mut applied = self.applied.borrow().clone();
        let mut security_changed = false;
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(ApplyResult::Internal),
                EntryPayload::Normal(command) => {
                    security_changed |= matches!(command, kms_core::Command::Security(_));
                    results.push(ApplyResult::Command(state.apply(&command)));
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    results.push(ApplyResult::Internal);
                }
            }
        }
        if security_changed {
            publish_certs(&state, &self.certs);
        }
        // Published before the lock is released so a snapshot never pairs this state with an
        // older applied index.
        self.applied.send_replace(applied);
        drop(state);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let body = snapshot.into_inner();
        let signature = Some(meta.signature());
        let new_state = State::from_snapshot(&body)
            .map_err(|e| StorageIOError::read_snapshot(signature.clone(), &e))?;
        let meta_bytes = postcard::to_allocvec(meta)
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || {
            storage.write_snapshot(&meta_bytes, &mut |out| out.write_all(&body))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?
        .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        let mut state = self.state.write().await;
        publish_certs(&new_state, &self.certs);
        *state = new_state;
        self.applied.send_replace(Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        });
        drop(state);
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let storage = self.storage.clone();
        let found = tokio::task::spawn_blocking(move || storage.read_snapshot())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        match found {
            Some((meta, body)) => {
                let meta: SnapshotMeta = postcard::from_bytes(&meta)
                    .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(body)),
                }))
            }
            None => Ok(None),
        }
    }
}
