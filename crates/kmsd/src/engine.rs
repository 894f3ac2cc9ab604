//! The node's state engine: an append-only command log plus snapshots in [`Storage`], applied
//! to the in-memory [`State`]. One committer task takes every pending proposal, writes them
//! as log entries, makes them durable with one flush (group commit), applies them and only
//! then answers. This is the same log/apply/snapshot shape the Raft layer uses.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_core::{ActivationOutcome, ActivationRequest, Command, CommandResult, HostIdentity, State};
use kms_store::Storage;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, RwLock};

/// Why the engine could not commit.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("storage: {0}")]
    Storage(#[from] kms_store::StorageError),
    #[error("corrupt log entry {index}: {message}")]
    Corrupt { index: u64, message: String },
    #[error("the engine has stopped")]
    Stopped,
    #[error("unexpected result from the state machine")]
    UnexpectedResult,
}

/// Snapshot metadata: the snapshot holds the state after every entry up to `last_index`.
#[derive(Serialize, Deserialize)]
struct SnapshotMeta {
    last_index: u64,
}

/// What can be proposed. Activations from concurrent connections are merged into one
/// `Command::Activate` per flush.
enum Proposal {
    Activate(
        ActivationRequest,
        oneshot::Sender<Result<ActivationOutcome, String>>,
    ),
    Command(Command, oneshot::Sender<Result<CommandResult, String>>),
}

/// Engine tuning.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub snapshot_every: u64,
    pub group_commit_max: usize,
}

/// Handle shared by connections and the admin surface.
#[derive(Clone)]
pub struct Engine {
    state: Arc<RwLock<State>>,
    proposals: mpsc::Sender<Proposal>,
    stats: Arc<EngineStats>,
}

/// Counters about the engine itself (for metrics and benchmarks).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub last_index: std::sync::atomic::AtomicU64,
    pub flushes: std::sync::atomic::AtomicU64,
    pub snapshots: std::sync::atomic::AtomicU64,
}

