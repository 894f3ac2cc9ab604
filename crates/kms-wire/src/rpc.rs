//! DCE/RPC connection-oriented PDUs used by KMS (protocol sheet section 2).
//!
//! [`parse`] turns one complete PDU (exactly `frag_length` bytes) into a [`Pdu`]; [`encode`]
//! does the reverse. Only what KMS needs is supported: single-fragment, unauthenticated,
//! little-endian PDUs of types BIND, BIND_ACK, ALTER_CONTEXT, ALTER_CONTEXT_RESP, REQUEST,
//! RESPONSE and FAULT.

use uuid::Uuid;

/// Why a PDU is rejected at the framing level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported RPC version {0}.{1}")]
    Version(u8, u8),
    #[error("unsupported data representation")]
    DataRepresentation,
    #[error("frag_length {0} is invalid")]
    FragLength(usize),
    #[error("PDU of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("multi-fragment PDUs are not supported")]
    Fragmented,
    #[error("authentication data is not supported")]
    Authenticated,
    #[error("PDU type {0} is not supported")]
    UnknownType(u8),
    #[error("{0} PDU is truncated or malformed")]
    Malformed(&'static str),
    #[error("frag_length says {frag_length} bytes but the PDU has {actual}")]
    LengthMismatch { frag_length: usize, actual: usize },
}

/// Length of the common header.
pub const HEADER_LEN: usize = 16;
/// Largest PDU a 16-bit `frag_length` can describe.
pub const MAX_FRAG_LENGTH: usize = u16::MAX as usize;
/// `max_xmit_frag` / `max_recv_frag` both reference clients send.
pub const CLIENT_MAX_FRAG: u16 = 5840;
/// `packed_drep`: little-endian integers, ASCII characters, IEEE floats.
pub const DREP_LE: [u8; 4] = [0x10, 0, 0, 0];

/// PTYPE values (sheet 2.2).
pub mod ptype {
    pub const REQUEST: u8 = 0;
    pub const RESPONSE: u8 = 2;
    pub const FAULT: u8 = 3;
    pub const BIND: u8 = 11;
    pub const BIND_ACK: u8 = 12;
    pub const BIND_NAK: u8 = 13;
    pub const ALTER_CONTEXT: u8 = 14;
    pub const ALTER_CONTEXT_RESP: u8 = 15;
}

/// `pfc_flags` bits (sheet 2.2).
pub mod pfc {
    pub const FIRST_FRAG: u8 = 0x01;
    pub const LAST_FRAG: u8 = 0x02;
    /// PFC_PENDING_CANCEL (PFC_SUPPORT_HEADER_SIGN in bind PDUs).
    pub const PENDING_CANCEL: u8 = 0x04;
    pub const RESERVED_1: u8 = 0x08;
    /// PFC_CONC_MPX ("multiplex").
    pub const CONC_MPX: u8 = 0x10;
    pub const DID_NOT_EXECUTE: u8 = 0x20;
    pub const MAYBE: u8 = 0x40;
    /// A 16-byte object UUID follows the opnum of a REQUEST.
    pub const OBJECT_UUID: u8 = 0x80;
    /// Both fragment bits: every KMS PDU is a single fragment.
    pub const SINGLE_FRAG: u8 = FIRST_FRAG | LAST_FRAG;
}

/// `p_result_t` values of a bind result element.
pub mod ack {
    pub const ACCEPTANCE: u16 = 0;
    pub const USER_REJECTION: u16 = 1;
    pub const PROVIDER_REJECTION: u16 = 2;
    /// Answer to a bind-time feature negotiation element.
    pub const NEGOTIATE_ACK: u16 = 3;
    /// Rejection reason: abstract syntax (interface) not supported.
    pub const REASON_ABSTRACT_SYNTAX: u16 = 1;
    /// Rejection reason: proposed transfer syntaxes not supported.
    pub const REASON_TRANSFER_SYNTAXES: u16 = 2;
}

/// Fault status for stub data that cannot be unmarshalled (`nca_s_fault_ndr`,
/// `RPC_X_BAD_STUB_DATA`), what an RPC runtime answers to a truncated or inconsistent stub.
pub const NCA_S_FAULT_NDR: u32 = 0x0000_06F7;

/// An interface or transfer syntax identifier (GUID + version).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyntaxId {
    pub uuid: Uuid,
    /// For an interface: major in the low 16 bits, minor in the high 16 bits (as on the wire).
    pub version: u32,
}

impl SyntaxId {
    /// The all-zero syntax of rejected and BTFN result elements.
    pub const NULL: SyntaxId = SyntaxId {
        uuid: Uuid::nil(),
        version: 0,
    };
}

