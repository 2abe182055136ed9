//! Concurrent-edit scenarios with known answers: each case builds the same
//! concurrent histories on two replicas, exchanges them both ways, and checks
//! the merged state (and that both replicas agree on the state hash).

use syncline_core::doc::Conflict;
use syncline_core::pack::DEFAULT_ZSTD_LEVEL;
use syncline_core::{EntryKind, Keypair, Room, RoomId, Value};

fn pair() -> (Room, Keypair, Room, Keypair) {
    let id = RoomId::new("scenario").unwrap();
    (
        Room::new(id.clone()),
        Keypair::from_seed([1; 32]),
        Room::new(id),
        Keypair::from_seed([2; 32]),
    )
}

/// Sends everything `from` has that `to` lacks.
fn sync_into(from: &mut Room, key: &Keypair, to: &mut Room) {
    let missing = from
        .dag()
        .missing_for_version_vector(&to.dag().version_vector());
    if missing.is_empty() {
        return;
    }
    let pack = from.pack(&missing, Some(key)).unwrap();
    to.receive_pack(&pack).unwrap();
}

fn sync(a: &mut Room, ka: &Keypair, b: &mut Room, kb: &Keypair) {
    sync_into(a, ka, b);
    sync_into(b, kb, a);
    assert_eq!(a.state_hash(), b.state_hash(), "replicas diverged");
}

#[test]
fn concurrent_field_writes_pick_one_winner_and_report_the_loser() {
    let (mut a, ka, mut b, kb) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.set("/notes/1", "title", Value::Str("base".into()))
        .unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    let mut t = a.begin(ka.author(), 10);
    t.set("/notes/1", "title", Value::Str("from a".into()))
        .unwrap();
    t.commit().unwrap();
    let mut t = b.begin(kb.author(), 20);
    t.set("/notes/1", "title", Value::Str("from b".into()))
        .unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    let id = a.doc().resolve("/notes/1").unwrap();
    assert_eq!(
        a.doc().field(&id, "title"),
        Some(&Value::Str("from b".into()))
    );
    let conflicts = a.doc().conflicts(a.dag(), "/").unwrap();
    assert!(matches!(&conflicts[..], [Conflict::Field { losers, .. }] if losers.len() == 1));
    // A write that has seen both resolves the conflict.
    let mut t = a.begin(ka.author(), 30);
    t.set("/notes/1", "title", Value::Str("merged".into()))
        .unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    assert!(b.doc().conflicts(b.dag(), "/").unwrap().is_empty());
}

#[test]
fn concurrent_creates_of_one_path_merge() {
    let (mut a, ka, mut b, kb) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.set("/projects/alpha", "owner", Value::Str("ann".into()))
        .unwrap();
    t.commit().unwrap();
    let mut t = b.begin(kb.author(), 2);
    t.set("/projects/alpha", "due", Value::Int(7)).unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    let id = b.doc().resolve("/projects/alpha").unwrap();
    assert_eq!(b.doc().fields(&id).len(), 2);
    assert_eq!(
        b.doc()
            .children(&b.doc().resolve("/projects").unwrap())
            .len(),
        1
    );
}

#[test]
fn concurrent_moves_cannot_make_a_cycle() {
    let (mut a, ka, mut b, kb) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.ensure("/x", EntryKind::Map).unwrap();
    t.ensure("/y", EntryKind::Map).unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    let mut t = a.begin(ka.author(), 10);
    t.mv("/x", "/y/x").unwrap();
    t.commit().unwrap();
    let mut t = b.begin(kb.author(), 11);
    t.mv("/y", "/x/y").unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    // The later move (b's) would close a cycle and is skipped.
    assert!(a.doc().resolve("/y/x").is_ok());
    let conflicts = a.doc().conflicts(a.dag(), "/").unwrap();
    assert!(conflicts.iter().any(|c| matches!(c, Conflict::Move { .. })));
}

