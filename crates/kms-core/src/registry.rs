//! The client registry: every client that was granted, per application list and CMID, for the
//! operator's inventory. Unlike the CMID caches it does not influence counts.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use compact_str::CompactString;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ActivationRequest, UnixMillis};

/// Default bound on registered clients, so a flood of invented CMIDs cannot exhaust memory
/// (about 280 bytes per client: 20 million is about 5.6 GB; see docs/capacity.md). When
/// full, the least recently seen clients make room. kmsd replaces it at start-up with a
/// bound derived from the node's memory ([`set_max_clients`]).
pub const MAX_CLIENTS: usize = 20_000_000;

/// The bound [`Registry::record`] applies; set once at start-up, before the first apply.
static MAX_CLIENTS_SETTING: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(MAX_CLIENTS);

/// Sets the registry bound of this process (at least 1). The bound only decides when the
/// least recently seen inventory entries are evicted; counts and answers never depend on it.
/// Every node of a cluster should run with the same bound (same memory, or the same
/// explicit setting) so their inventories stay identical when full.
pub fn set_max_clients(max: usize) {
    MAX_CLIENTS_SETTING.store(max.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// The registry bound in force (see [`set_max_clients`]).
pub fn max_clients() -> usize {
    MAX_CLIENTS_SETTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Clients evicted at once when a registry bounded by `max` is full (0.1%), so the scan
/// that finds them is amortised.
fn eviction_batch(max: usize) -> usize {
    (max / 1000).max(1)
}
/// Workstation names longer than this (in characters) are cut; the wire allows 63.
pub const MAX_WORKSTATION_CHARS: usize = 64;
/// Page size of [`ClientQuery::default`].
pub const DEFAULT_PAGE_LIMIT: usize = 100;

/// What the registry remembers about one client of one application list (the readers' view;
/// the registry stores it in a compact form).
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
    /// Address of the latest request (an IPv6 scope id or flow label is not kept).
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
    fn matches(&self, c: &ClientRef<'_>) -> bool {
        let p = c.product();
        self.application_id.is_none_or(|id| p.application_id == id)
            && self.kms_counted_id.is_none_or(|id| p.kms_counted_id == id)
            && self.sku_id.is_none_or(|id| p.sku_id == id)
            && self.since.is_none_or(|t| c.last_seen() >= t)
    }
}

/// One page of query results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientPage {
    /// Matching clients before paging.
    pub total: usize,
    pub clients: Vec<ClientRecord>,
}

/// The product a client asked for: shared by thousands of clients, so stored once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProductKey {
    pub application_id: Uuid,
    pub sku_id: Uuid,
    pub kms_counted_id: Uuid,
}

/// Values shared by many clients (products, DNS suffixes of workstation names), stored once
/// and referred to by slot number. Reference-counted so the values of departed clients go
/// away; the lowest free slot is reused first, so slot numbers depend only on the commands
/// applied (every replica has the same layout).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Interner<K: Ord> {
    /// Value and reference count of each slot; `None` is free.
    slots: Vec<Option<(K, u32)>>,
    index: BTreeMap<K, u32>,
    free: BTreeSet<u32>,
}

