//! Durable storage for Syncline replicas and relays.
//!
//! [`Store`] is the one interface every backend implements; the
//! [`conformance`] suite is the one definition of its behaviour, run against
//! every backend. Backends: [`MemoryStore`] (tests, ephemeral replicas),
//! [`SqliteStore`] (the embedded default: WAL, group commit, acknowledged
//! only once durable) and [`FaultyStore`] (injects I/O failures and crashes
//! for tests and the simulator). [`Replica`] builds the durable replica on
//! top: rooms whose changes are acknowledged only once stored.
//!
//! **Architecture Invariant:** a call that returns `Ok` from a write method
//! has put the write on stable storage (for [`MemoryStore`], on the
//! in-memory "disk" that survives a simulated crash). Callers acknowledge
//! nothing before that.

use syncline_core::{NodeId, RoomId, Signature};
use thiserror::Error;

pub mod conformance;
mod faulty;
mod memory;
pub mod replica;
mod sqlite;

pub use faulty::{FaultPlan, FaultyStore};
pub use memory::MemoryStore;
pub use replica::{DurableRoom, Replica, ReplicaError};
pub use sqlite::{SqliteOptions, SqliteStats, SqliteStore};

/// One node as stored: its id, canonical bytes and, when one is held, a
/// signature by its author over the id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNode {
    /// BLAKE3 of `bytes`.
    pub id: NodeId,
    /// Canonical encoding.
    pub bytes: Vec<u8>,
    /// Author's signature over `id`, if held.
    pub sig: Option<Signature>,
}

/// One durable write: nodes appended to a room's history (in causal order)
/// and outbox changes, committed atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Nodes to append, in causal order. Nodes already stored are skipped
    /// (idempotent).
    pub nodes: Vec<StoredNode>,
    /// Local nodes to add to the outbox (not yet acknowledged by a server).
    pub outbox_add: Vec<NodeId>,
    /// Nodes the server acknowledged as durable: removed from the outbox.
    pub outbox_remove: Vec<NodeId>,
    /// Signatures learned or made for nodes already stored.
    pub signatures: Vec<(NodeId, Signature)>,
}

impl Batch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.outbox_add.is_empty()
            && self.outbox_remove.is_empty()
            && self.signatures.is_empty()
    }
}

/// Why a storage call failed. After an error, writes of the failed call may
/// or may not be on disk (they were not acknowledged); earlier acknowledged
/// writes are intact.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The backend's I/O failed.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The stored data is not what this version can read.
    #[error("storage is corrupt or from an unknown version: {0}")]
    Corrupt(String),
    /// The store was closed (or crashed, for the faulty store).
    #[error("storage is closed")]
    Closed,
}

/// Durable storage of rooms' histories, outboxes and replica metadata.
///
/// All methods take `&self` so one store can serve many rooms from many
/// threads; a backend may merge concurrent writes into one durable commit
/// (group commit).
pub trait Store: Send + Sync {
    /// Atomically and durably applies `batch` to `room`'s data. Returns only
    /// once the batch is on stable storage.
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError>;

    /// Every node of `room`, in the order first appended (a causal order).
    fn load_nodes(&self, room: &RoomId) -> Result<Vec<StoredNode>, StoreError>;

    /// Number of nodes stored for `room`.
    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError>;

    /// The outbox of `room`, in the order added.
    fn outbox(&self, room: &RoomId) -> Result<Vec<NodeId>, StoreError>;

    /// Rooms with any stored node, sorted.
    fn rooms(&self) -> Result<Vec<RoomId>, StoreError>;

    /// Replica metadata (identity, settings).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Durably writes replica metadata.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
}
