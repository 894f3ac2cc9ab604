//! Strict mode like a genuine host: for every host key group of the catalog, the editions it
//! must activate (down-level included) are granted with that key's one ePID, every other
//! request gets 0xC004F042. The Microsoft matrices (docs/catalog.md) are pinned by name.

use std::collections::{BTreeMap, BTreeSet};

use kms_catalog::well_known::{OFFICE_2010, OFFICE_2013, WINDOWS};
use kms_catalog::CatalogData;
use kms_core::policy::ProductPolicy;
use kms_core::state::HR_KMS_ID_NOT_ALLOWED;
use kms_core::{
    ActivationOutcome, ActivationRequest, CatalogUpdate, Command, CommandResult, HostIdentity,
    HostKeys, Policy, State, UnixMillis,
};
use uuid::{uuid, Uuid};

const T0: UnixMillis = 1_750_000_000_000;

fn identity(catalog: &CatalogData) -> HostIdentity {
    HostIdentity {
        cluster_id: Uuid::from_u128(0xC1),
        hwid: [1, 2, 3, 4, 5, 6, 7, 8],
        host_build: 26100,
        lcid: 1033,
        epids: catalog
            .host_keys
            .iter()
            .map(|k| (k.id, format!("EPID-{}", k.id)))
            .collect(),
    }
}

fn strict_state(catalog: &CatalogData) -> State {
    let mut s = State::default();
    s.apply(&Command::InitIdentity(identity(catalog)));
    assert_eq!(
        s.apply(&Command::InitCatalog(CatalogUpdate {
            catalog: catalog.clone(),
            epids: BTreeMap::new(),
        })),
        CommandResult::Catalog(Ok(true))
    );
    assert_eq!(
        s.apply(&Command::SetPolicy(Policy {
            product_policy: ProductPolicy::Strict,
            ..Policy::default()
        })),
        CommandResult::Policy(Ok(()))
    );
    s
}

fn install(s: &mut State, app: Uuid, key: Uuid) {
    assert_eq!(
        s.apply(&Command::SetHostKeys(HostKeys {
            keys: [(app, key)].into(),
            epids: BTreeMap::new(),
            host_build: None,
        })),
        CommandResult::HostKeys(Ok(()))
    );
}

fn request(catalog: &CatalogData, kms: Uuid, client: u128) -> ActivationRequest {
    let item = catalog.kms_item(&kms).expect("KMS id in catalog");
    let sku = catalog
        .skus
        .iter()
        .find(|s| s.kms_item_id == kms && !s.is_preview)
        .map_or(Uuid::nil(), |s| s.id);
    ActivationRequest {
        application_id: item.application_id,
        sku_id: sku,
        kms_counted_id: kms,
        client_machine_id: Uuid::from_u128(0x7000_0000_0000_4000_8000_0000_0000_0000 | client),
        previous_client_machine_id: Uuid::nil(),
        required_client_count: item.n_count_policy,
        license_status: 2,
        binding_expiration: 43_200,
        is_client_vm: false,
        request_time: (T0 + 11_644_473_600_000) * 10_000,
        workstation_name: format!("pc{client}"),
        protocol_major: 6,
        protocol_minor: 0,
        client_address: None,
    }
}

fn outcome(s: &mut State, req: ActivationRequest) -> ActivationOutcome {
    match s.apply(&Command::Activate {
        now: T0,
        requests: vec![req],
    }) {
        CommandResult::Activations(mut v) => v.remove(0),
        other => panic!("{other:?}"),
    }
}

/// Every host key that can be installed, for every KMS id of its application.
#[test]
fn every_host_key_activates_exactly_what_it_covers() {
    let catalog = CatalogData::builtin();
    let mut checked = 0;
    for key in catalog
        .host_keys
        .iter()
        .filter(|k| k.installable && k.can_make_epid())
    {
        let mut s = strict_state(&catalog);
        install(&mut s, key.application_id, key.id);
        let mut epids = BTreeSet::new();
        for (i, item) in catalog
            .kms_items
            .iter()
            .filter(|i| i.application_id == key.application_id)
            .enumerate()
        {
            let must = key.activates(&item.id) && !item.is_retail && !item.is_preview;
            match outcome(&mut s, request(&catalog, item.id, i as u128)) {
                ActivationOutcome::Granted(g) => {
                    assert!(must, "{} granted {}", key.name, item.name);
                    epids.insert(g.epid);
                }
                ActivationOutcome::Refused(r) => {
                    assert!(!must, "{} refused {}: {}", key.name, item.name, r.reason);
                    assert_eq!(r.hresult, HR_KMS_ID_NOT_ALLOWED, "{}", r.reason);
                }
            }
            checked += 1;
        }
        // One ePID per application: the installed key's.
        assert_eq!(
            epids.into_iter().collect::<Vec<_>>(),
            vec![format!("EPID-{}", key.id)],
            "{}",
            key.name
        );
    }
    assert!(checked > 100, "{checked}");
}

