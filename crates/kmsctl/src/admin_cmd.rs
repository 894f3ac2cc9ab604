//! The admin subcommands: `status`, `cluster list|remove`, `clients`, `events`,
//! `config get|set`, `products`. Human tables by default, `--json` (and `--csv` for clients)
//! for scripts.

use std::time::Duration;

/// Like `println!`, but a closed stdout (`kmsctl clients | head`) is not a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Like `print!`, without the panic on a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

use clap::{Args, Subcommand};
use kms_admin::views::{ConfigView, EventsPage, ProductsResponse, StatusResponse};
use kmsctl::admin_client::{exit, query, AdminClient, AdminError};
use reqwest::Method;
use serde_json::{Map, Value};

/// Where the admin API is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub struct AdminArgs {
    /// Admin API of a node: http(s)://HOST:PORT.
    #[arg(
        long,
        env = "KMSCTL_ADMIN_URL",
        default_value = "http://127.0.0.1:8688"
    )]
    pub url: String,
    /// Bearer token of the admin API (when the node has one).
    #[arg(long, env = "KMSCTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) that signed the node's admin certificate, for https:// URLs
    /// (then only these are trusted).
    #[arg(long = "ca-cert", env = "KMSCTL_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Seconds to wait for an answer.
    #[arg(long = "http-timeout-secs", default_value_t = 30)]
    pub timeout_secs: u64,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    /// List the ePID of every CSVLK (default: licensed CSVLKs, else the default ones).
    #[arg(long)]
    pub all_epids: bool,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Members, their roles and replication lag.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Remove a member by node id.
    Remove {
        #[command(flatten)]
        admin: AdminArgs,
        /// Node id of the member.
        id: u64,
        /// Succeed when the node is not a member (any more): safe to retry in scripts.
        #[arg(long)]
        ignore_missing: bool,
    },
    /// Join tokens of the built-in cluster PKI: `create`, `list`, `revoke ID`.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Have the leader issue the node behind --url a new certificate (presented from its
    /// next start; the current one stays valid until the one after is issued).
    RotateCert {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a join token; give it to the new node as `kmsd --join-token` (shown once).
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// How long it stays valid: 30m, 24h, 7d, or 0 for never (default 24h).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Free text shown by `token list`.
        #[arg(long)]
        description: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (their secrets are never shown again).
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        id: String,
    },
}

/// `30m`, `24h`, `7d`, `90s` or plain seconds, as seconds.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("--ttl {text:?}: expected a number with s, m, h or d"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "--ttl {text:?}: unknown unit {other:?} (s, m, h, d)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("--ttl {text:?} is too long"))
}

