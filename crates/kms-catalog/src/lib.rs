//! The KMS product catalog, converted at build time from `data/KmsDataBase.xml`
//! (public domain, from the py-kms project; credits in that file).
//!
//! Lookups by GUID are binary searches over sorted static tables; nothing is parsed at start-up.

use uuid::Uuid;

/// An application id (Windows, Office 2010, Office 2013+): one CMID list per application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Application {
    pub id: Uuid,
    pub name: &'static str,
    /// Minimum count a host reports for this application in vlmcsd's data (informational).
    pub min_active_clients: u32,
}

/// A KMS counted id (product group), the unit a CSVLK activates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsItem {
    pub id: Uuid,
    pub name: &'static str,
    pub application_id: Uuid,
    /// N-count policy: clients needed before this product activates (25 or 5).
    pub n_count_policy: u32,
    /// Default KMS protocol major version of clients of this group (4, 5 or 6).
    pub default_protocol: u16,
    pub is_retail: bool,
    pub is_preview: bool,
    /// Where the facts come from (a key of [`SOURCES`]).
    pub source: &'static str,
}

/// An edition (activation id) with its public volume-licence setup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sku {
    pub id: Uuid,
    pub name: &'static str,
    pub kms_item_id: Uuid,
    /// Generic volume license key (GVLK), if published.
    pub gvlk: Option<&'static str>,
    /// Where the facts come from (a key of [`SOURCES`]).
    pub source: &'static str,
}

/// A KMS host key group (CSVLK) and the KMS ids it activates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csvlk {
    pub id: Uuid,
    /// The application whose KMS ids this key activates (nil if it activates none).
    pub application_id: Uuid,
    /// Whether an organisation can install it on its own host (not lab, preview, Azure-only).
    pub installable: bool,
    /// Newest Windows build it can be installed on, per Microsoft's "CSVLK can be hosted on"
    /// (0: no limit known).
    pub max_host_build: u32,
    /// Source of the activation list (a key of [`SOURCES`]).
    pub source: &'static str,
    pub name: &'static str,
    /// ePID group id (e.g. 206); `None` when the catalog does not give one.
    pub group_id: Option<u32>,
    /// Key id range `[min_key_id, max_key_id]` used in ePIDs; both 0 when the catalog gives
    /// none (see [`Csvlk::key_range`]).
    pub min_key_id: u32,
    pub max_key_id: u32,
    /// Release date as Unix seconds (0 when unknown).
    pub release_date: i64,
    pub is_lab: bool,
    pub is_preview: bool,
    /// vlmcsd slot name (`Windows`, `Office2010`, `Office2013`, ...).
    pub ini_file_name: &'static str,
    /// KMS counted ids this CSVLK activates.
    pub activates: &'static [Uuid],
    /// Indexes into [`Catalog::win_builds`] of host builds this CSVLK may not run on.
    /// (The XML's `InvalidWinBuild` counts only `UseForEpid` builds; the build script
    /// translates those positions into indexes of the full table.)
    pub invalid_win_builds: &'static [usize],
}

/// A Windows build a KMS host may run, for plausible ePIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinBuild {
    pub build: u32,
    pub platform_id: u32,
    pub display_name: &'static str,
    pub use_for_epid: bool,
    pub may_be_server: bool,
    pub uses_ndr64: bool,
    /// Release date as Unix seconds.
    pub release_date: i64,
}

impl Csvlk {
    /// The key id range, `None` when the catalog gives none.
    pub fn key_range(&self) -> Option<(u32, u32)> {
        (self.max_key_id > 0 && self.min_key_id <= self.max_key_id)
            .then_some((self.min_key_id, self.max_key_id))
    }

    /// Whether an ePID can be made for this CSVLK (it has a group id and a key range).
    pub fn can_make_epid(&self) -> bool {
        self.group_id.is_some() && self.key_range().is_some()
    }

    /// Whether this CSVLK's Activate list contains `kms_id`.
    pub fn activates(&self, kms_id: &Uuid) -> bool {
        self.activates.contains(kms_id)
    }

    /// Whether this CSVLK may be installed on the host build at index `win_build_index` of
    /// [`Catalog::win_builds`].
    pub fn allows_win_build(&self, win_build_index: usize) -> bool {
        !self.invalid_win_builds.contains(&win_build_index)
    }

