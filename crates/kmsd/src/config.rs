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

    /// File holding the admin token (read at start, surrounding white space trimmed; refused
    /// when every user may read it), instead of --admin-token so the token is not in argv
    /// [admin.token_file].
    #[arg(
        global = true,
        long,
        env = "KMSD_ADMIN_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain of the admin API: the API then speaks HTTPS only
    /// [admin.tls_cert] (default: plain HTTP).
    #[arg(global = true, long, env = "KMSD_ADMIN_TLS_CERT", value_name = "FILE")]
    pub admin_tls_cert: Option<PathBuf>,

    /// PEM private key of --admin-tls-cert [admin.tls_key].
    #[arg(global = true, long, env = "KMSD_ADMIN_TLS_KEY", value_name = "FILE")]
    pub admin_tls_key: Option<PathBuf>,

    /// Failed admin token checks one source address may make per window before it is
    /// answered 429 until the window ends; 0 = no limit [admin.auth_failures] (default 10).
    #[arg(
        global = true,
        long,
        env = "KMSD_ADMIN_AUTH_FAILURES",
        value_name = "N"
    )]
    pub admin_auth_failures: Option<u32>,

    /// The window of --admin-auth-failures, in seconds [admin.auth_window_secs] (default 60).
    #[arg(
        global = true,
        long,
        env = "KMSD_ADMIN_AUTH_WINDOW_SECS",
        value_name = "SECS"
    )]
    pub admin_auth_window_secs: Option<u64>,

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

    /// Plain TCP between nodes, without authentication: only on a loopback Raft listener (tests,
    /// several nodes on one host); logged loudly [raft.insecure_transport] (default false).
    #[arg(global = true, long, env = "KMSD_INSECURE_RAFT_TRANSPORT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_raft_transport: Option<bool>,

    /// Join token from `kmsctl cluster token create` on a member (built-in cluster PKI); the
    /// environment variable keeps it out of the process list [raft.join_token].
    #[arg(
        global = true,
        long,
        env = "KMSD_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,

    /// File with a secret shared by every node of a deployment (32+ characters; e.g. a
    /// Kubernetes Secret): nodes join with it and no per-node token; the bootstrapping node
    /// registers it as the `deploy` join token [raft.cluster_secret_file].
    #[arg(
        global = true,
        long,
        env = "KMSD_CLUSTER_SECRET_FILE",
        value_name = "FILE"
    )]
    pub cluster_secret_file: Option<PathBuf>,

    /// Largest snapshot accepted from a leader, in MiB [raft.max_snapshot_mb] (default 4096).
    #[arg(
        global = true,
        long,
        env = "KMSD_RAFT_MAX_SNAPSHOT_MB",
        value_name = "MIB"
    )]
    pub raft_max_snapshot_mb: Option<u64>,

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

    /// A cluster member to join, repeatable [raft.join]: its Raft address (host:port) with the
    /// built-in cluster PKI (and --join-token), its admin URL with --raft-tls-* or
    /// --insecure-raft-transport.
    #[arg(
        global = true,
        long,
        env = "KMSD_JOIN",
        value_name = "ADDR",
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

    /// Most concurrent KMS connections from one source address (IPv4 address or IPv6 /64);
    /// extra ones are closed; 0 = no limit [kms.max_connections_per_source] (default 256).
    #[arg(
        global = true,
        long,
        env = "KMSD_MAX_CONNECTIONS_PER_SOURCE",
        value_name = "N"
    )]
    pub max_connections_per_source: Option<u32>,

    /// New clients (CMIDs not yet registered) one source address may add per second,
    /// sustained; over it they are answered 0x800706BB (busy) and retry later; 0 = no limit
    /// [kms.new_clients_per_sec] (default 10).
    #[arg(
        global = true,
        long,
        env = "KMSD_NEW_CLIENTS_PER_SEC",
        value_name = "RATE"
    )]
    pub new_clients_per_sec: Option<f64>,

    /// New clients one source address may add at once [kms.new_clients_burst] (default 1000).
    #[arg(global = true, long, env = "KMSD_NEW_CLIENTS_BURST", value_name = "N")]
    pub new_clients_burst: Option<u32>,

    /// Source networks the per-source limits do not apply to, repeatable; `none` for no
    /// exemption [kms.edge_exempt_networks] (default 127.0.0.0/8 and ::1: load tools and a
    /// proxy on the host itself).
    #[arg(
        global = true,
        long = "edge-exempt-network",
        env = "KMSD_EDGE_EXEMPT_NETWORKS",
        value_name = "CIDR|none",
        value_delimiter = ','
    )]
    pub edge_exempt_networks: Vec<String>,

    /// Seconds one KMS connection may live, whatever it sends [kms.max_connection_secs]
    /// (default 120; a real client needs well under a second).
    #[arg(
        global = true,
        long,
        env = "KMSD_MAX_CONNECTION_SECS",
        value_name = "SECS"
    )]
    pub max_connection_secs: Option<u64>,

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

    /// Storage engine of the Raft log: file (a plain write-ahead log) or sled (deprecated) [storage.engine] (default file).
    #[arg(
        global = true,
        long,
        env = "KMSD_STORAGE_ENGINE",
        value_name = "ENGINE"
    )]
    pub storage_engine: Option<StorageEngine>,

    /// Most clients kept in the registry (inventory); when full the least recently seen make
    /// room [storage.registry_max_clients] (default: from the memory limit, 300 bytes per
    /// client after a 64 MiB reserve, between 10,000 and 20,000,000).
    #[arg(
        global = true,
        long,
        env = "KMSD_REGISTRY_MAX_CLIENTS",
        value_name = "N"
    )]
    pub registry_max_clients: Option<usize>,

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
    /// Print the man page (roff) of kmsd (packaging).
    #[command(hide = true)]
    Man,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
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
    /// The sled embedded database. Deprecated (a warning at every start): its flush does not
    /// reach the disk's write cache (docs/storage.md).
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
    pub max_connections_per_source: Option<u32>,
    pub new_clients_per_sec: Option<f64>,
    pub new_clients_burst: Option<u32>,
    pub max_connection_secs: Option<u64>,
    pub edge_exempt_networks: Option<Vec<String>>,
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
    pub token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub auth_failures: Option<u32>,
    pub auth_window_secs: Option<u64>,
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
    pub insecure_transport: Option<bool>,
    pub join_token: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    pub max_snapshot_mb: Option<u64>,
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
    pub registry_max_clients: Option<usize>,
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
    /// Where the admin token came from (`--admin-token-file`), for check-config.
    pub admin_token_file: Option<PathBuf>,
    /// Certificate chain and key files of the admin API (HTTPS when set).
    pub admin_tls: Option<AdminTlsFiles>,
    /// Failed token checks per source and window before 429 (0 = no limit).
    pub admin_auth_failures: u32,
    pub admin_auth_window: std::time::Duration,
    /// Extra listener serving only `/healthz`, `/readyz` and `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// How the node-to-node transport is secured.
    pub raft_security: RaftSecurity,
    /// Join token for the built-in cluster PKI.
    pub join_token: Option<kms_raft::pki::JoinTokenString>,
    /// The deployment's shared join secret (built-in cluster PKI).
    pub cluster_secret: Option<String>,
    pub raft_max_snapshot_bytes: u64,
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
    pub max_connection_lifetime: std::time::Duration,
    /// Per-source limits of the KMS listeners.
    pub edge: crate::edge::EdgeLimits,
    /// Registry bound and where it came from (setting or memory limit).
    pub registry_max_clients: usize,
    pub registry_bound_source: String,
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

