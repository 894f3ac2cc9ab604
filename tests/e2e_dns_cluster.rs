//! Leader-managed SRV publishing by real `kmsd` nodes into a real BIND 9: records appear with
//! each node's priority, weight, port and target; a `kill -9`-ed node is withdrawn within the
//! documented bound; a graceful stop withdraws before the node exits; records of other
//! owners stay; a wrong TSIG key gives failure events and metrics while activations go on.

#[path = "../crates/kms-dns/tests/support/bind.rs"]
mod bind;

use std::path::Path;
use std::time::{Duration, Instant};

use bind::Bind;
use kms_tests::{http_get, metric_value, Node};
use kmsctl::products::{resolve, RequestTemplate};
use uuid::Uuid;

/// Withdrawal bound for a killed node: 2 failed probes 1 s apart, a leader election if the
/// killed node led, and one publish round (documented in the README).
const WITHDRAW_BOUND: Duration = Duration::from_secs(15);

fn config(dir: &Path, dns: &Bind, node: u64, priority: u16, secret_file: &Path) -> String {
    let path = dir.join(format!("node{node}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[node]
advertise_host = "node{node}.{zone}"

[[dns.publish]]
zone = "{zone}"
server = "{server}"
tsig_key_name = "{key}"
tsig_algorithm = "hmac-sha256"
tsig_secret_file = "{secret}"
ttl = 60
priority = {priority}
weight = 100
"#,
            zone = dns.zone,
            server = dns.server(),
            key = dns.key_name,
            secret = secret_file.display(),
        ),
    )
    .unwrap();
    path.display().to_string()
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check() {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn has_target(srv: &[String], node: &Node, host: &str) -> bool {
    srv.iter()
        .any(|l| l.ends_with(&format!(" {} {host}.", node.kms_addr.port())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_follow_the_healthy_members() {
    let Some(dns) = Bind::start("e2e_dns_cluster") else {
        return;
    };
    let foreign = format!(
        "update add _vlmcs._tcp.{}. 60 IN SRV 5 5 1688 foreign.example.\nsend\n",
        dns.zone
    );
    let (ok, out) = dns.nsupdate_other(&foreign);
    assert!(ok, "foreign record: {out}");
    let secret = dns.secret_file();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let cfg: Vec<String> = (0..3)
        .map(|i| {
            config(
                dirs[i].path(),
                &dns,
                i as u64 + 1,
                if i == 2 { 10 } else { 0 },
                &secret,
            )
        })
        .collect();
    let n1 = Node::start_member(dirs[0].path(), 1, None, &["--config", &cfg[0]]);
    let mut n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), &["--config", &cfg[1]]);
    let mut n3 = Node::start_member(dirs[2].path(), 3, Some(&n1), &["--config", &cfg[2]]);
    let z = dns.zone.clone();
    wait_until("3 SRV records", Duration::from_secs(20), || {
        let srv = dns.srv();
        has_target(&srv, &n1, &format!("node1.{z}"))
            && has_target(&srv, &n2, &format!("node2.{z}"))
            && has_target(&srv, &n3, &format!("node3.{z}"))
    });
    let srv = dns.srv();
    assert!(
        srv.contains(&format!("0 100 {} node1.{z}.", n1.kms_addr.port())),
        "{srv:?}"
    );
    assert!(
        srv.contains(&format!("0 100 {} node2.{z}.", n2.kms_addr.port())),
        "{srv:?}"
    );
    assert!(
        srv.contains(&format!("10 100 {} node3.{z}.", n3.kms_addr.port())),
        "{srv:?}"
    );
    assert!(
        srv.contains(&"5 5 1688 foreign.example.".to_owned()),
        "{srv:?}"
    );
    assert_eq!(dns.srv_ttl(), Some(60));
    // `kmsctl discover` lists them in the order a client would try: priority 0 first.
    let out = std::process::Command::new(kms_tests::binary("kmsctl"))
        .args([
            "discover",
            &dns.zone,
            "--dns",
            &dns.addr().to_string(),
            "--seed",
            "7",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let order = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(lines.len(), 4, "{order}");
    assert!(
        lines[2].contains("foreign.example") && lines[2].contains("priority 5"),
        "{order}"
    );
    assert!(
        lines[3].contains("node3.") && lines[3].contains("priority 10"),
        "{order}"
    );
    assert!(
        lines[0].contains("priority 0") && lines[1].contains("priority 0"),
        "{order}"
    );
    let status = n1.get_json("/api/v1/status");
    assert!(
        status.to_string().contains(&dns.zone),
        "status shows DNS publishing: {status}"
    );

    // kill -9 of node 3: the leader withdraws its record within the bound.
    n3.kill9();
    let took = wait_until("node 3 withdrawn", WITHDRAW_BOUND, || {
        !has_target(&dns.srv(), &n3, &format!("node3.{z}"))
    });
    eprintln!("killed node withdrawn after {took:?}");
    let srv = dns.srv();
    assert!(
        has_target(&srv, &n1, &format!("node1.{z}"))
            && has_target(&srv, &n2, &format!("node2.{z}"))
    );
    assert!(
        srv.contains(&"5 5 1688 foreign.example.".to_owned()),
        "foreign record kept: {srv:?}"
    );

    // A graceful stop withdraws first: the record is gone when the process has exited.
    assert_eq!(n2.terminate(), Some(0), "clean exit; log:\n{}", n2.log());
    let srv = dns.srv();
    assert!(
        !has_target(&srv, &n2, &format!("node2.{z}")),
        "node 2 still published after stopping: {srv:?}"
    );
    assert!(
        n2.log().contains("withdraw"),
        "the stop withdrew the record:\n{}",
        n2.log()
    );
    assert!(
        srv.contains(&"5 5 1688 foreign.example.".to_owned()),
        "foreign record kept: {srv:?}"
    );
    drop(n1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_is_reported_and_activations_go_on() {
    let Some(dns) = Bind::start("e2e_dns_refused") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.secret");
    // A valid base64 HMAC key the server does not know under this name.
    std::fs::write(&wrong, "c2VjcmV0LXRoYXQtZG9lcy1ub3QtbWF0Y2gtYW55dGhpbmc=\n").unwrap();
    let cfg = config(dir.path(), &dns, 1, 0, &wrong);
    let node = Node::start(dir.path(), &["--config", &cfg]);
    wait_until("a 12293 event", Duration::from_secs(15), || {
        node.get_json("/api/v1/events?event_id=12293")
            .to_string()
            .contains("NOTAUTH")
    });
    let (_, metrics) = http_get(node.admin_addr, "/metrics").unwrap();
    assert!(
        metric_value(&metrics, "kms_dns_publish_failures_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(dns.srv().is_empty(), "nothing published with a wrong key");
    // Activations are unaffected.
    let t = RequestTemplate::new(resolve("windows").unwrap());
    assert_eq!(
        kms_tests::activate_with(&node, &t, Uuid::new_v4())
            .await
            .count,
        1
    );
    assert!(node.log().contains("NOTAUTH"), "the failure is logged");
}