    /// Preference order of a host's default CSVLK: usable production keys first (not lab, not
    /// preview, with group id and key range), then the newest release date.
    fn preference(&self) -> (bool, i64) {
        (
            !self.is_lab && !self.is_preview && self.can_make_epid(),
            self.release_date,
        )
    }
}

/// Ids the protocol and the server logic name explicitly.
pub mod well_known {
    use uuid::{uuid, Uuid};

    /// Application id of Windows.
    pub const WINDOWS: Uuid = uuid!("55c92734-d682-4d71-983e-d6ec3f16059f");
    /// Application id of Office 2010 (Office 14).
    pub const OFFICE_2010: Uuid = uuid!("59a52881-a989-479d-af46-f275c6370663");
    /// Application id of Office 2013 and later (Office 15+).
    pub const OFFICE_2013: Uuid = uuid!("0ff1ce15-a989-479d-af46-f275c6370663");
    /// CSVLK "Windows Server 2019" (group 206), answering unknown Windows KMS ids.
    pub const CSVLK_WINDOWS_SERVER_2019: Uuid = uuid!("2e7a9ad1-a849-4b56-babe-17d5a29fe4b4");
    /// CSVLK "Office 2010 VL" (group 96).
    pub const CSVLK_OFFICE_2010: Uuid = uuid!("bfe7a195-4f8f-4f0b-a622-cf13c7d16864");
}

include!(concat!(env!("OUT_DIR"), "/catalog_data.rs"));

pub mod replicated;
pub use replicated::{CatalogData, CatalogError, HostKeyData};

/// The whole catalog.
#[derive(Debug)]
pub struct Catalog {
    _private: (),
}

static CATALOG: Catalog = Catalog { _private: () };

/// The catalog compiled into this binary.
pub fn catalog() -> &'static Catalog {
    &CATALOG
}

/// Lowercases and drops the separators people vary in product names.
fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_') && !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Every reading of a display name whose words offer alternatives with `/`
/// ("Windows 10/11 Enterprise" reads as "Windows 10 Enterprise" and "Windows 11 Enterprise").
fn name_variants(name: &str) -> Vec<String> {
    let mut variants = vec![String::new()];
    for word in name.split_whitespace() {
        let alternatives: Vec<&str> = if word.contains('/') && !word.split('/').any(str::is_empty) {
            word.split('/').collect()
        } else {
            vec![word]
        };
        // Display names have at most a couple of such words; cap the product anyway.
        if variants.len().saturating_mul(alternatives.len()) > 64 {
            return vec![name.to_owned()];
        }
        variants = variants
            .iter()
            .flat_map(|v| {
                alternatives.iter().map(move |a| {
                    if v.is_empty() {
                        (*a).to_owned()
                    } else {
                        format!("{v} {a}")
                    }
                })
            })
            .collect();
    }
    variants
}

fn find<T>(table: &'static [T], id: &Uuid, key: impl Fn(&T) -> Uuid) -> Option<&'static T> {
    table
        .binary_search_by(|x| key(x).cmp(id))
        .ok()
        .and_then(|i| table.get(i))
}

/// The most preferred CSVLK of `candidates`; ties keep the first (lowest id).
fn best<'a>(candidates: impl Iterator<Item = &'a Csvlk>) -> Option<&'a Csvlk> {
    candidates.fold(None, |best: Option<&Csvlk>, c| match best {
        Some(b) if b.preference() >= c.preference() => Some(b),
        _ => Some(c),
    })
}

