//! Compact packs: how runs of nodes travel and rest.
//!
//! A pack stores nodes column by column (automerge's habit): each field of
//! every node goes to its own stream, and what the receiver can work out is
//! left out or delta-coded — the author's previous node as parent, `seq + 1`,
//! `lamport + 1`, small clock steps, and character references as steps from
//! the previous reference of the same kind. Runs of keystrokes become runs
//! of identical bytes, which zstd then folds away. The receiver rebuilds each
//! node's canonical bytes and recomputes its id, so ids are never sent for
//! nodes inside the pack.
//!
//! Nodes outside the pack are cited by (author, seq): characters always
//! (format-2 nodes name them that way), parents too when the sender knows
//! the receiver holds them (the receiver supplies their ids, which the
//! canonical bytes need). A parent the receiver may lack also carries its
//! 32-byte id, so the node can be hashed, and wait for it, all the same.
//! Format-1 nodes, which cite characters by id, travel verbatim.
//!
//! Decoding has two steps: [`decode_raw`] reads the columns back into nodes
//! whose outside parents are still references (what a store needs to merge
//! packs, and a room to read its own history), and [`verify`] resolves them,
//! rebuilds and hashes every node and checks the chains and signatures.
//!
//! Authenticity costs one signature per author per pack: the signature is
//! over the author's newest node in the pack, and every earlier node of that
//! author in the pack must be chained to it (consecutive seq, each citing the
//! previous one by id), so the hash chain vouches for them.

use std::io::Read;

use thiserror::Error;

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::codec::varint::{self, Cursor};
use crate::dag::VerifiedNode;
use crate::hlc::Hlc;
use crate::ids::{AuthorId, EntryId, IdMap, NodeId, RoomId, Signature};
use crate::keys;
use crate::limits::{
    MAX_DELETE_SPANS, MAX_NODE_BYTES, MAX_NODES_PER_PACK, MAX_OPS_PER_NODE, MAX_PACK_BYTES,
    MAX_PARENTS, MAX_ROOM_ID_BYTES, MAX_STRING_BYTES,
};
use crate::node::{Node, NodeDecodeError, NodeFormat};
use crate::op::{CharNode, CharRef, CharSpan, EntryKind, Op, is_valid_name};
use crate::value::Value;

const MAGIC: &[u8; 4] = b"SLP1";
const FLAG_ZSTD: u8 = 1;
/// Version of the body layout (version 1 cited outside nodes by id only).
const FORMAT_VERSION: u64 = 2;
/// Bodies smaller than this are not worth a zstd frame.
const COMPRESS_THRESHOLD: usize = 256;
/// The largest zstd window a pack may ask the decoder for (16 MiB).
const MAX_WINDOW_LOG: u32 = 24;

