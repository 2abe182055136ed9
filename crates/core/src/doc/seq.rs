//! Sequence CRDT for the text of a Syncline document.
//!
//! Every replica keeps a [`Sequence`]; local edits and edits received from
//! other replicas are applied to it with [`Sequence::integrate`] and
//! [`Sequence::delete_run`], and replicas that have applied the same set of
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
//! Every character is an item with two *origins*: the item that was
//! immediately to its left and the one immediately to its right when it was
//! typed. An insert is placed between its origins; when other replicas
//! inserted concurrently into the same gap, a scan over the items in that
//! gap decides the order, comparing the origins of the items it passes and,
//! for inserts with identical origins, the items' identities (through a
//! total order chosen by the caller).
//!
//! # Why deleted characters stay
//!
//! A delete only marks its item as a tombstone. A concurrent insert may name
//! a deleted character as an origin, and the scan above needs the *position*
//! of every origin to place inserts identically on every replica; dropping
//! tombstones would make replicas diverge. Their content goes, though: only
//! positions are ever needed again.
//!
//! # Representation: runs, not characters
//!
//! Items are numbered with *local versions* ([`Lv`]): the caller numbers the
//! characters of its history consecutively as it applies them, so a typing
//! burst is a range of consecutive numbers. The sequence stores *spans*: a
//! range of consecutive numbers, next to each other in the document, all
//! visible or all deleted, each item after the first having the item before
//! it as left origin and the span's right origin as its own (exactly how a
//! run is typed). A span costs 16 bytes whatever its length, so memory
//! follows the number of cursor jumps and deletions, not keystrokes
//! (diamond-types' layout). Typing at the end of a span extends it.
//!
//! Spans live in leaves of at most 62 (one `u64` of visibility flags each),
//! with the leaf's visible text, under a B+tree of inner nodes that count
//! visible characters, so a visible position is found in O(log n); a cursor
//! (the last edited leaf and the visible characters before it) skips even
//! that while edits stay in one leaf. A *holder index* maps each block of
//! 64 consecutive numbers to the leaves holding them (nearly always one),
//! so an item is found with one hash lookup and a scan of one leaf.
//!
//! Costs, with s spans: a local insert or delete is O(log s) plus a scan of
//! one leaf, O(1) plus that scan while typing stays in one leaf. A remote
//! insert whose origins are still adjacent (the common case, and every local
//! insert) is a lookup and an insert into one leaf. Only an insert racing
//! with concurrent inserts into the same gap scans the gap, one step per
//! span passed.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use crate::checkpoint::{CheckpointError, In, Out, Read};

/// The local number of one character (see the module docs).
pub type Lv = u32;

/// Why an operation was rejected. A rejected operation changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqError {
    /// An origin of an insert is not in the sequence.
    UnknownOrigin(Lv),
    /// An item of the inserted run is already in the sequence.
    DuplicateItem(Lv),
    /// The run's numbers would go past `u32::MAX`; carries its first.
    IdOverflow(Lv),
}

impl fmt::Display for SeqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOrigin(lv) => write!(f, "unknown item {lv}"),
            Self::DuplicateItem(lv) => write!(f, "item {lv} already exists"),
            Self::IdOverflow(lv) => write!(f, "run starting at item {lv} overflows"),
        }
    }
}

impl std::error::Error for SeqError {}

/// Spans per leaf at most. A leaf keeps its visibility flags in one `u64`,
/// and an edit adds at most two spans before the leaf splits.
const LEAF_CAP: usize = 62;
/// A leaf whose text grows past this many bytes splits (between spans),
/// so that typing into it moves little memory.
const LEAF_TEXT: usize = 1024;
/// Children per inner node at most.
const FANOUT: usize = 32;
/// The holder index groups numbers in blocks of `1 << BLOCK_SHIFT`.
const BLOCK_SHIFT: u32 = 6;
/// "No node": the parent of the root, the neighbours of the end leaves.
const NIL: usize = usize::MAX;
/// "No origin" in a span.
const NONE: Lv = Lv::MAX;

/// FxHash-style hasher for the block-keyed holder table: keys are small
/// integers, and SipHash would cost as much as the rest of a local edit.
#[derive(Clone, Copy, Debug, Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(n)).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the entropy in the high bits; hashbrown picks
        // buckets with the low ones.
        self.0.rotate_left(26)
    }
}

type BlockMap<V> = HashMap<u32, V, BuildHasherDefault<BlockHasher>>;

fn opt(lv: Lv) -> Option<Lv> {
    (lv != NONE).then_some(lv)
}

fn raw(lv: Option<Lv>) -> Lv {
    lv.unwrap_or(NONE)
}

/// Consecutive items; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Number of the first item.
    pub lv: Lv,
    /// Items in the span (at least 1).
    pub len: u32,
    /// Left origin of the first item (`Lv::MAX`: none).
    left: Lv,
    /// Right origin of every item (`Lv::MAX`: none).
    right: Lv,
}

impl Span {
    fn end(&self) -> Lv {
        self.lv + self.len
    }

    fn contains(&self, lv: Lv) -> bool {
        (self.lv..self.end()).contains(&lv)
    }

    /// Origins (left, right) of item `off` of the span.
    fn origins(&self, off: u32) -> (Option<Lv>, Option<Lv>) {
        let left = if off == 0 {
            opt(self.left)
        } else {
            Some(self.lv + off - 1)
        };
        (left, opt(self.right))
    }

    /// The span's items from `off` on (`0 < off < len`).
    fn split_off(&mut self, off: u32) -> Span {
        debug_assert!(off > 0 && off < self.len);
        let rest = Span {
            lv: self.lv + off,
            len: self.len - off,
            left: self.lv + off - 1,
            right: self.right,
        };
        self.len = off;
        rest
    }
}

/// Leaves holding at least one item of a block.
#[derive(Clone, Debug)]
enum Holders {
    One(usize),
    Many(Vec<usize>),
}

#[derive(Clone, Debug)]
struct Leaf {
    spans: Vec<Span>,
    /// Bit `i` is set when `spans[i]` is visible.
    visible: u64,
    /// The visible characters of the leaf, in order.
    text: String,
    /// Visible characters (`text.chars().count()`).
    chars: usize,
    parent: usize,
    /// Index of this leaf among its parent's children.
    slot: usize,
    prev: usize,
    next: usize,
}

