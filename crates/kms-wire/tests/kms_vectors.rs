//! KMS message layer (kms.rs / crypto.rs) against the captured vectors in `tests/vectors`,
//! plus round-trip and negative tests.
//!
//! The RPC stub is unwrapped here by hand (independently of `ndr.rs`): the transfer syntax of
//! each presentation context is read from the BIND / ALTER_CONTEXT the client sent on the same
//! connection, and cross-checked against the stub's shape.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;

use kms_wire::crypto;
use kms_wire::hresult;
use kms_wire::kms::{
    decode_request, decode_response, encode_request, encode_response, expected_response_len,
    BaseRequest, BaseResponse, DecodeError, DecodedRequest, ProtocolVersion, ResponseError,
    ResponseRandom, Session,
};
use kms_wire::Uuid;
use serde_json::Value;

const NDR32: [u8; 16] = [
    0x04, 0x5d, 0x88, 0x8a, 0xeb, 0x1c, 0xc9, 0x11, 0x9f, 0xe8, 0x08, 0x00, 0x2b, 0x10, 0x48, 0x60,
];
const NDR64: [u8; 16] = [
    0x33, 0x05, 0x71, 0x71, 0xba, 0xbe, 0x37, 0x49, 0x83, 0x19, 0xb5, 0xdb, 0xef, 0x9c, 0xcc, 0x36,
];

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex in vector")
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Syntax {
    Ndr32,
    Ndr64,
}

struct Pdu {
    conn: u64,
    dir: String,
    ty: String,
    call_id: u64,
    context_id: Option<u64>,
    hex: Vec<u8>,
    stub: Vec<u8>,
}

