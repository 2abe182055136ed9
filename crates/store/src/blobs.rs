//! [`BlobStore`]: blob bytes on disk, content-addressed, verified group by
//! group as they are written and read, resumable, optionally encrypted at
//! rest.
//!
//! A blob named by hash `h` (hex) lives in `DIR/h[..2]/` as three files:
//!
//! - `h.meta`: `SLB1`, the key id its groups are encrypted with (0: none),
//!   then its outboard (`syncline_core::blob`): written first, checked
//!   against `h`, so every group can be checked as it lands.
//! - `h.data`: its groups at a fixed stride, each where its index puts it:
//!   the plaintext, or (encrypted) a random 24-byte nonce, the ciphertext
//!   and the 16-byte tag of XChaCha20-Poly1305 over the group, with the
//!   blob's hash and the group's index as associated data (a group cannot
//!   be moved to another place or blob unnoticed).
//! - `h.part`: while the blob is incomplete, the bitfield of the groups
//!   held. A group's bit is written only after its bytes are on stable
//!   storage (in batches, [`BlobStoreOptions::sync_every_groups`]), so
//!   after a crash the bitfield may miss groups that are there (fetched
//!   again), never claim one that is not. A complete blob has no `.part`.
//!
//! Nothing is ever held whole in memory: writes and reads are a group at a
//! time, and [`BlobReader`] streams a blob. The store refuses a blob that
//! would take it past its byte quota, and [`BlobStore::collect_garbage`]
//! removes blobs nothing references once they are older than a grace
//! period.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use syncline_core::blob::{
    Bitfield, BlobError, GROUP_BYTES, Outboard, OutboardBuilder, group_count, group_range,
};
use syncline_core::ids::to_hex;
use thiserror::Error;

/// A key blobs are encrypted with at rest, named by an id that the blobs
/// it encrypted record (so keys can be rotated: old blobs keep reading
/// with their key while new ones use the current one).
#[derive(Clone)]
pub struct BlobKey {
    /// Its id (1 or more: 0 means "not encrypted").
    pub id: u32,
    /// The 256-bit key.
    pub key: [u8; 32],
}

impl std::fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("BlobKey").field("id", &self.id).finish()
    }
}

/// How a [`BlobStore`] behaves.
#[derive(Clone, Debug)]
pub struct BlobStoreOptions {
    /// Bytes of blobs (complete and partial) the store holds at most.
    pub max_bytes: u64,
    /// Keys it can read with.
    pub keys: Vec<BlobKey>,
    /// The id of the key new blobs are encrypted with (`None`: stored in
    /// the clear).
    pub current_key: Option<u32>,
    /// Groups written between syncs of a partial blob (its bytes, then its
    /// bitfield): a crash loses at most this many groups' progress.
    pub sync_every_groups: u64,
}

impl Default for BlobStoreOptions {
    fn default() -> BlobStoreOptions {
        BlobStoreOptions {
            max_bytes: 10 << 30,
            keys: Vec::new(),
            current_key: None,
            sync_every_groups: 64,
        }
    }
}

/// Why a blob store call failed.
#[derive(Debug, Error)]
pub enum BlobStoreError {
    /// The file system failed.
    #[error("blob store I/O failed: {0}")]
    Io(String),
    /// Bytes or an outboard that do not match the blob's hash.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The blob would take the store past its quota.
    #[error("blob of {size} bytes refused: the store holds {used} of its {max} bytes")]
    QuotaExceeded {
        /// The blob's size.
        size: u64,
        /// Bytes held.
        used: u64,
        /// The quota.
        max: u64,
    },
    /// A blob encrypted with a key this store was not given.
    #[error("blob encrypted with key {0}, which this store does not hold")]
    UnknownKey(u32),
    /// The current key id names no key given.
    #[error("current key {0} is not among the keys given")]
    NoCurrentKey(u32),
    /// Stored bytes that fail their check (damage on disk, or a wrong key).
    #[error("stored blob {hash} is damaged: {why}")]
    Damaged {
        /// The blob (hex).
        hash: String,
        /// What failed.
        why: String,
    },
    /// The blob, or the group asked for, is not held.
    #[error("blob {0} is not held")]
    Missing(String),
    /// Garbage collection needs a complete reference index, and this
    /// store held blobs before it kept one.
    #[error(
        "the blob store held blobs before it recorded references: it collects no garbage (remove refs/ and the blobs to start afresh, or keep them all)"
    )]
    NoRefIndex,
}

