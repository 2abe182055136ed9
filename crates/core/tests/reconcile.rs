//! Two rooms that share a history and then diverge find exactly what each
//! lacks with RIBLT and with the Merkle Search Tree, exchange packs, and
//! converge; a sketch kept up to date equals one built from scratch.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncline_core::recon::mst::{self, Reconciler};
use syncline_core::recon::riblt::{Decoder, key_of};
use syncline_core::{Keypair, NodeId, NodeIdx, Room, RoomId, Value};

fn edit(room: &mut Room, key: &Keypair, rng: &mut ChaCha8Rng, n: usize) {
    for _ in 0..n {
        let now = room.clock().wall_ms + 1;
        let mut tx = room.begin(key.author(), now);
        let path = format!("/p/{}", rng.random_range(0..20));
        tx.set(&path, "v", Value::Int(rng.random_range(0..1000)))
            .unwrap();
        let len = tx.doc().resolve("/t").map_or(0, |t| tx.doc().text_len(&t));
        tx.text_insert("/t", rng.random_range(0..=len), "ab")
            .unwrap();
        tx.commit().unwrap();
    }
}

fn send(from: &mut Room, key: &Keypair, nodes: &[NodeIdx], to: &mut Room) {
    if nodes.is_empty() {
        return;
    }
    let pack = from.pack(nodes, Some(key)).unwrap();
    to.receive_pack(&pack).unwrap();
}

fn ids(room: &Room) -> BTreeSet<NodeId> {
    (0..room.dag().next_idx())
        .map(|i| room.dag().id(i))
        .collect()
}

/// Rooms a and b with a shared base, then `da` and `db` local edits each.
fn diverged(seed: u64, base: usize, da: usize, db: usize) -> (Room, Keypair, Room, Keypair) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let id = RoomId::new("recon").unwrap();
    let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
    let (mut a, mut b) = (Room::new(id.clone()), Room::new(id));
    edit(&mut a, &ka, &mut rng, base);
    let all = a.dag().causal_order();
    send(&mut a, &ka, &all, &mut b);
    // Build the indexes before diverging, so they are kept up to date
    // rather than built from scratch.
    a.sketch();
    b.sketch();
    a.id_tree();
    b.id_tree();
    edit(&mut a, &ka, &mut rng, da);
    edit(&mut b, &kb, &mut rng, db);
    (a, ka, b, kb)
}

#[test]
fn riblt_finds_the_exact_difference_and_rooms_converge() {
    for (seed, base, da, db) in [
        (1, 300, 0, 0),
        (2, 300, 7, 0),
        (3, 200, 40, 55),
        (4, 50, 300, 1),
    ] {
        let (mut a, ka, mut b, kb) = diverged(seed, base, da, db);
        let (only_a, only_b): (BTreeSet<NodeId>, BTreeSet<NodeId>) = {
            let (sa, sb) = (ids(&a), ids(&b));
            (
                sa.difference(&sb).copied().collect(),
                sb.difference(&sa).copied().collect(),
            )
        };
        // a is the server: it streams its sketch; b decodes against its own.
        let mut decoder = Decoder::new();
        let mut sent = 0;
        while !decoder.is_decoded() {
            let symbols = a.sketch().symbols(sent..sent + 16).to_vec();
            decoder.add_symbols(&symbols, b.sketch()).unwrap();
            sent += 16;
        }
        let diff = decoder.difference();
        let want_b: BTreeSet<_> = only_a.iter().map(|id| key_of(&id.0)).collect();
        let want_a: BTreeSet<_> = only_b.iter().map(|id| key_of(&id.0)).collect();
        assert_eq!(
            diff.remote_only.iter().copied().collect::<BTreeSet<_>>(),
            want_b,
            "seed {seed}"
        );
        assert_eq!(
            diff.local_only.iter().copied().collect::<BTreeSet<_>>(),
            want_a,
            "seed {seed}"
        );
        // Each side maps the keys back to its own nodes and ships them.
        let for_b = a.nodes_for_keys(&diff.remote_only);
        let for_a = b.nodes_for_keys(&diff.local_only);
        send(&mut a, &ka, &for_b, &mut b);
        send(&mut b, &kb, &for_a, &mut a);
        assert_eq!(a.state_hash(), b.state_hash(), "seed {seed}");
        assert_eq!(ids(&a), ids(&b));
        // The maintained sketches still agree symbol for symbol.
        assert_eq!(a.sketch().symbols(0..4096), b.sketch().symbols(0..4096));
    }
}

#[test]
fn mst_finds_the_exact_difference_and_rooms_converge() {
    for (seed, base, da, db) in [(5, 300, 0, 0), (6, 300, 30, 2), (7, 100, 200, 150)] {
        let (mut a, ka, mut b, kb) = diverged(seed, base, da, db);
        let (sa, sb) = (ids(&a), ids(&b));
        // b initiates; a answers.
        let a_tree = a.id_tree().clone();
        let b_tree = b.id_tree().clone();
        let (mut rec, mut requests) = Reconciler::new();
        let mut trips = 0;
        while !requests.is_empty() {
            trips += 1;
            let answers = mst::respond(&a_tree, &requests);
            requests = rec.step(&b_tree, answers).unwrap();
        }
        assert!(rec.is_done());
        let diff = rec.into_diff();
        // The responder resolves the prefixes it was sent.
        let remote: BTreeSet<NodeId> = a
            .nodes_for_key_prefixes(&diff.remote_only)
            .into_iter()
            .map(|n| a.dag().id(n))
            .collect();
        assert_eq!(remote.len(), diff.remote_only.len());
        let local: BTreeSet<NodeId> = diff.local_only.iter().map(|k| NodeId(*k)).collect();
        assert_eq!(remote, sa.difference(&sb).copied().collect(), "seed {seed}");
        assert_eq!(local, sb.difference(&sa).copied().collect(), "seed {seed}");
        assert!(trips <= 8, "seed {seed}: {trips} round trips");
        let for_b = a.nodes_for_ids(&remote.iter().copied().collect::<Vec<_>>());
        let for_a = b.nodes_for_ids(&local.iter().copied().collect::<Vec<_>>());
        send(&mut a, &ka, &for_b, &mut b);
        send(&mut b, &kb, &for_a, &mut a);
        assert_eq!(a.state_hash(), b.state_hash(), "seed {seed}");
        assert_eq!(a.id_tree().root_hash(), b.id_tree().root_hash());
    }
}
