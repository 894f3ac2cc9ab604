//! The replicated state and `apply`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::CatalogState;
use crate::command::{ActivationOutcome, ActivationRequest, Grant, Refusal};
use crate::command::{ConfigApplied, ConfigChange, ConfigError};
use crate::counting::{
    application_list_in, filetime_to_unix_ms, Counting, ListKey, MAX_REQUIRED_CLIENT_COUNT,
};
use crate::policy::ProductPolicy;
use crate::registry::{ClientPage, ClientQuery, ClientRecord, Registry};
use crate::security::ClusterSecurity;
use crate::stats::Statistics;
use crate::{Command, CommandResult, HostIdentity, Policy, UnixMillis, DAY_MS};

/// HRESULT_FROM_WIN32(ERROR_INVALID_DATA): bad version, N too large, unusable request, as a
/// genuine host answers.
pub const HR_INVALID_DATA: u32 = 0x8007_000D;
/// The KMS id is not activated by the host's CSVLK (SL_E_VL_KEY_MANAGEMENT_SERVICE_ID_MISMATCH).
pub const HR_KMS_ID_NOT_ALLOWED: u32 = 0xC004_F042;
/// The request's timestamp is too far from the host's clock (the error vlmcsd `-c1` uses).
pub const HR_CLOCK_SKEW: u32 = 0xC004_F06C;

/// Snapshot header: magic then format version, so a foreign or future file is rejected
/// with a clear error instead of being misread.
const SNAPSHOT_MAGIC: &[u8; 4] = b"KMSS";
/// 4 added the configuration version (compare-and-set of configuration changes); 3 added the
/// cluster's security state (CA, node certificates, join tokens) and the replicated catalog
/// and host keys; 2 added each client's last request time (to recognise a request applied
/// twice); 1 to 3 are still read (1 and 2 without a catalog: the leader proposes the built-in
/// one, see `Command::InitCatalog`).
const SNAPSHOT_VERSION: u8 = 4;

/// Why a snapshot could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a kms-core snapshot (bad magic)")]
    BadMagic,
    #[error("unsupported snapshot version {0} (this build reads {SNAPSHOT_VERSION})")]
    UnsupportedVersion(u8),
    #[error("corrupt snapshot: {0}")]
    Decode(#[from] postcard::Error),
    #[error("corrupt snapshot: {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("corrupt snapshot: {0}")]
    Invalid(String),
}

/// Count summary of one application list (like `slmgr /dlv` on a KMS host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppCount {
    pub application_id: Uuid,
    /// Catalog name, or "unknown".
    pub name: String,
    /// Live CMIDs now.
    pub current_count: u32,
    /// 2 × `max_n_seen` (at least 1).
    pub capacity: u32,
    pub max_n_seen: u32,
}

/// [`State`] as snapshot format 1 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StateV1 {
    identity: Option<HostIdentity>,
    policy: Policy,
    counting: Counting,
    registry: crate::registry::RegistryReprV1,
    statistics: Statistics,
}

/// [`State`] as snapshot format 2 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StateV2 {
    identity: Option<HostIdentity>,
    policy: Policy,
    counting: Counting,
    registry: Registry,
    statistics: Statistics,
}

/// [`State`] as snapshot format 3 wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StateV3 {
    identity: Option<HostIdentity>,
    policy: Policy,
    counting: Counting,
    registry: Registry,
    statistics: Statistics,
    security: ClusterSecurity,
    catalog: CatalogState,
}

/// The latest proposer time carried by an applied command ([`Command::Activate`],
/// [`Command::Expire`]): a lower bound of the cluster's time, for the clock that stamps the
/// next commands. Not serialized (the snapshot format is unchanged): [`State::from_snapshot`]
/// derives it from the newest CMID and client times, which can only be earlier than the true
/// value (an `Expire` may have carried a later time), so it stays a lower bound. Ignored by
/// `==`: it is a hint, not part of what the state decides.
#[derive(Clone, Copy, Debug, Default)]
struct ReplicatedTime(Option<UnixMillis>);

impl PartialEq for ReplicatedTime {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl ReplicatedTime {
    fn observe(&mut self, time: UnixMillis) {
        self.0 = Some(self.0.map_or(time, |t| t.max(time)));
    }
}

/// The whole replicated state. Serializable as a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    identity: Option<HostIdentity>,
    policy: Policy,
    counting: Counting,
    registry: Registry,
    statistics: Statistics,
    security: ClusterSecurity,
    #[serde(skip)]
    replicated_time: ReplicatedTime,
    catalog: CatalogState,
    /// Incremented by every applied configuration change that changed something (policy,
    /// identity overrides). Snapshot format 4.
    config_version: u64,
}

