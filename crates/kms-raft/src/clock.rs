//! Clock-safe cluster time: the time a leader stamps into the commands it proposes.
//!
//! `apply` expires CMIDs (30 days) and registry entries against the time carried in the
//! log, so a leader whose wall clock jumps 40 days forward would expire every client on every
//! node, and a clock that goes back would make entries look newer than they are. The
//! [`ClusterClock`] stamps
//!
//! ```text
//! stamp   = max(floor, min(wall, ceiling))
//! floor   = max(last replicated time, last stamp)                  -- never backwards
//! ceiling = min(wall anchor + monotonic time since it + allowance,
//!               replicated anchor + monotonic time since it + max_offset)
//! ```
//!
//! Two anchors, each a (time, monotonic instant) pair projected forward with the monotonic
//! clock:
//! * the *wall anchor* is where this process last trusted its wall clock. It follows the wall
//!   clock while the two agree within the allowance (and slews towards a wall clock ahead of
//!   it by at most [`ClockConfig::slew_per_mille`] of the real time elapsed, while the gap is
//!   under `max_offset`). Stamps never move it, so the allowance cannot accumulate however
//!   often a leader stamps. A wall clock stepped far forward is ignored: the stamps keep
//!   following the monotonic clock. One stepped back leaves the stamps at the floor.
//! * the *replicated anchor* is the last replicated time seen ahead of its own projection:
//!   the cluster's time, carried forward by real elapsed time. A process that starts with a
//!   wall clock far ahead of it (a bad NTP source at boot, a restored VM) cannot stamp more
//!   than `max_offset` beyond it. Its own stamps held back by that bound do not move the
//!   anchor when they come back through the log (else the bound would creep up by
//!   `max_offset` per round trip).
//!
//! [`ClusterClock::reading`] gives the offset: the wall clock minus the cluster time (the
//! replicated anchor's projection, or the stamp when nothing was replicated yet). A node whose
//! offset exceeds [`ClockConfig::max_offset`] either way is not [`ClockReading::fit_to_lead`]:
//! it should say so (log, metric `kms_clock_offset_seconds` via [`ClusterClock::publish`],
//! `/readyz` reason) and not stand as leader.
//!
//! Limit (by design: a node cannot tell a wrong clock from elapsed time on its own): after the
//! whole cluster was down for longer than `max_offset`, every node sees its wall clock ahead
//! of the replicated time by the downtime. The operator (or a majority of peers agreeing on
//! the wall time) confirms the wall clock with [`ClusterClock::accept_wall_clock`]. Every
//! operation is O(1) under a short mutex; nothing here does I/O.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_core::UnixMillis;

/// Where the clock reads the time (injectable for tests).
pub trait TimeSource: Send + Sync + 'static {
    /// Wall clock, milliseconds since the Unix epoch.
    fn wall_ms(&self) -> UnixMillis;
    /// Monotonic clock: time since an arbitrary fixed origin; never goes back.
    fn mono(&self) -> Duration;
}

/// The system clocks: `SystemTime` and `Instant`.
#[derive(Debug, Clone, Copy)]
pub struct SystemTimeSource {
    origin: Instant,
}

