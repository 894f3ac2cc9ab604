//! Per-source limits of the KMS listeners (port 1688): concurrent connections per source
//! address and a token bucket for new client machine ids (CMIDs) per source address.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host usually owns a whole /64, so
//! counting single IPv6 addresses would let one host take 2^64 sources). The table is a
//! sharded concurrent map ([`dashmap`]): connections of different sources never wait for
//! each other, and a source's entry is only locked for a few instructions.
//!
//! New-CMID accounting: every new CMID costs a token; a CMID already in the registry is not
//! new and is never refused (renewals of known clients always pass). Looking the CMID up
//! needs a read of the replicated state, so a quiet source skips it: while its bucket is at
//! least half full, a request takes a token without the look-up (a renewal then pays for a
//! token it did not need, which a quiet source can afford). Once the bucket is below half,
//! every request is looked up: known clients pass without a token, new ones need one. So a
//! source never adds more than `burst + rate * t` new CMIDs in `t` seconds, known clients are
//! never refused, and the look-up cost is only paid by busy sources.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Limits of one source address.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeLimits {
    /// Most concurrent connections from one source (0 = no limit).
    pub max_connections_per_source: u32,
    /// New CMIDs per second one source may add, sustained (0 = no limit).
    pub new_clients_per_sec: f64,
    /// New CMIDs one source may add at once (bucket size).
    pub new_clients_burst: u32,
    /// Most sources tracked one by one; more share one overflow entry (bounded memory under
    /// a flood from many addresses).
    pub max_sources: usize,
    /// Sources the limits do not apply to (default loopback: load tools and a proxy on the
    /// host itself).
    pub exempt: Vec<ipnet::IpNet>,
}

/// Sources exempt by default: the host itself.
pub fn default_exempt() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            new_clients_per_sec: DEFAULT_NEW_CLIENTS_PER_SEC,
            new_clients_burst: DEFAULT_NEW_CLIENTS_BURST,
            max_sources: DEFAULT_MAX_SOURCES,
            exempt: default_exempt(),
        }
    }
}

/// Default concurrent connections per source address (docs/security.md explains the number).
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: u32 = 256;
/// Default sustained new CMIDs per second per source address.
pub const DEFAULT_NEW_CLIENTS_PER_SEC: f64 = 10.0;
/// Default burst of new CMIDs per source address.
pub const DEFAULT_NEW_CLIENTS_BURST: u32 = 1000;
/// Sources tracked one by one (about 100 bytes each: 25 MB at most).
pub const DEFAULT_MAX_SOURCES: usize = 262_144;

/// Key of a source: an IPv4 address, an IPv6 /64, or the shared overflow entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4(u32),
    V6Prefix(u64),
    Overflow,
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug)]
struct Source {
    connections: u32,
    tokens: f64,
    refilled: Instant,
}

/// What the new-CMID check decided without looking at the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewClientCheck {
    /// Allowed (a token was taken or the limit is off).
    Allowed,
    /// The source is busy: ask whether the CMID is registered, then call
    /// [`EdgeLimiter::new_client_after_lookup`].
    LookUp,
}

/// Why the edge refused something (the `reason` label of `kms_edge_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Connections,
    NewClients,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections_per_source",
            Self::NewClients => "new_clients_per_source",
        }
    }

    const ALL: [Refusal; 2] = [Refusal::Connections, Refusal::NewClients];

    fn index(self) -> usize {
        match self {
            Self::Connections => 0,
            Self::NewClients => 1,
        }
    }
}

/// The per-source table, shared by every listener.
#[derive(Debug)]
pub struct EdgeLimiter {
    limits: EdgeLimits,
    sources: DashMap<SourceKey, Source>,
    tracked: AtomicUsize,
    started: Instant,
}

/// Held for the life of an accepted connection; gives the slot back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    /// `None` for an exempt source (nothing counted).
    held: Option<(Arc<EdgeLimiter>, SourceKey)>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((limiter, key)) = &self.held {
            if let Some(mut s) = limiter.sources.get_mut(key) {
                s.connections = s.connections.saturating_sub(1);
            }
        }
    }
}