/// The KMS interface `51c82175-844e-4750-b0d8-ec255555bc06` version 1.0.
pub const KMS_INTERFACE: SyntaxId = SyntaxId {
    uuid: Uuid::from_u128(0x51c82175_844e_4750_b0d8_ec255555bc06),
    version: 1,
};
/// NDR32 transfer syntax `8a885d04-1ceb-11c9-9fe8-08002b104860` version 2.
pub const NDR32: SyntaxId = SyntaxId {
    uuid: Uuid::from_u128(0x8a885d04_1ceb_11c9_9fe8_08002b104860),
    version: 2,
};
/// NDR64 transfer syntax `71710533-beba-4937-8319-b5dbef9ccc36` version 1.
pub const NDR64: SyntaxId = SyntaxId {
    uuid: Uuid::from_u128(0x71710533_beba_4937_8319_b5dbef9ccc36),
    version: 1,
};
/// First 8 wire bytes of the bind-time feature negotiation "syntax" `6cb71c2c-9812-4540-…`.
pub const BTFN_PREFIX: [u8; 8] = [0x2c, 0x1c, 0xb7, 0x6c, 0x12, 0x98, 0x40, 0x45];
/// BTFN feature bits: security context multiplexing | keep connection on orphan.
pub const BTFN_FEATURES: u16 = 0x0003;

/// The BTFN pseudo transfer syntax requesting `features` (wire bytes 8..9), version 1.
pub fn btfn_syntax(features: u16) -> SyntaxId {
    let mut wire = [0u8; 16];
    wire[..8].copy_from_slice(&BTFN_PREFIX);
    wire[8..10].copy_from_slice(&features.to_le_bytes());
    SyntaxId {
        uuid: Uuid::from_bytes_le(wire),
        version: 1,
    }
}

/// If `syntax` is a BTFN element (matched on its first 8 wire bytes only), the requested
/// feature bitmask.
pub fn btfn_features(syntax: &SyntaxId) -> Option<u16> {
    let wire = syntax.uuid.to_bytes_le();
    (wire[..8] == BTFN_PREFIX).then(|| u16::from_le_bytes([wire[8], wire[9]]))
}

/// The common 16-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub rpc_vers: u8,
    pub rpc_vers_minor: u8,
    pub ptype: u8,
    pub flags: u8,
    pub drep: [u8; 4],
    pub frag_length: u16,
    pub auth_length: u16,
    pub call_id: u32,
}

impl Header {
    /// Reads the 16 header bytes without judging them. `None` if fewer than 16 bytes.
    pub fn read(bytes: &[u8]) -> Option<Header> {
        let h = bytes.get(..HEADER_LEN)?;
        Some(Header {
            rpc_vers: h[0],
            rpc_vers_minor: h[1],
            ptype: h[2],
            flags: h[3],
            drep: [h[4], h[5], h[6], h[7]],
            frag_length: u16::from_le_bytes([h[8], h[9]]),
            auth_length: u16::from_le_bytes([h[10], h[11]]),
            call_id: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        })
    }

    /// Checks what every KMS PDU must satisfy: version 5.0, little-endian ASCII IEEE data
    /// representation, a single fragment, no authentication trailer, `frag_length` at least a
    /// header.
    ///
    /// Only the first two drep bytes carry meaning; the two reserved ones are not checked.
    pub fn check(&self) -> Result<(), FrameError> {
        if self.rpc_vers != 5 || self.rpc_vers_minor != 0 {
            return Err(FrameError::Version(self.rpc_vers, self.rpc_vers_minor));
        }
        if self.drep[0] != DREP_LE[0] || self.drep[1] != DREP_LE[1] {
            return Err(FrameError::DataRepresentation);
        }
        if usize::from(self.frag_length) < HEADER_LEN {
            return Err(FrameError::FragLength(self.frag_length.into()));
        }
        if self.flags & pfc::SINGLE_FRAG != pfc::SINGLE_FRAG {
            return Err(FrameError::Fragmented);
        }
        if self.auth_length != 0 {
            return Err(FrameError::Authenticated);
        }
        Ok(())
    }
}

/// One presentation context element of a BIND / ALTER_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextElement {
    pub context_id: u16,
    pub abstract_syntax: SyntaxId,
    pub transfer_syntaxes: Vec<SyntaxId>,
}

/// Body of a BIND or ALTER_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub max_xmit_frag: u16,
    pub max_recv_frag: u16,
    pub assoc_group_id: u32,
    pub contexts: Vec<ContextElement>,
}

