//! `catchup`: what a client that lacks part of a room costs to bring up to
//! date.
//!
//! - **Partial history, in process:** the trace room, the client holding
//!   50, 90 or 99 % of it; real client and server sessions over an
//!   in-memory link; bytes against a pack of just the missing nodes.
//! - **Large rooms, through the real server and CLI:** rooms of 10, 20, 40
//!   and 80 MB of text (about 500 nodes per MB) in a `syncline serve`
//!   process; a fresh replica runs `syncline sync --once` and the time to
//!   exit is the catch-up time (the replica's state hash is then checked
//!   with `syncline hash`). A probe client times `hello` to `welcome`: on a
//!   cold server (the room loads from disk), on a warm one, and while a
//!   catch-up of the room is running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::proto::message::{Envelope, Message};
use syncline_core::proto::session::{Config as SessionConfig, Credentials, Session};
use syncline_core::{Keypair, Room, RoomId};

use crate::challenge::read_challenge;
use syncline_store::{DurableRoom, SqliteOptions, SqliteStore};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::{Args, Report, ms, run_session, trace};

/// Text per node in the large rooms: about 500 nodes per MB.
const NODE_TEXT: usize = 2_000;
/// Room sizes of the large-room series, in MB of text.
const SIZES_MB: [usize; 4] = [10, 20, 40, 80];
/// Welcome probes per condition.
const PROBES: usize = 5;

pub(crate) fn bench_catchup(args: &Args, report: &Report) -> Result<()> {
    partial_history(args, report)?;
    large_rooms(report)
}

fn partial_history(args: &Args, report: &Report) -> Result<()> {
    let (patches, _) = trace::load(&args.trace)?;
    let key = Keypair::from_seed([7; 32]);
    let mut author = trace::replay(&patches, &key)?;
    let order = author.dag().causal_order();
    let pack = author.pack(&order, Some(&key))?;
    for percent in [50usize, 90, 99] {
        // The server holds the whole history as received (signed); the
        // client holds a causal prefix of it.
        let mut server = Room::new(trace::room_id());
        server.receive_pack(&pack)?;
        let split = order.len() * percent / 100;
        let prefix = author.pack(&order[..split], Some(&key))?;
        let mut client = Room::new(trace::room_id());
        client.receive_pack(&prefix)?;
        // Reference: the missing nodes alone, as one compact pack.
        let missing = server
            .dag()
            .missing_for_version_vector(&client.dag().version_vector());
        let reference = server.pack(&missing, None)?;
        let client_key = Keypair::from_seed([8; 32]);
        let config = SessionConfig::default();
        let run = run_session(
            &mut client,
            &client_key,
            &mut server,
            config.clone(),
            config,
        )?;
        let total = run.bytes_up + run.bytes_down;
        let ratio = total as f64 / reference.len() as f64;
        report.emit(
            "catchup",
            &[
                ("client holds", format!("{percent} % ({split} of {} nodes)", order.len())),
                ("missing nodes", missing.len().to_string()),
                ("bytes up / down", format!("{} / {}", run.bytes_up, run.bytes_down)),
                ("total / missing-nodes pack", format!("{total} / {} = {ratio:.3}", reference.len())),
                ("round trips", run.round_trips.to_string()),
                ("time to converge", format!("{:.1} ms", ms(run.took))),
            ],
            json!({"percent": percent, "missing": missing.len(), "bytes_up": run.bytes_up, "bytes_down": run.bytes_down, "reference_bytes": reference.len(), "ratio": ratio, "round_trips": run.round_trips, "converge_ms": ms(run.took)}),
        );
    }
    Ok(())
}

/// The `syncline` command built beside this benchmark.
fn cli_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("the benchmark has no directory")?
        .join("syncline");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (cargo build --release -p syncline-cli)",
        path.display()
    );
    Ok(path)
}

