//! [`Publisher`]: keeps `_vlmcs._tcp.<zone>` equal to a desired set of SRV records with
//! minimal RFC 2136 updates, never touching records whose target the cluster does not own.
//!
//! One publish round: read the SRV RRset (and the A/AAAA RRsets of in-zone targets when
//! address records are managed), compute the difference, and send ONE update message whose
//! prerequisites say "the RRsets are still exactly what we read" (RFC 2136 §2.4.2 / §2.4.3).
//! If somebody changed them in between, the server answers NXRRSET/YXRRSET, nothing is applied,
//! and the round re-reads and retries (bounded). Updates themselves are only adds and
//! deletes-by-rdata (§2.5.1 / §2.5.4) of records whose target is owned, so a foreign record can
//! never be removed, even by a stale leader.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::config::{host_name, ConfigError, PublishTarget, TsigKey};
use crate::error::{PublishError, Rcode, Stage};
use crate::transport::{Session, Transport};

/// The service label of KMS SRV records.
pub const SRV_SERVICE: &str = "_vlmcs._tcp";

/// Bounds and transport of a [`Publisher`].
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// Bound of each request (connect, query, update).
    pub request_timeout: Duration,
    /// Bound of a whole publish or withdraw round, retries included.
    pub operation_timeout: Duration,
    pub transport: Transport,
    /// Rounds tried when prerequisites fail because of concurrent changes.
    pub max_attempts: u32,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        Self::with_timeout(Duration::from_secs(crate::config::DEFAULT_TIMEOUT_SECS))
    }
}

impl PublisherOptions {
    /// Request bound `timeout`; a round is bounded by four of them.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            request_timeout: timeout,
            operation_timeout: timeout.saturating_mul(4),
            transport: Transport::Tcp,
            max_attempts: 3,
        }
    }
}

/// One SRV record of `_vlmcs._tcp.<zone>`. `target` is lower-case, without the final dot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

impl SrvRecord {
    pub fn new(target: &str, port: u16, priority: u16, weight: u16) -> Self {
        Self {
            priority,
            weight,
            port,
            target: normalize_host(target),
        }
    }

    fn from_rdata(srv: &SRV) -> Self {
        Self {
            priority: srv.priority(),
            weight: srv.weight(),
            port: srv.port(),
            target: normalize_host(&srv.target().to_ascii()),
        }
    }
}

/// A record the cluster wants published, plus the target's addresses (used only when the
/// target lies in the zone and `publish_address_records` is on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredSrv {
    pub record: SrvRecord,
    pub addresses: Vec<IpAddr>,
}

impl DesiredSrv {
    pub fn new(target: &str, port: u16, priority: u16, weight: u16) -> Self {
        Self {
            record: SrvRecord::new(target, port, priority, weight),
            addresses: Vec::new(),
        }
    }

    pub fn with_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.addresses = addresses.into_iter().collect();
        self
    }
}

/// What a successful round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    pub zone: String,
    /// Records of this cluster present in the RRset after the round.
    pub records_published: usize,
    /// New SRV records (not counting changed ones).
    pub added: usize,
    /// SRV records removed (not counting changed ones).
    pub removed: usize,
    /// SRV records replaced because priority, weight or port changed.
    pub changed: usize,
    /// A/AAAA records added or removed.
    pub address_changes: usize,
    /// Records of other owners left alone in the RRset.
    pub foreign_records: usize,
    /// Update messages sent (0 when everything was already in place).
    pub updates_sent: u32,
}

impl PublishReport {
    pub fn changed_anything(&self) -> bool {
        self.added + self.removed + self.changed + self.address_changes > 0
    }
}

/// Lower-case, no trailing dot: the form used for comparisons and reports.
pub fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The difference between the current and desired SRV RRsets.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SrvPlan {
    pub adds: Vec<SrvRecord>,
    pub deletes: Vec<SrvRecord>,
    pub changed: usize,
    pub foreign: usize,
}

