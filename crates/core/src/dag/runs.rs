//! The per-node metadata of a history, run-length encoded along author
//! chains: a *run* is a stretch of consecutive node numbers by one author,
//! each node after the first citing only its predecessor, with seq and
//! lamport one more than its predecessor's (a typing burst: the common case
//! by far). Only a run's first node stores its seq, lamport and parents;
//! the others are implied, as in packs. Clocks are not implied (wall time
//! moves unevenly), so they go to a column of small deltas, in chunks that
//! a lookup decodes from their start.
//!
//! A history typed by one author is a single run whatever its length; an
//! interleaving of authors costs one run (40 bytes) per switch, which is
//! still less than the id alone that a node-per-row layout keeps.

use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::codec::varint;
use crate::dag::NodeIdx;
use crate::hlc::Hlc;
use crate::node::NodeFormat;

/// Nodes per chunk of the clock column.
const HLC_CHUNK: usize = 64;

/// Consecutive nodes of one author; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// First node.
    pub(crate) start: NodeIdx,
    /// Nodes in the run.
    pub(crate) len: u32,
    /// Author number.
    pub(crate) author: u32,
    /// Where the first node's parents are in `Runs::parents`.
    pub(crate) parents_at: u32,
    /// How many parents the first node has.
    pub(crate) parents_len: u16,
    /// Format of every node of the run.
    pub(crate) format: NodeFormat,
    /// Seq of the first node.
    pub(crate) seq: u64,
    /// Lamport of the first node.
    pub(crate) lamport: u64,
}

/// The parents of one node: a stored list, or the node before it.
#[derive(Clone, Copy, Debug)]
pub struct Parents<'a> {
    one: [NodeIdx; 1],
    stored: Option<&'a [NodeIdx]>,
}

impl std::ops::Deref for Parents<'_> {
    type Target = [NodeIdx];

    fn deref(&self) -> &[NodeIdx] {
        self.stored.unwrap_or(&self.one)
    }
}

/// Clocks of every node: per chunk the first clock in full and a byte
/// offset, then zigzag wall deltas and counters as varints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct HlcColumn {
    /// Per chunk: the clock of its first node and where its bytes start.
    pub(crate) chunks: Vec<(Hlc, u32)>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) len: usize,
    /// The newest clock (the next delta's base).
    pub(crate) last: Hlc,
}

impl HlcColumn {
    pub(crate) fn push(&mut self, hlc: Hlc) {
        if self.len.is_multiple_of(HLC_CHUNK) {
            self.chunks.push((hlc, self.bytes.len() as u32));
        } else {
            varint::put_signed(
                &mut self.bytes,
                hlc.wall_ms.wrapping_sub(self.last.wall_ms) as i64,
            );
            varint::put(&mut self.bytes, hlc.counter as u64);
        }
        self.last = hlc;
        self.len += 1;
    }

    pub(crate) fn get(&self, i: usize) -> Hlc {
        debug_assert!(i < self.len);
        if i + 1 == self.len {
            return self.last;
        }
        let (mut hlc, at) = self.chunks[i / HLC_CHUNK];
        let mut c = varint::Cursor::new(&self.bytes[at as usize..]);
        for _ in 0..i % HLC_CHUNK {
            // The column is written only by `push`: it always decodes.
            let wall = c.get_signed().unwrap_or_default();
            let counter = c.get().unwrap_or_default();
            hlc = Hlc {
                wall_ms: hlc.wall_ms.wrapping_add(wall as u64),
                counter: counter as u32,
            };
        }
        hlc
    }
}

/// Run-length encoded metadata of every node of a history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Runs {
    pub(crate) runs: Vec<Run>,
    /// Parents of each run's first node.
    pub(crate) parents: Vec<NodeIdx>,
    /// Per author: its runs (indices into `runs`), in seq order.
    pub(crate) chains: Vec<Vec<u32>>,
    pub(crate) hlc: HlcColumn,
}

impl Runs {
    pub(crate) fn len(&self) -> NodeIdx {
        self.runs.last().map_or(0, |r| r.start + r.len)
    }

    /// Appends node `len()`. The caller has validated it: `seq` follows the
    /// author's chain and `lamport` its parents.
    pub(crate) fn push(
        &mut self,
        author: u32,
        format: NodeFormat,
        seq: u64,
        lamport: u64,
        hlc: Hlc,
        parents: &[NodeIdx],
    ) -> NodeIdx {
        let idx = self.len();
        self.hlc.push(hlc);
        if let Some(last) = self.runs.last_mut() {
            let extends = last.author == author
                && last.format == format
                && parents == [idx - 1]
                && last.seq + last.len as u64 == seq
                && last.lamport + last.len as u64 == lamport;
            if extends {
                last.len += 1;
                return idx;
            }
        }
        while self.chains.len() <= author as usize {
            self.chains.push(Vec::new());
        }
        self.chains[author as usize].push(self.runs.len() as u32);
        self.runs.push(Run {
            start: idx,
            len: 1,
            author,
            parents_at: self.parents.len() as u32,
            parents_len: parents.len() as u16,
            format,
            seq,
            lamport,
        });
        self.parents.extend_from_slice(parents);
        idx
    }

