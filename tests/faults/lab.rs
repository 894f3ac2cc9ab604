//! The fault lab: Linux network namespaces joined by veth pairs to a bridge that lives in a
//! namespace of its own (no uplink, so no packet can leave), nftables rules for partitions,
//! and `kmsd` processes started inside the node namespaces.
//!
//! Addresses: node i is 10.77.0.(10+i), the client namespace 10.77.0.100; they exist only
//! inside the namespaces created here. The test thread enters the client namespace (`setns`),
//! so the KMS clients and the admin calls run from there, like machines on the LAN.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// KMS, admin and Raft ports, the same in every namespace.
pub const KMS_PORT: u16 = 1688;
pub const ADMIN_PORT: u16 = 8080;
pub const RAFT_PORT: u16 = 7000;
pub const CLIENT_IP: &str = "10.77.0.100";
/// Admin token of every node (an admin API on a non-loopback address needs one).
pub const ADMIN_TOKEN: &str = "faults-lab-admin-token";
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// (device, inode) of every client namespace a lab of this process created.
static CLIENT_NAMESPACES: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
static LABS: AtomicUsize = AtomicUsize::new(0);

/// Whether the calling thread is inside a lab's client namespace. Every connection the suite
/// makes checks this first: from the host's namespace, 10.77.0.x would follow its default
/// route off the machine, so nothing is sent from there.
pub fn in_client_namespace() -> bool {
    let Ok(me) = std::fs::metadata("/proc/thread-self/ns/net") else {
        return false;
    };
    CLIENT_NAMESPACES
        .lock()
        .map(|l| l.contains(&(me.dev(), me.ino())))
        .unwrap_or(false)
}

/// Address of node `i` (1-based).
pub fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

/// Runs a command; its stderr on failure.
pub fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why the lab cannot run here (no root, no `ip`/`nft`, ...), or None.
pub fn missing_prerequisites() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the fault suite needs root (network namespaces, nftables)".into());
    }
    for tool in ["ip", "nft"] {
        if run(tool, &["-V"]).is_err() {
            return Some(format!(
                "`{tool}` is missing: run tests/faults/run.sh (installs nftables, iproute2)"
            ));
        }
    }
    if !Path::new(LIBFAKETIME).exists() {
        return Some(format!(
            "{LIBFAKETIME} is missing: run tests/faults/run.sh (installs libfaketime)"
        ));
    }
    None
}

/// Namespaces, bridge and veth pairs for `n` nodes and one client namespace.
pub struct Lab {
    prefix: String,
    pub n: usize,
}

