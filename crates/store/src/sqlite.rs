//! [`SqliteStore`]: the embedded default backend, on SQLite in WAL mode.
//!
//! **Group commit, leader and followers** (LevelDB's writer queue). There
//! is one write connection and no writer thread: [`Store::commit`] and
//! [`Store::put_meta`] queue their write, and a caller that finds no
//! leader becomes the leader and writes on its own thread. It takes every
//! write queued at that moment (its own first; up to `MAX_GROUP_WRITES`
//! writes or `MAX_GROUP_NODES` nodes) into one transaction, so one fsync
//! acknowledges them all, and tells each of those callers (its followers)
//! their outcome. Writes that queued meanwhile form the next group, which
//! the oldest of their callers leads: each leader commits only the group
//! holding its own write, so no caller waits on writes queued after its
//! own. A lone writer commits on its own thread with no thread handoff;
//! concurrent writers still share fsyncs.
//!
//! If a group's transaction fails, the leader retries each write of the
//! group alone in its own transaction, so one bad write fails only its own
//! caller; an I/O failure then fails each caller in turn, and none of them
//! is acknowledged. A panic while writing fails the group with
//! [`StoreError::Closed`] and poisons the write connection: every later
//! write fails the same way until the store is reopened (reads go on).
//!
//! **Reads** use a small pool of read-only connections: WAL lets them read
//! the last committed state while the leader writes, and a read that starts
//! after a commit was acknowledged sees it.
//!
//! **Schema.** `PRAGMA user_version` is the schema version; `MIGRATIONS`
//! are applied in order, in one transaction, at open. Tables carry the
//! version that introduced their layout (`nodes_v1`), so a later migration
//! that changes a layout creates `nodes_v2` and copies, and an older
//! replica's file opens in a newer build. A file from a newer build is
//! refused rather than misread.
//!
//! - `rooms_v1(key, name, node_count)`: a small integer key per room name;
//!   `node_count` makes counting and listing rooms cheap.
//! - `nodes_v1(pos, id, bytes, sig)`: `pos`, the rowid, is
//!   `room key << 32 | seq` where `seq` counts the room's nodes from 0. A
//!   room's nodes are one contiguous rowid range in append order, so
//!   loading a room is one sequential scan and appending writes only the
//!   end of that range (no other index to update).
//! - `outbox_v1(pos, room, id)`: `pos` (the rowid) only grows, giving the
//!   order added; unique `(room, id)`.
//! - `meta_v1(key, value)`.
//!
//! **Dedup** happens in the leader, against an in-memory map of each
//! written room's ids (keyed by their first 8 bytes, loaded by one scan at
//! the room's first write), not through a unique index: BLAKE3 ids are
//! random, and a B-tree index on them turns every batch into random page
//! writes all over the index (appending 10^6 nodes in batches of 10^4 ran
//! about ten times slower with one). The maps' total size is bounded by
//! [`SqliteOptions::dedup_cache_nodes`]. This needs the write connection
//! to be the file's only writer, which a lock file (`<path>-lock`)
//! enforces.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::{File, TryLockError};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use syncline_core::ids::IdMap;

use rusqlite::{Connection, ErrorCode, OpenFlags, Row, TransactionBehavior, params};
use syncline_core::{NodeId, RoomId, Signature};

use crate::{Batch, Store, StoreError, StoredNode};

/// Schema migrations: entry `i` takes a database from version `i` to
/// `i + 1`. Append only; never edit a shipped entry.
const MIGRATIONS: &[&str] = &[MIGRATION_1];

const MIGRATION_1: &str = "
CREATE TABLE rooms_v1 (
    key INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    node_count INTEGER NOT NULL
);
CREATE TABLE nodes_v1 (
    pos INTEGER PRIMARY KEY,
    id BLOB NOT NULL,
    bytes BLOB NOT NULL,
    sig BLOB
);
CREATE TABLE outbox_v1 (
    pos INTEGER PRIMARY KEY,
    room INTEGER NOT NULL,
    id BLOB NOT NULL,
    UNIQUE (room, id)
);
CREATE TABLE meta_v1 (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
";

/// `PRAGMA application_id` of a Syncline store ("SYNC"), so that another
/// application's SQLite file is refused instead of migrated.
const APPLICATION_ID: i32 = 0x5359_4e43;

/// Bits of a node's `pos` that hold its index in its room.
const SEQ_BITS: u32 = 32;

/// Most nodes one room can hold: the `seq` part of `pos`.
const MAX_ROOM_NODES: i64 = 1 << SEQ_BITS;

/// Most rooms: room keys must leave `pos` a positive `i64`.
const MAX_ROOM_KEY: i64 = (1 << (63 - SEQ_BITS)) - 1;

/// At most this many writes share one transaction: bounds the work (and the
/// latency) of a group.
const MAX_GROUP_WRITES: usize = 1024;

/// A group stops taking writes once it holds this many nodes: past it, one
/// fsync is already a small part of the cost and merging more only delays
/// the first callers.
const MAX_GROUP_NODES: usize = 100_000;

/// Idle read connections kept for reuse; more are opened under load.
const MAX_IDLE_READERS: usize = 4;

/// Rooms whose key and count the writer caches; past it the cache restarts.
/// Their ids are bounded separately (`SqliteOptions::dedup_cache_nodes`).
const MAX_CACHED_ROOMS: usize = 1 << 16;

/// How to open a [`SqliteStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `synchronous=FULL` (the default): every acknowledged commit has been
    /// fsynced. `false` sets `synchronous=NORMAL`: a commit survives a crash
    /// of the process but not a power loss, which breaks the crate's
    /// durability invariant; for benchmarks and throwaway replicas only.
    pub synchronous_full: bool,
    /// How long a connection waits for a lock held by another connection
    /// before failing with [`StoreError::Io`].
    pub busy_timeout: Duration,
    /// Soft bound on the node ids the store keeps in memory for dedup
    /// (about 20 to 40 bytes each). A room written after its ids were
    /// dropped is scanned again. One room larger than the bound is still
    /// cached whole.
    pub dedup_cache_nodes: usize,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            synchronous_full: true,
            busy_timeout: Duration::from_secs(5),
            dedup_cache_nodes: 1 << 22,
        }
    }
}

