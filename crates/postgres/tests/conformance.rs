//! The store conformance suite against a real PostgreSQL server: the one
//! `scripts/services.sh start` runs (its URL in `SYNCLINE_TEST_POSTGRES`;
//! `.ci/run` starts it). Each test gets a database of its own.

use std::sync::atomic::{AtomicU32, Ordering};

use syncline_core::RoomId;
use syncline_postgres::{PgOptions, PgStore};
use syncline_store::{Batch, Store, StoreError, conformance};

/// A fresh database on the test server; `None` (the test is skipped, and
/// says so) when no server was started outside CI.
fn fresh_database() -> Option<String> {
    let Ok(url) = std::env::var("SYNCLINE_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this with PostgreSQL: start it with scripts/services.sh"
        );
        eprintln!(
            "no SYNCLINE_TEST_POSTGRES: skipped (eval \"$(bash scripts/services.sh start DIR)\")"
        );
        return None;
    };
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "syncline_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (base, _) = url.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

#[test]
fn postgres_passes_the_store_conformance_suite() {
    let Some(url) = fresh_database() else { return };
    let store = PgStore::open(&url, PgOptions::default()).unwrap();
    conformance::run_all(&store);
}

#[test]
fn postgres_keeps_everything_across_reopening() {
    let Some(url) = fresh_database() else { return };
    conformance::run_reopen(&mut || Box::new(PgStore::open(&url, PgOptions::default()).unwrap()));
}

#[test]
fn two_relays_on_one_database_append_in_turn_and_refuse_a_stale_batch() {
    let Some(url) = fresh_database() else { return };
    let (a, b) = (
        PgStore::open(&url, PgOptions::default()).unwrap(),
        PgStore::open(&url, PgOptions::default()).unwrap(),
    );
    let room = RoomId::new("shared/room").unwrap();
    let segment = |start, count| conformance::test_segment(&room, 7, start, count);
    a.commit(
        &room,
        Batch {
            segments: vec![segment(0, 10)],
            expect_nodes: Some(0),
            ..Batch::default()
        },
    )
    .unwrap();
    // B's view is stale (it saw nothing): refused, nothing written.
    let stale = b.commit(
        &room,
        Batch {
            segments: vec![segment(0, 5)],
            expect_nodes: Some(0),
            ..Batch::default()
        },
    );
    assert!(matches!(stale, Err(StoreError::Invalid(_))), "{stale:?}");
    // Caught up from the tail, B appends after A's nodes.
    let tail = b.load_tail(&room, 0).unwrap();
    assert_eq!(tail.segments.len(), 1);
    b.commit(
        &room,
        Batch {
            segments: vec![segment(10, 5)],
            expect_nodes: Some(10),
            ..Batch::default()
        },
    )
    .unwrap();
    assert_eq!(a.node_count(&room).unwrap(), 15);
    // A replay of stored nodes is skipped: any relay may accept any node.
    a.commit(
        &room,
        Batch {
            segments: vec![segment(10, 5)],
            ..Batch::default()
        },
    )
    .unwrap();
    assert_eq!(b.load(&room).unwrap().node_count(), 15);
}

#[test]
fn a_lock_held_by_one_relay_makes_another_wait_until_it_is_released() {
    let Some(url) = fresh_database() else { return };
    let (a, b) = (
        PgStore::open(&url, PgOptions::default()).unwrap(),
        PgStore::open(&url, PgOptions::default()).unwrap(),
    );
    let held = a.lock("shared/room").unwrap().expect("PostgreSQL locks");
    let (taken_tx, taken) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let lock = b.lock("shared/room").unwrap();
            taken_tx.send(()).unwrap();
            drop(lock);
        });
        let waited = taken.recv_timeout(std::time::Duration::from_millis(300));
        assert!(waited.is_err(), "B took a lock A holds");
        // Other names are not held up.
        assert!(b.lock("another/room").unwrap().is_some());
        drop(held);
        taken
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("B takes the lock once A releases it");
    });
}

