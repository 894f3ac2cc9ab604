//! Checks the generated tables against an independent scan of the XML and against facts of
//! the protocol fact sheet (section 9).

use std::collections::HashSet;

use kms_catalog::{catalog, well_known};
use roxmltree::{Document, Node};
use uuid::{uuid, Uuid};

const XML: &str = include_str!("../data/KmsDataBase.xml");
const OVERLAY: &str = include_str!("../data/microsoft.toml");

/// What `data/microsoft.toml` changes: KMS ids it defines, fabricated ids it replaces
/// (old -> new), SKUs and host keys it sets. Those are checked against the overlay, the rest
/// against the XML.
struct Overlaid {
    items: HashSet<Uuid>,
    replaced: std::collections::HashMap<Uuid, Uuid>,
    skus: HashSet<Uuid>,
    host_keys: HashSet<Uuid>,
}

fn overlaid() -> Overlaid {
    let v: toml::Value = toml::from_str(OVERLAY).expect("overlay parses");
    let ids = |table: &str| -> Vec<&toml::Value> {
        v.get(table)
            .and_then(|t| t.as_array())
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    };
    let id = |e: &toml::Value, k: &str| e.get(k).and_then(|x| x.as_str()).map(guid);
    Overlaid {
        items: ids("kms_item").iter().filter_map(|e| id(e, "id")).collect(),
        replaced: ids("kms_item")
            .iter()
            .filter_map(|e| Some((id(e, "replaces")?, id(e, "id")?)))
            .collect(),
        skus: ids("sku").iter().filter_map(|e| id(e, "id")).collect(),
        host_keys: ids("host_key").iter().filter_map(|e| id(e, "id")).collect(),
    }
}

fn guid(s: &str) -> Uuid {
    Uuid::parse_str(s.trim_matches(|c| c == '{' || c == '}')).expect("GUID in XML")
}

fn elements<'a, 'i>(doc: &'a Document<'i>, name: &'a str) -> Vec<Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == name)
        .collect()
}

fn parent_id(n: Node<'_, '_>) -> Uuid {
    guid(
        n.parent_element()
            .and_then(|p| p.attribute("Id"))
            .expect("parent Id"),
    )
}

#[test]
fn tables_are_sorted_and_unique() {
    let c = catalog();
    assert!(c.applications().windows(2).all(|w| w[0].id < w[1].id));
    assert!(c.kms_items().windows(2).all(|w| w[0].id < w[1].id));
    assert!(c.skus().windows(2).all(|w| w[0].id < w[1].id));
    assert!(c.csvlks().windows(2).all(|w| w[0].id < w[1].id));
    assert!(c.win_builds().windows(2).all(|w| w[0].build < w[1].build));
}

#[test]
fn applications_match_xml() {
    let doc = Document::parse(XML).unwrap();
    let xml = elements(&doc, "AppItem");
    assert_eq!(catalog().applications().len(), xml.len());
    for n in xml {
        let id = guid(n.attribute("Id").unwrap());
        let a = catalog().application(&id).expect("application present");
        assert_eq!(a.name, n.attribute("DisplayName").unwrap());
        let min: u32 = n.attribute("MinActiveClients").unwrap().parse().unwrap();
        assert_eq!(a.min_active_clients, min);
    }
}

