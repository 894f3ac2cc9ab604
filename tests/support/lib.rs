//! Test harness: starts real `kmsd` processes on loopback with their own data dirs and ports,
//! stops them by pid (SIGTERM or SIGKILL), and finds the workspace binaries.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace binaries (`target/<profile>`), derived from this test
/// executable's location (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary; panics with a clear message when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

pub use kms_testkit::free_port;

/// Why a node did not become ready.
enum NotReady {
    Exited(std::process::ExitStatus),
    Timeout(String),
}

/// A `kmsd` process under test.
pub struct Node {
    pub kms_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    log_path: PathBuf,
    /// Became ready once: its addresses are known to its peers and must not change.
    started: bool,
    /// Extra environment of the process (e.g. libfaketime's).
    env: Vec<(String, String)>,
}

impl Node {
    /// Starts a node with a fresh data dir inside `dir` and waits until it is ready.
    pub fn start(dir: &Path, extra_args: &[&str]) -> Node {
        let mut node = Node::new(dir, extra_args);
        node.spawn();
        node
    }

    /// A node that is configured but not started (see [`Node::spawn`]).
    pub fn new(dir: &Path, extra_args: &[&str]) -> Node {
        Node {
            kms_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            raft_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data_dir: dir.join("data"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log_path: dir.join("kmsd.log"),
            started: false,
            env: Vec::new(),
        }
    }

    /// Sets an environment variable of the process from its next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts node `node_id` of a cluster: the first one bootstraps (`join` empty), the
    /// others join through `join`: with the built-in cluster PKI (the default) with a join
    /// token created on `join` and its Raft address; with `--insecure-raft-transport` or
    /// `--raft-tls-*` in `extra_args` through its admin API. Returns once the node is ready.
    pub fn start_member(
        dir: &Path,
        node_id: u64,
        join: Option<&Node>,
        extra_args: &[&str],
    ) -> Node {
        let mut args: Vec<String> = vec!["--node-id".into(), node_id.to_string()];
        if let Some(j) = join {
            let admin_join = extra_args
                .iter()
                .any(|a| *a == "--insecure-raft-transport" || *a == "--raft-tls-cert");
            let shared_secret = extra_args.contains(&"--cluster-secret-file");
            args.push("--join".into());
            if admin_join {
                args.push(format!("http://{}", j.admin_addr));
            } else if shared_secret {
                args.push(j.raft_addr.to_string());
            } else {
                args.push(j.raft_addr.to_string());
                args.push("--join-token".into());
                args.push(j.create_join_token(1));
            }
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut node = Node::new(dir, &refs);
        node.spawn();
        node
    }

    /// (Re)starts the process on the same ports and data dir and waits until it is ready.
    ///
    /// The ports were free when chosen, but something else on the machine may bind one before
    /// kmsd does. When kmsd exits at its first start because one of its own listen addresses
    /// is taken, that one address gets a new port and the node starts again (at most 3 times);
    /// any other early exit fails the test, and so does a taken port on a restart (the peers
    /// know the old addresses).
    pub fn spawn(&mut self) {
        for attempt in 1..=3 {
            let log_start = self.log().len();
            self.spawn_no_wait();
            match self.wait_until_ready(Duration::from_secs(60)) {
                Ok(()) => {
                    self.started = true;
                    return;
                }
                Err(NotReady::Exited(status)) => {
                    let log = self.log();
                    let this_run = log.get(log_start..).unwrap_or(&log);
                    self.child = None;
                    if attempt < 3 && !self.started && self.repick_taken_port(this_run) {
                        continue;
                    }
                    panic!("kmsd exited early with {status}; log:\n{log}");
                }
                Err(NotReady::Timeout(last)) => panic!(
                    "kmsd not ready after 60s (last: {last}); log:\n{}",
                    self.log()
                ),
            }
        }
    }

    /// Gives a new port to the listen address kmsd reported as taken; false when the log does
    /// not name one of this node's addresses as in use.
    fn repick_taken_port(&mut self, log: &str) -> bool {
        let Some(line) = log
            .lines()
            .find(|l| l.contains("cannot listen on") && l.contains("Address already in use"))
        else {
            return false;
        };
        let port = SocketAddr::from(([127, 0, 0, 1], free_port()));
        for addr in [
            &mut self.kms_addr,
            &mut self.admin_addr,
            &mut self.raft_addr,
        ] {
            if line.contains(&format!("{addr}:")) {
                eprintln!("kmsd: {addr} was taken by another process; retrying on {port}");
                *addr = port;
                return true;
            }
        }
        false
    }

    /// Starts the process and returns without waiting for readiness.
    pub fn spawn_no_wait(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let child = Command::new(binary("kmsd"))
            .arg("--kms-listen")
            .arg(self.kms_addr.to_string())
            .arg("--admin-listen")
            .arg(self.admin_addr.to_string())
            .arg("--raft-listen")
            .arg(self.raft_addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .env("KMSD_LOG_LEVEL", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn kmsd");
        self.child = Some(child);
    }

    /// Creates a join token for `uses` nodes on this node's admin API (following the
    /// redirect to the leader) and returns it.
    pub fn create_join_token(&self, uses: u32) -> String {
        let body = format!("{{\"ttl_secs\":600,\"uses\":{uses}}}");
        let bearer = self
            .extra_args
            .iter()
            .position(|a| a == "--admin-token")
            .and_then(|i| self.extra_args.get(i + 1))
            .cloned();
        let mut addr = self.admin_addr;
        for _ in 0..20 {
            let (status, text, location) = http_request_bearer(
                addr,
                "POST",
                "/api/v1/cluster/tokens",
                Some(&body),
                bearer.as_deref(),
            )
            .expect("admin API reachable");
            match status {
                201 => {
                    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
                    return v["token"].as_str().expect("token").to_owned();
                }
                307 => {
                    let location = location.expect("Location header");
                    let host = location
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or_default();
                    addr = host.parse().expect("leader admin address");
                }
                // No leader yet (an election): try again shortly.
                503 => std::thread::sleep(Duration::from_millis(250)),
                other => panic!("token creation answered {other}: {text}"),
            }
        }
        panic!("no join token from {}", self.admin_addr);
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// GET an admin path and parse the JSON body.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        // A loaded CI machine may be slow to accept; retry briefly before failing.
        let mut attempt = 0;
        let (status, body) = loop {
            match http_get(self.admin_addr, path) {
                Ok(answer) => break answer,
                Err(e) if attempt < 10 => {
                    attempt += 1;
                    eprintln!("GET {path}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("admin API of {} unreachable: {e}", self.admin_addr),
            }
        };
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON body")
    }

    /// Waits until `/readyz` answers 200 and the KMS port accepts connections.
    pub fn wait_ready(&mut self, timeout: Duration) {
        match self.wait_until_ready(timeout) {
            Ok(()) => self.started = true,
            Err(NotReady::Exited(status)) => {
                panic!("kmsd exited early with {status}; log:\n{}", self.log())
            }
            Err(NotReady::Timeout(last)) => panic!(
                "kmsd not ready after {timeout:?} (last: {last}); log:\n{}",
                self.log()
            ),
        }
    }

    fn wait_until_ready(&mut self, timeout: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer from /readyz");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(NotReady::Exited(status));
                }
            }
            match http_get(self.admin_addr, "/readyz") {
                Ok((200, _)) => {
                    if TcpStream::connect_timeout(&self.kms_addr, Duration::from_millis(200))
                        .is_ok()
                    {
                        return Ok(());
                    }
                    last = format!("ready, but KMS port {} refuses", self.kms_addr);
                }
                Ok((code, body)) => last = format!("/readyz {code}: {body}"),
                Err(e) => last = format!("/readyz: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(NotReady::Timeout(last))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The node's log so far (stdout + stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `kms_addr` as a string for clients.
    pub fn kms(&self) -> String {
        self.kms_addr.to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Minimal HTTP/1.0 GET (no client dependency needed for health checks and metrics).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None)
}

/// Minimal HTTP/1.0 request with an optional JSON body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_request_full(addr, method, path, json_body).map(|(status, body, _)| (status, body))
}

/// Like [`http_request`], following `307` answers (a follower's admin API sends writes to the
/// leader's) with the same method and body, as kmsctl does.
pub fn http_request_to_leader(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut addr = addr;
    let mut path = path.to_owned();
    for _ in 0..5 {
        let (status, body, location) = http_request_full(addr, method, &path, json_body)?;
        let Some(next) = location.filter(|_| status == 307) else {
            return Ok((status, body));
        };
        let rest = next.trim_start_matches("http://");
        let (host, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        addr = host
            .parse()
            .map_err(|e| std::io::Error::other(format!("redirect to {next}: {e}")))?;
        path = if tail.is_empty() {
            "/".into()
        } else {
            tail.to_owned()
        };
    }
    Err(std::io::Error::other("too many redirects"))
}

/// Like [`http_request`], also returning the `Location` header.
pub fn http_request_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> std::io::Result<(u16, String, Option<String>)> {
    http_request_bearer(addr, method, path, json_body, None)
}

/// Like [`http_request_full`], with a bearer token.
pub fn http_request_bearer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<(u16, String, Option<String>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = json_body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let location = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("location")
            .then(|| value.trim().to_owned())
    });
    Ok((status, body.to_owned(), location))
}

/// The value of a Prometheus sample line starting with `prefix` (name plus labels).
pub fn metric_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// What a verified activation answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub count: u32,
    pub epid: String,
    pub hwid: Option<[u8; 8]>,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One activation of product `t` with `cmid` on a new connection to `node`; panics on a
/// refusal or a failed verification.
pub async fn activate_with(
    node: &Node,
    t: &kmsctl::products::RequestTemplate,
    cmid: uuid::Uuid,
) -> Seen {
    use kmsctl::client::{Answer, KmsClient};
    let mut c = KmsClient::connect(
        &node.kms(),
        kms_wire::client::BindOptions::default(),
        Duration::from_secs(10),
    )
    .await
    .expect("connect and bind");
    match c
        .activate(&t.build(cmid, now_ms()), rand::random())
        .await
        .expect("verified answer")
    {
        Answer::Activated(r) => Seen {
            count: r.base.current_count,
            epid: r.base.epid,
            hwid: r.hwid,
        },
        Answer::Refused(hr) => panic!("refused 0x{hr:08X}"),
    }
}
