//! A room's blob transfers as the sync engine drives them: uploads of
//! what the durable queue holds, downloads asked for by
//! [`crate::Room::fetch_blob`].
//!
//! Each starts over the session (`blob-put` / `blob-get`: the relay learns
//! or tells the outboard, and what is lacking). Then, if the relay serves
//! direct URLs and the engine may use them, the bytes go over HTTP
//! ([`super::http`]) in a task beside the engine; otherwise, or if that
//! fails, over the session a window at a time (`blob-chunk` /
//! `blob-need`). Either way each group is checked as it lands, and what
//! either side holds is never sent again.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use syncline_core::blob::Outboard;
use syncline_core::blob::transfer::{DEFAULT_WINDOW, Download, Landed, Upload};
use syncline_core::proto::message::{Envelope, Message};
use syncline_store::{BlobState, BlobStore};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::http;

/// Correlation ids of blob requests start here, far above the session's
/// own, so that a refusal naming one is told apart from one naming a
/// pack; chunk sequence numbers of uploads start at [`CHUNK_CORR_BASE`].
pub(crate) const BLOB_CORR_BASE: u64 = 1 << 62;

/// See [`BLOB_CORR_BASE`].
const CHUNK_CORR_BASE: u64 = 3 << 61;

/// How a transfer's bytes move now.
#[derive(Debug, Default)]
enum Route {
    /// Over the session, a window at a time.
    #[default]
    Session,
    /// A `blob-grant` is to be sent.
    WantUrl,
    /// The `blob-grant` went out, then.
    AwaitingUrl(Instant),
    /// An HTTP transfer runs.
    Direct(JoinHandle<Result<(), String>>),
}

/// What a request was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    Get,
    Put,
    Url { put: bool },
}

/// An upload queued.
#[derive(Debug, Default)]
struct Sending {
    /// Begun on this connection (its `blob-put` sent).
    upload: Option<Upload>,
    route: Route,
    /// What the relay said it lacks, last.
    lacking: Vec<Range<u64>>,
    /// A direct URL failed for it: the session carries it from now on.
    no_direct: bool,
}

/// A download asked for.
#[derive(Debug, Default)]
struct Fetch {
    /// The `blob-get` went out on this connection.
    asked: bool,
    download: Option<Download>,
    route: Route,
    no_direct: bool,
    /// Why it failed, if the relay refused it.
    failed: Option<String>,
}

/// A room's transfers, driven by the sync engine.
#[derive(Debug, Default)]
pub(crate) struct Transfers {
    /// Blobs to upload while syncing.
    uploads: BTreeMap<[u8; 32], Sending>,
    /// Blobs to download.
    downloads: BTreeMap<[u8; 32], Fetch>,
    /// Requests sent, by correlation id: which blob, and what.
    asked: BTreeMap<u64, ([u8; 32], Asked)>,
    next_corr: u64,
    /// The relay's `host:port`, where direct URLs go on this connection,
    /// if the engine may use them.
    direct: Option<String>,
    /// Writes the groups downloads receive over the session.
    writer: Option<GroupWriter>,
    /// Wakes the engine (the writer when it caught up, an HTTP transfer
    /// when it ended).
    wake: Option<Arc<Notify>>,
    /// The last refusal of an upload, for the status.
    pub(crate) refused: Option<String>,
}

/// Aborts an HTTP transfer that is no longer wanted.
fn stop(route: &mut Route) {
    if let Route::Direct(task) = std::mem::take(route) {
        task.abort();
    }
}

/// How long a `blob-grant` may go unanswered before the transfer goes on
/// over the session (a relay older than direct URLs ignores it).
const URL_WAIT: Duration = Duration::from_secs(10);

/// Whether a `blob-grant` went unanswered for [`URL_WAIT`].
fn unanswered(route: &Route) -> bool {
    matches!(route, Route::AwaitingUrl(since) if since.elapsed() >= URL_WAIT)
}

/// The outcome of a finished HTTP transfer; `None` while it runs.
fn finished(route: &mut Route) -> Option<Result<(), String>> {
    let Route::Direct(task) = route else {
        return None;
    };
    if !task.is_finished() {
        return None;
    }
    let outcome = match task.now_or_never() {
        Some(Ok(outcome)) => outcome,
        Some(Err(e)) => Err(e.to_string()),
        None => return None,
    };
    *route = Route::Session;
    Some(outcome)
}

impl Transfers {
    /// Uploads still to finish.
    pub(crate) fn uploading(&self) -> usize {
        self.uploads.len()
    }

    /// Downloads under way (not failed).
    pub(crate) fn fetching(&self) -> usize {
        self.downloads
            .values()
            .filter(|f| f.failed.is_none())
            .count()
    }