impl<K: Ord> Default for Interner<K> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            index: BTreeMap::new(),
            free: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone> Interner<K> {
    /// Takes a reference to `value`, storing it if new; returns its slot.
    fn acquire<Q>(&mut self, value: &Q, make: impl FnOnce() -> K) -> u32
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        if let Some(&slot) = self.index.get(value) {
            if let Some(Some((_, refs))) = self.slots.get_mut(slot as usize) {
                *refs = refs.saturating_add(1);
            }
            return slot;
        }
        let key = make();
        let slot = match self.free.pop_first() {
            Some(slot) => slot,
            None => {
                // More than u32::MAX distinct values cannot be held in memory anyway.
                let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(None);
                slot
            }
        };
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = Some((key.clone(), 1));
        }
        self.index.insert(key, slot);
        slot
    }

    /// Drops one reference to `slot`, freeing it at zero.
    fn release(&mut self, slot: u32) {
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let Some((key, refs)) = entry else {
            return;
        };
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.index.remove(&*key);
            *entry = None;
            self.free.insert(slot);
            self.trim();
        }
    }

    /// Drops trailing free slots, so equal contents have equal layouts.
    fn trim(&mut self) {
        while let Some(None) = self.slots.last() {
            self.slots.pop();
            if let Ok(last) = u32::try_from(self.slots.len()) {
                self.free.remove(&last);
            }
        }
    }

    fn get(&self, slot: u32) -> Option<&K> {
        self.slots
            .get(slot as usize)
            .and_then(|s| s.as_ref())
            .map(|(k, _)| k)
    }

    /// Rebuilds from serialized values; reference counts come from `uses`. Values nobody
    /// uses are dropped.
    fn rebuild(values: Vec<Option<K>>, uses: &[u32]) -> Self {
        let mut interner = Self::default();
        for (slot, value) in values.into_iter().enumerate() {
            let refs = uses.get(slot).copied().unwrap_or(0);
            let slot32 = u32::try_from(slot).unwrap_or(u32::MAX);
            match value {
                Some(k) if refs > 0 && !interner.index.contains_key(&k) => {
                    interner.index.insert(k.clone(), slot32);
                    interner.slots.push(Some((k, refs)));
                }
                _ => {
                    interner.slots.push(None);
                    interner.free.insert(slot32);
                }
            }
        }
        interner.trim();
        interner
    }

    fn values(&self) -> impl Serialize + '_
    where
        K: Serialize,
    {
        SlotValues(&self.slots)
    }
}

/// Serializes interner slots as `Option<value>` without the reference counts (they are
/// recomputed on load).
struct SlotValues<'a, K>(&'a [Option<(K, u32)>]);

impl<K: Serialize> Serialize for SlotValues<'_, K> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|s| s.as_ref().map(|(k, _)| k)))
    }
}

/// Slot value meaning "no DNS suffix".
const NO_SUFFIX: u32 = u32::MAX;

/// A socket address in 19 bytes instead of 32 (`Option<SocketAddr>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CompactAddress {
    /// 0: none, 4: IPv4 (first 4 bytes of `ip`), 6: IPv6.
    family: u8,
    ip: [u8; 16],
    port: u16,
}

impl CompactAddress {
    fn new(address: Option<SocketAddr>) -> Self {
        let mut ip = [0u8; 16];
        match address {
            None => Self {
                family: 0,
                ip,
                port: 0,
            },
            Some(SocketAddr::V4(a)) => {
                ip[..4].copy_from_slice(&a.ip().octets());
                Self {
                    family: 4,
                    ip,
                    port: a.port(),
                }
            }
            Some(SocketAddr::V6(a)) => Self {
                family: 6,
                ip: a.ip().octets(),
                port: a.port(),
            },
        }
    }

    fn get(&self) -> Option<SocketAddr> {
        match self.family {
            4 => {
                let [a, b, c, d, ..] = self.ip;
                Some(SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), self.port))
            }
            6 => Some(SocketAddr::new(Ipv6Addr::from(self.ip).into(), self.port)),
            _ => None,
        }
    }
}

/// One client as stored: about 90 bytes, with the product and the DNS suffix of the
/// workstation name shared through interners and the CMID only in the map key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    first_seen: UnixMillis,
    last_seen: UnixMillis,
    /// Workstation name up to its first dot (inline when short).
    host: CompactString,
    /// Interned rest of the workstation name from its first dot, or [`NO_SUFFIX`].
    suffix: u32,
    /// Interned [`ProductKey`].
    product: u32,
    address: CompactAddress,
    request_count: u32,
    last_count: u32,
    license_status: u32,
    protocol: (u16, u16),
    is_vm: bool,
    activated: bool,
    /// The client's clock (FILETIME) in its last registered request: a request applied again
    /// (the same CMID and time, resent inside the cluster) is recognised by it.
    last_request_time: u64,
}

