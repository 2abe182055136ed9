//! `fanout`: one room, N clients over real WebSockets on loopback, W of them
//! writing 6 edits/s; edit-to-remote latency (p50, p99), deliveries lost,
//! server CPU, and server memory per idle session, for the Syncline relay
//! and, in the same run, a bare reference relay.
//!
//! Each relay runs in a child process (this binary, re-executed with
//! `fanout-server` or `fanout-reference`), so its CPU time and resident
//! memory are its own. The reference relay broadcasts every binary frame
//! to every other connection: no handshake, no validation, no storage, the
//! floor that a relay's latency is a ratio to. The clients are tasks in
//! this process, each a replica over a memory store synced through the
//! SDK's client half (`syncline_hub::ClientLink`); the SDK's per-replica
//! SQLite files and threads would measure the client side, not the server.
//!
//! Writers send on a schedule: edit `n` of a writer is due at its start
//! plus `n / 6` s, carries that scheduled time, and latency is measured
//! from it (a writer that falls behind sends late, and the lateness
//! counts: no coordinated omission). Every edit scheduled inside the
//! measured window is expected at every probe; one that has not arrived
//! two seconds after the window counts as lost, and lost deliveries count
//! as infinitely late in the percentiles.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::proto::message::{Envelope, Message, PROTOCOL_VERSION, Phase};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config as SessionConfig, Credentials};
use syncline_core::{Keypair, Op, RoomId, Value};
use syncline_hub::ClientLink;
use syncline_store::{DurableRoom, MemoryStore};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::Report;
use crate::challenge::read_challenge;

/// Edits per second per writer.
const RATE: f64 = 6.0;
const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// How long after the window a delivery may still arrive.
const GRACE: Duration = Duration::from_secs(2);
/// Clients that verify, apply and time every relayed edit.
const PROBES: usize = 8;

/// Where a benchmark relay keeps its rooms: its data directory's SQLite
/// (no `postgres`), or a PostgreSQL database, shared with the rest of a
/// fleet told of commits through NATS at `nats`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Backing {
    pub(crate) postgres: Option<String>,
    pub(crate) nats: Option<String>,
    pub(crate) nats_prefix: Option<String>,
}

impl Backing {
    /// The child process's arguments for it.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, value) in [
            ("--postgres", &self.postgres),
            ("--nats", &self.nats),
            ("--nats-prefix", &self.nats_prefix),
        ] {
            if let Some(value) = value {
                args.extend([flag.to_owned(), value.clone()]);
            }
        }
        args
    }

    /// Parses what [`Backing::args`] made.
    pub(crate) fn parse(args: &[String]) -> Result<Backing> {
        let mut backing = Backing::default();
        for pair in args.chunks(2) {
            let [flag, value] = pair else {
                anyhow::bail!("a flag without a value: {pair:?}");
            };
            let slot = match flag.as_str() {
                "--postgres" => &mut backing.postgres,
                "--nats" => &mut backing.nats,
                "--nats-prefix" => &mut backing.nats_prefix,
                other => anyhow::bail!("unknown flag {other}"),
            };
            *slot = Some(value.clone());
        }
        Ok(backing)
    }
}

/// Runs the relay for the benchmark (the child process's entry point).
pub(super) fn serve(data: &Path, port: u16, backing: Backing) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let defaults = syncline_relay::Config::default();
        let config = syncline_relay::Config {
            data_dir: data.to_path_buf(),
            listen: format!("127.0.0.1:{port}").parse()?,
            // A thousand clients from one address.
            max_connections_per_ip: 10_000,
            max_sessions_per_ip: 10_000,
            postgres: backing.postgres,
            nats: backing.nats,
            nats_prefix: backing.nats_prefix.unwrap_or(defaults.nats_prefix.clone()),
            ..defaults
        };
        let server = syncline_relay::Server::bind(config).await?;
        server.run(syncline_relay::shutdown_signal()).await?;
        Ok(())
    })
}

