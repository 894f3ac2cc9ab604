//! Arbitrary bytes as a TCP stream into one server connection: split into PDUs with
//! `pdu_length` like the I/O shell does, each handed to `ServerConnection::handle_pdu`.
#![no_main]

use kms_wire::server::{pdu_length, ServerAction, ServerConfig, ServerConnection, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the server configuration, the rest is the stream.
    let Some((&mode, mut stream)) = data.split_first() else {
        return;
    };
    let config = ServerConfig {
        ndr64: mode & 1 != 0,
        btfn: mode & 2 != 0,
        max_pdu_len: if mode & 4 != 0 { 4096 } else { 512 },
    };
    let mut conn = ServerConnection::new(config, u16::from(mode) * 257, 0x1234_5678);
    loop {
        let Some(header) = stream.get(..HEADER_LEN) else {
            // A short tail goes in as is: must close, never panic.
            if !stream.is_empty() {
                let _ = conn.handle_pdu(stream);
            }
            return;
        };
        let header: &[u8; HEADER_LEN] = header.try_into().expect("16 bytes");
        let pdu = match pdu_length(header, config.max_pdu_len) {
            Ok(len) => {
                assert!(len >= HEADER_LEN && len <= config.max_pdu_len);
                // A stream that ends early yields a truncated PDU: hand it in anyway.
                let len = len.min(stream.len());
                let (pdu, rest) = stream.split_at(len);
                stream = rest;
                pdu
            }
            Err(_) => {
                // The shell would close; still make sure handle_pdu copes with the bytes.
                let _ = conn.handle_pdu(stream);
                return;
            }
        };
        match conn.handle_pdu(pdu) {
            ServerAction::Send(out) => {
                assert!(kms_wire::rpc::parse(&out).is_ok());
            }
            ServerAction::Activate(call) => {
                assert!(call.kms_message.len() < pdu.len());
                let ok = conn.respond(&call, Ok(&call.kms_message));
                assert!(kms_wire::rpc::parse(&ok).is_ok());
                let err = conn.respond(&call, Err(0x8007_000D));
                assert!(kms_wire::rpc::parse(&err).is_ok());
            }
            ServerAction::Close(_) => return,
        }
    }
});
