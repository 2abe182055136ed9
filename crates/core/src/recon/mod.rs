//! Reconciliation: finding what two replicas' histories lack from each other
//! (`docs/protocol.md` section 5.2). The baseline (heads and version vectors)
//! lives on the DAG; this module holds the set-difference structures used
//! when version vectors would cost more than the difference itself.

pub mod mst;
pub mod riblt;

use crate::dag::{Dag, NodeIdx};
use crate::ids::{IdMap, IdSet, NodeId};

/// Sketch capacity a room keeps: enough symbols to decode differences of
/// about 40,000 nodes before falling back to the MST.
pub const SKETCH_CAPACITY: usize = 1 << 16;

/// A node named by the first 8 bytes of its id (of its RIBLT key and its
/// MST key alike), as `ibf-done`, `mst-done` and MST key lists name nodes:
/// ids are uniform hashes, so two of a room sharing a prefix are a 2^-64
/// accident per pair, and cost only an extra node sent.
pub type KeyPrefix = [u8; 8];

/// The prefix of an id-derived key (a 16-byte RIBLT key or a 32-byte id).
pub fn key_prefix<const N: usize>(key: &[u8; N]) -> KeyPrefix {
    key[..8].try_into().expect("keys are at least 8 bytes")
}

/// A room's reconciliation structures, built from its DAG the first time a
/// sync needs them and then kept up to date as nodes are inserted. They are
/// not built eagerly because their upkeep (about 0.7 µs per node for the
/// sketch, 8 µs for the tree) would dominate local editing.
#[derive(Clone, Debug, Default)]
pub struct ReconIndex {
    sketch: Option<riblt::Sketch>,
    tree: Option<mst::Mst>,
    /// Key prefixes (the first 8 bytes of ids) back to nodes.
    by_key: IdMap<u64, NodeIdx>,
    /// Nodes whose key prefix another node had first (almost never).
    collided: Vec<(u64, NodeIdx)>,
    /// Nodes indexed so far (a prefix of the DAG's insertion order).
    indexed: NodeIdx,
}

impl ReconIndex {
    /// Brings every enabled structure up to date with `dag`.
    pub fn catch_up(&mut self, dag: &Dag) {
        for idx in self.indexed..dag.next_idx() {
            let id = dag.id(idx);
            let key = riblt::key_of(&id.0);
            let prefix = u64::from_le_bytes(key_prefix(&key));
            if let Some(&first) = self.by_key.get(&prefix) {
                self.collided.push((prefix, first));
            }
            self.by_key.insert(prefix, idx);
            if let Some(s) = &mut self.sketch {
                s.add(&key);
            }
            if let Some(t) = &mut self.tree {
                t.insert(id.0);
            }
        }
        self.indexed = dag.next_idx();
    }

    /// The RIBLT sketch of every node in `dag`.
    pub fn sketch(&mut self, dag: &Dag) -> &riblt::Sketch {
        if self.sketch.is_none() {
            let mut s = riblt::Sketch::new(SKETCH_CAPACITY);
            for idx in 0..self.indexed {
                s.add(&riblt::key_of(&dag.id(idx).0));
            }
            self.sketch = Some(s);
        }
        self.catch_up(dag);
        self.sketch.as_ref().expect("built above")
    }

    /// The Merkle Search Tree of every node id in `dag`.
    pub fn tree(&mut self, dag: &Dag) -> &mst::Mst {
        if self.tree.is_none() {
            let mut t = mst::Mst::new();
            for idx in 0..self.indexed {
                t.insert(dag.id(idx).0);
            }
            self.tree = Some(t);
        }
        self.catch_up(dag);
        self.tree.as_ref().expect("built above")
    }

    /// The nodes a peer named by id (unknown ids are skipped), in causal
    /// order.
    pub fn nodes_for_ids(&mut self, dag: &Dag, ids: &[NodeId]) -> Vec<NodeIdx> {
        let prefixes: Vec<KeyPrefix> = ids.iter().map(|id| key_prefix(&id.0)).collect();
        let mut out = self.nodes_for_key_prefixes(dag, &prefixes);
        let wanted: IdSet<&NodeId> = ids.iter().collect();
        out.retain(|&idx| wanted.contains(&dag.id(idx)));
        out
    }

    /// The nodes a peer named by RIBLT key prefix, in causal order
    /// (unknown prefixes are skipped: a node only the peer holds, or a
    /// forged name; a prefix two nodes share names both).
    pub fn nodes_for_key_prefixes(&mut self, dag: &Dag, prefixes: &[KeyPrefix]) -> Vec<NodeIdx> {
        self.catch_up(dag);
        let mut out = Vec::with_capacity(prefixes.len());
        for prefix in prefixes {
            let prefix = u64::from_le_bytes(*prefix);
            out.extend(self.by_key.get(&prefix).copied());
            out.extend(
                self.collided
                    .iter()
                    .filter(|(p, _)| *p == prefix)
                    .map(|&(_, idx)| idx),
            );
        }
        out.sort_unstable();
        out.dedup();
        dag.sort_causal(&mut out);
        out
    }
}