/// A borrowed view of one registered client.
#[derive(Clone, Copy)]
pub struct ClientRef<'a> {
    list: &'a Uuid,
    cmid: &'a Uuid,
    entry: &'a Entry,
    registry: &'a Registry,
}

const UNKNOWN_PRODUCT: ProductKey = ProductKey {
    application_id: Uuid::nil(),
    sku_id: Uuid::nil(),
    kms_counted_id: Uuid::nil(),
};

impl<'a> ClientRef<'a> {
    /// Application list the client is counted in.
    pub fn list(&self) -> &'a Uuid {
        self.list
    }
    pub fn cmid(&self) -> &'a Uuid {
        self.cmid
    }
    pub fn product(&self) -> ProductKey {
        self.registry
            .products
            .get(self.entry.product)
            .copied()
            .unwrap_or(UNKNOWN_PRODUCT)
    }
    pub fn first_seen(&self) -> UnixMillis {
        self.entry.first_seen
    }
    pub fn last_seen(&self) -> UnixMillis {
        self.entry.last_seen
    }
    pub fn last_address(&self) -> Option<SocketAddr> {
        self.entry.address.get()
    }
    pub fn workstation(&self) -> String {
        let suffix = self
            .registry
            .suffixes
            .get(self.entry.suffix)
            .map(|s| &**s)
            .unwrap_or("");
        let mut name = String::with_capacity(self.entry.host.len() + suffix.len());
        name.push_str(&self.entry.host);
        name.push_str(suffix);
        name
    }
    /// The full record.
    pub fn to_record(&self) -> ClientRecord {
        let product = self.product();
        let e = self.entry;
        ClientRecord {
            cmid: *self.cmid,
            application_id: product.application_id,
            sku_id: product.sku_id,
            kms_counted_id: product.kms_counted_id,
            workstation: self.workstation().into_boxed_str(),
            license_status: e.license_status,
            protocol: e.protocol,
            last_address: e.address.get(),
            is_vm: e.is_vm,
            first_seen: e.first_seen,
            last_seen: e.last_seen,
            request_count: e.request_count,
            last_count: e.last_count,
            last_result_activated: e.activated,
        }
    }
}

/// Registered clients keyed by (application list, CMID).
///
/// No secondary index by age: it would cost about a fifth of the memory per client, and the
/// operations that need age order (retention, eviction when full, paging) are rare enough
/// to scan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RegistryRepr")]
pub struct Registry {
    lists: BTreeMap<Uuid, BTreeMap<Uuid, Entry>>,
    products: Interner<ProductKey>,
    suffixes: Interner<Box<str>>,
    /// Total entries over all lists (derived, not serialized).
    len: usize,
}

#[derive(Deserialize)]
struct RegistryRepr {
    products: Vec<Option<ProductKey>>,
    suffixes: Vec<Option<Box<str>>>,
    lists: BTreeMap<Uuid, BTreeMap<Uuid, Entry>>,
}

/// The registry as snapshot format 1 wrote it (before `last_request_time`); still read.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(crate) struct RegistryReprV1 {
    products: Vec<Option<ProductKey>>,
    suffixes: Vec<Option<Box<str>>>,
    lists: BTreeMap<Uuid, BTreeMap<Uuid, EntryV1>>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct EntryV1 {
    first_seen: UnixMillis,
    last_seen: UnixMillis,
    host: CompactString,
    suffix: u32,
    product: u32,
    address: CompactAddress,
    request_count: u32,
    last_count: u32,
    license_status: u32,
    protocol: (u16, u16),
    is_vm: bool,
    activated: bool,
}

impl TryFrom<RegistryReprV1> for Registry {
    type Error = String;

