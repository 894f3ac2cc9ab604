//! The catalog as replicated data: an owned, serializable copy that travels in the Raft log
//! (`SetCatalog`) and in snapshots, so every node decides with the same facts whatever its
//! build. The compiled-in tables are only its default ([`CatalogData::builtin`]).
//!
//! The same structure is the import/export format (`PUT /api/v1/catalog`, JSON).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest tables an imported catalog may have (the built-in one is far below).
const MAX_APPLICATIONS: usize = 64;
const MAX_KMS_ITEMS: usize = 4096;
const MAX_SKUS: usize = 65_536;
const MAX_HOST_KEYS: usize = 4096;
const MAX_TEXT: usize = 256;

/// An application (one CMID count per application).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationData {
    pub id: Uuid,
    pub name: String,
}

/// A KMS counted id (product group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsItemData {
    pub id: Uuid,
    pub name: String,
    pub application_id: Uuid,
    /// Clients needed before this product activates (25 Windows clients, 5 servers/Office).
    pub n_count_policy: u32,
    #[serde(default)]
    pub is_retail: bool,
    #[serde(default)]
    pub is_preview: bool,
    /// Where the facts come from.
    #[serde(default)]
    pub source: String,
}

/// An edition (activation id) of a KMS counted id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuData {
    pub id: Uuid,
    pub name: String,
    pub kms_item_id: Uuid,
    #[serde(default)]
    pub gvlk: Option<String>,
    /// A preview (Insider, pre-release) edition inside a volume group: strict mode refuses it.
    #[serde(default)]
    pub is_preview: bool,
    #[serde(default)]
    pub source: String,
}

/// A KMS host key group (CSVLK) and everything it activates, down-level included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostKeyData {
    /// Activation id of the host key (CSVLK).
    pub id: Uuid,
    pub name: String,
    pub application_id: Uuid,
    /// ePID group id; `None` when unknown (no ePID can be made then).
    #[serde(default)]
    pub group_id: Option<u32>,
    /// Key id range of the ePIDs (both 0 when unknown).
    #[serde(default)]
    pub min_key_id: u32,
    #[serde(default)]
    pub max_key_id: u32,
    /// Release date, Unix seconds (0 when unknown): lower bound of the ePID date.
    #[serde(default)]
    pub release_date: i64,
    /// Whether an organisation can install it (not lab, preview or Azure-only).
    #[serde(default)]
    pub installable: bool,
    /// Newest Windows build the key can be installed on (0: no limit known): the host build
    /// its ePID claims must not be newer.
    #[serde(default)]
    pub max_host_build: u32,
    /// KMS counted ids it activates.
    pub activates: Vec<Uuid>,
    #[serde(default)]
    pub source: String,
}

impl HostKeyData {
    /// Whether an ePID can be made for this key.
    pub fn can_make_epid(&self) -> bool {
        self.group_id.is_some() && self.max_key_id > 0 && self.min_key_id <= self.max_key_id
    }

    pub fn activates(&self, kms_id: &Uuid) -> bool {
        self.activates.binary_search(kms_id).is_ok()
    }
}

/// The whole replicated catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogData {
    /// Free-form version (e.g. `2026.12.04`), shown in status and metrics.
    pub version: String,
    /// Where this catalog comes from (`built-in`, a file name, a URL).
    pub source: String,
    pub applications: Vec<ApplicationData>,
    pub kms_items: Vec<KmsItemData>,
    pub skus: Vec<SkuData>,
    pub host_keys: Vec<HostKeyData>,
}

/// Why a catalog was refused; `field` names the offending place (e.g. `host_keys[3].activates`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct CatalogError {
    pub field: String,
    pub message: String,
}

fn fail<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, CatalogError> {
    Err(CatalogError {
        field: field.into(),
        message: message.into(),
    })
}

fn check_text(field: String, value: &str, max: usize) -> Result<(), CatalogError> {
    if value.trim().is_empty() {
        return fail(field, "must not be empty");
    }
    if value.chars().count() > max || value.chars().any(char::is_control) {
        return fail(field, format!("must be at most {max} printable characters"));
    }
    Ok(())
}

fn check_sorted<T>(
    table: &str,
    rows: &[T],
    max: usize,
    id: impl Fn(&T) -> Uuid,
) -> Result<(), CatalogError> {
    if rows.len() > max {
        return fail(table, format!("{} entries, at most {max}", rows.len()));
    }
    for (i, w) in rows.windows(2).enumerate() {
        let (a, b) = (id(&w[0]), id(&w[1]));
        if a == b {
            return fail(
                format!("{table}[{}].id", i + 1),
                format!("duplicate id {b}"),
            );
        }
        if a > b {
            return fail(
                format!("{table}[{}].id", i + 1),
                "tables must be sorted by id",
            );
        }
    }
    Ok(())
}

