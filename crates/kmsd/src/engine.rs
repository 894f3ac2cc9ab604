//! The node's state engine: the replicated state behind a small facade the KMS listeners and
//! the admin surface use. Every change is a Raft command committed by a quorum (a single node
//! is a one-node cluster); activations are batched into few log entries (group commit).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kms_core::{ActivationOutcome, ActivationRequest, Command, CommandResult, HostIdentity, State};
use kms_raft::cluster::{MemberView, NodeView};
use kms_raft::{Cluster, ClusterConfig, ClusterError};
use kms_store::Storage;
use tokio::sync::RwLock;

/// Why the engine could not commit.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Milliseconds since the Unix epoch from the system clock. Only proposers call this; the
/// state machine gets time from the command.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Handle shared by connections and the admin surface.
#[derive(Clone)]
pub struct Engine {
    cluster: Cluster,
    state: Arc<RwLock<State>>,
}

impl Engine {
    /// Opens the replicated state on `storage` and starts the Raft node.
    pub async fn start(
        config: ClusterConfig,
        storage: Arc<dyn Storage>,
        bootstrap_ca: Option<kms_core::security::ClusterCa>,
    ) -> Result<Self, EngineError> {
        let cluster = Cluster::start_with_ca(config, storage, bootstrap_ca).await?;
        Ok(Self {
            state: cluster.state(),
            cluster,
        })
    }

    /// Commits one activation (or, without a quorum, answers provisionally and queues it).
    pub async fn activate(
        &self,
        request: ActivationRequest,
    ) -> Result<ActivationOutcome, EngineError> {
        Ok(self.cluster.activate(request).await?)
    }

    /// Commits any other command through the leader.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, EngineError> {
        Ok(self.cluster.propose(command).await?)
    }

    /// Waits until the cluster has a host identity, creating it when this node leads a
    /// cluster that has none (first start).
    pub async fn ensure_identity(&self, timeout: Duration) -> Result<HostIdentity, EngineError> {
        Ok(self.cluster.ensure_identity(timeout).await?)
    }

    /// Read access to the applied state.
    pub fn state(&self) -> &Arc<RwLock<State>> {
        &self.state
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn view(&self) -> NodeView {
        self.cluster.view()
    }

    pub fn members(&self) -> Vec<MemberView> {
        self.cluster.members()
    }
}
