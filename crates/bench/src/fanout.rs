//! `fanout`: one room, N clients over real WebSockets on loopback, W of them
//! writing 6 edits/s; edit-to-remote latency (p50, p99), server CPU, and
//! server memory per idle session.
//!
//! The relay runs in a child process (this binary, re-executed with
//! `fanout-server`), so its CPU time and resident memory are its own. The
//! clients are tasks in this process speaking the real protocol with
//! in-memory rooms (the SDK's per-replica SQLite files and threads would
//! measure the client side, not the server). Each edit carries its send
//! time; a receiver's latency is its arrival minus that.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::proto::message::{Envelope, Message, PROTOCOL_VERSION};
use syncline_core::proto::session::{Config as SessionConfig, Event, Session};
use syncline_core::{Keypair, Op, Room, RoomId, Value};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::Report;

/// Edits per second per writer.
const RATE: f64 = 6.0;
const WARMUP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// Clients that verify, apply and time every relayed edit.
const PROBES: usize = 8;

/// Runs the relay for the benchmark (the child process's entry point).
pub(super) fn serve(data: &Path, port: u16) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let config = syncline_relay::Config {
            data_dir: data.to_path_buf(),
            listen: format!("127.0.0.1:{port}").parse()?,
            ..syncline_relay::Config::default()
        };
        let server = syncline_relay::Server::bind(config).await?;
        server.run(syncline_relay::shutdown_signal()).await?;
        Ok(())
    })
}

struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    fn start(data: &Path) -> Result<ServerProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(std::env::current_exe()?)
            .arg("fanout-server")
            .arg("--data")
            .arg(data)
            .arg("--port")
            .arg(port.to_string())
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
fn usage_of(pid: &str) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are
    // the 14th and 15th fields overall.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    // Clock ticks are 100 per second on Linux.
    Ok((ticks / 100.0, rss_kb * 1024))
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every client task shares.
struct Shared {
    epoch: Instant,
    measuring: AtomicBool,
    stop: AtomicBool,
    latencies: std::sync::Mutex<Vec<u64>>,
}

/// What a client does after its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Verifies and applies everything relayed, and records latencies.
    Probe,
    /// Writes 6 edits/s; acknowledges relayed packs without applying them.
    Writer,
    /// Acknowledges relayed packs without applying them.
    Listener,
}

