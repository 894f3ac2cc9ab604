//! Arbitrary server answers into the client state machine (bind reply, then responses).
#![no_main]

use kms_wire::client::{BindOptions, ClientConnection};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut client = ClientConnection::new(BindOptions {
        ndr64: mode & 1 != 0,
        btfn: mode & 2 != 0,
        multiplex: mode & 4 != 0,
    });
    client.bind();
    // Chunks separated by a 0xA5 0x5A marker stand for successive PDUs.
    let mut chunks = split(rest);
    let mut ready = false;
    for chunk in chunks.by_ref() {
        match client.handle_bind_reply(chunk) {
            Ok(Some(_alter)) => continue,
            Ok(None) => {
                ready = true;
                break;
            }
            Err(_) => break,
        }
    }
    if !ready {
        return;
    }
    for chunk in chunks {
        if client.request(&[0u8; 260]).is_err() {
            return;
        }
        let _ = client.handle_response(chunk);
    }
});

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .windows(2)
            .position(|w| w == [0xA5, 0x5A])
            .unwrap_or(rest.len());
        let chunk = &rest[..end];
        rest = rest.get(end + 2..).unwrap_or_default();
        Some(chunk)
    })
}
