//! The cluster's security state, replicated like everything else: the cluster CA (so any
//! leader can issue node certificates), the fingerprints of the node certificates it issued
//! (a peer is accepted only with one of these, and a removed node's are dropped), and the
//! join tokens (stored as SHA-256 of their secret, with expiry and remaining uses).
//!
//! Deterministic like the rest of `apply`: certificates and secrets are made by the proposing
//! node and travel inside the commands; time is the leader's stamp in the command.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// SHA-256 of a certificate's DER (or of a token secret).
pub type Fingerprint = [u8; 32];

/// Longest accepted token id and description (bytes), and most tokens kept at once.
pub const MAX_TOKEN_ID: usize = 32;
pub const MAX_TOKEN_DESCRIPTION: usize = 200;
pub const MAX_TOKENS: usize = 1_000;
/// Certificates kept valid per node (the current one and the one it rotated from).
pub const CERTS_PER_NODE: usize = 2;

/// The cluster certificate authority.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    /// CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// CA private key, PKCS#8 DER. Never shown by any API.
    pub key_der: Vec<u8>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cert_der", &format_args!("{} bytes", self.cert_der.len()))
            .field("key_der", &"<redacted>")
            .finish()
    }
}

/// A join token as the cluster stores it (the secret itself is never stored).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub id: String,
    pub secret_sha256: Fingerprint,
    pub created_ms: UnixMillis,
    /// 0: never expires.
    pub expires_ms: UnixMillis,
    pub uses_left: u32,
    pub description: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("created_ms", &self.created_ms)
            .field("expires_ms", &self.expires_ms)
            .field("uses_left", &self.uses_left)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        self.expires_ms != 0 && now >= self.expires_ms
    }
}

/// Commands that change the security state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecurityCommand {
    /// Installs the cluster CA and the bootstrapping node's certificate. The first one wins.
    InitPki {
        ca: ClusterCa,
        node_id: u64,
        node_cert: Fingerprint,
        /// The deployment's shared join secret (`--cluster-secret-file`), as a token.
        deploy_token: Option<JoinToken>,
    },
    CreateToken(JoinToken),
    RevokeToken {
        id: String,
    },
    /// Spends one use of a token and records the certificate issued to `node_id`. Refused
    /// (nothing changes) for an unknown, expired or used-up token or a wrong secret.
    Enroll {
        token_id: String,
        secret_sha256: Fingerprint,
        node_id: u64,
        node_cert: Fingerprint,
        now: UnixMillis,
    },
    /// Records a new certificate of a member (rotation); the oldest beyond
    /// [`CERTS_PER_NODE`] stops working.
    AddNodeCert {
        node_id: u64,
        node_cert: Fingerprint,
    },
    /// Drops every certificate of a node (it was removed from the cluster).
    RevokeNode {
        node_id: u64,
    },
}

/// Why a security command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SecurityError {
    #[error("the cluster has no certificate authority (it runs without the built-in PKI)")]
    NoPki,
    #[error("unknown join token")]
    UnknownToken,
    #[error("join token {0} has expired")]
    Expired(String),
    #[error("join token {0} has no uses left")]
    UsedUp(String),
    #[error("invalid join token: {0}")]
    Invalid(String),
    #[error("node {0} holds no certificate of this cluster")]
    UnknownNode(u64),
}

/// The replicated security state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSecurity {
    ca: Option<ClusterCa>,
    node_certs: BTreeMap<u64, Vec<Fingerprint>>,
    tokens: BTreeMap<String, JoinToken>,
}