#[test]
fn kms_items_match_xml() {
    let doc = Document::parse(XML).unwrap();
    let xml = elements(&doc, "KmsItem");
    let o = overlaid();
    let xml_ids: HashSet<Uuid> = xml
        .iter()
        .map(|n| guid(n.attribute("Id").unwrap()))
        .collect();
    let added = o.items.iter().filter(|i| !xml_ids.contains(i)).count();
    assert_eq!(
        catalog().kms_items().len(),
        xml.len() - o.replaced.len() + added
    );
    for n in xml {
        let id = guid(n.attribute("Id").unwrap());
        if o.replaced.contains_key(&id) {
            assert!(catalog().kms_item(&id).is_none(), "fabricated {id} dropped");
            continue;
        }
        if o.items.contains(&id) {
            continue;
        }
        let k = catalog().kms_item(&id).expect("KMS item present");
        assert_eq!(k.name, n.attribute("DisplayName").unwrap());
        assert_eq!(k.application_id, parent_id(n));
        let policy: u32 = n
            .attribute("NCountPolicy")
            .map_or(25, |v| v.parse().unwrap());
        assert_eq!(k.n_count_policy, policy, "{}", k.name);
        assert_eq!(
            k.is_retail,
            n.attribute("IsRetail")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        );
        assert_eq!(
            k.is_preview,
            n.attribute("IsPreview")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        );
    }
}

#[test]
fn skus_match_xml() {
    let doc = Document::parse(XML).unwrap();
    let xml = elements(&doc, "SkuItem");
    assert!(xml.len() > 200);
    let o = overlaid();
    assert_eq!(catalog().skus().len(), xml.len());
    for n in xml {
        let id = guid(n.attribute("Id").unwrap());
        let s = catalog().sku(&id).expect("SKU present");
        assert!(catalog().kms_item(&s.kms_item_id).is_some());
        if o.skus.contains(&id) {
            assert_ne!(s.source, "xml");
            continue;
        }
        assert_eq!(s.source, "xml");
        assert_eq!(s.name, n.attribute("DisplayName").unwrap());
        let parent = parent_id(n);
        assert_eq!(
            s.kms_item_id,
            o.replaced.get(&parent).copied().unwrap_or(parent)
        );
        assert_eq!(s.gvlk, n.attribute("Gvlk").filter(|g| !g.is_empty()));
        assert!(catalog().kms_item(&s.kms_item_id).is_some());
    }
}

#[test]
fn csvlks_match_xml() {
    let doc = Document::parse(XML).unwrap();
    let mut seen = HashSet::new();
    let mut expected = 0;
    for n in elements(&doc, "CsvlkItem") {
        let raw = n.attribute("Id").unwrap_or("");
        if raw.is_empty() {
            continue;
        }
        let id = guid(raw);
        if !seen.insert(id) {
            continue; // first occurrence wins
        }
        expected += 1;
        let c = catalog().csvlk(&id).expect("CSVLK present");
        if overlaid().host_keys.contains(&id) {
            continue; // checked against the overlay (kms-core's matrix tests)
        }
        assert_eq!(c.name, n.attribute("DisplayName").unwrap());
        let group = n
            .attribute("GroupId")
            .filter(|g| !g.is_empty())
            .map(|g| g.parse().unwrap());
        assert_eq!(c.group_id, group, "{}", c.name);
        let o = overlaid();
        let activates: Vec<Uuid> = n
            .children()
            .filter(|a| a.has_tag_name("Activate"))
            .map(|a| guid(a.attribute("KmsItem").unwrap()))
            .map(|k| o.replaced.get(&k).copied().unwrap_or(k))
            // References to KMS ids the file never defines are dropped.
            .filter(|k| catalog().kms_item(k).is_some())
            .collect();
        assert_eq!(c.activates, activates.as_slice(), "{}", c.name);
        if let Some(min) = n.attribute("MinKeyId").filter(|v| !v.is_empty()) {
            assert_eq!(c.min_key_id, min.parse::<u32>().unwrap());
        }
        if let Some(max) = n.attribute("MaxKeyId").filter(|v| !v.is_empty()) {
            assert_eq!(c.max_key_id, max.parse::<u32>().unwrap());
        }
    }
    assert_eq!(catalog().csvlks().len(), expected);
    // The duplicated id keeps its first entry (the 2012 R2 lab key).
    let dup = catalog()
        .csvlk(&uuid!("fe27276b-a5a9-4b4d-88e3-14271beb79be"))
        .unwrap();
    assert_eq!(dup.name, "Windows Server 2012 R2 (Microsoft Internal Lab)");
    // The placeholder without an id is skipped, not stored under the nil id.
    assert!(catalog().csvlk(&Uuid::nil()).is_none());
}

