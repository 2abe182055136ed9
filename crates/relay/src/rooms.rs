//! Rooms as actors: each loaded room runs on its own thread, owns its
//! durable history and the server sessions of every client in it, and is
//! fed envelopes by the connections through a channel.
//!
//! Order of work for each envelope: the session handles it, every node it
//! inserted is persisted (`DurableRoom::with_room`), and only then are acks
//! sent and the inserted nodes relayed to the room's other sessions. A
//! storage failure closes every session of the room with `overloaded` and
//! unloads it: a failed write leaves the disk state unknown, so the room
//! reloads from disk when next needed and nothing unpersisted is ever
//! acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
pub(crate) use std::sync::mpsc::Sender;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use syncline_core::proto::message::{Envelope, Message, Reason};
use syncline_core::proto::session::{EncodedPack, Event, Session};
use syncline_core::{Keypair, NodeIdx, RoomId};
use syncline_store::{DurableRoom, Store};
use tracing::{debug, debug_span, info, info_span, warn};

use crate::Config;
use crate::conn::ConnHandle;
use crate::telemetry;

/// Most inputs a room handles (and persists) together.
const MAX_BATCH: usize = 256;

/// What a room actor is told.
#[derive(Debug)]
pub(crate) enum RoomInput {
    /// An envelope for session `session` of connection `conn`.
    Frame {
        conn: u64,
        session: u64,
        env: Box<Envelope>,
        out: ConnHandle,
        received: Instant,
    },
    /// The connection is gone: drop its sessions.
    Gone { conn: u64 },
    /// Close every session with `shutting_down` and stop.
    Shutdown,
}

/// A loaded room's inbox and thread.
struct Loaded {
    inbox: Sender<RoomInput>,
    thread: Option<JoinHandle<()>>,
}

struct Entry {
    session: Session,
    out: ConnHandle,
    peer: Option<String>,
    /// Nodes sent already counted in the metrics.
    counted_sent: u64,
}

/// The loaded rooms.
pub(crate) struct Rooms {
    store: Arc<dyn Store>,
    key: Keypair,
    config: Config,
    loaded: Mutex<HashMap<RoomId, Loaded>>,
    epoch: Instant,
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms").finish_non_exhaustive()
    }
}

