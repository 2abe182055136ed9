//! A room replica without I/O: its DAG, its document and its clock, and the
//! transaction API apps write with.
//!
//! A transaction applies each change to the document as it is made (so later
//! changes in it see earlier ones), then commits them all as one node.
//! Dropping an uncommitted transaction rolls the document back by replaying
//! the history (rare, and correct by construction).

use thiserror::Error;

use crate::dag::{Dag, DagError, NodeIdx, RestoreError, Segment, VerifiedNode};
use crate::doc::seq::Lv;
use crate::doc::{Changes, Doc, PathError, path_names, split_path};
use crate::hlc::{Hlc, HlcClock};
use crate::ids::{AuthorId, EntryId, IdMap, NodeId, RoomId, Signature};
use crate::keys::Keypair;
use crate::limits::{MAX_NODE_BYTES, MAX_OPS_PER_NODE, MAX_PARENTS};
use crate::node::Node;
use crate::node::NodeFormat;
use crate::op::{CharNode, CharRef, CharSpan, EntryKind, Op, Position, is_valid_name};
use crate::pack::{self, PackError, ParentRef, RawNode};
use crate::recon::ReconIndex;
use crate::value::Value;

/// Why a transaction step was refused (nothing was changed by it).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TxnError {
    /// The path is malformed or names no live entry.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A text position or range past the end of the text.
    #[error("text range {pos}..{end} is past the end ({len} characters)")]
    OutOfRange {
        /// Start asked for.
        pos: usize,
        /// End asked for.
        end: usize,
        /// Characters in the text.
        len: usize,
    },
    /// The root cannot be moved, deleted or given a text.
    #[error("the root entry cannot be changed this way")]
    Root,
    /// A move under the entry itself or one of its descendants.
    #[error("cannot move an entry under itself")]
    Cycle,
    /// A field name that is empty or too long.
    #[error("invalid field name {0:?}")]
    Field(String),
    /// The transaction exceeds the node limits.
    #[error("transaction too large for one node")]
    TooLarge,
    /// An operation or the node breaks a limit every replica's receive
    /// path enforces (a string over 128 KiB, a NaN, too deep a value...).
    #[error("refused: {0}")]
    Limit(&'static str),
    /// The room's policy does not let this replica's key do it
    /// (`auth::governance`): every replica would refuse the node.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
}

/// A committed local node.
#[derive(Clone, Debug)]
pub struct Committed {
    /// Its number in the DAG (its id is `room.dag().id(idx)`, computed
    /// when first asked for).
    pub idx: NodeIdx,
    /// What it changed.
    pub changes: Changes,
}

/// What receiving nodes did.
#[derive(Debug, Default)]
pub struct Received {
    /// Nodes inserted and materialized, with what each changed.
    pub accepted: Vec<(NodeIdx, Changes)>,
    /// Nodes that already were here.
    pub duplicates: usize,
    /// Nodes now waiting for parents.
    pub pending: usize,
    /// Nodes received earlier that waited for parents and were inserted
    /// now (they are in `accepted` too).
    pub released: usize,
}

/// An author signs every this-many nodes of its own chain when exporting,
/// so long histories can be re-shipped in chunks (a replica can vouch for a
/// prefix of another author's chain only up to a node that author signed).
pub const CHECKPOINT_INTERVAL: u64 = 4096;

/// ... and sooner where its nodes are large: once this many bytes of
/// content came since the last signed one (histories keep such signatures,
/// and every [`crate::dag::SIGNATURE_STRIDE`]-th), so a chunk of anyone's history
/// never reaches much more content than this to a signed node, and fits a
/// frame. Packs are refused past [`crate::limits::MAX_UNSIGNED_RUN`].
pub const SIGNED_CONTENT: usize = 256 << 10;

/// An exported pack.
#[derive(Clone, Debug)]
pub struct ExportedPack {
    /// The pack.
    pub pack: Vec<u8>,
    /// Signatures made for it (to be persisted), by node number.
    pub signatures: Vec<(NodeIdx, Signature)>,
    /// The nodes it holds, in pack order: those asked for, and any later
    /// node of an author's chain it had to reach for a signature.
    pub nodes: Vec<NodeIdx>,
}

