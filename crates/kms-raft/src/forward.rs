//! Calls a follower hands to the leader over the `Forward` RPC.
//!
//! Least privilege: a peer can hand over client activations (the leader stamps the time
//! itself and decides them like its own clients') and ask the node to stand for election (the
//! graceful handover). Identity, expiry, policy, membership and security changes never arrive
//! from a peer: they are made on the leader through the authenticated admin API.

use kms_core::{ActivationOutcome, ActivationRequest};
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Version of the `Forward` call encoding this build speaks (sent in the request; a call of
/// another version is refused with a clear error instead of being misread).
pub const FORWARD_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardCall {
    /// Activations to commit in the leader's next batch.
    Activate(Vec<ActivationRequest>),
    /// Start an election now (the current leader is stepping down).
    Elect,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Activations(Vec<ActivationOutcome>),
    Done,
    Error(ForwardError),
}

/// An error the leader reports back; `kind` maps to `ClusterError`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardError {
    pub kind: ForwardErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ForwardErrorKind {
    /// The receiver is not the leader (any more).
    NotLeader,
    Invalid,
    Conflict,
    NotMember(NodeId),
    Unavailable,
    Internal,
    Refused,
}
