//! Durability: an acknowledged activation survives `kill -9`; the host identity never changes.

use std::time::Duration;

use kms_tests::{http_get, metric_value, now_ms, Node};
use kms_wire::client::BindOptions;
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn activate(node: &Node, t: &RequestTemplate, cmid: Uuid) -> kms_tests::Seen {
    kms_tests::activate_with(node, t, cmid).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_identity_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    survive_kill_9(dir.path(), &[]).await;
    let log = std::fs::read_to_string(dir.path().join("kmsd.log")).unwrap();
    assert!(!log.contains("deprecated"), "{log}");
}

/// The same guarantees with the sled engine; a dir written by one engine is refused by the
/// other with a message naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_engine_survives_kill_9_and_engines_are_not_mixed() {
    let dir = tempfile::tempdir().unwrap();
    survive_kill_9(dir.path(), &["--storage-engine", "sled"]).await;
    // Deprecated: every start says so (docs/storage.md).
    let log = std::fs::read_to_string(dir.path().join("kmsd.log")).unwrap();
    let starts = log.matches("kmsd ready").count();
    assert!(starts >= 2, "{log}");
    assert_eq!(
        log.matches("the sled storage engine is deprecated").count(),
        starts,
        "one warning per start: {log}"
    );
    let inspect = |engine: Option<&str>| {
        let mut cmd = std::process::Command::new(kms_tests::binary("kmsd"));
        cmd.arg("--data-dir").arg(dir.path().join("data"));
        if let Some(engine) = engine {
            cmd.args(["--storage-engine", engine]);
        }
        cmd.arg("inspect").output().unwrap()
    };
    let out = inspect(None);
    assert!(!out.status.success(), "file engine opened a sled dir");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--storage-engine sled"), "{err}");
    let out = inspect(Some("sled"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspection: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspection["registered_clients"], 38, "{inspection}");
}

async fn survive_kill_9(dir: &std::path::Path, extra: &[&str]) {
    let mut node = Node::start(dir, extra);
    let windows = RequestTemplate::new(resolve("windows").unwrap());
    let office = RequestTemplate::new(resolve("office").unwrap());

    // Charge the node: 30 Windows clients and 7 Office clients, concurrently (group commit).
    let windows_cmids: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    let office_cmids: Vec<Uuid> = (0..7).map(|_| Uuid::new_v4()).collect();
    let mut tasks = Vec::new();
    for (t, cmid) in windows_cmids
        .iter()
        .map(|c| (windows.clone(), *c))
        .chain(office_cmids.iter().map(|c| (office.clone(), *c)))
    {
        let addr = node.kms();
        tasks.push(tokio::spawn(async move {
            let mut c = KmsClient::connect(&addr, BindOptions::default(), TIMEOUT)
                .await
                .unwrap();
            matches!(
                c.activate(&t.build(cmid, now_ms()), rand::random())
                    .await
                    .unwrap(),
                Answer::Activated(_)
            )
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "every charge request was acknowledged");
    }
    let before_w = activate(&node, &windows, windows_cmids[0]).await;
    let before_o = activate(&node, &office, office_cmids[0]).await;
    assert_eq!(before_w.count, 30);
    assert_eq!(before_o.count, 7);
    let (_, metrics) = http_get(node.admin_addr, "/metrics").unwrap();
    assert_eq!(
        metric_value(&metrics, "kms_registered_clients"),
        Some(37.0),
        "{metrics}"
    );

    // kill -9: nothing gets a chance to flush.
    node.kill9();
    node.spawn();

    // Known CMIDs are still cached (count unchanged), a new one adds exactly one.
    for cmid in &windows_cmids {
        let seen = activate(&node, &windows, *cmid).await;
        assert_eq!(seen.count, 30, "Windows client {cmid} lost");
        assert_eq!(
            seen.epid, before_w.epid,
            "Windows ePID changed across restart"
        );
        assert_eq!(seen.hwid, before_w.hwid, "HWID changed across restart");
    }
    for cmid in &office_cmids {
        let seen = activate(&node, &office, *cmid).await;
        assert_eq!(seen.count, 7, "Office client {cmid} lost");
        assert_eq!(
            seen.epid, before_o.epid,
            "Office ePID changed across restart"
        );
    }
    assert_eq!(activate(&node, &windows, Uuid::new_v4()).await.count, 31);
    let (_, metrics) = http_get(node.admin_addr, "/metrics").unwrap();
    assert_eq!(
        metric_value(&metrics, "kms_registered_clients"),
        Some(38.0),
        "{metrics}"
    );

    // A graceful stop and restart keeps everything too.
    assert_eq!(
        node.terminate(),
        Some(0),
        "clean exit on SIGTERM; log:\n{}",
        node.log()
    );
    node.spawn();
    assert_eq!(activate(&node, &windows, windows_cmids[1]).await.count, 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_log_compaction_keep_the_state() {
    let dir = tempfile::tempdir().unwrap();
    // Snapshot after every 5 log entries so a short run crosses several snapshots.
    let mut node = Node::start(dir.path(), &["--snapshot-every", "5"]);
    let windows = RequestTemplate::new(resolve("windows").unwrap());
    let cmids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    for (i, cmid) in cmids.iter().enumerate() {
        assert_eq!(activate(&node, &windows, *cmid).await.count, i as u32 + 1);
    }
    assert!(
        node.log().contains("snapshot written"),
        "no snapshot taken:\n{}",
        node.log()
    );
    node.kill9();
    node.spawn();
    for cmid in &cmids {
        assert_eq!(activate(&node, &windows, *cmid).await.count, 40);
    }
}