/// One result element of a BIND_ACK / ALTER_CONTEXT_RESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextResult {
    /// See [`ack`].
    pub result: u16,
    /// Rejection reason, BTFN feature mask, or 0 on acceptance.
    pub reason: u16,
    pub transfer_syntax: SyntaxId,
}

/// Body of a BIND_ACK or ALTER_CONTEXT_RESP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindAck {
    pub max_xmit_frag: u16,
    pub max_recv_frag: u16,
    pub assoc_group_id: u32,
    /// Secondary address as on the wire, including its NUL (empty in ALTER_CONTEXT_RESP).
    pub secondary_address: Vec<u8>,
    pub results: Vec<ContextResult>,
}

impl BindAck {
    /// Secondary address `"<port>\0"` for a TCP port.
    pub fn port_address(port: u16) -> Vec<u8> {
        let mut v = port.to_string().into_bytes();
        v.push(0);
        v
    }
}

/// Body of a REQUEST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub alloc_hint: u32,
    pub context_id: u16,
    pub opnum: u16,
    /// Present when PFC_OBJECT_UUID is set.
    pub object: Option<Uuid>,
    pub stub: &'a [u8],
}

/// Body of a RESPONSE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub alloc_hint: u32,
    pub context_id: u16,
    pub cancel_count: u8,
    pub stub: &'a [u8],
}

/// Body of a FAULT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub alloc_hint: u32,
    pub context_id: u16,
    pub cancel_count: u8,
    pub status: u32,
}

/// A PDU body, by type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    Bind(Bind),
    AlterContext(Bind),
    BindAck(BindAck),
    AlterContextResp(BindAck),
    Request(Request<'a>),
    Response(Response<'a>),
    Fault(Fault),
}

impl Body<'_> {
    /// The PTYPE of this body.
    pub fn ptype(&self) -> u8 {
        match self {
            Body::Bind(_) => ptype::BIND,
            Body::AlterContext(_) => ptype::ALTER_CONTEXT,
            Body::BindAck(_) => ptype::BIND_ACK,
            Body::AlterContextResp(_) => ptype::ALTER_CONTEXT_RESP,
            Body::Request(_) => ptype::REQUEST,
            Body::Response(_) => ptype::RESPONSE,
            Body::Fault(_) => ptype::FAULT,
        }
    }
}

/// A parsed PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu<'a> {
    pub header: Header,
    pub body: Body<'a>,
}

/// Bounds-checked little-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Self { buf, pos }
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }
    fn syntax(&mut self) -> Option<SyntaxId> {
        let uuid = Uuid::from_bytes_le(self.array()?);
        Some(SyntaxId {
            uuid,
            version: self.u32()?,
        })
    }
    fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }
}

/// Parses one complete PDU. `pdu.len()` must equal `frag_length`.
pub fn parse(pdu: &[u8]) -> Result<Pdu<'_>, FrameError> {
    let header = Header::read(pdu).ok_or(FrameError::FragLength(pdu.len()))?;
    header.check()?;
    if usize::from(header.frag_length) != pdu.len() {
        return Err(FrameError::LengthMismatch {
            frag_length: header.frag_length.into(),
            actual: pdu.len(),
        });
    }
    let body = match header.ptype {
        ptype::BIND => Body::Bind(parse_bind(pdu).ok_or(FrameError::Malformed("BIND"))?),
        ptype::ALTER_CONTEXT => {
            Body::AlterContext(parse_bind(pdu).ok_or(FrameError::Malformed("ALTER_CONTEXT"))?)
        }
        ptype::BIND_ACK => {
            Body::BindAck(parse_bind_ack(pdu).ok_or(FrameError::Malformed("BIND_ACK"))?)
        }
        ptype::ALTER_CONTEXT_RESP => Body::AlterContextResp(
            parse_bind_ack(pdu).ok_or(FrameError::Malformed("ALTER_CONTEXT_RESP"))?,
        ),
        ptype::REQUEST => {
            Body::Request(parse_request(pdu, header.flags).ok_or(FrameError::Malformed("REQUEST"))?)
        }
        ptype::RESPONSE => {
            Body::Response(parse_response(pdu).ok_or(FrameError::Malformed("RESPONSE"))?)
        }
        ptype::FAULT => Body::Fault(parse_fault(pdu).ok_or(FrameError::Malformed("FAULT"))?),
        other => return Err(FrameError::UnknownType(other)),
    };
    Ok(Pdu { header, body })
}

