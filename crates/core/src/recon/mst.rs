//! Merkle Search Tree (MST) over a set of 32-byte keys, and a sans-IO
//! reconciliation driver that finds the symmetric difference of two replicas'
//! sets by comparing subtree hashes top-down.
//!
//! # The tree
//!
//! This is a true Merkle Search Tree as described by Auvolat & Taïani,
//! "Merkle Search Trees: Efficient State-Based CRDTs in Open Networks"
//! (SRDS 2019), the structure atproto's repository sync also uses.
//!
//! * Every key has a **level**: the number of leading zero base-16 digits
//!   (nibbles) of BLAKE3(domain tag ‖ key), so a key is at level `>= l` with
//!   probability `16^-l`. The hash is needed even though keys are already
//!   uniform BLAKE3 ids: the key's *own* leading nibbles also decide where it
//!   sorts, so all high-level keys would sit at the low end of the key space
//!   and the tree would degenerate into a chain down its right edge (measured:
//!   a 10^4-key range summary listed all 9 375 level-0 keys). Any nibbles of
//!   the hash work; the leading ones match the paper. The hash is unkeyed, so
//!   ids can be ground for a high level (a BLAKE3 per try, no signature);
//!   that is harmless: a high level only makes the shape lumpier (a bigger top
//!   node, more entries in one summary), never wrong; the hashes and the
//!   reconciliation are correct for any shape. One extra 59-byte hash per
//!   insert is negligible next to rehashing the path.
//! * A tree node holds all keys of one level `L` that lie between two
//!   consecutive keys of higher level, in sorted order, with a child subtree in
//!   each gap (before the first key, between keys, after the last key). A child
//!   is the MST of the keys in its gap, so its root level is the highest level
//!   present in the gap (levels with no keys are skipped, there are no empty
//!   nodes); an empty gap has no child.
//! * A node's hash is BLAKE3 over a domain tag, its level, and for each slot
//!   the child's hash (or 32 zero bytes for no child) followed by the key,
//!   then the last child's hash. The empty set hashes to `[0; 32]`.
//!
//! Because levels depend only on the keys, the root is the node of the highest
//! level, its keys are exactly the keys of that level, and each gap recursively
//! holds the MST of the keys in it: the shape is a function of the *set* alone,
//! so the insertion order does not matter and equal sets have equal root
//! hashes. Expected depth is `log16 n` (about 4 for `10^4` keys) and nodes hold
//! about 16 keys.
//!
//! # Complexity
//!
//! * [`Mst::insert`] and [`Mst::contains`] walk one root-to-leaf path. Insert
//!   splits at most one path in two and rehashes the nodes it touched:
//!   `O(depth)` nodes of `O(16)` slots each.
//! * [`Mst::root_hash`] is `O(1)`: every node caches its hash.
//! * [`Mst::range_hash`] (the hash of the MST of the keys in a range) reuses
//!   the cached hashes of the subtrees fully inside the range and only rehashes
//!   the nodes along the two boundary paths: `O(depth)` nodes.
//!
//! # Reconciliation
//!
//! Both sides need to compare *the same* key ranges, although their trees
//! differ. The hash of a range is therefore defined on the set, not on either
//! tree: `range_hash(r)` is the root hash of the MST of the keys in `r`, which
//! each side computes from its own tree as above. The responder decides where
//! to split: to summarize a range `[s, e)` holding more than
//! [`SUMMARY_KEY_LIMIT`] keys, it takes the keys of the highest level in the
//! open interval `(s, e)` (the keys of the top node of its tree restricted to
//! the range), `b1 < … < bm`, and sends the sub-ranges `[s, b1), [b1, b2), …,
//! [bm, e)` with their range hashes. Smaller ranges are sent as the keys
//! themselves. The initiator recurses only into the sub-ranges whose hash
//! differs from its own hash of the same sub-range, and diffs key lists
//! directly. Each sub-range's open interior only contains keys of a strictly
//! lower level than the parent's split level, so the number of round trips is
//! bounded by the number of levels (about the tree depth), and the bytes sent
//! are `O(d · 16 · depth)` hashes plus at most [`SUMMARY_KEY_LIMIT`] keys per
//! differing leaf range, for `d` differences.
//!
//! The result is exact: a sub-range is skipped only when the two sides' hashes
//! are equal, which (BLAKE3 being collision resistant) means the sets in it are
//! equal; every other range is refined until it is compared key by key.

use std::cmp::Ordering;
use std::fmt;

use super::{KeyPrefix, key_prefix};

/// A key of the set: a 32-byte BLAKE3 node id.
pub type Key = [u8; 32];
/// A BLAKE3 hash of a (sub)tree.
pub type Hash = [u8; 32];
/// A range hash as summaries carry it: its first 16 bytes (a collision
/// still takes about 2^64 work).
pub type ShortHash = [u8; 16];

/// The first 16 bytes of a hash.
pub fn short_hash(hash: &Hash) -> ShortHash {
    hash[..16].try_into().expect("16 of 32 bytes")
}

/// The hash of the empty set (and of an absent child).
const EMPTY_HASH: Hash = [0; 32];

/// Domain separation so a node hash cannot be confused with any other BLAKE3
/// use in Syncline (node ids, pack hashes).
const NODE_DOMAIN: &[u8] = b"syncline/recon/mst/node/v1";

