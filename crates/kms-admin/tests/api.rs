//! The admin router against an in-memory backend whose state is a real `kms_core::State`
//! changed only by real commands.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kms_admin::*;
use kms_core::{ActivationRequest, Command, CommandResult, HostIdentity, State};
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

const TOKEN: &str = "test-token-0123";
const T0: u64 = 1_700_000_000_000;
/// Windows 10/11 Enterprise (N = 25) and Office Professional Plus 2016 (N = 5).
const WIN_SKU: &str = "73111121-5638-40f6-bc11-f1d7b0d64300";
const OFFICE_SKU: &str = "d450596f-894d-49e0-966a-fd39ed4c4c64";

struct Fake {
    state: Arc<tokio::sync::RwLock<State>>,
    now: AtomicU64,
    events: Arc<EventLog>,
    proposals: Mutex<Vec<Command>>,
    /// Emulates a node that lost its quorum.
    no_leader: Mutex<bool>,
}

#[async_trait::async_trait]
impl AdminBackend for Fake {
    fn state(&self) -> Arc<tokio::sync::RwLock<State>> {
        self.state.clone()
    }
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
    fn node(&self) -> NodeStatus {
        NodeStatus {
            node_id: 1,
            role: Role::Leader,
            leader_id: Some(1),
            term: 3,
            kms_listen: vec![SocketAddr::from(([127, 0, 0, 1], 1688))],
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8688)),
            raft_listen: SocketAddr::from(([127, 0, 0, 1], 7688)),
            last_applied: 42,
            quorum: true,
            queued_activations: 0,
            version: "test".into(),
        }
    }
    fn readiness(&self, scope: Readiness) -> Result<(), String> {
        let no_leader = *self.no_leader.lock().unwrap();
        match (scope, no_leader) {
            (Readiness::Member, true) => Err("no known leader".into()),
            _ => Ok(()),
        }
    }
    async fn cluster(&self) -> Result<ClusterStatus, BackendError> {
        Ok(ClusterStatus {
            cluster_id: None,
            leader_id: Some(1),
            term: 3,
            members: vec![member(1, "leader", None), member(2, "follower", Some(7))],
        })
    }
    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, BackendError> {
        if request.node_id == 1 {
            return Err(BackendError::Conflict("node 1 is already a member".into()));
        }
        Ok(JoinResponse {
            cluster_id: Uuid::from_u128(9),
            leader_id: 1,
            members: vec![
                member(1, "leader", None),
                member(request.node_id, "learner", None),
            ],
        })
    }
    async fn remove_member(&self, node_id: u64) -> Result<(), BackendError> {
        match node_id {
            1 => Err(BackendError::Conflict(
                "cannot remove the leader itself".into(),
            )),
            2 => Ok(()),
            n => Err(BackendError::NotFound(format!("member {n}"))),
        }
    }
    async fn revoke_join_token(&self, id: &str) -> Result<(), BackendError> {
        match id {
            "2" => Ok(()),
            // A follower: the leader's admin API is elsewhere.
            "3" => Err(BackendError::NotLeader {
                leader_admin: "10.9.9.9:8688".into(),
            }),
            other => Err(BackendError::NotFound(format!("join token {other}"))),
        }
    }
    async fn propose(&self, command: Command) -> Result<CommandResult, BackendError> {
        self.proposals.lock().unwrap().push(command.clone());
        Ok(self.state.write().await.apply(&command))
    }
    fn events(&self) -> Arc<EventLog> {
        self.events.clone()
    }
    fn dns(&self) -> DnsStatus {
        DnsStatus {
            enabled: true,
            domains: vec![DnsDomainStatus {
                zone: "corp.example".into(),
                server: "127.0.0.1:53".into(),
                priority: 0,
                weight: 100,
                ttl: 300,
                records_published: 1,
                last_success_ms: Some(T0),
                last_error: None,
            }],
        }
    }
    fn render_metrics(&self) -> String {
        "# TYPE kms_build_info gauge\nkms_build_info{version=\"test\"} 1\n".into()
    }
}

fn member(id: u64, role: &str, lag: Option<u64>) -> MemberStatus {
    MemberStatus {
        id,
        role: role.into(),
        raft_addr: format!("127.0.0.1:{}", 7000 + id),
        admin_addr: format!("127.0.0.1:{}", 8000 + id),
        last_log_index: Some(10),
        last_applied: Some(10),
        lag,
    }
}

