//! One room on a server: its durable history and the server sessions of
//! every connection in it, stepped without I/O.
//!
//! Order of work for a batch of inputs: each envelope goes to its session,
//! then everything the batch inserted is persisted in one write (group
//! commit), and only then are acks queued and the inserted nodes relayed
//! to the room's other sessions, encoded once for all of them. A storage
//! failure closes every session with `overloaded`: the write left the disk
//! state unknown, the room reloaded from disk, and the sessions' view of it
//! is stale; nothing the batch inserted is acknowledged.
//!
//! **Servers sharing a store** (a fleet on one PostgreSQL database): a
//! batch that may insert takes the room's lock across servers
//! (`Store::lock`), catches up with what the others stored (relayed to
//! the sessions as any insert is), and only then steps, so its write is
//! never refused as stale; when the driver hears that another server
//! wrote, [`RoomHub::catch_up`] does the same between batches, or
//! [`RoomHub::mark_behind`] has the next batch catch up first. On a store
//! without other writers there is no lock and nothing to catch up with.
//!
//! Timers are served in slices: one call of [`RoomHub::handle_timeout`]
//! stops once its frames pass [`HubConfig::slice_bytes`], resuming with the
//! next session in turn, so a driver that checks its inbox between calls
//! answers a newcomer's `hello` while other sessions catch up.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use syncline_core::auth::Access;
use syncline_core::proto::message::{Envelope, Message, PresenceStatus, Reason};
use syncline_core::proto::session::{
    Config as SessionConfig, EncodedPack, Event, Session, Strategy,
};
use syncline_core::{AuthorId, NodeIdx};
use syncline_store::{BlobStore, DurableRoom, ReplicaError};

use crate::blobs::{BlobUrls, RoomBlobs};
use crate::presence::{Presence, Shown, refused_frame};

/// A session on a server: the connection it came over, and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey {
    /// The connection (any number the driver gives it).
    pub conn: u64,
    /// The session id the client chose.
    pub session: u64,
}

/// The sender of nodes another server stored: no session's key (a
/// driver's connection numbers stop short of it).
const ELSEWHERE: SessionKey = SessionKey {
    conn: u64::MAX,
    session: u64::MAX,
};

/// What a hub is fed.
#[derive(Debug)]
pub enum Input {
    /// A `hello` that came over connection `conn`, which the driver
    /// admitted with `access` (`auth::admit`, its expiry on the hub's
    /// clock). A `hello` fed as a plain [`Input::Frame`] is refused.
    Hello {
        /// The connection.
        conn: u64,
        /// The decoded envelope.
        env: Box<Envelope>,
        /// What the session may do.
        access: Access,
    },
    /// Any other envelope that came over connection `conn`.
    Frame {
        /// The connection.
        conn: u64,
        /// The decoded envelope.
        env: Box<Envelope>,
    },
    /// Connection `conn` is gone: drop its sessions.
    Gone {
        /// The connection.
        conn: u64,
    },
}

/// How a hub serves its sessions.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Timers and sizes of each session.
    pub session: SessionConfig,
    /// A timer sweep stops once it has produced this many bytes of frames
    /// (at least one session is always served), so catch-ups of a large
    /// room take turns with everything else the room has to do.
    pub slice_bytes: usize,
    /// Bytes of packs a room's history may grow to: once past, a session
    /// that sends a pack is closed with `quota_exceeded` (reading goes
    /// on).
    pub max_room_bytes: u64,
    /// Presence updates a session may send at once.
    pub presence_burst: u32,
    /// Presence updates a session may send per second, sustained.
    pub presence_per_sec: u32,
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            session: SessionConfig::default(),
            slice_bytes: 1 << 20,
            max_room_bytes: u64::MAX,
            presence_burst: 10,
            presence_per_sec: 5,
        }
    }
}

/// How a session left the hub.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// It closed (a `close` was sent or received).
    Closed {
        /// Why.
        reason: Reason,
        /// Whether the client ended it.
        by_peer: bool,
    },
    /// Its connection went away.
    Disconnected,
    /// Its connection could not take its frames (the driver said so with
    /// [`RoomHub::lagging`]).
    Lagging,
}

