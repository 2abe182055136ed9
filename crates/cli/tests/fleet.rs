//! Relays on PostgreSQL (`syncline serve --postgres URL`), alone and as a
//! fleet of three sharing rooms through one database and NATS, through
//! real processes, against the servers `scripts/services.sh start` runs
//! (their URLs in `SYNCLINE_TEST_POSTGRES` and `SYNCLINE_TEST_NATS`;
//! `.ci/run` starts them). Each test gets a database of its own, and each
//! fleet a NATS subject prefix of its own.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Running, Server, WAIT, author, fresh_database, issue_token, nats_url, ok, run};

/// The tests restart PostgreSQL and NATS under their relays: one at a
/// time, or one's restart breaks the other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Restarts the test server (`scripts/services.sh` says where it is).
fn restart_postgres() {
    let bin = std::env::var("SYNCLINE_TEST_PG_BIN").unwrap();
    let data = std::env::var("SYNCLINE_TEST_PG_DATA").unwrap();
    let pg_ctl = format!("{bin}/pg_ctl");
    // Its log to a file: a server holding the test's output open would
    // keep the test harness waiting after the test ends.
    let log = format!("{data}/../server.log");
    let args = ["-D", &data, "-l", &log, "-m", "fast", "-w", "restart"];
    // PostgreSQL runs as `postgres` when the tests run as root.
    let status = if nix_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_ctl])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    } else {
        Command::new(&pg_ctl)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    };
    assert!(status.unwrap().success(), "pg_ctl restart failed");
}

fn nix_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

#[test]
fn a_relay_on_postgres_keeps_rooms_in_the_database() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(url) = fresh_database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("relay"), &["--postgres", &url]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&a, &["set", "notes", "/todo/1", "title", "\"milk\""]);
    ok(&a, &["sync", "--server", &server.url(), "notes"]);
    // Killed, and started again with an empty data directory: the rooms
    // (and the relay's key) are in the database.
    server.kill9();
    let mut server = Server::start(&dir.path().join("relay-2"), &["--postgres", &url]);
    ok(&b, &["sync", "--server", &server.url(), "notes"]);
    assert_eq!(ok(&b, &["get", "notes", "/todo/1", "title"]), "milk");
    // PostgreSQL restarts under the running relay: the next writes go
    // through on new connections.
    restart_postgres();
    ok(&b, &["set", "notes", "/todo/2", "title", "\"bread\""]);
    ok(&b, &["sync", "--server", &server.url(), "notes"]);
    ok(&a, &["sync", "--server", &server.url(), "notes"]);
    assert_eq!(ok(&a, &["get", "notes", "/todo/2", "title"]), "bread");
    server.kill9();
    // A database that is not there: a clear error, exit 5.
    let (base, _) = url.rsplit_once('/').unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--data"])
        .arg(dir.path().join("relay-4"))
        .args([
            "--postgres",
            &format!("{base}/no_such_database"),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("no_such_database"), "{err}");
}

/// Stops the test's NATS server and starts it again on its port.
fn restart_nats() {
    let services = std::env::var("SYNCLINE_TEST_SERVICES").unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services.sh");
    let status = Command::new("bash")
        .args([script, "restart-nats", &services])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "services.sh restart-nats failed");
}

/// Waits until `done`, at most [`WAIT`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets `/todo/N n` to `value` on `replica` and syncs it through `url`;
/// how long `watcher` then took to print it (it must, within [`WAIT`]).
fn write_and_see(replica: &Path, url: &str, value: u32, watcher: &Running) -> Duration {
    ok(
        replica,
        &["set", "notes", "/todo/1", "n", &value.to_string()],
    );
    let synced = Instant::now();
    ok(
        replica,
        &["sync", "--server", url, "--timeout", "20", "notes"],
    );
    let line = watcher
        .line_with(&format!("-> {value}"), WAIT)
        .unwrap_or_else(|| panic!("the watcher never printed {value}"));
    assert!(line.contains("/todo/1"), "{line}");
    synced.elapsed()
}

