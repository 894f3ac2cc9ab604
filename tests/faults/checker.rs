//! The history model and its checker (pure: no processes, no network).
//!
//! A history is every client request the workload made (request id, CMID, node, start, end,
//! outcome) plus the fault windows the nemesis opened. After the run and the final heal, each
//! node's registry, counts, ePIDs, HWID and queue are read through the admin API. The checker
//! then proves, or reports violations of:
//! - **no lost acknowledged activation**: every CMID that got a verified answer (provisional
//!   ones included) is in every node's registry;
//! - **convergence**: every node has the same registry, counts, ePIDs and HWID, and no queue;
//! - **counts never go backwards** for answers that did not overlap in time, outside the fault
//!   windows (a node cut off answers provisionally from its last committed state, which may
//!   lag: those answers are checked for loss, not for order);
//! - **no hang**: no request to a node that was neither paused nor killed took longer than the
//!   client timeout (the minority answer is due within the answer deadline);
//! - **the final count matches the registry**: `count = min(clients registered, capacity)`;
//! - every answered ePID is one of the cluster's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use uuid::Uuid;

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A verified activation answer.
    Ok {
        count: u32,
        epid: String,
        hwid: Option<[u8; 8]>,
    },
    /// The host answered with an error HRESULT (a definite "not activated").
    Refused(u32),
    /// The connection failed before an answer (refused, reset): indeterminate.
    Failed(String),
    /// No answer within the client timeout: indeterminate, and a hang unless excused.
    Timeout,
}

/// One client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub id: u64,
    pub cmid: Uuid,
    /// 1-based node the client talked to.
    pub node: usize,
    /// Milliseconds since the run started.
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
}

/// A fault the nemesis injected, from injection until the cluster was seen healed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultWindow {
    pub kind: String,
    /// Nodes the fault targeted (1-based).
    pub nodes: Vec<usize>,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The targeted nodes could not answer at all (paused, killed, fail-stopped disk):
    /// timeouts to them are expected, not hangs.
    pub unresponsive: bool,
}

/// The requests and faults of one run.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
    pub faults: Vec<FaultWindow>,
}

/// What one node holds once healed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeState {
    pub node: usize,
    /// CMID → application name.
    pub registry: BTreeMap<Uuid, String>,
    /// Current count per application name.
    pub counts: BTreeMap<String, u32>,
    pub epids: BTreeSet<String>,
    pub hwid: Option<String>,
    pub queued: u64,
}

/// Limits the checker needs.
#[derive(Debug, Clone, Copy)]
pub struct CheckConfig {
    /// The client's timeout per request, milliseconds.
    pub client_timeout_ms: u64,
    /// CMID cache capacity of the counted application (2 × the largest N requested).
    pub capacity: u32,
}

/// One broken property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    Lost {
        op: u64,
        cmid: Uuid,
        node: usize,
    },
    Diverged {
        what: &'static str,
        node: usize,
        detail: String,
    },
    QueueNotEmpty {
        node: usize,
        queued: u64,
    },
    CountWentBack {
        earlier: u64,
        earlier_count: u32,
        later: u64,
        later_count: u32,
    },
    Hang {
        op: u64,
        node: usize,
        took_ms: u64,
    },
    CountMismatch {
        node: usize,
        application: String,
        count: u32,
        registered: usize,
    },
    UnknownEpid {
        op: u64,
        epid: String,
    },
    /// A registered CMID that no request sent.
    Phantom {
        cmid: Uuid,
        node: usize,
    },
}

impl Violation {
    /// The property's short name (for summaries and the self-test).
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Lost { .. } => "lost",
            Violation::Diverged { .. } => "diverged",
            Violation::QueueNotEmpty { .. } => "queue-not-empty",
            Violation::CountWentBack { .. } => "count-went-back",
            Violation::Hang { .. } => "hang",
            Violation::CountMismatch { .. } => "count-mismatch",
            Violation::UnknownEpid { .. } => "unknown-epid",
            Violation::Phantom { .. } => "phantom",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {self:?}", self.kind())
    }
}

