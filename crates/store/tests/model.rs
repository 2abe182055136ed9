//! Model-based tests (sled's `fuzz_model` habit): random sequences of
//! writes, reboots and crashes run against a store and against a trivially
//! correct model made of `Vec`s and `BTreeMap`s; after every operation every
//! read of the store must match the model.
//!
//! Each run is reproducible from its seed, printed on failure. To replay
//! one: `SYNCLINE_MODEL_SEED=<seed> cargo test -p syncline-store --test model`.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncline_core::{AuthorId, RoomId, Signature};
use syncline_store::conformance::{held, test_nodes, test_segment, test_signature};
use syncline_store::{
    Batch, FaultPlan, FaultyStore, SqliteOptions, SqliteStore, Store, StoreError,
};

/// Rooms the operations write to, plus one never written (reads of an
/// unknown room are checked too).
const ROOMS: [&str; 4] = ["model/a", "model/b", "model/c", "model/unused"];
const WRITTEN_ROOMS: usize = 3;
const META_KEYS: [&str; 3] = ["identity", "settings", "never-written"];
const WRITTEN_META_KEYS: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    Commit {
        room: usize,
        /// The author of the batch's segment (see `test_segment`).
        tag: u8,
        batch: Batch,
    },
    PutMeta {
        key: usize,
        value: Vec<u8>,
    },
    /// Close and reopen the store (SQLite).
    Reboot,
    /// Simulated power loss (faulty store).
    Crash,
    /// New fault plan (faulty store).
    SetPlan(FaultPlan),
}

/// The whole state of a store, as the model keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    rooms: BTreeMap<usize, RoomModel>,
    meta: BTreeMap<usize, Vec<u8>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct RoomModel {
    nodes: Vec<(AuthorId, u64)>,
    signatures: BTreeMap<u32, Signature>,
    outbox: BTreeSet<u64>,
    checkpoint: Option<Vec<u8>>,
}

/// A batch the rules refuse (its segment does not continue the history).
#[derive(Debug)]
struct Refused;

impl Model {
    /// The rules of `Store`, written as plainly as possible.
    fn apply(&mut self, op: &Op) -> Result<(), Refused> {
        match op {
            Op::Commit { room, tag, batch } => {
                if batch.is_empty() {
                    return Ok(());
                }
                let mut count = self.rooms.get(room).map_or(0, |r| r.nodes.len() as u32);
                let mut append = Vec::new();
                for s in &batch.segments {
                    if s.start == count {
                        append.push((s.start, s.len));
                        count += s.len;
                    } else if s.start + s.len > count {
                        return Err(Refused);
                    }
                }
                let data = self.rooms.entry(*room).or_default();
                for (start, len) in append {
                    data.nodes.extend(test_nodes(*tag, start, len));
                }
                for (node, sig) in &batch.signatures {
                    if (*node as usize) < data.nodes.len() {
                        data.signatures.entry(*node).or_insert(*sig);
                    }
                }
                data.outbox.extend(&batch.outbox_add);
                for seq in &batch.outbox_remove {
                    data.outbox.remove(seq);
                }
                if let Some(checkpoint) = &batch.checkpoint {
                    data.checkpoint = Some(checkpoint.clone());
                }
            }
            Op::PutMeta { key, value } => {
                self.meta.insert(*key, value.clone());
            }
            Op::Reboot | Op::Crash | Op::SetPlan(_) => {}
        }
        Ok(())
    }
}

/// Every read the tests compare.
#[derive(Debug, PartialEq)]
struct Reads {
    rooms: Vec<RoomId>,
    nodes: Vec<Vec<(AuthorId, u64)>>,
    signatures: Vec<BTreeMap<u32, Signature>>,
    counts: Vec<u64>,
    outboxes: Vec<Vec<u64>>,
    checkpoints: Vec<Option<Vec<u8>>>,
    meta: Vec<Option<Vec<u8>>>,
}

fn room_id(index: usize) -> RoomId {
    RoomId::new(ROOMS[index]).unwrap()
}

impl Reads {
    fn of_model(model: &Model) -> Reads {
        let room = |i: usize| model.rooms.get(&i).cloned().unwrap_or_default();
        let mut rooms: Vec<RoomId> = (0..ROOMS.len())
            .filter(|&i| !room(i).nodes.is_empty())
            .map(room_id)
            .collect();
        rooms.sort();
        Reads {
            rooms,
            nodes: (0..ROOMS.len()).map(|i| room(i).nodes).collect(),
            signatures: (0..ROOMS.len()).map(|i| room(i).signatures).collect(),
            counts: (0..ROOMS.len())
                .map(|i| room(i).nodes.len() as u64)
                .collect(),
            outboxes: (0..ROOMS.len())
                .map(|i| room(i).outbox.into_iter().collect())
                .collect(),
            checkpoints: (0..ROOMS.len()).map(|i| room(i).checkpoint).collect(),
            meta: (0..META_KEYS.len())
                .map(|k| model.meta.get(&k).cloned())
                .collect(),
        }
    }