/// Why a pack was refused. Nodes of a refused pack are not applied.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PackError {
    /// Not a pack, or a version this code does not read.
    #[error("not a pack of a known format")]
    BadHeader,
    /// Declared or actual body size over [`MAX_PACK_BYTES`], or too many nodes.
    #[error("pack too large: {0}")]
    TooLarge(&'static str),
    /// The compressed body does not decompress to its declared size.
    #[error("pack body does not decompress")]
    Compression,
    /// The columnar body is malformed.
    #[error("malformed pack: {0}")]
    Malformed(#[from] DecodeError),
    /// A rebuilt node breaks the node rules.
    #[error("invalid node in pack: {0}")]
    Node(#[from] NodeDecodeError),
    /// The pack is for another room.
    #[error("pack is for room {found}, expected {expected}")]
    WrongRoom {
        /// Room asked for.
        expected: RoomId,
        /// Room in the pack.
        found: RoomId,
    },
    /// An author's nodes in the pack are not one contiguous chain.
    #[error("nodes of author {0:?} are not a contiguous chain")]
    BrokenChain(AuthorId),
    /// An author's newest node carries no valid signature.
    #[error("bad or missing signature by {0:?}")]
    BadSignature(AuthorId),
    /// A parent cited as held by the receiver is not held: the sender
    /// assumed what it did not know.
    #[error("pack cites node {seq} of {author:?} as held, and it is not")]
    NotHeld {
        /// Its author.
        author: AuthorId,
        /// Its seq.
        seq: u64,
    },
}

/// zstd level for packs: a good ratio at a few hundred MB/s.
pub const DEFAULT_ZSTD_LEVEL: i32 = 9;

/// Streams of the columnar body, in the order written.
#[derive(Clone, Copy)]
enum S {
    Author,
    Format,
    Seq,
    ParentCount,
    Parent,
    ParentSeq,
    Ids,
    Lamport,
    Wall,
    Counter,
    OpCount,
    OpKind,
    Entry,
    StrLen,
    StrBytes,
    Ref,
    RefSeq,
    RefIndex,
    Value,
    Misc,
}
const STREAMS: usize = 20;

/// `Format` stream values.
const COLUMNAR: u64 = 0;
const VERBATIM: u64 = 1;

/// Low bits of a parent code.
const PARENT_IN_PACK: u64 = 0;
const PARENT_HELD: u64 = 1;
const PARENT_WITH_ID: u64 = 2;
/// Low bits of a character reference code (0 alone: no reference).
const REF_IN_PACK: u64 = 1;
const REF_BY_KEY: u64 = 2;

/// Reference contexts: each delta-codes against its own previous value.
#[derive(Clone, Copy)]
enum RefCtx {
    Left,
    Right,
    Delete,
}

/// Interns 32-byte ids into table indices.
struct Table<T: std::hash::Hash + Eq + Copy> {
    items: Vec<T>,
    index: IdMap<T, u64>,
    /// The last id interned: consecutive ops mostly name the same one.
    last: Option<(T, u64)>,
}

impl<T: std::hash::Hash + Eq + Copy> Default for Table<T> {
    fn default() -> Self {
        Table {
            items: Vec::new(),
            index: IdMap::default(),
            last: None,
        }
    }
}

impl<T: std::hash::Hash + Eq + Copy> Table<T> {
    fn intern(&mut self, t: T) -> u64 {
        if let Some((last, i)) = self.last
            && last == t
        {
            return i;
        }
        let i = *self.index.entry(t).or_insert_with(|| {
            self.items.push(t);
            self.items.len() as u64 - 1
        });
        self.last = Some((t, i));
        i
    }
}

struct Encoder {
    streams: [Vec<u8>; STREAMS],
    authors: Table<AuthorId>,
    entries: Table<EntryId>,
    /// Position of each node of the pack by (author, seq), for characters.
    by_key: IdMap<(AuthorId, u64), u64>,
    last_ref: [i64; 3],
    last_seq: [i64; 3],
}

impl Encoder {
    fn put(&mut self, s: S, v: u64) {
        varint::put(&mut self.streams[s as usize], v);
    }

    fn put_signed(&mut self, s: S, v: i64) {
        varint::put_signed(&mut self.streams[s as usize], v);
    }

    fn entry(&mut self, e: &EntryId) {
        let i = self.entries.intern(*e);
        self.put(S::Entry, i);
    }

    fn string(&mut self, s: &[u8]) {
        self.put(S::StrLen, s.len() as u64);
        self.streams[S::StrBytes as usize].extend_from_slice(s);
    }

    fn optional_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            None => self.put(S::StrLen, 0),
            Some(b) => {
                self.put(S::StrLen, b.len() as u64 + 1);
                self.streams[S::StrBytes as usize].extend_from_slice(b);
            }
        }
    }

    fn parent(&mut self, this: u64, node: &Node, r: &ParentRef) {
        let (author, seq, id) = match *r {
            // Distance back: the author's previous node is usually 1.
            ParentRef::InPack(j) => {
                return self.put(S::Parent, (this - j as u64) << 2 | PARENT_IN_PACK);
            }
            ParentRef::Held(author, seq) => (author, seq, None),
            ParentRef::WithId(author, seq, id) => (author, seq, Some(id)),
        };
        let a = self.authors.intern(author);
        let kind = if id.is_some() {
            PARENT_WITH_ID
        } else {
            PARENT_HELD
        };
        self.put(S::Parent, a << 2 | kind);
        self.put_signed(S::ParentSeq, node.seq as i64 - seq as i64);
        if let Some(id) = id {
            self.streams[S::Ids as usize].extend_from_slice(&id.0);
        }
    }

    fn char_ref(&mut self, node: &Node, c: Option<&CharRef>, ctx: RefCtx) {
        let Some(c) = c else {
            return self.put(S::Ref, 0);
        };
        let CharNode::Seq { author, seq } = c.node else {
            unreachable!("format-1 nodes travel verbatim");
        };
        let key = (author.unwrap_or(node.author), seq);
        let ctx = ctx as usize;
        match self.by_key.get(&key) {
            Some(&j) => {
                let delta = j as i64 - self.last_ref[ctx];
                self.last_ref[ctx] = j as i64;
                let zigzag = ((delta << 1) ^ (delta >> 63)) as u64;
                self.put(S::Ref, zigzag << 2 | REF_IN_PACK);
            }
            None => {
                let a = self.authors.intern(key.0);
                self.put(S::Ref, a << 2 | REF_BY_KEY);
                let delta = seq as i64 - self.last_seq[ctx];
                self.last_seq[ctx] = seq as i64;
                self.put_signed(S::RefSeq, delta);
            }
        }
        self.put(S::RefIndex, c.index as u64);
    }

    fn op(&mut self, node: &Node, op: &Op) {
        let kind_stream = S::OpKind as usize;
        match op {
            Op::Create {
                parent,
                name,
                kind,
                position,
                unique,
            } => {
                self.streams[kind_stream].push(0);
                self.entry(parent);
                self.string(name.as_bytes());
                self.put(
                    S::Misc,
                    (*kind == EntryKind::Text) as u64 | (*unique as u64) << 1,
                );
                self.optional_bytes(position.as_deref());
            }
            Op::Set {
                entry,
                field,
                value,
            } => {
                self.streams[kind_stream].push(1);
                self.entry(entry);
                self.string(field.as_bytes());
                let mut w =
                    Writer::with_buffer(std::mem::take(&mut self.streams[S::Value as usize]));
                value.encode(&mut w);
                self.streams[S::Value as usize] = w.into_bytes();
            }
            Op::Unset { entry, field } => {
                self.streams[kind_stream].push(2);
                self.entry(entry);
                self.string(field.as_bytes());
            }
            Op::Move {
                entry,
                parent,
                name,
                position,
            } => {
                self.streams[kind_stream].push(3);
                self.entry(entry);
                self.entry(parent);
                self.string(name.as_bytes());
                self.optional_bytes(position.as_deref());
            }
            Op::Delete { entry } => {
                self.streams[kind_stream].push(4);
                self.entry(entry);
            }
            Op::TextInsert {
                entry,
                left,
                right,
                text,
            } => {
                self.streams[kind_stream].push(5);
                self.entry(entry);
                self.char_ref(node, left.as_ref(), RefCtx::Left);
                self.char_ref(node, right.as_ref(), RefCtx::Right);
                self.string(text.as_bytes());
            }
            Op::TextDelete { entry, spans } => {
                self.streams[kind_stream].push(6);
                self.entry(entry);
                self.put(S::Misc, spans.len() as u64);
                for span in spans {
                    self.char_ref(node, Some(&span.start), RefCtx::Delete);
                    self.put(S::Misc, span.len as u64);
                }
            }
        }
    }
}

