//! The one behavioural definition of [`Store`]: checks that every backend
//! must pass, run by each backend's tests (and by any new backend's).
//!
//! Rules the checks pin down, beyond the trait's docs:
//!
//! - A batch applies, atomically, its segment, then its signatures, then
//!   its outbox additions, then its outbox removals, then its checkpoint
//!   (so a seq both added and removed in one batch ends up out of the
//!   outbox, and a signature may name a node of the batch's segment).
//! - A segment must start where the stored history ends. One whose nodes
//!   are all stored already (a retry) is skipped; one that leaves a gap or
//!   overlaps the end is refused with [`StoreError::Invalid`] and nothing
//!   of its batch is written.
//! - A backend may merge stored segments (the history then loads as fewer,
//!   larger segments, and signatures may move into them): the checks
//!   compare the nodes and signatures a room's segments hold, not how they
//!   are cut.
//! - A signature attaches only to a node stored in that room (before or in
//!   the same batch) that holds none yet: the first signature wins, one for
//!   an unknown node is ignored. A backend may still return a later
//!   signature beside a segment that holds the node's first: readers take
//!   the segment's (see [`held`]).
//! - The outbox is a set of seqs, listed ascending.
//! - The last checkpoint written is the one loaded.
//! - A batch with `expect_nodes` applies only to a history of exactly
//!   that many nodes; otherwise it is refused with [`StoreError::Invalid`]
//!   and nothing of it is written (even a segment that would be skipped as
//!   a retry).
//! - `load_tail(room, from)` holds the nodes from `from` on (its first
//!   segment may start before), their signatures, the whole outbox and the
//!   stored checkpoint's node count: what `load` holds past `from`.
//! - `rooms()` lists, sorted, rooms with at least one node: a room with only
//!   an outbox or a checkpoint, or only empty batches, is not listed.
//!
//! Each check takes a store and uses its own rooms and metadata keys, so
//! [`run_all`] can run them one after another on a single fresh store.
//! Failures panic with a message naming the rule: this is test support.

use std::collections::BTreeMap;

use syncline_core::node::NodeFormat;
use syncline_core::pack::{self, ParentRef, RawNode};
use syncline_core::{AuthorId, EntryId, Hlc, Node, Op, RoomId, Signature, Value};

use crate::{Batch, Segment, Store, StoreError, StoredRoom, StoredTail};

/// A deterministic segment of `count` nodes (at least 1) of `room`, the
/// history's nodes `start..start + count`: one author per `tag`, writing
/// one chain (node `n` is its seq `n + 1`, citing seq `n`). A real pack,
/// so a backend that merges segments can, but the nodes are not signed and
/// would not pass verification: stores do not verify.
pub fn test_segment(room: &RoomId, tag: u8, start: u32, count: u32) -> Segment {
    assert!(count > 0, "a test segment holds at least one node");
    let author = AuthorId([tag; 32]);
    let nodes: Vec<RawNode> = (start..start + count)
        .map(|n| {
            let seq = u64::from(n) + 1;
            let parent_refs = if n == start {
                (n > 0)
                    .then_some(ParentRef::Held(author, seq - 1))
                    .into_iter()
                    .collect()
            } else {
                vec![ParentRef::InPack((n - start - 1) as usize)]
            };
            let node = Node {
                format: NodeFormat::V2,
                room: room.clone(),
                author,
                seq,
                parents: Vec::new(),
                lamport: seq,
                hlc: Hlc {
                    wall_ms: 1_000 + u64::from(n),
                    counter: 0,
                },
                ops: vec![Op::Set {
                    entry: EntryId::ROOT,
                    field: format!("field-{}", n % 7),
                    value: Value::Int(i64::from(n) * i64::from(tag)),
                }],
            };
            RawNode { node, parent_refs }
        })
        .collect();
    Segment {
        start,
        len: count,
        pack: pack::encode(room, &nodes, &[], 3).into_boxed_slice(),
    }
}

/// A deterministic fake signature, distinct for distinct `n`.
pub fn test_signature(n: u64) -> Signature {
    let mut sig = [0xa5u8; 64];
    sig[..8].copy_from_slice(&n.to_be_bytes());
    Signature(sig)
}

