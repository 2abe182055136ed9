//! Moving a blob over a session, sans-IO: the two ends of a transfer as
//! state machines a driver feeds messages to and asks for its next ones.
//!
//! Flow control is a window of groups in flight, set by the side that
//! bears the cost: a [`Download`] asks for at most `window` groups it has
//! not received (`blob-need`), and asks for more as they land; an
//! [`Upload`] sends at most `window` groups the receiver has not confirmed,
//! and the receiver's `blob-need` (what it still lacks) confirms the rest.
//! So a transfer holds a window of groups in memory and in queues, never
//! the blob; a transfer cut off resumes from what the receiver holds.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::{Bitfield, BlobError, Outboard};

/// Groups in flight by default: 512 KiB. What is in flight sits ahead of
/// any sync frame on the connection; on loopback a window of 1 MiB moved
/// no faster (about 280 MiB/s either way) and held a small edit twice as
/// long as half of it did (`syncline-bench blobs`).
pub const DEFAULT_WINDOW: usize = 8;

/// Ranges of consecutive indices, from a sorted set.
fn ranges(indices: impl IntoIterator<Item = u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for i in indices {
        match out.last_mut() {
            Some(r) if r.end == i => r.end += 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// The receiving end of a download.
#[derive(Debug)]
pub struct Download {
    hash: [u8; 32],
    window: usize,
    /// Known once the sender's outboard arrived and checked.
    outboard: Option<Outboard>,
    held: Option<Bitfield>,
    /// Groups asked for and not yet received.
    asked: BTreeSet<u64>,
}

/// What [`Download::on_chunk`] made of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landed {
    /// A new group, checked: the driver stores it.
    New,
    /// A group held already (sent twice): nothing to store.
    Duplicate,
}

impl Download {
    /// A download of blob `hash`, `window` groups in flight at most.
    pub fn new(hash: [u8; 32], window: usize) -> Download {
        Download {
            hash,
            window: window.max(1),
            outboard: None,
            held: None,
            asked: BTreeSet::new(),
        }
    }

    /// The blob.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The sender's outboard (`blob-info`) arrived: checks it against the
    /// hash; `held` says which groups are here already (a resumed
    /// download).
    pub fn on_info(&mut self, outboard: &[u8], held: Option<Bitfield>) -> Result<(), BlobError> {
        let outboard = Outboard::decode(outboard)?;
        outboard.verify(&self.hash)?;
        let groups = outboard.groups();
        self.held = Some(match held {
            Some(h) if h.encode().len() == Bitfield::new(groups).encode().len() => h,
            _ => Bitfield::new(groups),
        });
        self.outboard = Some(outboard);
        Ok(())
    }

    /// The outboard, once checked.
    pub fn outboard(&self) -> Option<&Outboard> {
        self.outboard.as_ref()
    }

    /// The groups to ask for now (`blob-need`), filling the window with
    /// missing groups not asked for yet; `None` when there are none.
    pub fn next_request(&mut self) -> Option<Vec<Range<u64>>> {
        let held = self.held.as_ref()?;
        let room = self.window.saturating_sub(self.asked.len());
        if room == 0 {
            return None;
        }
        let wanted: Vec<u64> = held
            .missing()
            .into_iter()
            .flatten()
            .filter(|i| !self.asked.contains(i))
            .take(room)
            .collect();
        if wanted.is_empty() {
            return None;
        }
        self.asked.extend(wanted.iter().copied());
        Some(ranges(wanted))
    }

    /// Group `index` arrived: checks it against the outboard.
    pub fn on_chunk(&mut self, index: u64, bytes: &[u8]) -> Result<Landed, BlobError> {
        let (Some(outboard), Some(held)) = (&self.outboard, &mut self.held) else {
            return Err(BlobError::Range {
                index,
                why: "a group before the outboard",
            });
        };
        outboard.verify_group(&self.hash, index, bytes)?;
        self.asked.remove(&index);
        if held.has(index) {
            return Ok(Landed::Duplicate);
        }
        held.set(index);
        Ok(Landed::New)
    }

    /// The groups asked for and not received are asked again (after a
    /// reconnection, say).
    pub fn forget_asked(&mut self) {
        self.asked.clear();
    }

    /// Whether every group is here.
    pub fn is_complete(&self) -> bool {
        self.held.as_ref().is_some_and(Bitfield::is_complete)
    }

    /// Groups here, and in all (once known).
    pub fn progress(&self) -> (u64, Option<u64>) {
        match (&self.held, &self.outboard) {
            (Some(h), Some(o)) => (h.count(), Some(o.groups())),
            _ => (0, None),
        }
    }
}

/// The sending end of an upload. Each group goes out with a sequence
/// number (the envelope's correlation id); the receiver's `blob-need`
/// carries the last it had received when it wrote it, so a group sent
/// before that and still lacking was not taken (it is sent again), and one
/// sent after is still on its way.
#[derive(Debug)]
pub struct Upload {
    hash: [u8; 32],
    groups: u64,
    window: usize,
    /// What the receiver lacks, as it last said (`None` before it said).
    lacking: Option<BTreeSet<u64>>,
    /// Groups on their way, with the sequence number each went with.
    sent: BTreeMap<u64, u64>,
    next_seq: u64,
}

impl Upload {
    /// An upload of blob `hash` with `outboard`, `window` groups in flight
    /// at most.
    pub fn new(hash: [u8; 32], outboard: &Outboard, window: usize) -> Upload {
        Upload {
            hash,
            groups: outboard.groups(),
            window: window.max(1),
            lacking: None,
            sent: BTreeMap::new(),
            next_seq: 1,
        }
    }

    /// The blob.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The receiver said what it still lacks (`blob-need`), having
    /// received the groups sent up to sequence number `through`. Ranges
    /// past the blob are refused.
    pub fn on_need(&mut self, lacking: &[(u64, u64)], through: u64) -> Result<(), BlobError> {
        let mut set = BTreeSet::new();
        for &(start, end) in lacking {
            if end > self.groups || start >= end {
                return Err(BlobError::Range {
                    index: end,
                    why: "a range past the blob",
                });
            }
            set.extend(start..end);
        }
        self.sent
            .retain(|group, seq| *seq > through && set.contains(group));
        self.lacking = Some(set);
        Ok(())
    }

    /// The groups to send now, each with its sequence number: lacking
    /// ones not on their way, up to the window.
    pub fn next_groups(&mut self) -> Vec<(u64, u64)> {
        let Some(lacking) = &self.lacking else {
            return Vec::new();
        };
        let room = self.window.saturating_sub(self.sent.len());
        let next: Vec<u64> = lacking
            .iter()
            .copied()
            .filter(|i| !self.sent.contains_key(i))
            .take(room)
            .collect();
        next.into_iter()
            .map(|group| {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.sent.insert(group, seq);
                (group, seq)
            })
            .collect()
    }

    /// Whether the receiver holds the whole blob.
    pub fn is_done(&self) -> bool {
        self.lacking.as_ref().is_some_and(BTreeSet::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{GROUP_BYTES, group_range};

    fn blob(groups: usize) -> (Vec<u8>, [u8; 32], Outboard) {
        let data: Vec<u8> = (0..groups * GROUP_BYTES - 100)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (hash, outboard) = Outboard::of(&data);
        (data, hash, outboard)
    }

    fn group(data: &[u8], index: u64) -> &[u8] {
        let r = group_range(data.len() as u64, index);
        &data[r.start as usize..r.end as usize]
    }

    /// What a download still lacks, as `blob-need` ranges.
    fn lacking(d: &Download) -> Vec<(u64, u64)> {
        d.held
            .as_ref()
            .unwrap()
            .missing()
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    #[test]
    fn an_upload_fills_a_receiver_within_its_window_and_resumes_after_a_cut() {
        let (data, hash, outboard) = blob(40);
        let mut up = Upload::new(hash, &outboard, 8);
        let mut down = Download::new(hash, 8);
        down.on_info(&outboard.encode(), None).unwrap();
        assert!(
            up.next_groups().is_empty(),
            "nothing before the receiver speaks"
        );
        up.on_need(&lacking(&down), 0).unwrap();
        let mut through = 0;
        let mut rounds = 0;
        while !up.is_done() {
            let batch = up.next_groups();
            assert!(!batch.is_empty() && batch.len() <= 8, "the window holds");
            // The receiver answers halfway through a batch: what came
            // after is still on its way, not lost.
            let (first, rest) = batch.split_at(batch.len() / 2);
            for &(i, seq) in first {
                down.on_chunk(i, group(&data, i)).unwrap();
                through = seq;
            }
            up.on_need(&lacking(&down), through).unwrap();
            if rounds == 2 {
                // The connection is cut: what was on its way is gone, and
                // a new upload resumes from what the receiver holds.
                up = Upload::new(hash, &outboard, 8);
                up.on_need(&lacking(&down), 0).unwrap();
            } else {
                for &(i, seq) in rest {
                    down.on_chunk(i, group(&data, i)).unwrap();
                    through = seq;
                }
                up.on_need(&lacking(&down), through).unwrap();
            }
            rounds += 1;
            assert!(rounds < 100, "the upload stalls");
        }
        assert!(down.is_complete());
        // A corrupted group is refused, a repeated one is a duplicate.
        let mut bad = group(&data, 3).to_vec();
        bad[0] ^= 1;
        assert_eq!(down.on_chunk(3, &bad), Err(BlobError::Group(3)));
        assert_eq!(down.on_chunk(3, group(&data, 3)), Ok(Landed::Duplicate));
        assert!(up.on_need(&[(39, 41)], 0).is_err());
    }

    #[test]
    fn a_download_asks_a_window_at_a_time_and_resumes_from_what_it_holds() {
        let (data, hash, outboard) = blob(20);
        let mut down = Download::new(hash, 6);
        assert!(down.next_request().is_none(), "nothing before the outboard");
        let mut forged = outboard.encode();
        forged[20] ^= 1;
        assert!(down.on_info(&forged, None).is_err());
        // Resumed: groups 0..5 are here already.
        let mut held = Bitfield::new(outboard.groups());
        (0..5).for_each(|i| held.set(i));
        down.on_info(&outboard.encode(), Some(held)).unwrap();
        let one = |r: Range<u64>| Some(vec![r]);
        assert_eq!(down.next_request(), one(5..11));
        assert_eq!(down.next_request(), None, "the window is full");
        for i in 5..8 {
            assert_eq!(down.on_chunk(i, group(&data, i)), Ok(Landed::New));
        }
        assert_eq!(down.next_request(), one(11..14));
        // Cut off: what was asked and not received is asked again.
        down.forget_asked();
        assert_eq!(down.next_request(), one(8..14));
        for i in 8..20 {
            down.on_chunk(i, group(&data, i)).unwrap();
            let _ = down.next_request();
        }
        assert!(down.is_complete());
        assert_eq!(down.progress(), (20, Some(20)));
    }
}