#[test]
fn writers_racing_without_a_lock_never_break_the_history() {
    let Some(url) = fresh_database() else { return };
    let room = RoomId::new("raced").unwrap();
    let appends_each = 40u32;
    std::thread::scope(|scope| {
        for tag in [1u8, 2] {
            let (url, room) = (&url, &room);
            scope.spawn(move || {
                let store = PgStore::open(url, PgOptions::default()).unwrap();
                let mut done = 0;
                while done < appends_each {
                    // What the store holds now; a stale append is refused
                    // (another writer got there first) and tried again.
                    let at = store.node_count(room).unwrap() as u32;
                    let batch = Batch {
                        segments: vec![conformance::test_segment(room, tag, at, 3)],
                        expect_nodes: Some(u64::from(at)),
                        ..Batch::default()
                    };
                    match store.commit(room, batch) {
                        Ok(()) => done += 1,
                        Err(StoreError::Invalid(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    let store = PgStore::open(&url, PgOptions::default()).unwrap();
    let stored = store.load(&room).unwrap();
    assert_eq!(stored.node_count(), u64::from(2 * appends_each * 3));
    let mut next = 0;
    for segment in &stored.segments {
        assert_eq!(segment.start, next, "consecutive, no gap, no overlap");
        next += segment.len;
    }
}

#[test]
fn a_schema_1_database_is_migrated_with_its_rooms() {
    let Some(url) = fresh_database() else { return };
    let room = RoomId::new("old/room").unwrap();
    let checkpoint = {
        let store = std::sync::Arc::new(PgStore::open(&url, PgOptions::default()).unwrap());
        let mut durable = syncline_store::DurableRoom::load(
            store.clone(),
            syncline_core::Keypair::from_seed([3; 32]),
            &room,
        )
        .unwrap();
        for i in 0..5 {
            durable
                .transact(1_000 + i, |tx| {
                    tx.set("/k", "v", syncline_core::Value::Int(i as i64))
                })
                .unwrap();
        }
        durable.checkpoint().unwrap();
        durable.room().state_hash()
    };
    // Back to schema 1 as it was: counts in the rooms' rows, foreign keys,
    // no checkpoint coverage column.
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "ALTER TABLE syncline_rooms ADD COLUMN node_count BIGINT NOT NULL DEFAULT 0; \
             UPDATE syncline_rooms SET node_count = 5; \
             ALTER TABLE syncline_checkpoints DROP COLUMN nodes; \
             ALTER TABLE syncline_segments ADD CONSTRAINT syncline_segments_room_fkey \
                 FOREIGN KEY (room) REFERENCES syncline_rooms (key); \
             ALTER TABLE syncline_signatures ADD CONSTRAINT syncline_signatures_room_fkey \
                 FOREIGN KEY (room) REFERENCES syncline_rooms (key); \
             UPDATE syncline_schema SET version = 1",
        )
        .unwrap();
    let store = std::sync::Arc::new(PgStore::open(&url, PgOptions::default()).unwrap());
    assert_eq!(store.node_count(&room).unwrap(), 5);
    assert_eq!(store.load_tail(&room, 5).unwrap().checkpointed, 5);
    let reopened =
        syncline_store::DurableRoom::load(store, syncline_core::Keypair::from_seed([3; 32]), &room)
            .unwrap();
    assert_eq!(reopened.opened().from_checkpoint, 5);
    assert_eq!(reopened.room().state_hash(), checkpoint);
    let version: i32 = admin
        .query_one("SELECT version FROM syncline_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 3);
}

#[test]
fn waiting_for_a_lock_held_elsewhere_times_out() {
    let Some(url) = fresh_database() else { return };
    let a = PgStore::open(&url, PgOptions::default()).unwrap();
    let b = PgStore::open(
        &url,
        PgOptions {
            lock_timeout: std::time::Duration::from_millis(300),
            ..PgOptions::default()
        },
    )
    .unwrap();
    let _held = a.lock("busy/room").unwrap();
    let started = std::time::Instant::now();
    let waited = b.lock("busy/room");
    assert!(waited.is_err(), "B waited past its lock timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // B's lock connection is usable again afterwards.
    assert!(b.lock("other/room").unwrap().is_some());
}

#[test]
fn tools_open_only_a_database_relays_set_up() {
    let Some(url) = fresh_database() else { return };
    let refused = PgStore::open_existing(&url, PgOptions::default());
    assert!(
        matches!(&refused, Err(StoreError::Corrupt(why)) if why.contains("no Syncline tables")),
        "{refused:?}"
    );
    drop(PgStore::open(&url, PgOptions::default()).unwrap());
    PgStore::open_existing(&url, PgOptions::default()).unwrap();
}
