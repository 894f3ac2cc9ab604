//! Metrics, the per-request activation log line and the node's event log (the fields of
//! the genuine host's event 12290; DNS publishing like 12293/12294).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kms_admin::events::ids;
use kms_admin::EventLog;
use kms_core::ActivationOutcome;
use kms_wire::kms::BaseRequest;
use serde_json::json;

use crate::engine::wall_clock_ms;

/// Events kept by a node (oldest dropped first); about 500 bytes each.
pub const EVENT_LOG_CAPACITY: usize = 5_000;

static EVENT_LOG: OnceLock<Arc<EventLog>> = OnceLock::new();

/// The node's event log (created on first use; one per process).
pub fn event_log() -> Arc<EventLog> {
    EVENT_LOG
        .get_or_init(|| Arc::new(EventLog::new(EVENT_LOG_CAPACITY)))
        .clone()
}

/// Reasons `rpc_fault` is called with, registered at 0 so rates and alerts work before the
/// first fault.
const RPC_FAULT_REASONS: &[&str] = &[
    "bad_frame",
    "too_many_pdus",
    "fault_pdu",
    "closed",
    "not_committed",
    "lifetime",
];

/// Registers counters that must exist (at 0) from the start: alert expressions on
/// `increase()` need a series before the first event.
pub fn register_metrics() {
    metrics::counter!("kms_dns_publish_failures_total").absolute(0);
    metrics::counter!("kms_dns_publish_successes_total").absolute(0);
    for reason in RPC_FAULT_REASONS {
        metrics::counter!("kms_rpc_faults_total", "reason" => *reason).absolute(0);
    }
    metrics::gauge!("kms_open_connections").set(0.0);
    for reason in crate::edge::RefusalReporter::reasons() {
        metrics::counter!("kms_edge_refused_total", "reason" => reason.label()).absolute(0);
    }
    // Counted by the admin API's token check (kms-admin).
    for reason in ["unauthorized", "throttled"] {
        metrics::counter!("kms_admin_auth_refused_total", "reason" => reason).absolute(0);
    }
}

/// One refusal by a per-source edge limit: always counted; `report` (at most one per
/// period and reason) also writes a log line and an event.
pub fn edge_refused(
    reason: crate::edge::Refusal,
    report: Option<crate::edge::RefusalReport>,
    peer: SocketAddr,
    limits: &crate::edge::EdgeLimits,
) {
    metrics::counter!("kms_edge_refused_total", "reason" => reason.label()).increment(1);
    let Some(report) = report else {
        return;
    };
    let (what, limit) = match reason {
        crate::edge::Refusal::Connections => (
            "connections over the per-source connection limit",
            format!("{} connections", limits.max_connections_per_source),
        ),
        crate::edge::Refusal::NewClients => (
            "new clients over the per-source new-client rate",
            format!(
                "{}/s, burst {}",
                limits.new_clients_per_sec, limits.new_clients_burst
            ),
        ),
    };
    tracing::warn!(
        reason = reason.label(),
        source = %peer.ip(),
        refused = report.count,
        limit = %limit,
        "refused {} {what} (latest from {})",
        report.count,
        peer.ip()
    );
    event_log().push(
        wall_clock_ms(),
        ids::EDGE_REFUSED,
        "warning",
        format!(
            "Refused {} {what} ({limit}); latest from {}",
            report.count,
            peer.ip()
        ),
        json!({
            "reason": reason.label(),
            "source": peer.ip().to_string(),
            "refused": report.count,
            "limit": limit,
        }),
    );
}

/// Records one DNS publishing attempt for `zone` (counter + event 12294 on success, 12293
/// with the error on failure). Called by the DNS publisher.
pub fn dns_publish(zone: &str, server: &str, result: Result<u32, &str>) {
    let log = event_log();
    match result {
        Ok(records) => {
            metrics::counter!("kms_dns_publish_successes_total").increment(1);
            log.push(
                wall_clock_ms(),
                ids::DNS_PUBLISH_SUCCEEDED,
                "info",
                format!("published {records} SRV record(s) in {zone}"),
                json!({ "zone": zone, "server": server, "records": records }),
            );
        }
        Err(error) => {
            metrics::counter!("kms_dns_publish_failures_total").increment(1);
            log.push(
                wall_clock_ms(),
                ids::DNS_PUBLISH_FAILED,
                "error",
                format!("DNS publishing in {zone} failed: {error}"),
                json!({ "zone": zone, "server": server, "error": error }),
            );
        }
    }
}

pub use kms_admin::names::license_status_name;

fn application_name(id: &uuid::Uuid) -> &'static str {
    kms_catalog::catalog()
        .application(id)
        .map(|a| a.name)
        .unwrap_or("unknown")
}

/// Product group label: the catalog's KMS item name, or "unknown" (bounded cardinality).
fn product_group(kms_id: &uuid::Uuid) -> &'static str {
    kms_catalog::catalog()
        .kms_item(kms_id)
        .map(|k| k.name)
        .unwrap_or("unknown")
}

fn product_name(req: &BaseRequest) -> std::borrow::Cow<'static, str> {
    match kms_catalog::catalog().sku(&req.sku_id) {
        Some(sku) => sku.name.into(),
        None => req.sku_id.to_string().into(),
    }
}

