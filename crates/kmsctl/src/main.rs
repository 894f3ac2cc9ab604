//! `kmsctl`: operate a node through its admin API (status, cluster, clients, events, config,
//! products), activate as a KMS client, generate load. Exit codes: 0 success, 1 a request was
//! refused or failed verification, 2 usage error, 3 the host or admin API could not be
//! reached, 4 the admin API refused the token (401/403), 5 the admin API answered another
//! error (400 invalid input, 404, 409, 503, 5xx).

mod admin_cmd;
mod diagnose_cmd;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kms_wire::client::BindOptions;
use kms_wire::hresult;
use kmsctl::bench::{self, BenchConfig};
use kmsctl::client::{Answer, KmsClient, KmsClientError};
use kmsctl::products::{self, RequestTemplate};
use serde_json::json;
use uuid::Uuid;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "kmsctl",
    version,
    about = "Operate and test a kms-cluster KMS host",
    after_help = "Admin commands talk to a node's admin API: --url or KMSCTL_ADMIN_URL \
(default http://127.0.0.1:8688), token from --token or KMSCTL_TOKEN, CA of an https:// node from --ca-cert or KMSCTL_CA_CERT.\n\n\
Exit codes:\n  0  success\n  1  an activation was refused or failed verification (activate, bench); diagnose found a problem\n  \
2  usage error (bad arguments)\n  3  the KMS host or the admin API could not be reached\n  \
4  the admin API refused the token (HTTP 401/403)\n  \
5  the admin API answered another error (400 invalid input, 404 not found, 409 conflict, 503 no leader, 5xx)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Host status like `slmgr /dlv`: counts, requests, intervals, ePIDs, node and leader.
    Status(admin_cmd::StatusArgs),
    /// Cluster members: `list` or `remove ID`.
    #[command(subcommand)]
    Cluster(admin_cmd::ClusterCmd),
    /// Registered clients: table, --json or --csv; filters and paging.
    Clients(admin_cmd::ClientsArgs),
    /// The node's event log (activations 12290, DNS publishing 12293/12294, operations).
    Events(admin_cmd::EventsArgs),
    /// Replicated configuration: `get` or `set KEY=VALUE ...`.
    #[command(subcommand)]
    Config(admin_cmd::ConfigCmd),
    /// Product catalog: each product group, whether it activates and through which host key.
    Products(admin_cmd::ProductsArgs),
    /// The replicated catalog: `show`, `export`, `import FILE`.
    #[command(subcommand)]
    Catalog(admin_cmd::CatalogCmd),
    /// Act as a KMS client: send activation requests and verify every answer like vlmcs.
    Activate(ActivateArgs),
    /// Generate a bounded activation load and report throughput and latency.
    Bench(BenchArgs),
    /// Resolve `_vlmcs._tcp.DOMAIN` and print the order a Windows client would try the hosts
    /// in (RFC 2782: lowest priority first, weighted random within a priority).
    Discover(DiscoverArgs),
    /// Walk the path a Windows client takes (SRV lookup, name resolution, TCP, RPC bind, one
    /// activation per protocol version, count against N, clock, policy; with --admin-url the
    /// host's view) and say in plain words where it breaks and what to do. Exit 1 when
    /// something breaks.
    Diagnose(diagnose_cmd::DiagnoseArgs),
    /// Print the man page (roff) of kmsctl or of one subcommand (packaging).
    #[command(hide = true)]
    Man {
        /// Subcommand whose page to print (e.g. `activate`); default: kmsctl itself.
        subcommand: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
}

#[derive(Args)]
struct DiscoverArgs {
    /// DNS domain whose `_vlmcs._tcp` SRV records list the KMS hosts.
    domain: String,
    /// DNS server to ask (HOST[:PORT]); default: the system resolver.
    #[arg(long)]
    dns: Option<String>,
    /// Seconds to wait for the DNS answer.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
    /// Seed of the weighted random choice (repeatable orders for scripts).
    #[arg(long)]
    seed: Option<u64>,
}

