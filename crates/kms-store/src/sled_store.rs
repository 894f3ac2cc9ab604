use std::path::Path;

use crate::{Result, Storage, StorageError};

/// sled-backed storage: one tree for the log (big-endian index keys, so iteration order is
/// index order) and one for metadata.
#[derive(Debug, Clone)]
pub struct SledStorage {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
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
        let db = sled::Config::new()
            .path(dir)
            // Durability comes from our explicit flush per batch, not from sled's timer.
            .flush_every_ms(None)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(backend)?;
        let log = db.open_tree("log").map_err(backend)?;
        let meta = db.open_tree("meta").map_err(backend)?;
        Ok(Self { db, log, meta })
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
        self.meta.insert(key.as_bytes(), value).map(|_| ()).map_err(backend)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.meta.get(key.as_bytes()).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.db.size_on_disk().map_err(backend)
    }
}