/// Why a pack could not be exported.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ExportError {
    /// Another author's node with no signature held on it or on any later
    /// node of its chain (it could not be vouched for).
    #[error("no signature held for {0:?}'s nodes")]
    Unsigned(AuthorId),
}

/// One room's replica state.
#[derive(Clone, Debug)]
pub struct Room {
    dag: Dag,
    doc: Doc,
    clock: HlcClock,
    recon: ReconIndex,
}

impl Room {
    /// An empty room.
    pub fn new(id: RoomId) -> Room {
        Room::with_dag(Dag::new(id))
    }

    /// A room over an existing (possibly empty) DAG; the document is
    /// rebuilt from it.
    pub fn with_dag(dag: Dag) -> Room {
        let doc = Doc::replay(&dag);
        Room::from_parts(dag, doc)
    }

    /// A room rebuilt from its stored segments (consecutive from node 0)
    /// by replaying them: what opening a room costs without a checkpoint.
    pub fn from_segments(id: RoomId, segments: Vec<Segment>) -> Result<Room, RestoreError> {
        Ok(Room::with_dag(Dag::from_segments(id, segments)?))
    }

    /// Appends what `segments` hold past this room's history (nodes
    /// another process stored after it was loaded) and applies them to the
    /// document. Returns the nodes appended. Nodes before a refused one
    /// stay appended and applied.
    pub fn append_stored(
        &mut self,
        segments: &[Segment],
    ) -> Result<std::ops::Range<NodeIdx>, RestoreError> {
        let first = self.dag.next_idx();
        let appended = segments
            .iter()
            .try_for_each(|segment| self.dag.append_stored(segment));
        self.clock.observe(self.dag.max_hlc());
        self.apply_from(first);
        appended.map(|()| first..self.dag.next_idx())
    }

    /// A room of a history and its document, materialized from the same
    /// nodes.
    pub(crate) fn from_parts(dag: Dag, doc: Doc) -> Room {
        let mut clock = HlcClock::new();
        clock.observe(dag.max_hlc());
        Room {
            dag,
            doc,
            clock,
            recon: ReconIndex::default(),
        }
    }

    /// Applies the history's nodes from `first` on to the document (which
    /// holds those before).
    pub(crate) fn apply_from(&mut self, first: NodeIdx) {
        let (dag, doc) = (&self.dag, &mut self.doc);
        for idx in first..dag.next_idx() {
            dag.with_content(idx, |node| doc.apply(dag, idx, node));
        }
    }

    /// Records a signature over node `idx` that was verified when it was
    /// stored (a store keeps signatures beside its history until they are
    /// folded in): see [`Dag::set_signature`] for which are kept.
    pub fn set_signature(&mut self, idx: NodeIdx, sig: Signature) {
        self.dag.set_signature(idx, sig);
    }

    /// Starts (or stops) recording what applied operations change (see
    /// [`Doc::record_details`]).
    pub fn record_details(&mut self, on: bool) {
        self.doc.record_details(on);
    }

    /// What applied operations changed since the last call (see
    /// [`Doc::take_details`]).
    pub fn take_details(&mut self) -> (Vec<crate::doc::Detail>, usize) {
        self.doc.take_details()
    }

    /// The room id.
    pub fn id(&self) -> &RoomId {
        self.dag.room()
    }

    /// The history.
    pub fn dag(&self) -> &Dag {
        &self.dag
    }

    /// The materialized document.
    pub fn doc(&self) -> &Doc {
        &self.doc
    }

    /// The latest timestamp issued or seen.
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    /// The RIBLT sketch of this room's nodes (built on first use, then kept
    /// up to date).
    pub fn sketch(&mut self) -> &crate::recon::riblt::Sketch {
        self.recon.sketch(&self.dag)
    }

    /// The Merkle Search Tree of this room's node ids (built on first use,
    /// then kept up to date).
    pub fn id_tree(&mut self) -> &crate::recon::mst::Mst {
        self.recon.tree(&self.dag)
    }

    /// The nodes named by these ids, in causal order (unknown ids skipped).
    /// The first call indexes every id of the room (see [`ReconIndex`]).
    pub fn nodes_for_ids(&mut self, ids: &[NodeId]) -> Vec<NodeIdx> {
        self.recon.nodes_for_ids(&self.dag, ids)
    }