/// What a room's stored segments hold, however they are cut: each node's
/// (author, seq) in history order, and every signature (in segments or
/// beside them) by node number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// (author, seq) of node 0, 1, 2, ...
    pub nodes: Vec<(AuthorId, u64)>,
    /// Signatures by node number.
    pub signatures: BTreeMap<u32, Signature>,
}

/// Decodes what `stored` holds of `room`. Panics if its segments do not
/// follow each other from node 0 or do not decode: a store must give back
/// what it was given.
pub fn held(room: &RoomId, stored: &StoredRoom) -> Held {
    let mut out = Held::default();
    for segment in &stored.segments {
        assert_eq!(
            segment.start as usize,
            out.nodes.len(),
            "room {room}: segments load in order, each where the last ended"
        );
        let raw = pack::decode_raw(&segment.pack, room)
            .unwrap_or_else(|e| panic!("room {room}: a stored segment does not decode: {e}"));
        assert_eq!(
            raw.nodes.len(),
            segment.len as usize,
            "room {room}: a segment holds the nodes it says"
        );
        for (at, sig) in raw.signatures {
            out.signatures.insert(segment.start + at as u32, sig);
        }
        out.nodes
            .extend(raw.nodes.iter().map(|r| (r.node.author, r.node.seq)));
    }
    // A signature in a segment was stored first: one beside it for the
    // same node came later and does not count.
    for &(node, sig) in &stored.signatures {
        out.signatures.entry(node).or_insert(sig);
    }
    out
}

/// What `test_segment(_, tag, start, count)` holds, as [`Held::nodes`].
pub fn test_nodes(tag: u8, start: u32, count: u32) -> Vec<(AuthorId, u64)> {
    (start..start + count)
        .map(|n| (AuthorId([tag; 32]), u64::from(n) + 1))
        .collect()
}

fn room(name: &str) -> RoomId {
    RoomId::new(name).expect("conformance room names are valid")
}

fn commit(store: &dyn Store, room: &RoomId, batch: Batch) {
    if let Err(e) = store.commit(room, batch) {
        panic!("commit to {room} failed: {e}");
    }
}

fn append(store: &dyn Store, room: &RoomId, tag: u8, count: u32) {
    let start = count_of(store, room) as u32;
    commit(
        store,
        room,
        Batch {
            segments: vec![test_segment(room, tag, start, count)],
            ..Batch::default()
        },
    );
}

fn load(store: &dyn Store, room: &RoomId) -> StoredRoom {
    store
        .load(room)
        .unwrap_or_else(|e| panic!("load({room}) failed: {e}"))
}

fn load_held(store: &dyn Store, room: &RoomId) -> Held {
    held(room, &load(store, room))
}

fn count_of(store: &dyn Store, room: &RoomId) -> u64 {
    store
        .node_count(room)
        .unwrap_or_else(|e| panic!("node_count({room}) failed: {e}"))
}

fn outbox(store: &dyn Store, room: &RoomId) -> Vec<u64> {
    load(store, room).outbox
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
    append_and_load(store);
    replays_skip_and_gaps_refuse(store);
    rooms_are_isolated(store);
    outbox_is_a_set(store);
    signatures_attach_to_stored_nodes(store);
    last_checkpoint_wins(store);
    meta_get_put_overwrite(store);
    empty_batch_writes_nothing(store);
    rooms_sorted(store);
    batch_is_atomic(store);
    concurrent_commits(store);
    tails_hold_what_follows(store);
    stale_batches_refuse(store);
    locks_let_their_holders_commit(store);
}

/// A fresh store holds nothing, and reading an unknown room is not an error.
pub fn empty_store(store: &dyn Store) {
    assert_eq!(
        rooms(store),
        Vec::<RoomId>::new(),
        "a fresh store has no rooms"
    );
    let r = room("conf-empty");
    assert_eq!(
        load(store, &r),
        StoredRoom::default(),
        "an unknown room holds nothing"
    );
    assert_eq!(count_of(store, &r), 0, "an unknown room counts 0 nodes");
    let bytes = store
        .room_bytes(&r)
        .unwrap_or_else(|e| panic!("room_bytes failed: {e}"));
    assert_eq!(
        bytes,
        crate::RoomBytes::default(),
        "an unknown room takes 0 bytes"
    );
    assert_eq!(
        meta(store, "conf-empty"),
        None,
        "unknown meta key reads None"
    );
}

