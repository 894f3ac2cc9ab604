//! Commands (the replicated log's entries) and their results.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::{CatalogUpdate, HostKeys};
use crate::security::{SecurityCommand, SecurityError};
use crate::{HostIdentity, Policy, UnixMillis};

/// One activation request as the host saw it (decoded KMS base request + transport facts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationRequest {
    pub application_id: Uuid,
    pub sku_id: Uuid,
    pub kms_counted_id: Uuid,
    pub client_machine_id: Uuid,
    pub previous_client_machine_id: Uuid,
    /// The client's N-count policy.
    pub required_client_count: u32,
    /// Client license status (0..=6, see the protocol sheet section 3).
    pub license_status: u32,
    /// Minutes left in the client's current license state.
    pub binding_expiration: u32,
    pub is_client_vm: bool,
    /// Client clock as FILETIME.
    pub request_time: u64,
    pub workstation_name: String,
    pub protocol_major: u16,
    pub protocol_minor: u16,
    /// Address the request came from (the TCP peer).
    pub client_address: Option<SocketAddr>,
}

/// An entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the host identity. The first one applied wins; later ones are ignored, so two
    /// nodes racing to initialise a cluster still end with one identity.
    InitIdentity(HostIdentity),
    /// Replaces the identity on an operator's explicit request (identity overrides).
    ReplaceIdentity(HostIdentity),
    /// Activation requests received at `now` (proposer's clock), applied in order.
    Activate {
        now: UnixMillis,
        requests: Vec<ActivationRequest>,
    },
    /// Replaces the policy (validated by the proposer with [`Policy::validate`]; `apply`
    /// validates again and keeps the old policy if it is invalid).
    SetPolicy(Policy),
    /// Drops registry entries older than the policy's retention and expired CMIDs at `now`.
    Expire { now: UnixMillis },
    /// Changes the cluster's security state (CA, node certificates, join tokens).
    Security(SecurityCommand),
    /// Installs the product catalog if the cluster has none yet (the compiled-in default,
    /// proposed after the identity; later ones are ignored, like `InitIdentity`).
    InitCatalog(CatalogUpdate),
    /// Replaces the product catalog (an operator's import), validated again by `apply`.
    SetCatalog(CatalogUpdate),
    /// Names the installed host key per application.
    SetHostKeys(HostKeys),
}

/// A successful answer to one activation request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// ePID of the CSVLK that serves the request's KMS id.
    pub epid: String,
    pub hwid: [u8; 8],
    /// Count returned to the client (includes the requesting client).
    pub current_count: u32,
    pub activation_interval: u32,
    pub renewal_interval: u32,
    /// Whether the client will consider itself activated (`current_count >= N`).
    pub activated: bool,
}

/// Why an activation request was refused; `hresult` goes into the error stub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub hresult: u32,
    pub reason: String,
}

/// The outcome of one activation request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActivationOutcome {
    Granted(Grant),
    Refused(Refusal),
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Identity created (`true`) or an identity already existed (`false`).
    Identity { created: bool },
    /// One outcome per request, in order.
    Activations(Vec<ActivationOutcome>),
    /// Policy replaced (`Ok`) or rejected with the validation message.
    Policy(Result<(), String>),
    /// Number of registry entries and CMIDs dropped.
    Expired { clients: usize, cmids: usize },
    /// A security command applied, or why it was refused (nothing changed then).
    Security(Result<(), SecurityError>),
    /// Catalog installed (`Ok(true)`), already present for `InitCatalog` (`Ok(false)`), or
    /// refused with the reason (nothing changed).
    Catalog(Result<bool, String>),
    /// Host keys set, or refused with the reason.
    HostKeys(Result<(), String>),
}
