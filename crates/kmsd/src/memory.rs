//! The registry bound derived from the memory this node may use.
//!
//! The client registry is the only part of the state that grows with the number of clients
//! (docs/capacity.md: 166 bytes per client of state, about 300 bytes per client of resident
//! memory once allocator slack, a snapshot being written and a joining node's snapshot are
//! counted: "plan 3 GiB for 10 million"). The bound is what fits in the node's memory limit
//! after a fixed reserve for the runtime, buffers and the event log, so a flood of invented
//! CMIDs makes the registry evict its least recently seen clients instead of getting the
//! node killed for running out of memory.

use std::path::{Path, PathBuf};

/// Resident bytes planned per registered client (docs/capacity.md).
pub const BYTES_PER_CLIENT: u64 = 300;
/// Memory kept for everything but the registry: runtime, connection buffers, event log,
/// metrics (measured: 23 MiB fixed; doubled).
pub const RESERVE_BYTES: u64 = 64 * 1024 * 1024;
/// Smallest derived bound (a node with very little memory still keeps an inventory).
pub const MIN_CLIENTS: usize = 10_000;
/// Largest derived bound: the default of `kms_core` (20 million, about 6 GB).
pub const MAX_CLIENTS: usize = kms_core::registry::MAX_CLIENTS;

/// Where a memory limit came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// `cgroup memory.max /path`, `cgroup memory.limit_in_bytes`, or `MemTotal`.
    pub source: String,
}

/// The registry bound for a node that may use `limit` bytes.
pub fn clients_for(limit: u64) -> usize {
    let usable = limit.saturating_sub(RESERVE_BYTES);
    let clients = usize::try_from(usable / BYTES_PER_CLIENT).unwrap_or(usize::MAX);
    clients.clamp(MIN_CLIENTS, MAX_CLIENTS)
}

/// The smallest of the cgroup limits of this process (v2 along its whole path, or v1) and
/// the machine's memory; `None` when none can be read (non-Linux).
pub fn memory_limit() -> Option<MemoryLimit> {
    memory_limit_in(Path::new("/"))
}

/// [`memory_limit`] with `/proc` and `/sys` under `root` (tests use a fake tree).
pub fn memory_limit_in(root: &Path) -> Option<MemoryLimit> {
    let mut best: Option<MemoryLimit> = mem_total(root).map(|bytes| MemoryLimit {
        bytes,
        source: "MemTotal".into(),
    });
    let mut consider = |bytes: u64, source: String| {
        if best.as_ref().is_none_or(|b| bytes < b.bytes) {
            best = Some(MemoryLimit { bytes, source });
        }
    };
    let cgroup = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: every level of the path may set a limit; the smallest applies.
            let base = root.join("sys/fs/cgroup");
            for dir in ancestors(&base, path) {
                if let Some(bytes) = read_limit(&dir.join("memory.max")) {
                    consider(bytes, format!("cgroup memory.max {}", dir.display()));
                }
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let base = root.join("sys/fs/cgroup/memory");
            for dir in ancestors(&base, path) {
                if let Some(bytes) = read_limit(&dir.join("memory.limit_in_bytes")) {
                    consider(
                        bytes,
                        format!("cgroup memory.limit_in_bytes {}", dir.display()),
                    );
                }
            }
        }
    }
    best
}

/// `base/a/b/c`, `base/a/b`, `base/a`, `base` for the path `a/b/c`.
fn ancestors(base: &Path, path: &str) -> Vec<PathBuf> {
    let mut dirs = vec![base.to_path_buf()];
    let mut dir = base.to_path_buf();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
        dir.push(part);
        dirs.push(dir.clone());
    }
    dirs.reverse();
    dirs
}

/// A limit file: a number of bytes; `max` or a huge v1 value (no limit) gives `None`.
fn read_limit(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let bytes: u64 = text.trim().parse().ok()?;
    // cgroup v1 writes "no limit" as a page-rounded i64::MAX.
    (bytes < (1 << 60)).then_some(bytes)
}

fn mem_total(root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("proc/meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn bound_follows_memory_within_limits() {
        // 3 GiB: about 10 million clients (docs/capacity.md's plan).
        let n = clients_for(3 << 30);
        assert!((10_000_000..11_000_000).contains(&n), "{n}");
        assert_eq!(clients_for(512 << 20), (448 << 20) / 300);
        assert_eq!(clients_for(10 << 20), MIN_CLIENTS);
        assert_eq!(clients_for(1 << 40), MAX_CLIENTS);
    }

    #[test]
    fn smallest_of_meminfo_and_cgroup_v2_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "proc/meminfo",
            "MemTotal:       16384000 kB\nMemFree: 1 kB\n",
        );
        write(root, "proc/self/cgroup", "0::/system.slice/kmsd.service\n");
        write(root, "sys/fs/cgroup/memory.max", "max\n");
        write(
            root,
            "sys/fs/cgroup/system.slice/memory.max",
            "8589934592\n",
        );
        write(
            root,
            "sys/fs/cgroup/system.slice/kmsd.service/memory.max",
            "1073741824\n",
        );
        let l = memory_limit_in(root).unwrap();
        assert_eq!(l.bytes, 1 << 30);
        assert!(l.source.contains("kmsd.service"), "{}", l.source);
        // No cgroup limit: MemTotal.
        write(
            root,
            "sys/fs/cgroup/system.slice/kmsd.service/memory.max",
            "max\n",
        );
        write(root, "sys/fs/cgroup/system.slice/memory.max", "max\n");
        let l = memory_limit_in(root).unwrap();
        assert_eq!((l.bytes, l.source.as_str()), (16384000 * 1024, "MemTotal"));
    }

    #[test]
    fn cgroup_v1_and_unlimited_values() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "proc/meminfo", "MemTotal: 4000000 kB\n");
        write(
            root,
            "proc/self/cgroup",
            "12:cpu,cpuacct:/\n11:memory:/docker/abc\n",
        );
        write(
            root,
            "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
            "536870912\n",
        );
        write(
            root,
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(memory_limit_in(root).unwrap().bytes, 512 << 20);
        assert!(memory_limit_in(&root.join("nothing")).is_none());
    }
}
