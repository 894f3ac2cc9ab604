//! Admin HTTP: the `kms-admin` routers (API, dashboard, health, metrics) over this node's
//! [`NodeBackend`], and the HTTP server loop.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use kms_admin::AdminOptions;

pub use crate::admin_backend::{Addresses, DnsHandle, NodeBackend};

/// Everything served on `--admin-listen`: `/api/v1/*` (token-protected when a token is
/// set), `/healthz`, `/readyz`, `/metrics` and the dashboard at `/`.
pub fn router(backend: Arc<NodeBackend>, token: Option<String>) -> Router {
    kms_admin::router(
        backend,
        &AdminOptions {
            token,
            ..Default::default()
        },
    )
}

/// Only `/healthz`, `/readyz` and `/metrics`, for `--metrics-listen`.
pub fn ops_router(backend: Arc<NodeBackend>) -> Router {
    kms_admin::ops_router(backend)
}

/// Serves `router` until `shutdown` resolves.
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
