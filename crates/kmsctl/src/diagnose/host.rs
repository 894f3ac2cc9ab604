//! The host's side of `kmsctl diagnose --admin-url`: what one node says about itself through
//! the existing admin API (`/api/v1/status`, `/config`, `/products`, `/events`).

use std::net::{IpAddr, SocketAddr};

use kms_admin::views::StatusResponse;
use serde_json::{json, Value};

use super::report::{problem, Check, Report};
use super::{now_ms, Options, Start};
use crate::admin_client::{AdminClient, AdminError};

/// Windows' own limit between a KMS client's and host's clocks (4 hours).
const WINDOWS_SKEW_LIMIT_MS: i64 = 4 * 3600 * 1000;
/// Activation events read to find this client's recent requests.
const EVENTS_LIMIT: usize = 1000;
/// Refusals listed in the report.
const SHOWN_REFUSALS: usize = 5;

/// Adds the host's view to `report`. `local_ips` are this machine's addresses on the KMS
/// connections it made (the address the host logs for it).
pub async fn host_view(report: &mut Report, url: &str, options: &Options, local_ips: &[IpAddr]) {
    let client = match AdminClient::new(url, options.token.clone(), options.timeout) {
        Ok(c) => c,
        Err(e) => {
            report.push(Check::fail(
                "host_status",
                url.to_owned(),
                problem::ADMIN_UNREACHABLE,
                e.to_string(),
                "give the admin API as http(s)://HOST:PORT (admin.listen or admin.advertise of a node)",
            ));
            return;
        }
    };
    let sent = now_ms();
    let status: StatusResponse = match client.get("/api/v1/status").await {
        Ok(s) => s,
        Err(e) => {
            report.push(admin_error(url, &e));
            return;
        }
    };
    let received = now_ms();
    status_check(report, url, &status);
    clock_check(report, &client, &status, sent, received).await;
    policy_check(report, &client, options).await;
    dns_check(report, &client, &status, options).await;
    events_check(report, &client, &status, local_ips).await;
}

fn admin_error(url: &str, e: &AdminError) -> Check {
    match e {
        AdminError::Unauthorized { .. } => Check::fail(
            "host_status",
            url.to_owned(),
            problem::ADMIN_TOKEN,
            e.to_string(),
            "pass the node's admin token with --token or KMSCTL_TOKEN (KMSD_ADMIN_TOKEN on the node)",
        ),
        _ => Check::fail(
            "host_status",
            url.to_owned(),
            problem::ADMIN_UNREACHABLE,
            e.to_string(),
            "check the URL (admin.listen / admin.advertise of a node) and that this machine may reach it",
        ),
    }
}

fn status_check(report: &mut Report, url: &str, s: &StatusResponse) {
    let subject = format!("node {} ({url})", s.node_id);
    let data = json!({
        "node_id": s.node_id, "role": s.role, "leader_id": s.leader_id, "term": s.term,
        "quorum": s.quorum, "version": s.version, "queued_activations": s.queued_activations,
        "refusals": s.refusals,
    });
    if s.quorum {
        report.push(
            Check::ok(
                "host_status",
                subject,
                format!(
                    "{:?}, leader node {}, quorum yes, kmsd {}",
                    s.role,
                    s.leader_id
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "?".into()),
                    s.version
                ),
            )
            .with_data(data),
        );
    } else {
        report.push(
            Check::warn(
                "host_status",
                subject,
                problem::NO_QUORUM,
                format!(
                    "the node has no quorum (leader {}): it answers clients, but their counts are not replicated until a majority of the members is back ({} activations queued)",
                    s.leader_id.map(|l| l.to_string()).unwrap_or_else(|| "unknown".into()),
                    s.queued_activations
                ),
                "bring the other members back (kmsctl cluster list shows them) or, if they are gone for good, `kmsd recover --force-single-node`",
            )
            .with_data(data),
        );
    }
}

