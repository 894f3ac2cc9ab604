//! KMS activation messages (protocol sheet sections 3-6), both directions.
//!
//! Server side: [`decode_request`] then [`encode_response`] (or an error stub via the RPC layer).
//! Client side: [`encode_request`] then [`decode_response`].
//! Randomness (IVs, the response salt `R`) is passed in by the caller.

use uuid::Uuid;

use crate::crypto;
use crate::guid::{read_guid, write_guid};

/// Length of the base request common to v4, v5 and v6.
pub const BASE_REQUEST_LEN: usize = 236;
/// Length of a v4 request (base + CBC-MAC).
pub const V4_REQUEST_LEN: usize = 252;
/// Length of a v5/v6 request (version + IV + 240 encrypted bytes).
pub const V5_V6_REQUEST_LEN: usize = 260;
/// Longest ePID a client accepts, in UTF-16 bytes including the NUL (P <= 128).
pub const MAX_PID_BYTES: usize = 128;

/// Workstation name field: 64 UTF-16 units, at most 63 of them text (then a NUL).
const WORKSTATION_FIELD_LEN: usize = 128;
const MAX_WORKSTATION_UNITS: usize = WORKSTATION_FIELD_LEN / 2 - 1;
/// Longest ePID text in UTF-16 units (P <= 128 with the NUL).
const MAX_EPID_UNITS: usize = MAX_PID_BYTES / 2 - 1;
/// Base response length without the ePID bytes: version, PIDSize, CMID, time, 3 × u32.
const BASE_RESPONSE_FIXED_LEN: usize = 44;
/// v5 additions after the base response: RandomXoredIVs (16) + Hash (32).
const V5_TRAILER_LEN: usize = 48;
/// v6 additions after the v5 ones: HwId (8) + XoredIVs (16) + HMAC (16).
const V6_EXTRA_LEN: usize = 40;
/// Clear part of a v5/v6 message: version (4) + IV (16).
const CLEAR_HEADER_LEN: usize = 20;
/// The fixed PKCS#7 padding of the 236-byte base request.
const REQUEST_PAD: [u8; 4] = [4; 4];

/// Protocol version as sent in the message (major 4, 5 or 6; minor must be 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl ProtocolVersion {
    /// Wire form: minor (u16 LE) then major (u16 LE).
    pub fn to_bytes(self) -> [u8; 4] {
        let [a, b] = self.minor.to_le_bytes();
        let [c, d] = self.major.to_le_bytes();
        [a, b, c, d]
    }

    /// Reads the version from the first 4 bytes, if present.
    pub fn read(bytes: &[u8]) -> Option<Self> {
        let (v, _) = bytes.split_first_chunk::<4>()?;
        Some(Self {
            minor: u16::from_le_bytes([v[0], v[1]]),
            major: u16::from_le_bytes([v[2], v[3]]),
        })
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The 236-byte base request (section 3), decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRequest {
    pub version: ProtocolVersion,
    pub is_client_vm: bool,
    /// 0 unlicensed, 1 licensed, 2 OOB grace, 3 OOT grace, 4 non-genuine grace,
    /// 5 notification, 6 extended grace (other values are kept as sent).
    pub license_status: u32,
    /// Minutes remaining in the current license state (0 = forever).
    pub binding_expiration: u32,
    pub application_id: Uuid,
    pub sku_id: Uuid,
    pub kms_counted_id: Uuid,
    pub client_machine_id: Uuid,
    /// The client's N-count policy.
    pub required_client_count: u32,
    /// Client clock, FILETIME (100 ns since 1601-01-01 UTC).
    pub request_time: u64,
    pub previous_client_machine_id: Uuid,
    /// Workstation name up to the first NUL (anything after it is ignored).
    pub workstation_name: String,
}

/// The base response (section 4), decoded or to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseResponse {
    pub version: ProtocolVersion,
    /// Extended PID of the host, without the NUL terminator.
    pub epid: String,
    pub client_machine_id: Uuid,
    /// Echo of the request's FILETIME.
    pub request_time: u64,
    pub current_count: u32,
    /// Minutes before a failed client retries (VLActivationInterval).
    pub activation_interval: u32,
    /// Minutes between renewals (VLRenewalInterval).
    pub renewal_interval: u32,
}

