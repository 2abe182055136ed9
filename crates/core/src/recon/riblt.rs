//! Rateless Invertible Bloom Lookup Tables (RIBLT): finding the symmetric
//! difference between two replicas' sets of node ids while sending about
//! 1.35–1.75 small symbols per differing element, whatever the sets' sizes.
//!
//! # What it is for
//!
//! Two replicas of a room each hold a set of node ids. One side streams the
//! *coded symbols* of its set; the other subtracts its own coded symbols of
//! the same indices and peels the result until the difference is fully
//! known. Neither side needs to know the size of the difference in advance:
//! the stream is rateless, so the sender keeps sending batches until the
//! receiver says it has decoded (or gives up).
//!
//! The scheme is the one of Yang, Gilad and Alizadeh, *Practical Rateless
//! Set Reconciliation*, SIGCOMM 2024, with the index mapping of their
//! reference Go implementation (`yangl1996/riblt`).
//!
//! # Elements and the index mapping
//!
//! An element is a [`Key`]: the first 16 bytes of a 32-byte BLAKE3 node id
//! ([`key_of`]), so keys are uniformly random. Each key maps to an infinite,
//! strictly increasing sequence of coded-symbol indices that starts at 0
//! (every element is in symbol 0, which is why an empty symbol 0 means the
//! whole difference is decoded). Index `i` is in the sequence with
//! probability about `1 / (1 + i/2)`, so the first `m` symbols hold about
//! `2·ln(m/2)` copies of each element: the density falls off just fast
//! enough that, whatever the difference size `d`, a prefix of about `1.35·d`
//! to `1.75·d` symbols has enough pure symbols to peel everything.
//!
//! The sequence is generated from a 64-bit seed by the reference
//! implementation's recurrence (see `Mapping::next`). It uses floating
//! point, which is nonetheless **deterministic on every platform**: the only
//! operations are `u64 -> f64` conversion, `+`, `*`, `/`, `sqrt` (each
//! exactly rounded to nearest-even by IEEE 754, and `f64::sqrt` is documented
//! by Rust as "the rounded infinite-precision result"), `ceil` (exact) and the
//! saturating, truncating `f64 -> u64` cast that Rust defines. Rust never
//! contracts `a * b + c` into a fused multiply-add on its own, and its x86
//! targets use SSE2 (no x87 excess precision). A test pins the first indices
//! of a fixed key so that any deviation fails loudly.
//!
//! The seed and the 64-bit checksum of a key are *non-linear* functions of
//! it (a splitmix64-style mixer over its two halves, with different
//! constants for each). That matters: were `checksum(a ^ b) ==
//! checksum(a) ^ checksum(b)`, the XOR of any set of keys would carry a
//! matching checksum and every symbol would look pure.
//!
//! # Coded symbols and their wire form
//!
//! A [`CodedSymbol`] is the XOR of the keys mapped to it, the XOR of their
//! checksums, and their count (elements added minus removed). On the wire it
//! is [`CodedSymbol::WIRE_BYTES`] = 25 bytes: 16 for the sum, 8 for the
//! checksum and **one for the count, sent modulo 256**. That loses nothing
//! the decoder needs. After subtracting the local symbol, a symbol's true
//! count is (remote-only elements in it) − (local-only elements in it); the
//! decoder uses it only
//! - to tell, for a symbol already shown pure by its checksum (the sum's
//!   checksum equals the checksum field, a 2^-64 accident otherwise), whether
//!   its single element is remote-only (+1) or local-only (−1), and
//!   1 and −1 stay distinct modulo 256; and
//! - to see that a symbol has become empty, which the sum and checksum being
//!   zero already show (the count being 0 mod 256 is an extra check).
//!
//! So all count arithmetic in the decoder is wrapping, and compared as `i8`.
//!
//! # Complexity
//!
//! - [`Sketch::add`] / [`Sketch::remove`]: about `2·ln(capacity/2)` symbol
//!   updates (≈ 21 for a capacity of 2^16), so a room's sketch is kept up to
//!   date incrementally and never re-encoded.
//! - [`Decoder`]: for a difference of `d` elements, about `1.35·d`–`1.75·d`
//!   symbols (25 bytes each) and `O(d · log capacity)` work and `O(d)` memory,
//!   independent of the sets' sizes: the local set enters only through its
//!   sketch's symbols, index by index.
//!
//! The checksum and mapping are not keyed: an adversary who can choose node
//! ids could make them collide and slow decoding down, but node ids are
//! BLAKE3 hashes of signed content, and a malformed stream can at worst make
//! the decoder return [`RibltError`] (it never panics or loops).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::ops::Range;

