//! The cluster under test, the client workload and the nemeses, run on a fixed schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use uuid::Uuid;

use crate::checker::{FaultWindow, History, NodeState, Op, Outcome};
use crate::lab::{FNode, Lab};

/// Every request asks for N = 1000 (the protocol's maximum), so the counted list holds up
/// to 2000 clients before the count stays at its capacity.
pub const REQUIRED_COUNT: u32 = 1000;
pub const CAPACITY: u32 = 2 * REQUIRED_COUNT;
/// The client's limit for one activation (connect, bind, request). The minority answer is
/// due after the answer deadline (2.5 s); the rest is slack for a loaded 2-core machine.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);

/// Three `kmsd` processes in their namespaces.
pub struct Cluster {
    pub lab: Lab,
    pub nodes: Vec<FNode>,
    _dir: tempfile::TempDir,
    t0: Instant,
}

impl Cluster {
    /// Builds the lab, enters the client namespace and forms the cluster.
    pub fn start(n: usize, extra_args: &[&str]) -> Cluster {
        if let Some(why) = crate::lab::missing_prerequisites() {
            panic!("{why}");
        }
        let lab = Lab::create(n).unwrap_or_else(|e| panic!("network lab: {e}"));
        lab.enter_client()
            .unwrap_or_else(|e| panic!("enter client namespace: {e}"));
        let mut dir = tempfile::tempdir().expect("temp dir");
        if std::env::var_os("FAULTS_KEEP").is_some() {
            // Keep the node logs and data for a post-mortem.
            dir.disable_cleanup(true);
            eprintln!("node dirs kept in {}", dir.path().display());
        }
        let args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let nodes = (1..=n)
            .map(|i| FNode::new(&lab, i, dir.path(), args.clone()))
            .collect();
        let mut c = Cluster {
            lab,
            nodes,
            _dir: dir,
            t0: Instant::now(),
        };
        c.form();
        c
    }