impl BaseResponse {
    /// A response echoing `request`'s version, CMID and request time.
    pub fn echoing(
        request: &BaseRequest,
        epid: String,
        current_count: u32,
        activation_interval: u32,
        renewal_interval: u32,
    ) -> Self {
        Self {
            version: request.version,
            epid,
            client_machine_id: request.client_machine_id,
            request_time: request.request_time,
            current_count,
            activation_interval,
            renewal_interval,
        }
    }
}

/// Why a KMS message could not be decoded. Every variant maps to the HRESULT a genuine host
/// would answer ([`DecodeError::hresult`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message too short: {len} bytes, need {need}")]
    TooShort { len: usize, need: usize },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("bad padding after decryption")]
    BadPadding,
    #[error("version inside the encrypted body ({inner_major}.{inner_minor}) differs from the clear one")]
    VersionMismatch { inner_major: u16, inner_minor: u16 },
}

impl DecodeError {
    /// The HRESULT a host returns for this error (always `0x8007000D`).
    pub fn hresult(&self) -> u32 {
        crate::hresult::INVALID_DATA
    }
}

/// A request decoded by the server, with what is needed to build the matching response.
#[derive(Clone, Debug)]
pub struct DecodedRequest {
    pub base: BaseRequest,
    /// Crypto context of this request (IVc and D(IVc) for v5/v6).
    pub session: Session,
}

/// Per-request crypto context shared by both sides of one exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub version: ProtocolVersion,
    /// Client IV (v5/v6); zero for v4.
    pub iv_client: [u8; 16],
    /// `D_k(IVc)` (v5/v6); zero for v4.
    pub decrypted_iv_client: [u8; 16],
    /// CMID of the request (the client checks the response echoes it).
    pub client_machine_id: Uuid,
    /// RequestTime of the request (the client checks the response echoes it).
    pub request_time: u64,
}

/// Fresh random values a response needs. `salt` is `R` (v5/v6); `iv` is the v6 response IV
/// (if it happens to equal IVc the encoder derives a different one deterministically).
#[derive(Clone, Copy, Debug)]
pub struct ResponseRandom {
    pub salt: [u8; 16],
    pub iv: [u8; 16],
}

/// Exact length of a response message for protocol major `major` with a PIDSize of
/// `pid_size` bytes (section 11, item 9). Majors other than 4 use the v5 (`<= 5`) or
/// v6 (`> 5`) layout.
pub fn expected_response_len(major: u16, pid_size: usize) -> usize {
    let base = BASE_RESPONSE_FIXED_LEN.saturating_add(pid_size);
    if major == 4 {
        return base.saturating_add(16);
    }
    let body = encrypted_body_len(major, pid_size);
    CLEAR_HEADER_LEN.saturating_add((body / 16).saturating_add(1).saturating_mul(16))
}

/// Plaintext length of a v5/v6 response body before padding (92 + P or 132 + P).
fn encrypted_body_len(major: u16, pid_size: usize) -> usize {
    let extra = if major > 5 {
        V5_TRAILER_LEN + V6_EXTRA_LEN
    } else {
        V5_TRAILER_LEN
    };
    (BASE_RESPONSE_FIXED_LEN + extra).saturating_add(pid_size)
}

// ---------------------------------------------------------------------------------------------
// Little helpers.

/// Bounds-checked little-endian reader; every getter returns `None` past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.buf.split_first_chunk::<N>()?;
        self.buf = tail;
        Some(*head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn guid(&mut self) -> Option<Uuid> {
        read_guid(self.take(16)?)
    }
    fn version(&mut self) -> Option<ProtocolVersion> {
        let minor = self.u16()?;
        let major = self.u16()?;
        Some(ProtocolVersion { major, minor })
    }
}

fn xor16(a: &[u8; 16], b: &[u8; 16]) -> [u8; 16] {
    let mut out = *a;
    for (x, y) in out.iter_mut().zip(b) {
        *x ^= *y;
    }
    out
}

