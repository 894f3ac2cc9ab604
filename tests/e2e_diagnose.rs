//! `kmsctl diagnose` against real set-ups on loopback: a BIND 9 zone without records, SRV
//! records pointing at a closed port and at a name without an address, a refusing
//! `--server`, a healthy three-node cluster found through DNS, a strict product policy and
//! a count below N. Every answer must name the problem (code and plain words) and exit 1;
//! the healthy set-up exits 0.

#[path = "../crates/kms-dns/tests/support/bind.rs"]
mod bind;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use bind::Bind;
use kms_dns::{DesiredSrv, PublishTarget, Publisher, PublisherOptions, TsigKey};
use kms_tests::{activate_with, binary, free_port, Node};
use kmsctl::products::{self, RequestTemplate};
use serde_json::Value;

/// Runs `kmsctl diagnose ARGS --json` and returns (exit code, report, text of a second run).
fn diagnose(args: &[&str]) -> (i32, Value, String) {
    let run = |extra: &[&str]| {
        let out = Command::new(binary("kmsctl"))
            .arg("diagnose")
            .args(args)
            .args(["--timeout-secs", "5"])
            .args(extra)
            .env_remove("KMSCTL_ADMIN_URL")
            .env_remove("KMSCTL_TOKEN")
            .output()
            .expect("run kmsctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, json, err) = run(&["--json"]);
    let report: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("diagnose --json printed no JSON ({e}):\n{json}\n{err}"));
    let (text_code, text, _) = run(&[]);
    assert_eq!(code, text_code, "same exit code with and without --json");
    (code, report, text)
}

fn problems(report: &Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The checks with `problem == code`.
fn checks_with<'a>(report: &'a Value, code: &str) -> Vec<&'a Value> {
    report["checks"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["problem"] == code).collect())
        .unwrap_or_default()
}

async fn publish(dns: &Bind, records: &[DesiredSrv]) {
    let mut target = PublishTarget::new(&dns.zone, dns.server());
    target.publish_address_records = true;
    let key = TsigKey::from_base64(&dns.key_name, "hmac-sha256", &dns.key_secret).unwrap();
    let publisher = Publisher::with_key(
        &target,
        Some(key),
        PublisherOptions::with_timeout(Duration::from_secs(3)),
    )
    .unwrap();
    publisher
        .publish(records, &BTreeSet::new())
        .await
        .expect("publish");
}

