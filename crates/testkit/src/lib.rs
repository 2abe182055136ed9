//! Random edits of every kind a transaction can make (fields, by-path and
//! unique creates, moves, deletes, text), shared by the convergence tests
//! and the simulator. Edits stay within a small [`Namespace`] so that
//! concurrent edits collide often.

use rand::Rng;
use rand::seq::IndexedRandom;
use syncline_core::{EntryKind, Transaction, Value};

/// The paths, text entries and field names random edits use.
#[derive(Clone, Copy, Debug)]
pub struct Namespace {
    /// Map entries to set, move, delete and create.
    pub paths: &'static [&'static str],
    /// Text entries.
    pub texts: &'static [&'static str],
    /// Field names.
    pub fields: &'static [&'static str],
}

/// A random small value of every kind a field commonly holds.
pub fn random_value<R: Rng + ?Sized>(rng: &mut R) -> Value {
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

fn pick<R: Rng + ?Sized>(rng: &mut R, from: &[&'static str]) -> &'static str {
    from.choose(rng)
        .copied()
        .expect("a namespace lists at least one of each")
}

/// Makes one to three random operations in `tx` and returns how many it
/// tried. An operation that does not apply here (a path that does not
/// exist, a move into its own subtree) is skipped, as an app would report
/// and move on.
pub fn random_ops<R: Rng + ?Sized>(tx: &mut Transaction<'_>, rng: &mut R, ns: &Namespace) -> usize {
    let ops = rng.random_range(1..=3);
    for _ in 0..ops {
        let path = pick(rng, ns.paths);
        let _skipped = match rng.random_range(0..100) {
            0..25 => tx.set(path, pick(rng, ns.fields), random_value(rng)),
            25..30 => tx.unset(path, pick(rng, ns.fields)),
            30..36 => tx.mv(path, pick(rng, ns.paths)),
            36..40 => tx.delete(path),
            40..45 => tx
                .create_unique("/", "item", EntryKind::Map, Some(vec![rng.random()]))
                .map(|_| ()),
            45..80 => {
                let text = pick(rng, ns.texts);
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
                let text = pick(rng, ns.texts);
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
    ops
}
