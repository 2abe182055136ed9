//! Node decoding: never panics, and whatever decodes re-encodes to the same
//! bytes (the canonical encoding is a bijection).
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::Node;

fuzz_target!(|data: &[u8]| {
    if let Ok(node) = Node::decode(data) {
        assert_eq!(node.encode(), data, "decode/encode is not a bijection");
    }
});
