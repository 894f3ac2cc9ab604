//! Client counting like a genuine KMS host: one CMID cache per application list, capacity
//! 2 × the largest N seen, entries forgotten after 30 days (protocol sheet section 8).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{UnixMillis, CMID_LIFETIME_MS};

/// Requests asking for a larger N are refused with 0x8007000D (anti-"overcharge").
pub const MAX_REQUIRED_CLIENT_COUNT: u32 = 1000;
/// Lists keyed by application ids the catalog does not know; more are refused so that junk
/// ids cannot create unbounded state.
pub const MAX_UNKNOWN_APPLICATION_LISTS: usize = 16;

/// The CMID list a request is counted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListKey {
    pub id: Uuid,
    /// Whether the catalog knows `id` as an application.
    pub known: bool,
}

/// Chooses the list for a request (with the replicated catalog): the request's application id
/// when the catalog knows it,
/// else the catalog application of its KMS id, else the request's application id (unknown).
pub fn application_list_in(
    catalog: Option<&kms_catalog::CatalogData>,
    application_id: &Uuid,
    kms_counted_id: &Uuid,
) -> ListKey {
    let Some(catalog) = catalog else {
        return ListKey {
            id: *application_id,
            known: false,
        };
    };
    if catalog.application(application_id).is_some() {
        return ListKey {
            id: *application_id,
            known: true,
        };
    }
    if let Some(item) = catalog.kms_item(kms_counted_id) {
        return ListKey {
            id: item.application_id,
            known: catalog.application(&item.application_id).is_some(),
        };
    }
    ListKey {
        id: *application_id,
        known: false,
    }
}

/// [`application_list_in`] with the compiled-in catalog, for callers outside `apply` that only
/// group requests (e.g. the queue of provisional answers); `apply` never uses it.
pub fn application_list(application_id: &Uuid, kms_counted_id: &Uuid) -> ListKey {
    let builtin = builtin_data();
    application_list_in(Some(builtin), application_id, kms_counted_id)
}

fn builtin_data() -> &'static kms_catalog::CatalogData {
    static BUILTIN: std::sync::OnceLock<kms_catalog::CatalogData> = std::sync::OnceLock::new();
    BUILTIN.get_or_init(kms_catalog::CatalogData::builtin)
}

/// Converts a FILETIME (100 ns since 1601) to Unix milliseconds; negative before 1970.
pub fn filetime_to_unix_ms(filetime: u64) -> i64 {
    // u64::MAX / 10_000 fits in i64, so neither step can overflow.
    (filetime / 10_000) as i64 - 11_644_473_600_000
}

/// One application's CMID cache: CMID → last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "CmidCacheRepr", into = "CmidCacheRepr")]
pub struct CmidCache {
    known: bool,
    max_n_seen: u32,
    entries: BTreeMap<Uuid, UnixMillis>,
    /// (last seen, CMID), oldest first: expiry and eviction without scanning. Derived from
    /// `entries`, so not serialized.
    by_age: BTreeSet<(UnixMillis, Uuid)>,
}

/// Serialized form of [`CmidCache`] (without the derived index).
#[derive(Clone, Serialize, Deserialize)]
struct CmidCacheRepr {
    known: bool,
    max_n_seen: u32,
    entries: BTreeMap<Uuid, UnixMillis>,
}

impl From<CmidCacheRepr> for CmidCache {
    fn from(repr: CmidCacheRepr) -> Self {
        let by_age = repr.entries.iter().map(|(c, t)| (*t, *c)).collect();
        Self {
            known: repr.known,
            max_n_seen: repr.max_n_seen,
            entries: repr.entries,
            by_age,
        }
    }
}

impl From<CmidCache> for CmidCacheRepr {
    fn from(cache: CmidCache) -> Self {
        Self {
            known: cache.known,
            max_n_seen: cache.max_n_seen,
            entries: cache.entries,
        }
    }
}

/// Whether an entry last seen at `last_seen` still counts at `now`.
fn is_live(last_seen: UnixMillis, now: UnixMillis) -> bool {
    last_seen.saturating_add(CMID_LIFETIME_MS) > now
}

