//! Frame decoding: never panics; whatever decodes re-encodes and decodes to
//! the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::proto::message::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        let again = Envelope::decode(&env.encode()).expect("an encoded envelope decodes");
        assert_eq!(again, env);
    }
});