fn pdus(v: &Value) -> Vec<Pdu> {
    v["pdus"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| Pdu {
                    conn: p["conn"].as_u64().unwrap(),
                    dir: p["dir"].as_str().unwrap().to_string(),
                    ty: p["type"].as_str().unwrap().to_string(),
                    call_id: p["call_id"].as_u64().unwrap(),
                    context_id: p["context_id"].as_u64(),
                    hex: unhex(p["hex"].as_str().unwrap()),
                    stub: p["stub_hex"].as_str().map(unhex).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// (conn, context id) -> transfer syntax, from the context elements the client offered.
fn context_syntaxes(pdus: &[Pdu]) -> HashMap<(u64, u64), Syntax> {
    let mut map = HashMap::new();
    for p in pdus
        .iter()
        .filter(|p| p.dir == "c2s" && (p.ty == "BIND" || p.ty == "ALTER_CONTEXT"))
    {
        let n = usize::from(p.hex[24]);
        for i in 0..n {
            let e = 28 + 44 * i;
            let ctx = u64::from(u16_at(&p.hex, e));
            let ts = &p.hex[e + 24..e + 40];
            if ts == NDR32 {
                map.insert((p.conn, ctx), Syntax::Ndr32);
            } else if ts == NDR64 {
                map.insert((p.conn, ctx), Syntax::Ndr64);
            }
        }
    }
    map
}

/// The KMS request message inside a request stub (everything after the length fields, like
/// vlmcsd; py-kms's 4 extra bytes stay attached) and the declared length.
fn request_message(stub: &[u8], syntax: Syntax) -> (&[u8], usize) {
    match syntax {
        Syntax::Ndr32 => {
            let n = u32_at(stub, 0);
            assert_eq!(u32_at(stub, 4), n, "NDR32 max count = size");
            let msg = &stub[8..];
            assert!(msg.len() >= n as usize);
            (msg, n as usize)
        }
        Syntax::Ndr64 => {
            let n = u64_at(stub, 0);
            assert_eq!(u64_at(stub, 8), n, "NDR64 max count = size");
            let msg = &stub[16..];
            assert!(msg.len() >= n as usize);
            (msg, n as usize)
        }
    }
}

/// Independent shape check: an NDR32 stub repeats the u32 size, an NDR64 one has zero high
/// halves in its u64 size.
fn stub_shape(stub: &[u8]) -> Syntax {
    if u32_at(stub, 4) == 0 {
        Syntax::Ndr64
    } else {
        Syntax::Ndr32
    }
}

enum StubResult {
    Success(Vec<u8>),
    Error(u32),
}

fn response_message(stub: &[u8], syntax: Syntax) -> StubResult {
    let (word, size, referent) = match syntax {
        Syntax::Ndr32 => (4, u64::from(u32_at(stub, 0)), u64::from(u32_at(stub, 4))),
        Syntax::Ndr64 => (8, u64_at(stub, 0), u64_at(stub, 8)),
    };
    if referent == 0 {
        assert_eq!(size, 0, "error stub size");
        assert_eq!(stub.len(), 2 * word + 4, "error stub length");
        return StubResult::Error(u32_at(stub, 2 * word));
    }
    assert_eq!(referent, 0x0002_0000, "referent id");
    let max = if word == 4 {
        u64::from(u32_at(stub, 8))
    } else {
        u64_at(stub, 16)
    };
    assert_eq!(max, size);
    let start = 3 * word;
    let m = size as usize;
    let msg = stub[start..start + m].to_vec();
    let mut end = start + m;
    while end & 3 != 0 {
        assert_eq!(stub[end], 0, "zero padding");
        end += 1;
    }
    assert_eq!(u32_at(stub, end), 0, "HRESULT 0");
    assert_eq!(stub.len(), end + 4, "exact stub length");
    StubResult::Success(msg)
}

// ------------------------------------------------------------------------------------------
// Ground truth from the decoded client / server output.

fn first_int(s: &str) -> u64 {
    s.split(|c: char| !c.is_ascii_digit())
        .find(|t| !t.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

/// FILETIME -> "YYYY-MM-DD HH:MM:SS" (UTC), as vlmcs prints it.
fn filetime_utc(ft: u64) -> String {
    let secs = (ft / 10_000_000) as i64 - 11_644_473_600;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn check_request_fields(base: &BaseRequest, view: &Value, what: &str) {
    let s = |k: &str| {
        view[k]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: missing {k}"))
    };
    assert_eq!(s("Protocol version"), base.version.to_string(), "{what}");
    assert_eq!(
        s("Client is a virtual machine"),
        if base.is_client_vm { "Yes" } else { "No" },
        "{what}"
    );
    assert_eq!(
        first_int(s("Licensing status")),
        u64::from(base.license_status),
        "{what}"
    );
    assert_eq!(
        first_int(s("Remaining time (0 = forever)")),
        u64::from(base.binding_expiration),
        "{what}"
    );
    assert_eq!(
        first_word(s("Application ID")),
        base.application_id.to_string(),
        "{what}"
    );
    assert_eq!(
        first_word(s("SKU ID (aka Activation ID)")),
        base.sku_id.to_string(),
        "{what}"
    );
    assert_eq!(
        first_word(s("KMS ID (aka KMS counted ID)")),
        base.kms_counted_id.to_string(),
        "{what}"
    );
    assert_eq!(
        s("Client machine ID"),
        base.client_machine_id.to_string(),
        "{what}"
    );
    assert_eq!(
        s("Previous client machine ID"),
        base.previous_client_machine_id.to_string(),
        "{what}"
    );
    assert_eq!(
        s("Client request timestamp (UTC)"),
        filetime_utc(base.request_time),
        "{what}"
    );
    assert_eq!(s("Workstation name"), base.workstation_name, "{what}");
    assert_eq!(
        first_int(s("N count policy (minimum clients)")),
        u64::from(base.required_client_count),
        "{what}"
    );
}

/// `view` is a vlmcs / vlmcsd "Response" block.
fn check_response_fields(
    resp: &kms_wire::kms::DecodedResponse,
    msg_len: usize,
    view: &Value,
    what: &str,
) {
    let b = &resp.base;
    let s = |k: &str| view[k].as_str();
    assert_eq!(s("KMS host extended PID"), Some(b.epid.as_str()), "{what}");
    assert_eq!(s("Protocol version"), Some(b.version.to_string().as_str()));
    assert_eq!(
        s("Client machine ID"),
        Some(b.client_machine_id.to_string().as_str()),
        "{what}"
    );
    assert_eq!(
        s("Client request timestamp (UTC)"),
        Some(filetime_utc(b.request_time).as_str()),
        "{what}"
    );
    assert_eq!(
        s("KMS host current active clients").map(first_int),
        Some(u64::from(b.current_count)),
        "{what}"
    );
    assert_eq!(
        s("Renewal interval policy").map(first_int),
        Some(u64::from(b.renewal_interval)),
        "{what}"
    );
    assert_eq!(
        s("Activation interval policy").map(first_int),
        Some(u64::from(b.activation_interval)),
        "{what}"
    );
    let hwid = resp.hwid.map(hex::encode_upper);
    assert_eq!(
        s("KMS host Hardware ID").map(str::to_string),
        hwid,
        "{what}: HwId"
    );
    if let Some(size) = s("Size of KMS Response") {
        assert_eq!(first_int(size), msg_len as u64, "{what}");
    }
}

/// py-kms client's summary.
fn check_pykms_result(resp: &kms_wire::kms::DecodedResponse, view: &Value, what: &str) {
    let b = &resp.base;
    assert_eq!(view["epid"].as_str(), Some(b.epid.as_str()), "{what}");
    let n = |k: &str| view[k].as_str().map(first_int);
    assert_eq!(n("count"), Some(u64::from(b.current_count)), "{what}");
    assert_eq!(
        n("activation_interval"),
        Some(u64::from(b.activation_interval))
    );
    assert_eq!(n("renewal_interval"), Some(u64::from(b.renewal_interval)));
    assert_eq!(
        view["hwid"].as_str().map(str::to_string),
        resp.hwid.map(hex::encode_upper),
        "{what}: HwId"
    );
}

/// The salt `R` of a captured v5/v6 response, recovered with the crypto layer so that the
/// server encoder can be asked to rebuild the exact bytes.
fn recover_salt(session: &Session, msg: &[u8], pid_size: usize) -> [u8; 16] {
    let cipher = crypto::cipher_for_major(session.version.major);
    let iv: [u8; 16] = msg[4..20].try_into().unwrap();
    let body = crypto::cbc_decrypt_pkcs7(cipher, &iv, &msg[20..]).unwrap();
    let rx: [u8; 16] = body[44 + pid_size..60 + pid_size].try_into().unwrap();
    let mut r = rx;
    for (a, b) in r.iter_mut().zip(&session.decrypted_iv_client) {
        *a ^= b;
    }
    r
}

/// The 236-byte base request of a v4 (clear) or v5/v6 (decrypted) request message.
fn request_plaintext(msg: &[u8]) -> Vec<u8> {
    let major = u16_at(msg, 2);
    if major == 4 {
        return msg[..236].to_vec();
    }
    let iv: [u8; 16] = msg[4..20].try_into().unwrap();
    let mut body = msg[20..260].to_vec();
    crypto::cbc_decrypt_in_place(crypto::cipher_for_major(major), &iv, &mut body).unwrap();
    body.truncate(236);
    body
}

fn zero_after_workstation_nul(base: &mut [u8]) {
    let field = &mut base[108..236];
    if let Some(nul) = field.chunks_exact(2).position(|u| u == [0, 0]) {
        field[2 * nul..].fill(0);
    }
}

#[derive(Default)]
struct Tally {
    /// (major, syntax) -> verified successful exchanges.
    ok: BTreeMap<(u16, Syntax), usize>,
    /// HRESULT -> error stubs matched.
    errors: BTreeMap<u32, usize>,
    requests_without_response: usize,
    requests_on_unbound_context: usize,
    byte_exact_requests: usize,
    requests_with_workstation_garbage: usize,
    byte_exact_responses: usize,
}

#[test]
fn captured_exchanges_decode_and_verify() {
    let mut tally = Tally::default();
    let mut files: Vec<_> = fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 28, "vector files found: {}", files.len());

    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        let pdus = pdus(&v);
        if pdus.is_empty() {
            continue; // worked_examples.json
        }
        let syntaxes = context_syntaxes(&pdus);
        let dec = &v["decoded"];
        let client_reqs: Vec<&Value> = dec["client_runs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["requests"].as_array().into_iter().flatten())
            .collect();
        let pykms: Vec<&Value> = dec["client_runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("pykms_client_result"))
            .collect();
        let server_view: Vec<&Value> = dec["server_view"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();

        let requests: Vec<&Pdu> = pdus.iter().filter(|p| p.ty == "REQUEST").collect();
        let bound: Vec<(&Pdu, Syntax)> = requests
            .iter()
            .filter_map(|p| {
                syntaxes
                    .get(&(p.conn, p.context_id.unwrap()))
                    .map(|s| (*p, *s))
            })
            .collect();
        tally.requests_on_unbound_context += requests.len() - bound.len();

        for (i, (req_pdu, syntax)) in bound.iter().enumerate() {
            let what = format!("{name} call {}", req_pdu.call_id);
            assert_eq!(stub_shape(&req_pdu.stub), *syntax, "{what}: stub shape");
            let (msg, declared) = request_message(&req_pdu.stub, *syntax);
            let client_view = client_reqs.get(i).copied();
            let response = pdus
                .iter()
                .find(|p| {
                    p.ty == "RESPONSE" && p.conn == req_pdu.conn && p.call_id == req_pdu.call_id
                })
                .map(|p| {
                    assert_eq!(p.context_id, req_pdu.context_id, "{what}: ctx echo");
                    response_message(&p.stub, *syntax)
                });

            let decoded = decode_request(msg);
            let req = match decoded {
                Ok(req) => req,
                Err(e) => {
                    // Only the unsupported-version captures may fail, and the host must have
                    // answered with the HRESULT our error maps to.
                    assert!(
                        matches!(e, DecodeError::UnsupportedVersion { .. }),
                        "{what}: {e}"
                    );
                    let view = client_view.expect("client view of a refused request");
                    let shown = view["request"]["Protocol version"].as_str().unwrap();
                    let mv = ProtocolVersion::read(msg).unwrap();
                    assert_eq!(shown, mv.to_string());
                    // The body is still a well-formed vlmcs encryption (v6 variant for 7.0 and 6.1).
                    let cipher = crypto::cipher_for_major(mv.major);
                    let iv: [u8; 16] = msg[4..20].try_into().unwrap();
                    let mut body = msg[20..260].to_vec();
                    crypto::cbc_decrypt_in_place(cipher, &iv, &mut body).unwrap();
                    assert_eq!(&body[236..], &[4, 4, 4, 4], "{what}");
                    assert_eq!(&body[..4], &msg[..4], "{what}: inner version");
                    let cmid = Uuid::from_bytes_le(body[64..80].try_into().unwrap());
                    assert_eq!(
                        view["request"]["Client machine ID"].as_str(),
                        Some(cmid.to_string().as_str())
                    );
                    match response {
                        Some(StubResult::Error(hr)) => {
                            assert_eq!(hr, e.hresult(), "{what}");
                            assert_eq!(
                                view["error_hresult"].as_str(),
                                Some(format!("0x{hr:08X}").as_str())
                            );
                            *tally.errors.entry(hr).or_default() += 1;
                        }
                        Some(StubResult::Success(_)) => panic!("{what}: success for bad version"),
                        None => tally.requests_without_response += 1,
                    }
                    continue;
                }
            };
            let major = req.session.version.major;
            let expected_len = if major == 4 { 252 } else { 260 };
            assert_eq!(declared, expected_len, "{what}: declared size");

            // Field comparison with what the client and the server printed.
            if let Some(view) = client_view {
                check_request_fields(&req.base, &view["request"], &what);
            }
            let sv = if server_view.len() == requests.len() {
                server_view.get(i).copied()
            } else {
                server_view.iter().copied().find(|s| {
                    s["request"]["Client machine ID"].as_str()
                        == Some(req.base.client_machine_id.to_string().as_str())
                })
            };
            if let Some(sv) = sv {
                check_request_fields(&req.base, &sv["request"], &format!("{what} (server view)"));
            }
            assert!(
                client_view.is_some() || sv.is_some(),
                "{what}: no ground truth for the request"
            );

            // The client encoder rebuilds the captured request byte for byte.
            let (rebuilt, session) = encode_request(&req.base, req.session.iv_client);
            assert_eq!(session, req.session, "{what}");
            // The client encoder rebuilds the captured request, byte for byte unless the
            // capture has garbage after the workstation name's NUL (vlmcs reuses its buffer;
            // pitfall 22): then the plaintexts must agree with that garbage zeroed.
            let captured_plain = request_plaintext(&msg[..expected_len]);
            let mut normalized = captured_plain.clone();
            zero_after_workstation_nul(&mut normalized);
            assert_eq!(
                request_plaintext(&rebuilt),
                normalized,
                "{what}: request rebuild"
            );
            if normalized == captured_plain {
                assert_eq!(
                    &rebuilt[..],
                    &msg[..expected_len],
                    "{what}: request rebuild"
                );
                tally.byte_exact_requests += 1;
            } else {
                tally.requests_with_workstation_garbage += 1;
            }

            match response {
                None => tally.requests_without_response += 1,
                Some(StubResult::Error(hr)) => {
                    // Policy refusal by the host (white-listing): the request itself is fine.
                    assert_eq!(hr, hresult::KMS_ID_MISMATCH, "{what}");
                    let view = client_view.unwrap();
                    assert_eq!(
                        view["error_hresult"].as_str(),
                        Some(format!("0x{hr:08X}").as_str())
                    );
                    *tally.errors.entry(hr).or_default() += 1;
                }
                Some(StubResult::Success(resp_msg)) => {
                    let resp = decode_response(&req.session, &resp_msg)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let p = 2 * (resp.base.epid.encode_utf16().count() + 1);
                    assert_eq!(resp_msg.len(), expected_response_len(major, p), "{what}");
                    let mut truth = 0;
                    if let Some(view) = client_view {
                        check_response_fields(&resp, resp_msg.len(), &view["response"], &what);
                        truth += 1;
                    }
                    if let Some(r) = sv.and_then(|s| s.get("response")) {
                        check_response_fields(&resp, resp_msg.len(), r, &what);
                        truth += 1;
                    }
                    if let Some(r) = pykms.get(i) {
                        check_pykms_result(&resp, r, &what);
                        truth += 1;
                    }
                    assert!(truth > 0, "{what}: no ground truth for the response");

                    // The server encoder rebuilds the captured response byte for byte from
                    // the decoded values, the captured salt and (v6) IV.
                    let random = ResponseRandom {
                        salt: if major == 4 {
                            [0; 16]
                        } else {
                            recover_salt(&req.session, &resp_msg, p)
                        },
                        iv: resp.iv.unwrap_or_default(),
                    };
                    let again =
                        encode_response(&req, &resp.base, resp.hwid.unwrap_or_default(), &random);
                    assert_eq!(again, resp_msg, "{what}: response rebuild");
                    tally.byte_exact_responses += 1;
                    *tally.ok.entry((major, *syntax)).or_default() += 1;
                }
            }
        }
    }

    println!("verified successful exchanges per (version, transfer syntax):");
    for ((major, syntax), n) in &tally.ok {
        println!("  v{major} {syntax:?}: {n}");
    }
    let total: usize = tally.ok.values().sum();
    println!("  total: {total}");
    for (hr, n) in &tally.errors {
        println!("error stubs with HRESULT 0x{hr:08X}: {n}");
    }
    println!(
        "requests rebuilt byte-exact: {} (+{} equal after zeroing junk behind the workstation NUL), \
         responses rebuilt byte-exact: {}",
        tally.byte_exact_requests, tally.requests_with_workstation_garbage, tally.byte_exact_responses
    );
    println!(
        "requests without a response: {}, requests on an unbound context (FAULT): {}",
        tally.requests_without_response, tally.requests_on_unbound_context
    );

    // Section 13: 58 successful exchanges (v4 NDR32 x4, v5 NDR32 x4, v6 NDR32 x15,
    // v6 NDR64 x35) plus 4 error stubs.
    let get = |m, s| tally.ok.get(&(m, s)).copied().unwrap_or(0);
    assert_eq!(get(4, Syntax::Ndr32), 4);
    assert_eq!(get(5, Syntax::Ndr32), 4);
    assert_eq!(get(6, Syntax::Ndr32), 15);
    assert_eq!(get(6, Syntax::Ndr64), 35);
    assert_eq!(total, 58);
    assert_eq!(tally.errors.get(&hresult::INVALID_DATA), Some(&2));
    assert_eq!(tally.errors.get(&hresult::KMS_ID_MISMATCH), Some(&2));
    // py-kms crashing on 7.0 and closing after its first response leave 2 unanswered requests.
    assert_eq!(tally.requests_without_response, 2);
    assert_eq!(tally.requests_on_unbound_context, 2);
}

// ------------------------------------------------------------------------------------------
// Intermediate values of worked_examples.json.

#[test]
fn worked_examples_intermediates() {
    let v: Value = serde_json::from_str(
        &fs::read_to_string(vectors_dir().join("worked_examples.json")).unwrap(),
    )
    .unwrap();
    let h16 = |s: &Value| -> [u8; 16] { unhex(s.as_str().unwrap()).try_into().unwrap() };

    for key in ["v5", "v6", "v6_ndr64"] {
        let ex = &v[key];
        let msg = unhex(ex["request_message"].as_str().unwrap());
        let req = decode_request(&msg).unwrap();
        assert_eq!(req.session.iv_client, h16(&ex["IVc"]), "{key}");
        assert_eq!(
            req.session.decrypted_iv_client,
            h16(&ex["DSc_=_D(IVc)"]),
            "{key}"
        );
        let f = &ex["base_request_fields"];
        assert_eq!(
            req.base.client_machine_id.to_string(),
            f["cmid"].as_str().unwrap()
        );
        assert_eq!(req.base.request_time, f["time"].as_u64().unwrap());
        assert_eq!(
            req.base.workstation_name,
            f["workstation"].as_str().unwrap()
        );
        let resp_msg = unhex(ex["response_message"].as_str().unwrap());
        let resp = decode_response(&req.session, &resp_msg).unwrap();
        let rf = &ex["base_response_fields"];
        assert_eq!(resp.base.epid, rf["epid"].as_str().unwrap());
        assert_eq!(
            u64::from(resp.base.current_count),
            rf["count"].as_u64().unwrap()
        );
        if key.starts_with("v6") {
            let cipher = crypto::v6_cipher();
            let ivs = h16(&ex["IVs"]);
            assert_eq!(resp.iv, Some(ivs));
            assert_eq!(crypto::decrypt_one(cipher, &ivs), h16(&ex["S_=_D(IVs)"]));
            let t = ex["T_request_time_filetime"].as_u64().unwrap();
            let slot = ex["time_slot_u64"].as_str().unwrap();
            assert_eq!(
                crypto::v6_time_slot(t, 0),
                u64::from_str_radix(slot.trim_start_matches("0x"), 16).unwrap()
            );
            assert_eq!(crypto::v6_hmac_key(t, 0), h16(&ex["hmac_key_=_last16"]));
            let r = recover_salt(&req.session, &resp_msg, 100);
            assert_eq!(r, h16(&ex["R"]));
            assert_eq!(
                hex::encode(crypto::sha256(&r)),
                ex["Hash"].as_str().unwrap()
            );
            assert_eq!(
                hex::encode(resp.hwid.unwrap()),
                ex["HwId"].as_str().unwrap()
            );
        } else {
            let r = recover_salt(&req.session, &resp_msg, 98);
            assert_eq!(r, h16(&ex["R_=_RandomXoredIVs_xor_DSc"]));
        }
    }

    // v4: request MAC and response MAC.
    let ex = &v["v4"];
    let msg = unhex(ex["request_message"].as_str().unwrap());
    assert_eq!(
        crypto::v4_mac(&msg[..236]).to_vec(),
        unhex(ex["request_mac"].as_str().unwrap())
    );
    let req = decode_request(&msg).unwrap();
    let resp_base = unhex(ex["base_response"].as_str().unwrap());
    assert_eq!(
        crypto::v4_mac(&resp_base).to_vec(),
        unhex(ex["response_mac"].as_str().unwrap())
    );
    let mut resp_msg = resp_base.clone();
    resp_msg.extend_from_slice(&crypto::v4_mac(&resp_base));
    let resp = decode_response(&req.session, &resp_msg).unwrap();
    assert_eq!(
        resp.base.epid,
        ex["base_response_fields"]["epid"].as_str().unwrap()
    );
}

// ------------------------------------------------------------------------------------------
// Round trips.

fn sample_request(major: u16) -> BaseRequest {
    BaseRequest {
        version: ProtocolVersion { major, minor: 0 },
        is_client_vm: true,
        license_status: 2,
        binding_expiration: 43_200,
        application_id: "55c92734-d682-4d71-983e-d6ec3f16059f".parse().unwrap(),
        sku_id: "73111121-5638-40f6-bc11-f1d7b0d64300".parse().unwrap(),
        kms_counted_id: "58e2134f-8e11-4d17-9cb2-91069c151148".parse().unwrap(),
        client_machine_id: "281e2149-4750-4362-a82f-7f7baba1297d".parse().unwrap(),
        required_client_count: 25,
        request_time: 134_398_399_720_000_000,
        previous_client_machine_id: "00000000-0000-0000-0000-000000000001".parse().unwrap(),
        workstation_name: "büro-pc.example.test".to_string(),
    }
}

/// A 49-character (P = 100) or 50-character (P = 102) ePID.
fn epid(pid_size: usize) -> String {
    match pid_size {
        100 => "03612-00206-555-812493-03-1131-14393.0000-3632024".to_string(),
        102 => "03612-00206-555-812493-03-10250-14393.0000-3632024".to_string(),
        _ => unreachable!(),
    }
}

const RANDOM: ResponseRandom = ResponseRandom {
    salt: [0x5a; 16],
    iv: [0xc3; 16],
};
const IVC: [u8; 16] = [
    0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87, 0x98, 0xa9, 0xba, 0xcb, 0xdc, 0xed, 0xfe, 0x0f,
];

fn exchange(major: u16, pid_size: usize) -> (DecodedRequest, BaseResponse, Vec<u8>) {
    let (msg, client_session) = encode_request(&sample_request(major), IVC);
    let req = decode_request(&msg).unwrap();
    assert_eq!(req.session, client_session);
    let resp = BaseResponse::echoing(&req.base, epid(pid_size), 50, 120, 10_080);
    let out = encode_response(
        &req,
        &resp,
        [0x3a, 0x1c, 0x04, 0x96, 0, 0xb6, 0, 0x76],
        &RANDOM,
    );
    (req, resp, out)
}

#[test]
fn request_round_trip_all_versions() {
    for major in [4u16, 5, 6] {
        let base = sample_request(major);
        let (msg, session) = encode_request(&base, IVC);
        assert_eq!(msg.len(), if major == 4 { 252 } else { 260 });
        assert_eq!(&msg[..4], &[0, 0, major as u8, 0], "version in clear");
        let req = decode_request(&msg).unwrap();
        assert_eq!(req.base, base);
        assert_eq!(req.session, session);
        if major == 4 {
            assert_eq!(session.iv_client, [0; 16]);
            assert_eq!(&msg[236..], &crypto::v4_mac(&msg[..236]));
        } else {
            assert_eq!(&msg[4..20], &IVC);
            assert_eq!(
                session.decrypted_iv_client,
                crypto::decrypt_one(crypto::cipher_for_major(major), &IVC)
            );
        }
        // Trailing junk is tolerated.
        let mut longer = msg.clone();
        longer.extend_from_slice(&[0; 4]);
        assert_eq!(decode_request(&longer).unwrap().base, base);
    }
}

#[test]
fn response_round_trip_sizes_and_fields() {
    for major in [4u16, 5, 6] {
        for pid_size in [100usize, 102] {
            let (req, resp, out) = exchange(major, pid_size);
            let expected = match major {
                4 => 60 + pid_size,
                5 => 20 + 16 * ((92 + pid_size) / 16 + 1),
                _ => 20 + 16 * ((132 + pid_size) / 16 + 1),
            };
            assert_eq!(out.len(), expected, "v{major} P={pid_size}");
            assert_eq!(expected_response_len(major, pid_size), expected);
            if major == 4 {
                // PIDSize is in clear only in v4.
                assert_eq!(u32_at(&out, 4) as usize, pid_size);
            }
            let got = decode_response(&req.session, &out).unwrap();
            assert_eq!(got.base, resp);
            match major {
                4 => {
                    assert_eq!(got.iv, None);
                    assert_eq!(got.hwid, None);
                }
                5 => {
                    assert_eq!(got.iv, Some(IVC));
                    assert_eq!(got.hwid, None);
                }
                _ => {
                    assert_eq!(got.iv, Some(RANDOM.iv));
                    assert_eq!(got.hwid, Some([0x3a, 0x1c, 0x04, 0x96, 0, 0xb6, 0, 0x76]));
                }
            }
        }
    }
    // The fixed sizes the sheet quotes.
    assert_eq!(exchange(5, 100).2.len(), 228);
    assert_eq!(exchange(6, 100).2.len(), 260);
    assert_eq!(exchange(6, 102).2.len(), 260);
    assert_eq!(exchange(4, 100).2.len(), 160);
}

#[test]
fn v6_response_iv_never_equals_request_iv() {
    let (msg, _) = encode_request(&sample_request(6), IVC);
    let req = decode_request(&msg).unwrap();
    let resp = BaseResponse::echoing(&req.base, epid(100), 50, 120, 10_080);
    let random = ResponseRandom {
        salt: [1; 16],
        iv: IVC,
    };
    let out = encode_response(&req, &resp, [0; 8], &random);
    assert_ne!(&out[4..20], &IVC);
    let got = decode_response(&req.session, &out).unwrap();
    assert_ne!(got.iv, Some(IVC));
    // Deterministic.
    assert_eq!(encode_response(&req, &resp, [0; 8], &random), out);
}

#[test]
fn workstation_name_rules() {
    let mut base = sample_request(6);
    base.workstation_name = "x".repeat(70);
    let (msg, _) = encode_request(&base, IVC);
    assert_eq!(
        decode_request(&msg).unwrap().base.workstation_name,
        "x".repeat(63)
    );
    base.workstation_name = "host\0garbage".to_string();
    let (msg, _) = encode_request(&base, IVC);
    assert_eq!(decode_request(&msg).unwrap().base.workstation_name, "host");

    // Garbage after the NUL of a received name is ignored (v4: plain text at offset 108).
    let base4 = sample_request(4);
    let (mut msg, _) = encode_request(&base4, IVC);
    let name_end = 108 + 2 * base4.workstation_name.encode_utf16().count();
    msg[name_end + 2] = b'Z';
    msg[235] = 0xff;
    assert_eq!(
        decode_request(&msg).unwrap().base.workstation_name,
        base4.workstation_name
    );
}

// ------------------------------------------------------------------------------------------
// Negative tests: server side.

fn reencrypt_request(msg: &[u8], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let major = u16_at(msg, 2);
    let cipher = crypto::cipher_for_major(major);
    let iv: [u8; 16] = msg[4..20].try_into().unwrap();
    let mut body = msg[20..260].to_vec();
    crypto::cbc_decrypt_in_place(cipher, &iv, &mut body).unwrap();
    edit(&mut body);
    crypto::cbc_encrypt_in_place(cipher, &iv, &mut body).unwrap();
    let mut out = msg[..20].to_vec();
    out.extend_from_slice(&body);
    out
}

#[test]
fn request_errors_map_to_invalid_data() {
    for major in [5u16, 6] {
        let (msg, _) = encode_request(&sample_request(major), IVC);
        for pad in [[4, 4, 4, 5], [0, 0, 0, 0], [16; 4]] {
            let bad = reencrypt_request(&msg, |b| b[236..].copy_from_slice(&pad));
            assert_eq!(decode_request(&bad).unwrap_err(), DecodeError::BadPadding);
        }
        let bad = reencrypt_request(&msg, |b| b[2] = 4);
        assert_eq!(
            decode_request(&bad).unwrap_err(),
            DecodeError::VersionMismatch {
                inner_major: 4,
                inner_minor: 0
            }
        );
        assert_eq!(
            decode_request(&msg[..259]).unwrap_err(),
            DecodeError::TooShort {
                len: 259,
                need: 260
            }
        );
    }
    let (msg4, _) = encode_request(&sample_request(4), IVC);
    assert_eq!(
        decode_request(&msg4[..251]).unwrap_err(),
        DecodeError::TooShort {
            len: 251,
            need: 252
        }
    );
    // v4 MAC is not checked by a host.
    let mut flipped = msg4.clone();
    flipped[251] ^= 1;
    assert!(decode_request(&flipped).is_ok());
    for short in [&[][..], &[0], &[0, 0, 6]] {
        assert_eq!(
            decode_request(short).unwrap_err(),
            DecodeError::TooShort {
                len: short.len(),
                need: 4
            }
        );
    }
    // Unsupported versions, as vlmcs -K 7.0 / -K 6.1 send them (v6 encryption).
    for (major, minor) in [
        (7u16, 0u16),
        (6, 1),
        (3, 0),
        (4, 1),
        (0, 0),
        (0xffff, 0xffff),
    ] {
        let mut base = sample_request(6);
        base.version = ProtocolVersion { major, minor };
        let (msg, _) = encode_request(&base, IVC);
        let e = decode_request(&msg).unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedVersion { major, minor });
        assert_eq!(e.hresult(), 0x8007_000D);
        // Even when truncated right after the version.
        assert_eq!(
            decode_request(&msg[..4]).unwrap_err(),
            DecodeError::UnsupportedVersion { major, minor }
        );
    }
    for e in [
        DecodeError::BadPadding,
        DecodeError::TooShort { len: 0, need: 4 },
    ] {
        assert_eq!(e.hresult(), hresult::INVALID_DATA);
    }
}

#[test]
fn decoders_never_panic_on_arbitrary_bytes() {
    let (v6, session6) = encode_request(&sample_request(6), IVC);
    let (_, session5) = encode_request(&sample_request(5), IVC);
    let (_, session4) = encode_request(&sample_request(4), IVC);
    let (_, _, resp6) = exchange(6, 100);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for len in 0..300usize {
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 4 {
            buf[2] = [4, 5, 6][len % 3];
            buf[0] = 0;
            buf[1] = 0;
            buf[3] = 0;
        }
        let _ = decode_request(&buf);
        for s in [&session4, &session5, &session6] {
            let _ = decode_response(s, &buf);
        }
    }
    for cut in 0..resp6.len() {
        assert!(decode_response(&session6, &resp6[..cut]).is_err());
    }
    for cut in 0..v6.len() {
        let _ = decode_request(&v6[..cut]);
    }
}

// ------------------------------------------------------------------------------------------
// Negative tests: client side.

/// Decrypts a v5/v6 response body, lets `edit` change the plaintext (without padding), and
/// re-encrypts it under `iv` (default: the original one).
fn tamper(msg: &[u8], iv: Option<[u8; 16]>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let major = u16_at(msg, 2);
    let cipher = crypto::cipher_for_major(major);
    let old_iv: [u8; 16] = msg[4..20].try_into().unwrap();
    let mut body = crypto::cbc_decrypt_pkcs7(cipher, &old_iv, &msg[20..]).unwrap();
    edit(&mut body);
    let iv = iv.unwrap_or(old_iv);
    let mut out = msg[..4].to_vec();
    out.extend_from_slice(&iv);
    out.extend_from_slice(&crypto::cbc_encrypt_pkcs7(cipher, &iv, &body));
    out
}

/// Recomputes the v6 HMAC of a plaintext body for IV `iv` and slot offset `tolerance`.
fn fix_hmac(body: &mut [u8], iv: &[u8; 16], tolerance: i8) {
    let s = crypto::decrypt_one(crypto::v6_cipher(), iv);
    let p = u32_at(body, 4) as usize;
    let t = u64_at(body, 24 + p);
    let n = body.len() - 16;
    let mac = crypto::v6_hmac(&crypto::v6_hmac_key(t, tolerance), &s, &body[..n]);
    body[n..].copy_from_slice(&mac);
}

#[test]
fn client_rejects_tampered_v4_responses() {
    let (req, _, out) = exchange(4, 100);
    let s = &req.session;
    assert!(decode_response(s, &out).is_ok());
    let mut bad = out.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(decode_response(s, &bad).unwrap_err(), ResponseError::BadMac);
    // A changed count breaks the MAC.
    let mut bad = out.clone();
    bad[8 + 100 + 24] ^= 1;
    assert_eq!(decode_response(s, &bad).unwrap_err(), ResponseError::BadMac);
    // Echo checks (MAC recomputed so that only the echo is wrong).
    let remac = |mut m: Vec<u8>| {
        let n = m.len() - 16;
        let mac = crypto::v4_mac(&m[..n]);
        m[n..].copy_from_slice(&mac);
        m
    };
    let mut bad = out.clone();
    bad[8 + 100] ^= 1;
    assert_eq!(
        decode_response(s, &remac(bad)).unwrap_err(),
        ResponseError::CmidMismatch
    );
    let mut bad = out.clone();
    bad[8 + 100 + 16] ^= 1;
    assert_eq!(
        decode_response(s, &remac(bad)).unwrap_err(),
        ResponseError::TimeMismatch
    );
    // Size: trailing junk and truncation.
    let mut bad = out.clone();
    bad.extend_from_slice(&[0; 16]);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::WrongSize {
            len: 176,
            expected: 160
        }
    );
    // ePID rules.
    let mut bad = out.clone();
    bad[4] = 130;
    assert!(matches!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadEpid(_)
    ));
    let mut bad = out.clone();
    bad[8 + 98] = b'x'; // terminator replaced
    assert!(matches!(
        decode_response(s, &remac(bad)).unwrap_err(),
        ResponseError::BadEpid(_)
    ));
    let mut bad = out.clone();
    bad[8 + 10] = 0; // NUL in the middle
    bad[8 + 11] = 0;
    assert!(matches!(
        decode_response(s, &remac(bad)).unwrap_err(),
        ResponseError::BadEpid(_)
    ));
    // Version echo.
    let mut other = s.clone();
    other.version.major = 5;
    assert_eq!(
        decode_response(&other, &out).unwrap_err(),
        ResponseError::VersionMismatch { major: 4, minor: 0 }
    );
    assert_eq!(
        decode_response(s, &out[..3]).unwrap_err(),
        ResponseError::TooShort { len: 3 }
    );
}

#[test]
fn client_rejects_tampered_v5_responses() {
    let (req, _, out) = exchange(5, 100);
    let s = &req.session;
    let p = 100;
    assert!(decode_response(s, &out).is_ok());
    let bad = tamper(&out, None, |b| b[60 + p] ^= 1);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadHash
    );
    let bad = tamper(&out, None, |b| b[44 + p] ^= 1);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadHash
    );
    let bad = tamper(&out, Some([9; 16]), |_| {});
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::IvMismatch
    );
    let bad = tamper(&out, None, |b| b[8 + p] ^= 1);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::CmidMismatch
    );
    let bad = tamper(&out, None, |b| b[24 + p] ^= 1);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::TimeMismatch
    );
    let bad = tamper(&out, None, |b| b[2] = 6);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::VersionMismatch { major: 6, minor: 0 }
    );
    // Body one byte longer: same number of blocks would need other padding; size then differs.
    let bad = tamper(&out, None, |b| b.push(0));
    assert!(matches!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::WrongSize { .. } | ResponseError::BadPadding
    ));
    // A corrupted last ciphertext byte breaks the padding.
    let mut bad = out.clone();
    *bad.last_mut().unwrap() ^= 0x55;
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadPadding
    );
    let mut bad = out.clone();
    bad.extend_from_slice(&[0; 16]);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::WrongSize {
            len: 244,
            expected: 228
        }
    );
}

