//! WebSocket connections: each carries the sessions of any number of
//! rooms, one envelope per binary frame. The reader decodes each frame once
//! and routes it by session id to its room's inbox; the writer drains two
//! queues the rooms fill, each bounded in bytes: sync frames, and blob
//! bytes, written only when no sync frame waits (so a large download never
//! delays history). A frame that does not decode
//! cannot be attributed to a session, so it closes the whole connection.
//!
//! Bounds, each closing only this connection with a typed reason: a peer
//! that opens no session within [`Config::session_wait`], or sends nothing
//! for longer than a session's idle timeout, is closed `timeout`; one that
//! does not read its frames (the queue passes
//! [`Config::outbound_queue_bytes`], or a write takes longer than
//! [`Config::write_timeout`]) is closed `lagging` and its buffers freed;
//! WebSocket-level errors close `too_large` or `malformed`; a peer above
//! its byte rate is closed `rate_limited`. Past
//! [`Config::max_sessions_per_conn`] a `hello` is refused `overloaded`.
//!
//! Authority: the first frame on a connection is a `challenge` with a
//! fresh nonce; every `hello` must sign it (proof that the client holds
//! its key) and, for a locked room, carry a capability. [`auth::admit`]
//! decides before the room is looked up, so a refusal costs no room load
//! and reads the same whether the room exists or not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State as AxumState;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use syncline_core::auth::{self, Policy, Presented};
use syncline_core::proto::message::{Envelope, Message, PROTOCOL_VERSION, Reason};
use syncline_core::{AuthorId, RoomId};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite;
use tracing::{Instrument, debug, info_span};

use crate::Config;
use crate::limits::{PeerSlot, TokenBucket};
use crate::rooms::{Refused, RoomInbox, RoomInput, Rooms};
use crate::telemetry;

/// Shared by every connection.
#[derive(Debug)]
pub(crate) struct State {
    rooms: Arc<Rooms>,
    config: Config,
    /// Who may open which rooms; revocations update it.
    pub(crate) policy: std::sync::RwLock<Policy>,
    /// The relay's key, named in every challenge.
    server: AuthorId,
    next_conn: AtomicU64,
    /// Bytes queued for all connections.
    queued_total: Arc<AtomicUsize>,
    /// Every open connection's handle, to end them at shutdown.
    open: Mutex<HashMap<u64, ConnHandle>>,
    /// Told each time a connection ends (shutdown waits for the last).
    ended: tokio::sync::Notify,
}

