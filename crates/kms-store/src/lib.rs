//! Durable storage behind a small trait, so the engine (sled today) can be swapped after
//! measurement without touching the node logic.
//!
//! The model is the one a Raft node needs: an append-only log of opaque entries addressed by
//! a `u64` index, plus a few named metadata values (vote, last snapshot, ...). Writes become
//! durable at [`Storage::flush`], which the caller issues once per batch (group commit).

mod memory;
mod sled_store;

pub use memory::MemoryStorage;
pub use sled_store::SledStorage;

/// A storage failure. Carries the backend's message; the caller adds context.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("corrupt storage: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Log + metadata storage used by the node.
pub trait Storage: Send + Sync + 'static {
    /// Appends (or overwrites) entries. Not durable until [`Storage::flush`].
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<()>;
    /// Entries with `from <= index < to`, in index order.
    fn read_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>>;
    /// Index of the first and last stored entry, if any.
    fn bounds(&self) -> Result<Option<(u64, u64)>>;
    /// Removes entries with `index >= from` (a Raft follower discarding a conflicting suffix).
    fn truncate_from(&self, from: u64) -> Result<()>;
    /// Removes entries with `index <= upto` (log compaction after a snapshot).
    fn purge_upto(&self, upto: u64) -> Result<()>;
    /// Stores a named metadata value. Not durable until [`Storage::flush`].
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()>;
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Makes every earlier write durable (one fsync for the whole batch).
    fn flush(&self) -> Result<()>;
    /// Bytes used on disk (approximate; 0 for memory).
    fn size_on_disk(&self) -> Result<u64>;
}

#[cfg(test)]
mod conformance {
    //! The same behavioural checks for every backend.
    use super::*;

    pub fn exercise(store: &dyn Storage) {
        assert_eq!(store.bounds().unwrap(), None);
        let entries: Vec<(u64, Vec<u8>)> = (1..=10).map(|i| (i, vec![i as u8; 3])).collect();
        store.append(&entries).unwrap();
        store.flush().unwrap();
        assert_eq!(store.bounds().unwrap(), Some((1, 10)));
        let got = store.read_range(3, 6).unwrap();
        assert_eq!(got, entries[2..5].to_vec());
        store.truncate_from(8).unwrap();
        assert_eq!(store.bounds().unwrap(), Some((1, 7)));
        store.purge_upto(4).unwrap();
        assert_eq!(store.bounds().unwrap(), Some((5, 7)));
        assert_eq!(store.read_range(0, 100).unwrap().len(), 3);
        store.put_meta("vote", b"abc").unwrap();
        assert_eq!(store.get_meta("vote").unwrap().as_deref(), Some(&b"abc"[..]));
        assert_eq!(store.get_meta("missing").unwrap(), None);
        store.purge_upto(7).unwrap();
        assert_eq!(store.bounds().unwrap(), None);
    }

    #[test]
    fn memory_backend() {
        exercise(&MemoryStorage::default());
    }

    #[test]
    fn sled_backend_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStorage::open(dir.path()).unwrap();
            exercise(&store);
            store.append(&[(42, b"durable".to_vec())]).unwrap();
            store.put_meta("k", b"v").unwrap();
            store.flush().unwrap();
        }
        let store = SledStorage::open(dir.path()).unwrap();
        assert_eq!(store.bounds().unwrap(), Some((42, 42)));
        assert_eq!(store.get_meta("k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