/// The checker's verdict and figures.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub requests: usize,
    pub acknowledged: usize,
    pub refused: usize,
    pub indeterminate: usize,
    pub order_checked: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn kinds(&self) -> BTreeSet<&'static str> {
        self.violations.iter().map(Violation::kind).collect()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} requests: {} acknowledged, {} refused, {} indeterminate; {} answers order-checked; {} violations",
            self.requests,
            self.acknowledged,
            self.refused,
            self.indeterminate,
            self.order_checked,
            self.violations.len()
        );
        for v in self.violations.iter().take(20) {
            s.push_str(&format!("\n  {v}"));
        }
        s
    }
}

/// Whether `op` overlaps a fault window.
fn in_fault(op: &Op, faults: &[FaultWindow]) -> bool {
    faults
        .iter()
        .any(|f| op.start_ms <= f.end_ms && op.end_ms >= f.start_ms)
}

/// Whether `op` ran against a node that could not answer at the time.
fn excused_hang(op: &Op, faults: &[FaultWindow]) -> bool {
    faults.iter().any(|f| {
        f.unresponsive
            && f.nodes.contains(&op.node)
            && op.start_ms <= f.end_ms
            && op.end_ms >= f.start_ms
    })
}

/// Checks `history` against the healed nodes `finals`.
pub fn check(history: &History, finals: &[NodeState], cfg: CheckConfig) -> Report {
    let mut r = Report {
        requests: history.ops.len(),
        ..Report::default()
    };
    for op in &history.ops {
        match op.outcome {
            Outcome::Ok { .. } => r.acknowledged += 1,
            Outcome::Refused(_) => r.refused += 1,
            Outcome::Failed(_) | Outcome::Timeout => r.indeterminate += 1,
        }
    }
    let v = &mut r.violations;

    // No acknowledged activation lost, on any node.
    for op in &history.ops {
        if matches!(op.outcome, Outcome::Ok { .. }) {
            for n in finals {
                if !n.registry.contains_key(&op.cmid) {
                    v.push(Violation::Lost {
                        op: op.id,
                        cmid: op.cmid,
                        node: n.node,
                    });
                }
            }
        }
    }

    // Nothing registered that no client sent.
    let sent: BTreeSet<Uuid> = history.ops.iter().map(|o| o.cmid).collect();
    for n in finals {
        for cmid in n.registry.keys() {
            if !sent.contains(cmid) {
                v.push(Violation::Phantom {
                    cmid: *cmid,
                    node: n.node,
                });
            }
        }
    }

    // Convergence: everything equal to the first node's, and no queue left.
    if let Some(first) = finals.first() {
        for n in finals {
            if n.queued != 0 {
                v.push(Violation::QueueNotEmpty {
                    node: n.node,
                    queued: n.queued,
                });
            }
            if n.node == first.node {
                continue;
            }
            if n.registry != first.registry {
                let only_here = n
                    .registry
                    .keys()
                    .filter(|c| !first.registry.contains_key(c))
                    .count();
                let missing = first
                    .registry
                    .keys()
                    .filter(|c| !n.registry.contains_key(c))
                    .count();
                v.push(Violation::Diverged {
                    what: "registry",
                    node: n.node,
                    detail: format!(
                        "{} clients vs {} on node {}: {only_here} only here, {missing} missing",
                        n.registry.len(),
                        first.registry.len(),
                        first.node
                    ),
                });
            }
            if n.counts != first.counts {
                v.push(Violation::Diverged {
                    what: "counts",
                    node: n.node,
                    detail: format!("{:?} vs {:?}", n.counts, first.counts),
                });
            }
            if n.epids != first.epids {
                v.push(Violation::Diverged {
                    what: "epids",
                    node: n.node,
                    detail: format!("{:?} vs {:?}", n.epids, first.epids),
                });
            }
            if n.hwid != first.hwid {
                v.push(Violation::Diverged {
                    what: "hwid",
                    node: n.node,
                    detail: format!("{:?} vs {:?}", n.hwid, first.hwid),
                });
            }
        }
    }

    // The final count of each application matches its registered clients.
    for n in finals {
        for (app, count) in &n.counts {
            let registered = n.registry.values().filter(|a| *a == app).count();
            let expected = registered.min(cfg.capacity as usize);
            if *count as usize != expected {
                v.push(Violation::CountMismatch {
                    node: n.node,
                    application: app.clone(),
                    count: *count,
                    registered,
                });
            }
        }
    }

    // Counts never go backwards between answers that did not overlap, outside faults.
    let mut quiet: Vec<&Op> = history
        .ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Ok { .. }) && !in_fault(o, &history.faults))
        .collect();
    r.order_checked = quiet.len();
    quiet.sort_by_key(|o| o.end_ms);
    // best[i]: the op with the highest count among quiet[..=i].
    let mut best: Vec<(u32, u64)> = Vec::with_capacity(quiet.len());
    for o in &quiet {
        let c = count_of(o);
        let next = match best.last() {
            Some(&prev) if prev.0 > c => prev,
            _ => (c, o.id),
        };
        best.push(next);
    }
    for b in &quiet {
        // Ops that ended strictly before b started.
        let k = quiet.partition_point(|a| a.end_ms < b.start_ms);
        if k == 0 {
            continue;
        }
        let (max_before, who) = best[k - 1];
        if count_of(b) < max_before {
            v.push(Violation::CountWentBack {
                earlier: who,
                earlier_count: max_before,
                later: b.id,
                later_count: count_of(b),
            });
        }
    }

    // No request hung past the client timeout, unless its node could not answer.
    for op in &history.ops {
        let took = op.end_ms.saturating_sub(op.start_ms);
        let hung = matches!(op.outcome, Outcome::Timeout) || took > cfg.client_timeout_ms;
        if hung && !excused_hang(op, &history.faults) {
            v.push(Violation::Hang {
                op: op.id,
                node: op.node,
                took_ms: took,
            });
        }
    }

    // Every ePID a client got is one the cluster has.
    if let Some(first) = finals.first() {
        for op in &history.ops {
            if let Outcome::Ok { epid, .. } = &op.outcome {
                if !first.epids.contains(epid) {
                    v.push(Violation::UnknownEpid {
                        op: op.id,
                        epid: epid.clone(),
                    });
                }
            }
        }
    }
    r
}