/// Runs the reference relay (the child process's entry point): every
/// binary frame a connection sends goes to every other connection.
pub(super) fn serve_reference(port: u16) -> Result<()> {
    type Peers = std::sync::Mutex<
        std::collections::HashMap<u64, tokio::sync::mpsc::UnboundedSender<WsMessage>>,
    >;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let peers: Arc<Peers> = Arc::default();
        for id in 0u64.. {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let peers = peers.clone();
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut sink, mut stream) = ws.split();
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                peers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, tx);
                let writer = tokio::spawn(async move {
                    while let Some(m) = rx.recv().await {
                        if sink.send(m).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(m)) = stream.next().await {
                    if !m.is_binary() {
                        continue;
                    }
                    let peers = peers.lock().unwrap_or_else(|p| p.into_inner());
                    for (other, tx) in peers.iter() {
                        if *other != id {
                            let _ = tx.send(m.clone());
                        }
                    }
                }
                peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                writer.abort();
            });
        }
        Ok(())
    })
}

/// Which relay a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `syncline serve`'s relay, with real sessions.
    Syncline,
    /// The bare broadcast relay.
    Reference,
}

pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl ServerProcess {
    pub(crate) fn start(target: Target, data: &Path) -> Result<ServerProcess> {
        ServerProcess::start_on(target, data, &Backing::default())
    }

    /// A relay on `backing` (a [`Target::Syncline`] one).
    pub(crate) fn start_on(
        target: Target,
        data: &Path,
        backing: &Backing,
    ) -> Result<ServerProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = Command::new(std::env::current_exe()?);
        match target {
            Target::Syncline => command.arg("fanout-server").arg("--data").arg(data),
            Target::Reference => command.arg("fanout-reference"),
        };
        let child = command
            .arg("--port")
            .arg(port.to_string())
            .args(backing.args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the relay did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(ServerProcess { child, port })
    }

    /// (CPU seconds used so far, resident bytes) from /proc.
    fn usage(&self) -> Result<(f64, u64)> {
        usage_of(&self.child.id().to_string())
    }
}

/// (CPU seconds used so far, resident bytes) of process `pid` ("self" for
/// this one) from /proc.
pub(crate) fn usage_of(pid: &str) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are
    // the 14th and 15th fields overall.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // Clock ticks are 100 per second on Linux.
    Ok((ticks / 100.0, status_bytes(pid, "VmRSS")?))
}

/// A size in process `pid`'s /proc status (`VmRSS`, `VmHWM`, …), in bytes.
pub(crate) fn status_bytes(pid: &str, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every client task shares.
struct Shared {
    target: Target,
    epoch: Instant,
    /// The measured window, in microseconds since `epoch` (set at `go`).
    window: std::sync::Mutex<(i64, i64)>,
    stop: AtomicBool,
    /// Edits scheduled inside the window: (writer, scheduled µs).
    scheduled: std::sync::Mutex<Vec<(usize, i64)>>,
    /// Deliveries at probes: (probe, writer, scheduled µs, arrived µs).
    delivered: std::sync::Mutex<Vec<(usize, usize, i64, i64)>>,
}

impl Shared {
    fn micros(&self) -> i64 {
        self.epoch.elapsed().as_micros() as i64
    }

    fn in_window(&self, t: i64) -> bool {
        let (from, to) = *self.window.lock().unwrap_or_else(|p| p.into_inner());
        t >= from && t < to
    }
}

/// What a client does after its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Verifies and applies everything relayed, and records deliveries.
    Probe,
    /// Writes 6 edits/s on a schedule; acknowledges relayed packs without
    /// applying them.
    Writer,
    /// Acknowledges relayed packs without applying them.
    Listener,
}

/// An edit's value: its scheduled time and its writer.
fn stamp(scheduled_us: i64, writer: usize) -> i64 {
    (scheduled_us << 10) | writer as i64
}

fn unstamp(v: i64) -> (i64, usize) {
    (v >> 10, (v & 1023) as usize)
}

type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    WsMessage,
>;

async fn send_frames(sink: &Mutex<Sink>, frames: Vec<Vec<u8>>) -> Result<()> {
    let mut sink = sink.lock().await;
    for f in frames {
        sink.send(WsMessage::Binary(f.into()))
            .await
            .map_err(|_| anyhow::anyhow!("send failed"))?;
    }
    Ok(())
}

