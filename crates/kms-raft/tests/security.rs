//! Transport security: mutual TLS between nodes (a peer whose certificate another CA signed is
//! refused) and the cluster id check (a peer of another cluster is refused).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_raft::network::TlsFiles;
use kms_raft::proto::raft_client::RaftClient;
use kms_raft::proto::RaftPayload;
use kms_raft::tls::Security;
use kms_raft::{Cluster, ClusterConfig, KmsNode};
use kms_store::MemoryStorage;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

use kms_testkit::free_port;

/// A CA and `nodes` node certificates (SAN "kmsd"), written as PEM files under `dir`.
fn pki(dir: &Path, name: &str, nodes: usize) -> Vec<TlsFiles> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    (0..nodes)
        .map(|i| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["kmsd".to_owned()]).unwrap();
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &issuer).unwrap();
            let cert_path: PathBuf = dir.join(format!("{name}-{i}.pem"));
            let key_path: PathBuf = dir.join(format!("{name}-{i}.key"));
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            TlsFiles {
                cert: cert_path,
                key: key_path,
                ca: ca_path.clone(),
                server_name: "kmsd".into(),
            }
        })
        .collect()
}

async fn start(id: u64, bootstrap: bool, tls: Option<TlsFiles>) -> Cluster {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = ClusterConfig::new(
        id,
        addr.parse().unwrap(),
        KmsNode {
            raft_addr: addr,
            ..Default::default()
        },
    );
    config.bootstrap = bootstrap;
    config.security = tls.map(Security::Operator).unwrap_or(Security::Insecure);
    Cluster::start(config, Arc::new(MemoryStorage::default()))
        .await
        .unwrap()
}

fn voters(c: &Cluster) -> usize {
    c.members().iter().filter(|m| m.voter).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_admits_nodes_of_the_same_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "good", 2);
    let rogue = pki(dir.path(), "rogue", 1);
    let n1 = start(1, true, Some(good[0].clone())).await;
    n1.ensure_identity(Duration::from_secs(10)).await.unwrap();
    let n2 = start(2, false, Some(good[1].clone())).await;
    n1.add_member(2, n2.advertised().clone()).await.unwrap();
    assert_eq!(voters(&n1), 2);
    // The TLS member received the replicated identity.
    n2.ensure_identity(Duration::from_secs(10)).await.unwrap();

    // A node whose certificate another CA signed cannot be reached (handshake refused), so it
    // never catches up and never becomes a voter.
    let n3 = start(3, false, Some(rogue[0].clone())).await;
    let joined = tokio::time::timeout(
        Duration::from_secs(4),
        n1.add_member(3, n3.advertised().clone()),
    )
    .await;
    assert!(!matches!(joined, Ok(Ok(()))), "a rogue node was admitted");
    assert_eq!(voters(&n1), 2, "the rogue node is not a voter");
    assert!(
        n3.state().read().await.identity().is_none(),
        "rogue node got the state"
    );
    // A plaintext peer is refused as well.
    let plain = start(4, false, None).await;
    let started = Instant::now();
    let joined = tokio::time::timeout(
        Duration::from_secs(3),
        n1.add_member(4, plain.advertised().clone()),
    )
    .await;
    assert!(!matches!(joined, Ok(Ok(()))) && started.elapsed() < Duration::from_secs(5));
    assert!(plain.state().read().await.identity().is_none());
    for c in [n1, n2, n3, plain] {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_of_another_cluster_are_refused() {
    let n1 = start(1, true, None).await;
    n1.ensure_identity(Duration::from_secs(10)).await.unwrap();
    let ours = n1.cluster_id().expect("cluster id known");
    let addr = format!("http://{}", n1.advertised().raft_addr);
    let mut client = RaftClient::connect(addr).await.unwrap();
    let vote = kms_raft::network::encode(&openraft::raft::VoteRequest::<u64> {
        vote: openraft::Vote::new(99, 7),
        last_log_id: None,
    })
    .unwrap();
    let mut request = tonic::Request::new(RaftPayload {
        payload: vote.clone(),
    });
    let other = uuid::Uuid::new_v4();
    assert_ne!(other, ours);
    request.metadata_mut().insert(
        kms_raft::network::CLUSTER_ID_HEADER,
        other.to_string().parse().unwrap(),
    );
    let err = client.vote(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        !err.message().contains(&ours.to_string()),
        "refusal names the cluster id"
    );
    // Without the header: refused as well.
    let request = tonic::Request::new(RaftPayload {
        payload: vote.clone(),
    });
    let err = client.vote(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // With our own cluster id, the vote of a node that is not a member (a huge term) is
    // refused too, and the term does not move.
    let term = n1.view().term;
    let mut request = tonic::Request::new(RaftPayload { payload: vote });
    request.metadata_mut().insert(
        kms_raft::network::CLUSTER_ID_HEADER,
        ours.to_string().parse().unwrap(),
    );
    let err = client.vote(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // The node still leads its own cluster, in the same term.
    assert_eq!(n1.view().leader_id, Some(1));
    assert_eq!(n1.view().term, term);
    n1.shutdown().await;
}