/// Strict mode, like a genuine host with one host key per application: the KMS id must be a
/// volume product of the request's application that the installed key activates.
fn strict_check(
    catalog: &kms_catalog::CatalogData,
    host_key: &kms_catalog::HostKeyData,
    request: &ActivationRequest,
) -> Result<(), ActivationOutcome> {
    let kms = request.kms_counted_id;
    let Some(item) = catalog.kms_item(&kms) else {
        return Err(refuse(
            HR_KMS_ID_NOT_ALLOWED,
            format!("KMS id {kms} is not in the catalog"),
        ));
    };
    if item.application_id != request.application_id {
        return Err(refuse(
            HR_KMS_ID_NOT_ALLOWED,
            format!(
                "application id {} does not match KMS id {kms} ({}) of application {}",
                request.application_id, item.name, item.application_id
            ),
        ));
    }
    if item.is_retail || item.is_preview {
        return Err(refuse(
            HR_KMS_ID_NOT_ALLOWED,
            format!("{} is a retail/OEM or preview product", item.name),
        ));
    }
    if let Some(sku) = catalog.sku(&request.sku_id) {
        if sku.is_preview {
            return Err(refuse(
                HR_KMS_ID_NOT_ALLOWED,
                format!("{} is a preview edition", sku.name),
            ));
        }
        if sku.kms_item_id != kms {
            return Err(refuse(
                HR_KMS_ID_NOT_ALLOWED,
                format!(
                    "SKU {} ({}) does not belong to KMS id {kms}",
                    sku.id, sku.name
                ),
            ));
        }
    }
    if !host_key.activates(&kms) {
        return Err(refuse(
            HR_KMS_ID_NOT_ALLOWED,
            format!(
                "{} is not activated by the installed host key {}",
                item.name, host_key.name
            ),
        ));
    }
    Ok(())
}

fn refuse(hresult: u32, reason: impl Into<String>) -> ActivationOutcome {
    ActivationOutcome::Refused(Refusal {
        hresult,
        reason: reason.into(),
    })
}

impl State {
    /// Applies one command. Deterministic: no clock, no randomness, no I/O.
    pub fn apply(&mut self, command: &Command) -> CommandResult {
        match command {
            Command::InitIdentity(identity) => {
                let created = self.identity.is_none();
                if created {
                    self.identity = Some(identity.clone());
                }
                CommandResult::Identity { created }
            }
            Command::ReplaceIdentity(identity) => {
                if self.identity.as_ref() != Some(identity) {
                    self.identity = Some(identity.clone());
                    self.config_version = self.config_version.saturating_add(1);
                }
                CommandResult::Identity { created: true }
            }
            Command::Activate { now, requests } => {
                self.replicated_time.observe(*now);
                CommandResult::Activations(
                    requests.iter().map(|r| self.activate(*now, r)).collect(),
                )
            }
            Command::SetPolicy(policy) => match policy.validate() {
                Ok(()) => {
                    let before = self.policy.clone();
                    self.policy = policy.clone();
                    // An old-style policy naming licensed CSVLKs becomes host keys.
                    self.catalog.migrate_licensed_csvlks(&mut self.policy);
                    if self.policy != before {
                        self.config_version = self.config_version.saturating_add(1);
                    }
                    CommandResult::Policy(Ok(()))
                }
                Err(e) => CommandResult::Policy(Err(e.to_string())),
            },
            Command::InitCatalog(update) | Command::SetCatalog(update) => {
                let only_if_none = matches!(command, Command::InitCatalog(_));
                CommandResult::Catalog(self.catalog.install(
                    update,
                    only_if_none,
                    self.identity.as_mut(),
                    &mut self.policy,
                ))
            }
            Command::SetHostKeys(keys) => {
                CommandResult::HostKeys(self.catalog.set_host_keys(keys, self.identity.as_mut()))
            }
            Command::Expire { now } => {
                self.replicated_time.observe(*now);
                let retention_ms =
                    u64::from(self.policy.registry_retention_days).saturating_mul(DAY_MS);
                let clients = self.registry.expire(*now, retention_ms);
                let cmids = self.counting.expire(*now);
                CommandResult::Expired { clients, cmids }
            }
            Command::Security(command) => CommandResult::Security(self.security.apply(command)),
            Command::ChangeConfig(change) => CommandResult::Config(self.change_config(change)),
        }
    }

