//! `blobs`: blob transfer through the relay, measured with the SDK and the
//! relay that ship (`syncline serve`'s relay in a child process, real
//! sessions, real direct URLs).
//!
//! - Throughput of a download of a 1 MiB and a 256 MiB blob from the relay
//!   into a fresh replica, over direct URLs and over the session, as a
//!   ratio to a plain HTTP download of the same file from the same machine
//!   in the same run: a bare HTTP/1.1 server in another child process
//!   streams the file from disk, and the faster of two clients (hyper in
//!   this process, and `curl` if installed) writes it to disk and syncs
//!   it, as the SDK's store does. Uploads are reported too.
//! - Peak memory while a 1 GiB blob moves (up over a direct URL, down
//!   over the session): the relay's peak resident set
//!   (VmHWM, over the whole run) and the SDK side's peak live heap
//!   (sampled every 2 ms).
//! - Sync latency of small edits while a 1 GiB blob downloads over the
//!   session on the same connection, from each edit's scheduled time to
//!   its arrival, against the same edits with no transfer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::rt::TokioIo;
use serde_json::json;
use syncline::{Replica, SyncOptions, Value};

use crate::fanout::{ServerProcess, Target, usage_of};
use crate::{ALLOCATOR, Report};

const MIB: u64 = 1 << 20;
const ROOM: &str = "files";
const WAIT: Duration = Duration::from_secs(600);

/// The plain HTTP server of the reference (the child process's entry
/// point): `GET /` streams `file` in 256 KiB reads.
pub(super) fn serve_reference(file: &Path, port: u16) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let file = file.to_path_buf();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let file = file.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| {
                    let file = file.clone();
                    async move {
                        let f = std::fs::File::open(&file)?;
                        let len = f.metadata()?.len();
                        // Plain reads of 256 KiB on the blocking pool.
                        let body = futures_util::stream::unfold(f, |mut f| async move {
                            let read = tokio::task::spawn_blocking(move || {
                                let mut buf = vec![0u8; 256 << 10];
                                let n = std::io::Read::read(&mut f, &mut buf);
                                (f, buf, n)
                            })
                            .await
                            .ok()?;
                            match read {
                                (_, _, Ok(0)) => None,
                                (f, mut buf, Ok(n)) => {
                                    buf.truncate(n);
                                    Some((Ok(Frame::data(Bytes::from(buf))), f))
                                }
                                (f, _, Err(e)) => Some((Err::<Frame<Bytes>, _>(e), f)),
                            }
                        });
                        let response = hyper::Response::builder()
                            .header(hyper::header::CONTENT_LENGTH, len)
                            .body(StreamBody::new(body))
                            .map_err(std::io::Error::other)?;
                        Ok::<_, std::io::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

/// The reference download: `GET /` from `port`, written to `out`.
fn plain_download(port: u16, out: &Path) -> Result<Duration> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let started = Instant::now();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::get("/")
            .header(hyper::header::HOST, "127.0.0.1")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        let mut file = std::fs::File::create(out)?;
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                file.write_all(&data)?;
            }
        }
        file.sync_all()?;
        Ok(started.elapsed())
    })
}

/// The same download by `curl` (if installed) into `out`, then the file
/// synced as the other downloads sync theirs.
fn curl_download(port: u16, out: &Path) -> Result<Option<Duration>> {
    let started = Instant::now();
    let Ok(status) = std::process::Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(out)
        .arg(format!("http://127.0.0.1:{port}/"))
        .status()
    else {
        return Ok(None);
    };
    anyhow::ensure!(status.success(), "curl failed: {status}");
    std::fs::File::open(out)?.sync_all()?;
    Ok(Some(started.elapsed()))
}

