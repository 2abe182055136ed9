//! Subscriptions: a client narrows or widens what the server sends it; the
//! server sends what a new scope adds, then confirms.

use super::*;

impl Session {
    /// Client: changes the subscription (empty patterns: the whole room).
    /// The server sends what the new scope adds, then confirms with
    /// [`Event::Subscribed`]. Before the handshake completes, it is sent
    /// once it does.
    pub fn subscribe(&mut self, now: u64, scope: Scope) {
        match self.state {
            State::Handshake => self.client_state().pending_subscribe = Some(scope),
            State::Open => self.send(
                now,
                0,
                Message::Subscribe {
                    patterns: scope.patterns().to_vec(),
                },
            ),
            State::Closed => {}
        }
    }

    /// Server: the client changes its scope. What the new scope adds goes
    /// first, then `subscribed`: the client knows it has everything once
    /// that arrives.
    pub(super) fn on_subscribe(
        &mut self,
        now: u64,
        corr: u64,
        patterns: Vec<String>,
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        let scope = match Scope::parse(&patterns) {
            Ok(scope) => scope,
            Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
        };
        let server = self.server_state();
        let missing = room.dag().missing_for_version_vector(&server.peer_holds);
        let chosen = scope.select(room, &missing, &server.peer_holds);
        server.scope = scope;
        self.note_sent(room, &chosen);
        self.queue.push(&chosen, Phase::Live);
        self.queue
            .push_message(corr, Message::Subscribed { patterns });
        self.pump(now, room, signer, usize::MAX);
    }
}
