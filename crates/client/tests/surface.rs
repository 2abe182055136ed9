//! The SDK surface an app uses: change events with what changed, filtered
//! subscriptions that end when dropped, async waits, and rooms added to
//! and removed from a running sync.

use std::time::Duration;

use futures_util::StreamExt;
use syncline::{Origin, Replica, SyncOptions, TextChange};

mod common;

use common::{WAIT, relay, relay_with};

#[test]
fn changes_carry_old_and_new_values_and_text_edits() {
    let notes = Replica::in_memory().unwrap().room("notes").unwrap();
    notes
        .transact(|tx| tx.set("/todo/1", "title", "milk".into()))
        .unwrap();
    let all = notes.changes();
    notes
        .transact(|tx| {
            tx.set("/todo/1", "title", "bread".into())?;
            tx.unset("/todo/1", "title")?;
            tx.set("/todo/1", "title", "eggs".into())?;
            tx.text_insert("/doc", 0, "hello world")?;
            tx.text_delete("/doc", 0, 6)?;
            tx.text_insert("/doc", 5, "!")
        })
        .unwrap();
    let change = all.recv_timeout(WAIT).unwrap();
    assert_eq!(change.origin, Origin::Local);
    let values: Vec<(Option<String>, Option<String>)> = change
        .fields
        .iter()
        .map(|f| {
            (
                f.old.as_ref().and_then(|v| v.as_str().map(str::to_owned)),
                f.new.as_ref().and_then(|v| v.as_str().map(str::to_owned)),
            )
        })
        .collect();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        values,
        [
            (s("milk"), s("bread")),
            (s("bread"), None),
            (None, s("eggs"))
        ]
    );
    // Replaying the edits on the old text gives the new one.
    let mut text: Vec<char> = Vec::new();
    for TextChange {
        pos,
        deleted,
        inserted,
        ..
    } in &change.texts
    {
        text.splice(*pos..pos + deleted, inserted.chars());
    }
    assert_eq!(text.iter().collect::<String>(), notes.text("/doc").unwrap());
    assert_eq!(notes.text("/doc").unwrap(), "world!");
}

#[test]
fn subscriptions_filter_by_pattern_and_end_when_dropped() {
    let notes = Replica::in_memory().unwrap().room("notes").unwrap();
    let todo = notes.subscribe("/todo/**").unwrap();
    let dropped = notes.subscribe("/todo/**").unwrap();
    drop(dropped);
    notes
        .transact(|tx| {
            tx.set("/todo/1", "title", "milk".into())?;
            tx.set("/other", "n", 1.into())
        })
        .unwrap();
    notes
        .transact(|tx| tx.set("/other", "n", 2.into()))
        .unwrap();
    let change = todo.try_recv().expect("the change under /todo");
    assert!(
        change.paths.iter().all(|p| p.starts_with("/todo")),
        "{change:?}"
    );
    assert_eq!(change.fields.len(), 1, "only the field inside: {change:?}");
    assert!(
        todo.try_recv().is_none(),
        "the change outside is not delivered"
    );
    assert!(matches!(
        notes.subscribe("no-slash"),
        Err(syncline::Error::Pattern { .. })
    ));
}

#[test]
fn a_subscriber_that_falls_behind_is_told_how_much_it_missed() {
    let notes = Replica::in_memory().unwrap().room("notes").unwrap();
    let slow = notes.changes();
    let extra = 10;
    for i in 0..syncline::SUBSCRIPTION_QUEUE + extra {
        notes
            .transact(|tx| tx.set("/n", "v", (i as i64).into()))
            .unwrap();
    }
    for _ in 0..syncline::SUBSCRIPTION_QUEUE {
        assert_eq!(slow.try_recv().unwrap().missed, 0);
    }
    assert!(slow.try_recv().is_none());
    notes.transact(|tx| tx.set("/n", "v", (-1).into())).unwrap();
    assert_eq!(slow.try_recv().unwrap().missed, extra);
}

