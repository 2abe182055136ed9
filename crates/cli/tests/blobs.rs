//! Blobs through real processes: `syncline blob put`, `sync` and `blob
//! get` against a `syncline serve`, over direct URLs and over the
//! session, interrupted and resumed, refused past a quota or without the
//! right, and never stored in the clear by a relay given a key.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Server, author, cli, issue_token, ok, run};

const MIB: usize = 1 << 20;

/// A file of `size` bytes that do not compress, and its BLAKE3 hash.
fn file_of(dir: &Path, name: &str, size: usize, seed: u64) -> (PathBuf, blake3::Hash) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, blake3::hash(&data))
}

fn hash_of(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

/// Bytes the relay moved over direct URLs, in `direction`.
fn direct_bytes(server: &Server, direction: &str) -> f64 {
    server.metric(&format!(
        "syncline_blob_http_bytes_total{{direction=\"{direction}\"}}"
    ))
}

/// `blob put media /media big FILE` on `replica`.
fn put(replica: &Path, file: &Path) {
    let file = file.to_str().unwrap();
    ok(replica, &["blob", "put", "media", "/media", "big", file]);
}

/// `sync --server URL --timeout 20 media [extra...]` on `replica`: (exit
/// code, stderr).
fn sync(replica: &Path, server: &Server, extra: &[&str]) -> (i32, String) {
    let url = server.url();
    let mut args = vec!["sync", "--server", &url, "--timeout", "20", "media"];
    args.extend_from_slice(extra);
    let (code, _, err) = run(replica, &args, &[]);
    (code, err)
}

/// Puts `file` at `/media big` of room `media` on a fresh replica and
/// syncs it up; returns the replica.
fn put_and_upload(dir: &Path, name: &str, server: &Server, file: &Path) -> PathBuf {
    let replica = dir.join(name);
    put(&replica, file);
    ok(
        &replica,
        &[
            "sync",
            "--server",
            &server.url(),
            "--timeout",
            "120",
            "media",
        ],
    );
    replica
}

/// `blob get media /media big -o OUT --server URL` on `replica`.
fn get(replica: &Path, server: &Server, out: &Path) {
    let (out, url) = (out.to_str().unwrap(), server.url());
    let args = [
        "blob", "get", "media", "/media", "big", "-o", out, "--server", &url,
    ];
    ok(replica, &args);
}

/// `blob get` of `/media big` into `out` on `replica` (synced first).
fn sync_and_get(replica: &Path, server: &Server, out: &Path) {
    ok(replica, &["sync", "--server", &server.url(), "media"]);
    get(replica, server, out);
}

#[test]
fn a_100_mib_blob_is_fetched_after_its_uploader_went_away_over_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (file, hash) = file_of(dir.path(), "big.bin", 100 * MIB, 1);
    // Over the session a peer's bytes meet the relay's byte rate (a burst
    // of 64 MiB by default): raised here, as an operator expecting large
    // uploads without direct URLs would.
    let session = [
        "--no-blob-urls",
        "--peer-bytes-per-sec",
        "1000000000",
        "--peer-burst-bytes",
        "1000000000",
    ];
    for (path, extra) in [("direct", &[][..]), ("session", &session[..])] {
        let server = Server::start(&dir.path().join(format!("relay-{path}")), extra);
        let a = put_and_upload(dir.path(), &format!("a-{path}"), &server, &file);
        std::fs::remove_dir_all(&a).unwrap();
        let b = dir.path().join(format!("b-{path}"));
        let out = dir.path().join(format!("got-{path}.bin"));
        let started = Instant::now();
        sync_and_get(&b, &server, &out);
        eprintln!("{path}: fetched 100 MiB in {:?}", started.elapsed());
        assert_eq!(hash_of(&out), hash, "{path}: the bytes differ");
        let (up, down) = (direct_bytes(&server, "in"), direct_bytes(&server, "out"));
        if path == "direct" {
            assert!(
                up >= (100 * MIB) as f64 && down >= (100 * MIB) as f64,
                "{up} {down}"
            );
        } else {
            assert_eq!((up, down), (0.0, 0.0), "no URL was served");
        }
        std::fs::remove_file(&out).unwrap();
    }
}

/// Groups of blob `/media big` that `replica` holds: (held, of).
fn held(replica: &Path) -> Option<(u64, u64)> {
    let (code, out, _) = run(replica, &["--json", "blob", "status"], &[]);
    if code != 0 {
        return None;
    }
    let rows: serde_json::Value = serde_json::from_str(&out).ok()?;
    let held = rows.get(0)?["held"].as_str()?.to_owned();
    if held == "all" {
        return Some((1, 1));
    }
    let (have, of) = held.strip_suffix(" groups")?.split_once('/')?;
    Some((have.parse().ok()?, of.parse().ok()?))
}

