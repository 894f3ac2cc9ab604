//! Admin HTTP surface. This part: `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::engine::{wall_clock_ms, Engine};

#[derive(Clone)]
pub struct AdminState {
    pub engine: Engine,
    pub prometheus: PrometheusHandle,
    pub node_id: u64,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(AxumState(s): AxumState<AdminState>) -> impl IntoResponse {
    if s.engine.state().read().await.identity().is_some() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": "host identity not initialised"})),
        )
    }
}

async fn metrics_handler(AxumState(s): AxumState<AdminState>) -> impl IntoResponse {
    refresh_state_gauges(&s).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
}

/// Gauges derived from the replicated state are computed at scrape time.
async fn refresh_state_gauges(s: &AdminState) {
    let state = s.engine.state().read().await;
    let now = wall_clock_ms();
    for count in state.counts(now) {
        let app = count.name.to_string();
        metrics::gauge!("kms_current_count", "app" => app.clone()).set(count.current_count as f64);
        metrics::gauge!("kms_cache_capacity", "app" => app.clone()).set(count.capacity as f64);
        let threshold_met = count.max_n_seen > 0 && count.current_count >= count.max_n_seen;
        metrics::gauge!("kms_count_threshold_met", "app" => app).set(if threshold_met {
            1.0
        } else {
            0.0
        });
    }
    metrics::gauge!("kms_registered_clients").set(state.client_count() as f64);
    let stats = state.statistics();
    metrics::gauge!("kms_state_total_requests").set(stats.total_requests as f64);
    metrics::gauge!("kms_state_failed_requests").set(stats.failed_requests as f64);
    metrics::gauge!("kms_log_last_index").set(
        s.engine
            .stats()
            .last_index
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    metrics::gauge!("kms_node_id").set(s.node_id as f64);
}

/// Serves the admin router until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
