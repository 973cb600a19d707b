//! The control protocol decoders on arbitrary bytes: nexd's request side
//! and nexctl's reply side must return an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nexd::control::protocol::decode_request(data);
    let _ = nexd::control::client::decode_reply(data);
});
