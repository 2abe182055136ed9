//! Restoring a room from an arbitrary stored segment never panics: what
//! does not decode, breaks a chain, cites a node not stored before it or
//! disagrees with its declared length is refused with a typed error, and
//! what restores materializes to the state a replay gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::dag::Segment;
use syncline_core::{Doc, Room, RoomId};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte is the length the store claims (what a row says).
    let segment = Segment {
        start: 0,
        len: u32::from(data[0]),
        pack: data[1..].to_vec().into_boxed_slice(),
    };
    let room_id = RoomId::new("fuzz").expect("valid room id");
    if let Ok(room) = Room::from_segments(room_id, vec![segment]) {
        let replayed = Doc::replay(room.dag());
        assert_eq!(replayed.state_hash(room.dag()), room.state_hash());
    }
});
