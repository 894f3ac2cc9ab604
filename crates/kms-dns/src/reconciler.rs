//! [`spawn`]: the loop that keeps every configured zone in line with the desired members.
//!
//! It runs a round at start, whenever the desired state changes or a trigger arrives
//! (membership or health change), and every `republish_interval` (24 h by default, like a
//! genuine host re-registering). A failed zone is retried with exponential backoff, other
//! zones are unaffected. Every round of every zone ends in an [`Outcome`] handed to the
//! callback (log line, event 12293/12294, metrics) and folded into [`ZoneStats`].
//!
//! The loop runs in its own task and every DNS call in it is bounded, so a refusing or dead
//! DNS server costs a log line and a retry, never a blocked activation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::{Advertise, DnsConfig};
use crate::error::PublishError;
use crate::publisher::{normalize_host, DesiredSrv, PublishReport, Publisher};

/// Event id of a failed registration (genuine KMS: "publishing the KMS SRV record failed").
pub const EVENT_PUBLISH_FAILED: u32 = 12293;
/// Event id of a successful registration.
pub const EVENT_PUBLISH_SUCCEEDED: u32 = 12294;

/// Loop timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconcilerOptions {
    /// Re-read and repair every zone this often even when nothing changed.
    pub republish_interval: Duration,
    /// First retry delay after a failure; doubled on each further failure.
    pub backoff_initial: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
}

impl Default for ReconcilerOptions {
    fn default() -> Self {
        Self {
            republish_interval: Duration::from_secs(crate::config::DEFAULT_REPUBLISH_INTERVAL_SECS),
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
        }
    }
}

impl ReconcilerOptions {
    pub fn from_config(config: &DnsConfig) -> Self {
        Self {
            republish_interval: config.republish_interval(),
            ..Self::default()
        }
    }
}

/// One cluster member as DNS should show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Advertised host name (SRV target).
    pub host: String,
    /// Advertised KMS port.
    pub port: u16,
    /// Addresses for A/AAAA records (used only with `publish_address_records`).
    pub addresses: Vec<IpAddr>,
    /// The member's own priority and weight per zone (its `[[dns.publish]]` values, keyed by
    /// zone without the final dot). Zones it does not list use the publishing node's values.
    pub zones: BTreeMap<String, (u16, u16)>,
}

impl Member {
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: normalize_host(host),
            port,
            addresses: Vec::new(),
            zones: BTreeMap::new(),
        }
    }

    /// A member from its own `[node]` and `[dns]` configuration.
    pub fn from_config(advertise: &Advertise, dns: &DnsConfig) -> Self {
        let mut member = Self::new(&advertise.advertise_host, advertise.advertise_port);
        for target in &dns.publish {
            member.zones.insert(
                normalize_host(&target.zone),
                (target.priority, target.weight),
            );
        }
        member
    }

    pub fn with_zone(mut self, zone: &str, priority: u16, weight: u16) -> Self {
        self.zones.insert(normalize_host(zone), (priority, weight));
        self
    }

    pub fn with_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.addresses = addresses.into_iter().collect();
        self
    }
}

/// What DNS should contain: the healthy members, and every host the cluster has ever
/// advertised (only records pointing at those are ever removed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub members: Vec<Member>,
    pub owned_hosts: BTreeSet<String>,
}

impl DesiredState {
    /// Members are owned too.
    pub fn new(members: Vec<Member>, owned_hosts: impl IntoIterator<Item = String>) -> Self {
        let mut owned: BTreeSet<String> = owned_hosts
            .into_iter()
            .map(|h| normalize_host(&h))
            .collect();
        owned.extend(members.iter().map(|m| normalize_host(&m.host)));
        Self {
            members,
            owned_hosts: owned,
        }
    }

    /// The SRV records `publisher`'s zone should hold.
    pub fn records_for(&self, publisher: &Publisher) -> Vec<DesiredSrv> {
        let defaults = publisher.priority_weight();
        self.members
            .iter()
            .map(|m| {
                let (priority, weight) = m.zones.get(publisher.zone()).copied().unwrap_or(defaults);
                DesiredSrv::new(&m.host, m.port, priority, weight)
                    .with_addresses(m.addresses.iter().copied())
            })
            .collect()
    }

    fn owned(&self) -> BTreeSet<String> {
        let mut owned = self.owned_hosts.clone();
        owned.extend(self.members.iter().map(|m| normalize_host(&m.host)));
        owned
    }
}

/// What a round did to one zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Reconcile,
    Withdraw { host: String },
}

