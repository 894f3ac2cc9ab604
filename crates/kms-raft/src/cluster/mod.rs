//! The cluster handle the daemon uses.
//!
//! * [`config`]: how the node takes part; [`batcher`]: group commit of activations (one log
//!   entry or one forwarded call per batch); [`provisional`]: answers and the durable queue
//!   when no quorum is reachable; [`membership`]: joins and removals on the leader;
//!   [`security`]: enrollment with join tokens, token management, certificate rotation, and
//!   the calls peers may make; [`handover`]: graceful leadership handover.
//! * The leader stamps each batch with the cluster clock (`now`, see [`crate::clock`]): never
//!   behind the replicated time, never ahead of it by more than real elapsed time allows;
//!   `apply` reads no clock. A node whose wall clock is too far from the cluster's time does
//!   not stand for election, and as leader it stops heartbeats and writes so that another
//!   voter takes over (openraft 0.9 has no leadership transfer).
//! * Writes other than activations (identity, policy, expiry, membership, tokens) are made on
//!   the leader only: elsewhere they fail with [`ClusterError::NotLeader`] naming the leader,
//!   and the admin API redirects the operator there. Peers never relay them.

mod batcher;
pub mod config;
mod election_guard;
mod handover;
mod membership;
mod provisional;
pub mod security;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms_core::security::ClusterCa;
use kms_core::{ActivationOutcome, ActivationRequest, Command, CommandResult, HostIdentity, State};
use kms_store::Storage;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot, watch, RwLock};
use uuid::Uuid;

use self::batcher::{run_batcher, Pending};
pub use self::config::ClusterConfig;
pub use self::security::CreatedToken;
use crate::auth::{PeerAuth, PeerMode, SharedClusterId};
use crate::clock::{ClockReading, ClusterClock};
pub use crate::error::ClusterError;
use crate::log_store::LogStore;
use crate::network::{NetworkFactory, Transport};
use crate::state_machine::StateMachineStore;
use crate::tls::{Security, Tls};
use crate::types::{ApplyResult, KmsNode, NodeId, Raft};

/// Election timeouts without any leader after which a node whose clock is off stands anyway
/// (see [`ClusterInner::check_clock`]).
const LEADERLESS_GRACE: u64 = 10;

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
    /// The CA this node made when it bootstrapped the cluster, until the state holds it.
    bootstrap_ca: Option<ClusterCa>,
    shutdown: watch::Sender<bool>,
    /// The time this node stamps into the commands it proposes.
    clock: ClusterClock,
    /// Why this node may not lead now (its wall clock is too far from the cluster's time).
    clock_unfit: Mutex<Option<String>>,
    /// Since when no leader is known, and whether this unfit node stands anyway (see
    /// [`ClusterInner::check_clock`]).
    leaderless: Mutex<(Option<std::time::Instant>, bool)>,
    /// 0: the clock was not checked yet; 1: unfit since this process started (a restart after
    /// a long downtime looks like that); 2: otherwise (a jump while running never makes this
    /// node accept its wall clock).
    clock_start: std::sync::atomic::AtomicU8,
    /// The election guard's verdict: this node reaches a majority of the voters (see
    /// [`election_guard`]); elections are allowed only then.
    majority_reachable: std::sync::atomic::AtomicBool,
}

/// The cluster handle (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