#[test]
fn async_waits_and_rooms_added_and_removed_while_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let (url, runtime) = relay(&dir.path().join("relay"));
    let a = Replica::in_memory().unwrap();
    let b = Replica::in_memory().unwrap();
    a.room("one")
        .unwrap()
        .transact(|tx| tx.set("/x", "v", 1.into()))
        .unwrap();
    a.room("two")
        .unwrap()
        .transact(|tx| tx.set("/y", "v", 2.into()))
        .unwrap();
    let sync = a.connect(&[url.as_str()], &["one"]).unwrap();
    runtime.block_on(async {
        sync.flush_async(WAIT).await.unwrap();
        let mut updates = std::pin::pin!(sync.status_updates());
        let first = updates.next().await.unwrap();
        assert!(first.connected && first.unacknowledged == 0, "{first:?}");
        // A room added to the running sync uploads over the same connection.
        sync.add_room("two").unwrap();
        assert_eq!(sync.rooms(), ["one", "two"]);
        sync.flush_async(WAIT).await.unwrap();
    });
    assert_eq!(a.room("two").unwrap().unacknowledged().unwrap(), 0);
    // A removed room is no longer synced: its new writes stay local.
    assert!(sync.remove_room("one"));
    assert!(!sync.remove_room("one"));
    a.room("one")
        .unwrap()
        .transact(|tx| tx.set("/x", "v", 3.into()))
        .unwrap();
    sync.flush(WAIT).unwrap();
    assert_eq!(a.room("one").unwrap().unacknowledged().unwrap(), 1);
    // Another replica sees room two's data and room one's first value.
    let reader = b.connect(&[url.as_str()], &["one", "two"]).unwrap();
    reader.flush(WAIT).unwrap();
    assert_eq!(
        b.room("two").unwrap().get("/y", "v").unwrap(),
        Some(2.into())
    );
    assert_eq!(
        b.room("one").unwrap().get("/x", "v").unwrap(),
        Some(1.into())
    );
    // Added again, it gets a new session on the same connection and
    // uploads what waited.
    sync.add_room("one").unwrap();
    sync.flush(WAIT).unwrap();
    assert_eq!(a.room("one").unwrap().unacknowledged().unwrap(), 0);
    let b_one = b.room("one").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while b_one.get("/x", "v").unwrap() != Some(3.into()) {
        assert!(std::time::Instant::now() < deadline, "never relayed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A flush that cannot finish says why, typed.
    let offline = Replica::in_memory().unwrap();
    let nowhere = offline.connect(&["ws://127.0.0.1:1/ws"], &["one"]).unwrap();
    match nowhere.flush(Duration::from_millis(300)) {
        Err(syncline::Error::Timeout {
            connected: false, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_subscription_holds_a_bounded_number_of_bytes() {
    let notes = Replica::in_memory().unwrap().room("notes").unwrap();
    let slow = notes.changes();
    // Each change carries about 2 x 100 KB (old and new value).
    let value = |i: usize| syncline::Value::from(format!("{i:06}{}", "x".repeat(100_000)));
    let sent = 400;
    for i in 0..sent {
        notes.transact(|tx| tx.set("/n", "v", value(i))).unwrap();
    }
    let mut received = 0;
    while slow.try_recv().is_some() {
        received += 1;
    }
    assert!(
        received < sent && received * 200_000 <= syncline::SUBSCRIPTION_BYTES + 200_000,
        "{received} of {sent} changes queued"
    );
    notes.transact(|tx| tx.set("/n", "v", value(0))).unwrap();
    assert_eq!(slow.try_recv().unwrap().missed, sent - received);
}

#[test]
fn presence_is_shown_to_peers_updated_and_withdrawn_when_a_replica_leaves() {
    use syncline::{PresenceKind, PresenceStatus};
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    let a = Replica::in_memory().unwrap();
    let b = Replica::in_memory().unwrap();
    let (room_a, room_b) = (a.room("team").unwrap(), b.room("team").unwrap());
    // Shown before connecting: sent once the session opens.
    room_a
        .set_presence(PresenceStatus::Online, "here", b"cursor 1")
        .unwrap();
    let events = room_b.presence_events();
    let sync_b = b.connect(&[url.as_str()], &["team"]).unwrap();
    sync_b.flush(WAIT).unwrap();
    let sync_a = a.connect(&[url.as_str()], &["team"]).unwrap();
    let joined = events.recv_timeout(WAIT).unwrap();
    assert_eq!(joined.kind, PresenceKind::Joined);
    assert_eq!(joined.peer.peer, a.author());
    assert_eq!(
        (
            joined.peer.status,
            joined.peer.message.as_str(),
            &joined.peer.data[..]
        ),
        (PresenceStatus::Online, "here", &b"cursor 1"[..])
    );
    room_a
        .set_presence(PresenceStatus::Busy, "in a meeting", b"")
        .unwrap();
    let updated = events.recv_timeout(WAIT).unwrap();
    assert_eq!(
        (updated.kind, updated.peer.status),
        (PresenceKind::Updated, PresenceStatus::Busy)
    );
    assert_eq!(room_b.peers().len(), 1);
    // Too large to show: refused before anything is sent.
    assert!(matches!(
        room_a.set_presence(PresenceStatus::Online, &"x".repeat(300), b""),
        Err(syncline::Error::Presence { .. })
    ));
    // A leaves: B hears it, and shows no one.
    sync_a.stop();
    let left = events.recv_timeout(WAIT).unwrap();
    assert_eq!(left.kind, PresenceKind::Left);
    assert!(room_b.peers().is_empty());
}

/// One replica puts a 5 MiB blob and leaves; another fetches it. The
/// bytes go over direct URLs if the relay serves them (`relay_urls`) and
/// the SDK may use them (`sdk_urls`), else over the session.
fn blob_put_then_fetched_after_the_first_left(relay_urls: bool, sdk_urls: bool) {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay_with(&dir.path().join("relay"), |c| {
        if !relay_urls {
            c.blob_url_ttl = None;
        }
    });
    let options = || SyncOptions {
        blob_urls: sdk_urls,
        ..SyncOptions::new(&[url.as_str()])
    };
    let a = Replica::open(dir.path().join("a")).unwrap();
    let b = Replica::open(dir.path().join("b")).unwrap();
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 77u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let blob = a
        .room("files")
        .unwrap()
        .put_blob("/docs/report", "pdf", &data[..], "application/pdf")
        .unwrap();
    assert_eq!(blob.hash, *blake3::hash(&data).as_bytes());
    let sync_a = a.connect_with(options(), &["files"]).unwrap();
    sync_a.flush(WAIT).unwrap();
    assert_eq!(sync_a.status().blobs_uploading, 0);
    drop(sync_a);
    drop(a);
    // B syncs the room, finds the reference, and fetches the bytes.
    let sync_b = b.connect_with(options(), &["files"]).unwrap();
    sync_b.flush(WAIT).unwrap();
    let files = b.room("files").unwrap();
    let found = files.get("/docs/report", "pdf").unwrap().unwrap();
    let reference = found.as_blob().unwrap();
    assert_eq!(reference.size, data.len() as u64);
    files.fetch_blob(&reference.hash, WAIT).unwrap();
    let mut got = Vec::new();
    b.blob_reader(&reference.hash)
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data, "the fetched bytes differ");
    // A blob the room does not know is refused, typed.
    match files.fetch_blob(&[9; 32], WAIT) {
        Err(syncline::Error::BlobRefused { why }) => assert!(why.contains("not_found"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_blob_put_by_one_replica_is_fetched_by_another_over_direct_urls() {
    blob_put_then_fetched_after_the_first_left(true, true);
}

#[test]
fn a_blob_goes_over_the_session_when_the_relay_serves_no_urls() {
    blob_put_then_fetched_after_the_first_left(false, true);
}

#[test]
fn a_blob_goes_over_the_session_when_the_sdk_uses_no_urls() {
    blob_put_then_fetched_after_the_first_left(true, false);
}

#[test]
fn the_relay_removes_blobs_no_room_references_and_keeps_the_rest() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let relay_dir = dir.path().join("relay");
    let (url, _runtime) = relay_with(&relay_dir, |c| {
        c.blob_gc_every = Duration::from_millis(200);
        c.blob_gc_grace = Duration::from_millis(300);
    });
    let a = Replica::open(dir.path().join("a")).unwrap();
    let room = a.room("files").unwrap();
    // One blob referenced by a field (then replaced: history still names
    // it), one uploaded that no node ever names.
    let old = room
        .put_blob("/doc", "file", &b"first draft"[..], "text/plain")
        .unwrap();
    let new = room
        .put_blob("/doc", "file", &b"second draft"[..], "text/plain")
        .unwrap();
    let orphan = a.put_blob(&b"never referenced"[..], "text/plain").unwrap();
    room.upload_blob(&orphan.hash).unwrap();
    let sync = a.connect(&[url.as_str()], &["files"]).unwrap();
    sync.flush(WAIT).unwrap();
    assert_eq!(sync.status().blobs_uploading, 0);
    let relay_blobs = syncline_store::BlobStore::open(
        &relay_dir.join("blobs"),
        syncline_store::BlobStoreOptions::default(),
    )
    .unwrap();
    common::wait_until(|| relay_blobs.state(&orphan.hash).unwrap() == syncline::BlobState::Missing);
    for kept in [old.hash, new.hash] {
        assert!(matches!(
            relay_blobs.state(&kept).unwrap(),
            syncline::BlobState::Complete { .. }
        ));
    }
}

#[test]
fn the_prefetch_policy_fetches_small_blobs_under_its_paths_only() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _runtime) = relay(&dir.path().join("relay"));
    let a = Replica::open(dir.path().join("a")).unwrap();
    let room = a.room("album").unwrap();
    let small = room
        .put_blob("/photos/beach", "jpg", &[1u8; 1000][..], "image/jpeg")
        .unwrap();
    let large = room
        .put_blob("/photos/pano", "jpg", &vec![2u8; 2 << 20][..], "image/jpeg")
        .unwrap();
    let elsewhere = room
        .put_blob("/docs/notes", "txt", &[3u8; 1000][..], "text/plain")
        .unwrap();
    let sync_a = a.connect(&[url.as_str()], &["album"]).unwrap();
    sync_a.flush(WAIT).unwrap();
    assert_eq!(sync_a.status().blobs_uploading, 0);

    let b = Replica::open(dir.path().join("b")).unwrap();
    let options = SyncOptions {
        prefetch: Some(syncline::Prefetch {
            max_bytes: 1 << 20,
            paths: vec!["/photos/**".into()],
        }),
        ..SyncOptions::new(&[url.as_str()])
    };
    let sync_b = b.connect_with(options, &["album"]).unwrap();
    sync_b.flush(WAIT).unwrap();
    common::wait_until(|| {
        matches!(
            b.blob_state(&small.hash).unwrap(),
            syncline::BlobState::Complete { .. }
        )
    });
    // What the policy leaves out stays on the relay until asked for.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for skipped in [&large, &elsewhere] {
        assert_eq!(
            b.blob_state(&skipped.hash).unwrap(),
            syncline::BlobState::Missing
        );
    }
    // A bad pattern is refused when the engine starts.
    let bad = SyncOptions {
        prefetch: Some(syncline::Prefetch {
            max_bytes: 1,
            paths: vec!["photos".into()],
        }),
        ..SyncOptions::new(&[url.as_str()])
    };
    drop(sync_b);
    assert!(matches!(
        b.connect_with(bad, &["album"]),
        Err(syncline::Error::Pattern { .. })
    ));
}
