//! The one behavioural definition of [`Store`]: checks that every backend
//! must pass, run by each backend's tests (and by any new backend's).
//!
//! Rules the checks pin down, beyond the trait's docs:
//!
//! - A batch applies, atomically, its nodes, then its signatures, then its
//!   outbox additions, then its outbox removals (so an id both added and
//!   removed in one batch ends up out of the outbox).
//! - Appending a node whose id the room already holds is a no-op, whatever
//!   its bytes or signature; the same id in another room is another node.
//! - A signature attaches only to a node stored in that room (before or in
//!   the same batch) that holds none yet: the first signature wins, one for
//!   an unknown node is ignored.
//! - The outbox keeps the order added; adding a held id is a no-op,
//!   removing an absent one too; an id added again after removal goes last.
//! - `rooms()` lists, sorted, rooms with at least one node: a room with only
//!   an outbox, or only empty batches, is not listed.
//!
//! Each check takes a store and uses its own rooms and metadata keys, so
//! [`run_all`] can run them one after another on a single fresh store.
//! Failures panic with a message naming the rule: this is test support.

use syncline_core::{NodeId, RoomId, Signature};

use crate::{Batch, Store, StoredNode};

/// A deterministic fake node: the id is made from `tag` and `n` (distinct
/// `(tag, n)` give distinct ids: byte 8 is `tag`, bytes 9..17 are `n`), the
/// bytes are opaque filler of varying length. Not a valid encoded node:
/// stores treat bytes as opaque.
pub fn test_node(tag: u8, n: u64) -> StoredNode {
    let mut id = [0u8; 32];
    id[8] = tag;
    id[9..17].copy_from_slice(&n.to_be_bytes());
    // The other bytes are well mixed, as in a hash, so ids of one test do
    // not share prefixes (which a backend may index).
    let mut x = n ^ (u64::from(tag) << 56);
    for range in [0..8, 17..25, 25..32] {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let len = range.len();
        id[range].copy_from_slice(&z.to_le_bytes()[..len]);
    }
    let len = 16 + (n % 97) as usize;
    let bytes = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ tag ^ n as u8)
        .collect();
    StoredNode {
        id: NodeId(id),
        bytes,
        sig: None,
    }
}

/// A deterministic fake signature, distinct for distinct `n`.
pub fn test_signature(n: u64) -> Signature {
    let mut sig = [0xa5u8; 64];
    sig[..8].copy_from_slice(&n.to_be_bytes());
    Signature(sig)
}

fn room(name: &str) -> RoomId {
    RoomId::new(name).expect("conformance room names are valid")
}

fn nodes(tag: u8, range: std::ops::Range<u64>) -> Vec<StoredNode> {
    range.map(|n| test_node(tag, n)).collect()
}

fn ids(nodes: &[StoredNode]) -> Vec<NodeId> {
    nodes.iter().map(|n| n.id).collect()
}

fn commit(store: &dyn Store, room: &RoomId, batch: Batch) {
    if let Err(e) = store.commit(room, batch) {
        panic!("commit to {room} failed: {e}");
    }
}

fn append(store: &dyn Store, room: &RoomId, nodes: Vec<StoredNode>) {
    commit(
        store,
        room,
        Batch {
            nodes,
            ..Batch::default()
        },
    );
}

fn load(store: &dyn Store, room: &RoomId) -> Vec<StoredNode> {
    store
        .load_nodes(room)
        .unwrap_or_else(|e| panic!("load_nodes({room}) failed: {e}"))
}

fn count(store: &dyn Store, room: &RoomId) -> u64 {
    store
        .node_count(room)
        .unwrap_or_else(|e| panic!("node_count({room}) failed: {e}"))
}

fn outbox(store: &dyn Store, room: &RoomId) -> Vec<NodeId> {
    store
        .outbox(room)
        .unwrap_or_else(|e| panic!("outbox({room}) failed: {e}"))
}

