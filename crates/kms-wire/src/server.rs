//! Server side of one DCE/RPC connection (protocol sheet 2.5, 2.6, 2.9), sans-IO.
//!
//! The I/O shell reads a 16-byte header, asks [`pdu_length`] how many bytes the PDU has, reads
//! the rest, and hands the whole PDU to [`ServerConnection::handle_pdu`]. For an activation it
//! runs the KMS logic and builds the reply with [`ServerConnection::respond`].
//!
//! Choices where the references leave room (all verified against the vlmcsd captures):
//! * BIND_ACK: flags = copy of the BIND's flags byte; max_xmit/max_recv copied; the
//!   secondary address is `"<local port>\0"`, padded with zeros to a 4-byte boundary counted
//!   from the PDU start. ALTER_CONTEXT_RESP: flags `0x03`, secondary address length 0.
//!   Both carry the association group id given to [`ServerConnection::new`].
//! * Negotiation is vlmcsd's (sheet 2.5), context ids are the client's; an ALTER_CONTEXT
//!   without NDR64 keeps the NDR64 context id of the BIND.
//! * RESPONSE: the REQUEST's call id, context id and flags without PFC_CONC_MPX /
//!   PFC_OBJECT_UUID; `alloc_hint` = exact stub length; cancel count 0.
//! * FAULT: flags `0x23`, `alloc_hint` 32 and context id 0 like vlmcsd, but the request's
//!   call id (vlmcsd always sends 2). Status `nca_unk_if` for an unbound context id (or no
//!   BIND yet), `nca_op_rng_error` for opnum ≠ 0 (vlmcsd ignores opnum; every client sends 0),
//!   `nca_s_fault_ndr` (0x6F7) for a request stub shorter than its size fields or whose size
//!   and max count differ (see [`crate::ndr::unwrap_request`]).
//! * Close: anything wrong at the framing level (version, drep, fragment bits, auth trailer,
//!   frag_length below 16, above `max_pdu_len` or different from the slice length), a
//!   BIND / ALTER_CONTEXT / REQUEST whose fixed fields or counted elements run past the end,
//!   and every other PDU type.

use crate::ndr;
use crate::rpc::{self, ack, pfc, Body, ContextResult, FrameError, SyntaxId};

pub use crate::ndr::TransferSyntax;

/// Length of the common DCE/RPC header.
pub const HEADER_LEN: usize = 16;

/// What the server offers in bind negotiation and how large a PDU it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Accept NDR64 (and reject NDR32 when both are offered, like a modern genuine host).
    pub ndr64: bool,
    /// Answer bind-time feature negotiation.
    pub btfn: bool,
    /// Largest PDU (frag_length) accepted; larger ones close the connection.
    pub max_pdu_len: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            ndr64: true,
            btfn: true,
            max_pdu_len: 4096,
        }
    }
}

/// Validates a PDU header (version 5.0, little-endian drep, single fragment, sane length)
/// and returns the PDU's total length.
///
/// The PDU type is not judged here: [`ServerConnection::handle_pdu`] closes on unknown types.
pub fn pdu_length(header: &[u8; HEADER_LEN], max_pdu_len: usize) -> Result<usize, FrameError> {
    let h = rpc::Header::read(header).ok_or(FrameError::FragLength(0))?;
    h.check()?;
    let len = usize::from(h.frag_length);
    if len > max_pdu_len {
        return Err(FrameError::TooLarge {
            len,
            max: max_pdu_len,
        });
    }
    Ok(len)
}

/// One `RequestActivation` call waiting for the KMS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivationCall {
    pub call_id: u32,
    pub context_id: u16,
    pub syntax: TransferSyntax,
    /// pfc_flags of the REQUEST (copied into the RESPONSE).
    pub flags: u8,
    /// The KMS request message taken out of the NDR stub.
    pub kms_message: Vec<u8>,
}

/// What the I/O shell must do after a PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAction {
    /// Send these bytes (BIND_ACK, ALTER_CONTEXT_RESP or FAULT) and keep reading.
    Send(Vec<u8>),
    /// Run the KMS logic for this call, then send [`ServerConnection::respond`]'s bytes.
    Activate(ActivationCall),
    /// Close the connection without answering (unknown PDU type, malformed PDU).
    Close(FrameError),
}

/// `alloc_hint` of our FAULT PDUs. vlmcsd (and, per its authors, Windows) write 32 although no
/// stub follows; DCE would allow 0. Clients ignore it.
pub const FAULT_ALLOC_HINT: u32 = 32;

/// Per-connection negotiation state.
///
/// Context ids are the ones the client chose in its BIND / ALTER_CONTEXT (sheet 2.5 step 1).
#[derive(Debug)]
pub struct ServerConnection {
    config: ServerConfig,
    local_port: u16,
    assoc_group_id: u32,
    ctx_ndr32: Option<u16>,
    ctx_ndr64: Option<u16>,
}

/// How one context element is answered.
enum Answer {
    Accept(SyntaxId),
    Btfn(u16),
    Reject(u16),
}