/// Write counters since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteStats {
    /// Write transactions committed: with `synchronous_full`, one fsync of
    /// the log each.
    pub transactions: u64,
    /// Writes (commits and metadata puts) acknowledged.
    pub batches: u64,
}

/// The SQLite [`Store`]. Dropping it closes its connections, which
/// checkpoints the log into the file.
pub struct SqliteStore {
    path: PathBuf,
    busy_timeout: Duration,
    /// Writes waiting for a leader, and who leads.
    queue: Mutex<Queue>,
    readers: Mutex<Vec<Connection>>,
    /// The write connection, used only by the current leader (the mutex
    /// makes that visible to the compiler and records a panic while
    /// writing). Dropped after `readers`, which `drop` empties, so its
    /// connection is the last to close.
    writer: Mutex<Writer>,
    stats: Arc<Counters>,
    /// Held (locked) for the store's life; declared last so it is released
    /// after every connection has closed.
    _lock: File,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    batches: AtomicU64,
}

/// The write queue. Nothing that can panic runs while it is locked; were it
/// poisoned anyway, `closed` fails every write instead of hanging.
#[derive(Default)]
struct Queue {
    /// Writes no leader has taken yet, oldest first.
    waiting: VecDeque<Ticket>,
    /// Whether a caller leads or has been chosen to. While it is false,
    /// `waiting` is empty.
    leading: bool,
}

/// A caller's queued write.
struct Ticket {
    write: Write,
    /// Where its caller waits.
    slot: Arc<Slot>,
}

/// Where one queued caller waits for the leader's word: its own lock and
/// condition variable, so that a leader wakes exactly its group, and the
/// woken callers do not all contend for the queue's lock.
#[derive(Default)]
struct Slot {
    word: Mutex<Option<Word>>,
    wake: Condvar,
}

/// What a leader tells a queued caller.
enum Word {
    /// The write's outcome.
    Done(Result<(), StoreError>),
    /// Lead: the caller's write is the oldest queued one.
    Lead,
}

impl Slot {
    // Nothing can panic while a slot is locked (it only moves a `Word`
    // in or out), so its lock is never poisoned in a way that matters and
    // both sides go on past poison.

    fn tell(&self, word: Word) {
        *self.word.lock().unwrap_or_else(PoisonError::into_inner) = Some(word);
        self.wake.notify_one();
    }

    fn wait(&self) -> Word {
        let mut word = self.word.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(word) = word.take() {
                return word;
            }
            // Spurious wakeups loop back here.
            word = self.wake.wait(word).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

enum Write {
    Commit { room: RoomId, batch: Batch },
    Meta { key: String, value: Vec<u8> },
}

impl Write {
    fn node_count(&self) -> usize {
        match self {
            Write::Commit { batch, .. } => batch.nodes.len(),
            Write::Meta { .. } => 0,
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, migrating its schema
    /// to the current version.
    ///
    /// Fails with [`StoreError::Corrupt`] if the file is not a Syncline
    /// store or was written by a newer version of this crate, and with
    /// [`StoreError::Io`] if another `SqliteStore` has it open.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let lock = lock_file(path)?;
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(options.busy_timeout).map_err(sql)?;
        // Before anything writes: a foreign or newer file is left untouched.
        check_version(&conn, MIGRATIONS.len())?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Io(format!(
                "{}: SQLite refused WAL mode (journal_mode is {mode})",
                path.display()
            )));
        }
        let synchronous = if options.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(sql)?;
        migrate(&mut conn, MIGRATIONS)?;

        let stats = Arc::new(Counters::default());
        let writer = Writer {
            conn,
            cache: Cache {
                rooms: HashMap::new(),
                budget: options.dedup_cache_nodes,
            },
            stats: Arc::clone(&stats),
            #[cfg(test)]
            panic_on: None,
        };
        Ok(SqliteStore {
            path: path.to_owned(),
            busy_timeout: options.busy_timeout,
            queue: Mutex::new(Queue::default()),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(writer),
            stats,
            _lock: lock,
        })
    }

    /// Write counters since the store was opened.
    pub fn stats(&self) -> SqliteStats {
        SqliteStats {
            transactions: self.stats.transactions.load(Ordering::Relaxed),
            batches: self.stats.batches.load(Ordering::Relaxed),
        }
    }

    /// Queues a write and returns once it is durable (or failed): as the
    /// leader that commits it, or as a follower told its outcome.
    fn write(&self, write: Write) -> Result<(), StoreError> {
        let slot = Arc::new(Slot::default());
        let mut queue = self.queue.lock().map_err(closed)?;
        queue.waiting.push_back(Ticket {
            write,
            slot: Arc::clone(&slot),
        });
        if queue.leading {
            drop(queue);
            match slot.wait() {
                Word::Done(outcome) => return outcome,
                Word::Lead => queue = self.queue.lock().map_err(closed)?,
            }
        } else {
            queue.leading = true;
        }
        self.lead(queue, &slot)
    }

    /// Commits the group at the front of the queue as its leader, then
    /// passes leadership to the oldest write still queued, if any. `me` is
    /// the caller's own write, at the front (a new leader found the queue
    /// empty; a chosen one held its oldest write); returns its outcome.
    fn lead<'a>(
        &'a self,
        mut queue: MutexGuard<'a, Queue>,
        me: &Arc<Slot>,
    ) -> Result<(), StoreError> {
        let group = take_group(&mut queue.waiting);
        drop(queue);
        let outcomes = self.commit_group(&group);
        let mut mine = None;
        // Followers first: woken before the next leader, they have a
        // chance to queue their next write in time for its group.
        for (ticket, outcome) in group.into_iter().zip(outcomes) {
            if Arc::ptr_eq(&ticket.slot, me) {
                mine = Some(outcome);
            } else {
                ticket.slot.tell(Word::Done(outcome));
            }
        }
        let mut queue = self.queue.lock().map_err(closed)?;
        match queue.waiting.front() {
            Some(next) => {
                // `leading` stays set: leadership passes without a gap in
                // which a new caller could claim it too.
                let next = Arc::clone(&next.slot);
                drop(queue);
                next.tell(Word::Lead);
            }
            None => queue.leading = false,
        }
        mine.unwrap_or_else(|| {
            Err(StoreError::Io(
                "write queue: the leader's write was not in its group".to_owned(),
            ))
        })
    }

