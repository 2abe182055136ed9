//! Change events: what a transaction, the sync engine or another process
//! changed in a room (paths, fields with their old and new values, text
//! edits), delivered to subscriptions filtered by path pattern.
//!
//! Each subscription has a bounded queue: a subscriber that falls behind by
//! more than [`SUBSCRIPTION_QUEUE`] changes or [`SUBSCRIPTION_BYTES`] of
//! them misses the ones past that, and the next change it gets says how
//! many it missed (it should read the state again). A dropped subscription
//! ends: it is removed at the next change.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

use syncline_core::dag::NodeIdx;
use syncline_core::doc::Detail;
use syncline_core::proto::scope::Scope;
use syncline_core::{EntryId, Value};
use tokio::sync::Notify;

use crate::replica::{Error, Origin, touched_paths};

/// Changes a subscription holds before it starts missing them.
pub const SUBSCRIPTION_QUEUE: usize = 1024;

/// Bytes of changes (about) a subscription holds before it starts missing
/// them.
pub const SUBSCRIPTION_BYTES: usize = 64 << 20;

/// A change to a room.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The room.
    pub room: String,
    /// Who made it.
    pub origin: Origin,
    /// Nodes it consists of.
    pub nodes: usize,
    /// Paths of the entries changed (deduplicated, sorted).
    pub paths: Vec<String>,
    /// Fields whose value in effect changed, in order.
    pub fields: Vec<FieldChange>,
    /// Text edits, in order (positions as each edit found the text).
    pub texts: Vec<TextChange>,
    /// Changes this subscription missed before this one, for falling
    /// behind (it should read the state again).
    pub missed: usize,
    /// Field and text details not recorded because too many came at once
    /// (`paths` is complete).
    pub details_dropped: usize,
}

/// A field's value in effect changed.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldChange {
    /// The entry's path.
    pub path: String,
    /// The field.
    pub field: String,
    /// The value before (`None`: unset).
    pub old: Option<Value>,
    /// The value after (`None`: unset).
    pub new: Option<Value>,
}

/// A text changed: at `pos`, `deleted` characters went and `inserted`
/// came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextChange {
    /// The text entry's path.
    pub path: String,
    /// Where, in characters from the start.
    pub pos: usize,
    /// Characters removed.
    pub deleted: usize,
    /// Text inserted.
    pub inserted: String,
}

impl Change {
    /// The change `nodes` of `room` made, with the details it recorded.
    pub(crate) fn of(
        room: &syncline_core::Room,
        origin: Origin,
        nodes: &[NodeIdx],
        (details, dropped): (Vec<Detail>, usize),
    ) -> Change {
        let path = |entry: &EntryId| {
            room.doc()
                .path_of(entry)
                .unwrap_or_else(|| format!("<deleted {}>", &entry.to_string()[..8]))
        };
        let mut fields = Vec::new();
        let mut texts = Vec::new();
        for detail in details {
            match detail {
                Detail::Field {
                    entry,
                    field,
                    old,
                    new,
                } => fields.push(FieldChange {
                    path: path(&entry),
                    field,
                    old,
                    new,
                }),
                Detail::Text { entry, edit } => texts.push(TextChange {
                    path: path(&entry),
                    pos: edit.pos,
                    deleted: edit.deleted,
                    inserted: edit.inserted,
                }),
            }
        }
        Change {
            room: room.id().as_str().to_owned(),
            origin,
            nodes: nodes.len(),
            paths: touched_paths(room, nodes),
            fields,
            texts,
            missed: 0,
            details_dropped: dropped,
        }
    }

    /// About how many bytes the change takes in memory.
    fn approx_bytes(&self) -> usize {
        let fields: usize = self
            .fields
            .iter()
            .map(|f| {
                48 + f.path.len()
                    + f.field.len()
                    + f.old.as_ref().map_or(0, Value::approx_size)
                    + f.new.as_ref().map_or(0, Value::approx_size)
            })
            .sum();
        let texts: usize = self
            .texts
            .iter()
            .map(|t| 48 + t.path.len() + t.inserted.len())
            .sum();
        128 + self.paths.iter().map(|p| 24 + p.len()).sum::<usize>() + fields + texts
    }

