//! The durable replica: rooms whose every change is on stable storage before
//! it is acknowledged.
//!
//! A [`DurableRoom`] pairs the sans-IO [`Room`] with a [`Store`]. Local
//! transactions are committed in memory, persisted together with an outbox
//! entry, and only then returned to the caller; received packs are
//! persisted before the call returns. If a write fails, the room reloads
//! itself from storage, so memory never holds a node the disk does not
//! (later nodes could otherwise be persisted on top of a missing parent).
//!
//! New nodes are stored as segments (one per write, cut at
//! [`MAX_SEGMENT_NODES`]). A room opens from its last checkpoint plus the
//! nodes stored after it; a checkpoint is written (in the same atomic batch
//! as the nodes it covers) once the room has doubled since the last one
//! (and grown by [`CHECKPOINT_MIN_NODES`] at least), and when the room is
//! unloaded or closed. Writing a checkpoint costs about the room's size, so
//! doubling keeps the cost of all of them within twice the last, O(1) per
//! node, while a room that crashes replays at most half its history.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use syncline_core::checkpoint;
use syncline_core::dag::NodeIdx;
use syncline_core::pack::DEFAULT_ZSTD_LEVEL;
use syncline_core::room::{Committed, ExportError, ReceiveError, Received, TxnError};
use syncline_core::{Keypair, NodeId, Room, RoomId, Transaction};
use thiserror::Error;

use crate::{Batch, MAX_SEGMENT_CONTENT, MAX_SEGMENT_NODES, Store, StoreError, StoredRoom};

/// zstd level of the segments a write appends: fast, since it is on the
/// write path (a store may merge and recompress them later).
const APPEND_LEVEL: i32 = 3;

/// A checkpoint is written once this many nodes (and as many as it
/// covers) are past the last one.
pub const CHECKPOINT_MIN_NODES: NodeIdx = 1024;

/// Why a replica operation failed.
#[derive(Debug, Error)]
pub enum ReplicaError {
    /// Storage failed; nothing of this call was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A transaction step was refused.
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// A received pack or node was refused.
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    /// A pack could not be exported.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Stored bytes failed to load (a node that no longer validates).
    #[error("stored history of room {room} is invalid: {reason}")]
    Corrupt {
        /// The room.
        room: RoomId,
        /// What failed.
        reason: String,
    },
}

/// A replica: one identity, one store, rooms loaded on demand.
pub struct Replica {
    store: Arc<dyn Store>,
    key: Keypair,
    rooms: HashMap<RoomId, DurableRoom>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("author", &self.key.author())
            .field("rooms", &self.rooms.len())
            .finish()
    }
}

/// Metadata key of the replica's identity seed.
const IDENTITY_KEY: &str = "identity-v1";

impl Replica {
    /// Opens a replica on `store`. The identity is read from the store; if
    /// there is none, `new_seed` is called once for a fresh 32-byte seed
    /// (callers pass OS randomness; tests pass fixed bytes) and it is stored.
    pub fn open(
        store: Arc<dyn Store>,
        new_seed: impl FnOnce() -> [u8; 32],
    ) -> Result<Replica, ReplicaError> {
        let key = match store.get_meta(IDENTITY_KEY)? {
            Some(seed) => {
                let seed: [u8; 32] = seed
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("identity seed is not 32 bytes".into()))?;
                Keypair::from_seed(seed)
            }
            None => {
                let key = Keypair::from_seed(new_seed());
                store.put_meta(IDENTITY_KEY, &key.seed())?;
                key
            }
        };
        Ok(Replica {
            store,
            key,
            rooms: HashMap::new(),
        })
    }

    /// [`Replica::open`] with a fresh identity, if one is needed, from the
    /// OS random number generator (what apps and servers want; tests pass
    /// fixed seeds to `open`).
    pub fn open_with_os_identity(store: Arc<dyn Store>) -> Result<Replica, ReplicaError> {
        Replica::open(store, || {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).expect("the OS random number generator is available");
            seed
        })
    }

    /// This replica's signing identity.
    pub fn key(&self) -> &Keypair {
        &self.key
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Rooms with stored history.
    pub fn stored_rooms(&self) -> Result<Vec<RoomId>, ReplicaError> {
        Ok(self.store.rooms()?)
    }

    /// The room `id`, loaded from storage on first use.
    pub fn room(&mut self, id: &RoomId) -> Result<&mut DurableRoom, ReplicaError> {
        if !self.rooms.contains_key(id) {
            let room = DurableRoom::load(self.store.clone(), self.key.clone(), id)?;
            self.rooms.insert(id.clone(), room);
        }
        Ok(self.rooms.get_mut(id).expect("inserted above"))
    }
}

