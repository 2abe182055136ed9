//! Locks that let several processes share one replica directory.
//!
//! SQLite in WAL mode lets any number of processes read and write the
//! replica's file at once, but a room's history is appended by node number,
//! and its nodes by this replica's one author are numbered by seq: two
//! processes appending from the same view would fork the author's chain.
//! So a process appends to a room only while it holds that room's **write
//! lock** (an advisory lock on a small file per room, `locks/`), after
//! catching up with what the others stored (`DurableRoom::refresh`). The
//! lock is held for one write: milliseconds.
//!
//! One process at a time runs the **sync engine** (`sync.lock`, holding
//! the engine's process id): it carries every process's changes, since
//! they all land in the shared outbox.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use syncline_core::RoomId;
use syncline_core::ids::to_hex;

use crate::replica::Error;

/// Where a replica's locks live, and how long a write waits for one.
#[derive(Debug)]
pub(crate) struct Locks {
    /// `None` for a replica no other process can open (in memory).
    dir: Option<PathBuf>,
    timeout: Duration,
}

/// A room's write lock, held until dropped.
#[derive(Debug)]
pub(crate) struct RoomLock {
    // Closing the file releases the lock.
    _file: File,
}

/// The sync engine's lock, held until dropped.
#[derive(Debug)]
pub(crate) struct EngineLock {
    _file: File,
}

impl Locks {
    /// Locks in `replica_dir/locks`, waited for up to `timeout`.
    pub(crate) fn in_dir(replica_dir: &Path, timeout: Duration) -> Locks {
        Locks {
            dir: Some(replica_dir.to_path_buf()),
            timeout,
        }
    }

    /// No locks: a replica only this process can reach.
    pub(crate) fn none() -> Locks {
        Locks {
            dir: None,
            timeout: Duration::ZERO,
        }
    }

    /// Takes `room`'s write lock, waiting while another process holds it
    /// (up to the timeout, then [`Error::Locked`]).
    pub(crate) fn room(&self, room: &RoomId) -> Result<Option<RoomLock>, Error> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let name = to_hex(&blake3::hash(room.as_str().as_bytes()).as_bytes()[..8]);
        let path = dir.join("locks").join(format!("{name}.lock"));
        let file = open(&path).or_else(|e| {
            // The directory goes with the first lock.
            std::fs::create_dir_all(dir.join("locks")).map_err(|_| e)?;
            open(&path)
        });
        let file = file.map_err(|source| Error::Dir {
            dir: path.clone(),
            source,
        })?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Some(RoomLock { _file: file })),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(16));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        room: room.as_str().to_owned(),
                        waited: self.timeout,
                    });
                }
                Err(TryLockError::Error(source)) => {
                    return Err(Error::Dir { dir: path, source });
                }
            }
        }
    }

    /// Takes the sync engine's lock, or says which process holds it
    /// ([`Error::SyncRunning`]). Never waits.
    pub(crate) fn engine(&self) -> Result<Option<EngineLock>, Error> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let path = dir.join("sync.lock");
        let mut file = open(&path).map_err(|source| Error::Dir {
            dir: path.clone(),
            source,
        })?;
        match file.try_lock() {
            Ok(()) => {
                // Who holds it, for the message another process shows.
                let pid = std::process::id().to_string();
                let written = file
                    .set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| file.write_all(pid.as_bytes()));
                written.map_err(|source| Error::Dir { dir: path, source })?;
                Ok(Some(EngineLock { _file: file }))
            }
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                Err(Error::SyncRunning {
                    pid: holder.trim().parse().ok(),
                })
            }
            Err(TryLockError::Error(source)) => Err(Error::Dir { dir: path, source }),
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}