/// Adds what is desired and missing; deletes what is present, not desired, and owned (its
/// target is in `owned` or is a desired target). Everything else is foreign and stays.
pub(crate) fn plan_srv(
    current: &[SrvRecord],
    desired: &[SrvRecord],
    owned: &BTreeSet<String>,
) -> SrvPlan {
    let desired_set: BTreeSet<&SrvRecord> = desired.iter().collect();
    let current_set: BTreeSet<&SrvRecord> = current.iter().collect();
    let mut owned_all: BTreeSet<&str> = owned.iter().map(String::as_str).collect();
    owned_all.extend(desired.iter().map(|d| d.target.as_str()));

    let deletes: Vec<SrvRecord> = current_set
        .iter()
        .filter(|c| !desired_set.contains(**c) && owned_all.contains(c.target.as_str()))
        .map(|c| (*c).clone())
        .collect();
    let adds: Vec<SrvRecord> = desired_set
        .iter()
        .filter(|d| !current_set.contains(**d))
        .map(|d| (*d).clone())
        .collect();
    // A target with both a delete and an add had its priority/weight/port changed.
    let mut per_target: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for a in &adds {
        per_target.entry(a.target.as_str()).or_default().0 += 1;
    }
    for d in &deletes {
        per_target.entry(d.target.as_str()).or_default().1 += 1;
    }
    let changed = per_target.values().map(|(a, d)| (*a).min(*d)).sum();
    let foreign = current_set
        .iter()
        .filter(|c| !owned_all.contains(c.target.as_str()))
        .count();
    SrvPlan {
        adds,
        deletes,
        changed,
        foreign,
    }
}

/// Publishes one zone. Cheap to clone; safe to share between tasks.
#[derive(Clone)]
pub struct Publisher {
    zone: Name,
    zone_text: String,
    srv_name: Name,
    server_host: String,
    server_port: u16,
    server_label: String,
    key: Option<TsigKey>,
    ttl: u32,
    priority: u16,
    weight: u16,
    publish_address_records: bool,
    options: PublisherOptions,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("zone", &self.zone_text)
            .field("server", &self.server_label)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Validates `target` and loads its TSIG secret (file or environment).
    pub fn new(target: &PublishTarget, options: PublisherOptions) -> Result<Self, ConfigError> {
        let key = target.load_key()?;
        Self::with_key(target, key, options)
    }

    /// Like [`Publisher::new`] with an already loaded key (`None`: unsigned updates); the
    /// target's own secret settings are ignored.
    pub fn with_key(
        target: &PublishTarget,
        key: Option<TsigKey>,
        options: PublisherOptions,
    ) -> Result<Self, ConfigError> {
        let zone = target.zone_name()?;
        let (server_host, server_port) = target.server_parts()?;
        if target.ttl == 0 || target.ttl > crate::config::MAX_TTL {
            return Err(ConfigError::Ttl {
                zone: target.zone.clone(),
                ttl: target.ttl,
            });
        }
        let srv_name = Name::from_ascii(SRV_SERVICE)
            .and_then(|n| n.append_domain(&zone))
            .map_err(|e| ConfigError::Zone {
                zone: target.zone.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            zone_text: normalize_host(&zone.to_ascii()),
            zone,
            srv_name,
            server_label: format!("{}:{}", server_host, server_port),
            server_host,
            server_port,
            key,
            ttl: target.ttl,
            priority: target.priority,
            weight: target.weight,
            publish_address_records: target.publish_address_records,
            options,
        })
    }

    /// The zone, lower-case without the final dot (e.g. `kms.test`).
    pub fn zone(&self) -> &str {
        &self.zone_text
    }

    /// `_vlmcs._tcp.<zone>.`
    pub fn srv_name(&self) -> String {
        self.srv_name.to_ascii()
    }

    /// The `server` setting as `host:port`.
    pub fn server(&self) -> &str {
        &self.server_label
    }

