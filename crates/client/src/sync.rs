//! Background sync: one WebSocket to a relay carrying one session per room,
//! driven by a thread with its own tokio runtime.
//!
//! The engine tries the endpoints in priority order; when a connection
//! fails or ends it waits (exponential backoff with jitter, reset by a
//! successful handshake) and starts again with a fresh handshake and
//! difference per room, so whatever was missed is caught up. Incoming
//! nodes are persisted before they are acknowledged (`with_room`), and
//! local commits reach the session directly from [`Room::transact`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use syncline_core::auth::Capability;
use syncline_core::proto::message::{Envelope, Message, Reason};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config as SessionConfig, Credentials, Event, Strategy};
use syncline_hub::ClientLink;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, info};

use crate::lock::EngineLock;
use crate::replica::{Error, Origin, Replica, Room, session_now, touched_paths};

/// How to sync.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// WebSocket URLs of relays (`ws://host:port/ws`), tried in this order.
    pub endpoints: Vec<String>,
    /// First delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// How long a connection attempt (TCP, TLS and the WebSocket upgrade)
    /// may take before the next endpoint is tried.
    pub connect_timeout: Duration,
    /// Session timers and sizes.
    pub session: SessionConfig,
    /// Where the capability for locked rooms comes from (`None`: open
    /// rooms only). Asked at every connection, so a source that fetches a
    /// fresh token refreshes an expired one: a session closed with
    /// `token_expired` reconnects with the next token, and the outbox
    /// resends whatever was not acknowledged.
    pub token: Option<TokenSource>,
}

/// Where a room's capability token comes from: one token (`sl1.…`) for
/// every room, or a callback asked for each room at each connection (an
/// app fetching a fresh one from its backend), which may answer `None`
/// for an open room.
#[derive(Clone)]
pub struct TokenSource(TokenFn);

type TokenFn = Arc<dyn Fn(&str) -> Result<Option<String>, String> + Send + std::marker::Sync>;

impl TokenSource {
    /// Always this token.
    pub fn fixed(token: impl Into<String>) -> TokenSource {
        let token = token.into();
        TokenSource(Arc::new(move |_| Ok(Some(token.clone()))))
    }

    /// Calls `refresh(room)` for a token at each connection; an error is
    /// reported in [`Status::last_error`] and the connection retried after
    /// the backoff.
    pub fn refresh(
        refresh: impl Fn(&str) -> Result<Option<String>, String> + Send + std::marker::Sync + 'static,
    ) -> TokenSource {
        TokenSource(Arc::new(refresh))
    }

    /// The token to present for `room` now, decoded.
    fn current(&self, room: &str) -> Result<Option<Vec<u8>>, String> {
        let Some(token) = (self.0)(room).map_err(|e| format!("no token for {room}: {e}"))? else {
            return Ok(None);
        };
        let cap =
            Capability::from_token(&token).map_err(|e| format!("bad token for {room}: {e}"))?;
        Ok(Some(cap.encode()))
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("TokenSource(..)")
    }
}

impl SyncOptions {
    /// Defaults for `endpoints`.
    pub fn new(endpoints: &[&str]) -> SyncOptions {
        SyncOptions {
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            session: SessionConfig::default(),
            token: None,
        }
    }
}

/// What the sync engine is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Connected, with every room's handshake done.
    pub connected: bool,
    /// The endpoint in use (or last tried).
    pub endpoint: Option<String>,
    /// Every room has everything the server had at its handshake.
    pub caught_up: bool,
    /// Local nodes not yet acknowledged as durable by the server.
    pub unacknowledged: usize,
    /// Nodes of the current catch-ups still to arrive (known once each
    /// room's difference is).
    pub catching_up: u64,
    /// When the server last acknowledged nodes as durable.
    pub last_ack: Option<SystemTime>,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// The relay refused access to a room (`unauthorized`, or
    /// `token_expired` and the token source gave no fresh one): retrying
    /// with the same token will not help. Cleared by a handshake.
    pub refused: Option<String>,
    /// Some room's session may only read (its token lacks `write`): local
    /// changes stay in the outbox.
    pub read_only: bool,
    /// An answer retrying will not change: the last endpoint tried is no
    /// Syncline relay there (an HTTP 404 or another refusal of the
    /// WebSocket upgrade). Cleared by a handshake.
    pub fatal: Option<String>,
    /// Connection attempts that failed since the last handshake.
    pub failures: u32,
}

