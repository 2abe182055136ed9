//! The client half: one client session over a local durable room.
//!
//! What arrives is persisted before it is acknowledged (the session's
//! `Accepted` event is answered only after [`DurableRoom::with_room`]
//! wrote the nodes), and what the server reports holding leaves the outbox
//! durably. A storage failure while receiving closes the session with
//! `overloaded`: the room reloaded from disk, so the session's view of it is
//! stale, and the next connection's handshake repairs what was lost.

use std::ops::Range;

use syncline_core::proto::message::{Envelope, PresenceStatus, Reason};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config as SessionConfig, Credentials, Event, Session};
use syncline_core::{AuthorId, Keypair, NodeIdx, Room};
use syncline_store::{DurableRoom, ReplicaError};

/// A client session and the durable work its events call for.
#[derive(Debug)]
pub struct ClientLink {
    session: Session,
}

impl ClientLink {
    /// Opens session `id` for `room`, subscribed to `scope`, presenting
    /// `credentials`; its `hello` is ready in [`ClientLink::poll_transmit`].
    pub fn open(
        now: u64,
        id: u64,
        room: &mut DurableRoom,
        config: SessionConfig,
        scope: Scope,
        credentials: &Credentials,
    ) -> Result<ClientLink, ReplicaError> {
        let session = room.with_room(|r, key| {
            Session::client_scoped(now, id, r, key, config, scope, credentials)
        })?;
        Ok(ClientLink { session })
    }

    /// The session (its state, strategy and counters).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Changes the subscription (see [`Session::subscribe`]).
    pub fn subscribe(&mut self, now: u64, scope: Scope) {
        self.session.subscribe(now, scope);
    }

    /// Steps `envelopes` in order and persists what they inserted in one
    /// write; returns the nodes inserted. On a storage failure the session
    /// is closed with `overloaded` and the error returned.
    pub fn handle_envelopes(
        &mut self,
        now: u64,
        room: &mut DurableRoom,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Result<Range<NodeIdx>, ReplicaError> {
        self.step(now, room, |session, r, key| {
            for env in envelopes {
                session.handle_envelope(now, env, r, Some(key));
            }
        })
    }

    /// Steps one frame as it came off the wire (one that may not decode:
    /// the session then closes with `malformed`).
    pub fn handle_frame(
        &mut self,
        now: u64,
        room: &mut DurableRoom,
        frame: &[u8],
    ) -> Result<Range<NodeIdx>, ReplicaError> {
        self.step(now, room, |session, r, key| {
            session.handle_input(now, frame, r, Some(key));
        })
    }

    fn step(
        &mut self,
        now: u64,
        room: &mut DurableRoom,
        f: impl FnOnce(&mut Session, &mut Room, &Keypair),
    ) -> Result<Range<NodeIdx>, ReplicaError> {
        let first = room.room().dag().next_idx();
        let session = &mut self.session;
        match room.with_room(|r, key| f(session, r, key)) {
            Ok(()) => Ok(first..room.room().dag().next_idx()),
            Err(e) => {
                self.session
                    .close(now, Reason::Overloaded, "local storage failed");
                Err(e)
            }
        }
    }

    /// Sends local commits `nodes` to the server.
    pub fn send_local(&mut self, now: u64, room: &mut DurableRoom, nodes: &[NodeIdx]) {
        let session = &mut self.session;
        let sent = room.with_room(|r, key| session.send_nodes(now, r, nodes, Some(key)));
        debug_assert!(
            sent.is_ok(),
            "sending inserts nothing, so it writes nothing"
        );
    }

    /// When [`ClientLink::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.session.poll_timeout()
    }

    /// Fires the session's timers due at `now`.
    pub fn handle_timeout(&mut self, now: u64, room: &mut DurableRoom) {
        let session = &mut self.session;
        let fired = room.with_room(|r, key| session.handle_timeout(now, r, Some(key)));
        debug_assert!(
            fired.is_ok(),
            "timers insert nothing, so they write nothing"
        );
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.session.poll_transmit()
    }

    /// Shows this client's presence in the room (`offline` ends it): the
    /// server relays it to the room's other sessions (ephemeral, never in
    /// history).
    pub fn send_presence(&mut self, now: u64, status: PresenceStatus, message: &str, data: &[u8]) {
        // The server names the sender itself: key and client are its own.
        self.session
            .send_presence(now, AuthorId([0; 32]), 0, status, message, data);
    }

    /// Ends the session with `reason`, telling the server.
    pub fn close(&mut self, now: u64, reason: Reason, message: &str) {
        self.session.close(now, reason, message);
    }

    /// The next event, once its durable part is done: accepted nodes are
    /// acknowledged (they were persisted as they arrived), and nodes the
    /// server acknowledged or reported holding leave the outbox. A storage
    /// failure there is returned (the outbox keeps the nodes; they are sent
    /// again and acknowledged again, harmlessly).
    pub fn poll_event(
        &mut self,
        now: u64,
        room: &mut DurableRoom,
    ) -> Result<Option<Event>, ReplicaError> {
        let Some(event) = self.session.poll_event() else {
            return Ok(None);
        };
        match &event {
            Event::Accepted { corr, nodes } => {
                debug_assert!(
                    nodes.iter().all(|&n| n < room.stored()),
                    "only durable nodes are acknowledged"
                );
                self.session.acknowledge(now, *corr, room.room());
            }
            Event::Acknowledged { nodes } => room.acknowledge(nodes)?,
            Event::ServerHolds { through_seq } => room.acknowledge_through(*through_seq)?,
            Event::Connected
            | Event::CaughtUp
            | Event::Subscribed { .. }
            | Event::PeerError { .. }
            | Event::Refused { .. }
            | Event::Closed { .. } => {}
        }
        Ok(Some(event))
    }
}