    /// The run holding node `idx`.
    pub(crate) fn run(&self, idx: NodeIdx) -> &Run {
        debug_assert!(idx < self.len());
        &self.runs[self.runs.partition_point(|r| r.start <= idx) - 1]
    }

    pub(crate) fn author(&self, idx: NodeIdx) -> u32 {
        self.run(idx).author
    }

    pub(crate) fn format(&self, idx: NodeIdx) -> NodeFormat {
        self.run(idx).format
    }

    pub(crate) fn seq(&self, idx: NodeIdx) -> u64 {
        let r = self.run(idx);
        r.seq + (idx - r.start) as u64
    }

    pub(crate) fn lamport(&self, idx: NodeIdx) -> u64 {
        let r = self.run(idx);
        r.lamport + (idx - r.start) as u64
    }

    pub(crate) fn hlc(&self, idx: NodeIdx) -> Hlc {
        self.hlc.get(idx as usize)
    }

    pub(crate) fn parents(&self, idx: NodeIdx) -> Parents<'_> {
        let r = self.run(idx);
        if idx == r.start {
            let at = r.parents_at as usize;
            Parents {
                one: [0],
                stored: Some(&self.parents[at..at + r.parents_len as usize]),
            }
        } else {
            Parents {
                one: [idx - 1],
                stored: None,
            }
        }
    }

    /// The node of `author` with `seq`, if held.
    pub(crate) fn by_author_seq(&self, author: u32, seq: u64) -> Option<NodeIdx> {
        let chain = self.chains.get(author as usize)?;
        let i = chain.partition_point(|&r| self.runs[r as usize].seq <= seq);
        let r = &self.runs[*chain.get(i.checked_sub(1)?)? as usize];
        let offset = seq - r.seq;
        (offset < r.len as u64).then(|| r.start + offset as NodeIdx)
    }

    /// The highest seq held of `author` (0 if none).
    pub(crate) fn author_seq(&self, author: u32) -> u64 {
        self.chains
            .get(author as usize)
            .and_then(|c| c.last())
            .map_or(0, |&r| {
                let r = &self.runs[r as usize];
                r.seq + r.len as u64 - 1
            })
    }

    /// Every node of `author` after `seq`, in seq order.
    pub(crate) fn chain_after(&self, author: u32, seq: u64) -> impl Iterator<Item = NodeIdx> + '_ {
        self.chains
            .get(author as usize)
            .into_iter()
            .flatten()
            .flat_map(move |&r| {
                let r = &self.runs[r as usize];
                let skip = (seq + 1).saturating_sub(r.seq).min(r.len as u64) as u32;
                r.start + skip..r.start + r.len
            })
    }
}

impl HlcColumn {
    /// Saves the column; chunk starts go as differences from the chunk
    /// before (clocks and byte offsets both grow steadily), which compress
    /// to almost nothing.
    pub(crate) fn save(&self, out: &mut Out) {
        out.u64(self.len as u64);
        out.u64(self.chunks.len() as u64);
        let (mut wall, mut at) = (0u64, 0u32);
        for (hlc, start) in &self.chunks {
            out.i64(hlc.wall_ms.wrapping_sub(wall) as i64);
            out.u64(u64::from(hlc.counter));
            out.u64(u64::from(start - at));
            (wall, at) = (hlc.wall_ms, *start);
        }
        out.bytes(&self.bytes);
        out.hlc(self.last);
    }

    pub(crate) fn load(input: &mut In<'_>) -> Read<HlcColumn> {
        let len = input.u64()? as usize;
        let n = input.count(3)?;
        let mut chunks = Vec::with_capacity(n);
        let (mut wall, mut at) = (0u64, 0u32);
        for _ in 0..n {
            wall = wall.wrapping_add(input.i64()? as u64);
            let counter = input.u32()?;
            at = at
                .checked_add(input.u32()?)
                .ok_or(CheckpointError::Corrupt("clock column"))?;
            chunks.push((
                Hlc {
                    wall_ms: wall,
                    counter,
                },
                at,
            ));
        }
        let bytes = input.bytes()?.to_vec();
        let last = input.hlc()?;
        let column = HlcColumn {
            chunks,
            bytes,
            len,
            last,
        };
        let consistent = column.chunks.len() == len.div_ceil(HLC_CHUNK)
            && column
                .chunks
                .iter()
                .all(|(_, at)| *at as usize <= column.bytes.len());
        if !consistent {
            return Err(CheckpointError::Corrupt("clock column"));
        }
        Ok(column)
    }
}