#[derive(Args, Debug)]
pub struct ClientsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Application: windows, office2010, office2013 (or its name or id).
    #[arg(long)]
    pub application: Option<String>,
    /// Product: SKU id, KMS id, SKU name or product group name.
    #[arg(long)]
    pub product: Option<String>,
    /// Only clients seen since: RFC 3339 or Unix milliseconds.
    #[arg(long)]
    pub since: Option<String>,
    /// Text in the workstation name, CMID, address or product.
    #[arg(long)]
    pub search: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Page size (1..=1000).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Print the API's JSON page.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV (header line first).
    #[arg(long)]
    pub csv: bool,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Only this event id (12290 activation, 12293/12294 DNS publishing, 1000 node, 1001
    /// membership, 1002 configuration, 1003 quorum).
    #[arg(long)]
    pub event_id: Option<u32>,
    /// Only events after this sequence number.
    #[arg(long)]
    pub after: Option<u64>,
    /// At most this many, newest first (1..=1000).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Show the replicated policy and host identity.
    Get {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Change settings: KEY=VALUE ... Keys: activation_interval, renewal_interval,
    /// product_policy (open|strict), host_key.windows / host_key.office / host_key.office2010
    /// (host key id, see `kmsctl products`), licensed_csvlks (deprecated, mapped to host keys),
    /// max_clock_skew_minutes (minutes or off), client_networks (comma list of CIDRs, empty =
    /// all), registry_retention_days, hwid (16 hex digits), epid.<CSVLK id>.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Apply only if the configuration version (`kmsctl config get`) is still this one;
        /// else the node answers 409 Conflict and nothing changes.
        #[arg(long, value_name = "VERSION")]
        expected_version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CatalogCmd {
    /// Show the replicated catalog's version, source and the installed host keys.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print the whole replicated catalog as JSON (the format `import` takes).
    Export {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Replace the catalog of the whole cluster with FILE (JSON, the format of `export`).
    /// The node validates it whole first: a bad file changes nothing and the error names the
    /// field.
    Import {
        #[command(flatten)]
        admin: AdminArgs,
        /// Catalog file (JSON).
        file: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ProductsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Words that must appear in the product group or an edition name.
    #[arg(long)]
    pub search: Option<String>,
    /// Only products the policy activates.
    #[arg(long, conflicts_with = "not_activated")]
    pub activated: bool,
    /// Only products the policy does not activate.
    #[arg(long)]
    pub not_activated: bool,
    /// List every edition (SKU) with its GVLK.
    #[arg(long)]
    pub skus: bool,
    #[arg(long)]
    pub json: bool,
}

fn client(args: &AdminArgs) -> Result<AdminClient, AdminError> {
    let ca = match &args.ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|e| AdminError::Url {
            url: args.url.clone(),
            message: format!("cannot read --ca-cert {}: {e}", path.display()),
        })?),
        None => None,
    };
    AdminClient::with_ca(
        &args.url,
        args.token.clone(),
        Duration::from_secs(args.timeout_secs.max(1)),
        ca.as_deref(),
    )
}

/// Runs an admin command body and turns its error into a message and an exit code.
async fn run<F, Fut>(args: &AdminArgs, body: F) -> u8
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: std::future::Future<Output = Result<(), AdminError>>,
{
    let result = match client(args) {
        Ok(c) => body(c).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("kmsctl: {e}");
            e.exit_code()
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => outln!("{s}"),
        Err(e) => eprintln!("kmsctl: cannot print JSON: {e}"),
    }
}

/// Volume, retail/OEM or preview (strict mode refuses the last two).
fn kind(p: &kms_admin::views::ProductView) -> &'static str {
    if p.is_retail {
        "retail"
    } else if p.is_preview {
        "preview"
    } else {
        "volume"
    }
}

/// A plain text table: upper-case header, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let head: String = s.chars().take(max.saturating_sub(1)).collect();
        format!("{head}…")
    }
}

fn words(s: &str) -> String {
    s.replace('_', " ")
}

pub async fn status(args: StatusArgs) -> u8 {
    run(&args.admin, |c| async move {
        let s = c.status().await?;
        if args.json {
            print_json(&s);
        } else {
            print_status(&s, args.all_epids);
        }
        Ok(())
    })
    .await
}

