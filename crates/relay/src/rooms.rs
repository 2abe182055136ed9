//! Rooms as tasks: each loaded room is a tokio task that owns a
//! [`RoomHub`] (the room's durable history and the server sessions in it)
//! and is fed envelopes by the connections through a bounded inbox.
//!
//! The hub's work (loading, stepping a batch, persisting, firing timers)
//! is blocking, so it runs on tokio's blocking pool, at most
//! [`Config::room_workers`] steps at once: a thousand loaded rooms cost a
//! thousand small tasks, not a thousand threads. Between steps a room
//! checks its inbox, so a newcomer's `hello` waits at most one step (timer
//! sweeps are sliced by the hub).
//!
//! Bounds: at most [`Config::max_rooms`] rooms are loaded (past it, rooms
//! without sessions are asked to unload and the newcomer is refused with
//! `overloaded`); a room's inbox holds at most
//! [`Config::room_inbox_bytes`] of frames, and a connection that cannot
//! queue within [`Config::inbox_wait`] is closed `overloaded`. A storage
//! failure closes the room's sessions with `overloaded` and unloads it (it
//! reloads from disk when next needed); a panic in a step does the same,
//! for that room only.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use syncline_core::auth::Access;
use syncline_core::pack::inflated_len;
use syncline_core::proto::message::{Envelope, Message, Reason};
use syncline_core::{Keypair, RoomId};
use syncline_hub::{BlobUrls, End, HubConfig, HubEvent, Input, RoomHub, SessionKey};
use syncline_store::{BlobStore, DurableRoom, Store};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::Config;
use crate::blob_http::{BlobHttp, Grants};
use crate::conn::ConnHandle;
use crate::fleet::Fleet;
use crate::telemetry;

/// Most inputs a room steps (and persists) together.
const MAX_BATCH: usize = 256;
/// Most frame bytes a room steps together (a step of a few tens of
/// milliseconds, so other connections' inputs and the timers wait little).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Inputs a room's inbox holds (besides its byte bound).
const INBOX_INPUTS: usize = 1024;

