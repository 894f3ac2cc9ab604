//! Configuration types, named exactly like the `kmsd` TOML:
//!
//! ```toml
//! [node]
//! advertise_host = "node1.kms.test"   # SRV target for this node
//! advertise_port = 1688
//! [[dns.publish]]                     # one table per domain, like DnsDomainPublishList
//! zone = "kms.test"
//! server = "127.0.0.1:15353"
//! tsig_key_name = "kms-test-key"
//! tsig_algorithm = "hmac-sha256"
//! tsig_secret_file = "/run/secrets/tsig"   # or tsig_secret_env = "VAR"
//! ttl = 60
//! priority = 0
//! weight = 100
//! ```
//!
//! Secrets never live in these types: only the file path or the variable name does. The key
//! itself is loaded into a [`TsigKey`], whose `Debug` prints no secret.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm;
use hickory_proto::rr::Name;
use serde::Deserialize;

/// Default TTL of published records, in seconds. Short on purpose: a resolver caches the SRV
/// RRset for at most this long, so a node withdrawn from DNS (dead, unhealthy or stopping) stops
/// being handed out to clients within a minute. KMS clients look the record up rarely (at
/// activation and renewal), so the extra query load of a short TTL is negligible.
pub const DEFAULT_TTL: u32 = 60;
/// Default KMS port, used in the SRV records.
pub const DEFAULT_KMS_PORT: u16 = 1688;
/// Default TSIG algorithm.
pub const DEFAULT_TSIG_ALGORITHM: &str = "hmac-sha256";
/// Genuine KMS hosts re-register their SRV record every 24 hours.
pub const DEFAULT_REPUBLISH_INTERVAL_SECS: u64 = 24 * 60 * 60;
/// Default bound of a single DNS request (query or update).
pub const DEFAULT_TIMEOUT_SECS: u64 = 5;
/// Largest TTL accepted (one week): anything longer defeats withdrawing dead nodes.
pub const MAX_TTL: u32 = 7 * 24 * 60 * 60;

/// A configuration problem, found when validating or when loading the TSIG secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("dns.publish zone {zone:?}: {reason}")]
    Zone { zone: String, reason: String },
    #[error("dns.publish server {server:?}: {reason}")]
    Server { server: String, reason: String },
    #[error("dns.publish zone {zone:?}: {reason}")]
    Tsig { zone: String, reason: String },
    #[error("dns.publish zone {zone:?}: ttl {ttl} is out of range 1..={MAX_TTL}")]
    Ttl { zone: String, ttl: u32 },
    #[error("advertise_host {host:?}: {reason}")]
    AdvertiseHost { host: String, reason: String },
    #[error("advertise_port must not be 0")]
    AdvertisePort,
    #[error("dns: {0}")]
    Other(String),
}

/// `[node]` settings this crate needs: the SRV target (host name and port) of one node.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Advertise {
    /// Host name clients connect to; becomes the SRV target.
    pub advertise_host: String,
    /// KMS port clients connect to.
    #[serde(default = "default_kms_port")]
    pub advertise_port: u16,
}

impl Advertise {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            advertise_host: host.into(),
            advertise_port: port,
        }
    }

    /// Checks that the host is a usable DNS name (not an IP literal: an SRV target must be a
    /// name) and that the port is set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.advertise_port == 0 {
            return Err(ConfigError::AdvertisePort);
        }
        host_name(&self.advertise_host).map_err(|reason| ConfigError::AdvertiseHost {
            host: self.advertise_host.clone(),
            reason,
        })?;
        Ok(())
    }
}

