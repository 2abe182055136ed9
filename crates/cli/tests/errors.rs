//! What a newcomer meets when something is wrong: each error class exits
//! with the code the README gives and says what to do (table-driven: the
//! command, its exit code, words its message must hold).

use std::net::TcpListener;
use std::time::{Duration, Instant};

mod common;

use common::{Server, ok, run};

struct Case {
    args: Vec<String>,
    code: i32,
    words: &'static [&'static str],
}

fn case(args: &[&str], code: i32, words: &'static [&'static str]) -> Case {
    Case {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        code,
        words,
    }
}

#[test]
fn every_error_class_exits_with_its_code_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    ok(&replica, &["set", "room", "/a", "f", "1"]);
    ok(&replica, &["text", "room", "/t", "insert", "0", "hello"]);
    ok(&replica, &["set", "room", "/b", "f", "2"]);
    let server = Server::start(&dir.path().join("server"), &[]);
    let not_found_url = format!("ws://127.0.0.1:{}/nope", server.port);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a replica").unwrap();

    let cases = [
        // 3: a path or field that does not exist.
        case(&["get", "room", "/missing"], 3, &["no entry at /missing"]),
        case(&["get", "room", "/a", "nope"], 3, &["no field"]),
        case(&["rm", "room", "/missing"], 3, &["no entry at /missing"]),
        case(
            &["mv", "room", "/missing", "/x"],
            3,
            &["no entry at /missing"],
        ),
        case(
            &["text", "room", "/missing", "delete", "0", "1"],
            3,
            &["no entry"],
        ),
        case(&["show", "room", "0000"], 3, &["holds no node 0000"]),
        case(
            &["resolve", "room", "/a", "f", "--pick", "1"],
            3,
            &["nothing to resolve", "syncline conflicts"],
        ),
        // 2: bad arguments.
        case(&["show", "room", "zz"], 2, &["at least 4 hex digits"]),
        case(
            &["resolve", "room", "/a", "f"],
            2,
            &["give --pick N or --value JSON"],
        ),
        case(
            &["resolve", "room", "/a", "--value", "1"],
            2,
            &["give the FIELD"],
        ),
        case(
            &["text", "room", "/t", "insert", "99", "x"],
            2,
            &["past the end"],
        ),
        case(
            &["set", "room", "relative", "f", "1"],
            2,
            &["paths look like /a/b"],
        ),
        case(&["mv", "room", "/a", "/a/b"], 2, &["under itself"]),
        case(
            &["mv", "room", "/a", "/b"],
            2,
            &["exists already", "--force"],
        ),
        case(
            &["set", "room", "/a", "f", "notjson"],
            2,
            &["not JSON", "quote strings"],
        ),
        case(&["get", "bad room!", "/a"], 2, &["room name"]),
        case(
            &["sync", "--server", "http://127.0.0.1:1/ws", "room"],
            2,
            &["use ws://"],
        ),
        case(
            &["sync", "--server", "localhost:7700", "room"],
            2,
            &["no scheme"],
        ),
        case(
            &["sync", "--server", "ws://host:port/ws", "room"],
            2,
            &["not a number"],
        ),
        case(
            &[
                "serve",
                "--data",
                data,
                "--listen",
                "127.0.0.1:7700",
                "--max-rooms",
                "0",
            ],
            2,
            &["--max-rooms 0"],
        ),
        case(
            &["serve", "--data", data, "--blob-key", "0=zz"],
            2,
            &["--blob-key takes ID=HEX"],
        ),
        // 4: the relay is not there, or is no relay.
        case(
            &["sync", "--server", &not_found_url, "room"],
            4,
            &["404", "/ws"],
        ),
        case(
            &[
                "sync",
                "--server",
                "ws://127.0.0.1:1/ws",
                "--timeout",
                "2",
                "room",
            ],
            4,
            &["refused", "retrying", "within 2 s"],
        ),
        // 1: another failure, with the fix named.
        case(
            &["serve", "--data", data, "--listen", &busy_addr],
            1,
            &["in use", "another --listen"],
        ),
    ];
    for c in &cases {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let (code, _, err) = run(&replica, &args, &[]);
        assert_eq!(code, c.code, "syncline {args:?}: {err}");
        for word in c.words {
            assert!(
                err.contains(word),
                "syncline {args:?} does not say {word:?}: {err}"
            );
        }
        // Nothing but the explicit retry waits.
        if c.code != 4 || !args.contains(&"--timeout") {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "syncline {args:?} was slow"
            );
        }
    }
    // A file given as the replica.
    let (code, _, err) = run(&file, &["init"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a file"), "{err}");
    drop(busy);
    // 5: storage that fails, with the place to look named.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(damaged.join("replica.db"), vec![0x5a; 8192]).unwrap();
    let (code, _, err) = run(&damaged, &["get", "room", "/a"], &[]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("damaged") && err.contains("--replica"),
        "{err}"
    );
    // 6: a locked room without a token.
    let locked = Server::start(&dir.path().join("locked"), &["--locked"]);
    let (code, _, err) = run(&replica, &["sync", "--server", &locked.url(), "room"], &[]);
    assert_eq!(code, 6, "{err}");
    assert!(
        err.contains("refused access") && err.contains("--token"),
        "{err}"
    );
}
