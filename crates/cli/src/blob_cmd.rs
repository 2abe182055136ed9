//! `syncline blob put|get|status|gc`: files as blobs in a room, their
//! bytes beside the history, moved through the relay by `sync`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use syncline::{BlobState, Value};
use syncline_core::blob::GROUP_BYTES;
use syncline_core::ids::to_hex;

use crate::sync_cmd::options;
use crate::{Cli, Exit, Failed, Outcome, open, print, servers_or_remote};

/// Stores `file` as a blob and sets `field` of the entry at `path` to its
/// reference; `sync` uploads it.
pub(crate) fn put(
    cli: &Cli,
    room: &str,
    path: &str,
    field: &str,
    file: &Path,
    mime: &str,
) -> Outcome {
    let reader = std::fs::File::open(file).map_err(|e| crate::exit::unreadable(file, &e))?;
    let blob = open(cli)?.room(room)?.put_blob(path, field, reader, mime)?;
    print(
        cli,
        json!({"blob": to_hex(&blob.hash), "size": blob.size, "mime": blob.mime}),
        || {
            format!(
                "stored blob {} ({} bytes) at {path} {field}; `syncline sync` uploads it",
                to_hex(&blob.hash),
                blob.size
            )
        },
    );
    Ok(())
}

/// Writes the blob `field` of the entry at `path` references to `out` (or
/// stdout), fetching it from the relay first unless it is held here.
pub(crate) fn get(
    cli: &Cli,
    room: &str,
    path: &str,
    field: &str,
    out: Option<&Path>,
    servers: &[String],
    timeout: Duration,
) -> Outcome {
    let replica = open(cli)?;
    let shown = replica.room(room)?;
    let value = shown.get(path, field)?;
    let Some(Value::Blob(blob)) = value else {
        return Err(Failed::new(
            Exit::NotFound,
            format!("{path} {field} holds no blob reference"),
        ));
    };
    if !matches!(replica.blob_state(&blob.hash)?, BlobState::Complete { .. }) {
        let servers = servers_or_remote(&replica, servers)?;
        let sync = replica.connect_with(options(&replica, &servers, None)?, &[room])?;
        let bar = progress(blob.size);
        // The bar follows what the store holds, as the fetch runs.
        let done = std::sync::atomic::AtomicBool::new(false);
        let fetched = std::thread::scope(|scope| {
            if let Some(bar) = &bar {
                scope.spawn(|| {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        bar.set_position(held_bytes(&replica, &blob.hash, blob.size));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            }
            let fetched = shown.fetch_blob(&blob.hash, timeout);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            fetched
        });
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        fetched?;
        sync.stop();
    }
    let mut reader = replica.blob_reader(&blob.hash)?;
    let copied = match out {
        Some(file) => {
            let mut dest = std::fs::File::create(file).map_err(|e| {
                Failed::new(
                    Exit::Failure,
                    format!("cannot write {}: {e}", file.display()),
                )
            })?;
            std::io::copy(&mut reader, &mut dest)
        }
        None => std::io::copy(&mut reader, &mut std::io::stdout().lock()),
    }
    .map_err(|e| Failed::new(Exit::Failure, format!("writing the blob: {e}")))?;
    if let Some(file) = out {
        print(
            cli,
            json!({"blob": to_hex(&blob.hash), "size": copied, "file": file}),
            || format!("wrote {copied} bytes to {}", file.display()),
        );
    }
    Ok(())
}

/// A bar of bytes fetched on a terminal, for a blob large enough to wait
/// for (a megabyte and more).
fn progress(size: u64) -> Option<ProgressBar> {
    (std::io::stderr().is_terminal() && size >= 1 << 20).then(|| {
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template(
                "fetching [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} [{elapsed}, {eta} left]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    })
}

/// Bytes of blob `hash` (of `size` bytes) the replica holds.
fn held_bytes(replica: &syncline::Replica, hash: &[u8; 32], size: u64) -> u64 {
    match replica.blob_state(hash) {
        Ok(BlobState::Complete { .. }) => size,
        Ok(BlobState::Partial { held, .. }) => (held * GROUP_BYTES as u64).min(size),
        _ => 0,
    }
}

/// Lists the blobs this replica holds, whole or in part.
pub(crate) fn status(cli: &Cli) -> Outcome {
    let replica = open(cli)?;
    let blobs = replica.blobs_held()?;
    let rows: Vec<serde_json::Value> = blobs
        .iter()
        .map(|(hash, state)| match state {
            BlobState::Complete { size } => {
                json!({"blob": to_hex(hash), "size": size, "held": "all"})
            }
            BlobState::Partial { size, held, groups } => json!({
                "blob": to_hex(hash), "size": size, "held": format!("{held}/{groups} groups"),
            }),
            BlobState::Missing => json!({"blob": to_hex(hash), "held": "none"}),
        })
        .collect();
    print(cli, json!(rows), || {
        if rows.is_empty() {
            return "no blobs".to_owned();
        }
        rows.iter()
            .map(|r| {
                format!(
                    "{}  {} bytes  {}",
                    r["blob"].as_str().unwrap_or(""),
                    r["size"],
                    r["held"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

/// Removes the blobs nothing here references that are older than `grace`
/// seconds.
pub(crate) fn gc(cli: &Cli, grace: f64) -> Outcome {
    let grace = Duration::try_from_secs_f64(grace).map_err(|_| {
        Failed::new(
            Exit::Usage,
            format!("--grace {grace}: give a number of seconds, 0 or more"),
        )
    })?;
    let removed = open(cli)?.collect_blob_garbage(grace)?;
    let hashes: Vec<String> = removed.iter().map(|h| to_hex(h)).collect();
    print(cli, json!({"removed": hashes}), || {
        format!("removed {} blob(s) no room references", hashes.len())
    });
    Ok(())
}