fn find<'a, T>(rows: &'a [T], id: &Uuid, key: impl Fn(&T) -> Uuid) -> Option<&'a T> {
    rows.binary_search_by(|r| key(r).cmp(id))
        .ok()
        .and_then(|i| rows.get(i))
}

impl CatalogData {
    /// The catalog compiled into this binary, as replicated data.
    pub fn builtin() -> Self {
        let cat = crate::catalog();
        let data = Self {
            version: crate::BUILTIN_VERSION.to_owned(),
            source: "built-in".to_owned(),
            applications: cat
                .applications()
                .iter()
                .map(|a| ApplicationData {
                    id: a.id,
                    name: a.name.to_owned(),
                })
                .collect(),
            kms_items: cat
                .kms_items()
                .iter()
                .map(|k| KmsItemData {
                    id: k.id,
                    name: k.name.to_owned(),
                    application_id: k.application_id,
                    n_count_policy: k.n_count_policy,
                    is_retail: k.is_retail,
                    is_preview: k.is_preview,
                    source: k.source.to_owned(),
                })
                .collect(),
            skus: cat
                .skus()
                .iter()
                .map(|s| SkuData {
                    id: s.id,
                    name: s.name.to_owned(),
                    kms_item_id: s.kms_item_id,
                    gvlk: s.gvlk.map(str::to_owned),
                    // The community file marks preview editions in their names only.
                    is_preview: s.name.contains("Preview"),
                    source: s.source.to_owned(),
                })
                .collect(),
            host_keys: cat
                .csvlks()
                .iter()
                .filter(|c| !c.application_id.is_nil())
                .map(|c| HostKeyData {
                    id: c.id,
                    name: c.name.to_owned(),
                    application_id: c.application_id,
                    group_id: c.group_id,
                    min_key_id: c.min_key_id,
                    max_key_id: c.max_key_id,
                    release_date: c.release_date,
                    installable: c.installable,
                    max_host_build: c.max_host_build,
                    activates: c.activates.to_vec(),
                    source: c.source.to_owned(),
                })
                .collect(),
        };
        data.normalized()
    }

    /// Sorts every table and every activation list by id (the form [`CatalogData::validate`]
    /// requires), so a hand-written file need not be sorted.
    pub fn normalized(mut self) -> Self {
        self.applications.sort_by_key(|a| a.id);
        self.kms_items.sort_by_key(|k| k.id);
        self.skus.sort_by_key(|s| s.id);
        self.host_keys.sort_by_key(|h| h.id);
        for h in &mut self.host_keys {
            h.activates.sort();
        }
        self
    }

