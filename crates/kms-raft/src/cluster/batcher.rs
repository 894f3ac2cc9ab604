//! Group commit: activations from every connection are batched into one log entry (on the
//! leader) or one forwarded call (on a follower).

use std::sync::Arc;

use kms_core::{ActivationOutcome, ActivationRequest, Command, CommandResult};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::error::ClusterError;
use crate::forward::{ForwardCall, ForwardReply};

use super::{wall_clock_ms, ClusterInner};

/// Batches committed concurrently by one node (pipelining).
const IN_FLIGHT_BATCHES: usize = 1;

pub(super) struct Pending {
    pub(super) requests: Vec<ActivationRequest>,
    pub(super) reply: oneshot::Sender<Result<Vec<ActivationOutcome>, ClusterError>>,
}

/// Groups pending activations into batches and commits up to [`IN_FLIGHT_BATCHES`] of
/// them at once.
pub(super) async fn run_batcher(
    inner: std::sync::Weak<ClusterInner>,
    mut rx: mpsc::Receiver<Pending>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES));
    loop {
        let first = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(cluster) = inner.upgrade() else {
            return;
        };
        // Everything that queued up while the previous batches were in flight joins this one.
        let mut batch = vec![first];
        let mut size: usize = batch.iter().map(|p| p.requests.len()).sum();
        while size < cluster.config.batch_max {
            match rx.try_recv() {
                Ok(p) => {
                    size += p.requests.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        tokio::spawn(async move {
            let _permit = permit;
            let requests: Vec<ActivationRequest> = batch
                .iter()
                .flat_map(|p| p.requests.iter().cloned())
                .collect();
            metrics::histogram!("kms_raft_batch_size").record(requests.len() as f64);
            match cluster.commit_activations(requests).await {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for pending in batch {
                        let mine: Vec<ActivationOutcome> =
                            outcomes.by_ref().take(pending.requests.len()).collect();
                        let _ = pending.reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    for pending in batch {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

impl ClusterInner {
    /// Commits a batch of activations: locally when leading, else through the leader.
    pub(super) async fn commit_activations(
        &self,
        requests: Vec<ActivationRequest>,
    ) -> Result<Vec<ActivationOutcome>, ClusterError> {
        let expected = requests.len();
        if !self.view().quorum_ok {
            // A write now would wait for a quorum that is not there; fail fast instead.
            return Err(ClusterError::Unavailable("no quorum".into()));
        }
        let outcomes = if self.is_leader() {
            let now = wall_clock_ms();
            match self
                .write_local(Command::Activate { now, requests })
                .await?
            {
                CommandResult::Activations(outcomes) => outcomes,
                other => {
                    return Err(ClusterError::Internal(format!(
                        "unexpected result {other:?}"
                    )))
                }
            }
        } else {
            match self
                .forward_to_leader(
                    &ForwardCall::Activate(requests),
                    self.config.answer_deadline,
                )
                .await?
            {
                ForwardReply::Activations(outcomes) => outcomes,
                ForwardReply::Error(e) => return Err(e.into()),
                other => {
                    return Err(ClusterError::Internal(format!(
                        "unexpected reply {other:?}"
                    )))
                }
            }
        };
        if outcomes.len() != expected {
            return Err(ClusterError::Internal(format!(
                "{} outcomes for {expected} requests",
                outcomes.len()
            )));
        }
        Ok(outcomes)
    }
}
