//! One simulated run: a relay and its clients, each with a fault-injecting
//! store, driven by a virtual clock from one seed. The relay is the shipped
//! relay core (`syncline_hub::RoomHub`: batches of frames stepped,
//! persisted, then acknowledged and relayed; storage failures close its
//! sessions `overloaded` and unload the room; connections that cannot take
//! their frames close `lagging`), and each client the shipped client half
//! (`syncline_hub::ClientLink`), as the relay and the SDK drive them.
//!
//! The run has two halves. In the *chaos* half clients edit concurrently
//! while the network loses, duplicates and reorders frames, links are cut
//! (both ways or one way), clients go offline for long stretches, storage
//! writes fail and clients and the relay crash (losing what they had not
//! synced). Then the world *heals*: faults stop, everyone restarts and
//! reconnects, and the run continues until it is quiet (no frame or event
//! in flight, every client caught up with an empty outbox). The checks
//! follow: one node set and one state hash everywhere, no acknowledged or
//! durably committed node lost.
//!
//! Half the seeds lock the room: the relay declares its policy in history
//! and admits only clients with capabilities; one client may only read,
//! one may write under `/projects` only, one is an admin who revokes that
//! writer during the chaos. Every replica checks write authority, edits
//! the policy refuses are refused before they commit, and the checks add
//! that a fresh replica accepts every node the relay holds (none is
//! unauthorized).
//!
//! Everything that happens is hashed into a trace hash, so a run can be
//! compared with a replay of its seed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncline_core::auth::governance::should_carry;
use syncline_core::auth::{self, Capability, Claims, Policy, Presented, Rights, RoomPattern};
use syncline_core::proto::message::{Envelope, Reason};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config, Credentials, Event, Strategy};
use syncline_core::room::TxnError;
use syncline_core::{AuthorId, Keypair, NodeId, RoomId, Transaction};
use syncline_hub::{ClientLink, End, HubConfig, HubEvent, Input, RoomHub};
use syncline_store::{DurableRoom, FaultPlan, FaultyStore, ReplicaError, Store};
use syncline_testkit::{Namespace, random_ops};

use crate::net::{Direction, FaultCounts, Network, Weather};

/// Where random edits go; `/projects/alpha` is what scoped clients
/// subscribe to.
const NAMESPACE: Namespace = Namespace {
    paths: &[
        "/a",
        "/a/b",
        "/a/b/c",
        "/d",
        "/d/e",
        "/projects/alpha",
        "/projects/beta",
        "/projects/alpha/notes",
    ],
    texts: &["/t1", "/projects/alpha/doc"],
    fields: &["x", "y", "title"],
};

/// Why the relay's room does not load while its disk fails.
const STILL_FAILING: &str = "the relay's storage still fails";

/// Wall-clock origin of the virtual clock (2026-01-01), so HLC times look
/// real.
const EPOCH_MS: u64 = 1_767_225_600_000;

/// The knobs of one run, drawn from its seed.
#[derive(Clone, Debug)]
pub(crate) struct Scenario {
    clients: usize,
    weather: Weather,
    chaos_ms: u64,
    /// Virtual time allowed after healing before the run counts as stuck.
    settle_ms: u64,
    /// Mean gap between one client's edits.
    edit_gap_ms: u64,
    /// Chance that a (re)started process gets a storage write failure
    /// planned.
    write_fault: f64,
    config: Config,
    /// Bytes the relay may have in flight to one connection during the
    /// chaos before it counts as lagging (unbounded after the heal, and
    /// in runs without the fault).
    lag_bytes: Option<usize>,
    /// The relay's timer slices.
    slice_bytes: usize,
}

impl Scenario {
    pub(crate) fn draw(rng: &mut ChaCha8Rng) -> Scenario {
        let min_delay_ms = rng.random_range(1..20);
        let config = Config {
            handshake_timeout_ms: 4_000,
            idle_timeout_ms: 20_000,
            heartbeat_ms: 5_000,
            response_timeout_ms: 6_000,
            // Small packs, so catch-ups are chunked.
            max_pack_nodes: rng.random_range(8..128),
            // Sometimes leave the version vector out, so the server picks
            // RIBLT, or the MST for a difference above `mst_above`.
            vv_inline_limit: [0, 1, 3, 512][rng.random_range(0..4)],
            mst_above: rng.random_range(4..200),
            ..Config::default()
        };
        Scenario {
            clients: rng.random_range(2..=8),
            weather: Weather {
                loss: rng.random_range(0.0..0.30),
                duplication: rng.random_range(0.0..0.50),
                reorder: rng.random_range(0.0..0.5),
                min_delay_ms,
                max_delay_ms: min_delay_ms + rng.random_range(0..200),
            },
            chaos_ms: 60_000,
            settle_ms: 300_000,
            edit_gap_ms: rng.random_range(200..3_000),
            write_fault: rng.random_range(0.0..0.3),
            config,
            lag_bytes: rng
                .random_bool(0.5)
                .then(|| rng.random_range(512..64 << 10)),
            slice_bytes: rng.random_range(1 << 10..1 << 20),
        }
    }
}

/// Something scheduled to happen at a virtual time.
#[derive(Debug)]
enum Action {
    /// A frame arrives.
    Deliver {
        client: usize,
        conn: u64,
        dir: Direction,
        frame: Vec<u8>,
    },
    /// One end learns that the connection is gone.
    Reset {
        client: usize,
        conn: u64,
        dir: Direction,
    },
    Edit(usize),
    Connect(usize),
    CrashClient(usize),
    RestartClient(usize),
    GoOffline(usize),
    GoOnline(usize),
    /// Cuts the link to the relay, the link to the client, or both.
    Cut {
        client: usize,
        to_relay: bool,
        to_client: bool,
    },
    Uncut(usize),
    CrashRelay,
    RestartRelay,
    /// The relay steps what its inbox holds, as one batch.
    RelayStep,
    /// A store whose writes failed works again (`None`: the relay's).
    DiskRecovers(Option<usize>),
    Heal,
    /// The admin client revokes the `/projects` writer's capability.
    Revoke,
}

