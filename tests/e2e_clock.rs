//! Clock-safe cluster time with real `kmsd` processes on loopback, each under libfaketime
//! with its own timestamp file (tests/fixtures/install.sh installs libfaketime): the file is
//! rewritten to step one running process's wall clock (its monotonic clock is left alone,
//! as an NTP step or a restored VM does).
//!
//! * The leader's wall clock jumps 40 days forward: no count changes (the leader stamps real
//!   elapsed time, not its wall clock), and it hands leadership over and is not elected again
//!   while its clock is off; `/readyz` and `kms_clock_offset_seconds` say why.
//! * The leader's wall clock jumps 31 days back: the clients activated meanwhile are not
//!   stamped in the past (they would expire as soon as the clock is fixed and the count would
//!   fall back).
//!
//! The Raft transport is `--insecure-raft-transport` here so that only the clock differs
//! (with TLS, a node whose clock is 31 days back rejects its peers' certificates as not yet
//! valid and is cut off, which would hide what these tests check).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kms_tests::{http_get, metric_value, Node};
use kmsctl::products::{resolve, RequestTemplate};
use serde_json::Value;
use uuid::Uuid;

const EXTRA: &[&str] = &["--insecure-raft-transport"];

/// libfaketime's preload library; a clear failure when it is not installed.
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libfaketime not found (tried {candidates:?}): run tests/fixtures/install.sh")
        })
}

fn clock_file(dir: &Path) -> PathBuf {
    dir.join("faketime")
}

/// Steps the wall clock of the process started in `dir` (libfaketime re-reads the file).
fn set_clock(dir: &Path, offset: &str) {
    std::fs::write(clock_file(dir), format!("{offset}\n")).expect("write faketime file");
}

