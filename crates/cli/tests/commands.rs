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

#[test]
fn import_loads_json_and_what_export_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let plain = dir.path().join("plain.json");
    std::fs::write(
        &plain,
        r#"{"todo": {"1": {"title": "milk", "done": false}}, "owner": "me"}"#,
    )
    .unwrap();
    let said = ok(&a, &["import", "notes", plain.to_str().unwrap()]);
    assert!(said.contains("2 entries, 3 fields"), "{said}");
    assert_eq!(ok(&a, &["get", "notes", "/todo/1", "title"]), "milk");
    assert_eq!(ok(&a, &["get", "notes", "/", "owner"]), "me");
    ok(&a, &["text", "notes", "/doc", "insert", "0", "hello"]);
    let exported = dir.path().join("export.json");
    std::fs::write(&exported, ok(&a, &["export", "notes"])).unwrap();
    ok(&b, &["import", "notes", exported.to_str().unwrap()]);
    assert_eq!(ok(&b, &["export", "notes"]), ok(&a, &["export", "notes"]));
    let again = ok(&b, &["import", "notes", exported.to_str().unwrap()]);
    assert!(again.ends_with("nothing changed"), "{again}");
    assert_eq!(cli(&b, &["import", "notes", "/no/such.json"]).0, 3);
    std::fs::write(&plain, "[1, 2]").unwrap();
    assert_eq!(cli(&b, &["import", "notes", plain.to_str().unwrap()]).0, 2);
}

#[test]
fn a_remembered_remote_is_the_default_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let replica = dir.path().join("r");
    assert!(ok(&replica, &["remote"]).starts_with("no remote"));
    let (code, _, err) = common::run(&replica, &["sync", "notes"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("syncline remote set URL"), "{err}");
    // Without the /ws path: it is the default, and kept normalized.
    let bare = format!("ws://127.0.0.1:{}", server.port);
    assert_eq!(ok(&replica, &["remote", "set", &bare]), server.url());
    ok(&replica, &["set", "notes", "/a", "n", "1"]);
    let synced = ok(&replica, &["sync", "notes"]);
    assert!(synced.contains("notes: 1 nodes"), "{synced}");
    assert_eq!(cli(&replica, &["remote", "set", "http://x:1"]).0, 2);
    ok(&replica, &["remote", "clear"]);
    assert!(ok(&replica, &["remote", "show"]).starts_with("no remote"));
}

#[test]
fn a_blob_put_on_one_replica_is_got_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &[]);
    let url = server.url();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let file = dir.path().join("photo.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let said = ok(
        &a,
        &[
            "blob",
            "put",
            "trip",
            "/day1",
            "photo",
            file.to_str().unwrap(),
            "--mime",
            "image/x-test",
        ],
    );
    assert!(said.contains("3000000 bytes"), "{said}");
    // Uploaded by sync (a separate process from the put), then fetched.
    ok(&a, &["sync", "--server", &url, "trip"]);
    ok(&b, &["sync", "--server", &url, "trip"]);
    let out = dir.path().join("got.bin");
    ok(
        &b,
        &[
            "blob",
            "get",
            "trip",
            "/day1",
            "photo",
            "-o",
            out.to_str().unwrap(),
            "--server",
            &url,
        ],
    );
    assert!(std::fs::read(&out).unwrap() == data, "the bytes differ");
    assert!(ok(&b, &["blob", "status"]).contains("3000000 bytes  all"));
    // Referenced: kept. Once the field holds something else, removed.
    assert!(ok(&b, &["blob", "gc", "--grace", "0"]).contains("removed 0 blob(s)"));
    ok(&b, &["set", "trip", "/day1", "photo", "\"gone\""]);
    assert!(ok(&b, &["blob", "gc", "--grace", "0"]).contains("removed 1 blob(s)"));
    assert_eq!(ok(&b, &["blob", "status"]), "no blobs");
    // A blob waiting to go up is kept too.
    let c = dir.path().join("c");
    ok(
        &c,
        &["blob", "put", "trip", "/x", "f", file.to_str().unwrap()],
    );
    ok(&c, &["set", "trip", "/x", "f", "1"]);
    assert!(ok(&c, &["blob", "gc", "--grace", "0"]).contains("removed 0 blob(s)"));
    assert_eq!(cli(&c, &["blob", "gc", "--grace", "-1"]).0, 2);
    assert_eq!(cli(&b, &["blob", "get", "trip", "/day1", "nothing"]).0, 3);
    assert_eq!(
        cli(&b, &["blob", "put", "trip", "/x", "f", "/no/such/file"]).0,
        3
    );
}