impl ServerConnection {
    /// `local_port` goes into the BIND_ACK secondary address; `assoc_group_id` is a value the
    /// caller draws at random per connection.
    pub fn new(config: ServerConfig, local_port: u16, assoc_group_id: u32) -> Self {
        Self {
            config,
            local_port,
            assoc_group_id,
            ctx_ndr32: None,
            ctx_ndr64: None,
        }
    }

    /// Context id currently bound to NDR32, if any.
    pub fn ndr32_context(&self) -> Option<u16> {
        self.ctx_ndr32
    }

    /// Context id currently bound to NDR64, if any.
    pub fn ndr64_context(&self) -> Option<u16> {
        self.ctx_ndr64
    }

    /// Handles one complete PDU (exactly `frag_length` bytes).
    ///
    /// * BIND / ALTER_CONTEXT: negotiation as vlmcsd does it (sheet 2.5) → `Send`.
    /// * REQUEST on a context id that is not bound (or before any BIND) → FAULT `nca_unk_if`;
    ///   opnum ≠ 0 → FAULT `nca_op_rng_error`; a stub that cannot be unmarshalled (shorter than
    ///   its size fields, or size ≠ max count) → FAULT `nca_s_fault_ndr`; otherwise `Activate`.
    /// * Anything malformed at the framing level, or another PDU type → `Close`.
    pub fn handle_pdu(&mut self, pdu: &[u8]) -> ServerAction {
        if pdu.len() > self.config.max_pdu_len {
            return ServerAction::Close(FrameError::TooLarge {
                len: pdu.len(),
                max: self.config.max_pdu_len,
            });
        }
        let parsed = match rpc::parse(pdu) {
            Ok(p) => p,
            Err(e) => return ServerAction::Close(e),
        };
        let h = parsed.header;
        match parsed.body {
            Body::Bind(b) => self.negotiate(h.flags, h.call_id, &b, false),
            Body::AlterContext(b) => self.negotiate(h.flags, h.call_id, &b, true),
            Body::Request(r) => self.request(h.flags, h.call_id, &r),
            // Server-to-client PDUs coming from a client: not something we answer.
            other => ServerAction::Close(FrameError::UnknownType(other.ptype())),
        }
    }

    fn negotiate(
        &mut self,
        flags: u8,
        call_id: u32,
        bind: &rpc::Bind,
        alter: bool,
    ) -> ServerAction {
        let cfg = self.config;
        // First pass (vlmcsd): remember the context ids of NDR32 / NDR64 elements. Like vlmcsd
        // this looks at the transfer syntax only, and an element without NDR64 leaves the
        // NDR64 id from an earlier BIND alone.
        let mut ndr64_possible = false;
        for c in &bind.contexts {
            for s in &c.transfer_syntaxes {
                if s.uuid == rpc::NDR32.uuid {
                    self.ctx_ndr32 = Some(c.context_id);
                }
                if cfg.ndr64 && s.uuid == rpc::NDR64.uuid {
                    ndr64_possible = true;
                    self.ctx_ndr64 = Some(c.context_id);
                }
            }
        }
        // Second pass: one result per element, in order.
        let results = bind
            .contexts
            .iter()
            .map(|c| {
                let kms = c.abstract_syntax.uuid == rpc::KMS_INTERFACE.uuid;
                // With several transfer syntaxes in one element (no real client sends that) the
                // first one that is accepted wins; otherwise the first rejection reason is used.
                let mut answer = None;
                for s in &c.transfer_syntaxes {
                    match answer_syntax(cfg, kms, ndr64_possible, s) {
                        Answer::Reject(reason) => {
                            answer.get_or_insert(Answer::Reject(reason));
                        }
                        good => {
                            answer = Some(good);
                            break;
                        }
                    }
                }
                let reason_none = if kms {
                    ack::REASON_TRANSFER_SYNTAXES
                } else {
                    ack::REASON_ABSTRACT_SYNTAX
                };
                match answer.unwrap_or(Answer::Reject(reason_none)) {
                    Answer::Accept(s) => ContextResult {
                        result: ack::ACCEPTANCE,
                        reason: 0,
                        transfer_syntax: s,
                    },
                    Answer::Btfn(bits) => ContextResult {
                        result: ack::NEGOTIATE_ACK,
                        reason: bits,
                        transfer_syntax: SyntaxId::NULL,
                    },
                    Answer::Reject(reason) => ContextResult {
                        result: ack::PROVIDER_REJECTION,
                        reason,
                        transfer_syntax: SyntaxId::NULL,
                    },
                }
            })
            .collect();
        let reply = rpc::BindAck {
            max_xmit_frag: bind.max_xmit_frag,
            max_recv_frag: bind.max_recv_frag,
            assoc_group_id: self.assoc_group_id,
            secondary_address: if alter {
                Vec::new()
            } else {
                rpc::BindAck::port_address(self.local_port)
            },
            results,
        };
        // BIND_ACK copies the BIND's flags byte (vlmcs checks the multiplex bit matches);
        // ALTER_CONTEXT_RESP always carries plain FIRST|LAST.
        let (body, out_flags) = if alter {
            (Body::AlterContextResp(reply), pfc::SINGLE_FRAG)
        } else {
            (Body::BindAck(reply), flags)
        };
        match rpc::encode(out_flags, call_id, &body) {
            Ok(bytes) => ServerAction::Send(bytes),
            // Unreachable for a parsed BIND (its counts fit in u8 and it was <= 64 KiB long,
            // a BIND_ACK is shorter), but never panic.
            Err(e) => ServerAction::Close(e),
        }
    }