impl CmidCache {
    /// An empty cache; `known` tells whether the catalog knows the list's application.
    pub fn new(known: bool) -> Self {
        Self {
            known,
            ..Self::default()
        }
    }

    /// Whether the list's application is known to the catalog.
    pub fn is_known(&self) -> bool {
        self.known
    }

    /// Largest N any request of this list asked for.
    pub fn max_n_seen(&self) -> u32 {
        self.max_n_seen
    }

    /// 2 × the largest N seen (at least 1, so the requester itself always fits).
    pub fn capacity(&self) -> u32 {
        self.max_n_seen.saturating_mul(2).max(1)
    }

    /// Stored entries, live or not yet purged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The latest time any stored CMID was seen.
    pub fn newest(&self) -> Option<UnixMillis> {
        self.by_age.last().map(|(t, _)| *t)
    }

    /// Last time `cmid` was seen, if it is stored.
    pub fn last_seen(&self, cmid: &Uuid) -> Option<UnixMillis> {
        self.entries.get(cmid).copied()
    }

    /// Live entries at `now`, without mutating.
    pub fn live_count(&self, now: UnixMillis) -> u32 {
        // by_age is sorted by last seen: the live ones are a suffix.
        let live = self
            .by_age
            .iter()
            .rev()
            .take_while(|(t, _)| is_live(*t, now))
            .count();
        u32::try_from(live).unwrap_or(u32::MAX)
    }

    /// Drops entries no longer live at `now`; returns how many.
    pub fn expire(&mut self, now: UnixMillis) -> usize {
        let mut dropped = 0;
        while let Some(&(t, cmid)) = self.by_age.first() {
            if is_live(t, now) {
                break;
            }
            self.by_age.pop_first();
            self.entries.remove(&cmid);
            dropped += 1;
        }
        dropped
    }

    fn remove(&mut self, cmid: &Uuid) -> bool {
        match self.entries.remove(cmid) {
            Some(t) => {
                self.by_age.remove(&(t, *cmid));
                true
            }
            None => false,
        }
    }

    fn touch(&mut self, cmid: Uuid, now: UnixMillis) {
        if let Some(old) = self.entries.insert(cmid, now) {
            self.by_age.remove(&(old, cmid));
        }
        self.by_age.insert((now, cmid));
    }

    /// Counts one request at `now` and returns the count to answer (includes the requester).
    ///
    /// `previous` (the client's former CMID, nil if none) is dropped so that a client that
    /// changed its CMID is counted once.
    pub fn record(
        &mut self,
        cmid: Uuid,
        previous: Uuid,
        required_client_count: u32,
        now: UnixMillis,
    ) -> u32 {
        self.expire(now);
        self.max_n_seen = self.max_n_seen.max(required_client_count);
        if !previous.is_nil() && previous != cmid {
            self.remove(&previous);
        }
        if !self.entries.contains_key(&cmid) {
            let capacity = usize::try_from(self.capacity()).unwrap_or(usize::MAX);
            // `while`, not `if`: a snapshot could hold more entries than the capacity.
            while self.entries.len() >= capacity {
                // Least recently seen, ties broken by CMID order (the set's order).
                let Some((t, oldest)) = self.by_age.pop_first() else {
                    break;
                };
                debug_assert_eq!(self.entries.get(&oldest), Some(&t));
                self.entries.remove(&oldest);
            }
        }
        // Present or newly admitted: a renewal refreshes the 30-day life.
        self.touch(cmid, now);
        u32::try_from(self.entries.len()).unwrap_or(u32::MAX)
    }
}

/// Why a request could not be counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CountError {
    #[error("too many unknown application ids")]
    TooManyUnknownApplications,
}

/// All CMID caches, one per application list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counting {
    lists: BTreeMap<Uuid, CmidCache>,
}

