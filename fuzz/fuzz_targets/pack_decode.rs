//! Pack decoding: never panics, whatever the bytes (truncated, flipped,
//! forged, decompression bombs within the declared limits).
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::RoomId;
use syncline_core::pack;

fuzz_target!(|data: &[u8]| {
    let room = RoomId::new("fuzz").expect("valid room id");
    // Parents cited as held resolve to nothing: what a receiver holding
    // nothing does.
    let _ = pack::decode(data, &room, &|_, _| None);
});
