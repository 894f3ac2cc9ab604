//! Who is calling: authentication of peers on the Raft transport.
//!
//! The TLS layer has already checked that a client certificate, if any, chains to the CA.
//! Here each call is tied to a member:
//! * cluster PKI: the certificate's SHA-256 must be one the replicated state records, and that
//!   names the node; a removed node's certificates are dropped from the state, so they stop
//!   working at once. A node that has not received the state yet (it is joining) accepts any
//!   certificate of its CA, the one its join token pinned.
//! * operator PKI: any certificate of the operator's CA (names are the operator's).
//! * insecure: nothing but the cluster id header (kmsd allows this mode only on loopback).
//!
//! The cluster id header must match once this node has one, and a refusal never names this
//! node's cluster id. With the cluster PKI a recorded certificate already proves the cluster
//! (each cluster has its own CA), so there a missing header is accepted (an enrolled node
//! learns the id only from the replicated state) and only a wrong one is refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kms_core::security::Fingerprint;
use tonic::{Request, Status};
use uuid::Uuid;

use crate::pki::fingerprint;
use crate::types::NodeId;

/// Metadata header carrying the sender's cluster id.
pub const CLUSTER_ID_HEADER: &str = "x-kms-cluster-id";

/// The cluster id this node knows (None until it has an identity).
pub type SharedClusterId = Arc<RwLock<Option<Uuid>>>;

/// Node certificates the replicated state records, published by the state machine.
pub type CertDirectory = Arc<RwLock<HashMap<Fingerprint, NodeId>>>;

/// How peers prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerMode {
    Insecure,
    OperatorPki,
    ClusterPki,
}

/// A caller that passed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The node its certificate was issued to (cluster PKI with the state present).
    pub node_id: Option<NodeId>,
}

#[derive(Clone)]
pub struct PeerAuth {
    pub mode: PeerMode,
    pub cluster_id: SharedClusterId,
    pub certs: CertDirectory,
}

fn refused(reason: &str) -> Status {
    metrics::counter!("kms_raft_rejected_peers_total", "reason" => reason.to_owned()).increment(1);
    Status::permission_denied(format!("peer refused: {reason}"))
}

impl PeerAuth {
    pub fn new(mode: PeerMode, cluster_id: SharedClusterId) -> Self {
        Self {
            mode,
            cluster_id,
            certs: Arc::default(),
        }
    }

    /// The cluster id header must name this node's cluster once it has one (with the cluster
    /// PKI: must not name another one).
    pub fn check_cluster_id<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(ours) = self.cluster_id.read().ok().and_then(|g| *g) else {
            return Ok(());
        };
        let theirs = request
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<Uuid>().ok());
        match theirs {
            Some(id) if id == ours => Ok(()),
            Some(_) => {
                tracing::warn!(peer = ?request.remote_addr(), "refused a peer of another cluster");
                Err(refused("cluster id mismatch"))
            }
            None if self.mode == PeerMode::ClusterPki => Ok(()),
            None => {
                tracing::warn!(peer = ?request.remote_addr(), "refused a peer without a cluster id");
                Err(refused("cluster id missing"))
            }
        }
    }

    /// Authenticates a member peer (every call but enrollment).
    pub fn member<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.check_cluster_id(request)?;
        match self.mode {
            PeerMode::Insecure => Ok(Caller { node_id: None }),
            PeerMode::OperatorPki => match request.peer_certs() {
                Some(certs) if !certs.is_empty() => Ok(Caller { node_id: None }),
                _ => Err(refused("no client certificate")),
            },
            PeerMode::ClusterPki => {
                let certs = request
                    .peer_certs()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| refused("no client certificate"))?;
                let fp = fingerprint(&certs[0]);
                let directory = self
                    .certs
                    .read()
                    .map_err(|_| Status::internal("certificate directory lock"))?;
                if directory.is_empty() {
                    // Joining: the state (and so the directory) has not arrived yet; the TLS
                    // layer checked the certificate against the CA the join token pinned.
                    return Ok(Caller { node_id: None });
                }
                match directory.get(&fp) {
                    Some(id) => Ok(Caller { node_id: Some(*id) }),
                    None => {
                        tracing::warn!(
                            peer = ?request.remote_addr(),
                            "refused a certificate the cluster does not record (removed node, or rotated out)"
                        );
                        Err(refused("certificate not recorded"))
                    }
                }
            }
        }
    }

    /// Replaces the published certificate directory.
    pub fn publish_certs(directory: &CertDirectory, certs: HashMap<Fingerprint, NodeId>) {
        if let Ok(mut guard) = directory.write() {
            *guard = certs;
        }
    }
}