impl ClusterSecurity {
    pub fn apply(&mut self, command: &SecurityCommand) -> Result<(), SecurityError> {
        match command {
            SecurityCommand::InitPki {
                ca,
                node_id,
                node_cert,
                deploy_token,
            } => {
                if self.ca.is_none() {
                    self.ca = Some(ca.clone());
                    self.node_certs.insert(*node_id, vec![*node_cert]);
                    if let Some(token) = deploy_token {
                        self.tokens.insert(token.id.clone(), token.clone());
                    }
                }
                Ok(())
            }
            SecurityCommand::CreateToken(token) => {
                self.ca.as_ref().ok_or(SecurityError::NoPki)?;
                if token.id.is_empty()
                    || token.id.len() > MAX_TOKEN_ID
                    || !token.id.bytes().all(|b| b.is_ascii_alphanumeric())
                {
                    return Err(SecurityError::Invalid(
                        "id must be 1 to 32 ASCII letters or digits".into(),
                    ));
                }
                if token.description.len() > MAX_TOKEN_DESCRIPTION {
                    return Err(SecurityError::Invalid(format!(
                        "description longer than {MAX_TOKEN_DESCRIPTION} bytes"
                    )));
                }
                if token.uses_left == 0 {
                    return Err(SecurityError::Invalid("uses must be at least 1".into()));
                }
                if self.tokens.contains_key(&token.id) {
                    return Err(SecurityError::Invalid(format!(
                        "token {} exists already",
                        token.id
                    )));
                }
                // Expired tokens make room first; live ones are never dropped silently.
                let created = token.created_ms;
                self.tokens.retain(|_, t| !t.is_expired(created));
                if self.tokens.len() >= MAX_TOKENS {
                    return Err(SecurityError::Invalid(format!(
                        "{MAX_TOKENS} tokens exist; revoke some first"
                    )));
                }
                self.tokens.insert(token.id.clone(), token.clone());
                Ok(())
            }
            SecurityCommand::RevokeToken { id } => self
                .tokens
                .remove(id)
                .map(|_| ())
                .ok_or(SecurityError::UnknownToken),
            SecurityCommand::Enroll {
                token_id,
                secret_sha256,
                node_id,
                node_cert,
                now,
            } => {
                self.ca.as_ref().ok_or(SecurityError::NoPki)?;
                let token = self
                    .tokens
                    .get_mut(token_id)
                    .ok_or(SecurityError::UnknownToken)?;
                // A wrong secret reads like an unknown token: nothing about the token leaks.
                if !constant_time_eq(&token.secret_sha256, secret_sha256) {
                    return Err(SecurityError::UnknownToken);
                }
                if token.is_expired(*now) {
                    return Err(SecurityError::Expired(token_id.clone()));
                }
                if token.uses_left == 0 {
                    return Err(SecurityError::UsedUp(token_id.clone()));
                }
                token.uses_left -= 1;
                if token.uses_left == 0 {
                    self.tokens.remove(token_id);
                }
                // A re-enrolled node id (a replaced machine) gets a fresh set: its old
                // certificates stop working.
                self.node_certs.insert(*node_id, vec![*node_cert]);
                Ok(())
            }
            SecurityCommand::AddNodeCert { node_id, node_cert } => {
                let certs = self
                    .node_certs
                    .get_mut(node_id)
                    .ok_or(SecurityError::UnknownNode(*node_id))?;
                if !certs.contains(node_cert) {
                    certs.push(*node_cert);
                }
                while certs.len() > CERTS_PER_NODE {
                    certs.remove(0);
                }
                Ok(())
            }
            SecurityCommand::RevokeNode { node_id } => {
                self.node_certs.remove(node_id);
                Ok(())
            }
        }
    }

    pub fn ca(&self) -> Option<&ClusterCa> {
        self.ca.as_ref()
    }

    /// The node a certificate was issued to, if it is still valid.
    pub fn node_of(&self, cert: &Fingerprint) -> Option<u64> {
        self.node_certs
            .iter()
            .find(|(_, certs)| certs.contains(cert))
            .map(|(id, _)| *id)
    }

    /// Every valid node certificate fingerprint with its node id.
    pub fn node_certs(&self) -> impl Iterator<Item = (u64, &Fingerprint)> {
        self.node_certs
            .iter()
            .flat_map(|(id, certs)| certs.iter().map(move |c| (*id, c)))
    }

    /// Tokens that can still be used at `now` (expired ones are listed too, marked by the
    /// caller from `expires_ms`).
    pub fn tokens(&self) -> impl Iterator<Item = &JoinToken> {
        self.tokens.values()
    }
}