/// One client. With the Syncline relay every client does a real
/// handshake and acknowledges every pack, as the server expects; only
/// probes decode and verify what is relayed (on two cores, a thousand
/// clients each verifying every edit would measure the load generator,
/// not the relay). With the reference relay writers send the same pack
/// frames, probes verify and apply them the same way, and nobody
/// acknowledges (the reference expects nothing).
async fn client(
    url: String,
    index: usize,
    role: Role,
    shared: Arc<Shared>,
    ready: Arc<tokio::sync::Barrier>,
    go: Arc<tokio::sync::Barrier>,
) -> Result<()> {
    let target = shared.target;
    let raw = Arc::new(AtomicBool::new(target == Target::Reference));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await?;
    let (sink, mut stream) = ws.split();
    // The reference relay sends no challenge (and checks nothing).
    let challenge = match target {
        Target::Syncline => read_challenge(&mut stream).await?,
        Target::Reference => [0; 32],
    };
    let sink = Arc::new(Mutex::new(sink));
    let key = Keypair::from_seed(*blake3::hash(&(index as u64).to_le_bytes()).as_bytes());
    let now = || shared.epoch.elapsed().as_millis() as u64;
    // A replica in memory, synced through the SDK's client half.
    let mut durable = DurableRoom::load(
        Arc::new(MemoryStore::new()),
        key.clone(),
        &RoomId::new("fanout")?,
    )?;
    let link = ClientLink::open(
        now(),
        1,
        &mut durable,
        SessionConfig::default(),
        Scope::everything(),
        &Credentials {
            challenge,
            token: None,
        },
    )?;
    let replica = Arc::new(Mutex::new((durable, link)));
    let pending = |l: &mut ClientLink| std::iter::from_fn(|| l.poll_transmit()).collect::<Vec<_>>();
    if target == Target::Syncline {
        let frames = pending(&mut replica.lock().await.1);
        send_frames(&sink, frames).await?;
    }
    let reader = {
        let (replica, sink, shared, raw) =
            (replica.clone(), sink.clone(), shared.clone(), raw.clone());
        async move {
            let now = || shared.epoch.elapsed().as_millis() as u64;
            while let Some(Ok(message)) = stream.next().await {
                let WsMessage::Binary(bytes) = message else {
                    continue;
                };
                let arrived = shared.micros();
                if target == Target::Reference && role != Role::Probe {
                    continue;
                }
                let Ok(env) = Envelope::decode(&bytes) else {
                    continue;
                };
                if raw.load(Ordering::Relaxed) && role != Role::Probe {
                    // Listeners and writers of the Syncline run ack packs
                    // unread; acks for a writer's own packs go to its
                    // session (they open its send window).
                    match env.message {
                        Message::Pack { .. } => {
                            let ack = Envelope {
                                version: PROTOCOL_VERSION,
                                session: env.session,
                                corr: env.corr,
                                message: Message::Ack { nodes: Vec::new() },
                            };
                            if send_frames(&sink, vec![ack.encode()]).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        Message::Ack { .. } => {}
                        _ => continue,
                    }
                }
                let mut stamps = Vec::new();
                let frames = {
                    let mut guard = replica.lock().await;
                    let (durable, link) = &mut *guard;
                    let first = durable.room().dag().next_idx();
                    match (target, env.message) {
                        (Target::Reference, Message::Pack { pack, .. }) => {
                            let _ = durable.receive_pack(&pack);
                        }
                        (Target::Reference, _) => {}
                        (Target::Syncline, message) => {
                            let env = Envelope { message, ..env };
                            if link.handle_envelopes(now(), durable, [env]).is_err() {
                                break;
                            }
                            // Acknowledges what arrived, trims the outbox.
                            while let Ok(Some(_)) = link.poll_event(now(), durable) {}
                        }
                    }
                    let dag = durable.room().dag();
                    for idx in first..dag.next_idx() {
                        if let Some(Op::Set {
                            value: Value::Int(v),
                            ..
                        }) = dag.ops(idx).first()
                        {
                            stamps.push(unstamp(*v));
                        }
                    }
                    pending(link)
                };
                if !stamps.is_empty() {
                    let mut delivered = shared.delivered.lock().unwrap_or_else(|p| p.into_inner());
                    for (scheduled, writer) in stamps {
                        delivered.push((index, writer, scheduled, arrived));
                    }
                }
                if send_frames(&sink, frames).await.is_err() || shared.stop.load(Ordering::Relaxed)
                {
                    break;
                }
            }
        }
    };
    let reader = tokio::spawn(reader);
    if target == Target::Syncline {
        // Wait for the handshake before counting this client ready.
        while !replica.lock().await.1.session().is_settled() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        raw.store(role != Role::Probe, Ordering::Relaxed);
    }
    // Everyone connected (the idle memory is measured now), then go.
    ready.wait().await;
    go.wait().await;
    if role == Role::Writer {
        let period = Duration::from_secs_f64(1.0 / RATE).as_micros() as i64;
        // Writers spread over the period.
        let start = shared.micros() + period * (index % 97) as i64 / 97;
        for n in 0i64.. {
            let scheduled = start + n * period;
            let due = shared.epoch + Duration::from_micros(scheduled as u64);
            tokio::time::sleep_until(due.into()).await;
            if shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let frames = {
                let mut guard = replica.lock().await;
                let (durable, link) = &mut *guard;
                let wall_ms = 1_767_225_600_000 + scheduled as u64 / 1000;
                let Some(c) = durable.transact(wall_ms, |tx| {
                    tx.set(
                        &format!("/w{index}/{}", n % 8),
                        "t",
                        Value::Int(stamp(scheduled, index)),
                    )
                })?
                else {
                    continue;
                };
                match target {
                    Target::Syncline => {
                        link.send_local(now(), durable, &[c.idx]);
                        pending(link)
                    }
                    Target::Reference => {
                        let pack = durable.export_pack(&[c.idx])?;
                        let env = Envelope {
                            version: PROTOCOL_VERSION,
                            session: 1,
                            corr: n as u64 + 1,
                            message: Message::Pack {
                                checksum: *blake3::hash(&pack).as_bytes(),
                                pack,
                                phase: Phase::Live,
                                last: true,
                            },
                        };
                        vec![env.encode()]
                    }
                }
            };
            if shared.in_window(scheduled) {
                shared
                    .scheduled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((index, scheduled));
            }
            send_frames(&sink, frames).await?;
        }
    } else {
        while !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    reader.abort();
    Ok(())
}

/// The `p` quantile in milliseconds; `u64::MAX` (lost) is infinite.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    match sorted[i] {
        u64::MAX => f64::INFINITY,
        us => us as f64 / 1000.0,
    }
}