impl Leaf {
    fn is_visible(&self, span: usize) -> bool {
        self.visible >> span & 1 == 1
    }

    /// Byte offset in `text` where the visible characters of spans before
    /// `span`, plus `off` more, end.
    fn byte_at(&self, span: usize, off: u32) -> usize {
        let inside = if span < self.spans.len() && self.is_visible(span) {
            off as usize
        } else {
            0
        };
        let chars: usize = (0..span)
            .filter(|&i| self.is_visible(i))
            .map(|i| self.spans[i].len as usize)
            .sum::<usize>()
            + inside;
        if self.text.len() == self.chars {
            // All ASCII: characters are bytes.
            return chars;
        }
        self.text
            .char_indices()
            .nth(chars)
            .map_or(self.text.len(), |(b, _)| b)
    }

    /// Inserts `n` bits at `at` of the visibility flags, set to `visible`.
    fn insert_flags(&mut self, at: usize, n: usize, visible: bool) {
        let low = low_bits(at);
        let high = (self.visible & !low).checked_shl(n as u32).unwrap_or(0);
        let new = if visible { low_bits(at + n) & !low } else { 0 };
        self.visible = (self.visible & low) | high | new;
    }
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

/// An item (`off < len` of span `span`), or, as an insertion point, the gap
/// before it (`span == spans.len()` is the gap at the leaf's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    leaf: usize,
    span: usize,
    off: u32,
}