impl Runs {
    pub(crate) fn save(&self, out: &mut Out) {
        out.u64(self.runs.len() as u64);
        for r in &self.runs {
            out.u64(r.len as u64);
            out.u64(r.author as u64);
            out.bool(r.format == NodeFormat::V1);
            out.u64(r.seq);
            out.u64(r.lamport);
            let at = r.parents_at as usize;
            let parents = &self.parents[at..at + r.parents_len as usize];
            out.u64(parents.len() as u64);
            for &p in parents {
                // Back from the run's first node: small numbers.
                out.u64((r.start - p) as u64);
            }
        }
        self.hlc.save(out);
    }

    /// Runs covering exactly `nodes` nodes by at most `authors` authors.
    pub(crate) fn load(input: &mut In<'_>, nodes: NodeIdx, authors: usize) -> Read<Runs> {
        let bad = |what| CheckpointError::Corrupt(what);
        let n = input.count(6)?;
        let mut runs = Runs::default();
        let mut start: NodeIdx = 0;
        for _ in 0..n {
            let len = input.u32()?;
            let author = input.u32()?;
            let format = if input.bool()? {
                NodeFormat::V1
            } else {
                NodeFormat::V2
            };
            let seq = input.u64()?;
            let lamport = input.u64()?;
            let parents_len = input.count(1)?;
            if len == 0 || author as usize >= authors || parents_len > crate::limits::MAX_PARENTS {
                return Err(bad("run"));
            }
            let parents_at = runs.parents.len() as u32;
            for _ in 0..parents_len {
                let back = input.u32()?;
                if back == 0 || back > start {
                    return Err(bad("run parent"));
                }
                runs.parents.push(start - back);
            }
            while runs.chains.len() <= author as usize {
                runs.chains.push(Vec::new());
            }
            runs.chains[author as usize].push(runs.runs.len() as u32);
            runs.runs.push(Run {
                start,
                len,
                author,
                parents_at,
                parents_len: parents_len as u16,
                format,
                seq,
                lamport,
            });
            start = start.checked_add(len).ok_or(bad("run length"))?;
        }
        runs.hlc = HlcColumn::load(input)?;
        if start != nodes || runs.hlc.len != nodes as usize {
            return Err(bad("runs do not cover the checkpoint's nodes"));
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hlc(wall_ms: u64, counter: u32) -> Hlc {
        Hlc { wall_ms, counter }
    }

    #[test]
    fn typing_is_one_run_and_interleaving_splits() {
        let mut runs = Runs::default();
        let v2 = NodeFormat::V2;
        assert_eq!(runs.push(0, v2, 1, 1, hlc(10, 0), &[]), 0);
        for i in 1..100u32 {
            runs.push(
                0,
                v2,
                1 + i as u64,
                1 + i as u64,
                hlc(10 + i as u64, 0),
                &[i - 1],
            );
        }
        assert_eq!(runs.runs.len(), 1);
        // Another author citing node 50, then the first author merging.
        runs.push(1, v2, 1, 51, hlc(5, 3), &[50]);
        runs.push(0, v2, 101, 101, hlc(200, 0), &[99, 100]);
        runs.push(0, v2, 102, 102, hlc(199, 7), &[101]);
        assert_eq!(runs.runs.len(), 3);
        assert_eq!(runs.len(), 103);
        assert_eq!(runs.seq(42), 43);
        assert_eq!(runs.lamport(102), 102);
        assert_eq!(runs.author(100), 1);
        assert_eq!(&*runs.parents(0), &[] as &[NodeIdx]);
        assert_eq!(&*runs.parents(42), &[41]);
        assert_eq!(&*runs.parents(101), &[99, 100]);
        assert_eq!(&*runs.parents(102), &[101]);
        assert_eq!(runs.by_author_seq(0, 101), Some(101));
        assert_eq!(runs.by_author_seq(0, 100), Some(99));
        assert_eq!(runs.by_author_seq(0, 103), None);
        assert_eq!(runs.by_author_seq(1, 1), Some(100));
        assert_eq!(runs.by_author_seq(2, 1), None);
        assert_eq!(runs.author_seq(0), 102);
        assert_eq!(
            runs.chain_after(0, 99).collect::<Vec<_>>(),
            vec![99, 101, 102]
        );
        for i in 0..100 {
            assert_eq!(runs.hlc(i), hlc(10 + i as u64, 0));
        }
        assert_eq!(runs.hlc(100), hlc(5, 3));
        assert_eq!(runs.hlc(102), hlc(199, 7));
    }
}
