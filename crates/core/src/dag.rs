//! The history DAG of one room: validated insertion, the pending queue for
//! nodes that arrive before their parents, heads, version vectors, causal
//! order, and what a peer with given heads or version vector lacks.
//!
//! Nodes are interned as dense [`NodeIdx`] numbers in insertion order, which
//! is always a causal order (a node is inserted only after its parents). The
//! document layer uses the same numbers to refer to nodes cheaply.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::hlc::Hlc;
use crate::ids::{AuthorId, IdMap, IdSet, NodeId, RoomId, Signature};
use crate::limits::MAX_PENDING_NODES;
use crate::node::{Node, NodeFormat};

/// Size of one chunk of the node byte arena.
const BYTE_CHUNK: usize = 1 << 20;

/// Dense, per-room number of an inserted node (insertion order).
pub type NodeIdx = u32;

/// A per-author summary of a causally complete history: author -> highest seq.
pub type VersionVector = BTreeMap<AuthorId, u64>;

/// A node whose id matches its canonical bytes and whose authorship has been
/// established (by a signature over it or over a later node of the same
/// author chain, or because this replica wrote it).
#[derive(Clone, Debug)]
pub struct VerifiedNode {
    /// Id of `bytes`.
    pub id: NodeId,
    /// The decoded node.
    pub node: Node,
    /// Its canonical encoding.
    pub bytes: Vec<u8>,
    /// A signature by the author over `id`, when one came with it.
    pub sig: Option<Signature>,
    /// (author, seq) of each parent, in the order of `node.parents`, which
    /// is how a format-2 node's parents are found (empty for a format-1
    /// node: its parents are format-1 nodes, found by id).
    pub parent_keys: Vec<(AuthorId, u64)>,
}

/// What a node waiting in the pending queue waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum WaitKey {
    /// A node by (author, seq).
    Seq(AuthorId, u64),
    /// A format-1 node by id.
    Id(NodeId),
}

/// Why a node was refused by the DAG.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DagError {
    /// The node names another room.
    #[error("node {id:?} belongs to room {found}, not {expected}")]
    WrongRoom {
        /// The node.
        id: NodeId,
        /// This DAG's room.
        expected: RoomId,
        /// The node's room.
        found: RoomId,
    },
    /// Two different nodes with one (author, seq).
    #[error("equivocation by {author:?} at seq {seq}: {existing:?} and {conflicting:?}")]
    Equivocation {
        /// The author who signed both.
        author: AuthorId,
        /// The contested seq.
        seq: u64,
        /// The node already held.
        existing: NodeId,
        /// The node refused.
        conflicting: NodeId,
    },
    /// The node breaks a structural rule (see [`Node::check_structure`]).
    #[error("invalid node {id:?}: {source}")]
    Structure {
        /// The node.
        id: NodeId,
        /// The broken rule.
        source: crate::node::NodeDecodeError,
    },
    /// The node breaks a rule that needs its parents to check.
    #[error("invalid node {id:?}: {reason}")]
    Invalid {
        /// The node.
        id: NodeId,
        /// The broken rule.
        reason: &'static str,
    },
    /// The pending queue is full; the node was not kept.
    #[error("pending queue full ({0} nodes waiting for parents)")]
    PendingFull(usize),
}

/// What became of one inserted node.
#[derive(Debug, Default)]
pub struct Insertion {
    /// Nodes added to the DAG by this call, in causal order: the node itself
    /// and any pending nodes it released. Each is handed back for
    /// materialization.
    pub accepted: Vec<(NodeIdx, Node)>,
    /// The node was already known (or already pending).
    pub duplicate: bool,
    /// The node waits in the pending queue for missing parents.
    pub pending: bool,
    /// Pending nodes released by this call but refused by validation.
    pub released_errors: Vec<DagError>,
}

#[derive(Clone, Debug)]
struct Meta {
    id: NodeId,
    format: NodeFormat,
    author: u32,
    seq: u64,
    lamport: u64,
    hlc: Hlc,
    parents_start: u32,
    parents_len: u16,
}