    /// Checks the whole catalog: every reference resolves, every table is sorted and unique,
    /// texts and numbers are in range, and every application has a host key that can answer
    /// its clients. Deterministic; `apply` calls it too.
    pub fn validate(&self) -> Result<(), CatalogError> {
        check_text("version".into(), &self.version, 64)?;
        check_text("source".into(), &self.source, MAX_TEXT)?;
        check_sorted("applications", &self.applications, MAX_APPLICATIONS, |a| {
            a.id
        })?;
        check_sorted("kms_items", &self.kms_items, MAX_KMS_ITEMS, |k| k.id)?;
        check_sorted("skus", &self.skus, MAX_SKUS, |s| s.id)?;
        check_sorted("host_keys", &self.host_keys, MAX_HOST_KEYS, |h| h.id)?;
        if self.applications.is_empty() {
            return fail("applications", "at least one application is needed");
        }
        for (i, a) in self.applications.iter().enumerate() {
            check_text(format!("applications[{i}].name"), &a.name, MAX_TEXT)?;
        }
        for (i, k) in self.kms_items.iter().enumerate() {
            check_text(format!("kms_items[{i}].name"), &k.name, MAX_TEXT)?;
            if self.application(&k.application_id).is_none() {
                return fail(
                    format!("kms_items[{i}].application_id"),
                    format!("{} is not an application of this catalog", k.application_id),
                );
            }
            if !(1..=1000).contains(&k.n_count_policy) {
                return fail(
                    format!("kms_items[{i}].n_count_policy"),
                    format!("{} is outside 1..=1000", k.n_count_policy),
                );
            }
        }
        for (i, s) in self.skus.iter().enumerate() {
            check_text(format!("skus[{i}].name"), &s.name, MAX_TEXT)?;
            if self.kms_item(&s.kms_item_id).is_none() {
                return fail(
                    format!("skus[{i}].kms_item_id"),
                    format!("{} is not a KMS id of this catalog", s.kms_item_id),
                );
            }
            if let Some(g) = &s.gvlk {
                let groups: Vec<&str> = g.split('-').collect();
                if groups.len() != 5
                    || groups
                        .iter()
                        .any(|p| p.len() != 5 || !p.bytes().all(|b| b.is_ascii_alphanumeric()))
                {
                    return fail(
                        format!("skus[{i}].gvlk"),
                        format!("{g:?} is not a product key (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX)"),
                    );
                }
            }
        }
        for (i, h) in self.host_keys.iter().enumerate() {
            check_text(format!("host_keys[{i}].name"), &h.name, MAX_TEXT)?;
            if self.application(&h.application_id).is_none() {
                return fail(
                    format!("host_keys[{i}].application_id"),
                    format!("{} is not an application of this catalog", h.application_id),
                );
            }
            if h.group_id.is_some_and(|g| g > 99_999) {
                return fail(format!("host_keys[{i}].group_id"), "at most 5 digits");
            }
            if h.max_key_id > 999_999_999 || h.min_key_id > h.max_key_id {
                return fail(
                    format!("host_keys[{i}].max_key_id"),
                    "key range must satisfy min_key_id <= max_key_id <= 999999999",
                );
            }
            if h.activates.is_empty() {
                return fail(format!("host_keys[{i}].activates"), "activates nothing");
            }
            if h.activates.windows(2).any(|w| w[0] >= w[1]) {
                return fail(
                    format!("host_keys[{i}].activates"),
                    "must be sorted and without duplicates",
                );
            }
            for (j, k) in h.activates.iter().enumerate() {
                match self.kms_item(k) {
                    None => {
                        return fail(
                            format!("host_keys[{i}].activates[{j}]"),
                            format!("{k} is not a KMS id of this catalog"),
                        )
                    }
                    Some(item) if item.application_id != h.application_id => {
                        return fail(
                            format!("host_keys[{i}].activates[{j}]"),
                            format!("{k} belongs to another application than the key"),
                        )
                    }
                    Some(_) => {}
                }
            }
        }
        for a in &self.applications {
            if self.default_host_key(&a.id).is_none() {
                return fail(
                    "host_keys",
                    format!(
                        "application {} ({}) has no installable host key with group id and key range",
                        a.id, a.name
                    ),
                );
            }
        }
        Ok(())
    }

    pub fn application(&self, id: &Uuid) -> Option<&ApplicationData> {
        find(&self.applications, id, |a| a.id)
    }

    pub fn kms_item(&self, id: &Uuid) -> Option<&KmsItemData> {
        find(&self.kms_items, id, |k| k.id)
    }

    pub fn sku(&self, id: &Uuid) -> Option<&SkuData> {
        find(&self.skus, id, |s| s.id)
    }

    pub fn host_key(&self, id: &Uuid) -> Option<&HostKeyData> {
        find(&self.host_keys, id, |h| h.id)
    }

    /// The host key installed by default for an application: the newest installable key
    /// that can make an ePID (ties: lowest id).
    pub fn default_host_key(&self, application_id: &Uuid) -> Option<&HostKeyData> {
        self.host_keys
            .iter()
            .filter(|h| h.application_id == *application_id && h.installable && h.can_make_epid())
            .fold(None, |best: Option<&HostKeyData>, h| match best {
                Some(b) if b.release_date >= h.release_date => Some(b),
                _ => Some(h),
            })
    }

    /// Host keys of one application, newest first.
    pub fn host_keys_of(&self, application_id: &Uuid) -> Vec<&HostKeyData> {
        let mut keys: Vec<&HostKeyData> = self
            .host_keys
            .iter()
            .filter(|h| h.application_id == *application_id)
            .collect();
        keys.sort_by_key(|h| std::cmp::Reverse(h.release_date));
        keys
    }

    /// KMS ids that no host key of the catalog activates (informational).
    pub fn unactivated_kms_ids(&self) -> BTreeSet<Uuid> {
        self.kms_items
            .iter()
            .map(|k| k.id)
            .filter(|k| !self.host_keys.iter().any(|h| h.activates(k)))
            .collect()
    }
}