    /// This zone's configured priority and weight (the `[[dns.publish]]` values).
    pub fn priority_weight(&self) -> (u16, u16) {
        (self.priority, self.weight)
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    pub fn options(&self) -> &PublisherOptions {
        &self.options
    }

    /// Reads the current SRV RRset (all owners), sorted.
    pub async fn current(&self) -> Result<Vec<SrvRecord>, PublishError> {
        self.bounded(async {
            let session = self.open().await?;
            let mut records: Vec<SrvRecord> = self
                .read_srv(&session)
                .await?
                .iter()
                .map(SrvRecord::from_rdata)
                .collect();
            records.sort();
            Ok(records)
        })
        .await
    }

    /// Makes the RRset contain exactly `desired` among the records whose target is in
    /// `owned_targets` (plus the desired targets themselves), leaving other records alone.
    /// `owned_targets` should hold every host the cluster ever advertised.
    pub async fn publish(
        &self,
        desired: &[DesiredSrv],
        owned_targets: &BTreeSet<String>,
    ) -> Result<PublishReport, PublishError> {
        for d in desired {
            host_name(&d.record.target).map_err(|reason| {
                PublishError::InvalidName(format!("SRV target {:?}: {reason}", d.record.target))
            })?;
        }
        let owned: BTreeSet<String> = owned_targets.iter().map(|h| normalize_host(h)).collect();
        let mut records: Vec<SrvRecord> = desired.iter().map(|d| d.record.clone()).collect();
        records.sort();
        records.dedup();
        let addresses = self.desired_addresses(desired)?;
        self.bounded(self.publish_rounds(&records, &addresses, &owned))
            .await
    }

    /// Removes every SRV record whose target is `host` (one node leaving) and nothing else.
    /// Deleting a specific record cannot clobber anybody, so this needs no prerequisite.
    pub async fn withdraw(&self, host: &str) -> Result<PublishReport, PublishError> {
        let host = normalize_host(host);
        self.bounded(async {
            let session = self.open().await?;
            let current = self.read_srv(&session).await?;
            let (mine, foreign): (Vec<&SRV>, Vec<&SRV>) = current
                .iter()
                .partition(|srv| SrvRecord::from_rdata(srv).target == host);
            let mut report = PublishReport {
                zone: self.zone_text.clone(),
                records_published: 0,
                foreign_records: foreign.len(),
                ..PublishReport::default()
            };
            if mine.is_empty() {
                return Ok(report);
            }
            let mut message = self.update_message();
            for srv in &mine {
                message.add_update(self.delete_rr(&self.srv_name, RData::SRV((*srv).clone())));
            }
            let answer = session.exchange(message).await?;
            report.updates_sent = 1;
            check_update(session.label(), &answer)?;
            report.removed = mine.len();
            Ok(report)
        })
        .await
    }

    async fn publish_rounds(
        &self,
        desired: &[SrvRecord],
        addresses: &BTreeMap<Name, BTreeSet<IpAddr>>,
        owned: &BTreeSet<String>,
    ) -> Result<PublishReport, PublishError> {
        let session = self.open().await?;
        let attempts = self.options.max_attempts.max(1);
        let mut last_conflict = Rcode::NXRRSET;
        for _ in 0..attempts {
            let current_rdata = self.read_srv(&session).await?;
            let current: Vec<SrvRecord> = current_rdata.iter().map(SrvRecord::from_rdata).collect();
            let plan = plan_srv(&current, desired, owned);

            let mut message = self.update_message();
            // Prerequisite: the SRV RRset is still what we read.
            self.add_rrset_prerequisite(
                &mut message,
                &self.srv_name,
                RecordType::SRV,
                current_rdata
                    .iter()
                    .map(|s| RData::SRV(s.clone()))
                    .collect(),
            );
            for rec in &plan.deletes {
                if let Some(srv) = current_rdata
                    .iter()
                    .find(|s| SrvRecord::from_rdata(s) == *rec)
                {
                    message.add_update(self.delete_rr(&self.srv_name, RData::SRV(srv.clone())));
                }
            }
            for rec in &plan.adds {
                message.add_update(self.add_rr(&self.srv_name, RData::SRV(srv_rdata(rec)?)));
            }

            let mut address_changes = 0;
            for (name, wanted) in addresses {
                address_changes += self
                    .plan_addresses(&session, &mut message, name, wanted)
                    .await?;
            }

            let mut report = PublishReport {
                zone: self.zone_text.clone(),
                records_published: desired.len(),
                added: plan.adds.len().saturating_sub(plan.changed),
                removed: plan.deletes.len().saturating_sub(plan.changed),
                changed: plan.changed,
                address_changes,
                foreign_records: plan.foreign,
                updates_sent: 0,
            };
            if message.updates().is_empty() {
                return Ok(report);
            }
            let answer = session.exchange(message).await?;
            report.updates_sent = 1;
            match answer.response.response_code() {
                ResponseCode::NoError if answer.signed => return Ok(report),
                ResponseCode::NoError => {
                    return Err(PublishError::Protocol {
                        server: session.label().to_owned(),
                        reason: "update answer failed TSIG verification".into(),
                    })
                }
                // Prerequisite failed: the RRsets changed since we read them. Nothing was
                // applied; read again.
                code @ (ResponseCode::NXRRSet | ResponseCode::YXRRSet) if answer.signed => {
                    last_conflict = code.into();
                    tracing::debug!(zone = %self.zone_text, rcode = %last_conflict, "RRset changed concurrently; retrying");
                }
                code => {
                    return Err(PublishError::Rejected {
                        server: session.label().to_owned(),
                        stage: Stage::Update,
                        rcode: code.into(),
                        signed: answer.signed,
                    })
                }
            }
        }
        Err(PublishError::Conflict {
            server: self.server_label.clone(),
            attempts,
            rcode: last_conflict,
        })
    }

    /// Adds the A/AAAA prerequisites and changes for one in-zone target; returns the number of
    /// records added or removed.
    async fn plan_addresses(
        &self,
        session: &Session,
        message: &mut Message,
        name: &Name,
        wanted: &BTreeSet<IpAddr>,
    ) -> Result<usize, PublishError> {
        let mut changes = 0;
        for rtype in [RecordType::A, RecordType::AAAA] {
            let current = self.read_rrset(session, name, rtype).await?;
            let current_ips: BTreeSet<IpAddr> = current.iter().filter_map(rdata_ip).collect();
            let wanted_here: BTreeSet<IpAddr> = wanted
                .iter()
                .copied()
                .filter(|ip| {
                    matches!(
                        (ip, rtype),
                        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
                    )
                })
                .collect();
            // Only a family we publish is managed: a host advertised with IPv4 only keeps
            // whatever AAAA records others maintain.
            if wanted_here.is_empty() || wanted_here == current_ips {
                continue;
            }
            self.add_rrset_prerequisite(message, name, rtype, current.clone());
            for rdata in &current {
                if rdata_ip(rdata).is_some_and(|ip| !wanted_here.contains(&ip)) {
                    message.add_update(self.delete_rr(name, rdata.clone()));
                    changes += 1;
                }
            }
            for ip in wanted_here.difference(&current_ips) {
                let rdata = match ip {
                    IpAddr::V4(v4) => RData::A(A::from(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA::from(*v6)),
                };
                message.add_update(self.add_rr(name, rdata));
                changes += 1;
            }
        }
        Ok(changes)
    }

    /// Desired addresses per in-zone target (when enabled).
    fn desired_addresses(
        &self,
        desired: &[DesiredSrv],
    ) -> Result<BTreeMap<Name, BTreeSet<IpAddr>>, PublishError> {
        let mut map: BTreeMap<Name, BTreeSet<IpAddr>> = BTreeMap::new();
        if !self.publish_address_records {
            return Ok(map);
        }
        for d in desired.iter().filter(|d| !d.addresses.is_empty()) {
            let name = host_name(&d.record.target).map_err(PublishError::InvalidName)?;
            if self.zone.zone_of(&name) {
                map.entry(name)
                    .or_default()
                    .extend(d.addresses.iter().copied());
            } else {
                tracing::debug!(target_host = %d.record.target, zone = %self.zone_text,
                    "address records not published: target outside the zone");
            }
        }
        Ok(map)
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, PublishError>>,
    ) -> Result<T, PublishError> {
        let bound = self.options.operation_timeout;
        tokio::time::timeout(bound, work).await.unwrap_or_else(|_| {
            Err(PublishError::Timeout {
                server: self.server_label.clone(),
                after: bound,
            })
        })
    }

    async fn open(&self) -> Result<Session, PublishError> {
        let addr = self.resolve_server().await?;
        Session::open(
            addr,
            &self.server_label,
            self.options.transport,
            self.options.request_timeout,
            self.key.as_ref(),
        )
        .await
    }

    /// Resolves `server` on every round (its address may change), bounded.
    async fn resolve_server(&self) -> Result<SocketAddr, PublishError> {
        if let Ok(ip) = self.server_host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.server_port));
        }
        let lookup = tokio::net::lookup_host((self.server_host.as_str(), self.server_port));
        let err = |reason: String| PublishError::ServerAddress {
            server: self.server_label.clone(),
            reason,
        };
        match tokio::time::timeout(self.options.request_timeout, lookup).await {
            Err(_) => Err(err("name lookup timed out".into())),
            Ok(Err(e)) => Err(err(e.to_string())),
            Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| err("no address".into())),
        }
    }

    async fn read_srv(&self, session: &Session) -> Result<Vec<SRV>, PublishError> {
        Ok(self
            .read_rrset(session, &self.srv_name, RecordType::SRV)
            .await?
            .into_iter()
            .filter_map(|r| match r {
                RData::SRV(srv) => Some(srv),
                _ => None,
            })
            .collect())
    }

    /// The rdata of one RRset at the server (empty when the name or type does not exist).
    async fn read_rrset(
        &self,
        session: &Session,
        name: &Name,
        rtype: RecordType,
    ) -> Result<Vec<RData>, PublishError> {
        let mut query = Query::query(name.clone(), rtype);
        query.set_query_class(DNSClass::IN);
        let mut message = Message::new();
        message
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(false)
            .add_query(query);
        message
            .extensions_mut()
            .get_or_insert_with(Edns::new)
            .set_max_payload(1232)
            .set_version(0);
        let answer = session.exchange(message).await?;
        let response = &answer.response;
        match response.response_code() {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            code => {
                return Err(PublishError::Rejected {
                    server: session.label().to_owned(),
                    stage: Stage::Query,
                    rcode: code.into(),
                    signed: answer.signed,
                })
            }
        }
        if response.truncated() {
            return Err(PublishError::Protocol {
                server: session.label().to_owned(),
                reason: format!("truncated answer for {name} {rtype} (use TCP)"),
            });
        }
        Ok(response
            .answers()
            .iter()
            .filter(|r| r.record_type() == rtype && r.name() == name)
            .map(|r| r.data().clone())
            .collect())
    }

    fn update_message(&self) -> Message {
        let mut zone = Query::query(self.zone.clone(), RecordType::SOA);
        zone.set_query_class(DNSClass::IN);
        let mut message = Message::new();
        message
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Update)
            .set_recursion_desired(false);
        message.add_zone(zone);
        message
    }

    /// RFC 2136 §2.4.3 (RRset does not exist) for an empty read, else §2.4.2 (RRset exists,
    /// value dependent) with exactly the records read.
    fn add_rrset_prerequisite(
        &self,
        message: &mut Message,
        name: &Name,
        rtype: RecordType,
        current: Vec<RData>,
    ) {
        if current.is_empty() {
            let mut none = Record::update0(name.clone(), 0, rtype);
            none.set_dns_class(DNSClass::NONE);
            message.add_pre_requisite(none);
        } else {
            for rdata in current {
                message.add_pre_requisite(Record::from_rdata(name.clone(), 0, rdata));
            }
        }
    }

    /// §2.5.1: add an RR (class IN, our TTL).
    fn add_rr(&self, name: &Name, rdata: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, rdata)
    }

    /// §2.5.4: delete one RR by its rdata (class NONE, TTL 0).
    fn delete_rr(&self, name: &Name, rdata: RData) -> Record {
        let mut record = Record::from_rdata(name.clone(), 0, rdata);
        record.set_dns_class(DNSClass::NONE);
        record
    }
}

