//! The Prometheus side: the alert rules pass `promtool check rules` and their unit tests,
//! every metric the rules and the Grafana dashboard use is exported by a real node, and a
//! real Prometheus server scrapes a local cluster and sees the count the clients made.
//!
//! promtool and prometheus come from Debian's `prometheus` package (tests/ops/install.sh).
//! Without them the tests are skipped locally and fail in CI (CI=true).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_tests::{free_port, http_get, Node};
use kms_wire::client::BindOptions;
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use serde_json::Value;
use uuid::Uuid;

const TOKEN: &str = "e2e-prometheus-token-0123";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// The tool's path; `None` (skip) when it is missing outside CI, a failure in CI.
fn tool(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = dirs
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "{name} is missing in CI: run tests/ops/install.sh"
        );
        eprintln!("SKIPPED: {name} not installed (bash tests/ops/install.sh)");
    }
    found
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn promtool_checks_the_rules_the_config_and_the_rule_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = repo_root().join("deploy/prometheus");
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules", "tests/alerts_test.yml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    // The unit tests can fail: a rule file whose threshold no longer matches is caught.
    let tmp = tempfile::tempdir().unwrap();
    let broken = std::fs::read_to_string(dir.join("alerts.yml"))
        .unwrap()
        .replace("expr: vector(25)", "expr: vector(2)");
    std::fs::write(tmp.path().join("alerts.yml"), broken).unwrap();
    std::fs::create_dir(tmp.path().join("tests")).unwrap();
    std::fs::copy(
        dir.join("tests/alerts_test.yml"),
        tmp.path().join("tests/alerts_test.yml"),
    )
    .unwrap();
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules", "tests/alerts_test.yml"])
        .current_dir(tmp.path()));
    assert!(!ok, "a changed threshold must fail the rule tests: {out}");
}

/// `kms_*` names used in `text` (recording rule names such as `kms_alert:min_count` and
/// histogram suffixes are normalised away).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text.get(i..).and_then(|t| t.find("kms_")) {
        let start = i + pos;
        let boundary = start == 0
            || !bytes
                .get(start - 1)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let mut end = start;
        while bytes
            .get(end)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        {
            end += 1;
        }
        if boundary && bytes.get(end) != Some(&b':') {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| text.contains(&format!("{b}_bucket")))
                .unwrap_or(name);
            names.insert(base.to_owned());
        }
        i = end.max(start + 4);
    }
    names
}