const WS2025: Uuid = uuid!("84e331f6-4279-48c4-ab10-b75139181351");
const WS2022: Uuid = uuid!("661f7658-7035-4b4c-9f35-010682943ec2");
const WS2019: Uuid = uuid!("2e7a9ad1-a849-4b56-babe-17d5a29fe4b4");
const WS2016: Uuid = uuid!("d6992aac-29e7-452a-bf10-bbfb8ccabe59");
const WIN10: Uuid = uuid!("0724cb7d-3437-4cb7-93cb-830375d0079d");
const OFFICE2024: Uuid = uuid!("f3d89bbf-c0ec-47ce-a8fa-e5a5f97e447f");
const OFFICE2021: Uuid = uuid!("47f3b983-7c53-4d45-abc6-bcd91e2dd90a");
const OFFICE2019: Uuid = uuid!("70512334-47b4-44db-a233-be5ea33b914c");
const OFFICE2016: Uuid = uuid!("98ebfe73-2084-4c97-932c-c0cd1643bea7");
const OFFICE2010: Uuid = uuid!("bfe7a195-4f8f-4f0b-a622-cf13c7d16864");

// KMS counted ids by what a client runs.
const K_S2025: Uuid = uuid!("907f1f65-adcd-4a2e-95bc-4bf500bc6e58");
const K_S2022: Uuid = uuid!("b74263e4-0f92-46c6-bcf8-c11d5efe2959");
const K_S2019: Uuid = uuid!("8449b1fb-f0ea-497a-99ab-66ca96e9a0f5");
const K_S2016: Uuid = uuid!("6e9fc069-257d-4bc4-b4a7-750514d32743");
const K_S2012R2: Uuid = uuid!("8456efd3-0c04-4089-8740-5b7238535a65");
const K_S2008R2B: Uuid = uuid!("ca87f5b6-cd46-40c0-b06d-8ecd57a4373f");
const K_W11_LTSC2024: Uuid = uuid!("e85ee727-69c4-4528-99d2-216b0f065e38");
const K_W10_LTSC2021: Uuid = uuid!("3b576817-7b75-4362-9e13-223f2d9e9c97");
const K_W10_LTSC2019: Uuid = uuid!("11b15659-e603-4cf1-9c1f-f0ec01b81888");
const K_W10: Uuid = uuid!("58e2134f-8e11-4d17-9cb2-91069c151148");
const K_W81: Uuid = uuid!("cb8fc780-2c05-495a-9710-85afffc904d7");
const K_W7: Uuid = uuid!("7fde5219-fbfa-484a-82c9-34d1ad53e856");
const K_W10_RETAIL: Uuid = uuid!("e1c51358-fe3e-4203-a4a2-3b6b20c9734e");
const K_O2024: Uuid = uuid!("a8973cb5-bf03-0a4c-9cef-703099645ab3");
const K_O2021: Uuid = uuid!("86d50b16-4808-41af-b83b-b338274318b2");
const K_O2019: Uuid = uuid!("617d9eb1-ef36-4f82-86e0-a65ae07b96c6");
const K_O2016: Uuid = uuid!("85b5f61b-320b-4be3-814a-b76b2bfafc82");
const K_O2013: Uuid = uuid!("e6a6f1bf-9d40-40c3-aa9f-c77ba21578c0");
const K_O2010: Uuid = uuid!("e85af946-2e25-47b7-83e1-bebcebeac611");

