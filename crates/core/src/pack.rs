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
//! Authenticity costs one signature per author per pack: the signature is
//! over the author's newest node in the pack, and every earlier node of that
//! author in the pack must be chained to it (consecutive seq, each citing the
//! previous one by id), so the hash chain vouches for them.

use std::collections::HashMap;
use std::io::Read;

use thiserror::Error;

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::codec::varint::{self, Cursor};
use crate::dag::VerifiedNode;
use crate::hlc::Hlc;
use crate::ids::{AuthorId, EntryId, NodeId, RoomId, Signature};
use crate::keys;
use crate::limits::{
    MAX_DELETE_SPANS, MAX_NODES_PER_PACK, MAX_OPS_PER_NODE, MAX_PACK_BYTES, MAX_PARENTS,
    MAX_ROOM_ID_BYTES, MAX_STRING_BYTES,
};
use crate::node::{Node, NodeDecodeError};
use crate::op::{CharRef, CharSpan, EntryKind, Op, is_valid_name};
use crate::value::Value;

const MAGIC: &[u8; 4] = b"SLP1";
const FLAG_ZSTD: u8 = 1;
const FORMAT_VERSION: u64 = 1;
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
}

/// zstd level for packs: a good ratio at a few hundred MB/s.
pub const DEFAULT_ZSTD_LEVEL: i32 = 9;

/// Streams of the columnar body, in the order written.
#[derive(Clone, Copy)]
enum S {
    Author,
    Seq,
    ParentCount,
    Parent,
    Lamport,
    Wall,
    Counter,
    OpCount,
    OpKind,
    Entry,
    StrLen,
    StrBytes,
    Ref,
    RefIndex,
    Value,
    Misc,
}
const STREAMS: usize = 16;

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
    index: HashMap<T, u64>,
}

