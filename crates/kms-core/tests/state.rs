//! `State::apply` against the rules of a genuine KMS host (protocol sheet sections 3, 8, 9).

use std::collections::BTreeMap;

use kms_catalog::well_known::{CSVLK_WINDOWS_SERVER_2019, OFFICE_2010, OFFICE_2013, WINDOWS};
use kms_core::policy::ProductPolicy;
use kms_core::registry::ClientQuery;
use kms_core::state::{SnapshotError, HR_CLOCK_SKEW, HR_INVALID_DATA, HR_KMS_ID_NOT_ALLOWED};
use kms_core::{
    ActivationOutcome, ActivationRequest, CatalogUpdate, Command, CommandResult, Grant,
    HostIdentity, HostKeys, Policy, Refusal, State, UnixMillis, CMID_LIFETIME_MS, DAY_MS,
};
use uuid::{uuid, Uuid};

const T0: UnixMillis = 1_700_000_000_000;
const MINUTE_MS: u64 = 60_000;

// KMS counted ids from the catalog (protocol sheet 9.2).
const KMS_WIN10_2019: Uuid = uuid!("11b15659-e603-4cf1-9c1f-f0ec01b81888");
const KMS_SERVER_2019: Uuid = uuid!("8449b1fb-f0ea-497a-99ab-66ca96e9a0f5");
const KMS_SERVER_2016: Uuid = uuid!("6e9fc069-257d-4bc4-b4a7-750514d32743");
const KMS_OFFICE_2016: Uuid = uuid!("85b5f61b-320b-4be3-814a-b76b2bfafc82");
const KMS_OFFICE_2010: Uuid = uuid!("e85af946-2e25-47b7-83e1-bebcebeac611");
const CSVLK_OFFICE_2016: Uuid = uuid!("98ebfe73-2084-4c97-932c-c0cd1643bea7");
const CSVLK_WINDOWS_SERVER_2025: Uuid = uuid!("84e331f6-4279-48c4-ab10-b75139181351");
const KMS_SERVER_2022: Uuid = uuid!("b74263e4-0f92-46c6-bcf8-c11d5efe2959");
const KMS_OFFICE_2019: Uuid = uuid!("617d9eb1-ef36-4f82-86e0-a65ae07b96c6");
const KMS_OFFICE_2013: Uuid = uuid!("e6a6f1bf-9d40-40c3-aa9f-c77ba21578c0");
const KMS_WIN10_RETAIL: Uuid = uuid!("e1c51358-fe3e-4203-a4a2-3b6b20c9734e");
const SKU_SOME: Uuid = uuid!("00000000-0000-0000-0000-00000000beef");

/// A hand-made identity with an ePID for every CSVLK of the catalog (ePID text encodes the
/// CSVLK id so tests can tell which one answered).
fn identity() -> HostIdentity {
    let epids: BTreeMap<Uuid, String> = kms_catalog::CatalogData::builtin()
        .host_keys
        .iter()
        .map(|c| (c.id, format!("EPID-{}", c.id)))
        .collect();
    HostIdentity {
        cluster_id: Uuid::from_u128(0xC1u128),
        hwid: [0x3A, 0x1C, 0x04, 0x96, 0x00, 0xB6, 0x00, 0x76],
        host_build: 17763,
        lcid: 1033,
        epids,
    }
}

fn filetime(unix_ms: UnixMillis) -> u64 {
    (unix_ms + 11_644_473_600_000) * 10_000
}

