//! The data dir of release 0.1 (tests/fixtures/datadir-v0.1, file engine, made by its
//! make.sh) is read by the current build: `kmsd inspect` sees the same log, snapshot and
//! clients; a node started on it keeps its identity (cluster id, HWID, every ePID), its
//! counts and its registry, and keeps counting from there.
//!
//! The fixture's clients were seen on the day it was made and CMIDs expire after 30 days,
//! so the node runs under libfaketime at the fixture's time (tests/fixtures/install.sh
//! installs it); only the wall clock is faked, the monotonic clock is real.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kms_tests::{binary, free_port, http_get, now_ms};
use kms_wire::client::BindOptions;
use kmsctl::client::{Answer, KmsClient};
use kmsctl::products::{resolve, RequestTemplate};
use serde_json::Value;
use uuid::Uuid;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/datadir-v0.1")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// libfaketime's preload library; a clear failure when it is not installed.
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libfaketime not found (tried {candidates:?}): run tests/fixtures/install.sh")
        })
}

/// The kmsd under test, stopped by pid when dropped.
struct Kmsd(Child);

impl Drop for Kmsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cmid(n: u64) -> Uuid {
    format!("6b6d7300-0000-4000-8000-{n:012}").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_0_1_data_dir_is_read_by_the_current_build() {
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fixture_dir().join("expected.json")).expect("fixture expected.json"),
    )
    .unwrap();
    let (want_inspect, want_status) = (&expected["inspect"], &expected["status"]);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_dir(&fixture_dir().join("data"), &data);

    // Offline: the same log, snapshot and clients.
    let out = Command::new(binary("kmsd"))
        .arg("--data-dir")
        .arg(&data)
        .arg("inspect")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kmsd inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "cluster_id",
        "voters",
        "last_log_index",
        "last_log_term",
        "snapshot_index",
        "committed_index",
        "registered_clients",
        "queued_activations",
    ] {
        assert_eq!(inspect[key], want_inspect[key], "inspect {key}: {inspect}");
    }
    assert_eq!(inspect["registered_clients"], 39);

    // Online, at the fixture's time plus a few seconds (as after a short stop).
    let fixture_ms = want_status["time_ms"].as_u64().expect("status.time_ms");
    let started = Instant::now();
    let fake_now = move || fixture_ms + 5_000 + started.elapsed().as_millis() as u64;
    let behind_s = now_ms().saturating_sub(fake_now()) / 1000;
    let kms_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let raft_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log_path = tmp.path().join("kmsd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(binary("kmsd"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--kms-listen", &kms_addr.to_string()])
        .args(["--admin-listen", &admin_addr.to_string()])
        .args(["--raft-listen", &raft_addr.to_string()])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", format!("-{behind_s}"))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_NO_CACHE", "1")
        .env("KMSD_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn kmsd");
    let mut node = Kmsd(child);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok((200, _)) = http_get(admin_addr, "/readyz") {
            break;
        }
        if let Ok(Some(status)) = node.0.try_wait() {
            panic!(
                "kmsd exited with {status}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "kmsd on the fixture not ready after 90 s: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (code, body) = http_get(admin_addr, "/api/v1/status").unwrap();
    assert_eq!(code, 200, "{body}");
    let status: Value = serde_json::from_str(&body).unwrap();
    let time_ms = status["time_ms"].as_u64().unwrap();
    assert!(
        time_ms.abs_diff(fake_now()) < 60_000,
        "the node runs at the fixture's time: {time_ms} vs {}",
        fake_now()
    );
    for key in [
        "cluster_id",
        "hwid",
        "current_count",
        "registered_clients",
        "granted_requests",
        "total_requests",
        "activation_interval",
        "renewal_interval",
        "product_policy",
    ] {
        assert_eq!(status[key], want_status[key], "status {key}");
    }
    assert_eq!(status["current_count"]["Windows"], 33);
    // Every ePID of 0.1 is kept, except those of the host keys whose KMS group the
    // Microsoft-traceable catalog corrected (issue 12: Windows Server 2025 and its Azure key
    // had their groups 4918/4919 swapped, Office LTSC 2024 used an older range): a genuine
    // host's ePID names its key's group, so those are issued anew.
    const RENEWED: [&str; 3] = [
        "84e331f6-4279-48c4-ab10-b75139181351",
        "82fcf64d-f9dd-4411-9c79-f2eed16d4eb8",
        "f3d89bbf-c0ec-47ce-a8fa-e5a5f97e447f",
    ];
    let epid_of = |v: &Value, id: &str| -> Option<String> {
        v["epids"].as_array()?.iter().find_map(|e| {
            (e["csvlk_id"] == id).then(|| e["epid"].as_str().unwrap_or_default().to_owned())
        })
    };
    let mut kept = 0;
    for e in want_status["epids"].as_array().unwrap() {
        let id = e["csvlk_id"].as_str().unwrap();
        if RENEWED.contains(&id) {
            continue;
        }
        assert_eq!(
            epid_of(&status, id),
            epid_of(want_status, id),
            "ePID of {id}"
        );
        kept += 1;
    }
    assert!(kept >= 30, "only {kept} ePIDs compared");

    // Known clients are still counted once; a new one adds one; the ePID and HWID the host
    // answers with are the fixture's.
    // Clients are answered with the ePID of their application's installed host key (one per
    // application), as the status lists it.
    let want_epids: Vec<String> = status["epids"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["licensed"] == true)
        .filter_map(|e| e["epid"].as_str().map(str::to_owned))
        .collect();
    let want_hwid = want_status["hwid"].as_str().unwrap().to_owned();
    let windows = RequestTemplate::new(resolve("windows").unwrap());
    let office = RequestTemplate::new(resolve("office").unwrap());
    for (template, id, count) in [
        (&windows, cmid(1), 33),
        (&windows, cmid(30), 33),
        (&office, cmid(101), 6),
        (&windows, Uuid::new_v4(), 34),
    ] {
        let mut client = KmsClient::connect(
            &kms_addr.to_string(),
            BindOptions::default(),
            Duration::from_secs(20),
        )
        .await
        .expect("connect");
        match client
            .activate(&template.build(id, fake_now()), rand::random())
            .await
            .expect("verified answer")
        {
            Answer::Activated(r) => {
                assert_eq!(r.base.current_count, count, "client {id}");
                assert!(
                    want_epids.contains(&r.base.epid),
                    "ePID {} is not an installed host key's",
                    r.base.epid
                );
                let hwid: String = r
                    .hwid
                    .expect("v6 answer carries the HWID")
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect();
                assert_eq!(hwid, want_hwid);
            }
            Answer::Refused(hr) => panic!("client {id} refused 0x{hr:08X}"),
        }
    }
    let (_, body) = http_get(admin_addr, "/api/v1/status").unwrap();
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["registered_clients"], 40);
    assert_eq!(status["cluster_id"], want_status["cluster_id"]);

    // A clean stop.
    let pid = node.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kmsd did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