/// The admin API's certificate chain and private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `none` (alone) or CIDR networks; a plain address means that one address.
fn parse_exempt(list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::new();
    for item in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if item.eq_ignore_ascii_case("none") {
            continue;
        }
        let net = item
            .parse::<IpNet>()
            .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                invalid(
                    "kms.edge_exempt_networks",
                    format!("{item:?} is not a network (CIDR), an address or none"),
                )
            })?;
        out.push(net);
    }
    Ok(out)
}

/// Reads the admin token file: trimmed, at least 16 characters, not readable by every user.
fn read_token_file(path: &Path) -> Result<String, ConfigError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| {
            invalid(
                "admin.token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(invalid(
                "admin.token_file",
                format!(
                    "{} is readable by every user (mode {mode:03o}): run `chmod 600 {}` (or 640 \
                     with a group that only kmsd's user is in)",
                    path.display(),
                    path.display()
                ),
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            "admin.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid(
            "admin.token_file",
            format!("{} is empty", path.display()),
        ));
    }
    Ok(token.to_owned())
}

/// How the node-to-node transport is secured (one source: flags, file, default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftSecurity {
    /// The built-in cluster PKI (default): certificates from the cluster CA, join tokens.
    ClusterPki,
    /// The operator's own PKI (`--raft-tls-*`).
    OperatorPki(kms_raft::network::TlsFiles),
    /// Plain TCP (`--insecure-raft-transport`), loopback only.
    Insecure,
}