/// `[dns]`: the publish targets plus loop settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// `[[dns.publish]]` tables; empty means DNS publishing is off.
    #[serde(default)]
    pub publish: Vec<PublishTarget>,
    /// Republish (re-read and repair) every this many seconds even when nothing changed.
    #[serde(default = "default_republish_interval")]
    pub republish_interval_secs: u64,
    /// Bound of each DNS request; a whole publish round is bounded by a few of these.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            publish: Vec::new(),
            republish_interval_secs: DEFAULT_REPUBLISH_INTERVAL_SECS,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.republish_interval_secs == 0 {
            return Err(ConfigError::Other(
                "republish_interval_secs must be at least 1".into(),
            ));
        }
        if self.timeout_secs == 0 || self.timeout_secs > 300 {
            return Err(ConfigError::Other("timeout_secs must be in 1..=300".into()));
        }
        let mut zones = std::collections::BTreeSet::new();
        for target in &self.publish {
            target.validate()?;
            if !zones.insert(target.zone_name()?.to_lowercase()) {
                return Err(ConfigError::Zone {
                    zone: target.zone.clone(),
                    reason: "listed twice in [[dns.publish]]".into(),
                });
            }
        }
        Ok(())
    }

    pub fn republish_interval(&self) -> Duration {
        Duration::from_secs(self.republish_interval_secs)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// One `[[dns.publish]]` table: where and how to publish `_vlmcs._tcp.<zone>`.
///
/// TSIG: set `tsig_key_name` plus exactly one of `tsig_secret_file` / `tsig_secret_env`. Leave
/// all three out only for a zone that accepts unsigned updates (for example a Windows zone set
/// to "Nonsecure and secure"); such updates are sent unsigned.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublishTarget {
    /// Zone (domain) holding `_vlmcs._tcp.<zone>`; updates are addressed to this zone.
    pub zone: String,
    /// Primary server of the zone that accepts updates, `host:port` (port defaults to 53).
    pub server: String,
    #[serde(default)]
    pub tsig_key_name: Option<String>,
    #[serde(default = "default_algorithm")]
    pub tsig_algorithm: String,
    /// File holding the base64 secret (or a BIND `key { ... secret "..."; }` clause).
    #[serde(default)]
    pub tsig_secret_file: Option<PathBuf>,
    /// Environment variable holding the base64 secret.
    #[serde(default)]
    pub tsig_secret_env: Option<String>,
    /// TTL of the records we add, see [`DEFAULT_TTL`] for why it is short.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// SRV priority of this node in this zone (lower is tried first).
    #[serde(default)]
    pub priority: u16,
    /// SRV weight of this node in this zone (0 like the genuine `DnsDomainPublishList` default).
    #[serde(default)]
    pub weight: u16,
    /// Also maintain A/AAAA records for advertised host names that lie inside the zone.
    #[serde(default)]
    pub publish_address_records: bool,
}

// Hand-written so that a future field holding secret material cannot leak by accident; the
// secret file path and variable name are not secret and help operators.
impl fmt::Debug for PublishTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishTarget")
            .field("zone", &self.zone)
            .field("server", &self.server)
            .field("tsig_key_name", &self.tsig_key_name)
            .field("tsig_algorithm", &self.tsig_algorithm)
            .field("tsig_secret_file", &self.tsig_secret_file)
            .field("tsig_secret_env", &self.tsig_secret_env)
            .field("ttl", &self.ttl)
            .field("priority", &self.priority)
            .field("weight", &self.weight)
            .field("publish_address_records", &self.publish_address_records)
            .finish()
    }
}

impl PublishTarget {
    /// A target with defaults for everything but the zone and server (no TSIG).
    pub fn new(zone: impl Into<String>, server: impl Into<String>) -> Self {
        Self {
            zone: zone.into(),
            server: server.into(),
            tsig_key_name: None,
            tsig_algorithm: default_algorithm(),
            tsig_secret_file: None,
            tsig_secret_env: None,
            ttl: DEFAULT_TTL,
            priority: 0,
            weight: 0,
            publish_address_records: false,
        }
    }