#[test]
fn client_rejects_tampered_v6_responses() {
    let (req, _, out) = exchange(6, 100);
    let s = &req.session;
    let p = 100;
    let ivs: [u8; 16] = out[4..20].try_into().unwrap();
    assert!(decode_response(s, &out).is_ok());
    // HMAC field flipped.
    let bad = tamper(&out, None, |b| b[116 + p] ^= 1);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadHmac
    );
    // Count changed without fixing the HMAC.
    let bad = tamper(&out, None, |b| b[32 + p] ^= 1);
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadHmac
    );
    // HwId changed, HMAC fixed: accepted with the new HwId (the HMAC is all that binds it).
    let good = tamper(&out, None, |b| {
        b[92 + p] ^= 0xff;
        fix_hmac(b, &ivs, 0);
    });
    assert_eq!(
        decode_response(s, &good).unwrap().hwid.unwrap()[0],
        0x3a ^ 0xff
    );
    // Hash flipped (HMAC fixed so the hash check is what fails).
    let bad = tamper(&out, None, |b| {
        b[60 + p] ^= 1;
        fix_hmac(b, &ivs, 0);
    });
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadHash
    );
    let bad = tamper(&out, None, |b| {
        b[100 + p] ^= 1;
        fix_hmac(b, &ivs, 0);
    });
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadXoredIvs
    );
    // Response IV = request IV (KMSv5 rules).
    let bad = tamper(&out, Some(IVC), |b| fix_hmac(b, &IVC, 0));
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::IvReused
    );
    // Another fresh IV with the HMAC recomputed for it is fine; the old HMAC is not.
    let iv2 = [0x77; 16];
    let good = tamper(&out, Some(iv2), |b| fix_hmac(b, &iv2, 0));
    assert_eq!(decode_response(s, &good).unwrap().iv, Some(iv2));
    let bad = tamper(&out, Some(iv2), |_| {});
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadHmac
    );
    // Neighbouring time slots are accepted, farther ones are not.
    for (tolerance, ok) in [(-1i8, true), (1, true), (2, false), (-2, false)] {
        let m = tamper(&out, None, |b| fix_hmac(b, &ivs, tolerance));
        assert_eq!(decode_response(s, &m).is_ok(), ok, "tolerance {tolerance}");
    }
    // Version, echoes, ePID.
    let bad = tamper(&out, None, |b| {
        b[8 + p] ^= 1;
        fix_hmac(b, &ivs, 0);
    });
    assert_eq!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::CmidMismatch
    );
    let bad = tamper(&out, None, |b| {
        b[8 + p - 2] = b'1';
        fix_hmac(b, &ivs, 0);
    });
    assert!(matches!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::BadEpid(_)
    ));
    let mut bad = out.clone();
    bad.truncate(out.len() - 16);
    assert!(matches!(
        decode_response(s, &bad).unwrap_err(),
        ResponseError::WrongSize { .. }
    ));
    // v6 response to a v5 session.
    let (_, _, out5) = exchange(5, 100);
    assert_eq!(
        decode_response(s, &out5).unwrap_err(),
        ResponseError::VersionMismatch { major: 5, minor: 0 }
    );
}

#[test]
fn epid_double_nul_is_tolerated_like_vlmcs() {
    // PIDSize counting two NULs (vlmcs allows the unit before the terminator to be NUL).
    let (req, _, out) = exchange(6, 100);
    let ivs: [u8; 16] = out[4..20].try_into().unwrap();
    let m = tamper(&out, None, |b| {
        b[8 + 96] = 0;
        b[8 + 97] = 0;
        fix_hmac(b, &ivs, 0);
    });
    let got = decode_response(&req.session, &m).unwrap();
    assert_eq!(got.base.epid, &epid(100)[..48]);
}