/// An element: the first 16 bytes of a node id.
pub type Key = [u8; 16];

/// The key of a node id (its first 16 bytes).
pub fn key_of(id: &[u8; 32]) -> Key {
    let mut key = [0; 16];
    key.copy_from_slice(&id[..16]);
    key
}

/// splitmix64's finalizer: a bijective, non-linear 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A non-linear 64-bit hash of a key; `k0`, `k1` select an independent-looking
/// function (the seed and the checksum use different ones).
fn hash_key(key: &Key, k0: u64, k1: u64) -> u64 {
    let (lo, hi) = key.split_at(8);
    let lo = u64::from_le_bytes(lo.try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(hi.try_into().expect("8 bytes"));
    mix64(mix64(lo ^ k0) ^ hi.wrapping_add(k1))
}

/// The checksum carried by a key in coded symbols.
fn checksum(key: &Key) -> u64 {
    hash_key(key, 0x9e37_79b9_7f4a_7c15, 0xd1b5_4a32_d192_ed03)
}

/// The seed of a key's index mapping.
fn seed(key: &Key) -> u64 {
    hash_key(key, 0x8cb9_2ba7_2f3d_8dd7, 0xa076_1d64_78bd_642f)
}

/// The sequence of coded-symbol indices an element maps to, after index 0
/// (which every element maps to).
#[derive(Clone, Copy, Debug)]
struct Mapping {
    prng: u64,
    last: u64,
}

impl Mapping {
    fn new(key: &Key) -> Mapping {
        Mapping {
            prng: seed(key),
            last: 0,
        }
    }

    /// The next index, as in the reference Go implementation: with `r`
    /// uniform in `[0, 2^64)`, the gap after `last` is drawn so that index
    /// `i` is hit with probability about `1 / (1 + i/2)`.
    ///
    /// Two departures, both invisible in practice: the gap is at least 1
    /// (the Go code can repeat an index when `r` rounds to `2^64`, with
    /// probability about 2^-54 per step), and the index saturates at
    /// `u64::MAX` instead of overflowing (far beyond any capacity).
    fn next(&mut self) -> u64 {
        let r = self.prng.wrapping_mul(0xda94_2042_e4dd_58b5);
        self.prng = r;
        let scale = (1u64 << 32) as f64 / ((r as f64) + 1.0).sqrt() - 1.0;
        let gap = ((self.last as f64 + 1.5) * scale).ceil() as u64;
        self.last = self.last.saturating_add(gap.max(1));
        self.last
    }
}

/// One coded symbol: the XOR of the keys mapped to it, the XOR of their
/// checksums, and how many were added minus removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodedSymbol {
    pub sum: Key,
    pub checksum: u64,
    pub count: i64,
}

impl CodedSymbol {
    /// Size of the wire form: sum, checksum (little-endian), count mod 256.
    pub const WIRE_BYTES: usize = 25;

    /// Append the 25-byte wire form (count mod 256).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sum);
        out.extend_from_slice(&self.checksum.to_le_bytes());
        // Truncation is the point: only the count mod 256 is sent.
        out.push(self.count as u8);
    }

    /// Read one from exactly 25 bytes (count becomes the signed byte value,
    /// i.e. in -128..=127). `None` if `bytes` is not 25 bytes long.
    pub fn decode(bytes: &[u8]) -> Option<CodedSymbol> {
        let bytes: &[u8; Self::WIRE_BYTES] = bytes.try_into().ok()?;
        let (sum, rest) = bytes.split_at(16);
        let (checksum, count) = rest.split_at(8);
        Some(CodedSymbol {
            sum: sum.try_into().ok()?,
            checksum: u64::from_le_bytes(checksum.try_into().ok()?),
            count: i64::from(count[0] as i8),
        })
    }

    /// XOR `key` (with checksum `hash`) in, adjusting the count by `delta`.
    fn apply(&mut self, key: &Key, hash: u64, delta: i64) {
        for (s, k) in self.sum.iter_mut().zip(key) {
            *s ^= k;
        }
        self.checksum ^= hash;
        self.count = self.count.wrapping_add(delta);
    }

    /// For a difference symbol: `Some(+1 or -1)` if it holds exactly one
    /// element (count ±1 mod 256 and a matching checksum), else `None`.
    fn pure_sign(&self) -> Option<i64> {
        match self.count as i8 {
            1 | -1 if checksum(&self.sum) == self.checksum => Some(i64::from(self.count as i8)),
            _ => None,
        }
    }

    /// For a difference symbol: whether it holds no element.
    fn is_empty(&self) -> bool {
        self.sum == [0; 16] && self.checksum == 0 && self.count as i8 == 0
    }
}

