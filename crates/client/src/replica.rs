//! The local replica: a directory with a durable store and an identity, and
//! the rooms opened from it. Every write is durable before it returns;
//! reads see the materialized document.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use syncline_core::auth::governance::{policy_entry, should_carry};
use syncline_core::auth::{Capability, Claims};
use syncline_core::dag::NodeIdx;
use syncline_core::doc::{Conflict, PathError};
use syncline_core::room::TxnError;
use syncline_core::{AuthorId, EntryKind, RoomId, Transaction, Value};
use syncline_store::{
    BlobStore, BlobStoreOptions, DurableRoom, MemoryStore, ReplicaError, SqliteOptions,
    SqliteStore, Store,
};
use tokio::sync::Notify;
use tracing::warn;

use crate::blobs::Transfers;
use crate::changes::{Change, Listener, Subscription};
pub use crate::error::Error;
use crate::lock::{Locks, RoomLock};
use crate::presence::RoomPresence;

/// Where a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A transaction on this replica.
    Local,
    /// Nodes received from the server.
    Remote,
    /// Nodes another process sharing the replica directory stored: its
    /// transactions, or what its sync received.
    OtherProcess,
}

/// One child entry as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its full path.
    pub path: String,
    /// What it holds.
    pub kind: EntryKind,
}

/// Milliseconds on a process-wide monotonic clock: the time sessions run
/// on (the sync engine and local commits share it).
pub(crate) fn session_now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Wall-clock milliseconds, for the hybrid logical clock of new nodes.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A replica: one directory, one identity, many rooms.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<ReplicaInner>,
}

pub(crate) struct ReplicaInner {
    /// `None` for an in-memory replica.
    dir: Option<PathBuf>,
    store: Arc<dyn Store>,
    key: syncline_core::Keypair,
    rooms: Mutex<HashMap<RoomId, Room>>,
    pub(crate) locks: Arc<Locks>,
    /// Blob bytes (`DIR/blobs`; none for an in-memory replica).
    blobs: Option<Arc<BlobStore>>,
}

/// How often a replica looks for commits of other processes sharing its
/// directory: their changes reach this process's rooms (and listeners,
/// and sync engine) this much later at most.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// Catches the open rooms of a replica up with what other processes
/// stored, whenever the store says another connection committed, until
/// the replica is dropped.
fn spawn_watcher(inner: Weak<ReplicaInner>, mut seen: u64) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("syncline replica watcher".into())
        .spawn(move || {
            loop {
                std::thread::sleep(WATCH_INTERVAL);
                let Some(replica) = inner.upgrade() else {
                    return;
                };
                let version = replica.store.foreign_version();
                let rooms: Vec<Room> = match version {
                    Ok(v) if v != seen => {
                        seen = v;
                        let rooms = replica.rooms.lock().unwrap_or_else(|p| p.into_inner());
                        rooms.values().cloned().collect()
                    }
                    _ => Vec::new(),
                };
                drop(replica);
                for room in rooms {
                    if let Err(e) = room.shared.catch_up() {
                        warn!(room = room.name(), error = %e, "catching up with another process");
                    }
                }
            }
        })
        .map(drop)
}

impl Drop for ReplicaInner {
    /// Checkpoints the open rooms, so that the next open replays nothing.
    /// Best effort: a room whose checkpoint fails replays what came after
    /// its last one.
    fn drop(&mut self) {
        let rooms = self.rooms.get_mut().unwrap_or_else(|p| p.into_inner());
        for room in rooms.values() {
            let _ = room.shared.lock().durable.checkpoint();
        }
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("dir", &self.inner.dir)
            .field("author", &self.inner.key.author())
            .finish()
    }
}

