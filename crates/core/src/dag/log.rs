//! The content of every node of a history (its operations; a format-1 node
//! whole), kept compressed: sealed segments are packs of consecutive nodes
//! (the same columnar, zstd-compressed encoding that travels on the wire,
//! citing earlier nodes by (author, seq), so no id is stored), and the
//! newest nodes wait decoded in an open tail until there are enough of
//! them to seal.
//!
//! Reading a sealed node decodes its segment; the last few segments decoded
//! are kept, so walks along the history (replay, export, recomputing ids)
//! decode each segment once.

use std::cell::RefCell;
use std::sync::Arc;

use crate::dag::runs::Runs;
use crate::dag::{NodeIdx, Segment};
use crate::ids::{AuthorId, RoomId};
use crate::node::{Node, NodeFormat};
use crate::pack::{self, ParentRef, RawNode};

/// A tail of this many nodes is sealed.
const SEAL_NODES: usize = 512;
/// A tail holding about this many bytes of content is sealed, however few
/// its nodes (large pastes).
const SEAL_BYTES: usize = 256 * 1024;
/// zstd level of sealed segments: the fastest, since sealing is on the
/// commit path (a store recompresses what it keeps for long).
const SEAL_LEVEL: i32 = 1;
/// Decoded segments kept for the next reads, at most this many nodes and
/// about this many bytes of content in all (stored segments can be large).
const DECODED_NODES: usize = 16 * 1024;
const DECODED_BYTES: usize = 8 << 20;

/// A sealed segment decoded: its index, nodes and their content bytes.
type Decoded = (usize, Arc<[Node]>, usize);

/// See the module docs.
#[derive(Clone, Debug, Default)]
pub(crate) struct Log {
    pub(crate) segments: Vec<Segment>,
    /// Nodes `tail_start..`, format-2 ones without their parents (the
    /// runs have them).
    tail: Vec<Node>,
    tail_start: NodeIdx,
    /// About how many bytes the tail's content takes.
    tail_bytes: usize,
    /// Sealed segments decoded lately, newest last.
    decoded: RefCell<Vec<Decoded>>,
}

impl Log {
    /// A log of stored segments (consecutive from node 0, each a pack of
    /// its nodes) and an empty tail.
    pub(crate) fn from_segments(segments: Vec<Segment>) -> Log {
        let tail_start = segments.last().map_or(0, |s| s.start + s.len);
        Log {
            segments,
            tail_start,
            ..Log::default()
        }
    }

    pub(crate) fn len(&self) -> NodeIdx {
        self.tail_start + self.tail.len() as NodeIdx
    }

    /// Bytes the sealed segments take.
    pub(crate) fn sealed_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.pack.len()).sum()
    }

    /// Appends the content of node `len()`; a format-2 node's parents are
    /// dropped (the runs keep them).
    pub(crate) fn push(&mut self, mut node: Node) {
        if node.format == NodeFormat::V2 {
            node.parents = Vec::new();
        }
        self.tail_bytes += 64 + content_bytes(&node);
        self.tail.push(node);
    }

    /// Whether the tail is due to be sealed.
    pub(crate) fn wants_seal(&self) -> bool {
        self.tail.len() >= SEAL_NODES || self.tail_bytes >= SEAL_BYTES
    }

    /// Seals the tail into a segment. `runs` and `authors` give the
    /// parents of its nodes.
    pub(crate) fn seal(&mut self, room: &RoomId, runs: &Runs, authors: &[AuthorId]) {
        if self.tail.is_empty() {
            return;
        }
        let start = self.tail_start;
        let raw: Vec<RawNode> = std::mem::take(&mut self.tail)
            .into_iter()
            .enumerate()
            .map(|(i, node)| RawNode {
                parent_refs: stored_parents(runs, authors, start + i as NodeIdx, start, &node),
                node,
            })
            .collect();
        let pack = pack::encode(room, &raw, &[], SEAL_LEVEL);
        let len = raw.len() as u32;
        self.segments.push(Segment {
            start,
            len,
            pack: pack.into_boxed_slice(),
        });
        self.tail_start += len;
        self.tail_bytes = 0;
    }

    /// Calls `f` with the content of node `idx` (a format-2 node without
    /// its parents).
    pub(crate) fn with<R>(&self, room: &RoomId, idx: NodeIdx, f: impl FnOnce(&Node) -> R) -> R {
        if idx >= self.tail_start {
            return f(&self.tail[(idx - self.tail_start) as usize]);
        }
        let s = self.segments.partition_point(|s| s.start <= idx) - 1;
        let nodes = self.segment(room, s);
        f(&nodes[(idx - self.segments[s].start) as usize])
    }

    /// The nodes of sealed segment `s`, decoded (or kept from last time).
    fn segment(&self, room: &RoomId, s: usize) -> Arc<[Node]> {
        {
            let mut decoded = self.decoded.borrow_mut();
            if let Some(at) = decoded.iter().position(|(i, ..)| *i == s) {
                let hit = decoded.remove(at);
                let nodes = hit.1.clone();
                decoded.push(hit);
                return nodes;
            }
        }
        let raw = pack::decode_raw(&self.segments[s].pack, room)
            .expect("a sealed segment was encoded by this log");
        let nodes: Arc<[Node]> = raw.nodes.into_iter().map(|r| r.node).collect();
        self.keep_decoded(s, nodes.clone());
        nodes
    }

    fn keep_decoded(&self, s: usize, nodes: Arc<[Node]>) {
        let bytes: usize = nodes.iter().map(content_bytes).sum();
        let mut decoded = self.decoded.borrow_mut();
        let mut kept: usize = decoded.iter().map(|(_, n, _)| n.len()).sum();
        let mut kept_bytes: usize = decoded.iter().map(|(.., b)| b).sum();
        while !decoded.is_empty()
            && (kept + nodes.len() > DECODED_NODES || kept_bytes + bytes > DECODED_BYTES)
        {
            let (_, gone, gone_bytes) = decoded.remove(0);
            kept -= gone.len();
            kept_bytes -= gone_bytes;
        }
        decoded.push((s, nodes, bytes));
    }

    /// Drops the decoded segments kept for the next reads (memory figures
    /// then count only what the log must hold).
    pub(crate) fn forget_decoded(&self) {
        self.decoded.borrow_mut().clear();
    }
}

/// How a segment starting at node `start` stores the parents of node `idx`
/// (content `node`): by position inside it, by (author, seq) before it,
/// none for a format-1 node (whose bytes hold its parents' ids).
pub(crate) fn stored_parents(
    runs: &Runs,
    authors: &[AuthorId],
    idx: NodeIdx,
    start: NodeIdx,
    node: &Node,
) -> Vec<ParentRef> {
    if node.format == NodeFormat::V1 {
        return Vec::new();
    }
    runs.parents(idx)
        .iter()
        .map(|&p| {
            if p >= start {
                ParentRef::InPack((p - start) as usize)
            } else {
                ParentRef::Held(authors[runs.author(p) as usize], runs.seq(p))
            }
        })
        .collect()
}

/// About how many bytes a node's operations take.
pub(crate) fn content_bytes(node: &Node) -> usize {
    use crate::op::Op;
    node.ops
        .iter()
        .map(|op| match op {
            Op::TextInsert { text, .. } => 96 + text.len(),
            Op::Set { value, .. } => 96 + value.approx_size(),
            _ => 96,
        })
        .sum()
}