/// Encodes `nodes` (in causal order) into a pack: format-2 nodes with
/// their parents as `parent_refs` (the ids in `node.parents` are not
/// read), format-1 nodes whole. `signatures` pairs positions in `nodes`
/// with their author's signature over that node: one is required on every
/// author's newest node in the pack; more (checkpoints along a long run)
/// are optional, and let whoever stores them later cut the history into
/// smaller vouched-for packs.
pub fn encode(
    room: &RoomId,
    nodes: &[RawNode],
    signatures: &[(usize, Signature)],
    zstd_level: i32,
) -> Vec<u8> {
    let mut enc = Encoder {
        streams: Default::default(),
        authors: Table::default(),
        entries: Table::default(),
        by_key: IdMap::with_capacity_and_hasher(nodes.len(), Default::default()),
        last_ref: [0; 3],
        last_seq: [0; 3],
    };
    let mut prev_seq: IdMap<AuthorId, u64> = IdMap::default();
    let (mut prev_lamport, mut prev_wall) = (0u64, 0u64);
    for (i, raw) in nodes.iter().enumerate() {
        let (i, node) = (i as u64, &raw.node);
        let a = enc.authors.intern(node.author);
        enc.put(S::Author, a);
        enc.by_key.insert((node.author, node.seq), i);
        if node.format == NodeFormat::V1 {
            enc.put(S::Format, VERBATIM);
            enc.string(&node.encode());
        } else {
            enc.put(S::Format, COLUMNAR);
            match prev_seq.get(&node.author) {
                Some(&p) => enc.put_signed(S::Seq, node.seq as i64 - p as i64 - 1),
                None => enc.put(S::Seq, node.seq),
            }
            enc.put(S::ParentCount, raw.parent_refs.len() as u64);
            for r in &raw.parent_refs {
                enc.parent(i, node, r);
            }
            enc.put_signed(S::Lamport, node.lamport.wrapping_sub(prev_lamport) as i64);
            enc.put_signed(S::Wall, node.hlc.wall_ms.wrapping_sub(prev_wall) as i64);
            enc.put(S::Counter, node.hlc.counter as u64);
            enc.put(S::OpCount, node.ops.len() as u64);
            for op in &node.ops {
                enc.op(node, op);
            }
        }
        prev_seq.insert(node.author, node.seq);
        (prev_lamport, prev_wall) = (node.lamport, node.hlc.wall_ms);
    }

    let mut body = Vec::new();
    varint::put(&mut body, FORMAT_VERSION);
    varint::put(&mut body, room.as_str().len() as u64);
    body.extend_from_slice(room.as_str().as_bytes());
    for table in [
        &enc.authors.items.iter().map(|a| a.0).collect::<Vec<_>>(),
        &enc.entries.items.iter().map(|e| e.0).collect(),
    ] {
        varint::put(&mut body, table.len() as u64);
        for item in table {
            body.extend_from_slice(item);
        }
    }
    varint::put(&mut body, nodes.len() as u64);
    for s in &enc.streams {
        varint::put(&mut body, s.len() as u64);
        body.extend_from_slice(s);
    }
    varint::put(&mut body, signatures.len() as u64);
    for (at, sig) in signatures {
        varint::put(&mut body, *at as u64);
        body.extend_from_slice(&sig.0);
    }

    let mut out = Vec::with_capacity(body.len() / 4 + 16);
    out.extend_from_slice(MAGIC);
    let compressed = (body.len() >= COMPRESS_THRESHOLD)
        .then(|| compress(&body, zstd_level))
        .flatten()
        .filter(|c| c.len() < body.len() && body.len() <= crate::limits::max_inflated(c.len()));
    out.push(if compressed.is_some() { FLAG_ZSTD } else { 0 });
    varint::put(&mut out, body.len() as u64);
    out.extend_from_slice(compressed.as_deref().unwrap_or(&body));
    out
}

thread_local! {
    /// A zstd context per thread, reused: creating one costs more than
    /// compressing a small pack.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(body: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = slot.as_mut()?;
        compressor.compress(body).ok()
    })
}

/// What a pack's body will take once decompressed, as far as a receiver
/// lets it: its declared size, at most [`crate::limits::max_inflated`] of
/// its compressed size (a body declaring more is refused before it
/// inflates). `None` if the header does not parse. A relay reserves this
/// much of its inflation budget before it steps the pack.
pub fn inflated_len(pack: &[u8]) -> Option<usize> {
    if pack.len() < 5 || &pack[..4] != MAGIC {
        return None;
    }
    let mut c = Cursor::new(&pack[5..]);
    let declared = usize::try_from(c.get().ok()?).ok()?;
    Some(declared.min(crate::limits::max_inflated(c.rest().len())))
}

fn decompress(pack: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, PackError> {
    if pack.len() < 5 || &pack[..4] != MAGIC {
        return Err(PackError::BadHeader);
    }
    let flags = pack[4];
    let mut c = Cursor::new(&pack[5..]);
    let raw_len = c.get().map_err(|_| PackError::BadHeader)?;
    if raw_len > MAX_PACK_BYTES as u64 {
        return Err(PackError::TooLarge("declared body size"));
    }
    let data = c.rest();
    match flags {
        0 if data.len() as u64 == raw_len => Ok(data.into()),
        0 => Err(PackError::Compression),
        FLAG_ZSTD if raw_len > crate::limits::max_inflated(data.len()) as u64 => {
            Err(PackError::TooLarge("compression ratio"))
        }
        FLAG_ZSTD => {
            let mut dec =
                zstd::stream::read::Decoder::new(data).map_err(|_| PackError::Compression)?;
            dec.window_log_max(MAX_WINDOW_LOG)
                .map_err(|_| PackError::Compression)?;
            // Grow with what actually decompresses, never with the claim.
            let mut out = Vec::with_capacity((raw_len as usize).min(data.len() * 16 + (1 << 20)));
            dec.take(raw_len + 1)
                .read_to_end(&mut out)
                .map_err(|_| PackError::Compression)?;
            if out.len() as u64 != raw_len {
                return Err(PackError::Compression);
            }
            Ok(out.into())
        }
        _ => Err(PackError::BadHeader),
    }
}

/// How a packed node names one of its parents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentRef {
    /// An earlier node of the same pack, by position.
    InPack(usize),
    /// A node the receiver holds, by (author, seq).
    Held(AuthorId, u64),
    /// A node the receiver may lack: (author, seq) and its id.
    WithId(AuthorId, u64, NodeId),
}

/// A node read back from a pack's columns, before hashing.
#[derive(Clone, Debug, PartialEq)]
pub struct RawNode {
    /// The node. For a format-2 node `parents` is empty: they are in
    /// `parent_refs`, to be resolved to ids by [`verify`]. A format-1 node
    /// came verbatim, ids and all.
    pub node: Node,
    /// The parents of a format-2 node, in canonical order once resolved.
    pub parent_refs: Vec<ParentRef>,
}