    fn try_from(v1: RegistryReprV1) -> Result<Self, String> {
        let lists = v1
            .lists
            .into_iter()
            .map(|(list, clients)| {
                let clients = clients
                    .into_iter()
                    .map(|(cmid, e)| {
                        let entry = Entry {
                            first_seen: e.first_seen,
                            last_seen: e.last_seen,
                            host: e.host,
                            suffix: e.suffix,
                            product: e.product,
                            address: e.address,
                            request_count: e.request_count,
                            last_count: e.last_count,
                            license_status: e.license_status,
                            protocol: e.protocol,
                            is_vm: e.is_vm,
                            activated: e.activated,
                            last_request_time: 0,
                        };
                        (cmid, entry)
                    })
                    .collect();
                (list, clients)
            })
            .collect();
        Registry::try_from(RegistryRepr {
            products: v1.products,
            suffixes: v1.suffixes,
            lists,
        })
    }
}

#[cfg(test)]
impl RegistryReprV1 {
    /// One client in format 1, for the snapshot upgrade test.
    pub(crate) fn sample(list: Uuid, cmid: Uuid, product: ProductKey, request_count: u32) -> Self {
        let entry = EntryV1 {
            first_seen: 1,
            last_seen: 2,
            host: CompactString::new("pc1"),
            suffix: 0,
            product: 0,
            address: CompactAddress::new(None),
            request_count,
            last_count: 7,
            license_status: 1,
            protocol: (6, 0),
            is_vm: false,
            activated: true,
        };
        Self {
            products: vec![Some(product)],
            suffixes: vec![Some(".example.com".into())],
            lists: BTreeMap::from([(list, BTreeMap::from([(cmid, entry)]))]),
        }
    }
}

/// Serialized by reference: a snapshot of a large registry must not need a copy of it.
impl Serialize for Registry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("RegistryRepr", 3)?;
        s.serialize_field("products", &self.products.values())?;
        s.serialize_field("suffixes", &self.suffixes.values())?;
        s.serialize_field("lists", &self.lists)?;
        s.end()
    }
}

impl TryFrom<RegistryRepr> for Registry {
    type Error = String;

