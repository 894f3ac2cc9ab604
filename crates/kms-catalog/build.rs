//! Converts `data/KmsDataBase.xml` into static Rust tables (`$OUT_DIR/catalog_data.rs`).
//!
//! Parsing happens here, once per build, so the server never parses XML at start-up. Any
//! structural problem in the XML (malformed document, bad GUID, bad number, inconsistent key
//! range, unknown host-build index) fails the build with a message naming the line.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};
use uuid::Uuid;

const XML_PATH: &str = "data/KmsDataBase.xml";
const OVERLAY_PATH: &str = "data/microsoft.toml";

/// CSVLK used for unknown Windows KMS ids: Windows Server 2019 (group 206), the most widely
/// compatible host key. Must exist in the XML.
const WINDOWS_DEFAULT_CSVLK: &str = "2e7a9ad1-a849-4b56-babe-17d5a29fe4b4";

/// A build error with the XML line it refers to.
#[derive(Debug)]
struct BuildError(String);

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type Result<T> = std::result::Result<T, BuildError>;

fn main() {
    println!("cargo:rerun-if-changed={XML_PATH}");
    println!("cargo:rerun-if-changed={OVERLAY_PATH}");
    println!("cargo:rerun-if-changed=build.rs");
    if let Err(e) = run() {
        eprintln!("error: {XML_PATH}: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .ok_or_else(|| BuildError("CARGO_MANIFEST_DIR not set".into()))?;
    let out_dir =
        std::env::var_os("OUT_DIR").ok_or_else(|| BuildError("OUT_DIR not set".into()))?;
    let xml_path = Path::new(&manifest_dir).join(XML_PATH);
    let text = std::fs::read_to_string(&xml_path)
        .map_err(|e| BuildError(format!("cannot read {}: {e}", xml_path.display())))?;
    let mut data = parse(&text)?;
    let overlay_path = Path::new(&manifest_dir).join(OVERLAY_PATH);
    let overlay_text = std::fs::read_to_string(&overlay_path)
        .map_err(|e| BuildError(format!("cannot read {}: {e}", overlay_path.display())))?;
    let overlay: Overlay =
        toml::from_str(&overlay_text).map_err(|e| BuildError(format!("{OVERLAY_PATH}: {e}")))?;
    apply_overlay(&mut data, &overlay)
        .map_err(|e| BuildError(format!("{OVERLAY_PATH}: {}", e.0)))?;
    let mut code = generate(&data)?;
    let _ = writeln!(code, "/// Version of the built-in catalog.");
    let _ = writeln!(
        code,
        "pub const BUILTIN_VERSION: &str = {:?};",
        overlay.version
    );
    let _ = writeln!(
        code,
        "/// Sources the catalog's facts cite (key, description)."
    );
    let _ = writeln!(code, "pub static SOURCES: &[(&str, &str)] = &[");
    for (k, v) in &overlay.sources {
        let _ = writeln!(code, "    ({k:?}, {v:?}),");
    }
    let _ = writeln!(code, "];");
    let out = PathBuf::from(out_dir).join("catalog_data.rs");
    std::fs::write(&out, code)
        .map_err(|e| BuildError(format!("cannot write {}: {e}", out.display())))?;
    Ok(())
}

struct App {
    id: Uuid,
    name: String,
    min_active_clients: u32,
}

struct Item {
    id: Uuid,
    name: String,
    application_id: Uuid,
    n_count_policy: u32,
    default_protocol: u16,
    is_retail: bool,
    is_preview: bool,
    source: String,
}

struct Sku {
    id: Uuid,
    name: String,
    kms_item_id: Uuid,
    gvlk: Option<String>,
    source: String,
}

struct Csvlk {
    id: Uuid,
    name: String,
    group_id: Option<u32>,
    /// `(0, 0)` when the XML gives no (complete) range.
    key_range: (u32, u32),
    release_date: i64,
    is_lab: bool,
    is_preview: bool,
    ini_file_name: String,
    activates: Vec<Uuid>,
    /// Indexes as written in the XML (into the list of `UseForEpid` builds).
    invalid_epid_builds: Vec<usize>,
    line: u32,
    /// Whether an organisation can install this key on its own host (not lab, preview or
    /// Azure-only).
    installable: bool,
    /// Source of the activation list (a key of the overlay's `[sources]`).
    source: String,
    /// Newest host build the key can be installed on (0: no limit known).
    max_host_build: u32,
}

struct Build {
    build: u32,
    platform_id: u32,
    display_name: String,
    use_for_epid: bool,
    may_be_server: bool,
    uses_ndr64: bool,
    release_date: i64,
}

struct Data {
    apps: Vec<App>,
    items: Vec<Item>,
    skus: Vec<Sku>,
    csvlks: Vec<Csvlk>,
    builds: Vec<Build>,
    /// Build numbers of the `UseForEpid` builds in XML order: `InvalidWinBuild` indexes into this.
    epid_builds: Vec<u32>,
}

fn line_of(node: Node<'_, '_>) -> u32 {
    node.document().text_pos_at(node.range().start).row
}

fn err<T>(node: Node<'_, '_>, msg: impl fmt::Display) -> Result<T> {
    Err(BuildError(format!(
        "line {}: <{}>: {msg}",
        line_of(node),
        node.tag_name().name()
    )))
}

/// Attribute value; falls back to a case-insensitive name match because the XML is hand-edited
/// (e.g. one `DefaultKmsprotocol`).
fn attr<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attribute(name).or_else(|| {
        node.attributes()
            .find(|a| a.name().eq_ignore_ascii_case(name))
            .map(|a| a.value())
    })
}

/// Attribute value, treating an empty (or blank) value as absent.
fn attr_opt<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    attr(node, name).map(str::trim).filter(|v| !v.is_empty())
}

