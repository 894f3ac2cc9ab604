//! The client registry: every client that was granted, per application list and CMID, for the
//! operator's inventory. Unlike the CMID caches it does not influence counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ActivationRequest, UnixMillis};

/// Hard bound on registered clients, so a flood of invented CMIDs cannot exhaust memory
/// (about 280 bytes per client: 20 million is about 5.6 GB; see docs/capacity.md). When
/// full, the least recently seen clients make room.
pub const MAX_CLIENTS: usize = 20_000_000;

/// Clients evicted at once when a registry bounded by `max` is full (0.1%), so the scan
/// that finds them is amortised.
fn eviction_batch(max: usize) -> usize {
    (max / 1000).max(1)
}
/// Workstation names longer than this (in characters) are cut; the wire allows 63.
pub const MAX_WORKSTATION_CHARS: usize = 64;
/// Page size of [`ClientQuery::default`].
pub const DEFAULT_PAGE_LIMIT: usize = 100;

/// What the registry remembers about one client of one application list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub cmid: Uuid,
    /// Application id of the latest request (normally the list id).
    pub application_id: Uuid,
    pub sku_id: Uuid,
    pub kms_counted_id: Uuid,
    pub workstation: Box<str>,
    /// Wire license status of the latest request (0..=6).
    pub license_status: u32,
    /// KMS protocol (major, minor) of the latest request.
    pub protocol: (u16, u16),
    pub last_address: Option<SocketAddr>,
    pub is_vm: bool,
    pub first_seen: UnixMillis,
    pub last_seen: UnixMillis,
    /// Granted requests from this client (saturating).
    pub request_count: u32,
    /// Count answered to the latest request.
    pub last_count: u32,
    /// Whether the latest answer activated the client (count >= its N).
    pub last_result_activated: bool,
}

/// Filter and page for [`Registry::query`]. Results are sorted by `last_seen`, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientQuery {
    /// Request application id (matches [`ClientRecord::application_id`]).
    pub application_id: Option<Uuid>,
    pub kms_counted_id: Option<Uuid>,
    pub sku_id: Option<Uuid>,
    /// Only clients with `last_seen >= since`.
    pub since: Option<UnixMillis>,
    pub offset: usize,
    pub limit: usize,
}

impl Default for ClientQuery {
    fn default() -> Self {
        Self {
            application_id: None,
            kms_counted_id: None,
            sku_id: None,
            since: None,
            offset: 0,
            limit: DEFAULT_PAGE_LIMIT,
        }
    }
}

impl ClientQuery {
    fn matches(&self, r: &ClientRecord) -> bool {
        self.application_id.is_none_or(|id| r.application_id == id)
            && self.kms_counted_id.is_none_or(|id| r.kms_counted_id == id)
            && self.sku_id.is_none_or(|id| r.sku_id == id)
            && self.since.is_none_or(|t| r.last_seen >= t)
    }
}

/// One page of query results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientPage {
    /// Matching clients before paging.
    pub total: usize,
    pub clients: Vec<ClientRecord>,
}

/// Registered clients keyed by (application list, CMID).
///
/// No secondary index by age: it would cost about a fifth of the memory per client, and the
/// operations that need age order (retention, eviction when full, paging) are rare enough
/// to scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RegistryRepr", into = "RegistryRepr")]
pub struct Registry {
    lists: BTreeMap<Uuid, BTreeMap<Uuid, ClientRecord>>,
    /// Total entries over all lists (derived, not serialized).
    len: usize,
}

#[derive(Clone, Serialize, Deserialize)]
struct RegistryRepr {
    lists: BTreeMap<Uuid, BTreeMap<Uuid, ClientRecord>>,
}

impl From<RegistryRepr> for Registry {
    fn from(repr: RegistryRepr) -> Self {
        let mut lists = repr.lists;
        // A record's CMID must match its key; drop inconsistent ones from foreign snapshots.
        for clients in lists.values_mut() {
            clients.retain(|cmid, r| r.cmid == *cmid);
        }
        lists.retain(|_, clients| !clients.is_empty());
        let len = lists.values().map(BTreeMap::len).sum();
        Self { lists, len }
    }
}