/// `url` as the engine dials it: `ws://` or `wss://`, a host, and a path
/// (`/ws` when none is given).
pub fn normalize_endpoint(url: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let trimmed = url.trim();
    let rest = match trimmed.split_once("://") {
        Some(("ws" | "wss", rest)) => rest,
        Some(("http" | "https", _)) => {
            return Err(bad("use ws:// (or wss://), e.g. ws://127.0.0.1:7700/ws"));
        }
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme}:// is not a WebSocket; use ws://HOST:PORT/ws"
            )));
        }
        None => return Err(bad("no scheme; use ws://HOST:PORT/ws")),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(bad("no host; use ws://HOST:PORT/ws"));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(bad(&format!("port {port:?} is not a number")));
    }
    let path = if path.is_empty() { "ws" } else { path };
    let scheme = trimmed.split_once("://").map_or("ws", |(s, _)| s);
    Ok(format!("{scheme}://{host}/{path}"))
}

struct Shared {
    replica: Replica,
    rooms: Vec<Room>,
    options: SyncOptions,
    status: Mutex<Status>,
    wake: Arc<Notify>,
    stop: AtomicBool,
}

impl Shared {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running sync; stops when dropped.
pub struct Sync {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// This process runs the replica's one sync engine while it holds it.
    engine: Option<EngineLock>,
}

impl std::fmt::Debug for Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sync")
            .field("status", &self.status())
            .finish()
    }
}

impl Replica {
    /// Syncs `rooms` with the relay at `endpoints` (tried in order) in the
    /// background.
    pub fn connect(&self, endpoints: &[&str], rooms: &[&str]) -> Result<Sync, Error> {
        self.connect_with(SyncOptions::new(endpoints), rooms)
    }

    /// [`Replica::connect`] with explicit options.
    pub fn connect_with(&self, options: SyncOptions, rooms: &[&str]) -> Result<Sync, Error> {
        if options.endpoints.is_empty() {
            return Err(Error::Sync("no endpoint given".into()));
        }
        let mut options = options;
        let engine = self.locks().engine()?;
        options.endpoints = options
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e))
            .collect::<Result<_, _>>()?;
        let rooms = rooms
            .iter()
            .map(|r| self.room(r))
            .collect::<Result<Vec<Room>, Error>>()?;
        let wake = Arc::new(Notify::new());
        for room in &rooms {
            *room.shared.wake.lock().unwrap_or_else(|p| p.into_inner()) = Some(wake.clone());
        }
        let shared = Arc::new(Shared {
            replica: self.clone(),
            rooms,
            options,
            status: Mutex::new(Status::default()),
            wake,
            stop: AtomicBool::new(false),
        });
        let driven = shared.clone();
        let thread = std::thread::Builder::new()
            .name("syncline sync".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(run(driven));
            })
            .map_err(|e| Error::Sync(format!("cannot start the sync thread: {e}")))?;
        Ok(Sync {
            shared,
            thread: Some(thread),
            engine,
        })
    }
}

impl Sync {
    /// The engine's status now.
    pub fn status(&self) -> Status {
        let mut status = self.shared.status().clone();
        status.unacknowledged = self
            .shared
            .rooms
            .iter()
            .map(|r| r.unacknowledged().unwrap_or(0))
            .sum();
        status.catching_up = self
            .shared
            .rooms
            .iter()
            .filter_map(|r| {
                Some(
                    r.shared
                        .lock()
                        .session
                        .as_ref()?
                        .session()
                        .catchup_remaining(),
                )
            })
            .sum();
        status
    }

