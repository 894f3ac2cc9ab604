//! The cluster handle the daemon uses.
//!
//! * Activations from every connection go through one batcher per node: on the leader a
//!   batch becomes one `Command::Activate` log entry (group commit: one append + fsync and one
//!   replication round for many clients); on a follower the batch is forwarded to the leader,
//!   which commits it in its own batches and returns the outcomes.
//! * The leader stamps each batch with its clock (`now`); `apply` reads no clock.
//! * Minority behaviour: when a batch is not committed within `answer_deadline` (no leader,
//!   no quorum), the node answers from its last committed state with
//!   `State::provisional` and queues the request durably; a background task proposes the
//!   queue once the cluster is reachable again, so the committed counts catch up with what
//!   clients were told.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_core::counting::application_list;
use kms_core::{ActivationOutcome, ActivationRequest, Command, CommandResult, HostIdentity, State};
use kms_store::Storage;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::sync::{mpsc, oneshot, watch, RwLock, Semaphore};
use uuid::Uuid;

use crate::forward::{ForwardCall, ForwardError, ForwardErrorKind, ForwardReply};
use crate::log_store::LogStore;
use crate::network::{NetworkFactory, SharedClusterId, Tls, TlsFiles, Transport};
use crate::state_machine::StateMachineStore;
use crate::types::{ApplyResult, KmsNode, NodeId, Raft};

/// How the node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    pub raft_listen: SocketAddr,
    /// How peers and operators reach this node.
    pub advertise: KmsNode,
    /// Initialise a one-node cluster when the data dir is empty (no `--join`).
    pub bootstrap: bool,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot so slightly lagging followers catch up from the log
    /// instead of a full snapshot.
    pub keep_logs_after_snapshot: u64,
    /// Activations per log entry at most.
    pub batch_max: usize,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Answer from the last committed state when a commit takes longer than this.
    pub answer_deadline: Duration,
    pub tls: Option<TlsFiles>,
}

impl ClusterConfig {
    pub fn new(node_id: NodeId, raft_listen: SocketAddr, advertise: KmsNode) -> Self {
        Self {
            node_id,
            raft_listen,
            advertise,
            bootstrap: true,
            snapshot_every: 10_000,
            keep_logs_after_snapshot: 1_000,
            batch_max: 512,
            // Short timeouts: a dead leader is replaced in about a second (failover goal: p99
            // under 2 s); loopback/LAN round trips are far below the heartbeat.
            heartbeat_ms: 100,
            election_timeout_ms: (400, 800),
            answer_deadline: Duration::from_millis(2500),
            tls: None,
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is reachable: {0}")]
    Unavailable(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("storage: {0}")]
    Storage(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("the node is shutting down")]
    Stopped,
}

impl From<ForwardError> for ClusterError {
    fn from(e: ForwardError) -> Self {
        match e.kind {
            ForwardErrorKind::NotLeader | ForwardErrorKind::Unavailable => {
                ClusterError::Unavailable(e.message)
            }
            ForwardErrorKind::Invalid => ClusterError::Invalid(e.message),
            ForwardErrorKind::Conflict => ClusterError::Conflict(e.message),
            ForwardErrorKind::NotMember(id) => ClusterError::NotMember(id),
            ForwardErrorKind::Internal => ClusterError::Internal(e.message),
        }
    }
}

impl From<ClusterError> for ForwardError {
    fn from(e: ClusterError) -> Self {
        let kind = match &e {
            ClusterError::Unavailable(_) | ClusterError::Stopped => ForwardErrorKind::Unavailable,
            ClusterError::Invalid(_) => ForwardErrorKind::Invalid,
            ClusterError::Conflict(_) => ForwardErrorKind::Conflict,
            ClusterError::NotMember(id) => ForwardErrorKind::NotMember(*id),
            ClusterError::Storage(_) | ClusterError::Internal(_) => ForwardErrorKind::Internal,
        };
        ForwardError {
            kind,
            message: e.to_string(),
        }
    }
}

/// Role as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

/// This node's view of itself.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub node_id: NodeId,
    pub role: NodeRole,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub last_applied: u64,
    pub quorum_ok: bool,
    pub queued_activations: u64,
    pub initialized: bool,
}

/// One member as this node knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub id: NodeId,
    pub voter: bool,
    pub node: KmsNode,
    /// Replication progress, known on the leader.
    pub matched_index: Option<u64>,
}

