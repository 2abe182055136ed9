//! Loading a document into a room from a value: what `Room::export` wrote
//! (so export and import round-trip), or any map, whose nested maps become
//! entries and other values fields.

use std::collections::BTreeMap;

use syncline_core::{EntryKind, Value};

use crate::replica::{Error, Room};

/// What [`Room::import`] found in the value and wrote (a field or text
/// already holding the value given is not written again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Entries created or kept (every entry the value names).
    pub entries: usize,
    /// Fields written.
    pub fields: usize,
    /// Texts written.
    pub texts: usize,
    /// Nodes committed (an import larger than a node can hold takes
    /// several).
    pub nodes: usize,
}

/// One write an import makes.
enum Step {
    Entry {
        path: String,
        kind: EntryKind,
    },
    Field {
        path: String,
        field: String,
        value: Value,
    },
    Text {
        path: String,
        text: String,
    },
}

/// Steps committed per node at most: well under the operations a node may
/// hold, since a step may create its path's entries too.
const STEPS_PER_NODE: usize = 512;

/// Bytes of values and text committed per node at most: half of what a
/// node may hold.
const BYTES_PER_NODE: usize = syncline_core::limits::MAX_NODE_BYTES / 2;

impl Room {
    /// Writes `value` into the room. A map in the shape
    /// [`Room::export`] gives (`kind`, `fields`, `text`, `children`) is
    /// imported as that state: entries of those kinds, fields, and texts
    /// replaced by the ones given. Any other map is plain data: a key whose
    /// value is a map is an entry, any other key a field of the entry
    /// holding it (top-level ones fields of the root). Entries and fields
    /// the value does not name are left alone. Large values are committed
    /// as several nodes, each durable before the next.
    ///
    /// ```
    /// use syncline::{Replica, Value};
    /// let notes = Replica::in_memory()?.room("notes")?;
    /// let mut todo = std::collections::BTreeMap::new();
    /// todo.insert("title".to_owned(), Value::from("milk"));
    /// let mut root = std::collections::BTreeMap::new();
    /// root.insert("todo".to_owned(), Value::from(todo));
    /// let imported = notes.import(&Value::from(root))?;
    /// assert_eq!((imported.entries, imported.fields), (1, 1));
    /// assert_eq!(notes.get("/todo", "title")?, Some("milk".into()));
    /// // What export gives imports as the same state.
    /// let copy = Replica::in_memory()?.room("notes")?;
    /// copy.import(&notes.export())?;
    /// assert_eq!(copy.export(), notes.export());
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn import(&self, value: &Value) -> Result<Imported, Error> {
        let Value::Map(map) = value else {
            return Err(Error::Import {
                why: "the value must be a map (a JSON object)",
            });
        };
        let mut steps = Vec::new();
        if is_exported(map) {
            exported_steps("/", map, &mut steps)?;
        } else {
            plain_steps("/", map, &mut steps)?;
        }
        let mut imported = Imported::default();
        for step in &steps {
            match step {
                Step::Entry { .. } => imported.entries += 1,
                Step::Field { .. } => imported.fields += 1,
                Step::Text { .. } => imported.texts += 1,
            }
        }
        let mut rest = steps.as_slice();
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && take < STEPS_PER_NODE {
                bytes += match &rest[take] {
                    Step::Entry { path, .. } => path.len(),
                    Step::Field { path, value, .. } => path.len() + value.approx_size(),
                    Step::Text { path, text } => path.len() + text.len(),
                };
                if take > 0 && bytes > BYTES_PER_NODE {
                    break;
                }
                take += 1;
            }
            let (now, later) = rest.split_at(take);
            if self
                .transact(|tx| {
                    for step in now {
                        match step {
                            Step::Entry { path, kind } => {
                                tx.ensure(path, *kind)?;
                            }
                            Step::Field { path, field, value } => {
                                // Writing what is there already would only add
                                // history (and settle conflicts unasked).
                                let same = tx.doc().resolve(path).ok().is_some_and(|id| {
                                    tx.doc().field(&id, field) == Some(value)
                                        && !tx.doc().has_conflict(&id, field)
                                });
                                if !same {
                                    tx.set(path, field, value.clone())?;
                                }
                            }
                            Step::Text { path, text } => {
                                tx.ensure(path, EntryKind::Text)?;
                                let id = tx.doc().resolve(path)?;
                                if tx.doc().text(&id) != *text {
                                    let len = tx.doc().text_len(&id);
                                    if len > 0 {
                                        tx.text_delete(path, 0, len)?;
                                    }
                                    tx.text_insert(path, 0, text)?;
                                }
                            }
                        }
                    }
                    Ok(())
                })?
                .is_some()
            {
                imported.nodes += 1;
            }
            rest = later;
        }
        Ok(imported)
    }
}

