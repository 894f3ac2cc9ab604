//! Node start-up and shutdown: storage, engine, identity, listeners, signals.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kms_core::Command;
use kms_store::{FileStorage, SledStorage, Storage};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, StorageEngine};
use crate::engine::{wall_clock_ms, Engine};
use crate::kms_server::{bind_listeners, KmsServerConfig, KmsService};
use crate::{admin, kms_server, telemetry};
use kms_raft::{ClusterConfig, KmsNode};

/// Sets up `tracing` output (text or JSON lines on stderr).
pub fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// How often freed heap memory is handed back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// glibc keeps freed memory of its per-thread arenas (snapshots and bursts of activations
/// leave large free regions behind); returning it keeps the resident size near the live
/// state.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often expired registry entries and CMIDs are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

/// Asks the leader for a new node certificate when the current one expires within
/// [`kms_raft::pki::RENEW_BEFORE_DAYS`]; the node presents it from its next start.
async fn renew_certificate_if_due(engine: &Engine, config: &Config) {
    let kms_raft::tls::Security::Pki(current) = engine.cluster().security() else {
        return;
    };
    let days = kms_raft::pki::days_left(&current.cert_der).unwrap_or(0);
    if days > kms_raft::pki::RENEW_BEFORE_DAYS {
        return;
    }
    match engine.cluster().rotate_certificate(current).await {
        Ok(creds) => match creds.save(&crate::pki::pki_dir(&config.data_dir)) {
            Ok(()) => tracing::info!(
                days_left = days,
                "node certificate renewed; presented from the next start"
            ),
            Err(e) => tracing::warn!(error = %e, "renewed node certificate not saved"),
        },
        Err(e) => {
            tracing::warn!(days_left = days, error = %e, "node certificate not renewed; retried at the next start")
        }
    }
}

