//! Replays the automerge-paper editing trace as local transactions and
//! checks the final text, then ships the history as a pack to a fresh
//! replica and checks it converges to the same state.

use std::io::Read;

use syncline_core::{EntryKind, Keypair, Room, RoomId};

#[test]
fn automerge_paper_trace_replays_exactly() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/automerge-paper.json.gz"
    );
    let mut json = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("vendored trace"))
        .read_to_string(&mut json)
        .unwrap();
    let trace: serde_json::Value = serde_json::from_str(&json).unwrap();
    let key = Keypair::from_seed([9; 32]);
    let mut room = Room::new(RoomId::new("paper").unwrap());
    let mut tx = room.begin(key.author(), 0);
    tx.ensure("/paper", EntryKind::Text).unwrap();
    tx.commit().unwrap();
    for (i, t) in trace["txns"].as_array().unwrap().iter().enumerate() {
        let mut tx = room.begin(key.author(), i as u64);
        for p in t["patches"].as_array().unwrap() {
            let pos = p[0].as_u64().unwrap() as usize;
            let del = p[1].as_u64().unwrap() as usize;
            let ins = p[2].as_str().unwrap();
            tx.text_delete("/paper", pos, del).unwrap();
            tx.text_insert("/paper", pos, ins).unwrap();
        }
        tx.commit().unwrap();
    }
    let id = room.doc().resolve("/paper").unwrap();
    assert_eq!(room.doc().text(&id), trace["endContent"].as_str().unwrap());

    let all = room.dag().causal_order();
    let pack = room.pack(&all, Some(&key)).unwrap();
    let mut fresh = Room::new(RoomId::new("paper").unwrap());
    let got = fresh.receive_pack(&pack).unwrap();
    assert_eq!(got.accepted.len(), all.len());
    assert_eq!(fresh.state_hash(), room.state_hash());
}
