//! A real BIND 9 on loopback for tests, driven by `tests/dns/start-dns.sh` / `stop-dns.sh`
//! (named on a free high port, fresh TSIG keys, update-policy; stopped by pid on drop).
//!
//! When `named` is not installed the tests are skipped with a message, except under CI
//! (`CI=true`), where that is a failure: run `tests/dns/install.sh` first.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kms_testkit::free_port;

/// The fixture's scripts, found from this crate or from the workspace `tests` crate.
pub fn script_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for candidate in [manifest.join("../../tests/dns"), manifest.join("dns")] {
        if candidate.join("start-dns.sh").exists() {
            return candidate;
        }
    }
    panic!(
        "tests/dns/start-dns.sh not found from {}",
        manifest.display()
    );
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True when the DNS tools are present. Without them: panic in CI, else print why and false.
pub fn available(test: &str) -> bool {
    let missing: Vec<&str> = ["named", "dig", "nsupdate"]
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test}: {} missing; run tests/dns/install.sh (bind9 bind9-utils bind9-dnsutils)",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED {test}: {} not installed (run tests/dns/install.sh)",
        missing.join(", ")
    );
    false
}

/// A running named.
pub struct Bind {
    dir: tempfile::TempDir,
    pub port: u16,
    pub zone: String,
    pub key_name: String,
    pub key_secret: String,
    pub other_key_name: String,
    pub other_key_secret: String,
}

impl Bind {
    /// Starts a server for zone `kms.test`, or `None` when the tools are missing (see
    /// [`available`]).
    pub fn start(test: &str) -> Option<Bind> {
        if !available(test) {
            return None;
        }
        let scripts = script_dir();
        let mut last_err = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("kms-dns-test")
                .tempdir()
                .expect("temp dir");
            let port = free_port();
            let out = Command::new("sh")
                .arg(scripts.join("start-dns.sh"))
                .arg(dir.path())
                .arg(port.to_string())
                .stdin(Stdio::null())
                .output()
                .expect("run start-dns.sh");
            if out.status.success() {
                let env = parse_env(&String::from_utf8_lossy(&out.stdout));
                let get = |k: &str| {
                    env.get(k)
                        .cloned()
                        .unwrap_or_else(|| panic!("{k} missing in start-dns.sh output"))
                };
                return Some(Bind {
                    port,
                    zone: get("DNS_ZONE"),
                    key_name: get("KEY_NAME"),
                    key_secret: get("KEY_SECRET"),
                    other_key_name: get("OTHER_KEY_NAME"),
                    other_key_secret: get("OTHER_KEY_SECRET"),
                    dir,
                });
            }
            last_err = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        panic!("start-dns.sh failed 5 times; last error:\n{last_err}");
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn server(&self) -> String {
        self.addr().to_string()
    }

    /// Writes the cluster secret to a file (as an operator would) and returns its path.
    pub fn secret_file(&self) -> PathBuf {
        let path = self.dir.path().join("cluster.secret");
        std::fs::write(&path, format!("{}\n", self.key_secret)).expect("write secret");
        path
    }

    /// `dig` for one RRset, answers as `+short` lines, sorted.
    pub fn dig(&self, name: &str, rtype: &str) -> Vec<String> {
        let out = Command::new(find_tool("dig").expect("dig"))
            .args(["@127.0.0.1", "-p", &self.port.to_string(), name, rtype])
            .args(["+short", "+norec", "+time=2", "+tries=1", "+tcp"])
            .output()
            .expect("run dig");
        assert!(out.status.success(), "dig failed: {out:?}");
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        lines.sort();
        lines
    }

    /// The `_vlmcs._tcp` SRV RRset as `priority weight port target.` lines, sorted.
    pub fn srv(&self) -> Vec<String> {
        self.dig(&format!("_vlmcs._tcp.{}.", self.zone), "SRV")
    }

    /// TTL of the SRV RRset as served (None when empty).
    pub fn srv_ttl(&self) -> Option<u32> {
        let out = Command::new(find_tool("dig").expect("dig"))
            .args(["@127.0.0.1", "-p", &self.port.to_string()])
            .arg(format!("_vlmcs._tcp.{}.", self.zone))
            .args(["SRV", "+noall", "+answer", "+norec", "+tcp"])
            .output()
            .expect("run dig");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1).and_then(|t| t.parse().ok()))
    }

    /// SOA serial (named increments it once per applied update message).
    pub fn serial(&self) -> u32 {
        let soa = self.dig(&format!("{}.", self.zone), "SOA");
        soa.first()
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|s| s.parse().ok())
            .expect("SOA serial")
    }

    /// Runs `nsupdate` with the foreign owner's key; `commands` are the update lines.
    /// Returns (success, output).
    pub fn nsupdate_other(&self, commands: &str) -> (bool, String) {
        self.nsupdate(&self.other_key_name, &self.other_key_secret, commands)
    }

    pub fn nsupdate_cluster(&self, commands: &str) -> (bool, String) {
        self.nsupdate(&self.key_name, &self.key_secret, commands)
    }

    fn nsupdate(&self, key: &str, secret: &str, commands: &str) -> (bool, String) {
        use std::io::Write;
        let mut child = Command::new(find_tool("nsupdate").expect("nsupdate"))
            .arg("-y")
            .arg(format!("hmac-sha256:{key}:{secret}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nsupdate");
        let script = format!(
            "server 127.0.0.1 {}\nzone {}.\n{}\nsend\n",
            self.port, self.zone, commands
        );
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write nsupdate script");
        let out = child.wait_with_output().expect("nsupdate output");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// named's log (one line per accepted or denied update).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }

    /// Stops named by its pid (idempotent).
    pub fn stop(&self) {
        let _ = Command::new("sh")
            .arg(script_dir().join("stop-dns.sh"))
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}
