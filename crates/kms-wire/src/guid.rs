//! GUIDs on the wire use the Microsoft mixed-endian layout (`Uuid::to_bytes_le`).
use uuid::Uuid;

/// Reads a GUID in wire (mixed-endian) layout. `bytes` must hold at least 16 bytes.
pub fn read_guid(bytes: &[u8]) -> Option<Uuid> {
    let b: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
    Some(Uuid::from_bytes_le(b))
}

/// Writes a GUID in wire (mixed-endian) layout.
pub fn write_guid(out: &mut Vec<u8>, id: &Uuid) {
    out.extend_from_slice(&id.to_bytes_le());
}
