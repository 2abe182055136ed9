//! Syncline's benchmarks (DESIGN.md section 10): each prints a table, or one
//! JSON object per result with `--json`, and where there is a reference it
//! is measured in the same run and reported as a ratio.
//!
//! ```text
//! cargo run --release -p syncline-bench -- trace
//! cargo run --release -p syncline-bench -- import
//! cargo run --release -p syncline-bench -- durable
//! cargo run --release -p syncline-bench -- blobs
//! cargo run --release -p syncline-bench -- all --json
//! ```

// Printing results is this binary's job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, ValueEnum};
use serde_json::json;
use syncline_core::auth::Access;
use syncline_core::proto::session::{
    Config as SessionConfig, Credentials, Event as SessionEvent, Session, Strategy,
};
use syncline_core::{Keypair, Room};
use syncline_store::{Batch, DurableRoom, Segment, SqliteOptions, SqliteStore, Store, conformance};

mod blobs;
mod catchup;
mod challenge;
mod durable_pg;
mod fanout;
mod recon;
mod trace;

/// Every allocation goes through this counter, so a benchmark can report
/// the live heap a structure holds (`live_heap`), not the process's RSS.
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// Runs `f` and returns, with its result, how many heap bytes the result
/// holds: live bytes after minus before (what `f` freed does not count).
fn live_heap<T>(f: impl FnOnce() -> Result<T>) -> Result<(usize, T)> {
    let before = ALLOCATOR.allocated();
    let value = f()?;
    Ok((ALLOCATOR.allocated().saturating_sub(before), value))
}

#[derive(Parser, Debug)]
#[command(about = "Syncline benchmarks")]
struct Args {
    /// Which benchmark to run.
    bench: Bench,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// The automerge-paper trace (gzipped JSON).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/automerge-paper.json.gz"))]
    trace: PathBuf,
    /// Repetitions of timed sections (the best is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A PostgreSQL server for `durable-postgres` and `fanout-fleet`
    /// (postgres://user@host:port/db; a database per round is created
    /// there; default: `SYNCLINE_TEST_POSTGRES`, which
    /// `scripts/services.sh start` prints).
    #[arg(long)]
    postgres: Option<String>,
    /// A NATS server for `fanout-fleet` (default: `SYNCLINE_TEST_NATS`).
    #[arg(long)]
    nats: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Bench {
    /// Apply the automerge-paper trace as local transactions.
    Trace,
    /// A fresh durable replica imports the trace history from a pack.
    Import,
    /// Durable commits per second against raw SQLite at several batch sizes.
    Durable,
    /// Difference cost per strategy (heads, RIBLT, MST) at n = 10^6 per side.
    Recon,
    /// Sessions catching a replica up on a split of the trace history.
    Catchup,
    /// One room, many WebSocket clients, some writing: latency, CPU, memory.
    Fanout,
    /// Durable commits to PostgreSQL against raw inserts of the same bytes.
    DurablePostgres,
    /// `fanout` at 1,000 clients on one relay on PostgreSQL, then spread
    /// over three relays sharing that database (NATS fan-out).
    FanoutFleet,
    /// Blob transfer: throughput of both paths against plain HTTP, memory
    /// while 1 GiB moves, edit latency during a large download.
    Blobs,
    /// Every benchmark above.
    All,
}

/// Prints results as a table or as JSON lines.
struct Report {
    json: bool,
}

impl Report {
    fn emit(&self, bench: &str, rows: &[(&str, String)], value: serde_json::Value) {
        if self.json {
            let mut v = value;
            v["bench"] = json!(bench);
            println!("{v}");
        } else {
            println!("{bench}");
            for (k, v) in rows {
                println!("  {k:<34} {v}");
            }
        }
    }
}

/// Runs `f` `runs` times and keeps the fastest; `f` times its own section
/// (so set-up such as temporary directories stays out of the figure).
fn best<T>(runs: usize, mut f: impl FnMut() -> Result<(Duration, T)>) -> Result<(Duration, T)> {
    let mut out: Option<(Duration, T)> = None;
    for _ in 0..runs.max(1) {
        let (d, v) = f()?;
        if out.as_ref().is_none_or(|(b, _)| d < *b) {
            out = Some((d, v));
        }
    }
    Ok(out.expect("at least one run"))
}

/// Times `f` as a whole.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let start = Instant::now();
    let v = f()?;
    Ok((start.elapsed(), v))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bench_import(args: &Args, report: &Report) -> Result<()> {
    let (patches, _) = trace::load(&args.trace)?;
    let key = Keypair::from_seed([7; 32]);
    let mut room = trace::replay(&patches, &key)?;
    let nodes = room.dag().causal_order();
    let pack = room.pack(&nodes, Some(&key))?;
    let expected = room.state_hash();
    let (took, ()) = best(args.runs, || {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
            &dir.path().join("replica.db"),
            SqliteOptions::default(),
        )?);
        let mut fresh = DurableRoom::load(store, Keypair::from_seed([8; 32]), &trace::room_id())?;
        let (took, got) = timed(|| Ok(fresh.receive_pack(&pack)?))?;
        anyhow::ensure!(
            got.accepted.len() == nodes.len(),
            "not every node was accepted"
        );
        anyhow::ensure!(
            fresh.room().state_hash() == expected,
            "imported state differs"
        );
        Ok((took, ()))
    })?;
    let rate = nodes.len() as f64 / took.as_secs_f64();
    report.emit(
        "import",
        &[
            ("nodes", nodes.len().to_string()),
            ("pack", format!("{} bytes", pack.len())),
            ("decode+verify+store+materialize", format!("{:.1} ms", ms(took))),
            ("rate", format!("{:.0} nodes/s", rate)),
            ("target", "200000 nodes/s".into()),
        ],
        json!({"nodes": nodes.len(), "pack_bytes": pack.len(), "import_ms": ms(took), "nodes_per_s": rate}),
    );
    Ok(())
}

