//! NDR32 / NDR64 stubs of the `RequestActivation` call (protocol sheet 2.7).
//!
//! ```text
//! int RequestActivation([in] int requestSize, [in, size_is(requestSize)] byte *request,
//!                       [out] int *responseSize, [out, size_is(,*responseSize)] byte **response);
//! ```
//!
//! Request stub: `size`, `max_count`, message (`u32` each in NDR32, `u64` each in NDR64).
//! Success response stub: `size`, referent id `0x00020000`, `max_count`, message, zero padding
//! to a multiple of 4, `u32` HRESULT 0. Error stub: `size = 0`, NULL referent, `u32` HRESULT.
//!
//! Server side: [`unwrap_request`], [`wrap_response`], [`wrap_error`].
//! Client side: [`wrap_request`], [`unwrap_response`].

/// Transfer syntax a stub is encoded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferSyntax {
    Ndr32,
    Ndr64,
}

impl TransferSyntax {
    /// Size of one NDR integer of the `[in] int` / size / referent fields (4 or 8 bytes).
    const fn word(self) -> usize {
        match self {
            TransferSyntax::Ndr32 => 4,
            TransferSyntax::Ndr64 => 8,
        }
    }

    /// Bytes before the KMS message in a request stub (8 for NDR32, 16 for NDR64).
    pub const fn request_header_len(self) -> usize {
        2 * self.word()
    }

    /// Bytes before the KMS message in a success response stub (12 for NDR32, 24 for NDR64).
    pub const fn response_header_len(self) -> usize {
        3 * self.word()
    }

    /// Length of the error stub (12 for NDR32, 20 for NDR64).
    pub const fn error_stub_len(self) -> usize {
        2 * self.word() + 4
    }
}

/// Non-zero pointer referent id of the `response` out-pointer, as Windows writes it.
pub const REFERENT_ID: u32 = 0x0002_0000;

/// Why a stub is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StubError {
    #[error("stub of {len} bytes is shorter than the {need} bytes its fields require")]
    TooShort { len: usize, need: usize },
    #[error("size field {size} and conformant max count {max_count} differ")]
    SizeMismatch { size: u64, max_count: u64 },
    #[error("message is too large to encode ({0} bytes)")]
    TooLarge(usize),
}

/// Reads the little-endian NDR integer of `syntax` width at `off`.
fn read_word(syntax: TransferSyntax, stub: &[u8], off: usize) -> Option<u64> {
    match syntax {
        TransferSyntax::Ndr32 => stub
            .get(off..off.checked_add(4)?)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 4]| u64::from(u32::from_le_bytes(b))),
        TransferSyntax::Ndr64 => stub
            .get(off..off.checked_add(8)?)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes),
    }
}