fn request(sku: &str, cmid: Uuid, status: u32, workstation: &str) -> ActivationRequest {
    let cat = kms_catalog::catalog();
    let sku = cat.sku(&Uuid::parse_str(sku).unwrap()).unwrap();
    let item = cat.kms_item(&sku.kms_item_id).unwrap();
    ActivationRequest {
        application_id: item.application_id,
        sku_id: sku.id,
        kms_counted_id: item.id,
        client_machine_id: cmid,
        previous_client_machine_id: Uuid::nil(),
        required_client_count: item.n_count_policy,
        license_status: status,
        binding_expiration: 43_200,
        is_client_vm: false,
        // The client's clock agrees with the host's (the clock check is on by default).
        request_time: (T0 + 11_644_473_600_000) * 10_000,
        workstation_name: workstation.into(),
        protocol_major: 6,
        protocol_minor: 0,
        client_address: Some(SocketAddr::from(([10, 1, 2, 3], 50_000))),
    }
}

/// A backend with an identity and some activations: 3 Windows (status 2, 2, 1), 2 Office
/// (status 0) and one refused (protocol 7.0, status 5).
fn fake() -> Arc<Fake> {
    let mut state = State::default();
    state.apply(&Command::InitIdentity(HostIdentity::generate(T0, [1; 32])));
    state.apply(&Command::InitCatalog(kms_core::CatalogUpdate {
        catalog: kms_catalog::CatalogData::builtin(),
        epids: Default::default(),
    }));
    let mut requests = vec![
        request(WIN_SKU, Uuid::from_u128(1), 2, "ws-alpha"),
        request(WIN_SKU, Uuid::from_u128(2), 2, "ws-beta"),
        request(WIN_SKU, Uuid::from_u128(3), 1, "=evil,name"),
        request(OFFICE_SKU, Uuid::from_u128(4), 0, "office-one"),
        request(OFFICE_SKU, Uuid::from_u128(5), 0, "office-two"),
    ];
    let mut bad = request(WIN_SKU, Uuid::from_u128(6), 5, "ws-bad");
    bad.protocol_major = 7;
    requests.push(bad);
    state.apply(&Command::Activate { now: T0, requests });
    Arc::new(Fake {
        state: Arc::new(tokio::sync::RwLock::new(state)),
        now: AtomicU64::new(T0 + 1000),
        events: Arc::new(EventLog::new(100)),
        proposals: Mutex::new(Vec::new()),
        no_leader: Mutex::new(false),
    })
}

fn app(backend: Arc<Fake>) -> axum::Router {
    router(
        backend,
        &AdminOptions {
            token: Some(TOKEN.into()),
            ..Default::default()
        },
    )
}

