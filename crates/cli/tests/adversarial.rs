//! Attacks on a real `syncline serve` process, each with its own server
//! started with small limits (below), one attack at a time.
//!
//! Each attack asserts that the server stays up and able to load rooms,
//! that its resident memory stays under [`RSS_BOUND`], and that honest
//! clients, connecting from another address (127.0.0.2), keep syncing:
//! every round (connect, handshake, catch up, commit a node, get its ack)
//! completes within [`FACTOR`] times the median of quiet rounds measured
//! before the attack (or [`FLOOR`], whichever is more: quiet rounds take a
//! few milliseconds on loopback, below the noise of a shared machine). A
//! round that does not complete within its deadline fails the test.
//! Nothing acknowledged is lost: the honest replica's nodes are all on the
//! server afterwards (a fresh reader catches up to its state hash).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use syncline_core::auth;
use syncline_core::proto::message::{Envelope, Message, Phase};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config as SessionConfig, Credentials, Event};
use syncline_core::{Keypair, RoomId, Value};
use syncline_hub::ClientLink;
use syncline_store::{DurableRoom, MemoryStore};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_syncline");
/// Resident memory the server may reach during any attack.
const RSS_BOUND: u64 = 400 << 20;
/// An honest round under attack takes at most this many quiet rounds...
const FACTOR: u32 = 20;
/// ...or this long, whichever is more.
const FLOOR: Duration = Duration::from_secs(1);
/// An honest round that takes longer never completed.
const ROUND_DEADLINE: Duration = Duration::from_secs(15);

/// The limits every attacked server runs with.
const LIMITS: &[&str] = &[
    "--max-connections-per-ip",
    "64",
    "--max-sessions-per-ip",
    "200",
    "--max-sessions-per-conn",
    "64",
    "--max-rooms",
    "300",
    "--upgrade-timeout",
    "1",
    "--session-wait",
    "1",
    "--write-timeout",
    "1",
    "--outbound-queue-bytes",
    "2097152",
    "--peer-bytes-per-sec",
    "8388608",
    "--peer-burst-bytes",
    "16777216",
    "--room-idle",
    "2",
];

