//! The replicated product catalog and the installed host keys (one per application).
//!
//! `apply` decides with this catalog only, never with the one compiled into the binary: the
//! compiled-in catalog is proposed once (`Command::InitCatalog`) when a cluster has none, and
//! `Command::SetCatalog` replaces it at run time. Nodes of different builds therefore decide
//! alike.

use std::collections::BTreeMap;
use std::sync::Arc;

use kms_catalog::{CatalogData, HostKeyData};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::{validate_epid, HostIdentity};
use crate::Policy;

/// A catalog to install, with ePIDs for host keys the identity has none for (or an
/// inconsistent one: another group id or a key id out of range). The proposer makes those
/// ePIDs (random values stay out of `apply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogUpdate {
    pub catalog: CatalogData,
    pub epids: BTreeMap<Uuid, String>,
}

/// Host keys the operator installed, by application id; an application not named uses the
/// catalog's default (the newest installable key); the nil id means "no host key installed
/// for this application" (strict mode then refuses all its clients, as a genuine host with
/// only an Office key would refuse Windows).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeys {
    pub keys: BTreeMap<Uuid, Uuid>,
    /// ePIDs for chosen keys the identity lacks (made by the proposer).
    pub epids: BTreeMap<Uuid, String>,
    /// A new host build for the identity when the chosen keys cannot be installed on the
    /// current one (e.g. a Windows Server 2019 key is not hosted on Server 2025); the ePIDs
    /// in `epids` claim it.
    pub host_build: Option<u32>,
}

/// The catalog part of the replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CatalogStateRepr", into = "CatalogStateRepr")]
pub struct CatalogState {
    catalog: Option<Arc<CatalogData>>,
    host_keys: BTreeMap<Uuid, Uuid>,
}

/// Serialized form of [`CatalogState`] (the catalog is shared in memory, owned on disk).
#[derive(Clone, Serialize, Deserialize)]
struct CatalogStateRepr {
    catalog: Option<CatalogData>,
    host_keys: BTreeMap<Uuid, Uuid>,
}

impl From<CatalogStateRepr> for CatalogState {
    fn from(r: CatalogStateRepr) -> Self {
        Self {
            catalog: r.catalog.map(Arc::new),
            host_keys: r.host_keys,
        }
    }
}

impl From<CatalogState> for CatalogStateRepr {
    fn from(s: CatalogState) -> Self {
        Self {
            catalog: s.catalog.map(|c| (*c).clone()),
            host_keys: s.host_keys,
        }
    }
}

impl CatalogState {
    /// The replicated catalog, `None` until the first `InitCatalog` is applied.
    pub fn catalog(&self) -> Option<&CatalogData> {
        self.catalog.as_deref()
    }

    /// The shared catalog (cheap to clone for readers).
    pub fn shared(&self) -> Option<Arc<CatalogData>> {
        self.catalog.clone()
    }

    /// Host keys explicitly chosen by the operator.
    pub fn configured_host_keys(&self) -> &BTreeMap<Uuid, Uuid> {
        &self.host_keys
    }

    /// The host key installed for `application_id`: the configured one, else the catalog's
    /// default; `None` when the operator installed none for it (nil id).
    pub fn installed(&self, application_id: &Uuid) -> Option<&HostKeyData> {
        let catalog = self.catalog()?;
        match self.host_keys.get(application_id) {
            Some(id) if id.is_nil() => None,
            Some(id) => catalog
                .host_key(id)
                .or_else(|| catalog.default_host_key(application_id)),
            None => catalog.default_host_key(application_id),
        }
    }

    /// The key whose ePID answers clients of `application_id`: the installed one, else (open
    /// mode with no key installed for it) the catalog's default.
    pub fn host_key_for(&self, application_id: &Uuid) -> Option<&HostKeyData> {
        self.installed(application_id)
            .or_else(|| self.catalog()?.default_host_key(application_id))
    }

    /// Applies `InitCatalog` (only when no catalog exists) or `SetCatalog`.
    pub(crate) fn install(
        &mut self,
        update: &CatalogUpdate,
        only_if_none: bool,
        identity: Option<&mut HostIdentity>,
        policy: &mut Policy,
    ) -> Result<bool, String> {
        if only_if_none && self.catalog.is_some() {
            return Ok(false);
        }
        update.catalog.validate().map_err(|e| e.to_string())?;
        for (id, epid) in &update.epids {
            if update.catalog.host_key(id).is_none() {
                return Err(format!("epids.{id}: not a host key of the catalog"));
            }
            validate_epid(epid).map_err(|e| format!("epids.{id}: {e}"))?;
        }
        // Configured keys must still exist for their application; keys that vanished fall
        // back to the default (the catalog is validated to have one per application).
        let host_keys: BTreeMap<Uuid, Uuid> = self
            .host_keys
            .iter()
            .filter(|(app, key)| {
                key.is_nil()
                    || update
                        .catalog
                        .host_key(key)
                        .is_some_and(|k| k.application_id == **app)
            })
            .map(|(a, k)| (*a, *k))
            .collect();
        if let Some(identity) = identity {
            for (id, epid) in &update.epids {
                identity.epids.insert(*id, epid.clone());
            }
        }
        self.catalog = Some(Arc::new(update.catalog.clone()));
        self.host_keys = host_keys;
        self.migrate_licensed_csvlks(policy);
        Ok(true)
    }