/// Appended segments load as the same nodes in order, `node_count` and
/// `room_bytes` follow.
pub fn append_and_load(store: &dyn Store) {
    let r = room("conf-order");
    let mut expected = Vec::new();
    for (tag, count) in [(2, 3), (3, 1), (2, 2_000), (4, 17)] {
        let start = expected.len() as u32;
        expected.extend(test_nodes(tag, start, count));
        append(store, &r, tag, count);
        assert_eq!(
            count_of(store, &r),
            expected.len() as u64,
            "node_count after appending {count} nodes"
        );
    }
    assert_eq!(load_held(store, &r).nodes, expected, "nodes load in order");
    let bytes = store
        .room_bytes(&r)
        .unwrap_or_else(|e| panic!("room_bytes failed: {e}"));
    assert!(
        bytes.history > 0 && bytes.segments >= 1 && bytes.checkpoint == 0,
        "room_bytes counts the history: {bytes:?}"
    );
}

/// A segment already stored is skipped; one that leaves a gap or overlaps
/// the end is refused, and nothing of its batch is written.
pub fn replays_skip_and_gaps_refuse(store: &dyn Store) {
    let r = room("conf-append");
    let first = test_segment(&r, 5, 0, 10);
    commit(
        store,
        &r,
        Batch {
            segments: vec![first.clone()],
            ..Batch::default()
        },
    );
    // A retry of the same write, and a replay of part of the history.
    for replay in [first, test_segment(&r, 5, 3, 4)] {
        commit(
            store,
            &r,
            Batch {
                segments: vec![replay],
                outbox_add: vec![1],
                ..Batch::default()
            },
        );
    }
    assert_eq!(count_of(store, &r), 10, "a replayed segment adds nothing");
    assert_eq!(load_held(store, &r).nodes, test_nodes(5, 0, 10));
    assert_eq!(outbox(store, &r), vec![1], "the rest of the batch applies");
    for (bad, what) in [
        (test_segment(&r, 5, 11, 3), "a gap"),
        (test_segment(&r, 5, 8, 5), "an overlap"),
    ] {
        let refused = store.commit(
            &r,
            Batch {
                segments: vec![bad],
                signatures: vec![(2, test_signature(2))],
                outbox_add: vec![7],
                checkpoint: Some(b"refused".to_vec()),
                ..Batch::default()
            },
        );
        assert!(
            matches!(refused, Err(StoreError::Invalid(_))),
            "a segment leaving {what} is refused as Invalid, got {refused:?}"
        );
        let stored = load(store, &r);
        assert_eq!(
            stored.outbox,
            vec![1],
            "nothing of a refused batch is written"
        );
        assert_eq!(
            stored.checkpoint, None,
            "nothing of a refused batch is written"
        );
        assert!(held(&r, &stored).signatures.is_empty());
        assert_eq!(count_of(store, &r), 10);
    }
    append(store, &r, 5, 2);
    assert_eq!(
        load_held(store, &r).nodes,
        test_nodes(5, 0, 12),
        "the room goes on after a refusal"
    );
    // Several segments in one batch: a replay, then two that continue.
    commit(
        store,
        &r,
        Batch {
            segments: vec![
                test_segment(&r, 5, 4, 8),
                test_segment(&r, 5, 12, 2),
                test_segment(&r, 5, 14, 3),
            ],
            ..Batch::default()
        },
    );
    assert_eq!(load_held(store, &r).nodes, test_nodes(5, 0, 17));
    let refused = store.commit(
        &r,
        Batch {
            segments: vec![test_segment(&r, 5, 17, 2), test_segment(&r, 5, 20, 1)],
            ..Batch::default()
        },
    );
    assert!(
        matches!(refused, Err(StoreError::Invalid(_))),
        "a gap between a batch's segments is refused, got {refused:?}"
    );
    assert_eq!(
        count_of(store, &r),
        17,
        "the good segment before the gap is not written either"
    );
}