impl RaftSecurity {
    /// One line for `check-config` and the start-up log.
    pub fn describe(&self) -> &'static str {
        match self {
            RaftSecurity::ClusterPki => {
                "cluster-pki (mutual TLS with certificates of the built-in cluster CA; nodes join with tokens)"
            }
            RaftSecurity::OperatorPki(_) => {
                "operator-pki (mutual TLS with the certificates of --raft-tls-*)"
            }
            RaftSecurity::Insecure => {
                "INSECURE (plain TCP between nodes, no authentication; loopback only)"
            }
        }
    }
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
        let insecure = cli
            .insecure_raft_transport
            .or(file.raft.insecure_transport)
            .unwrap_or(false);
        let join_token = cli.join_token.clone().or(file.raft.join_token.clone());
        let raft_security = match (raft_tls, insecure) {
            (Some(_), true) => {
                return Err(invalid(
                    "raft.insecure_transport",
                    "--insecure-raft-transport and --raft-tls-* exclude each other",
                ))
            }
            (Some(files), false) => RaftSecurity::OperatorPki(files),
            (None, true) => {
                if !raft_listen.ip().is_loopback() {
                    return Err(invalid(
                        "raft.insecure_transport",
                        format!(
                            "plain TCP between nodes is refused on the non-loopback Raft listener {raft_listen}: \
                             anyone who reaches it could rewrite the cluster's state; drop the flag \
                             (the built-in cluster PKI is the default) or use --raft-tls-*"
                        ),
                    ));
                }
                RaftSecurity::Insecure
            }
            (None, false) => RaftSecurity::ClusterPki,
        };
        let join_token = match (&raft_security, join_token) {
            (_, None) => None,
            (RaftSecurity::ClusterPki, Some(t)) => Some(
                kms_raft::pki::JoinTokenString::parse(&t)
                    .map_err(|e| invalid("raft.join_token", e.to_string()))?,
            ),
            (_, Some(_)) => {
                return Err(invalid(
                    "raft.join_token",
                    "join tokens belong to the built-in cluster PKI; with --raft-tls-* or \
                     --insecure-raft-transport nodes join through the admin API",
                ))
            }
        };
        let cluster_secret = match cli
            .cluster_secret_file
            .clone()
            .or(file.raft.cluster_secret_file.clone())
        {
            None => None,
            Some(_) if !matches!(raft_security, RaftSecurity::ClusterPki) => {
                return Err(invalid(
                    "raft.cluster_secret_file",
                    "a cluster secret belongs to the built-in cluster PKI",
                ))
            }
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        "raft.cluster_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let secret = text.trim().to_owned();
                if secret.len() < kms_raft::pki::MIN_DEPLOY_SECRET {
                    return Err(invalid(
                        "raft.cluster_secret_file",
                        format!(
                            "{} holds {} characters; a cluster secret needs at least {} \
                             (e.g. `openssl rand -hex 32`)",
                            path.display(),
                            secret.len(),
                            kms_raft::pki::MIN_DEPLOY_SECRET
                        ),
                    ));
                }
                Some(secret)
            }
        };
        let max_snapshot_mb = cli
            .raft_max_snapshot_mb
            .or(file.raft.max_snapshot_mb)
            .unwrap_or(4096);
        if !(16..=1_048_576).contains(&max_snapshot_mb) {
            return Err(invalid(
                "raft.max_snapshot_mb",
                format!("{max_snapshot_mb} is outside 16..=1048576"),
            ));
        }
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
        // One source of truth: the token comes from exactly one place. Flag or variable
        // (--admin-token, --admin-token-file, KMSD_ADMIN_TOKEN[_FILE]) over the config file.
        let admin_token_file = match (&cli.admin_token_file, &cli.admin_token) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(_)) => None,
            (None, None) => {
                if file.admin.token.is_some() && file.admin.token_file.is_some() {
                    return Err(invalid(
                        "admin.token_file",
                        "set either [admin] token or [admin] token_file, not both",
                    ));
                }
                file.admin.token_file.clone()
            }
        };
        let admin_token = match &admin_token_file {
            Some(path) => Some(read_token_file(path)?),
            None => cli.admin_token.clone().or(file.admin.token.clone()),
        };
        if admin_token.as_deref().is_some_and(|t| t.trim().len() < 16) {
            return Err(invalid("admin.token", "must be at least 16 characters"));
        }
        // Without a token anyone who reaches the admin port could change the policy.
        if admin_token.is_none() && !admin_listen.ip().is_loopback() {
            return Err(invalid(
                "admin.token",
                format!(
                    "admin.listen {admin_listen} is not a loopback address: set an admin token \
                     (--admin-token-file, --admin-token, KMSD_ADMIN_TOKEN or [admin] token)"
                ),
            ));
        }
        let admin_tls = match (
            cli.admin_tls_cert.clone().or(file.admin.tls_cert.clone()),
            cli.admin_tls_key.clone().or(file.admin.tls_key.clone()),
        ) {
            (Some(cert), Some(key)) => Some(AdminTlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "admin.tls_cert",
                    "--admin-tls-cert and --admin-tls-key go together",
                ))
            }
        };
        let admin_auth_failures = cli
            .admin_auth_failures
            .or(file.admin.auth_failures)
            .unwrap_or(10);
        let auth_window = cli
            .admin_auth_window_secs
            .or(file.admin.auth_window_secs)
            .unwrap_or(60);
        if !(1..=86_400).contains(&auth_window) {
            return Err(invalid(
                "admin.auth_window_secs",
                format!("{auth_window} is outside 1..=86400"),
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
        let edge = crate::edge::EdgeLimits {
            max_connections_per_source: cli
                .max_connections_per_source
                .or(file.kms.max_connections_per_source)
                .unwrap_or(crate::edge::DEFAULT_MAX_CONNECTIONS_PER_SOURCE),
            new_clients_per_sec: cli
                .new_clients_per_sec
                .or(file.kms.new_clients_per_sec)
                .unwrap_or(crate::edge::DEFAULT_NEW_CLIENTS_PER_SEC),
            new_clients_burst: cli
                .new_clients_burst
                .or(file.kms.new_clients_burst)
                .unwrap_or(crate::edge::DEFAULT_NEW_CLIENTS_BURST),
            max_sources: crate::edge::DEFAULT_MAX_SOURCES,
            exempt: {
                let list = if cli.edge_exempt_networks.is_empty() {
                    file.kms.edge_exempt_networks.clone()
                } else {
                    Some(cli.edge_exempt_networks.clone())
                };
                match list {
                    None => crate::edge::default_exempt(),
                    Some(list) => parse_exempt(&list)?,
                }
            },
        };
        if !(edge.new_clients_per_sec.is_finite()
            && (0.0..=1_000_000.0).contains(&edge.new_clients_per_sec))
        {
            return Err(invalid(
                "kms.new_clients_per_sec",
                format!(
                    "{} is outside 0..=1000000 (0 = no limit)",
                    edge.new_clients_per_sec
                ),
            ));
        }
        if !(1..=10_000_000).contains(&edge.new_clients_burst) {
            return Err(invalid(
                "kms.new_clients_burst",
                format!("{} is outside 1..=10000000", edge.new_clients_burst),
            ));
        }
        let lifetime = cli
            .max_connection_secs
            .or(file.kms.max_connection_secs)
            .unwrap_or(120);
        if !(1..=86_400).contains(&lifetime) {
            return Err(invalid(
                "kms.max_connection_secs",
                format!("{lifetime} is outside 1..=86400"),
            ));
        }
        let (registry_max_clients, registry_bound_source) = match cli
            .registry_max_clients
            .or(file.storage.registry_max_clients)
        {
            Some(n) if n < 1000 => {
                return Err(invalid(
                    "storage.registry_max_clients",
                    format!("{n} is below 1000"),
                ))
            }
            Some(n) => (n, "setting".to_owned()),
            None => match crate::memory::memory_limit() {
                Some(limit) => (
                    crate::memory::clients_for(limit.bytes),
                    format!("{} MiB from {}", limit.bytes >> 20, limit.source),
                ),
                None => (
                    kms_core::registry::MAX_CLIENTS,
                    "built-in default (memory limit unknown)".to_owned(),
                ),
            },
        };
        let snapshot_every = cli
            .snapshot_every
            .or(file.storage.snapshot_every)
            .unwrap_or(10_000);
        if snapshot_every == 0 {
            return Err(invalid("storage.snapshot_every", "must be >= 1"));
        }
        let join = if cli.join.is_empty() {
            file.raft.join.clone().unwrap_or_default()
        } else {
            cli.join.clone()
        };
        if matches!(raft_security, RaftSecurity::ClusterPki) {
            if let Some(url) = join
                .iter()
                .find(|j| j.starts_with("http://") || j.starts_with("https://"))
            {
                return Err(invalid(
                    "raft.join",
                    format!(
                        "{url} is an admin URL; with the built-in cluster PKI --join names a \
                         member's Raft address (host:7688) and goes with --join-token"
                    ),
                ));
            }
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
            admin_token_file,
            admin_tls,
            admin_auth_failures,
            admin_auth_window: std::time::Duration::from_secs(auth_window),
            metrics_listen,
            raft_security,
            join_token,
            cluster_secret,
            raft_max_snapshot_bytes: max_snapshot_mb * 1024 * 1024,
            answer_deadline: std::time::Duration::from_millis(answer_ms),
            raft_heartbeat_ms: heartbeat_ms,
            raft_election_timeout_ms: (election_min, election_max),
            advertise,
            dns: file.dns,
            join,
            max_connections,
            idle_timeout: std::time::Duration::from_secs(idle),
            max_pdu_size,
            max_pdus_per_connection: max_pdus,
            max_connection_lifetime: std::time::Duration::from_secs(lifetime),
            edge,
            registry_max_clients,
            registry_bound_source,
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

/// The second line of `kmsd check-config`: admin transport and auth limit, edge limits and
/// the registry bound.
pub fn edge_summary(config: &Config) -> String {
    let admin = match &config.admin_tls {
        Some(t) => format!("https (cert {})", t.cert.display()),
        None if config.admin_listen.ip().is_loopback() => "http (loopback)".to_owned(),
        None => {
            "http (NOT loopback: token in clear; set --admin-tls-cert/--admin-tls-key)".to_owned()
        }
    };
    let auth = if config.admin_auth_failures == 0 {
        "no limit".to_owned()
    } else {
        format!(
            "429 after {} failures per {} s",
            config.admin_auth_failures,
            config.admin_auth_window.as_secs()
        )
    };
    let per = |n: u32| {
        if n == 0 {
            "no limit".to_owned()
        } else {
            n.to_string()
        }
    };
    let exempt = if config.edge.exempt.is_empty() {
        "none".to_owned()
    } else {
        config
            .edge
            .exempt
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rate = if config.edge.new_clients_per_sec <= 0.0 {
        "no limit".to_owned()
    } else {
        format!(
            "{}/s burst {}",
            config.edge.new_clients_per_sec, config.edge.new_clients_burst
        )
    };
    format!(
        "limits: admin {admin}, auth {auth}; per source address: connections {}, new clients {rate}, exempt {exempt}; connection lifetime {} s, {} PDUs; registry max {} clients ({})",
        per(config.edge.max_connections_per_source),
        config.max_connection_lifetime.as_secs(),
        config.max_pdus_per_connection,
        config.registry_max_clients,
        config.registry_bound_source
    )
}

impl Config {
    /// The health URL of this node's admin listener (loopback when it listens on any address).
    pub fn local_health_url(&self) -> String {
        // With HTTPS on the admin port, the plain metrics listener (when there is one) is
        // the simpler probe target.
        let (mut addr, scheme) = match (&self.admin_tls, self.metrics_listen) {
            (Some(_), Some(metrics)) => (metrics, "http"),
            (Some(_), None) => (self.admin_listen, "https"),
            (None, _) => (self.admin_listen, "http"),
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv6() {
                std::net::Ipv6Addr::LOCALHOST.into()
            } else {
                std::net::Ipv4Addr::LOCALHOST.into()
            });
        }
        format!("{scheme}://{addr}/healthz")
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
    fn edge_limits_from_file_and_flags_with_keys_named() {
        let cfg = Config::merge(parse(&[]), FileConfig::default()).unwrap();
        assert_eq!(cfg.edge, crate::edge::EdgeLimits::default());
        assert_eq!(cfg.max_connection_lifetime.as_secs(), 120);
        assert_eq!(
            (cfg.admin_auth_failures, cfg.admin_auth_window.as_secs()),
            (10, 60)
        );
        let file: FileConfig = toml::from_str(
            "[kms]\nmax_connections_per_source = 32\nnew_clients_per_sec = 2.5\n\
             new_clients_burst = 50\nedge_exempt_networks = [\"10.1.0.0/16\"]\n\
             max_connection_secs = 30\n[storage]\nregistry_max_clients = 200000\n\
             [admin]\nauth_failures = 5\nauth_window_secs = 600\n",
        )
        .unwrap();
        let cfg = Config::merge(parse(&["--new-clients-burst", "70"]), file).unwrap();
        assert_eq!(cfg.edge.max_connections_per_source, 32);
        assert_eq!(cfg.edge.new_clients_per_sec, 2.5);
        assert_eq!(cfg.edge.new_clients_burst, 70);
        assert_eq!(
            cfg.edge.exempt,
            vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(cfg.max_connection_lifetime.as_secs(), 30);
        assert_eq!(cfg.registry_max_clients, 200_000);
        assert_eq!(cfg.registry_bound_source, "setting");
        assert_eq!(
            (cfg.admin_auth_failures, cfg.admin_auth_window.as_secs()),
            (5, 600)
        );
        let cfg = Config::merge(
            parse(&["--edge-exempt-network", "none"]),
            FileConfig::default(),
        )
        .unwrap();
        assert!(cfg.edge.exempt.is_empty());
        for (args, key) in [
            (
                &["--new-clients-per-sec", "NaN"][..],
                "kms.new_clients_per_sec",
            ),
            (&["--new-clients-burst", "0"][..], "kms.new_clients_burst"),
            (
                &["--max-connection-secs", "0"][..],
                "kms.max_connection_secs",
            ),
            (
                &["--edge-exempt-network", "nope"][..],
                "kms.edge_exempt_networks",
            ),
            (
                &["--registry-max-clients", "10"][..],
                "storage.registry_max_clients",
            ),
            (
                &["--admin-auth-window-secs", "0"][..],
                "admin.auth_window_secs",
            ),
            (&["--admin-tls-cert", "/x.pem"][..], "admin.tls_cert"),
        ] {
            let err = Config::merge(parse(args), FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains(key), "{args:?}: {err}");
        }
    }

    #[test]
    fn token_and_token_file_in_the_file_are_exclusive() {
        let file: FileConfig = toml::from_str(
            "[admin]\ntoken = \"0123456789abcdef\"\ntoken_file = \"/run/secrets/t\"\n",
        )
        .unwrap();
        let err = Config::merge(parse(&[]), file).unwrap_err();
        assert!(err.to_string().contains("admin.token_file"), "{err}");
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
