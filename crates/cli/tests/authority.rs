//! Access control end to end, against a real `syncline serve`: locked
//! rooms, proof of key possession, tokens (missing, for another key,
//! altered, expired before and during a session, read-only, delegated
//! wider than their parent), replayed handshakes, and secure defaults on a
//! network address (`docs/security.md`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use syncline::auth::{Capability, Claims, Rights, RoomPattern};
use syncline::{Replica, SyncOptions, TokenSource, Value};
use syncline_core::proto::message::{Envelope, Message};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config as SessionConfig, Credentials};
use syncline_core::{Keypair, RoomId};
use syncline_hub::ClientLink;
use syncline_store::{DurableRoom, MemoryStore};
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod common;

use common::{Server, author, free_port, http_get, issue_token, ok, run};

/// Exit code of a refused access.
const UNAUTHORIZED: i32 = 6;

/// `token issue` arguments: an admin of room `team` who writes `/docs`.
const ADMIN_OF_DOCS: &[&str] = &[
    "--room",
    "team",
    "--rights",
    "admin,write",
    "--write-path",
    "/docs/**",
];

/// `syncline token issue` signed with the relay's key.
fn issue(server: &Server, subject: &str, extra: &[&str]) -> String {
    issue_token(&server.data, subject, extra)
}

/// `syncline sync --once` of `room` with `token`: (exit code, stderr).
fn sync(replica: &Path, server: &Server, room: &str, token: Option<&str>) -> (i32, String) {
    let url = server.url();
    let mut args = vec!["sync", "--server", url.as_str(), "--timeout", "20", room];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    let (code, _, stderr) = run(replica, &args, &[]);
    (code, stderr)
}

fn node_count(replica: &Path, room: &str) -> u64 {
    let out = ok(replica, &["--json", "status", room]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["rooms"][0]["nodes"].as_u64().unwrap()
}

fn set(replica: &Path, room: &str, path: &str, value: &str) {
    ok(replica, &["set", room, path, "v", value]);
}

#[test]
fn a_locked_room_needs_a_valid_token_for_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let (alice_key, bob_key) = (author(&alice), author(&bob));

    // No token.
    let (code, err) = sync(&alice, &server, "team", None);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(
        err.contains("unauthorized") && err.contains("needs a token"),
        "{err}"
    );

    // A token issued to another key.
    let bobs = issue(&server, &bob_key, &["--room", "team"]);
    let (code, err) = sync(&alice, &server, "team", Some(&bobs));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("another key"), "{err}");

    // A token altered after signing: wider rights, or another room.
    let alices = issue(&server, &alice_key, &["--room", "team", "--rights", "read"]);
    let mut altered = Capability::from_token(&alices).unwrap();
    altered.claims.rights = Rights::parse("admin,write").unwrap();
    let (code, err) = sync(&alice, &server, "team", Some(&altered.to_token()));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("signature"), "{err}");
    let mut moved = Capability::from_token(&alices).unwrap();
    moved.claims.room = RoomPattern::parse("*").unwrap();
    let (code, err) = sync(&alice, &server, "team", Some(&moved.to_token()));
    assert_eq!(code, UNAUTHORIZED, "{err}");

    // Garbage is a usage error, before any connection.
    let (code, err) = sync(&alice, &server, "team", Some("sl1.not-a-token"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--token"), "{err}");

    // A token for another room.
    let elsewhere = issue(&server, &alice_key, &["--room", "other"]);
    let (code, err) = sync(&alice, &server, "team", Some(&elsewhere));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("not for this room"), "{err}");

    // Expired before the session.
    let short = issue(&server, &alice_key, &["--room", "team", "--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1200));
    let (code, err) = sync(&alice, &server, "team", Some(&short));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("token_expired"), "{err}");

    // Nothing got in.
    let reader = dir.path().join("reader");
    let reading = issue(
        &server,
        &author(&reader),
        &["--room", "team", "--rights", "read"],
    );
    assert_eq!(sync(&reader, &server, "team", Some(&reading)).0, 0);
    assert_eq!(node_count(&reader, "team"), 1, "only the relay's policy");

    // A valid token, for a room prefix: kept, then carried by the first
    // write and presented by later syncs.
    let good = issue(&server, &alice_key, &["--room", "te*"]);
    let (code, err) = sync(&alice, &server, "team", Some(&good));
    assert_eq!(code, 0, "{err}");
    set(&alice, "team", "/docs/a", "1");
    let (code, err) = sync(&alice, &server, "team", None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sync(&reader, &server, "team", Some(&reading)).0, 0);
    assert_eq!(node_count(&reader, "team"), 2);
}

#[test]
fn a_read_only_token_reads_and_pushes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let writer = issue(&server, &author(&alice), &["--room", "team"]);
    assert_eq!(sync(&alice, &server, "team", Some(&writer)).0, 0);
    set(&alice, "team", "/a", "1");
    assert_eq!(sync(&alice, &server, "team", None).0, 0);

    let reader = issue(
        &server,
        &author(&bob),
        &["--room", "team", "--rights", "read"],
    );
    assert_eq!(sync(&bob, &server, "team", Some(&reader)).0, 0);
    assert_eq!(
        node_count(&bob, "team"),
        2,
        "bob read the policy and alice's node"
    );
    // A reader's change is refused locally: every replica would refuse it.
    let (code, _, err) = run(&bob, &["set", "team", "/b", "v", "2"], &[]);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("unauthorized"), "{err}");
    // A change made before the room was known to be locked is not pushed.
    let carol = dir.path().join("carol");
    set(&carol, "team", "/c", "3");
    let reading = issue(
        &server,
        &author(&carol),
        &["--room", "team", "--rights", "read"],
    );
    let (code, err) = sync(&carol, &server, "team", Some(&reading));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(
        err.contains("reading only") && err.contains("1 local"),
        "{err}"
    );
    // The server never took theirs.
    assert_eq!(sync(&alice, &server, "team", None).0, 0);
    assert_eq!(node_count(&alice, "team"), 2);
}

