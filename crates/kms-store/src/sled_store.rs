use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{io_err, Result, Storage, StorageError};

/// sled-backed storage: one tree for the log (big-endian index keys, so iteration order is
/// index order) and one for metadata, in `<dir>/db`. Snapshots are plain files beside it
/// (`<dir>/snapshot`), written to a temporary file, fsynced and renamed, so a large state is
/// streamed to disk instead of living in sled's page cache.
#[derive(Debug, Clone)]
pub struct SledStorage {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    dir: PathBuf,
}

fn backend(e: sled::Error) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn decode_index(key: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StorageError::Corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

impl SledStorage {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| io_err("create storage dir", e))?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            // Durability comes from our explicit flush per batch, not from sled's timer.
            .flush_every_ms(None)
            // Reads happen at recovery only; a small cache keeps the resident size low.
            .cache_capacity(4 * 1024 * 1024)
            .open()
            .map_err(backend)?;
        let log = db.open_tree("log").map_err(backend)?;
        let meta = db.open_tree("meta").map_err(backend)?;
        Ok(Self {
            db,
            log,
            meta,
            dir: dir.to_path_buf(),
        })
    }
}

impl Storage for SledStorage {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (index, data) in entries {
            batch.insert(&index.to_be_bytes(), data.as_slice());
        }
        self.log.apply_batch(batch).map_err(backend)
    }

    fn read_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.log
            .range(from.to_be_bytes()..to.to_be_bytes())
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                Ok((decode_index(&k)?, v.to_vec()))
            })
            .collect()
    }

    fn bounds(&self) -> Result<Option<(u64, u64)>> {
        let first = self.log.first().map_err(backend)?;
        let last = self.log.last().map_err(backend)?;
        match (first, last) {
            (Some((a, _)), Some((b, _))) => Ok(Some((decode_index(&a)?, decode_index(&b)?))),
            _ => Ok(None),
        }
    }

    fn truncate_from(&self, from: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(from.to_be_bytes()..).keys() {
            batch.remove(key.map_err(backend)?);
        }
        self.log.apply_batch(batch).map_err(backend)
    }

    fn purge_upto(&self, upto: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for key in self.log.range(..=upto.to_be_bytes()).keys() {
            batch.remove(key.map_err(backend)?);
        }
        self.log.apply_batch(batch).map_err(backend)
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.meta
            .insert(key.as_bytes(), value)
            .map(|_| ())
            .map_err(backend)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .meta
            .get(key.as_bytes())
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn delete_meta(&self, key: &str) -> Result<()> {
        self.meta
            .remove(key.as_bytes())
            .map(|_| ())
            .map_err(backend)
    }

    fn scan_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        self.meta
            .scan_prefix(prefix.as_bytes())
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(backend)?;
                let key = String::from_utf8(k.to_vec())
                    .map_err(|_| StorageError::Corrupt("non-UTF-8 metadata key".into()))?;
                Ok((key, v.to_vec()))
            })
            .collect()
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk().map_err(backend)? + crate::snapshot_file_size(&self.dir))
    }

    fn write_snapshot(
        &self,
        meta: &[u8],
        body: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        crate::write_snapshot_file(&self.dir, meta, body)
    }

    fn read_snapshot(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        crate::read_snapshot_file(&self.dir)
    }
}