fn parse_bind(pdu: &[u8]) -> Option<Bind> {
    let mut r = Reader::new(pdu, HEADER_LEN);
    let max_xmit_frag = r.u16()?;
    let max_recv_frag = r.u16()?;
    let assoc_group_id = r.u32()?;
    let n = r.u8()?;
    r.bytes(3)?; // reserved
    let mut contexts = Vec::new();
    for _ in 0..n {
        let context_id = r.u16()?;
        let n_syn = r.u8()?;
        r.u8()?; // reserved
        let abstract_syntax = r.syntax()?;
        let mut transfer_syntaxes = Vec::new();
        for _ in 0..n_syn {
            // Each syntax is read before it is stored, so a count larger than the body
            // fails here without allocating for it.
            transfer_syntaxes.push(r.syntax()?);
        }
        contexts.push(ContextElement {
            context_id,
            abstract_syntax,
            transfer_syntaxes,
        });
    }
    // Trailing bytes after the last element are tolerated (vlmcsd does too).
    Some(Bind {
        max_xmit_frag,
        max_recv_frag,
        assoc_group_id,
        contexts,
    })
}

/// Offset of `n_results`: after the secondary address, aligned to 4 from the PDU start.
fn results_offset(sec_addr_len: usize) -> usize {
    let end = 26 + sec_addr_len;
    end + crate::ndr::pad4(end)
}

fn parse_bind_ack(pdu: &[u8]) -> Option<BindAck> {
    let mut r = Reader::new(pdu, HEADER_LEN);
    let max_xmit_frag = r.u16()?;
    let max_recv_frag = r.u16()?;
    let assoc_group_id = r.u32()?;
    let len = usize::from(r.u16()?);
    let secondary_address = r.bytes(len)?.to_vec();
    let mut r = Reader::new(pdu, results_offset(len));
    let n = r.u8()?;
    r.bytes(3)?;
    let mut results = Vec::new();
    for _ in 0..n {
        let result = r.u16()?;
        let reason = r.u16()?;
        let transfer_syntax = r.syntax()?;
        results.push(ContextResult {
            result,
            reason,
            transfer_syntax,
        });
    }
    Some(BindAck {
        max_xmit_frag,
        max_recv_frag,
        assoc_group_id,
        secondary_address,
        results,
    })
}

fn parse_request(pdu: &[u8], flags: u8) -> Option<Request<'_>> {
    let mut r = Reader::new(pdu, HEADER_LEN);
    let alloc_hint = r.u32()?;
    let context_id = r.u16()?;
    let opnum = r.u16()?;
    let object = if flags & pfc::OBJECT_UUID != 0 {
        Some(Uuid::from_bytes_le(r.array()?))
    } else {
        None
    };
    Some(Request {
        alloc_hint,
        context_id,
        opnum,
        object,
        stub: r.rest(),
    })
}

fn parse_response(pdu: &[u8]) -> Option<Response<'_>> {
    let mut r = Reader::new(pdu, HEADER_LEN);
    let alloc_hint = r.u32()?;
    let context_id = r.u16()?;
    let cancel_count = r.u8()?;
    r.u8()?;
    Some(Response {
        alloc_hint,
        context_id,
        cancel_count,
        stub: r.rest(),
    })
}