async fn dns_server(dns: &Option<String>) -> Result<Option<std::net::SocketAddr>, u8> {
    match dns {
        Some(text) => kmsctl::discover::parse_dns_server(text)
            .await
            .map(Some)
            .map_err(|e| {
                eprintln!("kmsctl: --dns: {e}");
                EXIT_USAGE
            }),
        None => Ok(None),
    }
}

fn rng_for(seed: Option<u64>) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    match seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_entropy(),
    }
}

async fn run_discover(args: DiscoverArgs) -> u8 {
    let dns = match dns_server(&args.dns).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut rng = rng_for(args.seed);
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    match kmsctl::discover::discover(&args.domain, dns, timeout, &mut rng).await {
        Ok(order) => {
            print!("{}", kmsctl::discover::format_order(&order));
            0
        }
        Err(e) => {
            eprintln!("kmsctl: discover {}: {e}", args.domain);
            EXIT_UNREACHABLE
        }
    }
}

/// How the client binds (which presentation contexts it offers).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BindVariant {
    /// NDR32 + NDR64 + BTFN, like Windows and default vlmcs.
    Full,
    /// NDR32 only (vlmcs -N0 -B0).
    Ndr32,
    /// NDR32 + BTFN (vlmcs -N0, the py-kms client).
    Ndr32Btfn,
    /// NDR32 + NDR64 without BTFN (vlmcs -B0).
    Ndr64,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// KMS host as HOST:PORT.
    #[arg(long, env = "KMSCTL_SERVER", default_value = "127.0.0.1:1688")]
    server: String,
    /// Bind variant.
    #[arg(long, value_enum, default_value = "full")]
    bind: BindVariant,
    /// Clear the multiplex flag in the bind (vlmcs -p).
    #[arg(long)]
    no_multiplex: bool,
    /// KMS protocol major version (4, 5 or 6); default: the product's own.
    #[arg(long, value_parser = clap::value_parser!(u16).range(4..=6))]
    protocol: Option<u16>,
    /// Send exactly this version, e.g. 7.0 or 6.1, to test a host's refusal (vlmcs -K).
    #[arg(long, value_name = "MAJOR.MINOR", conflicts_with = "protocol")]
    raw_version: Option<String>,
    /// Seconds to wait for connect and for each answer.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
}

#[derive(Args)]
struct ActivateArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Product: an alias (windows, server, office, office2013, office2010), a SKU GUID or a name.
    #[arg(long, default_value = "windows")]
    product: String,
    /// Number of requests, each with a distinct random CMID unless --cmid is given.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Use this client machine id for every request.
    #[arg(long)]
    cmid: Option<Uuid>,
    /// Find the host through `_vlmcs._tcp.DOMAIN` SRV records like Windows does, falling
    /// over to the next host when one does not answer (instead of --server).
    #[arg(long, value_name = "DOMAIN")]
    discover: Option<String>,
    /// DNS server for --discover (HOST[:PORT]).
    #[arg(long, requires = "discover")]
    dns: Option<String>,
    /// Open a new connection for every request (vlmcs -T).
    #[arg(long)]
    new_connection: bool,
    /// Workstation name sent to the host.
    #[arg(long, default_value = "kmsctl.test")]
    workstation: String,
    /// N-count policy to claim (default: the product's).
    #[arg(long)]
    n_policy: Option<u32>,
    /// License status to claim (0..=6; 2 = initial grace).
    #[arg(long, default_value_t = 2)]
    license_status: u32,
    /// Claim to be a virtual machine.
    #[arg(long)]
    vm: bool,
    /// Print one JSON object per request instead of text.
    #[arg(long)]
    json: bool,
    /// Print one line per request.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Products used round-robin, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "windows,server,office")]
    products: Vec<String>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Stop after this many requests.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Open a new connection for every request (otherwise keep-alive).
    #[arg(long)]
    new_connection: bool,
    /// Reuse CMIDs from a pool of this size (renewal load) instead of new ones.
    #[arg(long)]
    cmid_pool: Option<u64>,
    /// Pace the run to this many requests per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Write the CMIDs that received a verified success to this file, one per line.
    #[arg(long, value_name = "FILE")]
    acked_out: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn bind_options(args: &ClientArgs) -> BindOptions {
    let (ndr64, btfn) = match args.bind {
        BindVariant::Full => (true, true),
        BindVariant::Ndr32 => (false, false),
        BindVariant::Ndr32Btfn => (false, true),
        BindVariant::Ndr64 => (true, false),
    };
    BindOptions {
        ndr64,
        btfn,
        multiplex: !args.no_multiplex,
    }
}