/// `commits` segments of `batch` nodes each, continuing one history, built
/// before any timing starts (real packs of small nodes).
fn segments(batch: usize, commits: usize) -> Vec<Segment> {
    let room = trace::room_id();
    (0..commits)
        .map(|c| conformance::test_segment(&room, 1, (c * batch) as u32, batch as u32))
        .collect()
}

/// Durable nodes/s of `commits` commits of `batch` nodes through the store
/// (merging in the background, as it ships).
fn durable_store_round(batch: usize, commits: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("store.db"), SqliteOptions::default())?;
    commit_segments(&store, batch, commits)
}

/// Durable nodes/s of `commits` commits of `batch` nodes each, one
/// segment per commit, through `store`.
fn commit_segments(store: &dyn Store, batch: usize, commits: usize) -> Result<f64> {
    let room = trace::room_id();
    let segments = segments(batch, commits);
    let start = Instant::now();
    for segment in segments {
        store.commit(
            &room,
            Batch {
                segments: vec![segment],
                ..Batch::default()
            },
        )?;
    }
    Ok((commits * batch) as f64 / start.elapsed().as_secs_f64())
}

/// The same segments inserted with plain rusqlite, same journal and sync
/// settings: one row per commit in a rowid table with no index, the
/// cheapest durable insert.
fn durable_raw_round(batch: usize, commits: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let conn = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch("CREATE TABLE segments (start INTEGER NOT NULL, pack BLOB NOT NULL)")?;
    let segments = segments(batch, commits);
    let start = Instant::now();
    for segment in segments {
        let tx = conn.unchecked_transaction()?;
        tx.prepare_cached("INSERT INTO segments (start, pack) VALUES (?1, ?2)")?
            .execute(rusqlite::params![segment.start, &segment.pack[..]])?;
        tx.commit()?;
    }
    Ok((commits * batch) as f64 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_durable(args: &Args, report: &Report) -> Result<()> {
    durable_series(
        args,
        report,
        (
            "durable",
            "syncline durable nodes/s",
            "raw rusqlite nodes/s",
        ),
        durable_store_round,
        durable_raw_round,
    )
}

/// Durable nodes/s through the store (`ours`) and through the raw
/// reference at batch sizes 1 to 1,000, rounds alternating so drift in the
/// disk's fsync latency hits both alike; reports medians and the median
/// ratio under `labels` (benchmark, ours, reference).
fn durable_series(
    args: &Args,
    report: &Report,
    labels: (&str, &str, &str),
    ours: impl Fn(usize, usize) -> Result<f64>,
    raw: impl Fn(usize, usize) -> Result<f64>,
) -> Result<()> {
    let (bench, ours_label, raw_label) = labels;
    for batch in [1usize, 10, 100, 1000] {
        let commits = (20_000 / batch).clamp(100, 400);
        let (mut o_runs, mut r_runs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs.max(3) {
            let o = ours(batch, commits)?;
            let r = raw(batch, commits)?;
            o_runs.push(o);
            r_runs.push(r);
            ratios.push(o / r);
        }
        let (o, r, ratio) = (median(o_runs), median(r_runs), median(ratios));
        report.emit(
            bench,
            &[
                ("batch size", batch.to_string()),
                (ours_label, format!("{o:.0}")),
                (raw_label, format!("{r:.0}")),
                ("ratio, median (target >= 0.8)", format!("{ratio:.2}")),
            ],
            json!({"batch": batch, "commits": commits, "syncline_nodes_per_s": o, "raw_nodes_per_s": r, "ratio": ratio}),
        );
    }
    Ok(())
}

/// What one session run between two replicas cost.
struct SessionRun {
    bytes_up: usize,
    bytes_down: usize,
    /// `hello` and `welcome`.
    handshake_bytes: usize,
    /// The difference's own messages (`ibf-*`, `mst-*`).
    diff_bytes: usize,
    /// Client flights (frames sent before the next reply) that carried the
    /// handshake or the difference: the round trips to find the difference.
    diff_trips: usize,
    /// Flights either way until both sides were quiet.
    round_trips: usize,
    strategy: Option<&'static str>,
    took: Duration,
}

/// Counts a frame in the handshake (`hello`, `welcome`) or the difference
/// (`ibf-*`, `mst-*`) bytes; returns whether it is one the client sends to
/// find the difference.
fn tally(run: &mut SessionRun, frame: &[u8]) -> Result<bool> {
    use syncline_core::proto::message::{Envelope, Message};
    let message = Envelope::decode(frame)?.message;
    let kind = message.type_code();
    match message {
        // A hello's RIBLT probe is there for the difference: its bytes
        // (with the field's name and length) count there.
        Message::Hello { probe, .. } if !probe.is_empty() => {
            let field = "probe".len() + 3 + probe.len();
            run.diff_bytes += field;
            run.handshake_bytes += frame.len() - field;
        }
        _ => match kind {
            1 | 2 => run.handshake_bytes += frame.len(),
            7..=12 => run.diff_bytes += frame.len(),
            _ => {}
        },
    }
    Ok(matches!(kind, 1 | 7..=12))
}

/// Runs a client and a server session over an in-memory link until both are
/// quiet, acknowledging accepted nodes at once, firing due timers (queued
/// packs go out through them), then checks that both rooms converged. Each
/// loop is one flight each way: a round trip is counted each time frames
/// flow client→server and then back.
fn run_session(
    client: &mut Room,
    client_key: &Keypair,
    server: &mut Room,
    client_config: SessionConfig,
    server_config: SessionConfig,
) -> Result<SessionRun> {
    let start = Instant::now();
    let mut c = Session::client(
        0,
        1,
        client,
        client_key,
        client_config,
        &Credentials::default(),
    );
    let mut s = Session::server(0, 1, server.id().clone(), server_config, Access::full());
    let mut run = SessionRun {
        bytes_up: 0,
        bytes_down: 0,
        handshake_bytes: 0,
        diff_bytes: 0,
        diff_trips: 0,
        round_trips: 0,
        strategy: None,
        took: Duration::ZERO,
    };
    loop {
        // The client's timer first: what it queued last turn (an upload
        // after the welcome) goes out as packs now.
        while c.poll_timeout().is_some_and(|t| t == 0) {
            c.handle_timeout(0, client, Some(client_key));
        }
        let (mut went_up, mut finding) = (false, false);
        while let Some(f) = c.poll_transmit() {
            run.bytes_up += f.len();
            went_up = true;
            finding |= tally(&mut run, &f)?;
            s.handle_input(0, &f, server, None);
        }
        run.diff_trips += usize::from(finding);
        while let Some(e) = s.poll_event() {
            match e {
                SessionEvent::Accepted { corr, .. } => s.acknowledge(0, corr, server),
                SessionEvent::Closed {
                    reason, message, ..
                } => {
                    anyhow::bail!("server session closed: {} ({message})", reason.as_str())
                }
                _ => {}
            }
        }
        while s.poll_timeout().is_some_and(|t| t == 0) {
            s.handle_timeout(0, server, None);
        }
        let mut went_down = false;
        while let Some(f) = s.poll_transmit() {
            run.bytes_down += f.len();
            went_down = true;
            tally(&mut run, &f)?;
            c.handle_input(0, &f, client, Some(client_key));
        }
        while let Some(e) = c.poll_event() {
            match e {
                SessionEvent::Accepted { corr, .. } => c.acknowledge(0, corr, client),
                SessionEvent::Closed {
                    reason, message, ..
                } => {
                    anyhow::bail!("client session closed: {} ({message})", reason.as_str())
                }
                _ => {}
            }
        }
        run.round_trips += usize::from(went_up && went_down);
        let client_due = c.poll_timeout().is_some_and(|t| t == 0);
        if !went_up && !went_down && !client_due {
            break;
        }
        anyhow::ensure!(
            !c.is_closed() && !s.is_closed(),
            "a session closed during the exchange"
        );
    }
    run.strategy = c.strategy().map(Strategy::capability);
    run.took = start.elapsed();
    anyhow::ensure!(
        client.state_hash() == server.state_hash(),
        "the replicas did not converge"
    );
    Ok(run)
}

fn main() -> Result<()> {
    // `fanout` re-executes this binary as its relay processes.
    let raw: Vec<String> = std::env::args().collect();
    if let [_, cmd, data_flag, data, port_flag, port, backing @ ..] = raw.as_slice()
        && cmd == "fanout-server"
        && data_flag == "--data"
        && port_flag == "--port"
    {
        let backing = fanout::Backing::parse(backing)?;
        return fanout::serve(std::path::Path::new(data), port.parse()?, backing);
    }
    if let [_, cmd, port_flag, port] = raw.as_slice()
        && cmd == "fanout-reference"
        && port_flag == "--port"
    {
        return fanout::serve_reference(port.parse()?);
    }
    if let [_, cmd, file_flag, file, port_flag, port] = raw.as_slice()
        && cmd == "blobs-reference"
        && file_flag == "--file"
        && port_flag == "--port"
    {
        return blobs::serve_reference(std::path::Path::new(file), port.parse()?);
    }
    let args = Args::parse();
    let report = Report { json: args.json };
    match args.bench {
        Bench::Trace => trace::run(&args, &report),
        Bench::Import => bench_import(&args, &report),
        Bench::Durable => bench_durable(&args, &report),
        Bench::Recon => recon::bench_recon(&report),
        Bench::Fanout => fanout::bench_fanout(&report),
        Bench::Catchup => catchup::bench_catchup(&args, &report),
        Bench::Blobs => blobs::bench_blobs(&report),
        Bench::DurablePostgres => durable_pg::bench(&args, &report),
        Bench::FanoutFleet => fanout::bench_fanout_fleet(&args, &report),
        Bench::All => {
            trace::run(&args, &report)?;
            bench_import(&args, &report)?;
            bench_durable(&args, &report)?;
            recon::bench_recon(&report)?;
            catchup::bench_catchup(&args, &report)?;
            fanout::bench_fanout(&report)?;
            blobs::bench_blobs(&report)
        }
    }
}