/// What a room task is told.
#[derive(Debug)]
pub(crate) enum RoomInput {
    /// An envelope that came over connection `conn`.
    Frame {
        conn: u64,
        env: Box<Envelope>,
        /// For a `hello`: what the connection admitted it with (its
        /// expiry on the rooms' clock).
        access: Option<Box<Access>>,
        /// Its size on the wire.
        bytes: usize,
        out: ConnHandle,
        received: Instant,
        /// Its share of the inbox's byte bound, returned once stepped.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// The connection is gone: drop its sessions.
    Gone { conn: u64 },
}

/// Why a frame could not be queued for its room.
#[derive(Debug)]
pub(crate) enum Refused {
    /// Too many rooms are loaded.
    TooManyRooms,
    /// The room's inbox stayed full for [`Config::inbox_wait`].
    InboxFull,
}

/// A connection's way into one room.
#[derive(Clone, Debug)]
pub(crate) struct RoomInbox {
    inputs: mpsc::Sender<RoomInput>,
    bytes: Arc<Semaphore>,
    /// The byte bound (a frame above it takes the whole inbox).
    capacity: usize,
}

/// A loaded room, as the registry sees it.
struct Loaded {
    inbox: RoomInbox,
    /// The room's open sessions (0: it may be evicted).
    sessions: Arc<AtomicUsize>,
    /// Asks an idle room to unload now.
    evict: Arc<Notify>,
    /// The nodes it holds (as of its last step).
    nodes: Arc<AtomicU64>,
    /// Asks it to catch up with what other relays stored.
    behind: Arc<Behind>,
}

/// Whether a room should catch up with what other relays stored: taken
/// by its next batch (which catches up first), or on its own when the
/// room has nothing else to do, and a wake for an idle one.
#[derive(Debug, Default)]
struct Behind {
    due: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Behind {
    fn mark(&self) {
        self.due.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether a catch-up is due (and now taken).
    fn take(&self) -> bool {
        self.due.swap(false, Ordering::AcqRel)
    }
}

/// The loaded rooms.
pub(crate) struct Rooms {
    store: Arc<dyn Store>,
    /// Blob bytes, shared by every room (each serves what it may see).
    blobs: Arc<BlobStore>,
    /// Signs direct blob URLs, if the relay serves them.
    grants: Option<Arc<Grants>>,
    key: Keypair,
    /// The keys whose capabilities the relay trusts (its own first): a
    /// locked room's policy roots.
    roots: Vec<syncline_core::AuthorId>,
    config: Config,
    loaded: Mutex<HashMap<RoomId, Loaded>>,
    /// Room steps running on the blocking pool.
    workers: Arc<Semaphore>,
    /// What frames being stepped may inflate to, in bytes, process-wide.
    inflate: Arc<Semaphore>,
    /// `true` once the server stops.
    stop: watch::Sender<bool>,
    /// Rooms whose last write failed: their next load makes what the store
    /// reads back durable first.
    write_failed: Mutex<std::collections::HashSet<RoomId>>,
    /// The store is past [`Config::max_store_bytes`].
    pub(crate) store_full: std::sync::atomic::AtomicBool,
    /// Held while an invite is redeemed.
    invites: Mutex<()>,
    /// Capability ids revoked while the relay runs: rooms close the
    /// sessions resting on them.
    revoked: watch::Sender<Arc<std::collections::HashSet<[u8; 16]>>>,
    tasks: Mutex<JoinSet<()>>,
    epoch: Instant,
    /// Where commits are told to the other relays of a fleet.
    fleet: Fleet,
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms").finish_non_exhaustive()
    }
}

impl Rooms {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        blobs: Arc<BlobStore>,
        grants: Option<Arc<Grants>>,
        key: Keypair,
        config: Config,
        fleet: Fleet,
    ) -> Arc<Rooms> {
        let mut roots = vec![key.author()];
        roots.extend(config.trusted_keys.iter().copied());
        Arc::new(Rooms {
            store,
            blobs,
            grants,
            key,
            roots,
            workers: Arc::new(Semaphore::new(config.room_workers.max(1))),
            inflate: Arc::new(Semaphore::new(config.inflate_budget_bytes)),
            config,
            loaded: Mutex::new(HashMap::new()),
            stop: watch::Sender::new(false),
            store_full: std::sync::atomic::AtomicBool::new(false),
            revoked: watch::Sender::new(Arc::default()),
            invites: Mutex::new(()),
            write_failed: Mutex::new(std::collections::HashSet::new()),
            tasks: Mutex::new(JoinSet::new()),
            epoch: Instant::now(),
            fleet,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RoomId, Loaded>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_write_failed(&self) -> MutexGuard<'_, std::collections::HashSet<RoomId>> {
        self.write_failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The inbox of `room`, loading it if needed.
    pub(crate) fn inbox(self: &Arc<Self>, room: &RoomId) -> Result<RoomInbox, Refused> {
        let mut loaded = self.lock();
        if let Some(l) = loaded.get(room)
            && !l.inbox.inputs.is_closed()
        {
            return Ok(l.inbox.clone());
        }
        if loaded.len() >= self.config.max_rooms {
            // Make room for later: rooms without sessions unload now.
            for l in loaded.values() {
                if l.sessions.load(Ordering::Relaxed) == 0 {
                    l.evict.notify_one();
                }
            }
            metrics::counter!(telemetry::REFUSED, "why" => "rooms").increment(1);
            return Err(Refused::TooManyRooms);
        }
        Ok(self.start(&mut loaded, room.clone(), Vec::new()))
    }

    /// Starts a task for `room`, with `inputs` already in its inbox.
    fn start(
        self: &Arc<Self>,
        loaded: &mut HashMap<RoomId, Loaded>,
        room: RoomId,
        inputs: Vec<RoomInput>,
    ) -> RoomInbox {
        let (tx, rx) = mpsc::channel(INBOX_INPUTS.max(inputs.len()));
        for input in inputs {
            let _ = tx.try_send(input);
        }
        let inbox = RoomInbox {
            inputs: tx,
            bytes: Arc::new(Semaphore::new(self.config.room_inbox_bytes)),
            capacity: self.config.room_inbox_bytes,
        };
        let sessions = Arc::new(AtomicUsize::new(0));
        let evict = Arc::new(Notify::new());
        let nodes = Arc::new(AtomicU64::new(0));
        let behind = Arc::new(Behind::default());
        let task = RoomTask {
            rooms: self.clone(),
            id: room.clone(),
            inbox: rx,
            sessions: sessions.clone(),
            evict: evict.clone(),
            nodes: nodes.clone(),
            behind: behind.clone(),
            outs: HashMap::new(),
            open: BTreeSet::new(),
            pending: BTreeMap::new(),
            next_conn: 0,
            inserted: false,
        };
        // Its own root span: the connection that loaded it is not its
        // parent.
        let span = info_span!(parent: None, "room", room = %room.as_str());
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(task.run().instrument(span));
        loaded.insert(
            room,
            Loaded {
                inbox: inbox.clone(),
                sessions,
                evict,
                nodes,
                behind,
            },
        );
        metrics::gauge!(telemetry::ROOMS_LOADED).set(loaded.len() as f64);
        inbox
    }

    /// Tells every room to close its sessions with `shutting_down` and
    /// waits for them to stop, at most `grace`.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.stop.send_replace(true);
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            warn!("rooms still busy at shutdown: stopping without waiting");
        }
    }

    /// Another relay of the fleet stored `room` up to `nodes` nodes: if
    /// it is loaded here with fewer, it catches up. Whether it was behind.
    pub(crate) fn stored_elsewhere(&self, room: &RoomId, nodes: u64) -> bool {
        let loaded = self.lock();
        let Some(l) = loaded.get(room) else {
            return false;
        };
        let behind = l.nodes.load(Ordering::Relaxed) < nodes;
        if behind {
            l.behind.mark();
        }
        behind
    }

    /// The rooms loaded now.
    pub(crate) fn loaded_rooms(&self) -> Vec<RoomId> {
        self.lock().keys().cloned().collect()
    }

    /// The relay's blob store.
    pub(crate) fn blobs(&self) -> Arc<BlobStore> {
        self.blobs.clone()
    }

    /// What the direct blob routes serve, if the relay serves them (a
    /// request body may stall `idle`).
    pub(crate) fn blob_http(&self, idle: Duration) -> Option<Arc<BlobHttp>> {
        Some(Arc::new(BlobHttp {
            grants: self.grants.clone()?,
            store: self.blobs.clone(),
            idle,
        }))
    }

    /// The keys whose capabilities the relay trusts, its own first.
    pub(crate) fn roots(&self) -> &[syncline_core::AuthorId] {
        &self.roots
    }

    /// The store the rooms live in.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Uses an invite once, serialized so that one code never yields two
    /// tokens (see `admin::redeem`).
    pub(crate) fn redeem(
        &self,
        secret: &[u8; 16],
        subject: syncline_core::AuthorId,
    ) -> Result<String, (axum::http::StatusCode, String)> {
        let _one_at_a_time = self.invites.lock().unwrap_or_else(|p| p.into_inner());
        crate::admin::redeem(self.store.as_ref(), &self.key, secret, subject)
    }

    /// Revokes capability `id`: every loaded room closes, with
    /// `unauthorized`, the sessions whose access rests on it.
    pub(crate) async fn revoke(&self, id: [u8; 16]) {
        self.revoked.send_modify(|ids| {
            Arc::make_mut(ids).insert(id);
        });
    }

    /// The rooms' clock (milliseconds since the server started), which
    /// their sessions' timers and expiries read.
    pub(crate) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs `f` on `hub` on the blocking pool, at most
    /// [`Config::room_workers`] at once. `None` if it panicked (the hub is
    /// lost; the room's sessions are closed by the caller).
    async fn step<R: Send + 'static>(
        &self,
        mut hub: Box<RoomHub>,
        f: impl FnOnce(&mut RoomHub) -> R + Send + 'static,
    ) -> Option<(Box<RoomHub>, R)> {
        let _permit = self.workers.acquire().await.ok()?;
        tokio::task::spawn_blocking(move || {
            let out = f(&mut hub);
            (hub, out)
        })
        .await
        .ok()
    }