fn read_u32(stub: &[u8], off: usize) -> Option<u32> {
    let b: [u8; 4] = stub.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn write_word(syntax: TransferSyntax, out: &mut Vec<u8>, value: u32) {
    match syntax {
        TransferSyntax::Ndr32 => out.extend_from_slice(&value.to_le_bytes()),
        TransferSyntax::Ndr64 => out.extend_from_slice(&u64::from(value).to_le_bytes()),
    }
}

/// Zero bytes needed after `len` bytes to reach a multiple of 4.
pub const fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Server side: extracts the KMS request message from a request stub.
///
/// The message starts right after the 8-byte (NDR32) / 16-byte (NDR64) header. Policy when the
/// size fields disagree with the bytes present (vlmcsd ignores both fields and takes everything
/// from offset 8/16):
/// * `size <= bytes present`: the message is the first `size` bytes; anything after it is ignored
///   (py-kms appends 4 zero bytes to v4 requests, Wine clients pad too).
/// * `size > bytes present` (including absurd NDR64 values): [`StubError::TooShort`]; a genuine
///   RPC runtime fails unmarshalling here as well, so the server answers with a FAULT.
/// * `max_count != size`: [`StubError::SizeMismatch`] (a conformant array whose max count differs
///   from its `size_is` expression is malformed NDR; no client sends it).
pub fn unwrap_request(syntax: TransferSyntax, stub: &[u8]) -> Result<&[u8], StubError> {
    let header = syntax.request_header_len();
    let too_short = StubError::TooShort {
        len: stub.len(),
        need: header,
    };
    let size = read_word(syntax, stub, 0).ok_or(too_short.clone())?;
    let max_count = read_word(syntax, stub, syntax.word()).ok_or(too_short)?;
    if size != max_count {
        return Err(StubError::SizeMismatch { size, max_count });
    }
    let body = stub.get(header..).unwrap_or_default();
    // Compare in u64 so a huge declared size never wraps or drives an allocation.
    if size > body.len() as u64 {
        return Err(StubError::TooShort {
            len: stub.len(),
            need: header.saturating_add(usize::try_from(size).unwrap_or(usize::MAX)),
        });
    }
    // size <= body.len() here, so the conversion and the slice cannot fail.
    let n = usize::try_from(size).unwrap_or(body.len());
    Ok(body.get(..n).unwrap_or(body))
}

/// Client side: builds a request stub for `message`.
pub fn wrap_request(syntax: TransferSyntax, message: &[u8]) -> Result<Vec<u8>, StubError> {
    let n = u32::try_from(message.len()).map_err(|_| StubError::TooLarge(message.len()))?;
    let mut out = Vec::with_capacity(syntax.request_header_len() + message.len());
    write_word(syntax, &mut out, n);
    write_word(syntax, &mut out, n);
    out.extend_from_slice(message);
    Ok(out)
}

/// Server side: builds the success response stub carrying the KMS response `message`.
/// Its length is the RESPONSE's `alloc_hint`.
pub fn wrap_response(syntax: TransferSyntax, message: &[u8]) -> Result<Vec<u8>, StubError> {
    let n = u32::try_from(message.len()).map_err(|_| StubError::TooLarge(message.len()))?;
    let pad = pad4(message.len());
    let mut out = Vec::with_capacity(syntax.response_header_len() + message.len() + pad + 4);
    write_word(syntax, &mut out, n);
    write_word(syntax, &mut out, REFERENT_ID);
    write_word(syntax, &mut out, n);
    out.extend_from_slice(message);
    out.resize(out.len() + pad, 0);
    out.extend_from_slice(&0u32.to_le_bytes());
    Ok(out)
}

/// Server side: builds the error stub (NULL response pointer followed by `hresult`).
pub fn wrap_error(syntax: TransferSyntax, hresult: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(syntax.error_stub_len());
    write_word(syntax, &mut out, 0);
    write_word(syntax, &mut out, 0);
    out.extend_from_slice(&hresult.to_le_bytes());
    out
}

/// A response stub decoded by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseStub<'a> {
    /// The KMS response message; `None` for an error stub (NULL referent).
    pub message: Option<&'a [u8]>,
    /// The call's return value (0 on success).
    pub hresult: u32,
    /// Exact length the stub should have (what `alloc_hint` should say).
    pub expected_len: usize,
    /// False if a padding byte between the message and the HRESULT is not zero.
    pub padding_is_zero: bool,
}

