//! Blobs in the SDK: bytes kept in the replica's blob store
//! (`DIR/blobs`), referenced from fields as `Value::Blob`, and moved to and
//! from the relay by the sync engine beside the room's session
//! (`docs/protocol.md` §5.9). Uploads happen while the room syncs; a
//! download is asked for with [`Room::fetch_blob`].

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use syncline_core::blob::Outboard;
use syncline_core::blob::transfer::{DEFAULT_WINDOW, Download, Landed, Upload};
use syncline_core::proto::message::{Envelope, Message};
use syncline_core::{BlobRef, Value};
use syncline_store::{BlobReader, BlobState, BlobStore};

use crate::replica::{Error, Replica, Room};

/// Correlation ids of blob requests start here, far above the session's
/// own, so that a refusal naming one is told apart from one naming a
/// pack; chunk sequence numbers of uploads start at [`CHUNK_CORR_BASE`].
pub(crate) const BLOB_CORR_BASE: u64 = 1 << 62;

/// See [`BLOB_CORR_BASE`].
const CHUNK_CORR_BASE: u64 = 3 << 61;

/// A room's transfers, driven by the sync engine.
#[derive(Debug, Default)]
pub(crate) struct Transfers {
    /// Blobs to upload while syncing, and each one's upload once begun on
    /// this connection.
    uploads: BTreeMap<[u8; 32], Option<Upload>>,
    /// Blobs to download, and each one's download once its outboard came.
    downloads: BTreeMap<[u8; 32], Fetch>,
    /// Requests sent, by correlation id: which blob, and whether a put.
    asked: BTreeMap<u64, ([u8; 32], bool)>,
    next_corr: u64,
    /// The last refusal of an upload, for the status.
    pub(crate) refused: Option<String>,
}

/// A download asked for.
#[derive(Debug, Default)]
struct Fetch {
    /// The `blob-get` went out on this connection.
    asked: bool,
    download: Option<Download>,
    /// Why it failed, if the relay refused it.
    failed: Option<String>,
}

impl Transfers {
    /// Whether uploads are still to finish.
    pub(crate) fn uploading(&self) -> usize {
        self.uploads.len()
    }

    fn corr(&mut self, hash: [u8; 32], put: bool) -> u64 {
        self.next_corr += 1;
        let corr = BLOB_CORR_BASE + self.next_corr;
        self.asked.insert(corr, (hash, put));
        corr
    }

    /// The connection ended: transfers start again on the next one, from
    /// what each side holds.
    pub(crate) fn disconnected(&mut self) {
        self.asked.clear();
        for upload in self.uploads.values_mut() {
            *upload = None;
        }
        for fetch in self.downloads.values_mut() {
            fetch.asked = false;
            fetch.download = None;
        }
    }

    /// The frames to send on session `session` now: offers, requests and
    /// groups within each transfer's window.
    pub(crate) fn pump(&mut self, store: &BlobStore, session: u64) -> Vec<Vec<u8>> {
        let frame = |corr: u64, message: Message| Envelope::frame(session, corr, message);
        let mut out = Vec::new();
        let hashes: Vec<[u8; 32]> = self.uploads.keys().copied().collect();
        for hash in hashes {
            if self.uploads.get(&hash).is_some_and(Option::is_none) {
                let Ok(Some(outboard)) = store.outboard(&hash) else {
                    continue;
                };
                let corr = self.corr(hash, true);
                out.push(frame(
                    corr,
                    Message::BlobPut {
                        hash,
                        outboard: outboard.encode(),
                    },
                ));
                self.uploads
                    .insert(hash, Some(Upload::new(hash, &outboard, DEFAULT_WINDOW)));
            }
        }
        for (hash, upload) in &mut self.uploads {
            match upload {
                None => {}
                Some(up) => {
                    for (index, seq) in up.next_groups() {
                        if let Ok(bytes) = store.read_group(hash, index) {
                            out.push(frame(
                                CHUNK_CORR_BASE + seq,
                                Message::BlobChunk {
                                    hash: *hash,
                                    index,
                                    bytes,
                                },
                            ));
                        }
                    }
                }
            }
        }
        let unasked: Vec<[u8; 32]> = self
            .downloads
            .iter()
            .filter(|(_, f)| f.failed.is_none() && !f.asked && f.download.is_none())
            .map(|(h, _)| *h)
            .collect();
        for hash in unasked {
            let corr = self.corr(hash, false);
            out.push(frame(corr, Message::BlobGet { hash }));
            if let Some(fetch) = self.downloads.get_mut(&hash) {
                fetch.asked = true;
            }
        }
        for (hash, fetch) in &mut self.downloads {
            if fetch.failed.is_some() {
                continue;
            }
            match &mut fetch.download {
                None => {}
                Some(down) => {
                    if let Some(ranges) = down.next_request() {
                        out.push(frame(
                            0,
                            Message::BlobNeed {
                                hash: *hash,
                                ranges: ranges.into_iter().map(|r| (r.start, r.end)).collect(),
                            },
                        ));
                    }
                }
            }
        }
        out
    }

