//! What the endpoints compute from the backend and the applied state (no HTTP here).

use kms_catalog::catalog;
use kms_core::policy::ProductPolicy;
use kms_core::registry::{ClientRecord, ClientRef};
use kms_core::{Command, CommandResult, ConfigError, HostIdentity, Policy, State};
use uuid::Uuid;

use crate::backend::AdminBackend;
use crate::error::ApiError;
use crate::events::ids;
use crate::names::{self, ProductFilter};
use crate::views::*;

/// Largest page of clients or events.
pub const MAX_PAGE: usize = 1000;
pub const DEFAULT_PAGE: usize = 100;

fn policy_name(p: ProductPolicy) -> &'static str {
    match p {
        ProductPolicy::Open => "open",
        ProductPolicy::Strict => "strict",
    }
}

/// Counts of every catalog application plus any other list that has seen requests.
pub fn applications(state: &State, now: u64) -> Vec<ApplicationStatus> {
    let stats = state.statistics();
    let mut out: Vec<ApplicationStatus> = catalog()
        .applications()
        .iter()
        .map(|a| {
            let cache = state.counting().list(&a.id);
            let max_n_seen = cache.map_or(0, |c| c.max_n_seen());
            let current_count = state.current_count(&a.id, now);
            let threshold = names::threshold(&a.id, max_n_seen);
            ApplicationStatus {
                application_id: a.id,
                name: a.name.to_owned(),
                current_count,
                threshold,
                threshold_met: threshold > 0 && current_count >= threshold,
                capacity: cache.map_or(0, |c| c.capacity()),
                max_n_seen,
                requests: stats.by_application.get(&a.id).copied().unwrap_or(0),
            }
        })
        .collect();
    for count in state.counts(now) {
        if out.iter().any(|a| a.application_id == count.application_id) {
            continue;
        }
        let threshold = names::threshold(&count.application_id, count.max_n_seen);
        out.push(ApplicationStatus {
            application_id: count.application_id,
            name: names::application_name(&count.application_id),
            current_count: count.current_count,
            threshold,
            threshold_met: threshold > 0 && count.current_count >= threshold,
            capacity: count.capacity,
            max_n_seen: count.max_n_seen,
            requests: stats
                .by_application
                .get(&count.application_id)
                .copied()
                .unwrap_or(0),
        });
    }
    out
}