#[test]
fn delegation_narrows_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let bob_key = author(&bob);
    let admin = issue(&server, &author(&alice), ADMIN_OF_DOCS);
    let delegate = |extra: &[&str]| {
        let mut args = vec![
            "token",
            "issue",
            "--parent",
            &admin,
            "--subject",
            &bob_key,
            "--room",
            "team",
        ];
        args.extend_from_slice(extra);
        ok(&alice, &args)
    };
    let narrower = delegate(&["--write-path", "/docs/x"]);
    let (code, err) = sync(&bob, &server, "team", Some(&narrower));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(&bob, &["set", "team", "/docs/x", "v", "1"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sync(&bob, &server, "team", None).0, 0);
    // Outside his paths, refused at once.
    let (code, _, err) = run(&bob, &["set", "team", "/docs/y", "v", "2"], &[]);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("/docs/y") && err.contains("outside"), "{err}");

    let wider = delegate(&["--write-path", "/**"]);
    let (code, err) = sync(&bob, &server, "team", Some(&wider));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("widens write paths"), "{err}");
    let longer = delegate(&["--write-path", "/docs/x", "--expires", "2d"]);
    let (code, err) = sync(&bob, &server, "team", Some(&longer));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("widens expiry"), "{err}");

    // Bob holds no admin right: what he delegates is refused.
    let carol = dir.path().join("carol");
    let carols = ok(
        &bob,
        &[
            "token",
            "issue",
            "--parent",
            &narrower,
            "--subject",
            &author(&carol),
            "--room",
            "team",
            "--rights",
            "read",
        ],
    );
    let (code, err) = sync(&carol, &server, "team", Some(&carols));
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("without admin"), "{err}");
}