    fn remove(&self, id: &RoomId) {
        let mut loaded = self.lock();
        loaded.remove(id);
        metrics::gauge!(telemetry::ROOMS_LOADED).set(loaded.len() as f64);
    }
}

impl RoomInbox {
    /// Queues `input`, waiting at most `wait` for room in the inbox. The
    /// input comes back if the room's task has stopped (load it again).
    pub(crate) async fn send(
        &self,
        mut input: RoomInput,
        wait: Duration,
    ) -> Result<(), Result<RoomInput, Refused>> {
        let queued = async {
            if let RoomInput::Frame { bytes, permit, .. } = &mut input {
                let n = u32::try_from((*bytes).min(self.capacity)).unwrap_or(u32::MAX);
                *permit = Some(
                    self.bytes
                        .clone()
                        .acquire_many_owned(n)
                        .await
                        .expect("the inbox semaphore is never closed"),
                );
            }
            self.inputs.send(input).await
        };
        match tokio::time::timeout(wait, queued).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(mpsc::error::SendError(input))) => Err(Ok(input)),
            Err(_) => Err(Err(Refused::InboxFull)),
        }
    }
}

/// One loaded room's task.
struct RoomTask {
    rooms: Arc<Rooms>,
    id: RoomId,
    inbox: mpsc::Receiver<RoomInput>,
    sessions: Arc<AtomicUsize>,
    evict: Arc<Notify>,
    /// What it holds, for the registry ([`Loaded::nodes`]).
    nodes: Arc<AtomicU64>,
    /// Marked when another relay stored more of it.
    behind: Arc<Behind>,
    /// The connections with sessions here.
    outs: HashMap<u64, ConnHandle>,
    /// The open sessions (to close them if the hub is lost).
    open: BTreeSet<SessionKey>,
    /// Inputs taken from the inbox, per connection in arrival order, so
    /// batches take turns across connections: a newcomer's `hello` does
    /// not wait behind a flood of another peer's frames. They keep their
    /// share of the inbox's byte bound until stepped.
    pending: BTreeMap<u64, VecDeque<RoomInput>>,
    /// The connection the next batch starts with.
    next_conn: u64,
    /// The last step inserted sessions' nodes.
    inserted: bool,
}

