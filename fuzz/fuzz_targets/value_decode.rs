//! Value decoding: never panics; decoded values re-encode canonically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::Value;
use syncline_core::codec::mp::Reader;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    if let Ok(v) = Value::decode(&mut r) {
        let used = r.position();
        assert_eq!(
            v.to_bytes(),
            &data[..used],
            "value encoding is not canonical"
        );
    }
});
