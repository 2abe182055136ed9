//! Moving nodes: packs cut from the send queue while the window of
//! unacknowledged packs has room, relayed packs encoded once, packs
//! received (checked, inserted, reported for the driver to persist), and
//! acknowledgements both ways.

use super::*;

impl Session {
    /// Whether queued nodes wait and the window has room for a pack.
    pub(super) fn can_send(&self) -> bool {
        !self.queue.is_empty() && !self.window_full()
    }

    /// Whether the packs in flight fill the send window.
    pub(super) fn window_full(&self) -> bool {
        self.in_flight.len() >= self.config.send_window_packs
            || self.in_flight_bytes >= self.config.send_window_bytes
    }

    /// Since when the peer has owed this session something without
    /// delivering it: the oldest unacknowledged pack, or (client) catch-up
    /// that stopped progressing. `None`: nothing is owed.
    pub(super) fn stalled_since(&self) -> Option<u64> {
        let oldest_pack = self.in_flight.first_key_value().map(|(_, (t, ..))| *t);
        let catchup = match &self.role {
            Role::Client(c) => c.catchup_progress,
            Role::Server(_) => None,
        };
        oldest_pack.into_iter().chain(catchup).min()
    }

    /// Server: records that the client holds `nodes` (sent to it in
    /// causally complete runs, or received from it), and so every earlier
    /// node of their authors.
    pub(super) fn note_sent(&mut self, room: &Room, nodes: &[NodeIdx]) {
        let dag = room.dag();
        for &n in nodes {
            let seq = self
                .server_state()
                .peer_holds
                .entry(*dag.author(n))
                .or_insert(0);
            *seq = (*seq).max(dag.seq(n));
        }
    }

    /// Records that the peer surely holds `nodes` (it sent or acknowledged
    /// them), and so every earlier node of their authors.
    pub(super) fn note_acked(&mut self, room: &Room, nodes: &[NodeIdx]) {
        let dag = room.dag();
        for &n in nodes {
            let seq = self.peer_acked.entry(*dag.author(n)).or_insert(0);
            *seq = (*seq).max(dag.seq(n));
        }
    }

    /// Client: everything the server had at the handshake has arrived.
    pub(super) fn mark_caught_up(&mut self) {
        self.client_state().caught_up = true;
        self.events.push_back(Event::CaughtUp);
    }

    /// Acknowledges the pack `corr` once the driver has made its accepted
    /// nodes durable (after [`Event::Accepted`]).
    pub fn acknowledge(&mut self, now: u64, corr: u64, room: &Room) {
        let Some(entry) = self.to_ack.remove(&corr) else {
            return;
        };
        if self.state == State::Closed {
            return;
        }
        match entry {
            None => self.send(now, corr, Message::Ack { nodes: Vec::new() }),
            Some(nodes) => {
                let ids: Vec<NodeId> = nodes.iter().map(|&n| room.dag().id(n)).collect();
                for chunk in ids.chunks(MAX_IDS) {
                    self.send(
                        now,
                        corr,
                        Message::Ack {
                            nodes: chunk.to_vec(),
                        },
                    );
                }
            }
        }
    }

    /// Relays `nodes`, already encoded once as `pack` for every session of
    /// the room (encoding per session would cost a relay with many
    /// subscribers dearly). A session with a subscription, or a pack too
    /// large for one frame, falls back to [`Session::send_nodes`].
    pub fn relay_pack(&mut self, now: u64, room: &mut Room, nodes: &[NodeIdx], pack: &EncodedPack) {
        if self.state != State::Open {
            return;
        }
        // Behind queued nodes, or past the window, it waits its turn (and
        // is then exported for this session alone).
        let fits = self.in_flight.len() < self.config.send_window_packs
            && self.in_flight_bytes + pack.bytes.len() <= self.config.send_window_bytes;
        let scoped = matches!(&self.role, Role::Server(s) if !s.scope.is_everything());
        if scoped
            || pack.bytes.len() + 256 > self.config.max_frame
            || !self.queue.is_empty()
            || !fits
        {
            return self.send_nodes(now, room, nodes, None);
        }
        self.send_pack(
            now,
            nodes,
            pack.bytes.clone(),
            pack.checksum,
            Phase::Live,
            true,
        );
    }

    /// Sends one pack of `nodes` under a new correlation id and keeps it in
    /// flight until acknowledged.
    pub(super) fn send_pack(
        &mut self,
        now: u64,
        nodes: &[NodeIdx],
        pack: Vec<u8>,
        checksum: [u8; 32],
        phase: Phase,
        last: bool,
    ) {
        let corr = self.next_corr;
        self.next_corr += 1;
        self.in_flight_bytes += pack.len();
        self.in_flight
            .insert(corr, (now, nodes.to_vec(), pack.len()));
        self.nodes_sent += nodes.len() as u64;
        if phase == Phase::Catchup {
            self.catchup_sent += nodes.len() as u64;
        }
        self.send(
            now,
            corr,
            Message::Pack {
                pack,
                checksum,
                phase,
                last,
            },
        );
    }

