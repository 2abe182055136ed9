//! Rooms open from a checkpoint and the segments after it exactly as they
//! replay from scratch: random multi-author histories (every kind of edit,
//! concurrent and out of order), cut into random segments, checkpointed at
//! random points. A checkpoint that is corrupt, another room's, or covers
//! more than the segments hold is refused, and replay still works.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncline_core::checkpoint::CheckpointError;
use syncline_core::dag::Segment;
use syncline_core::{Keypair, NodeIdx, Room, RoomId};
use syncline_testkit::{Namespace, random_ops};

const NAMESPACE: Namespace = Namespace {
    paths: &["/a", "/b", "/a/x", "/a/y", "/b/z", "/c"],
    texts: &["/notes", "/a/x/body"],
    fields: &["title", "done"],
};

fn room_id() -> RoomId {
    RoomId::new("checkpoints").unwrap()
}

/// A room whose history three authors wrote concurrently, exchanging
/// packs now and then (so it holds merges and out-of-order arrivals).
fn history(seed: u64, steps: usize) -> Room {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let keys: Vec<Keypair> = (1..=3u8).map(|i| Keypair::from_seed([i; 32])).collect();
    let mut rooms: Vec<Room> = (0..3).map(|_| Room::new(room_id())).collect();
    for step in 0..steps {
        let i = rng.random_range(0..3);
        if rng.random_bool(0.85) {
            let mut tx = rooms[i].begin(keys[i].author(), 1_000 + step as u64);
            random_ops(&mut tx, &mut rng, &NAMESPACE);
            tx.commit().unwrap();
        } else {
            let j = (i + 1 + rng.random_range(0..2)) % 3;
            let missing = rooms[i]
                .dag()
                .missing_for_version_vector(&rooms[j].dag().version_vector());
            if !missing.is_empty() {
                let pack = rooms[i].pack(&missing, Some(&keys[i])).unwrap();
                rooms[j].receive_pack(&pack).unwrap();
            }
        }
    }
    rooms.swap_remove(0)
}

/// The room's history cut into segments of random sizes.
fn segments(room: &Room, rng: &mut ChaCha8Rng) -> Vec<Segment> {
    let n = room.dag().next_idx();
    let mut out = Vec::new();
    let mut at: NodeIdx = 0;
    while at < n {
        let len = rng.random_range(1..=40).min(n - at);
        out.push(room.dag().segment(at..at + len, 3));
        at += len;
    }
    out
}

/// The first `n` nodes' segments (cut to end at `n`).
fn prefix(room: &Room, all: &[Segment], n: NodeIdx) -> Vec<Segment> {
    let mut out: Vec<Segment> = all
        .iter()
        .filter(|s| s.start + s.len <= n)
        .cloned()
        .collect();
    let covered = out.last().map_or(0, |s| s.start + s.len);
    if covered < n {
        out.push(room.dag().segment(covered..n, 3));
    }
    out
}

#[test]
fn opening_from_a_checkpoint_equals_replaying() {
    for seed in 0..40u64 {
        let room = history(seed, 150);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc0ffee);
        let all = segments(&room, &mut rng);
        let n = room.dag().next_idx();
        let replayed = Room::from_segments(room_id(), all.clone()).unwrap();
        assert_eq!(replayed.state_hash(), room.state_hash(), "seed {seed}");
        for cut in [0, n / 3, rng.random_range(0..=n), n] {
            // A checkpoint as a replica that held the first `cut` nodes
            // would have written it.
            let earlier = Room::from_segments(room_id(), prefix(&room, &all, cut)).unwrap();
            let checkpoint = earlier.checkpoint();
            let opened = Room::from_checkpoint(room_id(), &checkpoint, all.clone())
                .unwrap_or_else(|e| panic!("seed {seed}, cut {cut}: {e}"));
            assert_eq!(
                opened.state_hash(),
                room.state_hash(),
                "seed {seed}, cut {cut}"
            );
            assert_eq!(opened.dag().heads(), room.dag().heads(), "seed {seed}");
            assert_eq!(opened.dag().version_vector(), room.dag().version_vector());
            assert_eq!(
                opened.dag().id_index(),
                room.dag().id_index(),
                "seed {seed}"
            );
            assert_eq!(opened.doc().export(), room.doc().export());
        }
    }
}

#[test]
fn a_room_opened_from_a_checkpoint_goes_on_like_any_other() {
    let mut room = history(7, 200);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let all = segments(&room, &mut rng);
    let mut opened = Room::from_checkpoint(room_id(), &room.checkpoint(), all).unwrap();
    let key = Keypair::from_seed([1; 32]);
    for (r, t) in [(&mut room, 0), (&mut opened, 0)] {
        let mut tx = r.begin(key.author(), 99_000 + t);
        tx.text_insert("/notes", 0, "after the checkpoint").unwrap();
        tx.set("/c", "title", "new".into()).unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(opened.state_hash(), room.state_hash());
    let last = room.dag().next_idx() - 1;
    assert_eq!(opened.dag().id(last), room.dag().id(last));
}

#[test]
fn bad_checkpoints_are_refused() {
    let room = history(3, 120);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let all = segments(&room, &mut rng);
    let good = room.checkpoint();
    assert!(Room::from_checkpoint(room_id(), &good, all.clone()).is_ok());
    // Any flipped byte: the checksum catches it.
    for i in [0, 5, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        assert!(
            matches!(
                Room::from_checkpoint(room_id(), &bad, all.clone()),
                Err(CheckpointError::Corrupt(_))
            ),
            "flip at {i}"
        );
    }
    assert!(matches!(
        Room::from_checkpoint(room_id(), &good[..good.len() - 1], all.clone()),
        Err(CheckpointError::Corrupt(_))
    ));
    // Another room's, or covering nodes the segments do not hold.
    let other = RoomId::new("elsewhere").unwrap();
    assert!(matches!(
        Room::from_checkpoint(other, &good, all.clone()),
        Err(CheckpointError::Stale(_))
    ));
    let shorter = prefix(&room, &all, room.dag().next_idx() / 2);
    assert!(matches!(
        Room::from_checkpoint(room_id(), &good, shorter),
        Err(CheckpointError::Stale(_))
    ));
}
