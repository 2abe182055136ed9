//! The durable replica: what reopening restores, and what survives faults.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncline_core::{Doc, EntryKind, NodeId, RoomId, Value};
use syncline_store::{
    FaultPlan, FaultyStore, Replica, SqliteOptions, SqliteStore, Store, conformance,
};

fn room() -> RoomId {
    RoomId::new("notes").unwrap()
}

fn sqlite(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(SqliteStore::open(&dir.join("replica.db"), SqliteOptions::default()).unwrap())
}

#[test]
fn reopening_restores_history_heads_document_outbox_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (author, heads, hash, outbox) = {
        let mut r = Replica::open(sqlite(dir.path()), || [5; 32]).unwrap();
        let author = r.key().author();
        let room = r.room(&room()).unwrap();
        for i in 0..20u64 {
            room.transact(1_000 + i, |tx| {
                tx.set(&format!("/n/{}", i % 3), "v", Value::Int(i as i64))?;
                tx.text_insert("/n/text", 0, "ab")?;
                if i % 5 == 4 {
                    tx.mv("/n/0", &format!("/moved{i}"))?;
                }
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(room.outbox().len(), 20);
        // The first five of the author's nodes (node 0 is the first).
        let first: Vec<u32> = (0..5).collect();
        room.acknowledge(&first).unwrap();
        assert_eq!(room.outbox_len(), 15);
        (
            author,
            room.room().dag().heads(),
            room.room().state_hash(),
            room.outbox(),
        )
    };
    // A different seed function proves the identity came from the store.
    let mut r = Replica::open(sqlite(dir.path()), || [9; 32]).unwrap();
    assert_eq!(r.key().author(), author);
    assert_eq!(r.stored_rooms().unwrap(), vec![room()]);
    let room = r.room(&room()).unwrap();
    assert_eq!(room.room().dag().heads(), heads);
    assert_eq!(room.room().state_hash(), hash);
    assert_eq!(room.outbox(), outbox);
    // The clock resumes after the history: new writes still win.
    room.transact(0, |tx| tx.set("/n/1", "v", Value::Int(-1)))
        .unwrap();
    let id = room.room().doc().resolve("/n/1").unwrap();
    assert_eq!(room.room().doc().field(&id, "v"), Some(&Value::Int(-1)));
}

#[test]
fn packs_received_are_durable_before_the_call_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::open(Arc::new(syncline_store::MemoryStore::new()), || [1; 32]).unwrap();
    let ra = a.room(&room()).unwrap();
    for i in 0..50u64 {
        ra.transact(i, |tx| tx.text_insert("/t", i as usize, "x"))
            .unwrap();
    }
    let all = ra.room().dag().causal_order();
    let pack = ra.export_pack(&all).unwrap();
    let hash = ra.room().state_hash();
    {
        let mut b = Replica::open(sqlite(dir.path()), || [2; 32]).unwrap();
        let got = b.room(&room()).unwrap().receive_pack(&pack).unwrap();
        assert_eq!(got.accepted.len(), 50);
    }
    let mut b = Replica::open(sqlite(dir.path()), || [2; 32]).unwrap();
    let rb = b.room(&room()).unwrap();
    assert_eq!(rb.room().state_hash(), hash);
    // Stored signatures let the receiver relay the history onwards.
    let again = rb.export_pack(&rb.room().dag().causal_order()).unwrap();
    let mut c = Replica::open(Arc::new(syncline_store::MemoryStore::new()), || [3; 32]).unwrap();
    c.room(&room()).unwrap().receive_pack(&again).unwrap();
    assert_eq!(c.room(&room()).unwrap().room().state_hash(), hash);
}

/// Random transactions against a store that fails and crashes: every
/// acknowledged node survives every crash, the outbox holds exactly the
/// acknowledged local nodes, and the reloaded state is a replay of what is
/// stored.
#[test]
fn acknowledged_writes_survive_injected_faults_and_crashes() {
    for seed in 0..40u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let store = FaultyStore::new(FaultPlan {
            fail_after_writes: Some(rng.random_range(2..30)),
            seed,
        });
        let mut acked: Vec<NodeId> = Vec::new();
        let mut replica = Replica::open(Arc::new(store.clone()), || [7; 32]).unwrap();
        for step in 0..120u64 {
            if rng.random_bool(0.05) {
                store.crash();
                store.set_plan(FaultPlan {
                    fail_after_writes: Some(store.writes() + rng.random_range(1..40)),
                    seed: seed ^ step,
                });
                replica = Replica::open(Arc::new(store.clone()), || [7; 32]).unwrap();
                let r = replica.room(&room()).unwrap();
                let held = r.room().dag().id_index();
                for id in &acked {
                    assert!(held.contains_key(id), "seed {seed}: acknowledged node lost");
                }
                let outbox = r.outbox();
                assert!(
                    acked.iter().all(|id| outbox.contains(id)),
                    "seed {seed}: outbox lost a node"
                );
                let replayed = Doc::replay(r.room().dag());
                assert_eq!(replayed.state_hash(r.room().dag()), r.room().state_hash());
                continue;
            }
            let Ok(r) = replica.room(&room()) else {
                continue; // Loading failed on an injected fault; try again later.
            };
            let before = r.room().dag().len();
            let result = r.transact(step, |tx| {
                tx.set("/k", "v", Value::Int(step as i64))?;
                tx.ensure("/t", EntryKind::Text)?;
                tx.text_insert("/t", 0, "z")
            });
            match result {
                Ok(Some(c)) => acked.push(r.room().dag().id(c.idx)),
                Ok(None) => unreachable!("the transaction made changes"),
                Err(_) => {
                    // Not acknowledged; memory was reloaded from the store and
                    // holds no node the store lacks.
                    assert!(r.room().dag().len() <= before + 1);
                }
            }
        }
    }
}

