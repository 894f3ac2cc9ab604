//! Metrics and the per-request activation log line (the fields of the genuine host's
//! event 12290).

use std::net::SocketAddr;
use std::time::Duration;

use kms_core::ActivationOutcome;
use kms_wire::kms::BaseRequest;

/// Names of the license states a client reports (slmgr /dlv wording).
pub fn license_status_name(status: u32) -> &'static str {
    match status {
        0 => "unlicensed",
        1 => "licensed",
        2 => "initial_grace",
        3 => "out_of_tolerance_grace",
        4 => "non_genuine_grace",
        5 => "notification",
        6 => "extended_grace",
        _ => "other",
    }
}

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
}

/// A request whose KMS message could not be decoded.
pub fn invalid_request(reason: &str) {
    let _ = reason;
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
