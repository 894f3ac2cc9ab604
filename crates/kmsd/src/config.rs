//! Configuration: defaults < TOML file (`--config`) < environment (`KMSD_*`) < flags.
//!
//! Every file key has a flag and an environment variable; `kmsd --help` lists them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use ipnet::IpNet;
use kms_core::policy::ProductPolicy;
use kms_core::Policy;
use serde::Deserialize;
use uuid::Uuid;

/// Command line of `kmsd`. Every option may also be given as `KMSD_<NAME>` in the
/// environment or in the TOML file named by `--config` (section and key in brackets).
#[derive(Debug, Parser, Default)]
#[command(
    name = "kmsd",
    version,
    about = "KMS host node: answers Windows and Office volume activation on TCP 1688",
    long_about = "KMS host node: answers Windows and Office volume activation (KMS protocol v4, v5, v6) \
on TCP 1688 and keeps its state (CMID cache, counts, client registry, policy, host identity) \
durably in its data directory.\n\nWith no arguments it starts a working single node: KMS on \
0.0.0.0:1688 and [::]:1688, data in ./kmsd-data, admin HTTP on 127.0.0.1:8688.\n\n\
Precedence: flag > environment variable > config file > built-in default."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// TOML configuration file.
    #[arg(global = true, long, env = "KMSD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// KMS listen address, repeatable [kms.listen] (default 0.0.0.0:1688 and [::]:1688).
    #[arg(
        global = true,
        long = "kms-listen",
        env = "KMSD_KMS_LISTEN",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub kms_listen: Vec<SocketAddr>,

    /// Directory of the durable state [node.data_dir] (default ./kmsd-data).
    #[arg(global = true, long, env = "KMSD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Node id within the cluster, >= 1 [node.id] (default 1).
    #[arg(global = true, long, env = "KMSD_NODE_ID", value_name = "N")]
    pub node_id: Option<u64>,

    /// Admin HTTP listen address: /healthz, /metrics [admin.listen] (default 127.0.0.1:8688).
    #[arg(global = true, long, env = "KMSD_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,

    /// Raft listen address [raft.listen] (default 127.0.0.1:7688; used by the cluster mode).
    #[arg(global = true, long, env = "KMSD_RAFT_LISTEN", value_name = "ADDR")]
    pub raft_listen: Option<SocketAddr>,

    /// Address peers use to reach this node's Raft listener [raft.advertise] (default: --raft-listen).
    #[arg(
        global = true,
        long,
        env = "KMSD_RAFT_ADVERTISE",
        value_name = "HOST:PORT"
    )]
    pub raft_advertise: Option<String>,

    /// Address operators and joining nodes use for this node's admin API [admin.advertise]
    /// (default: --admin-listen).
    #[arg(
        global = true,
        long,
        env = "KMSD_ADMIN_ADVERTISE",
        value_name = "HOST:PORT"
    )]
    pub admin_advertise: Option<String>,

    /// Bearer token of the admin API; also sent when joining a cluster [admin.token].
    #[arg(
        global = true,
        long,
        env = "KMSD_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Separate listener for /healthz, /readyz and /metrics only, e.g. for a Prometheus on
    /// another network than operators [admin.metrics_listen] (default: none; they are always
    /// on --admin-listen too).
    #[arg(global = true, long, env = "KMSD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// PEM certificate of this node for mutual TLS between nodes [raft.tls.cert].
    #[arg(global = true, long, env = "KMSD_RAFT_TLS_CERT", value_name = "FILE", requires_all = ["raft_tls_key", "raft_tls_ca"])]
    pub raft_tls_cert: Option<PathBuf>,

    /// PEM private key of this node [raft.tls.key].
    #[arg(global = true, long, env = "KMSD_RAFT_TLS_KEY", value_name = "FILE")]
    pub raft_tls_key: Option<PathBuf>,

    /// PEM CA certificate that signed every node's certificate [raft.tls.ca].
    #[arg(global = true, long, env = "KMSD_RAFT_TLS_CA", value_name = "FILE")]
    pub raft_tls_ca: Option<PathBuf>,

    /// Name every node certificate carries (SAN) [raft.tls.server_name] (default kmsd).
    #[arg(
        global = true,
        long,
        env = "KMSD_RAFT_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    pub raft_tls_server_name: Option<String>,

    /// Milliseconds a client waits for a commit before the node answers from its last
    /// committed state (no quorum) [raft.answer_deadline_ms] (default 2500).
    #[arg(
        global = true,
        long,
        env = "KMSD_ANSWER_DEADLINE_MS",
        value_name = "MS"
    )]
    pub answer_deadline_ms: Option<u64>,

    /// Milliseconds between the leader's heartbeats [raft.heartbeat_ms] (default 100).
    #[arg(global = true, long, env = "KMSD_RAFT_HEARTBEAT_MS", value_name = "MS")]
    pub raft_heartbeat_ms: Option<u64>,

    /// Shortest wait without a heartbeat before a follower calls an election; at least 3
    /// heartbeats [raft.election_timeout_min_ms] (default 400). Failover takes about
    /// max + a random value in min..max; for nodes in different sites raise it, the maximum
    /// and the heartbeat together.
    #[arg(
        global = true,
        long,
        env = "KMSD_RAFT_ELECTION_TIMEOUT_MIN_MS",
        value_name = "MS"
    )]
    pub raft_election_timeout_min_ms: Option<u64>,

    /// Longest such wait, above the minimum [raft.election_timeout_max_ms] (default 800).
    #[arg(
        global = true,
        long,
        env = "KMSD_RAFT_ELECTION_TIMEOUT_MAX_MS",
        value_name = "MS"
    )]
    pub raft_election_timeout_max_ms: Option<u64>,

    /// Host name clients use for this node; the SRV target published in DNS [node.advertise_host].
    #[arg(global = true, long, env = "KMSD_ADVERTISE_HOST", value_name = "HOST")]
    pub advertise_host: Option<String>,

    /// KMS port clients use for this node [node.advertise_port] (default: the first --kms-listen port).
    #[arg(global = true, long, env = "KMSD_ADVERTISE_PORT", value_name = "PORT")]
    pub advertise_port: Option<u16>,

    /// Admin URL of a cluster member to join, repeatable [raft.join] (cluster mode).
    #[arg(
        global = true,
        long,
        env = "KMSD_JOIN",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub join: Vec<String>,

    /// Most concurrent KMS connections; extra clients are refused [kms.max_connections] (default 10000).
    #[arg(global = true, long, env = "KMSD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Seconds a KMS connection may stay idle or take to deliver one PDU [kms.idle_timeout_secs] (default 30).
    #[arg(
        global = true,
        long,
        env = "KMSD_IDLE_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub idle_timeout_secs: Option<u64>,

    /// Largest accepted DCE/RPC fragment in bytes [kms.max_pdu_size] (default 4096).
    #[arg(global = true, long, env = "KMSD_MAX_PDU_SIZE", value_name = "BYTES")]
    pub max_pdu_size: Option<usize>,

    /// Most PDUs one connection may send before it is closed [kms.max_pdus_per_connection] (default 1000).
    #[arg(
        global = true,
        long,
        env = "KMSD_MAX_PDUS_PER_CONNECTION",
        value_name = "N"
    )]
    pub max_pdus_per_connection: Option<u64>,

    /// Client networks allowed to connect, repeatable; empty = all [kms.allow_networks].
    #[arg(
        global = true,
        long = "allow-network",
        env = "KMSD_ALLOW_NETWORKS",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    pub allow_networks: Vec<IpNet>,

    /// Offer NDR64 in bind negotiation like a modern Windows host [kms.ndr64] (default true).
    #[arg(global = true, long, env = "KMSD_NDR64", value_name = "BOOL")]
    pub ndr64: Option<bool>,

    /// Answer bind-time feature negotiation [kms.btfn] (default true).
    #[arg(global = true, long, env = "KMSD_BTFN", value_name = "BOOL")]
    pub btfn: Option<bool>,

    /// Storage engine of the Raft log: file (a plain write-ahead log) or sled [storage.engine] (default file).
    #[arg(
        global = true,
        long,
        env = "KMSD_STORAGE_ENGINE",
        value_name = "ENGINE"
    )]
    pub storage_engine: Option<StorageEngine>,

    /// Write a state snapshot and compact the log every N entries [storage.snapshot_every] (default 10000).
    #[arg(global = true, long, env = "KMSD_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u64>,

    /// Log entries kept behind a snapshot for lagging followers [storage.snapshot_keep_logs] (default 1000).
    #[arg(global = true, long, env = "KMSD_SNAPSHOT_KEEP_LOGS", value_name = "N")]
    pub snapshot_keep_logs: Option<u64>,

    /// Most activations committed by one flush (group commit) [storage.group_commit_max] (default 512).
    #[arg(global = true, long, env = "KMSD_GROUP_COMMIT_MAX", value_name = "N")]
    pub group_commit_max: Option<usize>,

    /// Minutes a failed client waits before retrying [policy.activation_interval] (15..=43200, default 120).
    #[arg(
        global = true,
        long,
        env = "KMSD_ACTIVATION_INTERVAL",
        value_name = "MIN"
    )]
    pub activation_interval: Option<u32>,

    /// Minutes between renewals [policy.renewal_interval] (15..=43200, default 10080).
    #[arg(global = true, long, env = "KMSD_RENEWAL_INTERVAL", value_name = "MIN")]
    pub renewal_interval: Option<u32>,

    /// Product policy: open (any KMS id) or strict (only licensed CSVLKs) [policy.product_policy].
    #[arg(
        global = true,
        long,
        env = "KMSD_PRODUCT_POLICY",
        value_name = "open|strict"
    )]
    pub product_policy: Option<ProductPolicyArg>,

    /// Installed Windows KMS host key group (CSVLK activation id) [policy.windows_host_key]
    /// (default: the newest in the catalog, Windows Server 2025; see `kmsctl products`).
    #[arg(
        global = true,
        long,
        env = "KMSD_WINDOWS_HOST_KEY",
        value_name = "GUID"
    )]
    pub windows_host_key: Option<Uuid>,

    /// Installed Office 2013+ KMS host key group [policy.office_host_key] (default: newest,
    /// Office LTSC 2024).
    #[arg(global = true, long, env = "KMSD_OFFICE_HOST_KEY", value_name = "GUID")]
    pub office_host_key: Option<Uuid>,

    /// Installed Office 2010 KMS host key group [policy.office2010_host_key].
    #[arg(
        global = true,
        long,
        env = "KMSD_OFFICE2010_HOST_KEY",
        value_name = "GUID"
    )]
    pub office2010_host_key: Option<Uuid>,

    /// Deprecated: licensed CSVLK ids [policy.licensed_csvlks]; each is mapped to the host key
    /// of its application (the newest one listed wins) with a warning.
    #[arg(
        long = "licensed-csvlk",
        env = "KMSD_LICENSED_CSVLKS",
        value_name = "GUID",
        value_delimiter = ','
    )]
    pub licensed_csvlks: Vec<Uuid>,

    /// Refuse clients whose clock is off by more than this many minutes (0xC004F06C); 0 = off
    /// [policy.max_clock_skew_minutes] (a genuine host uses 240 when enabled).
    #[arg(
        global = true,
        long,
        env = "KMSD_MAX_CLOCK_SKEW_MINUTES",
        value_name = "MIN"
    )]
    pub max_clock_skew_minutes: Option<u32>,

    /// Days a client stays in the registry after it was last seen [policy.registry_retention_days] (default 180).
    #[arg(
        global = true,
        long,
        env = "KMSD_REGISTRY_RETENTION_DAYS",
        value_name = "DAYS"
    )]
    pub registry_retention_days: Option<u32>,

    /// Log format: text or json [log.format] (default text).
    #[arg(global = true, long, env = "KMSD_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<LogFormat>,

    /// Log filter, e.g. info or kmsd=debug [log.level] (default info; RUST_LOG also works).
    #[arg(global = true, long, env = "KMSD_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// One-shot commands (without one, `kmsd` runs the node).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Subcommand {
    /// Probe the node's /healthz and exit 0 if it answers 200 (container health checks;
    /// needs no shell or curl in the image).
    Healthcheck {
        /// URL to probe (default: http://<admin listen>/healthz from the configuration,
        /// 0.0.0.0 and :: replaced by loopback).
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value_t = 2)]
        timeout_secs: u64,
    },
    /// Load and validate the configuration, print a summary, and exit.
    CheckConfig,
    /// Print what the (stopped) node's data dir holds as JSON: cluster id, members, last log
    /// index, snapshot, registered clients, queued activations.
    Inspect,
    /// Lost quorum for good: turn this stopped node's data dir into a one-node cluster that
    /// keeps identity, counts and registry, with a new cluster id (old members are refused).
    Recover {
        /// Required: confirms that the other members are gone for good.
        #[arg(long)]
        force_single_node: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductPolicyArg {
    Open,
    Strict,
}

/// Where the Raft log, vote and metadata live (snapshots are plain files with either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageEngine {
    /// Append-only segment files, one fdatasync per group-commit batch (measured faster and
    /// smaller than sled: docs/benchmarks.md).
    #[default]
    File,
    /// The sled embedded database.
    Sled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The TOML file. Unknown keys are an error so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub kms: KmsSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub raft: RaftSection,
    #[serde(default)]
    pub storage: StorageSection,
    /// Present = the file's policy is authoritative and is applied at start-up.
    pub policy: Option<PolicySection>,
    /// DNS SRV publishing: `[[dns.publish]]` tables (one per domain).
    #[serde(default)]
    pub dns: kms_dns::DnsConfig,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub advertise_host: Option<String>,
    pub advertise_port: Option<u16>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    pub listen: Option<Vec<SocketAddr>>,
    pub max_connections: Option<usize>,
    pub idle_timeout_secs: Option<u64>,
    pub max_pdu_size: Option<usize>,
    pub max_pdus_per_connection: Option<u64>,
    pub allow_networks: Option<Vec<IpNet>>,
    pub ndr64: Option<bool>,
    pub btfn: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftSection {
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub join: Option<Vec<String>>,
    pub answer_deadline_ms: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    pub tls: Option<TlsSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub engine: Option<StorageEngine>,
    pub snapshot_every: Option<u64>,
    pub snapshot_keep_logs: Option<u64>,
    pub group_commit_max: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub activation_interval: Option<u32>,
    pub renewal_interval: Option<u32>,
    pub product_policy: Option<ProductPolicyArg>,
    pub licensed_csvlks: Option<Vec<Uuid>>,
    pub windows_host_key: Option<Uuid>,
    pub office_host_key: Option<Uuid>,
    pub office2010_host_key: Option<Uuid>,
    pub max_clock_skew_minutes: Option<u32>,
    pub client_networks: Option<Vec<IpNet>>,
    pub registry_retention_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
}

/// The resolved configuration the node runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub kms_listen: Vec<SocketAddr>,
    /// True when the listen list is the built-in default (an unavailable IPv6 stack is then
    /// tolerated instead of failing start-up).
    pub kms_listen_is_default: bool,
    pub admin_listen: SocketAddr,
    pub raft_listen: SocketAddr,
    /// How peers reach this node's Raft listener.
    pub raft_advertise: String,
    /// How operators and joining nodes reach this node's admin API.
    pub admin_advertise: String,
    pub admin_token: Option<String>,
    /// Extra listener serving only `/healthz`, `/readyz` and `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    pub raft_tls: Option<kms_raft::network::TlsFiles>,
    pub answer_deadline: std::time::Duration,
    /// Leader heartbeat interval, in milliseconds.
    pub raft_heartbeat_ms: u64,
    /// Election timeout range (min, max), in milliseconds.
    pub raft_election_timeout_ms: (u64, u64),
    pub join: Vec<String>,
    /// SRV target of this node (with `[[dns.publish]]`).
    pub advertise: Option<kms_dns::Advertise>,
    pub dns: kms_dns::DnsConfig,
    pub max_connections: usize,
    pub idle_timeout: std::time::Duration,
    pub max_pdu_size: usize,
    pub max_pdus_per_connection: u64,
    pub allow_networks: Vec<IpNet>,
    pub ndr64: bool,
    pub btfn: bool,
    pub storage_engine: StorageEngine,
    pub snapshot_every: u64,
    pub snapshot_keep_logs: u64,
    pub group_commit_max: usize,
    /// Policy to enforce at start-up, when the file or flags name any policy key.
    pub policy: Option<Policy>,
    /// Host key per application id named by the configuration (others: catalog default).
    pub host_keys: std::collections::BTreeMap<Uuid, Uuid>,
    /// Warnings about deprecated settings, logged once logging is up.
    pub config_warnings: Vec<String>,
    pub log_format: LogFormat,
    pub log_level: String,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

pub const DEFAULT_KMS_PORT: u16 = 1688;

fn default_kms_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], DEFAULT_KMS_PORT)),
        SocketAddr::from(([0u16; 8], DEFAULT_KMS_PORT)),
    ]
}