impl Replica {
    /// Opens (creating if needed) the replica in directory `dir`.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let replica = syncline::Replica::open(dir.path().join("my-replica"))?;
    /// replica.room("notes")?.transact(|tx| tx.set("/a", "n", 1.into()))?;
    /// drop(replica);
    /// // Reopened, it holds what was written.
    /// let again = syncline::Replica::open(dir.path().join("my-replica"))?;
    /// assert_eq!(again.room("notes")?.get("/a", "n")?, Some(1.into()));
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn open(dir: impl AsRef<Path>) -> Result<Replica, Error> {
        let dir = dir.as_ref().to_path_buf();
        if dir.is_file() {
            return Err(Error::NotADirectory(dir));
        }
        std::fs::create_dir_all(&dir).map_err(|source| Error::Dir {
            dir: dir.clone(),
            source,
        })?;
        let options = SqliteOptions {
            shared: true,
            ..SqliteOptions::default()
        };
        let locks = Arc::new(Locks::in_dir(&dir, options.busy_timeout));
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("replica.db"), options)?);
        // Before any room loads: a commit of another process after this
        // is noticed.
        let seen = store.foreign_version()?;
        let key = syncline_store::Replica::open_with_os_identity(store.clone())?
            .key()
            .clone();
        let blobs = Arc::new(BlobStore::open(
            &dir.join("blobs"),
            BlobStoreOptions::default(),
        )?);
        let inner = Arc::new(ReplicaInner {
            dir: Some(dir.clone()),
            store,
            key,
            rooms: Mutex::new(HashMap::new()),
            locks,
            blobs: Some(blobs),
        });
        spawn_watcher(Arc::downgrade(&inner), seen).map_err(|source| Error::Dir { dir, source })?;
        Ok(Replica { inner })
    }

    /// A replica held in memory, with a fresh identity: for tests of an
    /// app, and for state that need not survive the process. It behaves as
    /// a directory's replica does (rooms, transactions, sync), but what it
    /// holds is gone when its last handle is dropped.
    ///
    /// ```
    /// let replica = syncline::Replica::in_memory()?;
    /// let notes = replica.room("notes")?;
    /// notes.transact(|tx| tx.set("/todo/1", "title", "milk".into()))?;
    /// assert_eq!(notes.get("/todo/1", "title")?, Some("milk".into()));
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn in_memory() -> Result<Replica, Error> {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let key = syncline_store::Replica::open_with_os_identity(store.clone())?
            .key()
            .clone();
        Ok(Replica {
            inner: Arc::new(ReplicaInner {
                dir: None,
                store,
                key,
                rooms: Mutex::new(HashMap::new()),
                locks: Arc::new(Locks::none()),
                blobs: None,
            }),
        })
    }

    /// The replica's author id (hex), which signs its nodes.
    pub fn author(&self) -> String {
        self.inner.key.author().to_string()
    }

    /// The relays' keys this replica has synced with: trusted to declare a
    /// locked room's policy.
    pub(crate) fn trusted_relays(&self) -> Result<Vec<AuthorId>, Error> {
        let bytes = self
            .inner
            .store
            .get_meta(TRUSTED_RELAYS)?
            .unwrap_or_default();
        Ok(bytes
            .chunks_exact(32)
            .map(|c| AuthorId(c.try_into().expect("32-byte chunks")))
            .collect())
    }

    /// Adds `relay` to [`Replica::trusted_relays`].
    pub(crate) fn trust_relay(&self, relay: AuthorId) -> Result<(), Error> {
        let mut keys = self.trusted_relays()?;
        if !keys.contains(&relay) {
            keys.push(relay);
            let bytes: Vec<u8> = keys.iter().flat_map(|k| k.0).collect();
            self.inner.store.put_meta(TRUSTED_RELAYS, &bytes)?;
        }
        Ok(())
    }

    /// Keeps `token` as this replica's capability for `room` (what
    /// `syncline join` got for it), for [`Replica::saved_token`].
    pub fn save_token(&self, room: &str, token: &str) -> Result<(), Error> {
        let id = RoomId::new(room).map_err(|_| Error::RoomName(room.to_owned()))?;
        let cap = Capability::from_token(token)?;
        self.inner
            .store
            .put_meta(&format!("token/{room}"), token.as_bytes())?;
        let loaded = self
            .inner
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(open) = loaded {
            open.shared.lock().grant = Some(cap);
        }
        Ok(())
    }

    /// Remembers `servers` (relay URLs, tried in this order) as this
    /// replica's default, for apps and commands that are given none; an
    /// empty list forgets them. Each URL is checked as
    /// [`Replica::connect`] checks it, and kept normalized.
    ///
    /// ```
    /// let replica = syncline::Replica::in_memory()?;
    /// replica.set_remotes(&["ws://127.0.0.1:7700"])?;
    /// assert_eq!(replica.remotes()?, ["ws://127.0.0.1:7700/ws"]);
    /// assert!(replica.set_remotes(&["http://127.0.0.1:7700"]).is_err());
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn set_remotes(&self, servers: &[&str]) -> Result<(), Error> {
        let normalized = servers
            .iter()
            .map(|s| crate::sync::normalize_endpoint(s))
            .collect::<Result<Vec<String>, Error>>()?;
        self.inner
            .store
            .put_meta(REMOTES, normalized.join("\n").as_bytes())?;
        Ok(())
    }

    /// The servers [`Replica::set_remotes`] remembered (none by default).
    pub fn remotes(&self) -> Result<Vec<String>, Error> {
        let bytes = self.inner.store.get_meta(REMOTES)?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The token kept for `room`, if any.
    pub fn saved_token(&self, room: &str) -> Result<Option<String>, Error> {
        let bytes = self.inner.store.get_meta(&format!("token/{room}"))?;
        Ok(bytes.and_then(|b| String::from_utf8(b).ok()))
    }

    /// Delegates a capability this replica holds (`parent`, issued to its
    /// key with `admin`) to another key: `claims` must be no wider than
    /// `parent` (rights, rooms, write paths, expiry), or relays refuse the
    /// result. Signed with this replica's key.
    pub fn delegate(&self, parent: Capability, claims: Claims) -> Result<Capability, Error> {
        if parent.claims.subject != self.inner.key.author() {
            return Err(Error::NotHolder {
                subject: parent.claims.subject.to_string(),
                replica: self.author(),
            });
        }
        Ok(Capability::issue(&self.inner.key, claims, Some(parent)))
    }

    /// The directory (`None` for an in-memory replica).
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// The replica's locks across processes.
    pub(crate) fn locks(&self) -> &Locks {
        &self.inner.locks
    }

    /// The replica's blob store, if it keeps blobs.
    pub(crate) fn blobs(&self) -> Option<&BlobStore> {
        self.inner.blobs.as_deref()
    }

    /// Rooms with any stored history.
    pub fn stored_rooms(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .inner
            .store
            .rooms()?
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect())
    }

    /// Opens room `name` (loading its history; empty if new). Handles to
    /// one room share its state.
    pub fn room(&self, name: &str) -> Result<Room, Error> {
        let id = RoomId::new(name).map_err(|_| Error::RoomName(name.to_owned()))?;
        let mut rooms = self.inner.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(room) = rooms.get(&id) {
            return Ok(room.clone());
        }
        let mut durable = DurableRoom::load(self.inner.store.clone(), self.inner.key.clone(), &id)?;
        // A room whose history declares a policy is checked from the start,
        // so a local change every replica would refuse is refused here.
        if has_policy(durable.room()) {
            durable.govern(self.trusted_relays()?);
        }
        let room = Room {
            shared: Arc::new(RoomShared {
                id: id.clone(),
                state: Mutex::new(RoomState {
                    durable,
                    session: None,
                    send_vv: false,
                    grant: self
                        .saved_token(name)?
                        .and_then(|t| Capability::from_token(&t).ok()),
                    presence: RoomPresence::default(),
                    transfers: Transfers::default(),
                }),
                listeners: Mutex::new(Vec::new()),
                wake: Mutex::new(None),
                locks: self.inner.locks.clone(),
                blobs: self.inner.blobs.clone(),
            }),
        };
        rooms.insert(id, room.clone());
        Ok(room)
    }
}