#[derive(Debug)]
struct ClientConn {
    id: u64,
    link: ClientLink,
}

#[derive(Debug)]
struct Client {
    key: Keypair,
    /// Its capability, in a locked room.
    cap: Option<Capability>,
    store: FaultyStore,
    /// `None` while crashed.
    room: Option<DurableRoom>,
    conn: Option<ClientConn>,
    /// `false` during an offline stretch.
    online: bool,
    /// Clock skew of this client's wall clock.
    skew_ms: u64,
    /// Nodes this client committed durably.
    committed: Vec<NodeId>,
    /// Subscribed to `/projects/alpha/**` only until the heal.
    scoped: bool,
}

#[derive(Debug)]
struct Relay {
    key: Keypair,
    store: FaultyStore,
    /// `false` while crashed.
    up: bool,
    /// The loaded room; `None` while crashed, or unloaded after a storage
    /// failure until the next input loads it again.
    hub: Option<RoomHub>,
    /// Open connections, with the client at the other end.
    conns: BTreeMap<u64, usize>,
    /// Who may open sessions (every `hello` is admitted as the relay
    /// admits it).
    policy: Policy,
    /// Inputs waiting for the next [`Action::RelayStep`].
    inbox: Vec<Input>,
    step_scheduled: bool,
    /// Bytes sent to each connection and not yet delivered (or lost).
    in_flight: BTreeMap<u64, usize>,
    /// A write failed since the room was last loaded: the next load makes
    /// what the store holds durable first, as the relay does.
    write_failed: bool,
}

/// Handshakes completed by each difference strategy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strategies {
    /// `diff/heads@1`.
    pub heads: u64,
    /// `diff/ibf@1`.
    pub ibf: u64,
    /// `diff/mst@1`.
    pub mst: u64,
}

impl Strategies {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &Strategies) {
        self.heads += other.heads;
        self.ibf += other.ibf;
        self.mst += other.mst;
    }
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Hash of everything that happened, for replay comparison.
    pub trace_hash: [u8; 32],
    /// Faults that fired.
    pub faults: FaultCounts,
    /// Handshakes completed, by difference strategy.
    pub strategies: Strategies,
    /// Nodes in the room at the end.
    pub nodes: usize,
    /// Clients in the run.
    pub clients: usize,
    /// Restarts (after crashes) that opened the room from a checkpoint.
    pub opened_from_checkpoint: u64,
    /// The room was locked.
    pub locked: bool,
    /// Edits refused before they committed (locked rooms).
    pub refused_edits: u64,
    /// Capabilities revoked in history (locked rooms).
    pub revocations: u64,
    /// `Err` says which check failed.
    pub result: Result<(), String>,
}

/// The simulated world of one run.
#[derive(Debug)]
pub(crate) struct World {
    rng: ChaCha8Rng,
    scenario: Scenario,
    room_id: RoomId,
    now: u64,
    next_seq: u64,
    next_conn: u64,
    queue: BTreeMap<(u64, u64), Action>,
    net: Network,
    relay: Relay,
    clients: Vec<Client>,
    faults: FaultCounts,
    healed: bool,
    /// Node ids the relay acknowledged to some client.
    acked: BTreeSet<NodeId>,
    strategies: Strategies,
    trace: blake3::Hasher,
    /// Nodes between checkpoints (small, so that restarts open rooms from
    /// checkpoints; drawn from the seed apart from the scenario's stream).
    checkpoint_every: u32,
    /// Restarts that opened a room from a checkpoint.
    opened_from_checkpoint: u64,
    /// The room is locked (drawn from the seed apart from the scenario's
    /// stream): write authority is checked everywhere.
    locked: bool,
    /// Edits refused before they committed: the policy does not allow them.
    refused_edits: u64,
    /// Capabilities revoked in history.
    revocations: u64,
    /// The first node the relay refused as unauthorized.
    relay_refused: Option<String>,
}

/// Opens the simulated room from `store`, writing checkpoints every
/// `checkpoint_every` nodes (and quarter of the room), checking write
/// authority with `relay` trusted to declare the policy (as the SDK trusts
/// the relays it syncs with).
fn open_room(
    store: &FaultyStore,
    key: &Keypair,
    room_id: &RoomId,
    checkpoint_every: u32,
    relay: AuthorId,
) -> Result<DurableRoom, ReplicaError> {
    let mut room = DurableRoom::load(Arc::new(store.clone()), key.clone(), room_id)?;
    room.set_checkpoint_min_nodes(checkpoint_every);
    room.govern(vec![relay]);
    Ok(room)
}

/// A capability for `subject` in the simulated room, issued by the relay.
fn capability(
    relay: &Keypair,
    subject: &Keypair,
    rights: &str,
    paths: &[&str],
    id: u8,
) -> Capability {
    let claims = Claims {
        id: [id; 16],
        room: RoomPattern::parse("sim").expect("a room pattern"),
        subject: subject.author(),
        rights: Rights::parse(rights).expect("rights"),
        write_paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        not_after_ms: EPOCH_MS + 30 * 86_400_000,
    };
    Capability::issue(relay, claims, None)
}

