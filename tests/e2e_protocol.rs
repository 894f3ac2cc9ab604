//! kmsctl's client library against a real kmsd over TCP: every protocol version x bind
//! variant x connection mode, for a Windows client product (N=25), a server product (N=5)
//! and an Office 2013+ product; plus the counting rules a genuine host follows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kms_tests::{now_ms, Node};
use kms_wire::client::BindOptions;
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(10);

fn template(product: &str, protocol: u16) -> RequestTemplate {
    let mut t = RequestTemplate::new(resolve(product).unwrap());
    t.protocol_major = protocol;
    t
}

/// Sends one request with `cmid` on a fresh connection and returns the verified count.
async fn count_for(node: &Node, t: &RequestTemplate, cmid: Uuid) -> u32 {
    let mut c = KmsClient::connect(&node.kms(), BindOptions::default(), TIMEOUT)
        .await
        .unwrap();
    match c
        .activate(&t.build(cmid, now_ms()), rand::random())
        .await
        .unwrap()
    {
        Answer::Activated(r) => r.base.current_count,
        Answer::Refused(hr) => panic!("refused 0x{hr:08X}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_bind_and_connection_mode_is_answered_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let binds = [
        (
            "full",
            BindOptions {
                ndr64: true,
                btfn: true,
                multiplex: true,
            },
        ),
        (
            "ndr32",
            BindOptions {
                ndr64: false,
                btfn: false,
                multiplex: true,
            },
        ),
        (
            "ndr32+btfn",
            BindOptions {
                ndr64: false,
                btfn: true,
                multiplex: true,
            },
        ),
        (
            "ndr64-no-btfn",
            BindOptions {
                ndr64: true,
                btfn: false,
                multiplex: true,
            },
        ),
        (
            "no-multiplex",
            BindOptions {
                ndr64: true,
                btfn: true,
                multiplex: false,
            },
        ),
    ];
    let mut epids: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut hwids = BTreeSet::new();
    let mut exchanges = 0;
    for product in ["windows", "server", "office"] {
        for protocol in [4u16, 5, 6] {
            let t = template(product, protocol);
            for (bind_name, bind) in binds {
                for new_connection in [false, true] {
                    let mut conn: Option<KmsClient> = None;
                    // Three requests: on one connection the first goes out as NDR32 and the
                    // later ones as NDR64 when NDR64 was negotiated.
                    for _ in 0..3 {
                        if conn.is_none() || new_connection {
                            conn = Some(
                                KmsClient::connect(&node.kms(), bind, TIMEOUT)
                                    .await
                                    .unwrap(),
                            );
                        }
                        let c = conn.as_mut().unwrap();
                        let cmid = Uuid::new_v4();
                        let answer = c.activate(&t.build(cmid, now_ms()), rand::random()).await;
                        let ctx = format!(
                            "{product} v{protocol} {bind_name} new_connection={new_connection}"
                        );
                        match answer {
                            Ok(Answer::Activated(r)) => {
                                assert_eq!(r.base.client_machine_id, cmid, "{ctx}");
                                assert_eq!(r.base.version.major, protocol, "{ctx}");
                                assert!(r.base.current_count >= 1, "{ctx}");
                                assert_eq!(r.base.renewal_interval, 10_080, "{ctx}");
                                assert_eq!(r.base.activation_interval, 120, "{ctx}");
                                assert_eq!(r.hwid.is_some(), protocol == 6, "{ctx}");
                                if let Some(h) = r.hwid {
                                    hwids.insert(h);
                                }
                                epids.entry(product).or_default().insert(r.base.epid);
                            }
                            other => panic!("{ctx}: {other:?}"),
                        }
                        assert!(
                            c.warnings().is_empty(),
                            "{ctx}: warnings {:?}",
                            c.warnings()
                        );
                        exchanges += 1;
                    }
                }
            }
        }
    }
    assert_eq!(exchanges, 3 * 3 * 5 * 2 * 3);
    // One host identity: one ePID per product group, one HWID.
    for (product, set) in &epids {
        assert_eq!(set.len(), 1, "{product} got several ePIDs: {set:?}");
    }
    assert_eq!(hwids.len(), 1, "several HWIDs: {hwids:?}");
    // The default Windows host key is the newest, Windows Server 2025's (group 4919).
    let windows_epid = epids["windows"].iter().next().unwrap().clone();
    assert!(
        windows_epid.split('-').nth(1) == Some("04919"),
        "{windows_epid}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_matches_a_genuine_host() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let server = template("server", 6);
    let windows = template("windows", 6);
    let office = template("office", 6);

    // A server-only host caches 2 x 5 = 10 clients.
    let mut counts = Vec::new();
    for _ in 0..12 {
        counts.push(count_for(&node, &server, Uuid::new_v4()).await);
    }
    assert_eq!(counts, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]);

    // The first Windows client product (N = 25) grows the Windows cache to 50.
    let first_windows = Uuid::new_v4();
    assert_eq!(count_for(&node, &windows, first_windows).await, 11);
    // The same CMID again does not raise the count.
    assert_eq!(count_for(&node, &windows, first_windows).await, 11);
    let mut last = 11;
    for _ in 0..45 {
        last = count_for(&node, &windows, Uuid::new_v4()).await;
    }
    assert_eq!(last, 50, "capped at 2 x 25");

    // Office 2013+ has its own list.
    assert_eq!(count_for(&node, &office, Uuid::new_v4()).await, 1);
    assert_eq!(count_for(&node, &office, Uuid::new_v4()).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_n_the_client_is_told_the_count_and_the_host_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let windows = template("windows", 5);
    for expected in 1..=3 {
        let count = count_for(&node, &windows, Uuid::new_v4()).await;
        assert_eq!(count, expected);
        assert!(count < windows.n_policy, "a Windows client needs 25");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_policy_refuses_products_outside_the_licensed_csvlks() {
    let dir = tempfile::tempdir().unwrap();
    // Office 2016 VL CSVLK only: Office 2016 activates, Windows is refused with 0xC004F042.
    let office_csvlk = kms_catalog::catalog()
        .csvlks()
        .iter()
        .find(|c| c.name == "Office 2016")
        .expect("Office 2016 CSVLK in the catalog")
        .id
        .to_string();
    let node = Node::start(
        dir.path(),
        &[
            "--product-policy",
            "strict",
            "--licensed-csvlk",
            &office_csvlk,
        ],
    );
    let mut c = KmsClient::connect(&node.kms(), BindOptions::default(), TIMEOUT)
        .await
        .unwrap();
    let office = template("office", 6);
    match c
        .activate(&office.build(Uuid::new_v4(), now_ms()), rand::random())
        .await
        .unwrap()
    {
        Answer::Activated(r) => assert_eq!(r.base.current_count, 1),
        other => panic!("office refused: {other:?}"),
    }
    let windows = template("windows", 6);
    match c
        .activate(&windows.build(Uuid::new_v4(), now_ms()), rand::random())
        .await
        .unwrap()
    {
        Answer::Refused(hr) => assert_eq!(hr, 0xC004_F042),
        other => panic!("windows should be refused: {other:?}"),
    }
    // The refused client was not counted.
    match c
        .activate(&windows.build(Uuid::new_v4(), now_ms()), rand::random())
        .await
        .unwrap()
    {
        Answer::Refused(hr) => assert_eq!(hr, 0xC004_F042),
        other => panic!("windows should be refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_check_refuses_far_off_clients_when_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--max-clock-skew-minutes", "240"]);
    let t = template("windows", 6);
    let mut c = KmsClient::connect(&node.kms(), BindOptions::default(), TIMEOUT)
        .await
        .unwrap();
    let five_hours = 5 * 3600 * 1000;
    match c
        .activate(
            &t.build(Uuid::new_v4(), now_ms() - five_hours),
            rand::random(),
        )
        .await
        .unwrap()
    {
        Answer::Refused(hr) => assert_eq!(hr, 0xC004_F06C),
        other => panic!("expected a clock refusal: {other:?}"),
    }
    match c
        .activate(
            &t.build(Uuid::new_v4(), now_ms() - 3600 * 1000),
            rand::random(),
        )
        .await
        .unwrap()
    {
        Answer::Activated(r) => assert_eq!(
            r.base.current_count, 1,
            "the refused client was not counted"
        ),
        other => panic!("one hour is within 4 h: {other:?}"),
    }
}
