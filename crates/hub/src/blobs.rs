//! Blob transfer in a room hub, the server's end (`docs/protocol.md`
//! §5.9): blob bytes move beside the sessions, never in history, between
//! the room's sessions and the relay's [`BlobStore`].
//!
//! A session that may write offers a blob with `blob-put` and sends its
//! groups; each is checked against the outboard as it lands, and after
//! each batch the hub says what it still lacks (`blob-need`, its `corr`
//! the last chunk taken). A session reads a blob with `blob-get` (the
//! outboard) and `blob-need` (a window of groups, at most
//! [`MAX_GROUPS_PER_NEED`] at once) if the room may see it: uploaded
//! through this room, or referenced by the room's state. With the same
//! rights, `blob-grant` gets a direct HTTP URL (signed by the driver's
//! [`BlobUrls`]) to read or upload the bytes outside the session. Anything
//! else is refused with a typed `error`; the session goes on.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use syncline_core::blob::{Bitfield, Outboard};
use syncline_core::proto::message::{Envelope, MAX_BLOB_RANGES, Message, Reason};
use syncline_core::room::Room;
use syncline_core::{NodeIdx, Op, RoomId};
use syncline_store::{BlobState, BlobStore, BlobStoreError};

use crate::room::SessionKey;

/// Groups one `blob-need` of a download may ask for: 4 MiB of frames.
pub const MAX_GROUPS_PER_NEED: u64 = 64;

/// Signs direct blob URLs for the driver's HTTP side, which serves them:
/// the hub decides who may have one, the driver what it looks like and
/// how long it lasts (it may read a clock; the hub does not).
pub trait BlobUrls: Send + Sync + std::fmt::Debug {
    /// The path and query (with its grant) to read blob `hash`, or to
    /// upload it if `put`, in room `room`, and when the grant ends (Unix
    /// milliseconds).
    fn grant(&self, room: &RoomId, hash: &[u8; 32], put: bool) -> (String, u64);
}

/// A room's side of the relay's blob store.
pub(crate) struct RoomBlobs {
    store: Arc<BlobStore>,
    /// Direct URLs, if the driver serves them.
    urls: Option<Arc<dyn BlobUrls>>,
    /// Blobs uploaded through this room: its sessions may read them.
    uploaded: HashSet<[u8; 32]>,
    /// Blobs the room's state references, rebuilt after it changed.
    referenced: Option<HashSet<[u8; 32]>>,
    /// Blobs whose reference by this room is in the store's index (see
    /// [`RoomBlobs::record_refs`]).
    recorded: HashSet<[u8; 32]>,
}

/// What handling blob messages queued: frames per connection.
pub(crate) type Out = Vec<(u64, Vec<u8>)>;

fn error(key: SessionKey, related: u64, code: Reason, message: &str) -> (u64, Vec<u8>) {
    (
        key.conn,
        Envelope::frame(
            key.session,
            0,
            Message::Error {
                code,
                message: message.to_owned(),
                related,
            },
        ),
    )
}

/// `held`'s missing groups as `blob-need` ranges (the first
/// [`MAX_BLOB_RANGES`] of them).
fn lacking(held: &Bitfield) -> Vec<(u64, u64)> {
    held.missing()
        .into_iter()
        .take(MAX_BLOB_RANGES)
        .map(|r| (r.start, r.end))
        .collect()
}

impl RoomBlobs {
    pub(crate) fn new(store: Arc<BlobStore>, urls: Option<Arc<dyn BlobUrls>>) -> RoomBlobs {
        RoomBlobs {
            store,
            urls,
            uploaded: HashSet::new(),
            referenced: None,
            recorded: HashSet::new(),
        }
    }

    /// The room's state changed: what it references is read again when
    /// next needed.
    pub(crate) fn room_changed(&mut self) {
        self.referenced = None;
    }

    /// Records in the store's reference index the blobs `nodes` (durable,
    /// not yet acknowledged) reference, so that garbage collection never
    /// takes a blob a room names. A failure marks the index incomplete
    /// (the store then collects nothing), so it is not the batch's: it is
    /// returned for the driver to report.
    pub(crate) fn record_refs(
        &mut self,
        room: &Room,
        nodes: &[NodeIdx],
    ) -> Result<(), BlobStoreError> {
        let mut hashes = Vec::new();
        for &idx in nodes {
            room.dag().with_content(idx, |node| {
                for op in &node.ops {
                    if let Op::Set { value, .. } = op {
                        value.blob_hashes(&mut hashes);
                    }
                }
            });
        }
        hashes.retain(|h| self.recorded.insert(*h));
        self.store.add_refs(room.id().as_str(), &hashes)
    }

    /// Whether the room may see blob `hash`.
    fn visible(&mut self, room: &Room, hash: &[u8; 32]) -> bool {
        if self.uploaded.contains(hash) {
            return true;
        }
        self.referenced
            .get_or_insert_with(|| room.doc().blob_refs().into_iter().collect())
            .contains(hash)
    }

