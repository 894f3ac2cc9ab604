//! Admin HTTP: the `kms-admin` routers (API, dashboard, health, metrics) over this node's
//! [`NodeBackend`], and the HTTP and HTTPS server loops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use kms_admin::AdminOptions;
use tokio_rustls::rustls;

pub use crate::admin_backend::{Addresses, DnsHandle, NodeBackend};

/// Everything served on `--admin-listen`: `/api/v1/*` (token-protected when a token is
/// set, failed token checks rate-limited per source address), `/healthz`, `/readyz`,
/// `/metrics` and the dashboard at `/`. `tls`: the listener speaks HTTPS (redirects to the
/// leader then use `https`).
pub fn router(
    backend: Arc<NodeBackend>,
    token: Option<String>,
    auth_failures: u32,
    auth_window: Duration,
    tls: bool,
) -> Router {
    kms_admin::router(
        backend,
        &AdminOptions {
            token,
            auth_failures,
            auth_window,
            tls,
        },
    )
}

/// Only `/healthz`, `/readyz` and `/metrics`, for `--metrics-listen`.
pub fn ops_router(backend: Arc<NodeBackend>) -> Router {
    kms_admin::ops_router(backend)
}

/// Serves `router` over plain HTTP until `shutdown` resolves.
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

/// Why a TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("no certificate in the PEM certificate chain")]
    NoCertificate,
    #[error("cannot read the PEM certificate chain: {0}")]
    Certificate(String),
    #[error("cannot read the PEM private key: {0}")]
    Key(String),
    #[error("certificate and key do not form a usable TLS identity: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS server set-up of an admin listener from PEM bytes: the certificate chain (leaf
/// first) and its private key (PKCS#8, PKCS#1 or SEC1). HTTP/1.1 and HTTP/2 by ALPN. Kept
/// to PEM bytes so an operator certificate and a node certificate of the cluster CA go
/// through the same function.
pub fn tls_server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsSetupError::Key(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads the certificate and key files and builds [`tls_server_config`].
pub fn tls_server_config_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("cannot read admin TLS certificate {}", cert.display()))?;
    let key_pem = std::fs::read(key)
        .with_context(|| format!("cannot read admin TLS key {}", key.display()))?;
    tls_server_config(&cert_pem, &key_pem).with_context(|| {
        format!(
            "admin TLS certificate {} / key {}",
            cert.display(),
            key.display()
        )
    })
}

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections being served at once (the API is for operators and nodes).
const MAX_TLS_CONNECTIONS: usize = 512;

/// Serves `router` over HTTPS until `shutdown` resolves; open connections get up to 5 s to
/// finish. The peer address reaches handlers as `ConnectInfo<SocketAddr>`, as with
/// [`serve`].
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use tower::ServiceExt;

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "admin connection limit reached; closing");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "admin TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    router.clone().oneshot(request.map(axum::body::Body::new))
                },
            );
            let builder = Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin connections still open after 5 s; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_clear_error() {
        assert!(matches!(
            tls_server_config(b"", b""),
            Err(TlsSetupError::NoCertificate)
        ));
        let err = tls_server_config(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            b"nothing",
        )
        .unwrap_err();
        assert!(
            matches!(err, TlsSetupError::Key(_) | TlsSetupError::Rustls(_)),
            "{err}"
        );
    }
}
