//! The cluster PKI at run time: enrollment with join tokens, joins of enrolled nodes, token
//! management for the admin API, certificate rotation, and the calls peers may make.

use std::time::Duration;

use kms_core::security::{JoinToken, SecurityCommand, SecurityError};
use kms_core::{Command, CommandResult};

use crate::error::ClusterError;
use crate::forward::{ForwardCall, ForwardReply};
use crate::grpc::{Enrolled, Enrollment, PeerHandler};
use crate::pki::{self, JoinTokenString, NodeCredentials};
use crate::types::{KmsNode, NodeId};

use super::batcher::Pending;
use super::{wall_clock_ms, Cluster, ClusterInner};

/// A token as created: the string to hand to the joining node (shown once) and its record.
#[derive(Debug, Clone)]
pub struct CreatedToken {
    pub token: String,
    pub record: JoinToken,
}

fn security_result(result: CommandResult) -> Result<(), ClusterError> {
    match result {
        CommandResult::Security(Ok(())) => Ok(()),
        CommandResult::Security(Err(e @ SecurityError::Invalid(_))) => {
            Err(ClusterError::Invalid(e.to_string()))
        }
        CommandResult::Security(Err(e)) => Err(ClusterError::Refused(e.to_string())),
        other => Err(ClusterError::Internal(format!(
            "unexpected result {other:?}"
        ))),
    }
}

impl ClusterInner {
    pub(super) async fn enroll_local(
        &self,
        enrollment: Enrollment,
        caller: Option<NodeId>,
    ) -> Result<Enrolled, ClusterError> {
        self.require_leader()?;
        let node_id = enrollment.node_id;
        if node_id == 0 {
            return Err(ClusterError::Invalid("node_id must be >= 1".into()));
        }
        let (ca, token_check) = {
            let state = self.sm.state();
            let state = state.read().await;
            let security = state.security();
            let ca = security
                .ca()
                .cloned()
                .ok_or_else(|| ClusterError::Refused(SecurityError::NoPki.to_string()))?;
            // Checked here first so a bad token costs no log entry.
            let check = if enrollment.token_id.is_empty() {
                None
            } else {
                let secret = pki::fingerprint(enrollment.token_secret.as_bytes());
                let now = wall_clock_ms();
                Some(
                    match security.tokens().find(|t| t.id == enrollment.token_id) {
                        Some(t) if t.secret_sha256 != secret => Err(SecurityError::UnknownToken),
                        Some(t) if t.is_expired(now) => Err(SecurityError::Expired(t.id.clone())),
                        Some(t) if t.uses_left == 0 => Err(SecurityError::UsedUp(t.id.clone())),
                        Some(_) => Ok(secret),
                        None => Err(SecurityError::UnknownToken),
                    },
                )
            };
            (ca, check)
        };
        let is_member = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node_id)
            .is_some();
        let cert_der = pki::issue(&ca, &enrollment.csr_der, node_id)
            .map_err(|e| ClusterError::Invalid(format!("certificate request: {e}")))?;
        let fingerprint = pki::fingerprint(&cert_der);
        let command = match token_check {
            // Rotation: a member asks for a new certificate of its own.
            None => {
                if caller != Some(node_id) {
                    return Err(ClusterError::Refused(
                        "a certificate without a join token is issued only to the node itself"
                            .into(),
                    ));
                }
                SecurityCommand::AddNodeCert {
                    node_id,
                    node_cert: fingerprint,
                }
            }
            Some(Err(e)) => return Err(ClusterError::Refused(e.to_string())),
            Some(Ok(secret_sha256)) => {
                if is_member {
                    return Err(ClusterError::Conflict(format!(
                        "node {node_id} is a member of the cluster; remove it first (kmsctl cluster remove {node_id})"
                    )));
                }
                SecurityCommand::Enroll {
                    token_id: enrollment.token_id,
                    secret_sha256,
                    node_id,
                    node_cert: fingerprint,
                    now: wall_clock_ms(),
                }
            }
        };
        security_result(self.write_local(Command::Security(command)).await?)?;
        Ok(Enrolled {
            cert_der,
            ca_der: ca.cert_der,
        })
    }
}