/// What one run measured.
struct Measured {
    p50: f64,
    p99: f64,
    expected: usize,
    lost: usize,
    cpu: f64,
    generator: f64,
    per_idle_session: f64,
}

fn measure(target: Target, clients: usize, writers: usize) -> Result<Measured> {
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(target, dir.path())?;
    measure_on(target, &[server], clients, writers)
}

/// Measures with the relays `servers` (each client, writers and probes
/// among them, on relay `i % servers.len()`); CPU and memory are theirs
/// summed.
fn measure_on(
    target: Target,
    servers: &[ServerProcess],
    clients: usize,
    writers: usize,
) -> Result<Measured> {
    let usage = || -> Result<(f64, u64)> {
        let mut sum = (0.0, 0);
        for server in servers {
            let (cpu, rss) = server.usage()?;
            sum = (sum.0 + cpu, sum.1 + rss);
        }
        Ok(sum)
    };
    std::thread::sleep(Duration::from_millis(300));
    let (_, rss_empty) = usage()?;
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("ws://127.0.0.1:{}/ws", s.port))
        .collect();
    let shared = Arc::new(Shared {
        target,
        epoch: Instant::now(),
        window: std::sync::Mutex::new((i64::MAX, i64::MAX)),
        stop: AtomicBool::new(false),
        scheduled: std::sync::Mutex::new(Vec::new()),
        delivered: std::sync::Mutex::new(Vec::new()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ready = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let go = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let probes = PROBES.min(clients - writers);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let role = if i < writers {
                Role::Writer
            } else if i < writers + probes {
                Role::Probe
            } else {
                Role::Listener
            };
            runtime.spawn(client(
                urls[i % urls.len()].clone(),
                i,
                role,
                shared.clone(),
                ready.clone(),
                go.clone(),
            ))
        })
        .collect();
    runtime.block_on(ready.wait());
    // Idle: every client connected, nobody writes until `go`.
    std::thread::sleep(Duration::from_millis(500));
    let (_, rss_idle) = usage()?;
    let per_idle_session = rss_idle.saturating_sub(rss_empty) as f64 / clients as f64;
    let from = shared.micros() + WARMUP.as_micros() as i64;
    *shared.window.lock().unwrap_or_else(|p| p.into_inner()) =
        (from, from + MEASURE.as_micros() as i64);
    runtime.block_on(go.wait());
    std::thread::sleep(WARMUP);
    let (cpu0, _) = usage()?;
    let (gen0, _) = usage_of("self")?;
    let start = Instant::now();
    std::thread::sleep(MEASURE);
    let (cpu1, _) = usage()?;
    let (gen1, _) = usage_of("self")?;
    let wall = start.elapsed().as_secs_f64();
    // Writers go on through the grace period, so the window's last edits
    // are not the last frames (a relay that batches is not favoured).
    std::thread::sleep(GRACE);
    shared.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        let _ = runtime.block_on(t);
    }
    let scheduled =
        std::mem::take(&mut *shared.scheduled.lock().unwrap_or_else(|p| p.into_inner()));
    let delivered =
        std::mem::take(&mut *shared.delivered.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline =
        shared.window.lock().unwrap_or_else(|p| p.into_inner()).1 + GRACE.as_micros() as i64;
    let expected_edits: HashSet<(usize, i64)> = scheduled.into_iter().collect();
    let mut latencies = Vec::new();
    let mut seen = HashSet::new();
    for (probe, writer, sched, arrived) in delivered {
        if expected_edits.contains(&(writer, sched))
            && arrived <= deadline
            && seen.insert((probe, writer, sched))
        {
            latencies.push((arrived - sched).max(0) as u64);
        }
    }
    let expected = expected_edits.len() * probes;
    let lost = expected - latencies.len();
    latencies.extend(std::iter::repeat_n(u64::MAX, lost));
    latencies.sort_unstable();
    Ok(Measured {
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        expected,
        lost,
        cpu: (cpu1 - cpu0) / wall * 100.0,
        generator: (gen1 - gen0) / wall * 100.0,
        per_idle_session,
    })
}

