//! The history DAG of one room: validated insertion, the pending queue for
//! nodes that arrive before their parents, heads, version vectors, causal
//! order, and what a peer with a given version vector lacks.
//!
//! Nodes are interned as dense [`NodeIdx`] numbers in insertion order, which
//! is always a causal order (a node is inserted only after its parents). The
//! document layer uses the same numbers to refer to nodes cheaply.
//!
//! The history is kept compact (DESIGN.md section 8): per-node metadata as
//! runs along author chains (`runs.rs`), node content as compressed pack
//! segments (`log.rs`), and only some ids (`ids.rs`); canonical bytes are
//! rebuilt when an id must be computed. A history of one author typing
//! costs a few bytes per keystroke.

mod ids;
mod log;
mod runs;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::auth::Governance;
use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::hlc::Hlc;
use crate::ids::{AuthorId, IdMap, IdSet, NodeId, RoomId, Signature};
use crate::limits::MAX_PENDING_NODES;
use crate::node::{Node, NodeFormat};
use crate::op::Op;
use crate::pack::{self, ParentRef, RawNode};

pub(crate) use log::content_bytes;
pub use runs::Parents;

use ids::Ids;
use log::Log;
use runs::Runs;

/// Dense, per-room number of an inserted node (insertion order).
pub type NodeIdx = u32;

/// Consecutive nodes of a history as one pack (layout 2, citing earlier
/// nodes by (author, seq), with the signatures kept for them): how a store
/// keeps a history, and how a history keeps its older nodes in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Number of its first node.
    pub start: NodeIdx,
    /// Nodes in it.
    pub len: u32,
    /// The pack.
    pub pack: Box<[u8]>,
}

/// Why stored segments could not be read back into a history.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RestoreError {
    /// Segments do not follow each other from node 0.
    #[error("segments are not consecutive (node {expected} expected, {found} found)")]
    Gap {
        /// The node the next segment should start at.
        expected: NodeIdx,
        /// Where it starts.
        found: NodeIdx,
    },
    /// A segment is not a readable pack of its room.
    #[error("segment at node {start}: {error}")]
    Pack {
        /// Its first node.
        start: NodeIdx,
        /// Why.
        error: crate::pack::PackError,
    },
    /// A node breaks the rules of the history it extends.
    #[error("stored node {idx}: {error}")]
    Node {
        /// Its number.
        idx: NodeIdx,
        /// Why.
        error: DagError,
    },
}

/// A per-author summary of a causally complete history: author -> highest seq.
pub type VersionVector = BTreeMap<AuthorId, u64>;

/// Signatures over an author's newest signed nodes that a history keeps.
pub const DENSE_SIGNATURES: u64 = 64;
/// Beyond them, the signatures a history keeps: one per this many nodes of
/// a chain (a divisor of [`crate::room::CHECKPOINT_INTERVAL`], whose
/// signatures stay).
pub const SIGNATURE_STRIDE: u64 = 64;

/// A node whose id matches its canonical bytes and whose authorship has been
/// established (by a signature over it or over a later node of the same
/// author chain, or because this replica wrote it).
#[derive(Clone, Debug)]
pub struct VerifiedNode {
    /// Id of the node's canonical bytes.
    pub id: NodeId,
    /// The decoded node.
    pub node: Node,
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
    /// The room's policy does not let the node's author do what it does
    /// (`auth::governance`).
    #[error("unauthorized node {id:?}: {reason}")]
    Unauthorized {
        /// The node.
        id: NodeId,
        /// What it may not do.
        reason: String,
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

/// The history of one room.
#[derive(Clone, Debug)]
pub struct Dag {
    room: RoomId,
    authors: Vec<AuthorId>,
    author_index: IdMap<AuthorId, u32>,
    runs: Runs,
    log: Log,
    ids: Ids,
    /// Format-1 nodes by id and back: what format-1 parents and characters
    /// are found through (they may cite only format-1 nodes), and their
    /// ids, which are never recomputed.
    legacy: IdMap<NodeId, NodeIdx>,
    legacy_ids: IdMap<NodeIdx, NodeId>,
    heads: IdSet<NodeIdx>,
    /// The latest clock of any node.
    max_hlc: Hlc,
    /// Signatures kept: at checkpoints, and each author's newest.
    signatures: BTreeMap<NodeIdx, Signature>,
    /// Per author: the seq of its newest signed node.
    newest_signed: IdMap<u32, u64>,
    pending: Pending,
    /// Write authority, when the driver asked for it
    /// ([`Dag::govern`]): nodes a policy in history does not allow are
    /// refused.
    governance: Option<Box<Governance>>,
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
            authors: Vec::new(),
            author_index: IdMap::default(),
            runs: Runs::default(),
            log: Log::default(),
            ids: Ids::default(),
            legacy: IdMap::default(),
            legacy_ids: IdMap::default(),
            heads: IdSet::default(),
            max_hlc: Hlc::default(),
            signatures: BTreeMap::new(),
            newest_signed: IdMap::default(),
            pending: Pending {
                limit,
                ..Pending::default()
            },
            governance: None,
        }
    }

