//! [`Error`]: why an SDK call failed, one typed enum for the whole crate
//! (its sources are re-exported at the crate root, so an app can match
//! them).

use std::path::PathBuf;
use std::time::Duration;

use syncline_core::doc::PathError;
use syncline_core::room::TxnError;
use syncline_store::{ReplicaError, StoreError};
use thiserror::Error;

/// Why an SDK call failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The replica directory could not be created or read.
    #[error("replica directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Storage failed; nothing of the call was made durable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A replica operation failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A transaction step was refused.
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// A path that does not resolve or is malformed.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A room name that is not a valid room id.
    #[error("invalid room name {0:?}: use 1-128 bytes of letters, digits, '-', '_', '.', '/'")]
    RoomName(String),
    /// The server did not acknowledge everything in time.
    #[error(
        "timed out after {} s: {}",
        waited.as_secs_f64(),
        match (connected, last_error) {
            (true, _) => format!("{unacknowledged} local nodes still unacknowledged"),
            (false, Some(e)) => format!("not connected: {e}"),
            (false, None) => "not connected yet".to_owned(),
        }
    )]
    Timeout {
        /// How long the wait was.
        waited: Duration,
        /// Whether the engine was connected when it ended.
        connected: bool,
        /// Local nodes the server had not acknowledged.
        unacknowledged: usize,
        /// Why the last connection attempt failed, if one did.
        last_error: Option<String>,
    },
    /// A sync was asked for with no server to sync with.
    #[error("no server given to sync with")]
    NoEndpoint,
    /// The sync engine's thread could not start.
    #[error("cannot start the sync thread: {0}")]
    Thread(std::io::Error),
    /// A capability token that does not decode or verify.
    #[error("not a usable token: {0}")]
    Token(#[from] syncline_core::auth::CapabilityError),
    /// A capability to delegate that was issued to another key.
    #[error("the parent token was issued to {subject}, not to this replica ({replica})")]
    NotHolder {
        /// Whom the parent token names.
        subject: String,
        /// This replica's key.
        replica: String,
    },
    /// A server URL that can never work (not `ws://host:port[/path]`).
    #[error("bad server URL {url:?}: {why}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The replica directory is a file.
    #[error("{0} is a file, not a replica directory: pass a directory to --replica")]
    NotADirectory(PathBuf),
    /// Another process held the room's write lock for longer than the
    /// wait allowed (it writes for milliseconds at a time: a process that
    /// holds it longer is stuck).
    #[error(
        "room {room}: another process kept it locked for writing for {} s; is one stuck?",
        waited.as_secs_f64()
    )]
    Locked {
        /// The room.
        room: String,
        /// How long this process waited.
        waited: Duration,
    },
    /// Another process runs this replica's sync engine: it carries this
    /// process's changes too (they share the outbox).
    #[error(
        "another process{} is syncing this replica already; its sync uploads this process's \
         changes too (stop it to sync from here)",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    SyncRunning {
        /// Its process id, if it could be read.
        pid: Option<u32>,
    },
    /// No node of the room has this id.
    #[error("room {room} holds no node {id} (syncline log lists them)")]
    NodeNotFound {
        /// The room.
        room: String,
        /// The id or prefix asked for.
        id: String,
    },
    /// There is no conflict of that kind to settle there.
    #[error("{path}: nothing to resolve ({what}; syncline conflicts lists them)")]
    NoConflict {
        /// The path (or node) asked about.
        path: String,
        /// What was looked for.
        what: &'static str,
    },
    /// A conflict candidate that is not listed.
    #[error("candidate {picked} does not exist: pick 0 to {}", candidates - 1)]
    NoSuchCandidate {
        /// The candidate asked for.
        picked: usize,
        /// How many there are.
        candidates: usize,
    },
    /// This replica keeps no blobs (an in-memory one).
    #[error("this replica keeps no blobs (an in-memory replica has no blob store)")]
    NoBlobStore,
    /// The blob store failed or refused.
    #[error(transparent)]
    Blob(#[from] syncline_store::BlobStoreError),
    /// The relay refused a blob transfer.
    #[error("the relay refused the blob: {why}")]
    BlobRefused {
        /// Its reason and message.
        why: String,
    },
    /// A blob did not arrive in time.
    #[error("the blob did not arrive within {} s (held: {state:?})", waited.as_secs_f64())]
    BlobTimeout {
        /// How long the wait was.
        waited: Duration,
        /// What is held of it.
        state: syncline_store::BlobState,
    },
    /// A presence too large to show.
    #[error("presence refused: {why}")]
    Presence {
        /// What is too large.
        why: &'static str,
    },
    /// A value that cannot be imported (see `Room::import`).
    #[error("cannot import: {why}")]
    Import {
        /// What is wrong with it.
        why: &'static str,
    },
    /// A path pattern that does not parse.
    #[error("path pattern {pattern:?}: {source}")]
    Pattern {
        /// As given.
        pattern: String,
        /// Why.
        source: syncline_core::proto::scope::ScopeError,
    },
    /// A node id (or prefix) that cannot name one node.
    #[error("node id {id:?}: {why}")]
    NodeId {
        /// As given.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
}