impl Config {
    /// Reads `--config` (if any) and merges it under the command line and environment.
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    pub fn merge(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let cli_section = cli_policy_section(&cli);
        let (host_keys, config_warnings) = resolve_host_keys(&cli_section, file.policy.as_ref())?;
        let policy = resolve_policy(&cli_section, file.policy.as_ref())?;
        let raft_listen = cli
            .raft_listen
            .or(file.raft.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7688)));
        let admin_listen = cli
            .admin_listen
            .or(file.admin.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8688)));
        let raft_advertise = cli
            .raft_advertise
            .clone()
            .or(file.raft.advertise.clone())
            .unwrap_or_else(|| raft_listen.to_string());
        let admin_advertise = cli
            .admin_advertise
            .clone()
            .or(file.admin.advertise.clone())
            .unwrap_or_else(|| admin_listen.to_string());
        let raft_tls = match (
            &cli.raft_tls_cert,
            &cli.raft_tls_key,
            &cli.raft_tls_ca,
            &file.raft.tls,
        ) {
            (Some(cert), Some(key), Some(ca), _) => Some(kms_raft::network::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                server_name: cli
                    .raft_tls_server_name
                    .clone()
                    .unwrap_or_else(|| "kmsd".into()),
            }),
            (None, None, None, Some(t)) => Some(kms_raft::network::TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
                ca: t.ca.clone(),
                server_name: cli
                    .raft_tls_server_name
                    .clone()
                    .or(t.server_name.clone())
                    .unwrap_or_else(|| "kmsd".into()),
            }),
            (None, None, None, None) => None,
            _ => {
                return Err(invalid(
                    "raft.tls",
                    "--raft-tls-cert, --raft-tls-key and --raft-tls-ca go together",
                ))
            }
        };
        let answer_ms = cli
            .answer_deadline_ms
            .or(file.raft.answer_deadline_ms)
            .unwrap_or(2500);
        if !(100..=20_000).contains(&answer_ms) {
            return Err(invalid(
                "raft.answer_deadline_ms",
                format!("{answer_ms} is outside 100..=20000 (clients give up after 10 to 30 s)"),
            ));
        }
        let heartbeat_ms = cli
            .raft_heartbeat_ms
            .or(file.raft.heartbeat_ms)
            .unwrap_or(100);
        if !(10..=10_000).contains(&heartbeat_ms) {
            return Err(invalid(
                "raft.heartbeat_ms",
                format!("{heartbeat_ms} is outside 10..=10000"),
            ));
        }
        let election_min = cli
            .raft_election_timeout_min_ms
            .or(file.raft.election_timeout_min_ms)
            .unwrap_or(400);
        let election_max = cli
            .raft_election_timeout_max_ms
            .or(file.raft.election_timeout_max_ms)
            .unwrap_or(800);
        // Fewer than 3 heartbeats per timeout calls elections on a merely slow leader.
        if election_min < heartbeat_ms.saturating_mul(3) {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                format!(
                    "{election_min} is below 3 heartbeats ({} ms with raft.heartbeat_ms {heartbeat_ms})",
                    heartbeat_ms.saturating_mul(3)
                ),
            ));
        }
        if election_max <= election_min || election_max > 60_000 {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                format!("{election_max} must be above raft.election_timeout_min_ms ({election_min}) and at most 60000"),
            ));
        }
        let first_kms_port = cli
            .kms_listen
            .first()
            .or(file.kms.listen.as_ref().and_then(|l| l.first()))
            .map(|a| a.port())
            .unwrap_or(DEFAULT_KMS_PORT);
        let advertise = match cli
            .advertise_host
            .clone()
            .or(file.node.advertise_host.clone())
        {
            Some(host) => {
                let a = kms_dns::Advertise {
                    advertise_host: host,
                    advertise_port: cli
                        .advertise_port
                        .or(file.node.advertise_port)
                        .unwrap_or(first_kms_port),
                };
                a.validate()
                    .map_err(|e| invalid("node.advertise_host", e.to_string()))?;
                Some(a)
            }
            None => None,
        };
        file.dns
            .validate()
            .map_err(|e| invalid("dns.publish", e.to_string()))?;
        if !file.dns.publish.is_empty() && advertise.is_none() {
            return Err(invalid(
                "node.advertise_host",
                "DNS publishing needs the host name clients use for this node",
            ));
        }
        let admin_token = cli.admin_token.clone().or(file.admin.token.clone());
        if admin_token.as_deref().is_some_and(|t| t.trim().len() < 16) {
            return Err(invalid("admin.token", "must be at least 16 characters"));
        }
        // Without a token anyone who reaches the admin port could change the policy.
        if admin_token.is_none() && !admin_listen.ip().is_loopback() {
            return Err(invalid(
                "admin.token",
                format!(
                    "admin.listen {admin_listen} is not a loopback address: set an admin token \
                     (--admin-token, KMSD_ADMIN_TOKEN or [admin] token)"
                ),
            ));
        }
        let metrics_listen = cli.metrics_listen.or(file.admin.metrics_listen);
        let (kms_listen, kms_listen_is_default) = if !cli.kms_listen.is_empty() {
            (cli.kms_listen, false)
        } else if let Some(list) = file.kms.listen {
            (list, false)
        } else {
            (default_kms_listen(), true)
        };
        if kms_listen.is_empty() {
            return Err(invalid("kms.listen", "at least one address is needed"));
        }
        let node_id = cli.node_id.or(file.node.id).unwrap_or(1);
        if node_id == 0 {
            return Err(invalid("node.id", "must be >= 1"));
        }
        let idle = cli
            .idle_timeout_secs
            .or(file.kms.idle_timeout_secs)
            .unwrap_or(30);
        if !(1..=600).contains(&idle) {
            return Err(invalid(
                "kms.idle_timeout_secs",
                format!("{idle} is outside 1..=600"),
            ));
        }
        let max_pdu_size = cli.max_pdu_size.or(file.kms.max_pdu_size).unwrap_or(4096);
        if !(1024..=65535).contains(&max_pdu_size) {
            return Err(invalid(
                "kms.max_pdu_size",
                format!("{max_pdu_size} is outside 1024..=65535 (a v6 NDR64 request is 300 bytes)"),
            ));
        }
        let max_connections = cli
            .max_connections
            .or(file.kms.max_connections)
            .unwrap_or(10_000);
        if max_connections == 0 {
            return Err(invalid("kms.max_connections", "must be >= 1"));
        }
        let max_pdus = cli
            .max_pdus_per_connection
            .or(file.kms.max_pdus_per_connection)
            .unwrap_or(1000);
        if max_pdus < 2 {
            return Err(invalid(
                "kms.max_pdus_per_connection",
                "must be >= 2 (bind + request)",
            ));
        }
        let snapshot_every = cli
            .snapshot_every
            .or(file.storage.snapshot_every)
            .unwrap_or(10_000);
        if snapshot_every == 0 {
            return Err(invalid("storage.snapshot_every", "must be >= 1"));
        }
        let group_commit_max = cli
            .group_commit_max
            .or(file.storage.group_commit_max)
            .unwrap_or(512);
        if group_commit_max == 0 {
            return Err(invalid("storage.group_commit_max", "must be >= 1"));
        }
        Ok(Self {
            node_id,
            data_dir: cli
                .data_dir
                .or(file.node.data_dir)
                .unwrap_or_else(|| PathBuf::from("kmsd-data")),
            kms_listen,
            kms_listen_is_default,
            admin_listen,
            raft_listen,
            raft_advertise,
            admin_advertise,
            admin_token,
            metrics_listen,
            raft_tls,
            answer_deadline: std::time::Duration::from_millis(answer_ms),
            raft_heartbeat_ms: heartbeat_ms,
            raft_election_timeout_ms: (election_min, election_max),
            advertise,
            dns: file.dns,
            join: if cli.join.is_empty() {
                file.raft.join.unwrap_or_default()
            } else {
                cli.join
            },
            max_connections,
            idle_timeout: std::time::Duration::from_secs(idle),
            max_pdu_size,
            max_pdus_per_connection: max_pdus,
            allow_networks: if cli.allow_networks.is_empty() {
                file.kms.allow_networks.unwrap_or_default()
            } else {
                cli.allow_networks
            },
            ndr64: cli.ndr64.or(file.kms.ndr64).unwrap_or(true),
            btfn: cli.btfn.or(file.kms.btfn).unwrap_or(true),
            storage_engine: cli
                .storage_engine
                .or(file.storage.engine)
                .unwrap_or_default(),
            snapshot_every,
            snapshot_keep_logs: cli
                .snapshot_keep_logs
                .or(file.storage.snapshot_keep_logs)
                .unwrap_or(1000),
            group_commit_max,
            policy,
            host_keys,
            config_warnings,
            log_format: cli.log_format.or(file.log.format).unwrap_or_default(),
            log_level: cli
                .log_level
                .or(file.log.level)
                .unwrap_or_else(|| "info".to_owned()),
        })
    }
}

