//! [`FaultyStore`]: a [`Store`] that fails writes on a countdown and loses
//! unsynced writes in a simulated crash, for tests and the deterministic
//! simulator (redb's fuzzing backend habit).
//!
//! The model is a disk with a volatile cache. A write first lands in the
//! cache (reads see it at once), then is synced to the durable state, and
//! only then is acknowledged. An injected fault stops a write after the
//! cache: the caller gets [`StoreError::Io`], the write stays readable but
//! unsynced. [`FaultyStore::crash`] drops the cache, except that a prefix of
//! the unsynced writes, chosen from the plan's seed, may survive: a write
//! that was never acknowledged may or may not be there after a crash, and an
//! acknowledged one always is.
//!
//! Nothing here reads a clock or the OS random number generator, so a run
//! replays exactly from its seed.

use std::sync::{Arc, Mutex, MutexGuard};

use syncline_core::RoomId;

use crate::memory::MemState;
use crate::{Batch, RoomBytes, Store, StoreError, StoredRoom};

/// When and how [`FaultyStore`] misbehaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// `Some(n)`: the first `n` writes (commits and metadata puts) counted
    /// since the plan was set or the last crash succeed; every later one
    /// fails until [`FaultyStore::crash`]. `Some(0)` fails every write;
    /// `None` never fails.
    pub fail_after_writes: Option<u64>,
    /// Chooses how many unsynced writes survive each crash.
    pub seed: u64,
}

/// A fault-injecting in-memory [`Store`]. Clones share the same "disk".
#[derive(Clone, Debug)]
pub struct FaultyStore {
    disk: Arc<Mutex<Disk>>,
}

/// A write as kept in the volatile cache until synced or lost.
#[derive(Clone, Debug)]
enum Write {
    Commit(RoomId, Batch),
    Meta(String, Vec<u8>),
}

impl Write {
    /// Applies the write, or nothing of it if it cannot apply.
    fn apply(self, state: &mut MemState) -> Result<(), StoreError> {
        match self {
            Write::Commit(room, batch) => state.commit(&room, batch),
            Write::Meta(key, value) => {
                state.put_meta(&key, value);
                Ok(())
            }
        }
    }

    /// Applies a write already applied to the state it follows: it cannot
    /// fail.
    fn replay(self, state: &mut MemState) {
        self.apply(state)
            .expect("a write that applied once applies again to the same state");
    }
}

#[derive(Debug)]
struct Disk {
    /// What survives a crash.
    durable: MemState,
    /// `durable` plus every write in `unsynced`, in order: what reads see.
    current: MemState,
    /// Writes in the volatile cache, oldest first.
    unsynced: Vec<Write>,
    plan: FaultPlan,
    /// Writes attempted since the plan was set or the last crash.
    writes: u64,
    /// Crashes so far; mixed with the seed so successive crashes of one run
    /// make different choices.
    crashes: u64,
}

impl FaultyStore {
    /// An empty store following `plan`.
    pub fn new(plan: FaultPlan) -> FaultyStore {
        FaultyStore {
            disk: Arc::new(Mutex::new(Disk {
                durable: MemState::default(),
                current: MemState::default(),
                unsynced: Vec::new(),
                plan,
                writes: 0,
                crashes: 0,
            })),
        }
    }

    /// Replaces the plan and restarts the write count, so
    /// `fail_after_writes` counts from now. Unsynced writes stay in the
    /// cache.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut disk = self.lock();
        disk.plan = plan;
        disk.writes = 0;
    }

    /// Writes attempted (successful or not) since the plan was set or the
    /// last crash.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Simulates power loss: the volatile cache is dropped except for a
    /// prefix of it chosen from the seed (possibly empty, possibly all),
    /// then the store is usable again with the write count reset.
    pub fn crash(&self) {
        let mut disk = self.lock();
        let disk = &mut *disk;
        let unsynced = std::mem::take(&mut disk.unsynced);
        let mix = splitmix64(disk.plan.seed ^ splitmix64(disk.crashes));
        // `len + 1` choices: none of the unsynced writes survives, up to all.
        let survivors = (mix % (unsynced.len() as u64 + 1)) as usize;
        for write in unsynced.into_iter().take(survivors) {
            write.replay(&mut disk.durable);
        }
        disk.current = disk.durable.clone();
        disk.crashes += 1;
        disk.writes = 0;
    }

    /// Locks the disk.
    ///
    /// Panics if the mutex is poisoned: a thread panicked mid-write, and the
    /// two states may disagree.
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk
            .lock()
            .expect("FaultyStore mutex poisoned: a thread panicked during a write")
    }

    fn write(&self, write: Write) -> Result<(), StoreError> {
        let mut disk = self.lock();
        let disk = &mut *disk;
        // A write that cannot apply is refused before it reaches the disk.
        write.clone().apply(&mut disk.current)?;
        disk.writes += 1;
        if let Some(limit) = disk.plan.fail_after_writes
            && disk.writes > limit
        {
            disk.unsynced.push(write);
            return Err(StoreError::Io(format!(
                "injected fault: write {} after fail_after_writes = {limit}",
                disk.writes
            )));
        }
        // A sync flushes the whole cache, as fsync of a file does: earlier
        // failed writes still in the cache become durable too.
        for earlier in disk.unsynced.drain(..) {
            earlier.replay(&mut disk.durable);
        }
        write.replay(&mut disk.durable);
        Ok(())
    }
}

