//! The node: one atomic transaction by one author, and its canonical bytes.
//!
//! A node's id is the BLAKE3-256 hash of its canonical encoding (every field
//! but the signature). The decoder accepts only canonical bytes, so bytes and
//! nodes are in bijection and an id can be recomputed from any other encoding
//! of the same node (the compact pack rebuilds nodes and hashes them again).
//!
//! Two formats exist. Format 2, which every new node uses, cites text
//! characters by (author, seq) of the node that inserted them; format 1 cited
//! them by node id. Rebuilding a format-1 node's bytes (to check its hash or
//! ship it) needs the id of every node it cites, and ids are hashes of
//! bytes, so a replica had to keep every id of its history: 32 bytes a
//! keystroke, which no compact history can afford. Format-1 nodes stay
//! readable, because their ids are what other replicas hold; they may cite
//! only format-1 nodes (all of them predate format 2).

use thiserror::Error;

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::hlc::Hlc;
use crate::ids::{AuthorId, NodeId, RoomId};
use crate::limits::{
    MAX_DELETED_CHARS_PER_NODE, MAX_HLC_WALL_MS, MAX_NODE_BYTES, MAX_OPS_PER_NODE, MAX_PARENTS,
    MAX_ROOM_ID_BYTES,
};
use crate::op::{CharNode, Op};

/// The canonical encoding a node uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeFormat {
    /// Characters cited by node id (nodes written before format 2).
    V1,
    /// Characters cited by (author, seq): what new nodes use.
    V2,
}

/// One transaction of one author in one room.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The canonical encoding (and so how the ops cite characters).
    pub format: NodeFormat,
    /// The room; binds the node to it (no cross-room replay).
    pub room: RoomId,
    /// Who wrote it.
    pub author: AuthorId,
    /// The author's counter in this room: 1, 2, 3, ...
    pub seq: u64,
    /// Sorted, distinct ids of the heads the author had; include the author's
    /// `seq - 1` node.
    pub parents: Vec<NodeId>,
    /// 1 + the largest lamport of the parents (1 for a root).
    pub lamport: u64,
    /// The timestamp of last-writer-wins rules.
    pub hlc: Hlc,
    /// What the transaction does.
    pub ops: Vec<Op>,
}