/// A summary covering at most this many keys is sent as the keys themselves;
/// a bigger one is split into sub-ranges. A split costs about 16 hashes and
/// 16 boundaries per level, so listing a few dozen keys is cheaper than
/// another round trip; measured at `n = 10^4`, limits from 32 to 256 send
/// within 20% of the same bytes, and 64 keeps a key list at 2 KiB.
pub const SUMMARY_KEY_LIMIT: usize = 64;

/// Domain separation for the level hash.
const LEVEL_DOMAIN: &[u8] = b"syncline/recon/mst/level/v1";

/// The level of a key: the number of leading zero nibbles of a hash of it.
///
/// Not of the key itself: the leading nibbles also decide where the key sorts,
/// so every high-level key would sit at the low end of the key space and the
/// tree would degenerate into a chain along its right edge.
fn level_of(key: &Key) -> u8 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(LEVEL_DOMAIN);
    hasher.update(key);
    leading_zero_nibbles(hasher.finalize().as_bytes())
}

fn leading_zero_nibbles(bytes: &[u8; 32]) -> u8 {
    let mut count = 0;
    for &byte in bytes {
        if byte == 0 {
            count += 2;
            continue;
        }
        if byte < 0x10 {
            count += 1;
        }
        break;
    }
    count
}

/// Hash of a node of `level` with `keys` and the child hashes given by slot
/// index (`0..=keys.len()`). Shared by the cached node hashes and by
/// [`Mst::range_hash`], which must agree exactly.
fn node_hash(level: u8, keys: &[Key], child_hash: impl Fn(usize) -> Hash) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(NODE_DOMAIN);
    hasher.update(&[level]);
    for (slot, key) in keys.iter().enumerate() {
        hasher.update(&child_hash(slot));
        hasher.update(key);
    }
    hasher.update(&child_hash(keys.len()));
    *hasher.finalize().as_bytes()
}

type Child = Option<Box<Node>>;

fn child_hash(child: &Child) -> Hash {
    child.as_ref().map_or(EMPTY_HASH, |node| node.hash)
}

/// One MST node. Invariants: `keys` sorted and all of level `level`;
/// `children.len() == keys.len() + 1`; `children[i]` holds exactly the keys
/// strictly between `keys[i - 1]` and `keys[i]` (all of lower level);
/// `hash` is the node hash of all of that.
#[derive(Clone, Debug)]
struct Node {
    level: u8,
    keys: Vec<Key>,
    children: Vec<Child>,
    hash: Hash,
}

impl Node {
    fn new(level: u8, keys: Vec<Key>, children: Vec<Child>) -> Box<Node> {
        let mut node = Node {
            level,
            keys,
            children,
            hash: EMPTY_HASH,
        };
        node.rehash();
        Box::new(node)
    }

    fn rehash(&mut self) {
        let hash = node_hash(self.level, &self.keys, |slot| {
            child_hash(&self.children[slot])
        });
        self.hash = hash;
    }

    /// Index of the first key `>= key`: also the slot of the child whose gap
    /// would hold `key`.
    fn slot(&self, key: &Key) -> usize {
        self.keys.partition_point(|k| k < key)
    }

    /// The slots `first..end` of the keys in `[lo, hi)` (`None` = unbounded).
    fn key_span(&self, lo: Option<&Key>, hi: Option<&Key>) -> (usize, usize) {
        let first = lo.map_or(0, |lo| self.slot(lo));
        let end = hi.map_or(self.keys.len(), |hi| self.slot(hi));
        (first, end.max(first))
    }
}

/// Insert `key` (of level `level`, not yet present) into the subtree `child`.
fn insert_into(child: Child, key: Key, level: u8) -> Box<Node> {
    let Some(mut node) = child else {
        return Node::new(level, vec![key], vec![None, None]);
    };
    if level > node.level {
        // The key becomes the only key of a new, higher node whose two gaps are
        // the old subtree split around it.
        let (left, right) = split(Some(node), &key);
        return Node::new(level, vec![key], vec![left, right]);
    }
    let slot = node.slot(&key);
    let gap = node.children[slot].take();
    if level == node.level {
        // The key joins this node and cuts the gap it lands in into two.
        let (left, right) = split(gap, &key);
        node.children[slot] = left;
        node.children.insert(slot + 1, right);
        node.keys.insert(slot, key);
    } else {
        node.children[slot] = Some(insert_into(gap, key, level));
    }
    node.rehash();
    node
}

/// Split a subtree into the MSTs of its keys below and above `key` (which it
/// does not contain). Only the path towards `key` is rebuilt and rehashed.
fn split(child: Child, key: &Key) -> (Child, Child) {
    let Some(mut node) = child else {
        return (None, None);
    };
    let slot = node.slot(key);
    let (gap_left, gap_right) = split(node.children[slot].take(), key);
    let right_keys = node.keys.split_off(slot);
    let mut right_children = node.children.split_off(slot + 1);
    let level = node.level;
    // A side left without keys of this level is just the split gap: keeping an
    // empty node would break the canonical shape.
    let left = if node.keys.is_empty() {
        gap_left
    } else {
        node.children[slot] = gap_left;
        node.rehash();
        Some(node)
    };
    let right = if right_keys.is_empty() {
        gap_right
    } else {
        right_children.insert(0, gap_right);
        Some(Node::new(level, right_keys, right_children))
    };
    (left, right)
}

