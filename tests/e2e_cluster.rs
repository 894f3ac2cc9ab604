//! The replicated cluster with real `kmsd` processes on loopback: formation with `--join`,
//! one shared count, one identity, leader `kill -9` under load without losing an acknowledged
//! activation, restart and catch-up, a 4th node by snapshot, removal, and a 2-of-3 outage.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_tests::{binary, http_request, Node};
use kmsctl::products::{resolve, RequestTemplate};
use serde_json::Value;
use uuid::Uuid;

async fn activate(node: &Node, cmid: Uuid) -> kms_tests::Seen {
    let t = RequestTemplate::new(resolve("windows").unwrap());
    kms_tests::activate_with(node, &t, cmid).await
}

fn cluster_json(node: &Node) -> Value {
    node.get_json("/api/v1/cluster")
}

fn leader_id(node: &Node) -> Option<u64> {
    cluster_json(node)["leader_id"].as_u64()
}

fn voters(node: &Node) -> usize {
    cluster_json(node)["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] != "learner").count())
        .unwrap_or(0)
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Every CMID registered on `node` (all pages).
fn registered_cmids(node: &Node) -> BTreeSet<Uuid> {
    let mut all = BTreeSet::new();
    let mut offset = 0;
    loop {
        let page = node.get_json(&format!("/api/v1/clients?limit=1000&offset={offset}"));
        let clients = page["clients"].as_array().cloned().unwrap_or_default();
        for c in &clients {
            if let Some(id) = c["cmid"].as_str().and_then(|s| s.parse().ok()) {
                all.insert(id);
            }
        }
        offset += clients.len();
        if clients.is_empty() || offset as u64 >= page["total"].as_u64().unwrap_or(0) {
            return all;
        }
    }
}

fn three_nodes(dirs: &[tempfile::TempDir], extra: &[&str]) -> Vec<Node> {
    let n1 = Node::start_member(dirs[0].path(), 1, None, extra);
    let n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), extra);
    // Node 3 asks node 2, a follower, which forwards the join to the leader.
    let n3 = Node::start_member(dirs[2].path(), 3, Some(&n2), extra);
    let nodes = vec![n1, n2, n3];
    wait_until("3 voters on every node", Duration::from_secs(20), || {
        nodes.iter().all(|n| voters(n) == 3)
    });
    nodes
}

