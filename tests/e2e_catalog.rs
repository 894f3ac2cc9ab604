//! The catalog through a real 3-node cluster: strict mode answers like a genuine host with
//! one host key per application (the README example, every host key group of the catalog,
//! one ePID per application), and a catalog import replicates to every node, refuses a bad
//! file whole and survives a restart of the whole cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use kms_catalog::CatalogData;
use kms_tests::{binary, now_ms, Node};
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{Product, RequestTemplate};
use serde_json::Value;
use uuid::{uuid, Uuid};

const WS2019: Uuid = uuid!("2e7a9ad1-a849-4b56-babe-17d5a29fe4b4");
const OFFICE2016: Uuid = uuid!("98ebfe73-2084-4c97-932c-c0cd1643bea7");
const K_S2022: Uuid = uuid!("b74263e4-0f92-46c6-bcf8-c11d5efe2959");

/// A request for one KMS id, like vlmcs sends it (its application, an edition, its N).
struct Req {
    t: RequestTemplate,
    ids: (Uuid, Uuid, Uuid),
}

/// A request for KMS id `kms` of `catalog` (first edition of it).
fn template(catalog: &CatalogData, kms: Uuid) -> Req {
    let item = catalog.kms_item(&kms).expect("KMS id");
    let sku = catalog
        .skus
        .iter()
        .find(|s| s.kms_item_id == kms && !s.is_preview);
    // The template wants catalog references; build the request from the compiled-in tables
    // when the edition is there, else patch the ids afterwards.
    let cat = kms_catalog::catalog();
    let any_sku = cat.skus().first().expect("a SKU");
    let any_item = cat.kms_item(&any_sku.kms_item_id).expect("its item");
    let mut t = RequestTemplate::new(Product {
        sku: any_sku,
        kms_item: any_item,
    });
    t.n_policy = item.n_count_policy;
    t.workstation = format!("e2e-{}", item.name.replace([' ', '/'], "-"));
    t.protocol_major = 6;
    Req {
        t,
        ids: (item.application_id, sku.map_or(Uuid::nil(), |s| s.id), kms),
    }
}

/// Sends one request to `node`: `Ok(epid)` when granted, `Err(hresult)` when refused.
async fn ask(node: &Node, r: &Req) -> Result<String, u32> {
    let mut request = r.t.build(Uuid::new_v4(), now_ms());
    (
        request.application_id,
        request.sku_id,
        request.kms_counted_id,
    ) = r.ids;
    let mut c = KmsClient::connect(
        &node.kms(),
        kms_wire::client::BindOptions::default(),
        Duration::from_secs(10),
    )
    .await
    .expect("connect and bind");
    match c
        .activate(&request, rand::random())
        .await
        .expect("verified answer")
    {
        Answer::Activated(r) => Ok(r.base.epid),
        Answer::Refused(hr) => Err(hr),
    }
}