    /// Cluster formation, in this one place: node 1 bootstraps (and makes the cluster CA),
    /// the others join through its Raft port with a shared cluster secret (the built-in
    /// cluster PKI: mutual TLS between the namespaces, as in production).
    fn form(&mut self) {
        let secret = self._dir.path().join("cluster.secret");
        std::fs::write(&secret, "faults-lab-cluster-secret-0123456789abcdef").expect("secret");
        let secret = secret.to_string_lossy().into_owned();
        let bootstrap_raft = self.nodes[0].raft();
        for i in 0..self.nodes.len() {
            let mut join = vec!["--cluster-secret-file".to_owned(), secret.clone()];
            if i > 0 {
                join.extend(["--join".to_owned(), bootstrap_raft.clone()]);
            }
            self.nodes[i].spawn(&join);
            self.nodes[i]
                .wait_ready(Duration::from_secs(90))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let n = self.nodes.len();
        self.wait_for("every node sees all voters", Duration::from_secs(60), |c| {
            c.nodes.iter().all(|node| {
                node.get("/api/v1/cluster")
                    .and_then(|v| {
                        v["members"]
                            .as_array()
                            .map(|m| m.iter().filter(|m| m["role"] != "learner").count())
                    })
                    .unwrap_or(0)
                    == n
            })
        });
    }

    /// Milliseconds since the cluster started (the history's clock).
    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub fn clock(&self) -> Instant {
        self.t0
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out after {timeout:?} waiting for {what}");
    }

    /// `/api/v1/status` of node `i` (1-based), None when it does not answer.
    pub fn status(&self, i: usize) -> Option<Value> {
        if self.nodes[i - 1].is_paused() {
            return None;
        }
        self.nodes[i - 1].get("/api/v1/status")
    }

    /// The leader every answering node agrees on, with its term.
    pub fn leader(&self) -> Option<(usize, u64)> {
        let mut seen = BTreeSet::new();
        for i in 1..=self.nodes.len() {
            let s = self.status(i)?;
            seen.insert((s["leader_id"].as_u64()?, s["term"].as_u64()?));
        }
        if seen.len() == 1 {
            seen.into_iter().next().map(|(l, t)| (l as usize, t))
        } else {
            None
        }
    }

    /// Waits for a leader every node agrees on.
    pub fn wait_leader(&self, timeout: Duration) -> (usize, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `i` is back: it knows a leader, reaches a quorum and has no queue.
    pub fn node_back(&self, i: usize) -> bool {
        self.status(i).is_some_and(|s| {
            s["leader_id"].as_u64().is_some()
                && s["quorum"] == true
                && s["queued_activations"].as_u64() == Some(0)
        })
    }

    /// Every node is back and they agree on the leader.
    pub fn healthy(&self) -> bool {
        (1..=self.nodes.len()).all(|i| self.node_back(i)) && self.leader().is_some()
    }

    /// Waits until healthy; the time it took, or None after `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.healthy() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Registry, counts, ePIDs, HWID and queue of node `i`.
    pub fn node_state(&self, i: usize) -> Option<NodeState> {
        let s = self.status(i)?;
        let mut st = NodeState {
            node: i,
            counts: s["current_count"]
                .as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u32)))
                .collect(),
            epids: s["epids"]
                .as_array()?
                .iter()
                .filter_map(|e| e["epid"].as_str().map(str::to_owned))
                .collect(),
            hwid: s["hwid"].as_str().map(str::to_owned),
            queued: s["queued_activations"].as_u64()?,
            registry: BTreeMap::new(),
        };
        let mut offset = 0usize;
        loop {
            let page =
                self.nodes[i - 1].get(&format!("/api/v1/clients?limit=1000&offset={offset}"))?;
            let clients = page["clients"].as_array()?;
            for c in clients {
                let cmid: Uuid = c["cmid"].as_str()?.parse().ok()?;
                st.registry
                    .insert(cmid, c["application"].as_str()?.to_owned());
            }
            offset += clients.len();
            if clients.is_empty() || offset as u64 >= page["total"].as_u64()? {
                return Some(st);
            }
        }
    }

    /// Waits until every node holds the same registry and counts with no queue, then
    /// returns the states (whatever they are after `timeout`: the checker judges them).
    pub fn converged_states(&self, timeout: Duration) -> Vec<NodeState> {
        let deadline = Instant::now() + timeout;
        loop {
            let states: Vec<NodeState> = (1..=self.nodes.len())
                .filter_map(|i| self.node_state(i))
                .collect();
            let same = states.len() == self.nodes.len()
                && states.iter().all(|s| {
                    s.queued == 0
                        && s.registry == states[0].registry
                        && s.counts == states[0].counts
                });
            if same || Instant::now() >= deadline {
                return states;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stops every node (by pid) and removes the namespaces.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        self.lab.destroy();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Concurrent clients activating fresh CMIDs through every node, recording the history.
pub struct Workload {
    pub ops: Arc<Mutex<Vec<Op>>>,
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    /// `clients` tasks on `rt`, each pausing `pace` between requests, at most `max_each`
    /// requests each (a bound on the load whatever the duration).
    pub fn start(
        rt: &tokio::runtime::Runtime,
        cluster: &Cluster,
        clients: usize,
        seed: u64,
        pace: Duration,
        max_each: usize,
    ) -> Workload {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addrs: Vec<String> = cluster.nodes.iter().map(FNode::kms).collect();
        let t0 = cluster.clock();
        let mut template = RequestTemplate::new(resolve("windows").expect("windows product"));
        template.n_policy = REQUIRED_COUNT;
        template.workstation = "faults.lab".into();
        let handles = (0..clients)
            .map(|c| {
                let (ops, stop, addrs, template) =
                    (ops.clone(), stop.clone(), addrs.clone(), template.clone());
                rt.spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000) + c as u64);
                    for k in 0..max_each {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let node = rng.gen_range(0..addrs.len());
                        let cmid = Uuid::from_u128(rng.gen());
                        let iv: [u8; 16] = rng.gen();
                        let start = t0.elapsed().as_millis() as u64;
                        let outcome = activate(&addrs[node], &template, cmid, iv).await;
                        let end = t0.elapsed().as_millis() as u64;
                        if let Ok(mut ops) = ops.lock() {
                            let id = (c as u64) << 32 | k as u64;
                            ops.push(Op {
                                id,
                                cmid,
                                node: node + 1,
                                start_ms: start,
                                end_ms: end,
                                outcome,
                            });
                        }
                        tokio::time::sleep(pace).await;
                    }
                })
            })
            .collect();
        Workload { ops, stop, handles }
    }

    /// Requests made so far.
    pub fn len(&self) -> usize {
        self.ops.lock().map(|o| o.len()).unwrap_or(0)
    }

    /// Stops the clients and waits for their last requests.
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = rt.block_on(h);
        }
        let mut ops = self.ops.lock().map(|o| o.clone()).unwrap_or_default();
        ops.sort_by_key(|o| o.start_ms);
        ops
    }
}