    /// The nodes named by RIBLT keys, in causal order (unknown keys
    /// skipped; looked up by their 8-byte prefixes, so a prefix two nodes
    /// share names both).
    pub fn nodes_for_keys(&mut self, keys: &[crate::recon::riblt::Key]) -> Vec<NodeIdx> {
        let prefixes: Vec<_> = keys.iter().map(crate::recon::key_prefix).collect();
        self.nodes_for_key_prefixes(&prefixes)
    }

    /// The nodes named by the 8-byte prefixes of RIBLT keys (what
    /// `ibf-done` sends), in causal order.
    pub fn nodes_for_key_prefixes(&mut self, prefixes: &[crate::recon::KeyPrefix]) -> Vec<NodeIdx> {
        self.recon.nodes_for_key_prefixes(&self.dag, prefixes)
    }

    /// The canonical hash of the visible state.
    pub fn state_hash(&self) -> [u8; 32] {
        self.doc.state_hash(&self.dag)
    }

    /// Inserts a verified node (idempotent; out-of-order nodes wait) and
    /// materializes everything that became insertable.
    pub fn receive(&mut self, v: VerifiedNode) -> Result<Received, DagError> {
        let ins = self.dag.insert(v)?;
        let inserted_itself = !ins.duplicate && !ins.pending;
        let mut out = Received {
            duplicates: ins.duplicate as usize,
            pending: ins.pending as usize,
            released: ins.accepted.len() - usize::from(inserted_itself),
            ..Received::default()
        };
        for (idx, node) in ins.accepted {
            self.clock.observe(node.hlc);
            let changes = self.doc.apply(&self.dag, idx, &node);
            out.accepted.push((idx, changes));
        }
        match ins.released_errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Decodes, verifies and receives a pack. A malformed or forged pack
    /// changes nothing; a node refused by the DAG stops the pack there (the
    /// nodes before it stay accepted) and its error is returned.
    pub fn receive_pack(&mut self, bytes: &[u8]) -> Result<Received, ReceiveError> {
        let dag = &self.dag;
        let held = |author: &AuthorId, seq: u64| dag.by_author_seq(author, seq).map(|i| dag.id(i));
        let decoded = pack::decode(bytes, self.id(), &held)?;
        let mut total = Received::default();
        for v in decoded.nodes {
            let r = self.receive(v).map_err(|error| ReceiveError::Node {
                error,
                accepted: total.accepted.len(),
            })?;
            total.accepted.extend(r.accepted);
            total.duplicates += r.duplicates;
            total.pending += r.pending;
            total.released += r.released;
        }
        Ok(total)
    }

    /// Encodes `nodes` (any order; sorted causally here) as a pack. Each
    /// author's newest node must be signed: a stored signature is used, the
    /// `local` key signs its own author's nodes, and another author's run
    /// without one is extended along its chain to a node that has one.
    /// Every signature held for a node of the pack travels with it, and the
    /// `local` author signs a checkpoint every [`CHECKPOINT_INTERVAL`] nodes
    /// of its own chain, so whoever stores the pack can later cut the
    /// history into small vouched-for packs. Signatures made here are
    /// recorded and returned (to be persisted). `holds` says which nodes
    /// the receiver surely holds: they are cited by (author, seq) alone,
    /// others by id too (see [`pack::encode`]), which for an old node not
    /// kept by id means rehashing the history behind it.
    pub fn export_pack(
        &mut self,
        nodes: &[NodeIdx],
        local: Option<&Keypair>,
        holds: &dyn Fn(NodeIdx, &AuthorId, u64) -> bool,
        zstd_level: i32,
    ) -> Result<ExportedPack, ExportError> {
        use std::collections::BTreeMap;
        let mut set: Vec<NodeIdx> = nodes.to_vec();
        let mut newest: BTreeMap<AuthorId, NodeIdx> = BTreeMap::new();
        for &i in nodes {
            let e = newest.entry(*self.dag.author(i)).or_insert(i);
            if self.dag.seq(i) > self.dag.seq(*e) {
                *e = i;
            }
        }
        // Signatures made here go in the pack whether or not the history
        // keeps them (it keeps only some, see `Dag::set_signature`).
        let mut made: Vec<(NodeIdx, Signature)> = Vec::new();
        let mut sign = |dag: &mut Dag, idx: NodeIdx, key: &Keypair| {
            let s = key.sign(&dag.id(idx));
            dag.set_signature(idx, s);
            made.push((idx, s));
        };
        for (author, mut last) in newest {
            while self.dag.signature(last).is_none() {
                if let Some(k) = local.filter(|k| k.author() == author) {
                    sign(&mut self.dag, last, k);
                    break;
                }
                let next = self.dag.by_author_seq(&author, self.dag.seq(last) + 1);
                last = next.ok_or(ExportError::Unsigned(author))?;
                set.push(last);
            }
        }
        set.sort_unstable();
        set.dedup();
        self.dag.sort_causal(&mut set);
        if let Some(k) = local {
            // Content since the local author's last signed node, walking its
            // chain through the pack.
            let mut unsigned = 0;
            for &i in &set {
                if *self.dag.author(i) != k.author() {
                    continue;
                }
                if self.dag.signature(i).is_some() {
                    unsigned = 0;
                    continue;
                }
                unsigned += self.dag.content_size(i);
                let seq = self.dag.seq(i);
                let checkpoint =
                    seq.is_multiple_of(CHECKPOINT_INTERVAL) || unsigned >= SIGNED_CONTENT;
                if checkpoint {
                    sign(&mut self.dag, i, k);
                    unsigned = 0;
                }
            }
        }
        let made_at: IdMap<NodeIdx, Signature> = made.iter().copied().collect();
        let signatures: Vec<(usize, Signature)> = set
            .iter()
            .enumerate()
            .filter_map(|(at, &i)| {
                made_at
                    .get(&i)
                    .copied()
                    .or_else(|| self.dag.signature(i).copied())
                    .map(|s| (at, s))
            })
            .collect();
        let position: IdMap<NodeIdx, usize> =
            set.iter().enumerate().map(|(at, &i)| (i, at)).collect();
        let dag = &self.dag;
        let raw: Vec<RawNode> = set
            .iter()
            .map(|&i| {
                if dag.format(i) == NodeFormat::V1 {
                    return RawNode {
                        node: dag.node(i),
                        parent_refs: Vec::new(),
                    };
                }
                let parent_refs = dag
                    .parents(i)
                    .iter()
                    .map(|&p| match position.get(&p) {
                        Some(&at) => ParentRef::InPack(at),
                        None => {
                            let (author, seq) = (*dag.author(p), dag.seq(p));
                            if holds(p, &author, seq) {
                                ParentRef::Held(author, seq)
                            } else {
                                ParentRef::WithId(author, seq, dag.id(p))
                            }
                        }
                    })
                    .collect();
                RawNode {
                    node: dag.with_content(i, Node::clone),
                    parent_refs,
                }
            })
            .collect();
        Ok(ExportedPack {
            pack: pack::encode(self.id(), &raw, &signatures, zstd_level),
            signatures: made,
            nodes: set,
        })
    }

    /// [`Room::export_pack`] for a receiver known to hold nothing, at the
    /// default zstd level: just the pack.
    pub fn pack(
        &mut self,
        nodes: &[NodeIdx],
        local: Option<&Keypair>,
    ) -> Result<Vec<u8>, ExportError> {
        Ok(self
            .export_pack(nodes, local, &|_, _, _| false, pack::DEFAULT_ZSTD_LEVEL)?
            .pack)
    }

    /// Checks write authority from now on (see [`Dag::govern`]): keys in
    /// `trusted` may declare the room's policy.
    pub fn govern(&mut self, trusted: Vec<AuthorId>) {
        self.dag.govern(trusted);
    }

    /// Starts a transaction by `author` at wall time `now_ms`.
    pub fn begin(&mut self, author: AuthorId, now_ms: u64) -> Transaction<'_> {
        // Parents: every head, plus the author's own previous node, which
        // the chain rule requires even when others have built on it.
        let mut parents = self.dag.head_idxs();
        let seq = self.dag.author_seq(&author) + 1;
        if let Some(prev) = self.dag.by_author_seq(&author, seq - 1)
            && !parents.contains(&prev)
        {
            parents.push(prev);
        }
        // A node cites at most MAX_PARENTS: past that (a room of many
        // concurrent writers), the author's previous node and the newest
        // heads; the others stay heads for later nodes to cite.
        if parents.len() > MAX_PARENTS {
            let dag = &self.dag;
            let own = dag.by_author_seq(&author, seq - 1);
            parents.retain(|&p| Some(p) != own);
            parents.sort_unstable_by_key(|&p| std::cmp::Reverse((dag.lamport(p), p)));
            parents.truncate(MAX_PARENTS - usize::from(own.is_some()));
            parents.extend(own);
        }
        // The author's previous node is an ancestor of a head, so it never
        // raises the lamport above what the heads give; the newest heads
        // are always cited.
        let lamport = self.dag.lamport_after_heads();
        let hlc = self.clock.tick(now_ms);
        let node = self.dag.next_idx();
        Transaction {
            room: self,
            author,
            seq,
            hlc,
            lamport,
            parents,
            node,
            ops: Vec::new(),
            chars: 0,
            changes: Changes::default(),
            done: false,
        }
    }
}