    /// Checks everything that can be checked without reading the secret.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.zone_name()?;
        self.server_parts()?;
        if self.ttl == 0 || self.ttl > MAX_TTL {
            return Err(ConfigError::Ttl {
                zone: self.zone.clone(),
                ttl: self.ttl,
            });
        }
        let tsig_err = |reason: &str| ConfigError::Tsig {
            zone: self.zone.clone(),
            reason: reason.into(),
        };
        match (
            &self.tsig_key_name,
            &self.tsig_secret_file,
            &self.tsig_secret_env,
        ) {
            (None, None, None) => {}
            (None, _, _) => {
                return Err(tsig_err(
                    "tsig_secret_file/tsig_secret_env given without tsig_key_name",
                ))
            }
            (Some(_), Some(_), Some(_)) => {
                return Err(tsig_err(
                    "set only one of tsig_secret_file and tsig_secret_env",
                ))
            }
            (Some(_), None, None) => {
                return Err(tsig_err(
                    "tsig_key_name needs tsig_secret_file or tsig_secret_env",
                ))
            }
            (Some(name), _, _) => {
                Name::from_ascii(name)
                    .map_err(|e| tsig_err(&format!("tsig_key_name {name:?}: {e}")))?;
            }
        }
        parse_algorithm(&self.tsig_algorithm).map_err(|r| tsig_err(&r))?;
        Ok(())
    }

    /// The zone as an absolute DNS name.
    pub fn zone_name(&self) -> Result<Name, ConfigError> {
        zone_name(&self.zone).map_err(|reason| ConfigError::Zone {
            zone: self.zone.clone(),
            reason,
        })
    }

    /// `server` split into host and port (port 53 when absent).
    pub fn server_parts(&self) -> Result<(String, u16), ConfigError> {
        split_host_port(&self.server, 53).map_err(|reason| ConfigError::Server {
            server: self.server.clone(),
            reason,
        })
    }

    /// Reads the TSIG secret from the file or environment variable. `Ok(None)` when the target
    /// is configured for unsigned updates.
    pub fn load_key(&self) -> Result<Option<TsigKey>, ConfigError> {
        self.validate()?;
        let Some(name) = &self.tsig_key_name else {
            return Ok(None);
        };
        let tsig_err = |reason: String| ConfigError::Tsig {
            zone: self.zone.clone(),
            reason,
        };
        let text = if let Some(path) = &self.tsig_secret_file {
            std::fs::read_to_string(path).map_err(|e| {
                tsig_err(format!(
                    "cannot read tsig_secret_file {}: {e}",
                    path.display()
                ))
            })?
        } else if let Some(var) = &self.tsig_secret_env {
            std::env::var(var).map_err(|e| tsig_err(format!("tsig_secret_env {var}: {e}")))?
        } else {
            return Err(tsig_err("no secret source".into()));
        };
        let secret = decode_secret(&text).map_err(tsig_err)?;
        TsigKey::new(name, &self.tsig_algorithm, secret).map(Some)
    }
}

/// A loaded TSIG key. `Debug` shows the name and algorithm, never the secret.
#[derive(Clone)]
pub struct TsigKey {
    name: String,
    algorithm: TsigAlgorithm,
    secret: Vec<u8>,
}

impl TsigKey {
    /// `algorithm` is `hmac-sha256`, `hmac-sha384` or `hmac-sha512`; `secret` is the raw key.
    pub fn new(name: &str, algorithm: &str, secret: Vec<u8>) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::Tsig {
            zone: String::new(),
            reason,
        };
        Name::from_ascii(name).map_err(|e| err(format!("key name {name:?}: {e}")))?;
        let algorithm = parse_algorithm(algorithm).map_err(err)?;
        if secret.is_empty() {
            return Err(err("empty TSIG secret".into()));
        }
        Ok(Self {
            name: name.to_owned(),
            algorithm,
            secret,
        })
    }

    /// Same, from a base64 secret (the form `tsig-keygen` prints).
    pub fn from_base64(name: &str, algorithm: &str, secret: &str) -> Result<Self, ConfigError> {
        let raw = decode_secret(secret).map_err(|reason| ConfigError::Tsig {
            zone: String::new(),
            reason,
        })?;
        Self::new(name, algorithm, raw)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn algorithm(&self) -> &TsigAlgorithm {
        &self.algorithm
    }

    pub(crate) fn secret(&self) -> &[u8] {
        &self.secret
    }
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm.to_string())
            .field("secret", &"<redacted>")
            .finish()
    }
}

