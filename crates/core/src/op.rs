//! Document operations: what one node does to the room's tree of entries.
//! See DESIGN.md section 3 for the semantics under concurrency; this module
//! only defines them and their canonical encoding.

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::ids::{AuthorId, EntryId, NodeId};
use crate::limits::{MAX_DELETE_SPANS, MAX_NAME_BYTES, MAX_POSITION_BYTES, MAX_STRING_BYTES};
use crate::node::NodeFormat;
use crate::value::Value;

/// What an entry holds besides fields and children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// Fields and children only.
    Map,
    /// Also a collaborative text.
    Text,
}

impl EntryKind {
    fn code(self) -> u64 {
        match self {
            EntryKind::Map => 0,
            EntryKind::Text => 1,
        }
    }

    fn from_code(code: u64) -> Option<EntryKind> {
        match code {
            0 => Some(EntryKind::Map),
            1 => Some(EntryKind::Text),
            _ => None,
        }
    }

    /// The name used in exports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Map => "map",
            EntryKind::Text => "text",
        }
    }
}

/// The node that inserted a referenced character.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CharNode {
    /// Node format 1: by id; `None` is the node carrying the reference (its
    /// own id cannot appear inside it). Rebuilding such a node's canonical
    /// bytes needs the id of every node it cites, so format 2 names nodes
    /// by (author, seq) instead.
    Id(Option<NodeId>),
    /// Node format 2: by (author, seq), which names one node of a room
    /// (equivocation is refused). `author: None` is the citing node's own
    /// author (with its own seq: the citing node itself).
    Seq {
        /// The author, unless it is the citing node's.
        author: Option<AuthorId>,
        /// The author's sequence number of the node.
        seq: u64,
    },
}

/// A character of a collaborative text: the node that inserted it and the
/// character's index among all characters that node inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CharRef {
    /// The node that inserted it.
    pub node: CharNode,
    /// Index among the characters inserted by that node.
    pub index: u32,
}

/// `len` consecutive characters starting at `start` (same node, consecutive
/// indices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CharSpan {
    /// First character.
    pub start: CharRef,
    /// Number of characters (at least 1).
    pub len: u32,
}

/// A fractional-index key ordering siblings (outlines, lists).
pub type Position = Vec<u8>;

/// One operation of a node.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Creates (or, by path, re-creates) an entry. With `unique == false` the
    /// entry id is derived from (parent, name), so concurrent creates of one
    /// path merge; with `unique == true` it is derived from (node id, op
    /// index) and is always new.
    Create {
        /// Parent entry.
        parent: EntryId,
        /// Name under the parent (no `/`).
        name: String,
        /// What the entry holds.
        kind: EntryKind,
        /// Optional sibling order key.
        position: Option<Position>,
        /// Unique (outline items) or by path.
        unique: bool,
    },
    /// Writes a field (last writer wins; concurrent losers stay visible as
    /// conflicts).
    Set {
        /// Target entry.
        entry: EntryId,
        /// Field name.
        field: String,
        /// New value.
        value: Value,
    },
    /// Removes a field (a write of "absent").
    Unset {
        /// Target entry.
        entry: EntryId,
        /// Field name.
        field: String,
    },
    /// Moves an entry under a new parent and/or name.
    Move {
        /// Entry to move.
        entry: EntryId,
        /// New parent.
        parent: EntryId,
        /// New name.
        name: String,
        /// Optional new sibling order key.
        position: Option<Position>,
    },
    /// Deletes an entry and, from the view, its subtree.
    Delete {
        /// Entry to delete.
        entry: EntryId,
    },
    /// Inserts text between two characters (by id, not position).
    TextInsert {
        /// The text entry.
        entry: EntryId,
        /// The character the text goes after (`None`: the start).
        left: Option<CharRef>,
        /// The character that was right of the insertion point (`None`: the end).
        right: Option<CharRef>,
        /// The text; its characters get indices continuing the node's count.
        text: String,
    },
    /// Deletes characters by id.
    TextDelete {
        /// The text entry.
        entry: EntryId,
        /// Runs of characters to delete.
        spans: Vec<CharSpan>,
    },
}