    /// Commits `group` on the write connection: one outcome per write, in
    /// order.
    ///
    /// A panic is caught here so that it fails only this group, as
    /// [`StoreError::Closed`], instead of unwinding through the leader's
    /// caller and leaving the followers waiting forever. It poisons the
    /// writer mutex (the connection and the cache may be mid-change), and
    /// a poisoned writer fails every later group the same way.
    fn commit_group(&self, group: &[Ticket]) -> Vec<Result<(), StoreError>> {
        let committed = catch_unwind(AssertUnwindSafe(|| {
            let mut writer = self.writer.lock().ok()?;
            Some(writer.commit_group(group))
        }));
        match committed {
            Ok(Some(outcomes)) => outcomes,
            Ok(None) | Err(_) => group.iter().map(|_| Err(StoreError::Closed)).collect(),
        }
    }

    /// Runs `f` on a pooled read connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.lock_readers().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => self.open_reader()?,
        };
        let result = f(&conn);
        // A connection whose call failed is dropped rather than reused, in
        // case the failure left it in a bad state.
        if result.is_ok() {
            let mut idle = self.lock_readers();
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
        result
    }

    /// Locks the idle reader pool.
    ///
    /// Panics if the mutex is poisoned, which only a panic while pushing or
    /// popping a connection could cause.
    fn lock_readers(&self) -> MutexGuard<'_, Vec<Connection>> {
        self.readers
            .lock()
            .expect("SqliteStore reader pool mutex poisoned")
    }

    fn open_reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(self.busy_timeout).map_err(sql)?;
        Ok(conn)
    }
}

/// Takes the exclusive lock that makes this process the file's only writer.
/// A separate file, because SQLite's own locks live on the database file
/// and, on some platforms, would collide with a whole-file lock.
fn lock_file(path: &Path) -> Result<File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push("-lock");
    let lock_path = PathBuf::from(lock_path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Io(format!("{}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Io(format!(
            "{} is already open in another SqliteStore",
            path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(StoreError::Io(format!("{}: {e}", lock_path.display()))),
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Readers close first so that the write connection, dropped next
        // with its field, is the last one: closing it checkpoints the log
        // into the file and removes it. No write is in flight: every
        // caller borrows the store.
        self.readers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// Maps a poisoned write queue to [`StoreError::Closed`] for every caller:
/// whoever finds it poisoned fails every queued write, rather than leave
/// their callers waiting for a leader.
fn closed(poisoned: PoisonError<MutexGuard<'_, Queue>>) -> StoreError {
    for ticket in poisoned.into_inner().waiting.drain(..) {
        ticket.slot.tell(Word::Done(Err(StoreError::Closed)));
    }
    StoreError::Closed
}

/// Takes the next group from the front of the queue: at least one write,
/// then more while the group is under its bounds.
fn take_group(waiting: &mut VecDeque<Ticket>) -> Vec<Ticket> {
    let mut group = Vec::new();
    let mut nodes = 0;
    while group.len() < MAX_GROUP_WRITES && nodes < MAX_GROUP_NODES {
        let Some(ticket) = waiting.pop_front() else {
            break;
        };
        nodes += ticket.write.node_count();
        group.push(ticket);
    }
    group
}

impl Store for SqliteStore {
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        self.write(Write::Commit {
            room: room.clone(),
            batch,
        })
    }

    fn load_nodes(&self, room: &RoomId) -> Result<Vec<StoredNode>, StoreError> {
        self.read(|conn| {
            let Some(row) = lookup_room(conn, room)? else {
                return Ok(Vec::new());
            };
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, bytes, sig FROM nodes_v1 WHERE pos >= ?1 AND pos < ?2 ORDER BY pos",
                )
                .map_err(sql)?;
            let (first, end) = pos_range(row.key);
            let mut rows = stmt.query([first, end]).map_err(sql)?;
            // The count was read in an earlier snapshot: a capacity hint
            // only, bounded so a corrupt count cannot make us allocate wildly.
            let mut nodes = Vec::with_capacity(row.nodes.clamp(0, 1 << 22) as usize);
            while let Some(row) = rows.next().map_err(sql)? {
                nodes.push(stored_node(row)?);
            }
            Ok(nodes)
        })
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        self.read(|conn| {
            let nodes = lookup_room(conn, room)?.map_or(0, |row| row.nodes);
            u64::try_from(nodes)
                .map_err(|_| StoreError::Corrupt(format!("room {room} counts {nodes} nodes")))
        })
    }

    fn outbox(&self, room: &RoomId) -> Result<Vec<NodeId>, StoreError> {
        self.read(|conn| {
            let Some(row) = lookup_room(conn, room)? else {
                return Ok(Vec::new());
            };
            let mut stmt = conn
                .prepare_cached("SELECT id FROM outbox_v1 WHERE room = ?1 ORDER BY pos")
                .map_err(sql)?;
            let mut rows = stmt.query([row.key]).map_err(sql)?;
            let mut ids = Vec::new();
            while let Some(row) = rows.next().map_err(sql)? {
                ids.push(NodeId(blob_array(row, 0, "outbox id")?));
            }
            Ok(ids)
        })
    }

    fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT name FROM rooms_v1 WHERE node_count > 0 ORDER BY name")
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            let mut rooms = Vec::new();
            while let Some(row) = rows.next().map_err(sql)? {
                let name = row.get_ref(0).and_then(|v| Ok(v.as_str()?)).map_err(sql)?;
                let room = RoomId::new(name).map_err(|e| {
                    StoreError::Corrupt(format!("stored room name {name:?} is invalid: {e}"))
                })?;
                rooms.push(room);
            }
            Ok(rooms)
        })
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT value FROM meta_v1 WHERE key = ?1")
                .map_err(sql)?;
            let mut rows = stmt.query([key]).map_err(sql)?;
            match rows.next().map_err(sql)? {
                Some(row) => Ok(Some(row.get(0).map_err(sql)?)),
                None => Ok(None),
            }
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(Write::Meta {
            key: key.to_owned(),
            value: value.to_vec(),
        })
    }
}

