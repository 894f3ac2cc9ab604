//! `kmsctl diagnose`: walks the path a Windows KMS client takes and says where it breaks —
//! the usual causes of 0xC004F074 ("no KMS could be contacted") and 0xC004F038 (count too
//! low).
//!
//! 1. SRV lookup of `_vlmcs._tcp.<domain>` (records, priorities, weights, TTL), or one
//!    `HOST:PORT` given with `--server`;
//! 2. name resolution of every target;
//! 3. TCP connect to every address;
//! 4. RPC bind;
//! 5. one activation per protocol version (v4, v5, v6) for the chosen product;
//! 6. the count the host returns against the product's N;
//! 7. with `--admin-url`, the host's own view ([`host`]): quorum, DNS publishing, the clock
//!    difference, whether the policy activates the product, and recent refusals of this
//!    client's address.
//!
//! The test activations all use one fixed client machine id ([`DIAGNOSE_CMID`]), so running
//! diagnose adds at most one client per application list to the host's count, however often
//! it runs.

pub mod host;
pub mod report;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kms_dns::{LookupError, SrvRecord};
use kms_wire::client::BindOptions;
use kms_wire::hresult;
use serde_json::json;
use uuid::Uuid;

use crate::client::{Answer, KmsClient, KmsClientError};
use crate::products::{Product, RequestTemplate};
pub use report::{problem, Check, Report, Status};

/// Client machine id of every diagnose activation (a random-looking v4 UUID, fixed).
pub const DIAGNOSE_CMID: Uuid = Uuid::from_u128(0x6b6d_7363_746c_4469_a167_6e6f_7365_0001);
/// Workstation name the host logs for diagnose activations.
pub const DIAGNOSE_WORKSTATION: &str = "kmsctl-diagnose";
/// The KMS port when `--server` names none.
pub const DEFAULT_PORT: u16 = 1688;

/// Where to start.
#[derive(Debug, Clone)]
pub enum Start {
    /// Discover the hosts through `_vlmcs._tcp.<domain>`.
    Domain(String),
    /// One host, `HOST`, `HOST:PORT` or `[IPv6]:PORT`.
    Server(String),
}

/// What to diagnose and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub start: Start,
    /// DNS server for the SRV and address lookups (default: the system resolver).
    pub dns: Option<SocketAddr>,
    /// Admin API of a node, for the host's view.
    pub admin_url: Option<String>,
    pub token: Option<String>,
    pub product: Product,
    pub cmid: Uuid,
    /// Per step: one lookup, one connect, one answer.
    pub timeout: Duration,
}

/// One host a client would try (an SRV record, or the `--server`).
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
}

impl Target {
    fn label(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Splits `--server` into host and port (1688 when absent).
pub fn parse_server(text: &str) -> Result<(String, u16), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty --server".into());
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok((ip.to_string(), DEFAULT_PORT));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad port in --server {text:?}"))?;
            if host.is_empty() {
                return Err(format!("bad --server {text:?}: expected HOST[:PORT]"));
            }
            Ok((host.to_owned(), port))
        }
        Some(_) => Err(format!(
            "bad --server {text:?}: write an IPv6 address as [ADDR]:PORT"
        )),
        None => Ok((text.to_owned(), DEFAULT_PORT)),
    }
}

/// Runs every check and returns the report (never fails: a failure is a check).
pub async fn run(options: &Options) -> Report {
    let template = {
        let mut t = RequestTemplate::new(options.product);
        t.workstation = DIAGNOSE_WORKSTATION.to_owned();
        t
    };
    let target_label = match &options.start {
        Start::Domain(d) => format!("{}.{}", kms_dns::SRV_SERVICE, kms_dns::normalize_host(d)),
        Start::Server(s) => s.clone(),
    };
    let mut report = Report::new(
        target_label,
        options.product.sku.name.to_owned(),
        template.n_policy,
    );

    let targets = match &options.start {
        Start::Domain(domain) => srv_step(&mut report, domain, options).await,
        Start::Server(server) => match parse_server(server) {
            Ok((host, port)) => vec![Target { host, port }],
            Err(e) => {
                report.push(Check::fail(
                    "resolve",
                    server.clone(),
                    problem::NO_ADDRESS,
                    e,
                    "give the KMS host as HOST:PORT, e.g. kms1.corp.example.com:1688",
                ));
                Vec::new()
            }
        },
    };

    let mut local_ips: Vec<IpAddr> = Vec::new();
    let mut any_answer = false;
    for target in &targets {
        let addrs = match resolve_step(&mut report, target, options).await {
            Some(a) => a,
            None => continue,
        };
        for addr in addrs {
            if let Some(local) = connect_step(&mut report, target, addr, options.timeout).await {
                if !local_ips.contains(&local) {
                    local_ips.push(local);
                }
                if activation_steps(&mut report, target, addr, &template, options).await {
                    any_answer = true;
                }
            }
        }
    }
    if !targets.is_empty() && !any_answer && report.failures().count() > 0 {
        let subject = report.target.clone();
        report.push(Check::fail(
            "summary",
            subject,
            "no_kms_reachable",
            "no KMS host on this path answered an activation: Windows clients report 0xC004F074 (the Key Management Service could not be contacted)",
            "fix the first failure above; `slmgr /skms HOST:PORT` on a client bypasses DNS while you do",
        ));
    }

    if let Some(url) = &options.admin_url {
        host::host_view(&mut report, url, options, &local_ips).await;
    } else {
        report.push(Check::skip(
            "clock",
            "client/host",
            "not measured: the KMS protocol does not carry the host's time; add --admin-url to compare clocks and see the host's view",
        ));
    }
    report
}

