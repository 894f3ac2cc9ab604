//! The publisher, reconciler and lookup against a real BIND 9 on loopback (TSIG + update-policy).
//! Results are checked with `dig` (an independent client) and, where noted, with hickory.

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kms_dns::{
    lookup_srv, spawn_reconciler, Action, DesiredSrv, DesiredState, Member, Outcome, PublishError,
    PublishTarget, Publisher, PublisherOptions, Rcode, ReconcilerOptions, SrvRecord, Stage,
    Transport, TsigKey, EVENT_PUBLISH_FAILED, EVENT_PUBLISH_SUCCEEDED,
};
use support::bind::Bind;

fn options() -> PublisherOptions {
    PublisherOptions::with_timeout(Duration::from_secs(3))
}

/// The issue's `[[dns.publish]]` table for this server, with the secret in a file.
fn target(bind: &Bind) -> PublishTarget {
    let toml_text = format!(
        "zone = \"{}\"\nserver = \"{}\"\ntsig_key_name = \"{}\"\ntsig_algorithm = \"hmac-sha256\"\ntsig_secret_file = \"{}\"\nttl = 60\npriority = 0\nweight = 100\n",
        bind.zone,
        bind.server(),
        bind.key_name,
        bind.secret_file().display()
    );
    toml::from_str(&toml_text).expect("publish table")
}

fn publisher(bind: &Bind) -> Publisher {
    Publisher::new(&target(bind), options()).expect("publisher")
}

fn owned(hosts: &[&str]) -> BTreeSet<String> {
    hosts.iter().map(|h| h.to_string()).collect()
}

#[tokio::test]
async fn record_appears_with_configured_priority_weight_port_target_and_ttl() {
    let Some(bind) = Bind::start("record_appears") else {
        return;
    };
    let p = publisher(&bind);
    let (prio, weight) = p.priority_weight();
    let desired = [DesiredSrv::new("node1.kms.test", 1688, prio, weight)];
    let report = p
        .publish(&desired, &BTreeSet::new())
        .await
        .expect("publish");
    assert_eq!(
        (report.added, report.records_published, report.updates_sent),
        (1, 1, 1)
    );
    assert_eq!(bind.srv(), ["0 100 1688 node1.kms.test."]);
    assert_eq!(bind.srv_ttl(), Some(60));
    // hickory's view matches dig's.
    assert_eq!(
        p.current().await.unwrap(),
        vec![SrvRecord::new("node1.kms.test", 1688, 0, 100)]
    );
    assert!(bind
        .log()
        .contains("adding an RR at '_vlmcs._tcp.kms.test' SRV 0 100 1688 node1.kms.test."));

    // Republishing the same state sends nothing: no update, serial unchanged.
    let serial = bind.serial();
    let again = p.publish(&desired, &BTreeSet::new()).await.unwrap();
    assert_eq!((again.updates_sent, again.added), (0, 0));
    assert_eq!(bind.serial(), serial);
}

#[tokio::test]
async fn two_nodes_with_different_priorities_both_appear_over_tcp_and_udp() {
    let Some(bind) = Bind::start("two_nodes") else {
        return;
    };
    let mut opts = options();
    opts.transport = Transport::Udp;
    let udp = Publisher::new(&target(&bind), opts).unwrap();
    udp.publish(
        &[DesiredSrv::new("node1.kms.test", 1688, 0, 100)],
        &BTreeSet::new(),
    )
    .await
    .expect("publish over UDP");
    let tcp = publisher(&bind);
    let desired = [
        DesiredSrv::new("node1.kms.test", 1688, 0, 100),
        DesiredSrv::new("node2.kms.test", 1689, 10, 50),
    ];
    let report = tcp.publish(&desired, &BTreeSet::new()).await.unwrap();
    assert_eq!((report.added, report.records_published), (1, 2));
    assert_eq!(
        bind.srv(),
        ["0 100 1688 node1.kms.test.", "10 50 1689 node2.kms.test."]
    );
}