/// Number of UTF-16 units of `s` to send: up to the first NUL, at most `max`, never ending
/// on half a surrogate pair.
fn utf16_len_limited(s: &str, max: usize) -> usize {
    let mut n = 0;
    let mut last_high_surrogate = false;
    for u in s.encode_utf16().take_while(|&u| u != 0) {
        if n == max {
            // Cut here; drop a dangling high surrogate.
            return if last_high_surrogate { n - 1 } else { n };
        }
        last_high_surrogate = (0xD800..0xDC00).contains(&u);
        n += 1;
    }
    n
}

fn push_utf16(out: &mut Vec<u8>, s: &str, units: usize) {
    for u in s.encode_utf16().take(units) {
        out.extend_from_slice(&u.to_le_bytes());
    }
}

/// Decodes UTF-16LE up to the first NUL unit (or the end). Unpaired surrogates become U+FFFD.
fn utf16_until_nul(bytes: &[u8]) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Base request.

fn write_base_request(out: &mut Vec<u8>, base: &BaseRequest) {
    let start = out.len();
    out.extend_from_slice(&base.version.to_bytes());
    out.extend_from_slice(&u32::from(base.is_client_vm).to_le_bytes());
    out.extend_from_slice(&base.license_status.to_le_bytes());
    out.extend_from_slice(&base.binding_expiration.to_le_bytes());
    write_guid(out, &base.application_id);
    write_guid(out, &base.sku_id);
    write_guid(out, &base.kms_counted_id);
    write_guid(out, &base.client_machine_id);
    out.extend_from_slice(&base.required_client_count.to_le_bytes());
    out.extend_from_slice(&base.request_time.to_le_bytes());
    write_guid(out, &base.previous_client_machine_id);
    let units = utf16_len_limited(&base.workstation_name, MAX_WORKSTATION_UNITS);
    push_utf16(out, &base.workstation_name, units);
    // NUL terminator and zero fill of the 128-byte field.
    out.resize(start + BASE_REQUEST_LEN, 0);
}

fn parse_base_request(bytes: &[u8]) -> Option<BaseRequest> {
    let mut r = Reader::new(bytes);
    Some(BaseRequest {
        version: r.version()?,
        is_client_vm: r.u32()? != 0,
        license_status: r.u32()?,
        binding_expiration: r.u32()?,
        application_id: r.guid()?,
        sku_id: r.guid()?,
        kms_counted_id: r.guid()?,
        client_machine_id: r.guid()?,
        required_client_count: r.u32()?,
        request_time: r.u64()?,
        previous_client_machine_id: r.guid()?,
        workstation_name: utf16_until_nul(r.take(WORKSTATION_FIELD_LEN)?),
    })
}

// ---------------------------------------------------------------------------------------------
// Server side.

