//! [`MemoryStore`]: the in-memory backend, for tests and ephemeral replicas.
//!
//! Its state machine ([`MemState`]) is also the "disk" of the fault-injecting
//! [`FaultyStore`](crate::FaultyStore), so both backends share one
//! implementation of the [`Store`] rules (dedup, outbox order, signatures).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use syncline_core::{NodeId, RoomId, Signature};

use crate::{Batch, Store, StoreError, StoredNode};

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
        self.lock().commit(room, batch);
        Ok(())
    }

    fn load_nodes(&self, room: &RoomId) -> Result<Vec<StoredNode>, StoreError> {
        Ok(self.lock().load_nodes(room))
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        Ok(self.lock().node_count(room))
    }

    fn outbox(&self, room: &RoomId) -> Result<Vec<NodeId>, StoreError> {
        Ok(self.lock().outbox(room))
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

/// One room's nodes and outbox.
#[derive(Clone, Debug, Default)]
struct RoomData {
    /// In first-appended order.
    nodes: Vec<StoredNode>,
    /// Position of each node in `nodes`, for dedup and signatures.
    index: HashMap<NodeId, usize>,
    /// Outbox keyed by a counter that only grows, so iteration is the order
    /// added and removal is O(log n).
    outbox: BTreeMap<u64, NodeId>,
    /// Key of each outbox entry in `outbox`.
    outbox_keys: HashMap<NodeId, u64>,
    next_outbox_key: u64,
}

impl MemState {
    /// Applies `batch` in the order every backend uses: nodes, then
    /// signatures, then outbox additions, then outbox removals.
    pub(crate) fn commit(&mut self, room: &RoomId, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        let data = self.rooms.entry(room.clone()).or_default();
        for node in batch.nodes {
            data.append(node);
        }
        for (id, sig) in batch.signatures {
            data.attach_signature(&id, sig);
        }
        for id in batch.outbox_add {
            data.outbox_add(id);
        }
        for id in &batch.outbox_remove {
            data.outbox_remove(id);
        }
    }

    pub(crate) fn load_nodes(&self, room: &RoomId) -> Vec<StoredNode> {
        self.rooms
            .get(room)
            .map(|d| d.nodes.clone())
            .unwrap_or_default()
    }

    pub(crate) fn node_count(&self, room: &RoomId) -> u64 {
        self.rooms.get(room).map_or(0, |d| d.nodes.len() as u64)
    }

    pub(crate) fn outbox(&self, room: &RoomId) -> Vec<NodeId> {
        self.rooms
            .get(room)
            .map(|d| d.outbox.values().copied().collect())
            .unwrap_or_default()
    }

    pub(crate) fn rooms(&self) -> Vec<RoomId> {
        // A BTreeMap iterates in key order, so the list is already sorted.
        self.rooms
            .iter()
            .filter(|(_, d)| !d.nodes.is_empty())
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

impl RoomData {
    fn append(&mut self, node: StoredNode) {
        if self.index.contains_key(&node.id) {
            return;
        }
        self.index.insert(node.id, self.nodes.len());
        self.nodes.push(node);
    }

    /// The first signature held for a node wins: signatures are
    /// deterministic per author, so a second one adds nothing, and keeping
    /// the first makes re-delivery idempotent.
    fn attach_signature(&mut self, id: &NodeId, sig: Signature) {
        if let Some(&at) = self.index.get(id) {
            self.nodes[at].sig.get_or_insert(sig);
        }
    }

    fn outbox_add(&mut self, id: NodeId) {
        if self.outbox_keys.contains_key(&id) {
            return;
        }
        let key = self.next_outbox_key;
        self.next_outbox_key += 1;
        self.outbox.insert(key, id);
        self.outbox_keys.insert(id, key);
    }

    fn outbox_remove(&mut self, id: &NodeId) {
        if let Some(key) = self.outbox_keys.remove(id) {
            self.outbox.remove(&key);
        }
    }
}
