//! `trace`: the automerge-paper editing trace (259,778 edits) applied as
//! local transactions, one node per edit, and what the resulting room
//! costs: time to apply, live heap (counted by the allocator, after the
//! room drops what it keeps only for speed), the compact pack. With the
//! `loro` feature, loro applies the same trace in the same run (as one
//! change, and as one change per edit) and its live heap and snapshot are
//! measured the same way; every comparison is a ratio within the run.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use syncline_core::{EntryKind, Keypair, Room, RoomId};

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
            "text_chars": text.chars().count(),
        }),
    );
    #[cfg(feature = "loro")]
    versus_loro::reference(args, report, &patches, &end, apply, heap)?;
    Ok(())
}

#[cfg(feature = "loro")]
mod versus_loro {
    //! loro on the same trace, measured the same way.

    use std::time::Duration;

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
        ours: Duration,
        our_heap: usize,
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
            let time_ratio = ours.as_secs_f64() / took.as_secs_f64();
            let heap_ratio = our_heap as f64 / heap as f64;
            report.emit(
                "trace-loro",
                &[
                    ("loro mode", mode.into()),
                    ("loro apply", format!("{:.1} ms", ms(took))),
                    ("syncline / loro time", format!("{time_ratio:.2} x")),
                    ("loro live heap", format!("{heap} bytes")),
                    ("syncline / loro heap", format!("{heap_ratio:.2} x")),
                    ("loro snapshot", format!("{} bytes", snapshot.len())),
                    ("loro snapshot load", format!("{:.2} ms", ms(load))),
                ],
                json!({
                    "commit_each": commit_each,
                    "loro_apply_ms": ms(took),
                    "time_ratio": time_ratio,
                    "loro_heap_bytes": heap,
                    "heap_ratio": heap_ratio,
                    "loro_snapshot_bytes": snapshot.len(),
                    "loro_load_ms": ms(load),
                }),
            );
        }
        Ok(())
    }
}
