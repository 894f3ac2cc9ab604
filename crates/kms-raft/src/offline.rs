//! Offline tools on a stopped node's storage: inspection, and the forced single-node recovery
//! used when a majority of the cluster is lost for good.

use std::collections::{BTreeMap, BTreeSet};

use kms_core::{Command, State};
use kms_store::Storage;
use openraft::{EntryPayload, Membership, Vote};
use serde::Serialize;
use uuid::Uuid;

use crate::types::{Entry, KmsNode, LogId, NodeId, SnapshotMeta, StoredMembership};

const VOTE_KEY: &str = "raft.vote";
const COMMITTED_KEY: &str = "raft.committed";
const PURGED_KEY: &str = "raft.purged";
const RECOVERED_KEY: &str = "recovered";

/// What a data directory holds.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub cluster_id: Option<Uuid>,
    pub voters: Vec<NodeId>,
    pub members: BTreeMap<NodeId, KmsNode>,
    /// Index of the last entry in the log (or of the snapshot when the log is empty).
    pub last_log_index: u64,
    pub last_log_term: u64,
    pub snapshot_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub registered_clients: usize,
    /// Activations answered without a quorum and not yet committed.
    pub queued_activations: usize,
    /// Set when this data dir was recovered with `--force-single-node`.
    pub recovered: Option<String>,
}

/// The state after the snapshot and every local log entry, with the last log id and
/// membership seen.
struct Replayed {
    state: State,
    last: Option<LogId>,
    membership: StoredMembership,
    snapshot_index: Option<u64>,
}

fn replay(storage: &dyn Storage) -> Result<Replayed, String> {
    let (mut state, mut last, mut membership, snapshot_index) =
        match storage.read_snapshot().map_err(|e| e.to_string())? {
            Some((meta, body)) => {
                let meta: SnapshotMeta =
                    postcard::from_bytes(&meta).map_err(|e| format!("snapshot meta: {e}"))?;
                let state = State::from_snapshot(&body).map_err(|e| format!("snapshot: {e}"))?;
                let index = meta.last_log_id.map(|l| l.index);
                (state, meta.last_log_id, meta.last_membership, index)
            }
            None => (State::default(), None, StoredMembership::default(), None),
        };
    if let Some((_, hi)) = storage.bounds().map_err(|e| e.to_string())? {
        let from = last.map(|l| l.index + 1).unwrap_or(0);
        for (_, bytes) in storage
            .read_range(from, hi.saturating_add(1))
            .map_err(|e| e.to_string())?
        {
            let entry: Entry =
                postcard::from_bytes(&bytes).map_err(|e| format!("log entry: {e}"))?;
            match &entry.payload {
                EntryPayload::Normal(command) => {
                    state.apply(command);
                }
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m.clone());
                }
                EntryPayload::Blank => {}
            }
            last = Some(entry.log_id);
        }
    }
    Ok(Replayed {
        state,
        last,
        membership,
        snapshot_index,
    })
}

fn get<T: serde::de::DeserializeOwned>(
    storage: &dyn Storage,
    key: &str,
) -> Result<Option<T>, String> {
    match storage.get_meta(key).map_err(|e| e.to_string())? {
        Some(b) => postcard::from_bytes(&b)
            .map(Some)
            .map_err(|e| format!("{key}: {e}")),
        None => Ok(None),
    }
}

/// Reads everything, changes nothing.
pub fn inspect(storage: &dyn Storage) -> Result<Inspection, String> {
    let r = replay(storage)?;
    let committed: Option<Option<LogId>> = get(storage, COMMITTED_KEY)?;
    let recovered: Option<String> = get(storage, RECOVERED_KEY)?;
    let queued = storage
        .scan_meta("queue/", usize::MAX)
        .map_err(|e| e.to_string())?
        .len();
    Ok(Inspection {
        cluster_id: r.state.identity().map(|i| i.cluster_id),
        voters: r.membership.membership().voter_ids().collect(),
        members: r
            .membership
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect(),
        last_log_index: r.last.map(|l| l.index).unwrap_or(0),
        last_log_term: r.last.map(|l| l.leader_id.term).unwrap_or(0),
        snapshot_index: r.snapshot_index,
        committed_index: committed.flatten().map(|l| l.index),
        registered_clients: r.state.client_count(),
        queued_activations: queued,
        recovered,
    })
}

/// Turns this data dir into a one-node cluster of `node_id` that keeps the state (identity,
/// counts, registry, policy) with a new cluster id, so members of the old cluster are refused.
/// Returns `Ok(false)` when the data dir was already recovered this way (no-op).
pub fn force_single_node(
    storage: &dyn Storage,
    node_id: NodeId,
    node: KmsNode,
    now_ms: u64,
) -> Result<bool, String> {
    if get::<String>(storage, RECOVERED_KEY)?.is_some() {
        let r = replay(storage)?;
        let voters: BTreeSet<NodeId> = r.membership.membership().voter_ids().collect();
        if voters == BTreeSet::from([node_id]) {
            return Ok(false);
        }
    }
    let r = replay(storage)?;
    let Some(last) = r.last else {
        return Err("this data directory holds no state to recover".into());
    };
    let mut state = r.state;
    let Some(mut identity) = state.identity().cloned() else {
        return Err("this data directory has no host identity".into());
    };
    let old_cluster = identity.cluster_id;
    identity.cluster_id = Uuid::new_v4();
    state.apply(&Command::ReplaceIdentity(identity.clone()));
    let membership = Membership::new(
        vec![BTreeSet::from([node_id])],
        BTreeMap::from([(node_id, node)]),
    );
    let meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), membership),
        snapshot_id: format!("recovered-{}-{}", last.leader_id.term, last.index),
    };
    let meta_bytes = postcard::to_allocvec(&meta).map_err(|e| e.to_string())?;
    storage
        .write_snapshot(&meta_bytes, &mut |out| {
            state
                .write_snapshot(out)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|e| e.to_string())?;
    // The log is now entirely inside the snapshot; a fresh term lets this node elect itself.
    let put = |key: &str, bytes: Vec<u8>| storage.put_meta(key, &bytes).map_err(|e| e.to_string());
    put(
        PURGED_KEY,
        postcard::to_allocvec(&Some(last)).map_err(|e| e.to_string())?,
    )?;
    put(
        COMMITTED_KEY,
        postcard::to_allocvec(&Some(last)).map_err(|e| e.to_string())?,
    )?;
    let vote: Vote<NodeId> = Vote::new(last.leader_id.term + 1, node_id);
    put(
        VOTE_KEY,
        postcard::to_allocvec(&vote).map_err(|e| e.to_string())?,
    )?;
    storage.flush().map_err(|e| e.to_string())?;
    storage.purge_upto(u64::MAX).map_err(|e| e.to_string())?;
    put(
        RECOVERED_KEY,
        postcard::to_allocvec(&format!(
            "forced single-node recovery at unix ms {now_ms} from cluster {old_cluster} at log index {}; new cluster {}",
            last.index, identity.cluster_id
        ))
        .map_err(|e| e.to_string())?,
    )?;
    storage.flush().map_err(|e| e.to_string())?;
    Ok(true)
}
