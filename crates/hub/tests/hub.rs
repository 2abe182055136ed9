//! The relay core in memory: client links and a room hub wired directly,
//! frames handed across by the test as a driver would.

use std::sync::Arc;

use syncline_core::auth::Access;
use syncline_core::proto::message::{Envelope, Message, PresenceStatus, Reason};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config, Credentials, Event};
use syncline_core::{Keypair, RoomId, Value};
use syncline_hub::{ClientLink, End, HubConfig, HubEvent, Input, RoomHub, SessionKey};
use syncline_store::{DurableRoom, FaultPlan, FaultyStore, MemoryStore, Store};

fn room_id() -> RoomId {
    RoomId::new("hub-test").unwrap()
}

struct Client {
    room: DurableRoom,
    link: ClientLink,
    conn: u64,
    events: Vec<Event>,
    /// Presence frames it received.
    presence: Vec<Message>,
    /// Blob frames it received, with their `corr`.
    blobs: Vec<(u64, Message)>,
    /// Keep `error`s that name a message with the blob frames.
    capture_errors: bool,
    /// What the driver admits its `hello` with.
    access: Access,
}

impl Client {
    fn connect(seed: u8, conn: u64) -> Client {
        Client::with_access(seed, conn, Access::full())
    }

    fn with_access(seed: u8, conn: u64, access: Access) -> Client {
        let mut room = DurableRoom::load(
            Arc::new(MemoryStore::new()),
            Keypair::from_seed([seed; 32]),
            &room_id(),
        )
        .unwrap();
        let link = ClientLink::open(
            0,
            1,
            &mut room,
            Config::default(),
            Scope::everything(),
            &Credentials::default(),
        )
        .unwrap();
        Client {
            room,
            link,
            conn,
            events: Vec::new(),
            presence: Vec::new(),
            blobs: Vec::new(),
            capture_errors: false,
            access,
        }
    }

    /// A frame of this client's as the hub's driver feeds it: a `hello`
    /// with what it was admitted with.
    fn input(&self, frame: &[u8]) -> Input {
        let env = Box::new(Envelope::decode(frame).unwrap());
        match env.message {
            Message::Hello { .. } => Input::Hello {
                conn: self.conn,
                env,
                access: self.access.clone(),
            },
            _ => Input::Frame {
                conn: self.conn,
                env,
            },
        }
    }

    fn commit(&mut self, i: i64) {
        let c = self
            .room
            .transact(1_000 + i as u64, |tx| tx.set("/k", "v", Value::Int(i)))
            .unwrap()
            .unwrap();
        self.link.send_local(0, &mut self.room, &[c.idx]);
    }

    /// Hands the client a frame from the hub, keeping presence apart (as
    /// the SDK's engine does: sessions ignore it).
    fn receive(&mut self, now: u64, frame: &[u8]) {
        let env = Envelope::decode(frame).unwrap();
        match env.message {
            Message::Presence { .. } => {
                self.presence.push(env.message);
                return;
            }
            Message::BlobInfo { .. } | Message::BlobNeed { .. } | Message::BlobChunk { .. } => {
                self.blobs.push((env.corr, env.message));
                return;
            }
            // A blob test's refusals (the session never sees them).
            Message::Error { related, .. } if self.capture_errors && related != 0 => {
                self.blobs.push((env.corr, env.message));
                return;
            }
            _ => {}
        }
        self.link.handle_frame(now, &mut self.room, frame).unwrap();
        while let Some(e) = self.link.poll_event(now, &mut self.room).unwrap() {
            self.events.push(e);
        }
    }

