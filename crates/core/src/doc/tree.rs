//! The tree of entries: where each entry sits (parent, name, position).
//!
//! Every create, move and delete is a *placement* of one entry, and
//! placements are applied in timestamp order with Kleppmann et al.'s
//! replicated-tree move algorithm ("A highly-available move operation for
//! replicated trees", 2021): a placement that would make an entry its own
//! ancestor is skipped, and a placement arriving with an older timestamp
//! than ones already applied undoes them, applies, and redoes them. The
//! result depends only on the set of placements, never on arrival order.
//! Delete is a move into [`EntryId::TRASH`], so a later create by path (or a
//! later move) brings an entry back.

use std::collections::BTreeMap;

use crate::checkpoint::{CheckpointError, In, Out, Read};
use crate::dag::NodeIdx;
use crate::ids::{EntryId, IdMap};
use crate::op::{EntryKind, Position};

use super::{Stamp, load_node, load_stamp, save_stamp};

/// Where an entry sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) parent: EntryId,
    pub(crate) name: String,
    pub(crate) position: Option<Position>,
}

#[derive(Clone, Debug)]
struct LogRecord {
    stamp: Stamp,
    node: NodeIdx,
    entry: EntryId,
    to: Placement,
    /// The placement before this record was applied (`None`: unplaced).
    before: Option<(Placement, Stamp, NodeIdx)>,
    applied: bool,
}

/// The current state of one entry in the tree.
#[derive(Clone, Debug)]
pub(crate) struct EntryState {
    /// Current placement and the record that set it.
    pub(crate) placed: Option<(Placement, Stamp, NodeIdx)>,
    /// The kind, decided by the newest create.
    pub(crate) kind: Option<(Stamp, EntryKind)>,
    /// Children by name (several when names collide).
    pub(crate) children: BTreeMap<String, Vec<EntryId>>,
    /// The placements of this entry that no later placement of it has
    /// superseded causally (a frontier, like a field register's writes).
    frontier: Vec<(Stamp, NodeIdx, Placement)>,
}

impl EntryState {
    fn new() -> Self {
        EntryState {
            placed: None,
            kind: None,
            children: BTreeMap::new(),
            frontier: Vec::new(),
        }
    }
}

/// All entries and the placement log.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tree {
    entries: IdMap<EntryId, EntryState>,
    log: Vec<LogRecord>,
}

impl Tree {
    pub(crate) fn get(&self, id: &EntryId) -> Option<&EntryState> {
        self.entries.get(id)
    }

    /// Records the kind a create gives an entry (newest create wins).
    pub(crate) fn set_kind(&mut self, id: EntryId, stamp: &Stamp, kind: EntryKind) {
        let e = self.entries.entry(id).or_insert_with(EntryState::new);
        if e.kind.as_ref().is_none_or(|(s, _)| s < stamp) {
            e.kind = Some((stamp.clone(), kind));
        }
    }

    /// Applies a placement of `entry`, in timestamp order relative to all
    /// others (undoing and redoing newer ones if it arrives late).
    /// `before(a, b)`: node `a` is a strict causal ancestor of node `b`.
    pub(crate) fn place(
        &mut self,
        stamp: Stamp,
        node: NodeIdx,
        entry: EntryId,
        to: Placement,
        before: &dyn Fn(NodeIdx, NodeIdx) -> bool,
    ) {
        let at = self.log.partition_point(|r| r.stamp < stamp);
        if self.log.get(at).is_some_and(|r| r.stamp == stamp) {
            return; // The same op again: idempotent.
        }
        let frontier = &mut self
            .entries
            .entry(entry)
            .or_insert_with(EntryState::new)
            .frontier;
        let supersedes = |old: &(Stamp, NodeIdx, Placement), new: &(Stamp, NodeIdx)| {
            if old.1 == new.1 {
                old.0 < new.0
            } else {
                before(old.1, new.1)
            }
        };
        let new = (stamp.clone(), node);
        if !frontier
            .iter()
            .any(|f| f.1 != node && before(node, f.1) || f.1 == node && f.0 > stamp)
        {
            frontier.retain(|f| !supersedes(f, &new));
            frontier.push((stamp.clone(), node, to.clone()));
        }
        for i in (at..self.log.len()).rev() {
            self.undo(i);
        }
        self.log.insert(
            at,
            LogRecord {
                stamp,
                node,
                entry,
                to,
                before: None,
                applied: false,
            },
        );
        for i in at..self.log.len() {
            self.redo(i);
        }
    }

