//! Blobs verified as they stream: a blob is named by the BLAKE3 hash of its
//! bytes, cut into groups of [`GROUP_BYTES`] (64 KiB), and its **outboard**
//! holds the BLAKE3 chaining value of every group. A receiver first checks
//! the outboard against the blob's hash (the chaining values merge into
//! the root as BLAKE3's own tree does), then checks each group against its
//! chaining value as it arrives: a bad group is refused at once, never
//! after the whole blob, and any group can be fetched, in any order, which
//! is what resuming and range requests need. The outboard costs 32 bytes
//! per 64 KiB (0.05 %). A blob of one group has no outboard: the group is
//! checked against the hash itself.
//!
//! This module is sans-IO: it computes and checks; stores and transfers
//! use it.

pub mod transfer;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use thiserror::Error;

/// Bytes per group: the unit of transfer, verification and resumption.
pub const GROUP_BYTES: usize = 64 * 1024;

/// Largest blob: 1 TiB (the outboard of one is 512 MiB; stores bound
/// what they accept far below this).
pub const MAX_BLOB_BYTES: u64 = 1 << 40;

/// Why a blob, an outboard or a group was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum BlobError {
    /// The outboard's chaining values do not merge into the blob's hash.
    #[error("the outboard does not match the blob's hash")]
    Outboard,
    /// The outboard's bytes do not decode, or not for this size.
    #[error("malformed outboard: {0}")]
    Malformed(&'static str),
    /// A group whose bytes do not hash to its chaining value.
    #[error("group {0} does not match the blob's hash")]
    Group(u64),
    /// A group index past the blob's end, or a group of the wrong length.
    #[error("group {index}: {why}")]
    Range {
        /// The group.
        index: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A blob larger than [`MAX_BLOB_BYTES`].
    #[error("a blob of {0} bytes is larger than the largest allowed")]
    TooLarge(u64),
}

/// How many groups a blob of `size` bytes has (an empty blob has one,
/// empty, group).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES as u64).max(1)
}

/// The bytes group `index` of a blob of `size` covers.
pub fn group_range(size: u64, index: u64) -> std::ops::Range<u64> {
    let start = index * GROUP_BYTES as u64;
    start.min(size)..(start + GROUP_BYTES as u64).min(size)
}

/// The chaining value of group `index` (its bytes `group`) of a blob of
/// more than one group.
fn group_cv(index: u64, group: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(index * GROUP_BYTES as u64)
        .update(group)
        .finalize_non_root()
}

/// A blob's outboard: its size and, for a blob of more than one group, the
/// chaining value of each group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outboard {
    size: u64,
    cvs: Vec<ChainingValue>,
}