impl Config {
    /// A KMS address the other nodes can reach for health probes: the first listen address,
    /// an unspecified IP replaced by the host of the Raft address (the client-facing
    /// `advertise_host` may only resolve in the clients' DNS).
    pub fn kms_advertise(&self) -> String {
        let Some(first) = self.kms_listen.first() else {
            return String::new();
        };
        if first.ip().is_unspecified() {
            let host = self
                .raft_advertise
                .rsplit_once(':')
                .map(|(h, _)| h.to_owned())
                .unwrap_or_else(|| "127.0.0.1".into());
            format!("{host}:{}", first.port())
        } else {
            first.to_string()
        }
    }
}

impl Config {
    /// The health URL of this node's admin listener (loopback when it listens on any address).
    pub fn local_health_url(&self) -> String {
        let mut addr = self.admin_listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv6() {
                std::net::Ipv6Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            });
        }
        format!("http://{addr}/healthz")
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn cli_policy_section(cli: &Cli) -> PolicySection {
    PolicySection {
        activation_interval: cli.activation_interval,
        renewal_interval: cli.renewal_interval,
        product_policy: cli.product_policy,
        licensed_csvlks: (!cli.licensed_csvlks.is_empty()).then(|| cli.licensed_csvlks.clone()),
        windows_host_key: cli.windows_host_key,
        office_host_key: cli.office_host_key,
        office2010_host_key: cli.office2010_host_key,
        max_clock_skew_minutes: cli.max_clock_skew_minutes,
        client_networks: None,
        registry_retention_days: cli.registry_retention_days,
    }
}