const TAG_CREATE: u64 = 0;
const TAG_SET: u64 = 1;
const TAG_UNSET: u64 = 2;
const TAG_MOVE: u64 = 3;
const TAG_DELETE: u64 = 4;
const TAG_TEXT_INSERT: u64 = 5;
const TAG_TEXT_DELETE: u64 = 6;

impl Op {
    /// The entry this operation is about (for a create: its parent).
    pub fn target(&self) -> &EntryId {
        match self {
            Op::Create { parent, .. } => parent,
            Op::Set { entry, .. }
            | Op::Unset { entry, .. }
            | Op::Move { entry, .. }
            | Op::Delete { entry }
            | Op::TextInsert { entry, .. }
            | Op::TextDelete { entry, .. } => entry,
        }
    }

    /// A bound on the bytes of this operation's canonical encoding, cheap
    /// to compute (no value is encoded).
    pub fn size_bound(&self) -> usize {
        // Ids, references and headers take well under 256 bytes; a value
        // encodes into at most its approximate size.
        256 + match self {
            Op::Create { name, position, .. } => name.len() + position.as_ref().map_or(0, Vec::len),
            Op::Set { field, value, .. } => field.len() + value.approx_size(),
            Op::Unset { field, .. } => field.len(),
            Op::Move { name, position, .. } => name.len() + position.as_ref().map_or(0, Vec::len),
            Op::Delete { .. } => 0,
            Op::TextInsert { text, .. } => text.len(),
            Op::TextDelete { spans, .. } => 64 * spans.len(),
        }
    }

    /// Characters this operation inserts (each takes one char index).
    pub fn inserted_chars(&self) -> u32 {
        match self {
            Op::TextInsert { text, .. } => text.chars().count() as u32,
            _ => 0,
        }
    }

    /// Appends the canonical encoding.
    pub fn encode(&self, w: &mut Writer) {
        match self {
            Op::Create {
                parent,
                name,
                kind,
                position,
                unique,
            } => {
                w.array(6);
                w.uint(TAG_CREATE);
                w.bin(&parent.0);
                w.str(name);
                w.uint(kind.code());
                encode_position(w, position.as_deref());
                w.bool(*unique);
            }
            Op::Set {
                entry,
                field,
                value,
            } => {
                w.array(4);
                w.uint(TAG_SET);
                w.bin(&entry.0);
                w.str(field);
                value.encode(w);
            }
            Op::Unset { entry, field } => {
                w.array(3);
                w.uint(TAG_UNSET);
                w.bin(&entry.0);
                w.str(field);
            }
            Op::Move {
                entry,
                parent,
                name,
                position,
            } => {
                w.array(5);
                w.uint(TAG_MOVE);
                w.bin(&entry.0);
                w.bin(&parent.0);
                w.str(name);
                encode_position(w, position.as_deref());
            }
            Op::Delete { entry } => {
                w.array(2);
                w.uint(TAG_DELETE);
                w.bin(&entry.0);
            }
            Op::TextInsert {
                entry,
                left,
                right,
                text,
            } => {
                w.array(5);
                w.uint(TAG_TEXT_INSERT);
                w.bin(&entry.0);
                encode_char_ref(w, left.as_ref());
                encode_char_ref(w, right.as_ref());
                w.str(text);
            }
            Op::TextDelete { entry, spans } => {
                w.array(3);
                w.uint(TAG_TEXT_DELETE);
                w.bin(&entry.0);
                w.array(spans.len());
                for span in spans {
                    w.array(2);
                    encode_char_ref(w, Some(&span.start));
                    w.uint(span.len as u64);
                }
            }
        }
    }

