//! A DNS server that is down or hung never blocks: every call ends within its bound with a
//! typed error. No BIND needed: the "servers" here are sockets that never answer.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kms_dns::{
    lookup_srv, DesiredSrv, LookupError, PublishError, PublishTarget, Publisher, PublisherOptions,
    Transport, TsigKey,
};

fn publisher(server: &str, transport: Transport, request: Duration) -> Publisher {
    let target = PublishTarget::new("kms.test", server);
    let key = TsigKey::from_base64(
        "kms-test-key",
        "hmac-sha256",
        "fxnLNAORJ9vA7x5qm8ejIQB6CG+vt8ymftMxQssPWDM=",
    )
    .unwrap();
    let mut options = PublisherOptions::with_timeout(request);
    options.transport = transport;
    Publisher::with_key(&target, Some(key), options).unwrap()
}

fn desired() -> Vec<DesiredSrv> {
    vec![DesiredSrv::new("node1.kms.test", 1688, 0, 0)]
}

#[tokio::test]
async fn hung_tcp_server_times_out_within_the_bound() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let p = publisher(
        &addr.to_string(),
        Transport::Tcp,
        Duration::from_millis(500),
    );
    let started = Instant::now();
    let err = p.publish(&desired(), &BTreeSet::new()).await.unwrap_err();
    let took = started.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(err.label(), "TIMEOUT");
    // One request bound (0.5 s) plus scheduling slack; the operation bound is 2 s.
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let err = p.withdraw("node1.kms.test").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
}

#[tokio::test]
async fn silent_udp_server_times_out_within_the_bound() {
    // A bound UDP socket that reads nothing: datagrams vanish, no ICMP error comes back.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let p = publisher(
        &addr.to_string(),
        Transport::Udp,
        Duration::from_millis(400),
    );
    let started = Instant::now();
    let err = p.publish(&desired(), &BTreeSet::new()).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(socket);
}

#[tokio::test]
async fn closed_port_is_unreachable_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = publisher(
        &format!("127.0.0.1:{port}"),
        Transport::Tcp,
        Duration::from_secs(5),
    );
    let started = Instant::now();
    let err = p.publish(&desired(), &BTreeSet::new()).await.unwrap_err();
    assert!(matches!(err, PublishError::Unreachable { .. }), "{err:?}");
    assert_eq!(err.label(), "UNREACHABLE");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unresolvable_server_name_is_a_typed_error() {
    let p = publisher("dns.invalid:53", Transport::Tcp, Duration::from_secs(2));
    let err = p.publish(&desired(), &BTreeSet::new()).await.unwrap_err();
    assert!(
        matches!(
            err,
            PublishError::ServerAddress { .. } | PublishError::Timeout { .. }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn lookup_against_a_silent_server_times_out() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let started = Instant::now();
    let err = lookup_srv("kms.test", Some(addr), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LookupError::Timeout { .. } | LookupError::Failed { .. }
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(socket);
}