fn default_kms_port() -> u16 {
    DEFAULT_KMS_PORT
}
fn default_algorithm() -> String {
    DEFAULT_TSIG_ALGORITHM.to_owned()
}
fn default_ttl() -> u32 {
    DEFAULT_TTL
}
fn default_republish_interval() -> u64 {
    DEFAULT_REPUBLISH_INTERVAL_SECS
}
fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

fn parse_algorithm(text: &str) -> Result<TsigAlgorithm, String> {
    match text.trim_end_matches('.').to_ascii_lowercase().as_str() {
        "hmac-sha256" => Ok(TsigAlgorithm::HmacSha256),
        "hmac-sha384" => Ok(TsigAlgorithm::HmacSha384),
        "hmac-sha512" => Ok(TsigAlgorithm::HmacSha512),
        other => Err(format!(
            "tsig_algorithm {other:?} is not supported (use hmac-sha256, hmac-sha384 or hmac-sha512)"
        )),
    }
}

/// Base64 secret, or the `secret "...";` line of a BIND key file (what `tsig-keygen` writes).
fn decode_secret(text: &str) -> Result<Vec<u8>, String> {
    let b64 = match text.find("secret") {
        Some(pos) => text
            .get(pos..)
            .and_then(|rest| rest.split('"').nth(1))
            .ok_or_else(|| "key file has a `secret` without a quoted value".to_owned())?,
        None => text.trim(),
    };
    let compact: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let raw = data_encoding::BASE64
        .decode(compact.as_bytes())
        .map_err(|e| format!("the TSIG secret is not valid base64: {e}"))?;
    if raw.is_empty() {
        return Err("the TSIG secret is empty".into());
    }
    Ok(raw)
}

/// Parses `text` as an absolute zone name.
pub(crate) fn zone_name(text: &str) -> Result<Name, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed == "." {
        return Err("must be a domain name".into());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| e.to_string())?;
    name.set_fqdn(true);
    Ok(name)
}

/// Parses `text` as an absolute host name (an SRV target). IP literals are refused: RFC 2782
/// targets are names.
pub(crate) fn host_name(text: &str) -> Result<Name, String> {
    let trimmed = text.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err("must be a host name".into());
    }
    if trimmed.parse::<std::net::IpAddr>().is_ok() {
        return Err("must be a host name, not an IP address (SRV targets are names)".into());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| e.to_string())?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// `host:port`, `[v6]:port`, `v6`, or `host` (with `default_port`).
