//! [`AdminBackend`] over this node's [`Engine`]: what the admin API, the dashboard and
//! `/metrics` read and change. Writes (configuration, membership, join tokens) are made on the
//! leader: a follower answers with a redirect to the leader's admin API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use kms_admin::{
    AdminBackend, BackendError, ClusterStatus, CreateTokenRequest, CreatedTokenView, DnsStatus,
    EventLog, JoinRequest, JoinResponse, JoinTokenView, MemberStatus, NodeStatus, Readiness, Role,
};
use kms_core::{Command, CommandResult, State};
use kms_raft::cluster::NodeRole;
use kms_raft::{ClusterError, KmsNode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::engine::{wall_clock_ms, Engine, EngineError};

fn token_view(t: &kms_core::security::JoinToken, now: u64) -> JoinTokenView {
    JoinTokenView {
        id: t.id.clone(),
        description: t.description.clone(),
        created: kms_admin::names::format_time_ms(t.created_ms),
        expires: (t.expires_ms != 0).then(|| kms_admin::names::format_time_ms(t.expires_ms)),
        uses_left: t.uses_left,
        expired: t.is_expired(now),
    }
}

/// Shared DNS publishing status: the publisher writes it, status and metrics read it.
pub type DnsHandle = Arc<RwLock<DnsStatus>>;

/// A node is ready while its applied index is at most this far behind its log.
pub const READY_MAX_APPLY_LAG: u64 = 1000;

/// Addresses shown in status.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub kms: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub raft: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

/// The admin surface's view of this node.
pub struct NodeBackend {
    engine: Engine,
    prometheus: PrometheusHandle,
    events: Arc<EventLog>,
    dns: DnsHandle,
    addresses: Addresses,
    /// Set once the KMS listeners are bound: before that no probe may call the node ready.
    kms_serving: AtomicBool,
    /// Where this node keeps its cluster-PKI credentials.
    pki_dir: Option<std::path::PathBuf>,
}

impl NodeBackend {
    pub fn new(
        engine: Engine,
        prometheus: PrometheusHandle,
        events: Arc<EventLog>,
        dns: DnsHandle,
        addresses: Addresses,
    ) -> Self {
        Self {
            engine,
            prometheus,
            events,
            dns,
            addresses,
            kms_serving: AtomicBool::new(false),
            pki_dir: None,
        }
    }

    /// Where this node keeps its cluster-PKI credentials (for certificate rotation).
    pub fn with_pki_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.pki_dir = Some(dir);
        self
    }

    /// Called once the KMS listeners accept connections.
    pub fn set_kms_serving(&self) {
        self.kms_serving.store(true, Ordering::Release);
    }

    fn leader_admin(&self) -> Option<String> {
        self.engine
            .cluster()
            .leader()
            .filter(|(id, _)| *id != self.engine.cluster().node_id())
            .map(|(_, node)| node.admin_addr)
    }

    fn map_error(&self, e: EngineError) -> BackendError {
        let EngineError::Cluster(e) = e;
        self.map_cluster_error(e)
    }

    fn map_cluster_error(&self, e: ClusterError) -> BackendError {
        match e {
            ClusterError::Unavailable(message) => BackendError::Unavailable {
                message,
                leader_admin: self.leader_admin(),
            },
            ClusterError::Stopped => BackendError::Unavailable {
                message: "the node is shutting down".into(),
                leader_admin: None,
            },
            ClusterError::Invalid(message) => BackendError::Invalid {
                field: "body".into(),
                message,
            },
            ClusterError::Conflict(message) => BackendError::Conflict(message),
            ClusterError::NotMember(id) => BackendError::NotFound(format!("member {id}")),
            ClusterError::Storage(message) | ClusterError::Internal(message) => {
                BackendError::Internal(message)
            }
            ClusterError::NotLeader { leader } => match leader {
                Some((_, node)) => BackendError::NotLeader {
                    leader_admin: node.admin_addr,
                },
                None => BackendError::Unavailable {
                    message: "this node is not the leader and no leader is known".into(),
                    leader_admin: None,
                },
            },
            ClusterError::Refused(message) => BackendError::Invalid {
                field: "body".into(),
                message,
            },
            ClusterError::Transport(e) => BackendError::Unavailable {
                message: e.to_string(),
                leader_admin: self.leader_admin(),
            },
        }
    }

    fn members(&self) -> (Option<u64>, Vec<MemberStatus>) {
        let view = self.engine.view();
        let leader_last = (view.role == NodeRole::Leader).then_some(view.last_log_index);
        let members = self
            .engine
            .members()
            .into_iter()
            .map(|m| {
                let role = if Some(m.id) == view.leader_id {
                    "leader"
                } else if m.voter {
                    "follower"
                } else {
                    "learner"
                };
                // Replication progress is only known on the leader.
                let matched = leader_last.and(m.matched_index);
                MemberStatus {
                    id: m.id,
                    role: role.to_owned(),
                    raft_addr: m.node.raft_addr,
                    admin_addr: m.node.admin_addr,
                    last_log_index: matched,
                    last_applied: (m.id == view.node_id).then_some(view.last_applied),
                    lag: leader_last
                        .zip(matched)
                        .map(|(last, matched)| last.saturating_sub(matched)),
                }
            })
            .collect();
        (view.leader_id, members)
    }
}