fn print_status(s: &StatusResponse, all_epids: bool) {
    let role = serde_json::to_value(s.role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    outln!("Key Management Service host (kms-cluster {})", s.version);
    outln!();
    outln!(
        "Node                                    : {} ({role}, leader {}, term {})",
        s.node_id,
        s.leader_id
            .map_or_else(|| "unknown".to_owned(), |l| l.to_string()),
        s.term
    );
    if let Some(id) = s.cluster_id {
        outln!("Cluster id                              : {id}");
    }
    outln!(
        "Quorum                                  : {}",
        if s.quorum {
            "yes"
        } else {
            "NO (answering from the last committed state)"
        }
    );
    outln!(
        "KMS listening on                        : {}",
        s.listen.kms.join(", ")
    );
    outln!(
        "Admin API                               : {}",
        s.listen.admin
    );
    if s.dns.enabled {
        for d in &s.dns.domains {
            outln!(
                "DNS publishing                          : {} (priority {}, weight {}, ttl {}){}",
                d.zone,
                d.priority,
                d.weight,
                d.ttl,
                d.last_error
                    .as_deref()
                    .map(|e| format!(" last error: {e}"))
                    .unwrap_or_default()
            );
        }
    } else {
        outln!("DNS publishing                          : disabled");
    }
    outln!(
        "KMS priority (product policy)           : {}",
        s.product_policy
    );
    outln!(
        "Activation interval                     : {} minutes",
        s.activation_interval
    );
    outln!(
        "Renewal interval                        : {} minutes",
        s.renewal_interval
    );
    outln!(
        "Hardware id                             : {}",
        s.hwid.as_deref().unwrap_or("not initialised")
    );
    outln!();
    outln!("Current count");
    let rows: Vec<Vec<String>> = s
        .applications
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.current_count.to_string(),
                a.threshold.to_string(),
                if a.threshold_met {
                    "activating"
                } else {
                    "below threshold"
                }
                .to_owned(),
            ]
        })
        .collect();
    table(&["application", "count", "threshold", "status"], &rows);
    outln!();
    let ls = &s.requests_by_license_status;
    outln!(
        "Total requests received                             : {}",
        s.total_requests
    );
    outln!(
        "Failed requests received                            : {}",
        s.failed_requests
    );
    outln!(
        "Requests with License Status Unlicensed             : {}",
        ls.unlicensed
    );
    outln!(
        "Requests with License Status Licensed               : {}",
        ls.licensed
    );
    outln!(
        "Requests with License Status Initial grace period   : {}",
        ls.initial_grace
    );
    outln!(
        "Requests with License Status License expired or Hardware out of tolerance : {}",
        ls.out_of_tolerance_grace
    );
    outln!(
        "Requests with License Status Non-genuine grace period : {}",
        ls.non_genuine_grace
    );
    outln!(
        "Requests with License Status Notification           : {}",
        ls.notification
    );
    outln!(
        "Requests with License Status Extended grace period  : {}",
        ls.extended_grace
    );
    if ls.other > 0 {
        outln!(
            "Requests with another License Status                : {}",
            ls.other
        );
    }
    outln!(
        "Registered clients                                  : {}",
        s.registered_clients
    );
    outln!();
    let licensed: Vec<_> = s.epids.iter().filter(|e| e.licensed).collect();
    let shown: Vec<_> = if all_epids {
        s.epids.iter().collect()
    } else if !licensed.is_empty() {
        licensed
    } else {
        // The CSVLKs a host answers unknown/most products with, per application.
        let cat = kms_catalog::catalog();
        let defaults: Vec<uuid::Uuid> = cat
            .applications()
            .iter()
            .map(|a| cat.default_csvlk_for_application(&a.id).id)
            .collect();
        s.epids
            .iter()
            .filter(|e| defaults.contains(&e.csvlk_id))
            .collect()
    };
    outln!(
        "KMS host ePIDs ({} of {}; --all-epids lists every CSVLK)",
        shown.len(),
        s.epids.len()
    );
    for e in shown {
        outln!("  {:<40} {}", cut(&e.csvlk, 40), e.epid);
    }
}