impl State {
    pub(crate) fn new(
        rooms: Arc<Rooms>,
        config: Config,
        policy: Policy,
        server: AuthorId,
    ) -> State {
        State {
            rooms,
            config,
            policy: std::sync::RwLock::new(policy),
            server,
            next_conn: AtomicU64::new(1),
            queued_total: Arc::new(AtomicUsize::new(0)),
            open: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// The loaded rooms.
    pub(crate) fn rooms(&self) -> &Arc<Rooms> {
        &self.rooms
    }

    /// Ends every connection (after the rooms sent their `close` frames)
    /// and waits up to [`SHUTDOWN_DRAIN`] for them to write what was
    /// queued and their close frames. (The WebSocket tasks are the
    /// upgrade's, not the accept loop's: only this map knows them.)
    pub(crate) async fn close_all(&self) {
        let closed = async {
            loop {
                let ended = self.ended.notified();
                {
                    let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                    if open.is_empty() {
                        return;
                    }
                    for handle in open.values() {
                        handle.kill(Reason::ShuttingDown);
                    }
                }
                ended.await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_DRAIN, closed).await.is_err() {
            debug!("connections still writing at shutdown: stopping without waiting");
        }
    }
}

/// One of a connection's outbound queues, with the bytes it holds.
#[derive(Clone, Debug)]
struct Lane {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued and not yet written.
    queued: Arc<AtomicUsize>,
}

impl Lane {
    fn new() -> (Lane, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (frames, receiver) = mpsc::unbounded_channel();
        let lane = Lane {
            frames,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        (lane, receiver)
    }
}

/// How rooms reach a connection: two frame queues, each bounded in bytes
/// (sync frames, and blob bytes written only when no sync frame waits),
/// and a way to end it.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle {
    sync: Lane,
    bulk: Lane,
    /// Each lane's bound.
    max_queued: usize,
    /// Bytes queued for all connections.
    queued_total: Arc<AtomicUsize>,
    max_queued_total: usize,
    /// `Some(reason)` once the connection is to end.
    kill: Arc<watch::Sender<Option<Reason>>>,
    /// Nodes this peer may still have inserted (rooms debit it).
    nodes: Arc<Mutex<TokenBucket>>,
    slot: Arc<PeerSlot>,
}

impl ConnHandle {
    /// Debits `n` inserted nodes from the peer's bucket; past its rate,
    /// the connection is closed `rate_limited`.
    pub(crate) fn inserted(&self, n: usize) {
        let now = self.slot.elapsed_ms();
        let within = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(n as u64, now);
        if !within {
            debug!(nodes = n, "peer above its node rate");
            metrics::counter!(telemetry::CONNECTIONS_CLOSED, "reason" => "rate_limited")
                .increment(1);
            self.kill(Reason::RateLimited);
        }
    }

    /// Queues a sync frame; `false` if the queue is full (the client
    /// lags): it holds its bound already, or all queues together hold
    /// theirs. A queue under its bound takes any frame, so it holds at most
    /// its bound plus one frame (a pack may reach past the send window
    /// along an author's chain to a signed node).
    pub(crate) fn send(&self, frame: Vec<u8>) -> bool {
        self.push(&self.sync, frame)
    }

    /// Queues a blob frame, bounded like [`ConnHandle::send`] in a queue of
    /// its own: it is written only when no sync frame waits.
    pub(crate) fn send_bulk(&self, frame: Vec<u8>) -> bool {
        self.push(&self.bulk, frame)
    }

    fn push(&self, lane: &Lane, frame: Vec<u8>) -> bool {
        let len = frame.len();
        let before = lane.queued.fetch_add(len, Ordering::AcqRel);
        let total = self.queued_total.fetch_add(len, Ordering::AcqRel);
        if before >= self.max_queued || (before > 0 && total >= self.max_queued_total) {
            self.unqueue(lane, len);
            if total >= self.max_queued_total {
                metrics::counter!(telemetry::REFUSED, "why" => "outbound_total").increment(1);
            }
            return false;
        }
        // A closed queue: the connection is gone, its `Gone` on the way.
        if lane.frames.send(frame).is_err() {
            self.unqueue(lane, len);
        }
        true
    }

    /// Bytes queued and not yet written, in both queues.
    pub(crate) fn queued(&self) -> usize {
        self.sync.queued.load(Ordering::Acquire) + self.bulk.queued.load(Ordering::Acquire)
    }

    /// `len` bytes left `lane`.
    fn unqueue(&self, lane: &Lane, len: usize) {
        lane.queued.fetch_sub(len, Ordering::AcqRel);
        self.queued_total.fetch_sub(len, Ordering::AcqRel);
    }

    /// Ends the connection with `reason` (the first reason given wins).
    pub(crate) fn kill(&self, reason: Reason) {
        self.kill.send_if_modified(|r| {
            let first = r.is_none();
            r.get_or_insert(reason);
            first
        });
    }
}

/// `GET /ws`: upgrades to a WebSocket carrying protocol frames.
pub(crate) async fn upgrade(
    ws: WebSocketUpgrade,
    AxumState(state): AxumState<Arc<State>>,
    Extension(slot): Extension<Arc<PeerSlot>>,
) -> Response {
    let max = state.config.session.max_frame;
    // Small socket buffers: an idle session should cost kilobytes, and
    // frames are flushed as they are queued anyway.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| {
            let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
            let peer = slot.ip();
            serve(socket, state, conn, slot).instrument(info_span!("conn", conn, %peer))
        })
}

/// The close code that goes with a reason (RFC 6455 §7.4.1).
fn close_code(reason: &Reason) -> u16 {
    match reason {
        Reason::ShuttingDown => 1001,
        Reason::Malformed => 1002,
        Reason::TooLarge => 1009,
        Reason::RateLimited | Reason::QuotaExceeded => 1008,
        Reason::Overloaded | Reason::Lagging => 1013,
        _ => 1000,
    }
}

/// Unix time in milliseconds (capabilities expire on it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a WebSocket-level read error means for the connection.
fn read_error_reason(error: axum::Error) -> Option<Reason> {
    let inner = error.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Some(Reason::TooLarge),
        Some(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => {
            Some(Reason::Malformed)
        }
        // The peer went away (reset, closed): nothing to tell it.
        _ => None,
    }
}

async fn serve(socket: WebSocket, state: Arc<State>, conn: u64, slot: Arc<PeerSlot>) {
    let config = &state.config;
    let (sink, mut stream) = socket.split();
    let (sync, sync_queue) = Lane::new();
    let (bulk, bulk_queue) = Lane::new();
    let handle = ConnHandle {
        sync,
        bulk,
        max_queued: config.outbound_queue_bytes,
        queued_total: state.queued_total.clone(),
        max_queued_total: config.outbound_total_bytes,
        kill: Arc::new(watch::Sender::new(None)),
        nodes: Arc::new(Mutex::new(TokenBucket::new(
            config.peer_nodes_per_sec,
            config.peer_burst_nodes,
        ))),
        slot: slot.clone(),
    };
    state
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn, handle.clone());
    metrics::gauge!(telemetry::CONNECTIONS).increment(1.0);
    metrics::counter!(telemetry::CONNECTIONS_TOTAL).increment(1);