    /// Handles one batch's blob messages from open sessions (`writer`:
    /// whether each may write), queueing answers.
    pub(crate) fn handle(
        &mut self,
        room: &Room,
        inputs: Vec<(SessionKey, bool, u64, Message)>,
    ) -> Out {
        let mut out = Out::new();
        // Per session and blob: the last chunk taken in this batch.
        let mut took: BTreeMap<(SessionKey, [u8; 32]), u64> = BTreeMap::new();
        for (key, writer, corr, message) in inputs {
            match message {
                Message::BlobPut { hash, outboard } => {
                    if !writer {
                        out.push(error(
                            key,
                            corr,
                            Reason::Unauthorized,
                            "this session may not write",
                        ));
                        continue;
                    }
                    let begun = Outboard::decode(&outboard)
                        .map_err(BlobStoreError::from)
                        .and_then(|o| self.store.begin(&hash, &o));
                    match begun {
                        Ok(held) => {
                            self.uploaded.insert(hash);
                            out.push((
                                key.conn,
                                Envelope::frame(
                                    key.session,
                                    0,
                                    Message::BlobNeed {
                                        hash,
                                        ranges: lacking(&held),
                                    },
                                ),
                            ));
                        }
                        Err(e) => out.push(refusal(key, corr, &e)),
                    }
                }
                Message::BlobChunk { hash, index, bytes } => {
                    if !writer || !self.uploaded.contains(&hash) {
                        out.push(error(
                            key,
                            corr,
                            Reason::NotFound,
                            "no blob-put for this blob in this room",
                        ));
                        continue;
                    }
                    match self.store.write_group(&hash, index, &bytes) {
                        Ok(_) => {
                            took.insert((key, hash), corr);
                        }
                        Err(e) => out.push(refusal(key, corr, &e)),
                    }
                }
                Message::BlobGrant { hash, put } => {
                    out.push(self.grant(room, key, writer, corr, hash, put));
                }
                Message::BlobGet { hash } => {
                    let complete =
                        matches!(self.store.state(&hash), Ok(BlobState::Complete { .. }));
                    let outboard = match self.store.outboard(&hash) {
                        Ok(Some(o)) if complete && self.visible(room, &hash) => o,
                        _ => {
                            out.push(not_found(key, corr));
                            continue;
                        }
                    };
                    out.push((
                        key.conn,
                        Envelope::frame(
                            key.session,
                            corr,
                            Message::BlobInfo {
                                hash,
                                outboard: outboard.encode(),
                            },
                        ),
                    ));
                }
                Message::BlobNeed { hash, ranges } => {
                    if !self.visible(room, &hash) {
                        out.push(not_found(key, corr));
                        continue;
                    }
                    let groups = ranges
                        .iter()
                        .flat_map(|&(start, end)| start..end)
                        .take(MAX_GROUPS_PER_NEED as usize);
                    for index in groups {
                        match self.store.read_group(&hash, index) {
                            Ok(bytes) => out.push((
                                key.conn,
                                Envelope::frame(
                                    key.session,
                                    0,
                                    Message::BlobChunk { hash, index, bytes },
                                ),
                            )),
                            Err(e) => {
                                out.push(refusal(key, corr, &e));
                                break;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // What each uploader's receiver still lacks, after its chunks.
        for ((key, hash), corr) in took {
            if let Ok(Some(held)) = self.store.held(&hash) {
                out.push((
                    key.conn,
                    Envelope::frame(
                        key.session,
                        corr,
                        Message::BlobNeed {
                            hash,
                            ranges: lacking(&held),
                        },
                    ),
                ));
            }
        }
        out
    }
}

impl RoomBlobs {
    /// The answer to a `blob-grant`: a URL if the session may read (or
    /// write) the blob here and the driver serves URLs.
    fn grant(
        &mut self,
        room: &Room,
        key: SessionKey,
        writer: bool,
        corr: u64,
        hash: [u8; 32],
        put: bool,
    ) -> (u64, Vec<u8>) {
        let Some(urls) = self.urls.clone() else {
            return error(
                key,
                corr,
                Reason::NotFound,
                "this server serves no blob URLs",
            );
        };
        let allowed = if put {
            // The relay checks uploads against the outboard a `blob-put`
            // brought.
            writer && self.uploaded.contains(&hash)
        } else {
            matches!(self.store.state(&hash), Ok(BlobState::Complete { .. }))
                && self.visible(room, &hash)
        };
        if !allowed {
            return if put && !writer {
                error(
                    key,
                    corr,
                    Reason::Unauthorized,
                    "this session may not write",
                )
            } else {
                not_found(key, corr)
            };
        }
        let (path, expires) = urls.grant(room.id(), &hash, put);
        (
            key.conn,
            Envelope::frame(
                key.session,
                corr,
                Message::BlobUrl {
                    hash,
                    path,
                    expires,
                },
            ),
        )
    }
}

/// The `error` for a blob the room does not see.
fn not_found(key: SessionKey, corr: u64) -> (u64, Vec<u8>) {
    error(key, corr, Reason::NotFound, "no such blob in this room")
}

/// The `error` a store's refusal becomes.
fn refusal(key: SessionKey, corr: u64, e: &BlobStoreError) -> (u64, Vec<u8>) {
    let code = match e {
        BlobStoreError::QuotaExceeded { .. } => Reason::QuotaExceeded,
        BlobStoreError::Blob(_) => Reason::Malformed,
        BlobStoreError::Missing(_) => Reason::NotFound,
        _ => Reason::Overloaded,
    };
    error(key, corr, code, &e.to_string())
}
