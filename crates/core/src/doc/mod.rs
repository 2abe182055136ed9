//! The document: the materialized state of a room, built incrementally from
//! its history (DESIGN.md section 3).
//!
//! Applying a node is incremental (work proportional to its operations) and
//! gives exactly the state a replay from scratch gives, in any causal
//! delivery order: the tree follows the replicated move algorithm, fields are
//! multi-value registers, text is a FugueMax sequence whose insertions wait
//! (deterministically) for the characters they reference.

mod chars;
mod describe;
mod fields;
pub mod seq;
mod tree;

use std::collections::{BTreeMap, HashSet};

use thiserror::Error;

use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::codec::mp::Writer;
use crate::dag::{Dag, NodeIdx};
use crate::hlc::Hlc;
use crate::ids::{AuthorId, EntryId, IdMap, NodeId};
use crate::node::Node;
use crate::node::NodeFormat;
use crate::op::{CharNode, CharRef, EntryKind, Op, is_valid_name};
use crate::value::Value;

pub use describe::Edit;

use chars::Chars;
use fields::{Register, Write};
use seq::{Lv, SeqError, Sequence};
use tree::{Placement, Tree};

/// The order of last-writer-wins rules: (hlc, author, op index). The DAG
/// requires clocks to increase along each author's chain, so (hlc, author)
/// names one node and no node id is needed to break ties.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Stamp {
    pub(crate) hlc: Hlc,
    pub(crate) author: AuthorId,
    pub(crate) op: u32,
}

/// Why a path could not be used.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PathError {
    /// Not of the form `/a/b/c`.
    #[error("invalid path {0:?}: paths look like /a/b, with non-empty names")]
    Invalid(String),
    /// No live entry at the path.
    #[error("no entry at {0}")]
    NotFound(String),
}

/// The names of `/a/b`, each checked as it is reached (no allocation). `/`
/// is the root (no names); a trailing `/` is allowed.
pub fn path_names(path: &str) -> Result<impl Iterator<Item = Result<&str, PathError>>, PathError> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let Some(rest) = trimmed
        .strip_prefix('/')
        .or((trimmed.is_empty() && !path.is_empty()).then_some(""))
    else {
        return Err(PathError::Invalid(path.to_owned()));
    };
    Ok(rest
        .split('/')
        .filter(move |_| !rest.is_empty())
        .map(move |n| {
            if is_valid_name(n) {
                Ok(n)
            } else {
                Err(PathError::Invalid(path.to_owned()))
            }
        }))
}

/// Splits `/a/b` into names. `/` is the root (no names).
pub fn split_path(path: &str) -> Result<Vec<&str>, PathError> {
    path_names(path)?.collect()
}

/// A write as shown by the conflicts API.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldWrite {
    /// The value (`None`: unset).
    pub value: Option<Value>,
    /// Who wrote it.
    pub author: AuthorId,
    /// When.
    pub hlc: Hlc,
    /// In which node.
    pub node: NodeId,
}

/// Something concurrent edits left for the app (or user) to look at.
#[derive(Clone, Debug, PartialEq)]
pub enum Conflict {
    /// Concurrent writes to one field: the winner is the value; the losers
    /// stay listed until a write that has seen them supersedes them.
    Field {
        /// Path of the entry.
        path: String,
        /// The field.
        field: String,
        /// The value in effect.
        winner: FieldWrite,
        /// Concurrent writes that lost.
        losers: Vec<FieldWrite>,
    },
    /// Several live siblings share a name; the path resolves to the first.
    Name {
        /// The contested path.
        path: String,
        /// The entry the path resolves to.
        winner: EntryId,
        /// The other entries with that name.
        others: Vec<EntryId>,
    },
    /// An entry was deleted while other nodes, concurrently, edited it.
    Delete {
        /// The deleted entry.
        entry: EntryId,
        /// The node that deleted it.
        deleted_by: NodeId,
        /// Nodes that edited it without having seen the delete.
        edits: Vec<NodeId>,
    },
    /// Concurrent moves of one entry: one placement won.
    Move {
        /// Path of the entry now.
        path: String,
        /// The entry.
        entry: EntryId,
        /// Nodes whose concurrent moves lost (or were skipped as cycles).
        losers: Vec<NodeId>,
    },
}

/// A conflict as the walk finds it, nodes by number.
enum RawConflict<'a> {
    Field {
        path: String,
        field: &'a str,
        reg: &'a Register,
    },
    Name {
        path: String,
        winner: EntryId,
        others: Vec<EntryId>,
    },
    Move {
        path: String,
        entry: EntryId,
        losers: Vec<NodeIdx>,
    },
    Delete {
        entry: EntryId,
        deleted_by: NodeIdx,
        edits: Vec<NodeIdx>,
    },
}

/// One child as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    /// Its name.
    pub name: String,
    /// Its id.
    pub id: EntryId,
    /// What it holds.
    pub kind: EntryKind,
}

/// A node a character reference names, as something to wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum NodeKey {
    /// By (author, seq): how format-2 nodes cite, and how every node is
    /// waited for once it is in the DAG.
    Seq(AuthorId, u64),
    /// A format-1 node by id (format-1 nodes cite only format-1 nodes).
    Id(NodeId),
}

/// A character a text op refers to: by local number when its node has been
/// applied (or is the node being applied), else by key and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Known(Lv),
    Unknown(NodeKey, u32),
}

/// Where a text insert goes and which characters it gets.
#[derive(Clone, Copy, Debug)]
struct Insert {
    node: NodeIdx,
    /// Index of its first character among its node's.
    first: u32,
    /// Local number of its first character.
    lv: Lv,
    left: Option<Target>,
    right: Option<Target>,
}