impl Rooms {
    pub(crate) fn new(store: Arc<dyn Store>, key: Keypair, config: Config) -> Arc<Rooms> {
        Arc::new(Rooms {
            store,
            key,
            config,
            loaded: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RoomId, Loaded>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `input` to `room`'s actor, loading the room if needed, and
    /// returns the actor's inbox (connections keep it per session, sparing
    /// this lock on every frame; when a send to it fails, they come back).
    pub(crate) fn send(
        self: &Arc<Self>,
        room: &RoomId,
        input: RoomInput,
    ) -> Option<Sender<RoomInput>> {
        let mut loaded = self.lock();
        let input = match loaded.get(room) {
            Some(l) => match l.inbox.send(input) {
                Ok(()) => return Some(l.inbox.clone()),
                // The actor stopped (storage failure): load it afresh.
                Err(mpsc::SendError(input)) => input,
            },
            None => input,
        };
        if matches!(input, RoomInput::Gone { .. } | RoomInput::Shutdown) {
            return None; // Nothing to tell an unloaded room.
        }
        let (tx, rx) = mpsc::channel();
        let _ = tx.send(input);
        let rooms = self.clone();
        let id = room.clone();
        let thread = std::thread::Builder::new()
            .name(format!("room {}", room.as_str()))
            .spawn(move || rooms.run_room(id, rx))
            .expect("spawning a room thread");
        loaded.insert(
            room.clone(),
            Loaded {
                inbox: tx.clone(),
                thread: Some(thread),
            },
        );
        metrics::gauge!(telemetry::ROOMS_LOADED).set(loaded.len() as f64);
        Some(tx)
    }

    /// Tells every room to close its sessions and waits for them to stop.
    pub(crate) fn shutdown(&self) {
        let threads: Vec<JoinHandle<()>> = {
            let mut loaded = self.lock();
            loaded
                .values_mut()
                .filter_map(|l| {
                    let _ = l.inbox.send(RoomInput::Shutdown);
                    l.thread.take()
                })
                .collect()
        };
        for t in threads {
            let _ = t.join();
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The actor: loads the room, then serves its inbox until shut down,
    /// idle, or broken by a storage failure.
    fn run_room(self: Arc<Self>, id: RoomId, inbox: Receiver<RoomInput>) {
        let span = info_span!("room", room = %id.as_str());
        let _enter = span.enter();
        let mut actor = match DurableRoom::load(self.store.clone(), self.key.clone(), &id) {
            Ok(room) => {
                info!(nodes = room.room().dag().len(), "room loaded");
                Actor {
                    rooms: self.clone(),
                    room,
                    sessions: BTreeMap::new(),
                    idle_since: Some(Instant::now()),
                    dirty: BTreeSet::new(),
                    all_dirty: false,
                }
            }
            Err(e) => {
                // Connections waiting on this room time out their
                // handshakes and retry; the next input loads it again.
                warn!(error = %e, "cannot load room");
                self.remove(&id);
                return;
            }
        };
        loop {
            let wait = actor.next_wake(self.now());
            let input = match inbox.recv_timeout(wait) {
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let idle = actor
                .idle_since
                .is_some_and(|t| t.elapsed() >= self.config.room_idle);
            if input.is_none() && idle {
                // The next load then opens from the checkpoint without
                // replaying anything. A failure costs only that replay.
                if let Err(e) = actor.room.checkpoint() {
                    warn!(error = %e, "cannot write the room's checkpoint");
                }
            }
            let input = match (input, idle) {
                (None, true) => match self.try_unload(&id, &inbox) {
                    None => {
                        info!("room unloaded (idle)");
                        return;
                    }
                    Some(input) => Some(input),
                },
                (input, _) => input,
            };
            let Some(input) = input else {
                actor.fire_timers();
                continue;
            };
            // Take what else is waiting, to persist it all in one write.
            let mut batch = vec![input];
            batch.extend(inbox.try_iter().take(MAX_BATCH));
            let shutdown = batch.iter().any(|i| matches!(i, RoomInput::Shutdown));
            if let Err(e) = actor.handle_batch(batch) {
                warn!(error = %e, "storage failed: closing the room's sessions");
                actor.close_all(Reason::Overloaded, "storage failed; reconnect");
                break;
            }
            if shutdown {
                actor.close_all(Reason::ShuttingDown, "the server is stopping");
                if let Err(e) = actor.room.checkpoint() {
                    warn!(error = %e, "cannot write the room's checkpoint");
                }
                break;
            }
        }
        self.remove(&id);
    }

    fn remove(&self, id: &RoomId) {
        let mut loaded = self.lock();
        loaded.remove(id);
        metrics::gauge!(telemetry::ROOMS_LOADED).set(loaded.len() as f64);
    }

    /// Removes the room from the loaded set, unless an input arrived (it
    /// is returned, and the room stays loaded to handle it). Holding the
    /// lock, no connection can send to this inbox meanwhile.
    fn try_unload(&self, id: &RoomId, inbox: &Receiver<RoomInput>) -> Option<RoomInput> {
        let mut loaded = self.lock();
        if let Ok(input) = inbox.try_recv() {
            return Some(input);
        }
        loaded.remove(id);
        metrics::gauge!(telemetry::ROOMS_LOADED).set(loaded.len() as f64);
        None
    }
}

/// One loaded room and its sessions.
struct Actor {
    rooms: Arc<Rooms>,
    room: DurableRoom,
    sessions: BTreeMap<(u64, u64), Entry>,
    /// When the last session left (`None` while any is open).
    idle_since: Option<Instant>,
    /// Sessions that may have events or frames to handle (all of them
    /// after a relay or a timer sweep): with many idle subscribers, acks
    /// then cost per ack, not per session.
    dirty: BTreeSet<(u64, u64)>,
    all_dirty: bool,
}

impl Actor {
    fn next_wake(&self, now: u64) -> Duration {
        let timer = self
            .sessions
            .values()
            .filter_map(|e| e.session.poll_timeout())
            .min()
            .map_or(Duration::from_secs(1), |t| {
                Duration::from_millis(t.saturating_sub(now))
            });
        timer.min(Duration::from_secs(1))
    }

    /// Handles a batch of inputs: every frame's session step runs first,
    /// then everything they inserted is persisted in one write (one fsync
    /// for the batch: group commit), and only then are acks sent and the
    /// nodes relayed.
    fn handle_batch(&mut self, inputs: Vec<RoomInput>) -> Result<(), syncline_store::ReplicaError> {
        let now = self.rooms.now();
        let config = &self.rooms.config.session;
        let room_id = self.room.room().id().clone();
        let sessions = &mut self.sessions;
        let dirty = &mut self.dirty;
        let mut idle_since = self.idle_since;
        // Per frame: (session, first and end of what it inserted, arrival).
        let mut steps: Vec<((u64, u64), NodeIdx, NodeIdx, Instant)> = Vec::new();
        let mut gone = Vec::new();
        self.room.with_room(|r, _| {
            for input in inputs {
                let (conn, session, env, out, received) = match input {
                    RoomInput::Frame {
                        conn,
                        session,
                        env,
                        out,
                        received,
                    } => (conn, session, env, out, received),
                    RoomInput::Gone { conn } => {
                        gone.push(conn);
                        continue;
                    }
                    RoomInput::Shutdown => continue,
                };
                let key = (conn, session);
                if let Message::Hello { peer, .. } = &env.message {
                    // A new session (or a fresh handshake on a session id
                    // whose session ended).
                    if sessions.get(&key).is_none_or(|e| e.session.is_closed()) {
                        sessions.insert(
                            key,
                            Entry {
                                session: Session::server(
                                    now,
                                    session,
                                    room_id.clone(),
                                    config.clone(),
                                ),
                                out: out.clone(),
                                peer: Some(peer.to_string()),
                                counted_sent: 0,
                            },
                        );
                        metrics::gauge!(telemetry::SESSIONS).increment(1.0);
                        idle_since = None;
                    }
                }
                let Some(entry) = sessions.get_mut(&key) else {
                    // Not a session here: tell the client.
                    out.send(Envelope::close_frame(
                        session,
                        Reason::Malformed,
                        "no session: send hello first",
                    ));
                    continue;
                };
                let first = r.dag().next_idx();
                let span = debug_span!(
                    "session",
                    peer = entry.peer.as_deref().unwrap_or("?"),
                    session
                );
                let _enter = span.enter();
                entry.session.handle_envelope(now, *env, r, None);
                steps.push((key, first, r.dag().next_idx(), received));
                dirty.insert(key);
            }
        })?;
        self.idle_since = idle_since;
        // Durable now: relay what the batch brought, then ack and flush.
        let brought: Vec<((u64, u64), Vec<NodeIdx>)> = steps
            .iter()
            .filter(|(_, first, end, _)| end > first)
            .map(|&(key, first, end, _)| (key, (first..end).collect()))
            .collect();
        let inserted: usize = brought.iter().map(|(_, nodes)| nodes.len()).sum();
        if inserted > 0 {
            metrics::counter!(telemetry::NODES_IN).increment(inserted as u64);
            self.relay(&brought);
        }
        for conn in gone {
            self.drop_connection(conn);
        }
        self.after(now);
        for (_, _, _, received) in steps {
            metrics::histogram!(telemetry::RELAY_SECONDS).record(received.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn drop_connection(&mut self, conn: u64) {
        let gone: Vec<(u64, u64)> = self
            .sessions
            .keys()
            .filter(|(c, _)| *c == conn)
            .copied()
            .collect();
        for key in gone {
            if let Some(e) = self.sessions.remove(&key) {
                if !e.session.is_closed() {
                    metrics::counter!(telemetry::SESSIONS_CLOSED, "reason" => "disconnected")
                        .increment(1);
                }
                end_session(&e, "disconnected");
            }
        }
    }

    /// Relays the nodes a batch inserted (durable now), each session
    /// getting those it did not send itself. Under load a batch holds many
    /// sessions' edits, so each subscriber gets one pack (one frame, one
    /// ack) per batch rather than one per edit; the pack is encoded once
    /// for every session that sent nothing in the batch.
    fn relay(&mut self, brought: &[((u64, u64), Vec<NodeIdx>)]) {
        let now = self.rooms.now();
        self.all_dirty = true;
        let mut all: Vec<NodeIdx> = brought
            .iter()
            .flat_map(|(_, nodes)| nodes.iter().copied())
            .collect();
        all.sort_unstable();
        let encode = |room: &mut DurableRoom, nodes: &[NodeIdx]| {
            // Encoding inserts nothing, so this writes nothing.
            match room.with_room(|r, _| EncodedPack::new(r, nodes)) {
                Ok(Ok(pack)) => Some(pack),
                Ok(Err(e)) => {
                    // Nodes a relay cannot vouch for as one pack: sessions
                    // then send what they can, and close loudly otherwise.
                    warn!(error = %e, "cannot encode a relayed pack");
                    None
                }
                Err(_) => None,
            }
        };
        let shared = encode(&mut self.room, &all);
        for (key, entry) in &mut self.sessions {
            let own = brought.iter().find(|(from, _)| from == key);
            let nodes: Vec<NodeIdx> = match own {
                None => all.clone(),
                Some((_, mine)) => all.iter().copied().filter(|n| !mine.contains(n)).collect(),
            };
            if nodes.is_empty() {
                continue;
            }
            let own_pack;
            let pack = match (own, &shared) {
                (None, Some(pack)) => Some(pack),
                _ => {
                    own_pack = encode(&mut self.room, &nodes);
                    own_pack.as_ref()
                }
            };
            let session = &mut entry.session;
            let _ = self.room.with_room(|r, _| match pack {
                Some(pack) => session.relay_pack(now, r, &nodes, pack),
                None => session.send_nodes(now, r, &nodes, None),
            });
        }
    }

    /// Handles every session's events, sends their frames, and drops the
    /// sessions that ended.
    fn after(&mut self, now: u64) {
        let mut ended = Vec::new();
        let keys: Vec<(u64, u64)> = if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            self.sessions.keys().copied().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        for key in &keys {
            let Some(entry) = self.sessions.get_mut(key) else {
                continue;
            };
            let span = debug_span!(
                "session",
                peer = entry.peer.as_deref().unwrap_or("?"),
                session = key.1
            );
            let _enter = span.enter();
            let (sent, _) = entry.session.nodes_sent();
            metrics::counter!(telemetry::NODES_OUT).increment(sent - entry.counted_sent);
            entry.counted_sent = sent;
            while let Some(event) = entry.session.poll_event() {
                match event {
                    Event::Accepted { corr, .. } => {
                        entry.session.acknowledge(now, corr, self.room.room());
                    }
                    Event::Connected => {
                        let strategy = entry.session.strategy().unwrap_or("none");
                        metrics::counter!(telemetry::DIFF_STRATEGY, "strategy" => strategy)
                            .increment(1);
                        debug!(strategy, "session connected");
                    }
                    Event::Closed {
                        reason, message, ..
                    } => {
                        metrics::counter!(telemetry::SESSIONS_CLOSED, "reason" => reason.as_str().to_owned())
                            .increment(1);
                        debug!(reason = reason.as_str(), message, "session closed");
                        ended.push(*key);
                    }
                    _ => {}
                }
            }
            let mut lagging = false;
            while let Some(frame) = entry.session.poll_transmit() {
                metrics::counter!(telemetry::BYTES_OUT).increment(frame.len() as u64);
                if !entry.out.send(frame) {
                    lagging = true;
                    break;
                }
            }
            if lagging {
                // Its queue is full: the client reconnects and catches up.
                entry.out.kill(Reason::Lagging);
                metrics::counter!(telemetry::SESSIONS_CLOSED, "reason" => "lagging").increment(1);
                ended.push(*key);
            }
        }
        for key in ended {
            if let Some(e) = self.sessions.remove(&key) {
                end_session(&e, "ended");
            }
        }
        if self.sessions.is_empty() && self.idle_since.is_none() {
            self.idle_since = Some(Instant::now());
        }
    }

    fn fire_timers(&mut self) {
        let now = self.rooms.now();
        self.all_dirty = true;
        let room = &mut self.room;
        for entry in self.sessions.values_mut() {
            if entry.session.poll_timeout().is_some_and(|t| t <= now) {
                // Timers insert nothing, so this writes nothing.
                let _ = room.with_room(|r, _| entry.session.handle_timeout(now, r, None));
            }
        }
        self.after(now);
    }

    fn close_all(&mut self, reason: Reason, message: &str) {
        let now = self.rooms.now();
        self.all_dirty = true;
        for entry in self.sessions.values_mut() {
            entry.session.close(now, reason.clone(), message);
        }
        self.after(now);
    }
}

/// Records a session's end in the metrics.
fn end_session(entry: &Entry, why: &str) {
    metrics::gauge!(telemetry::SESSIONS).decrement(1.0);
    let (_, catchup) = entry.session.nodes_sent();
    metrics::histogram!(telemetry::CATCHUP_NODES).record(catchup as f64);
    debug!(
        peer = entry.peer.as_deref().unwrap_or("?"),
        why, "session removed"
    );
}
