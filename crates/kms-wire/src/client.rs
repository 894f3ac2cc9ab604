//! Client side of one DCE/RPC connection, sans-IO: what `vlmcs` does, including its checks.

use crate::ndr::{self, TransferSyntax};
use crate::rpc::{self, ack, pfc, Body, ContextElement, FrameError, SyntaxId};

/// Which presentation contexts the BIND offers (vlmcs defaults: all true).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindOptions {
    pub ndr64: bool,
    pub btfn: bool,
    /// Set PFC_CONC_MPX in the BIND (`vlmcs -p` clears it).
    pub multiplex: bool,
}

impl Default for BindOptions {
    fn default() -> Self {
        Self {
            ndr64: true,
            btfn: true,
            multiplex: true,
        }
    }
}

/// Why the client gives up on a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("malformed PDU: {0}")]
    Frame(#[from] FrameError),
    #[error("unexpected PDU type {0}")]
    UnexpectedType(u8),
    #[error("call id {got} does not match {expected}")]
    CallIdMismatch { expected: u32, got: u32 },
    #[error("the server accepted no usable transfer syntax")]
    NoTransferSyntax,
    #[error("bind negotiation answer is invalid: {0}")]
    BadBindAck(String),
    #[error("RPC fault 0x{0:08X}")]
    Fault(u32),
    #[error("response stub is malformed: {0}")]
    BadStub(String),
    #[error("not bound yet")]
    NotBound,
    #[error("{0} called out of order")]
    OutOfOrder(&'static str),
}

/// Result of one `RequestActivation` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// The KMS response message.
    Success(Vec<u8>),
    /// The host answered with an error stub carrying this HRESULT.
    Error(u32),
}

/// Where the connection is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    BindSent,
    AlterSent,
    Ready,
    RequestSent {
        call_id: u32,
        context_id: u16,
        syntax: TransferSyntax,
    },
}

/// What one offered context element carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Offer {
    Ndr32,
    Ndr64,
    Btfn,
}

impl Offer {
    fn name(self) -> &'static str {
        match self {
            Offer::Ndr32 => "NDR32",
            Offer::Ndr64 => "NDR64",
            Offer::Btfn => "BTFN",
        }
    }
}

/// vlmcs starts with call id 2 ("M$ starts with CallId 2").
const FIRST_CALL_ID: u32 = 2;
/// Context ids the client assigns: NDR32 always 0, NDR64 1 when offered.
const CTX_NDR32: u16 = 0;
const CTX_NDR64: u16 = 1;

/// Per-connection client state.
///
/// Call ids follow vlmcs: the BIND uses 2, an ALTER_CONTEXT reuses the BIND's id, requests use
/// 2, 3, 4, … Context ids: NDR32 0, NDR64 1 (if offered), BTFN next.
#[derive(Debug)]
pub struct ClientConnection {
    options: BindOptions,
    state: State,
    bind_flags: u8,
    next_call_id: u32,
    /// The elements of the BIND / ALTER_CONTEXT awaiting an answer.
    offered: Vec<(ContextElement, Offer)>,
    has_ndr32: bool,
    has_ndr64: bool,
    has_btfn: bool,
    first_request_sent: bool,
    warnings: Vec<String>,
}

impl ClientConnection {
    pub fn new(options: BindOptions) -> Self {
        Self {
            options,
            state: State::Idle,
            bind_flags: pfc::SINGLE_FRAG | if options.multiplex { pfc::CONC_MPX } else { 0 },
            next_call_id: FIRST_CALL_ID,
            offered: Vec::new(),
            has_ndr32: false,
            has_ndr64: false,
            has_btfn: false,
            first_request_sent: false,
            warnings: Vec::new(),
        }
    }

    /// Whether the server accepted NDR64 (after the bind / alter context exchange).
    pub fn has_ndr64(&self) -> bool {
        self.has_ndr64
    }

    /// Whether the server answered bind-time feature negotiation.
    pub fn has_btfn(&self) -> bool {
        self.has_btfn
    }

