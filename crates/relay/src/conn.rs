//! WebSocket connections: each carries the sessions of any number of
//! rooms, one envelope per binary frame. The reader decodes each frame once
//! and routes it by session id to its room's actor; the writer drains a
//! bounded queue the room actors fill. A frame that does not decode cannot
//! be attributed to a session, so it closes the whole connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State as AxumState;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use syncline_core::RoomId;
use syncline_core::proto::message::{Envelope, Message, Reason};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info_span};

use crate::Config;
use crate::rooms::{RoomInput, Rooms, Sender};
use crate::telemetry;

/// Shared by every connection.
#[derive(Debug)]
pub(crate) struct State {
    rooms: Arc<Rooms>,
    config: Config,
    next_conn: AtomicU64,
    /// Every open connection's handle, to end them at shutdown.
    open: Mutex<HashMap<u64, ConnHandle>>,
}

impl State {
    pub(crate) fn new(rooms: Arc<Rooms>, config: Config) -> State {
        State {
            rooms,
            config,
            next_conn: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Ends every connection (after the rooms sent their `close` frames).
    pub(crate) fn close_all(&self) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for handle in open.values() {
            handle.kill(Reason::ShuttingDown);
        }
    }
}

/// How room actors reach a connection: a bounded frame queue, and a way to
/// end it.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle {
    frames: mpsc::Sender<Vec<u8>>,
    /// `Some(reason)` once the connection is to end.
    kill: Arc<watch::Sender<Option<Reason>>>,
}

impl ConnHandle {
    /// Queues a frame; `false` if the queue is full (the client lags).
    pub(crate) fn send(&self, frame: Vec<u8>) -> bool {
        match self.frames.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => false,
            // The connection is gone; its `Gone` is on the way.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }

    /// Ends the connection with `reason`.
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
            serve(socket, state, conn).instrument(info_span!("conn", conn))
        })
}

async fn serve(socket: WebSocket, state: Arc<State>, conn: u64) {
    let (mut sink, mut stream) = socket.split();
    let (frames, mut queue) = mpsc::channel::<Vec<u8>>(state.config.outbound_queue);
    let handle = ConnHandle {
        frames,
        kill: Arc::new(watch::Sender::new(None)),
    };
    state
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(conn, handle.clone());
    metrics::gauge!(telemetry::CONNECTIONS).increment(1.0);
    metrics::counter!(telemetry::CONNECTIONS_TOTAL).increment(1);

    let mut killed = handle.kill.subscribe();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                frame = queue.recv() => match frame {
                    Some(frame) => {
                        // Write everything queued, then flush once.
                        let mut failed = sink.feed(WsMessage::Binary(frame.into())).await.is_err();
                        while let (false, Ok(frame)) = (failed, queue.try_recv()) {
                            failed = sink.feed(WsMessage::Binary(frame.into())).await.is_err();
                        }
                        if failed || sink.flush().await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = killed.changed() => {
                    let reason = killed.borrow().clone().unwrap_or(Reason::ShuttingDown);
                    // Flush what the rooms queued (their close frames), then
                    // close the socket with the reason.
                    while let Ok(frame) = queue.try_recv() {
                        let _ = sink.send(WsMessage::Binary(frame.into())).await;
                    }
                    let _ = sink
                        .send(WsMessage::Close(Some(CloseFrame {
                            code: 1000,
                            reason: reason.as_str().to_owned().into(),
                        })))
                        .await;
                    break;
                }
            }
        }
    });

    // Session id -> room (learned from each session's `hello`) and, once
    // known, the room actor's inbox.
    let mut sessions: HashMap<u64, (RoomId, Option<Sender<RoomInput>>)> = HashMap::new();
    let mut killed = handle.kill.subscribe();
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            _ = killed.changed() => None,
        };
        let Some(Ok(message)) = message else { break };
        let bytes = match message {
            WsMessage::Binary(bytes) => bytes,
            WsMessage::Close(_) => break,
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            WsMessage::Text(_) => {
                handle.kill(Reason::Malformed);
                break;
            }
        };
        metrics::counter!(telemetry::BYTES_IN).increment(bytes.len() as u64);
        let received = Instant::now();
        let env = match Envelope::decode(&bytes) {
            Ok(env) => env,
            Err(e) => {
                debug!(error = %e, "undecodable frame: closing the connection");
                handle.send(Envelope::close_frame(0, Reason::Malformed, e.to_string()));
                handle.kill(Reason::Malformed);
                break;
            }
        };
        if let Message::Hello { room, .. } = &env.message {
            sessions.insert(env.session, (room.clone(), None));
        }
        let Some((room, inbox)) = sessions.get_mut(&env.session) else {
            handle.send(Envelope::close_frame(
                env.session,
                Reason::Malformed,
                "no session with this id: send hello first",
            ));
            continue;
        };
        let input = RoomInput::Frame {
            conn,
            session: env.session,
            env: Box::new(env),
            out: handle.clone(),
            received,
        };
        let input = match inbox.as_ref() {
            Some(tx) => match tx.send(input) {
                Ok(()) => continue,
                Err(std::sync::mpsc::SendError(input)) => input,
            },
            None => input,
        };
        *inbox = state.rooms.send(room, input);
    }
    let mut told: Vec<&RoomId> = sessions.values().map(|(room, _)| room).collect();
    told.sort();
    told.dedup();
    for room in told {
        state.rooms.send(room, RoomInput::Gone { conn });
    }
    handle.kill(Reason::ShuttingDown);
    let _ = writer.await;
    state
        .open
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&conn);
    metrics::gauge!(telemetry::CONNECTIONS).decrement(1.0);
}