impl PeerHandler for ClusterInner {
    async fn forward(&self, call: ForwardCall) -> ForwardReply {
        match call {
            ForwardCall::Activate(requests) => {
                if !self.is_leader() {
                    return ForwardReply::Error(
                        ClusterError::NotLeader {
                            leader: self.leader(),
                        }
                        .into(),
                    );
                }
                if requests.len() > self.config.batch_max.max(1) {
                    return ForwardReply::Error(
                        ClusterError::Invalid(format!(
                            "{} activations in one call; at most {}",
                            requests.len(),
                            self.config.batch_max
                        ))
                        .into(),
                    );
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                let pending = Pending {
                    requests,
                    reply: tx,
                };
                if self.batches.send(pending).await.is_err() {
                    return ForwardReply::Error(ClusterError::Stopped.into());
                }
                match rx.await {
                    Ok(Ok(outcomes)) => ForwardReply::Activations(outcomes),
                    Ok(Err(e)) => ForwardReply::Error(e.into()),
                    Err(_) => ForwardReply::Error(ClusterError::Stopped.into()),
                }
            }
            ForwardCall::Elect => match self.raft.trigger().elect().await {
                Ok(()) => ForwardReply::Done,
                Err(e) => ForwardReply::Error(ClusterError::Internal(e.to_string()).into()),
            },
        }
    }

    async fn enroll(
        &self,
        enrollment: Enrollment,
        caller: Option<NodeId>,
    ) -> Result<Enrolled, ClusterError> {
        self.enroll_local(enrollment, caller).await
    }

    async fn join(&self, node_id: NodeId, node: KmsNode) -> Result<NodeId, ClusterError> {
        self.add_member_local(node_id, node).await?;
        Ok(self.node_id)
    }

    async fn prove(
        &self,
        token_id: &str,
        challenge: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), ClusterError> {
        let state = self.sm.state();
        let state = state.read().await;
        let security = state.security();
        let ca = security
            .ca()
            .ok_or_else(|| ClusterError::Refused(SecurityError::NoPki.to_string()))?;
        let token = security
            .tokens()
            .find(|t| t.id == token_id)
            .ok_or_else(|| ClusterError::Refused(SecurityError::UnknownToken.to_string()))?;
        let proof = pki::token_proof(
            &token.secret_sha256,
            challenge,
            &pki::fingerprint(&ca.cert_der),
        );
        Ok((proof.to_vec(), ca.cert_der.clone()))
    }
}

impl Cluster {
    /// Creates a join token (leader only). `ttl` None: it never expires.
    pub async fn create_join_token(
        &self,
        ttl: Option<Duration>,
        uses: u32,
        description: String,
    ) -> Result<CreatedToken, ClusterError> {
        let inner = &self.inner;
        inner.require_leader()?;
        let ca_fp = {
            let state = inner.sm.state();
            let state = state.read().await;
            state
                .security()
                .ca()
                .map(|ca| pki::fingerprint(&ca.cert_der))
                .ok_or_else(|| {
                    ClusterError::Invalid(
                        "this cluster does not run the built-in PKI: nodes join through the admin API"
                            .into(),
                    )
                })?
        };
        let token = JoinTokenString::generate(ca_fp);
        let now = wall_clock_ms();
        let record = JoinToken {
            id: token.id.clone(),
            secret_sha256: token.secret_sha256(),
            created_ms: now,
            expires_ms: ttl
                .map(|t| now.saturating_add(t.as_millis() as u64))
                .unwrap_or(0),
            uses_left: uses,
            description,
        };
        security_result(
            inner
                .write_local(Command::Security(SecurityCommand::CreateToken(
                    record.clone(),
                )))
                .await?,
        )?;
        tracing::info!(token = %record.id, uses, ?ttl, "join token created");
        Ok(CreatedToken {
            token: token.to_string(),
            record,
        })
    }

    /// Revokes a join token (leader only).
    pub async fn revoke_join_token(&self, id: &str) -> Result<(), ClusterError> {
        self.inner.require_leader()?;
        security_result(
            self.inner
                .write_local(Command::Security(SecurityCommand::RevokeToken {
                    id: id.to_owned(),
                }))
                .await?,
        )?;
        tracing::info!(token = %id, "join token revoked");
        Ok(())
    }

    /// The join tokens the cluster holds (secrets are never kept).
    pub async fn join_tokens(&self) -> Vec<JoinToken> {
        let state = self.inner.sm.state();
        let state = state.read().await;
        state.security().tokens().cloned().collect()
    }

    /// Asks the leader for a new certificate of this node (cluster PKI). The caller stores it;
    /// the node presents it from its next start, and the leader keeps the current one valid
    /// until the one after is issued.
    pub async fn rotate_certificate(
        &self,
        current: &NodeCredentials,
    ) -> Result<NodeCredentials, ClusterError> {
        let request = pki::new_key_and_csr(self.inner.node_id)
            .map_err(|e| ClusterError::Internal(e.to_string()))?;
        let enrollment = Enrollment {
            token_id: String::new(),
            token_secret: String::new(),
            node_id: self.inner.node_id,
            csr_der: request.csr_der,
        };
        let enrolled = if self.inner.is_leader() {
            self.inner
                .enroll_local(enrollment, Some(self.inner.node_id))
                .await?
        } else {
            let (_, leader) = self.inner.leader().ok_or_else(|| {
                ClusterError::Unavailable("no leader known to issue the certificate".into())
            })?;
            self.inner
                .transport
                .rotate(&leader.raft_addr, enrollment, Duration::from_secs(10))
                .await?
        };
        if enrolled.ca_der != current.ca_der {
            return Err(ClusterError::Refused(
                "the leader answered with another CA".into(),
            ));
        }
        Ok(NodeCredentials {
            ca_der: enrolled.ca_der,
            cert_der: enrolled.cert_der,
            key_der: request.key_der,
        })
    }
}