    fn try_from(repr: RegistryRepr) -> Result<Self, String> {
        let mut lists = repr.lists;
        lists.retain(|_, clients| !clients.is_empty());
        let mut product_uses = vec![0u32; repr.products.len()];
        let mut suffix_uses = vec![0u32; repr.suffixes.len()];
        for entry in lists.values().flat_map(BTreeMap::values) {
            let live_product = repr.products.get(entry.product as usize);
            match (live_product, product_uses.get_mut(entry.product as usize)) {
                (Some(Some(_)), Some(uses)) => *uses = uses.saturating_add(1),
                _ => {
                    return Err(format!(
                        "client refers to missing product {}",
                        entry.product
                    ))
                }
            }
            if entry.suffix != NO_SUFFIX {
                let live_suffix = repr.suffixes.get(entry.suffix as usize);
                match (live_suffix, suffix_uses.get_mut(entry.suffix as usize)) {
                    (Some(Some(_)), Some(uses)) => *uses = uses.saturating_add(1),
                    _ => return Err(format!("client refers to missing suffix {}", entry.suffix)),
                }
            }
        }
        let len = lists.values().map(BTreeMap::len).sum();
        Ok(Self {
            lists,
            products: Interner::rebuild(repr.products, &product_uses),
            suffixes: Interner::rebuild(repr.suffixes, &suffix_uses),
            len,
        })
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

/// Splits a workstation name into its host label and its DNS suffix (from the first dot).
fn split_workstation(name: &str) -> (&str, Option<&str>) {
    match name.find('.') {
        Some(dot) => (
            name.get(..dot).unwrap_or(name),
            name.get(dot..).filter(|s| !s.is_empty()),
        ),
        None => (name, None),
    }
}

fn intern_suffix(suffixes: &mut Interner<Box<str>>, suffix: Option<&str>) -> u32 {
    match suffix {
        Some(s) => suffixes.acquire(s, || s.into()),
        None => NO_SUFFIX,
    }
}

/// Whether a request with the client time `request_time` is the one already registered in
/// `entry`. A client stamps every request with its clock in 100 ns units, so a second
/// request of one machine with the same time is the same request applied twice (a commit
/// that outlived its answer deadline and was also queued or retried). Time 0 is never one.
fn is_repeat(entry: &Entry, request_time: u64) -> bool {
    request_time != 0 && entry.last_request_time == request_time
}

/// Copies the facts of a granted request into its client's entry. `name` is the product,
/// the host label and the DNS suffix of the request.
#[allow(clippy::too_many_arguments)]
fn refresh(
    products: &mut Interner<ProductKey>,
    suffixes: &mut Interner<Box<str>>,
    entry: &mut Entry,
    request: &ActivationRequest,
    name: (&ProductKey, &str, Option<&str>),
    now: UnixMillis,
    count: u32,
    activated: bool,
) {
    let (product, host, suffix) = name;
    if products.get(entry.product) != Some(product) {
        let new = products.acquire(product, || *product);
        products.release(entry.product);
        entry.product = new;
    }
    let same_suffix = match entry.suffix {
        NO_SUFFIX => suffix.is_none(),
        slot => suffixes.get(slot).map(|s| &**s) == suffix,
    };
    if !same_suffix {
        let new = intern_suffix(suffixes, suffix);
        if entry.suffix != NO_SUFFIX {
            suffixes.release(entry.suffix);
        }
        entry.suffix = new;
    }
    if entry.host != host {
        entry.host = CompactString::new(host);
    }
    entry.license_status = request.license_status;
    entry.protocol = (request.protocol_major, request.protocol_minor);
    entry.address = CompactAddress::new(request.client_address);
    entry.is_vm = request.is_client_vm;
    entry.first_seen = entry.first_seen.min(now);
    entry.last_seen = now;
    if !is_repeat(entry, request.request_time) {
        entry.request_count = entry.request_count.saturating_add(1);
    }
    entry.last_request_time = request.request_time;
    entry.last_count = count;
    entry.activated = activated;
}

impl Registry {
    /// Number of registered (list, CMID) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn view<'a>(&'a self, list: &'a Uuid, cmid: &'a Uuid, entry: &'a Entry) -> ClientRef<'a> {
        ClientRef {
            list,
            cmid,
            entry,
            registry: self,
        }
    }

    /// The record of `cmid` in `list`.
    pub fn get(&self, list: &Uuid, cmid: &Uuid) -> Option<ClientRecord> {
        let (list, clients) = self.lists.get_key_value(list)?;
        let (cmid, entry) = clients.get_key_value(cmid)?;
        Some(self.view(list, cmid, entry).to_record())
    }

    /// Records of `cmid` in every list it appears in, by list id.
    pub fn by_cmid(&self, cmid: &Uuid) -> Vec<ClientRecord> {
        self.lists
            .iter()
            .filter_map(|(list, c)| {
                let (cmid, entry) = c.get_key_value(cmid)?;
                Some(self.view(list, cmid, entry).to_record())
            })
            .collect()
    }

    /// Every client, by list then CMID.
    pub fn iter(&self) -> impl Iterator<Item = ClientRef<'_>> {
        self.lists.iter().flat_map(move |(list, clients)| {
            clients
                .iter()
                .map(move |(cmid, entry)| self.view(list, cmid, entry))
        })
    }

    fn release(&mut self, entry: &Entry) {
        self.products.release(entry.product);
        if entry.suffix != NO_SUFFIX {
            self.suffixes.release(entry.suffix);
        }
    }

    fn remove(&mut self, list: &Uuid, cmid: &Uuid) -> Option<Entry> {
        let clients = self.lists.get_mut(list)?;
        let entry = clients.remove(cmid)?;
        if clients.is_empty() {
            self.lists.remove(list);
        }
        self.len = self.len.saturating_sub(1);
        Some(entry)
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
        self.record_within(list, request, now, count, activated, max_clients());
    }

    /// Whether `cmid` is registered under `list` (a cheap lookup for the KMS listeners'
    /// new-client rate limit).
    pub fn contains(&self, list: &Uuid, cmid: &Uuid) -> bool {
        self.lists
            .get(list)
            .is_some_and(|clients| clients.contains_key(cmid))
    }

