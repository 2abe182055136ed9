//! The envelope and the messages of the sync protocol (`docs/protocol.md`,
//! sections 1 and 3), with their encoding.
//!
//! Frames use the same strict MessagePack reader as nodes: every length is
//! checked against the bytes that remain and a named limit before anything
//! is sized from it. Bodies are maps with string keys so that a newer peer
//! can add fields: unknown keys are skipped, duplicated keys are refused.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::dag::VersionVector;
use crate::ids::{AuthorId, NodeId, RoomId, Signature};
use crate::limits::MAX_ROOM_ID_BYTES;
use crate::recon::KeyPrefix;
use crate::recon::mst::{KeyRange, Summary};

/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest frame accepted or sent.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Most heads listed in a `hello` or `welcome`.
pub const MAX_HEADS: usize = 4096;
/// Most authors in a version vector on the wire.
pub const MAX_VV_ENTRIES: usize = 65_536;
/// Most capabilities, subscriptions or peers listed.
pub const MAX_LIST: usize = 256;
/// Most node ids (or keys) in one `ack`, `request` or `ibf-done`.
pub const MAX_IDS: usize = 65_536;
/// Largest RIBLT probe in a `hello`.
pub const MAX_PROBE_BYTES: usize = 256;
/// Most key ranges in one `mst-request` or `mst-summary`.
pub const MAX_RANGES: usize = 4096;
/// Most keys or sub-ranges in one range's summary.
pub const MAX_SUMMARY_ITEMS: usize = 1024;
/// Longest capability, pattern, reason or message string.
pub const MAX_TEXT_BYTES: usize = 1024;
/// Longest token.
pub const MAX_BLOB_FIELD_BYTES: usize = 64 * 1024;
/// Longest presence message (for people: "in a meeting").
pub const MAX_PRESENCE_MESSAGE: usize = 256;
/// Most bytes of app data in one presence (a cursor, a selection).
pub const MAX_PRESENCE_DATA: usize = 4096;
/// Most group ranges in one `blob-need`.
pub const MAX_BLOB_RANGES: usize = 1024;
/// Largest outboard on the wire: a 4 GiB blob's (one chaining value per
/// 64 KiB group); larger blobs go over direct URLs.
pub const MAX_OUTBOARD_BYTES: usize = 8 + 32 * 65_536;
/// The capability a client names in `hello` to move blob bytes over the
/// session.
pub const BLOB_CAPABILITY: &str = "blob/session@1";
/// The capability a client names in `hello` to receive presence.
pub const PRESENCE_CAPABILITY: &str = "presence@1";
/// Deepest value a newer peer's unknown field may nest.
const MAX_SKIP_DEPTH: usize = 8;
/// Message types at or above this are optional: unknown ones are ignored.
pub const FIRST_OPTIONAL_TYPE: u64 = 64;

/// Why a frame was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not the envelope or body grammar.
    #[error("malformed frame: {0}")]
    Malformed(#[from] DecodeError),
    /// A required message type this version does not know.
    #[error("unknown required message type {0}")]
    UnknownType(u64),
    /// A required body field is absent.
    #[error("message lacks field {0:?}")]
    Missing(&'static str),
    /// A body field appears twice.
    #[error("field {0:?} appears twice")]
    Duplicate(String),
    /// A field that decodes but is not valid (a bad room id, a bad phase).
    #[error("invalid field {0:?}")]
    Invalid(&'static str),
}

/// Typed reasons for `reject`, `error` and `close` (`docs/protocol.md` §6).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No common protocol version.
    VersionMismatch,
    /// A frame or body that does not decode.
    Malformed,
    /// No right to read, or to write these paths.
    Unauthorized,
    /// The token expired.
    TokenExpired,
    /// A locked room and no token.
    RoomLocked,
    /// Ingress above the peer's rate.
    RateLimited,
    /// The outbound queue overflowed: reconnect and catch up.
    Lagging,
    /// The server sheds load.
    Overloaded,
    /// A room or the server is out of its disk quota: nothing more is
    /// accepted until an operator raises it.
    QuotaExceeded,
    /// A frame or pack over its limit.
    TooLarge,
    /// A node failed validation.
    InvalidNode,
    /// Two nodes with one (author, seq).
    Equivocation,
    /// Handshake or idle timeout.
    Timeout,
    /// The server is stopping.
    ShuttingDown,
    /// The client stopped syncing the room (the connection goes on).
    Left,
    /// What was asked for (a blob) is not held, or not in this room.
    NotFound,
    /// A reason from a newer peer.
    Other(String),
}

impl Reason {
    const NAMES: [(Reason, &'static str); 16] = [
        (Reason::VersionMismatch, "version_mismatch"),
        (Reason::Malformed, "malformed"),
        (Reason::Unauthorized, "unauthorized"),
        (Reason::TokenExpired, "token_expired"),
        (Reason::RoomLocked, "room_locked"),
        (Reason::RateLimited, "rate_limited"),
        (Reason::Lagging, "lagging"),
        (Reason::Overloaded, "overloaded"),
        (Reason::QuotaExceeded, "quota_exceeded"),
        (Reason::TooLarge, "too_large"),
        (Reason::InvalidNode, "invalid_node"),
        (Reason::Equivocation, "equivocation"),
        (Reason::Timeout, "timeout"),
        (Reason::ShuttingDown, "shutting_down"),
        (Reason::Left, "left"),
        (Reason::NotFound, "not_found"),
    ];

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Other(s) => s,
            known => {
                Self::NAMES
                    .iter()
                    .find(|(r, _)| r == known)
                    .expect("every known reason is named")
                    .1
            }
        }
    }

    /// The reason for a wire name (unknown names are kept as `Other`).
    pub fn from_wire(s: &str) -> Reason {
        Self::NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map_or_else(|| Reason::Other(s.to_owned()), |(r, _)| r.clone())
    }
}

