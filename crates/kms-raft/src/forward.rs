//! Calls a follower hands to the leader over the `Forward` RPC.

use kms_core::{ActivationOutcome, ActivationRequest, Command, CommandResult};
use serde::{Deserialize, Serialize};

use crate::types::{KmsNode, NodeId};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardCall {
    /// Activations to commit in the leader's next batch.
    Activate(Vec<ActivationRequest>),
    /// Any other command (policy, identity, expiry).
    Command(Command),
    /// Add a node: learner first, then voter once it caught up.
    Join { node_id: NodeId, node: KmsNode },
    /// Remove a node from the voters and learners.
    Remove { node_id: NodeId },
    /// Start an election now (the current leader is stepping down).
    Elect,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Activations(Vec<ActivationOutcome>),
    Command(CommandResult),
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
}
