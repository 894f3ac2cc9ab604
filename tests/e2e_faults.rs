//! Jepsen-style fault injection (issue 14): real `kmsd` processes, each in its own network
//! namespace, nftables partitions, SIGSTOP, kill -9, libfaketime clock jumps and storage
//! failpoints, under concurrent clients whose history a checker judges. See docs/faults.md.
//!
//! The checker's self-test runs everywhere. The lab tests need root, `ip`, `nft`,
//! libfaketime and the failpoint build of kmsd: `bash tests/faults/run.sh` installs and
//! builds all that and runs them (they are `#[ignore]`d in a plain `cargo test`).

#[path = "faults/checker.rs"]
mod checker;
#[path = "faults/lab.rs"]
mod lab;
#[path = "faults/suite.rs"]
mod suite;

use std::time::{Duration, Instant};

use checker::CheckConfig;
use suite::{Cluster, Nemesis, Workload};

fn check_config() -> CheckConfig {
    CheckConfig {
        client_timeout_ms: suite::CLIENT_TIMEOUT.as_millis() as u64 + 1_000,
        capacity: suite::CAPACITY,
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The workload really ran: at least `min` verified answers.
fn assert_acknowledged(ops: &[checker::Op], min: usize) {
    let acked = ops
        .iter()
        .filter(|o| matches!(o.outcome, checker::Outcome::Ok { .. }))
        .count();
    let sample: Vec<_> = ops.iter().rev().take(3).map(|o| &o.outcome).collect();
    assert!(
        acked >= min,
        "only {acked} of {} requests answered (last: {sample:?})",
        ops.len()
    );
}

/// Runs a schedule and asserts the checker's verdict and every recovery.
fn run_and_check(
    seed: u64,
    schedule: &[(Nemesis, Duration)],
    recovery_limit: Duration,
    deadline: Option<Instant>,
) {
    let mut cluster = Cluster::start(3, &[]);
    let rt = cluster.lab.client_runtime();
    let started = Instant::now();
    let result = suite::run_schedule(
        &mut cluster,
        &rt,
        seed,
        schedule,
        Duration::from_secs(2),
        4,
        deadline,
    );
    let report = checker::check(&result.history, &result.finals, check_config());
    eprintln!(
        "seed {seed}: {} faults in {:?}; {}",
        result.faults.len(),
        started.elapsed(),
        report.summary()
    );
    for f in &result.faults {
        eprintln!("  {f}");
    }
    let slow: Vec<String> = result
        .faults
        .iter()
        .filter(|f| f.recovery.is_none_or(|r| r > recovery_limit))
        .map(|f| f.to_string())
        .collect();
    cluster.stop();
    assert!(report.ok(), "seed {seed}: {}", report.summary());
    assert!(
        report.acknowledged > 100,
        "too few acknowledged activations to prove anything: {}",
        report.summary()
    );
    assert!(
        slow.is_empty(),
        "seed {seed}: not whole again within {recovery_limit:?} of the heal:\n{}",
        slow.join("\n")
    );
}

/// The CI schedule: every nemesis once, fixed seed, about three minutes.
#[test]
#[ignore = "needs root, nftables, libfaketime and kmsd-failpoints: run tests/faults/run.sh"]
fn ci_schedule_every_nemesis_once() {
    let seed = env_u64("FAULTS_SEED", 14);
    let schedule: Vec<(Nemesis, Duration)> = suite::ALL_NEMESES
        .iter()
        .map(|n| {
            let hold = match n {
                Nemesis::PauseLeader => Duration::from_secs(3),
                Nemesis::KillRestart => Duration::from_secs(2),
                _ => Duration::from_secs(6),
            };
            (*n, hold)
        })
        // FAULTS_ONLY=name[,name]: a part of the schedule (debugging).
        .filter(|(n, _)| {
            std::env::var("FAULTS_ONLY")
                .map(|only| only.split(',').any(|o| o == n.name()))
                .unwrap_or(true)
        })
        .collect();
    run_and_check(seed, &schedule, Duration::from_secs(30), None);
}

/// The soak: random nemeses and holds for SOAK_MINUTES (default 30), seed SOAK_SEED.
#[test]
#[ignore = "long; SOAK_MINUTES=30 bash tests/faults/run.sh --soak"]
fn soak_random_faults() {
    let minutes = env_u64("SOAK_MINUTES", 30);
    let seed = env_u64("SOAK_SEED", 20_261_204);
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Faults until the time is up (a fault takes at least its hold plus 2 s of quiet).
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let count = (minutes * 60 / 3).max(1) as usize;
    let schedule: Vec<(Nemesis, Duration)> = (0..count)
        .map(|_| {
            let n = suite::ALL_NEMESES[rng.gen_range(0..suite::ALL_NEMESES.len())];
            let hold = Duration::from_millis(rng.gen_range(1_000..=12_000));
            (n, hold)
        })
        .collect();
    run_and_check(seed, &schedule, Duration::from_secs(30), Some(deadline));
}

/// Issue 14's liveness bug: after a 15 s isolation of a follower, the follower must be back
/// (leader known, quorum, empty queue) within 3 s of the heal.
#[test]
#[ignore = "needs root and nftables: run tests/faults/run.sh"]
fn slow_rejoin_follower_back_within_3s_of_heal() {
    let mut cluster = Cluster::start(3, &[]);
    let rt = cluster.lab.client_runtime();
    let (leader, _) = cluster.wait_leader(Duration::from_secs(30));
    let follower = if leader == 1 { 2 } else { 1 };
    // Traffic through every node, so the leader has AppendEntries in flight at the cut.
    let workload = Workload::start(&rt, &cluster, 4, 7, Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_secs(3));
    cluster
        .lab
        .cut(
            follower,
            &[1, 2, 3]
                .into_iter()
                .filter(|i| *i != follower)
                .collect::<Vec<_>>(),
        )
        .expect("isolate the follower");
    std::thread::sleep(Duration::from_secs(15));
    cluster.lab.heal().expect("heal");
    let healed = Instant::now();
    let mut back = None;
    while healed.elapsed() < Duration::from_secs(30) {
        if cluster.node_back(follower) {
            back = Some(healed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ops = workload.finish(&rt);
    eprintln!(
        "follower {follower} back {back:?} after the heal; {} requests",
        ops.len()
    );
    assert_acknowledged(&ops, 100);
    let back = back.expect("the follower never came back within 30 s");
    assert!(
        back <= Duration::from_secs(3),
        "follower {follower} came back {back:?} after the heal (limit 3 s)"
    );
    cluster.stop();
}

/// The other half of the slow-rejoin bug: the rejoining follower, whose term climbed while it
/// was cut off, must not depose the healthy leader. openraft 0.9 has no pre-vote; the fix is
/// kms-raft's election guard (`cluster/election_guard.rs`): a node stands only while it
/// reaches a majority of the voters.
#[test]
#[ignore = "needs root and network namespaces; run by tests/faults/run.sh"]
fn rejoining_follower_does_not_depose_the_leader() {
    let mut cluster = Cluster::start(3, &[]);
    let rt = cluster.lab.client_runtime();
    let (leader, term) = cluster.wait_leader(Duration::from_secs(30));
    let follower = if leader == 1 { 2 } else { 1 };
    let workload = Workload::start(&rt, &cluster, 2, 8, Duration::from_millis(50), 100_000);
    std::thread::sleep(Duration::from_secs(2));
    let peers: Vec<usize> = (1..=3).filter(|i| *i != follower).collect();
    cluster.lab.cut(follower, &peers).expect("isolate");
    std::thread::sleep(Duration::from_secs(15));
    let cut_term = cluster
        .status(follower)
        .and_then(|s| s["term"].as_u64())
        .unwrap_or(0);
    cluster.lab.heal().expect("heal");
    let healed = cluster.wait_healthy(Duration::from_secs(30));
    let after = cluster.leader();
    let ops = workload.finish(&rt);
    cluster.stop();
    assert_acknowledged(&ops, 50);
    eprintln!(
        "leader {leader} term {term}; isolated follower {follower} reached term {cut_term}; \
         after the heal ({healed:?}): {after:?}"
    );
    assert_eq!(
        after,
        Some((leader, term)),
        "the rejoining follower (term {cut_term}) deposed leader {leader} (term {term})"
    );
}

/// Found by the suite: after an fsync error (or ENOSPC) the Raft core stops for good, but
/// kmsd lived on with a dead core, closing every client connection, with /healthz ok, so no
/// supervisor would restart it. It must fail-stop (exit non-zero), and a restart must bring
/// it back with every acknowledged activation.
#[test]
#[ignore = "needs root, nftables and kmsd-failpoints: run tests/faults/run.sh"]
fn storage_failure_fail_stops_the_node_and_a_restart_heals_it() {
    for (point, spec) in [("fsync", "wal-fsync=return"), ("write", "wal-write=return")] {
        let mut cluster = Cluster::start(3, &[]);
        let rt = cluster.lab.client_runtime();
        let (leader, _) = cluster.wait_leader(Duration::from_secs(30));
        let workload = Workload::start(&rt, &cluster, 4, 9, Duration::from_millis(20), 100_000);
        std::thread::sleep(Duration::from_secs(2));
        let faulted = cluster.now_ms();
        cluster.nodes[leader - 1].set_failpoints(spec);
        let started = Instant::now();
        let mut code = None;
        while started.elapsed() < Duration::from_secs(20) && code.is_none() {
            code = cluster.nodes[leader - 1].exit_code();
            std::thread::sleep(Duration::from_millis(100));
        }
        let stopped_after = started.elapsed();
        cluster.nodes[leader - 1].set_failpoints("");
        cluster.nodes[leader - 1].kill9();
        cluster.nodes[leader - 1].spawn(&[]);
        let recovered = cluster.wait_healthy(Duration::from_secs(60));
        let ops = workload.finish(&rt);
        let mut history = checker::History {
            ops,
            faults: vec![checker::FaultWindow {
                kind: format!("{point}-error"),
                nodes: vec![leader],
                start_ms: faulted,
                end_ms: cluster.now_ms(),
                unresponsive: true,
            }],
        };
        history.ops.sort_by_key(|o| o.start_ms);
        let finals = cluster.converged_states(Duration::from_secs(60));
        let report = checker::check(&history, &finals, check_config());
        eprintln!(
            "{point} error on leader {leader}: exit code {code:?} after {stopped_after:?}; \
             recovered {recovered:?} after the restart; {}",
            report.summary()
        );
        cluster.stop();
        assert!(
            code.is_some_and(|c| c != 0),
            "{point} error: kmsd did not fail-stop within 20 s (exit code {code:?})"
        );
        assert!(
            recovered.is_some(),
            "{point} error: no recovery after the restart"
        );
        assert!(report.ok(), "{point} error: {}", report.summary());
        assert_acknowledged(&history.ops, 50);
    }
}
