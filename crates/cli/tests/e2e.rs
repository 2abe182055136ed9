//! End to end with real processes on 127.0.0.1: the built `syncline`
//! binary as server and as command-line client, and the SDK in this
//! process as an app would embed it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use syncline_store::{DurableRoom, SqliteOptions, SqliteStore};

mod common;

use common::{BIN, Server, WAIT, cli, ok};

fn node_count(replica: &Path, room: &str) -> u64 {
    let out = ok(replica, &["--json", "status", room]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["rooms"][0]["nodes"].as_u64().unwrap()
}

/// A TCP proxy for one connection that forwards everything to the server
/// but only the first `limit` bytes back, as a network that dies mid-way.
struct StallingProxy {
    port: u16,
    upstream: std::sync::Arc<std::sync::Mutex<Option<TcpStream>>>,
}

impl StallingProxy {
    fn start(server_port: u16, limit: usize) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(None));
        let slot = upstream.clone();
        std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let server = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
            *slot.lock().unwrap() = Some(server.try_clone().unwrap());
            let (mut from_client, mut to_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
                let _ = to_server.shutdown(std::net::Shutdown::Both);
            });
            let (mut from_server, mut to_client) = (server, client);
            let mut passed = 0;
            let mut buf = [0u8; 4096];
            while let Ok(n) = from_server.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let take = n.min(limit - passed);
                if take > 0 && to_client.write_all(&buf[..take]).is_err() {
                    break;
                }
                passed += take;
            }
        });
        StallingProxy { port, upstream }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// Ends the connection to the server.
    fn close(&self) {
        if let Some(s) = self.upstream.lock().unwrap().as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn three_replicas_edit_offline_sync_and_end_with_equal_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let url = server.url();
    let replicas: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("r{i}"))).collect();
    for (i, r) in replicas.iter().enumerate() {
        ok(
            r,
            &["set", "doc", "/shared", "by", &format!("\"replica {i}\"")],
        );
        ok(
            r,
            &["set", "doc", &format!("/own/{i}"), "n", &i.to_string()],
        );
        ok(
            r,
            &["text", "doc", "/notes", "insert", "0", &format!("[{i}]")],
        );
    }
    ok(&replicas[0], &["mv", "doc", "/own/0", "/moved"]);
    ok(&replicas[1], &["rm", "doc", "/own/1"]);
    // Two rounds: the first uploads, the second brings the others' edits.
    for _ in 0..2 {
        for r in &replicas {
            ok(r, &["sync", "--server", &url, "--once", "doc"]);
        }
    }
    let hashes: Vec<String> = replicas.iter().map(|r| ok(r, &["hash", "doc"])).collect();
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    let text = ok(&replicas[2], &["text", "doc", "/notes", "cat"]);
    for i in 0..3 {
        assert!(text.contains(&format!("[{i}]")), "{text}");
    }
    let (code, _) = cli(&replicas[2], &["get", "doc", "/own/1", "n"]);
    assert_eq!(code, 3, "a deleted entry reads as not found");
    let conflicts = ok(&replicas[2], &["--json", "conflicts", "doc"]);
    assert!(
        conflicts.contains("\"field\""),
        "the concurrent /shared writes: {conflicts}"
    );
}

#[test]
fn a_server_killed_with_sigkill_loses_no_acknowledged_node_and_clients_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut server = Server::start(&data, &[]);
    let writer = syncline::Replica::open(dir.path().join("writer")).unwrap();
    let room = writer.room("stream").unwrap();
    let sync = writer
        .connect(&[server.url().as_str()], &["stream"])
        .unwrap();
    sync.flush(WAIT).unwrap();
    let write = |i: usize| {
        room.transact(|tx| tx.set(&format!("/items/{}", i % 50), "n", (i as i64).into()))
            .unwrap();
    };
    for i in 0..150 {
        write(i);
        std::thread::sleep(Duration::from_millis(2));
    }
    server.kill9();
    // What the server acknowledged must be on its disk.
    let unacked: std::collections::HashSet<String> =
        room.unacknowledged_ids().unwrap().into_iter().collect();
    let acked: Vec<String> = room
        .log()
        .into_iter()
        .map(|node| node.id)
        .filter(|id| !unacked.contains(id))
        .collect();
    assert!(
        acked.len() > 50,
        "only {} acknowledged before the kill",
        acked.len()
    );
    {
        let store = SqliteStore::open(&data.join("relay.db"), SqliteOptions::default()).unwrap();
        let stored = DurableRoom::load(
            std::sync::Arc::new(store),
            syncline_core::Keypair::from_seed([0; 32]),
            &syncline_core::RoomId::new("stream").unwrap(),
        )
        .unwrap();
        let held: std::collections::HashSet<String> = stored
            .room()
            .dag()
            .id_index()
            .into_keys()
            .map(|id| id.to_string())
            .collect();
        let lost: Vec<&String> = acked.iter().filter(|id| !held.contains(*id)).collect();
        assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    }
    // Writes go on offline; the server comes back; the client resumes.
    for i in 150..200 {
        write(i);
    }
    server.spawn();
    sync.flush(WAIT).unwrap();
    assert_eq!(sync.status().unacknowledged, 0);
    let reader = dir.path().join("reader");
    ok(
        &reader,
        &["sync", "--server", &server.url(), "--once", "stream"],
    );
    assert_eq!(node_count(&reader, "stream"), 200);
    assert_eq!(
        ok(&reader, &["hash", "stream"]),
        syncline_core::ids::to_hex(&room.state_hash())
    );
}

