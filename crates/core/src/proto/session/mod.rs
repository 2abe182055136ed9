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
//!
//! The code follows the protocol's seams: this file holds the session, its
//! public interface and the routing of messages; `handshake.rs` the
//! `hello`/`welcome`, `difference.rs` RIBLT and the MST, `transfer.rs` packs,
//! the send window and acknowledgements, `subscriptions.rs` scopes. What
//! only one end keeps is in its `Role` (a client's catch-up and decoders,
//! a server's view of what the client holds); the strategy is a
//! [`Strategy`].

use std::collections::{BTreeMap, VecDeque};

use crate::auth::{Access, hello_proof};
use crate::dag::{NodeIdx, VersionVector};
use crate::ids::{AuthorId, IdSet, NodeId, RoomId};
use crate::keys::Keypair;
use crate::pack::PackError;
use crate::proto::message::{
    Envelope, FrameError, Limits, MAX_FRAME_BYTES, MAX_HEADS, MAX_IDS, MAX_RANGES, Message,
    PRESENCE_CAPABILITY, PROTOCOL_VERSION, Phase, PresenceStatus, Reason,
};
use crate::proto::scope::Scope;
use crate::proto::send_queue::SendQueue;

mod difference;
mod handshake;
mod subscriptions;
mod transfer;
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

/// How a session finds the difference between the two histories, chosen
/// by the server at the handshake among what the client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Version vectors (`diff/heads@1`): exact, one exchange, costs the
    /// number of authors.
    Heads,
    /// A rateless IBLT of the room's ids (`diff/ibf@1`): costs the
    /// difference.
    Ibf,
    /// A Merkle Search Tree of the room's ids (`diff/mst@1`): for
    /// differences beyond what the sketch holds.
    Mst,
}

impl Strategy {
    /// Every strategy, in the order a `hello` offers them.
    pub const ALL: [Strategy; 3] = [Strategy::Heads, Strategy::Ibf, Strategy::Mst];

    /// Its capability name on the wire.
    pub fn capability(self) -> &'static str {
        match self {
            Strategy::Heads => CAP_DIFF_HEADS,
            Strategy::Ibf => CAP_DIFF_IBF,
            Strategy::Mst => CAP_DIFF_MST,
        }
    }

    /// The strategy a capability names, if known.
    pub fn from_capability(cap: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.capability() == cap)
    }
}
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
    /// A node from the peer was refused because its author may not do what
    /// it does (`auth::governance`); the session goes on, and the peer
    /// was told with `error{unauthorized}`.
    Refused {
        /// What was refused, and why.
        message: String,
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

/// What a client presents in its `hello`.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The connection's challenge (the server's first frame), which the
    /// `hello` signs to prove the client holds its key.
    pub challenge: [u8; 32],
    /// A capability for a locked room (`auth::Capability`, encoded).
    pub token: Option<Vec<u8>>,
}

/// What only a client session keeps.
#[derive(Debug)]
struct ClientState {
    /// The local author, whose nodes the outbox tracks.
    local: AuthorId,
    /// The server lets this session write (its `welcome` said so): a
    /// read-only client uploads nothing and keeps its nodes in its outbox.
    may_write: bool,
    /// Nodes still expected from the server's catch-up.
    expecting: u64,
    /// The catch-up is complete.
    caught_up: bool,
    /// Until caught up: when the catch-up last made progress.
    catchup_progress: Option<u64>,
    /// Decoding the server's RIBLT symbols.
    decoder: Option<Decoder>,
    /// Refining MST ranges.
    reconciler: Option<Reconciler>,
    /// A `subscribe` waiting for the handshake to complete.
    pending_subscribe: Option<Scope>,
}

/// What only a server session keeps.
#[derive(Debug)]
struct ServerState {
    /// What the client may do (its expiry on the session's clock).
    access: Access,
    /// What the client subscribed to.
    scope: Scope,
    /// What the client is known to hold (every node of an author up to
    /// this sequence number); an underestimate is safe.
    peer_holds: VersionVector,
    /// MST: what `mst-done` messages named so far (a full message says
    /// more follow).
    mst_need: Vec<NodeIdx>,
    /// RIBLT symbols sent so far.
    symbols_sent: usize,
    /// The peers present in the room, for the `welcome` (the driver says).
    peers: Vec<AuthorId>,
    /// The client named [`PRESENCE_CAPABILITY`]: it is sent presence.
    wants_presence: bool,
}

/// Which end of the session this is, with what that end alone keeps.
#[derive(Debug)]
enum Role {
    // Boxed: a RIBLT decoder is large, and servers hold many sessions.
    Client(Box<ClientState>),
    Server(Box<ServerState>),
}

