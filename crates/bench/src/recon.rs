//! `recon`: what finding the difference costs, per strategy, at n = 10^6
//! nodes per side and d differing nodes (half on each side): bytes on the
//! wire for the difference itself (packs are the same for every strategy),
//! round trips, and CPU per side.
//!
//! - `diff/ibf@1` and `diff/mst@1` work on node ids, which are uniform
//!   hashes: where in history the difference sits does not change them, so
//!   they run on random keys.
//! - `diff/heads@1` works on the history's shape (version vectors), so it
//!   runs on a synthetic DAG, with the difference clustered at the end or
//!   spread through history (concurrent nodes on old parents).

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use syncline_core::dag::{Dag, NodeIdx, VersionVector};
use syncline_core::node::NodeFormat;
use syncline_core::proto::message::{Envelope, Limits, Message, PROTOCOL_VERSION};
use syncline_core::proto::session::{CAP_DIFF_HEADS, CAP_DIFF_IBF, CAP_DIFF_MST};
use syncline_core::recon::mst::{self, Mst, Reconciler};
use syncline_core::recon::riblt::{CodedSymbol, Decoder, Key, Sketch};
use syncline_core::{AuthorId, EntryId, Hlc, Node, NodeId, Op, Value, VerifiedNode};

use super::{Report, ms};
use crate::trace::room_id;

const N: u64 = 1_000_000;
const DIFFS: [usize; 5] = [1, 10, 100, 1_000, 10_000];

pub(super) fn bench_recon(report: &Report) -> Result<()> {
    bench_ibf(report)?;
    bench_mst(report)?;
    bench_heads(report)
}

/// Wire size of one message in its envelope.
fn wire(message: Message) -> usize {
    Envelope {
        version: PROTOCOL_VERSION,
        session: 1,
        corr: 1,
        message,
    }
    .encode()
    .len()
}

/// A deterministic stream of distinct 16-byte keys (node-id prefixes are
/// uniform, so where a difference sits in history does not matter to RIBLT).
fn recon_key(i: u64) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&blake3::hash(&i.to_le_bytes()).as_bytes()[..16]);
    k
}

/// One RIBLT reconciliation as the protocol runs it: the server streams its
/// maintained sketch's symbols in chunks of about d_est / 8 until the client
/// reports the difference decoded (one streamed exchange: the symbols ride
/// on `welcome` and what follows, `ibf-done` stops them). Returns (symbols
/// sent, client decode time).
fn riblt_round(server: &Sketch, client: &Sketch, d_est: usize) -> Result<(usize, Duration)> {
    let mut decoder = Decoder::new();
    let chunk = (d_est / 8).max(2);
    let mut sent = 0usize;
    let start = Instant::now();
    while !decoder.is_decoded() {
        let end = (sent + chunk).min(server.capacity());
        anyhow::ensure!(end > sent, "difference beyond the sketch's capacity");
        decoder.add_symbols(server.symbols(sent..end), client)?;
        sent = end;
    }
    Ok((sent, start.elapsed()))
}

fn bench_ibf(report: &Report) -> Result<()> {
    const CAPACITY: usize = 1 << 16;
    for n in [100_000u64, 1_000_000] {
        let mut base = Sketch::new(CAPACITY);
        let start = Instant::now();
        for i in 0..n {
            base.add(&recon_key(i));
        }
        let maintain = start.elapsed().as_secs_f64() * 1e9 / n as f64;
        for d in [1usize, 10, 100, 1_000, 10_000] {
            // Mean over independent differences: small ones vary a lot.
            let trials = (2_000 / d).clamp(3, 30);
            let (mut symbols, mut decode) = (0usize, Duration::ZERO);
            for t in 0..trials as u64 {
                // Half the difference on each side.
                let (mut server, mut client) = (base.clone(), base.clone());
                for j in 0..d as u64 {
                    let key = recon_key(n + t * d as u64 + j);
                    if j % 2 == 0 {
                        server.add(&key)
                    } else {
                        client.add(&key)
                    }
                }
                let (s, took) = riblt_round(&server, &client, d)?;
                symbols += s;
                decode += took;
            }
            let symbols = symbols as f64 / trials as f64;
            let decode = decode / trials as u32;
            let bytes = symbols * CodedSymbol::WIRE_BYTES as f64;
            let ratio = bytes / (d as f64 * 32.0);
            report.emit(
                "recon",
                &[
                    ("strategy", "diff/ibf@1 (RIBLT)".into()),
                    ("n per side / d", format!("{n} / {d}")),
                    ("mean symbols (per difference)", format!("{symbols:.1} ({:.2})", symbols / d as f64)),
                    ("trials", trials.to_string()),
                    ("bytes / (d x 32 B)", format!("{ratio:.2}")),
                    ("round trips", "1 (streamed until ibf-done)".into()),
                    ("client decode", format!("{:.3} ms", ms(decode))),
                    ("sketch upkeep per node", format!("{maintain:.0} ns")),
                ],
                json!({"strategy": "ibf", "n": n, "d": d, "symbols": symbols, "bytes": bytes, "ratio": ratio, "round_trips": 1, "decode_ms": ms(decode), "maintain_ns_per_node": maintain}),
            );
        }
    }
    Ok(())
}