    fn closed(&self) -> Option<Reason> {
        self.events.iter().find_map(|e| match e {
            Event::Closed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
    }
}

/// Moves frames both ways until nothing moves; returns the hub's events.
fn settle(hub: &mut RoomHub, clients: &mut [Client]) -> Vec<HubEvent> {
    let mut events = Vec::new();
    for _ in 0..100 {
        let mut moved = false;
        let mut inputs = Vec::new();
        for c in clients.iter_mut() {
            while let Some(frame) = c.link.poll_transmit() {
                inputs.push(c.input(&frame));
            }
        }
        if !inputs.is_empty() {
            moved = true;
            hub.handle_batch(0, inputs).unwrap();
        }
        // Everything happens at time 0: only sends that are due fire.
        if hub.poll_timeout() == Some(0) {
            moved = true;
            hub.handle_timeout(0);
        }
        for c in clients.iter_mut() {
            if c.link.poll_timeout() == Some(0) {
                moved = true;
                c.link.handle_timeout(0, &mut c.room);
            }
        }
        // Sync frames first, then blob bytes, as a driver writes them.
        while let Some((conn, frame)) = hub.poll_transmit().or_else(|| hub.poll_bulk()) {
            moved = true;
            let c = clients.iter_mut().find(|c| c.conn == conn).unwrap();
            c.receive(0, &frame);
        }
        events.extend(std::iter::from_fn(|| hub.poll_event()));
        if !moved {
            return events;
        }
    }
    panic!("the exchange did not settle");
}

fn hub(store: Arc<dyn syncline_store::Store>, config: HubConfig) -> RoomHub {
    let room = DurableRoom::load(store, Keypair::from_seed([9; 32]), &room_id()).unwrap();
    RoomHub::new(room, config, 0)
}

#[test]
fn a_hub_relays_persists_and_acknowledges() {
    let store = Arc::new(MemoryStore::new());
    let mut hub = hub(store.clone(), HubConfig::default());
    let mut clients = vec![Client::connect(1, 10), Client::connect(2, 20)];
    let events = settle(&mut hub, &mut clients);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, HubEvent::Connected { .. }))
            .count(),
        2
    );
    clients[0].commit(1);
    let events = settle(&mut hub, &mut clients);
    assert!(events.iter().any(|e| matches!(
        e,
        HubEvent::Inserted {
            key: SessionKey { conn: 10, .. },
            nodes: 1
        }
    )));
    assert_eq!(clients[0].room.outbox_len(), 0, "acknowledged");
    assert_eq!(
        clients[1].room.room().state_hash(),
        clients[0].room.room().state_hash(),
        "relayed"
    );
    // What was acknowledged is in the store.
    let reloaded = DurableRoom::load(store, Keypair::from_seed([9; 32]), &room_id()).unwrap();
    assert_eq!(
        reloaded.room().state_hash(),
        clients[0].room.room().state_hash()
    );
    // A connection that goes away takes its sessions with it.
    hub.handle_batch(0, [Input::Gone { conn: 20 }]).unwrap();
    let ended: Vec<HubEvent> = std::iter::from_fn(|| hub.poll_event()).collect();
    assert!(ended.iter().any(|e| matches!(
        e,
        HubEvent::Ended {
            end: End::Disconnected,
            ..
        }
    )));
    assert_eq!(hub.session_count(), 1);
}