/// Decodes (and for v5/v6 decrypts) a KMS request message taken from the RPC stub.
/// Extra trailing bytes are tolerated (py-kms appends 4 to v4 requests).
///
/// Checks, in order (section 6.5): length >= 4; major in {4, 5, 6} and minor 0; length of the
/// version's request; for v5/v6 the `04 04 04 04` padding and the inner version equal to the
/// clear one. The v4 MAC is not verified (genuine hosts and both references don't).
pub fn decode_request(msg: &[u8]) -> Result<DecodedRequest, DecodeError> {
    let len = msg.len();
    let version = ProtocolVersion::read(msg).ok_or(DecodeError::TooShort { len, need: 4 })?;
    if !(4..=6).contains(&version.major) || version.minor != 0 {
        return Err(DecodeError::UnsupportedVersion {
            major: version.major,
            minor: version.minor,
        });
    }

    if version.major == 4 {
        let too_short = DecodeError::TooShort {
            len,
            need: V4_REQUEST_LEN,
        };
        if len < V4_REQUEST_LEN {
            return Err(too_short);
        }
        let base = msg
            .get(..BASE_REQUEST_LEN)
            .and_then(parse_base_request)
            .ok_or(too_short)?;
        let session = Session {
            version,
            iv_client: [0; 16],
            decrypted_iv_client: [0; 16],
            client_machine_id: base.client_machine_id,
            request_time: base.request_time,
        };
        return Ok(DecodedRequest { base, session });
    }

    let too_short = DecodeError::TooShort {
        len,
        need: V5_V6_REQUEST_LEN,
    };
    let (iv, body) = match (
        msg.get(4..CLEAR_HEADER_LEN),
        msg.get(CLEAR_HEADER_LEN..V5_V6_REQUEST_LEN),
    ) {
        (Some(iv), Some(body)) => (iv, body),
        _ => return Err(too_short),
    };
    let iv: [u8; 16] = iv.try_into().map_err(|_| too_short.clone())?;
    // Decrypt on the stack: 240 bytes, no allocation on the server path.
    let mut plain: [u8; V5_V6_REQUEST_LEN - CLEAR_HEADER_LEN] =
        body.try_into().map_err(|_| too_short.clone())?;
    let cipher = crypto::cipher_for_major(version.major);
    crypto::cbc_decrypt_in_place(cipher, &iv, &mut plain).map_err(|_| too_short.clone())?;
    let (base_bytes, pad) = plain.split_at(BASE_REQUEST_LEN);
    if pad != REQUEST_PAD {
        return Err(DecodeError::BadPadding);
    }
    let base = parse_base_request(base_bytes).ok_or(too_short)?;
    if base.version != version {
        return Err(DecodeError::VersionMismatch {
            inner_major: base.version.major,
            inner_minor: base.version.minor,
        });
    }
    let session = Session {
        version,
        iv_client: iv,
        decrypted_iv_client: crypto::decrypt_one(cipher, &iv),
        client_machine_id: base.client_machine_id,
        request_time: base.request_time,
    };
    Ok(DecodedRequest { base, session })
}

/// Writes the base response; version, CMID and request time are echoed from the request.
/// `epid_units` is the ePID length from [`utf16_len_limited`] (at most 63).
fn write_base_response(
    out: &mut Vec<u8>,
    request: &DecodedRequest,
    response: &BaseResponse,
    epid_units: usize,
) {
    let pid_size = 2 * (epid_units + 1); // includes the UTF-16 NUL; <= 128
    out.extend_from_slice(&request.session.version.to_bytes());
    out.extend_from_slice(&(pid_size as u32).to_le_bytes());
    push_utf16(out, &response.epid, epid_units);
    out.extend_from_slice(&[0, 0]);
    write_guid(out, &request.base.client_machine_id);
    out.extend_from_slice(&request.base.request_time.to_le_bytes());
    out.extend_from_slice(&response.current_count.to_le_bytes());
    out.extend_from_slice(&response.activation_interval.to_le_bytes());
    out.extend_from_slice(&response.renewal_interval.to_le_bytes());
}

