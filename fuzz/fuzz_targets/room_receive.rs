//! A room fed arbitrary node bytes (decoded, then inserted and
//! materialized without signature checks, as a worst case) never panics and
//! its incremental state always equals a replay from scratch.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use syncline_core::{AuthorId, Doc, Node, NodeId, Room, RoomId, VerifiedNode};

fuzz_target!(|data: &[u8]| {
    let mut room = Room::new(RoomId::new("fuzz").expect("valid room id"));
    // (author, seq) of every node decoded so far, by id: how a format-2
    // node's parents are found (a pack would carry them).
    let mut keys: HashMap<NodeId, (AuthorId, u64)> = HashMap::new();
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
        let id = Node::id_of(bytes);
        keys.insert(id, (node.author, node.seq));
        let parent_keys = match node.format {
            syncline_core::node::NodeFormat::V1 => Vec::new(),
            syncline_core::node::NodeFormat::V2 => {
                let Some(found) = node.parents.iter().map(|p| keys.get(p).copied()).collect()
                else {
                    continue;
                };
                found
            }
        };
        let _ = room.receive(VerifiedNode {
            id,
            node,
            sig: None,
            parent_keys,
        });
    }
    let replayed = Doc::replay(room.dag());
    assert_eq!(replayed.state_hash(room.dag()), room.state_hash());
});
