//! The sync engine: connects, opens a session per room, moves frames
//! between the WebSocket and the sessions, persists what arrives, and
//! reconnects after a failure.
//!
//! The engine tries the endpoints in priority order; when a connection
//! fails or ends it waits (exponential backoff with jitter, reset by a
//! successful handshake) and starts again with a fresh handshake and
//! difference per room, so whatever was missed is caught up. Incoming
//! nodes are persisted before they are acknowledged (`with_room`), and
//! local commits reach the session directly from `Room::transact`. Rooms
//! added to or removed from the handle get a session opened or closed
//! (`left`) on the running connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use syncline_core::Doc;
use syncline_core::auth::Capability;
use syncline_core::proto::message::{Envelope, Message, Reason};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Credentials, Event, Strategy};
use syncline_hub::ClientLink;
use syncline_store::{BlobState, BlobStore};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, info};

use super::{Prefetch, Shared};
use crate::blobs::{self, BLOB_CORR_BASE, Transfers};
use crate::changes::Change;
use crate::replica::{Origin, Room, RoomState, session_now};

/// Connects, syncs until the connection ends, backs off, and again, until
/// stopped.
pub(super) async fn run(shared: Arc<Shared>) {
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
                    let mut synced = Vec::new();
                    let result = connection(&shared, ws, &mut synced).await;
                    for s in &synced {
                        let mut state = s.room.shared.lock();
                        state.session = None;
                        state.presence.disconnected(s.room.name());
                        state.transfers.disconnected();
                    }
                    // Sessions of removed rooms ended with the connection.
                    shared
                        .closing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                    {
                        let mut status = shared.status();
                        status.connected = false;
                        status.caught_up = false;
                        status.read_only = false;
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
                    }
                    shared.publish();
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
                    drop(status);
                    shared.publish();
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
        {
            let mut status = shared.status();
            status.failures = failures;
            status.retry_in = Some(Duration::from_millis(delay));
        }
        shared.publish();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(delay)) => {}
            () = shared.wake.notified() => {}
        }
        shared.status().retry_in = None;
    }
}

/// Frames already received that are handled as one batch, at most.
const READY_FRAMES: usize = 16;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A room this connection syncs: its session and how far it got.
pub(super) struct Synced {
    pub(super) room: Room,
    /// The session id its frames carry.
    session: u64,
    connected: bool,
    caught_up: bool,
    /// Remote nodes came since the prefetch policy last looked.
    prefetch_due: bool,
    /// When it last looked.
    prefetched_at: Option<Instant>,
}