/// The metadata key [`DurableRoom::load_after_failure`] writes to make what
/// a failed write left behind durable.
const SYNCED_AFTER_FAILURE: &str = "synced-after-failure";

/// One room of a durable replica.
pub struct DurableRoom {
    room: Room,
    store: Arc<dyn Store>,
    key: Keypair,
    /// Nodes on stable storage: the history's first `stored`.
    stored: NodeIdx,
    /// Nodes the stored checkpoint covers.
    checkpointed: NodeIdx,
    /// Seqs of this replica's own nodes no server has acknowledged, as
    /// stored.
    outbox: BTreeSet<u64>,
    opened: Opened,
    /// See [`DurableRoom::set_checkpoint_min_nodes`].
    checkpoint_min_nodes: NodeIdx,
    /// Whether the room records details (kept across reloads).
    details: bool,
}

/// How a room was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Nodes the checkpoint it opened from covered (0 without one).
    pub from_checkpoint: NodeIdx,
    /// Nodes replayed past the checkpoint (all of them without one).
    pub replayed: NodeIdx,
    /// Why a stored checkpoint was not used, if one was stored but refused
    /// (the room then replays its whole history, and writes a new one).
    pub checkpoint_refused: Option<String>,
}

impl std::fmt::Debug for DurableRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableRoom")
            .field("room", self.room.id())
            .field("nodes", &self.room.dag().len())
            .field("checkpointed", &self.checkpointed)
            .finish()
    }
}

impl DurableRoom {
    /// Loads room `id` from `store` (an empty room if nothing is stored):
    /// from its checkpoint and the nodes stored after it, or, without a
    /// usable checkpoint, by replaying its history.
    pub fn load(
        store: Arc<dyn Store>,
        key: Keypair,
        id: &RoomId,
    ) -> Result<DurableRoom, ReplicaError> {
        let StoredRoom {
            segments,
            signatures,
            checkpoint,
            outbox,
        } = store.load(id)?;
        let corrupt = |reason: String| ReplicaError::Corrupt {
            room: id.clone(),
            reason,
        };
        let mut opened = Opened::default();
        let replay = |segments| {
            Room::from_segments(id.clone(), segments).map_err(|e| corrupt(e.to_string()))
        };
        let mut room = match checkpoint {
            Some(bytes) => match Room::from_checkpoint(id.clone(), &bytes, segments) {
                Ok(room) => {
                    opened.from_checkpoint =
                        checkpoint::header(&bytes).map_or(0, |h| h.nodes) as NodeIdx;
                    room
                }
                // A checkpoint is a cache of what the history says: a bad
                // one costs a replay (of the history read again: the
                // attempt took it), not the room.
                Err(e) => {
                    opened.checkpoint_refused = Some(e.to_string());
                    replay(store.load(id)?.segments)?
                }
            },
            None => replay(segments)?,
        };
        opened.replayed = room.dag().next_idx() - opened.from_checkpoint;
        let next = room.dag().next_idx();
        for (idx, sig) in signatures {
            // One in the node's segment was stored first.
            if idx < next && room.dag().signature(idx).is_none() {
                room.set_signature(idx, sig);
            }
        }
        Ok(DurableRoom {
            stored: next,
            checkpointed: opened.from_checkpoint,
            room,
            store,
            key,
            outbox: outbox.into_iter().collect(),
            opened,
            checkpoint_min_nodes: CHECKPOINT_MIN_NODES,
            details: false,
        })
    }

    /// Loads room `id` after a write to `store` failed in this process.
    /// What a store reads back after a failed write may include writes
    /// that never became durable (a failed fsync leaves them in the cache,
    /// readable), and a room loaded from them would acknowledge nodes a
    /// crash then loses. One successful write makes everything written
    /// before it durable, as an fsync does: that write comes first, and if
    /// it fails too, so does the load.
    pub fn load_after_failure(
        store: Arc<dyn Store>,
        key: Keypair,
        id: &RoomId,
    ) -> Result<DurableRoom, ReplicaError> {
        store.put_meta(SYNCED_AFTER_FAILURE, id.as_str().as_bytes())?;
        DurableRoom::load(store, key, id)
    }

    /// The in-memory room (history and document).
    pub fn room(&self) -> &Room {
        &self.room
    }

    /// The store the room lives in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// How the room was opened.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Nodes stored durably: every node numbered below this is on disk
    /// (all of them, between calls).
    pub fn stored(&self) -> NodeIdx {
        self.stored
    }

    /// Nodes the stored checkpoint covers.
    pub fn checkpointed(&self) -> NodeIdx {
        self.checkpointed
    }