    fn of_store(store: &dyn Store) -> Reads {
        let loaded: Vec<_> = (0..ROOMS.len())
            .map(|i| {
                let room = room_id(i);
                let stored = store.load(&room).unwrap();
                (held(&room, &stored), stored)
            })
            .collect();
        Reads {
            rooms: store.rooms().unwrap(),
            nodes: loaded.iter().map(|(h, _)| h.nodes.clone()).collect(),
            signatures: loaded.iter().map(|(h, _)| h.signatures.clone()).collect(),
            counts: (0..ROOMS.len())
                .map(|i| store.node_count(&room_id(i)).unwrap())
                .collect(),
            outboxes: loaded.iter().map(|(_, s)| s.outbox.clone()).collect(),
            checkpoints: loaded.iter().map(|(_, s)| s.checkpoint.clone()).collect(),
            meta: META_KEYS
                .iter()
                .map(|k| store.get_meta(k).unwrap())
                .collect(),
        }
    }
}

/// Panics with the first read that differs, rather than two whole dumps.
fn assert_reads(store: &Reads, model: &Reads, context: &str) {
    assert_eq!(store.rooms, model.rooms, "rooms() {context}");
    for (i, name) in ROOMS.iter().enumerate() {
        assert_eq!(
            store.counts[i], model.counts[i],
            "node_count({name}) {context}"
        );
        let (got, want) = (&store.nodes[i], &model.nodes[i]);
        if let Some(at) = (0..got.len().max(want.len())).find(|&at| got.get(at) != want.get(at)) {
            panic!(
                "nodes of {name} [{at}] {context}: store has {:?}, model {:?}",
                got.get(at),
                want.get(at)
            );
        }
        assert_eq!(
            store.signatures[i], model.signatures[i],
            "signatures of {name} {context}"
        );
        assert_eq!(
            store.outboxes[i], model.outboxes[i],
            "outbox of {name} {context}"
        );
        assert_eq!(
            store.checkpoints[i], model.checkpoints[i],
            "checkpoint of {name} {context}"
        );
    }
    assert_eq!(store.meta, model.meta, "get_meta {context}");
}

/// Makes random operations against what a store holds: segments that
/// continue a room's history, replay part of it, or leave a gap.
struct Generator {
    rng: ChaCha8Rng,
    /// Chance that a segment is large (tens to hundreds of nodes).
    large_batches: f64,
}

impl Generator {
    fn new(seed: u64, large_batches: f64) -> Generator {
        Generator {
            rng: ChaCha8Rng::seed_from_u64(seed),
            large_batches,
        }
    }

    fn signature(&mut self) -> Signature {
        test_signature(self.rng.random())
    }

    fn batch(&mut self, room: &RoomId, tag: u8, stored: u32) -> Batch {
        let mut batch = Batch::default();
        let count = if self.rng.random_bool(self.large_batches) {
            self.rng.random_range(20..200)
        } else {
            self.rng.random_range(1..6)
        };
        let mut end = stored;
        match self.rng.random_range(0..100) {
            0..70 => {
                if stored > 0 && self.rng.random_bool(0.2) {
                    // A retry of nodes stored already, then new ones.
                    let start = self.rng.random_range(0..stored);
                    let len = self.rng.random_range(1..=stored - start);
                    batch.segments.push(test_segment(room, tag, start, len));
                }
                // New nodes, cut in one to three segments.
                for _ in 0..self.rng.random_range(1..4) {
                    batch.segments.push(test_segment(room, tag, end, count));
                    end += count;
                }
            }
            70..80 if stored > 0 => {
                // A retry of nodes stored already.
                let start = self.rng.random_range(0..stored);
                let len = self.rng.random_range(1..=stored - start);
                batch.segments.push(test_segment(room, tag, start, len));
            }
            80..85 => {
                // A gap, or an overlap of the end, maybe after a good
                // segment: refused whole.
                if self.rng.random_bool(0.5) {
                    batch.segments.push(test_segment(room, tag, end, count));
                    end += count;
                }
                let start = if end > 0 && self.rng.random_bool(0.5) {
                    end - 1
                } else {
                    end + self.rng.random_range(1..4)
                };
                batch
                    .segments
                    .push(test_segment(room, tag, start, count + 1));
            }
            _ => {}
        }
        for _ in 0..self.rng.random_range(0..3) {
            let node = self.rng.random_range(0..end + 2);
            let sig = self.signature();
            batch.signatures.push((node, sig));
        }
        for _ in 0..self.rng.random_range(0..4) {
            batch.outbox_add.push(self.rng.random_range(1..30));
        }
        for _ in 0..self.rng.random_range(0..3) {
            batch.outbox_remove.push(self.rng.random_range(1..30));
        }
        if self.rng.random_bool(0.2) {
            let len = self.rng.random_range(0..40);
            batch.checkpoint = Some((0..len).map(|_| self.rng.random()).collect());
        }
        batch
    }

