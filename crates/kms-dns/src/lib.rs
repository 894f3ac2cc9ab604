//! `kms-dns`: publishes a KMS cluster in DNS the way clients find KMS hosts, as SRV records
//! `_vlmcs._tcp.<zone>` (RFC 2782), by RFC 2136 dynamic update signed with TSIG (RFC 8945).
//!
//! * [`config`]: the `[node]` advertise settings and `[[dns.publish]]` tables.
//! * [`Publisher`]: one zone; reads the RRset and applies minimal, prerequisite-guarded
//!   updates that only ever remove records pointing at hosts the cluster owns.
//! * [`reconciler`]: the loop (interval, on-demand, backoff, outcome callbacks, stats,
//!   graceful withdraw) that `kmsd`'s Raft leader runs.
//! * [`lookup`]: the client side, resolving the SRV set like a KMS client.
//!
//! DNS messages, TSIG and transport are hickory's (0.25 line); nothing is encoded by hand.

pub mod config;
pub mod error;
pub mod lookup;
pub mod publisher;
pub mod reconciler;
mod transport;

pub use config::{Advertise, ConfigError, DnsConfig, PublishTarget, TsigKey};
pub use error::{PublishError, Rcode, Stage};
pub use lookup::{lookup_addresses, lookup_srv, lookup_srv_ttl, LookupError};
pub use publisher::{
    normalize_host, DesiredSrv, PublishReport, Publisher, PublisherOptions, SrvRecord, SRV_SERVICE,
};
pub use reconciler::{
    spawn as spawn_reconciler, withdraw_everywhere, Action, DesiredState, Member, Outcome,
    ReconcilerHandle, ReconcilerOptions, ZoneStats, EVENT_PUBLISH_FAILED, EVENT_PUBLISH_SUCCEEDED,
};
pub use transport::Transport;