/// A text insert waiting for a character it references.
#[derive(Clone, Debug)]
struct Parked {
    insert: Insert,
    text: String,
}

#[derive(Clone, Debug, Default)]
struct TextState {
    seq: Sequence,
    /// Inserts whose origin is not integrated yet, by the missing character.
    parked: IdMap<(NodeKey, u32), Vec<Parked>>,
    /// Deletes of characters not integrated yet, as (first index, count)
    /// spans per node, applied when the characters arrive. Spans, not
    /// characters, so memory follows the ops rather than the lengths they
    /// claim.
    deleted_early: IdMap<NodeKey, Vec<(u32, u32)>>,
    /// Per author, the newest node that edited this text.
    editors: IdMap<AuthorId, NodeIdx>,
}

/// The node being applied.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub(crate) dag: &'a Dag,
    pub(crate) node: NodeIdx,
    pub(crate) author: AuthorId,
    pub(crate) seq: u64,
    pub(crate) hlc: Hlc,
    /// Local number of the node's first character.
    pub(crate) lv_base: Lv,
}

impl Ctx<'_> {
    /// The keys characters of node `idx` may be waited for under: its
    /// (author, seq), and for a format-1 node its id too.
    fn node_keys(&self, idx: NodeIdx) -> (NodeKey, Option<NodeKey>) {
        if idx >= self.dag.next_idx() {
            // The node being built by a local transaction.
            return (NodeKey::Seq(self.author, self.seq), None);
        }
        let key = NodeKey::Seq(*self.dag.author(idx), self.dag.seq(idx));
        let legacy =
            (self.dag.format(idx) == NodeFormat::V1).then(|| NodeKey::Id(self.dag.id(idx)));
        (key, legacy)
    }

    /// Whether node `a` is a strict causal ancestor of node `b`.
    fn before(&self, a: NodeIdx, b: NodeIdx) -> bool {
        let next = self.dag.next_idx();
        if b >= next {
            return a < next;
        }
        a < next && self.dag.is_ancestor(a, b)
    }

    fn stamp(&self, op: u32) -> Stamp {
        Stamp {
            hlc: self.hlc,
            author: self.author,
            op,
        }
    }
}

/// Which entries a node changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries whose fields, text or placement changed (and, for
    /// placements, the old and new parents).
    pub entries: Vec<EntryId>,
}

/// What an applied operation changed in a field or a text, as
/// [`Doc::record_details`] records it.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    /// The value of a field in effect changed.
    Field {
        /// The entry.
        entry: EntryId,
        /// The field.
        field: String,
        /// The value in effect before (`None`: unset).
        old: Option<Value>,
        /// The value in effect after.
        new: Option<Value>,
    },
    /// A text changed.
    Text {
        /// The text entry.
        entry: EntryId,
        /// Where and how, in characters.
        edit: seq::TextEdit,
    },
}

/// Details a document keeps until taken, at most: past this, it counts
/// what it drops (a reader that never takes them costs this much).
pub const MAX_DETAILS: usize = 65_536;

/// Details recorded and not yet taken.
#[derive(Clone, Debug, Default)]
struct Details {
    kept: Vec<Detail>,
    dropped: usize,
}

impl Details {
    fn push(&mut self, detail: Detail) {
        if self.kept.len() < MAX_DETAILS {
            self.kept.push(detail);
        } else {
            self.dropped += 1;
        }
    }
}

/// The materialized state of one room.
#[derive(Clone, Debug, Default)]
pub struct Doc {
    tree: Tree,
    fields: IdMap<EntryId, BTreeMap<String, Register>>,
    texts: IdMap<EntryId, TextState>,
    /// Local numbers of every character the history inserted.
    chars: Chars,
    /// What applied operations changed, while recorded.
    details: Option<Details>,
}

impl Doc {
    /// An empty document.
    pub fn new() -> Doc {
        Doc::default()
    }

    /// Rebuilds the state from scratch by replaying `dag` in causal order.
    pub fn replay(dag: &Dag) -> Doc {
        let mut doc = Doc::new();
        for idx in dag.causal_order() {
            dag.with_content(idx, |node| doc.apply(dag, idx, node));
        }
        doc
    }