#[test]
fn hubs_sharing_a_store_catch_up_with_each_other_and_relay_what_they_learn() {
    // Two servers of a fleet: one store, a hub each, a client on each.
    let store = Arc::new(MemoryStore::new());
    let (mut a, mut b) = (
        hub(store.clone(), HubConfig::default()),
        hub(store.clone(), HubConfig::default()),
    );
    let mut on_a = vec![Client::connect(1, 10)];
    let mut on_b = vec![Client::connect(2, 20)];
    settle(&mut a, &mut on_a);
    settle(&mut b, &mut on_b);
    on_a[0].commit(1);
    on_a[0].commit(2);
    settle(&mut a, &mut on_a);
    assert_eq!(on_a[0].room.outbox_len(), 0, "A stored and acknowledged");
    assert_eq!(
        b.catch_up(0).unwrap(),
        2,
        "B learns A's nodes from the store"
    );
    assert!(
        std::iter::from_fn(|| b.poll_event()).any(|e| matches!(e, HubEvent::Learned { nodes: 2 }))
    );
    settle(&mut b, &mut on_b);
    assert_eq!(
        on_b[0].room.room().state_hash(),
        on_a[0].room.room().state_hash(),
        "B relayed them to its session"
    );
    assert_eq!(b.catch_up(0).unwrap(), 0, "nothing new");
    // And back: B appends after what it learned; A catches up.
    on_b[0].commit(3);
    settle(&mut b, &mut on_b);
    assert_eq!(on_b[0].room.outbox_len(), 0, "B stored and acknowledged");
    assert_eq!(a.catch_up(0).unwrap(), 1);
    settle(&mut a, &mut on_a);
    assert_eq!(
        on_a[0].room.room().state_hash(),
        on_b[0].room.room().state_hash()
    );
    assert_eq!(store.node_count(&room_id()).unwrap(), 3);
    // Marked behind, a hub's next batch catches up before it steps: its
    // own append then continues what the other stored.
    on_b[0].commit(4);
    settle(&mut b, &mut on_b);
    a.mark_behind();
    on_a[0].commit(5);
    settle(&mut a, &mut on_a);
    assert_eq!(on_a[0].room.outbox_len(), 0, "A stored and acknowledged");
    assert_eq!(store.node_count(&room_id()).unwrap(), 5);
    assert_eq!(a.room().stored(), 5);
}

#[test]
fn past_its_quota_a_room_refuses_packs_and_still_serves_reads() {
    let config = HubConfig {
        max_room_bytes: 1,
        ..HubConfig::default()
    };
    let mut hub = hub(Arc::new(MemoryStore::new()), config);
    let mut clients = vec![Client::connect(1, 10)];
    settle(&mut hub, &mut clients);
    clients[0].commit(1);
    settle(&mut hub, &mut clients);
    assert!(hub.room_bytes() >= 1, "the first pack was stored");
    clients[0].commit(2);
    settle(&mut hub, &mut clients);
    assert_eq!(clients[0].closed(), Some(Reason::QuotaExceeded));
    assert_eq!(hub.room().room().dag().len(), 1);
    // A reader still catches up.
    let mut reader = vec![Client::connect(3, 30)];
    settle(&mut hub, &mut reader);
    assert_eq!(reader[0].room.room().dag().len(), 1);
    assert_eq!(reader[0].closed(), None);
}

#[test]
fn a_storage_failure_closes_every_session_and_acknowledges_nothing() {
    let store = FaultyStore::new(FaultPlan::default());
    let mut hub = hub(Arc::new(store.clone()), HubConfig::default());
    let mut clients = vec![Client::connect(1, 10), Client::connect(2, 20)];
    settle(&mut hub, &mut clients);
    store.set_plan(FaultPlan {
        fail_after_writes: Some(0),
        seed: 1,
    });
    clients[0].commit(1);
    let frames: Vec<Vec<u8>> = std::iter::from_fn(|| clients[0].link.poll_transmit()).collect();
    let inputs = frames.iter().map(|f| Input::Frame {
        conn: 10,
        env: Box::new(Envelope::decode(f).unwrap()),
    });
    assert!(hub.handle_batch(0, inputs).is_err());
    let mut closes = 0;
    while let Some((conn, frame)) = hub.poll_transmit() {
        let c = clients.iter_mut().find(|c| c.conn == conn).unwrap();
        c.link.handle_frame(0, &mut c.room, &frame).unwrap();
        while let Some(e) = c.link.poll_event(0, &mut c.room).unwrap() {
            closes += usize::from(matches!(
                e,
                Event::Closed {
                    reason: Reason::Overloaded,
                    ..
                }
            ));
            assert!(!matches!(
                e,
                Event::Acknowledged { .. } | Event::ServerHolds { .. }
            ));
        }
    }
    assert_eq!(closes, 2, "both sessions are told");
    assert_eq!(clients[0].room.outbox_len(), 1, "nothing was acknowledged");
}