impl Default for SystemTimeSource {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl TimeSource for SystemTimeSource {
    fn wall_ms(&self) -> UnixMillis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn mono(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A hand-driven clock for tests: both clocks move with [`ManualTime::advance`]; the wall
/// clock alone with [`ManualTime::set_wall`] / [`ManualTime::jump_wall`].
#[derive(Debug, Clone, Default)]
pub struct ManualTime(Arc<Mutex<(UnixMillis, Duration)>>);

impl ManualTime {
    pub fn new(wall_ms: UnixMillis) -> Self {
        Self(Arc::new(Mutex::new((wall_ms, Duration::ZERO))))
    }

    fn lock(&self) -> MutexGuard<'_, (UnixMillis, Duration)> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Real time passes: both clocks move by `d`.
    pub fn advance(&self, d: Duration) {
        let mut t = self.lock();
        t.0 = t.0.saturating_add(millis(d));
        t.1 = t.1.saturating_add(d);
    }

    /// The wall clock is set (a step by NTP, a VM restore, an operator); monotonic unchanged.
    pub fn set_wall(&self, wall_ms: UnixMillis) {
        self.lock().0 = wall_ms;
    }

    /// The wall clock steps by `delta_ms` (negative: back).
    pub fn jump_wall(&self, delta_ms: i64) {
        let mut t = self.lock();
        t.0 = t.0.saturating_add_signed(delta_ms);
    }
}

impl TimeSource for ManualTime {
    fn wall_ms(&self) -> UnixMillis {
        self.lock().0
    }

    fn mono(&self) -> Duration {
        self.lock().1
    }
}

/// Tuning of a [`ClusterClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockConfig {
    /// How far a stamp may run ahead of the anchor beyond the monotonic time elapsed, and
    /// how far the wall clock may disagree with the monotonic clock and still move the anchor
    /// (NTP slewing, scheduling delays). Default 1 s.
    pub allowance: Duration,
    /// A node whose wall clock is further than this from the cluster time (either way) is not
    /// fit to lead. Default 30 s.
    pub max_offset: Duration,
    /// How fast the wall anchor may catch up with a wall clock ahead of it by more than the
    /// allowance but less than `max_offset` (a legitimate NTP step), in thousandths of the
    /// real time elapsed. Default 10 (1%: a 5 s step is absorbed in about 8 minutes).
    pub slew_per_mille: u32,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            allowance: Duration::from_secs(1),
            max_offset: Duration::from_secs(30),
            slew_per_mille: 10,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A cluster time this process trusts, and the monotonic instant it held at.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    at: UnixMillis,
    mono: Duration,
}

impl Anchor {
    /// Where the anchor says the cluster time is at `mono`.
    fn project(&self, mono: Duration) -> UnixMillis {
        self.at
            .saturating_add(millis(mono.saturating_sub(self.mono)))
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Where this process last trusted its wall clock.
    wall_anchor: Option<Anchor>,
    /// The last replicated time seen ahead of its own projection.
    rep_anchor: Option<Anchor>,
    /// Largest time seen in the applied state.
    replicated: Option<UnixMillis>,
    /// Largest time this clock stamped.
    last_stamp: Option<UnixMillis>,
    /// Largest stamp held back by the replicated anchor's bound: when it comes back through
    /// the log it must not move that anchor (the bound would creep up by `max_offset` on
    /// every round trip).
    last_capped: Option<UnixMillis>,
}

/// What [`ClusterClock::reading`] found (for logs, metrics and `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// This node's wall clock.
    pub wall: UnixMillis,
    /// The cluster time it would stamp now (without recording a stamp).
    pub cluster: UnixMillis,
    /// `wall - cluster` in milliseconds (positive: this node's clock is ahead).
    pub offset_ms: i64,
    /// `|offset| <= max_offset`.
    pub fit_to_lead: bool,
}

impl ClockReading {
    pub fn offset_seconds(&self) -> f64 {
        self.offset_ms as f64 / 1000.0
    }
}

/// The cluster time of one node (see the module docs). Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ClusterClock<S: TimeSource = SystemTimeSource> {
    source: S,
    config: ClockConfig,
    inner: Mutex<Inner>,
}

impl ClusterClock<SystemTimeSource> {
    /// A clock on the system clocks.
    pub fn system(config: ClockConfig) -> Self {
        Self::new(SystemTimeSource::default(), config)
    }
}

impl<S: TimeSource> ClusterClock<S> {
    pub fn new(source: S, config: ClockConfig) -> Self {
        Self {
            source,
            config,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn config(&self) -> ClockConfig {
        self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The fields stay consistent at every await-free step: a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the last replicated time of the applied state (call after every apply, and at
    /// start-up with the state loaded from the snapshot and log). Never moves time back.
    pub fn observe_replicated(&self, time: UnixMillis) {
        let mono = self.source.mono();
        let mut inner = self.lock();
        inner.replicated = Some(inner.replicated.map_or(time, |r| r.max(time)));
        let own_capped = inner.last_capped.is_some_and(|c| time <= c);
        if !own_capped && inner.rep_anchor.is_none_or(|a| time > a.project(mono)) {
            inner.rep_anchor = Some(Anchor { at: time, mono });
        }
    }

    /// The operator (or the peers) confirmed this node's wall clock: both anchors move to it.
    /// Stamps still never go below the replicated time or an earlier stamp.
    pub fn accept_wall_clock(&self) {
        let (wall, mono) = (self.source.wall_ms(), self.source.mono());
        let mut inner = self.lock();
        inner.wall_anchor = Some(Anchor { at: wall, mono });
        inner.rep_anchor = Some(Anchor { at: wall, mono });
    }

    /// The cluster time now (and whether the replicated anchor's bound held it back); moves
    /// the wall anchor if the wall clock agrees with it.
    fn compute(&self, inner: &mut Inner) -> (ClockReading, bool) {
        let (wall, mono) = (self.source.wall_ms(), self.source.mono());
        let allowance = millis(self.config.allowance);
        let max_offset = millis(self.config.max_offset);
        let wall_anchor = match inner.wall_anchor {
            // The first reading of this process: the wall clock is all there is (the
            // replicated anchor bounds what it can do).
            None => Anchor { at: wall, mono },
            Some(anchor) => {
                let projected = anchor.project(mono);
                if wall.abs_diff(projected) <= allowance {
                    // The wall clock agrees with real elapsed time: follow it.
                    Anchor { at: wall, mono }
                } else if wall > projected && wall - projected <= max_offset {
                    // A moderate step forward: catch up slowly.
                    let elapsed = millis(mono.saturating_sub(anchor.mono));
                    let slew = elapsed.saturating_mul(u64::from(self.config.slew_per_mille)) / 1000;
                    if slew == 0 {
                        anchor
                    } else {
                        Anchor {
                            at: projected.saturating_add(slew.min(wall - projected)),
                            mono,
                        }
                    }
                } else {
                    anchor
                }
            }
        };
        inner.wall_anchor = Some(wall_anchor);
        let wall_ceiling = wall_anchor.project(mono).saturating_add(allowance);
        let rep_ceiling = inner
            .rep_anchor
            .map_or(u64::MAX, |rep| rep.project(mono).saturating_add(max_offset));
        let floor = inner.replicated.max(inner.last_stamp).unwrap_or(0);
        let cluster = wall.min(wall_ceiling).min(rep_ceiling).max(floor);
        let rep_capped = rep_ceiling < wall.min(wall_ceiling) && cluster == rep_ceiling;
        let reference = inner.rep_anchor.map_or(cluster, |rep| rep.project(mono));
        let offset_ms = i64::try_from(i128::from(wall) - i128::from(reference)).unwrap_or(i64::MAX);
        let reading = ClockReading {
            wall,
            cluster,
            offset_ms,
            fit_to_lead: offset_ms.unsigned_abs() <= max_offset,
        };
        (reading, rep_capped)
    }

    /// The time to stamp into a command proposed now. Never less than an earlier stamp or
    /// the replicated time; never ahead of the anchor by more than the real time elapsed plus
    /// the allowance.
    pub fn stamp(&self) -> UnixMillis {
        let mut inner = self.lock();
        let (reading, rep_capped) = self.compute(&mut inner);
        inner.last_stamp = Some(reading.cluster);
        if rep_capped {
            inner.last_capped = Some(reading.cluster);
        }
        reading.cluster
    }

    /// Wall clock, cluster time and their offset now, without stamping.
    pub fn reading(&self) -> ClockReading {
        let mut inner = self.lock();
        self.compute(&mut inner).0
    }

    /// `wall - cluster time` now, in seconds (the `kms_clock_offset_seconds` gauge).
    pub fn offset_seconds(&self) -> f64 {
        self.reading().offset_seconds()
    }

    /// Whether this node's wall clock is close enough to the cluster time to stand as leader.
    pub fn fit_to_lead(&self) -> bool {
        self.reading().fit_to_lead
    }

    /// Sets the `kms_clock_offset_seconds` gauge and returns the reading.
    pub fn publish(&self) -> ClockReading {
        let reading = self.reading();
        metrics::gauge!("kms_clock_offset_seconds").set(reading.offset_seconds());
        reading
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMillis = 1_780_000_000_000;
    const DAY_MS: i64 = 86_400_000;

    fn clock() -> (ManualTime, ClusterClock<ManualTime>) {
        let time = ManualTime::new(T0);
        (
            time.clone(),
            ClusterClock::new(time, ClockConfig::default()),
        )
    }

    #[test]
    fn follows_a_good_wall_clock() {
        let (time, clock) = clock();
        assert_eq!(clock.stamp(), T0);
        time.advance(Duration::from_millis(1500));
        assert_eq!(clock.stamp(), T0 + 1500);
        // Small disagreements (NTP slewing) are followed.
        time.jump_wall(300);
        assert_eq!(clock.stamp(), T0 + 1800);
        let reading = clock.reading();
        assert_eq!(reading.offset_ms, 0);
        assert!(reading.fit_to_lead);
    }

    #[test]
    fn forty_day_forward_jump_moves_stamps_only_by_real_elapsed_time() {
        let (time, clock) = clock();
        clock.observe_replicated(T0 - 5_000);
        let before = clock.stamp();
        assert_eq!(before, T0);
        time.jump_wall(40 * DAY_MS);
        let mut last = before;
        // Ten real seconds of stamping, a thousand stamps per second, each coming back
        // through the log (this node leads): no creep.
        for _ in 0..10_000 {
            time.advance(Duration::from_millis(1));
            let s = clock.stamp();
            assert!(s >= last, "stamps never go back");
            clock.observe_replicated(s);
            last = s;
        }
        let allowance = millis(ClockConfig::default().allowance);
        assert!(
            last <= before + 10_000 + allowance,
            "stamp moved {} ms in 10 s of real time",
            last - before
        );
        let reading = clock.reading();
        assert!(reading.offset_ms >= 40 * DAY_MS - 2_000, "{reading:?}");
        assert!(!reading.fit_to_lead);
        assert!(reading.offset_seconds() > 39.0 * 86_400.0);
        // Stamps keep following real time, not the bad wall clock.
        time.advance(Duration::from_secs(60));
        assert!(clock.stamp() <= before + 70_000 + allowance);
        // The operator confirms the clock: the node follows it again.
        clock.accept_wall_clock();
        assert_eq!(clock.stamp(), clock.reading().wall);
        assert!(clock.fit_to_lead());
    }

    #[test]
    fn backward_jump_never_makes_stamps_go_backwards() {
        let (time, clock) = clock();
        time.advance(Duration::from_secs(10));
        let before = clock.stamp();
        time.jump_wall(-3 * DAY_MS);
        let mut last = before;
        for _ in 0..100 {
            time.advance(Duration::from_millis(100));
            let s = clock.stamp();
            assert!(s >= last, "{s} < {last}");
            last = s;
        }
        assert_eq!(last, before, "stamps wait at the floor for the wall clock");
        let reading = clock.reading();
        assert!(reading.offset_ms <= -3 * DAY_MS + 20_000, "{reading:?}");
        assert!(!reading.fit_to_lead);
        // A replicated time from the cluster is a floor as well.
        clock.observe_replicated(before + 50_000);
        assert_eq!(clock.stamp(), before + 50_000);
    }

    #[test]
    fn replicated_time_ahead_becomes_the_floor_and_the_anchor() {
        let (time, clock) = clock();
        assert_eq!(clock.stamp(), T0);
        // Another leader stamped 20 s ahead of this node's clock.
        clock.observe_replicated(T0 + 20_000);
        assert_eq!(clock.stamp(), T0 + 20_000);
        let reading = clock.reading();
        assert_eq!(reading.offset_ms, -20_000);
        assert!(reading.fit_to_lead);
        time.advance(Duration::from_secs(5));
        // The wall is still behind the projection: stamps stay at the floor.
        assert_eq!(clock.stamp(), T0 + 20_000);
        // Old replicated times change nothing.
        clock.observe_replicated(T0);
        assert_eq!(clock.stamp(), T0 + 20_000);
    }

    #[test]
    fn a_node_started_with_a_clock_far_ahead_is_not_fit_to_lead() {
        let time = ManualTime::new(T0 + 40 * DAY_MS as u64);
        let config = ClockConfig {
            allowance: Duration::from_millis(500),
            max_offset: Duration::from_secs(10),
            ..ClockConfig::default()
        };
        let clock = ClusterClock::new(time.clone(), config);
        // Start-up: the state loaded from disk says the cluster was at T0.
        clock.observe_replicated(T0);
        let reading = clock.reading();
        assert!(!reading.fit_to_lead);
        assert!(reading.offset_ms > 39 * DAY_MS);
        // Stamps stay within max_offset of the replicated time carried by real time.
        assert_eq!(clock.stamp(), T0 + 10_000);
        time.advance(Duration::from_secs(2));
        assert_eq!(clock.stamp(), T0 + 12_000);
        assert_eq!(clock.config(), config);
        // As leader, its own stamps come back through the log: they must not lift the bound.
        let mut last = 0;
        for _ in 0..10_000 {
            time.advance(Duration::from_millis(1));
            last = clock.stamp();
            clock.observe_replicated(last);
        }
        assert!(
            last <= T0 + 10_000 + 12_000,
            "the bound crept {} ms ahead in 10 s",
            last - T0
        );
        assert!(!clock.fit_to_lead());
        // Another leader's later time is still followed.
        clock.observe_replicated(T0 + 3_600_000);
        let s = clock.stamp();
        assert!((T0 + 3_600_000..=T0 + 3_610_000).contains(&s), "{s}");
    }

    #[test]
    fn a_short_restart_follows_the_wall_clock_and_is_fit() {
        let (time, clock) = clock();
        // The state on disk was last stamped 8 s ago (the node was down meanwhile).
        clock.observe_replicated(T0 - 8_000);
        assert_eq!(clock.stamp(), T0);
        let reading = clock.reading();
        assert_eq!(reading.offset_ms, 8_000);
        assert!(reading.fit_to_lead);
        // Its own stamps come back through the log: the offset heals.
        clock.observe_replicated(T0);
        time.advance(Duration::from_secs(1));
        assert_eq!(clock.stamp(), T0 + 1_000);
        assert_eq!(clock.reading().offset_ms, 0);
    }

    #[test]
    fn a_moderate_step_forward_is_absorbed_slowly() {
        let (time, clock) = clock();
        assert_eq!(clock.stamp(), T0);
        time.jump_wall(5_000);
        let mut last = clock.stamp();
        assert_eq!(last, T0 + 1_000, "at most the allowance at once");
        for second in 1..=100u64 {
            time.advance(Duration::from_secs(1));
            let s = clock.stamp();
            // 1 s of real time plus at most 1% of it.
            assert!(
                s >= last && s <= last + 1_010,
                "second {second}: {s} after {last}"
            );
            last = s;
        }
        for _ in 0..500 {
            time.advance(Duration::from_secs(1));
            last = clock.stamp();
        }
        assert_eq!(last, clock.reading().wall, "caught up after 600 s");
    }

    #[test]
    fn system_clock_reads_now() {
        let clock = ClusterClock::system(ClockConfig::default());
        let a = clock.stamp();
        let b = clock.stamp();
        assert!(b >= a && a > T0 - 365 * DAY_MS as u64);
        assert!(clock.publish().fit_to_lead);
    }
}