fn count_of(op: &Op) -> u32 {
    match op.outcome {
        Outcome::Ok { count, .. } => count,
        _ => 0,
    }
}

/// Synthetic histories for the self-test.
#[cfg(test)]
mod self_test {
    use super::*;

    const EPID: &str = "06401-00206-551-123456-03-1033-17763.0000-0012024";
    const CFG: CheckConfig = CheckConfig {
        client_timeout_ms: 8_000,
        capacity: 2_000,
    };

    fn cmid(i: u64) -> Uuid {
        Uuid::from_u128(0x1000 + i as u128)
    }

    fn ok(id: u64, node: usize, start: u64, end: u64, count: u32) -> Op {
        Op {
            id,
            cmid: cmid(id),
            node,
            start_ms: start,
            end_ms: end,
            outcome: Outcome::Ok {
                count,
                epid: EPID.into(),
                hwid: Some([1; 8]),
            },
        }
    }

    /// Ten sequential activations through three nodes, counts 1..=10.
    fn good_history() -> History {
        History {
            ops: (1..=10)
                .map(|i| ok(i, (i as usize % 3) + 1, i * 100, i * 100 + 50, i as u32))
                .collect(),
            faults: vec![],
        }
    }

    fn good_finals(h: &History) -> Vec<NodeState> {
        let registry: BTreeMap<Uuid, String> = h
            .ops
            .iter()
            .map(|o| (o.cmid, "Windows".to_owned()))
            .collect();
        (1..=3)
            .map(|node| NodeState {
                node,
                counts: [("Windows".to_owned(), registry.len() as u32)].into(),
                registry: registry.clone(),
                epids: [EPID.to_owned()].into(),
                hwid: Some("0102030405060708".into()),
                queued: 0,
            })
            .collect()
    }