/// SRV lookup; returns the targets in priority order (lowest first, heavier weight first).
async fn srv_step(report: &mut Report, domain: &str, options: &Options) -> Vec<Target> {
    let name = format!(
        "{}.{}",
        kms_dns::SRV_SERVICE,
        kms_dns::normalize_host(domain)
    );
    let via = match options.dns {
        Some(server) => format!("DNS server {server}"),
        None => "the system resolver".to_owned(),
    };
    match kms_dns::lookup_srv_ttl(domain, options.dns, options.timeout).await {
        Ok(mut records) => {
            records.sort_by(|(a, _), (b, _)| {
                a.priority
                    .cmp(&b.priority)
                    .then(b.weight.cmp(&a.weight))
                    .then(a.target.cmp(&b.target))
            });
            let list: Vec<String> = records
                .iter()
                .map(|(r, ttl)| {
                    format!(
                        "{}:{} priority {} weight {} TTL {ttl} s",
                        r.target, r.port, r.priority, r.weight
                    )
                })
                .collect();
            let data = json!({
                "records": records.iter().map(|(r, ttl)| json!({
                    "target": r.target, "port": r.port, "priority": r.priority,
                    "weight": r.weight, "ttl": ttl,
                })).collect::<Vec<_>>(),
            });
            report.push(
                Check::ok(
                    "srv",
                    name,
                    format!(
                        "{} record(s) from {via}: {}; clients try the lowest priority first",
                        records.len(),
                        list.join("; ")
                    ),
                )
                .with_data(data),
            );
            records
                .into_iter()
                .map(|(r, _): (SrvRecord, u32)| Target {
                    host: r.target,
                    port: r.port,
                })
                .collect()
        }
        Err(e) => {
            let (code, message, advice) = match &e {
                LookupError::NoRecords(_) => (
                    problem::NO_SRV_RECORDS,
                    format!("no SRV records found (asked {via}): clients that discover their KMS host through DNS find none and report 0xC004F074"),
                    "publish the cluster in DNS ([[dns.publish]] in kmsd.toml, or add _vlmcs._tcp SRV records by hand), check that clients use this DNS domain (their primary DNS suffix), or set the host on clients with `slmgr /skms HOST:PORT`".to_owned(),
                ),
                LookupError::Timeout { .. } => (
                    problem::DNS_TIMEOUT,
                    format!("{via} did not answer: {e}"),
                    "check that the DNS server is up and that UDP and TCP port 53 are open between the clients and it".to_owned(),
                ),
                LookupError::InvalidDomain(_) => (
                    problem::DNS_FAILED,
                    e.to_string(),
                    "give the DNS domain the clients are in, e.g. corp.example.com".to_owned(),
                ),
                _ => (
                    problem::DNS_FAILED,
                    format!("the lookup through {via} failed: {e}"),
                    "check the DNS server's logs and the zone of this domain".to_owned(),
                ),
            };
            report.push(Check::fail("srv", name, code, message, advice));
            Vec::new()
        }
    }
}

