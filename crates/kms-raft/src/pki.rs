//! The built-in cluster PKI: a cluster CA made by the bootstrapping node, node certificates
//! issued by the leader to nodes that present a join token, and the join token format.
//!
//! Certificates come from `rcgen` (ECDSA P-256). Every node certificate names the cluster
//! ([`SERVER_NAME`], the name peers verify) and the node (`node-<id>.kms-cluster`), and is
//! recorded by its SHA-256 fingerprint in the replicated security state: a peer is accepted
//! only with a recorded certificate, so a removed node's certificate stops working at once.

use std::path::{Path, PathBuf};

use kms_core::security::{ClusterCa, Fingerprint};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The name every node certificate carries and every peer verifies.
pub const SERVER_NAME: &str = "kms-cluster";
/// Node certificates are valid this long; a node renews its own at start-up once less than
/// [`RENEW_BEFORE_DAYS`] remain.
pub const NODE_CERT_DAYS: i64 = 365;
pub const RENEW_BEFORE_DAYS: i64 = 30;
const CA_YEARS: i64 = 20;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("invalid join token: {0}")]
    Token(String),
}

/// Id of the token made from a deployment's shared secret (`--cluster-secret-file`).
pub const DEPLOY_TOKEN_ID: &str = "deploy";
/// Shortest accepted shared deployment secret.
pub const MIN_DEPLOY_SECRET: usize = 32;

/// A member's proof that it knows a token's secret: HMAC-SHA256 keyed with the secret's
/// SHA-256 (what the state stores) over the joiner's challenge and the CA fingerprint, so
/// a joiner holding only the secret can check the cluster before trusting its CA.
pub fn token_proof(
    secret_sha256: &Fingerprint,
    challenge: &[u8],
    ca_fp: &Fingerprint,
) -> Fingerprint {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret_sha256) else {
        return [0; 32];
    };
    mac.update(challenge);
    mac.update(ca_fp);
    mac.finalize().into_bytes().into()
}

/// SHA-256 of a DER blob.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Sha256::digest(der).into()
}

pub fn fingerprint_hex(fp: &Fingerprint) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Creates a new cluster CA.
pub fn new_ca(cluster_name: &str) -> Result<ClusterCa, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("kms-cluster CA {cluster_name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now() - time::Duration::hours(1);
    params.not_after = now() + time::Duration::days(365 * CA_YEARS);
    let cert = params.self_signed(&key)?;
    Ok(ClusterCa {
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    })
}

/// A node's private key and a certificate signing request for it.
pub struct KeyAndCsr {
    pub key_der: Vec<u8>,
    pub csr_der: Vec<u8>,
}

pub fn new_key_and_csr(node_id: u64) -> Result<KeyAndCsr, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("node-{node_id}.{SERVER_NAME}"));
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr {
        key_der: key.serialize_der(),
        csr_der: csr.der().to_vec(),
    })
}

/// Issues the certificate of `node_id` for the key in `csr_der` (whose signature proves the
/// requester holds the key). The names and usages are ours, whatever the request asked for.
pub fn issue(ca: &ClusterCa, csr_der: &[u8], node_id: u64) -> Result<Vec<u8>, PkiError> {
    let key = KeyPair::try_from(ca.key_der.as_slice())?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert_der.as_slice()), key)?;
    let mut csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))?;
    let mut params = CertificateParams::new(vec![
        SERVER_NAME.to_owned(),
        format!("node-{node_id}.{SERVER_NAME}"),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("node-{node_id}.{SERVER_NAME}"));
    params
        .subject_alt_names
        .retain(|s| matches!(s, SanType::DnsName(_)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now() - time::Duration::hours(1);
    params.not_after = now() + time::Duration::days(NODE_CERT_DAYS);
    let mut serial = [0u8; 16];
    serial.copy_from_slice(&rand::random::<[u8; 16]>());
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    csr.params = params;
    Ok(csr.signed_by(&issuer)?.der().to_vec())
}

/// Days until a certificate expires (negative when it has), or None if it cannot be read.
pub fn days_left(cert_der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    Some((not_after - now().unix_timestamp()).div_euclid(86_400))
}

/// What a node needs for mutual TLS with its peers.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCredentials {
    pub ca_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("ca", &fingerprint_hex(&fingerprint(&self.ca_der)))
            .field("cert", &fingerprint_hex(&fingerprint(&self.cert_der)))
            .finish_non_exhaustive()
    }
}