/// The result of one round for one zone.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub zone: String,
    pub server: String,
    pub action: Action,
    pub result: Result<PublishReport, PublishError>,
    pub at: SystemTime,
    /// When the loop will try this zone again (reconcile rounds only).
    pub next_attempt_in: Option<Duration>,
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        self.result.is_ok()
    }

    /// 12294 on success, 12293 on failure.
    pub fn event_id(&self) -> u32 {
        if self.is_success() {
            EVENT_PUBLISH_SUCCEEDED
        } else {
            EVENT_PUBLISH_FAILED
        }
    }

    /// A one-line description for logs and the event text (never contains the secret).
    pub fn message(&self) -> String {
        let what = match &self.action {
            Action::Reconcile => "publishing".to_owned(),
            Action::Withdraw { host } => format!("withdrawing {host} from"),
        };
        match &self.result {
            Ok(r) => format!(
                "{what} _vlmcs._tcp.{} on {} succeeded: {} record(s) published (+{} -{} ~{}, {} address change(s), {} foreign record(s) left alone)",
                self.zone, self.server, r.records_published, r.added, r.removed, r.changed, r.address_changes, r.foreign_records
            ),
            Err(e) => format!(
                "{what} _vlmcs._tcp.{} on {} failed ({}): {e}",
                self.zone,
                self.server,
                e.label()
            ),
        }
    }
}

/// Counters for metrics and the status page, per zone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneStats {
    pub zone: String,
    pub server: String,
    pub successes: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub last_success_unix: Option<u64>,
    pub last_failure_unix: Option<u64>,
    /// Label of the last error (`REFUSED`, `TIMEOUT`, ...) and its text.
    pub last_error: Option<(String, String)>,
    /// Records of this cluster in the zone after the last successful round.
    pub records_published: usize,
}

type Callback = Arc<dyn Fn(&Outcome) + Send + Sync>;

enum Command {
    SetDesired(DesiredState),
    Trigger,
    Withdraw {
        host: String,
        reply: oneshot::Sender<Vec<Outcome>>,
    },
    Shutdown,
}

/// Handle to a running loop. Cloneable; the loop ends on [`ReconcilerHandle::shutdown`] or
/// when every handle is dropped.
#[derive(Clone)]
pub struct ReconcilerHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<BTreeMap<String, ZoneStats>>>,
}

impl ReconcilerHandle {
    /// Replaces the desired state and reconciles every zone now.
    pub fn set_desired(&self, state: DesiredState) {
        let _ = self.tx.send(Command::SetDesired(state));
    }

    /// Reconciles every zone now (health or membership changed, operator request).
    pub fn trigger(&self) {
        let _ = self.tx.send(Command::Trigger);
    }

    /// Removes `host` from the desired members (it stays owned) and deletes its records in
    /// every zone now; returns one outcome per zone. Use before a node stops serving.
    pub async fn withdraw(&self, host: &str) -> Vec<Outcome> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Withdraw {
                host: normalize_host(host),
                reply,
            })
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Per-zone counters.
    pub fn stats(&self) -> Vec<ZoneStats> {
        lock(&self.stats).values().cloned().collect()
    }

    /// Stops the loop after the round in progress (if any).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct ZoneState {
    publisher: Publisher,
    next_due: Instant,
    backoff: Duration,
}

/// Starts the loop in a tokio task. `on_outcome` is called from the loop task after every
/// round of every zone; keep it short (log, push an event, bump metrics).
pub fn spawn<F>(
    publishers: Vec<Publisher>,
    options: ReconcilerOptions,
    initial: DesiredState,
    on_outcome: F,
) -> (ReconcilerHandle, JoinHandle<()>)
where
    F: Fn(&Outcome) + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let stats: Arc<Mutex<BTreeMap<String, ZoneStats>>> = Arc::new(Mutex::new(
        publishers
            .iter()
            .map(|p| {
                (
                    p.zone().to_owned(),
                    ZoneStats {
                        zone: p.zone().to_owned(),
                        server: p.server().to_owned(),
                        ..ZoneStats::default()
                    },
                )
            })
            .collect(),
    ));
    let now = Instant::now();
    let zones = publishers
        .into_iter()
        .map(|publisher| ZoneState {
            publisher,
            next_due: now,
            backoff: options.backoff_initial,
        })
        .collect();
    let task = Loop {
        zones,
        options,
        desired: initial,
        callback: Arc::new(on_outcome),
        stats: stats.clone(),
    };
    let join = tokio::spawn(task.run(rx));
    (ReconcilerHandle { tx, stats }, join)
}

/// Withdraws `host` from every zone directly, without a loop (a non-leader node leaving, or
/// a node whose loop is not running). One result per publisher, in order.
pub async fn withdraw_everywhere(publishers: &[Publisher], host: &str) -> Vec<Outcome> {
    let mut set = JoinSet::new();
    for (i, p) in publishers.iter().enumerate() {
        let p = p.clone();
        let host = normalize_host(host);
        set.spawn(async move { (i, withdraw_outcome(&p, &host).await) });
    }
    let mut results: Vec<(usize, Outcome)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(pair) = joined {
            results.push(pair);
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, o)| o).collect()
}