/// Compares two digests without an early exit.
fn constant_time_eq(a: &Fingerprint, b: &Fingerprint) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> ClusterCa {
        ClusterCa {
            cert_der: vec![1, 2, 3],
            key_der: vec![4, 5, 6],
        }
    }

    fn token(id: &str, secret: u8, expires_ms: u64, uses: u32) -> JoinToken {
        JoinToken {
            id: id.into(),
            secret_sha256: [secret; 32],
            created_ms: 1_000,
            expires_ms,
            uses_left: uses,
            description: String::new(),
        }
    }

    fn enroll(id: &str, secret: u8, node_id: u64, now: u64) -> SecurityCommand {
        SecurityCommand::Enroll {
            token_id: id.into(),
            secret_sha256: [secret; 32],
            node_id,
            node_cert: [node_id as u8; 32],
            now,
        }
    }

    fn with_pki() -> ClusterSecurity {
        let mut s = ClusterSecurity::default();
        s.apply(&SecurityCommand::InitPki {
            ca: ca(),
            node_id: 1,
            node_cert: [1; 32],
            deploy_token: Some(token("deploy", 9, 0, u32::MAX)),
        })
        .unwrap();
        s
    }

    #[test]
    fn first_ca_wins_and_the_key_is_never_printed() {
        let mut s = with_pki();
        let other = ClusterCa {
            cert_der: vec![9],
            key_der: vec![9],
        };
        s.apply(&SecurityCommand::InitPki {
            ca: other,
            node_id: 7,
            node_cert: [7; 32],
            deploy_token: None,
        })
        .unwrap();
        assert_eq!(s.ca(), Some(&ca()));
        assert_eq!(s.node_of(&[7; 32]), None);
        assert_eq!(s.node_of(&[1; 32]), Some(1));
        assert!(!format!("{s:?}").contains("[4, 5, 6]"));
    }

    #[test]
    fn tokens_are_single_use_expire_and_check_the_secret() {
        let mut s = with_pki();
        s.apply(&SecurityCommand::CreateToken(token("a", 5, 10_000, 1)))
            .unwrap();
        assert_eq!(
            s.apply(&enroll("a", 6, 2, 2_000)),
            Err(SecurityError::UnknownToken),
            "wrong secret"
        );
        assert_eq!(s.apply(&enroll("a", 5, 2, 2_000)), Ok(()));
        assert_eq!(s.node_of(&[2; 32]), Some(2));
        assert_eq!(
            s.apply(&enroll("a", 5, 3, 2_000)),
            Err(SecurityError::UnknownToken),
            "reused"
        );
        s.apply(&SecurityCommand::CreateToken(token("b", 5, 10_000, 3)))
            .unwrap();
        assert_eq!(
            s.apply(&enroll("b", 5, 3, 10_000)),
            Err(SecurityError::Expired("b".into()))
        );
        assert_eq!(s.node_of(&[3; 32]), None);
        s.apply(&SecurityCommand::RevokeToken { id: "b".into() })
            .unwrap();
        // The deployment token stays until revoked.
        assert_eq!(
            s.tokens().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["deploy"]
        );
    }

    #[test]
    fn bad_tokens_are_refused_whole() {
        let mut s = ClusterSecurity::default();
        assert_eq!(
            s.apply(&SecurityCommand::CreateToken(token("a", 1, 0, 1))),
            Err(SecurityError::NoPki)
        );
        let mut s = with_pki();
        for bad in [
            token("", 1, 0, 1),
            token("a-b", 1, 0, 1),
            token("a", 1, 0, 0),
        ] {
            assert!(s.apply(&SecurityCommand::CreateToken(bad)).is_err());
        }
        assert_eq!(s.tokens().count(), 1, "only the deployment token");
    }

    #[test]
    fn rotation_keeps_two_and_revocation_drops_all() {
        let mut s = with_pki();
        for fp in [[10; 32], [11; 32]] {
            s.apply(&SecurityCommand::AddNodeCert {
                node_id: 1,
                node_cert: fp,
            })
            .unwrap();
        }
        assert_eq!(s.node_of(&[1; 32]), None, "oldest dropped");
        assert_eq!(s.node_of(&[10; 32]), Some(1));
        assert_eq!(s.node_of(&[11; 32]), Some(1));
        s.apply(&SecurityCommand::RevokeNode { node_id: 1 })
            .unwrap();
        assert_eq!(s.node_of(&[11; 32]), None);
        assert!(s
            .apply(&SecurityCommand::AddNodeCert {
                node_id: 1,
                node_cert: [12; 32]
            })
            .is_err());
    }
}