    fn kinds(h: &History, f: &[NodeState]) -> BTreeSet<&'static str> {
        check(h, f, CFG).kinds()
    }

    #[test]
    fn a_correct_history_passes() {
        let h = good_history();
        let r = check(&h, &good_finals(&h), CFG);
        assert!(r.ok(), "{}", r.summary());
        assert_eq!((r.requests, r.acknowledged, r.order_checked), (10, 10, 10));
    }

    #[test]
    fn catches_a_lost_acknowledged_activation() {
        let h = good_history();
        let mut f = good_finals(&h);
        for n in &mut f {
            n.registry.remove(&cmid(4));
            n.counts.insert("Windows".into(), 9);
        }
        let r = check(&h, &f, CFG);
        assert_eq!(r.kinds(), ["lost"].into(), "{}", r.summary());
        assert_eq!(r.violations.len(), 3, "lost on each node");
    }

    #[test]
    fn a_provisional_answer_is_acknowledged_too() {
        // Node 3 was cut off and answered provisionally; the answer must survive the heal.
        let mut h = good_history();
        h.faults.push(FaultWindow {
            kind: "isolate-follower".into(),
            nodes: vec![3],
            start_ms: 780,
            end_ms: 900,
            unresponsive: false,
        });
        h.ops[7].node = 3; // op 8: 800..850, inside the window
        let mut f = good_finals(&h);
        for n in &mut f {
            n.registry.remove(&cmid(8));
            n.counts.insert("Windows".into(), 9);
        }
        assert_eq!(kinds(&h, &f), ["lost"].into());
    }

    #[test]
    fn catches_divergence_of_registry_counts_epids_and_hwid() {
        let h = good_history();
        for (what, change) in [
            (
                "registry",
                Box::new(|n: &mut NodeState| {
                    n.registry.insert(cmid(99), "Office".into());
                }) as Box<dyn Fn(&mut NodeState)>,
            ),
            (
                "counts",
                Box::new(|n: &mut NodeState| {
                    n.counts.insert("Office".into(), 0);
                }),
            ),
            (
                "epids",
                Box::new(|n: &mut NodeState| {
                    n.epids.insert("other".into());
                }),
            ),
            (
                "hwid",
                Box::new(|n: &mut NodeState| n.hwid = Some("ffffffffffffffff".into())),
            ),
        ] {
            let mut f = good_finals(&h);
            change(&mut f[2]);
            let r = check(&h, &f, CFG);
            assert!(
                r.violations.iter().any(
                    |v| matches!(v, Violation::Diverged { what: w, node: 3, .. } if *w == what)
                ),
                "{what}: {}",
                r.summary()
            );
        }
    }

    #[test]
    fn catches_a_queue_left_behind() {
        let h = good_history();
        let mut f = good_finals(&h);
        f[1].queued = 2;
        assert_eq!(kinds(&h, &f), ["queue-not-empty"].into());
    }

    #[test]
    fn catches_a_count_going_backwards() {
        let mut h = good_history();
        // Op 6 (600..650) answers 3 although op 5 (500..550) answered 5.
        h.ops[5].outcome = Outcome::Ok {
            count: 3,
            epid: EPID.into(),
            hwid: Some([1; 8]),
        };
        let r = check(&h, &good_finals(&h), CFG);
        assert_eq!(r.kinds(), ["count-went-back"].into(), "{}", r.summary());
        assert!(r.violations.contains(&Violation::CountWentBack {
            earlier: 5,
            earlier_count: 5,
            later: 6,
            later_count: 3
        }));
    }

    #[test]
    fn overlapping_or_faulted_answers_may_come_in_any_order() {
        let mut h = good_history();
        // Op 6 overlaps op 5 in time: any order is fine.
        h.ops[5].start_ms = 520;
        h.ops[5].outcome = Outcome::Ok {
            count: 4,
            epid: EPID.into(),
            hwid: None,
        };
        assert!(check(&h, &good_finals(&h), CFG).ok());
        // A provisional answer inside a fault window is not order-checked.
        let mut h = good_history();
        h.ops[5].outcome = Outcome::Ok {
            count: 3,
            epid: EPID.into(),
            hwid: None,
        };
        h.faults.push(FaultWindow {
            kind: "bridge".into(),
            nodes: vec![1, 3],
            start_ms: 590,
            end_ms: 700,
            unresponsive: false,
        });
        let r = check(&h, &good_finals(&h), CFG);
        assert!(r.ok(), "{}", r.summary());
        assert_eq!(r.order_checked, 8);
    }

    #[test]
    fn catches_a_hang_but_not_at_a_paused_node() {
        let mut h = good_history();
        h.ops.push(Op {
            id: 11,
            cmid: cmid(11),
            node: 2,
            start_ms: 2_000,
            end_ms: 10_001,
            outcome: Outcome::Timeout,
        });
        let f = good_finals(&good_history());
        assert_eq!(kinds(&h, &f), ["hang"].into());
        // A slow answer past the timeout is a hang too.
        let mut slow = h.clone();
        slow.ops[10] = ok(11, 2, 2_000, 12_000, 11);
        let mut f11 = good_finals(&slow);
        for n in &mut f11 {
            n.counts.insert("Windows".into(), 11);
        }
        assert_eq!(kinds(&slow, &f11), ["hang"].into());
        // The same timeout against a paused node is expected.
        h.faults.push(FaultWindow {
            kind: "pause-leader".into(),
            nodes: vec![2],
            start_ms: 1_900,
            end_ms: 6_000,
            unresponsive: true,
        });
        assert!(check(&h, &f, CFG).ok());
        // A network fault does not excuse it: the client still reaches the node.
        h.faults[0].unresponsive = false;
        assert_eq!(kinds(&h, &f), ["hang"].into());
    }

    #[test]
    fn catches_a_final_count_that_does_not_match_the_registry() {
        let h = good_history();
        let mut f = good_finals(&h);
        for n in &mut f {
            n.counts.insert("Windows".into(), 11);
        }
        assert_eq!(kinds(&h, &f), ["count-mismatch"].into());
        // Past the capacity the count stays at the capacity.
        let cfg = CheckConfig { capacity: 8, ..CFG };
        let mut f = good_finals(&h);
        for n in &mut f {
            n.counts.insert("Windows".into(), 8);
        }
        assert!(check(&h, &f, cfg).ok());
    }

    #[test]
    fn catches_an_unknown_epid_and_a_phantom_client() {
        let mut h = good_history();
        h.ops[2].outcome = Outcome::Ok {
            count: 3,
            epid: "forged".into(),
            hwid: None,
        };
        assert_eq!(kinds(&h, &good_finals(&h)), ["unknown-epid"].into());
        let h = good_history();
        let mut f = good_finals(&h);
        for n in &mut f {
            n.registry.remove(&cmid(10));
            n.registry.insert(cmid(77), "Windows".into());
        }
        assert_eq!(kinds(&h, &f), ["lost", "phantom"].into());
    }

    #[test]
    fn indeterminate_requests_may_or_may_not_be_registered() {
        let mut h = good_history();
        h.ops.push(Op {
            id: 11,
            cmid: cmid(11),
            node: 1,
            start_ms: 2_000,
            end_ms: 2_010,
            outcome: Outcome::Failed("connection refused".into()),
        });
        let f = good_finals(&good_history());
        assert!(check(&h, &f, CFG).ok(), "not registered: fine");
        assert!(check(&h, &good_finals(&h), CFG).ok(), "registered: fine");
    }
}