#[test]
fn a_read_only_session_reads_and_its_packs_are_refused() {
    let store = Arc::new(MemoryStore::new());
    let mut hub = hub(store, HubConfig::default());
    let read_only = Access {
        write: None,
        ..Access::full()
    };
    let mut clients = vec![
        Client::connect(1, 10),
        Client::with_access(2, 20, read_only),
    ];
    settle(&mut hub, &mut clients);
    assert!(
        !clients[1].link.session().may_write(),
        "the welcome said so"
    );
    clients[0].commit(1);
    settle(&mut hub, &mut clients);
    assert_eq!(clients[1].room.room().dag().len(), 1, "a reader reads");

    // The reader's own commit is not even sent: it stays in its outbox.
    clients[1].commit(2);
    settle(&mut hub, &mut clients);
    assert_eq!(clients[1].room.outbox_len(), 1);
    assert_eq!(hub.room().room().dag().len(), 1);

    // A pack pushed anyway (a client that ignores the welcome) is refused
    // with `unauthorized`; nothing is stored or relayed; the session goes
    // on.
    let mut rogue = Client::with_access(
        3,
        30,
        Access {
            write: None,
            ..Access::full()
        },
    );
    rogue.commit(3);
    let pack = rogue.room.export_pack(&[0]).unwrap();
    let mut frames: Vec<Vec<u8>> = std::iter::from_fn(|| rogue.link.poll_transmit()).collect();
    frames.push(
        Envelope {
            version: syncline_core::proto::message::PROTOCOL_VERSION,
            session: 1,
            corr: 99,
            message: Message::Pack {
                checksum: *blake3::hash(&pack).as_bytes(),
                pack,
                phase: syncline_core::proto::message::Phase::Live,
                last: true,
            },
        }
        .encode(),
    );
    let inputs: Vec<Input> = frames.iter().map(|f| rogue.input(f)).collect();
    hub.handle_batch(0, inputs).unwrap();
    let mut refused = false;
    while let Some((conn, frame)) = hub.poll_transmit() {
        if conn != 30 {
            continue;
        }
        if let Message::Error { code, related, .. } = Envelope::decode(&frame).unwrap().message {
            assert_eq!((code, related), (Reason::Unauthorized, 99));
            refused = true;
        }
    }
    assert!(refused, "the pack was refused unauthorized");
    assert_eq!(hub.room().room().dag().len(), 1, "nothing stored");
    assert_eq!(hub.session_count(), 3, "the session goes on");
}

#[test]
fn an_expiring_or_revoked_capability_closes_its_session() {
    let mut hub = hub(Arc::new(MemoryStore::new()), HubConfig::default());
    let expiring = Access {
        expires_at: Some(5_000),
        chain: vec![[1; 16]],
        ..Access::full()
    };
    let revocable = Access {
        chain: vec![[7; 16], [2; 16]],
        ..Access::full()
    };
    let mut clients = vec![
        Client::with_access(1, 10, expiring),
        Client::with_access(2, 20, revocable),
        Client::connect(3, 30),
    ];
    settle(&mut hub, &mut clients);
    assert!(
        hub.poll_timeout().is_some_and(|t| t <= 5_000),
        "the expiry is a timer"
    );
    hub.handle_timeout(5_000);
    assert_eq!(hub.revoke(5_000, &[2; 16]), 1);
    settle_at(&mut hub, &mut clients);
    assert_eq!(clients[0].closed(), Some(Reason::TokenExpired));
    assert_eq!(clients[1].closed(), Some(Reason::Unauthorized));
    assert_eq!(clients[2].closed(), None, "an open-room session goes on");
}

