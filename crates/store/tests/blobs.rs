//! The blob store: streamed puts that dedupe, receiving in any order with
//! each group checked, resuming after a crash, quotas, garbage collection,
//! and encryption at rest (the bytes on disk are never the plaintext).

use std::io::Read;
use std::time::{Duration, SystemTime};

use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use syncline_core::blob::{GROUP_BYTES, Outboard, group_range};
use syncline_store::{BlobKey, BlobState, BlobStore, BlobStoreError, BlobStoreOptions};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes
}

fn read_all(store: &BlobStore, hash: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    store.reader(hash).unwrap().read_to_end(&mut out).unwrap();
    out
}

#[test]
fn puts_stream_dedupe_and_read_back_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), BlobStoreOptions::default()).unwrap();
    for len in [0, 1, GROUP_BYTES, 3 * GROUP_BYTES + 17] {
        let data = random_bytes(len, len as u64);
        let (hash, size) = store.put(&data[..]).unwrap();
        assert_eq!(hash, *blake3::hash(&data).as_bytes());
        assert_eq!(size, len as u64);
        assert_eq!(store.state(&hash).unwrap(), BlobState::Complete { size });
        assert_eq!(read_all(&store, &hash), data);
        let used = store.used();
        store.put(&data[..]).unwrap();
        assert_eq!(store.used(), used, "a blob held is not stored twice");
    }
    assert_eq!(store.list().unwrap().len(), 4);
}

#[test]
fn groups_arrive_in_any_order_bad_ones_are_refused_and_a_crash_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(40 * GROUP_BYTES + 123, 9);
    let (hash, outboard) = Outboard::of(&data);
    let group = |i: u64| {
        let r = group_range(data.len() as u64, i);
        data[r.start as usize..r.end as usize].to_vec()
    };
    let mut order: Vec<u64> = (0..outboard.groups()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(1));
    let options = BlobStoreOptions {
        sync_every_groups: 4,
        ..BlobStoreOptions::default()
    };
    {
        let store = BlobStore::open(dir.path(), options.clone()).unwrap();
        assert_eq!(store.begin(&hash, &outboard).unwrap().count(), 0);
        // A corrupted group is refused at once, and not marked held.
        let mut bad = group(order[0]);
        bad[7] ^= 0x40;
        assert!(matches!(
            store.write_group(&hash, order[0], &bad),
            Err(BlobStoreError::Blob(_))
        ));
        for &i in &order[..21] {
            store.write_group(&hash, i, &group(i)).unwrap();
        }
        // "Crash": the store goes away mid-transfer.
    }
    let store = BlobStore::open(dir.path(), options).unwrap();
    let held = store.begin(&hash, &outboard).unwrap();
    // What was synced (every 4 groups) survived; nothing unsynced is
    // claimed.
    assert_eq!(held.count(), 20);
    assert!(order[..20].iter().all(|&i| held.has(i)));
    let missing: Vec<u64> = held.missing().into_iter().flatten().collect();
    assert_eq!(missing.len(), order.len() - 20);
    let mut last = None;
    for i in missing {
        last = Some(store.write_group(&hash, i, &group(i)).unwrap());
    }
    assert!(last.unwrap().complete);
    assert_eq!(
        store.state(&hash).unwrap(),
        BlobState::Complete {
            size: data.len() as u64
        }
    );
    assert_eq!(read_all(&store, &hash), data);
    // A group of a complete blob, written again, changes nothing.
    let again = store.write_group(&hash, 0, &group(0)).unwrap();
    assert!(again.complete);
    // A forged outboard is refused before anything is written.
    let (_, other) = Outboard::of(&random_bytes(40 * GROUP_BYTES + 123, 10));
    assert!(store.begin(&hash, &other).is_err());
}

#[test]
fn blobs_are_encrypted_at_rest_and_keys_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let key = |id: u32, byte: u8| BlobKey {
        id,
        key: [byte; 32],
    };
    // Plaintext that is easy to find on disk.
    let marker = b"PLAINTEXT-MARKER-0123456789";
    let data: Vec<u8> = marker
        .iter()
        .copied()
        .cycle()
        .take(5 * GROUP_BYTES)
        .collect();
    let first = BlobStore::open(
        dir.path(),
        BlobStoreOptions {
            keys: vec![key(1, 7)],
            current_key: Some(1),
            ..BlobStoreOptions::default()
        },
    )
    .unwrap();
    let (hash, _) = first.put(&data[..]).unwrap();
    drop(first);
    let mut on_disk = Vec::new();
    for entry in walk(dir.path()) {
        on_disk.extend(std::fs::read(entry).unwrap());
    }
    assert!(
        !on_disk.windows(marker.len()).any(|w| w == marker),
        "the plaintext is on disk"
    );
    // Rotated: key 2 is current, key 1 still reads the old blob.
    let rotated = BlobStore::open(
        dir.path(),
        BlobStoreOptions {
            keys: vec![key(1, 7), key(2, 8)],
            current_key: Some(2),
            ..BlobStoreOptions::default()
        },
    )
    .unwrap();
    assert_eq!(read_all(&rotated, &hash), data);
    let (newer, _) = rotated.put(&random_bytes(1000, 3)[..]).unwrap();
    assert_eq!(rotated.read_group(&newer, 0).unwrap().len(), 1000);
    drop(rotated);
    // Without the key, or with another under its id: refused, typed.
    let keyless = BlobStore::open(dir.path(), BlobStoreOptions::default()).unwrap();
    assert!(matches!(
        keyless.read_group(&hash, 0),
        Err(BlobStoreError::UnknownKey(1))
    ));
    let wrong = BlobStore::open(
        dir.path(),
        BlobStoreOptions {
            keys: vec![key(1, 9)],
            ..BlobStoreOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(
        wrong.read_group(&hash, 0),
        Err(BlobStoreError::Damaged { .. })
    ));
    assert!(
        BlobStore::open(
            dir.path(),
            BlobStoreOptions {
                current_key: Some(3),
                ..BlobStoreOptions::default()
            }
        )
        .is_err()
    );
}