    /// Applies a configuration patch as one change, or nothing at all.
    fn change_config(&mut self, change: &ConfigChange) -> Result<ConfigApplied, ConfigError> {
        if let Some(expected) = change.expected_version {
            if expected != self.config_version {
                return Err(ConfigError::Stale {
                    expected,
                    current: self.config_version,
                });
            }
        }
        let policy = change.policy.as_ref().map(|p| p.patched(&self.policy));
        if let Some(policy) = &policy {
            policy.validate().map_err(|e| ConfigError::Invalid {
                field: format!("policy.{}", e.field),
                message: e.message,
            })?;
        }
        if change.identity.is_some() && self.identity.is_none() {
            return Err(ConfigError::NoIdentity);
        }
        let mut changed = Vec::new();
        if let Some(keys) = &change.host_keys {
            // Validates everything before it changes anything.
            let before = (self.catalog.clone(), self.identity.clone());
            self.catalog
                .set_host_keys(keys, self.identity.as_mut())
                .map_err(|message| ConfigError::Invalid {
                    field: "policy.host_keys".into(),
                    message,
                })?;
            if (&self.catalog, &self.identity) != (&before.0, &before.1) {
                changed.push("host_keys".to_owned());
            }
        }
        if let Some(policy) = policy {
            if policy != self.policy {
                self.policy = policy;
                changed.push("policy".to_owned());
            }
        }
        let identity = match (&change.identity, &self.identity) {
            (Some(patch), Some(current)) => Some(patch.patched(current)),
            _ => None,
        };
        if let Some(identity) = identity {
            if self.identity.as_ref() != Some(&identity) {
                self.identity = Some(identity);
                changed.push("identity".to_owned());
            }
        }
        // A change that changes nothing keeps the version (a retried request stays valid).
        if !changed.is_empty() {
            self.config_version = self.config_version.saturating_add(1);
        }
        Ok(ConfigApplied {
            version: self.config_version,
            changed,
        })
    }

    /// Incremented by every applied configuration change: the version a
    /// [`ConfigChange::expected_version`] names.
    pub fn config_version(&self) -> u64 {
        self.config_version
    }

    /// Decides one request and records it in the statistics (and, if granted, in the CMID
    /// cache and the registry).
    fn activate(&mut self, now: UnixMillis, request: &ActivationRequest) -> ActivationOutcome {
        let list = application_list_in(
            self.catalog.catalog(),
            &request.application_id,
            &request.kms_counted_id,
        );
        // The same request applied a second time (resent inside the cluster after its answer
        // deadline) is answered again but is not a second request of the client.
        let repeat = self.registry.is_repeat(&list.id, request);
        let outcome = self.decide(now, request, &list);
        if repeat {
            return outcome;
        }
        let refusal = match &outcome {
            ActivationOutcome::Granted(_) => None,
            ActivationOutcome::Refused(r) => Some(r.hresult),
        };
        // Unknown ids that never got a list are pooled so junk cannot grow the statistics.
        let stats_list = if list.known || self.counting.list(&list.id).is_some() {
            list.id
        } else {
            Uuid::nil()
        };
        self.statistics
            .record(stats_list, request.license_status, refusal);
        outcome
    }