    /// A write to `store`, whose reads decide where segments start.
    fn write(&mut self, store: &dyn Store) -> Op {
        if self.rng.random_bool(0.8) {
            let room = self.rng.random_range(0..WRITTEN_ROOMS);
            let stored = store.node_count(&room_id(room)).unwrap() as u32;
            let tag = self.rng.random_range(1..4);
            Op::Commit {
                room,
                tag,
                batch: self.batch(&room_id(room), tag, stored),
            }
        } else {
            let len = self.rng.random_range(0..40);
            Op::PutMeta {
                key: self.rng.random_range(0..WRITTEN_META_KEYS),
                value: (0..len).map(|_| self.rng.random()).collect(),
            }
        }
    }
}

fn apply_write(store: &dyn Store, op: &Op) -> Result<(), StoreError> {
    match op {
        Op::Commit { room, batch, .. } => store.commit(&room_id(*room), batch.clone()),
        Op::PutMeta { key, value } => store.put_meta(META_KEYS[*key], value),
        Op::Reboot | Op::Crash | Op::SetPlan(_) => Ok(()),
    }
}

/// Runs `run(seed)` for each seed (or only `SYNCLINE_MODEL_SEED`), printing
/// the seed of a failing run before passing its panic on.
fn for_each_seed(seeds: std::ops::Range<u64>, run: impl Fn(u64)) {
    let seeds: Vec<u64> = match std::env::var("SYNCLINE_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("SYNCLINE_MODEL_SEED is a u64")],
        Err(_) => seeds.collect(),
    };
    for seed in seeds {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(seed))) {
            eprintln!("model test failed for seed {seed}: replay with SYNCLINE_MODEL_SEED={seed}");
            resume_unwind(panic);
        }
    }
}

fn open_sqlite(path: &Path, seed: u64) -> SqliteStore {
    let options = SqliteOptions {
        // Reboots here are clean closes, which `synchronous=NORMAL` survives
        // too; most runs skip the fsyncs to afford more operations.
        synchronous_full: seed.is_multiple_of(4),
        // Some runs merge only when settled, so unmerged histories are
        // read too.
        merge_in_background: !seed.is_multiple_of(3),
        ..SqliteOptions::default()
    };
    SqliteStore::open(path, options).unwrap()
}

#[test]
fn sqlite_store_matches_the_model() {
    const SEEDS: u64 = 24;
    const STEPS: usize = 80;
    for_each_seed(0..SEEDS, |seed| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.db");
        let mut gen_ops = Generator::new(seed, 0.05);
        let mut store = open_sqlite(&path, seed);
        let mut model = Model::default();
        for step in 0..STEPS {
            let op = if gen_ops.rng.random_bool(0.08) {
                Op::Reboot
            } else {
                gen_ops.write(&store)
            };
            if let Op::Reboot = op {
                // Dropping stops the merger and closes the file first.
                drop(store);
                store = open_sqlite(&path, seed);
            }
            let expected = model.apply(&op);
            match (apply_write(&store, &op), expected) {
                (Ok(()), Ok(())) | (Err(StoreError::Invalid(_)), Err(Refused)) => {}
                (got, expected) => {
                    panic!("seed {seed} step {step}: {op:?} gave {got:?}, model {expected:?}")
                }
            }
            if gen_ops.rng.random_bool(0.05) {
                store.settle().unwrap();
            }
            assert_reads(
                &Reads::of_store(&store),
                &Reads::of_model(&model),
                &format!("seed {seed} step {step} after {op:?}"),
            );
        }
    });
}

/// How the faulty-store runs went, to check that they exercised the torn
/// crash rule both ways.
#[derive(Default)]
struct CrashCoverage {
    failed_writes: usize,
    crashes_with_unsynced: usize,
    some_unsynced_kept: usize,
    some_unsynced_lost: usize,
}

