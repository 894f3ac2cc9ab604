//! Minority behaviour: a node that cannot commit within the answer deadline answers from its
//! last committed state and queues the request durably; the queue is proposed once the
//! cluster commits again, so the committed counts catch up with what clients were told.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use kms_core::counting::application_list;
use kms_core::{ActivationOutcome, ActivationRequest};
use kms_store::Storage;
use uuid::Uuid;

use crate::error::ClusterError;

use super::{wall_clock_ms, ClusterInner};

pub(super) const QUEUE_PREFIX: &str = "queue/";

pub(super) fn load_queue(
    storage: &dyn Storage,
) -> Result<Vec<(String, ActivationRequest)>, ClusterError> {
    storage
        .scan_meta(QUEUE_PREFIX, usize::MAX)
        .map_err(|e| ClusterError::Storage(e.to_string()))?
        .into_iter()
        .map(|(k, v)| {
            postcard::from_bytes(&v)
                .map(|r| (k.clone(), r))
                .map_err(|e| ClusterError::Storage(format!("queued activation {k}: {e}")))
        })
        .collect()
}

/// The sequence number after the queue's last key.
pub(super) fn next_queue_seq(queue: &[(String, ActivationRequest)]) -> u64 {
    queue
        .last()
        .and_then(|(k, _)| k.strip_prefix(QUEUE_PREFIX))
        .and_then(|s| s.parse::<u64>().ok())
        .map(|n| n + 1)
        .unwrap_or(0)
}

impl ClusterInner {
    /// Answers from the last committed state and queues the request durably.
    pub(super) async fn provisional(
        &self,
        request: ActivationRequest,
    ) -> Result<ActivationOutcome, ClusterError> {
        let now = wall_clock_ms();
        let list = application_list(&request.application_id, &request.kms_counted_id);
        let pending: Vec<Uuid> = self
            .queue
            .lock()
            .map_err(|_| ClusterError::Internal("queue lock".into()))?
            .iter()
            .filter(|(_, r)| application_list(&r.application_id, &r.kms_counted_id).id == list.id)
            .map(|(_, r)| r.client_machine_id)
            .collect();
        let outcome = self
            .sm
            .state()
            .read()
            .await
            .provisional(now, &request, &pending);
        if matches!(outcome, ActivationOutcome::Granted(_)) {
            self.enqueue(request).await?;
        }
        metrics::counter!("kms_activations_provisional_total").increment(1);
        tracing::warn!("answered from the last committed state (no quorum); request queued");
        Ok(outcome)
    }

    async fn enqueue(&self, request: ActivationRequest) -> Result<(), ClusterError> {
        let seq = self.queue_seq.fetch_add(1, Ordering::Relaxed);
        let key = format!("{QUEUE_PREFIX}{seq:020}");
        let bytes =
            postcard::to_allocvec(&request).map_err(|e| ClusterError::Internal(e.to_string()))?;
        let storage = self.storage.clone();
        let k = key.clone();
        tokio::task::spawn_blocking(move || {
            storage.put_meta(&k, &bytes)?;
            storage.flush()
        })
        .await
        .map_err(|e| ClusterError::Storage(e.to_string()))?
        .map_err(|e| ClusterError::Storage(e.to_string()))?;
        if let Ok(mut q) = self.queue.lock() {
            q.push((key, request));
        }
        Ok(())
    }

    /// Proposes queued provisional activations once the cluster commits again.
    pub(super) async fn drain_queue(&self) {
        let batch: Vec<(String, ActivationRequest)> = match self.queue.lock() {
            Ok(q) => q.iter().take(self.config.batch_max).cloned().collect(),
            Err(_) => return,
        };
        if batch.is_empty() || !self.view().quorum_ok {
            return;
        }
        let requests: Vec<ActivationRequest> = batch.iter().map(|(_, r)| r.clone()).collect();
        match self.commit_activations(requests).await {
            Ok(_) => {
                let keys: BTreeSet<String> = batch.into_iter().map(|(k, _)| k).collect();
                let storage = self.storage.clone();
                let to_delete: Vec<String> = keys.iter().cloned().collect();
                let removed = tokio::task::spawn_blocking(move || {
                    for k in &to_delete {
                        storage.delete_meta(k)?;
                    }
                    storage.flush()
                })
                .await;
                if !matches!(removed, Ok(Ok(()))) {
                    tracing::error!(
                        "committed queued activations but could not clear them from the queue"
                    );
                }
                if let Ok(mut q) = self.queue.lock() {
                    q.retain(|(k, _)| !keys.contains(k));
                    tracing::info!(
                        committed = keys.len(),
                        remaining = q.len(),
                        "queued activations committed"
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "queue not committed yet"),
        }
    }
}
