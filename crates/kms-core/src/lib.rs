//! The KMS host's state and decisions as a deterministic state machine.
//!
//! Every change enters as a [`Command`]; [`State::apply`] reads no clock and draws no random
//! number: time ("now", assigned by the node that proposes the command) and random values
//! (the host identity) travel inside the command. The same sequence of commands therefore
//! produces the same state on every node, which is what the Raft layer relies on.

pub mod catalog;
pub mod command;
pub mod counting;
pub mod identity;
pub mod policy;
pub mod registry;
pub mod security;
pub mod state;
pub mod stats;
pub mod text;

pub use catalog::{CatalogState, CatalogUpdate, HostKeys};
pub use command::{
    ActivationOutcome, ActivationRequest, Command, CommandResult, ConfigApplied, ConfigChange,
    ConfigError, Grant, IdentityPatch, PolicyPatch, Refusal,
};
pub use identity::HostIdentity;
pub use policy::{Policy, PolicyError};
pub use state::State;

/// Milliseconds since the Unix epoch, as assigned by the proposing node.
pub type UnixMillis = u64;

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;
/// A CMID not seen for this long no longer counts (genuine host: 30 days).
pub const CMID_LIFETIME_MS: u64 = 30 * DAY_MS;