#[async_trait::async_trait]
impl AdminBackend for NodeBackend {
    fn state(&self) -> Arc<tokio::sync::RwLock<State>> {
        Arc::clone(self.engine.state())
    }

    fn now_ms(&self) -> u64 {
        // The cluster time: a node whose wall clock jumped shows the counts the cluster has.
        self.engine.cluster().clock_reading().cluster
    }

    fn node(&self) -> NodeStatus {
        let view = self.engine.view();
        let role = match view.role {
            _ if !view.initialized => Role::Detached,
            NodeRole::Leader => Role::Leader,
            NodeRole::Follower => Role::Follower,
            NodeRole::Candidate => Role::Candidate,
            NodeRole::Learner => Role::Learner,
            NodeRole::Shutdown => Role::Detached,
        };
        NodeStatus {
            node_id: view.node_id,
            role,
            leader_id: view.leader_id,
            term: view.term,
            kms_listen: self.addresses.kms.clone(),
            admin_listen: self.addresses.admin,
            raft_listen: self.addresses.raft,
            last_applied: view.last_applied,
            quorum: view.quorum_ok,
            queued_activations: view.queued_activations,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    fn readiness(&self, scope: Readiness) -> Result<(), String> {
        let view = self.engine.view();
        if !view.initialized {
            return Err("not a member of a cluster yet".into());
        }
        if !self.kms_serving.load(Ordering::Acquire) {
            return Err("KMS listeners not open yet".into());
        }
        // Without a leader a node still answers KMS clients from its committed state (and
        // queues the activations), so `Kms` skips the leader and lag checks.
        if scope == Readiness::Member {
            if view.leader_id.is_none() {
                return Err("no known leader".into());
            }
            if let Some(reason) = self.engine.cluster().clock_unfit() {
                return Err(format!("clock: {reason}"));
            }
            let behind = view.last_log_index.saturating_sub(view.last_applied);
            if behind > READY_MAX_APPLY_LAG {
                return Err(format!(
                    "applied index {} is {behind} entries behind the log",
                    view.last_applied
                ));
            }
        }
        // The identity is the last thing a fresh cluster commits before serving.
        match self.engine.state().try_read() {
            Ok(state) if state.identity().is_none() => Err("host identity not initialised".into()),
            // A writer holds the lock (applying entries): the node is working, not stuck.
            _ => Ok(()),
        }
    }

    async fn cluster(&self) -> Result<ClusterStatus, BackendError> {
        let view = self.engine.view();
        let (leader_id, members) = self.members();
        Ok(ClusterStatus {
            cluster_id: self.engine.cluster().cluster_id(),
            leader_id,
            term: view.term,
            members,
        })
    }

    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, BackendError> {
        if matches!(
            self.engine.cluster().security(),
            kms_raft::tls::Security::Pki(_)
        ) {
            return Err(BackendError::Invalid {
                field: "body".into(),
                message: "this cluster runs the built-in PKI: start the new node with \
                          --join <member raft address> --join-token <token from `kmsctl cluster token create`>"
                    .into(),
            });
        }
        self.engine
            .cluster()
            .add_member(
                request.node_id,
                KmsNode {
                    raft_addr: request.raft_addr,
                    admin_addr: request.admin_addr,
                    kms_addr: request.kms_addr.unwrap_or_default(),
                    dns: request.dns.map(|d| kms_raft::types::DnsAdvert {
                        host: d.host,
                        port: d.port,
                        addresses: d.addresses,
                        zones: d.zones,
                    }),
                },
            )
            .await
            .map_err(|e| self.map_cluster_error(e))?;
        let (leader_id, members) = self.members();
        Ok(JoinResponse {
            cluster_id: self.engine.cluster().cluster_id().unwrap_or_default(),
            leader_id: leader_id.unwrap_or_default(),
            members,
        })
    }

    async fn remove_member(&self, node_id: u64) -> Result<(), BackendError> {
        let members = self.engine.members();
        if !members.iter().any(|m| m.id == node_id) {
            return Err(BackendError::NotFound(format!("member {node_id}")));
        }
        let voters = members.iter().filter(|m| m.voter).count();
        if voters <= 1 && members.iter().any(|m| m.id == node_id && m.voter) {
            return Err(BackendError::Conflict(format!(
                "node {node_id} is the last voter; a cluster cannot remove its last member"
            )));
        }
        self.engine
            .cluster()
            .remove_member(node_id)
            .await
            .map_err(|e| self.map_cluster_error(e))
    }

    async fn propose(&self, command: Command) -> Result<CommandResult, BackendError> {
        self.engine
            .propose(command)
            .await
            .map_err(|e| self.map_error(e))
    }

    fn events(&self) -> Arc<EventLog> {
        self.events.clone()
    }

    async fn create_join_token(
        &self,
        request: CreateTokenRequest,
    ) -> Result<CreatedTokenView, BackendError> {
        let ttl = match request.ttl_secs.unwrap_or(86_400) {
            0 => None,
            secs => Some(std::time::Duration::from_secs(secs)),
        };
        let created = self
            .engine
            .cluster()
            .create_join_token(
                ttl,
                request.uses.unwrap_or(1),
                request.description.unwrap_or_default(),
            )
            .await
            .map_err(|e| self.map_cluster_error(e))?;
        Ok(CreatedTokenView {
            token: created.token,
            record: token_view(&created.record, wall_clock_ms()),
        })
    }

    async fn join_tokens(&self) -> Result<Vec<JoinTokenView>, BackendError> {
        let now = wall_clock_ms();
        Ok(self
            .engine
            .cluster()
            .join_tokens()
            .await
            .iter()
            .map(|t| token_view(t, now))
            .collect())
    }

    async fn rotate_certificate(&self) -> Result<kms_admin::CertificateView, BackendError> {
        let (kms_raft::tls::Security::Pki(current), Some(dir)) =
            (self.engine.cluster().security(), &self.pki_dir)
        else {
            return Err(BackendError::Invalid {
                field: "body".into(),
                message: "this node runs without the built-in cluster PKI".into(),
            });
        };
        // The last stored certificate may already be a rotated one (not presented yet).
        let stored = kms_raft::pki::NodeCredentials::load(dir)
            .ok()
            .flatten()
            .unwrap_or_else(|| current.clone());
        let creds = self
            .engine
            .cluster()
            .rotate_certificate(&stored)
            .await
            .map_err(|e| self.map_cluster_error(e))?;
        creds
            .save(dir)
            .map_err(|e| BackendError::Internal(format!("storing the new certificate: {e}")))?;
        Ok(kms_admin::CertificateView {
            fingerprint: kms_raft::pki::fingerprint_hex(&creds.fingerprint()),
            days_left: kms_raft::pki::days_left(&creds.cert_der).unwrap_or(0),
            pending_restart: true,
        })
    }

    async fn revoke_join_token(&self, id: &str) -> Result<(), BackendError> {
        match self.engine.cluster().revoke_join_token(id).await {
            Err(ClusterError::Refused(_)) => {
                Err(BackendError::NotFound(format!("join token {id}")))
            }
            other => other.map_err(|e| self.map_cluster_error(e)),
        }
    }

    fn dns(&self) -> DnsStatus {
        self.dns.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn render_metrics(&self) -> String {
        self.prometheus.render()
    }

    fn metrics_listen(&self) -> Option<SocketAddr> {
        self.addresses.metrics
    }
}