/// What a room does next.
enum Work {
    /// Step a batch of pending inputs.
    Batch,
    /// Fire the due timers (a slice of them).
    Timers,
    /// Close the sessions resting on revoked capabilities.
    Revoked,
    /// Catch up with what other relays stored.
    CatchUp,
    /// Nothing due.
    Idle,
}

impl RoomTask {
    async fn run(mut self) {
        let rooms = self.rooms.clone();
        let (store, key, id) = (rooms.store.clone(), rooms.key.clone(), self.id.clone());
        let mut session = rooms.config.session.clone();
        // A session never has more in flight than its connection's queue
        // holds, or a client that reads promptly would count as lagging.
        session.send_window_bytes = session
            .send_window_bytes
            .min((rooms.config.outbound_queue_bytes / 2).max(session.pack_bytes));
        let hub_config = HubConfig {
            session,
            slice_bytes: rooms.config.slice_bytes,
            max_room_bytes: rooms.config.max_room_bytes,
            presence_burst: rooms.config.presence_burst,
            presence_per_sec: rooms.config.presence_per_sec,
        };
        // After a failed write, what the store reads back may not be
        // durable: the load makes it so first (or fails).
        let after_failure = rooms.lock_write_failed().remove(&id);
        // A locked room is governed by the relay's roots, declared in its
        // history (`auth::governance`).
        let governed_by =
            (!rooms.config.open_rooms.iter().any(|p| p.matches(&id))).then(|| rooms.roots.clone());
        let loaded = {
            let _permit = rooms.workers.acquire().await;
            tokio::task::spawn_blocking(move || {
                let mut room = if after_failure {
                    DurableRoom::load_after_failure(store.clone(), key, &id)?
                } else {
                    DurableRoom::load(store.clone(), key, &id)?
                };
                if let Some(roots) = governed_by {
                    // Declaring a fresh room's policy appends: relays of a
                    // fleet take turns, and see each other's declarations.
                    let locked = store.lock(id.as_str())?;
                    if locked.is_some() {
                        room.refresh()?;
                    }
                    let fresh = room.room().dag().is_empty();
                    syncline_hub::govern(&mut room, roots, crate::conn::unix_ms())?;
                    if fresh {
                        info!("room locked: its policy is declared in its history");
                    }
                }
                let bytes = store.room_bytes(&id)?;
                Ok::<_, syncline_store::ReplicaError>((room, bytes.history + bytes.checkpoint))
            })
            .await
        };
        if after_failure && !matches!(loaded, Ok(Ok(_))) {
            rooms.lock_write_failed().insert(self.id.clone());
        }
        let mut hub = match loaded {
            Ok(Ok((room, bytes))) => {
                info!(nodes = room.room().dag().len(), bytes, "room loaded");
                self.nodes
                    .store(u64::from(room.stored()), Ordering::Relaxed);
                let mut hub = Box::new(RoomHub::new(room, hub_config, bytes));
                let urls = rooms.grants.clone().map(|g| g as Arc<dyn BlobUrls>);
                hub.set_blob_store(rooms.blobs.clone(), urls);
                hub
            }
            Ok(Err(e)) => return self.fail(&format!("cannot load the room: {e}")),
            Err(_) => return self.fail("loading the room panicked"),
        };
        let mut stop = rooms.stop.subscribe();
        let mut revoked = rooms.revoked.subscribe();
        // Sessions of this room open from now on were admitted against
        // the revocations known at admission.
        revoked.mark_unchanged();
        let mut idle_since = Some(Instant::now());
        // After a batch, due timers go first: inputs never starve the
        // catch-ups, nor catch-ups the inputs.
        let mut timers_first = false;
        loop {
            self.take_inbox();
            // One pass over the sessions' timers per turn (a room may hold
            // thousands).
            let next_timer = hub.poll_timeout();
            let timers_due = next_timer.is_some_and(|t| t <= rooms.now());
            // A batch catches up with other relays' writes first (see
            // `handle_batch`); with no batch to step, a catch-up of its own.
            let work = if timers_due && (timers_first || self.pending.is_empty()) {
                Work::Timers
            } else if !self.pending.is_empty() {
                Work::Batch
            } else if self.behind.take() {
                Work::CatchUp
            } else {
                let wake = next_timer.map_or(Duration::from_secs(1), |t| {
                    Duration::from_millis(t.saturating_sub(rooms.now()))
                });
                tokio::select! {
                    biased;
                    () = crate::stopped(&mut stop) => return self.shut_down(hub).await,
                    input = self.inbox.recv() => match input {
                        Some(input) => {
                            self.queue(input);
                            continue;
                        }
                        None => break,
                    },
                    Ok(()) = revoked.changed() => Work::Revoked,
                    () = self.behind.wake.notified() => continue,
                    () = self.evict.notified() => {
                        if hub.session_count() == 0 {
                            idle_since = Some(Instant::now() - rooms.config.room_idle);
                        }
                        Work::Idle
                    }
                    () = tokio::time::sleep(wake.min(Duration::from_secs(1))) => Work::Idle,
                }
            };
            if *stop.borrow() {
                return self.shut_down(hub).await;
            }
            let stepped = match work {
                Work::Batch => {
                    timers_first = true;
                    let batch = self.next_batch();
                    self.handle_batch(hub, batch).await
                }
                Work::Timers => {
                    timers_first = false;
                    let now = rooms.now();
                    rooms
                        .step(hub, move |h| h.handle_timeout(now))
                        .await
                        .map(|(hub, ())| (hub, true))
                }
                Work::Revoked => {
                    let now = rooms.now();
                    let ids = revoked.borrow_and_update().clone();
                    for id in ids.iter() {
                        let closed = hub.revoke(now, id);
                        if closed > 0 {
                            info!(closed, "sessions closed: their capability was revoked");
                        }
                    }
                    Some((hub, true))
                }
                Work::CatchUp => {
                    let now = rooms.now();
                    rooms
                        .step(hub, move |h| match h.catch_up(now) {
                            Ok(_) => true,
                            Err(e) => {
                                warn!(error = %e, "cannot catch up with the other relays");
                                false
                            }
                        })
                        .await
                }
                Work::Idle if idle_since.is_some_and(|t| t.elapsed() >= rooms.config.room_idle) => {
                    return self.unload(hub).await;
                }
                Work::Idle => Some((hub, true)),
            };
            let Some((stepped, stored)) = stepped else {
                return self.fail("a room step panicked");
            };
            hub = stepped;
            self.dispatch(&mut hub);
            let held = u64::from(hub.room().stored());
            if self.nodes.swap(held, Ordering::Relaxed) < held && self.inserted {
                // Ours (and perhaps others' caught up with): the fleet hears.
                rooms.fleet.stored(&self.id, held);
            }
            self.inserted = false;
            if !stored {
                warn!("storage failed: closed the room's sessions; it reloads when next needed");
                self.rooms.lock_write_failed().insert(self.id.clone());
                break;
            }
            if hub.session_count() == 0 {
                idle_since.get_or_insert_with(Instant::now);
            } else {
                idle_since = None;
            }
        }
        self.rooms.remove(&self.id);
    }