fn apply_version(template: &mut RequestTemplate, args: &ClientArgs) -> Result<(), String> {
    if let Some(p) = args.protocol {
        template.protocol_major = p;
    }
    if let Some(raw) = &args.raw_version {
        let (major, minor) = raw
            .split_once('.')
            .ok_or_else(|| format!("--raw-version {raw:?}: expected MAJOR.MINOR"))?;
        template.protocol_major = major
            .parse()
            .map_err(|_| format!("--raw-version {raw:?}: bad major"))?;
        template.protocol_minor = minor
            .parse()
            .map_err(|_| format!("--raw-version {raw:?}: bad minor"))?;
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmsctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Cmd::Status(args) => admin_cmd::status(args).await,
            Cmd::Cluster(cmd) => admin_cmd::cluster(cmd).await,
            Cmd::Clients(args) => admin_cmd::clients(args).await,
            Cmd::Events(args) => admin_cmd::events(args).await,
            Cmd::Config(cmd) => admin_cmd::config(cmd).await,
            Cmd::Products(args) => admin_cmd::products(args).await,
            Cmd::Catalog(cmd) => admin_cmd::catalog(cmd).await,
            Cmd::Activate(args) => activate(args).await,
            Cmd::Bench(args) => run_bench(args).await,
            Cmd::Discover(args) => run_discover(args).await,
            Cmd::Diagnose(args) => diagnose_cmd::run(args).await,
            Cmd::Man { subcommand } => man(subcommand.as_deref()),
            Cmd::Completions { shell } => {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut cmd, "kmsctl", &mut std::io::stdout());
                0
            }
        }
    });
    ExitCode::from(code)
}

/// `kmsctl man [SUBCOMMAND]`: the roff page on stdout.
fn man(subcommand: Option<&str>) -> u8 {
    let root = <Cli as clap::CommandFactory>::command();
    let page = match subcommand {
        None => clap_mangen::Man::new(root),
        Some(name) => match root.find_subcommand(name) {
            Some(sub) => clap_mangen::Man::new(sub.clone()).title(format!("kmsctl-{name}")),
            None => {
                eprintln!("kmsctl man: no subcommand {name:?}");
                return EXIT_USAGE;
            }
        },
    };
    let mut out = Vec::new();
    if let Err(e) = page.render(&mut out) {
        eprintln!("kmsctl man: {e}");
        return EXIT_FAILED;
    }
    use std::io::Write;
    if let Err(e) = std::io::stdout().write_all(&out) {
        eprintln!("kmsctl man: {e}");
        return EXIT_FAILED;
    }
    0
}