#[test]
fn a_client_killed_mid_catch_up_resumes_where_it_stopped() {
    const TOTAL: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--max-pack-nodes", "4"]);
    // Written while connected, and flushed every few edits, so the upload
    // goes in small signed batches and the relay can re-ship any prefix in
    // small packs. (A history uploaded as one batch is signed at its end
    // and every 4,096 nodes, so a relay can only cut it there; on a loaded
    // machine the SDK batches whatever was committed while it waited.)
    let source = syncline::Replica::open(dir.path().join("source")).unwrap();
    let big = source.room("big").unwrap();
    let sync = source.connect(&[server.url().as_str()], &["big"]).unwrap();
    sync.flush(WAIT).unwrap(); // Connected before the first edit.
    for i in 0..TOTAL {
        big.transact(|tx| tx.set(&format!("/n/{}", i % 97), "v", (i as i64).into()))
            .unwrap();
        if i % 10 == 9 {
            sync.flush(WAIT).unwrap();
        }
    }
    sync.flush(WAIT).unwrap();
    drop(sync);

    // The first attempt goes through a proxy that passes only the first
    // few kilobytes back: the client imports some packs, then stalls, and
    // is killed there.
    let client = dir.path().join("client");
    let proxy = StallingProxy::start(server.port, 8_000);
    let mut child = Command::new(BIN)
        .arg("--replica")
        .arg(&client)
        .args(["sync", "--server", &proxy.url(), "--once", "big"])
        .env("SYNCLINE_LOG", "syncline=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("imported") {
            break;
        }
    }

    // Let it take in whatever else got through, then kill it.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.close();
    let deadline = Instant::now() + WAIT;
    while server.metric("syncline_sessions_open") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the server kept the dead session"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let partial = node_count(&client, "big");
    assert!(
        partial > 0 && partial < TOTAL,
        "held {partial} after the kill; the client logged:\n{}",
        seen.join("\n")
    );

    let before = server.metric("syncline_catchup_nodes_sum");
    ok(
        &client,
        &["sync", "--server", &server.url(), "--once", "big"],
    );
    let sent = server.metric("syncline_catchup_nodes_sum") - before;
    assert_eq!(node_count(&client, "big"), TOTAL);
    assert_eq!(
        sent as u64,
        TOTAL - partial,
        "the resumed catch-up sent more than the rest"
    );
    assert_eq!(
        ok(&client, &["hash", "big"]),
        syncline_core::ids::to_hex(&big.state_hash())
    );
}

#[test]
fn one_client_syncs_several_rooms_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let rooms = ["one", "two", "three"];
    for room in rooms {
        ok(&a, &["set", room, "/x", "room", &format!("\"{room}\"")]);
    }
    let before = server.metric("syncline_connections_total");
    let mut args = vec!["sync", "--server"];
    let url = server.url();
    args.push(&url);
    args.push("--once");
    args.extend(rooms);
    ok(&a, &args);
    assert_eq!(server.metric("syncline_connections_total") - before, 1.0);
    ok(&b, &args);
    for room in rooms {
        assert_eq!(ok(&b, &["get", room, "/x", "room"]), room);
        assert_eq!(ok(&a, &["hash", room]), ok(&b, &["hash", room]));
    }
}

#[test]
fn sigterm_closes_sessions_with_shutting_down_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("server"), &[]);
    let replica = syncline::Replica::open(dir.path().join("r")).unwrap();
    replica
        .room("room")
        .unwrap()
        .transact(|tx| tx.set("/a", "v", 1i64.into()))
        .unwrap();
    let sync = replica
        .connect(&[server.url().as_str()], &["room"])
        .unwrap();
    sync.flush(WAIT).unwrap();
    let mut child = server.child.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
    let deadline = Instant::now() + WAIT;
    loop {
        let status = sync.status();
        if !status.connected
            && status
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("shutting_down"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client was not told: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Everything acknowledged before is still there after a restart.
    server.spawn();
    let reader = dir.path().join("reader");
    ok(
        &reader,
        &["sync", "--server", &server.url(), "--once", "room"],
    );
    assert_eq!(ok(&reader, &["get", "room", "/a", "v"]), "1");
}

#[test]
fn sync_timeout_bounds_a_connect_that_never_completes() {
    // A "server" that accepts TCP connections and never answers the
    // WebSocket upgrade.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(16).collect();
        std::thread::sleep(Duration::from_secs(60));
        drop(held);
    });
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Command::new(BIN)
        .arg("--replica")
        .arg(dir.path().join("replica"))
        .args(["sync", "--server", &format!("ws://127.0.0.1:{port}/ws")])
        .args(["--once", "--timeout", "2", "room"])
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(6), "exited after {took:?}");
    assert!(stderr.contains("within 2 s"), "{stderr}");
}
