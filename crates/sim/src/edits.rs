//! Random edits of every kind a transaction can make: fields, by-path and
//! unique creates, moves, deletes and text, on a small namespace so that
//! concurrent edits collide often.

use rand::seq::IndexedRandom;
use rand::{Rng, RngCore};
use syncline_core::room::TxnError;
use syncline_core::{EntryKind, Transaction, Value};

const PATHS: [&str; 8] = [
    "/a",
    "/a/b",
    "/a/b/c",
    "/d",
    "/d/e",
    "/projects/alpha",
    "/projects/beta",
    "/projects/alpha/notes",
];
const TEXTS: [&str; 2] = ["/t1", "/projects/alpha/doc"];
const FIELDS: [&str; 3] = ["x", "y", "title"];

fn random_value(rng: &mut dyn RngCore) -> Value {
    match rng.random_range(0..5) {
        0 => Value::Int(rng.random_range(-5..5)),
        1 => Value::Str(format!("s{}", rng.random_range(0..9))),
        2 => Value::Bool(rng.random()),
        3 => Value::Vector(syncline_core::Vector::quantize(&[
            rng.random(),
            rng.random(),
        ])),
        _ => Value::Null,
    }
}

/// Makes one to three random operations in `tx`. An operation that does
/// not apply here (a path that does not exist, a move into its own
/// subtree) is skipped, as an app would report and move on.
pub(crate) fn random_ops(tx: &mut Transaction<'_>, rng: &mut dyn RngCore) -> Result<(), TxnError> {
    for _ in 0..rng.random_range(1..=3) {
        let path = *PATHS.choose(rng).expect("not empty");
        let _skipped = match rng.random_range(0..100) {
            0..25 => tx.set(
                path,
                FIELDS.choose(rng).expect("not empty"),
                random_value(rng),
            ),
            25..30 => tx.unset(path, FIELDS.choose(rng).expect("not empty")),
            30..36 => tx.mv(path, PATHS.choose(rng).expect("not empty")),
            36..40 => tx.delete(path),
            40..45 => tx
                .create_unique("/", "item", EntryKind::Map, Some(vec![rng.random()]))
                .map(|_| ()),
            45..80 => {
                let text = *TEXTS.choose(rng).expect("not empty");
                let len = tx
                    .doc()
                    .resolve(text)
                    .map_or(0, |id| tx.doc().text_len(&id));
                let pos = rng.random_range(0..=len);
                let s: String = (0..rng.random_range(1..6))
                    .map(|_| rng.random_range(b'a'..=b'z') as char)
                    .collect();
                tx.text_insert(text, pos, &s)
            }
            80..95 => {
                let text = *TEXTS.choose(rng).expect("not empty");
                let len = tx
                    .doc()
                    .resolve(text)
                    .map_or(0, |id| tx.doc().text_len(&id));
                if len == 0 {
                    continue;
                }
                let pos = rng.random_range(0..len);
                tx.text_delete(text, pos, rng.random_range(1..=(len - pos).min(4)))
            }
            _ => tx.ensure(path, EntryKind::Map).map(|_| ()),
        };
    }
    Ok(())
}