async fn activate(args: ActivateArgs) -> u8 {
    let product = match products::resolve(&args.product) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kmsctl: --product: {e}");
            return EXIT_USAGE;
        }
    };
    let mut template = RequestTemplate::new(product);
    template.workstation = args.workstation.clone();
    template.license_status = args.license_status;
    template.is_vm = args.vm;
    if let Some(n) = args.n_policy {
        template.n_policy = n;
    }
    if let Err(e) = apply_version(&mut template, &args.client) {
        eprintln!("kmsctl: {e}");
        return EXIT_USAGE;
    }
    let options = bind_options(&args.client);
    let timeout = Duration::from_secs(args.client.timeout_secs.max(1));
    let mut conn: Option<KmsClient> = None;
    let mut worst = 0u8;
    for i in 1..=args.count {
        if conn.is_none() || args.new_connection {
            if !args.json && !args.quiet {
                println!("Connecting to {} ...", args.client.server);
            }
            let connected = match &args.discover {
                Some(domain) => discover_and_connect(domain, &args.dns, options, timeout).await,
                None => KmsClient::connect(&args.client.server, options, timeout)
                    .await
                    .map_err(Discovered::Kms),
            };
            match connected {
                Ok(c) => {
                    if !args.json && !args.quiet {
                        println!("RPC bind successful ({})", c.peer());
                    }
                    conn = Some(c);
                }
                Err(Discovered::Failed(code, message)) => {
                    eprintln!("kmsctl: {message}");
                    return code;
                }
                Err(Discovered::Kms(e)) => {
                    eprintln!("kmsctl: {e}");
                    return match e {
                        KmsClientError::Connect { .. } | KmsClientError::Timeout(_) => {
                            EXIT_UNREACHABLE
                        }
                        _ => EXIT_FAILED,
                    };
                }
            }
        }
        let Some(client) = conn.as_mut() else {
            return EXIT_FAILED;
        };
        let cmid = args.cmid.unwrap_or_else(Uuid::new_v4);
        let request = template.build(cmid, now_ms());
        if !args.json && !args.quiet {
            print_request(&request, &template, i, args.count);
        }
        let result = client.activate(&request, rand::random()).await;
        for w in client.warnings() {
            eprintln!("Warning: {w}");
        }
        match result {
            Ok(Answer::Activated(resp)) => {
                let activated = resp.base.current_count >= template.n_policy;
                if args.json {
                    println!(
                        "{}",
                        json!({
                            "request": i,
                            "result": "success",
                            "protocol": format!("{}.{}", resp.base.version.major, resp.base.version.minor),
                            "epid": resp.base.epid,
                            "hwid": resp.hwid.map(hex::encode_upper),
                            "cmid": resp.base.client_machine_id,
                            "current_count": resp.base.current_count,
                            "required_count": template.n_policy,
                            "activated": activated,
                            "renewal_interval": resp.base.renewal_interval,
                            "activation_interval": resp.base.activation_interval,
                        })
                    );
                } else if args.quiet {
                    println!(
                        "{} of {}: {} count {} ({})",
                        i,
                        args.count,
                        resp.base.epid,
                        resp.base.current_count,
                        if activated {
                            "activated"
                        } else {
                            "count below N"
                        }
                    );
                } else {
                    println!("Response from KMS host (verified)");
                    println!(
                        "  Protocol version      : {}.{}",
                        resp.base.version.major, resp.base.version.minor
                    );
                    println!("  KMS host ePID         : {}", resp.base.epid);
                    if let Some(h) = resp.hwid {
                        println!("  KMS host hardware id  : {}", hex::encode_upper(h));
                    }
                    println!("  Client machine id     : {}", resp.base.client_machine_id);
                    println!("  Current count         : {}", resp.base.current_count);
                    println!(
                        "  Renewal interval      : {} min",
                        resp.base.renewal_interval
                    );
                    println!(
                        "  Activation interval   : {} min",
                        resp.base.activation_interval
                    );
                    println!(
                        "  Client would activate : {}",
                        if activated {
                            "yes".to_owned()
                        } else {
                            format!(
                                "no (count {} < N {}, 0x{:08X})",
                                resp.base.current_count,
                                template.n_policy,
                                hresult::NOT_ENOUGH_COUNT
                            )
                        }
                    );
                    println!();
                }
            }
            Ok(Answer::Refused(hr)) => {
                worst = EXIT_FAILED;
                if args.json {
                    println!(
                        "{}",
                        json!({"request": i, "result": "refused", "hresult": format!("0x{hr:08X}"), "message": hresult::describe(hr)})
                    );
                } else {
                    println!(
                        "Error 0x{hr:08X} for request {i} of {}: {}",
                        args.count,
                        hresult::describe(hr)
                    );
                }
            }
            Err(e) => {
                worst = EXIT_FAILED;
                if args.json {
                    println!(
                        "{}",
                        json!({"request": i, "result": "error", "message": e.to_string()})
                    );
                } else {
                    eprintln!("kmsctl: request {i} of {}: {e}", args.count);
                }
                conn = None;
            }
        }
        if args.new_connection {
            conn = None;
        }
    }
    worst
}

