//! JSON shapes of the API (documented in the OpenAPI document). Field names are a contract
//! other tools rely on: add fields, never rename.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::backend::{DnsStatus, Role};
use crate::events::Event;

/// Listening addresses of this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ListenStatus {
    pub kms: Vec<String>,
    pub admin: String,
    pub raft: String,
    /// Separate `/healthz` `/readyz` `/metrics` listener, when configured.
    pub metrics: Option<String>,
}

/// Requests per client license status, like `slmgr /dlv` on a KMS host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LicenseStatusView {
    pub unlicensed: u64,
    pub licensed: u64,
    pub initial_grace: u64,
    pub out_of_tolerance_grace: u64,
    pub non_genuine_grace: u64,
    pub notification: u64,
    pub extended_grace: u64,
    /// Any status value outside 0..=6.
    pub other: u64,
}

impl From<&kms_core::stats::LicenseStatusCounts> for LicenseStatusView {
    fn from(c: &kms_core::stats::LicenseStatusCounts) -> Self {
        Self {
            unlicensed: c.unlicensed,
            licensed: c.licensed,
            initial_grace: c.initial_grace,
            out_of_tolerance_grace: c.out_of_tolerance_grace,
            non_genuine_grace: c.non_genuine_grace,
            notification: c.notification,
            extended_grace: c.extended_grace,
            other: c.other,
        }
    }
}

/// The count of one application (one CMID list), against its activation threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApplicationStatus {
    pub application_id: Uuid,
    pub name: String,
    /// Distinct clients seen in the last 30 days (what clients receive).
    pub current_count: u32,
    /// Count clients need before they activate: the largest N a client of this application
    /// asked for, or the catalog's largest N for it before any request.
    pub threshold: u32,
    pub threshold_met: bool,
    /// Size of the CMID cache (2 x the largest N seen).
    pub capacity: u32,
    pub max_n_seen: u32,
    /// Requests (granted or refused) counted for this application.
    pub requests: u64,
}

/// The ePID this host answers with for one CSVLK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EpidStatus {
    pub csvlk_id: Uuid,
    pub csvlk: String,
    pub epid: String,
    /// Whether the policy lists this CSVLK as licensed.
    pub licensed: bool,
}

/// `GET /api/v1/status`: what `slmgr /dlv` shows on a KMS host, plus cluster facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatusResponse {
    pub node_id: u64,
    pub role: Role,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub version: String,
    pub cluster_id: Option<Uuid>,
    /// Whether this node reaches a quorum.
    pub quorum: bool,
    pub last_applied: u64,
    pub queued_activations: u64,
    pub listen: ListenStatus,
    pub dns: DnsStatus,
    /// Current count per application name (e.g. `"Windows": 27`); every catalog application
    /// is present.
    pub current_count: BTreeMap<String, u32>,
    pub applications: Vec<ApplicationStatus>,
    pub total_requests: u64,
    pub failed_requests: u64,
    pub granted_requests: u64,
    pub requests_by_license_status: LicenseStatusView,
    /// Refused requests per HRESULT (`"0xC004F042": 3`).
    pub refusals: BTreeMap<String, u64>,
    /// Minutes a failed client waits before retrying.
    pub activation_interval: u32,
    /// Minutes between renewals.
    pub renewal_interval: u32,
    /// `open` or `strict`.
    pub product_policy: String,
    /// 16 hex digits, `None` before the identity exists.
    pub hwid: Option<String>,
    pub host_build: Option<u32>,
    pub epids: Vec<EpidStatus>,
    /// The replicated product catalog and the installed host keys (`None` before the first
    /// catalog is replicated).
    #[serde(default)]
    pub catalog: Option<CatalogSummary>,
    /// Clients in the registry (per application list).
    pub registered_clients: u64,
    /// Server time of this answer, Unix milliseconds.
    pub time_ms: u64,
}

/// One registered client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClientView {
    pub cmid: Uuid,
    pub workstation: String,
    /// Address of the latest request.
    pub address: Option<String>,
    pub application_id: Uuid,
    pub application: String,
    pub sku_id: Uuid,
    /// SKU name from the catalog (the GUID when unknown).
    pub product: String,
    pub kms_id: Uuid,
    /// KMS id (product group) name from the catalog (the GUID when unknown).
    pub product_group: String,
    /// License status name of the latest request (`initial_grace`, `licensed`, ...).
    pub license_status: String,
    pub license_status_code: u32,
    /// KMS protocol version, e.g. `6.0`.
    pub protocol: String,
    pub is_vm: bool,
    /// RFC 3339 (UTC).
    pub first_seen: String,
    pub last_seen: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub request_count: u32,
    /// Count answered to the latest request.
    pub last_count: u32,
    /// Whether that count reached the client's N.
    pub activated: bool,
}

/// `GET /api/v1/clients`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClientsPage {
    /// Matching clients before paging.
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub clients: Vec<ClientView>,
}

/// Filters of `GET /api/v1/clients` (documentation; parsing is strict: unknown parameters
/// are a 400).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ClientsParams {
    /// Application: name (`windows`, `office2010`, `office2013`, or the catalog name) or id.
    pub application: Option<String>,
    /// Product: SKU id, KMS id, SKU name or KMS id (product group) name.
    pub product: Option<String>,
    /// Only clients seen at or after this time: RFC 3339 or Unix milliseconds.
    pub since: Option<String>,
    /// Case-insensitive text found in the workstation, CMID, address or product.
    pub search: Option<String>,
    /// Skip this many (default 0).
    pub offset: Option<usize>,
    /// Page size, 1..=1000 (default 100).
    pub limit: Option<usize>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// Filters of `GET /api/v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct EventsParams {
    /// Only this event id (12290 activation, 12293 DNS publish failure, 12294 DNS publish
    /// success, 1000 node, 1001 membership, 1002 config, 1003 quorum).
    pub event_id: Option<u32>,
    /// Only events with a sequence number above this one.
    pub after: Option<u64>,
    /// Newest first, at most this many, 1..=1000 (default 100).
    pub limit: Option<usize>,
}