pub(super) fn bench_fanout(report: &Report) -> Result<()> {
    // `SYNCLINE_FANOUT=1000/50` runs one configuration (for profiling).
    let only: Option<(usize, usize)> = std::env::var("SYNCLINE_FANOUT").ok().and_then(|v| {
        let (c, w) = v.split_once('/')?;
        Some((c.parse().ok()?, w.parse().ok()?))
    });
    let configs = match only {
        Some(one) => vec![one],
        None => vec![(10usize, 2usize), (100, 10), (1_000, 50)],
    };
    for (clients, writers) in configs {
        let ours = measure(Target::Syncline, clients, writers)?;
        let floor = measure(Target::Reference, clients, writers)?;
        let ratio = ours.p99 / floor.p99;
        report.emit(
            "fanout",
            &[
                ("clients / writers", format!("{clients} / {writers} (6 edits/s each, on a schedule)")),
                (
                    "deliveries expected at probes",
                    format!("{} (lost: Syncline {}, reference {})", ours.expected, ours.lost, floor.lost),
                ),
                ("Syncline p50 / p99", format!("{:.2} / {:.2} ms", ours.p50, ours.p99)),
                ("reference p50 / p99", format!("{:.2} / {:.2} ms", floor.p50, floor.p99)),
                ("p99 ratio to the reference", format!("{ratio:.1} x")),
                ("server CPU (Syncline / reference)", format!("{:.0} / {:.0} % of one core", ours.cpu, floor.cpu)),
                ("load generator CPU", format!("{:.0} % of one core", ours.generator)),
                (
                    "server memory per idle session",
                    format!("{:.1} KiB (reference {:.1} KiB)", ours.per_idle_session / 1024.0, floor.per_idle_session / 1024.0),
                ),
            ],
            json!({"clients": clients, "writers": writers, "expected": ours.expected,
                   "lost": ours.lost, "reference_lost": floor.lost,
                   "p50_ms": ours.p50, "p99_ms": ours.p99,
                   "reference_p50_ms": floor.p50, "reference_p99_ms": floor.p99, "p99_ratio": ratio,
                   "server_cpu_pct": ours.cpu, "reference_cpu_pct": floor.cpu,
                   "generator_cpu_pct": ours.generator, "bytes_per_idle_session": ours.per_idle_session,
                   "reference_bytes_per_idle_session": floor.per_idle_session}),
        );
    }
    Ok(())
}

