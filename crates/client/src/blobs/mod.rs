//! Blobs in the SDK: bytes kept in the replica's blob store
//! (`DIR/blobs`), referenced from fields as `Value::Blob`, and moved to and
//! from the relay by the sync engine beside the room's session
//! (`docs/protocol.md` §5.9). Uploads happen while the room syncs; a
//! download is asked for with [`Room::fetch_blob`].

mod http;
mod transfers;

use std::io::Read;
use std::time::{Duration, Instant};

use syncline_core::{BlobRef, Value};
use syncline_store::{BlobReader, BlobState, BlobStore};

use crate::replica::{Error, Replica, Room};

pub(crate) use http::origin_of;
pub(crate) use transfers::{BLOB_CORR_BASE, Transfers};

impl Replica {
    fn blob_store(&self) -> Result<&BlobStore, Error> {
        self.blobs().ok_or(Error::NoBlobStore)
    }

    /// Stores the bytes `reader` yields as a blob (streamed, deduplicated)
    /// and returns its reference: put it in a field to share it.
    pub fn put_blob(&self, reader: impl Read, mime: &str) -> Result<BlobRef, Error> {
        let (hash, size) = self.blob_store()?.put(reader)?;
        Ok(BlobRef {
            hash,
            size,
            mime: mime.to_owned(),
        })
    }

    /// Every blob the replica holds, whole or in part.
    pub fn blobs_held(&self) -> Result<Vec<([u8; 32], BlobState)>, Error> {
        Ok(self.blob_store()?.list()?)
    }

    /// What the replica holds of blob `hash`.
    pub fn blob_state(&self, hash: &[u8; 32]) -> Result<BlobState, Error> {
        Ok(self.blob_store()?.state(hash)?)
    }

    /// Removes the blobs this replica holds that no room's state
    /// references now and no upload waits for, once they are older than
    /// `grace` (a blob put a moment ago, whose reference is still to be
    /// set, is kept). They can be fetched again from the relay, which
    /// keeps every blob a room ever referenced. Returns what it removed.
    pub fn collect_blob_garbage(&self, grace: Duration) -> Result<Vec<[u8; 32]>, Error> {
        let store = self.blob_store()?;
        let mut keep = std::collections::HashSet::new();
        for name in self.stored_rooms()? {
            keep.extend(
                self.room(&name)?
                    .shared
                    .lock()
                    .durable
                    .room()
                    .doc()
                    .blob_refs(),
            );
            keep.extend(store.queued(&name)?);
        }
        Ok(store.collect_garbage(&|h| keep.contains(h), grace, std::time::SystemTime::now())?)
    }

    /// A reader of blob `hash`, held whole here (each group checked as it
    /// is read).
    pub fn blob_reader(&self, hash: &[u8; 32]) -> Result<BlobReader<'_>, Error> {
        Ok(self.blob_store()?.reader(hash)?)
    }
}

impl Room {
    /// Stores the bytes `reader` yields as a blob and sets field `field`
    /// of the entry at `path` to its reference, in one call; the blob is
    /// uploaded while the room syncs ([`crate::Status::blobs_uploading`]
    /// counts what is left). Returns the reference.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), syncline::Error> {
    /// let replica = syncline::Replica::open("./my-replica")?;
    /// let notes = replica.room("notes")?;
    /// let photo = std::fs::File::open("photo.jpg").map_err(|source| syncline::Error::Dir {
    ///     dir: "photo.jpg".into(),
    ///     source,
    /// })?;
    /// let blob = notes.put_blob("/trip", "photo", photo, "image/jpeg")?;
    /// println!("{} bytes", blob.size);
    /// # Ok(())
    /// # }
    /// ```
    pub fn put_blob(
        &self,
        path: &str,
        field: &str,
        reader: impl Read,
        mime: &str,
    ) -> Result<BlobRef, Error> {
        let store = self.shared.blobs.as_deref().ok_or(Error::NoBlobStore)?;
        let (hash, size) = store.put(reader)?;
        let blob = BlobRef {
            hash,
            size,
            mime: mime.to_owned(),
        };
        self.transact(|tx| tx.set(path, field, Value::Blob(blob.clone())))?;
        self.upload_blob(&blob.hash)?;
        Ok(blob)
    }

    /// Uploads blob `hash` (held here) to the relay while the room syncs,
    /// in this process or a later one (the queue is durable).
    pub fn upload_blob(&self, hash: &[u8; 32]) -> Result<(), Error> {
        let store = self.shared.blobs.as_deref().ok_or(Error::NoBlobStore)?;
        store.enqueue(self.name(), hash)?;
        self.shared.lock().transfers.upload(*hash);
        self.shared.wake_engine();
        Ok(())
    }

    /// Fetches blob `hash` from the relay this room syncs with, unless
    /// held here already, waiting up to `timeout`; resumes what an earlier
    /// fetch got. Needs a running sync of the room.
    pub fn fetch_blob(&self, hash: &[u8; 32], timeout: Duration) -> Result<(), Error> {
        let store = self.shared.blobs.as_deref().ok_or(Error::NoBlobStore)?;
        if matches!(store.state(hash)?, BlobState::Complete { .. }) {
            return Ok(());
        }
        self.shared.lock().transfers.fetch(*hash);
        self.shared.wake_engine();
        let deadline = Instant::now() + timeout;
        // A small blob lands within milliseconds: look every millisecond
        // at first, then every 10.
        let started = Instant::now();
        loop {
            let failed = self.shared.lock().transfers.take_failure(hash);
            if let Some(why) = failed {
                return Err(Error::BlobRefused { why });
            }
            if matches!(store.state(hash)?, BlobState::Complete { .. }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::BlobTimeout {
                    waited: timeout,
                    state: store.state(hash)?,
                });
            }
            let often = started.elapsed() < Duration::from_millis(200);
            std::thread::sleep(Duration::from_millis(if often { 1 } else { 10 }));
        }
    }
}
