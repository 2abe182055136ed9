//! Several `syncline` processes on one replica at once, as a user with a
//! few terminals runs them: `watch` prints another terminal's `set`,
//! parallel `set`s all land, and a running `sync --watch` uploads what
//! other processes write while a second sync engine is refused with a
//! clear message.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, Running, Server, WAIT, cli, ok, run};

#[test]
fn watch_sees_another_terminals_set() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    ok(&replica, &["init"]);
    let watch = Running::start(&replica, &["watch", "notes"]);
    // Until watch has the room open a set lands unseen: set again until
    // one is printed.
    let deadline = Instant::now() + WAIT;
    for i in 0.. {
        assert!(Instant::now() < deadline, "watch printed no set");
        let started = Instant::now();
        ok(&replica, &["set", "notes", "/todo/1", "n", &i.to_string()]);
        if let Some(line) = watch.line_with("/todo/1", Duration::from_secs(1)) {
            assert!(line.contains("notes other-process"), "{line}");
            assert!(line.contains(&format!("-> {i}")), "the new value: {line}");
            eprintln!(
                "watch printed the set {:?} after it began",
                started.elapsed()
            );
            break;
        }
    }
}

#[test]
fn parallel_sets_on_one_replica_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    ok(&replica, &["init"]);
    let children: Vec<Child> = (0..10)
        .map(|i| {
            Command::new(BIN)
                .arg("--replica")
                .arg(&replica)
                .args(["set", "notes", "/counts", &format!("f{i}"), &i.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a parallel set failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let all = ok(&replica, &["--json", "get", "notes", "/counts"]);
    let fields: serde_json::Value = serde_json::from_str(&all).unwrap();
    for i in 0..10 {
        assert_eq!(fields[format!("f{i}")], i, "{all}");
    }
}

#[test]
fn a_running_sync_uploads_other_processes_writes_and_is_the_only_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let url = server.url();
    let replica = dir.path().join("replica");
    ok(&replica, &["set", "notes", "/a", "n", "1"]);
    let sync = Running::start(&replica, &["sync", "--watch", "--server", &url, "notes"]);
    // Once it runs the engine (the lock file names it), a second engine is
    // refused at once.
    let deadline = Instant::now() + WAIT;
    let pid = sync.child.id().to_string();
    while std::fs::read_to_string(replica.join("sync.lock"))
        .ok()
        .as_deref()
        != Some(pid.as_str())
    {
        assert!(
            Instant::now() < deadline,
            "sync --watch never started its engine"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (code, _, err) = run(&replica, &["sync", "--server", &url, "notes"], &[]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains("is syncing this replica already"), "{err}");
    // Another terminal's write goes up through the running sync.
    ok(&replica, &["set", "notes", "/b", "n", "2"]);
    let reader = dir.path().join("reader");
    let deadline = Instant::now() + WAIT;
    loop {
        ok(&reader, &["sync", "--server", &url, "notes"]);
        if cli(&reader, &["get", "notes", "/b", "n"]).1 == "2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the write never reached the server"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn presence_shows_who_is_here_and_who_left() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let url = server.url();
    let watcher = Running::start(
        &dir.path().join("watcher"),
        &["watch", "team", "--server", &url],
    );
    let mut present = Running::start(
        &dir.path().join("present"),
        &[
            "presence",
            "team",
            "--status",
            "busy",
            "--message",
            "in a meeting",
            "--server",
            &url,
        ],
    );
    let joined = watcher
        .line_with("joined", WAIT)
        .expect("watch prints the join");
    assert!(joined.contains("busy: \"in a meeting\""), "{joined}");
    let _ = present.child.kill();
    let _ = present.child.wait();
    let left = watcher
        .line_with("left", WAIT)
        .expect("watch prints the leave");
    assert!(left.starts_with("team presence: "), "{left}");
    let (code, _, err) = run(
        &dir.path().join("present"),
        &["presence", "team", "--status", "gone", "--server", &url],
        &[],
    );
    assert_eq!(code, 2, "{err}");
}