#[test]
fn faulty_store_matches_the_model_across_crashes() {
    const SEEDS: u64 = 120;
    const STEPS: usize = 100;
    let coverage = std::sync::Mutex::new(CrashCoverage::default());
    for_each_seed(0..SEEDS, |seed| {
        // Small batches: the interest here is crashes, and every step
        // compares (and clones) whole histories.
        let mut gen_ops = Generator::new(seed, 0.0);
        let mut plan = FaultPlan {
            fail_after_writes: Some(gen_ops.rng.random_range(0..10)),
            seed: gen_ops.rng.random(),
        };
        let store = FaultyStore::new(plan);
        // Acknowledged state, and the writes that failed since (which the
        // store still serves from its cache).
        let mut acked = Model::default();
        let mut failed: Vec<Op> = Vec::new();
        let mut writes = 0u64;
        for step in 0..STEPS {
            let context = |op: &Op| format!("seed {seed} step {step} after {op:?}");
            let op = match gen_ops.rng.random_range(0..100) {
                0..8 => Op::Crash,
                8..14 => {
                    let fail_after_writes = if gen_ops.rng.random_bool(0.3) {
                        None
                    } else {
                        Some(gen_ops.rng.random_range(0..10))
                    };
                    Op::SetPlan(FaultPlan {
                        fail_after_writes,
                        seed: gen_ops.rng.random(),
                    })
                }
                _ => gen_ops.write(&store),
            };
            match &op {
                Op::Crash => {
                    store.crash();
                    writes = 0;
                    // The store must hold the acknowledged state plus some
                    // prefix of the failed writes: find which, and go on
                    // from there.
                    let got = Reads::of_store(&store);
                    let mut candidate = acked.clone();
                    let mut kept = None;
                    for survivors in 0..=failed.len() {
                        if Reads::of_model(&candidate) == got {
                            kept = Some(survivors);
                            break;
                        }
                        if let Some(next) = failed.get(survivors) {
                            candidate
                                .apply(next)
                                .expect("a failed write applied to the state it followed");
                        }
                    }
                    let Some(kept) = kept else {
                        // No prefix matches: show the difference from the
                        // acknowledged state, which must at least survive.
                        assert_reads(&got, &Reads::of_model(&acked), &context(&op));
                        panic!("{}: state after crash matches no prefix", context(&op));
                    };
                    let mut coverage = coverage.lock().unwrap();
                    if !failed.is_empty() {
                        coverage.crashes_with_unsynced += 1;
                        coverage.some_unsynced_kept += usize::from(kept > 0);
                        coverage.some_unsynced_lost += usize::from(kept < failed.len());
                    }
                    acked = candidate;
                    failed.clear();
                }
                Op::SetPlan(new_plan) => {
                    plan = *new_plan;
                    store.set_plan(plan);
                    writes = 0;
                }
                Op::Commit { .. } | Op::PutMeta { .. } => {
                    let mut current = acked.clone();
                    for earlier in &failed {
                        current.apply(earlier).expect("failed writes applied");
                    }
                    if current.apply(&op).is_err() {
                        // Refused before it reaches the disk: no write.
                        let refused = apply_write(&store, &op);
                        assert!(
                            matches!(refused, Err(StoreError::Invalid(_))),
                            "{}: expected Invalid, got {refused:?}",
                            context(&op)
                        );
                        continue;
                    }
                    writes += 1;
                    let should_fail = plan.fail_after_writes.is_some_and(|n| writes > n);
                    match apply_write(&store, &op) {
                        Ok(()) => {
                            assert!(!should_fail, "{}: should have failed", context(&op));
                            // The sync flushed the whole cache, earlier
                            // failed writes included.
                            for earlier in failed.drain(..) {
                                acked.apply(&earlier).expect("failed writes applied");
                            }
                            acked.apply(&op).expect("checked above");
                        }
                        Err(StoreError::Io(_)) => {
                            assert!(should_fail, "{}: should have succeeded", context(&op));
                            coverage.lock().unwrap().failed_writes += 1;
                            failed.push(op.clone());
                        }
                        Err(e) => panic!("{}: unexpected error {e}", context(&op)),
                    }
                }
                Op::Reboot => unreachable!("not generated here"),
            }
            assert_eq!(store.writes(), writes, "writes() {}", context(&op));
            // Before a crash, reads see acknowledged and failed writes alike.
            let mut current = acked.clone();
            for earlier in &failed {
                current.apply(earlier).expect("failed writes applied");
            }
            assert_reads(
                &Reads::of_store(&store),
                &Reads::of_model(&current),
                &context(&op),
            );
        }
    });
    if std::env::var("SYNCLINE_MODEL_SEED").is_err() {
        let coverage = coverage.lock().unwrap();
        assert!(coverage.failed_writes > 100, "too few injected failures");
        // With the survivors drawn from 0..=n, most crashes keep some and
        // most lose some; a store that always kept (or lost) every unsynced
        // write would be a weaker test of its callers.
        let quarter = coverage.crashes_with_unsynced / 4;
        assert!(
            coverage.some_unsynced_kept > quarter && coverage.some_unsynced_lost > quarter,
            "torn crashes must both keep and lose unsynced writes: of {} crashes, {} kept some, {} lost some",
            coverage.crashes_with_unsynced,
            coverage.some_unsynced_kept,
            coverage.some_unsynced_lost
        );
    }
}