#[tokio::test]
async fn removing_a_node_removes_only_its_record_and_foreign_records_stay() {
    let Some(bind) = Bind::start("removing_a_node") else {
        return;
    };
    // Another owner (its own key) publishes a KMS host in the same RRset.
    let (ok, out) = bind.nsupdate_other(
        "update add _vlmcs._tcp.kms.test. 300 IN SRV 0 0 1688 legacy-kms.corp.example.",
    );
    assert!(ok, "{out}");
    let p = publisher(&bind);
    let all = ["node1.kms.test", "node2.kms.test", "node3.kms.test"];
    let three: Vec<DesiredSrv> = all
        .iter()
        .enumerate()
        .map(|(i, h)| DesiredSrv::new(h, 1688, i as u16, 10))
        .collect();
    let report = p.publish(&three, &owned(&all)).await.unwrap();
    assert_eq!((report.added, report.foreign_records), (3, 1));

    // node2 leaves the desired set (dead or unhealthy); it stays owned.
    let two = [three[0].clone(), three[2].clone()];
    let report = p.publish(&two, &owned(&all)).await.unwrap();
    assert_eq!((report.removed, report.added, report.changed), (1, 0, 0));
    assert_eq!(report.foreign_records, 1);
    assert_eq!(
        bind.srv(),
        [
            "0 0 1688 legacy-kms.corp.example.",
            "0 10 1688 node1.kms.test.",
            "2 10 1688 node3.kms.test."
        ]
    );

    // An empty desired set with everything owned still leaves the foreign record.
    let report = p.publish(&[], &owned(&all)).await.unwrap();
    assert_eq!(report.removed, 2);
    assert_eq!(bind.srv(), ["0 0 1688 legacy-kms.corp.example."]);
}

#[tokio::test]
async fn priority_and_weight_change_replaces_just_that_record_in_one_update() {
    let Some(bind) = Bind::start("priority_change") else {
        return;
    };
    let (ok, out) =
        bind.nsupdate_other("update add _vlmcs._tcp.kms.test. 60 IN SRV 5 5 1688 other.kms.test.");
    assert!(ok, "{out}");
    let p = publisher(&bind);
    let hosts = ["node1.kms.test", "node2.kms.test"];
    p.publish(
        &[
            DesiredSrv::new(hosts[0], 1688, 0, 100),
            DesiredSrv::new(hosts[1], 1688, 0, 100),
        ],
        &owned(&hosts),
    )
    .await
    .unwrap();
    let serial = bind.serial();
    let report = p
        .publish(
            &[
                DesiredSrv::new(hosts[0], 1688, 20, 7),
                DesiredSrv::new(hosts[1], 1688, 0, 100),
            ],
            &owned(&hosts),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            report.changed,
            report.added,
            report.removed,
            report.updates_sent
        ),
        (1, 0, 0, 1)
    );
    assert_eq!(
        bind.serial(),
        serial + 1,
        "exactly one update message applied"
    );
    assert_eq!(
        bind.srv(),
        [
            "0 100 1688 node2.kms.test.",
            "20 7 1688 node1.kms.test.",
            "5 5 1688 other.kms.test."
        ]
    );
}

#[tokio::test]
async fn withdraw_removes_one_node_only() {
    let Some(bind) = Bind::start("withdraw") else {
        return;
    };
    let (ok, out) = bind
        .nsupdate_other("update add _vlmcs._tcp.kms.test. 60 IN SRV 0 0 1688 node1.other.test.");
    assert!(ok, "{out}");
    let p = publisher(&bind);
    p.publish(
        &[
            DesiredSrv::new("node1.kms.test", 1688, 0, 0),
            DesiredSrv::new("node2.kms.test", 1688, 0, 0),
        ],
        &BTreeSet::new(),
    )
    .await
    .unwrap();
    let report = p.withdraw("NODE1.kms.test.").await.unwrap();
    assert_eq!((report.removed, report.foreign_records), (1, 2));
    assert_eq!(
        bind.srv(),
        ["0 0 1688 node1.other.test.", "0 0 1688 node2.kms.test."]
    );
    // Withdrawing a host that has no record is a no-op success.
    let report = p.withdraw("node9.kms.test").await.unwrap();
    assert_eq!((report.removed, report.updates_sent), (0, 0));
}