/// Limits a server announces in `welcome`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame the server accepts.
    pub max_frame: u64,
    /// Most nodes per pack the server sends or accepts.
    pub max_pack_nodes: u64,
}

/// A peer's presence status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceStatus {
    /// Here.
    Online,
    /// Here, not looking.
    Away,
    /// Here, not to be disturbed.
    Busy,
    /// Gone: its presence ends.
    Offline,
}

impl PresenceStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Away => "away",
            PresenceStatus::Busy => "busy",
            PresenceStatus::Offline => "offline",
        }
    }

    /// The status for a wire name (`None` for an unknown one).
    pub fn from_wire(s: &str) -> Option<PresenceStatus> {
        Some(match s {
            "online" => PresenceStatus::Online,
            "away" => PresenceStatus::Away,
            "busy" => PresenceStatus::Busy,
            "offline" => PresenceStatus::Offline,
            _ => return None,
        })
    }
}

/// Whether a pack is part of a catch-up or a live update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Missing history after the handshake.
    Catchup,
    /// New nodes in steady state.
    Live,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Opens a session (client to server).
    Hello {
        /// Lowest and highest protocol versions the client speaks.
        versions: (u32, u32),
        /// The client's author key.
        peer: AuthorId,
        /// The room.
        room: RoomId,
        /// The peer's signature over this connection's challenge, the room
        /// and the session (`auth::hello_proof`): proof that it holds the
        /// key it claims.
        proof: Option<Signature>,
        /// A capability for locked rooms (`auth::Capability`, encoded).
        token: Option<Vec<u8>>,
        /// Capabilities the client supports.
        caps: Vec<String>,
        /// The client's heads.
        heads: Vec<NodeId>,
        /// The client's version vector.
        vv: VersionVector,
        /// Nodes the client holds.
        nodes: u64,
        /// The client's state hash (a hint).
        state_hash: [u8; 32],
        /// Path globs the client subscribes to (empty: everything).
        subscriptions: Vec<String>,
        /// With the version vector left out: a probe of the client's
        /// RIBLT sketch (`Sketch::probe`), from which the server estimates
        /// the difference to size its first symbols. Optional (empty: not
        /// sent).
        probe: Vec<u8>,
    },
    /// Accepts a session (server to client).
    Welcome {
        /// The protocol version chosen.
        version: u32,
        /// The capabilities chosen.
        caps: Vec<String>,
        /// The server's heads.
        heads: Vec<NodeId>,
        /// The server's version vector (sent with the baseline strategy).
        vv: Option<VersionVector>,
        /// Nodes the server holds.
        nodes: u64,
        /// The difference strategy chosen (a capability name).
        diff: String,
        /// The server's limits.
        limits: Limits,
        /// Authors present in the room.
        peers: Vec<AuthorId>,
        /// Where the session may write (path globs; empty: anywhere);
        /// `None`: it may only read, and the client keeps its nodes in its
        /// outbox.
        write: Option<Vec<String>>,
    },
    /// Refuses a session.
    Reject {
        /// Why.
        reason: Reason,
        /// For people.
        message: String,
    },
    /// Nodes, as a compact pack.
    Pack {
        /// The pack bytes.
        pack: Vec<u8>,
        /// BLAKE3 of `pack`.
        checksum: [u8; 32],
        /// Catch-up or live.
        phase: Phase,
        /// The last pack of a catch-up.
        last: bool,
    },
    /// Nodes accepted and durable.
    Ack {
        /// Their ids.
        nodes: Vec<NodeId>,
    },
    /// Asks for specific nodes.
    Request {
        /// Their ids.
        ids: Vec<NodeId>,
    },
    /// RIBLT coded symbols of the server's sketch.
    IbfSymbols {
        /// Index of the first symbol.
        start: u64,
        /// 25 bytes per symbol.
        symbols: Vec<u8>,
    },
    /// Asks for more coded symbols.
    IbfMore {
        /// How many.
        count: u64,
    },
    /// The client decoded the difference.
    IbfDone {
        /// Nodes the client lacks, by the first 8 bytes of their RIBLT
        /// keys (of their ids).
        need: Vec<KeyPrefix>,
        /// Nodes the client will upload.
        has: u64,
    },
    /// Asks about key ranges of the server's Merkle Search Tree.
    MstRequest {
        /// The ranges.
        ranges: Vec<KeyRange>,
    },
    /// Answers an `mst-request`: per range, its keys or its sub-ranges with
    /// their hashes.
    MstSummary {
        /// One answer per requested range.
        answers: Vec<(KeyRange, Summary)>,
    },
    /// The client found the difference by MST.
    MstDone {
        /// Nodes the client lacks, by the first 8 bytes of their ids.
        need: Vec<KeyPrefix>,
    },
    /// Narrows what is relayed and caught up.
    Subscribe {
        /// Path globs.
        patterns: Vec<String>,
    },
    /// Confirms subscriptions.
    Subscribed {
        /// Path globs in effect.
        patterns: Vec<String>,
    },
    /// Keeps an idle session alive.
    Heartbeat,
    /// Reports a problem with one message.
    Error {
        /// What kind.
        code: Reason,
        /// For people.
        message: String,
        /// The correlation id of the message concerned.
        related: u64,
    },
    /// Ends a session.
    Close {
        /// Why.
        reason: Reason,
        /// For people.
        message: String,
    },
    /// The server's first frame on a connection (session 0): a fresh
    /// nonce each `hello` signs, and the server's key.
    Challenge {
        /// Never used on another connection.
        nonce: [u8; 32],
        /// The server's public key (the root of the capabilities it
        /// issues).
        server: AuthorId,
    },
    /// Ephemeral presence (never in history): a client's own (its `peer`
    /// and `client` are ignored; the server fills them in), or, from the
    /// server, one of another session of the room: its joining, changing,
    /// or leaving (status `offline`).
    Presence {
        /// Whose key.
        peer: AuthorId,
        /// Which of the room's sessions (one key may have several).
        client: u64,
        /// Online, away, busy or offline.
        status: PresenceStatus,
        /// For people, at most [`MAX_PRESENCE_MESSAGE`] bytes.
        message: String,
        /// App data (a cursor, a selection), at most [`MAX_PRESENCE_DATA`]
        /// bytes.
        data: Vec<u8>,
    },
    /// Asks for a blob's outboard, to fetch it (client to server); the
    /// answer is `blob-info`, or `error{not_found}` naming this message.
    BlobGet {
        /// The blob.
        hash: [u8; 32],
    },
    /// A blob's outboard (`syncline_core::blob::Outboard`, encoded), so
    /// that every group can be checked as it arrives.
    BlobInfo {
        /// The blob.
        hash: [u8; 32],
        /// Its outboard.
        outboard: Vec<u8>,
    },
    /// Offers a blob for the room (client to server, which answers
    /// `blob-need`): the session must be allowed to write.
    BlobPut {
        /// The blob.
        hash: [u8; 32],
        /// Its outboard.
        outboard: Vec<u8>,
    },
    /// Groups of a blob the sender asks for: a download's window (client
    /// to server), or what the server still lacks of an upload (its
    /// answer to `blob-put` and to each batch of chunks; empty: it holds
    /// the whole blob).
    BlobNeed {
        /// The blob.
        hash: [u8; 32],
        /// Ranges of group indices, `start..end`.
        ranges: Vec<(u64, u64)>,
    },
    /// One group of a blob (64 KiB, the last one shorter).
    BlobChunk {
        /// The blob.
        hash: [u8; 32],
        /// Which group.
        index: u64,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// Asks for a direct HTTP URL for a blob (client to server): to read
    /// it (`put: false`: the blob must be complete and visible to the
    /// room), or to upload it (`put: true`: after a `blob-put` in this
    /// room, by a session that may write). The answer is `blob-url`, or a
    /// typed `error` naming this message (`not_found` also from a server
    /// that serves no URLs: the client goes on over the session).
    BlobGrant {
        /// The blob.
        hash: [u8; 32],
        /// Whether to upload rather than read.
        put: bool,
    },
    /// A direct URL for a blob: `path`, its signed grant in the query, on
    /// the server's HTTP origin (the one the WebSocket was opened on),
    /// usable until `expires` (Unix milliseconds).
    BlobUrl {
        /// The blob.
        hash: [u8; 32],
        /// Path and query.
        path: String,
        /// When the grant ends.
        expires: u64,
    },
    /// An optional message type from a newer peer (ignored).
    Unknown(u64),
}