/// Root hash of the MST of the keys of `child` in `[lo, hi)`.
fn range_hash(child: &Child, lo: Option<&Key>, hi: Option<&Key>) -> Hash {
    let Some(node) = child else {
        return EMPTY_HASH;
    };
    if lo.is_none() && hi.is_none() {
        return node.hash;
    }
    let (first, end) = node.key_span(lo, hi);
    if first == end {
        // No key of this level in the range: it lies within one gap.
        return range_hash(&node.children[first], lo, hi);
    }
    // The restricted tree's root has this node's keys in the range; the gaps
    // strictly inside are whole, only the two outer gaps are cut.
    node_hash(node.level, &node.keys[first..end], |i| {
        let gap = &node.children[first + i];
        if i == 0 {
            range_hash(gap, lo, None)
        } else if first + i == end {
            range_hash(gap, None, hi)
        } else {
            child_hash(gap)
        }
    })
}

/// Append the keys of `child` in `[lo, hi)` in order to `out`, stopping once
/// `out` holds `cap` keys.
fn collect(child: &Child, lo: Option<&Key>, hi: Option<&Key>, out: &mut Vec<Key>, cap: usize) {
    let Some(node) = child else {
        return;
    };
    let (first, end) = node.key_span(lo, hi);
    for slot in first..=end {
        if out.len() >= cap {
            return;
        }
        let gap_lo = if slot == first { lo } else { None };
        let gap_hi = if slot == end { hi } else { None };
        collect(&node.children[slot], gap_lo, gap_hi, out, cap);
        if slot < end && out.len() < cap {
            out.push(node.keys[slot]);
        }
    }
}

/// The largest key of `child` below `key`.
fn predecessor(child: &Child, key: &Key) -> Option<Key> {
    let mut best = None;
    let mut node = child.as_deref();
    while let Some(n) = node {
        let slot = n.slot(key);
        if slot > 0 {
            // Keys deeper in this gap lie between this one and `key`.
            best = Some(n.keys[slot - 1]);
        }
        node = n.children[slot].as_deref();
    }
    best
}

/// The smallest key of `child` at or above `key`.
fn successor(child: &Child, key: &Key) -> Option<Key> {
    let mut best = None;
    let mut node = child.as_deref();
    while let Some(n) = node {
        let slot = n.slot(key);
        if let Some(&k) = n.keys.get(slot) {
            if k == *key {
                return Some(k);
            }
            // Keys deeper in the gap before it lie between `key` and it.
            best = Some(k);
        }
        node = n.children[slot].as_deref();
    }
    best
}

/// The shortest prefix of `key`, padded with zeros, above `lower` (any
/// prefix when there is none): a boundary that cuts a set between `key`
/// and every smaller key of it the same way `key` does, in a few bytes.
fn separator(lower: Option<&Key>, key: &Key) -> Key {
    let len = lower.map_or(1, |l| {
        l.iter().zip(key).take_while(|(a, b)| a == b).count() + 1
    });
    let mut out = [0; 32];
    out[..len.min(32)].copy_from_slice(&key[..len.min(32)]);
    out
}

/// The keys of the highest level in the open interval `(lo, hi)`, sorted.
fn top_keys(child: &Child, lo: Option<&Key>, hi: Option<&Key>) -> Vec<Key> {
    let Some(node) = child else {
        return Vec::new();
    };
    let first = lo.map_or(0, |lo| node.keys.partition_point(|k| k <= lo));
    let end = hi.map_or(node.keys.len(), |hi| node.slot(hi)).max(first);
    if first == end {
        top_keys(&node.children[first], lo, hi)
    } else {
        node.keys[first..end].to_vec()
    }
}

/// A Merkle Search Tree over a set of keys, with its root hash maintained incrementally.
#[derive(Clone, Debug, Default)]
pub struct Mst {
    root: Child,
    len: usize,
}

impl Mst {
    pub fn new() -> Mst {
        Mst::default()
    }

    /// Number of keys in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add `key`; returns `false` (and changes nothing) if it was present.
    pub fn insert(&mut self, key: Key) -> bool {
        if self.contains(&key) {
            return false;
        }
        self.root = Some(insert_into(self.root.take(), key, level_of(&key)));
        self.len += 1;
        true
    }

    pub fn contains(&self, key: &Key) -> bool {
        let mut cur = self.root.as_deref();
        while let Some(node) = cur {
            match node.keys.binary_search(key) {
                Ok(_) => return true,
                Err(slot) => cur = node.children[slot].as_deref(),
            }
        }
        false
    }

    /// The root hash (`[0; 32]` for the empty set). Cheap: maintained on
    /// insert (`O(depth)` rehash), not recomputed from scratch.
    pub fn root_hash(&self) -> Hash {
        child_hash(&self.root)
    }

    /// The root hash of the MST of the keys in `range` (`[0; 32]` if none):
    /// a function of the set only, so two replicas agree on it exactly when
    /// they hold the same keys in `range`. `O(depth)` node hashes.
    pub fn range_hash(&self, range: &KeyRange) -> Hash {
        if range.is_empty() {
            return EMPTY_HASH;
        }
        range_hash(&self.root, range.start.as_ref(), range.end.as_ref())
    }

