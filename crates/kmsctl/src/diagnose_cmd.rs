//! `kmsctl diagnose`: arguments and output (the checks are in `kmsctl::diagnose`).

use std::time::Duration;

use clap::Args;
use kmsctl::diagnose::{self, Options, Start};
use kmsctl::products;
use uuid::Uuid;

/// Exit code when a check failed.
const EXIT_PROBLEM: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("start").required(true).args(["domain", "server"])))]
pub struct DiagnoseArgs {
    /// DNS domain of the clients: look up `_vlmcs._tcp.DOMAIN` like a Windows client.
    #[arg(long)]
    pub domain: Option<String>,
    /// One KMS host, HOST[:PORT] (port 1688 by default), as set with `slmgr /skms`.
    #[arg(long)]
    pub server: Option<String>,
    /// DNS server to ask (HOST[:PORT]); default: the system resolver.
    #[arg(long)]
    pub dns: Option<String>,
    /// Admin API of a node (http(s)://HOST:PORT) for the host's view: quorum, DNS
    /// publishing, clock, policy and recent refusals of this machine's address.
    #[arg(long, env = "KMSCTL_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Bearer token of the admin API.
    #[arg(long, env = "KMSCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Product the test activations claim to be: an alias (windows, server, office, ...), a
    /// SKU GUID or a name.
    #[arg(long, default_value = "windows")]
    pub product: String,
    /// Client machine id of the test activations (default: a fixed id, so diagnose counts
    /// as one client however often it runs).
    #[arg(long)]
    pub cmid: Option<Uuid>,
    /// Seconds to wait for each lookup, connect and answer.
    #[arg(long, default_value_t = 5)]
    pub timeout_secs: u64,
    /// Print the report as one JSON object (for scripts).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: DiagnoseArgs) -> u8 {
    let product = match products::resolve(&args.product) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kmsctl: --product: {e}");
            return EXIT_USAGE;
        }
    };
    let dns = match &args.dns {
        Some(text) => match kmsctl::discover::parse_dns_server(text).await {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("kmsctl: --dns: {e}");
                return EXIT_USAGE;
            }
        },
        None => None,
    };
    let start = match (args.domain, args.server) {
        (Some(d), _) => Start::Domain(d),
        (None, Some(s)) => {
            if let Err(e) = diagnose::parse_server(&s) {
                eprintln!("kmsctl: --server: {e}");
                return EXIT_USAGE;
            }
            Start::Server(s)
        }
        (None, None) => {
            eprintln!("kmsctl: diagnose needs --domain or --server");
            return EXIT_USAGE;
        }
    };
    let options = Options {
        start,
        dns,
        admin_url: args.admin_url,
        token: args.token,
        product,
        cmid: args.cmid.unwrap_or(diagnose::DIAGNOSE_CMID),
        timeout: Duration::from_secs(args.timeout_secs.clamp(1, 300)),
    };
    let report = diagnose::run(&options).await;
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("kmsctl: cannot encode the report: {e}");
                return EXIT_PROBLEM;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.ok {
        0
    } else {
        EXIT_PROBLEM
    }
}