    /// Waits until every local node of the synced rooms is acknowledged as
    /// durable by the server, and every room has caught up.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if status.connected && status.caught_up && status.unacknowledged == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = match (&status.last_error, status.connected) {
                    (_, true) => {
                        format!("{} local nodes still unacknowledged", status.unacknowledged)
                    }
                    (Some(e), false) => format!("not connected: {e}"),
                    (None, false) => "not connected yet".to_owned(),
                };
                return Err(Error::Timeout(why));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops syncing (also done on drop).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for room in &self.shared.rooms {
            *room.shared.wake.lock().unwrap_or_else(|p| p.into_inner()) = None;
            room.shared.lock().session = None;
        }
        // Another process may sync the replica from now on.
        self.engine.take();
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Connects, syncs until the connection ends, backs off, and again, until
/// stopped.
async fn run(shared: Arc<Shared>) {
    let mut failures: u32 = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        for endpoint in &shared.options.endpoints {
            shared.status().endpoint = Some(endpoint.clone());
            // Without TCP_NODELAY a small frame can wait 40 ms for a
            // delayed ACK.
            let timeout = shared.options.connect_timeout;
            let connect = tokio::time::timeout(
                timeout,
                tokio_tungstenite::connect_async_with_config(endpoint.as_str(), None, true),
            );
            tokio::pin!(connect);
            // A stop ends a hanging attempt at once (other wakes do not).
            let attempt = loop {
                tokio::select! {
                    attempt = &mut connect => break attempt,
                    () = shared.wake.notified() => {
                        if shared.stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                }
            };
            let attempt = attempt.unwrap_or_else(|_| {
                Err(tokio_tungstenite::tungstenite::Error::Io(
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no connection within {} s", timeout.as_secs_f64()),
                    ),
                ))
            });
            match attempt {
                Ok((ws, _)) => {
                    info!(endpoint, "connected");
                    let result = connection(&shared, ws).await;
                    close_sessions(&shared);
                    let mut status = shared.status();
                    status.connected = false;
                    status.caught_up = false;
                    match result {
                        Ok(handshaken) => {
                            if handshaken {
                                failures = 0;
                            }
                        }
                        Err(e) => {
                            debug!(endpoint, error = %e, "connection ended");
                            status.last_error = Some(e);
                        }
                    }
                    break;
                }
                Err(e) => {
                    let mut status = shared.status();
                    if let tokio_tungstenite::tungstenite::Error::Http(response) = &e {
                        // The server is there but is no relay at this path
                        // (404) or refuses the upgrade: retrying will not help.
                        status.fatal = Some(format!(
                            "{endpoint} answered HTTP {}{}",
                            response.status(),
                            if response.status().as_u16() == 404 {
                                ": no Syncline relay at this path (it serves /ws)"
                            } else {
                                ""
                            }
                        ));
                    }
                    status.last_error = Some(format!("{endpoint}: {e}"));
                }
            }
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        // Exponential backoff with full jitter over the upper half.
        let base = shared.options.min_backoff.as_millis() as u64;
        let cap = shared.options.max_backoff.as_millis() as u64;
        let ceiling = base.saturating_mul(1 << failures.min(16)).min(cap).max(1);
        let delay = rand::rng().random_range(ceiling / 2..=ceiling);
        failures = failures.saturating_add(1);
        shared.status().failures = failures;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(delay)) => {}
            () = shared.wake.notified() => {}
        }
    }
}

fn close_sessions(shared: &Shared) {
    for room in &shared.rooms {
        room.shared.lock().session = None;
    }
}