    /// Writes checkpoints once `nodes` (rather than
    /// [`CHECKPOINT_MIN_NODES`]) and as many as the last covers are past
    /// it: small values make tests and the simulator open rooms from
    /// checkpoints often.
    pub fn set_checkpoint_min_nodes(&mut self, nodes: NodeIdx) {
        self.checkpoint_min_nodes = nodes.max(1);
    }

    fn reload(&mut self) -> Result<(), ReplicaError> {
        let min = self.checkpoint_min_nodes;
        let details = self.details;
        let trusted = self.room.dag().governance().map(|g| g.trusted().to_vec());
        *self = DurableRoom::load(self.store.clone(), self.key.clone(), self.room.id())?;
        self.checkpoint_min_nodes = min;
        self.record_details(details);
        // Write authority is checked after a reload as before it.
        if let Some(trusted) = trusted {
            self.govern(trusted);
        }
        Ok(())
    }

    /// Catches up with what other processes sharing the store wrote to
    /// this room since it was loaded or last refreshed: appends the nodes
    /// they stored (applied to the document) and takes the outbox as
    /// stored. Returns the nodes appended. A writer sharing its store with
    /// other processes calls this, holding the room's write lock across
    /// processes, before it appends (see `SqliteOptions::shared`).
    pub fn refresh(&mut self) -> Result<std::ops::Range<NodeIdx>, ReplicaError> {
        debug_assert_eq!(
            self.stored,
            self.room.dag().next_idx(),
            "between calls, memory holds exactly the stored nodes"
        );
        let tail = self
            .store
            .load_tail(self.room.id(), u64::from(self.stored))?;
        let appended = self
            .room
            .append_stored(&tail.segments)
            .map_err(|e| ReplicaError::Corrupt {
                room: self.room.id().clone(),
                reason: e.to_string(),
            });
        // Whatever was appended is stored, even if a later node failed.
        self.stored = self.room.dag().next_idx();
        let appended = appended?;
        for (idx, sig) in tail.signatures {
            if idx < self.stored && self.room.dag().signature(idx).is_none() {
                self.room.set_signature(idx, sig);
            }
        }
        self.outbox = tail.outbox.into_iter().collect();
        self.checkpointed = NodeIdx::try_from(tail.checkpointed)
            .unwrap_or(NodeIdx::MAX)
            .min(self.stored);
        Ok(appended)
    }

    /// Starts (or stops) recording what changes apply (see
    /// `Doc::record_details`); kept when the room reloads.
    pub fn record_details(&mut self, on: bool) {
        self.details = on;
        self.room.record_details(on);
    }

    /// What applied changes did since the last call (see
    /// `Doc::take_details`).
    pub fn take_details(&mut self) -> (Vec<syncline_core::doc::Detail>, usize) {
        self.room.take_details()
    }

    /// The key this replica writes with.
    pub fn author(&self) -> syncline_core::AuthorId {
        self.key.author()
    }

    /// Checks write authority in this room from now on, `trusted` keys
    /// declaring its policy (`Room::govern`; reads the history once).
    pub fn govern(&mut self, trusted: Vec<syncline_core::AuthorId>) {
        self.room.govern(trusted);
    }

    /// Runs `edit` in a transaction at wall time `now_ms`, commits it as one
    /// node, and returns once the node and its outbox entry are durable.
    /// If `edit` fails nothing is written; if storage fails the room is
    /// reloaded and the error returned.
    pub fn transact(
        &mut self,
        now_ms: u64,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<(), TxnError>,
    ) -> Result<Option<Committed>, ReplicaError> {
        let mut tx = self.room.begin(self.key.author(), now_ms);
        edit(&mut tx)?;
        let Some(committed) = tx.commit()? else {
            return Ok(None);
        };
        let seq = self.room.dag().seq(committed.idx);
        self.persist(Batch {
            outbox_add: vec![seq],
            ..Batch::default()
        })?;
        Ok(Some(committed))
    }

    /// Verifies and applies a pack, and returns once every accepted node is
    /// durable. A refused node stops the pack; the nodes before it are kept
    /// (and persisted) and the error is returned.
    pub fn receive_pack(&mut self, pack: &[u8]) -> Result<Received, ReplicaError> {
        Ok(self.with_room(|room, _| room.receive_pack(pack))??)
    }

    /// Runs `f` on the in-memory room (a sync session's `handle_input`,
    /// say) and, before returning, persists every node it inserted, with
    /// the signatures that came with them. On a storage failure the room
    /// reloads from disk and the error is returned: nothing `f` inserted
    /// may then be acknowledged, so a driver closes the session.
    pub fn with_room<R>(
        &mut self,
        f: impl FnOnce(&mut Room, &Keypair) -> R,
    ) -> Result<R, ReplicaError> {
        let out = f(&mut self.room, &self.key);
        self.persist(Batch::default())?;
        Ok(out)
    }