    fn element(context_id: u16, syntax: SyntaxId) -> ContextElement {
        ContextElement {
            context_id,
            abstract_syntax: rpc::KMS_INTERFACE,
            transfer_syntaxes: vec![syntax],
        }
    }

    fn bind_pdu(&self, alter: bool) -> Vec<u8> {
        let bind = rpc::Bind {
            max_xmit_frag: rpc::CLIENT_MAX_FRAG,
            max_recv_frag: rpc::CLIENT_MAX_FRAG,
            assoc_group_id: 0,
            contexts: self.offered.iter().map(|(e, _)| e.clone()).collect(),
        };
        let body = if alter {
            Body::AlterContext(bind)
        } else {
            Body::Bind(bind)
        };
        // At most three one-syntax elements: always encodable.
        rpc::encode(self.bind_flags, FIRST_CALL_ID, &body).unwrap_or_default()
    }

    /// The BIND PDU to send first.
    pub fn bind(&mut self) -> Vec<u8> {
        let mut offered = vec![(Self::element(CTX_NDR32, rpc::NDR32), Offer::Ndr32)];
        let mut next_id = CTX_NDR32 + 1;
        if self.options.ndr64 {
            offered.push((Self::element(next_id, rpc::NDR64), Offer::Ndr64));
            next_id += 1;
        }
        if self.options.btfn {
            let syntax = rpc::btfn_syntax(rpc::BTFN_FEATURES);
            offered.push((Self::element(next_id, syntax), Offer::Btfn));
        }
        self.offered = offered;
        self.has_ndr32 = false;
        self.has_ndr64 = false;
        self.has_btfn = false;
        self.first_request_sent = false;
        self.next_call_id = FIRST_CALL_ID;
        self.state = State::BindSent;
        self.bind_pdu(false)
    }

