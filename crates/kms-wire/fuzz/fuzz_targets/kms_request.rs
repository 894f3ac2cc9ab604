//! Arbitrary bytes as a KMS request message taken out of an RPC stub.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kms_wire::kms::decode_request(data);
});