#[tokio::test]
async fn address_records_for_in_zone_targets_follow_the_desired_addresses() {
    let Some(bind) = Bind::start("address_records") else {
        return;
    };
    let mut t = target(&bind);
    t.publish_address_records = true;
    let p = Publisher::new(&t, options()).unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let desired = [
        DesiredSrv::new("node1.kms.test", 1688, 0, 0)
            .with_addresses([ip("127.0.0.11"), ip("::11")]),
        // Outside the zone: SRV published, address records left to that zone's owner.
        DesiredSrv::new("kms.elsewhere.example", 1688, 0, 0).with_addresses([ip("127.0.0.12")]),
    ];
    let report = p.publish(&desired, &BTreeSet::new()).await.unwrap();
    assert_eq!(report.address_changes, 2);
    assert_eq!(bind.dig("node1.kms.test.", "A"), ["127.0.0.11"]);
    assert_eq!(bind.dig("node1.kms.test.", "AAAA"), ["::11"]);
    assert!(bind.dig("kms.elsewhere.example.", "A").is_empty());

    // The node's IPv4 address changes: one delete and one add, IPv6 untouched.
    let moved = [DesiredSrv::new("node1.kms.test", 1688, 0, 0)
        .with_addresses([ip("127.0.0.21"), ip("::11")])];
    let report = p.publish(&moved, &BTreeSet::new()).await.unwrap();
    assert_eq!(report.address_changes, 2);
    assert_eq!(bind.dig("node1.kms.test.", "A"), ["127.0.0.21"]);
    assert_eq!(bind.dig("node1.kms.test.", "AAAA"), ["::11"]);
}

#[tokio::test]
async fn wrong_or_missing_keys_give_typed_rcodes_and_change_nothing() {
    let Some(bind) = Bind::start("wrong_keys") else {
        return;
    };
    let desired = [DesiredSrv::new("evil.kms.test", 1688, 0, 0)];
    let t = target(&bind);

    // Right key name, wrong secret: BADSIG, answered with an unsigned NOTAUTH.
    let wrong = TsigKey::new(&bind.key_name, "hmac-sha256", vec![7u8; 32]).unwrap();
    let p = Publisher::with_key(&t, Some(wrong), options()).unwrap();
    let err = p.publish(&desired, &BTreeSet::new()).await.unwrap_err();
    match &err {
        PublishError::Rejected {
            stage: Stage::Update,
            rcode,
            signed: false,
            ..
        } => assert_eq!(*rcode, Rcode::NOTAUTH, "{err}"),
        other => panic!("expected NOTAUTH, got {other:?}"),
    }
    assert_eq!(err.label(), "NOTAUTH");

    // A key the server does not know: BADKEY, also NOTAUTH.
    let unknown = TsigKey::new("no-such-key", "hmac-sha256", vec![1u8; 32]).unwrap();
    let p = Publisher::with_key(&t, Some(unknown), options()).unwrap();
    let err = p.publish(&desired, &BTreeSet::new()).await.unwrap_err();
    assert_eq!(err.rcode(), Some(Rcode::NOTAUTH), "{err}");

    // No key at all: REFUSED by the update-policy.
    let p = Publisher::with_key(&t, None, options()).unwrap();
    let err = p.publish(&desired, &BTreeSet::new()).await.unwrap_err();
    assert_eq!(err.rcode(), Some(Rcode::REFUSED), "{err}");

    // A valid key the policy does not allow for address records: a signed REFUSED.
    let mut t2 = t.clone();
    t2.publish_address_records = true;
    let other =
        TsigKey::from_base64(&bind.other_key_name, "hmac-sha256", &bind.other_key_secret).unwrap();
    let p = Publisher::with_key(&t2, Some(other), options()).unwrap();
    let err = p
        .publish(
            &[DesiredSrv::new("node1.kms.test", 1688, 0, 0)
                .with_addresses(["127.0.0.5".parse().unwrap()])],
            &BTreeSet::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PublishError::Rejected {
                rcode: Rcode::REFUSED,
                signed: true,
                ..
            }
        ),
        "{err:?}"
    );

    assert!(
        bind.srv().is_empty(),
        "nothing was published: {:?}",
        bind.srv()
    );
}