    let writer = tokio::spawn(write_loop(
        sink,
        handle.clone(),
        handle.kill.subscribe(),
        sync_queue,
        bulk_queue,
        config.write_timeout,
    ));

    // Every hello on this connection signs this nonce.
    let mut challenge = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut challenge) {
        tracing::error!(error = %e, "no randomness for a challenge: closing the connection");
        handle.kill(Reason::Overloaded);
    }
    handle.send(
        Envelope {
            version: PROTOCOL_VERSION,
            session: 0,
            corr: 0,
            message: Message::Challenge {
                nonce: challenge,
                server: state.server,
            },
        }
        .encode(),
    );
    let ended = read_loop(&state, conn, &handle, &mut stream, &slot, &challenge).await;
    if let Some(reason) = ended {
        metrics::counter!(telemetry::CONNECTIONS_CLOSED, "reason" => reason.as_str().to_owned())
            .increment(1);
        handle.kill(reason);
    }
    handle.kill(Reason::ShuttingDown);
    let _ = writer.await;
    state
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&conn);
    state.ended.notify_waiters();
    metrics::gauge!(telemetry::CONNECTIONS).decrement(1.0);
}

type Sink = futures_util::stream::SplitSink<WebSocket, WsMessage>;

/// At shutdown, how long a connection may take to write what its rooms
/// queued (their `close` frames last) and its own close frame: the relay
/// waits this long for connections to end.
pub(crate) const SHUTDOWN_DRAIN: Duration = Duration::from_millis(300);