impl Outboard {
    /// The outboard of `bytes` and their hash (for blobs held in memory;
    /// [`OutboardBuilder`] streams).
    pub fn of(bytes: &[u8]) -> ([u8; 32], Outboard) {
        let mut builder = OutboardBuilder::new();
        for group in bytes.chunks(GROUP_BYTES) {
            builder.push(group);
        }
        builder.finish()
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its groups.
    pub fn groups(&self) -> u64 {
        group_count(self.size)
    }

    /// Checks that this outboard belongs to the blob named `hash`.
    pub fn verify(&self, hash: &[u8; 32]) -> Result<(), BlobError> {
        if self.size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge(self.size));
        }
        if self.groups() == 1 {
            // Checked group by group against the hash itself.
            return if self.cvs.is_empty() {
                Ok(())
            } else {
                Err(BlobError::Malformed("a blob of one group has no outboard"))
            };
        }
        if self.cvs.len() as u64 != self.groups() {
            return Err(BlobError::Malformed("one chaining value per group"));
        }
        let root = merge_root(&self.cvs, self.size);
        if root == *hash {
            Ok(())
        } else {
            Err(BlobError::Outboard)
        }
    }

    /// Checks group `index`'s bytes, given that [`Outboard::verify`]
    /// accepted this outboard for `hash`.
    pub fn verify_group(&self, hash: &[u8; 32], index: u64, group: &[u8]) -> Result<(), BlobError> {
        if index >= self.groups() {
            return Err(BlobError::Range {
                index,
                why: "past the blob's end",
            });
        }
        let range = group_range(self.size, index);
        if group.len() as u64 != range.end - range.start {
            return Err(BlobError::Range {
                index,
                why: "not the group's length",
            });
        }
        let ok = if self.groups() == 1 {
            blake3::hash(group).as_bytes() == hash
        } else {
            group_cv(index, group) == self.cvs[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(BlobError::Group(index))
        }
    }

    /// The outboard as bytes: the size (8 bytes, big-endian), then the
    /// chaining values.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.cvs.len());
        out.extend_from_slice(&self.size.to_be_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// Reads what [`Outboard::encode`] wrote (not yet checked against a
    /// hash: see [`Outboard::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Outboard, BlobError> {
        let (size, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or(BlobError::Malformed("shorter than its size"))?;
        let size = u64::from_be_bytes(*size);
        if size > MAX_BLOB_BYTES {
            return Err(BlobError::TooLarge(size));
        }
        let groups = group_count(size);
        let expected = if groups == 1 { 0 } else { groups as usize * 32 };
        if rest.len() != expected {
            return Err(BlobError::Malformed("not one chaining value per group"));
        }
        let cvs = rest
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32-byte chunks"))
            .collect();
        Ok(Outboard { size, cvs })
    }
}

/// The root hash of groups `cvs`, covering `len` bytes (more than one
/// group), merged as BLAKE3's tree merges them: the left subtree is the
/// largest power of two of chunks (hence of whole groups) shorter than the
/// whole.
fn merge_root(cvs: &[ChainingValue], len: u64) -> [u8; 32] {
    let left = left_subtree_len(len);
    let split = (left / GROUP_BYTES as u64) as usize;
    merge_subtrees_root(
        &merge(&cvs[..split], left),
        &merge(&cvs[split..], len - left),
        Mode::Hash,
    )
    .into()
}

/// The chaining value of the subtree of groups `cvs` covering `len` bytes.
fn merge(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let split = (left / GROUP_BYTES as u64) as usize;
    merge_subtrees_non_root(
        &merge(&cvs[..split], left),
        &merge(&cvs[split..], len - left),
        Mode::Hash,
    )
}

/// Builds a blob's outboard and hash from its groups in order, holding one
/// chaining value per group (a 1 GiB blob: 512 KiB).
#[derive(Debug, Default)]
pub struct OutboardBuilder {
    size: u64,
    cvs: Vec<ChainingValue>,
    /// The first group, kept until a second shows the blob has several.
    first: Option<Vec<u8>>,
}

impl OutboardBuilder {
    /// An empty builder.
    pub fn new() -> OutboardBuilder {
        OutboardBuilder::default()
    }

    /// Adds the next group: [`GROUP_BYTES`] bytes, or fewer for the last.
    pub fn push(&mut self, group: &[u8]) {
        debug_assert!(
            self.size.is_multiple_of(GROUP_BYTES as u64) && group.len() <= GROUP_BYTES,
            "groups are whole but for the last"
        );
        let index = self.size / GROUP_BYTES as u64;
        if index == 0 {
            self.first = Some(group.to_vec());
        } else {
            if let Some(first) = self.first.take() {
                self.cvs.push(group_cv(0, &first));
            }
            self.cvs.push(group_cv(index, group));
        }
        self.size += group.len() as u64;
    }

    /// The blob's hash and outboard.
    pub fn finish(self) -> ([u8; 32], Outboard) {
        match self.first {
            // One group (or none): its hash is the blob's.
            Some(first) => (
                *blake3::hash(&first).as_bytes(),
                Outboard {
                    size: self.size,
                    cvs: Vec::new(),
                },
            ),
            None if self.cvs.is_empty() => (
                *blake3::hash(&[]).as_bytes(),
                Outboard {
                    size: 0,
                    cvs: Vec::new(),
                },
            ),
            None => {
                let outboard = Outboard {
                    size: self.size,
                    cvs: self.cvs,
                };
                (merge_root(&outboard.cvs, outboard.size), outboard)
            }
        }
    }
}

/// Which groups of a blob are held: one bit per group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitfield {
    groups: u64,
    bits: Vec<u64>,
}

impl Bitfield {
    /// None of `groups` held.
    pub fn new(groups: u64) -> Bitfield {
        Bitfield {
            groups,
            bits: vec![0; groups.div_ceil(64) as usize],
        }
    }

    /// Whether group `index` is held.
    pub fn has(&self, index: u64) -> bool {
        index < self.groups && self.bits[(index / 64) as usize] >> (index % 64) & 1 == 1
    }

    /// Marks group `index` held.
    pub fn set(&mut self, index: u64) {
        if index < self.groups {
            self.bits[(index / 64) as usize] |= 1 << (index % 64);
        }
    }

    /// Groups held.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether every group is held.
    pub fn is_complete(&self) -> bool {
        self.count() == self.groups
    }