#[tokio::test]
async fn lookup_resolves_what_was_published() {
    let Some(bind) = Bind::start("lookup") else {
        return;
    };
    let p = publisher(&bind);
    p.publish(
        &[
            DesiredSrv::new("node1.kms.test", 1688, 0, 100),
            DesiredSrv::new("node2.kms.test", 1700, 10, 5),
        ],
        &BTreeSet::new(),
    )
    .await
    .unwrap();
    let found = lookup_srv("kms.test", Some(bind.addr()), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(
        found,
        vec![
            SrvRecord::new("node1.kms.test", 1688, 0, 100),
            SrvRecord::new("node2.kms.test", 1700, 10, 5)
        ]
    );
    let none = lookup_srv(
        "nothing.kms.test",
        Some(bind.addr()),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        matches!(none, Err(kms_dns::LookupError::NoRecords(_))),
        "{none:?}"
    );
}

/// Collects outcomes from the reconciler callback.
fn outcome_channel() -> (
    impl Fn(&Outcome) + Send + Sync + 'static,
    tokio::sync::mpsc::UnboundedReceiver<Outcome>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (
        move |o: &Outcome| {
            let _ = tx.send(o.clone());
        },
        rx,
    )
}

async fn next_outcome(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outcome>) -> Outcome {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("an outcome within 15 s")
        .expect("reconciler alive")
}

#[tokio::test]
async fn reconciler_publishes_follows_membership_withdraws_and_counts() {
    let Some(bind) = Bind::start("reconciler") else {
        return;
    };
    let (ok, out) = bind
        .nsupdate_other("update add _vlmcs._tcp.kms.test. 60 IN SRV 0 0 1688 foreign.kms.test.");
    assert!(ok, "{out}");
    let node1 = Member::new("node1.kms.test", 1688).with_zone("kms.test", 0, 100);
    // node2 has no own settings for the zone: the publishing node's values (0/100) apply.
    let node2 = Member::new("node2.kms.test", 1689);
    let node3 = Member::new("node3.kms.test", 1690).with_zone("kms.test", 10, 1);
    let (callback, mut rx) = outcome_channel();
    let (handle, join) = spawn_reconciler(
        vec![publisher(&bind)],
        ReconcilerOptions::default(),
        DesiredState::new(vec![node1.clone(), node2.clone(), node3.clone()], []),
        callback,
    );
    let first = next_outcome(&mut rx).await;
    assert!(first.is_success(), "{}", first.message());
    assert_eq!(first.event_id(), EVENT_PUBLISH_SUCCEEDED);
    assert_eq!(first.next_attempt_in, Some(Duration::from_secs(86_400)));
    assert_eq!(
        bind.srv(),
        [
            "0 0 1688 foreign.kms.test.",
            "0 100 1688 node1.kms.test.",
            "0 100 1689 node2.kms.test.",
            "10 1 1690 node3.kms.test."
        ]
    );

    // node2 stops answering: the leader drops it from the desired members.
    handle.set_desired(DesiredState::new(
        vec![node1.clone(), node3.clone()],
        ["node2.kms.test".to_owned()],
    ));
    let second = next_outcome(&mut rx).await;
    assert_eq!(second.result.as_ref().map(|r| r.removed).ok(), Some(1));
    assert_eq!(
        bind.srv(),
        [
            "0 0 1688 foreign.kms.test.",
            "0 100 1688 node1.kms.test.",
            "10 1 1690 node3.kms.test."
        ]
    );

    // Somebody deletes our record by hand; a trigger repairs it.
    let (ok, out) =
        bind.nsupdate_cluster("update delete _vlmcs._tcp.kms.test. SRV 10 1 1690 node3.kms.test.");
    assert!(ok, "{out}");
    handle.trigger();
    let third = next_outcome(&mut rx).await;
    assert_eq!(third.result.as_ref().map(|r| r.added).ok(), Some(1));

    // node1 leaves gracefully: withdrawn now, and later rounds do not bring it back.
    let withdrawn = handle.withdraw("node1.kms.test").await;
    assert_eq!(withdrawn.len(), 1);
    assert_eq!(
        withdrawn[0].action,
        Action::Withdraw {
            host: "node1.kms.test".into()
        }
    );
    assert!(withdrawn[0].is_success(), "{}", withdrawn[0].message());
    let _ = next_outcome(&mut rx).await; // the withdraw outcome also reaches the callback
    handle.trigger();
    let fourth = next_outcome(&mut rx).await;
    assert!(fourth.is_success());
    assert_eq!(
        bind.srv(),
        ["0 0 1688 foreign.kms.test.", "10 1 1690 node3.kms.test."]
    );

    let stats = handle.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].zone, "kms.test");
    assert_eq!((stats[0].successes, stats[0].failures), (5, 0));
    assert_eq!(stats[0].records_published, 1);
    assert!(stats[0].last_success_unix.is_some());
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .expect("loop stops")
        .expect("loop did not panic");
}