fn io(e: std::io::Error) -> BlobStoreError {
    BlobStoreError::Io(e.to_string())
}

/// What a store holds of a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// Nothing.
    Missing,
    /// Its outboard and some groups.
    Partial {
        /// Its size.
        size: u64,
        /// Groups held.
        held: u64,
        /// Groups in all.
        groups: u64,
    },
    /// All of it.
    Complete {
        /// Its size.
        size: u64,
    },
}

/// A partial blob being written: its bitfield, and what is not yet synced.
struct Partial {
    data: File,
    held: Bitfield,
    outboard: Outboard,
    key: Option<XChaCha20Poly1305>,
    key_id: u32,
    unsynced: u64,
}

/// Blobs on disk (see the module docs).
pub struct BlobStore {
    dir: PathBuf,
    options: BlobStoreOptions,
    /// Blobs being written, by hash.
    partial: Mutex<HashMap<[u8; 32], Partial>>,
    /// Bytes held (complete and partial blobs' sizes).
    used: Mutex<u64>,
    /// Held while references are recorded, and through a garbage
    /// collection pass: a blob referenced while the pass runs is either
    /// seen referenced by it or recorded after it.
    refs: Mutex<()>,
    /// Meta files read lately, each with what its file looked like: a
    /// transfer reads a blob's outboard once, not once per group (reading
    /// and checking a 1 GiB blob's 512 KiB outboard per 64 KiB group made
    /// reading quadratic). Bounded by [`META_CACHE_BYTES`].
    metas: Mutex<HashMap<[u8; 32], CachedMeta>>,
}

/// Outboard bytes [`BlobStore`] keeps cached (8 MiB: the outboards of
/// 16 GiB of blobs).
const META_CACHE_BYTES: usize = 8 << 20;

/// A meta file as read: the key id and outboard, and the file's length
/// and modification time when read (a blob removed and stored again by
/// another process reads afresh).
struct CachedMeta {
    stamp: (u64, SystemTime),
    meta: Arc<(u32, Outboard)>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("dir", &self.dir)
            .field("used", &self.used())
            .finish_non_exhaustive()
    }
}

/// In `refs/`: the index holds every reference since the store began.
const COMPLETE: &str = "complete";

/// What the first bytes of a `.meta` file say.
const MAGIC: &[u8; 4] = b"SLB1";

/// Bytes an encrypted group adds: its nonce and its tag.
const SEAL_BYTES: usize = 24 + 16;

/// What [`BlobStore::write_group`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// Groups held now.
    pub held: u64,
    /// Whether the blob is now complete.
    pub complete: bool,
}

impl BlobStore {
    /// Opens (creating) the store in `dir`, counting what it holds.
    pub fn open(dir: &Path, options: BlobStoreOptions) -> Result<BlobStore, BlobStoreError> {
        if let Some(id) = options.current_key
            && !options.keys.iter().any(|k| k.id == id)
        {
            return Err(BlobStoreError::NoCurrentKey(id));
        }
        std::fs::create_dir_all(dir.join("tmp")).map_err(io)?;
        // What a crash left in tmp/ long ago is of no use (another process
        // sharing the directory may be writing a newer one).
        if let Ok(entries) = std::fs::read_dir(dir.join("tmp")) {
            for entry in entries.flatten() {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(24 * 3600));
                if stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let store = BlobStore {
            dir: dir.to_path_buf(),
            options,
            partial: Mutex::new(HashMap::new()),
            used: Mutex::new(0),
            refs: Mutex::new(()),
            metas: Mutex::new(HashMap::new()),
        };
        let used = store
            .list()?
            .iter()
            .map(|(_, state)| match state {
                BlobState::Partial { size, .. } | BlobState::Complete { size } => *size,
                BlobState::Missing => 0,
            })
            .sum();
        *store.lock_used() = used;
        // A store that starts empty records every reference from its
        // first blob on: its index is complete.
        let refs = dir.join("refs");
        if !refs.exists() {
            std::fs::create_dir_all(&refs).map_err(io)?;
            if used == 0 && store.list()?.is_empty() {
                write_synced(&refs.join(COMPLETE), b"")?;
            }
        }
        Ok(store)
    }

    fn lock_used(&self) -> MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_partial(&self) -> MutexGuard<'_, HashMap<[u8; 32], Partial>> {
        self.partial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        *self.lock_used()
    }