/// Rooms share nothing: the same segment in two rooms is two histories,
/// and outboxes, signatures and checkpoints are per room.
pub fn rooms_are_isolated(store: &dyn Store) {
    let r1 = room("conf-iso/one");
    let r2 = room("conf-iso/two");
    commit(
        store,
        &r1,
        Batch {
            segments: vec![test_segment(&r1, 6, 0, 2)],
            outbox_add: vec![1],
            checkpoint: Some(b"one".to_vec()),
            ..Batch::default()
        },
    );
    commit(
        store,
        &r2,
        Batch {
            segments: vec![test_segment(&r2, 7, 0, 3)],
            signatures: vec![(1, test_signature(4))],
            outbox_remove: vec![1],
            ..Batch::default()
        },
    );
    let (one, two) = (load(store, &r1), load(store, &r2));
    assert_eq!(held(&r1, &one).nodes, test_nodes(6, 0, 2));
    assert_eq!(held(&r2, &two).nodes, test_nodes(7, 0, 3));
    assert_eq!(
        one.outbox,
        vec![1],
        "removing from another room's outbox leaves this one"
    );
    assert!(two.outbox.is_empty());
    assert!(
        held(&r1, &one).signatures.is_empty(),
        "a signature committed to another room does not attach here"
    );
    assert_eq!(one.checkpoint.as_deref(), Some(&b"one"[..]));
    assert_eq!(two.checkpoint, None, "checkpoints are per room");
}

/// The outbox is a set of seqs, ascending; additions apply before removals
/// within a batch; it needs no stored node.
pub fn outbox_is_a_set(store: &dyn Store) {
    let r = room("conf-outbox");
    let outbox_batch = |add: Vec<u64>, remove: Vec<u64>| Batch {
        outbox_add: add,
        outbox_remove: remove,
        ..Batch::default()
    };
    commit(store, &r, outbox_batch(vec![30, 10, 20, 10], vec![]));
    assert_eq!(
        outbox(store, &r),
        vec![10, 20, 30],
        "ascending, one copy each"
    );
    commit(store, &r, outbox_batch(vec![20, 40], vec![]));
    assert_eq!(
        outbox(store, &r),
        vec![10, 20, 30, 40],
        "adding a held seq is a no-op"
    );
    commit(store, &r, outbox_batch(vec![], vec![10, 50]));
    assert_eq!(
        outbox(store, &r),
        vec![20, 30, 40],
        "removing an absent seq is a no-op"
    );
    commit(store, &r, outbox_batch(vec![50], vec![50, 30]));
    assert_eq!(
        outbox(store, &r),
        vec![20, 40],
        "additions apply before removals within a batch"
    );
    assert_eq!(count_of(store, &r), 0, "the outbox adds no nodes");
    assert!(
        !rooms(store).contains(&r),
        "a room with only an outbox is not listed"
    );
}

/// Signatures attach to nodes stored before or in the same batch; the first
/// one wins; others are ignored.
pub fn signatures_attach_to_stored_nodes(store: &dyn Store) {
    let r = room("conf-sigs");
    append(store, &r, 8, 2);
    commit(
        store,
        &r,
        Batch {
            segments: vec![test_segment(&r, 8, 2, 1)],
            // Node 3 is not stored: its signature must be ignored, not kept
            // aside for later.
            signatures: vec![
                (0, test_signature(60)),
                (2, test_signature(62)),
                (3, test_signature(69)),
            ],
            ..Batch::default()
        },
    );
    let sigs = load_held(store, &r).signatures;
    assert_eq!(
        sigs.get(&0),
        Some(&test_signature(60)),
        "attaches to a stored node"
    );
    assert_eq!(sigs.get(&1), None, "other nodes are untouched");
    assert_eq!(
        sigs.get(&2),
        Some(&test_signature(62)),
        "attaches to a node of the same batch"
    );
    commit(
        store,
        &r,
        Batch {
            signatures: vec![(0, test_signature(61)), (1, test_signature(63))],
            ..Batch::default()
        },
    );
    let sigs = load_held(store, &r).signatures;
    assert_eq!(
        sigs.get(&0),
        Some(&test_signature(60)),
        "the first signature wins"
    );
    assert_eq!(sigs.get(&1), Some(&test_signature(63)));
    append(store, &r, 8, 1);
    assert_eq!(
        load_held(store, &r).signatures.get(&3),
        None,
        "a signature ignored earlier does not attach to the node arriving later"
    );
    let unknown_room = room("conf-sigs/none");
    commit(
        store,
        &unknown_room,
        Batch {
            signatures: vec![(0, test_signature(64))],
            ..Batch::default()
        },
    );
    assert_eq!(
        load(store, &unknown_room),
        StoredRoom::default(),
        "a signature never creates a node"
    );
}

