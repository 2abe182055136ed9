//! `syncline conflicts` and `syncline resolve`: what concurrent edits left
//! to decide, numbered, and settling it by picking a candidate.

use serde_json::json;
use syncline::{Conflict, Pick, Room};

use crate::history::iso8601;
use crate::json::{conflict_json, from_json, to_json};
use crate::{Cli, Exit, Failed, Outcome, open, print};

/// A conflict for people: what it is, its numbered candidates and the
/// command that settles it.
fn describe(room: &Room, conflict: &Conflict) -> String {
    let name = room.name();
    match conflict {
        Conflict::Field {
            path,
            field,
            winner,
            losers,
        } => {
            let mut lines = vec![format!("field {field} of {path}: concurrent writes")];
            for (i, write) in std::iter::once(winner).chain(losers).enumerate() {
                let value = write
                    .value
                    .as_ref()
                    .map_or_else(|| "(unset)".to_owned(), |v| to_json(v).to_string());
                lines.push(format!(
                    "  [{i}] {value}  by {}… at {}{}",
                    &write.author.to_string()[..8],
                    iso8601(write.hlc.wall_ms),
                    if i == 0 { "  (in effect)" } else { "" }
                ));
            }
            lines.push(format!(
                "  settle: syncline resolve {name} {path} {field} --pick N  (or --value JSON)"
            ));
            lines.join("\n")
        }
        Conflict::Name {
            path,
            winner,
            others,
        } => {
            let mut lines = vec![format!(
                "name {path}: {} entries share it",
                others.len() + 1
            )];
            for (i, entry) in std::iter::once(winner).chain(others).enumerate() {
                lines.push(format!(
                    "  [{i}] entry {}…{}",
                    &entry.to_string()[..8],
                    if i == 0 { "  (the path names it)" } else { "" }
                ));
            }
            lines.push(format!(
                "  settle: syncline resolve {name} {path} --pick N  (N keeps the name; the \
                 others become {path}~2, …)"
            ));
            lines.join("\n")
        }
        Conflict::Move { path, .. } => {
            let mut lines = vec![format!("move {path}: concurrent moves of this entry")];
            // Under a shared name the path may name another entry: that
            // conflict is settled first.
            let Ok(places) = room.move_candidates(path) else {
                lines.push("  settle the name conflict above it first".to_owned());
                return lines.join("\n");
            };
            for (i, place) in places.iter().enumerate() {
                lines.push(format!(
                    "  [{i}] {place}{}",
                    if i == 0 { "  (where it is)" } else { "" }
                ));
            }
            lines.push(format!("  settle: syncline resolve {name} {path} --pick N"));
            lines.join("\n")
        }
        Conflict::Delete {
            entry,
            deleted_by,
            edits,
        } => format!(
            "delete: entry {}… was deleted by node {}… while {} concurrent edit(s) changed it; \
             the delete stands (write the entry again to keep it)",
            &entry.to_string()[..8],
            &deleted_by.to_string()[..8],
            edits.len()
        ),
    }
}

pub(crate) fn conflicts(cli: &Cli, room: &str, path: &str) -> Outcome {
    let room = open(cli)?.room(room)?;
    let conflicts = room.conflicts(path)?;
    let all: Vec<serde_json::Value> = conflicts.iter().map(conflict_json).collect();
    let text: Vec<String> = conflicts.iter().map(|c| describe(&room, c)).collect();
    print(cli, json!(all), || {
        if text.is_empty() {
            "no conflicts".to_owned()
        } else {
            text.join("\n")
        }
    });
    Ok(())
}

pub(crate) fn resolve(
    cli: &Cli,
    room: &str,
    path: &str,
    field: Option<&str>,
    pick: Option<usize>,
    value: Option<&str>,
) -> Outcome {
    let room = open(cli)?.room(room)?;
    match (field, pick, value) {
        (Some(field), pick, value) => {
            let pick = match (pick, value) {
                (Some(n), None) => Pick::Candidate(n),
                (None, Some(json)) => {
                    let parsed: serde_json::Value = serde_json::from_str(json).map_err(|e| {
                        Failed::new(
                            Exit::Usage,
                            format!("--value is not JSON: {e} (strings need quotes: '\"milk\"')"),
                        )
                    })?;
                    Pick::Value(from_json(&parsed).map_err(|e| Failed::new(Exit::Usage, e))?)
                }
                _ => {
                    return Err(Failed::new(
                        Exit::Usage,
                        "give --pick N or --value JSON (syncline conflicts lists the candidates)",
                    ));
                }
            };
            let node = room.resolve_field(path, field, pick)?;
            print(cli, json!({"resolved": "field", "node": node}), || {
                format!("resolved field {field} of {path}")
            });
        }
        (None, Some(n), None) => {
            // A name conflict at the path, else a move conflict of it.
            match room.resolve_name(path, n) {
                Ok(renamed) => {
                    print(cli, json!({"resolved": "name", "renamed": renamed}), || {
                        format!(
                            "{path} kept by candidate {n}; renamed: {}",
                            renamed.join(" ")
                        )
                    });
                }
                Err(syncline::Error::NoConflict { .. }) => {
                    let now = room.resolve_move(path, n)?;
                    print(cli, json!({"resolved": "move", "path": now}), || {
                        format!("resolved: the entry stays at {now}")
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        (None, _, Some(_)) => {
            return Err(Failed::new(
                Exit::Usage,
                "--value settles a field: give the FIELD (syncline resolve ROOM PATH FIELD --value JSON)",
            ));
        }
        (None, None, None) => {
            return Err(Failed::new(
                Exit::Usage,
                "give --pick N (syncline conflicts lists the candidates)",
            ));
        }
    }
    Ok(())
}
