//! The handshake: a server answers `hello` with `welcome` (choosing the
//! difference strategy and, with version vectors, queueing the catch-up)
//! or `reject`; a client opens on `welcome` the way the chosen strategy
//! starts.

use super::*;

impl Session {
    /// Server: answers `hello`, choosing the difference strategy.
    pub(super) fn on_hello(
        &mut self,
        now: u64,
        corr: u64,
        hello: Message,
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        let Message::Hello {
            versions,
            room: r,
            vv,
            caps,
            nodes,
            subscriptions,
            probe,
            ..
        } = hello
        else {
            unreachable!("dispatch hands over hellos only");
        };
        if !(versions.0..=versions.1).contains(&PROTOCOL_VERSION) {
            let message = format!("this server speaks version {PROTOCOL_VERSION}");
            self.send(
                now,
                corr,
                Message::Reject {
                    reason: Reason::VersionMismatch,
                    message: message.clone(),
                },
            );
            self.state = State::Closed;
            self.events.push_back(Event::Closed {
                reason: Reason::VersionMismatch,
                message,
                by_peer: false,
            });
            return;
        }
        if r != self.room || r != *room.id() {
            return self.close(now, Reason::Malformed, "hello for another room");
        }
        match Scope::parse(&subscriptions) {
            Ok(scope) => self.server_state().scope = scope,
            Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
        }
        self.server_state().wants_presence = caps.iter().any(|c| c == PRESENCE_CAPABILITY);
        self.server_state().peer_holds = vv.clone();
        self.peer_acked = vv.clone();
        // A client with history that left its version vector out asks for
        // set reconciliation: RIBLT for a difference its sketch can hold,
        // the MST beyond. Everyone else gets the baseline. The node counts
        // bound the difference from below; a client's probe of its sketch
        // estimates it.
        let mut d_est = (room.dag().len() as u64).abs_diff(nodes);
        if vv.is_empty() && !probe.is_empty() {
            let probed = riblt::estimate_difference(room.sketch(), &probe);
            d_est = d_est.max(probed.unwrap_or(0));
        }
        let dag = room.dag();
        let offers = |s: Strategy| caps.iter().any(|c| c == s.capability());
        let everything = self.server_state().scope.is_everything();
        let diff = if !vv.is_empty() || nodes == 0 || !everything {
            Strategy::Heads
        } else if offers(Strategy::Mst)
            && (d_est >= self.config.mst_above || !offers(Strategy::Ibf))
        {
            Strategy::Mst
        } else if offers(Strategy::Ibf) {
            Strategy::Ibf
        } else {
            Strategy::Heads
        };
        let mut missing = (diff == Strategy::Heads).then(|| dag.missing_for_version_vector(&vv));
        let mut server_vv = dag.version_vector();
        if let Some(all) = missing.as_mut()
            && !everything
        {
            // Only what touches the scope, with its ancestors; the
            // welcome's vv then says what the client will hold, so it
            // expects exactly that (and still uploads what the server
            // lacks: it is capped at the server's vv).
            *all = self.server_state().scope.select(room, all, &vv);
            self.note_sent(room, all);
            let holds = &self.server_state().peer_holds;
            for (author, seq) in server_vv.iter_mut() {
                *seq = (*seq).min(holds.get(author).copied().unwrap_or(0));
            }
            server_vv.retain(|_, seq| *seq > 0);
        }
        let dag = room.dag();
        let welcome = Message::Welcome {
            version: PROTOCOL_VERSION,
            caps: Strategy::ALL
                .iter()
                .map(|s| s.capability().to_owned())
                .collect(),
            heads: listed_heads(dag),
            vv: (diff == Strategy::Heads).then_some(server_vv),
            nodes: dag.len() as u64,
            diff: diff.capability().to_owned(),
            limits: Limits {
                max_frame: self.config.max_frame as u64,
                max_pack_nodes: self.config.max_pack_nodes as u64,
            },
            peers: self.server_state().peers.clone(),
            write: self
                .server_state()
                .access
                .write
                .as_ref()
                .map(|scope| scope.patterns().to_vec()),
        };
        self.strategy = Some(diff);
        if diff != Strategy::Heads {
            self.diff_base = room.dag().next_idx();
        }
        self.send(now, corr, welcome);
        self.state = State::Open;
        self.events.push_back(Event::Connected);
        if let Some(missing) = missing {
            // Exported after the welcome has gone, a pack per timer call,
            // as acknowledgements make room.
            self.enqueue(now, room, signer, &missing, Phase::Catchup, 0);
        } else if diff == Strategy::Ibf {
            // A difference of d decodes from about 1.35 d to 1.75 d
            // symbols, more when d is small.
            let first = d_est as usize * 3 / 2 + FIRST_SYMBOL_MARGIN;
            self.send_symbols(now, room, first);
        }
        // MST: the client asks first.
    }

    /// Client: the server's `welcome` opens the session the way its
    /// strategy starts.
    pub(super) fn on_welcome(
        &mut self,
        now: u64,
        diff: &str,
        vv: Option<VersionVector>,
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        let strategy = Strategy::from_capability(diff).unwrap_or(Strategy::Heads);
        self.state = State::Open;
        self.strategy = Some(strategy);
        self.events.push_back(Event::Connected);
        match strategy {
            Strategy::Mst => {
                self.diff_base = room.dag().next_idx();
                let (reconciler, first) = Reconciler::new();
                self.client_state().reconciler = Some(reconciler);
                self.send(now, 0, Message::MstRequest { ranges: first });
            }
            Strategy::Ibf => {
                self.diff_base = room.dag().next_idx();
                self.client_state().decoder = Some(Decoder::new());
            }
            Strategy::Heads => {
                let server_vv = vv.unwrap_or_default();
                self.peer_acked = server_vv.clone();
                let mine = room.dag().version_vector();
                let expecting = lacking(&mine, &server_vv);
                self.client_state().expecting = expecting;
                if expecting == 0 {
                    self.mark_caught_up();
                }
                let upload = room.dag().missing_for_version_vector(&server_vv);
                self.report_held(room, &upload);
                self.enqueue(now, room, signer, &upload, Phase::Live, 0);
            }
        }
    }

    /// Client: the server refused the session.
    pub(super) fn on_reject(&mut self, reason: Reason, message: String) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed {
            reason,
            message,
            by_peer: true,
        });
    }
}
