//! Client-side KMS host discovery, as a Windows KMS client does it: resolve the SRV RRset
//! `_vlmcs._tcp.<domain>`, order it per RFC 2782 (lowest priority first; inside a priority,
//! weighted random selection without replacement), and try the hosts in that order, moving on
//! when one does not answer.
//!
//! The randomness is injectable ([`order_rfc2782`] takes any `Rng`) so that tests can use a
//! seeded generator.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use kms_wire::client::BindOptions;
use rand::seq::SliceRandom;
use rand::Rng;

pub use kms_dns::SrvRecord;

use crate::client::{KmsClient, KmsClientError};

/// Why discovery produced no host to try.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(transparent)]
    Lookup(#[from] kms_dns::LookupError),
}

/// Why one host was skipped.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError<E: std::fmt::Display> {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(E),
}

/// Every host failed; one entry per host tried, in order.
#[derive(Debug, thiserror::Error)]
#[error("no KMS host answered ({} tried){}", attempts.len(), describe(attempts))]
pub struct FailoverError<E: std::fmt::Display + std::fmt::Debug> {
    pub attempts: Vec<(SrvRecord, AttemptError<E>)>,
}

fn describe<E: std::fmt::Display>(attempts: &[(SrvRecord, AttemptError<E>)]) -> String {
    attempts
        .iter()
        .map(|(t, e)| format!("; {}:{}: {e}", t.target, t.port))
        .collect()
}

/// Orders `records` the way RFC 2782 tells a client to: ascending priority; within one
/// priority, repeatedly pick a record with probability proportional to its weight among those
/// not yet picked. Weight-0 records are placed first in the running-sum list, so they are
/// picked only when the random number is exactly 0 (a very small chance when others have
/// weight) and otherwise end up after the weighted ones.
pub fn order_rfc2782<R: Rng + ?Sized>(records: &[SrvRecord], rng: &mut R) -> Vec<SrvRecord> {
    let mut sorted: Vec<SrvRecord> = records.to_vec();
    sorted.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(sorted.len());
    let mut rest = sorted.as_slice();
    while let Some(first) = rest.first() {
        let priority = first.priority;
        let len = rest.iter().take_while(|r| r.priority == priority).count();
        let (group, tail) = rest.split_at(len);
        rest = tail;

        // "Arrange them in any order, except that weight-0 records go first": shuffle so that
        // equal records (and all-zero groups) are not always tried in the same order.
        let mut pool: Vec<SrvRecord> = group.to_vec();
        pool.shuffle(rng);
        pool.sort_by_key(|r| r.weight != 0);
        while !pool.is_empty() {
            let total: u64 = pool.iter().map(|r| u64::from(r.weight)).sum();
            let pick = rng.gen_range(0..=total);
            let mut running = 0u64;
            let mut chosen = pool.len().saturating_sub(1);
            for (i, r) in pool.iter().enumerate() {
                running += u64::from(r.weight);
                if running >= pick {
                    chosen = i;
                    break;
                }
            }
            out.push(pool.remove(chosen));
        }
    }
    out
}

/// Parses `--dns`: `IP`, `IP:PORT`, `[IPv6]:PORT`, `HOST` or `HOST:PORT` (port 53 by default;
/// a host name is resolved through the system resolver).
pub async fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("bad port in --dns {text:?}"))?,
        ),
        None => (text, 53),
    };
    if host.is_empty() {
        return Err(format!("bad --dns {text:?}: expected HOST[:PORT]"));
    }
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(Duration::from_secs(5), lookup).await {
        Ok(Ok(mut addrs)) => addrs
            .next()
            .ok_or_else(|| format!("--dns {host}: no address")),
        Ok(Err(e)) => Err(format!("--dns {host}: {e}")),
        Err(_) => Err(format!("--dns {host}: name lookup timed out")),
    }
}

/// Resolves `_vlmcs._tcp.<domain>` through `dns` (or the system resolver), unordered.
pub async fn resolve(
    domain: &str,
    dns: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<SrvRecord>, DiscoverError> {
    Ok(kms_dns::lookup_srv(domain, dns, timeout).await?)
}

/// Resolves and orders: the list of hosts in the order a client would try them.
pub async fn discover<R: Rng + ?Sized>(
    domain: &str,
    dns: Option<SocketAddr>,
    timeout: Duration,
    rng: &mut R,
) -> Result<Vec<SrvRecord>, DiscoverError> {
    let records = resolve(domain, dns, timeout).await?;
    Ok(order_rfc2782(&records, rng))
}

/// One line per host, for `kmsctl discover`.
pub fn format_order(order: &[SrvRecord]) -> String {
    order
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{}. {}:{} (priority {}, weight {})\n",
                i + 1,
                r.target,
                r.port,
                r.priority,
                r.weight
            )
        })
        .collect()
}

