use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::{Result, Storage, StorageError};

/// Volatile storage for tests and benchmarks of the logic above the disk.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    log: BTreeMap<u64, Vec<u8>>,
    meta: BTreeMap<String, Vec<u8>>,
    snapshot: Option<Vec<u8>>,
}

impl MemoryStorage {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| StorageError::Backend("memory storage lock poisoned".into()))
    }
}

impl Storage for MemoryStorage {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut inner = self.lock()?;
        for (index, data) in entries {
            inner.log.insert(*index, data.clone());
        }
        Ok(())
    }

    fn read_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        let inner = self.lock()?;
        Ok(inner
            .log
            .range(from..to)
            .map(|(i, d)| (*i, d.clone()))
            .collect())
    }

    fn bounds(&self) -> Result<Option<(u64, u64)>> {
        Ok(crate::index_bounds(&self.lock()?.log))
    }

    fn truncate_from(&self, from: u64) -> Result<()> {
        self.lock()?.log.split_off(&from);
        Ok(())
    }

    fn purge_upto(&self, upto: u64) -> Result<()> {
        let mut inner = self.lock()?;
        inner.log = inner.log.split_off(&upto.saturating_add(1));
        if upto == u64::MAX {
            inner.log.clear();
        }
        Ok(())
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock()?.meta.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    fn delete_meta(&self, key: &str) -> Result<()> {
        self.lock()?.meta.remove(key);
        Ok(())
    }

    fn scan_meta(&self, prefix: &str, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(crate::scan_prefix(&self.lock()?.meta, prefix, limit))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }

    fn write_snapshot(
        &self,
        meta: &[u8],
        body: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut buf = Vec::new();
        crate::frame_snapshot(&mut buf, meta, body)
            .map_err(|e| StorageError::Backend(format!("snapshot: {e}")))?;
        self.lock()?.snapshot = Some(buf);
        Ok(())
    }

    fn read_snapshot(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let snapshot = self.lock()?.snapshot.clone();
        match snapshot {
            Some(bytes) => crate::unframe_snapshot(bytes).map(Some),
            None => Ok(None),
        }
    }
}