/// A change of the visible text: at visible position `pos` (in
/// characters), `deleted` characters went and `inserted` came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextEdit {
    /// Where, in characters from the start, when it happened.
    pub pos: usize,
    /// Characters removed there.
    pub deleted: usize,
    /// Text inserted there.
    pub inserted: String,
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
    holders: BlockMap<Holders>,
    /// One past the largest number inserted: the caller numbers new
    /// characters upwards, so a number from here on is new without a
    /// lookup.
    end: Lv,
    /// Where the last inserted or deleted item is: the next edit usually
    /// refers to it or to an item close by, which saves a lookup.
    last: Pos,
    /// A leaf (`NIL` for none) and the number of visible items before it,
    /// kept exact by every edit: the next edit is usually in the same leaf,
    /// which saves descending the tree.
    cursor: (usize, usize),
    leaf_cap: usize,
    fanout: usize,
    /// Edits of the visible text since last taken, while recorded (see
    /// [`Sequence::record_edits`]).
    edits: Option<Vec<TextEdit>>,
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
                spans: Vec::new(),
                visible: 0,
                text: String::new(),
                chars: 0,
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
            holders: BlockMap::default(),
            end: 0,
            last: Pos {
                leaf: 0,
                span: 0,
                off: 0,
            },
            cursor: (NIL, 0),
            leaf_cap: leaf_cap.clamp(3, LEAF_CAP),
            fanout: fanout.max(3),
            edits: None,
        }
    }

    /// Starts (or stops) recording each change of the visible text as a
    /// [`TextEdit`], for [`Sequence::take_edits`].
    pub fn record_edits(&mut self, on: bool) {
        match (on, &self.edits) {
            (true, None) => self.edits = Some(Vec::new()),
            (false, _) => self.edits = None,
            (true, Some(_)) => {}
        }
    }

    /// The edits recorded since the last call, in the order they happened.
    pub fn take_edits(&mut self) -> Vec<TextEdit> {
        self.edits.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Visible items before item (or gap) `p`.
    fn visible_position(&self, p: Pos) -> usize {
        let leaf = &self.leaves[p.leaf];
        let mut pos: usize = (0..p.span.min(leaf.spans.len()))
            .filter(|&i| leaf.is_visible(i))
            .map(|i| leaf.spans[i].len as usize)
            .sum();
        if p.span < leaf.spans.len() && leaf.is_visible(p.span) {
            pos += p.off as usize;
        }
        let (mut node, mut slot) = (leaf.parent, leaf.slot);
        while node != NIL {
            let inner = &self.inners[node];
            pos += inner.counts[..slot].iter().sum::<usize>();
            (node, slot) = (inner.parent, inner.slot);
        }
        pos
    }

    /// Visible characters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no character is visible.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Spans held (a measure of the sequence's size).
    pub fn spans(&self) -> usize {
        self.leaves.iter().map(|l| l.spans.len()).sum()
    }

    /// Origins for a local insert before visible position `pos` (`0..=len`):
    /// origin_left is the item immediately before the `pos`-th visible item
    /// (possibly a tombstone), `None` at the start; origin_right is the
    /// `pos`-th visible item, `None` at the end (as reference-crdts'
    /// `localInsert`). `None` when `pos > len`.
    pub fn origins_at(&self, pos: usize) -> Option<(Option<Lv>, Option<Lv>)> {
        match pos.cmp(&self.len) {
            Ordering::Greater => None,
            Ordering::Equal => Some((
                self.leaves[self.tail].spans.last().map(|s| s.end() - 1),
                None,
            )),
            Ordering::Less => {
                let p = self.find_visible(pos);
                let left = self.prev_item(p).map(|q| self.item(q));
                Some((left, Some(self.item(p))))
            }
        }
    }

    /// Integrates a run of characters `text` numbered `first + k` for `k` in
    /// `0..chars`. The first character has origins (`left`, `right`); each
    /// following one has the previous character of the run as left origin
    /// and `right` as right origin. `cmp` is the total order on items that
    /// breaks ties between concurrent inserts with identical origins; every
    /// replica must use the same order (of the items' identities, not of
    /// their local numbers).
    ///
    /// Fails, changing nothing, when an origin is unknown, the run's first
    /// item already exists or the run's numbers overflow `u32`. An empty
    /// `text` only checks the origins.
    pub fn integrate(
        &mut self,
        first: Lv,
        left: Option<Lv>,
        right: Option<Lv>,
        text: &str,
        cmp: &dyn Fn(Lv, Lv) -> Ordering,
    ) -> Result<(), SeqError> {
        let count = text.chars().count();
        if count > 0 {
            // `NONE` is no number: a run may end just before it.
            let end = u64::from(first) + count as u64;
            if end > u64::from(NONE) {
                return Err(SeqError::IdOverflow(first));
            }
            // Numbers are given out once: a run is new or already here.
            if self.locate(first).is_some() {
                return Err(SeqError::DuplicateItem(first));
            }
        }
        let left_at = match left {
            Some(lv) => Some((lv, self.locate(lv).ok_or(SeqError::UnknownOrigin(lv))?)),
            None => None,
        };
        if count == 0 {
            return match right {
                Some(lv) if !self.contains(lv) => Err(SeqError::UnknownOrigin(lv)),
                _ => Ok(()),
            };
        }
        let after_left = match left_at {
            Some((_, p)) => self.next_item(p),
            None => self.first_item(),
        };
        let fast = match (after_left, right) {
            (None, None) => true,
            (Some(p), Some(r)) => self.item(p) == r,
            _ => false,
        };
        let at = if fast {
            // Nothing was inserted concurrently between the origins: the
            // reference scan would stop at once. Every local insert gets
            // here. The gap right after the left origin, so that typing
            // extends the span it continues.
            match left_at {
                Some((_, p)) => self.gap_after(p),
                None => Pos {
                    leaf: 0,
                    span: 0,
                    off: 0,
                },
            }
        } else {
            let right_at = match right {
                Some(lv) => Some((lv, self.locate(lv).ok_or(SeqError::UnknownOrigin(lv))?)),
                None => None,
            };
            self.scan(first, left_at, right_at, after_left, cmp)
        };
        let span = Span {
            lv: first,
            len: count as u32,
            left: raw(left),
            right: raw(right),
        };
        self.insert_span(at, span, text, count);
        if self.edits.is_some()
            && count > 0
            && let Some(p) = self.locate(first)
        {
            let pos = self.visible_position(p);
            if let Some(edits) = self.edits.as_mut() {
                edits.push(TextEdit {
                    pos,
                    deleted: 0,
                    inserted: text.to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Marks `len` items from `first` deleted (deleting is idempotent) and
    /// returns how many of those numbers are not in the sequence (the
    /// caller keeps those deletes for when the items arrive).
    pub fn delete_run(&mut self, first: Lv, len: u32) -> u32 {
        let end = u64::from(first) + u64::from(len);
        let mut missing = 0;
        let mut lv = u64::from(first);
        while lv < end {
            let Some(p) = self.locate(lv as Lv) else {
                missing += 1;
                lv += 1;
                continue;
            };
            let s = self.leaves[p.leaf].spans[p.span];
            let take = (u64::from(s.end()) - lv).min(end - lv) as u32;
            if self.edits.is_some() && self.leaves[p.leaf].is_visible(p.span) {
                let pos = self.visible_position(p);
                if let Some(edits) = self.edits.as_mut() {
                    match edits.last_mut() {
                        // Runs deleted one after another at one place.
                        Some(e) if e.pos == pos && e.inserted.is_empty() => {
                            e.deleted += take as usize;
                        }
                        _ => edits.push(TextEdit {
                            pos,
                            deleted: take as usize,
                            inserted: String::new(),
                        }),
                    }
                }
            }
            self.delete_in_span(p, take);
            lv += u64::from(take);
        }
        missing
    }

    /// Deletes `n` items of a span from item `p` on (all in that span).
    fn delete_in_span(&mut self, p: Pos, n: u32) {
        self.last = p;
        let leaf = &mut self.leaves[p.leaf];
        if !leaf.is_visible(p.span) {
            return;
        }
        let bytes = leaf.byte_at(p.span, p.off)..leaf.byte_at(p.span, p.off + n);
        let removed = leaf.text[bytes.clone()].chars().count();
        leaf.text.replace_range(bytes, "");
        leaf.chars -= removed;
        // Cut the span into (before, deleted, after) pieces.
        let mut span = leaf.spans[p.span];
        let after = (p.off + n < span.len).then(|| span.split_off(p.off + n));
        let deleted = if p.off > 0 {
            let deleted = span.split_off(p.off);
            leaf.spans[p.span] = span;
            leaf.spans.insert(p.span + 1, deleted);
            leaf.insert_flags(p.span + 1, 1, true);
            p.span + 1
        } else {
            leaf.spans[p.span] = span;
            p.span
        };
        leaf.visible &= !(1u64 << deleted);
        if let Some(after) = after {
            leaf.spans.insert(deleted + 1, after);
            leaf.insert_flags(deleted + 1, 1, true);
        }
        self.last = Pos {
            leaf: p.leaf,
            span: deleted,
            off: 0,
        };
        self.walk_up(p.leaf, |c| *c -= removed);
        self.len -= removed;
        if self.leaves[p.leaf].spans.len() > self.leaf_cap {
            self.split_leaf(p.leaf);
        }
    }

    /// The visible items at visible positions `pos..pos + len`, as maximal
    /// runs of consecutive numbers: `(first, run length)` each. `None` if
    /// the range does not fit in `0..self.len()`.
    pub fn visible_runs(&self, pos: usize, len: usize) -> Option<Vec<(Lv, u32)>> {
        if pos.checked_add(len)? > self.len {
            return None;
        }
        let mut runs: Vec<(Lv, u32)> = Vec::new();
        if len == 0 {
            return Some(runs);
        }
        let start = self.find_visible(pos);
        let (mut leaf, mut span, mut off) = (start.leaf, start.span, start.off);
        let mut remaining = len as u64;
        while leaf != NIL {
            let l = &self.leaves[leaf];
            while span < l.spans.len() {
                if l.is_visible(span) {
                    let s = l.spans[span];
                    let take = u64::from(s.len - off).min(remaining) as u32;
                    let lv = s.lv + off;
                    match runs.last_mut() {
                        Some((first, n)) if *first + *n == lv => *n += take,
                        _ => runs.push((lv, take)),
                    }
                    remaining -= u64::from(take);
                    if remaining == 0 {
                        return Some(runs);
                    }
                }
                span += 1;
                off = 0;
            }
            leaf = l.next;
            span = 0;
        }
        // The inner counts guarantee enough visible items after `pos`.
        Some(runs)
    }

    /// Whether an item with this number exists (visible or deleted).
    pub fn contains(&self, lv: Lv) -> bool {
        self.locate(lv).is_some()
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
            out.push_str(&l.text);
            leaf = l.next;
        }
    }

    fn item(&self, p: Pos) -> Lv {
        self.leaves[p.leaf].spans[p.span].lv + p.off
    }

    fn first_item(&self) -> Option<Pos> {
        (!self.leaves[0].spans.is_empty()).then_some(Pos {
            leaf: 0,
            span: 0,
            off: 0,
        })
    }

    /// The gap right after item `p`.
    fn gap_after(&self, p: Pos) -> Pos {
        if p.off + 1 < self.leaves[p.leaf].spans[p.span].len {
            Pos {
                off: p.off + 1,
                ..p
            }
        } else {
            Pos {
                span: p.span + 1,
                off: 0,
                ..p
            }
        }
    }

    /// The gap at the end of the document.
    fn end_gap(&self) -> Pos {
        Pos {
            leaf: self.tail,
            span: self.leaves[self.tail].spans.len(),
            off: 0,
        }
    }

    fn next_item(&self, p: Pos) -> Option<Pos> {
        let leaf = &self.leaves[p.leaf];
        if p.off + 1 < leaf.spans[p.span].len {
            return Some(Pos {
                off: p.off + 1,
                ..p
            });
        }
        self.next_span(p)
    }

    /// The first item of the span after `p`'s.
    fn next_span(&self, p: Pos) -> Option<Pos> {
        let leaf = &self.leaves[p.leaf];
        if p.span + 1 < leaf.spans.len() {
            Some(Pos {
                leaf: p.leaf,
                span: p.span + 1,
                off: 0,
            })
        } else if leaf.next == NIL {
            None
        } else {
            // Only the sole leaf of an empty sequence is ever empty.
            Some(Pos {
                leaf: leaf.next,
                span: 0,
                off: 0,
            })
        }
    }

    fn prev_item(&self, p: Pos) -> Option<Pos> {
        if p.off > 0 {
            return Some(Pos {
                off: p.off - 1,
                ..p
            });
        }
        if p.span > 0 {
            let s = &self.leaves[p.leaf].spans[p.span - 1];
            return Some(Pos {
                leaf: p.leaf,
                span: p.span - 1,
                off: s.len - 1,
            });
        }
        let prev = self.leaves[p.leaf].prev;
        (prev != NIL).then(|| {
            let l = &self.leaves[prev];
            Pos {
                leaf: prev,
                span: l.spans.len() - 1,
                off: l.spans[l.spans.len() - 1].len - 1,
            }
        })
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
            if pos - start < l.chars {
                return self.in_leaf(leaf, pos - start);
            }
            (leaf, start) = (l.next, start + l.chars);
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
                return self.in_leaf(child, pos);
            }
            node = child;
        }
    }

    /// The `pos`-th visible item of `leaf`, which has more.
    fn in_leaf(&self, leaf: usize, mut pos: usize) -> Pos {
        let l = &self.leaves[leaf];
        for (i, s) in l.spans.iter().enumerate() {
            if l.is_visible(i) {
                if pos < s.len as usize {
                    return Pos {
                        leaf,
                        span: i,
                        off: pos as u32,
                    };
                }
                pos -= s.len as usize;
            }
        }
        unreachable!("the leaf counts its visible items")
    }

    /// Where an existing item is.
    fn locate(&self, lv: Lv) -> Option<Pos> {
        if lv >= self.end {
            return None;
        }
        // Edits cluster (typing, backspacing): look around the last edit
        // before asking the index. `last` may be stale, hence `get`.
        if let Some(l) = self.leaves.get(self.last.leaf) {
            let near = self.last.span.min(l.spans.len());
            let from = near.saturating_sub(2);
            let to = (near + 3).min(l.spans.len());
            if let Some(p) = Self::in_spans(l, self.last.leaf, from..to, lv) {
                return Some(p);
            }
        }
        match self.holders.get(&(lv >> BLOCK_SHIFT))? {
            Holders::One(leaf) => Self::in_spans(
                &self.leaves[*leaf],
                *leaf,
                0..self.leaves[*leaf].spans.len(),
                lv,
            ),
            Holders::Many(leaves) => leaves.iter().find_map(|&leaf| {
                Self::in_spans(
                    &self.leaves[leaf],
                    leaf,
                    0..self.leaves[leaf].spans.len(),
                    lv,
                )
            }),
        }
    }

    fn in_spans(l: &Leaf, leaf: usize, range: std::ops::Range<usize>, lv: Lv) -> Option<Pos> {
        range
            .into_iter()
            .find(|&i| l.spans[i].contains(lv))
            .map(|i| Pos {
                leaf,
                span: i,
                off: lv - l.spans[i].lv,
            })
    }

    /// Document order of two item positions.
    fn pos_cmp(&self, a: Pos, b: Pos) -> Ordering {
        if a.leaf == b.leaf {
            return (a.span, a.off).cmp(&(b.span, b.off));
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
    fn item_cmp(&self, a: Lv, b: Pos) -> Ordering {
        // Origins of integrated items always exist, so `locate` succeeds.
        self.locate(a)
            .map_or(Ordering::Greater, |pa| self.pos_cmp(pa, b))
    }

    /// The reference `integrateYjsMod` scan, over the items after the left
    /// origin; returns the insertion point. Items inside a span have the
    /// item before them as left origin, which the scan just passed: they
    /// never stop it, so it steps over them a span at a time (up to the
    /// right origin, where it stops).
    fn scan(
        &self,
        new: Lv,
        left: Option<(Lv, Pos)>,
        right: Option<(Lv, Pos)>,
        start: Option<Pos>,
        cmp: &dyn Fn(Lv, Lv) -> Ordering,
    ) -> Pos {
        let mut cur = start;
        let mut dest = None;
        let mut scanning = false;
        let mut prev: Option<Lv> = None;
        loop {
            if !scanning {
                dest = cur;
            }
            let Some(p) = cur else { break };
            let other = self.item(p);
            if right.is_some_and(|(r, _)| r == other) {
                break;
            }
            let span = self.leaves[p.leaf].spans[p.span];
            let (o_left, o_right) = span.origins(p.off);
            if p.off > 0 && o_left != left.map(|(l, _)| l) {
                // Inside a span, its left origin passed (not the new
                // item's, where the scan may start): step to the right
                // origin if it is in this span, else to the next span.
                match right.filter(|(r, _)| span.contains(*r) && *r > other) {
                    Some((r, _)) => {
                        cur = Some(Pos {
                            off: r - span.lv,
                            ..p
                        });
                    }
                    None => {
                        prev = Some(span.end() - 1);
                        cur = self.next_span(p);
                    }
                }
                continue;
            }
            let vs_left = match (o_left, left) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Less,
                (Some(_), None) => Ordering::Greater,
                (Some(a), Some((b, bp))) => {
                    if a == b {
                        Ordering::Equal
                    } else if Some(a) == prev {
                        // The item just passed lies after the left origin.
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
                    if vs_right.is_eq() && cmp(new, other).is_lt() {
                        break;
                    }
                    scanning = vs_right.is_lt();
                }
                Ordering::Greater => {}
            }
            prev = Some(other);
            cur = self.next_item(p);
        }
        dest.unwrap_or_else(|| self.end_gap())
    }

    /// Inserts a run, all visible, at insertion point `at`: it extends the
    /// span before when it continues it (typing), else becomes a span of
    /// its own (splitting the span `at` is inside).
    fn insert_span(&mut self, at: Pos, span: Span, text: &str, count: usize) {
        let leaf_id = at.leaf;
        let leaf = &mut self.leaves[leaf_id];
        let extends = at.off == 0 && at.span > 0 && {
            let before = &leaf.spans[at.span - 1];
            leaf.is_visible(at.span - 1)
                && before.end() == span.lv
                && span.left == before.end() - 1
                && span.right == before.right
        };
        let byte = leaf.byte_at(at.span, at.off);
        leaf.text.insert_str(byte, text);
        leaf.chars += count;
        if extends {
            leaf.spans[at.span - 1].len += span.len;
            self.last = Pos {
                leaf: leaf_id,
                span: at.span - 1,
                off: leaf.spans[at.span - 1].len - 1,
            };
        } else {
            let mut index = at.span;
            if at.off > 0 {
                let visible = leaf.is_visible(at.span);
                let rest = leaf.spans[at.span].split_off(at.off);
                leaf.spans.insert(at.span + 1, rest);
                leaf.insert_flags(at.span + 1, 1, visible);
                index += 1;
            }
            leaf.spans.insert(index, span);
            leaf.insert_flags(index, 1, true);
            self.last = Pos {
                leaf: leaf_id,
                span: index,
                off: span.len - 1,
            };
        }
        for block in (span.lv >> BLOCK_SHIFT)..=((span.end() - 1) >> BLOCK_SHIFT) {
            self.add_holder(block, leaf_id);
        }
        self.end = self.end.max(span.end());
        self.walk_up(leaf_id, |c| *c += count);
        self.len += count;
        let l = &self.leaves[leaf_id];
        if l.spans.len() > self.leaf_cap || (l.text.len() > LEAF_TEXT && l.spans.len() > 1) {
            self.split_leaf(leaf_id);
        }
    }

    /// Splits a leaf holding more spans than it may into two. Typing at the
    /// end of a leaf leaves it full and goes on in the new one.
    fn split_leaf(&mut self, leaf_id: usize) {
        let l = &self.leaves[leaf_id];
        let n = l.spans.len();
        let cut = if self.last.leaf == leaf_id && self.last.span + 1 == n {
            n - 1
        } else if l.text.len() > LEAF_TEXT {
            // Halve the text.
            let mut chars = 0;
            let half = l.chars / 2;
            (0..n)
                .find(|&i| {
                    if l.is_visible(i) {
                        chars += l.spans[i].len as usize;
                    }
                    chars >= half
                })
                .map_or(n / 2, |i| i + 1)
                .clamp(1, n - 1)
        } else {
            n / 2
        };
        let (spans, visible, text, chars) = {
            let l = &mut self.leaves[leaf_id];
            let byte = l.byte_at(cut, 0);
            let text = l.text.split_off(byte);
            let spans = l.spans.split_off(cut);
            let visible = l.visible >> cut;
            l.visible &= low_bits(cut);
            let moved = text.chars().count();
            l.chars -= moved;
            (spans, visible, text, moved)
        };
        let id = self.leaves.len();
        let next = self.leaves[leaf_id].next;
        let moved_blocks = block_keys(&spans);
        self.leaves.push(Leaf {
            spans,
            visible,
            text,
            chars,
            parent: NIL,
            slot: 0,
            prev: leaf_id,
            next,
        });
        self.leaves[leaf_id].next = id;
        if next == NIL {
            self.tail = id;
        } else {
            self.leaves[next].prev = id;
        }
        let (parent, slot) = (self.leaves[leaf_id].parent, self.leaves[leaf_id].slot);
        self.inners[parent].counts[slot] -= chars;
        self.link_child(parent, slot + 1, id, chars);
        let kept = block_keys(&self.leaves[leaf_id].spans);
        for block in moved_blocks {
            self.add_holder(block, id);
            if kept.binary_search(&block).is_err() {
                self.remove_holder(block, leaf_id);
            }
        }
        if self.last.leaf == leaf_id && self.last.span >= cut {
            self.last = Pos {
                leaf: id,
                span: self.last.span - cut,
                off: self.last.off,
            };
            // Typing goes on there: make it the cursor.
            self.walk_up(id, |_| {});
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

    fn add_holder(&mut self, block: u32, leaf: usize) {
        match self.holders.entry(block) {
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

    fn remove_holder(&mut self, block: u32, leaf: usize) {
        let Entry::Occupied(mut o) = self.holders.entry(block) else {
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
}

impl Sequence {
    /// Saves every span in document order, then the visible text. Spans go
    /// as columns (first numbers, lengths, origins, visibility), each
    /// number relative to what usually predicts it, so that typing costs a
    /// byte or two per span before compression: a span's first number
    /// follows the last span's end, its left origin is the last span's last
    /// character, and its right origin is the last span's (a typing burst
    /// broken into spans by deletions keeps one right origin).
    pub(crate) fn save(&self, out: &mut Out) {
        let mut spans: Vec<(Span, bool)> = Vec::with_capacity(self.spans());
        let mut leaf = 0;
        while leaf != NIL {
            let l = &self.leaves[leaf];
            spans.extend(
                l.spans
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (*s, l.is_visible(i))),
            );
            leaf = l.next;
        }
        out.u64(spans.len() as u64);
        let mut prev_end: i64 = 0;
        for (span, _) in &spans {
            out.i64(i64::from(span.lv) - prev_end);
            prev_end = i64::from(span.end());
        }
        for (span, _) in &spans {
            out.u64(u64::from(span.len));
        }
        let mut prev: Option<&Span> = None;
        for (span, _) in &spans {
            out.u64(origin_code(span.left, left_base(prev)));
            prev = Some(span);
        }
        let mut prev: Option<&Span> = None;
        for (span, _) in &spans {
            out.u64(origin_code(span.right, right_base(prev, span)));
            prev = Some(span);
        }
        for chunk in spans.chunks(8) {
            let bits = chunk
                .iter()
                .enumerate()
                .fold(0u64, |b, (i, (_, visible))| b | (u64::from(*visible) << i));
            out.u64(bits);
        }
        let mut text = String::new();
        self.write_text(&mut text);
        out.bytes(text.as_bytes());
    }

    /// The sequence [`Sequence::save`] saved, its leaves packed anew.
    pub(crate) fn load(input: &mut In<'_>) -> Read<Sequence> {
        let bad = || CheckpointError::Corrupt("text spans");
        // At least a byte per span in each of the four number columns.
        let n = input.count(4)?;
        let empty = Span {
            lv: 0,
            len: 0,
            left: NONE,
            right: NONE,
        };
        let mut spans = vec![(empty, false); n];
        let deltas = (0..n).map(|_| input.i64()).collect::<Read<Vec<i64>>>()?;
        let mut prev_end: i64 = 0;
        for ((span, _), delta) in spans.iter_mut().zip(deltas) {
            let lv = prev_end.checked_add(delta).ok_or_else(bad)?;
            span.lv = Lv::try_from(lv).map_err(|_| bad())?;
            span.len = input.u32()?;
            if span.len == 0 || u64::from(span.lv) + u64::from(span.len) > u64::from(NONE) {
                return Err(bad());
            }
            prev_end = i64::from(span.end());
        }
        for i in 0..n {
            let base = left_base(i.checked_sub(1).map(|p| &spans[p].0));
            spans[i].0.left = origin_of(input.u64()?, base).ok_or_else(bad)?;
        }
        for i in 0..n {
            let base = right_base(i.checked_sub(1).map(|p| &spans[p].0), &spans[i].0);
            spans[i].0.right = origin_of(input.u64()?, base).ok_or_else(bad)?;
        }
        for chunk in spans.chunks_mut(8) {
            let bits = input.u64()?;
            if bits >> chunk.len() != 0 {
                return Err(bad());
            }
            for (i, (_, visible)) in chunk.iter_mut().enumerate() {
                *visible = bits >> i & 1 == 1;
            }
        }
        let text = std::str::from_utf8(input.bytes()?).map_err(|_| bad())?;
        Sequence::from_spans(&spans, text).ok_or_else(bad)
    }

    /// A sequence of `spans` in document order (with their visibility) and
    /// `text`, the visible characters; `None` if they do not agree.
    fn from_spans(spans: &[(Span, bool)], text: &str) -> Option<Sequence> {
        let mut seq = Sequence::new();
        if spans.is_empty() {
            return text.is_empty().then_some(seq);
        }
        seq.leaves.clear();
        seq.inners.clear();
        let mut rest = text;
        // Leaves three quarters full, so edits do not split them at once.
        let fill = seq.leaf_cap * 3 / 4;
        let mut i = 0;
        while i < spans.len() {
            let id = seq.leaves.len();
            let mut leaf = Leaf {
                spans: Vec::with_capacity(fill),
                visible: 0,
                text: String::new(),
                chars: 0,
                parent: NIL,
                slot: 0,
                prev: id.checked_sub(1).unwrap_or(NIL),
                next: NIL,
            };
            let mut chars = 0;
            while i < spans.len()
                && leaf.spans.len() < fill
                && (leaf.spans.is_empty() || chars < LEAF_TEXT / 2)
            {
                let (span, visible) = spans[i];
                if visible {
                    leaf.visible |= 1 << leaf.spans.len();
                    chars += span.len as usize;
                }
                leaf.spans.push(span);
                i += 1;
            }
            let bytes = match rest.char_indices().nth(chars) {
                Some((b, _)) => b,
                None if rest.chars().count() == chars => rest.len(),
                None => return None,
            };
            leaf.text = rest[..bytes].to_owned();
            leaf.chars = chars;
            rest = &rest[bytes..];
            seq.len += chars;
            for block in block_keys(&leaf.spans) {
                seq.add_holder(block, id);
            }
            seq.end = seq
                .end
                .max(leaf.spans.iter().map(Span::end).max().unwrap_or(0));
            if id > 0 {
                seq.leaves[id - 1].next = id;
            }
            seq.leaves.push(leaf);
        }
        if !rest.is_empty() {
            return None;
        }
        seq.tail = seq.leaves.len() - 1;
        // Inner nodes, level by level from the leaves up.
        let mut level: Vec<(usize, usize)> = (0..seq.leaves.len())
            .map(|l| (l, seq.leaves[l].chars))
            .collect();
        let mut leaf_children = true;
        loop {
            let mut up = Vec::new();
            for group in level.chunks(seq.fanout.div_ceil(2).max(2)) {
                let node = seq.inners.len();
                seq.inners.push(Inner {
                    children: group.iter().map(|(c, _)| *c).collect(),
                    counts: group.iter().map(|(_, n)| *n).collect(),
                    parent: NIL,
                    slot: 0,
                    leaf_children,
                });
                seq.renumber(node, 0);
                up.push((node, group.iter().map(|(_, n)| n).sum()));
            }
            leaf_children = false;
            if up.len() == 1 {
                seq.root = up[0].0;
                break;
            }
            level = up;
        }
        Some(seq)
    }
}

/// The distinct blocks the spans cover, sorted.
fn block_keys(spans: &[Span]) -> Vec<u32> {
    let mut keys: Vec<u32> = Vec::new();
    for s in spans {
        for block in (s.lv >> BLOCK_SHIFT)..=((s.end() - 1) >> BLOCK_SHIFT) {
            // Neighbouring spans are mostly from the same block: this keeps
            // the sort below tiny.
            if keys.last() != Some(&block) {
                keys.push(block);
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn low_bits(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}
/// What a span's left origin is saved relative to: the last character of
/// the span before it in the document.
fn left_base(prev: Option<&Span>) -> i64 {
    prev.map_or(0, |p| i64::from(p.end()) - 1)
}

/// What a span's right origin is saved relative to: the right origin of
/// the span before it, or its own first number when there is none.
fn right_base(prev: Option<&Span>, span: &Span) -> i64 {
    match prev {
        Some(p) if p.right != NONE => i64::from(p.right),
        _ => i64::from(span.lv),
    }
}

/// An origin saved relative to `base`: 0 for none, else 1 + the zigzag of
/// the difference.
fn origin_code(origin: Lv, base: i64) -> u64 {
    if origin == NONE {
        return 0;
    }
    let d = i64::from(origin) - base;
    1 + ((d << 1) ^ (d >> 63)) as u64
}

/// The origin [`origin_code`] saved; `None` if it is not a character
/// number.
fn origin_of(code: u64, base: i64) -> Option<Lv> {
    if code == 0 {
        return Some(NONE);
    }
    let z = code - 1;
    let d = (z >> 1) as i64 ^ -((z & 1) as i64);
    Lv::try_from(base.checked_add(d)?)
        .ok()
        .filter(|&lv| lv != NONE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A total order on nodes; items compare by node, then index.
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

    /// Bits of an item number that hold its index within its node: the
    /// tests number item `index` of node `node` as `node << 16 | index`, so
    /// a node's items are consecutive numbers, as a document numbers them.
    const INDEX_BITS: u32 = 16;

    fn id(node: u32, index: u32) -> Lv {
        node << INDEX_BITS | index
    }

    /// The order of items that `cmp` orders nodes by.
    fn by_items(cmp: Cmp) -> impl Fn(Lv, Lv) -> Ordering {
        move |a, b| {
            let index = |lv: Lv| lv & ((1 << INDEX_BITS) - 1);
            cmp(a >> INDEX_BITS, b >> INDEX_BITS).then(index(a).cmp(&index(b)))
        }
    }

    /// The reference algorithm, verbatim: a plain vector of items, indices
    /// found by linear search.
    #[derive(Clone, Debug)]
    struct NaiveItem {
        id: Lv,
        left: Option<Lv>,
        right: Option<Lv>,
        ch: char,
        deleted: bool,
    }

    #[derive(Clone, Debug, Default)]
    struct Naive {
        items: Vec<NaiveItem>,
    }

    impl Naive {
        fn index(&self, id: Option<Lv>, none: isize) -> isize {
            id.map_or(none, |id| {
                self.items
                    .iter()
                    .position(|it| it.id == id)
                    .expect("known item") as isize
            })
        }

        fn integrate_one(&mut self, new: NaiveItem, cmp: Cmp) {
            let cmp = by_items(cmp);
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
                let new_first = cmp(new.id, other.id).is_lt();
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
            first: Lv,
            left: Option<Lv>,
            right: Option<Lv>,
            text: &str,
            cmp: Cmp,
        ) {
            let mut left = left;
            for (k, ch) in text.chars().enumerate() {
                let this = first + k as u32;
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
        fn origins_at(&self, pos: usize) -> Option<(Option<Lv>, Option<Lv>)> {
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

        fn delete(&mut self, id: Lv) -> bool {
            let item = self
                .items
                .iter_mut()
                .find(|it| it.id == id)
                .expect("known item");
            !std::mem::replace(&mut item.deleted, true)
        }

        fn visible_ids(&self) -> Vec<Lv> {
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

        fn raw(&self) -> Vec<(Lv, bool)> {
            self.items.iter().map(|it| (it.id, it.deleted)).collect()
        }
    }

    impl Sequence {
        /// Every item in document order: number, deleted.
        fn raw(&self) -> Vec<(Lv, bool)> {
            let mut out = Vec::new();
            let mut leaf = 0;
            while leaf != NIL {
                let l = &self.leaves[leaf];
                for (i, s) in l.spans.iter().enumerate() {
                    out.extend((s.lv..s.end()).map(|lv| (lv, !l.is_visible(i))));
                }
                leaf = l.next;
            }
            out
        }

        /// Deletes one item: `Ok(true)` if it was visible, `Ok(false)` if it
        /// was deleted already, an error if it is unknown.
        fn delete(&mut self, lv: Lv) -> Result<bool, SeqError> {
            let before = self.len;
            match self.delete_run(lv, 1) {
                0 => Ok(self.len < before),
                _ => Err(SeqError::UnknownOrigin(lv)),
            }
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
                assert!(l.spans.len() <= self.leaf_cap);
                assert_eq!(l.visible & !low_bits(l.spans.len()), 0, "stray flags");
                let visible: usize = (0..l.spans.len())
                    .filter(|&i| l.is_visible(i))
                    .map(|i| l.spans[i].len as usize)
                    .sum();
                assert_eq!(l.chars, visible, "visible characters of leaf {leaf}");
                assert_eq!(l.text.chars().count(), visible, "text of leaf {leaf}");
                assert!(l.spans.iter().all(|s| s.len > 0));
                chain.push(leaf);
                prev = leaf;
                leaf = l.next;
            }
            assert_eq!(self.tail, prev);
            assert_eq!(chain.len(), self.leaves.len(), "every leaf is chained");
            if chain.len() > 1 {
                assert!(self.leaves.iter().all(|l| !l.spans.is_empty()));
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
                        assert_eq!(count, l.chars);
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
                let before: usize = chain[..at].iter().map(|&l| self.leaves[l].chars).sum();
                assert_eq!(self.cursor.1, before, "cursor offset");
            }
            assert_eq!(in_order, chain, "tree order is chain order");
            assert_eq!(
                self.len,
                self.inners[self.root].counts.iter().sum::<usize>()
            );
            // Holders exactly as the leaves say; items distinct and found.
            let mut expected: HashMap<u32, Vec<usize>> = HashMap::new();
            let mut seen = std::collections::HashSet::new();
            for (l, leaf) in self.leaves.iter().enumerate() {
                for (i, s) in leaf.spans.iter().enumerate() {
                    for block in (s.lv >> BLOCK_SHIFT)..=((s.end() - 1) >> BLOCK_SHIFT) {
                        let holders = expected.entry(block).or_default();
                        if !holders.contains(&l) {
                            holders.push(l);
                        }
                    }
                    for lv in [s.lv, s.end() - 1] {
                        assert_eq!(
                            self.locate(lv),
                            Some(Pos {
                                leaf: l,
                                span: i,
                                off: lv - s.lv
                            })
                        );
                    }
                    assert!(seen.insert(s.lv), "item {} twice", s.lv);
                }
            }
            assert_eq!(expected.len(), self.holders.len());
            for (key, mut want) in expected {
                let mut got = match &self.holders[&key] {
                    Holders::One(h) => vec![*h],
                    Holders::Many(hs) => {
                        assert!(hs.len() > 1);
                        hs.clone()
                    }
                };
                got.sort_unstable();
                want.sort_unstable();
                assert_eq!(got, want, "holders of {key:?}");
            }
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
        seq.integrate(first, left, right, text, &by_items(cmp))
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
            first: Lv,
            left: Option<Lv>,
            right: Option<Lv>,
            text: String,
        },
        Delete(Lv),
    }

    fn apply(seq: &mut Sequence, op: &Op, cmp: Cmp) -> Result<bool, SeqError> {
        match op {
            Op::Insert {
                first,
                left,
                right,
                text,
            } => seq
                .integrate(*first, *left, *right, text, &by_items(cmp))
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
        /// The text as the recorded edits rebuild it.
        edited: Vec<char>,
    }

    impl Replica {
        fn agrees(&mut self) {
            assert_eq!(self.seq.raw(), self.naive.raw());
            assert_eq!(self.seq.text(), self.naive.text());
            for edit in self.seq.take_edits() {
                let end = edit.pos + edit.deleted;
                assert!(end <= self.edited.len(), "{edit:?} past the text");
                self.edited.splice(edit.pos..end, edit.inserted.chars());
            }
            assert_eq!(
                self.edited.iter().collect::<String>(),
                self.seq.text(),
                "the recorded edits rebuild the text"
            );
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
            .map(|i| {
                let mut seq = Sequence::with_caps(caps.0, caps.1);
                seq.record_edits(true);
                Replica {
                    node: 5 + 3 * i as u32,
                    seq,
                    naive: Naive::default(),
                    next: 0,
                    seen: vec![0; replicas],
                    cursor: 0,
                    ops: 0,
                    edited: Vec::new(),
                }
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
                let ids: Vec<Lv> = runs
                    .iter()
                    .flat_map(|&(first, k)| first..first + k)
                    .collect();
                assert_eq!(ids, rep.naive.visible_ids()[pos..pos + n]);
                for w in runs.windows(2) {
                    let (a, k) = w[0];
                    assert!(a + k != w[1].0, "runs are maximal");
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
            // Saved and loaded back: the same items, a sound structure.
            let mut out = Out::default();
            rep.seq.save(&mut out);
            let bytes = out.into_bytes();
            let loaded = Sequence::load(&mut In::new(&bytes)).unwrap();
            loaded.check_invariants();
            assert_eq!(loaded.raw(), rep.seq.raw());
            assert_eq!(loaded.text(), rep.seq.text());
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
        let cmp = by_items(natural);
        let mut seq = Sequence::with_caps(3, 3);
        seq.integrate(id(1, 0), None, None, "hello", &cmp).unwrap();
        seq.integrate(id(1, 10), Some(id(1, 4)), None, "ab", &cmp)
            .unwrap();
        let (before, text) = (seq.raw(), seq.text());
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
                id(1, 11),
                None,
                None,
                "xyz",
                SeqError::DuplicateItem(id(1, 11)),
            ),
            (
                u32::MAX - 1,
                None,
                None,
                "ab",
                SeqError::IdOverflow(u32::MAX - 1),
            ),
        ];
        for (first, left, right, text_in, err) in rejected {
            assert_eq!(seq.integrate(first, left, right, text_in, &cmp), Err(err));
            assert_eq!((seq.raw(), seq.text()), (before.clone(), text.clone()));
            assert!(!err.to_string().is_empty());
        }
        // An empty run with known origins is accepted and inserts nothing.
        assert_eq!(
            seq.integrate(id(2, 0), Some(id(1, 1)), Some(id(1, 2)), "", &cmp),
            Ok(())
        );
        assert_eq!(seq.raw(), before);
        // Numbers may arrive out of order within a node.
        seq.integrate(id(1, 6), Some(id(1, 0)), Some(id(1, 1)), "123", &cmp)
            .unwrap();
        // The last number there is (u32::MAX is "none").
        seq.integrate(u32::MAX - 1, None, Some(id(1, 0)), "y", &cmp)
            .unwrap();
        assert!(seq.contains(u32::MAX - 1) && seq.contains(id(1, 8)) && !seq.contains(id(1, 9)));
        assert_eq!(seq.text(), "yh123elloab");
        seq.check_invariants();
    }

    #[test]
    fn delete_is_idempotent_and_rejects_unknown_ids() {
        let mut seq = Sequence::new();
        seq.integrate(id(1, 0), None, None, "abc", &by_items(natural))
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
        seq.integrate(id(1, 0), None, None, "abc", &by_items(natural))
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
        let mut seq = Sequence::with_caps(3, 3);
        let cmp = by_items(natural);
        seq.integrate(id(1, 0), None, None, "abcd", &cmp).unwrap();
        seq.integrate(id(2, 0), Some(id(1, 1)), Some(id(1, 2)), "XY", &cmp)
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
        seq.integrate(id(1, 0), None, None, "héllo 🦀", &by_items(natural))
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
        for caps in [(3, 3), (5, 4), (LEAF_CAP, FANOUT)] {
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
            assert_eq!(seq.text(), naive.text());
            seq.check_invariants();
        }
    }

    /// Typing keystroke by keystroke, as a document numbers it, makes one
    /// span per typing burst, whatever its length.
    #[test]
    fn typing_extends_one_span() {
        let cmp = by_items(natural);
        let mut seq = Sequence::new();
        let mut lv = 0;
        for _ in 0..1_000 {
            let (left, right) = seq.origins_at(seq.len()).unwrap();
            seq.integrate(lv, left, right, "a", &cmp).unwrap();
            lv += 1;
        }
        assert_eq!(seq.spans(), 1);
        // Typing in the middle: one more span for the burst, and the one it
        // split.
        for k in 0..100 {
            let (left, right) = seq.origins_at(500 + k).unwrap();
            seq.integrate(lv, left, right, "b", &cmp).unwrap();
            lv += 1;
        }
        assert_eq!(seq.spans(), 3);
        assert_eq!(seq.delete_run(0, 10), 0);
        assert_eq!(seq.spans(), 4);
        assert_eq!(seq.delete_run(lv, 3), 3, "numbers not here are reported");
        seq.check_invariants();
    }
}
