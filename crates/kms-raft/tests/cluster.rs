//! Three Raft nodes in one process on loopback: formation, one shared count, forwarding,
//! leader loss, snapshot catch-up, removal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_core::{ActivationOutcome, ActivationRequest};
use kms_raft::cluster::NodeRole;
use kms_raft::{Cluster, ClusterConfig, ClusterError, KmsNode};

use kms_store::SledStorage;
use uuid::Uuid;

use kms_testkit::free_port;

struct TestNode {
    id: u64,
    cluster: Cluster,
    _dir: tempfile::TempDir,
}

/// What kmsd does after the identity: replicate the built-in product catalog (`apply`
/// decides with the replicated one only).
async fn init_catalog(cluster: &Cluster) {
    let result = cluster
        .propose(kms_core::Command::InitCatalog(kms_core::CatalogUpdate {
            catalog: kms_catalog::CatalogData::builtin(),
            epids: Default::default(),
        }))
        .await
        .unwrap();
    assert!(
        matches!(result, kms_core::CommandResult::Catalog(Ok(_))),
        "{result:?}"
    );
}

async fn start(id: u64, bootstrap: bool, snapshot_every: u64) -> TestNode {
    start_with(id, bootstrap, snapshot_every, |_| {}).await
}

async fn start_with(
    id: u64,
    bootstrap: bool,
    snapshot_every: u64,
    tweak: impl FnOnce(&mut ClusterConfig),
) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = ClusterConfig::new(
        id,
        addr.parse().unwrap(),
        KmsNode {
            raft_addr: addr.clone(),
            admin_addr: format!("127.0.0.1:{}", free_port()),
            ..Default::default()
        },
    );
    config.bootstrap = bootstrap;
    config.snapshot_every = snapshot_every;
    config.keep_logs_after_snapshot = 0;
    tweak(&mut config);
    let storage = SledStorage::open(dir.path()).unwrap();
    let cluster = Cluster::start(config, Arc::new(storage)).await.unwrap();
    TestNode {
        id,
        cluster,
        _dir: dir,
    }
}

/// Node 1 bootstraps and creates the identity; nodes 2 and 3 are added through it.
async fn three_nodes(tweak: impl Fn(&mut ClusterConfig)) -> [TestNode; 3] {
    let n1 = start_with(1, true, 1000, &tweak).await;
    n1.cluster
        .ensure_identity(Duration::from_secs(10))
        .await
        .unwrap();
    init_catalog(&n1.cluster).await;
    let n2 = start_with(2, false, 1000, &tweak).await;
    let n3 = start_with(3, false, 1000, &tweak).await;
    for n in [&n2, &n3] {
        n1.cluster
            .add_member(n.id, n.cluster.advertised().clone())
            .await
            .unwrap();
    }
    [n1, n2, n3]
}

fn request(cmid: Uuid) -> ActivationRequest {
    ActivationRequest {
        application_id: kms_catalog::well_known::WINDOWS,
        sku_id: Uuid::parse_str("73111121-5638-40f6-bc11-f1d7b0d64300").unwrap(),
        kms_counted_id: Uuid::parse_str("58e2134f-8e11-4d17-9cb2-91069c151148").unwrap(),
        client_machine_id: cmid,
        previous_client_machine_id: Uuid::nil(),
        required_client_count: 25,
        license_status: 2,
        binding_expiration: 43200,
        is_client_vm: false,
        // Now: the host's clock check (4 hours) is on by default.
        request_time: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 11_644_473_600_000)
            * 10_000,
        workstation_name: "ws".into(),
        protocol_major: 6,
        protocol_minor: 0,
        client_address: None,
    }
}