/// Writes the queued frames, sync frames before blob bytes, until the
/// connection is killed; then closes the socket with the reason. A peer
/// that does not take a frame within `write_timeout` lags. A kill is seen
/// between frames and during a write (a frame cut short stays in the
/// WebSocket's buffer, ahead of the close frame), so a slow reader never
/// holds back the end of the connection.
async fn write_loop(
    mut sink: Sink,
    handle: ConnHandle,
    mut killed: watch::Receiver<Option<Reason>>,
    mut sync: mpsc::UnboundedReceiver<Vec<u8>>,
    mut bulk: mpsc::UnboundedReceiver<Vec<u8>>,
    write_timeout: Duration,
) {
    let reason = loop {
        let (lane, frame) = tokio::select! {
            biased;
            _ = killed.changed() => break killed.borrow().clone(),
            frame = sync.recv() => (&handle.sync, frame),
            frame = bulk.recv() => (&handle.bulk, frame),
        };
        // Every sender gone: the connection ended without a reason to give.
        let Some(frame) = frame else { break None };
        handle.unqueue(lane, frame.len());
        let written = tokio::select! {
            biased;
            _ = killed.changed() => break killed.borrow().clone(),
            written = tokio::time::timeout(write_timeout, async {
                sink.feed(WsMessage::Binary(frame.into())).await?;
                // Flush once the queues are empty, not per frame.
                if sync.is_empty() && bulk.is_empty() {
                    sink.flush().await
                } else {
                    Ok(())
                }
            }) => written,
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break None,
            Err(_) => {
                metrics::counter!(telemetry::CONNECTIONS_CLOSED, "reason" => "lagging")
                    .increment(1);
                handle.kill(Reason::Lagging);
                break Some(Reason::Lagging);
            }
        }
    };
    if let Some(reason) = reason {
        // Write the sync frames the rooms queued (their close frames),
        // unless the peer is not reading; blob bytes are dropped (a client
        // asks again). Then close the socket with the reason. At shutdown
        // all of it fits in the relay's drain time.
        let (flush, close) = if reason == Reason::ShuttingDown {
            (SHUTDOWN_DRAIN / 2, SHUTDOWN_DRAIN / 4)
        } else {
            (write_timeout, write_timeout)
        };
        if reason != Reason::Lagging {
            let _ = tokio::time::timeout(flush, async {
                while let Ok(frame) = sync.try_recv() {
                    handle.unqueue(&handle.sync, frame.len());
                    sink.feed(WsMessage::Binary(frame.into())).await?;
                }
                Ok::<_, axum::Error>(())
            })
            .await;
        }
        let _ = tokio::time::timeout(
            close,
            sink.send(WsMessage::Close(Some(CloseFrame {
                code: close_code(&reason),
                reason: reason.as_str().to_owned().into(),
            }))),
        )
        .await;
    }
    // What was never written leaves the byte counts.
    for (lane, queue) in [(&handle.sync, &mut sync), (&handle.bulk, &mut bulk)] {
        queue.close();
        while let Ok(frame) = queue.try_recv() {
            handle.unqueue(lane, frame.len());
        }
    }
}

/// A session as the connection routes it.
struct Route {
    room: RoomId,
    inbox: Option<RoomInbox>,
}