/// What a hub tells its driver, for metrics and logs.
#[derive(Clone, Debug, PartialEq)]
pub enum HubEvent {
    /// A `hello` opened a session.
    Opened {
        /// Which.
        key: SessionKey,
        /// The client's author id, as it said in `hello`.
        peer: AuthorId,
    },
    /// A session's handshake completed.
    Connected {
        /// Which.
        key: SessionKey,
        /// The difference strategy chosen.
        strategy: Strategy,
    },
    /// A session left the hub.
    Ended {
        /// Which.
        key: SessionKey,
        /// How.
        end: End,
        /// Nodes it sent in catch-up packs over its life.
        catchup_nodes: u64,
    },
    /// A session's frames in a batch inserted nodes, now durable.
    Inserted {
        /// Which session sent them.
        key: SessionKey,
        /// How many.
        nodes: usize,
    },
    /// A session's pack held a node its author may not write (the
    /// room's policy); it was refused, the session goes on.
    Refused {
        /// Which session sent it.
        key: SessionKey,
        /// What was refused, and why.
        message: String,
    },
    /// Sessions sent nodes in packs.
    Sent {
        /// How many, since the last such event.
        nodes: u64,
    },
    /// A session's presence update came past its budget and was dropped.
    PresenceRefused {
        /// Which session sent it.
        key: SessionKey,
    },
    /// Nodes other servers sharing the store stored in this room were
    /// caught up with and relayed to the room's sessions.
    Learned {
        /// How many.
        nodes: usize,
    },
    /// Blob references could not be recorded in the blob store's index:
    /// it collects no garbage from now on (the batch stands).
    BlobRefsFailed {
        /// What failed.
        error: String,
    },
}

struct Member {
    session: Session,
    /// Nodes sent already reported in [`HubEvent::Sent`].
    reported_sent: u64,
    /// Its presence (shown once it sends one).
    presence: Presence,
}

/// One room and the server sessions in it.
pub struct RoomHub {
    room: DurableRoom,
    config: HubConfig,
    sessions: BTreeMap<SessionKey, Member>,
    /// Sessions that may have events or frames to handle (all of them after
    /// a relay): with many idle subscribers, acks then cost per ack, not
    /// per session.
    dirty: BTreeSet<SessionKey>,
    all_dirty: bool,
    /// The last session a timer sweep served; the next starts after it.
    turn: Option<SessionKey>,
    transmit: VecDeque<(u64, Vec<u8>)>,
    /// Blob answers: sent only when no `transmit` frame waits (see
    /// [`RoomHub::poll_bulk`]).
    bulk: VecDeque<(u64, Vec<u8>)>,
    events: VecDeque<HubEvent>,
    /// What the history holds, in bytes: stored when loaded, plus the packs
    /// that inserted nodes since.
    room_bytes: u64,
    /// The store as a whole is out of its quota (the driver says so).
    store_full: bool,
    /// The number the next session gets among the room's presences.
    next_client: u64,
    /// The relay's blob store, as this room serves it (`None`: no blobs).
    blobs: Option<RoomBlobs>,
    /// Other servers wrote: the next batch catches up first.
    behind: bool,
}