    /// Sends `nodes` of `room` to the peer as live packs (new local commits
    /// on a client; accepted nodes relayed by a server). `signer` signs the
    /// local author's nodes.
    pub fn send_nodes(
        &mut self,
        now: u64,
        room: &mut Room,
        nodes: &[NodeIdx],
        signer: Option<&Keypair>,
    ) {
        if self.state != State::Open {
            return;
        }
        // Behind queued nodes (a catch-up), they wait their turn: the
        // driver's timer sends the queue one pack per call, so relaying to
        // many catching-up sessions never exports their whole windows in
        // one step.
        let burst = if self.queue.is_empty() { usize::MAX } else { 0 };
        if let Role::Server(server) = &self.role
            && !server.scope.is_everything()
        {
            let chosen = server.scope.select(room, nodes, &server.peer_holds);
            self.note_sent(room, &chosen);
            self.enqueue(now, room, signer, &chosen, Phase::Live, burst);
        } else {
            self.enqueue(now, room, signer, nodes, Phase::Live, burst);
        }
    }

    /// Queues `nodes` (in causal order) for packs of `phase`, then sends
    /// up to `burst` packs as the window allows (see `send_queue.rs`); the
    /// rest goes one pack per [`Session::handle_timeout`]. A burst of 0
    /// sends nothing yet: what the driver flushes first (a `welcome`) goes
    /// out before any export.
    pub(super) fn enqueue(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        nodes: &[NodeIdx],
        phase: Phase,
        burst: usize,
    ) {
        if let Role::Client(c) = &self.role
            && !c.may_write
        {
            // A read-only session uploads nothing; the outbox keeps it.
            return;
        }
        if self.queue.is_empty() {
            self.send_due = now;
        }
        self.queue.push(nodes, phase);
        self.pump(now, room, signer, burst);
    }

    /// Sends up to `burst` packs of queued nodes while the window has room,
    /// each under both the node and the frame limit, and the messages
    /// queued behind them once they have gone.
    pub(super) fn pump(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        burst: usize,
    ) {
        let mut packs = 0;
        loop {
            while let Some((corr, message)) = self.queue.pop_message() {
                self.send(now, corr, message);
            }
            if self.state != State::Open
                || packs >= burst
                || self.queue.is_empty()
                || self.window_full()
            {
                return;
            }
            // The envelope adds well under 256 bytes.
            let frame = self.config.max_frame - 256;
            let size = self.queue.pack_size(
                frame.min(self.config.pack_bytes),
                self.config.max_pack_nodes,
            );
            let Some((mut chunk, phase)) = self.queue.take(size) else {
                continue; // Only nodes sent ahead of their turn.
            };
            // Export costs what the nodes hold, not what they compress to:
            // keep a chunk's content near `pack_bytes` too.
            let mut content = 0;
            let fit = chunk
                .iter()
                .position(|&n| {
                    content += room.dag().content_size(n);
                    content > self.config.pack_bytes
                })
                .map_or(chunk.len(), |at| at.max(1));
            self.queue.put_back(&chunk[fit..], phase);
            chunk.truncate(fit);
            let (acked, base, lacks) = (&self.peer_acked, self.diff_base, &self.peer_lacks);
            let holds = |n: NodeIdx, a: &AuthorId, s: u64| {
                acked.get(a).is_some_and(|&h| s <= h)
                    || n < base && lacks.as_ref().is_some_and(|l| !l.contains(&n))
            };
            let mut take = chunk.len();
            let exported = loop {
                let level = self.config.zstd_level;
                match room.export_pack(&chunk[..take], signer, &holds, level) {
                    Ok(exported) if exported.pack.len() <= frame || take == 1 => break exported,
                    // Too large for a frame: halve it.
                    Ok(_) => take /= 2,
                    // Another author's nodes with no signature held:
                    // sending them unsigned would be refused, and skipping
                    // them would leave the peer silently behind. End the
                    // session loudly instead.
                    Err(e) => return self.close(now, Reason::InvalidNode, &e.to_string()),
                }
            };
            self.queue.put_back(&chunk[take..], phase);
            self.queue
                .observe_pack(exported.nodes.len(), exported.pack.len());
            // A pack may reach past its chunk along an author's chain for a
            // signature (see `Room::export_pack`): those go now, not again.
            let chunk: IdSet<NodeIdx> = chunk[..take].iter().copied().collect();
            self.queue.sent_ahead(
                exported
                    .nodes
                    .iter()
                    .copied()
                    .filter(|n| !chunk.contains(n)),
            );
            let checksum = *blake3::hash(&exported.pack).as_bytes();
            let last = !self.queue.next_is(phase);
            self.send_pack(now, &exported.nodes, exported.pack, checksum, phase, last);
            packs += 1;
        }
    }

