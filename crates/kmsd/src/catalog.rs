//! The node's side of the replicated catalog: propose the built-in catalog when the cluster
//! has none (first start, or a state restored from a snapshot older than the catalog), the
//! configured host keys, and the proposer's ePIDs (random values stay out of `apply`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use kms_catalog::{CatalogData, HostKeyData};
use kms_core::catalog::{host_keys_update, missing_epids};
use kms_core::{CatalogUpdate, Command, CommandResult, HostIdentity, HostKeys, State};
use uuid::Uuid;

use crate::engine::Engine;

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A catalog update for `catalog` with fresh ePIDs for its host keys that `identity` has no
/// consistent ePID for.
pub fn update_for(identity: &HostIdentity, catalog: CatalogData) -> CatalogUpdate {
    let keys: Vec<&HostKeyData> = catalog.host_keys.iter().collect();
    let epids = missing_epids(
        identity,
        &keys,
        identity.host_build,
        wall_clock_ms(),
        rand::random(),
    );
    CatalogUpdate { catalog, epids }
}

/// The `SetHostKeys` for `keys`, or `None` when nothing would change.
pub fn host_keys_for(state: &State, keys: &BTreeMap<Uuid, Uuid>) -> Option<HostKeys> {
    let (Some(identity), Some(catalog)) = (state.identity(), state.catalog().catalog()) else {
        return None;
    };
    let update = host_keys_update(
        identity,
        catalog,
        keys.clone(),
        wall_clock_ms(),
        rand::random(),
    );
    let same = state.catalog().configured_host_keys() == keys
        && update.epids.is_empty()
        && update.host_build.is_none();
    (!same).then_some(update)
}

/// Waits until the replicated state has a catalog, proposing the built-in one (only applied if
/// there is still none: `InitCatalog`, first wins).
pub async fn ensure_catalog(
    engine: &Engine,
    identity: &HostIdentity,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let current = engine
            .state()
            .read()
            .await
            .catalog()
            .catalog()
            .map(|c| (c.version.clone(), c.source.clone()));
        if let Some((version, source)) = current {
            tracing::info!(%version, %source, "product catalog ready");
            return Ok(());
        }
        let update = update_for(identity, CatalogData::builtin());
        match engine.propose(Command::InitCatalog(update)).await {
            Ok(CommandResult::Catalog(Ok(_))) => continue,
            Ok(other) => anyhow::bail!("built-in catalog refused: {other:?}"),
            Err(e) => tracing::debug!(error = %e, "catalog proposal not committed yet"),
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("no product catalog after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Proposes the configured host keys when they differ from the replicated ones.
pub async fn apply_host_keys(engine: &Engine, keys: &BTreeMap<Uuid, Uuid>) -> anyhow::Result<()> {
    let update = host_keys_for(&*engine.state().read().await, keys);
    let Some(update) = update else {
        return Ok(());
    };
    let result = match engine.propose(Command::SetHostKeys(update)).await {
        Ok(result) => result,
        // Only the leader writes configuration (it is never relayed between nodes).
        Err(crate::engine::EngineError::Cluster(kms_raft::ClusterError::NotLeader { leader })) => {
            tracing::warn!(
                leader = ?leader.map(|(id, _)| id),
                "the host keys in this node's configuration differ from the cluster's; only \
                 the leader applies its configuration: set them with `kmsctl` or on the leader"
            );
            return Ok(());
        }
        Err(e) => return Err(e).context("proposing the configured host keys"),
    };
    match result {
        CommandResult::HostKeys(Ok(())) => {
            tracing::info!(?keys, "host keys from configuration applied");
            Ok(())
        }
        other => anyhow::bail!("host keys from configuration rejected: {other:?}"),
    }
}

/// Warns when the RPC features offered contradict the build the ePIDs claim: a genuine host on
/// build 9200 or later offers NDR64 and bind-time feature negotiation, earlier ones neither.
pub fn check_rpc_features(identity: &HostIdentity, ndr64: bool, btfn: bool) {
    let Some(build) = kms_catalog::catalog().win_build(identity.host_build) else {
        return;
    };
    if build.uses_ndr64 != ndr64 || build.uses_ndr64 != btfn {
        tracing::warn!(
            host_build = identity.host_build,
            ndr64,
            btfn,
            "the ePIDs claim Windows build {} ({}), whose KMS host {} NDR64 and BTFN; set \
             --ndr64 and --btfn to {} to look like it",
            build.build,
            build.display_name,
            if build.uses_ndr64 {
                "offers"
            } else {
                "offers neither"
            },
            build.uses_ndr64
        );
    }
}