    /// What of this change falls in `scope`, if anything does.
    fn within(&self, scope: &Scope) -> Option<Change> {
        if scope.is_everything() {
            return Some(self.clone());
        }
        let inside = |path: &str| {
            let names: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            scope.matches(&names)
        };
        let paths: Vec<String> = self.paths.iter().filter(|p| inside(p)).cloned().collect();
        if paths.is_empty() {
            return None;
        }
        Some(Change {
            paths,
            fields: self
                .fields
                .iter()
                .filter(|f| inside(&f.path))
                .cloned()
                .collect(),
            texts: self
                .texts
                .iter()
                .filter(|t| inside(&t.path))
                .cloned()
                .collect(),
            ..self.clone()
        })
    }
}

/// The sending end of a subscription, kept by its room.
pub(crate) struct Listener {
    scope: Scope,
    tx: SyncSender<(Change, usize)>,
    ready: Arc<Notify>,
    /// Bytes queued and not yet read (the subscription subtracts).
    queued: Arc<AtomicUsize>,
    missed: usize,
}

impl Listener {
    /// Offers `change`; false once the subscription is dropped.
    pub(crate) fn offer(&mut self, change: &Change) -> bool {
        let Some(mut mine) = change.within(&self.scope) else {
            return true;
        };
        mine.missed = self.missed;
        let bytes = mine.approx_bytes();
        if self.queued.load(Ordering::Relaxed) + bytes > SUBSCRIPTION_BYTES {
            self.missed += 1;
            // A dropped subscription is noticed at the next send.
            return true;
        }
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        match self.tx.try_send((mine, bytes)) {
            Ok(()) => {
                self.missed = 0;
                self.ready.notify_one();
                true
            }
            Err(TrySendError::Full(_)) => {
                self.queued.fetch_sub(bytes, Ordering::Relaxed);
                self.missed += 1;
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A room's changes within a path pattern, from when it was made until it
/// is dropped. Blocking (`recv`, iteration) and async (`next`) reads.
#[derive(Debug)]
pub struct Subscription {
    rx: Receiver<(Change, usize)>,
    ready: Arc<Notify>,
    queued: Arc<AtomicUsize>,
}

impl Subscription {
    /// A subscription and the listener its room keeps, for `pattern` (a
    /// path glob such as `/todo/**`; `None`: everything).
    pub(crate) fn new(pattern: Option<&str>) -> Result<(Subscription, Listener), Error> {
        let scope = match pattern {
            Some(p) => Scope::parse(&[p.to_owned()]).map_err(|source| Error::Pattern {
                pattern: p.to_owned(),
                source,
            })?,
            None => Scope::everything(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(SUBSCRIPTION_QUEUE);
        let ready = Arc::new(Notify::new());
        let queued = Arc::new(AtomicUsize::new(0));
        Ok((
            Subscription {
                rx,
                ready: ready.clone(),
                queued: queued.clone(),
            },
            Listener {
                scope,
                tx,
                ready,
                queued,
                missed: 0,
            },
        ))
    }

    /// A change taken off the queue, its bytes no longer queued.
    fn taken(&self, (change, bytes): (Change, usize)) -> Change {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
        change
    }

    /// The next change, waiting for it.
    pub fn recv(&self) -> Option<Change> {
        self.rx.recv().ok().map(|c| self.taken(c))
    }

    /// The next change, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Change, RecvTimeoutError> {
        self.rx.recv_timeout(timeout).map(|c| self.taken(c))
    }

    /// The next change if one is waiting.
    pub fn try_recv(&self) -> Option<Change> {
        self.rx.try_recv().ok().map(|c| self.taken(c))
    }

    /// The next change, awaited (any async runtime).
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            match self.rx.try_recv() {
                Ok(change) => return Some(self.taken(change)),
                Err(TryRecvError::Disconnected) => return None,
                // A change sent after this check leaves a permit behind, so
                // the wait below returns at once.
                Err(TryRecvError::Empty) => self.ready.notified().await,
            }
        }
    }
}

impl Iterator for Subscription {
    type Item = Change;

    /// Blocks for the next change.
    fn next(&mut self) -> Option<Change> {
        self.recv()
    }
}
