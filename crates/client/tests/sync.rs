//! The SDK against a real relay on loopback (in-process server, real
//! WebSocket): offline edits converge, several rooms share one connection,
//! and flush waits for durable acknowledgement.

use syncline::{Origin, Replica};

mod common;

use common::{WAIT, relay, relay_with, wait_until};

#[test]
fn offline_edits_converge_through_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    let replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::open(dir.path().join(format!("r{i}"))).unwrap())
        .collect();
    // Offline: concurrent edits of one room, and a second room.
    for (i, r) in replicas.iter().enumerate() {
        let room = r.room("doc").unwrap();
        room.transact(|tx| tx.set("/shared", "by", format!("replica {i}").into()))
            .unwrap();
        room.transact(|tx| tx.set(&format!("/own/{i}"), "n", (i as i64).into()))
            .unwrap();
        room.transact(|tx| tx.text_insert("/notes", 0, &format!("[{i}]")))
            .unwrap();
        r.room("other")
            .unwrap()
            .transact(|tx| tx.set("/x", "v", (i as i64).into()))
            .unwrap();
    }
    let syncs: Vec<_> = replicas
        .iter()
        .map(|r| r.connect(&[url.as_str()], &["doc", "other"]).unwrap())
        .collect();
    for s in &syncs {
        s.flush(WAIT).unwrap();
    }
    // Each flushed its own uploads; the others' arrive as they are relayed.
    for r in &replicas {
        let (doc, other) = (r.room("doc").unwrap(), r.room("other").unwrap());
        wait_until(|| doc.node_count() == 9 && other.node_count() == 3);
    }
    let hashes: Vec<[u8; 32]> = replicas
        .iter()
        .map(|r| r.room("doc").unwrap().state_hash())
        .collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "doc diverged");
    let other: Vec<usize> = replicas
        .iter()
        .map(|r| r.room("other").unwrap().node_count())
        .collect();
    assert_eq!(other, vec![3, 3, 3]);
    let text = replicas[0].room("doc").unwrap().text("/notes").unwrap();
    for i in 0..3 {
        assert!(text.contains(&format!("[{i}]")), "{text}");
    }
    let status = syncs[0].status();
    assert!(status.connected && status.unacknowledged == 0 && status.last_ack.is_some());
}

#[test]
fn live_changes_arrive_as_remote_change_events() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    let a = Replica::open(dir.path().join("a")).unwrap();
    let b = Replica::open(dir.path().join("b")).unwrap();
    let sa = a.connect(&[url.as_str()], &["live"]).unwrap();
    let sb = b.connect(&[url.as_str()], &["live"]).unwrap();
    sa.flush(WAIT).unwrap();
    sb.flush(WAIT).unwrap();
    let changes = b.room("live").unwrap().changes();
    a.room("live")
        .unwrap()
        .transact(|tx| tx.set("/tasks/1", "title", "ship it".into()))
        .unwrap();
    let change = changes.recv_timeout(WAIT).unwrap();
    assert_eq!(change.origin, Origin::Remote);
    assert!(change.paths.contains(&"/tasks/1".to_owned()), "{change:?}");
    assert_eq!(
        b.room("live").unwrap().get("/tasks/1", "title").unwrap(),
        Some("ship it".into())
    );
}

#[test]
fn endpoints_are_tried_in_order_until_one_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    // A port nothing listens on, first.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("ws://{}/ws", l.local_addr().unwrap())
    };
    let r = Replica::open(dir.path().join("r")).unwrap();
    r.room("x")
        .unwrap()
        .transact(|tx| tx.set("/a", "v", 1i64.into()))
        .unwrap();
    let sync = r.connect(&[dead.as_str(), url.as_str()], &["x"]).unwrap();
    sync.flush(WAIT).unwrap();
    assert_eq!(sync.status().endpoint.as_deref(), Some(url.as_str()));
}

#[test]
fn a_difference_too_large_for_the_sketch_falls_back_to_the_version_vector() {
    use std::sync::Arc;
    use syncline_core::{Keypair, RoomId};
    use syncline_store::{DurableRoom, SqliteOptions, SqliteStore};

    let dir = tempfile::tempdir().unwrap();
    // A relay that sends at most 64 RIBLT symbols for one difference.
    let (url, _runtime) = relay_with(&dir.path().join("relay"), |c| c.session.max_symbols = 64);
    // A replica whose room holds nodes of more authors than a hello lists
    // (`vv_inline_limit`, 512): each of 600 authors wrote one node.
    let crowd = RoomId::new("crowd").unwrap();
    let path = dir.path().join("crowd");
    std::fs::create_dir_all(&path).unwrap();
    {
        let store = Arc::new(
            SqliteStore::open(&path.join("replica.db"), SqliteOptions::default()).unwrap(),
        );
        let mut held = DurableRoom::load(store, Keypair::from_seed([0; 32]), &crowd).unwrap();
        for a in 0..600u32 {
            let mut seed = [7; 32];
            seed[..4].copy_from_slice(&a.to_le_bytes());
            let key = Keypair::from_seed(seed);
            let mut author = syncline_core::Room::new(crowd.clone());
            let mut tx = author.begin(key.author(), 1_000 + u64::from(a));
            tx.set(&format!("/people/{a}"), "n", i64::from(a).into())
                .unwrap();
            let idx = tx.commit().unwrap().unwrap().idx;
            held.receive_pack(&author.pack(&[idx], Some(&key)).unwrap())
                .unwrap();
        }
    }
    let replica = Replica::open(&path).unwrap();
    let room = replica.room("crowd").unwrap();
    room.transact(|tx| tx.set("/mine", "v", 1i64.into()))
        .unwrap();
    let sync = replica.connect(&[url.as_str()], &["crowd"]).unwrap();
    // The first difference (RIBLT: the version vector was left out) needs
    // more symbols than the relay sends and ends as too_large; the replica
    // reconnects with its version vector and uploads everything.
    sync.flush(WAIT).unwrap();
    let first = sync.status().last_error.unwrap_or_default();
    assert!(first.contains("too_large"), "{first}");
    let reader = Replica::open(dir.path().join("reader")).unwrap();
    let copy = reader.room("crowd").unwrap();
    let _reading = reader.connect(&[url.as_str()], &["crowd"]).unwrap();
    wait_until(|| copy.node_count() == 601);
    assert_eq!(copy.state_hash(), room.state_hash());
}