    /// The character references of this operation.
    pub fn char_refs(&self) -> impl Iterator<Item = &CharRef> {
        let (left, right, spans) = match self {
            Op::TextInsert { left, right, .. } => (left.as_ref(), right.as_ref(), &[][..]),
            Op::TextDelete { spans, .. } => (None, None, &spans[..]),
            _ => (None, None, &[][..]),
        };
        left.into_iter()
            .chain(right)
            .chain(spans.iter().map(|s| &s.start))
    }

    /// Reads one canonical operation of a node of `format`.
    pub fn decode(r: &mut Reader<'_>, format: NodeFormat) -> Result<Op, DecodeError> {
        let at = r.position();
        let arity = r.array(6)?;
        let tag = r.uint()?;
        let expected = match tag {
            TAG_CREATE => 6,
            TAG_SET => 4,
            TAG_UNSET => 3,
            TAG_MOVE => 5,
            TAG_DELETE => 2,
            TAG_TEXT_INSERT => 5,
            TAG_TEXT_DELETE => 3,
            _ => {
                return Err(DecodeError::Invalid {
                    at,
                    what: "unknown operation",
                });
            }
        };
        if arity != expected {
            return Err(DecodeError::Invalid {
                at,
                what: "operation of the wrong arity",
            });
        }
        Ok(match tag {
            TAG_CREATE => {
                let parent = EntryId(r.bin_array()?);
                let name = decode_name(r)?;
                let kind_at = r.position();
                let kind = EntryKind::from_code(r.uint()?).ok_or(DecodeError::Invalid {
                    at: kind_at,
                    what: "unknown entry kind",
                })?;
                let position = decode_position(r)?;
                let unique = r.bool()?;
                Op::Create {
                    parent,
                    name,
                    kind,
                    position,
                    unique,
                }
            }
            TAG_SET => Op::Set {
                entry: EntryId(r.bin_array()?),
                field: decode_field(r)?,
                value: Value::decode(r)?,
            },
            TAG_UNSET => Op::Unset {
                entry: EntryId(r.bin_array()?),
                field: decode_field(r)?,
            },
            TAG_MOVE => Op::Move {
                entry: EntryId(r.bin_array()?),
                parent: EntryId(r.bin_array()?),
                name: decode_name(r)?,
                position: decode_position(r)?,
            },
            TAG_DELETE => Op::Delete {
                entry: EntryId(r.bin_array()?),
            },
            TAG_TEXT_INSERT => {
                let entry = EntryId(r.bin_array()?);
                let left = decode_char_ref(r, format)?;
                let right = decode_char_ref(r, format)?;
                let text_at = r.position();
                let text = r.str(MAX_STRING_BYTES)?;
                if text.is_empty() {
                    return Err(DecodeError::Invalid {
                        at: text_at,
                        what: "empty text insert",
                    });
                }
                Op::TextInsert {
                    entry,
                    left,
                    right,
                    text: text.to_owned(),
                }
            }
            _ => {
                let entry = EntryId(r.bin_array()?);
                let n = r.array(MAX_DELETE_SPANS)?;
                let mut spans = Vec::with_capacity(n);
                for _ in 0..n {
                    r.array_exact(2)?;
                    let span_at = r.position();
                    let start = decode_char_ref(r, format)?.ok_or(DecodeError::Invalid {
                        at: span_at,
                        what: "delete span without a start",
                    })?;
                    let len = r.u32()?;
                    if len == 0 {
                        return Err(DecodeError::Invalid {
                            at: span_at,
                            what: "empty delete span",
                        });
                    }
                    spans.push(CharSpan { start, len });
                }
                Op::TextDelete { entry, spans }
            }
        })
    }
}

fn encode_position(w: &mut Writer, position: Option<&[u8]>) {
    match position {
        Some(p) => w.bin(p),
        None => w.nil(),
    }
}