impl<T: std::hash::Hash + Eq + Copy> Default for Table<T> {
    fn default() -> Self {
        Table {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T: std::hash::Hash + Eq + Copy> Table<T> {
    fn intern(&mut self, t: T) -> u64 {
        *self.index.entry(t).or_insert_with(|| {
            self.items.push(t);
            self.items.len() as u64 - 1
        })
    }
}

struct Encoder {
    streams: [Vec<u8>; STREAMS],
    authors: Table<AuthorId>,
    externals: Table<NodeId>,
    entries: Table<EntryId>,
    in_pack: HashMap<NodeId, u64>,
    last_ref: [i64; 3],
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

    /// A node reference: odd codes are in-pack nodes (delta from the previous
    /// reference of the context), even codes >= 2 are external ids.
    fn node_ref(&mut self, this: u64, node: Option<&NodeId>, ctx: Option<RefCtx>) {
        let j = match node {
            None => Some(this),
            Some(id) => self.in_pack.get(id).copied(),
        };
        match (j, ctx) {
            (Some(j), Some(ctx)) => {
                let delta = j as i64 - self.last_ref[ctx as usize];
                self.last_ref[ctx as usize] = j as i64;
                let code = (((delta << 1) ^ (delta >> 63)) as u64) * 2 + 1;
                self.put(S::Ref, code);
            }
            (Some(j), None) => {
                // Parents: distance back from this node (the author's
                // previous node is usually 1).
                self.put(S::Parent, (this - j) * 2 + 1);
            }
            (None, ctx) => {
                let e = self
                    .externals
                    .intern(*node.expect("external refs name a node"));
                let s = if ctx.is_some() { S::Ref } else { S::Parent };
                self.put(s, e * 2 + 2);
            }
        }
    }

    fn char_ref(&mut self, this: u64, c: Option<&CharRef>, ctx: RefCtx) {
        match c {
            None => self.put(S::Ref, 0),
            Some(c) => {
                self.node_ref(this, c.node.as_ref(), Some(ctx));
                self.put(S::RefIndex, c.index as u64);
            }
        }
    }

    fn op(&mut self, this: u64, op: &Op) {
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
                self.char_ref(this, left.as_ref(), RefCtx::Left);
                self.char_ref(this, right.as_ref(), RefCtx::Right);
                self.string(text.as_bytes());
            }
            Op::TextDelete { entry, spans } => {
                self.streams[kind_stream].push(6);
                self.entry(entry);
                self.put(S::Misc, spans.len() as u64);
                for span in spans {
                    self.char_ref(this, Some(&span.start), RefCtx::Delete);
                    self.put(S::Misc, span.len as u64);
                }
            }
        }
    }
}

/// Encodes `nodes` (in causal order; their ids alongside) into a pack.
/// `signatures` pairs positions in `nodes` with their author's signature
/// over that node: one is required on every author's newest node in the
/// pack; more (checkpoints along a long run) are optional, and let whoever
/// stores them later cut the history into smaller vouched-for packs.
pub fn encode(
    room: &RoomId,
    nodes: &[(NodeId, &Node)],
    signatures: &[(usize, Signature)],
    zstd_level: i32,
) -> Vec<u8> {
    let mut enc = Encoder {
        streams: Default::default(),
        authors: Table::default(),
        externals: Table::default(),
        entries: Table::default(),
        in_pack: HashMap::with_capacity(nodes.len()),
        last_ref: [0; 3],
    };
    let mut prev_seq: HashMap<AuthorId, u64> = HashMap::new();
    let (mut prev_lamport, mut prev_wall) = (0u64, 0u64);
    for (i, (id, node)) in nodes.iter().enumerate() {
        let i = i as u64;
        let a = enc.authors.intern(node.author);
        enc.put(S::Author, a);
        match prev_seq.insert(node.author, node.seq) {
            Some(p) => enc.put_signed(S::Seq, node.seq as i64 - p as i64 - 1),
            None => enc.put(S::Seq, node.seq),
        }
        enc.put(S::ParentCount, node.parents.len() as u64);
        for p in &node.parents {
            enc.node_ref(i, Some(p), None);
        }
        enc.put_signed(S::Lamport, node.lamport.wrapping_sub(prev_lamport) as i64);
        enc.put_signed(S::Wall, node.hlc.wall_ms.wrapping_sub(prev_wall) as i64);
        enc.put(S::Counter, node.hlc.counter as u64);
        (prev_lamport, prev_wall) = (node.lamport, node.hlc.wall_ms);
        enc.put(S::OpCount, node.ops.len() as u64);
        for op in &node.ops {
            enc.op(i, op);
        }
        enc.in_pack.insert(*id, i);
    }

    let mut body = Vec::new();
    varint::put(&mut body, FORMAT_VERSION);
    varint::put(&mut body, room.as_str().len() as u64);
    body.extend_from_slice(room.as_str().as_bytes());
    for table in [
        &enc.authors.items.iter().map(|a| a.0).collect::<Vec<_>>(),
        &enc.externals.items.iter().map(|n| n.0).collect(),
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
        .then(|| zstd::bulk::compress(&body, zstd_level).ok())
        .flatten()
        .filter(|c| c.len() < body.len());
    out.push(if compressed.is_some() { FLAG_ZSTD } else { 0 });
    varint::put(&mut out, body.len() as u64);
    out.extend_from_slice(compressed.as_deref().unwrap_or(&body));
    out
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
    externals: Vec<NodeId>,
    entries: Vec<EntryId>,
    ids: Vec<NodeId>,
    last_ref: [i64; 3],
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

    fn entry(&mut self) -> Result<EntryId, PackError> {
        let i = self.get(S::Entry)?;
        self.entries
            .get(i as usize)
            .copied()
            .ok_or(invalid("entry index out of range"))
    }

    fn string(&mut self, max: usize) -> Result<&'a str, PackError> {
        let n = self.get(S::StrLen)? as usize;
        if n > max {
            return Err(invalid("string over its limit"));
        }
        let b = self.streams[S::StrBytes as usize].bytes(n)?;
        std::str::from_utf8(b).map_err(|_| PackError::Malformed(DecodeError::InvalidUtf8(0)))
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

    fn external(&self, code: u64) -> Result<NodeId, PackError> {
        self.externals
            .get((code / 2 - 1) as usize)
            .copied()
            .ok_or(invalid("external index out of range"))
    }

    fn parent(&mut self, this: usize) -> Result<NodeId, PackError> {
        let code = self.get(S::Parent)?;
        if code % 2 == 1 {
            let back = code / 2;
            if back == 0 || back > this as u64 {
                return Err(invalid("parent reference out of range"));
            }
            return Ok(self.ids[this - back as usize]);
        }
        if code == 0 {
            return Err(invalid("empty parent reference"));
        }
        self.external(code)
    }

    fn char_ref(&mut self, this: usize, ctx: RefCtx) -> Result<Option<CharRef>, PackError> {
        let code = self.get(S::Ref)?;
        if code == 0 {
            return Ok(None);
        }
        let node = if code % 2 == 1 {
            let z = code / 2;
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let j = self.last_ref[ctx as usize]
                .checked_add(delta)
                .ok_or(invalid("reference delta overflows"))?;
            self.last_ref[ctx as usize] = j;
            match usize::try_from(j) {
                Ok(j) if j == this => None,
                Ok(j) if j < this => Some(self.ids[j]),
                _ => return Err(invalid("character reference out of range")),
            }
        } else {
            Some(self.external(code)?)
        };
        let index = self.streams[S::RefIndex as usize].get_u32()?;
        Ok(Some(CharRef { node, index }))
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
}

fn read_table<const N: usize>(c: &mut Cursor<'_>) -> Result<Vec<[u8; N]>, PackError> {
    let n = c.get_count(N, c.remaining())?;
    (0..n).map(|_| Ok(c.array::<N>()?)).collect()
}

/// Decodes and verifies a pack for `room`: rebuilds every node, recomputes
/// its id, checks each author's run is a chain and that its newest node is
/// signed. DAG-level rules (lamport, chain against held history,
/// equivocation) are checked on insertion.
pub fn decode(pack: &[u8], room: &RoomId) -> Result<DecodedPack, PackError> {
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
    let authors: Vec<AuthorId> = read_table::<32>(&mut c)?
        .into_iter()
        .map(AuthorId)
        .collect();
    let externals = read_table::<32>(&mut c)?.into_iter().map(NodeId).collect();
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
        externals,
        entries,
        ids: Vec::with_capacity(n),
        last_ref: [0; 3],
    };
    let mut nodes: Vec<VerifiedNode> = Vec::with_capacity(n);
    // Per author: index in `nodes` of its newest node so far.
    let mut newest: HashMap<u64, usize> = HashMap::new();
    let (mut prev_lamport, mut prev_wall) = (0u64, 0u64);
    for i in 0..n {
        let a = d.get(S::Author)?;
        let author = *d
            .authors
            .get(a as usize)
            .ok_or(invalid("author index out of range"))?;
        let seq = match newest.get(&a) {
            Some(&p) => {
                let delta = d.get_signed(S::Seq)?;
                nodes[p]
                    .node
                    .seq
                    .checked_add(1)
                    .and_then(|s| s.checked_add_signed(delta))
                    .ok_or(invalid("seq delta overflows"))?
            }
            None => d.get(S::Seq)?,
        };
        let pc = d.get(S::ParentCount)? as usize;
        if pc > MAX_PARENTS {
            return Err(invalid("too many parents"));
        }
        let mut parents = Vec::with_capacity(pc);
        for _ in 0..pc {
            parents.push(d.parent(i)?);
        }
        let lamport = prev_lamport.wrapping_add(d.get_signed(S::Lamport)? as u64);
        let wall_ms = prev_wall.wrapping_add(d.get_signed(S::Wall)? as u64);
        let counter = u32::try_from(d.get(S::Counter)?).map_err(|_| invalid("counter over u32"))?;
        (prev_lamport, prev_wall) = (lamport, wall_ms);
        let oc = d.get(S::OpCount)? as usize;
        if oc > MAX_OPS_PER_NODE {
            return Err(invalid("too many operations"));
        }
        let mut ops = Vec::with_capacity(oc.min(16));
        for _ in 0..oc {
            ops.push(d.op(i)?);
        }
        let node = Node {
            room: room.clone(),
            author,
            seq,
            parents,
            lamport,
            hlc: Hlc { wall_ms, counter },
            ops,
        };
        node.check_structure()?;
        let bytes = node.encode();
        if bytes.len() > crate::limits::MAX_NODE_BYTES {
            return Err(NodeDecodeError::TooLarge(bytes.len()).into());
        }
        let id = Node::id_of(&bytes);
        if let Some(&p) = newest.get(&a) {
            let prev = &nodes[p];
            if node.seq != prev.node.seq + 1 || node.parents.binary_search(&prev.id).is_err() {
                return Err(PackError::BrokenChain(author));
            }
        }
        newest.insert(a, i);
        d.ids.push(id);
        nodes.push(VerifiedNode {
            id,
            node,
            bytes,
            sig: None,
        });
    }
    for s in &d.streams {
        s.finish()?;
    }
    // Each signature names a node of the pack; every author's newest node
    // must be among them (it vouches, through the chain, for the rest).
    let sig_count = c.get_count(65, c.remaining())?;
    if sig_count > nodes.len() {
        return Err(invalid("more signatures than nodes"));
    }
    for _ in 0..sig_count {
        let at = c.get()? as usize;
        let sig = Signature(c.array::<64>()?);
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
    c.finish()?;
    Ok(DecodedPack { room: found, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Keypair;

    fn room() -> RoomId {
        RoomId::new("pack-test").unwrap()
    }

    /// A chain of `n` typing nodes by `k`, each inserting one char after the
    /// previous one, plus a delete and a field write.
    fn typing(k: &Keypair, n: u64, base: Option<(NodeId, u64, u64)>) -> Vec<(NodeId, Node)> {
        let text = EntryId::derived(&EntryId::ROOT, "doc");
        let mut out: Vec<(NodeId, Node)> = Vec::new();
        let (mut prev, mut seq, mut lamport) = match base {
            Some((id, seq, lamport)) => (Some(id), seq, lamport),
            None => (None, 0, 0),
        };
        for i in 0..n {
            seq += 1;
            lamport += 1;
            let op = match i % 7 {
                6 => Op::TextDelete {
                    entry: text,
                    spans: vec![CharSpan {
                        start: CharRef {
                            node: prev,
                            index: 0,
                        },
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
                    left: prev.map(|p| CharRef {
                        node: Some(p),
                        index: 0,
                    }),
                    right: None,
                    text: "x".into(),
                },
            };
            let node = Node {
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
            prev = Some(id);
            out.push((id, node));
        }
        out
    }

    fn pack_of(k: &Keypair, nodes: &[(NodeId, Node)]) -> Vec<u8> {
        let refs: Vec<(NodeId, &Node)> = nodes.iter().map(|(i, n)| (*i, n)).collect();
        let sig = k.sign(&nodes.last().unwrap().0);
        encode(
            &room(),
            &refs,
            &[(nodes.len() - 1, sig)],
            DEFAULT_ZSTD_LEVEL,
        )
    }

    #[test]
    fn roundtrip_recomputes_ids_and_compresses() {
        let k = Keypair::from_seed([3; 32]);
        let nodes = typing(&k, 2_000, None);
        let pack = pack_of(&k, &nodes);
        let decoded = decode(&pack, &room()).unwrap();
        assert_eq!(decoded.nodes.len(), nodes.len());
        for ((id, node), v) in nodes.iter().zip(&decoded.nodes) {
            assert_eq!(&v.id, id);
            assert_eq!(&v.node, node);
        }
        assert!(decoded.nodes.last().unwrap().sig.is_some());
        let canonical: usize = nodes.iter().map(|(_, n)| n.encode().len()).sum();
        assert!(
            pack.len() * 20 < canonical,
            "pack {} vs canonical {canonical}",
            pack.len()
        );
    }

    #[test]
    fn continuation_packs_reference_external_parents() {
        let k = Keypair::from_seed([3; 32]);
        let first = typing(&k, 10, None);
        let (last_id, last) = first.last().unwrap();
        let rest = typing(&k, 10, Some((*last_id, last.seq, last.lamport)));
        let decoded = decode(&pack_of(&k, &rest), &room()).unwrap();
        assert_eq!(decoded.nodes[0].node.parents, vec![*last_id]);
        assert_eq!(decoded.nodes[9].id, rest[9].0);
    }

    #[test]
    fn forged_and_foreign_packs_are_refused() {
        let k = Keypair::from_seed([3; 32]);
        let mallory = Keypair::from_seed([4; 32]);
        let nodes = typing(&k, 5, None);
        let refs: Vec<(NodeId, &Node)> = nodes.iter().map(|(i, n)| (*i, n)).collect();
        let forged = encode(&room(), &refs, &[(4, mallory.sign(&nodes[4].0))], 3);
        assert_eq!(
            decode(&forged, &room()).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        // A signature on an earlier node is a checkpoint: fine beside the
        // newest's, never instead of it.
        let stale = encode(&room(), &refs, &[(3, k.sign(&nodes[3].0))], 3);
        assert_eq!(
            decode(&stale, &room()).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        let misplaced = encode(&room(), &refs, &[(4, k.sign(&nodes[3].0))], 3);
        assert_eq!(
            decode(&misplaced, &room()).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        let checkpoints = encode(
            &room(),
            &refs,
            &[(1, k.sign(&nodes[1].0)), (4, k.sign(&nodes[4].0))],
            3,
        );
        let decoded = decode(&checkpoints, &room()).unwrap();
        assert!(decoded.nodes[1].sig.is_some() && decoded.nodes[4].sig.is_some());
        let unsigned = encode(&room(), &refs, &[], 3);
        assert_eq!(
            decode(&unsigned, &room()).unwrap_err(),
            PackError::BadSignature(k.author())
        );
        let other = RoomId::new("elsewhere").unwrap();
        assert!(matches!(
            decode(&pack_of(&k, &nodes), &other),
            Err(PackError::WrongRoom { .. })
        ));
        let gap: Vec<(NodeId, &Node)> = refs
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, r)| r)
            .collect();
        let broken = encode(&room(), &gap, &[(3, k.sign(&nodes[4].0))], 3);
        assert_eq!(
            decode(&broken, &room()).unwrap_err(),
            PackError::BrokenChain(k.author())
        );
    }

    #[test]
    fn corrupted_packs_never_panic() {
        let k = Keypair::from_seed([3; 32]);
        let pack = pack_of(&k, &typing(&k, 50, None));
        for cut in 0..pack.len() {
            assert!(decode(&pack[..cut], &room()).is_err());
        }
        for i in 0..pack.len() {
            for bit in [0, 3, 7] {
                let mut p = pack.clone();
                p[i] ^= 1 << bit;
                let _ = decode(&p, &room());
            }
        }
        let mut huge = MAGIC.to_vec();
        huge.push(FLAG_ZSTD);
        varint::put(&mut huge, u64::MAX);
        assert_eq!(
            decode(&huge, &room()).unwrap_err(),
            PackError::TooLarge("declared body size")
        );
    }
}