impl Catalog {
    /// Applications, sorted by id.
    pub fn applications(&self) -> &'static [Application] {
        &APPLICATIONS
    }

    /// KMS counted ids, sorted by id.
    pub fn kms_items(&self) -> &'static [KmsItem] {
        &KMS_ITEMS
    }

    /// SKUs (activation ids), sorted by id.
    pub fn skus(&self) -> &'static [Sku] {
        &SKUS
    }

    /// CSVLKs, sorted by id (entries without id skipped, duplicate ids kept once).
    pub fn csvlks(&self) -> &'static [Csvlk] {
        &CSVLKS
    }

    /// Host builds, sorted by build number.
    pub fn win_builds(&self) -> &'static [WinBuild] {
        &WIN_BUILDS
    }

    pub fn application(&self, id: &Uuid) -> Option<&'static Application> {
        find(&APPLICATIONS, id, |a| a.id)
    }

    pub fn kms_item(&self, id: &Uuid) -> Option<&'static KmsItem> {
        find(&KMS_ITEMS, id, |k| k.id)
    }

    pub fn sku(&self, id: &Uuid) -> Option<&'static Sku> {
        find(&SKUS, id, |s| s.id)
    }

    pub fn csvlk(&self, id: &Uuid) -> Option<&'static Csvlk> {
        find(&CSVLKS, id, |c| c.id)
    }

    /// The host build with this build number.
    pub fn win_build(&self, build: u32) -> Option<&'static WinBuild> {
        WIN_BUILDS
            .binary_search_by_key(&build, |b| b.build)
            .ok()
            .and_then(|i| WIN_BUILDS.get(i))
    }

    /// SKUs of one KMS counted id, in table order.
    pub fn skus_of(&self, kms_id: &Uuid) -> Vec<&'static Sku> {
        SKUS.iter().filter(|s| s.kms_item_id == *kms_id).collect()
    }

    /// SKU whose name equals `name`, case-insensitively, ignoring spaces/dashes/underscores.
    ///
    /// A word of the display name listing alternatives with `/` matches any one of them
    /// ("Windows 10 Enterprise" finds "Windows 10/11 Enterprise"); a literal match of the
    /// whole display name wins over such a reading.
    pub fn sku_by_name(&self, name: &str) -> Option<&'static Sku> {
        let wanted = normalize(name);
        if wanted.is_empty() {
            return None;
        }
        SKUS.iter()
            .find(|s| normalize(s.name) == wanted)
            .or_else(|| {
                SKUS.iter()
                    .find(|s| name_variants(s.name).iter().any(|v| normalize(v) == wanted))
            })
    }

    /// SKUs whose names contain every whitespace-separated word of `query` (case-insensitive).
    pub fn search_skus(&self, query: &str) -> Vec<&'static Sku> {
        let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        SKUS.iter()
            .filter(|s| {
                let name = s.name.to_lowercase();
                words.iter().all(|w| name.contains(w.as_str()))
            })
            .collect()
    }

    /// All CSVLKs whose Activate list contains `kms_id`, in table order.
    pub fn csvlks_for(&self, kms_id: &Uuid) -> Vec<&'static Csvlk> {
        CSVLKS.iter().filter(|c| c.activates(kms_id)).collect()
    }

    /// The CSVLK a host uses by default for `kms_id`: among CSVLKs that activate it, prefer non-lab,
    /// non-preview ones with a group id and a key range, newest release date first; None if no CSVLK
    /// activates it.
    pub fn default_csvlk_for(&self, kms_id: &Uuid) -> Option<&'static Csvlk> {
        best(CSVLKS.iter().filter(|c| c.activates(kms_id)))
    }

    /// All CSVLKs that activate `kms_id`, most preferred first (the order
    /// [`Catalog::default_csvlk_for`] picks from; ties in table order).
    pub fn ranked_csvlks_for(&self, kms_id: &Uuid) -> Vec<&'static Csvlk> {
        let mut all = self.csvlks_for(kms_id);
        // Stable sort: equal preference keeps table (id) order, as `best` does.
        all.sort_by_key(|c| std::cmp::Reverse(c.preference()));
        all
    }

    /// The CSVLK used for KMS ids the catalog does not know, by application: Windows -> the
    /// Windows Server 2019 CSVLK (group 206, the most widely compatible), Office 2010 -> Office
    /// 2010 VL, Office 2013+ -> newest Office CSVLK; unknown application -> the Windows one.
    ///
    /// For a non-Windows application this is the preferred CSVLK (see
    /// [`Catalog::default_csvlk_for`]) among those activating any KMS id of that application;
    /// a CSVLK without release date counts as oldest.
    pub fn default_csvlk_for_application(&self, application_id: &Uuid) -> &'static Csvlk {
        if *application_id == well_known::WINDOWS {
            return WINDOWS_DEFAULT_CSVLK;
        }
        let app_items: Vec<Uuid> = KMS_ITEMS
            .iter()
            .filter(|k| k.application_id == *application_id)
            .map(|k| k.id)
            .collect();
        if app_items.is_empty() {
            return WINDOWS_DEFAULT_CSVLK;
        }
        best(
            CSVLKS
                .iter()
                .filter(|c| c.activates.iter().any(|k| app_items.contains(k))),
        )
        .unwrap_or(WINDOWS_DEFAULT_CSVLK)
    }
}