fn put_json(node: &Node, path: &str, body: &str) -> (u16, Value) {
    // Writes go to the leader: a follower answers 307, followed here like kmsctl does.
    let (status, text) =
        kms_tests::http_request_to_leader(node.admin_addr, "PUT", path, Some(body)).unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits until every node applied `host_keys` (application -> key).
fn wait_host_keys(nodes: &[Node], keys: &BTreeMap<Uuid, Uuid>) {
    for n in nodes {
        wait_until("host keys replicated", Duration::from_secs(30), || {
            let v = n.get_json("/api/v1/config");
            keys.iter()
                .all(|(app, key)| v["policy"]["host_keys"][app.to_string()] == key.to_string())
        });
    }
}

fn three_nodes(dir: &std::path::Path, extra: &[&str]) -> Vec<Node> {
    for n in ["n1", "n2", "n3"] {
        std::fs::create_dir_all(dir.join(n)).unwrap();
    }
    let n1 = Node::start_member(&dir.join("n1"), 1, None, extra);
    let n2 = Node::start_member(&dir.join("n2"), 2, Some(&n1), extra);
    let n3 = Node::start_member(&dir.join("n3"), 3, Some(&n1), extra);
    vec![n1, n2, n3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_activates_what_each_host_key_covers_through_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    // The README example: strict, Windows Server 2019 and Office 2016 host keys.
    let ws2019 = WS2019.to_string();
    let o2016 = OFFICE2016.to_string();
    let nodes = three_nodes(
        dir.path(),
        &[
            "--product-policy",
            "strict",
            "--windows-host-key",
            &ws2019,
            "--office-host-key",
            &o2016,
        ],
    );
    let catalog = CatalogData::builtin();

    // Down-level clients of the two keys activate on every node, with one ePID per
    // application; newer products and retail editions are refused with 0xC004F042.
    let by_name = |name: &str| {
        catalog
            .skus
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} in catalog"))
            .kms_item_id
    };
    let granted = [
        "Windows 10/11 Enterprise",
        "Windows 7 Enterprise",
        "Windows 8.1 Enterprise",
        "Windows Server 2019 Datacenter",
        "Windows Server 2016 Datacenter",
        "Windows Server 2012 R2 Datacenter",
        "Windows 10/11 Enterprise LTSC 2019/2021/2024",
        "Office Professional Plus 2016",
        "Office Professional Plus 2013",
    ];
    let refused = [
        "Windows Server 2022 Datacenter",
        "Windows Server 2025 Datacenter",
        "Windows 10/11 Home",
        "Office LTSC Professional Plus 2024",
        "Office Professional Plus 2019",
    ];
    let mut epids: BTreeMap<Uuid, BTreeSet<String>> = BTreeMap::new();
    for (i, name) in granted.iter().enumerate() {
        let kms = by_name(name);
        let node = &nodes[i % 3];
        let epid = ask(node, &template(&catalog, kms))
            .await
            .unwrap_or_else(|hr| panic!("{name} refused 0x{hr:08X} on node {i}"));
        let app = catalog.kms_item(&kms).unwrap().application_id;
        epids.entry(app).or_default().insert(epid);
    }
    for (i, name) in refused.iter().enumerate() {
        let answer = ask(&nodes[i % 3], &template(&catalog, by_name(name))).await;
        assert_eq!(answer, Err(0xC004_F042), "{name}");
    }
    assert_eq!(epids.len(), 2);
    for (app, set) in &epids {
        assert_eq!(set.len(), 1, "one ePID for application {app}: {set:?}");
        // A Windows Server 2019 key is hosted on Server 2019 at the newest: every ePID
        // claims build 17763.
        let epid = set.iter().next().unwrap();
        assert!(epid.contains("-17763.0000-"), "{epid}");
    }

    // Every installable host key group of the catalog, installed at run time: what it must
    // activate is granted, the rest of its application refused.
    let mut client = 0usize;
    for key in catalog
        .host_keys
        .iter()
        .filter(|k| k.installable && k.can_make_epid())
    {
        let body =
            serde_json::json!({"policy": {"host_keys": {key.application_id.to_string(): key.id}}});
        let (status, v) = put_json(&nodes[client % 3], "/api/v1/config", &body.to_string());
        assert_eq!(status, 200, "{} {v}", key.name);
        wait_host_keys(&nodes, &[(key.application_id, key.id)].into());
        let mut seen = BTreeSet::new();
        for item in catalog
            .kms_items
            .iter()
            .filter(|i| i.application_id == key.application_id)
        {
            client += 1;
            let must = key.activates(&item.id) && !item.is_retail && !item.is_preview;
            match ask(&nodes[client % 3], &template(&catalog, item.id)).await {
                Ok(epid) => {
                    assert!(must, "{} granted {}", key.name, item.name);
                    seen.insert(epid);
                }
                Err(hr) => {
                    assert!(!must, "{} refused {}: 0x{hr:08X}", key.name, item.name);
                    assert_eq!(hr, 0xC004_F042, "{} {}", key.name, item.name);
                }
            }
        }
        assert_eq!(seen.len(), 1, "{}: one ePID, got {seen:?}", key.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_import_replicates_refuses_bad_files_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ws2019 = WS2019.to_string();
    let mut nodes = three_nodes(
        dir.path(),
        &["--product-policy", "strict", "--windows-host-key", &ws2019],
    );
    let catalog = CatalogData::builtin();
    let s2022 = template(&catalog, K_S2022);
    for n in &nodes {
        assert_eq!(ask(n, &s2022).await, Err(0xC004_F042));
        let status = n.get_json("/api/v1/status");
        assert_eq!(status["catalog"]["source"], "built-in", "{status}");
    }

    // An operator's catalog: the Server 2019 key also activates Server 2022 (a made-up
    // change that makes the import visible), imported with kmsctl through node 2.
    let mut exported: Value = nodes[0].get_json("/api/v1/catalog");
    let keys = exported["host_keys"].as_array_mut().unwrap();
    let key = keys
        .iter_mut()
        .find(|k| k["id"] == WS2019.to_string())
        .unwrap();
    key["activates"]
        .as_array_mut()
        .unwrap()
        .push(K_S2022.to_string().into());
    exported["version"] = "e2e.1".into();
    exported["source"] = "e2e-catalog.json".into();
    let good = dir.path().join("good.json");
    std::fs::write(&good, exported.to_string()).unwrap();
    let mut broken = exported.clone();
    broken["skus"][3]["kms_item_id"] = Uuid::from_u128(42).to_string().into();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, broken.to_string()).unwrap();

    let kmsctl = |args: &[&str], node: &Node| {
        let out = Command::new(binary("kmsctl"))
            .args(args)
            .env("KMSCTL_ADMIN_URL", format!("http://{}", node.admin_addr))
            .env_remove("KMSCTL_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = kmsctl(&["catalog", "import", bad.to_str().unwrap()], &nodes[1]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("skus[3].kms_item_id"), "{err}");
    for n in &nodes {
        assert_eq!(
            n.get_json("/api/v1/status")["catalog"]["source"],
            "built-in"
        );
    }
    let (code, out, err) = kmsctl(&["catalog", "import", good.to_str().unwrap()], &nodes[1]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("e2e.1"), "{out}");

    for n in &nodes {
        wait_until("catalog replicated", Duration::from_secs(30), || {
            n.get_json("/api/v1/status")["catalog"]["version"] == "e2e.1"
        });
        assert!(ask(n, &s2022).await.is_ok(), "Server 2022 after the import");
        let (_, metrics) = kms_tests::http_get(n.admin_addr, "/metrics").unwrap();
        assert!(
            metrics.contains("kms_catalog_info{version=\"e2e.1\",source=\"e2e-catalog.json\"} 1"),
            "{metrics}"
        );
    }

    // The whole cluster restarts: the imported catalog is kept (log and snapshot), not
    // replaced by the built-in one.
    for n in nodes.iter_mut() {
        n.terminate();
    }
    for n in nodes.iter_mut() {
        n.spawn_no_wait();
    }
    for n in nodes.iter_mut() {
        n.wait_ready(Duration::from_secs(120));
    }
    for n in &nodes {
        assert_eq!(n.get_json("/api/v1/status")["catalog"]["version"], "e2e.1");
        assert!(
            ask(n, &s2022).await.is_ok(),
            "Server 2022 after the restart"
        );
    }
}
