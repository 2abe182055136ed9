//! Merging consecutive segments into one.
//!
//! Appending a segment per write keeps writes cheap, but each small pack
//! carries its own tables and compresses alone. Merged, a history costs
//! about what one pack of it costs: nodes that cite one another across the
//! old boundaries cite by position again, and signatures stored beside the
//! segments move into the merged one. Merging decodes and re-encodes
//! columns; it hashes nothing, so it is cheap enough for a background
//! thread.

use std::collections::HashMap;

use syncline_core::pack::{self, PackError, ParentRef, RawNode};
use syncline_core::{AuthorId, RoomId, Signature};

use crate::Segment;

/// `segments` (consecutive) as one segment, with `signatures` (by node
/// number; those outside the segments are left out) folded in, compressed
/// at zstd `level`.
pub fn merge_segments(
    room: &RoomId,
    segments: &[Segment],
    signatures: &[(u32, Signature)],
    level: i32,
) -> Result<Segment, PackError> {
    let start = segments.first().map_or(0, |s| s.start);
    let mut nodes: Vec<RawNode> = Vec::new();
    let mut sigs: Vec<(usize, Signature)> = Vec::new();
    let mut position: HashMap<(AuthorId, u64), usize> = HashMap::new();
    for segment in segments {
        let offset = nodes.len();
        if segment.start as usize != start as usize + offset {
            return Err(PackError::TooLarge("segments to merge are not consecutive"));
        }
        let raw = pack::decode_raw(&segment.pack, room)?;
        for mut node in raw.nodes {
            for r in &mut node.parent_refs {
                *r = match *r {
                    ParentRef::InPack(j) => ParentRef::InPack(offset + j),
                    ParentRef::Held(a, s) | ParentRef::WithId(a, s, _) => {
                        match position.get(&(a, s)) {
                            Some(&at) => ParentRef::InPack(at),
                            None => *r,
                        }
                    }
                };
            }
            position.insert((node.node.author, node.node.seq), nodes.len());
            nodes.push(node);
        }
        sigs.extend(raw.signatures.into_iter().map(|(at, s)| (offset + at, s)));
    }
    for &(node, sig) in signatures {
        if let Some(at) = node.checked_sub(start).map(|at| at as usize)
            && at < nodes.len()
            && !sigs.iter().any(|(held, _)| *held == at)
        {
            sigs.push((at, sig));
        }
    }
    sigs.sort_unstable_by_key(|(at, _)| *at);
    Ok(Segment {
        start,
        len: nodes.len() as u32,
        pack: pack::encode(room, &nodes, &sigs, level).into_boxed_slice(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncline_core::dag::Dag;
    use syncline_core::{Keypair, Room, Value};

    #[test]
    fn merged_segments_hold_the_same_history_in_fewer_bytes() {
        let room_id = RoomId::new("merge").unwrap();
        let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let mut a = Room::new(room_id.clone());
        let mut b = Room::new(room_id.clone());
        for i in 0..300u64 {
            let (room, key) = if i % 7 == 3 {
                (&mut b, &kb)
            } else {
                (&mut a, &ka)
            };
            let mut tx = room.begin(key.author(), 1_000 + i);
            tx.text_insert("/t", 0, "xy").unwrap();
            tx.set("/f", "v", Value::Int(i as i64)).unwrap();
            tx.commit().unwrap();
            if i % 50 == 49 {
                let missing = b
                    .dag()
                    .missing_for_version_vector(&a.dag().version_vector());
                let pack = b.pack(&missing, Some(&kb)).unwrap();
                a.receive_pack(&pack).unwrap();
            }
        }
        // One segment per node, as appends leave them.
        let n = a.dag().next_idx();
        let small: Vec<Segment> = (0..n).map(|i| a.dag().segment(i..i + 1, 3)).collect();
        let signatures = [(5, ka.sign(&a.dag().id(5)))];
        let merged = merge_segments(&room_id, &small, &signatures, 9).unwrap();
        assert_eq!((merged.start, merged.len), (0, n));
        let small_bytes: usize = small.iter().map(|s| s.pack.len()).sum();
        assert!(
            merged.pack.len() * 5 < small_bytes,
            "{} vs {small_bytes}",
            merged.pack.len()
        );
        // The same history, ids and all, and the signature carried over.
        let original = Dag::from_segments(room_id.clone(), small).unwrap();
        let again = Dag::from_segments(room_id.clone(), vec![merged]).unwrap();
        assert_eq!(again.id_index(), original.id_index());
        assert!(again.signature(5).is_some());
        let replayed = Room::with_dag(again);
        assert_eq!(replayed.state_hash(), a.state_hash());
    }
}