fn attr_req<'a>(node: Node<'a, '_>, name: &str) -> Result<&'a str> {
    match attr_opt(node, name) {
        Some(v) => Ok(v),
        None => err(node, format!("missing required attribute {name}")),
    }
}

fn parse_guid(node: Node<'_, '_>, name: &str, value: &str) -> Result<Uuid> {
    let bare = value.trim().trim_start_matches('{').trim_end_matches('}');
    match Uuid::parse_str(bare) {
        Ok(u) => Ok(u),
        Err(e) => err(
            node,
            format!("attribute {name}={value:?} is not a GUID: {e}"),
        ),
    }
}

fn guid_req(node: Node<'_, '_>, name: &str) -> Result<Uuid> {
    let v = attr_req(node, name)?;
    parse_guid(node, name, v)
}

fn u32_opt(node: Node<'_, '_>, name: &str) -> Result<Option<u32>> {
    match attr_opt(node, name) {
        None => Ok(None),
        Some(v) => match v.parse::<u32>() {
            Ok(n) => Ok(Some(n)),
            Err(e) => err(node, format!("attribute {name}={v:?} is not a number: {e}")),
        },
    }
}

fn bool_opt(node: Node<'_, '_>, name: &str, default: bool) -> Result<bool> {
    match attr_opt(node, name) {
        None => Ok(default),
        Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => Ok(false),
        Some(v) => err(node, format!("attribute {name}={v:?} is not a boolean")),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `ReleaseDate` as Unix seconds; 0 when absent. Accepts `YYYY-MM-DD` optionally followed by
/// `THH:MM:SS` and `Z`.
fn date_opt(node: Node<'_, '_>, name: &str) -> Result<i64> {
    let Some(v) = attr_opt(node, name) else {
        return Ok(0);
    };
    match parse_date(v) {
        Some(t) => Ok(t),
        None => err(
            node,
            format!("attribute {name}={v:?} is not a date (YYYY-MM-DDTHH:MM:SSZ)"),
        ),
    }
}

/// `YYYY-MM-DD` optionally followed by `THH:MM:SS` and `Z`, as Unix seconds.
fn parse_date(v: &str) -> Option<i64> {
    let bad = || -> Option<i64> { None };
    let v2 = v.strip_suffix('Z').unwrap_or(v);
    let (date, time) = match v2.split_once('T') {
        Some((d, t)) => (d, t),
        None => (v2, "00:00:00"),
    };
    let dp: Vec<&str> = date.split('-').collect();
    let tp: Vec<&str> = time.split(':').collect();
    let num = |s: &&str| s.parse::<i64>().ok();
    let (Some(y), Some(mo), Some(d)) = (
        dp.first().and_then(num),
        dp.get(1).and_then(num),
        dp.get(2).and_then(num),
    ) else {
        return bad();
    };
    let (Some(h), Some(mi), Some(s)) = (
        tp.first().and_then(num),
        tp.get(1).and_then(num),
        tp.get(2).and_then(num),
    ) else {
        return bad();
    };
    if dp.len() != 3
        || tp.len() != 3
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(0..=60).contains(&s)
    {
        return bad();
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

/// `InvalidWinBuild="[0,1,2]"`; empty or missing means none.
fn index_list(node: Node<'_, '_>, name: &str) -> Result<Vec<usize>> {
    let Some(v) = attr_opt(node, name) else {
        return Ok(Vec::new());
    };
    let inner = v.trim_start_matches('[').trim_end_matches(']');
    let mut out = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<usize>() {
            Ok(n) => out.push(n),
            Err(_) => {
                return err(
                    node,
                    format!("attribute {name}={v:?} is not a list of indexes"),
                )
            }
        }
    }
    Ok(out)
}

fn elements<'a, 'input>(
    node: Node<'a, 'input>,
    name: &'static str,
) -> impl Iterator<Item = Node<'a, 'input>> {
    node.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

fn parse(text: &str) -> Result<Data> {
    let doc = Document::parse(text).map_err(|e| BuildError(format!("malformed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "KmsData" {
        return err(root, "root element must be <KmsData>");
    }
    if let Some(v) = attr_opt(root, "Version") {
        if v != "2.0" {
            return err(
                root,
                format!("unsupported KmsData Version {v:?} (expected 2.0)"),
            );
        }
    }

    let mut data = Data {
        apps: Vec::new(),
        items: Vec::new(),
        skus: Vec::new(),
        csvlks: Vec::new(),
        builds: Vec::new(),
        epid_builds: Vec::new(),
    };

    for builds in elements(root, "WinBuilds") {
        for b in elements(builds, "WinBuild") {
            let build = Build {
                build: u32_opt(b, "BuildNumber")?
                    .map_or_else(|| err(b, "missing required attribute BuildNumber"), Ok)?,
                platform_id: u32_opt(b, "PlatformId")?
                    .map_or_else(|| err(b, "missing required attribute PlatformId"), Ok)?,
                display_name: attr_req(b, "DisplayName")?.to_owned(),
                use_for_epid: bool_opt(b, "UseForEpid", false)?,
                may_be_server: bool_opt(b, "MayBeServer", false)?,
                uses_ndr64: bool_opt(b, "UsesNDR64", false)?,
                release_date: date_opt(b, "ReleaseDate")?,
            };
            if data.builds.iter().any(|x| x.build == build.build) {
                return err(b, format!("duplicate BuildNumber {}", build.build));
            }
            if build.use_for_epid {
                data.epid_builds.push(build.build);
            }
            data.builds.push(build);
        }
    }

    let mut seen_csvlk = HashSet::new();
    for list in elements(root, "CsvlkItems") {
        for c in elements(list, "CsvlkItem") {
            // An entry without an id (a placeholder in the XML) cannot be referenced: skip it.
            let Some(id_text) = attr_opt(c, "Id") else {
                continue;
            };
            let id = parse_guid(c, "Id", id_text)?;
            // The XML lists one id twice (fe27276b-...): keep the first, deterministically.
            if !seen_csvlk.insert(id) {
                continue;
            }
            let min = u32_opt(c, "MinKeyId")?;
            let max = u32_opt(c, "MaxKeyId")?;
            let key_range = match (min, max) {
                (Some(lo), Some(hi)) if lo <= hi && hi > 0 => (lo, hi),
                (Some(lo), Some(hi)) => {
                    return err(c, format!("empty key range MinKeyId={lo} MaxKeyId={hi}"));
                }
                _ => (0, 0),
            };
            if key_range.1 > 999_999_999 {
                return err(c, "MaxKeyId exceeds 9 digits");
            }
            let group_id = u32_opt(c, "GroupId")?;
            if group_id.is_some_and(|g| g > 99_999) {
                return err(c, "GroupId exceeds 5 digits");
            }
            let mut activates = Vec::new();
            for a in elements(c, "Activate") {
                if let Some(k) = attr_opt(a, "KmsItem") {
                    let k = parse_guid(a, "KmsItem", k)?;
                    if !activates.contains(&k) {
                        activates.push(k);
                    }
                }
            }
            let name = attr_req(c, "DisplayName")?.to_owned();
            let is_lab = bool_opt(c, "IsLab", false)?;
            let is_preview = bool_opt(c, "IsPreview", false)?;
            data.csvlks.push(Csvlk {
                id,
                installable: !is_lab && !is_preview && !name.contains("Azure"),
                source: "xml".to_owned(),
                max_host_build: 0,
                name,
                group_id,
                key_range,
                release_date: date_opt(c, "ReleaseDate")?,
                is_lab,
                is_preview,
                ini_file_name: attr_opt(c, "IniFileName").unwrap_or("").to_owned(),
                activates,
                invalid_epid_builds: index_list(c, "InvalidWinBuild")?,
                line: line_of(c),
            });
        }
    }

    let mut seen_app = HashSet::new();
    let mut seen_item = HashSet::new();
    let mut seen_sku = HashSet::new();
    for list in elements(root, "AppItems") {
        for a in elements(list, "AppItem") {
            let app_id = guid_req(a, "Id")?;
            if !seen_app.insert(app_id) {
                println!(
                    "cargo:warning=duplicate AppItem {app_id} (line {}) ignored",
                    line_of(a)
                );
                continue;
            }
            data.apps.push(App {
                id: app_id,
                name: attr_req(a, "DisplayName")?.to_owned(),
                min_active_clients: u32_opt(a, "MinActiveClients")?.unwrap_or(0),
            });
            for k in elements(a, "KmsItem") {
                let item_id = guid_req(k, "Id")?;
                if !seen_item.insert(item_id) {
                    println!(
                        "cargo:warning=duplicate KmsItem {item_id} (line {}) ignored",
                        line_of(k)
                    );
                    continue;
                }
                let proto = match attr_opt(k, "DefaultKmsProtocol") {
                    None => 6,
                    Some(v) => match v.split('.').next().map(str::parse::<u16>) {
                        Some(Ok(p @ 4..=6)) => p,
                        _ => {
                            return err(
                                k,
                                format!("DefaultKmsProtocol={v:?} is not 4.0, 5.0 or 6.0"),
                            )
                        }
                    },
                };
                data.items.push(Item {
                    id: item_id,
                    name: attr_req(k, "DisplayName")?.to_owned(),
                    application_id: app_id,
                    n_count_policy: u32_opt(k, "NCountPolicy")?.unwrap_or(25),
                    default_protocol: proto,
                    is_retail: bool_opt(k, "IsRetail", false)?,
                    is_preview: bool_opt(k, "IsPreview", false)?,
                    source: "xml".to_owned(),
                });
                for s in elements(k, "SkuItem") {
                    let sku_id = guid_req(s, "Id")?;
                    if !seen_sku.insert(sku_id) {
                        println!(
                            "cargo:warning=duplicate SkuItem {sku_id} (line {}) ignored",
                            line_of(s)
                        );
                        continue;
                    }
                    data.skus.push(Sku {
                        id: sku_id,
                        name: attr_req(s, "DisplayName")?.to_owned(),
                        kms_item_id: item_id,
                        gvlk: attr_opt(s, "Gvlk").map(str::to_owned),
                        source: "xml".to_owned(),
                    });
                }
            }
        }
    }

    if data.apps.is_empty() || data.items.is_empty() || data.csvlks.is_empty() {
        return Err(BuildError(
            "no AppItem, KmsItem or CsvlkItem found: not a KmsDataBase file?".into(),
        ));
    }
    Ok(data)
}

fn uuid_expr(u: &Uuid) -> String {
    format!("Uuid::from_u128(0x{:032x})", u.as_u128())
}

fn generate(data: &Data) -> Result<String> {
    let mut apps: Vec<&App> = data.apps.iter().collect();
    apps.sort_by_key(|a| a.id);
    let mut items: Vec<&Item> = data.items.iter().collect();
    items.sort_by_key(|i| i.id);
    let mut skus: Vec<&Sku> = data.skus.iter().collect();
    skus.sort_by_key(|s| s.id);
    let mut csvlks: Vec<&Csvlk> = data.csvlks.iter().collect();
    csvlks.sort_by_key(|c| c.id);
    let mut builds: Vec<&Build> = data.builds.iter().collect();
    builds.sort_by_key(|b| b.build);
    let build_index: HashMap<u32, usize> = builds
        .iter()
        .enumerate()
        .map(|(i, b)| (b.build, i))
        .collect();

    let mut o = String::new();
    // `fmt::Write` for String never fails; the results are ignored through this helper.
    macro_rules! w {
        ($($arg:tt)*) => { let _ = writeln!(o, $($arg)*); };
    }
    w!("// @generated by build.rs from {XML_PATH}. Do not edit.");
    w!();

    w!("static APPLICATIONS: [Application; {}] = [", apps.len());
    for a in &apps {
        w!(
            "    Application {{ id: {}, name: {:?}, min_active_clients: {} }},",
            uuid_expr(&a.id),
            a.name,
            a.min_active_clients
        );
    }
    w!("];");

    w!("static KMS_ITEMS: [KmsItem; {}] = [", items.len());
    for i in &items {
        w!(
            "    KmsItem {{ id: {}, name: {:?}, application_id: {}, n_count_policy: {}, default_protocol: {}, is_retail: {}, is_preview: {}, source: {:?} }},",
            uuid_expr(&i.id),
            i.name,
            uuid_expr(&i.application_id),
            i.n_count_policy,
            i.default_protocol,
            i.is_retail,
            i.is_preview,
            i.source
        );
    }
    w!("];");

    w!("static SKUS: [Sku; {}] = [", skus.len());
    for s in &skus {
        let gvlk = match &s.gvlk {
            Some(g) => format!("Some({g:?})"),
            None => "None".to_owned(),
        };
        w!(
            "    Sku {{ id: {}, name: {:?}, kms_item_id: {}, gvlk: {gvlk}, source: {:?} }},",
            uuid_expr(&s.id),
            s.name,
            uuid_expr(&s.kms_item_id),
            s.source
        );
    }
    w!("];");

    w!("static WIN_BUILDS: [WinBuild; {}] = [", builds.len());
    for b in &builds {
        w!(
            "    WinBuild {{ build: {}, platform_id: {}, display_name: {:?}, use_for_epid: {}, may_be_server: {}, uses_ndr64: {}, release_date: {} }},",
            b.build,
            b.platform_id,
            b.display_name,
            b.use_for_epid,
            b.may_be_server,
            b.uses_ndr64,
            b.release_date
        );
    }
    w!("];");

    w!("static CSVLKS: [Csvlk; {}] = [", csvlks.len());
    let mut windows_default = None;
    for (idx, c) in csvlks.iter().enumerate() {
        if c.id.to_string() == WINDOWS_DEFAULT_CSVLK {
            windows_default = Some(idx);
        }
        let mut invalid = Vec::new();
        for &i in &c.invalid_epid_builds {
            let Some(idx) = data.epid_builds.get(i).and_then(|b| build_index.get(b)) else {
                return Err(BuildError(format!(
                    "line {}: CsvlkItem {}: InvalidWinBuild index {i} does not name a UseForEpid WinBuild (there are {})",
                    c.line,
                    c.id,
                    data.epid_builds.len()
                )));
            };
            invalid.push(idx.to_string());
        }
        let activates: Vec<String> = c.activates.iter().map(uuid_expr).collect();
        // A host key serves one application: the one of the KMS ids it activates.
        let apps: HashSet<Uuid> = c
            .activates
            .iter()
            .filter_map(|a| data.items.iter().find(|i| i.id == *a))
            .map(|i| i.application_id)
            .collect();
        let application = match apps.len() {
            0 => Uuid::nil(),
            1 => apps.into_iter().next().unwrap_or_default(),
            _ => {
                return Err(BuildError(format!(
                    "line {}: CsvlkItem {} activates KMS ids of several applications",
                    c.line, c.id
                )))
            }
        };
        let group = match c.group_id {
            Some(g) => format!("Some({g})"),
            None => "None".to_owned(),
        };
        w!(
            "    Csvlk {{ id: {}, application_id: {}, installable: {}, max_host_build: {}, source: {:?}, name: {:?}, group_id: {group}, min_key_id: {}, max_key_id: {}, release_date: {}, is_lab: {}, is_preview: {}, ini_file_name: {:?}, activates: &[{}], invalid_win_builds: &[{}] }},",
            uuid_expr(&c.id),
            uuid_expr(&application),
            c.installable,
            c.max_host_build,
            c.source,
            c.name,
            c.key_range.0,
            c.key_range.1,
            c.release_date,
            c.is_lab,
            c.is_preview,
            c.ini_file_name,
            activates.join(", "),
            invalid.join(", ")
        );
    }
    w!("];");

    let Some(windows_default) = windows_default else {
        return Err(BuildError(format!(
            "the default Windows CSVLK {WINDOWS_DEFAULT_CSVLK} (Windows Server 2019) is missing"
        )));
    };
    if csvlks
        .get(windows_default)
        .is_none_or(|c| c.group_id.is_none() || c.key_range.1 == 0)
    {
        return Err(BuildError(format!(
            "the default Windows CSVLK {WINDOWS_DEFAULT_CSVLK} needs GroupId, MinKeyId and MaxKeyId"
        )));
    }
    w!("/// The CSVLK answering unknown Windows KMS ids (Windows Server 2019, group 206).");
    w!("static WINDOWS_DEFAULT_CSVLK: &Csvlk = &CSVLKS[{windows_default}];");
    Ok(o)
}

/// `data/microsoft.toml`: corrections and additions with their sources.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Overlay {
    version: String,
    sources: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    kms_item: Vec<OverlayItem>,
    #[serde(default)]
    sku: Vec<OverlaySku>,
    #[serde(default)]
    host_key: Vec<OverlayHostKey>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayItem {
    id: Uuid,
    name: String,
    application: Uuid,
    n_count_policy: u32,
    protocol: u16,
    #[serde(default)]
    retail: bool,
    #[serde(default)]
    preview: bool,
    replaces: Option<Uuid>,
    source: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlaySku {
    id: Uuid,
    name: String,
    kms_item: Uuid,
    gvlk: Option<String>,
    source: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayHostKey {
    id: Uuid,
    name: String,
    group_id: Option<u32>,
    min_key_id: Option<u32>,
    max_key_id: Option<u32>,
    release_date: Option<String>,
    installable: Option<bool>,
    max_host_build: Option<u32>,
    #[allow(dead_code)]
    ids_source: Option<String>,
    source: String,
    activates: Vec<Uuid>,
}

fn apply_overlay(data: &mut Data, o: &Overlay) -> Result<()> {
    let known_source = |s: &str, what: &str| {
        if o.sources.contains_key(s) {
            Ok(())
        } else {
            Err(BuildError(format!(
                "{what}: source {s:?} is not in [sources]"
            )))
        }
    };
    for it in &o.kms_item {
        known_source(&it.source, &format!("kms_item {}", it.id))?;
        if !data.apps.iter().any(|a| a.id == it.application) {
            return Err(BuildError(format!(
                "kms_item {}: unknown application {}",
                it.id, it.application
            )));
        }
        if let Some(old) = it.replaces {
            data.items.retain(|i| i.id != old);
            for s in data.skus.iter_mut().filter(|s| s.kms_item_id == old) {
                s.kms_item_id = it.id;
            }
            for c in &mut data.csvlks {
                for a in c.activates.iter_mut().filter(|a| **a == old) {
                    *a = it.id;
                }
            }
        }
        let item = Item {
            id: it.id,
            name: it.name.clone(),
            application_id: it.application,
            n_count_policy: it.n_count_policy,
            default_protocol: it.protocol,
            is_retail: it.retail,
            is_preview: it.preview,
            source: it.source.clone(),
        };
        match data.items.iter_mut().find(|i| i.id == it.id) {
            Some(existing) => *existing = item,
            None => data.items.push(item),
        }
    }
    for sk in &o.sku {
        known_source(&sk.source, &format!("sku {}", sk.id))?;
        if !data.items.iter().any(|i| i.id == sk.kms_item) {
            return Err(BuildError(format!(
                "sku {}: unknown kms_item {}",
                sk.id, sk.kms_item
            )));
        }
        let sku = Sku {
            id: sk.id,
            name: sk.name.clone(),
            kms_item_id: sk.kms_item,
            gvlk: sk.gvlk.clone(),
            source: sk.source.clone(),
        };
        match data.skus.iter_mut().find(|s| s.id == sk.id) {
            Some(existing) => *existing = sku,
            None => data.skus.push(sku),
        }
    }
    for hk in &o.host_key {
        known_source(&hk.source, &format!("host_key {}", hk.id))?;
        let Some(c) = data.csvlks.iter_mut().find(|c| c.id == hk.id) else {
            return Err(BuildError(format!(
                "host_key {}: not a CsvlkItem of the XML",
                hk.id
            )));
        };
        c.name = hk.name.clone();
        if let Some(g) = hk.group_id {
            c.group_id = Some(g);
        }
        match (hk.min_key_id, hk.max_key_id) {
            (Some(lo), Some(hi)) if lo <= hi && hi > 0 && hi <= 999_999_999 => {
                c.key_range = (lo, hi)
            }
            (None, None) => {}
            _ => return Err(BuildError(format!("host_key {}: bad key range", hk.id))),
        }
        if let Some(d) = &hk.release_date {
            c.release_date = parse_date(d)
                .ok_or_else(|| BuildError(format!("host_key {}: bad release_date {d:?}", hk.id)))?;
        }
        if let Some(i) = hk.installable {
            c.installable = i;
        }
        if let Some(b) = hk.max_host_build {
            c.max_host_build = b;
        }
        c.activates = hk.activates.clone();
        c.source = hk.source.clone();
    }
    // Two community pre-release keys name KMS ids the file never defines: those references
    // are dropped (a key then activating nothing is left out of the replicated catalog).
    let items: HashSet<Uuid> = data.items.iter().map(|i| i.id).collect();
    for c in &mut data.csvlks {
        c.activates.retain(|a| items.contains(a));
    }
    Ok(())
}