/// Runs one connection: a session per room (`synced`, kept in session id
/// order, follows the handle's rooms). Returns whether every room's
/// handshake completed, or why it ended badly.
async fn connection(shared: &Shared, ws: Ws, synced: &mut Vec<Synced>) -> Result<bool, String> {
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
    // A locked room's policy is declared in its history with the relay's
    // key: trust it to declare one.
    shared
        .replica
        .trust_relay(server)
        .map_err(|e| e.to_string())?;
    // Frames that have arrived together are handled together: their nodes
    // go to disk in one durable write (one fsync, not one per pack).
    let mut stream = stream.ready_chunks(READY_FRAMES);
    let mut next_session = 1;
    let mut opened = false;
    loop {
        // Sessions follow the rooms asked for; a closed one says `left`.
        let mut frames = Vec::new();
        if !opened || shared.rooms_changed.swap(false, Ordering::SeqCst) {
            frames = reconcile(shared, synced, &mut next_session, challenge)?;
            opened = true;
        }
        // Events first (they may queue frames), then frames out.
        for s in synced.iter_mut() {
            if let Some(why) = handle_events(shared, s)? {
                return Err(why);
            }
        }
        {
            let mut status = shared.status();
            status.connected = synced.iter().all(|s| s.connected);
            status.caught_up = synced.iter().all(|s| s.caught_up);
            status.read_only = synced.iter().any(|s| {
                s.connected
                    && s.room
                        .shared
                        .lock()
                        .session
                        .as_ref()
                        .is_some_and(|l| !l.session().may_write())
            });
        }
        shared.publish();
        for s in synced.iter() {
            let mut state = s.room.shared.lock();
            let RoomState {
                session, transfers, ..
            } = &mut *state;
            if let Some(link) = session.as_mut() {
                frames.extend(std::iter::from_fn(|| link.poll_transmit()));
                // Blob transfers go beside the session once it is open.
                if s.connected
                    && let Some(store) = s.room.shared.blobs.as_ref()
                {
                    frames.extend(transfers.pump(store, s.session));
                }
            }
        }
        for frame in frames {
            sink.send(WsMessage::Binary(frame.into()))
                .await
                .map_err(|e| e.to_string())?;
        }
        if shared.stop.load(Ordering::SeqCst) {
            let _ = sink.close().await;
            return Ok(synced.iter().all(|s| s.connected));
        }
        let next_timer = synced
            .iter()
            .filter_map(|s| s.room.shared.lock().session.as_ref()?.poll_timeout())
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
                deliver(synced, &frames)?;
                if let Some(why) = ended {
                    return Err(why);
                }
            }
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {
                let now = session_now();
                for s in synced.iter() {
                    let mut state = s.room.shared.lock();
                    let RoomState { durable, session, .. } = &mut *state;
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

/// Opens sessions for rooms added to the handle and closes those of rooms
/// removed, returning the frames the closes queued.
fn reconcile(
    shared: &Shared,
    synced: &mut Vec<Synced>,
    next_session: &mut u64,
    challenge: [u8; 32],
) -> Result<Vec<Vec<u8>>, String> {
    let wanted = shared.rooms();
    // A room removed and added again lost its session: it gets a new one.
    synced.retain(|s| {
        wanted.iter().any(|r| r.name() == s.room.name()) && s.room.shared.lock().session.is_some()
    });
    let mut frames = Vec::new();
    let closing = std::mem::take(&mut *shared.closing.lock().unwrap_or_else(|p| p.into_inner()));
    for mut link in closing {
        link.close(session_now(), Reason::Left, "no longer synced");
        frames.extend(std::iter::from_fn(|| link.poll_transmit()));
    }
    for room in wanted {
        if synced.iter().any(|s| s.room.name() == room.name()) {
            continue;
        }
        open_session(shared, &room, *next_session, challenge)?;
        synced.push(Synced {
            room,
            session: *next_session,
            connected: false,
            caught_up: false,
            prefetch_due: false,
            prefetched_at: None,
        });
        *next_session += 1;
    }
    Ok(frames)
}

/// Opens room `room`'s session `id` on this connection.
fn open_session(shared: &Shared, room: &Room, id: u64, challenge: [u8; 32]) -> Result<(), String> {
    // Blob bytes may go over the relay's direct URLs, on its own origin.
    let endpoint = shared.status().endpoint.clone();
    let origin = endpoint
        .filter(|_| shared.options.blob_urls)
        .and_then(|e| blobs::origin_of(&e));
    let mut state = room.shared.lock();
    // Blobs queued for upload by any process, uploaded on this session.
    if let Some(store) = room.shared.blobs.as_deref() {
        state.transfers.load_queue(store, room.name());
    }
    state.transfers.connected(origin, shared.wake.clone());
    let mut config = shared.options.session.clone();
    if state.send_vv {
        config.vv_inline_limit = usize::MAX;
    }
    // A room still empty (or declaring a policy already) is checked from
    // here on; another learns its policy in this catch-up, checked by the
    // relay, and is checked from its next opening.
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
        session_now(),
        id,
        &mut state.durable,
        config,
        Scope::everything(),
        &credentials,
    )
    .map_err(|e| e.to_string())?;
    state.session = Some(link);
    Ok(())
}

/// Hands frames, in order, to their rooms' sessions, persisting what each
/// room's frames inserted in one durable write. Fails (ending the
/// connection) if a room cannot be locked for writing.
fn deliver(synced: &[Synced], frames: &[impl AsRef<[u8]>]) -> Result<(), String> {
    let mut by_room: Vec<Vec<Envelope>> = vec![Vec::new(); synced.len()];
    // Blob frames wait until the batch's sync frames are handled: an edit
    // that arrived among a window of chunks is not held behind checking
    // them.
    let mut blob_frames: Vec<(usize, u64, Message)> = Vec::new();
    for bytes in frames {
        let bytes = bytes.as_ref();
        let Ok(env) = Envelope::decode(bytes) else {
            // Not attributable to a session: every session sees it and
            // closes (after the frames before it).
            deliver_envelopes(synced, &mut by_room)?;
            for s in synced {
                let mut state = s.room.shared.lock();
                let RoomState {
                    durable, session, ..
                } = &mut *state;
                if let Some(link) = session.as_mut() {
                    // A storage failure closes the session; its event says so.
                    let _ = link.handle_frame(session_now(), durable, bytes);
                }
            }
            continue;
        };
        // A session this connection never opened (or closed) is ignored.
        let Ok(i) = synced.binary_search_by_key(&env.session, |s| s.session) else {
            continue;
        };
        match env.message {
            // Ephemeral: the room's presence takes it, not its session.
            Message::Presence {
                peer,
                client,
                status,
                message,
                data,
            } => {
                let room = &synced[i].room;
                room.shared
                    .lock()
                    .presence
                    .heard(room.name(), peer, client, status, message, data);
            }
            // Beside the session too: the room's blob transfers.
            message if message.is_blob() => blob_frames.push((i, env.corr, message)),
            // A refusal of a blob request: with the blob frames, in order.
            message @ Message::Error { related, .. } if related >= BLOB_CORR_BASE => {
                blob_frames.push((i, env.corr, message));
            }
            _ => by_room[i].push(env),
        }
    }
    deliver_envelopes(synced, &mut by_room)?;
    for (i, corr, message) in blob_frames {
        let room = &synced[i].room;
        let mut state = room.shared.lock();
        match (message, room.shared.blobs.as_ref()) {
            (
                Message::Error {
                    code,
                    message,
                    related,
                },
                _,
            ) => state
                .transfers
                .refused(related, format!("{} ({message})", code.as_str())),
            (message, Some(store)) => state.transfers.heard(store, room.name(), corr, message),
            (_, None) => {}
        }
    }
    Ok(())
}

/// Hands each room its envelopes (taking them) and persists what they
/// inserted once per room, holding the room's write lock across processes.
fn deliver_envelopes(synced: &[Synced], by_room: &mut [Vec<Envelope>]) -> Result<(), String> {
    for (s, envelopes) in synced.iter().zip(by_room.iter_mut()) {
        if envelopes.is_empty() {
            continue;
        }
        let envelopes = std::mem::take(envelopes);
        let change = {
            let mut state = s.room.shared.write().map_err(|e| e.to_string())?;
            let RoomState {
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
            let details = durable.take_details();
            (!inserted.is_empty())
                .then(|| Change::of(durable.room(), Origin::Remote, &inserted, details))
        };
        if let Some(change) = change {
            debug!(room = s.room.name(), nodes = change.nodes, "imported");
            s.room.shared.notify(&change);
        }
    }
    Ok(())
}

/// Handles one room's session events. Returns `Some(reason)` when the
/// session ended.
fn handle_events(shared: &Shared, s: &mut Synced) -> Result<Option<String>, String> {
    let mut state = s.room.shared.lock();
    let RoomState {
        durable,
        session,
        send_vv,
        presence,
        transfers,
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
                s.connected = true;
                *send_vv = false;
                // What this replica shows, shown again on this connection.
                if let Some((status, message, data)) = &presence.own {
                    link.send_presence(now, *status, message, data);
                }
                let mut status = shared.status();
                status.refused = None;
                status.fatal = None;
                status.failures = 0;
            }
            Event::CaughtUp => {
                s.caught_up = true;
                s.prefetch_due = true;
            }
            Event::Accepted { .. } => s.prefetch_due = true,
            Event::Acknowledged { .. } | Event::ServerHolds { .. } => {
                shared.status().last_ack = Some(SystemTime::now());
            }
            Event::Closed {
                reason, message, ..
            } => {
                let room = s.room.name();
                if matches!(reason, Reason::Unauthorized | Reason::TokenExpired) {
                    shared.status().refused =
                        Some(format!("room {room}: {} ({message})", reason.as_str()));
                }
                if reason == Reason::TooLarge && link.session().strategy() == Some(Strategy::Ibf) {
                    // The difference outgrew the server's sketch: the next
                    // hello carries the version vector instead.
                    *send_vv = true;
                }
                return Ok(Some(format!(
                    "session for room {room} closed: {} ({message})",
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
                    s.room.name()
                ));
            }
            Event::Subscribed { .. } | Event::PeerError { .. } | Event::Refused { .. } => {}
        }
    }
    // The prefetch policy looks when remote nodes came (at most once a
    // second), and every half minute for blobs not yet uploaded.
    if let (Some(policy), Some(store)) = (&shared.options.prefetch, s.room.shared.blobs.as_ref())
        && s.caught_up
    {
        let since = s.prefetched_at.map(|t| t.elapsed());
        let look = match since {
            None => true,
            Some(since) => (s.prefetch_due && since >= PREFETCH_EVERY) || since >= PREFETCH_AGAIN,
        };
        if look {
            s.prefetch_due = false;
            s.prefetched_at = Some(Instant::now());
            prefetch(policy, durable.room().doc(), store, transfers);
        }
    }
    Ok(None)
}

/// The prefetch policy looks at most this often while remote nodes come...
const PREFETCH_EVERY: Duration = Duration::from_secs(1);
/// ...and this often anyway (a referenced blob may be uploaded later).
const PREFETCH_AGAIN: Duration = Duration::from_secs(30);

/// Asks for the blobs `policy` wants that `doc` references and `store`
/// lacks.
fn prefetch(policy: &Prefetch, doc: &Doc, store: &BlobStore, transfers: &mut Transfers) {
    let Ok(scope) = Scope::parse(&policy.paths) else {
        return; // Checked when the engine started.
    };
    for (entry, blob) in doc.blob_fields() {
        if blob.size > policy.max_bytes {
            continue;
        }
        let Some(path) = doc.path_of(&entry) else {
            continue;
        };
        let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
        if scope.matches(&names)
            && !matches!(store.state(&blob.hash), Ok(BlobState::Complete { .. }))
        {
            transfers.prefetch(blob.hash);
        }
    }
}
