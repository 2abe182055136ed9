//! `recon`: what finding the difference costs, per strategy, through real
//! client and server `Session`s over an in-memory link (the driver of
//! `run_session`): n = 10^6 nodes per side, d differing nodes, half on each
//! side, clustered (each new node builds on its side's newest) or spread
//! (each cites a random old node, as a device that was offline would).
//!
//! Bytes are counted in the envelopes that cross: the difference's own
//! messages (`ibf-*`, `mst-*`) against d × 32 B (what naming the difference
//! by ids costs), and the handshake (`hello`, `welcome`) beside them, since
//! the baseline's difference is the version vectors they carry. Round trips
//! are the client flights that carried the handshake or the difference,
//! counted by the driver. Every run ends with both rooms holding the same
//! nodes (packs included), which is checked.
//!
//! The strategies are forced through the sessions' configuration: a
//! history of 1,000 authors makes the client leave its version vector out
//! (more than `vv_inline_limit`), and the server's `mst_above` picks RIBLT
//! or the MST; the baseline runs with 100 authors, and with 10,000 with
//! the version vector forced in.

use anyhow::{Context, Result};
use serde_json::json;
use syncline_core::dag::{Dag, NodeIdx};
use syncline_core::node::NodeFormat;
use syncline_core::proto::session::{CAP_DIFF_HEADS, CAP_DIFF_IBF, CAP_DIFF_MST, Config};
use syncline_core::{EntryId, Hlc, Keypair, Node, NodeId, Op, Room, Value, VerifiedNode};

use super::{Report, ms, run_session};
use crate::trace::room_id;

const N: usize = 1_000_000;
const DIFFS: [usize; 5] = [1, 10, 100, 1_000, 10_000];

pub(super) fn bench_recon(report: &Report) -> Result<()> {
    let many = Base::build(1_000, true)?;
    for strategy in [CAP_DIFF_IBF, CAP_DIFF_MST] {
        for spread in [false, true] {
            for d in DIFFS {
                measure(report, &many, strategy, d, spread)?;
            }
        }
    }
    for authors in [100, 10_000] {
        let base = Base::build(authors, false)?;
        for spread in [false, true] {
            for d in DIFFS {
                measure(report, &base, CAP_DIFF_HEADS, d, spread)?;
            }
        }
    }
    Ok(())
}

/// The author keys of a history, by number.
fn key(i: usize) -> Keypair {
    Keypair::from_seed(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
}

/// A shared history of `N` nodes: authors take turns, each node citing the
/// one before it. Each run clones the room (with its sketch and tree, if
/// `reconciled`, built once here rather than per run).
struct Base {
    room: Room,
    keys: Vec<Keypair>,
}

impl Base {
    fn build(authors: usize, reconciled: bool) -> Result<Base> {
        let keys: Vec<Keypair> = (0..authors).map(key).collect();
        let mut dag = Dag::new(room_id());
        for i in 0..N {
            let prev = dag.next_idx().checked_sub(1);
            dag.insert(node(&dag, &keys[i % authors], prev, false))?;
        }
        let mut room = Room::with_dag(dag);
        if reconciled {
            room.sketch();
            room.id_tree();
        }
        Ok(Base { room, keys })
    }
}

/// A node by `key`'s author citing the author's previous node and `other`
/// (if any), with one small operation; signed if `sign`.
fn node(dag: &Dag, key: &Keypair, other: Option<NodeIdx>, sign: bool) -> VerifiedNode {
    let author = key.author();
    let seq = dag.author_seq(&author) + 1;
    let mut parents: Vec<NodeIdx> = other.into_iter().collect();
    parents.extend(dag.by_author_seq(&author, seq - 1));
    let lamport = dag.next_lamport(&parents);
    let mut cited: Vec<(NodeId, (syncline_core::AuthorId, u64))> = parents
        .iter()
        .map(|&p| (dag.id(p), (*dag.author(p), dag.seq(p))))
        .collect();
    cited.sort_unstable();
    cited.dedup();
    let wall_ms = parents
        .iter()
        .map(|&p| dag.hlc(p).wall_ms)
        .max()
        .unwrap_or(1_700_000_000_000)
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
            // A field per author: one writer's values are sequential, so
            // the document does not hold a register of d concurrent
            // values (which is not what this benchmark measures).
            field: format!("v{}", syncline_core::ids::to_hex(&author.as_bytes()[..4])),
            value: Value::Int(seq as i64),
        }],
    };
    let id = Node::id_of(&node.encode());
    VerifiedNode {
        id,
        node,
        sig: sign.then(|| key.sign(&id)),
        parent_keys: cited.iter().map(|(_, k)| *k).collect(),
    }
}

/// One run: both sides get the base and half the difference each (signed,
/// so either side can ship it), then a client and a server session find
/// and exchange it.
fn measure(report: &Report, base: &Base, strategy: &str, d: usize, spread: bool) -> Result<()> {
    let (mut server, mut client) = (base.room.clone(), base.room.clone());
    let len = base.room.dag().next_idx();
    let authors = base.keys.len();
    for j in 0..d {
        // Disjoint authors on the two sides.
        let (room, a) = if j % 2 == 0 {
            (&mut client, (j / 2) % (authors / 2))
        } else {
            (&mut server, authors / 2 + (j / 2) % (authors / 2))
        };
        let other = if spread {
            let h = blake3::hash(&(j as u64).to_le_bytes());
            u32::from_le_bytes(h.as_bytes()[..4].try_into()?) % len
        } else {
            room.dag().next_idx() - 1
        };
        let v = node(room.dag(), &base.keys[a], Some(other), true);
        room.receive(v)?;
    }
    let mut client_config = Config::default();
    let mut server_config = Config::default();
    match strategy {
        CAP_DIFF_HEADS => client_config.vv_inline_limit = usize::MAX,
        CAP_DIFF_IBF => server_config.mst_above = u64::MAX,
        _ => server_config.mst_above = 0,
    }
    let client_key = Keypair::from_seed([0xc1; 32]);
    let run = run_session(
        &mut client,
        &client_key,
        &mut server,
        client_config,
        server_config,
    )
    .with_context(|| format!("{strategy}, d = {d}"))?;
    anyhow::ensure!(
        run.strategy == Some(strategy),
        "ran {:?}, not {strategy}",
        run.strategy
    );
    let ratio = run.diff_bytes as f64 / (d as f64 * 32.0);
    let with_handshake = (run.diff_bytes + run.handshake_bytes) as f64 / (d as f64 * 32.0);
    let placement = if spread { "spread" } else { "clustered" };
    report.emit(
        "recon",
        &[
            ("strategy", strategy.into()),
            ("n per side / d / authors", format!("{N} / {d} / {authors}")),
            ("difference", placement.into()),
            (
                "difference messages",
                format!("{} B = {ratio:.2} x d x 32 B", run.diff_bytes),
            ),
            (
                "with hello and welcome",
                format!(
                    "{} B = {with_handshake:.2} x",
                    run.diff_bytes + run.handshake_bytes
                ),
            ),
            ("round trips to the difference", run.diff_trips.to_string()),
            ("session, packs included", format!("{:.1} ms", ms(run.took))),
        ],
        json!({"strategy": strategy, "n": N, "d": d, "authors": authors, "spread": spread,
               "diff_bytes": run.diff_bytes, "handshake_bytes": run.handshake_bytes,
               "ratio": ratio, "ratio_with_handshake": with_handshake,
               "round_trips": run.diff_trips, "session_ms": ms(run.took)}),
    );
    Ok(())
}
