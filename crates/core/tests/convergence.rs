//! Randomized convergence: replicas make random concurrent edits of every
//! kind and exchange random subsets of their nodes, one by one in random
//! order with duplicates, and whole packs (each applied twice). After a
//! final full exchange every replica must hold the same nodes and the same
//! state hash, and each incremental state must equal a replay from scratch.
//!
//! `SYNCLINE_SEEDS=N` sets how many seeds run (default 1,000);
//! `SYNCLINE_SEED=S` replays one seed. A failure prints its replay command.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

use syncline_core::{AuthorId, Doc, Keypair, NodeId, Room, RoomId, VerifiedNode};
use syncline_testkit::{Namespace, random_ops};

const NAMESPACE: Namespace = Namespace {
    paths: &["/a", "/b", "/a/x", "/a/y", "/b/z", "/c", "/a/x/deep"],
    texts: &["/notes", "/a/x/body"],
    fields: &["title", "done", "size"],
};

struct Replica {
    key: Keypair,
    room: Room,
    now: u64,
}

/// Every node's id by (author, seq), recorded as nodes are committed: what
/// a gossiping peer would have kept. (A room keeps only some ids and
/// recomputes the others; looking up random old nodes one by one, as this
/// test gossips, is the one access pattern where that costs.)
type Ids = HashMap<(AuthorId, u64), NodeId>;

/// Prints how to replay a seed if the test panics while it runs.
struct SeedGuard(u64, usize);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "convergence failed for seed {}; replay with:\n  SYNCLINE_SEED={} SYNCLINE_OPS={} cargo test -p syncline-core --test convergence -- --nocapture",
                self.0, self.0, self.1
            );
        }
    }
}

/// One random transaction; returns how many operations it made (none if
/// every one was skipped).
fn random_txn(r: &mut Replica, rng: &mut ChaCha8Rng, ids: &mut Ids) -> usize {
    r.now += rng.random_range(0..3);
    let author = r.key.author();
    let mut tx = r.room.begin(author, r.now);
    let ops = random_ops(&mut tx, rng, &NAMESPACE);
    match tx.commit().unwrap() {
        Some(c) => {
            ids.insert((author, r.room.dag().seq(c.idx)), r.room.dag().id(c.idx));
            ops
        }
        None => 0,
    }
}

/// Node `idx` of replica `r` as a peer would gossip it: signed by its author
/// when `r` wrote it, or with a signature `r` holds; `None` when `r` cannot
/// vouch for it alone.
fn vouched(r: &Replica, idx: u32, ids: &Ids) -> Option<VerifiedNode> {
    let dag = r.room.dag();
    let key = |i: u32| (*dag.author(i), dag.seq(i));
    let id = ids[&key(idx)];
    let sig = match dag.signature(idx) {
        Some(s) => *s,
        None if *dag.author(idx) == r.key.author() => r.key.sign(&id),
        None => return None,
    };
    let mut parents: Vec<(NodeId, (AuthorId, u64))> = dag
        .parents(idx)
        .iter()
        .map(|&p| (ids[&key(p)], key(p)))
        .collect();
    parents.sort_unstable();
    let mut node = dag.with_content(idx, |n| n.clone());
    node.parents = parents.iter().map(|(id, _)| *id).collect();
    Some(VerifiedNode {
        id,
        node,
        sig: Some(sig),
        parent_keys: parents.into_iter().map(|(_, k)| k).collect(),
    })
}

/// Delivers a few random nodes of `from` to `to`, one by one, shuffled, some
/// twice.
fn trickle(replicas: &mut [Replica], from: usize, to: usize, rng: &mut ChaCha8Rng, ids: &Ids) {
    let n = replicas[from].room.dag().len() as u32;
    if n == 0 {
        return;
    }
    // Up to 16 nodes, half of them from the recent end of history.
    let mut picked: Vec<VerifiedNode> = (0..rng.random_range(1..=16))
        .map(|k| match k % 2 {
            0 => rng.random_range(0..n),
            _ => rng.random_range(n.saturating_sub(32)..n),
        })
        .filter_map(|i| vouched(&replicas[from], i, ids))
        .collect();
    let dups: Vec<VerifiedNode> = picked
        .iter()
        .filter(|_| rng.random_bool(0.2))
        .cloned()
        .collect();
    picked.extend(dups);
    picked.shuffle(rng);
    for v in picked {
        replicas[to].room.receive(v).unwrap();
    }
}

