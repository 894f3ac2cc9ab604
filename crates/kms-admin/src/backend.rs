//! What the admin surface needs from the node. Implemented by `kmsd`; tests use a fake.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::events::EventLog;

/// Raft role of a node as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    /// Not (yet) a member of any cluster.
    Detached,
}

/// This node as it sees itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    pub node_id: u64,
    pub role: Role,
    pub leader_id: Option<u64>,
    pub term: u64,
    #[schema(value_type = Vec<String>)]
    pub kms_listen: Vec<SocketAddr>,
    #[schema(value_type = String)]
    pub admin_listen: SocketAddr,
    #[schema(value_type = String)]
    pub raft_listen: SocketAddr,
    /// Index of the last log entry applied to the local state.
    pub last_applied: u64,
    /// Whether this node currently reaches a quorum (false = answering from its last
    /// committed state; activations are queued locally).
    pub quorum: bool,
    /// Activations answered while out of quorum and not yet committed.
    pub queued_activations: u64,
    pub version: String,
}

/// One cluster member. Field names are relied on by other tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemberStatus {
    pub id: u64,
    /// `leader`, `follower` or `learner`.
    pub role: String,
    pub raft_addr: String,
    pub admin_addr: String,
    /// Known on the leader (replication progress); `None` elsewhere.
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Entries the member is behind the leader's last log index.
    pub lag: Option<u64>,
}

/// `GET /api/v1/cluster`. Field names are relied on by other tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    pub cluster_id: Option<Uuid>,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberStatus>,
}

/// `POST /api/v1/cluster/join`: a new node asks to be added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub node_id: u64,
    pub raft_addr: String,
    pub admin_addr: String,
    /// A KMS address of the new node the leader can reach (`host:port`).
    #[serde(default)]
    pub kms_addr: Option<String>,
    /// How the new node is published in DNS SRV records, if it is.
    #[serde(default)]
    pub dns: Option<DnsAdvert>,
}

/// A member's DNS publication: its SRV target and its own priority and weight per zone
/// (the same shape as the Raft layer's member record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsAdvert {
    pub host: String,
    pub port: u16,
    #[schema(value_type = Vec<String>)]
    pub addresses: Vec<std::net::IpAddr>,
    /// Zone (without the final dot) -> [priority, weight].
    #[schema(value_type = Object)]
    pub zones: std::collections::BTreeMap<String, (u16, u16)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JoinResponse {
    pub cluster_id: Uuid,
    pub leader_id: u64,
    pub members: Vec<MemberStatus>,
}

/// DNS SRV publishing as shown in status (one entry per configured domain).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DnsStatus {
    pub enabled: bool,
    pub domains: Vec<DnsDomainStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DnsDomainStatus {
    pub zone: String,
    pub server: String,
    pub priority: u16,
    pub weight: u16,
    pub ttl: u32,
    /// Records currently published for this cluster in the zone.
    pub records_published: u32,
    /// Unix milliseconds of the last successful publish.
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// Why a backend call failed; mapped to HTTP status codes by the router.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// 400, naming the field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// 404.
    #[error("{0} not found")]
    NotFound(String),
    /// 409: e.g. removing the last voter.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 503: no leader or no quorum right now; `leader_admin` when a leader is known.
    #[error("unavailable: {message}")]
    Unavailable {
        message: String,
        leader_admin: Option<String>,
    },
    /// 500.
    #[error("internal error: {0}")]
    Internal(String),
    /// 307 to the leader's admin API: writes are made on the leader only (never relayed
    /// between nodes). `leader_admin` is its admin address (`host:port`).
    #[error("this node is not the leader; the leader's admin API is at {leader_admin}")]
    NotLeader { leader_admin: String },
}

/// A join token as the admin API shows it (the secret is never kept).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JoinTokenView {
    pub id: String,
    pub description: String,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339; absent: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    pub uses_left: u32,
    pub expired: bool,
}

