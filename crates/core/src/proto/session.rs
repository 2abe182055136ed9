//! Sync sessions as state machines without I/O (`docs/protocol.md` §5),
//! in quinn-proto's shape: the driver feeds frames with
//! [`Session::handle_input`], sends what [`Session::poll_transmit`] returns,
//! wakes at [`Session::poll_timeout`] to call [`Session::handle_timeout`],
//! and reacts to [`Session::poll_event`]. Time is an argument (milliseconds);
//! the room is passed in by the driver, which owns it and its storage.
//!
//! Durability stays with the driver: when nodes from the peer are accepted,
//! the session reports [`Event::Accepted`]; the driver persists them, then
//! calls [`Session::acknowledge`], and only then does the `ack` go out.
//!
//! Differences: the baseline (`diff/heads@1`) exchanges version vectors,
//! exact summaries of causally complete histories, so each side computes
//! what the other lacks from one exchange. A client with many authors leaves
//! its version vector out and the server streams RIBLT symbols of its room
//! sketch instead (`diff/ibf@1`): the client decodes against its own sketch,
//! names what it lacks in `ibf-done` and uploads what the server lacks.

use std::collections::{BTreeMap, VecDeque};

use crate::dag::{NodeIdx, VersionVector};
use crate::ids::{AuthorId, IdSet, NodeId, RoomId};
use crate::keys::Keypair;
use crate::pack::PackError;
use crate::proto::message::{
    Envelope, FrameError, Limits, MAX_FRAME_BYTES, MAX_HEADS, MAX_IDS, MAX_RANGES, Message,
    PROTOCOL_VERSION, Phase, Reason,
};
use crate::proto::scope::Scope;
use crate::proto::send_queue::SendQueue;
use crate::recon::mst::{self, Reconciler};
use crate::recon::riblt::{self, CodedSymbol, Decoder, RibltError};
use crate::recon::{SKETCH_CAPACITY, key_prefix};
use crate::room::{ReceiveError, Room};

/// The baseline difference capability, always supported.
pub const CAP_DIFF_HEADS: &str = "diff/heads@1";
/// The rateless IBLT difference capability.
pub const CAP_DIFF_IBF: &str = "diff/ibf@1";
/// The Merkle Search Tree difference capability.
pub const CAP_DIFF_MST: &str = "diff/mst@1";
/// Fewest RIBLT symbols asked for at once.
const MIN_SYMBOL_BATCH: usize = 16;
/// RIBLT symbols sent first beyond 1.5 times the estimated difference.
const FIRST_SYMBOL_MARGIN: usize = 8;

/// A pack encoded once, to relay to many sessions.
#[derive(Clone, Debug)]
pub struct EncodedPack {
    bytes: Vec<u8>,
    checksum: [u8; 32],
}

impl EncodedPack {
    /// Encodes `nodes` of `room` (signatures as held: a relay signs
    /// nothing). Parents outside the pack carry their ids, as the sessions
    /// it goes to may know different things. Fails as
    /// [`Room::export_pack`] does.
    pub fn new(
        room: &mut Room,
        nodes: &[NodeIdx],
    ) -> Result<EncodedPack, crate::room::ExportError> {
        let bytes = room.pack(nodes, None)?;
        let checksum = *blake3::hash(&bytes).as_bytes();
        Ok(EncodedPack { bytes, checksum })
    }
}

/// Timers and sizes of a session.
#[derive(Clone, Debug)]
pub struct Config {
    /// Close a session whose handshake has not completed by then.
    pub handshake_timeout_ms: u64,
    /// Close a session that has heard nothing for this long.
    pub idle_timeout_ms: u64,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_ms: u64,
    /// Most nodes per pack sent.
    pub max_pack_nodes: usize,
    /// Largest frame sent or accepted.
    pub max_frame: usize,
    /// A client whose version vector has more authors than this leaves it
    /// out of `hello` and lets the server reconcile with RIBLT instead
    /// (`diff/ibf@1`): cost then follows the difference, not the authors.
    pub vv_inline_limit: usize,
    /// A server reconciles with the MST instead of RIBLT when the estimated
    /// difference is at least this many nodes (RIBLT's sketch keeps a
    /// bounded number of symbols; the MST has no such bound).
    pub mst_above: u64,
    /// Close a session that waits this long without progress for what it
    /// is owed: an `ack` for a pack it sent, or (client) the rest of its
    /// catch-up. Heartbeats keep an idle session open but are not
    /// progress, so a peer that stalls mid-exchange is noticed.
    pub response_timeout_ms: u64,
    /// Most bytes of packs in flight (sent, not acknowledged): the rest
    /// waits, as node numbers, until acknowledgements make room. Bounds
    /// what a slow peer costs the sender.
    pub send_window_bytes: usize,
    /// Most packs in flight.
    pub send_window_packs: usize,
    /// Packs are cut near this many bytes, compressed and of content (at
    /// most `max_frame`): each export is a short step, so a driver serving
    /// many sessions answers the others in between.
    pub pack_bytes: usize,
    /// zstd level of the packs sent: fast, since catch-up compresses the
    /// whole room on the way out.
    pub zstd_level: i32,
    /// Server: most RIBLT symbols sent for one difference (at most the
    /// sketch's capacity). A difference that needs more closes the session
    /// with `too_large`, and the client reconnects with its version vector.
    pub max_symbols: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            heartbeat_ms: 20_000,
            max_pack_nodes: 50_000,
            max_frame: MAX_FRAME_BYTES,
            vv_inline_limit: 512,
            mst_above: (SKETCH_CAPACITY / 2) as u64,
            response_timeout_ms: 30_000,
            send_window_bytes: 2 * MAX_FRAME_BYTES,
            send_window_packs: 4,
            pack_bytes: 256 << 10,
            zstd_level: 3,
            max_symbols: SKETCH_CAPACITY,
        }
    }
}