/// The matrices of Microsoft's "KMS activation planning" tables (and Office's), by name.
#[test]
fn microsoft_matrices_are_pinned() {
    let catalog = CatalogData::builtin();
    let cases: &[(Uuid, Uuid, &[Uuid], &[Uuid])] = &[
        (
            WINDOWS,
            WS2025,
            &[
                K_S2025,
                K_S2022,
                K_S2019,
                K_S2016,
                K_S2012R2,
                K_S2008R2B,
                K_W11_LTSC2024,
                K_W10_LTSC2021,
                K_W10_LTSC2019,
                K_W10,
                K_W81,
                K_W7,
            ],
            &[K_W10_RETAIL],
        ),
        (
            WINDOWS,
            WS2022,
            &[
                K_S2022,
                K_S2019,
                K_S2016,
                K_S2012R2,
                K_S2008R2B,
                K_W10_LTSC2021,
                K_W10_LTSC2019,
                K_W10,
                K_W81,
                K_W7,
            ],
            &[K_S2025, K_W11_LTSC2024, K_W10_RETAIL],
        ),
        (
            WINDOWS,
            WS2019,
            &[
                K_S2019,
                K_S2016,
                K_S2012R2,
                K_S2008R2B,
                K_W10_LTSC2019,
                K_W10,
                K_W81,
                K_W7,
            ],
            &[
                K_S2025,
                K_S2022,
                K_W11_LTSC2024,
                K_W10_LTSC2021,
                K_W10_RETAIL,
            ],
        ),
        (
            WINDOWS,
            WS2016,
            &[K_S2016, K_S2012R2, K_S2008R2B, K_W10, K_W81, K_W7],
            &[K_S2019, K_S2022, K_S2025, K_W10_LTSC2019],
        ),
        (
            WINDOWS,
            WIN10,
            &[K_W10, K_W81, K_W7],
            &[K_S2016, K_S2019, K_W10_LTSC2019],
        ),
        (
            OFFICE_2013,
            OFFICE2024,
            &[K_O2024, K_O2021, K_O2019, K_O2016, K_O2013],
            &[],
        ),
        (
            OFFICE_2013,
            OFFICE2021,
            &[K_O2021, K_O2019, K_O2016, K_O2013],
            &[K_O2024],
        ),
        (
            OFFICE_2013,
            OFFICE2019,
            &[K_O2019, K_O2016, K_O2013],
            &[K_O2024, K_O2021],
        ),
        (
            OFFICE_2013,
            OFFICE2016,
            &[K_O2016, K_O2013],
            &[K_O2024, K_O2021, K_O2019],
        ),
        (OFFICE_2010, OFFICE2010, &[K_O2010], &[]),
    ];
    for (n, (app, key, must, must_not)) in cases.iter().enumerate() {
        let mut s = strict_state(&catalog);
        install(&mut s, *app, *key);
        for (i, kms) in must.iter().enumerate() {
            let req = request(&catalog, *kms, (n * 100 + i) as u128);
            match outcome(&mut s, req) {
                ActivationOutcome::Granted(g) => assert_eq!(g.epid, format!("EPID-{key}")),
                ActivationOutcome::Refused(r) => panic!("{key} must activate {kms}: {}", r.reason),
            }
        }
        for (i, kms) in must_not.iter().enumerate() {
            let req = request(&catalog, *kms, (n * 100 + 50 + i) as u128);
            match outcome(&mut s, req) {
                ActivationOutcome::Refused(r) => assert_eq!(r.hresult, HR_KMS_ID_NOT_ALLOWED),
                ActivationOutcome::Granted(_) => panic!("{key} must not activate {kms}"),
            }
        }
    }
}

/// Without any host key configured the newest keys answer, one ePID per application; a
/// mismatched application id and an unknown KMS id are refused.
#[test]
fn defaults_answer_with_one_epid_per_application() {
    let catalog = CatalogData::builtin();
    let mut s = strict_state(&catalog);
    let mut by_app: BTreeMap<Uuid, BTreeSet<String>> = BTreeMap::new();
    for (i, item) in catalog.kms_items.iter().enumerate() {
        if let ActivationOutcome::Granted(g) =
            outcome(&mut s, request(&catalog, item.id, i as u128))
        {
            by_app
                .entry(item.application_id)
                .or_default()
                .insert(g.epid);
        }
    }
    assert_eq!(by_app[&WINDOWS], [format!("EPID-{WS2025}")].into());
    assert_eq!(by_app[&OFFICE_2013], [format!("EPID-{OFFICE2024}")].into());
    assert_eq!(by_app[&OFFICE_2010], [format!("EPID-{OFFICE2010}")].into());
    let mut wrong_app = request(&catalog, K_S2019, 900);
    wrong_app.application_id = OFFICE_2013;
    let mut unknown = request(&catalog, K_S2019, 901);
    unknown.kms_counted_id = Uuid::from_u128(0xDEAD);
    let mut wrong_sku = request(&catalog, K_S2019, 902);
    wrong_sku.sku_id = catalog
        .skus
        .iter()
        .find(|x| x.kms_item_id == K_O2016)
        .unwrap()
        .id;
    // An Insider Preview edition inside the Windows 10/11 volume group.
    let mut preview = request(&catalog, K_W10, 903);
    preview.sku_id = catalog
        .skus
        .iter()
        .find(|x| x.kms_item_id == K_W10 && x.is_preview)
        .unwrap()
        .id;
    for req in [wrong_app, unknown, wrong_sku, preview] {
        match outcome(&mut s, req) {
            ActivationOutcome::Refused(r) => assert_eq!(r.hresult, HR_KMS_ID_NOT_ALLOWED),
            ActivationOutcome::Granted(g) => panic!("granted {g:?}"),
        }
    }
}