fn print_request(req: &kms_wire::kms::BaseRequest, t: &RequestTemplate, i: u64, n: u64) {
    println!("Request {i} of {n}");
    println!(
        "  Protocol version      : {}.{}",
        req.version.major, req.version.minor
    );
    println!(
        "  Product               : {} ({})",
        t.product.sku.name, req.sku_id
    );
    println!(
        "  KMS id                : {} ({})",
        t.product.kms_item.name, req.kms_counted_id
    );
    println!("  Application id        : {}", req.application_id);
    println!("  Client machine id     : {}", req.client_machine_id);
    println!("  Workstation           : {}", req.workstation_name);
    println!("  N count policy        : {}", req.required_client_count);
}

async fn run_bench(args: BenchArgs) -> u8 {
    let mut templates = Vec::new();
    for name in &args.products {
        match products::resolve(name) {
            Ok(p) => {
                let mut t = RequestTemplate::new(p);
                if let Err(e) = apply_version(&mut t, &args.client) {
                    eprintln!("kmsctl: {e}");
                    return EXIT_USAGE;
                }
                templates.push(t);
            }
            Err(e) => {
                eprintln!("kmsctl: --products: {e}");
                return EXIT_USAGE;
            }
        }
    }
    if args.concurrency == 0 || args.concurrency > 10_000 {
        eprintln!("kmsctl: --concurrency must be within 1..=10000");
        return EXIT_USAGE;
    }
    let config = BenchConfig {
        server: args.client.server.clone(),
        concurrency: args.concurrency,
        requests: args.requests,
        duration: Duration::from_secs(args.duration_secs.max(1)),
        new_connection: args.new_connection,
        products: templates,
        bind: bind_options(&args.client),
        timeout: Duration::from_secs(args.client.timeout_secs.max(1)),
        cmid_pool: args.cmid_pool,
        record_acked: args.acked_out.is_some(),
        rate: args.rate,
    };
    let report = match bench::run(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kmsctl: bench: {e:#}");
            return EXIT_FAILED;
        }
    };
    if let Some(path) = &args.acked_out {
        let text: String = report
            .acked_cmids
            .iter()
            .map(|c| format!("{c}\n"))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("kmsctl: cannot write {}: {e}", path.display());
            return EXIT_FAILED;
        }
    }
    if args.json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        if let Some(obj) = value.as_object_mut() {
            obj.remove("acked_cmids");
        }
        println!("{value}");
    } else {
        println!(
            "server {}  concurrency {}  {}",
            report.server,
            report.concurrency,
            if report.new_connection {
                "new connection per request"
            } else {
                "keep-alive"
            }
        );
        println!(
            "requests {}  succeeded {}  refused {}  failed {}  in {:.2} s",
            report.requests, report.succeeded, report.refused, report.failed, report.elapsed_secs
        );
        println!("throughput {:.0} requests/s", report.requests_per_sec);
        println!(
            "latency ms  mean {:.3}  p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}",
            report.latency_ms.mean,
            report.latency_ms.p50,
            report.latency_ms.p95,
            report.latency_ms.p99,
            report.latency_ms.max
        );
        for (kind, n) in &report.errors {
            println!("  {n} x {kind}");
        }
    }
    if report.failed > 0 {
        EXIT_FAILED
    } else {
        0
    }
}

enum Discovered {
    Kms(KmsClientError),
    Failed(u8, String),
}

/// `activate --discover`: SRV lookup, RFC 2782 order, first host that binds.
async fn discover_and_connect(
    domain: &str,
    dns: &Option<String>,
    options: BindOptions,
    timeout: Duration,
) -> Result<KmsClient, Discovered> {
    let dns = dns_server(dns)
        .await
        .map_err(|code| Discovered::Failed(code, "bad --dns".into()))?;
    let mut rng = rng_for(None);
    let order = kmsctl::discover::discover(domain, dns, timeout, &mut rng)
        .await
        .map_err(|e| Discovered::Failed(EXIT_UNREACHABLE, format!("discover {domain}: {e}")))?;
    match kmsctl::discover::connect_first(&order, dns, options, timeout).await {
        Ok((host, client)) => {
            eprintln!(
                "kmsctl: using {}:{} from _vlmcs._tcp.{domain}",
                host.target, host.port
            );
            Ok(client)
        }
        Err(e) => Err(Discovered::Failed(
            EXIT_UNREACHABLE,
            format!("no host of {domain} answered: {e}"),
        )),
    }
}