/// A pack's content before verification.
#[derive(Clone, Debug, PartialEq)]
pub struct RawPack {
    /// The room the pack is for.
    pub room: RoomId,
    /// The nodes, in pack (causal) order.
    pub nodes: Vec<RawNode>,
    /// Signatures by position in `nodes`.
    pub signatures: Vec<(usize, Signature)>,
}

/// A decoded, verified pack.
#[derive(Debug)]
pub struct DecodedPack {
    /// The room the pack is for.
    pub room: RoomId,
    /// Nodes in pack (causal) order, each with its recomputed id; the newest
    /// node of each author carries the signature that vouched for the run.
    pub nodes: Vec<VerifiedNode>,
}

struct Decoder<'a> {
    streams: Vec<Cursor<'a>>,
    authors: Vec<AuthorId>,
    entries: Vec<EntryId>,
    /// (author, seq) of the nodes decoded so far.
    keys: Vec<(AuthorId, u64)>,
    last_ref: [i64; 3],
    last_seq: [i64; 3],
}

fn invalid(what: &'static str) -> PackError {
    PackError::Malformed(DecodeError::Invalid { at: 0, what })
}

impl<'a> Decoder<'a> {
    fn get(&mut self, s: S) -> Result<u64, PackError> {
        Ok(self.streams[s as usize].get()?)
    }

    fn get_signed(&mut self, s: S) -> Result<i64, PackError> {
        Ok(self.streams[s as usize].get_signed()?)
    }

    fn author(&self, i: u64) -> Result<AuthorId, PackError> {
        self.authors
            .get(i as usize)
            .copied()
            .ok_or(invalid("author index out of range"))
    }

    fn entry(&mut self) -> Result<EntryId, PackError> {
        let i = self.get(S::Entry)?;
        self.entries
            .get(i as usize)
            .copied()
            .ok_or(invalid("entry index out of range"))
    }