    fn undo(&mut self, i: usize) {
        let r = &mut self.log[i];
        if !std::mem::replace(&mut r.applied, false) {
            return;
        }
        let (entry, before) = (r.entry, r.before.take());
        self.set_placement(entry, before);
    }

    fn redo(&mut self, i: usize) {
        let r = &self.log[i];
        let entry = r.entry;
        if r.to.parent == entry || self.is_ancestor(&entry, &r.to.parent) {
            return; // Would make a cycle: skipped, as in Kleppmann et al.
        }
        let placed = Some((r.to.clone(), r.stamp.clone(), r.node));
        let before = self.entries.get(&entry).and_then(|e| e.placed.clone());
        let r = &mut self.log[i];
        r.before = before;
        r.applied = true;
        self.set_placement(entry, placed);
    }

    /// Whether `a` is `b` or one of its ancestors, by current placements.
    fn is_ancestor(&self, a: &EntryId, b: &EntryId) -> bool {
        let mut cur = *b;
        // A depth bound guards against a corrupt cycle looping forever; the
        // algorithm itself never creates one.
        for _ in 0..=self.entries.len() {
            if cur == *a {
                return true;
            }
            match self.entries.get(&cur).and_then(|e| e.placed.as_ref()) {
                Some((p, _, _)) => cur = p.parent,
                None => return false,
            }
        }
        false
    }

    fn set_placement(&mut self, entry: EntryId, placed: Option<(Placement, Stamp, NodeIdx)>) {
        let state = self.entries.entry(entry).or_insert_with(EntryState::new);
        let old = std::mem::replace(&mut state.placed, placed.clone());
        if let Some((p, _, _)) = old
            && let Some(parent) = self.entries.get_mut(&p.parent)
            && let Some(ids) = parent.children.get_mut(&p.name)
        {
            ids.retain(|c| *c != entry);
            if ids.is_empty() {
                parent.children.remove(&p.name);
            }
        }
        if let Some((p, _, _)) = placed {
            self.entries
                .entry(p.parent)
                .or_insert_with(EntryState::new)
                .children
                .entry(p.name)
                .or_default()
                .push(entry);
        }
    }

    /// Nodes whose placements of `id` did not take effect although nobody
    /// who saw them placed the entry again: overridden by a concurrent
    /// placement, or skipped because it would have made a cycle.
    pub(crate) fn move_losers(&self, id: &EntryId) -> Option<Vec<NodeIdx>> {
        let e = self.entries.get(id)?;
        let (won, stamp, _) = e.placed.as_ref()?;
        let mut losers: Vec<NodeIdx> = e
            .frontier
            .iter()
            .filter(|(s, _, to)| s != stamp && to != won)
            .map(|(_, n, _)| *n)
            .collect();
        losers.dedup();
        (!losers.is_empty()).then_some(losers)
    }

    /// Deleted entries: (entry, parent it had when deleted, deleting node).
    pub(crate) fn deletions(&self) -> Vec<(EntryId, Option<EntryId>, NodeIdx)> {
        let Some(trash) = self.entries.get(&EntryId::TRASH) else {
            return Vec::new();
        };
        trash
            .children
            .values()
            .flatten()
            .filter_map(|c| {
                let (_, stamp, node) = self.entries.get(c)?.placed.as_ref()?;
                let at = self.log.partition_point(|r| &r.stamp < stamp);
                let former = self.log.get(at)?.before.as_ref().map(|(p, _, _)| p.parent);
                Some((*c, former, *node))
            })
            .collect()
    }