#[test]
fn win_builds_match_xml() {
    let doc = Document::parse(XML).unwrap();
    let xml = elements(&doc, "WinBuild");
    assert_eq!(catalog().win_builds().len(), xml.len());
    let b = catalog().win_build(17763).unwrap();
    assert_eq!(b.platform_id, 3612);
    assert!(b.use_for_epid && b.may_be_server && b.uses_ndr64);
    assert_eq!(b.release_date, 1_538_438_400); // 2018-10-02T00:00:00Z
    let b = catalog().win_build(9600).unwrap();
    assert_eq!(b.platform_id, 6401);
    assert_eq!(b.release_date, 1_382_054_400); // 2013-10-18T00:00:00Z
    assert_eq!(catalog().win_build(7601).unwrap().platform_id, 55041);
    assert_eq!(catalog().win_build(9200).unwrap().platform_id, 5426);
}

#[test]
fn invalid_win_builds_name_epid_builds() {
    // Server 2019's key may not run on 2008 (6002), 2008 R2 (7601) or 2012 (9200).
    let c = catalog()
        .csvlk(&well_known::CSVLK_WINDOWS_SERVER_2019)
        .unwrap();
    let builds: Vec<u32> = c
        .invalid_win_builds
        .iter()
        .map(|&i| catalog().win_builds()[i].build)
        .collect();
    assert_eq!(builds, [6002, 7601, 9200]);
}

#[test]
fn application_ids_from_spec() {
    let c = catalog();
    assert_eq!(
        well_known::WINDOWS,
        uuid!("55c92734-d682-4d71-983e-d6ec3f16059f")
    );
    assert_eq!(
        well_known::OFFICE_2010,
        uuid!("59a52881-a989-479d-af46-f275c6370663")
    );
    assert_eq!(
        well_known::OFFICE_2013,
        uuid!("0ff1ce15-a989-479d-af46-f275c6370663")
    );
    assert_eq!(
        c.application(&well_known::WINDOWS)
            .unwrap()
            .min_active_clients,
        50
    );
    assert_eq!(
        c.application(&well_known::OFFICE_2010)
            .unwrap()
            .min_active_clients,
        10
    );
    assert_eq!(
        c.application(&well_known::OFFICE_2013)
            .unwrap()
            .min_active_clients,
        10
    );
}

#[test]
fn kms_ids_from_spec() {
    let c = catalog();
    let w10 = c
        .kms_item(&uuid!("58e2134f-8e11-4d17-9cb2-91069c151148"))
        .unwrap();
    assert_eq!(w10.n_count_policy, 25);
    assert_eq!(w10.application_id, well_known::WINDOWS);
    assert_eq!(w10.default_protocol, 6);
    let s2019 = c
        .kms_item(&uuid!("8449b1fb-f0ea-497a-99ab-66ca96e9a0f5"))
        .unwrap();
    assert_eq!(s2019.n_count_policy, 5);
    assert_eq!(s2019.application_id, well_known::WINDOWS);
    let o2016 = c
        .kms_item(&uuid!("85b5f61b-320b-4be3-814a-b76b2bfafc82"))
        .unwrap();
    assert_eq!(o2016.application_id, well_known::OFFICE_2013);
    assert_eq!(o2016.n_count_policy, 5);
    let o2010 = c
        .kms_item(&uuid!("e85af946-2e25-47b7-83e1-bebcebeac611"))
        .unwrap();
    assert_eq!(o2010.application_id, well_known::OFFICE_2010);
    assert_eq!(o2010.default_protocol, 4);
    // The fabricated Office 2024 id is replaced by the genuine one.
    assert!(c
        .kms_item(&uuid!("1b4db7eb-4057-5ddf-91e0-36dec72071f5"))
        .is_none());
    let o2024 = c
        .kms_item(&uuid!("a8973cb5-bf03-0a4c-9cef-703099645ab3"))
        .unwrap();
    assert_eq!(o2024.default_protocol, 6);
    let w8 = c
        .kms_item(&uuid!("bbb97b3b-8ca4-4a28-9717-89fabd42c4ac"))
        .unwrap();
    assert!(w8.is_retail);
    assert_eq!(w8.default_protocol, 5);
    assert!(c.kms_item(&Uuid::nil()).is_none());
}