/// The last checkpoint written is the one loaded; a checkpoint alone does
/// not list the room.
pub fn last_checkpoint_wins(store: &dyn Store) {
    let r = room("conf-checkpoint");
    let checkpoint = |bytes: &[u8]| Batch {
        checkpoint: Some(bytes.to_vec()),
        ..Batch::default()
    };
    commit(store, &r, checkpoint(b"first"));
    assert_eq!(load(store, &r).checkpoint.as_deref(), Some(&b"first"[..]));
    assert!(
        !rooms(store).contains(&r),
        "a room with only a checkpoint is not listed"
    );
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    commit(store, &r, checkpoint(&big));
    append(store, &r, 9, 4);
    let stored = load(store, &r);
    assert_eq!(
        stored.checkpoint.as_ref(),
        Some(&big),
        "the last checkpoint wins"
    );
    let bytes = store
        .room_bytes(&r)
        .unwrap_or_else(|e| panic!("room_bytes failed: {e}"));
    assert_eq!(
        bytes.checkpoint,
        big.len() as u64,
        "room_bytes counts the checkpoint"
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
    assert_eq!(load(store, &r), StoredRoom::default());
    assert!(
        !rooms(store).contains(&r),
        "an empty batch does not create a room"
    );
    append(store, &r, 10, 1);
    commit(store, &r, Batch::default());
    assert_eq!(load_held(store, &r).nodes, test_nodes(10, 0, 1));
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
        append(store, &room(name), 11 + i as u8, 1);
    }
    let listed = rooms(store);
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(listed, sorted, "rooms() is sorted without duplicates");
    for name in names {
        assert!(listed.contains(&room(name)), "rooms() lists {name}");
    }
}

