//! Exit codes and failures: every error a command meets becomes a
//! [`Failed`] with the code the README gives and a message that says what
//! to do.

use syncline::Error;
use syncline_core::doc::PathError;

/// Exit codes, stable for scripts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Exit {
    /// Something else failed (the message says what).
    Failure = 1,
    /// Bad arguments (clap's own code too).
    Usage = 2,
    /// A path or field that does not exist.
    NotFound = 3,
    /// The server could not be reached or did not acknowledge in time.
    Sync = 4,
    /// Local storage failed or is locked by another process.
    Storage = 5,
    /// The relay refused access: no token, a bad or expired one, or a
    /// token without the rights needed.
    Unauthorized = 6,
}

/// A command's failure: what to print and how to exit.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) exit: Exit,
    pub(crate) message: String,
}

impl Failed {
    pub(crate) fn new(exit: Exit, message: impl Into<String>) -> Failed {
        Failed {
            exit,
            message: message.into(),
        }
    }
}

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        use syncline_core::room::TxnError;
        let exit = match &e {
            Error::Path(PathError::NotFound(_))
            | Error::Txn(TxnError::Path(PathError::NotFound(_)))
            | Error::NodeNotFound { .. }
            | Error::NoConflict { .. } => Exit::NotFound,
            Error::Txn(TxnError::Unauthorized(_)) => Exit::Unauthorized,
            Error::Path(_)
            | Error::RoomName(_)
            | Error::Txn(_)
            | Error::Url { .. }
            | Error::NodeId { .. }
            | Error::NoSuchCandidate { .. }
            | Error::Import { .. }
            | Error::Presence { .. }
            | Error::Pattern { .. }
            | Error::NotADirectory(_) => Exit::Usage,
            Error::Timeout { .. } | Error::NoEndpoint => Exit::Sync,
            Error::Token(_) | Error::NotHolder { .. } => Exit::Usage,
            Error::Thread(_) => Exit::Failure,
            Error::Store(_) | Error::Replica(_) | Error::Dir { .. } => Exit::Storage,
            Error::NoBlobStore | Error::Blob(_) => Exit::Storage,
            Error::BlobRefused { why } if why.starts_with("not_found") => Exit::NotFound,
            Error::BlobRefused { why } if why.starts_with("quota_exceeded") => Exit::Storage,
            Error::BlobRefused { .. } => Exit::Unauthorized,
            Error::BlobTimeout { .. } => Exit::Sync,
            // The replica is in use in a way that excludes this command.
            Error::Locked { .. } | Error::SyncRunning { .. } => Exit::Storage,
        };
        use syncline::{ReplicaError, StoreError};
        let hint = match &e {
            Error::Store(StoreError::Corrupt(_))
            | Error::Replica(ReplicaError::Store(StoreError::Corrupt(_)))
            | Error::Replica(ReplicaError::Corrupt { .. }) => {
                " (the replica's database is damaged or from a newer syncline: move the \
                 --replica directory aside and sync its rooms again from the server)"
            }
            Error::Store(_) | Error::Replica(_) | Error::Dir { .. } => {
                " (is --replica a writable directory on a disk with free space?)"
            }
            Error::Timeout { .. } => " (is the server running? check --server)",
            _ => "",
        };
        Failed::new(exit, format!("{e}{hint}"))
    }
}

pub(crate) type Outcome = Result<(), Failed>;

/// A file that could not be read: exit 3 if it is not there, 1 otherwise.
pub(crate) fn unreadable(file: &std::path::Path, e: &std::io::Error) -> Failed {
    let exit = if e.kind() == std::io::ErrorKind::NotFound {
        Exit::NotFound
    } else {
        Exit::Failure
    };
    Failed::new(exit, format!("cannot read {}: {e}", file.display()))
}