    /// Queues an upload of `hash` (held whole here).
    pub(crate) fn upload(&mut self, hash: [u8; 32]) {
        self.uploads.entry(hash).or_default();
    }

    /// Asks for blob `hash` (unless asked for already).
    pub(crate) fn fetch(&mut self, hash: [u8; 32]) {
        self.downloads.entry(hash).or_default();
    }

    /// Asks for blob `hash` for the prefetch policy: like
    /// [`Transfers::fetch`], and one that failed (not yet uploaded, say) is
    /// asked for again.
    pub(crate) fn prefetch(&mut self, hash: [u8; 32]) {
        let fetch = self.downloads.entry(hash).or_default();
        if fetch.failed.take().is_some() {
            fetch.asked = false;
            fetch.download = None;
        }
    }

    /// Why the download of `hash` failed, once (it is forgotten).
    pub(crate) fn take_failure(&mut self, hash: &[u8; 32]) -> Option<String> {
        if let Some(failed) = self.writer.as_ref().and_then(|w| w.take_failure(hash)) {
            self.downloads.remove(hash);
            return Some(failed);
        }
        let failed = self.downloads.get(hash)?.failed.clone()?;
        self.downloads.remove(hash);
        Some(failed)
    }

    fn corr(&mut self, hash: [u8; 32], asked: Asked) -> u64 {
        self.next_corr += 1;
        let corr = BLOB_CORR_BASE + self.next_corr;
        self.asked.insert(corr, (hash, asked));
        corr
    }

    /// A connection is open: direct URLs go to relay `origin` if given.
    pub(crate) fn connected(&mut self, origin: Option<String>, wake: Arc<Notify>) {
        self.direct = origin;
        self.wake = Some(wake);
    }

    /// The connection ended: transfers start again on the next one, from
    /// what each side holds.
    pub(crate) fn disconnected(&mut self) {
        self.asked.clear();
        self.direct = None;
        for sending in self.uploads.values_mut() {
            sending.upload = None;
            stop(&mut sending.route);
        }
        for fetch in self.downloads.values_mut() {
            fetch.asked = false;
            fetch.download = None;
            stop(&mut fetch.route);
        }
    }

    /// The frames to send on session `session` now: offers, requests and
    /// groups within each transfer's window; starts HTTP transfers for the
    /// URLs that came, and takes stock of those that ended.
    pub(crate) fn pump(&mut self, store: &Arc<BlobStore>, session: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.pump_uploads(store, session, &mut out);
        self.pump_downloads(store, session, &mut out);
        out
    }

    fn pump_uploads(&mut self, store: &Arc<BlobStore>, session: u64, out: &mut Vec<Vec<u8>>) {
        let frame = |corr: u64, message: Message| Envelope::frame(session, corr, message);
        let hashes: Vec<[u8; 32]> = self.uploads.keys().copied().collect();
        for hash in hashes {
            let Some(sending) = self.uploads.get_mut(&hash) else {
                continue;
            };
            if unanswered(&sending.route) {
                sending.route = Route::Session;
                sending.no_direct = true;
            }
            if let Some(outcome) = finished(&mut sending.route) {
                // Offer it again: the relay's answer says what it lacks.
                sending.upload = None;
                sending.no_direct |= outcome.is_err();
                if let Err(why) = outcome {
                    tracing::debug!(why, "direct upload failed: going on over the session");
                }
            }
            if matches!(sending.route, Route::WantUrl) {
                sending.route = Route::AwaitingUrl(Instant::now());
                let corr = self.corr(hash, Asked::Url { put: true });
                out.push(frame(corr, Message::BlobGrant { hash, put: true }));
                continue;
            }
            let Some(sending) = self.uploads.get_mut(&hash) else {
                continue;
            };
            match (&mut sending.upload, &sending.route) {
                (None, _) => {
                    let Ok(Some(outboard)) = store.outboard(&hash) else {
                        continue;
                    };
                    stop(&mut sending.route);
                    sending.upload = Some(Upload::new(hash, &outboard, DEFAULT_WINDOW));
                    let corr = self.corr(hash, Asked::Put);
                    out.push(frame(
                        corr,
                        Message::BlobPut {
                            hash,
                            outboard: outboard.encode(),
                        },
                    ));
                }
                (Some(up), Route::Session) => {
                    for (index, seq) in up.next_groups() {
                        if let Ok(bytes) = store.read_group(&hash, index) {
                            out.push(frame(
                                CHUNK_CORR_BASE + seq,
                                Message::BlobChunk { hash, index, bytes },
                            ));
                        }
                    }
                }
                (Some(_), _) => {}
            }
        }
    }