/// A room's key and node count, as stored.
#[derive(Clone, Copy, Debug)]
struct RoomRow {
    key: i64,
    nodes: i64,
}

fn lookup_room(conn: &Connection, room: &RoomId) -> Result<Option<RoomRow>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT key, node_count FROM rooms_v1 WHERE name = ?1")
        .map_err(sql)?;
    let mut rows = stmt.query([room.as_str()]).map_err(sql)?;
    let Some(row) = rows.next().map_err(sql)? else {
        return Ok(None);
    };
    let found = RoomRow {
        key: row.get(0).map_err(sql)?,
        nodes: row.get(1).map_err(sql)?,
    };
    if !(1..=MAX_ROOM_KEY).contains(&found.key) || !(0..=MAX_ROOM_NODES).contains(&found.nodes) {
        return Err(StoreError::Corrupt(format!(
            "room {room} has key {} and {} nodes",
            found.key, found.nodes
        )));
    }
    Ok(Some(found))
}

/// The `pos` range of a room's nodes: `first..end`.
fn pos_range(key: i64) -> (i64, i64) {
    (key << SEQ_BITS, (key + 1) << SEQ_BITS)
}

fn stored_node(row: &Row<'_>) -> Result<StoredNode, StoreError> {
    let id = NodeId(blob_array(row, 0, "node id")?);
    let bytes = row
        .get_ref(1)
        .and_then(|v| Ok(v.as_blob()?.to_vec()))
        .map_err(sql)?;
    let sig = row
        .get_ref(2)
        .and_then(|v| Ok(v.as_blob_or_null()?))
        .map_err(sql)?
        .map(|blob| {
            <[u8; 64]>::try_from(blob)
                .map(Signature)
                .map_err(|_| StoreError::Corrupt(format!("signature of {} bytes", blob.len())))
        })
        .transpose()?;
    Ok(StoredNode { id, bytes, sig })
}

fn blob_array<const N: usize>(
    row: &Row<'_>,
    column: usize,
    what: &str,
) -> Result<[u8; N], StoreError> {
    let blob = row
        .get_ref(column)
        .and_then(|v| Ok(v.as_blob()?))
        .map_err(sql)?;
    <[u8; N]>::try_from(blob)
        .map_err(|_| StoreError::Corrupt(format!("{what} of {} bytes, not {N}", blob.len())))
}

/// Maps a SQLite error: damaged files and unexpected stored values are
/// [`StoreError::Corrupt`], everything else [`StoreError::Io`].
fn sql(e: rusqlite::Error) -> StoreError {
    let corrupt = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    ) || matches!(
        e,
        rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    );
    if corrupt {
        StoreError::Corrupt(e.to_string())
    } else {
        StoreError::Io(e.to_string())
    }
}

/// Reads the file's schema version, refusing a file that is not a Syncline
/// store or is newer than `known`.
fn check_version(conn: &Connection, known: usize) -> Result<usize, StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sql)?;
    let version = usize::try_from(version)
        .ok()
        .filter(|&v| v <= known)
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "schema version {version} is newer than this build of syncline-store \
                 supports (up to {known}); open the file with a newer version"
            ))
        })?;
    if version == 0 {
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .map_err(sql)?;
        if objects > 0 {
            return Err(StoreError::Corrupt(
                "not a Syncline store: the file has tables but no schema version".to_owned(),
            ));
        }
    } else {
        let app: i32 = conn
            .pragma_query_value(None, "application_id", |row| row.get(0))
            .map_err(sql)?;
        if app != APPLICATION_ID {
            return Err(StoreError::Corrupt(format!(
                "not a Syncline store: application_id is {app:#x}"
            )));
        }
    }
    Ok(version)
}

/// Brings the schema to `migrations.len()`, applying the missing
/// migrations in order in one transaction (all or none).
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    // Checked again inside the transaction: the version must not change
    // between the check and the migrations.
    let version = check_version(&tx, migrations.len())?;
    if version == migrations.len() {
        return Ok(());
    }
    for migration in &migrations[version..] {
        tx.execute_batch(migration).map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", migrations.len())
        .map_err(sql)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

/// The write connection and what it caches, used by the current leader.
struct Writer {
    conn: Connection,
    cache: Cache,
    stats: Arc<Counters>,
    /// Tests only: writing metadata under this key panics mid-transaction.
    #[cfg(test)]
    panic_on: Option<String>,
}

/// What the writer knows of the rooms it wrote. Valid only for committed
/// state: cleared whenever a transaction fails.
struct Cache {
    rooms: HashMap<RoomId, RoomState>,
    /// Soft bound on the ids held in all `RoomState::ids`.
    budget: usize,
}

struct RoomState {
    key: i64,
    /// Nodes stored: the next node's `seq`.
    nodes: i64,
    /// Every stored id of the room; loaded on the first write that needs
    /// it.
    ids: Option<RoomIds>,
}

/// The stored ids of one room, each with its `seq`.
///
/// Keyed by the id's first 8 bytes, which halves the memory and the time of
/// a full 32-byte key; a prefix hit is confirmed by reading the stored id
/// (a rowid lookup, paid only for duplicates). Distinct ids with one prefix
/// (by chance about n^2 / 2^65, or by an attacker's 2^32 work) go to
/// `clashes` under their full id.
struct RoomIds {
    by_prefix: IdMap<u64, u32>,
    clashes: IdMap<NodeId, u32>,
}

impl RoomIds {
    fn prefix(id: &NodeId) -> u64 {
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&id.0[..8]);
        u64::from_le_bytes(prefix)
    }

    fn len(&self) -> usize {
        self.by_prefix.len() + self.clashes.len()
    }

    /// Whether the room may hold `id`: false is certain, true needs
    /// [`RoomIds::find`] to confirm. No I/O.
    fn may_hold(&self, id: &NodeId) -> bool {
        // An id in `clashes` shares its prefix with one in `by_prefix`.
        self.by_prefix.contains_key(&Self::prefix(id))
    }

    /// The `seq` of `id` if the room holds it. `first` is the room's first
    /// `pos`.
    fn find(&self, tx: &Connection, first: i64, id: &NodeId) -> Result<Option<u32>, StoreError> {
        // Almost always empty: skip hashing the full id.
        if !self.clashes.is_empty()
            && let Some(&seq) = self.clashes.get(id)
        {
            return Ok(Some(seq));
        }
        let Some(&seq) = self.by_prefix.get(&Self::prefix(id)) else {
            return Ok(None);
        };
        let mut stmt = tx
            .prepare_cached("SELECT id FROM nodes_v1 WHERE pos = ?1")
            .map_err(sql)?;
        let mut rows = stmt.query([first + i64::from(seq)]).map_err(sql)?;
        let Some(row) = rows.next().map_err(sql)? else {
            return Err(StoreError::Corrupt(format!(
                "node at pos {} is missing",
                first + i64::from(seq)
            )));
        };
        let stored = NodeId(blob_array(row, 0, "node id")?);
        Ok((stored == *id).then_some(seq))
    }

    /// Records `id`, which the room does not hold yet, at `seq`.
    fn insert(&mut self, id: NodeId, seq: u32) {
        match self.by_prefix.entry(Self::prefix(&id)) {
            Entry::Vacant(slot) => {
                slot.insert(seq);
            }
            Entry::Occupied(_) => {
                self.clashes.insert(id, seq);
            }
        }
    }
}