fn dirs(n: usize) -> Vec<tempfile::TempDir> {
    (0..n).map(|_| tempfile::tempdir().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formation_shared_count_identity_snapshot_join_and_removal() {
    let dirs = dirs(4);
    let extra = ["--snapshot-every", "20", "--snapshot-keep-logs", "0"];
    let mut nodes = three_nodes(&dirs[..3], &extra);

    // One leader, known to all.
    let leader = leader_id(&nodes[0]).expect("a leader");
    for n in &nodes {
        assert_eq!(leader_id(n), Some(leader));
        let members = cluster_json(n)["members"].as_array().unwrap().clone();
        assert_eq!(members.len(), 3);
        for m in &members {
            for field in ["id", "role", "raft_addr", "admin_addr"] {
                assert!(!m[field].is_null(), "member lacks {field}: {m}");
            }
        }
    }

    // Activations through each node raise ONE count, with one ePID and HWID.
    let mut seen = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let s = activate(n, Uuid::new_v4()).await;
        assert_eq!(s.count, i as u32 + 1, "count through node {}", i + 1);
        seen.push(s);
    }
    assert!(
        seen.iter().all(|s| s.epid == seen[0].epid),
        "ePIDs differ between nodes"
    );
    assert!(
        seen.iter().all(|s| s.hwid == seen[0].hwid),
        "HWIDs differ between nodes"
    );
    assert!(seen[0].hwid.is_some());

    // Charge enough to compact the log, then a 4th node joins and must catch up by snapshot.
    for _ in 0..60 {
        activate(&nodes[1], Uuid::new_v4()).await;
    }
    let n4 = Node::start_member(dirs[3].path(), 4, Some(&nodes[2]), &extra);
    wait_until("4 voters", Duration::from_secs(30), || {
        voters(&nodes[0]) == 4
    });
    wait_until(
        "node 4 installed a snapshot",
        Duration::from_secs(10),
        || n4.log().contains("snapshot installed from the leader"),
    );
    let s4 = activate(&n4, Uuid::new_v4()).await;
    assert_eq!(
        s4.count, 50,
        "node 4 sees the cluster's count (capped at 2 x 25)"
    );
    assert_eq!(s4.epid, seen[0].epid);
    // Committed through the leader; node 4 applies it a moment later.
    wait_until(
        "node 4 applied every client",
        Duration::from_secs(10),
        || registered_cmids(&n4).len() == 3 + 60 + 1,
    );

    // Remove node 4: a follower's admin API redirects to the leader's (writes are never
    // relayed between nodes); kmsctl follows the redirect.
    let leader = leader_id(&nodes[0]).expect("a leader");
    let (follower, leader_admin) = match leader {
        1 => (&nodes[1], nodes[0].admin_addr),
        n => (&nodes[0], nodes[(n - 1) as usize].admin_addr),
    };
    let (status, body, location) = kms_tests::http_request_full(
        follower.admin_addr,
        "DELETE",
        "/api/v1/cluster/members/4",
        None,
    )
    .unwrap();
    assert_eq!(status, 307, "remove on a follower: {body}");
    assert_eq!(
        location.as_deref(),
        Some(format!("http://{leader_admin}/api/v1/cluster/members/4").as_str())
    );
    let out = Command::new(binary("kmsctl"))
        .args([
            "cluster",
            "remove",
            "--url",
            &format!("http://{}", follower.admin_addr),
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("3 members again", Duration::from_secs(20), || {
        cluster_json(&nodes[0])["members"].as_array().map(Vec::len) == Some(3)
    });
    drop(n4);
    // Removing it again: 404, and `kmsctl cluster remove --ignore-missing` treats that as done.
    let (status, _) = http_request(
        nodes[0].admin_addr,
        "DELETE",
        "/api/v1/cluster/members/4",
        None,
    )
    .unwrap();
    assert_eq!(status, 404);
    let kmsctl = |extra: &[&str]| {
        let admin = format!("http://{}", nodes[0].admin_addr);
        let mut args = vec!["cluster", "remove", "--url", admin.as_str(), "4"];
        args.extend_from_slice(extra);
        Command::new(binary("kmsctl")).args(&args).output().unwrap()
    };
    assert_eq!(
        kmsctl(&[]).status.code(),
        Some(5),
        "a missing member is an API error"
    );
    let out = kmsctl(&["--ignore-missing"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A restarted node rejoins from its data dir alone (no --join needed) and catches up.
    nodes[2].kill9();
    activate(&nodes[0], Uuid::new_v4()).await;
    nodes[2].spawn();
    wait_until("node 3 caught up", Duration::from_secs(30), || {
        registered_cmids(&nodes[2]).len() == 3 + 60 + 1 + 1
    });
}

/// Runs `kmsctl bench` against `node` writing acknowledged CMIDs to `out`.
fn bench(node: &Node, out: &std::path::Path, requests: u64) -> Child {
    Command::new(binary("kmsctl"))
        .args([
            "bench",
            "--server",
            &node.kms(),
            "--concurrency",
            "8",
            "--requests",
        ])
        .arg(requests.to_string())
        .args([
            "--duration-secs",
            "25",
            "--timeout-secs",
            "10",
            "--products",
            "windows,office",
            "--json",
        ])
        .arg("--acked-out")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kmsctl bench")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_9_under_load_loses_no_acknowledged_activation() {
    let dirs = dirs(3);
    let mut nodes = three_nodes(&dirs, &[]);
    let leader = leader_id(&nodes[0]).expect("leader") as usize;
    let work = tempfile::tempdir().unwrap();
    let mut benches = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let out = work.path().join(format!("acked-{}.txt", i + 1));
        benches.push((bench(n, &out, 4000), out));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    nodes[leader - 1].kill9();
    let survivor = if leader == 1 { 1 } else { 0 };
    // A new leader takes over.
    wait_until("a new leader", Duration::from_secs(10), || {
        leader_id(&nodes[survivor]).is_some_and(|l| l as usize != leader)
    });
    let failover = killed_at.elapsed();
    let mut acked = BTreeSet::new();
    for (child, out) in benches {
        let output = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&output.stdout).to_string();
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        let before = acked.len();
        acked.extend(text.lines().filter_map(|l| l.parse::<Uuid>().ok()));
        eprintln!(
            "bench {}: {} acked; {report}",
            out.display(),
            acked.len() - before
        );
    }
    assert!(
        acked.len() > 1000,
        "too few acknowledged activations: {}",
        acked.len()
    );
    // The killed node comes back and catches up.
    nodes[leader - 1].spawn();
    for n in &nodes {
        wait_until(
            "every acknowledged CMID registered",
            Duration::from_secs(60),
            || {
                let have = registered_cmids(n);
                acked.iter().all(|c| have.contains(c))
            },
        );
        let status = n.get_json("/api/v1/status");
        assert_eq!(
            status["queued_activations"].as_u64().unwrap_or(0),
            0,
            "{status}"
        );
    }
    eprintln!(
        "leader {leader} killed; new leader after {failover:?}; {} acknowledged CMIDs all present on 3 nodes",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_node_keeps_answering_and_reconciles() {
    let dirs = dirs(3);
    let mut nodes = three_nodes(&dirs, &["--answer-deadline-ms", "1000"]);
    for _ in 0..5 {
        activate(&nodes[0], Uuid::new_v4()).await;
    }
    // Two of three nodes die, the leader among them if it is not node 1.
    nodes[1].kill9();
    nodes[2].kill9();
    let mut counts = Vec::new();
    let mut during = Vec::new();
    for _ in 0..6 {
        let cmid = Uuid::new_v4();
        let started = Instant::now();
        let s = activate(&nodes[0], cmid).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "minority answer took {:?}",
            started.elapsed()
        );
        counts.push(s.count);
        during.push(cmid);
    }
    assert_eq!(
        counts,
        vec![6, 7, 8, 9, 10, 11],
        "counts keep rising from the committed state"
    );
    let status = nodes[0].get_json("/api/v1/status");
    assert!(
        status["queued_activations"].as_u64().unwrap_or(0) >= 6,
        "{status}"
    );
    assert!(nodes[0].log().contains("no quorum"), "the outage is logged");
    // It stays in a load balancer's rotation: ready for KMS clients.
    let (code, body) = kms_tests::http_get(nodes[0].admin_addr, "/readyz?for=kms").unwrap();
    assert_eq!(code, 200, "{body}");
    // The others return; the queue is proposed and every node ends with the same count.
    nodes[1].spawn_no_wait();
    nodes[2].spawn_no_wait();
    wait_until("queue reconciled", Duration::from_secs(30), || {
        nodes[0].get_json("/api/v1/status")["queued_activations"].as_u64() == Some(0)
    });
    // Generous: restarts share the cores with the other test binaries in CI.
    for n in &mut nodes {
        n.wait_ready(Duration::from_secs(60));
    }
    for n in &nodes {
        wait_until("outage CMIDs replicated", Duration::from_secs(30), || {
            let have = registered_cmids(n);
            during.iter().all(|c| have.contains(c))
        });
    }
    // The count never went backwards: the next new client sees 12.
    assert_eq!(activate(&nodes[1], Uuid::new_v4()).await.count, 12);
}

fn kmsd_offline(node: &Node, args: &[&str]) -> (i32, String, String) {
    // Options go before the subcommand.
    let out = Command::new(binary("kmsd"))
        .arg("--data-dir")
        .arg(&node.data_dir)
        .arg("--raft-listen")
        .arg(node.raft_addr.to_string())
        .arg("--admin-listen")
        .arg(node.admin_addr.to_string())
        .arg("--kms-listen")
        .arg(node.kms_addr.to_string())
        .args(["--node-id", "1"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_quorum_forced_single_node_recovery_keeps_identity_and_counts() {
    let dirs = dirs(4);
    let mut nodes = three_nodes(&dirs[..3], &[]);
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(activate(&nodes[0], Uuid::new_v4()).await);
    }
    let old_cluster = cluster_json(&nodes[0])["cluster_id"].clone();
    // Two of three machines are gone for good; the survivor is stopped for the recovery.
    nodes[1].kill9();
    nodes[2].kill9();
    assert_eq!(nodes[0].terminate(), Some(0));
    let (code, out, err) = kmsd_offline(&nodes[0], &["inspect"]);
    assert_eq!(code, 0, "{err}");
    let inspected: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspected["registered_clients"], 10, "{inspected}");
    assert_eq!(inspected["voters"].as_array().map(Vec::len), Some(3));
    // recover refuses without the explicit flag, then recovers, then is a no-op.
    let (code, _, _) = kmsd_offline(&nodes[0], &["recover"]);
    assert_eq!(code, 2);
    let (code, out, err) = kmsd_offline(&nodes[0], &["recover", "--force-single-node"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recovered"), "{out}");
    let (code, out, _) = kmsd_offline(&nodes[0], &["recover", "--force-single-node"]);
    assert_eq!(code, 0);
    assert!(out.contains("already recovered"), "{out}");

    // The survivor leads a one-node cluster with the same identity and counts.
    nodes[0].spawn();
    let c = cluster_json(&nodes[0]);
    assert_eq!(c["leader_id"], 1, "{c}");
    assert_eq!(c["members"].as_array().map(Vec::len), Some(1), "{c}");
    assert_ne!(c["cluster_id"], old_cluster, "a new cluster generation");
    let after = activate(&nodes[0], Uuid::new_v4()).await;
    assert_eq!(after.count, 11);
    assert_eq!(after.epid, seen[0].epid);
    assert_eq!(after.hwid, seen[0].hwid);
    // A replacement node joins it from an empty data dir.
    let n4 = Node::start_member(dirs[3].path(), 4, Some(&nodes[0]), &[]);
    wait_until("2 voters", Duration::from_secs(30), || {
        voters(&nodes[0]) == 2
    });
    wait_until("node 4 has the registry", Duration::from_secs(30), || {
        registered_cmids(&n4).len() == 11
    });
}