/// Client roles in a locked room: 0 reads only, 1 writes under
/// `/projects` (and is revoked), 2 is an admin, the others write anywhere.
fn role(c: usize) -> (&'static str, &'static [&'static str]) {
    match c {
        0 => ("read", &[]),
        1 => ("write", &["/projects/**"]),
        2 => ("admin,write", &[]),
        _ => ("write", &[]),
    }
}

/// The capability id of client `c`'s capability.
fn cap_id(c: usize) -> u8 {
    c as u8 + 1
}

impl World {
    pub(crate) fn new(seed: u64) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let scenario = Scenario::draw(&mut rng);
        let room_id = RoomId::new("sim").expect("valid room id");
        let checkpoint_every = 4 + (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as u32;
        let relay_store = FaultyStore::new(FaultPlan::default());
        let relay_key = Keypair::from_seed(rng.random());
        let locked = (seed.wrapping_mul(0xd134_2543_de82_ef95) >> 63) == 1;
        let relay = Relay {
            up: true,
            hub: None,
            key: relay_key.clone(),
            store: relay_store,
            conns: BTreeMap::new(),
            policy: if locked {
                Policy {
                    roots: vec![relay_key.author()],
                    ..Policy::default()
                }
            } else {
                Policy::open()
            },
            inbox: Vec::new(),
            step_scheduled: false,
            in_flight: BTreeMap::new(),
            write_failed: false,
        };
        let clients = (0..scenario.clients)
            .map(|c| {
                let store = FaultyStore::new(FaultPlan::default());
                let key = Keypair::from_seed(rng.random());
                let (rights, paths) = role(c);
                Client {
                    room: Some(
                        open_room(&store, &key, &room_id, checkpoint_every, relay_key.author())
                            .expect("an empty store loads"),
                    ),
                    cap: locked.then(|| capability(&relay_key, &key, rights, paths, cap_id(c))),
                    key,
                    store,
                    conn: None,
                    online: true,
                    skew_ms: rng.random_range(0..5_000),
                    committed: Vec::new(),
                    scoped: rng.random_bool(0.25),
                }
            })
            .collect();
        let net = Network::new(scenario.weather, scenario.clients);
        let mut world = World {
            rng,
            room_id,
            now: 0,
            next_seq: 0,
            next_conn: 1,
            queue: BTreeMap::new(),
            net,
            relay,
            clients,
            faults: FaultCounts::default(),
            healed: false,
            acked: BTreeSet::new(),
            strategies: Strategies::default(),
            trace: blake3::Hasher::new(),
            scenario,
            checkpoint_every,
            opened_from_checkpoint: 0,
            locked,
            refused_edits: 0,
            revocations: 0,
            relay_refused: None,
        };
        world.plan_chaos();
        world
    }

    fn at(&mut self, time: u64, action: Action) {
        self.queue.insert((time, self.next_seq), action);
        self.next_seq += 1;
    }

    fn after(&mut self, lo: u64, hi: u64, action: Action) {
        let t = self.now + self.rng.random_range(lo..=hi);
        self.at(t, action);
    }

    /// Schedules the chaos half: first connections, edits, offline
    /// stretches, crashes, partitions, then the heal.
    fn plan_chaos(&mut self) {
        let chaos = self.scenario.chaos_ms;
        for c in 0..self.clients.len() {
            self.after(0, 500, Action::Connect(c));
            self.after(0, self.scenario.edit_gap_ms, Action::Edit(c));
            self.plan_write_fault_client(c);
            if self.rng.random_bool(0.3) {
                let start = self.rng.random_range(0..chaos / 2);
                let end = start + self.rng.random_range(chaos / 10..chaos / 2);
                self.at(start, Action::GoOffline(c));
                self.at(end, Action::GoOnline(c));
            }
            for _ in 0..self.rng.random_range(0..=2) {
                let t = self.rng.random_range(0..chaos);
                self.at(t, Action::CrashClient(c));
            }
        }
        for _ in 0..self.rng.random_range(0..=2) {
            let t = self.rng.random_range(0..chaos);
            self.at(t, Action::CrashRelay);
        }
        self.plan_write_fault_relay();
        if self.locked && self.clients.len() > 2 {
            let t = self.rng.random_range(0..chaos);
            self.at(t, Action::Revoke);
        }
        for _ in 0..self.rng.random_range(0..=4) {
            let client = self.rng.random_range(0..self.clients.len());
            let (to_relay, to_client) = match self.rng.random_range(0..3) {
                0 => (true, true),
                1 => (true, false),
                _ => (false, true),
            };
            let t = self.rng.random_range(0..chaos);
            let end = t + self.rng.random_range(1_000..20_000);
            self.at(
                t,
                Action::Cut {
                    client,
                    to_relay,
                    to_client,
                },
            );
            self.at(end, Action::Uncut(client));
        }
        self.at(chaos, Action::Heal);
    }

    fn write_fault_plan(&mut self) -> FaultPlan {
        let fails = !self.healed && self.rng.random_bool(self.scenario.write_fault);
        FaultPlan {
            fail_after_writes: fails.then(|| self.rng.random_range(1..200)),
            seed: self.rng.random(),
        }
    }

    fn plan_write_fault_client(&mut self, c: usize) {
        let plan = self.write_fault_plan();
        self.clients[c].store.set_plan(plan);
    }

    fn plan_write_fault_relay(&mut self) {
        let plan = self.write_fault_plan();
        self.relay.store.set_plan(plan);
    }

    fn trace(&mut self, what: &str, a: u64, b: u64) {
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(what.as_bytes());
        self.trace.update(&a.to_le_bytes());
        self.trace.update(&b.to_le_bytes());
    }

    /// Runs the world to the end and checks it.
    pub(crate) fn run(mut self, seed: u64) -> Outcome {
        let result = self.run_to_quiet().and_then(|()| self.check());
        let nodes = self
            .relay
            .hub
            .as_ref()
            .map_or(0, |h| h.room().room().dag().len());
        if let Some(hub) = &self.relay.hub {
            self.trace.update(&hub.room().room().state_hash());
        }
        Outcome {
            seed,
            trace_hash: *self.trace.finalize().as_bytes(),
            faults: self.faults,
            strategies: self.strategies,
            nodes,
            clients: self.clients.len(),
            opened_from_checkpoint: self.opened_from_checkpoint,
            locked: self.locked,
            refused_edits: self.refused_edits,
            revocations: self.revocations,
            result,
        }
    }

    fn run_to_quiet(&mut self) -> Result<(), String> {
        let deadline = self.scenario.chaos_ms + self.scenario.settle_ms;
        loop {
            if self.healed && self.is_quiet()? {
                return Ok(());
            }
            let next_action = self.queue.first_key_value().map(|(k, _)| k.0);
            let next_timer = self.next_timer();
            let Some(t) = next_action.into_iter().chain(next_timer).min() else {
                return Err("nothing left to happen, yet not quiet".into());
            };
            if t > deadline {
                return Err(format!(
                    "not quiet {} s after healing: {}{}",
                    self.scenario.settle_ms / 1000,
                    self.describe(),
                    self.relay_refused
                        .as_ref()
                        .map_or_else(String::new, |r| format!("; the relay refused: {r}"))
                ));
            }
            self.now = t;
            if next_timer.is_some_and(|timer| next_action.is_none_or(|a| timer < a)) {
                self.fire_timers()?;
            } else {
                let (_, action) = self.queue.pop_first().expect("checked above");
                self.act(action)?;
            }
        }
    }

    fn act(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::Deliver {
                client,
                conn,
                dir,
                frame,
            } => {
                self.trace.update(blake3::hash(&frame).as_bytes());
                self.trace("deliver", conn, dir as u64);
                match dir {
                    Direction::ToRelay => self.deliver_to_relay(conn, &frame),
                    Direction::ToClient => {
                        if let Some(bytes) = self.relay.in_flight.get_mut(&conn) {
                            *bytes = bytes.saturating_sub(frame.len());
                        }
                        self.deliver_to_client(client, conn, &frame)
                    }
                }
            }
            Action::Reset { client, conn, dir } => {
                self.trace("reset", conn, dir as u64);
                match dir {
                    Direction::ToRelay => {
                        if self.relay.conns.remove(&conn).is_some() {
                            self.relay.in_flight.remove(&conn);
                            self.relay_input(Input::Gone { conn });
                        }
                    }
                    Direction::ToClient => {
                        if self.clients[client]
                            .conn
                            .as_ref()
                            .is_some_and(|cc| cc.id == conn)
                        {
                            self.clients[client].conn = None;
                            self.reconnect_later(client);
                        }
                    }
                }
                self.net.forget(conn);
                Ok(())
            }
            Action::Edit(c) => self.edit(c),
            Action::Revoke => self.revoke(),
            Action::Connect(c) => {
                self.connect(c);
                Ok(())
            }
            Action::CrashClient(c) if !self.healed => {
                self.crash_client(c);
                Ok(())
            }
            Action::RestartClient(c) => self.restart_client(c),
            Action::GoOffline(c) if !self.healed => {
                self.trace("offline", c as u64, 0);
                self.faults.offline += 1;
                self.clients[c].online = false;
                if let Some(cc) = self.clients[c].conn.take() {
                    self.at(
                        self.now + 1,
                        Action::Reset {
                            client: c,
                            conn: cc.id,
                            dir: Direction::ToRelay,
                        },
                    );
                }
                Ok(())
            }
            Action::GoOnline(c) => {
                self.clients[c].online = true;
                self.reconnect_later(c);
                Ok(())
            }
            Action::Cut {
                client,
                to_relay,
                to_client,
            } if !self.healed => {
                self.trace(
                    "cut",
                    client as u64,
                    u64::from(to_relay) * 2 + u64::from(to_client),
                );
                self.faults.partitions += 1;
                self.net.set_cut(client, to_relay, to_client);
                Ok(())
            }
            Action::Uncut(client) => {
                self.net.set_cut(client, false, false);
                Ok(())
            }
            Action::CrashRelay if !self.healed => self.crash_relay(),
            Action::RestartRelay => self.restart_relay(),
            Action::RelayStep => self.relay_step(),
            Action::DiskRecovers(who) => {
                match who {
                    Some(c) => self.plan_write_fault_client(c),
                    None => self.plan_write_fault_relay(),
                }
                Ok(())
            }
            Action::Heal => {
                self.heal();
                Ok(())
            }
            // Faults scheduled past the heal do not fire.
            Action::CrashClient(_)
            | Action::GoOffline(_)
            | Action::Cut { .. }
            | Action::CrashRelay => Ok(()),
        }
    }

    fn heal(&mut self) {
        self.trace("heal", 0, 0);
        self.healed = true;
        self.net.heal();
        self.relay.store.set_plan(FaultPlan::default());
        for c in 0..self.clients.len() {
            let client = &mut self.clients[c];
            client.store.set_plan(FaultPlan::default());
            client.online = true;
            // Scoped clients widen to the whole room, so all can converge.
            if std::mem::take(&mut client.scoped)
                && let Some(cc) = client.conn.as_mut()
            {
                cc.link.subscribe(self.now, Scope::everything());
                self.flush_client(c);
            }
            self.reconnect_later(c);
        }
    }

    // ----- clients -----

    fn reconnect_later(&mut self, c: usize) {
        self.after(50, 2_000, Action::Connect(c));
    }

    fn connect(&mut self, c: usize) {
        let now = self.now;
        let client = &mut self.clients[c];
        if client.conn.is_some() || !client.online {
            return;
        }
        let Some(room) = client.room.as_mut() else {
            return; // Crashed; the restart reconnects.
        };
        if !self.relay.up || self.net.is_cut(c) {
            // The connection attempt fails; try again later.
            self.trace("connect-failed", c as u64, 0);
            return self.reconnect_later(c);
        }
        let id = self.next_conn;
        self.next_conn += 1;
        let config = self.scenario.config.clone();
        let scope = if client.scoped {
            Scope::parse(&["/projects/alpha/**".to_owned()]).expect("a valid pattern")
        } else {
            Scope::everything()
        };
        let credentials = Credentials {
            challenge: challenge(id),
            token: client.cap.as_ref().map(Capability::encode),
        };
        let Ok(link) = ClientLink::open(now, id, room, config, scope, &credentials) else {
            unreachable!("opening a session inserts no node, so it writes nothing")
        };
        client.conn = Some(ClientConn { id, link });
        self.relay.conns.insert(id, c);
        self.trace("connect", c as u64, id);
        self.flush_client(c);
    }

    fn edit(&mut self, c: usize) -> Result<(), String> {
        if self.healed {
            return Ok(());
        }
        let gap = self.scenario.edit_gap_ms;
        self.after(1, 2 * gap, Action::Edit(c));
        match self.commit(c, |tx, rng| {
            random_ops(tx, rng, &NAMESPACE);
            Ok(())
        }) {
            Some(Err(ReplicaError::Txn(TxnError::Unauthorized(_)))) => {
                // Every replica would refuse it: refused before it commits.
                self.refused_edits += 1;
                self.trace("refused-edit", c as u64, 0);
                Ok(())
            }
            Some(Err(e)) => Err(format!("client {c}: a random edit failed: {e}")),
            Some(Ok(_)) | None => Ok(()),
        }
    }

    /// The admin (client 2) revokes client 1's capability in history, if
    /// it is up and holds the policy; else it tries again later.
    fn revoke(&mut self) -> Result<(), String> {
        if self.healed {
            return Ok(()); // Edits stop at the heal; so does this one.
        }
        let (admin, revoked) = (2, 1);
        match self.commit(admin, |tx, _| tx.revoke(&[cap_id(revoked); 16])) {
            Some(Ok(true)) => {
                self.revocations += 1;
                Ok(())
            }
            Some(Err(e)) => Err(format!("the admin's revocation failed: {e}")),
            Some(Ok(false)) | None => {
                self.after(500, 5_000, Action::Revoke);
                Ok(())
            }
        }
    }

    /// Client `c` commits `edit` (carrying its capability into the room's
    /// history the first time, as the SDK does), and sends it: `None` if
    /// it is down or (in a locked room) has not learnt the policy yet,
    /// `Ok(false)` if its disk failed (it crashed), `Ok(true)` once
    /// committed, `Err` if the edit was refused.
    fn commit(
        &mut self,
        c: usize,
        edit: impl FnOnce(&mut Transaction<'_>, &mut ChaCha8Rng) -> Result<(), TxnError>,
    ) -> Option<Result<bool, ReplicaError>> {
        let now = self.now;
        let rng = &mut self.rng;
        let client = &mut self.clients[c];
        let room = client.room.as_mut()?;
        let governed = room
            .room()
            .dag()
            .governance()
            .is_some_and(|g| g.is_governed());
        if self.locked && !governed {
            return None; // Join first, then write.
        }
        let carry = client
            .cap
            .as_ref()
            .filter(|cap| should_carry(room.room(), &client.key.author(), cap));
        let committed = room.transact(EPOCH_MS + now + client.skew_ms, |tx| {
            if let Some(cap) = carry {
                tx.record_grant(cap)?;
            }
            edit(tx, rng)
        });
        match committed {
            Ok(Some(committed)) => {
                let id = room.room().dag().id(committed.idx);
                client.committed.push(id);
                self.trace.update(id.0.as_slice());
                if let Some(cc) = client.conn.as_mut() {
                    cc.link.send_local(now, room, &[committed.idx]);
                }
                self.flush_client(c);
                Some(Ok(true))
            }
            Ok(None) => Some(Ok(true)),
            Err(ReplicaError::Store(_)) => {
                // The commit was not acknowledged; the process dies.
                self.faults.write_failures += 1;
                self.crash_client(c);
                Some(Ok(false))
            }
            Err(e) => Some(Err(e)),
        }
    }

    fn deliver_to_client(&mut self, c: usize, conn: u64, frame: &[u8]) -> Result<(), String> {
        let now = self.now;
        let client = &mut self.clients[c];
        let (Some(room), Some(cc)) = (client.room.as_mut(), client.conn.as_mut()) else {
            return Ok(());
        };
        if cc.id != conn {
            return Ok(()); // For a connection this client no longer has.
        }
        if cc.link.handle_frame(now, room, frame).is_err() {
            // As the SDK does: the link closed the session `overloaded`;
            // the client reconnects, and the disk recovers later.
            self.faults.write_failures += 1;
            self.after(100, 5_000, Action::DiskRecovers(Some(c)));
        }
        self.client_events(c)
    }

    /// Handles a client session's events, then sends its frames.
    fn client_events(&mut self, c: usize) -> Result<(), String> {
        let now = self.now;
        loop {
            let client = &mut self.clients[c];
            let (Some(room), Some(cc)) = (client.room.as_mut(), client.conn.as_mut()) else {
                return Ok(());
            };
            let event = match cc.link.poll_event(now, room) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(_) => {
                    // Storage failed: as the SDK does, end the connection;
                    // the outbox keeps the nodes and the next handshake
                    // repairs the rest.
                    self.faults.write_failures += 1;
                    self.after(100, 5_000, Action::DiskRecovers(Some(c)));
                    self.end_client_conn(c);
                    return Ok(());
                }
            };
            match event {
                Event::Acknowledged { nodes } => {
                    let dag = room.room().dag();
                    self.acked.extend(nodes.iter().map(|&n| dag.id(n)));
                }
                Event::ServerHolds { through_seq } => {
                    let dag = room.room().dag();
                    let me = client.key.author();
                    self.acked.extend(
                        (1..=through_seq)
                            .filter_map(|s| dag.by_author_seq(&me, s))
                            .map(|i| dag.id(i)),
                    );
                }
                Event::Connected => {
                    let slot = match cc.link.session().strategy() {
                        Some(Strategy::Ibf) => &mut self.strategies.ibf,
                        Some(Strategy::Mst) => &mut self.strategies.mst,
                        _ => &mut self.strategies.heads,
                    };
                    *slot += 1;
                }
                Event::Accepted { .. }
                | Event::CaughtUp
                | Event::Subscribed { .. }
                | Event::PeerError { .. }
                | Event::Refused { .. } => {}
                Event::Closed { reason, .. } => {
                    self.trace("client-closed", c as u64, reason.as_str().len() as u64);
                    self.end_client_conn(c);
                    return Ok(());
                }
            }
        }
        self.flush_client(c);
        Ok(())
    }

    /// The client's connection ends: what it queued goes out, the relay
    /// learns of it later, and the client reconnects.
    fn end_client_conn(&mut self, c: usize) {
        self.flush_client(c);
        let id = self.clients[c].conn.take().map_or(0, |cc| cc.id);
        self.reset_after_delay(c, id, Direction::ToRelay);
        self.reconnect_later(c);
    }

    /// The far end of connection `conn` learns it is gone one network
    /// delay from now.
    fn reset_after_delay(&mut self, client: usize, conn: u64, dir: Direction) {
        let delay = self.net.delay(&mut self.rng);
        self.at(self.now + delay, Action::Reset { client, conn, dir });
    }

    fn flush_client(&mut self, c: usize) {
        let Some(cc) = self.clients[c].conn.as_mut() else {
            return;
        };
        let id = cc.id;
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| cc.link.poll_transmit()).collect();
        for frame in frames {
            self.send(c, id, Direction::ToRelay, frame);
        }
    }

    fn send(&mut self, client: usize, conn: u64, dir: Direction, frame: Vec<u8>) {
        let arrivals = self
            .net
            .send(self.now, client, conn, dir, &mut self.rng, &mut self.faults);
        if dir == Direction::ToClient
            && let Some(bytes) = self.relay.in_flight.get_mut(&conn)
        {
            *bytes += frame.len() * arrivals.len();
        }
        for t in arrivals {
            self.at(
                t,
                Action::Deliver {
                    client,
                    conn,
                    dir,
                    frame: frame.clone(),
                },
            );
        }
    }

    fn crash_client(&mut self, c: usize) {
        self.trace("crash-client", c as u64, 0);
        self.faults.client_crashes += 1;
        let client = &mut self.clients[c];
        if client.room.is_none() {
            return;
        }
        client.store.crash();
        client.room = None;
        if let Some(cc) = client.conn.take() {
            self.after(
                1,
                100,
                Action::Reset {
                    client: c,
                    conn: cc.id,
                    dir: Direction::ToRelay,
                },
            );
        }
        self.after(100, 5_000, Action::RestartClient(c));
    }

    fn restart_client(&mut self, c: usize) -> Result<(), String> {
        self.trace("restart-client", c as u64, 0);
        let client = &mut self.clients[c];
        let room = open_room(
            &client.store,
            &client.key,
            &self.room_id,
            self.checkpoint_every,
            self.relay.key.author(),
        )
        .map_err(|e| format!("client {c} cannot reload after a crash: {e}"))?;
        check_reopened(&client.store, &room).map_err(|e| format!("client {c}: {e}"))?;
        self.opened_from_checkpoint += u64::from(room.opened().from_checkpoint > 0);
        let held = room.room().dag().id_index();
        if let Some(lost) = client.committed.iter().find(|id| !held.contains_key(id)) {
            return Err(format!(
                "client {c} lost its durably committed node {lost:?} in a crash"
            ));
        }
        client.room = Some(room);
        self.plan_write_fault_client(c);
        self.reconnect_later(c);
        Ok(())
    }

    // ----- the relay -----

    fn deliver_to_relay(&mut self, conn: u64, frame: &[u8]) -> Result<(), String> {
        if !self.relay.up || !self.relay.conns.contains_key(&conn) {
            return Ok(());
        }
        let Ok(env) = Envelope::decode(frame) else {
            return Err("the network delivered a frame that does not decode".into());
        };
        let env = Box::new(env);
        let input = match Presented::of_hello(&env) {
            Some(presented) => {
                match auth::admit(
                    &self.relay.policy,
                    &challenge(conn),
                    presented,
                    EPOCH_MS + self.now,
                ) {
                    Ok(access) => Input::Hello {
                        conn,
                        env,
                        access: access.on_clock(EPOCH_MS + self.now, self.now),
                    },
                    Err(refusal) => {
                        return Err(format!("an honest client's hello was refused: {refusal:?}"));
                    }
                }
            }
            None => Input::Frame { conn, env },
        };
        self.relay_input(input);
        Ok(())
    }

    /// Queues an input for the relay's next step, a few milliseconds away,
    /// so frames that arrive together are stepped as one batch.
    fn relay_input(&mut self, input: Input) {
        if !self.relay.up {
            return;
        }
        self.relay.inbox.push(input);
        if !std::mem::replace(&mut self.relay.step_scheduled, true) {
            self.after(0, 3, Action::RelayStep);
        }
    }

    /// Steps the relay's inbox as one batch (loading the room first if a
    /// storage failure unloaded it), then sends its frames.
    fn relay_step(&mut self) -> Result<(), String> {
        self.relay.step_scheduled = false;
        let inputs = std::mem::take(&mut self.relay.inbox);
        if !self.relay.up || inputs.is_empty() {
            return Ok(());
        }
        self.trace("relay-step", inputs.len() as u64, 0);
        if self.relay.hub.is_none() {
            match self.load_relay_hub() {
                Ok(hub) => self.relay.hub = Some(hub),
                Err(e) if e == STILL_FAILING => {
                    self.refuse(inputs);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        let hub = self.relay.hub.as_mut().expect("loaded above");
        if hub.handle_batch(self.now, inputs).is_err() {
            // As the relay does: the hub closed every session
            // `overloaded`; send that, then unload the room.
            self.faults.write_failures += 1;
            self.relay_output();
            self.relay.hub = None;
            self.relay.write_failed = true;
            self.after(100, 5_000, Action::DiskRecovers(None));
            return Ok(());
        }
        self.relay_output();
        Ok(())
    }

    /// The room cannot load (its disk still fails): as the relay does, every
    /// session that sent a frame is closed `overloaded`, and its
    /// connection ends.
    fn refuse(&mut self, inputs: Vec<Input>) {
        for input in inputs {
            let (Input::Frame { conn, env } | Input::Hello { conn, env, .. }) = input else {
                continue;
            };
            let Some(client) = self.relay.conns.remove(&conn) else {
                continue;
            };
            let close = Envelope::close_frame(env.session, Reason::Overloaded, STILL_FAILING);
            self.send(client, conn, Direction::ToClient, close);
            self.reset_after_delay(client, conn, Direction::ToClient);
        }
    }

    /// The relay's hub over its room loaded from its store (checked).
    fn load_relay_hub(&mut self) -> Result<RoomHub, String> {
        let mut room = self.load_relay_room()?;
        if self.locked {
            // As the relay does with a locked room: declared in history.
            let roots = vec![self.relay.key.author()];
            match syncline_hub::govern(&mut room, roots, EPOCH_MS + self.now) {
                Ok(()) => {}
                Err(ReplicaError::Store(_)) => {
                    self.relay.write_failed = true;
                    return Err(STILL_FAILING.into());
                }
                Err(e) => return Err(format!("the relay cannot lock its room: {e}")),
            }
        }
        let config = HubConfig {
            session: self.scenario.config.clone(),
            slice_bytes: self.scenario.slice_bytes,
            ..HubConfig::default()
        };
        Ok(RoomHub::new(room, config, 0))
    }

    /// Loads the relay's room from its store, checking that it is faithful
    /// and holds every node the relay acknowledged.
    fn load_relay_room(&mut self) -> Result<DurableRoom, String> {
        let store: Arc<dyn Store> = Arc::new(self.relay.store.clone());
        let key = self.relay.key.clone();
        let loaded = if self.relay.write_failed {
            DurableRoom::load_after_failure(store, key, &self.room_id)
        } else {
            DurableRoom::load(store, key, &self.room_id)
        };
        let mut room = match loaded {
            Ok(room) => room,
            // The disk still fails: the inputs wait for the next try.
            Err(ReplicaError::Store(_)) if self.relay.write_failed => {
                return Err(STILL_FAILING.into());
            }
            Err(e) => return Err(format!("the relay cannot load its room: {e}")),
        };
        room.set_checkpoint_min_nodes(self.checkpoint_every);
        self.relay.write_failed = false;
        check_reopened(&self.relay.store, &room).map_err(|e| format!("the relay: {e}"))?;
        self.opened_from_checkpoint += u64::from(room.opened().from_checkpoint > 0);
        let held = room.room().dag().id_index();
        if let Some(lost) = self.acked.iter().find(|id| !held.contains_key(id)) {
            return Err(format!(
                "the relay lost node {lost:?} after acknowledging it"
            ));
        }
        Ok(room)
    }

    /// Sends the relay's frames (a connection with too much in flight
    /// lags, as a full outbound queue does on the relay) and handles its
    /// events: a session that closed ends its connection.
    fn relay_output(&mut self) {
        let Some(hub) = self.relay.hub.as_mut() else {
            return;
        };
        let bound = match self.scenario.lag_bytes {
            Some(bytes) if !self.healed => bytes,
            _ => usize::MAX,
        };
        let mut frames = Vec::new();
        let mut ended = Vec::new();
        // The simulated clients keep no blobs: there are no bulk frames.
        debug_assert!(hub.poll_bulk().is_none());
        while let Some((conn, frame)) = hub.poll_transmit() {
            let Some(&client) = self.relay.conns.get(&conn) else {
                continue;
            };
            let in_flight = self.relay.in_flight.get(&conn).copied().unwrap_or(0);
            if in_flight > 0 && in_flight + frame.len() > bound {
                self.faults.lagging += 1;
                hub.lagging(conn);
                self.relay.conns.remove(&conn);
                ended.push((conn, client));
                continue;
            }
            self.relay.in_flight.entry(conn).or_insert(0);
            frames.push((client, conn, frame));
        }
        while let Some(event) = hub.poll_event() {
            if let HubEvent::Refused { message, .. } = &event {
                // Honest clients check what they commit: the relay refusing
                // one of their nodes is a bug.
                self.relay_refused.get_or_insert_with(|| message.clone());
            }
            // A closed session's connection ends (one session each here).
            if let HubEvent::Ended {
                key,
                end: End::Closed { .. },
                ..
            } = event
                && let Some(client) = self.relay.conns.remove(&key.conn)
            {
                ended.push((key.conn, client));
            }
        }
        for (client, conn, frame) in frames {
            self.send(client, conn, Direction::ToClient, frame);
        }
        for (conn, client) in ended {
            self.relay.in_flight.remove(&conn);
            self.reset_after_delay(client, conn, Direction::ToClient);
        }
    }

    fn crash_relay(&mut self) -> Result<(), String> {
        self.trace("crash-relay", 0, 0);
        if !self.relay.up {
            return Ok(());
        }
        self.faults.relay_crashes += 1;
        self.relay.store.crash();
        // The cache of failed writes is gone with the process.
        self.relay.write_failed = false;
        self.relay.up = false;
        self.relay.hub = None;
        self.relay.inbox.clear();
        self.relay.in_flight.clear();
        let conns = std::mem::take(&mut self.relay.conns);
        for (conn, client) in conns {
            self.after(
                1,
                100,
                Action::Reset {
                    client,
                    conn,
                    dir: Direction::ToClient,
                },
            );
        }
        self.after(100, 5_000, Action::RestartRelay);
        Ok(())
    }

    fn restart_relay(&mut self) -> Result<(), String> {
        self.trace("restart-relay", 0, 0);
        // The room loads at the first input, as on the relay; loading it
        // now checks at once that nothing acknowledged was lost.
        self.relay.hub = Some(self.load_relay_hub()?);
        self.relay.up = true;
        self.plan_write_fault_relay();
        Ok(())
    }

    // ----- timers -----

    fn next_timer(&self) -> Option<u64> {
        let clients = self
            .clients
            .iter()
            .filter_map(|c| c.conn.as_ref()?.link.poll_timeout());
        let relay = self.relay.hub.as_ref().and_then(RoomHub::poll_timeout);
        clients.chain(relay).min()
    }

    fn fire_timers(&mut self) -> Result<(), String> {
        let now = self.now;
        for c in 0..self.clients.len() {
            let client = &mut self.clients[c];
            let (Some(cc), Some(room)) = (client.conn.as_mut(), client.room.as_mut()) else {
                continue;
            };
            if cc.link.poll_timeout().is_some_and(|t| t <= now) {
                cc.link.handle_timeout(now, room);
                self.client_events(c)?;
            }
        }
        if let Some(hub) = self.relay.hub.as_mut()
            && hub.poll_timeout().is_some_and(|t| t <= now)
        {
            hub.handle_timeout(now);
            self.relay_output();
        }
        Ok(())
    }

    // ----- the end -----

    /// Nothing in flight, everyone up, connected, caught up and with an
    /// empty outbox, every session settled.
    fn is_quiet(&self) -> Result<bool, String> {
        if !self.queue.is_empty()
            || !self.relay.up
            || !self.relay.inbox.is_empty()
            || !self.relay.hub.as_ref().is_some_and(RoomHub::is_settled)
        {
            return Ok(false);
        }
        for client in &self.clients {
            let (Some(room), Some(cc)) = (&client.room, &client.conn) else {
                return Ok(false);
            };
            if !cc.link.session().is_settled() {
                return Ok(false);
            }
            if room.outbox_len() > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// What is still going on, for a run that does not settle.
    fn describe(&self) -> String {
        let clients: Vec<String> = self
            .clients
            .iter()
            .enumerate()
            .map(|(c, client)| {
                format!(
                    "client {c}: up {}, connected {}, settled {}, outbox {}",
                    client.room.is_some(),
                    client.conn.is_some(),
                    client
                        .conn
                        .as_ref()
                        .is_some_and(|cc| cc.link.session().is_settled()),
                    client.room.as_ref().map_or(0, |r| r.outbox_len())
                )
            })
            .collect();
        format!(
            "relay up {}, {} actions queued; {}",
            self.relay.up,
            self.queue.len(),
            clients.join("; ")
        )
    }

    fn check(&self) -> Result<(), String> {
        if let Some(refused) = &self.relay_refused {
            return Err(format!(
                "the relay refused an honest client's node: {refused}"
            ));
        }
        // What each replica would open from its store is what it holds.
        let replicas = self
            .clients
            .iter()
            .map(|c| (&c.store, &c.key, &c.room))
            .map(|(store, key, room)| (store, key, room.as_ref()))
            .chain([(
                &self.relay.store,
                &self.relay.key,
                self.relay.hub.as_ref().map(RoomHub::room),
            )]);
        for (r, (store, key, live)) in replicas.enumerate() {
            let Some(live) = live else { continue };
            let reopened = open_room(
                store,
                key,
                &self.room_id,
                self.checkpoint_every,
                self.relay.key.author(),
            )
            .map_err(|e| format!("replica {r} cannot reopen: {e}"))?;
            check_reopened(store, &reopened).map_err(|e| format!("replica {r}: {e}"))?;
            if reopened.room().state_hash() != live.room().state_hash() {
                return Err(format!(
                    "replica {r} reopens to another state than it holds"
                ));
            }
        }
        let relay = self
            .relay
            .hub
            .as_ref()
            .ok_or("the relay is down")?
            .room()
            .room();
        let ids = |room: &syncline_core::Room| -> Vec<NodeId> {
            let dag = room.dag();
            let mut ids: Vec<NodeId> = (0..dag.next_idx()).map(|i| dag.id(i)).collect();
            ids.sort_unstable();
            ids
        };
        let relay_ids = ids(relay);
        if self.locked {
            // No unauthorized node anywhere: a fresh replica that checks
            // write authority takes every node the relay holds.
            let mut relay_room = self
                .relay
                .hub
                .as_ref()
                .ok_or("the relay is down")?
                .room()
                .room()
                .clone();
            let all: Vec<_> = (0..relay_room.dag().next_idx()).collect();
            let pack = relay_room
                .pack(&all, None)
                .map_err(|e| format!("cannot export the relay's history: {e}"))?;
            let mut fresh = syncline_core::Room::new(self.room_id.clone());
            fresh.govern(vec![self.relay.key.author()]);
            fresh
                .receive_pack(&pack)
                .map_err(|e| format!("a fresh replica refuses the relay's history: {e}"))?;
            if fresh.dag().len() != relay.dag().len() {
                return Err("a fresh replica holds less than the relay".into());
            }
        }
        if relay.dag().pending_len() != 0 {
            return Err(format!(
                "the relay has {} nodes still waiting for parents",
                relay.dag().pending_len()
            ));
        }
        let on_relay = relay.dag().id_index();
        if let Some(lost) = self.acked.iter().find(|id| !on_relay.contains_key(id)) {
            return Err(format!("acknowledged node {lost:?} is not on the relay"));
        }
        for (c, client) in self.clients.iter().enumerate() {
            let room = client
                .room
                .as_ref()
                .ok_or(format!("client {c} is down"))?
                .room();
            if let Some(lost) = client
                .committed
                .iter()
                .find(|id| !on_relay.contains_key(id))
            {
                return Err(format!(
                    "client {c}'s committed node {lost:?} never reached the relay"
                ));
            }
            if room.dag().pending_len() != 0 {
                return Err(format!(
                    "client {c} has {} nodes still waiting for parents",
                    room.dag().pending_len()
                ));
            }
            if ids(room) != relay_ids {
                return Err(format!(
                    "client {c} holds {} nodes, the relay {}: the node sets differ",
                    room.dag().len(),
                    relay.dag().len()
                ));
            }
            if room.state_hash() != relay.state_hash() {
                return Err(format!("client {c}'s state hash differs from the relay's"));
            }
        }
        Ok(())
    }
}

/// A room opened from `store` (from its checkpoint, if it has one) holds
/// what replaying the stored history gives: the checkpoint is a faithful
/// cache.
fn check_reopened(store: &FaultyStore, room: &DurableRoom) -> Result<(), String> {
    if let Some(refused) = &room.opened().checkpoint_refused {
        return Err(format!("its checkpoint was refused: {refused}"));
    }
    let stored = store
        .load(room.room().id())
        .map_err(|e| format!("cannot load its store: {e}"))?;
    let replayed = syncline_core::Room::from_segments(room.room().id().clone(), stored.segments)
        .map_err(|e| format!("its stored history does not replay: {e}"))?;
    if replayed.state_hash() != room.room().state_hash() {
        return Err(format!(
            "opened from a checkpoint of {} nodes, it differs from a replay of its history",
            room.opened().from_checkpoint
        ));
    }
    if replayed.dag().heads() != room.room().dag().heads() {
        return Err("its heads differ from a replay of its history".into());
    }
    Ok(())
}

/// Connection `conn`'s challenge, as the relay's first frame would carry
/// it: distinct per connection, and derived rather than drawn so that the
/// seed's random stream is the same with or without it.
fn challenge(conn: u64) -> [u8; 32] {
    let mut nonce = [0x5a; 32];
    nonce[..8].copy_from_slice(&conn.to_le_bytes());
    nonce
}