    /// Applies `SetHostKeys`: every named key must be a host key of its application.
    pub(crate) fn set_host_keys(
        &mut self,
        update: &HostKeys,
        identity: Option<&mut HostIdentity>,
    ) -> Result<(), String> {
        let Some(catalog) = self.catalog() else {
            return Err("no product catalog yet".into());
        };
        for (app, key) in &update.keys {
            if catalog.application(app).is_none() {
                return Err(format!(
                    "host_keys.{app}: not an application of the catalog"
                ));
            }
            if key.is_nil() {
                continue; // no key installed for this application
            }
            match catalog.host_key(key) {
                None => {
                    return Err(format!(
                        "host_keys.{app}: {key} is not a host key of the catalog"
                    ))
                }
                Some(k) if k.application_id != *app => {
                    return Err(format!(
                        "host_keys.{app}: {key} ({}) is a host key of another application",
                        k.name
                    ))
                }
                Some(_) => {}
            }
        }
        for (id, epid) in &update.epids {
            if catalog.host_key(id).is_none() {
                return Err(format!("epids.{id}: not a host key of the catalog"));
            }
            validate_epid(epid).map_err(|e| format!("epids.{id}: {e}"))?;
        }
        if let Some(identity) = identity {
            for (id, epid) in &update.epids {
                identity.epids.insert(*id, epid.clone());
            }
            if let Some(build) = update.host_build {
                identity.host_build = build;
            }
        }
        self.host_keys = update.keys.clone();
        Ok(())
    }

    /// Turns the legacy `licensed_csvlks` policy (one list of CSVLKs) into one host key per
    /// application: the newest licensed key of each application, and no key (nil) for the
    /// applications the list did not cover, so strict mode keeps refusing them as before.
    /// Clears the legacy list.
    pub(crate) fn migrate_licensed_csvlks(&mut self, policy: &mut Policy) {
        let Some(catalog) = self.catalog.clone() else {
            return;
        };
        if policy.licensed_csvlks.is_empty() {
            return;
        }
        let mut chosen: BTreeMap<Uuid, &HostKeyData> = BTreeMap::new();
        for id in &policy.licensed_csvlks {
            let Some(key) = catalog.host_key(id) else {
                continue;
            };
            match chosen.get(&key.application_id) {
                Some(c) if c.release_date >= key.release_date => {}
                _ => {
                    chosen.insert(key.application_id, key);
                }
            }
        }
        for app in &catalog.applications {
            let key = chosen.get(&app.id).map_or(Uuid::nil(), |k| k.id);
            self.host_keys.insert(app.id, key);
        }
        policy.licensed_csvlks.clear();
    }
}

/// ePIDs a proposer must add so that every key of `keys` that can make one has a consistent
/// ePID in `identity` (present, of the key's group, key id in its range, on `host_build`).
pub fn missing_epids(
    identity: &HostIdentity,
    keys: &[&HostKeyData],
    host_build: u32,
    now: crate::UnixMillis,
    seed: [u8; 32],
) -> BTreeMap<Uuid, String> {
    keys.iter()
        .filter(|k| k.can_make_epid())
        .filter(|k| {
            !identity.epids.get(&k.id).is_some_and(|e| {
                crate::identity::epid_matches(e, k)
                    && crate::identity::epid_build(e) == Some(host_build)
            })
        })
        .filter_map(|k| {
            identity
                .make_epid_on(k, host_build, now, seed)
                .map(|e| (k.id, e))
        })
        .collect()
}

/// The `SetHostKeys` a proposer sends for `keys` (application -> key, nil = none): the host
/// build every installed key may run on and fresh ePIDs on it where needed.
pub fn host_keys_update(
    identity: &HostIdentity,
    catalog: &CatalogData,
    keys: BTreeMap<Uuid, Uuid>,
    now: crate::UnixMillis,
    seed: [u8; 32],
) -> HostKeys {
    let installed: Vec<&HostKeyData> = catalog
        .applications
        .iter()
        .filter_map(|a| match keys.get(&a.id) {
            Some(id) if id.is_nil() => None,
            Some(id) => catalog.host_key(id),
            None => catalog.default_host_key(&a.id),
        })
        .collect();
    let build = crate::identity::host_build_for(&installed, identity.host_build);
    let epids = missing_epids(identity, &installed, build, now, seed);
    HostKeys {
        keys,
        epids,
        host_build: (build != identity.host_build).then_some(build),
    }
}