#[test]
fn no_srv_records_in_the_zone() {
    let Some(dns) = Bind::start("e2e_diagnose_no_srv") else {
        return;
    };
    let server = dns.addr().to_string();
    let (code, report, text) = diagnose(&["--domain", &dns.zone, "--dns", &server]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    assert_eq!(problems(&report)[0], "no_srv_records", "{report:#}");
    let check = checks_with(&report, "no_srv_records")[0];
    assert_eq!(check["step"], "srv");
    assert_eq!(check["subject"], "_vlmcs._tcp.kms.test");
    assert!(
        check["message"]
            .as_str()
            .unwrap()
            .contains("no SRV records found"),
        "{check:#}"
    );
    assert!(text.contains("[FAIL] srv"), "{text}");
    assert!(text.contains("0xC004F074"), "{text}");
    assert!(text.contains("slmgr /skms"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_to_a_closed_port_and_to_a_name_without_address() {
    let Some(dns) = Bind::start("e2e_diagnose_closed_port") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let closed = free_port(); // nothing listens there
    let loopback = ["127.0.0.1".parse().unwrap()];
    publish(
        &dns,
        &[
            DesiredSrv::new("dead.kms.test", closed, 0, 100).with_addresses(loopback),
            // Published without an A record: the name does not resolve.
            DesiredSrv::new("ghost.kms.test", node.kms_addr.port(), 5, 100),
            DesiredSrv::new("live.kms.test", node.kms_addr.port(), 10, 100)
                .with_addresses(loopback),
        ],
    )
    .await;
    let server = dns.addr().to_string();
    let (code, report, text) = tokio::task::spawn_blocking(move || {
        diagnose(&[
            "--domain",
            "kms.test",
            "--dns",
            &server,
            "--product",
            "server",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{report:#}");
    // The records, in the order clients try them, with their TTL.
    let records = report["checks"][0]["data"]["records"].as_array().unwrap();
    let targets: Vec<&str> = records
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        ["dead.kms.test", "ghost.kms.test", "live.kms.test"]
    );
    assert!(records.iter().all(|r| r["ttl"].as_u64().is_some()));
    assert!(text.contains("priority 0 weight 100 TTL"), "{text}");

    let refused = checks_with(&report, "connection_refused");
    assert_eq!(refused.len(), 1, "{report:#}");
    assert_eq!(
        refused[0]["subject"],
        format!("127.0.0.1:{closed} (dead.kms.test)")
    );
    assert!(refused[0]["message"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    let unresolved = checks_with(&report, "no_address");
    assert_eq!(unresolved.len(), 1, "{report:#}");
    assert_eq!(unresolved[0]["subject"], "ghost.kms.test");
    // The live host still answers: no summary failure, but the run is not ok.
    assert!(checks_with(&report, "no_kms_reachable").is_empty());
    let activations: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["step"] == "activate" && c["status"] == "ok")
        .collect();
    assert_eq!(activations.len(), 3, "v4, v5 and v6 on the live host");
    assert!(text.contains("First failure: connect"), "{text}");
}

#[test]
fn a_server_that_refuses_connections() {
    let port = free_port();
    let server = format!("127.0.0.1:{port}");
    let (code, report, text) = diagnose(&["--server", &server]);
    assert_eq!(code, 1);
    assert_eq!(
        problems(&report),
        ["connection_refused", "no_kms_reachable"],
        "{report:#}"
    );
    assert!(
        text.contains(&format!("connection refused on port {port}")),
        "{text}"
    );
    assert!(text.contains("0xC004F074"), "{text}");
    // A usage error is not a diagnosis.
    let out = Command::new(binary("kmsctl"))
        .args(["diagnose", "--server", "host:notaport"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(binary("kmsctl"))
        .args(["diagnose"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--domain or --server required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_three_node_cluster_found_through_dns() {
    let Some(dns) = Bind::start("e2e_diagnose_healthy") else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let n1 = Node::start_member(dirs[0].path(), 1, None, &[]);
    let n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), &[]);
    let n3 = Node::start_member(dirs[2].path(), 3, Some(&n1), &[]);
    let loopback = ["127.0.0.1".parse().unwrap()];
    publish(
        &dns,
        &[
            DesiredSrv::new("kms1.kms.test", n1.kms_addr.port(), 0, 100).with_addresses(loopback),
            DesiredSrv::new("kms2.kms.test", n2.kms_addr.port(), 0, 100).with_addresses(loopback),
            DesiredSrv::new("kms3.kms.test", n3.kms_addr.port(), 0, 100).with_addresses(loopback),
        ],
    )
    .await;
    // Windows Server needs N = 5: four other machines, diagnose is the fifth.
    let server = RequestTemplate::new(products::resolve("server").unwrap());
    for _ in 0..4 {
        activate_with(&n1, &server, uuid::Uuid::new_v4()).await;
    }
    let dns_addr = dns.addr().to_string();
    let admin = format!("http://{}", n2.admin_addr);
    let (code, report, text) = tokio::task::spawn_blocking(move || {
        diagnose(&[
            "--domain",
            "kms.test",
            "--dns",
            &dns_addr,
            "--product",
            "server",
            "--admin-url",
            &admin,
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{text}");
    assert_eq!(report["ok"], true);
    // DNS publishing is not configured on the nodes (records were added by hand): a warning.
    assert_eq!(problems(&report), ["dns_not_published"], "{text}");
    let checks = report["checks"].as_array().unwrap();
    let count = |step: &str| {
        checks
            .iter()
            .filter(|c| c["step"] == step && c["status"] == "ok")
            .count()
    };
    assert_eq!(count("resolve"), 3, "{text}");
    assert_eq!(count("connect"), 3, "{text}");
    assert_eq!(count("rpc_bind"), 3, "{text}");
    assert_eq!(count("activate"), 9, "v4, v5, v6 on each node: {text}");
    assert_eq!(count("count"), 3, "{text}");
    let counts: Vec<u64> = checks
        .iter()
        .filter(|c| c["step"] == "count")
        .map(|c| c["data"]["current_count"].as_u64().unwrap())
        .collect();
    assert!(counts.iter().all(|c| *c == 5), "{counts:?}");
    for step in ["host_status", "clock", "policy", "host_events"] {
        assert_eq!(count(step), 1, "{step}: {text}");
    }
    assert!(text.contains("quorum yes"), "{text}");
    assert!(text.contains("no problem found"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_policy_refuses_the_product() {
    let dir = tempfile::tempdir().unwrap();
    let office_csvlk = kms_catalog::catalog()
        .csvlks()
        .iter()
        .find(|c| c.name.starts_with("Office 2016"))
        .expect("Office 2016 CSVLK")
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
    let kms = node.kms();
    let admin = format!("http://{}", node.admin_addr);
    let (code, report, text) = tokio::task::spawn_blocking(move || {
        diagnose(&[
            "--server",
            &kms,
            "--product",
            "windows",
            "--admin-url",
            &admin,
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{text}");
    let p = problems(&report);
    for expected in [
        "product_refused",
        "policy_excludes_product",
        "recent_refusals",
    ] {
        assert!(p.iter().any(|x| x == expected), "{expected} in {p:?}");
    }
    assert_eq!(
        checks_with(&report, "product_refused").len(),
        3,
        "refused for v4, v5, v6"
    );
    assert!(text.contains("product policy is strict"), "{text}");
    assert!(text.contains("0xC004F042"), "{text}");
    // The refusals are the host's, not a connectivity problem.
    assert!(!p.iter().any(|x| x == "connection_refused"));
    // Office is licensed: the same host is fine for it (count below N aside).
    let kms = node.kms();
    let (_, office, _) =
        tokio::task::spawn_blocking(move || diagnose(&["--server", &kms, "--product", "office"]))
            .await
            .unwrap();
    assert_eq!(problems(&office), ["count_below_n"], "{office:#}");
}

#[test]
fn count_below_n() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let (code, report, text) = diagnose(&["--server", &node.kms(), "--product", "windows"]);
    assert_eq!(code, 1, "{text}");
    assert_eq!(problems(&report), ["count_below_n"], "{text}");
    let check = checks_with(&report, "count_below_n")[0];
    assert_eq!(check["data"]["current_count"], 1);
    assert_eq!(check["data"]["required_count"], 25);
    assert!(
        text.contains("count 1 is below N 25") && text.contains("0xC004F038"),
        "{text}"
    );
    assert!(text.contains("sysprep /generalize"), "{text}");
    // The fixed client machine id: running again does not raise the count.
    let (_, again, _) = diagnose(&["--server", &node.kms(), "--product", "windows"]);
    assert_eq!(
        checks_with(&again, "count_below_n")[0]["data"]["current_count"],
        1
    );
}