fn rooms(store: &dyn Store) -> Vec<RoomId> {
    store
        .rooms()
        .unwrap_or_else(|e| panic!("rooms() failed: {e}"))
}

fn meta(store: &dyn Store, key: &str) -> Option<Vec<u8>> {
    store
        .get_meta(key)
        .unwrap_or_else(|e| panic!("get_meta({key:?}) failed: {e}"))
}

fn put_meta(store: &dyn Store, key: &str, value: &[u8]) {
    if let Err(e) = store.put_meta(key, value) {
        panic!("put_meta({key:?}) failed: {e}");
    }
}

/// Every check, in an order that lets them share one store. `store` must be
/// fresh and empty.
pub fn run_all(store: &dyn Store) {
    empty_store(store);
    append_and_load_order(store);
    idempotent_append(store);
    ids_sharing_a_prefix_are_distinct(store);
    rooms_are_isolated(store);
    outbox_order_and_idempotence(store);
    signatures_attach_to_stored_nodes(store);
    meta_get_put_overwrite(store);
    empty_batch_writes_nothing(store);
    rooms_sorted(store);
    batch_is_atomic(store);
    concurrent_commits(store);
}

/// A fresh store holds nothing, and reading an unknown room is not an error.
pub fn empty_store(store: &dyn Store) {
    assert_eq!(
        rooms(store),
        Vec::<RoomId>::new(),
        "a fresh store has no rooms"
    );
    let r = room("conf-empty");
    assert!(load(store, &r).is_empty(), "an unknown room has no nodes");
    assert_eq!(count(store, &r), 0, "an unknown room counts 0 nodes");
    assert!(
        outbox(store, &r).is_empty(),
        "an unknown room has no outbox"
    );
    assert_eq!(
        meta(store, "conf-empty"),
        None,
        "unknown meta key reads None"
    );
}

/// Nodes load in first-appended order across batches, with bytes and
/// signatures intact, and `node_count` follows.
pub fn append_and_load_order(store: &dyn Store) {
    let r = room("conf-order");
    let mut expected = Vec::new();
    // Ids are not in sorted order across batches: order must be append order.
    for (batch, range) in [(0, 0..3), (1, 5_000..5_002), (2, 10..2_010)]
        .into_iter()
        .map(|(b, range)| (b, range.rev().collect::<Vec<u64>>()))
    {
        let mut batch_nodes: Vec<StoredNode> = range.into_iter().map(|n| test_node(2, n)).collect();
        if batch == 1 {
            batch_nodes[0].sig = Some(test_signature(1));
        }
        expected.extend(batch_nodes.iter().cloned());
        append(store, &r, batch_nodes);
        assert_eq!(
            count(store, &r),
            expected.len() as u64,
            "node_count after batch {batch}"
        );
    }
    let loaded = load(store, &r);
    assert_eq!(loaded.len(), expected.len(), "number of nodes loaded");
    if let Some(at) = loaded.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "node {at} loaded as {:?}, expected {:?} (first-appended order, bytes and signature intact)",
            loaded[at], expected[at]
        );
    }
}

/// Appending a stored id again, in the same batch or a later one, changes
/// nothing: not the order, not the bytes, not the signature.
pub fn idempotent_append(store: &dyn Store) {
    let r = room("conf-idempotent");
    let a = test_node(3, 0);
    let b = test_node(3, 1);
    let c = test_node(3, 2);
    let mut a_again = a.clone();
    a_again.bytes = b"other bytes".to_vec();
    a_again.sig = Some(test_signature(3));
    append(store, &r, vec![a.clone(), b.clone(), a_again.clone()]);
    assert_eq!(
        load(store, &r),
        vec![a.clone(), b.clone()],
        "a duplicate within one batch is skipped"
    );
    append(store, &r, vec![b.clone(), c.clone(), a_again]);
    assert_eq!(
        load(store, &r),
        vec![a, b, c],
        "duplicates across batches are skipped and keep their first position"
    );
    assert_eq!(count(store, &r), 3, "node_count counts distinct nodes");
}

