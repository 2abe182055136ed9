//! Fields: one multi-value register per (entry, field).
//!
//! A register keeps every write that no other write causally supersedes.
//! The newest by stamp (hlc, author, op index) is the value; the others are
//! concurrent losers, kept visible as conflicts until a write that has seen
//! them replaces them all. The kept set depends only on the writes and their
//! causal order, so any delivery order gives the same register.

use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::codec::mp::{Reader, Writer};
use crate::dag::NodeIdx;
use crate::value::Value;

use super::{Stamp, load_node, load_stamp, save_stamp};

/// One write to a field (`None`: the field was unset).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Write {
    pub(crate) stamp: Stamp,
    pub(crate) node: NodeIdx,
    pub(crate) value: Option<Value>,
}

/// The writes of one field not superseded by another, newest first.
#[derive(Clone, Debug, Default)]
pub(crate) struct Register {
    writes: Vec<Write>,
}

impl Register {
    /// Adds a write. `before(a, b)` tells whether node `a` is a strict
    /// causal ancestor of node `b`.
    pub(crate) fn write(&mut self, w: Write, before: &dyn Fn(NodeIdx, NodeIdx) -> bool) {
        let supersedes = |old: &Write, new: &Write| {
            if old.node == new.node {
                old.stamp < new.stamp // a later op of the same node
            } else {
                before(old.node, new.node)
            }
        };
        if self
            .writes
            .iter()
            .any(|e| e.stamp == w.stamp || supersedes(&w, e))
        {
            return; // A replay, or a write already superseded.
        }
        self.writes.retain(|e| !supersedes(e, &w));
        let at = self.writes.partition_point(|e| e.stamp > w.stamp);
        self.writes.insert(at, w);
    }

    /// The winning write.
    pub(crate) fn winner(&self) -> Option<&Write> {
        self.writes.first()
    }

    /// Concurrent writes that lost to the winner.
    pub(crate) fn losers(&self) -> &[Write] {
        self.writes.get(1..).unwrap_or(&[])
    }

    /// Every kept write's node (for edit-versus-delete checks).
    pub(crate) fn nodes(&self) -> impl Iterator<Item = NodeIdx> + '_ {
        self.writes.iter().map(|w| w.node)
    }
}

impl Register {
    pub(crate) fn save(&self, out: &mut Out) {
        out.u64(self.writes.len() as u64);
        for w in &self.writes {
            save_stamp(out, &w.stamp);
            out.u64(w.node as u64);
            out.bool(w.value.is_some());
            if let Some(v) = &w.value {
                let mut writer = Writer::new();
                v.encode(&mut writer);
                out.bytes(writer.as_bytes());
            }
        }
    }

    pub(crate) fn load(input: &mut In<'_>, nodes: NodeIdx) -> Read<Register> {
        let mut writes = Vec::new();
        for _ in 0..input.count(37)? {
            let stamp = load_stamp(input)?;
            let node = load_node(input, nodes)?;
            let value = if input.bool()? {
                let mut reader = Reader::new(input.bytes()?);
                let value =
                    Value::decode(&mut reader).map_err(|_| CheckpointError::Corrupt("value"))?;
                reader
                    .finish()
                    .map_err(|_| CheckpointError::Corrupt("value"))?;
                Some(value)
            } else {
                None
            };
            writes.push(Write { stamp, node, value });
        }
        Ok(Register { writes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::AuthorId;

    fn w(t: u64, node: NodeIdx, v: i64) -> Write {
        Write {
            stamp: Stamp {
                hlc: Hlc {
                    wall_ms: t,
                    counter: 0,
                },
                author: AuthorId([node as u8; 32]),
                op: 0,
            },
            node,
            value: Some(Value::Int(v)),
        }
    }

    #[test]
    fn concurrent_writes_stay_until_superseded() {
        // Nodes 0 and 1 are concurrent; node 2 has seen both.
        let before = |a: NodeIdx, b: NodeIdx| b == 2 && a < 2;
        let mut r = Register::default();
        r.write(w(5, 1, 1), &before);
        r.write(w(3, 0, 0), &before);
        assert_eq!(r.winner().unwrap().value, Some(Value::Int(1)));
        assert_eq!(r.losers().len(), 1);
        r.write(w(4, 2, 2), &before);
        assert_eq!(r.winner().unwrap().value, Some(Value::Int(2)));
        assert!(r.losers().is_empty());
        // A late, superseded write changes nothing.
        r.write(w(9, 0, 9), &before);
        assert_eq!(r.winner().unwrap().value, Some(Value::Int(2)));
    }
}
