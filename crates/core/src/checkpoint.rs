//! Checkpoints: a room's materialized document and history index, saved so
//! that a room opens without replaying its history (DESIGN.md section 8).
//!
//! A checkpoint is `"SLC1"`, its format version, its room, the node count it
//! covers, the state hash of the document it holds, the zstd-compressed
//! body, and a BLAKE3 checksum of everything before it. The body is the history's index
//! (authors, runs, clocks, heads, the ids and signatures kept) and the
//! document (the tree with its placement log, field registers, texts as
//! spans, the characters' numbering), each structure saving and loading
//! itself (`save` / `load` in its module).
//!
//! A room opens from a checkpoint and the stored segments: the segments up
//! to the checkpoint become the history's content as they are, the nodes
//! after it are applied. What a checkpoint says is checked: the checksum,
//! the version, the room, the node count against the segments, and the
//! document's state hash recomputed against the one saved. A checkpoint
//! that fails any check is ignored and the room replays its segments, which
//! gives the same state (the simulator checks it on every seed).

use thiserror::Error;

use crate::codec::varint::{self, Cursor};
use crate::dag::{Dag, NodeIdx, RestoreError, Segment};
use crate::doc::Doc;
use crate::hlc::Hlc;
use crate::ids::RoomId;
use crate::room::Room;

const MAGIC: &[u8; 4] = b"SLC1";
/// Version of the body layout; another version is ignored (the room
/// replays and writes a new one).
pub const CHECKPOINT_VERSION: u64 = 2;
/// Largest body once decompressed.
const MAX_BODY: usize = 1 << 30;
/// zstd level of checkpoints: harder for small bodies, which it costs
/// little, the fastest for large ones: a checkpoint is written on the write
/// path (a replica catching up on 80 MB of text writes one each time its
/// room doubles), and a room of tens of MB is mostly text, which its
/// history holds compressed already.
fn level(body: usize) -> i32 {
    if body <= 4 << 20 { 9 } else { 1 }
}

/// Why a checkpoint was not used.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CheckpointError {
    /// Not a checkpoint, damaged, or inconsistent.
    #[error("corrupt checkpoint: {0}")]
    Corrupt(&'static str),
    /// Written by another version of this code.
    #[error("checkpoint of version {0}")]
    Version(u64),
    /// Of another room, or covering nodes the segments do not hold.
    #[error("checkpoint does not match the stored history: {0}")]
    Stale(&'static str),
    /// The document read back does not hash to what was saved.
    #[error("checkpoint document does not match its state hash")]
    StateHash,
    /// The segments themselves could not be read.
    #[error(transparent)]
    Segments(#[from] RestoreError),
}

/// A checkpoint's header, readable without decoding the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its room.
    pub room: String,
    /// Nodes it covers: the history's first `nodes` nodes.
    pub nodes: u64,
    /// The state hash of its document.
    pub state_hash: [u8; 32],
}

/// Writes a checkpoint body.
#[derive(Debug, Default)]
pub(crate) struct Out(Vec<u8>);

impl Out {
    /// The body written.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub(crate) fn u64(&mut self, v: u64) {
        varint::put(&mut self.0, v);
    }

    pub(crate) fn i64(&mut self, v: i64) {
        varint::put_signed(&mut self.0, v);
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.0.push(v as u8);
    }

    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.raw(bytes);
    }

    pub(crate) fn hlc(&mut self, hlc: Hlc) {
        self.u64(hlc.wall_ms);
        self.u64(hlc.counter as u64);
    }
}

/// Reads a checkpoint body: every count is checked against the bytes left
/// before anything is sized from it.
#[derive(Debug)]
pub(crate) struct In<'a>(Cursor<'a>);

/// What reading a checkpoint body gives.
pub(crate) type Read<T> = Result<T, CheckpointError>;

fn corrupt(_: impl std::fmt::Debug) -> CheckpointError {
    CheckpointError::Corrupt("truncated or malformed body")
}

impl<'a> In<'a> {
    /// A reader of `body`.
    pub(crate) fn new(body: &'a [u8]) -> In<'a> {
        In(Cursor::new(body))
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.0.remaining()
    }

    pub(crate) fn u64(&mut self) -> Read<u64> {
        self.0.get().map_err(corrupt)
    }

    pub(crate) fn i64(&mut self) -> Read<i64> {
        self.0.get_signed().map_err(corrupt)
    }

    pub(crate) fn u32(&mut self) -> Read<u32> {
        u32::try_from(self.u64()?).map_err(corrupt)
    }

    /// A count of items taking at least `unit` bytes each.
    pub(crate) fn count(&mut self, unit: usize) -> Read<usize> {
        self.0
            .get_count(unit.max(1), self.0.remaining())
            .map_err(corrupt)
    }

    pub(crate) fn bool(&mut self) -> Read<bool> {
        match self.0.bytes(1).map_err(corrupt)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(CheckpointError::Corrupt("bad flag")),
        }
    }