/// Builds the KMS response message for a successfully decoded request.
/// `hwid` is only sent in v6 responses.
///
/// The echoed fields (version, ClientMachineId, RequestTime) are always taken from `request`,
/// so they cannot disagree with what the client sent; `response` supplies the ePID, count and
/// intervals (its `version`, `client_machine_id` and `request_time` are not used). The ePID is
/// sent up to its first NUL and at most 63 UTF-16 units, so that PIDSize <= 128.
/// The v6 HMAC key derives from the echoed request time (slot offset 0).
pub fn encode_response(
    request: &DecodedRequest,
    response: &BaseResponse,
    hwid: [u8; 8],
    random: &ResponseRandom,
) -> Vec<u8> {
    let session = &request.session;
    let version = session.version;
    let epid_units = utf16_len_limited(&response.epid, MAX_EPID_UNITS);
    let pid_size = 2 * (epid_units + 1);
    let mut out = Vec::with_capacity(expected_response_len(version.major, pid_size));

    if version.major == 4 {
        write_base_response(&mut out, request, response, epid_units);
        let mac = crypto::v4_mac(&out);
        out.extend_from_slice(&mac);
        return out;
    }

    let v6 = version.major > 5;
    let cipher = crypto::cipher_for_major(version.major);
    let iv = if v6 {
        let mut iv = random.iv;
        if iv == session.iv_client {
            // v6 must not reuse IVc (vlmcs flags that as an emulator): flip one bit.
            iv[15] ^= 0x01;
        }
        iv
    } else {
        // v5: the response IV is the request IV.
        session.iv_client
    };
    out.extend_from_slice(&version.to_bytes());
    out.extend_from_slice(&iv);
    write_base_response(&mut out, request, response, epid_units);
    out.extend_from_slice(&xor16(&random.salt, &session.decrypted_iv_client));
    out.extend_from_slice(&crypto::sha256(&random.salt));
    if v6 {
        out.extend_from_slice(&hwid);
        out.extend_from_slice(&session.decrypted_iv_client);
        let s = crypto::decrypt_one(cipher, &iv);
        let key = crypto::v6_hmac_key(request.base.request_time, 0);
        let mac = crypto::v6_hmac(&key, &s, out.get(CLEAR_HEADER_LEN..).unwrap_or_default());
        out.extend_from_slice(&mac);
    }
    crypto::pkcs7_pad(&mut out, CLEAR_HEADER_LEN);
    if let Some(body) = out.get_mut(CLEAR_HEADER_LEN..) {
        // Padded to a block multiple just above, so encryption cannot fail.
        let _ = crypto::cbc_encrypt_in_place(cipher, &iv, body);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// Client side: builds a request message for `base.version` (4, 5 or 6). Other majors are
/// encrypted like vlmcs does, for testing hosts: above 5 with the v6 variant, below 4 with v5.
/// `iv` is the client IV for v5/v6 (ignored for v4). The workstation name is sent up to its
/// first NUL and truncated to 63 UTF-16 units.
pub fn encode_request(base: &BaseRequest, iv: [u8; 16]) -> (Vec<u8>, Session) {
    let version = base.version;
    let mut session = Session {
        version,
        iv_client: [0; 16],
        decrypted_iv_client: [0; 16],
        client_machine_id: base.client_machine_id,
        request_time: base.request_time,
    };

    if version.major == 4 {
        let mut out = Vec::with_capacity(V4_REQUEST_LEN);
        write_base_request(&mut out, base);
        let mac = crypto::v4_mac(&out);
        out.extend_from_slice(&mac);
        return (out, session);
    }

    let cipher = crypto::cipher_for_major(version.major);
    let mut out = Vec::with_capacity(V5_V6_REQUEST_LEN);
    out.extend_from_slice(&version.to_bytes());
    out.extend_from_slice(&iv);
    write_base_request(&mut out, base);
    out.extend_from_slice(&REQUEST_PAD);
    if let Some(body) = out.get_mut(CLEAR_HEADER_LEN..) {
        // 240 bytes: block aligned, cannot fail.
        let _ = crypto::cbc_encrypt_in_place(cipher, &iv, body);
    }
    session.iv_client = iv;
    session.decrypted_iv_client = crypto::decrypt_one(cipher, &iv);
    (out, session)
}

/// A response decoded and verified by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedResponse {
    pub base: BaseResponse,
    /// Host hardware id (v6 only).
    pub hwid: Option<[u8; 8]>,
    /// The response IV (v5/v6), for display.
    pub iv: Option<[u8; 16]>,
}

/// Why a client rejects a response (the checks vlmcs makes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response too short: {len} bytes")]
    TooShort { len: usize },
    #[error("response size {len} differs from the expected {expected}")]
    WrongSize { len: usize, expected: usize },
    #[error("protocol version of the response ({major}.{minor}) differs from the request's")]
    VersionMismatch { major: u16, minor: u16 },
    #[error("bad padding after decryption")]
    BadPadding,
    #[error("ePID is malformed: {0}")]
    BadEpid(&'static str),
    #[error("client machine id not echoed")]
    CmidMismatch,
    #[error("request time not echoed")]
    TimeMismatch,
    #[error("v4 MAC does not verify")]
    BadMac,
    #[error("v5 response IV differs from the request IV")]
    IvMismatch,
    #[error("v6 response reuses the request IV (KMSv5 rules in KMSv6)")]
    IvReused,
    #[error("salt hash does not verify")]
    BadHash,
    #[error("v6 XoredIVs does not match D(IVc)")]
    BadXoredIvs,
    #[error("v6 HMAC does not verify")]
    BadHmac,
}

/// vlmcs's PIDSize rules that can be checked before the ePID is read.
fn check_pid_size(pid_size: u32) -> Result<usize, ResponseError> {
    let p = usize::try_from(pid_size).map_err(|_| ResponseError::BadEpid("PIDSize too large"))?;
    if p > MAX_PID_BYTES {
        return Err(ResponseError::BadEpid("PIDSize exceeds 128 bytes"));
    }
    if p < 4 || p & 1 != 0 {
        return Err(ResponseError::BadEpid(
            "PIDSize is odd or leaves no room for text",
        ));
    }
    Ok(p)
}

/// vlmcs's ePID content rules: the last unit is NUL, no unit before the second-to-last is.
fn parse_epid(bytes: &[u8]) -> Result<String, ResponseError> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let Some((&last, text)) = units.split_last() else {
        return Err(ResponseError::BadEpid("empty"));
    };
    if last != 0 {
        return Err(ResponseError::BadEpid("not NUL-terminated"));
    }
    // The unit just before the terminator may be NUL too (vlmcs tolerates it).
    let strict = text.len().saturating_sub(1);
    if text.iter().take(strict).any(|&u| u == 0) {
        return Err(ResponseError::BadEpid("NUL inside the ePID"));
    }
    let end = text.iter().position(|&u| u == 0).unwrap_or(text.len());
    let text = text.get(..end).unwrap_or_default();
    Ok(char::decode_utf16(text.iter().copied())
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect())
}