    /// Nodes whose placements of `id` no later placement superseded.
    pub(crate) fn placement_nodes(&self, id: &EntryId) -> impl Iterator<Item = NodeIdx> + '_ {
        self.entries
            .get(id)
            .into_iter()
            .flat_map(|e| e.frontier.iter().map(|(_, n, _)| *n))
    }

    /// Whether the entry is reachable from the root (not deleted, not under
    /// an unplaced or deleted ancestor).
    pub(crate) fn is_live(&self, id: &EntryId) -> bool {
        let mut cur = *id;
        for _ in 0..=self.entries.len() {
            if cur == EntryId::ROOT {
                return true;
            }
            match self.entries.get(&cur).and_then(|e| e.placed.as_ref()) {
                Some((p, _, _)) => cur = p.parent,
                None => return false,
            }
        }
        false
    }

    /// The child of `id` that `name` resolves to: of the entries placed
    /// there with that name, the one placed earliest.
    pub(crate) fn winner_named(&self, id: &EntryId, name: &str) -> Option<EntryId> {
        let ids = self.entries.get(id)?.children.get(name)?;
        if let [only] = ids.as_slice() {
            return Some(*only);
        }
        ids.iter()
            .filter_map(|c| Some((&self.entries.get(c)?.placed.as_ref()?.1, *c)))
            .min()
            .map(|(_, c)| c)
    }

    /// Live children of `id` named `name`, winner first: the entry that
    /// took the name earliest keeps it.
    pub(crate) fn named(&self, id: &EntryId, name: &str) -> Vec<EntryId> {
        let Some(ids) = self.entries.get(id).and_then(|e| e.children.get(name)) else {
            return Vec::new();
        };
        let mut ids: Vec<(Stamp, EntryId)> = ids
            .iter()
            .filter_map(|c| {
                let (_, s, _) = self.entries.get(c)?.placed.as_ref()?;
                Some((s.clone(), *c))
            })
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, c)| c).collect()
    }

    /// Live children of `id` in display order: position key, then name,
    /// then id.
    pub(crate) fn children(&self, id: &EntryId) -> Vec<(EntryId, &Placement)> {
        if *id == EntryId::TRASH {
            return Vec::new();
        }
        let Some(e) = self.entries.get(id) else {
            return Vec::new();
        };
        let mut out: Vec<(EntryId, &Placement)> = e
            .children
            .values()
            .flatten()
            .filter_map(|c| Some((*c, &self.entries.get(c)?.placed.as_ref()?.0)))
            .collect();
        out.sort_by(|(a, pa), (b, pb)| {
            (&pa.position, &pa.name, a).cmp(&(&pb.position, &pb.name, b))
        });
        out
    }

    /// The placement `entry` had just before the placement stamped
    /// `stamp` was applied (`None`: unplaced, or no such placement).
    pub(crate) fn placement_before(&self, stamp: &Stamp) -> Option<&(Placement, Stamp, NodeIdx)> {
        let at = self.log.partition_point(|r| &r.stamp < stamp);
        let record = self.log.get(at).filter(|r| &r.stamp == stamp)?;
        record.before.as_ref()
    }

    /// The names from the root down to `id`, where a deleted entry (or
    /// one under a deleted ancestor) counts as where it was when deleted.
    /// `None` for an entry never placed under the root.
    pub(crate) fn last_names(&self, id: &EntryId) -> Option<Vec<&str>> {
        let mut names: Vec<&str> = Vec::new();
        let mut cur = *id;
        for _ in 0..=self.entries.len() {
            if cur == EntryId::ROOT {
                names.reverse();
                return Some(names);
            }
            let mut placed = self.entries.get(&cur)?.placed.as_ref()?;
            // Deleted (perhaps more than once): where it was before.
            while placed.0.parent == EntryId::TRASH {
                placed = self.placement_before(&placed.1)?;
            }
            let p = &placed.0;
            names.push(p.name.as_str());
            cur = p.parent;
        }
        None
    }

    /// The path of a live entry (`/` for the root).
    pub(crate) fn path_of(&self, id: &EntryId) -> Option<String> {
        let mut names: Vec<&str> = Vec::new();
        let mut cur = *id;
        for _ in 0..=self.entries.len() {
            if cur == EntryId::ROOT {
                names.reverse();
                return Some(if names.is_empty() {
                    "/".to_owned()
                } else {
                    names.iter().fold(String::new(), |s, n| s + "/" + *n)
                });
            }
            let (p, _, _) = self.entries.get(&cur)?.placed.as_ref()?;
            names.push(p.name.as_str());
            cur = p.parent;
        }
        None
    }
}