async fn clock_check(
    report: &mut Report,
    client: &AdminClient,
    s: &StatusResponse,
    sent: u64,
    received: u64,
) {
    let midpoint = sent / 2 + received / 2;
    let offset =
        i64::try_from(s.time_ms).unwrap_or(i64::MAX) - i64::try_from(midpoint).unwrap_or(0);
    let uncertainty = received.saturating_sub(sent) / 2 + 1;
    let max_minutes = client
        .get::<kms_admin::views::ConfigView>("/api/v1/config")
        .await
        .ok()
        .and_then(|c| c.policy.max_clock_skew_minutes);
    let data = json!({
        "offset_ms": offset, "uncertainty_ms": uncertainty,
        "max_clock_skew_minutes": max_minutes,
    });
    let words = describe_offset(offset);
    let subject = "client/host".to_owned();
    let limit_ms = max_minutes.map(|m| i64::from(m) * 60_000);
    if limit_ms.is_some_and(|l| offset.abs() > l) {
        report.push(
            Check::fail(
                "clock",
                subject,
                problem::CLOCK_SKEW,
                format!(
                    "the host's clock is {words}; its policy refuses clients more than {} minutes off (0xC004F06C)",
                    max_minutes.unwrap_or(0)
                ),
                "synchronise the clocks (w32tm /resync on Windows; chrony or systemd-timesyncd on the host)",
            )
            .with_data(data),
        );
    } else if offset.abs() > WINDOWS_SKEW_LIMIT_MS {
        report.push(
            Check::warn(
                "clock",
                subject,
                problem::CLOCK_SKEW,
                format!("the host's clock is {words}: more than the 4 hours a genuine KMS host tolerates"),
                "synchronise the clocks (w32tm /resync on Windows; chrony or systemd-timesyncd on the host)",
            )
            .with_data(data),
        );
    } else {
        report.push(
            Check::ok("clock", subject, format!("the host's clock is {words}")).with_data(data),
        );
    }
}

fn describe_offset(offset_ms: i64) -> String {
    let secs = offset_ms.abs() as f64 / 1000.0;
    if offset_ms.abs() < 1000 {
        "within a second of this machine's".to_owned()
    } else if offset_ms > 0 {
        format!("{secs:.0} s ahead of this machine's")
    } else {
        format!("{secs:.0} s behind this machine's")
    }
}

async fn policy_check(report: &mut Report, client: &AdminClient, options: &Options) {
    let group = options.product.kms_item;
    let subject = format!("{} ({})", options.product.sku.name, group.name);
    let products: Value = match client.get("/api/v1/products").await {
        Ok(v) => v,
        Err(e) => {
            report.push(Check::skip(
                "policy",
                subject,
                format!("cannot read the host's products: {e}"),
            ));
            return;
        }
    };
    let policy = products["product_policy"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let entry = products["products"]
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|p| p["kms_id"].as_str() == Some(group.id.to_string().as_str()))
        })
        .cloned();
    match entry {
        Some(p) if p["activated"].as_bool() == Some(true) => report.push(Check::ok(
            "policy",
            subject,
            format!("the {policy} product policy activates this product group"),
        )),
        Some(p) => report.push(
            Check::fail(
                "policy",
                subject,
                problem::POLICY_EXCLUDES_PRODUCT,
                format!("the host's product policy is {policy} and no licensed CSVLK covers {}: its clients are refused with 0xC004F042", group.name),
                format!(
                    "license a CSVLK of this group (e.g. {}) with `kmsctl config set licensed_csvlks=...`, or set product_policy = open",
                    p["csvlk"].as_str().unwrap_or("see `kmsctl products`")
                ),
            )
            .with_data(json!({ "product_policy": policy, "kms_id": group.id })),
        ),
        None => report.push(Check::warn(
            "policy",
            subject,
            problem::POLICY_EXCLUDES_PRODUCT,
            format!("the host's catalog does not list the product group {}", group.name),
            "upgrade kmsd: this host's catalog is older than this kmsctl's",
        )),
    }
}

