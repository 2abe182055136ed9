//! Syncline's client SDK: the crate apps embed.
//!
//! A [`Replica`] is a directory holding a durable store (SQLite) and the
//! replica's signing identity; several processes may open one directory
//! at once ([`Replica::in_memory`] holds one in memory, for tests). It
//! opens [`Room`]s: CRDT documents (a tree of entries with fields, moves,
//! deletes and text) whose every change is on disk before the call
//! returns. Edits work offline. [`Room::subscribe`] delivers what changes
//! (fields with old and new values, text edits), filtered by path.
//! [`Replica::connect`] syncs chosen rooms with a relay in the background
//! over one WebSocket, reconnecting with backoff; the [`SyncHandle`] says
//! whether the server holds everything durably ([`SyncHandle::flush`],
//! [`SyncHandle::flush_async`], [`SyncHandle::status_updates`]) and adds
//! and removes rooms while it runs.
//!
//! ```no_run
//! # fn main() -> Result<(), syncline::Error> {
//! let replica = syncline::Replica::open("./my-replica")?;
//! let notes = replica.room("notes")?;
//! let todo = notes.subscribe("/todo/**")?;
//! notes.transact(|tx| tx.set("/todo/1", "title", "buy milk".into()))?;
//! let sync = replica.connect(&["ws://127.0.0.1:7700/ws"], &["notes"])?;
//! sync.flush(std::time::Duration::from_secs(10))?;
//! for change in todo {
//!     for field in &change.fields {
//!         println!("{} {}: {:?} -> {:?}", field.path, field.field, field.old, field.new);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod blobs;
mod changes;
mod error;
mod history;
mod import;
mod lock;
mod presence;
mod replica;
mod resolve;
mod sync;

pub use changes::{
    Change, FieldChange, SUBSCRIPTION_BYTES, SUBSCRIPTION_QUEUE, Subscription, TextChange,
};
pub use history::NodeInfo;
pub use import::Imported;
pub use presence::{PRESENCE_QUEUE, Peer, PresenceEvent, PresenceFeed, PresenceKind};
pub use replica::{Entry, Error, Origin, Replica, Room};
pub use resolve::Pick;
pub use sync::{Prefetch, Status, SyncHandle, SyncOptions, TokenSource, normalize_endpoint};
/// Capabilities for locked rooms: mint them in an app backend
/// (`auth::Capability::issue`), check them, delegate them.
pub use syncline_core::auth;
pub use syncline_core::doc::{Conflict, Edit, FieldWrite, PathError};
pub use syncline_core::proto::message::PresenceStatus;
pub use syncline_core::proto::scope::ScopeError;
pub use syncline_core::room::TxnError;
pub use syncline_core::{BlobRef, EntryId, EntryKind, NodeId, Transaction, Value, Vector};
pub use syncline_store::{BlobReader, BlobState, BlobStoreError, ReplicaError, StoreError};