/// A room of a replica. Cheap to clone; clones share the room.
#[derive(Clone)]
pub struct Room {
    pub(crate) shared: Arc<RoomShared>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").field("id", &self.shared.id).finish()
    }
}

pub(crate) struct RoomShared {
    pub(crate) id: RoomId,
    pub(crate) state: Mutex<RoomState>,
    listeners: Mutex<Vec<Listener>>,
    /// Wakes the sync engine when a local commit queued frames.
    pub(crate) wake: Mutex<Option<Arc<Notify>>>,
    /// The replica's locks across processes.
    locks: Arc<Locks>,
    /// The replica's blob store, if it keeps blobs.
    pub(crate) blobs: Option<Arc<BlobStore>>,
}

/// A room locked for a write: by this process (its state's mutex) and
/// across processes (its write lock), caught up with what other processes
/// stored. Dropping it unlocks, then tells listeners what was caught up.
pub(crate) struct Writing<'a> {
    room: &'a RoomShared,
    state: Option<MutexGuard<'a, RoomState>>,
    across: Option<RoomLock>,
    caught_up: Option<Change>,
}

impl std::ops::Deref for Writing<'_> {
    type Target = RoomState;
    fn deref(&self) -> &RoomState {
        self.state.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Writing<'_> {
    fn deref_mut(&mut self) -> &mut RoomState {
        self.state.as_mut().expect("held until dropped")
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.state.take();
        self.across.take();
        if let Some(change) = self.caught_up.take() {
            self.room.caught_up(change);
        }
    }
}