#[tokio::test]
async fn reconciler_reports_refusal_as_event_12293_and_backs_off() {
    let Some(bind) = Bind::start("reconciler_refused") else {
        return;
    };
    let wrong = TsigKey::new(&bind.key_name, "hmac-sha256", vec![9u8; 32]).unwrap();
    let p = Publisher::with_key(&target(&bind), Some(wrong), options()).unwrap();
    let (callback, mut rx) = outcome_channel();
    let opts = ReconcilerOptions {
        republish_interval: Duration::from_secs(3600),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
    };
    let (handle, _join) = spawn_reconciler(
        vec![p],
        opts,
        DesiredState::new(vec![Member::new("node1.kms.test", 1688)], []),
        callback,
    );
    let mut waits = Vec::new();
    for _ in 0..4 {
        let o = next_outcome(&mut rx).await;
        assert_eq!(o.event_id(), EVENT_PUBLISH_FAILED);
        assert_eq!(
            o.result.as_ref().err().and_then(|e| e.rcode()),
            Some(Rcode::NOTAUTH)
        );
        assert!(o.message().contains("NOTAUTH"), "{}", o.message());
        waits.push(o.next_attempt_in.unwrap());
    }
    assert_eq!(
        waits,
        [100, 200, 400, 400].map(Duration::from_millis).to_vec(),
        "exponential backoff, capped"
    );
    let stats = handle.stats();
    assert_eq!(stats[0].successes, 0);
    assert!(stats[0].failures >= 4);
    assert_eq!(
        stats[0].last_error.as_ref().map(|(l, _)| l.as_str()),
        Some("NOTAUTH")
    );
    assert!(bind.srv().is_empty());
    handle.shutdown();
}

#[tokio::test]
async fn a_stopped_server_fails_fast_and_typed() {
    let Some(bind) = Bind::start("stopped_server") else {
        return;
    };
    let p = publisher(&bind);
    bind.stop();
    let started = Instant::now();
    let err = p
        .publish(
            &[DesiredSrv::new("node1.kms.test", 1688, 0, 0)],
            &BTreeSet::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PublishError::Unreachable { .. } | PublishError::Timeout { .. }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(13),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_publishers_never_remove_a_foreign_record() {
    let Some(bind) = Bind::start("racing_publishers") else {
        return;
    };
    let (ok, out) = bind
        .nsupdate_other("update add _vlmcs._tcp.kms.test. 60 IN SRV 0 0 1688 foreign.kms.test.");
    assert!(ok, "{out}");
    let hosts = ["node1.kms.test", "node2.kms.test", "node3.kms.test"];
    // Two "leaders" with different views of the membership, racing 20 rounds each.
    let a = publisher(&bind);
    let b = publisher(&bind);
    let set_a = vec![
        DesiredSrv::new(hosts[0], 1688, 0, 0),
        DesiredSrv::new(hosts[1], 1688, 0, 0),
    ];
    let set_b = vec![
        DesiredSrv::new(hosts[1], 1688, 0, 0),
        DesiredSrv::new(hosts[2], 1688, 0, 0),
    ];
    let run = |p: Publisher, set: Vec<DesiredSrv>| async move {
        let mut conflicts = 0;
        for _ in 0..20 {
            match p.publish(&set, &owned(&hosts)).await {
                Ok(_) => {}
                Err(PublishError::Conflict { .. }) => conflicts += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        conflicts
    };
    let (ca, cb) = tokio::join!(
        tokio::spawn(run(a, set_a)),
        tokio::spawn(run(b, set_b.clone()))
    );
    let (_ca, _cb) = (ca.unwrap(), cb.unwrap());
    let srv = bind.srv();
    assert!(
        srv.contains(&"0 0 1688 foreign.kms.test.".to_owned()),
        "{srv:?}"
    );
    // One final uncontested round converges exactly.
    publisher(&bind)
        .publish(&set_b, &owned(&hosts))
        .await
        .unwrap();
    assert_eq!(
        bind.srv(),
        [
            "0 0 1688 foreign.kms.test.",
            "0 0 1688 node2.kms.test.",
            "0 0 1688 node3.kms.test."
        ]
    );
}