impl std::fmt::Debug for RoomHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomHub")
            .field("room", self.room.room().id())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl RoomHub {
    /// A hub for a loaded room, with no sessions yet; its history takes
    /// `room_bytes` in the store.
    pub fn new(room: DurableRoom, config: HubConfig, room_bytes: u64) -> RoomHub {
        RoomHub {
            room_bytes,
            store_full: false,
            room,
            config,
            sessions: BTreeMap::new(),
            dirty: BTreeSet::new(),
            all_dirty: false,
            turn: None,
            transmit: VecDeque::new(),
            bulk: VecDeque::new(),
            events: VecDeque::new(),
            next_client: 1,
            blobs: None,
            behind: false,
        }
    }

    /// Serves blob transfers from `store` (`docs/protocol.md` §5.9), and
    /// direct URLs signed by `urls` if given; without a store, blob
    /// messages are answered `not_found`.
    pub fn set_blob_store(&mut self, store: Arc<BlobStore>, urls: Option<Arc<dyn BlobUrls>>) {
        self.blobs = Some(RoomBlobs::new(store, urls));
    }

    /// The room.
    pub fn room(&self) -> &DurableRoom {
        &self.room
    }

    /// Writes the room's checkpoint (before unloading an idle room, so the
    /// next load replays nothing).
    pub fn checkpoint(&mut self) -> Result<(), ReplicaError> {
        self.room.checkpoint()
    }

    /// Whether the store as a whole is out of its quota: while it is, a
    /// session that sends a pack is closed with `quota_exceeded`.
    pub fn set_store_full(&mut self, full: bool) {
        self.store_full = full;
    }

    /// Bytes of history: stored at load, plus the packs inserted since.
    pub fn room_bytes(&self) -> u64 {
        self.room_bytes
    }

    /// How many sessions are open.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Whether every session is settled (nothing in flight either way) and
    /// no frame waits to be sent.
    pub fn is_settled(&self) -> bool {
        self.transmit.is_empty()
            && self.bulk.is_empty()
            && self.sessions.values().all(|m| m.session.is_settled())
    }

    /// Steps a batch of inputs, persists what they inserted in one write,
    /// then acknowledges and relays it. On a storage failure every session
    /// is closed with `overloaded` (their frames are queued) and the error
    /// returned: the driver should drop the hub and load the room afresh.
    pub fn handle_batch(
        &mut self,
        now: u64,
        inputs: impl IntoIterator<Item = Input>,
    ) -> Result<(), ReplicaError> {
        let inputs: Vec<Input> = inputs.into_iter().collect();
        let may_insert = inputs.iter().any(|input| {
            matches!(input, Input::Frame { env, .. } if matches!(env.message, Message::Pack { .. }))
        });
        // Held until the batch is stored (not while it is acknowledged and
        // relayed): no other server appends between the catch-up and this
        // batch's write.
        let store = self.room.store().clone();
        let locked = match may_insert {
            true => match store.lock(self.room.room().id().as_str()) {
                Ok(locked) => locked,
                Err(e) => {
                    self.close_all(now, Reason::Overloaded, "storage failed; reconnect");
                    return Err(e.into());
                }
            },
            false => None,
        };
        // What other servers stored, caught up with (under the lock if the
        // batch may insert) before the batch steps; relayed with the
        // batch's nodes once the lock is released.
        let learned = match (locked.is_some(), std::mem::take(&mut self.behind)) {
            (false, false) => Vec::new(),
            _ => self.learn(now)?,
        };
        let config = &self.config.session;
        let room_id = self.room.room().id().clone();
        let sessions = &mut self.sessions;
        let dirty = &mut self.dirty;
        let transmit = &mut self.transmit;
        let events = &mut self.events;
        let over_quota = match (
            self.store_full,
            self.room_bytes >= self.config.max_room_bytes,
        ) {
            (true, _) => Some("the server is out of its disk quota"),
            (_, true) => Some("the room is out of its disk quota"),
            _ => None,
        };
        let mut grew = 0u64;
        // Per frame that inserted something: its session and what it
        // inserted.
        let mut brought: Vec<(SessionKey, Vec<NodeIdx>)> = Vec::new();
        let mut gone = Vec::new();
        let mut presence_in: Vec<(SessionKey, Shown)> = Vec::new();
        let mut blob_in: Vec<(SessionKey, u64, Message)> = Vec::new();
        let next_client = &mut self.next_client;
        let presence_burst = self.config.presence_burst;
        let stepped = self.room.with_room(|r, _| {
            for input in inputs {
                let (conn, env, access) = match input {
                    Input::Hello { conn, env, access } => (conn, env, Some(access)),
                    Input::Frame { conn, env } => (conn, env, None),
                    Input::Gone { conn } => {
                        gone.push(conn);
                        continue;
                    }
                };
                let key = SessionKey {
                    conn,
                    session: env.session,
                };
                if let Message::Hello { peer, .. } = &env.message {
                    let Some(access) = access else {
                        transmit.push_back((
                            conn,
                            Envelope::close_frame(
                                key.session,
                                Reason::Unauthorized,
                                "hello not admitted",
                            ),
                        ));
                        continue;
                    };
                    // A new session, or a fresh handshake on the id of one
                    // that ended.
                    if sessions.get(&key).is_none_or(|m| m.session.is_closed()) {
                        let mut session = Session::server(
                            now,
                            key.session,
                            room_id.clone(),
                            config.clone(),
                            access,
                        );
                        let mut present: Vec<AuthorId> = sessions
                            .values()
                            .filter(|m| m.presence.shown.is_some())
                            .map(|m| m.presence.peer)
                            .collect();
                        present.sort_unstable();
                        present.dedup();
                        session.set_welcome_peers(present);
                        let client = *next_client;
                        *next_client += 1;
                        sessions.insert(
                            key,
                            Member {
                                session,
                                reported_sent: 0,
                                presence: Presence::new(*peer, client, presence_burst, now),
                            },
                        );
                        events.push_back(HubEvent::Opened { key, peer: *peer });
                    }
                }
                let Some(member) = sessions.get_mut(&key) else {
                    transmit.push_back((
                        conn,
                        Envelope::close_frame(
                            key.session,
                            Reason::Malformed,
                            "no session with this id: send hello first",
                        ),
                    ));
                    continue;
                };
                if let Message::Presence {
                    status,
                    message,
                    data,
                    ..
                } = env.message
                {
                    // Ephemeral: the hub handles it, not the session.
                    presence_in.push((
                        key,
                        Shown {
                            status,
                            message,
                            data,
                        },
                    ));
                    continue;
                }
                if env.message.is_blob() {
                    // Beside the session too: the hub's blob store.
                    blob_in.push((key, env.corr, env.message));
                    continue;
                }
                let pack_bytes = match &env.message {
                    Message::Pack { pack, .. } => Some(pack.len() as u64),
                    _ => None,
                };
                if let (Some(_), Some(why)) = (pack_bytes, over_quota) {
                    // Nothing more is stored; what the room holds is still
                    // served.
                    member.session.close(now, Reason::QuotaExceeded, why);
                    dirty.insert(key);
                    continue;
                }
                let first = r.dag().next_idx();
                member.session.handle_envelope(now, *env, r, None);
                let end = r.dag().next_idx();
                if end > first {
                    grew += pack_bytes.unwrap_or(0);
                    match brought.last_mut() {
                        Some((k, nodes)) if *k == key => nodes.extend(first..end),
                        _ => brought.push((key, (first..end).collect())),
                    }
                }
                dirty.insert(key);
            }
        });
        // Stored: other servers may append again while this one
        // acknowledges and relays.
        drop(locked);
        if let Err(e) = stepped {
            self.close_all(now, Reason::Overloaded, "storage failed; reconnect");
            return Err(e);
        }
        self.room_bytes += grew;
        debug_assert_eq!(
            self.room.stored(),
            self.room.room().dag().next_idx(),
            "everything a batch inserted is durable before it is acknowledged"
        );
        for (key, nodes) in &brought {
            self.events.push_back(HubEvent::Inserted {
                key: *key,
                nodes: nodes.len(),
            });
        }
        let mut relayed = brought;
        if !learned.is_empty() {
            relayed.insert(0, (ELSEWHERE, learned));
        }
        if !relayed.is_empty() {
            self.index_and_relay(now, &relayed);
        }
        if !blob_in.is_empty() {
            self.blob_messages(blob_in);
        }
        for (key, shown) in presence_in {
            self.show(now, key, shown);
        }
        for conn in gone {
            self.drop_connection(conn, End::Disconnected);
        }
        self.after(now);
        Ok(())
    }

    /// Says that other servers sharing the store wrote to this room: the
    /// next batch catches up before it steps (whether or not it inserts).
    pub fn mark_behind(&mut self) {
        self.behind = true;
    }

    /// Catches up with what other servers sharing the store stored in this
    /// room since it was loaded or last caught up, and relays it to every
    /// session; returns how many nodes that was. On a storage failure every
    /// session is closed with `overloaded` and the error returned (as from
    /// [`RoomHub::handle_batch`]).
    pub fn catch_up(&mut self, now: u64) -> Result<usize, ReplicaError> {
        let nodes = self.learn(now)?;
        let learned = nodes.len();
        if learned > 0 {
            self.index_and_relay(now, &[(ELSEWHERE, nodes)]);
            self.after(now);
        }
        Ok(learned)
    }

    /// Appends what other servers stored since the last look (counted in
    /// the room's bytes, reported as [`HubEvent::Learned`]); the caller
    /// relays it. On a storage failure every session is closed.
    fn learn(&mut self, now: u64) -> Result<Vec<NodeIdx>, ReplicaError> {
        let appended = match self.room.refresh() {
            Ok(appended) => appended,
            Err(e) => {
                self.close_all(now, Reason::Overloaded, "storage failed; reconnect");
                return Err(e);
            }
        };
        let nodes: Vec<NodeIdx> = appended.collect();
        if !nodes.is_empty() {
            let dag = self.room.room().dag();
            self.room_bytes += nodes
                .iter()
                .map(|&n| dag.content_size(n) as u64)
                .sum::<u64>();
            self.events
                .push_back(HubEvent::Learned { nodes: nodes.len() });
        }
        Ok(nodes)
    }

    /// Records the blobs `stored` nodes reference in the index, then
    /// relays them to the room's sessions (each gets those it did not
    /// send): references are indexed before anything is acknowledged.
    fn index_and_relay(&mut self, now: u64, stored: &[(SessionKey, Vec<NodeIdx>)]) {
        if let Some(blobs) = &mut self.blobs {
            for (_, nodes) in stored {
                if let Err(e) = blobs.record_refs(self.room.room(), nodes) {
                    self.events.push_back(HubEvent::BlobRefsFailed {
                        error: e.to_string(),
                    });
                }
            }
            blobs.room_changed();
        }
        self.relay(now, stored);
    }

    /// Hands the batch's blob messages of open sessions to the room's
    /// blob store.
    fn blob_messages(&mut self, inputs: Vec<(SessionKey, u64, Message)>) {
        let inputs: Vec<(SessionKey, bool, u64, Message)> = inputs
            .into_iter()
            .filter_map(|(key, corr, message)| {
                let member = self.sessions.get(&key)?;
                member
                    .session
                    .is_open()
                    .then(|| (key, member.session.may_write(), corr, message))
            })
            .collect();
        let Some(blobs) = &mut self.blobs else {
            for (key, _, corr, _) in inputs {
                let refusal = Envelope::frame(
                    key.session,
                    0,
                    Message::Error {
                        code: Reason::NotFound,
                        message: "this server keeps no blobs".into(),
                        related: corr,
                    },
                );
                self.bulk.push_back((key.conn, refusal));
            }
            return;
        };
        let out = blobs.handle(self.room.room(), inputs);
        self.bulk.extend(out);
    }

    /// Records what session `key` shows now and tells the others (an
    /// update past its budget is refused instead).
    fn show(&mut self, now: u64, key: SessionKey, shown: Shown) {
        let (burst, per_sec) = (self.config.presence_burst, self.config.presence_per_sec);
        let Some(member) = self.sessions.get_mut(&key) else {
            return;
        };
        if !member.session.is_open() {
            // Before the handshake there is no one to tell it to.
            return;
        }
        if !member.presence.take(now, burst, per_sec) {
            self.transmit
                .push_back((key.conn, refused_frame(key.session, per_sec)));
            self.events.push_back(HubEvent::PresenceRefused { key });
            return;
        }
        let was_shown = member.presence.shown.is_some();
        member.presence.shown = (shown.status != PresenceStatus::Offline).then_some(shown);
        if was_shown || member.presence.shown.is_some() {
            self.tell_others(key);
        }
    }

    /// Sends session `key`'s presence to every other open session that
    /// takes presence.
    fn tell_others(&mut self, key: SessionKey) {
        let Some(presence) = self.sessions.get(&key).map(|m| &m.presence) else {
            return;
        };
        for (other, member) in &self.sessions {
            if *other != key && member.session.is_open() && member.session.wants_presence() {
                self.transmit
                    .push_back((other.conn, presence.frame(other.session)));
            }
        }
    }

    /// Sends a session that just opened the presence of everyone shown.
    fn tell_newcomer(&mut self, key: SessionKey) {
        let Some(newcomer) = self.sessions.get(&key) else {
            return;
        };
        if !newcomer.session.wants_presence() {
            return;
        }
        for (other, member) in &self.sessions {
            if *other != key && member.presence.shown.is_some() {
                self.transmit
                    .push_back((key.conn, member.presence.frame(key.session)));
            }
        }
    }

    /// Connection `conn` cannot take its frames: its sessions leave with
    /// [`End::Lagging`] (the driver closes the connection; the client
    /// reconnects and catches up). Their queued frames are dropped.
    pub fn lagging(&mut self, conn: u64) {
        self.transmit.retain(|(c, _)| *c != conn);
        self.drop_connection(conn, End::Lagging);
    }

    /// When [`RoomHub::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.sessions
            .values()
            .filter_map(|m| m.session.poll_timeout())
            .min()
    }

    /// Fires the sessions' timers due at `now`, taking turns: a sweep
    /// starts after the session the last one ended with, and stops once
    /// its frames pass [`HubConfig::slice_bytes`] (the rest stay due).
    pub fn handle_timeout(&mut self, now: u64) {
        let due: Vec<SessionKey> = {
            let after = self.turn;
            let is_due = |(k, m): (&SessionKey, &Member)| {
                m.session
                    .poll_timeout()
                    .is_some_and(|t| t <= now)
                    .then_some(*k)
            };
            let (later, earlier): (Vec<_>, Vec<_>) = self
                .sessions
                .iter()
                .filter_map(is_due)
                .partition(|k| after.is_none_or(|a| *k > a));
            later.into_iter().chain(earlier).collect()
        };
        let mut spent = 0;
        for key in due {
            if spent >= self.config.slice_bytes {
                break;
            }
            let Some(member) = self.sessions.get_mut(&key) else {
                continue;
            };
            let session = &mut member.session;
            let fired = self
                .room
                .with_room(|r, _| session.handle_timeout(now, r, None));
            debug_assert!(
                fired.is_ok(),
                "timers insert nothing, so they write nothing"
            );
            spent += self.flush(key);
            self.dirty.insert(key);
            self.turn = Some(key);
        }
        self.after(now);
    }

    /// Closes every session with `reason`, queueing their `close` frames.
    pub fn close_all(&mut self, now: u64, reason: Reason, message: &str) {
        for member in self.sessions.values_mut() {
            member.session.close(now, reason.clone(), message);
        }
        self.all_dirty = true;
        self.after(now);
    }

    /// Closes with `unauthorized` every session whose access rests on
    /// capability `id`: a revocation takes effect on open sessions.
    /// Returns how many were closed.
    pub fn revoke(&mut self, now: u64, id: &[u8; 16]) -> usize {
        let mut closed = 0;
        for (key, member) in &mut self.sessions {
            if !member.session.is_closed()
                && member.session.access().is_some_and(|a| a.rests_on(id))
            {
                member.session.close(
                    now,
                    Reason::Unauthorized,
                    "the session's capability was revoked",
                );
                self.dirty.insert(*key);
                closed += 1;
            }
        }
        self.after(now);
        closed
    }

    /// The next frame to send, and the connection it goes to.
    pub fn poll_transmit(&mut self) -> Option<(u64, Vec<u8>)> {
        self.transmit.pop_front()
    }

    /// The next blob frame to send, and the connection it goes to. Blob
    /// bytes are bulk: a driver queues them apart from
    /// [`RoomHub::poll_transmit`]'s frames and writes them only when no
    /// sync frame waits, so a large transfer never delays history. Their
    /// order among themselves is kept.
    pub fn poll_bulk(&mut self) -> Option<(u64, Vec<u8>)> {
        self.bulk.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    fn drop_connection(&mut self, conn: u64, end: End) {
        let keys: Vec<SessionKey> = self
            .sessions
            .range(
                SessionKey { conn, session: 0 }..=SessionKey {
                    conn,
                    session: u64::MAX,
                },
            )
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.remove(key, end.clone());
        }
    }

    /// Removes a session, reporting how it ended (a session already closed
    /// reports its close instead).
    fn remove(&mut self, key: SessionKey, end: End) {
        let Some(mut member) = self.sessions.remove(&key) else {
            return;
        };
        self.dirty.remove(&key);
        if member.presence.shown.take().is_some() {
            // It leaves: the others hear `offline`.
            for (other, m) in &self.sessions {
                if m.session.is_open() && m.session.wants_presence() {
                    self.transmit
                        .push_back((other.conn, member.presence.frame(other.session)));
                }
            }
        }
        let (_, catchup_nodes) = member.session.nodes_sent();
        self.events.push_back(HubEvent::Ended {
            key,
            end,
            catchup_nodes,
        });
    }

    /// Relays what a batch inserted (durable now), each session getting the
    /// nodes it did not send itself. Under load a batch holds many
    /// sessions' edits, so each subscriber gets one pack (one frame, one
    /// ack) per batch rather than one per edit; the pack is encoded once for
    /// every session that sent nothing in the batch.
    fn relay(&mut self, now: u64, brought: &[(SessionKey, Vec<NodeIdx>)]) {
        self.all_dirty = true;
        let mut all: Vec<NodeIdx> = brought
            .iter()
            .flat_map(|(_, nodes)| nodes.iter().copied())
            .collect();
        all.sort_unstable();
        let encode = |room: &mut DurableRoom, nodes: &[NodeIdx]| {
            // Encoding inserts nothing, so this writes nothing; a pack the
            // relay cannot vouch for goes node by node instead, and the
            // sessions close loudly if that fails too.
            match room.with_room(|r, _| EncodedPack::new(r, nodes)) {
                Ok(Ok(pack)) => Some(pack),
                _ => None,
            }
        };
        let shared = encode(&mut self.room, &all);
        for (key, member) in &mut self.sessions {
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
            let session = &mut member.session;
            let relayed = self.room.with_room(|r, _| match pack {
                Some(pack) => session.relay_pack(now, r, &nodes, pack),
                None => session.send_nodes(now, r, &nodes, None),
            });
            debug_assert!(
                relayed.is_ok(),
                "relaying inserts nothing, so it writes nothing"
            );
        }
    }

    /// Moves a session's frames to the transmit queue; returns their bytes.
    fn flush(&mut self, key: SessionKey) -> usize {
        let Some(member) = self.sessions.get_mut(&key) else {
            return 0;
        };
        let mut bytes = 0;
        while let Some(frame) = member.session.poll_transmit() {
            bytes += frame.len();
            self.transmit.push_back((key.conn, frame));
        }
        bytes
    }

    /// Handles the dirty sessions' events (acknowledging what is durable),
    /// queues their frames, and removes the sessions that ended.
    fn after(&mut self, now: u64) {
        let keys: Vec<SessionKey> = if std::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            self.sessions.keys().copied().collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        let mut sent = 0;
        let mut ended = Vec::new();
        let mut opened = Vec::new();
        for key in keys {
            let Some(member) = self.sessions.get_mut(&key) else {
                continue;
            };
            let (nodes_sent, _) = member.session.nodes_sent();
            sent += nodes_sent - member.reported_sent;
            member.reported_sent = nodes_sent;
            while let Some(event) = member.session.poll_event() {
                match event {
                    Event::Accepted { corr, nodes } => {
                        debug_assert!(
                            nodes.iter().all(|&n| n < self.room.stored()),
                            "only durable nodes are acknowledged"
                        );
                        member.session.acknowledge(now, corr, self.room.room());
                    }
                    Event::Connected => {
                        opened.push(key);
                        self.events.push_back(HubEvent::Connected {
                            key,
                            strategy: member.session.strategy().unwrap_or(Strategy::Heads),
                        });
                    }
                    Event::Closed {
                        reason, by_peer, ..
                    } => ended.push((key, End::Closed { reason, by_peer })),
                    Event::Refused { message } => {
                        self.events.push_back(HubEvent::Refused { key, message });
                    }
                    // Client-side events; a server session raises none.
                    Event::Acknowledged { .. }
                    | Event::CaughtUp
                    | Event::ServerHolds { .. }
                    | Event::Subscribed { .. }
                    | Event::PeerError { .. } => {}
                }
            }
            self.flush(key);
        }
        if sent > 0 {
            self.events.push_back(HubEvent::Sent { nodes: sent });
        }
        for key in opened {
            self.tell_newcomer(key);
        }
        for (key, end) in ended {
            self.remove(key, end);
        }
    }
}
