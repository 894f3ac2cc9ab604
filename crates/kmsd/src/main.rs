use std::process::ExitCode;

use clap::Parser;
use kmsd::config::{Cli, Config, Subcommand};

fn main() -> ExitCode {
    // Whatever kmsd writes (the node's state, `recover`'s rewrite of it) is private to its
    // user: files 0600, directories 0700.
    kmsd::hardening::private_umask();
    let mut cli = Cli::parse();
    let command = cli.command.take();
    // Packaging helpers: need no configuration.
    match command {
        Some(Subcommand::Man) => return man(),
        Some(Subcommand::Completions { shell }) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kmsd", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
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
            if let Some(tls) = &config.admin_tls {
                if let Err(e) = kmsd::admin::tls_server_config_from_files(&tls.cert, &tls.key) {
                    eprintln!("kmsd: invalid value for admin.tls_cert: {e:#}");
                    return ExitCode::from(2);
                }
            }
            let clients = if config.allow_networks.is_empty() {
                "all".to_owned()
            } else {
                format!("{:?}", config.allow_networks)
            };
            for warning in &config.config_warnings {
                eprintln!("kmsd: warning: {warning}");
            }
            println!(
                "configuration ok: node {} data {} kms {:?} clients {} admin {} (token {}) raft {} (heartbeat {} ms, election timeout {}-{} ms) join {:?} dns targets {}\nraft transport: {}",
                config.node_id,
                config.data_dir.display(),
                config.kms_listen,
                clients,
                config.admin_listen,
                match (&config.admin_token, &config.admin_token_file) {
                    (Some(_), Some(f)) => format!("from file {}", f.display()),
                    (Some(_), None) => "set".to_owned(),
                    (None, _) => "none".to_owned(),
                },
                config.raft_listen,
                config.raft_heartbeat_ms,
                config.raft_election_timeout_ms.0,
                config.raft_election_timeout_ms.1,
                config.join,
                config.dns.publish.len(),
                config.raft_security.describe()
            );
            println!("{}", kmsd::config::edge_summary(&config));
            ExitCode::SUCCESS
        }
        Some(Subcommand::Man | Subcommand::Completions { .. }) => ExitCode::SUCCESS,
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

/// `kmsd man`: the roff page on stdout.
fn man() -> ExitCode {
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut out)
    {
        eprintln!("kmsd man: {e}");
        return ExitCode::FAILURE;
    }
    use std::io::Write;
    match std::io::stdout().write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsd man: {e}");
            ExitCode::FAILURE
        }
    }
}