fn decode_position(r: &mut Reader<'_>) -> Result<Option<Position>, DecodeError> {
    if r.peek()? == 0xc0 {
        r.nil()?;
        return Ok(None);
    }
    Ok(Some(r.bin(MAX_POSITION_BYTES)?.to_vec()))
}

fn encode_char_ref(w: &mut Writer, c: Option<&CharRef>) {
    let Some(c) = c else {
        return w.nil();
    };
    match &c.node {
        CharNode::Id(node) => {
            w.array(2);
            match node {
                Some(id) => w.bin(&id.0),
                None => w.nil(),
            }
        }
        CharNode::Seq { author, seq } => {
            w.array(3);
            match author {
                Some(a) => w.bin(&a.0),
                None => w.nil(),
            }
            w.uint(*seq);
        }
    }
    w.uint(c.index as u64);
}

/// Reads `nil` as `None`, else a 32-byte binary.
fn decode_optional_key(r: &mut Reader<'_>) -> Result<Option<[u8; 32]>, DecodeError> {
    if r.peek()? == 0xc0 {
        r.nil()?;
        return Ok(None);
    }
    Ok(Some(r.bin_array()?))
}

fn decode_char_ref(r: &mut Reader<'_>, format: NodeFormat) -> Result<Option<CharRef>, DecodeError> {
    if r.peek()? == 0xc0 {
        r.nil()?;
        return Ok(None);
    }
    let node = match format {
        NodeFormat::V1 => {
            r.array_exact(2)?;
            CharNode::Id(decode_optional_key(r)?.map(NodeId))
        }
        NodeFormat::V2 => {
            r.array_exact(3)?;
            let author = decode_optional_key(r)?.map(AuthorId);
            CharNode::Seq {
                author,
                seq: r.uint()?,
            }
        }
    };
    Ok(Some(CharRef {
        node,
        index: r.u32()?,
    }))
}

impl Op {
    /// Whether the operation is within what the decoders accept (so a node
    /// a transaction commits is one every replica's receive path takes,
    /// and its own store reads back), or the limit it breaks.
    pub fn check_limits(&self) -> Result<(), &'static str> {
        let position_ok =
            |p: &Option<Position>| p.as_ref().is_none_or(|p| p.len() <= MAX_POSITION_BYTES);
        let field_ok = |f: &str| !f.is_empty() && f.len() <= MAX_NAME_BYTES;
        match self {
            Op::Create { name, position, .. } | Op::Move { name, position, .. } => {
                if !is_valid_name(name) {
                    return Err("entry name empty, too long or containing '/'");
                }
                if !position_ok(position) {
                    return Err("position longer than the limit");
                }
                Ok(())
            }
            Op::Set { field, value, .. } => {
                if !field_ok(field) {
                    return Err("field name empty or too long");
                }
                value.check_limits()
            }
            Op::Unset { field, .. } if !field_ok(field) => Err("field name empty or too long"),
            Op::Unset { .. } | Op::Delete { .. } => Ok(()),
            Op::TextInsert { text, .. } if text.is_empty() => Err("empty text insert"),
            Op::TextInsert { text, .. } if text.len() > MAX_STRING_BYTES => {
                Err("text insert longer than 128 KiB")
            }
            Op::TextInsert { .. } => Ok(()),
            Op::TextDelete { spans, .. } if spans.len() > MAX_DELETE_SPANS => {
                Err("text delete with too many spans")
            }
            Op::TextDelete { spans, .. } if spans.iter().any(|s| s.len == 0) => {
                Err("empty delete span")
            }
            Op::TextDelete { .. } => Ok(()),
        }
    }
}

/// Whether `name` may name an entry: non-empty, bounded, and free of the
/// path separator (so every entry has a path).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_BYTES && !name.contains('/')
}

fn decode_name(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let at = r.position();
    let name = r.str(MAX_NAME_BYTES)?;
    if !is_valid_name(name) {
        return Err(DecodeError::Invalid {
            at,
            what: "entry name empty or containing '/'",
        });
    }
    Ok(name.to_owned())
}