/// A file of `size` bytes that do not compress, written in 1 MiB steps.
fn make_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut chunk = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for b in chunk.chunks_mut(8) {
            // xorshift64: cheap bytes no compressor shrinks.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = left.min(MIB) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// A relay process and the bench's own replicas in one directory.
struct Bench {
    dir: tempfile::TempDir,
    relay: ServerProcess,
    url: String,
    next: AtomicUsize,
}

impl Bench {
    fn options(&self, direct: bool) -> SyncOptions {
        SyncOptions {
            blob_urls: direct,
            ..SyncOptions::new(&[self.url.as_str()])
        }
    }

    fn fresh_dir(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("replica-{n}"))
    }

    /// Puts `file` as a blob from a fresh replica and uploads it; returns
    /// its hash and how long the upload took (after the put).
    fn upload(&self, file: &Path, field: &str, direct: bool) -> Result<([u8; 32], Duration)> {
        let replica = Replica::open(self.fresh_dir())?;
        let blob = replica.room(ROOM)?.put_blob(
            "/bench",
            field,
            std::fs::File::open(file)?,
            "application/octet-stream",
        )?;
        let started = Instant::now();
        let sync = replica.connect_with(self.options(direct), &[ROOM])?;
        sync.flush(WAIT)?;
        anyhow::ensure!(sync.status().blobs_uploading == 0, "the upload did not end");
        Ok((blob.hash, started.elapsed()))
    }

    /// Fetches blob `hash` into a fresh replica (after it caught up with
    /// the room); how long the fetch took.
    fn download(&self, hash: &[u8; 32], direct: bool) -> Result<Duration> {
        let replica = Replica::open(self.fresh_dir())?;
        let sync = replica.connect_with(self.options(direct), &[ROOM])?;
        sync.flush(WAIT)?;
        let started = Instant::now();
        replica.room(ROOM)?.fetch_blob(hash, WAIT)?;
        Ok(started.elapsed())
    }
}

/// Samples the live heap every 2 ms until `stop`; the peak above `base`.
fn heap_sampler(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    let base = ALLOCATOR.allocated();
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(ALLOCATOR.allocated().saturating_sub(base));
            std::thread::sleep(Duration::from_millis(2));
        }
        peak
    })
}

/// The relay's peak resident set so far, from /proc.
fn peak_rss(pid: u32) -> Result<u64> {
    crate::fanout::status_bytes(&pid.to_string(), "VmHWM")
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64()
}

pub(super) fn bench_blobs(report: &Report) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let relay = ServerProcess::start(Target::Syncline, &dir.path().join("relay"))?;
    let url = format!("ws://127.0.0.1:{}/ws", relay.port);
    let bench = Bench {
        dir,
        relay,
        url,
        next: AtomicUsize::new(0),
    };
    for (size, label) in [(MIB, "1 MiB"), (256 * MIB, "256 MiB")] {
        throughput(&bench, report, size, label)?;
    }
    during_a_large_transfer(&bench, report)
}

/// Download throughput of a blob of `size` bytes, both paths, against a
/// plain HTTP download of the same file.
fn throughput(bench: &Bench, report: &Report, size: u64, label: &str) -> Result<()> {
    let file = bench.dir.path().join(format!("blob-{size}"));
    make_file(&file, size, size)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let reference = ReferenceServer::start(&file, port)?;
    // Uploads: once per path (a blob the relay holds is not sent again,
    // so each path uploads its own blob).
    let (hash_direct, up_direct) = bench.upload(&file, "direct", true)?;
    make_file(&file, size, 2 * size + 3)?;
    let (hash_session, up_session) = bench.upload(&file, "session", false)?;
    anyhow::ensure!(hash_direct != hash_session, "the two uploads are one blob");
    make_file(&file, size, size)?;
    // Downloads, the best of several each, alternating with the reference.
    let runs = if size > 64 * MIB { 2 } else { 5 };
    let (mut plain, mut direct, mut session) = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..runs {
        // The reference is the faster of two plain HTTP clients.
        let out = bench.dir.path().join("plain-download");
        plain = plain.min(plain_download(reference.port, &out)?);
        anyhow::ensure!(std::fs::metadata(&out)?.len() == size, "short download");
        std::fs::remove_file(&out)?;
        if let Some(took) = curl_download(reference.port, &out)? {
            plain = plain.min(took);
            anyhow::ensure!(
                std::fs::metadata(&out)?.len() == size,
                "short curl download"
            );
            std::fs::remove_file(&out)?;
        }
        direct = direct.min(bench.download(&hash_direct, true)?);
        session = session.min(bench.download(&hash_session, false)?);
    }
    drop(reference);
    std::fs::remove_file(&file)?;
    let ratio = |took: Duration| plain.as_secs_f64() / took.as_secs_f64();
    if report.json {
        println!(
            "{}",
            json!({
                "bench": "blobs", "size_bytes": size,
                "plain_http_ms": plain.as_secs_f64() * 1e3,
                "direct_download_ms": direct.as_secs_f64() * 1e3,
                "session_download_ms": session.as_secs_f64() * 1e3,
                "direct_ratio": ratio(direct), "session_ratio": ratio(session),
                "direct_upload_ms": up_direct.as_secs_f64() * 1e3,
                "session_upload_ms": up_session.as_secs_f64() * 1e3,
            })
        );
    } else {
        println!(
            "blobs: download of {label} (best of {runs}), as a ratio to plain HTTP (target >= 0.7)"
        );
        println!(
            "  plain HTTP       {:>9.1} ms  {:>7.0} MiB/s",
            plain.as_secs_f64() * 1e3,
            mb_per_s(size, plain)
        );
        for (name, took) in [("direct URL", direct), ("session", session)] {
            println!(
                "  {name:<16} {:>9.1} ms  {:>7.0} MiB/s  {:.2} x",
                took.as_secs_f64() * 1e3,
                mb_per_s(size, took),
                ratio(took)
            );
        }
        println!(
            "  uploads: direct URL {:.1} ms ({:.0} MiB/s), session {:.1} ms ({:.0} MiB/s)",
            up_direct.as_secs_f64() * 1e3,
            mb_per_s(size, up_direct),
            up_session.as_secs_f64() * 1e3,
            mb_per_s(size, up_session)
        );
    }
    Ok(())
}