/// One frame: a message with its session and correlation id.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Protocol version of the encoding.
    pub version: u32,
    /// The session (one per room on a connection).
    pub session: u64,
    /// Correlation id (0: none).
    pub corr: u64,
    /// The message.
    pub message: Message,
}

impl Message {
    /// The wire type number.
    pub fn type_code(&self) -> u64 {
        match self {
            Message::Hello { .. } => 1,
            Message::Welcome { .. } => 2,
            Message::Reject { .. } => 3,
            Message::Pack { .. } => 4,
            Message::Ack { .. } => 5,
            Message::Request { .. } => 6,
            Message::IbfSymbols { .. } => 7,
            Message::IbfMore { .. } => 8,
            Message::IbfDone { .. } => 9,
            Message::MstRequest { .. } => 10,
            Message::MstSummary { .. } => 11,
            Message::MstDone { .. } => 12,
            Message::Subscribe { .. } => 13,
            Message::Subscribed { .. } => 14,
            Message::Heartbeat => 15,
            Message::Error { .. } => 16,
            Message::Close { .. } => 17,
            Message::Challenge { .. } => 18,
            Message::Presence { .. } => 64,
            Message::BlobGet { .. } => 65,
            Message::BlobInfo { .. } => 66,
            Message::BlobPut { .. } => 67,
            Message::BlobNeed { .. } => 68,
            Message::BlobChunk { .. } => 69,
            Message::BlobGrant { .. } => 70,
            Message::BlobUrl { .. } => 71,
            Message::Unknown(t) => *t,
        }
    }

    /// Whether this is a blob message (`blob-*`): it moves beside the
    /// session, between a peer and a blob store, never through history.
    pub fn is_blob(&self) -> bool {
        matches!(
            self,
            Message::BlobGet { .. }
                | Message::BlobInfo { .. }
                | Message::BlobPut { .. }
                | Message::BlobNeed { .. }
                | Message::BlobChunk { .. }
                | Message::BlobGrant { .. }
                | Message::BlobUrl { .. }
        )
    }
}

fn put_ids(w: &mut Writer, ids: &[NodeId]) {
    w.array(ids.len());
    for id in ids {
        w.bin(&id.0);
    }
}

fn put_strs(w: &mut Writer, items: &[String]) {
    w.array(items.len());
    for s in items {
        w.str(s);
    }
}

/// A range bound, its trailing zero bytes left out: the MST cuts ranges at
/// short prefixes of keys, padded with zeros.
fn put_bound(w: &mut Writer, b: &Option<[u8; 32]>) {
    match b {
        Some(k) => {
            let len = k.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            w.bin(&k[..len]);
        }
        None => w.nil(),
    }
}