fn srv_rdata(rec: &SrvRecord) -> Result<SRV, PublishError> {
    let target = host_name(&rec.target)
        .map_err(|reason| PublishError::InvalidName(format!("{:?}: {reason}", rec.target)))?;
    Ok(SRV::new(rec.priority, rec.weight, rec.port, target))
}

fn rdata_ip(rdata: &RData) -> Option<IpAddr> {
    match rdata {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

fn check_update(label: &str, answer: &crate::transport::Answer) -> Result<(), PublishError> {
    match answer.response.response_code() {
        ResponseCode::NoError if answer.signed => Ok(()),
        ResponseCode::NoError => Err(PublishError::Protocol {
            server: label.to_owned(),
            reason: "update answer failed TSIG verification".into(),
        }),
        code => Err(PublishError::Rejected {
            server: label.to_owned(),
            stage: Stage::Update,
            rcode: code.into(),
            signed: answer.signed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(hosts: &[&str]) -> BTreeSet<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn plan_adds_missing_and_keeps_present() {
        let current = vec![SrvRecord::new("node1.kms.test", 1688, 0, 100)];
        let desired = vec![
            SrvRecord::new("node1.kms.test.", 1688, 0, 100),
            SrvRecord::new("NODE2.kms.test", 1688, 10, 50),
        ];
        let plan = plan_srv(&current, &desired, &BTreeSet::new());
        assert_eq!(
            plan.adds,
            vec![SrvRecord::new("node2.kms.test", 1688, 10, 50)]
        );
        assert!(plan.deletes.is_empty());
        assert_eq!((plan.changed, plan.foreign), (0, 0));
    }

    #[test]
    fn plan_never_deletes_foreign_records() {
        let current = vec![
            SrvRecord::new("node1.kms.test", 1688, 0, 100),
            SrvRecord::new("other-kms.corp.test", 1688, 0, 0),
            SrvRecord::new("node3.kms.test", 1688, 0, 0),
        ];
        // node3 was a member once (owned), node1 is gone from the desired set.
        let plan = plan_srv(&current, &[], &owned(&["node1.kms.test", "node3.kms.test"]));
        let mut deleted: Vec<&str> = plan.deletes.iter().map(|r| r.target.as_str()).collect();
        deleted.sort();
        assert_eq!(deleted, ["node1.kms.test", "node3.kms.test"]);
        assert_eq!(plan.foreign, 1);
        // With nothing owned, nothing is deleted at all.
        let none = plan_srv(&current, &[], &BTreeSet::new());
        assert!(none.deletes.is_empty() && none.adds.is_empty());
        assert_eq!(none.foreign, 3);
    }

    #[test]
    fn plan_changes_priority_by_delete_and_add_of_that_record_only() {
        let current = vec![
            SrvRecord::new("node1.kms.test", 1688, 0, 100),
            SrvRecord::new("node2.kms.test", 1688, 10, 50),
        ];
        let desired = vec![
            SrvRecord::new("node1.kms.test", 1688, 5, 100),
            SrvRecord::new("node2.kms.test", 1688, 10, 50),
        ];
        let plan = plan_srv(&current, &desired, &BTreeSet::new());
        assert_eq!(
            plan.deletes,
            vec![SrvRecord::new("node1.kms.test", 1688, 0, 100)]
        );
        assert_eq!(
            plan.adds,
            vec![SrvRecord::new("node1.kms.test", 1688, 5, 100)]
        );
        assert_eq!(plan.changed, 1);
    }

    #[test]
    fn plan_is_empty_when_in_sync() {
        let current = vec![
            SrvRecord::new("node1.kms.test", 1688, 0, 100),
            SrvRecord::new("foreign.kms.test", 1688, 0, 100),
        ];
        let desired = vec![SrvRecord::new("node1.kms.test", 1688, 0, 100)];
        let plan = plan_srv(&current, &desired, &owned(&["node1.kms.test"]));
        assert_eq!(plan.adds.len() + plan.deletes.len(), 0);
        assert_eq!(plan.foreign, 1);
    }

    #[test]
    fn publisher_rejects_bad_targets_without_network() {
        let target = PublishTarget::new("kms.test", "127.0.0.1:9");
        let p = Publisher::with_key(&target, None, PublisherOptions::default()).unwrap();
        assert_eq!(p.srv_name(), "_vlmcs._tcp.kms.test.");
        assert_eq!(p.zone(), "kms.test");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(p.publish(&[DesiredSrv::new("10.0.0.1", 1688, 0, 0)], &BTreeSet::new()))
            .unwrap_err();
        assert!(matches!(err, PublishError::InvalidName(_)), "{err}");
    }
}
