//! HRESULTs a KMS host returns in an error stub (see the protocol sheet, section 2.7).

/// ERROR_INVALID_DATA: unsupported protocol version, short message, N policy > 1000.
pub const INVALID_DATA: u32 = 0x8007_000D;
/// SL_E_VL_KEY_MANAGEMENT_SERVICE_ID_MISMATCH: the product is not activated by this host.
pub const KMS_ID_MISMATCH: u32 = 0xC004_F042;
/// SL_E_VL_INVALID_TIMESTAMP: client clock differs from the host's by more than the allowed skew.
pub const INVALID_TIMESTAMP: u32 = 0xC004_F06C;
/// SL_E_VL_NOT_ENOUGH_COUNT: produced by a client whose N policy exceeds the returned count.
pub const NOT_ENOUGH_COUNT: u32 = 0xC004_F038;
/// SL_REMAPPING_SP_STATUS_INVALIDARG: list overflow on a genuine host (> 671 clients).
pub const INVALID_ARG: u32 = 0xC004_D104;

/// DCE/RPC fault status: unknown interface / context (`nca_unk_if`).
pub const NCA_UNK_IF: u32 = 0x1C01_0003;
/// DCE/RPC fault status: protocol error (`nca_proto_error`).
pub const NCA_PROTO_ERROR: u32 = 0x1C01_000B;
/// DCE/RPC fault status: operation range error (`nca_op_rng_error`), for a wrong opnum.
pub const NCA_OP_RNG_ERROR: u32 = 0x1C01_0002;

/// A short human-readable name for an HRESULT, for logs and CLI output.
pub fn describe(hr: u32) -> &'static str {
    match hr {
        0 => "success",
        INVALID_DATA => "invalid data (unsupported protocol version or malformed request)",
        KMS_ID_MISMATCH => "the specified KMS host cannot activate this product",
        INVALID_TIMESTAMP => "client clock is too far from the host's",
        NOT_ENOUGH_COUNT => "the count of the KMS host is too low",
        INVALID_ARG => "the KMS host client list overflowed",
        _ => "unknown error",
    }
}