/// Metric families a node exposes (from `# TYPE` lines).
fn exported(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

async fn activate(node: &Node, product: &str, n: usize) {
    let t = RequestTemplate::new(resolve(product).unwrap());
    let mut c = KmsClient::connect(&node.kms(), BindOptions::default(), Duration::from_secs(10))
        .await
        .unwrap();
    for _ in 0..n {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        match c
            .activate(&t.build(Uuid::new_v4(), now), rand::random())
            .await
            .unwrap()
        {
            Answer::Activated(_) => {}
            Answer::Refused(hr) => panic!("refused 0x{hr:08X}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_only_use_metrics_a_node_exports() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--admin-token", TOKEN]);
    activate(&node, "windows", 2).await;
    let (_, metrics) = http_get(node.admin_addr, "/metrics").unwrap();
    let have = exported(&metrics);
    // Exported only once they have a value: DNS zones (with publishing configured), the
    // first snapshot, followers' lag (on a leader with followers).
    let conditional = [
        "kms_dns_last_success_timestamp_seconds",
        "kms_dns_records_published",
        "kms_snapshot_duration_seconds",
        "kms_raft_replication_lag",
    ];
    let root = repo_root().join("deploy/prometheus");
    for file in ["alerts.yml", "grafana/kms-dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 8, "{file}: {used:?}");
        for name in &used {
            assert!(
                have.contains(name) || conditional.contains(&name.as_str()),
                "{file} uses {name}, which kmsd does not export:\n{have:?}"
            );
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/kms-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 10);
    assert!(dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["datasource"]["uid"] == "prometheus"));
}

/// A Prometheus server on loopback, killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(binary: &Path, dir: &Path, targets: &[String]) -> Prometheus {
        let rules = repo_root().join("deploy/prometheus/alerts.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - \"{}\"\n\
             scrape_configs:\n  - job_name: kmsd\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, path_and_query: &str) -> Option<Value> {
        let url = format!("http://{}{path_and_query}", self.addr);
        let response = reqwest::get(&url).await.ok()?;
        response.json().await.ok()
    }

    /// The single value of an instant query, if it has exactly one sample.
    async fn scalar(&self, query: &str) -> Option<f64> {
        let url = reqwest::Url::parse_with_params(
            &format!("http://{}/api/v1/query", self.addr),
            &[("query", query)],
        )
        .ok()?;
        let v: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
        let result = v["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits until `query` gives `expected` (scrapes arrive every second).
    async fn wait_for(&self, query: &str, expected: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.scalar(query).await;
            if last == Some(expected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{query} = {last:?}, expected {expected}; prometheus log:\n{}",
            self.log()
        );
    }
}

/// Starts an `n`-node cluster (node 1 bootstraps, the others join through it).
fn start_cluster(dir: &Path, n: u64) -> Vec<Node> {
    let first = Node::start_member(&dir.join("n1"), 1, None, &["--admin-token", TOKEN]);
    let mut nodes = vec![first];
    for id in 2..=n {
        let node = Node::start_member(
            &dir.join(format!("n{id}")),
            id,
            nodes.first(),
            &["--admin-token", TOKEN],
        );
        nodes.push(node);
    }
    nodes
}

/// Real Prometheus against `n` nodes: targets up, the count the clients made on every node,
/// one leader, the rule file loaded.
async fn prometheus_scrapes_cluster(n: u64) {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for id in 1..=n {
        std::fs::create_dir_all(dir.path().join(format!("n{id}"))).unwrap();
    }
    let nodes = start_cluster(dir.path(), n);
    const ACTIVATIONS: usize = 7;
    activate(&nodes[0], "windows", ACTIVATIONS).await;

    let targets: Vec<String> = nodes.iter().map(|n| n.admin_addr.to_string()).collect();
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let server = Prometheus::start(&prometheus, &prom_dir, &targets);

    // Every target up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = server
            .get("/api/v1/targets")
            .await
            .and_then(|v| {
                v["data"]["activeTargets"]
                    .as_array()
                    .map(|t| t.iter().filter(|t| t["health"] == "up").count())
            })
            .unwrap_or(0);
        if up == nodes.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{up} of {} targets up; prometheus log:\n{}",
            nodes.len(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let t = Duration::from_secs(60);
    let count = ACTIVATIONS as f64;
    // Every node reports the replicated count, and the cluster has one leader.
    server
        .wait_for(
            &format!("count(kms_current_count{{job=\"kmsd\", app=\"Windows\"}} == {ACTIVATIONS})"),
            n as f64,
            t,
        )
        .await;
    server
        .wait_for("max(kms_current_count{app=\"Windows\"})", count, t)
        .await;
    server
        .wait_for("sum(kms_raft_is_leader{job=\"kmsd\"})", 1.0, t)
        .await;
    server
        .wait_for("min(kms_state_requests_total{job=\"kmsd\"})", count, t)
        .await;
    server
        .wait_for(
            "sum(kms_activation_requests_total{job=\"kmsd\", result=\"granted\", app=\"Windows\"})",
            count,
            t,
        )
        .await;
    // The alert rules are loaded and evaluated: the thresholds exist and, with 7 < 25,
    // KmsCountTooLow is pending (it needs an hour to fire).
    server
        .wait_for("kms_alert:min_count{app=\"Windows\"}", 25.0, t)
        .await;
    server
        .wait_for(
            "count(ALERTS{alertname=\"KmsCountTooLow\", app=\"Windows\", alertstate=\"pending\"})",
            1.0,
            t,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_prometheus_scrapes_a_three_node_cluster() {
    prometheus_scrapes_cluster(3).await;
}