    /// The groups not held, as ranges of indices.
    pub fn missing(&self) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for index in (0..self.groups).filter(|&i| !self.has(i)) {
            match out.last_mut() {
                Some(r) if r.end == index => r.end += 1,
                _ => out.push(index..index + 1),
            }
        }
        out
    }

    /// The bits as bytes (little-endian words).
    pub fn encode(&self) -> Vec<u8> {
        self.bits.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Reads what [`Bitfield::encode`] wrote for a blob of `groups`.
    pub fn decode(groups: u64, bytes: &[u8]) -> Result<Bitfield, BlobError> {
        let words = groups.div_ceil(64) as usize;
        if bytes.len() != words * 8 {
            return Err(BlobError::Malformed("bitfield of another length"));
        }
        let mut field = Bitfield {
            groups,
            bits: bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunks")))
                .collect(),
        };
        // Bits past the last group mean nothing.
        if let Some(last) = field.bits.last_mut()
            && !groups.is_multiple_of(64)
        {
            *last &= (1 << (groups % 64)) - 1;
        }
        Ok(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes.
    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[test]
    fn outboards_merge_into_blake3_hashes_of_every_shape() {
        let g = GROUP_BYTES;
        for len in [
            0,
            1,
            1024,
            g - 1,
            g,
            g + 1,
            2 * g,
            2 * g + 7,
            3 * g,
            4 * g,
            5 * g - 1,
            7 * g + 3,
            8 * g,
            9 * g + 1,
            33 * g + 100,
        ] {
            let data = bytes(len, 7);
            let (hash, outboard) = Outboard::of(&data);
            assert_eq!(hash, *blake3::hash(&data).as_bytes(), "len {len}");
            assert_eq!(outboard.size(), len as u64);
            outboard.verify(&hash).unwrap();
            let decoded = Outboard::decode(&outboard.encode()).unwrap();
            assert_eq!(decoded, outboard);
            for (i, group) in data.chunks(g).enumerate() {
                outboard.verify_group(&hash, i as u64, group).unwrap();
            }
            if len == 0 {
                outboard.verify_group(&hash, 0, &[]).unwrap();
            }
        }
    }

    #[test]
    fn a_changed_byte_fails_its_group_and_a_forged_outboard_fails_at_once() {
        let data = bytes(5 * GROUP_BYTES + 10, 3);
        let (hash, outboard) = Outboard::of(&data);
        let mut bad = data[2 * GROUP_BYTES..3 * GROUP_BYTES].to_vec();
        bad[100] ^= 1;
        assert_eq!(
            outboard.verify_group(&hash, 2, &bad),
            Err(BlobError::Group(2))
        );
        // Another blob's outboard.
        let (_, other) = Outboard::of(&bytes(5 * GROUP_BYTES + 10, 4));
        assert_eq!(other.verify(&hash), Err(BlobError::Outboard));
        // A group of the wrong length, or past the end.
        assert!(matches!(
            outboard.verify_group(&hash, 5, &data[5 * GROUP_BYTES..]),
            Ok(())
        ));
        assert!(matches!(
            outboard.verify_group(&hash, 6, &[]),
            Err(BlobError::Range { .. })
        ));
        assert!(matches!(
            outboard.verify_group(&hash, 1, &data[..10]),
            Err(BlobError::Range { .. })
        ));
        // A one-group blob checks against the hash itself.
        let small = bytes(300, 1);
        let (h, o) = Outboard::of(&small);
        assert_eq!(o.encode().len(), 8);
        assert_eq!(
            o.verify_group(&h, 0, &bytes(300, 2)),
            Err(BlobError::Group(0))
        );
        assert!(Outboard::decode(&[0; 5]).is_err());
        assert!(Outboard::decode(&o.encode()[..7]).is_err());
    }

    #[test]
    fn bitfields_track_and_list_what_is_missing() {
        let mut field = Bitfield::new(130);
        for i in [0, 1, 2, 64, 129] {
            field.set(i);
        }
        assert_eq!(field.count(), 5);
        assert_eq!(field.missing(), [3..64, 65..129]);
        let again = Bitfield::decode(130, &field.encode()).unwrap();
        assert_eq!(again, field);
        assert!(!again.is_complete());
        assert!(Bitfield::decode(130, &[0; 8]).is_err());
        let mut all = Bitfield::new(3);
        (0..3).for_each(|i| all.set(i));
        assert!(all.is_complete() && all.missing().is_empty());
    }
}
