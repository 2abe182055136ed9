//! One replica directory opened by several handles at once, as by several
//! processes (each `Replica::open` takes its own file handles and locks, so
//! two in one test behave as two processes do): writes from both land,
//! each sees the other's within a moment as `OtherProcess` changes, only
//! one runs the sync engine, and that engine uploads the other's writes.

use syncline::{Error, Origin, Replica};

mod common;

use common::{WAIT, relay, wait_until};

#[test]
fn two_handles_on_one_directory_write_at_once_and_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let a = Replica::open(dir.path()).unwrap();
    let b = Replica::open(dir.path()).unwrap();
    assert_eq!(a.author(), b.author(), "one identity");
    let (room_a, room_b) = (a.room("notes").unwrap(), b.room("notes").unwrap());
    let changes = room_a.changes();
    room_b
        .transact(|tx| tx.set("/todo/1", "title", "from b".into()))
        .unwrap();
    let change = changes.recv_timeout(WAIT).unwrap();
    assert_eq!(change.origin, Origin::OtherProcess);
    assert!(change.paths.contains(&"/todo/1".to_owned()), "{change:?}");
    assert_eq!(
        room_a.get("/todo/1", "title").unwrap(),
        Some("from b".into())
    );

    // Both write at once, from several threads each: nothing is refused,
    // nothing lost, and the two views end equal.
    std::thread::scope(|scope| {
        for (handle, room) in [("a", &room_a), ("b", &room_b)] {
            for t in 0..3 {
                scope.spawn(move || {
                    for i in 0..20 {
                        room.transact(|tx| {
                            tx.set(&format!("/{handle}/{t}/{i}"), "n", (i as i64).into())
                        })
                        .unwrap();
                    }
                });
            }
        }
    });
    wait_until(|| room_a.node_count() == 121 && room_b.node_count() == 121);
    assert_eq!(room_a.state_hash(), room_b.state_hash());
    assert_eq!(room_a.unacknowledged().unwrap(), 121);
    // A third handle opened now loads all of it.
    let c = Replica::open(dir.path()).unwrap();
    assert_eq!(c.room("notes").unwrap().state_hash(), room_a.state_hash());
}

#[test]
fn one_sync_engine_per_directory_uploads_every_handles_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    let syncing = Replica::open(dir.path().join("r")).unwrap();
    let other = Replica::open(dir.path().join("r")).unwrap();
    let sync = syncing.connect(&[url.as_str()], &["notes"]).unwrap();
    match other.connect(&[url.as_str()], &["notes"]) {
        Err(e @ Error::SyncRunning { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&format!("pid {}", std::process::id())),
                "{message}"
            );
        }
        other => panic!("a second engine must be refused, got {other:?}"),
    }
    sync.flush(WAIT).unwrap();
    // A write by the handle that does not sync reaches the server through
    // the one that does.
    other
        .room("notes")
        .unwrap()
        .transact(|tx| tx.set("/x", "by", "other".into()))
        .unwrap();
    let reader = Replica::open(dir.path().join("reader")).unwrap();
    let reading = reader.connect(&[url.as_str()], &["notes"]).unwrap();
    let notes = reader.room("notes").unwrap();
    wait_until(|| notes.get("/x", "by").ok().flatten() == Some("other".into()));
    wait_until(|| sync.status().unacknowledged == 0);
    drop(reading);
    // Once the engine stops, another handle may sync.
    sync.stop();
    other.connect(&[url.as_str()], &["notes"]).unwrap();
}
