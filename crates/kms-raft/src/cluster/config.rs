//! How a node takes part in the cluster.

use std::net::SocketAddr;
use std::time::Duration;

use crate::tls::Security;
use crate::types::{KmsNode, NodeId};

/// Snapshot streams are capped at this much unless configured (a snapshot is held in memory
/// while it arrives; ordered chunks make it grow only with real data).
pub const DEFAULT_MAX_SNAPSHOT_BYTES: u64 = 4 * 1024 * 1024 * 1024;

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
    /// How the node-to-node transport is secured.
    pub security: Security,
    /// Largest snapshot accepted from a leader.
    pub max_snapshot_bytes: u64,
    /// SHA-256 of the deployment's shared join secret: a bootstrapping node registers it as
    /// the `deploy` join token with the cluster CA.
    pub deploy_secret_sha256: Option<kms_core::security::Fingerprint>,
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
            security: Security::Insecure,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
            deploy_secret_sha256: None,
        }
    }
}
