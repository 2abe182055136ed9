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
//! each child, so a visible position is found in O(log n); a cursor (the last
//! edited leaf and its visible offset) skips even that while edits stay in
//! one leaf. Leaves only ever split, as tombstones are never removed, so the
//! tree never merges nodes. Origins are not stored per item; two side tables
//! resolve ids:
//!
//! * the *origin table*: per node, a sorted list of runs of consecutive ids
//!   typed one after the other with the same right origin. It answers "does
//!   this id exist" and "what are its origins" in O(log runs) and stores
//!   origins once per run instead of once per character;
//! * the *holder index*: for each block of 16 consecutive ids of a node, the
//!   leaves holding them (nearly always one), so an id is found with one hash
//!   lookup and the scan of one leaf (at most 16 leaves).
//!
//! Costs, with n items: a local insert or delete is O(log n) plus a scan of
//! one leaf, and O(1) plus that scan while typing stays in one leaf. A remote
//! insert whose origins are still adjacent (the common case, and every local
//! insert) is an id lookup and an insert into one leaf. Only an insert racing
//! with concurrent inserts into the same gap walks the items of that gap, as
//! the reference algorithm does (about 10 ns per item passed in a typed run).
//! On the automerge-paper editing trace the structure holds about 27 bytes
//! per item (12 for the item itself, the rest mostly free room in leaves).

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
/// Children per inner node at most: a tree of 128-item leaves stays three
/// levels deep up to a few million items, and renumbering siblings after a
/// split stays cheap.
const FANOUT: usize = 32;
/// The holder index groups the ids of a node in blocks of `1 << BLOCK_SHIFT`.
const BLOCK_SHIFT: u32 = 4;
/// How far around the last edited item `locate` looks before asking the
/// holder index: backspacing and retyping stay within a few items.
const NEAR: usize = 8;
/// "No node": the parent of the root, the neighbours of the end leaves.
const NIL: usize = usize::MAX;

/// FxHash-style hasher for the id-keyed tables: keys are small integers, and
/// SipHash would cost as much as the rest of a local edit. Colliding ids
/// chosen by a hostile peer could only slow lookups down, never corrupt them.
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

impl OriginRun {
    fn contains(&self, index: u32) -> bool {
        (self.start..=self.last).contains(&index)
    }

    /// Origins (left, right) of item `id` of this run.
    fn origins(&self, id: ItemId) -> (Option<ItemId>, Option<ItemId>) {
        if id.index == self.start {
            (self.left, self.right)
        } else {
            let prev = ItemId {
                node: id.node,
                index: id.index - 1,
            };
            (Some(prev), self.right)
        }
    }
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
    /// refers to it or to an item close by, which saves an id lookup.
    last: Pos,
    /// A leaf (`NIL` for none) and the number of visible items before it,
    /// kept exact by every edit: the next edit is usually in the same leaf,
    /// which saves descending the tree.
    cursor: (usize, usize),
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