/// Host keys per application from the configuration: the explicit keys, plus the legacy
/// `licensed_csvlks` mapped to the newest listed key of each application (with a warning).
/// Checked against the compiled-in catalog (the replicated one re-checks in `apply`).
fn resolve_host_keys(
    cli: &PolicySection,
    file: Option<&PolicySection>,
) -> Result<(std::collections::BTreeMap<Uuid, Uuid>, Vec<String>), ConfigError> {
    use kms_catalog::well_known::{OFFICE_2010, OFFICE_2013, WINDOWS};
    let empty = PolicySection::default();
    let file = file.unwrap_or(&empty);
    let cat = kms_catalog::catalog();
    let mut keys = std::collections::BTreeMap::new();
    let mut warnings = Vec::new();
    if let Some(legacy) = cli
        .licensed_csvlks
        .clone()
        .or_else(|| file.licensed_csvlks.clone())
    {
        let mut mapped = Vec::new();
        for id in &legacy {
            let Some(c) = cat.csvlk(id).filter(|c| !c.application_id.is_nil()) else {
                return Err(ConfigError::Invalid {
                    key: "policy.licensed_csvlks",
                    message: format!("{id} is not a KMS host key of the catalog"),
                });
            };
            let newer = keys
                .get(&c.application_id)
                .and_then(|k| cat.csvlk(k))
                .is_none_or(|old| old.release_date < c.release_date);
            if newer {
                keys.insert(c.application_id, c.id);
            }
            mapped.push(c.name);
        }
        // Applications the list did not cover have no host key (strict refuses them, as
        // the list did).
        for app in [WINDOWS, OFFICE_2013, OFFICE_2010] {
            keys.entry(app).or_insert(Uuid::nil());
        }
        warnings.push(format!(
            "policy.licensed_csvlks (--licensed-csvlk) is deprecated: a host has one host key per \
             application; mapped [{}] to host keys [{}]; use windows_host_key, office_host_key \
             and office2010_host_key instead",
            mapped.join(", "),
            keys.iter()
                .map(|(app, k)| format!(
                    "{}: {}",
                    cat.application(app).map_or("?", |a| a.name),
                    cat.csvlk(k).map_or("none", |c| c.name)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (key_name, app, value) in [
        (
            "policy.windows_host_key",
            WINDOWS,
            cli.windows_host_key.or(file.windows_host_key),
        ),
        (
            "policy.office_host_key",
            OFFICE_2013,
            cli.office_host_key.or(file.office_host_key),
        ),
        (
            "policy.office2010_host_key",
            OFFICE_2010,
            cli.office2010_host_key.or(file.office2010_host_key),
        ),
    ] {
        let Some(id) = value else { continue };
        if id.is_nil() {
            keys.insert(app, id); // no host key installed for this application
            continue;
        }
        match cat.csvlk(&id) {
            Some(c) if c.application_id == app => {
                keys.insert(app, id);
            }
            Some(c) => {
                return Err(ConfigError::Invalid {
                    key: key_name,
                    message: format!("{id} ({}) is a host key of another application", c.name),
                })
            }
            None => {
                return Err(ConfigError::Invalid {
                    key: key_name,
                    message: format!(
                        "{id} is not a KMS host key of the catalog (see `kmsctl products`)"
                    ),
                })
            }
        }
    }
    Ok((keys, warnings))
}

fn section_is_empty(s: &PolicySection) -> bool {
    s.activation_interval.is_none()
        && s.renewal_interval.is_none()
        && s.product_policy.is_none()
        && s.licensed_csvlks.is_none()
        && s.max_clock_skew_minutes.is_none()
        && s.client_networks.is_none()
        && s.registry_retention_days.is_none()
}

/// Builds the start-up policy from flags over the file; `None` when neither names a key
/// (the replicated policy then stays as it is).
fn resolve_policy(
    cli: &PolicySection,
    file: Option<&PolicySection>,
) -> Result<Option<Policy>, ConfigError> {
    let empty = PolicySection::default();
    let file = file.unwrap_or(&empty);
    if section_is_empty(cli) && section_is_empty(file) {
        return Ok(None);
    }
    let defaults = Policy::default();
    // Not given: the genuine host's 4 hours; 0 switches the check off.
    let skew = cli
        .max_clock_skew_minutes
        .or(file.max_clock_skew_minutes)
        .or(defaults.max_clock_skew_minutes);
    let policy = Policy {
        activation_interval: cli
            .activation_interval
            .or(file.activation_interval)
            .unwrap_or(defaults.activation_interval),
        renewal_interval: cli
            .renewal_interval
            .or(file.renewal_interval)
            .unwrap_or(defaults.renewal_interval),
        product_policy: match cli.product_policy.or(file.product_policy) {
            Some(ProductPolicyArg::Strict) => ProductPolicy::Strict,
            Some(ProductPolicyArg::Open) | None => ProductPolicy::Open,
        },
        // Mapped to host keys by `resolve_host_keys`; never replicated as a list again.
        licensed_csvlks: Vec::new(),
        max_clock_skew_minutes: skew.filter(|m| *m != 0),
        client_networks: cli
            .client_networks
            .clone()
            .or_else(|| file.client_networks.clone())
            .unwrap_or_default(),
        registry_retention_days: cli
            .registry_retention_days
            .or(file.registry_retention_days)
            .unwrap_or(defaults.registry_retention_days),
    };
    policy.validate().map_err(|e| ConfigError::Invalid {
        key: match e.field {
            "activation_interval" => "policy.activation_interval",
            "renewal_interval" => "policy.renewal_interval",
            "max_clock_skew_minutes" => "policy.max_clock_skew_minutes",
            "registry_retention_days" => "policy.registry_retention_days",
            "licensed_csvlks" => "policy.licensed_csvlks",
            _ => "policy",
        },
        message: e.message,
    })?;
    Ok(Some(policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut all = vec!["kmsd"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("valid command line")
    }

    #[test]
    fn host_keys_from_the_readme_example_and_legacy_lists() {
        use kms_catalog::well_known::{OFFICE_2010, OFFICE_2013, WINDOWS};
        let ws2019 = Uuid::parse_str("2e7a9ad1-a849-4b56-babe-17d5a29fe4b4").unwrap();
        let o2016 = Uuid::parse_str("98ebfe73-2084-4c97-932c-c0cd1643bea7").unwrap();
        // The README's [policy] example.
        let file: FileConfig = toml::from_str(&format!(
            "[policy]\nproduct_policy = \"strict\"\nwindows_host_key = \"{ws2019}\"\noffice_host_key = \"{o2016}\"\n"
        ))
        .unwrap();
        let cfg = Config::merge(parse(&[]), file).unwrap();
        assert_eq!(
            cfg.host_keys,
            [(WINDOWS, ws2019), (OFFICE_2013, o2016)].into()
        );
        assert!(cfg.config_warnings.is_empty());
        let policy = cfg.policy.unwrap();
        assert_eq!(policy.product_policy, ProductPolicy::Strict);
        assert_eq!(policy.max_clock_skew_minutes, Some(240), "genuine default");
        // The old list: mapped per application with a warning, uncovered ones get no key.
        let cfg = Config::merge(
            parse(&[
                "--licensed-csvlk",
                &o2016.to_string(),
                "--licensed-csvlk",
                &ws2019.to_string(),
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(
            cfg.host_keys,
            [
                (WINDOWS, ws2019),
                (OFFICE_2013, o2016),
                (OFFICE_2010, Uuid::nil())
            ]
            .into()
        );
        assert!(
            cfg.config_warnings[0].contains("deprecated"),
            "{:?}",
            cfg.config_warnings
        );
        assert!(cfg.policy.unwrap().licensed_csvlks.is_empty());
        // A key of another application is an error naming the setting.
        let err = Config::merge(
            parse(&["--windows-host-key", &o2016.to_string()]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("policy.windows_host_key"), "{err}");
        let err = Config::merge(
            parse(&["--licensed-csvlk", &Uuid::from_u128(5).to_string()]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("policy.licensed_csvlks"), "{err}");
    }

    #[test]
    fn defaults_give_a_working_single_node() {
        let cfg = Config::merge(parse(&[]), FileConfig::default()).unwrap();
        assert_eq!(cfg.kms_listen, default_kms_listen());
        assert!(cfg.kms_listen_is_default);
        assert_eq!(cfg.data_dir, PathBuf::from("kmsd-data"));
        assert_eq!(cfg.admin_listen.to_string(), "127.0.0.1:8688");
        assert_eq!(cfg.raft_listen.to_string(), "127.0.0.1:7688");
        assert_eq!(cfg.idle_timeout.as_secs(), 30);
        assert!(cfg.policy.is_none());
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig = toml::from_str(
            r#"
            [node]
            id = 3
            data_dir = "/var/lib/kmsd"
            [kms]
            listen = ["127.0.0.1:1700"]
            idle_timeout_secs = 10
            [policy]
            renewal_interval = 1440
            "#,
        )
        .unwrap();
        let cfg = Config::merge(
            parse(&["--kms-listen", "127.0.0.1:1800", "--idle-timeout-secs", "5"]),
            file,
        )
        .unwrap();
        assert_eq!(cfg.node_id, 3);
        assert_eq!(cfg.kms_listen, vec!["127.0.0.1:1800".parse().unwrap()]);
        assert_eq!(cfg.idle_timeout.as_secs(), 5);
        let policy = cfg.policy.unwrap();
        assert_eq!(policy.renewal_interval, 1440);
        assert_eq!(policy.activation_interval, 120);
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("[kms]\nlisten_addr = []\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let err =
            Config::merge(parse(&["--renewal-interval", "5"]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("policy.renewal_interval"), "{err}");
        let err =
            Config::merge(parse(&["--max-pdu-size", "10"]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("kms.max_pdu_size"), "{err}");
    }

    #[test]
    fn non_loopback_admin_listener_needs_a_token() {
        let err = Config::merge(
            parse(&["--admin-listen", "0.0.0.0:8688"]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("admin.token"), "{err}");
        let cfg = Config::merge(
            parse(&[
                "--admin-listen",
                "0.0.0.0:8688",
                "--admin-token",
                "0123456789abcdef0123",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(cfg.admin_token.as_deref(), Some("0123456789abcdef0123"));
        // Loopback without a token is fine (local operators only), IPv6 too.
        assert!(Config::merge(
            parse(&["--admin-listen", "[::1]:8688"]),
            FileConfig::default()
        )
        .is_ok());
    }

    #[test]
    fn metrics_listener_from_flag_or_file() {
        let file: FileConfig = toml::from_str(
            "[admin]\nmetrics_listen = \"127.0.0.1:9100\"\ntoken = \"0123456789abcdef\"\n",
        )
        .unwrap();
        let cfg = Config::merge(parse(&[]), file).unwrap();
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(cfg.admin_token.as_deref(), Some("0123456789abcdef"));
        let cfg = Config::merge(
            parse(&["--metrics-listen", "127.0.0.1:9200"]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9200".parse().unwrap()));
        assert_eq!(
            Config::merge(parse(&[]), FileConfig::default())
                .unwrap()
                .metrics_listen,
            None
        );
    }

    #[test]
    fn raft_timing_from_file_and_flags_with_bounds() {
        let cfg = Config::merge(parse(&[]), FileConfig::default()).unwrap();
        assert_eq!(cfg.raft_heartbeat_ms, 100);
        assert_eq!(cfg.raft_election_timeout_ms, (400, 800));

        // A multi-site cluster: slower heartbeats and elections from the file.
        let file: FileConfig = toml::from_str(
            "[raft]\nheartbeat_ms = 500\nelection_timeout_min_ms = 2000\nelection_timeout_max_ms = 4000\n",
        )
        .unwrap();
        let cfg = Config::merge(parse(&["--raft-election-timeout-max-ms", "5000"]), file).unwrap();
        assert_eq!(cfg.raft_heartbeat_ms, 500);
        assert_eq!(cfg.raft_election_timeout_ms, (2000, 5000));

        for (args, key) in [
            (&["--raft-heartbeat-ms", "5"][..], "raft.heartbeat_ms"),
            (
                &[
                    "--raft-heartbeat-ms",
                    "200",
                    "--raft-election-timeout-min-ms",
                    "500",
                ][..],
                "raft.election_timeout_min_ms",
            ),
            (
                &[
                    "--raft-election-timeout-min-ms",
                    "600",
                    "--raft-election-timeout-max-ms",
                    "600",
                ][..],
                "raft.election_timeout_max_ms",
            ),
            (
                &["--raft-election-timeout-max-ms", "90000"][..],
                "raft.election_timeout_max_ms",
            ),
        ] {
            let err = Config::merge(parse(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains(key), "{args:?}: {err}");
        }
    }
}
