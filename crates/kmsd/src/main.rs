use std::process::ExitCode;

use clap::Parser;
use kmsd::config::{Cli, Config, Subcommand};

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let command = cli.command.take();
    let config = match Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kmsd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmsd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Some(Subcommand::CheckConfig) => {
            let clients = if config.allow_networks.is_empty() {
                "all".to_owned()
            } else {
                format!("{:?}", config.allow_networks)
            };
            for warning in &config.config_warnings {
                eprintln!("kmsd: warning: {warning}");
            }
            println!(
                "configuration ok: node {} data {} kms {:?} clients {} admin {} (token {}) raft {} (heartbeat {} ms, election timeout {}-{} ms) join {:?} dns targets {}",
                config.node_id,
                config.data_dir.display(),
                config.kms_listen,
                clients,
                config.admin_listen,
                if config.admin_token.is_some() { "set" } else { "none" },
                config.raft_listen,
                config.raft_heartbeat_ms,
                config.raft_election_timeout_ms.0,
                config.raft_election_timeout_ms.1,
                config.join,
                config.dns.publish.len()
            );
            ExitCode::SUCCESS
        }
        Some(Subcommand::Inspect) => kmsd::node::inspect(&config),
        Some(Subcommand::Recover { force_single_node }) => {
            if !force_single_node {
                eprintln!("kmsd recover: add --force-single-node to confirm the other members are gone for good");
                return ExitCode::from(2);
            }
            kmsd::node::recover(&config)
        }
        Some(Subcommand::Healthcheck { url, timeout_secs }) => {
            let url = url.unwrap_or_else(|| config.local_health_url());
            runtime.block_on(kmsd::node::healthcheck(&url, timeout_secs))
        }
        None => {
            kmsd::node::init_logging(&config);
            match runtime.block_on(kmsd::node::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("kmsd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