/// Parses a base response of exactly `44 + P` bytes (P already validated) and checks the
/// echoes against `session`.
fn parse_base_response(
    session: &Session,
    bytes: &[u8],
    pid_size: usize,
) -> Result<BaseResponse, ResponseError> {
    let len = bytes.len();
    let short = ResponseError::TooShort { len };
    let mut r = Reader::new(bytes);
    let version = r.version().ok_or(short.clone())?;
    if version != session.version {
        return Err(ResponseError::VersionMismatch {
            major: version.major,
            minor: version.minor,
        });
    }
    let _declared = r.u32().ok_or(short.clone())?;
    let epid = parse_epid(r.take(pid_size).ok_or(short.clone())?)?;
    let client_machine_id = r.guid().ok_or(short.clone())?;
    let request_time = r.u64().ok_or(short.clone())?;
    let current_count = r.u32().ok_or(short.clone())?;
    let activation_interval = r.u32().ok_or(short.clone())?;
    let renewal_interval = r.u32().ok_or(short)?;
    if client_machine_id != session.client_machine_id {
        return Err(ResponseError::CmidMismatch);
    }
    if request_time != session.request_time {
        return Err(ResponseError::TimeMismatch);
    }
    Ok(BaseResponse {
        version,
        epid,
        client_machine_id,
        request_time,
        current_count,
        activation_interval,
        renewal_interval,
    })
}