/// A deterministic stream of distinct 32-byte keys (node ids).
fn mst_key(i: u64) -> mst::Key {
    *blake3::hash(&i.to_le_bytes()).as_bytes()
}

/// What one MST reconciliation cost.
struct MstRun {
    bytes_up: usize,
    bytes_down: usize,
    round_trips: usize,
    client: Duration,
    server: Duration,
    found: usize,
}

/// Runs the client's range refinement against the server's tree as the
/// session does: `mst-request` / `mst-summary` until nothing differs, then
/// `mst-done` with the ids the client lacks.
fn mst_round(server: &Mst, client: &Mst) -> Result<MstRun> {
    let (mut reconciler, mut ranges) = Reconciler::new();
    let mut run = MstRun {
        bytes_up: 0,
        bytes_down: 0,
        round_trips: 0,
        client: Duration::ZERO,
        server: Duration::ZERO,
        found: 0,
    };
    while !reconciler.is_done() {
        run.bytes_up += wire(Message::MstRequest {
            ranges: ranges.clone(),
        });
        let start = Instant::now();
        let answers = mst::respond(server, &ranges);
        run.server += start.elapsed();
        run.bytes_down += wire(Message::MstSummary {
            answers: answers.clone(),
        });
        run.round_trips += 1;
        let start = Instant::now();
        ranges = reconciler.step(client, answers)?;
        run.client += start.elapsed();
    }
    let diff = reconciler.into_diff();
    run.found = diff.remote_only.len() + diff.local_only.len();
    run.bytes_up += wire(Message::MstDone {
        need: diff.remote_only.into_iter().map(NodeId).collect(),
    });
    Ok(run)
}

fn bench_mst(report: &Report) -> Result<()> {
    let mut base = Mst::new();
    for i in 0..N {
        base.insert(mst_key(i));
    }
    for d in DIFFS {
        let (mut server, mut client) = (base.clone(), base.clone());
        for j in 0..d as u64 {
            let key = mst_key(N + j);
            if j % 2 == 0 {
                server.insert(key);
            } else {
                client.insert(key);
            }
        }
        let run = mst_round(&server, &client)?;
        anyhow::ensure!(run.found == d, "the MST found {} of {d}", run.found);
        let bytes = run.bytes_up + run.bytes_down;
        let ratio = bytes as f64 / (d as f64 * 32.0);
        report.emit(
            "recon",
            &[
                ("strategy", "diff/mst@1 (Merkle Search Tree)".into()),
                ("n per side / d", format!("{N} / {d}")),
                ("bytes up / down", format!("{} / {}", run.bytes_up, run.bytes_down)),
                ("bytes / (d x 32 B)", format!("{ratio:.2}")),
                ("round trips", run.round_trips.to_string()),
                ("cpu client / server", format!("{:.3} / {:.3} ms", ms(run.client), ms(run.server))),
            ],
            json!({"strategy": "mst", "n": N, "d": d, "bytes_up": run.bytes_up, "bytes_down": run.bytes_down,
                   "ratio": ratio, "round_trips": run.round_trips, "client_ms": ms(run.client), "server_ms": ms(run.server)}),
        );
    }
    Ok(())
}