async fn dns_check(
    report: &mut Report,
    client: &AdminClient,
    s: &StatusResponse,
    options: &Options,
) {
    let looked_up = matches!(options.start, Start::Domain(_));
    if !s.dns.enabled {
        if looked_up {
            report.push(Check::warn(
                "host_dns",
                format!("node {}", s.node_id),
                problem::DNS_NOT_PUBLISHED,
                "this node publishes no SRV records ([[dns.publish]] is not configured): the records must be kept up to date by hand",
                "configure [[dns.publish]] on every node (the leader publishes) or maintain the _vlmcs._tcp records yourself",
            ));
        } else {
            report.push(Check::skip(
                "host_dns",
                format!("node {}", s.node_id),
                "DNS publishing is not configured on this node",
            ));
        }
        return;
    }
    let failures: Vec<Value> = client
        .get::<Value>(&format!(
            "/api/v1/events?event_id={}&limit=5",
            kms_admin::events::ids::DNS_PUBLISH_FAILED
        ))
        .await
        .ok()
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default();
    for d in &s.dns.domains {
        let subject = format!("{} via {}", d.zone, d.server);
        let data = json!({
            "zone": d.zone, "server": d.server, "records_published": d.records_published,
            "ttl": d.ttl, "last_success_ms": d.last_success_ms, "last_error": d.last_error,
            "recent_failures": failures.iter().map(|e| e["message"].clone()).collect::<Vec<_>>(),
        });
        if let Some(err) = &d.last_error {
            report.push(
                Check::fail(
                    "host_dns",
                    subject,
                    problem::DNS_PUBLISH_FAILED,
                    format!("publishing fails: {err}"),
                    "check the TSIG key and the zone's update policy (allow-update / update-policy), and that the DNS server is reachable from the leader",
                )
                .with_data(data),
            );
        } else if d.records_published == 0 {
            report.push(
                Check::warn(
                    "host_dns",
                    subject,
                    problem::DNS_NOT_PUBLISHED,
                    "no record published by this cluster yet (only the leader publishes; a follower may not know)",
                    "ask the leader (kmsctl status on it) or wait for the next publish round",
                )
                .with_data(data),
            );
        } else {
            let age = d
                .last_success_ms
                .map(|t| {
                    format!(
                        ", last success {} s ago",
                        s.time_ms.saturating_sub(t) / 1000
                    )
                })
                .unwrap_or_default();
            report.push(
                Check::ok(
                    "host_dns",
                    subject,
                    format!(
                        "{} record(s) published, TTL {} s{age}",
                        d.records_published, d.ttl
                    ),
                )
                .with_data(data),
            );
        }
    }
}

async fn events_check(
    report: &mut Report,
    client: &AdminClient,
    s: &StatusResponse,
    local_ips: &[IpAddr],
) {
    let subject = match local_ips {
        [] => "this client".to_owned(),
        ips => ips
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    if local_ips.is_empty() {
        report.push(Check::skip(
            "host_events",
            subject,
            "no KMS connection was made, so this machine's address as the host sees it is unknown",
        ));
        return;
    }
    let page: Value = match client
        .get(&format!(
            "/api/v1/events?event_id={}&limit={EVENTS_LIMIT}",
            kms_admin::events::ids::ACTIVATION
        ))
        .await
    {
        Ok(v) => v,
        Err(e) => {
            report.push(Check::skip(
                "host_events",
                subject,
                format!("cannot read the host's events: {e}"),
            ));
            return;
        }
    };
    let events = page["events"].as_array().cloned().unwrap_or_default();
    let ours: Vec<&Value> = events
        .iter()
        .filter(|e| {
            event_client_ip(&e["fields"]["client"]).is_some_and(|ip| local_ips.contains(&ip))
        })
        .collect();
    let refused: Vec<&Value> = ours
        .iter()
        .copied()
        .filter(|e| {
            let r = e["fields"]["result"].as_str().unwrap_or("");
            !r.is_empty() && r != "0x00000000"
        })
        .collect();
    let shown: Vec<Value> = refused
        .iter()
        .take(SHOWN_REFUSALS)
        .map(|e| {
            json!({
                "time_ms": e["time_ms"], "workstation": e["fields"]["workstation"],
                "product": e["fields"]["product"], "result": e["fields"]["result"],
                "message": e["message"],
            })
        })
        .collect();
    let data =
        json!({ "requests": ours.len(), "refused": refused.len(), "recent_refusals": shown });
    let node = s.node_id;
    if refused.is_empty() {
        report.push(
            Check::ok(
                "host_events",
                subject,
                format!(
                    "node {node} logged {} request(s) from this address in its last {} activation events, none refused",
                    ours.len(),
                    events.len()
                ),
            )
            .with_data(data),
        );
    } else {
        let summary: Vec<String> = refused
            .iter()
            .take(SHOWN_REFUSALS)
            .map(|e| {
                format!(
                    "{} {} from {}",
                    e["fields"]["result"].as_str().unwrap_or("?"),
                    e["fields"]["product"].as_str().unwrap_or("?"),
                    e["fields"]["workstation"].as_str().unwrap_or("?")
                )
            })
            .collect();
        report.push(
            Check::warn(
                "host_events",
                subject,
                problem::RECENT_REFUSALS,
                format!(
                    "node {node} refused {} of {} recent request(s) from this address: {}",
                    refused.len(),
                    ours.len(),
                    summary.join("; ")
                ),
                "the refusals name the cause (0xC004F042 product policy, 0xC004F06C clock, 0x8007000D protocol); `kmsctl events` shows them in full",
            )
            .with_data(data),
        );
    }
}

fn event_client_ip(v: &Value) -> Option<IpAddr> {
    let text = v.as_str()?;
    text.parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| text.parse::<IpAddr>())
        .ok()
        .map(|ip| match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        })
}
