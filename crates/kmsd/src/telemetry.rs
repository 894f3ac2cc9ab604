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

fn product_name(req: &BaseRequest) -> String {
    let catalog = kms_catalog::catalog();
    match catalog.sku(&req.sku_id) {
        Some(sku) => sku.name.to_owned(),
        None => req.sku_id.to_string(),
    }
}

/// Records one decoded activation request: metrics plus one structured log line.
pub fn activation(
    req: &BaseRequest,
    outcome: &ActivationOutcome,
    peer: SocketAddr,
    elapsed: Duration,
) {
    let app = application_name(&req.application_id);
    let protocol = match req.version.major {
        4 => "4",
        5 => "5",
        6 => "6",
        _ => "other",
    };
    let license = license_status_name(req.license_status);
    let (result, hresult, count, activated) = match outcome {
        ActivationOutcome::Granted(g) => ("granted", 0u32, g.current_count, g.activated),
        ActivationOutcome::Refused(r) => ("refused", r.hresult, 0, false),
    };
    metrics::counter!(
        "kms_activation_requests_total",
        "app" => app,
        "product_group" => product_group(&req.kms_counted_id),
        "protocol" => protocol,
        "result" => result,
        "license_status" => license
    )
    .increment(1);
    metrics::histogram!("kms_activation_duration_seconds", "protocol" => protocol)
        .record(elapsed.as_secs_f64());
    tracing::info!(
        target: "kms::activation",
        event_id = 12290u32,
        client = %peer,
        workstation = %req.workstation_name,
        cmid = %req.client_machine_id,
        product = %product_name(req),
        kms_id = %req.kms_counted_id,
        app,
        license_status = license,
        protocol = %format!("{}.{}", req.version.major, req.version.minor),
        count,
        required = req.required_client_count,
        activated,
        result = %format!("0x{hresult:08X}"),
        elapsed_us = elapsed.as_micros() as u64,
        "activation request"
    );
    let product = product_name(req);
    event_log().push(
        wall_clock_ms(),
        ids::ACTIVATION,
        if hresult == 0 { "info" } else { "warning" },
        format!(
            "An activation request has been processed: {product} from {} ({}), count {count}, result 0x{hresult:08X}",
            req.workstation_name, peer.ip()
        ),
        json!({
            "client": peer.to_string(),
            "workstation": req.workstation_name,
            "cmid": req.client_machine_id,
            "sku_id": req.sku_id,
            "product": product,
            "kms_id": req.kms_counted_id,
            "app": app,
            "license_status": license,
            "license_status_code": req.license_status,
            "protocol": format!("{}.{}", req.version.major, req.version.minor),
            "count": count,
            "required": req.required_client_count,
            "activated": activated,
            "result": format!("0x{hresult:08X}"),
            "elapsed_us": u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        }),
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