#[test]
fn a_hello_the_driver_did_not_admit_is_refused() {
    let mut hub = hub(Arc::new(MemoryStore::new()), HubConfig::default());
    let mut c = Client::connect(1, 10);
    let hello = c.link.poll_transmit().unwrap();
    let input = Input::Frame {
        conn: 10,
        env: Box::new(Envelope::decode(&hello).unwrap()),
    };
    hub.handle_batch(0, [input]).unwrap();
    let (_, frame) = hub.poll_transmit().unwrap();
    c.link.handle_frame(0, &mut c.room, &frame).unwrap();
    assert_eq!(hub.session_count(), 0);
    assert!(matches!(
        Envelope::decode(&frame).unwrap().message,
        Message::Close {
            reason: Reason::Unauthorized,
            ..
        }
    ));
}

/// Hands the hub's pending frames to the clients.
fn settle_at(hub: &mut RoomHub, clients: &mut [Client]) {
    while let Some((conn, frame)) = hub.poll_transmit().or_else(|| hub.poll_bulk()) {
        let c = clients.iter_mut().find(|c| c.conn == conn).unwrap();
        c.receive(5_000, &frame);
    }
}

/// The presence frames `client` received: (peer seed byte, status, message).
fn shown(client: &Client) -> Vec<(u8, PresenceStatus, String)> {
    client
        .presence
        .iter()
        .map(|m| match m {
            Message::Presence {
                peer,
                status,
                message,
                ..
            } => (
                (0..=255u8)
                    .find(|s| Keypair::from_seed([*s; 32]).author() == *peer)
                    .unwrap(),
                *status,
                message.clone(),
            ),
            _ => unreachable!("only presence is kept"),
        })
        .collect()
}

#[test]
fn presence_is_relayed_shown_to_newcomers_limited_and_ends_with_its_session() {
    let mut hub = hub(Arc::new(MemoryStore::new()), HubConfig::default());
    let mut clients = vec![Client::connect(1, 10), Client::connect(2, 20)];
    settle(&mut hub, &mut clients);
    clients[0]
        .link
        .send_presence(0, PresenceStatus::Online, "hi", b"cursor 3");
    settle(&mut hub, &mut clients);
    assert_eq!(
        shown(&clients[1]),
        [(1, PresenceStatus::Online, "hi".into())]
    );
    assert!(
        clients[0].presence.is_empty(),
        "a session is not told its own"
    );
    // A newcomer hears who is here.
    clients.push(Client::connect(3, 30));
    settle(&mut hub, &mut clients);
    assert_eq!(
        shown(&clients[2]),
        [(1, PresenceStatus::Online, "hi".into())]
    );
    // A flood: past the burst, updates are refused and dropped.
    for i in 0..20 {
        clients[0]
            .link
            .send_presence(0, PresenceStatus::Busy, &format!("{i}"), &[]);
    }
    let events = settle(&mut hub, &mut clients);
    let refused = events
        .iter()
        .filter(|e| matches!(e, HubEvent::PresenceRefused { .. }))
        .count();
    assert_eq!(refused, 11, "a burst of 10, one spent already");
    assert_eq!(shown(&clients[1]).len(), 1 + 9);
    assert!(clients[0].events.iter().any(|e| matches!(
        e,
        Event::PeerError {
            code: Reason::RateLimited,
            ..
        }
    )));
    assert!(clients[0].closed().is_none(), "the session goes on");
    // Its connection goes: the others hear it leave.
    hub.handle_batch(0, [Input::Gone { conn: 10 }]).unwrap();
    settle(&mut hub, &mut clients);
    for c in &clients[1..] {
        assert_eq!(
            shown(c).last().map(|(who, status, _)| (*who, *status)),
            Some((1, PresenceStatus::Offline))
        );
    }
    // A session that never showed presence leaves silently.
    let before = shown(&clients[2]).len();
    hub.handle_batch(0, [Input::Gone { conn: 20 }]).unwrap();
    settle(&mut hub, &mut clients);
    assert_eq!(shown(&clients[2]).len(), before);
}