pub async fn cluster(cmd: ClusterCmd) -> u8 {
    match cmd {
        ClusterCmd::List { admin, json } => {
            run(&admin, |c| async move {
                let cl = c.cluster().await?;
                if json {
                    print_json(&cl);
                    return Ok(());
                }
                outln!(
                    "cluster {}  leader {}  term {}",
                    cl.cluster_id
                        .map_or_else(|| "-".to_owned(), |i| i.to_string()),
                    cl.leader_id
                        .map_or_else(|| "none".to_owned(), |l| l.to_string()),
                    cl.term
                );
                let rows: Vec<Vec<String>> = cl
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.to_string(),
                            m.role.clone(),
                            m.raft_addr.clone(),
                            m.admin_addr.clone(),
                            m.lag.map_or_else(|| "-".to_owned(), |l| l.to_string()),
                        ]
                    })
                    .collect();
                table(&["id", "role", "raft", "admin", "lag"], &rows);
                Ok(())
            })
            .await
        }
        ClusterCmd::Remove {
            admin,
            id,
            ignore_missing,
        } => {
            run(&admin, |c| async move {
                match c.remove_member(id).await {
                    Ok(()) => outln!("member {id} removed"),
                    Err(AdminError::Api { status: 404, .. }) if ignore_missing => {
                        outln!("member {id} is not a member; nothing to do")
                    }
                    Err(e) => return Err(e),
                }
                Ok(())
            })
            .await
        }
        ClusterCmd::Token(cmd) => token(cmd).await,
        ClusterCmd::RotateCert { admin, json } => {
            run(&admin, |c| async move {
                let view: Value = c
                    .send(Method::POST, "/api/v1/cluster/certificate", &Value::Null)
                    .await?;
                if json {
                    print_json(&view);
                } else {
                    outln!(
                        "new certificate {} ({} days); restart the node to present it",
                        view["fingerprint"].as_str().unwrap_or_default(),
                        view["days_left"]
                    );
                }
                Ok(())
            })
            .await
        }
    }
}

async fn token(cmd: TokenCmd) -> u8 {
    match cmd {
        TokenCmd::Create {
            admin,
            ttl,
            uses,
            description,
            json,
        } => {
            let ttl_secs = match parse_ttl(&ttl) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("kmsctl: {e}");
                    return 2;
                }
            };
            run(&admin, |c| async move {
                let body = serde_json::json!({
                    "ttl_secs": ttl_secs,
                    "uses": uses,
                    "description": description,
                });
                let created: Value = c
                    .send(Method::POST, "/api/v1/cluster/tokens", &body)
                    .await?;
                if json {
                    print_json(&created);
                } else {
                    outln!("{}", created["token"].as_str().unwrap_or_default());
                    eprintln!(
                        "token {} for {} node(s), expires {}; start the new node with \
                         --join <raft address of a member> --join-token <the token above>",
                        created["id"].as_str().unwrap_or_default(),
                        created["uses_left"],
                        created["expires"].as_str().unwrap_or("never"),
                    );
                }
                Ok(())
            })
            .await
        }
        TokenCmd::List { admin, json } => {
            run(&admin, |c| async move {
                let tokens: Vec<kms_admin::JoinTokenView> = c.get("/api/v1/cluster/tokens").await?;
                if json {
                    print_json(&tokens);
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.uses_left.to_string(),
                            t.expires.clone().unwrap_or_else(|| "never".into()),
                            if t.expired { "expired" } else { "valid" }.to_owned(),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                table(&["id", "uses", "expires", "state", "description"], &rows);
                Ok(())
            })
            .await
        }
        TokenCmd::Revoke { admin, id } => {
            run(&admin, |c| async move {
                c.call(
                    Method::DELETE,
                    &format!("/api/v1/cluster/tokens/{id}"),
                    None,
                )
                .await?;
                outln!("token {id} revoked");
                Ok(())
            })
            .await
        }
    }
}