    /// Checks write authority from now on: keys in `trusted` may declare
    /// the room's policy in history, and once one is declared every node
    /// inserted must be valid under it (`auth::governance`). The history
    /// held is read first (what it created, granted, revoked, declared).
    pub fn govern(&mut self, trusted: Vec<AuthorId>) {
        let mut governance = Governance::new(self.room.clone(), trusted);
        for idx in 0..self.next_idx() {
            if self.with_content(idx, |node| governance.observe(idx, node)) {
                for earlier in 0..idx {
                    self.with_content(earlier, |n| governance.observe_creations(earlier, n));
                }
            }
        }
        self.governance = Some(Box::new(governance));
    }

    /// Lets the governance learn what node `idx` records (before the node
    /// is recorded); when it declares the policy, the creations of every
    /// node before it too (a room without a policy keeps none).
    fn observe_governance(&mut self, idx: NodeIdx, node: &Node) {
        let Some(mut governance) = self.governance.take() else {
            return;
        };
        if governance.observe(idx, node) {
            for earlier in 0..idx {
                self.with_content(earlier, |n| governance.observe_creations(earlier, n));
            }
        }
        self.governance = Some(governance);
    }

    /// The room's write authority, if it is checked.
    pub fn governance(&self) -> Option<&Governance> {
        self.governance.as_deref()
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// Number of nodes in the DAG (pending ones excluded).
    pub fn len(&self) -> usize {
        self.runs.len() as usize
    }

    /// Whether no node was inserted yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of nodes waiting for parents.
    pub fn pending_len(&self) -> usize {
        self.pending.ids.len()
    }

    /// The index the next inserted node will get.
    pub fn next_idx(&self) -> NodeIdx {
        self.runs.len()
    }

    /// The id of node `idx`: kept, or recomputed from the nearest kept id
    /// of its chain (see `ids.rs`).
    pub fn id(&self, idx: NodeIdx) -> NodeId {
        match self.known_id(idx) {
            Some(id) => id,
            None => self.compute_id(idx),
        }
    }

    fn known_id(&self, idx: NodeIdx) -> Option<NodeId> {
        if let Some(id) = self.legacy_ids.get(&idx) {
            return Some(*id);
        }
        let author = self.runs.author(idx);
        let seq = self.runs.seq(idx);
        self.ids
            .known(idx, author, seq, self.runs.author_seq(author))
    }

    /// Rebuilds and hashes node `target` and whatever of its past it needs
    /// whose ids are not kept, parents first (an explicit stack: a walk can
    /// be long, and cross into other chains).
    fn compute_id(&self, target: NodeIdx) -> NodeId {
        let mut memo: IdMap<NodeIdx, NodeId> = IdMap::default();
        let mut stack = vec![target];
        let mut parent_ids = Vec::new();
        while let Some(&n) = stack.last() {
            if memo.contains_key(&n) {
                stack.pop();
                continue;
            }
            let parents = self.runs.parents(n);
            let mut ready = true;
            for &p in parents.iter() {
                if memo.contains_key(&p) {
                    continue;
                }
                match self.known_id(p) {
                    Some(id) => {
                        memo.insert(p, id);
                    }
                    None => {
                        stack.push(p);
                        ready = false;
                    }
                }
            }
            if !ready {
                continue;
            }
            stack.pop();
            parent_ids.clear();
            parent_ids.extend(parents.iter().map(|p| memo[p]));
            parent_ids.sort_unstable();
            let id = self.log.with(&self.room, n, |content| {
                Node::id_of(&content.encode_with_parents(&parent_ids))
            });
            let (author, seq) = (self.runs.author(n), self.runs.seq(n));
            let tip = seq == self.runs.author_seq(author);
            self.ids.learned(n, author, seq, id, tip);
            memo.insert(n, id);
        }
        memo[&target]
    }

    /// Every node's id, by number (computing them all: a walk over the
    /// whole history, for tests and tools).
    pub fn id_index(&self) -> IdMap<NodeId, NodeIdx> {
        (0..self.next_idx()).map(|i| (self.id(i), i)).collect()
    }

    /// The canonical format of node `idx`.
    pub fn format(&self, idx: NodeIdx) -> NodeFormat {
        self.runs.format(idx)
    }

    /// The number of a held format-1 node (the only nodes a format-1 node
    /// may cite).
    pub fn legacy_idx(&self, id: &NodeId) -> Option<NodeIdx> {
        self.legacy.get(id).copied()
    }

    /// Node `idx` as it was signed: its canonical form (parents' ids are
    /// recomputed if need be).
    pub fn node(&self, idx: NodeIdx) -> Node {
        let mut node = self.log.with(&self.room, idx, Node::clone);
        if node.format == NodeFormat::V2 {
            node.parents = self.runs.parents(idx).iter().map(|&p| self.id(p)).collect();
            node.parents.sort_unstable();
        }
        node
    }

    /// The operations of node `idx`.
    pub fn ops(&self, idx: NodeIdx) -> Vec<Op> {
        self.log.with(&self.room, idx, |n| n.ops.clone())
    }

    /// Calls `f` with node `idx` without its parents' ids (cheaper than
    /// [`Dag::node`] when only the content matters: `parents` is empty
    /// for a format-2 node).
    pub fn with_content<R>(&self, idx: NodeIdx, f: impl FnOnce(&Node) -> R) -> R {
        self.log.with(&self.room, idx, f)
    }

    /// The author of node `idx`.
    pub fn author(&self, idx: NodeIdx) -> &AuthorId {
        &self.authors[self.runs.author(idx) as usize]
    }

    /// The seq of node `idx`.
    pub fn seq(&self, idx: NodeIdx) -> u64 {
        self.runs.seq(idx)
    }

    /// The lamport of node `idx`.
    pub fn lamport(&self, idx: NodeIdx) -> u64 {
        self.runs.lamport(idx)
    }

    /// The timestamp of node `idx`.
    pub fn hlc(&self, idx: NodeIdx) -> Hlc {
        self.runs.hlc(idx)
    }

    /// The latest timestamp of any node held.
    pub fn max_hlc(&self) -> Hlc {
        self.max_hlc
    }

    /// The parents of node `idx`.
    pub fn parents(&self, idx: NodeIdx) -> Parents<'_> {
        self.runs.parents(idx)
    }