fn save_placement(out: &mut Out, p: &Placement) {
    out.raw(&p.parent.0);
    out.bytes(p.name.as_bytes());
    out.bool(p.position.is_some());
    if let Some(pos) = &p.position {
        out.bytes(pos);
    }
}

fn load_placement(input: &mut In<'_>) -> Read<Placement> {
    let parent = EntryId(input.array()?);
    let name = std::str::from_utf8(input.bytes()?)
        .map_err(|_| CheckpointError::Corrupt("entry name"))?
        .to_owned();
    let position = if input.bool()? {
        Some(input.bytes()?.to_vec())
    } else {
        None
    };
    Ok(Placement {
        parent,
        name,
        position,
    })
}

fn save_placed(out: &mut Out, placed: &Option<(Placement, Stamp, NodeIdx)>) {
    out.bool(placed.is_some());
    if let Some((p, stamp, node)) = placed {
        save_placement(out, p);
        save_stamp(out, stamp);
        out.u64(*node as u64);
    }
}

fn load_placed(input: &mut In<'_>, nodes: NodeIdx) -> Read<Option<(Placement, Stamp, NodeIdx)>> {
    if !input.bool()? {
        return Ok(None);
    }
    Ok(Some((
        load_placement(input)?,
        load_stamp(input)?,
        load_node(input, nodes)?,
    )))
}

impl Tree {
    /// Saves every entry's state and the placement log (children lists
    /// are rebuilt from placements on load).
    pub(crate) fn save(&self, out: &mut Out) {
        out.u64(self.entries.len() as u64);
        for (id, e) in &self.entries {
            out.raw(&id.0);
            save_placed(out, &e.placed);
            out.bool(e.kind.is_some());
            if let Some((stamp, kind)) = &e.kind {
                save_stamp(out, stamp);
                out.bool(*kind == EntryKind::Text);
            }
            out.u64(e.frontier.len() as u64);
            for (stamp, node, p) in &e.frontier {
                save_stamp(out, stamp);
                out.u64(*node as u64);
                save_placement(out, p);
            }
        }
        out.u64(self.log.len() as u64);
        for r in &self.log {
            save_stamp(out, &r.stamp);
            out.u64(r.node as u64);
            out.raw(&r.entry.0);
            save_placement(out, &r.to);
            save_placed(out, &r.before);
            out.bool(r.applied);
        }
    }