    /// The keys in `range`, sorted.
    pub fn keys_in_range(&self, range: &KeyRange) -> Vec<Key> {
        self.keys_in_range_capped(range, usize::MAX)
    }

    fn keys_in_range_capped(&self, range: &KeyRange, cap: usize) -> Vec<Key> {
        let mut out = Vec::new();
        if !range.is_empty() {
            collect(
                &self.root,
                range.start.as_ref(),
                range.end.as_ref(),
                &mut out,
                cap,
            );
        }
        out
    }

    /// Summary of the keys in `range`, used by the protocol: the keys
    /// themselves (their prefixes) if there are at most
    /// [`SUMMARY_KEY_LIMIT`], otherwise the range cut at the highest-level
    /// keys strictly inside it, each sub-range with its [`Mst::range_hash`]
    /// (shortened). The sub-ranges partition `range` in order. The cuts are
    /// not the keys themselves but their shortest prefixes that cut this
    /// set the same way (a few bytes): both sides hash the same ranges,
    /// whatever their bounds.
    pub fn summarize(&self, range: &KeyRange) -> Summary {
        let keys = self.keys_in_range_capped(range, SUMMARY_KEY_LIMIT + 1);
        if keys.len() <= SUMMARY_KEY_LIMIT {
            return Summary::Keys(keys.iter().map(key_prefix).collect());
        }
        // At least two keys are in the range, so at least one lies strictly
        // after its first: there is at least one boundary, and every
        // sub-range is strictly smaller than `range`. A range's start is a
        // cut made for its first key (or that key itself): the split is
        // among the keys after it, as if the range began at that key.
        let first = range.start.and_then(|s| successor(&self.root, &s));
        let bounds = top_keys(&self.root, first.as_ref(), range.end.as_ref());
        let mut subs = Vec::with_capacity(bounds.len() + 1);
        let mut start = range.start;
        for bound in bounds {
            // Above the key before it and above the range's start, so the
            // sub-ranges stay non-empty and in order.
            let lower = predecessor(&self.root, &bound).max(start);
            let cut = separator(lower.as_ref(), &bound);
            let sub = KeyRange {
                start,
                end: Some(cut),
            };
            subs.push((sub.clone(), short_hash(&self.range_hash(&sub))));
            start = Some(cut);
        }
        let last = KeyRange {
            start,
            end: range.end,
        };
        subs.push((last.clone(), short_hash(&self.range_hash(&last))));
        Summary::Ranges(subs)
    }
}

/// A half-open key interval [start, end); None = unbounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Option<Key>,
    pub end: Option<Key>,
}

impl KeyRange {
    /// The whole key space.
    pub fn full() -> KeyRange {
        KeyRange {
            start: None,
            end: None,
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.start.is_none_or(|s| *key >= s) && self.end.is_none_or(|e| *key < e)
    }

    /// Whether a key beginning with `prefix` can lie in the range.
    pub fn may_hold(&self, prefix: &KeyPrefix) -> bool {
        let mut lowest = [0; 32];
        lowest[..8].copy_from_slice(prefix);
        let mut highest = [0xff; 32];
        highest[..8].copy_from_slice(prefix);
        self.start.is_none_or(|s| highest >= s) && self.end.is_none_or(|e| lowest < e)
    }

    /// True if no key can lie in the range (`start >= end`).
    pub fn is_empty(&self) -> bool {
        matches!((&self.start, &self.end), (Some(s), Some(e)) if s >= e)
    }
}

/// What a peer sends about a key range: either the keys themselves (when few)
/// or a list of sub-ranges with their hashes (so the other side can recurse
/// only into sub-ranges whose hashes differ).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Summary {
    Keys(Vec<KeyPrefix>),
    Ranges(Vec<(KeyRange, ShortHash)>),
}

/// The responder's side of a round: summarize each requested range of `mst`.
/// A responder facing untrusted peers should bound how many requests it
/// answers per round; this function answers all of them.
pub fn respond(mst: &Mst, requests: &[KeyRange]) -> Vec<(KeyRange, Summary)> {
    requests
        .iter()
        .map(|range| (range.clone(), mst.summarize(range)))
        .collect()
}

/// A malformed answer from the responder. The reconciliation should be
/// abandoned (the peer is buggy or hostile).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReconcileError {
    /// An answer for a range that was not requested (or was already answered).
    UnexpectedRange(KeyRange),
    /// A `Keys` summary holding a key outside its range.
    KeyOutOfRange(KeyRange),
    /// A `Ranges` summary that is not a partition of its range into at least
    /// two non-empty sub-ranges; accepting one could make the protocol loop.
    BadSplit(KeyRange),
}

impl fmt::Display for ReconcileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReconcileError::UnexpectedRange(r) => write!(f, "answer for unrequested range {r:?}"),
            ReconcileError::KeyOutOfRange(r) => write!(f, "key outside summarized range {r:?}"),
            ReconcileError::BadSplit(r) => write!(f, "sub-ranges do not partition range {r:?}"),
        }
    }
}

impl std::error::Error for ReconcileError {}

/// The outcome of a reconciliation, both lists sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Keys the responder has and the initiator lacks (their prefixes:
    /// the responder resolves them with `Room::nodes_for_key_prefixes`).
    pub remote_only: Vec<KeyPrefix>,
    /// Keys the initiator has and the responder lacks.
    pub local_only: Vec<Key>,
}