    /// Everything that may refuse a request, without touching any state: returns the ePID
    /// and HWID to answer with, or the refusal.
    fn check(
        &self,
        now: UnixMillis,
        request: &ActivationRequest,
        list: &ListKey,
    ) -> Result<(String, [u8; 8]), ActivationOutcome> {
        let Some(identity) = &self.identity else {
            return Err(refuse(HR_INVALID_DATA, "host identity not initialised"));
        };
        if !matches!(request.protocol_major, 4..=6) || request.protocol_minor != 0 {
            return Err(refuse(
                HR_INVALID_DATA,
                format!(
                    "unsupported protocol version {}.{}",
                    request.protocol_major, request.protocol_minor
                ),
            ));
        }
        let n = request.required_client_count;
        if n > MAX_REQUIRED_CLIENT_COUNT {
            return Err(refuse(
                HR_INVALID_DATA,
                format!("required client count {n} exceeds {MAX_REQUIRED_CLIENT_COUNT}"),
            ));
        }
        let Some(catalog) = self.catalog.catalog() else {
            // A history from before the replicated catalog: a 0.1 data dir replaying the log
            // behind its snapshot, until the leader's `InitCatalog` is applied. Such entries
            // were granted by the old build; they are decided as by an open host without a
            // catalog (the application's own list, the identity's first ePID), which every node
            // does alike, so the clients they recorded are kept.
            if let Err(e) = self.counting.check(list) {
                return Err(refuse(HR_INVALID_DATA, e.to_string()));
            }
            let epid = identity
                .epids
                .values()
                .next()
                .cloned()
                .ok_or_else(|| refuse(HR_INVALID_DATA, "product catalog not initialised"))?;
            return Ok((epid, identity.hwid));
        };
        let item = catalog.kms_item(&request.kms_counted_id);
        // The application whose host key answers: the request's when known, else the one of
        // its KMS id, else Windows (a new product works in open mode before the catalog
        // names it).
        let answering_app = if catalog.application(&request.application_id).is_some() {
            request.application_id
        } else {
            item.map_or(kms_catalog::well_known::WINDOWS, |i| i.application_id)
        };
        let Some(host_key) = self.catalog.host_key_for(&answering_app) else {
            return Err(refuse(
                HR_INVALID_DATA,
                format!("no host key for application {answering_app}"),
            ));
        };
        if self.policy.product_policy == ProductPolicy::Strict {
            let Some(installed) = self.catalog.installed(&answering_app) else {
                return Err(refuse(
                    HR_KMS_ID_NOT_ALLOWED,
                    format!("no host key is installed for application {answering_app}"),
                ));
            };
            strict_check(catalog, installed, request)?;
        }
        if let Some(minutes) = self.policy.max_clock_skew_minutes {
            let client = i128::from(filetime_to_unix_ms(request.request_time));
            let skew = (client - i128::from(now)).abs();
            if skew > i128::from(minutes) * 60_000 {
                return Err(refuse(
                    HR_CLOCK_SKEW,
                    format!("client clock is {} minutes off", skew / 60_000),
                ));
            }
        }
        if let Err(e) = self.counting.check(list) {
            return Err(refuse(HR_INVALID_DATA, e.to_string()));
        }
        let Some(epid) = identity.epids.get(&host_key.id) else {
            return Err(refuse(
                HR_INVALID_DATA,
                format!("no ePID for host key {} ({})", host_key.id, host_key.name),
            ));
        };
        Ok((epid.to_owned(), identity.hwid))
    }

    fn decide(
        &mut self,
        now: UnixMillis,
        request: &ActivationRequest,
        list: &ListKey,
    ) -> ActivationOutcome {
        // Checked before counting: a refused request must leave the caches untouched.
        let (epid, hwid) = match self.check(now, request, list) {
            Ok(answer) => answer,
            Err(refusal) => return refusal,
        };
        let n = request.required_client_count;
        let count = match self.counting.record(
            list,
            request.client_machine_id,
            request.previous_client_machine_id,
            n,
            now,
        ) {
            Ok(count) => count,
            Err(e) => return refuse(HR_INVALID_DATA, e.to_string()),
        };
        self.registry
            .record(list.id, request, now, count, count >= n);
        self.grant(epid, hwid, count, n)
    }

    /// The answer to a granted request: `count` clients against the client's N of `n`.
    fn grant(&self, epid: String, hwid: [u8; 8], count: u32, n: u32) -> ActivationOutcome {
        ActivationOutcome::Granted(Grant {
            epid,
            hwid,
            current_count: count,
            activation_interval: self.policy.activation_interval,
            renewal_interval: self.policy.renewal_interval,
            activated: count >= n,
        })
    }