#[test]
fn csvlks_from_spec() {
    let c = catalog();
    let s2019 = c
        .csvlk(&uuid!("2e7a9ad1-a849-4b56-babe-17d5a29fe4b4"))
        .unwrap();
    assert_eq!(s2019.name, "Windows Server 2019");
    assert_eq!(s2019.group_id, Some(206));
    assert_eq!(s2019.key_range(), Some((551_000_000, 570_999_999)));
    assert!(s2019.activates(&uuid!("8449b1fb-f0ea-497a-99ab-66ca96e9a0f5")));
    assert_eq!(s2019.release_date, 1_538_438_400);
    assert_eq!(s2019.ini_file_name, "Windows");

    let o2010 = c.csvlk(&well_known::CSVLK_OFFICE_2010).unwrap();
    assert_eq!(o2010.group_id, Some(96));
    assert_eq!(o2010.key_range(), Some((199_000_000, 217_999_999)));

    // Missing key range and group id are represented as absent, not as zeros that look valid.
    let azure = c
        .csvlk(&uuid!("3c006fa7-3b03-45a4-93da-63ddc1bdce11"))
        .unwrap();
    assert_eq!(azure.group_id, Some(206));
    assert_eq!(azure.key_range(), None);
    assert!(!azure.can_make_epid());
    let next = c
        .csvlk(&uuid!("c609957a-dc23-48b3-8c6b-31b303479de2"))
        .unwrap();
    assert_eq!(next.group_id, None);
    assert!(next.is_preview);
    // `IsLab="True"` (capitalised) is read as true.
    assert!(
        c.csvlk(&uuid!("6bad0243-1c35-46b2-b8e6-7a853e37413f"))
            .unwrap()
            .is_lab
    );
}

#[test]
fn sku_lookup_by_name() {
    let c = catalog();
    let ent = c.sku_by_name("Windows 10 Enterprise").unwrap();
    assert_eq!(ent.id, uuid!("73111121-5638-40f6-bc11-f1d7b0d64300"));
    assert_eq!(ent.gvlk, Some("NPPR9-FWDCX-D2C8J-H872K-2YT43"));
    assert_eq!(
        ent.kms_item_id,
        uuid!("58e2134f-8e11-4d17-9cb2-91069c151148")
    );
    assert_eq!(c.sku_by_name("windows_11-enterprise").unwrap().id, ent.id);
    assert_eq!(
        c.sku_by_name("Windows 10/11 Enterprise").unwrap().id,
        ent.id
    );
    assert_eq!(
        c.sku_by_name("WINDOWS SERVER 2019 DATACENTER").unwrap().id,
        uuid!("34e1ae55-27f8-4950-8877-7a03be5fb181")
    );
    assert!(c.sku_by_name("Windows 12 Enterprise").is_none());
    assert!(c.sku_by_name("").is_none());
    assert!(c.sku_by_name("   ").is_none());
}

#[test]
fn sku_search() {
    let c = catalog();
    let hits = c.search_skus("server 2019 datacenter");
    assert!(hits
        .iter()
        .any(|s| s.name == "Windows Server 2019 Datacenter"));
    assert!(hits.iter().all(|s| {
        let n = s.name.to_lowercase();
        n.contains("server") && n.contains("2019") && n.contains("datacenter")
    }));
    assert!(c.search_skus("no such product xyzzy").is_empty());
    assert_eq!(c.search_skus("").len(), c.skus().len());
}