struct Pending {
    requests: Vec<ActivationRequest>,
    reply: oneshot::Sender<Result<Vec<ActivationOutcome>, ClusterError>>,
}

const QUEUE_PREFIX: &str = "queue/";
/// How long a joining node may take to replicate the log (or install the snapshot) before
/// the join is given up.
const LEARNER_CATCH_UP: Duration = Duration::from_secs(120);

/// Batches committed concurrently by one node (pipelining).
const IN_FLIGHT_BATCHES: usize = 1;

/// How long a stopping leader waits for a voter to hold the whole log before it hands over
/// to the best one anyway.
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(1);
/// Added to the leader lease before the handover candidate stands, so that every follower's
/// lease has surely expired (each follower measures it on its own clock from its last heartbeat).
const HANDOVER_MARGIN: Duration = Duration::from_millis(100);
/// Longest lease a stopping leader waits out; well inside the deployments' stop timeouts (30 s
/// and more).
const HANDOVER_MAX_WAIT: Duration = Duration::from_secs(10);

/// Voters other than `me` that could take over, most replicated first (then by id), with the
/// log index each one is known to hold.
fn handover_order(
    metrics: &openraft::RaftMetrics<NodeId, KmsNode>,
    me: NodeId,
) -> Vec<(NodeId, KmsNode, u64)> {
    let membership = metrics.membership_config.membership();
    let mut candidates: Vec<(NodeId, KmsNode, u64)> = membership
        .voter_ids()
        .filter(|id| *id != me)
        .filter_map(|id| {
            let node = membership.get_node(&id)?.clone();
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|log_id| log_id.index)
                .unwrap_or(0);
            Some((id, node, matched))
        })
        .collect();
    candidates.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    candidates
}

/// Shared by the handle, the batcher, the gRPC service and background tasks.
pub struct ClusterInner {
    node_id: NodeId,
    config: ClusterConfig,
    raft: Raft,
    sm: StateMachineStore,
    storage: Arc<dyn Storage>,
    transport: Transport,
    cluster_id: SharedClusterId,
    batches: mpsc::Sender<Pending>,
    /// Requests answered provisionally and not yet committed: (queue key, request).
    queue: Mutex<Vec<(String, ActivationRequest)>>,
    queue_seq: AtomicU64,
    /// Membership changes run one at a time (two joins at once would collide in Raft).
    membership_lock: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
}