/// The reference server's child process.
struct ReferenceServer {
    child: std::process::Child,
    port: u16,
}

impl ReferenceServer {
    fn start(file: &Path, port: u16) -> Result<ReferenceServer> {
        let child = std::process::Command::new(std::env::current_exe()?)
            .arg("blobs-reference")
            .arg("--file")
            .arg(file)
            .arg("--port")
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the reference server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(ReferenceServer { child, port })
    }
}

impl Drop for ReferenceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Edits written every `every` by `writer` while `busy` holds (at least
/// `min` of them), each timed from its scheduled time to its arrival at
/// `reader` (a thread waits on the reader's changes, so an arrival is
/// seen when it happens); latencies in ms, and how many never arrived
/// (within 10 s of the last send).
fn edit_latencies(
    writer: &Replica,
    reader: &Replica,
    every: Duration,
    min: usize,
    busy: &dyn Fn() -> bool,
) -> Result<(Vec<f64>, usize)> {
    let changes = reader.room(ROOM)?.changes();
    let room = writer.room(ROOM)?;
    let start = Instant::now();
    let sent = Arc::new(AtomicUsize::new(0));
    let sending = Arc::new(AtomicBool::new(true));
    let receiver = {
        let (sent, sending) = (sent.clone(), sending.clone());
        std::thread::spawn(move || {
            // Each edit is one node, and they arrive in order.
            let mut latencies = Vec::new();
            let mut deadline = None;
            loop {
                if let Ok(change) = changes.recv_timeout(Duration::from_millis(50)) {
                    let now = Instant::now();
                    for _ in 0..change.nodes {
                        let scheduled = start + every * latencies.len() as u32;
                        latencies
                            .push(now.saturating_duration_since(scheduled).as_secs_f64() * 1e3);
                    }
                }
                if latencies.len() >= sent.load(Ordering::SeqCst) && !sending.load(Ordering::SeqCst)
                {
                    break;
                }
                if !sending.load(Ordering::SeqCst) {
                    let end =
                        *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(10));
                    if Instant::now() >= end {
                        break;
                    }
                }
            }
            latencies
        })
    };
    let mut n = 0usize;
    while n < min || busy() {
        let scheduled = start + every * n as u32;
        if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        room.transact(|tx| tx.set("/edits", "n", Value::Int(n as i64)))?;
        n += 1;
        sent.store(n, Ordering::SeqCst);
    }
    sending.store(false, Ordering::SeqCst);
    let latencies = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?;
    let lost = n.saturating_sub(latencies.len());
    Ok((latencies, lost))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn p99(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// A 1 GiB blob: memory at both ends while it moves, and the latency of
/// small edits on the connection that downloads it over the session.
fn during_a_large_transfer(bench: &Bench, report: &Report) -> Result<()> {
    let size = 1024 * MIB;
    let file = bench.dir.path().join("blob-1g");
    make_file(&file, size, 7)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = heap_sampler(stop.clone());
    // Up over a direct URL: over the session a peer's bytes are held to
    // the relay's per-connection rate (32 MiB/s, bursts of 64 MiB).
    let (hash, uploaded) = bench.upload(&file, "large", true)?;
    std::fs::remove_file(&file)?;
    stop.store(true, Ordering::Relaxed);
    let upload_heap = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;

    // The writer and the reader of the edits, both synced.
    let writer = Replica::open(bench.fresh_dir())?;
    let writer_sync = writer.connect_with(bench.options(false), &[ROOM])?;
    let reader = Replica::open(bench.fresh_dir())?;
    let reader_sync = reader.connect_with(bench.options(false), &[ROOM])?;
    writer_sync.flush(WAIT)?;
    reader_sync.flush(WAIT)?;
    let every = Duration::from_millis(20);
    let (idle, idle_lost) = edit_latencies(&writer, &reader, every, 100, &|| false)?;

    // The reader fetches the blob over its session while edits go on.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = heap_sampler(stop.clone());
    let fetching = Arc::new(AtomicBool::new(true));
    let fetch = {
        let room = reader.room(ROOM)?;
        let fetching = fetching.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let fetched = room.fetch_blob(&hash, WAIT);
            fetching.store(false, Ordering::Relaxed);
            fetched.map(|()| started.elapsed())
        })
    };
    let (busy, busy_lost) = edit_latencies(&writer, &reader, every, 20, &|| {
        fetching.load(Ordering::Relaxed)
    })?;
    let fetched = fetch
        .join()
        .map_err(|_| anyhow::anyhow!("the fetch panicked"))??;
    stop.store(true, Ordering::Relaxed);
    let download_heap = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    drop((writer_sync, reader_sync));
    let relay_peak = peak_rss(bench.relay.child.id())?;
    let (_, relay_rss) = usage_of(&bench.relay.child.id().to_string())?;
    let ratio = median(&busy) / median(&idle);
    let p99_ratio = p99(&busy) / p99(&idle);
    if report.json {
        println!(
            "{}",
            json!({
                "bench": "blobs_large", "size_bytes": size,
                "direct_upload_ms": uploaded.as_secs_f64() * 1e3,
                "session_download_ms": fetched.as_secs_f64() * 1e3,
                "sdk_peak_heap_upload_bytes": upload_heap,
                "sdk_peak_heap_download_bytes": download_heap,
                "relay_peak_rss_bytes": relay_peak, "relay_rss_bytes": relay_rss,
                "edit_idle_p50_ms": median(&idle), "edit_idle_p99_ms": p99(&idle),
                "edit_busy_p50_ms": median(&busy), "edit_busy_p99_ms": p99(&busy),
                "edits_busy": busy.len() + busy_lost, "edits_lost": idle_lost + busy_lost,
                "p50_ratio": ratio, "p99_ratio": p99_ratio,
            })
        );
    } else {
        println!("blobs: a 1 GiB blob, up over a direct URL, down over the session");
        println!(
            "  upload {:.1} s ({:.0} MiB/s), download {:.1} s ({:.0} MiB/s)",
            uploaded.as_secs_f64(),
            mb_per_s(size, uploaded),
            fetched.as_secs_f64(),
            mb_per_s(size, fetched)
        );
        println!(
            "  peak memory (target < 64 MiB): SDK live heap {:.1} MiB uploading, {:.1} MiB downloading; relay peak RSS {:.1} MiB over the whole run (now {:.1} MiB)",
            upload_heap as f64 / MIB as f64,
            download_heap as f64 / MIB as f64,
            relay_peak as f64 / MIB as f64,
            relay_rss as f64 / MIB as f64
        );
        println!(
            "  edit latency, scheduled to arrival (target within 2 x idle): idle p50 {:.2} ms p99 {:.2} ms ({} edits); during the download p50 {:.2} ms p99 {:.2} ms ({} edits); {:.2} x at p50, {:.2} x at p99; lost {}",
            median(&idle),
            p99(&idle),
            idle.len(),
            median(&busy),
            p99(&busy),
            busy.len(),
            ratio,
            p99_ratio,
            idle_lost + busy_lost
        );
    }
    Ok(())
}