    /// Whether `request` was already registered under `list` (see [`is_repeat`]).
    pub fn is_repeat(&self, list: &Uuid, request: &ActivationRequest) -> bool {
        self.lists
            .get(list)
            .and_then(|clients| clients.get(&request.client_machine_id))
            .is_some_and(|entry| is_repeat(entry, request.request_time))
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
        let (host, suffix) = split_workstation(workstation);
        let product = ProductKey {
            application_id: request.application_id,
            sku_id: request.sku_id,
            kms_counted_id: request.kms_counted_id,
        };
        let existing = self.lists.get_mut(&list).and_then(|c| c.get_mut(&cmid));
        if let Some(entry) = existing {
            // Common case (a renewal): update in place.
            if let Some(old) = &moved {
                // Both CMIDs were registered: merge the histories.
                entry.first_seen = entry.first_seen.min(old.first_seen);
                entry.request_count = entry.request_count.saturating_add(old.request_count);
            }
            refresh(
                &mut self.products,
                &mut self.suffixes,
                entry,
                request,
                (&product, host, suffix),
                now,
                count,
                activated,
            );
            if let Some(old) = moved {
                self.release(&old);
            }
            return;
        }
        if self.len >= max {
            self.evict_oldest(eviction_batch(max));
        }
        let mut entry = match moved {
            Some(old) => old,
            None => Entry {
                first_seen: now,
                last_seen: now,
                host: CompactString::new(host),
                suffix: intern_suffix(&mut self.suffixes, suffix),
                product: self.products.acquire(&product, || product),
                address: CompactAddress::new(None),
                request_count: 0,
                last_count: count,
                license_status: request.license_status,
                protocol: (request.protocol_major, request.protocol_minor),
                is_vm: request.is_client_vm,
                activated,
                last_request_time: 0,
            },
        };
        refresh(
            &mut self.products,
            &mut self.suffixes,
            &mut entry,
            request,
            (&product, host, suffix),
            now,
            count,
            activated,
        );
        self.lists.entry(list).or_default().insert(cmid, entry);
        self.len += 1;
    }