/// Ids equal but for their last bytes are distinct nodes (a backend may
/// index ids by a prefix, but must not confuse them), for dedup and for
/// signatures alike.
pub fn ids_sharing_a_prefix_are_distinct(store: &dyn Store) {
    let r = room("conf-prefix");
    let base = test_node(13, 0);
    let variants: Vec<StoredNode> = [31, 16, 8, 7]
        .into_iter()
        .map(|at| {
            let mut node = base.clone();
            node.id.0[at] ^= 0xff;
            node.bytes.push(at as u8);
            node
        })
        .collect();
    append(store, &r, vec![base.clone(), variants[0].clone()]);
    commit(
        store,
        &r,
        Batch {
            nodes: [&variants[1..], &[base.clone(), variants[0].clone()][..]].concat(),
            signatures: vec![(variants[2].id, test_signature(13))],
            ..Batch::default()
        },
    );
    let mut expected = vec![base];
    expected.extend(variants.iter().cloned());
    expected[3].sig = Some(test_signature(13));
    assert_eq!(
        load(store, &r),
        expected,
        "ids differing only past their first bytes are distinct nodes"
    );
}

/// Rooms do not share nodes or outboxes: the same id in two rooms is two
/// independent entries.
pub fn rooms_are_isolated(store: &dyn Store) {
    let r1 = room("conf-iso/one");
    let r2 = room("conf-iso/two");
    let shared = test_node(4, 0);
    let mut shared_signed = shared.clone();
    shared_signed.sig = Some(test_signature(4));
    commit(
        store,
        &r1,
        Batch {
            nodes: vec![shared.clone(), test_node(4, 1)],
            outbox_add: vec![shared.id],
            ..Batch::default()
        },
    );
    commit(
        store,
        &r2,
        Batch {
            nodes: vec![test_node(4, 2), shared_signed.clone()],
            ..Batch::default()
        },
    );
    assert_eq!(load(store, &r1), vec![shared.clone(), test_node(4, 1)]);
    assert_eq!(
        load(store, &r2),
        vec![test_node(4, 2), shared_signed],
        "the same id in another room is stored again"
    );
    assert_eq!(outbox(store, &r1), vec![shared.id]);
    assert!(outbox(store, &r2).is_empty(), "outboxes are per room");

    commit(
        store,
        &r2,
        Batch {
            outbox_remove: vec![shared.id],
            signatures: vec![(test_node(4, 1).id, test_signature(5))],
            ..Batch::default()
        },
    );
    assert_eq!(
        outbox(store, &r1),
        vec![shared.id],
        "removing from another room's outbox leaves this one"
    );
    assert_eq!(
        load(store, &r1)[1].sig,
        None,
        "a signature committed to another room does not attach here"
    );
    assert_eq!(count(store, &r1), 2);
    assert_eq!(count(store, &r2), 2);
}

/// The outbox keeps the order added; adds and removes are idempotent.
pub fn outbox_order_and_idempotence(store: &dyn Store) {
    let r = room("conf-outbox");
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|n| test_node(5, n).id);
    let outbox_batch = |add: Vec<NodeId>, remove: Vec<NodeId>| Batch {
        outbox_add: add,
        outbox_remove: remove,
        ..Batch::default()
    };
    // Outbox ids need not be stored nodes: the store does not check.
    commit(store, &r, outbox_batch(vec![c, a, b, a], vec![]));
    assert_eq!(
        outbox(store, &r),
        vec![c, a, b],
        "order added, one copy each"
    );
    commit(store, &r, outbox_batch(vec![b, d], vec![]));
    assert_eq!(
        outbox(store, &r),
        vec![c, a, b, d],
        "adding a held id is a no-op"
    );
    commit(store, &r, outbox_batch(vec![], vec![a, e]));
    assert_eq!(
        outbox(store, &r),
        vec![c, b, d],
        "removing an absent id is a no-op"
    );
    commit(store, &r, outbox_batch(vec![a], vec![]));
    assert_eq!(
        outbox(store, &r),
        vec![c, b, d, a],
        "an id added again goes last"
    );
    commit(store, &r, outbox_batch(vec![e], vec![e, c]));
    assert_eq!(
        outbox(store, &r),
        vec![b, d, a],
        "additions apply before removals within a batch"
    );
    assert_eq!(count(store, &r), 0, "the outbox adds no nodes");
}