/// The first `capacity` coded symbols of a set, kept up to date as elements
/// are added or removed: O(log capacity) expected symbol updates per element
/// (≈ 2·ln(capacity/2)), so a room's sketch never needs re-encoding.
#[derive(Clone, PartialEq, Eq)]
pub struct Sketch {
    symbols: Vec<CodedSymbol>,
    len: i64,
}

impl fmt::Debug for Sketch {
    // The symbols themselves (up to megabytes) say nothing readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sketch")
            .field("capacity", &self.capacity())
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Sketch {
    /// An empty set's sketch; `capacity` is how many leading symbols are
    /// maintained, i.e. the most a peer can be sent (a difference of up to
    /// about `capacity / 1.75` elements decodes).
    pub fn new(capacity: usize) -> Sketch {
        Sketch {
            symbols: vec![CodedSymbol::default(); capacity],
            len: 0,
        }
    }

    /// How many leading symbols are maintained.
    pub fn capacity(&self) -> usize {
        self.symbols.len()
    }

    /// Elements in the set (adds minus removes; 0 if removes outnumber adds,
    /// which only a caller removing absent keys can cause).
    pub fn len(&self) -> u64 {
        self.len.max(0) as u64
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Add `key` (which must not already be in the set).
    pub fn add(&mut self, key: &Key) {
        self.len += 1;
        self.apply(key, 1);
    }

    /// Remove `key` (which must be in the set).
    pub fn remove(&mut self, key: &Key) {
        self.len -= 1;
        self.apply(key, -1);
    }

    fn apply(&mut self, key: &Key, delta: i64) {
        let hash = checksum(key);
        let mut mapping = Mapping::new(key);
        let mut index = 0;
        while let Some(symbol) = usize::try_from(index)
            .ok()
            .and_then(|i| self.symbols.get_mut(i))
        {
            symbol.apply(key, hash, delta);
            index = mapping.next();
        }
    }

    /// Coded symbols `range`, for sending.
    ///
    /// # Panics
    /// If `range` is not within `0..capacity`.
    pub fn symbols(&self, range: Range<usize>) -> &[CodedSymbol] {
        &self.symbols[range]
    }

    /// A probe of this sketch, for a peer to estimate the difference with
    /// before any symbol is sent: the low byte of the checksum of each
    /// symbol at [`probe_indices`].
    pub fn probe(&self) -> Vec<u8> {
        probe_indices(self.capacity())
            .map(|i| self.symbols[i].checksum as u8)
            .collect()
    }
}

/// The symbol indices a probe samples: 0, then from 1 each about 1.08
/// times the last, below `capacity` (119 for a capacity of 2^16). The
/// chance that a difference of `d` elements leaves symbol `i` empty is about
/// `(i / (i + 2))^d`, so which probed symbols are equal on both sides tells
/// `d` within a small factor.
pub fn probe_indices(capacity: usize) -> impl Iterator<Item = usize> {
    let mut next = Some(0usize);
    std::iter::from_fn(move || {
        let i = next.filter(|&i| i < capacity)?;
        next = Some((i * 27).div_ceil(25).max(i + 1));
        Some(i)
    })
}

/// The most likely size of the difference between `local`'s set and the
/// set whose sketch made `probe` (see [`Sketch::probe`]), at least 1 once
/// any probed symbol differs, and 0 when symbol 0 (which holds every
/// element) is equal. `None` if the probe does not fit the sketch.
///
/// Floating point here only sizes a first batch of symbols: nothing that
/// replicas must agree on depends on it.
pub fn estimate_difference(local: &Sketch, probe: &[u8]) -> Option<u64> {
    let indices: Vec<usize> = probe_indices(local.capacity()).collect();
    if probe.len() != indices.len() {
        return None;
    }
    let equal: Vec<(usize, bool)> = indices
        .iter()
        .zip(probe)
        .map(|(&i, &b)| (i, b == local.symbols[i].checksum as u8))
        .collect();
    if equal.first().is_some_and(|&(_, same)| same) {
        return Some(0);
    }
    // Maximum likelihood over a geometric grid of sizes. A symbol that
    // differs still shows an equal byte once in 256.
    let log_likelihood = |d: f64| -> f64 {
        equal
            .iter()
            .filter(|(i, _)| *i > 0)
            .map(|&(i, same)| {
                let empty = (i as f64 / (i as f64 + 2.0)).powf(d);
                let p_equal = empty + (1.0 - empty) / 256.0;
                if same {
                    p_equal.ln()
                } else {
                    (1.0 - p_equal).ln()
                }
            })
            .sum()
    };
    let mut best = (1.0f64, f64::NEG_INFINITY);
    let mut d = 1.0f64;
    while d <= 2.0 * local.capacity() as f64 {
        let l = log_likelihood(d);
        if l > best.1 {
            best = (d, l);
        }
        d *= 1.05;
    }
    Some(best.0.round().max(1.0) as u64)
}

/// Outcome of decoding, in the order elements were recovered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Difference {
    /// Keys in the remote set but not the local one.
    pub remote_only: Vec<Key>,
    /// Keys in the local set but not the remote one.
    pub local_only: Vec<Key>,
}

/// Why decoding cannot go on. Either way the caller falls back to another
/// strategy; the decoder refuses further symbols after `Inconsistent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RibltError {
    /// More symbols were fed than the local sketch maintains: the difference
    /// is too large for this capacity. Nothing was consumed.
    CapacityExceeded { capacity: usize, needed: usize },
    /// Symbol `index` cannot come from an honest encoder: it looked pure but
    /// its element does not map to it, was already recovered, or more
    /// elements were recovered than symbols received.
    Inconsistent { index: usize },
}

