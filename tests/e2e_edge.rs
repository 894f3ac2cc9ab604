//! The edge of a node against real processes on loopback: per-source limits on port 1688
//! (connections and new CMIDs from 127.0.0.2 throttled while 127.0.0.1 activates), binds
//! counting toward a connection's PDU limit, escaped workstation names, a private data dir,
//! the admin token file, rate-limited 401s and the admin API over HTTPS.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use kms_tests::{binary, http_get, metric_value, now_ms, Node};
use kms_wire::client::{BindOptions, ClientConnection};
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(20);
const TOKEN: &str = "e2e-edge-admin-token-0123456789";
/// HRESULT_FROM_WIN32(RPC_S_SERVER_TOO_BUSY), the answer to a new client over the rate.
const BUSY: u32 = 0x8007_06BB;

fn flood_source() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}

fn local() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

async fn client_from(node: &Node, source: IpAddr) -> Result<KmsClient, String> {
    KmsClient::connect_from(node.kms_addr, source, BindOptions::default(), TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

async fn activate(c: &mut KmsClient, t: &RequestTemplate, cmid: Uuid) -> Answer {
    c.activate(&t.build(cmid, now_ms()), rand::random())
        .await
        .expect("an answer")
}

fn metrics(node: &Node) -> String {
    let (status, body) = http_get(node.admin_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    body
}

fn events(node: &Node, id: u32) -> Vec<Value> {
    node.get_json(&format!("/api/v1/events?event_id={id}&limit=1000"))["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_throttled_while_another_activates() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        dir.path(),
        &[
            "--max-connections-per-source",
            "4",
            "--new-clients-per-sec",
            "0.1",
            "--new-clients-burst",
            "10",
            // Loopback is exempt by default (local load tools); this test is the flood.
            "--edge-exempt-network",
            "none",
        ],
    );
    let windows = RequestTemplate::new(resolve("windows").unwrap());

    // -- New CMIDs from 127.0.0.2: the burst, a trickle, then "busy".
    let started = Instant::now();
    let mut flood = client_from(&node, flood_source()).await.unwrap();
    let mut granted = Vec::new();
    let mut busy = 0u32;
    for _ in 0..40 {
        let cmid = Uuid::new_v4();
        match activate(&mut flood, &windows, cmid).await {
            Answer::Activated(_) => granted.push(cmid),
            Answer::Refused(hr) => {
                assert_eq!(hr, BUSY, "refusal 0x{hr:08X}");
                busy += 1;
            }
        }
    }
    // 10 from the burst plus 0.1 per second of the loop.
    let most = 10 + (started.elapsed().as_secs_f64() * 0.1).ceil() as usize + 1;
    assert!(
        (10..=most).contains(&granted.len()),
        "{} granted (at most {most})",
        granted.len()
    );
    assert_eq!(granted.len() + busy as usize, 40);
    // A registered client of the throttled source still renews.
    assert!(matches!(
        activate(&mut flood, &windows, granted[0]).await,
        Answer::Activated(_)
    ));
    drop(flood);

    // -- Meanwhile 127.0.0.1 activates new clients normally.
    let mut good = client_from(&node, local()).await.unwrap();
    for _ in 0..5 {
        match activate(&mut good, &windows, Uuid::new_v4()).await {
            Answer::Activated(_) => {}
            Answer::Refused(hr) => panic!("127.0.0.1 refused 0x{hr:08X}"),
        }
    }
    drop(good);

    // -- Connections: 4 held from 127.0.0.2, the 5th is closed without an answer.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while held.len() < 4 {
        // The server frees the slot of the dropped flood connection when it sees the close.
        match client_from(&node, flood_source()).await {
            Ok(c) => held.push(c),
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot hold 4 connections: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let fifth = client_from(&node, flood_source()).await;
    assert!(fifth.is_err(), "a 5th connection from 127.0.0.2 was served");
    // 127.0.0.1 is not affected, and the held connections still work.
    let mut good = client_from(&node, local()).await.unwrap();
    assert!(matches!(
        activate(&mut good, &windows, Uuid::new_v4()).await,
        Answer::Activated(_)
    ));
    assert!(matches!(
        activate(&mut held[0], &windows, granted[1]).await,
        Answer::Activated(_)
    ));
    drop(held);
    // Slots come back once the connections are closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client_from(&node, flood_source()).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "slots never came back: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // -- Metrics count every refusal.
    let m = metrics(&node);
    let conn_refused = metric_value(
        &m,
        "kms_edge_refused_total{reason=\"connections_per_source\"}",
    )
    .unwrap_or(0.0);
    let new_refused = metric_value(
        &m,
        "kms_edge_refused_total{reason=\"new_clients_per_source\"}",
    )
    .unwrap_or(0.0);
    assert!(conn_refused >= 1.0, "{m}");
    assert_eq!(new_refused, f64::from(busy), "{m}");

    // -- Events: few (one per reason and 10 s), each naming the source and how many.
    let ev = events(&node, 1020);
    let by_reason = |r: &str| -> Vec<&Value> {
        ev.iter()
            .filter(|e| e["fields"]["reason"] == r)
            .collect::<Vec<_>>()
    };
    let new_events = by_reason("new_clients_per_source");
    let conn_events = by_reason("connections_per_source");
    assert!(!new_events.is_empty() && !conn_events.is_empty(), "{ev:?}");
    // At most one event per 10 s since the first refusal (plus one for the period edges).
    let most_events = 2 + started.elapsed().as_secs() as usize / 10;
    assert!(
        new_events.len() <= most_events && new_events.len() < busy as usize,
        "{} events for {busy} refusals: not throttled",
        new_events.len()
    );
    for e in new_events.iter().chain(&conn_events) {
        assert_eq!(e["fields"]["source"], "127.0.0.2", "{e}");
        assert_eq!(e["level"], "warning");
    }
    let reported: u64 = new_events
        .iter()
        .map(|e| e["fields"]["refused"].as_u64().unwrap())
        .sum();
    assert!(reported >= 1 && reported <= u64::from(busy), "{reported}");
    let log = node.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("new_clients_per_source")
            && l.contains("127.0.0.2")),
        "no refusal line in the log:\n{log}"
    );
}

/// Reads one PDU (header + body) or `None` when the server closed the connection.
fn read_pdu(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).ok()?;
    let len = usize::from(u16::from_le_bytes([header[8], header[9]]));
    let mut pdu = header.to_vec();
    pdu.resize(len.max(16), 0);
    stream.read_exact(&mut pdu[16..]).ok()?;
    Some(pdu)
}

#[test]
fn repeated_binds_count_toward_the_pdu_limit_of_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--max-pdus-per-connection", "5"]);
    let mut stream = TcpStream::connect(node.kms_addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let bind = ClientConnection::new(BindOptions::default()).bind();
    let mut answered = 0;
    for _ in 0..20 {
        if stream.write_all(&bind).is_err() {
            break;
        }
        match read_pdu(&mut stream) {
            Some(pdu) => {
                assert_eq!(pdu[2], 12, "BIND_ACK expected");
                answered += 1;
            }
            None => break,
        }
    }
    assert_eq!(answered, 5, "binds must count toward the PDU limit");
    let m = metrics(&node);
    assert_eq!(
        metric_value(&m, "kms_rpc_faults_total{reason=\"too_many_pdus\"}"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn a_connection_that_keeps_sending_is_closed_at_the_end_of_its_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--max-connection-secs", "2"]);
    let mut stream = TcpStream::connect(node.kms_addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let bind = ClientConnection::new(BindOptions::default()).bind();
    let started = Instant::now();
    // A bind every 200 ms never lets the idle timeout (30 s) fire; the lifetime does.
    let closed_after = loop {
        if stream.write_all(&bind).is_err() || read_pdu(&mut stream).is_none() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(15), "never closed");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        closed_after >= Duration::from_millis(1800),
        "closed too early: {closed_after:?}"
    );
    let m = metrics(&node);
    assert_eq!(
        metric_value(&m, "kms_rpc_faults_total{reason=\"lifetime\"}"),
        Some(1.0),
        "{m}"
    );
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workstation_names_with_control_characters_are_escaped_and_the_data_dir_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--snapshot-every", "2"]);
    let mut t = RequestTemplate::new(resolve("windows").unwrap());
    t.workstation = "evil\nINFO kmsd: forged line\u{1b}[31m".to_owned();
    let escaped = "evil\\nINFO kmsd: forged line\\u{1b}[31m";
    let mut c = client_from(&node, local()).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            activate(&mut c, &t, Uuid::new_v4()).await,
            Answer::Activated(_)
        ));
    }
    // The text log: escaped, and no forged line of its own.
    let log = node.log();
    assert!(log.contains(escaped), "{log}");
    assert!(!log.contains('\u{1b}'), "raw escape character in the log");
    assert!(
        !log.lines().any(|l| l.starts_with("INFO kmsd: forged line")),
        "{log}"
    );
    // The events: message and fields escaped.
    let ev = events(&node, 12290);
    assert_eq!(ev.len(), 3);
    for e in &ev {
        assert_eq!(e["fields"]["workstation"], escaped, "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(escaped) && !message.contains('\n'),
            "{message}"
        );
    }
    // The registry keeps what the client sent (the API is JSON: escaped by JSON itself).
    let clients = node.get_json("/api/v1/clients");
    assert_eq!(
        clients["clients"][0]["workstation"],
        "evil\nINFO kmsd: forged line\u{1b}[31m"
    );

    // Data dir 0700, every file 0600 (snapshots were written: --snapshot-every 2).
    #[cfg(unix)]
    {
        let mut seen = 0;
        let mut stack = vec![node.data_dir.clone()];
        while let Some(p) = stack.pop() {
            let m = mode(&p);
            if p.is_dir() {
                assert_eq!(m, 0o700, "{}", p.display());
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                assert_eq!(m & 0o077, 0, "{} has mode {m:o}", p.display());
                seen += 1;
            }
        }
        assert!(seen >= 2, "only {seen} files in the data dir");
    }
}