/// Signatures attach to nodes stored before or in the same batch, only when
/// the node holds none; others are ignored.
pub fn signatures_attach_to_stored_nodes(store: &dyn Store) {
    let r = room("conf-sigs");
    let [n0, n1, n2, n3] = [0, 1, 2, 3].map(|n| test_node(6, n));
    // n3 is not stored yet: its signature must be ignored, not kept aside.
    let unknown = n3.id;
    append(store, &r, vec![n0.clone(), n1.clone()]);
    commit(
        store,
        &r,
        Batch {
            nodes: vec![n2.clone()],
            signatures: vec![
                (n0.id, test_signature(60)),
                (n2.id, test_signature(62)),
                (unknown, test_signature(69)),
            ],
            ..Batch::default()
        },
    );
    let loaded = load(store, &r);
    assert_eq!(
        loaded.len(),
        3,
        "a signature for an unknown node adds no node"
    );
    assert_eq!(
        loaded[0].sig,
        Some(test_signature(60)),
        "attaches to a stored node"
    );
    assert_eq!(loaded[1].sig, None, "other nodes are untouched");
    assert_eq!(
        loaded[2].sig,
        Some(test_signature(62)),
        "attaches to a node of the same batch"
    );
    commit(
        store,
        &r,
        Batch {
            signatures: vec![(n0.id, test_signature(61)), (n1.id, test_signature(63))],
            ..Batch::default()
        },
    );
    let loaded = load(store, &r);
    assert_eq!(
        loaded[0].sig,
        Some(test_signature(60)),
        "the first signature wins"
    );
    assert_eq!(loaded[1].sig, Some(test_signature(63)));
    append(store, &r, vec![n3.clone()]);
    assert_eq!(
        load(store, &r)[3],
        n3,
        "a signature ignored earlier does not attach to the node arriving later"
    );
    let unknown_room = room("conf-sigs/none");
    commit(
        store,
        &unknown_room,
        Batch {
            signatures: vec![(n0.id, test_signature(64))],
            ..Batch::default()
        },
    );
    assert!(
        load(store, &unknown_room).is_empty(),
        "a signature never creates a node"
    );
}

/// Metadata reads back what was last written; an empty value is not None.
pub fn meta_get_put_overwrite(store: &dyn Store) {
    assert_eq!(meta(store, "conf-meta/identity"), None);
    put_meta(store, "conf-meta/identity", b"first");
    put_meta(store, "conf-meta/other", b"");
    assert_eq!(
        meta(store, "conf-meta/identity").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        meta(store, "conf-meta/other").as_deref(),
        Some(&b""[..]),
        "an empty value is stored, not absent"
    );
    let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    put_meta(store, "conf-meta/identity", &big);
    assert_eq!(
        meta(store, "conf-meta/identity"),
        Some(big),
        "put overwrites"
    );
    assert_eq!(meta(store, "conf-meta/other").as_deref(), Some(&b""[..]));
}