/// One activation on a new connection, bounded by [`CLIENT_TIMEOUT`].
async fn activate(addr: &str, t: &RequestTemplate, cmid: Uuid, iv: [u8; 16]) -> Outcome {
    if !crate::lab::in_client_namespace() {
        return Outcome::Failed("refused: not inside the lab's client namespace".into());
    }
    let attempt = async {
        let mut c = KmsClient::connect(
            addr,
            kms_wire::client::BindOptions::default(),
            CLIENT_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
        c.activate(&t.build(cmid, kms_tests::now_ms()), iv)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, attempt).await {
        Err(_) => Outcome::Timeout,
        Ok(Ok(Answer::Activated(r))) => Outcome::Ok {
            count: r.base.current_count,
            epid: r.base.epid,
            hwid: r.hwid,
        },
        Ok(Ok(Answer::Refused(hr))) => Outcome::Refused(hr),
        Ok(Err(e)) if e.contains("timed out") || e.contains("Timeout") => Outcome::Timeout,
        Ok(Err(e)) => Outcome::Failed(e),
    }
}

/// The faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nemesis {
    /// The leader loses its peers; clients still reach it.
    IsolateLeader,
    /// A follower loses both peers; clients still reach it.
    IsolateFollower,
    /// Two nodes cannot talk to each other; the third sees both.
    Bridge,
    /// One node's packets to its peers are dropped; theirs still arrive.
    AsymmetricDrop,
    /// SIGSTOP of the leader for longer than the election timeout, then SIGCONT.
    PauseLeader,
    /// kill -9 of a node, restart after the hold.
    KillRestart,
    /// One node's wall clock jumps 2 h ahead, then back.
    ClockJump,
    /// fdatasync fails (EIO) on one node: its store fail-stops; healed by a restart.
    FsyncError,
    /// WAL writes fail with ENOSPC on one node; healed by a restart.
    DiskFull,
    /// fdatasync stalls 1.5 s per call on the leader.
    FsyncStall,
}

pub const ALL_NEMESES: [Nemesis; 10] = [
    Nemesis::IsolateLeader,
    Nemesis::IsolateFollower,
    Nemesis::Bridge,
    Nemesis::AsymmetricDrop,
    Nemesis::PauseLeader,
    Nemesis::KillRestart,
    Nemesis::ClockJump,
    Nemesis::FsyncError,
    Nemesis::DiskFull,
    Nemesis::FsyncStall,
];

impl Nemesis {
    pub fn name(self) -> &'static str {
        match self {
            Nemesis::IsolateLeader => "isolate-leader",
            Nemesis::IsolateFollower => "isolate-follower",
            Nemesis::Bridge => "bridge",
            Nemesis::AsymmetricDrop => "asymmetric-drop",
            Nemesis::PauseLeader => "pause-leader",
            Nemesis::KillRestart => "kill-restart",
            Nemesis::ClockJump => "clock-jump",
            Nemesis::FsyncError => "fsync-error",
            Nemesis::DiskFull => "disk-full",
            Nemesis::FsyncStall => "fsync-stall",
        }
    }
}