async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, String) {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        builder = builder.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    let req = builder
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn get_json(app: &axum::Router, path: &str) -> Value {
    let (status, body) = call(app, Method::GET, path, Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn assert_400(status: StatusCode, body: &str, field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "invalid_input", "{body}");
    assert_eq!(v["field"], field, "{body}");
    assert!(!v["message"].as_str().unwrap_or("").is_empty(), "{body}");
}

/// Every (method, path) of the document, with `{id}` filled in.
fn documented_operations() -> Vec<(Method, String)> {
    let doc = serde_json::to_value(openapi()).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            ops.push((m, path.replace("{id}", "2")));
        }
    }
    ops.sort_by_key(|(m, p)| (p.clone(), m.to_string()));
    ops
}

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let ops = documented_operations();
    let names: Vec<String> = ops.iter().map(|(m, p)| format!("{m} {p}")).collect();
    // The issue's endpoints, exactly: nothing undocumented, nothing documented but missing.
    assert_eq!(
        names,
        [
            "GET /api/v1/catalog",
            "PUT /api/v1/catalog",
            "GET /api/v1/clients",
            "GET /api/v1/cluster",
            "POST /api/v1/cluster/certificate",
            "POST /api/v1/cluster/join",
            "DELETE /api/v1/cluster/members/2",
            "GET /api/v1/cluster/tokens",
            "POST /api/v1/cluster/tokens",
            "DELETE /api/v1/cluster/tokens/2",
            "GET /api/v1/config",
            "PUT /api/v1/config",
            "GET /api/v1/events",
            "GET /api/v1/openapi.json",
            "GET /api/v1/products",
            "GET /api/v1/status",
        ]
    );
    let backend = fake();
    let app = app(backend);
    for (method, path) in &ops {
        let body = (*method == Method::POST || *method == Method::PUT).then_some("{}");
        let (status, text) = call(&app, method.clone(), path, Some(TOKEN), body).await;
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} documented but not routed: {status} {text}"
        );
    }
    // Methods the document does not list are not routed.
    for (method, path) in [
        (Method::POST, "/api/v1/status"),
        (Method::DELETE, "/api/v1/config"),
        (Method::GET, "/api/v1/cluster/join"),
        (Method::GET, "/api/v1/nothing"),
    ] {
        let (status, _) = call(&app, method.clone(), path, Some(TOKEN), None).await;
        assert!(
            status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is routed but not documented: {status}"
        );
    }
    // The served document is the generated one.
    let served = get_json(&app, "/api/v1/openapi.json").await;
    assert_eq!(served, serde_json::to_value(openapi()).unwrap());
    assert!(served["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn writes_on_a_follower_redirect_to_the_leader_with_the_same_path() {
    let app = app(fake());
    let (status, body) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/tokens/3?x=1",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::TEMPORARY_REDIRECT, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "not_leader");
    assert_eq!(v["leader_admin"], "10.9.9.9:8688");
    let req = Request::builder()
        .method(Method::DELETE)
        .uri("/api/v1/cluster/tokens/3?x=1")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    assert_eq!(
        response.headers()["location"],
        "http://10.9.9.9:8688/api/v1/cluster/tokens/3?x=1"
    );
    // Token requests are checked before anything is proposed.
    for (body, field) in [
        (r#"{"ttl_secs": 99999999999}"#, "ttl_secs"),
        (r#"{"uses": 0}"#, "uses"),
        (r#"{"uses": 1, "extra": 1}"#, "body"),
    ] {
        let (status, text) = call(
            &app,
            Method::POST,
            "/api/v1/cluster/tokens",
            Some(TOKEN),
            Some(body),
        )
        .await;
        if field == "body" {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        } else {
            assert_400(status, &text, field);
        }
    }
    let (status, text) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/tokens/not-an-id",
        Some(TOKEN),
        None,
    )
    .await;
    assert_400(status, &text, "id");
}

#[tokio::test]
async fn every_api_call_needs_the_token_and_health_stays_open() {
    let backend = fake();
    let app = app(backend.clone());
    for (method, path) in documented_operations() {
        let body = (method == Method::POST || method == Method::PUT).then_some("{}");
        for token in [
            None,
            Some("wrong"),
            Some("test-token-012"),
            Some("test-token-01234"),
        ] {
            let (status, text) = call(&app, method.clone(), &path, token, body).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}: {text}"
            );
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"], "unauthorized");
        }
    }
    assert!(
        backend.proposals.lock().unwrap().is_empty(),
        "a rejected call changed something"
    );
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/dashboard.js",
        "/dashboard.css",
    ] {
        let (status, _) = call(&app, Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // Without a configured token the API is open.
    let open = router(backend, &AdminOptions::default());
    let (status, _) = call(&open, Method::GET, "/api/v1/status", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn status_reports_counts_requests_and_identity() {
    let backend = fake();
    let app = app(backend.clone());
    let s = get_json(&app, "/api/v1/status").await;
    assert_eq!(s["node_id"], 1);
    assert_eq!(s["role"], "leader");
    assert_eq!(s["leader_id"], 1);
    assert_eq!(s["current_count"]["Windows"], 3);
    let office = kms_catalog::catalog()
        .application(&kms_catalog::well_known::OFFICE_2013)
        .unwrap()
        .name;
    assert_eq!(s["current_count"][office], 2);
    assert_eq!(s["current_count"]["Office 14 (2010)"], 0);
    assert_eq!(s["total_requests"], 6);
    assert_eq!(s["failed_requests"], 1);
    assert_eq!(s["granted_requests"], 5);
    let ls = &s["requests_by_license_status"];
    assert_eq!(ls["initial_grace"], 2);
    assert_eq!(ls["licensed"], 1);
    assert_eq!(ls["unlicensed"], 2);
    assert_eq!(ls["notification"], 1);
    assert_eq!(s["refusals"]["0x8007000D"], 1);
    assert_eq!(s["activation_interval"], 120);
    assert_eq!(s["renewal_interval"], 10080);
    let state = backend.state.read().await;
    let identity = state.identity().unwrap();
    assert_eq!(s["hwid"], identity.hwid_hex());
    assert_eq!(s["epids"].as_array().unwrap().len(), identity.epids.len());
    let windows = s["applications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "Windows")
        .unwrap();
    assert_eq!(windows["threshold"], 25);
    assert_eq!(windows["threshold_met"], false);
    assert_eq!(windows["requests"], 4);
    assert_eq!(s["dns"]["enabled"], true);
    assert_eq!(s["dns"]["domains"][0]["weight"], 100);
    assert_eq!(s["listen"]["kms"][0], "127.0.0.1:1688");
    assert_eq!(s["registered_clients"], 5);
}

#[tokio::test]
async fn clients_filter_page_search_and_csv() {
    let app = app(fake());
    let all = get_json(&app, "/api/v1/clients").await;
    assert_eq!(all["total"], 5);
    let office = get_json(&app, "/api/v1/clients?application=office2013").await;
    assert_eq!(office["total"], 2);
    assert!(office["clients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["workstation"].as_str().unwrap().starts_with("office")));
    let by_sku = get_json(&app, &format!("/api/v1/clients?product={WIN_SKU}")).await;
    assert_eq!(by_sku["total"], 3);
    let kms_id = kms_catalog::catalog()
        .sku(&Uuid::parse_str(WIN_SKU).unwrap())
        .unwrap()
        .kms_item_id;
    let by_kms = get_json(&app, &format!("/api/v1/clients?product={kms_id}")).await;
    assert_eq!(by_kms["total"], 3);
    let page = get_json(&app, "/api/v1/clients?limit=2&offset=4").await;
    assert_eq!(page["total"], 5);
    assert_eq!(page["clients"].as_array().unwrap().len(), 1);
    let found = get_json(&app, "/api/v1/clients?search=BETA").await;
    assert_eq!(found["total"], 1);
    assert_eq!(found["clients"][0]["workstation"], "ws-beta");
    assert_eq!(found["clients"][0]["license_status"], "initial_grace");
    assert_eq!(found["clients"][0]["activated"], false);
    let since_future = get_json(&app, "/api/v1/clients?since=2030-01-01T00:00:00Z").await;
    assert_eq!(since_future["total"], 0);
    let since_past = get_json(&app, &format!("/api/v1/clients?since={}", T0 - 1)).await;
    assert_eq!(since_past["total"], 5);

    let (status, csv) = call(
        &app,
        Method::GET,
        "/api/v1/clients?format=csv",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "{csv}");
    assert!(lines[0].starts_with("cmid,workstation,address"));
    assert!(
        csv.contains("\"'=evil,name\""),
        "formula defused and quoted: {csv}"
    );

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=-1", "offset"),
        ("since=yesterday", "since"),
        ("application=linux", "application"),
        ("product=no-such-product-xyz", "product"),
        ("format=xml", "format"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = call(
            &app,
            Method::GET,
            &format!("/api/v1/clients?{query}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_400(status, &body, field);
    }
}

#[tokio::test]
async fn events_filter_and_limit() {
    let backend = fake();
    for i in 0..5u64 {
        backend
            .events
            .push(T0 + i, 12290, "info", "activation", json!({"i": i}));
    }
    backend
        .events
        .push(T0 + 9, 12293, "error", "dns failed", json!({}));
    let app = app(backend);
    let all = get_json(&app, "/api/v1/events").await;
    assert_eq!(all["events"].as_array().unwrap().len(), 6);
    assert_eq!(all["events"][0]["event_id"], 12293, "newest first");
    let acts = get_json(&app, "/api/v1/events?event_id=12290&limit=2").await;
    let acts = acts["events"].as_array().unwrap();
    assert_eq!(acts.len(), 2);
    assert_eq!(acts[0]["fields"]["i"], 4);
    let after = get_json(&app, "/api/v1/events?after=4").await;
    assert_eq!(after["events"].as_array().unwrap().len(), 2);
    for (query, field) in [
        ("limit=5000", "limit"),
        ("event_id=x", "event_id"),
        ("after=-3", "after"),
        ("kind=1", "kind"),
    ] {
        let (status, body) = call(
            &app,
            Method::GET,
            &format!("/api/v1/events?{query}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_400(status, &body, field);
    }
}

#[tokio::test]
async fn config_put_changes_policy_and_identity_and_rejects_bad_input_without_changes() {
    let backend = fake();
    let app = app(backend.clone());
    let before = get_json(&app, "/api/v1/config").await;
    assert_eq!(before["policy"]["activation_interval"], 120);
    let snapshot_before = backend.state.read().await.to_snapshot();

    let csvlk = kms_catalog::well_known::CSVLK_WINDOWS_SERVER_2019;
    let bad_bodies: Vec<(String, &str)> = vec![
        ("{not json".into(), "body"),
        (r#"{"polcy": {}}"#.into(), "polcy"),
        (
            r#"{"policy": {"activation_interval": 60, "bogus": 1}}"#.into(),
            "policy.bogus",
        ),
        (
            r#"{"policy": {"activation_interval": "soon"}}"#.into(),
            "policy.activation_interval",
        ),
        (
            r#"{"policy": {"activation_interval": 5}}"#.into(),
            "policy.activation_interval",
        ),
        (
            r#"{"policy": {"renewal_interval": 99999}}"#.into(),
            "policy.renewal_interval",
        ),
        (
            r#"{"policy": {"registry_retention_days": 1}}"#.into(),
            "policy.registry_retention_days",
        ),
        (
            r#"{"policy": {"max_clock_skew_minutes": 0}}"#.into(),
            "policy.max_clock_skew_minutes",
        ),
        (
            r#"{"policy": {"product_policy": "maybe"}}"#.into(),
            "policy.product_policy",
        ),
        (
            format!(
                r#"{{"policy": {{"licensed_csvlks": ["{}"]}}}}"#,
                Uuid::from_u128(7)
            ),
            "policy.licensed_csvlks",
        ),
        // A host key of another application (the Office 2016 key for Windows).
        (
            r#"{"policy": {"host_keys": {"windows": "98ebfe73-2084-4c97-932c-c0cd1643bea7"}}}"#
                .into(),
            "policy.host_keys.windows",
        ),
        (
            r#"{"policy": {"host_keys": {"linux": "98ebfe73-2084-4c97-932c-c0cd1643bea7"}}}"#
                .into(),
            "policy.host_keys.linux",
        ),
        (
            r#"{"policy": {"client_networks": ["10.0.0.0/99"]}}"#.into(),
            "policy.client_networks[0]",
        ),
        // A valid policy part does not go through when the identity part is invalid.
        (
            r#"{"policy": {"activation_interval": 60}, "identity": {"hwid": "12"}}"#.into(),
            "identity.hwid",
        ),
        (
            format!(r#"{{"identity": {{"epids": {{"{csvlk}": "1-2-3"}}}}}}"#),
            "identity.epids.2e7a9ad1-a849-4b56-babe-17d5a29fe4b4",
        ),
        (
            format!(
                r#"{{"identity": {{"epids": {{"{}": "03612-00206-566-381813-03-1033-17763.0000-2552023"}}}}}}"#,
                Uuid::from_u128(1)
            ),
            "identity.epids.00000000-0000-0000-0000-000000000001",
        ),
        (
            r#"{"identity": {"cluster_id": "x"}}"#.into(),
            "identity.cluster_id",
        ),
    ];
    for (body, field) in &bad_bodies {
        let (status, text) =
            call(&app, Method::PUT, "/api/v1/config", Some(TOKEN), Some(body)).await;
        assert_400(status, &text, field);
    }
    assert!(backend.proposals.lock().unwrap().is_empty());
    assert_eq!(
        backend.state.read().await.to_snapshot(),
        snapshot_before,
        "nothing changed"
    );
    assert_eq!(get_json(&app, "/api/v1/config").await, before);

    let epid = "03612-00206-566-381813-03-1033-17763.0000-2552023";
    let body = format!(
        r#"{{"policy": {{"activation_interval": 60, "max_clock_skew_minutes": 240, "product_policy": "strict", "licensed_csvlks": ["{csvlk}"]}},
            "identity": {{"hwid": "0123456789ABCDEF", "epids": {{"{csvlk}": "{epid}"}}}}}}"#
    );
    let (status, text) = call(
        &app,
        Method::PUT,
        "/api/v1/config",
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let after: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(after["policy"]["activation_interval"], 60);
    assert_eq!(
        after["policy"]["renewal_interval"], 10080,
        "absent fields stay"
    );
    assert_eq!(after["policy"]["max_clock_skew_minutes"], 240);
    assert_eq!(after["policy"]["product_policy"], "strict");
    assert_eq!(after["identity"]["hwid"], "0123456789ABCDEF");
    assert_eq!(after["identity"]["epids"][csvlk.to_string()], epid);
    assert_eq!(after, get_json(&app, "/api/v1/config").await);
    let state = backend.state.read().await;
    assert_eq!(state.policy().activation_interval, 60);
    assert_eq!(
        state.identity().unwrap().hwid,
        [1, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    );
    // The legacy list became the Windows host key.
    assert_eq!(
        state
            .catalog()
            .configured_host_keys()
            .get(&kms_catalog::well_known::WINDOWS),
        Some(&csvlk)
    );
    assert_eq!(
        after["policy"]["host_keys"][kms_catalog::well_known::WINDOWS.to_string()],
        csvlk.to_string()
    );
    drop(state);
    // One command for host keys, policy and identity together (all or nothing, in `apply`).
    assert_eq!(backend.proposals.lock().unwrap().len(), 1);
    assert_eq!(after["version"], 1);
    let config_events = backend.events.query(&EventQuery {
        event_id: Some(1002),
        ..Default::default()
    });
    assert_eq!(config_events.len(), 1);

    // null turns the clock-skew check off; an identical PUT changes nothing (same version).
    let (status, text) = call(
        &app,
        Method::PUT,
        "/api/v1/config",
        Some(TOKEN),
        Some(r#"{"policy": {"max_clock_skew_minutes": null}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        backend.state.read().await.policy().max_clock_skew_minutes,
        None
    );
    let version = backend.state.read().await.config_version();
    let (status, _) = call(
        &app,
        Method::PUT,
        "/api/v1/config",
        Some(TOKEN),
        Some(r#"{"policy": {"activation_interval": 60}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(backend.state.read().await.config_version(), version);
    // A stale expected version: 409, nothing changed.
    let (status, text) = call(
        &app,
        Method::PUT,
        "/api/v1/config",
        Some(TOKEN),
        Some(r#"{"expected_version": 1, "policy": {"activation_interval": 90}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{text}");
    assert!(text.contains("expected 1"), "{text}");
    assert_eq!(backend.state.read().await.policy().activation_interval, 60);
}

#[tokio::test]
async fn products_show_what_the_policy_activates() {
    let backend = fake();
    let app = app(backend.clone());
    let open = get_json(&app, "/api/v1/products").await;
    let products = open["products"].as_array().unwrap();
    assert_eq!(
        products.len(),
        kms_catalog::CatalogData::builtin().kms_items.len()
    );
    assert!(
        products.iter().all(|p| p["activated"] == true),
        "open policy activates all"
    );
    // Strict with the Office 2010 CSVLK only: exactly the KMS ids it lists are activated.
    let csvlk = kms_catalog::catalog()
        .csvlk(&kms_catalog::well_known::CSVLK_OFFICE_2010)
        .unwrap();
    let body = format!(
        r#"{{"policy": {{"product_policy": "strict", "licensed_csvlks": ["{}"]}}}}"#,
        csvlk.id
    );
    let (status, text) = call(
        &app,
        Method::PUT,
        "/api/v1/config",
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let strict = get_json(&app, "/api/v1/products?activated=true").await;
    let ids: Vec<String> = strict["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kms_id"].as_str().unwrap().to_owned())
        .collect();
    // The legacy list names only the Office 2010 key: Office 2010 gets it, the other
    // applications get no key, so exactly what that key activates is activated (as before).
    let mut got = ids.clone();
    got.sort();
    let expected: Vec<String> = csvlk.activates.iter().map(|k| k.to_string()).collect();
    assert_eq!(got, expected);
    let licensed: Vec<&Value> = strict["csvlks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["licensed"] == true)
        .collect();
    assert_eq!(licensed.len(), 1);
    // Host keys per application: the newest Windows and Office keys, Office 2010's kept.
    let data = kms_catalog::CatalogData::builtin();
    let (ws2025, o2024) = (
        data.default_host_key(&kms_catalog::well_known::WINDOWS)
            .unwrap(),
        data.default_host_key(&kms_catalog::well_known::OFFICE_2013)
            .unwrap(),
    );
    let body = format!(
        r#"{{"policy": {{"host_keys": {{"windows": "{}", "office": "{}", "office2010": "{}"}}}}}}"#,
        ws2025.id, o2024.id, csvlk.id
    );
    let (status, text) = call(
        &app,
        Method::PUT,
        "/api/v1/config",
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let strict = get_json(&app, "/api/v1/products?activated=true").await;
    let mut got: Vec<String> = strict["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kms_id"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let mut expected: Vec<String> = [ws2025, o2024, data.host_key(&csvlk.id).unwrap()]
        .iter()
        .flat_map(|k| k.activates.iter())
        .filter(|k| {
            data.kms_item(k)
                .is_some_and(|i| !i.is_retail && !i.is_preview)
        })
        .map(|k| k.to_string())
        .collect();
    expected.sort();
    assert_eq!(got, expected);
    let search = get_json(&app, "/api/v1/products?search=professional%20plus%202016").await;
    assert!(search["products"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["skus"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["sku_id"] == OFFICE_SKU)));
    let (status, body) = call(
        &app,
        Method::GET,
        "/api/v1/products?activated=maybe",
        Some(TOKEN),
        None,
    )
    .await;
    assert_400(status, &body, "activated");
}

#[tokio::test]
async fn cluster_endpoints_map_backend_errors() {
    let backend = fake();
    let app = app(backend.clone());
    let c = get_json(&app, "/api/v1/cluster").await;
    assert_eq!(c["leader_id"], 1);
    assert_eq!(c["members"].as_array().unwrap().len(), 2);
    let (status, _) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/members/2",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/members/1",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/members/9",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/members/abc",
        Some(TOKEN),
        None,
    )
    .await;
    assert_400(status, &body, "id");
    let (status, body) = call(
        &app,
        Method::DELETE,
        "/api/v1/cluster/members/0",
        Some(TOKEN),
        None,
    )
    .await;
    assert_400(status, &body, "id");

    let ok = r#"{"node_id": 3, "raft_addr": "127.0.0.1:7003", "admin_addr": "127.0.0.1:8003"}"#;
    let (status, body) = call(
        &app,
        Method::POST,
        "/api/v1/cluster/join",
        Some(TOKEN),
        Some(ok),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["members"][1]["id"], 3);
    let dup = r#"{"node_id": 1, "raft_addr": "a", "admin_addr": "b"}"#;
    let (status, _) = call(
        &app,
        Method::POST,
        "/api/v1/cluster/join",
        Some(TOKEN),
        Some(dup),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    for (body, field) in [
        (
            r#"{"node_id": 0, "raft_addr": "a", "admin_addr": "b"}"#,
            "node_id",
        ),
        (
            r#"{"node_id": 3, "raft_addr": "", "admin_addr": "b"}"#,
            "raft_addr",
        ),
        (r#"{"node_id": 3, "raft_addr": "a"}"#, "admin_addr"),
        (
            r#"{"node_id": 3, "raft_addr": "a", "admin_addr": "b", "x": 1}"#,
            "x",
        ),
        (
            r#"{"node_id": -1, "raft_addr": "a", "admin_addr": "b"}"#,
            "node_id",
        ),
    ] {
        let (status, text) = call(
            &app,
            Method::POST,
            "/api/v1/cluster/join",
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_400(status, &text, field);
    }
    let membership = backend.events.query(&EventQuery {
        event_id: Some(1001),
        ..Default::default()
    });
    assert_eq!(membership.len(), 2, "one removal and one join recorded");
}

#[tokio::test]
async fn metrics_render_state_and_raft_gauges() {
    let app = app(fake());
    let (status, text) = call(&app, Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "kms_build_info{version=\"test\"} 1",
        "kms_current_count{app=\"Windows\"} 3",
        "kms_count_threshold{app=\"Windows\"} 25",
        "kms_count_threshold_met{app=\"Windows\"} 0",
        "kms_registered_clients 5",
        "kms_state_requests_total 6",
        "kms_state_failed_requests_total 1",
        "kms_state_requests_by_license_status_total{license_status=\"initial_grace\"} 2",
        "kms_raft_is_leader 1",
        "kms_raft_leader_known 1",
        "kms_raft_term 3",
        "kms_raft_quorum_ok 1",
        "kms_raft_applied_index 42",
        "kms_raft_replication_lag{follower=\"2\"} 7",
        "kms_identity_initialised 1",
        "kms_ready 1",
        "kms_dns_publish_enabled 1",
        "kms_dns_last_success_timestamp_seconds{zone=\"corp.example\"} 1700000000",
        "kms_last_activation_timestamp_seconds 1700000000",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Each family is declared once.
    let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
    let n = types.len();
    types.sort();
    types.dedup();
    assert_eq!(types.len(), n);
}

#[tokio::test]
async fn dashboard_is_served_with_a_strict_policy() {
    let app = app(fake());
    let response = app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&body);
    assert!(html.contains("/dashboard.js") && html.contains("id=\"counts\""));
    let (_, js) = call(&app, Method::GET, "/dashboard.js", None, None).await;
    assert!(
        !js.contains("innerHTML"),
        "client text must never be parsed as HTML"
    );
}

#[tokio::test]
async fn readyz_scopes_member_and_kms() {
    let backend = fake();
    let app = app(backend.clone());
    for path in ["/readyz", "/readyz?for=member", "/readyz?for=kms"] {
        let (status, body) = call(&app, Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // Without a leader the node is no ready member, but it still answers KMS clients.
    *backend.no_leader.lock().unwrap() = true;
    for path in ["/readyz", "/readyz?for=member"] {
        let (status, body) = call(&app, Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["reason"], "no known leader");
    }
    let (status, _) = call(&app, Method::GET, "/readyz?for=kms", None, None).await;
    assert_eq!(status, StatusCode::OK);
    // A wrong scope or an unknown parameter is a 400 naming it.
    for (path, field) in [("/readyz?for=dns", "for"), ("/readyz?fro=kms", "fro")] {
        let (status, body) = call(&app, Method::GET, path, None, None).await;
        assert_400(status, &body, field);
    }
}

#[tokio::test]
async fn catalog_get_put_validates_whole_and_replicates() {
    let backend = fake();
    let app = app(backend.clone());
    let mut catalog = get_json(&app, "/api/v1/catalog").await;
    assert_eq!(catalog["source"], "built-in");
    let status = get_json(&app, "/api/v1/status").await;
    assert_eq!(status["catalog"]["source"], "built-in");
    assert_eq!(status["catalog"]["installed"].as_array().unwrap().len(), 3);
    let snapshot_before = backend.state.read().await.to_snapshot();

    // Bad files are refused whole, naming the problem; nothing changes.
    let mut dangling = catalog.clone();
    dangling["host_keys"][0]["activates"] = serde_json::json!([Uuid::from_u128(9)]);
    let mut bad_gvlk = catalog.clone();
    bad_gvlk["skus"][0]["gvlk"] = "NOT-A-KEY".into();
    let mut unknown_field = catalog.clone();
    unknown_field["kms_items"][0]["colour"] = "red".into();
    for (body, field) in [
        (dangling.to_string(), "host_keys[0].activates[0]"),
        (bad_gvlk.to_string(), "skus[0].gvlk"),
        (unknown_field.to_string(), "kms_items[0].colour"),
        ("{\"version\": 1}".to_owned(), "version"),
        ("[".to_owned(), "body"),
    ] {
        let (status, text) = call(
            &app,
            Method::PUT,
            "/api/v1/catalog",
            Some(TOKEN),
            Some(&body),
        )
        .await;
        assert_400(status, &text, field);
    }
    assert_eq!(backend.state.read().await.to_snapshot(), snapshot_before);

    // A good one (larger than the 64 KiB other bodies may have) replaces it everywhere.
    catalog["version"] = "2027.1".into();
    catalog["source"] = "corp-catalog.json".into();
    let body = catalog.to_string();
    assert!(body.len() > 64 * 1024);
    let (status, text) = call(
        &app,
        Method::PUT,
        "/api/v1/catalog",
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let summary: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(summary["version"], "2027.1");
    let state = backend.state.read().await;
    let replicated = state.catalog().catalog().unwrap();
    assert_eq!(replicated.source, "corp-catalog.json");
    drop(state);
    let (_, metrics) = call(&app, Method::GET, "/metrics", None, None).await;
    assert!(
        metrics.contains("kms_catalog_info{version=\"2027.1\",source=\"corp-catalog.json\"} 1"),
        "{metrics}"
    );
}