const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "node.pem";
const KEY_FILE: &str = "node.key";

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

fn read_pem(path: &Path, tag: &str) -> Result<Vec<u8>, PkiError> {
    let text = std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let parsed = pem::parse(text).map_err(|e| PkiError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if parsed.tag() != tag {
        return Err(PkiError::Pem {
            path: path.to_owned(),
            message: format!("expected a {tag}, found a {}", parsed.tag()),
        });
    }
    Ok(parsed.into_contents())
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file, fsync, rename).
fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::io::Write;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl NodeCredentials {
    /// The bootstrapping node issues its own certificate with the CA it just made.
    pub fn self_issued(ca: &ClusterCa, node_id: u64) -> Result<Self, PkiError> {
        let request = new_key_and_csr(node_id)?;
        let cert_der = issue(ca, &request.csr_der, node_id)?;
        Ok(Self {
            ca_der: ca.cert_der.clone(),
            cert_der,
            key_der: request.key_der,
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.cert_der)
    }

    pub fn ca_fingerprint(&self) -> Fingerprint {
        fingerprint(&self.ca_der)
    }

    /// Loads the credentials kept in `dir`, if the node has them.
    pub fn load(dir: &Path) -> Result<Option<Self>, PkiError> {
        if !dir.join(CERT_FILE).exists() {
            return Ok(None);
        }
        Ok(Some(Self {
            ca_der: read_pem(&dir.join(CA_FILE), "CERTIFICATE")?,
            cert_der: read_pem(&dir.join(CERT_FILE), "CERTIFICATE")?,
            key_der: read_pem(&dir.join(KEY_FILE), "PRIVATE KEY")?,
        }))
    }

    /// Stores the credentials in `dir` (created 0700; files 0600; the certificate last, so a
    /// crash never leaves a certificate without its key).
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| PkiError::Io {
                    path: dir.to_owned(),
                    source,
                },
            )?;
        }
        write_private(&dir.join(CA_FILE), &pem("CERTIFICATE", &self.ca_der))?;
        write_private(&dir.join(KEY_FILE), &pem("PRIVATE KEY", &self.key_der))?;
        write_private(&dir.join(CERT_FILE), &pem("CERTIFICATE", &self.cert_der))
    }

    /// PEM of the certificate chain (node, then CA) and of the key, for TLS.
    pub fn chain_pem(&self) -> String {
        pem("CERTIFICATE", &self.cert_der) + &pem("CERTIFICATE", &self.ca_der)
    }

    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", &self.key_der)
    }

    pub fn ca_pem(&self) -> String {
        pem("CERTIFICATE", &self.ca_der)
    }

    /// Checks that the key is a usable PKCS#8 key (a truncated file is caught at start-up).
    pub fn check(&self) -> Result<(), PkiError> {
        KeyPair::try_from(&PrivatePkcs8KeyDer::from(self.key_der.as_slice()))?;
        Ok(())
    }
}

