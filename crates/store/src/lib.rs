//! Durable storage for Syncline replicas and relays.
//!
//! [`Store`] is the one interface every backend implements; the
//! [`conformance`] suite is the one definition of its behaviour, run against
//! every backend. Backends: [`MemoryStore`] (tests, ephemeral replicas),
//! [`SqliteStore`] (the embedded default: WAL, group commit, acknowledged
//! only once durable, segments merged in the background) and
//! [`FaultyStore`] (injects I/O failures and crashes for tests and the
//! simulator). [`Replica`] builds the durable replica on top: rooms whose
//! changes are acknowledged only once stored, opened from a checkpoint.
//!
//! A room is stored as its history in **segments** (consecutive nodes as
//! one compact pack, see [`Segment`]), the signatures learned for nodes
//! already stored, the local author's **outbox** (by seq), and a
//! **checkpoint** of its document and history index. A store treats
//! segments and checkpoints as bytes, except that [`SqliteStore`] merges
//! small segments into larger ones (see `merge.rs`).
//!
//! **Architecture Invariant:** a call that returns `Ok` from a write method
//! has put the write on stable storage (for [`MemoryStore`], on the
//! in-memory "disk" that survives a simulated crash). Callers acknowledge
//! nothing before that.

use syncline_core::{RoomId, Signature};
use thiserror::Error;

mod blobs;
pub mod conformance;
mod faulty;
mod memory;
mod merge;
pub mod replica;
mod sqlite;

pub use blobs::{
    BlobKey, BlobReader, BlobState, BlobStore, BlobStoreError, BlobStoreOptions, Written,
};
pub use faulty::{FaultPlan, FaultyStore};
pub use memory::{MemoryStore, appended, check_expected};
pub use merge::merge_segments;
pub use replica::{CHECKPOINT_MIN_NODES, DurableRoom, Opened, Replica, ReplicaError};
pub use sqlite::{SqliteOptions, SqliteStats, SqliteStore};
pub use syncline_core::dag::Segment;

/// Most nodes in one segment: reading any node of a segment decodes all
/// of it, so writers cut larger appends, and merges stop, at this size.
pub const MAX_SEGMENT_NODES: u32 = 16384;

/// Most content in one segment, about, decoded: writers cut appends of
/// large nodes at this size.
pub const MAX_SEGMENT_CONTENT: usize = 1 << 20;

/// One durable write to a room, committed atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// History appended, consecutive segments: each must start where the
    /// history ends (one whose nodes are all stored is skipped; one that
    /// leaves a gap or overlaps is refused with [`StoreError::Invalid`],
    /// and nothing of the batch is written).
    pub segments: Vec<Segment>,
    /// Signatures learned or made for stored nodes (this batch's segments
    /// included), by node number. The first one held for a node stays;
    /// one for a node not stored is ignored.
    pub signatures: Vec<(u32, Signature)>,
    /// Local nodes added to the outbox (not yet acknowledged by a server),
    /// by the local author's seq.
    pub outbox_add: Vec<u64>,
    /// Outbox entries the server acknowledged.
    pub outbox_remove: Vec<u64>,
    /// A new checkpoint of the room, replacing the stored one (a store
    /// shared by several writers may keep a stored one that covers more
    /// nodes: a checkpoint is a cache, and the fullest saves the most).
    pub checkpoint: Option<Vec<u8>>,
    /// The history must hold exactly this many nodes before the batch
    /// applies, or the batch is refused with [`StoreError::Invalid`]: a
    /// writer whose view is stale (another process sharing the store
    /// appended meanwhile) must not have its segments taken for a retry
    /// of nodes stored already and skipped.
    pub expect_nodes: Option<u64>,
}

impl Batch {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
            && self.signatures.is_empty()
            && self.outbox_add.is_empty()
            && self.outbox_remove.is_empty()
            && self.checkpoint.is_none()
    }
}

/// Everything stored of one room.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredRoom {
    /// The history, consecutive from node 0.
    pub segments: Vec<Segment>,
    /// Signatures stored beside the segments (not yet merged into one),
    /// by node number, ascending. Where a node's segment holds a signature
    /// too, that one was stored first and is the node's.
    pub signatures: Vec<(u32, Signature)>,
    /// The last checkpoint written, if any.
    pub checkpoint: Option<Vec<u8>>,
    /// The outbox: seqs of the local author's unacknowledged nodes,
    /// ascending.
    pub outbox: Vec<u64>,
}