#[test]
fn presence_ends_when_its_session_stops_sending_heartbeats() {
    let mut hub = hub(Arc::new(MemoryStore::new()), HubConfig::default());
    let mut clients = vec![Client::connect(1, 10), Client::connect(2, 20)];
    settle(&mut hub, &mut clients);
    clients[0]
        .link
        .send_presence(0, PresenceStatus::Away, "brb", &[]);
    settle(&mut hub, &mut clients);
    assert_eq!(shown(&clients[1]).len(), 1);
    // A minute and more passes: only the second client's heartbeats go
    // out (the first went silent without a goodbye).
    let idle = syncline_core::proto::session::Config::default().idle_timeout_ms;
    let mut ended = Vec::new();
    for now in (1..=idle / 1000 + 5).map(|s| s * 1000) {
        let c = &mut clients[1];
        c.link.handle_timeout(now, &mut c.room);
        let frames: Vec<Vec<u8>> = std::iter::from_fn(|| c.link.poll_transmit()).collect();
        let inputs: Vec<Input> = frames.iter().map(|f| c.input(f)).collect();
        hub.handle_batch(now, inputs).unwrap();
        if hub.poll_timeout().is_some_and(|t| t <= now) {
            hub.handle_timeout(now);
        }
        while let Some((conn, frame)) = hub.poll_transmit() {
            let c = clients.iter_mut().find(|c| c.conn == conn).unwrap();
            c.receive(now, &frame);
        }
        ended.extend(
            std::iter::from_fn(|| hub.poll_event()).filter_map(|e| match e {
                HubEvent::Ended { key, end, .. } => Some((key.conn, end)),
                _ => None,
            }),
        );
    }
    assert_eq!(ended.len(), 1, "only the silent session ended: {ended:?}");
    assert_eq!(ended[0].0, 10);
    assert_eq!(
        shown(&clients[1])
            .last()
            .map(|(who, status, _)| (*who, *status)),
        Some((1, PresenceStatus::Offline)),
        "the others hear it leave"
    );
}

/// Sends `message` on client `c`'s session with correlation id `corr`.
fn send(hub: &mut RoomHub, c: &Client, corr: u64, message: Message) {
    let env = Box::new(Envelope {
        version: syncline_core::proto::message::PROTOCOL_VERSION,
        session: 1,
        corr,
        message,
    });
    hub.handle_batch(0, [Input::Frame { conn: c.conn, env }])
        .unwrap();
}

