//! Node start-up and shutdown: storage, engine, identity, listeners, signals.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kms_core::Command;
use kms_store::SledStorage;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::engine::{wall_clock_ms, Engine, EngineConfig};
use crate::kms_server::{bind_listeners, KmsServerConfig, KmsService};
use crate::{admin, kms_server};

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

/// How often expired registry entries and CMIDs are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

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

    if !config.join.is_empty() {
        tracing::warn!(join = ?config.join, "--join is accepted but this build runs a single node; ignored");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let state_dir = config.data_dir.join("state");
    let storage = tokio::task::spawn_blocking(move || SledStorage::open(&state_dir))
        .await
        .context("storage task")?
        .with_context(|| {
            format!(
                "cannot open the state in {} (is another kmsd using it?)",
                config.data_dir.display()
            )
        })?;
    let (engine, committer) = Engine::open(
        Arc::new(storage),
        EngineConfig {
            snapshot_every: config.snapshot_every,
            group_commit_max: config.group_commit_max,
        },
    )
    .await
    .context("cannot recover the state")?;
    let identity = engine.ensure_identity().await.context("host identity")?;
    tracing::info!(
        cluster_id = %identity.cluster_id,
        hwid = %identity.hwid_hex(),
        build = identity.host_build,
        "host identity ready"
    );
    if let Some(policy) = &config.policy {
        if engine.state().read().await.policy() != policy {
            match engine.propose(Command::SetPolicy(policy.clone())).await? {
                kms_core::CommandResult::Policy(Ok(())) => {
                    tracing::info!("policy from configuration applied")
                }
                other => anyhow::bail!("policy from configuration rejected: {other:?}"),
            }
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
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
            allow_networks: config.allow_networks.clone(),
        },
        engine.clone(),
    );
    let listeners = bind_listeners(&config.kms_listen, config.kms_listen_is_default)?;
    let mut tasks = Vec::new();
    for listener in listeners {
        tracing::info!(addr = %listener.local_addr()?, "KMS listening");
        tasks.push(tokio::spawn(
            kms.clone().serve(listener, shutdown_rx.clone()),
        ));
    }

    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on admin address {}", config.admin_listen))?;
    tracing::info!(addr = %admin_listener.local_addr()?, "admin HTTP listening");
    let router = admin::router(admin::AdminState {
        engine: engine.clone(),
        prometheus,
        node_id: config.node_id,
    });
    let mut admin_shutdown = shutdown_rx.clone();
    let admin_task = tokio::spawn(admin::serve(admin_listener, router, async move {
        let _ = admin_shutdown.changed().await;
    }));

    let expire_engine = engine.clone();
    let mut expire_shutdown = shutdown_rx.clone();
    let expire_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = expire_shutdown.changed() => return,
            }
            if let Err(e) = expire_engine
                .propose(Command::Expire {
                    now: wall_clock_ms(),
                })
                .await
            {
                tracing::warn!(error = %e, "expiry pass failed");
            }
        }
    });

    tracing::info!(node_id = config.node_id, data_dir = %config.data_dir.display(), "kmsd ready");
    wait_for_signal().await;
    tracing::info!("shutting down: closing listeners and connections");
    let _ = shutdown_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let _ = expire_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    // Dropping the last engine handle ends the committer after it drains what was queued.
    drop(kms);
    drop(engine);
    let _ = tokio::time::timeout(Duration::from_secs(10), committer).await;
    tracing::info!("kmsd stopped");
    Ok(())
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