fn cmid(n: u128) -> Uuid {
    Uuid::from_u128(0x7000_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn request(app: Uuid, kms: Uuid, n: u32, client: u128, now: UnixMillis) -> ActivationRequest {
    ActivationRequest {
        application_id: app,
        sku_id: SKU_SOME,
        kms_counted_id: kms,
        client_machine_id: cmid(client),
        previous_client_machine_id: Uuid::nil(),
        required_client_count: n,
        license_status: 2,
        binding_expiration: 43_200,
        is_client_vm: false,
        request_time: filetime(now),
        workstation_name: format!("pc{client}.corp.example"),
        protocol_major: 6,
        protocol_minor: 0,
        client_address: Some(format!("10.0.0.{}:49152", client % 250).parse().unwrap()),
    }
}

fn win10(client: u128, now: UnixMillis) -> ActivationRequest {
    request(WINDOWS, KMS_WIN10_2019, 25, client, now)
}

fn server(client: u128, now: UnixMillis) -> ActivationRequest {
    request(WINDOWS, KMS_SERVER_2019, 5, client, now)
}

fn office(client: u128, now: UnixMillis) -> ActivationRequest {
    request(OFFICE_2013, KMS_OFFICE_2016, 5, client, now)
}

fn builtin_catalog() -> Command {
    Command::InitCatalog(CatalogUpdate {
        catalog: kms_catalog::CatalogData::builtin(),
        epids: BTreeMap::new(),
    })
}

fn ready_state() -> State {
    let mut s = State::default();
    assert_eq!(
        s.apply(&Command::InitIdentity(identity())),
        CommandResult::Identity { created: true }
    );
    assert_eq!(
        s.apply(&builtin_catalog()),
        CommandResult::Catalog(Ok(true))
    );
    s
}

fn activate(
    s: &mut State,
    now: UnixMillis,
    reqs: Vec<ActivationRequest>,
) -> Vec<ActivationOutcome> {
    match s.apply(&Command::Activate {
        now,
        requests: reqs,
    }) {
        CommandResult::Activations(v) => v,
        other => panic!("unexpected result {other:?}"),
    }
}

fn one(s: &mut State, now: UnixMillis, req: ActivationRequest) -> ActivationOutcome {
    let mut v = activate(s, now, vec![req]);
    assert_eq!(v.len(), 1);
    v.remove(0)
}

fn grant(outcome: ActivationOutcome) -> Grant {
    match outcome {
        ActivationOutcome::Granted(g) => g,
        ActivationOutcome::Refused(r) => panic!("refused: {r:?}"),
    }
}

fn refusal(outcome: ActivationOutcome) -> Refusal {
    match outcome {
        ActivationOutcome::Refused(r) => r,
        ActivationOutcome::Granted(g) => panic!("granted: {g:?}"),
    }
}

fn count(s: &mut State, now: UnixMillis, req: ActivationRequest) -> u32 {
    grant(one(s, now, req)).current_count
}

fn set_policy(s: &mut State, policy: Policy) {
    assert_eq!(
        s.apply(&Command::SetPolicy(policy)),
        CommandResult::Policy(Ok(()))
    );
}

// ---------------------------------------------------------------------------------------
// Identity and policy commands

#[test]
fn init_identity_first_wins_replace_overrides() {
    let mut s = State::default();
    assert!(s.identity().is_none());
    let first = identity();
    let mut second = identity();
    second.hwid = [1; 8];
    assert_eq!(
        s.apply(&Command::InitIdentity(first.clone())),
        CommandResult::Identity { created: true }
    );
    assert_eq!(
        s.apply(&Command::InitIdentity(second.clone())),
        CommandResult::Identity { created: false }
    );
    assert_eq!(s.identity(), Some(&first));
    s.apply(&builtin_catalog());
    s.apply(&Command::ReplaceIdentity(second.clone()));
    assert_eq!(s.identity(), Some(&second));
    let g = grant(one(&mut s, T0, win10(1, T0)));
    assert_eq!(g.hwid, [1; 8]);
}

#[test]
fn set_policy_validates_and_keeps_old_on_error() {
    let mut s = ready_state();
    let good = Policy {
        activation_interval: 60,
        renewal_interval: 1440,
        ..Policy::default()
    };
    set_policy(&mut s, good.clone());
    assert_eq!(s.policy(), &good);
    let bad = Policy {
        activation_interval: 5,
        ..Policy::default()
    };
    match s.apply(&Command::SetPolicy(bad)) {
        CommandResult::Policy(Err(msg)) => assert!(msg.contains("activation_interval"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.policy(), &good);
    // Strict needs no list any more: the installed host keys decide (default: newest).
    let strict = Policy {
        product_policy: ProductPolicy::Strict,
        ..Policy::default()
    };
    assert_eq!(
        s.apply(&Command::SetPolicy(strict)),
        CommandResult::Policy(Ok(()))
    );
    set_policy(&mut s, good.clone());
    // Intervals from the policy go into grants.
    let g = grant(one(&mut s, T0, win10(1, T0)));
    assert_eq!((g.activation_interval, g.renewal_interval), (60, 1440));
}

// ---------------------------------------------------------------------------------------
// Decision order

#[test]
fn no_identity_refuses_and_counts_nothing() {
    let mut s = State::default();
    let r = refusal(one(&mut s, T0, win10(1, T0)));
    assert_eq!(r.hresult, HR_INVALID_DATA);
    assert_eq!(r.reason, "host identity not initialised");
    assert_eq!(s.client_count(), 0);
    assert_eq!(s.current_count(&WINDOWS, T0), 0);
    assert!(s.counts(T0).is_empty());
    assert_eq!(s.statistics().total_requests, 1);
    assert_eq!(s.statistics().failed_requests, 1);
    assert_eq!(s.statistics().refusals.get(&HR_INVALID_DATA), Some(&1));
}

#[test]
fn protocol_versions() {
    let mut s = ready_state();
    for (i, major) in [4u16, 5, 6].into_iter().enumerate() {
        let mut r = win10(i as u128, T0);
        r.protocol_major = major;
        grant(one(&mut s, T0, r));
    }
    for (major, minor) in [(3u16, 0u16), (7, 0), (0, 0), (6, 1), (4, 1)] {
        let mut r = win10(100, T0);
        r.protocol_major = major;
        r.protocol_minor = minor;
        let refused = refusal(one(&mut s, T0, r));
        assert_eq!(refused.hresult, HR_INVALID_DATA, "{major}.{minor}");
    }
    assert_eq!(s.current_count(&WINDOWS, T0), 3);
    assert_eq!(s.client_count(), 3);
}

#[test]
fn n_over_1000_is_refused() {
    let mut s = ready_state();
    let mut r = win10(1, T0);
    r.required_client_count = 1001;
    assert_eq!(refusal(one(&mut s, T0, r)).hresult, HR_INVALID_DATA);
    let mut r = win10(1, T0);
    r.required_client_count = u32::MAX;
    assert_eq!(refusal(one(&mut s, T0, r)).hresult, HR_INVALID_DATA);
    assert_eq!(s.client_count(), 0);
    assert!(
        s.counts(T0).is_empty(),
        "a refused N must not raise the capacity"
    );
    let mut r = win10(1, T0);
    r.required_client_count = 1000;
    let g = grant(one(&mut s, T0, r));
    assert_eq!(g.current_count, 1);
    assert!(!g.activated);
    assert_eq!(s.counts(T0)[0].capacity, 2000);
}

#[test]
fn strict_policy_grants_what_the_installed_host_keys_activate() {
    let mut s = ready_state();
    // The README's example in the old form: licensed CSVLKs become host keys per application.
    set_policy(
        &mut s,
        Policy {
            product_policy: ProductPolicy::Strict,
            licensed_csvlks: vec![CSVLK_WINDOWS_SERVER_2019, CSVLK_OFFICE_2016],
            ..Policy::default()
        },
    );
    assert!(
        s.policy().licensed_csvlks.is_empty(),
        "migrated to host keys"
    );
    assert_eq!(
        s.catalog().configured_host_keys().get(&WINDOWS),
        Some(&CSVLK_WINDOWS_SERVER_2019)
    );
    // Down-level: Server 2019, Server 2016, Windows 10 (LTSC 2019 and Pro/Enterprise),
    // Office 2016 and 2013 all activate, each Windows one with the one Windows ePID.
    for req in [
        server(1, T0),
        win10(2, T0),
        request(WINDOWS, KMS_SERVER_2016, 5, 3, T0),
    ] {
        let g = grant(one(&mut s, T0, req));
        assert_eq!(g.epid, format!("EPID-{CSVLK_WINDOWS_SERVER_2019}"));
    }
    for req in [
        office(4, T0),
        request(OFFICE_2013, KMS_OFFICE_2013, 5, 5, T0),
    ] {
        let g = grant(one(&mut s, T0, req));
        assert_eq!(g.epid, format!("EPID-{CSVLK_OFFICE_2016}"));
    }
    // Newer than the key, unknown, retail, mismatched application: 0xC004F042.
    for req in [
        request(WINDOWS, KMS_SERVER_2022, 5, 10, T0),
        request(OFFICE_2013, KMS_OFFICE_2019, 5, 11, T0),
        request(WINDOWS, Uuid::from_u128(0xDEAD), 25, 12, T0),
        request(WINDOWS, KMS_WIN10_RETAIL, 25, 13, T0),
        request(OFFICE_2013, KMS_SERVER_2019, 5, 14, T0),
    ] {
        let r = refusal(one(&mut s, T0, req));
        assert_eq!(r.hresult, HR_KMS_ID_NOT_ALLOWED, "{}", r.reason);
    }
    // Refused requests stay out of the registry and the caches.
    assert_eq!(s.client_count(), 5);
    assert!(s.client(&cmid(10)).is_empty());
    assert_eq!(
        s.statistics().refusals.get(&HR_KMS_ID_NOT_ALLOWED),
        Some(&5)
    );
    // Installing the Windows Server 2025 key opens Server 2022.
    assert_eq!(
        s.apply(&Command::SetHostKeys(HostKeys {
            keys: [(WINDOWS, CSVLK_WINDOWS_SERVER_2025)].into(),
            epids: BTreeMap::new(),
            host_build: None,
        })),
        CommandResult::HostKeys(Ok(()))
    );
    let g = grant(one(
        &mut s,
        T0,
        request(WINDOWS, KMS_SERVER_2022, 5, 10, T0),
    ));
    assert_eq!(g.epid, format!("EPID-{CSVLK_WINDOWS_SERVER_2025}"));
    // A key of another application is refused and changes nothing.
    assert!(matches!(
        s.apply(&Command::SetHostKeys(HostKeys {
            keys: [(WINDOWS, CSVLK_OFFICE_2016)].into(),
            epids: BTreeMap::new(),
            host_build: None,
        })),
        CommandResult::HostKeys(Err(_))
    ));
    assert_eq!(
        s.catalog().configured_host_keys().get(&WINDOWS),
        Some(&CSVLK_WINDOWS_SERVER_2025)
    );
}

#[test]
fn a_history_without_catalog_keeps_its_clients_and_init_catalog_first_wins() {
    // A 0.1 data dir replays the log behind its snapshot before the leader's InitCatalog:
    // those activations were granted by the old build and stay granted, in the
    // application's own list, the same on every node.
    let mut s = State::default();
    let id = identity();
    s.apply(&Command::InitIdentity(id.clone()));
    let g = grant(one(&mut s, T0, win10(1, T0)));
    assert_eq!(g.current_count, 1);
    assert_eq!(Some(&g.epid), id.epids.values().next());
    let mut other = State::default();
    other.apply(&Command::InitIdentity(id));
    assert_eq!(grant(one(&mut other, T0, win10(1, T0))), g);
    // Without an identity it is still refused.
    let mut bare = State::default();
    assert_eq!(
        refusal(one(&mut bare, T0, win10(1, T0))).hresult,
        HR_INVALID_DATA
    );
    assert_eq!(
        s.apply(&builtin_catalog()),
        CommandResult::Catalog(Ok(true))
    );
    assert_eq!(
        s.apply(&builtin_catalog()),
        CommandResult::Catalog(Ok(false))
    );
    // The client counted before the catalog is the same client afterwards.
    assert_eq!(count(&mut s, T0, win10(1, T0)), 1);
}

#[test]
fn open_policy_grants_unknown_kms_ids() {
    let mut s = ready_state();
    let g = grant(one(
        &mut s,
        T0,
        request(WINDOWS, Uuid::from_u128(0xDEAD), 25, 1, T0),
    ));
    assert_eq!(g.current_count, 1);
    assert!(g.epid.starts_with("EPID-"));
}

#[test]
fn clock_skew_check() {
    let mut s = ready_state();
    // On by default (4 hours, like a genuine host); switched off, a client a year off is
    // fine.
    let mut r = win10(1, T0);
    r.request_time = filetime(T0 - 365 * DAY_MS);
    assert_eq!(refusal(one(&mut s, T0, r.clone())).hresult, HR_CLOCK_SKEW);
    set_policy(
        &mut s,
        Policy {
            max_clock_skew_minutes: None,
            ..Policy::default()
        },
    );
    grant(one(&mut s, T0, r));

    set_policy(
        &mut s,
        Policy {
            max_clock_skew_minutes: Some(240),
            ..Policy::default()
        },
    );
    for (client, offset, ok) in [
        (2u128, 240 * MINUTE_MS as i64, true),
        (3, -(240 * MINUTE_MS as i64), true),
        (4, 240 * MINUTE_MS as i64 + 1, false),
        (5, -(241 * MINUTE_MS as i64), false),
        (6, 365 * DAY_MS as i64, false),
    ] {
        let mut r = win10(client, T0);
        r.request_time = filetime(T0.checked_add_signed(offset).unwrap());
        let outcome = one(&mut s, T0, r);
        if ok {
            grant(outcome);
        } else {
            assert_eq!(refusal(outcome).hresult, HR_CLOCK_SKEW, "offset {offset}");
        }
    }
    // FILETIME 0 (year 1601) and u64::MAX must not overflow.
    for ft in [0, u64::MAX] {
        let mut r = win10(7, T0);
        r.request_time = ft;
        assert_eq!(refusal(one(&mut s, T0, r)).hresult, HR_CLOCK_SKEW);
    }
    assert_eq!(s.current_count(&WINDOWS, T0), 3);
}

#[test]
fn missing_epid_is_refused_without_counting() {
    let mut s = State::default();
    let mut id = identity();
    id.epids.clear();
    s.apply(&Command::InitIdentity(id));
    s.apply(&builtin_catalog());
    let r = refusal(one(&mut s, T0, win10(1, T0)));
    assert_eq!(r.hresult, HR_INVALID_DATA);
    assert!(r.reason.contains("ePID"), "{}", r.reason);
    assert_eq!(s.current_count(&WINDOWS, T0), 0);
    assert_eq!(s.client_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Counting

#[test]
fn first_client_counts_one_and_same_cmid_stays_one() {
    let mut s = ready_state();
    let g = grant(one(&mut s, T0, win10(1, T0)));
    assert_eq!(g.current_count, 1);
    assert!(!g.activated, "1 < 25: not activated, but still a grant");
    assert_eq!(count(&mut s, T0 + 1, win10(1, T0 + 1)), 1);
    assert_eq!(count(&mut s, T0 + 2, win10(1, T0 + 2)), 1);
    assert_eq!(s.client_count(), 1);
    assert_eq!(s.client(&cmid(1))[0].request_count, 3);
}

#[test]
fn sixty_windows_clients_cap_at_fifty() {
    let mut s = ready_state();
    let mut counts = Vec::new();
    let mut activated = Vec::new();
    for i in 0..60u128 {
        let now = T0 + i as u64 * 1000;
        let g = grant(one(&mut s, now, win10(i, now)));
        counts.push(g.current_count);
        activated.push(g.activated);
    }
    let expected: Vec<u32> = (1..=50).chain([50; 10]).collect();
    assert_eq!(counts, expected);
    // Activated from the 25th client on (count >= N).
    assert_eq!(activated.iter().position(|a| *a), Some(24));
    assert!(activated[24..].iter().all(|a| *a));
    let c = &s.counts(T0 + 60_000)[0];
    assert_eq!(c.application_id, WINDOWS);
    assert_eq!(c.name, "Windows");
    assert_eq!((c.current_count, c.capacity, c.max_n_seen), (50, 50, 25));
    // The registry keeps all 60 even though only 50 count.
    assert_eq!(s.client_count(), 60);
}

#[test]
fn server_only_host_caches_ten_then_grows_with_client_os() {
    let mut s = ready_state();
    let mut t = T0;
    let mut last = 0;
    for i in 0..15u128 {
        t += 1000;
        // Mix two server generations: same application list.
        let req = if i % 2 == 0 {
            server(i, t)
        } else {
            request(WINDOWS, KMS_SERVER_2016, 5, i, t)
        };
        let g = grant(one(&mut s, t, req));
        assert_eq!(g.activated, g.current_count >= 5);
        last = g.current_count;
    }
    assert_eq!(last, 10);
    assert_eq!(s.counts(t)[0].capacity, 10);
    t += 1000;
    assert_eq!(count(&mut s, t, win10(100, t)), 11);
    for i in 0..20u128 {
        t += 1000;
        last = count(&mut s, t, server(200 + i, t));
    }
    assert_eq!(last, 31);
    assert_eq!(s.counts(t)[0].capacity, 50);
}

#[test]
fn cmids_expire_after_thirty_days_and_renewal_keeps_them() {
    let mut s = ready_state();
    for i in 0..5u128 {
        count(&mut s, T0, win10(i, T0));
    }
    let day29 = T0 + 29 * DAY_MS;
    assert_eq!(
        count(&mut s, day29, win10(0, day29)),
        5,
        "renewal: unchanged"
    );
    let day30 = T0 + CMID_LIFETIME_MS;
    assert_eq!(s.current_count(&WINDOWS, day30 - 1), 5);
    assert_eq!(
        s.current_count(&WINDOWS, day30),
        1,
        "only the renewed one lives"
    );
    assert_eq!(count(&mut s, day30, win10(9, day30)), 2);
    // An old client coming back counts as new again.
    assert_eq!(count(&mut s, day30, win10(1, day30)), 3);
}

#[test]
fn counts_per_application_are_independent() {
    let mut s = ready_state();
    for i in 0..30u128 {
        count(&mut s, T0, win10(i, T0));
    }
    // Same CMIDs as Office clients (one machine runs Windows and Office).
    let g = grant(one(&mut s, T0, office(0, T0)));
    assert_eq!(g.current_count, 1);
    assert!(!g.activated);
    for i in 1..7u128 {
        count(&mut s, T0, office(i, T0));
    }
    let o2010 = count(&mut s, T0, request(OFFICE_2010, KMS_OFFICE_2010, 5, 0, T0));
    assert_eq!(o2010, 1);
    assert_eq!(s.current_count(&WINDOWS, T0), 30);
    assert_eq!(s.current_count(&OFFICE_2013, T0), 7);
    assert_eq!(s.current_count(&OFFICE_2010, T0), 1);
    let counts = s.counts(T0);
    let by_app: BTreeMap<Uuid, (u32, u32)> = counts
        .iter()
        .map(|c| (c.application_id, (c.current_count, c.capacity)))
        .collect();
    assert_eq!(by_app.get(&WINDOWS), Some(&(30, 50)));
    assert_eq!(by_app.get(&OFFICE_2013), Some(&(7, 10)));
    assert_eq!(by_app.get(&OFFICE_2010), Some(&(1, 10)));
    assert_eq!(
        s.client(&cmid(0)).len(),
        3,
        "one record per application list"
    );
}

#[test]
fn list_choice_request_app_then_kms_app_then_unknown() {
    let mut s = ready_state();
    // Unknown application id, known KMS id: counted with the KMS id's application.
    count(
        &mut s,
        T0,
        request(Uuid::from_u128(0xABC), KMS_OFFICE_2016, 5, 1, T0),
    );
    assert_eq!(s.current_count(&OFFICE_2013, T0), 1);
    // Known application id wins over the KMS id's.
    count(&mut s, T0, request(WINDOWS, KMS_OFFICE_2016, 5, 2, T0));
    assert_eq!(s.current_count(&WINDOWS, T0), 1);
    // Both unknown: a list of its own, named "unknown".
    let odd = Uuid::from_u128(0xABD);
    count(&mut s, T0, request(odd, Uuid::from_u128(0xDEAD), 5, 3, T0));
    assert_eq!(s.current_count(&odd, T0), 1);
    let c = s
        .counts(T0)
        .into_iter()
        .find(|c| c.application_id == odd)
        .unwrap();
    assert_eq!(c.name, "unknown");
    assert_eq!(s.statistics().by_application.get(&odd), Some(&1));
}

#[test]
fn at_most_sixteen_unknown_application_lists() {
    let mut s = ready_state();
    for i in 0..16u128 {
        let app = Uuid::from_u128(0xF000 + i);
        count(&mut s, T0, request(app, Uuid::from_u128(0xDEAD), 5, 1, T0));
    }
    let r = refusal(one(
        &mut s,
        T0,
        request(Uuid::from_u128(0xF100), Uuid::from_u128(0xDEAD), 5, 1, T0),
    ));
    assert_eq!(r.hresult, HR_INVALID_DATA);
    assert_eq!(r.reason, "too many unknown application ids");
    // The refused one is pooled under nil in the statistics, existing lists still work.
    assert_eq!(s.statistics().by_application.get(&Uuid::nil()), Some(&1));
    let app0 = Uuid::from_u128(0xF000);
    assert_eq!(
        count(&mut s, T0, request(app0, Uuid::from_u128(0xDEAD), 5, 2, T0)),
        2
    );
    assert_eq!(count(&mut s, T0, win10(1, T0)), 1);
    // Once the unknown lists expire, their slots free up.
    let later = T0 + CMID_LIFETIME_MS;
    s.apply(&Command::Expire { now: later });
    count(
        &mut s,
        later,
        request(
            Uuid::from_u128(0xF100),
            Uuid::from_u128(0xDEAD),
            5,
            1,
            later,
        ),
    );
}

#[test]
fn changed_cmid_does_not_count_twice() {
    let mut s = ready_state();
    count(&mut s, T0, win10(1, T0));
    count(&mut s, T0, win10(2, T0));
    let mut r = win10(3, T0 + 5);
    r.previous_client_machine_id = cmid(1);
    assert_eq!(count(&mut s, T0 + 5, r), 2);
    assert_eq!(s.client_count(), 2);
    assert!(s.client(&cmid(1)).is_empty());
    let moved = s.client(&cmid(3));
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].first_seen, T0);
    assert_eq!(moved[0].request_count, 2);
}

#[test]
fn batch_is_applied_in_order() {
    let mut s = ready_state();
    let out = activate(
        &mut s,
        T0,
        vec![
            win10(1, T0),
            win10(2, T0),
            win10(1, T0),
            office(1, T0),
            win10(3, T0),
        ],
    );
    let counts: Vec<u32> = out.into_iter().map(|o| grant(o).current_count).collect();
    assert_eq!(counts, vec![1, 2, 2, 1, 3]);
}

// ---------------------------------------------------------------------------------------
// Registry and statistics

#[test]
fn registry_records_request_facts() {
    let mut s = ready_state();
    let mut r = win10(1, T0);
    r.is_client_vm = true;
    r.license_status = 5;
    r.protocol_major = 5;
    count(&mut s, T0, r.clone());
    let rec = s.client(&cmid(1)).remove(0);
    assert_eq!(rec.cmid, cmid(1));
    assert_eq!(rec.application_id, WINDOWS);
    assert_eq!(rec.kms_counted_id, KMS_WIN10_2019);
    assert_eq!(rec.sku_id, SKU_SOME);
    assert_eq!(&*rec.workstation, "pc1.corp.example");
    assert_eq!(rec.license_status, 5);
    assert_eq!(rec.protocol, (5, 0));
    assert!(rec.is_vm);
    assert_eq!(rec.last_address, r.client_address);
    assert_eq!((rec.first_seen, rec.last_seen), (T0, T0));
    assert_eq!((rec.request_count, rec.last_count), (1, 1));
    assert!(!rec.last_result_activated);
}

#[test]
fn client_queries() {
    let mut s = ready_state();
    for i in 0..10u128 {
        let now = T0 + i as u64 * 1000;
        let req = if i < 6 { win10(i, now) } else { office(i, now) };
        count(&mut s, now, req);
    }
    let page = s.clients(&ClientQuery {
        limit: 3,
        ..ClientQuery::default()
    });
    assert_eq!(page.total, 10);
    let ids: Vec<Uuid> = page.clients.iter().map(|r| r.cmid).collect();
    assert_eq!(ids, vec![cmid(9), cmid(8), cmid(7)]);
    let office_page = s.clients(&ClientQuery {
        application_id: Some(OFFICE_2013),
        ..ClientQuery::default()
    });
    assert_eq!(office_page.total, 4);
    let kms_page = s.clients(&ClientQuery {
        kms_counted_id: Some(KMS_WIN10_2019),
        since: Some(T0 + 3000),
        offset: 1,
        ..ClientQuery::default()
    });
    assert_eq!(kms_page.total, 3);
    let ids: Vec<Uuid> = kms_page.clients.iter().map(|r| r.cmid).collect();
    assert_eq!(ids, vec![cmid(4), cmid(3)]);
}

#[test]
fn statistics_like_slmgr_dlv() {
    let mut s = ready_state();
    let mut licensed = win10(1, T0);
    licensed.license_status = 1;
    let mut weird = win10(2, T0);
    weird.license_status = 42;
    let mut bad = win10(3, T0);
    bad.protocol_minor = 1;
    activate(
        &mut s,
        T0,
        vec![win10(0, T0), licensed, weird, bad, office(0, T0)],
    );
    let st = s.statistics();
    assert_eq!(st.total_requests, 5);
    assert_eq!(st.failed_requests, 1);
    assert_eq!(st.by_license_status.initial_grace, 3);
    assert_eq!(st.by_license_status.licensed, 1);
    assert_eq!(st.by_license_status.other, 1);
    assert_eq!(st.by_application.get(&WINDOWS), Some(&4));
    assert_eq!(st.by_application.get(&OFFICE_2013), Some(&1));
    assert_eq!(st.refusals.get(&HR_INVALID_DATA), Some(&1));
}

#[test]
fn expire_drops_old_clients_and_cmids() {
    let mut s = ready_state();
    for i in 0..3u128 {
        count(&mut s, T0, win10(i, T0));
    }
    let later = T0 + 100 * DAY_MS;
    // At day 100: the 3 CMIDs are 100 days old (expired), the registry still keeps them.
    assert_eq!(
        s.apply(&Command::Expire { now: later }),
        CommandResult::Expired {
            clients: 0,
            cmids: 3
        }
    );
    assert_eq!(count(&mut s, later, win10(10, later)), 1);
    assert_eq!(s.current_count(&WINDOWS, later), 1);
    assert_eq!(s.client_count(), 4);
    // Retention 180 days (default).
    let retention_end = T0 + 180 * DAY_MS;
    assert_eq!(
        s.apply(&Command::Expire {
            now: retention_end - 1
        }),
        CommandResult::Expired {
            clients: 0,
            cmids: 1
        }
    );
    assert_eq!(
        s.apply(&Command::Expire { now: retention_end }),
        CommandResult::Expired {
            clients: 3,
            cmids: 0
        }
    );
    assert_eq!(s.client_count(), 1);
    assert_eq!(s.client(&cmid(10)).len(), 1);
    // The Windows list keeps its capacity after emptying.
    assert_eq!(s.counts(retention_end)[0].capacity, 50);
}

// ---------------------------------------------------------------------------------------
// Determinism and snapshots

fn script() -> Vec<Command> {
    let mut cmds = vec![Command::InitIdentity(identity()), builtin_catalog()];
    for batch in 0..20u64 {
        let now = T0 + batch * 3 * DAY_MS;
        let reqs = (0..15u128)
            .map(|i| {
                let c = (batch as u128 * 7 + i) % 80;
                match i % 3 {
                    0 => win10(c, now),
                    1 => server(c, now),
                    _ => office(c, now),
                }
            })
            .collect();
        cmds.push(Command::Activate {
            now,
            requests: reqs,
        });
        if batch % 5 == 4 {
            cmds.push(Command::Expire { now });
        }
    }
    cmds.push(Command::SetPolicy(Policy {
        max_clock_skew_minutes: Some(240),
        ..Policy::default()
    }));
    cmds
}

#[test]
fn same_commands_same_bytes() {
    let mut a = State::default();
    let mut b = State::default();
    let mut results_a = Vec::new();
    let mut results_b = Vec::new();
    for c in script() {
        results_a.push(a.apply(&c));
        results_b.push(b.apply(&c));
    }
    assert_eq!(results_a, results_b);
    assert_eq!(a, b);
    assert_eq!(a.to_snapshot(), b.to_snapshot());
    assert!(a.client_count() > 0);
}

#[test]
fn snapshot_roundtrip_continues_identically() {
    let cmds = script();
    let (head, tail) = cmds.split_at(cmds.len() / 2);
    let mut a = State::default();
    for c in head {
        a.apply(c);
    }
    let bytes = a.to_snapshot();
    let mut b = State::from_snapshot(&bytes).unwrap();
    assert_eq!(a, b);
    assert_eq!(b.to_snapshot(), bytes);
    for c in tail {
        assert_eq!(a.apply(c), b.apply(c));
    }
    assert_eq!(a.to_snapshot(), b.to_snapshot());
}

#[test]
fn corrupt_snapshots_are_errors_not_panics() {
    let mut s = State::default();
    for c in script().iter().take(4) {
        s.apply(c);
    }
    let bytes = s.to_snapshot();
    assert!(matches!(
        State::from_snapshot(b"XXXX\x01"),
        Err(SnapshotError::BadMagic)
    ));
    assert!(matches!(
        State::from_snapshot(b""),
        Err(SnapshotError::BadMagic)
    ));
    assert!(matches!(
        State::from_snapshot(b"KMSS"),
        Err(SnapshotError::BadMagic)
    ));
    let mut future = bytes.clone();
    future[4] = 99;
    assert!(matches!(
        State::from_snapshot(&future),
        Err(SnapshotError::UnsupportedVersion(99))
    ));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        State::from_snapshot(&trailing),
        Err(SnapshotError::TrailingBytes(1))
    ));
    // Every truncation fails.
    for len in 0..bytes.len() {
        assert!(State::from_snapshot(&bytes[..len]).is_err(), "len {len}");
    }
    // Garbled bytes: must not panic (the result may or may not decode).
    let mut x: u32 = 0x1234_5678;
    for i in 5..bytes.len() {
        let mut g = bytes.clone();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        g[i] ^= (x as u8) | 1;
        let _ = State::from_snapshot(&g);
        g[i] = 0xFF;
        let _ = State::from_snapshot(&g);
    }
    // Huge length prefixes must not allocate absurdly or panic.
    let mut huge = b"KMSS\x01".to_vec();
    huge.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
    assert!(State::from_snapshot(&huge).is_err());
}

#[test]
fn default_state_snapshot_roundtrip() {
    let s = State::default();
    let back = State::from_snapshot(&s.to_snapshot()).unwrap();
    assert_eq!(back, s);
}

/// A node cut off from its quorum answers with `provisional`; once its queue is committed the
/// real counts must equal (never fall below) what it told the clients.
#[test]
fn provisional_answers_match_what_committing_the_queue_gives() {
    let now = 1_800_000_000_000;
    let mut committed = ready_state();
    for c in 0..7 {
        count(&mut committed, now, win10(c, now));
    }
    let snapshot = committed.clone();
    // Queue: three new clients, one repeat of a committed client, one repeat within the queue.
    let queue: Vec<ActivationRequest> = [100, 101, 3, 100, 102]
        .iter()
        .map(|c| win10(*c, now + 1000))
        .collect();
    let mut pending: Vec<Uuid> = Vec::new();
    let mut told = Vec::new();
    for req in &queue {
        let g = grant(snapshot.provisional(now + 1000, req, &pending));
        told.push(g.current_count);
        pending.push(req.client_machine_id);
    }
    assert_eq!(told, vec![8, 9, 9, 9, 10]);
    // The provisional path changed nothing.
    assert_eq!(snapshot, committed);
    let real: Vec<u32> = activate(&mut committed, now + 2000, queue)
        .into_iter()
        .map(|o| grant(o).current_count)
        .collect();
    assert_eq!(real, told, "committed counts equal the provisional ones");
    // Refusals are decided the same way.
    let mut bad = win10(500, now);
    bad.protocol_minor = 1;
    assert_eq!(
        refusal(snapshot.provisional(now, &bad, &[])).hresult,
        HR_INVALID_DATA
    );
    // The cap is 2 x N even for a list the committed state has not seen grow yet.
    let mut fresh = ready_state();
    let pending: Vec<Uuid> = (0..60).map(cmid).collect();
    assert_eq!(
        grant(fresh.provisional(now, &win10(1000, now), &pending)).current_count,
        50
    );
    assert_eq!(count(&mut fresh, now, server(1, now)), 1);
}

#[test]
fn a_request_applied_twice_counts_once() {
    let mut s = ready_state();
    // Clockless clients below are refused by the default clock check: switch it off.
    set_policy(
        &mut s,
        Policy {
            max_clock_skew_minutes: None,
            ..Policy::default()
        },
    );
    count(&mut s, T0, win10(1, T0));
    let first = grant(one(&mut s, T0 + 1000, server(2, T0 + 1000)));
    // The same request again (a commit that outlived its answer deadline, also queued):
    // answered alike, but neither the statistics nor the client's request count move.
    let again = grant(one(&mut s, T0 + 60_000, server(2, T0 + 1000)));
    assert_eq!(again.current_count, first.current_count);
    assert_eq!(again.epid, first.epid);
    assert_eq!(s.statistics().total_requests, 2);
    assert_eq!(s.client(&cmid(2))[0].request_count, 1);
    // In one batch too.
    let both = activate(
        &mut s,
        T0 + 70_000,
        vec![win10(3, T0 + 70_000), win10(3, T0 + 70_000)],
    );
    assert!(both.iter().all(|o| grant(o.clone()).current_count == 3));
    assert_eq!(s.statistics().total_requests, 3);
    assert_eq!(s.client(&cmid(3))[0].request_count, 1);
    // A later request of the same machine is a new request (a renewal).
    assert_eq!(count(&mut s, T0 + 90_000, server(2, T0 + 90_000)), 3);
    assert_eq!(s.statistics().total_requests, 4);
    assert_eq!(s.client(&cmid(2))[0].request_count, 2);
    // A client without a clock (time 0) is never taken for a repeat.
    for _ in 0..2 {
        let mut r = win10(4, T0);
        r.request_time = 0;
        one(&mut s, T0 + 100_000, r);
    }
    assert_eq!(s.client(&cmid(4))[0].request_count, 2);
    assert_eq!(s.statistics().total_requests, 6);
    // The repeat marker survives a snapshot, so replicas agree after a restore.
    let mut restored = State::from_snapshot(&s.to_snapshot()).unwrap();
    one(&mut restored, T0 + 200_000, server(2, T0 + 90_000));
    one(&mut s, T0 + 200_000, server(2, T0 + 90_000));
    assert_eq!(restored.statistics().total_requests, 6);
    assert!(restored == s);
}