/// Addresses of one target, or a failed check.
async fn resolve_step(
    report: &mut Report,
    target: &Target,
    options: &Options,
) -> Option<Vec<SocketAddr>> {
    if target.host.parse::<IpAddr>().is_ok() {
        // An address needs no lookup (nothing to report).
        return kms_dns::lookup_addresses(&target.host, target.port, None, options.timeout)
            .await
            .ok();
    }
    match kms_dns::lookup_addresses(&target.host, target.port, options.dns, options.timeout).await {
        Ok(addrs) => {
            let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            report.push(
                Check::ok(
                    "resolve",
                    target.host.clone(),
                    format!("resolves to {}", list.join(", ")),
                )
                .with_data(json!({ "addresses": list })),
            );
            Some(addrs)
        }
        Err(e) => {
            let (code, advice) = match &e {
                LookupError::Timeout { .. } => (
                    problem::DNS_TIMEOUT,
                    "check that the DNS server answers for this name",
                ),
                _ => (
                    problem::NO_ADDRESS,
                    "add an A/AAAA record for this host (kmsd publishes them with publish_address_records = true), or make the SRV target a name that resolves",
                ),
            };
            report.push(Check::fail(
                "resolve",
                target.host.clone(),
                code,
                format!("the SRV target has no usable address, clients skip it: {e}"),
                advice,
            ));
            None
        }
    }
}

/// TCP connect; returns this machine's address on the connection.
async fn connect_step(
    report: &mut Report,
    target: &Target,
    addr: SocketAddr,
    timeout: Duration,
) -> Option<IpAddr> {
    let subject = if target.host.parse::<IpAddr>().is_ok() {
        addr.to_string()
    } else {
        format!("{addr} ({})", target.host)
    };
    let started = std::time::Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let local = stream.local_addr().ok().map(|a| a.ip());
            report.push(
                Check::ok(
                    "connect",
                    subject,
                    format!(
                        "TCP port {} accepts connections ({} ms)",
                        addr.port(),
                        started.elapsed().as_millis()
                    ),
                )
                .with_data(
                    json!({ "address": addr.to_string(), "local": local.map(|l| l.to_string()) }),
                ),
            );
            local
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            report.push(Check::fail(
                "connect",
                subject,
                problem::CONNECTION_REFUSED,
                format!("connection refused on port {}: nothing listens there (kmsd not running, a wrong port in the SRV record or --server) or a firewall rejects it", addr.port()),
                format!("start kmsd on {} (kms.listen), fix the port of the SRV record, or open TCP {} in the host's firewall", target.label(), addr.port()),
            ));
            None
        }
        Ok(Err(e)) => {
            report.push(Check::fail(
                "connect",
                subject,
                problem::CONNECT_FAILED,
                format!("cannot connect: {e}"),
                "check the route and firewalls between this machine and the host",
            ));
            None
        }
        Err(_) => {
            report.push(Check::fail(
                "connect",
                subject,
                problem::CONNECT_TIMEOUT,
                format!("no answer to the TCP connect within {timeout:?}: the host is down or a firewall drops port {}", addr.port()),
                format!("check that the host is up and that TCP {} is allowed from the clients' networks", addr.port()),
            ));
            None
        }
    }
}

/// RPC bind and one activation per protocol version; true when an activation was answered.
async fn activation_steps(
    report: &mut Report,
    target: &Target,
    addr: SocketAddr,
    template: &RequestTemplate,
    options: &Options,
) -> bool {
    let peer = addr.to_string();
    let mut conn = match KmsClient::connect(&peer, BindOptions::default(), options.timeout).await {
        Ok(c) => {
            report.push(Check::ok(
                "rpc_bind",
                peer.clone(),
                "RPC bind accepted (the KMS interface over NDR32/NDR64)",
            ));
            c
        }
        Err(e) => {
            report.push(Check::fail(
                "rpc_bind",
                peer.clone(),
                problem::BIND_FAILED,
                format!("the service on this port did not accept the KMS RPC bind: {e}"),
                format!("make sure {} is a KMS host (kmsd) and not another service, and that no proxy or IPS rewrites the traffic", target.label()),
            ));
            return false;
        }
    };
    let mut answered = false;
    let mut last_count: Option<(u32, u16)> = None;
    for major in [4u16, 5, 6] {
        let mut t = template.clone();
        t.protocol_major = major;
        t.protocol_minor = 0;
        let subject = format!("{peer} v{major}");
        let request = t.build(options.cmid, now_ms());
        let result = conn.activate(&request, rand::random()).await;
        match result {
            Ok(Answer::Activated(resp)) => {
                answered = true;
                last_count = Some((resp.base.current_count, major));
                report.push(
                    Check::ok(
                        "activate",
                        subject,
                        format!(
                            "verified answer: ePID {}, count {}, renewal {} min, retry {} min",
                            resp.base.epid,
                            resp.base.current_count,
                            resp.base.renewal_interval,
                            resp.base.activation_interval
                        ),
                    )
                    .with_data(json!({
                        "protocol": format!("{}.{}", resp.base.version.major, resp.base.version.minor),
                        "epid": resp.base.epid,
                        "current_count": resp.base.current_count,
                        "renewal_interval": resp.base.renewal_interval,
                        "activation_interval": resp.base.activation_interval,
                    })),
                );
            }
            Ok(Answer::Refused(hr)) => {
                answered = true;
                report.push(refusal_check(subject, hr, template).with_data(json!({
                    "hresult": format!("0x{hr:08X}"),
                })));
            }
            Err(e) => {
                report.push(Check::fail(
                    "activate",
                    subject,
                    problem::BAD_RESPONSE,
                    format!("no verifiable answer: {e}"),
                    "a KMS client rejects this host's answers; compare kmsd's version and logs, and look for a proxy in between",
                ));
                if matches!(
                    e,
                    KmsClientError::Io(_) | KmsClientError::Closed | KmsClientError::Timeout(_)
                ) {
                    match KmsClient::connect(&peer, BindOptions::default(), options.timeout).await {
                        Ok(c) => conn = c,
                        Err(_) => break,
                    }
                }
            }
        }
    }
    if let Some((count, major)) = last_count {
        let n = template.n_policy;
        let app = application_name(template);
        let subject = format!("{peer} {app}");
        let data = json!({ "current_count": count, "required_count": n, "protocol": major });
        if count >= n {
            report.push(
                Check::ok(
                    "count",
                    subject,
                    format!(
                        "count {count} >= N {n}: clients of {} activate",
                        template.product.sku.name
                    ),
                )
                .with_data(data),
            );
        } else {
            report.push(
                Check::fail(
                    "count",
                    subject,
                    problem::COUNT_BELOW_N,
                    format!(
                        "count {count} is below N {n}: {} clients get 0x{:08X} (the count of the KMS host is too low) until {} more distinct machines have asked",
                        template.product.sku.name,
                        hresult::NOT_ENOUGH_COUNT,
                        n - count
                    ),
                    "wait for more clients (a client is counted for 30 days after its last request), or check that cloned machines were generalized (sysprep /generalize): clones share one client machine id and count once",
                )
                .with_data(data),
            );
        }
    }
    answered
}

