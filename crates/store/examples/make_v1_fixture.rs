#![allow(clippy::print_stdout)]
use std::fmt::Write as _;
use std::sync::Arc;
use syncline_core::{EntryKind, RoomId, Value};
use syncline_store::{MemoryStore, Replica, SqliteOptions, SqliteStore};

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let _ = std::fs::remove_file(dir.join("replica.db"));
    let store =
        Arc::new(SqliteStore::open(&dir.join("replica.db"), SqliteOptions::default()).unwrap());
    let mut a = Replica::open(store.clone(), || [7; 32]).unwrap();
    let mut b = Replica::open(Arc::new(MemoryStore::new()), || [8; 32]).unwrap();
    let notes = RoomId::new("notes").unwrap();
    let other = RoomId::new("projects/alpha").unwrap();
    let ra = a.room(&notes).unwrap();
    ra.transact(1_000, |tx| {
        tx.set("/todo/1", "title", Value::Str("buy milk".into()))?;
        tx.set("/todo/1", "done", Value::Bool(false))?;
        tx.text_insert("/todo/1/details", 0, "two litres, organic")?;
        Ok(())
    })
    .unwrap();
    let mut at = 0;
    for (i, w) in ["hello", " ", "world", "!"].iter().enumerate() {
        ra.transact(1_010 + i as u64, |tx| tx.text_insert("/doc", at, w))
            .unwrap();
        at += w.len();
    }
    ra.transact(1_020, |tx| {
        tx.create_unique("/", "item", EntryKind::Map, Some(vec![0x40]))?;
        tx.create_unique("/", "item", EntryKind::Map, Some(vec![0x20]))?;
        tx.set("/todo/2", "title", Value::Str("call bob".into()))?;
        Ok(())
    })
    .unwrap();
    // Share with b, then edit concurrently.
    let all = ra.room().dag().causal_order();
    let pack = ra.export_pack(&all).unwrap();
    let rb = b.room(&notes).unwrap();
    rb.receive_pack(&pack).unwrap();
    let ra = a.room(&notes).unwrap();
    ra.transact(2_000, |tx| {
        tx.set("/todo/1", "done", Value::Bool(true))?;
        tx.text_delete("/todo/1/details", 10, 9)?;
        tx.mv("/todo/2", "/archive")?;
        Ok(())
    })
    .unwrap();
    let rb = b.room(&notes).unwrap();
    rb.transact(2_000, |tx| {
        tx.set("/todo/1", "done", Value::Str("almost".into()))?;
        tx.text_insert("/doc", 5, ",")?;
        tx.set("/todo/3", "title", Value::Float(2.5))?;
        tx.delete("/todo/2")?;
        Ok(())
    })
    .unwrap();
    rb.transact(2_005, |tx| {
        tx.set(
            "/todo/3",
            "tags",
            Value::Array(vec![
                Value::Str("a".into()),
                Value::Null,
                Value::Bytes(vec![1, 2, 3]),
            ]),
        )
    })
    .unwrap();
    let bpack = rb.export_pack(&rb.room().dag().causal_order()).unwrap();
    let ra = a.room(&notes).unwrap();
    ra.receive_pack(&bpack).unwrap();
    ra.transact(3_000, |tx| tx.text_insert("/doc", 0, ">> "))
        .unwrap();
    let outbox = ra.outbox().unwrap();
    ra.acknowledge(&outbox[..3]).unwrap();
    let ro = a.room(&other).unwrap();
    for i in 0..30u64 {
        ro.transact(5_000 + i, |tx| {
            tx.set(&format!("/tasks/{}", i % 4), "n", Value::Int(i as i64))?;
            tx.text_insert("/log", 0, &format!("{i};"))
        })
        .unwrap();
    }
    ro.transact(6_000, |tx| tx.delete("/tasks/3")).unwrap();
    let mut out = String::new();
    writeln!(out, "author {}", a.key().author()).unwrap();
    for room in [&notes, &other] {
        let r = a.room(room).unwrap();
        let dag = r.room().dag();
        writeln!(out, "room {room} nodes {}", dag.len()).unwrap();
        let heads: Vec<String> = dag.heads().iter().map(|h| h.to_string()).collect();
        writeln!(out, "room {room} heads {}", heads.join(",")).unwrap();
        let ob: Vec<String> = r.outbox().unwrap().iter().map(|h| h.to_string()).collect();
        writeln!(out, "room {room} outbox {}", ob.join(",")).unwrap();
        writeln!(out, "room {room} export {:?}", r.room().doc().export()).unwrap();
    }
    drop(a);
    drop(store);
    std::fs::write(dir.join("expected.txt"), out).unwrap();
}
