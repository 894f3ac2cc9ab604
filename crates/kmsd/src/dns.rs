//! Leader-managed DNS SRV publishing.
//!
//! Every node advertises its SRV target (host, port, per-zone priority and weight) in its
//! Raft membership entry. The leader probes each member's KMS port; the `_vlmcs._tcp` RRset
//! of every configured zone is kept equal to the members that answer. A node that stops
//! answering (`kill -9`) is withdrawn after [`UNHEALTHY_AFTER`] failed probes plus one
//! publish round; a node stopping gracefully withdraws its own record before it closes its
//! listeners.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kms_dns::reconciler::{self, DesiredState, Member, ReconcilerHandle, ReconcilerOptions};
use kms_dns::{DnsConfig, Publisher, PublisherOptions};
use kms_raft::cluster::NodeRole;
use kms_raft::DnsAdvert;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::Engine;

/// How often the leader probes members' KMS ports.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive failed probes before a member's record is withdrawn.
pub const UNHEALTHY_AFTER: u32 = 2;

/// What this node advertises, from `[node] advertise_host/advertise_port` and `[[dns.publish]]`.
pub fn advert(config: &Config) -> Option<DnsAdvert> {
    let advertise = config.advertise.as_ref()?;
    let member = Member::from_config(advertise, &config.dns);
    Some(DnsAdvert {
        host: member.host,
        port: member.port,
        addresses: member.addresses,
        zones: member.zones,
    })
}

fn member_of(advert: &DnsAdvert) -> Member {
    let mut m =
        Member::new(&advert.host, advert.port).with_addresses(advert.addresses.iter().copied());
    for (zone, (priority, weight)) in &advert.zones {
        m = m.with_zone(zone, *priority, *weight);
    }
    m
}

/// Publishing state shown in `/api/v1/status` and metrics.
#[derive(Default)]
pub struct DnsShared {
    handle: Mutex<Option<ReconcilerHandle>>,
}

impl DnsShared {
    pub fn stats(&self) -> Vec<reconciler::ZoneStats> {
        self.handle
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|h| h.stats()))
            .unwrap_or_default()
    }
}

/// Callback for every publish attempt: log, event, metrics.
pub type OutcomeSink = Arc<dyn Fn(&reconciler::Outcome) + Send + Sync>;

/// Runs the publisher while this node leads; returns `None` when DNS publishing is off.
pub fn spawn(
    config: &Config,
    engine: Engine,
    sink: OutcomeSink,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<DnsShared>>> {
    if config.dns.publish.is_empty() {
        return Ok(None);
    }
    let dns = config.dns.clone();
    // Build once to fail start-up on a bad target (unreadable secret, bad server address).
    build_publishers(&dns)?;
    let shared = Arc::new(DnsShared::default());
    let state = shared.clone();
    tokio::spawn(async move {
        let mut failures: BTreeMap<u64, u32> = BTreeMap::new();
        let mut last_desired: Option<(Vec<String>, BTreeSet<String>)> = None;
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let leading = engine.view().role == NodeRole::Leader;
            let running = state.handle.lock().map(|h| h.is_some()).unwrap_or(false);
            if !leading {
                if running {
                    stop(&state);
                    tracing::info!("no longer leader: DNS publishing handed over");
                }
                last_desired = None;
                continue;
            }
            let members = engine.members();
            // Probe every member's KMS port; the leader itself answers if it is here.
            let mut healthy = Vec::new();
            let mut owned = BTreeSet::new();
            for m in &members {
                let Some(advert) = &m.node.dns else { continue };
                owned.insert(advert.host.clone());
                let ok = probe(&m.node.kms_addr).await;
                // A member never seen answering starts unhealthy; one that answered before
                // is withdrawn only after UNHEALTHY_AFTER failures in a row.
                let count = failures.entry(m.id).or_insert(UNHEALTHY_AFTER);
                *count = if ok { 0 } else { count.saturating_add(1) };
                if *count < UNHEALTHY_AFTER {
                    healthy.push(member_of(advert));
                }
            }
            let key = (
                healthy
                    .iter()
                    .map(|m| format!("{}:{}", m.host, m.port))
                    .collect::<Vec<_>>(),
                owned.clone(),
            );
            if !running {
                match build_publishers(&dns) {
                    Ok(publishers) => {
                        let sink = sink.clone();
                        let (handle, _task) = reconciler::spawn(
                            publishers,
                            ReconcilerOptions::from_config(&dns),
                            DesiredState::new(healthy, owned),
                            move |o: &reconciler::Outcome| sink(o),
                        );
                        if let Ok(mut h) = state.handle.lock() {
                            *h = Some(handle);
                        }
                        tracing::info!("leader: DNS publishing started");
                        last_desired = Some(key);
                    }
                    Err(e) => tracing::error!(error = %e, "DNS publishers could not be built"),
                }
                continue;
            }
            if last_desired.as_ref() != Some(&key) {
                tracing::info!(healthy = ?key.0, "DNS: set of answering members changed");
                if let Ok(h) = state.handle.lock() {
                    if let Some(h) = h.as_ref() {
                        h.set_desired(DesiredState::new(healthy, owned));
                    }
                }
                last_desired = Some(key);
            }
        }
        stop(&state);
    });
    Ok(Some(shared))
}

fn stop(state: &DnsShared) {
    if let Ok(mut h) = state.handle.lock() {
        if let Some(handle) = h.take() {
            handle.shutdown();
        }
    }
}

fn build_publishers(dns: &DnsConfig) -> anyhow::Result<Vec<Publisher>> {
    dns.publish
        .iter()
        .map(|t| {
            Publisher::new(t, PublisherOptions::with_timeout(dns.timeout()))
                .map_err(|e| anyhow::anyhow!("DNS target {}: {e}", t.zone))
        })
        .collect()
}

/// A member answers if its KMS port accepts a connection.
async fn probe(addr: &str) -> bool {
    if addr.is_empty() {
        return false;
    }
    matches!(
        tokio::time::timeout(
            Duration::from_millis(800),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Before a graceful stop: remove this node's own record from every zone, so clients are
/// not sent to a host that is about to close.
pub async fn withdraw_self(config: &Config, sink: &OutcomeSink) {
    let Some(advert) = advert(config) else { return };
    let Ok(publishers) = build_publishers(&config.dns) else {
        return;
    };
    let outcomes = reconciler::withdraw_everywhere(&publishers, &advert.host).await;
    for o in &outcomes {
        sink(o);
    }
}
