//! `trace`: the automerge-paper editing trace (259,778 edits) applied as
//! local transactions, one node per edit, and what the resulting room
//! costs: time to apply, live heap (counted by the allocator, after the
//! room drops what it keeps only for speed), the compact pack, and, in a
//! real SQLite replica that received it, the bytes on disk and the time to
//! open the room from its checkpoint. With the
//! `loro` feature, loro applies the same trace in the same run (as one
//! change, and as one change per edit) and its live heap and snapshot are
//! measured the same way; every comparison is a ratio within the run.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use syncline_core::{EntryKind, Keypair, Room, RoomId};
use syncline_store::{DurableRoom, SqliteOptions, SqliteStore, Store};

use crate::{Args, Report, best, live_heap, ms, timed};

/// automerge's saved document for the same trace, in bytes (the published
/// figure the pack-size target is set against).
const AUTOMERGE_SAVED_BYTES: usize = 129_000;

/// One edit of the trace: (position, characters deleted, text inserted).
pub(crate) type Patch = (usize, usize, String);

pub(crate) fn load(path: &Path) -> Result<(Vec<Patch>, String)> {
    let mut json = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
    )
    .read_to_string(&mut json)?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let mut patches = Vec::new();
    for t in v["txns"].as_array().context("txns")? {
        for p in t["patches"].as_array().context("patches")? {
            patches.push((
                p[0].as_u64().context("pos")? as usize,
                p[1].as_u64().context("del")? as usize,
                p[2].as_str().context("ins")?.to_owned(),
            ));
        }
    }
    let end = v["endContent"].as_str().context("endContent")?.to_owned();
    Ok((patches, end))
}

pub(crate) fn room_id() -> RoomId {
    RoomId::new("automerge-paper").expect("valid room id")
}

/// Replays the trace into a fresh in-memory room, one node per edit.
pub(crate) fn replay(patches: &[Patch], key: &Keypair) -> Result<Room> {
    let mut room = Room::new(room_id());
    let mut tx = room.begin(key.author(), 0);
    tx.ensure("/paper", EntryKind::Text)?;
    tx.commit()?;
    for (i, (pos, del, ins)) in patches.iter().enumerate() {
        let mut tx = room.begin(key.author(), 1 + i as u64);
        tx.text_delete("/paper", *pos, *del)?;
        tx.text_insert("/paper", *pos, ins)?;
        tx.commit()?;
    }
    Ok(room)
}

/// What our side measured, for the ratios against loro.
#[cfg_attr(not(feature = "loro"), allow(dead_code))]
struct Ours {
    apply: Duration,
    heap: usize,
    replica_bytes: u64,
    open: Duration,
}

/// The trace room as a replica keeps it on disk and opens it.
struct OnDisk {
    /// The room's history in the store (segments and signatures).
    history: u64,
    /// Its checkpoint.
    checkpoint: u64,
    /// Making the checkpoint (what a write that is due one adds).
    checkpoint_build: Duration,
    segments: u64,
    /// The replica's file (database and log) after merging and vacuuming.
    file: u64,
    /// Opening the room, ready to read and write (best of runs).
    open: Duration,
    /// A first local write after opening (one fsynced transaction).
    first_write: Duration,
}