/// What a session tells its driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The handshake completed.
    Connected,
    /// Nodes from the peer were inserted into the room, in causal order:
    /// persist them, then call [`Session::acknowledge`] with `corr`. (Nodes
    /// still waiting for parents are not listed and not acknowledged.)
    Accepted {
        /// The pack's correlation id.
        corr: u64,
        /// The nodes now in the room.
        nodes: Vec<NodeIdx>,
    },
    /// The peer holds these of our nodes durably.
    Acknowledged {
        /// The nodes.
        nodes: Vec<NodeIdx>,
    },
    /// Everything the peer had at the handshake has arrived (client side).
    CaughtUp,
    /// The server holds the local author's nodes up to this sequence number
    /// durably (client side, learned from the difference): drop them from
    /// the outbox. Covers nodes whose `ack` was lost with a connection.
    ServerHolds {
        /// The newest sequence number held.
        through_seq: u64,
    },
    /// The server applied a `subscribe`, and everything the new scope adds
    /// has arrived (client side).
    Subscribed {
        /// The patterns in effect (empty: the whole room).
        patterns: Vec<String>,
    },
    /// The peer reported a problem that did not end the session.
    PeerError {
        /// What kind.
        code: Reason,
        /// For people.
        message: String,
        /// The correlation id of the message concerned.
        related: u64,
    },
    /// The session ended.
    Closed {
        /// Why.
        reason: Reason,
        /// For people.
        message: String,
        /// Whether the peer ended it.
        by_peer: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Client: hello sent. Server: waiting for hello.
    Handshake,
    /// Catching up or steady state.
    Open,
    Closed,
}

/// Which end of the session this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opens the session with `hello`.
    Client,
    /// Answers it.
    Server,
}

/// One sync session for one room.
#[derive(Debug)]
pub struct Session {
    side: Side,
    room: RoomId,
    /// Client: the local author, whose nodes the outbox tracks.
    local: Option<AuthorId>,
    id: u64,
    config: Config,
    state: State,
    /// Nodes still expected from the peer's catch-up (client side).
    expecting: u64,
    /// Client: the catch-up is complete.
    caught_up: bool,
    /// The difference capability chosen at the handshake.
    strategy: Option<&'static str>,
    /// Nodes sent in packs so far, and of those in catch-up packs.
    nodes_sent: u64,
    catchup_sent: u64,
    /// Server: what the client subscribed to. Client: a scope to ask for
    /// once the handshake completes.
    scope: Scope,
    /// Client: a `subscribe` waiting for the handshake to complete.
    pending_subscribe: Option<Scope>,
    /// Server: what the client is known to hold (every node of an author
    /// up to this sequence number); an underestimate is safe.
    peer_holds: VersionVector,
    /// What the peer surely holds, as far as this session saw: its
    /// version vector from the handshake, what it sent, and what it
    /// acknowledged. Packs cite these nodes by (author, seq) alone. Nodes
    /// merely sent are not in it: a pack can be lost, or refused.
    peer_acked: VersionVector,
    /// RIBLT or MST: the room's length when the difference was taken (at
    /// the welcome); 0 without one.
    diff_base: NodeIdx,
    /// RIBLT or MST, once the whole difference is known: of our nodes
    /// numbered below `diff_base`, the peer lacks exactly these, and so
    /// holds every other. Packs cite the others by (author, seq) alone,
    /// which spares rehashing old history for ids the room does not keep.
    peer_lacks: Option<IdSet<NodeIdx>>,
    /// Server, MST: what `mst-done` messages named so far (a full message
    /// says more follow).
    mst_need: Vec<NodeIdx>,
    /// Client until caught up: when the catch-up last made progress.
    catchup_progress: Option<u64>,
    /// Client: decoding the server's RIBLT symbols.
    decoder: Option<Decoder>,
    /// Server: RIBLT symbols sent so far.
    symbols_sent: usize,
    /// Client: refining MST ranges.
    reconciler: Option<Reconciler>,
    /// Packs sent and not yet acknowledged: correlation id -> when sent,
    /// their nodes and bytes. Correlation ids grow with time, so the first
    /// entry is the oldest.
    in_flight: BTreeMap<u64, (u64, Vec<NodeIdx>, usize)>,
    /// Bytes of the packs in flight.
    in_flight_bytes: usize,
    /// Nodes (and messages behind them) waiting for room in the window.
    queue: SendQueue,
    /// Since when queued nodes could go (the window has room): the driver
    /// is due to call [`Session::handle_timeout`], which sends a pack.
    send_due: u64,
    /// Packs received and reported, awaiting the driver's `acknowledge`:
    /// `None` when every node of the pack was inserted (acknowledged by the
    /// correlation id alone), else the nodes inserted (some wait for
    /// parents and are not durable yet, so they are listed).
    to_ack: BTreeMap<u64, Option<Vec<NodeIdx>>>,
    outbox: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    handshake_deadline: u64,
    last_received: u64,
    last_sent: u64,
    next_corr: u64,
}