    /// The answer this request would get if applied at `now` after the not yet committed
    /// requests whose CMIDs are in `pending` (same application list), without changing
    /// anything. A node cut off from its quorum answers with this and queues the request,
    /// so the count it reports is what the committed state will show once the queue is in.
    pub fn provisional(
        &self,
        now: UnixMillis,
        request: &ActivationRequest,
        pending: &[Uuid],
    ) -> ActivationOutcome {
        let list = application_list_in(
            self.catalog.catalog(),
            &request.application_id,
            &request.kms_counted_id,
        );
        let (epid, hwid) = match self.check(now, request, &list) {
            Ok(answer) => answer,
            Err(refusal) => return refusal,
        };
        let n = request.required_client_count;
        let cache = self.counting.list(&list.id);
        let is_live = |cmid: &Uuid| {
            cache
                .and_then(|c| c.last_seen(cmid))
                .is_some_and(|seen| seen.saturating_add(crate::CMID_LIFETIME_MS) > now)
        };
        let live = cache.map(|c| c.live_count(now)).unwrap_or(0);
        let capacity = cache
            .map(|c| c.capacity())
            .unwrap_or(0)
            .max(n.saturating_mul(2))
            .max(1);
        let mut newcomers: Vec<&Uuid> = pending
            .iter()
            .chain(std::iter::once(&request.client_machine_id))
            .filter(|c| !is_live(c))
            .collect();
        newcomers.sort_unstable();
        newcomers.dedup();
        let count = (live.saturating_add(newcomers.len() as u32)).min(capacity);
        self.grant(epid, hwid, count, n)
    }