    /// Node capacities are parameters so that tests can build deep trees
    /// from few items.
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
            cursor: (NIL, 0),
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
        self.origin_run(id).is_some()
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
        let (mut leaf, mut start) = self.cursor;
        // Typing at the end of a leaf looks up the first item of the next.
        for _ in 0..2 {
            if leaf == NIL || pos < start {
                break;
            }
            let l = &self.leaves[leaf];
            let visible = l.visible.count_ones() as usize;
            if pos - start < visible {
                return Pos {
                    leaf,
                    off: select(l.visible, pos - start),
                };
            }
            (leaf, start) = (l.next, start + visible);
        }
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
        // Edits cluster (typing, backspacing): look around the last edited
        // item before asking the index. `last` may be stale, hence `get`.
        let near = self
            .leaves
            .get(self.last.leaf)
            .map_or(&[][..], |l| &l.items[..]);
        if near.get(self.last.off).is_some_and(|it| it.id == id) {
            return Some(self.last);
        }
        let from = self.last.off.saturating_sub(NEAR).min(near.len());
        let to = (self.last.off + NEAR + 1).min(near.len());
        if let Some(off) = near[from..to.max(from)].iter().position(|it| it.id == id) {
            return Some(Pos {
                leaf: self.last.leaf,
                off: from + off,
            });
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
        // Scanned items mostly come in typed runs: keep the last origin run.
        let mut run: Option<(u32, OriginRun)> = None;
        loop {
            if !scanning {
                dest = cur;
            }
            let Some(p) = cur else { break };
            let other = self.id_at(p);
            if right.is_some_and(|(r, _)| r == other) {
                break;
            }
            let in_run = run.filter(|(node, r)| *node == other.node && r.contains(other.index));
            let (o_left, o_right) =
                match in_run.or_else(|| self.origin_run(other).map(|r| (other.node, r))) {
                    Some((_, r)) => {
                        run = Some((other.node, r));
                        r.origins(other)
                    }
                    // Every integrated item has an origin run.
                    None => (None, None),
                };
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
            // When typing, the item before is the previous keystroke, whose
            // block this leaf already holds: skip the index then.
            let held = at.off.checked_sub(1).map(|i| block_key(leaf.items[i].id));
            self.walk_up(at.leaf, |c| *c += count);
            for block in (first.index >> BLOCK_SHIFT)..=(last >> BLOCK_SHIFT) {
                if held != Some((first.node, block)) {
                    self.add_holder((first.node, block), at.leaf);
                }
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
            self.split_insert(at, items, first, last);
            // Only moves the cursor to the leaf typing goes on in.
            self.walk_up(self.last.leaf, |_| {});
        }
        self.len += count;
    }

    /// Inserts items into a leaf that cannot take them, spreading the leaf's
    /// items and the new ones over it and as many new leaves as needed.
    fn split_insert(&mut self, at: Pos, new_items: Vec<Item>, first: ItemId, last: u32) {
        let cap = self.leaf_cap;
        let k = new_items.len();
        let leaf_id = at.leaf;
        let (mut reuse, old_mask) = {
            let l = &mut self.leaves[leaf_id];
            (std::mem::take(&mut l.items), l.visible)
        };
        let old_len = reuse.len();
        let old_visible = old_mask.count_ones() as usize;
        // Blocks of the new run, which the first piece may have to hold.
        let run_blocks = (first.index >> BLOCK_SHIFT)..=(last >> BLOCK_SHIFT);
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
        let typed_through = at.off + k;
        let sizes: Vec<usize> = if at.off == old_len && old_len > 0 {
            // Typing at the end of a leaf: leave it full and go on in new
            // ones, which typing will fill too.
            std::iter::once(old_len)
                .chain((0..k.div_ceil(cap)).map(|j| cap.min(k - j * cap)))
                .collect()
        } else if typed_through <= cap
            && (total - typed_through).min(typed_through) >= (cap / 4).max(1)
        {
            // Cutting right after the new items lets typing go on at the end
            // of the first piece (see above), so sequential typing in the
            // middle of a document also leaves full leaves behind.
            vec![typed_through, total - typed_through]
        } else {
            // Even pieces, each with room to grow.
            let pieces = total.div_ceil(cap);
            (0..pieces)
                .map(|j| total / pieces + usize::from(j < total % pieces))
                .collect()
        };
        let last_new = typed_through - 1;
        let mut start = 0;
        let mut prev_leaf = leaf_id;
        let mut first_blocks = Vec::new();
        for (j, &size) in sizes.iter().enumerate() {
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
                // The cursor is now this leaf, whose offset the new leaves
                // after it do not change.
                for &key in &blocks {
                    if key.0 == first.node && run_blocks.contains(&key.1) {
                        self.add_holder(key, leaf_id);
                    }
                }
                first_blocks = blocks;
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
                    // Every block the first piece lost went to a new piece.
                    if first_blocks.binary_search(&key).is_err() {
                        self.remove_holder(key, leaf_id);
                    }
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
    /// above, then makes `leaf` the cursor.
    fn walk_up(&mut self, leaf: usize, f: impl Fn(&mut usize)) {
        // Edits inside the cursor leaf leave the count before it unchanged.
        let keep = self.cursor.0 == leaf;
        let (mut node, mut slot) = (self.leaves[leaf].parent, self.leaves[leaf].slot);
        let mut before = 0;
        while node != NIL {
            let inner = &mut self.inners[node];
            f(&mut inner.counts[slot]);
            if !keep {
                before += inner.counts[..slot].iter().sum::<usize>();
            }
            (node, slot) = (inner.parent, inner.slot);
        }
        if !keep {
            self.cursor = (leaf, before);
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
        if runs.last().is_none_or(|r| r.last < start) {
            // A node's new ids usually come after all its earlier ones.
            return None;
        }
        let i = runs.partition_point(|r| r.last < start);
        let r = runs.get(i).filter(|r| r.start <= last)?;
        Some(ItemId {
            node,
            index: r.start.max(start),
        })
    }

    /// Origins (left, right) of an existing item.
    /// The origin run holding an existing item.
    fn origin_run(&self, id: ItemId) -> Option<OriginRun> {
        let runs = self.origins.get(&id.node)?;
        runs.get(runs.partition_point(|r| r.last < id.index))
            .filter(|r| r.start <= id.index)
            .copied()
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
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for it in items {
        let key = block_key(it.id);
        // Neighbouring items are mostly from the same block: this keeps the
        // sort below tiny.
        if keys.last() != Some(&key) {
            keys.push(key);
        }
    }
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
fn select(mask: u128, n: usize) -> usize {
    let low = mask as u64;
    let low_count = low.count_ones() as usize;
    if n < low_count {
        select64(low, n)
    } else {
        64 + select64((mask >> 64) as u64, n - low_count)
    }
}

/// `select` on one word without a loop over its bits: the default x86-64
/// target has no `popcnt`, so `count_ones` is a dozen instructions.
fn select64(word: u64, n: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut bytes = word - ((word >> 1) & 0x5555_5555_5555_5555);
    bytes = (bytes & 0x3333_3333_3333_3333) + ((bytes >> 2) & 0x3333_3333_3333_3333);
    bytes = (bytes + (bytes >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // Byte i of `upto` counts the set bits of bytes 0..=i (at most 64).
    let upto = bytes.wrapping_mul(ONES);
    // High bit of byte i: upto[i] > n. No byte borrows from its neighbour,
    // as each is at least 128 - 64 before masking.
    let past = ((upto | HIGH) - ONES * (n as u64 + 1)) & HIGH;
    let byte = past.trailing_zeros() as usize / 8;
    let before = ((upto << 8) >> (8 * byte)) & 0xff;
    let mut bits = (word >> (8 * byte)) & 0xff;
    for _ in 0..(n as u64 - before) {
        bits &= bits - 1;
    }
    8 * byte + bits.trailing_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    type Cmp = fn(u32, u32) -> Ordering;

    fn natural(a: u32, b: u32) -> Ordering {
        a.cmp(&b)
    }

    /// An arbitrary total order on nodes: multiplying by an odd number is a
    /// bijection on `u32`.
    fn scrambled(a: u32, b: u32) -> Ordering {
        a.wrapping_mul(0x9e37_79b9)
            .cmp(&b.wrapping_mul(0x9e37_79b9))
    }

    fn id(node: u32, index: u32) -> ItemId {
        ItemId { node, index }
    }

    /// The reference algorithm, verbatim: a plain vector of items, indices
    /// found by linear search.
    #[derive(Clone, Debug)]
    struct NaiveItem {
        id: ItemId,
        left: Option<ItemId>,
        right: Option<ItemId>,
        ch: char,
        deleted: bool,
    }

    #[derive(Clone, Debug, Default)]
    struct Naive {
        items: Vec<NaiveItem>,
    }

    impl Naive {
        fn index(&self, id: Option<ItemId>, none: isize) -> isize {
            id.map_or(none, |id| {
                self.items
                    .iter()
                    .position(|it| it.id == id)
                    .expect("known item") as isize
            })
        }

        fn integrate_one(&mut self, new: NaiveItem, cmp: Cmp) {
            let len = self.items.len() as isize;
            let left = self.index(new.left, -1);
            let right = self.index(new.right, len);
            let mut dest = left + 1;
            let mut scanning = false;
            let mut i = left + 1;
            loop {
                if !scanning {
                    dest = i;
                }
                if i == len || i == right {
                    break;
                }
                let other = &self.items[i as usize];
                let o_left = self.index(other.left, -1);
                let o_right = self.index(other.right, len);
                let new_first = cmp(new.id.node, other.id.node)
                    .then(new.id.index.cmp(&other.id.index))
                    .is_lt();
                if o_left < left || (o_left == left && o_right == right && new_first) {
                    break;
                }
                if o_left == left {
                    scanning = o_right < right;
                }
                i += 1;
            }
            self.items.insert(dest as usize, new);
        }

        fn integrate(
            &mut self,
            first: ItemId,
            left: Option<ItemId>,
            right: Option<ItemId>,
            text: &str,
            cmp: Cmp,
        ) {
            let mut left = left;
            for (k, ch) in text.chars().enumerate() {
                let this = id(first.node, first.index + k as u32);
                let item = NaiveItem {
                    id: this,
                    left,
                    right,
                    ch,
                    deleted: false,
                };
                self.integrate_one(item, cmp);
                left = Some(this);
            }
        }

        /// reference-crdts `localInsert` / `findItemAtPos`.
        fn origins_at(&self, pos: usize) -> Option<(Option<ItemId>, Option<ItemId>)> {
            let mut remaining = pos;
            let mut i = 0;
            while i < self.items.len() {
                if !self.items[i].deleted {
                    if remaining == 0 {
                        break;
                    }
                    remaining -= 1;
                }
                i += 1;
            }
            if remaining > 0 {
                return None;
            }
            let left = i.checked_sub(1).map(|j| self.items[j].id);
            Some((left, self.items.get(i).map(|it| it.id)))
        }

        fn delete(&mut self, id: ItemId) -> bool {
            let item = self
                .items
                .iter_mut()
                .find(|it| it.id == id)
                .expect("known item");
            !std::mem::replace(&mut item.deleted, true)
        }

        fn visible_ids(&self) -> Vec<ItemId> {
            self.items
                .iter()
                .filter(|it| !it.deleted)
                .map(|it| it.id)
                .collect()
        }

        fn text(&self) -> String {
            self.items
                .iter()
                .filter(|it| !it.deleted)
                .map(|it| it.ch)
                .collect()
        }

        fn raw(&self) -> Vec<(ItemId, char, bool)> {
            self.items
                .iter()
                .map(|it| (it.id, it.ch, it.deleted))
                .collect()
        }
    }

    impl Sequence {
        /// Every item in document order: id, char, deleted.
        fn raw(&self) -> Vec<(ItemId, char, bool)> {
            let mut out = Vec::new();
            let mut leaf = 0;
            while leaf != NIL {
                let l = &self.leaves[leaf];
                for (i, it) in l.items.iter().enumerate() {
                    out.push((it.id, it.ch, !has_bit(l.visible, i)));
                }
                leaf = l.next;
            }
            out
        }

        /// Checks every structural invariant; panics on a violation.
        fn check_invariants(&self) {
            // Leaf chain.
            let mut chain = Vec::new();
            let mut leaf = 0;
            let mut prev = NIL;
            while leaf != NIL {
                let l = &self.leaves[leaf];
                assert_eq!(l.prev, prev, "prev link of leaf {leaf}");
                assert!(l.items.len() <= self.leaf_cap);
                assert_eq!(l.visible & !low_bits(l.items.len()), 0, "stray flags");
                chain.push(leaf);
                prev = leaf;
                leaf = l.next;
            }
            assert_eq!(self.tail, prev);
            assert_eq!(chain.len(), self.leaves.len(), "every leaf is chained");
            if chain.len() > 1 {
                assert!(self.leaves.iter().all(|l| !l.items.is_empty()));
            }
            // Tree: counts, back links, depth, in-order leaves.
            let mut in_order = Vec::new();
            let mut depth = None;
            let mut stack = vec![(self.root, 0usize)];
            assert_eq!(self.inners[self.root].parent, NIL);
            let mut inner_count = 0;
            while let Some((node, d)) = stack.pop() {
                inner_count += 1;
                let n = &self.inners[node];
                assert_eq!(n.children.len(), n.counts.len());
                assert!(!n.children.is_empty() && n.children.len() <= self.fanout);
                for (slot, (&child, &count)) in n.children.iter().zip(&n.counts).enumerate() {
                    if n.leaf_children {
                        let l = &self.leaves[child];
                        assert_eq!((l.parent, l.slot), (node, slot));
                        assert_eq!(count, l.visible.count_ones() as usize);
                        assert_eq!(*depth.get_or_insert(d), d, "leaves at one depth");
                    } else {
                        let c = &self.inners[child];
                        assert_eq!((c.parent, c.slot), (node, slot));
                        assert_eq!(count, c.counts.iter().sum::<usize>());
                    }
                }
                if n.leaf_children {
                    in_order.extend(n.children.iter().copied());
                } else {
                    stack.extend(n.children.iter().rev().map(|&c| (c, d + 1)));
                }
            }
            assert_eq!(inner_count, self.inners.len());
            if self.cursor.0 != NIL {
                let at = chain
                    .iter()
                    .position(|&l| l == self.cursor.0)
                    .expect("cursor leaf");
                let before: u32 = chain[..at]
                    .iter()
                    .map(|&l| self.leaves[l].visible.count_ones())
                    .sum();
                assert_eq!(self.cursor.1, before as usize, "cursor offset");
            }
            assert_eq!(in_order, chain, "tree order is chain order");
            assert_eq!(
                self.len,
                self.inners[self.root].counts.iter().sum::<usize>()
            );
            // Id tables: holders exactly as the leaves say, ids locatable.
            let mut expected: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
            let mut items = 0u64;
            for (l, leaf) in self.leaves.iter().enumerate() {
                for (off, it) in leaf.items.iter().enumerate() {
                    items += 1;
                    let holders = expected.entry(block_key(it.id)).or_default();
                    if holders.last() != Some(&l) {
                        holders.push(l);
                    }
                    if items.is_multiple_of(7) {
                        assert_eq!(self.locate(it.id), Some(Pos { leaf: l, off }));
                    }
                }
            }
            assert_eq!(expected.len(), self.holders.len());
            for (key, want) in expected {
                let mut got = match &self.holders[&key] {
                    Holders::One(h) => vec![*h],
                    Holders::Many(hs) => {
                        assert!(hs.len() > 1);
                        hs.clone()
                    }
                };
                // `want` lists leaves in index order, once each.
                got.sort_unstable();
                assert_eq!(got, want, "holders of {key:?}");
            }
            let mut ids = 0u64;
            for runs in self.origins.values() {
                for w in runs.windows(2) {
                    assert!(w[0].last < w[1].start);
                }
                ids += runs
                    .iter()
                    .map(|r| u64::from(r.last - r.start) + 1)
                    .sum::<u64>();
            }
            assert_eq!(ids, items);
        }
    }

    /// Types `text` forward at `pos`, one char per operation, as an editor
    /// sends keystrokes; returns the operations.
    fn type_forward(
        seq: &mut Sequence,
        node: u32,
        next: &mut u32,
        pos: usize,
        text: &str,
    ) -> Vec<Op> {
        let mut ops = Vec::new();
        for (k, ch) in text.chars().enumerate() {
            ops.push(local_insert(
                seq,
                node,
                next,
                pos + k,
                &ch.to_string(),
                natural,
            ));
        }
        ops
    }

    /// Types each char of `text` at the same position `pos` (the cursor
    /// stays put, so the text appears reversed).
    fn type_backward(
        seq: &mut Sequence,
        node: u32,
        next: &mut u32,
        pos: usize,
        text: &str,
    ) -> Vec<Op> {
        text.chars()
            .map(|ch| local_insert(seq, node, next, pos, &ch.to_string(), natural))
            .collect()
    }

    fn local_insert(
        seq: &mut Sequence,
        node: u32,
        next: &mut u32,
        pos: usize,
        text: &str,
        cmp: Cmp,
    ) -> Op {
        let (left, right) = seq.origins_at(pos).expect("position in range");
        let first = id(node, *next);
        seq.integrate(first, left, right, text, &cmp)
            .expect("local insert");
        *next += text.chars().count() as u32;
        Op::Insert {
            first,
            left,
            right,
            text: text.to_string(),
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert {
            first: ItemId,
            left: Option<ItemId>,
            right: Option<ItemId>,
            text: String,
        },
        Delete(ItemId),
    }

    fn apply(seq: &mut Sequence, op: &Op, cmp: Cmp) -> Result<bool, SeqError> {
        match op {
            Op::Insert {
                first,
                left,
                right,
                text,
            } => seq
                .integrate(*first, *left, *right, text, &cmp)
                .map(|()| true),
            Op::Delete(id) => seq.delete(*id),
        }
    }

    fn apply_naive(naive: &mut Naive, op: &Op, cmp: Cmp) -> bool {
        match op {
            Op::Insert {
                first,
                left,
                right,
                text,
            } => {
                naive.integrate(*first, *left, *right, text, cmp);
                true
            }
            Op::Delete(id) => naive.delete(*id),
        }
    }

    /// An operation as broadcast: who made it, its number among that
    /// replica's operations, and how many operations of each replica its
    /// author had applied (a vector clock) for causal delivery.
    #[derive(Debug)]
    struct Logged {
        op: Op,
        author: usize,
        clock: Vec<usize>,
    }

    struct Replica {
        node: u32,
        seq: Sequence,
        naive: Naive,
        next: u32,
        /// Operations applied from each replica (its own included).
        seen: Vec<usize>,
        /// Where this replica's user is typing, to produce runs.
        cursor: usize,
        /// Operations applied, to space out the costly invariant checks.
        ops: usize,
    }

    impl Replica {
        fn agrees(&mut self) {
            assert_eq!(self.seq.raw(), self.naive.raw());
            assert_eq!(self.seq.text(), self.naive.text());
            assert_eq!(self.seq.len(), self.naive.visible_ids().len());
            self.ops += 1;
            if self.ops.is_multiple_of(8) || self.seq.leaves.len() < 4 {
                self.seq.check_invariants();
            }
        }

        fn applied(&self, l: &Logged) -> bool {
            l.clock[l.author] < self.seen[l.author]
        }

        fn ready(&self, l: &Logged) -> bool {
            l.clock[l.author] == self.seen[l.author]
                && l.clock
                    .iter()
                    .zip(&self.seen)
                    .enumerate()
                    .all(|(j, (c, s))| j == l.author || c <= s)
        }
    }

    const ALPHABET: [char; 8] = ['a', 'b', 'c', 'x', 'y', 'é', 'ß', '🦀'];

    /// Random local edits on several replicas, exchanged in random causal
    /// orders with duplicates. Every replica is checked against a naive
    /// reference replica fed the same operations, after every operation, and
    /// at the end all replicas must hold the same items as a reference that
    /// applied every operation in the order they were made.
    fn run_session(seed: u64, replicas: usize, steps: usize, caps: (usize, usize), cmp: Cmp) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut log: Vec<Logged> = Vec::new();
        let mut reps: Vec<Replica> = (0..replicas)
            .map(|i| Replica {
                node: 5 + 3 * i as u32,
                seq: Sequence::with_caps(caps.0, caps.1),
                naive: Naive::default(),
                next: 0,
                seen: vec![0; replicas],
                cursor: 0,
                ops: 0,
            })
            .collect();
        for _ in 0..steps {
            let r = rng.random_range(0..replicas);
            let choice = rng.random_range(0..10);
            let rep = &mut reps[r];
            if choice < 5 {
                let len = rep.seq.len();
                let pos = if rng.random_bool(0.6) {
                    rep.cursor.min(len)
                } else {
                    rng.random_range(0..=len)
                };
                let n = if rng.random_bool(0.7) {
                    1
                } else {
                    rng.random_range(2..=6)
                };
                let text: String = (0..n)
                    .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
                    .collect();
                let expected = rep.naive.origins_at(pos);
                let op = local_insert(&mut rep.seq, rep.node, &mut rep.next, pos, &text, cmp);
                let Op::Insert { left, right, .. } = &op else {
                    unreachable!()
                };
                assert_eq!(expected, Some((*left, *right)));
                apply_naive(&mut rep.naive, &op, cmp);
                let typed: String = rep.seq.text().chars().skip(pos).take(n).collect();
                assert_eq!(typed, text);
                // Mostly forward typing, sometimes backwards.
                rep.cursor = if rng.random_bool(0.8) { pos + n } else { pos };
                log.push(Logged {
                    op,
                    author: r,
                    clock: rep.seen.clone(),
                });
                rep.seen[r] += 1;
                rep.agrees();
            } else if choice < 7 {
                let len = rep.seq.len();
                if len == 0 {
                    continue;
                }
                let pos = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - pos).min(4));
                let runs = rep.seq.visible_runs(pos, n).expect("range in bounds");
                let ids: Vec<ItemId> = runs
                    .iter()
                    .flat_map(|&(first, k)| (0..k).map(move |j| id(first.node, first.index + j)))
                    .collect();
                assert_eq!(ids, rep.naive.visible_ids()[pos..pos + n]);
                for w in runs.windows(2) {
                    let (a, k) = w[0];
                    assert!(
                        a.node != w[1].0.node || a.index + k != w[1].0.index,
                        "runs are maximal"
                    );
                }
                rep.cursor = pos;
                for target in ids {
                    let op = Op::Delete(target);
                    assert_eq!(apply(&mut rep.seq, &op, cmp), Ok(true));
                    assert!(apply_naive(&mut rep.naive, &op, cmp));
                    log.push(Logged {
                        op,
                        author: r,
                        clock: rep.seen.clone(),
                    });
                    rep.seen[r] += 1;
                    rep.agrees();
                }
            } else {
                for _ in 0..rng.random_range(1..=6) {
                    deliver_one(&mut reps[r], &log, &mut rng, cmp);
                }
            }
        }
        // Deliver everything that is left, still in random causal orders.
        for rep in &mut reps {
            while deliver_one(rep, &log, &mut rng, cmp) {}
            assert!(log.iter().all(|l| rep.applied(l)), "all delivered");
        }
        let mut reference = Naive::default();
        for l in &log {
            apply_naive(&mut reference, &l.op, cmp);
        }
        for rep in &reps {
            rep.seq.check_invariants();
            assert_eq!(rep.seq.raw(), reference.raw(), "convergence");
            assert_eq!(rep.seq.text(), reference.text());
        }
    }

    /// Delivers one random ready operation to `rep`, or (sometimes) one it
    /// already has; returns false when nothing new was ready.
    fn deliver_one(rep: &mut Replica, log: &[Logged], rng: &mut ChaCha8Rng, cmp: Cmp) -> bool {
        if rng.random_bool(0.15) {
            let old: Vec<&Logged> = log.iter().filter(|l| rep.applied(l)).collect();
            if !old.is_empty() {
                let l = old[rng.random_range(0..old.len())];
                let before = rep.seq.raw();
                match &l.op {
                    Op::Insert { first, .. } => {
                        assert_eq!(
                            apply(&mut rep.seq, &l.op, cmp),
                            Err(SeqError::DuplicateItem(*first))
                        );
                    }
                    Op::Delete(_) => assert_eq!(apply(&mut rep.seq, &l.op, cmp), Ok(false)),
                }
                assert_eq!(rep.seq.raw(), before, "duplicates change nothing");
                rep.seq.check_invariants();
            }
        }
        let ready: Vec<&Logged> = log.iter().filter(|l| rep.ready(l)).collect();
        if ready.is_empty() {
            return false;
        }
        let l = ready[rng.random_range(0..ready.len())];
        let expected = apply_naive(&mut rep.naive, &l.op, cmp);
        assert_eq!(apply(&mut rep.seq, &l.op, cmp), Ok(expected));
        rep.seen[l.author] += 1;
        rep.agrees();
        true
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 48,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_sessions_match_reference_and_converge(
            seed in any::<u64>(),
            replicas in 2usize..=4,
            leaf_cap in 2usize..=6,
            fanout in 3usize..=5,
            scramble in any::<bool>(),
        ) {
            let cmp: Cmp = if scramble { scrambled } else { natural };
            run_session(seed, replicas, 250, (leaf_cap, fanout), cmp);
        }
    }

    #[test]
    fn long_session_with_production_sizes() {
        run_session(7, 3, 2000, (LEAF_CAP, FANOUT), natural);
    }

    #[test]
    fn long_session_with_deep_tree() {
        run_session(11, 4, 1500, (3, 3), scrambled);
    }

    /// Edits a replica's sequence as the given node; returns the operations.
    type Script = dyn Fn(&mut Sequence, u32) -> Vec<Op>;

    /// Replicas that share the text `base` (typed by node 1) each run one
    /// editing script as node 2, 3, ..., then exchange operations in both
    /// orders; returns the converged text.
    fn concurrently(base: &str, scripts: &[&Script], cmp: Cmp) -> String {
        let mut origin = Sequence::new();
        let base_ops = type_forward(&mut origin, 1, &mut 0, 0, base);
        let mut made = Vec::new();
        for (k, script) in scripts.iter().enumerate() {
            let mut seq = Sequence::with_caps(4, 3);
            for op in &base_ops {
                apply(&mut seq, op, cmp).expect("base");
            }
            made.push(script(&mut seq, 2 + k as u32));
        }
        let mut texts = Vec::new();
        for order in [false, true] {
            let mut seq = Sequence::with_caps(4, 3);
            for op in &base_ops {
                apply(&mut seq, op, cmp).expect("base");
            }
            let mut batches: Vec<&Vec<Op>> = made.iter().collect();
            if order {
                batches.reverse();
            }
            for op in batches.into_iter().flatten() {
                apply(&mut seq, op, cmp).expect("exchange");
            }
            seq.check_invariants();
            texts.push(seq.text());
        }
        assert_eq!(texts[0], texts[1], "convergence");
        texts.swap_remove(0)
    }

    fn forward(text: &'static str) -> impl Fn(&mut Sequence, u32) -> Vec<Op> {
        move |seq, node| type_forward(seq, node, &mut 0, 1, text)
    }

    fn backward(text: &'static str) -> impl Fn(&mut Sequence, u32) -> Vec<Op> {
        move |seq, node| type_backward(seq, node, &mut 0, 1, text)
    }

    const ORDERS: [Cmp; 3] = [natural, scrambled, |a, b| b.cmp(&a)];

    #[test]
    fn concurrent_forward_runs_do_not_interleave() {
        for cmp in ORDERS {
            let text = concurrently("xy", &[&forward("abcd"), &forward("wxyz")], cmp);
            assert!(text == "xabcdwxyzy" || text == "xwxyzabcdy", "{text}");
            let text = concurrently(
                "xy",
                &[&forward("abc"), &forward("lmn"), &forward("uvw")],
                cmp,
            );
            let middle = &text[1..text.len() - 1];
            assert!(
                ["abc", "lmn", "uvw"].iter().all(|run| middle.contains(run)),
                "{text}"
            );
        }
    }

    /// Fugue's guarantee covers runs typed backwards (each char at the same
    /// position) as well.
    #[test]
    fn concurrent_backward_runs_do_not_interleave() {
        for cmp in ORDERS {
            let text = concurrently("xy", &[&backward("abcd"), &backward("wxyz")], cmp);
            assert!(text == "xdcbazyxwy" || text == "xzyxwdcbay", "{text}");
            let text = concurrently("xy", &[&forward("abcd"), &backward("wxyz")], cmp);
            assert!(text == "xabcdzyxwy" || text == "xzyxwabcdy", "{text}");
        }
    }

    #[test]
    fn rejected_inserts_change_nothing() {
        let mut seq = Sequence::with_caps(2, 3);
        seq.integrate(id(1, 0), None, None, "hello", &natural)
            .unwrap();
        seq.integrate(id(1, 10), Some(id(1, 4)), None, "ab", &natural)
            .unwrap();
        let before = seq.raw();
        let unknown = id(9, 9);
        let rejected = [
            (
                id(2, 0),
                Some(unknown),
                None,
                "x",
                SeqError::UnknownOrigin(unknown),
            ),
            (
                id(2, 0),
                Some(id(1, 4)),
                Some(unknown),
                "x",
                SeqError::UnknownOrigin(unknown),
            ),
            (
                id(2, 0),
                None,
                Some(id(1, 5)),
                "x",
                SeqError::UnknownOrigin(id(1, 5)),
            ),
            (
                id(2, 0),
                None,
                Some(unknown),
                "",
                SeqError::UnknownOrigin(unknown),
            ),
            (
                id(2, 0),
                Some(unknown),
                None,
                "",
                SeqError::UnknownOrigin(unknown),
            ),
            (id(1, 0), None, None, "x", SeqError::DuplicateItem(id(1, 0))),
            (
                id(1, 3),
                None,
                None,
                "xyz",
                SeqError::DuplicateItem(id(1, 3)),
            ),
            (
                id(1, 7),
                None,
                None,
                "wxyz",
                SeqError::DuplicateItem(id(1, 10)),
            ),
            (
                id(1, 11),
                None,
                None,
                "xyz",
                SeqError::DuplicateItem(id(1, 11)),
            ),
            (
                id(4, u32::MAX - 1),
                None,
                None,
                "abc",
                SeqError::IdOverflow(id(4, u32::MAX - 1)),
            ),
        ];
        for (first, left, right, text, err) in rejected {
            assert_eq!(seq.integrate(first, left, right, text, &natural), Err(err));
            assert_eq!(seq.raw(), before);
            assert!(!err.to_string().is_empty());
        }
        // An empty run with known origins is accepted and inserts nothing.
        assert_eq!(
            seq.integrate(id(2, 0), Some(id(1, 1)), Some(id(1, 2)), "", &natural),
            Ok(())
        );
        assert_eq!(seq.raw(), before);
        // Ids may arrive out of order within a node, up to the last index.
        seq.integrate(id(1, 6), Some(id(1, 0)), Some(id(1, 1)), "123", &natural)
            .unwrap();
        seq.integrate(id(4, u32::MAX - 1), None, Some(id(1, 0)), "yz", &natural)
            .unwrap();
        assert!(seq.contains(id(4, u32::MAX)) && seq.contains(id(1, 8)) && !seq.contains(id(1, 9)));
        assert_eq!(seq.text(), "yzh123elloab");
        seq.check_invariants();
    }

    #[test]
    fn delete_is_idempotent_and_rejects_unknown_ids() {
        let mut seq = Sequence::new();
        seq.integrate(id(1, 0), None, None, "abc", &natural)
            .unwrap();
        assert_eq!(seq.delete(id(1, 1)), Ok(true));
        assert_eq!(seq.delete(id(1, 1)), Ok(false));
        assert_eq!(seq.delete(id(1, 3)), Err(SeqError::UnknownOrigin(id(1, 3))));
        assert_eq!(seq.delete(id(2, 0)), Err(SeqError::UnknownOrigin(id(2, 0))));
        assert_eq!((seq.text().as_str(), seq.len()), ("ac", 2));
        assert!(seq.contains(id(1, 1)), "tombstones stay");
        seq.check_invariants();
    }

    #[test]
    fn positions_out_of_range_are_rejected() {
        let mut seq = Sequence::default();
        assert!(seq.is_empty());
        assert_eq!(seq.origins_at(0), Some((None, None)));
        assert_eq!(seq.origins_at(1), None);
        assert_eq!(seq.visible_runs(0, 0), Some(vec![]));
        assert_eq!(seq.visible_runs(0, 1), None);
        seq.integrate(id(1, 0), None, None, "abc", &natural)
            .unwrap();
        seq.delete(id(1, 2)).unwrap();
        // At the end, the left origin is the last item even if deleted.
        assert_eq!(seq.origins_at(2), Some((Some(id(1, 2)), None)));
        assert_eq!(seq.origins_at(3), None);
        assert_eq!(seq.origins_at(usize::MAX), None);
        assert_eq!(seq.visible_runs(2, 0), Some(vec![]));
        assert_eq!(seq.visible_runs(2, 1), None);
        assert_eq!(seq.visible_runs(1, usize::MAX), None);
        assert_eq!(seq.visible_runs(usize::MAX, 1), None);
    }

    #[test]
    fn visible_runs_merge_consecutive_ids_across_tombstones() {
        let mut seq = Sequence::with_caps(2, 3);
        seq.integrate(id(1, 0), None, None, "abcd", &natural)
            .unwrap();
        seq.integrate(id(2, 0), Some(id(1, 1)), Some(id(1, 2)), "XY", &natural)
            .unwrap();
        assert_eq!(seq.text(), "abXYcd");
        assert_eq!(
            seq.visible_runs(0, 6),
            Some(vec![(id(1, 0), 2), (id(2, 0), 2), (id(1, 2), 2)])
        );
        seq.delete(id(2, 0)).unwrap();
        seq.delete(id(2, 1)).unwrap();
        assert_eq!(seq.visible_runs(0, 4), Some(vec![(id(1, 0), 4)]));
        assert_eq!(seq.visible_runs(1, 2), Some(vec![(id(1, 1), 2)]));
        seq.delete(id(1, 2)).unwrap();
        assert_eq!(
            seq.visible_runs(0, 3),
            Some(vec![(id(1, 0), 2), (id(1, 3), 1)])
        );
    }

    #[test]
    fn write_text_appends() {
        let mut seq = Sequence::new();
        seq.integrate(id(1, 0), None, None, "héllo 🦀", &natural)
            .unwrap();
        let mut out = String::from(">");
        seq.write_text(&mut out);
        assert_eq!(out, ">héllo 🦀");
        assert_eq!(seq.len(), 7);
        assert_eq!(seq.origins_at(7), Some((Some(id(1, 6)), None)));
    }

    /// Runs longer than a leaf, pasted at the start, middle and end, split
    /// into several leaves at once.
    #[test]
    fn long_runs_fill_several_leaves() {
        for caps in [(2, 3), (5, 4), (LEAF_CAP, FANOUT)] {
            let mut seq = Sequence::with_caps(caps.0, caps.1);
            let mut naive = Naive::default();
            let mut next = 0;
            let long: String = (0..1000).map(|i| ALPHABET[i % ALPHABET.len()]).collect();
            for (k, pos) in [0usize, 0, 500, 1350, 1000, 1].into_iter().enumerate() {
                let text = &long[..long
                    .char_indices()
                    .nth(300 + 150 * k)
                    .map_or(long.len(), |(b, _)| b)];
                let op = local_insert(&mut seq, 1, &mut next, pos, text, natural);
                apply_naive(&mut naive, &op, natural);
                assert_eq!(seq.raw(), naive.raw());
                seq.check_invariants();
            }
            let n = seq.len();
            for pos in [0, n / 3, n - 3] {
                let (first, _) = seq.visible_runs(pos, 1).unwrap()[0];
                seq.delete(first).unwrap();
                naive.delete(first);
            }
            assert_eq!(seq.raw(), naive.raw());
            seq.check_invariants();
        }
    }

    #[test]
    fn select_finds_the_nth_set_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let mask: u128 = rng.random::<u128>() & rng.random::<u128>();
            let positions: Vec<usize> = (0..128).filter(|&i| has_bit(mask, i)).collect();
            for (n, &p) in positions.iter().enumerate() {
                assert_eq!(select(mask, n), p);
            }
        }
        assert_eq!(select(u128::MAX, 127), 127);
        assert_eq!(select(1 << 127, 0), 127);
    }
}