/// Runs the node until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("duration_seconds".into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ],
        )
        .context("metrics buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    metrics::gauge!("kms_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    telemetry::register_metrics();
    // Written by the DNS publisher (when configured), read by status and /metrics.
    let dns_status: admin::DnsHandle = Default::default();

    // Everything kmsd writes is private to its user: the state holds the client registry
    // (workstation names, addresses) and the host identity.
    crate::hardening::private_umask();
    let tightened = crate::hardening::secure_data_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    if tightened > 0 {
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            entries = tightened,
            "removed group and world access from the data dir (now 0700, files 0600)"
        );
    }
    crate::hardening::warn_exposed_tsig_secrets(&config.dns);
    kms_core::registry::set_max_clients(config.registry_max_clients);
    tracing::info!(
        max_clients = config.registry_max_clients,
        from = %config.registry_bound_source,
        "client registry bound"
    );
    let state_dir = config.data_dir.join("state");
    let engine_kind = config.storage_engine;
    let storage = tokio::task::spawn_blocking(move || open_storage(engine_kind, &state_dir))
        .await
        .context("storage task")?
        .map_err(anyhow::Error::msg)?;
    let mut cluster_config = ClusterConfig::new(
        config.node_id,
        config.raft_listen,
        KmsNode {
            raft_addr: config.raft_advertise.clone(),
            admin_addr: config.admin_advertise.clone(),
            kms_addr: config.kms_advertise(),
            dns: crate::dns::advert(&config),
        },
    );
    cluster_config.bootstrap = config.join.is_empty();
    cluster_config.snapshot_every = config.snapshot_every;
    cluster_config.keep_logs_after_snapshot = config.snapshot_keep_logs;
    cluster_config.batch_max = config.group_commit_max;
    cluster_config.answer_deadline = config.answer_deadline;
    cluster_config.heartbeat_ms = config.raft_heartbeat_ms;
    cluster_config.election_timeout_ms = config.raft_election_timeout_ms;
    cluster_config.max_snapshot_bytes = config.raft_max_snapshot_bytes;
    cluster_config.deploy_secret_sha256 = config
        .cluster_secret
        .as_ref()
        .map(|s| kms_raft::pki::fingerprint(s.as_bytes()));
    tracing::info!(mode = config.raft_security.describe(), "raft transport");
    let (security, bootstrap_ca) = crate::pki::prepare(&config).await?;
    cluster_config.security = security;
    let engine = Engine::start(cluster_config, storage, bootstrap_ca)
        .await
        .context("cannot start the replicated state")?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Admin first: health checks and the join call of other nodes must work while this node
    // joins or elects.
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on admin address {}", config.admin_listen))?;
    tracing::info!(addr = %admin_listener.local_addr()?, "admin HTTP listening");
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on metrics address {addr}"))?,
        ),
        None => None,
    };
    let events = telemetry::event_log();
    let admin_backend = Arc::new(
        admin::NodeBackend::new(
            engine.clone(),
            prometheus,
            events.clone(),
            dns_status.clone(),
            admin::Addresses {
                kms: config.kms_listen.clone(),
                admin: admin_listener.local_addr()?,
                raft: config.raft_listen,
                metrics: match &metrics_listener {
                    Some(l) => Some(l.local_addr()?),
                    None => None,
                },
            },
        )
        .with_pki_dir(crate::pki::pki_dir(&config.data_dir)),
    );
    let router = admin::router(
        admin_backend.clone(),
        config.admin_token.clone(),
        config.admin_auth_failures,
        config.admin_auth_window,
        config.admin_tls.is_some(),
    );
    let mut admin_shutdown = shutdown_rx.clone();
    let admin_stop = async move {
        let _ = admin_shutdown.changed().await;
    };
    let admin_task = match &config.admin_tls {
        Some(files) => {
            let tls = admin::tls_server_config_from_files(&files.cert, &files.key)?;
            tracing::info!(cert = %files.cert.display(), "admin API over HTTPS");
            tokio::spawn(admin::serve_tls(admin_listener, router, tls, admin_stop))
        }
        None => {
            if !config.admin_listen.ip().is_loopback() {
                tracing::warn!(
                    addr = %config.admin_listen,
                    "admin API over plain HTTP on a non-loopback address: the token travels \
                     in clear; set --admin-tls-cert and --admin-tls-key"
                );
            }
            tokio::spawn(admin::serve(admin_listener, router, admin_stop))
        }
    };
    // Health and metrics on their own listener too, when configured (never the API).
    let metrics_task = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics HTTP listening");
        }
        let mut metrics_shutdown = shutdown_rx.clone();
        tokio::spawn(admin::serve(
            listener,
            admin::ops_router(admin_backend.clone()),
            async move {
                let _ = metrics_shutdown.changed().await;
            },
        ))
    });
    events.push(
        wall_clock_ms(),
        kms_admin::events::ids::NODE,
        "info",
        format!("node {} started", config.node_id),
        serde_json::json!({ "node_id": config.node_id, "version": env!("CARGO_PKG_VERSION") }),
    );

    if !config.join.is_empty() {
        crate::join::join_cluster(&engine, &config).await?;
    }
    let identity = engine
        .ensure_identity(Duration::from_secs(120))
        .await
        .context(
            "no host identity: no leader was elected, or the identity did not replicate here",
        )?;
    tracing::info!(
        cluster_id = %identity.cluster_id,
        hwid = %identity.hwid_hex(),
        build = identity.host_build,
        "host identity ready"
    );
    for warning in &config.config_warnings {
        tracing::warn!("{warning}");
    }
    crate::catalog::ensure_catalog(&engine, &identity, Duration::from_secs(120)).await?;
    crate::catalog::check_rpc_features(&identity, config.ndr64, config.btfn);
    if matches!(
        config.raft_security,
        crate::config::RaftSecurity::ClusterPki
    ) && engine.state().read().await.security().ca().is_some()
    {
        crate::pki::forget_ca_key(&config.data_dir);
        renew_certificate_if_due(&engine, &config).await;
    }
    let differs = match &config.policy {
        Some(policy) => engine.state().read().await.policy() != policy,
        None => false,
    };
    if let (Some(policy), true) = (&config.policy, differs) {
        match engine.propose(Command::SetPolicy(policy.clone())).await {
            Ok(kms_core::CommandResult::Policy(Ok(()))) => {
                tracing::info!("policy from configuration applied")
            }
            Ok(other) => anyhow::bail!("policy from configuration rejected: {other:?}"),
            // Only the leader writes configuration (it is never relayed between nodes).
            Err(crate::engine::EngineError::Cluster(kms_raft::ClusterError::NotLeader {
                leader,
            })) => tracing::warn!(
                leader = ?leader.map(|(id, _)| id),
                "the policy in this node's configuration differs from the cluster's; only the \
                 leader applies its configuration: change it with `kmsctl config` or on the leader"
            ),
            Err(e) => return Err(e.into()),
        }
    }

    if !config.host_keys.is_empty() {
        crate::catalog::apply_host_keys(&engine, &config.host_keys).await?;
    }

    let kms = KmsService::new(
        KmsServerConfig {
            rpc: kms_wire::server::ServerConfig {
                ndr64: config.ndr64,
                btfn: config.btfn,
                max_pdu_len: config.max_pdu_size,
            },
            max_connections: config.max_connections,
            idle_timeout: config.idle_timeout,
            max_pdus_per_connection: config.max_pdus_per_connection,
            max_connection_lifetime: config.max_connection_lifetime,
            edge: config.edge.clone(),
            allow_networks: config.allow_networks.clone(),
        },
        engine.clone(),
    );
    let listeners = bind_listeners(&config.kms_listen, config.kms_listen_is_default)?;
    let mut tasks = Vec::new();
    tokio::spawn(kms.clone().sweep_sources(shutdown_rx.clone()));
    for listener in listeners {
        tracing::info!(addr = %listener.local_addr()?, "KMS listening");
        tasks.push(tokio::spawn(
            kms.clone().serve(listener, shutdown_rx.clone()),
        ));
    }
    admin_backend.set_kms_serving();

    let dns_sink: crate::dns::OutcomeSink = Arc::new(|o: &kms_dns::Outcome| match &o.result {
        Ok(report) => {
            tracing::info!(zone = %o.zone, server = %o.server, action = ?o.action, "{}", o.message());
            telemetry::dns_publish(&o.zone, &o.server, Ok(report.records_published as u32));
        }
        Err(e) => {
            tracing::warn!(zone = %o.zone, server = %o.server, rcode = %e.label(), "{}", o.message());
            telemetry::dns_publish(&o.zone, &o.server, Err(&format!("{}: {e}", e.label())));
        }
    });
    let dns_shared = crate::dns::spawn(
        &config,
        engine.clone(),
        dns_sink.clone(),
        shutdown_rx.clone(),
    )?;
    if let Some(shared) = dns_shared.clone() {
        let status = dns_status.clone();
        let targets = config.dns.publish.clone();
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let stats = shared.stats();
                let domains = targets
                    .iter()
                    .map(|t| {
                        let s = stats
                            .iter()
                            .find(|z| z.zone.trim_end_matches('.') == t.zone.trim_end_matches('.'));
                        kms_admin::DnsDomainStatus {
                            zone: t.zone.clone(),
                            server: t.server.clone(),
                            priority: t.priority,
                            weight: t.weight,
                            ttl: t.ttl,
                            records_published: s.map(|z| z.records_published as u32).unwrap_or(0),
                            last_success_ms: s.and_then(|z| z.last_success_unix).map(|u| u * 1000),
                            last_error: s
                                .and_then(|z| z.last_error.as_ref())
                                .map(|(l, m)| format!("{l}: {m}")),
                        }
                    })
                    .collect();
                if let Ok(mut st) = status.write() {
                    *st = kms_admin::DnsStatus {
                        enabled: true,
                        domains,
                    };
                }
                for z in &stats {
                    metrics::gauge!("kms_dns_records_published", "zone" => z.zone.clone())
                        .set(z.records_published as f64);
                    if let Some(t) = z.last_success_unix {
                        metrics::gauge!("kms_dns_last_success_timestamp_seconds", "zone" => z.zone.clone()).set(t as f64);
                    }
                }
            }
        });
    }

    let mut trim_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => release_free_memory(),
                _ = trim_shutdown.changed() => return,
            }
        }
    });

    // The clock's verdict as an event (the cluster logs it and keeps an unfit node from
    // leading; `/readyz` gives the reason).
    let clock_engine = engine.clone();
    let clock_events = events.clone();
    let mut clock_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = clock_shutdown.changed() => return,
            }
            let unfit = clock_engine.cluster().clock_unfit();
            if unfit == last {
                continue;
            }
            let reading = clock_engine.cluster().clock_reading();
            let (level, message) = match &unfit {
                Some(reason) => (
                    "error",
                    format!("{reason}: this node does not stand as leader"),
                ),
                None => ("info", "wall clock agrees with the cluster time".to_owned()),
            };
            clock_events.push(
                wall_clock_ms(),
                kms_admin::events::ids::CLOCK,
                level,
                message,
                serde_json::json!({ "offset_seconds": reading.offset_seconds(), "fit_to_lead": unfit.is_none() }),
            );
            last = unfit;
        }
    });

    let expire_engine = engine.clone();
    let mut expire_shutdown = shutdown_rx.clone();
    let expire_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = expire_shutdown.changed() => return,
            }
            // One node is enough: the leader proposes, the log carries it to everyone.
            if expire_engine.view().role != kms_raft::cluster::NodeRole::Leader {
                continue;
            }
            // The cluster clock, never the raw wall clock: expiry removes at most what real
            // elapsed time explains.
            let now = expire_engine.cluster().stamp().await;
            if let Err(e) = expire_engine.propose(Command::Expire { now }).await {
                tracing::warn!(error = %e, "expiry pass failed");
            }
        }
    });

    tracing::info!(node_id = config.node_id, data_dir = %config.data_dir.display(), "kmsd ready");
    // A storage failure stops the Raft core for good (the write-ahead log refuses every
    // write after a failed fsync): the node then fail-stops, so that its supervisor
    // (systemd Restart=on-failure, Kubernetes) restarts it and the log is replayed, instead
    // of living on with a dead core and a /healthz that says ok (issue 14).
    let fatal = tokio::select! {
        _ = wait_for_signal() => None,
        why = raft_stopped(engine.cluster()) => Some(why),
    };
    match &fatal {
        None => tracing::info!(
            "shutting down: withdrawing DNS records, closing listeners, handing over leadership"
        ),
        Some(why) => tracing::error!(
            error = %why,
            "the replicated state stopped: withdrawing DNS records, closing listeners, exiting"
        ),
    }
    if dns_shared.is_some() {
        // Withdraw this node's SRV record before it stops answering.
        crate::dns::withdraw_self(&config, &dns_sink).await;
    }
    // Stop taking clients first (they move on to the next SRV record at once), so none waits
    // through the handover; activations already in the batcher still commit.
    let _ = shutdown_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let _ = expire_task.await;
    if fatal.is_none() {
        engine.cluster().step_down().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    engine.cluster().shutdown().await;
    drop(kms);
    if let Some(why) = fatal {
        anyhow::bail!("the replicated state stopped: {why}");
    }
    tracing::info!("kmsd stopped");
    Ok(())
}