    pub fn identity(&self) -> Option<&HostIdentity> {
        self.identity.as_ref()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The cluster's security state (CA, node certificates, join tokens).
    pub fn security(&self) -> &ClusterSecurity {
        &self.security
    }

    /// The replicated catalog and host keys.
    pub fn catalog(&self) -> &CatalogState {
        &self.catalog
    }

    pub fn statistics(&self) -> &Statistics {
        &self.statistics
    }

    /// The CMID caches (read-only).
    pub fn counting(&self) -> &Counting {
        &self.counting
    }

    /// The client registry (read-only).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Live CMIDs of one application list at `now` (0 for an unknown list). No mutation.
    pub fn current_count(&self, application_list: &Uuid, now: UnixMillis) -> u32 {
        self.counting.current_count(application_list, now)
    }

    /// Count summary of every application list that has seen a request, by list id.
    pub fn counts(&self, now: UnixMillis) -> Vec<AppCount> {
        let catalog = self.catalog.catalog();
        self.counting
            .lists()
            .map(|(id, cache)| AppCount {
                application_id: *id,
                name: catalog
                    .and_then(|c| c.application(id))
                    .map_or_else(|| "unknown".to_owned(), |a| a.name.clone()),
                current_count: cache.live_count(now),
                capacity: cache.capacity(),
                max_n_seen: cache.max_n_seen(),
            })
            .collect()
    }

    /// Registered clients matching `query`, newest first, paged.
    pub fn clients(&self, query: &ClientQuery) -> ClientPage {
        self.registry.query(query)
    }

    /// The records of one CMID, one per application list it was granted in.
    pub fn client(&self, cmid: &Uuid) -> Vec<ClientRecord> {
        self.registry.by_cmid(cmid)
    }

    /// Registered (application list, CMID) entries.
    pub fn client_count(&self) -> usize {
        self.registry.len()
    }

    /// The latest time carried by an applied timestamped command (see [`ReplicatedTime`]);
    /// `None` before the first one. O(1).
    pub fn last_replicated_time(&self) -> Option<UnixMillis> {
        self.replicated_time.0
    }

    /// The newest CMID or client time in the state (one pass over the registry).
    fn derive_replicated_time(&self) -> Option<UnixMillis> {
        let clients = self.registry.iter().map(|c| c.last_seen()).max();
        self.counting.newest().max(clients)
    }

    /// Serializes the state (header + postcard). Deterministic: equal states give equal bytes.
    pub fn try_to_snapshot(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut out = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 1);
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_VERSION);
        postcard::to_extend(self, out)
    }

    /// Like [`State::try_to_snapshot`]. Serializing these types cannot fail (all sequences
    /// have known lengths); should it ever, the empty result fails to load instead of
    /// silently restoring a wrong state.
    pub fn to_snapshot(&self) -> Vec<u8> {
        self.try_to_snapshot().unwrap_or_default()
    }

    /// Streams the same bytes as [`State::to_snapshot`] into `out` without building them in
    /// memory first (a large registry would otherwise need a second copy of itself).
    pub fn write_snapshot<W: std::io::Write>(&self, mut out: W) -> Result<(), postcard::Error> {
        out.write_all(SNAPSHOT_MAGIC)
            .and_then(|()| out.write_all(&[SNAPSHOT_VERSION]))
            .map_err(|_| postcard::Error::SerializeBufferFull)?;
        postcard::to_io(self, out).map(|_| ())
    }

    /// Loads a snapshot written by [`State::to_snapshot`]. Never panics on corrupt input.
    pub fn from_snapshot(bytes: &[u8]) -> Result<State, SnapshotError> {
        let body = bytes
            .strip_prefix(SNAPSHOT_MAGIC.as_slice())
            .ok_or(SnapshotError::BadMagic)?;
        let (&version, body) = body.split_first().ok_or(SnapshotError::BadMagic)?;
        let (state, rest) = match version {
            SNAPSHOT_VERSION => postcard::take_from_bytes::<State>(body)?,
            3 => {
                let (v3, rest) = postcard::take_from_bytes::<StateV3>(body)?;
                let state = State {
                    identity: v3.identity,
                    policy: v3.policy,
                    counting: v3.counting,
                    registry: v3.registry,
                    statistics: v3.statistics,
                    security: v3.security,
                    config_version: 0,
                    replicated_time: ReplicatedTime::default(),
                    catalog: v3.catalog,
                };
                (state, rest)
            }
            2 => {
                let (v2, rest) = postcard::take_from_bytes::<StateV2>(body)?;
                let state = State {
                    identity: v2.identity,
                    policy: v2.policy,
                    counting: v2.counting,
                    registry: v2.registry,
                    statistics: v2.statistics,
                    security: ClusterSecurity::default(),
                    config_version: 0,
                    replicated_time: ReplicatedTime::default(),
                    catalog: CatalogState::default(),
                };
                (state, rest)
            }
            1 => {
                let (v1, rest) = postcard::take_from_bytes::<StateV1>(body)?;
                let state = State {
                    identity: v1.identity,
                    policy: v1.policy,
                    counting: v1.counting,
                    registry: Registry::try_from(v1.registry).map_err(SnapshotError::Invalid)?,
                    statistics: v1.statistics,
                    security: ClusterSecurity::default(),
                    config_version: 0,
                    replicated_time: ReplicatedTime::default(),
                    catalog: CatalogState::default(),
                };
                (state, rest)
            }
            other => return Err(SnapshotError::UnsupportedVersion(other)),
        };
        if !rest.is_empty() {
            return Err(SnapshotError::TrailingBytes(rest.len()));
        }
        let mut state = state;
        state.replicated_time = ReplicatedTime(state.derive_replicated_time());
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ProductKey, RegistryReprV1};

    #[test]
    fn format_2_snapshots_are_read_without_a_catalog() {
        let v2 = StateV2 {
            identity: None,
            policy: Policy {
                licensed_csvlks: vec![kms_catalog::well_known::CSVLK_WINDOWS_SERVER_2019],
                ..Policy::default()
            },
            counting: Counting::default(),
            registry: Registry::default(),
            statistics: Statistics::default(),
        };
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.push(2);
        bytes.extend(postcard::to_allocvec(&v2).unwrap());
        let mut state = State::from_snapshot(&bytes).unwrap();
        assert!(state.catalog().catalog().is_none());
        // The built-in catalog proposed after the restore migrates the legacy list.
        let r = state.apply(&Command::InitCatalog(crate::CatalogUpdate {
            catalog: kms_catalog::CatalogData::builtin(),
            epids: Default::default(),
        }));
        assert_eq!(r, CommandResult::Catalog(Ok(true)));
        assert!(state.policy().licensed_csvlks.is_empty());
        assert_eq!(
            state
                .catalog()
                .configured_host_keys()
                .get(&kms_catalog::well_known::WINDOWS),
            Some(&kms_catalog::well_known::CSVLK_WINDOWS_SERVER_2019)
        );
        let again = State::from_snapshot(&state.to_snapshot()).unwrap();
        assert!(again == state);
        assert_eq!(state.to_snapshot()[SNAPSHOT_MAGIC.len()], SNAPSHOT_VERSION);
    }

    #[test]
    fn format_1_snapshots_are_read() {
        let list = Uuid::from_u128(0x11);
        let cmid = Uuid::from_u128(0x22);
        let product = ProductKey {
            application_id: Uuid::from_u128(1),
            sku_id: Uuid::from_u128(2),
            kms_counted_id: Uuid::from_u128(3),
        };
        let v1 = StateV1 {
            identity: None,
            policy: Policy::default(),
            counting: Counting::default(),
            registry: RegistryReprV1::sample(list, cmid, product, 9),
            statistics: Statistics::default(),
        };
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.push(1);
        bytes.extend(postcard::to_allocvec(&v1).unwrap());
        let state = State::from_snapshot(&bytes).unwrap();
        let clients = state.client(&cmid);
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].request_count, 9);
        assert_eq!(&*clients[0].workstation, "pc1.example.com");
        // Written back in the current format, and equal after another round.
        let again = State::from_snapshot(&state.to_snapshot()).unwrap();
        assert!(again == state);
        assert_eq!(state.to_snapshot()[SNAPSHOT_MAGIC.len()], SNAPSHOT_VERSION);
        // Format 1 bytes cut short are an error, not a panic.
        for cut in [bytes.len() - 1, 6] {
            assert!(State::from_snapshot(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn format_3_snapshots_are_read_with_config_version_0() {
        let mut state = State::default();
        state.apply(&Command::SetPolicy(Policy {
            activation_interval: 60,
            ..Policy::default()
        }));
        let v3 = StateV3 {
            identity: None,
            policy: state.policy.clone(),
            counting: Counting::default(),
            registry: Registry::default(),
            statistics: Statistics::default(),
            security: ClusterSecurity::default(),
            catalog: CatalogState::default(),
        };
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.push(3);
        bytes.extend(postcard::to_allocvec(&v3).unwrap());
        let read = State::from_snapshot(&bytes).unwrap();
        assert_eq!(read.policy().activation_interval, 60);
        assert_eq!(read.config_version(), 0);
        let again = State::from_snapshot(&state.to_snapshot()).unwrap();
        assert_eq!(again.config_version(), 1);
    }

    #[test]
    fn config_changes_are_compare_and_set_and_all_or_nothing() {
        use crate::command::{IdentityPatch, PolicyPatch};
        let mut state = State::default();
        state.apply(&Command::InitIdentity(HostIdentity::generate(0, [7; 32])));
        assert_eq!(state.config_version(), 0);
        let change = |expected, interval| {
            Command::ChangeConfig(ConfigChange {
                expected_version: expected,
                policy: Some(PolicyPatch {
                    activation_interval: Some(interval),
                    ..PolicyPatch::default()
                }),
                identity: Some(IdentityPatch {
                    hwid: Some([interval as u8; 8]),
                    ..IdentityPatch::default()
                }),
                host_keys: None,
            })
        };
        let CommandResult::Config(Ok(applied)) = state.apply(&change(Some(0), 60)) else {
            panic!("first change refused");
        };
        assert_eq!(applied.version, 1);
        assert_eq!(applied.changed, ["policy", "identity"]);
        // The same expected version a second time: stale, nothing changes.
        let before = state.clone();
        assert_eq!(
            state.apply(&change(Some(0), 90)),
            CommandResult::Config(Err(ConfigError::Stale {
                expected: 0,
                current: 1
            }))
        );
        assert!(state == before && state.config_version() == 1);
        // An invalid policy leaves the identity part unapplied too.
        let CommandResult::Config(Err(ConfigError::Invalid { field, .. })) =
            state.apply(&change(None, 1))
        else {
            panic!("invalid policy accepted");
        };
        assert_eq!(field, "policy.activation_interval");
        assert!(state == before);
        // No expected version: applied on the current one.
        assert!(matches!(
            state.apply(&change(None, 120)),
            CommandResult::Config(Ok(ConfigApplied { version: 2, .. }))
        ));
        assert_eq!(state.identity().unwrap().hwid, [120; 8]);
        // The same change again changes nothing: same version.
        assert!(matches!(
            state.apply(&change(Some(2), 120)),
            CommandResult::Config(Ok(ConfigApplied { version: 2, ref changed })) if changed.is_empty()
        ));
        // The old commands bump the version too.
        state.apply(&Command::SetPolicy(Policy {
            activation_interval: 240,
            ..Policy::default()
        }));
        assert_eq!(state.config_version(), 3);
        let restored = State::from_snapshot(&state.to_snapshot()).unwrap();
        assert_eq!(restored.config_version(), 3);
    }

    #[test]
    fn format_2_snapshots_are_read_without_security_state() {
        let v2 = StateV2 {
            identity: None,
            policy: Policy::default(),
            counting: Counting::default(),
            registry: Registry::default(),
            statistics: Statistics::default(),
        };
        let mut bytes = SNAPSHOT_MAGIC.to_vec();
        bytes.push(2);
        bytes.extend(postcard::to_allocvec(&v2).unwrap());
        let state = State::from_snapshot(&bytes).unwrap();
        assert!(state.security().ca().is_none());
        assert_eq!(state, State::default());
    }
}