fn decode_field(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let at = r.position();
    let field = r.str(MAX_NAME_BYTES)?;
    if field.is_empty() {
        return Err(DecodeError::Invalid {
            at,
            what: "empty field name",
        });
    }
    Ok(field.to_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::value::tests::arb_value;
    use proptest::prelude::*;

    fn arb_entry() -> impl Strategy<Value = EntryId> {
        prop_oneof![Just(EntryId::ROOT), any::<[u8; 32]>().prop_map(EntryId)]
    }

    /// References of `format`; own-author references name seq 1, which
    /// every node may cite.
    fn arb_char_ref(format: NodeFormat) -> impl Strategy<Value = CharRef> {
        (
            proptest::option::of(any::<[u8; 32]>()),
            1u64..1 << 40,
            any::<u32>(),
        )
            .prop_map(move |(key, seq, index)| CharRef {
                node: match format {
                    NodeFormat::V1 => CharNode::Id(key.map(NodeId)),
                    NodeFormat::V2 => CharNode::Seq {
                        author: key.map(AuthorId),
                        seq: if key.is_some() { seq } else { 1 },
                    },
                },
                index,
            })
    }

    /// Arbitrary well-formed operations of a node of `format`.
    pub(crate) fn arb_op(format: NodeFormat) -> impl Strategy<Value = Op> {
        let name = "[a-z0-9 ._-]{1,12}";
        let position = proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8));
        prop_oneof![
            (
                arb_entry(),
                name,
                any::<bool>(),
                position.clone(),
                any::<bool>()
            )
                .prop_map(|(parent, name, text, position, unique)| Op::Create {
                    parent,
                    name,
                    kind: if text {
                        EntryKind::Text
                    } else {
                        EntryKind::Map
                    },
                    position,
                    unique,
                }),
            (arb_entry(), name, arb_value()).prop_map(|(entry, field, value)| Op::Set {
                entry,
                field,
                value
            }),
            (arb_entry(), name).prop_map(|(entry, field)| Op::Unset { entry, field }),
            (arb_entry(), arb_entry(), name, position).prop_map(
                |(entry, parent, name, position)| Op::Move {
                    entry,
                    parent,
                    name,
                    position
                }
            ),
            arb_entry().prop_map(|entry| Op::Delete { entry }),
            (
                arb_entry(),
                proptest::option::of(arb_char_ref(format)),
                proptest::option::of(arb_char_ref(format)),
                ".{1,12}"
            )
                .prop_map(|(entry, left, right, text)| Op::TextInsert {
                    entry,
                    left,
                    right,
                    text
                }),
            (
                arb_entry(),
                proptest::collection::vec((arb_char_ref(format), 1u32..100), 0..4)
            )
                .prop_map(|(entry, spans)| Op::TextDelete {
                    entry,
                    spans: spans
                        .into_iter()
                        .map(|(start, len)| CharSpan { start, len })
                        .collect()
                }),
        ]
    }

    proptest! {
        #[test]
        fn ops_roundtrip_canonically(v1 in arb_op(NodeFormat::V1), v2 in arb_op(NodeFormat::V2)) {
            for (op, format) in [(v1, NodeFormat::V1), (v2, NodeFormat::V2)] {
                let mut w = Writer::new();
                op.encode(&mut w);
                let mut r = Reader::new(w.as_bytes());
                let back = Op::decode(&mut r, format).unwrap();
                r.finish().unwrap();
                prop_assert_eq!(back, op);
            }
        }
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let op = Op::Create {
            parent: EntryId::ROOT,
            name: "a/b".into(),
            kind: EntryKind::Map,
            position: None,
            unique: false,
        };
        let mut w = Writer::new();
        op.encode(&mut w);
        assert!(matches!(
            Op::decode(&mut Reader::new(w.as_bytes()), NodeFormat::V2),
            Err(DecodeError::Invalid { .. })
        ));
    }
}
