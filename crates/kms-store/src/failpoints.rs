//! Storage failpoints for the fault-injection suite (`tests/faults`, `docs/faults.md`).
//!
//! The points are compiled in only with the `failpoints` feature (the `fail` crate's macros
//! expand to nothing otherwise). With it, the configuration comes from:
//! - `FAILPOINTS` at start (`name=actions;name=actions`, the `fail` crate's syntax), and
//! - `KMS_FAILPOINTS_FILE`, a file re-read every 100 ms while the process runs: each change
//!   replaces the whole configuration (one `name=actions` per line; an empty file turns every
//!   point off). This lets a test inject a disk fault into a running node and heal it.
//!
//! Points: `wal-write` (before a WAL write; `return` fails it with ENOSPC), `wal-fsync`
//! (before a WAL fdatasync; `return` fails it with EIO, `sleep(ms)` stalls it).

/// Name of the failpoint before every WAL write.
pub const WAL_WRITE: &str = "wal-write";
/// Name of the failpoint before every WAL fdatasync.
pub const WAL_FSYNC: &str = "wal-fsync";

/// Reads the configuration once per process (called when a store opens).
#[cfg(feature = "failpoints")]
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(spec) = std::env::var("FAILPOINTS") {
            apply(&spec.replace(';', "\n"), &mut Vec::new());
        }
        if let Ok(path) = std::env::var("KMS_FAILPOINTS_FILE") {
            let spawned = std::thread::Builder::new()
                .name("failpoints".into())
                .spawn(move || watch(std::path::PathBuf::from(path)));
            if let Err(e) = spawned {
                eprintln!("failpoints: cannot start the watcher: {e}");
            }
        }
    });
}

#[cfg(not(feature = "failpoints"))]
pub(crate) fn init() {}

#[cfg(feature = "failpoints")]
fn watch(path: std::path::PathBuf) {
    let mut last: Option<String> = None;
    let mut active: Vec<String> = Vec::new();
    loop {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if last.as_deref() != Some(now.as_str()) {
            for name in active.drain(..) {
                fail::remove(name);
            }
            apply(&now, &mut active);
            last = Some(now);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[cfg(feature = "failpoints")]
fn apply(spec: &str, active: &mut Vec<String>) {
    for line in spec.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((name, actions)) = line.split_once('=') else {
            eprintln!("failpoints: ignoring {line:?} (want name=actions)");
            continue;
        };
        match fail::cfg(name.trim(), actions.trim()) {
            Ok(()) => {
                eprintln!("failpoints: {} = {}", name.trim(), actions.trim());
                active.push(name.trim().to_owned());
            }
            Err(e) => eprintln!("failpoints: bad actions for {name}: {e}"),
        }
    }
}