impl EdgeLimiter {
    pub fn new(limits: EdgeLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            sources: DashMap::new(),
            tracked: AtomicUsize::new(0),
            started: Instant::now(),
        })
    }

    pub fn limits(&self) -> &EdgeLimits {
        &self.limits
    }

    /// Whether `ip` is exempt from the limits.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.limits.exempt.iter().any(|n| n.contains(&ip))
    }

    fn burst(&self) -> f64 {
        f64::from(self.limits.new_clients_burst.max(1))
    }

    /// The key to use for `ip`: its own entry, or the overflow entry when the table is full.
    fn key_for(&self, ip: IpAddr) -> SourceKey {
        let key = SourceKey::of(ip);
        if self.tracked.load(Ordering::Relaxed) >= self.limits.max_sources
            && !self.sources.contains_key(&key)
        {
            return SourceKey::Overflow;
        }
        key
    }

    fn with_source<R>(&self, key: SourceKey, now: Instant, f: impl FnOnce(&mut Source) -> R) -> R {
        let burst = self.burst();
        let mut entry = self.sources.entry(key).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            Source {
                connections: 0,
                tokens: burst,
                refilled: now,
            }
        });
        let s = entry.value_mut();
        // Refill the bucket for the time since the last visit.
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.limits.new_clients_per_sec).min(burst);
        s.refilled = now;
        f(s)
    }

    /// Takes a connection slot for `ip`, or refuses when the source has its maximum.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        self.connect_at(ip, Instant::now())
    }

    pub fn connect_at(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<ConnectionSlot, Refusal> {
        if self.is_exempt(ip) {
            return Ok(ConnectionSlot { held: None });
        }
        let key = self.key_for(ip);
        let max = self.limits.max_connections_per_source;
        let ok = self.with_source(key, now, |s| {
            if max != 0 && s.connections >= max {
                return false;
            }
            s.connections += 1;
            true
        });
        if ok {
            Ok(ConnectionSlot {
                held: Some((self.clone(), key)),
            })
        } else {
            Err(Refusal::Connections)
        }
    }

    /// First step of the new-CMID check for a request from `ip`.
    pub fn new_client(&self, ip: IpAddr, now: Instant) -> NewClientCheck {
        if self.limits.new_clients_per_sec <= 0.0 || self.is_exempt(ip) {
            return NewClientCheck::Allowed;
        }
        let half = self.burst() / 2.0;
        let key = self.key_for(ip);
        self.with_source(key, now, |s| {
            if s.tokens > half && s.tokens >= 1.0 {
                s.tokens -= 1.0;
                NewClientCheck::Allowed
            } else {
                NewClientCheck::LookUp
            }
        })
    }

    /// Second step: `known` says whether the CMID is registered. A known client passes
    /// without a token; a new one needs a token.
    pub fn new_client_after_lookup(
        &self,
        ip: IpAddr,
        known: bool,
        now: Instant,
    ) -> Result<(), Refusal> {
        if known {
            return Ok(());
        }
        let key = self.key_for(ip);
        let ok = self.with_source(key, now, |s| {
            if s.tokens >= 1.0 {
                s.tokens -= 1.0;
                true
            } else {
                false
            }
        });
        if ok {
            Ok(())
        } else {
            Err(Refusal::NewClients)
        }
    }

    /// Drops entries with no connection and a full bucket (nothing to remember).
    pub fn sweep(&self, now: Instant) {
        let burst = self.burst();
        let rate = self.limits.new_clients_per_sec;
        let mut removed = 0usize;
        self.sources.retain(|_, s| {
            let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
            let full = rate <= 0.0 || s.tokens + elapsed * rate >= burst;
            let keep = s.connections > 0 || !full;
            if !keep {
                removed += 1;
            }
            keep
        });
        let _ = self
            .tracked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(removed))
            });
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Milliseconds since the limiter was created (for the event throttle).
    fn uptime_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Throttles the log lines and events of refusals: at most one per reason per `every`,
/// carrying how many refusals it stands for. A flood costs one atomic add per refusal.
#[derive(Debug)]
pub struct RefusalReporter {
    every_ms: u64,
    /// Per reason: refusals since the last report, and when the next report may be written.
    pending: [AtomicU64; 2],
    next_ms: [AtomicU64; 2],
}