    fn request(&self, flags: u8, call_id: u32, req: &rpc::Request<'_>) -> ServerAction {
        // NDR32 is checked first, as vlmcsd does.
        let syntax = if Some(req.context_id) == self.ctx_ndr32 {
            TransferSyntax::Ndr32
        } else if Some(req.context_id) == self.ctx_ndr64 {
            TransferSyntax::Ndr64
        } else {
            return self.fault(call_id, crate::hresult::NCA_UNK_IF);
        };
        // vlmcsd ignores opnum; every real client sends 0, the only operation.
        if req.opnum != 0 {
            return self.fault(call_id, crate::hresult::NCA_OP_RNG_ERROR);
        }
        match ndr::unwrap_request(syntax, req.stub) {
            Ok(msg) => ServerAction::Activate(ActivationCall {
                call_id,
                context_id: req.context_id,
                syntax,
                flags,
                kms_message: msg.to_vec(),
            }),
            Err(_) => self.fault(call_id, rpc::NCA_S_FAULT_NDR),
        }
    }

    /// FAULT PDU: flags FIRST|LAST|DID_NOT_EXECUTE, the request's call id (vlmcsd always sends
    /// 2, a bug), context id 0 and alloc_hint 32 as vlmcsd, cancel count 0.
    fn fault(&self, call_id: u32, status: u32) -> ServerAction {
        let body = Body::Fault(rpc::Fault {
            alloc_hint: FAULT_ALLOC_HINT,
            context_id: 0,
            cancel_count: 0,
            status,
        });
        match rpc::encode(pfc::SINGLE_FRAG | pfc::DID_NOT_EXECUTE, call_id, &body) {
            Ok(bytes) => ServerAction::Send(bytes),
            Err(e) => ServerAction::Close(e),
        }
    }

    /// Builds the RESPONSE PDU for `call`: a success stub carrying `Ok(kms_response)` or an
    /// error stub carrying `Err(hresult)`.
    ///
    /// The header is the REQUEST's (call id, flags) with PTYPE 2, except that PFC_CONC_MPX and
    /// PFC_OBJECT_UUID are never copied. `alloc_hint` is the exact stub length. A KMS response
    /// too large for one PDU (impossible for real KMS messages, which are < 400 bytes) is
    /// replaced by an error stub carrying `0x8007000D`.
    pub fn respond(&self, call: &ActivationCall, result: Result<&[u8], u32>) -> Vec<u8> {
        let flags = call.flags & !(pfc::CONC_MPX | pfc::OBJECT_UUID);
        let build = |stub: &[u8]| {
            let body = Body::Response(rpc::Response {
                alloc_hint: u32::try_from(stub.len()).unwrap_or(u32::MAX),
                context_id: call.context_id,
                cancel_count: 0,
                stub,
            });
            rpc::encode(flags, call.call_id, &body)
        };
        let success = match result {
            Ok(msg) => ndr::wrap_response(call.syntax, msg)
                .ok()
                .and_then(|stub| build(&stub).ok()),
            Err(_) => None,
        };
        let hr = result.err().unwrap_or(crate::hresult::INVALID_DATA);
        // An error stub is 36/44 bytes and always encodes; the default is only for the type.
        success
            .or_else(|| build(&ndr::wrap_error(call.syntax, hr)).ok())
            .unwrap_or_default()
    }
}

/// vlmcsd's per-syntax decision (sheet 2.5, step 2).
fn answer_syntax(cfg: ServerConfig, kms: bool, ndr64_possible: bool, s: &SyntaxId) -> Answer {
    // vlmcsd compares GUIDs only; the syntax version is not checked.
    if s.uuid == rpc::NDR32.uuid {
        if kms && !ndr64_possible {
            return Answer::Accept(rpc::NDR32);
        }
    } else if s.uuid == rpc::NDR64.uuid {
        if kms && ndr64_possible {
            return Answer::Accept(rpc::NDR64);
        }
        if !cfg.ndr64 {
            return Answer::Reject(ack::REASON_TRANSFER_SYNTAXES);
        }
    } else if let Some(bits) = rpc::btfn_features(s) {
        // vlmcsd answers BTFN even for a foreign interface.
        if cfg.btfn {
            return Answer::Btfn(bits & rpc::BTFN_FEATURES);
        }
        return Answer::Reject(ack::REASON_TRANSFER_SYNTAXES);
    }
    Answer::Reject(if kms {
        ack::REASON_TRANSFER_SYNTAXES
    } else {
        ack::REASON_ABSTRACT_SYNTAX
    })
}