impl Lab {
    /// Builds the network. Namespace names carry the pid, so parallel runs do not collide.
    pub fn create(n: usize) -> Result<Lab, String> {
        let lab = Lab {
            prefix: format!(
                "kf{}-{}",
                std::process::id(),
                LABS.fetch_add(1, Ordering::Relaxed)
            ),
            n,
        };
        lab.destroy();
        let br = lab.bridge_ns();
        run("ip", &["netns", "add", &br])?;
        run("ip", &["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &br, "link", "set", "br0", "up"])?;
        let members: Vec<(String, String, String)> = (1..=n)
            .map(|i| (lab.ns(i), format!("p{i}"), node_ip(i)))
            .chain(std::iter::once((
                lab.client_ns(),
                "pc".to_owned(),
                CLIENT_IP.to_owned(),
            )))
            .collect();
        for (ns, port, ip) in &members {
            run("ip", &["netns", "add", ns])?;
            // Both ends are created directly in their namespaces: nothing touches the host's.
            run(
                "ip",
                &[
                    "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name",
                    port, "netns", &br,
                ],
            )?;
            run("ip", &["-n", &br, "link", "set", port, "master", "br0"])?;
            run("ip", &["-n", &br, "link", "set", port, "up"])?;
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            )?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        let client = std::fs::metadata(format!("/var/run/netns/{}", lab.client_ns()))
            .map_err(|e| format!("client namespace: {e}"))?;
        if let Ok(mut l) = CLIENT_NAMESPACES.lock() {
            l.push((client.dev(), client.ino()));
        }
        for i in 1..=n {
            lab.nft(
                i,
                "table inet fault {\n\
                 chain input { type filter hook input priority 0; policy accept; }\n\
                 chain output { type filter hook output priority 0; policy accept; }\n\
                 }\n",
            )?;
        }
        Ok(lab)
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Namespace of node `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    pub fn client_ns(&self) -> String {
        format!("{}-c", self.prefix)
    }

    /// Moves the calling thread (and the threads it starts afterwards) into the client
    /// namespace.
    pub fn enter_client(&self) -> Result<(), String> {
        enter_namespace(&format!("/var/run/netns/{}", self.client_ns()))
    }

    /// A tokio runtime whose every thread enters the client namespace when it starts.
    pub fn client_runtime(&self) -> tokio::runtime::Runtime {
        let path = format!("/var/run/netns/{}", self.client_ns());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = enter_namespace(&path) {
                    eprintln!("runtime thread: {e}");
                }
            })
            .build()
            .expect("tokio runtime")
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_namespace(path: &str) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: a valid namespace fd; setns affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Lab {
    /// Applies an nft script in node `i`'s namespace.
    fn nft(&self, i: usize, script: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(i), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| format!("nft stdin: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft in {}: {}\n{script}",
                self.ns(i),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Drops every packet between node `i` and each of `peers`, both ways (rules in `i`).
    pub fn cut(&self, i: usize, peers: &[usize]) -> Result<(), String> {
        let mut s = String::new();
        for p in peers {
            let ip = node_ip(*p);
            s.push_str(&format!("add rule inet fault input ip saddr {ip} drop\n"));
            s.push_str(&format!("add rule inet fault output ip daddr {ip} drop\n"));
        }
        self.nft(i, &s)
    }

    /// Drops what node `i` sends to each of `peers`; their packets still arrive.
    pub fn drop_outgoing(&self, i: usize, peers: &[usize]) -> Result<(), String> {
        let mut s = String::new();
        for p in peers {
            s.push_str(&format!(
                "add rule inet fault output ip daddr {} drop\n",
                node_ip(*p)
            ));
        }
        self.nft(i, &s)
    }

    /// Removes every fault rule.
    pub fn heal(&self) -> Result<(), String> {
        for i in 1..=self.n {
            self.nft(
                i,
                "flush chain inet fault input\nflush chain inet fault output\n",
            )?;
        }
        Ok(())
    }

    /// Deletes the namespaces (the veth pairs and the bridge go with them).
    pub fn destroy(&self) {
        for ns in (1..=self.n)
            .map(|i| self.ns(i))
            .chain([self.client_ns(), self.bridge_ns()])
        {
            if Path::new(&format!("/var/run/netns/{ns}")).exists() {
                let _ = run("ip", &["netns", "del", &ns]);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// The `kmsd` built with the storage failpoints (`tests/faults/run.sh` builds it).
pub fn kmsd_binary() -> PathBuf {
    if let Ok(p) = std::env::var("KMSD_FAULTS_BIN") {
        return PathBuf::from(p);
    }
    let path = kms_tests::bin_dir().join("kmsd-failpoints");
    assert!(
        path.exists(),
        "{} not found: run tests/faults/run.sh (it builds kmsd with --features failpoints)",
        path.display()
    );
    path
}

/// A `kmsd` process in its namespace, with a libfaketime clock and a failpoint file.
pub struct FNode {
    pub id: usize,
    ns: String,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    paused: bool,
}

impl FNode {
    pub fn new(lab: &Lab, id: usize, dir: &Path, args: Vec<String>) -> FNode {
        let dir = dir.join(format!("n{id}"));
        let _ = std::fs::create_dir_all(&dir);
        let node = FNode {
            id,
            ns: lab.ns(id),
            dir,
            args,
            child: None,
            paused: false,
        };
        node.set_clock_offset("+0");
        node.set_failpoints("");
        node
    }

    pub fn ip(&self) -> String {
        node_ip(self.id)
    }

    pub fn kms(&self) -> String {
        format!("{}:{KMS_PORT}", self.ip())
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.ip().parse().expect("node ip"), ADMIN_PORT)
    }

    pub fn raft(&self) -> String {
        format!("{}:{RAFT_PORT}", self.ip())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("kmsd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// libfaketime offset of this node's wall clock (`+0`, `+2h`, `-30m`, ...); it takes
    /// effect within a second (FAKETIME_CACHE_DURATION=1).
    pub fn set_clock_offset(&self, offset: &str) {
        std::fs::write(self.dir.join("faketime"), format!("{offset}\n")).expect("faketime file");
    }

    /// Storage failpoints of this node (`wal-fsync=return`, ...; empty = off), re-read by
    /// the running process every 100 ms.
    pub fn set_failpoints(&self, spec: &str) {
        std::fs::write(self.dir.join("failpoints"), spec).expect("failpoints file");
    }

    /// Starts the process (bootstrap or join arguments come from the caller).
    pub fn spawn(&mut self, extra: &[String]) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let bin = kmsd_binary();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(bin)
            .args(["--node-id", &self.id.to_string()])
            .args(["--kms-listen", &self.kms()])
            .args(["--admin-listen", &self.admin().to_string()])
            .args(["--raft-listen", &self.raft()])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(&self.args)
            .args(extra)
            .env("KMSD_LOG_LEVEL", "info")
            .env("KMSD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", self.dir.join("faketime"))
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_CACHE_DURATION", "1")
            .env("KMS_FAILPOINTS_FILE", self.dir.join("failpoints"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn kmsd in its namespace");
        self.child = Some(child);
        self.paused = false;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The exit code once the process has exited (None while it runs or was never started).
    pub fn exit_code(&mut self) -> Option<i32> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.code().unwrap_or(-1)),
            _ => None,
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid of our own child.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// SIGSTOP: the process keeps its sockets but runs nothing.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.paused = false;
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if self.paused {
            self.resume();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until /readyz answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if !self.is_running() {
                return Err(format!(
                    "node {} exited; log tail:\n{}",
                    self.id,
                    tail(&self.log(), 30)
                ));
            }
            match http(self.admin(), "GET", "/readyz", None, Duration::from_secs(2)) {
                Ok((200, _)) => return Ok(()),
                Ok((c, b)) => last = format!("{c} {b}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "node {} not ready after {timeout:?} ({last}); log tail:\n{}",
            self.id,
            tail(&self.log(), 30)
        ))
    }

    /// `GET path` as JSON, or None when the node does not answer within 2 s.
    /// A Prometheus sample of this node's `/metrics` (name plus labels as written).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        match http(
            self.admin(),
            "GET",
            "/metrics",
            None,
            Duration::from_secs(2),
        ) {
            Ok((200, body)) => body
                .lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok()),
            _ => None,
        }
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        match http(self.admin(), "GET", path, None, Duration::from_secs(2)) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }
}

impl Drop for FNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Minimal HTTP/1.0 request with connect and read timeouts.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    if !in_client_namespace() {
        return Err("refused: not inside the lab's client namespace".into());
    }
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