/// A synthetic author: its id only (nodes are not signed here; the DAG
/// checks structure, and signatures are the pack's business).
fn author(i: usize) -> AuthorId {
    AuthorId(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
}

/// Appends a node by `author` citing the author's previous node and
/// `other` (if any), with one small operation.
fn append(dag: &mut Dag, author: AuthorId, other: Option<NodeIdx>) -> Result<()> {
    let seq = dag.author_seq(&author) + 1;
    let mut parents: Vec<NodeIdx> = other.into_iter().collect();
    parents.extend(dag.by_author_seq(&author, seq - 1));
    let lamport = dag.next_lamport(&parents);
    let mut cited: Vec<(NodeId, (AuthorId, u64))> = parents
        .iter()
        .map(|&p| (dag.id(p), (*dag.author(p), dag.seq(p))))
        .collect();
    cited.sort_unstable();
    cited.dedup();
    let wall_ms = 1_700_000_000_000
        + parents
            .iter()
            .map(|&p| dag.hlc(p).wall_ms)
            .max()
            .unwrap_or(0)
            % 1_000_000
        + 1;
    let node = Node {
        format: NodeFormat::V2,
        room: room_id(),
        author,
        seq,
        parents: cited.iter().map(|(id, _)| *id).collect(),
        lamport,
        hlc: Hlc {
            wall_ms,
            counter: 0,
        },
        ops: vec![Op::Set {
            entry: EntryId::ROOT,
            field: "v".into(),
            value: Value::Int(seq as i64),
        }],
    };
    let id = Node::id_of(&node.encode());
    dag.insert(VerifiedNode {
        id,
        node,
        sig: None,
        parent_keys: cited.iter().map(|(_, key)| *key).collect(),
    })?;
    Ok(())
}

/// The baseline's messages: `hello` with the client's heads and version
/// vector, `welcome` with the server's.
fn heads_messages(client: &Dag, server: &Dag) -> (usize, usize) {
    let caps = vec![
        CAP_DIFF_HEADS.to_owned(),
        CAP_DIFF_IBF.to_owned(),
        CAP_DIFF_MST.to_owned(),
    ];
    let hello = wire(Message::Hello {
        versions: (PROTOCOL_VERSION, PROTOCOL_VERSION),
        peer: author(usize::MAX),
        room: room_id(),
        token: None,
        caps: caps.clone(),
        heads: client.heads(),
        vv: client.version_vector(),
        nodes: client.len() as u64,
        state_hash: [0; 32],
        subscriptions: Vec::new(),
    });
    let welcome = wire(Message::Welcome {
        version: PROTOCOL_VERSION,
        caps,
        heads: server.heads(),
        vv: Some(server.version_vector()),
        nodes: server.len() as u64,
        diff: CAP_DIFF_HEADS.to_owned(),
        limits: Limits {
            max_frame: 4 << 20,
            max_pack_nodes: 50_000,
        },
        peers: Vec::new(),
    });
    (hello, welcome)
}

fn bench_heads(report: &Report) -> Result<()> {
    for authors in [100usize, 10_000] {
        // A shared history: authors take turns, each node also citing the
        // one before it.
        let mut base = Dag::new(room_id());
        for i in 0..N as usize - DIFFS[DIFFS.len() - 1] {
            let prev = base.next_idx().checked_sub(1);
            append(&mut base, author(i % authors), prev)?;
        }
        for d in DIFFS {
            for spread in [false, true] {
                let (mut server, mut client) = (base.clone(), base.clone());
                let len = base.next_idx();
                // Half the difference on each side, by disjoint authors;
                // clustered: each new node cites the side's newest,
                // spread: a random old node (a device that was offline).
                for j in 0..d {
                    let (dag, a) = if j % 2 == 0 {
                        (&mut server, (j / 2) % (authors / 2))
                    } else {
                        (&mut client, authors / 2 + (j / 2) % (authors / 2))
                    };
                    let other = if spread {
                        let h = blake3::hash(&(j as u64).to_le_bytes());
                        u32::from_le_bytes(h.as_bytes()[..4].try_into()?) % len
                    } else {
                        dag.next_idx() - 1
                    };
                    append(dag, author(a), Some(other))?;
                }
                let start = Instant::now();
                let client_vv: VersionVector = client.version_vector();
                let _heads = client.heads();
                let mut client_cpu = start.elapsed();
                let start = Instant::now();
                let server_vv = server.version_vector();
                let _heads = server.heads();
                let to_client = server.missing_for_version_vector(&client_vv);
                let server_cpu = start.elapsed();
                let start = Instant::now();
                let to_server = client.missing_for_version_vector(&server_vv);
                client_cpu += start.elapsed();
                anyhow::ensure!(
                    to_client.len() + to_server.len() == d,
                    "the baseline found {} of {d}",
                    to_client.len() + to_server.len()
                );
                let (up, down) = heads_messages(&client, &server);
                let ratio = (up + down) as f64 / (d as f64 * 32.0);
                let placement = if spread {
                    "spread"
                } else {
                    "clustered at the end"
                };
                report.emit(
                    "recon",
                    &[
                        ("strategy", "diff/heads@1 (version vectors)".into()),
                        ("n per side / d / authors", format!("{N} / {d} / {authors}")),
                        ("difference", placement.into()),
                        ("bytes up / down", format!("{up} / {down}")),
                        ("bytes / (d x 32 B)", format!("{ratio:.2}")),
                        ("round trips", "1".into()),
                        ("cpu client / server", format!("{:.3} / {:.3} ms", ms(client_cpu), ms(server_cpu))),
                    ],
                    json!({"strategy": "heads", "n": N, "d": d, "authors": authors, "spread": spread,
                           "bytes_up": up, "bytes_down": down, "ratio": ratio, "round_trips": 1,
                           "client_ms": ms(client_cpu), "server_ms": ms(server_cpu)}),
                );
            }
        }
    }
    Ok(())
}