fn parse_fault(pdu: &[u8]) -> Option<Fault> {
    let mut r = Reader::new(pdu, HEADER_LEN);
    let alloc_hint = r.u32()?;
    let context_id = r.u16()?;
    let cancel_count = r.u8()?;
    r.u8()?;
    let status = r.u32()?;
    Some(Fault {
        alloc_hint,
        context_id,
        cancel_count,
        status,
    })
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_syntax(out: &mut Vec<u8>, s: &SyntaxId) {
    out.extend_from_slice(&s.uuid.to_bytes_le());
    put_u32(out, s.version);
}

/// Builds a PDU: version 5.0, drep `10 00 00 00`, no auth, `frag_length` computed.
/// Fails if the PDU would exceed 65535 bytes or a count does not fit its 8-bit field.
pub fn encode(flags: u8, call_id: u32, body: &Body<'_>) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&[5, 0, body.ptype(), flags]);
    out.extend_from_slice(&DREP_LE);
    put_u16(&mut out, 0); // frag_length, patched below
    put_u16(&mut out, 0); // auth_length
    put_u32(&mut out, call_id);
    match body {
        Body::Bind(b) | Body::AlterContext(b) => {
            put_u16(&mut out, b.max_xmit_frag);
            put_u16(&mut out, b.max_recv_frag);
            put_u32(&mut out, b.assoc_group_id);
            let n = u8::try_from(b.contexts.len())
                .map_err(|_| FrameError::Malformed("too many context elements"))?;
            out.extend_from_slice(&[n, 0, 0, 0]);
            for c in &b.contexts {
                let k = u8::try_from(c.transfer_syntaxes.len())
                    .map_err(|_| FrameError::Malformed("too many transfer syntaxes"))?;
                put_u16(&mut out, c.context_id);
                out.extend_from_slice(&[k, 0]);
                put_syntax(&mut out, &c.abstract_syntax);
                for s in &c.transfer_syntaxes {
                    put_syntax(&mut out, s);
                }
            }
        }
        Body::BindAck(a) | Body::AlterContextResp(a) => {
            put_u16(&mut out, a.max_xmit_frag);
            put_u16(&mut out, a.max_recv_frag);
            put_u32(&mut out, a.assoc_group_id);
            let len = u16::try_from(a.secondary_address.len())
                .map_err(|_| FrameError::Malformed("secondary address too long"))?;
            put_u16(&mut out, len);
            out.extend_from_slice(&a.secondary_address);
            // Pad bytes are zero (vlmcsd leaves stale bytes; their content is not significant).
            out.resize(results_offset(a.secondary_address.len()), 0);
            let n = u8::try_from(a.results.len())
                .map_err(|_| FrameError::Malformed("too many results"))?;
            out.extend_from_slice(&[n, 0, 0, 0]);
            for res in &a.results {
                put_u16(&mut out, res.result);
                put_u16(&mut out, res.reason);
                put_syntax(&mut out, &res.transfer_syntax);
            }
        }
        Body::Request(q) => {
            put_u32(&mut out, q.alloc_hint);
            put_u16(&mut out, q.context_id);
            put_u16(&mut out, q.opnum);
            if let Some(obj) = q.object {
                out.extend_from_slice(&obj.to_bytes_le());
            }
            out.extend_from_slice(q.stub);
        }
        Body::Response(p) => {
            put_u32(&mut out, p.alloc_hint);
            put_u16(&mut out, p.context_id);
            out.extend_from_slice(&[p.cancel_count, 0]);
            out.extend_from_slice(p.stub);
        }
        Body::Fault(f) => {
            put_u32(&mut out, f.alloc_hint);
            put_u16(&mut out, f.context_id);
            out.extend_from_slice(&[f.cancel_count, 0]);
            put_u32(&mut out, f.status);
            put_u32(&mut out, 0); // reserved
        }
    }
    let len = u16::try_from(out.len()).map_err(|_| FrameError::TooLarge {
        len: out.len(),
        max: MAX_FRAG_LENGTH,
    })?;
    out[8..10].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_wire_bytes() {
        assert_eq!(
            KMS_INTERFACE.uuid.to_bytes_le(),
            [
                0x75, 0x21, 0xc8, 0x51, 0x4e, 0x84, 0x50, 0x47, 0xb0, 0xd8, 0xec, 0x25, 0x55, 0x55,
                0xbc, 0x06
            ]
        );
        assert_eq!(
            NDR32.uuid.to_bytes_le(),
            [
                0x04, 0x5d, 0x88, 0x8a, 0xeb, 0x1c, 0xc9, 0x11, 0x9f, 0xe8, 0x08, 0x00, 0x2b, 0x10,
                0x48, 0x60
            ]
        );
        assert_eq!(
            NDR64.uuid.to_bytes_le(),
            [
                0x33, 0x05, 0x71, 0x71, 0xba, 0xbe, 0x37, 0x49, 0x83, 0x19, 0xb5, 0xdb, 0xef, 0x9c,
                0xcc, 0x36
            ]
        );
        let b = btfn_syntax(3);
        assert_eq!(
            b.uuid.to_bytes_le()[..10],
            [0x2c, 0x1c, 0xb7, 0x6c, 0x12, 0x98, 0x40, 0x45, 3, 0]
        );
        assert_eq!(btfn_features(&b), Some(3));
        assert_eq!(btfn_features(&NDR32), None);
    }

    #[test]
    fn results_offset_alignment() {
        assert_eq!(results_offset(0), 28);
        assert_eq!(results_offset(5), 32);
        assert_eq!(results_offset(6), 32);
        assert_eq!(results_offset(2), 28);
        assert_eq!(results_offset(3), 32);
    }

    #[test]
    fn fault_roundtrip() {
        let f = Fault {
            alloc_hint: 32,
            context_id: 0,
            cancel_count: 0,
            status: 0x1C01_0003,
        };
        let bytes = encode(0x23, 9, &Body::Fault(f)).unwrap();
        assert_eq!(bytes.len(), 32);
        let p = parse(&bytes).unwrap();
        assert_eq!(p.header.call_id, 9);
        assert_eq!(p.body, Body::Fault(f));
    }
}