/// Returns once the Raft core has stopped on a fatal error (storage, panic), with the reason.
async fn raft_stopped(cluster: &kms_raft::Cluster) -> String {
    let mut metrics = cluster.raft().metrics();
    loop {
        let state = metrics.borrow().running_state.clone();
        if let Err(fatal) = state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the Raft core exited".to_owned();
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

// Re-exported for tests that build a node in-process.
pub use kms_server::KmsService as Service;

/// `kmsd healthcheck`: exit 0 when `url` answers 200 within the timeout.
pub async fn healthcheck(url: &str, timeout_secs: u64) -> std::process::ExitCode {
    // A probe of this node's own HTTPS admin port on loopback sends no secret and needs no
    // CA: the operator's certificate names the service, not 127.0.0.1.
    let own_loopback_https = url.starts_with("https://127.") || url.starts_with("https://[::1]");
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(timeout_secs.max(1)))
        .danger_accept_invalid_certs(own_loopback_https)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kmsd healthcheck: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => std::process::ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("kmsd healthcheck: {url} answered {}", r.status());
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kmsd healthcheck: {url}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logged at every start on the sled engine (docs/storage.md says why).
pub const SLED_DEPRECATED: &str = "the sled storage engine is deprecated and will be removed: \
its flush is sync_file_range, which neither flushes the disk's write cache nor the file's \
metadata, so an acknowledged write can be lost in a power failure; the default file engine \
is also faster (docs/storage.md). Move with a new node: start an empty node with \
--storage-engine file, let it join and catch up, then remove this one";

/// Opens the state dir with `engine`, refusing a dir written by the other engine (its data
/// would silently look empty).
fn open_storage(engine: StorageEngine, dir: &Path) -> Result<Arc<dyn Storage>, String> {
    let data_dir = dir.parent().unwrap_or(dir).display();
    let (other, marker) = match engine {
        StorageEngine::File => ("sled", "db"),
        StorageEngine::Sled => ("file", "wal"),
    };
    if dir.join(marker).exists() {
        return Err(format!(
            "{data_dir} holds state of the {other} storage engine: start with --storage-engine {other} (or [storage] engine = \"{other}\")"
        ));
    }
    let opened: Result<Arc<dyn Storage>, kms_store::StorageError> = match engine {
        StorageEngine::File => FileStorage::open(dir).map(|s| {
            if let Some(cut) = s.recovered_tail() {
                tracing::warn!(%cut, "cut an unacknowledged torn write at the end of the log");
            }
            Arc::new(s) as Arc<dyn Storage>
        }),
        StorageEngine::Sled => {
            tracing::warn!(
                data_dir = %data_dir,
                "{SLED_DEPRECATED}"
            );
            SledStorage::open(dir).map(|s| Arc::new(s) as Arc<dyn Storage>)
        }
    };
    // The engines name the cause themselves (e.g. the dir is in use by another process).
    opened.map_err(|e| format!("cannot open the state in {data_dir}: {e}"))
}

fn open_offline(config: &Config) -> Result<Arc<dyn Storage>, String> {
    let dir = config.data_dir.join("state");
    if !dir.is_dir() {
        return Err(format!("{} holds no kmsd state", config.data_dir.display()));
    }
    open_storage(config.storage_engine, &dir)
}

/// `kmsd inspect`: prints the data dir's content as JSON.
pub fn inspect(config: &Config) -> std::process::ExitCode {
    let result = open_offline(config).and_then(|s| kms_raft::offline::inspect(s.as_ref()));
    match result.and_then(|i| serde_json::to_string_pretty(&i).map_err(|e| e.to_string())) {
        Ok(json) => {
            println!("{json}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmsd inspect: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `kmsd recover --force-single-node`.
pub fn recover(config: &Config) -> std::process::ExitCode {
    let node = KmsNode {
        raft_addr: config.raft_advertise.clone(),
        admin_addr: config.admin_advertise.clone(),
        kms_addr: config.kms_advertise(),
        dns: crate::dns::advert(config),
    };
    let result = open_offline(config).and_then(|s| {
        kms_raft::offline::force_single_node(s.as_ref(), config.node_id, node, wall_clock_ms())
    });
    match result {
        Ok(true) => {
            println!(
                "recovered: node {} is now the only member of a new cluster generation; start it, then let the other nodes join it with empty data directories",
                config.node_id
            );
            std::process::ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("already recovered; nothing to do");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kmsd recover: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
