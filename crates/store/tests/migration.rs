//! A replica written by an older storage schema (and older node format)
//! opens with today's code: same identity, history, heads, outbox and
//! document, and it goes on working (new nodes on top, shipped to a fresh
//! replica that ends in the same state).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use syncline_core::{RoomId, Value};
use syncline_store::{MemoryStore, Replica, SqliteOptions, SqliteStore, Store};

/// Copies the fixture to a fresh directory (opening migrates it in place).
fn fixture_copy(name: &str) -> tempfile::TempDir {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(from.join("replica.db"), dir.path().join("replica.db")).unwrap();
    dir
}

fn open(dir: &Path) -> Replica {
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.join("replica.db"), SqliteOptions::default()).unwrap());
    Replica::open(store, || panic!("the fixture has an identity")).unwrap()
}

/// What the code that wrote the fixture printed, in the same format.
fn describe(replica: &mut Replica) -> String {
    let mut out = String::new();
    writeln!(out, "author {}", replica.key().author()).unwrap();
    for room in ["notes", "projects/alpha"] {
        let room = RoomId::new(room).unwrap();
        let r = replica.room(&room).unwrap();
        let dag = r.room().dag();
        writeln!(out, "room {room} nodes {}", dag.len()).unwrap();
        let heads: Vec<String> = dag.heads().iter().map(|h| h.to_string()).collect();
        writeln!(out, "room {room} heads {}", heads.join(",")).unwrap();
        let outbox: Vec<String> = r.outbox().iter().map(|h| h.to_string()).collect();
        writeln!(out, "room {room} outbox {}", outbox.join(",")).unwrap();
        writeln!(out, "room {room} export {:?}", r.room().doc().export()).unwrap();
    }
    out
}

#[test]
fn a_schema_1_replica_opens_unchanged_and_goes_on() {
    let dir = fixture_copy("v1");
    let expected = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1/expected.txt"),
    )
    .unwrap();
    let mut replica = open(dir.path());
    assert_eq!(describe(&mut replica), expected);

    // New edits on top of the old history, in today's node format.
    let notes = RoomId::new("notes").unwrap();
    let room = replica.room(&notes).unwrap();
    room.transact(10_000, |tx| {
        tx.text_insert("/doc", 3, "(edited) ")?;
        tx.text_delete("/todo/1/details", 0, 4)?;
        tx.set("/todo/1", "done", Value::Bool(true))
    })
    .unwrap();
    let doc = room.room().doc();
    assert_eq!(
        doc.text(&doc.resolve("/doc").unwrap()),
        ">> (edited) hello, world!"
    );
    assert_eq!(doc.text(&doc.resolve("/todo/1/details").unwrap()), "litres");
    let hash = room.room().state_hash();
    let all = room.room().dag().causal_order();
    let pack = room.export_pack(&all).unwrap();

    // A fresh replica receives old and new nodes alike and agrees.
    let mut fresh = Replica::open(Arc::new(MemoryStore::new()), || [1; 32]).unwrap();
    let got = fresh.room(&notes).unwrap().receive_pack(&pack).unwrap();
    assert_eq!(got.accepted.len(), all.len());
    assert_eq!(fresh.room(&notes).unwrap().room().state_hash(), hash);

    // And the migrated replica reopens with all of it.
    drop(replica);
    let mut again = open(dir.path());
    assert_eq!(again.room(&notes).unwrap().room().state_hash(), hash);
}