impl fmt::Display for RibltError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RibltError::CapacityExceeded { capacity, needed } => write!(
                f,
                "riblt: {needed} symbols needed but the local sketch keeps only {capacity}"
            ),
            RibltError::Inconsistent { index } => {
                write!(f, "riblt: coded symbol {index} is inconsistent")
            }
        }
    }
}

impl std::error::Error for RibltError {}

/// A recovered element, kept so that it can be removed from symbols that
/// arrive later.
#[derive(Clone, Debug)]
struct Recovered {
    key: Key,
    hash: u64,
    /// +1 remote-only, -1 local-only.
    sign: i64,
    /// Positioned so that `mapping.last` is the next index to remove it from.
    mapping: Mapping,
}

/// Decodes the difference between the remote set (whose coded symbols arrive
/// in order, in batches) and the local set (given as the local [`Sketch`],
/// whose symbols are subtracted index by index).
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    /// Received symbols minus local ones, minus every recovered element.
    symbols: Vec<CodedSymbol>,
    /// Recovered elements, in recovery order.
    recovered: Vec<Recovered>,
    /// Their keys, to reject a key recovered twice (a malformed stream could
    /// otherwise make peeling cycle).
    seen: HashSet<Key>,
    /// Min-heap of (next index an element maps to, position in `recovered`).
    window: BinaryHeap<Reverse<(u64, usize)>>,
    /// Symbols that may be pure, to peel.
    pending: Vec<usize>,
    failed: Option<RibltError>,
}