/// Reads and routes frames until the connection ends; returns the reason
/// to close it with, if it is this side's to give.
async fn read_loop(
    state: &Arc<State>,
    conn: u64,
    handle: &ConnHandle,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    slot: &PeerSlot,
    challenge: &[u8; 32],
) -> Option<Reason> {
    let config = &state.config;
    let idle = Duration::from_millis(config.session.idle_timeout_ms);
    let mut bucket = TokenBucket::new(config.peer_bytes_per_sec, config.peer_burst_bytes);
    let mut sessions: HashMap<u64, Route> = HashMap::new();
    let mut killed = handle.kill.subscribe();
    let opened = tokio::time::Instant::now();
    let mut last_frame = opened;
    let ended = loop {
        // A connection must open a session soon, and then keep sending
        // (sessions send heartbeats).
        let deadline = if sessions.is_empty() {
            opened + config.session_wait
        } else {
            last_frame + idle
        };
        let message = tokio::select! {
            m = stream.next() => m,
            _ = killed.changed() => break None,
            () = tokio::time::sleep_until(deadline) => {
                debug!(sessions = sessions.len(), "connection timed out");
                break Some(Reason::Timeout);
            }
        };
        let message = match message {
            None => break None,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                let reason = read_error_reason(e);
                debug!(
                    reason = reason.as_ref().map(Reason::as_str),
                    "WebSocket error"
                );
                break reason;
            }
        };
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Close(_) => break None,
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            WsMessage::Text(_) => break Some(Reason::Malformed),
        };
        last_frame = tokio::time::Instant::now();
        metrics::counter!(telemetry::BYTES_IN).increment(bytes.len() as u64);
        if !bucket.take(bytes.len() as u64, slot.elapsed_ms()) {
            debug!("peer above its byte rate");
            break Some(Reason::RateLimited);
        }
        let received = Instant::now();
        let env = match Envelope::decode(&bytes) {
            Ok(env) => env,
            Err(e) => {
                debug!(error = %e, "undecodable frame: closing the connection");
                handle.send(Envelope::close_frame(0, Reason::Malformed, e.to_string()));
                break Some(Reason::Malformed);
            }
        };
        let mut access = None;
        if let Some(presented) = Presented::of_hello(&env) {
            let admitted = {
                let policy = state.policy.read().unwrap_or_else(|p| p.into_inner());
                auth::admit(&policy, challenge, presented, unix_ms())
            };
            match admitted {
                Ok(a) => access = Some(Box::new(a.on_clock(unix_ms(), state.rooms.now()))),
                Err(refusal) => {
                    debug!(reason = refusal.reason.as_str(), "hello refused");
                    metrics::counter!(telemetry::AUTH_REFUSED, "reason" => refusal.reason.as_str().to_owned())
                        .increment(1);
                    handle.send(Envelope::reject_frame(
                        env.session,
                        refusal.reason,
                        refusal.message,
                    ));
                    continue;
                }
            }
        }
        if let Message::Hello { room, .. } = &env.message
            && !sessions.contains_key(&env.session)
        {
            // The address is charged only once the connection has room.
            let refused = if sessions.len() >= config.max_sessions_per_conn {
                Some(("sessions", "too many sessions on this connection"))
            } else if !slot.open_session() {
                Some(("sessions_per_ip", "too many sessions from this address"))
            } else {
                None
            };
            if let Some((why, message)) = refused {
                metrics::counter!(telemetry::REFUSED, "why" => why).increment(1);
                handle.send(Envelope::close_frame(
                    env.session,
                    Reason::Overloaded,
                    message,
                ));
                continue;
            }
            sessions.insert(
                env.session,
                Route {
                    room: room.clone(),
                    inbox: None,
                },
            );
        }
        let session = env.session;
        let Some(route) = sessions.get_mut(&session) else {
            handle.send(Envelope::close_frame(
                session,
                Reason::Malformed,
                "no session with this id: send hello first",
            ));
            continue;
        };
        let mut input = RoomInput::Frame {
            conn,
            env: Box::new(env),
            access,
            bytes: bytes.len(),
            out: handle.clone(),
            received,
            permit: None,
        };
        // A room that stopped (idle, or storage failed) loads again once.
        let refused = loop {
            let inbox = match route.inbox.clone() {
                Some(inbox) => inbox,
                None => match state.rooms.inbox(&route.room) {
                    Ok(inbox) => route.inbox.insert(inbox).clone(),
                    Err(refused) => break Some(refused),
                },
            };
            match inbox.send(input, config.inbox_wait).await {
                Ok(()) => break None,
                Err(Ok(back)) => {
                    route.inbox = None;
                    input = back;
                }
                Err(Err(refused)) => break Some(refused),
            }
        };
        match refused {
            None => {}
            Some(Refused::TooManyRooms) => {
                // This session only: the client retries later.
                sessions.remove(&session);
                handle.send(Envelope::close_frame(
                    session,
                    Reason::Overloaded,
                    "too many rooms are loaded; retry later",
                ));
            }
            Some(Refused::InboxFull) => {
                metrics::counter!(telemetry::REFUSED, "why" => "inbox").increment(1);
                break Some(Reason::Overloaded);
            }
        }
    };
    let told: HashMap<RoomId, RoomInbox> = sessions
        .into_values()
        .filter_map(|r| Some((r.room, r.inbox?)))
        .collect();
    for inbox in told.into_values() {
        let _ = inbox
            .send(RoomInput::Gone { conn }, config.inbox_wait)
            .await;
    }
    ended
}