/// `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    /// Newest first.
    pub events: Vec<Event>,
    /// Events currently kept (retention is bounded; oldest go first).
    pub retained: usize,
}

/// Replicated policy as shown and accepted by the config endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyView {
    pub activation_interval: u32,
    pub renewal_interval: u32,
    /// `open` (any KMS id) or `strict` (only what the installed host keys activate).
    pub product_policy: String,
    /// Legacy, always empty once a catalog is replicated (see `host_keys`).
    pub licensed_csvlks: Vec<Uuid>,
    /// Host key installed per application id (configured or the catalog's default).
    #[serde(default)]
    pub host_keys: BTreeMap<Uuid, Uuid>,
    /// `null` = the clock-skew check is off.
    pub max_clock_skew_minutes: Option<u32>,
    /// CIDRs allowed to connect; empty = everyone.
    pub client_networks: Vec<String>,
    pub registry_retention_days: u32,
}

/// Host identity as shown by `GET /api/v1/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IdentityView {
    pub cluster_id: Uuid,
    pub hwid: String,
    pub host_build: u32,
    pub lcid: u32,
    /// ePID per CSVLK id.
    pub epids: BTreeMap<Uuid, String>,
}

/// `GET /api/v1/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    /// Configuration version: incremented by every applied change; send it back as
    /// `expected_version` to change the configuration only if nobody changed it meanwhile.
    #[serde(default)]
    pub version: u64,
    pub policy: PolicyView,
    pub identity: Option<IdentityView>,
}

/// `PUT /api/v1/config`: every field is optional; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    /// Apply only if the configuration version is still this one (compare-and-set; 409
    /// Conflict otherwise). Absent: applied on the version current when the change commits.
    pub expected_version: Option<u64>,
    pub policy: Option<PolicyPatch>,
    pub identity: Option<IdentityPatch>,
}

/// Policy changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    /// 15..=43200 minutes.
    pub activation_interval: Option<u32>,
    /// 15..=43200 minutes.
    pub renewal_interval: Option<u32>,
    /// `open` or `strict`.
    #[schema(value_type = Option<String>)]
    pub product_policy: Option<kms_core::policy::ProductPolicy>,
    /// Deprecated: mapped to `host_keys` (the newest listed key per application).
    pub licensed_csvlks: Option<Vec<Uuid>>,
    /// Installed host key per application (`windows`, `office`, `office2010` or an
    /// application id) -> host key id of the catalog; replaces the whole choice.
    pub host_keys: Option<BTreeMap<String, Uuid>>,
    /// 1..=43200 minutes; `null` turns the check off.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>)]
    pub max_clock_skew_minutes: Option<Option<u32>>,
    #[schema(value_type = Option<Vec<String>>)]
    pub client_networks: Option<Vec<ipnet::IpNet>>,
    /// 30..=3650 days.
    pub registry_retention_days: Option<u32>,
}

/// Identity overrides (replicated): a HWID and/or ePIDs for some CSVLKs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityPatch {
    /// 16 hex digits.
    pub hwid: Option<String>,
    /// ePID per CSVLK id; CSVLKs not listed keep theirs.
    pub epids: Option<BTreeMap<Uuid, String>>,
}

/// Distinguishes an absent field (outer `None`) from an explicit `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// One edition (SKU) of a product group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SkuView {
    pub sku_id: Uuid,
    pub name: String,
    /// Public generic volume license key, when published.
    pub gvlk: Option<String>,
}

/// A KMS id (product group) and whether the current policy activates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProductView {
    pub kms_id: Uuid,
    pub name: String,
    pub application_id: Uuid,
    pub application: String,
    pub n_count_policy: u32,
    pub is_retail: bool,
    pub is_preview: bool,
    /// Whether a request for this KMS id is granted under the current policy.
    pub activated: bool,
    /// The CSVLK whose ePID answers it.
    pub csvlk_id: Option<Uuid>,
    pub csvlk: Option<String>,
    pub skus: Vec<SkuView>,
}

/// A CSVLK (KMS host key group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CsvlkView {
    pub csvlk_id: Uuid,
    pub name: String,
    pub group_id: Option<u32>,
    pub licensed: bool,
    pub is_lab: bool,
    pub is_preview: bool,
    /// Number of KMS ids it activates.
    pub activates: usize,
}

/// `GET /api/v1/products`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProductsResponse {
    pub product_policy: String,
    pub products: Vec<ProductView>,
    pub csvlks: Vec<CsvlkView>,
}

/// Filters of `GET /api/v1/products`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ProductsParams {
    /// Case-insensitive words that must all appear in the product group or a SKU name.
    pub search: Option<String>,
    /// `true`: only products the policy activates; `false`: only the others.
    pub activated: Option<bool>,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, `ready` or `not ready`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The host key installed for one application and the ePID answering its clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstalledHostKey {
    pub application_id: Uuid,
    pub application: String,
    pub host_key_id: Uuid,
    pub host_key: String,
    /// Whether the operator chose it (`false`: the catalog's default, the newest).
    pub configured: bool,
    pub epid: Option<String>,
}

/// The replicated catalog in short (`GET /api/v1/status`, answer of `PUT /api/v1/catalog`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CatalogSummary {
    pub version: String,
    pub source: String,
    pub kms_items: usize,
    pub skus: usize,
    pub host_keys: usize,
    pub installed: Vec<InstalledHostKey>,
}