    /// Loads room `room`'s durable upload queue (at its first sync).
    pub(crate) fn load_queue(&mut self, store: &BlobStore, room: &str) {
        if let Ok(queued) = store.queued(room) {
            for hash in queued {
                self.uploads.entry(hash).or_insert(None);
            }
        }
    }

    /// A blob frame from the relay (`corr` as it came) for room `room`.
    pub(crate) fn heard(&mut self, store: &BlobStore, room: &str, corr: u64, message: Message) {
        match message {
            Message::BlobNeed { hash, ranges } => {
                if let Some(Some(up)) = self.uploads.get_mut(&hash) {
                    let through = corr.saturating_sub(CHUNK_CORR_BASE);
                    if up.on_need(&ranges, through).is_err() {
                        // A relay answering out of range: start over.
                        self.uploads.insert(hash, None);
                    } else if up.is_done() && store.dequeue(room, &hash).is_ok() {
                        self.uploads.remove(&hash);
                    }
                }
            }
            Message::BlobInfo { hash, outboard } => {
                let Some(fetch) = self.downloads.get_mut(&hash) else {
                    return;
                };
                let begun = Outboard::decode(&outboard)
                    .map_err(|e| e.to_string())
                    .and_then(|o| store.begin(&hash, &o).map_err(|e| e.to_string()));
                match begun {
                    Ok(held) => {
                        let mut down = Download::new(hash, DEFAULT_WINDOW);
                        match down.on_info(&outboard, Some(held)) {
                            Ok(()) if down.is_complete() => {
                                self.downloads.remove(&hash);
                            }
                            Ok(()) => fetch.download = Some(down),
                            Err(e) => fetch.failed = Some(e.to_string()),
                        }
                    }
                    Err(e) => fetch.failed = Some(e),
                }
            }
            Message::BlobChunk { hash, index, bytes } => {
                let Some(Fetch {
                    download: Some(down),
                    failed,
                    ..
                }) = self.downloads.get_mut(&hash)
                else {
                    return;
                };
                match down.on_chunk(index, &bytes) {
                    Ok(Landed::New) => {
                        if let Err(e) = store.write_group(&hash, index, &bytes) {
                            *failed = Some(e.to_string());
                        }
                    }
                    Ok(Landed::Duplicate) => {}
                    // A group that fails its check: the relay's copy is bad.
                    Err(e) => *failed = Some(e.to_string()),
                }
                if down.is_complete() {
                    self.downloads.remove(&hash);
                }
            }
            _ => {}
        }
    }

    /// The relay refused the request `related` names: a download fails; an
    /// upload is dropped and its refusal kept for the status. A refused
    /// group of an upload is offered again with the next `blob-need`.
    pub(crate) fn refused(&mut self, related: u64, why: String) {
        match self.asked.remove(&related) {
            Some((hash, false)) => {
                if let Some(fetch) = self.downloads.get_mut(&hash) {
                    fetch.failed = Some(why);
                }
            }
            Some((hash, true)) => {
                self.uploads.remove(&hash);
                self.refused = Some(why);
            }
            None => {}
        }
    }
}

impl Replica {
    fn blob_store(&self) -> Result<&BlobStore, Error> {
        self.blobs().ok_or(Error::NoBlobStore)
    }