impl Session {
    /// A client session for `room`, which sends its `hello` at once.
    pub fn client(now: u64, id: u64, room: &mut Room, peer: &Keypair, config: Config) -> Session {
        Session::client_scoped(now, id, room, peer, config, Scope::everything())
    }

    /// A client session that subscribes to `scope` only: the server sends
    /// the nodes that touch it and what they depend on (`docs/protocol.md`
    /// §5.6).
    pub fn client_scoped(
        now: u64,
        id: u64,
        room: &mut Room,
        peer: &Keypair,
        config: Config,
        scope: Scope,
    ) -> Session {
        let mut s = Session::new(Side::Client, now, id, room.id().clone(), config);
        s.local = Some(peer.author());
        let mut vv = room.dag().version_vector();
        let mut probe = Vec::new();
        // A scoped catch-up is computed from what the client holds, so the
        // version vector always goes with subscriptions.
        if vv.len() > s.config.vv_inline_limit && scope.is_everything() {
            // Too many authors to list cheaply: let RIBLT find the
            // difference, its first symbols sized from a probe.
            vv.clear();
            probe = room.sketch().probe();
        }
        let dag = room.dag();
        let hello = Message::Hello {
            versions: (PROTOCOL_VERSION, PROTOCOL_VERSION),
            peer: peer.author(),
            room: room.id().clone(),
            token: None,
            caps: vec![
                CAP_DIFF_HEADS.to_owned(),
                CAP_DIFF_IBF.to_owned(),
                CAP_DIFF_MST.to_owned(),
            ],
            heads: listed_heads(dag),
            vv,
            nodes: dag.len() as u64,
            state_hash: room.state_hash(),
            subscriptions: scope.patterns().to_vec(),
            probe,
        };
        s.send(now, 0, hello);
        s
    }

    /// A server session for `room`, waiting for the client's `hello`.
    pub fn server(now: u64, id: u64, room: RoomId, config: Config) -> Session {
        Session::new(Side::Server, now, id, room, config)
    }

    fn new(side: Side, now: u64, id: u64, room: RoomId, config: Config) -> Session {
        Session {
            side,
            room,
            local: None,
            id,
            state: State::Handshake,
            expecting: 0,
            caught_up: false,
            catchup_progress: None,
            strategy: None,
            nodes_sent: 0,
            catchup_sent: 0,
            scope: Scope::everything(),
            pending_subscribe: None,
            peer_holds: VersionVector::new(),
            peer_acked: VersionVector::new(),
            diff_base: 0,
            peer_lacks: None,
            mst_need: Vec::new(),
            decoder: None,
            symbols_sent: 0,
            reconciler: None,
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            queue: SendQueue::default(),
            send_due: now,
            to_ack: BTreeMap::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            handshake_deadline: now + config.handshake_timeout_ms,
            last_received: now,
            last_sent: now,
            next_corr: 1,
            config,
        }
    }