/// Client side: decodes a response stub (the checks `vlmcs` makes, except that missing bytes are
/// an error here instead of being read as zero).
pub fn unwrap_response(syntax: TransferSyntax, stub: &[u8]) -> Result<ResponseStub<'_>, StubError> {
    let w = syntax.word();
    let short = |need: usize| StubError::TooShort {
        len: stub.len(),
        need,
    };
    let size = read_word(syntax, stub, 0).ok_or(short(2 * w))?;
    let referent = read_word(syntax, stub, w).ok_or(short(2 * w))?;
    if referent == 0 {
        let need = syntax.error_stub_len();
        let hresult = read_u32(stub, 2 * w).ok_or(short(need))?;
        return Ok(ResponseStub {
            message: None,
            hresult,
            expected_len: need,
            padding_is_zero: true,
        });
    }
    let header = syntax.response_header_len();
    let max_count = read_word(syntax, stub, 2 * w).ok_or(short(header))?;
    if size != max_count {
        return Err(StubError::SizeMismatch { size, max_count });
    }
    let body = stub.get(header..).unwrap_or_default();
    if size > body.len() as u64 {
        return Err(short(
            header.saturating_add(usize::try_from(size).unwrap_or(usize::MAX)),
        ));
    }
    let m = usize::try_from(size).unwrap_or(body.len());
    let pad = pad4(m);
    let expected_len = header + m + pad + 4;
    let message = body.get(..m).ok_or(short(expected_len))?;
    let padding = body.get(m..m + pad).ok_or(short(expected_len))?;
    let hresult = read_u32(body, m + pad).ok_or(short(expected_len))?;
    Ok(ResponseStub {
        message: Some(message),
        hresult,
        expected_len,
        padding_is_zero: padding.iter().all(|&b| b == 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_trailing_bytes() {
        for syntax in [TransferSyntax::Ndr32, TransferSyntax::Ndr64] {
            let msg: Vec<u8> = (0u8..=250).collect();
            let mut stub = wrap_request(syntax, &msg).unwrap();
            assert_eq!(stub.len(), syntax.request_header_len() + msg.len());
            assert_eq!(unwrap_request(syntax, &stub).unwrap(), &msg[..]);
            stub.extend_from_slice(&[0, 0, 0, 0]);
            assert_eq!(unwrap_request(syntax, &stub).unwrap(), &msg[..]);
        }
    }

    #[test]
    fn request_size_lies() {
        // Declared 0x100 but only 4 bytes present.
        let stub = [0, 1, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        assert!(matches!(
            unwrap_request(TransferSyntax::Ndr32, &stub),
            Err(StubError::TooShort { .. })
        ));
        // Absurd NDR64 size.
        let mut stub = vec![0xff; 16];
        stub.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            unwrap_request(TransferSyntax::Ndr64, &stub),
            Err(StubError::TooShort { .. })
        ));
        // max_count differs.
        let stub = [1, 0, 0, 0, 2, 0, 0, 0, 9, 9];
        assert!(matches!(
            unwrap_request(TransferSyntax::Ndr32, &stub),
            Err(StubError::SizeMismatch { .. })
        ));
        for len in 0..16 {
            let _ = unwrap_request(TransferSyntax::Ndr64, &[0u8; 16][..len]);
            let _ = unwrap_response(TransferSyntax::Ndr64, &[1u8; 16][..len]);
        }
    }

    #[test]
    fn response_layouts() {
        let s = wrap_response(TransferSyntax::Ndr32, &[7; 5]).unwrap();
        assert_eq!(s.len(), 12 + 5 + 3 + 4);
        assert_eq!(&s[..12], &[5, 0, 0, 0, 0, 0, 2, 0, 5, 0, 0, 0]);
        let d = unwrap_response(TransferSyntax::Ndr32, &s).unwrap();
        assert_eq!(d.message, Some(&[7u8; 5][..]));
        assert_eq!(
            (d.hresult, d.expected_len, d.padding_is_zero),
            (0, 24, true)
        );

        let s = wrap_response(TransferSyntax::Ndr64, &[7; 8]).unwrap();
        assert_eq!(s.len(), 24 + 8 + 4);
        assert_eq!(&s[8..16], &[0, 0, 2, 0, 0, 0, 0, 0]);

        let e = wrap_error(TransferSyntax::Ndr32, 0x8007_000D);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0, 0, 0x0d, 0, 0x07, 0x80]);
        let e64 = wrap_error(TransferSyntax::Ndr64, 0xC004_F042);
        assert_eq!(e64.len(), 20);
        let d = unwrap_response(TransferSyntax::Ndr64, &e64).unwrap();
        assert_eq!((d.message, d.hresult), (None, 0xC004_F042));
    }
}