/// Sends `to` everything `from` has that it lacks, as one pack, twice.
fn pack_sync(replicas: &mut [Replica], from: usize, to: usize) {
    let vv = replicas[to].room.dag().version_vector();
    let missing = replicas[from].room.dag().missing_for_version_vector(&vv);
    if missing.is_empty() {
        return;
    }
    let key = replicas[from].key.clone();
    let pack = replicas[from].room.pack(&missing, Some(&key)).unwrap();
    replicas[to].room.receive_pack(&pack).unwrap();
    let hash = replicas[to].room.state_hash();
    let again = replicas[to].room.receive_pack(&pack).unwrap();
    assert!(again.accepted.is_empty(), "a replayed pack added nodes");
    assert_eq!(
        replicas[to].room.state_hash(),
        hash,
        "a replayed pack changed the state"
    );
}

fn run_seed(seed: u64, target_ops: usize) {
    let _guard = SeedGuard(seed, target_ops);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let room = RoomId::new("convergence").unwrap();
    let mut replicas: Vec<Replica> = (0..5u8)
        .map(|i| Replica {
            key: Keypair::from_seed([i + 1; 32]),
            room: Room::new(room.clone()),
            now: 1_000,
        })
        .collect();
    let mut ops = 0;
    let mut ids = Ids::new();
    while ops < target_ops {
        let i = rng.random_range(0..replicas.len());
        match rng.random_range(0..100) {
            0..80 => ops += random_txn(&mut replicas[i], &mut rng, &mut ids),
            80..92 => {
                let j = (i + rng.random_range(1..replicas.len())) % replicas.len();
                trickle(&mut replicas, i, j, &mut rng, &ids);
            }
            _ => {
                let j = (i + rng.random_range(1..replicas.len())) % replicas.len();
                pack_sync(&mut replicas, i, j);
            }
        }
    }
    // Heal: everyone sends everything to replica 0, then replica 0 to all.
    for i in 1..replicas.len() {
        pack_sync(&mut replicas, i, 0);
    }
    for i in 1..replicas.len() {
        pack_sync(&mut replicas, 0, i);
    }
    let reference = &replicas[0].room;
    assert_eq!(reference.dag().pending_len(), 0, "nodes left pending");
    let hash = reference.state_hash();
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(
            r.room.dag().len(),
            reference.dag().len(),
            "replica {i} node count"
        );
        assert_eq!(
            r.room.dag().heads(),
            reference.dag().heads(),
            "replica {i} heads"
        );
        let replayed = Doc::replay(r.room.dag());
        let state = r.room.state_hash();
        assert!(
            state == hash && replayed.state_hash(r.room.dag()) == hash,
            "replica {i} diverged (incremental == own replay: {}; replica 0 == its replay: {})\n\
             replica 0: {:?}\nreplica {i}: {:?}\nreplica {i} conflicts: {:?}\nreplica 0 conflicts: {:?}",
            state == replayed.state_hash(r.room.dag()),
            hash == Doc::replay(reference.dag()).state_hash(reference.dag()),
            reference.doc().export(),
            r.room.doc().export(),
            r.room.doc().conflicts(r.room.dag(), "/"),
            reference.doc().conflicts(reference.dag(), "/"),
        );
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn replicas_converge_over_many_seeds() {
    let ops = env("SYNCLINE_OPS").unwrap_or(60) as usize;
    if let Some(seed) = env("SYNCLINE_SEED") {
        return run_seed(seed, ops);
    }
    let seeds = env("SYNCLINE_SEEDS").unwrap_or(1_000);
    for seed in 0..seeds {
        run_seed(seed, ops);
    }
    eprintln!("convergence: {seeds} seeds x {ops} operations, all replicas converged");
}

#[test]
fn replicas_converge_over_one_long_history() {
    // More than 30,000 operations across five replicas in one history.
    run_seed(0x5eed, 30_000);
}