#[test]
fn csvlks_for_kms_id() {
    let c = catalog();
    let w10 = uuid!("58e2134f-8e11-4d17-9cb2-91069c151148");
    let all = c.csvlks_for(&w10);
    assert!(all.len() >= 5);
    assert!(all.iter().all(|k| k.activates(&w10)));
    let def = c.default_csvlk_for(&w10).unwrap();
    assert_eq!(def.group_id, Some(4919));
    assert!(!def.is_lab && !def.is_preview && def.can_make_epid());
    // Newest non-lab key activating Windows 10 volume: Windows Server 2025's (down-level).
    assert_eq!(def.name, "Windows Server 2025");
    let ranked = c.ranked_csvlks_for(&w10);
    assert_eq!(ranked.len(), all.len());
    assert_eq!(ranked[0].id, def.id);
    // Lab and preview keys come after every usable production key.
    let first_lab = ranked
        .iter()
        .position(|k| k.is_lab || k.is_preview)
        .unwrap();
    assert!(ranked[first_lab..]
        .iter()
        .all(|k| k.is_lab || k.is_preview || !k.can_make_epid()));

    let ent = c.sku_by_name("Windows 10 Enterprise").unwrap();
    assert_eq!(
        c.default_csvlk_for(&ent.kms_item_id).unwrap().group_id,
        Some(4919)
    );

    let s2019 = uuid!("8449b1fb-f0ea-497a-99ab-66ca96e9a0f5");
    assert!(c
        .csvlks_for(&s2019)
        .iter()
        .any(|k| k.id == well_known::CSVLK_WINDOWS_SERVER_2019));
    let o2010 = uuid!("e85af946-2e25-47b7-83e1-bebcebeac611");
    assert_eq!(c.default_csvlk_for(&o2010).unwrap().group_id, Some(96));
    // "Windows 10 Unknown (Volume)" is activated by no CSVLK in the data.
    assert!(c
        .default_csvlk_for(&uuid!("d27cd636-1962-44e9-8b4f-27b6c23efb85"))
        .is_none());
    assert!(c.csvlks_for(&Uuid::nil()).is_empty());
}

#[test]
fn default_csvlk_per_application() {
    let c = catalog();
    let win = c.default_csvlk_for_application(&well_known::WINDOWS);
    assert_eq!(win.id, well_known::CSVLK_WINDOWS_SERVER_2019);
    assert_eq!(win.group_id, Some(206));
    assert_eq!(
        c.default_csvlk_for_application(&Uuid::nil()).id,
        well_known::CSVLK_WINDOWS_SERVER_2019
    );
    let o14 = c.default_csvlk_for_application(&well_known::OFFICE_2010);
    assert_eq!(o14.id, well_known::CSVLK_OFFICE_2010);
    let o15 = c.default_csvlk_for_application(&well_known::OFFICE_2013);
    assert!(o15.can_make_epid() && !o15.is_lab && !o15.is_preview);
    assert_eq!(o15.group_id, Some(206));
    // It activates an Office 2013+ product and no dated Office CSVLK is newer.
    assert!(o15.activates.iter().any(|k| c
        .kms_item(k)
        .is_some_and(|i| i.application_id == well_known::OFFICE_2013)));
    for other in c.csvlks() {
        if other.ini_file_name.starts_with("Office") && other.can_make_epid() {
            assert!(other.release_date <= o15.release_date, "{}", other.name);
        }
    }
}