#[test]
fn damage_on_disk_is_detected_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), BlobStoreOptions::default()).unwrap();
    let data = random_bytes(3 * GROUP_BYTES, 4);
    let (hash, _) = store.put(&data[..]).unwrap();
    let path = walk(dir.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[GROUP_BYTES + 5] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(store.read_group(&hash, 0).is_ok());
    assert!(matches!(
        store.read_group(&hash, 1),
        Err(BlobStoreError::Damaged { .. })
    ));
}

#[test]
fn quotas_refuse_and_garbage_collection_frees() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(
        dir.path(),
        BlobStoreOptions {
            max_bytes: 3 * GROUP_BYTES as u64,
            ..BlobStoreOptions::default()
        },
    )
    .unwrap();
    let (kept, _) = store.put(&random_bytes(GROUP_BYTES, 1)[..]).unwrap();
    let (dropped, _) = store.put(&random_bytes(GROUP_BYTES, 2)[..]).unwrap();
    match store.put(&random_bytes(2 * GROUP_BYTES, 3)[..]) {
        Err(BlobStoreError::QuotaExceeded { used, max, .. }) => {
            assert_eq!(
                (used, max),
                (2 * GROUP_BYTES as u64, 3 * GROUP_BYTES as u64)
            );
        }
        other => panic!("{other:?}"),
    }
    let grace = Duration::from_secs(3600);
    let referenced = |h: &[u8; 32]| *h == kept;
    // Within the grace period nothing goes.
    assert!(
        store
            .collect_garbage(&referenced, grace, SystemTime::now())
            .unwrap()
            .is_empty()
    );
    let later = SystemTime::now() + grace;
    assert_eq!(
        store.collect_garbage(&referenced, grace, later).unwrap(),
        vec![dropped]
    );
    assert_eq!(store.used(), GROUP_BYTES as u64);
    assert_eq!(store.state(&dropped).unwrap(), BlobState::Missing);
    store.put(&random_bytes(2 * GROUP_BYTES, 3)[..]).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "refused puts leave nothing behind"
    );
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn garbage_collection_keeps_every_blob_an_owner_ever_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path(), BlobStoreOptions::default()).unwrap();
    let (photo, _) = store.put(&random_bytes(GROUP_BYTES, 4)[..]).unwrap();
    let (draft, _) = store.put(&random_bytes(GROUP_BYTES, 5)[..]).unwrap();
    let (orphan, _) = store.put(&random_bytes(GROUP_BYTES, 6)[..]).unwrap();
    store.add_refs("team/notes", &[photo]).unwrap();
    store.add_refs("team/notes", &[photo, draft]).unwrap();
    // A record torn by a crash is cut off before the next append.
    let refs: Vec<_> = std::fs::read_dir(dir.path().join("refs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "complete")
        .collect();
    assert_eq!(refs.len(), 1, "one file per owner");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&refs[0])
        .unwrap();
    std::io::Write::write_all(&mut file, &[9; 7]).unwrap();
    store.add_refs("other", &[]).unwrap();
    let grace = Duration::from_secs(60);
    let later = SystemTime::now() + grace;
    assert_eq!(
        store.collect_unreferenced(grace, later).unwrap(),
        vec![orphan]
    );
    assert!(matches!(
        store.state(&photo).unwrap(),
        BlobState::Complete { .. }
    ));
    assert!(matches!(
        store.state(&draft).unwrap(),
        BlobState::Complete { .. }
    ));
    // Reopened, the index is still complete and still read.
    drop(store);
    let store = BlobStore::open(dir.path(), BlobStoreOptions::default()).unwrap();
    store.add_refs("team/notes", &[[1; 32]]).unwrap();
    assert!(store.collect_unreferenced(grace, later).unwrap().is_empty());
    assert_eq!(std::fs::metadata(&refs[0]).unwrap().len(), 3 * 32);

    // A store that held blobs before it kept an index collects nothing.
    let old = tempfile::tempdir().unwrap();
    let store = BlobStore::open(old.path(), BlobStoreOptions::default()).unwrap();
    store.put(&random_bytes(GROUP_BYTES, 7)[..]).unwrap();
    drop(store);
    std::fs::remove_dir_all(old.path().join("refs")).unwrap();
    let store = BlobStore::open(old.path(), BlobStoreOptions::default()).unwrap();
    assert!(matches!(
        store.collect_unreferenced(grace, later),
        Err(BlobStoreError::NoRefIndex)
    ));
}