/// Calls `attempt` for each host in `order` until one succeeds; each call is bounded by
/// `per_host`. Returns the host that answered and its result, or every failure.
pub async fn try_in_order<T, E, F, Fut>(
    order: &[SrvRecord],
    per_host: Duration,
    mut attempt: F,
) -> Result<(SrvRecord, T), FailoverError<E>>
where
    E: std::fmt::Display + std::fmt::Debug,
    F: FnMut(SrvRecord) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = Vec::new();
    for target in order {
        match tokio::time::timeout(per_host, attempt(target.clone())).await {
            Ok(Ok(value)) => return Ok((target.clone(), value)),
            Ok(Err(e)) => failures.push((target.clone(), AttemptError::Failed(e))),
            Err(_) => failures.push((target.clone(), AttemptError::Timeout(per_host))),
        }
    }
    Err(FailoverError { attempts: failures })
}

/// Error of one connection attempt in [`connect_first`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Lookup(#[from] kms_dns::LookupError),
    #[error(transparent)]
    Kms(#[from] KmsClientError),
}

/// Connects (RPC bind included) to the first host in `order` that answers. Target names are
/// resolved through `dns` when given, else through the system resolver; every address of a
/// target is tried before moving on.
pub async fn connect_first(
    order: &[SrvRecord],
    dns: Option<SocketAddr>,
    options: BindOptions,
    timeout: Duration,
) -> Result<(SrvRecord, KmsClient), FailoverError<ConnectError>> {
    // Name lookup + a connect and bind per address, with some slack.
    let per_host = timeout.saturating_mul(3);
    try_in_order(order, per_host, |target| async move {
        let addrs = kms_dns::lookup_addresses(&target.target, target.port, dns, timeout).await?;
        let mut last = None;
        for addr in addrs {
            match KmsClient::connect(&addr.to_string(), options, timeout).await {
                Ok(client) => return Ok(client),
                Err(e) => last = Some(e),
            }
        }
        Err(ConnectError::Kms(last.unwrap_or(KmsClientError::Closed)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    fn rec(target: &str, priority: u16, weight: u16) -> SrvRecord {
        SrvRecord::new(target, 1688, priority, weight)
    }

    #[test]
    fn lower_priority_always_comes_first() {
        let records = vec![
            rec("c.test", 20, 1000),
            rec("a.test", 0, 0),
            rec("b1.test", 10, 5),
            rec("b2.test", 10, 5000),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..500 {
            let order = order_rfc2782(&records, &mut rng);
            let prios: Vec<u16> = order.iter().map(|r| r.priority).collect();
            assert_eq!(prios, vec![0, 10, 10, 20]);
            assert_eq!(order.first().map(|r| r.target.as_str()), Some("a.test"));
            assert_eq!(order.last().map(|r| r.target.as_str()), Some("c.test"));
        }
    }

    #[test]
    fn weights_10_30_60_are_honoured_statistically() {
        let records = vec![
            rec("a.test", 0, 10),
            rec("b.test", 0, 30),
            rec("c.test", 0, 60),
        ];
        let mut rng = StdRng::seed_from_u64(0x4b4d53);
        let draws = 10_000;
        let mut first: BTreeMap<String, u32> = BTreeMap::new();
        let mut second: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..draws {
            let order = order_rfc2782(&records, &mut rng);
            assert_eq!(
                order.len(),
                3,
                "without replacement: every host exactly once"
            );
            let mut names: Vec<&str> = order.iter().map(|r| r.target.as_str()).collect();
            *first.entry(names[0].to_owned()).or_default() += 1;
            *second.entry(names[1].to_owned()).or_default() += 1;
            names.sort();
            assert_eq!(names, ["a.test", "b.test", "c.test"]);
        }
        let share = |m: &BTreeMap<String, u32>, k: &str| {
            f64::from(*m.get(k).unwrap_or(&0)) / f64::from(draws)
        };
        // First place: weight / total. Binomial sd is at most 0.5% here; allow 1.5%.
        for (name, expected) in [("a.test", 0.10), ("b.test", 0.30), ("c.test", 0.60)] {
            let got = share(&first, name);
            assert!(
                (got - expected).abs() < 0.015,
                "{name} first {got}, expected {expected}"
            );
        }
        // Second place (selection without replacement): P(a second) =
        // P(b first)*10/70 + P(c first)*10/40 = 0.3/7 + 0.15 = 0.1929.
        let a_second = share(&second, "a.test");
        assert!((a_second - 0.192_857).abs() < 0.015, "a second {a_second}");
        let c_second = share(&second, "c.test");
        // P(c second) = P(a first)*60/90 + P(b first)*60/70 = 0.0667 + 0.2571 = 0.3238.
        assert!((c_second - 0.323_810).abs() < 0.015, "c second {c_second}");
    }

    #[test]
    fn weight_zero_has_a_very_small_chance_to_go_first() {
        let records = vec![rec("zero.test", 0, 0), rec("heavy.test", 0, 100)];
        let mut rng = StdRng::seed_from_u64(42);
        let draws = 10_000;
        let zero_first = (0..draws)
            .filter(|_| order_rfc2782(&records, &mut rng)[0].target == "zero.test")
            .count();
        // RFC 2782: picked only when the random number in [0, 100] is 0, i.e. 1/101.
        assert!(
            (50..=160).contains(&zero_first),
            "zero-weight first {zero_first} times"
        );
    }

    #[test]
    fn all_zero_weights_are_spread_evenly() {
        let records = vec![
            rec("a.test", 5, 0),
            rec("b.test", 5, 0),
            rec("c.test", 5, 0),
        ];
        let mut rng = StdRng::seed_from_u64(3);
        let mut first: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..3000 {
            let order = order_rfc2782(&records, &mut rng);
            *first.entry(order[0].target.clone()).or_default() += 1;
        }
        for name in ["a.test", "b.test", "c.test"] {
            let n = first.get(name).copied().unwrap_or(0);
            assert!((850..=1150).contains(&n), "{name} first {n} of 3000");
        }
    }

    #[test]
    fn empty_and_single_inputs() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(order_rfc2782(&[], &mut rng).is_empty());
        let one = vec![rec("only.test", 3, 0)];
        assert_eq!(order_rfc2782(&one, &mut rng), one);
        assert_eq!(
            format_order(&one),
            "1. only.test:1688 (priority 3, weight 0)\n"
        );
    }

    #[tokio::test]
    async fn dns_server_argument_forms() {
        let v4: SocketAddr = "127.0.0.1:15353".parse().unwrap();
        assert_eq!(parse_dns_server("127.0.0.1:15353").await.unwrap(), v4);
        assert_eq!(
            parse_dns_server("127.0.0.1").await.unwrap(),
            "127.0.0.1:53".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_dns_server("[::1]:5353").await.unwrap(),
            "[::1]:5353".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_dns_server("localhost:15353").await.unwrap().port(),
            15353
        );
        assert!(parse_dns_server("localhost:notaport").await.is_err());
        assert!(parse_dns_server(":53").await.is_err());
    }

    /// A host that does not answer (closed port), then one that does: the second is used.
    #[tokio::test]
    async fn falls_over_from_a_closed_port_and_a_silent_host_to_a_working_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Closed: bind, note the port, release.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        // Silent: accepts and never answers (a hung host).
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        // Working: a tiny echo stub standing in for a host.
        let working = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let working_port = working.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = working.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                    }
                });
            }
        });
        let order = vec![
            SrvRecord::new("127.0.0.1", closed_port, 0, 0),
            SrvRecord::new("127.0.0.1", silent_port, 5, 0),
            SrvRecord::new("127.0.0.1", working_port, 10, 0),
        ];
        let started = std::time::Instant::now();
        let (host, reply) = try_in_order(&order, Duration::from_millis(300), |t| async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", t.port)).await?;
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .unwrap();
        assert_eq!(host.port, working_port);
        assert_eq!(&reply, b"ping");
        assert!(started.elapsed() < Duration::from_secs(3));

        // Nothing answers: every failure is reported in order, closed first, then the timeout.
        let err = try_in_order(&order[..2], Duration::from_millis(200), |t| async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", t.port)).await?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap_err();
        assert_eq!(err.attempts.len(), 2);
        assert!(matches!(err.attempts[0].1, AttemptError::Failed(_)));
        assert!(matches!(err.attempts[1].1, AttemptError::Timeout(_)));
        assert!(err.to_string().contains("2 tried"), "{err}");
    }
}
