//! Sequence CRDT for the text of a Syncline document.
//!
//! Every replica keeps a [`Sequence`]; local edits and edits received from
//! other replicas are applied to it with [`Sequence::integrate`] and
//! [`Sequence::delete`], and replicas that have applied the same set of
//! operations (in any causally valid order) hold the same text.
//!
//! # Algorithm
//!
//! This is FugueMax, also known as "YjsMod": the list algorithm of Seph
//! Gentle's reference-crdts (`integrateYjsMod`), which Weidner & Kleppmann
//! ("The Art of the Fugue") prove maximally non-interleaving: runs of text
//! that different users type concurrently at the same place, forwards or
//! backwards, end up one after the other and never interleave.
//!
//! Every character is an item with a unique [`ItemId`] and two *origins*: the
//! item that was immediately to its left and the one immediately to its right
//! when it was typed. An insert is placed between its origins; when other
//! replicas inserted concurrently into the same gap, a scan over the items in
//! that gap decides the order, comparing the origins of the items it passes
//! and, for inserts with identical origins, the ids (through a total order on
//! node numbers chosen by the caller).
//!
//! # Why deleted characters stay
//!
//! A delete only marks its item as a tombstone. A concurrent insert may name a
//! deleted character as an origin, and the scan above needs the *position* of
//! every origin to place inserts identically on every replica; dropping
//! tombstones would make replicas diverge.
//!
//! # Representation and complexity
//!
//! Items (12 bytes: id and char) live in leaves of at most 128 items, in
//! document order, with one `u128` of visibility flags per leaf. The leaves
//! hang under a B+tree of inner nodes that count the visible characters of
//! each child, so a visible position is found in O(log n). Leaves only ever
//! split (tombstones are never removed), so the tree never rebalances
//! downwards. Two side tables make ids cheap to resolve:
//!
//! * the *origin table*, per node, a sorted list of runs of consecutive ids
//!   that were typed one after the other with the same right origin; it
//!   answers "does this id exist" and "what are its origins" in O(log runs),
//!   and stores origins once per run instead of once per character;
//! * the *holder index*, which maps each block of 16 consecutive ids of a node
//!   to the leaves holding them (almost always one), so an id is found with one
//!   hash lookup and a scan of one leaf.
//!
//! Costs, with n items: a local insert or delete is O(log n) plus one leaf
//! scan; a remote insert whose origins are still adjacent (the common case,
//! and every local insert) needs no scan at all; only inserts that race with
//! concurrent inserts into the same gap walk the items of that gap, as the
//! reference algorithm does. Memory is about 16 bytes per item (leaves are
//! 75% full on average) plus a few bytes for the side tables.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Identity of one character: the (interned) node that inserted it and the
/// character's index among all characters that node inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId {
    /// Interned number of the node that inserted the character.
    pub node: u32,
    /// Index of the character among all characters the node inserted.
    pub index: u32,
}

/// Why an operation was rejected. A rejected operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqError {
    /// An origin of an insert, or the target of a delete, is not in the
    /// sequence.
    UnknownOrigin(ItemId),
    /// An id of the inserted run is already in the sequence.
    DuplicateItem(ItemId),
    /// The ids of the inserted run would go past `u32::MAX`; carries the
    /// run's first id.
    IdOverflow(ItemId),
}

impl fmt::Display for SeqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOrigin(id) => write!(f, "unknown item {}:{}", id.node, id.index),
            Self::DuplicateItem(id) => write!(f, "item {}:{} already exists", id.node, id.index),
            Self::IdOverflow(id) => write!(
                f,
                "run starting at item {}:{} overflows the id space",
                id.node, id.index
            ),
        }
    }
}

impl std::error::Error for SeqError {}

/// Items per leaf at most; at most 128 because a leaf keeps its visibility
/// flags in one `u128`.
const LEAF_CAP: usize = 128;
/// Children per inner node at most.
const FANOUT: usize = 32;
/// The holder index groups the ids of a node in blocks of `1 << BLOCK_SHIFT`.
const BLOCK_SHIFT: u32 = 4;
/// "No node": the parent of the root, the neighbours of the end leaves.
const NIL: usize = usize::MAX;