/// Frames already received that are handled as one batch, at most.
const READY_FRAMES: usize = 16;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs one connection: a session per room. Returns whether every room's
/// handshake completed, or why it ended badly.
async fn connection(shared: &Shared, ws: Ws) -> Result<bool, String> {
    let (mut sink, mut stream) = ws.split();
    // The server speaks first: the challenge every hello signs.
    let first = tokio::time::timeout(shared.options.connect_timeout, stream.next()).await;
    let (challenge, server) = match first {
        Ok(Some(Ok(WsMessage::Binary(bytes)))) => match Envelope::decode(&bytes) {
            Ok(Envelope {
                message: Message::Challenge { nonce, server },
                ..
            }) => (nonce, server),
            Ok(other) => {
                return Err(format!(
                    "the server did not start with a challenge (message type {}): is it a \
                     Syncline relay of this version?",
                    other.message.type_code()
                ));
            }
            Err(e) => return Err(format!("the server's first frame does not decode: {e}")),
        },
        Ok(Some(Ok(WsMessage::Close(frame)))) => {
            let why = frame.map_or_else(String::new, |f| f.reason.to_string());
            return Err(format!("the server closed the connection: {why}"));
        }
        Ok(Some(Ok(_))) => return Err("the server's first frame is not binary".into()),
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => return Err("the server closed the connection".into()),
        Err(_) => return Err("no challenge from the server in time".into()),
    };
    // Frames that have arrived together are handled together: their nodes
    // go to disk in one durable write (one fsync, not one per pack).
    let mut stream = stream.ready_chunks(READY_FRAMES);
    let now = session_now();
    for (i, room) in shared.rooms.iter().enumerate() {
        let mut state = room.shared.lock();
        let mut config = shared.options.session.clone();
        if state.send_vv {
            config.vv_inline_limit = usize::MAX;
        }
        // A locked room's policy is declared in its history with the
        // relay's key: trust it to declare one. A room still empty (or
        // declaring one already) is checked from here on; another learns
        // its policy in this catch-up, checked by the relay, and is checked
        // from its next opening.
        if i == 0 {
            shared
                .replica
                .trust_relay(server)
                .map_err(|e| e.to_string())?;
        }
        let room_state = state.durable.room();
        if room_state.dag().governance().is_none()
            && (room_state.dag().is_empty() || crate::replica::has_policy(room_state))
        {
            let trusted = shared.replica.trusted_relays().map_err(|e| e.to_string())?;
            state.durable.govern(trusted);
        }
        let token = match &shared.options.token {
            Some(source) => source.current(room.name())?,
            None => None,
        };
        if let Some(cap) = token.as_deref().and_then(|t| Capability::decode(t).ok()) {
            // Local commits carry it (the first one records it).
            state.grant = Some(cap);
        }
        let credentials = Credentials { challenge, token };
        let link = ClientLink::open(
            now,
            i as u64 + 1,
            &mut state.durable,
            config,
            Scope::everything(),
            &credentials,
        )
        .map_err(|e| e.to_string())?;
        state.session = Some(link);
    }
    let mut connected = vec![false; shared.rooms.len()];
    let mut caught_up = vec![false; shared.rooms.len()];
    loop {
        // Events first (they may queue frames), then frames out.
        for (i, room) in shared.rooms.iter().enumerate() {
            let ended = handle_events(shared, room, &mut connected[i], &mut caught_up[i])?;
            if let Some(why) = ended {
                return Err(why);
            }
        }
        {
            let mut status = shared.status();
            status.connected = connected.iter().all(|c| *c);
            status.caught_up = caught_up.iter().all(|c| *c);
        }
        let mut frames = Vec::new();
        for room in &shared.rooms {
            if let Some(link) = room.shared.lock().session.as_mut() {
                frames.extend(std::iter::from_fn(|| link.poll_transmit()));
            }
        }
        for frame in frames {
            sink.send(WsMessage::Binary(frame.into()))
                .await
                .map_err(|e| e.to_string())?;
        }
        if shared.stop.load(Ordering::SeqCst) {
            let _ = sink.close().await;
            return Ok(connected.iter().all(|c| *c));
        }
        let next_timer = shared
            .rooms
            .iter()
            .filter_map(|r| r.shared.lock().session.as_ref()?.poll_timeout())
            .min();
        let sleep = next_timer.map_or(Duration::from_secs(1), |t| {
            Duration::from_millis(t.saturating_sub(session_now()))
        });
        tokio::select! {
            messages = stream.next() => {
                let Some(messages) = messages else {
                    return Err("the server closed the connection".into());
                };
                let mut frames = Vec::with_capacity(messages.len());
                let mut ended = None;
                for message in messages {
                    match message.map_err(|e| e.to_string()) {
                        Ok(WsMessage::Binary(bytes)) => frames.push(bytes),
                        Ok(WsMessage::Close(frame)) => {
                            let why = frame.map_or_else(String::new, |f| f.reason.to_string());
                            ended = Some(format!("the server closed the connection: {why}"));
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            ended = Some(e);
                            break;
                        }
                    }
                }
                // What arrived before the end is still handled (and acked
                // on the next connection's handshake if this one is gone).
                deliver(shared, &frames)?;
                if let Some(why) = ended {
                    return Err(why);
                }
            }
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {
                let now = session_now();
                for room in &shared.rooms {
                    let mut state = room.shared.lock();
                    let crate::replica::RoomState {
                durable, session, ..
            } = &mut *state;
                    if let Some(link) = session.as_mut()
                        && link.poll_timeout().is_some_and(|t| t <= now)
                    {
                        link.handle_timeout(now, durable);
                    }
                }
            }
        }
    }
}

/// Hands frames, in order, to their rooms' sessions, persisting what each
/// room's frames inserted in one durable write. Fails (ending the
/// connection) if a room cannot be locked for writing.
fn deliver(shared: &Shared, frames: &[impl AsRef<[u8]>]) -> Result<(), String> {
    let mut by_room: Vec<Vec<Envelope>> = vec![Vec::new(); shared.rooms.len()];
    for bytes in frames {
        let bytes = bytes.as_ref();
        let Ok(env) = Envelope::decode(bytes) else {
            // Not attributable to a session: every session sees it and
            // closes (after the frames before it).
            deliver_envelopes(shared, &mut by_room)?;
            for room in &shared.rooms {
                let mut state = room.shared.lock();
                let crate::replica::RoomState {
                    durable, session, ..
                } = &mut *state;
                if let Some(link) = session.as_mut() {
                    // A storage failure closes the session; its event says so.
                    let _ = link.handle_frame(session_now(), durable, bytes);
                }
            }
            continue;
        };
        // A session this connection never opened is ignored.
        if let Some(queue) = (env.session as usize)
            .checked_sub(1)
            .and_then(|i| by_room.get_mut(i))
        {
            queue.push(env);
        }
    }
    deliver_envelopes(shared, &mut by_room)
}