impl Cluster {
    /// Opens the Raft node on `storage`, starts its transport and background tasks, and (for
    /// a bootstrap node with an empty data dir) initialises a one-node cluster.
    /// `bootstrap_ca` is the CA a bootstrapping node made for the cluster PKI; it is
    /// committed with the identity.
    pub async fn start(
        config: ClusterConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<Self, ClusterError> {
        Self::start_with_ca(config, storage, None).await
    }

    pub async fn start_with_ca(
        config: ClusterConfig,
        storage: Arc<dyn Storage>,
        bootstrap_ca: Option<ClusterCa>,
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
            transport = config.security.mode(),
            "raft timing and transport"
        );
        let tls = Tls::load(&config.security)?;
        let mode = match &config.security {
            Security::Insecure => PeerMode::Insecure,
            Security::Operator(_) => PeerMode::OperatorPki,
            Security::Pki(_) => PeerMode::ClusterPki,
        };
        let cluster_id: SharedClusterId = Arc::new(std::sync::RwLock::new(None));
        let auth = PeerAuth::new(mode, cluster_id.clone());
        let transport = Transport {
            tls: tls.clone(),
            cluster_id: cluster_id.clone(),
            connect_timeout: Duration::from_millis(500),
            channels: Default::default(),
        };
        let sm = StateMachineStore::open(storage.clone(), auth.certs.clone())
            .map_err(ClusterError::Storage)?;
        let clock = ClusterClock::system(config.clock);
        let replicated = sm.state().read().await.last_replicated_time();
        if let Some(time) = replicated {
            clock.observe_replicated(time);
        }
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

        let listener = crate::grpc::bind(config.raft_listen).await?;
        let (batch_tx, batch_rx) = mpsc::channel(4096);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let queue = provisional::load_queue(storage.as_ref())?;
        let next_seq = provisional::next_queue_seq(&queue);
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
            bootstrap_ca,
            shutdown: shutdown_tx,
            clock,
            clock_unfit: Mutex::new(None),
            leaderless: Mutex::new((None, false)),
            clock_start: std::sync::atomic::AtomicU8::new(0),
            majority_reachable: std::sync::atomic::AtomicBool::new(true),
        });
        // Fitness is known before the first election timer can fire.
        inner.check_clock().await;

        let mut grpc_shutdown = shutdown_rx.clone();
        let grpc = crate::grpc::serve(
            listener,
            raft.clone(),
            auth,
            Arc::downgrade(&inner),
            tls,
            config.max_snapshot_bytes,
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
        tokio::spawn(election_guard::run(
            Arc::downgrade(&inner),
            shutdown_rx.clone(),
        ));
        tokio::spawn(run_housekeeping(Arc::downgrade(&inner), shutdown_rx));

        let cluster = Cluster { inner };
        cluster.inner.refresh_cluster_id().await;
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

    /// How peers and operators reach this node.
    pub fn advertised(&self) -> &KmsNode {
        &self.inner.config.advertise
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The transport this node uses to reach its peers.
    pub fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// How the node-to-node transport is secured.
    pub fn security(&self) -> &Security {
        &self.inner.config.security
    }

    /// The applied replicated state.
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.inner.sm.state()
    }

    /// True once this node's log holds a membership (bootstrapped or joined).
    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
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

    /// Commits a command as one log entry. Only the leader does: elsewhere this fails with
    /// [`ClusterError::NotLeader`] naming the leader (no fallback: configuration changes need
    /// the quorum, and they are never relayed between nodes).
    pub async fn propose(&self, command: Command) -> Result<CommandResult, ClusterError> {
        self.inner.require_leader()?;
        self.inner.require_fit_clock()?;
        self.inner.write_local(command).await
    }

    /// Creates the host identity (and, for a cluster it bootstrapped with the built-in PKI,
    /// commits the cluster CA) once the cluster has a leader.
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
            let (identity, has_ca) = {
                let state = self.state();
                let state = state.read().await;
                (state.identity().cloned(), state.security().ca().is_some())
            };
            let leading = self.inner.is_leader();
            if leading && !has_ca {
                let now = self.inner.stamp().await;
                if let (Some(ca), Security::Pki(creds)) =
                    (&self.inner.bootstrap_ca, &self.inner.config.security)
                {
                    let deploy_token =
                        self.inner.config.deploy_secret_sha256.map(|secret_sha256| {
                            kms_core::security::JoinToken {
                                id: crate::pki::DEPLOY_TOKEN_ID.to_owned(),
                                secret_sha256,
                                created_ms: now,
                                expires_ms: 0,
                                uses_left: u32::MAX,
                                description: "shared deployment secret (--cluster-secret-file)"
                                    .to_owned(),
                            }
                        });
                    let command = Command::Security(kms_core::security::SecurityCommand::InitPki {
                        ca: ca.clone(),
                        node_id: self.inner.node_id,
                        node_cert: creds.fingerprint(),
                        deploy_token,
                    });
                    if let Err(e) = self.propose(command).await {
                        tracing::debug!(error = %e, "cluster CA not committed yet");
                    }
                }
            }
            if let Some(id) = identity {
                self.inner.refresh_cluster_id().await;
                return Ok(id);
            }
            if leading {
                let seed: [u8; 32] = rand::random();
                let identity = HostIdentity::generate(self.inner.stamp().await, seed);
                if let Err(e) = self.propose(Command::InitIdentity(identity)).await {
                    tracing::debug!(error = %e, "identity proposal not committed yet");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Adds a node (learner, catch-up, then voter). Leader only.
    pub async fn add_member(&self, node_id: NodeId, node: KmsNode) -> Result<(), ClusterError> {
        self.inner.add_member_local(node_id, node).await
    }

    /// Removes a node from the cluster and revokes its certificates. Leader only.
    pub async fn remove_member(&self, node_id: NodeId) -> Result<(), ClusterError> {
        self.inner.remove_member_local(node_id).await
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

    /// The cluster id (from the replicated identity), once known.
    pub fn cluster_id(&self) -> Option<Uuid> {
        self.inner.cluster_id.read().ok().and_then(|g| *g)
    }

    /// The time to stamp into a command proposed now (see [`crate::clock`]); never the raw
    /// wall clock.
    pub async fn stamp(&self) -> u64 {
        self.inner.stamp().await
    }

    /// This node's wall clock against the cluster time (without stamping).
    pub fn clock_reading(&self) -> ClockReading {
        self.inner.clock.reading()
    }

    /// Why this node may not lead (its clock), or `None` when it may.
    pub fn clock_unfit(&self) -> Option<String> {
        self.inner.clock_unfit()
    }
}

impl ClusterInner {
    /// Observes the applied state's replicated time, then stamps.
    pub(crate) async fn stamp(&self) -> u64 {
        let replicated = self.sm.state().read().await.last_replicated_time();
        if let Some(time) = replicated {
            self.clock.observe_replicated(time);
        }
        self.clock.stamp()
    }

    fn clock_unfit(&self) -> Option<String> {
        self.clock_unfit.lock().ok().and_then(|g| g.clone())
    }

    /// Fails while this node's clock forbids it to lead and another voter can take over: a
    /// write would reach the followers as a heartbeat and keep this node leading.
    fn require_fit_clock(&self) -> Result<(), ClusterError> {
        match self.clock_unfit() {
            Some(reason) if self.voter_count() > 1 => Err(ClusterError::Unavailable(format!(
                "this node does not lead: {reason}; leadership is being handed over"
            ))),
            _ => Ok(()),
        }
    }

    fn voter_count(&self) -> usize {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count()
    }

    /// Reads the clock against the replicated time, publishes `kms_clock_offset_seconds`,
    /// and keeps a node with a clock too far off from standing as leader: no election timer
    /// (as follower), no heartbeats and no writes (as leader, so the followers elect another).
    ///
    /// Liveness: a lone voter always leads (its stamps are bounded anyway). When no leader has
    /// been known for [`LEADERLESS_GRACE`] election timeouts, every fit voter had its chance,
    /// so the voters left are unfit too (typically: the whole cluster was down for longer than
    /// the max offset, and every node sees the log's last time as old): this node stands, and
    /// if a quorum elects it, its wall clock becomes the cluster time.
    pub(super) async fn check_clock(&self) {
        let replicated = self.sm.state().read().await.last_replicated_time();
        if let Some(time) = replicated {
            self.clock.observe_replicated(time);
        }
        let mut reading = self.clock.publish();
        let max = self.config.clock.max_offset;
        let metrics = self.raft.metrics().borrow().clone();
        let voters = metrics.membership_config.membership().voter_ids().count();
        let leading = metrics.state == ServerState::Leader;
        let grace = Duration::from_millis(
            self.config
                .election_timeout_ms
                .1
                .saturating_mul(LEADERLESS_GRACE),
        );
        let (leaderless_for, stood) = match self.leaderless.lock() {
            Ok(mut l) => {
                if metrics.current_leader.is_some() && !leading {
                    *l = (None, false);
                } else if metrics.current_leader.is_none() && l.0.is_none() {
                    l.0 = Some(std::time::Instant::now());
                }
                (l.0.map(|t| t.elapsed()).unwrap_or_default(), l.1)
            }
            Err(_) => (Duration::ZERO, false),
        };
        use std::sync::atomic::Ordering::Relaxed;
        let unfit_since_start = match self.clock_start.load(Relaxed) {
            0 if metrics.current_leader.is_none() && !reading.fit_to_lead => {
                self.clock_start.store(1, Relaxed);
                true
            }
            1 if !reading.fit_to_lead => true,
            _ => {
                self.clock_start.store(2, Relaxed);
                false
            }
        };
        // A lone voter that starts unfit was down for longer than the max offset: nobody else
        // can tell it the time.
        let lone_restart = voters <= 1 && unfit_since_start;
        if !reading.fit_to_lead && leading && (stood || lone_restart) {
            self.clock.accept_wall_clock();
            tracing::warn!(
                offset_seconds = reading.offset_seconds(),
                leaderless_seconds = leaderless_for.as_secs(),
                "no node with a fitting clock stood for election: a quorum elected this node, \
                 and its wall clock becomes the cluster time"
            );
            reading = self.clock.publish();
        }
        let reason = (!reading.fit_to_lead).then(|| {
            format!(
                "wall clock is {:.1} s {} the cluster time (more than {} s): fix the time source (NTP)",
                reading.offset_seconds().abs(),
                if reading.offset_ms > 0 { "ahead of" } else { "behind" },
                max.as_secs()
            )
        });
        let Ok(mut unfit) = self.clock_unfit.lock() else {
            return;
        };
        let changed = unfit.is_some() != reason.is_some();
        let runtime = self.raft.runtime_config();
        match &reason {
            Some(reason) => {
                let stand =
                    voters <= 1 || (!leading && unfit_since_start && leaderless_for >= grace);
                runtime.elect(stand && self.majority_reachable());
                runtime.heartbeat(!(leading && voters > 1));
                if changed {
                    tracing::error!(
                        offset_seconds = reading.offset_seconds(),
                        wall_ms = reading.wall,
                        cluster_ms = reading.cluster,
                        leading,
                        "{reason}: this node does not stand as leader"
                    );
                }
                if stand && voters > 1 && !stood {
                    tracing::warn!(
                        leaderless_seconds = leaderless_for.as_secs(),
                        "no leader for a while: this node stands for election despite its clock"
                    );
                    if let Ok(mut l) = self.leaderless.lock() {
                        l.1 = true;
                    }
                }
            }
            None => {
                runtime.elect(self.majority_reachable());
                runtime.heartbeat(true);
                if changed {
                    tracing::info!(
                        offset_seconds = reading.offset_seconds(),
                        "wall clock agrees with the cluster time again: this node may lead"
                    );
                }
            }
        }
        *unfit = reason;
    }

    /// On a fit leader, an empty activation batch when the log's newest time is older than a
    /// third of the max offset: the followers (and a node restarted in a quiet cluster) learn
    /// the cluster time from the log. Older nodes read this entry too (no new format).
    pub(super) async fn stamp_idle_log(&self) {
        if !self.is_leader() || self.clock_unfit().is_some() || !self.view().quorum_ok {
            return;
        }
        let idle = self.config.clock.max_offset / 3;
        let newest = self.sm.state().read().await.last_replicated_time();
        let now = self.clock.reading().cluster;
        if newest.is_some_and(|t| now.saturating_sub(t) < idle.as_millis() as u64) {
            return;
        }
        let command = Command::Activate {
            now: self.stamp().await,
            requests: Vec::new(),
        };
        match tokio::time::timeout(Duration::from_secs(2), self.write_local(command)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cluster time not stamped into the log"),
            Err(_) => tracing::debug!("cluster time entry not committed within 2 s"),
        }
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    fn require_leader(&self) -> Result<(), ClusterError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(ClusterError::NotLeader {
                leader: self.leader(),
            })
        }
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
        call: &crate::forward::ForwardCall,
        timeout: Duration,
    ) -> Result<crate::forward::ForwardReply, ClusterError> {
        let Some((_, leader)) = self.leader() else {
            return Err(ClusterError::Unavailable("no leader known".into()));
        };
        Ok(self
            .transport
            .forward(&leader.raft_addr, call, timeout)
            .await?)
    }

    async fn write_local(&self, command: Command) -> Result<CommandResult, ClusterError> {
        match self.raft.client_write(command).await {
            Ok(response) => match response.data {
                ApplyResult::Command(result) => Ok(result),
                ApplyResult::Internal => Err(ClusterError::Internal("no command result".into())),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(ClusterError::NotLeader {
                    leader: self.leader(),
                })
            }
            Err(e) => Err(ClusterError::Unavailable(e.to_string())),
        }
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
        cluster.check_clock().await;
        cluster.stamp_idle_log().await;
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