/// FxHash-style hasher for the id-keyed tables: keys are small integers, and
/// SipHash would cost more than the rest of a local edit. Ids come from
/// authenticated history, so hash flooding is not a concern here.
#[derive(Clone, Copy, Debug, Default)]
struct IdHasher(u64);

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the entropy in the high bits; hashbrown picks
        // buckets with the low ones.
        self.0.rotate_left(26)
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, Debug)]
struct Item {
    id: ItemId,
    ch: char,
}

#[derive(Clone, Debug)]
struct Leaf {
    items: Vec<Item>,
    /// Bit `i` is set when `items[i]` is visible.
    visible: u128,
    parent: usize,
    /// Index of this leaf among its parent's children.
    slot: usize,
    prev: usize,
    next: usize,
}

#[derive(Clone, Debug)]
struct Inner {
    children: Vec<usize>,
    /// Visible characters under each child.
    counts: Vec<usize>,
    parent: usize,
    slot: usize,
    /// Children are indices into `leaves` rather than `inners`.
    leaf_children: bool,
}

/// Ids `start..=last` of one node, each typed right after the previous one:
/// item `start` has origins (`left`, `right`); every later item has the
/// previous id as left origin and `right` as right origin.
#[derive(Clone, Copy, Debug)]
struct OriginRun {
    start: u32,
    last: u32,
    left: Option<ItemId>,
    right: Option<ItemId>,
}

/// Leaves holding at least one id of a block.
#[derive(Clone, Debug)]
enum Holders {
    One(usize),
    Many(Vec<usize>),
}

/// A place in the item list: item `off` of leaf `leaf`, or, as an insertion
/// point, the gap before it (`off == len` is the gap at the leaf's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    leaf: usize,
    off: usize,
}

/// Sequence of characters, visible and deleted, in document order.
#[derive(Clone, Debug)]
pub struct Sequence {
    /// Leaf 0 is always the first: a leaf that splits keeps its first part.
    leaves: Vec<Leaf>,
    inners: Vec<Inner>,
    root: usize,
    tail: usize,
    len: usize,
    origins: IdMap<u32, Vec<OriginRun>>,
    holders: IdMap<(u32, u32), Holders>,
    /// Where the last inserted or deleted item is: the next edit usually
    /// refers to it, which saves an id lookup.
    last: Pos,
    leaf_cap: usize,
    fanout: usize,
}

impl Default for Sequence {
    fn default() -> Self {
        Self::new()
    }
}