    /// Stores the bytes `reader` yields as a blob (streamed, deduplicated)
    /// and returns its reference: put it in a field to share it.
    pub fn put_blob(&self, reader: impl Read, mime: &str) -> Result<BlobRef, Error> {
        let (hash, size) = self.blob_store()?.put(reader)?;
        Ok(BlobRef {
            hash,
            size,
            mime: mime.to_owned(),
        })
    }

    /// Every blob the replica holds, whole or in part.
    pub fn blobs_held(&self) -> Result<Vec<([u8; 32], BlobState)>, Error> {
        Ok(self.blob_store()?.list()?)
    }

    /// What the replica holds of blob `hash`.
    pub fn blob_state(&self, hash: &[u8; 32]) -> Result<BlobState, Error> {
        Ok(self.blob_store()?.state(hash)?)
    }

    /// A reader of blob `hash`, held whole here (each group checked as it
    /// is read).
    pub fn blob_reader(&self, hash: &[u8; 32]) -> Result<BlobReader<'_>, Error> {
        Ok(self.blob_store()?.reader(hash)?)
    }
}

impl Room {
    /// Stores the bytes `reader` yields as a blob and sets field `field`
    /// of the entry at `path` to its reference, in one call; the blob is
    /// uploaded while the room syncs ([`crate::Status::blobs_uploading`]
    /// counts what is left). Returns the reference.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), syncline::Error> {
    /// let replica = syncline::Replica::open("./my-replica")?;
    /// let notes = replica.room("notes")?;
    /// let photo = std::fs::File::open("photo.jpg").map_err(|source| syncline::Error::Dir {
    ///     dir: "photo.jpg".into(),
    ///     source,
    /// })?;
    /// let blob = notes.put_blob("/trip", "photo", photo, "image/jpeg")?;
    /// println!("{} bytes", blob.size);
    /// # Ok(())
    /// # }
    /// ```
    pub fn put_blob(
        &self,
        path: &str,
        field: &str,
        reader: impl Read,
        mime: &str,
    ) -> Result<BlobRef, Error> {
        let store = self.shared.blobs.as_deref().ok_or(Error::NoBlobStore)?;
        let (hash, size) = store.put(reader)?;
        let blob = BlobRef {
            hash,
            size,
            mime: mime.to_owned(),
        };
        self.transact(|tx| tx.set(path, field, Value::Blob(blob.clone())))?;
        self.upload_blob(&blob.hash)?;
        Ok(blob)
    }

    /// Uploads blob `hash` (held here) to the relay while the room syncs,
    /// in this process or a later one (the queue is durable).
    pub fn upload_blob(&self, hash: &[u8; 32]) -> Result<(), Error> {
        let store = self.shared.blobs.as_deref().ok_or(Error::NoBlobStore)?;
        store.enqueue(self.name(), hash)?;
        self.shared
            .lock()
            .transfers
            .uploads
            .entry(*hash)
            .or_insert(None);
        self.shared.wake_engine();
        Ok(())
    }

    /// Fetches blob `hash` from the relay this room syncs with, unless
    /// held here already, waiting up to `timeout`; resumes what an earlier
    /// fetch got. Needs a running sync of the room.
    pub fn fetch_blob(&self, hash: &[u8; 32], timeout: Duration) -> Result<(), Error> {
        let store = self.shared.blobs.as_deref().ok_or(Error::NoBlobStore)?;
        if matches!(store.state(hash)?, BlobState::Complete { .. }) {
            return Ok(());
        }
        self.shared
            .lock()
            .transfers
            .downloads
            .entry(*hash)
            .or_default();
        self.shared.wake_engine();
        let deadline = Instant::now() + timeout;
        loop {
            let failed = {
                let mut state = self.shared.lock();
                let failed = state
                    .transfers
                    .downloads
                    .get(hash)
                    .and_then(|f| f.failed.clone());
                if failed.is_some() {
                    state.transfers.downloads.remove(hash);
                }
                failed
            };
            if let Some(why) = failed {
                return Err(Error::BlobRefused { why });
            }
            if matches!(store.state(hash)?, BlobState::Complete { .. }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::BlobTimeout {
                    waited: timeout,
                    state: store.state(hash)?,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