impl Writer {
    /// Commits `group` in one transaction: one outcome per write, in order.
    /// If that fails, retries each write alone, so a write that cannot be
    /// applied fails only its own caller.
    fn commit_group(&mut self, group: &[Ticket]) -> Vec<Result<(), StoreError>> {
        if group.len() > 1 && self.transaction(group).is_ok() {
            return group.iter().map(|_| Ok(())).collect();
        }
        group
            .iter()
            .map(|ticket| self.transaction(std::slice::from_ref(ticket)))
            .collect()
    }

    fn transaction(&mut self, group: &[Ticket]) -> Result<(), StoreError> {
        let result = self.try_transaction(group);
        match &result {
            Ok(()) => {
                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .batches
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
            }
            // The rolled-back transaction may have created rooms or added
            // ids that the cache now holds.
            Err(_) => self.cache.clear(),
        }
        result
    }

    fn try_transaction(&mut self, group: &[Ticket]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        for ticket in group {
            match &ticket.write {
                Write::Commit { room, batch } => apply_batch(&tx, &mut self.cache, room, batch)?,
                Write::Meta { key, value } => {
                    #[cfg(test)]
                    if self.panic_on.as_ref() == Some(key) {
                        panic!("injected panic while writing {key}");
                    }
                    tx.prepare_cached(
                        "INSERT INTO meta_v1 (key, value) VALUES (?1, ?2) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    )
                    .and_then(|mut stmt| stmt.execute(params![key, value]))
                    .map_err(sql)?;
                }
            }
        }
        tx.commit().map_err(sql)
    }
}

impl Cache {
    fn clear(&mut self) {
        self.rooms.clear();
    }

    /// The state of `room`, read or created inside the transaction, with
    /// its ids loaded if `with_ids`.
    fn room(
        &mut self,
        tx: &Connection,
        room: &RoomId,
        with_ids: bool,
    ) -> Result<&mut RoomState, StoreError> {
        if !self.rooms.contains_key(room) {
            if self.rooms.len() >= MAX_CACHED_ROOMS {
                self.clear();
            }
            let row = match lookup_room(tx, room)? {
                Some(row) => row,
                None => create_room(tx, room)?,
            };
            let state = RoomState {
                key: row.key,
                nodes: row.nodes,
                ids: None,
            };
            self.rooms.insert(room.clone(), state);
        }
        let load = with_ids && self.rooms.get(room).is_some_and(|s| s.ids.is_none());
        if load {
            let wanted = self.rooms.get(room).map_or(0, |s| s.nodes as usize);
            let mut held: usize = self
                .rooms
                .values()
                .filter_map(|s| s.ids.as_ref().map(RoomIds::len))
                .sum();
            // Make room by forgetting other rooms' ids, in no particular
            // order: a forgotten room costs one scan when next written.
            for (name, other) in &mut self.rooms {
                if held + wanted <= self.budget {
                    break;
                }
                if name != room
                    && let Some(ids) = other.ids.take()
                {
                    held -= ids.len();
                }
            }
        }
        let state = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| StoreError::Io(format!("writer cache lost room {room}")))?;
        if load {
            state.ids = Some(load_ids(tx, state)?);
        }
        Ok(state)
    }
}

fn create_room(tx: &Connection, room: &RoomId) -> Result<RoomRow, StoreError> {
    tx.prepare_cached("INSERT INTO rooms_v1 (name, node_count) VALUES (?1, 0)")
        .and_then(|mut stmt| stmt.execute([room.as_str()]))
        .map_err(sql)?;
    let key = tx.last_insert_rowid();
    if key > MAX_ROOM_KEY {
        return Err(StoreError::Io(format!(
            "cannot create room {room}: the store holds the most rooms it supports"
        )));
    }
    Ok(RoomRow { key, nodes: 0 })
}

/// Reads every id of a room, checking that the seqs are `0..nodes`.
fn load_ids(tx: &Connection, state: &RoomState) -> Result<RoomIds, StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT pos, id FROM nodes_v1 WHERE pos >= ?1 AND pos < ?2 ORDER BY pos")
        .map_err(sql)?;
    let (first, end) = pos_range(state.key);
    let mut rows = stmt.query([first, end]).map_err(sql)?;
    let mut ids = RoomIds {
        by_prefix: IdMap::with_capacity_and_hasher(state.nodes as usize, Default::default()),
        clashes: IdMap::default(),
    };
    let mut seq = 0u32;
    while let Some(row) = rows.next().map_err(sql)? {
        let pos: i64 = row.get(0).map_err(sql)?;
        if pos != first + i64::from(seq) {
            return Err(StoreError::Corrupt(format!(
                "room key {}: node at pos {pos}, expected seq {seq}",
                state.key
            )));
        }
        ids.insert(NodeId(blob_array(row, 1, "node id")?), seq);
        seq = seq.wrapping_add(1);
    }
    if i64::try_from(ids.len()).ok() != Some(state.nodes) {
        return Err(StoreError::Corrupt(format!(
            "room key {} counts {} nodes but holds {}",
            state.key,
            state.nodes,
            ids.len()
        )));
    }
    Ok(ids)
}