impl Sequence {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::with_caps(LEAF_CAP, FANOUT)
    }

    /// Tests use tiny nodes to exercise deep trees with few items.
    fn with_caps(leaf_cap: usize, fanout: usize) -> Self {
        Self {
            leaves: vec![Leaf {
                items: Vec::new(),
                visible: 0,
                parent: 0,
                slot: 0,
                prev: NIL,
                next: NIL,
            }],
            inners: vec![Inner {
                children: vec![0],
                counts: vec![0],
                parent: NIL,
                slot: 0,
                leaf_children: true,
            }],
            root: 0,
            tail: 0,
            len: 0,
            origins: IdMap::default(),
            holders: IdMap::default(),
            last: Pos { leaf: 0, off: 0 },
            leaf_cap: leaf_cap.clamp(2, LEAF_CAP),
            fanout: fanout.max(3),
        }
    }

    /// Visible characters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no character is visible.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Origins for a local insert before visible position `pos` (`0..=len`):
    /// origin_left is the item immediately before the `pos`-th visible item
    /// (possibly a tombstone), `None` at the start; origin_right is the
    /// `pos`-th visible item, `None` at the end (as reference-crdts'
    /// `localInsert`). `None` when `pos > len`.
    pub fn origins_at(&self, pos: usize) -> Option<(Option<ItemId>, Option<ItemId>)> {
        match pos.cmp(&self.len) {
            Ordering::Greater => None,
            Ordering::Equal => Some((self.leaves[self.tail].items.last().map(|it| it.id), None)),
            Ordering::Less => {
                let p = self.find_visible(pos);
                let left = self.prev_item(p).map(|q| self.id_at(q));
                Some((left, Some(self.id_at(p))))
            }
        }
    }

    /// Integrates a run of characters `text` with ids `(first.node,
    /// first.index + k)` for `k` in `0..chars`. The first character has
    /// origins (`left`, `right`); each following one has the previous
    /// character of the run as left origin and `right` as right origin.
    /// `cmp` is the total order on node numbers that breaks ties between
    /// concurrent inserts with identical origins (ids compare by `cmp` on the
    /// node, then by index); every replica must use the same order.
    ///
    /// Fails, changing nothing, when an origin is unknown, an id of the run
    /// already exists or the run's ids overflow `u32`. An empty `text` only
    /// checks the origins.
    pub fn integrate(
        &mut self,
        first: ItemId,
        left: Option<ItemId>,
        right: Option<ItemId>,
        text: &str,
        cmp: &dyn Fn(u32, u32) -> Ordering,
    ) -> Result<(), SeqError> {
        let count = text.chars().count();
        let last = match count {
            0 => None,
            // usize -> u64 is lossless on every supported target.
            _ => match u32::try_from(u64::from(first.index) + count as u64 - 1) {
                Ok(last) => Some(last),
                Err(_) => return Err(SeqError::IdOverflow(first)),
            },
        };
        if let Some(last) = last
            && let Some(dup) = self.first_existing(first.node, first.index, last)
        {
            return Err(SeqError::DuplicateItem(dup));
        }
        let left_at = match left {
            Some(id) => Some((id, self.locate(id).ok_or(SeqError::UnknownOrigin(id))?)),
            None => None,
        };
        let Some(last) = last else {
            return match right {
                Some(id) if !self.contains(id) => Err(SeqError::UnknownOrigin(id)),
                _ => Ok(()),
            };
        };
        let after_left = match left_at {
            Some((_, p)) => self.next_item(p),
            None => self.first_item(),
        };
        let fast = match (after_left, right) {
            (None, None) => true,
            (Some(p), Some(r)) => self.id_at(p) == r,
            _ => false,
        };
        let at = if fast {
            // Nothing was inserted concurrently between the origins: the
            // reference scan would stop at once. Every local insert gets here.
            match left_at {
                Some((_, p)) => Pos {
                    leaf: p.leaf,
                    off: p.off + 1,
                },
                None => Pos { leaf: 0, off: 0 },
            }
        } else {
            let right_at = match right {
                Some(id) => Some((id, self.locate(id).ok_or(SeqError::UnknownOrigin(id))?)),
                None => None,
            };
            self.scan(first, left_at, right_at, after_left, cmp)
        };
        self.insert_run(at, first, last, text, count);
        self.record_origins(first, last, left, right);
        Ok(())
    }

    /// Marks one item deleted: `Ok(true)` if it was visible, `Ok(false)` if it
    /// was already deleted (deleting is idempotent), `Err(UnknownOrigin)` if
    /// the id is unknown.
    pub fn delete(&mut self, id: ItemId) -> Result<bool, SeqError> {
        let p = self.locate(id).ok_or(SeqError::UnknownOrigin(id))?;
        self.last = p;
        let leaf = &mut self.leaves[p.leaf];
        let bit = 1u128 << p.off;
        if leaf.visible & bit == 0 {
            return Ok(false);
        }
        leaf.visible &= !bit;
        self.walk_up(p.leaf, |c| *c -= 1);
        self.len -= 1;
        Ok(true)
    }

    /// The visible items at visible positions `pos..pos + len`, as maximal
    /// runs of consecutive ids (same node, index increasing by one, next to
    /// each other among the visible items): `(first id, run length)` each.
    /// `None` if the range does not fit in `0..self.len()`.
    pub fn visible_runs(&self, pos: usize, len: usize) -> Option<Vec<(ItemId, u32)>> {
        if pos.checked_add(len)? > self.len {
            return None;
        }
        let mut runs: Vec<(ItemId, u32)> = Vec::new();
        if len == 0 {
            return Some(runs);
        }
        let start = self.find_visible(pos);
        let (mut leaf, mut from) = (start.leaf, start.off);
        let mut remaining = len;
        while leaf != NIL {
            let l = &self.leaves[leaf];
            let mut mask = l.visible & !low_bits(from);
            while mask != 0 {
                let id = l.items[mask.trailing_zeros() as usize].id;
                mask &= mask - 1;
                match runs.last_mut() {
                    Some((first, n))
                        if first.node == id.node
                            && first.index.checked_add(*n) == Some(id.index)
                            && *n < u32::MAX =>
                    {
                        *n += 1;
                    }
                    _ => runs.push((id, 1)),
                }
                remaining -= 1;
                if remaining == 0 {
                    return Some(runs);
                }
            }
            leaf = l.next;
            from = 0;
        }
        // The inner counts guarantee enough visible items after `pos`.
        Some(runs)
    }

    /// Whether an item with this id exists (visible or deleted).
    pub fn contains(&self, id: ItemId) -> bool {
        self.origins_of(id).is_some()
    }

    /// The visible text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write_text(&mut out);
        out
    }

    /// Appends the visible text to `out` (it is not cleared first), so one
    /// buffer can be reused, e.g. to hash the text.
    pub fn write_text(&self, out: &mut String) {
        out.reserve(self.len);
        let mut leaf = 0;
        while leaf != NIL {
            let l = &self.leaves[leaf];
            let mut mask = l.visible;
            while mask != 0 {
                out.push(l.items[mask.trailing_zeros() as usize].ch);
                mask &= mask - 1;
            }
            leaf = l.next;
        }
    }

    fn id_at(&self, p: Pos) -> ItemId {
        self.leaves[p.leaf].items[p.off].id
    }

    fn first_item(&self) -> Option<Pos> {
        (!self.leaves[0].items.is_empty()).then_some(Pos { leaf: 0, off: 0 })
    }

    fn next_item(&self, p: Pos) -> Option<Pos> {
        let leaf = &self.leaves[p.leaf];
        if p.off + 1 < leaf.items.len() {
            Some(Pos {
                leaf: p.leaf,
                off: p.off + 1,
            })
        } else if leaf.next == NIL {
            None
        } else {
            // Only the sole leaf of an empty sequence is ever empty.
            Some(Pos {
                leaf: leaf.next,
                off: 0,
            })
        }
    }

    fn prev_item(&self, p: Pos) -> Option<Pos> {
        if p.off > 0 {
            Some(Pos {
                leaf: p.leaf,
                off: p.off - 1,
            })
        } else {
            let prev = self.leaves[p.leaf].prev;
            (prev != NIL).then(|| Pos {
                leaf: prev,
                off: self.leaves[prev].items.len() - 1,
            })
        }
    }

    /// The `pos`-th visible item; requires `pos < self.len`.
    fn find_visible(&self, mut pos: usize) -> Pos {
        let mut node = self.root;
        loop {
            let inner = &self.inners[node];
            let mut slot = inner.counts.len() - 1;
            for (i, &c) in inner.counts.iter().enumerate() {
                if pos < c {
                    slot = i;
                    break;
                }
                pos -= c;
            }
            let child = inner.children[slot];
            if inner.leaf_children {
                return Pos {
                    leaf: child,
                    off: select(self.leaves[child].visible, pos),
                };
            }
            node = child;
        }
    }

    /// Where an existing item is, through the holder index.
    fn locate(&self, id: ItemId) -> Option<Pos> {
        if self
            .leaves
            .get(self.last.leaf)
            .and_then(|l| l.items.get(self.last.off))
            .is_some_and(|it| it.id == id)
        {
            return Some(self.last);
        }
        let in_leaf = |leaf: usize| {
            self.leaves[leaf]
                .items
                .iter()
                .position(|it| it.id == id)
                .map(|off| Pos { leaf, off })
        };
        match self.holders.get(&block_key(id))? {
            Holders::One(leaf) => in_leaf(*leaf),
            Holders::Many(leaves) => leaves.iter().find_map(|&leaf| in_leaf(leaf)),
        }
    }

    /// Document order of two item positions.
    fn pos_cmp(&self, a: Pos, b: Pos) -> Ordering {
        if a.leaf == b.leaf {
            return a.off.cmp(&b.off);
        }
        // All leaves are at the same depth, so the two paths meet at the
        // lowest common ancestor when climbed in lockstep.
        let (mut sa, mut pa) = (self.leaves[a.leaf].slot, self.leaves[a.leaf].parent);
        let (mut sb, mut pb) = (self.leaves[b.leaf].slot, self.leaves[b.leaf].parent);
        while pa != pb {
            (sa, pa) = (self.inners[pa].slot, self.inners[pa].parent);
            (sb, pb) = (self.inners[pb].slot, self.inners[pb].parent);
        }
        sa.cmp(&sb)
    }

    /// Document order of an existing item against a located one.
    fn item_cmp(&self, a: ItemId, b: Pos) -> Ordering {
        // Origins of integrated items always exist, so `locate` succeeds.
        self.locate(a)
            .map_or(Ordering::Greater, |pa| self.pos_cmp(pa, b))
    }

    /// The reference `integrateYjsMod` scan, over the items after the left
    /// origin; returns the insertion point.
    fn scan(
        &self,
        new: ItemId,
        left: Option<(ItemId, Pos)>,
        right: Option<(ItemId, Pos)>,
        start: Option<Pos>,
        cmp: &dyn Fn(u32, u32) -> Ordering,
    ) -> Pos {
        let mut cur = start;
        let mut dest = None;
        let mut scanning = false;
        let mut prev: Option<ItemId> = None;
        loop {
            if !scanning {
                dest = cur;
            }
            let Some(p) = cur else { break };
            let other = self.id_at(p);
            if right.is_some_and(|(r, _)| r == other) {
                break;
            }
            let (o_left, o_right) = self.origins_of(other).unwrap_or((None, None));
            let vs_left = match (o_left, left) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Less,
                (Some(_), None) => Ordering::Greater,
                (Some(a), Some((b, bp))) => {
                    if a == b {
                        Ordering::Equal
                    } else if Some(a) == prev {
                        // The item just passed lies after the left origin;
                        // this saves a lookup for every item of a passed run.
                        Ordering::Greater
                    } else {
                        self.item_cmp(a, bp)
                    }
                }
            };
            match vs_left {
                Ordering::Less => break,
                Ordering::Equal => {
                    let vs_right = match (o_right, right) {
                        (None, None) => Ordering::Equal,
                        (None, Some(_)) => Ordering::Greater,
                        (Some(_), None) => Ordering::Less,
                        (Some(a), Some((b, bp))) => {
                            if a == b {
                                Ordering::Equal
                            } else {
                                self.item_cmp(a, bp)
                            }
                        }
                    };
                    let new_first = cmp(new.node, other.node)
                        .then(new.index.cmp(&other.index))
                        .is_lt();
                    if vs_right.is_eq() && new_first {
                        break;
                    }
                    scanning = vs_right.is_lt();
                }
                Ordering::Greater => {}
            }
            prev = Some(other);
            cur = self.next_item(p);
        }
        dest.unwrap_or(Pos {
            leaf: self.tail,
            off: self.leaves[self.tail].items.len(),
        })
    }

    /// Inserts the run's items, all visible, at insertion point `at`.
    fn insert_run(&mut self, at: Pos, first: ItemId, last: u32, text: &str, count: usize) {
        // Validation guarantees first.index + k <= last for every k < count.
        let item = |k: usize, ch: char| Item {
            id: ItemId {
                node: first.node,
                index: first.index + k as u32,
            },
            ch,
        };
        let leaf = &mut self.leaves[at.leaf];
        if leaf.items.len() + count <= self.leaf_cap {
            if count == 1 {
                let ch = text.chars().next().unwrap_or_default();
                leaf.items.insert(at.off, item(0, ch));
            } else {
                leaf.items.splice(
                    at.off..at.off,
                    text.chars().enumerate().map(|(k, ch)| item(k, ch)),
                );
            }
            leaf.visible = insert_ones(leaf.visible, at.off, count);
            self.walk_up(at.leaf, |c| *c += count);
            for block in (first.index >> BLOCK_SHIFT)..=(last >> BLOCK_SHIFT) {
                self.add_holder((first.node, block), at.leaf);
            }
            self.last = Pos {
                leaf: at.leaf,
                off: at.off + count - 1,
            };
        } else {
            let items = text
                .chars()
                .enumerate()
                .map(|(k, ch)| item(k, ch))
                .collect();
            self.split_insert(at, items);
        }
        self.len += count;
    }

    /// Inserts items into a leaf that cannot take them, spreading the leaf's
    /// items and the new ones over it and as many new leaves as needed.
    fn split_insert(&mut self, at: Pos, new_items: Vec<Item>) {
        let cap = self.leaf_cap;
        let k = new_items.len();
        let leaf_id = at.leaf;
        let (mut reuse, old_mask, at_tail) = {
            let l = &mut self.leaves[leaf_id];
            (std::mem::take(&mut l.items), l.visible, l.next == NIL)
        };
        let old_len = reuse.len();
        let old_visible = old_mask.count_ones() as usize;
        let old_blocks = block_keys(&reuse);
        let mut all: Vec<(Item, bool)> = Vec::with_capacity(old_len + k);
        all.extend(
            reuse[..at.off]
                .iter()
                .enumerate()
                .map(|(i, it)| (*it, has_bit(old_mask, i))),
        );
        all.extend(new_items.into_iter().map(|it| (it, true)));
        all.extend(
            reuse[at.off..]
                .iter()
                .enumerate()
                .map(|(i, it)| (*it, has_bit(old_mask, at.off + i))),
        );
        reuse.clear();
        let total = all.len();
        // Appending at the end of the document fills leaves completely, as
        // nothing will be inserted into them in the common case; elsewhere
        // the pieces are even so that each keeps room to grow.
        let pieces = if at_tail && at.off == old_len {
            total.div_ceil(cap)
        } else {
            total.div_ceil(cap).max(2)
        };
        let size_of = |j: usize| {
            if at_tail && at.off == old_len {
                cap.min(total - j * cap)
            } else {
                total / pieces + usize::from(j < total % pieces)
            }
        };
        let last_new = at.off + k - 1;
        let mut start = 0;
        let mut prev_leaf = leaf_id;
        for j in 0..pieces {
            let size = size_of(j);
            let mut items = if j == 0 {
                std::mem::take(&mut reuse)
            } else {
                Vec::with_capacity(cap)
            };
            let mut mask = 0u128;
            for (i, (it, vis)) in all[start..start + size].iter().enumerate() {
                items.push(*it);
                mask |= u128::from(*vis) << i;
            }
            let visible = mask.count_ones() as usize;
            let this = if j == 0 {
                let blocks = block_keys(&items);
                let l = &mut self.leaves[leaf_id];
                l.items = items;
                l.visible = mask;
                if visible >= old_visible {
                    self.walk_up(leaf_id, |c| *c += visible - old_visible);
                } else {
                    self.walk_up(leaf_id, |c| *c -= old_visible - visible);
                }
                for key in &old_blocks {
                    if blocks.binary_search(key).is_err() {
                        self.remove_holder(*key, leaf_id);
                    }
                }
                for key in blocks {
                    if old_blocks.binary_search(&key).is_err() {
                        self.add_holder(key, leaf_id);
                    }
                }
                leaf_id
            } else {
                let id = self.leaves.len();
                let next = self.leaves[prev_leaf].next;
                let blocks = block_keys(&items);
                self.leaves.push(Leaf {
                    items,
                    visible: mask,
                    parent: NIL,
                    slot: 0,
                    prev: prev_leaf,
                    next,
                });
                self.leaves[prev_leaf].next = id;
                if next == NIL {
                    self.tail = id;
                } else {
                    self.leaves[next].prev = id;
                }
                let (parent, slot) = (self.leaves[prev_leaf].parent, self.leaves[prev_leaf].slot);
                self.add_above(parent, visible);
                self.link_child(parent, slot + 1, id, visible);
                for key in blocks {
                    self.add_holder(key, id);
                }
                id
            };
            if (start..start + size).contains(&last_new) {
                self.last = Pos {
                    leaf: this,
                    off: last_new - start,
                };
            }
            prev_leaf = this;
            start += size;
        }
    }

    /// Applies `f` to the count of `leaf` in its parent and to every count
    /// above.
    fn walk_up(&mut self, leaf: usize, f: impl Fn(&mut usize)) {
        let (mut node, mut slot) = (self.leaves[leaf].parent, self.leaves[leaf].slot);
        while node != NIL {
            let inner = &mut self.inners[node];
            f(&mut inner.counts[slot]);
            (node, slot) = (inner.parent, inner.slot);
        }
    }

    /// Adds `n` to the counts of every ancestor of inner node `node`.
    fn add_above(&mut self, node: usize, n: usize) {
        let (mut node, mut slot) = (self.inners[node].parent, self.inners[node].slot);
        while node != NIL {
            let inner = &mut self.inners[node];
            inner.counts[slot] += n;
            (node, slot) = (inner.parent, inner.slot);
        }
    }

    /// Makes `child` the `slot`-th child of `parent`, counting `count`
    /// visible items; the ancestors of `parent` must already include them.
    fn link_child(&mut self, parent: usize, slot: usize, child: usize, count: usize) {
        let node = &mut self.inners[parent];
        node.children.insert(slot, child);
        node.counts.insert(slot, count);
        self.renumber(parent, slot);
        if self.inners[parent].children.len() > self.fanout {
            self.split_inner(parent);
        }
    }

    /// Points the children of `parent` from `from` on back at it.
    fn renumber(&mut self, parent: usize, from: usize) {
        let leaf_children = self.inners[parent].leaf_children;
        for slot in from..self.inners[parent].children.len() {
            let child = self.inners[parent].children[slot];
            if leaf_children {
                let l = &mut self.leaves[child];
                (l.parent, l.slot) = (parent, slot);
            } else {
                let n = &mut self.inners[child];
                (n.parent, n.slot) = (parent, slot);
            }
        }
    }

    fn split_inner(&mut self, node: usize) {
        let (children, counts, leaf_children) = {
            let n = &mut self.inners[node];
            let half = n.children.len() / 2;
            (
                n.children.split_off(half),
                n.counts.split_off(half),
                n.leaf_children,
            )
        };
        let moved: usize = counts.iter().sum();
        let sibling = self.inners.len();
        self.inners.push(Inner {
            children,
            counts,
            parent: NIL,
            slot: 0,
            leaf_children,
        });
        self.renumber(sibling, 0);
        let parent = self.inners[node].parent;
        if parent == NIL {
            let kept = self.inners[node].counts.iter().sum();
            let root = self.inners.len();
            self.inners.push(Inner {
                children: vec![node, sibling],
                counts: vec![kept, moved],
                parent: NIL,
                slot: 0,
                leaf_children: false,
            });
            self.renumber(root, 0);
            self.root = root;
        } else {
            let slot = self.inners[node].slot;
            self.inners[parent].counts[slot] -= moved;
            self.link_child(parent, slot + 1, sibling, moved);
        }
    }

    fn add_holder(&mut self, key: (u32, u32), leaf: usize) {
        match self.holders.entry(key) {
            Entry::Vacant(v) => {
                v.insert(Holders::One(leaf));
            }
            Entry::Occupied(o) => {
                let h = o.into_mut();
                match h {
                    Holders::One(l) if *l == leaf => {}
                    Holders::One(l) => {
                        let other = *l;
                        *h = Holders::Many(vec![other, leaf]);
                    }
                    Holders::Many(ls) => {
                        if !ls.contains(&leaf) {
                            ls.push(leaf);
                        }
                    }
                }
            }
        }
    }

    fn remove_holder(&mut self, key: (u32, u32), leaf: usize) {
        let Entry::Occupied(mut o) = self.holders.entry(key) else {
            return;
        };
        let keep = match o.get_mut() {
            Holders::One(l) => (*l != leaf).then_some(Holders::One(*l)),
            Holders::Many(ls) => {
                ls.retain(|&l| l != leaf);
                match ls[..] {
                    [] => None,
                    [only] => Some(Holders::One(only)),
                    _ => return,
                }
            }
        };
        match keep {
            Some(h) => *o.get_mut() = h,
            None => {
                o.remove();
            }
        }
    }

    /// The first id in `start..=last` of `node` that already exists.
    fn first_existing(&self, node: u32, start: u32, last: u32) -> Option<ItemId> {
        let runs = self.origins.get(&node)?;
        let i = runs.partition_point(|r| r.last < start);
        let r = runs.get(i).filter(|r| r.start <= last)?;
        Some(ItemId {
            node,
            index: r.start.max(start),
        })
    }

    /// Origins (left, right) of an existing item.
    fn origins_of(&self, id: ItemId) -> Option<(Option<ItemId>, Option<ItemId>)> {
        let runs = self.origins.get(&id.node)?;
        let r = runs
            .get(runs.partition_point(|r| r.last < id.index))
            .filter(|r| r.start <= id.index)?;
        if id.index == r.start {
            Some((r.left, r.right))
        } else {
            let prev = ItemId {
                node: id.node,
                index: id.index - 1,
            };
            Some((Some(prev), r.right))
        }
    }

    fn record_origins(
        &mut self,
        first: ItemId,
        last: u32,
        left: Option<ItemId>,
        right: Option<ItemId>,
    ) {
        let run = OriginRun {
            start: first.index,
            last,
            left,
            right,
        };
        let runs = self.origins.entry(first.node).or_default();
        match runs.last_mut() {
            None => runs.push(run),
            Some(r) if r.last < first.index => {
                // A node's typing usually continues its previous run.
                let continues = r.last + 1 == first.index
                    && r.right == right
                    && left
                        == Some(ItemId {
                            node: first.node,
                            index: r.last,
                        });
                if continues {
                    r.last = last;
                } else {
                    runs.push(run);
                }
            }
            Some(_) => {
                let i = runs.partition_point(|r| r.start < first.index);
                runs.insert(i, run);
            }
        }
    }
}