/// One attack at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A `syncline serve` process with [`LIMITS`].
struct Server {
    child: Child,
    port: u16,
    /// Where `/metrics` is served without a token.
    metrics_port: u16,
    _data: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::start_with(&[]).await
    }

    /// With [`LIMITS`], `extra` arguments (flag and value pairs) replacing
    /// or adding to them.
    async fn start_with(extra: &[&str]) -> Server {
        let mut args: Vec<&str> = Vec::new();
        for pair in LIMITS.chunks(2) {
            if !extra.chunks(2).any(|e| e[0] == pair[0]) {
                args.extend_from_slice(pair);
            }
        }
        args.extend_from_slice(extra);
        let data = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(BIN)
            .args(["serve", "--data"])
            .arg(data.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(&args)
            .stdout(Stdio::null())
            // SYNCLINE_ATTACK_LOG=FILE keeps the server's log, to see why
            // an attack failed.
            .stderr(match std::env::var_os("SYNCLINE_ATTACK_LOG") {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            })
            .spawn()
            .unwrap();
        let server = Server {
            child,
            port,
            metrics_port,
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.get("/healthz").await.as_deref() != Some("ok") {
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A plain HTTP GET from the honest address; the body, if answered.
    async fn get(&self, path: &str) -> Option<String> {
        self.get_at(self.port, path).await
    }

    /// A plain HTTP GET of `path` on `port` from the honest address.
    async fn get_at(&self, port: u16, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = timeout(Duration::from_secs(5), connect_from(HONEST, addr))
            .await
            .ok()?
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
            .await
            .ok()?
            .ok()?;
        let response = String::from_utf8_lossy(&response);
        Some(response.split("\r\n\r\n").nth(1)?.trim().to_owned())
    }

    /// A metric's value, summed over its labels matching `label` (0 if
    /// absent).
    async fn metric(&self, name: &str, label: &str) -> f64 {
        let text = self
            .get_at(self.metrics_port, "/metrics")
            .await
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Resident memory, from `/proc`.
    fn rss(&mut self) -> u64 {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server process died"
        );
        rss_of(self.child.id()).expect("the server's /proc status")
    }
}

/// Resident bytes of process `pid`, from `/proc`.
fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb << 10)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket from `from`, with the challenge its first frame carries
/// (every `hello` on it signs that).
async fn ws_from(server: &Server, from: IpAddr) -> Result<(Ws, [u8; 32]), String> {
    let tcp = timeout(Duration::from_secs(5), connect_from(from, server.addr()))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (ws, _) = timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(server.url(), MaybeTlsStream::Plain(tcp)),
    )
    .await
    .map_err(|_| "upgrade timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let mut ws = ws;
    let first = timeout(Duration::from_secs(5), ws.next())
        .await
        .map_err(|_| "no challenge within 5 s".to_owned())?;
    let Some(Ok(WsMessage::Binary(bytes))) = first else {
        return Err(format!("the first frame is not a challenge: {first:?}"));
    };
    match Envelope::decode(&bytes).map_err(|e| e.to_string())?.message {
        Message::Challenge { nonce, .. } => Ok((ws, nonce)),
        other => Err(format!("the first frame is not a challenge: {other:?}")),
    }
}

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A replica in memory that syncs one room through [`ClientLink`], the
/// client half the SDK runs.
struct Replica {
    room: DurableRoom,
    edits: i64,
}

/// How long an honest round took.
#[derive(Clone, Copy, Debug)]
struct Round {
    /// Connect and handshake, to the `welcome`.
    welcome: Duration,
    /// Connect, handshake and catch up (what the attack added to the room
    /// included, so this one is reported, not bounded).
    caught_up: Duration,
    /// From a commit to its ack.
    acked: Duration,
}

impl Round {
    /// What the bound applies to: how soon the server answers a newcomer,
    /// and how soon it makes a commit durable.
    fn latency(&self) -> Duration {
        self.welcome + self.acked
    }
}

impl Replica {
    fn new(room: &str, seed: u8) -> Replica {
        let room = DurableRoom::load(
            Arc::new(MemoryStore::new()),
            Keypair::from_seed([seed; 32]),
            &RoomId::new(room).unwrap(),
        )
        .unwrap();
        Replica { room, edits: 0 }
    }

    /// Commits `n` nodes of `bytes` incompressible bytes each.
    fn write_bulk(&mut self, n: usize, bytes: usize) {
        for i in 0..n {
            let mut text = String::with_capacity(bytes);
            let mut block = blake3::hash(&(i as u64).to_le_bytes());
            while text.len() < bytes {
                text.push_str(block.to_hex().as_str());
                block = blake3::hash(block.as_bytes());
            }
            text.truncate(bytes);
            self.room
                .transact(1_700_000_000_000 + i as u64, |tx| {
                    tx.set(&format!("/bulk/{i}"), "text", Value::Str(text))
                })
                .unwrap();
        }
    }

    /// One round: connect from `from`, catch up, commit one node and wait
    /// for its ack.
    async fn round(&mut self, server: &Server, from: IpAddr) -> Result<Round, String> {
        timeout(ROUND_DEADLINE, self.round_inner(server, from))
            .await
            .map_err(|_| format!("no round within {ROUND_DEADLINE:?}"))?
    }

    async fn round_inner(&mut self, server: &Server, from: IpAddr) -> Result<Round, String> {
        let started = Instant::now();
        let (ws, challenge) = ws_from(server, from).await?;
        let (mut sink, mut stream) = ws.split();
        let mut link = ClientLink::open(
            now_ms(),
            1,
            &mut self.room,
            SessionConfig::default(),
            Scope::everything(),
            &credentials(challenge),
        )
        .map_err(|e| e.to_string())?;
        let mut welcome = None;
        let mut caught_up = None;
        let mut committed = None;
        loop {
            while let Some(event) = link
                .poll_event(now_ms(), &mut self.room)
                .map_err(|e| e.to_string())?
            {
                match event {
                    Event::Connected => welcome = Some(started.elapsed()),
                    Event::CaughtUp => {
                        caught_up = Some(started.elapsed());
                        self.edits += 1;
                        let edits = self.edits;
                        let c = self
                            .room
                            .transact(1_800_000_000_000 + edits as u64, |tx| {
                                tx.set("/probe", "n", Value::Int(edits))
                            })
                            .map_err(|e| e.to_string())?
                            .expect("a change");
                        link.send_local(now_ms(), &mut self.room, &[c.idx]);
                        committed = Some((c.idx, Instant::now()));
                    }
                    Event::Acknowledged { .. } | Event::ServerHolds { .. } => {
                        if let (Some(welcome), Some(caught_up), Some((_, at))) =
                            (welcome, caught_up, committed)
                            && self.room.outbox_len() == 0
                        {
                            let _ = sink.close().await;
                            return Ok(Round {
                                welcome,
                                caught_up,
                                acked: at.elapsed(),
                            });
                        }
                    }
                    Event::Closed {
                        reason, message, ..
                    } => return Err(format!("closed: {} ({message})", reason.as_str())),
                    _ => {}
                }
            }
            while let Some(frame) = link.poll_transmit() {
                sink.send(WsMessage::Binary(frame.into()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let wake = link
                .poll_timeout()
                .map_or(1000, |t| t.saturating_sub(now_ms()));
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(WsMessage::Binary(bytes))) => {
                        link.handle_frame(now_ms(), &mut self.room, &bytes)
                            .map_err(|e| e.to_string())?;
                    }
                    Some(Ok(WsMessage::Close(frame))) => return Err(format!("server closed: {frame:?}")),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("the server went away".into()),
                },
                () = tokio::time::sleep(Duration::from_millis(wake)) => {
                    link.handle_timeout(now_ms(), &mut self.room);
                }
            }
        }
    }
}

/// Honest traffic for one attack: a replica in a room the attack does not
/// touch and one in the room it does (if any), their quiet rounds, and the
/// slowest round under attack.
struct Honest {
    replicas: Vec<Replica>,
    quiet: Vec<Duration>,
    worst: Vec<Duration>,
    slowest: Vec<Option<Round>>,
    rounds: usize,
}

impl Honest {
    /// Replicas in `rooms`, seeded and with quiet rounds measured.
    async fn measure(server: &Server, rooms: &[&str]) -> Honest {
        let mut replicas: Vec<Replica> = rooms
            .iter()
            .enumerate()
            .map(|(i, r)| Replica::new(r, 100 + i as u8))
            .collect();
        let mut quiet = vec![Vec::new(); replicas.len()];
        for _ in 0..5 {
            for (i, replica) in replicas.iter_mut().enumerate() {
                let round = replica.round(server, HONEST).await.unwrap();
                quiet[i].push(round.latency());
            }
        }
        let quiet = quiet
            .into_iter()
            .map(|mut q| {
                q.sort();
                q[q.len() / 2]
            })
            .collect();
        let worst = vec![Duration::ZERO; replicas.len()];
        let slowest = vec![None; replicas.len()];
        Honest {
            replicas,
            quiet,
            worst,
            slowest,
            rounds: 0,
        }
    }

    /// Rounds until `until`, at least two per replica.
    async fn rounds_until(&mut self, server: &Server, until: Instant) {
        let mut n = 0;
        while n < 2 || Instant::now() < until {
            for (i, replica) in self.replicas.iter_mut().enumerate() {
                let round = replica
                    .round(server, HONEST)
                    .await
                    .unwrap_or_else(|e| panic!("an honest round failed under attack: {e}"));
                if round.latency() > self.worst[i] {
                    self.slowest[i] = Some(round);
                }
                self.worst[i] = self.worst[i].max(round.latency());
                self.rounds += 1;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts the bound and reports the figures.
    fn check(&self, attack: &str) {
        for (i, (quiet, worst)) in self.quiet.iter().zip(&self.worst).enumerate() {
            let bound = (*quiet * FACTOR).max(FLOOR);
            let slowest = self.slowest[i].map_or_else(String::new, |r| {
                format!(
                    "; slowest: welcome {:?}, caught up {:?}, ack {:?}",
                    r.welcome, r.caught_up, r.acked
                )
            });
            eprintln!(
                "{attack}: honest replica {i}: welcome + ack quiet {quiet:?}, worst under attack {worst:?} ({:.1}x quiet; bound {bound:?}), {} rounds{slowest}",
                worst.as_secs_f64() / quiet.as_secs_f64().max(1e-6),
                self.rounds,
            );
            assert!(
                *worst <= bound,
                "{attack}: an honest round took {worst:?}, over {bound:?}"
            );
        }
    }
}

/// After an attack: the server is up, loads a new room, stayed under the
/// memory bound, and holds every node it acknowledged to honest replicas.
async fn after_attack(server: &mut Server, honest: &Honest, peak_rss: u64, attack: &str) {
    let rss = server.rss();
    eprintln!(
        "{attack}: server RSS peak {} MiB, after {} MiB (bound {} MiB)",
        peak_rss >> 20,
        rss >> 20,
        RSS_BOUND >> 20
    );
    assert!(peak_rss <= RSS_BOUND, "{attack}: RSS reached {peak_rss} B");
    let mut fresh = Replica::new(&format!("after-{}", now_ms()), 7);
    fresh
        .round(server, HONEST)
        .await
        .unwrap_or_else(|e| panic!("{attack}: the server cannot load a new room: {e}"));
    for replica in &honest.replicas {
        let mut reader = Replica::new(replica.room.room().id().as_str(), 9);
        reader.round(server, HONEST).await.unwrap();
        let mine = replica.room.room().dag().id_index();
        let theirs = reader.room.room().dag().id_index();
        assert!(
            mine.keys().all(|id| theirs.contains_key(id)),
            "{attack}: a node the server acknowledged is missing"
        );
    }
}

/// Runs `attack` while honest rounds go on for at least `secs` seconds,
/// sampling the server's RSS every 50 ms; the peak and what the attack
/// returned (connections it holds open, say).
async fn under_attack<T>(
    server: &Server,
    honest: &mut Honest,
    secs: u64,
    attack: impl std::future::Future<Output = T>,
) -> (u64, T) {
    let pid = server.child.id();
    let peak = Arc::new(Mutex::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(rss) = rss_of(pid) {
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(rss);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(secs);
    let (out, ()) = tokio::join!(attack, honest.rounds_until(server, until));
    sampler.abort();
    let peak = *peak.lock().unwrap();
    (peak, out)
}

/// What a client presents on a connection with `challenge` (open rooms).
fn credentials(challenge: [u8; 32]) -> Credentials {
    Credentials {
        challenge,
        token: None,
    }
}

/// A `hello` for `room` as a fresh client would send it on a connection
/// with `challenge`.
fn hello(room: &str, session: u64, seed: u8, challenge: &[u8; 32]) -> Vec<u8> {
    let mut replica = Replica::new(room, seed);
    let mut link = ClientLink::open(
        0,
        session,
        &mut replica.room,
        SessionConfig::default(),
        Scope::everything(),
        &credentials(*challenge),
    )
    .unwrap();
    link.poll_transmit().unwrap()
}

fn run(attack: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(attack);
}

/// What a connection's end looked like to the attacker.
async fn close_reason(ws: &mut Ws) -> Option<(CloseCode, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, ws.next()).await {
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                return Some((frame.code, frame.reason.to_string()));
            }
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

#[test]
fn garbage_protocol_violations_and_oversized_frames_close_only_their_connection() {
    run(async { garbage(Server::start().await).await });
}

async fn garbage(mut server: Server) {
    {
        let mut honest = Honest::measure(&server, &["quiet-room"]).await;
        let attack = async {
            let mut reasons = Vec::new();
            for i in 0..40u64 {
                let (mut ws, _) = ws_from(&server, ATTACKER).await.unwrap();
                let frame = match i % 4 {
                    // Bytes that are no envelope.
                    0 => WsMessage::Binary(vec![0xff; 100].into()),
                    // Text frames are not the protocol.
                    1 => WsMessage::Text("hello".into()),
                    // A frame over the 4 MiB limit.
                    2 => WsMessage::Binary(vec![0; 5 << 20].into()),
                    // A pack for a session never opened, then garbage.
                    _ => WsMessage::Binary(
                        Envelope::frame(
                            9,
                            1,
                            Message::Pack {
                                pack: vec![1, 2, 3],
                                checksum: [0; 32],
                                phase: Phase::Live,
                                last: true,
                            },
                        )
                        .into(),
                    ),
                };
                let _ = ws.send(frame).await;
                if i % 4 == 3 {
                    let _ = ws.send(WsMessage::Binary(vec![7; 10].into())).await;
                }
                reasons.push((i % 4, close_reason(&mut ws).await));
            }
            for (kind, reason) in reasons {
                let (code, text) = reason.unwrap_or_else(|| panic!("kind {kind}: no close frame"));
                let expected = match kind {
                    2 => (CloseCode::Size, "too_large"),
                    _ => (CloseCode::Protocol, "malformed"),
                };
                assert_eq!((code, text.as_str()), expected, "attack kind {kind}");
            }
            // Raw bytes that are not WebSocket framing after an upgrade.
            for _ in 0..10 {
                use tokio::io::AsyncWriteExt;
                let (ws, _) = ws_from(&server, ATTACKER).await.unwrap();
                let MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
                    unreachable!()
                };
                let _ = tcp.write_all(&[0x0f; 64]).await;
            }
        };
        let (peak, ()) = under_attack(&server, &mut honest, 3, attack).await;
        honest.check("garbage");
        assert!(
            server
                .metric("syncline_connections_closed_total", "reason=\"malformed\"")
                .await
                >= 30.0
        );
        assert!(
            server
                .metric("syncline_connections_closed_total", "reason=\"too_large\"")
                .await
                >= 10.0
        );
        after_attack(&mut server, &honest, peak, "garbage").await;
    }
}

#[test]
fn compression_bombs_are_refused_without_inflating() {
    run(async {
        let mut server = Server::start().await;
        let mut honest = Honest::measure(&server, &["quiet-room", "bombed"]).await;
        // 64 MiB of zeros, declared as a pack body: 2 KiB on the wire.
        let zeros = vec![0u8; 64 << 20];
        let mut bomb = b"SLP1".to_vec();
        bomb.push(1);
        syncline_core::codec::varint::put(&mut bomb, zeros.len() as u64);
        bomb.extend_from_slice(&zstd::bulk::compress(&zeros, 19).unwrap());
        drop(zeros);
        let checksum = *blake3::hash(&bomb).as_bytes();
        let attack = async {
            let mut tasks = Vec::new();
            for c in 0..20u64 {
                let bomb = bomb.clone();
                let (mut ws, challenge) = ws_from(&server, ATTACKER).await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let rooms = ["bombed".to_owned(), format!("bomb-{c}")];
                    for (s, room) in rooms.iter().enumerate() {
                        let session = s as u64 + 1;
                        let _ = ws
                            .send(WsMessage::Binary(
                                hello(room, session, 50, &challenge).into(),
                            ))
                            .await;
                        for corr in 1..=10 {
                            let frame = Envelope::frame(
                                session,
                                corr,
                                Message::Pack {
                                    pack: bomb.clone(),
                                    checksum,
                                    phase: Phase::Live,
                                    last: true,
                                },
                            );
                            let _ = ws.send(WsMessage::Binary(frame.into())).await;
                        }
                    }
                    // Read what the server says until it closes.
                    while let Ok(Some(Ok(_))) = timeout(Duration::from_secs(3), ws.next()).await {}
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        };
        let (peak, ()) = under_attack(&server, &mut honest, 3, attack).await;
        honest.check("compression bombs");
        assert!(
            server
                .metric("syncline_sessions_closed_total", "reason=\"too_large\"")
                .await
                >= 20.0,
            "the bombs' sessions are closed too_large"
        );
        after_attack(&mut server, &honest, peak, "compression bombs").await;
    });
}

#[test]
fn thousands_of_rooms_from_one_peer_do_not_lock_others_out() {
    run(async {
        let mut server = Server::start().await;
        let mut honest = Honest::measure(&server, &["quiet-room"]).await;
        let key = Keypair::from_seed([60; 32]);
        let template = Envelope::decode(&hello("spam", 1, 60, &[0; 32])).unwrap();
        let attack = async {
            let mut conns = Vec::new();
            for c in 0..40u64 {
                let Ok((mut ws, challenge)) = ws_from(&server, ATTACKER).await else {
                    continue; // Refused: the address holds its most.
                };
                for s in 1..=64u64 {
                    // A distinct room per session and connection, each
                    // hello signed for its room, session and connection.
                    let mut env = template.clone();
                    env.session = s;
                    let spam = RoomId::new(&format!("spam-{c}-{s}")).unwrap();
                    if let Message::Hello { room, proof, .. } = &mut env.message {
                        *proof = Some(auth::hello_proof(&key, &challenge, &spam, s));
                        *room = spam;
                    }
                    let _ = ws.send(WsMessage::Binary(env.encode().into())).await;
                }
                conns.push(ws);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            conns
        };
        let (peak, conns) = under_attack(&server, &mut honest, 4, attack).await;
        honest.check("thousands of rooms");
        let loaded = server.metric("syncline_rooms_loaded", "").await;
        eprintln!("thousands of rooms: {loaded} rooms loaded with the attacker connected");
        assert!(loaded <= 300.0, "{loaded} rooms loaded");
        assert!(
            server
                .metric("syncline_refused_total", "why=\"sessions_per_ip\"")
                .await
                >= 1.0
        );
        after_attack(&mut server, &honest, peak, "thousands of rooms").await;
        drop(conns);
    });
}

#[test]
fn silent_and_idle_connections_time_out_and_others_get_in() {
    run(async {
        let mut server = Server::start().await;
        let mut honest = Honest::measure(&server, &["quiet-room"]).await;
        let attack = async {
            // Upgraded connections that never open a session.
            let mut idle = Vec::new();
            for _ in 0..40 {
                if let Ok((ws, _)) = ws_from(&server, ATTACKER).await {
                    idle.push(ws);
                }
            }
            // Silent TCP connections: never a byte of HTTP.
            let mut silent = Vec::new();
            for _ in 0..600 {
                if let Ok(Ok(tcp)) = timeout(
                    Duration::from_secs(2),
                    connect_from(ATTACKER, server.addr()),
                )
                .await
                {
                    silent.push(tcp);
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            (silent, idle)
        };
        let (peak, held) = under_attack(&server, &mut honest, 4, attack).await;
        honest.check("silent connections");
        // Every silent and idle connection has been closed by now.
        let open = server.metric("syncline_tcp_connections", "").await;
        assert!(open <= 2.0, "{open} connections still open");
        assert!(
            server
                .metric("syncline_refused_total", "why=\"connections_per_ip\"")
                .await
                >= 1.0
        );
        assert!(
            server
                .metric("syncline_connections_closed_total", "reason=\"timeout\"")
                .await
                >= 1.0,
            "idle WebSockets closed timeout"
        );
        assert!(
            server
                .metric("syncline_connections_closed_total", "reason=\"http\"")
                .await
                >= 1.0,
            "silent TCP connections closed at the header timeout"
        );
        after_attack(&mut server, &honest, peak, "silent connections").await;
        drop(held);
    });
}

/// A room of 12 MB: 120 nodes of 100 KB, uploaded by an honest replica.
async fn large_room(server: &Server, name: &str) -> Replica {
    let mut replica = Replica::new(name, 30);
    replica.write_bulk(120, 100_000);
    replica.round(server, HONEST).await.unwrap();
    replica
}

#[test]
fn a_peer_that_never_reads_is_closed_lagging_and_freed() {
    run(async {
        let mut server = Server::start().await;
        let _large = large_room(&server, "large").await;
        let mut honest = Honest::measure(&server, &["quiet-room", "large"]).await;
        let attack = async {
            let mut stalled = Vec::new();
            for c in 0..10u8 {
                let (mut ws, challenge) = ws_from(&server, ATTACKER).await.unwrap();
                for s in 1..=5u64 {
                    let _ = ws
                        .send(WsMessage::Binary(
                            hello("large", s, 70 + c, &challenge).into(),
                        ))
                        .await;
                }
                // Never read: the server's writes stall.
                stalled.push(ws);
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            stalled
        };
        let (peak, held) = under_attack(&server, &mut honest, 4, attack).await;
        honest.check("never reads");
        let lagging = server
            .metric("syncline_connections_closed_total", "reason=\"lagging\"")
            .await;
        assert!(lagging >= 10.0, "{lagging} connections closed lagging");
        after_attack(&mut server, &honest, peak, "never reads").await;
        drop(held);
    });
}

#[test]
fn repeated_hellos_for_a_large_room_do_not_starve_a_newcomer() {
    run(async {
        let mut server = Server::start().await;
        let _large = large_room(&server, "large").await;
        let mut honest = Honest::measure(&server, &["quiet-room", "large"]).await;
        let attack = async {
            let mut tasks = Vec::new();
            for c in 0..6u8 {
                let (mut ws, challenge) = ws_from(&server, ATTACKER).await.unwrap();
                tasks.push(tokio::spawn(async move {
                    for s in 1..=8u64 {
                        let _ = ws
                            .send(WsMessage::Binary(
                                hello("large", s, 80 + c, &challenge).into(),
                            ))
                            .await;
                    }
                    // Read everything (the catch-ups), acknowledging nothing.
                    let until = Instant::now() + Duration::from_secs(4);
                    while Instant::now() < until {
                        if !matches!(
                            timeout(Duration::from_secs(1), ws.next()).await,
                            Ok(Some(Ok(_)))
                        ) {
                            break;
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        };
        let (peak, ()) = under_attack(&server, &mut honest, 4, attack).await;
        honest.check("repeated hellos");
        after_attack(&mut server, &honest, peak, "repeated hellos").await;
    });
}

#[test]
fn a_flood_is_rate_limited() {
    run(async { flood(Server::start().await).await });
}

async fn flood(mut server: Server) {
    {
        let mut honest = Honest::measure(&server, &["quiet-room", "flooded"]).await;
        // Signed, valid nodes: 40 packs of 1 MB, sent as fast as possible.
        let mut flooder = Replica::new("flooded", 90);
        flooder.write_bulk(400, 100_000);
        let dag_len = flooder.room.room().dag().next_idx();
        let packs: Vec<Vec<u8>> = (0..dag_len)
            .collect::<Vec<_>>()
            .chunks(10)
            .map(|chunk| flooder.room.export_pack(chunk).unwrap())
            .collect();
        let attack = async {
            let mut closed = Vec::new();
            for _ in 0..3 {
                let (mut ws, challenge) = ws_from(&server, ATTACKER).await.unwrap();
                let hello = hello("flooded", 1, 90, &challenge);
                let _ = ws.send(WsMessage::Binary(hello.into())).await;
                for (corr, pack) in packs.iter().enumerate() {
                    let frame = Envelope::frame(
                        1,
                        corr as u64 + 1,
                        Message::Pack {
                            checksum: *blake3::hash(pack).as_bytes(),
                            pack: pack.clone(),
                            phase: Phase::Live,
                            last: true,
                        },
                    );
                    if ws.send(WsMessage::Binary(frame.into())).await.is_err() {
                        break;
                    }
                }
                closed.push(close_reason(&mut ws).await);
            }
            closed
        };
        let (peak, closed) = under_attack(&server, &mut honest, 3, attack).await;
        honest.check("flood");
        assert!(
            closed
                .iter()
                .any(|c| c.as_ref().is_some_and(|(_, r)| r == "rate_limited")),
            "the flood was not closed rate_limited: {closed:?}"
        );
        after_attack(&mut server, &honest, peak, "flood").await;
    }
}

/// A relay of a fleet (PostgreSQL and NATS, another relay sharing its
/// database) holds the same limits: garbage closes only its connection,
/// a flood of valid nodes is rate limited, honest clients go on, and
/// nothing acknowledged is lost.
#[test]
fn a_fleet_relay_holds_its_limits() {
    let Some(db) = common::fresh_database() else {
        return;
    };
    let nats = common::nats_url();
    let prefix = format!("attack{}", std::process::id());
    let fleet = ["--postgres", &db, "--nats", &nats, "--nats-prefix", &prefix];
    run(async {
        let _peer = Server::start_with(&fleet).await;
        garbage(Server::start_with(&fleet).await).await;
        flood(Server::start_with(&fleet).await).await;
    });
}

#[test]
fn sigterm_stops_within_two_seconds_during_a_large_catch_up() {
    run(async {
        let mut server = Server::start().await;
        let _large = large_room(&server, "large").await;
        // Catch-ups in progress: three peers stopped reading (their socket
        // buffers fill), one reads on, slowly.
        let mut readers = Vec::new();
        for c in 0..4u8 {
            let (mut ws, challenge) = ws_from(&server, HONEST).await.unwrap();
            let _ = ws
                .send(WsMessage::Binary(
                    hello("large", 1, 120 + c, &challenge).into(),
                ))
                .await;
            let _ = timeout(Duration::from_millis(200), ws.next()).await;
            readers.push(ws);
        }
        let mut slow = readers.pop().unwrap();
        let slow = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            let left = || deadline.saturating_duration_since(Instant::now());
            let mut frames = 0;
            loop {
                match timeout(left(), slow.next()).await {
                    Ok(Some(Ok(WsMessage::Close(frame)))) => {
                        return frame.map(|f| f.reason.to_string());
                    }
                    Ok(Some(Ok(_))) => frames += 1,
                    other => {
                        eprintln!("after {frames} frames: {other:?}");
                        return None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = loop {
            if let Some(exit) = server.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the server was still running 2 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        eprintln!("sigterm: stopped in {:?} ({exit})", started.elapsed());
        assert!(exit.success(), "exit status {exit}");
        // The peer that reads is told why; those that stopped reading
        // could not be, and did not hold the server up.
        let told = slow.await.unwrap();
        assert_eq!(told.as_deref(), Some("shutting_down"));
        drop(readers);
    });
}

#[test]
fn a_peer_cannot_fill_the_disk() {
    run(async {
        // A room may hold 3 MB.
        let mut server = Server::start_with(&["--max-room-bytes", "3000000"]).await;
        let mut honest = Honest::measure(&server, &["quiet-room"]).await;
        let mut filler = Replica::new("filled", 40);
        filler.write_bulk(60, 100_000);
        let (peak, filled) =
            under_attack(&server, &mut honest, 2, filler.round(&server, ATTACKER)).await;
        let refused = filled.expect_err("6 MB went into a room of 3 MB");
        assert!(refused.contains("quota_exceeded"), "{refused}");
        honest.check("disk fill");
        // What the room holds is still served.
        let mut reader = Replica::new("filled", 41);
        let round = reader.round(&server, HONEST).await;
        let held = reader.room.room().dag().len();
        eprintln!(
            "disk fill: the filled room holds {held} of 60 nodes; a reader's round: {round:?}"
        );
        assert!(held > 0);
        after_attack(&mut server, &honest, peak, "disk fill").await;
        drop(server);

        // The whole store may hold 1 byte: every pack is refused once the
        // relay has looked (every second), reads go on.
        let server = Server::start_with(&["--max-store-bytes", "1"]).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut writer = Replica::new("any-room", 42);
        let refused = writer
            .round(&server, HONEST)
            .await
            .expect_err("the store is full");
        assert!(refused.contains("quota_exceeded"), "{refused}");
    });
}

#[test]
fn at_the_room_cap_idle_rooms_make_way() {
    run(async {
        // 10 rooms at most, idle ones kept a minute unless room is needed.
        let server = Server::start_with(&["--max-rooms", "10", "--room-idle", "60"]).await;
        let mut refused = 0;
        for i in 0..25 {
            let mut replica = Replica::new(&format!("room-{i}"), 50);
            let mut tries = 0;
            loop {
                match replica.round(&server, HONEST).await {
                    Ok(_) => break,
                    Err(e) if e.contains("overloaded") && tries < 20 => {
                        // Past the cap: idle rooms were asked to unload.
                        refused += 1;
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("room {i}: {e}"),
                }
            }
        }
        let loaded = server.metric("syncline_rooms_loaded", "").await;
        eprintln!("room cap: 25 rooms through a cap of 10, {refused} refusals, {loaded} loaded");
        assert!(loaded <= 10.0, "{loaded} rooms loaded");
        assert!(refused >= 1, "the cap was never reached");
        assert!(
            server
                .metric("syncline_refused_total", "why=\"rooms\"")
                .await
                >= 1.0
        );
    });
}

/// One HTTP/1.1 request to the server (the connection closed after it):
/// the status and the body.
async fn http(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The relay may answer (and close) before it read the whole body.
    let _ = tcp.write_all(body).await;
    let mut response = Vec::new();
    let _ = timeout(Duration::from_secs(10), tcp.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let start = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |p| p + 4);
    (status, response[start..].to_vec())
}

/// The next frame on `ws` that `pick` takes, skipping others.
async fn next_where<T>(ws: &mut Ws, mut pick: impl FnMut(Envelope) -> Option<T>) -> T {
    loop {
        let frame = timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s");
        if let Some(Ok(WsMessage::Binary(bytes))) = frame {
            if let Some(t) = pick(Envelope::decode(&bytes).unwrap()) {
                return t;
            }
        } else {
            panic!("the connection ended: {frame:?}");
        }
    }
}

#[test]
fn blob_urls_refuse_forged_expired_and_other_direction_grants_and_bad_groups() {
    use syncline_core::blob::Outboard;
    run(async {
        let server = Server::start_with(&["--blob-url-ttl", "2"]).await;
        let (mut ws, challenge) = ws_from(&server, HONEST).await.unwrap();
        ws.send(WsMessage::Binary(hello("media", 1, 150, &challenge).into()))
            .await
            .unwrap();
        next_where(&mut ws, |e| {
            matches!(e.message, Message::Welcome { .. }).then_some(())
        })
        .await;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (hash, outboard) = Outboard::of(&data);
        let send = |corr: u64, message: Message| {
            WsMessage::Binary(Envelope::frame(1, corr, message).into())
        };
        let url_for = |corr: u64| {
            move |e: Envelope| match e.message {
                Message::BlobUrl { path, .. } if e.corr == corr => Some(Ok(path)),
                Message::Error { code, related, .. } if related == corr => Some(Err(code)),
                _ => None,
            }
        };
        // A URL to read a blob the room does not have: not_found.
        ws.send(send(5, Message::BlobGrant { hash, put: false }))
            .await
            .unwrap();
        let refused = next_where(&mut ws, url_for(5)).await;
        assert_eq!(
            refused,
            Err(syncline_core::proto::message::Reason::NotFound)
        );
        // Offer it, then get a URL to upload it.
        let outboard = outboard.encode();
        ws.send(send(6, Message::BlobPut { hash, outboard }))
            .await
            .unwrap();
        ws.send(send(7, Message::BlobGrant { hash, put: true }))
            .await
            .unwrap();
        let put = next_where(&mut ws, url_for(7)).await.unwrap();
        // A group that does not match the outboard: 422, nothing kept.
        let mut bad = data.clone();
        bad[70_000] ^= 1;
        let range = "bytes 65536-199999/200000";
        let (status, body) = http(
            &server,
            "PUT",
            &put,
            &[("Content-Range", range)],
            &bad[65_536..],
        )
        .await;
        assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
        // Forged, or used for the other direction: 403.
        let last = if put.ends_with('0') { "1" } else { "0" };
        let forged = format!("{}{last}", &put[..put.len() - 1]);
        assert_eq!(http(&server, "PUT", &forged, &[], &data).await.0, 403);
        assert_eq!(http(&server, "GET", &put, &[], &[]).await.0, 403);
        let other_blob = put.replacen(&syncline_core::ids::to_hex(&hash)[..4], "ffff", 1);
        assert_eq!(http(&server, "PUT", &other_blob, &[], &data).await.0, 403);
        // Not at a group boundary: 416. The right bytes: complete.
        let (status, _) = http(
            &server,
            "PUT",
            &put,
            &[("Content-Range", "bytes 10-199999/200000")],
            &data[10..],
        )
        .await;
        assert_eq!(status, 416);
        let (status, body) = http(&server, "PUT", &put, &[], &data).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        // Read it back, a range of it, and a range past its end.
        ws.send(send(8, Message::BlobGrant { hash, put: false }))
            .await
            .unwrap();
        let get = next_where(&mut ws, url_for(8)).await.unwrap();
        let (status, body) = http(&server, "GET", &get, &[], &[]).await;
        assert_eq!((status, body == data), (200, true));
        let (status, body) = http(&server, "GET", &get, &[("Range", "bytes=100-199")], &[]).await;
        assert_eq!((status, &body[..]), (206, &data[100..200]));
        assert_eq!(
            http(&server, "GET", &get, &[("Range", "bytes=200000-")], &[])
                .await
                .0,
            416
        );
        assert_eq!(
            http(
                &server,
                "GET",
                "/blobs/zz?room=media&grant=1-r-00",
                &[],
                &[]
            )
            .await
            .0,
            404
        );
        // Two seconds later the grants have expired.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (status, body) = http(&server, "GET", &get, &[], &[]).await;
        assert_eq!(status, 403);
        assert!(String::from_utf8_lossy(&body).contains("expired"));
    });
}