/// The history of one room.
#[derive(Clone, Debug)]
pub struct Dag {
    room: RoomId,
    metas: Vec<Meta>,
    /// Canonical bytes of every node, back to back in fixed-size chunks
    /// (no allocation per node, and growth never copies old history);
    /// `byte_spans[i]` = (chunk, start, end) of node `i`.
    byte_chunks: Vec<Vec<u8>>,
    byte_spans: Vec<(u32, u32, u32)>,
    parent_arena: Vec<NodeIdx>,
    index: IdMap<NodeId, NodeIdx>,
    /// Format-1 nodes by id: what format-1 parents and characters are
    /// found through (they may cite only format-1 nodes).
    legacy: IdMap<NodeId, NodeIdx>,
    authors: Vec<AuthorId>,
    author_index: IdMap<AuthorId, u32>,
    /// Per author: chain[seq - 1] is the node with that seq.
    chains: Vec<Vec<NodeIdx>>,
    heads: IdSet<NodeIdx>,
    signatures: IdMap<NodeIdx, Signature>,
    pending: Pending,
}

#[derive(Clone, Debug, Default)]
struct Pending {
    /// Missing parent -> nodes waiting for it.
    waiting: IdMap<WaitKey, Vec<VerifiedNode>>,
    ids: IdSet<NodeId>,
    limit: usize,
}

impl Dag {
    /// An empty history for `room`.
    pub fn new(room: RoomId) -> Dag {
        Dag::with_pending_limit(room, MAX_PENDING_NODES)
    }

