//! Attacks on the node-to-node transport, replayed against a real 3-node cluster of `kmsd`
//! processes (built-in cluster PKI, the default) on loopback. Each attack must be refused with
//! the replicated state unchanged (counts, registry, identity, membership, term) and every
//! node alive:
//! * plain TCP, no client certificate, a certificate of another CA;
//! * a valid certificate of the cluster whose node is not a member (enrolled, never joined),
//!   and a removed member's certificate;
//! * a member's certificate used under another node's id;
//! * Forward of anything but activations (old encodings, unknown versions);
//! * Vote with a huge term, AppendEntries from a non-member "leader";
//! * snapshot chunks out of order and far beyond the cap (a member's certificate);
//! * a reused, expired or revoked join token.

use std::path::Path;
use std::time::{Duration, Instant};

use kms_raft::grpc::Enrollment;
use kms_raft::network::{encode, Transport};
use kms_raft::pki::{self, JoinTokenString, NodeCredentials};
use kms_raft::proto::raft_client::RaftClient;
use kms_raft::proto::{ForwardRequest, RaftPayload};
use kms_raft::tls::{fetch_pinned_ca, Tls};
use kms_raft::TypeConfig;
use kms_tests::{binary, Node};
use kmsctl::products::{resolve, RequestTemplate};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{SnapshotMeta, Vote};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

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

fn creds(node: &Node) -> NodeCredentials {
    NodeCredentials::load(&node.data_dir.join("pki"))
        .expect("readable credentials")
        .expect("credentials exist")
}

/// What must not change: counts, registry size, identity, membership, term, per node.
fn fingerprint(nodes: &[&Node]) -> Vec<Value> {
    nodes
        .iter()
        .map(|n| {
            let status = n.get_json("/api/v1/status");
            let cluster = n.get_json("/api/v1/cluster");
            let clients = n.get_json("/api/v1/clients?limit=1");
            serde_json::json!({
                "counts": status["current_count"],
                "hwid": status["hwid"],
                "epids": n.get_json("/api/v1/config")["identity"],
                "term": status["term"],
                "leader": status["leader_id"],
                "members": cluster["members"].as_array().map(|m| m.iter().map(|x| x["id"].clone()).collect::<Vec<_>>()),
                "clients": clients["total"],
            })
        })
        .collect()
}

/// A TLS channel to `node`'s Raft port trusting the cluster CA, presenting `identity`.
async fn channel(node: &Node, ca_der: &[u8], identity: Option<&NodeCredentials>) -> Channel {
    let tls = match identity {
        Some(c) => {
            Tls::from_pem(
                c.chain_pem().as_bytes(),
                c.key_pem().as_bytes(),
                c.ca_pem().as_bytes(),
                pki::SERVER_NAME,
                false,
            )
            .client
        }
        None => Tls::enrollment_client(ca_der),
    };
    Endpoint::from_shared(format!("https://{}", node.raft_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .connect_lazy()
}

/// How a call fails when the connection itself is refused (no TLS, a foreign certificate).
const TRANSPORT_REFUSED: &[tonic::Code] = &[
    tonic::Code::Unavailable,
    tonic::Code::Unknown,
    tonic::Code::Internal,
    tonic::Code::Cancelled,
];

fn vote(term: u64, from: u64) -> Vec<u8> {
    encode(&VoteRequest::<u64> {
        vote: Vote::new(term, from),
        last_log_id: None,
    })
    .unwrap()
}

fn append(term: u64, from: u64) -> Vec<u8> {
    encode(&AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, from),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    })
    .unwrap()
}

fn snapshot_chunk(term: u64, from: u64, offset: u64) -> Vec<u8> {
    encode(&InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(term, from),
        meta: SnapshotMeta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: "attack".into(),
        },
        offset,
        data: vec![0; 1024],
        done: false,
    })
    .unwrap()
}

/// Every Raft call an attacker can make with `channel`, claiming to be node `claimed`; all
/// must fail with one of `codes`.
async fn all_refused(channel: Channel, claimed: u64, codes: &[tonic::Code], what: &str) {
    let mut client = RaftClient::new(channel);
    let results = [
        (
            "vote",
            client
                .vote(RaftPayload {
                    payload: vote(1 << 40, claimed),
                })
                .await
                .map(|_| ()),
        ),
        (
            "append",
            client
                .append_entries(RaftPayload {
                    payload: append(1 << 40, claimed),
                })
                .await
                .map(|_| ()),
        ),
        (
            "snapshot",
            client
                .install_snapshot(RaftPayload {
                    payload: snapshot_chunk(1 << 40, claimed, 1 << 62),
                })
                .await
                .map(|_| ()),
        ),
        (
            "forward",
            client
                .forward(ForwardRequest {
                    call: encode(&kms_raft::forward::ForwardCall::Activate(vec![])).unwrap(),
                    version: kms_raft::forward::FORWARD_VERSION,
                })
                .await
                .map(|_| ()),
        ),
    ];
    for (call, result) in results {
        match result {
            Ok(()) => panic!("{what}: {call} was accepted"),
            Err(status) => assert!(
                codes.contains(&status.code()),
                "{what}: {call} answered {status:?}, expected one of {codes:?}"
            ),
        }
    }
}