#[test]
fn three_relays_share_rooms_through_postgres_and_nats_and_outlive_each_part() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(db) = fresh_database() else { return };
    let nats = nats_url();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("fleet{}", std::process::id());
    // Three relays start at once on a fresh database: one schema, one
    // identity. Room `notes` is open; every other room is locked.
    let relays: Vec<Server> = std::thread::scope(|scope| {
        let started: Vec<_> = (1..=3)
            .map(|i| {
                let (dir, db, nats, prefix) = (dir.path(), &db, &nats, &prefix);
                scope.spawn(move || {
                    Server::start(
                        &dir.join(format!("relay{i}")),
                        &[
                            "--postgres",
                            db,
                            "--nats",
                            nats,
                            "--nats-prefix",
                            prefix,
                            "--fleet-poll",
                            "500ms",
                            "--open-room",
                            "notes",
                        ],
                    )
                })
            })
            .collect();
        started.into_iter().map(|s| s.join().unwrap()).collect()
    });
    let mut relays = relays;
    let key = |s: &Server| std::fs::read_to_string(s.data.join("relay.key")).unwrap();
    assert!(
        relays.iter().all(|r| key(r) == key(&relays[0])),
        "the relays share one identity"
    );
    let url: Vec<String> = relays.iter().map(Server::url).collect();

    // Watchers: one on relay 2; one listing relays 1 and 3 (on 1 first).
    let on_2 = Running::start(
        &dir.path().join("w2"),
        &["watch", "notes", "--server", &url[1]],
    );
    let moving = Running::start(
        &dir.path().join("w13"),
        &["watch", "notes", "--server", &url[0], "--server", &url[2]],
    );
    let sessions = |r: &Server| r.metric("syncline_sessions_open");
    wait_until("both watchers connected", || {
        sessions(&relays[0]) >= 1.0 && sessions(&relays[1]) >= 1.0
    });

    // An edit through relay 1 reaches the watcher on relay 2 (through
    // NATS and PostgreSQL) and the one on relay 1.
    let a = dir.path().join("a");
    let took = write_and_see(&a, &url[0], 1, &on_2);
    moving
        .line_with("-> 1", WAIT)
        .expect("relay 1's own watcher");
    eprintln!("relay 1 -> relay 2 watcher: {took:?}");
    let heard = r#"syncline_fleet_notices_total{way="heard"}"#;
    // (Counted once the frames are out: wait for the counters.)
    wait_until(
        "relay 2 heard relay 1's notice and learned its node",
        || {
            relays[1].metric(heard) >= 1.0
                && relays[1].metric("syncline_fleet_nodes_learned_total") >= 1.0
        },
    );

    // A client of relay 3 gets it, writes, and the others see that.
    let b = dir.path().join("b");
    ok(&b, &["sync", "--server", &url[2], "notes"]);
    assert_eq!(ok(&b, &["get", "notes", "/todo/1", "n"]), "1");
    write_and_see(&b, &url[2], 2, &on_2);
    moving
        .line_with("-> 2", WAIT)
        .expect("relay 1's watcher sees relay 3's write");

    // SIGKILL relay 1: its watcher moves to relay 3; what relay 1
    // acknowledged is in the database.
    ok(&a, &["set", "notes", "/todo/9", "n", "9"]);
    ok(&a, &["sync", "--server", &url[0], "notes"]);
    relays[0].kill9();
    let c = dir.path().join("c");
    ok(&c, &["sync", "--server", &url[1], "notes"]);
    assert_eq!(
        ok(&c, &["get", "notes", "/todo/9", "n"]),
        "9",
        "acknowledged, kept"
    );
    wait_until("the watcher moved to relay 3", || {
        sessions(&relays[2]) >= 1.0
    });
    write_and_see(&c, &url[1], 3, &moving);
    on_2.line_with("-> 3", WAIT).expect("relay 2's watcher");

    // NATS restarts: the relays learn of writes made meanwhile from
    // PostgreSQL, then hear notices again.
    restart_nats();
    write_and_see(&b, &url[2], 4, &on_2);
    wait_until("relays 2 and 3 back on NATS", || {
        relays[1..]
            .iter()
            .all(|r| r.metric("syncline_fleet_bus_connected") == 1.0)
    });
    let heard_before = relays[1].metric(heard);
    write_and_see(&b, &url[2], 5, &on_2);
    wait_until("notices flow again after NATS came back", || {
        relays[1].metric(heard) > heard_before
    });

    // PostgreSQL restarts under the fleet: writes go on.
    restart_postgres();
    write_and_see(&c, &url[1], 6, &moving);

    // Writers on both live relays at once: their appends to the room take
    // turns, and every replica ends with the same state.
    let d = dir.path().join("d");
    let writers = [(&b, &url[2]), (&c, &url[1]), (&d, &url[2]), (&a, &url[1])];
    for (i, (replica, _)) in writers.iter().enumerate() {
        for n in 0..20 {
            let path = format!("/concurrent/w{i}/{n}");
            ok(replica, &["set", "notes", &path, "n", &n.to_string()]);
        }
    }
    let syncing: Vec<std::process::Child> = writers
        .iter()
        .map(|(replica, url)| {
            Command::new(BIN)
                .arg("--replica")
                .arg(replica)
                .args(["sync", "--server", url, "--timeout", "30", "notes"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in syncing {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a concurrent sync failed");
    }
    let hashes: Vec<String> = writers
        .iter()
        .map(|(replica, url)| {
            ok(replica, &["sync", "--server", url, "notes"]);
            ok(replica, &["hash", "notes"])
        })
        .collect();
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    let e = dir.path().join("e");
    ok(&e, &["sync", "--server", &url[2], "notes"]);
    assert_eq!(ok(&e, &["hash", "notes"]), hashes[0]);
    assert_eq!(ok(&e, &["ls", "notes", "/concurrent"]).lines().count(), 4);

    // Authority holds across relays: a token signed by relay 1's key
    // works on relay 2; a read-only one reads through relay 3 and cannot
    // write; no token, no access.
    let (reader, writer) = (dir.path().join("reader"), dir.path().join("writer"));
    let issue = |replica: &Path, rights: &str| {
        issue_token(
            &relays[0].data,
            &author(replica),
            &["--room", "secret", "--rights", rights],
        )
    };
    let (read_token, write_token) = (issue(&reader, "read"), issue(&writer, "write"));
    let sync = |replica: &Path, url: &str, token: &str| {
        run(
            replica,
            &[
                "sync",
                "--server",
                url,
                "--timeout",
                "20",
                "--token",
                token,
                "secret",
            ],
            &[],
        )
    };
    // The writer joins through relay 2 (its capability goes into the
    // room's history), then writes.
    let (code, _, err) = sync(&writer, &url[1], &write_token);
    assert_eq!(code, 0, "a relay 1 token on relay 2: {err}");
    ok(&writer, &["set", "secret", "/plan", "v", "1"]);
    let (code, _, err) = sync(&writer, &url[1], &write_token);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = sync(&reader, &url[2], &read_token);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ok(&reader, &["get", "secret", "/plan", "v"]), "1");
    // The room's history, as relay 3 served it, says the reader may not
    // write: refused before it commits.
    let (code, _, err) = run(&reader, &["set", "secret", "/plan", "v", "2"], &[]);
    assert_eq!(code, 6, "a read-only token cannot write: {err}");
    let (code, _, err) = run(
        &c,
        &["sync", "--server", &url[1], "--timeout", "20", "secret"],
        &[],
    );
    assert_eq!(code, 6, "no token, locked room: {err}");

    // A revocation through the database reaches every relay: the writer's
    // token, good on relay 3 a moment ago, is refused there within
    // seconds.
    let (code, _, err) = sync(&writer, &url[2], &write_token);
    assert_eq!(code, 0, "{err}");
    let token_id = {
        let out = ok(&writer, &["--json", "token", "show", &write_token]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    ok(&writer, &["token", "revoke", &token_id, "--postgres", &db]);
    wait_until("relay 3 refuses the revoked token", || {
        sync(&writer, &url[2], &write_token).0 == 6
    });
}