    pub(crate) fn raw(&mut self, n: usize) -> Read<&'a [u8]> {
        self.0.bytes(n).map_err(corrupt)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Read<[u8; N]> {
        self.0.array::<N>().map_err(corrupt)
    }

    pub(crate) fn bytes(&mut self) -> Read<&'a [u8]> {
        let n = self.count(1)?;
        self.raw(n)
    }

    pub(crate) fn hlc(&mut self) -> Read<Hlc> {
        Ok(Hlc {
            wall_ms: self.u64()?,
            counter: self.u32()?,
        })
    }
}

/// Reads a checkpoint's header (and checks its checksum): what a store
/// needs to decide whether it is worth loading.
pub fn header(bytes: &[u8]) -> Result<Header, CheckpointError> {
    split(bytes).map(|(header, _)| header)
}

/// The header and the compressed body of a checked checkpoint.
fn split(bytes: &[u8]) -> Result<(Header, &[u8]), CheckpointError> {
    if bytes.len() < 4 + 32 || &bytes[..4] != MAGIC {
        return Err(CheckpointError::Corrupt("not a checkpoint"));
    }
    let (content, checksum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(content).as_bytes() != checksum {
        return Err(CheckpointError::Corrupt("checksum mismatch"));
    }
    let mut c = Cursor::new(&content[4..]);
    let version = c.get().map_err(corrupt)?;
    if version != CHECKPOINT_VERSION {
        return Err(CheckpointError::Version(version));
    }
    let room_len = c
        .get_count(1, crate::limits::MAX_ROOM_ID_BYTES)
        .map_err(corrupt)?;
    let room = std::str::from_utf8(c.bytes(room_len).map_err(corrupt)?)
        .map_err(corrupt)?
        .to_owned();
    let nodes = c.get().map_err(corrupt)?;
    let state_hash = c.array::<32>().map_err(corrupt)?;
    Ok((
        Header {
            room,
            nodes,
            state_hash,
        },
        c.rest(),
    ))
}

impl Room {
    /// A checkpoint of this room: its document and history index as they
    /// are now, covering every node held.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut body = Out::default();
        self.dag().save(&mut body);
        self.doc().save(&mut body);
        let body = body.into_bytes();
        let compressed =
            zstd::bulk::compress(&body, level(body.len())).expect("compressing in memory");
        let mut out = MAGIC.to_vec();
        varint::put(&mut out, CHECKPOINT_VERSION);
        varint::put(&mut out, self.id().as_str().len() as u64);
        out.extend_from_slice(self.id().as_str().as_bytes());
        varint::put(&mut out, self.dag().len() as u64);
        out.extend_from_slice(&self.state_hash());
        out.extend_from_slice(&compressed);
        let checksum = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&checksum);
        out
    }

    /// The room as `checkpoint` saved it, with `segments` (the room's whole
    /// stored history, consecutive from node 0) as its history's content,
    /// and the nodes the segments hold after the checkpoint applied. Fails
    /// (and the caller replays the segments instead) if the checkpoint is
    /// not one of this code's, not this room's, not consistent with the
    /// segments, or if its document does not hash to what it says.
    pub fn from_checkpoint(
        room: RoomId,
        checkpoint: &[u8],
        segments: Vec<Segment>,
    ) -> Result<Room, CheckpointError> {
        let (header, compressed) = split(checkpoint)?;
        if header.room != room.as_str() {
            return Err(CheckpointError::Stale("it is another room's"));
        }
        let stored: u64 = segments.iter().map(|s| s.len as u64).sum();
        if header.nodes > stored {
            return Err(CheckpointError::Stale("it covers nodes not stored"));
        }
        let mut dec = zstd::bulk::Decompressor::new().map_err(corrupt)?;
        let body = dec
            .decompress(compressed, MAX_BODY)
            .map_err(|_| CheckpointError::Corrupt("body does not decompress"))?;
        let mut input = In::new(&body);
        let covered = header.nodes as NodeIdx;
        let mut dag = Dag::load(&mut input, room, covered)?;
        let doc = Doc::load(&mut input, covered)?;
        if input.remaining() != 0 {
            return Err(CheckpointError::Corrupt("trailing bytes"));
        }
        if doc.state_hash(&dag) != header.state_hash {
            return Err(CheckpointError::StateHash);
        }
        // The stored segments are the history's content as they are; the
        // nodes they hold past the checkpoint are read into the index and
        // applied to the document.
        dag.attach_segments(segments)?;
        let mut room = Room::from_parts(dag, doc);
        room.apply_from(covered);
        Ok(room)
    }
}