/// Receives `pack` into a fresh SQLite replica (what catching up writes),
/// checkpoints it (as unloading does), lets the store settle, and opens
/// the room from it.
fn on_disk(args: &Args, pack: &[u8], nodes: usize, expected: [u8; 32]) -> Result<OnDisk> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(
        &dir.path().join("replica.db"),
        SqliteOptions::default(),
    )?);
    let key = Keypair::from_seed([8; 32]);
    let mut fresh = DurableRoom::load(store.clone(), key.clone(), &room_id())?;
    // Timed by the `import` benchmark.
    let got = fresh.receive_pack(pack)?;
    anyhow::ensure!(got.accepted.len() == nodes, "not every node was accepted");
    let (checkpoint_build, _) = best(args.runs, || timed(|| Ok(fresh.room().checkpoint())))?;
    // What unloading the room does.
    fresh.checkpoint()?;
    drop(fresh);
    store.settle()?;
    let bytes = store.room_bytes(&room_id())?;
    let file = store.file_bytes();
    let (open, mut opened) = best(args.runs, || {
        timed(|| Ok(DurableRoom::load(store.clone(), key.clone(), &room_id())?))
    })?;
    anyhow::ensure!(
        opened.room().state_hash() == expected,
        "the reopened room differs"
    );
    anyhow::ensure!(
        opened.opened().replayed == 0,
        "the room replayed {} nodes",
        opened.opened().replayed
    );
    let (first_write, _) =
        timed(|| Ok(opened.transact(1, |tx| tx.text_insert("/paper", 0, "x"))?))?;
    Ok(OnDisk {
        history: bytes.history,
        checkpoint: bytes.checkpoint,
        segments: bytes.segments,
        file,
        checkpoint_build,
        open,
        first_write,
    })
}

pub(crate) fn run(args: &Args, report: &Report) -> Result<()> {
    let (patches, end) = load(&args.trace)?;
    let key = Keypair::from_seed([7; 32]);
    let (apply, _) = best(args.runs, || timed(|| replay(&patches, &key)))?;
    // Built once more, alone, to count what it holds.
    let (heap, mut room) = live_heap(|| {
        let room = replay(&patches, &key)?;
        room.dag().shrink();
        Ok(room)
    })?;
    let doc = room.doc();
    let text = doc.text(&doc.resolve("/paper")?);
    anyhow::ensure!(text == end, "the replay did not produce endContent");
    let nodes = room.dag().causal_order();
    let (encode, pack) = timed(|| Ok(room.pack(&nodes, Some(&key))?))?;
    let edits = patches.len();
    let sealed = room.dag().sealed_bytes();
    let disk = on_disk(args, &pack, nodes.len(), room.state_hash())?;
    let history_ratio = disk.history as f64 / pack.len() as f64;
    report.emit(
        "trace",
        &[
            ("edits (one node each)", edits.to_string()),
            (
                "apply as local transactions",
                format!("{:.1} ms", ms(apply)),
            ),
            (
                "per edit",
                format!("{:.0} ns", apply.as_nanos() as f64 / edits as f64),
            ),
            ("live heap of the room", format!("{heap} bytes")),
            ("  of which sealed history", format!("{sealed} bytes")),
            ("compact pack", format!("{} bytes", pack.len())),
            (
                "pack / automerge saved doc",
                format!("{:.2} x", pack.len() as f64 / AUTOMERGE_SAVED_BYTES as f64),
            ),
            ("pack encode", format!("{:.1} ms", ms(encode))),
            (
                "history on disk",
                format!("{} bytes in {} segments", disk.history, disk.segments),
            ),
            (
                "history / compact pack (target <= 1.5)",
                format!("{history_ratio:.2} x"),
            ),
            ("checkpoint", format!("{} bytes", disk.checkpoint)),
            (
                "checkpoint build",
                format!("{:.1} ms", ms(disk.checkpoint_build)),
            ),
            ("replica file", format!("{} bytes", disk.file)),
            (
                "open from checkpoint (target <= 10 ms)",
                format!("{:.2} ms", ms(disk.open)),
            ),
            (
                "first write after open (fsync)",
                format!("{:.2} ms", ms(disk.first_write)),
            ),
            ("final text", format!("{} chars", text.chars().count())),
        ],
        json!({
            "edits": edits,
            "apply_ms": ms(apply),
            "ns_per_edit": apply.as_nanos() as f64 / edits as f64,
            "live_heap_bytes": heap,
            "sealed_history_bytes": sealed,
            "pack_bytes": pack.len(),
            "pack_vs_automerge": pack.len() as f64 / AUTOMERGE_SAVED_BYTES as f64,
            "pack_encode_ms": ms(encode),
            "history_bytes": disk.history,
            "history_segments": disk.segments,
            "history_vs_pack": history_ratio,
            "checkpoint_bytes": disk.checkpoint,
            "checkpoint_build_ms": ms(disk.checkpoint_build),
            "replica_file_bytes": disk.file,
            "open_ms": ms(disk.open),
            "first_write_ms": ms(disk.first_write),
            "text_chars": text.chars().count(),
        }),
    );
    #[cfg(feature = "loro")]
    versus_loro::reference(
        args,
        report,
        &patches,
        &end,
        &Ours {
            apply,
            heap,
            replica_bytes: disk.file,
            open: disk.open,
        },
    )?;
    Ok(())
}

