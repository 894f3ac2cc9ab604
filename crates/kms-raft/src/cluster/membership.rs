//! Membership changes, made on the leader only and one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kms_core::security::SecurityCommand;
use kms_core::{Command, CommandResult};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;

use crate::error::ClusterError;
use crate::types::{KmsNode, NodeId};

use super::ClusterInner;

/// How long a joining node may take to replicate the log (or install the snapshot) before
/// the join is given up.
const LEARNER_CATCH_UP: Duration = Duration::from_secs(120);

impl ClusterInner {
    /// Adds `node_id` as a learner, waits until it replicates, then makes it a voter.
    pub(super) async fn add_member_local(
        &self,
        node_id: NodeId,
        node: KmsNode,
    ) -> Result<(), ClusterError> {
        self.require_leader()?;
        if node_id == 0 {
            return Err(ClusterError::Invalid("node_id must be >= 1".into()));
        }
        let _one_at_a_time = self.membership_lock.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if let Some(existing) = membership.get_node(&node_id) {
            if existing != &node && voters.contains(&node_id) {
                // Same id, new addresses: a replaced machine reusing an id.
                self.change(ChangeMembers::SetNodes(BTreeMap::from([(
                    node_id,
                    node.clone(),
                )])))
                .await?;
            }
            if voters.contains(&node_id) {
                return Ok(());
            }
        }
        tracing::info!(node_id, %node, "adding a learner; waiting for it to catch up");
        let added = self
            .raft
            .add_learner(node_id, node, true)
            .await
            .map_err(|e| ClusterError::Unavailable(format!("add learner: {e}")))?;
        // A membership change does not need the new node, so make sure it really
        // replicates (reachable, same cluster, TLS accepted) before it may vote.
        let target = added.log_id.index;
        let deadline = Instant::now() + LEARNER_CATCH_UP;
        loop {
            let matched = self
                .raft
                .metrics()
                .borrow()
                .replication
                .as_ref()
                .and_then(|r| r.get(&node_id).copied().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|m| m >= target) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self
                    .change(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])))
                    .await;
                return Err(ClusterError::Unavailable(format!(
                    "node {node_id} did not catch up within {LEARNER_CATCH_UP:?} (unreachable, TLS or cluster id refused?); not added"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])))
            .await?;
        tracing::info!(node_id, "node is now a voter");
        Ok(())
    }

    /// Removes `node_id` from the voters and learners, and (with the cluster PKI) revokes its
    /// certificates so it cannot reach the cluster again.
    pub(super) async fn remove_member_local(&self, node_id: NodeId) -> Result<(), ClusterError> {
        self.require_leader()?;
        let _one_at_a_time = self.membership_lock.lock().await;
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if membership.get_node(&node_id).is_none() {
            return Err(ClusterError::Invalid(format!(
                "node {node_id} is not a member"
            )));
        }
        if voters.contains(&node_id) {
            if voters.len() == 1 {
                return Err(ClusterError::Conflict(
                    "cannot remove the last voter".into(),
                ));
            }
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([node_id])))
                .await?;
        }
        self.change(ChangeMembers::RemoveNodes(BTreeSet::from([node_id])))
            .await?;
        let holds_certs = self
            .sm
            .state()
            .read()
            .await
            .security()
            .node_certs()
            .any(|(id, _)| id == node_id);
        if holds_certs {
            match self
                .write_local(Command::Security(SecurityCommand::RevokeNode { node_id }))
                .await?
            {
                CommandResult::Security(Ok(())) => {
                    tracing::info!(node_id, "certificates of the removed node revoked")
                }
                other => tracing::warn!(node_id, ?other, "certificate revocation not applied"),
            }
        }
        tracing::info!(node_id, "node removed from the cluster");
        Ok(())
    }

    async fn change(&self, change: ChangeMembers<NodeId, KmsNode>) -> Result<(), ClusterError> {
        // A previous change may still be committing (joint consensus): wait for it.
        let mut attempts = 0;
        loop {
            match self.raft.change_membership(change.clone(), false).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(c))) => {
                    return Err(ClusterError::Conflict(c.to_string()))
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(ClusterError::NotLeader {
                        leader: self.leader(),
                    })
                }
                Err(other) => return Err(ClusterError::Unavailable(other.to_string())),
            }
        }
    }
}
