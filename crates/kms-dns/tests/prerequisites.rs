//! What goes on the wire: a scripted DNS server (hickory messages over TCP) records every
//! update so the test can check the RFC 2136 prerequisites and the retry on a concurrent
//! change, which a real server cannot be made to produce on cue.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use kms_dns::{DesiredSrv, PublishError, PublishTarget, Publisher, PublisherOptions, Rcode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Script {
    /// SRV records the server reports as current.
    current: Vec<SRV>,
    /// Rcodes for successive updates (the last one repeats).
    update_rcodes: Vec<ResponseCode>,
    updates: Vec<Message>,
}

async fn scripted_server(script: Arc<Mutex<Script>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(len) = stream.read_u16().await else {
                        return;
                    };
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    let request = Message::from_vec(&buf).unwrap();
                    let mut response = Message::new();
                    response
                        .set_id(request.id())
                        .set_message_type(MessageType::Response)
                        .set_op_code(request.op_code())
                        .add_queries(request.queries().to_vec());
                    {
                        let mut s = script.lock().unwrap();
                        if request.op_code() == OpCode::Update {
                            let n = s.updates.len();
                            let code = *s.update_rcodes.get(n).or(s.update_rcodes.last()).unwrap();
                            s.updates.push(request.clone());
                            response.set_response_code(code);
                        } else if let Some(q) = request.queries().first() {
                            if q.query_type() == RecordType::SRV {
                                for srv in &s.current {
                                    response.add_answer(Record::from_rdata(
                                        q.name().clone(),
                                        60,
                                        RData::SRV(srv.clone()),
                                    ));
                                }
                            }
                        }
                    }
                    let bytes = response.to_vec().unwrap();
                    let _ = stream.write_u16(bytes.len() as u16).await;
                    let _ = stream.write_all(&bytes).await;
                }
            });
        }
    });
    addr
}

fn srv(priority: u16, weight: u16, target: &str) -> SRV {
    SRV::new(priority, weight, 1688, Name::from_ascii(target).unwrap())
}

fn publisher(addr: SocketAddr) -> Publisher {
    let target = PublishTarget::new("kms.test", addr.to_string());
    Publisher::with_key(
        &target,
        None,
        PublisherOptions::with_timeout(Duration::from_secs(2)),
    )
    .unwrap()
}

fn owned() -> BTreeSet<String> {
    ["node1.kms.test".to_owned(), "node2.kms.test".to_owned()].into()
}

#[tokio::test]
async fn update_is_guarded_by_the_exact_rrset_read_and_retried_on_conflict() {
    let foreign = srv(0, 0, "foreign.kms.test.");
    let stale = srv(0, 0, "node2.kms.test.");
    let script = Arc::new(Mutex::new(Script {
        current: vec![foreign.clone(), stale.clone()],
        // Somebody changes the RRset between our read and our update, once.
        update_rcodes: vec![ResponseCode::NXRRSet, ResponseCode::NoError],
        updates: Vec::new(),
    }));
    let addr = scripted_server(script.clone()).await;
    let report = publisher(addr)
        .publish(&[DesiredSrv::new("node1.kms.test", 1688, 0, 10)], &owned())
        .await
        .expect("second attempt succeeds");
    assert_eq!(
        (report.added, report.removed, report.foreign_records),
        (1, 1, 1)
    );

    let s = script.lock().unwrap();
    assert_eq!(s.updates.len(), 2, "one retry after NXRRSET");
    let srv_name = Name::from_ascii("_vlmcs._tcp.kms.test.").unwrap();
    for update in &s.updates {
        // Zone section: kms.test. SOA IN.
        let zone = &update.queries()[0];
        assert_eq!(zone.name(), &Name::from_ascii("kms.test.").unwrap());
        assert_eq!(zone.query_type(), RecordType::SOA);
        // Prerequisite (RFC 2136 §2.4.2): exactly the RRset read, class IN, TTL 0.
        let mut prereq: Vec<String> = update
            .answers()
            .iter()
            .map(|r| {
                assert_eq!(
                    (r.name(), r.dns_class(), r.ttl()),
                    (&srv_name, DNSClass::IN, 0)
                );
                r.data().to_string()
            })
            .collect();
        prereq.sort();
        assert_eq!(
            prereq,
            ["0 0 1688 foreign.kms.test.", "0 0 1688 node2.kms.test."]
        );
        // Updates: delete the owned stale record by rdata (class NONE, TTL 0), add ours
        // (class IN, TTL 60); the foreign record is never in the update section.
        let ups: Vec<(DNSClass, u32, String)> = update
            .name_servers()
            .iter()
            .map(|r| (r.dns_class(), r.ttl(), r.data().to_string()))
            .collect();
        assert_eq!(
            ups,
            [
                (DNSClass::NONE, 0, "0 0 1688 node2.kms.test.".to_owned()),
                (DNSClass::IN, 60, "0 10 1688 node1.kms.test.".to_owned())
            ]
        );
    }
}

#[tokio::test]
async fn empty_rrset_is_guarded_by_rrset_does_not_exist_and_conflicts_are_bounded() {
    let script = Arc::new(Mutex::new(Script {
        current: Vec::new(),
        update_rcodes: vec![ResponseCode::YXRRSet],
        updates: Vec::new(),
    }));
    let addr = scripted_server(script.clone()).await;
    let err = publisher(addr)
        .publish(&[DesiredSrv::new("node1.kms.test", 1688, 0, 0)], &owned())
        .await
        .unwrap_err();
    match err {
        PublishError::Conflict {
            attempts, rcode, ..
        } => assert_eq!((attempts, rcode), (3, Rcode::YXRRSET)),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let s = script.lock().unwrap();
    assert_eq!(s.updates.len(), 3);
    // RFC 2136 §2.4.3: NAME/TYPE of the RRset, class NONE, TTL 0, no rdata.
    let prereq = &s.updates[0].answers()[0];
    assert_eq!(prereq.dns_class(), DNSClass::NONE);
    assert_eq!(prereq.record_type(), RecordType::SRV);
    assert_eq!(prereq.ttl(), 0);
    assert!(matches!(prereq.data(), RData::Update0(RecordType::SRV)));
}

#[tokio::test]
async fn servfail_and_notzone_are_reported_with_their_rcode() {
    for (code, want) in [
        (ResponseCode::ServFail, Rcode::SERVFAIL),
        (ResponseCode::NotZone, Rcode::NOTZONE),
    ] {
        let script = Arc::new(Mutex::new(Script {
            current: Vec::new(),
            update_rcodes: vec![code],
            updates: Vec::new(),
        }));
        let addr = scripted_server(script.clone()).await;
        let err = publisher(addr)
            .publish(&[DesiredSrv::new("node1.kms.test", 1688, 0, 0)], &owned())
            .await
            .unwrap_err();
        assert_eq!(err.rcode(), Some(want), "{err}");
        assert_eq!(
            script.lock().unwrap().updates.len(),
            1,
            "no retry for {want}"
        );
    }
}