/// A replicated catalog replaces the compiled-in facts: a product the new catalog adds to a
/// key activates, a bad catalog changes nothing, and both survive a snapshot.
#[test]
fn set_catalog_changes_decisions_and_survives_snapshots() {
    let catalog = CatalogData::builtin();
    let mut s = strict_state(&catalog);
    install(&mut s, WINDOWS, WS2019);
    assert!(matches!(
        outcome(&mut s, request(&catalog, K_S2022, 1)),
        ActivationOutcome::Refused(_)
    ));
    let mut newer = catalog.clone();
    newer.version = "test.2".into();
    newer.source = "unit test".into();
    let key = newer.host_keys.iter_mut().find(|k| k.id == WS2019).unwrap();
    key.activates.push(K_S2022);
    let newer = newer.normalized();
    let mut bad = newer.clone();
    bad.host_keys[0].activates.push(Uuid::from_u128(1));
    let before = s.to_snapshot();
    match s.apply(&Command::SetCatalog(CatalogUpdate {
        catalog: bad,
        epids: BTreeMap::new(),
    })) {
        CommandResult::Catalog(Err(e)) => assert!(e.contains("host_keys[0].activates"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.to_snapshot(), before, "a refused catalog changes nothing");
    assert_eq!(
        s.apply(&Command::SetCatalog(CatalogUpdate {
            catalog: newer.clone(),
            epids: BTreeMap::new(),
        })),
        CommandResult::Catalog(Ok(true))
    );
    assert!(matches!(
        outcome(&mut s, request(&catalog, K_S2022, 2)),
        ActivationOutcome::Granted(_)
    ));
    let mut restored = State::from_snapshot(&s.to_snapshot()).unwrap();
    assert_eq!(restored.catalog().catalog().unwrap().version, "test.2");
    assert_eq!(
        restored.catalog().configured_host_keys().get(&WINDOWS),
        Some(&WS2019),
        "the configured key survives an import that keeps it"
    );
    assert!(matches!(
        outcome(&mut restored, request(&catalog, K_S2022, 3)),
        ActivationOutcome::Granted(_)
    ));
    // InitCatalog after that is a no-op: the imported catalog stays.
    assert_eq!(
        restored.apply(&Command::InitCatalog(CatalogUpdate {
            catalog,
            epids: BTreeMap::new(),
        })),
        CommandResult::Catalog(Ok(false))
    );
    assert_eq!(restored.catalog().catalog().unwrap().version, "test.2");
}

/// The ePIDs claim a host build every installed key can run on: a Windows Server 2019 key is
/// not hosted on Server 2025 (Microsoft's "CSVLK can be hosted on"), so installing it moves
/// the host to build 17763 and renews the installed keys' ePIDs on it, one build for all.
#[test]
fn host_build_follows_the_installed_keys() {
    let catalog = CatalogData::builtin();
    let generated = HostIdentity::generate(T0, [3; 32]);
    assert_eq!(generated.host_build, 26100);
    let mut s = State::default();
    s.apply(&Command::InitIdentity(generated.clone()));
    s.apply(&Command::InitCatalog(CatalogUpdate {
        catalog: catalog.clone(),
        epids: BTreeMap::new(),
    }));
    let update = kms_core::catalog::host_keys_update(
        &generated,
        &catalog,
        [(WINDOWS, WS2019), (OFFICE_2013, OFFICE2016)].into(),
        T0,
        [4; 32],
    );
    assert_eq!(update.host_build, Some(17763));
    assert_eq!(
        update.epids.keys().copied().collect::<BTreeSet<_>>(),
        [WS2019, OFFICE2016, OFFICE2010].into()
    );
    assert_eq!(
        s.apply(&Command::SetHostKeys(update)),
        CommandResult::HostKeys(Ok(()))
    );
    let identity = s.identity().unwrap().clone();
    assert_eq!(identity.host_build, 17763);
    for key in [WS2019, OFFICE2016, OFFICE2010] {
        let epid = &identity.epids[&key];
        assert!(epid.contains("-17763.0000-"), "{epid}");
        kms_core::identity::validate_epid(epid).unwrap();
    }
    // Back to the newest keys: the build may stay (2025 keys are hosted on 2019 too).
    let update =
        kms_core::catalog::host_keys_update(&identity, &catalog, BTreeMap::new(), T0, [5; 32]);
    assert_eq!(update.host_build, None);
    assert!(update.epids.contains_key(&WS2025), "{:?}", update.epids);
}