    fn path(&self, hash: &[u8; 32], ext: &str) -> PathBuf {
        let hex = to_hex(hash);
        self.dir.join(&hex[..2]).join(format!("{hex}.{ext}"))
    }

    fn cipher(&self, id: u32) -> Result<Option<XChaCha20Poly1305>, BlobStoreError> {
        if id == 0 {
            return Ok(None);
        }
        let key = self
            .options
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(BlobStoreError::UnknownKey(id))?;
        Ok(Some(XChaCha20Poly1305::new((&key.key).into())))
    }

    /// The stride between groups in the data file of a blob stored with
    /// key `id`.
    fn stride(id: u32) -> u64 {
        (GROUP_BYTES + if id == 0 { 0 } else { SEAL_BYTES }) as u64
    }

    /// The key id and outboard a blob was stored with, if its meta is
    /// there.
    fn meta(&self, hash: &[u8; 32]) -> Result<Option<Arc<(u32, Outboard)>>, BlobStoreError> {
        let path = self.path(hash, "meta");
        let stamp = match std::fs::metadata(&path) {
            Ok(m) => (m.len(), m.modified().map_err(io)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = metas.get(hash).filter(|c| c.stamp == stamp) {
            return Ok(Some(cached.meta.clone()));
        }
        drop(metas);
        let Some(meta) = self.read_meta(hash)? else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        let mut metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
        let cached: usize = metas
            .values()
            .map(|c| c.meta.1.groups() as usize * 32)
            .sum();
        if cached + meta.1.groups() as usize * 32 > META_CACHE_BYTES {
            metas.clear();
        }
        metas.insert(
            *hash,
            CachedMeta {
                stamp,
                meta: meta.clone(),
            },
        );
        Ok(Some(meta))
    }

    /// Reads and checks blob `hash`'s meta file.
    fn read_meta(&self, hash: &[u8; 32]) -> Result<Option<(u32, Outboard)>, BlobStoreError> {
        let bytes = match std::fs::read(self.path(hash, "meta")) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let damaged = |why: &str| BlobStoreError::Damaged {
            hash: to_hex(hash),
            why: why.to_owned(),
        };
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(damaged("meta file without its header"));
        }
        let key_id = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let outboard = Outboard::decode(&bytes[8..]).map_err(|e| damaged(&e.to_string()))?;
        outboard.verify(hash).map_err(|e| damaged(&e.to_string()))?;
        Ok(Some((key_id, outboard)))
    }

    /// What the store holds of blob `hash`.
    pub fn state(&self, hash: &[u8; 32]) -> Result<BlobState, BlobStoreError> {
        if let Some(p) = self.lock_partial().get(hash) {
            return Ok(BlobState::Partial {
                size: p.outboard.size(),
                held: p.held.count(),
                groups: p.outboard.groups(),
            });
        }
        let Some(meta) = self.meta(hash)? else {
            return Ok(BlobState::Missing);
        };
        let outboard = &meta.1;
        match std::fs::read(self.path(hash, "part")) {
            Ok(bits) => {
                let held = Bitfield::decode(outboard.groups(), &bits).map_err(|e| {
                    BlobStoreError::Damaged {
                        hash: to_hex(hash),
                        why: e.to_string(),
                    }
                })?;
                Ok(BlobState::Partial {
                    size: outboard.size(),
                    held: held.count(),
                    groups: outboard.groups(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BlobState::Complete {
                size: outboard.size(),
            }),
            Err(e) => Err(io(e)),
        }
    }

    /// The groups of blob `hash` held: all of a complete blob, those
    /// written of a partial one; `None` for a blob not begun.
    pub fn held(&self, hash: &[u8; 32]) -> Result<Option<Bitfield>, BlobStoreError> {
        if let Some(p) = self.lock_partial().get(hash) {
            return Ok(Some(p.held.clone()));
        }
        let Some(meta) = self.meta(hash)? else {
            return Ok(None);
        };
        let groups = meta.1.groups();
        match std::fs::read(self.path(hash, "part")) {
            Ok(bits) => Ok(Some(Bitfield::decode(groups, &bits)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut all = Bitfield::new(groups);
                (0..groups).for_each(|i| all.set(i));
                Ok(Some(all))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Blob `hash`'s outboard, if the store has begun or holds it.
    pub fn outboard(&self, hash: &[u8; 32]) -> Result<Option<Outboard>, BlobStoreError> {
        Ok(self.meta(hash)?.map(|meta| meta.1.clone()))
    }

    /// Starts (or resumes) receiving blob `hash` with `outboard`, checked
    /// against the hash. Returns the groups held already (all of them for
    /// a blob held whole). Refuses a blob past the quota.
    pub fn begin(&self, hash: &[u8; 32], outboard: &Outboard) -> Result<Bitfield, BlobStoreError> {
        outboard.verify(hash)?;
        let mut partial = self.lock_partial();
        if let Some(p) = partial.get(hash) {
            return Ok(p.held.clone());
        }
        let groups = outboard.groups();
        if let Some(key_id) = self.meta(hash)?.map(|meta| meta.0) {
            let held = match std::fs::read(self.path(hash, "part")) {
                Ok(bits) => Bitfield::decode(groups, &bits)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut all = Bitfield::new(groups);
                    (0..groups).for_each(|i| all.set(i));
                    return Ok(all);
                }
                Err(e) => return Err(io(e)),
            };
            let data = File::options()
                .write(true)
                .read(true)
                .open(self.path(hash, "data"))
                .map_err(io)?;
            return self.track(&mut partial, hash, data, held, outboard, key_id);
        }
        let size = outboard.size();
        {
            let mut used = self.lock_used();
            if *used + size > self.options.max_bytes {
                return Err(BlobStoreError::QuotaExceeded {
                    size,
                    used: *used,
                    max: self.options.max_bytes,
                });
            }
            *used += size;
        }
        let key_id = self.options.current_key.unwrap_or(0);
        let created = (|| {
            std::fs::create_dir_all(self.path(hash, "meta").parent().expect("a parent"))
                .map_err(io)?;
            let held = Bitfield::new(groups);
            write_synced(&self.path(hash, "part"), &held.encode())?;
            let data = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .read(true)
                .open(self.path(hash, "data"))
                .map_err(io)?;
            // The meta last: a blob without it is not there.
            let mut meta = MAGIC.to_vec();
            meta.extend_from_slice(&key_id.to_be_bytes());
            meta.extend_from_slice(&outboard.encode());
            write_synced(&self.path(hash, "meta"), &meta)?;
            Ok::<_, BlobStoreError>((data, held))
        })();
        let (data, held) = match created {
            Ok(c) => c,
            Err(e) => {
                *self.lock_used() -= size;
                return Err(e);
            }
        };
        self.track(&mut partial, hash, data, held, outboard, key_id)
    }

    /// Keeps blob `hash` among those being written; returns what it holds.
    fn track(
        &self,
        partial: &mut HashMap<[u8; 32], Partial>,
        hash: &[u8; 32],
        data: File,
        held: Bitfield,
        outboard: &Outboard,
        key_id: u32,
    ) -> Result<Bitfield, BlobStoreError> {
        partial.insert(
            *hash,
            Partial {
                data,
                held: held.clone(),
                outboard: outboard.clone(),
                key: self.cipher(key_id)?,
                key_id,
                unsynced: 0,
            },
        );
        Ok(held)
    }

    /// Writes group `index` of blob `hash` (begun with
    /// [`BlobStore::begin`]), after checking it against the outboard. A
    /// group held already is not written again.
    pub fn write_group(
        &self,
        hash: &[u8; 32],
        index: u64,
        group: &[u8],
    ) -> Result<Written, BlobStoreError> {
        let mut partial = self.lock_partial();
        let Some(p) = partial.get_mut(hash) else {
            drop(partial);
            return match self.state(hash)? {
                BlobState::Complete { .. } => Ok(Written {
                    held: group_count(self.outboard(hash)?.map_or(0, |o| o.size())),
                    complete: true,
                }),
                _ => Err(BlobStoreError::Missing(to_hex(hash))),
            };
        };
        p.outboard.verify_group(hash, index, group)?;
        if !p.held.has(index) {
            let sealed;
            let bytes = match &p.key {
                Some(cipher) => {
                    sealed = seal(cipher, hash, index, group)?;
                    &sealed[..]
                }
                None => group,
            };
            p.data
                .write_all_at(bytes, index * BlobStore::stride(p.key_id))
                .map_err(io)?;
            p.held.set(index);
            p.unsynced += 1;
        }
        let complete = p.held.is_complete();
        if complete || p.unsynced >= self.options.sync_every_groups {
            p.data.sync_data().map_err(io)?;
            p.unsynced = 0;
            if complete {
                remove_synced(&self.path(hash, "part"))?;
            } else {
                write_synced(&self.path(hash, "part"), &p.held.encode())?;
            }
        }
        let held = p.held.count();
        if complete {
            partial.remove(hash);
        }
        Ok(Written { held, complete })
    }

    /// Group `index` of blob `hash`, decrypted and checked.
    pub fn read_group(&self, hash: &[u8; 32], index: u64) -> Result<Vec<u8>, BlobStoreError> {
        let meta = self
            .meta(hash)?
            .ok_or_else(|| BlobStoreError::Missing(to_hex(hash)))?;
        let (key_id, outboard) = (meta.0, &meta.1);
        if let Some(p) = self.lock_partial().get(hash)
            && !p.held.has(index)
        {
            return Err(BlobStoreError::Missing(format!(
                "{} group {index}",
                to_hex(hash)
            )));
        }
        let range = group_range(outboard.size(), index);
        let plain_len = (range.end - range.start) as usize;
        let cipher = self.cipher(key_id)?;
        let stored_len = plain_len + if cipher.is_some() { SEAL_BYTES } else { 0 };
        let mut buf = vec![0; stored_len];
        let data = File::open(self.path(hash, "data")).map_err(io)?;
        data.read_exact_at(&mut buf, index * BlobStore::stride(key_id))
            .map_err(io)?;
        let damaged = |why: String| BlobStoreError::Damaged {
            hash: to_hex(hash),
            why,
        };
        let plain = match &cipher {
            Some(cipher) => open(cipher, hash, index, &buf)
                .ok_or_else(|| damaged(format!("group {index} does not decrypt")))?,
            None => buf,
        };
        outboard
            .verify_group(hash, index, &plain)
            .map_err(|e| damaged(e.to_string()))?;
        Ok(plain)
    }

    /// Stores the bytes `reader` yields as a blob (streamed: a group at a
    /// time) and returns its hash and size. A blob held already is kept as
    /// it is.
    pub fn put(&self, mut reader: impl Read) -> Result<([u8; 32], u64), BlobStoreError> {
        let tmp = tempfile_in(&self.dir.join("tmp"))?;
        let mut builder = OutboardBuilder::new();
        let mut group = vec![0; GROUP_BYTES];
        let mut index = 0u64;
        // Groups go to a temporary file as they come (the blob's name, its
        // hash, is known only at the end); then they are written into place
        // as a received blob's are: checked and, with a key, sealed.
        loop {
            let n = read_full(&mut reader, &mut group)?;
            if n == 0 && index > 0 {
                break;
            }
            builder.push(&group[..n]);
            tmp.file
                .write_all_at(&group[..n], index * GROUP_BYTES as u64)
                .map_err(io)?;
            index += 1;
            if n < GROUP_BYTES {
                break;
            }
        }
        let (hash, outboard) = builder.finish();
        let size = outboard.size();
        if !matches!(self.state(&hash)?, BlobState::Complete { .. }) {
            self.begin(&hash, &outboard)?;
            for i in 0..outboard.groups() {
                let range = group_range(size, i);
                let mut buf = vec![0; (range.end - range.start) as usize];
                tmp.file.read_exact_at(&mut buf, range.start).map_err(io)?;
                self.write_group(&hash, i, &buf)?;
            }
        }
        Ok((hash, size))
    }

    /// A reader of blob `hash` (complete), a group at a time, each checked.
    pub fn reader(&self, hash: &[u8; 32]) -> Result<BlobReader<'_>, BlobStoreError> {
        match self.state(hash)? {
            BlobState::Complete { size } => Ok(BlobReader {
                store: self,
                hash: *hash,
                size,
                pos: 0,
                group: Vec::new(),
                group_start: 0,
            }),
            _ => Err(BlobStoreError::Missing(to_hex(hash))),
        }
    }

    /// Every blob begun or held, with its state.
    pub fn list(&self) -> Result<Vec<([u8; 32], BlobState)>, BlobStoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            if name == "tmp" || name == "queues" || name == "refs" || !entry.path().is_dir() {
                continue;
            }
            for file in std::fs::read_dir(entry.path()).map_err(io)? {
                let name = file.map_err(io)?.file_name();
                let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".meta")) else {
                    continue;
                };
                let Some(hash) = syncline_core::ids::from_hex::<32>(hex) else {
                    continue;
                };
                out.push((hash, self.state(&hash)?));
            }
        }
        out.sort_unstable_by_key(|(h, _)| *h);
        Ok(out)
    }

    /// Adds blob `hash` to the durable queue named `queue` (blobs an app
    /// still has to upload, say): it stays there across restarts until
    /// [`BlobStore::dequeue`].
    pub fn enqueue(&self, queue: &str, hash: &[u8; 32]) -> Result<(), BlobStoreError> {
        let path = self.queue_dir(queue).join(to_hex(hash));
        std::fs::create_dir_all(path.parent().expect("a queue directory")).map_err(io)?;
        write_synced(&path, b"")
    }

    /// Takes blob `hash` off queue `queue`.
    pub fn dequeue(&self, queue: &str, hash: &[u8; 32]) -> Result<(), BlobStoreError> {
        remove_synced(&self.queue_dir(queue).join(to_hex(hash)))
    }

    /// The blobs on queue `queue`.
    pub fn queued(&self, queue: &str) -> Result<Vec<[u8; 32]>, BlobStoreError> {
        let entries = match std::fs::read_dir(self.queue_dir(queue)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry.map_err(io)?.file_name();
            if let Some(hash) = name.to_str().and_then(syncline_core::ids::from_hex::<32>) {
                out.push(hash);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn queue_dir(&self, queue: &str) -> PathBuf {
        let name = to_hex(&blake3::hash(queue.as_bytes()).as_bytes()[..8]);
        self.dir.join("queues").join(name)
    }

    /// Removes blob `hash` (held or partial).
    pub fn remove(&self, hash: &[u8; 32]) -> Result<(), BlobStoreError> {
        let size = self.outboard(hash)?.map_or(0, |o| o.size());
        self.lock_partial().remove(hash);
        self.metas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash);
        // The meta first: without it the rest is not a blob.
        for ext in ["meta", "part", "data"] {
            match std::fs::remove_file(self.path(hash, ext)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        let mut used = self.lock_used();
        *used = used.saturating_sub(size);
        Ok(())
    }

    /// Records that `owner` (a room) references blobs `hashes`, durably,
    /// before what references them is acknowledged: garbage collection
    /// keeps every blob any owner ever recorded (old versions of a room
    /// still name it). Appends only what is new to the owner's file.
    ///
    /// If recording fails, the index is marked incomplete (its `complete`
    /// marker removed): from then on this store collects no garbage,
    /// rather than remove a blob whose reference it missed.
    pub fn add_refs(&self, owner: &str, hashes: &[[u8; 32]]) -> Result<(), BlobStoreError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let _refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let recorded = self.append_refs(owner, hashes);
        if recorded.is_err() {
            let _ = std::fs::remove_file(self.dir.join("refs").join(COMPLETE));
        }
        recorded
    }

    fn append_refs(&self, owner: &str, hashes: &[[u8; 32]]) -> Result<(), BlobStoreError> {
        let name = to_hex(&blake3::hash(owner.as_bytes()).as_bytes()[..16]);
        let path = self.dir.join("refs").join(name);
        let known: std::collections::HashSet<[u8; 32]> = read_refs(&path)?.into_iter().collect();
        let mut new: Vec<u8> = Vec::new();
        for hash in hashes.iter().filter(|h| !known.contains(*h)) {
            new.extend_from_slice(hash);
        }
        if new.is_empty() {
            return Ok(());
        }
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // A record torn by a crash is cut off, or every later one would
        // be read askew.
        let len = file.metadata().map_err(io)?.len();
        if len % 32 != 0 {
            file.set_len(len - len % 32).map_err(io)?;
        }
        file.write_all(&new).map_err(io)?;
        file.sync_all().map_err(io)?;
        sync_dir(&path)
    }

    /// Removes the blobs no owner ever referenced (see
    /// [`BlobStore::add_refs`]) once they are older than `grace`: uploads
    /// abandoned, blobs whose nodes never came. Returns what it removed.
    pub fn collect_unreferenced(
        &self,
        grace: Duration,
        now: SystemTime,
    ) -> Result<Vec<[u8; 32]>, BlobStoreError> {
        let _refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.dir.join("refs");
        if !dir.join(COMPLETE).exists() {
            return Err(BlobStoreError::NoRefIndex);
        }
        let mut referenced = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.file_name().is_some_and(|n| n != COMPLETE) {
                referenced.extend(read_refs(&path)?);
            }
        }
        self.collect_garbage(&|h| referenced.contains(h), grace, now)
    }

    /// Removes the blobs `referenced` says nothing references, once their
    /// meta is older than `grace` (an upload abandoned, a blob whose node
    /// never came). Returns what it removed.
    pub fn collect_garbage(
        &self,
        referenced: &dyn Fn(&[u8; 32]) -> bool,
        grace: Duration,
        now: SystemTime,
    ) -> Result<Vec<[u8; 32]>, BlobStoreError> {
        let mut removed = Vec::new();
        for (hash, _) in self.list()? {
            if referenced(&hash) {
                continue;
            }
            let modified = std::fs::metadata(self.path(&hash, "meta"))
                .and_then(|m| m.modified())
                .map_err(io)?;
            if now.duration_since(modified).unwrap_or_default() >= grace {
                self.remove(&hash)?;
                removed.push(hash);
            }
        }
        Ok(removed)
    }
}

/// Reads a complete blob a group at a time, each group checked.
#[derive(Debug)]
pub struct BlobReader<'a> {
    store: &'a BlobStore,
    hash: [u8; 32],
    size: u64,
    pos: u64,
    group: Vec<u8>,
    group_start: u64,
}

impl BlobReader<'_> {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let in_group = self.pos - self.group_start;
        if self.group.is_empty() || in_group >= self.group.len() as u64 {
            let index = self.pos / GROUP_BYTES as u64;
            self.group = self
                .store
                .read_group(&self.hash, index)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            self.group_start = index * GROUP_BYTES as u64;
        }
        let at = (self.pos - self.group_start) as usize;
        let n = out.len().min(self.group.len() - at);
        out[..n].copy_from_slice(&self.group[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Group `index` of blob `hash` sealed: a fresh nonce, then the ciphertext
/// and tag, bound to the blob and the place.
fn seal(
    cipher: &XChaCha20Poly1305,
    hash: &[u8; 32],
    index: u64,
    group: &[u8],
) -> Result<Vec<u8>, BlobStoreError> {
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).map_err(|e| BlobStoreError::Io(e.to_string()))?;
    let aad = associated(hash, index);
    let sealed = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: group,
                aad: &aad,
            },
        )
        .map_err(|_| BlobStoreError::Io("encryption failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// What [`seal`] sealed, opened (`None` if it does not authenticate).
fn open(cipher: &XChaCha20Poly1305, hash: &[u8; 32], index: u64, stored: &[u8]) -> Option<Vec<u8>> {
    let (nonce, sealed) = stored.split_at_checked(24)?;
    let aad = associated(hash, index);
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: &aad,
            },
        )
        .ok()
}

fn associated(hash: &[u8; 32], index: u64) -> Vec<u8> {
    let mut aad = hash.to_vec();
    aad.extend_from_slice(&index.to_be_bytes());
    aad
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, BlobStoreError> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    Ok(n)
}

/// A file in the store's `tmp/`, removed when dropped.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A new file in `dir` with a random name.
fn tempfile_in(dir: &Path) -> Result<TempFile, BlobStoreError> {
    let mut name = [0u8; 12];
    getrandom::fill(&mut name).map_err(|e| BlobStoreError::Io(e.to_string()))?;
    let path = dir.join(to_hex(&name));
    let file = File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    Ok(TempFile { path, file })
}

/// Writes `bytes` to `path` durably: to a temporary file, synced, renamed
/// over it, and the directory synced.
/// The hashes an owner's references file lists (none if it has none; a
/// torn last record is ignored).
fn read_refs(path: &Path) -> Result<Vec<[u8; 32]>, BlobStoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    Ok(bytes
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BlobStoreError> {
    let tmp = path.with_extension("new");
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path)
}

fn remove_synced(path: &Path) -> Result<(), BlobStoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

fn sync_dir(path: &Path) -> Result<(), BlobStoreError> {
    let dir = path.parent().expect("a blob file has a directory");
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}