/// Two in-memory replicas make each kind of conflict offline, meet through
/// the relay, and one settles each: the other receives the settlement and
/// the conflicts are gone on both.
#[test]
fn conflicts_settle_by_a_change_both_replicas_accept() {
    use syncline::{Conflict, Pick};
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    let a = Replica::in_memory().unwrap();
    let b = Replica::in_memory().unwrap();
    let (ra, rb) = (a.room("c").unwrap(), b.room("c").unwrap());
    ra.transact(|tx| {
        tx.set("/e", "v", 0.into())?;
        tx.set("/p1", "v", 0.into())?;
        tx.set("/p2", "v", 0.into())
    })
    .unwrap();
    let sa = a.connect(&[url.as_str()], &["c"]).unwrap();
    let sb = b.connect(&[url.as_str()], &["c"]).unwrap();
    sa.flush(WAIT).unwrap();
    sb.flush(WAIT).unwrap();
    wait_until(|| rb.node_count() == 1);
    drop((sa, sb));
    // Offline: the same field, one name, and one entry's place.
    ra.transact(|tx| {
        tx.set("/todo", "title", "milk".into())?;
        tx.create_unique("/", "inbox", syncline::EntryKind::Map, None)?;
        tx.mv("/e", "/p1/e")
    })
    .unwrap();
    rb.transact(|tx| {
        tx.set("/todo", "title", "bread".into())?;
        tx.create_unique("/", "inbox", syncline::EntryKind::Map, None)?;
        tx.mv("/e", "/p2/e")
    })
    .unwrap();
    let sa = a.connect(&[url.as_str()], &["c"]).unwrap();
    let sb = b.connect(&[url.as_str()], &["c"]).unwrap();
    sa.flush(WAIT).unwrap();
    sb.flush(WAIT).unwrap();
    wait_until(|| ra.node_count() == 3 && rb.node_count() == 3);
    let kinds = |room: &syncline::Room| -> Vec<&'static str> {
        let mut kinds: Vec<&str> = room
            .conflicts("/")
            .unwrap()
            .iter()
            .map(|c| match c {
                Conflict::Field { .. } => "field",
                Conflict::Name { .. } => "name",
                Conflict::Move { .. } => "move",
                Conflict::Delete { .. } => "delete",
            })
            .collect();
        kinds.sort_unstable();
        kinds
    };
    assert_eq!(kinds(&ra), ["field", "move", "name"]);
    let lost = match ra.conflicts("/todo").unwrap().remove(0) {
        Conflict::Field { losers, .. } => losers[0].value.clone().unwrap(),
        other => panic!("{other:?}"),
    };
    ra.resolve_field("/todo", "title", Pick::Candidate(1))
        .unwrap();
    let renamed = ra.resolve_name("/inbox", 0).unwrap();
    assert_eq!(renamed, ["/inbox~2"]);
    let moved_to = match ra
        .conflicts("/")
        .unwrap()
        .into_iter()
        .find_map(|c| match c {
            Conflict::Move { path, .. } => Some(path),
            _ => None,
        }) {
        Some(path) => ra.resolve_move(&path, 1).unwrap(),
        None => panic!("the move conflict went away"),
    };
    assert!(
        matches!(
            ra.resolve_name("/todo", 0),
            Err(syncline::Error::NoConflict { .. })
        ),
        "nothing to resolve there"
    );
    sa.flush(WAIT).unwrap();
    wait_until(|| rb.node_count() == 6);
    for room in [&ra, &rb] {
        assert!(kinds(room).is_empty(), "{:?}", room.conflicts("/"));
        assert_eq!(room.get("/todo", "title").unwrap(), Some(lost.clone()));
        assert!(room.exists("/inbox").unwrap() && room.exists("/inbox~2").unwrap());
        assert!(room.exists(&moved_to).unwrap());
    }
    assert_eq!(ra.state_hash(), rb.state_hash());
}
