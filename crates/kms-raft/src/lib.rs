//! Replication of the KMS host state through Raft.
//!
//! * [`types`]: the openraft type configuration (commands are `kms_core::Command`).
//! * [`log_store`]: the Raft log and vote on a [`kms_store::Storage`].
//! * [`state_machine`]: applies committed commands to `kms_core::State`; snapshots.
//! * [`network`] / [`grpc`]: the tonic transport (`proto/raft.proto`); [`tls`], [`pki`] and
//!   [`auth`]: how it is secured (built-in cluster PKI with join tokens, an operator PKI, or
//!   plain TCP on loopback) and who may call what.
//! * [`cluster`]: the handle the daemon uses: batched activations (group commit), forwarding
//!   from followers to the leader, membership changes, enrollment, status, and the minority
//!   fallback.
//! * [`error`]: typed errors.

// openraft's trait signatures fix the (large) error types.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod error;
pub mod forward;
pub mod grpc;
pub mod log_store;
pub mod network;
pub mod offline;
pub mod pki;
pub mod state_machine;
pub mod tls;
pub mod types;

/// Generated tonic/prost code for `proto/raft.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kms.raft.v1");
}

pub use cluster::{Cluster, ClusterConfig, ClusterError};
pub use types::{DnsAdvert, KmsNode, NodeId, TypeConfig};