/// Sizes of the multi-row `INSERT`s that `insert_nodes` uses, largest
/// first, and their SQL.
static INSERT_NODES: LazyLock<[(usize, String); 3]> = LazyLock::new(|| {
    [64, 8, 1].map(|rows| {
        let values = vec!["(?, ?, ?, ?)"; rows].join(", ");
        let sql = format!("INSERT INTO nodes_v1 (pos, id, bytes, sig) VALUES {values}");
        (rows, sql)
    })
});

/// Inserts `nodes` (each with its `pos`, ascending) with as few statement
/// runs as the chunk sizes allow. Each run of a statement pays a fixed cost
/// (opening the table's cursor, stepping, resetting, counting changes) that
/// a multi-row `INSERT` pays once per chunk instead of once per node. Each
/// row still costs a B-tree descent from the root, in which SQLite checks
/// that the explicit `pos` is free.
fn insert_nodes(tx: &Connection, nodes: &[(i64, &StoredNode)]) -> Result<(), StoreError> {
    let mut rest = nodes;
    for (rows, text) in INSERT_NODES.iter() {
        if rest.len() < *rows {
            continue;
        }
        let mut stmt = tx.prepare_cached(text).map_err(sql)?;
        while rest.len() >= *rows {
            let (chunk, tail) = rest.split_at(*rows);
            for (i, (pos, node)) in chunk.iter().enumerate() {
                let sig = node.sig.as_ref().map(|s| &s.0[..]);
                let column = 4 * i;
                stmt.raw_bind_parameter(column + 1, pos)
                    .and_then(|()| stmt.raw_bind_parameter(column + 2, &node.id.0[..]))
                    .and_then(|()| stmt.raw_bind_parameter(column + 3, &node.bytes[..]))
                    .and_then(|()| stmt.raw_bind_parameter(column + 4, sig))
                    .map_err(sql)?;
            }
            stmt.raw_execute().map_err(sql)?;
            rest = tail;
        }
    }
    Ok(())
}

