//! Syncline's client SDK: the crate apps embed.
//!
//! A [`Replica`] is a directory holding a durable store (SQLite) and the
//! replica's signing identity. It opens [`Room`]s: CRDT documents (a tree
//! of entries with fields, moves, deletes and text) whose every change is
//! on disk before the call returns. Edits work offline. [`Replica::connect`]
//! syncs chosen rooms with a relay in the background over one WebSocket,
//! reconnecting with backoff; [`Sync::status`] and [`Sync::flush`] say
//! whether the server holds everything durably.
//!
//! ```no_run
//! # fn main() -> Result<(), syncline::Error> {
//! let replica = syncline::Replica::open("./my-replica")?;
//! let notes = replica.room("notes")?;
//! notes.transact(|tx| tx.set("/todo/1", "title", "buy milk".into()))?;
//! let sync = replica.connect(&["ws://127.0.0.1:7700/ws"], &["notes"])?;
//! sync.flush(std::time::Duration::from_secs(10))?;
//! # Ok(())
//! # }
//! ```

mod history;
mod import;
mod lock;
mod replica;
mod resolve;
mod sync;

pub use history::NodeInfo;
pub use import::Imported;
pub use replica::{Change, Entry, Error, Origin, Replica, Room};
pub use resolve::Pick;
pub use sync::{Status, Sync, SyncOptions, TokenSource, normalize_endpoint};
/// Capabilities for locked rooms: mint them in an app backend
/// (`auth::Capability::issue`), check them, delegate them.
pub use syncline_core::auth;
pub use syncline_core::doc::{Conflict, Edit};
pub use syncline_core::{EntryKind, Value};