/// One sync session for one room.
#[derive(Debug)]
pub struct Session {
    role: Role,
    room: RoomId,
    id: u64,
    config: Config,
    state: State,
    /// The difference capability chosen at the handshake.
    strategy: Option<Strategy>,
    /// Nodes sent in packs so far, and of those in catch-up packs.
    nodes_sent: u64,
    catchup_sent: u64,
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
    pub fn client(
        now: u64,
        id: u64,
        room: &mut Room,
        peer: &Keypair,
        config: Config,
        credentials: &Credentials,
    ) -> Session {
        Session::client_scoped(
            now,
            id,
            room,
            peer,
            config,
            Scope::everything(),
            credentials,
        )
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
        credentials: &Credentials,
    ) -> Session {
        let role = Role::Client(Box::new(ClientState {
            local: peer.author(),
            may_write: false,
            expecting: 0,
            caught_up: false,
            catchup_progress: None,
            decoder: None,
            reconciler: None,
            pending_subscribe: None,
        }));
        let mut s = Session::new(role, now, id, room.id().clone(), config);
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
            proof: Some(hello_proof(peer, &credentials.challenge, room.id(), id)),
            token: credentials.token.clone(),
            caps: Strategy::ALL
                .iter()
                .map(|s| s.capability().to_owned())
                .chain(std::iter::once(PRESENCE_CAPABILITY.to_owned()))
                .collect(),
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

    /// A server session for `room`, waiting for the client's `hello`,
    /// which the driver admitted with `access` (`auth::admit`; its expiry
    /// on this session's clock).
    pub fn server(now: u64, id: u64, room: RoomId, config: Config, access: Access) -> Session {
        let role = Role::Server(Box::new(ServerState {
            access,
            scope: Scope::everything(),
            peer_holds: VersionVector::new(),
            mst_need: Vec::new(),
            symbols_sent: 0,
            peers: Vec::new(),
            wants_presence: false,
        }));
        Session::new(role, now, id, room, config)
    }

    /// Sets the peers a server session's `welcome` lists as present (the
    /// driver knows them; the session does not).
    pub fn set_welcome_peers(&mut self, peers: Vec<AuthorId>) {
        if let Role::Server(state) = &mut self.role {
            state.peers = peers;
        }
    }

    /// Whether the handshake is done and the session not closed.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the client of this server session asked for presence (it
    /// named [`PRESENCE_CAPABILITY`] in its `hello`); a client session
    /// always takes it.
    pub fn wants_presence(&self) -> bool {
        match &self.role {
            Role::Server(state) => state.wants_presence,
            Role::Client(_) => true,
        }
    }

    /// Queues a `presence` frame (ephemeral: nothing of the session's state
    /// changes). A client's `peer` and `client` are ignored by the server.
    pub fn send_presence(
        &mut self,
        now: u64,
        peer: AuthorId,
        client: u64,
        status: PresenceStatus,
        message: &str,
        data: &[u8],
    ) {
        if self.is_closed() {
            return;
        }
        self.send(
            now,
            0,
            Message::Presence {
                peer,
                client,
                status,
                message: message.to_owned(),
                data: data.to_vec(),
            },
        );
    }

    fn new(role: Role, now: u64, id: u64, room: RoomId, config: Config) -> Session {
        Session {
            role,
            room,
            id,
            state: State::Handshake,
            strategy: None,
            nodes_sent: 0,
            catchup_sent: 0,
            peer_acked: VersionVector::new(),
            diff_base: 0,
            peer_lacks: None,
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

    /// Which end of the session this is.
    pub fn side(&self) -> Side {
        match self.role {
            Role::Client(_) => Side::Client,
            Role::Server(_) => Side::Server,
        }
    }

    /// The client's own state; only client steps call it.
    fn client_state(&mut self) -> &mut ClientState {
        match &mut self.role {
            Role::Client(c) => c,
            Role::Server(_) => unreachable!("a client step on a server session"),
        }
    }

    /// The server's own state; only server steps call it.
    fn server_state(&mut self) -> &mut ServerState {
        match &mut self.role {
            Role::Server(s) => s,
            Role::Client(_) => unreachable!("a server step on a client session"),
        }
    }

    /// The difference capability chosen at the handshake (`None` before).
    pub fn strategy(&self) -> Option<Strategy> {
        self.strategy
    }

    /// Client: nodes of the catch-up still to arrive (0 once caught up, and
    /// until the difference is known).
    pub fn catchup_remaining(&self) -> u64 {
        match &self.role {
            Role::Client(c) if !c.caught_up => c.expecting,
            _ => 0,
        }
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
        let expiry = self.expires_at().unwrap_or(u64::MAX);
        let timer = match self.state {
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
        };
        timer.map(|t| t.min(expiry))
    }

    /// Server: when the client's capability ends.
    fn expires_at(&self) -> Option<u64> {
        match &self.role {
            Role::Server(s) => s.access.expires_at,
            Role::Client(_) => None,
        }
    }

    /// Client: whether the server lets this session write (known from
    /// its `welcome`; a read-only session keeps its nodes in the outbox).
    pub fn may_write(&self) -> bool {
        match &self.role {
            Role::Client(c) => c.may_write,
            Role::Server(s) => s.access.write.is_some(),
        }
    }

    /// Server: what the client may do.
    pub fn access(&self) -> Option<&Access> {
        match &self.role {
            Role::Server(s) => Some(&s.access),
            Role::Client(_) => None,
        }
    }

    /// Fires the timers due at `now`, and sends the next pack of queued
    /// nodes if the window has room (`room` is the session's room, `signer`
    /// signs the local author's nodes).
    pub fn handle_timeout(&mut self, now: u64, room: &mut Room, signer: Option<&Keypair>) {
        if self.expires_at().is_some_and(|t| now >= t) {
            return self.close(
                now,
                Reason::TokenExpired,
                "the token expired: refresh it and reconnect",
            );
        }
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

    /// Whether nothing is in flight either way: every pack sent and
    /// received is acknowledged, nothing waits to be sent, and (client) the
    /// catch-up is complete. A driver can report "synced" then.
    pub fn is_settled(&self) -> bool {
        self.state == State::Open
            && self.in_flight.is_empty()
            && self.queue.is_idle()
            && self.to_ack.is_empty()
            && self.outbox.is_empty()
            && match &self.role {
                Role::Client(c) => c.caught_up,
                Role::Server(_) => true,
            }
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
            && let Role::Client(c) = &mut self.role
            && let Some(scope) = c.pending_subscribe.take()
        {
            self.subscribe(now, scope);
        }
        if self.state == State::Open
            && let Role::Client(c) = &mut self.role
        {
            c.catchup_progress = match (c.caught_up, progress) {
                (true, _) => None,
                (false, true) => Some(now),
                (false, false) => c.catchup_progress.or(Some(now)),
            };
        }
    }

    /// Routes a message to the seam that handles it: the handshake,
    /// the difference, the transfer of packs, subscriptions.
    fn dispatch(&mut self, now: u64, env: Envelope, room: &mut Room, signer: Option<&Keypair>) {
        let corr = env.corr;
        match (self.side(), self.state, env.message) {
            (_, _, Message::Close { reason, message }) => {
                self.state = State::Closed;
                self.events.push_back(Event::Closed {
                    reason,
                    message,
                    by_peer: true,
                });
            }
            // Optional messages are not the session's: presence and blob
            // transfer are handled beside it (the hub, the SDK's engine),
            // and unknown ones are ignored, as the versioning rule
            // requires.
            (_, _, Message::Heartbeat | Message::Unknown(_) | Message::Presence { .. }) => {}
            (_, _, m) if m.is_blob() => {}
            (
                _,
                _,
                Message::Error {
                    code,
                    message,
                    related,
                },
            ) => {
                // A pack the peer refused will not be acknowledged: it
                // leaves the window (its nodes stay in the outbox).
                if let Some((_, _, bytes)) = self.in_flight.remove(&related) {
                    self.in_flight_bytes -= bytes;
                }
                self.events.push_back(Event::PeerError {
                    code,
                    message,
                    related,
                });
            }
            (Side::Server, State::Handshake, hello @ Message::Hello { .. }) => {
                self.on_hello(now, corr, hello, room, signer);
            }
            (
                Side::Client,
                State::Handshake,
                Message::Welcome {
                    diff, vv, write, ..
                },
            ) => {
                self.client_state().may_write = write.is_some();
                self.on_welcome(now, &diff, vv, room, signer);
            }
            (Side::Client, State::Handshake, Message::Reject { reason, message }) => {
                self.on_reject(reason, message);
            }
            (Side::Server, State::Open, Message::Subscribe { patterns }) => {
                self.on_subscribe(now, corr, patterns, room, signer);
            }
            (Side::Client, State::Open, Message::Subscribed { patterns }) => {
                self.events.push_back(Event::Subscribed { patterns });
            }
            (
                Side::Server,
                State::Open,
                message @ (Message::MstRequest { .. }
                | Message::MstDone { .. }
                | Message::IbfMore { .. }
                | Message::IbfDone { .. }),
            ) => self.on_reconcile_request(now, corr, message, room, signer),
            (Side::Client, State::Open, Message::MstSummary { answers }) => {
                self.receive_summaries(now, room, signer, answers);
            }
            (Side::Client, State::Open, Message::IbfSymbols { start, symbols }) => {
                self.receive_symbols(now, room, signer, start, &symbols);
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
            ) => self.on_pack(now, corr, &pack, checksum, phase, room),
            (_, State::Open, Message::Ack { nodes }) => {
                self.on_ack(now, corr, &nodes, room, signer);
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
