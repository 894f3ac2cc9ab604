//! Checks the generated tables against an independent scan of the XML and against facts of
//! the protocol fact sheet (section 9).

use std::collections::HashSet;

use kms_catalog::{catalog, well_known};
use roxmltree::{Document, Node};
use uuid::{uuid, Uuid};

const XML: &str = include_str!("../data/KmsDataBase.xml");

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
    assert_eq!(catalog().kms_items().len(), xml.len());
    for n in xml {
        let id = guid(n.attribute("Id").unwrap());
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
    assert_eq!(catalog().skus().len(), xml.len());
    for n in xml {
        let id = guid(n.attribute("Id").unwrap());
        let s = catalog().sku(&id).expect("SKU present");
        assert_eq!(s.name, n.attribute("DisplayName").unwrap());
        assert_eq!(s.kms_item_id, parent_id(n));
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
        assert_eq!(c.name, n.attribute("DisplayName").unwrap());
        let group = n
            .attribute("GroupId")
            .filter(|g| !g.is_empty())
            .map(|g| g.parse().unwrap());
        assert_eq!(c.group_id, group, "{}", c.name);
        let activates: Vec<Uuid> = n
            .children()
            .filter(|a| a.has_tag_name("Activate"))
            .map(|a| guid(a.attribute("KmsItem").unwrap()))
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
    // Misspelled attribute `DefaultKmsprotocol` on Office 2024 is still read.
    let o2024 = c
        .kms_item(&uuid!("1b4db7eb-4057-5ddf-91e0-36dec72071f5"))
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
    assert_eq!(def.group_id, Some(206));
    assert!(!def.is_lab && !def.is_preview && def.can_make_epid());
    // Newest non-lab key activating Windows 10 volume: "Windows 10 2019".
    assert_eq!(def.name, "Windows 10 2019");
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
        Some(206)
    );

    let s2019 = uuid!("8449b1fb-f0ea-497a-99ab-66ca96e9a0f5");
    assert_eq!(
        c.default_csvlk_for(&s2019).unwrap().id,
        well_known::CSVLK_WINDOWS_SERVER_2019
    );
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