/// `fanout-fleet`: [`bench_fanout`]'s measurement at 100 clients / 10
/// writers and 1,000 / 50 (`SYNCLINE_FANOUT=C/W` for one other) with the
/// relays on
/// PostgreSQL: one relay, then three sharing one database with NATS
/// fan-out, every client, writer and probe on relay `i % 3` (so two of
/// three deliveries cross relays: commit, notice, catch-up read). Both in
/// the same run, on the same servers.
pub(super) fn bench_fanout_fleet(args: &crate::Args, report: &Report) -> Result<()> {
    let postgres = crate::durable_pg::server_url(args, "fanout-fleet")?;
    let nats = args
        .nats
        .clone()
        .or_else(|| std::env::var("SYNCLINE_TEST_NATS").ok())
        .context(
            "fanout-fleet needs a NATS server: --nats URL (eval \"$(bash scripts/services.sh start DIR)\" sets SYNCLINE_TEST_NATS)",
        )?;
    let only: Option<(usize, usize)> = std::env::var("SYNCLINE_FANOUT").ok().and_then(|v| {
        let (c, w) = v.split_once('/')?;
        Some((c.parse().ok()?, w.parse().ok()?))
    });
    let configs = match only {
        Some(one) => vec![one],
        None => vec![(100usize, 10usize), (1_000, 50)],
    };
    for (clients, writers) in configs {
        fleet_round(&postgres, &nats, clients, writers, report)?;
    }
    Ok(())
}

/// One configuration of [`bench_fanout_fleet`].
fn fleet_round(
    postgres: &str,
    nats: &str,
    clients: usize,
    writers: usize,
    report: &Report,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let one = {
        let backing = Backing {
            postgres: Some(crate::durable_pg::fresh(postgres, "fanout_one")?),
            ..Backing::default()
        };
        let relay = ServerProcess::start_on(Target::Syncline, &dir.path().join("one"), &backing)?;
        measure_on(Target::Syncline, &[relay], clients, writers)?
    };
    let fleet = {
        let backing = Backing {
            postgres: Some(crate::durable_pg::fresh(postgres, "fanout_fleet")?),
            nats: Some(nats.to_owned()),
            nats_prefix: Some(format!("bench{}", std::process::id())),
        };
        let relays = (0..3)
            .map(|i| {
                ServerProcess::start_on(
                    Target::Syncline,
                    &dir.path().join(format!("fleet{i}")),
                    &backing,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        measure_on(Target::Syncline, &relays, clients, writers)?
    };
    report.emit(
        "fanout-fleet",
        &[
            (
                "clients / writers",
                format!("{clients} / {writers} (6 edits/s each, on a schedule)"),
            ),
            (
                "deliveries expected at probes",
                format!(
                    "{} (lost: one relay {}, three relays {})",
                    one.expected, one.lost, fleet.lost
                ),
            ),
            (
                "one relay on PostgreSQL p50 / p99",
                format!("{:.2} / {:.2} ms", one.p50, one.p99),
            ),
            (
                "three relays (PostgreSQL + NATS) p50 / p99",
                format!("{:.2} / {:.2} ms", fleet.p50, fleet.p99),
            ),
            (
                "p99 ratio, three relays to one",
                format!("{:.2} x", fleet.p99 / one.p99),
            ),
            (
                "relays' CPU (one / three, summed)",
                format!("{:.0} / {:.0} % of one core", one.cpu, fleet.cpu),
            ),
            (
                "load generator CPU",
                format!(
                    "{:.0} / {:.0} % of one core",
                    one.generator, fleet.generator
                ),
            ),
        ],
        json!({"clients": clients, "writers": writers, "expected": one.expected,
               "one_lost": one.lost, "fleet_lost": fleet.lost,
               "one_p50_ms": one.p50, "one_p99_ms": one.p99,
               "fleet_p50_ms": fleet.p50, "fleet_p99_ms": fleet.p99,
               "p99_ratio": fleet.p99 / one.p99,
               "one_cpu_pct": one.cpu, "fleet_cpu_pct": fleet.cpu}),
    );
    Ok(())
}