#[test]
fn edit_concurrent_with_delete_is_reported() {
    let (mut a, ka, mut b, kb) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.set("/doc", "title", Value::Str("t".into())).unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    let mut t = a.begin(ka.author(), 10);
    t.delete("/doc").unwrap();
    t.commit().unwrap();
    let mut t = b.begin(kb.author(), 11);
    t.set("/doc", "title", Value::Str("edited".into())).unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    assert!(a.doc().resolve("/doc").is_err());
    let conflicts = a.doc().conflicts(a.dag(), "/").unwrap();
    assert!(matches!(&conflicts[..], [Conflict::Delete { edits, .. }] if edits.len() == 1));
    // Setting the path again (after seeing the delete) brings it back.
    let mut t = b.begin(kb.author(), 20);
    t.set("/doc", "title", Value::Str("again".into())).unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    assert!(a.doc().resolve("/doc").is_ok());
}

#[test]
fn concurrent_text_runs_do_not_interleave() {
    let (mut a, ka, mut b, kb) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.text_insert("/t", 0, "[]").unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    for (i, c) in "hello".chars().enumerate() {
        let mut t = a.begin(ka.author(), 10 + i as u64);
        t.text_insert("/t", 1 + i, &c.to_string()).unwrap();
        t.commit().unwrap();
    }
    for (i, c) in "WORLD".chars().enumerate() {
        let mut t = b.begin(kb.author(), 10 + i as u64);
        t.text_insert("/t", 1 + i, &c.to_string()).unwrap();
        t.commit().unwrap();
    }
    sync(&mut a, &ka, &mut b, &kb);
    let text = a.doc().text(&a.doc().resolve("/t").unwrap());
    assert!(text == "[helloWORLD]" || text == "[WORLDhello]", "{text}");
}

#[test]
fn name_collisions_keep_both_entries() {
    let (mut a, ka, mut b, kb) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.create_unique("/", "item", EntryKind::Map, None).unwrap();
    t.commit().unwrap();
    let mut t = b.begin(kb.author(), 2);
    t.create_unique("/", "item", EntryKind::Map, None).unwrap();
    t.commit().unwrap();
    sync(&mut a, &ka, &mut b, &kb);
    assert_eq!(a.doc().children(&syncline_core::EntryId::ROOT).len(), 2);
    let conflicts = a.doc().conflicts(a.dag(), "/").unwrap();
    assert!(matches!(&conflicts[..], [Conflict::Name { others, .. }] if others.len() == 1));
}

#[test]
fn dropped_transactions_roll_back() {
    let (mut a, ka, _, _) = pair();
    let mut t = a.begin(ka.author(), 1);
    t.set("/keep", "v", Value::Int(1)).unwrap();
    t.commit().unwrap();
    let before = a.state_hash();
    {
        let mut t = a.begin(ka.author(), 2);
        t.set("/drop", "v", Value::Int(2)).unwrap();
        t.text_insert("/keep/text", 0, "abc").unwrap();
    }
    assert_eq!(a.state_hash(), before);
    assert!(a.doc().resolve("/drop").is_err());
}

#[test]
fn relayed_history_can_be_reshipped_in_chunks_at_checkpoints() {
    use syncline_core::room::CHECKPOINT_INTERVAL;
    let key = Keypair::from_seed([1; 32]);
    let mut author = Room::new(RoomId::new("scenario").unwrap());
    let n = 3 * CHECKPOINT_INTERVAL + 10;
    for i in 0..n {
        let mut t = author.begin(key.author(), i);
        t.set("/k", "v", Value::Int(i as i64)).unwrap();
        t.commit().unwrap();
    }
    let all = author.dag().causal_order();
    let pack = author.pack(&all, Some(&key)).unwrap();
    // A relay holds the history with the author's checkpoints, not its key.
    let mut relay = Room::new(RoomId::new("scenario").unwrap());
    relay.receive_pack(&pack).unwrap();
    let order = relay.dag().causal_order();
    // The first 100 nodes: the relay extends to the first signed node only.
    let exported = relay
        .export_pack(&order[..100], None, &|_, _, _| false, DEFAULT_ZSTD_LEVEL)
        .unwrap();
    assert!(
        exported.signatures.is_empty(),
        "a relay cannot sign for the author"
    );
    let chunk = exported.pack;
    let mut fresh = Room::new(RoomId::new("scenario").unwrap());
    let got = fresh.receive_pack(&chunk).unwrap();
    // Out to the author's first signed node past the chunk: its first
    // checkpoint, or sooner once SIGNED_CONTENT bytes of content came.
    let reached = got.accepted.len() as u64;
    assert!((100..=CHECKPOINT_INTERVAL).contains(&reached), "{reached}");
    let last = fresh.dag().by_author_seq(&key.author(), reached).unwrap();
    assert!(fresh.dag().signature(last).is_some());
    // The rest follows in further chunks and the replicas converge.
    let rest = relay
        .dag()
        .missing_for_version_vector(&fresh.dag().version_vector());
    let tail = relay.pack(&rest, None).unwrap();
    fresh.receive_pack(&tail).unwrap();
    assert_eq!(fresh.state_hash(), author.state_hash());
}