/// Decodes and verifies a response to the request made with `session`.
///
/// Checks (as vlmcs): version echo (clear and inner), PIDSize <= 128 and the ePID NUL rules,
/// exact message size, PKCS#7 padding, CMID and request-time echoes; v4: the MAC; v5: response
/// IV = IVc; v6: response IV != IVc and XoredIVs = D(IVc); v5/v6: SHA-256(R) = Hash; v6: the
/// HMAC for time-slot offsets -1, 0 or +1.
pub fn decode_response(session: &Session, msg: &[u8]) -> Result<DecodedResponse, ResponseError> {
    let len = msg.len();
    let outer = ProtocolVersion::read(msg).ok_or(ResponseError::TooShort { len })?;
    if outer != session.version {
        return Err(ResponseError::VersionMismatch {
            major: outer.major,
            minor: outer.minor,
        });
    }

    if outer.major == 4 {
        let declared = msg
            .get(4..8)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or(ResponseError::TooShort { len })?;
        let p = check_pid_size(declared)?;
        let expected = expected_response_len(4, p);
        if len != expected {
            return Err(ResponseError::WrongSize { len, expected });
        }
        let base_len = BASE_RESPONSE_FIXED_LEN + p;
        let (body, mac) = msg
            .split_at_checked(base_len)
            .ok_or(ResponseError::TooShort { len })?;
        let base = parse_base_response(session, body, p)?;
        if crypto::v4_mac(body) != mac {
            return Err(ResponseError::BadMac);
        }
        return Ok(DecodedResponse {
            base,
            hwid: None,
            iv: None,
        });
    }

    let v6 = outer.major > 5;
    let cipher = crypto::cipher_for_major(outer.major);
    let iv: [u8; 16] = msg
        .get(4..CLEAR_HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(ResponseError::TooShort { len })?;
    let first: [u8; 16] = msg
        .get(CLEAR_HEADER_LEN..CLEAR_HEADER_LEN + 16)
        .and_then(|b| b.try_into().ok())
        .ok_or(ResponseError::TooShort { len })?;

    // The first plaintext block holds version and PIDSize: enough to know the exact size.
    let first_plain = xor16(&crypto::decrypt_one(cipher, &first), &iv);
    let declared = u32::from_le_bytes([
        first_plain[4],
        first_plain[5],
        first_plain[6],
        first_plain[7],
    ]);
    let p = check_pid_size(declared)?;
    let expected = expected_response_len(outer.major, p);
    if len != expected {
        return Err(ResponseError::WrongSize { len, expected });
    }

    let mut plain = msg.get(CLEAR_HEADER_LEN..).unwrap_or_default().to_vec();
    crypto::cbc_decrypt_in_place(cipher, &iv, &mut plain)
        .map_err(|_| ResponseError::WrongSize { len, expected })?;
    let body_len = crypto::pkcs7_unpadded_len(&plain).map_err(|_| ResponseError::BadPadding)?;
    // Deterministic PKCS#7: with the size right, any other pad length means bad pad bytes.
    if body_len != encrypted_body_len(outer.major, p) {
        return Err(ResponseError::BadPadding);
    }
    let body = plain.get(..body_len).unwrap_or_default();

    let base_len = BASE_RESPONSE_FIXED_LEN + p;
    let (base_bytes, trailer) = body
        .split_at_checked(base_len)
        .ok_or(ResponseError::TooShort { len })?;
    let base = parse_base_response(session, base_bytes, p)?;

    let mut r = Reader::new(trailer);
    let short = ResponseError::TooShort { len };
    let random_xored: [u8; 16] = r.array().ok_or(short.clone())?;
    let hash: [u8; 32] = r.array().ok_or(short.clone())?;

    let mut hwid = None;
    if v6 {
        let hw: [u8; 8] = r.array().ok_or(short.clone())?;
        let xored_ivs: [u8; 16] = r.array().ok_or(short.clone())?;
        let hmac: [u8; 16] = r.array().ok_or(short)?;
        if iv == session.iv_client {
            return Err(ResponseError::IvReused);
        }
        if xored_ivs != session.decrypted_iv_client {
            return Err(ResponseError::BadXoredIvs);
        }
        if crypto::sha256(&xor16(&random_xored, &session.decrypted_iv_client)) != hash {
            return Err(ResponseError::BadHash);
        }
        let s = crypto::decrypt_one(cipher, &iv);
        let mac_input = body.get(..body_len.saturating_sub(16)).unwrap_or_default();
        let ok = [-1i8, 0, 1].into_iter().any(|tolerance| {
            let key = crypto::v6_hmac_key(base.request_time, tolerance);
            crypto::v6_hmac_verify(&key, &s, mac_input, &hmac)
        });
        if !ok {
            return Err(ResponseError::BadHmac);
        }
        hwid = Some(hw);
    } else {
        if iv != session.iv_client {
            return Err(ResponseError::IvMismatch);
        }
        if crypto::sha256(&xor16(&random_xored, &session.decrypted_iv_client)) != hash {
            return Err(ResponseError::BadHash);
        }
    }

    Ok(DecodedResponse {
        base,
        hwid,
        iv: Some(iv),
    })
}

/// FILETIME helpers (100 ns ticks since 1601-01-01 UTC).
pub mod filetime {
    /// Seconds between 1601-01-01 and 1970-01-01.
    pub const UNIX_EPOCH_SECS: u64 = 11_644_473_600;

    /// FILETIME for a Unix time in milliseconds (saturating at `u64::MAX`).
    pub fn from_unix_millis(ms: u64) -> u64 {
        ms.saturating_add(UNIX_EPOCH_SECS * 1000)
            .saturating_mul(10_000)
    }

    /// Unix time in milliseconds for a FILETIME (saturating at 0 before 1970).
    pub fn to_unix_millis(ft: u64) -> u64 {
        (ft / 10_000).saturating_sub(UNIX_EPOCH_SECS * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_truncation_keeps_surrogate_pairs_whole() {
        assert_eq!(utf16_len_limited("abc", 63), 3);
        assert_eq!(utf16_len_limited("ab\0cd", 63), 2);
        let long = "y".repeat(100);
        assert_eq!(utf16_len_limited(&long, 63), 63);
        // 62 ASCII units then a surrogate pair: the pair would straddle the limit.
        let s = format!("{}\u{1F600}z", "a".repeat(62));
        assert_eq!(utf16_len_limited(&s, 63), 62);
        let s = format!("{}\u{1F600}", "a".repeat(61));
        assert_eq!(utf16_len_limited(&s, 63), 63);
    }

    #[test]
    fn epid_rules() {
        let enc =
            |units: &[u16]| -> Vec<u8> { units.iter().flat_map(|u| u.to_le_bytes()).collect() };
        assert_eq!(parse_epid(&enc(&[0x41, 0x42, 0])).unwrap(), "AB");
        assert_eq!(parse_epid(&enc(&[0x41, 0, 0])).unwrap(), "A");
        assert!(parse_epid(&enc(&[0x41, 0x42])).is_err());
        assert!(parse_epid(&enc(&[0, 0x42, 0x43, 0])).is_err());
        assert!(check_pid_size(130).is_err());
        assert!(check_pid_size(99).is_err());
        assert!(check_pid_size(2).is_err());
        assert_eq!(check_pid_size(128), Ok(128));
    }

    #[test]
    fn long_epid_is_truncated_to_pid_size_128() {
        let base = BaseRequest {
            version: ProtocolVersion { major: 6, minor: 0 },
            is_client_vm: false,
            license_status: 2,
            binding_expiration: 0,
            application_id: Uuid::nil(),
            sku_id: Uuid::nil(),
            kms_counted_id: Uuid::nil(),
            client_machine_id: Uuid::from_u128(7),
            required_client_count: 5,
            request_time: 1,
            previous_client_machine_id: Uuid::nil(),
            workstation_name: String::new(),
        };
        let (msg, session) = encode_request(&base, [3; 16]);
        let req = decode_request(&msg).unwrap();
        let resp = BaseResponse::echoing(&req.base, "9".repeat(80), 10, 120, 10080);
        let random = ResponseRandom {
            salt: [1; 16],
            iv: [2; 16],
        };
        let out = encode_response(&req, &resp, [0; 8], &random);
        assert_eq!(out.len(), expected_response_len(6, 128));
        let got = decode_response(&session, &out).unwrap();
        assert_eq!(got.base.epid, "9".repeat(63));
    }

    #[test]
    fn filetime_conversions_saturate() {
        assert_eq!(filetime::from_unix_millis(0), 116_444_736_000_000_000);
        assert_eq!(filetime::to_unix_millis(116_444_736_000_000_000), 0);
        assert_eq!(filetime::to_unix_millis(0), 0);
        assert_eq!(filetime::from_unix_millis(u64::MAX), u64::MAX);
        let ms = 1_795_000_000_123;
        assert_eq!(filetime::to_unix_millis(filetime::from_unix_millis(ms)), ms);
    }
}