fn block_key(id: ItemId) -> (u32, u32) {
    (id.node, id.index >> BLOCK_SHIFT)
}

/// The distinct blocks of some items, sorted.
fn block_keys(items: &[Item]) -> Vec<(u32, u32)> {
    let mut keys: Vec<(u32, u32)> = items.iter().map(|it| block_key(it.id)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn low_bits(n: usize) -> u128 {
    if n >= 128 {
        u128::MAX
    } else {
        (1u128 << n) - 1
    }
}

fn has_bit(mask: u128, i: usize) -> bool {
    mask >> i & 1 == 1
}

/// `mask` with `n` set bits inserted at bit `at`; bits pushed past 127 are
/// dropped (callers keep `len + n <= 128`).
fn insert_ones(mask: u128, at: usize, n: usize) -> u128 {
    let high = (mask & !low_bits(at)).checked_shl(n as u32).unwrap_or(0);
    (mask & low_bits(at)) | high | (low_bits(at + n) & !low_bits(at))
}

/// Bit position of the `n`-th (0-based) set bit of `mask`, which has more
/// than `n` set bits.
fn select(mask: u128, mut n: usize) -> usize {
    let low = mask as u64;
    let low_count = low.count_ones() as usize;
    let (mut word, mut pos) = if n < low_count {
        (low, 0)
    } else {
        n -= low_count;
        ((mask >> 64) as u64, 64)
    };
    for width in [32, 16, 8, 4, 2, 1] {
        let half = word & ((1u64 << width) - 1);
        let c = half.count_ones() as usize;
        if n < c {
            word = half;
        } else {
            n -= c;
            word >>= width;
            pos += width;
        }
    }
    pos
}
impl Sequence {
    pub fn tmp_stats(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.leaves.len(),
            self.inners.len(),
            self.holders.len(),
            self.origins.values().map(|v| v.len()).sum(),
            self.leaves.iter().map(|l| l.items.len()).sum(),
        )
    }
}
