//! Side-by-side measurement of the storage engines on one machine and one workload:
//! our file engine ([`FileStorage`]), databend's `raft-log` crate (the engine databend-meta
//! moved to from sled) and sled ([`SledStorage`]).
//!
//! Workload, like the activation path (one Raft append of a group-commit batch, then one
//! fsync before the append is acknowledged):
//! * `single`: 1,000 appends of 1 entry, each followed by an fsync (one client at a time);
//! * `batch16`: 300 appends of 16 entries, each followed by an fsync (group commit under load);
//! * `read`: every entry read back, in the same process;
//! * `reopen+read`: the store reopened (log replay) and every entry read back.
//!
//! Entries are 256 bytes (an `Activate` command of one request is about 200). Rounds are
//! interleaved (file, raft-log, sled, file, ...) so load from other processes hits all
//! engines alike; the report gives the median of each and the ratios to the file engine.
//!
//!   cargo run --release -p kms-store --example engine_compare [-- ROUNDS [DIR]]
//!
//! DIR must be on the disk being measured (not a tmpfs); default: the current directory.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_store::{FileStorage, SledStorage, Storage};
use raft_log::api::raft_log_writer::RaftLogWriter;

const ENTRY_BYTES: usize = 256;
const SINGLE_APPENDS: u64 = 1_000;
const BATCH_APPENDS: u64 = 300;
const BATCH: u64 = 16;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Types;

impl raft_log::Types for Types {
    type LogId = (u64, u64);
    type LogPayload = Vec<u8>;
    type Vote = (u64, u64);
    type Callback = std::sync::mpsc::SyncSender<Result<(), io::Error>>;
    type UserData = Vec<u8>;

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.1
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.len() as u64
    }
}

fn payload(index: u64) -> Vec<u8> {
    (0..ENTRY_BYTES)
        .map(|i| (index as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// One engine behind the operations the workload needs.
trait Engine {
    /// Appends entries and returns once they are durable.
    fn append_durable(&mut self, first: u64, count: u64) -> io::Result<()>;
    /// Reads every entry back; returns how many.
    fn read_all(&mut self) -> io::Result<u64>;
}

struct File(FileStorage);
struct Sled(SledStorage);
struct RaftLog(raft_log::RaftLog<Types>);

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Engine for File {
    fn append_durable(&mut self, first: u64, count: u64) -> io::Result<()> {
        let batch: Vec<_> = (first..first + count).map(|i| (i, payload(i))).collect();
        self.0.append(&batch).map_err(other)?;
        self.0.flush().map_err(other)
    }

    fn read_all(&mut self) -> io::Result<u64> {
        Ok(self.0.read_range(0, u64::MAX).map_err(other)?.len() as u64)
    }
}

impl Engine for Sled {
    fn append_durable(&mut self, first: u64, count: u64) -> io::Result<()> {
        let batch: Vec<_> = (first..first + count).map(|i| (i, payload(i))).collect();
        self.0.append(&batch).map_err(other)?;
        self.0.flush().map_err(other)
    }

    fn read_all(&mut self) -> io::Result<u64> {
        Ok(self.0.read_range(0, u64::MAX).map_err(other)?.len() as u64)
    }
}

impl Engine for RaftLog {
    fn append_durable(&mut self, first: u64, count: u64) -> io::Result<()> {
        self.0
            .append((first..first + count).map(|i| ((1, i), payload(i))))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.0.flush(true, Some(tx))?;
        rx.recv().map_err(other)?
    }

    fn read_all(&mut self) -> io::Result<u64> {
        let mut n = 0;
        for item in self.0.read(0, u64::MAX) {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    File,
    RaftLog,
    Sled,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::File => "file (ours)",
            Kind::RaftLog => "raft-log 0.4",
            Kind::Sled => "sled 0.34",
        }
    }

    fn open(self, dir: &Path) -> io::Result<Box<dyn Engine>> {
        Ok(match self {
            Kind::File => Box::new(File(FileStorage::open(dir).map_err(other)?)),
            Kind::Sled => Box::new(Sled(SledStorage::open(dir).map_err(other)?)),
            Kind::RaftLog => {
                let config = raft_log::Config::new(dir.to_str().ok_or_else(|| other("dir"))?);
                Box::new(RaftLog(raft_log::RaftLog::open(Arc::new(config))?))
            }
        })
    }
}

/// Seconds per operation of one round: single append, batch append, read all, reopen+read.
struct Round {
    single_ms: f64,
    batch_ms: f64,
    read_ms: f64,
    reopen_ms: f64,
}

fn round(kind: Kind, base: &Path) -> io::Result<Round> {
    let dir = tempfile::tempdir_in(base)?;
    let mut engine = kind.open(dir.path())?;
    let started = Instant::now();
    for i in 1..=SINGLE_APPENDS {
        engine.append_durable(i, 1)?;
    }
    let single = started.elapsed() / SINGLE_APPENDS as u32;
    let started = Instant::now();
    let mut next = SINGLE_APPENDS + 1;
    for _ in 0..BATCH_APPENDS {
        engine.append_durable(next, BATCH)?;
        next += BATCH;
    }
    let batch = started.elapsed() / BATCH_APPENDS as u32;
    let total = next - 1;
    let started = Instant::now();
    assert_eq!(engine.read_all()?, total);
    let read = started.elapsed();
    drop(engine);
    let started = Instant::now();
    let mut engine = kind.open(dir.path())?;
    assert_eq!(engine.read_all()?, total);
    let reopen = started.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(Round {
        single_ms: ms(single),
        batch_ms: ms(batch),
        read_ms: ms(read),
        reopen_ms: ms(reopen),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let base = args.next().unwrap_or_else(|| ".".to_owned());
    let kinds = [Kind::File, Kind::RaftLog, Kind::Sled];
    let mut results: Vec<Vec<Round>> = kinds.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        for (k, kind) in kinds.iter().enumerate() {
            let result = round(*kind, Path::new(&base))?;
            eprintln!(
                "round {r} {:<13} single {:.3} ms  batch16 {:.3} ms  read {:.2} ms  reopen+read {:.2} ms",
                kind.name(),
                result.single_ms,
                result.batch_ms,
                result.read_ms,
                result.reopen_ms
            );
            results[k].push(result);
        }
    }
    let total = SINGLE_APPENDS + BATCH_APPENDS * BATCH;
    println!(
        "medians of {rounds} interleaved rounds; {total} entries of {ENTRY_BYTES} bytes per round"
    );
    println!(
        "| engine | append 1 + fsync | append 16 + fsync | read {total} | reopen + read {total} |"
    );
    println!("|---|---|---|---|---|");
    let medians: Vec<[f64; 4]> = results
        .iter()
        .map(|rs| {
            [
                median(rs.iter().map(|r| r.single_ms).collect()),
                median(rs.iter().map(|r| r.batch_ms).collect()),
                median(rs.iter().map(|r| r.read_ms).collect()),
                median(rs.iter().map(|r| r.reopen_ms).collect()),
            ]
        })
        .collect();
    for (kind, m) in kinds.iter().zip(&medians) {
        let base = &medians[0];
        let cell = |i: usize| {
            if *kind == Kind::File {
                format!("{:.3} ms", m[i])
            } else {
                format!("{:.3} ms (x{:.2})", m[i], m[i] / base[i])
            }
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            kind.name(),
            cell(0),
            cell(1),
            cell(2),
            cell(3)
        );
    }
    Ok(())
}