/// The cluster handle (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cluster {
    /// Opens the Raft node on `storage`, starts its transport and background tasks, and (for
    /// a bootstrap node with an empty data dir) initialises a one-node cluster.
    pub async fn start(
        config: ClusterConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<Self, ClusterError> {
        let raft_config = openraft::Config {
            cluster_name: "kms-cluster".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_ms.0,
            election_timeout_max: config.election_timeout_ms.1,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_logs_after_snapshot,
            max_payload_entries: 64,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Invalid(format!("raft config: {e}")))?;
        tracing::info!(
            heartbeat_ms = raft_config.heartbeat_interval,
            election_timeout_min_ms = raft_config.election_timeout_min,
            election_timeout_max_ms = raft_config.election_timeout_max,
            "raft timing"
        );
        let tls = match &config.tls {
            Some(files) => Some(Tls::load(files).map_err(ClusterError::Invalid)?),
            None => None,
        };
        let cluster_id: SharedClusterId = Arc::new(std::sync::RwLock::new(None));
        let transport = Transport {
            tls: tls.clone(),
            cluster_id: cluster_id.clone(),
            connect_timeout: Duration::from_millis(500),
            channels: Default::default(),
        };
        let sm = StateMachineStore::open(storage.clone()).map_err(ClusterError::Storage)?;
        let log = LogStore::new(storage.clone());
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            NetworkFactory {
                transport: transport.clone(),
            },
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| ClusterError::Internal(format!("raft: {e}")))?;

        let listener = crate::grpc::bind(config.raft_listen)
            .await
            .map_err(ClusterError::Invalid)?;
        let (batch_tx, batch_rx) = mpsc::channel(4096);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let queue = load_queue(storage.as_ref()).map_err(ClusterError::Storage)?;
        let next_seq = queue
            .last()
            .and_then(|(k, _)| k.strip_prefix(QUEUE_PREFIX))
            .and_then(|s| s.parse::<u64>().ok())
            .map(|n| n + 1)
            .unwrap_or(0);
        if !queue.is_empty() {
            tracing::warn!(
                queued = queue.len(),
                "activations answered while out of quorum are still queued"
            );
        }
        let inner = Arc::new(ClusterInner {
            node_id: config.node_id,
            config: config.clone(),
            raft: raft.clone(),
            sm,
            storage,
            transport,
            cluster_id: cluster_id.clone(),
            batches: batch_tx,
            queue: Mutex::new(queue),
            queue_seq: AtomicU64::new(next_seq),
            membership_lock: tokio::sync::Mutex::new(()),
            shutdown: shutdown_tx,
        });

        let mut grpc_shutdown = shutdown_rx.clone();
        let grpc = crate::grpc::serve(
            listener,
            raft.clone(),
            cluster_id,
            Arc::downgrade(&inner),
            tls,
            async move {
                let _ = grpc_shutdown.wait_for(|s| *s).await;
            },
        );
        tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "raft transport stopped");
            }
        });
        tokio::spawn(run_batcher(
            Arc::downgrade(&inner),
            batch_rx,
            shutdown_rx.clone(),
        ));
        tokio::spawn(run_housekeeping(Arc::downgrade(&inner), shutdown_rx));

        let cluster = Cluster { inner };
        cluster.refresh_cluster_id().await;
        if config.bootstrap && !cluster.is_initialized().await {
            let members = BTreeMap::from([(config.node_id, config.advertise.clone())]);
            match raft.initialize(members).await {
                Ok(()) => {
                    tracing::info!(node_id = config.node_id, "bootstrapped a one-node cluster")
                }
                Err(e) => tracing::warn!(error = %e, "cluster initialisation skipped"),
            }
        }
        Ok(cluster)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// How peers reach this node.
    pub fn advertised(&self) -> &KmsNode {
        &self.inner.config.advertise
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The applied replicated state.
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.inner.sm.state()
    }

    /// True once this node's log holds a membership (bootstrapped or joined).
    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    async fn refresh_cluster_id(&self) {
        self.inner.refresh_cluster_id().await;
    }

    /// Commits one activation; falls back to a provisional answer when the cluster cannot
    /// commit within the deadline.
    pub async fn activate(
        &self,
        request: ActivationRequest,
    ) -> Result<ActivationOutcome, ClusterError> {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + inner.config.answer_deadline;
        // Retry within the deadline: a leader change (election) usually completes in it.
        loop {
            let (tx, rx) = oneshot::channel();
            let pending = Pending {
                requests: vec![request.clone()],
                reply: tx,
            };
            if inner.batches.send(pending).await.is_err() {
                break;
            }
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Ok(mut outcomes))) if outcomes.len() == 1 => {
                    if let Some(outcome) = outcomes.pop() {
                        return Ok(outcome);
                    }
                }
                Ok(Ok(Err(e))) => tracing::debug!(error = %e, "batch not committed"),
                // Deadline passed (the batch may still commit; `apply` then recognises the
                // queued copy by its CMID and client time and does not count it again).
                Err(_) => break,
                Ok(_) => {}
            }
            if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        inner.provisional(request).await
    }

    /// Commits any command through the leader (no fallback: configuration changes need the
    /// quorum).
    pub async fn propose(&self, command: Command) -> Result<CommandResult, ClusterError> {
        self.inner.propose(command).await
    }

    /// Creates the host identity once the cluster has a leader and no identity exists.
    pub async fn ensure_identity(&self, timeout: Duration) -> Result<HostIdentity, ClusterError> {
        // The whole wait is bounded, not only between polls: a proposal or a lock wait that
        // never ends must become an error the operator sees, not a node that stays unready.
        tokio::time::timeout(timeout, self.wait_for_identity())
            .await
            .unwrap_or_else(|_| {
                Err(ClusterError::Unavailable(format!(
                    "no host identity after {timeout:?}"
                )))
            })
    }

    async fn wait_for_identity(&self) -> Result<HostIdentity, ClusterError> {
        loop {
            // Bind first: a guard in the `if let` scrutinee would live through the block, and
            // a second read there deadlocks once `apply` queues a write between the two
            // (tokio's RwLock is fair).
            let identity = self.state().read().await.identity().cloned();
            if let Some(id) = identity {
                self.refresh_cluster_id().await;
                return Ok(id);
            }
            let leader = self.inner.raft.metrics().borrow().current_leader;
            if leader == Some(self.inner.node_id) {
                let seed: [u8; 32] = rand::random();
                let identity = HostIdentity::generate(wall_clock_ms(), seed);
                if let Err(e) = self.propose(Command::InitIdentity(identity)).await {
                    tracing::debug!(error = %e, "identity proposal not committed yet");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Adds a node (learner, catch-up, then voter). Any member may be asked; it forwards to
    /// the leader.
    pub async fn add_member(&self, node_id: NodeId, node: KmsNode) -> Result<(), ClusterError> {
        self.inner
            .membership_call(ForwardCall::Join { node_id, node })
            .await
    }

    /// Removes a node from the cluster.
    pub async fn remove_member(&self, node_id: NodeId) -> Result<(), ClusterError> {
        self.inner
            .membership_call(ForwardCall::Remove { node_id })
            .await
    }

    /// If this node leads, hands leadership to another voter before this node stops
    /// (graceful shutdown), so a rolling restart costs the shortest leaderless gap.
    ///
    /// openraft 0.9 has no leadership transfer, and followers refuse every vote until the
    /// leader lease (the maximum election timeout) has passed since their last heartbeat. So
    /// this node picks the voter holding most of the log (only one holding all of it can
    /// win), stops its own Raft (no more heartbeats), waits out the lease, and asks that voter
    /// to stand at once, before any follower's own timer (lease plus its election timeout)
    /// fires. This node has no Raft from then on, so callers stop taking clients first
    /// (kmsd closes its listeners before it steps down).
    pub async fn step_down(&self) {
        let me = self.inner.node_id;
        if self.inner.raft.metrics().borrow().current_leader != Some(me) {
            return;
        }
        let catch_up_until = tokio::time::Instant::now() + HANDOVER_CATCH_UP;
        let candidates = loop {
            let metrics = self.inner.raft.metrics().borrow().clone();
            let candidates = handover_order(&metrics, me);
            let Some((_, _, best)) = candidates.first() else {
                return; // the only voter: nobody to hand over to
            };
            // Let replication deliver the tail first: a shorter log loses the vote.
            if *best >= metrics.last_log_index.unwrap_or(0)
                || tokio::time::Instant::now() >= catch_up_until
            {
                break candidates;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let lease = Duration::from_millis(self.inner.config.election_timeout_ms.1);
        if lease + HANDOVER_MARGIN > HANDOVER_MAX_WAIT {
            // Stop timeouts (systemd, Kubernetes) would kill the node first; the followers
            // elect on their own timers instead.
            tracing::info!(?lease, "leader lease too long to wait out: no handover");
            return;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown before the handover");
        }
        tokio::time::sleep(lease + HANDOVER_MARGIN).await;
        for (id, node, matched) in candidates {
            match self
                .inner
                .transport
                .forward(&node.raft_addr, &ForwardCall::Elect, Duration::from_secs(2))
                .await
            {
                Ok(ForwardReply::Done) => {
                    tracing::info!(
                        to = id,
                        matched,
                        "leadership handed over: the node stands for election now"
                    );
                    return;
                }
                other => tracing::debug!(to = id, ?other, "step-down request not accepted"),
            }
        }
        tracing::warn!(
            "leadership not handed over; the other members elect a leader after their election timeout"
        );
    }

    /// Stops the Raft node and its transport.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    pub fn view(&self) -> NodeView {
        self.inner.view()
    }

    pub fn members(&self) -> Vec<MemberView> {
        let metrics = self.inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| MemberView {
                id: *id,
                voter: voters.contains(id),
                node: node.clone(),
                matched_index: metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .map(|m| m.map(|l| l.index).unwrap_or(0))
                    .or_else(|| {
                        (*id == self.inner.node_id).then(|| metrics.last_log_index.unwrap_or(0))
                    }),
            })
            .collect()
    }

    /// Activations answered provisionally and still waiting to be committed.
    pub fn queued(&self) -> usize {
        self.inner.queue.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// The leader's advertised node, if known.
    pub fn leader(&self) -> Option<(NodeId, KmsNode)> {
        self.inner.leader()
    }

    /// Resolves when the cluster id (from the replicated identity) is known.
    pub fn cluster_id(&self) -> Option<Uuid> {
        self.inner.cluster_id.read().ok().and_then(|g| *g)
    }
}

impl ClusterInner {
    fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    fn leader(&self) -> Option<(NodeId, KmsNode)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    async fn refresh_cluster_id(&self) {
        let id = self
            .sm
            .state()
            .read()
            .await
            .identity()
            .map(|i| i.cluster_id);
        if let (Some(id), Ok(mut guard)) = (id, self.cluster_id.write()) {
            if *guard != Some(id) {
                *guard = Some(id);
            }
        }
    }

    fn view(&self) -> NodeView {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => NodeRole::Leader,
            ServerState::Follower => NodeRole::Follower,
            ServerState::Candidate => NodeRole::Candidate,
            ServerState::Learner => NodeRole::Learner,
            ServerState::Shutdown => NodeRole::Shutdown,
        };
        let quorum_window = self.config.election_timeout_ms.1.saturating_mul(2);
        let quorum_ok = match m.state {
            ServerState::Leader => m
                .millis_since_quorum_ack
                .is_some_and(|ms| ms <= quorum_window),
            ServerState::Follower | ServerState::Learner => m.current_leader.is_some(),
            _ => false,
        };
        let initialized = m
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_some();
        NodeView {
            node_id: self.node_id,
            role,
            leader_id: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            quorum_ok,
            queued_activations: self.queue.lock().map(|q| q.len() as u64).unwrap_or(0),
            initialized,
        }
    }

    /// Hands `call` to the current leader over the `Forward` RPC.
    async fn forward_to_leader(
        &self,
        call: &ForwardCall,
        timeout: Duration,
    ) -> Result<ForwardReply, ClusterError> {
        let Some((_, leader)) = self.leader() else {
            return Err(ClusterError::Unavailable("no leader known".into()));
        };
        self.transport
            .forward(&leader.raft_addr, call, timeout)
            .await
            .map_err(ClusterError::Unavailable)
    }

    /// Commits `command` as one log entry on the leader (forwarding when not leader).
    async fn propose(&self, command: Command) -> Result<CommandResult, ClusterError> {
        if self.is_leader() {
            return self.write_local(command).await;
        }
        match self
            .forward_to_leader(&ForwardCall::Command(command), Duration::from_secs(10))
            .await?
        {
            ForwardReply::Command(result) => Ok(result),
            ForwardReply::Error(e) => Err(e.into()),
            other => Err(ClusterError::Internal(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    async fn write_local(&self, command: Command) -> Result<CommandResult, ClusterError> {
        match self.raft.client_write(command).await {
            Ok(response) => match response.data {
                ApplyResult::Command(result) => Ok(result),
                ApplyResult::Internal => Err(ClusterError::Internal("no command result".into())),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                ClusterError::Unavailable(format!("leadership moved to {:?}", f.leader_id)),
            ),
            Err(e) => Err(ClusterError::Unavailable(e.to_string())),
        }
    }

    /// Commits a batch of activations: locally when leading, else through the leader.
    async fn commit_activations(
        &self,
        requests: Vec<ActivationRequest>,
    ) -> Result<Vec<ActivationOutcome>, ClusterError> {
        let expected = requests.len();
        if !self.view().quorum_ok {
            // A write now would wait for a quorum that is not there; fail fast instead.
            return Err(ClusterError::Unavailable("no quorum".into()));
        }
        let outcomes = if self.is_leader() {
            let now = wall_clock_ms();
            match self
                .write_local(Command::Activate { now, requests })
                .await?
            {
                CommandResult::Activations(outcomes) => outcomes,
                other => {
                    return Err(ClusterError::Internal(format!(
                        "unexpected result {other:?}"
                    )))
                }
            }
        } else {
            match self
                .forward_to_leader(
                    &ForwardCall::Activate(requests),
                    self.config.answer_deadline,
                )
                .await?
            {
                ForwardReply::Activations(outcomes) => outcomes,
                ForwardReply::Error(e) => return Err(e.into()),
                other => {
                    return Err(ClusterError::Internal(format!(
                        "unexpected reply {other:?}"
                    )))
                }
            }
        };
        if outcomes.len() != expected {
            return Err(ClusterError::Internal(format!(
                "{} outcomes for {expected} requests",
                outcomes.len()
            )));
        }
        Ok(outcomes)
    }

    /// Answers from the last committed state and queues the request durably.
    async fn provisional(
        &self,
        request: ActivationRequest,
    ) -> Result<ActivationOutcome, ClusterError> {
        let now = wall_clock_ms();
        let list = application_list(&request.application_id, &request.kms_counted_id);
        let pending: Vec<Uuid> = self
            .queue
            .lock()
            .map_err(|_| ClusterError::Internal("queue lock".into()))?
            .iter()
            .filter(|(_, r)| application_list(&r.application_id, &r.kms_counted_id).id == list.id)
            .map(|(_, r)| r.client_machine_id)
            .collect();
        let outcome = self
            .sm
            .state()
            .read()
            .await
            .provisional(now, &request, &pending);
        if matches!(outcome, ActivationOutcome::Granted(_)) {
            self.enqueue(request).await?;
        }
        metrics::counter!("kms_activations_provisional_total").increment(1);
        tracing::warn!("answered from the last committed state (no quorum); request queued");
        Ok(outcome)
    }

    async fn enqueue(&self, request: ActivationRequest) -> Result<(), ClusterError> {
        let seq = self.queue_seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("{QUEUE_PREFIX}{seq:020}");
        let bytes =
            postcard::to_allocvec(&request).map_err(|e| ClusterError::Internal(e.to_string()))?;
        let storage = self.storage.clone();
        let k = key.clone();
        tokio::task::spawn_blocking(move || {
            storage.put_meta(&k, &bytes)?;
            storage.flush()
        })
        .await
        .map_err(|e| ClusterError::Storage(e.to_string()))?
        .map_err(|e| ClusterError::Storage(e.to_string()))?;
        if let Ok(mut q) = self.queue.lock() {
            q.push((key, request));
        }
        Ok(())
    }

    /// Proposes queued provisional activations once the cluster commits again.
    async fn drain_queue(&self) {
        let batch: Vec<(String, ActivationRequest)> = match self.queue.lock() {
            Ok(q) => q.iter().take(self.config.batch_max).cloned().collect(),
            Err(_) => return,
        };
        if batch.is_empty() || !self.view().quorum_ok {
            return;
        }
        let requests: Vec<ActivationRequest> = batch.iter().map(|(_, r)| r.clone()).collect();
        match self.commit_activations(requests).await {
            Ok(_) => {
                let keys: BTreeSet<String> = batch.into_iter().map(|(k, _)| k).collect();
                let storage = self.storage.clone();
                let to_delete: Vec<String> = keys.iter().cloned().collect();
                let removed = tokio::task::spawn_blocking(move || {
                    for k in &to_delete {
                        storage.delete_meta(k)?;
                    }
                    storage.flush()
                })
                .await;
                if !matches!(removed, Ok(Ok(()))) {
                    tracing::error!(
                        "committed queued activations but could not clear them from the queue"
                    );
                }
                if let Ok(mut q) = self.queue.lock() {
                    q.retain(|(k, _)| !keys.contains(k));
                    tracing::info!(
                        committed = keys.len(),
                        remaining = q.len(),
                        "queued activations committed"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "queue not committed yet"),
        }
    }

    async fn membership_call(&self, call: ForwardCall) -> Result<(), ClusterError> {
        if self.is_leader() {
            return self.membership_local(call).await;
        }
        match self
            .forward_to_leader(&call, Duration::from_secs(300))
            .await?
        {
            ForwardReply::Done => Ok(()),
            ForwardReply::Error(e) => Err(e.into()),
            other => Err(ClusterError::Internal(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    async fn membership_local(&self, call: ForwardCall) -> Result<(), ClusterError> {
        let _one_at_a_time = self.membership_lock.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        match call {
            ForwardCall::Join { node_id, node } => {
                if node_id == 0 {
                    return Err(ClusterError::Invalid("node_id must be >= 1".into()));
                }
                if let Some(existing) = membership.get_node(&node_id) {
                    if existing != &node && voters.contains(&node_id) {
                        // Same id, new addresses: a replaced machine reusing an id.
                        self.change(ChangeMembers::SetNodes(BTreeMap::from([(
                            node_id,
                            node.clone(),
                        )])))
                        .await?;
                    }
                    if voters.contains(&node_id) {
                        return Ok(());
                    }
                }
                tracing::info!(node_id, %node, "adding a learner; waiting for it to catch up");
                let added = self
                    .raft
                    .add_learner(node_id, node, true)
                    .await
                    .map_err(|e| ClusterError::Unavailable(format!("add learner: {e}")))?;
                // A membership change does not need the new node, so make sure it really
                // replicates (reachable, same cluster, TLS accepted) before it may vote.
                let target = added.log_id.index;
                let deadline = Instant::now() + LEARNER_CATCH_UP;
                loop {
                    let matched = self
                        .raft
                        .metrics()
                        .borrow()
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&node_id).copied().flatten())
                        .map(|l| l.index);
                    if matched.is_some_and(|m| m >= target) {
                        break;
                    }
                    if Instant::now() >= deadline {
                        let _ = self
                            .change(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])))
                            .await;
                        return Err(ClusterError::Unavailable(format!(
                            "node {node_id} did not catch up within {LEARNER_CATCH_UP:?} (unreachable, TLS or cluster id refused?); not added"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                self.change(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])))
                    .await?;
                tracing::info!(node_id, "node is now a voter");
                Ok(())
            }
            ForwardCall::Remove { node_id } => {
                if membership.get_node(&node_id).is_none() {
                    return Err(ClusterError::Invalid(format!(
                        "node {node_id} is not a member"
                    )));
                }
                if voters.contains(&node_id) {
                    if voters.len() == 1 {
                        return Err(ClusterError::Conflict(
                            "cannot remove the last voter".into(),
                        ));
                    }
                    self.change(ChangeMembers::RemoveVoters(BTreeSet::from([node_id])))
                        .await?;
                }
                self.change(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])))
                    .await?;
                tracing::info!(node_id, "node removed from the cluster");
                Ok(())
            }
            _ => Err(ClusterError::Invalid("not a membership call".into())),
        }
    }

    async fn change(&self, change: ChangeMembers<NodeId, KmsNode>) -> Result<(), ClusterError> {
        // A previous change may still be committing (joint consensus): wait for it.
        let mut attempts = 0;
        loop {
            match self.raft.change_membership(change.clone(), false).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(c))) => {
                    return Err(ClusterError::Conflict(c.to_string()))
                }
                Err(other) => return Err(ClusterError::Unavailable(other.to_string())),
            }
        }
    }

    /// Handles a call forwarded by another node.
    pub(crate) async fn handle_forward(&self, call: ForwardCall) -> ForwardReply {
        let not_leader = || {
            ForwardReply::Error(ForwardError {
                kind: ForwardErrorKind::NotLeader,
                message: "not the leader".into(),
            })
        };
        match call {
            ForwardCall::Activate(requests) => {
                if !self.is_leader() {
                    return not_leader();
                }
                let (tx, rx) = oneshot::channel();
                if self
                    .batches
                    .send(Pending {
                        requests,
                        reply: tx,
                    })
                    .await
                    .is_err()
                {
                    return ForwardReply::Error(ClusterError::Stopped.into());
                }
                match rx.await {
                    Ok(Ok(outcomes)) => ForwardReply::Activations(outcomes),
                    Ok(Err(e)) => ForwardReply::Error(e.into()),
                    Err(_) => ForwardReply::Error(ClusterError::Stopped.into()),
                }
            }
            ForwardCall::Command(command) => {
                if !self.is_leader() {
                    return not_leader();
                }
                match self.write_local(command).await {
                    Ok(result) => ForwardReply::Command(result),
                    Err(e) => ForwardReply::Error(e.into()),
                }
            }
            call @ (ForwardCall::Join { .. } | ForwardCall::Remove { .. }) => {
                if !self.is_leader() {
                    return not_leader();
                }
                match self.membership_local(call).await {
                    Ok(()) => ForwardReply::Done,
                    Err(e) => ForwardReply::Error(e.into()),
                }
            }
            ForwardCall::Elect => match self.raft.trigger().elect().await {
                Ok(()) => ForwardReply::Done,
                Err(e) => ForwardReply::Error(ClusterError::Internal(e.to_string()).into()),
            },
        }
    }
}

/// Groups pending activations into batches and commits up to [`IN_FLIGHT_BATCHES`] of
/// them at once.
async fn run_batcher(
    inner: std::sync::Weak<ClusterInner>,
    mut rx: mpsc::Receiver<Pending>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES));
    loop {
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(cluster) = inner.upgrade() else {
            return;
        };
        // Everything that queued up while the previous batches were in flight joins this one.
        let mut batch = vec![first];
        let mut size: usize = batch.iter().map(|p| p.requests.len()).sum();
        while size < cluster.config.batch_max {
            match rx.try_recv() {
                Ok(p) => {
                    size += p.requests.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            let _permit = permit;
            let requests: Vec<ActivationRequest> = batch
                .iter()
                .flat_map(|p| p.requests.iter().cloned())
                .collect();
            metrics::histogram!("kms_raft_batch_size").record(requests.len() as f64);
            match cluster.commit_activations(requests).await {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for pending in batch {
                        let mine: Vec<ActivationOutcome> =
                            outcomes.by_ref().take(pending.requests.len()).collect();
                        let _ = pending.reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    for pending in batch {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Periodic work: metrics, cluster id, the provisional queue.
async fn run_housekeeping(
    inner: std::sync::Weak<ClusterInner>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_quorum: Option<bool> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(cluster) = inner.upgrade() else {
            return;
        };
        cluster.refresh_cluster_id().await;
        // Raft gauges are rendered at scrape time by the admin surface from `view()`.
        let view = cluster.view();
        if last_quorum != Some(view.quorum_ok) {
            if view.quorum_ok {
                tracing::info!(leader = ?view.leader_id, term = view.term, "cluster reachable: quorum ok");
            } else if view.initialized {
                tracing::warn!(role = ?view.role, "no quorum reachable: answering from the last committed state");
            }
            last_quorum = Some(view.quorum_ok);
        }
        cluster.drain_queue().await;
    }
}

fn load_queue(storage: &dyn Storage) -> Result<Vec<(String, ActivationRequest)>, String> {
    storage
        .scan_meta(QUEUE_PREFIX, usize::MAX)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(k, v)| {
            postcard::from_bytes(&v)
                .map(|r| (k.clone(), r))
                .map_err(|e| format!("queued activation {k}: {e}"))
        })
        .collect()
}