pub async fn clients(args: ClientsArgs) -> u8 {
    let path = format!(
        "/api/v1/clients{}",
        query(&[
            ("application", args.application.clone()),
            ("product", args.product.clone()),
            ("since", args.since.clone()),
            ("search", args.search.clone()),
            ("offset", Some(args.offset.to_string())),
            ("limit", Some(args.limit.to_string())),
            ("format", args.csv.then(|| "csv".to_owned())),
        ])
    );
    run(&args.admin, |c| async move {
        if args.csv {
            let response = c.call(Method::GET, &path, None).await?;
            out!("{}", response.body);
            return Ok(());
        }
        let page: kms_admin::views::ClientsPage = c.get(&path).await?;
        if args.json {
            print_json(&page);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = page
            .clients
            .iter()
            .map(|cl| {
                vec![
                    // The client's own text: no control sequences on the operator's terminal.
                    cut(&kms_core::text::escape_control(&cl.workstation), 24),
                    cut(&cl.product, 40),
                    cut(&cl.application, 16),
                    cl.address.clone().unwrap_or_else(|| "-".into()),
                    words(&cl.license_status),
                    cl.last_seen
                        .replace('T', " ")
                        .trim_end_matches('Z')
                        .to_owned(),
                    cl.last_count.to_string(),
                    if cl.activated { "yes" } else { "no" }.to_owned(),
                ]
            })
            .collect();
        table(
            &[
                "workstation",
                "product",
                "application",
                "address",
                "license status",
                "last seen (UTC)",
                "count",
                "activated",
            ],
            &rows,
        );
        outln!(
            "{} of {} client(s) (offset {})",
            page.clients.len(),
            page.total,
            page.offset
        );
        Ok(())
    })
    .await
}

pub async fn events(args: EventsArgs) -> u8 {
    let path = format!(
        "/api/v1/events{}",
        query(&[
            ("event_id", args.event_id.map(|v| v.to_string())),
            ("after", args.after.map(|v| v.to_string())),
            ("limit", Some(args.limit.to_string())),
        ])
    );
    run(&args.admin, |c| async move {
        let page: EventsPage = c.get(&path).await?;
        if args.json {
            print_json(&page);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = page
            .events
            .iter()
            .map(|e| {
                vec![
                    e.seq.to_string(),
                    kms_admin::names::format_time_ms(e.time_ms),
                    e.event_id.to_string(),
                    e.level.clone(),
                    e.message.clone(),
                ]
            })
            .collect();
        table(&["seq", "time (UTC)", "id", "level", "message"], &rows);
        outln!(
            "{} event(s) shown, {} retained",
            page.events.len(),
            page.retained
        );
        Ok(())
    })
    .await
}

fn print_config(c: &ConfigView) {
    let p = &c.policy;
    outln!("# configuration version {}", c.version);
    let list = |v: Vec<String>, empty: &str| {
        if v.is_empty() {
            empty.to_owned()
        } else {
            v.join(",")
        }
    };
    outln!("activation_interval      = {}", p.activation_interval);
    outln!("renewal_interval         = {}", p.renewal_interval);
    outln!("product_policy           = {}", p.product_policy);
    outln!(
        "licensed_csvlks          = {}",
        list(
            p.licensed_csvlks.iter().map(ToString::to_string).collect(),
            "(none)"
        )
    );
    for (app, key) in &p.host_keys {
        let app_name = kms_admin::names::application_name(app);
        let key_name = kms_catalog::catalog()
            .csvlk(key)
            .map_or_else(String::new, |c| c.name.to_owned());
        outln!("host_key ({app_name}) = {key}  # {key_name}");
    }
    outln!(
        "max_clock_skew_minutes   = {}",
        p.max_clock_skew_minutes
            .map_or_else(|| "off".to_owned(), |m| m.to_string())
    );
    outln!(
        "client_networks          = {}",
        list(p.client_networks.clone(), "(all)")
    );
    outln!("registry_retention_days  = {}", p.registry_retention_days);
    if let Some(i) = &c.identity {
        outln!("hwid                     = {}", i.hwid);
        outln!("cluster_id               = {} (read-only)", i.cluster_id);
        outln!("host_build               = {} (read-only)", i.host_build);
        let cat = kms_catalog::catalog();
        for (csvlk, epid) in &i.epids {
            let name = cat.csvlk(csvlk).map(|c| c.name).unwrap_or("");
            outln!("epid.{csvlk} = {epid}  # {name}");
        }
    }
}

/// Turns `KEY=VALUE` settings into a `PUT /api/v1/config` body. Values are passed as typed
/// JSON where the key's type is known, so the node validates ranges and names bad fields.
pub fn config_update(settings: &[String]) -> Result<Value, String> {
    let mut policy = Map::new();
    let mut identity = Map::new();
    let mut epids = Map::new();
    let mut host_keys = Map::new();
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("{setting:?}: expected KEY=VALUE"))?;
        let (key, value) = (key.trim(), value.trim());
        let number = |v: &str| -> Value {
            v.parse::<u64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(v))
        };
        let list = |v: &str| -> Value {
            Value::from(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
        };
        match key {
            "activation_interval" | "renewal_interval" | "registry_retention_days" => {
                policy.insert(key.into(), number(value));
            }
            "max_clock_skew_minutes" => {
                let v = match value {
                    "off" | "none" | "null" | "0" => Value::Null,
                    v => number(v),
                };
                policy.insert(key.into(), v);
            }
            "product_policy" => {
                policy.insert(key.into(), Value::from(value));
            }
            "licensed_csvlks" | "client_networks" => {
                policy.insert(key.into(), list(value));
            }
            "hwid" => {
                identity.insert(key.into(), Value::from(value));
            }
            k if k.starts_with("host_key.") => {
                host_keys.insert(
                    k.trim_start_matches("host_key.").to_owned(),
                    Value::from(value),
                );
            }
            k if k.starts_with("epid.") => {
                epids.insert(k.trim_start_matches("epid.").to_owned(), Value::from(value));
            }
            other => {
                return Err(format!(
                    "unknown setting {other:?} (see `kmsctl config set --help`)"
                ))
            }
        }
    }
    if !epids.is_empty() {
        identity.insert("epids".into(), Value::Object(epids));
    }
    if !host_keys.is_empty() {
        policy.insert("host_keys".into(), Value::Object(host_keys));
    }
    let mut body = Map::new();
    if !policy.is_empty() {
        body.insert("policy".into(), Value::Object(policy));
    }
    if !identity.is_empty() {
        body.insert("identity".into(), Value::Object(identity));
    }
    Ok(Value::Object(body))
}

