//! Sans-IO codec for the Microsoft KMS activation protocol.
//!
//! This crate parses and builds bytes only: it owns no sockets, reads no clock and draws no
//! random numbers. Callers pass time and randomness in as data.
//!
//! * [`crypto`]: the three block-cipher variants (v4 Rijndael-160 CBC-MAC, v5 AES-128,
//!   v6 AES-128 with a patched key schedule) and the v6 HMAC key derivation.
//! * [`kms`]: KMS request/response messages for protocol v4, v5 and v6, server and client side.
//! * [`rpc`]: DCE/RPC connection-oriented PDUs (bind, alter context, request, response, fault).
//! * [`ndr`]: the NDR32 / NDR64 stub of the `RequestActivation` call.
//! * [`server`]: per-connection server state machine (bind negotiation, context ids, framing).
//! * [`client`]: per-connection client state machine (what `vlmcs` does).

pub mod client;
pub mod crypto;
pub mod guid;
pub mod hresult;
pub mod kms;
pub mod ndr;
pub mod rpc;
pub mod server;

pub use uuid::Uuid;
