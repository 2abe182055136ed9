//! Sessions on an in-memory pair (quinn-proto's `Pair::drive` habit): frames
//! move between client and server sessions until nothing is left to send;
//! no sockets, no sleeps, time is a number.

use syncline_core::auth::Access;
use syncline_core::proto::message::{Envelope, Message, PROTOCOL_VERSION, Reason};
use syncline_core::proto::session::{Config, Credentials, Event, Session};
use syncline_core::{Keypair, NodeIdx, Room, RoomId, Value};

fn room_id() -> RoomId {
    RoomId::new("session-test").unwrap()
}

struct Client {
    room: Room,
    key: Keypair,
    session: Session,
    events: Vec<Event>,
}

/// A server room with one session per client.
struct World {
    server: Room,
    sessions: Vec<Session>,
    server_events: Vec<Event>,
    clients: Vec<Client>,
    now: u64,
    /// Type codes of every frame that crossed, in order.
    seen: Vec<u64>,
}

impl World {
    fn new(server: Room, rooms: Vec<(Room, Keypair)>, config: Config) -> World {
        let now = 1_000;
        let mut sessions = Vec::new();
        let mut clients = Vec::new();
        for (i, (mut room, key)) in rooms.into_iter().enumerate() {
            let session = Session::client(
                now,
                i as u64,
                &mut room,
                &key,
                config.clone(),
                &Credentials::default(),
            );
            clients.push(Client {
                room,
                key,
                session,
                events: Vec::new(),
            });
            sessions.push(Session::server(
                now,
                i as u64,
                room_id(),
                config.clone(),
                Access::full(),
            ));
        }
        World {
            server,
            sessions,
            server_events: Vec::new(),
            clients,
            now,
            seen: Vec::new(),
        }
    }

    /// Moves frames and handles events until everything is quiet. The
    /// driver acknowledges accepted nodes at once (memory is its "disk")
    /// and the server relays them to its other sessions.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.clients.len() {
                while let Some(f) = self.clients[i].session.poll_transmit() {
                    moved = true;
                    self.seen
                        .push(Envelope::decode(&f).unwrap().message.type_code());
                    self.sessions[i].handle_input(self.now, &f, &mut self.server, None);
                }
                while let Some(f) = self.sessions[i].poll_transmit() {
                    moved = true;
                    self.seen
                        .push(Envelope::decode(&f).unwrap().message.type_code());
                    let c = &mut self.clients[i];
                    c.session
                        .handle_input(self.now, &f, &mut c.room, Some(&c.key));
                }
                while let Some(e) = self.sessions[i].poll_event() {
                    moved = true;
                    if let Event::Accepted { corr, nodes } = &e {
                        self.sessions[i].acknowledge(self.now, *corr, &self.server);
                        for j in 0..self.sessions.len() {
                            if j != i {
                                self.sessions[j].send_nodes(
                                    self.now,
                                    &mut self.server,
                                    nodes,
                                    None,
                                );
                            }
                        }
                    }
                    self.server_events.push(e);
                }
                let c = &mut self.clients[i];
                while let Some(e) = c.session.poll_event() {
                    moved = true;
                    if let Event::Accepted { corr, .. } = &e {
                        c.session.acknowledge(self.now, *corr, &c.room);
                    }
                    c.events.push(e);
                }
            }
            // Queued packs go out through the timer, as a driver's would.
            for i in 0..self.clients.len() {
                if self.sessions[i]
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
                {
                    self.sessions[i].handle_timeout(self.now, &mut self.server, None);
                    moved = true;
                }
                let c = &mut self.clients[i];
                if c.session.poll_timeout().is_some_and(|t| t <= self.now) {
                    c.session
                        .handle_timeout(self.now, &mut c.room, Some(&c.key));
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn commit(&mut self, i: usize, path: &str, v: i64) -> NodeIdx {
        self.now += 1;
        let c = &mut self.clients[i];
        let mut tx = c.room.begin(c.key.author(), self.now);
        tx.set(path, "v", Value::Int(v)).unwrap();
        let idx = tx.commit().unwrap().unwrap().idx;
        c.session
            .send_nodes(self.now, &mut c.room, &[idx], Some(&c.key));
        idx
    }
}

/// `n` nodes written by `key`, as a server holds them: received in a signed
/// pack (a server never writes nodes itself).
fn history(key: &Keypair, n: i64) -> Room {
    let mut author = Room::new(room_id());
    for i in 0..n {
        let mut tx = author.begin(key.author(), i as u64);
        tx.set(&format!("/n/{}", i % 13), "v", Value::Int(i))
            .unwrap();
        tx.text_insert("/t", 0, "x").unwrap();
        tx.commit().unwrap();
    }
    let all = author.dag().causal_order();
    let pack = author.pack(&all, Some(key)).unwrap();
    let mut held = Room::new(room_id());
    held.receive_pack(&pack).unwrap();
    held
}

fn small_packs() -> Config {
    Config {
        max_pack_nodes: 7,
        ..Config::default()
    }
}

#[test]
fn a_fresh_client_catches_up_in_chunks() {
    // Written live, one signed pack per edit, so the server can cut the
    // history anywhere (a history signed only at its end goes whole).
    let mut server = Room::new(room_id());
    for pack in writes_under(&Keypair::from_seed([9; 32]), "/n", 40) {
        server.receive_pack(&pack).unwrap();
    }
    let mut w = World::new(
        server,
        vec![(Room::new(room_id()), Keypair::from_seed([1; 32]))],
        small_packs(),
    );
    w.drive();
    let c = &w.clients[0];
    assert_eq!(c.room.state_hash(), w.server.state_hash());
    assert!(c.events.contains(&Event::Connected));
    assert!(c.events.contains(&Event::CaughtUp));
    let packs = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::Accepted { .. }))
        .count();
    assert_eq!(packs, 40_usize.div_ceil(7));
}