impl Counting {
    /// Checks that `list` can be counted (an existing list, a known one, or a free slot for
    /// another unknown list) without changing anything.
    pub fn check(&self, list: &ListKey) -> Result<(), CountError> {
        if list.known || self.lists.contains_key(&list.id) {
            return Ok(());
        }
        let unknown = self.lists.values().filter(|c| !c.known).count();
        if unknown >= MAX_UNKNOWN_APPLICATION_LISTS {
            return Err(CountError::TooManyUnknownApplications);
        }
        Ok(())
    }

    /// Counts one request in `list` (see [`CmidCache::record`]).
    pub fn record(
        &mut self,
        list: &ListKey,
        cmid: Uuid,
        previous: Uuid,
        required_client_count: u32,
        now: UnixMillis,
    ) -> Result<u32, CountError> {
        self.check(list)?;
        let cache = self
            .lists
            .entry(list.id)
            .or_insert_with(|| CmidCache::new(list.known));
        Ok(cache.record(cmid, previous, required_client_count, now))
    }

    /// The cache of one list.
    pub fn list(&self, id: &Uuid) -> Option<&CmidCache> {
        self.lists.get(id)
    }

    /// All lists, by id.
    pub fn lists(&self) -> impl Iterator<Item = (&Uuid, &CmidCache)> {
        self.lists.iter()
    }

    /// The latest time any stored CMID was seen, over all lists.
    pub fn newest(&self) -> Option<UnixMillis> {
        self.lists.values().filter_map(CmidCache::newest).max()
    }

    /// Live count of one list at `now` (0 for a list never seen).
    pub fn current_count(&self, id: &Uuid, now: UnixMillis) -> u32 {
        self.lists.get(id).map_or(0, |c| c.live_count(now))
    }