#[test]
fn a_stored_history_that_breaks_the_rules_is_refused_as_corrupt() {
    let store = Arc::new(syncline_store::MemoryStore::new());
    let other = RoomId::new("other").unwrap();
    // Nodes 6 and 7 of a chain stored as the history's first two: node 6
    // cites a parent no node before it is.
    let mut segment = conformance::test_segment(&other, 1, 5, 2);
    segment.start = 0;
    store
        .commit(
            &other,
            syncline_store::Batch {
                segments: vec![segment],
                ..Default::default()
            },
        )
        .unwrap();
    let err = Replica::open(store, || [4; 32])
        .unwrap()
        .room(&other)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(err, syncline_store::ReplicaError::Corrupt { .. }),
        "{err}"
    );
}

/// Writes `count` transactions of typing and fields to `room`.
fn type_into(room: &mut syncline_store::DurableRoom, count: u64) {
    for i in 0..count {
        room.transact(1_000 + i, |tx| {
            tx.text_insert("/doc", (i as usize * 7) % (i as usize + 1), "ab")?;
            if i % 10 == 0 {
                tx.set(&format!("/fields/{}", i % 13), "n", Value::Int(i as i64))?;
            }
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn rooms_reopen_from_a_checkpoint_and_replay_only_what_came_after() {
    let dir = tempfile::tempdir().unwrap();
    let (hash, nodes, checkpointed) = {
        let mut r = Replica::open(sqlite(dir.path()), || [6; 32]).unwrap();
        let room = r.room(&room()).unwrap();
        type_into(room, 3_000);
        // Checkpoints were written as the room grew: fewer nodes than the
        // last covers (or CHECKPOINT_MIN_NODES) are past it.
        let nodes = room.room().dag().next_idx();
        let behind = nodes - room.checkpointed();
        assert!(room.checkpointed() > 0);
        assert!(
            behind < syncline_store::CHECKPOINT_MIN_NODES.max(room.checkpointed()),
            "{behind}"
        );
        (room.room().state_hash(), nodes, room.checkpointed())
    };
    let mut r = Replica::open(sqlite(dir.path()), || [6; 32]).unwrap();
    let opened = r.room(&room()).unwrap();
    assert_eq!(opened.opened().from_checkpoint, checkpointed);
    assert_eq!(opened.opened().replayed, nodes - checkpointed);
    assert_eq!(opened.room().state_hash(), hash);
    assert_eq!(
        Doc::replay(opened.room().dag()).state_hash(opened.room().dag()),
        hash,
        "the checkpoint holds what replaying the history gives"
    );
    // Before unloading, a checkpoint covering everything: the next open
    // replays nothing.
    opened.checkpoint().unwrap();
    drop(r);
    let mut r = Replica::open(sqlite(dir.path()), || [6; 32]).unwrap();
    let reopened = r.room(&room()).unwrap();
    assert_eq!(reopened.opened().replayed, 0);
    assert_eq!(reopened.opened().from_checkpoint, nodes);
    type_into(reopened, 10);
    assert_eq!(reopened.room().dag().next_idx(), nodes + 10);
}

#[test]
fn a_damaged_checkpoint_costs_a_replay_not_the_room() {
    let store = Arc::new(syncline_store::MemoryStore::new());
    let hash = {
        let mut r = Replica::open(store.clone(), || [7; 32]).unwrap();
        let room = r.room(&room()).unwrap();
        type_into(room, 1_500);
        room.room().state_hash()
    };
    let mut stored = store.load(&room()).unwrap().checkpoint.unwrap();
    let middle = stored.len() / 2;
    stored[middle] ^= 0x40;
    store
        .commit(
            &room(),
            syncline_store::Batch {
                checkpoint: Some(stored),
                ..Default::default()
            },
        )
        .unwrap();
    let mut r = Replica::open(store, || [7; 32]).unwrap();
    let room = r.room(&room()).unwrap();
    let opened = room.opened().clone();
    assert!(
        opened
            .checkpoint_refused
            .as_deref()
            .is_some_and(|e| e.contains("checksum")),
        "{opened:?}"
    );
    assert_eq!(opened.replayed, room.room().dag().next_idx());
    assert_eq!(room.room().state_hash(), hash);
}

#[test]
fn a_room_loaded_after_a_failed_write_holds_only_durable_nodes() {
    use syncline_core::Keypair;
    use syncline_store::DurableRoom;
    let store = FaultyStore::new(FaultPlan::default());
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let key = Keypair::from_seed([3; 32]);
    let mut r = DurableRoom::load(shared.clone(), key.clone(), &room()).unwrap();
    r.transact(1, |tx| tx.set("/a", "v", Value::Int(1)))
        .unwrap();
    // The next write fails after reaching the cache: readable, not durable.
    store.set_plan(FaultPlan {
        fail_after_writes: Some(0),
        seed: 9,
    });
    assert!(
        r.transact(2, |tx| tx.set("/a", "v", Value::Int(2)))
            .is_err()
    );
    let cached = DurableRoom::load(shared.clone(), key.clone(), &room()).unwrap();
    assert_eq!(
        cached.room().dag().len(),
        2,
        "a plain load sees the failed write"
    );
    // While the disk fails, loading after the failure fails too.
    assert!(DurableRoom::load_after_failure(shared.clone(), key.clone(), &room()).is_err());
    // Once a write succeeds, everything before it is durable: what the room
    // holds survives a crash.
    store.set_plan(FaultPlan::default());
    let loaded = DurableRoom::load_after_failure(shared.clone(), key.clone(), &room()).unwrap();
    store.crash();
    let after_crash = DurableRoom::load(shared, key, &room()).unwrap();
    assert_eq!(
        after_crash.room().state_hash(),
        loaded.room().state_hash(),
        "what the room loaded after the failure is durable"
    );
}

/// Two stores sharing one file, as two processes do: each room catches up
/// with the other's writes by `refresh` (nodes, document, outbox), across
/// checkpoints and merges, and a write that did not catch up first is
/// refused by the store rather than fork the history.
#[test]
fn stores_sharing_a_file_catch_up_with_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let shared = || -> Arc<dyn Store> {
        let options = SqliteOptions {
            shared: true,
            ..SqliteOptions::default()
        };
        Arc::new(SqliteStore::open(&dir.path().join("replica.db"), options).unwrap())
    };
    let (one, two) = (shared(), shared());
    // An exclusive store cannot join them.
    assert!(SqliteStore::open(&dir.path().join("replica.db"), SqliteOptions::default()).is_err());
    let mut a = Replica::open(one, || [5; 32]).unwrap();
    let mut b = Replica::open(two, || [6; 32]).unwrap();
    assert_eq!(a.key().author(), b.key().author(), "one identity");
    a.room(&room()).unwrap().set_checkpoint_min_nodes(4);
    b.room(&room()).unwrap().set_checkpoint_min_nodes(4);
    for i in 0..40u64 {
        let (writer, reader) = if i % 3 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let w = writer.room(&room()).unwrap();
        w.refresh().unwrap();
        w.transact(1_000 + i, |tx| {
            tx.set(&format!("/n/{}", i % 4), "v", Value::Int(i as i64))?;
            tx.text_insert("/text", 0, "x")
        })
        .unwrap();
        let hash = w.room().state_hash();
        let r = reader.room(&room()).unwrap();
        let appended = r.refresh().unwrap();
        assert_eq!(appended.len(), 1, "step {i}: one node appended");
        assert_eq!(r.room().state_hash(), hash, "step {i}: same state");
        assert_eq!(
            r.outbox_len(),
            i as usize + 1,
            "step {i}: the shared outbox"
        );
    }
    // A write on a stale room is refused, and the room reloads.
    a.room(&room())
        .unwrap()
        .transact(5_000, |tx| tx.set("/n/0", "v", Value::Int(-1)))
        .unwrap();
    let refused = b
        .room(&room())
        .unwrap()
        .transact(5_001, |tx| tx.set("/n/0", "v", Value::Int(-2)));
    assert!(refused.is_err(), "a write on a stale room must fail");
    let b_room = b.room(&room()).unwrap();
    assert_eq!(
        b_room.room().state_hash(),
        a.room(&room()).unwrap().room().state_hash(),
        "the refused write reloaded the room as stored"
    );
}