#[test]
fn genuine_ids_have_the_right_names_and_sources() {
    let data = kms_catalog::CatalogData::builtin();
    data.validate().expect("the built-in catalog is valid");
    for (id, name) in [
        (
            "907f1f65-adcd-4a2e-95bc-4bf500bc6e58",
            "Windows Server 2025",
        ),
        ("a8973cb5-bf03-0a4c-9cef-703099645ab3", "Office LTSC 2024"),
        (
            "3b576817-7b75-4362-9e13-223f2d9e9c97",
            "Windows 10/11 2021 LTSC (Volume)",
        ),
        (
            "e85ee727-69c4-4528-99d2-216b0f065e38",
            "Windows 10/11 2024 LTSC (Volume)",
        ),
        ("86d50b16-4808-41af-b83b-b338274318b2", "Office LTSC 2021"),
    ] {
        let item = data.kms_item(&guid(id)).expect(id);
        assert_eq!(item.name, name);
        assert_eq!(item.source, "pkeyconfig");
    }
    for (sku, name, gvlk) in [
        (
            "c052f164-cdf6-409a-a0cb-853ba0f0f55a",
            "Windows Server 2025 Datacenter",
            "D764K-2NDRG-47T6Q-P8T8W-YP6DF",
        ),
        (
            "7dc26449-db21-4e09-ba37-28f2958506a6",
            "Windows Server 2025 Standard",
            "TVRH6-WHNXV-R9WG3-9XRFY-MY832",
        ),
        (
            "8d368fc1-9470-4be2-8d66-90e836cbb051",
            "Office LTSC Professional Plus 2024",
            "XJ2XN-FW8RK-P4HMP-DKDBV-GCVGB",
        ),
    ] {
        let s = data.sku(&guid(sku)).unwrap();
        assert_eq!((s.name.as_str(), s.gvlk.as_deref()), (name, Some(gvlk)));
        assert!(s.source.starts_with("ms-"), "{}", s.source);
    }
    // Server 2025 editions live under the genuine id; so do Office LTSC 2024's.
    assert_eq!(
        data.sku(&guid("c052f164-cdf6-409a-a0cb-853ba0f0f55a"))
            .unwrap()
            .kms_item_id,
        guid("907f1f65-adcd-4a2e-95bc-4bf500bc6e58")
    );
    // Every source a fact cites is described.
    let known: HashSet<&str> = kms_catalog::SOURCES.iter().map(|(k, _)| *k).collect();
    for h in &data.host_keys {
        assert!(known.contains(h.source.as_str()), "{}", h.source);
    }
    // Defaults: the newest keys, Windows Server 2025 and Office LTSC 2024.
    assert_eq!(
        data.default_host_key(&well_known::WINDOWS).unwrap().name,
        "Windows Server 2025"
    );
    assert_eq!(
        data.default_host_key(&well_known::OFFICE_2013)
            .unwrap()
            .name,
        "Office LTSC 2024"
    );
    assert_eq!(
        data.default_host_key(&well_known::OFFICE_2010).unwrap().id,
        well_known::CSVLK_OFFICE_2010
    );
}

#[test]
fn replicated_form_round_trips_and_bad_catalogs_name_the_field() {
    let data = kms_catalog::CatalogData::builtin();
    let json = serde_json::to_string(&data).unwrap();
    let back: kms_catalog::CatalogData = serde_json::from_str(&json).unwrap();
    assert_eq!(back, data);
    let mut bad = data.clone();
    bad.host_keys[0].activates = vec![Uuid::from_u128(5)];
    assert_eq!(
        bad.validate().unwrap_err().field,
        "host_keys[0].activates[0]"
    );
    let mut bad = data.clone();
    bad.skus[1].kms_item_id = Uuid::from_u128(5);
    assert_eq!(bad.validate().unwrap_err().field, "skus[1].kms_item_id");
    let mut bad = data.clone();
    bad.kms_items.swap(0, 1);
    assert_eq!(bad.validate().unwrap_err().field, "kms_items[1].id");
    assert!(bad.normalized().validate().is_ok(), "normalized sorts");
    let mut bad = data.clone();
    bad.host_keys
        .retain(|h| h.application_id != well_known::OFFICE_2010);
    assert_eq!(bad.validate().unwrap_err().field, "host_keys");
    let mut bad = data;
    bad.version = String::new();
    assert_eq!(bad.validate().unwrap_err().field, "version");
}