    /// Moves what waits in the inbox to the per-connection queues.
    fn take_inbox(&mut self) {
        while let Ok(input) = self.inbox.try_recv() {
            self.queue(input);
        }
    }

    fn queue(&mut self, input: RoomInput) {
        let conn = match &input {
            RoomInput::Frame { conn, .. } | RoomInput::Gone { conn } => *conn,
        };
        self.pending.entry(conn).or_default().push_back(input);
    }

    /// The next batch: one input per connection in turn, from where the
    /// last batch stopped, up to [`MAX_BATCH`] inputs and
    /// [`MAX_BATCH_BYTES`] of frames.
    fn next_batch(&mut self) -> Vec<RoomInput> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES && !self.pending.is_empty() {
            let conn = self
                .pending
                .range(self.next_conn..)
                .next()
                .or_else(|| self.pending.iter().next())
                .map(|(c, _)| *c)
                .expect("pending is not empty");
            let queue = self.pending.get_mut(&conn).expect("just found");
            let input = queue.pop_front().expect("queues are never left empty");
            if queue.is_empty() {
                self.pending.remove(&conn);
            }
            if let RoomInput::Frame { bytes: b, .. } = &input {
                bytes += b;
            }
            batch.push(input);
            self.next_conn = conn + 1;
        }
        batch
    }

    /// Steps a batch on the blocking pool: `Some((hub, stored))`, `stored`
    /// false after a storage failure (the hub closed every session);
    /// `None` if the step panicked.
    async fn handle_batch(
        &mut self,
        hub: Box<RoomHub>,
        batch: Vec<RoomInput>,
    ) -> Option<(Box<RoomHub>, bool)> {
        let mut inputs = Vec::with_capacity(batch.len());
        let mut received = Vec::new();
        let mut gone = Vec::new();
        let mut inflate = 0usize;
        for input in batch {
            match input {
                RoomInput::Frame {
                    conn,
                    env,
                    access,
                    out,
                    received: at,
                    ..
                } => {
                    if let Message::Pack { pack, .. } = &env.message {
                        inflate += inflated_len(pack).unwrap_or(0);
                    }
                    self.outs.entry(conn).or_insert(out);
                    received.push(at);
                    inputs.push(match access {
                        Some(access) => Input::Hello {
                            conn,
                            env,
                            access: *access,
                        },
                        None => Input::Frame { conn, env },
                    });
                }
                RoomInput::Gone { conn } => {
                    gone.push(conn);
                    inputs.push(Input::Gone { conn });
                }
            }
        }
        // The batch's packs inflate within the process-wide budget.
        let budget =
            u32::try_from(inflate.min(self.rooms.config.inflate_budget_bytes)).unwrap_or(u32::MAX);
        let _inflating = match budget {
            0 => None,
            n => self.rooms.inflate.clone().acquire_many_owned(n).await.ok(),
        };
        let now = self.rooms.now();
        let store_full = self.rooms.store_full.load(Ordering::Relaxed);
        // Other relays' writes go out first: their delivery has waited a
        // commit and a notice already.
        let behind = self.behind.take();
        let (hub, stored) = self
            .rooms
            .step(hub, move |h| {
                if behind {
                    h.mark_behind();
                }
                h.set_store_full(store_full);
                h.handle_batch(now, inputs)
            })
            .await?;
        if let Err(e) = &stored {
            warn!(error = %e, "storage failed");
        }
        for conn in gone {
            self.outs.remove(&conn);
        }
        for at in received {
            metrics::histogram!(telemetry::RELAY_SECONDS).record(at.elapsed().as_secs_f64());
        }
        Some((hub, stored.is_ok()))
    }

    /// Sends the hub's frames to their connections (a connection whose
    /// queue is full is closed `lagging`, its sessions dropped) and turns
    /// its events into metrics.
    fn dispatch(&mut self, hub: &mut RoomHub) {
        loop {
            let mut lagging = Vec::new();
            // Blob bytes go to each connection's bulk queue.
            let next = |hub: &mut RoomHub| {
                let sync = hub.poll_transmit().map(|(conn, f)| (conn, false, f));
                sync.or_else(|| hub.poll_bulk().map(|(conn, f)| (conn, true, f)))
            };
            while let Some((conn, is_bulk, frame)) = next(hub) {
                let Some(out) = self.outs.get(&conn) else {
                    continue; // Gone meanwhile.
                };
                metrics::counter!(telemetry::BYTES_OUT).increment(frame.len() as u64);
                let len = frame.len();
                let queued = if is_bulk {
                    out.send_bulk(frame)
                } else {
                    out.send(frame)
                };
                if !queued {
                    debug!(
                        conn,
                        frame = len,
                        queued = out.queued(),
                        "connection lagging"
                    );
                    lagging.push(conn);
                }
            }
            for conn in &lagging {
                if let Some(out) = self.outs.remove(conn) {
                    out.kill(Reason::Lagging);
                    metrics::counter!(telemetry::CONNECTIONS_CLOSED, "reason" => "lagging")
                        .increment(1);
                }
                hub.lagging(*conn);
            }
            self.record_events(hub);
            if lagging.is_empty() {
                break;
            }
        }
        self.sessions.store(hub.session_count(), Ordering::Relaxed);
    }

    fn record_events(&mut self, hub: &mut RoomHub) {
        while let Some(event) = hub.poll_event() {
            match event {
                HubEvent::Opened { key, peer } => {
                    self.open.insert(key);
                    metrics::gauge!(telemetry::SESSIONS).increment(1.0);
                    debug!(peer = %peer, session = key.session, conn = key.conn, "session opened");
                }
                HubEvent::Connected { key, strategy } => {
                    let strategy = strategy.capability();
                    metrics::counter!(telemetry::DIFF_STRATEGY, "strategy" => strategy)
                        .increment(1);
                    debug!(
                        strategy,
                        session = key.session,
                        conn = key.conn,
                        "session connected"
                    );
                }
                HubEvent::Ended {
                    key,
                    end,
                    catchup_nodes,
                } => {
                    self.open.remove(&key);
                    metrics::gauge!(telemetry::SESSIONS).decrement(1.0);
                    metrics::histogram!(telemetry::CATCHUP_NODES).record(catchup_nodes as f64);
                    let reason = match &end {
                        End::Closed { reason, .. } => reason.as_str().to_owned(),
                        End::Disconnected => "disconnected".to_owned(),
                        End::Lagging => "lagging".to_owned(),
                    };
                    debug!(
                        reason,
                        session = key.session,
                        conn = key.conn,
                        "session ended"
                    );
                    metrics::counter!(telemetry::SESSIONS_CLOSED, "reason" => reason).increment(1);
                }
                HubEvent::Inserted { key, nodes } => {
                    self.inserted = true;
                    metrics::counter!(telemetry::NODES_IN).increment(nodes as u64);
                    if let Some(out) = self.outs.get(&key.conn) {
                        out.inserted(nodes);
                    }
                }
                HubEvent::Learned { nodes } => {
                    metrics::counter!(telemetry::FLEET_NODES_LEARNED).increment(nodes as u64);
                    debug!(nodes, "caught up with other relays");
                }
                HubEvent::Sent { nodes } => {
                    metrics::counter!(telemetry::NODES_OUT).increment(nodes);
                }
                HubEvent::PresenceRefused { key } => {
                    metrics::counter!(telemetry::REFUSED, "why" => "presence_rate").increment(1);
                    debug!(
                        session = key.session,
                        conn = key.conn,
                        "dropped a presence update past its budget"
                    );
                }
                HubEvent::BlobRefsFailed { error } => {
                    error!(
                        error,
                        "cannot record blob references: blob garbage collection stops"
                    );
                }
                HubEvent::Refused { key, message } => {
                    metrics::counter!(telemetry::NODES_REFUSED).increment(1);
                    info!(
                        session = key.session,
                        conn = key.conn,
                        message,
                        "refused a node its author may not write"
                    );
                }
            }
        }
    }

    /// The room could not be loaded or its hub was lost: every session it
    /// had, and every frame waiting for it, is refused with `overloaded`
    /// (the clients reconnect, and the room loads again).
    fn fail(mut self, why: &str) {
        error!(why, "room failed");
        for key in std::mem::take(&mut self.open) {
            if let Some(out) = self.outs.get(&key.conn) {
                out.send(Envelope::close_frame(key.session, Reason::Overloaded, why));
            }
            metrics::gauge!(telemetry::SESSIONS).decrement(1.0);
            metrics::counter!(telemetry::SESSIONS_CLOSED, "reason" => "overloaded").increment(1);
        }
        self.rooms.remove(&self.id);
        self.inbox.close();
        self.take_inbox();
        for input in std::mem::take(&mut self.pending).into_values().flatten() {
            if let RoomInput::Frame { env, out, .. } = input {
                out.send(Envelope::close_frame(env.session, Reason::Overloaded, why));
            }
        }
    }

    /// The server stops: close every session with `shutting_down`, then
    /// write the checkpoint (a cache: skipped if the grace period ends
    /// first).
    async fn shut_down(mut self, hub: Box<RoomHub>) {
        let now = self.rooms.now();
        let closed = self
            .rooms
            .step(hub, move |h| {
                h.close_all(now, Reason::ShuttingDown, "the server is stopping");
            })
            .await;
        let Some((mut hub, ())) = closed else {
            return self.fail("closing the room panicked");
        };
        self.dispatch(&mut hub);
        let written = self.rooms.step(hub, RoomHub::checkpoint).await;
        if let Some((_, Err(e))) = written {
            warn!(error = %e, "cannot write the room's checkpoint");
        }
        self.rooms.remove(&self.id);
    }

    /// Unloads an idle room: writes its checkpoint (so the next load
    /// replays nothing), then leaves the registry. Frames that arrived
    /// meanwhile go to a fresh load of the room.
    async fn unload(&mut self, hub: Box<RoomHub>) {
        let written = self.rooms.step(hub, RoomHub::checkpoint).await;
        if let Some((_, Err(e))) = written {
            warn!(error = %e, "cannot write the room's checkpoint");
        }
        let mut loaded = self.rooms.lock();
        self.inbox.close();
        let late: Vec<RoomInput> = std::iter::from_fn(|| self.inbox.try_recv().ok()).collect();
        loaded.remove(&self.id);
        if !late.is_empty() {
            self.rooms.start(&mut loaded, self.id.clone(), late);
        }
        metrics::gauge!(telemetry::ROOMS_LOADED).set(loaded.len() as f64);
        info!("room unloaded (idle)");
    }
}