async fn withdraw_outcome(publisher: &Publisher, host: &str) -> Outcome {
    let result = publisher.withdraw(host).await;
    Outcome {
        zone: publisher.zone().to_owned(),
        server: publisher.server().to_owned(),
        action: Action::Withdraw {
            host: host.to_owned(),
        },
        result,
        at: SystemTime::now(),
        next_attempt_in: None,
    }
}

struct Loop {
    zones: Vec<ZoneState>,
    options: ReconcilerOptions,
    desired: DesiredState,
    callback: Callback,
    stats: Arc<Mutex<BTreeMap<String, ZoneStats>>>,
}

impl Loop {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            let next = self.zones.iter().map(|z| z.next_due).min();
            let command = match next {
                Some(at) => tokio::select! {
                    c = rx.recv() => Some(c),
                    _ = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await),
            };
            let mut stop = false;
            if let Some(first) = command {
                // Coalesce everything queued so that a burst of changes costs one round.
                let mut pending = vec![first];
                while let Ok(more) = rx.try_recv() {
                    pending.push(Some(more));
                }
                for c in pending {
                    match c {
                        None | Some(Command::Shutdown) => stop = true,
                        Some(Command::SetDesired(state)) => {
                            self.desired = state;
                            self.all_due_now();
                        }
                        Some(Command::Trigger) => self.all_due_now(),
                        Some(Command::Withdraw { host, reply }) => {
                            let outcomes = self.withdraw(&host).await;
                            let _ = reply.send(outcomes);
                        }
                    }
                }
            }
            if stop {
                break;
            }
            self.run_due().await;
        }
    }

    fn all_due_now(&mut self) {
        let now = Instant::now();
        for z in &mut self.zones {
            z.next_due = now;
        }
    }

    async fn withdraw(&mut self, host: &str) -> Vec<Outcome> {
        // Keep it owned (so a later round would also clean up leftovers) but not desired.
        self.desired.owned_hosts.insert(host.to_owned());
        self.desired
            .members
            .retain(|m| normalize_host(&m.host) != host);
        let publishers: Vec<Publisher> = self.zones.iter().map(|z| z.publisher.clone()).collect();
        let outcomes = withdraw_everywhere(&publishers, host).await;
        for o in &outcomes {
            self.record(o);
        }
        outcomes
    }

    async fn run_due(&mut self) {
        let now = Instant::now();
        let owned = self.desired.owned();
        let mut set = JoinSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            if z.next_due > now {
                continue;
            }
            let publisher = z.publisher.clone();
            let records = self.desired.records_for(&publisher);
            let owned = owned.clone();
            set.spawn(async move { (i, publisher.publish(&records, &owned).await) });
        }
        while let Some(joined) = set.join_next().await {
            let Ok((i, result)) = joined else {
                continue;
            };
            let Some(zone) = self.zones.get_mut(i) else {
                continue;
            };
            let wait = if result.is_ok() {
                zone.backoff = self.options.backoff_initial;
                self.options.republish_interval
            } else {
                let wait = zone.backoff;
                zone.backoff = zone
                    .backoff
                    .saturating_mul(2)
                    .min(self.options.backoff_max)
                    .max(self.options.backoff_initial);
                wait
            };
            zone.next_due = Instant::now() + wait;
            let outcome = Outcome {
                zone: zone.publisher.zone().to_owned(),
                server: zone.publisher.server().to_owned(),
                action: Action::Reconcile,
                result,
                at: SystemTime::now(),
                next_attempt_in: Some(wait),
            };
            self.record(&outcome);
        }
    }

    fn record(&self, outcome: &Outcome) {
        {
            let mut stats = lock(&self.stats);
            let entry = stats.entry(outcome.zone.clone()).or_default();
            match &outcome.result {
                Ok(report) => {
                    entry.successes += 1;
                    entry.consecutive_failures = 0;
                    entry.last_success_unix = Some(unix_now());
                    entry.records_published = match outcome.action {
                        Action::Reconcile => report.records_published,
                        Action::Withdraw { .. } => {
                            entry.records_published.saturating_sub(report.removed)
                        }
                    };
                }
                Err(e) => {
                    entry.failures += 1;
                    entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
                    entry.last_failure_unix = Some(unix_now());
                    entry.last_error = Some((e.label(), e.to_string()));
                }
            }
        }
        if outcome.is_success() {
            tracing::info!(event_id = outcome.event_id(), zone = %outcome.zone, "{}", outcome.message());
        } else {
            tracing::warn!(event_id = outcome.event_id(), zone = %outcome.zone, "{}", outcome.message());
        }
        // A panicking callback must not take the loop down with it.
        let callback = self.callback.clone();
        if std::panic::catch_unwind(AssertUnwindSafe(|| callback(outcome))).is_err() {
            tracing::error!("DNS publish outcome callback panicked");
        }
    }
}
