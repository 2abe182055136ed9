//! Operations described by path, for people reading a history (`syncline
//! log` and `show`): what each operation of a node did, its entries named
//! by where they are now (or were last, if deleted).

use std::fmt;

use super::{Doc, Stamp};
use crate::dag::{Dag, NodeIdx};
use crate::ids::EntryId;
use crate::op::{EntryKind, Op};
use crate::value::Value;

/// What one operation did.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Created an entry.
    Create {
        /// Where.
        path: String,
        /// What it holds.
        kind: EntryKind,
    },
    /// Wrote a field.
    Set {
        /// The entry.
        path: String,
        /// The field.
        field: String,
        /// The value written.
        value: Value,
    },
    /// Removed a field.
    Unset {
        /// The entry.
        path: String,
        /// The field.
        field: String,
    },
    /// Moved or renamed an entry.
    Move {
        /// Where it was before this move, if it was placed.
        from: Option<String>,
        /// Where this move put it.
        to: String,
    },
    /// Deleted an entry (and its subtree).
    Delete {
        /// Where it was.
        path: String,
    },
    /// Inserted text.
    TextInsert {
        /// The text entry.
        path: String,
        /// What was inserted.
        text: String,
    },
    /// Deleted characters of a text.
    TextDelete {
        /// The text entry.
        path: String,
        /// How many characters.
        chars: u64,
    },
    /// Recorded something of the room's governance (a policy, a grant, a
    /// revocation) under `/.syncline`.
    Governance {
        /// The entry written.
        path: String,
    },
}

/// Longest value or text shown whole in a description.
const SHOWN_CHARS: usize = 40;

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edit::Create { path, kind } => write!(f, "create {path} ({})", kind.as_str()),
            Edit::Set { path, field, value } => {
                write!(f, "set {path} {field} = {}", shorten(&value.to_string()))
            }
            Edit::Unset { path, field } => write!(f, "unset {path} {field}"),
            Edit::Move {
                from: Some(from),
                to,
            } => write!(f, "move {from} -> {to}"),
            Edit::Move { from: None, to } => write!(f, "move -> {to}"),
            Edit::Delete { path } => write!(f, "delete {path}"),
            Edit::TextInsert { path, text } => {
                write!(f, "insert {} into {path}", shorten(&format!("{text:?}")))
            }
            Edit::TextDelete { path, chars } => write!(f, "delete {chars} chars of {path}"),
            Edit::Governance { path } => write!(f, "govern {path}"),
        }
    }
}

/// `s`, cut to [`SHOWN_CHARS`] characters with an ellipsis if longer.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

impl Doc {
    /// What operation `op_index` of node `idx` did (`op` is that
    /// operation), its entries named by their paths now.
    pub fn describe(&self, dag: &Dag, idx: NodeIdx, op_index: u32, op: &Op) -> Edit {
        let path = |entry: &EntryId| self.path_or_id(entry);
        let under = |parent: &EntryId, name: &str| {
            let base = path(parent);
            format!("{}/{name}", base.trim_end_matches('/'))
        };
        let edit = match op {
            Op::Create {
                parent, name, kind, ..
            } => Edit::Create {
                path: under(parent, name),
                kind: *kind,
            },
            Op::Set {
                entry,
                field,
                value,
            } => Edit::Set {
                path: path(entry),
                field: field.clone(),
                value: value.clone(),
            },
            Op::Unset { entry, field } => Edit::Unset {
                path: path(entry),
                field: field.clone(),
            },
            Op::Move {
                parent,
                name,
                entry: _,
                ..
            } => {
                let stamp = Stamp {
                    hlc: dag.hlc(idx),
                    author: *dag.author(idx),
                    op: op_index,
                };
                let from = self
                    .tree
                    .placement_before(&stamp)
                    .map(|(from, _, _)| under(&from.parent, &from.name));
                Edit::Move {
                    from,
                    to: under(parent, name),
                }
            }
            Op::Delete { entry } => Edit::Delete { path: path(entry) },
            Op::TextInsert { entry, text, .. } => Edit::TextInsert {
                path: path(entry),
                text: text.clone(),
            },
            Op::TextDelete { entry, spans } => Edit::TextDelete {
                path: path(entry),
                chars: spans.iter().map(|s| u64::from(s.len)).sum(),
            },
        };
        match &edit {
            Edit::Create { path, .. }
            | Edit::Set { path, .. }
            | Edit::Unset { path, .. }
            | Edit::Move { to: path, .. }
                if path.starts_with("/.syncline/") || path == "/.syncline" =>
            {
                Edit::Governance { path: path.clone() }
            }
            _ => edit,
        }
    }

    /// The entry's path now (or where it was last, if deleted), or its id
    /// if it was never placed.
    fn path_or_id(&self, entry: &EntryId) -> String {
        match self.tree.last_names(entry) {
            Some(names) => format!("/{}", names.join("/")),
            None => format!("<entry {}>", &entry.to_string()[..8]),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ids::RoomId;
    use crate::keys::Keypair;
    use crate::room::Room;

    use super::*;

    #[test]
    fn each_operation_is_described_by_its_paths() {
        let key = Keypair::from_seed([3; 32]);
        let mut room = Room::new(RoomId::new("d").unwrap());
        let commit = |room: &mut Room, edit: &dyn Fn(&mut crate::Transaction<'_>)| {
            let mut tx = room.begin(key.author(), 1_000);
            edit(&mut tx);
            tx.commit().unwrap().unwrap().idx
        };
        let first = commit(&mut room, &|tx| {
            tx.set("/todo/1", "title", Value::Str("milk".into()))
                .unwrap();
            tx.text_insert("/notes", 0, "hello").unwrap();
        });
        let second = commit(&mut room, &|tx| {
            tx.mv("/todo/1", "/done").unwrap();
            tx.text_delete("/notes", 0, 2).unwrap();
            tx.delete("/done").unwrap();
        });
        let describe = |idx| -> Vec<String> {
            let (dag, doc) = (room.dag(), room.doc());
            dag.ops(idx)
                .iter()
                .enumerate()
                .map(|(i, op)| doc.describe(dag, idx, i as u32, op).to_string())
                .collect()
        };
        assert_eq!(
            describe(first),
            [
                "create /todo (map)",
                "create /todo/1 (map)",
                "set /done title = \"milk\"",
                "create /notes (text)",
                "insert \"hello\" into /notes",
            ]
        );
        assert_eq!(
            describe(second),
            [
                "move /todo/1 -> /done",
                "delete 2 chars of /notes",
                "delete /done"
            ]
        );
    }
}