#[cfg(feature = "loro")]
mod versus_loro {
    //! loro on the same trace, measured the same way.

    use super::*;

    /// loro applying the trace: with `commit_each`, one change per edit
    /// (the same unit of work as one Syncline node per edit); without,
    /// one change for the whole trace.
    fn apply(patches: &[Patch], end: &str, commit_each: bool) -> Result<::loro::LoroDoc> {
        let doc = ::loro::LoroDoc::new();
        doc.set_peer_id(1)?;
        let text = doc.get_text("paper");
        for (pos, del, ins) in patches {
            if *del > 0 {
                text.delete(*pos, *del)?;
            }
            if !ins.is_empty() {
                text.insert(*pos, ins)?;
            }
            if commit_each {
                doc.commit();
            }
        }
        doc.commit();
        anyhow::ensure!(text.to_string() == end, "loro did not produce endContent");
        Ok(doc)
    }

    /// Emits loro's figures next to ours, as ratios.
    pub(super) fn reference(
        args: &Args,
        report: &Report,
        patches: &[Patch],
        end: &str,
        ours: &Ours,
    ) -> Result<()> {
        for commit_each in [false, true] {
            let (took, _) = best(args.runs, || timed(|| apply(patches, end, commit_each)))?;
            let (heap, doc) = live_heap(|| apply(patches, end, commit_each))?;
            let snapshot = doc.export(::loro::ExportMode::Snapshot)?;
            let (load, _) = best(args.runs, || {
                timed(|| {
                    let fresh = ::loro::LoroDoc::new();
                    fresh.import(&snapshot)?;
                    Ok(fresh)
                })
            })?;
            let mode = if commit_each {
                "one change per edit"
            } else {
                "one change in all"
            };
            let time_ratio = ours.apply.as_secs_f64() / took.as_secs_f64();
            let heap_ratio = ours.heap as f64 / heap as f64;
            let disk_ratio = ours.replica_bytes as f64 / snapshot.len() as f64;
            let open_ratio = ours.open.as_secs_f64() / load.as_secs_f64();
            report.emit(
                "trace-loro",
                &[
                    ("loro mode", mode.into()),
                    ("loro apply", format!("{:.1} ms", ms(took))),
                    ("syncline / loro time", format!("{time_ratio:.2} x")),
                    ("loro live heap", format!("{heap} bytes")),
                    ("syncline / loro heap", format!("{heap_ratio:.2} x")),
                    ("loro snapshot", format!("{} bytes", snapshot.len())),
                    (
                        "syncline replica / loro snapshot",
                        format!("{disk_ratio:.2} x"),
                    ),
                    ("loro snapshot load", format!("{:.2} ms", ms(load))),
                    ("syncline open / loro load", format!("{open_ratio:.2} x")),
                ],
                json!({
                    "commit_each": commit_each,
                    "loro_apply_ms": ms(took),
                    "time_ratio": time_ratio,
                    "loro_heap_bytes": heap,
                    "heap_ratio": heap_ratio,
                    "loro_snapshot_bytes": snapshot.len(),
                    "disk_ratio": disk_ratio,
                    "loro_load_ms": ms(load),
                    "open_ratio": open_ratio,
                }),
            );
        }
        Ok(())
    }
}
