//! The durable replica: rooms whose every change is on stable storage before
//! it is acknowledged.
//!
//! A [`DurableRoom`] pairs the sans-IO [`Room`] with a [`Store`]. Local
//! transactions are committed in memory, persisted together with an outbox
//! entry, and only then returned to the caller; received packs are
//! persisted before the call returns. If a write fails, the room reloads
//! itself from storage, so memory never holds a node the disk does not
//! (later nodes could otherwise be persisted on top of a missing parent).

use std::collections::HashMap;
use std::sync::Arc;

use syncline_core::dag::{Dag, NodeIdx};
use syncline_core::node::NodeFormat;
use syncline_core::pack::DEFAULT_ZSTD_LEVEL;
use syncline_core::room::{Committed, ExportError, ReceiveError, Received, TxnError};
use syncline_core::{AuthorId, Keypair, Node, NodeId, Room, RoomId, Transaction, VerifiedNode};
use thiserror::Error;

use crate::{Batch, Store, StoreError, StoredNode};

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

/// One room of a durable replica.
pub struct DurableRoom {
    room: Room,
    store: Arc<dyn Store>,
    key: Keypair,
}

impl std::fmt::Debug for DurableRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableRoom")
            .field("room", self.room.id())
            .field("nodes", &self.room.dag().len())
            .finish()
    }
}

impl DurableRoom {
    /// Loads room `id` from `store` (an empty room if nothing is stored),
    /// replaying its history into the DAG and document.
    pub fn load(
        store: Arc<dyn Store>,
        key: Keypair,
        id: &RoomId,
    ) -> Result<DurableRoom, ReplicaError> {
        let mut dag = Dag::new(id.clone());
        let corrupt = |reason: String| ReplicaError::Corrupt {
            room: id.clone(),
            reason,
        };
        // Rows hold canonical bytes, whose parents are ids: the keys that
        // format-2 parents are found by come from the rows loaded before.
        let mut keys: HashMap<NodeId, (AuthorId, u64)> = HashMap::new();
        for stored in store.load_nodes(id)? {
            let node = Node::decode(&stored.bytes).map_err(|e| corrupt(e.to_string()))?;
            if Node::id_of(&stored.bytes) != stored.id {
                return Err(corrupt(format!(
                    "node {:?} does not hash to its id",
                    stored.id
                )));
            }
            let parent_keys = match node.format {
                NodeFormat::V1 => Vec::new(),
                NodeFormat::V2 => node
                    .parents
                    .iter()
                    .map(|p| keys.get(p).copied())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| corrupt(format!("node {:?} before its parents", stored.id)))?,
            };
            keys.insert(stored.id, (node.author, node.seq));
            dag.insert(VerifiedNode {
                id: stored.id,
                node,
                sig: stored.sig,
                parent_keys,
            })
            .map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(DurableRoom {
            room: Room::with_dag(dag),
            store,
            key,
        })
    }

    /// The in-memory room (history and document).
    pub fn room(&self) -> &Room {
        &self.room
    }

    fn reload(&mut self) -> Result<(), ReplicaError> {
        let fresh = DurableRoom::load(self.store.clone(), self.key.clone(), self.room.id())?;
        self.room = fresh.room;
        Ok(())
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
        let id = self.room.dag().id(committed.idx);
        let batch = Batch {
            nodes: vec![StoredNode {
                id,
                bytes: self.room.dag().node(committed.idx).encode(),
                sig: None,
            }],
            outbox_add: vec![id],
            ..Batch::default()
        };
        self.persist(batch)?;
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
        let first_new = self.room.dag().next_idx();
        let out = f(&mut self.room, &self.key);
        let stored = self.stored_since(first_new);
        if !stored.is_empty() {
            self.persist(Batch {
                nodes: stored,
                ..Batch::default()
            })?;
        }
        Ok(out)
    }

    /// Nodes inserted since `first` (insertion order is causal), as stored.
    fn stored_since(&self, first: NodeIdx) -> Vec<StoredNode> {
        let dag = self.room.dag();
        (first..dag.next_idx())
            .map(|i| StoredNode {
                id: dag.id(i),
                bytes: dag.node(i).encode(),
                sig: dag.signature(i).copied(),
            })
            .collect()
    }

    fn persist(&mut self, batch: Batch) -> Result<(), ReplicaError> {
        if let Err(e) = self.store.commit(self.room.id(), batch) {
            self.reload()?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Exports `nodes` as a pack signed where needed, persisting any
    /// signature made for it.
    pub fn export_pack(&mut self, nodes: &[NodeIdx]) -> Result<Vec<u8>, ReplicaError> {
        let exported =
            self.room
                .export_pack(nodes, Some(&self.key), &|_, _| false, DEFAULT_ZSTD_LEVEL)?;
        if !exported.signatures.is_empty() {
            self.persist(Batch {
                signatures: exported.signatures,
                ..Batch::default()
            })?;
        }
        Ok(exported.pack)
    }

    /// Local nodes not yet acknowledged by a server, in commit order.
    pub fn outbox(&self) -> Result<Vec<NodeId>, ReplicaError> {
        Ok(self.store.outbox(self.room.id())?)
    }

    /// Records that the server holds this replica's own nodes up to
    /// `through_seq` durably (from [`Event::ServerHolds`]).
    ///
    /// [`Event::ServerHolds`]: syncline_core::proto::session::Event::ServerHolds
    pub fn acknowledge_through(&mut self, through_seq: u64) -> Result<(), ReplicaError> {
        let me = self.key.author();
        let dag = self.room.dag();
        // The outbox holds only this replica's own nodes: the ids of its
        // chain up to `through_seq` name the ones the server holds.
        let own: std::collections::HashSet<NodeId> = (1..=through_seq.min(dag.author_seq(&me)))
            .rev()
            .filter_map(|seq| dag.by_author_seq(&me, seq))
            .map(|i| dag.id(i))
            .collect();
        let held: Vec<NodeId> = self
            .outbox()?
            .into_iter()
            .filter(|id| own.contains(id))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        self.acknowledge(&held)
    }

    /// Records that the server has these nodes durably.
    pub fn acknowledge(&mut self, ids: &[NodeId]) -> Result<(), ReplicaError> {
        self.persist(Batch {
            outbox_remove: ids.to_vec(),
            ..Batch::default()
        })
    }
}