    /// A pack from the peer: checked, inserted, and reported for the
    /// driver to persist and acknowledge.
    pub(super) fn on_pack(
        &mut self,
        now: u64,
        corr: u64,
        pack: &[u8],
        checksum: [u8; 32],
        phase: Phase,
        room: &mut Room,
    ) {
        if *blake3::hash(pack).as_bytes() != checksum {
            return self.close(now, Reason::Malformed, "pack checksum mismatch");
        }
        if let Role::Server(s) = &self.role
            && s.access.write.is_none()
        {
            // Nothing stored, nothing relayed; reading goes on.
            let message = "this session may only read: the pack was refused";
            return self.refuse_pack(now, corr, message.into());
        }
        let first = room.dag().next_idx();
        match room.receive_pack(pack) {
            Ok(received) => {
                let nodes: Vec<NodeIdx> = received.accepted.iter().map(|(i, _)| *i).collect();
                let arrived = (nodes.len() + received.duplicates) as u64;
                // The correlation id alone acknowledges exactly the pack's
                // nodes: with some waiting, or nodes of earlier packs
                // released, the ack lists ids.
                let whole = received.pending == 0 && received.released == 0;
                self.took_in(room, corr, nodes, whole);
                if let Role::Client(c) = &mut self.role
                    && phase == Phase::Catchup
                    && c.expecting > 0
                {
                    c.expecting = c.expecting.saturating_sub(arrived);
                    if c.expecting == 0 {
                        self.mark_caught_up();
                    }
                }
            }
            Err(ReceiveError::Pack(e)) => {
                let reason = match e {
                    PackError::BadSignature(_) | PackError::BrokenChain(_) | PackError::Node(_) => {
                        Reason::InvalidNode
                    }
                    PackError::TooLarge(_) => Reason::TooLarge,
                    _ => Reason::Malformed,
                };
                self.close(now, reason, &e.to_string());
            }
            Err(ReceiveError::Node {
                error: crate::dag::DagError::Unauthorized { reason, .. },
                ..
            }) => {
                // The node's author may not do that: refused and reported,
                // the session goes on. What the pack held before it is
                // kept and acknowledged by id once durable.
                let nodes: Vec<NodeIdx> = (first..room.dag().next_idx()).collect();
                if !nodes.is_empty() {
                    self.took_in(room, corr, nodes, false);
                }
                let message = format!("a node was refused: {reason}");
                self.refuse_pack(now, corr, message.clone());
                self.events.push_back(Event::Refused { message });
            }
            Err(ReceiveError::Node { error, .. }) => {
                let reason = match error {
                    crate::dag::DagError::Equivocation { .. } => Reason::Equivocation,
                    crate::dag::DagError::PendingFull(_) => Reason::Overloaded,
                    _ => Reason::InvalidNode,
                };
                self.close(now, reason, &error.to_string());
            }
        }
    }

    /// Nodes of pack `corr` are in the room: the peer holds them, and they
    /// are acknowledged once the driver has persisted them (by the
    /// correlation id alone when they are `whole` pack, else by id).
    fn took_in(&mut self, room: &Room, corr: u64, nodes: Vec<NodeIdx>, whole: bool) {
        if self.side() == Side::Server {
            self.note_sent(room, &nodes);
        }
        self.note_acked(room, &nodes);
        self.to_ack.insert(corr, (!whole).then(|| nodes.clone()));
        self.events.push_back(Event::Accepted { corr, nodes });
    }

    /// Tells the peer that pack `corr` was refused (wholly or from a node
    /// on) with `unauthorized`; the session goes on.
    fn refuse_pack(&mut self, now: u64, corr: u64, message: String) {
        self.send(
            now,
            0,
            Message::Error {
                code: Reason::Unauthorized,
                message,
                related: corr,
            },
        );
    }

    /// The peer acknowledges a pack (`nodes` empty) or listed nodes; the
    /// window makes room for the next pack.
    pub(super) fn on_ack(
        &mut self,
        now: u64,
        corr: u64,
        nodes: &[NodeId],
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        let mut acked: Vec<NodeIdx> = Vec::new();
        if nodes.is_empty() {
            // An empty list acknowledges the whole pack `corr`.
            if let Some((_, sent, bytes)) = self.in_flight.remove(&corr) {
                self.in_flight_bytes -= bytes;
                acked = sent;
            }
        } else {
            // Listed ids may include nodes of earlier packs that waited for
            // parents at the peer.
            let listed: IdSet<NodeId> = nodes.iter().copied().collect();
            let dag = room.dag();
            let mut freed = 0;
            self.in_flight.retain(|_, (_, sent, bytes)| {
                sent.retain(|&n| {
                    let hit = listed.contains(&dag.id(n));
                    if hit {
                        acked.push(n);
                    }
                    !hit
                });
                if sent.is_empty() {
                    freed += *bytes;
                }
                !sent.is_empty()
            });
            self.in_flight_bytes -= freed;
        }
        debug_assert_eq!(
            self.in_flight_bytes,
            self.in_flight.values().map(|(_, _, b)| b).sum::<usize>(),
            "the window's byte count matches the packs in flight"
        );
        self.note_acked(room, &acked);
        if !acked.is_empty() {
            self.events.push_back(Event::Acknowledged { nodes: acked });
        }
        // Room in the window: the next pack now, more as the driver's
        // timer calls come.
        self.send_due = now;
        self.pump(now, room, signer, 1);
    }
}
