//! A room's history for people: each node with its author, time, parents
//! and what it did, by path (`Room::log`, `Room::node`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use syncline_core::dag::NodeIdx;
use syncline_core::doc::Edit;

use crate::replica::{Error, Room};

/// One node of a room's history.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    /// Its id (hex).
    pub id: String,
    /// Its author (hex).
    pub author: String,
    /// Its number in its author's chain, from 1.
    pub seq: u64,
    /// Wall-clock milliseconds of its hybrid logical clock: when it was
    /// committed, by its author's clock.
    pub wall_ms: u64,
    /// The nodes it built on (hex ids).
    pub parents: Vec<String>,
    /// What each of its operations did.
    pub edits: Vec<Edit>,
}

/// Edits a summary names before it counts the rest.
const SUMMARY_EDITS: usize = 3;

impl NodeInfo {
    /// When it was committed, by its author's clock.
    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.wall_ms)
    }

    /// One line saying what it did: its first edits, and how many more.
    ///
    /// ```
    /// let replica = syncline::Replica::in_memory()?;
    /// let notes = replica.room("notes")?;
    /// notes.transact(|tx| tx.set("/todo/1", "title", "milk".into()))?;
    /// let log = notes.log();
    /// assert_eq!(
    ///     log[0].summary(),
    ///     "create /todo (map); create /todo/1 (map); set /todo/1 title = \"milk\""
    /// );
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn summary(&self) -> String {
        let mut shown: Vec<String> = self
            .edits
            .iter()
            .take(SUMMARY_EDITS)
            .map(ToString::to_string)
            .collect();
        if self.edits.len() > SUMMARY_EDITS {
            shown.push(format!("and {} more", self.edits.len() - SUMMARY_EDITS));
        }
        shown.join("; ")
    }
}

/// Fewest hex digits a node id prefix must have.
const MIN_PREFIX: usize = 4;

impl Room {
    /// The history in causal order (oldest first).
    pub fn log(&self) -> Vec<NodeInfo> {
        let state = self.shared.lock();
        let room = state.durable.room();
        room.dag()
            .causal_order()
            .into_iter()
            .map(|idx| describe(room, idx))
            .collect()
    }

    /// The node whose id is `id` or starts with it (at least 4 hex digits,
    /// naming one node).
    ///
    /// ```
    /// let replica = syncline::Replica::in_memory()?;
    /// let notes = replica.room("notes")?;
    /// let id = notes.transact(|tx| tx.set("/a", "n", 1.into()))?.expect("a change");
    /// assert_eq!(notes.node(&id[..8])?.id, id);
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn node(&self, id: &str) -> Result<NodeInfo, Error> {
        let prefix = id.trim().to_ascii_lowercase();
        if prefix.len() < MIN_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::NodeId {
                id: id.to_owned(),
                why: "give at least 4 hex digits of a node id (syncline log lists them)",
            });
        }
        let state = self.shared.lock();
        let room = state.durable.room();
        let dag = room.dag();
        let mut found: Vec<NodeIdx> = Vec::new();
        for idx in 0..dag.next_idx() {
            if dag.id(idx).to_string().starts_with(&prefix) {
                found.push(idx);
                if found.len() > 1 {
                    return Err(Error::NodeId {
                        id: id.to_owned(),
                        why: "several nodes start with it; give more digits",
                    });
                }
            }
        }
        match found.first() {
            Some(&idx) => Ok(describe(room, idx)),
            None => Err(Error::NodeNotFound {
                room: self.name().to_owned(),
                id: id.to_owned(),
            }),
        }
    }
}

fn describe(room: &syncline_core::Room, idx: NodeIdx) -> NodeInfo {
    let (dag, doc) = (room.dag(), room.doc());
    NodeInfo {
        id: dag.id(idx).to_string(),
        author: dag.author(idx).to_string(),
        seq: dag.seq(idx),
        wall_ms: dag.hlc(idx).wall_ms,
        parents: dag
            .parents(idx)
            .iter()
            .map(|&p| dag.id(p).to_string())
            .collect(),
        edits: dag
            .ops(idx)
            .iter()
            .enumerate()
            .map(|(i, op)| doc.describe(dag, idx, i as u32, op))
            .collect(),
    }
}