/// A fresh `hello` for `room` signed for the connection with `challenge`.
fn hello(key: &Keypair, room: &str, challenge: [u8; 32], token: Option<Vec<u8>>) -> Vec<u8> {
    let mut durable = DurableRoom::load(
        Arc::new(MemoryStore::new()),
        key.clone(),
        &RoomId::new(room).unwrap(),
    )
    .unwrap();
    let mut link = ClientLink::open(
        0,
        1,
        &mut durable,
        SessionConfig::default(),
        Scope::everything(),
        &Credentials { challenge, token },
    )
    .unwrap();
    link.poll_transmit().unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and reads the challenge.
async fn connect(server: &Server) -> (Ws, [u8; 32]) {
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    let first = ws.next().await.unwrap().unwrap();
    let WsMessage::Binary(bytes) = first else {
        panic!("no challenge: {first:?}")
    };
    match Envelope::decode(&bytes).unwrap().message {
        Message::Challenge { nonce, .. } => (ws, nonce),
        other => panic!("the first frame is {other:?}"),
    }
}

/// Sends `frame` and returns the answer to it.
async fn answer(ws: &mut Ws, frame: Vec<u8>) -> Message {
    ws.send(WsMessage::Binary(frame.into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer within 10 s")
        .unwrap()
        .unwrap();
    let WsMessage::Binary(bytes) = reply else {
        panic!("not a frame: {reply:?}")
    };
    Envelope::decode(&bytes).unwrap().message
}

fn reject_reason(message: &Message) -> (String, String) {
    match message {
        Message::Reject { reason, message } => (reason.as_str().to_owned(), message.clone()),
        other => panic!("expected a reject, got {other:?}"),
    }
}

#[test]
fn handshakes_prove_the_key_and_reveal_nothing_about_locked_rooms() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("server"),
        &["--open-room", "public/*", "--room-idle", "0.2"],
    );
    let alice = dir.path().join("alice");
    let token = issue(&server, &author(&alice), &["--room", "secret"]);
    assert_eq!(sync(&alice, &server, "secret", Some(&token)).0, 0);
    std::thread::sleep(Duration::from_millis(600));
    let loaded_before = server.metric("syncline_rooms_loaded");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let key = Keypair::from_seed([1; 32]);
        // A signed hello opens an open room.
        let (mut a, challenge_a) = connect(&server).await;
        let recorded = hello(&key, "public/x", challenge_a, None);
        assert!(matches!(
            answer(&mut a, recorded.clone()).await,
            Message::Welcome { .. }
        ));
        // The same hello replayed on another connection is refused.
        let (mut b, _) = connect(&server).await;
        let (reason, message) = reject_reason(&answer(&mut b, recorded).await);
        assert_eq!(reason, "unauthorized");
        assert!(message.contains("possession"), "{message}");
        // A hello claiming another's key, signed with one's own.
        let (mut c, challenge_c) = connect(&server).await;
        let mut forged = Envelope::decode(&hello(&key, "public/x", challenge_c, None)).unwrap();
        if let Message::Hello { peer, .. } = &mut forged.message {
            *peer = Keypair::from_seed([2; 32]).author();
        }
        let (reason, _) = reject_reason(&answer(&mut c, forged.encode()).await);
        assert_eq!(reason, "unauthorized");

        // A locked room that exists and one that does not answer alike.
        let (mut d, challenge_d) = connect(&server).await;
        let existing =
            reject_reason(&answer(&mut d, hello(&key, "secret", challenge_d, None)).await);
        let (mut e, challenge_e) = connect(&server).await;
        let missing =
            reject_reason(&answer(&mut e, hello(&key, "no-such", challenge_e, None)).await);
        assert_eq!(existing, missing);
        assert_eq!(existing.0, "unauthorized");
    });
    assert_eq!(
        server.metric("syncline_rooms_loaded"),
        loaded_before + 1.0,
        "only the open room loaded: refused hellos load nothing"
    );
}