/// Hands each room its envelopes (taking them) and persists what they
/// inserted once per room, holding the room's write lock across processes.
fn deliver_envelopes(shared: &Shared, by_room: &mut [Vec<Envelope>]) -> Result<(), String> {
    for (room, envelopes) in shared.rooms.iter().zip(by_room.iter_mut()) {
        if envelopes.is_empty() {
            continue;
        }
        let envelopes = std::mem::take(envelopes);
        let inserted = {
            let mut state = room.shared.write().map_err(|e| e.to_string())?;
            let crate::replica::RoomState {
                durable, session, ..
            } = &mut *state;
            let Some(link) = session.as_mut() else {
                continue;
            };
            // A storage failure closes the session (nothing is
            // acknowledged; the connection restarts and the handshake
            // repairs it).
            let Ok(inserted) = link.handle_envelopes(session_now(), durable, envelopes) else {
                continue;
            };
            let inserted: Vec<_> = inserted.collect();
            (!inserted.is_empty())
                .then(|| (touched_paths(durable.room(), &inserted), inserted.len()))
        };
        if let Some((paths, nodes)) = inserted {
            debug!(room = room.name(), nodes, "imported");
            room.shared.notify(Origin::Remote, paths, nodes);
        }
    }
    Ok(())
}

/// Handles one room's session events. Returns `Some(reason)` when the
/// session ended.
fn handle_events(
    shared: &Shared,
    room: &Room,
    connected: &mut bool,
    caught_up: &mut bool,
) -> Result<Option<String>, String> {
    let mut state = room.shared.lock();
    let crate::replica::RoomState {
        durable,
        session,
        send_vv,
        ..
    } = &mut *state;
    let Some(link) = session.as_mut() else {
        return Ok(Some("no session".into()));
    };
    let now = session_now();
    // The link does the durable part of each event (acks after the nodes
    // are stored, the outbox trimmed) before it is seen here.
    while let Some(event) = link.poll_event(now, durable).map_err(|e| e.to_string())? {
        match event {
            Event::Connected => {
                *connected = true;
                *send_vv = false;
                let mut status = shared.status();
                status.refused = None;
                status.fatal = None;
                status.failures = 0;
                status.read_only |= !link.session().may_write();
            }
            Event::CaughtUp => *caught_up = true,
            Event::Accepted { .. } => {}
            Event::Acknowledged { .. } | Event::ServerHolds { .. } => {
                shared.status().last_ack = Some(SystemTime::now());
            }
            Event::Closed {
                reason, message, ..
            } => {
                if matches!(reason, Reason::Unauthorized | Reason::TokenExpired) {
                    shared.status().refused = Some(format!(
                        "room {}: {} ({message})",
                        room.name(),
                        reason.as_str()
                    ));
                }
                if reason == Reason::TooLarge && link.session().strategy() == Some(Strategy::Ibf) {
                    // The difference outgrew the server's sketch: the next
                    // hello carries the version vector instead.
                    *send_vv = true;
                }
                return Ok(Some(format!(
                    "session for room {} closed: {} ({message})",
                    room.name(),
                    reason.as_str()
                )));
            }
            Event::PeerError {
                code: Reason::Unauthorized,
                message,
                ..
            } => {
                // A local change the relay refused: it stays in the outbox.
                shared.status().refused = Some(format!(
                    "room {}: a local change was refused ({message})",
                    room.name()
                ));
            }
            Event::Subscribed { .. } | Event::PeerError { .. } | Event::Refused { .. } => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_default_to_ws() {
        assert_eq!(
            normalize_endpoint("ws://127.0.0.1:7700").unwrap(),
            "ws://127.0.0.1:7700/ws"
        );
        assert_eq!(
            normalize_endpoint(" wss://relay.example/sync/ws ").unwrap(),
            "wss://relay.example/sync/ws"
        );
        assert_eq!(
            normalize_endpoint("ws://[::1]:7700/ws").unwrap(),
            "ws://[::1]:7700/ws"
        );
        for bad in [
            "http://h:1/ws",
            "h:1",
            "ftp://h/ws",
            "ws:///ws",
            "ws://h:port/ws",
        ] {
            assert!(
                matches!(normalize_endpoint(bad), Err(Error::Url { .. })),
                "{bad:?}"
            );
        }
    }
}