/// Why receiving a pack stopped.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ReceiveError {
    /// The pack itself was refused; nothing was applied.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// A node was refused; the `accepted` nodes before it were applied.
    #[error("{error} (after {accepted} accepted nodes)")]
    Node {
        /// Why.
        error: DagError,
        /// Nodes applied before it.
        accepted: usize,
    },
}

/// Changes being gathered into one node. Commit with [`Transaction::commit`];
/// dropping it uncommitted undoes its changes.
#[derive(Debug)]
pub struct Transaction<'r> {
    room: &'r mut Room,
    author: AuthorId,
    seq: u64,
    hlc: Hlc,
    lamport: u64,
    parents: Vec<NodeIdx>,
    node: NodeIdx,
    ops: Vec<Op>,
    chars: u32,
    changes: Changes,
    done: bool,
}

impl Transaction<'_> {
    /// The document as changed so far by this transaction.
    pub fn doc(&self) -> &Doc {
        &self.room.doc
    }

    fn push(&mut self, op: Op) -> Result<(), TxnError> {
        if self.ops.len() >= MAX_OPS_PER_NODE {
            return Err(TxnError::TooLarge);
        }
        // Checked before it touches the document, so a refused operation
        // leaves the transaction (and the room) as it was.
        op.check_limits().map_err(TxnError::Limit)?;
        let ctx = self
            .room
            .doc
            .ctx(&self.room.dag, self.node, self.author, self.seq, self.hlc);
        let index = self.ops.len() as u32;
        self.room
            .doc
            .apply_op(&ctx, index, &op, self.chars, &mut self.changes);
        self.chars += op.inserted_chars();
        self.ops.push(op);
        Ok(())
    }

    /// The node that inserted character `lv` (this transaction's, for the
    /// characters it inserted) and the character's index there, and how
    /// many characters of that node follow it.
    fn char_of(&self, lv: Lv) -> (NodeIdx, u32, u32) {
        match self.room.doc.char_of(lv) {
            Some((node, index, count)) => (node, index, count - index),
            None => {
                let index = lv - self.room.doc.next_char();
                (self.node, index, self.chars - index)
            }
        }
    }

    /// How an op of this transaction names character `lv`: by the (author,
    /// seq) of the node that inserted it (this one, for characters this
    /// transaction inserted), the author left out when it is this node's.
    fn char_ref(&self, lv: Lv) -> CharRef {
        let (node, index, _) = self.char_of(lv);
        let (author, seq) = if node == self.node {
            (self.author, self.seq)
        } else {
            (*self.room.dag.author(node), self.room.dag.seq(node))
        };
        CharRef {
            node: CharNode::Seq {
                author: (author != self.author).then_some(author),
                seq,
            },
            index,
        }
    }

    /// Records capability `cap` in the room's history, so that its
    /// subject's nodes that follow may use it (`auth::governance`).
    pub fn record_grant(&mut self, cap: &crate::auth::Capability) -> Result<(), TxnError> {
        self.push(crate::auth::governance::grant_op(cap))
    }

    /// Revokes capability `id` in the room's history (needs `admin`).
    pub fn revoke(&mut self, id: &[u8; 16]) -> Result<(), TxnError> {
        self.push(crate::auth::governance::revocation_op(id))
    }

    /// Declares the room's policy: from this node on, `roots` govern it
    /// (replicas that trust this transaction's author take it).
    pub fn declare_policy(&mut self, roots: &[AuthorId]) -> Result<(), TxnError> {
        self.push(crate::auth::governance::policy_op(roots))
    }

    /// The entry at `path`, creating missing entries on the way by path
    /// (so concurrent creators of one path meet); the last one gets `kind`.
    pub fn ensure(&mut self, path: &str, kind: EntryKind) -> Result<EntryId, TxnError> {
        let mut names = path_names(path)?.peekable();
        let mut cur = EntryId::ROOT;
        while let Some(name) = names.next() {
            let name = name?;
            cur = match self.room.doc.child_named(&cur, name) {
                Some(id) => id,
                None => {
                    let k = if names.peek().is_none() {
                        kind
                    } else {
                        EntryKind::Map
                    };
                    self.push(Op::Create {
                        parent: cur,
                        name: name.to_owned(),
                        kind: k,
                        position: None,
                        unique: false,
                    })?;
                    EntryId::derived(&cur, name)
                }
            };
        }
        Ok(cur)
    }

    /// Creates a new, distinct entry `name` under `parent_path` (outline
    /// items, list elements), optionally with a position key.
    pub fn create_unique(
        &mut self,
        parent_path: &str,
        name: &str,
        kind: EntryKind,
        position: Option<Position>,
    ) -> Result<EntryId, TxnError> {
        let parent = self.room.doc.resolve(parent_path)?;
        if !is_valid_name(name) {
            return Err(PathError::Invalid(name.to_owned()).into());
        }
        let index = self.ops.len() as u32;
        self.push(Op::Create {
            parent,
            name: name.to_owned(),
            kind,
            position,
            unique: true,
        })?;
        Ok(EntryId::unique(&self.author, self.seq, index))
    }

    /// Sets a field, creating the entry by path if needed.
    pub fn set(&mut self, path: &str, field: &str, value: Value) -> Result<(), TxnError> {
        check_field(field)?;
        let entry = self.ensure(path, EntryKind::Map)?;
        self.push(Op::Set {
            entry,
            field: field.to_owned(),
            value,
        })
    }

    /// Removes a field.
    pub fn unset(&mut self, path: &str, field: &str) -> Result<(), TxnError> {
        check_field(field)?;
        let entry = self.room.doc.resolve(path)?;
        self.push(Op::Unset {
            entry,
            field: field.to_owned(),
        })
    }

    /// Moves the entry at `path` to `new_path` (whose parent must exist).
    pub fn mv(&mut self, path: &str, new_path: &str) -> Result<(), TxnError> {
        let entry = self.room.doc.resolve(path)?;
        self.move_entry(entry, new_path)
    }

    /// Moves `entry` to `new_path` (whose parent must exist): for an entry
    /// its path does not name, as when siblings share a name.
    pub fn move_entry(&mut self, entry: EntryId, new_path: &str) -> Result<(), TxnError> {
        if entry == EntryId::ROOT {
            return Err(TxnError::Root);
        }
        let names = split_path(new_path)?;
        let Some((name, parents)) = names.split_last() else {
            return Err(TxnError::Root);
        };
        let parent_path = format!("/{}", parents.join("/"));
        let parent = self.room.doc.resolve_names(parents, &parent_path)?;
        let mut cur = Some(parent);
        while let Some(c) = cur {
            if c == entry {
                return Err(TxnError::Cycle);
            }
            cur = self.room.doc.parent(&c);
        }
        self.push(Op::Move {
            entry,
            parent,
            name: (*name).to_owned(),
            position: None,
        })
    }

    /// Deletes the entry at `path` (and, from the view, its subtree).
    pub fn delete(&mut self, path: &str) -> Result<(), TxnError> {
        let entry = self.room.doc.resolve(path)?;
        if entry == EntryId::ROOT {
            return Err(TxnError::Root);
        }
        self.push(Op::Delete { entry })
    }

    /// Inserts `text` at character `pos` of the text at `path` (created as
    /// a text entry if missing).
    pub fn text_insert(&mut self, path: &str, pos: usize, text: &str) -> Result<(), TxnError> {
        if text.is_empty() {
            return Ok(());
        }
        let entry = self.ensure(path, EntryKind::Text)?;
        let entry_len = self.room.doc.text_len(&entry);
        let (left, right) = match self.room.doc.sequence(&entry) {
            Some(s) => s.origins_at(pos),
            None => (pos == 0).then_some((None, None)),
        }
        .ok_or(TxnError::OutOfRange {
            pos,
            end: pos,
            len: entry_len,
        })?;
        self.push(Op::TextInsert {
            entry,
            left: left.map(|i| self.char_ref(i)),
            right: right.map(|i| self.char_ref(i)),
            text: text.to_owned(),
        })
    }

    /// Deletes `len` characters from `pos` of the text at `path`.
    pub fn text_delete(&mut self, path: &str, pos: usize, len: usize) -> Result<(), TxnError> {
        if len == 0 {
            return Ok(());
        }
        let entry = self.room.doc.resolve(path)?;
        let out_of_range = TxnError::OutOfRange {
            pos,
            end: pos + len,
            len: self.room.doc.text_len(&entry),
        };
        let runs = self
            .room
            .doc
            .sequence(&entry)
            .and_then(|s| s.visible_runs(pos, len))
            .ok_or(out_of_range)?;
        // A run of local numbers may span several nodes (one per
        // keystroke, typically); a span names characters of one node.
        let mut spans = Vec::new();
        for (mut lv, mut len) in runs {
            while len > 0 {
                let (_, _, in_node) = self.char_of(lv);
                let take = len.min(in_node);
                spans.push(CharSpan {
                    start: self.char_ref(lv),
                    len: take,
                });
                lv += take;
                len -= take;
            }
        }
        self.push(Op::TextDelete { entry, spans })
    }

    /// Commits the changes as one node (`None` if there were none). The
    /// node is in the room's DAG when this returns; persisting it is the
    /// caller's job (a durable replica does it before acknowledging).
    pub fn commit(mut self) -> Result<Option<Committed>, TxnError> {
        self.done = true;
        if self.ops.is_empty() {
            return Ok(None);
        }
        let parents = std::mem::take(&mut self.parents);
        let node = Node {
            format: NodeFormat::V2,
            room: self.room.id().clone(),
            author: self.author,
            seq: self.seq,
            // The history keeps parents by number; their ids go into the
            // node's bytes when it is hashed (when its id is first needed).
            parents: Vec::new(),
            lamport: self.lamport,
            hlc: self.hlc,
            ops: std::mem::take(&mut self.ops),
        };
        // Parents' ids are 32 bytes whatever they are: the size is known
        // (and a node whose content is far below the limit needs no check).
        let rough: usize = node.ops.iter().map(Op::size_bound).sum();
        let placeholders = || vec![NodeId([0; 32]); parents.len()];
        if rough + 64 * parents.len() + 512 > MAX_NODE_BYTES
            && node.encode_with_parents(&placeholders()).len() > MAX_NODE_BYTES
        {
            self.room.doc = Doc::replay(&self.room.dag);
            return Err(TxnError::TooLarge);
        }
        // The receive path's own checks (the operations' limits above, and
        // what spans the whole node: characters deleted, parents): a node
        // that fails them is never committed, and the document goes back.
        if let Err(e) = node.check_content(parents.len()) {
            self.room.doc = Doc::replay(&self.room.dag);
            return Err(match e {
                crate::node::NodeDecodeError::Invalid(what) => TxnError::Limit(what),
                _ => TxnError::TooLarge,
            });
        }
        // Write authority, as every replica will check it.
        if let Err(reason) = self.room.dag.check_authority(&node, &parents) {
            self.room.doc = Doc::replay(&self.room.dag);
            return Err(TxnError::Unauthorized(reason));
        }
        let idx = self
            .room
            .dag
            .insert_local(node, &parents)
            .expect("a local node built on the current heads and checked is valid");
        debug_assert_eq!(idx, self.node);
        self.room.doc.end_node(self.chars);
        Ok(Some(Committed {
            idx: self.node,
            changes: std::mem::take(&mut self.changes),
        }))
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done && !self.ops.is_empty() {
            // What the undone changes recorded goes with them.
            let details = self.room.doc.records_details();
            self.room.doc = Doc::replay(&self.room.dag);
            self.room.doc.record_details(details);
        }
    }
}

fn check_field(field: &str) -> Result<(), TxnError> {
    if field.is_empty() || field.len() > crate::limits::MAX_NAME_BYTES {
        return Err(TxnError::Field(field.to_owned()));
    }
    Ok(())
}
