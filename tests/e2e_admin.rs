//! The admin API and the `kmsctl` admin commands against a real kmsd, after activations made
//! by the real client library: every endpoint (happy path, 401 without or with a wrong token,
//! 400 naming the field, nothing changed after a rejected call), the status counters against
//! what the clients did, every `kmsctl` admin subcommand's output and exit code.

use std::process::Command;
use std::time::Duration;

use kms_tests::{binary, free_port, metric_value, now_ms, Node};
use kms_wire::client::BindOptions;
use kmsctl::admin_client::AdminClient;
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const TOKEN: &str = "e2e-admin-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `n` requests for `product` with `license_status`, each with a new CMID, on one
/// connection; returns how many were granted and how many refused (with their HRESULTs).
async fn activate(
    node: &Node,
    product: &str,
    license_status: u32,
    n: usize,
    workstation: &str,
) -> (usize, Vec<u32>) {
    let mut t = RequestTemplate::new(resolve(product).unwrap());
    t.license_status = license_status;
    t.workstation = workstation.to_owned();
    let mut c = KmsClient::connect(&node.kms(), BindOptions::default(), TIMEOUT)
        .await
        .unwrap();
    let mut granted = 0;
    let mut refused = Vec::new();
    for _ in 0..n {
        match c
            .activate(&t.build(Uuid::new_v4(), now_ms()), rand::random())
            .await
            .unwrap()
        {
            Answer::Activated(_) => granted += 1,
            Answer::Refused(hr) => refused.push(hr),
        }
    }
    (granted, refused)
}

fn admin(node: &Node, token: Option<&str>) -> AdminClient {
    AdminClient::new(
        &format!("http://{}", node.admin_addr),
        token.map(str::to_owned),
        TIMEOUT,
    )
    .unwrap()
}

async fn raw(
    node: &Node,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let r = admin(node, token)
        .raw(method, path, body.as_ref())
        .await
        .unwrap();
    let v = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body));
    (r.status, v)
}

fn assert_400(status: u16, body: &Value, field: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_input", "{body}");
    assert_eq!(body["field"], field, "{body}");
}

