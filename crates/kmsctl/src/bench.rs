//! `kmsctl bench`: a bounded load generator. Every request is a full, verified activation;
//! the run stops at `requests` or `duration`, whichever comes first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_wire::client::BindOptions;
use serde::Serialize;
use uuid::Uuid;

use crate::client::{Answer, KmsClient};
use crate::products::RequestTemplate;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub server: String,
    pub concurrency: usize,
    /// Upper bound on requests.
    pub requests: u64,
    /// Upper bound on wall time.
    pub duration: Duration,
    /// Open a new TCP connection (and bind) for every request instead of keeping one.
    pub new_connection: bool,
    /// Products, used round-robin.
    pub products: Vec<RequestTemplate>,
    pub bind: BindOptions,
    pub timeout: Duration,
    /// Draw CMIDs from a pool of this size (renewals) instead of a fresh CMID per request.
    pub cmid_pool: Option<u64>,
    /// Remember the CMIDs that received a verified success.
    pub record_acked: bool,
    /// Pace the whole run to this many requests per second (None = as fast as possible).
    pub rate: Option<f64>,
}

/// Results, also printed as JSON with `--json`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BenchReport {
    pub server: String,
    pub concurrency: usize,
    pub new_connection: bool,
    pub requests: u64,
    pub succeeded: u64,
    pub refused: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub elapsed_secs: f64,
    pub requests_per_sec: f64,
    pub latency_ms: Latency,
    /// CMIDs acknowledged with a verified success (only with `record_acked`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub acked_cmids: Vec<Uuid>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Default)]
struct Shared {
    latencies_us: Vec<u64>,
    succeeded: u64,
    refused: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    acked: Vec<Uuid>,
}

/// Keep-alive connections are renewed after this many requests, staying well under a host's
/// per-connection PDU limit (kmsd's default is 1000 PDUs).
const REQUESTS_PER_CONNECTION: u64 = 500;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Error kinds are grouped by the first words of the message so the table stays short.
fn error_kind(e: &crate::client::KmsClientError) -> String {
    let text = e.to_string();
    text.split(':').next().unwrap_or(&text).to_owned()
}

/// Runs the benchmark.
pub async fn run(config: BenchConfig) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(config.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(
        !config.products.is_empty(),
        "at least one product is needed"
    );
    let issued = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Mutex::new(Shared::default()));
    if let Some(rate) = config.rate {
        anyhow::ensure!(
            rate > 0.0 && rate.is_finite(),
            "--rate must be a positive number"
        );
    }
    let started = Instant::now();
    let deadline = started + config.duration;
    let config = Arc::new(config);
    let mut workers = Vec::new();
    for worker in 0..config.concurrency {
        let issued = issued.clone();
        let shared = shared.clone();
        let config = config.clone();
        workers.push(tokio::spawn(async move {
            worker_loop(worker, &config, &issued, &shared, started, deadline).await;
        }));
    }
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut shared = std::mem::take(&mut *shared.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    shared.latencies_us.sort_unstable();
    let total = shared.succeeded + shared.refused + shared.failed;
    Ok(BenchReport {
        server: config.server.clone(),
        concurrency: config.concurrency,
        new_connection: config.new_connection,
        requests: total,
        succeeded: shared.succeeded,
        refused: shared.refused,
        failed: shared.failed,
        errors: shared.errors,
        elapsed_secs: elapsed,
        requests_per_sec: if elapsed > 0.0 {
            (shared.succeeded + shared.refused) as f64 / elapsed
        } else {
            0.0
        },
        latency_ms: latency(&shared.latencies_us),
        acked_cmids: shared.acked,
    })
}

fn latency(sorted_us: &[u64]) -> Latency {
    if sorted_us.is_empty() {
        return Latency::default();
    }
    let pick = |q: f64| {
        let idx = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
        sorted_us.get(idx).copied().unwrap_or(0) as f64 / 1000.0
    };
    Latency {
        mean: sorted_us.iter().sum::<u64>() as f64 / sorted_us.len() as f64 / 1000.0,
        p50: pick(0.50),
        p95: pick(0.95),
        p99: pick(0.99),
        max: sorted_us.last().copied().unwrap_or(0) as f64 / 1000.0,
    }
}

async fn worker_loop(
    worker: usize,
    config: &BenchConfig,
    issued: &AtomicU64,
    shared: &Mutex<Shared>,
    started: Instant,
    deadline: Instant,
) {
    let mut conn: Option<KmsClient> = None;
    let mut on_connection: u64 = 0;
    let mut local = Shared::default();
    loop {
        let n = issued.fetch_add(1, Ordering::Relaxed);
        if n >= config.requests || Instant::now() >= deadline {
            break;
        }
        if let Some(rate) = config.rate {
            // Request n is due at n / rate seconds into the run.
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            if due >= deadline {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let product_index = (n as usize + worker) % config.products.len();
        let Some(template) = config.products.get(product_index) else {
            break;
        };
        let cmid = match config.cmid_pool {
            Some(pool) if pool > 0 => {
                Uuid::from_u128(0x4b4d_5300_0000_4000_8000_0000_0000_0000 | u128::from(n % pool))
            }
            _ => Uuid::new_v4(),
        };
        let request = template.build(cmid, now_ms());
        let start = Instant::now();
        let result = async {
            if conn.is_none() || config.new_connection || on_connection >= REQUESTS_PER_CONNECTION {
                conn = Some(KmsClient::connect(&config.server, config.bind, config.timeout).await?);
                on_connection = 0;
            }
            on_connection += 1;
            match conn.as_mut() {
                Some(c) => c.activate(&request, rand::random()).await,
                None => Err(crate::client::KmsClientError::Closed),
            }
        }
        .await;
        let elapsed = start.elapsed().as_micros() as u64;
        match result {
            Ok(Answer::Activated(_)) => {
                local.succeeded += 1;
                local.latencies_us.push(elapsed);
                if config.record_acked {
                    local.acked.push(cmid);
                }
            }
            Ok(Answer::Refused(hr)) => {
                local.refused += 1;
                local.latencies_us.push(elapsed);
                *local
                    .errors
                    .entry(format!("refused 0x{hr:08X}"))
                    .or_default() += 1;
            }
            Err(e) => {
                local.failed += 1;
                *local.errors.entry(error_kind(&e)).or_default() += 1;
                // A broken connection is replaced on the next request.
                conn = None;
            }
        }
        if config.new_connection {
            conn = None;
        }
    }
    if let Ok(mut s) = shared.lock() {
        s.latencies_us.append(&mut local.latencies_us);
        s.succeeded += local.succeeded;
        s.refused += local.refused;
        s.failed += local.failed;
        for (k, v) in local.errors {
            *s.errors.entry(k).or_default() += v;
        }
        s.acked.append(&mut local.acked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let data: Vec<u64> = (1..=100).map(|v| v * 1000).collect();
        let l = latency(&data);
        assert_eq!(l.p50, 51.0);
        assert_eq!(l.p99, 99.0);
        assert_eq!(l.max, 100.0);
        assert!((l.mean - 50.5).abs() < 1e-9);
        assert_eq!(latency(&[]).p99, 0.0);
    }
}