fn check_config(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("kmsd"))
        .arg("check-config")
        .args(args)
        .env_remove("KMSD_ADMIN_TOKEN")
        .env_remove("KMSD_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(unix)]
fn write_secret(path: &std::path::Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_comes_from_a_private_file_and_not_from_argv() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin.token");
    write_secret(&file, &format!("  {TOKEN}\n\n"), 0o600);
    let file_arg = file.to_str().unwrap();

    // check-config: accepted, says where the token comes from, shows the edge limits.
    let (code, out, err) = check_config(&["--admin-token-file", file_arg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("token from file"), "{out}");
    assert!(out.contains("per source address: connections 256"), "{out}");
    assert!(out.contains("registry max"), "{out}");
    let (_, out, _) = check_config(&["--registry-max-clients", "5000"]);
    assert!(out.contains("registry max 5000 clients (setting)"), "{out}");

    // Refused: readable by every user, empty, both a token and a file.
    let open = dir.path().join("open.token");
    write_secret(&open, TOKEN, 0o644);
    let (code, _, err) = check_config(&["--admin-token-file", open.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("admin.token_file") && err.contains("chmod 600"),
        "{err}"
    );
    let empty = dir.path().join("empty.token");
    write_secret(&empty, " \n", 0o600);
    let (code, _, err) = check_config(&["--admin-token-file", empty.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("is empty"), "{err}");
    let (code, _, err) = check_config(&["--admin-token-file", file_arg, "--admin-token", TOKEN]);
    assert_eq!(code, 2, "{err}");

    // A node with the file: the token works, nothing else does, and argv does not hold it.
    std::fs::create_dir_all(dir.path().join("node")).unwrap();
    let node = Node::start(&dir.path().join("node"), &["--admin-token-file", file_arg]);
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/v1/status", node.admin_addr);
    let ok = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let denied = http.get(&url).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", node.pid().unwrap())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("--admin-token-file"), "{cmdline}");
    assert!(!cmdline.contains(TOKEN), "the token is in argv: {cmdline}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_token_checks_are_answered_429_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        dir.path(),
        &[
            "--admin-token",
            TOKEN,
            "--admin-auth-failures",
            "3",
            "--admin-auth-window-secs",
            "300",
        ],
    );
    let from = |ip: IpAddr| {
        reqwest::Client::builder()
            .local_address(ip)
            .timeout(TIMEOUT)
            .build()
            .unwrap()
    };
    let flood = from(flood_source());
    let good = from(local());
    let url = format!("http://{}/api/v1/status", node.admin_addr);
    for i in 0..3 {
        let r = flood
            .get(&url)
            .bearer_auth(format!("guess-{i}-0123456789abcdef"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "guess {i}");
    }
    // The 4th try, and even the right token, from that address: 429 with Retry-After.
    for token in ["guess-3-0123456789abcdef", TOKEN] {
        let r = flood.get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 429);
        let retry: u64 = r
            .headers()
            .get("retry-after")
            .expect("Retry-After")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=300).contains(&retry), "{retry}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "too_many_requests", "{body}");
    }
    // Another address: the right token works, a wrong one is a plain 401.
    let r = good.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = good
        .get(&url)
        .bearer_auth("wrong-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health and metrics are not behind the token or the limit.
    let r = flood
        .get(format!("http://{}/healthz", node.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let m = metrics(&node);
    assert_eq!(
        metric_value(&m, "kms_admin_auth_refused_total{reason=\"throttled\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "kms_admin_auth_refused_total{reason=\"unauthorized\"}"),
        Some(4.0),
        "{m}"
    );
    let ev: Value = good
        .get(format!(
            "http://{}/api/v1/events?event_id=1021",
            node.admin_addr
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ev = ev["events"].as_array().unwrap();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["fields"]["source"], "127.0.0.2");
}

/// A CA and a server certificate for 127.0.0.1, as PEM: (ca, chain, key).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_speaks_https_with_an_operator_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, chain, key) = test_pki();
    let ca_path = dir.path().join("ca.pem");
    let cert_path = dir.path().join("admin.pem");
    let key_path = dir.path().join("admin.key");
    std::fs::write(&ca_path, &ca).unwrap();
    std::fs::write(&cert_path, &chain).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    // check-config loads the pair; a key that does not parse is refused.
    let tls_args = [
        "--admin-tls-cert",
        cert_path.to_str().unwrap(),
        "--admin-tls-key",
        key_path.to_str().unwrap(),
    ];
    let (code, out, err) = check_config(&tls_args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("admin https (cert"), "{out}");
    let (code, _, err) = check_config(&[
        "--admin-tls-cert",
        cert_path.to_str().unwrap(),
        "--admin-tls-key",
        ca_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "a certificate is not a key: {err}");
    assert!(err.contains("admin.tls_cert"), "{err}");
    std::fs::create_dir_all(dir.path().join("node")).unwrap();
    let mut node = Node::new(
        &dir.path().join("node"),
        &[
            "--admin-token",
            TOKEN,
            "--admin-tls-cert",
            cert_path.to_str().unwrap(),
            "--admin-tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    node.spawn_no_wait();
    let base = format!("https://{}", node.admin_addr);
    let ca_cert = reqwest::Certificate::from_pem(ca.as_bytes()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .tls_built_in_root_certs(false)
        .timeout(TIMEOUT)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match https.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status() == 200 => break,
            other => {
                assert!(node.is_running(), "kmsd exited:\n{}", node.log());
                assert!(
                    Instant::now() < deadline,
                    "not ready over HTTPS: {other:?}\n{}",
                    node.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let r = https
        .get(format!("{base}/api/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the HTTPS port gets no API answer.
    let plain = http_get(node.admin_addr, "/api/v1/status");
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");

    // kmsctl: trusts the node with --ca-cert (or KMSCTL_CA_CERT), not without.
    let kmsctl = |extra: &[&str], ca_env: Option<&str>| {
        let mut cmd = Command::new(binary("kmsctl"));
        cmd.args(["status", "--url", &base, "--token", TOKEN])
            .args(extra)
            .env_remove("KMSCTL_CA_CERT")
            .env_remove("KMSCTL_TOKEN")
            .env_remove("KMSCTL_ADMIN_URL");
        if let Some(ca) = ca_env {
            cmd.env("KMSCTL_CA_CERT", ca);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = kmsctl(&["--ca-cert", ca_path.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = kmsctl(&[], Some(ca_path.to_str().unwrap()));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = kmsctl(&[], None);
    assert_eq!(
        code, 3,
        "an untrusted certificate must not be accepted: {err}"
    );

    // The container health check probes its own HTTPS port on loopback.
    let status = Command::new(binary("kmsd"))
        .args(["healthcheck", "--url", &format!("{base}/healthz")])
        .status()
        .unwrap();
    assert!(status.success());
}

#[cfg(unix)]
#[test]
fn a_tsig_secret_file_other_users_can_read_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("tsig.secret");
    write_secret(
        &secret,
        "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\n",
        0o644,
    );
    // Nothing listens on the DNS port: publishing fails, the node runs on (loopback only).
    let cfg = dir.path().join("kmsd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nadvertise_host = \"kms1.edge.test\"\n\n[[dns.publish]]\nzone = \"edge.test\"\n\
             server = \"127.0.0.1:{}\"\ntsig_key_name = \"k\"\ntsig_secret_file = \"{}\"\n",
            kms_tests::free_port(),
            secret.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("node")).unwrap();
    let node = Node::start(
        &dir.path().join("node"),
        &["--config", cfg.to_str().unwrap()],
    );
    let log = node.log();
    assert!(
        log.lines().any(
            |l| l.contains("WARN") && l.contains("TSIG secret file is readable by other users")
        ),
        "{log}"
    );
    drop(node);

    // A private file: no warning.
    write_secret(
        &secret,
        "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\n",
        0o600,
    );
    std::fs::create_dir_all(dir.path().join("node2")).unwrap();
    let node = Node::start(
        &dir.path().join("node2"),
        &["--config", cfg.to_str().unwrap()],
    );
    assert!(
        !node.log().contains("TSIG secret file is readable"),
        "{}",
        node.log()
    );
}