    /// Drops expired CMIDs everywhere; unknown lists left empty are removed so that their
    /// slots free up. Returns the number of CMIDs dropped.
    pub fn expire(&mut self, now: UnixMillis) -> usize {
        let dropped = self.lists.values_mut().map(|c| c.expire(now)).sum();
        self.lists.retain(|_, c| c.known || !c.is_empty());
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DAY_MS;

    fn cmid(n: u128) -> Uuid {
        Uuid::from_u128(0x1000_0000_0000_0000_0000_0000_0000_0000 + n)
    }

    const T0: UnixMillis = 1_700_000_000_000;

    #[test]
    fn first_client_counts_one_and_same_cmid_does_not_grow() {
        let mut c = CmidCache::new(true);
        assert_eq!(c.record(cmid(1), Uuid::nil(), 25, T0), 1);
        assert_eq!(c.record(cmid(1), Uuid::nil(), 25, T0 + 1), 1);
        assert_eq!(c.record(cmid(1), Uuid::nil(), 25, T0 + 2), 1);
        assert_eq!(c.record(cmid(2), Uuid::nil(), 25, T0 + 3), 2);
        assert_eq!(c.record(cmid(1), Uuid::nil(), 25, T0 + 4), 2);
    }

    #[test]
    fn sixty_windows_clients_cap_at_fifty() {
        let mut c = CmidCache::new(true);
        let counts: Vec<u32> = (0..60)
            .map(|i| c.record(cmid(i), Uuid::nil(), 25, T0 + i as u64))
            .collect();
        let expected: Vec<u32> = (1..=50).chain([50; 10]).collect();
        assert_eq!(counts, expected);
        assert_eq!(c.capacity(), 50);
        assert_eq!(c.len(), 50);
        // The ten least recently seen were evicted.
        for i in 0..10 {
            assert_eq!(c.last_seen(&cmid(i)), None, "cmid {i} should be evicted");
        }
        for i in 10..60 {
            assert!(c.last_seen(&cmid(i)).is_some(), "cmid {i} should remain");
        }
    }

    #[test]
    fn eviction_takes_least_recently_seen_not_first_inserted() {
        let mut c = CmidCache::new(true);
        for i in 0..10 {
            c.record(cmid(i), Uuid::nil(), 5, T0 + i as u64);
        }
        // cmid 0 renews: now cmid 1 is the oldest.
        c.record(cmid(0), Uuid::nil(), 5, T0 + 100);
        assert_eq!(c.record(cmid(50), Uuid::nil(), 5, T0 + 101), 10);
        assert!(c.last_seen(&cmid(0)).is_some());
        assert_eq!(c.last_seen(&cmid(1)), None);
    }

    #[test]
    fn eviction_ties_broken_by_cmid_order() {
        let mut c = CmidCache::new(true);
        // Same timestamp, inserted in reverse CMID order.
        for i in (0..10).rev() {
            c.record(cmid(i), Uuid::nil(), 5, T0);
        }
        c.record(cmid(99), Uuid::nil(), 5, T0);
        assert_eq!(c.last_seen(&cmid(0)), None, "smallest CMID goes first");
        assert!(c.last_seen(&cmid(9)).is_some());
    }

    #[test]
    fn server_only_host_grows_when_a_client_os_appears() {
        let mut c = CmidCache::new(true);
        let mut t = T0;
        let mut last = 0;
        for i in 0..12 {
            t += 1;
            last = c.record(cmid(i), Uuid::nil(), 5, t);
        }
        assert_eq!(last, 10);
        assert_eq!(c.capacity(), 10);
        // A Windows client OS (N = 25) raises the capacity to 50.
        t += 1;
        assert_eq!(c.record(cmid(100), Uuid::nil(), 25, t), 11);
        assert_eq!(c.capacity(), 50);
        for i in 0..20 {
            t += 1;
            last = c.record(cmid(200 + i), Uuid::nil(), 5, t);
        }
        assert_eq!(last, 31, "servers keep counting past 10 after the raise");
        // The capacity never shrinks.
        assert_eq!(c.capacity(), 50);
        assert_eq!(c.max_n_seen(), 25);
    }

    #[test]
    fn entries_expire_after_thirty_days_and_renewal_refreshes() {
        let mut c = CmidCache::new(true);
        for i in 0..5 {
            c.record(cmid(i), Uuid::nil(), 25, T0);
        }
        // Day 29: cmid 0 renews; the others are not seen again.
        assert_eq!(c.record(cmid(0), Uuid::nil(), 25, T0 + 29 * DAY_MS), 5);
        assert_eq!(c.live_count(T0 + 30 * DAY_MS - 1), 5);
        // Exactly 30 days after their last sighting the other four stop counting.
        assert_eq!(c.live_count(T0 + 30 * DAY_MS), 1);
        assert_eq!(c.record(cmid(9), Uuid::nil(), 25, T0 + 30 * DAY_MS), 2);
        assert_eq!(c.len(), 2);
        // And cmid 0 expires 30 days after its renewal.
        assert_eq!(c.live_count(T0 + 59 * DAY_MS), 1);
        assert_eq!(c.live_count(T0 + 60 * DAY_MS), 0);
    }

    #[test]
    fn expired_cmid_comes_back_as_new() {
        let mut c = CmidCache::new(true);
        c.record(cmid(1), Uuid::nil(), 25, T0);
        c.record(cmid(2), Uuid::nil(), 25, T0 + DAY_MS);
        assert_eq!(c.record(cmid(1), Uuid::nil(), 25, T0 + 31 * DAY_MS), 1);
        assert_eq!(c.expire(T0 + 31 * DAY_MS), 0, "record already purged");
    }

    #[test]
    fn previous_cmid_is_replaced() {
        let mut c = CmidCache::new(true);
        c.record(cmid(1), Uuid::nil(), 25, T0);
        c.record(cmid(2), Uuid::nil(), 25, T0);
        assert_eq!(c.record(cmid(3), cmid(1), 25, T0 + 1), 2);
        assert_eq!(c.last_seen(&cmid(1)), None);
        // An unknown previous CMID changes nothing.
        assert_eq!(c.record(cmid(4), cmid(77), 25, T0 + 2), 3);
        // Previous == current is a plain renewal.
        assert_eq!(c.record(cmid(4), cmid(4), 25, T0 + 3), 3);
    }

    #[test]
    fn n_zero_still_counts_the_requester() {
        let mut c = CmidCache::new(true);
        assert_eq!(c.capacity(), 1);
        assert_eq!(c.record(cmid(1), Uuid::nil(), 0, T0), 1);
        assert_eq!(c.record(cmid(2), Uuid::nil(), 0, T0), 1);
    }

    #[test]
    fn live_count_does_not_mutate() {
        let mut c = CmidCache::new(true);
        c.record(cmid(1), Uuid::nil(), 25, T0);
        let before = c.clone();
        assert_eq!(c.live_count(T0 + 40 * DAY_MS), 0);
        assert_eq!(c, before);
    }

    #[test]
    fn unknown_lists_are_limited() {
        let mut counting = Counting::default();
        for i in 0..MAX_UNKNOWN_APPLICATION_LISTS as u128 {
            let list = ListKey {
                id: Uuid::from_u128(0xAA00 + i),
                known: false,
            };
            assert_eq!(counting.record(&list, cmid(1), Uuid::nil(), 5, T0), Ok(1));
        }
        let extra = ListKey {
            id: Uuid::from_u128(0xBB00),
            known: false,
        };
        assert_eq!(
            counting.record(&extra, cmid(1), Uuid::nil(), 5, T0),
            Err(CountError::TooManyUnknownApplications)
        );
        assert!(counting.list(&extra.id).is_none());
        // Existing unknown lists and known lists still work.
        let existing = ListKey {
            id: Uuid::from_u128(0xAA00),
            known: false,
        };
        assert_eq!(
            counting.record(&existing, cmid(2), Uuid::nil(), 5, T0),
            Ok(2)
        );
        let known = ListKey {
            id: Uuid::from_u128(0xCC00),
            known: true,
        };
        assert_eq!(counting.record(&known, cmid(2), Uuid::nil(), 5, T0), Ok(1));
        // After 30 days the empty unknown lists are dropped and the slot frees up.
        assert_eq!(counting.expire(T0 + 30 * DAY_MS), 16 + 1 + 1);
        assert!(counting.list(&known.id).is_some(), "known lists stay");
        assert_eq!(
            counting.record(&extra, cmid(1), Uuid::nil(), 5, T0 + 30 * DAY_MS),
            Ok(1)
        );
    }

    #[test]
    fn lists_are_independent() {
        let mut counting = Counting::default();
        let win = ListKey {
            id: Uuid::from_u128(1),
            known: true,
        };
        let office = ListKey {
            id: Uuid::from_u128(2),
            known: true,
        };
        for i in 0..7 {
            counting.record(&win, cmid(i), Uuid::nil(), 25, T0).ok();
        }
        assert_eq!(counting.record(&office, cmid(0), Uuid::nil(), 5, T0), Ok(1));
        assert_eq!(counting.current_count(&win.id, T0), 7);
        assert_eq!(counting.current_count(&office.id, T0), 1);
        assert_eq!(counting.current_count(&Uuid::from_u128(3), T0), 0);
    }

    #[test]
    fn cache_serde_roundtrip_rebuilds_index() {
        let mut c = CmidCache::new(true);
        for i in 0..20 {
            c.record(cmid(i), Uuid::nil(), 5, T0 + (i as u64 % 3));
        }
        let bytes = postcard::to_allocvec(&c).unwrap();
        let back: CmidCache = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, c);
        let mut a = c.clone();
        let mut b = back;
        assert_eq!(
            a.record(cmid(500), Uuid::nil(), 5, T0 + 10),
            b.record(cmid(500), Uuid::nil(), 5, T0 + 10)
        );
        assert_eq!(a, b);
    }

    #[test]
    fn filetime_conversion() {
        // 2020-01-01T00:00:00Z = 1577836800000 ms = FILETIME 132223104000000000.
        assert_eq!(
            filetime_to_unix_ms(132_223_104_000_000_000),
            1_577_836_800_000
        );
        assert_eq!(filetime_to_unix_ms(0), -11_644_473_600_000);
        assert!(filetime_to_unix_ms(u64::MAX) > 0);
    }
}