/// Fields of an activation event (event 12290), serialized straight into the event log.
#[derive(serde::Serialize)]
struct ActivationFields<'a> {
    client: SocketAddr,
    workstation: &'a str,
    cmid: uuid::Uuid,
    sku_id: uuid::Uuid,
    product: &'a str,
    kms_id: uuid::Uuid,
    app: &'static str,
    license_status: &'static str,
    license_status_code: u32,
    protocol: &'a str,
    count: u32,
    required: u32,
    activated: bool,
    result: &'a str,
    elapsed_us: u64,
}

/// Label set of `kms_activation_requests_total`: all values come from bounded static sets.
type ActivationLabels = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

thread_local! {
    /// Counter handles by label set, so the hot path does not rebuild and look up a metric
    /// key per request (that was a tenth of the CPU of an activation).
    static ACTIVATION_COUNTERS: std::cell::RefCell<std::collections::HashMap<ActivationLabels, metrics::Counter>> =
        Default::default();
    static DURATION_HISTOGRAMS: std::cell::RefCell<std::collections::HashMap<&'static str, metrics::Histogram>> =
        Default::default();
}

fn count_activation(labels: ActivationLabels) {
    ACTIVATION_COUNTERS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let counter = cache.entry(labels).or_insert_with(|| {
            let (app, product_group, protocol, result, license) = labels;
            metrics::counter!(
                "kms_activation_requests_total",
                "app" => app,
                "product_group" => product_group,
                "protocol" => protocol,
                "result" => result,
                "license_status" => license
            )
        });
        counter.increment(1);
    });
}

fn record_duration(protocol: &'static str, elapsed: Duration) {
    DURATION_HISTOGRAMS.with(|cache| {
        cache
            .borrow_mut()
            .entry(protocol)
            .or_insert_with(
                || metrics::histogram!("kms_activation_duration_seconds", "protocol" => protocol),
            )
            .record(elapsed.as_secs_f64());
    });
}

/// Records one decoded activation request: metrics, one structured log line and one event.
pub fn activation(
    req: &BaseRequest,
    outcome: &ActivationOutcome,
    peer: SocketAddr,
    elapsed: Duration,
) {
    let app = application_name(&req.application_id);
    let (protocol, version) = match (req.version.major, req.version.minor) {
        (4, 0) => ("4", std::borrow::Cow::Borrowed("4.0")),
        (5, 0) => ("5", "5.0".into()),
        (6, 0) => ("6", "6.0".into()),
        (major, minor) => ("other", format!("{major}.{minor}").into()),
    };
    let license = license_status_name(req.license_status);
    let (result, hresult, count, activated) = match outcome {
        ActivationOutcome::Granted(g) => ("granted", 0u32, g.current_count, g.activated),
        ActivationOutcome::Refused(r) => ("refused", r.hresult, 0, false),
    };
    count_activation((
        app,
        product_group(&req.kms_counted_id),
        protocol,
        result,
        license,
    ));
    record_duration(protocol, elapsed);
    let product = product_name(req);
    // The workstation name is the client's text: escaped so it cannot forge log lines or
    // carry terminal control sequences.
    let workstation = kms_core::text::escape_control(&req.workstation_name);
    let hresult_text = format!("0x{hresult:08X}");
    let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    tracing::info!(
        target: "kms::activation",
        event_id = 12290u32,
        client = %peer,
        workstation = %workstation,
        cmid = %req.client_machine_id,
        product = %product,
        kms_id = %req.kms_counted_id,
        app,
        license_status = license,
        protocol = %version,
        count,
        required = req.required_client_count,
        activated,
        result = %hresult_text,
        elapsed_us,
        "activation request"
    );
    event_log().push(
        wall_clock_ms(),
        ids::ACTIVATION,
        if hresult == 0 { "info" } else { "warning" },
        format!(
            "An activation request has been processed: {product} from {} ({}), count {count}, result {hresult_text}",
            workstation, peer.ip()
        ),
        ActivationFields {
            client: peer,
            workstation: &workstation,
            cmid: req.client_machine_id,
            sku_id: req.sku_id,
            product: &product,
            kms_id: req.kms_counted_id,
            app,
            license_status: license,
            license_status_code: req.license_status,
            protocol: &version,
            count,
            required: req.required_client_count,
            activated,
            result: &hresult_text,
            elapsed_us,
        },
    );
}

/// A request whose KMS message could not be decoded.
pub fn invalid_request(reason: &str) {
    event_log().push(
        wall_clock_ms(),
        ids::ACTIVATION,
        "warning",
        format!("An activation request could not be decoded: {reason}"),
        json!({ "result": "invalid", "error": reason }),
    );
    metrics::counter!(
        "kms_activation_requests_total",
        "app" => "unknown",
        "product_group" => "unknown",
        "protocol" => "other",
        "result" => "invalid",
        "license_status" => "other"
    )
    .increment(1);
}

/// A connection-level fault or close, by reason.
pub fn rpc_fault(reason: &'static str) {
    metrics::counter!("kms_rpc_faults_total", "reason" => reason).increment(1);
}