#[test]
fn an_expiring_token_is_refreshed_and_nothing_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let relay_key = syncline_relay::Server::key_in(&server.data).unwrap();
    let writer = Replica::open(dir.path().join("writer")).unwrap();
    let subject = syncline_core::AuthorId::from_hex(&writer.author()).unwrap();
    let minted = Arc::new(AtomicUsize::new(0));
    let counter = minted.clone();
    // Tokens that last 1.5 s, minted as an app backend would.
    let mut options = SyncOptions::new(&[&server.url()]);
    options.min_backoff = Duration::from_millis(20);
    options.token = Some(TokenSource::refresh(move |_room| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let claims = Claims {
            id: [n as u8; 16],
            room: RoomPattern::parse("team").unwrap(),
            subject,
            rights: Rights::parse("write").unwrap(),
            write_paths: Vec::new(),
            not_after_ms: now + 1500,
        };
        Ok(Some(Capability::issue(&relay_key, claims, None).to_token()))
    }));
    let room = writer.room("team").unwrap();
    let engine = writer.connect_with(options, &["team"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !engine.status().connected {
        assert!(Instant::now() < deadline, "never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Write for 5 s across three expiries. Between an expiry and the
    // refreshed token, a write is refused locally (its node would be
    // refused everywhere) and retried.
    let started = Instant::now();
    let (mut commits, mut refused) = (0, 0);
    while started.elapsed() < Duration::from_secs(5) {
        match room.transact(|tx| tx.set(&format!("/n/{commits}"), "v", Value::Int(commits))) {
            Ok(_) => commits += 1,
            Err(syncline::Error::Txn(syncline_core::room::TxnError::Unauthorized(_))) => {
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(commits > 20, "{commits} commits, {refused} refused");
    engine.flush(Duration::from_secs(20)).unwrap();
    let status = engine.status();
    assert_eq!(status.unacknowledged, 0);
    assert!(
        minted.load(Ordering::SeqCst) >= 3,
        "the token was refreshed across expiries ({} minted)",
        minted.load(Ordering::SeqCst)
    );
    drop(engine);

    let reader = dir.path().join("reader");
    let reading = issue(
        &server,
        &author(&reader),
        &["--room", "team", "--rights", "read"],
    );
    assert_eq!(sync(&reader, &server, "team", Some(&reading)).0, 0);
    assert_eq!(
        node_count(&reader, "team"),
        commits as u64 + 1,
        "every commit, once (and the relay's policy)"
    );
}

#[test]
fn a_network_address_is_locked_unless_told_open() {
    let dir = tempfile::tempdir().unwrap();
    let alice = dir.path().join("alice");
    set(&alice, "room", "/a", "1");
    for (flags, open) in [(&[][..], false), (&["--open"][..], true)] {
        let port = free_port();
        let mut args = vec!["--listen".to_owned(), format!("0.0.0.0:{port}")];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut server = Server {
            child: None,
            port,
            metrics_port: free_port(),
            data: dir.path().join(format!("server-{open}")),
            extra: args,
        };
        server.spawn();
        let (code, err) = sync(&alice, &server, "room", None);
        if open {
            assert_eq!(code, 0, "{err}");
        } else {
            assert_eq!(code, UNAUTHORIZED, "{err}");
        }
    }
    // An open room on a network address must be named: --open-room on
    // 0.0.0.0 is told; the library refuses open rooms there otherwise.
    let port = free_port();
    let (code, _, err) = run(
        &alice,
        &[
            "serve",
            "--data",
            dir.path().join("s").to_str().unwrap(),
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--open",
            "--locked",
        ],
        &[],
    );
    assert_eq!(code, 2, "--open and --locked conflict: {err}");
}

#[test]
fn metrics_need_an_admin_token_on_the_main_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let someone = author(&dir.path().join("someone"));
    let (status, body) = http_get(server.port, "/metrics", None).unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("admin token"), "{body}");
    let writer = issue(&server, &someone, &["--room", "*"]);
    assert_eq!(
        http_get(server.port, "/metrics", Some(&writer)).unwrap().0,
        401
    );
    let one_room = issue(&server, &someone, &["--room", "team", "--rights", "admin"]);
    assert_eq!(
        http_get(server.port, "/metrics", Some(&one_room))
            .unwrap()
            .0,
        401
    );
    let admin = issue(&server, &someone, &["--room", "*", "--rights", "admin"]);
    let (status, body) = http_get(server.port, "/metrics", Some(&admin)).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("syncline_"), "{body}");
    // The separate loopback address needs none; every metric is described
    // and registered at zero from the start.
    let (status, idle) = http_get(server.metrics_port, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    for line in [
        "# HELP syncline_rooms_loaded",
        "# TYPE syncline_nodes_refused_total counter",
        "syncline_nodes_refused_total 0",
        "# HELP syncline_sessions_open",
    ] {
        assert!(idle.contains(line), "no {line:?} in:\n{idle}");
    }
}

#[test]
fn a_revoked_token_closes_its_session_and_opens_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let writer = Replica::open(dir.path().join("writer")).unwrap();
    let token = issue(&server, &writer.author(), &["--room", "team"]);
    let mut options = SyncOptions::new(&[&server.url()]);
    options.token = Some(TokenSource::fixed(token.clone()));
    // Kept: the first commit carries it.
    writer.save_token("team", &token).unwrap();
    let room = writer.room("team").unwrap();
    room.transact(|tx| tx.set("/a", "v", Value::Int(1)))
        .unwrap();
    let engine = writer.connect_with(options, &["team"]).unwrap();
    if let Err(e) = engine.flush(Duration::from_secs(20)) {
        panic!("{e}: {:?}", engine.status());
    }

    let data = server.data.to_str().unwrap().to_owned();
    let id = Capability::from_token(&token).unwrap().claims.id;
    let revoked = ok(
        Path::new("/nonexistent-replica"),
        &["token", "revoke", &token, "--data", &data],
    );
    assert!(revoked.contains(&syncline::auth::hex(&id)), "{revoked}");
    // The open session closes within about a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = engine.status();
        if let Some(why) = status.refused {
            assert!(
                why.contains("unauthorized") && why.contains("revoked"),
                "{why}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked session stayed open: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes after the revocation stay local.
    room.transact(|tx| tx.set("/b", "v", Value::Int(2)))
        .unwrap();
    assert!(engine.flush(Duration::from_secs(2)).is_err());
    drop((engine, room, writer));
    let (code, err) = sync(
        Path::new(&dir.path().join("writer")),
        &server,
        "team",
        Some(&token),
    );
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("revoked"), "{err}");
    // A garbage id is a usage error.
    let (code, _, err) = run(
        Path::new("/nonexistent-replica"),
        &["token", "revoke", "zz", "--data", &data],
        &[],
    );
    assert_eq!(code, 2, "{err}");
}

#[test]
fn an_invite_pairs_a_device_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let (alice, bob, carol) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    let admin = issue(&server, &author(&alice), ADMIN_OF_DOCS);
    assert_eq!(sync(&alice, &server, "team", Some(&admin)).0, 0);
    set(&alice, "team", "/docs/a", "1");
    assert_eq!(sync(&alice, &server, "team", None).0, 0);
    let url = server.url();
    let invite = |extra: &[&str]| {
        let mut args = vec![
            "invite",
            "team",
            "--server",
            url.as_str(),
            "--token",
            admin.as_str(),
        ];
        args.extend_from_slice(extra);
        run(&alice, &args, &[])
    };
    let (code, out, err) = invite(&["--write", "/docs/bob/**"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("sli1."), "{out}");

    // Bob joins with his own key: he gets a token, keeps it, and syncs.
    let (code, _, err) = run(&bob, &["join", &out], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("joined team"), "{err}");
    assert_eq!(node_count(&bob, "team"), 2, "bob caught up");
    set(&bob, "team", "/docs/bob/x", "2");
    // Later syncs use the kept token.
    let (code, err) = sync(&bob, &server, "team", None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sync(&alice, &server, "team", Some(&admin)).0, 0);
    assert_eq!(node_count(&alice, "team"), 3, "alice got bob's node");
    // Outside the invite's paths: refused at once.
    let (code, _, err) = run(&bob, &["set", "team", "/docs/a", "v", "3"], &[]);
    assert_eq!(code, UNAUTHORIZED, "{err}");

    // The code works once.
    let (code, _, err) = run(&carol, &["join", &out], &[]);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("already used"), "{err}");

    // An expired code.
    let (_, short, _) = invite(&["--expires", "1s", "--write", "/docs/**"]);
    std::thread::sleep(Duration::from_millis(1200));
    let (code, _, err) = run(&carol, &["join", &short], &[]);
    assert_eq!(code, UNAUTHORIZED, "{err}");
    assert!(err.contains("expired"), "{err}");

    // Wider than the inviter's token, or from a token without admin.
    let (code, _, err) = invite(&["--write", "/**"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("wider"), "{err}");
    let writer = issue(&server, &author(&alice), &["--room", "team"]);
    let (code, _, err) = run(
        &alice,
        &["invite", "team", "--server", &url, "--token", &writer],
        &[],
    );
    assert_eq!(code, UNAUTHORIZED, "{err}");
    // A garbled code.
    let (code, _, err) = run(&carol, &["join", "sli1.garbage"], &[]);
    assert_eq!(code, 2, "{err}");
}

/// A key from `seed`, and a capability the relay issued it with `args`.
fn keyed_token(server: &Server, seed: u8, args: &[&str]) -> (Keypair, Capability) {
    let key = Keypair::from_seed([seed; 32]);
    let token = issue(server, &key.author().to_string(), args);
    (key, Capability::from_token(&token).unwrap())
}

/// A pack of one node by `key` in room `team` setting a field at `path`,
/// carrying `grant` if given, made in a room that checks nothing (as a
/// hostile client would).
fn rogue_pack(key: &Keypair, grant: Option<&Capability>, path: &str) -> Vec<u8> {
    let mut rogue = syncline_core::Room::new(RoomId::new("team").unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut tx = rogue.begin(key.author(), now);
    if let Some(cap) = grant {
        tx.record_grant(cap).unwrap();
    }
    tx.set(path, "v", Value::Int(1)).unwrap();
    let idx = tx.commit().unwrap().unwrap().idx;
    rogue.pack(&[idx], Some(key)).unwrap()
}

#[test]
fn a_node_outside_its_authors_paths_is_refused_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let (key, cap) = keyed_token(&server, 4, &["--room", "team", "--write-path", "/docs/**"]);
    // A node its own replica would refuse, made where nothing checks.
    let pack = rogue_pack(&key, Some(&cap), "/secrets/x");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (mut ws, challenge) = connect(&server).await;
        let hello = hello(&key, "team", challenge, Some(cap.encode()));
        assert!(matches!(
            answer(&mut ws, hello).await,
            Message::Welcome { .. }
        ));
        // The catch-up (the relay's policy) arrives first.
        let frame = |message| {
            Envelope {
                version: syncline_core::proto::message::PROTOCOL_VERSION,
                session: 1,
                corr: 7,
                message,
            }
            .encode()
        };
        ws.send(WsMessage::Binary(
            frame(Message::Pack {
                checksum: *blake3::hash(&pack).as_bytes(),
                pack: pack.clone(),
                phase: syncline_core::proto::message::Phase::Live,
                last: true,
            })
            .into(),
        ))
        .await
        .unwrap();
        let refused = loop {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("an answer within 10 s")
                .unwrap()
                .unwrap();
            let WsMessage::Binary(bytes) = next else {
                continue;
            };
            if let Message::Error {
                code,
                message,
                related,
            } = Envelope::decode(&bytes).unwrap().message
            {
                break (code, message, related);
            }
        };
        assert_eq!(refused.0.as_str(), "unauthorized");
        assert!(refused.1.contains("/secrets"), "{}", refused.1);
        assert_eq!(refused.2, 7);
        // The session goes on: it answers a subscribe (after whatever
        // else it had to send).
        let mut reply = answer(&mut ws, frame(Message::Subscribe { patterns: vec![] })).await;
        while matches!(reply, Message::Pack { .. } | Message::Heartbeat) {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("an answer within 10 s")
                .unwrap()
                .unwrap();
            let WsMessage::Binary(bytes) = next else {
                continue;
            };
            reply = Envelope::decode(&bytes).unwrap().message;
        }
        assert!(matches!(reply, Message::Subscribed { .. }), "{reply:?}");
    });
    assert!(server.metric("syncline_nodes_refused_total") >= 1.0);
}

#[test]
fn a_read_only_session_that_pushes_anyway_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), &["--locked"]);
    let (key, cap) = keyed_token(&server, 5, &["--room", "team", "--rights", "read"]);
    let pack = rogue_pack(&key, None, "/x");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (mut ws, challenge) = connect(&server).await;
        let welcome = answer(&mut ws, hello(&key, "team", challenge, Some(cap.encode()))).await;
        assert!(
            matches!(welcome, Message::Welcome { write: None, .. }),
            "a read-only welcome: {welcome:?}"
        );
        let push = Envelope {
            version: syncline_core::proto::message::PROTOCOL_VERSION,
            session: 1,
            corr: 3,
            message: Message::Pack {
                checksum: *blake3::hash(&pack).as_bytes(),
                pack,
                phase: syncline_core::proto::message::Phase::Live,
                last: true,
            },
        };
        ws.send(WsMessage::Binary(push.encode().into()))
            .await
            .unwrap();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("an answer within 10 s")
                .unwrap()
                .unwrap();
            let WsMessage::Binary(bytes) = next else {
                continue;
            };
            match Envelope::decode(&bytes).unwrap().message {
                Message::Error {
                    code,
                    related,
                    message,
                } => {
                    assert_eq!((code.as_str(), related), ("unauthorized", 3), "{message}");
                    break;
                }
                Message::Ack { .. } => panic!("a read-only push was acknowledged"),
                _ => {}
            }
        }
    });
    // Nothing was stored: a reader sees only the relay's policy.
    let reader = dir.path().join("reader");
    let reading = issue(
        &server,
        &author(&reader),
        &["--room", "team", "--rights", "read"],
    );
    assert_eq!(sync(&reader, &server, "team", Some(&reading)).0, 0);
    assert_eq!(node_count(&reader, "team"), 1);
}