async fn count(node: &TestNode, cmid: Uuid) -> u32 {
    match node.cluster.activate(request(cmid)).await.unwrap() {
        ActivationOutcome::Granted(g) => g.current_count,
        ActivationOutcome::Refused(r) => panic!("refused {r:?}"),
    }
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_count_as_one_host() {
    let n1 = start(1, true, 50).await;
    let identity = n1
        .cluster
        .ensure_identity(Duration::from_secs(10))
        .await
        .unwrap();
    init_catalog(&n1.cluster).await;
    // Charge some state before the others join, so node 3 needs a snapshot.
    for _ in 0..120 {
        count(&n1, Uuid::new_v4()).await;
    }
    let n2 = start(2, false, 50).await;
    let n3 = start(3, false, 50).await;
    n1.cluster
        .add_member(2, n2.cluster.advertised().clone())
        .await
        .unwrap();
    // Membership changes are made on the leader only: a follower names the leader (it never
    // relays them to it).
    match n2
        .cluster
        .add_member(3, n3.cluster.advertised().clone())
        .await
    {
        Err(ClusterError::NotLeader {
            leader: Some((1, _)),
        }) => {}
        other => panic!("a follower accepted a membership change: {other:?}"),
    }
    n1.cluster
        .add_member(3, n3.cluster.advertised().clone())
        .await
        .unwrap();
    wait_for("3 voters everywhere", Duration::from_secs(10), || {
        [&n1, &n2, &n3]
            .iter()
            .all(|n| n.cluster.members().iter().filter(|m| m.voter).count() == 3)
    })
    .await;
    // Node 3 joined after the log was compacted: it caught up by installing a snapshot.
    let n3_snapshot = n3.cluster.raft().metrics().borrow().snapshot;
    assert!(
        n3_snapshot.is_some_and(|s| s.index >= 50),
        "node 3 got no snapshot: {n3_snapshot:?}"
    );
    // The joiners have the same identity (replicated, not generated).
    for n in [&n2, &n3] {
        let id = n
            .cluster
            .ensure_identity(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(id, identity, "node {} has another identity", n.id);
    }
    // One shared count: activations through each node raise the same counter.
    let base = 50; // capped at 2 x 25 after 120 clients
    assert_eq!(count(&n1, Uuid::new_v4()).await, base);
    // A renewal of a known client through a follower does not raise the count.
    let known = Uuid::new_v4();
    let c2 = count(&n2, known).await;
    let c3 = count(&n3, known).await;
    assert_eq!(c2, c3);
    // Removing node 3 leaves a 2-voter cluster that keeps committing.
    n1.cluster.remove_member(3).await.unwrap();
    wait_for("2 voters", Duration::from_secs(10), || {
        n1.cluster.members().iter().filter(|m| m.voter).count() == 2
    })
    .await;
    count(&n2, Uuid::new_v4()).await;
    n3.cluster.shutdown().await;
    n2.cluster.shutdown().await;
    n1.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_takes_over_and_no_acknowledged_activation_is_lost() {
    let [n1, n2, n3] = three_nodes(|_| {}).await;
    let mut acked = Vec::new();
    for i in 0..30u128 {
        let cmid = Uuid::from_u128(i + 1);
        let node = [&n1, &n2, &n3][(i % 3) as usize];
        count(node, cmid).await;
        acked.push(cmid);
    }
    let leader = n1.cluster.view().leader_id.unwrap();
    let (survivors, dead): (Vec<&TestNode>, Vec<&TestNode>) =
        [&n1, &n2, &n3].into_iter().partition(|n| n.id != leader);
    dead[0].cluster.shutdown().await;
    let started = Instant::now();
    wait_for("a new leader", Duration::from_secs(10), || {
        survivors
            .iter()
            .any(|n| n.cluster.view().role == NodeRole::Leader)
    })
    .await;
    let failover = started.elapsed();
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    // Every acknowledged CMID is in the registry of both survivors. An entry is acknowledged
    // once a majority has it, so the lagging survivor may receive it only from the new leader.
    for n in &survivors {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = n.cluster.state();
            let missing: Vec<Uuid> = {
                let state = state.read().await;
                acked
                    .iter()
                    .filter(|c| state.client(c).is_empty())
                    .copied()
                    .collect()
            };
            if missing.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "node {} lost {missing:?}", n.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // And the survivors keep committing.
    count(survivors[0], Uuid::new_v4()).await;
    for n in survivors {
        n.cluster.shutdown().await;
    }
}

/// A leader stopping gracefully hands over. With a 4 s lease and 3-4 s election timeouts the
/// followers cannot elect on their own until 7 s after the last heartbeat; the handover waits
/// out the lease only, so a leader must be back well before that, and it must be the voter
/// that holds the whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_leader_hands_over_before_the_followers_could_elect() {
    let slow_elections = |c: &mut ClusterConfig| {
        c.heartbeat_ms = 100;
        c.election_timeout_ms = (3_000, 4_000);
    };
    let [n1, n2, n3] = three_nodes(slow_elections).await;
    wait_for("3 voters", Duration::from_secs(10), || {
        n1.cluster.members().iter().filter(|m| m.voter).count() == 3
    })
    .await;
    for i in 0..20u128 {
        count([&n1, &n2, &n3][(i % 3) as usize], Uuid::from_u128(i + 1)).await;
    }
    assert_eq!(n1.cluster.view().leader_id, Some(1));
    let term = n1.cluster.view().term;

    // What kmsd does on SIGTERM: step down, then stop.
    let started = Instant::now();
    n1.cluster.step_down().await;
    n1.cluster.shutdown().await;
    let survivors = [&n2, &n3];
    wait_for("a leader handed over", Duration::from_secs(6), || {
        survivors
            .iter()
            .any(|n| n.cluster.view().role == NodeRole::Leader)
    })
    .await;
    let gap = started.elapsed();
    assert!(
        gap < Duration::from_millis(6_500),
        "leader back after {gap:?}: the followers' own timers, not a handover"
    );
    // One election won at the first try: a candidate that stood while the lease held would
    // have lost and stood again in a later term.
    let new_term = survivors
        .iter()
        .map(|n| n.cluster.view())
        .find(|v| v.role == NodeRole::Leader)
        .map(|v| v.term);
    assert_eq!(new_term, Some(term + 1));
    // The new leader has every activation and keeps committing.
    assert_eq!(count(&n2, Uuid::from_u128(1)).await, 20);
    assert_eq!(count(&n3, Uuid::new_v4()).await, 21);
    for n in survivors {
        n.cluster.shutdown().await;
    }
}

/// `ensure_identity` must not hold a read guard while it takes another: with a writer
/// (`apply`) queued in between, tokio's fair RwLock would deadlock it. Seen in CI as a joining
/// node that never opened its KMS listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ensure_identity_does_not_deadlock_against_a_queued_writer() {
    let node = start(1, true, 0).await;
    node.cluster
        .ensure_identity(Duration::from_secs(30))
        .await
        .unwrap();
    let state = node.cluster.state();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut writes = 0u64;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let guard = state.write().await;
                tokio::task::yield_now().await;
                drop(guard);
                writes += 1;
            }
            writes
        })
    };
    for round in 0..2_000 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            node.cluster.ensure_identity(Duration::from_secs(1)),
        )
        .await;
        assert!(
            matches!(answer, Ok(Ok(_))),
            "ensure_identity hung or failed in round {round}: {answer:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 0, "the writer never got the lock");
}

/// A node that never gets a leader gives up with an error when its time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_identity_without_a_leader_ends_in_an_error() {
    let node = start(1, false, 0).await;
    let started = Instant::now();
    let answer = node
        .cluster
        .ensure_identity(Duration::from_millis(300))
        .await;
    assert!(answer.is_err(), "identity without any leader: {answer:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
