//! Local numbers of the characters of a room's history ([`Lv`]): node `n`'s
//! inserted characters (across all its text operations, in order) are
//! `base(n)..base(n) + count(n)`, numbered as nodes are applied. Consecutive
//! keystrokes, one node each, get consecutive numbers, which is what lets
//! the text sequence store runs instead of characters.
//!
//! A column of one byte per node (its count; 255 escapes to a side table)
//! with the running total every [`CHUNK`] nodes: a lookup sums at most
//! `CHUNK - 1` bytes.

use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::dag::NodeIdx;
use crate::doc::seq::Lv;
use crate::ids::IdMap;

/// Nodes per chunk.
const CHUNK: usize = 16;
/// A count byte that means "see `large`".
const ESCAPE: u8 = u8::MAX;

/// See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Chars {
    /// Per chunk: the number of its first node's first character.
    bases: Vec<Lv>,
    /// Per node: characters it inserted, or [`ESCAPE`].
    counts: Vec<u8>,
    /// Counts of [`ESCAPE`] or more.
    large: IdMap<NodeIdx, u32>,
    /// The next number to give out.
    total: Lv,
    /// The last node's first number: typing cites the keystroke before,
    /// which this answers without a lookup.
    last_base: Lv,
}

impl Chars {
    /// Nodes numbered so far.
    pub(crate) fn len(&self) -> NodeIdx {
        self.counts.len() as NodeIdx
    }

    /// The first number of the node being applied (the next one).
    pub(crate) fn next_base(&self) -> Lv {
        self.total
    }

    /// Numbers the next node's `count` characters. `None` (and none
    /// numbered) if the room would pass `Lv::MAX - 1` characters (see
    /// [`crate::limits::MAX_ROOM_CHARS`]).
    pub(crate) fn push(&mut self, count: u32) -> Option<Lv> {
        let base = self.total;
        let fits = u64::from(base) + u64::from(count) < u64::from(Lv::MAX);
        let count = if fits { count } else { 0 };
        if self.counts.len().is_multiple_of(CHUNK) {
            self.bases.push(base);
        }
        if count >= u32::from(ESCAPE) {
            self.large.insert(self.len(), count);
            self.counts.push(ESCAPE);
        } else {
            self.counts.push(count as u8);
        }
        self.total = base + count;
        self.last_base = base;
        fits.then_some(base)
    }

    fn count_at(&self, n: usize) -> u32 {
        match self.counts[n] {
            ESCAPE => self.large[&(n as NodeIdx)],
            c => u32::from(c),
        }
    }

    /// Node `node`'s first number and how many characters it inserted.
    pub(crate) fn range(&self, node: NodeIdx) -> (Lv, u32) {
        let n = node as usize;
        if n + 1 == self.counts.len() {
            return (self.last_base, self.total - self.last_base);
        }
        let chunk = n / CHUNK;
        let base = self.bases[chunk] + (chunk * CHUNK..n).map(|i| self.count_at(i)).sum::<u32>();
        (base, self.count_at(n))
    }

    /// The number of character `index` of node `node`, if it inserted one.
    pub(crate) fn lv(&self, node: NodeIdx, index: u32) -> Option<Lv> {
        let (base, count) = self.range(node);
        (index < count).then(|| base + index)
    }

    /// The node that inserted character `lv`, and the character's index
    /// in it.
    pub(crate) fn node_of(&self, lv: Lv) -> Option<(NodeIdx, u32)> {
        if lv >= self.total {
            return None;
        }
        if lv >= self.last_base {
            return Some((self.len() - 1, lv - self.last_base));
        }
        let chunk = self.bases.partition_point(|&b| b <= lv) - 1;
        let mut base = self.bases[chunk];
        for n in chunk * CHUNK..self.counts.len() {
            let count = self.count_at(n);
            if lv < base + count {
                return Some((n as NodeIdx, lv - base));
            }
            base += count;
        }
        None
    }
}

impl Chars {
    pub(crate) fn save(&self, out: &mut Out) {
        out.bytes(&self.counts);
        let mut large: Vec<(&NodeIdx, &u32)> = self.large.iter().collect();
        large.sort_unstable();
        out.u64(large.len() as u64);
        for (node, count) in large {
            out.u64(*node as u64);
            out.u64(*count as u64);
        }
    }

    /// The numbering of `nodes` nodes (the running totals are recomputed).
    pub(crate) fn load(input: &mut In<'_>, nodes: NodeIdx) -> Read<Chars> {
        let bad = || CheckpointError::Corrupt("character numbering");
        let counts = input.bytes()?;
        if counts.len() != nodes as usize {
            return Err(bad());
        }
        let mut large = IdMap::default();
        for _ in 0..input.count(2)? {
            let node = input.u32()?;
            let count = input.u32()?;
            if counts.get(node as usize) != Some(&ESCAPE) || count < u32::from(ESCAPE) {
                return Err(bad());
            }
            large.insert(node, count);
        }
        let mut chars = Chars::default();
        for (n, &c) in counts.iter().enumerate() {
            let count = match c {
                ESCAPE => *large.get(&(n as NodeIdx)).ok_or_else(bad)?,
                c => u32::from(c),
            };
            chars.push(count).ok_or_else(bad)?;
        }
        Ok(chars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_nodes() {
        let mut chars = Chars::default();
        let counts = [
            1u32, 0, 3, 1, 1, 0, 0, 300, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 5,
        ];
        let mut bases = Vec::new();
        for &c in &counts {
            bases.push(chars.push(c).unwrap());
        }
        for (n, &c) in counts.iter().enumerate() {
            assert_eq!(chars.range(n as NodeIdx), (bases[n], c));
            for i in 0..c {
                assert_eq!(chars.lv(n as NodeIdx, i), Some(bases[n] + i));
                assert_eq!(chars.node_of(bases[n] + i), Some((n as NodeIdx, i)));
            }
            assert_eq!(chars.lv(n as NodeIdx, c), None);
        }
        assert_eq!(chars.node_of(chars.next_base()), None);
        // Past the limit, a node gets no numbers.
        assert_eq!(chars.push(u32::MAX), None);
        assert_eq!(chars.range(chars.len() - 1).1, 0);
    }
}