/// Node `node_id` under libfaketime (offset `+0` for now); joins `join` through its admin API.
fn start_faked(dir: &Path, node_id: u64, join: Option<&Node>) -> Node {
    let mut args: Vec<String> = vec!["--node-id".into(), node_id.to_string()];
    if let Some(j) = join {
        args.push("--join".into());
        args.push(format!("http://{}", j.admin_addr));
    }
    args.extend(EXTRA.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    set_clock(dir, "+0");
    let mut node = Node::new(dir, &refs);
    node.set_env("LD_PRELOAD", &libfaketime().to_string_lossy());
    node.set_env(
        "FAKETIME_TIMESTAMP_FILE",
        &clock_file(dir).to_string_lossy(),
    );
    node.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    node.set_env("FAKETIME_CACHE_DURATION", "1");
    node.spawn();
    node
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

fn faked_cluster(dirs: &[tempfile::TempDir]) -> Vec<Node> {
    let n1 = start_faked(dirs[0].path(), 1, None);
    let n2 = start_faked(dirs[1].path(), 2, Some(&n1));
    let n3 = start_faked(dirs[2].path(), 3, Some(&n1));
    let nodes = vec![n1, n2, n3];
    wait_until("3 voters on every node", Duration::from_secs(30), || {
        nodes.iter().all(|n| voters(n) == 3)
    });
    nodes
}

/// The leader every node agrees on.
fn agreed_leader(nodes: &[Node]) -> u64 {
    let mut leader = None;
    wait_until("one leader known to all", Duration::from_secs(20), || {
        let ids: Vec<Option<u64>> = nodes.iter().map(leader_id).collect();
        leader = ids[0];
        leader.is_some() && ids.iter().all(|id| *id == leader)
    });
    leader.expect("a leader")
}

async fn activate(node: &Node, cmid: Uuid) -> u32 {
    let t = RequestTemplate::new(resolve("windows").expect("windows template"));
    kms_tests::activate_with(node, &t, cmid).await.count
}

/// The Windows count `GET /api/v1/status` shows on `node`.
fn status_count(node: &Node) -> u64 {
    node.get_json("/api/v1/status")["current_count"]["Windows"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits (at most `timeout`, without failing) until every node knows a leader other than
/// `old`: the activations that follow then commit at once instead of racing the handover.
/// Whether the handover happened is asserted separately, after the counts.
fn settle_handover(nodes: &[Node], old: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if nodes
            .iter()
            .all(|n| leader_id(n).is_some_and(|id| id != old))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn readyz(node: &Node) -> (u16, String) {
    http_get(node.admin_addr, "/readyz").unwrap_or((0, String::new()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_clock_40_days_ahead_changes_no_count_and_loses_leadership() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = faked_cluster(&dirs);
    let leader = agreed_leader(&nodes);
    let li = (leader - 1) as usize;
    for i in 0..10u32 {
        assert_eq!(
            activate(&nodes[i as usize % 3], Uuid::new_v4()).await,
            i + 1
        );
    }

    // The leader's wall clock jumps 40 days forward.
    set_clock(dirs[li].path(), "+40d");
    // libfaketime re-reads the file within a second; the node checks its clock twice a
    // second and hands leadership over within about one election timeout.
    std::thread::sleep(Duration::from_secs(2));

    // No count changed, on any node (the jumped one included), and counting goes on
    // through every node.
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            status_count(n),
            10,
            "count on node {} after the jump",
            i + 1
        );
    }
    settle_handover(&nodes, leader, Duration::from_secs(20));
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            activate(n, Uuid::new_v4()).await,
            11 + i as u32,
            "count through node {} after the leader's clock jumped 40 days",
            i + 1
        );
    }

    // The jumped node does not lead, and says why.
    wait_until("another leader", Duration::from_secs(20), || {
        nodes
            .iter()
            .all(|n| leader_id(n).is_some_and(|id| id != leader))
    });
    let (status, body) = readyz(&nodes[li]);
    assert_eq!(status, 503, "readyz of the jumped node: {body}");
    assert!(body.contains("clock"), "readyz names the clock: {body}");
    let (_, metrics) = http_get(nodes[li].admin_addr, "/metrics").expect("metrics");
    let offset = metric_value(&metrics, "kms_clock_offset_seconds").expect("offset gauge");
    assert!(
        offset > 39.0 * 86_400.0,
        "kms_clock_offset_seconds {offset}"
    );
    let events = nodes[li].get_json("/api/v1/events?limit=1000");
    assert!(
        events.to_string().contains("does not stand as leader"),
        "clock event: {events}"
    );
    assert!(nodes[li]
        .log()
        .contains("this node does not stand as leader"));

    // Even when the new leader dies, the jumped node (whose log is as complete) is not
    // elected: the third node is.
    let new_leader = leader_id(&nodes[(li + 1) % 3]).expect("new leader");
    let ni = (new_leader - 1) as usize;
    let third = (0..3).find(|i| *i != li && *i != ni).expect("third node");
    nodes[ni].kill9();
    wait_until("the third node leads", Duration::from_secs(30), || {
        leader_id(&nodes[third]) == Some(third as u64 + 1)
    });
    for _ in 0..20 {
        assert_ne!(leader_id(&nodes[li]), Some(leader), "the jumped node leads");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(activate(&nodes[li], Uuid::new_v4()).await, 14);
    nodes[ni].spawn();

    // The clock is fixed: the node may lead again and is ready.
    set_clock(dirs[li].path(), "+0");
    wait_until("the node is ready again", Duration::from_secs(30), || {
        readyz(&nodes[li]).0 == 200
    });
    wait_until(
        "every node applied 14 clients",
        Duration::from_secs(20),
        || nodes.iter().all(|n| status_count(n) == 14),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_clock_31_days_back_never_makes_counts_go_backwards() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = faked_cluster(&dirs);
    let leader = agreed_leader(&nodes);
    let li = (leader - 1) as usize;
    for i in 0..10u32 {
        assert_eq!(
            activate(&nodes[i as usize % 3], Uuid::new_v4()).await,
            i + 1
        );
    }

    // The leader's wall clock jumps 31 days back; 5 clients activate meanwhile.
    set_clock(dirs[li].path(), "-31d");
    std::thread::sleep(Duration::from_secs(2));
    settle_handover(&nodes, leader, Duration::from_secs(20));
    for i in 0..5u32 {
        assert_eq!(
            activate(&nodes[i as usize % 3], Uuid::new_v4()).await,
            11 + i,
            "count while the leader's clock is 31 days back"
        );
    }
    // Asserted last: the counts are what matters.
    let readyz_while_back = readyz(&nodes[li]);
    let handed_over = nodes
        .iter()
        .all(|n| leader_id(n).is_some_and(|id| id != leader));

    // The clock is fixed. Clients stamped 31 days in the past would now be expired and the
    // count would fall back to 11.
    set_clock(dirs[li].path(), "+0");
    wait_until("the node is ready again", Duration::from_secs(30), || {
        readyz(&nodes[li]).0 == 200
    });
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            activate(n, Uuid::new_v4()).await,
            16 + i as u32,
            "count through node {} after the clock was fixed",
            i + 1
        );
    }
    let mut counts = Vec::new();
    let shows_18 = (0..200).any(|_| {
        counts = nodes.iter().map(status_count).collect::<Vec<_>>();
        counts.iter().all(|c| *c == 18) || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(shows_18, "counts the nodes show: {counts:?}, not 18");
    assert!(
        handed_over,
        "the node whose clock went back kept leading (node {leader})"
    );
    let (status, body) = readyz_while_back;
    assert_eq!(
        status, 503,
        "readyz of the node whose clock went back: {body}"
    );
    assert!(body.contains("clock"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_down_longer_than_the_max_offset_elects_and_keeps_counts() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = faked_cluster(&dirs);
    agreed_leader(&nodes);
    for i in 0..5u32 {
        assert_eq!(
            activate(&nodes[i as usize % 3], Uuid::new_v4()).await,
            i + 1
        );
    }
    for n in nodes.iter_mut() {
        n.terminate();
    }
    // Two hours later (as the nodes see it): every node finds the log's last time two hours
    // old. None is fit to lead at first; after the leaderless grace one stands, a quorum
    // elects it and its wall clock becomes the cluster time.
    for (d, n) in dirs.iter().zip(nodes.iter_mut()) {
        set_clock(d.path(), "+2h");
        n.spawn_no_wait();
    }
    let started = Instant::now();
    for n in nodes.iter_mut() {
        n.wait_ready(Duration::from_secs(90));
    }
    eprintln!("ready after {:?}", started.elapsed());
    let leader = agreed_leader(&nodes);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(status_count(n), 5, "count on node {}", i + 1);
        assert_eq!(readyz(n).0, 200, "node {} ready", i + 1);
    }
    assert!(nodes[(leader - 1) as usize]
        .log()
        .contains("its wall clock becomes the cluster time"));
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(activate(n, Uuid::new_v4()).await, 6 + i as u32);
    }
}