    fn string(&mut self, max: usize) -> Result<&'a str, PackError> {
        let b = self.raw_string(max)?;
        std::str::from_utf8(b).map_err(|_| PackError::Malformed(DecodeError::InvalidUtf8(0)))
    }

    fn raw_string(&mut self, max: usize) -> Result<&'a [u8], PackError> {
        let n = self.get(S::StrLen)? as usize;
        if n > max {
            return Err(invalid("string over its limit"));
        }
        Ok(self.streams[S::StrBytes as usize].bytes(n)?)
    }

    fn optional_bytes(&mut self, max: usize) -> Result<Option<Vec<u8>>, PackError> {
        let n = self.get(S::StrLen)? as usize;
        if n == 0 {
            return Ok(None);
        }
        if n - 1 > max {
            return Err(invalid("bytes over their limit"));
        }
        Ok(Some(
            self.streams[S::StrBytes as usize].bytes(n - 1)?.to_vec(),
        ))
    }

    fn parent(&mut self, this: usize, seq: u64) -> Result<ParentRef, PackError> {
        let code = self.get(S::Parent)?;
        let x = code >> 2;
        match code & 3 {
            PARENT_IN_PACK => {
                if x == 0 || x > this as u64 {
                    return Err(invalid("parent reference out of range"));
                }
                Ok(ParentRef::InPack(this - x as usize))
            }
            kind @ (PARENT_HELD | PARENT_WITH_ID) => {
                let author = self.author(x)?;
                let delta = self.get_signed(S::ParentSeq)?;
                let parent_seq = seq
                    .checked_add_signed(-delta)
                    .filter(|&s| s > 0)
                    .ok_or(invalid("parent seq out of range"))?;
                if kind == PARENT_HELD {
                    Ok(ParentRef::Held(author, parent_seq))
                } else {
                    let id = NodeId(self.streams[S::Ids as usize].array::<32>()?);
                    Ok(ParentRef::WithId(author, parent_seq, id))
                }
            }
            _ => Err(invalid("unknown parent reference kind")),
        }
    }

    fn char_ref(&mut self, this: usize, ctx: RefCtx) -> Result<Option<CharRef>, PackError> {
        let code = self.get(S::Ref)?;
        if code == 0 {
            return Ok(None);
        }
        let ctx = ctx as usize;
        let x = code >> 2;
        let (author, seq) = match code & 3 {
            REF_IN_PACK => {
                let delta = ((x >> 1) as i64) ^ -((x & 1) as i64);
                let j = self.last_ref[ctx]
                    .checked_add(delta)
                    .ok_or(invalid("reference delta overflows"))?;
                self.last_ref[ctx] = j;
                match usize::try_from(j) {
                    Ok(j) if j <= this => self.keys[j],
                    _ => return Err(invalid("character reference out of range")),
                }
            }
            REF_BY_KEY => {
                let author = self.author(x)?;
                let seq = self.last_seq[ctx]
                    .checked_add(self.get_signed(S::RefSeq)?)
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or(invalid("character seq out of range"))?;
                self.last_seq[ctx] = seq as i64;
                (author, seq)
            }
            _ => return Err(invalid("unknown character reference kind")),
        };
        let own = self.keys[this].0;
        let index = self.streams[S::RefIndex as usize].get_u32()?;
        Ok(Some(CharRef {
            node: CharNode::Seq {
                author: (author != own).then_some(author),
                seq,
            },
            index,
        }))
    }

    fn op(&mut self, this: usize) -> Result<Op, PackError> {
        let kind = self.streams[S::OpKind as usize].bytes(1)?[0];
        Ok(match kind {
            0 => {
                let parent = self.entry()?;
                let name = self.name()?;
                let flags = self.get(S::Misc)?;
                if flags > 3 {
                    return Err(invalid("unknown create flags"));
                }
                Op::Create {
                    parent,
                    name,
                    kind: if flags & 1 == 1 {
                        EntryKind::Text
                    } else {
                        EntryKind::Map
                    },
                    unique: flags & 2 == 2,
                    position: self.optional_bytes(crate::limits::MAX_POSITION_BYTES)?,
                }
            }
            1 => {
                let entry = self.entry()?;
                let field = self.field()?;
                let vs = &mut self.streams[S::Value as usize];
                let mut r = Reader::new(vs.rest());
                let value = Value::decode(&mut r)?;
                vs.advance(r.position());
                Op::Set {
                    entry,
                    field,
                    value,
                }
            }
            2 => Op::Unset {
                entry: self.entry()?,
                field: self.field()?,
            },
            3 => Op::Move {
                entry: self.entry()?,
                parent: self.entry()?,
                name: self.name()?,
                position: self.optional_bytes(crate::limits::MAX_POSITION_BYTES)?,
            },
            4 => Op::Delete {
                entry: self.entry()?,
            },
            5 => {
                let entry = self.entry()?;
                let left = self.char_ref(this, RefCtx::Left)?;
                let right = self.char_ref(this, RefCtx::Right)?;
                let text = self.string(MAX_STRING_BYTES)?;
                if text.is_empty() {
                    return Err(invalid("empty text insert"));
                }
                Op::TextInsert {
                    entry,
                    left,
                    right,
                    text: text.to_owned(),
                }
            }
            6 => {
                let entry = self.entry()?;
                let n = self.get(S::Misc)? as usize;
                if n > MAX_DELETE_SPANS {
                    return Err(invalid("too many delete spans"));
                }
                let mut spans = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let start = self
                        .char_ref(this, RefCtx::Delete)?
                        .ok_or(invalid("delete span without a start"))?;
                    let len = u32::try_from(self.get(S::Misc)?)
                        .ok()
                        .filter(|&l| l > 0)
                        .ok_or(invalid("bad delete span length"))?;
                    spans.push(CharSpan { start, len });
                }
                Op::TextDelete { entry, spans }
            }
            _ => return Err(invalid("unknown operation kind")),
        })
    }

    fn name(&mut self) -> Result<String, PackError> {
        let s = self.string(crate::limits::MAX_NAME_BYTES)?;
        if !is_valid_name(s) {
            return Err(invalid("bad entry name"));
        }
        Ok(s.to_owned())
    }

    fn field(&mut self) -> Result<String, PackError> {
        let s = self.string(crate::limits::MAX_NAME_BYTES)?;
        if s.is_empty() {
            return Err(invalid("empty field name"));
        }
        Ok(s.to_owned())
    }

    /// Reads node `i`'s columns (after its author).
    fn node(
        &mut self,
        i: usize,
        room: &RoomId,
        author: AuthorId,
        prev_seq: Option<u64>,
        prev: &mut (u64, u64),
    ) -> Result<RawNode, PackError> {
        if self.get(S::Format)? == VERBATIM {
            let bytes = self.raw_string(MAX_NODE_BYTES)?;
            let node = Node::decode(bytes)?;
            if node.format != NodeFormat::V1 || node.author != author || &node.room != room {
                return Err(invalid("verbatim node does not match its columns"));
            }
            self.keys.push((author, node.seq));
            *prev = (node.lamport, node.hlc.wall_ms);
            return Ok(RawNode {
                node,
                parent_refs: Vec::new(),
            });
        }
        let seq = match prev_seq {
            Some(p) => {
                let delta = self.get_signed(S::Seq)?;
                p.checked_add(1)
                    .and_then(|s| s.checked_add_signed(delta))
                    .ok_or(invalid("seq delta overflows"))?
            }
            None => self.get(S::Seq)?,
        };
        self.keys.push((author, seq));
        let pc = self.get(S::ParentCount)? as usize;
        if pc > MAX_PARENTS {
            return Err(invalid("too many parents"));
        }
        let mut parent_refs = Vec::with_capacity(pc);
        for _ in 0..pc {
            parent_refs.push(self.parent(i, seq)?);
        }
        let lamport = prev.0.wrapping_add(self.get_signed(S::Lamport)? as u64);
        let wall_ms = prev.1.wrapping_add(self.get_signed(S::Wall)? as u64);
        let counter =
            u32::try_from(self.get(S::Counter)?).map_err(|_| invalid("counter over u32"))?;
        *prev = (lamport, wall_ms);
        let oc = self.get(S::OpCount)? as usize;
        if oc > MAX_OPS_PER_NODE {
            return Err(invalid("too many operations"));
        }
        let mut ops = Vec::with_capacity(oc.min(16));
        for _ in 0..oc {
            ops.push(self.op(i)?);
        }
        Ok(RawNode {
            node: Node {
                format: NodeFormat::V2,
                room: room.clone(),
                author,
                seq,
                parents: Vec::new(),
                lamport,
                hlc: Hlc { wall_ms, counter },
                ops,
            },
            parent_refs,
        })
    }
}

fn read_table<const N: usize>(c: &mut Cursor<'_>) -> Result<Vec<[u8; N]>, PackError> {
    let n = c.get_count(N, c.remaining())?;
    (0..n).map(|_| Ok(c.array::<N>()?)).collect()
}

