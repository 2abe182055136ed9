//! Opening a room from arbitrary checkpoint bytes (with a real stored
//! history) never panics: a damaged, forged or foreign checkpoint is
//! refused with a typed error, and one that opens holds what replaying the
//! history gives.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use syncline_core::dag::Segment;
use syncline_core::{Keypair, Room, RoomId, Value};

/// A small real room (three authors, text, fields, moves) as stored
/// segments, and the state hash replaying them gives.
fn history() -> &'static (Vec<Segment>, [u8; 32]) {
    static HISTORY: OnceLock<(Vec<Segment>, [u8; 32])> = OnceLock::new();
    HISTORY.get_or_init(|| {
        let keys = [1u8, 2, 3].map(|s| Keypair::from_seed([s; 32]));
        let mut room = Room::new(RoomId::new("fuzz").expect("valid room id"));
        for i in 0..60u64 {
            let mut tx = room.begin(keys[(i % 3) as usize].author(), 1_000 + i);
            tx.text_insert("/doc", (i as usize * 5) % (i as usize + 1), "ab")
                .expect("insert");
            if i % 4 == 0 {
                tx.set(&format!("/list/{}", i % 5), "n", Value::Int(i as i64))
                    .expect("set");
            }
            if i % 9 == 8 {
                tx.text_delete("/doc", 1, 2).expect("delete");
            }
            tx.commit().expect("commit");
        }
        let next = room.dag().next_idx();
        let segments = [0..20, 20..45, 45..next]
            .map(|r| room.dag().segment(r, 3))
            .to_vec();
        (segments, room.state_hash())
    })
}

fuzz_target!(|data: &[u8]| {
    let (segments, expected) = history();
    let room_id = RoomId::new("fuzz").expect("valid room id");
    if let Ok(room) = Room::from_checkpoint(room_id, data, segments.clone()) {
        assert_eq!(&room.state_hash(), expected, "opened to another state");
    }
});