/// Why node bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum NodeDecodeError {
    /// The bytes exceed [`MAX_NODE_BYTES`].
    #[error("node of {0} bytes exceeds the {MAX_NODE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not canonical MessagePack of the node grammar.
    #[error("malformed node: {0}")]
    Malformed(#[from] DecodeError),
    /// Canonical, but breaks a structural rule.
    #[error("invalid node: {0}")]
    Invalid(&'static str),
}

impl Node {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_buffer(Vec::with_capacity(256));
        self.encode_into(&mut w);
        w.into_bytes()
    }

    /// The canonical encoding of this node with `parents` (sorted) as its
    /// parents: what a history that keeps parents by number hashes.
    pub fn encode_with_parents(&self, parents: &[NodeId]) -> Vec<u8> {
        let mut w = Writer::with_buffer(Vec::with_capacity(256));
        self.encode_parts(&mut w, parents);
        w.into_bytes()
    }

    /// Appends the canonical encoding to `w`.
    pub fn encode_into(&self, w: &mut Writer) {
        self.encode_parts(w, &self.parents);
    }

    fn encode_parts(&self, w: &mut Writer, parents: &[NodeId]) {
        match self.format {
            NodeFormat::V1 => w.array(7),
            NodeFormat::V2 => {
                w.array(8);
                w.uint(2);
            }
        }
        w.str(self.room.as_str());
        w.bin(&self.author.0);
        w.uint(self.seq);
        w.array(parents.len());
        for p in parents {
            w.bin(&p.0);
        }
        w.uint(self.lamport);
        w.array(2);
        w.uint(self.hlc.wall_ms);
        w.uint(self.hlc.counter as u64);
        w.array(self.ops.len());
        for op in &self.ops {
            op.encode(w);
        }
    }

    /// The id of canonical bytes.
    pub fn id_of(bytes: &[u8]) -> NodeId {
        NodeId(*blake3::hash(bytes).as_bytes())
    }

    /// Checks the rules that need no other node: seq and lamport positive,
    /// parents sorted and distinct, bounded counts, a non-root node must
    /// have parents, and character references of the node's format (in
    /// format 2: the author left out when it is the node's own, and no
    /// reference to a later node of its own chain).
    pub fn check_structure(&self) -> Result<(), NodeDecodeError> {
        self.check_content(self.parents.len())?;
        if self.parents.windows(2).any(|w| w[0] >= w[1]) {
            return Err(NodeDecodeError::Invalid("parents not sorted and distinct"));
        }
        Ok(())
    }

    /// What [`Node::check_structure`] checks but the parents' order, for a
    /// node with `parents` parents (a history that keeps parents by number
    /// checks that they are distinct itself).
    pub fn check_content(&self, parents: usize) -> Result<(), NodeDecodeError> {
        self.check_char_refs()?;
        if self.seq == 0 {
            return Err(NodeDecodeError::Invalid("seq must start at 1"));
        }
        if self.lamport == 0 {
            return Err(NodeDecodeError::Invalid("lamport must be at least 1"));
        }
        if parents > MAX_PARENTS {
            return Err(NodeDecodeError::Invalid("too many parents"));
        }
        if self.ops.len() > MAX_OPS_PER_NODE {
            return Err(NodeDecodeError::Invalid("too many operations"));
        }
        for op in &self.ops {
            op.check_limits().map_err(NodeDecodeError::Invalid)?;
        }
        if self.hlc.wall_ms > MAX_HLC_WALL_MS {
            return Err(NodeDecodeError::Invalid("clock beyond the year 10889"));
        }
        let deleted: u64 = self
            .ops
            .iter()
            .map(|op| match op {
                Op::TextDelete { spans, .. } => spans.iter().map(|s| s.len as u64).sum(),
                _ => 0,
            })
            .sum();
        if deleted > MAX_DELETED_CHARS_PER_NODE {
            return Err(NodeDecodeError::Invalid("deletes too many characters"));
        }
        if self.seq > 1 && parents == 0 {
            return Err(NodeDecodeError::Invalid(
                "a later node must cite its predecessor",
            ));
        }
        if (parents == 0) != (self.lamport == 1) {
            return Err(NodeDecodeError::Invalid(
                "lamport 1 exactly for nodes without parents",
            ));
        }
        Ok(())
    }

    fn check_char_refs(&self) -> Result<(), NodeDecodeError> {
        for r in self.ops.iter().flat_map(|op| op.char_refs()) {
            match (self.format, r.node) {
                (NodeFormat::V1, CharNode::Id(_)) => {}
                (NodeFormat::V2, CharNode::Seq { author, seq }) => {
                    if seq == 0 {
                        return Err(NodeDecodeError::Invalid("character cites seq 0"));
                    }
                    if author == Some(self.author) {
                        return Err(NodeDecodeError::Invalid(
                            "character cites its own author by key",
                        ));
                    }
                    if author.is_none() && seq > self.seq {
                        return Err(NodeDecodeError::Invalid(
                            "character cites a later node of its own chain",
                        ));
                    }
                }
                _ => {
                    return Err(NodeDecodeError::Invalid(
                        "character reference of the wrong format",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Decodes canonical bytes (of either format), refusing anything else.
    pub fn decode(bytes: &[u8]) -> Result<Node, NodeDecodeError> {
        if bytes.len() > MAX_NODE_BYTES {
            return Err(NodeDecodeError::TooLarge(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let format_at = r.position();
        let format = match r.array(8)? {
            7 => NodeFormat::V1,
            8 if r.uint()? == 2 => NodeFormat::V2,
            _ => {
                return Err(DecodeError::Invalid {
                    at: format_at,
                    what: "unknown node format",
                }
                .into());
            }
        };
        let room_at = r.position();
        let room = RoomId::new(r.str(MAX_ROOM_ID_BYTES)?).map_err(|_| DecodeError::Invalid {
            at: room_at,
            what: "invalid room id",
        })?;
        let author = AuthorId(r.bin_array()?);
        let seq = r.uint()?;
        let n = r.array(MAX_PARENTS)?;
        let mut parents = Vec::with_capacity(n);
        for _ in 0..n {
            parents.push(NodeId(r.bin_array()?));
        }
        let lamport = r.uint()?;
        r.array_exact(2)?;
        let hlc = Hlc {
            wall_ms: r.uint()?,
            counter: r.u32()?,
        };
        let n = r.array(MAX_OPS_PER_NODE)?;
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(Op::decode(&mut r, format)?);
        }
        r.finish()?;
        let node = Node {
            format,
            room,
            author,
            seq,
            parents,
            lamport,
            hlc,
            ops,
        };
        node.check_structure()?;
        Ok(node)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::op::tests::arb_op;
    use proptest::prelude::*;

    pub(crate) fn arb_node() -> impl Strategy<Value = Node> {
        prop_oneof![arb_node_of(NodeFormat::V1), arb_node_of(NodeFormat::V2)]
    }

    fn arb_node_of(format: NodeFormat) -> impl Strategy<Value = Node> {
        (
            any::<[u8; 32]>(),
            1u64..1_000_000,
            proptest::collection::btree_set(any::<[u8; 32]>(), 1..4),
            0..=MAX_HLC_WALL_MS,
            any::<u32>(),
            proptest::collection::vec(arb_op(format), 0..5),
        )
            .prop_map(move |(author, seq, parents, wall_ms, counter, ops)| Node {
                format,
                room: RoomId::new("room-1").unwrap(),
                author: AuthorId(author),
                seq,
                parents: parents.into_iter().map(NodeId).collect(),
                lamport: seq + 1,
                hlc: Hlc { wall_ms, counter },
                ops,
            })
    }

    proptest! {
        #[test]
        fn nodes_roundtrip_and_ids_are_stable(node in arb_node()) {
            let bytes = node.encode();
            let back = Node::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &node);
            prop_assert_eq!(Node::id_of(&back.encode()), Node::id_of(&bytes));
        }

        #[test]
        fn every_truncation_is_refused(node in arb_node()) {
            let bytes = node.encode();
            for cut in 0..bytes.len() {
                prop_assert!(Node::decode(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn bit_flips_never_panic_and_never_alias(node in arb_node(), flip in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut bytes = node.encode();
            let i = flip.index(bytes.len());
            bytes[i] ^= 1 << bit;
            // Either refused, or a different node whose own encoding is these bytes.
            if let Ok(other) = Node::decode(&bytes) {
                prop_assert_eq!(other.encode(), bytes);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(node) = Node::decode(&bytes) {
                prop_assert_eq!(node.encode(), bytes);
            }
        }
    }

    #[test]
    fn work_and_clock_bounds_are_enforced() {
        use crate::ids::EntryId;
        use crate::op::{CharRef, CharSpan};
        let mut node = Node {
            format: NodeFormat::V2,
            room: RoomId::new("r").unwrap(),
            author: AuthorId([1; 32]),
            seq: 1,
            parents: vec![],
            lamport: 1,
            hlc: Hlc::default(),
            ops: vec![Op::TextDelete {
                entry: EntryId::ROOT,
                spans: vec![CharSpan {
                    start: CharRef {
                        node: CharNode::Seq {
                            author: None,
                            seq: 1,
                        },
                        index: 0,
                    },
                    len: u32::MAX,
                }],
            }],
        };
        assert_eq!(
            Node::decode(&node.encode()),
            Err(NodeDecodeError::Invalid("deletes too many characters"))
        );
        node.ops.clear();
        node.hlc.wall_ms = u64::MAX;
        assert_eq!(
            Node::decode(&node.encode()),
            Err(NodeDecodeError::Invalid("clock beyond the year 10889"))
        );
    }

    #[test]
    fn format_2_references_are_checked() {
        use crate::ids::EntryId;
        use crate::op::CharRef;
        let insert = |node: CharNode| Op::TextInsert {
            entry: EntryId::ROOT,
            left: Some(CharRef { node, index: 0 }),
            right: None,
            text: "x".into(),
        };
        let mut node = Node {
            format: NodeFormat::V2,
            room: RoomId::new("r").unwrap(),
            author: AuthorId([1; 32]),
            seq: 3,
            parents: vec![NodeId([0; 32])],
            lamport: 2,
            hlc: Hlc::default(),
            ops: vec![insert(CharNode::Seq {
                author: None,
                seq: 3,
            })],
        };
        assert_eq!(Node::decode(&node.encode()), Ok(node.clone()));
        for (bad, why) in [
            (
                CharNode::Seq {
                    author: None,
                    seq: 4,
                },
                "character cites a later node of its own chain",
            ),
            (
                CharNode::Seq {
                    author: Some(AuthorId([1; 32])),
                    seq: 1,
                },
                "character cites its own author by key",
            ),
            (
                CharNode::Seq {
                    author: Some(AuthorId([2; 32])),
                    seq: 0,
                },
                "character cites seq 0",
            ),
            (
                CharNode::Id(None),
                "character reference of the wrong format",
            ),
        ] {
            node.ops = vec![insert(bad)];
            assert_eq!(node.check_structure(), Err(NodeDecodeError::Invalid(why)));
        }
        // The two formats never decode as each other.
        node.ops.clear();
        let v2 = node.encode();
        node.format = NodeFormat::V1;
        let v1 = node.encode();
        assert_ne!(v1, v2);
        assert_eq!(Node::decode(&v1).unwrap().format, NodeFormat::V1);
        assert_eq!(Node::decode(&v2).unwrap().format, NodeFormat::V2);
    }

    #[test]
    fn trailing_bytes_and_oversize_are_refused() {
        let node = Node {
            format: NodeFormat::V2,
            room: RoomId::new("r").unwrap(),
            author: AuthorId([1; 32]),
            seq: 1,
            parents: vec![],
            lamport: 1,
            hlc: Hlc::default(),
            ops: vec![],
        };
        let mut bytes = node.encode();
        assert_eq!(Node::decode(&bytes).unwrap(), node);
        bytes.push(0);
        assert_eq!(
            Node::decode(&bytes),
            Err(NodeDecodeError::Malformed(DecodeError::TrailingBytes(1)))
        );
        assert_eq!(
            Node::decode(&vec![0; MAX_NODE_BYTES + 1]),
            Err(NodeDecodeError::TooLarge(MAX_NODE_BYTES + 1))
        );
    }
}
