//! Durable storage behind a small trait, so the engine (sled today) can be swapped after
//! measurement without touching the node logic.
//!
//! The model is the one a Raft node needs: an append-only log of opaque entries addressed by
//! a `u64` index, plus a few named metadata values (vote, last snapshot, ...). Writes become
//! durable at [`Storage::flush`], which the caller issues once per batch (group commit).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

mod failpoints;
mod file_store;
mod memory;
mod sled_store;

pub use failpoints::{WAL_FSYNC, WAL_WRITE};
pub use file_store::{FileOptions, FileStorage};
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
    /// Removes a metadata value (no error if absent). Not durable until [`Storage::flush`].
    fn delete_meta(&self, key: &str) -> Result<()>;
    /// Metadata entries whose key starts with `prefix`, in key order, at most `limit`.
    fn scan_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>>;
    /// Makes every earlier write durable (one fsync for the whole batch).
    fn flush(&self) -> Result<()>;
    /// Bytes used on disk (approximate; 0 for memory).
    fn size_on_disk(&self) -> Result<u64>;
    /// Replaces the snapshot atomically and durably. `meta` is small (e.g. the last index);
    /// `body` streams the (possibly large) state into the writer it is given.
    fn write_snapshot(
        &self,
        meta: &[u8],
        body: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<()>;
    /// The last snapshot written, as (meta, body).
    fn read_snapshot(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
}

/// Snapshot framing shared by the backends: `u32 LE meta length || meta || body`.
fn frame_snapshot(
    out: &mut dyn Write,
    meta: &[u8],
    body: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let len = u32::try_from(meta.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "snapshot meta too large"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(meta)?;
    body(out)
}

const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";

fn io_err(what: &str, e: io::Error) -> StorageError {
    StorageError::Backend(format!("{what}: {e}"))
}

/// Writes `<dir>/snapshot` for the file-based backends: a temporary file, fsynced and renamed,
/// so a large state is streamed to disk and a crash leaves either the old or the new snapshot.
fn write_snapshot_file(
    dir: &Path,
    meta: &[u8],
    body: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> Result<()> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let file = File::create(&tmp).map_err(|e| io_err("create snapshot", e))?;
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    let written = frame_snapshot(&mut out, meta, body)
        .and_then(|()| out.flush())
        .and_then(|()| out.get_ref().sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write snapshot", e));
    }
    drop(out);
    fs::rename(&tmp, dir.join(SNAPSHOT_FILE)).map_err(|e| io_err("rename snapshot", e))?;
    // The rename itself must survive a crash.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync storage dir", e))
}

/// Reads `<dir>/snapshot` written by [`write_snapshot_file`].
fn read_snapshot_file(dir: &Path) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    match fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(bytes) => unframe_snapshot(bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read snapshot", e)),
    }
}

/// [`Storage::scan_meta`] over an in-memory metadata map (memory and file backends).
fn scan_prefix(
    meta: &BTreeMap<String, Vec<u8>>,
    prefix: &str,
    limit: usize,
) -> Vec<(String, Vec<u8>)> {
    meta.range(prefix.to_owned()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// [`Storage::bounds`] over an in-memory index of the log (memory and file backends).
fn index_bounds<V>(log: &BTreeMap<u64, V>) -> Option<(u64, u64)> {
    log.first_key_value()
        .zip(log.last_key_value())
        .map(|((first, _), (last, _))| (*first, *last))
}

/// Size of `<dir>/snapshot`, 0 when there is none.
fn snapshot_file_size(dir: &Path) -> u64 {
    fs::metadata(dir.join(SNAPSHOT_FILE))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn unframe_snapshot(bytes: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>)> {
    let corrupt = || StorageError::Corrupt("snapshot header".into());
    let len_bytes: [u8; 4] = bytes
        .get(..4)
        .ok_or_else(corrupt)?
        .try_into()
        .map_err(|_| corrupt())?;
    let meta_len = u32::from_le_bytes(len_bytes) as usize;
    let meta_end = 4usize.checked_add(meta_len).ok_or_else(corrupt)?;
    let meta = bytes.get(4..meta_end).ok_or_else(corrupt)?.to_vec();
    let body = bytes.get(meta_end..).ok_or_else(corrupt)?.to_vec();
    Ok((meta, body))
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
        assert_eq!(
            store.get_meta("vote").unwrap().as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(store.get_meta("missing").unwrap(), None);
        store.put_meta("q/002", b"b").unwrap();
        store.put_meta("q/001", b"a").unwrap();
        store.put_meta("r/001", b"x").unwrap();
        let scanned = store.scan_meta("q/", 10).unwrap();
        assert_eq!(
            scanned,
            vec![
                ("q/001".to_owned(), b"a".to_vec()),
                ("q/002".to_owned(), b"b".to_vec())
            ]
        );
        assert_eq!(store.scan_meta("q/", 1).unwrap().len(), 1);
        store.delete_meta("q/001").unwrap();
        store.delete_meta("q/404").unwrap();
        assert_eq!(store.scan_meta("q/", 10).unwrap().len(), 1);
        store.purge_upto(7).unwrap();
        assert_eq!(store.bounds().unwrap(), None);

        assert_eq!(store.read_snapshot().unwrap(), None);
        store
            .write_snapshot(b"m1", &mut |w| w.write_all(b"first body"))
            .unwrap();
        store
            .write_snapshot(b"meta-2", &mut |w| w.write_all(&[7u8; 100_000]))
            .unwrap();
        let (meta, body) = store.read_snapshot().unwrap().unwrap();
        assert_eq!(meta, b"meta-2");
        assert_eq!(body, vec![7u8; 100_000]);
        // A failing writer leaves the previous snapshot in place.
        let err = store.write_snapshot(b"m3", &mut |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("disk full"))
        });
        assert!(err.is_err());
        assert_eq!(store.read_snapshot().unwrap().unwrap().0, b"meta-2");
    }

    #[test]
    fn corrupt_snapshot_frames_are_errors() {
        assert!(unframe_snapshot(vec![1, 0]).is_err());
        assert!(unframe_snapshot(vec![9, 0, 0, 0, 1]).is_err());
        assert_eq!(
            unframe_snapshot(vec![1, 0, 0, 0, 5, 6]).unwrap(),
            (vec![5], vec![6])
        );
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

    #[test]
    fn file_backend_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStorage::open(dir.path()).unwrap();
            exercise(&store);
            store.append(&[(42, b"durable".to_vec())]).unwrap();
            store.put_meta("k", b"v").unwrap();
            store.flush().unwrap();
        }
        let store = FileStorage::open(dir.path()).unwrap();
        assert_eq!(store.bounds().unwrap(), Some((42, 42)));
        assert_eq!(
            store.read_range(0, 100).unwrap(),
            vec![(42, b"durable".to_vec())]
        );
        assert_eq!(store.get_meta("k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(
            store.get_meta("vote").unwrap().as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(store.read_snapshot().unwrap().unwrap().0, b"meta-2");
    }

    #[test]
    fn file_backend_with_tiny_segments() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&FileStorage::open_with(dir.path(), FileOptions { segment_bytes: 16 }).unwrap());
    }
}