/// A batch of a segment, signatures, outbox additions and a checkpoint is
/// applied whole: a reader running alongside never sees part of one.
pub fn batch_is_atomic(store: &dyn Store) {
    const BATCHES: u32 = 40;
    const PER_BATCH: u32 = 50;
    let r = room("conf-atomic");
    std::thread::scope(|scope| {
        // The writer runs on its own thread so that, if it panics, the
        // reader below still stops (it polls `is_finished`).
        let writer = scope.spawn(|| {
            for b in 0..BATCHES {
                let start = b * PER_BATCH;
                let last = start + PER_BATCH - 1;
                commit(
                    store,
                    &r,
                    Batch {
                        segments: vec![test_segment(&r, 15, start, PER_BATCH)],
                        signatures: vec![(last, test_signature(u64::from(b)))],
                        outbox_add: (u64::from(start) + 1..=u64::from(last) + 1).collect(),
                        outbox_remove: Vec::new(),
                        checkpoint: Some(last.to_be_bytes().to_vec()),
                        expect_nodes: Some(u64::from(start)),
                    },
                );
            }
        });
        loop {
            let done = writer.is_finished();
            let stored = load(store, &r);
            let seen = held(&r, &stored);
            let n = seen.nodes.len() as u32;
            assert_eq!(n % PER_BATCH, 0, "a reader saw {n} nodes: part of a batch");
            assert_eq!(
                stored.outbox.len() as u32,
                n,
                "nodes and outbox of one batch"
            );
            if n > 0 {
                assert!(
                    seen.signatures.contains_key(&(n - 1)),
                    "a reader saw a batch's nodes without its signature"
                );
                assert_eq!(
                    stored.checkpoint,
                    Some((n - 1).to_be_bytes().to_vec()),
                    "a reader saw a batch's nodes without its checkpoint"
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
    let stored = load(store, &r);
    let seen = held(&r, &stored);
    assert_eq!(seen.nodes, test_nodes(15, 0, BATCHES * PER_BATCH));
    assert_eq!(seen.signatures.len() as u32, BATCHES);
    assert_eq!(
        stored.outbox,
        (1..=u64::from(BATCHES * PER_BATCH)).collect::<Vec<_>>()
    );
}

/// Commits from many threads to separate rooms, and metadata puts, all
/// land.
pub fn concurrent_commits(store: &dyn Store) {
    const THREADS: u8 = 8;
    const COMMITS: u32 = 25;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            scope.spawn(move || {
                let own = room(&format!("conf-concurrent/{t}"));
                for c in 0..COMMITS {
                    append(store, &own, 20 + t, 1 + c % 3);
                    if c % 5 == 0 {
                        put_meta(store, &format!("conf-concurrent/{t}"), &c.to_be_bytes());
                    }
                }
            });
        }
    });
    let total: u32 = (0..COMMITS).map(|c| 1 + c % 3).sum();
    for t in 0..THREADS {
        let own = room(&format!("conf-concurrent/{t}"));
        assert_eq!(
            load_held(store, &own).nodes,
            test_nodes(20 + t, 0, total),
            "thread {t}'s room in its order"
        );
        assert_eq!(
            meta(store, &format!("conf-concurrent/{t}")),
            Some((COMMITS - 5).to_be_bytes().to_vec())
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

    let store = open();
    assert!(rooms(&*store).is_empty(), "run_reopen needs an empty store");
    append(&*store, &r1, 30, 200);
    commit(
        &*store,
        &r1,
        Batch {
            segments: vec![test_segment(&r1, 30, 200, 300)],
            outbox_add: vec![4, 2, 3],
            signatures: vec![(0, test_signature(0)), (7, test_signature(7))],
            checkpoint: Some(b"at 500".to_vec()),
            ..Batch::default()
        },
    );
    append(&*store, &r2, 31, 3);
    commit(
        &*store,
        &outbox_only,
        Batch {
            outbox_add: vec![9],
            ..Batch::default()
        },
    );
    put_meta(&*store, "reopen/key", b"value");
    drop(store);

    let check = |store: &dyn Store, nodes: u32, outbox_r1: &[u64], checkpoint: &[u8]| {
        let stored = load(store, &r1);
        let seen = held(&r1, &stored);
        assert_eq!(
            seen.nodes,
            test_nodes(30, 0, nodes),
            "nodes survive a reopen"
        );
        assert_eq!(
            seen.signatures.into_iter().collect::<Vec<_>>(),
            vec![(0, test_signature(0)), (7, test_signature(7))],
            "signatures survive a reopen"
        );
        assert_eq!(count_of(store, &r1), u64::from(nodes));
        assert_eq!(stored.outbox, outbox_r1, "the outbox survives");
        assert_eq!(
            stored.checkpoint.as_deref(),
            Some(checkpoint),
            "the checkpoint survives"
        );
        assert_eq!(load_held(store, &r2).nodes, test_nodes(31, 0, 3));
        assert_eq!(outbox(store, &outbox_only), vec![9]);
        assert_eq!(rooms(store), vec![r1.clone(), r2.clone()]);
        assert_eq!(meta(store, "reopen/key").as_deref(), Some(&b"value"[..]));
    };
    let store = open();
    check(&*store, 500, &[2, 3, 4], b"at 500");

    // After a reopen, appends continue where the history ends (a backend
    // may have cached counts it must rebuild), replays are still skipped
    // and the first signature still wins.
    commit(
        &*store,
        &r1,
        Batch {
            segments: vec![test_segment(&r1, 30, 0, 10)],
            ..Batch::default()
        },
    );
    commit(
        &*store,
        &r1,
        Batch {
            segments: vec![test_segment(&r1, 30, 500, 5)],
            outbox_add: vec![1, 4],
            outbox_remove: vec![2],
            signatures: vec![(0, test_signature(99))],
            checkpoint: Some(b"at 505".to_vec()),
            expect_nodes: Some(500),
        },
    );
    check(&*store, 505, &[1, 3, 4], b"at 505");
    drop(store);

    let store = open();
    check(&*store, 505, &[1, 3, 4], b"at 505");
}

/// `load_tail` holds what `load` holds from a node on: the nodes from it
/// (whole segments), their signatures, the outbox and the checkpoint's
/// coverage; an unknown room's tail and the tail at the end are empty.
pub fn tails_hold_what_follows(store: &dyn Store) {
    let r = room("conf-tail");
    let tail = |from: u64| -> StoredTail {
        store
            .load_tail(&r, from)
            .unwrap_or_else(|e| panic!("load_tail({r}, {from}) failed: {e}"))
    };
    assert_eq!(tail(0), StoredTail::default(), "an unknown room's tail");
    append(store, &r, 6, 4);
    append(store, &r, 7, 3);
    commit(
        store,
        &r,
        Batch {
            signatures: vec![(1, test_signature(1)), (5, test_signature(5))],
            outbox_add: vec![2, 9],
            ..Batch::default()
        },
    );
    let stored = load(store, &r).segments;
    for from in [0u64, 2, 4, 6] {
        let t = tail(from);
        let first = t.segments.first().map_or(0, |s| u64::from(s.start));
        assert!(first <= from, "the tail from {from} starts at {first}");
        let expected: Vec<&Segment> = stored
            .iter()
            .filter(|s| u64::from(s.start + s.len) > from)
            .collect();
        assert_eq!(
            t.segments.iter().collect::<Vec<_>>(),
            expected,
            "the tail from {from} holds the segments holding it and what follows"
        );
        let signed: Vec<u32> = t.signatures.iter().map(|(n, _)| *n).collect();
        let expected: Vec<u32> = [1u32, 5]
            .into_iter()
            .filter(|&n| u64::from(n) >= from)
            .collect();
        assert_eq!(signed, expected, "signatures from node {from} on");
        assert_eq!(t.outbox, vec![2, 9], "the whole outbox");
        assert_eq!(t.checkpointed, 0, "no checkpoint stored");
    }
    let end = tail(7);
    assert!(
        end.segments.is_empty() && end.signatures.is_empty(),
        "nothing follows the end: {end:?}"
    );
}

/// A store shared with other writers hands out [`Store::lock`] guards; its
/// holder commits while holding one (a lock never waits for itself), the
/// same name is taken again once released, and two names are held at
/// once. A store without other writers answers `None` every time.
pub fn locks_let_their_holders_commit(store: &dyn Store) {
    let r = room("conf-lock");
    let lock = |name: &str| {
        store
            .lock(name)
            .unwrap_or_else(|e| panic!("lock({name}) failed: {e}"))
    };
    let held = lock(r.as_str());
    let shared = held.is_some();
    append(store, &r, 3, 2);
    let other = lock("conf-lock-other");
    assert_eq!(other.is_some(), shared, "every name is locked alike");
    drop(held);
    let again = lock(r.as_str());
    assert_eq!(again.is_some(), shared, "a released lock is taken again");
    append(store, &r, 4, 1);
    assert_eq!(count_of(store, &r), 3);
}

/// A batch expecting another history length is refused whole; one
/// expecting the stored length applies.
pub fn stale_batches_refuse(store: &dyn Store) {
    let r = room("conf-stale");
    append(store, &r, 8, 3);
    // Another writer's node 2 (same position, different content): without
    // the expectation it would pass for a retry and be skipped.
    let stale = Batch {
        segments: vec![test_segment(&r, 9, 2, 1)],
        outbox_add: vec![3],
        expect_nodes: Some(2),
        ..Batch::default()
    };
    match store.commit(&r, stale) {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("a stale batch must be refused as invalid, got {other:?}"),
    }
    assert_eq!(count_of(store, &r), 3, "nothing of the stale batch");
    assert!(outbox(store, &r).is_empty(), "not even its outbox entry");
    commit(
        store,
        &r,
        Batch {
            segments: vec![test_segment(&r, 8, 3, 1)],
            expect_nodes: Some(3),
            ..Batch::default()
        },
    );
    assert_eq!(
        count_of(store, &r),
        4,
        "a batch expecting the stored length"
    );
}