/// Reads a pack for `room` back into nodes without hashing anything: the
/// columns are checked (every length against what remains and its limit),
/// the rules that need no id are not (see [`verify`]).
pub fn decode_raw(pack: &[u8], room: &RoomId) -> Result<RawPack, PackError> {
    let body = decompress(pack)?;
    let mut c = Cursor::new(&body);
    if c.get()? != FORMAT_VERSION {
        return Err(PackError::BadHeader);
    }
    let room_len = c.get_count(1, MAX_ROOM_ID_BYTES)?;
    let found = std::str::from_utf8(c.bytes(room_len)?)
        .ok()
        .and_then(|s| RoomId::new(s).ok())
        .ok_or(invalid("bad room id"))?;
    if &found != room {
        return Err(PackError::WrongRoom {
            expected: room.clone(),
            found,
        });
    }
    let authors = read_table::<32>(&mut c)?
        .into_iter()
        .map(AuthorId)
        .collect();
    let entries = read_table::<32>(&mut c)?.into_iter().map(EntryId).collect();
    let n = c.get()? as usize;
    if n > MAX_NODES_PER_PACK {
        return Err(PackError::TooLarge("node count"));
    }
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let len = c.get_count(1, c.remaining())?;
        streams.push(Cursor::new(c.bytes(len)?));
    }
    // Every node takes at least one byte in each per-node stream.
    if n > streams[S::Author as usize].remaining() {
        return Err(invalid("node count exceeds the author stream"));
    }
    let mut d = Decoder {
        streams,
        authors,
        entries,
        keys: Vec::with_capacity(n),
        last_ref: [0; 3],
        last_seq: [0; 3],
    };
    let mut nodes: Vec<RawNode> = Vec::with_capacity(n);
    let mut prev_seq: IdMap<AuthorId, u64> = IdMap::default();
    let mut prev = (0u64, 0u64);
    for i in 0..n {
        let a = d.get(S::Author)?;
        let author = d.author(a)?;
        let raw = d.node(i, room, author, prev_seq.get(&author).copied(), &mut prev)?;
        prev_seq.insert(author, raw.node.seq);
        nodes.push(raw);
    }
    for s in &d.streams {
        s.finish()?;
    }
    let sig_count = c.get_count(65, c.remaining())?;
    if sig_count > nodes.len() {
        return Err(invalid("more signatures than nodes"));
    }
    let mut signatures = Vec::with_capacity(sig_count);
    for _ in 0..sig_count {
        let at = c.get()? as usize;
        if at >= nodes.len() {
            return Err(invalid("signature for a node outside the pack"));
        }
        signatures.push((at, Signature(c.array::<64>()?)));
    }
    c.finish()?;
    Ok(RawPack {
        room: found,
        nodes,
        signatures,
    })
}

/// Rebuilds and hashes every node of `raw`, resolving parents cited as
/// held through `held` (the receiver's id of its node (author, seq)), and
/// checks that each author's run is a chain whose newest node is signed.
/// DAG-level rules (lamport, chain against held history, equivocation) are
/// checked on insertion.
pub fn verify(
    raw: RawPack,
    held: &dyn Fn(&AuthorId, u64) -> Option<NodeId>,
) -> Result<DecodedPack, PackError> {
    let mut nodes: Vec<VerifiedNode> = Vec::with_capacity(raw.nodes.len());
    // Per author: index in `nodes` of its newest node so far.
    let mut newest: IdMap<AuthorId, usize> = IdMap::default();
    for RawNode {
        mut node,
        parent_refs,
    } in raw.nodes
    {
        // Parents travel in any order; the canonical one is by id.
        let mut parents = Vec::with_capacity(parent_refs.len());
        for r in parent_refs {
            let (key, id) = match r {
                ParentRef::InPack(j) => {
                    let p = nodes
                        .get(j)
                        .ok_or(invalid("parent reference out of range"))?;
                    ((p.node.author, p.node.seq), p.id)
                }
                ParentRef::Held(author, seq) => (
                    (author, seq),
                    held(&author, seq).ok_or(PackError::NotHeld { author, seq })?,
                ),
                ParentRef::WithId(author, seq, id) => ((author, seq), id),
            };
            parents.push((id, key));
        }
        if node.format == NodeFormat::V2 {
            parents.sort_unstable();
            node.parents = parents.iter().map(|(id, _)| *id).collect();
        }
        let parent_keys = parents.into_iter().map(|(_, key)| key).collect();
        node.check_structure()?;
        let bytes = node.encode();
        if bytes.len() > MAX_NODE_BYTES {
            return Err(NodeDecodeError::TooLarge(bytes.len()).into());
        }
        let id = Node::id_of(&bytes);
        if let Some(&p) = newest.get(&node.author) {
            let prev = &nodes[p];
            if node.seq != prev.node.seq + 1 || node.parents.binary_search(&prev.id).is_err() {
                return Err(PackError::BrokenChain(node.author));
            }
        }
        newest.insert(node.author, nodes.len());
        nodes.push(VerifiedNode {
            id,
            node,
            sig: None,
            parent_keys,
        });
    }
    // Each signature names a node of the pack; every author's newest node
    // must be among them (it vouches, through the chain, for the rest).
    for (at, sig) in raw.signatures {
        let node = nodes
            .get_mut(at)
            .ok_or(invalid("signature for a node outside the pack"))?;
        let author = node.node.author;
        if node.sig.is_some() || !keys::verify(&author, &node.id, &sig) {
            return Err(PackError::BadSignature(author));
        }
        node.sig = Some(sig);
    }
    for &i in newest.values() {
        if nodes[i].sig.is_none() {
            return Err(PackError::BadSignature(nodes[i].node.author));
        }
    }
    // Runs of an author's nodes before their signature stay short, so
    // whoever relays them can cut them into frames.
    let mut unsigned: IdMap<AuthorId, usize> = IdMap::default();
    for n in &nodes {
        let run = unsigned.entry(n.node.author).or_insert(0);
        *run += crate::dag::content_bytes(&n.node);
        if *run > crate::limits::MAX_UNSIGNED_RUN {
            return Err(PackError::TooLarge("content before a signature"));
        }
        if n.sig.is_some() {
            *run = 0;
        }
    }
    Ok(DecodedPack {
        room: raw.room,
        nodes,
    })
}

