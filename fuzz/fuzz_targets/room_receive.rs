//! A room fed arbitrary node bytes (decoded, then inserted and
//! materialized without signature checks, as a worst case) never panics and
//! its incremental state always equals a replay from scratch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::{Doc, Node, Room, RoomId, VerifiedNode};

fuzz_target!(|data: &[u8]| {
    let mut room = Room::new(RoomId::new("fuzz").expect("valid room id"));
    // Length-prefixed node encodings, one after another.
    let mut rest = data;
    while rest.len() >= 2 {
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let (bytes, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        let Ok(node) = Node::decode(bytes) else {
            continue;
        };
        let v = VerifiedNode {
            id: Node::id_of(bytes),
            node,
            bytes: bytes.to_vec(),
            sig: None,
        };
        let _ = room.receive(v);
    }
    let replayed = Doc::replay(room.dag());
    assert_eq!(replayed.state_hash(room.dag()), room.state_hash());
});