#[test]
fn blobs_upload_checked_and_download_in_windows_within_room_rights() {
    use syncline_core::blob::transfer::{Download, Upload};
    use syncline_core::blob::{GROUP_BYTES, Outboard, group_range};
    use syncline_store::{BlobStore, BlobStoreOptions};

    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(BlobStore::open(dir.path(), BlobStoreOptions::default()).unwrap());
    let mut hub = hub(Arc::new(MemoryStore::new()), HubConfig::default());
    hub.set_blob_store(blobs.clone(), None);
    let read_only = Access {
        write: None,
        ..Access::full()
    };
    let mut clients = vec![
        Client::connect(1, 10),
        Client::with_access(2, 20, read_only),
    ];
    settle(&mut hub, &mut clients);
    for c in &mut clients {
        c.capture_errors = true;
    }
    let data: Vec<u8> = (0..10 * GROUP_BYTES + 5).map(|i| (i % 253) as u8).collect();
    let (hash, outboard) = Outboard::of(&data);
    let group = |i: u64| {
        let r = group_range(data.len() as u64, i);
        data[r.start as usize..r.end as usize].to_vec()
    };
    let need_of = |m: &Message| match m {
        Message::BlobNeed { ranges, .. } => ranges.clone(),
        other => panic!("not a blob-need: {other:?}"),
    };
    // Upload: a window at a time, each batch answered with what is lacking.
    send(
        &mut hub,
        &clients[0],
        0,
        Message::BlobPut {
            hash,
            outboard: outboard.encode(),
        },
    );
    settle_at(&mut hub, &mut clients);
    let mut up = Upload::new(hash, &outboard, 4);
    let (corr, first) = clients[0].blobs.pop().unwrap();
    up.on_need(&need_of(&first), corr).unwrap();
    // A corrupted group is refused, typed, and not taken.
    let mut bad = group(0);
    bad[1] ^= 1;
    send(
        &mut hub,
        &clients[0],
        900,
        Message::BlobChunk {
            hash,
            index: 0,
            bytes: bad,
        },
    );
    settle_at(&mut hub, &mut clients);
    assert!(matches!(
        clients[0].blobs.pop(),
        Some((
            _,
            Message::Error {
                code: Reason::Malformed,
                related: 900,
                ..
            }
        ))
    ));
    while !up.is_done() {
        let inputs: Vec<Input> = up
            .next_groups()
            .into_iter()
            .map(|(index, seq)| Input::Frame {
                conn: 10,
                env: Box::new(Envelope {
                    version: syncline_core::proto::message::PROTOCOL_VERSION,
                    session: 1,
                    corr: seq,
                    message: Message::BlobChunk {
                        hash,
                        index,
                        bytes: group(index),
                    },
                }),
            })
            .collect();
        hub.handle_batch(0, inputs).unwrap();
        settle_at(&mut hub, &mut clients);
        let (corr, need) = clients[0]
            .blobs
            .pop()
            .expect("a blob-need after each batch");
        up.on_need(&need_of(&need), corr).unwrap();
    }
    assert!(matches!(
        blobs.state(&hash).unwrap(),
        syncline_store::BlobState::Complete { .. }
    ));
    // The read-only session may not upload, but may download what was
    // uploaded through this room, a window at a time.
    send(
        &mut hub,
        &clients[1],
        7,
        Message::BlobPut {
            hash,
            outboard: outboard.encode(),
        },
    );
    settle_at(&mut hub, &mut clients);
    assert!(matches!(
        clients[1].blobs.pop(),
        Some((
            _,
            Message::Error {
                code: Reason::Unauthorized,
                related: 7,
                ..
            }
        ))
    ));
    send(&mut hub, &clients[1], 8, Message::BlobGet { hash });
    // Blob answers are bulk: they never queue among sync frames.
    assert!(hub.poll_transmit().is_none());
    settle_at(&mut hub, &mut clients);
    let mut down = Download::new(hash, 3);
    match clients[1].blobs.pop() {
        Some((8, Message::BlobInfo { outboard, .. })) => down.on_info(&outboard, None).unwrap(),
        other => panic!("{other:?}"),
    }
    let mut received = vec![0u8; data.len()];
    while !down.is_complete() {
        let ranges = down.next_request().expect("a window to ask for");
        let ranges = ranges.into_iter().map(|r| (r.start, r.end)).collect();
        send(&mut hub, &clients[1], 0, Message::BlobNeed { hash, ranges });
        settle_at(&mut hub, &mut clients);
        for (_, message) in std::mem::take(&mut clients[1].blobs) {
            let Message::BlobChunk { index, bytes, .. } = message else {
                panic!("{message:?}");
            };
            down.on_chunk(index, &bytes).unwrap();
            let at = group_range(data.len() as u64, index).start as usize;
            received[at..at + bytes.len()].copy_from_slice(&bytes);
        }
    }
    assert_eq!(received, data);
    // A blob the room does not know is not found.
    send(&mut hub, &clients[1], 9, Message::BlobGet { hash: [7; 32] });
    settle_at(&mut hub, &mut clients);
    assert!(matches!(
        clients[1].blobs.pop(),
        Some((
            _,
            Message::Error {
                code: Reason::NotFound,
                related: 9,
                ..
            }
        ))
    ));
}
