//! Settling conflicts: a field's concurrent writes, siblings sharing a
//! name, concurrent moves of an entry. Each settles by a new change that
//! has seen every side, so it supersedes them on every replica that
//! receives it (the conflict is then gone there too).

use syncline_core::doc::{Conflict, Edit};
use syncline_core::{EntryId, Op, Value};

use crate::replica::{Error, Room};

/// Which side of a field conflict to keep.
#[derive(Clone, Debug, PartialEq)]
pub enum Pick {
    /// Candidate `n` as [`Room::conflicts`] lists it: 0 is the value in
    /// effect, 1.. the concurrent writes that lost, in order.
    Candidate(usize),
    /// A value of one's own (merging the candidates, say).
    Value(Value),
}

impl Room {
    /// Settles the conflict of `field` at `path` by writing the value
    /// picked (an unset, if the candidate picked was one). Returns the new
    /// node's id.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), syncline::Error> {
    /// use syncline::{Conflict, Pick, Replica};
    /// let notes = Replica::open("./my-replica")?.room("notes")?;
    /// for conflict in notes.conflicts("/")? {
    ///     if let Conflict::Field { path, field, .. } = conflict {
    ///         // Keep the first write that lost.
    ///         notes.resolve_field(&path, &field, Pick::Candidate(1))?;
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn resolve_field(
        &self,
        path: &str,
        field: &str,
        pick: Pick,
    ) -> Result<Option<String>, Error> {
        let conflict = self.conflicts(path)?.into_iter().find_map(|c| match c {
            Conflict::Field {
                path: at,
                field: f,
                winner,
                losers,
            } if at == path && f == field => Some((winner, losers)),
            _ => None,
        });
        let Some((winner, losers)) = conflict else {
            return Err(Error::NoConflict {
                path: path.to_owned(),
                what: "no concurrent writes of this field",
            });
        };
        let value = match pick {
            Pick::Value(v) => Some(v),
            Pick::Candidate(n) => {
                let candidates = losers.len() + 1;
                let chosen = if n == 0 {
                    winner
                } else {
                    losers
                        .into_iter()
                        .nth(n - 1)
                        .ok_or(Error::NoSuchCandidate {
                            picked: n,
                            candidates,
                        })?
                };
                chosen.value
            }
        };
        self.transact(|tx| match value {
            Some(v) => tx.set(path, field, v),
            None => tx.unset(path, field),
        })
    }

    /// Settles a name conflict at `path` (siblings sharing its name):
    /// candidate `keep` (0: the entry the path resolves to, 1..: the others
    /// as [`Room::conflicts`] lists them) keeps the name, and each other is
    /// renamed `NAME~2`, `NAME~3`, … (the first names free). Returns the
    /// new paths of the renamed entries.
    pub fn resolve_name(&self, path: &str, keep: usize) -> Result<Vec<String>, Error> {
        // A name conflict is listed under the parent.
        let parent = match path.trim_end_matches('/').rsplit_once('/') {
            Some(("", _)) | None => "/",
            Some((parent, _)) => parent,
        };
        let conflict = self.conflicts(parent)?.into_iter().find_map(|c| match c {
            Conflict::Name {
                path: at,
                winner,
                others,
            } if at == path => Some((winner, others)),
            _ => None,
        });
        let Some((winner, others)) = conflict else {
            return Err(Error::NoConflict {
                path: path.to_owned(),
                what: "no other entry has this name",
            });
        };
        let mut entries: Vec<EntryId> = std::iter::once(winner).chain(others).collect();
        if keep >= entries.len() {
            return Err(Error::NoSuchCandidate {
                picked: keep,
                candidates: entries.len(),
            });
        }
        entries.remove(keep);
        let base = path.trim_end_matches('/');
        let mut renamed = Vec::new();
        let mut suffix = 2;
        for _ in &entries {
            while self.exists(&format!("{base}~{suffix}"))? {
                suffix += 1;
            }
            renamed.push(format!("{base}~{suffix}"));
            suffix += 1;
        }
        let plan: Vec<(EntryId, String)> = entries.into_iter().zip(renamed.clone()).collect();
        self.transact(|tx| {
            for (entry, new_path) in &plan {
                tx.move_entry(*entry, new_path)?;
            }
            Ok(())
        })?;
        Ok(renamed)
    }

    /// The places a move conflict of the entry at `path` offers, as
    /// [`Room::resolve_move`] numbers them: 0 where it is, then where each
    /// losing move put it.
    pub fn move_candidates(&self, path: &str) -> Result<Vec<String>, Error> {
        let (entry, losers) = self.move_conflict(path)?;
        let mut places = vec![path.to_owned()];
        for loser in losers {
            places.push(self.move_destination(&loser.to_string(), &entry)?);
        }
        Ok(places)
    }

    /// Settles a move conflict of the entry at `path` (concurrent moves of
    /// it): candidate 0 keeps it where it is, candidate `n` puts it where
    /// the `n`th losing move did ([`Room::move_candidates`] lists them).
    /// Returns its path afterwards.
    pub fn resolve_move(&self, path: &str, pick: usize) -> Result<String, Error> {
        let (entry, _) = self.move_conflict(path)?;
        let candidates = self.move_candidates(path)?;
        let target = candidates
            .get(pick)
            .ok_or(Error::NoSuchCandidate {
                picked: pick,
                candidates: candidates.len(),
            })?
            .clone();
        self.transact(|tx| tx.move_entry(entry, &target))?;
        Ok(target)
    }

    /// The entry at `path` and the nodes whose concurrent moves of it lost.
    fn move_conflict(&self, path: &str) -> Result<(EntryId, Vec<syncline_core::NodeId>), Error> {
        self.conflicts(path)?
            .into_iter()
            .find_map(|c| match c {
                Conflict::Move {
                    path: at,
                    entry,
                    losers,
                } if at == path => Some((entry, losers)),
                _ => None,
            })
            .ok_or_else(|| Error::NoConflict {
                path: path.to_owned(),
                what: "no concurrent moves of this entry",
            })
    }

    /// Where node `node` moved `entry`, as a path now.
    fn move_destination(&self, node: &str, entry: &EntryId) -> Result<String, Error> {
        let state = self.shared.lock();
        let room = state.durable.room();
        let dag = room.dag();
        let idx = (0..dag.next_idx())
            .find(|&i| dag.id(i).to_string() == node)
            .ok_or_else(|| Error::NodeNotFound {
                room: self.name().to_owned(),
                id: node.to_owned(),
            })?;
        let ops = dag.ops(idx);
        let (i, op) = ops
            .iter()
            .enumerate()
            .find(|(_, op)| matches!(op, Op::Move { entry: e, .. } if e == entry))
            .ok_or(Error::NoConflict {
                path: node.to_owned(),
                what: "that node does not move the entry",
            })?;
        match room.doc().describe(dag, idx, i as u32, op) {
            Edit::Move { to, .. } => Ok(to),
            _ => unreachable!("a move is described as one"),
        }
    }
}
