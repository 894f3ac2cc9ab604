//! Metrics computed at scrape time from the applied state and the node's view of the
//! cluster, rendered as Prometheus text after the node's own recorder output. Computing them
//! per scrape means no stale series (e.g. for a removed follower) and no second copy of the
//! state in a metrics registry.

use std::fmt::Write;

use crate::backend::{AdminBackend, Role};
use crate::service;

/// Writes one metric family.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    Family::new(out, name, "gauge", help).sample(name, &[], value);
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Removes from `text` every family whose name is declared (`# TYPE`) in `existing`, so a
/// metric both the node's recorder and this module produce (e.g. `kms_raft_is_leader`)
/// appears once. Families are recognised by their `# HELP` or `# TYPE` line.
pub fn without_families_in(text: &str, existing: &str) -> String {
    let declared: std::collections::HashSet<&str> = existing
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    if declared.is_empty() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut skipping = false;
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            let name = rest.split_whitespace().next().unwrap_or("");
            skipping = declared.contains(name);
        } else if !line.starts_with('#') && !line.is_empty() && skipping {
            // A sample of a skipped family; any other family starts with its own header.
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let base = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .unwrap_or(name);
            skipping = declared.contains(name) || declared.contains(base);
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Renders the scrape-time metrics.
pub async fn render_state_metrics(backend: &dyn AdminBackend) -> String {
    let mut out = String::with_capacity(4096);
    let node = backend.node();
    let now = backend.now_ms();
    let ready = backend.readiness(crate::backend::Readiness::Member);
    let cluster = backend.cluster().await.ok();
    let dns = backend.dns();
    {
        let state_lock = backend.state();
        let state = state_lock.read().await;
        let apps = service::applications(&state, now);
        if let Some(cat) = state.catalog().catalog() {
            let mut f = Family::new(
                &mut out,
                "kms_catalog_info",
                "gauge",
                "The replicated product catalog (always 1; version and source as labels).",
            );
            f.sample(
                "kms_catalog_info",
                &[("version", &cat.version), ("source", &cat.source)],
                1.0,
            );
        }

        let mut f = Family::new(
            &mut out,
            "kms_current_count",
            "gauge",
            "Current count per application: distinct clients in the last 30 days.",
        );
        for a in &apps {
            f.sample(
                "kms_current_count",
                &[("app", &a.name)],
                f64::from(a.current_count),
            );
        }
        let mut f = Family::new(
            &mut out,
            "kms_count_threshold",
            "gauge",
            "Count clients of the application need (largest N seen, else the catalog's).",
        );
        for a in &apps {
            f.sample(
                "kms_count_threshold",
                &[("app", &a.name)],
                f64::from(a.threshold),
            );
        }
        let mut f = Family::new(
            &mut out,
            "kms_count_threshold_met",
            "gauge",
            "1 when the application's current count reaches its threshold.",
        );
        for a in &apps {
            f.sample(
                "kms_count_threshold_met",
                &[("app", &a.name)],
                flag(a.threshold_met),
            );
        }
        let mut f = Family::new(
            &mut out,
            "kms_cache_capacity",
            "gauge",
            "CMID cache size per application (2 x the largest N seen).",
        );
        for a in &apps {
            f.sample(
                "kms_cache_capacity",
                &[("app", &a.name)],
                f64::from(a.capacity),
            );
        }
        gauge(
            &mut out,
            "kms_registered_clients",
            "Clients in the registry (per application list).",
            state.client_count() as f64,
        );
        let stats = state.statistics();
        let mut f = Family::new(
            &mut out,
            "kms_state_requests_total",
            "counter",
            "Activation requests applied to the replicated state (cluster-wide, equal on every node).",
        );
        f.sample("kms_state_requests_total", &[], stats.total_requests as f64);
        let mut f = Family::new(
            &mut out,
            "kms_state_failed_requests_total",
            "counter",
            "Refused activation requests in the replicated state (cluster-wide).",
        );
        f.sample(
            "kms_state_failed_requests_total",
            &[],
            stats.failed_requests as f64,
        );
        let by = &stats.by_license_status;
        let mut f = Family::new(
            &mut out,
            "kms_state_requests_by_license_status_total",
            "counter",
            "Activation requests in the replicated state by client license status.",
        );
        for (status, n) in [
            ("unlicensed", by.unlicensed),
            ("licensed", by.licensed),
            ("initial_grace", by.initial_grace),
            ("out_of_tolerance_grace", by.out_of_tolerance_grace),
            ("non_genuine_grace", by.non_genuine_grace),
            ("notification", by.notification),
            ("extended_grace", by.extended_grace),
            ("other", by.other),
        ] {
            f.sample(
                "kms_state_requests_by_license_status_total",
                &[("license_status", status)],
                n as f64,
            );
        }
        if let Some(last) = service::last_activation_ms(&state) {
            gauge(
                &mut out,
                "kms_last_activation_timestamp_seconds",
                "Unix time of the latest granted activation (cluster-wide).",
                last as f64 / 1000.0,
            );
        }
        gauge(
            &mut out,
            "kms_identity_initialised",
            "1 once the host identity (ePIDs, HWID) exists.",
            flag(state.identity().is_some()),
        );
    }

    gauge(
        &mut out,
        "kms_ready",
        "1 when /readyz answers 200.",
        flag(ready.is_ok()),
    );
    let role = match node.role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
        Role::Detached => "detached",
    };
    let node_id = node.node_id.to_string();
    Family::new(
        &mut out,
        "kms_node_info",
        "gauge",
        "This node: id, Raft role, version.",
    )
    .sample(
        "kms_node_info",
        &[
            ("node_id", &node_id),
            ("role", role),
            ("version", &node.version),
        ],
        1.0,
    );
    gauge(
        &mut out,
        "kms_raft_is_leader",
        "1 on the Raft leader.",
        flag(node.role == Role::Leader),
    );
    gauge(
        &mut out,
        "kms_raft_leader_known",
        "1 when this node knows a leader.",
        flag(node.leader_id.is_some()),
    );
    gauge(
        &mut out,
        "kms_raft_term",
        "Current Raft term.",
        node.term as f64,
    );
    gauge(
        &mut out,
        "kms_raft_quorum_ok",
        "1 when this node reaches a quorum.",
        flag(node.quorum),
    );
    gauge(
        &mut out,
        "kms_raft_applied_index",
        "Index of the last log entry applied to the local state.",
        node.last_applied as f64,
    );
    if let Some(commit) = backend.commit_index() {
        gauge(
            &mut out,
            "kms_raft_commit_index",
            "Raft commit index known to this node.",
            commit as f64,
        );
    }
    gauge(
        &mut out,
        "kms_raft_queued_activations",
        "Activations answered out of quorum and not yet committed.",
        node.queued_activations as f64,
    );
    if let Some(cluster) = &cluster {
        gauge(
            &mut out,
            "kms_raft_members",
            "Cluster members (voters and learners).",
            cluster.members.len() as f64,
        );
        let lags: Vec<(String, u64)> = cluster
            .members
            .iter()
            .filter(|m| m.id != node.node_id)
            .filter_map(|m| m.lag.map(|lag| (m.id.to_string(), lag)))
            .collect();
        if node.role == Role::Leader && !lags.is_empty() {
            let mut f = Family::new(
                &mut out,
                "kms_raft_replication_lag",
                "gauge",
                "Log entries a follower is behind the leader (exported by the leader).",
            );
            for (id, lag) in &lags {
                f.sample("kms_raft_replication_lag", &[("follower", id)], *lag as f64);
            }
        }
    }
    gauge(
        &mut out,
        "kms_dns_publish_enabled",
        "1 when DNS SRV publishing is configured.",
        flag(dns.enabled),
    );
    if !dns.domains.is_empty() {
        let mut f = Family::new(
            &mut out,
            "kms_dns_records_published",
            "gauge",
            "SRV records currently published for this cluster, per zone.",
        );
        for d in &dns.domains {
            f.sample(
                "kms_dns_records_published",
                &[("zone", &d.zone)],
                f64::from(d.records_published),
            );
        }
        let mut f = Family::new(
            &mut out,
            "kms_dns_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful DNS publish, per zone (0 = never).",
        );
        for d in &dns.domains {
            f.sample(
                "kms_dns_last_success_timestamp_seconds",
                &[("zone", &d.zone)],
                d.last_success_ms.unwrap_or(0) as f64 / 1000.0,
            );
        }
    }
    gauge(
        &mut out,
        "kms_events_retained",
        "Events currently kept in the node's bounded event log.",
        backend.events().len() as f64,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_values_formatted() {
        let mut out = String::new();
        Family::new(&mut out, "kms_x", "gauge", "help").sample(
            "kms_x",
            &[("app", "a\"b\\c\nd")],
            3.0,
        );
        assert!(out.contains("kms_x{app=\"a\\\"b\\\\c\\nd\"} 3\n"), "{out}");
        assert_eq!(format_value(0.5), "0.5");
        assert_eq!(format_value(1_700_000_000.0), "1700000000");
    }

    #[test]
    fn families_the_backend_declares_are_dropped() {
        let mut ours = String::new();
        gauge(&mut ours, "kms_raft_is_leader", "h", 1.0);
        gauge(&mut ours, "kms_ready", "h", 1.0);
        // The recorder's format: TYPE line, samples, blank line; no HELP.
        let recorder = "# TYPE kms_raft_is_leader gauge\nkms_raft_is_leader 0\n\n# TYPE kms_other counter\nkms_other 4\n";
        let merged = without_families_in(recorder, &ours);
        assert!(!merged.contains("kms_raft_is_leader"), "{merged}");
        assert!(merged.contains("kms_other 4"), "{merged}");
        let merged = without_families_in(&ours, recorder);
        assert!(!merged.contains("kms_raft_is_leader"), "{merged}");
        assert!(merged.contains("kms_ready 1"), "{merged}");
        assert_eq!(without_families_in(&ours, ""), ours);
    }
}