/// This node's certificate of the built-in cluster PKI.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CertificateView {
    /// SHA-256 of the certificate (hex).
    pub fingerprint: String,
    /// Days until it expires.
    pub days_left: i64,
    /// True when it is stored but presented only from the node's next start.
    pub pending_restart: bool,
}

/// `POST /api/v1/cluster/tokens`.
#[derive(
    Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Seconds the token is valid (default 86400; 0: never expires).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// How many nodes may join with it (default 1).
    #[serde(default)]
    pub uses: Option<u32>,
    #[serde(default)]
    pub description: Option<String>,
}

/// The created token: `token` is shown once and goes to `kmsd --join-token`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CreatedTokenView {
    pub token: String,
    #[serde(flatten)]
    pub record: JoinTokenView,
}

/// What `/readyz` is asked about (`?for=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readiness {
    /// A caught-up member of a cluster with a known leader: what a rollout waits for
    /// (the default).
    #[default]
    Member,
    /// Able to answer KMS clients: a member with the host identity applied. Such a node keeps
    /// answering from its committed state when it cannot reach a quorum, so a load balancer
    /// should keep sending it clients.
    Kms,
}

impl Readiness {
    /// The `for` query value.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "member" => Ok(Self::Member),
            "kms" => Ok(Self::Kms),
            other => Err(format!("{other:?} is not member or kms")),
        }
    }
}

/// The node behind the admin surface.
#[async_trait::async_trait]
pub trait AdminBackend: Send + Sync + 'static {
    /// The applied replicated state (read-only use).
    fn state(&self) -> Arc<tokio::sync::RwLock<kms_core::State>>;
    /// Current time in Unix milliseconds (injected so tests can move it).
    fn now_ms(&self) -> u64;
    fn node(&self) -> NodeStatus;
    /// `Ok` when ready for `scope` (see [`Readiness`]); `Err(reason)` otherwise.
    fn readiness(&self, scope: Readiness) -> Result<(), String>;
    async fn cluster(&self) -> Result<ClusterStatus, BackendError>;
    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, BackendError>;
    async fn remove_member(&self, node_id: u64) -> Result<(), BackendError>;
    /// Proposes a replicated command (policy and identity changes) through the leader and
    /// waits until it is committed and applied.
    async fn propose(
        &self,
        command: kms_core::Command,
    ) -> Result<kms_core::CommandResult, BackendError>;
    /// Node-local event log (activations like event 12290, DNS publishing 12293/12294, ...).
    fn events(&self) -> Arc<EventLog>;
    fn dns(&self) -> DnsStatus;
    /// Prometheus text exposition of this node's metrics.
    fn render_metrics(&self) -> String;
    /// Raft commit index known to this node, when it runs Raft (exported as
    /// `kms_raft_commit_index`). Added with a default so existing backends keep compiling.
    fn commit_index(&self) -> Option<u64> {
        None
    }
    /// Extra listen addresses to show in status (e.g. a separate metrics listener).
    fn metrics_listen(&self) -> Option<SocketAddr> {
        None
    }
    /// Creates a join token for the built-in cluster PKI (leader only).
    async fn create_join_token(
        &self,
        _request: CreateTokenRequest,
    ) -> Result<CreatedTokenView, BackendError> {
        Err(BackendError::Invalid {
            field: "body".into(),
            message: "this node does not issue join tokens".into(),
        })
    }
    /// The cluster's join tokens.
    async fn join_tokens(&self) -> Result<Vec<JoinTokenView>, BackendError> {
        Ok(Vec::new())
    }
    /// Revokes a join token (leader only).
    async fn revoke_join_token(&self, id: &str) -> Result<(), BackendError> {
        Err(BackendError::NotFound(format!("join token {id}")))
    }
    /// Has the leader issue this node a new certificate (cluster PKI); it is presented from
    /// the node's next start.
    async fn rotate_certificate(&self) -> Result<CertificateView, BackendError> {
        Err(BackendError::Invalid {
            field: "body".into(),
            message: "this node has no certificate of the built-in cluster PKI".into(),
        })
    }
}