/// Pseudo-words, deterministic: text that compresses like prose, not like
/// a repeated string.
fn text(seed: u64, len: usize) -> String {
    const WORDS: [&str; 16] = [
        "sync", "replica", "history", "node", "merge", "offline", "relay", "the", "of", "and",
        "text", "causal", "room", "pack", "signed", "order",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(WORDS[(x % 16) as usize]);
        out.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    out.truncate(len);
    out
}

/// Writes a room of `mb` MB of text (one author appending `NODE_TEXT`
/// bytes per node to 16 documents) into the relay store at `db`, as the
/// relay would have received it. Returns the room's state hash (hex) and
/// node count.
fn seed_room(db: &Path, room_id: &RoomId, mb: usize) -> Result<(String, usize)> {
    let key = Keypair::from_seed([11; 32]);
    let mut room = Room::new(room_id.clone());
    let mut lengths = [0usize; 16];
    let nodes = mb * 1_000_000 / NODE_TEXT;
    for i in 0..nodes {
        let doc = i % 16;
        let chunk = text(i as u64, NODE_TEXT);
        let mut tx = room.begin(key.author(), 1_000 + i as u64);
        tx.text_insert(&format!("/docs/d{doc}"), lengths[doc], &chunk)?;
        tx.commit()?;
        lengths[doc] += chunk.chars().count();
    }
    let store = Arc::new(SqliteStore::open(db, SqliteOptions::default())?);
    let mut relay = DurableRoom::load(store.clone(), Keypair::from_seed([12; 32]), room_id)?;
    let order = room.dag().causal_order();
    for chunk in order.chunks(1_000) {
        let pack = room.pack(chunk, Some(&key))?;
        relay.receive_pack(&pack)?;
    }
    relay.checkpoint()?;
    anyhow::ensure!(
        relay.room().state_hash() == room.state_hash(),
        "seeding diverged"
    );
    drop(relay);
    store.settle()?;
    Ok((syncline_core::ids::to_hex(&room.state_hash()), nodes))
}

/// A `syncline serve` process.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(cli: &Path, data: &Path) -> Result<Serve> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(cli)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "syncline serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Serve {
            child,
            url: format!("ws://127.0.0.1:{port}/ws"),
        })
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds from sending a fresh replica's `hello` for `room` to the
/// `welcome` arriving (connection set up first, not counted).
fn probe_welcome(runtime: &tokio::runtime::Runtime, url: &str, room: &RoomId) -> Result<f64> {
    runtime.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
        let (mut sink, mut stream) = ws.split();
        let credentials = Credentials {
            challenge: read_challenge(&mut stream).await?,
            token: None,
        };
        let key = Keypair::from_seed([13; 32]);
        let mut fresh = Room::new(room.clone());
        let mut session = Session::client(
            0,
            1,
            &mut fresh,
            &key,
            SessionConfig::default(),
            &credentials,
        );
        let hello = session.poll_transmit().context("no hello")?;
        let sent = Instant::now();
        sink.send(WsMessage::Binary(hello.into())).await?;
        let deadline = Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout(deadline, stream.next()).await;
            let Ok(Some(Ok(WsMessage::Binary(bytes)))) = next else {
                anyhow::ensure!(sent.elapsed() < deadline, "no welcome within {deadline:?}");
                continue;
            };
            if let Message::Welcome { .. } = Envelope::decode(&bytes)?.message {
                let took = ms(sent.elapsed());
                let _ = sink.close().await;
                return Ok(took);
            }
        }
    })
}

/// The slowest of `PROBES` welcome probes.
fn slowest_welcome(runtime: &tokio::runtime::Runtime, url: &str, room: &RoomId) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for _ in 0..PROBES {
        worst = worst.max(probe_welcome(runtime, url, room)?);
    }
    Ok(worst)
}

fn large_rooms(report: &Report) -> Result<()> {
    let cli = cli_binary()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut per_mb: Vec<f64> = Vec::new();
    for mb in SIZES_MB {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("server");
        std::fs::create_dir_all(&data)?;
        let room = RoomId::new(&format!("large-{mb}mb"))?;
        let (expected, nodes) = seed_room(&data.join("relay.db"), &room, mb)?;
        let server = Serve::start(&cli, &data)?;
        // The first hello loads the room from disk.
        let cold = probe_welcome(&runtime, &server.url, &room)?;
        let warm = slowest_welcome(&runtime, &server.url, &room)?;
        let replica = dir.path().join("reader");
        let start = Instant::now();
        let mut sync = Command::new(&cli)
            .arg("--replica")
            .arg(&replica)
            .args(["sync", "--once", "--timeout", "900", "--server"])
            .arg(&server.url)
            .arg(room.as_str())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        // Welcomes while the catch-up runs (its hello is long answered).
        std::thread::sleep(Duration::from_millis(300));
        let busy = if sync.try_wait()?.is_none() {
            Some(slowest_welcome(&runtime, &server.url, &room)?)
        } else {
            None
        };
        let out = sync.wait_with_output()?;
        let took = start.elapsed();
        anyhow::ensure!(
            out.status.success(),
            "syncline sync failed for {mb} MB: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hash = Command::new(&cli)
            .arg("--replica")
            .arg(&replica)
            .args(["hash", room.as_str()])
            .output()?;
        anyhow::ensure!(
            String::from_utf8_lossy(&hash.stdout).trim() == expected,
            "the {mb} MB room did not arrive whole"
        );
        let rate = mb as f64 / took.as_secs_f64();
        per_mb.push(ms(took) / mb as f64);
        let welcome_busy =
            busy.map_or("catch-up already done".to_owned(), |w| format!("{w:.1} ms"));
        report.emit(
            "catchup-large",
            &[
                ("room", format!("{mb} MB of text, {nodes} nodes")),
                ("syncline sync --once", format!("{:.2} s", took.as_secs_f64())),
                ("rate (target >= 20 MB/s)", format!("{rate:.1} MB/s")),
                ("time per MB", format!("{:.1} ms", ms(took) / mb as f64)),
                ("welcome, cold room", format!("{cold:.1} ms")),
                ("welcome, warm (slowest of 5)", format!("{warm:.1} ms")),
                ("welcome during the catch-up (slowest of 5)", welcome_busy),
            ],
            json!({"mb": mb, "nodes": nodes, "sync_s": took.as_secs_f64(), "mb_per_s": rate, "ms_per_mb": ms(took) / mb as f64, "welcome_cold_ms": cold, "welcome_warm_ms": warm, "welcome_busy_ms": busy}),
        );
    }
    let (lo, hi) = per_mb
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    report.emit(
        "catchup-large",
        &[(
            "time per MB, largest / smallest across sizes (target <= 1.3)",
            format!("{:.2} x", hi / lo),
        )],
        json!({"per_mb_spread": hi / lo}),
    );
    Ok(())
}
