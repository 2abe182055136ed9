//! Relays on PostgreSQL (`syncline serve --postgres URL`) through real
//! processes, against the server `scripts/services.sh start` runs (its URL
//! in `SYNCLINE_TEST_POSTGRES`; `.ci/run` starts it). Each test gets a
//! database of its own.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{BIN, Server, ok, run};

/// A fresh database on the test server; `None` (skipped, and said) when
/// none was started outside CI.
fn fresh_database() -> Option<String> {
    let Ok(url) = std::env::var("SYNCLINE_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs this with PostgreSQL: start it with scripts/services.sh"
        );
        eprintln!("no SYNCLINE_TEST_POSTGRES: skipped");
        return None;
    };
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "fleet_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let created = Command::new("psql")
        .arg(&url)
        .args(["-q", "-c", &format!("CREATE DATABASE {name}")])
        .status()
        .unwrap();
    assert!(created.success(), "psql could not create {name}");
    let (base, _) = url.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

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
    // One relay per database for now: a second one says so and exits.
    let second = || {
        let data = dir.path().join("relay-3");
        let args = [
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--postgres",
            &url,
            "--listen",
            "127.0.0.1:0",
        ];
        let (code, _, err) = run(dir.path(), &args, &[]);
        assert_eq!(code, 5, "{err}");
        assert!(
            err.contains("another relay serves this PostgreSQL database"),
            "{err}"
        );
    };
    second();
    // PostgreSQL restarts under the running relay: the next writes go
    // through on new connections, and the relay holds its database again
    // within a second.
    restart_postgres();
    ok(&b, &["set", "notes", "/todo/2", "title", "\"bread\""]);
    ok(&b, &["sync", "--server", &server.url(), "notes"]);
    ok(&a, &["sync", "--server", &server.url(), "notes"]);
    assert_eq!(ok(&a, &["get", "notes", "/todo/2", "title"]), "bread");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    second();
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