/// The initiator's side of an MST reconciliation (sans-IO). The initiator asks
/// about ranges; the responder answers with [`respond`]; the answers are fed
/// to [`Reconciler::step`], which returns the next requests, until there are
/// none.
///
/// The local tree is passed to every step rather than held, so a session can
/// keep the reconciler across round trips while its room goes on changing.
///
/// ```text
/// let (mut rec, mut requests) = Reconciler::new();
/// while !requests.is_empty() {
///     let answers = respond(&remote, &requests); // over the network
///     requests = rec.step(&local, answers)?;
/// }
/// let diff = rec.into_diff();
/// ```
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Requested ranges not answered yet.
    outstanding: Vec<KeyRange>,
    diff: Diff,
}

impl Reconciler {
    /// Start reconciling against a peer; returns the first requests.
    pub fn new() -> (Reconciler, Vec<KeyRange>) {
        let first = vec![KeyRange::full()];
        let rec = Reconciler {
            outstanding: first.clone(),
            diff: Diff::default(),
        };
        (rec, first)
    }

    /// Absorb the responder's answers, comparing with `local`; returns the
    /// next requests (empty when these answers left nothing to refine).
    /// Answers may arrive in any order and in several batches.
    pub fn step(
        &mut self,
        local: &Mst,
        answers: Vec<(KeyRange, Summary)>,
    ) -> Result<Vec<KeyRange>, ReconcileError> {
        let mut next = Vec::new();
        for (range, summary) in answers {
            let Some(pos) = self.outstanding.iter().position(|r| *r == range) else {
                return Err(ReconcileError::UnexpectedRange(range));
            };
            self.outstanding.swap_remove(pos);
            match summary {
                Summary::Keys(mut remote) => {
                    if !remote.iter().all(|p| range.may_hold(p)) {
                        return Err(ReconcileError::KeyOutOfRange(range));
                    }
                    remote.sort_unstable();
                    remote.dedup();
                    let local = local.keys_in_range(&range);
                    diff_sorted(&remote, &local, &mut self.diff);
                }
                Summary::Ranges(subs) => {
                    if !is_partition(&range, &subs) {
                        return Err(ReconcileError::BadSplit(range));
                    }
                    for (sub, remote_hash) in subs {
                        if short_hash(&local.range_hash(&sub)) == remote_hash {
                            continue;
                        }
                        if remote_hash == short_hash(&EMPTY_HASH) {
                            // The peer has nothing there: no need to ask.
                            self.diff.local_only.extend(local.keys_in_range(&sub));
                        } else {
                            next.push(sub);
                        }
                    }
                }
            }
        }
        self.outstanding.extend(next.iter().cloned());
        Ok(next)
    }

    /// True once every request has been answered and nothing is left to refine.
    pub fn is_done(&self) -> bool {
        self.outstanding.is_empty()
    }

    /// The symmetric difference found, both lists sorted. Complete only once
    /// [`Reconciler::is_done`].
    pub fn into_diff(self) -> Diff {
        let mut diff = self.diff;
        diff.remote_only.sort_unstable();
        diff.local_only.sort_unstable();
        diff
    }
}

/// Whether `subs` cut `range` into at least two contiguous non-empty pieces,
/// in order: each piece is then strictly smaller than `range`, so refinement
/// always makes progress.
fn is_partition(range: &KeyRange, subs: &[(KeyRange, ShortHash)]) -> bool {
    let (Some((first, _)), Some((last, _))) = (subs.first(), subs.last()) else {
        return false;
    };
    subs.len() >= 2
        && first.start == range.start
        && last.end == range.end
        && subs.iter().all(|(sub, _)| !sub.is_empty())
        && subs
            .windows(2)
            .all(|pair| pair[0].0.end.is_some() && pair[0].0.end == pair[1].0.start)
}

