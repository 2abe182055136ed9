//! The commands around editing, run as a user runs them: `log` and `show`
//! read the history, `conflicts` numbers what concurrent edits left and
//! `resolve` settles it, `import` loads JSON, and `remote` remembers the
//! server.

mod common;

use common::{Server, cli, ok};

#[test]
fn log_and_show_say_when_who_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("r");
    ok(&replica, &["set", "notes", "/todo/1", "title", "\"milk\""]);
    ok(&replica, &["text", "notes", "/doc", "insert", "0", "hello"]);
    let log = ok(&replica, &["log", "notes"]);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    // 2026-11-30T02:28:08.123Z  <12 hex>  <8 hex>#1  what it did
    let first: Vec<&str> = lines[0].split("  ").collect();
    assert!(
        first[0].len() == 24 && first[0].ends_with('Z') && first[0].as_bytes()[10] == b'T',
        "an ISO time: {log}"
    );
    assert!(first[2].ends_with("#1"), "{log}");
    assert!(lines[0].contains("set /todo/1 title = \"milk\""), "{log}");
    assert!(lines[1].contains("insert \"hello\" into /doc"), "{log}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&replica, &["--json", "log", "notes"])).unwrap();
    let id = json[1]["node"].as_str().unwrap().to_owned();
    assert_eq!(json[1]["seq"], 2);
    let show = ok(&replica, &["show", "notes", &id[..6]]);
    assert!(show.contains(&format!("node     {id}")), "{show}");
    assert!(show.contains("(this replica)"), "{show}");
    assert!(show.contains(&format!("parents  {}", json[0]["node"].as_str().unwrap())));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&replica, &["--json", "show", "notes", &id])).unwrap();
    assert_eq!(shown["edits"][1]["op"], "text_insert");
    assert_eq!(shown["edits"][1]["text"], "hello");
}

#[test]
fn conflicts_are_numbered_and_resolve_settles_them_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let url = server.url();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    ok(&a, &["set", "r", "/todo", "title", "\"milk\""]);
    ok(&b, &["set", "r", "/todo", "title", "\"bread\""]);
    for r in [&a, &b, &a] {
        ok(r, &["sync", "--server", &url, "r"]);
    }
    let listed = ok(&a, &["conflicts", "r"]);
    assert!(listed.contains("field title of /todo"), "{listed}");
    assert!(
        listed.contains("[0] ") && listed.contains("[1] "),
        "{listed}"
    );
    assert!(
        listed.contains("syncline resolve r /todo title --pick N"),
        "{listed}"
    );
    // Keep the write that lost.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&a, &["--json", "conflicts", "r"])).unwrap();
    let lost = json[0]["losers"][0]["value"].clone();
    ok(&a, &["resolve", "r", "/todo", "title", "--pick", "1"]);
    assert_eq!(ok(&a, &["conflicts", "r"]), "no conflicts");
    for r in [&a, &b] {
        ok(r, &["sync", "--server", &url, "r"]);
    }
    assert_eq!(ok(&b, &["conflicts", "r"]), "no conflicts");
    let got: serde_json::Value =
        serde_json::from_str(&ok(&b, &["--json", "get", "r", "/todo", "title"])).unwrap();
    assert_eq!(got, lost);
    // Nothing is left to resolve there.
    assert_eq!(
        cli(&a, &["resolve", "r", "/todo", "title", "--pick", "0"]).0,
        3
    );
}