fn put_range(w: &mut Writer, r: &KeyRange) {
    w.array(2);
    put_bound(w, &r.start);
    put_bound(w, &r.end);
}

fn read_bound(r: &mut Reader<'_>) -> Result<Option<[u8; 32]>, FrameError> {
    if r.peek()? == 0xc0 {
        r.nil()?;
        return Ok(None);
    }
    let bytes = r.bin(32)?;
    if bytes.last() == Some(&0) {
        // Not the shortest form: two encodings of one bound.
        return Err(FrameError::Invalid("range bound"));
    }
    let mut bound = [0; 32];
    bound[..bytes.len()].copy_from_slice(bytes);
    Ok(Some(bound))
}

fn read_range(r: &mut Reader<'_>) -> Result<KeyRange, FrameError> {
    r.array_exact(2)?;
    Ok(KeyRange {
        start: read_bound(r)?,
        end: read_bound(r)?,
    })
}

fn put_vv(w: &mut Writer, vv: &VersionVector) {
    w.array(vv.len());
    for (author, seq) in vv {
        w.array(2);
        w.bin(&author.0);
        w.uint(*seq);
    }
}

impl Envelope {
    /// `message` as a frame of this version, on `session` with correlation
    /// id `corr`: what drivers send beside the session state machines
    /// (presence, blob transfer, refusals).
    pub fn frame(session: u64, corr: u64, message: Message) -> Vec<u8> {
        Envelope {
            version: PROTOCOL_VERSION,
            session,
            corr,
            message,
        }
        .encode()
    }

    /// A `close` frame for `session`, for a driver refusing a frame no
    /// session state machine can take (one it cannot decode or route).
    pub fn close_frame(session: u64, reason: Reason, message: impl Into<String>) -> Vec<u8> {
        Envelope::frame(
            session,
            0,
            Message::Close {
                reason,
                message: message.into(),
            },
        )
    }

    /// A `reject` frame for `session`: its `hello` was refused.
    pub fn reject_frame(session: u64, reason: Reason, message: impl Into<String>) -> Vec<u8> {
        Envelope {
            version: PROTOCOL_VERSION,
            session,
            corr: 0,
            message: Message::Reject {
                reason,
                message: message.into(),
            },
        }
        .encode()
    }

    /// The frame bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(5);
        w.uint(self.version as u64);
        w.uint(self.message.type_code());
        w.uint(self.session);
        w.uint(self.corr);
        encode_body(&self.message, &mut w);
        w.into_bytes()
    }

    /// Decodes one frame, refusing anything over [`MAX_FRAME_BYTES`] first.
    pub fn decode(frame: &[u8]) -> Result<Envelope, FrameError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(frame.len()));
        }
        let mut r = Reader::new(frame);
        r.array_exact(5)?;
        let version = r.u32()?;
        let kind = r.uint()?;
        let session = r.uint()?;
        let corr = r.uint()?;
        let message = decode_body(kind, &mut r)?;
        r.finish()?;
        Ok(Envelope {
            version,
            session,
            corr,
            message,
        })
    }
}

