//! The node ids a history keeps: not all of them. An id is 32 random bytes
//! per node, more than the rest of a keystroke's history, and it can always
//! be recomputed from the node's content and its parents' ids. So a history
//! keeps the id of each author's newest node once known (every head is
//! one; every author's next node cites it), an anchor every [`ANCHOR`]
//! nodes of each author chain, the id of every node another author's node
//! cites, and a bounded cache of ids met recently; any other id is
//! recomputed by walking its chain forward from the nearest known one
//! (`Dag::id`). Anchors are filled in as ids are met, so a history loaded
//! without them (or with fewer) gets them back as it is used.
//!
//! Keeping the ids cited across authors bounds that walk: computing an id
//! needs its parents' ids, and without them a walk back from one node of a
//! history where authors interleave (each citing the others' newest) would
//! fan out over everything since the last anchor of every author, tens of
//! thousands of nodes rehashed for one old id. With them, the walk follows
//! only the node's own chain, to the nearest anchor. What this costs is 32
//! bytes per switch of author along the history: nothing for one writer,
//! an id per node for writers that take strict turns.
//!
//! Local nodes are not hashed when committed: typing needs no id until a
//! node is sent, signed or cited, and then one walk hashes the nodes made
//! since the last one known, in order.

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::dag::NodeIdx;
use crate::ids::{IdMap, NodeId};

/// An author's nodes whose seq is a multiple of this keep their id.
pub(crate) const ANCHOR: u64 = 64;
/// A checkpoint saves the anchors at multiples of this (the others are
/// found again as ids are recomputed): 1 byte per 32 nodes on disk.
const SAVED_ANCHOR: u64 = 1024;
/// Recently met ids kept besides tips and anchors.
const CACHE: usize = 1024;
/// Marks an anchor not known yet (no real id is all zeros).
const UNKNOWN: NodeId = NodeId([0; 32]);

/// Tips, anchors and recently met ids: written through shared borrows,
/// since ids are recomputed while the history is only read.
#[derive(Clone, Debug, Default)]
struct Kept {
    /// Per author: the id of its newest node, or [`UNKNOWN`].
    tips: Vec<NodeId>,
    /// Per author: entry `k` is the id of its node `(k + 1) * ANCHOR`, or
    /// [`UNKNOWN`].
    anchors: Vec<Vec<NodeId>>,
    /// Ids of nodes another author's node cites.
    cited: IdMap<NodeIdx, NodeId>,
    cache: IdMap<NodeIdx, NodeId>,
    /// Cached entries, oldest first.
    order: VecDeque<NodeIdx>,
}

/// See the module docs.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ids {
    kept: RefCell<Kept>,
}

impl Ids {
    /// The id of node `idx` (seq `seq` of `author`, whose newest is
    /// `author_seq`), if kept.
    pub(crate) fn known(
        &self,
        idx: NodeIdx,
        author: u32,
        seq: u64,
        author_seq: u64,
    ) -> Option<NodeId> {
        let kept = self.kept.borrow();
        if seq == author_seq && kept.tips[author as usize] != UNKNOWN {
            return Some(kept.tips[author as usize]);
        }
        if seq.is_multiple_of(ANCHOR)
            && let Some(&id) = kept.anchors[author as usize].get((seq / ANCHOR - 1) as usize)
            && id != UNKNOWN
        {
            return Some(id);
        }
        kept.cited
            .get(&idx)
            .or_else(|| kept.cache.get(&idx))
            .copied()
    }

    /// Records that another author's node cites node `idx`, of id `id`.
    pub(crate) fn cited(&mut self, idx: NodeIdx, id: NodeId) {
        let kept = self.kept.get_mut();
        kept.cache.remove(&idx);
        kept.cited.insert(idx, id);
    }

    /// Records a node just inserted as its author's new tip, with its id
    /// if known (a received node's; a local one is hashed when needed).
    /// `prev` is the author's previous tip, whose id, if known, is cached.
    pub(crate) fn inserted(
        &mut self,
        idx: NodeIdx,
        author: u32,
        seq: u64,
        id: Option<NodeId>,
        prev: Option<NodeIdx>,
    ) {
        let kept = self.kept.get_mut();
        while kept.tips.len() <= author as usize {
            kept.tips.push(UNKNOWN);
            kept.anchors.push(Vec::new());
        }
        let old = std::mem::replace(&mut kept.tips[author as usize], UNKNOWN);
        if let Some(prev) = prev
            && old != UNKNOWN
        {
            self.learned(prev, author, seq - 1, old, false);
        }
        if let Some(id) = id {
            self.learned(idx, author, seq, id, true);
        }
    }

