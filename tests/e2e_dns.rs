//! DNS end to end: records published into a real BIND 9 by `kms-dns`, discovered like a KMS
//! client does (`kmsctl::discover`, RFC 2782 order), and an activation through the first host
//! that answers: a dead host (closed port) at priority 0, a real `kmsd` at priority 10.

#[path = "../crates/kms-dns/tests/support/bind.rs"]
mod bind;

use std::collections::BTreeSet;
use std::time::Duration;

use bind::Bind;
use kms_dns::{DesiredSrv, PublishTarget, Publisher, PublisherOptions, SrvRecord, TsigKey};
use kms_tests::{free_port, Node};
use kms_wire::client::BindOptions;
use kmsctl::client::Answer;
use kmsctl::discover::{connect_first, discover, format_order, AttemptError};
use kmsctl::products::{self, RequestTemplate};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_orders_by_priority_and_activation_falls_over_to_the_live_host() {
    let Some(dns) = Bind::start("e2e_dns_discover") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let dead_port = free_port(); // nothing listens there

    let mut target = PublishTarget::new(&dns.zone, dns.server());
    target.publish_address_records = true;
    let key = TsigKey::from_base64(&dns.key_name, "hmac-sha256", &dns.key_secret).unwrap();
    let publisher = Publisher::with_key(
        &target,
        Some(key),
        PublisherOptions::with_timeout(Duration::from_secs(3)),
    )
    .unwrap();
    let loopback = ["127.0.0.1".parse().unwrap()];
    publisher
        .publish(
            &[
                DesiredSrv::new("dead.kms.test", dead_port, 0, 100).with_addresses(loopback),
                DesiredSrv::new("live.kms.test", node.kms_addr.port(), 10, 100)
                    .with_addresses(loopback),
            ],
            &BTreeSet::new(),
        )
        .await
        .expect("publish");

    let mut rng = StdRng::seed_from_u64(1);
    let order = discover(
        "kms.test",
        Some(dns.addr()),
        Duration::from_secs(2),
        &mut rng,
    )
    .await
    .expect("discover");
    assert_eq!(
        order,
        vec![
            SrvRecord::new("dead.kms.test", dead_port, 0, 100),
            SrvRecord::new("live.kms.test", node.kms_addr.port(), 10, 100),
        ]
    );
    assert!(format_order(&order).starts_with("1. dead.kms.test:"));

    // The dead host is tried first and skipped; the live one binds and activates.
    let (host, mut client) = connect_first(
        &order,
        Some(dns.addr()),
        BindOptions::default(),
        Duration::from_secs(2),
    )
    .await
    .expect("a host answers");
    assert_eq!(host.target, "live.kms.test");
    assert_eq!(client.peer(), node.kms_addr);
    let template = RequestTemplate::new(products::resolve("windows").unwrap());
    // The client's clock agrees with the host's (the 4-hour check is on by default).
    let request = template.build(uuid::Uuid::new_v4(), kms_tests::now_ms());
    match client
        .activate(&request, rand::random())
        .await
        .expect("activation")
    {
        Answer::Activated(resp) => assert_eq!(resp.base.current_count, 1),
        Answer::Refused(hr) => panic!("refused 0x{hr:08x}"),
    }

    // With only the dead host left, the failure names it.
    let err = connect_first(
        &order[..1],
        Some(dns.addr()),
        BindOptions::default(),
        Duration::from_secs(1),
    )
    .await
    .err()
    .expect("nobody answers");
    assert_eq!(err.attempts.len(), 1);
    assert!(
        matches!(err.attempts[0].1, AttemptError::Failed(_)),
        "{err}"
    );
    assert!(err.to_string().contains("dead.kms.test"), "{err}");
}
