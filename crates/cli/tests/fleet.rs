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
    let (code, _, err) = run(
        dir.path(),
        &[
            "serve",
            "--data",
            dir.path().join("relay-3").to_str().unwrap(),
            "--postgres",
            &url,
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("another relay serves this PostgreSQL database"),
        "{err}"
    );
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