/// Milliseconds since the Unix epoch from the system clock. Only proposers call this; the
/// state machine gets time from the command.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Engine {
    /// Recovers the state from `storage` (snapshot + log replay) and starts the committer.
    pub async fn open(
        storage: Arc<dyn Storage>,
        config: EngineConfig,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), EngineError> {
        let store = storage.clone();
        let (state, last_index) = tokio::task::spawn_blocking(move || recover(store.as_ref()))
            .await
            .map_err(|_| EngineError::Stopped)??;
        let state = Arc::new(RwLock::new(state));
        let stats = Arc::new(EngineStats::default());
        stats
            .last_index
            .store(last_index, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(config.group_commit_max.saturating_mul(4).max(64));
        let committer = Committer {
            storage,
            state: state.clone(),
            last_index,
            last_snapshot_index: last_index,
            last_now: 0,
            config,
            stats: stats.clone(),
        };
        let task = tokio::spawn(committer.run(rx));
        Ok((
            Self {
                state,
                proposals: tx,
                stats,
            },
            task,
        ))
    }

    /// Commits one activation durably and returns its outcome.
    pub async fn activate(
        &self,
        request: ActivationRequest,
    ) -> Result<ActivationOutcome, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send(Proposal::Activate(request, tx))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await
            .map_err(|_| EngineError::Stopped)?
            .map_err(|m| EngineError::Corrupt {
                index: 0,
                message: m,
            })
    }

    /// Commits any other command durably.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.proposals
            .send(Proposal::Command(command, tx))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await
            .map_err(|_| EngineError::Stopped)?
            .map_err(|m| EngineError::Corrupt {
                index: 0,
                message: m,
            })
    }

    /// Creates the host identity if the state has none yet (first start of a data dir).
    pub async fn ensure_identity(&self) -> Result<HostIdentity, EngineError> {
        if let Some(identity) = self.state.read().await.identity() {
            return Ok(identity.clone());
        }
        let seed: [u8; 32] = rand::random();
        self.propose(Command::InitIdentity(HostIdentity::generate(
            wall_clock_ms(),
            seed,
        )))
        .await?;
        self.state
            .read()
            .await
            .identity()
            .cloned()
            .ok_or(EngineError::UnexpectedResult)
    }

    /// Read access to the applied state.
    pub fn state(&self) -> &Arc<RwLock<State>> {
        &self.state
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

fn recover(storage: &dyn Storage) -> Result<(State, u64), EngineError> {
    let (mut state, mut last_index) = match storage.read_snapshot()? {
        Some((meta, body)) => {
            let meta: SnapshotMeta =
                postcard::from_bytes(&meta).map_err(|e| EngineError::Corrupt {
                    index: 0,
                    message: format!("snapshot meta: {e}"),
                })?;
            let state = State::from_snapshot(&body).map_err(|e| EngineError::Corrupt {
                index: meta.last_index,
                message: format!("snapshot: {e}"),
            })?;
            (state, meta.last_index)
        }
        None => (State::default(), 0),
    };
    if let Some((_, last)) = storage.bounds()? {
        // Replay in chunks so a long log does not need all entries in memory at once.
        let mut from = last_index + 1;
        while from <= last {
            let to = from.saturating_add(4096).min(last.saturating_add(1));
            for (index, bytes) in storage.read_range(from, to)? {
                let command: Command =
                    postcard::from_bytes(&bytes).map_err(|e| EngineError::Corrupt {
                        index,
                        message: e.to_string(),
                    })?;
                state.apply(&command);
                last_index = index;
            }
            from = to;
        }
    }
    Ok((state, last_index))
}

struct Committer {
    storage: Arc<dyn Storage>,
    state: Arc<RwLock<State>>,
    last_index: u64,
    last_snapshot_index: u64,
    /// Time never goes backwards in the log, even if the wall clock does.
    last_now: u64,
    config: EngineConfig,
    stats: Arc<EngineStats>,
}

type ActivationReply = oneshot::Sender<Result<ActivationOutcome, String>>;
type CommandReply = oneshot::Sender<Result<CommandResult, String>>;

impl Committer {
    async fn run(mut self, mut rx: mpsc::Receiver<Proposal>) {
        let mut pending = Vec::with_capacity(self.config.group_commit_max);
        while let Some(first) = rx.recv().await {
            pending.push(first);
            // Everything that queued up while the previous flush ran joins this batch.
            while pending.len() < self.config.group_commit_max {
                match rx.try_recv() {
                    Ok(p) => pending.push(p),
                    Err(_) => break,
                }
            }
            self.commit_batch(std::mem::take(&mut pending)).await;
        }
    }

    async fn commit_batch(&mut self, batch: Vec<Proposal>) {
        let now = wall_clock_ms().max(self.last_now);
        self.last_now = now;
        let mut requests = Vec::new();
        let mut activation_replies: Vec<ActivationReply> = Vec::new();
        let mut commands: Vec<(Command, CommandReply)> = Vec::new();
        for proposal in batch {
            match proposal {
                Proposal::Activate(req, reply) => {
                    requests.push(req);
                    activation_replies.push(reply);
                }
                Proposal::Command(cmd, reply) => commands.push((cmd, reply)),
            }
        }
        // Order: administrative commands first (e.g. identity), then the activation batch.
        let mut entries: Vec<Command> = commands.iter().map(|(c, _)| c.clone()).collect();
        if !requests.is_empty() {
            entries.push(Command::Activate { now, requests });
        }
        let first_index = self.last_index + 1;
        let encoded: Result<Vec<(u64, Vec<u8>)>, String> = entries
            .iter()
            .zip(first_index..)
            .map(|(c, i)| {
                postcard::to_allocvec(c)
                    .map(|b| (i, b))
                    .map_err(|e| e.to_string())
            })
            .collect();
        let durable = match encoded {
            Ok(encoded) => {
                let storage = self.storage.clone();
                tokio::task::spawn_blocking(move || {
                    storage.append(&encoded)?;
                    storage.flush()
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
            Err(e) => Err(e),
        };
        if let Err(message) = durable {
            tracing::error!(error = %message, "could not make the batch durable; refusing to answer it");
            for reply in activation_replies {
                let _ = reply.send(Err(message.clone()));
            }
            for (_, reply) in commands {
                let _ = reply.send(Err(message.clone()));
            }
            // Drop what may be half-written so indexes stay contiguous with what we applied.
            if let Err(e) = self.storage.truncate_from(first_index) {
                tracing::error!(error = %e, "could not discard the failed batch");
            }
            return;
        }
        self.stats
            .flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let results: Vec<CommandResult> = {
            let mut state = self.state.write().await;
            entries.iter().map(|c| state.apply(c)).collect()
        };
        self.last_index = first_index + entries.len() as u64 - 1;
        self.stats
            .last_index
            .store(self.last_index, std::sync::atomic::Ordering::Relaxed);
        let mut results = results.into_iter();
        for (_, reply) in commands {
            let _ = reply.send(results.next().ok_or_else(|| "missing result".to_owned()));
        }
        if !activation_replies.is_empty() {
            match results.next() {
                Some(CommandResult::Activations(outcomes)) => {
                    for (reply, outcome) in activation_replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                _ => {
                    for reply in activation_replies {
                        let _ = reply.send(Err("unexpected state machine result".into()));
                    }
                }
            }
        }
        if self.last_index - self.last_snapshot_index >= self.config.snapshot_every {
            self.snapshot().await;
        }
    }

    async fn snapshot(&mut self) {
        let started = Instant::now();
        let last_index = self.last_index;
        let meta = match postcard::to_allocvec(&SnapshotMeta { last_index }) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "snapshot meta encoding failed");
                return;
            }
        };
        // The state is streamed to disk under a read lock: no second in-memory copy.
        let state = self.state.clone().read_owned().await;
        let storage = self.storage.clone();
        let result = tokio::task::spawn_blocking(move || {
            storage.write_snapshot(&meta, &mut |out| {
                state
                    .write_snapshot(out)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })?;
            drop(state);
            // Only after the snapshot is durable may the entries it covers go.
            storage.purge_upto(last_index)?;
            storage.flush()?;
            storage.size_on_disk()
        })
        .await;
        match result {
            Ok(Ok(disk)) => {
                self.last_snapshot_index = last_index;
                self.stats
                    .snapshots
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let elapsed = started.elapsed();
                metrics::histogram!("kms_snapshot_duration_seconds").record(elapsed.as_secs_f64());
                metrics::gauge!("kms_storage_size_bytes").set(disk as f64);
                tracing::info!(
                    last_index,
                    disk_bytes = disk,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "snapshot written, log compacted"
                );
            }
            Ok(Err(e)) => tracing::error!(error = %e, "snapshot failed"),
            Err(e) => tracing::error!(error = %e, "snapshot task failed"),
        }
    }
}

/// Waits up to `timeout` for the engine to have applied at least one entry (used by tests).
pub async fn wait_applied(engine: &Engine, index: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if engine
            .stats
            .last_index
            .load(std::sync::atomic::Ordering::Relaxed)
            >= index
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}