/// Whether `map` is an entry as [`Room::export`] writes it.
fn is_exported(map: &BTreeMap<String, Value>) -> bool {
    let kind_ok = matches!(map.get("kind"), Some(Value::Str(k)) if k == "map" || k == "text");
    kind_ok
        && map
            .keys()
            .all(|k| matches!(k.as_str(), "kind" | "fields" | "text" | "children"))
}

fn child(path: &str, name: &str) -> String {
    format!("{}/{name}", path.trim_end_matches('/'))
}

fn exported_steps(
    path: &str,
    entry: &BTreeMap<String, Value>,
    steps: &mut Vec<Step>,
) -> Result<(), Error> {
    let kind = match entry.get("kind") {
        Some(Value::Str(k)) if k == "text" => EntryKind::Text,
        Some(Value::Str(k)) if k == "map" => EntryKind::Map,
        _ => {
            return Err(Error::Import {
                why: "an exported entry's kind is \"map\" or \"text\"",
            });
        }
    };
    if path != "/" {
        steps.push(Step::Entry {
            path: path.to_owned(),
            kind,
        });
    }
    match entry.get("fields") {
        Some(Value::Map(fields)) => {
            for (field, value) in fields {
                steps.push(Step::Field {
                    path: path.to_owned(),
                    field: field.clone(),
                    value: value.clone(),
                });
            }
        }
        None => {}
        Some(_) => {
            return Err(Error::Import {
                why: "an exported entry's fields are a map",
            });
        }
    }
    match entry.get("text") {
        Some(Value::Str(text)) if path != "/" => steps.push(Step::Text {
            path: path.to_owned(),
            text: text.clone(),
        }),
        None => {}
        Some(_) => {
            return Err(Error::Import {
                why: "an exported text is a string, and not the root's",
            });
        }
    }
    match entry.get("children") {
        Some(Value::Map(children)) => {
            for (name, c) in children {
                let Value::Map(c) = c else {
                    return Err(Error::Import {
                        why: "an exported child is an entry (a map)",
                    });
                };
                exported_steps(&child(path, name), c, steps)?;
            }
        }
        None => {}
        Some(_) => {
            return Err(Error::Import {
                why: "an exported entry's children are a map",
            });
        }
    }
    Ok(())
}

fn plain_steps(
    path: &str,
    map: &BTreeMap<String, Value>,
    steps: &mut Vec<Step>,
) -> Result<(), Error> {
    for (key, value) in map {
        match value {
            Value::Map(inner) => {
                if key.is_empty() || key.contains('/') {
                    return Err(Error::Import {
                        why: "a key holding an object names an entry: it cannot be empty or hold '/'",
                    });
                }
                let at = child(path, key);
                steps.push(Step::Entry {
                    path: at.clone(),
                    kind: EntryKind::Map,
                });
                plain_steps(&at, inner, steps)?;
            }
            _ => steps.push(Step::Field {
                path: path.to_owned(),
                field: key.clone(),
                value: value.clone(),
            }),
        }
    }
    Ok(())
}