    /// An empty history whose pending queue holds at most `limit` nodes.
    pub fn with_pending_limit(room: RoomId, limit: usize) -> Dag {
        Dag {
            room,
            metas: Vec::new(),
            byte_chunks: Vec::new(),
            byte_spans: Vec::new(),
            parent_arena: Vec::new(),
            index: IdMap::default(),
            legacy: IdMap::default(),
            authors: Vec::new(),
            author_index: IdMap::default(),
            chains: Vec::new(),
            heads: IdSet::default(),
            signatures: IdMap::default(),
            pending: Pending {
                limit,
                ..Pending::default()
            },
        }
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// Number of nodes in the DAG (pending ones excluded).
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    /// Whether no node was inserted yet.
    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Number of nodes waiting for parents.
    pub fn pending_len(&self) -> usize {
        self.pending.ids.len()
    }

    /// The number of a known node.
    pub fn idx(&self, id: &NodeId) -> Option<NodeIdx> {
        self.index.get(id).copied()
    }

    /// Whether a node is in the DAG (not merely pending).
    pub fn contains(&self, id: &NodeId) -> bool {
        self.index.contains_key(id)
    }

    /// The id of node `idx`.
    pub fn id(&self, idx: NodeIdx) -> &NodeId {
        &self.metas[idx as usize].id
    }

    /// The canonical format of node `idx`.
    pub fn format(&self, idx: NodeIdx) -> NodeFormat {
        self.metas[idx as usize].format
    }

    /// The number of a held format-1 node (the only nodes a format-1 node
    /// may cite).
    pub fn legacy_idx(&self, id: &NodeId) -> Option<NodeIdx> {
        self.legacy.get(id).copied()
    }

    /// The canonical bytes of node `idx`.
    pub fn bytes(&self, idx: NodeIdx) -> &[u8] {
        let (chunk, start, end) = self.byte_spans[idx as usize];
        &self.byte_chunks[chunk as usize][start as usize..end as usize]
    }

    fn store_bytes(&mut self, bytes: &[u8]) {
        let fits = self
            .byte_chunks
            .last()
            .is_some_and(|c| c.capacity() - c.len() >= bytes.len());
        if !fits {
            // Nodes are at most MAX_NODE_BYTES, so one always fits a chunk.
            self.byte_chunks
                .push(Vec::with_capacity(BYTE_CHUNK.max(bytes.len())));
        }
        let chunk = self.byte_chunks.len() - 1;
        let c = &mut self.byte_chunks[chunk];
        let start = c.len();
        c.extend_from_slice(bytes);
        self.byte_spans
            .push((chunk as u32, start as u32, c.len() as u32));
    }

    /// The author of node `idx`.
    pub fn author(&self, idx: NodeIdx) -> &AuthorId {
        &self.authors[self.metas[idx as usize].author as usize]
    }

    /// The seq of node `idx`.
    pub fn seq(&self, idx: NodeIdx) -> u64 {
        self.metas[idx as usize].seq
    }

    /// The lamport of node `idx`.
    pub fn lamport(&self, idx: NodeIdx) -> u64 {
        self.metas[idx as usize].lamport
    }

    /// The timestamp of node `idx`.
    pub fn hlc(&self, idx: NodeIdx) -> Hlc {
        self.metas[idx as usize].hlc
    }

    /// The parents of node `idx`.
    pub fn parents(&self, idx: NodeIdx) -> &[NodeIdx] {
        let m = &self.metas[idx as usize];
        let start = m.parents_start as usize;
        &self.parent_arena[start..start + m.parents_len as usize]
    }

    /// A stored signature by the author over node `idx`, if one arrived.
    pub fn signature(&self, idx: NodeIdx) -> Option<&Signature> {
        self.signatures.get(&idx)
    }

    /// Records a signature over node `idx` (e.g. one made locally on export).
    pub fn set_signature(&mut self, idx: NodeIdx, sig: Signature) {
        self.signatures.insert(idx, sig);
    }

    /// The node with (author, seq), if held.
    pub fn by_author_seq(&self, author: &AuthorId, seq: u64) -> Option<NodeIdx> {
        let a = *self.author_index.get(author)?;
        let chain = &self.chains[a as usize];
        seq.checked_sub(1)
            .and_then(|i| chain.get(i as usize))
            .copied()
    }

    /// The highest seq held of `author` (0 if none).
    pub fn author_seq(&self, author: &AuthorId) -> u64 {
        self.author_index
            .get(author)
            .map_or(0, |&a| self.chains[a as usize].len() as u64)
    }

    /// Nodes without children, sorted by id, with their numbers.
    pub fn head_nodes(&self) -> Vec<(NodeId, NodeIdx)> {
        let mut heads: Vec<(NodeId, NodeIdx)> =
            self.heads.iter().map(|&i| (*self.id(i), i)).collect();
        heads.sort_unstable();
        heads
    }

    /// (author, seq) of each parent of node `idx`, in canonical order.
    pub fn parent_keys(&self, idx: NodeIdx) -> Vec<(AuthorId, u64)> {
        self.parents(idx)
            .iter()
            .map(|&p| (*self.author(p), self.seq(p)))
            .collect()
    }

    /// Nodes without children, sorted by id.
    pub fn heads(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.heads.iter().map(|&i| *self.id(i)).collect();
        ids.sort_unstable();
        ids
    }

    /// The lamport a node citing every head would carry.
    pub fn lamport_after_heads(&self) -> u64 {
        1 + self
            .heads
            .iter()
            .map(|&h| self.lamport(h))
            .max()
            .unwrap_or(0)
    }

    /// Author -> highest seq held. Exact for a causally complete history.
    pub fn version_vector(&self) -> VersionVector {
        self.authors
            .iter()
            .zip(&self.chains)
            .map(|(a, c)| (*a, c.len() as u64))
            .collect()
    }

    /// The lamport a node with these parents must carry.
    pub fn next_lamport(&self, parents: &[NodeIdx]) -> u64 {
        1 + parents.iter().map(|&p| self.lamport(p)).max().unwrap_or(0)
    }

    /// The index the next inserted node will get.
    pub fn next_idx(&self) -> NodeIdx {
        self.metas.len() as NodeIdx
    }

    /// Inserts a verified node. Idempotent: a node already held (or already
    /// pending) is a no-op. A node whose parents are not all held waits in the
    /// pending queue and is inserted, with the checks below, when they arrive.
    pub fn insert(&mut self, v: VerifiedNode) -> Result<Insertion, DagError> {
        let mut out = Insertion::default();
        if v.node.room != self.room {
            return Err(DagError::WrongRoom {
                id: v.id,
                expected: self.room.clone(),
                found: v.node.room.clone(),
            });
        }
        v.node
            .check_structure()
            .map_err(|source| DagError::Structure { id: v.id, source })?;
        if self.index.contains_key(&v.id) {
            out.duplicate = true;
            return Ok(out);
        }
        if self.pending.ids.contains(&v.id) {
            // Held only in memory, still waiting: not a node the sender may
            // count as delivered.
            out.pending = true;
            return Ok(out);
        }
        let parents = match self.resolve_parents(&v)? {
            Ok(parents) => parents,
            Err(missing) => {
                self.park(missing, v)?;
                out.pending = true;
                return Ok(out);
            }
        };
        let released = self.waits_released_by(&v);
        self.insert_ready(v, &parents, &mut out.accepted)?;
        self.release_waiters(released, &mut out);
        Ok(out)
    }

    /// The numbers of `v`'s parents, or what the first missing one waits
    /// under. A format-2 parent held under its (author, seq) with another
    /// id means that author equivocated.
    fn resolve_parents(&self, v: &VerifiedNode) -> Result<Result<Vec<NodeIdx>, WaitKey>, DagError> {
        let mut out = Vec::with_capacity(v.node.parents.len());
        if v.node.format == NodeFormat::V1 {
            for p in &v.node.parents {
                match self.legacy.get(p) {
                    Some(&idx) => out.push(idx),
                    None => return Ok(Err(WaitKey::Id(*p))),
                }
            }
            return Ok(Ok(out));
        }
        if v.parent_keys.len() != v.node.parents.len() {
            return Err(DagError::Invalid {
                id: v.id,
                reason: "parents without their (author, seq)",
            });
        }
        for (&(author, seq), cited) in v.parent_keys.iter().zip(&v.node.parents) {
            let Some(idx) = self.by_author_seq(&author, seq) else {
                return Ok(Err(WaitKey::Seq(author, seq)));
            };
            if self.id(idx) != cited {
                return Err(DagError::Equivocation {
                    author,
                    seq,
                    existing: *self.id(idx),
                    conflicting: *cited,
                });
            }
            out.push(idx);
        }
        Ok(Ok(out))
    }

    /// What inserting `v` releases: waits on its (author, seq), and on its
    /// id if it is a format-1 node.
    fn waits_released_by(&self, v: &VerifiedNode) -> Vec<WaitKey> {
        let mut keys = vec![WaitKey::Seq(v.node.author, v.node.seq)];
        if v.node.format == NodeFormat::V1 {
            keys.push(WaitKey::Id(v.id));
        }
        keys
    }

    fn park(&mut self, missing: WaitKey, v: VerifiedNode) -> Result<(), DagError> {
        if self.pending.ids.len() >= self.pending.limit {
            return Err(DagError::PendingFull(self.pending.ids.len()));
        }
        self.pending.ids.insert(v.id);
        self.pending.waiting.entry(missing).or_default().push(v);
        Ok(())
    }

    fn release_waiters(&mut self, first: Vec<WaitKey>, out: &mut Insertion) {
        let mut ready = first;
        while let Some(key) = ready.pop() {
            let Some(waiters) = self.pending.waiting.remove(&key) else {
                continue;
            };
            for w in waiters {
                self.pending.ids.remove(&w.id);
                let parents = match self.resolve_parents(&w) {
                    Ok(Ok(parents)) => parents,
                    Ok(Err(missing)) => {
                        // Re-parking cannot exceed the limit: this node was
                        // counted.
                        self.pending.ids.insert(w.id);
                        self.pending.waiting.entry(missing).or_default().push(w);
                        continue;
                    }
                    Err(e) => {
                        out.released_errors.push(e);
                        continue;
                    }
                };
                let released = self.waits_released_by(&w);
                match self.insert_ready(w, &parents, &mut out.accepted) {
                    Ok(()) => ready.extend(released),
                    Err(e) => out.released_errors.push(e),
                }
            }
        }
    }

    /// Validates a node whose parents are all held, then inserts it.
    fn insert_ready(
        &mut self,
        v: VerifiedNode,
        parents: &[NodeIdx],
        accepted: &mut Vec<(NodeIdx, Node)>,
    ) -> Result<(), DagError> {
        let idx = self.validate_and_record(&v.id, &v.node, &v.bytes, v.sig, parents)?;
        accepted.push((idx, v.node));
        Ok(())
    }

    /// Inserts a node this replica just built on its current heads (the
    /// transaction has already materialized it), whose parents are the
    /// nodes `parents`: the same checks as [`Dag::insert`], without handing
    /// the node back.
    pub(crate) fn insert_local(
        &mut self,
        id: &NodeId,
        node: &Node,
        bytes: &[u8],
        parents: &[NodeIdx],
    ) -> Result<NodeIdx, DagError> {
        node.check_structure()
            .map_err(|source| DagError::Structure { id: *id, source })?;
        let extends = node.room == self.room
            && node.parents.len() == parents.len()
            && parents
                .iter()
                .zip(&node.parents)
                .all(|(&p, id)| p < self.next_idx() && self.id(p) == id);
        if !extends {
            return Err(DagError::Invalid {
                id: *id,
                reason: "a local node must extend this room's held history",
            });
        }
        self.validate_and_record(id, node, bytes, None, parents)
    }

    /// The checks that need the parents (lamport, author chain, clock
    /// order, equivocation), then the insertion itself.
    fn validate_and_record(
        &mut self,
        id: &NodeId,
        node: &Node,
        bytes: &[u8],
        sig: Option<Signature>,
        parents: &[NodeIdx],
    ) -> Result<NodeIdx, DagError> {
        let author = self.validate(id, node, parents)?;
        Ok(self.record(id, node, bytes, sig, author, parents))
    }

    /// Returns the author's number (`None`: a new author).
    fn validate(
        &self,
        id: &NodeId,
        node: &Node,
        parents: &[NodeIdx],
    ) -> Result<Option<u32>, DagError> {
        let invalid = |reason| DagError::Invalid { id: *id, reason };
        if node.lamport != self.next_lamport(parents) {
            return Err(invalid("lamport is not 1 + the largest parent lamport"));
        }
        let author = self.author_index.get(&node.author).copied();
        let held = author.map_or(0, |a| self.chains[a as usize].len() as u64);
        if node.seq <= held {
            let existing = self.chains[author.expect("held > 0") as usize][node.seq as usize - 1];
            return Err(DagError::Equivocation {
                author: node.author,
                seq: node.seq,
                existing: *self.id(existing),
                conflicting: *id,
            });
        }
        if node.seq != held + 1 {
            return Err(invalid("seq skips ahead of the author's chain"));
        }
        if node.seq > 1 {
            let prev = self.chains[author.expect("seq > 1 and held") as usize][held as usize - 1];
            if !parents.contains(&prev) {
                return Err(invalid("does not cite the author's previous node"));
            }
            // Strictly increasing clocks along a chain make (hlc, author)
            // unique per node, so last-writer-wins stamps need no node id.
            if node.hlc <= self.hlc(prev) {
                return Err(invalid("hlc does not increase along the author's chain"));
            }
        }
        Ok(author)
    }

    fn record(
        &mut self,
        id: &NodeId,
        node: &Node,
        bytes: &[u8],
        sig: Option<Signature>,
        author: Option<u32>,
        parents: &[NodeIdx],
    ) -> NodeIdx {
        let author = author.unwrap_or_else(|| {
            let a = self.authors.len() as u32;
            self.authors.push(node.author);
            self.author_index.insert(node.author, a);
            self.chains.push(Vec::new());
            a
        });
        let idx = self.next_idx();
        for p in parents {
            self.heads.remove(p);
        }
        self.heads.insert(idx);
        self.metas.push(Meta {
            id: *id,
            format: node.format,
            author,
            seq: node.seq,
            lamport: node.lamport,
            hlc: node.hlc,
            parents_start: self.parent_arena.len() as u32,
            parents_len: parents.len() as u16,
        });
        self.parent_arena.extend_from_slice(parents);
        self.store_bytes(bytes);
        self.index.insert(*id, idx);
        if node.format == NodeFormat::V1 {
            self.legacy.insert(*id, idx);
        }
        self.chains[author as usize].push(idx);
        if let Some(sig) = sig {
            self.signatures.insert(idx, sig);
        }
        idx
    }

    /// Whether `a` is a strict ancestor of `b`. Walks back from `b`, pruning
    /// by lamport, so the cost is the part of history between them.
    pub fn is_ancestor(&self, a: NodeIdx, b: NodeIdx) -> bool {
        if a == b {
            return false;
        }
        let target = self.lamport(a);
        if target >= self.lamport(b) {
            return false;
        }
        if self.parents(b).contains(&a) {
            return true;
        }
        // The author chain gives a quick answer for one author's own history.
        let (ma, mb) = (&self.metas[a as usize], &self.metas[b as usize]);
        if ma.author == mb.author {
            return ma.seq < mb.seq;
        }
        // Walk back from `b`. Reaching any node of `a`'s author settles that
        // branch through the chain: at or after `a`'s seq, `a` is an
        // ancestor; before it, `a` cannot be behind that node.
        let mut seen = IdSet::default();
        let mut stack = vec![b];
        while let Some(n) = stack.pop() {
            for &p in self.parents(n) {
                let mp = &self.metas[p as usize];
                if mp.author == ma.author {
                    if mp.seq >= ma.seq {
                        return true;
                    }
                    continue;
                }
                if mp.lamport > target && seen.insert(p) {
                    stack.push(p);
                }
            }
        }
        false
    }

    /// Sorts node numbers into the deterministic replay order: by (lamport,
    /// id), which is topological because lamport grows along every edge.
    pub fn sort_causal(&self, nodes: &mut [NodeIdx]) {
        nodes.sort_unstable_by_key(|&i| (self.lamport(i), *self.id(i)));
    }

    /// Every node, in deterministic causal order.
    pub fn causal_order(&self) -> Vec<NodeIdx> {
        let mut all: Vec<NodeIdx> = (0..self.next_idx()).collect();
        self.sort_causal(&mut all);
        all
    }

    /// What a peer whose history is summarized by `vv` lacks, in causal order.
    pub fn missing_for_version_vector(&self, vv: &VersionVector) -> Vec<NodeIdx> {
        let mut out = Vec::new();
        for (author, chain) in self.authors.iter().zip(&self.chains) {
            let has = vv.get(author).copied().unwrap_or(0) as usize;
            if has < chain.len() {
                out.extend_from_slice(&chain[has..]);
            }
        }
        self.sort_causal(&mut out);
        out
    }

    /// What a peer with these heads lacks, in causal order. Heads unknown here
    /// are ignored (the peer has history this replica lacks).
    pub fn missing_for_heads(&self, heads: &[NodeId]) -> Vec<NodeIdx> {
        let mut has = vec![false; self.len()];
        let mut stack: Vec<NodeIdx> = heads.iter().filter_map(|h| self.idx(h)).collect();
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut has[n as usize], true) {
                continue;
            }
            stack.extend_from_slice(self.parents(n));
        }
        let mut out: Vec<NodeIdx> = (0..self.next_idx()).filter(|&i| !has[i as usize]).collect();
        self.sort_causal(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    fn room() -> RoomId {
        RoomId::new("dag-test").unwrap()
    }

    fn make(author: &Keypair, seq: u64, parents: &[&VerifiedNode], lamport: u64) -> VerifiedNode {
        let mut parents = parents.to_vec();
        parents.sort_unstable_by_key(|v| v.id);
        let node = Node {
            format: NodeFormat::V2,
            room: room(),
            author: author.author(),
            seq,
            parents: parents.iter().map(|v| v.id).collect(),
            lamport,
            hlc: Hlc {
                wall_ms: seq,
                counter: 0,
            },
            ops: vec![],
        };
        let bytes = node.encode();
        VerifiedNode {
            id: Node::id_of(&bytes),
            node,
            bytes,
            sig: None,
            parent_keys: parents
                .iter()
                .map(|v| (v.node.author, v.node.seq))
                .collect(),
        }
    }

    #[test]
    fn out_of_order_nodes_wait_and_are_released_in_causal_order() {
        let a = Keypair::from_seed([1; 32]);
        let b = Keypair::from_seed([2; 32]);
        let a1 = make(&a, 1, &[], 1);
        let b1 = make(&b, 1, &[&a1], 2);
        let a2 = make(&a, 2, &[&a1, &b1], 3);
        let mut dag = Dag::new(room());
        assert!(dag.insert(a2.clone()).unwrap().pending);
        assert!(dag.insert(b1.clone()).unwrap().pending);
        // Again while waiting: still pending, not held (a sender may not
        // count it as delivered).
        let again = dag.insert(b1.clone()).unwrap();
        assert!(again.pending && !again.duplicate);
        assert_eq!(dag.pending_len(), 2);
        let ins = dag.insert(a1.clone()).unwrap();
        let order: Vec<NodeId> = ins.accepted.iter().map(|(i, _)| *dag.id(*i)).collect();
        assert_eq!(order, vec![a1.id, b1.id, a2.id]);
        assert_eq!(dag.pending_len(), 0);
        assert_eq!(dag.heads(), vec![a2.id]);
        assert!(dag.insert(a2).unwrap().duplicate);
        assert_eq!(
            dag.version_vector()
                .values()
                .copied()
                .collect::<Vec<_>>()
                .len(),
            2
        );
        assert!(dag.is_ancestor(0, 2));
        assert!(!dag.is_ancestor(2, 0));
    }

    #[test]
    fn equivocation_and_bad_chains_are_refused() {
        let a = Keypair::from_seed([1; 32]);
        let a1 = make(&a, 1, &[], 1);
        let mut dag = Dag::new(room());
        dag.insert(a1.clone()).unwrap();
        let mut fork = make(&a, 1, &[], 1);
        fork.node.hlc.wall_ms = 99;
        fork.bytes = fork.node.encode();
        fork.id = Node::id_of(&fork.bytes);
        assert!(matches!(
            dag.insert(fork),
            Err(DagError::Equivocation { seq: 1, .. })
        ));
        let bad_lamport = make(&a, 2, &[&a1], 5);
        assert!(matches!(
            dag.insert(bad_lamport),
            Err(DagError::Invalid { .. })
        ));
        let skip = make(&a, 3, &[&a1], 2);
        assert!(matches!(dag.insert(skip), Err(DagError::Invalid { .. })));
        assert_eq!(dag.len(), 1);
    }

    #[test]
    fn pending_queue_is_bounded() {
        let a = Keypair::from_seed([1; 32]);
        let a1 = make(&a, 1, &[], 1);
        let a2 = make(&a, 2, &[&a1], 2);
        let a3 = make(&a, 3, &[&a2], 3);
        let mut dag = Dag::with_pending_limit(room(), 1);
        assert!(dag.insert(a2).unwrap().pending);
        assert!(matches!(dag.insert(a3), Err(DagError::PendingFull(1))));
    }

    #[test]
    fn missing_sets_match_version_vectors_and_heads() {
        let a = Keypair::from_seed([1; 32]);
        let b = Keypair::from_seed([2; 32]);
        let a1 = make(&a, 1, &[], 1);
        let b1 = make(&b, 1, &[], 1);
        let a2 = make(&a, 2, &[&a1, &b1], 2);
        let mut dag = Dag::new(room());
        for v in [&a1, &b1, &a2] {
            dag.insert(v.clone()).unwrap();
        }
        let vv: VersionVector = [(a.author(), 1)].into_iter().collect();
        let missing: Vec<NodeId> = dag
            .missing_for_version_vector(&vv)
            .iter()
            .map(|&i| *dag.id(i))
            .collect();
        let mut expect = vec![b1.id, a2.id];
        expect.sort_by_key(|id| (if *id == a2.id { 2 } else { 1 }, *id));
        assert_eq!(missing, expect);
        let from_heads: Vec<NodeId> = dag
            .missing_for_heads(&[a1.id])
            .iter()
            .map(|&i| *dag.id(i))
            .collect();
        assert_eq!(from_heads, expect);
        assert!(dag.missing_for_heads(&dag.heads()).is_empty());
    }
}
