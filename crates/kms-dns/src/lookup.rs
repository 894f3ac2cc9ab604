//! Client-side lookup of `_vlmcs._tcp.<domain>` (what a KMS client does), through the system
//! resolver configuration or one explicit server.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::xfer::Protocol;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::Resolver;

use crate::publisher::{normalize_host, SrvRecord, SRV_SERVICE};

/// Why a lookup gave no records.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("invalid domain {0:?}")]
    InvalidDomain(String),
    #[error("no _vlmcs._tcp SRV records for {0}")]
    NoRecords(String),
    #[error("DNS lookup of {name} timed out after {after:?}")]
    Timeout { name: String, after: Duration },
    #[error("DNS lookup of {name} failed: {reason}")]
    Failed { name: String, reason: String },
    #[error("cannot read the system resolver configuration: {0}")]
    SystemConfig(String),
}

/// Resolves the SRV RRset of `_vlmcs._tcp.<domain>`. With `server`, only that server is asked
/// (UDP, then TCP); without, the system configuration (`/etc/resolv.conf`) is used. The name
/// is made absolute first, so no search list applies. Bounded by `timeout`.
pub async fn lookup_srv(
    domain: &str,
    server: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<SrvRecord>, LookupError> {
    let mut records: Vec<SrvRecord> = lookup_srv_ttl(domain, server, timeout)
        .await?
        .into_iter()
        .map(|(record, _)| record)
        .collect();
    records.dedup();
    Ok(records)
}

/// [`lookup_srv`] with each record's TTL in seconds as the server answered it (what
/// `kmsctl diagnose` shows: how long clients keep a withdrawn host).
pub async fn lookup_srv_ttl(
    domain: &str,
    server: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<(SrvRecord, u32)>, LookupError> {
    let domain = normalize_host(domain);
    if domain.is_empty() || domain.contains(char::is_whitespace) {
        return Err(LookupError::InvalidDomain(domain));
    }
    let name = format!("{SRV_SERVICE}.{domain}.");
    hickory_proto::rr::Name::from_ascii(&name)
        .map_err(|_| LookupError::InvalidDomain(domain.clone()))?;

    let resolver = resolver(server, timeout)?;
    let lookup = tokio::time::timeout(
        timeout.saturating_mul(2),
        resolver.srv_lookup(name.as_str()),
    )
    .await
    .map_err(|_| LookupError::Timeout {
        name: name.clone(),
        after: timeout.saturating_mul(2),
    })?;
    let lookup = match lookup {
        Ok(lookup) => lookup,
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => {
            return Err(LookupError::NoRecords(domain))
        }
        Err(e) => {
            let reason = e.to_string();
            if e.proto()
                .is_some_and(|p| matches!(p.kind(), hickory_proto::ProtoErrorKind::Timeout))
            {
                return Err(LookupError::Timeout {
                    name,
                    after: timeout,
                });
            }
            return Err(LookupError::Failed { name, reason });
        }
    };
    let mut records: Vec<(SrvRecord, u32)> = lookup
        .as_lookup()
        .records()
        .iter()
        .filter_map(|record| match record.data() {
            hickory_proto::rr::RData::SRV(srv) => Some((
                SrvRecord::new(
                    &srv.target().to_ascii(),
                    srv.port(),
                    srv.priority(),
                    srv.weight(),
                ),
                record.ttl(),
            )),
            _ => None,
        })
        .collect();
    records.sort();
    records.dedup_by(|a, b| a.0 == b.0);
    if records.is_empty() {
        return Err(LookupError::NoRecords(domain));
    }
    Ok(records)
}

/// The addresses of an SRV target: through `server` when given (so that names published only
/// in that server's zone resolve too), else through the system resolver (hosts file included).
pub async fn lookup_addresses(
    host: &str,
    port: u16,
    server: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, LookupError> {
    let host = normalize_host(host);
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let bound = timeout.saturating_mul(2);
    let timed_out = |name: &str| LookupError::Timeout {
        name: name.to_owned(),
        after: bound,
    };
    let mut addrs: Vec<SocketAddr> = match server {
        None => tokio::time::timeout(bound, tokio::net::lookup_host((host.as_str(), port)))
            .await
            .map_err(|_| timed_out(&host))?
            .map_err(|e| LookupError::Failed {
                name: host.clone(),
                reason: e.to_string(),
            })?
            .collect(),
        Some(_) => {
            let fqdn = format!("{host}.");
            let resolver = resolver(server, timeout)?;
            match tokio::time::timeout(bound, resolver.lookup_ip(fqdn.as_str())).await {
                Err(_) => return Err(timed_out(&host)),
                Ok(Err(e)) if e.is_no_records_found() || e.is_nx_domain() => Vec::new(),
                Ok(Err(e)) => {
                    return Err(LookupError::Failed {
                        name: host,
                        reason: e.to_string(),
                    })
                }
                Ok(Ok(ips)) => ips.iter().map(|ip| SocketAddr::new(ip, port)).collect(),
            }
        }
    };
    addrs.dedup();
    if addrs.is_empty() {
        return Err(LookupError::Failed {
            name: host,
            reason: "no A/AAAA records".into(),
        });
    }
    Ok(addrs)
}

/// A resolver asking only `server` (UDP, then TCP), or the system configuration; no cache,
/// one attempt per server, `timeout` per request.
fn resolver(
    server: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Resolver<TokioConnectionProvider>, LookupError> {
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 1;
    // A lookup tool must show what DNS says now, not a cached answer.
    opts.cache_size = 0;
    let builder = match server {
        Some(addr) => {
            let config = ResolverConfig::from_parts(
                None,
                vec![],
                vec![
                    NameServerConfig::new(addr, Protocol::Udp),
                    NameServerConfig::new(addr, Protocol::Tcp),
                ],
            );
            Resolver::builder_with_config(config, TokioConnectionProvider::default())
        }
        None => Resolver::builder_tokio().map_err(|e| LookupError::SystemConfig(e.to_string()))?,
    };
    Ok(builder.with_options(opts).build())
}