/// Merge a sorted, deduplicated list of the responder's key prefixes and
/// the initiator's sorted keys into the difference.
fn diff_sorted(remote: &[KeyPrefix], local: &[Key], diff: &mut Diff) {
    let (mut i, mut j) = (0, 0);
    while i < remote.len() && j < local.len() {
        match remote[i].cmp(&key_prefix(&local[j])) {
            Ordering::Less => {
                diff.remote_only.push(remote[i]);
                i += 1;
            }
            Ordering::Greater => {
                diff.local_only.push(local[j]);
                j += 1;
            }
            Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    diff.remote_only.extend_from_slice(&remote[i..]);
    diff.local_only.extend_from_slice(&local[j..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeSet;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// A uniformly random key, like a real node id.
    fn random_key(rng: &mut ChaCha8Rng) -> Key {
        rng.random()
    }

    /// A key of level at least 0, 1 or 2 (found by grinding): small sets of
    /// these still get many levels, exercising deep and lumpy shapes.
    fn deep_key(rng: &mut ChaCha8Rng) -> Key {
        let min_level = rng.random_range(0..3u8);
        loop {
            let key = random_key(rng);
            if level_of(&key) >= min_level {
                return key;
            }
        }
    }

    fn keys(rng: &mut ChaCha8Rng, n: usize, deep: bool) -> Vec<Key> {
        let set: BTreeSet<Key> = (0..n)
            .map(|_| if deep { deep_key(rng) } else { random_key(rng) })
            .collect();
        set.into_iter().collect()
    }

    fn build(keys: &[Key]) -> Mst {
        let mut mst = Mst::new();
        for &k in keys {
            mst.insert(k);
        }
        mst
    }

    /// The MST hash of a sorted key list, computed from scratch by the
    /// definition (top level's keys, recursive gaps), without the tree code.
    fn reference_hash(sorted: &[Key]) -> Hash {
        let Some(top) = sorted.iter().map(level_of).max() else {
            return EMPTY_HASH;
        };
        let mut top_keys = Vec::new();
        let mut gaps = Vec::new();
        let mut gap_start = 0;
        for (i, key) in sorted.iter().enumerate() {
            if level_of(key) == top {
                gaps.push(reference_hash(&sorted[gap_start..i]));
                top_keys.push(*key);
                gap_start = i + 1;
            }
        }
        gaps.push(reference_hash(&sorted[gap_start..]));
        node_hash(top, &top_keys, |slot| gaps[slot])
    }

    /// Check every structural invariant of the subtree, with its keys bounded
    /// by the open interval `(lo, hi)` and levels below `parent_level`;
    /// returns the number of keys.
    fn check(child: &Child, lo: Option<Key>, hi: Option<Key>, parent_level: u8) -> usize {
        let Some(node) = child else {
            return 0;
        };
        assert!(node.level < parent_level, "child level must be lower");
        assert!(!node.keys.is_empty(), "no empty nodes");
        assert_eq!(node.children.len(), node.keys.len() + 1);
        assert!(node.keys.windows(2).all(|w| w[0] < w[1]), "keys sorted");
        for key in &node.keys {
            assert_eq!(level_of(key), node.level);
            assert!(lo.is_none_or(|lo| *key > lo) && hi.is_none_or(|hi| *key < hi));
        }
        assert_eq!(
            node.hash,
            node_hash(node.level, &node.keys, |s| child_hash(&node.children[s]))
        );
        let mut count = node.keys.len();
        for (slot, gap) in node.children.iter().enumerate() {
            let gap_lo = if slot == 0 {
                lo
            } else {
                Some(node.keys[slot - 1])
            };
            let gap_hi = node.keys.get(slot).copied().or(hi);
            count += check(gap, gap_lo, gap_hi, node.level);
        }
        count
    }

    fn check_tree(mst: &Mst) {
        assert_eq!(check(&mst.root, None, None, u8::MAX), mst.len());
    }

    /// Run a whole reconciliation of `local` (initiator) against `remote`.
    /// Returns the diff, the round trips, and the bytes on the wire counting
    /// 32 bytes per key or hash: a request costs its present bounds; an
    /// answer costs its keys, or its hashes plus the inner boundaries of its
    /// split (the outer ones are the request's, referenced by position).
    fn reconcile(local: &Mst, remote: &Mst) -> (Diff, usize, usize) {
        let (mut rec, mut requests) = Reconciler::new();
        let (mut rounds, mut bytes) = (0, 0);
        while !requests.is_empty() {
            rounds += 1;
            assert!(rounds <= 64, "reconciliation does not terminate");
            for r in &requests {
                bytes += 32 * (usize::from(r.start.is_some()) + usize::from(r.end.is_some()));
            }
            let answers = respond(remote, &requests);
            for (_, summary) in &answers {
                bytes += match summary {
                    Summary::Keys(keys) => 32 * keys.len(),
                    Summary::Ranges(subs) => 32 * (2 * subs.len() - 1),
                };
            }
            requests = rec.step(local, answers).expect("honest answers");
        }
        assert!(rec.is_done());
        (rec.into_diff(), rounds, bytes)
    }

    fn brute_diff(local: &[Key], remote: &[Key]) -> Diff {
        let l: BTreeSet<Key> = local.iter().copied().collect();
        let r: BTreeSet<Key> = remote.iter().copied().collect();
        Diff {
            remote_only: r.difference(&l).map(key_prefix).collect(),
            local_only: l.difference(&r).copied().collect(),
        }
    }

    /// Two sets of about `n` keys sharing all but `d` of them, the `d`
    /// split between the two sides.
    fn diverged(seed: u64, n: usize, d: usize, deep: bool) -> (Vec<Key>, Vec<Key>) {
        let mut rng = rng(seed);
        let all = keys(&mut rng, n + d.div_ceil(2), deep);
        let mut tagged: Vec<(Key, usize)> = all.iter().map(|&k| (k, 0)).collect();
        tagged.shuffle(&mut rng);
        for (i, t) in tagged.iter_mut().take(d).enumerate() {
            t.1 = 1 + i % 2;
        }
        let a = tagged.iter().filter(|t| t.1 != 2).map(|t| t.0).collect();
        let b = tagged.iter().filter(|t| t.1 != 1).map(|t| t.0).collect();
        (a, b)
    }

    #[test]
    fn levels_count_leading_zero_nibbles() {
        let mut bytes = [0xffu8; 32];
        assert_eq!(leading_zero_nibbles(&bytes), 0);
        bytes[0] = 0x0f;
        assert_eq!(leading_zero_nibbles(&bytes), 1);
        bytes[0] = 0;
        assert_eq!(leading_zero_nibbles(&bytes), 2);
        bytes[1] = 0x01;
        assert_eq!(leading_zero_nibbles(&bytes), 3);
        assert_eq!(leading_zero_nibbles(&[0; 32]), 64);
    }

    #[test]
    fn levels_are_geometric_and_independent_of_order() {
        let mut rng = rng(12);
        let ks = keys(&mut rng, 64_000, false);
        let at_least = |l: u8, ks: &[Key]| ks.iter().filter(|k| level_of(k) >= l).count();
        // About 1/16 of keys per extra level, in either half of the key space.
        for half in ks.chunks(32_000) {
            assert!((1_700..2_300).contains(&at_least(1, half)));
            assert!((80..180).contains(&at_least(2, half)));
        }
    }

    #[test]
    fn insert_contains_len() {
        let mut rng = rng(1);
        let ks = keys(&mut rng, 500, true);
        let mut mst = Mst::new();
        assert!(mst.is_empty());
        for (i, &k) in ks.iter().enumerate() {
            assert!(!mst.contains(&k));
            assert!(mst.insert(k));
            assert!(mst.contains(&k));
            assert!(!mst.insert(k), "duplicate insert reports false");
            assert_eq!(mst.len(), i + 1);
        }
        assert!(!mst.contains(&random_key(&mut rng)));
        check_tree(&mst);
    }

    #[test]
    fn empty_tree_hash_is_zero() {
        let mst = Mst::new();
        assert_eq!(mst.root_hash(), EMPTY_HASH);
        assert_eq!(mst.range_hash(&KeyRange::full()), EMPTY_HASH);
        assert_eq!(mst.summarize(&KeyRange::full()), Summary::Keys(Vec::new()));
    }

    #[test]
    fn incremental_root_hash_matches_rebuild() {
        for seed in 0..20 {
            let mut rng = rng(seed);
            let mut ks = keys(&mut rng, 300, seed % 2 == 0);
            ks.shuffle(&mut rng);
            let mut mst = Mst::new();
            let mut sorted = BTreeSet::new();
            for &k in &ks {
                mst.insert(k);
                sorted.insert(k);
                let sorted: Vec<Key> = sorted.iter().copied().collect();
                assert_eq!(mst.root_hash(), reference_hash(&sorted));
            }
            check_tree(&mst);
        }
        let mut rng = rng(99);
        let ks = keys(&mut rng, 10_000, false);
        let mut shuffled = ks.clone();
        shuffled.shuffle(&mut rng);
        let mst = build(&shuffled);
        check_tree(&mst);
        assert_eq!(mst.root_hash(), reference_hash(&ks));
    }

    #[test]
    fn insertion_order_does_not_matter_large() {
        let mut rng = rng(7);
        let mut ks = keys(&mut rng, 5_000, false);
        let expected = build(&ks).root_hash();
        for _ in 0..3 {
            ks.shuffle(&mut rng);
            assert_eq!(build(&ks).root_hash(), expected);
        }
    }

    #[test]
    fn one_different_key_changes_root_hash() {
        let mut rng = rng(3);
        for n in [1, 2, 10, 100, 1000] {
            let ks = keys(&mut rng, n, false);
            let base = build(&ks).root_hash();
            let mut replaced = ks.clone();
            replaced[n / 2] = random_key(&mut rng);
            assert_ne!(build(&replaced).root_hash(), base, "replace one of {n}");
            let mut grown = build(&ks);
            grown.insert(deep_key(&mut rng));
            assert_ne!(grown.root_hash(), base, "add one to {n}");
        }
    }

    #[test]
    fn summary_partitions_range_with_set_hashes() {
        let mut rng = rng(11);
        let ks = keys(&mut rng, 3_000, true);
        let mst = build(&ks);
        let mut ranges = vec![KeyRange::full()];
        while let Some(range) = ranges.pop() {
            let in_range: Vec<Key> = ks.iter().copied().filter(|k| range.contains(k)).collect();
            match mst.summarize(&range) {
                Summary::Keys(listed) => {
                    assert!(listed.len() <= SUMMARY_KEY_LIMIT);
                    let prefixes: Vec<KeyPrefix> = in_range.iter().map(key_prefix).collect();
                    assert_eq!(listed, prefixes);
                }
                Summary::Ranges(subs) => {
                    assert!(in_range.len() > SUMMARY_KEY_LIMIT);
                    assert!(is_partition(&range, &subs));
                    for (sub, hash) in subs {
                        let sub_keys: Vec<Key> = in_range
                            .iter()
                            .copied()
                            .filter(|k| sub.contains(k))
                            .collect();
                        assert_eq!(hash, short_hash(&reference_hash(&sub_keys)));
                        ranges.push(sub);
                    }
                }
            }
        }
    }

    #[test]
    fn reconcile_matches_brute_force() {
        for (seed, n, d) in [
            (1, 10_000, 0),
            (2, 10_000, 1),
            (3, 10_000, 10),
            (4, 10_000, 100),
            (5, 10_000, 1000),
        ] {
            let (a, b) = diverged(seed, n, d, false);
            let (ma, mb) = (build(&a), build(&b));
            let (diff, rounds, bytes) = reconcile(&ma, &mb);
            assert_eq!(diff, brute_diff(&a, &b), "n={n} d={d}");
            assert_eq!(diff.remote_only.len() + diff.local_only.len(), d);
            assert!(rounds <= 8, "n={n} d={d}: {rounds} round trips");
            eprintln!("n={n} d={d}: {rounds} round trips, {bytes} bytes");
            // And the other way round.
            let (back, _, _) = reconcile(&mb, &ma);
            let prefixes = |keys: &[Key]| keys.iter().map(key_prefix).collect::<Vec<_>>();
            assert_eq!(back.remote_only, prefixes(&diff.local_only));
            assert_eq!(prefixes(&back.local_only), diff.remote_only);
        }
    }

    #[test]
    fn identical_sets_take_one_round_trip() {
        for n in [0, 10, 10_000] {
            let mut rng = rng(n as u64);
            let ks = keys(&mut rng, n, false);
            let (a, b) = (build(&ks), build(&ks));
            let (diff, rounds, _) = reconcile(&a, &b);
            assert_eq!(diff, Diff::default());
            assert_eq!(rounds, 1, "n={n}");
        }
    }

    #[test]
    fn empty_against_full() {
        let mut rng = rng(5);
        let ks = keys(&mut rng, 2_000, false);
        let (empty, full) = (Mst::new(), build(&ks));
        let (diff, rounds, _) = reconcile(&empty, &full);
        assert_eq!(
            diff,
            Diff {
                remote_only: ks.iter().map(key_prefix).collect(),
                local_only: Vec::new()
            }
        );
        eprintln!("empty vs 2000: {rounds} round trips");
        let (diff, rounds, _) = reconcile(&full, &empty);
        assert_eq!(
            diff,
            Diff {
                remote_only: Vec::new(),
                local_only: ks
            }
        );
        assert_eq!(rounds, 1);
    }

    #[test]
    fn malformed_answers_are_rejected() {
        let mut rng = rng(8);
        let ks = keys(&mut rng, 1_000, false);
        let local = build(&ks[..500]);
        let remote = build(&ks);
        let (mut rec, requests) = Reconciler::new();
        let stray = KeyRange {
            start: Some(ks[3]),
            end: None,
        };
        assert_eq!(
            rec.step(&local, vec![(stray.clone(), Summary::Keys(Vec::new()))]),
            Err(ReconcileError::UnexpectedRange(stray))
        );
        let full = requests[0].clone();
        let self_split = Summary::Ranges(vec![(full.clone(), [1; 16])]);
        assert_eq!(
            rec.step(&local, vec![(full.clone(), self_split)]),
            Err(ReconcileError::BadSplit(full.clone()))
        );
        let gap = Summary::Ranges(vec![
            (
                KeyRange {
                    start: None,
                    end: Some(ks[1]),
                },
                [1; 16],
            ),
            (
                KeyRange {
                    start: Some(ks[2]),
                    end: None,
                },
                [1; 16],
            ),
        ]);
        let (mut rec, _) = Reconciler::new();
        assert_eq!(
            rec.step(&local, vec![(full.clone(), gap)]),
            Err(ReconcileError::BadSplit(full))
        );
        // An honest first round, then a Keys answer with a key out of range.
        let (mut rec, requests) = Reconciler::new();
        let next = rec.step(&local, respond(&remote, &requests)).unwrap();
        let target = next[0].clone();
        let outside = if target.start.is_some() {
            [0; 8]
        } else {
            [0xff; 8]
        };
        assert_eq!(
            rec.step(&local, vec![(target.clone(), Summary::Keys(vec![outside]))]),
            Err(ReconcileError::KeyOutOfRange(target))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_order_independent(seed in any::<u64>(), n in 0usize..400) {
            let mut rng = rng(seed);
            let mut ks = keys(&mut rng, n, true);
            let expected = reference_hash(&ks);
            ks.shuffle(&mut rng);
            let mst = build(&ks);
            check_tree(&mst);
            prop_assert_eq!(mst.root_hash(), expected);
        }

        #[test]
        fn prop_range_hash_is_set_hash(seed in any::<u64>(), n in 0usize..400, a in any::<Key>(), b in any::<Key>(), bounded in 0u8..4) {
            let mut rng = rng(seed);
            let ks = keys(&mut rng, n, true);
            let mst = build(&ks);
            // Bounds that are keys of the set (as in real summaries) as well
            // as arbitrary ones.
            let pick = |k: Key, from_set: bool| match ks.len() {
                len if from_set && len > 0 => ks[usize::from(k[0]) % len],
                _ => k,
            };
            let range = KeyRange {
                start: (bounded & 1 != 0).then(|| pick(a, b[1] & 1 != 0)),
                end: (bounded & 2 != 0).then(|| pick(b, a[1] & 1 != 0)),
            };
            let in_range: Vec<Key> = ks.iter().copied().filter(|k| range.contains(k)).collect();
            prop_assert_eq!(mst.range_hash(&range), reference_hash(&in_range));
            prop_assert_eq!(mst.keys_in_range(&range), in_range);
        }

        #[test]
        fn prop_reconcile_exact(seed in any::<u64>(), n in 0usize..2_000, d in 0usize..300, deep in any::<bool>()) {
            let (a, b) = diverged(seed, n, d, deep);
            let (diff, _, _) = reconcile(&build(&a), &build(&b));
            prop_assert_eq!(diff, brute_diff(&a, &b));
        }
    }
}
