//! Errors of the replication layer.

use crate::forward::{ForwardError, ForwardErrorKind};
use crate::types::{KmsNode, NodeId};

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is reachable: {0}")]
    Unavailable(String),
    /// Only the leader does this; `leader` is who leads now, if known. The admin API
    /// redirects the operator there (the request is never relayed between nodes).
    #[error("this node is not the leader{}", leader_hint(.leader))]
    NotLeader { leader: Option<(NodeId, KmsNode)> },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("refused: {0}")]
    Refused(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("internal: {0}")]
    Internal(String),
    #[error("the node is shutting down")]
    Stopped,
}

fn leader_hint(leader: &Option<(NodeId, KmsNode)>) -> String {
    match leader {
        Some((id, node)) => format!(" (node {id} leads, admin API at {})", node.admin_addr),
        None => " (no leader known)".into(),
    }
}

/// Why a call to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Unreachable(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("bad address {0}")]
    Address(String),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("{0}")]
    Remote(String),
    /// The call needs the leader; it is at this Raft address (empty: unknown).
    #[error("not the leader (the leader is at {0:?})")]
    Redirect(String),
}

impl From<ForwardError> for ClusterError {
    fn from(e: ForwardError) -> Self {
        match e.kind {
            ForwardErrorKind::NotLeader => ClusterError::NotLeader { leader: None },
            ForwardErrorKind::Unavailable => ClusterError::Unavailable(e.message),
            ForwardErrorKind::Invalid => ClusterError::Invalid(e.message),
            ForwardErrorKind::Conflict => ClusterError::Conflict(e.message),
            ForwardErrorKind::NotMember(id) => ClusterError::NotMember(id),
            ForwardErrorKind::Refused => ClusterError::Refused(e.message),
            ForwardErrorKind::Internal => ClusterError::Internal(e.message),
        }
    }
}

impl From<ClusterError> for ForwardError {
    fn from(e: ClusterError) -> Self {
        let kind = match &e {
            ClusterError::NotLeader { .. } => ForwardErrorKind::NotLeader,
            ClusterError::Unavailable(_) | ClusterError::Stopped | ClusterError::Transport(_) => {
                ForwardErrorKind::Unavailable
            }
            ClusterError::Invalid(_) => ForwardErrorKind::Invalid,
            ClusterError::Conflict(_) => ForwardErrorKind::Conflict,
            ClusterError::NotMember(id) => ForwardErrorKind::NotMember(*id),
            ClusterError::Refused(_) => ForwardErrorKind::Refused,
            ClusterError::Storage(_) | ClusterError::Internal(_) => ForwardErrorKind::Internal,
        };
        ForwardError {
            kind,
            message: e.to_string(),
        }
    }
}