    /// The difference capability chosen at the handshake (`None` before).
    pub fn strategy(&self) -> Option<&'static str> {
        self.strategy
    }

    /// Client: changes the subscription (empty patterns: the whole room).
    /// The server sends what the new scope adds, then confirms with
    /// [`Event::Subscribed`]. Before the handshake completes, it is sent
    /// once it does.
    pub fn subscribe(&mut self, now: u64, scope: Scope) {
        match self.state {
            State::Handshake => self.pending_subscribe = Some(scope),
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

    /// Client: nodes of the catch-up still to arrive (0 once caught up, and
    /// until the difference is known).
    pub fn catchup_remaining(&self) -> u64 {
        if self.caught_up { 0 } else { self.expecting }
    }

    /// Nodes sent in packs so far (`(all, in catch-up packs)`).
    pub fn nodes_sent(&self) -> (u64, u64) {
        (self.nodes_sent, self.catchup_sent)
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn send(&mut self, now: u64, corr: u64, message: Message) {
        let frame = Envelope {
            version: PROTOCOL_VERSION,
            session: self.id,
            corr,
            message,
        }
        .encode();
        self.outbox.push_back(frame);
        self.last_sent = now;
    }

    /// Ends the session with `reason`, telling the peer.
    pub fn close(&mut self, now: u64, reason: Reason, message: &str) {
        if self.state == State::Closed {
            return;
        }
        self.send(
            now,
            0,
            Message::Close {
                reason: reason.clone(),
                message: message.to_owned(),
            },
        );
        self.state = State::Closed;
        self.events.push_back(Event::Closed {
            reason,
            message: message.to_owned(),
            by_peer: false,
        });
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] should next be called: a timer, or
    /// at once when queued nodes can be sent (one pack per call, so a
    /// driver serving many sessions interleaves them).
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Closed => None,
            State::Handshake => Some(self.handshake_deadline),
            State::Open if self.can_send() => Some(self.send_due),
            State::Open => {
                let idle = (self.last_received + self.config.idle_timeout_ms)
                    .min(self.last_sent + self.config.heartbeat_ms);
                let stalled = self
                    .stalled_since()
                    .map_or(u64::MAX, |t| t + self.config.response_timeout_ms);
                Some(idle.min(stalled))
            }
        }
    }

    /// Whether queued nodes wait and the window has room for a pack.
    fn can_send(&self) -> bool {
        !self.queue.is_empty() && !self.window_full()
    }

    /// Whether the packs in flight fill the send window.
    fn window_full(&self) -> bool {
        self.in_flight.len() >= self.config.send_window_packs
            || self.in_flight_bytes >= self.config.send_window_bytes
    }

    /// Fires the timers due at `now`, and sends the next pack of queued
    /// nodes if the window has room (`room` is the session's room, `signer`
    /// signs the local author's nodes).
    pub fn handle_timeout(&mut self, now: u64, room: &mut Room, signer: Option<&Keypair>) {
        match self.state {
            State::Closed => {}
            State::Handshake if now >= self.handshake_deadline => {
                self.close(now, Reason::Timeout, "handshake timed out");
            }
            State::Handshake => {}
            State::Open if self.can_send() => self.pump(now, room, signer, 1),
            State::Open => {
                if now >= self.last_received + self.config.idle_timeout_ms {
                    self.close(now, Reason::Timeout, "idle timeout");
                } else if self
                    .stalled_since()
                    .is_some_and(|t| now >= t + self.config.response_timeout_ms)
                {
                    self.close(now, Reason::Timeout, "the peer stopped responding");
                } else if now >= self.last_sent + self.config.heartbeat_ms {
                    self.send(now, 0, Message::Heartbeat);
                }
            }
        }
    }

    /// Since when the peer has owed this session something without
    /// delivering it: the oldest unacknowledged pack, or (client) catch-up
    /// that stopped progressing. `None`: nothing is owed.
    fn stalled_since(&self) -> Option<u64> {
        let oldest_pack = self.in_flight.first_key_value().map(|(_, (t, ..))| *t);
        oldest_pack.into_iter().chain(self.catchup_progress).min()
    }

    /// Server: records that the client holds `nodes` (sent to it in
    /// causally complete runs, or received from it), and so every earlier
    /// node of their authors.
    fn note_sent(&mut self, room: &Room, nodes: &[NodeIdx]) {
        let dag = room.dag();
        for &n in nodes {
            let seq = self.peer_holds.entry(*dag.author(n)).or_insert(0);
            *seq = (*seq).max(dag.seq(n));
        }
    }

    /// Records that the peer surely holds `nodes` (it sent or acknowledged
    /// them), and so every earlier node of their authors.
    fn note_acked(&mut self, room: &Room, nodes: &[NodeIdx]) {
        let dag = room.dag();
        for &n in nodes {
            let seq = self.peer_acked.entry(*dag.author(n)).or_insert(0);
            *seq = (*seq).max(dag.seq(n));
        }
    }

    /// Server: whether a reconciliation message belongs to the strategy
    /// chosen at the handshake (building an MST for a peer that did not
    /// negotiate one would be work for nothing).
    fn strategy_allows(&self, message: &Message) -> bool {
        let wanted = match message {
            Message::MstRequest { .. } | Message::MstDone { .. } => CAP_DIFF_MST,
            _ => CAP_DIFF_IBF,
        };
        self.strategy == Some(wanted)
    }

    /// Whether nothing is in flight either way: every pack sent and
    /// received is acknowledged, nothing waits to be sent, and (client) the
    /// catch-up is complete. A driver can report "synced" then.
    pub fn is_settled(&self) -> bool {
        self.state == State::Open
            && self.in_flight.is_empty()
            && self.queue.is_idle()
            && self.to_ack.is_empty()
            && self.outbox.is_empty()
            && (self.side == Side::Server || self.caught_up)
    }

    /// Client: everything the server had at the handshake has arrived.
    fn mark_caught_up(&mut self) {
        self.caught_up = true;
        self.events.push_back(Event::CaughtUp);
    }

    /// Client, once the difference is known: everything of the local
    /// author's chain before the first node it must upload is held by the
    /// server (whose history is causally complete).
    fn report_held(&mut self, room: &Room, upload: &[NodeIdx]) {
        let Some(me) = self.local else { return };
        let dag = room.dag();
        let through_seq = upload
            .iter()
            .filter(|&&n| *dag.author(n) == me)
            .map(|&n| dag.seq(n) - 1)
            .min()
            .unwrap_or_else(|| dag.author_seq(&me));
        if through_seq > 0 {
            self.events.push_back(Event::ServerHolds { through_seq });
        }
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
        if !self.scope.is_everything()
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
    fn send_pack(
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
        if self.side == Side::Server && !self.scope.is_everything() {
            let chosen = self.scope.select(room, nodes, &self.peer_holds);
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
    fn enqueue(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        nodes: &[NodeIdx],
        phase: Phase,
        burst: usize,
    ) {
        if self.queue.is_empty() {
            self.send_due = now;
        }
        self.queue.push(nodes, phase);
        self.pump(now, room, signer, burst);
    }

    /// Sends up to `burst` packs of queued nodes while the window has room,
    /// each under both the node and the frame limit, and the messages
    /// queued behind them once they have gone.
    fn pump(&mut self, now: u64, room: &mut Room, signer: Option<&Keypair>, burst: usize) {
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

    /// Server: sends the next `count` symbols of the room's sketch, or
    /// closes if the difference is beyond what the sketch keeps (the client
    /// then reconnects with its version vector).
    fn send_symbols(&mut self, now: u64, room: &mut Room, count: usize) {
        let sketch = room.sketch();
        let start = self.symbols_sent;
        // Keep each frame well under the limit.
        let per_frame = (self.config.max_frame - 256) / CodedSymbol::WIRE_BYTES;
        let most = sketch.capacity().min(self.config.max_symbols);
        let end = (start + count.min(per_frame)).min(most);
        if end <= start {
            return self.close(
                now,
                Reason::TooLarge,
                "difference beyond the sketch: resend hello with the version vector",
            );
        }
        let mut bytes = Vec::with_capacity((end - start) * CodedSymbol::WIRE_BYTES);
        for symbol in sketch.symbols(start..end) {
            symbol.encode(&mut bytes);
        }
        self.symbols_sent = end;
        self.send(
            now,
            0,
            Message::IbfSymbols {
                start: start as u64,
                symbols: bytes,
            },
        );
    }

    /// Client: feeds the server's symbols to the decoder; once decoded, asks
    /// for what it lacks and uploads what the server lacks.
    fn receive_symbols(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        start: u64,
        bytes: &[u8],
    ) {
        let Some(decoder) = self.decoder.as_mut() else {
            return self.close(now, Reason::Malformed, "symbols outside a RIBLT difference");
        };
        if start != decoder.symbols_used() as u64
            || !bytes.len().is_multiple_of(CodedSymbol::WIRE_BYTES)
        {
            return self.close(now, Reason::Malformed, "symbols out of order or truncated");
        }
        let symbols: Vec<CodedSymbol> = bytes
            .chunks_exact(CodedSymbol::WIRE_BYTES)
            .filter_map(CodedSymbol::decode)
            .collect();
        if let Err(e) = decoder.add_symbols(&symbols, room.sketch()) {
            let reason = match e {
                RibltError::CapacityExceeded { .. } => Reason::TooLarge,
                RibltError::Inconsistent { .. } => Reason::Malformed,
            };
            return self.close(now, reason, &e.to_string());
        }
        if !decoder.is_decoded() {
            // The first batch was sized from an estimate: what is missing
            // is usually a fraction of it.
            let more = (decoder.symbols_used() / 4).max(MIN_SYMBOL_BATCH) as u64;
            return self.send(now, 0, Message::IbfMore { count: more });
        }
        let diff = decoder.difference();
        self.decoder = None;
        let upload = room.nodes_for_keys(&diff.local_only);
        self.peer_lacks = Some(upload.iter().copied().collect());
        self.report_held(room, &upload);
        self.expecting = diff.remote_only.len() as u64;
        self.send(
            now,
            0,
            Message::IbfDone {
                need: diff.remote_only.iter().map(key_prefix).collect(),
                has: upload.len() as u64,
            },
        );
        if self.expecting == 0 {
            self.mark_caught_up();
        }
        self.enqueue(now, room, signer, &upload, Phase::Live, 0);
    }

    /// Client: refines MST ranges with the server's summaries; once nothing
    /// is left to refine, asks for what it lacks and uploads what the server
    /// lacks.
    fn receive_summaries(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        answers: Vec<(mst::KeyRange, mst::Summary)>,
    ) {
        let Some(reconciler) = self.reconciler.as_mut() else {
            return self.close(
                now,
                Reason::Malformed,
                "summaries outside an MST difference",
            );
        };
        let next = match reconciler.step(room.id_tree(), answers) {
            Ok(next) => next,
            Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
        };
        let done = reconciler.is_done();
        for chunk in next.chunks(MAX_RANGES) {
            self.send(
                now,
                0,
                Message::MstRequest {
                    ranges: chunk.to_vec(),
                },
            );
        }
        if !done {
            return;
        }
        let diff = self.reconciler.take().expect("checked above").into_diff();
        let need = diff.remote_only;
        let local: Vec<NodeId> = diff.local_only.iter().map(|k| NodeId(*k)).collect();
        let upload = room.nodes_for_ids(&local);
        self.peer_lacks = Some(upload.iter().copied().collect());
        self.report_held(room, &upload);
        self.expecting = need.len() as u64;
        for chunk in need.chunks(MAX_IDS) {
            self.send(
                now,
                0,
                Message::MstDone {
                    need: chunk.to_vec(),
                },
            );
        }
        if need.len().is_multiple_of(MAX_IDS) {
            // A full message says more follow: this one says none do.
            self.send(now, 0, Message::MstDone { need: Vec::new() });
        }
        if self.expecting == 0 {
            self.mark_caught_up();
        }
        self.enqueue(now, room, signer, &upload, Phase::Live, 0);
    }

    /// Handles one frame from the peer.
    pub fn handle_input(
        &mut self,
        now: u64,
        frame: &[u8],
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        if self.state == State::Closed {
            return;
        }
        if frame.len() > self.config.max_frame {
            return self.close(now, Reason::TooLarge, "frame too large");
        }
        let env = match Envelope::decode(frame) {
            Ok(env) => env,
            Err(FrameError::TooLarge(_)) => {
                return self.close(now, Reason::TooLarge, "frame too large");
            }
            Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
        };
        self.handle_envelope(now, env, room, signer);
    }

    /// Handles one envelope the driver already decoded from a frame of at
    /// most `max_frame` bytes (a server decodes each frame once to route it
    /// by session id, then hands it here).
    pub fn handle_envelope(
        &mut self,
        now: u64,
        env: Envelope,
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        if self.state == State::Closed {
            return;
        }
        self.last_received = now;
        if env.version != PROTOCOL_VERSION {
            return self.close(now, Reason::VersionMismatch, "unsupported protocol version");
        }
        // Catch-up progress restarts the client's response timer;
        // heartbeats are not progress.
        let progress = matches!(
            env.message,
            Message::Welcome { .. }
                | Message::Pack { .. }
                | Message::IbfSymbols { .. }
                | Message::MstSummary { .. }
        );
        self.dispatch(now, env, room, signer);
        if self.state == State::Open
            && let Some(scope) = self.pending_subscribe.take()
        {
            self.subscribe(now, scope);
        }
        if self.side == Side::Client && self.state == State::Open {
            self.catchup_progress = match (self.caught_up, progress) {
                (true, _) => None,
                (false, true) => Some(now),
                (false, false) => self.catchup_progress.or(Some(now)),
            };
        }
    }

    fn dispatch(&mut self, now: u64, env: Envelope, room: &mut Room, signer: Option<&Keypair>) {
        let strategy_allows = self.strategy_allows(&env.message);
        match (self.side, self.state, env.message) {
            (_, _, Message::Close { reason, message }) => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed {
                    reason,
                    message,
                    by_peer: true,
                });
            }
            // Optional messages this version does not act on are ignored,
            // as the versioning rule requires (presence is not relayed yet).
            (_, _, Message::Heartbeat | Message::Unknown(_) | Message::Presence { .. }) => {}
            (
                _,
                _,
                Message::Error {
                    code,
                    message,
                    related,
                },
            ) => {
                self.events.push_back(Event::PeerError {
                    code,
                    message,
                    related,
                });
            }
            (
                Side::Server,
                State::Handshake,
                Message::Hello {
                    versions,
                    room: r,
                    vv,
                    caps,
                    nodes,
                    subscriptions,
                    probe,
                    ..
                },
            ) => {
                if !(versions.0..=versions.1).contains(&PROTOCOL_VERSION) {
                    let message = format!("this server speaks version {PROTOCOL_VERSION}");
                    self.send(
                        now,
                        env.corr,
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
                    Ok(scope) => self.scope = scope,
                    Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
                }
                self.peer_holds = vv.clone();
                self.peer_acked = vv.clone();
                // A client with history that left its version vector out
                // asks for set reconciliation: RIBLT for a difference its
                // sketch can hold, the MST beyond. Everyone else gets the
                // baseline.
                // The node counts bound the difference from below; a
                // client's probe of its sketch estimates it.
                let mut d_est = (room.dag().len() as u64).abs_diff(nodes);
                if vv.is_empty() && !probe.is_empty() {
                    let probed = riblt::estimate_difference(room.sketch(), &probe);
                    d_est = d_est.max(probed.unwrap_or(0));
                }
                let dag = room.dag();
                let offers = |cap: &str| caps.iter().any(|c| c == cap);
                let diff = if !vv.is_empty() || nodes == 0 || !self.scope.is_everything() {
                    CAP_DIFF_HEADS
                } else if offers(CAP_DIFF_MST)
                    && (d_est >= self.config.mst_above || !offers(CAP_DIFF_IBF))
                {
                    CAP_DIFF_MST
                } else if offers(CAP_DIFF_IBF) {
                    CAP_DIFF_IBF
                } else {
                    CAP_DIFF_HEADS
                };
                let mut missing =
                    (diff == CAP_DIFF_HEADS).then(|| dag.missing_for_version_vector(&vv));
                let mut server_vv = dag.version_vector();
                if let Some(all) = missing.as_mut()
                    && !self.scope.is_everything()
                {
                    // Only what touches the scope, with its ancestors; the
                    // welcome's vv then says what the client will hold, so
                    // it expects exactly that (and still uploads what the
                    // server lacks: it is capped at the server's vv).
                    *all = self.scope.select(room, all, &vv);
                    self.note_sent(room, all);
                    for (author, seq) in server_vv.iter_mut() {
                        *seq = (*seq).min(self.peer_holds.get(author).copied().unwrap_or(0));
                    }
                    server_vv.retain(|_, seq| *seq > 0);
                }
                let dag = room.dag();
                let welcome = Message::Welcome {
                    version: PROTOCOL_VERSION,
                    caps: vec![
                        CAP_DIFF_HEADS.to_owned(),
                        CAP_DIFF_IBF.to_owned(),
                        CAP_DIFF_MST.to_owned(),
                    ],
                    heads: listed_heads(dag),
                    vv: (diff == CAP_DIFF_HEADS).then_some(server_vv),
                    nodes: dag.len() as u64,
                    diff: diff.to_owned(),
                    limits: Limits {
                        max_frame: self.config.max_frame as u64,
                        max_pack_nodes: self.config.max_pack_nodes as u64,
                    },
                    peers: Vec::new(),
                };
                self.strategy = Some(diff);
                if diff != CAP_DIFF_HEADS {
                    self.diff_base = room.dag().next_idx();
                }
                self.send(now, env.corr, welcome);
                self.state = State::Open;
                self.events.push_back(Event::Connected);
                if let Some(missing) = missing {
                    // Exported after the welcome has gone, a pack per
                    // timer call, as acknowledgements make room.
                    self.enqueue(now, room, signer, &missing, Phase::Catchup, 0);
                } else if diff == CAP_DIFF_IBF {
                    // A difference of d decodes from about 1.35 d to 1.75 d
                    // symbols, more when d is small.
                    let first = d_est as usize * 3 / 2 + FIRST_SYMBOL_MARGIN;
                    self.send_symbols(now, room, first);
                }
                // MST: the client asks first.
            }
            (Side::Server, State::Open, Message::Subscribe { patterns }) => {
                let scope = match Scope::parse(&patterns) {
                    Ok(scope) => scope,
                    Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
                };
                // Send what the new scope adds, then confirm: the client
                // knows it has everything once `subscribed` arrives.
                let missing = room.dag().missing_for_version_vector(&self.peer_holds);
                let chosen = scope.select(room, &missing, &self.peer_holds);
                self.scope = scope;
                self.note_sent(room, &chosen);
                self.queue.push(&chosen, Phase::Live);
                self.queue
                    .push_message(env.corr, Message::Subscribed { patterns });
                self.pump(now, room, signer, usize::MAX);
            }
            (Side::Client, State::Open, Message::Subscribed { patterns }) => {
                self.events.push_back(Event::Subscribed { patterns });
            }
            (
                Side::Server,
                State::Open,
                Message::MstRequest { .. }
                | Message::MstDone { .. }
                | Message::IbfMore { .. }
                | Message::IbfDone { .. },
            ) if !strategy_allows => {
                self.close(
                    now,
                    Reason::Malformed,
                    "reconciliation message for a strategy not chosen",
                );
            }
            (Side::Server, State::Open, Message::MstRequest { ranges }) => {
                let answers = mst::respond(room.id_tree(), &ranges);
                self.send(now, env.corr, Message::MstSummary { answers });
            }
            (Side::Server, State::Open, Message::MstDone { need }) => {
                // A prefix may name more than the client lacks: a superset
                // only costs ids cited that needed not be.
                let nodes = room.nodes_for_key_prefixes(&need);
                self.mst_need.extend_from_slice(&nodes);
                if need.len() < MAX_IDS {
                    self.peer_lacks =
                        Some(std::mem::take(&mut self.mst_need).into_iter().collect());
                }
                self.enqueue(now, room, signer, &nodes, Phase::Catchup, 0);
            }
            (Side::Client, State::Open, Message::MstSummary { answers }) => {
                self.receive_summaries(now, room, signer, answers);
            }
            (Side::Server, State::Open, Message::IbfMore { count }) => {
                let count = (count as usize).max(MIN_SYMBOL_BATCH);
                self.send_symbols(now, room, count);
            }
            (Side::Server, State::Open, Message::IbfDone { need, .. }) => {
                let nodes = room.nodes_for_key_prefixes(&need);
                self.peer_lacks = Some(nodes.iter().copied().collect());
                self.enqueue(now, room, signer, &nodes, Phase::Catchup, 0);
            }
            (Side::Client, State::Open, Message::IbfSymbols { start, symbols }) => {
                self.receive_symbols(now, room, signer, start, &symbols);
            }
            (Side::Client, State::Handshake, Message::Welcome { diff, .. })
                if diff == CAP_DIFF_MST =>
            {
                self.state = State::Open;
                self.strategy = Some(CAP_DIFF_MST);
                self.diff_base = room.dag().next_idx();
                self.events.push_back(Event::Connected);
                let (reconciler, first) = Reconciler::new();
                self.reconciler = Some(reconciler);
                self.send(now, 0, Message::MstRequest { ranges: first });
            }
            (Side::Client, State::Handshake, Message::Welcome { diff, .. })
                if diff == CAP_DIFF_IBF =>
            {
                self.state = State::Open;
                self.strategy = Some(CAP_DIFF_IBF);
                self.diff_base = room.dag().next_idx();
                self.events.push_back(Event::Connected);
                self.decoder = Some(Decoder::new());
            }
            (Side::Client, State::Handshake, Message::Welcome { vv, .. }) => {
                self.state = State::Open;
                self.strategy = Some(CAP_DIFF_HEADS);
                self.events.push_back(Event::Connected);
                let server_vv = vv.unwrap_or_default();
                self.peer_acked = server_vv.clone();
                let mine = room.dag().version_vector();
                self.expecting = lacking(&mine, &server_vv);
                if self.expecting == 0 {
                    self.mark_caught_up();
                }
                let upload = room.dag().missing_for_version_vector(&server_vv);
                self.report_held(room, &upload);
                self.enqueue(now, room, signer, &upload, Phase::Live, 0);
            }
            (Side::Client, State::Handshake, Message::Reject { reason, message }) => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed {
                    reason,
                    message,
                    by_peer: true,
                });
            }
            (
                _,
                State::Open,
                Message::Pack {
                    pack,
                    checksum,
                    phase,
                    ..
                },
            ) => {
                if *blake3::hash(&pack).as_bytes() != checksum {
                    return self.close(now, Reason::Malformed, "pack checksum mismatch");
                }
                match room.receive_pack(&pack) {
                    Ok(received) => {
                        let nodes: Vec<NodeIdx> =
                            received.accepted.iter().map(|(i, _)| *i).collect();
                        if self.side == Side::Server {
                            self.note_sent(room, &nodes);
                        }
                        self.note_acked(room, &nodes);
                        // The correlation id alone acknowledges exactly the
                        // pack's nodes: with some waiting, or nodes of
                        // earlier packs released, the ack lists ids.
                        let whole = received.pending == 0 && received.released == 0;
                        self.to_ack
                            .insert(env.corr, (!whole).then(|| nodes.clone()));
                        let arrived = (nodes.len() + received.duplicates) as u64;
                        self.events.push_back(Event::Accepted {
                            corr: env.corr,
                            nodes,
                        });
                        if self.side == Side::Client
                            && phase == Phase::Catchup
                            && self.expecting > 0
                        {
                            self.expecting = self.expecting.saturating_sub(arrived);
                            if self.expecting == 0 {
                                self.mark_caught_up();
                            }
                        }
                    }
                    Err(ReceiveError::Pack(e)) => {
                        let reason = match e {
                            PackError::BadSignature(_)
                            | PackError::BrokenChain(_)
                            | PackError::Node(_) => Reason::InvalidNode,
                            PackError::TooLarge(_) => Reason::TooLarge,
                            _ => Reason::Malformed,
                        };
                        self.close(now, reason, &e.to_string());
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
            (_, State::Open, Message::Ack { nodes }) => {
                let mut acked: Vec<NodeIdx> = Vec::new();
                if nodes.is_empty() {
                    // An empty list acknowledges the whole pack `corr`.
                    if let Some((_, sent, bytes)) = self.in_flight.remove(&env.corr) {
                        self.in_flight_bytes -= bytes;
                        acked = sent;
                    }
                } else {
                    // Listed ids may include nodes of earlier packs that
                    // waited for parents at the peer.
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
                self.note_acked(room, &acked);
                if !acked.is_empty() {
                    self.events.push_back(Event::Acknowledged { nodes: acked });
                }
                // Room in the window: the next pack now, more as the
                // driver's timer calls come.
                self.send_due = now;
                self.pump(now, room, signer, 1);
            }
            (_, State::Open, Message::Request { ids }) => {
                let nodes = room.nodes_for_ids(&ids);
                self.enqueue(now, room, signer, &nodes, Phase::Live, usize::MAX);
            }
            (_, _, other) => {
                let name = format!("unexpected message type {} here", other.type_code());
                self.close(now, Reason::Malformed, &name);
            }
        }
    }
}

/// Nodes `theirs` has beyond `mine`.
fn lacking(mine: &VersionVector, theirs: &VersionVector) -> u64 {
    theirs
        .iter()
        .map(|(a, &s)| s.saturating_sub(mine.get(a).copied().unwrap_or(0)))
        .sum()
}

/// The heads a `hello` or `welcome` lists, sorted: a hint, so at most
/// [`MAX_HEADS`] (the newest by lamport when a history has more
/// concurrent branches; a longer list would be refused as malformed).
fn listed_heads(dag: &crate::dag::Dag) -> Vec<NodeId> {
    let mut heads = dag.head_idxs();
    if heads.len() > MAX_HEADS {
        heads.sort_unstable_by_key(|&h| std::cmp::Reverse((dag.lamport(h), h)));
        heads.truncate(MAX_HEADS);
    }
    let mut ids: Vec<NodeId> = heads.iter().map(|&h| dag.id(h)).collect();
    ids.sort_unstable();
    ids
}
