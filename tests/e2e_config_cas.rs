//! Atomic configuration changes with real `kmsd` processes: two concurrent
//! `PUT /api/v1/config` through two nodes on the same `expected_version`: one wins, the other
//! gets 409 Conflict, and no node ever shows half of a change.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kms_tests::{http_request_full, Node};
use serde_json::Value;

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

fn voters(node: &Node) -> usize {
    node.get_json("/api/v1/cluster")["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["role"] != "learner").count())
        .unwrap_or(0)
}

/// `PUT /api/v1/config` on `addr`, following a redirect to the leader (307).
fn put_config(addr: SocketAddr, body: &str) -> (u16, Value) {
    let mut addr = addr;
    for _ in 0..5 {
        let (status, text, location) =
            http_request_full(addr, "PUT", "/api/v1/config", Some(body)).expect("PUT");
        if status == 307 {
            let location = location.expect("a 307 names the leader");
            let host = location
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default();
            addr = host.parse().expect("leader address");
            continue;
        }
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        return (status, json);
    }
    panic!("too many redirects");
}

fn change(version: u64, interval: u32, hwid: &str) -> String {
    serde_json::json!({
        "expected_version": version,
        "policy": { "activation_interval": interval, "renewal_interval": interval + 1 },
        "identity": { "hwid": hwid },
    })
    .to_string()
}

/// The (activation interval, renewal interval, HWID) a node shows.
fn shown(node: &Node) -> (u64, u64, u64, String) {
    let c = node.get_json("/api/v1/config");
    (
        c["version"].as_u64().expect("config version"),
        c["policy"]["activation_interval"].as_u64().unwrap_or(0),
        c["policy"]["renewal_interval"].as_u64().unwrap_or(0),
        c["identity"]["hwid"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase(),
    )
}

#[test]
fn concurrent_config_changes_one_wins_the_other_gets_409() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let n1 = Node::start_member(dirs[0].path(), 1, None, &[]);
    let n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), &[]);
    let n3 = Node::start_member(dirs[2].path(), 3, Some(&n1), &[]);
    let nodes = [n1, n2, n3];
    wait_until("3 voters", Duration::from_secs(30), || {
        nodes.iter().all(|n| voters(n) == 3)
    });
    let (version, ..) = shown(&nodes[0]);

    for round in 0..3u64 {
        let v = version + round;
        let a = change(v, 60 + round as u32 * 10, "0102030405060708");
        let b = change(v, 600 + round as u32 * 10, "a1a2a3a4a5a6a7a8");
        // Through two different nodes at once (at least one of them a follower).
        let (addr_a, addr_b) = (nodes[1].admin_addr, nodes[2].admin_addr);
        let ta = std::thread::spawn(move || put_config(addr_a, &a));
        let tb = std::thread::spawn(move || put_config(addr_b, &b));
        let ra = ta.join().expect("thread a");
        let rb = tb.join().expect("thread b");
        let (winner, loser) = match (ra.0, rb.0) {
            (200, 409) => (ra, rb),
            (409, 200) => (rb, ra),
            other => panic!("expected one 200 and one 409, got {other:?}: {ra:?} {rb:?}"),
        };
        assert_eq!(winner.1["version"].as_u64(), Some(v + 1), "{winner:?}");
        assert_eq!(loser.1["error"], "conflict", "{loser:?}");
        let message = loser.1["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("version"),
            "409 names the problem: {message}"
        );

        // Every node ends with the winner's whole change.
        let interval = winner.1["policy"]["activation_interval"]
            .as_u64()
            .expect("interval");
        let hwid = if interval < 600 {
            "0102030405060708"
        } else {
            "a1a2a3a4a5a6a7a8"
        };
        wait_until(
            "every node applied the change",
            Duration::from_secs(10),
            || nodes.iter().all(|n| shown(n).0 == v + 1),
        );
        for n in &nodes {
            assert_eq!(
                shown(n),
                (v + 1, interval, interval + 1, hwid.to_owned()),
                "half-applied or diverged on {}",
                n.admin_addr
            );
        }
    }

    // A stale version alone is refused too, and an absent one applies on the current version.
    let (status, body) = put_config(
        nodes[0].admin_addr,
        &change(version, 120, "0102030405060708"),
    );
    assert_eq!(status, 409, "{body}");
    let (status, body) = put_config(
        nodes[0].admin_addr,
        r#"{"policy":{"activation_interval":121}}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"].as_u64(), Some(version + 4));

    // kmsctl: `config get` shows the version, `config set --expected-version` is checked.
    let kmsctl = |args: &[&str]| {
        let out = std::process::Command::new(kms_tests::binary("kmsctl"))
            .args(args)
            .env(
                "KMSCTL_ADMIN_URL",
                format!("http://{}", nodes[2].admin_addr),
            )
            .env_remove("KMSCTL_TOKEN")
            .output()
            .expect("run kmsctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let current = version + 4;
    let (code, out, err) = kmsctl(&["config", "get"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("configuration version {current}")),
        "{out}"
    );
    let stale = (current - 1).to_string();
    let (code, _, err) = kmsctl(&[
        "config",
        "set",
        "--expected-version",
        &stale,
        "activation_interval=200",
    ]);
    assert_ne!(code, 0, "a stale version is refused");
    assert!(err.contains("version"), "{err}");
    let fresh = current.to_string();
    let (code, out, err) = kmsctl(&[
        "config",
        "set",
        "--expected-version",
        &fresh,
        "activation_interval=200",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("activation_interval      = 200"), "{out}");
    for n in &nodes {
        wait_until(
            "the kmsctl change everywhere",
            Duration::from_secs(10),
            || shown(n).0 == current + 1 && shown(n).1 == 200,
        );
    }
}