pub async fn config(cmd: ConfigCmd) -> u8 {
    match cmd {
        ConfigCmd::Get { admin, json } => {
            run(&admin, |c| async move {
                let cfg = c.config().await?;
                if json {
                    print_json(&cfg);
                } else {
                    print_config(&cfg);
                }
                Ok(())
            })
            .await
        }
        ConfigCmd::Set {
            admin,
            settings,
            expected_version,
            json,
        } => {
            let update = match config_update(&settings) {
                Ok(mut u) => {
                    if let (Some(v), Some(body)) = (expected_version, u.as_object_mut()) {
                        body.insert("expected_version".into(), Value::from(v));
                    }
                    u
                }
                Err(e) => {
                    eprintln!("kmsctl: {e}");
                    return exit::USAGE;
                }
            };
            run(&admin, |c| async move {
                let cfg = c.set_config(&update).await?;
                if json {
                    print_json(&cfg);
                } else {
                    outln!("configuration updated");
                    print_config(&cfg);
                }
                Ok(())
            })
            .await
        }
    }
}

fn print_catalog_summary(c: &kms_admin::views::CatalogSummary) {
    outln!("catalog {} from {}", c.version, c.source);
    outln!(
        "{} product groups, {} editions, {} host keys",
        c.kms_items,
        c.skus,
        c.host_keys
    );
    let rows: Vec<Vec<String>> = c
        .installed
        .iter()
        .map(|k| {
            vec![
                cut(&k.application, 40),
                cut(&k.host_key, 36),
                if k.configured {
                    "configured"
                } else {
                    "default"
                }
                .to_owned(),
                k.epid.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["application", "host key", "chosen", "epid"], &rows);
}

pub async fn catalog(cmd: CatalogCmd) -> u8 {
    match cmd {
        CatalogCmd::Show { admin, json } => {
            run(&admin, |c| async move {
                let status = c.status().await?;
                match &status.catalog {
                    Some(summary) if json => print_json(summary),
                    Some(summary) => print_catalog_summary(summary),
                    None => outln!("no catalog replicated yet"),
                }
                Ok(())
            })
            .await
        }
        CatalogCmd::Export { admin } => {
            run(&admin, |c| async move {
                let catalog: Value = c.get("/api/v1/catalog").await?;
                print_json(&catalog);
                Ok(())
            })
            .await
        }
        CatalogCmd::Import { admin, file, json } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("kmsctl: cannot read {}: {e}", file.display());
                    return exit::USAGE;
                }
            };
            let body: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("kmsctl: {} is not JSON: {e}", file.display());
                    return exit::USAGE;
                }
            };
            run(&admin, |c| async move {
                let summary: kms_admin::views::CatalogSummary = c
                    .send(reqwest::Method::PUT, "/api/v1/catalog", &body)
                    .await?;
                if json {
                    print_json(&summary);
                } else {
                    outln!("catalog imported and replicated");
                    print_catalog_summary(&summary);
                }
                Ok(())
            })
            .await
        }
    }
}