/// An empty batch is accepted and writes nothing, not even the room.
pub fn empty_batch_writes_nothing(store: &dyn Store) {
    let r = room("conf-empty-batch");
    commit(store, &r, Batch::default());
    assert!(load(store, &r).is_empty());
    assert!(outbox(store, &r).is_empty());
    assert!(
        !rooms(store).contains(&r),
        "an empty batch does not create a room"
    );
    append(store, &r, vec![test_node(7, 0)]);
    commit(store, &r, Batch::default());
    assert_eq!(load(store, &r), vec![test_node(7, 0)]);
}

/// `rooms()` is sorted and lists exactly the rooms with nodes.
pub fn rooms_sorted(store: &dyn Store) {
    let names = [
        "conf-rooms/b",
        "conf-rooms/a",
        "conf-rooms/c-2",
        "conf-rooms/c-10",
    ];
    for (i, name) in names.iter().enumerate() {
        append(store, &room(name), vec![test_node(8, i as u64)]);
    }
    let outbox_only = room("conf-rooms/outbox-only");
    commit(
        store,
        &outbox_only,
        Batch {
            outbox_add: vec![test_node(8, 9).id],
            ..Batch::default()
        },
    );
    let listed = rooms(store);
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(listed, sorted, "rooms() is sorted without duplicates");
    for name in names {
        assert!(listed.contains(&room(name)), "rooms() lists {name}");
    }
    assert!(
        !listed.contains(&outbox_only),
        "a room with only an outbox is not listed"
    );
}

/// A batch of nodes, outbox additions and signatures is applied whole:
/// a reader running alongside never sees part of one.
pub fn batch_is_atomic(store: &dyn Store) {
    const BATCHES: u64 = 20;
    const PER_BATCH: u64 = 50;
    let r = room("conf-atomic");
    std::thread::scope(|scope| {
        // The writer runs on its own thread so that, if it panics, the
        // reader below still stops (it polls `is_finished`).
        let writer = scope.spawn(|| {
            for b in 0..BATCHES {
                let batch_nodes = nodes(9, b * PER_BATCH..(b + 1) * PER_BATCH);
                let last = batch_nodes[batch_nodes.len() - 1].id;
                commit(
                    store,
                    &r,
                    Batch {
                        outbox_add: ids(&batch_nodes),
                        signatures: vec![(last, test_signature(b))],
                        nodes: batch_nodes,
                        outbox_remove: Vec::new(),
                    },
                );
            }
        });
        loop {
            let done = writer.is_finished();
            let loaded = load(store, &r);
            let seen = loaded.len() as u64;
            assert_eq!(
                seen % PER_BATCH,
                0,
                "a reader saw {seen} nodes: part of a batch"
            );
            if let Some(last) = loaded.last() {
                assert!(
                    last.sig.is_some(),
                    "a reader saw a batch's nodes without its signature"
                );
            }
            if done {
                break;
            }
        }
        if writer.join().is_err() {
            panic!("the writer thread of batch_is_atomic failed");
        }
    });
    let loaded = load(store, &r);
    assert_eq!(ids(&loaded), ids(&nodes(9, 0..BATCHES * PER_BATCH)));
    assert_eq!(
        outbox(store, &r),
        ids(&loaded),
        "every batch's outbox additions"
    );
    for (b, chunk) in loaded.chunks(PER_BATCH as usize).enumerate() {
        assert_eq!(chunk[chunk.len() - 1].sig, Some(test_signature(b as u64)));
    }
}