    fn pump_downloads(&mut self, store: &Arc<BlobStore>, session: u64, out: &mut Vec<Vec<u8>>) {
        let frame = |corr: u64, message: Message| Envelope::frame(session, corr, message);
        let behind = self.writer.as_ref().is_some_and(GroupWriter::behind);
        let hashes: Vec<[u8; 32]> = self.downloads.keys().copied().collect();
        for hash in hashes {
            let Some(fetch) = self.downloads.get_mut(&hash) else {
                continue;
            };
            if fetch.failed.is_some() {
                continue;
            }
            if unanswered(&fetch.route) {
                fetch.route = Route::Session;
                fetch.no_direct = true;
            }
            if let Some(outcome) = finished(&mut fetch.route) {
                if let Err(why) = &outcome {
                    tracing::debug!(why, "direct download failed: going on over the session");
                    fetch.no_direct = true;
                }
                // Go on from what the store holds now.
                fetch.download = None;
                match resume(store, &hash) {
                    Ok(None) => {
                        self.downloads.remove(&hash);
                        continue;
                    }
                    Ok(Some(down)) => fetch.download = Some(down),
                    Err(e) => fetch.failed = Some(e),
                }
            }
            if !fetch.asked && fetch.download.is_none() {
                fetch.asked = true;
                let corr = self.corr(hash, Asked::Get);
                out.push(frame(corr, Message::BlobGet { hash }));
                continue;
            }
            if matches!(fetch.route, Route::WantUrl) {
                fetch.route = Route::AwaitingUrl(Instant::now());
                let corr = self.corr(hash, Asked::Url { put: false });
                out.push(frame(corr, Message::BlobGrant { hash, put: false }));
                continue;
            }
            if let (Some(down), Route::Session, false) = (&mut fetch.download, &fetch.route, behind)
                && let Some(ranges) = down.next_request()
            {
                out.push(frame(
                    0,
                    Message::BlobNeed {
                        hash,
                        ranges: ranges.into_iter().map(|r| (r.start, r.end)).collect(),
                    },
                ));
            }
        }
    }

    /// Loads room `room`'s durable upload queue (at its first sync).
    pub(crate) fn load_queue(&mut self, store: &BlobStore, room: &str) {
        if let Ok(queued) = store.queued(room) {
            for hash in queued {
                self.upload(hash);
            }
        }
    }