impl StoredRoom {
    /// Nodes stored.
    pub fn node_count(&self) -> u64 {
        self.segments
            .last()
            .map_or(0, |s| u64::from(s.start + s.len))
    }
}

/// What is stored of a room from some node on: what another process
/// wrote since this one loaded the room ([`Store::load_tail`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredTail {
    /// The segments holding nodes from the one asked for on, consecutive
    /// (the first may start before it: segments are merged).
    pub segments: Vec<Segment>,
    /// Signatures stored beside the segments for those nodes, ascending.
    pub signatures: Vec<(u32, Signature)>,
    /// The whole outbox, ascending.
    pub outbox: Vec<u64>,
    /// Nodes the stored checkpoint covers (0 without one).
    pub checkpointed: u64,
}

impl StoredTail {
    /// The tail of `stored` from node `from` on.
    pub fn of(stored: StoredRoom, from: u64) -> StoredTail {
        let checkpointed = stored
            .checkpoint
            .as_deref()
            .and_then(|c| syncline_core::checkpoint::header(c).ok())
            .map_or(0, |h| h.nodes);
        StoredTail {
            segments: stored
                .segments
                .into_iter()
                .filter(|s| u64::from(s.start + s.len) > from)
                .collect(),
            signatures: stored
                .signatures
                .into_iter()
                .filter(|(n, _)| u64::from(*n) >= from)
                .collect(),
            outbox: stored.outbox,
            checkpointed,
        }
    }
}

/// Bytes a room takes in a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoomBytes {
    /// Its history: the segments and the signatures beside them.
    pub history: u64,
    /// Its checkpoint.
    pub checkpoint: u64,
    /// Segments the history is in.
    pub segments: u64,
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
    /// The batch cannot apply to what is stored (a segment that leaves a
    /// gap in the history or overlaps it): nothing of it was written.
    #[error("invalid batch: {0}")]
    Invalid(String),
    /// The store was closed (or crashed, for the faulty store).
    #[error("storage is closed")]
    Closed,
}

/// Durable storage of rooms' histories, outboxes, checkpoints and replica
/// metadata.
///
/// All methods take `&self` so one store can serve many rooms from many
/// threads; a backend may merge concurrent writes into one durable commit
/// (group commit).
pub trait Store: Send + Sync {
    /// Atomically and durably applies `batch` to `room`'s data. Returns only
    /// once the batch is on stable storage.
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError>;

    /// Everything stored of `room` (empty if nothing is).
    fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError>;

    /// Number of nodes stored for `room`.
    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError>;

    /// Bytes `room` takes.
    fn room_bytes(&self, room: &RoomId) -> Result<RoomBytes, StoreError>;

    /// Rooms with any stored node, sorted.
    fn rooms(&self) -> Result<Vec<RoomId>, StoreError>;

    /// Replica metadata (identity, settings).
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Durably writes replica metadata.
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// What is stored of `room` from node `from` on, read at one instant:
    /// what other processes sharing the store appended since this one
    /// loaded the room, and the outbox and checkpoint as they are now.
    fn load_tail(&self, room: &RoomId, from: u64) -> Result<StoredTail, StoreError> {
        Ok(StoredTail::of(self.load(room)?, from))
    }

    /// A number that changes when another process commits to the store:
    /// polled to notice their writes. Constant for a store no other
    /// process opens (the default).
    fn foreign_version(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Takes the lock called `name` across every process sharing the
    /// store, waiting for it (within the backend's timeout), held until
    /// the returned guard drops. Rooms are locked by their names: a writer
    /// that holds a room's lock, catches up with what others stored
    /// ([`DurableRoom::refresh`]) and then appends cannot have its batch
    /// refused as stale. `Ok(None)`: the store has no other writers (the
    /// default), so there is nothing to lock or catch up with.
    fn lock(&self, name: &str) -> Result<Option<StoreLock<'_>>, StoreError> {
        let _ = name;
        Ok(None)
    }
}

/// A lock across the processes sharing a store ([`Store::lock`]),
/// released when dropped.
pub type StoreLock<'a> = Box<dyn Send + 'a>;