/// One client. Every client does a real handshake and acknowledges every
/// pack, as the server expects; only probes decode and verify what is
/// relayed (on two cores, a thousand clients each verifying every edit
/// would measure the load generator, not the relay).
async fn client(
    url: String,
    index: usize,
    role: Role,
    shared: Arc<Shared>,
    ready: Arc<tokio::sync::Barrier>,
    go: Arc<tokio::sync::Barrier>,
) -> Result<()> {
    let writer = role == Role::Writer;
    let raw = Arc::new(AtomicBool::new(false));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await?;
    let (sink, mut stream) = ws.split();
    let sink = Arc::new(Mutex::new(sink));
    let key = Keypair::from_seed(*blake3::hash(&(index as u64).to_le_bytes()).as_bytes());
    let room = Arc::new(Mutex::new(Room::new(RoomId::new("fanout")?)));
    let now = || shared.epoch.elapsed().as_millis() as u64;
    let session = {
        let mut r = room.lock().await;
        Arc::new(Mutex::new(Session::client(
            now(),
            1,
            &mut r,
            &key,
            SessionConfig::default(),
        )))
    };
    async fn flush(
        session: &Mutex<Session>,
        sink: &Mutex<impl SinkExt<WsMessage> + Unpin>,
    ) -> Result<()> {
        let frames: Vec<Vec<u8>> = {
            let mut s = session.lock().await;
            std::iter::from_fn(|| s.poll_transmit()).collect()
        };
        let mut sink = sink.lock().await;
        for f in frames {
            sink.send(WsMessage::Binary(f.into()))
                .await
                .map_err(|_| anyhow::anyhow!("send failed"))?;
        }
        Ok(())
    }
    flush(&session, &sink).await?;
    // Read until connected and caught up.
    let mut connected = false;
    let reader = {
        let (session, room, sink, shared, raw) = (
            session.clone(),
            room.clone(),
            sink.clone(),
            shared.clone(),
            raw.clone(),
        );
        let key = key.clone();
        async move {
            while let Some(Ok(message)) = stream.next().await {
                let WsMessage::Binary(bytes) = message else {
                    continue;
                };
                let Ok(env) = Envelope::decode(&bytes) else {
                    continue;
                };
                if raw.load(Ordering::Relaxed) {
                    match env.message {
                        Message::Pack { .. } => {
                            let ack = Envelope {
                                version: PROTOCOL_VERSION,
                                session: env.session,
                                corr: env.corr,
                                message: Message::Ack { nodes: Vec::new() },
                            };
                            let mut sink = sink.lock().await;
                            if sink
                                .send(WsMessage::Binary(ack.encode().into()))
                                .await
                                .is_err()
                            {
                                break;
                            }
                            continue;
                        }
                        Message::Ack { .. } => {}
                        _ => continue,
                    }
                }
                let arrived = shared.epoch.elapsed().as_micros() as i64;
                let mut latencies = Vec::new();
                {
                    let mut r = room.lock().await;
                    let mut s = session.lock().await;
                    let first = r.dag().next_idx();
                    s.handle_envelope(
                        shared.epoch.elapsed().as_millis() as u64,
                        env,
                        &mut r,
                        Some(&key),
                    );
                    for idx in first..r.dag().next_idx() {
                        if let Some(Op::Set {
                            value: Value::Int(sent),
                            ..
                        }) = r.dag().ops(idx).first()
                        {
                            latencies.push((arrived - sent).max(0) as u64);
                        }
                    }
                    while let Some(event) = s.poll_event() {
                        if let Event::Accepted { corr, .. } = event {
                            s.acknowledge(shared.epoch.elapsed().as_millis() as u64, corr, &r);
                        }
                    }
                }
                if shared.measuring.load(Ordering::Relaxed) && !latencies.is_empty() {
                    shared
                        .latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(latencies);
                }
                if flush(&session, &sink).await.is_err() || shared.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    };
    let reader = tokio::spawn(reader);
    // Wait for the handshake before counting this client ready.
    while !connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
        connected = session.lock().await.is_settled();
    }
    raw.store(role != Role::Probe, Ordering::Relaxed);
    // Everyone connected (the idle memory is measured now), then go.
    ready.wait().await;
    go.wait().await;
    if writer {
        let period = Duration::from_secs_f64(1.0 / RATE);
        // Spread writers over the period.
        tokio::time::sleep(period.mul_f64((index % 97) as f64 / 97.0)).await;
        let mut tick = tokio::time::interval(period);
        let mut n = 0i64;
        while !shared.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let sent = shared.epoch.elapsed().as_micros() as i64;
            {
                let mut r = room.lock().await;
                let mut tx = r.begin(key.author(), 1_767_225_600_000 + sent as u64 / 1000);
                tx.set(&format!("/w{index}/{}", n % 8), "t", Value::Int(sent))?;
                let Some(c) = tx.commit()? else { continue };
                session
                    .lock()
                    .await
                    .send_nodes(now(), &mut r, &[c.idx], Some(&key));
            }
            flush(&session, &sink).await?;
            n += 1;
        }
    } else {
        while !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    reader.abort();
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
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
        let dir = tempfile::tempdir()?;
        let server = ServerProcess::start(dir.path())?;
        std::thread::sleep(Duration::from_millis(300));
        let (_, rss_empty) = server.usage()?;
        let url = format!("ws://127.0.0.1:{}/ws", server.port);
        let shared = Arc::new(Shared {
            epoch: Instant::now(),
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            latencies: std::sync::Mutex::new(Vec::new()),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let ready = Arc::new(tokio::sync::Barrier::new(clients + 1));
        let go = Arc::new(tokio::sync::Barrier::new(clients + 1));
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let role = if i < writers {
                    Role::Writer
                } else if i < writers + PROBES {
                    Role::Probe
                } else {
                    Role::Listener
                };
                runtime.spawn(client(
                    url.clone(),
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
        let (_, rss_idle) = server.usage()?;
        let per_session = rss_idle.saturating_sub(rss_empty) as f64 / clients as f64;
        runtime.block_on(go.wait());
        std::thread::sleep(WARMUP);
        shared.measuring.store(true, Ordering::SeqCst);
        let (cpu0, _) = server.usage()?;
        let (gen0, _) = usage_of("self")?;
        let start = Instant::now();
        std::thread::sleep(MEASURE);
        let (cpu1, _) = server.usage()?;
        let (gen1, _) = usage_of("self")?;
        let wall = start.elapsed().as_secs_f64();
        shared.measuring.store(false, Ordering::SeqCst);
        shared.stop.store(true, Ordering::SeqCst);
        for t in tasks {
            let _ = runtime.block_on(t);
        }
        let mut lat =
            std::mem::take(&mut *shared.latencies.lock().unwrap_or_else(|p| p.into_inner()));
        lat.sort_unstable();
        let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
        let cpu = (cpu1 - cpu0) / wall * 100.0;
        let generator = (gen1 - gen0) / wall * 100.0;
        let probes = PROBES.min(clients - writers);
        let expected = (writers as f64 * RATE * wall * probes as f64) as usize;
        report.emit(
            "fanout",
            &[
                ("clients / writers", format!("{clients} / {writers} (6 edits/s each)")),
                ("deliveries timed (at probes)", format!("{} (of ~{expected} expected)", lat.len())),
                ("edit-to-remote p50 / p99", format!("{p50:.2} / {p99:.2} ms")),
                ("server CPU", format!("{cpu:.0} % of one core")),
                ("load generator CPU", format!("{generator:.0} % of one core")),
                ("server memory per idle session", format!("{:.1} KiB", per_session / 1024.0)),
            ],
            json!({"clients": clients, "writers": writers, "deliveries": lat.len(), "expected": expected,
                   "p50_ms": p50, "p99_ms": p99, "server_cpu_pct": cpu, "generator_cpu_pct": generator, "bytes_per_idle_session": per_session}),
        );
        drop(server);
    }
    Ok(())
}