/// A report to write: `count` refusals for `reason`, the latest from `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalReport {
    pub reason: Refusal,
    pub count: u64,
}

impl RefusalReporter {
    pub fn new(every: Duration) -> Self {
        Self {
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1),
            pending: [AtomicU64::new(0), AtomicU64::new(0)],
            next_ms: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Counts one refusal; returns a report when one is due (the first refusal, then at most
    /// one per period).
    pub fn refused(
        &self,
        limiter: &EdgeLimiter,
        reason: Refusal,
        now: Instant,
    ) -> Option<RefusalReport> {
        let i = reason.index();
        let (Some(pending), Some(next)) = (self.pending.get(i), self.next_ms.get(i)) else {
            return None;
        };
        pending.fetch_add(1, Ordering::Relaxed);
        let now_ms = limiter.uptime_ms(now);
        let due = next.load(Ordering::Relaxed);
        if now_ms < due {
            return None;
        }
        // One caller wins the period.
        if next
            .compare_exchange(
                due,
                now_ms.saturating_add(self.every_ms),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return None;
        }
        let count = pending.swap(0, Ordering::AcqRel);
        Some(RefusalReport { reason, count })
    }

    /// Every reason, for registering metrics at zero.
    pub fn reasons() -> [Refusal; 2] {
        Refusal::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(conns: u32, rate: f64, burst: u32) -> EdgeLimits {
        EdgeLimits {
            max_connections_per_source: conns,
            new_clients_per_sec: rate,
            new_clients_burst: burst,
            max_sources: 1000,
            exempt: Vec::new(),
        }
    }

    #[test]
    fn connection_cap_is_per_source_and_slots_come_back() {
        let l = EdgeLimiter::new(limits(2, 0.0, 1));
        let a = l.connect(ip("10.0.0.1")).unwrap();
        let _b = l.connect(ip("10.0.0.1")).unwrap();
        assert_eq!(l.connect(ip("10.0.0.1")).unwrap_err(), Refusal::Connections);
        // Another source is not affected.
        let _c = l.connect(ip("10.0.0.2")).unwrap();
        drop(a);
        assert!(l.connect(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let l = EdgeLimiter::new(limits(1, 0.0, 1));
        let _a = l.connect(ip("2001:db8::1")).unwrap();
        assert!(l.connect(ip("2001:db8::ffff:2")).is_err(), "same /64");
        assert!(l.connect(ip("2001:db8:0:1::1")).is_ok(), "other /64");
        let _v4 = l.connect(ip("192.0.2.7")).unwrap();
        assert!(l.connect(ip("::ffff:192.0.2.7")).is_err());
    }

    #[test]
    fn exempt_sources_are_not_limited() {
        let mut lim = limits(1, 1.0, 1);
        lim.exempt = default_exempt();
        let l = EdgeLimiter::new(lim);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..10)
            .map(|_| l.connect(ip("127.0.0.2")).unwrap())
            .collect();
        assert!(l.connect(ip("::ffff:127.0.0.1")).is_ok());
        assert!(l.connect(ip("::1")).is_ok());
        assert!((0..100).all(|_| l.new_client(ip("127.0.0.1"), t0) == NewClientCheck::Allowed));
        assert_eq!(l.tracked(), 0, "nothing remembered for exempt sources");
        let _a = l.connect(ip("10.0.0.1")).unwrap();
        assert!(l.connect(ip("10.0.0.1")).is_err());
        drop(slots);
    }

    #[test]
    fn zero_means_no_connection_limit() {
        let l = EdgeLimiter::new(limits(0, 0.0, 1));
        let slots: Vec<_> = (0..1000)
            .map(|_| l.connect(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(slots.len(), 1000);
    }

    /// Runs the two-step check the way the listener does; `known` answers the look-up.
    fn check(l: &EdgeLimiter, src: &str, known: bool, now: Instant) -> Result<(), Refusal> {
        match l.new_client(ip(src), now) {
            NewClientCheck::Allowed => Ok(()),
            NewClientCheck::LookUp => l.new_client_after_lookup(ip(src), known, now),
        }
    }

    #[test]
    fn new_clients_are_limited_to_burst_then_rate() {
        let l = EdgeLimiter::new(limits(0, 2.0, 10));
        let t0 = Instant::now();
        let allowed = (0..100)
            .filter(|_| check(&l, "10.0.0.1", false, t0).is_ok())
            .count();
        assert_eq!(allowed, 10, "the burst");
        // Another source has its own bucket.
        assert!(check(&l, "10.0.0.2", false, t0).is_ok());
        // Two tokens per second come back.
        let t1 = t0 + Duration::from_secs(3);
        let allowed = (0..100)
            .filter(|_| check(&l, "10.0.0.1", false, t1).is_ok())
            .count();
        assert_eq!(allowed, 6);
        // The bucket never holds more than the burst.
        let t2 = t1 + Duration::from_secs(3600);
        let allowed = (0..100)
            .filter(|_| check(&l, "10.0.0.1", false, t2).is_ok())
            .count();
        assert_eq!(allowed, 10);
    }

    #[test]
    fn known_clients_always_pass_and_only_busy_sources_look_up() {
        let l = EdgeLimiter::new(limits(0, 1.0, 10));
        let t0 = Instant::now();
        // A quiet source: no look-up for the first half of the bucket.
        for _ in 0..5 {
            assert_eq!(l.new_client(ip("10.0.0.1"), t0), NewClientCheck::Allowed);
        }
        assert_eq!(l.new_client(ip("10.0.0.1"), t0), NewClientCheck::LookUp);
        // Drain the rest with new clients.
        while check(&l, "10.0.0.1", false, t0).is_ok() {}
        assert_eq!(check(&l, "10.0.0.1", false, t0), Err(Refusal::NewClients));
        // Renewals of registered clients are never refused.
        for _ in 0..100 {
            assert_eq!(check(&l, "10.0.0.1", true, t0), Ok(()));
        }
    }

    #[test]
    fn zero_rate_means_no_new_client_limit() {
        let l = EdgeLimiter::new(limits(0, 0.0, 1));
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| l.new_client(ip("10.0.0.1"), t0) == NewClientCheck::Allowed));
    }

    #[test]
    fn sweep_forgets_idle_sources_and_keeps_busy_ones() {
        let l = EdgeLimiter::new(limits(5, 1.0, 10));
        let t0 = Instant::now();
        let slot = l.connect_at(ip("10.0.0.1"), t0).unwrap();
        let _ = check(&l, "10.0.0.2", false, t0);
        let _ = l.connect_at(ip("10.0.0.3"), t0).map(drop);
        assert_eq!(l.tracked(), 3);
        l.sweep(t0);
        // .1 has a connection, .2 a partly empty bucket, .3 nothing.
        assert_eq!(l.tracked(), 2);
        l.sweep(t0 + Duration::from_secs(60));
        assert_eq!(l.tracked(), 1);
        drop(slot);
        l.sweep(t0 + Duration::from_secs(60));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn a_full_table_shares_one_overflow_entry() {
        let mut lim = limits(2, 0.0, 1);
        lim.max_sources = 2;
        let l = EdgeLimiter::new(lim);
        let _a = l.connect(ip("10.0.0.1")).unwrap();
        let _b = l.connect(ip("10.0.0.2")).unwrap();
        // Table full: later sources share the overflow entry and its cap.
        let _c = l.connect(ip("10.0.0.3")).unwrap();
        let _d = l.connect(ip("10.0.0.4")).unwrap();
        assert!(l.connect(ip("10.0.0.5")).is_err());
        // Known sources keep their own entry.
        assert!(l.connect(ip("10.0.0.1")).is_ok());
        assert_eq!(l.tracked(), 3);
    }

    #[test]
    fn reports_are_throttled_and_carry_the_count() {
        let l = EdgeLimiter::new(limits(1, 1.0, 1));
        let r = RefusalReporter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let first = r.refused(&l, Refusal::Connections, t0).unwrap();
        assert_eq!(first.count, 1);
        for _ in 0..999 {
            assert!(r
                .refused(&l, Refusal::Connections, t0 + Duration::from_secs(1))
                .is_none());
        }
        // Another reason has its own period.
        assert!(r.refused(&l, Refusal::NewClients, t0).is_some());
        let next = r
            .refused(&l, Refusal::Connections, t0 + Duration::from_secs(11))
            .unwrap();
        assert_eq!(next.count, 1000);
    }
}