async fn activate(node: &Node) -> u32 {
    let t = RequestTemplate::new(resolve("windows").unwrap());
    kms_tests::activate_with(node, &t, Uuid::new_v4())
        .await
        .count
}

async fn enroll(node: &Node, token: &str, node_id: u64) -> Result<NodeCredentials, String> {
    let token = JoinTokenString::parse(token).map_err(|e| e.to_string())?;
    let ca = fetch_pinned_ca(
        &node.raft_addr.to_string(),
        &token.ca_fingerprint,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| e.to_string())?;
    let request = pki::new_key_and_csr(node_id).unwrap();
    let transport = Transport {
        tls: None,
        cluster_id: Default::default(),
        connect_timeout: Duration::from_secs(3),
        channels: Default::default(),
    };
    let enrolled = transport
        .enroll(
            &node.raft_addr.to_string(),
            &ca,
            Enrollment {
                token_id: token.id,
                token_secret: token.secret,
                node_id,
                csr_der: request.csr_der,
            },
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(NodeCredentials {
        ca_der: enrolled.ca_der,
        cert_der: enrolled.cert_der,
        key_der: request.key_der,
    })
}

fn kmsctl(admin: &std::net::SocketAddr, args: &[&str]) -> (bool, String, String) {
    let url = format!("http://{admin}");
    let out = std::process::Command::new(binary("kmsctl"))
        .arg("cluster")
        .args(args)
        .args(["--url", url.as_str()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rss_kib(node: &Node) -> u64 {
    let pid = node.pid().expect("running");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_port_refuses_every_attack_and_the_state_stays_as_it_was() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // The cluster forms with join tokens only: no certificate is made by hand.
    let n1 = Node::start_member(dirs[0].path(), 1, None, &[]);
    let n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), &[]);
    let n3 = Node::start_member(dirs[2].path(), 3, Some(&n2), &[]);
    wait_until("3 voters", Duration::from_secs(30), || {
        [&n1, &n2, &n3].iter().all(|n| voters(n) == 3)
    });
    assert!(n1.log().contains("created the cluster CA"));
    for n in [&n2, &n3] {
        assert!(n.log().contains("enrolled"), "{}", n.log());
    }
    // Activations flow through every node.
    for n in [&n1, &n2, &n3] {
        for _ in 0..3 {
            activate(n).await;
        }
    }
    let nodes = [&n1, &n2, &n3];
    let ca_der = creds(&n1).ca_der;
    // Let replication settle so the fingerprints compare equal applied states.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fingerprint(&nodes);
    assert_eq!(before[0]["counts"], before[2]["counts"]);

    // 1. Plain TCP (no TLS at all): no gRPC call gets through.
    let plain = Endpoint::from_shared(format!("http://{}", n1.raft_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .connect_lazy();
    all_refused(plain, 1, TRANSPORT_REFUSED, "plain TCP").await;
    // 2. TLS without a client certificate: only enrollment is open.
    all_refused(
        channel(&n1, &ca_der, None).await,
        1,
        &[tonic::Code::PermissionDenied],
        "no client certificate",
    )
    .await;
    // 3. A certificate of another CA (same names, same node id): the handshake fails.
    let rogue_ca = pki::new_ca("rogue").unwrap();
    let rogue = NodeCredentials::self_issued(&rogue_ca, 2).unwrap();
    let rogue_channel = {
        let tls = Tls::from_pem(
            rogue.chain_pem().as_bytes(),
            rogue.key_pem().as_bytes(),
            creds(&n1).ca_pem().as_bytes(),
            pki::SERVER_NAME,
            false,
        );
        Endpoint::from_shared(format!("https://{}", n1.raft_addr))
            .unwrap()
            .tls_config(tls.client)
            .unwrap()
            .connect_lazy()
    };
    all_refused(
        rogue_channel,
        2,
        TRANSPORT_REFUSED,
        "certificate of another CA",
    )
    .await;
    // 4. A valid certificate of this cluster whose node never joined (enrolled as node 9):
    //    not a member, so no Raft message and no forwarded activation is accepted.
    let token = n1.create_join_token(1);
    let outsider = enroll(&n1, &token, 9)
        .await
        .expect("enrollment with a fresh token");
    all_refused(
        channel(&n1, &ca_der, Some(&outsider)).await,
        9,
        &[tonic::Code::PermissionDenied],
        "enrolled non-member",
    )
    .await;
    // ... nor under a member's id (impersonation of node 1 and node 2).
    for claimed in [1, 2] {
        all_refused(
            channel(&n2, &ca_der, Some(&outsider)).await,
            claimed,
            &[tonic::Code::PermissionDenied],
            "non-member claiming a member's id",
        )
        .await;
    }
    // 5. The token was single use; a wrong secret and a revoked or expired token fail too.
    let reused = enroll(&n1, &token, 10).await;
    assert!(reused.is_err(), "a used token enrolled again");
    let wrong_secret = {
        let mut t = JoinTokenString::parse(&n1.create_join_token(1)).unwrap();
        t.secret = "00112233445566778899aabbccddeeff".into();
        t.to_string()
    };
    assert!(enroll(&n1, &wrong_secret, 11).await.is_err());
    let revoked = n1.create_join_token(5);
    let revoked_id = JoinTokenString::parse(&revoked).unwrap().id;
    let (ok, _, err) = kmsctl(&n1.admin_addr, &["token", "revoke", &revoked_id]);
    assert!(ok, "revoke: {err}");
    assert!(
        enroll(&n1, &revoked, 12).await.is_err(),
        "a revoked token enrolled"
    );
    let (status, body) = kms_tests::http_request(
        n1.admin_addr,
        "POST",
        "/api/v1/cluster/tokens",
        Some(r#"{"ttl_secs":1,"uses":3}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let expiring: Value = serde_json::from_str(&body).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = enroll(&n1, expiring["token"].as_str().unwrap(), 13).await;
    assert!(
        expired.as_ref().is_err_and(|e| e.contains("expired")),
        "{expired:?}"
    );
    // A token that names another cluster's CA: the joiner stops before sending anything.
    let foreign = JoinTokenString::generate(pki::fingerprint(&rogue_ca.cert_der)).to_string();
    let refused = enroll(&n1, &foreign, 14).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("nothing was sent")),
        "{refused:?}"
    );
    // The token list shows what is left (no secrets).
    let (ok, out, err) = kmsctl(&n1.admin_addr, &["token", "list"]);
    assert!(ok, "{err}");
    assert!(!out.contains(&revoked_id), "revoked token listed: {out}");

    // 6. A member's own certificate (a compromised member): Forward carries nothing but
    //    activations, and snapshot chunks out of order or past the cap are dropped.
    let member = creds(&n2);
    let rss_before = rss_kib(&n1);
    let mut client = RaftClient::new(channel(&n1, &ca_der, Some(&member)).await);
    for call in [
        // The pre-versioned encoding (version 0) and unknown versions.
        ForwardRequest {
            call: vec![1, 0],
            version: 0,
        },
        ForwardRequest {
            call: vec![0],
            version: 99,
        },
        // Old `Command`, `Join` and `Remove` variants (indexes 1 to 3) under the current version.
        ForwardRequest {
            call: vec![2, 4, 1, 2, 3, 4],
            version: kms_raft::forward::FORWARD_VERSION,
        },
        ForwardRequest {
            call: vec![3, 4],
            version: kms_raft::forward::FORWARD_VERSION,
        },
    ] {
        let err = client
            .forward(call)
            .await
            .expect_err("a non-activation call was accepted");
        assert!(
            matches!(
                err.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ),
            "{err:?}"
        );
    }
    let term = before[0]["term"].as_u64().unwrap();
    for offset in [1u64 << 62, 256 * 1024 * 1024, 1024] {
        let err = client
            .install_snapshot(RaftPayload {
                payload: snapshot_chunk(term + 1000, 2, offset),
            })
            .await
            .expect_err("a snapshot chunk without its beginning was accepted");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    // A huge vote from a member that is not a candidate of this cluster's choosing is for
    // Raft to judge; what matters is that the non-member's (above) changed nothing.
    assert!(
        rss_kib(&n1) < rss_before + 64 * 1024,
        "snapshot chunks held memory"
    );

    // Every node is alive, and the state is what it was.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = fingerprint(&nodes);
    assert_eq!(before, after, "an attack changed the state");
    for n in [&n1, &n2, &n3] {
        activate(n).await;
    }
    drop(client);

    // 7. A removed node's certificate stops working at once.
    let n3_creds = creds(&n3);
    let leader = n1.get_json("/api/v1/cluster")["leader_id"]
        .as_u64()
        .unwrap();
    let leader_node = nodes[(leader - 1) as usize];
    let (ok, _, err) = kmsctl(&n1.admin_addr, &["remove", "3"]);
    assert!(ok, "remove: {err}");
    wait_until("2 members", Duration::from_secs(20), || {
        leader_node.get_json("/api/v1/cluster")["members"]
            .as_array()
            .map(Vec::len)
            == Some(2)
    });
    all_refused(
        channel(leader_node, &ca_der, Some(&n3_creds)).await,
        3,
        &[tonic::Code::PermissionDenied],
        "removed node",
    )
    .await;
    drop(n3);
    // The two remaining nodes keep committing.
    activate(&n1).await;
    activate(&n2).await;
    let _ = Path::new("");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_secret_forms_a_cluster_and_a_wrong_one_is_refused() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let secret = dirs[0].path().join("cluster.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-deploy\n").unwrap();
    let path = secret.to_str().unwrap();
    let args = ["--cluster-secret-file", path];
    // Every node gets the same file; no token is made by hand.
    let n1 = Node::start_member(dirs[0].path(), 1, None, &args);
    let n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), &args);
    let n3 = Node::start_member(dirs[2].path(), 3, Some(&n2), &args);
    wait_until("3 voters", Duration::from_secs(30), || {
        [&n1, &n2, &n3].iter().all(|n| voters(n) == 3)
    });
    assert!(activate(&n3).await >= 1);
    // A node with another secret learns nothing: the members cannot prove the secret it
    // holds, so it stops before sending it, and never becomes a member.
    let wrong = dirs[3].path().join("wrong.secret");
    std::fs::write(&wrong, "ffffffffffffffffffffffffffffffff-other").unwrap();
    let mut n4 = Node::new(
        dirs[3].path(),
        &[
            "--node-id",
            "4",
            "--join",
            &n1.raft_addr.to_string(),
            "--cluster-secret-file",
            wrong.to_str().unwrap(),
        ],
    );
    n4.spawn_no_wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while n4.is_running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!n4.is_running(), "a node with a wrong secret kept trying");
    assert!(
        n4.log()
            .contains("could not prove it knows the cluster secret"),
        "{}",
        n4.log()
    );
    assert_eq!(voters(&n1), 3);
    // A short secret is a configuration error naming the key.
    let short = dirs[3].path().join("short.secret");
    std::fs::write(&short, "too-short").unwrap();
    let out = std::process::Command::new(binary("kmsd"))
        .args([
            "check-config",
            "--cluster-secret-file",
            short.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("raft.cluster_secret_file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_replaces_the_old_one_after_the_next_rotation() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let n1 = Node::start_member(dirs[0].path(), 1, None, &[]);
    let mut n2 = Node::start_member(dirs[1].path(), 2, Some(&n1), &[]);
    let n3 = Node::start_member(dirs[2].path(), 3, Some(&n1), &[]);
    wait_until("3 voters", Duration::from_secs(30), || {
        [&n1, &n2, &n3].iter().all(|n| voters(n) == 3)
    });
    let ca_der = creds(&n1).ca_der;
    let first = creds(&n2);
    // Node 2 asks the leader for a new certificate; it is stored and presented from the
    // next start, and the current one keeps working meanwhile.
    let (ok, out, err) = kmsctl(&n2.admin_addr, &["rotate-cert"]);
    assert!(ok, "rotate: {err}");
    assert!(out.contains("restart the node"), "{out}");
    let second = creds(&n2);
    assert_ne!(first.cert_der, second.cert_der);
    assert_eq!(first.ca_der, second.ca_der);
    n2.terminate();
    n2.spawn();
    wait_until("node 2 back as a voter", Duration::from_secs(30), || {
        voters(&n1) == 3
            && n2.get_json("/api/v1/status")["leader_id"]
                .as_u64()
                .is_some()
    });
    activate(&n2).await;
    // A second rotation drops the first certificate: it is refused from then on, while the
    // node keeps working with the second.
    let (ok, _, err) = kmsctl(&n2.admin_addr, &["rotate-cert"]);
    assert!(ok, "rotate again: {err}");
    let leader = n1.get_json("/api/v1/cluster")["leader_id"]
        .as_u64()
        .unwrap();
    let leader_node = [&n1, &n2, &n3][(leader - 1) as usize];
    all_refused(
        channel(leader_node, &ca_der, Some(&first)).await,
        2,
        &[tonic::Code::PermissionDenied],
        "rotated-out certificate",
    )
    .await;
    activate(&n2).await;
    assert_eq!(voters(&n1), 3);
}