/// `GET /api/v1/status`.
pub async fn status(backend: &dyn AdminBackend) -> StatusResponse {
    let node = backend.node();
    let dns = backend.dns();
    let now = backend.now_ms();
    let metrics_listen = backend.metrics_listen();
    let state_lock = backend.state();
    let state = state_lock.read().await;
    let stats = state.statistics();
    let policy = state.policy();
    let identity = state.identity();
    let apps = applications(&state, now);
    let cats = state.catalog();
    let installed: Vec<Uuid> = cats
        .catalog()
        .map(|c| {
            c.applications
                .iter()
                .filter_map(|a| cats.installed(&a.id).map(|k| k.id))
                .collect()
        })
        .unwrap_or_default();
    let epids = identity
        .map(|i| {
            i.epids
                .iter()
                .map(|(csvlk_id, epid)| EpidStatus {
                    csvlk_id: *csvlk_id,
                    csvlk: cats
                        .catalog()
                        .and_then(|c| c.host_key(csvlk_id))
                        .map_or_else(|| csvlk_id.to_string(), |c| c.name.clone()),
                    epid: epid.clone(),
                    licensed: installed.contains(csvlk_id),
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = policy;
    let catalog = catalog_summary(&state);
    StatusResponse {
        node_id: node.node_id,
        role: node.role,
        leader_id: node.leader_id,
        term: node.term,
        version: node.version,
        cluster_id: identity.map(|i| i.cluster_id),
        quorum: node.quorum,
        last_applied: node.last_applied,
        queued_activations: node.queued_activations,
        listen: ListenStatus {
            kms: node.kms_listen.iter().map(ToString::to_string).collect(),
            admin: node.admin_listen.to_string(),
            raft: node.raft_listen.to_string(),
            metrics: metrics_listen.map(|a| a.to_string()),
        },
        dns,
        current_count: apps
            .iter()
            .map(|a| (a.name.clone(), a.current_count))
            .collect(),
        total_requests: stats.total_requests,
        failed_requests: stats.failed_requests,
        granted_requests: stats.granted_requests(),
        requests_by_license_status: (&stats.by_license_status).into(),
        refusals: stats
            .refusals
            .iter()
            .map(|(hr, n)| (format!("0x{hr:08X}"), *n))
            .collect(),
        applications: apps,
        activation_interval: policy.activation_interval,
        renewal_interval: policy.renewal_interval,
        product_policy: policy_name(policy.product_policy).to_owned(),
        hwid: identity.map(HostIdentity::hwid_hex),
        host_build: identity.map(|i| i.host_build),
        epids,
        catalog,
        registered_clients: state.client_count() as u64,
        time_ms: now,
    }
}

/// Parsed filters of `GET /api/v1/clients`.
#[derive(Debug, Clone, Default)]
pub struct ClientFilter {
    pub application: Option<Uuid>,
    pub product: Option<ProductFilter>,
    pub since: Option<u64>,
    /// Lower-case search text.
    pub search: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

fn client_matches(f: &ClientFilter, r: &ClientRef<'_>) -> bool {
    let product = r.product();
    f.application.is_none_or(|a| product.application_id == a)
        && f.product
            .is_none_or(|p| p.matches(&product.sku_id, &product.kms_counted_id))
        && f.since.is_none_or(|t| r.last_seen() >= t)
        && f.search.as_deref().is_none_or(|q| {
            r.workstation().to_lowercase().contains(q)
                || r.cmid().to_string().contains(q)
                || r.last_address()
                    .is_some_and(|a| a.ip().to_string().contains(q))
                || names::sku_name(&product.sku_id).to_lowercase().contains(q)
        })
}

pub fn client_view(r: &ClientRecord) -> ClientView {
    ClientView {
        cmid: r.cmid,
        workstation: r.workstation.to_string(),
        address: r.last_address.map(|a| a.to_string()),
        application_id: r.application_id,
        application: names::application_name(&r.application_id),
        sku_id: r.sku_id,
        product: names::sku_name(&r.sku_id),
        kms_id: r.kms_counted_id,
        product_group: names::kms_item_name(&r.kms_counted_id),
        license_status: names::license_status_name(r.license_status).to_owned(),
        license_status_code: r.license_status,
        protocol: format!("{}.{}", r.protocol.0, r.protocol.1),
        is_vm: r.is_vm,
        first_seen: names::format_time_ms(r.first_seen),
        last_seen: names::format_time_ms(r.last_seen),
        first_seen_ms: r.first_seen,
        last_seen_ms: r.last_seen,
        request_count: r.request_count,
        last_count: r.last_count,
        activated: r.last_result_activated,
    }
}

/// Registered clients matching `f`, newest first (ties by CMID), paged.
pub fn query_clients(state: &State, f: &ClientFilter) -> ClientsPage {
    let mut matching: Vec<ClientRef<'_>> = state
        .registry()
        .iter()
        .filter(|r| client_matches(f, r))
        .collect();
    let total = matching.len();
    matching.sort_unstable_by(|a, b| {
        b.last_seen()
            .cmp(&a.last_seen())
            .then_with(|| a.cmid().cmp(b.cmid()))
            .then_with(|| a.product().application_id.cmp(&b.product().application_id))
    });
    let clients = matching
        .into_iter()
        .skip(f.offset)
        .take(f.limit)
        .map(|r| client_view(&r.to_record()))
        .collect();
    ClientsPage {
        total,
        offset: f.offset,
        limit: f.limit,
        clients,
    }
}

pub const CSV_HEADER: &str = "cmid,workstation,address,application,product,product_group,sku_id,kms_id,license_status,protocol,is_vm,first_seen,last_seen,request_count,last_count,activated";

/// RFC 4180 field: quoted when it holds a comma, quote or line break. A leading `=`, `+`,
/// `-` or `@` is prefixed with `'` so a spreadsheet never runs a workstation name as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The page as CSV (header line first).
pub fn clients_csv(page: &ClientsPage) -> String {
    let mut out = String::with_capacity(64 + page.clients.len() * 200);
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    for c in &page.clients {
        let fields = [
            c.cmid.to_string(),
            csv_field(&c.workstation),
            csv_field(c.address.as_deref().unwrap_or("")),
            csv_field(&c.application),
            csv_field(&c.product),
            csv_field(&c.product_group),
            c.sku_id.to_string(),
            c.kms_id.to_string(),
            c.license_status.clone(),
            c.protocol.clone(),
            c.is_vm.to_string(),
            c.first_seen.clone(),
            c.last_seen.clone(),
            c.request_count.to_string(),
            c.last_count.to_string(),
            c.activated.to_string(),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

pub fn policy_view(p: &Policy) -> PolicyView {
    policy_view_with(p, Default::default())
}

fn installed_host_keys(state: &State) -> std::collections::BTreeMap<Uuid, Uuid> {
    let cats = state.catalog();
    cats.catalog()
        .map(|c| {
            c.applications
                .iter()
                .map(|a| (a.id, cats.installed(&a.id).map_or(Uuid::nil(), |k| k.id)))
                .collect()
        })
        .unwrap_or_default()
}

fn policy_view_with(p: &Policy, host_keys: std::collections::BTreeMap<Uuid, Uuid>) -> PolicyView {
    PolicyView {
        host_keys,
        activation_interval: p.activation_interval,
        renewal_interval: p.renewal_interval,
        product_policy: policy_name(p.product_policy).to_owned(),
        licensed_csvlks: p.licensed_csvlks.clone(),
        max_clock_skew_minutes: p.max_clock_skew_minutes,
        client_networks: p.client_networks.iter().map(ToString::to_string).collect(),
        registry_retention_days: p.registry_retention_days,
    }
}

pub fn config_view(state: &State) -> ConfigView {
    ConfigView {
        version: state.config_version(),
        policy: policy_view_with(state.policy(), installed_host_keys(state)),
        identity: state.identity().map(|i| IdentityView {
            cluster_id: i.cluster_id,
            hwid: i.hwid_hex(),
            host_build: i.host_build,
            lcid: i.lcid,
            epids: i.epids.clone(),
        }),
    }
}

/// The host keys after `patch` (`host_keys`, or the legacy `licensed_csvlks` mapped to the
/// newest listed key per application), checked against the replicated catalog; `None` when
/// the patch names neither or nothing changes.
fn patched_host_keys(
    state: &State,
    patch: &PolicyPatch,
    now: u64,
) -> Result<Option<kms_core::HostKeys>, ApiError> {
    if patch.host_keys.is_none() && patch.licensed_csvlks.is_none() {
        return Ok(None);
    }
    let cats = state.catalog();
    let Some(cat) = cats.catalog() else {
        return Err(ApiError::Conflict(
            "no product catalog replicated yet".into(),
        ));
    };
    let mut keys = cats.configured_host_keys().clone();
    if let Some(legacy) = &patch.licensed_csvlks {
        let mut chosen: std::collections::BTreeMap<Uuid, &kms_catalog::HostKeyData> =
            Default::default();
        for id in legacy {
            let key = cat.host_key(id).ok_or_else(|| {
                ApiError::invalid(
                    "policy.licensed_csvlks",
                    format!("{id} is not a host key of the catalog"),
                )
            })?;
            if chosen
                .get(&key.application_id)
                .is_none_or(|c| c.release_date < key.release_date)
            {
                chosen.insert(key.application_id, key);
            }
        }
        // Applications the list does not cover get no key (strict refuses them, as before).
        for a in &cat.applications {
            keys.insert(a.id, chosen.get(&a.id).map_or(Uuid::nil(), |k| k.id));
        }
    }
    if let Some(named) = &patch.host_keys {
        keys.clear();
        for (app_name, id) in named {
            let field = format!("policy.host_keys.{app_name}");
            let app =
                names::parse_application(app_name).map_err(|e| ApiError::invalid(&field, e))?;
            if id.is_nil() {
                keys.insert(app, *id); // no host key installed for this application
                continue;
            }
            let key = cat.host_key(id).ok_or_else(|| {
                ApiError::invalid(&field, format!("{id} is not a host key of the catalog"))
            })?;
            if key.application_id != app {
                return Err(ApiError::invalid(
                    &field,
                    format!("{id} ({}) is a host key of another application", key.name),
                ));
            }
            keys.insert(app, *id);
        }
    }
    if &keys == cats.configured_host_keys() {
        return Ok(None);
    }
    Ok(Some(match state.identity() {
        Some(identity) => {
            kms_core::catalog::host_keys_update(identity, cat, keys, now, rand::random())
        }
        None => kms_core::HostKeys {
            keys,
            ..Default::default()
        },
    }))
}

/// The policy after `patch`, validated (errors name `policy.<field>`).
pub fn patched_policy(current: &Policy, patch: &PolicyPatch) -> Result<Policy, ApiError> {
    let mut p = current.clone();
    if let Some(v) = patch.activation_interval {
        p.activation_interval = v;
    }
    if let Some(v) = patch.renewal_interval {
        p.renewal_interval = v;
    }
    if let Some(v) = patch.product_policy {
        p.product_policy = v;
    }
    // `licensed_csvlks` is turned into host keys (`patched_host_keys`), never stored.
    if let Some(v) = patch.max_clock_skew_minutes {
        p.max_clock_skew_minutes = v;
    }
    if let Some(v) = &patch.client_networks {
        p.client_networks = v.clone();
    }
    if let Some(v) = patch.registry_retention_days {
        p.registry_retention_days = v;
    }
    p.validate()
        .map_err(|e| ApiError::invalid(format!("policy.{}", e.field), e.message))?;
    Ok(p)
}

/// The identity after `patch`, validated (errors name `identity.hwid` or
/// `identity.epids.<csvlk id>`).
pub fn patched_identity(
    current: &HostIdentity,
    patch: &IdentityPatch,
) -> Result<HostIdentity, ApiError> {
    let mut identity = current.clone();
    if let Some(hwid) = &patch.hwid {
        identity.hwid = kms_core::identity::parse_hwid(hwid)
            .map_err(|e| ApiError::invalid("identity.hwid", e))?;
    }
    if let Some(epids) = &patch.epids {
        for (csvlk, epid) in epids {
            let field = format!("identity.epids.{csvlk}");
            if catalog().csvlk(csvlk).is_none() {
                return Err(ApiError::invalid(field, "not a CSVLK in the catalog"));
            }
            kms_core::identity::validate_epid(epid).map_err(|e| ApiError::invalid(field, e))?;
            identity.epids.insert(*csvlk, epid.clone());
        }
    }
    Ok(identity)
}

/// `PUT /api/v1/config`: validates everything first (against this node's state, for clear
/// field errors), then proposes the patch as ONE command applied in the state machine on the
/// expected configuration version (compare-and-set): a stale version is 409 Conflict and
/// nothing of the change is applied.
pub async fn update_config(
    backend: &dyn AdminBackend,
    update: &ConfigUpdate,
) -> Result<ConfigView, ApiError> {
    let change = {
        let state_lock = backend.state();
        let state = state_lock.read().await;
        let host_keys = match &update.policy {
            Some(patch) => patched_host_keys(&state, patch, backend.now_ms())?,
            None => None,
        };
        let policy = match &update.policy {
            Some(patch) => {
                patched_policy(state.policy(), patch)?;
                Some(core_policy_patch(patch))
            }
            None => None,
        };
        let identity = match &update.identity {
            Some(patch) => {
                let current = state.identity().ok_or_else(|| {
                    ApiError::Conflict("the host identity is not initialised yet".into())
                })?;
                let patched = patched_identity(current, patch)?;
                Some(kms_core::IdentityPatch {
                    hwid: patch.hwid.is_some().then_some(patched.hwid),
                    epids: patch.epids.clone().unwrap_or_default(),
                })
            }
            None => None,
        };
        kms_core::ConfigChange {
            expected_version: update.expected_version,
            policy,
            identity,
            host_keys,
        }
    };
    let applied = match backend.propose(Command::ChangeConfig(change)).await? {
        CommandResult::Config(Ok(applied)) => applied,
        CommandResult::Config(Err(ConfigError::Invalid { field, message })) => {
            return Err(ApiError::invalid(field, message))
        }
        CommandResult::Config(Err(e)) => return Err(ApiError::Conflict(e.to_string())),
        other => {
            return Err(ApiError::Internal(format!(
                "unexpected result of a configuration change: {other:?}"
            )))
        }
    };
    if !applied.changed.is_empty() {
        backend.events().push(
            backend.now_ms(),
            ids::CONFIG,
            "info",
            format!(
                "replicated configuration changed (version {}): {}",
                applied.version,
                applied.changed.join(", ")
            ),
            serde_json::json!({ "changed": applied.changed, "version": applied.version }),
        );
    }
    let state_lock = backend.state();
    let state = state_lock.read().await;
    let mut view = config_view(&state);
    // Applied here by now (the leader answers after applying); a later change may be too.
    view.version = view.version.max(applied.version);
    Ok(view)
}

fn core_policy_patch(patch: &PolicyPatch) -> kms_core::PolicyPatch {
    kms_core::PolicyPatch {
        activation_interval: patch.activation_interval,
        renewal_interval: patch.renewal_interval,
        product_policy: patch.product_policy,
        // `licensed_csvlks` is turned into host keys (`patched_host_keys`), never stored.
        licensed_csvlks: None,
        max_clock_skew_minutes: patch.max_clock_skew_minutes,
        client_networks: patch.client_networks.clone(),
        registry_retention_days: patch.registry_retention_days,
    }
}

/// `GET /api/v1/products`: every KMS id of the replicated catalog, whether it activates under
/// the current policy and which installed host key (and so which ePID) answers it.
pub fn products(state: &State, search: Option<&str>, activated: Option<bool>) -> ProductsResponse {
    let policy = state.policy();
    let identity = state.identity();
    let cats = state.catalog();
    let Some(cat) = cats.catalog() else {
        return ProductsResponse {
            product_policy: policy_name(policy.product_policy).to_owned(),
            products: Vec::new(),
            csvlks: Vec::new(),
        };
    };
    let words: Vec<String> = search
        .map(|s| s.split_whitespace().map(str::to_lowercase).collect())
        .unwrap_or_default();
    let installed: Vec<Uuid> = cat
        .applications
        .iter()
        .filter_map(|a| cats.installed(&a.id).map(|k| k.id))
        .collect();
    let products = cat
        .kms_items
        .iter()
        .filter_map(|item| {
            let skus: Vec<SkuView> = cat
                .skus
                .iter()
                .filter(|s| s.kms_item_id == item.id)
                .map(|s| SkuView {
                    sku_id: s.id,
                    name: s.name.clone(),
                    gvlk: s.gvlk.clone(),
                })
                .collect();
            if !words.is_empty() {
                let text = std::iter::once(item.name.to_lowercase())
                    .chain(skus.iter().map(|s| s.name.to_lowercase()))
                    .collect::<Vec<_>>()
                    .join("\n");
                if !words.iter().all(|w| text.contains(w.as_str())) {
                    return None;
                }
            }
            let key = cats.host_key_for(&item.application_id);
            let covered = cats
                .installed(&item.application_id)
                .is_some_and(|k| k.activates(&item.id));
            let allowed = match policy.product_policy {
                ProductPolicy::Open => true,
                ProductPolicy::Strict => covered && !item.is_retail && !item.is_preview,
            };
            let answering = key
                .filter(|k| identity.is_some_and(|i| i.epids.contains_key(&k.id)))
                .map(|k| k.id);
            let is_activated = allowed && answering.is_some();
            if activated.is_some_and(|want| want != is_activated) {
                return None;
            }
            Some(ProductView {
                kms_id: item.id,
                name: item.name.clone(),
                application_id: item.application_id,
                application: cat.application(&item.application_id).map_or_else(
                    || names::application_name(&item.application_id),
                    |a| a.name.clone(),
                ),
                n_count_policy: item.n_count_policy,
                is_retail: item.is_retail,
                is_preview: item.is_preview,
                activated: is_activated,
                csvlk_id: answering,
                csvlk: answering
                    .and_then(|id| cat.host_key(&id))
                    .map(|c| c.name.clone()),
                skus,
            })
        })
        .collect();
    let csvlks = cat
        .host_keys
        .iter()
        .map(|c| CsvlkView {
            csvlk_id: c.id,
            name: c.name.clone(),
            group_id: c.group_id,
            licensed: installed.contains(&c.id),
            is_lab: !c.installable,
            is_preview: false,
            activates: c.activates.len(),
        })
        .collect();
    ProductsResponse {
        product_policy: policy_name(policy.product_policy).to_owned(),
        products,
        csvlks,
    }
}

/// The replicated catalog in short, with the host key (and ePID) per application.
pub fn catalog_summary(state: &State) -> Option<CatalogSummary> {
    let cats = state.catalog();
    let cat = cats.catalog()?;
    let installed = cat
        .applications
        .iter()
        .filter_map(|a| {
            let key = cats.installed(&a.id)?;
            Some(InstalledHostKey {
                application_id: a.id,
                application: a.name.clone(),
                host_key_id: key.id,
                host_key: key.name.clone(),
                configured: cats.configured_host_keys().contains_key(&a.id),
                epid: state.identity().and_then(|i| i.epids.get(&key.id).cloned()),
            })
        })
        .collect();
    Some(CatalogSummary {
        version: cat.version.clone(),
        source: cat.source.clone(),
        kms_items: cat.kms_items.len(),
        skus: cat.skus.len(),
        host_keys: cat.host_keys.len(),
        installed,
    })
}

/// `PUT /api/v1/catalog`: validates a whole catalog and replicates it (`SetCatalog`), with
/// ePIDs for its host keys the identity lacks. A bad catalog changes nothing.
pub async fn import_catalog(
    backend: &dyn AdminBackend,
    catalog: kms_catalog::CatalogData,
) -> Result<CatalogSummary, ApiError> {
    let catalog = catalog.normalized();
    catalog
        .validate()
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    let update = {
        let state_lock = backend.state();
        let state = state_lock.read().await;
        let Some(identity) = state.identity() else {
            return Err(ApiError::Conflict(
                "the host identity does not exist yet".into(),
            ));
        };
        let keys: Vec<&kms_catalog::HostKeyData> = catalog.host_keys.iter().collect();
        let epids = kms_core::catalog::missing_epids(
            identity,
            &keys,
            identity.host_build,
            backend.now_ms(),
            rand::random(),
        );
        kms_core::CatalogUpdate {
            catalog: catalog.clone(),
            epids,
        }
    };
    match backend.propose(Command::SetCatalog(update)).await? {
        CommandResult::Catalog(Ok(_)) => {}
        CommandResult::Catalog(Err(e)) => return Err(ApiError::invalid("catalog", e)),
        other => {
            return Err(ApiError::invalid(
                "catalog",
                format!("unexpected result {other:?}"),
            ))
        }
    }
    backend.events().push(
        backend.now_ms(),
        ids::CONFIG,
        "info",
        format!(
            "product catalog {} from {} replicated",
            catalog.version, catalog.source
        ),
        serde_json::json!({ "version": catalog.version, "source": catalog.source }),
    );
    // This node may apply the entry a moment later (a follower): answer from the catalog
    // that was committed and the host keys it resolves to.
    let state_lock = backend.state();
    let state = state_lock.read().await;
    let configured = state.catalog().configured_host_keys().clone();
    let installed = catalog
        .applications
        .iter()
        .filter_map(|a| {
            let key = match configured.get(&a.id) {
                Some(id) if id.is_nil() => None,
                Some(id) => catalog
                    .host_key(id)
                    .or_else(|| catalog.default_host_key(&a.id)),
                None => catalog.default_host_key(&a.id),
            }?;
            Some(InstalledHostKey {
                application_id: a.id,
                application: a.name.clone(),
                host_key_id: key.id,
                host_key: key.name.clone(),
                configured: configured.get(&a.id) == Some(&key.id),
                epid: state.identity().and_then(|i| i.epids.get(&key.id).cloned()),
            })
        })
        .collect();
    Ok(CatalogSummary {
        version: catalog.version.clone(),
        source: catalog.source.clone(),
        kms_items: catalog.kms_items.len(),
        skus: catalog.skus.len(),
        host_keys: catalog.host_keys.len(),
        installed,
    })
}

/// Unix ms of the latest granted activation in the registry (for the idle alert).
pub fn last_activation_ms(state: &State) -> Option<u64> {
    state.registry().iter().map(|r| r.last_seen()).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
    }

    #[test]
    fn policy_patch_validates_and_names_fields() {
        let current = Policy::default();
        let patch = PolicyPatch {
            activation_interval: Some(5),
            ..Default::default()
        };
        match patched_policy(&current, &patch) {
            Err(ApiError::Invalid { field, .. }) => assert_eq!(field, "policy.activation_interval"),
            other => panic!("{other:?}"),
        }
        let patch = PolicyPatch {
            renewal_interval: Some(60),
            max_clock_skew_minutes: Some(Some(240)),
            ..Default::default()
        };
        let p = patched_policy(&current, &patch).unwrap();
        assert_eq!(p.renewal_interval, 60);
        assert_eq!(p.max_clock_skew_minutes, Some(240));
        assert_eq!(p.activation_interval, current.activation_interval);
        let off = PolicyPatch {
            max_clock_skew_minutes: Some(None),
            ..Default::default()
        };
        assert_eq!(
            patched_policy(&p, &off).unwrap().max_clock_skew_minutes,
            None
        );
    }

    #[test]
    fn identity_patch_validates_hwid_and_epids() {
        let current = HostIdentity::generate(1_700_000_000_000, [7; 32]);
        let bad_hwid = IdentityPatch {
            hwid: Some("xyz".into()),
            epids: None,
        };
        match patched_identity(&current, &bad_hwid) {
            Err(ApiError::Invalid { field, .. }) => assert_eq!(field, "identity.hwid"),
            other => panic!("{other:?}"),
        }
        let csvlk = kms_catalog::well_known::CSVLK_WINDOWS_SERVER_2019;
        let bad_epid = IdentityPatch {
            hwid: None,
            epids: Some([(csvlk, "not-an-epid".to_owned())].into()),
        };
        match patched_identity(&current, &bad_epid) {
            Err(ApiError::Invalid { field, .. }) => {
                assert_eq!(field, format!("identity.epids.{csvlk}"))
            }
            other => panic!("{other:?}"),
        }
        let epid = "03612-00206-566-381813-03-1033-17763.0000-2552023".to_owned();
        let good = IdentityPatch {
            hwid: Some("0123456789ABCDEF".into()),
            epids: Some([(csvlk, epid.clone())].into()),
        };
        let next = patched_identity(&current, &good).unwrap();
        assert_eq!(next.hwid, [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]);
        assert_eq!(next.epids.get(&csvlk), Some(&epid));
        assert_eq!(next.epids.len(), current.epids.len());
        assert_eq!(next.cluster_id, current.cluster_id);
    }
}