    fn age_keys(&self) -> impl Iterator<Item = AgeKey> + '_ {
        self.iter().map(|c| (c.last_seen(), *c.list(), *c.cmid()))
    }

    /// Removes the `count` least recently seen clients.
    fn evict_oldest(&mut self, count: usize) {
        let mut keys: Vec<AgeKey> = self.age_keys().collect();
        if count < keys.len() {
            keys.select_nth_unstable(count);
            keys.truncate(count);
        }
        for (_, list, cmid) in keys {
            if let Some(entry) = self.remove(&list, &cmid) {
                self.release(&entry);
            }
        }
    }

    /// Removes clients with `last_seen + retention_ms <= now`; returns how many.
    pub fn expire(&mut self, now: UnixMillis, retention_ms: u64) -> usize {
        let expired: Vec<(Uuid, Uuid)> = self
            .iter()
            .filter(|c| c.last_seen().saturating_add(retention_ms) <= now)
            .map(|c| (*c.list(), *c.cmid()))
            .collect();
        for (list, cmid) in &expired {
            if let Some(entry) = self.remove(list, cmid) {
                self.release(&entry);
            }
        }
        expired.len()
    }

    /// Matching clients, newest `last_seen` first (ties: list id, then CMID, descending),
    /// paged by `offset`/`limit`, with the total before paging.
    pub fn query(&self, query: &ClientQuery) -> ClientPage {
        let mut matching: Vec<(AgeKey, ClientRef<'_>)> = self
            .iter()
            .filter(|c| query.matches(c))
            .map(|c| ((c.last_seen(), *c.list(), *c.cmid()), c))
            .collect();
        let total = matching.len();
        let end = query.offset.saturating_add(query.limit).min(total);
        let newest_first = |a: &(AgeKey, ClientRef<'_>), b: &(AgeKey, ClientRef<'_>)| b.0.cmp(&a.0);
        // Only the first `end` need ordering: partition, then sort that part.
        if end < total && end > 0 {
            matching.select_nth_unstable_by(end - 1, newest_first);
        }
        let head = matching.get_mut(..end).unwrap_or_default();
        head.sort_unstable_by(newest_first);
        let clients = head
            .iter()
            .skip(query.offset)
            .map(|(_, c)| c.to_record())
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
    fn shared_values_are_stored_once_and_freed_with_their_clients() {
        let mut reg = Registry::default();
        for i in 0..100u128 {
            let mut req = request(i);
            req.workstation_name = format!("pc{i}.corp.example.com");
            reg.record(list(1), &req, T0 + i as u64, 1, false);
        }
        assert_eq!(reg.products.index.len(), 1, "one product for 100 clients");
        assert_eq!(
            reg.suffixes.index.len(),
            1,
            "one DNS suffix for 100 clients"
        );
        let r = reg.get(&list(1), &Uuid::from_u128(42)).unwrap();
        assert_eq!(&*r.workstation, "pc42.corp.example.com");
        assert_eq!(r.sku_id, Uuid::from_u128(0x5000));

        // A client that moves to another product and suffix releases the old ones only
        // when nobody else uses them.
        let mut moved = request(42);
        moved.sku_id = Uuid::from_u128(0x5001);
        moved.workstation_name = "PC42.other.example".into();
        reg.record(list(1), &moved, T0 + 1000, 1, false);
        assert_eq!(reg.products.index.len(), 2);
        assert_eq!(reg.suffixes.index.len(), 2);
        let r = reg.get(&list(1), &Uuid::from_u128(42)).unwrap();
        assert_eq!(&*r.workstation, "PC42.other.example");
        assert_eq!(r.sku_id, Uuid::from_u128(0x5001));

        // Everybody else expires: the shared values go with them.
        assert_eq!(reg.expire(T0 + 500 + DAY_MS, DAY_MS), 99);
        assert_eq!(reg.products.index.len(), 1);
        assert_eq!(reg.suffixes.index.len(), 1);
        assert_eq!(reg.products.slots.iter().flatten().count(), 1);
        let bytes = postcard::to_allocvec(&reg).unwrap();
        let back: Registry = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, reg, "freed slots survive a snapshot round trip");

        // The freed slot is reused first.
        let mut fresh = request(500);
        fresh.sku_id = Uuid::from_u128(0x5002);
        reg.record(list(1), &fresh, T0 + 2000, 1, false);
        let r = reg.get(&list(1), &Uuid::from_u128(500)).unwrap();
        assert_eq!(r.sku_id, Uuid::from_u128(0x5002));
        assert_eq!(reg.products.slots.len(), 2);
    }

    #[test]
    fn names_without_suffix_and_addresses_round_trip() {
        let mut reg = Registry::default();
        let cases: [(&str, Option<SocketAddr>); 5] = [
            ("DESKTOP-1", Some("[2001:db8::7]:50000".parse().unwrap())),
            ("trailing.", Some("203.0.113.9:1".parse().unwrap())),
            (".leading", None),
            ("", Some("[::1]:65535".parse().unwrap())),
            ("a.b.c.d.e", Some("0.0.0.0:0".parse().unwrap())),
        ];
        for (i, (name, address)) in cases.iter().enumerate() {
            let mut req = request(i as u128);
            req.workstation_name = (*name).into();
            req.client_address = *address;
            reg.record(list(1), &req, T0, 1, false);
        }
        for (i, (name, address)) in cases.iter().enumerate() {
            let r = reg.get(&list(1), &Uuid::from_u128(i as u128)).unwrap();
            assert_eq!(&*r.workstation, *name);
            assert_eq!(r.last_address, *address);
        }
    }

    #[test]
    fn snapshot_with_dangling_slot_is_refused() {
        let mut reg = Registry::default();
        reg.record(list(1), &request(1), T0, 1, false);
        let repr = RegistryRepr {
            products: Vec::new(),
            suffixes: vec![Some(".example.com".into())],
            lists: reg.lists.clone(),
        };
        assert!(Registry::try_from(repr).is_err());
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