    /// The tree [`Tree::save`] saved, for a history of `nodes` nodes.
    pub(crate) fn load(input: &mut In<'_>, nodes: NodeIdx) -> Read<Tree> {
        let mut tree = Tree::default();
        for _ in 0..input.count(34)? {
            let id = EntryId(input.array()?);
            let placed = load_placed(input, nodes)?;
            let kind = if input.bool()? {
                let stamp = load_stamp(input)?;
                let kind = if input.bool()? {
                    EntryKind::Text
                } else {
                    EntryKind::Map
                };
                Some((stamp, kind))
            } else {
                None
            };
            let mut frontier = Vec::new();
            for _ in 0..input.count(36)? {
                let stamp = load_stamp(input)?;
                let node = load_node(input, nodes)?;
                frontier.push((stamp, node, load_placement(input)?));
            }
            let e = tree.entries.entry(id).or_insert_with(EntryState::new);
            e.kind = kind;
            e.frontier = frontier;
            e.placed = placed;
        }
        let placed: Vec<(EntryId, Placement)> = tree
            .entries
            .iter()
            .filter_map(|(id, e)| Some((*id, e.placed.as_ref()?.0.clone())))
            .collect();
        for (id, p) in placed {
            tree.entries
                .entry(p.parent)
                .or_insert_with(EntryState::new)
                .children
                .entry(p.name)
                .or_default()
                .push(id);
        }
        for _ in 0..input.count(70)? {
            tree.log.push(LogRecord {
                stamp: load_stamp(input)?,
                node: load_node(input, nodes)?,
                entry: EntryId(input.array()?),
                to: load_placement(input)?,
                before: load_placed(input, nodes)?,
                applied: input.bool()?,
            });
        }
        if tree.log.windows(2).any(|w| w[0].stamp >= w[1].stamp) {
            return Err(CheckpointError::Corrupt("placement log out of order"));
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::AuthorId;

    fn stamp(t: u64) -> Stamp {
        Stamp {
            hlc: Hlc {
                wall_ms: t,
                counter: 0,
            },
            author: AuthorId([0; 32]),
            op: 0,
        }
    }

    fn at(parent: EntryId, name: &str) -> Placement {
        Placement {
            parent,
            name: name.into(),
            position: None,
        }
    }

    fn e(n: u8) -> EntryId {
        EntryId([n; 32])
    }

    #[test]
    fn concurrent_moves_never_make_cycles_in_any_order() {
        // a and b under root; concurrently a -> under b and b -> under a.
        let ops = [
            (stamp(1), e(1), at(EntryId::ROOT, "a")),
            (stamp(2), e(2), at(EntryId::ROOT, "b")),
            (stamp(3), e(1), at(e(2), "a")),
            (stamp(4), e(2), at(e(1), "b")),
        ];
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]];
        let mut results = Vec::new();
        for order in orders {
            let mut t = Tree::default();
            for i in order {
                let (s, id, p) = ops[i].clone();
                t.place(s, 0, id, p, &|_, _| false);
            }
            assert!(t.is_live(&e(1)) && t.is_live(&e(2)));
            results.push((t.path_of(&e(1)), t.path_of(&e(2))));
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        // The later move (stamp 4) would close a cycle and is skipped.
        assert_eq!(results[0], (Some("/b/a".into()), Some("/b".into())));
    }

    #[test]
    fn delete_is_a_move_to_trash_and_a_later_create_revives() {
        let mut t = Tree::default();
        t.place(stamp(1), 0, e(1), at(EntryId::ROOT, "a"), &|_, _| false);
        t.place(stamp(2), 0, e(2), at(e(1), "child"), &|_, _| false);
        t.place(stamp(3), 0, e(1), at(EntryId::TRASH, "a"), &|_, _| false);
        assert!(!t.is_live(&e(1)) && !t.is_live(&e(2)));
        t.place(stamp(4), 0, e(1), at(EntryId::ROOT, "a"), &|_, _| false);
        assert_eq!(t.path_of(&e(2)).as_deref(), Some("/a/child"));
        // Replaying the same placement is a no-op.
        t.place(stamp(3), 0, e(1), at(EntryId::TRASH, "a"), &|_, _| false);
        assert!(t.is_live(&e(2)));
    }

    #[test]
    fn name_collisions_keep_both_and_pick_the_earliest() {
        let mut t = Tree::default();
        t.place(stamp(5), 0, e(2), at(EntryId::ROOT, "x"), &|_, _| false);
        t.place(stamp(3), 0, e(1), at(EntryId::ROOT, "x"), &|_, _| false);
        assert_eq!(t.named(&EntryId::ROOT, "x"), vec![e(1), e(2)]);
        assert_eq!(t.children(&EntryId::ROOT).len(), 2);
    }
}