/// Writes a body map; fields are written in sorted key order.
fn encode_body(m: &Message, w: &mut Writer) {
    match m {
        Message::Hello {
            versions,
            peer,
            room,
            proof,
            token,
            caps,
            heads,
            vv,
            nodes,
            state_hash,
            subscriptions,
            probe,
        } => {
            w.map(
                9 + proof.is_some() as usize
                    + token.is_some() as usize
                    + !probe.is_empty() as usize,
            );
            w.str("caps");
            put_strs(w, caps);
            w.str("heads");
            put_ids(w, heads);
            w.str("nodes");
            w.uint(*nodes);
            w.str("peer");
            w.bin(&peer.0);
            if !probe.is_empty() {
                w.str("probe");
                w.bin(probe);
            }
            if let Some(proof) = proof {
                w.str("proof");
                w.bin(&proof.0);
            }
            w.str("room");
            w.str(room.as_str());
            w.str("state_hash");
            w.bin(state_hash);
            w.str("subscriptions");
            put_strs(w, subscriptions);
            if let Some(t) = token {
                w.str("token");
                w.bin(t);
            }
            w.str("versions");
            w.array(2);
            w.uint(versions.0 as u64);
            w.uint(versions.1 as u64);
            w.str("vv");
            put_vv(w, vv);
        }
        Message::Welcome {
            version,
            caps,
            heads,
            vv,
            nodes,
            diff,
            limits,
            peers,
            write,
        } => {
            w.map(7 + vv.is_some() as usize + write.is_some() as usize);
            w.str("caps");
            put_strs(w, caps);
            w.str("diff");
            w.str(diff);
            w.str("heads");
            put_ids(w, heads);
            w.str("limits");
            w.map(2);
            w.str("max_frame");
            w.uint(limits.max_frame);
            w.str("max_pack_nodes");
            w.uint(limits.max_pack_nodes);
            w.str("nodes");
            w.uint(*nodes);
            w.str("peers");
            w.array(peers.len());
            for p in peers {
                w.bin(&p.0);
            }
            w.str("version");
            w.uint(*version as u64);
            if let Some(vv) = vv {
                w.str("vv");
                put_vv(w, vv);
            }
            if let Some(write) = write {
                w.str("write");
                put_strs(w, write);
            }
        }
        Message::Reject { reason, message } | Message::Close { reason, message } => {
            w.map(2);
            w.str("message");
            w.str(message);
            w.str("reason");
            w.str(reason.as_str());
        }
        Message::Pack {
            pack,
            checksum,
            phase,
            last,
        } => {
            w.map(4);
            w.str("checksum");
            w.bin(checksum);
            w.str("last");
            w.bool(*last);
            w.str("pack");
            w.bin(pack);
            w.str("phase");
            w.str(match phase {
                Phase::Catchup => "catchup",
                Phase::Live => "live",
            });
        }
        Message::Ack { nodes } => {
            w.map(1);
            w.str("nodes");
            put_ids(w, nodes);
        }
        Message::Request { ids } => {
            w.map(1);
            w.str("ids");
            put_ids(w, ids);
        }
        Message::IbfSymbols { start, symbols } => {
            w.map(2);
            w.str("start");
            w.uint(*start);
            w.str("symbols");
            w.bin(symbols);
        }
        Message::IbfMore { count } => {
            w.map(1);
            w.str("count");
            w.uint(*count);
        }
        Message::IbfDone { need, has } => {
            w.map(2);
            w.str("has");
            w.uint(*has);
            w.str("need");
            w.array(need.len());
            for k in need {
                w.bin(k);
            }
        }
        Message::MstRequest { ranges } => {
            w.map(1);
            w.str("ranges");
            w.array(ranges.len());
            for r in ranges {
                put_range(w, r);
            }
        }
        Message::MstSummary { answers } => {
            w.map(1);
            w.str("answers");
            w.array(answers.len());
            for (range, summary) in answers {
                w.array(3);
                put_range(w, range);
                match summary {
                    Summary::Keys(keys) => {
                        w.uint(0);
                        w.array(keys.len());
                        for k in keys {
                            w.bin(k);
                        }
                    }
                    // Sub-ranges partition the answer's range: only the cuts
                    // between them travel, then one hash per sub-range.
                    Summary::Ranges(subs) => {
                        w.uint(1);
                        w.array(2);
                        w.array(subs.len().saturating_sub(1));
                        for (sub, _) in &subs[..subs.len().saturating_sub(1)] {
                            put_bound(w, &sub.end);
                        }
                        w.array(subs.len());
                        for (_, hash) in subs {
                            w.bin(hash);
                        }
                    }
                }
            }
        }
        Message::MstDone { need } => {
            w.map(1);
            w.str("need");
            w.array(need.len());
            for prefix in need {
                w.bin(prefix);
            }
        }
        Message::Subscribe { patterns } | Message::Subscribed { patterns } => {
            w.map(1);
            w.str("patterns");
            put_strs(w, patterns);
        }
        Message::Heartbeat | Message::Unknown(_) => w.map(0),
        Message::Error {
            code,
            message,
            related,
        } => {
            w.map(3);
            w.str("code");
            w.str(code.as_str());
            w.str("message");
            w.str(message);
            w.str("related");
            w.uint(*related);
        }
        Message::Challenge { nonce, server } => {
            w.map(2);
            w.str("nonce");
            w.bin(nonce);
            w.str("server");
            w.bin(&server.0);
        }
        Message::BlobGet { hash } => {
            w.map(1);
            w.str("hash");
            w.bin(hash);
        }
        Message::BlobInfo { hash, outboard } | Message::BlobPut { hash, outboard } => {
            w.map(2);
            w.str("hash");
            w.bin(hash);
            w.str("outboard");
            w.bin(outboard);
        }
        Message::BlobNeed { hash, ranges } => {
            w.map(2);
            w.str("hash");
            w.bin(hash);
            w.str("ranges");
            w.array(ranges.len() * 2);
            for (start, end) in ranges {
                w.uint(*start);
                w.uint(*end);
            }
        }
        Message::BlobGrant { hash, put } => {
            w.map(2);
            w.str("hash");
            w.bin(hash);
            w.str("put");
            w.bool(*put);
        }
        Message::BlobUrl {
            hash,
            path,
            expires,
        } => {
            w.map(3);
            w.str("expires");
            w.uint(*expires);
            w.str("hash");
            w.bin(hash);
            w.str("path");
            w.str(path);
        }
        Message::BlobChunk { hash, index, bytes } => {
            w.map(3);
            w.str("bytes");
            w.bin(bytes);
            w.str("hash");
            w.bin(hash);
            w.str("index");
            w.uint(*index);
        }
        Message::Presence {
            peer,
            client,
            status,
            message,
            data,
        } => {
            w.map(5);
            w.str("client");
            w.uint(*client);
            w.str("data");
            w.bin(data);
            w.str("message");
            w.str(message);
            w.str("peer");
            w.bin(&peer.0);
            w.str("status");
            w.str(status.as_str());
        }
    }
}

/// The fields of one body, read in any order; unknown keys are skipped.
struct Fields<'a> {
    values: BTreeMap<&'a str, Reader<'a>>,
}