#[test]
fn catch_up_goes_after_welcome_and_is_clocked_by_acknowledgements() {
    let mut server = Room::new(room_id());
    for pack in writes_under(&Keypair::from_seed([9; 32]), "/n", 600) {
        server.receive_pack(&pack).unwrap();
    }
    let config = Config {
        max_pack_nodes: 50,
        send_window_packs: 2,
        ..Config::default()
    };
    let key = Keypair::from_seed([1; 32]);
    let mut room = Room::new(room_id());
    let mut client = Session::client(
        0,
        1,
        &mut room,
        &key,
        config.clone(),
        &Credentials::default(),
    );
    let mut session = Session::server(0, 1, room_id(), config, Access::full());
    let hello = client.poll_transmit().unwrap();
    session.handle_input(0, &hello, &mut server, None);
    // The welcome alone: nothing is exported before the driver has sent it.
    let welcome = session.poll_transmit().unwrap();
    assert!(matches!(
        Envelope::decode(&welcome).unwrap().message,
        Message::Welcome { .. }
    ));
    assert!(session.poll_transmit().is_none());
    let mut pending = vec![welcome];
    let (mut delivered, mut most_in_flight) = (0, 0);
    loop {
        // The driver's timer: one pack per call while the window has room.
        while session.poll_timeout().is_some_and(|t| t == 0) {
            session.handle_timeout(0, &mut server, None);
        }
        pending.extend(std::iter::from_fn(|| session.poll_transmit()));
        if pending.is_empty() {
            break;
        }
        // Packs sent and not yet acknowledged never exceed the window.
        let packs = pending
            .iter()
            .filter(|f| matches!(Envelope::decode(f).unwrap().message, Message::Pack { .. }))
            .count();
        most_in_flight = most_in_flight.max(packs);
        for f in std::mem::take(&mut pending) {
            client.handle_input(0, &f, &mut room, Some(&key));
        }
        while let Some(e) = client.poll_event() {
            if let Event::Accepted { corr, nodes } = e {
                delivered += nodes.len();
                client.acknowledge(0, corr, &room);
            }
        }
        let acks: Vec<Vec<u8>> = std::iter::from_fn(|| client.poll_transmit()).collect();
        for f in acks {
            session.handle_input(0, &f, &mut server, None);
        }
    }
    assert_eq!(delivered, 600);
    assert_eq!(
        most_in_flight, 2,
        "the window of two packs was used, not passed"
    );
    assert_eq!(room.state_hash(), server.state_hash());
    assert_eq!(client.catchup_remaining(), 0);
    assert!(session.is_settled());
    assert_eq!(session.nodes_sent(), (600, 600), "each node exported once");
}

