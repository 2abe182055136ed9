//! [`MemoryStore`]: the in-memory backend, for tests and ephemeral replicas.
//!
//! Its state machine ([`MemState`]) is also the "disk" of the fault-injecting
//! [`FaultyStore`](crate::FaultyStore), so both backends share one
//! implementation of the [`Store`] rules (appends that continue the
//! history, first signature wins, outbox as a set, last checkpoint wins).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use syncline_core::{RoomId, Signature};

use crate::{Batch, RoomBytes, Segment, Store, StoreError, StoredRoom};

/// A [`Store`] held in memory behind one mutex.
///
/// Clones share the same state, so a test can drop one handle and "reopen"
/// the store from another: everything acknowledged is still there, as on a
/// disk that survives a restart.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<MemState>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Locks the state.
    ///
    /// Panics if the mutex is poisoned: a thread panicked in the middle of a
    /// write, so the state may hold half a batch, and serving it would break
    /// atomicity.
    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state
            .lock()
            .expect("MemoryStore mutex poisoned: a thread panicked during a write")
    }
}

impl Store for MemoryStore {
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        self.lock().commit(room, batch)
    }

    fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        Ok(self.lock().load(room))
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        Ok(self.lock().node_count(room))
    }

    fn room_bytes(&self, room: &RoomId) -> Result<RoomBytes, StoreError> {
        Ok(self.lock().room_bytes(room))
    }

    fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        Ok(self.lock().rooms())
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get_meta(key))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.lock().put_meta(key, value.to_vec());
        Ok(())
    }
}

/// The whole content of a store: rooms and metadata.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemState {
    rooms: BTreeMap<RoomId, RoomData>,
    meta: BTreeMap<String, Vec<u8>>,
}

/// One room's data.
#[derive(Clone, Debug, Default)]
struct RoomData {
    segments: Vec<Segment>,
    signatures: BTreeMap<u32, Signature>,
    outbox: BTreeSet<u64>,
    checkpoint: Option<Vec<u8>>,
}

impl RoomData {
    fn node_count(&self) -> u64 {
        self.segments
            .last()
            .map_or(0, |s| u64::from(s.start + s.len))
    }
}

/// Which of `segments` append to a history of `stored` nodes (the others
/// hold only nodes stored already), or why they cannot apply: the rule
/// every backend follows.
pub fn appended(stored: u64, segments: &[Segment]) -> Result<Vec<&Segment>, StoreError> {
    let mut count = stored;
    let mut out = Vec::new();
    for segment in segments {
        let start = u64::from(segment.start);
        let end = start + u64::from(segment.len);
        if segment.len == 0 {
            return Err(StoreError::Invalid("an empty segment".into()));
        }
        if start == count {
            out.push(segment);
            count = end;
        } else if end > count {
            return Err(StoreError::Invalid(format!(
                "segment of nodes {start}..{end} does not continue a history of {count} nodes"
            )));
        }
        // Otherwise a replay of nodes stored already (a retry after a
        // failure).
    }
    Ok(out)
}

/// Refuses a batch written for a history of `expected` nodes when `stored`
/// are stored: the rule every backend follows for [`Batch::expect_nodes`].
pub fn check_expected(stored: u64, expected: Option<u64>) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != stored => Err(StoreError::Invalid(format!(
            "the batch was written for a history of {expected} nodes, and {stored} are stored \
             (another writer appended meanwhile)"
        ))),
        _ => Ok(()),
    }
}

impl MemState {
    /// Applies `batch` whole, or nothing of it: segment, then signatures
    /// (so they may name the segment's nodes), outbox additions and
    /// removals, checkpoint.
    pub(crate) fn commit(&mut self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let stored = self.node_count(room);
        check_expected(stored, batch.expect_nodes)?;
        let append: Vec<Segment> = appended(stored, &batch.segments)?
            .into_iter()
            .cloned()
            .collect();
        let data = self.rooms.entry(room.clone()).or_default();
        data.segments.extend(append);
        let count = data.node_count();
        for (node, sig) in batch.signatures {
            if u64::from(node) < count {
                data.signatures.entry(node).or_insert(sig);
            }
        }
        data.outbox.extend(batch.outbox_add);
        for seq in &batch.outbox_remove {
            data.outbox.remove(seq);
        }
        if let Some(checkpoint) = batch.checkpoint {
            data.checkpoint = Some(checkpoint);
        }
        Ok(())
    }

    pub(crate) fn load(&self, room: &RoomId) -> StoredRoom {
        let Some(d) = self.rooms.get(room) else {
            return StoredRoom::default();
        };
        StoredRoom {
            segments: d.segments.clone(),
            signatures: d.signatures.iter().map(|(n, s)| (*n, *s)).collect(),
            checkpoint: d.checkpoint.clone(),
            outbox: d.outbox.iter().copied().collect(),
        }
    }

    pub(crate) fn node_count(&self, room: &RoomId) -> u64 {
        self.rooms.get(room).map_or(0, RoomData::node_count)
    }

    pub(crate) fn room_bytes(&self, room: &RoomId) -> RoomBytes {
        let Some(d) = self.rooms.get(room) else {
            return RoomBytes::default();
        };
        RoomBytes {
            history: d.segments.iter().map(|s| s.pack.len() as u64).sum::<u64>()
                + 68 * d.signatures.len() as u64,
            checkpoint: d.checkpoint.as_ref().map_or(0, |c| c.len() as u64),
            segments: d.segments.len() as u64,
        }
    }

    pub(crate) fn rooms(&self) -> Vec<RoomId> {
        // A BTreeMap iterates in key order, so the list is already sorted.
        self.rooms
            .iter()
            .filter(|(_, d)| d.node_count() > 0)
            .map(|(room, _)| room.clone())
            .collect()
    }

    pub(crate) fn get_meta(&self, key: &str) -> Option<Vec<u8>> {
        self.meta.get(key).cloned()
    }

    pub(crate) fn put_meta(&mut self, key: &str, value: Vec<u8>) {
        self.meta.insert(key.to_owned(), value);
    }
}