pub async fn products(args: ProductsArgs) -> u8 {
    let activated = if args.activated {
        Some("true".to_owned())
    } else if args.not_activated {
        Some("false".to_owned())
    } else {
        None
    };
    let path = format!(
        "/api/v1/products{}",
        query(&[("search", args.search.clone()), ("activated", activated)])
    );
    run(&args.admin, |c| async move {
        let p: ProductsResponse = c.get(&path).await?;
        if args.json {
            print_json(&p);
            return Ok(());
        }
        outln!("product policy: {}", p.product_policy);
        let rows: Vec<Vec<String>> = p
            .products
            .iter()
            .map(|k| {
                vec![
                    cut(&k.name, 44),
                    cut(&k.application, 16),
                    k.n_count_policy.to_string(),
                    if k.activated { "yes" } else { "no" }.to_owned(),
                    k.csvlk
                        .as_deref()
                        .map(|c| cut(c, 36))
                        .unwrap_or_else(|| "-".into()),
                    kind(k).to_owned(),
                    k.kms_id.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "product group",
                "application",
                "n",
                "activated",
                "through host key",
                "kind",
                "kms id",
            ],
            &rows,
        );
        if args.skus {
            outln!();
            let rows: Vec<Vec<String>> = p
                .products
                .iter()
                .flat_map(|k| {
                    k.skus.iter().map(|s| {
                        vec![
                            cut(&s.name, 56),
                            s.gvlk.clone().unwrap_or_else(|| "-".into()),
                            s.sku_id.to_string(),
                        ]
                    })
                })
                .collect();
            table(&["edition", "gvlk", "sku id"], &rows);
        }
        outln!("{} product group(s)", p.products.len());
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_become_a_typed_update() {
        let update = config_update(&[
            "activation_interval=60".into(),
            "max_clock_skew_minutes=off".into(),
            "licensed_csvlks=a, b".into(),
            "client_networks=".into(),
            "product_policy=strict".into(),
            "hwid=0123456789ABCDEF".into(),
            "host_key.windows=2e7a9ad1-a849-4b56-babe-17d5a29fe4b4".into(),
            "epid.2e7a9ad1-a849-4b56-babe-17d5a29fe4b4=X".into(),
            "renewal_interval=soon".into(),
        ])
        .unwrap();
        assert_eq!(
            update,
            json!({
                "policy": {
                    "activation_interval": 60,
                    "max_clock_skew_minutes": null,
                    "licensed_csvlks": ["a", "b"],
                    "client_networks": [],
                    "product_policy": "strict",
                    "renewal_interval": "soon",
                    "host_keys": {"windows": "2e7a9ad1-a849-4b56-babe-17d5a29fe4b4"}
                },
                "identity": {
                    "hwid": "0123456789ABCDEF",
                    "epids": {"2e7a9ad1-a849-4b56-babe-17d5a29fe4b4": "X"}
                }
            })
        );
        assert!(config_update(&["colour=red".into()]).is_err());
        assert!(config_update(&["activation_interval".into()]).is_err());
    }
}
