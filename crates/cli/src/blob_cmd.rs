//! `syncline blob put|get|status`: files as blobs in a room, their bytes
//! beside the history, moved through the relay by `sync`.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use syncline::{BlobState, Value};
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
        shown.fetch_blob(&blob.hash, timeout)?;
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
