//! Graceful leadership handover before a leader stops.

use std::time::Duration;

use crate::forward::{ForwardCall, ForwardReply};
use crate::types::{KmsNode, NodeId};

use super::Cluster;

/// How long a stopping leader waits for a voter to hold the whole log before it hands over
/// to the best one anyway.
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(1);
/// Added to the leader lease before the handover candidate stands, so that every follower's
/// lease has surely expired (each follower measures it on its own clock from its last heartbeat).
const HANDOVER_MARGIN: Duration = Duration::from_millis(100);
/// Longest lease a stopping leader waits out; well inside the deployments' stop timeouts (30 s
/// and more).
const HANDOVER_MAX_WAIT: Duration = Duration::from_secs(10);

/// Voters other than `me` that could take over, most replicated first (then by id), with the
/// log index each one is known to hold.
fn handover_order(
    metrics: &openraft::RaftMetrics<NodeId, KmsNode>,
    me: NodeId,
) -> Vec<(NodeId, KmsNode, u64)> {
    let membership = metrics.membership_config.membership();
    let mut candidates: Vec<(NodeId, KmsNode, u64)> = membership
        .voter_ids()
        .filter(|id| *id != me)
        .filter_map(|id| {
            let node = membership.get_node(&id)?.clone();
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|log_id| log_id.index)
                .unwrap_or(0);
            Some((id, node, matched))
        })
        .collect();
    candidates.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    candidates
}

impl Cluster {
    /// If this node leads, hands leadership to another voter before this node stops
    /// (graceful shutdown), so a rolling restart costs the shortest leaderless gap.
    ///
    /// openraft 0.9 has no leadership transfer, and followers refuse every vote until the
    /// leader lease (the maximum election timeout) has passed since their last heartbeat. So
    /// this node picks the voter holding most of the log (only one holding all of it can
    /// win), stops its own Raft (no more heartbeats), waits out the lease, and asks that voter
    /// to stand at once, before any follower's own timer (lease plus its election timeout)
    /// fires. This node has no Raft from then on, so callers stop taking clients first
    /// (kmsd closes its listeners before it steps down).
    pub async fn step_down(&self) {
        let me = self.inner.node_id;
        if self.inner.raft.metrics().borrow().current_leader != Some(me) {
            return;
        }
        let catch_up_until = tokio::time::Instant::now() + HANDOVER_CATCH_UP;
        let candidates = loop {
            let metrics = self.inner.raft.metrics().borrow().clone();
            let candidates = handover_order(&metrics, me);
            let Some((_, _, best)) = candidates.first() else {
                return; // the only voter: nobody to hand over to
            };
            // Let replication deliver the tail first: a shorter log loses the vote.
            if *best >= metrics.last_log_index.unwrap_or(0)
                || tokio::time::Instant::now() >= catch_up_until
            {
                break candidates;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let lease = Duration::from_millis(self.inner.config.election_timeout_ms.1);
        if lease + HANDOVER_MARGIN > HANDOVER_MAX_WAIT {
            // Stop timeouts (systemd, Kubernetes) would kill the node first; the followers
            // elect on their own timers instead.
            tracing::info!(?lease, "leader lease too long to wait out: no handover");
            return;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown before the handover");
        }
        tokio::time::sleep(lease + HANDOVER_MARGIN).await;
        for (id, node, matched) in candidates {
            match self
                .inner
                .transport
                .forward(&node.raft_addr, &ForwardCall::Elect, Duration::from_secs(2))
                .await
            {
                Ok(ForwardReply::Done) => {
                    tracing::info!(
                        to = id,
                        matched,
                        "leadership handed over: the node stands for election now"
                    );
                    return;
                }
                other => tracing::debug!(to = id, ?other, "step-down request not accepted"),
            }
        }
        tracing::warn!(
            "leadership not handed over; the other members elect a leader after their election timeout"
        );
    }
}