impl Decoder {
    /// A decoder that has seen no symbol.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Feed the next remote symbols (in order, starting at index 0), each
    /// paired with the local symbol of the same index from `local`, which
    /// must be the same sketch (unchanged) on every call.
    ///
    /// Returns `Err(CapacityExceeded)`, consuming nothing, if the total fed
    /// would exceed `local.capacity()`; `Err(Inconsistent)` if the stream
    /// cannot come from an honest encoder (then on every later call too).
    pub fn add_symbols(
        &mut self,
        remote: &[CodedSymbol],
        local: &Sketch,
    ) -> Result<(), RibltError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let needed = self.symbols.len() + remote.len();
        if needed > local.capacity() {
            return Err(RibltError::CapacityExceeded {
                capacity: local.capacity(),
                needed,
            });
        }
        for (remote, local) in remote.iter().zip(local.symbols(self.symbols.len()..needed)) {
            self.push_symbol(remote, local);
        }
        self.peel()
            .inspect_err(|err| self.failed = Some(err.clone()))
    }

    /// Append the difference symbol of the next index, with every recovered
    /// element that maps to it already removed.
    fn push_symbol(&mut self, remote: &CodedSymbol, local: &CodedSymbol) {
        let index = self.symbols.len();
        let mut symbol = CodedSymbol {
            sum: remote.sum,
            checksum: remote.checksum ^ local.checksum,
            count: remote.count.wrapping_sub(local.count),
        };
        // XOR in the local sum; checksum and count are already done.
        symbol.apply(&local.sum, 0, 0);
        while let Some(&Reverse((next, r))) = self.window.peek() {
            // Every entry is >= index: earlier indices were handled on arrival.
            if next != index as u64 {
                break;
            }
            self.window.pop();
            let element = &mut self.recovered[r];
            symbol.apply(&element.key, element.hash, -element.sign);
            self.window.push(Reverse((element.mapping.next(), r)));
        }
        self.symbols.push(symbol);
        if symbol.pure_sign().is_some() {
            self.pending.push(index);
        }
    }

    /// Peel pure symbols until none is left.
    fn peel(&mut self) -> Result<(), RibltError> {
        while let Some(index) = self.pending.pop() {
            // It may have changed since it was queued.
            let symbol = self.symbols[index];
            let Some(sign) = symbol.pure_sign() else {
                continue;
            };
            let key = symbol.sum;
            let mut mapping = Mapping::new(&key);
            // An honest pure symbol is one of its element's, and each
            // recovery empties a different symbol, so recoveries never
            // outnumber symbols received.
            let mut probe = mapping;
            let mut at = 0;
            while at < index as u64 {
                at = probe.next();
            }
            if at != index as u64
                || self.recovered.len() >= self.symbols.len()
                || !self.seen.insert(key)
            {
                return Err(RibltError::Inconsistent { index });
            }
            // Remove the element from every received symbol it maps to.
            let mut at = 0;
            while let Some(target) = usize::try_from(at)
                .ok()
                .and_then(|i| self.symbols.get_mut(i))
            {
                target.apply(&key, symbol.checksum, -sign);
                if target.pure_sign().is_some() {
                    self.pending.push(at as usize);
                }
                at = mapping.next();
            }
            self.window.push(Reverse((at, self.recovered.len())));
            self.recovered.push(Recovered {
                key,
                hash: symbol.checksum,
                sign,
                mapping,
            });
        }
        Ok(())
    }

    /// Whether the difference is fully decoded: symbol 0, which every
    /// element maps to, is empty after peeling.
    pub fn is_decoded(&self) -> bool {
        self.symbols.first().is_some_and(CodedSymbol::is_empty)
    }

    /// Symbols consumed so far.
    pub fn symbols_used(&self) -> usize {
        self.symbols.len()
    }

    /// The difference found so far (complete once [`Decoder::is_decoded`]).
    pub fn difference(&self) -> Difference {
        let mut difference = Difference::default();
        for element in &self.recovered {
            if element.sign > 0 {
                difference.remote_only.push(element.key);
            } else {
                difference.local_only.push(element.key);
            }
        }
        difference
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, seq::SliceRandom};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeSet;

    /// Two random sets: `common` shared keys, plus `remote_only` and
    /// `local_only` ones.
    struct Case {
        remote: Vec<Key>,
        local: Vec<Key>,
    }

    fn case(seed: u64, common: usize, remote_only: usize, local_only: usize) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut key = || rng.random::<Key>();
        let shared: Vec<Key> = (0..common).map(|_| key()).collect();
        let mut remote = shared.clone();
        remote.extend((0..remote_only).map(|_| key()));
        let mut local = shared;
        local.extend((0..local_only).map(|_| key()));
        Case { remote, local }
    }

    fn sketch(keys: &[Key], capacity: usize) -> Sketch {
        let mut sketch = Sketch::new(capacity);
        keys.iter().for_each(|k| sketch.add(k));
        sketch
    }

    /// The set difference computed the obvious way, sorted.
    fn brute_force(case: &Case) -> (Vec<Key>, Vec<Key>) {
        let remote: BTreeSet<Key> = case.remote.iter().copied().collect();
        let local: BTreeSet<Key> = case.local.iter().copied().collect();
        (
            remote.difference(&local).copied().collect(),
            local.difference(&remote).copied().collect(),
        )
    }

    fn sorted(mut keys: Vec<Key>) -> Vec<Key> {
        keys.sort_unstable();
        keys
    }

    /// Stream `remote`'s symbols in batches of `batch` (through the wire
    /// form if `wire`) until decoded or out of capacity.
    fn reconcile(
        remote: &Sketch,
        local: &Sketch,
        batch: usize,
        wire: bool,
    ) -> Result<Decoder, RibltError> {
        let mut decoder = Decoder::new();
        while !decoder.is_decoded() {
            let start = decoder.symbols_used();
            let end = (start + batch).min(remote.capacity());
            if start == end {
                // Out of symbols: asking for one more must fail.
                decoder.add_symbols(&[CodedSymbol::default()], local)?;
                unreachable!("fed beyond capacity");
            }
            let symbols = remote.symbols(start..end);
            if wire {
                let mut bytes = Vec::new();
                symbols.iter().for_each(|s| s.encode(&mut bytes));
                let received: Vec<CodedSymbol> = bytes
                    .chunks(CodedSymbol::WIRE_BYTES)
                    .map(|c| CodedSymbol::decode(c).expect("25 bytes"))
                    .collect();
                decoder.add_symbols(&received, local)?;
            } else {
                decoder.add_symbols(symbols, local)?;
            }
        }
        Ok(decoder)
    }

    fn check_case(case: &Case, capacity: usize, batch: usize, wire: bool) -> usize {
        let remote = sketch(&case.remote, capacity);
        let local = sketch(&case.local, capacity);
        let decoder = reconcile(&remote, &local, batch, wire).expect("decodes");
        let found = decoder.difference();
        let (remote_only, local_only) = brute_force(case);
        assert_eq!(sorted(found.remote_only), remote_only);
        assert_eq!(sorted(found.local_only), local_only);
        decoder.symbols_used()
    }

    #[test]
    fn matches_brute_force_on_random_sets() {
        let configs = [
            (0, 0, 0),
            (10_000, 0, 0),
            (10_000, 1, 0),
            (10_000, 0, 1),
            (10_000, 250, 250),
            (10_000, 500, 0),
            (0, 0, 500),
            (1_000, 100, 37),
            (5_000, 3, 400),
            (2_000, 17, 17),
        ];
        for (i, &(common, a, b)) in configs.iter().enumerate() {
            let seed = i as u64;
            let case = case(seed, common, a, b);
            for (batch, wire) in [(1, true), (7, false), (64, true), (1000, false)] {
                check_case(&case, 2048, batch, wire);
            }
        }
    }

    proptest! {
        #[test]
        fn matches_brute_force_small(
            seed: u64,
            common in 0usize..300,
            a in 0usize..40,
            b in 0usize..40,
            batch in 1usize..50,
            wire: bool,
        ) {
            check_case(&case(seed, common, a, b), 512, batch, wire);
        }

        #[test]
        fn wire_roundtrip(sum: [u8; 16], checksum: u64, count: i64) {
            let symbol = CodedSymbol { sum, checksum, count };
            let mut bytes = vec![0xAA];
            symbol.encode(&mut bytes);
            prop_assert_eq!(bytes.len(), 1 + CodedSymbol::WIRE_BYTES);
            let back = CodedSymbol::decode(&bytes[1..]).expect("25 bytes");
            prop_assert_eq!(back.sum, sum);
            prop_assert_eq!(back.checksum, checksum);
            prop_assert_eq!(back.count, i64::from(count as i8));
        }

        #[test]
        fn decode_of_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            match CodedSymbol::decode(&bytes) {
                Some(symbol) => {
                    let mut again = Vec::new();
                    symbol.encode(&mut again);
                    prop_assert_eq!(again, bytes);
                }
                None => prop_assert_ne!(bytes.len(), CodedSymbol::WIRE_BYTES),
            }
        }

        /// A corrupted stream (symbols overwritten by pure-looking symbols
        /// of random keys, zeroed, or duplicated) never panics or loops.
        #[test]
        fn decoder_survives_corrupted_streams(
            seed: u64,
            a in 0usize..30,
            b in 0usize..30,
            edits in proptest::collection::vec((0usize..64, 0u8..4, any::<Key>(), any::<i8>()), 1..20),
        ) {
            let case = case(seed, 50, a, b);
            let capacity = 64;
            let local = sketch(&case.local, capacity);
            let mut stream = sketch(&case.remote, capacity).symbols(0..capacity).to_vec();
            for (at, kind, key, count) in edits {
                stream[at] = match kind {
                    0 => CodedSymbol { sum: key, checksum: checksum(&key), count: i64::from(count.signum()) },
                    1 => CodedSymbol::default(),
                    2 => stream[(at * 7 + 3) % capacity],
                    _ => CodedSymbol { sum: key, checksum: checksum(&key), count: i64::from(count) },
                };
            }
            let mut decoder = Decoder::new();
            for chunk in stream.chunks(5) {
                if decoder.add_symbols(chunk, &local).is_err() {
                    break;
                }
            }
            let found = decoder.difference();
            prop_assert!(found.remote_only.len() + found.local_only.len() <= decoder.symbols_used());
        }
    }

    #[test]
    fn symbols_per_difference_for_d_1000() {
        let (d, seeds) = (1000, 20);
        let mut total = 0;
        for seed in 0..seeds {
            let case = case(1000 + seed, 1000, d / 2, d / 2);
            total += check_case(&case, 4096, 1, false);
        }
        let per_diff = total as f64 / (seeds as usize * d) as f64;
        eprintln!("d = {d}: {per_diff:.3} symbols per difference element ({seeds} seeds)");
        assert!((1.0..2.0).contains(&per_diff), "{per_diff}");
    }

    #[test]
    fn empty_difference_decodes_from_one_symbol() {
        let case = case(7, 300, 0, 0);
        assert_eq!(check_case(&case, 16, 1, true), 1);
    }

    #[test]
    fn feeding_after_decoding_changes_nothing() {
        let case = case(8, 200, 20, 10);
        let remote = sketch(&case.remote, 256);
        let local = sketch(&case.local, 256);
        let mut decoder = reconcile(&remote, &local, 1, false).unwrap();
        let found = decoder.difference();
        let used = decoder.symbols_used();
        decoder
            .add_symbols(remote.symbols(used..256), &local)
            .unwrap();
        assert!(decoder.is_decoded());
        assert_eq!(decoder.difference(), found);
    }

    #[test]
    fn a_probe_estimates_the_difference_within_a_small_factor() {
        let capacity = 1 << 16;
        let mut within = 0;
        let mut trials = 0;
        for d in [1usize, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000] {
            for seed in 0..6u64 {
                let case = case(seed * 31 + d as u64, 3_000, d.div_ceil(2), d / 2);
                let remote = sketch(&case.remote, capacity);
                let local = sketch(&case.local, capacity);
                let estimate = estimate_difference(&local, &remote.probe()).unwrap();
                let ratio = estimate as f64 / d as f64;
                trials += 1;
                within += usize::from((0.6..=1.6).contains(&ratio));
                assert!((0.25..=4.0).contains(&ratio), "d {d}: estimated {estimate}");
            }
        }
        assert!(
            within * 10 >= trials * 8,
            "{within} of {trials} within 0.6..1.6"
        );
        // Equal sets, and a probe that does not fit the sketch.
        let same = case(1, 500, 0, 0);
        let a = sketch(&same.remote, capacity);
        assert_eq!(
            estimate_difference(&a, &sketch(&same.local, capacity).probe()),
            Some(0)
        );
        assert_eq!(estimate_difference(&a, &[0; 3]), None);
        assert!(a.probe().len() <= 128, "{} bytes", a.probe().len());
    }

    #[test]
    fn stream_beyond_capacity_errors() {
        let case = case(9, 100, 60, 40);
        let remote = sketch(&case.remote, 16);
        let local = sketch(&case.local, 16);
        let mut decoder = Decoder::new();
        decoder.add_symbols(remote.symbols(0..16), &local).unwrap();
        assert!(!decoder.is_decoded());
        let err = decoder.add_symbols(&[CodedSymbol::default()], &local);
        assert_eq!(
            err,
            Err(RibltError::CapacityExceeded {
                capacity: 16,
                needed: 17
            })
        );
        assert_eq!(decoder.symbols_used(), 16);
        assert_eq!(
            reconcile(&remote, &local, 3, true).unwrap_err(),
            RibltError::CapacityExceeded {
                capacity: 16,
                needed: 17
            }
        );
        assert!(!err.unwrap_err().to_string().is_empty());
    }

    fn pure(key: &Key, count: i64) -> CodedSymbol {
        CodedSymbol {
            sum: *key,
            checksum: checksum(key),
            count,
        }
    }

    /// The indices below `limit` that `key` maps to.
    fn indices(key: &Key, limit: u64) -> Vec<u64> {
        let mut mapping = Mapping::new(key);
        std::iter::successors(Some(0), |_| Some(mapping.next()))
            .take_while(|&i| i < limit)
            .collect()
    }

    #[test]
    fn pure_symbol_its_key_does_not_map_to_is_inconsistent() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let key = std::iter::repeat_with(|| rng.random::<Key>())
            .find(|k| indices(k, 2) == [0])
            .unwrap();
        let local = Sketch::new(8);
        let mut decoder = Decoder::new();
        let stream = [CodedSymbol::default(), pure(&key, 1)];
        let err = RibltError::Inconsistent { index: 1 };
        assert_eq!(decoder.add_symbols(&stream, &local), Err(err.clone()));
        // Poisoned: later symbols are refused too.
        assert_eq!(decoder.add_symbols(&[], &local), Err(err));
    }

    #[test]
    fn key_recovered_twice_is_inconsistent() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let key: Key = rng.random();
        let second = indices(&key, 64)[1] as usize;
        // Symbol `second` holds the key "twice" (sum cancelled, count 2):
        // once the key is peeled from symbol 0 it looks pure again.
        let mut stream = vec![CodedSymbol::default(); second + 1];
        stream[0] = pure(&key, 1);
        stream[second].count = 2;
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder.add_symbols(&stream, &Sketch::new(64)),
            Err(RibltError::Inconsistent { index: second })
        );
    }

    #[test]
    fn counts_mod_256_still_decode() {
        // 300 shared keys: symbol 0 counts 300 vs 300 locally; wire sends 44.
        let case = case(12, 300, 2, 1);
        check_case(&case, 64, 1, true);
        let mut bytes = Vec::new();
        pure(&[1; 16], 300).encode(&mut bytes);
        assert_eq!(CodedSymbol::decode(&bytes).unwrap().count, 44);
        bytes.clear();
        pure(&[1; 16], -1).encode(&mut bytes);
        assert_eq!(CodedSymbol::decode(&bytes).unwrap().count, -1);
        assert_eq!(CodedSymbol::decode(&bytes[..24]), None);
    }

    #[test]
    fn incremental_equals_from_scratch() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let pool: Vec<Key> = (0..2000).map(|_| rng.random()).collect();
        let mut incremental = Sketch::new(1024);
        let mut members = HashSet::new();
        for _ in 0..10_000 {
            let key = pool[rng.random_range(0..pool.len())];
            if members.remove(&key) {
                incremental.remove(&key);
            } else {
                members.insert(key);
                incremental.add(&key);
            }
        }
        let mut fin: Vec<Key> = members.into_iter().collect();
        fin.shuffle(&mut rng);
        let scratch = sketch(&fin, 1024);
        assert_eq!(incremental.len(), fin.len() as u64);
        assert!(incremental == scratch);
        for key in &fin {
            incremental.remove(key);
        }
        assert!(incremental == Sketch::new(1024));
        assert!(incremental.is_empty());
    }

    #[test]
    fn sketch_accessors() {
        let mut s = Sketch::new(10);
        assert_eq!((s.capacity(), s.len()), (10, 0));
        s.add(&[3; 16]);
        assert_eq!(s.len(), 1);
        assert_eq!(s.symbols(0..1)[0], pure(&[3; 16], 1));
        assert!(s.symbols(3..10).len() == 7);
        assert!(format!("{s:?}").contains("capacity: 10"));
        let mut id = [0u8; 32];
        id.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        assert_eq!(key_of(&id), std::array::from_fn(|i| i as u8));
    }

    #[test]
    fn hashes_are_not_linear() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        for _ in 0..100 {
            let (a, b): (Key, Key) = (rng.random(), rng.random());
            let ab: Key = std::array::from_fn(|i| a[i] ^ b[i]);
            assert_ne!(checksum(&ab), checksum(&a) ^ checksum(&b));
            assert_ne!(seed(&ab), seed(&a) ^ seed(&b));
        }
    }

    const SEED_PIN: u64 = 0xf9a0_e99f_9930_8740;
    const CHECKSUM_PIN: u64 = 0x5e78_ad57_7ab0_6a72;
    const INDICES_PIN: [u64; 32] = [
        0, 1, 7, 11, 13, 24, 38, 53, 61, 208, 215, 237, 258, 943, 1220, 1246, 1380, 2163, 2572,
        7261, 7984, 8291, 12899, 54357, 141237, 150436, 176508, 202985, 472407, 557474, 606340,
        818049,
    ];
    /// Also what the Go reference (and Python's IEEE doubles) give.
    const RAW_PIN: [u64; 8] = [1, 2, 3, 6, 11, 19, 44, 116];

    /// Pinned values: a platform where the floating-point mapping (or the
    /// hashes) came out differently would fail here, not in the field.
    #[test]
    fn mapping_is_deterministic() {
        let key: Key = std::array::from_fn(|i| i as u8);
        assert_eq!(seed(&key), SEED_PIN);
        assert_eq!(checksum(&key), CHECKSUM_PIN);
        assert_eq!(indices(&key, 1 << 20), INDICES_PIN);
        // The Go recurrence from a raw state.
        let mut mapping = Mapping { prng: 1, last: 0 };
        let raw: Vec<u64> = (0..8).map(|_| mapping.next()).collect();
        assert_eq!(raw, RAW_PIN);
    }

    #[test]
    fn mapping_density_is_about_one_over_one_plus_half_i() {
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let keys = 20_000;
        let mut hits = vec![0u32; 1001];
        for _ in 0..keys {
            let key: Key = rng.random();
            let mut previous = None;
            for i in indices(&key, 1001) {
                assert!(previous < Some(i), "strictly increasing");
                previous = Some(i);
                hits[i as usize] += 1;
            }
        }
        assert_eq!(hits[0], keys);
        // Bands of indices, wide enough that sampling noise stays well
        // below the tolerance.
        for (lo, hi) in [
            (1, 2),
            (2, 3),
            (5, 6),
            (10, 11),
            (50, 60),
            (100, 120),
            (500, 600),
            (900, 1001),
        ] {
            let expected: f64 = (lo..hi).map(|i| 1.0 / (1.0 + i as f64 / 2.0)).sum();
            let seen = f64::from(hits[lo..hi].iter().sum::<u32>()) / f64::from(keys);
            assert!(
                (seen / expected - 1.0).abs() < 0.1,
                "indices {lo}..{hi}: {seen} vs {expected}"
            );
        }
    }
}