/// What one fault did.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub nemesis: Nemesis,
    pub nodes: Vec<usize>,
    pub hold: Duration,
    /// From the heal until every node was back (leader agreed, quorum, no queue).
    pub recovery: Option<Duration>,
    pub leader_before: Option<(usize, u64)>,
    pub leader_after: Option<(usize, u64)>,
    pub note: String,
}

impl std::fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<16} nodes {:?} hold {:>5} ms, recovered in {}, leader {:?} -> {:?} {}",
            self.nemesis.name(),
            self.nodes,
            self.hold.as_millis(),
            self.recovery
                .map(|d| format!("{} ms", d.as_millis()))
                .unwrap_or_else(|| "NEVER".into()),
            self.leader_before,
            self.leader_after,
            self.note
        )
    }
}

/// Applies `nemesis` for `hold`, heals it, and waits (at most `recovery_limit`) until the
/// cluster is whole again. The fault window (injection to recovery) goes into `faults`.
pub fn apply(
    cluster: &mut Cluster,
    nemesis: Nemesis,
    hold: Duration,
    rng: &mut StdRng,
    faults: &mut Vec<FaultWindow>,
    recovery_limit: Duration,
) -> FaultRecord {
    let n = cluster.nodes.len();
    let leader_before = cluster.leader();
    let leader = leader_before
        .map(|(l, _)| l)
        .unwrap_or_else(|| cluster.wait_leader(Duration::from_secs(30)).0);
    let followers: Vec<usize> = (1..=n).filter(|i| *i != leader).collect();
    let any = rng.gen_range(1..=n);
    let follower = followers[rng.gen_range(0..followers.len())];
    let others = |x: usize| -> Vec<usize> { (1..=n).filter(|i| *i != x).collect() };
    let start_ms = cluster.now_ms();
    let mut note = String::new();
    let (nodes, unresponsive) = match nemesis {
        Nemesis::IsolateLeader => (vec![leader], false),
        Nemesis::IsolateFollower => (vec![follower], false),
        Nemesis::Bridge => {
            let middle = any;
            (others(middle), false)
        }
        Nemesis::AsymmetricDrop => (vec![any], false),
        Nemesis::PauseLeader => (vec![leader], true),
        Nemesis::KillRestart | Nemesis::FsyncError | Nemesis::DiskFull => (vec![any], true),
        Nemesis::ClockJump => (vec![any], false),
        Nemesis::FsyncStall => (vec![leader], false),
    };
    let lab_err = |e: String| panic!("nemesis {}: {e}", nemesis.name());
    // Inject.
    match nemesis {
        Nemesis::IsolateLeader | Nemesis::IsolateFollower => cluster
            .lab
            .cut(nodes[0], &others(nodes[0]))
            .unwrap_or_else(lab_err),
        Nemesis::Bridge => cluster
            .lab
            .cut(nodes[0], &[nodes[1]])
            .unwrap_or_else(lab_err),
        Nemesis::AsymmetricDrop => cluster
            .lab
            .drop_outgoing(nodes[0], &others(nodes[0]))
            .unwrap_or_else(lab_err),
        Nemesis::PauseLeader => cluster.nodes[leader - 1].pause(),
        Nemesis::KillRestart => cluster.nodes[nodes[0] - 1].kill9(),
        Nemesis::ClockJump => {
            let node = &cluster.nodes[nodes[0] - 1];
            node.set_clock_offset("+2h");
            // Check that the jump really reaches the process's SystemTime (libfaketime
            // re-reads its file at most once a second).
            let asked = Instant::now();
            let mut skew = None;
            while asked.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(250));
                // The node's own wall clock against the cluster's time (the status answers
                // with the cluster time, which a jumped clock does not move).
                skew = cluster.nodes[nodes[0] - 1]
                    .metric("kms_clock_offset_seconds")
                    .map(|s| (s * 1000.0) as i64);
                if skew.is_some_and(|s| s > 3_600_000) {
                    break;
                }
            }
            note = format!(
                "node clock skew {:?} s after {} ms",
                skew.map(|s| s / 1000),
                asked.elapsed().as_millis()
            );
            assert!(
                skew.is_some_and(|s| s > 3_600_000),
                "the clock jump did not reach kmsd's SystemTime (skew {skew:?} ms)"
            );
        }
        Nemesis::FsyncError => cluster.nodes[nodes[0] - 1].set_failpoints("wal-fsync=return"),
        Nemesis::DiskFull => cluster.nodes[nodes[0] - 1].set_failpoints("wal-write=return"),
        Nemesis::FsyncStall => cluster.nodes[nodes[0] - 1].set_failpoints("wal-fsync=sleep(1500)"),
    }
    std::thread::sleep(hold);
    // Heal.
    match nemesis {
        Nemesis::IsolateLeader
        | Nemesis::IsolateFollower
        | Nemesis::Bridge
        | Nemesis::AsymmetricDrop => cluster.lab.heal().unwrap_or_else(lab_err),
        Nemesis::PauseLeader => cluster.nodes[leader - 1].resume(),
        Nemesis::KillRestart => {
            cluster.nodes[nodes[0] - 1].spawn(&[]);
        }
        Nemesis::ClockJump => cluster.nodes[nodes[0] - 1].set_clock_offset("+0"),
        Nemesis::FsyncError | Nemesis::DiskFull => {
            let node = &mut cluster.nodes[nodes[0] - 1];
            node.set_failpoints("");
            let failed = node.log().contains("injected");
            note = format!(
                "store {}, process {}; restarted",
                if failed { "failed" } else { "untouched" },
                if node.is_running() {
                    "running"
                } else {
                    "exited"
                }
            );
            node.kill9();
            node.spawn(&[]);
        }
        Nemesis::FsyncStall => cluster.nodes[nodes[0] - 1].set_failpoints(""),
    }
    let healed = Instant::now();
    let recovery = cluster.wait_healthy(recovery_limit);
    // Recovery counted from the heal, including a restarted node's start-up.
    let recovery = recovery.map(|_| healed.elapsed());
    faults.push(FaultWindow {
        kind: nemesis.name().into(),
        nodes: nodes.clone(),
        start_ms,
        end_ms: cluster.now_ms(),
        unresponsive,
    });
    FaultRecord {
        nemesis,
        nodes,
        hold,
        recovery,
        leader_before,
        leader_after: cluster.leader(),
        note,
    }
}

