//! A pre-vote stand-in (openraft 0.9 has no pre-vote): a node may stand for election only while
//! it reaches a majority of the voters. A follower cut off from its peers then keeps its term,
//! and on the heal it rejoins under the leader it had instead of deposing it with a higher term
//! (issue 14: a 15 s isolation used to cost the healthy leader its leadership).
//!
//! Every 200 ms the guard opens a TCP connection to each other voter's Raft address (nothing is
//! sent); after being cut off it waits twice the maximum election timeout of continuous
//! reachability before it allows elections again, so a surviving leader reaches this node
//! first. A leader is never held. The clock check (`check_clock`) combines its own verdict
//! with this one. Limit: in a bridge partition the cut-off node still reaches the middle node
//! and may stand; only a real pre-vote prevents that.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::watch;

use super::ClusterInner;
use crate::types::NodeId;

impl ClusterInner {
    /// True while this node reaches a majority of the voters (or leads).
    pub(super) fn majority_reachable(&self) -> bool {
        self.majority_reachable.load(Ordering::Relaxed)
    }
}

pub(super) async fn run(inner: std::sync::Weak<ClusterInner>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut allowed = true;
    let mut reachable_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(cluster) = inner.upgrade() else {
            return;
        };
        let m = cluster.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<(NodeId, String)> = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.raft_addr.clone())))
            .collect();
        let me_voter = voters.iter().any(|(id, _)| *id == cluster.node_id);
        let probe = Duration::from_millis((cluster.config.election_timeout_ms.0 / 2).max(50));
        let mut probes = tokio::task::JoinSet::new();
        for (_, addr) in voters.iter().filter(|(id, _)| *id != cluster.node_id) {
            let addr = addr.clone();
            probes.spawn(async move {
                matches!(
                    tokio::time::timeout(probe, tokio::net::TcpStream::connect(addr)).await,
                    Ok(Ok(_))
                )
            });
        }
        let mut reached = usize::from(me_voter);
        while let Some(r) = probes.join_next().await {
            reached += usize::from(matches!(r, Ok(true)));
        }
        let majority = reached * 2 > voters.len();
        if !majority {
            reachable_since = None;
        } else if reachable_since.is_none() {
            reachable_since = Some(Instant::now());
        }
        let settle = Duration::from_millis(cluster.config.election_timeout_ms.1 * 2);
        let ok = voters.len() <= 1
            || m.state == ServerState::Leader
            || (majority && (allowed || reachable_since.is_some_and(|t| t.elapsed() >= settle)));
        if ok != allowed {
            cluster.majority_reachable.store(ok, Ordering::Relaxed);
            // The clock check may hold elections too; it applies both on its next tick.
            let clock_fit = cluster
                .clock_unfit
                .lock()
                .map(|u| u.is_none())
                .unwrap_or(true);
            cluster.raft.runtime_config().elect(ok && clock_fit);
            metrics::gauge!("kms_raft_elections_allowed").set(if ok { 1.0 } else { 0.0 });
            tracing::info!(
                reached,
                voters = voters.len(),
                "elections {}",
                if ok {
                    "allowed"
                } else {
                    "held: no majority of the voters reachable"
                }
            );
            allowed = ok;
        }
    }
}