/// Plain words for a host's refusal.
fn refusal_check(subject: String, hr: u32, template: &RequestTemplate) -> Check {
    let product = template.product.sku.name;
    let group = template.product.kms_item.name;
    match hr {
        hresult::KMS_ID_MISMATCH => Check::fail(
            "policy",
            subject,
            problem::PRODUCT_REFUSED,
            format!("the host refuses {product} with 0x{hr:08X}: its product policy is strict and no licensed CSVLK covers the product group {group}"),
            "license a CSVLK that covers this group (kmsctl config set licensed_csvlks=...; `kmsctl products` lists them) or set product_policy = open",
        ),
        hresult::INVALID_TIMESTAMP => Check::fail(
            "clock",
            subject,
            problem::CLOCK_SKEW,
            format!("the host refuses with 0x{hr:08X}: this machine's clock is too far from the host's"),
            "synchronise both clocks (w32tm /resync on Windows, chrony or systemd-timesyncd on the host); the host's limit is max_clock_skew_minutes",
        ),
        hresult::INVALID_DATA => Check::fail(
            "activate",
            subject,
            problem::PROTOCOL_REFUSED,
            format!("the host refuses this protocol version or request with 0x{hr:08X} ({})", hresult::describe(hr)),
            "clients of this version cannot activate here; check kmsd's log for the reason",
        ),
        _ => Check::fail(
            "activate",
            subject,
            problem::ACTIVATION_REFUSED,
            format!("the host refuses with 0x{hr:08X} ({})", hresult::describe(hr)),
            "see the host's event log (kmsctl events) for this request",
        ),
    }
}

fn application_name(template: &RequestTemplate) -> String {
    let id = template.product.kms_item.application_id;
    kms_catalog::catalog()
        .application(&id)
        .map(|a| a.name.to_owned())
        .unwrap_or_else(|| id.to_string())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_argument_forms() {
        assert_eq!(
            parse_server("kms.example.com").unwrap(),
            ("kms.example.com".into(), 1688)
        );
        assert_eq!(
            parse_server("kms.example.com:1700").unwrap(),
            ("kms.example.com".into(), 1700)
        );
        assert_eq!(
            parse_server("127.0.0.1:9").unwrap(),
            ("127.0.0.1".into(), 9)
        );
        assert_eq!(parse_server("[::1]:1688").unwrap(), ("::1".into(), 1688));
        assert_eq!(parse_server("::1").unwrap(), ("::1".into(), 1688));
        assert!(parse_server("host:notaport").is_err());
        assert!(parse_server("host:0").is_err());
        assert!(parse_server(":1688").is_err());
        assert!(parse_server("").is_err());
    }

    #[test]
    fn cmid_is_a_version_4_uuid() {
        assert_eq!(DIAGNOSE_CMID.get_version_num(), 4);
    }
}
