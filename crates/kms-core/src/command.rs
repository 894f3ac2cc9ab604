//! Commands (the replicated log's entries) and their results.

use std::collections::BTreeMap;
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
    /// A configuration patch (policy and identity overrides) applied as one change, on the
    /// configuration version it expects (compare-and-set). Appended last: the older
    /// variants keep their encoding.
    ChangeConfig(ConfigChange),
}

/// Policy fields to change; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyPatch {
    pub activation_interval: Option<u32>,
    pub renewal_interval: Option<u32>,
    pub product_policy: Option<crate::policy::ProductPolicy>,
    pub licensed_csvlks: Option<Vec<Uuid>>,
    /// `Some(None)` turns the clock-skew check off.
    pub max_clock_skew_minutes: Option<Option<u32>>,
    pub client_networks: Option<Vec<ipnet::IpNet>>,
    pub registry_retention_days: Option<u32>,
}

impl PolicyPatch {
    /// `current` with this patch applied (not validated).
    pub fn patched(&self, current: &Policy) -> Policy {
        let mut p = current.clone();
        if let Some(v) = self.activation_interval {
            p.activation_interval = v;
        }
        if let Some(v) = self.renewal_interval {
            p.renewal_interval = v;
        }
        if let Some(v) = self.product_policy {
            p.product_policy = v;
        }
        if let Some(v) = &self.licensed_csvlks {
            p.licensed_csvlks = v.clone();
        }
        if let Some(v) = self.max_clock_skew_minutes {
            p.max_clock_skew_minutes = v;
        }
        if let Some(v) = &self.client_networks {
            p.client_networks = v.clone();
        }
        if let Some(v) = self.registry_retention_days {
            p.registry_retention_days = v;
        }
        p
    }
}

/// Identity overrides (validated by the proposer: HWID syntax, ePID syntax, CSVLK ids).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityPatch {
    pub hwid: Option<[u8; 8]>,
    /// ePID per CSVLK id; CSVLKs not listed keep theirs.
    pub epids: BTreeMap<Uuid, String>,
}

impl IdentityPatch {
    /// `current` with this patch applied.
    pub fn patched(&self, current: &HostIdentity) -> HostIdentity {
        let mut identity = current.clone();
        if let Some(hwid) = self.hwid {
            identity.hwid = hwid;
        }
        for (csvlk, epid) in &self.epids {
            identity.epids.insert(*csvlk, epid.clone());
        }
        identity
    }
}

/// One atomic configuration change ([`Command::ChangeConfig`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigChange {
    /// Apply only if the configuration version is still this one; `None`: on whatever
    /// version is current when the command is applied.
    pub expected_version: Option<u64>,
    pub policy: Option<PolicyPatch>,
    pub identity: Option<IdentityPatch>,
    /// Host keys to install (validated again by `apply`), applied before the identity patch.
    pub host_keys: Option<crate::catalog::HostKeys>,
}

/// A configuration change applied: the new version and what changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigApplied {
    pub version: u64,
    /// `host_keys`, `policy`, `identity`: the parts whose value changed.
    pub changed: Vec<String>,
}

/// Why a configuration change was not applied (nothing changed then).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration version is {current}, not the expected {expected}: another change was applied first; read the configuration again")]
    Stale { expected: u64, current: u64 },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("the host identity is not initialised yet")]
    NoIdentity,
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
    /// A configuration change applied, or why it was not (nothing changed then).
    Config(Result<ConfigApplied, ConfigError>),
}