/// A join token: `K1.<CA fingerprint, 64 hex>.<id>.<secret, 32 hex>`. The fingerprint lets the
/// joining node check the member it contacts before sending anything; the secret is checked
/// against its SHA-256 in the replicated state.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenString {
    pub ca_fingerprint: Fingerprint,
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinTokenString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinTokenString")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl JoinTokenString {
    /// A fresh token for the cluster whose CA has `ca_fingerprint`.
    pub fn generate(ca_fingerprint: Fingerprint) -> Self {
        let id: [u8; 6] = rand::random();
        let secret: [u8; 16] = rand::random();
        Self {
            ca_fingerprint,
            id: hex_lower(&id),
            secret: hex_lower(&secret),
        }
    }

    pub fn secret_sha256(&self) -> Fingerprint {
        fingerprint(self.secret.as_bytes())
    }

    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let bad = |m: &str| PkiError::Token(m.to_owned());
        let mut parts = text.trim().split('.');
        if parts.next() != Some("K1") {
            return Err(bad("expected a token starting with K1."));
        }
        let fp = parts.next().ok_or_else(|| bad("no CA fingerprint"))?;
        let id = parts.next().ok_or_else(|| bad("no token id"))?;
        let secret = parts.next().ok_or_else(|| bad("no secret"))?;
        if parts.next().is_some() {
            return Err(bad("too many parts"));
        }
        let fp_bytes = parse_hex(fp).filter(|b| b.len() == 32);
        let ca_fingerprint: Fingerprint = fp_bytes
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("the CA fingerprint must be 64 hex digits"))?;
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("the token id must be 1 to 32 letters or digits"));
        }
        if secret.len() < 16 || parse_hex(secret).is_none() {
            return Err(bad("the secret must be at least 16 hex digits"));
        }
        Ok(Self {
            ca_fingerprint,
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl std::fmt::Display for JoinTokenString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "K1.{}.{}.{}",
            fingerprint_hex(&self.ca_fingerprint),
            self.id,
            self.secret
        )
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csr_becomes_a_node_certificate_with_our_names() {
        let ca = new_ca("test").unwrap();
        let creds = NodeCredentials::self_issued(&ca, 7).unwrap();
        creds.check().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&creds.cert_der).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            names.iter().any(|n| n.contains("node-7.kms-cluster")),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n == "DNSName(kms-cluster)"),
            "{names:?}"
        );
        let days = days_left(&creds.cert_der).unwrap();
        assert!(
            (NODE_CERT_DAYS - 1..=NODE_CERT_DAYS).contains(&days),
            "{days}"
        );
        // Issued by the CA.
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca.cert_der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        // A CSR that is not one is refused, not a panic.
        assert!(issue(&ca, b"junk", 1).is_err());
    }

    #[test]
    fn credentials_round_trip_through_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("test").unwrap();
        let creds = NodeCredentials::self_issued(&ca, 1).unwrap();
        let pki = dir.path().join("pki");
        assert!(NodeCredentials::load(&pki).unwrap().is_none());
        creds.save(&pki).unwrap();
        assert_eq!(NodeCredentials::load(&pki).unwrap(), Some(creds));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&pki), 0o700);
            assert_eq!(mode(&pki.join(KEY_FILE)), 0o600);
        }
        std::fs::write(
            pki.join(KEY_FILE),
            "-----BEGIN NOPE-----\n-----END NOPE-----\n",
        )
        .unwrap();
        assert!(NodeCredentials::load(&pki).is_err());
    }

    #[test]
    fn tokens_parse_and_print_and_reject_junk() {
        let token = JoinTokenString::generate([0xab; 32]);
        let text = token.to_string();
        assert!(text.starts_with("K1.abab"));
        assert_eq!(JoinTokenString::parse(&text).unwrap(), token);
        assert!(!format!("{token:?}").contains(&token.secret));
        for bad in [
            "",
            "K2.x.y.z",
            "K1.abcd.id.0123456789abcdef",
            &format!("K1.{}.id-x.0123456789abcdef", "ab".repeat(32)),
            &format!("K1.{}.id.short", "ab".repeat(32)),
            &format!("K1.{}.id.0123456789abcdef.x", "ab".repeat(32)),
            &format!("K1.{}.id.0123456789abcdeé", "ab".repeat(32)),
        ] {
            assert!(JoinTokenString::parse(bad).is_err(), "{bad}");
        }
    }
}