impl From<Registry> for RegistryRepr {
    fn from(registry: Registry) -> Self {
        Self {
            lists: registry.lists,
        }
    }
}

/// Age order key: oldest first, ties by list then CMID, so every node picks the same clients.
type AgeKey = (UnixMillis, Uuid, Uuid);

fn truncate_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => s.get(..end).unwrap_or(s),
        None => s,
    }
}

/// Copies the facts of a granted request into its client's record.
fn update(
    r: &mut ClientRecord,
    request: &ActivationRequest,
    workstation: &str,
    now: UnixMillis,
    count: u32,
    activated: bool,
) {
    if *r.workstation != *workstation {
        r.workstation = workstation.into();
    }
    r.application_id = request.application_id;
    r.sku_id = request.sku_id;
    r.kms_counted_id = request.kms_counted_id;
    r.license_status = request.license_status;
    r.protocol = (request.protocol_major, request.protocol_minor);
    r.last_address = request.client_address;
    r.is_vm = request.is_client_vm;
    r.first_seen = r.first_seen.min(now);
    r.last_seen = now;
    r.request_count = r.request_count.saturating_add(1);
    r.last_count = count;
    r.last_result_activated = activated;
}

impl Registry {
    /// Number of registered (list, CMID) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The record of `cmid` in `list`.
    pub fn get(&self, list: &Uuid, cmid: &Uuid) -> Option<&ClientRecord> {
        self.lists.get(list)?.get(cmid)
    }

    /// Records of `cmid` in every list it appears in, by list id.
    pub fn by_cmid(&self, cmid: &Uuid) -> Vec<&ClientRecord> {
        self.lists.values().filter_map(|c| c.get(cmid)).collect()
    }