/// A room's durable state and, while connected, its sync session.
pub(crate) struct RoomState {
    pub(crate) durable: DurableRoom,
    pub(crate) session: Option<syncline_hub::ClientLink>,
    /// The next `hello` lists the version vector whatever its size: the
    /// last set-reconciliation difference was too large for the server's
    /// sketch (`docs/protocol.md` §5.2).
    pub(crate) send_vv: bool,
    /// The capability this replica writes with here (kept by `join`, or
    /// given to the sync engine): the first node it commits in the room
    /// carries it, so that every replica of a locked room finds it in that
    /// node's history (`auth::governance`).
    pub(crate) grant: Option<Capability>,
    /// Its own presence and the peers shown (while syncing).
    pub(crate) presence: RoomPresence,
    /// Blob uploads and downloads, driven by the sync engine.
    pub(crate) transfers: Transfers,
}

/// Metadata key of the servers a replica syncs with by default.
const REMOTES: &str = "remotes";

/// Metadata key of the relays' keys a replica trusts.
const TRUSTED_RELAYS: &str = "trusted-relays";

/// Whether `room`'s history declares a policy (`auth::governance`).
pub(crate) fn has_policy(room: &syncline_core::Room) -> bool {
    room.doc()
        .field(
            &policy_entry(),
            syncline_core::auth::governance::ROOTS_FIELD,
        )
        .is_some()
}

impl RoomState {
    /// The capability a commit should carry: this replica's, allowing
    /// writes, not yet recorded in the room.
    fn grant_to_carry(&self) -> Option<Capability> {
        let cap = self.grant.as_ref()?;
        should_carry(self.durable.room(), &self.durable.author(), cap).then(|| cap.clone())
    }
}

impl RoomState {
    /// Appends what other processes stored in the room since it was loaded
    /// or last caught up, and passes this replica's own nodes among them to
    /// the sync session, if one runs here. Returns the paths they touched
    /// and how many there were, if any.
    fn catch_up(&mut self) -> Result<Option<Change>, Error> {
        let appended = self.durable.refresh()?;
        if appended.is_empty() {
            return Ok(None);
        }
        let nodes: Vec<NodeIdx> = appended.collect();
        let RoomState {
            durable, session, ..
        } = self;
        if let Some(link) = session.as_mut() {
            let me = durable.author();
            let dag = durable.room().dag();
            let own: Vec<NodeIdx> = nodes
                .iter()
                .copied()
                .filter(|&n| *dag.author(n) == me)
                .collect();
            if !own.is_empty() {
                link.send_local(session_now(), durable, &own);
            }
        }
        let details = durable.take_details();
        Ok(Some(Change::of(
            durable.room(),
            Origin::OtherProcess,
            &nodes,
            details,
        )))
    }
}

impl RoomShared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the room for a write (see [`Writing`]).
    pub(crate) fn write(&self) -> Result<Writing<'_>, Error> {
        let mut state = self.lock();
        let across = self.locks.room(&self.id)?;
        let caught_up = state.catch_up()?;
        Ok(Writing {
            room: self,
            state: Some(state),
            across,
            caught_up,
        })
    }

    /// Catches up with what other processes stored (no write follows, so
    /// no lock across processes is needed).
    pub(crate) fn catch_up(&self) -> Result<(), Error> {
        let caught_up = self.lock().catch_up()?;
        if let Some(change) = caught_up {
            self.caught_up(change);
        }
        Ok(())
    }

    /// Tells listeners about nodes another process stored, and the sync
    /// engine about any it should upload.
    fn caught_up(&self, change: Change) {
        self.wake_engine();
        self.notify(&change);
    }

    /// Makes `wake` the sync engine to wake on local commits (`None`: no
    /// engine syncs the room).
    pub(crate) fn set_wake(&self, wake: Option<Arc<Notify>>) {
        *self.wake.lock().unwrap_or_else(|p| p.into_inner()) = wake;
    }

    /// Wakes the sync engine, if one runs here, to send what was queued.
    pub(crate) fn wake_engine(&self) {
        if let Some(wake) = self.wake.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            wake.notify_one();
        }
    }

    /// Tells every listener about a change (dropping those whose
    /// subscription was dropped).
    pub(crate) fn notify(&self, change: &Change) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.retain_mut(|l| l.offer(change));
    }
}