pub(crate) fn split_host_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty".into());
    }
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), default_port));
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| (ip.to_string(), default_port))
            .map_err(|e| e.to_string());
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("bad port {port:?}"))?,
        ),
        None => (text, default_port),
    };
    if port == 0 {
        return Err("port must not be 0".into());
    }
    if host.is_empty() || host.contains(':') {
        return Err("expected host:port".into());
    }
    Name::from_ascii(host).map_err(|e| e.to_string())?;
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_TOML: &str = r#"
        [[publish]]
        zone = "kms.test"
        server = "127.0.0.1:15353"
        tsig_key_name = "kms-test-key"
        tsig_algorithm = "hmac-sha256"
        tsig_secret_file = "/run/secrets/tsig"
        ttl = 60
        priority = 0
        weight = 100
    "#;

    #[test]
    fn parses_the_issue_example_and_defaults() {
        let cfg: DnsConfig = toml::from_str(ISSUE_TOML).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.republish_interval(), Duration::from_secs(86_400));
        let t = &cfg.publish[0];
        assert_eq!(t.zone, "kms.test");
        assert_eq!(t.server_parts().unwrap(), ("127.0.0.1".into(), 15353));
        assert_eq!(t.weight, 100);
        assert_eq!(t.tsig_secret_file, Some(PathBuf::from("/run/secrets/tsig")));

        let minimal: PublishTarget = toml::from_str(
            "zone = \"example.org\"\nserver = \"ns1.example.org\"\ntsig_key_name = \"k\"\ntsig_secret_env = \"V\"\n",
        )
        .unwrap();
        minimal.validate().unwrap();
        assert_eq!(minimal.ttl, 60);
        assert_eq!((minimal.priority, minimal.weight), (0, 0));
        assert_eq!(minimal.tsig_algorithm, "hmac-sha256");
        assert!(!minimal.publish_address_records);
        assert_eq!(
            minimal.server_parts().unwrap(),
            ("ns1.example.org".into(), 53)
        );
    }

    #[test]
    fn node_advertise_defaults_to_1688() {
        let a: Advertise = toml::from_str("advertise_host = \"node1.kms.test\"").unwrap();
        assert_eq!(a.advertise_port, 1688);
        a.validate().unwrap();
        assert!(Advertise::new("10.0.0.1", 1688).validate().is_err());
        assert!(Advertise::new("node1", 0).validate().is_err());
    }

    #[test]
    fn rejects_unknown_fields_and_bad_combinations() {
        assert!(
            toml::from_str::<DnsConfig>("[[publish]]\nzone=\"a\"\nserver=\"b\"\nzonee=1").is_err()
        );
        let mut t = PublishTarget::new("kms.test", "127.0.0.1:53");
        t.validate().unwrap(); // unsigned is allowed
        t.tsig_key_name = Some("k".into());
        assert!(t.validate().is_err(), "key without secret source");
        t.tsig_secret_env = Some("A".into());
        t.tsig_secret_file = Some("/x".into());
        assert!(t.validate().is_err(), "two secret sources");
        t.tsig_secret_file = None;
        t.validate().unwrap();
        t.tsig_algorithm = "hmac-md5".into();
        assert!(t.validate().is_err());
        t.tsig_algorithm = "HMAC-SHA512.".into();
        t.validate().unwrap();
        t.ttl = 0;
        assert!(t.validate().is_err());
        t.ttl = 60;
        t.server = "host:notaport".into();
        assert!(t.validate().is_err());
        t.server = "[::1]:5353".into();
        assert_eq!(t.server_parts().unwrap(), ("::1".into(), 5353));
        t.zone = "".into();
        assert!(t.validate().is_err());
        let dup: DnsConfig = toml::from_str(
            "[[publish]]\nzone=\"a.test\"\nserver=\"s\"\n[[publish]]\nzone=\"A.test.\"\nserver=\"s\"\n",
        )
        .unwrap();
        assert!(dup.validate().is_err());
    }

    #[test]
    fn loads_secrets_from_file_and_env_and_never_prints_them() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "fxnLNAORJ9vA7x5qm8ejIQB6CG+vt8ymftMxQssPWDM=";
        let plain = dir.path().join("plain");
        std::fs::write(&plain, format!("{secret}\n")).unwrap();
        let bind = dir.path().join("bind.key");
        std::fs::write(
            &bind,
            format!(
                "key \"kms-test-key\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret}\";\n}};\n"
            ),
        )
        .unwrap();
        let mut t = PublishTarget::new("kms.test", "127.0.0.1:15353");
        t.tsig_key_name = Some("kms-test-key".into());
        for path in [&plain, &bind] {
            t.tsig_secret_file = Some(path.clone());
            let key = t.load_key().unwrap().unwrap();
            assert_eq!(key.secret().len(), 32);
            assert_eq!(key.secret()[..3], [0x7f, 0x19, 0xcb]);
            let shown = format!("{key:?} {t:?}");
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains("fxnLNA"), "{shown}");
        }
        t.tsig_secret_file = None;
        let var = "KMS_DNS_TEST_SECRET_VAR_1";
        std::env::set_var(var, secret);
        t.tsig_secret_env = Some(var.into());
        assert_eq!(t.load_key().unwrap().unwrap().secret().len(), 32);
        std::env::set_var(var, "not base64!!");
        assert!(t.load_key().is_err());
        t.tsig_secret_env = Some("KMS_DNS_TEST_SECRET_VAR_UNSET".into());
        assert!(t.load_key().is_err());
        t.tsig_secret_env = None;
        t.tsig_key_name = None;
        assert!(t.load_key().unwrap().is_none());
    }
}