/// Commits from many threads, to one room and to separate rooms, all land.
pub fn concurrent_commits(store: &dyn Store) {
    const THREADS: u64 = 8;
    const COMMITS: u64 = 25;
    let shared = room("conf-concurrent/shared");
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let shared = &shared;
            scope.spawn(move || {
                let own = room(&format!("conf-concurrent/{t}"));
                for c in 0..COMMITS {
                    let n = t * COMMITS + c;
                    append(store, shared, vec![test_node(10, n)]);
                    append(store, &own, vec![test_node(11, n), test_node(12, c)]);
                    if c % 5 == 0 {
                        put_meta(store, &format!("conf-concurrent/{t}"), &n.to_be_bytes());
                    }
                }
            });
        }
    });
    let mut loaded = ids(&load(store, &shared));
    loaded.sort();
    let mut expected = ids(&nodes(10, 0..THREADS * COMMITS));
    expected.sort();
    assert_eq!(
        loaded, expected,
        "every concurrent commit to one room landed"
    );
    for t in 0..THREADS {
        let own = room(&format!("conf-concurrent/{t}"));
        let expected: Vec<NodeId> = (0..COMMITS)
            .flat_map(|c| [test_node(11, t * COMMITS + c).id, test_node(12, c).id])
            .collect();
        assert_eq!(
            ids(&load(store, &own)),
            expected,
            "thread {t}'s room in its order"
        );
        assert_eq!(
            meta(store, &format!("conf-concurrent/{t}")),
            Some((t * COMMITS + COMMITS - 5).to_be_bytes().to_vec())
        );
    }
}

/// Writes through one store, drops it, reopens it with `open` (which must
/// return the same durable store each time) and checks everything
/// survived, twice, including writes made after a reopen. The first store
/// `open` returns must be empty.
pub fn run_reopen(open: &mut dyn FnMut() -> Box<dyn Store>) {
    let r1 = room("reopen/one");
    let r2 = room("reopen/two");
    let outbox_only = room("reopen/outbox-only");
    let mut first = nodes(20, 0..500);
    first[7].sig = Some(test_signature(7));
    let second = nodes(21, 0..3);

    let store = open();
    assert!(rooms(&*store).is_empty(), "run_reopen needs an empty store");
    append(&*store, &r1, first[..200].to_vec());
    commit(
        &*store,
        &r1,
        Batch {
            nodes: first[200..].to_vec(),
            outbox_add: vec![first[3].id, first[1].id, first[2].id],
            signatures: vec![(first[0].id, test_signature(0))],
            ..Batch::default()
        },
    );
    append(&*store, &r2, second.clone());
    commit(
        &*store,
        &outbox_only,
        Batch {
            outbox_add: vec![second[0].id],
            ..Batch::default()
        },
    );
    put_meta(&*store, "reopen/key", b"value");
    drop(store);

    let mut expected_r1 = first.clone();
    expected_r1[0].sig = Some(test_signature(0));
    let store = open();
    let check = |store: &dyn Store, expected_r1: &[StoredNode], outbox_r1: &[NodeId]| {
        assert_eq!(
            load(store, &r1),
            expected_r1,
            "nodes, order and signatures survive a reopen"
        );
        assert_eq!(count(store, &r1), expected_r1.len() as u64);
        assert_eq!(outbox(store, &r1), outbox_r1, "the outbox survives");
        assert_eq!(load(store, &r2), second);
        assert_eq!(outbox(store, &outbox_only), vec![second[0].id]);
        assert_eq!(rooms(store), vec![r1.clone(), r2.clone()]);
        assert_eq!(meta(store, "reopen/key").as_deref(), Some(&b"value"[..]));
    };
    check(
        &*store,
        &expected_r1,
        &[first[3].id, first[1].id, first[2].id],
    );

    // After a reopen, dedup and order still hold (a backend may have cached
    // counters it must rebuild), and the outbox order continues.
    let extra = nodes(22, 0..5);
    commit(
        &*store,
        &r1,
        Batch {
            nodes: [first[..10].to_vec(), extra.clone()].concat(),
            outbox_add: vec![first[0].id, first[3].id],
            outbox_remove: vec![first[1].id],
            signatures: vec![(first[0].id, test_signature(99))],
        },
    );
    expected_r1.extend(extra);
    let outbox_r1 = [first[3].id, first[2].id, first[0].id];
    check(&*store, &expected_r1, &outbox_r1);
    drop(store);

    let store = open();
    check(&*store, &expected_r1, &outbox_r1);
}