impl<'a> Fields<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Fields<'a>, FrameError> {
        let n = r.map(MAX_LIST)?;
        let mut values = BTreeMap::new();
        for _ in 0..n {
            let key = r.str(MAX_TEXT_BYTES)?;
            let start = r.clone();
            r.skip_value(MAX_SKIP_DEPTH)?;
            if values.insert(key, start).is_some() {
                return Err(FrameError::Duplicate(key.to_owned()));
            }
        }
        Ok(Fields { values })
    }

    fn get(&self, key: &'static str) -> Result<Reader<'a>, FrameError> {
        self.values
            .get(key)
            .cloned()
            .ok_or(FrameError::Missing(key))
    }

    fn opt(&self, key: &'static str) -> Option<Reader<'a>> {
        self.values.get(key).cloned()
    }

    fn uint(&self, key: &'static str) -> Result<u64, FrameError> {
        Ok(self.get(key)?.uint()?)
    }

    fn text(&self, key: &'static str) -> Result<String, FrameError> {
        Ok(self.get(key)?.str(MAX_TEXT_BYTES)?.to_owned())
    }

    fn texts(&self, key: &'static str) -> Result<Vec<String>, FrameError> {
        let mut r = self.get(key)?;
        let n = r.array(MAX_LIST)?;
        (0..n)
            .map(|_| Ok(r.str(MAX_TEXT_BYTES)?.to_owned()))
            .collect()
    }

    fn ids(&self, key: &'static str, max: usize) -> Result<Vec<NodeId>, FrameError> {
        let mut r = self.get(key)?;
        let n = r.array(max)?;
        (0..n).map(|_| Ok(NodeId(r.bin_array()?))).collect()
    }

    fn bytes(&self, key: &'static str, max: usize) -> Result<Vec<u8>, FrameError> {
        Ok(self.get(key)?.bin(max)?.to_vec())
    }

    fn vv(mut r: Reader<'a>) -> Result<VersionVector, FrameError> {
        let n = r.array(MAX_VV_ENTRIES)?;
        let mut vv = VersionVector::new();
        for _ in 0..n {
            r.array_exact(2)?;
            let author = AuthorId(r.bin_array()?);
            if vv.insert(author, r.uint()?).is_some() {
                return Err(FrameError::Invalid("vv"));
            }
        }
        Ok(vv)
    }
}

fn decode_body(kind: u64, r: &mut Reader<'_>) -> Result<Message, FrameError> {
    let f = Fields::read(r)?;
    Ok(match kind {
        1 => {
            let mut v = f.get("versions")?;
            v.array_exact(2)?;
            let versions = (v.u32()?, v.u32()?);
            let room = f.get("room")?.str(MAX_ROOM_ID_BYTES)?;
            Message::Hello {
                versions,
                peer: AuthorId(f.get("peer")?.bin_array()?),
                room: RoomId::new(room).map_err(|_| FrameError::Invalid("room"))?,
                proof: f
                    .opt("proof")
                    .map(|mut p| p.bin_array().map(Signature))
                    .transpose()?,
                token: f
                    .opt("token")
                    .map(|mut t| t.bin(MAX_BLOB_FIELD_BYTES).map(<[u8]>::to_vec))
                    .transpose()?,
                caps: f.texts("caps")?,
                heads: f.ids("heads", MAX_HEADS)?,
                vv: Fields::vv(f.get("vv")?)?,
                nodes: f.uint("nodes")?,
                state_hash: f.get("state_hash")?.bin_array()?,
                subscriptions: f.texts("subscriptions")?,
                probe: f
                    .opt("probe")
                    .map(|mut p| p.bin(MAX_PROBE_BYTES).map(<[u8]>::to_vec))
                    .transpose()?
                    .unwrap_or_default(),
            }
        }
        2 => {
            let mut l = f.get("limits")?;
            let limits = Fields::read(&mut l)?;
            let mut p = f.get("peers")?;
            let n = p.array(MAX_LIST)?;
            let peers = (0..n)
                .map(|_| Ok(AuthorId(p.bin_array()?)))
                .collect::<Result<_, FrameError>>()?;
            Message::Welcome {
                version: f.get("version")?.u32()?,
                caps: f.texts("caps")?,
                heads: f.ids("heads", MAX_HEADS)?,
                vv: f.opt("vv").map(Fields::vv).transpose()?,
                nodes: f.uint("nodes")?,
                diff: f.text("diff")?,
                limits: Limits {
                    max_frame: limits.uint("max_frame")?,
                    max_pack_nodes: limits.uint("max_pack_nodes")?,
                },
                peers,
                write: f.opt("write").map(|_| f.texts("write")).transpose()?,
            }
        }
        3 | 17 => {
            let reason = Reason::from_wire(&f.text("reason")?);
            let message = f.text("message")?;
            if kind == 3 {
                Message::Reject { reason, message }
            } else {
                Message::Close { reason, message }
            }
        }
        4 => Message::Pack {
            pack: f.bytes("pack", MAX_FRAME_BYTES)?,
            checksum: f.get("checksum")?.bin_array()?,
            phase: match f.text("phase")?.as_str() {
                "catchup" => Phase::Catchup,
                "live" => Phase::Live,
                _ => return Err(FrameError::Invalid("phase")),
            },
            last: f.get("last")?.bool()?,
        },
        5 => Message::Ack {
            nodes: f.ids("nodes", MAX_IDS)?,
        },
        6 => Message::Request {
            ids: f.ids("ids", MAX_IDS)?,
        },
        7 => Message::IbfSymbols {
            start: f.uint("start")?,
            symbols: f.bytes("symbols", MAX_FRAME_BYTES)?,
        },
        8 => Message::IbfMore {
            count: f.uint("count")?,
        },
        9 => {
            let mut n = f.get("need")?;
            let len = n.array(MAX_IDS)?;
            let need = (0..len)
                .map(|_| Ok(n.bin_array::<8>()?))
                .collect::<Result<_, FrameError>>()?;
            Message::IbfDone {
                need,
                has: f.uint("has")?,
            }
        }
        10 => {
            let mut r = f.get("ranges")?;
            let n = r.array(MAX_RANGES)?;
            let ranges = (0..n)
                .map(|_| read_range(&mut r))
                .collect::<Result<_, _>>()?;
            Message::MstRequest { ranges }
        }
        11 => {
            let mut r = f.get("answers")?;
            let n = r.array(MAX_RANGES)?;
            let mut answers = Vec::with_capacity(n);
            for _ in 0..n {
                r.array_exact(3)?;
                let range = read_range(&mut r)?;
                let kind = r.uint()?;
                let summary = match kind {
                    0 => {
                        let items = r.array(MAX_SUMMARY_ITEMS)?;
                        Summary::Keys(
                            (0..items)
                                .map(|_| Ok(r.bin_array::<8>()?))
                                .collect::<Result<_, FrameError>>()?,
                        )
                    }
                    1 => {
                        // Cuts, then a hash per sub-range: rebuild the
                        // sub-ranges from the answer's range.
                        r.array_exact(2)?;
                        let cuts = r.array(MAX_SUMMARY_ITEMS)?;
                        let mut subs = Vec::with_capacity(cuts + 1);
                        let mut start = range.start;
                        for _ in 0..cuts {
                            let end = read_bound(&mut r)?;
                            if end.is_none() {
                                return Err(FrameError::Invalid("unbounded cut"));
                            }
                            subs.push(KeyRange { start, end });
                            start = end;
                        }
                        subs.push(KeyRange {
                            start,
                            end: range.end,
                        });
                        r.array_exact(subs.len())?;
                        Summary::Ranges(
                            subs.into_iter()
                                .map(|sub| Ok((sub, r.bin_array::<16>()?)))
                                .collect::<Result<_, FrameError>>()?,
                        )
                    }
                    _ => return Err(FrameError::Invalid("summary kind")),
                };
                answers.push((range, summary));
            }
            Message::MstSummary { answers }
        }
        12 => {
            let mut n = f.get("need")?;
            let len = n.array(MAX_IDS)?;
            Message::MstDone {
                need: (0..len)
                    .map(|_| Ok(n.bin_array::<8>()?))
                    .collect::<Result<_, FrameError>>()?,
            }
        }
        13 => Message::Subscribe {
            patterns: f.texts("patterns")?,
        },
        14 => Message::Subscribed {
            patterns: f.texts("patterns")?,
        },
        15 => Message::Heartbeat,
        16 => Message::Error {
            code: Reason::from_wire(&f.text("code")?),
            message: f.text("message")?,
            related: f.uint("related")?,
        },
        18 => Message::Challenge {
            nonce: f.get("nonce")?.bin_array()?,
            server: AuthorId(f.get("server")?.bin_array()?),
        },
        64 => Message::Presence {
            peer: AuthorId(f.get("peer")?.bin_array()?),
            client: f.uint("client")?,
            status: PresenceStatus::from_wire(&f.text("status")?)
                .ok_or(FrameError::Invalid("unknown presence status"))?,
            message: f.get("message")?.str(MAX_PRESENCE_MESSAGE)?.to_owned(),
            data: f.bytes("data", MAX_PRESENCE_DATA)?,
        },
        65 => Message::BlobGet {
            hash: f.get("hash")?.bin_array()?,
        },
        66 => Message::BlobInfo {
            hash: f.get("hash")?.bin_array()?,
            outboard: f.bytes("outboard", MAX_OUTBOARD_BYTES)?,
        },
        67 => Message::BlobPut {
            hash: f.get("hash")?.bin_array()?,
            outboard: f.bytes("outboard", MAX_OUTBOARD_BYTES)?,
        },
        68 => {
            let mut r = f.get("ranges")?;
            let n = r.array(MAX_BLOB_RANGES * 2)?;
            if n % 2 != 0 {
                return Err(FrameError::Invalid("blob ranges come in pairs"));
            }
            let mut ranges = Vec::with_capacity(n / 2);
            for _ in 0..n / 2 {
                let (start, end) = (r.uint()?, r.uint()?);
                if start >= end {
                    return Err(FrameError::Invalid("an empty blob range"));
                }
                ranges.push((start, end));
            }
            Message::BlobNeed {
                hash: f.get("hash")?.bin_array()?,
                ranges,
            }
        }
        69 => Message::BlobChunk {
            hash: f.get("hash")?.bin_array()?,
            index: f.uint("index")?,
            bytes: f.bytes("bytes", crate::blob::GROUP_BYTES)?,
        },
        70 => Message::BlobGrant {
            hash: f.get("hash")?.bin_array()?,
            put: f.get("put")?.bool()?,
        },
        71 => Message::BlobUrl {
            hash: f.get("hash")?.bin_array()?,
            path: f.text("path")?,
            expires: f.uint("expires")?,
        },
        t if t >= FIRST_OPTIONAL_TYPE => Message::Unknown(t),
        t => return Err(FrameError::UnknownType(t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let vv: VersionVector = [(AuthorId([1; 32]), 7), (AuthorId([2; 32]), 1)].into();
        vec![
            Message::Hello {
                versions: (1, 1),
                peer: AuthorId([3; 32]),
                room: RoomId::new("projects/alpha").unwrap(),
                proof: Some(Signature([2; 64])),
                token: Some(vec![1, 2, 3]),
                caps: vec!["diff/heads@1".into(), "diff/ibf@1".into()],
                heads: vec![NodeId([4; 32])],
                vv: vv.clone(),
                nodes: 8,
                state_hash: [5; 32],
                subscriptions: vec!["/projects/alpha/**".into()],
                probe: vec![9, 8, 7],
            },
            Message::Welcome {
                version: 1,
                caps: vec!["diff/heads@1".into()],
                heads: vec![],
                vv: Some(vv),
                nodes: 0,
                diff: "diff/heads@1".into(),
                limits: Limits {
                    max_frame: 4 << 20,
                    max_pack_nodes: 50_000,
                },
                peers: vec![AuthorId([9; 32])],
                write: Some(vec!["/docs/**".into()]),
            },
            Message::Reject {
                reason: Reason::RoomLocked,
                message: "token required".into(),
            },
            Message::Pack {
                pack: vec![1; 40],
                checksum: [6; 32],
                phase: Phase::Catchup,
                last: true,
            },
            Message::Ack {
                nodes: vec![NodeId([7; 32])],
            },
            Message::Request { ids: vec![] },
            Message::IbfSymbols {
                start: 64,
                symbols: vec![0; 50],
            },
            Message::IbfMore { count: 32 },
            Message::IbfDone {
                need: vec![[8; 8]],
                has: 3,
            },
            Message::MstRequest {
                ranges: vec![
                    KeyRange::full(),
                    KeyRange {
                        start: Some([1; 32]),
                        end: None,
                    },
                ],
            },
            Message::MstSummary {
                answers: vec![
                    (KeyRange::full(), Summary::Keys(vec![[2; 8]])),
                    (
                        KeyRange::full(),
                        Summary::Ranges(vec![
                            (
                                KeyRange {
                                    start: None,
                                    end: Some([3; 32]),
                                },
                                [4; 16],
                            ),
                            (
                                KeyRange {
                                    start: Some([3; 32]),
                                    end: None,
                                },
                                [5; 16],
                            ),
                        ]),
                    ),
                ],
            },
            Message::MstDone { need: vec![[5; 8]] },
            Message::Subscribe {
                patterns: vec!["/a/**".into()],
            },
            Message::Subscribed { patterns: vec![] },
            Message::Heartbeat,
            Message::Error {
                code: Reason::Other("future_reason".into()),
                message: "?".into(),
                related: 12,
            },
            Message::Close {
                reason: Reason::Lagging,
                message: String::new(),
            },
            Message::Challenge {
                nonce: [3; 32],
                server: AuthorId([4; 32]),
            },
            Message::BlobGet { hash: [5; 32] },
            Message::BlobInfo {
                hash: [5; 32],
                outboard: vec![0, 0, 0, 0, 0, 0, 0, 9],
            },
            Message::BlobPut {
                hash: [6; 32],
                outboard: vec![1; 40],
            },
            Message::BlobNeed {
                hash: [6; 32],
                ranges: vec![(0, 3), (7, 8)],
            },
            Message::BlobChunk {
                hash: [6; 32],
                index: 2,
                bytes: vec![9; 100],
            },
            Message::BlobGrant {
                hash: [6; 32],
                put: true,
            },
            Message::BlobUrl {
                hash: [6; 32],
                path: "/blobs/notes/06?grant=1-w-ab".into(),
                expires: 1_800_000_000_000,
            },
            Message::Presence {
                peer: AuthorId([1; 32]),
                client: 7,
                status: PresenceStatus::Busy,
                message: "in a meeting".into(),
                data: vec![42],
            },
        ]
    }

    #[test]
    fn every_message_roundtrips() {
        for (i, message) in samples().into_iter().enumerate() {
            let env = Envelope {
                version: PROTOCOL_VERSION,
                session: 3,
                corr: i as u64,
                message,
            };
            let bytes = env.encode();
            assert_eq!(Envelope::decode(&bytes).unwrap(), env);
            for cut in 0..bytes.len() {
                assert!(Envelope::decode(&bytes[..cut]).is_err());
            }
        }
    }

    #[test]
    fn reasons_have_stable_names() {
        for (r, name) in Reason::NAMES {
            assert_eq!(Reason::from_wire(name), r);
            assert_eq!(r.as_str(), name);
        }
    }

    #[test]
    fn unknown_fields_and_optional_types_are_tolerated() {
        let mut w = Writer::new();
        w.array(5);
        w.uint(1);
        w.uint(8); // ibf-more
        w.uint(0);
        w.uint(0);
        w.map(2);
        w.str("count");
        w.uint(5);
        w.str("added_later");
        w.array(2);
        w.str("x");
        w.map(0);
        let env = Envelope::decode(w.as_bytes()).unwrap();
        assert_eq!(env.message, Message::IbfMore { count: 5 });

        let mut w = Writer::new();
        w.array(5);
        w.uint(1);
        w.uint(99);
        w.uint(0);
        w.uint(0);
        w.map(0);
        assert_eq!(
            Envelope::decode(w.as_bytes()).unwrap().message,
            Message::Unknown(99)
        );
    }

    #[test]
    fn hostile_frames_get_typed_errors() {
        let mut w = Writer::new();
        w.array(5);
        w.uint(1);
        w.uint(40); // required range, unknown
        w.uint(0);
        w.uint(0);
        w.map(0);
        assert_eq!(
            Envelope::decode(w.as_bytes()),
            Err(FrameError::UnknownType(40))
        );

        let mut w = Writer::new();
        w.array(5);
        w.uint(1);
        w.uint(8);
        w.uint(0);
        w.uint(0);
        w.map(2);
        w.str("count");
        w.uint(1);
        w.str("count");
        w.uint(2);
        assert_eq!(
            Envelope::decode(w.as_bytes()),
            Err(FrameError::Duplicate("count".into()))
        );

        let mut w = Writer::new();
        w.array(5);
        w.uint(1);
        w.uint(8);
        w.uint(0);
        w.uint(0);
        w.map(0);
        assert_eq!(
            Envelope::decode(w.as_bytes()),
            Err(FrameError::Missing("count"))
        );

        assert_eq!(
            Envelope::decode(&vec![0; MAX_FRAME_BYTES + 1]),
            Err(FrameError::TooLarge(MAX_FRAME_BYTES + 1))
        );
    }

    proptest::proptest! {
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
        }
    }
}