    /// (author, seq) of each parent of node `idx`, in canonical order.
    pub fn parent_keys(&self, idx: NodeIdx) -> Vec<(AuthorId, u64)> {
        let mut keyed: Vec<(NodeId, (AuthorId, u64))> = self
            .parents(idx)
            .iter()
            .map(|&p| (self.id(p), (*self.author(p), self.seq(p))))
            .collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, k)| k).collect()
    }

    /// A stored signature by the author over node `idx`, if one is kept.
    pub fn signature(&self, idx: NodeIdx) -> Option<&Signature> {
        self.signatures.get(&idx)
    }

    /// Records a signature over node `idx` (one made locally on export, or
    /// one that came with it). A history keeps every signature over an
    /// author's [`DENSE_SIGNATURES`] newest signed nodes, and further back
    /// one per [`SIGNATURE_STRIDE`] nodes (checkpoints included): packs cut
    /// anywhere in recent history stay vouched for as they are, and older
    /// cuts extend to the next kept signature, for 1 byte per node rather
    /// than 64.
    pub fn set_signature(&mut self, idx: NodeIdx, sig: Signature) {
        let author = self.runs.author(idx);
        let seq = self.runs.seq(idx);
        let newest = self.newest_signed.get(&author).copied().unwrap_or(0);
        let strided = seq.is_multiple_of(SIGNATURE_STRIDE);
        if seq + DENSE_SIGNATURES <= newest && !strided {
            return;
        }
        self.signatures.insert(idx, sig);
        if seq <= newest {
            return;
        }
        self.newest_signed.insert(author, seq);
        // Signatures that fell out of the dense window go, unless strided.
        let from = (newest + 1).saturating_sub(DENSE_SIGNATURES).max(1);
        let to = (seq + 1).saturating_sub(DENSE_SIGNATURES);
        for old in from..to {
            if !old.is_multiple_of(SIGNATURE_STRIDE)
                && let Some(i) = self.runs.by_author_seq(author, old)
                && self.signatures.contains_key(&i)
                && self.unsigned_content_before(author, old) < crate::room::SIGNED_CONTENT
            {
                self.signatures.remove(&i);
            }
        }
    }

    /// Content of the author's nodes after its previous kept signature up
    /// to and including `seq`: a signature that ends a run this large
    /// stays, so a chunk cut anywhere in a chain reaches at most about
    /// [`crate::room::SIGNED_CONTENT`] (plus one node) to a signed node.
    fn unsigned_content_before(&self, author: u32, seq: u64) -> usize {
        let mut content = 0;
        let mut s = seq;
        while s > 0 {
            let Some(i) = self.runs.by_author_seq(author, s) else {
                break;
            };
            if s != seq && self.signatures.contains_key(&i) {
                break;
            }
            if i >= self.log.len() {
                // Restoring: the content is not attached yet, and the
                // signatures restored are those a history kept.
                return usize::MAX;
            }
            content += self.content_size(i);
            s -= 1;
        }
        content
    }

    /// The node with (author, seq), if held.
    pub fn by_author_seq(&self, author: &AuthorId, seq: u64) -> Option<NodeIdx> {
        let a = *self.author_index.get(author)?;
        self.runs.by_author_seq(a, seq)
    }

    /// The highest seq held of `author` (0 if none).
    pub fn author_seq(&self, author: &AuthorId) -> u64 {
        self.author_index
            .get(author)
            .map_or(0, |&a| self.runs.author_seq(a))
    }

    /// Nodes without children, by number (no id needed).
    pub fn head_idxs(&self) -> Vec<NodeIdx> {
        let mut heads: Vec<NodeIdx> = self.heads.iter().copied().collect();
        heads.sort_unstable();
        heads
    }

    /// Nodes without children, sorted by id, with their numbers.
    pub fn head_nodes(&self) -> Vec<(NodeId, NodeIdx)> {
        // Every head is its author's newest node, whose id is kept.
        let mut heads: Vec<(NodeId, NodeIdx)> =
            self.heads.iter().map(|&i| (self.id(i), i)).collect();
        heads.sort_unstable();
        heads
    }

    /// Nodes without children, sorted by id.
    pub fn heads(&self) -> Vec<NodeId> {
        self.head_nodes().into_iter().map(|(id, _)| id).collect()
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
            .enumerate()
            .map(|(a, author)| (*author, self.runs.author_seq(a as u32)))
            .collect()
    }

    /// The lamport a node with these parents must carry.
    pub fn next_lamport(&self, parents: &[NodeIdx]) -> u64 {
        1 + parents.iter().map(|&p| self.lamport(p)).max().unwrap_or(0)
    }

    /// About how many bytes node `idx`'s content takes decoded (what
    /// writers cut segments by).
    pub fn content_size(&self, idx: NodeIdx) -> usize {
        self.log.with(&self.room, idx, log::content_bytes)
    }

    /// Bytes the history's sealed node content takes (compressed).
    pub fn sealed_bytes(&self) -> usize {
        self.log.sealed_bytes()
    }

    /// Drops what the history keeps only to go faster (the decoded segment,
    /// recently computed ids), so a memory figure counts what it must keep.
    pub fn shrink(&self) {
        self.log.forget_decoded();
        self.ids.forget_cache();
    }

    /// Saves the index (everything but content and pending nodes) into a
    /// checkpoint body.
    pub(crate) fn save(&self, out: &mut Out) {
        out.u64(self.authors.len() as u64);
        for a in &self.authors {
            out.raw(&a.0);
        }
        self.runs.save(out);
        let heads = self.head_idxs();
        out.u64(heads.len() as u64);
        for h in heads {
            out.u64(h as u64);
        }
        out.hlc(self.max_hlc);
        self.ids.save(out);
        out.u64(self.legacy_ids.len() as u64);
        let mut legacy: Vec<(&NodeIdx, &NodeId)> = self.legacy_ids.iter().collect();
        legacy.sort_unstable();
        for (idx, id) in legacy {
            out.u64(*idx as u64);
            out.raw(&id.0);
        }
        out.u64(self.signatures.len() as u64);
        for (idx, sig) in &self.signatures {
            out.u64(*idx as u64);
            out.raw(&sig.0);
        }
        let mut newest: Vec<(&u32, &u64)> = self.newest_signed.iter().collect();
        newest.sort_unstable();
        out.u64(newest.len() as u64);
        for (author, seq) in newest {
            out.u64(*author as u64);
            out.u64(*seq);
        }
    }

    /// The index a checkpoint body saved, of `nodes` nodes of `room`,
    /// without content (see [`Dag::attach_segments`]).
    pub(crate) fn load(input: &mut In<'_>, room: RoomId, nodes: NodeIdx) -> Read<Dag> {
        let bad = CheckpointError::Corrupt;
        let mut dag = Dag::new(room);
        for a in 0..input.count(32)? {
            let author = AuthorId(input.array()?);
            if dag.author_index.insert(author, a as u32).is_some() {
                return Err(bad("author listed twice"));
            }
            dag.authors.push(author);
        }
        dag.runs = Runs::load(input, nodes, dag.authors.len())?;
        for _ in 0..input.count(1)? {
            let h = input.u32()?;
            if h >= nodes {
                return Err(bad("head"));
            }
            dag.heads.insert(h);
        }
        dag.max_hlc = input.hlc()?;
        dag.ids = Ids::load(input, dag.authors.len(), nodes)?;
        for _ in 0..input.count(33)? {
            let idx = input.u32()?;
            let id = NodeId(input.array()?);
            if idx >= nodes {
                return Err(bad("format-1 node"));
            }
            dag.legacy.insert(id, idx);
            dag.legacy_ids.insert(idx, id);
        }
        for _ in 0..input.count(65)? {
            let idx = input.u32()?;
            let sig = Signature(input.array()?);
            if idx >= nodes {
                return Err(bad("signature"));
            }
            dag.signatures.insert(idx, sig);
        }
        for _ in 0..input.count(2)? {
            let author = input.u32()?;
            let seq = input.u64()?;
            dag.newest_signed.insert(author, seq);
        }
        Ok(dag)
    }

    /// A history rebuilt from its stored segments, consecutive from node 0.
    /// Metadata is decoded; content stays as the segments' bytes; nothing
    /// is hashed but format-1 nodes (found by id): a store keeps only nodes
    /// that were verified as they arrived. The rules that need no hash
    /// (chains, lamports, clocks) are checked again.
    pub fn from_segments(room: RoomId, segments: Vec<Segment>) -> Result<Dag, RestoreError> {
        let mut dag = Dag::new(room);
        dag.attach_segments(segments)?;
        Ok(dag)
    }

    /// Makes `segments` (consecutive from node 0) the history's content,
    /// reading the nodes they hold past those already indexed into the
    /// index (a history loaded from a checkpoint indexes a prefix).
    pub(crate) fn attach_segments(&mut self, segments: Vec<Segment>) -> Result<(), RestoreError> {
        let mut expected = 0;
        for segment in &segments {
            if segment.start != expected {
                return Err(RestoreError::Gap {
                    expected,
                    found: segment.start,
                });
            }
            expected += segment.len;
            if expected > self.next_idx() {
                self.restore_segment(segment)?;
            }
        }
        if expected < self.next_idx() {
            return Err(RestoreError::Gap {
                expected: self.next_idx(),
                found: expected,
            });
        }
        self.log = Log::from_segments(segments);
        Ok(())
    }

    /// Appends the nodes of a stored segment not indexed yet to the index
    /// (not their content).
    fn restore_segment(&mut self, segment: &Segment) -> Result<(), RestoreError> {
        self.index_stored(segment, false)
    }

    /// Appends the nodes of `segment` past those held, content included:
    /// nodes another process stored after this history was loaded (see
    /// `Room::append_stored`). The segment may start at or before the
    /// history's end (a store merges segments), never after it. Like a
    /// load, this trusts the store: nodes are not hashed or checked for
    /// authority again, but a governed history learns what they record.
    pub fn append_stored(&mut self, segment: &Segment) -> Result<(), RestoreError> {
        if segment.start > self.next_idx() {
            return Err(RestoreError::Gap {
                expected: self.next_idx(),
                found: segment.start,
            });
        }
        self.index_stored(segment, true)
    }

    /// Indexes the nodes of `segment` past those held; `with_content` also
    /// appends their content to the log (which a load instead attaches
    /// whole).
    fn index_stored(&mut self, segment: &Segment, with_content: bool) -> Result<(), RestoreError> {
        let start = segment.start;
        let raw = pack::decode_raw(&segment.pack, &self.room)
            .map_err(|error| RestoreError::Pack { start, error })?;
        if raw.nodes.len() != segment.len as usize {
            return Err(RestoreError::Pack {
                start,
                error: pack::PackError::TooLarge("node count differs from the segment's"),
            });
        }
        let indexed = self.next_idx();
        for (i, r) in raw.nodes.into_iter().enumerate() {
            let idx = start + i as NodeIdx;
            if idx < indexed {
                continue;
            }
            let error = |error| RestoreError::Node { idx, error };
            let unhashed = NodeId([0; 32]);
            r.node
                .check_content(r.parent_refs.len().max(r.node.parents.len()))
                .map_err(|source| {
                    error(DagError::Structure {
                        id: unhashed,
                        source,
                    })
                })?;
            let (parents, id) = if r.node.format == NodeFormat::V1 {
                let id = Node::id_of(&r.node.encode());
                let parents = r
                    .node
                    .parents
                    .iter()
                    .map(|p| self.legacy.get(p).copied())
                    .collect::<Option<Vec<NodeIdx>>>();
                (parents, Some(id))
            } else {
                let parents = r
                    .parent_refs
                    .iter()
                    .map(|p| match *p {
                        ParentRef::InPack(j) => Some(start + j as NodeIdx).filter(|&p| p < idx),
                        ParentRef::Held(a, s) | ParentRef::WithId(a, s, _) => {
                            self.by_author_seq(&a, s).filter(|&p| p < start)
                        }
                    })
                    .collect::<Option<Vec<NodeIdx>>>();
                (parents, None)
            };
            let parents = parents.ok_or_else(|| {
                error(DagError::Invalid {
                    id: id.unwrap_or(unhashed),
                    reason: "a stored node cites a node not stored before it",
                })
            })?;
            let author = self.validate(&r.node, &parents).map_err(|reason| {
                error(DagError::Invalid {
                    id: id.unwrap_or(unhashed),
                    reason,
                })
            })?;
            if with_content {
                self.observe_governance(idx, &r.node);
            }
            self.record(id, None, Meta::of(&r.node), None, author, &parents);
            if with_content {
                // Content goes in without its ids (`record` would compute
                // the ids it cites): they are computed when first needed,
                // as for a loaded node.
                self.log.push(r.node);
                if self.log.wants_seal() {
                    self.log.seal(&self.room, &self.runs, &self.authors);
                }
                debug_assert_eq!(self.log.len(), self.runs.len());
            }
        }
        for (at, sig) in raw.signatures {
            let idx = start + at as NodeIdx;
            if idx >= indexed {
                self.set_signature(idx, sig);
            }
        }
        Ok(())
    }

    /// Nodes `range` as a segment (see [`Segment`]), at zstd `level`.
    pub fn segment(&self, range: std::ops::Range<NodeIdx>, level: i32) -> Segment {
        let start = range.start;
        let raw: Vec<RawNode> = range
            .clone()
            .map(|idx| {
                self.log.with(&self.room, idx, |node| RawNode {
                    parent_refs: log::stored_parents(&self.runs, &self.authors, idx, start, node),
                    node: node.clone(),
                })
            })
            .collect();
        let signatures: Vec<(usize, Signature)> = self
            .signatures
            .range(range.clone())
            .map(|(&idx, sig)| ((idx - start) as usize, *sig))
            .collect();
        Segment {
            start,
            len: range.len() as u32,
            pack: pack::encode(&self.room, &raw, &signatures, level).into_boxed_slice(),
        }
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
        if self.holds(&v)? {
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
        let released = waits_released_by(&v);
        self.insert_ready(v, &parents, &mut out.accepted)?;
        self.release_waiters(released, &mut out);
        Ok(out)
    }

    /// Whether `v` is held already. Another node held under its (author,
    /// seq) is an equivocation.
    ///
    /// When the held node's id is not kept, it is compared by content and
    /// parents' (author, seq) first, which is what a duplicate costs then:
    /// equal ones are the same node unless its author signed two nodes that
    /// differ only in their parents' ids, and such a node is refused as soon
    /// as anything cites it (its id cannot be resolved here).
    fn holds(&self, v: &VerifiedNode) -> Result<bool, DagError> {
        if v.node.format == NodeFormat::V1 && self.legacy.contains_key(&v.id) {
            return Ok(true);
        }
        let Some(idx) = self.by_author_seq(&v.node.author, v.node.seq) else {
            return Ok(false);
        };
        if self.known_id(idx).is_none() && self.same_content(idx, v) {
            return Ok(true);
        }
        let existing = self.id(idx);
        if existing == v.id {
            return Ok(true);
        }
        Err(DagError::Equivocation {
            author: v.node.author,
            seq: v.node.seq,
            existing,
            conflicting: v.id,
        })
    }

    /// Whether node `idx` has `v`'s content and parents' (author, seq).
    fn same_content(&self, idx: NodeIdx, v: &VerifiedNode) -> bool {
        let mut held: Vec<(AuthorId, u64)> = self
            .parents(idx)
            .iter()
            .map(|&p| (*self.author(p), self.seq(p)))
            .collect();
        let mut cited = v.parent_keys.clone();
        held.sort_unstable();
        cited.sort_unstable();
        held == cited
            && self.log.with(&self.room, idx, |c| {
                c.format == v.node.format
                    && c.lamport == v.node.lamport
                    && c.hlc == v.node.hlc
                    && c.ops == v.node.ops
            })
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
            let held = self.id(idx);
            if held != *cited {
                return Err(DagError::Equivocation {
                    author,
                    seq,
                    existing: held,
                    conflicting: *cited,
                });
            }
            out.push(idx);
        }
        Ok(Ok(out))
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
                let released = waits_released_by(&w);
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
        let author = self
            .validate(&v.node, parents)
            .map_err(|reason| DagError::Invalid { id: v.id, reason })?;
        self.check_authority(&v.node, parents)
            .map_err(|reason| DagError::Unauthorized { id: v.id, reason })?;
        self.observe_governance(self.next_idx(), &v.node);
        let meta = Meta::of(&v.node);
        let idx = self.record(
            Some(v.id),
            Some(v.node.clone()),
            meta,
            v.sig,
            author,
            parents,
        );
        accepted.push((idx, v.node));
        Ok(())
    }

    /// Inserts a node this replica just built on its current heads (the
    /// transaction has already materialized it), whose parents are the
    /// nodes `parents` (`node.parents` is not read): the same checks as
    /// [`Dag::insert`]. The node is not hashed: its id is computed when
    /// first needed (see `ids.rs`).
    pub(crate) fn insert_local(
        &mut self,
        node: Node,
        parents: &[NodeIdx],
    ) -> Result<NodeIdx, DagError> {
        // A local node has no id yet: errors (bugs in the transaction)
        // name it by zeros.
        let unhashed = NodeId([0; 32]);
        node.check_content(parents.len())
            .map_err(|source| DagError::Structure {
                id: unhashed,
                source,
            })?;
        let mut sorted = parents.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let extends = node.room == self.room
            && sorted.len() == parents.len()
            && parents.iter().all(|&p| p < self.next_idx());
        let checked = if extends {
            self.validate(&node, parents)
        } else {
            Err("a local node must extend this room's held history")
        };
        let checked = checked.map_err(|reason| DagError::Invalid {
            id: unhashed,
            reason,
        });
        let author = checked?;
        self.check_authority(&node, parents)
            .map_err(|reason| DagError::Unauthorized {
                id: unhashed,
                reason,
            })?;
        self.observe_governance(self.next_idx(), &node);
        let meta = Meta::of(&node);
        Ok(self.record(None, Some(node), meta, None, author, parents))
    }

    /// Whether the room's policy, if one governs it, allows `node`.
    pub(crate) fn check_authority(&self, node: &Node, parents: &[NodeIdx]) -> Result<(), String> {
        match &self.governance {
            Some(g) => g.check(self, node, parents),
            None => Ok(()),
        }
    }

    /// The checks that need the parents (lamport, author chain, clock
    /// order). Returns the author's number (`None`: a new author).
    fn validate(&self, node: &Node, parents: &[NodeIdx]) -> Result<Option<u32>, &'static str> {
        if node.lamport != self.next_lamport(parents) {
            return Err("lamport is not 1 + the largest parent lamport");
        }
        let author = self.author_index.get(&node.author).copied();
        let held = author.map_or(0, |a| self.runs.author_seq(a));
        if node.seq != held + 1 {
            return Err("seq does not follow the author's chain");
        }
        if node.seq > 1 {
            let a = author.expect("seq > 1 and held");
            let prev = self
                .runs
                .by_author_seq(a, held)
                .expect("the author's newest node is held");
            if !parents.contains(&prev) {
                return Err("does not cite the author's previous node");
            }
            // Strictly increasing clocks along a chain make (hlc, author)
            // unique per node, so last-writer-wins stamps need no node id.
            if node.hlc <= self.hlc(prev) {
                return Err("hlc does not increase along the author's chain");
            }
        }
        Ok(author)
    }

    /// Records node `node` (its id if known, its content to keep unless it
    /// is in a stored segment already).
    fn record(
        &mut self,
        id: Option<NodeId>,
        content: Option<Node>,
        node: Meta,
        sig: Option<Signature>,
        author: Option<u32>,
        parents: &[NodeIdx],
    ) -> NodeIdx {
        let author = author.unwrap_or_else(|| {
            let a = self.authors.len() as u32;
            self.authors.push(node.author);
            self.author_index.insert(node.author, a);
            a
        });
        // Ids another author cites are kept (see ids.rs): a received node
        // carries them, a local one cites heads, whose ids are known. A
        // node restored from a segment has none to give.
        let cited: Vec<(NodeIdx, NodeId)> = match (&content, id) {
            (Some(c), Some(_)) if c.parents.len() == parents.len() => parents
                .iter()
                .zip(&c.parents)
                .filter(|&(&p, _)| self.runs.author(p) != author)
                .map(|(&p, &pid)| (p, pid))
                .collect(),
            (Some(_), None) => parents
                .iter()
                .filter(|&&p| self.runs.author(p) != author)
                .map(|&p| (p, self.id(p)))
                .collect(),
            _ => Vec::new(),
        };
        for (p, pid) in cited {
            self.ids.cited(p, pid);
        }
        let prev = self.runs.by_author_seq(author, node.seq - 1);
        let idx = self.runs.push(
            author,
            node.format,
            node.seq,
            node.lamport,
            node.hlc,
            parents,
        );
        for p in parents {
            self.heads.remove(p);
        }
        self.heads.insert(idx);
        self.max_hlc = self.max_hlc.max(node.hlc);
        self.ids.inserted(idx, author, node.seq, id, prev);
        if node.format == NodeFormat::V1
            && let Some(id) = id
        {
            self.legacy.insert(id, idx);
            self.legacy_ids.insert(idx, id);
        }
        if let Some(sig) = sig {
            self.set_signature(idx, sig);
        }
        if let Some(content) = content {
            self.log.push(content);
            if self.log.wants_seal() {
                self.log.seal(&self.room, &self.runs, &self.authors);
            }
            debug_assert_eq!(self.log.len(), self.runs.len());
        }
        idx
    }

    /// Whether `a` is a strict ancestor of `b`. Walks back from `b`, pruning
    /// by lamport, so the cost is the part of history between them.
    pub fn is_ancestor(&self, a: NodeIdx, b: NodeIdx) -> bool {
        if a >= b {
            // Insertion order is causal: an ancestor comes first.
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
        let (author_a, seq_a) = (self.runs.author(a), self.seq(a));
        if author_a == self.runs.author(b) {
            return seq_a < self.seq(b);
        }
        // Walk back from `b`. Reaching any node of `a`'s author settles that
        // branch through the chain: at or after `a`'s seq, `a` is an
        // ancestor; before it, `a` cannot be behind that node.
        let mut seen = IdSet::default();
        let mut stack = vec![b];
        while let Some(n) = stack.pop() {
            for &p in self.parents(n).iter() {
                if self.runs.author(p) == author_a {
                    if self.seq(p) >= seq_a {
                        return true;
                    }
                    continue;
                }
                if self.lamport(p) > target && seen.insert(p) {
                    stack.push(p);
                }
            }
        }
        false
    }

    /// Sorts node numbers into a causal order: insertion order, which is
    /// one (a node is inserted after its parents) and keeps each author's
    /// runs together, which packs compress best.
    pub fn sort_causal(&self, nodes: &mut [NodeIdx]) {
        nodes.sort_unstable();
    }

    /// Every node, in causal (insertion) order.
    pub fn causal_order(&self) -> Vec<NodeIdx> {
        (0..self.next_idx()).collect()
    }

    /// What a peer whose history is summarized by `vv` lacks, in causal order.
    pub fn missing_for_version_vector(&self, vv: &VersionVector) -> Vec<NodeIdx> {
        let mut out = Vec::new();
        for (a, author) in self.authors.iter().enumerate() {
            let has = vv.get(author).copied().unwrap_or(0);
            out.extend(self.runs.chain_after(a as u32, has));
        }
        self.sort_causal(&mut out);
        out
    }
}