#[test]
fn an_interrupted_fetch_resumes_from_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("relay"), &[]);
    let (file, hash) = file_of(dir.path(), "big.bin", 100 * MIB, 2);
    put_and_upload(dir.path(), "a", &server, &file);
    // Fetch, and kill the fetching process once it holds part of the blob
    // (a fresh replica again if it finished first).
    let mut partial = None;
    for attempt in 0..5 {
        let b = dir.path().join(format!("b{attempt}"));
        ok(&b, &["sync", "--server", &server.url(), "media"]);
        let mut get = Command::new(BIN)
            .arg("--replica")
            .arg(&b)
            .args(["blob", "get", "media", "/media", "big", "-o"])
            .arg(dir.path().join("first.bin"))
            .args(["--server", &server.url()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            match held(&b) {
                Some((have, of)) if have > 0 && have < of => break Some((have, of)),
                Some((have, of)) if have == of => break None,
                _ => {}
            }
            assert!(Instant::now() < deadline, "the fetch did not start");
            std::thread::sleep(Duration::from_millis(5));
        };
        get.kill().unwrap();
        get.wait().unwrap();
        if let Some(seen) = seen {
            partial = Some((b, seen));
            break;
        }
    }
    let (b, (have, of)) = partial.expect("every fetch finished before it could be interrupted");
    let (kept, _) = held(&b).unwrap();
    eprintln!("interrupted holding {have} of {of} groups ({kept} kept on disk)");
    // Again: only what is lacking moves.
    let before = direct_bytes(&server, "out");
    let out = dir.path().join("got.bin");
    get(&b, &server, &out);
    assert_eq!(hash_of(&out), hash);
    let moved = direct_bytes(&server, "out") - before;
    let lacking = ((of - kept) * 65_536) as f64;
    eprintln!("the resumed fetch moved {moved} bytes; {lacking} were lacking");
    assert!(moved <= lacking, "{moved} bytes moved, {lacking} lacking");
}

#[test]
fn uploads_past_the_quota_or_without_the_right_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = file_of(dir.path(), "two.bin", 2 * MIB, 3);
    // The relay keeps 1 MB of blobs.
    let server = Server::start(&dir.path().join("relay"), &["--max-blob-bytes", "1000000"]);
    let a = dir.path().join("a");
    put(&a, &file);
    let (code, err) = sync(&a, &server, &[]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("quota_exceeded"), "{err}");
    drop(server);

    // A locked room, a reader's token: its blob does not go up.
    let server = Server::start(&dir.path().join("locked"), &["--locked"]);
    let reader = dir.path().join("reader");
    let token = issue_token(
        &server.data,
        &author(&reader),
        &["--room", "media", "--rights", "read"],
    );
    put(&reader, &file);
    let (code, err) = sync(&reader, &server, &["--token", &token]);
    assert_eq!(code, 6, "{err}");
    assert!(
        err.contains("unauthorized") || err.contains("reading only"),
        "{err}"
    );
}

#[test]
fn a_relay_with_a_key_never_stores_blob_bytes_in_the_clear() {
    let dir = tempfile::tempdir().unwrap();
    let marker = b"SYNCLINE-PLAINTEXT-MARKER-";
    let data: Vec<u8> = marker.iter().copied().cycle().take(3 * MIB).collect();
    let file = dir.path().join("clear.txt");
    std::fs::write(&file, &data).unwrap();
    let key1 = format!("1={}", "11".repeat(32));
    let key2 = format!("2={}", "22".repeat(32));
    let relay = dir.path().join("relay");
    let mut server = Server::start(&relay, &["--blob-key", &key1]);
    put_and_upload(dir.path(), "a", &server, &file);
    // No file under the relay's blobs holds the marker.
    let mut files = vec![relay.join("blobs")];
    let mut scanned = 0;
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            scanned += bytes.len();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "{} holds plaintext",
                path.display()
            );
        }
    }
    assert!(scanned >= 3 * MIB, "only {scanned} bytes under blobs/");
    // After a key rotation (the old key still reads), a reader gets the
    // same bytes; without the old key the relay cannot serve them.
    server.kill9();
    let mut server = Server::start(&relay, &["--blob-key", &key1, "--blob-key", &key2]);
    let out = dir.path().join("got.txt");
    sync_and_get(&dir.path().join("b"), &server, &out);
    assert!(std::fs::read(&out).unwrap() == data);
    server.kill9();
    let server = Server::start(&relay, &["--blob-key", &key2]);
    let c = dir.path().join("c");
    ok(&c, &["sync", "--server", &server.url(), "media"]);
    let (code, _) = cli(
        &c,
        &[
            "blob",
            "get",
            "media",
            "/media",
            "big",
            "-o",
            "/dev/null",
            "--server",
            &server.url(),
            "--timeout",
            "10",
        ],
    );
    assert_ne!(code, 0, "served a blob without its key");
}

#[test]
fn sync_with_prefetch_brings_the_blobs_under_its_paths() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("relay"), &[]);
    let (small, _) = file_of(dir.path(), "small.bin", 300_000, 4);
    let (large, _) = file_of(dir.path(), "large.bin", 3 * MIB, 5);
    let a = dir.path().join("a");
    ok(
        &a,
        &[
            "blob",
            "put",
            "media",
            "/media/small",
            "f",
            small.to_str().unwrap(),
        ],
    );
    ok(
        &a,
        &[
            "blob",
            "put",
            "media",
            "/media/large",
            "f",
            large.to_str().unwrap(),
        ],
    );
    ok(
        &a,
        &[
            "blob",
            "put",
            "media",
            "/other/small",
            "f",
            small.to_str().unwrap(),
        ],
    );
    ok(&a, &["sync", "--server", &server.url(), "media"]);
    let b = dir.path().join("b");
    ok(
        &b,
        &[
            "sync",
            "--server",
            &server.url(),
            "--prefetch",
            "/media/**",
            "--prefetch-max",
            "1000000",
            "media",
        ],
    );
    // The small blob is held; the large one was left for `blob get`.
    let status = ok(&b, &["blob", "status"]);
    assert_eq!(status.lines().count(), 1, "{status}");
    assert!(status.contains("300000 bytes  all"), "{status}");
    assert_eq!(
        cli(&b, &["sync", "--prefetch-max", "5", "media"]).0,
        2,
        "--prefetch-max needs --prefetch"
    );
}