    /// The context of the next node applied, `node` of `dag`.
    pub(crate) fn ctx<'a>(
        &self,
        dag: &'a Dag,
        node: NodeIdx,
        author: AuthorId,
        seq: u64,
        hlc: Hlc,
    ) -> Ctx<'a> {
        debug_assert_eq!(node, self.chars.len(), "nodes are applied in order");
        Ctx {
            dag,
            node,
            author,
            seq,
            hlc,
            lv_base: self.chars.next_base(),
        }
    }

    /// The node that inserted character `lv` (of an applied node), the
    /// character's index there and how many characters that node inserted.
    pub(crate) fn char_of(&self, lv: Lv) -> Option<(NodeIdx, u32, u32)> {
        let (node, index) = self.chars.node_of(lv)?;
        Some((node, index, self.chars.range(node).1))
    }

    /// The local number the next node's first character gets.
    pub(crate) fn next_char(&self) -> Lv {
        self.chars.next_base()
    }

    /// Numbers the characters of the node just applied (`count` of them).
    pub(crate) fn end_node(&mut self, count: u32) {
        let _ = self.chars.push(count);
    }

    /// Starts (or stops) recording what each applied operation changes in
    /// fields (old and new value) and texts (position, characters deleted,
    /// text inserted), for [`Doc::take_details`]. Off by default: it costs
    /// a copy of every value and text written.
    pub fn record_details(&mut self, on: bool) {
        if on != self.details.is_some() {
            self.details = on.then(Details::default);
        }
        for t in self.texts.values_mut() {
            t.seq.record_edits(on);
        }
    }

    /// Whether details are recorded.
    pub fn records_details(&self) -> bool {
        self.details.is_some()
    }

    /// The details recorded since the last call, in the order they
    /// happened, and how many were dropped past [`MAX_DETAILS`].
    pub fn take_details(&mut self) -> (Vec<Detail>, usize) {
        match self.details.as_mut() {
            Some(d) => (std::mem::take(&mut d.kept), std::mem::take(&mut d.dropped)),
            None => (Vec::new(), 0),
        }
    }

    /// Applies node `idx` (already inserted in `dag`).
    pub fn apply(&mut self, dag: &Dag, idx: NodeIdx, node: &Node) -> Changes {
        let ctx = self.ctx(dag, idx, node.author, node.seq, node.hlc);
        let mut changes = Changes::default();
        let mut chars = 0u32;
        for (i, op) in node.ops.iter().enumerate() {
            self.apply_op(&ctx, i as u32, op, chars, &mut changes);
            chars = chars.saturating_add(op.inserted_chars());
        }
        self.end_node(chars);
        changes.entries.sort_unstable();
        changes.entries.dedup();
        changes
    }

    /// Applies one op of a node; `chars` counts the characters the node's
    /// earlier ops inserted (the first index of this op's characters).
    pub(crate) fn apply_op(
        &mut self,
        ctx: &Ctx<'_>,
        op_index: u32,
        op: &Op,
        chars: u32,
        changes: &mut Changes,
    ) {
        let stamp = ctx.stamp(op_index);
        match op {
            Op::Create {
                parent,
                name,
                kind,
                position,
                unique,
            } => {
                let id = if *unique {
                    EntryId::unique(&ctx.author, ctx.seq, op_index)
                } else {
                    EntryId::derived(parent, name)
                };
                self.tree.set_kind(id, &stamp, *kind);
                let to = Placement {
                    parent: *parent,
                    name: name.clone(),
                    position: position.clone(),
                };
                self.tree
                    .place(stamp, ctx.node, id, to, &|a, b| ctx.before(a, b));
                changes.entries.extend([id, *parent]);
            }
            Op::Set {
                entry,
                field,
                value,
            } => self.write_field(ctx, stamp, *entry, field, Some(value.clone()), changes),
            Op::Unset { entry, field } => {
                self.write_field(ctx, stamp, *entry, field, None, changes)
            }
            Op::Move {
                entry,
                parent,
                name,
                position,
            } => {
                let old = self.parent(entry);
                let to = Placement {
                    parent: *parent,
                    name: name.clone(),
                    position: position.clone(),
                };
                self.tree
                    .place(stamp, ctx.node, *entry, to, &|a, b| ctx.before(a, b));
                changes.entries.extend([*entry, *parent]);
                changes.entries.extend(old);
            }
            Op::Delete { entry } => {
                let old = self.parent(entry);
                let to = Placement {
                    parent: EntryId::TRASH,
                    name: String::new(),
                    position: None,
                };
                self.tree
                    .place(stamp, ctx.node, *entry, to, &|a, b| ctx.before(a, b));
                changes.entries.push(*entry);
                changes.entries.extend(old);
            }
            Op::TextInsert {
                entry,
                left,
                right,
                text,
            } => {
                let chars_of = &self.chars;
                let t = self.texts.entry(*entry).or_default();
                t.seq.record_edits(self.details.is_some());
                t.editors.insert(ctx.author, ctx.node);
                let insert = Insert {
                    node: ctx.node,
                    first: chars,
                    lv: ctx.lv_base.saturating_add(chars),
                    left: left.map(|c| resolve_ref(ctx, chars_of, c)),
                    right: right.map(|c| resolve_ref(ctx, chars_of, c)),
                };
                integrate(ctx, chars_of, t, insert, text);
                if let Some(details) = self.details.as_mut() {
                    for edit in t.seq.take_edits() {
                        details.push(Detail::Text {
                            entry: *entry,
                            edit,
                        });
                    }
                }
                changes.entries.push(*entry);
            }
            Op::TextDelete { entry, spans } => {
                let chars_of = &self.chars;
                let t = self.texts.entry(*entry).or_default();
                t.seq.record_edits(self.details.is_some());
                t.editors.insert(ctx.author, ctx.node);
                for span in spans {
                    let target = resolve_ref(ctx, chars_of, span.start);
                    let start = span.start.index;
                    let len = span.len.min(u32::MAX - start);
                    let missing = match target {
                        Target::Known(lv) => t.seq.delete_run(lv, len.min(Lv::MAX - lv)) > 0,
                        Target::Unknown(..) => true,
                    };
                    if missing {
                        // Some characters are not here yet (their insert
                        // waits): delete them when they arrive.
                        let (node, _) = wait_key(ctx, chars_of, target);
                        t.deleted_early.entry(node).or_default().push((start, len));
                    }
                }
                if let Some(details) = self.details.as_mut() {
                    for edit in t.seq.take_edits() {
                        details.push(Detail::Text {
                            entry: *entry,
                            edit,
                        });
                    }
                }
                changes.entries.push(*entry);
            }
        }
    }

    /// The parent an entry currently has (trash for deleted entries).
    pub fn parent(&self, entry: &EntryId) -> Option<EntryId> {
        self.tree
            .get(entry)
            .and_then(|e| e.placed.as_ref())
            .map(|(p, _, _)| p.parent)
    }

    fn write_field(
        &mut self,
        ctx: &Ctx<'_>,
        stamp: Stamp,
        entry: EntryId,
        field: &str,
        value: Option<Value>,
        changes: &mut Changes,
    ) {
        let reg = self
            .fields
            .entry(entry)
            .or_default()
            .entry(field.to_owned())
            .or_default();
        let w = Write {
            stamp,
            node: ctx.node,
            value,
        };
        let Some(details) = self.details.as_mut() else {
            reg.write(w, &|a, b| ctx.before(a, b));
            changes.entries.push(entry);
            return;
        };
        let in_effect = |reg: &Register| reg.winner().and_then(|w| w.value.clone());
        let old = in_effect(reg);
        reg.write(w, &|a, b| ctx.before(a, b));
        let new = in_effect(reg);
        if old != new {
            details.push(Detail::Field {
                entry,
                field: field.to_owned(),
                old,
                new,
            });
        }
        changes.entries.push(entry);
    }

    // ----- reads -----

    /// The live entry at `path`.
    pub fn resolve(&self, path: &str) -> Result<EntryId, PathError> {
        let mut cur = EntryId::ROOT;
        for name in path_names(path)? {
            cur = self
                .child_named(&cur, name?)
                .ok_or_else(|| PathError::NotFound(path.to_owned()))?;
        }
        Ok(cur)
    }

    /// The live entry reached from the root through `names` (already
    /// checked); `path` names it in the error.
    pub fn resolve_names(&self, names: &[&str], path: &str) -> Result<EntryId, PathError> {
        names.iter().try_fold(EntryId::ROOT, |cur, name| {
            self.child_named(&cur, name)
                .ok_or_else(|| PathError::NotFound(path.to_owned()))
        })
    }

    /// The live child of `parent` that `name` resolves to (the earliest
    /// placed, when names collide).
    pub fn child_named(&self, parent: &EntryId, name: &str) -> Option<EntryId> {
        self.tree.winner_named(parent, name)
    }

    /// Whether `id` is reachable from the root.
    pub fn is_live(&self, id: &EntryId) -> bool {
        self.tree.is_live(id)
    }

    /// The path of a live entry.
    pub fn path_of(&self, id: &EntryId) -> Option<String> {
        self.tree.path_of(id)
    }

    /// The paths operation `op_index` of node `idx` touches, for
    /// subscription scopes: the entry it changes (where it is now, or where
    /// it was deleted), and for a create or move the place it puts the
    /// entry and, for a move, the place it took it from. Each path is a
    /// list of names from the root.
    pub fn touched_paths<'a>(
        &'a self,
        dag: &Dag,
        idx: NodeIdx,
        op_index: u32,
        op: &'a Op,
    ) -> Vec<Vec<&'a str>> {
        let under = |parent: &EntryId, name: &'a str| {
            let mut names = self.tree.last_names(parent)?;
            names.push(name);
            Some(names)
        };
        let mut paths = Vec::new();
        match op {
            Op::Create { parent, name, .. } => paths.extend(under(parent, name)),
            Op::Move {
                entry,
                parent,
                name,
                ..
            } => {
                paths.extend(under(parent, name));
                let stamp = Stamp {
                    hlc: dag.hlc(idx),
                    author: *dag.author(idx),
                    op: op_index,
                };
                if let Some((from, _, _)) = self.tree.placement_before(&stamp) {
                    paths.extend(under(&from.parent, &from.name));
                }
                paths.extend(self.tree.last_names(entry));
            }
            Op::Set { entry, .. }
            | Op::Unset { entry, .. }
            | Op::Delete { entry }
            | Op::TextInsert { entry, .. }
            | Op::TextDelete { entry, .. } => paths.extend(self.tree.last_names(entry)),
        }
        paths
    }

    /// The kind of an entry (map if never created with a kind).
    pub fn kind(&self, id: &EntryId) -> EntryKind {
        self.tree
            .get(id)
            .and_then(|e| e.kind.as_ref())
            .map_or(EntryKind::Map, |(_, k)| *k)
    }

    /// The value of one field of entry `id`.
    pub fn field(&self, id: &EntryId, field: &str) -> Option<&Value> {
        self.fields.get(id)?.get(field)?.winner()?.value.as_ref()
    }

    /// The blobs the fields in effect reference (anywhere in a value), by
    /// hash, sorted and deduplicated.
    pub fn blob_refs(&self) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        for fields in self.fields.values() {
            for reg in fields.values() {
                if let Some(v) = reg.winner().and_then(|w| w.value.as_ref()) {
                    v.blob_hashes(&mut out);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Every blob reference the fields in effect of live entries hold (at
    /// any depth of a value), with the entry holding it.
    pub fn blob_fields(&self) -> Vec<(EntryId, crate::BlobRef)> {
        let mut out = Vec::new();
        for (id, fields) in self.fields.iter() {
            if !self.is_live(id) {
                continue;
            }
            for reg in fields.values() {
                if let Some(v) = reg.winner().and_then(|w| w.value.as_ref()) {
                    v.for_each_blob(&mut |b| out.push((*id, b.clone())));
                }
            }
        }
        out
    }

    /// Whether `field` of entry `id` has concurrent writes still listed as
    /// a conflict.
    pub fn has_conflict(&self, id: &EntryId, field: &str) -> bool {
        self.fields
            .get(id)
            .and_then(|f| f.get(field))
            .is_some_and(|reg| !reg.losers().is_empty())
    }

    /// Every set field of entry `id`.
    pub fn fields(&self, id: &EntryId) -> BTreeMap<&str, &Value> {
        self.fields
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|(k, r)| Some((k.as_str(), r.winner()?.value.as_ref()?)))
            .collect()
    }

    /// Live children of `id`, in display order.
    pub fn children(&self, id: &EntryId) -> Vec<Child> {
        self.tree
            .children(id)
            .into_iter()
            .map(|(c, p)| Child {
                name: p.name.clone(),
                id: c,
                kind: self.kind(&c),
            })
            .collect()
    }

    /// The text of entry `id` (empty if it has none).
    pub fn text(&self, id: &EntryId) -> String {
        self.texts.get(id).map(|t| t.seq.text()).unwrap_or_default()
    }

    /// Visible characters in the text of `id`.
    pub fn text_len(&self, id: &EntryId) -> usize {
        self.texts.get(id).map_or(0, |t| t.seq.len())
    }

    pub(crate) fn sequence(&self, id: &EntryId) -> Option<&Sequence> {
        self.texts.get(id).map(|t| &t.seq)
    }

    fn field_write(dag: &Dag, w: &Write) -> FieldWrite {
        FieldWrite {
            value: w.value.clone(),
            author: w.stamp.author,
            hlc: w.stamp.hlc,
            node: dag.id(w.node),
        }
    }

    /// Open conflicts at or under `path` (all of them for `/`).
    pub fn conflicts(&self, dag: &Dag, path: &str) -> Result<Vec<Conflict>, PathError> {
        let top = self.resolve(path)?;
        // Node numbers are local to a replica; ids are not.
        let ids = |nodes: Vec<NodeIdx>| {
            let mut ids: Vec<NodeId> = nodes.iter().map(|&n| dag.id(n)).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let mut out = Vec::new();
        self.walk_conflicts(dag, top, true, |c| {
            out.push(match c {
                RawConflict::Field { path, field, reg } => Conflict::Field {
                    path,
                    field: field.to_owned(),
                    winner: Self::field_write(dag, reg.winner().expect("a conflict has a winner")),
                    losers: reg
                        .losers()
                        .iter()
                        .map(|l| Self::field_write(dag, l))
                        .collect(),
                },
                RawConflict::Name {
                    path,
                    winner,
                    others,
                } => Conflict::Name {
                    path,
                    winner,
                    others,
                },
                RawConflict::Move {
                    path,
                    entry,
                    losers,
                } => Conflict::Move {
                    path,
                    entry,
                    losers: ids(losers),
                },
                RawConflict::Delete {
                    entry,
                    deleted_by,
                    edits,
                } => Conflict::Delete {
                    entry,
                    deleted_by: dag.id(deleted_by),
                    edits: ids(edits),
                },
            })
        });
        Ok(out)
    }

    /// Calls `f` with every open conflict at or under `top`, in tree order
    /// (with paths only if `paths`: the state hash does without them).
    fn walk_conflicts<'a>(
        &'a self,
        dag: &Dag,
        top: EntryId,
        paths: bool,
        mut f: impl FnMut(RawConflict<'a>),
    ) {
        let mut deleted: IdMap<EntryId, Vec<(EntryId, NodeIdx)>> = IdMap::default();
        for (entry, former, by) in self.tree.deletions() {
            if let Some(parent) = former {
                deleted.entry(parent).or_default().push((entry, by));
            }
        }
        for list in deleted.values_mut() {
            list.sort_unstable();
        }
        let mut stack = vec![top];
        while let Some(id) = stack.pop() {
            let here = if paths {
                self.path_of(&id).unwrap_or_default()
            } else {
                String::new()
            };
            for (field, reg) in self.fields.get(&id).into_iter().flatten() {
                if reg.winner().is_some() && !reg.losers().is_empty() {
                    f(RawConflict::Field {
                        path: here.clone(),
                        field,
                        reg,
                    });
                }
            }
            if let Some(losers) = self.tree.move_losers(&id) {
                f(RawConflict::Move {
                    path: here.clone(),
                    entry: id,
                    losers,
                });
            }
            let children = self.tree.children(&id);
            let mut seen = HashSet::new();
            for (_, p) in &children {
                if !seen.insert(p.name.as_str()) {
                    continue;
                }
                let named = self.tree.named(&id, &p.name);
                if named.len() > 1 {
                    f(RawConflict::Name {
                        path: child_path(&here, &p.name),
                        winner: named[0],
                        others: named[1..].to_vec(),
                    });
                }
            }
            stack.extend(children.iter().rev().map(|(c, _)| *c));
            // Deleted children whose deletion raced with edits.
            for &(c, deleted_by) in deleted.get(&id).into_iter().flatten() {
                let edits = self.edits_concurrent_with(dag, &c, deleted_by);
                if !edits.is_empty() {
                    f(RawConflict::Delete {
                        entry: c,
                        deleted_by,
                        edits,
                    });
                }
            }
        }
    }

    fn edits_concurrent_with(&self, dag: &Dag, entry: &EntryId, delete: NodeIdx) -> Vec<NodeIdx> {
        let field_nodes = self
            .fields
            .get(entry)
            .into_iter()
            .flatten()
            .flat_map(|(_, r)| r.nodes());
        let text_nodes = self
            .texts
            .get(entry)
            .into_iter()
            .flat_map(|t| t.editors.values().copied());
        let mut out: Vec<NodeIdx> = field_nodes
            .chain(text_nodes)
            .chain(self.tree.placement_nodes(entry))
            .filter(|&n| n != delete && !dag.is_ancestor(n, delete))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The whole visible state as a value: for each entry its kind, fields,
    /// text and children (by name; a colliding loser is keyed `name~id8`).
    pub fn export(&self) -> Value {
        self.export_entry(&EntryId::ROOT)
    }

    fn export_entry(&self, id: &EntryId) -> Value {
        let mut m = BTreeMap::new();
        m.insert("kind".to_owned(), Value::Str(self.kind(id).as_str().into()));
        let fields: BTreeMap<String, Value> = self
            .fields(id)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect();
        if !fields.is_empty() {
            m.insert("fields".to_owned(), Value::Map(fields));
        }
        if let Some(t) = self.texts.get(id) {
            m.insert("text".to_owned(), Value::Str(t.seq.text()));
        }
        let mut children = BTreeMap::new();
        for (c, p) in self.tree.children(id) {
            let key = if self.tree.winner_named(id, &p.name) == Some(c) {
                p.name.clone()
            } else {
                format!("{}~{}", p.name, &c.to_string()[..8])
            };
            children.insert(key, self.export_entry(&c));
        }
        if !children.is_empty() {
            m.insert("children".to_owned(), Value::Map(children));
        }
        Value::Map(m)
    }

    /// The canonical hash of the visible state (entries, kinds, positions,
    /// fields with their open conflicts, text, and delete and move
    /// conflicts). Equal on every replica holding the same nodes. Nodes
    /// are named by (author, seq), which every replica agrees on, so the
    /// hash needs no node id.
    pub fn state_hash(&self, dag: &Dag) -> [u8; 32] {
        let mut w = Writer::new();
        self.hash_entry(dag, &EntryId::ROOT, &mut w);
        let mut extra = Vec::new();
        self.walk_conflicts(dag, EntryId::ROOT, false, |c| match c {
            RawConflict::Delete {
                entry,
                deleted_by,
                edits,
            } => extra.push((0u8, entry, Some(deleted_by), edits)),
            RawConflict::Move { entry, losers, .. } => extra.push((1u8, entry, None, losers)),
            // Field and name conflicts are already in the tree walk.
            RawConflict::Field { .. } | RawConflict::Name { .. } => {}
        });
        extra.sort_by_key(|e| (e.0, e.1));
        let key = |n: NodeIdx| (*dag.author(n), dag.seq(n));
        w.array(extra.len());
        for (kind, entry, by, nodes) in &extra {
            w.array(4);
            w.uint(*kind as u64);
            w.bin(&entry.0);
            match *by {
                Some(n) => {
                    let (author, seq) = key(n);
                    w.array(2);
                    w.bin(&author.0);
                    w.uint(seq);
                }
                None => w.nil(),
            }
            let mut keys: Vec<(AuthorId, u64)> = nodes.iter().map(|&n| key(n)).collect();
            keys.sort_unstable();
            keys.dedup();
            w.array(keys.len());
            for (author, seq) in keys {
                w.array(2);
                w.bin(&author.0);
                w.uint(seq);
            }
        }
        *blake3::hash(w.as_bytes()).as_bytes()
    }

    fn hash_entry(&self, dag: &Dag, id: &EntryId, w: &mut Writer) {
        w.array(5);
        w.bin(&id.0);
        w.uint(self.kind(id) as u64);
        let regs = self.fields.get(id);
        let live: Vec<(&String, &Register)> = regs
            .into_iter()
            .flatten()
            .filter(|(_, r)| r.winner().is_some())
            .collect();
        w.array(live.len());
        for (field, reg) in live {
            w.array(2);
            w.str(field);
            let writes = reg.winner().into_iter().chain(reg.losers());
            w.array(1 + reg.losers().len());
            for wr in writes {
                w.array(3);
                match &wr.value {
                    Some(v) => v.encode(w),
                    None => w.nil(),
                }
                // (hlc, author) names the node; its seq is a cheap check.
                w.bin(&wr.stamp.author.0);
                w.uint(dag.seq(wr.node));
            }
        }
        match self.texts.get(id) {
            Some(t) => w.str(&t.seq.text()),
            None => w.nil(),
        }
        let children = self.tree.children(id);
        w.array(children.len());
        for (c, p) in children {
            w.array(3);
            w.str(&p.name);
            match &p.position {
                Some(pos) => w.bin(pos),
                None => w.nil(),
            }
            self.hash_entry(dag, &c, w);
        }
    }
}

pub(crate) fn save_stamp(out: &mut Out, stamp: &Stamp) {
    out.hlc(stamp.hlc);
    out.raw(&stamp.author.0);
    out.u64(stamp.op as u64);
}

pub(crate) fn load_stamp(input: &mut In<'_>) -> Read<Stamp> {
    Ok(Stamp {
        hlc: input.hlc()?,
        author: AuthorId(input.array()?),
        op: input.u32()?,
    })
}

/// A node number, which must be one of the `nodes` nodes the history holds.
pub(crate) fn load_node(input: &mut In<'_>, nodes: NodeIdx) -> Read<NodeIdx> {
    let node = input.u32()?;
    if node >= nodes {
        return Err(CheckpointError::Corrupt("node number past the history"));
    }
    Ok(node)
}

fn save_key(out: &mut Out, key: &NodeKey) {
    match key {
        NodeKey::Seq(author, seq) => {
            out.bool(false);
            out.raw(&author.0);
            out.u64(*seq);
        }
        NodeKey::Id(id) => {
            out.bool(true);
            out.raw(&id.0);
        }
    }
}

fn load_key(input: &mut In<'_>) -> Read<NodeKey> {
    Ok(if input.bool()? {
        NodeKey::Id(NodeId(input.array()?))
    } else {
        NodeKey::Seq(AuthorId(input.array()?), input.u64()?)
    })
}

fn save_target(out: &mut Out, target: &Option<Target>) {
    match target {
        None => out.u64(0),
        Some(Target::Known(lv)) => {
            out.u64(1);
            out.u64(u64::from(*lv));
        }
        Some(Target::Unknown(key, index)) => {
            out.u64(2);
            save_key(out, key);
            out.u64(u64::from(*index));
        }
    }
}

fn load_target(input: &mut In<'_>) -> Read<Option<Target>> {
    Ok(match input.u64()? {
        0 => None,
        1 => Some(Target::Known(input.u32()?)),
        2 => Some(Target::Unknown(load_key(input)?, input.u32()?)),
        _ => return Err(CheckpointError::Corrupt("text reference")),
    })
}

impl TextState {
    fn save(&self, out: &mut Out) {
        self.seq.save(out);
        out.u64(self.parked.len() as u64);
        for ((key, index), waiting) in &self.parked {
            save_key(out, key);
            out.u64(u64::from(*index));
            out.u64(waiting.len() as u64);
            for p in waiting {
                let i = &p.insert;
                out.u64(u64::from(i.node));
                out.u64(u64::from(i.first));
                out.u64(u64::from(i.lv));
                save_target(out, &i.left);
                save_target(out, &i.right);
                out.bytes(p.text.as_bytes());
            }
        }
        out.u64(self.deleted_early.len() as u64);
        for (key, spans) in &self.deleted_early {
            save_key(out, key);
            out.u64(spans.len() as u64);
            for (start, len) in spans {
                out.u64(u64::from(*start));
                out.u64(u64::from(*len));
            }
        }
        out.u64(self.editors.len() as u64);
        for (author, node) in &self.editors {
            out.raw(&author.0);
            out.u64(u64::from(*node));
        }
    }

    fn load(input: &mut In<'_>, nodes: NodeIdx) -> Read<TextState> {
        let mut t = TextState {
            seq: Sequence::load(input)?,
            ..TextState::default()
        };
        for _ in 0..input.count(4)? {
            let key = (load_key(input)?, input.u32()?);
            let mut waiting = Vec::new();
            for _ in 0..input.count(6)? {
                let insert = Insert {
                    node: load_node(input, nodes)?,
                    first: input.u32()?,
                    lv: input.u32()?,
                    left: load_target(input)?,
                    right: load_target(input)?,
                };
                let text = std::str::from_utf8(input.bytes()?)
                    .map_err(|_| CheckpointError::Corrupt("parked text"))?
                    .to_owned();
                waiting.push(Parked { insert, text });
            }
            t.parked.insert(key, waiting);
        }
        for _ in 0..input.count(3)? {
            let key = load_key(input)?;
            let mut spans = Vec::new();
            for _ in 0..input.count(2)? {
                spans.push((input.u32()?, input.u32()?));
            }
            t.deleted_early.insert(key, spans);
        }
        for _ in 0..input.count(33)? {
            let author = AuthorId(input.array()?);
            t.editors.insert(author, load_node(input, nodes)?);
        }
        Ok(t)
    }
}

impl Doc {
    /// Saves the document into a checkpoint body.
    pub(crate) fn save(&self, out: &mut Out) {
        self.chars.save(out);
        self.tree.save(out);
        out.u64(self.fields.len() as u64);
        for (entry, fields) in &self.fields {
            out.raw(&entry.0);
            out.u64(fields.len() as u64);
            for (name, reg) in fields {
                out.bytes(name.as_bytes());
                reg.save(out);
            }
        }
        out.u64(self.texts.len() as u64);
        for (entry, t) in &self.texts {
            out.raw(&entry.0);
            t.save(out);
        }
    }

    /// The document [`Doc::save`] saved, of a history of `nodes` nodes.
    pub(crate) fn load(input: &mut In<'_>, nodes: NodeIdx) -> Read<Doc> {
        let chars = Chars::load(input, nodes)?;
        let tree = Tree::load(input, nodes)?;
        let mut fields = IdMap::default();
        for _ in 0..input.count(33)? {
            let entry = EntryId(input.array()?);
            let mut regs = BTreeMap::new();
            for _ in 0..input.count(2)? {
                let name = std::str::from_utf8(input.bytes()?)
                    .map_err(|_| CheckpointError::Corrupt("field name"))?
                    .to_owned();
                regs.insert(name, Register::load(input, nodes)?);
            }
            fields.insert(entry, regs);
        }
        let mut texts = IdMap::default();
        for _ in 0..input.count(34)? {
            let entry = EntryId(input.array()?);
            texts.insert(entry, TextState::load(input, nodes)?);
        }
        Ok(Doc {
            tree,
            fields,
            texts,
            chars,
            details: None,
        })
    }
}

fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// What a character reference names: a local number once its node has
/// been applied (and inserted that many characters), else a key to wait on.
fn resolve_ref(ctx: &Ctx<'_>, chars: &Chars, c: CharRef) -> Target {
    let node = match c.node {
        CharNode::Id(None) => ctx.node,
        CharNode::Id(Some(id)) => match ctx.dag.legacy_idx(&id) {
            Some(node) => node,
            None => return Target::Unknown(NodeKey::Id(id), c.index),
        },
        CharNode::Seq { author, seq } => {
            let author = author.unwrap_or(ctx.author);
            if author == ctx.author && seq == ctx.seq {
                ctx.node
            } else {
                match ctx.dag.by_author_seq(&author, seq) {
                    Some(node) => node,
                    None => return Target::Unknown(NodeKey::Seq(author, seq), c.index),
                }
            }
        }
    };
    if node == ctx.node {
        // The node being applied: its characters are numbered from its
        // base. One it never inserts is waited for under its key forever.
        return match ctx.lv_base.checked_add(c.index) {
            Some(lv) if lv < Lv::MAX => Target::Known(lv),
            _ => Target::Unknown(ctx.node_keys(node).0, c.index),
        };
    }
    match chars.lv(node, c.index) {
        Some(lv) => Target::Known(lv),
        // An index its node never inserted: never there, on any replica.
        None => Target::Unknown(ctx.node_keys(node).0, c.index),
    }
}

/// The node that inserted character `lv` and its index there.
fn node_of(ctx: &Ctx<'_>, chars: &Chars, lv: Lv) -> (NodeIdx, u32) {
    if lv >= ctx.lv_base {
        return (ctx.node, lv - ctx.lv_base);
    }
    chars
        .node_of(lv)
        .expect("a known character was numbered by an applied node")
}

/// The key a parked insert waits under.
fn wait_key(ctx: &Ctx<'_>, chars: &Chars, t: Target) -> (NodeKey, u32) {
    match t {
        Target::Known(lv) => {
            let (node, index) = node_of(ctx, chars, lv);
            (ctx.node_keys(node).0, index)
        }
        Target::Unknown(key, index) => (key, index),
    }
}

/// Integrates a text insert, or parks it until the characters it references
/// exist; then releases whatever it unblocked. The outcome is the same in any
/// delivery order: an insert goes in exactly when both its origins are in.
fn integrate(ctx: &Ctx<'_>, chars: &Chars, t: &mut TextState, first: Insert, text: &str) {
    // The common case (origins present, nothing waiting) runs without
    // copying the text.
    let Some(p) = try_integrate(ctx, chars, t, first, text) else {
        return;
    };
    let mut work = vec![Parked {
        insert: p,
        text: text.to_owned(),
    }];
    while let Some(p) = work.pop() {
        let Some(done) = try_integrate(ctx, chars, t, p.insert, &p.text) else {
            continue;
        };
        let (key, legacy) = ctx.node_keys(done.node);
        let n = p.text.chars().count() as u32;
        let run = done.first..done.first + n;
        for key in std::iter::once(key).chain(legacy) {
            if !t.parked.is_empty() {
                for index in run.clone() {
                    if let Some(waiting) = t.parked.remove(&(key, index)) {
                        work.extend(waiting);
                    }
                }
            }
            if let Some(spans) = t.deleted_early.get(&key) {
                for &(start, len) in spans {
                    let from = start.max(run.start);
                    let to = start.saturating_add(len).min(run.end);
                    if from < to {
                        t.seq.delete_run(done.lv + (from - done.first), to - from);
                    }
                }
            }
        }
    }
}

/// Integrates `ins` if its origins are present, else parks it. Returns the
/// insert when it went in and others may wait on its characters.
fn try_integrate(
    ctx: &Ctx<'_>,
    chars: &Chars,
    t: &mut TextState,
    ins: Insert,
    text: &str,
) -> Option<Insert> {
    // Origins not numbered yet are missing for sure; numbered ones the
    // sequence checks as it integrates.
    let numbered = |r: Option<Target>| match r {
        None => Ok(None),
        Some(Target::Known(lv)) => Ok(Some(lv)),
        Some(other) => Err(other),
    };
    let missing = match (numbered(ins.left), numbered(ins.right)) {
        (Ok(left), Ok(right)) => {
            let order = |a: Lv, b: Lv| order_chars(ctx, chars, a, b);
            match t.seq.integrate(ins.lv, left, right, text, &order) {
                Ok(()) => None,
                Err(SeqError::UnknownOrigin(lv)) => Some(Target::Known(lv)),
                // A replayed insert, or numbers past the room's limit:
                // nothing changes.
                Err(SeqError::DuplicateItem(_) | SeqError::IdOverflow(_)) => return None,
            }
        }
        (Err(missing), _) | (_, Err(missing)) => Some(missing),
    };
    if let Some(missing) = missing {
        let parked = Parked {
            insert: ins,
            text: text.to_owned(),
        };
        t.parked
            .entry(wait_key(ctx, chars, missing))
            .or_default()
            .push(parked);
        return None;
    }
    (!t.parked.is_empty() || !t.deleted_early.is_empty()).then_some(ins)
}

/// Total order of characters for text tie-breaks: by the (author, seq) of
/// their nodes, which names a node as surely as its id and needs no hash,
/// then their index (the node being applied sorts last; a local insert
/// never meets a tie, its origins are adjacent).
fn order_chars(ctx: &Ctx<'_>, chars: &Chars, a: Lv, b: Lv) -> std::cmp::Ordering {
    let (na, ia) = node_of(ctx, chars, a);
    let (nb, ib) = node_of(ctx, chars, b);
    let key = |n: NodeIdx| (n < ctx.dag.next_idx()).then(|| (*ctx.dag.author(n), ctx.dag.seq(n)));
    match (key(na), key(nb)) {
        (Some(ka), Some(kb)) => ka.cmp(&kb).then(ia.cmp(&ib)),
        (x, y) => y.is_some().cmp(&x.is_some()).then(ia.cmp(&ib)),
    }
}