const OFFICE_2010_CSVLK: &str = "bfe7a195-4f8f-4f0b-a622-cf13c7d16864";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_endpoints_auth_validation_and_counters_match_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    // This test sends dozens of 401s on purpose: no 429 limit (e2e_edge tests the limit).
    let node = Node::start(
        dir.path(),
        &["--admin-token", TOKEN, "--admin-auth-failures", "0"],
    );

    // What the clients do: 4 Windows in initial grace, 2 Windows licensed (renewal state),
    // 3 Office 2016 unlicensed, 1 server in notification.
    assert_eq!(
        activate(&node, "windows", 2, 4, "ws-init").await,
        (4, vec![])
    );
    assert_eq!(
        activate(&node, "windows", 1, 2, "ws-lic").await,
        (2, vec![])
    );
    assert_eq!(
        activate(&node, "office", 0, 3, "ws-office").await,
        (3, vec![])
    );
    assert_eq!(
        activate(&node, "server", 5, 1, "ws-server").await,
        (1, vec![])
    );

    // -- 401 on every API route without or with a wrong token; health stays open.
    let doc = admin(&node, Some(TOKEN))
        .get::<Value>("/api/v1/openapi.json")
        .await
        .unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 9, "{paths:?}");
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let p = path.replace("{id}", "1");
            let body = matches!(m, Method::POST | Method::PUT).then(|| json!({}));
            for token in [None, Some("wrong-token-wrong-token")] {
                let (status, v) = raw(&node, token, m.clone(), &p, body.clone()).await;
                assert_eq!(status, 401, "{method} {p} with {token:?}: {v}");
                assert_eq!(v["error"], "unauthorized");
            }
        }
    }
    for path in ["/healthz", "/readyz", "/metrics", "/"] {
        let (status, _) = raw(&node, None, Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}");
    }

    // -- status: the counters equal what the clients did.
    let a = admin(&node, Some(TOKEN));
    let s: Value = a.get("/api/v1/status").await.unwrap();
    assert_eq!(s["node_id"], 1);
    assert_eq!(s["role"], "leader");
    assert_eq!(s["leader_id"], 1);
    assert_eq!(s["total_requests"], 10);
    assert_eq!(s["failed_requests"], 0);
    assert_eq!(s["requests_by_license_status"]["initial_grace"], 4);
    assert_eq!(s["requests_by_license_status"]["licensed"], 2);
    assert_eq!(s["requests_by_license_status"]["unlicensed"], 3);
    assert_eq!(s["requests_by_license_status"]["notification"], 1);
    assert_eq!(
        s["current_count"]["Windows"], 7,
        "6 client + 1 server CMIDs"
    );
    let office_app = s["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["current_count"] == 3)
        .expect("Office 2013+ with 3 clients");
    assert_eq!(office_app["threshold"], 5);
    assert_eq!(s["registered_clients"], 10);
    assert_eq!(s["listen"]["kms"][0], node.kms());
    assert_eq!(s["dns"]["enabled"], false);
    assert_eq!(s["hwid"].as_str().map(str::len), Some(16));
    assert!(!s["epids"].as_array().unwrap().is_empty());

    // -- clients: filters, paging, CSV.
    let all: Value = a.get("/api/v1/clients").await.unwrap();
    assert_eq!(all["total"], 10);
    let office: Value = a
        .get("/api/v1/clients?application=office2013")
        .await
        .unwrap();
    assert_eq!(office["total"], 3);
    let lic: Value = a.get("/api/v1/clients?search=ws-lic").await.unwrap();
    assert_eq!(lic["total"], 2);
    assert!(lic["clients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["license_status"] == "licensed"));
    let page: Value = a.get("/api/v1/clients?limit=3&offset=9").await.unwrap();
    assert_eq!(page["clients"].as_array().unwrap().len(), 1);
    let csv = a
        .call(
            Method::GET,
            "/api/v1/clients?format=csv&product=34e1ae55-27f8-4950-8877-7a03be5fb181",
            None,
        )
        .await
        .unwrap();
    assert!(
        csv.content_type.starts_with("text/csv"),
        "{}",
        csv.content_type
    );
    assert_eq!(csv.body.lines().count(), 2, "{}", csv.body);
    assert!(csv.body.contains("ws-server"));
    let (status, v) = raw(
        &node,
        Some(TOKEN),
        Method::GET,
        "/api/v1/clients?since=tomorrow",
        None,
    )
    .await;
    assert_400(status, &v, "since");

    // -- events: one 12290 per request, newest first.
    let ev: Value = a
        .get("/api/v1/events?event_id=12290&limit=1000")
        .await
        .unwrap();
    let events = ev["events"].as_array().unwrap();
    assert_eq!(events.len(), 10);
    assert_eq!(events[0]["fields"]["workstation"], "ws-server");
    assert_eq!(events[0]["fields"]["license_status"], "notification");
    assert_eq!(events[0]["fields"]["result"], "0x00000000");
    let (status, v) = raw(
        &node,
        Some(TOKEN),
        Method::GET,
        "/api/v1/events?limit=0",
        None,
    )
    .await;
    assert_400(status, &v, "limit");

    // -- config: rejected calls change nothing.
    let before: Value = a.get("/api/v1/config").await.unwrap();
    for (body, field) in [
        (
            json!({"policy": {"activation_interval": 1}}),
            "policy.activation_interval",
        ),
        (
            json!({"policy": {"renewal_interval": 60, "nonsense": true}}),
            "policy.nonsense",
        ),
        (json!({"identity": {"hwid": "xyz"}}), "identity.hwid"),
        (
            json!({"policy": {"renewal_interval": 60}, "identity": {"epids": {OFFICE_2010_CSVLK: "bad"}}}),
            "identity.epids.bfe7a195-4f8f-4f0b-a622-cf13c7d16864",
        ),
    ] {
        let (status, v) = raw(
            &node,
            Some(TOKEN),
            Method::PUT,
            "/api/v1/config",
            Some(body),
        )
        .await;
        assert_400(status, &v, field);
    }
    let bad_json = a.raw(Method::PUT, "/api/v1/config", None).await.unwrap();
    assert_eq!(bad_json.status, 400, "{}", bad_json.body);
    assert_eq!(a.get::<Value>("/api/v1/config").await.unwrap(), before);

    // Strict policy with only the Office 2010 CSVLK: Windows is then refused (0xC004F042),
    // which the status counts as a failed request.
    let after: Value = a
        .set_config(&json!({"policy": {"product_policy": "strict", "licensed_csvlks": [OFFICE_2010_CSVLK], "activation_interval": 60}}))
        .await
        .map(|c| serde_json::to_value(c).unwrap())
        .unwrap();
    assert_eq!(after["policy"]["product_policy"], "strict");
    assert_eq!(after["policy"]["activation_interval"], 60);
    let (granted, refused) = activate(&node, "windows", 2, 1, "ws-refused").await;
    assert_eq!((granted, refused), (0, vec![0xC004_F042]));
    let s: Value = a.get("/api/v1/status").await.unwrap();
    assert_eq!(s["total_requests"], 11);
    assert_eq!(s["failed_requests"], 1);
    assert_eq!(s["refusals"]["0xC004F042"], 1);
    assert_eq!(s["activation_interval"], 60);
    let products: Value = a.get("/api/v1/products?activated=true").await.unwrap();
    let activated = products["products"].as_array().unwrap();
    assert!(!activated.is_empty());
    assert!(
        activated.iter().all(|p| p["csvlk_id"] == OFFICE_2010_CSVLK),
        "{activated:?}"
    );
    let config_events: Value = a.get("/api/v1/events?event_id=1002").await.unwrap();
    assert_eq!(config_events["events"].as_array().unwrap().len(), 1);

    // Identity override: new HWID answered to clients.
    let cfg = a
        .set_config(&json!({"policy": {"product_policy": "open"}, "identity": {"hwid": "0011223344556677"}}))
        .await
        .unwrap();
    assert_eq!(cfg.identity.unwrap().hwid, "0011223344556677");

    // -- cluster: one member; removing it is a conflict, an unknown id is 404.
    let cl = a.cluster().await.unwrap();
    assert_eq!(cl.leader_id, Some(1));
    assert_eq!(cl.members.len(), 1);
    let (status, _) = raw(
        &node,
        Some(TOKEN),
        Method::DELETE,
        "/api/v1/cluster/members/1",
        None,
    )
    .await;
    assert_eq!(status, 409);
    let (status, _) = raw(
        &node,
        Some(TOKEN),
        Method::DELETE,
        "/api/v1/cluster/members/99",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, v) = raw(
        &node,
        Some(TOKEN),
        Method::DELETE,
        "/api/v1/cluster/members/x",
        None,
    )
    .await;
    assert_400(status, &v, "id");
    let (status, v) = raw(
        &node,
        Some(TOKEN),
        Method::POST,
        "/api/v1/cluster/join",
        Some(json!({"node_id": 2})),
    )
    .await;
    assert_400(status, &v, "raft_addr");
    assert_eq!(a.cluster().await.unwrap().members.len(), 1);

    // -- metrics agree with the status.
    let (status, metrics) = kms_tests::http_get(node.admin_addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&metrics, "kms_current_count{app=\"Windows\"}"),
        Some(7.0)
    );
    assert_eq!(
        metric_value(&metrics, "kms_state_requests_total "),
        Some(11.0)
    );
    assert_eq!(metric_value(&metrics, "kms_raft_is_leader "), Some(1.0));
    assert_eq!(
        metric_value(&metrics, "kms_dns_publish_failures_total "),
        Some(0.0)
    );
    assert!(metrics.contains("kms_activation_duration_seconds_bucket"));
    assert!(metrics.contains("kms_build_info{"));
}

fn kmsctl(args: &[&str], url: &str, token: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(binary("kmsctl"));
    cmd.args(args)
        .env("KMSCTL_ADMIN_URL", url)
        .env_remove("KMSCTL_TOKEN");
    if let Some(t) = token {
        cmd.env("KMSCTL_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_admin_subcommands_output_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--admin-token", TOKEN]);
    assert_eq!(
        activate(&node, "windows", 2, 3, "ws-cli-alpha").await,
        (3, vec![])
    );
    assert_eq!(
        activate(&node, "office", 1, 2, "ws-cli-beta").await,
        (2, vec![])
    );
    let url = format!("http://{}", node.admin_addr);
    let ok = |args: &[&str]| {
        let (code, out, err) = kmsctl(args, &url, Some(TOKEN));
        assert_eq!(code, 0, "kmsctl {args:?}: {out}{err}");
        out
    };

    // status: slmgr-like text, and JSON with the contract's names.
    let out = ok(&["status"]);
    assert!(
        out.contains("Total requests received                             : 5"),
        "{out}"
    );
    assert!(
        out.contains("Requests with License Status Initial grace period   : 3"),
        "{out}"
    );
    assert!(
        out.contains("Requests with License Status Licensed               : 2"),
        "{out}"
    );
    assert!(out.contains("(leader, leader 1"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("Windows") && l.contains(" 3 ") && l.contains("25")),
        "{out}"
    );
    let v: Value = serde_json::from_str(&ok(&["status", "--json"])).unwrap();
    assert_eq!(v["total_requests"], 5);
    assert_eq!(v["current_count"]["Windows"], 3);

    // Exit codes: 4 without or with a wrong token, 3 when unreachable, 2 for usage.
    let (code, _, err) = kmsctl(&["status"], &url, None);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, _) = kmsctl(&["status", "--token", "not-the-right-token"], &url, None);
    assert_eq!(code, 4);
    let (code, _, err) = kmsctl(
        &["status"],
        &format!("http://127.0.0.1:{}", free_port()),
        Some(TOKEN),
    );
    assert_eq!(code, 3, "{err}");
    let (code, _, _) = kmsctl(&["status", "--url", "ftp://x"], &url, Some(TOKEN));
    assert_eq!(code, 2);

    // cluster list / remove.
    let out = ok(&["cluster", "list"]);
    assert!(out.contains("leader 1"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("1 ")
            && l.contains("leader")
            && l.contains(&node.admin_addr.to_string())),
        "{out}"
    );
    let v: Value = serde_json::from_str(&ok(&["cluster", "list", "--json"])).unwrap();
    assert_eq!(v["members"].as_array().unwrap().len(), 1);
    let (code, _, err) = kmsctl(&["cluster", "remove", "1"], &url, Some(TOKEN));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("409"), "{err}");
    let (code, _, err) = kmsctl(&["cluster", "remove", "42"], &url, Some(TOKEN));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("404"), "{err}");

    // clients: table, JSON, CSV, filters.
    let out = ok(&["clients"]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ws-cli-")).count(),
        5,
        "{out}"
    );
    assert!(out.contains("5 of 5 client(s)"), "{out}");
    let out = ok(&["clients", "--search", "beta"]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ws-cli-beta")).count(),
        2,
        "{out}"
    );
    assert!(!out.contains("ws-cli-alpha"), "{out}");
    let v: Value =
        serde_json::from_str(&ok(&["clients", "--json", "--application", "windows"])).unwrap();
    assert_eq!(v["total"], 3);
    let csv = ok(&["clients", "--csv", "--limit", "2"]);
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("cmid,workstation,"), "{csv}");
    let (code, _, err) = kmsctl(&["clients", "--since", "last tuesday"], &url, Some(TOKEN));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("since"), "{err}");

    // events.
    let out = ok(&["events", "--event-id", "12290"]);
    assert_eq!(
        out.lines().filter(|l| l.contains(" 12290 ")).count(),
        5,
        "{out}"
    );
    assert!(out.contains("ws-cli-beta"), "{out}");
    let v: Value = serde_json::from_str(&ok(&["events", "--json", "--limit", "2"])).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 2);

    // config get / set.
    let out = ok(&["config", "get"]);
    assert!(out.contains("activation_interval      = 120"), "{out}");
    // On by default, like a genuine host (4 hours).
    assert!(out.contains("max_clock_skew_minutes   = 240"), "{out}");
    let out = ok(&[
        "config",
        "set",
        "activation_interval=60",
        "max_clock_skew_minutes=300",
    ]);
    assert!(out.contains("configuration updated"), "{out}");
    assert!(out.contains("activation_interval      = 60"), "{out}");
    let v: Value = serde_json::from_str(&ok(&["config", "get", "--json"])).unwrap();
    assert_eq!(v["policy"]["activation_interval"], 60);
    assert_eq!(v["policy"]["max_clock_skew_minutes"], 300);
    let (code, _, err) = kmsctl(&["config", "set", "renewal_interval=1"], &url, Some(TOKEN));
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("policy.renewal_interval"), "{err}");
    let (code, _, err) = kmsctl(&["config", "set", "colour=blue"], &url, Some(TOKEN));
    assert_eq!(code, 2, "{err}");
    let v: Value = serde_json::from_str(&ok(&["config", "get", "--json"])).unwrap();
    assert_eq!(
        v["policy"]["renewal_interval"], 10080,
        "rejected set changed nothing"
    );

    // products.
    let out = ok(&["products", "--search", "office 2016"]);
    assert!(out.contains("Office 2016"), "{out}");
    assert!(out.contains("product policy: open"), "{out}");
    let v: Value = serde_json::from_str(&ok(&["products", "--json", "--not-activated"])).unwrap();
    assert_eq!(
        v["products"].as_array().unwrap().len(),
        0,
        "open policy activates everything"
    );

    // The help documents the exit codes.
    let (code, out, _) = kmsctl(&["--help"], &url, None);
    assert_eq!(code, 0);
    for line in [
        "4  the admin API refused the token",
        "5  the admin API answered another error",
        "3  the KMS host or the admin API could not be reached",
    ] {
        assert!(out.contains(line), "{out}");
    }
}

#[test]
fn kmsd_refuses_an_open_non_loopback_admin_listener_and_serves_a_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("kmsd"))
        .args(["--admin-listen", &format!("0.0.0.0:{}", free_port())])
        .args(["--kms-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .env_remove("KMSD_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token"), "{err}");
    assert!(!dir.path().join("d").exists(), "nothing started");

    let metrics_port = free_port();
    let node = Node::start(
        dir.path(),
        &[
            "--admin-token",
            TOKEN,
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let (status, body) = kms_tests::http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("kms_current_count{app=\"Windows\"} 0"),
        "{body}"
    );
    assert_eq!(kms_tests::http_get(addr, "/readyz").unwrap().0, 200);
    assert_eq!(kms_tests::http_get(addr, "/healthz").unwrap().0, 200);
    // The API is not on the metrics listener.
    assert_eq!(kms_tests::http_get(addr, "/api/v1/status").unwrap().0, 404);
    let s = node.get_json("/healthz");
    assert_eq!(s["status"], "ok");
}