    /// Header checks vlmcs makes on every answer (`checkRpcResponseHeader`), then the parse.
    /// A FAULT becomes [`ClientError::Fault`].
    fn receive<'a>(
        &mut self,
        pdu: &'a [u8],
        expected: u8,
        call_id: u32,
    ) -> Result<rpc::Pdu<'a>, ClientError> {
        let h = rpc::Header::read(pdu).ok_or(FrameError::FragLength(pdu.len()))?;
        if h.ptype != expected && h.ptype != rpc::ptype::FAULT {
            return Err(ClientError::UnexpectedType(h.ptype));
        }
        let parsed = rpc::parse(pdu)?;
        if let Body::Fault(f) = parsed.body {
            return Err(ClientError::Fault(f.status));
        }
        for (bit, name) in [
            (pfc::PENDING_CANCEL, "PFC_PENDING_CANCEL"),
            (pfc::RESERVED_1, "PFC_RESERVED_1"),
            (pfc::DID_NOT_EXECUTE, "PFC_DID_NOT_EXECUTE"),
            (pfc::MAYBE, "PFC_MAYBE"),
            (pfc::OBJECT_UUID, "PFC_OBJECT_UUID"),
        ] {
            if h.flags & bit != 0 {
                self.warnings.push(format!("{name} should not be set"));
            }
        }
        if expected == rpc::ptype::BIND_ACK {
            if h.flags & pfc::CONC_MPX != self.bind_flags & pfc::CONC_MPX {
                self.warnings
                    .push("PFC_CONC_MPX of the BIND and the BIND_ACK should match".into());
            }
        } else if h.flags & pfc::CONC_MPX != 0 {
            self.warnings.push("PFC_CONC_MPX should not be set".into());
        }
        if h.call_id != call_id {
            // vlmcs tolerates call id 1 ("buggy RPC of Wine") with a warning.
            if h.call_id == 1 {
                self.warnings.push(
                    "answer carries call id 1 (Wine RPC bug) instead of the request's".into(),
                );
            } else {
                return Err(ClientError::CallIdMismatch {
                    expected: call_id,
                    got: h.call_id,
                });
            }
        }
        Ok(parsed)
    }

    /// Handles a BIND_ACK or ALTER_CONTEXT_RESP. Returns the ALTER_CONTEXT to send when the
    /// server rejected NDR32 while accepting NDR64, or `None` once the connection is ready.
    pub fn handle_bind_reply(&mut self, pdu: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let alter = match self.state {
            State::BindSent => false,
            State::AlterSent => true,
            _ => return Err(ClientError::OutOfOrder("handle_bind_reply")),
        };
        let expected = if alter {
            rpc::ptype::ALTER_CONTEXT_RESP
        } else {
            rpc::ptype::BIND_ACK
        };
        let parsed = self.receive(pdu, expected, FIRST_CALL_ID)?;
        let reply = match parsed.body {
            Body::BindAck(a) | Body::AlterContextResp(a) => a,
            _ => return Err(ClientError::UnexpectedType(parsed.header.ptype)),
        };
        if reply.results.len() != self.offered.len() {
            return Err(ClientError::BadBindAck(format!(
                "expected {} context results but got {}",
                self.offered.len(),
                reply.results.len()
            )));
        }
        let offered = std::mem::take(&mut self.offered);
        for ((elem, kind), res) in offered.iter().zip(&reply.results) {
            self.check_result(elem, *kind, res)?;
        }
        if !self.has_ndr32 && !self.has_ndr64 {
            return Err(ClientError::NoTransferSyntax);
        }
        if !alter && !self.has_ndr32 {
            // Microsoft-style: NDR64 accepted, NDR32 rejected → ask for NDR32 alone.
            self.offered = vec![(Self::element(CTX_NDR32, rpc::NDR32), Offer::Ndr32)];
            self.state = State::AlterSent;
            return Ok(Some(self.bind_pdu(true)));
        }
        self.state = State::Ready;
        Ok(None)
    }

    /// One result element, checked as vlmcs does (`rpcBindOrAlterClientContext`).
    fn check_result(
        &mut self,
        elem: &ContextElement,
        kind: Offer,
        res: &rpc::ContextResult,
    ) -> Result<(), ClientError> {
        let name = kind.name();
        if res.result == ack::PROVIDER_REJECTION {
            if !res.transfer_syntax.uuid.is_nil() {
                self.warnings.push(format!(
                    "rejected transfer syntax {name} did not return a NULL GUID"
                ));
            }
            if res.transfer_syntax.version != 0 {
                self.warnings.push(format!(
                    "rejected transfer syntax {name} did not return syntax version 0 but {}",
                    res.transfer_syntax.version
                ));
            }
            if res.reason == ack::REASON_ABSTRACT_SYNTAX {
                self.warnings.push(format!(
                    "transfer syntax {name} does not support KMS activation"
                ));
            } else if res.reason != ack::REASON_TRANSFER_SYNTAXES {
                self.warnings.push(format!(
                    "rejected transfer syntax {name} did not return reason 2 but {}",
                    res.reason
                ));
            }
            return Ok(());
        }
        if kind == Offer::Btfn {
            if res.result != ack::NEGOTIATE_ACK {
                self.warnings.push(format!(
                    "BTFN answered with result {} instead of negotiate_ack (3)",
                    res.result
                ));
            }
            if res.reason != rpc::BTFN_FEATURES {
                self.warnings.push(format!(
                    "BTFN did not return feature mask 0x3 but 0x{:X}",
                    res.reason
                ));
            }
            self.has_btfn = true;
            return Ok(());
        }
        if res.result != ack::ACCEPTANCE {
            return Err(ClientError::BadBindAck(format!(
                "{name} got result {}, neither acceptance nor provider rejection",
                res.result
            )));
        }
        let offered = elem
            .transfer_syntaxes
            .first()
            .copied()
            .unwrap_or(SyntaxId::NULL);
        if res.transfer_syntax.uuid != offered.uuid {
            return Err(ClientError::BadBindAck(format!(
                "accepted transfer syntax {} differs from the offered {name}",
                res.transfer_syntax.uuid
            )));
        }
        if res.transfer_syntax.version != offered.version {
            return Err(ClientError::BadBindAck(format!(
                "expected transfer syntax version {} for {name} but got {}",
                offered.version, res.transfer_syntax.version
            )));
        }
        if res.reason != 0 {
            self.warnings.push(format!(
                "ack reason for {name} should be 0 but is {}",
                res.reason
            ));
        }
        match kind {
            Offer::Ndr64 => self.has_ndr64 = true,
            _ => self.has_ndr32 = true,
        }
        Ok(())
    }

    /// The REQUEST PDU for one KMS message: NDR32 for the first request of the connection,
    /// NDR64 afterwards if it was negotiated (as vlmcs and Windows do).
    ///
    /// Unlike vlmcs, a connection on which NDR32 was never accepted uses NDR64 from the first
    /// request on instead of sending NDR32 on a rejected context.
    pub fn request(&mut self, kms_message: &[u8]) -> Result<Vec<u8>, ClientError> {
        match self.state {
            State::Ready => {}
            State::RequestSent { .. } => return Err(ClientError::OutOfOrder("request")),
            _ => return Err(ClientError::NotBound),
        }
        let use_ndr64 =
            self.has_ndr64 && self.options.ndr64 && (self.first_request_sent || !self.has_ndr32);
        let (syntax, context_id) = if use_ndr64 {
            (TransferSyntax::Ndr64, CTX_NDR64)
        } else {
            (TransferSyntax::Ndr32, CTX_NDR32)
        };
        let stub = ndr::wrap_request(syntax, kms_message).map_err(|_| FrameError::TooLarge {
            len: kms_message.len(),
            max: rpc::MAX_FRAG_LENGTH,
        })?;
        let call_id = self.next_call_id;
        let body = Body::Request(rpc::Request {
            alloc_hint: u32::try_from(stub.len()).unwrap_or(u32::MAX),
            context_id,
            opnum: 0,
            object: None,
            stub: &stub,
        });
        let pdu = rpc::encode(pfc::SINGLE_FRAG, call_id, &body)?;
        self.next_call_id = call_id.wrapping_add(1);
        self.first_request_sent = true;
        self.state = State::RequestSent {
            call_id,
            context_id,
            syntax,
        };
        Ok(pdu)
    }

    /// Handles the RESPONSE (or FAULT) to the last request.
    pub fn handle_response(&mut self, pdu: &[u8]) -> Result<CallResult, ClientError> {
        let State::RequestSent {
            call_id,
            context_id,
            syntax,
        } = self.state
        else {
            return Err(ClientError::OutOfOrder("handle_response"));
        };
        // Whatever the outcome, the call is over; another request may follow.
        self.state = State::Ready;
        let parsed = self.receive(pdu, rpc::ptype::RESPONSE, call_id)?;
        let Body::Response(resp) = parsed.body else {
            return Err(ClientError::UnexpectedType(parsed.header.ptype));
        };
        if resp.cancel_count != 0 {
            return Err(ClientError::BadStub(format!(
                "cancel count is {}, not 0",
                resp.cancel_count
            )));
        }
        if resp.context_id != context_id {
            return Err(ClientError::BadStub(format!(
                "response context id {} is not the request's {context_id}",
                resp.context_id
            )));
        }
        let stub = ndr::unwrap_response(syntax, resp.stub)
            .map_err(|e| ClientError::BadStub(e.to_string()))?;
        if usize::try_from(resp.alloc_hint).ok() != Some(stub.expected_len) {
            self.warnings.push(format!(
                "RPC stub size (alloc_hint) is {}, should be {}",
                resp.alloc_hint, stub.expected_len
            ));
        }
        if !stub.padding_is_zero {
            self.warnings
                .push("RPC stub data not padded with zeros".into());
        }
        if resp.stub.len() > stub.expected_len {
            self.warnings.push(format!(
                "{} excess bytes after the RPC stub",
                resp.stub.len() - stub.expected_len
            ));
        }
        match (stub.message, stub.hresult) {
            (Some(msg), 0) => Ok(CallResult::Success(msg.to_vec())),
            (_, 0) => Err(ClientError::BadStub(
                "error stub (NULL response pointer) with HRESULT 0".into(),
            )),
            (_, hr) => Ok(CallResult::Error(hr)),
        }
    }

    /// Non-fatal deviations noticed so far (vlmcs-style warnings), e.g. a multiplex flag
    /// mismatch or a non-zero padding byte.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}