/// The paths nodes `nodes` of `room` touched.
pub(crate) fn touched_paths(room: &syncline_core::Room, nodes: &[NodeIdx]) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for &idx in nodes {
        for (i, op) in room.dag().ops(idx).iter().enumerate() {
            for names in room.doc().touched_paths(room.dag(), idx, i as u32, op) {
                paths.push(format!("/{}", names.join("/")));
            }
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

impl Room {
    /// The room's name.
    pub fn name(&self) -> &str {
        self.shared.id.as_str()
    }

    /// Runs `edit` as one transaction, durable when this returns, and sends
    /// it to the server if connected. Returns the new node's id (`None` if
    /// `edit` changed nothing).
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// let id = notes.transact(|tx| {
    ///     tx.set("/todo/1", "title", "milk".into())?;
    ///     tx.text_insert("/todo/1/details", 0, "two litres")?;
    ///     tx.mv("/todo/1", "/done")
    /// })?;
    /// assert!(id.is_some());
    /// // A refused step refuses the whole transaction: nothing is written.
    /// assert!(notes.transact(|tx| tx.delete("/missing")).is_err());
    /// assert_eq!(notes.node_count(), 1);
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn transact(
        &self,
        edit: impl FnOnce(&mut Transaction<'_>) -> Result<(), TxnError>,
    ) -> Result<Option<String>, Error> {
        let (id, change) = {
            let mut state = self.shared.write()?;
            let carry = state.grant_to_carry();
            let Some(committed) = state
                .durable
                .transact(wall_ms(), |tx| {
                    if let Some(cap) = &carry {
                        tx.record_grant(cap)?;
                    }
                    edit(tx)
                })
                .map_err(|e| match e {
                    ReplicaError::Txn(t) => Error::Txn(t),
                    other => Error::Replica(other),
                })?
            else {
                return Ok(None);
            };
            let RoomState {
                durable, session, ..
            } = &mut *state;
            if let Some(link) = session.as_mut() {
                link.send_local(session_now(), durable, &[committed.idx]);
            }
            let details = durable.take_details();
            let change = Change::of(durable.room(), Origin::Local, &[committed.idx], details);
            (durable.room().dag().id(committed.idx), change)
        };
        self.shared.wake_engine();
        self.shared.notify(&change);
        Ok(Some(id.to_string()))
    }

    /// This room's changes, local, remote and from other processes, from
    /// now until the subscription is dropped.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// let changes = notes.changes();
    /// notes.transact(|tx| tx.text_insert("/doc", 0, "hi"))?;
    /// let change = changes.try_recv().expect("a change");
    /// assert_eq!((change.texts[0].pos, change.texts[0].inserted.as_str()), (0, "hi"));
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn changes(&self) -> Subscription {
        self.listen(None).expect("no pattern to refuse")
    }

    /// This room's changes at paths matching `pattern` (`/todo/**`: the
    /// entry and everything under it; `*` matches within one name), from
    /// now until the subscription is dropped. Each change lists only what
    /// falls inside.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// let todo = notes.subscribe("/todo/**")?;
    /// notes.transact(|tx| tx.set("/todo/1", "title", "milk".into()))?;
    /// notes.transact(|tx| tx.set("/elsewhere", "n", 1.into()))?;
    /// let change = todo.try_recv().expect("the first change");
    /// assert_eq!(change.fields[0].path, "/todo/1");
    /// assert_eq!(change.fields[0].new, Some("milk".into()));
    /// assert!(todo.try_recv().is_none(), "the second is outside the pattern");
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, Error> {
        self.listen(Some(pattern))
    }

    fn listen(&self, pattern: Option<&str>) -> Result<Subscription, Error> {
        let (subscription, listener) = Subscription::new(pattern)?;
        // Changes carry their details from now on.
        self.shared.lock().durable.record_details(true);
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(listener);
        Ok(subscription)
    }

    fn read<T>(&self, f: impl FnOnce(&syncline_core::Room) -> T) -> T {
        f(self.shared.lock().durable.room())
    }

    /// Whether an entry lives at `path`.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| tx.set("/a", "n", 1.into()))?;
    /// assert!(notes.exists("/a")? && !notes.exists("/b")?);
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn exists(&self, path: &str) -> Result<bool, Error> {
        match self.shared.lock().durable.room().doc().resolve(path) {
            Ok(_) => Ok(true),
            Err(PathError::NotFound(_)) => Ok(false),
            Err(e) => Err(Error::Path(e)),
        }
    }

    /// The value of `field` of the entry at `path`.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| tx.set("/todo/1", "title", "milk".into()))?;
    /// let title = notes.get("/todo/1", "title")?;
    /// assert_eq!(title.as_ref().and_then(|v| v.as_str()), Some("milk"));
    /// assert_eq!(notes.get("/todo/1", "done")?, None);
    /// assert!(notes.get("/missing", "title").is_err());
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn get(&self, path: &str, field: &str) -> Result<Option<Value>, Error> {
        self.read(|r| {
            let id = r.doc().resolve(path)?;
            Ok(r.doc().field(&id, field).cloned())
        })
    }

    /// Every field of the entry at `path`.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| {
    ///     tx.set("/todo/1", "title", "milk".into())?;
    ///     tx.set("/todo/1", "done", false.into())
    /// })?;
    /// let fields = notes.fields("/todo/1")?;
    /// assert_eq!(fields.keys().collect::<Vec<_>>(), ["done", "title"]);
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn fields(&self, path: &str) -> Result<BTreeMap<String, Value>, Error> {
        self.read(|r| {
            let id = r.doc().resolve(path)?;
            Ok(r.doc()
                .fields(&id)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect())
        })
    }

    /// The children of the entry at `path`, in display order.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| {
    ///     tx.set("/todo/1", "title", "milk".into())?;
    ///     tx.set("/todo/2", "title", "bread".into())
    /// })?;
    /// let names: Vec<String> = notes.list("/todo")?.into_iter().map(|e| e.name).collect();
    /// assert_eq!(names, ["1", "2"]);
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn list(&self, path: &str) -> Result<Vec<Entry>, Error> {
        self.read(|r| {
            let id = r.doc().resolve(path)?;
            let base = path.trim_end_matches('/');
            Ok(r.doc()
                .children(&id)
                .into_iter()
                .map(|c| Entry {
                    path: format!("{base}/{}", c.name),
                    name: c.name,
                    kind: c.kind,
                })
                .collect())
        })
    }

    /// The text of the text entry at `path`.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| tx.text_insert("/doc", 0, "hello"))?;
    /// notes.transact(|tx| tx.text_insert("/doc", 5, " world"))?;
    /// assert_eq!(notes.text("/doc")?, "hello world");
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn text(&self, path: &str) -> Result<String, Error> {
        self.read(|r| {
            let id = r.doc().resolve(path)?;
            Ok(r.doc().text(&id))
        })
    }

    /// Conflicts at and below `path`.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| tx.set("/a", "n", 1.into()))?;
    /// // One replica's own writes never conflict; concurrent ones do.
    /// assert!(notes.conflicts("/")?.is_empty());
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn conflicts(&self, path: &str) -> Result<Vec<Conflict>, Error> {
        self.read(|r| Ok(r.doc().conflicts(r.dag(), path)?))
    }

    /// The whole visible state as a value (see `Doc::export`).
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| tx.set("/a", "n", 1.into()))?;
    /// let state = notes.export();
    /// let a = &state.as_map().unwrap()["children"].as_map().unwrap()["a"];
    /// assert_eq!(a.as_map().unwrap()["fields"].as_map().unwrap()["n"], 1.into());
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn export(&self) -> Value {
        self.read(|r| r.doc().export())
    }

    /// The canonical state hash (equal on replicas with equal histories).
    ///
    /// ```
    /// let (a, b) = (syncline::Replica::in_memory()?, syncline::Replica::in_memory()?);
    /// // Two empty rooms agree; a change makes them differ until synced.
    /// assert_eq!(a.room("r")?.state_hash(), b.room("r")?.state_hash());
    /// a.room("r")?.transact(|tx| tx.set("/a", "n", 1.into()))?;
    /// assert_ne!(a.room("r")?.state_hash(), b.room("r")?.state_hash());
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn state_hash(&self) -> [u8; 32] {
        self.read(syncline_core::Room::state_hash)
    }

    /// Nodes in the room's history.
    pub fn node_count(&self) -> usize {
        self.read(|r| r.dag().len())
    }

    /// Local nodes the server has not acknowledged as durable.
    ///
    /// ```
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.transact(|tx| tx.set("/a", "n", 1.into()))?;
    /// assert_eq!(notes.unacknowledged()?, 1, "no server has it yet");
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn unacknowledged(&self) -> Result<usize, Error> {
        Ok(self.shared.lock().durable.outbox_len())
    }

    /// Ids (hex) of the local nodes the server has not acknowledged.
    pub fn unacknowledged_ids(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .shared
            .lock()
            .durable
            .outbox()
            .iter()
            .map(ToString::to_string)
            .collect())
    }
}
