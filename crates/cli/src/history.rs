//! `syncline log` and `syncline show`: a room's history for people, each
//! node with its time (ISO 8601, UTC), author and what it did.

use serde_json::json;
use syncline::{Edit, NodeInfo};

use crate::json::to_json;
use crate::{Cli, Outcome, open, print};

/// `ms` since the Unix epoch as ISO 8601 in UTC, to the millisecond
/// (`2026-11-30T02:28:08.123Z`).
pub(crate) fn iso8601(ms: u64) -> String {
    let (days, rest) = (ms / 86_400_000, ms % 86_400_000);
    let (h, m, s, milli) = (
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000,
    );
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// An edit as JSON: its kind and paths, values as `get` prints them.
fn edit_json(edit: &Edit) -> serde_json::Value {
    match edit {
        Edit::Create { path, kind } => json!({"op": "create", "path": path, "kind": kind.as_str()}),
        Edit::Set { path, field, value } => {
            json!({"op": "set", "path": path, "field": field, "value": to_json(value)})
        }
        Edit::Unset { path, field } => json!({"op": "unset", "path": path, "field": field}),
        Edit::Move { from, to } => json!({"op": "move", "from": from, "to": to}),
        Edit::Delete { path } => json!({"op": "delete", "path": path}),
        Edit::TextInsert { path, text } => json!({"op": "text_insert", "path": path, "text": text}),
        Edit::TextDelete { path, chars } => {
            json!({"op": "text_delete", "path": path, "chars": chars})
        }
        Edit::Governance { path } => json!({"op": "governance", "path": path}),
    }
}

pub(crate) fn log(cli: &Cli, room: &str) -> Outcome {
    let log = open(cli)?.room(room)?.log();
    let rows: Vec<serde_json::Value> = log
        .iter()
        .map(|n| {
            json!({
                "node": n.id, "author": n.author, "seq": n.seq, "wall_ms": n.wall_ms,
                "time": iso8601(n.wall_ms), "summary": n.summary(),
            })
        })
        .collect();
    print(cli, json!(rows), || {
        if log.is_empty() {
            return format!("room {room} has no history yet");
        }
        log.iter()
            .map(|n| {
                format!(
                    "{}  {}  {}#{}  {}",
                    iso8601(n.wall_ms),
                    &n.id[..12],
                    &n.author[..8],
                    n.seq,
                    n.summary()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}

pub(crate) fn show(cli: &Cli, room: &str, node: &str) -> Outcome {
    let replica = open(cli)?;
    let NodeInfo {
        id,
        author,
        seq,
        wall_ms,
        parents,
        edits,
    } = replica.room(room)?.node(node)?;
    let local = author == replica.author();
    print(
        cli,
        json!({
            "node": id, "author": author, "local": local, "seq": seq, "wall_ms": wall_ms,
            "time": iso8601(wall_ms), "parents": parents,
            "edits": edits.iter().map(edit_json).collect::<Vec<_>>(),
        }),
        || {
            let mut lines = vec![
                format!("node     {id}"),
                format!(
                    "author   {author}{}",
                    if local { " (this replica)" } else { "" }
                ),
                format!("seq      {seq}"),
                format!("time     {}", iso8601(wall_ms)),
            ];
            let list = |label: &str, items: Vec<String>| -> Vec<String> {
                if items.is_empty() {
                    return vec![format!("{label:<8} (none)")];
                }
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| format!("{:<8} {item}", if i == 0 { label } else { "" }))
                    .collect()
            };
            lines.extend(list("parents", parents.clone()));
            lines.extend(list(
                "edits",
                edits.iter().map(ToString::to_string).collect(),
            ));
            lines.join("\n")
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::iso8601;

    #[test]
    fn times_are_iso_8601_in_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(1_796_005_688_123), "2026-11-30T02:28:08.123Z");
        assert_eq!(iso8601(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