#[test]
fn a_relay_cuts_a_chain_of_large_nodes_into_small_chunks() {
    // Nodes of 10 KB: if the relay kept only every 64th signature, a chunk
    // would reach up to 64 nodes to the next signed one (with 100 KB nodes,
    // 6.4 MB: over a frame, so a reader could never catch up). Signatures
    // every SIGNED_CONTENT bytes, made by the author and kept by the
    // relay, keep a cut near 26 nodes.
    let key = Keypair::from_seed([2; 32]);
    let mut author = Room::new(RoomId::new("scenario").unwrap());
    for i in 0..200u64 {
        let mut t = author.begin(key.author(), i);
        let text: String = (0..10_000)
            .map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8))
            .collect();
        t.set(&format!("/k/{i}"), "v", Value::Str(text)).unwrap();
        t.commit().unwrap();
    }
    let mut relay = Room::new(RoomId::new("scenario").unwrap());
    let all = author.dag().causal_order();
    for chunk in all.chunks(2) {
        let exported = author
            .export_pack(chunk, Some(&key), &|_, _, _| false, DEFAULT_ZSTD_LEVEL)
            .unwrap();
        relay.receive_pack(&exported.pack).unwrap();
    }
    let order = relay.dag().causal_order();
    let mut fresh = Room::new(RoomId::new("scenario").unwrap());
    let mut at = 0;
    while at < order.len() {
        let exported = relay
            .export_pack(
                &order[at..at + 1],
                None,
                &|_, _, _| false,
                DEFAULT_ZSTD_LEVEL,
            )
            .unwrap();
        let got = fresh.receive_pack(&exported.pack).unwrap();
        let reached = got.accepted.len();
        assert!(reached <= 40, "a one-node cut reached {reached} nodes");
        at += reached;
    }
    assert_eq!(fresh.state_hash(), author.state_hash());
}

#[test]
fn a_commit_on_more_heads_than_a_node_may_cite_cites_the_newest() {
    use syncline_core::limits::MAX_PARENTS;
    let room_id = RoomId::new("scenario").unwrap();
    let mut room = Room::new(room_id.clone());
    // 100 authors who never saw each other: 100 heads.
    for a in 0..100u8 {
        let key = Keypair::from_seed([a; 32]);
        let mut author = Room::new(room_id.clone());
        let mut t = author.begin(key.author(), 1_000 + u64::from(a));
        t.set(&format!("/by/{a}"), "v", Value::Int(a.into()))
            .unwrap();
        let idx = t.commit().unwrap().unwrap().idx;
        room.receive_pack(&author.pack(&[idx], Some(&key)).unwrap())
            .unwrap();
    }
    assert_eq!(room.dag().heads().len(), 100);
    let me = Keypair::from_seed([200; 32]);
    for round in 0..3u64 {
        let mut t = room.begin(me.author(), 5_000 + round);
        t.set("/mine", "v", Value::Int(round as i64)).unwrap();
        let idx = t.commit().unwrap().unwrap().idx;
        let parents = room.dag().parents(idx).len();
        assert!(parents <= MAX_PARENTS, "{parents} parents");
        // The uncited heads stay heads, and the next commits cite them.
        let heads = room.dag().heads().len();
        assert_eq!(
            heads,
            if round == 0 {
                100 - (MAX_PARENTS - 1)
            } else {
                1
            }
        );
    }
    // The nodes pass another replica's receive path.
    let all = room.dag().causal_order();
    let mut other = Room::new(room_id);
    other
        .receive_pack(&room.pack(&all, Some(&me)).unwrap())
        .unwrap();
    assert_eq!(other.state_hash(), room.state_hash());
}