/// What the history records of a node besides its content.
#[derive(Clone, Copy)]
struct Meta {
    author: AuthorId,
    format: NodeFormat,
    seq: u64,
    lamport: u64,
    hlc: Hlc,
}

impl Meta {
    fn of(node: &Node) -> Meta {
        Meta {
            author: node.author,
            format: node.format,
            seq: node.seq,
            lamport: node.lamport,
            hlc: node.hlc,
        }
    }
}

/// What inserting `v` releases: waits on its (author, seq), and on its id
/// if it is a format-1 node.
fn waits_released_by(v: &VerifiedNode) -> Vec<WaitKey> {
    let mut keys = vec![WaitKey::Seq(v.node.author, v.node.seq)];
    if v.node.format == NodeFormat::V1 {
        keys.push(WaitKey::Id(v.id));
    }
    keys
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
        VerifiedNode {
            id: Node::id_of(&node.encode()),
            node,
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
        let order: Vec<NodeId> = ins.accepted.iter().map(|(i, _)| dag.id(*i)).collect();
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
        fork.id = Node::id_of(&fork.node.encode());
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
    fn missing_sets_match_version_vectors() {
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
            .map(|&i| dag.id(i))
            .collect();
        assert_eq!(missing, vec![b1.id, a2.id]);
        assert!(
            dag.missing_for_version_vector(&dag.version_vector())
                .is_empty()
        );
    }

    /// A long chain typed by one author, another author merging now and
    /// then: ids are recomputed from what is kept, and agree with the ids
    /// the nodes were inserted with.
    #[test]
    fn ids_not_kept_are_recomputed() {
        let a = Keypair::from_seed([1; 32]);
        let b = Keypair::from_seed([2; 32]);
        let mut dag = Dag::new(room());
        let mut expect = Vec::new();
        let mut last_a: Option<VerifiedNode> = None;
        let mut last_b: Option<VerifiedNode> = None;
        let mut lamport = 0;
        for i in 0..3_000u64 {
            lamport += 1;
            let v = if i % 97 == 50 {
                let seq = last_b.as_ref().map_or(1, |v| v.node.seq + 1);
                let parents: Vec<&VerifiedNode> = last_a.iter().chain(&last_b).collect();
                let v = make(&b, seq, &parents, lamport);
                last_b = Some(v.clone());
                v
            } else {
                let seq = last_a.as_ref().map_or(1, |v| v.node.seq + 1);
                let parents: Vec<&VerifiedNode> = last_a.iter().chain(&last_b).collect();
                let v = make(&a, seq, &parents, lamport);
                last_a = Some(v.clone());
                v
            };
            expect.push(v.id);
            dag.insert(v).unwrap();
        }
        dag.shrink();
        // Backwards, so that nothing was just computed.
        for i in (0..3_000u32).rev() {
            assert_eq!(dag.id(i), expect[i as usize], "node {i}");
        }
        assert_eq!(dag.id_index().len(), 3_000);
        // The canonical node rebuilt from the compact history hashes to it.
        assert_eq!(Node::id_of(&dag.node(1_234).encode()), expect[1_234]);
    }
}