    /// Commits `batch` with the nodes not stored yet (as segments of at
    /// most [`MAX_SEGMENT_NODES`] and about [`MAX_SEGMENT_CONTENT`]) and,
    /// when due, a checkpoint covering them. On failure, reloads.
    fn persist(&mut self, batch: Batch) -> Result<(), ReplicaError> {
        let next = self.room.dag().next_idx();
        let behind = next - self.checkpointed;
        let due = next > self.stored && behind >= self.checkpoint_min_nodes.max(self.checkpointed);
        self.commit(batch, due)
    }

    /// Writes a checkpoint covering every node if the stored one covers
    /// fewer (before a room is unloaded, so that the next open replays
    /// nothing).
    pub fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        if self.checkpointed == self.room.dag().next_idx() {
            return Ok(());
        }
        self.commit(Batch::default(), true)
    }

    fn commit(&mut self, mut batch: Batch, checkpoint: bool) -> Result<(), ReplicaError> {
        let next = self.room.dag().next_idx();
        let dag = self.room.dag();
        // Segments of at most MAX_SEGMENT_NODES nodes and (past the first
        // node) MAX_SEGMENT_CONTENT bytes.
        let (mut start, mut bytes) = (self.stored, 0);
        for idx in self.stored..next {
            let size = dag.content_size(idx);
            let full = idx - start == MAX_SEGMENT_NODES || bytes + size > MAX_SEGMENT_CONTENT;
            if idx > start && full {
                batch.segments.push(dag.segment(start..idx, APPEND_LEVEL));
                (start, bytes) = (idx, 0);
            }
            bytes += size;
        }
        if next > start {
            batch.segments.push(dag.segment(start..next, APPEND_LEVEL));
        }
        if !batch.segments.is_empty() {
            batch.expect_nodes = Some(u64::from(self.stored));
        }
        if checkpoint {
            batch.checkpoint = Some(self.room.checkpoint());
        }
        if batch.is_empty() {
            return Ok(());
        }
        let outbox_add = batch.outbox_add.clone();
        let outbox_remove = batch.outbox_remove.clone();
        if let Err(e) = self.store.commit(self.room.id(), batch) {
            self.reload()?;
            return Err(e.into());
        }
        self.stored = next;
        if checkpoint {
            self.checkpointed = next;
        }
        self.outbox.extend(outbox_add);
        for seq in &outbox_remove {
            self.outbox.remove(seq);
        }
        Ok(())
    }

    /// Exports `nodes` as a pack signed where needed, persisting any
    /// signature made for it.
    pub fn export_pack(&mut self, nodes: &[NodeIdx]) -> Result<Vec<u8>, ReplicaError> {
        let exported =
            self.room
                .export_pack(nodes, Some(&self.key), &|_, _, _| false, DEFAULT_ZSTD_LEVEL)?;
        self.persist(Batch {
            signatures: exported.signatures,
            ..Batch::default()
        })?;
        Ok(exported.pack)
    }

    /// Ids of the local nodes not yet acknowledged by a server, in commit
    /// order.
    pub fn outbox(&self) -> Vec<NodeId> {
        let me = self.key.author();
        let dag = self.room.dag();
        self.outbox
            .iter()
            .filter_map(|&seq| dag.by_author_seq(&me, seq))
            .map(|idx| dag.id(idx))
            .collect()
    }

    /// How many local nodes no server has acknowledged.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Records that the server holds this replica's own nodes up to
    /// `through_seq` durably (from [`Event::ServerHolds`]).
    ///
    /// [`Event::ServerHolds`]: syncline_core::proto::session::Event::ServerHolds
    pub fn acknowledge_through(&mut self, through_seq: u64) -> Result<(), ReplicaError> {
        let held: Vec<u64> = self.outbox.range(..=through_seq).copied().collect();
        self.remove_from_outbox(held)
    }

    /// Records that the server has these nodes durably (from
    /// [`Event::Acknowledged`]; other authors' nodes are ignored).
    ///
    /// [`Event::Acknowledged`]: syncline_core::proto::session::Event::Acknowledged
    pub fn acknowledge(&mut self, nodes: &[NodeIdx]) -> Result<(), ReplicaError> {
        let me = self.key.author();
        let dag = self.room.dag();
        let held: Vec<u64> = nodes
            .iter()
            .filter(|&&n| *dag.author(n) == me)
            .map(|&n| dag.seq(n))
            .filter(|seq| self.outbox.contains(seq))
            .collect();
        self.remove_from_outbox(held)
    }

    fn remove_from_outbox(&mut self, seqs: Vec<u64>) -> Result<(), ReplicaError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.persist(Batch {
            outbox_remove: seqs,
            ..Batch::default()
        })
    }
}