    /// Records an id computed or met: as its author's tip if `tip`, as an
    /// anchor, else cached.
    pub(crate) fn learned(&self, idx: NodeIdx, author: u32, seq: u64, id: NodeId, tip: bool) {
        let mut kept = self.kept.borrow_mut();
        if tip {
            kept.tips[author as usize] = id;
        }
        if seq.is_multiple_of(ANCHOR) {
            let slots = &mut kept.anchors[author as usize];
            let k = (seq / ANCHOR - 1) as usize;
            if slots.len() <= k {
                slots.resize(k + 1, UNKNOWN);
            }
            slots[k] = id;
            return;
        }
        if kept.cache.insert(idx, id).is_none() {
            kept.order.push_back(idx);
            if kept.order.len() > CACHE
                && let Some(old) = kept.order.pop_front()
            {
                kept.cache.remove(&old);
            }
        }
    }

    /// Saves the tips, the anchors at multiples of [`SAVED_ANCHOR`] and the
    /// ids cited across authors.
    pub(crate) fn save(&self, out: &mut Out) {
        let kept = self.kept.borrow();
        out.u64(kept.tips.len() as u64);
        for tip in &kept.tips {
            out.bool(*tip != UNKNOWN);
            if *tip != UNKNOWN {
                out.raw(&tip.0);
            }
        }
        let step = (SAVED_ANCHOR / ANCHOR) as usize;
        for slots in &kept.anchors {
            let saved: Vec<(usize, &NodeId)> = slots
                .iter()
                .enumerate()
                .skip(step - 1)
                .step_by(step)
                .filter(|(_, id)| **id != UNKNOWN)
                .collect();
            out.u64(saved.len() as u64);
            for (k, id) in saved {
                out.u64(k as u64);
                out.raw(&id.0);
            }
        }
        let mut cited: Vec<(&NodeIdx, &NodeId)> = kept.cited.iter().collect();
        cited.sort_unstable();
        out.u64(cited.len() as u64);
        let mut last = 0;
        for (&idx, id) in cited {
            out.u64(u64::from(idx - last));
            out.raw(&id.0);
            last = idx;
        }
    }

    /// Ids kept for `authors` authors and `nodes` nodes.
    pub(crate) fn load(input: &mut In<'_>, authors: usize, nodes: NodeIdx) -> Read<Ids> {
        let n = input.count(1)?;
        if n != authors {
            return Err(CheckpointError::Corrupt("tips"));
        }
        let mut kept = Kept::default();
        for _ in 0..n {
            let tip = if input.bool()? {
                NodeId(input.array()?)
            } else {
                UNKNOWN
            };
            kept.tips.push(tip);
        }
        for _ in 0..n {
            let mut slots = Vec::new();
            for _ in 0..input.count(33)? {
                let k = input.u32()? as usize;
                let id = NodeId(input.array()?);
                if k < slots.len() || k > 1 << 26 {
                    return Err(CheckpointError::Corrupt("anchors"));
                }
                slots.resize(k + 1, UNKNOWN);
                slots[k] = id;
            }
            kept.anchors.push(slots);
        }
        let mut idx: u64 = 0;
        for i in 0..input.count(33)? {
            let step = input.u64()?;
            idx = idx.saturating_add(step);
            if (i > 0 && step == 0) || idx >= u64::from(nodes) {
                return Err(CheckpointError::Corrupt("cited ids"));
            }
            kept.cited.insert(idx as NodeIdx, NodeId(input.array()?));
        }
        Ok(Ids {
            kept: RefCell::new(kept),
        })
    }

    /// Drops every cached id (memory figures then count only what a
    /// history must keep).
    pub(crate) fn forget_cache(&self) {
        let mut kept = self.kept.borrow_mut();
        kept.cache = IdMap::default();
        kept.order = VecDeque::new();
    }
}
