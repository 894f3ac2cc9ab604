//! openraft type configuration.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// What the cluster knows about a member besides its id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsNode {
    /// gRPC address peers use for Raft traffic (`host:port`).
    pub raft_addr: String,
    /// Admin HTTP base address (`host:port`), for operators and joining nodes.
    pub admin_addr: String,
    /// A KMS address the leader can reach to check that the node answers (`host:port`).
    pub kms_addr: String,
    /// How the node is published in DNS SRV records, if it is.
    pub dns: Option<DnsAdvert>,
}

/// A member's DNS publication: its SRV target and its own priority and weight per zone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAdvert {
    pub host: String,
    pub port: u16,
    pub addresses: Vec<std::net::IpAddr>,
    /// Zone (without the final dot) -> (priority, weight).
    pub zones: std::collections::BTreeMap<String, (u16, u16)>,
}

impl fmt::Display for KmsNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={}", self.raft_addr, self.admin_addr)
    }
}

/// Result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApplyResult {
    /// A `kms_core::Command` was applied.
    Command(kms_core::CommandResult),
    /// A blank or membership entry (nothing for the application).
    Internal,
}

openraft::declare_raft_types!(
    /// Raft types of a KMS cluster.
    pub TypeConfig:
        D = kms_core::Command,
        R = ApplyResult,
        NodeId = NodeId,
        Node = KmsNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, KmsNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, KmsNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
