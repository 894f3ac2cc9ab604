//! The Raft log, vote and committed index on a [`Storage`]. An append is acknowledged to
//! openraft only after it is flushed, so an entry counted towards a quorum is on disk.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use kms_store::Storage;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError, Vote};

use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE_KEY: &str = "raft.vote";
const COMMITTED_KEY: &str = "raft.committed";
const PURGED_KEY: &str = "raft.purged";

/// Log storage handle (cheap to clone; the clone is also the log reader).
#[derive(Clone)]
pub struct LogStore {
    storage: Arc<dyn Storage>,
}

impl LogStore {
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Self { storage }
    }

    /// Runs blocking storage work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, kms_store::StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Storage) -> Result<T, kms_store::StorageError> + Send + 'static,
    {
        let storage = self.storage.clone();
        tokio::task::spawn_blocking(move || f(storage.as_ref()))
            .await
            .map_err(|e| kms_store::StorageError::Backend(format!("storage task: {e}")))?
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        match self.storage.get_meta(key).map_err(|e| e.to_string())? {
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| format!("{key}: {e}")),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), String> {
        let bytes = postcard::to_allocvec(value).map_err(|e| e.to_string())?;
        self.storage
            .put_meta(key, &bytes)
            .map_err(|e| e.to_string())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, String> {
        let Some((_, last)) = self.storage.bounds().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let entries = self
            .storage
            .read_range(last, last.saturating_add(1))
            .map_err(|e| e.to_string())?;
        match entries.first() {
            Some((_, bytes)) => {
                let entry: Entry = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }
}

fn range_to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(v) => *v,
        Bound::Excluded(v) => v.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(v) => v.saturating_add(1),
        Bound::Excluded(v) => *v,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (from, to) = range_to_bounds(&range);
        let raw = self
            .storage
            .read_range(from, to)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        raw.iter()
            .map(|(index, bytes)| {
                postcard::from_bytes::<Entry>(bytes)
                    .map_err(|e| StorageIOError::read_log_at_index(*index, &e).into())
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self
            .get_meta::<Option<LogId>>(PURGED_KEY)
            .map_err(|e| StorageIOError::read_logs(openraft::AnyError::error(e)))?
            .flatten();
        let last = self
            .last_entry_log_id()
            .map_err(|e| StorageIOError::read_logs(openraft::AnyError::error(e)))?;
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.blocking(move |s| {
            s.put_meta(VOTE_KEY, &bytes)?;
            // A vote must be durable before it is acted upon.
            s.flush()
        })
        .await
        .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE_KEY)
            .map_err(|e| StorageIOError::read_vote(openraft::AnyError::error(e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Durable with the next flush: it only lets a restart re-apply sooner.
        self.put_meta(COMMITTED_KEY, &committed)
            .map_err(|e| StorageIOError::write(openraft::AnyError::error(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId>>(COMMITTED_KEY)
            .map_err(|e| StorageIOError::read(openraft::AnyError::error(e)))?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let encoded: Result<Vec<(u64, Vec<u8>)>, _> = entries
            .into_iter()
            .map(|e| postcard::to_allocvec(&e).map(|b| (e.log_id.index, b)))
            .collect();
        let encoded = encoded.map_err(|e| StorageIOError::write_logs(&e))?;
        let count = encoded.len();
        let result = self
            .blocking(move |s| {
                s.append(&encoded)?;
                s.flush()
            })
            .await;
        metrics::counter!("kms_raft_log_appends_total").increment(1);
        metrics::counter!("kms_raft_log_entries_appended_total").increment(count as u64);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |s| {
            s.truncate_from(log_id.index)?;
            s.flush()
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes =
            postcard::to_allocvec(&Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        self.blocking(move |s| {
            // Record the purge point first so a crash in between never loses track of it.
            s.put_meta(PURGED_KEY, &bytes)?;
            s.flush()?;
            s.purge_upto(log_id.index)?;
            s.flush()
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