#[test]
fn nothing_missing_means_no_catch_up_and_immediate_caught_up() {
    let key = Keypair::from_seed([9; 32]);
    let server = history(&key, 5);
    let client = history(&key, 5);
    let mut w = World::new(
        server,
        vec![(client, Keypair::from_seed([1; 32]))],
        Config::default(),
    );
    w.drive();
    let c = &w.clients[0];
    assert!(c.events.contains(&Event::CaughtUp));
    assert!(!c.events.iter().any(|e| matches!(e, Event::Accepted { .. })));
}

#[test]
fn offline_edits_upload_and_live_edits_relay_between_clients() {
    let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
    let mut offline = Room::new(room_id());
    for i in 0..12 {
        let mut tx = offline.begin(ka.author(), i);
        tx.set("/offline", "v", Value::Int(i as i64)).unwrap();
        tx.commit().unwrap();
    }
    let mut w = World::new(
        history(&Keypair::from_seed([9; 32]), 10),
        vec![(offline, ka), (Room::new(room_id()), kb)],
        small_packs(),
    );
    w.drive();
    assert_eq!(w.clients[0].room.state_hash(), w.server.state_hash());
    assert_eq!(w.clients[1].room.state_hash(), w.server.state_hash());
    // Every uploaded node was acknowledged.
    let acked: usize = w.clients[0]
        .events
        .iter()
        .map(|e| match e {
            Event::Acknowledged { nodes } => nodes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(acked, 12);
    for i in 0..20 {
        w.commit(i % 2, &format!("/live/{i}"), i as i64);
        w.drive();
    }
    let hash = w.server.state_hash();
    assert!(w.clients.iter().all(|c| c.room.state_hash() == hash));
}

#[test]
fn timers_send_heartbeats_and_close_idle_and_silent_sessions() {
    let mut w = World::new(
        Room::new(room_id()),
        vec![(Room::new(room_id()), Keypair::from_seed([1; 32]))],
        Config::default(),
    );
    w.drive();
    let client = &mut w.clients[0];
    let (c, room, key) = (&mut client.session, &mut client.room, &client.key);
    let at = c.poll_timeout().unwrap();
    assert_eq!(at, 1_000 + 20_000, "heartbeat first");
    c.handle_timeout(at, room, Some(key));
    let frame = c.poll_transmit().unwrap();
    assert_eq!(
        Envelope::decode(&frame).unwrap().message,
        Message::Heartbeat
    );
    c.handle_timeout(1_000 + 60_000, room, Some(key));
    assert!(c.is_closed());
    assert!(matches!(
        c.poll_event(),
        Some(Event::Closed {
            reason: Reason::Timeout,
            by_peer: false,
            ..
        })
    ));

    let mut silent = Session::server(0, 7, room_id(), Config::default(), Access::full());
    silent.handle_timeout(9_999, &mut w.server, None);
    assert!(!silent.is_closed());
    silent.handle_timeout(10_000, &mut w.server, None);
    assert!(silent.is_closed());
}

#[test]
fn hostile_frames_close_only_their_session() {
    let mut server = Room::new(room_id());
    let mut s = Session::server(0, 1, room_id(), Config::default(), Access::full());
    s.handle_input(1, &[0xde, 0xad], &mut server, None);
    assert!(matches!(
        s.poll_event(),
        Some(Event::Closed {
            reason: Reason::Malformed,
            ..
        })
    ));

    // A forged pack: a node signed by someone else.
    let key = Keypair::from_seed([1; 32]);
    let mallory = Keypair::from_seed([6; 32]);
    let mut client = Room::new(room_id());
    let mut s = Session::server(0, 2, room_id(), Config::default(), Access::full());
    let mut c = Session::client(
        0,
        2,
        &mut client,
        &key,
        Config::default(),
        &Credentials::default(),
    );
    s.handle_input(0, &c.poll_transmit().unwrap(), &mut server, None);
    let mut tx = client.begin(key.author(), 5);
    tx.set("/x", "v", Value::Int(1)).unwrap();
    let idx = tx.commit().unwrap().unwrap().idx;
    // Mallory signs a node of `key`'s.
    let node = client.dag().node(idx);
    let forged = syncline_core::pack::encode(
        &room_id(),
        &[syncline_core::pack::RawNode {
            node,
            parent_refs: vec![],
        }],
        &[(0, mallory.sign(&client.dag().id(idx)))],
        3,
    );
    let frame = Envelope {
        version: PROTOCOL_VERSION,
        session: 2,
        corr: 1,
        message: Message::Pack {
            checksum: *blake3::hash(&forged).as_bytes(),
            pack: forged,
            phase: syncline_core::proto::message::Phase::Live,
            last: true,
        },
    }
    .encode();
    while s.poll_event().is_some() {}
    s.handle_input(1, &frame, &mut server, None);
    assert!(matches!(
        s.poll_event(),
        Some(Event::Closed {
            reason: Reason::InvalidNode,
            ..
        })
    ));
    assert_eq!(server.dag().len(), 0, "nothing of a forged pack is kept");

    // Optional messages (presence, unknown types >= 64) never close a session.
    let mut quiet = Session::server(0, 4, room_id(), Config::default(), Access::full());
    for message in [
        Message::Presence {
            peer: key.author(),
            client: 0,
            status: syncline_core::proto::message::PresenceStatus::Online,
            message: String::new(),
            data: vec![1],
        },
        Message::Unknown(99),
    ] {
        let frame = Envelope {
            version: PROTOCOL_VERSION,
            session: 4,
            corr: 0,
            message,
        }
        .encode();
        quiet.handle_input(0, &frame, &mut server, None);
    }
    assert!(!quiet.is_closed());

    // An unsupported version is rejected.
    let mut s = Session::server(0, 3, room_id(), Config::default(), Access::full());
    let hello = Envelope {
        version: PROTOCOL_VERSION,
        session: 3,
        corr: 0,
        message: Message::Hello {
            versions: (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2),
            peer: key.author(),
            room: room_id(),
            proof: None,
            token: None,
            caps: vec![],
            heads: vec![],
            vv: Default::default(),
            nodes: 0,
            state_hash: [0; 32],
            subscriptions: vec![],
            probe: vec![],
        },
    };
    s.handle_input(0, &hello.encode(), &mut server, None);
    let reply = Envelope::decode(&s.poll_transmit().unwrap()).unwrap();
    assert!(matches!(
        reply.message,
        Message::Reject {
            reason: Reason::VersionMismatch,
            ..
        }
    ));
    assert!(s.is_closed());
}

/// A server and a client that share 60 nodes, then the server gains 25
/// nodes of another writer and the client 9 of its own.
fn diverged_world(config: Config) -> World {
    let base_key = Keypair::from_seed([9; 32]);
    let mut server = history(&base_key, 60);
    let mut client = history(&base_key, 60);
    let writer = Keypair::from_seed([3; 32]);
    let mut extra = Room::new(room_id());
    let all = server.dag().causal_order();
    let pack = server.pack(&all, None).unwrap();
    extra.receive_pack(&pack).unwrap();
    for i in 0..25 {
        let mut tx = extra.begin(writer.author(), 100 + i);
        tx.set("/server-only", "v", Value::Int(i as i64)).unwrap();
        tx.commit().unwrap();
    }
    let news = extra
        .dag()
        .missing_for_version_vector(&server.dag().version_vector());
    let pack = extra.pack(&news, Some(&writer)).unwrap();
    server.receive_pack(&pack).unwrap();
    let ck = Keypair::from_seed([1; 32]);
    for i in 0..9 {
        let mut tx = client.begin(ck.author(), 200 + i);
        tx.set("/client-only", "v", Value::Int(i as i64)).unwrap();
        tx.commit().unwrap();
    }
    World::new(server, vec![(client, ck)], config)
}

fn acked(c: &Client) -> usize {
    c.events
        .iter()
        .map(|e| match e {
            Event::Acknowledged { nodes } => nodes.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn clients_with_many_authors_reconcile_with_riblt() {
    // Any version vector counts as "many authors" here.
    let config = Config {
        vv_inline_limit: 0,
        ..small_packs()
    };
    let mut w = diverged_world(config);
    w.drive();
    let c = &w.clients[0];
    assert_eq!(c.room.state_hash(), w.server.state_hash());
    assert!(c.events.contains(&Event::CaughtUp));
    assert!(w.seen.contains(&7), "RIBLT symbols were sent");
    assert!(w.seen.contains(&9), "ibf-done was sent");
    assert_eq!(
        acked(c),
        9,
        "every node the server lacked was uploaded and acknowledged"
    );
}

#[test]
fn large_differences_reconcile_with_the_mst() {
    let config = Config {
        vv_inline_limit: 0,
        mst_above: 0,
        ..small_packs()
    };
    let mut w = diverged_world(config);
    w.drive();
    let c = &w.clients[0];
    assert_eq!(c.room.state_hash(), w.server.state_hash());
    assert!(c.events.contains(&Event::CaughtUp));
    for (code, name) in [(10, "mst-request"), (11, "mst-summary"), (12, "mst-done")] {
        assert!(w.seen.contains(&code), "{name} was sent");
    }
    assert!(!w.seen.contains(&7), "no RIBLT symbols");
    assert_eq!(acked(c), 9);
}

#[test]
fn an_interrupted_catch_up_resumes_with_only_the_rest() {
    use syncline_core::room::CHECKPOINT_INTERVAL;
    // A relay can cut another author's history only at nodes that author
    // signed (every CHECKPOINT_INTERVAL), so make the history longer.
    let total = 2 * CHECKPOINT_INTERVAL as usize + 100;
    let server_room = history(&Keypair::from_seed([9; 32]), total as i64);
    let key = Keypair::from_seed([1; 32]);
    let mut w = World::new(
        server_room,
        vec![(Room::new(room_id()), key.clone())],
        small_packs(),
    );
    // Deliver the hello, the welcome and only the first catch-up pack, then
    // drop the connection.
    let hello = w.clients[0].session.poll_transmit().unwrap();
    w.sessions[0].handle_input(w.now, &hello, &mut w.server, None);
    let welcome = w.sessions[0].poll_transmit().unwrap();
    // The first pack goes when the driver's timer calls.
    w.sessions[0].handle_timeout(w.now, &mut w.server, None);
    let first_pack = w.sessions[0].poll_transmit().unwrap();
    let c = &mut w.clients[0];
    c.session
        .handle_input(w.now, &welcome, &mut c.room, Some(&c.key));
    c.session
        .handle_input(w.now, &first_pack, &mut c.room, Some(&c.key));
    let kept = c.room.dag().len();
    // The first pack reaches out to the author's first signed node (see
    // `Room::export_pack`), well short of the whole history.
    assert!(
        (7..=CHECKPOINT_INTERVAL as usize).contains(&kept),
        "the first pack (to the first signed node) was imported: {kept}"
    );
    assert!(!c.events.contains(&Event::CaughtUp));
    // Reconnect with fresh sessions: only the rest travels.
    let room = std::mem::replace(&mut w.clients[0].room, Room::new(room_id()));
    let server = std::mem::replace(&mut w.server, Room::new(room_id()));
    let mut again = World::new(server, vec![(room, key)], small_packs());
    again.drive();
    let c = &again.clients[0];
    assert_eq!(c.room.state_hash(), again.server.state_hash());
    assert!(c.events.contains(&Event::CaughtUp));
    let resent: usize = c
        .events
        .iter()
        .map(|e| match e {
            Event::Accepted { nodes, .. } => nodes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(
        resent,
        total - kept,
        "nothing already imported was sent again"
    );
}

#[test]
fn an_unacknowledged_pack_closes_the_session_after_the_response_timeout() {
    let mut w = World::new(
        Room::new(room_id()),
        vec![(Room::new(room_id()), Keypair::from_seed([1; 32]))],
        Config::default(),
    );
    w.drive();
    w.commit(0, "/lost", 1);
    let sent_at = w.now;
    // The pack never arrives; heartbeats still would, but are no progress.
    let client = &mut w.clients[0];
    let (c, room, key) = (&mut client.session, &mut client.room, &client.key);
    assert!(c.poll_transmit().is_some());
    assert!(!c.is_settled());
    c.handle_timeout(sent_at + 20_000, room, Some(key));
    assert!(!c.is_closed(), "a heartbeat, not a close, at 20 s");
    assert_eq!(c.poll_timeout(), Some(sent_at + 30_000));
    c.handle_timeout(sent_at + 30_000, room, Some(key));
    assert!(c.is_closed());
    let closed = std::iter::from_fn(|| c.poll_event()).last();
    assert!(matches!(
        closed,
        Some(Event::Closed {
            reason: Reason::Timeout,
            by_peer: false,
            ..
        })
    ));
}

#[test]
fn a_reconnecting_client_learns_what_the_server_holds_when_an_ack_was_lost() {
    let key = Keypair::from_seed([1; 32]);
    let mut w = World::new(
        Room::new(room_id()),
        vec![(Room::new(room_id()), key.clone())],
        Config::default(),
    );
    w.drive();
    w.commit(0, "/a", 1);
    w.commit(0, "/b", 2);
    // The server stores both nodes, but its acks are lost with the
    // connection.
    while let Some(f) = w.clients[0].session.poll_transmit() {
        w.sessions[0].handle_input(w.now, &f, &mut w.server, None);
    }
    while let Some(e) = w.sessions[0].poll_event() {
        if let Event::Accepted { corr, .. } = e {
            w.sessions[0].acknowledge(w.now, corr, &w.server);
        }
    }
    while w.sessions[0].poll_transmit().is_some() {}
    assert_eq!(w.server.dag().len(), 2);
    // Reconnect: the difference shows the server holds both.
    let c = &mut w.clients[0];
    c.session = Session::client(
        w.now,
        1,
        &mut c.room,
        &key,
        Config::default(),
        &Credentials::default(),
    );
    c.events.clear();
    w.sessions[0] = Session::server(w.now, 1, room_id(), Config::default(), Access::full());
    w.drive();
    let c = &w.clients[0];
    assert!(c.events.contains(&Event::ServerHolds { through_seq: 2 }));
    assert!(c.session.is_settled());
    assert!(
        !w.server_events
            .iter()
            .any(|e| matches!(e, Event::Accepted { .. })),
        "nothing was uploaded again"
    );
}

/// `n` live edits by `key`, each setting a field under `dir`, as the packs
/// (one per edit, each signed) a server would have received.
fn writes_under(key: &Keypair, dir: &str, n: i64) -> Vec<Vec<u8>> {
    let mut room = Room::new(room_id());
    (0..n)
        .map(|i| {
            let mut tx = room.begin(key.author(), i as u64 + 1);
            tx.set(&format!("{dir}/item{}", i % 4), "v", Value::Int(i))
                .unwrap();
            let idx = tx.commit().unwrap().unwrap().idx;
            room.pack(&[idx], Some(key)).unwrap()
        })
        .collect()
}

#[test]
fn a_subscription_narrows_catch_up_and_relay_to_its_paths() {
    use syncline_core::proto::scope::Scope;
    let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
    let mut server = Room::new(room_id());
    // Two authors who never saw each other: one in alpha, one in beta.
    for pack in writes_under(&ka, "/projects/alpha", 10)
        .into_iter()
        .chain(writes_under(&kb, "/projects/beta", 10))
    {
        server.receive_pack(&pack).unwrap();
    }
    let reader = Keypair::from_seed([3; 32]);
    let writer = Keypair::from_seed([4; 32]);
    let mut w = World::new(
        server,
        vec![
            (Room::new(room_id()), reader.clone()),
            (Room::new(room_id()), writer),
        ],
        Config::default(),
    );
    let alpha = Scope::parse(&["/projects/alpha/**".to_owned()]).unwrap();
    let c = &mut w.clients[0];
    c.session = Session::client_scoped(
        w.now,
        0,
        &mut c.room,
        &reader,
        Config::default(),
        alpha,
        &Credentials::default(),
    );
    w.drive();

    // Catch-up: alpha's ten nodes, plus beta's first, whose create of
    // `/projects` places an ancestor of the scope; nothing else of beta.
    let c = &w.clients[0];
    assert!(c.events.contains(&Event::CaughtUp));
    assert_eq!(c.room.dag().len(), 11);
    assert_eq!(c.room.dag().author_seq(&ka.author()), 10);
    assert_eq!(c.room.dag().author_seq(&kb.author()), 1);
    let doc = c.room.doc();
    let item = doc.resolve("/projects/alpha/item1").unwrap();
    assert_eq!(doc.field(&item, "v"), Some(&Value::Int(9)));
    assert!(doc.resolve("/projects/beta/item1").is_err());

    // Live: the other client's beta edit is held back.
    let before = w.clients[0].room.dag().len();
    w.commit(1, "/projects/beta/live", 1);
    w.drive();
    assert_eq!(w.clients[0].room.dag().len(), before, "beta was relayed");

    // Widening the scope sends the rest, then confirms.
    let now = w.now;
    w.clients[0].session.subscribe(now, Scope::everything());
    w.drive();
    let c = &w.clients[0];
    assert!(c.events.contains(&Event::Subscribed { patterns: vec![] }));
    assert_eq!(c.room.dag().len(), w.server.dag().len());
    assert_eq!(c.room.state_hash(), w.server.state_hash());

    // Narrowed again: alpha edits are relayed, beta ones are not.
    let now = w.now;
    let alpha = Scope::parse(&["/projects/alpha/**".to_owned()]).unwrap();
    w.clients[0].session.subscribe(now, alpha);
    w.drive();
    let before = w.clients[0].room.dag().len();
    w.commit(1, "/projects/alpha/live", 2);
    w.drive();
    assert_eq!(w.clients[0].room.dag().len(), before + 1);
    w.commit(1, "/projects/beta/live", 3);
    w.drive();
    let c = &w.clients[0];
    assert_eq!(c.room.dag().len(), before + 1);
    let live = c.room.doc().resolve("/projects/alpha/live").unwrap();
    assert_eq!(c.room.doc().field(&live, "v"), Some(&Value::Int(2)));

    // An alpha edit by someone who saw the beta edit brings it along: a
    // scope never leaves a node without its parents.
    w.commit(1, "/projects/alpha/live", 4);
    w.drive();
    let c = &w.clients[0];
    assert_eq!(c.room.dag().len(), before + 3);
    assert_eq!(c.room.dag().pending_len(), 0);
    assert_eq!(c.room.state_hash(), w.server.state_hash());
}

#[test]
fn an_invalid_subscription_closes_the_session_as_malformed() {
    use syncline_core::proto::scope::Scope;
    let mut w = World::new(
        Room::new(room_id()),
        vec![(Room::new(room_id()), Keypair::from_seed([1; 32]))],
        Config::default(),
    );
    w.drive();
    // A hand-made frame: the client-side API refuses invalid patterns.
    assert!(Scope::parse(&["relative/path".to_owned()]).is_err());
    let frame = Envelope {
        version: PROTOCOL_VERSION,
        session: 0,
        corr: 0,
        message: Message::Subscribe {
            patterns: vec!["relative/path".to_owned()],
        },
    }
    .encode();
    w.sessions[0].handle_input(w.now, &frame, &mut w.server, None);
    assert!(w.sessions[0].is_closed());
    assert!(matches!(
        w.sessions[0].poll_event(),
        Some(Event::Closed {
            reason: Reason::Malformed,
            ..
        })
    ));
}

#[test]
fn a_client_with_more_heads_than_a_hello_lists_still_syncs() {
    // Writers that never saw each other: every one of their nodes is a
    // head, more than a hello may list (it lists the newest).
    let writers = syncline_core::proto::message::MAX_HEADS + 100;
    let mut client = Room::new(room_id());
    for i in 0..writers {
        let key = Keypair::from_seed(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes());
        let mut own = Room::new(room_id());
        let mut tx = own.begin(key.author(), 1);
        tx.set("/w", "v", Value::Int(i as i64)).unwrap();
        tx.commit().unwrap();
        let pack = own.pack(&own.dag().causal_order(), Some(&key)).unwrap();
        client.receive_pack(&pack).unwrap();
    }
    assert_eq!(client.dag().head_idxs().len(), writers);
    let mut w = World::new(
        Room::new(room_id()),
        vec![(client, Keypair::from_seed([1; 32]))],
        Config::default(),
    );
    w.drive();
    let c = &w.clients[0];
    assert!(!c.session.is_closed(), "the hello was accepted");
    assert_eq!(w.server.dag().len(), writers);
    assert_eq!(c.room.state_hash(), w.server.state_hash());
}