/// Every limit the receive path enforces, broken by one operation: the
/// transaction refuses it with a typed error and the room stays as it was;
/// at the limit, the node commits and reads back through a pack and from
/// a stored segment.
#[test]
fn a_transaction_never_commits_what_the_receive_path_refuses() {
    use syncline_core::Vector;
    use syncline_core::limits::{
        MAX_COLLECTION_LEN, MAX_DELETED_CHARS_PER_NODE, MAX_STRING_BYTES, MAX_VALUE_DEPTH,
        MAX_VECTOR_DIMS,
    };
    use syncline_core::room::TxnError;

    let id = RoomId::new("scenario").unwrap();
    let key = Keypair::from_seed([5; 32]);
    let mut room = Room::new(id.clone());
    let mut tx = room.begin(key.author(), 1);
    tx.text_insert("/t", 0, "kept").unwrap();
    tx.set("/e", "f", Value::Int(1)).unwrap();
    tx.commit().unwrap();
    let (hash, nodes) = (room.state_hash(), room.dag().len());

    let over = "x".repeat(MAX_STRING_BYTES + 1);
    let nested = (0..MAX_VALUE_DEPTH + 1).fold(Value::Null, |v, _| Value::Array(vec![v]));
    let refused: Vec<(&str, Value)> = vec![
        ("string", Value::Str(over.clone())),
        ("bytes", Value::Bytes(vec![0; MAX_STRING_BYTES + 1])),
        ("NaN", Value::Float(f64::NAN)),
        ("depth", nested),
        (
            "array",
            Value::Array(vec![Value::Null; MAX_COLLECTION_LEN + 1]),
        ),
        (
            "map key",
            Value::Map([(over.clone(), Value::Null)].into_iter().collect()),
        ),
        (
            "vector",
            Value::Vector(Vector::F32(vec![0.0; MAX_VECTOR_DIMS + 1])),
        ),
    ];
    for (what, value) in refused {
        let mut tx = room.begin(key.author(), 2);
        let r = tx.set("/e", "f", value);
        assert!(matches!(r, Err(TxnError::Limit(_))), "{what}: {r:?}");
        assert_eq!(tx.commit().unwrap().map(|c| c.idx), None, "{what}");
        assert_eq!(
            (room.state_hash(), room.dag().len()),
            (hash, nodes),
            "{what}"
        );
    }
    let mut tx = room.begin(key.author(), 2);
    let r = tx.text_insert("/t", 0, &over);
    assert!(matches!(r, Err(TxnError::Limit(_))), "text: {r:?}");
    drop(tx);
    assert_eq!((room.state_hash(), room.dag().len()), (hash, nodes));

    // A limit of the whole node: characters deleted by one node, checked
    // at commit; the document goes back.
    let chunk = "y".repeat(MAX_STRING_BYTES);
    let mut total = 0;
    while total as u64 <= MAX_DELETED_CHARS_PER_NODE {
        let mut tx = room.begin(key.author(), 3);
        tx.text_insert("/t", 0, &chunk).unwrap();
        tx.commit().unwrap();
        total += chunk.len();
    }
    let (hash, nodes) = (room.state_hash(), room.dag().len());
    let mut tx = room.begin(key.author(), 4);
    tx.text_delete("/t", 0, total).unwrap();
    assert!(matches!(tx.commit(), Err(TxnError::Limit(_))));
    assert_eq!((room.state_hash(), room.dag().len()), (hash, nodes));

    // At the limits: committed, and read back as the receive path and the
    // store read it.
    let mut tx = room.begin(key.author(), 5);
    tx.text_insert("/t", 0, &chunk).unwrap();
    let at_depth = (0..MAX_VALUE_DEPTH).fold(Value::Null, |v, _| Value::Array(vec![v]));
    tx.set("/e", "f", at_depth).unwrap();
    tx.commit().unwrap();
    let all = room.dag().causal_order();
    let pack = room.pack(&all, Some(&key)).unwrap();
    let mut other = Room::new(id.clone());
    other.receive_pack(&pack).unwrap();
    assert_eq!(other.state_hash(), room.state_hash());
    let n = room.dag().next_idx();
    let stored =
        Room::from_segments(id, vec![room.dag().segment(0..n, DEFAULT_ZSTD_LEVEL)]).unwrap();
    assert_eq!(stored.state_hash(), room.state_hash());
}