    /// A blob frame from the relay (`corr` as it came) for room `room`.
    pub(crate) fn heard(
        &mut self,
        store: &Arc<BlobStore>,
        room: &str,
        corr: u64,
        message: Message,
    ) {
        match message {
            Message::BlobNeed { hash, ranges } => {
                let direct = self.direct.is_some();
                let Some(sending) = self.uploads.get_mut(&hash) else {
                    return;
                };
                let Some(up) = sending.upload.as_mut() else {
                    return;
                };
                let through = corr.saturating_sub(CHUNK_CORR_BASE);
                if up.on_need(&ranges, through).is_err() {
                    // A relay answering out of range: start over.
                    sending.upload = None;
                } else if up.is_done() {
                    if store.dequeue(room, &hash).is_ok() {
                        self.uploads.remove(&hash);
                    }
                } else if direct && !sending.no_direct && matches!(sending.route, Route::Session) {
                    sending.lacking = ranges.iter().map(|&(s, e)| s..e).collect();
                    sending.route = Route::WantUrl;
                }
            }
            Message::BlobInfo { hash, outboard } => {
                let direct = self.direct.is_some();
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
                            Ok(()) => {
                                fetch.download = Some(down);
                                if direct && !fetch.no_direct {
                                    fetch.route = Route::WantUrl;
                                }
                            }
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
                        let wake = self.wake.clone();
                        let writer = self
                            .writer
                            .get_or_insert_with(|| GroupWriter::new(store, wake));
                        if let Err(e) = writer.write(hash, index, bytes) {
                            *failed = Some(e);
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
            Message::BlobUrl { hash, path, .. } => self.start_direct(store, corr, hash, path),
            _ => {}
        }
    }

    /// A URL came for the request `corr`: the transfer goes over HTTP.
    fn start_direct(&mut self, store: &Arc<BlobStore>, corr: u64, hash: [u8; 32], path: String) {
        let (Some(&(_, Asked::Url { put })), Some(origin)) =
            (self.asked.get(&corr), self.direct.clone())
        else {
            return;
        };
        self.asked.remove(&corr);
        let Ok(Some(outboard)) = store.outboard(&hash) else {
            return;
        };
        let blob = http::Target {
            origin,
            path,
            store: store.clone(),
            hash,
            size: outboard.size(),
        };
        if put {
            let Some(sending) = self.uploads.get_mut(&hash) else {
                return;
            };
            let ranges = std::mem::take(&mut sending.lacking);
            sending.route = Route::Direct(spawn(self.wake.clone(), http::upload(blob, ranges)));
        } else {
            let Some(fetch) = self.downloads.get_mut(&hash) else {
                return;
            };
            let Ok(Some(held)) = store.held(&hash) else {
                return;
            };
            let wake = self.wake.clone();
            fetch.route = Route::Direct(spawn(wake, http::download(blob, held.missing())));
        }
    }

    /// The relay refused the request `related` names: a download fails; an
    /// upload is dropped and its refusal kept for the status; a URL refused
    /// leaves the transfer on the session. A refused group of an upload is
    /// offered again with the next `blob-need`.
    pub(crate) fn refused(&mut self, related: u64, why: String) {
        match self.asked.remove(&related) {
            Some((hash, Asked::Get)) => {
                if let Some(fetch) = self.downloads.get_mut(&hash) {
                    fetch.failed = Some(why);
                }
            }
            Some((hash, Asked::Put)) => {
                self.uploads.remove(&hash);
                self.refused = Some(why);
            }
            Some((hash, Asked::Url { put: true })) => {
                if let Some(sending) = self.uploads.get_mut(&hash) {
                    sending.route = Route::Session;
                    sending.no_direct = true;
                }
            }
            Some((hash, Asked::Url { put: false })) => {
                if let Some(fetch) = self.downloads.get_mut(&hash) {
                    fetch.route = Route::Session;
                    fetch.no_direct = true;
                }
            }
            None => {}
        }
    }
}

/// Groups [`GroupWriter`] may hold before downloads stop asking for
/// more: 4 MiB.
const WRITER_QUEUE: usize = 64;

/// Writes downloaded groups to the store on a thread of its own, so the
/// engine never waits for the disk: the store syncs a partial blob every
/// few MiB, which can take tens of milliseconds that every frame behind it
/// (an edit from another peer among them) would wait. Bounded without
/// blocking: while [`WRITER_QUEUE`] groups wait, downloads ask for no more
/// (see [`GroupWriter::behind`]), and the thread wakes the engine when it
/// has caught up.
#[derive(Debug)]
struct GroupWriter {
    queue: std::sync::mpsc::Sender<([u8; 32], u64, Vec<u8>)>,
    /// Groups queued and not yet written.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    /// Why writing a blob failed, by blob.
    failed: Arc<std::sync::Mutex<BTreeMap<[u8; 32], String>>>,
}

impl GroupWriter {
    fn new(store: &Arc<BlobStore>, wake: Option<Arc<Notify>>) -> GroupWriter {
        use std::sync::atomic::Ordering;
        let (queue, groups) = std::sync::mpsc::channel::<([u8; 32], u64, Vec<u8>)>();
        let failed = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (store, failures, left) = (store.clone(), failed.clone(), pending.clone());
        // Ends when the queue's sender (the room's transfers) is dropped.
        std::thread::spawn(move || {
            for (hash, index, bytes) in groups {
                if let Err(e) = store.write_group(&hash, index, &bytes) {
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(hash, e.to_string());
                }
                // Caught up from a full queue: downloads may ask again.
                if left.fetch_sub(1, Ordering::AcqRel) == WRITER_QUEUE
                    && let Some(wake) = &wake
                {
                    wake.notify_one();
                }
            }
        });
        GroupWriter {
            queue,
            pending,
            failed,
        }
    }

    fn write(&self, hash: [u8; 32], index: u64, bytes: Vec<u8>) -> Result<(), String> {
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.queue
            .send((hash, index, bytes))
            .map_err(|_| "the blob writer stopped".to_owned())
    }

    /// Whether downloads should wait for the disk before asking for more.
    fn behind(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Acquire) >= WRITER_QUEUE
    }

    fn take_failure(&self, hash: &[u8; 32]) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash)
    }
}

/// Runs an HTTP transfer beside the engine, waking it when done.
fn spawn(
    wake: Option<Arc<Notify>>,
    transfer: impl Future<Output = Result<(), String>> + Send + 'static,
) -> JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let outcome = transfer.await;
        if let Some(wake) = wake {
            wake.notify_one();
        }
        outcome
    })
}

/// A download of `hash` going on from what `store` holds; `None` if it
/// holds the whole blob.
fn resume(store: &BlobStore, hash: &[u8; 32]) -> Result<Option<Download>, String> {
    if matches!(store.state(hash), Ok(BlobState::Complete { .. })) {
        return Ok(None);
    }
    let outboard = store
        .outboard(hash)
        .map_err(|e| e.to_string())?
        .ok_or("the blob was removed meanwhile")?;
    let held = store.held(hash).map_err(|e| e.to_string())?;
    let mut down = Download::new(*hash, DEFAULT_WINDOW);
    down.on_info(&outboard.encode(), held)
        .map_err(|e| e.to_string())?;
    Ok(Some(down))
}