    /// Every record with its list id, by list then CMID.
    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &ClientRecord)> {
        self.lists
            .iter()
            .flat_map(|(list, clients)| clients.values().map(move |r| (list, r)))
    }

    fn remove(&mut self, list: &Uuid, cmid: &Uuid) -> Option<ClientRecord> {
        let clients = self.lists.get_mut(list)?;
        let record = clients.remove(cmid)?;
        if clients.is_empty() {
            self.lists.remove(list);
        }
        self.len = self.len.saturating_sub(1);
        Some(record)
    }

    /// Records a granted request at `now`, answered with `count`.
    ///
    /// A client that changed its CMID (`previous_client_machine_id`) keeps its history under
    /// the new CMID instead of appearing twice.
    pub fn record(
        &mut self,
        list: Uuid,
        request: &ActivationRequest,
        now: UnixMillis,
        count: u32,
        activated: bool,
    ) {
        self.record_within(list, request, now, count, activated, MAX_CLIENTS);
    }

    /// [`Registry::record`] with an explicit bound (tests use a small one).
    pub fn record_within(
        &mut self,
        list: Uuid,
        request: &ActivationRequest,
        now: UnixMillis,
        count: u32,
        activated: bool,
        max: usize,
    ) {
        let cmid = request.client_machine_id;
        let previous = request.previous_client_machine_id;
        let moved = if !previous.is_nil() && previous != cmid {
            self.remove(&list, &previous)
        } else {
            None
        };
        let workstation = truncate_chars(&request.workstation_name, MAX_WORKSTATION_CHARS);
        // Common case (a renewal): update in place.
        if let Some(r) = self.lists.get_mut(&list).and_then(|c| c.get_mut(&cmid)) {
            if let Some(old) = moved {
                // Both CMIDs were registered: merge the histories.
                r.first_seen = r.first_seen.min(old.first_seen);
                r.request_count = r.request_count.saturating_add(old.request_count);
            }
            update(r, request, workstation, now, count, activated);
            return;
        }
        if self.len >= max {
            self.evict_oldest(eviction_batch(max));
        }
        let mut record = match moved {
            Some(old) => ClientRecord { cmid, ..old },
            None => ClientRecord {
                cmid,
                application_id: request.application_id,
                sku_id: request.sku_id,
                kms_counted_id: request.kms_counted_id,
                workstation: workstation.into(),
                license_status: request.license_status,
                protocol: (request.protocol_major, request.protocol_minor),
                last_address: request.client_address,
                is_vm: request.is_client_vm,
                first_seen: now,
                last_seen: now,
                request_count: 0,
                last_count: count,
                last_result_activated: activated,
            },
        };
        update(&mut record, request, workstation, now, count, activated);
        self.lists.entry(list).or_default().insert(cmid, record);
        self.len += 1;
    }

    fn age_keys(&self) -> impl Iterator<Item = AgeKey> + '_ {
        self.iter().map(|(list, r)| (r.last_seen, *list, r.cmid))
    }

    /// Removes the `count` least recently seen clients.
    fn evict_oldest(&mut self, count: usize) {
        let mut keys: Vec<AgeKey> = self.age_keys().collect();
        if count < keys.len() {
            keys.select_nth_unstable(count);
            keys.truncate(count);
        }
        for (_, list, cmid) in keys {
            self.remove(&list, &cmid);
        }
    }

    /// Removes clients with `last_seen + retention_ms <= now`; returns how many.
    pub fn expire(&mut self, now: UnixMillis, retention_ms: u64) -> usize {
        let before = self.len;
        for clients in self.lists.values_mut() {
            clients.retain(|_, r| r.last_seen.saturating_add(retention_ms) > now);
        }
        self.lists.retain(|_, clients| !clients.is_empty());
        self.len = self.lists.values().map(BTreeMap::len).sum();
        before - self.len
    }

    /// Matching clients, newest `last_seen` first (ties: list id, then CMID, descending),
    /// paged by `offset`/`limit`, with the total before paging.
    pub fn query(&self, query: &ClientQuery) -> ClientPage {
        let mut matching: Vec<(AgeKey, &ClientRecord)> = self
            .iter()
            .filter(|(_, r)| query.matches(r))
            .map(|(list, r)| ((r.last_seen, *list, r.cmid), r))
            .collect();
        let total = matching.len();
        let end = query.offset.saturating_add(query.limit).min(total);
        let newest_first = |a: &(AgeKey, &ClientRecord), b: &(AgeKey, &ClientRecord)| b.0.cmp(&a.0);
        // Only the first `end` need ordering: partition, then sort that part.
        if end < total && end > 0 {
            matching.select_nth_unstable_by(end - 1, newest_first);
        }
        let head = matching.get_mut(..end).unwrap_or_default();
        head.sort_unstable_by(newest_first);
        let clients = head
            .iter()
            .skip(query.offset)
            .map(|(_, r)| (*r).clone())
            .collect();
        ClientPage { total, clients }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DAY_MS;

    const T0: UnixMillis = 1_700_000_000_000;

    fn list(n: u128) -> Uuid {
        Uuid::from_u128(0xA000 + n)
    }

    fn request(cmid: u128) -> ActivationRequest {
        ActivationRequest {
            application_id: list(1),
            sku_id: Uuid::from_u128(0x5000),
            kms_counted_id: Uuid::from_u128(0x6000),
            client_machine_id: Uuid::from_u128(cmid),
            previous_client_machine_id: Uuid::nil(),
            required_client_count: 25,
            license_status: 2,
            binding_expiration: 43_200,
            is_client_vm: false,
            request_time: 0,
            workstation_name: format!("host{cmid}.example.com"),
            protocol_major: 6,
            protocol_minor: 0,
            client_address: Some("192.0.2.7:50000".parse().unwrap()),
        }
    }

    #[test]
    fn record_creates_then_updates() {
        let mut reg = Registry::default();
        reg.record(list(1), &request(1), T0, 1, false);
        let r = reg.get(&list(1), &Uuid::from_u128(1)).unwrap();
        assert_eq!(r.first_seen, T0);
        assert_eq!(r.last_seen, T0);
        assert_eq!(r.request_count, 1);
        assert_eq!(&*r.workstation, "host1.example.com");
        assert_eq!(r.protocol, (6, 0));
        assert!(!r.last_result_activated);

        let mut again = request(1);
        again.license_status = 1;
        again.protocol_major = 5;
        again.workstation_name = "renamed".into();
        again.client_address = None;
        reg.record(list(1), &again, T0 + 10, 26, true);
        assert_eq!(reg.len(), 1);
        let r = reg.get(&list(1), &Uuid::from_u128(1)).unwrap();
        assert_eq!(r.first_seen, T0);
        assert_eq!(r.last_seen, T0 + 10);
        assert_eq!(r.request_count, 2);
        assert_eq!(r.license_status, 1);
        assert_eq!(r.protocol, (5, 0));
        assert_eq!(&*r.workstation, "renamed");
        assert_eq!(r.last_address, None);
        assert_eq!(r.last_count, 26);
        assert!(r.last_result_activated);
    }

    #[test]
    fn same_cmid_in_two_lists_is_two_entries() {
        let mut reg = Registry::default();
        reg.record(list(1), &request(1), T0, 1, false);
        let mut office = request(1);
        office.application_id = list(2);
        reg.record(list(2), &office, T0 + 1, 1, false);
        assert_eq!(reg.len(), 2);
        let found = reg.by_cmid(&Uuid::from_u128(1));
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].application_id, list(1));
        assert_eq!(found[1].application_id, list(2));
        assert!(reg.by_cmid(&Uuid::from_u128(2)).is_empty());
    }

    #[test]
    fn changed_cmid_moves_history() {
        let mut reg = Registry::default();
        reg.record(list(1), &request(1), T0, 1, false);
        reg.record(list(1), &request(1), T0 + 5, 1, false);
        let mut changed = request(2);
        changed.previous_client_machine_id = Uuid::from_u128(1);
        reg.record(list(1), &changed, T0 + 9, 1, false);
        assert_eq!(reg.len(), 1);
        assert!(reg.get(&list(1), &Uuid::from_u128(1)).is_none());
        let r = reg.get(&list(1), &Uuid::from_u128(2)).unwrap();
        assert_eq!(r.cmid, Uuid::from_u128(2));
        assert_eq!(r.first_seen, T0);
        assert_eq!(r.request_count, 3);

        // Both the old and the new CMID registered: histories merge into the new one.
        reg.record(list(1), &request(7), T0 + 20, 2, false);
        let mut again = request(7);
        again.previous_client_machine_id = Uuid::from_u128(2);
        reg.record(list(1), &again, T0 + 30, 1, false);
        assert_eq!(reg.len(), 1);
        let r = reg.get(&list(1), &Uuid::from_u128(7)).unwrap();
        assert_eq!(r.first_seen, T0);
        assert_eq!(r.last_seen, T0 + 30);
        assert_eq!(r.request_count, 5);
    }

    #[test]
    fn long_workstation_names_are_cut() {
        let mut reg = Registry::default();
        let mut req = request(1);
        req.workstation_name = "é".repeat(200);
        reg.record(list(1), &req, T0, 1, false);
        let r = reg.get(&list(1), &Uuid::from_u128(1)).unwrap();
        assert_eq!(r.workstation.chars().count(), MAX_WORKSTATION_CHARS);
    }

    #[test]
    fn expire_uses_retention() {
        let mut reg = Registry::default();
        reg.record(list(1), &request(1), T0, 1, false);
        reg.record(list(1), &request(2), T0 + DAY_MS, 2, false);
        let retention = 180 * DAY_MS;
        assert_eq!(reg.expire(T0 + retention - 1, retention), 0);
        assert_eq!(reg.expire(T0 + retention, retention), 1);
        assert_eq!(reg.len(), 1);
        assert!(reg.get(&list(1), &Uuid::from_u128(1)).is_none());
        assert_eq!(reg.expire(T0 + DAY_MS + retention, retention), 1);
        assert!(reg.is_empty());
        assert_eq!(reg, Registry::default(), "empty lists are dropped too");
    }

    #[test]
    fn query_sorts_filters_and_pages() {
        let mut reg = Registry::default();
        for i in 0..10u128 {
            let mut req = request(i);
            if i % 2 == 1 {
                req.kms_counted_id = Uuid::from_u128(0x6001);
                req.sku_id = Uuid::from_u128(0x5001);
            }
            reg.record(list(1), &req, T0 + i as u64 * 1000, 1, false);
        }
        let all = reg.query(&ClientQuery::default());
        assert_eq!(all.total, 10);
        let order: Vec<u128> = all.clients.iter().map(|r| r.cmid.as_u128()).collect();
        assert_eq!(order, vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);

        let page = reg.query(&ClientQuery {
            offset: 3,
            limit: 4,
            ..ClientQuery::default()
        });
        assert_eq!(page.total, 10);
        let order: Vec<u128> = page.clients.iter().map(|r| r.cmid.as_u128()).collect();
        assert_eq!(order, vec![6, 5, 4, 3]);

        let odd = reg.query(&ClientQuery {
            kms_counted_id: Some(Uuid::from_u128(0x6001)),
            ..ClientQuery::default()
        });
        assert_eq!(odd.total, 5);
        assert!(odd.clients.iter().all(|r| r.cmid.as_u128() % 2 == 1));

        let sku = reg.query(&ClientQuery {
            sku_id: Some(Uuid::from_u128(0x5000)),
            since: Some(T0 + 4000),
            ..ClientQuery::default()
        });
        let order: Vec<u128> = sku.clients.iter().map(|r| r.cmid.as_u128()).collect();
        assert_eq!(order, vec![8, 6, 4]);

        let app = reg.query(&ClientQuery {
            application_id: Some(list(2)),
            ..ClientQuery::default()
        });
        assert_eq!(app.total, 0);

        let beyond = reg.query(&ClientQuery {
            offset: 50,
            ..ClientQuery::default()
        });
        assert_eq!(beyond.total, 10);
        assert!(beyond.clients.is_empty());
    }

    #[test]
    fn full_registry_evicts_least_recently_seen() {
        // A bound of 50,000 (eviction batch 50): fill it, then one more.
        const MAX: usize = 50_000;
        let mut reg = Registry::default();
        let req = request(0);
        for i in 0..MAX as u128 {
            let mut r = req.clone();
            r.client_machine_id = Uuid::from_u128(i + 1);
            reg.record_within(list(1), &r, T0 + i as u64, 1, false, MAX);
        }
        assert_eq!(reg.len(), MAX);
        let mut r = req.clone();
        r.client_machine_id = Uuid::from_u128(u128::MAX);
        reg.record_within(list(1), &r, T0 + MAX as u64, 1, false, MAX);
        assert_eq!(reg.len(), MAX - eviction_batch(MAX) + 1);
        // The oldest batch (CMIDs 1..=batch) went, the rest stayed.
        let batch = eviction_batch(MAX) as u128;
        assert!(reg.get(&list(1), &Uuid::from_u128(1)).is_none());
        assert!(reg.get(&list(1), &Uuid::from_u128(batch)).is_none());
        assert!(reg.get(&list(1), &Uuid::from_u128(batch + 1)).is_some());
        assert!(reg.get(&list(1), &Uuid::from_u128(u128::MAX)).is_some());
        assert_eq!(reg.iter().count(), reg.len());
    }

    #[test]
    fn serde_roundtrip_rebuilds_index() {
        let mut reg = Registry::default();
        for i in 0..5u128 {
            reg.record(list(i % 2), &request(i), T0 + i as u64, 1, false);
        }
        let bytes = postcard::to_allocvec(&reg).unwrap();
        let back: Registry = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, reg);
        assert_eq!(back.len(), 5);
        assert_eq!(
            back.query(&ClientQuery::default()),
            reg.query(&ClientQuery::default())
        );
    }
}