/// Applies one batch inside the group's transaction, in the order every
/// backend uses: nodes, signatures, outbox additions, outbox removals.
fn apply_batch(
    tx: &Connection,
    cache: &mut Cache,
    room: &RoomId,
    batch: &Batch,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let with_ids = !batch.nodes.is_empty() || !batch.signatures.is_empty();
    let state = cache.room(tx, room, with_ids)?;
    let (first, _) = pos_range(state.key);
    let before = state.nodes;
    if let Some(ids) = &mut state.ids {
        if !batch.nodes.is_empty() {
            // New nodes with their pos, inserted in chunks by `insert_nodes`.
            let mut new = Vec::with_capacity(batch.nodes.len());
            for node in &batch.nodes {
                if ids.may_hold(&node.id) {
                    // Confirming a duplicate reads the stored row, which
                    // may be one of `new` (an id twice in one batch).
                    insert_nodes(tx, &new)?;
                    new.clear();
                    if ids.find(tx, first, &node.id)?.is_some() {
                        continue;
                    }
                }
                if state.nodes >= MAX_ROOM_NODES {
                    return Err(StoreError::Io(format!(
                        "room {room} holds the most nodes a store supports"
                    )));
                }
                new.push((first + state.nodes, node));
                // In range: `nodes < MAX_ROOM_NODES = 2^32`.
                ids.insert(node.id, state.nodes as u32);
                state.nodes += 1;
            }
            insert_nodes(tx, &new)?;
        }
        if !batch.signatures.is_empty() {
            let mut sign = tx
                .prepare_cached("UPDATE nodes_v1 SET sig = ?2 WHERE pos = ?1 AND sig IS NULL")
                .map_err(sql)?;
            for (id, sig) in &batch.signatures {
                if let Some(seq) = ids.find(tx, first, id)? {
                    sign.execute(params![first + i64::from(seq), &sig.0[..]])
                        .map_err(sql)?;
                }
            }
        }
    }
    if !batch.outbox_add.is_empty() {
        let mut add = tx
            .prepare_cached(
                "INSERT INTO outbox_v1 (room, id) VALUES (?1, ?2) ON CONFLICT (room, id) DO NOTHING",
            )
            .map_err(sql)?;
        for id in &batch.outbox_add {
            add.execute(params![state.key, &id.0[..]]).map_err(sql)?;
        }
    }
    if !batch.outbox_remove.is_empty() {
        let mut remove = tx
            .prepare_cached("DELETE FROM outbox_v1 WHERE room = ?1 AND id = ?2")
            .map_err(sql)?;
        for id in &batch.outbox_remove {
            remove.execute(params![state.key, &id.0[..]]).map_err(sql)?;
        }
    }
    if state.nodes != before {
        tx.prepare_cached("UPDATE rooms_v1 SET node_count = ?2 WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute([state.key, state.nodes]))
            .map_err(sql)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use crate::conformance::{test_node, test_signature};

    fn room(name: &str) -> RoomId {
        RoomId::new(name).unwrap()
    }

    fn nodes_batch(tag: u8, range: std::ops::Range<u64>) -> Batch {
        Batch {
            nodes: range.map(|n| test_node(tag, n)).collect(),
            ..Batch::default()
        }
    }

    /// Version 1 exactly as shipped, frozen here on purpose: if migration 1
    /// is ever edited, files written by the shipped version must still
    /// open, and this copy keeps testing that.
    const SHIPPED_V1: &str = "
        CREATE TABLE rooms_v1 (key INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                               node_count INTEGER NOT NULL);
        CREATE TABLE nodes_v1 (pos INTEGER PRIMARY KEY, id BLOB NOT NULL,
                               bytes BLOB NOT NULL, sig BLOB);
        CREATE TABLE outbox_v1 (pos INTEGER PRIMARY KEY, room INTEGER NOT NULL,
                                id BLOB NOT NULL, UNIQUE (room, id));
        CREATE TABLE meta_v1 (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
        PRAGMA application_id = 1398361667;
        PRAGMA user_version = 1;
    ";

    #[test]
    fn opens_a_hand_made_version_1_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let (a, b) = (test_node(1, 0), test_node(1, 1));
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SHIPPED_V1).unwrap();
            conn.execute("INSERT INTO rooms_v1 VALUES (1, 'notes', 2)", [])
                .unwrap();
            for (seq, node) in [&a, &b].into_iter().enumerate() {
                conn.execute(
                    "INSERT INTO nodes_v1 VALUES (?1, ?2, ?3, ?4)",
                    params![
                        (1i64 << 32) + seq as i64,
                        &node.id.0[..],
                        &node.bytes,
                        (seq == 1).then_some(&test_signature(1).0[..])
                    ],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO outbox_v1 (room, id) VALUES (1, ?1)",
                [&b.id.0[..]],
            )
            .unwrap();
            conn.execute("INSERT INTO meta_v1 VALUES ('identity', x'0102')", [])
                .unwrap();
        }

        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let notes = room("notes");
        let mut signed_b = b.clone();
        signed_b.sig = Some(test_signature(1));
        assert_eq!(
            store.load_nodes(&notes).unwrap(),
            vec![a.clone(), signed_b.clone()]
        );
        assert_eq!(store.outbox(&notes).unwrap(), vec![b.id]);
        assert_eq!(store.rooms().unwrap(), vec![notes.clone()]);
        assert_eq!(store.get_meta("identity").unwrap(), Some(vec![1, 2]));
        // New writes continue the room and dedup against the old rows.
        let c = test_node(1, 2);
        store
            .commit(
                &notes,
                Batch {
                    nodes: vec![b.clone(), c.clone(), a.clone()],
                    signatures: vec![(a.id, test_signature(0))],
                    ..Batch::default()
                },
            )
            .unwrap();
        let mut signed_a = a;
        signed_a.sig = Some(test_signature(0));
        assert_eq!(
            store.load_nodes(&notes).unwrap(),
            vec![signed_a, signed_b, c]
        );
        assert_eq!(store.node_count(&notes).unwrap(), 3);
    }

    #[test]
    fn refuses_a_file_from_a_newer_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.db");
        drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
        let future = MIGRATIONS.len() + 1;
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", future)
            .unwrap();
        match SqliteStore::open(&path, SqliteOptions::default()) {
            Err(StoreError::Corrupt(message)) => {
                assert!(
                    message.contains(&format!("schema version {future} is newer")),
                    "unclear message: {message}"
                );
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn refuses_a_foreign_sqlite_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreign.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); PRAGMA user_version = 1;")
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&path, SqliteOptions::default()),
            Err(StoreError::Corrupt(_))
        ));
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, [0x5a; 8192]).unwrap();
        assert!(matches!(
            SqliteStore::open(&garbage, SqliteOptions::default()),
            Err(StoreError::Corrupt(_))
        ));
        let unversioned = dir.path().join("unversioned.db");
        Connection::open(&unversioned)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        assert!(matches!(
            SqliteStore::open(&unversioned, SqliteOptions::default()),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn migrations_apply_in_order_from_the_files_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
        let steps = [
            "CREATE TABLE log (step INTEGER);",
            "INSERT INTO log VALUES (2);",
            "INSERT INTO log VALUES (3);",
        ];
        migrate(&mut conn, &steps[..1]).unwrap();
        conn.execute("INSERT INTO log VALUES (1)", []).unwrap();
        migrate(&mut conn, &steps).unwrap();
        // Already current: nothing runs again.
        migrate(&mut conn, &steps).unwrap();
        let log: Vec<i64> = conn
            .prepare("SELECT step FROM log ORDER BY rowid")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(log, [1, 2, 3]);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, 3);
        // A failing migration leaves the file at its old version.
        let broken = [
            steps[0],
            steps[1],
            steps[2],
            "INSERT INTO missing VALUES (4);",
        ];
        assert!(migrate(&mut conn, &broken).is_err());
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, 3);
    }

    #[test]
    fn one_store_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert!(matches!(
            SqliteStore::open(&path, SqliteOptions::default()),
            Err(StoreError::Io(_))
        ));
        drop(store);
        SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    }

    #[test]
    fn dedup_holds_when_the_id_cache_is_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions {
            dedup_cache_nodes: 10,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&dir.path().join("store.db"), options).unwrap();
        let (r1, r2) = (room("one"), room("two"));
        for round in 0..4 {
            // Each room alone exceeds the budget: every write reloads.
            store.commit(&r1, nodes_batch(1, 0..8 + round)).unwrap();
            store.commit(&r2, nodes_batch(2, 0..8 + round)).unwrap();
        }
        assert_eq!(store.node_count(&r1).unwrap(), 11);
        assert_eq!(store.load_nodes(&r2).unwrap(), nodes_batch(2, 0..11).nodes);
    }

    /// Holds the database's write lock from another connection, so the
    /// leader blocks in `BEGIN` while callers queue up behind it.
    fn block_writer(path: &Path) -> Connection {
        let blocker = Connection::open(path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        blocker
    }

    #[test]
    fn concurrent_commits_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("store.db"), SqliteOptions::default()).unwrap();
        let shared = room("shared");
        thread::scope(|scope| {
            for t in 0..16u8 {
                let (store, shared) = (&store, &shared);
                scope.spawn(move || {
                    for c in 0..20 {
                        store.commit(shared, nodes_batch(t, c..c + 1)).unwrap();
                    }
                });
            }
        });
        let loaded = store.load_nodes(&shared).unwrap();
        assert_eq!(loaded.len(), 16 * 20);
        for t in 0..16u8 {
            // Byte 8 of a test id is its tag.
            let own: Vec<_> = loaded.iter().filter(|n| n.id.0[8] == t).cloned().collect();
            assert_eq!(own, nodes_batch(t, 0..20).nodes, "thread {t} in its order");
        }
        let stats = store.stats();
        assert_eq!(stats.batches, 16 * 20);
        assert!(stats.transactions <= stats.batches);
        // Every leader passed leadership on or gave it up: the next writer
        // leads at once.
        let queue = store.queue.lock().unwrap();
        assert!(queue.waiting.is_empty() && !queue.leading);
    }

    #[test]
    fn queued_commits_share_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let r = room("grouped");
        let blocker = block_writer(&path);
        thread::scope(|scope| {
            for t in 0..8u8 {
                let (store, r) = (&store, &r);
                scope.spawn(move || store.commit(r, nodes_batch(t, 0..3)).unwrap());
            }
            // Let every commit reach the queue (or the blocked writer).
            thread::sleep(Duration::from_millis(300));
            blocker.execute_batch("COMMIT").unwrap();
        });
        assert_eq!(store.node_count(&r).unwrap(), 24);
        let stats = store.stats();
        assert_eq!(stats.batches, 8);
        // The first caller found the queue empty, led a group of its own
        // commit and blocked; all the others queued behind it and share
        // the next group, which the oldest of them leads: at most two
        // transactions, two fsyncs.
        assert!(stats.transactions <= 2, "{stats:?}");
    }

    #[test]
    fn a_failing_write_fails_alone_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        // A write that SQLite refuses, as a full disk or a broken row would.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON meta_v1 WHEN NEW.key = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'poisoned write'); END;",
            )
            .unwrap();
        let r = room("mixed");
        let blocker = block_writer(&path);
        let results = thread::scope(|scope| {
            let store = &store;
            let first = scope.spawn(move || store.put_meta("first", b"1"));
            thread::sleep(Duration::from_millis(100));
            let good = scope.spawn(|| store.commit(&r, nodes_batch(1, 0..5)));
            let poison = scope.spawn(move || store.put_meta("poison", b"x"));
            let also_good = scope.spawn(move || store.put_meta("second", b"2"));
            thread::sleep(Duration::from_millis(300));
            blocker.execute_batch("COMMIT").unwrap();
            [first, good, poison, also_good].map(|h| h.join().unwrap())
        });
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
        match &results[2] {
            Err(StoreError::Io(message)) => assert!(message.contains("poisoned write")),
            other => panic!("expected the poisoned write to fail, got {other:?}"),
        }
        assert_eq!(store.node_count(&r).unwrap(), 5);
        assert_eq!(store.get_meta("second").unwrap(), Some(b"2".to_vec()));
        assert_eq!(store.get_meta("poison").unwrap(), None);
        assert_eq!(store.stats().batches, 3);
    }

    #[test]
    fn a_panic_while_writing_fails_its_group_and_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let r = room("panicky");
        store.commit(&r, nodes_batch(1, 0..3)).unwrap();
        store.writer.lock().unwrap().panic_on = Some("panic".to_owned());
        let blocker = block_writer(&path);
        let results = thread::scope(|scope| {
            let store = &store;
            let first = scope.spawn(move || store.put_meta("first", b"1"));
            thread::sleep(Duration::from_millis(100));
            // Queued behind `first`: one group, whose leader panics while
            // writing `panic`.
            let group = [
                scope.spawn(|| store.commit(&r, nodes_batch(1, 3..5))),
                scope.spawn(move || store.put_meta("panic", b"x")),
                scope.spawn(move || store.put_meta("second", b"2")),
            ];
            thread::sleep(Duration::from_millis(300));
            blocker.execute_batch("COMMIT").unwrap();
            let first = first.join().unwrap();
            (first, group.map(|h| h.join().unwrap()))
        });
        assert!(results.0.is_ok(), "{:?}", results.0);
        for result in &results.1 {
            assert!(matches!(result, Err(StoreError::Closed)), "{result:?}");
        }
        // The write connection is poisoned: later writes fail at once, and
        // concurrent ones do not wait for a leader that never comes.
        thread::scope(|scope| {
            for t in 0..4 {
                let (store, r) = (&store, &r);
                scope.spawn(move || {
                    let result = store.commit(r, nodes_batch(2, t..t + 1));
                    assert!(matches!(result, Err(StoreError::Closed)), "{result:?}");
                });
            }
        });
        // Reads go on, and see only what was acknowledged.
        assert_eq!(store.node_count(&r).unwrap(), 3);
        assert_eq!(store.get_meta("first").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get_meta("second").unwrap(), None);
        drop(store);
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(store.load_nodes(&r).unwrap(), nodes_batch(1, 0..3).nodes);
        store.put_meta("second", b"2").unwrap();
    }

    #[test]
    fn large_batches_dedup_across_insert_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let r = room("chunks");
        store.commit(&r, nodes_batch(1, 0..30)).unwrap();
        // Long enough for every chunk size, with duplicates of stored
        // nodes, of nodes earlier in the batch (near and far: pending or
        // already inserted), and an id sharing the prefix of the node just
        // before it.
        let fresh = nodes_batch(1, 30..200).nodes;
        let mut clash = fresh[70].clone();
        clash.id.0[31] ^= 0xff;
        let mut batch = Vec::new();
        let mut expected = nodes_batch(1, 0..30).nodes;
        for (i, node) in fresh.iter().enumerate() {
            batch.push(node.clone());
            expected.push(node.clone());
            if i % 37 == 5 {
                batch.push(test_node(1, (i % 30) as u64));
            }
            if i % 23 == 7 {
                batch.push(fresh[i / 2].clone());
                batch.push(node.clone());
            }
            if i == 70 {
                batch.push(clash.clone());
                expected.push(clash.clone());
            }
            if i == 150 {
                batch.push(clash.clone());
            }
        }
        let nodes_batch = |nodes: &[StoredNode]| Batch {
            nodes: nodes.to_vec(),
            ..Batch::default()
        };
        store.commit(&r, nodes_batch(&batch)).unwrap();
        assert_eq!(store.load_nodes(&r).unwrap(), expected);
        assert_eq!(store.node_count(&r).unwrap(), 201);
        // Again, and after a reopen (dedup from a fresh scan): no change.
        store.commit(&r, nodes_batch(&batch)).unwrap();
        drop(store);
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.commit(&r, nodes_batch(&expected)).unwrap();
        assert_eq!(store.load_nodes(&r).unwrap(), expected);
    }

    #[test]
    fn dropping_the_store_closes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.commit(&room("r"), nodes_batch(1, 0..3)).unwrap();
        assert_eq!(store.node_count(&room("r")).unwrap(), 3);
        drop(store);
        // Every connection closed: the last one checkpointed and removed the
        // log, and the file is no longer locked.
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        assert!(!Path::new(&wal).exists(), "the WAL outlived the store");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;").unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM nodes_v1", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 3);
    }
}
