//! Hostile and broken clients against a real kmsd: every case ends in an RPC fault, an error
//! stub or a closed connection; the node never stops answering others and writes no state
//! for a rejected request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kms_tests::{http_get, metric_value, now_ms, Node};
use kms_wire::client::{BindOptions, CallResult, ClientConnection};
use kms_wire::kms::{encode_request, filetime};
use kmsctl::products::{resolve, RequestTemplate};
use uuid::Uuid;

/// What the server did with our bytes.
#[derive(Debug, PartialEq)]
enum Reply {
    Pdu(Vec<u8>),
    Closed,
}

fn read_reply(stream: &mut TcpStream) -> Reply {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut header = [0u8; 16];
    let mut got = 0;
    while got < 16 {
        match stream.read(&mut header[got..]) {
            Ok(0) | Err(_) => return Reply::Closed,
            Ok(n) => got += n,
        }
    }
    let len = u16::from_le_bytes([header[8], header[9]]) as usize;
    let mut pdu = header.to_vec();
    pdu.resize(len.max(16), 0);
    if stream.read_exact(&mut pdu[16..]).is_err() {
        return Reply::Closed;
    }
    Reply::Pdu(pdu)
}

fn connect(node: &Node) -> TcpStream {
    let s = TcpStream::connect(node.kms_addr).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A connection that completed the bind dance, plus its client state machine.
fn bound(node: &Node, options: BindOptions) -> (TcpStream, ClientConnection) {
    let mut stream = connect(node);
    let mut rpc = ClientConnection::new(options);
    let mut next = Some(rpc.bind());
    while let Some(pdu) = next.take() {
        stream.write_all(&pdu).unwrap();
        let Reply::Pdu(reply) = read_reply(&mut stream) else {
            panic!("bind answered by close")
        };
        next = rpc.handle_bind_reply(&reply).unwrap();
    }
    (stream, rpc)
}

fn windows_request(major: u16, minor: u16) -> Vec<u8> {
    let mut t = RequestTemplate::new(resolve("windows").unwrap());
    t.protocol_major = major;
    t.protocol_minor = minor;
    encode_request(&t.build(Uuid::new_v4(), now_ms()), rand::random()).0
}

fn fault_status(pdu: &[u8]) -> Option<u32> {
    (pdu.get(2) == Some(&3)).then(|| u32::from_le_bytes(pdu[24..28].try_into().unwrap()))
}

/// A genuine request on a fresh connection still works and returns `expected_count`.
fn still_serving(node: &Node, expected_count: u32) {
    let (mut stream, mut rpc) = bound(node, BindOptions::default());
    let t = RequestTemplate::new(resolve("office").unwrap());
    let (msg, session) = encode_request(&t.build(Uuid::new_v4(), now_ms()), rand::random());
    stream.write_all(&rpc.request(&msg).unwrap()).unwrap();
    let Reply::Pdu(reply) = read_reply(&mut stream) else {
        panic!("healthy client got no answer")
    };
    let CallResult::Success(bytes) = rpc.handle_response(&reply).unwrap() else {
        panic!("healthy client refused")
    };
    let resp = kms_wire::kms::decode_response(&session, &bytes).unwrap();
    assert_eq!(resp.base.current_count, expected_count);
}

#[test]
fn hostile_input_is_answered_with_faults_or_closes_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--idle-timeout-secs", "2"]);

    // Request before bind -> FAULT nca_unk_if, echoing the call id.
    let mut s = connect(&node);
    let mut rpc = ClientConnection::new(BindOptions::default());
    let _ = rpc.bind();
    let mut pdu = {
        // Build a request PDU from a bound client, then send it on an unbound connection.
        let (_, mut other) = bound(
            &node,
            BindOptions {
                ndr64: false,
                btfn: false,
                multiplex: true,
            },
        );
        other.request(&windows_request(6, 0)).unwrap()
    };
    pdu[12..16].copy_from_slice(&77u32.to_le_bytes());
    s.write_all(&pdu).unwrap();
    match read_reply(&mut s) {
        Reply::Pdu(p) => {
            assert_eq!(fault_status(&p), Some(0x1C01_0003));
            assert_eq!(u32::from_le_bytes(p[12..16].try_into().unwrap()), 77);
        }
        Reply::Closed => panic!("expected a FAULT"),
    }

    // Unknown context id after a bind -> FAULT.
    let (mut s, mut rpc) = bound(
        &node,
        BindOptions {
            ndr64: false,
            btfn: false,
            multiplex: true,
        },
    );
    let mut pdu = rpc.request(&windows_request(6, 0)).unwrap();
    pdu[20..22].copy_from_slice(&7u16.to_le_bytes());
    s.write_all(&pdu).unwrap();
    let Reply::Pdu(p) = read_reply(&mut s) else {
        panic!("expected a FAULT")
    };
    assert_eq!(fault_status(&p), Some(0x1C01_0003));

    // Wrong opnum -> FAULT (operation range error).
    let (mut s, mut rpc) = bound(
        &node,
        BindOptions {
            ndr64: false,
            btfn: false,
            multiplex: true,
        },
    );
    let mut pdu = rpc.request(&windows_request(6, 0)).unwrap();
    pdu[22..24].copy_from_slice(&5u16.to_le_bytes());
    s.write_all(&pdu).unwrap();
    let Reply::Pdu(p) = read_reply(&mut s) else {
        panic!("expected a FAULT")
    };
    assert_eq!(fault_status(&p), Some(0x1C01_0002));

    // Bad KMS versions, short messages and undecryptable payloads -> error stub 0x8007000D.
    let mut bad_messages: Vec<(&str, Vec<u8>)> = vec![
        ("version 7.0", windows_request(7, 0)),
        ("version 6.1", windows_request(6, 1)),
        ("version 3.0", windows_request(3, 0)),
        ("short v6", windows_request(6, 0)[..200].to_vec()),
        ("short v4", windows_request(4, 0)[..240].to_vec()),
        ("three bytes", vec![0, 0, 6]),
    ];
    for major in [5u16, 6] {
        let mut m = windows_request(major, 0);
        // Flipping a byte of the last ciphertext block breaks the PKCS#7 padding.
        let last = m.len() - 1;
        m[last] ^= 0x5A;
        bad_messages.push(("bad padding", m));
    }
    for (what, msg) in bad_messages {
        let (mut s, mut rpc) = bound(&node, BindOptions::default());
        s.write_all(&rpc.request(&msg).unwrap()).unwrap();
        let Reply::Pdu(p) = read_reply(&mut s) else {
            panic!("{what}: closed instead of an error stub")
        };
        assert_eq!(
            rpc.handle_response(&p).unwrap(),
            CallResult::Error(0x8007_000D),
            "{what}"
        );
    }

    // Framing attacks: each closes that connection only.
    let header = |ptype: u8, frag_len: u16| {
        let mut h = vec![5, 0, ptype, 3, 0x10, 0, 0, 0];
        h.extend_from_slice(&frag_len.to_le_bytes());
        h.extend_from_slice(&[0, 0, 2, 0, 0, 0]);
        h
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("frag_length below the header", header(11, 8)),
        ("oversized PDU", header(0, 60_000)),
        ("unknown packet type", [header(9, 24), vec![0; 8]].concat()),
        ("RPC version 4", {
            let mut h = header(11, 24);
            h[0] = 4;
            [h, vec![0; 8]].concat()
        }),
        (
            "garbage",
            (0..64u8)
                .map(|i| i.wrapping_mul(37).wrapping_add(11))
                .collect(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = connect(&node);
        s.write_all(&bytes).unwrap();
        assert_eq!(read_reply(&mut s), Reply::Closed, "{what}");
    }

    // Truncated PDU: announce 160 bytes, send 40, then stop; the idle timeout closes it.
    let mut s = connect(&node);
    let bind = ClientConnection::new(BindOptions::default()).bind();
    s.write_all(&bind[..40]).unwrap();
    let started = Instant::now();
    assert_eq!(read_reply(&mut s), Reply::Closed);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed by the idle timeout"
    );

    // Slow drip: one byte every 300 ms never completes a PDU within the timeout, and other
    // clients are served meanwhile.
    let node_addr = node.kms_addr;
    let drip = std::thread::spawn(move || {
        let mut s = TcpStream::connect(node_addr).unwrap();
        let bind = ClientConnection::new(BindOptions::default()).bind();
        let started = Instant::now();
        for b in bind {
            if s.write_all(&[b]).is_err() || started.elapsed() > Duration::from_secs(8) {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut buf = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
        (closed, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    still_serving(&node, 1);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "a slow client blocked another"
    );
    let (closed, elapsed) = drip.join().unwrap();
    assert!(closed, "slow-drip connection was not closed");
    assert!(
        elapsed < Duration::from_secs(9),
        "slow drip held the connection for {elapsed:?}"
    );

    // Nothing rejected above reached the state: the one genuine Office client is the only
    // registered client, and a genuine Windows client now gets count 1.
    let (_, metrics) = http_get(node.admin_addr, "/metrics").unwrap();
    assert_eq!(
        metric_value(&metrics, "kms_registered_clients"),
        Some(1.0),
        "{metrics}"
    );
    let (mut s, mut rpc) = bound(&node, BindOptions::default());
    let t = RequestTemplate::new(resolve("windows").unwrap());
    let (msg, session) = encode_request(&t.build(Uuid::new_v4(), now_ms()), rand::random());
    s.write_all(&rpc.request(&msg).unwrap()).unwrap();
    let Reply::Pdu(p) = read_reply(&mut s) else {
        panic!("no answer")
    };
    let CallResult::Success(bytes) = rpc.handle_response(&p).unwrap() else {
        panic!("refused")
    };
    let resp = kms_wire::kms::decode_response(&session, &bytes).unwrap();
    assert_eq!(resp.base.current_count, 1);
    assert!(resp.base.request_time > filetime::from_unix_millis(0));
    assert!(
        metric_value(&metrics, "kms_rpc_faults_total").is_some(),
        "faults are counted"
    );
}

#[test]
fn connection_limit_refuses_extra_clients_but_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        dir.path(),
        &["--max-connections", "2", "--idle-timeout-secs", "3"],
    );
    // Two bound connections hold both slots (the readiness probe's connection is gone by then).
    std::thread::sleep(Duration::from_millis(300));
    let hold1 = bound(&node, BindOptions::default());
    let hold2 = bound(&node, BindOptions::default());
    let mut third = connect(&node);
    third
        .write_all(&ClientConnection::new(BindOptions::default()).bind())
        .unwrap();
    assert_eq!(
        read_reply(&mut third),
        Reply::Closed,
        "third connection over the limit"
    );
    drop(hold1);
    drop(hold2);
    std::thread::sleep(Duration::from_millis(200));
    still_serving(&node, 1);
}