impl Default for FaultyStore {
    fn default() -> FaultyStore {
        FaultyStore::new(FaultPlan::default())
    }
}

impl Store for FaultyStore {
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        self.write(Write::Commit(room.clone(), batch))
    }

    fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        Ok(self.lock().current.load(room))
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        Ok(self.lock().current.node_count(room))
    }

    fn room_bytes(&self, room: &RoomId) -> Result<RoomBytes, StoreError> {
        Ok(self.lock().current.room_bytes(room))
    }

    fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        Ok(self.lock().current.rooms())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().current.get_meta(key))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(Write::Meta(key.to_owned(), value.to_vec()))
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, deterministic
/// function of its input.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d1_049e_b8c5_86eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::test_segment;

    fn room() -> RoomId {
        RoomId::new("faulty").unwrap()
    }

    /// Node `n` (the next after `n` stored) as its own segment.
    fn one_node(n: u64) -> Batch {
        Batch {
            segments: vec![test_segment(&room(), 1, n as u32, 1)],
            ..Batch::default()
        }
    }

    fn loaded(store: &FaultyStore) -> Vec<syncline_core::dag::Segment> {
        store.load(&room()).unwrap().segments
    }

    #[test]
    fn writes_fail_after_the_countdown_until_a_crash() {
        let store = FaultyStore::new(FaultPlan {
            fail_after_writes: Some(2),
            seed: 7,
        });
        store.commit(&room(), one_node(0)).unwrap();
        store.put_meta("k", b"v").unwrap();
        assert!(matches!(
            store.commit(&room(), one_node(1)),
            Err(StoreError::Io(_))
        ));
        assert!(store.put_meta("k", b"w").is_err());
        assert_eq!(store.writes(), 4);
        // The failed writes sit in the cache: reads see them.
        assert_eq!(store.node_count(&room()).unwrap(), 2);
        assert_eq!(store.get_meta("k").unwrap().as_deref(), Some(&b"w"[..]));

        store.crash();
        assert_eq!(store.writes(), 0);
        // Acknowledged writes survive; the write count restarted.
        let held = store.node_count(&room()).unwrap();
        assert!(held >= 1);
        store.commit(&room(), one_node(held)).unwrap();
        // A segment that does not continue the history is refused, and
        // counts as no write.
        assert!(matches!(
            store.commit(&room(), one_node(held + 5)),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.writes(), 1);
    }

    #[test]
    fn crashes_keep_a_seed_chosen_prefix_of_unsynced_writes() {
        let mut kept = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let store = FaultyStore::new(FaultPlan {
                fail_after_writes: Some(0),
                seed,
            });
            for n in 0..3 {
                assert!(store.commit(&room(), one_node(n)).is_err());
            }
            store.crash();
            let nodes = loaded(&store);
            let expected: Vec<_> = (0..nodes.len() as u32)
                .map(|n| test_segment(&room(), 1, n, 1))
                .collect();
            assert_eq!(nodes, expected, "seed {seed}: survivors must be a prefix");
            kept.insert(nodes.len());

            // The same seed makes the same choice.
            let again = FaultyStore::new(FaultPlan {
                fail_after_writes: Some(0),
                seed,
            });
            for n in 0..3 {
                assert!(again.commit(&room(), one_node(n)).is_err());
            }
            again.crash();
            assert_eq!(loaded(&again), nodes, "seed {seed}");
        }
        assert_eq!(kept.len(), 4, "every prefix length occurs: {kept:?}");
    }

    #[test]
    fn a_later_sync_flushes_earlier_failed_writes() {
        let store = FaultyStore::new(FaultPlan {
            fail_after_writes: Some(0),
            seed: 0,
        });
        assert!(store.commit(&room(), one_node(0)).is_err());
        store.set_plan(FaultPlan::default());
        store.commit(&room(), one_node(1)).unwrap();
        store.crash();
        assert_eq!(
            loaded(&store),
            vec![
                test_segment(&room(), 1, 0, 1),
                test_segment(&room(), 1, 1, 1)
            ]
        );
    }
}