/// [`decode_raw`] then [`verify`].
pub fn decode(
    pack: &[u8],
    room: &RoomId,
    held: &dyn Fn(&AuthorId, u64) -> Option<NodeId>,
) -> Result<DecodedPack, PackError> {
    verify(decode_raw(pack, room)?, held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    fn room() -> RoomId {
        RoomId::new("pack-test").unwrap()
    }

    fn nothing_held(_: &AuthorId, _: u64) -> Option<NodeId> {
        None
    }

    /// A packable node: its id, the node, its parents' keys.
    type Built = (NodeId, Node, Vec<(AuthorId, u64)>);

    /// A chain of `n` typing nodes by `k`, each inserting one char after the
    /// previous one, plus a delete and a field write. `base`: the node the
    /// chain continues, as (id, seq, lamport).
    fn typing(k: &Keypair, n: u64, base: Option<(NodeId, u64, u64)>) -> Vec<Built> {
        let text = EntryId::derived(&EntryId::ROOT, "doc");
        let mut out: Vec<Built> = Vec::new();
        let (mut prev, mut seq, mut lamport) = match base {
            Some((id, seq, lamport)) => (Some(id), seq, lamport),
            None => (None, 0, 0),
        };
        for i in 0..n {
            seq += 1;
            lamport += 1;
            let before = CharRef {
                node: CharNode::Seq {
                    author: None,
                    seq: seq - 1,
                },
                index: 0,
            };
            let op = match i % 7 {
                6 => Op::TextDelete {
                    entry: text,
                    spans: vec![CharSpan {
                        start: before,
                        len: 1,
                    }],
                },
                5 => Op::Set {
                    entry: text,
                    field: "title".into(),
                    value: Value::Str(format!("v{i}")),
                },
                _ => Op::TextInsert {
                    entry: text,
                    left: (seq > 1).then_some(before),
                    right: None,
                    text: "x".into(),
                },
            };
            let node = Node {
                format: NodeFormat::V2,
                room: room(),
                author: k.author(),
                seq,
                parents: prev.into_iter().collect(),
                lamport,
                hlc: Hlc {
                    wall_ms: 1_000 + i * 3,
                    counter: 0,
                },
                ops: vec![op],
            };
            let id = Node::id_of(&node.encode());
            let keys = if seq > 1 {
                vec![(k.author(), seq - 1)]
            } else {
                vec![]
            };
            prev = Some(id);
            out.push((id, node, keys));
        }
        out
    }

    /// The nodes as a pack's input: parents inside the list by position,
    /// the others by key (with their id unless `held`).
    fn raws(nodes: &[Built], held: bool) -> Vec<RawNode> {
        nodes
            .iter()
            .map(|(_, node, keys)| RawNode {
                node: node.clone(),
                parent_refs: node
                    .parents
                    .iter()
                    .zip(keys)
                    .map(
                        |(id, &(a, s))| match nodes.iter().position(|(i, _, _)| i == id) {
                            Some(j) => ParentRef::InPack(j),
                            None if held => ParentRef::Held(a, s),
                            None => ParentRef::WithId(a, s, *id),
                        },
                    )
                    .collect(),
            })
            .collect()
    }

    fn pack_of(k: &Keypair, nodes: &[Built]) -> Vec<u8> {
        let sig = k.sign(&nodes.last().unwrap().0);
        encode(
            &room(),
            &raws(nodes, false),
            &[(nodes.len() - 1, sig)],
            DEFAULT_ZSTD_LEVEL,
        )
    }

    #[test]
    fn roundtrip_recomputes_ids_and_compresses() {
        let k = Keypair::from_seed([3; 32]);
        let nodes = typing(&k, 2_000, None);
        let pack = pack_of(&k, &nodes);
        let decoded = decode(&pack, &room(), &nothing_held).unwrap();
        assert_eq!(decoded.nodes.len(), nodes.len());
        for ((id, node, keys), v) in nodes.iter().zip(&decoded.nodes) {
            assert_eq!(&v.id, id);
            assert_eq!(&v.node, node);
            assert_eq!(&v.parent_keys, keys);
        }
        assert!(decoded.nodes.last().unwrap().sig.is_some());
        let canonical: usize = nodes.iter().map(|(_, n, _)| n.encode().len()).sum();
        assert!(
            pack.len() * 20 < canonical,
            "pack {} vs canonical {canonical}",
            pack.len()
        );
    }

    #[test]
    fn continuation_packs_cite_outside_parents_by_key() {
        let k = Keypair::from_seed([3; 32]);
        let first = typing(&k, 10, None);
        let (last_id, last, _) = first.last().unwrap();
        let rest = typing(&k, 10, Some((*last_id, last.seq, last.lamport)));
        let sig = k.sign(&rest[9].0);
        // Not known to be held: the id travels, and no lookup is needed.
        let with_id = encode(&room(), &raws(&rest, false), &[(9, sig)], 3);
        let decoded = decode(&with_id, &room(), &nothing_held).unwrap();
        assert_eq!(decoded.nodes[0].node.parents, vec![*last_id]);
        assert_eq!(decoded.nodes[0].parent_keys, vec![(k.author(), 10)]);
        assert_eq!(decoded.nodes[9].id, rest[9].0);
        // Known to be held: 32 bytes fewer, and the receiver supplies the id.
        let held = encode(&room(), &raws(&rest, true), &[(9, sig)], 3);
        assert!(held.len() + 32 <= with_id.len());
        let lookup = |a: &AuthorId, s: u64| (*a == k.author() && s == 10).then_some(*last_id);
        let decoded = decode(&held, &room(), &lookup).unwrap();
        assert_eq!(decoded.nodes[9].id, rest[9].0);
        assert_eq!(
            decode(&held, &room(), &nothing_held).unwrap_err(),
            PackError::NotHeld {
                author: k.author(),
                seq: 10
            }
        );
    }

    #[test]
    fn format_1_nodes_travel_verbatim() {
        let k = Keypair::from_seed([5; 32]);
        let entry = EntryId::derived(&EntryId::ROOT, "doc");
        let first = Node {
            format: NodeFormat::V1,
            room: room(),
            author: k.author(),
            seq: 1,
            parents: vec![],
            lamport: 1,
            hlc: Hlc::default(),
            ops: vec![Op::TextInsert {
                entry,
                left: None,
                right: None,
                text: "ab".into(),
            }],
        };
        let first_id = Node::id_of(&first.encode());
        let second = Node {
            format: NodeFormat::V1,
            seq: 2,
            parents: vec![first_id],
            lamport: 2,
            hlc: Hlc {
                wall_ms: 1,
                counter: 0,
            },
            ops: vec![Op::TextInsert {
                entry,
                left: Some(CharRef {
                    node: CharNode::Id(Some(first_id)),
                    index: 1,
                }),
                right: None,
                text: "c".into(),
            }],
            ..first.clone()
        };
        let second_id = Node::id_of(&second.encode());
        // A format-2 node after them cites them like any other.
        let third = Node {
            format: NodeFormat::V2,
            seq: 3,
            parents: vec![second_id],
            lamport: 3,
            hlc: Hlc {
                wall_ms: 2,
                counter: 0,
            },
            ops: vec![Op::TextDelete {
                entry,
                spans: vec![CharSpan {
                    start: CharRef {
                        node: CharNode::Seq {
                            author: None,
                            seq: 1,
                        },
                        index: 0,
                    },
                    len: 2,
                }],
            }],
            ..first.clone()
        };
        let third_id = Node::id_of(&third.encode());
        let nodes = [
            RawNode {
                node: first.clone(),
                parent_refs: vec![],
            },
            RawNode {
                node: second.clone(),
                parent_refs: vec![],
            },
            RawNode {
                node: third.clone(),
                parent_refs: vec![ParentRef::InPack(1)],
            },
        ];
        let pack = encode(&room(), &nodes, &[(2, k.sign(&third_id))], 3);
        let decoded = decode(&pack, &room(), &nothing_held).unwrap();
        let got: Vec<(NodeId, &Node)> = decoded.nodes.iter().map(|v| (v.id, &v.node)).collect();
        assert_eq!(
            got,
            vec![(first_id, &first), (second_id, &second), (third_id, &third)]
        );
    }

    #[test]
    fn forged_and_foreign_packs_are_refused() {
        let k = Keypair::from_seed([3; 32]);
        let mallory = Keypair::from_seed([4; 32]);
        let nodes = typing(&k, 5, None);
        let all = raws(&nodes, false);
        let pack = |nodes: &[RawNode], sigs: &[(usize, Signature)]| encode(&room(), nodes, sigs, 3);
        let forged = pack(&all, &[(4, mallory.sign(&nodes[4].0))]);
        assert_eq!(
            decode(&forged, &room(), &nothing_held).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        // A signature on an earlier node is a checkpoint: fine beside the
        // newest's, never instead of it.
        let stale = pack(&all, &[(3, k.sign(&nodes[3].0))]);
        assert_eq!(
            decode(&stale, &room(), &nothing_held).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        let misplaced = pack(&all, &[(4, k.sign(&nodes[3].0))]);
        assert_eq!(
            decode(&misplaced, &room(), &nothing_held).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        let checkpoints = pack(&all, &[(1, k.sign(&nodes[1].0)), (4, k.sign(&nodes[4].0))]);
        let decoded = decode(&checkpoints, &room(), &nothing_held).unwrap();
        assert!(decoded.nodes[1].sig.is_some() && decoded.nodes[4].sig.is_some());
        let unsigned = pack(&all, &[]);
        assert_eq!(
            decode(&unsigned, &room(), &nothing_held).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        let other = RoomId::new("elsewhere").unwrap();
        assert!(matches!(
            decode(&pack_of(&k, &nodes), &other, &nothing_held),
            Err(PackError::WrongRoom { .. })
        ));
        let gap: Vec<Built> = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, r)| r.clone())
            .collect();
        let gap = raws(&gap, false);
        let broken = pack(&gap, &[(3, k.sign(&nodes[4].0))]);
        assert_eq!(
            decode(&broken, &room(), &nothing_held).unwrap_err(),
            PackError::BrokenChain(k.author())
        );
    }

    #[test]
    fn corrupted_packs_never_panic() {
        let k = Keypair::from_seed([3; 32]);
        let pack = pack_of(&k, &typing(&k, 50, None));
        for cut in 0..pack.len() {
            assert!(decode(&pack[..cut], &room(), &nothing_held).is_err());
        }
        for i in 0..pack.len() {
            for bit in [0, 3, 7] {
                let mut p = pack.clone();
                p[i] ^= 1 << bit;
                let _ = decode(&p, &room(), &nothing_held);
            }
        }
        let mut huge = MAGIC.to_vec();
        huge.push(FLAG_ZSTD);
        varint::put(&mut huge, u64::MAX);
        assert_eq!(
            decode(&huge, &room(), &nothing_held).unwrap_err(),
            PackError::TooLarge("declared body size")
        );
    }

    #[test]
    fn a_compression_bomb_is_refused_before_it_inflates() {
        // 64 MiB of zeros compresses to a few kilobytes.
        let zeros = vec![0u8; crate::limits::MAX_PACK_BYTES];
        let bomb_body = zstd::bulk::compress(&zeros, 19).unwrap();
        assert!(bomb_body.len() < 64 << 10);
        let mut bomb = MAGIC.to_vec();
        bomb.push(FLAG_ZSTD);
        varint::put(&mut bomb, zeros.len() as u64);
        bomb.extend_from_slice(&bomb_body);
        assert_eq!(
            decode(&bomb, &room(), &nothing_held).unwrap_err(),
            PackError::TooLarge("compression ratio")
        );
        // What the packer makes always passes: a body that would compress
        // past the ratio is stored raw.
        let k = Keypair::from_seed([4; 32]);
        let mut nodes = typing(&k, 100, None);
        let mut prev = None;
        for (i, (id, node, _)) in nodes.iter_mut().enumerate() {
            node.parents = prev.into_iter().collect();
            node.ops = vec![Op::Set {
                entry: EntryId::derived(&EntryId::ROOT, "doc"),
                field: format!("f{i}"),
                value: Value::Str("a".repeat(100_000)),
            }];
            *id = Node::id_of(&node.encode());
            prev = Some(*id);
        }
        // Signed only at its end, 10 MB of one chain cannot be relayed in
        // frames: refused.
        assert_eq!(
            decode(&pack_of(&k, &nodes), &room(), &nothing_held).unwrap_err(),
            PackError::TooLarge("content before a signature")
        );
        // Signed every 500 KB, as packers do, it passes.
        let sigs: Vec<(usize, Signature)> = (4..100)
            .step_by(5)
            .map(|i| (i, k.sign(&nodes[i].0)))
            .collect();
        let pack = encode(&room(), &raws(&nodes, false), &sigs, DEFAULT_ZSTD_LEVEL);
        assert_eq!(pack[4], 0, "10 MB of one letter is stored raw");
        assert_eq!(
            decode(&pack, &room(), &nothing_held).unwrap().nodes.len(),
            100
        );
    }
}