/// The outcome of a schedule.
pub struct RunResult {
    pub history: History,
    pub finals: Vec<NodeState>,
    pub faults: Vec<FaultRecord>,
}

/// Runs `schedule` (nemesis, hold) under the workload, then heals and collects the finals.
pub fn run_schedule(
    cluster: &mut Cluster,
    rt: &tokio::runtime::Runtime,
    seed: u64,
    schedule: &[(Nemesis, Duration)],
    quiet: Duration,
    clients: usize,
    deadline: Option<Instant>,
) -> RunResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let workload = Workload::start(
        rt,
        cluster,
        clients,
        seed,
        Duration::from_millis(20),
        200_000,
    );
    let mut windows = Vec::new();
    let mut records = Vec::new();
    std::thread::sleep(quiet);
    for (nemesis, hold) in schedule {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let rec = apply(
            cluster,
            *nemesis,
            *hold,
            &mut rng,
            &mut windows,
            Duration::from_secs(60),
        );
        eprintln!(
            "[{:>7} ms] {rec}; {} requests so far",
            cluster.now_ms(),
            workload.len()
        );
        records.push(rec);
        std::thread::sleep(quiet);
    }
    let ops = workload.finish(rt);
    let finals = cluster.converged_states(Duration::from_secs(60));
    RunResult {
        history: History {
            ops,
            faults: windows,
        },
        finals,
        faults: records,
    }
}
