//! How the node-to-node transport is secured, and the TLS material for it.
//!
//! * [`Security::Pki`] (the default of kmsd): the built-in cluster PKI. Peers present a node
//!   certificate of the cluster CA that the replicated state records; clients without a
//!   certificate reach only the enrollment call (a join token buys a certificate there).
//! * [`Security::Operator`]: the operator's own PKI (`--raft-tls-*`); any certificate of the
//!   operator's CA is a peer.
//! * [`Security::Insecure`]: plain TCP, for tests and single-host set-ups; kmsd refuses it on
//!   a non-loopback listener.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms_core::security::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::TransportError;
use crate::pki::{fingerprint, NodeCredentials, SERVER_NAME};

/// PEM files of an operator-provided PKI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signed every node's certificate; peers must present one it signed.
    pub ca: PathBuf,
    /// Name expected in peer certificates (SAN), the same for all nodes.
    pub server_name: String,
}

/// How the transport is secured.
#[derive(Debug, Clone)]
pub enum Security {
    Insecure,
    Operator(TlsFiles),
    Pki(NodeCredentials),
}

impl Security {
    pub fn mode(&self) -> &'static str {
        match self {
            Security::Insecure => "insecure",
            Security::Operator(_) => "operator-pki",
            Security::Pki(_) => "cluster-pki",
        }
    }
}

/// Loaded TLS material.
#[derive(Clone)]
pub struct Tls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl Tls {
    /// From PEM: the certificate chain and key this node presents, the CA its peers' must
    /// chain to, and the name peers' certificates carry. `enrollment` lets clients without a
    /// certificate complete the handshake (they reach only the enrollment call).
    pub fn from_pem(
        chain: &[u8],
        key: &[u8],
        ca: &[u8],
        server_name: &str,
        enrollment: bool,
    ) -> Self {
        let identity = Identity::from_pem(chain, key);
        let ca = Certificate::from_pem(ca);
        Self {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone())
                .client_auth_optional(enrollment),
            client: ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(identity)
                .domain_name(server_name.to_owned()),
        }
    }

    pub fn load(security: &Security) -> Result<Option<Self>, TransportError> {
        match security {
            Security::Insecure => Ok(None),
            Security::Operator(files) => {
                let read = |p: &PathBuf| {
                    std::fs::read(p).map_err(|e| {
                        TransportError::Tls(format!("cannot read {}: {e}", p.display()))
                    })
                };
                Ok(Some(Self::from_pem(
                    &read(&files.cert)?,
                    &read(&files.key)?,
                    &read(&files.ca)?,
                    &files.server_name,
                    false,
                )))
            }
            Security::Pki(creds) => Ok(Some(Self::from_pem(
                creds.chain_pem().as_bytes(),
                creds.key_pem().as_bytes(),
                creds.ca_pem().as_bytes(),
                SERVER_NAME,
                true,
            ))),
        }
    }

    /// TLS for a node that has no certificate yet: it verifies the member against `ca_der`
    /// and presents nothing (only enrollment is open to it).
    pub fn enrollment_client(ca_der: &[u8]) -> ClientTlsConfig {
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", ca_der.to_vec()));
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pem))
            .domain_name(SERVER_NAME)
    }
}

/// Records the chain a server presents, verifying only the handshake signature (the chain
/// is judged afterwards against the pinned fingerprint).
#[derive(Debug)]
struct CaptureChain {
    seen: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for CaptureChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(end_entity.to_vec());
            seen.extend(intermediates.iter().map(|c| c.to_vec()));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to the member at `addr`, and returns the certificate in its chain whose SHA-256
/// is `pin` (the cluster CA named by a join token). Nothing is sent but the TLS handshake;
/// the caller then talks to the member with that CA as the only trust root, so a member
/// whose certificate that CA did not sign is refused there.
pub async fn fetch_pinned_ca(
    addr: &str,
    pin: &Fingerprint,
    timeout: Duration,
) -> Result<Vec<u8>, TransportError> {
    fetch_chain(addr, timeout)
        .await?
        .into_iter()
        .find(|der| &fingerprint(der) == pin)
        .ok_or_else(|| {
            TransportError::Refused(format!(
                "{addr} did not present the cluster CA named by the join token (wrong cluster, \
                 or someone in between); nothing was sent"
            ))
        })
}

/// The certificate chain the member at `addr` presents (leaf first), after a TLS handshake
/// that sends nothing else. Judged by the caller (a pinned fingerprint, or a proof).
pub async fn fetch_chain(addr: &str, timeout: Duration) -> Result<Vec<Vec<u8>>, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(CaptureChain {
        seen: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(SERVER_NAME.to_owned())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    };
    match tokio::time::timeout(timeout, handshake).await {
        Err(_) => {
            return Err(TransportError::Unreachable(format!(
                "{addr}: no TLS handshake within {timeout:?}"
            )))
        }
        Ok(Err(e)) => return Err(TransportError::Unreachable(format!("{addr}: {e}"))),
        Ok(Ok(_stream)) => {}
    }
    verifier
        .seen
        .lock()
        .map(|s| s.clone())
        .map_err(|_| TransportError::Tls("certificate capture lock".into()))
}
