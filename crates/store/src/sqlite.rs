//! [`SqliteStore`]: the embedded default backend, on SQLite in WAL mode.
//!
//! **Group commit, leader and followers** (LevelDB's writer queue). There
//! is one write connection and no writer thread: [`Store::commit`] and
//! [`Store::put_meta`] queue their write, and a caller that finds no
//! leader becomes the leader and writes on its own thread. It takes every
//! write queued at that moment (its own first; up to `MAX_GROUP_WRITES`
//! writes or `MAX_GROUP_BYTES` of segments) into one transaction, so one
//! fsync acknowledges them all, and tells each of those callers (its
//! followers) their outcome. Writes that queued meanwhile form the next
//! group, which the oldest of their callers leads. A lone writer commits on
//! its own thread with no thread handoff; concurrent writers share fsyncs.
//!
//! If a group's transaction fails, the leader retries each write of the
//! group alone in its own transaction, so one bad write fails only its own
//! caller. A panic while writing fails the group with
//! [`StoreError::Closed`] and poisons the write connection: every later
//! write fails the same way until the store is reopened (reads go on).
//!
//! **Reads** use a small pool of read-only connections: WAL lets them read
//! the last committed state while the leader writes.
//!
//! **Shared files.** A store opened `shared` lets other processes' shared
//! stores open the file at once (a replica used by an app and the command
//! line). SQLite serializes their transactions; every batch reads the
//! room's node count inside its transaction, and one carrying
//! `expect_nodes` is refused unless the history is that long, so a writer
//! whose view is stale fails rather than write past nodes it never saw.
//! `foreign_version` (`PRAGMA data_version` on a connection of its own)
//! tells a process that another committed; `load_tail` reads what.
//!
//! **Segments merged in the background.** Each write appends its nodes as
//! one segment; a merger thread merges runs of segments of one size class
//! into one (LSM-style: a node is re-encoded about once per eightfold
//! growth of its segment, up to [`MAX_SEGMENT_NODES`]), computing merged
//! segments outside the write lock and swapping them in through the write
//! queue only if the segments they replace are still there. Merged
//! segments are compressed harder, and freed pages go back to the file
//! system (incremental vacuum).
//!
//! **Schema.** `PRAGMA user_version` is the schema version; `MIGRATIONS`
//! are applied in order, in one transaction, at open. Tables carry the
//! version that introduced their layout, so a later migration that changes
//! a layout creates new tables and moves the data, and an older replica's
//! file opens in a newer build. A file from a newer build is refused.
//!
//! - `rooms_v1(key, name, node_count)`: a small integer key per room name.
//! - `segments_v2(id, room, start, count, pack, checksum)`: the history,
//!   one row per segment, unique `(room, start)`; `checksum` is BLAKE3 of
//!   `pack`, checked on every read.
//! - `signatures_v2(room, node, sig)`: signatures learned for nodes already
//!   stored, until a merge folds them into a segment.
//! - `outbox_v2(room, seq)`, `checkpoints_v2(room, nodes, bytes)`,
//!   `meta_v1(key, value)`.
//!
//! Schema 1 kept one canonical row per node (`nodes_v1`) and the outbox by
//! node id; migration 2 moves those rows into segments (format-1 nodes
//! verbatim) and the outbox into seqs, then vacuums the file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::fs::{File, TryLockError};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior, params};
use syncline_core::node::{Node, NodeFormat};
use syncline_core::pack::{self, ParentRef, RawNode};
use syncline_core::{AuthorId, NodeId, RoomId, Signature};

use crate::memory::{appended, check_expected};
use crate::merge::merge_segments;
use crate::{
    Batch, MAX_SEGMENT_CONTENT, MAX_SEGMENT_NODES, RoomBytes, Segment, Store, StoreError,
    StoredRoom, StoredTail,
};

/// A data move written in Rust, run after its migration's SQL.
type DataMove = fn(&Transaction<'_>) -> Result<(), StoreError>;

/// A step of the schema: SQL, or SQL and a data move.
struct Migration {
    sql: &'static str,
    data: Option<DataMove>,
}

/// Schema migrations: entry `i` takes a database from version `i` to
/// `i + 1`. Append only; never edit a shipped entry.
const MIGRATIONS: &[Migration] = &[
    Migration {
        sql: MIGRATION_1,
        data: None,
    },
    Migration {
        sql: MIGRATION_2,
        data: Some(migrate_nodes_to_segments),
    },
];

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

/// Schema 2's tables; `migrate_nodes_to_segments` then moves schema 1's
/// rows in and drops its tables.
const MIGRATION_2: &str = "
CREATE TABLE segments_v2 (
    id INTEGER PRIMARY KEY,
    room INTEGER NOT NULL,
    start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    pack BLOB NOT NULL,
    checksum BLOB NOT NULL
);
CREATE UNIQUE INDEX segments_v2_at ON segments_v2 (room, start);
CREATE TABLE signatures_v2 (
    room INTEGER NOT NULL,
    node INTEGER NOT NULL,
    sig BLOB NOT NULL,
    PRIMARY KEY (room, node)
) WITHOUT ROWID;
CREATE TABLE outbox_v2 (
    room INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
CREATE TABLE checkpoints_v2 (
    room INTEGER PRIMARY KEY,
    nodes INTEGER NOT NULL,
    bytes BLOB NOT NULL
);
";

/// `PRAGMA application_id` of a Syncline store ("SYNC"), so that another
/// application's SQLite file is refused instead of migrated.
const APPLICATION_ID: i32 = 0x5359_4e43;

/// Most rooms: room keys are positive `i64` well below any limit.
const MAX_ROOM_KEY: i64 = 1 << 31;

/// At most this many writes share one transaction: bounds the work (and the
/// latency) of a group.
const MAX_GROUP_WRITES: usize = 1024;

/// A group stops taking writes once it holds this many bytes of segments.
const MAX_GROUP_BYTES: usize = 64 << 20;

/// Idle read connections kept for reuse; more are opened under load.
const MAX_IDLE_READERS: usize = 4;

/// Segments of one size class merged at once (and the growth factor
/// between classes).
const MERGE_FANOUT: usize = 8;

/// Rooms waiting for the merger at most: a write that finds the queue full
/// does not queue its room (the room's next write will).
const MERGE_QUEUE: usize = 256;

/// Merges stop short of a pack this large (about a MiB of content).
const MAX_MERGED_BYTES: u64 = 256 << 10;

/// zstd level of merged segments of small content (written in the
/// background, once per size class).
const MERGE_LEVEL: i32 = 15;

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
    /// Merge segments on a background thread (the default). Without it,
    /// segments merge only when [`SqliteStore::settle`] is called.
    pub merge_in_background: bool,
    /// Let other processes open the file at once (a replica shared by an
    /// app and the command line). Its writers must then keep to one
    /// writer per room at a time and catch up with the others before
    /// appending ([`Store::load_tail`]); the client SDK does. Without it
    /// (the default: a relay) the store is the file's only user, and an
    /// open of a file another store holds fails.
    pub shared: bool,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            synchronous_full: true,
            busy_timeout: Duration::from_secs(5),
            merge_in_background: true,
            shared: false,
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
    /// Merges of segments done.
    pub merges: u64,
}

/// The SQLite [`Store`]. Dropping it stops the merger and closes its
/// connections, which checkpoints the log into the file.
pub struct SqliteStore {
    inner: Arc<Inner>,
    merger: Option<(SyncSender<RoomId>, JoinHandle<()>)>,
}

/// What the store's callers and its merger thread share.
struct Inner {
    path: PathBuf,
    busy_timeout: Duration,
    /// Writes waiting for a leader, and who leads.
    queue: Mutex<Queue>,
    readers: Mutex<Vec<Connection>>,
    /// The write connection, used only by the current leader (the mutex
    /// makes that visible to the compiler and records a panic while
    /// writing). Dropped after `readers`, so its connection is the last to
    /// close.
    writer: Mutex<Writer>,
    stats: Arc<Counters>,
    /// Set when the store is dropped: the merger stops between merges
    /// rather than finish its queue (merging resumes with the next writes).
    stopping: AtomicBool,
    /// The connection [`Store::foreign_version`] asks (its `data_version`
    /// counts commits by every other connection), opened on first use.
    watcher: Mutex<Option<Connection>>,
    /// Held (locked: exclusively, or shared by shared stores) for the
    /// store's life; declared last so it is released after every
    /// connection has closed.
    _lock: File,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    batches: AtomicU64,
    merges: AtomicU64,
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
/// condition variable, so that a leader wakes exactly its group.
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
    // in or out), so both sides go on past poison.

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

/// Segments replaced by a merge: what must still be stored for the swap.
#[derive(Clone, Debug)]
struct Replaced {
    start: u32,
    count: u32,
    checksum: [u8; 32],
}

enum Write {
    Commit {
        room: RoomId,
        batch: Batch,
    },
    Meta {
        key: String,
        value: Vec<u8>,
    },
    /// Swaps `replaced` for `merged` (and drops the signatures folded into
    /// it) if `replaced` are still stored as they were.
    Merge {
        room: i64,
        replaced: Vec<Replaced>,
        merged: Segment,
        folded: Vec<u32>,
    },
}

impl Write {
    fn bytes(&self) -> usize {
        match self {
            Write::Commit { batch, .. } => batch.segments.iter().map(|s| s.pack.len()).sum(),
            Write::Meta { value, .. } => value.len(),
            Write::Merge { merged, .. } => merged.pack.len(),
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
        let lock = lock_file(path, options.shared)?;
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(options.busy_timeout).map_err(sql)?;
        // Before anything writes: a foreign or newer file is left untouched.
        let version = check_version(&conn, MIGRATIONS.len())?;
        if version == 0 {
            // Pages freed by merges go back to the file system; this must
            // be set before the first table exists.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(sql)?;
        }
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
        if migrate(&mut conn, MIGRATIONS)? {
            // Schema 1's rows moved: give their pages back, and make the
            // file vacuum incrementally from now on.
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(sql)?;
            conn.execute_batch("VACUUM").map_err(sql)?;
        }

        let stats = Arc::new(Counters::default());
        let writer = Writer {
            conn,
            rooms: HashMap::new(),
            stats: Arc::clone(&stats),
            #[cfg(test)]
            panic_on: None,
        };
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            busy_timeout: options.busy_timeout,
            queue: Mutex::new(Queue::default()),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(writer),
            stats,
            stopping: AtomicBool::new(false),
            watcher: Mutex::new(None),
            _lock: lock,
        });
        let merger = options
            .merge_in_background
            .then(|| spawn_merger(Arc::clone(&inner)))
            .transpose()?;
        Ok(SqliteStore { inner, merger })
    }

    /// Write counters since the store was opened.
    pub fn stats(&self) -> SqliteStats {
        let s = &self.inner.stats;
        SqliteStats {
            transactions: s.transactions.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            merges: s.merges.load(Ordering::Relaxed),
        }
    }

    /// Merges every room's segments as far as the merge policy goes, gives
    /// freed pages back and checkpoints the log into the file: the state a
    /// store reaches when left alone, reached now (for measurements and
    /// tests).
    pub fn settle(&self) -> Result<(), StoreError> {
        let keys: Vec<i64> = self.inner.read(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT key FROM rooms_v1 ORDER BY key")
                .map_err(sql)?;
            let rows = stmt.query_map([], |row| row.get(0)).map_err(sql)?;
            rows.collect::<Result<Vec<i64>, _>>().map_err(sql)
        })?;
        for key in keys {
            self.inner.merge_room(key)?;
        }
        let writer = self.inner.writer.lock().map_err(|_| StoreError::Closed)?;
        writer
            .conn
            .execute_batch("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(sql)
    }

    /// Bytes the store's files take on disk (database and log).
    pub fn file_bytes(&self) -> u64 {
        let mut wal = self.inner.path.as_os_str().to_owned();
        wal.push("-wal");
        [self.inner.path.as_os_str().to_owned(), wal]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

impl Inner {
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
    /// the caller's own write, at the front; returns its outcome.
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
    /// order. A panic fails only this group, as [`StoreError::Closed`], and
    /// poisons the writer mutex: every later group fails the same way.
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

    /// Merges room `key`'s segments while the policy finds a run to merge:
    /// [`MERGE_FANOUT`] consecutive segments of one size class (size
    /// classes grow by that factor), at most [`MAX_SEGMENT_NODES`] nodes
    /// in all. Returns how many merges were done.
    fn merge_room(&self, key: i64) -> Result<u64, StoreError> {
        let mut merges = 0;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return Ok(merges);
            }
            let (name, index) = self.read(|conn| {
                let name = room_name(conn, key)?;
                Ok((name, segment_index(conn, key)?))
            })?;
            let Some(name) = name else { return Ok(merges) };
            let Some(run) = merge_run(&index) else {
                return Ok(merges);
            };
            let (first, last) = (index[run.start].start, index[run.end - 1]);
            let end = last.start + last.count;
            let (segments, signatures) = self.read(|conn| {
                Ok((
                    load_segments(conn, key, first, end)?,
                    load_signatures(conn, key, first, end)?,
                ))
            })?;
            // Small histories compress much better at a high level; large
            // content (text) gains little for the time it costs.
            let bytes: usize = segments.iter().map(|s| s.pack.len()).sum();
            let level = if bytes <= 64 << 10 { MERGE_LEVEL } else { 3 };
            let merged = merge_segments(&name, &segments, &signatures, level)
                .map_err(|e| StoreError::Corrupt(format!("room {name}: merging segments: {e}")))?;
            let replaced = segments
                .iter()
                .map(|s| Replaced {
                    start: s.start,
                    count: s.len,
                    checksum: *blake3::hash(&s.pack).as_bytes(),
                })
                .collect();
            self.write(Write::Merge {
                room: key,
                replaced,
                merged,
                folded: signatures.iter().map(|(n, _)| *n).collect(),
            })?;
            merges += 1;
        }
    }
}

/// The size class of a segment of `count` nodes: 0 for 1 to 7, then one
/// more per eightfold.
fn size_class(count: u32) -> u32 {
    count.max(1).ilog(MERGE_FANOUT as u32)
}

/// One stored segment, as the merge policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Indexed {
    start: u32,
    count: u32,
    /// Bytes of its pack.
    bytes: u64,
}

/// The first run of segments to merge in `index` (in order):
/// [`MERGE_FANOUT`] consecutive segments of one size class below the
/// largest, or fewer if they would pass [`MAX_SEGMENT_NODES`] or
/// [`MAX_MERGED_BYTES`] (two at least).
fn merge_run(index: &[Indexed]) -> Option<std::ops::Range<usize>> {
    let top = size_class(MAX_SEGMENT_NODES);
    let mut i = 0;
    while i < index.len() {
        let class = size_class(index[i].count);
        let (mut j, mut nodes, mut bytes) = (i, 0u32, 0u64);
        let fits = |nodes: u32, bytes: u64, s: &Indexed| {
            nodes + s.count <= MAX_SEGMENT_NODES && bytes + s.bytes <= MAX_MERGED_BYTES
        };
        while j < index.len()
            && size_class(index[j].count) == class
            && j - i < MERGE_FANOUT
            && fits(nodes, bytes, &index[j])
        {
            nodes += index[j].count;
            bytes += index[j].bytes;
            j += 1;
        }
        let full = j - i == MERGE_FANOUT || (j < index.len() && !fits(nodes, bytes, &index[j]));
        if class < top && full && j - i >= 2 {
            return Some(i..j);
        }
        i = j.max(i + 1);
    }
    None
}

/// Spawns the thread that merges rooms' segments after writes to them.
fn spawn_merger(inner: Arc<Inner>) -> Result<(SyncSender<RoomId>, JoinHandle<()>), StoreError> {
    let (tx, rx): (SyncSender<RoomId>, Receiver<RoomId>) = mpsc::sync_channel(MERGE_QUEUE);
    let handle = std::thread::Builder::new()
        .name("syncline-store merger".into())
        .spawn(move || {
            while let Ok(room) = rx.recv() {
                // Several writes to a room need one pass.
                let mut rooms: HashSet<RoomId> = std::iter::once(room).collect();
                rooms.extend(rx.try_iter());
                for room in rooms {
                    let merged = inner
                        .read(|conn| room_key(conn, &room))
                        .and_then(|key| key.map_or(Ok(0), |key| inner.merge_room(key)));
                    match merged {
                        Ok(0) => {}
                        Ok(_) => {
                            if let Ok(writer) = inner.writer.lock() {
                                let _ = writer.conn.execute_batch("PRAGMA incremental_vacuum");
                            }
                        }
                        // A store that fails to merge still works: the
                        // segments stay as they are, and the writes that
                        // fail tell their callers.
                        Err(_) => {}
                    }
                }
            }
        })
        .map_err(|e| StoreError::Io(format!("spawning the merger thread: {e}")))?;
    Ok((tx, handle))
}

/// Takes the lock that makes this store the file's only user (`shared`:
/// one of several shared stores, and never beside an exclusive one). A
/// separate file, because SQLite's own locks live on the database file
/// and, on some platforms, would collide with a whole-file lock.
fn lock_file(path: &Path, shared: bool) -> Result<File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push("-lock");
    let lock_path = PathBuf::from(lock_path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Io(format!("{}: {e}", lock_path.display())))?;
    let locked = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Io(format!(
            "{} is already open in another SqliteStore{}",
            path.display(),
            if shared { " (not shared)" } else { "" }
        ))),
        Err(TryLockError::Error(e)) => Err(StoreError::Io(format!("{}: {e}", lock_path.display()))),
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The merger first (stopping it, and closing its channel ends its
        // loop), so that the connections close with the last handle on
        // them.
        if let Some((tx, handle)) = self.merger.take() {
            self.inner.stopping.store(true, Ordering::Relaxed);
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Readers close first so that the write connection, dropped next
        // with its field, is the last one: closing it checkpoints the log
        // into the file and removes it.
        self.readers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.watcher
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
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
    let mut bytes = 0;
    while group.len() < MAX_GROUP_WRITES && bytes < MAX_GROUP_BYTES {
        let Some(ticket) = waiting.pop_front() else {
            break;
        };
        bytes += ticket.write.bytes();
        group.push(ticket);
    }
    group
}

impl Store for SqliteStore {
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        let appends = !batch.segments.is_empty();
        self.inner.write(Write::Commit {
            room: room.clone(),
            batch,
        })?;
        if appends && let Some((merger, _)) = &self.merger {
            // The merger looks at the room when it can. A full queue (the
            // room's next write queues it again) or a stopped merger only
            // delays merging.
            let _ = merger.try_send(room.clone());
        }
        Ok(())
    }

    fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        self.inner.read(|conn| {
            let Some(key) = room_key(conn, room)? else {
                return Ok(StoredRoom::default());
            };
            // One snapshot for every table of the room.
            conn.execute_batch("BEGIN").map_err(sql)?;
            let loaded = (|| {
                let segments = load_segments(conn, key, 0, u32::MAX)?;
                let signatures = load_signatures(conn, key, 0, u32::MAX)?;
                let checkpoint = conn
                    .prepare_cached("SELECT bytes FROM checkpoints_v2 WHERE room = ?1")
                    .and_then(|mut stmt| {
                        let mut rows = stmt.query([key])?;
                        rows.next()?.map(|row| row.get::<_, Vec<u8>>(0)).transpose()
                    })
                    .map_err(sql)?;
                let outbox = load_outbox(conn, key)?;
                Ok(StoredRoom {
                    segments,
                    signatures,
                    checkpoint,
                    outbox,
                })
            })();
            conn.execute_batch("COMMIT").map_err(sql)?;
            loaded
        })
    }

    fn load_tail(&self, room: &RoomId, from: u64) -> Result<StoredTail, StoreError> {
        let from = u32::try_from(from)
            .map_err(|_| StoreError::Invalid(format!("no history reaches node {from}")))?;
        self.inner.read(|conn| {
            let Some(key) = room_key(conn, room)? else {
                return Ok(StoredTail::default());
            };
            conn.execute_batch("BEGIN").map_err(sql)?;
            let loaded = (|| {
                let mut tail = StoredTail::default();
                if node_count(conn, key)? > u64::from(from) {
                    // The segment holding node `from` may start before it.
                    let first: u32 = conn
                        .prepare_cached(
                            "SELECT coalesce(max(start), 0) FROM segments_v2 \
                             WHERE room = ?1 AND start <= ?2",
                        )
                        .and_then(|mut stmt| stmt.query_row(params![key, from], |r| r.get(0)))
                        .map_err(sql)?;
                    tail.segments = load_segments(conn, key, first, u32::MAX)?;
                    tail.signatures = load_signatures(conn, key, from, u32::MAX)?;
                }
                tail.checkpointed = conn
                    .prepare_cached("SELECT nodes FROM checkpoints_v2 WHERE room = ?1")
                    .and_then(|mut stmt| {
                        let mut rows = stmt.query([key])?;
                        rows.next()?.map(|row| row.get::<_, i64>(0)).transpose()
                    })
                    .map_err(sql)?
                    .map_or(0, |n| n.max(0) as u64);
                tail.outbox = load_outbox(conn, key)?;
                Ok(tail)
            })();
            conn.execute_batch("COMMIT").map_err(sql)?;
            loaded
        })
    }

    fn foreign_version(&self) -> Result<u64, StoreError> {
        let mut watcher = self.inner.watcher.lock().map_err(|_| StoreError::Closed)?;
        if watcher.is_none() {
            *watcher = Some(self.inner.open_reader()?);
        }
        let conn = watcher.as_ref().expect("opened above");
        let version: i64 = conn
            .query_row("PRAGMA data_version", [], |row| row.get(0))
            .map_err(sql)?;
        Ok(version as u64)
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        self.inner.read(|conn| {
            let Some(key) = room_key(conn, room)? else {
                return Ok(0);
            };
            node_count(conn, key)
        })
    }

    fn room_bytes(&self, room: &RoomId) -> Result<RoomBytes, StoreError> {
        self.inner.read(|conn| {
            let Some(key) = room_key(conn, room)? else {
                return Ok(RoomBytes::default());
            };
            let (segments, history): (i64, i64) = conn
                .query_row(
                    "SELECT count(*), coalesce(sum(length(pack)), 0) FROM segments_v2 WHERE room = ?1",
                    [key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(sql)?;
            let signatures: i64 = conn
                .query_row(
                    "SELECT coalesce(sum(length(sig)), 0) FROM signatures_v2 WHERE room = ?1",
                    [key],
                    |row| row.get(0),
                )
                .map_err(sql)?;
            let checkpoint: i64 = conn
                .query_row(
                    "SELECT coalesce(sum(length(bytes)), 0) FROM checkpoints_v2 WHERE room = ?1",
                    [key],
                    |row| row.get(0),
                )
                .map_err(sql)?;
            Ok(RoomBytes {
                history: (history + signatures) as u64,
                checkpoint: checkpoint as u64,
                segments: segments as u64,
            })
        })
    }

    fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        self.inner.read(|conn| {
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
        self.inner.read(|conn| {
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
        self.inner.write(Write::Meta {
            key: key.to_owned(),
            value: value.to_vec(),
        })
    }
}

fn room_key(conn: &Connection, room: &RoomId) -> Result<Option<i64>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT key FROM rooms_v1 WHERE name = ?1")
        .map_err(sql)?;
    let mut rows = stmt.query([room.as_str()]).map_err(sql)?;
    let Some(row) = rows.next().map_err(sql)? else {
        return Ok(None);
    };
    let key: i64 = row.get(0).map_err(sql)?;
    if !(1..=MAX_ROOM_KEY).contains(&key) {
        return Err(StoreError::Corrupt(format!("room {room} has key {key}")));
    }
    Ok(Some(key))
}

fn room_name(conn: &Connection, key: i64) -> Result<Option<RoomId>, StoreError> {
    let name: Option<String> = conn
        .prepare_cached("SELECT name FROM rooms_v1 WHERE key = ?1")
        .and_then(|mut stmt| {
            let mut rows = stmt.query([key])?;
            rows.next()?.map(|row| row.get(0)).transpose()
        })
        .map_err(sql)?;
    name.map(|n| {
        RoomId::new(&n)
            .map_err(|e| StoreError::Corrupt(format!("stored room name {n:?} is invalid: {e}")))
    })
    .transpose()
}

fn node_count(conn: &Connection, key: i64) -> Result<u64, StoreError> {
    let count: i64 = conn
        .prepare_cached("SELECT node_count FROM rooms_v1 WHERE key = ?1")
        .and_then(|mut stmt| stmt.query_row([key], |row| row.get(0)))
        .map_err(sql)?;
    u64::try_from(count).map_err(|_| StoreError::Corrupt(format!("room key {key} counts {count}")))
}

/// Every segment of room `key`, in order.
fn segment_index(conn: &Connection, key: i64) -> Result<Vec<Indexed>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT start, count, length(pack) FROM segments_v2 WHERE room = ?1 ORDER BY start",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map([key], |row| {
            Ok(Indexed {
                start: row.get(0)?,
                count: row.get(1)?,
                bytes: row.get(2)?,
            })
        })
        .map_err(sql)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql)
}

/// The segments of room `key` starting in `first..end`, each checked
/// against its checksum and its place in the history.
fn load_segments(
    conn: &Connection,
    key: i64,
    first: u32,
    end: u32,
) -> Result<Vec<Segment>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT start, count, pack, checksum FROM segments_v2 \
             WHERE room = ?1 AND start >= ?2 AND start < ?3 ORDER BY start",
        )
        .map_err(sql)?;
    let mut rows = stmt.query(params![key, first, end]).map_err(sql)?;
    let mut out: Vec<Segment> = Vec::new();
    while let Some(row) = rows.next().map_err(sql)? {
        let start: u32 = row.get(0).map_err(sql)?;
        let count: u32 = row.get(1).map_err(sql)?;
        let pack: Vec<u8> = row.get(2).map_err(sql)?;
        let checksum: Vec<u8> = row.get(3).map_err(sql)?;
        if blake3::hash(&pack).as_bytes()[..] != checksum[..] {
            return Err(StoreError::Corrupt(format!(
                "room key {key}: segment at node {start} does not match its checksum"
            )));
        }
        let expected = out.last().map_or(first, |s| s.start + s.len);
        if start != expected || count == 0 {
            return Err(StoreError::Corrupt(format!(
                "room key {key}: segment at node {start}, node {expected} expected"
            )));
        }
        out.push(Segment {
            start,
            len: count,
            pack: pack.into_boxed_slice(),
        });
    }
    Ok(out)
}

/// Room `key`'s outbox, ascending.
fn load_outbox(conn: &Connection, key: i64) -> Result<Vec<u64>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq FROM outbox_v2 WHERE room = ?1 ORDER BY seq")
        .map_err(sql)?;
    stmt.query_map([key], |row| row.get::<_, i64>(0))
        .map_err(sql)?
        .map(|seq| seq.map_err(sql).map(|s| s as u64))
        .collect()
}

fn load_signatures(
    conn: &Connection,
    key: i64,
    first: u32,
    end: u32,
) -> Result<Vec<(u32, Signature)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT node, sig FROM signatures_v2 \
             WHERE room = ?1 AND node >= ?2 AND node < ?3 ORDER BY node",
        )
        .map_err(sql)?;
    let mut rows = stmt.query(params![key, first, end]).map_err(sql)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql)? {
        let node: u32 = row.get(0).map_err(sql)?;
        let sig: Vec<u8> = row.get(1).map_err(sql)?;
        let sig = <[u8; 64]>::try_from(sig.as_slice())
            .map_err(|_| StoreError::Corrupt(format!("signature of {} bytes", sig.len())))?;
        out.push((node, Signature(sig)));
    }
    Ok(out)
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
/// migrations in order in one transaction (all or none). Returns whether a
/// migration moved data (the file is then worth vacuuming).
fn migrate(conn: &mut Connection, migrations: &[Migration]) -> Result<bool, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    // Checked again inside the transaction: the version must not change
    // between the check and the migrations.
    let version = check_version(&tx, migrations.len())?;
    if version == migrations.len() {
        return Ok(false);
    }
    let mut moved = false;
    for migration in &migrations[version..] {
        tx.execute_batch(migration.sql).map_err(sql)?;
        if let Some(data) = migration.data {
            // On a fresh file the step finds nothing to move, but still
            // retires the old tables.
            data(&tx)?;
            moved |= version > 0;
        }
    }
    tx.pragma_update(None, "user_version", migrations.len())
        .map_err(sql)?;
    tx.pragma_update(None, "application_id", APPLICATION_ID)
        .map_err(sql)?;
    tx.commit().map_err(sql)?;
    Ok(moved)
}

/// Migration 2's data move: each room's `nodes_v1` rows (canonical bytes,
/// in order) become segments of at most [`MAX_SEGMENT_NODES`] nodes (and
/// about [`MAX_SEGMENT_CONTENT`] bytes), their
/// signatures going with them; the outbox's node ids become seqs.
fn migrate_nodes_to_segments(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let rooms: Vec<(i64, String)> = {
        let mut stmt = tx.prepare("SELECT key, name FROM rooms_v1").map_err(sql)?;
        let rows = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    for (key, name) in rooms {
        let room = RoomId::new(&name)
            .map_err(|e| StoreError::Corrupt(format!("stored room name {name:?}: {e}")))?;
        let corrupt = |what: String| StoreError::Corrupt(format!("room {name}: {what}"));
        let mut stmt = tx
            .prepare(
                "SELECT id, bytes, sig FROM nodes_v1 WHERE pos >= ?1 AND pos < ?2 ORDER BY pos",
            )
            .map_err(sql)?;
        let mut rows = stmt
            .query(params![key << 32, (key + 1) << 32])
            .map_err(sql)?;
        // Every node's place and key, for parents and the outbox.
        let mut placed: HashMap<NodeId, (u32, AuthorId, u64)> = HashMap::new();
        let mut segment: Vec<RawNode> = Vec::new();
        let mut sigs: Vec<(usize, Signature)> = Vec::new();
        let mut start = 0u32;
        // Canonical bytes of the nodes in `segment`.
        let mut content = 0usize;
        let flush = |segment: &mut Vec<RawNode>,
                     sigs: &mut Vec<(usize, Signature)>,
                     start: &mut u32|
         -> Result<(), StoreError> {
            if segment.is_empty() {
                return Ok(());
            }
            let pack = pack::encode(&room, segment, sigs, MERGE_LEVEL);
            insert_segment(tx, key, *start, segment.len() as u32, &pack)?;
            *start += segment.len() as u32;
            segment.clear();
            sigs.clear();
            Ok(())
        };
        while let Some(row) = rows.next().map_err(sql)? {
            let id: Vec<u8> = row.get(0).map_err(sql)?;
            let bytes: Vec<u8> = row.get(1).map_err(sql)?;
            let sig: Option<Vec<u8>> = row.get(2).map_err(sql)?;
            let node = Node::decode(&bytes).map_err(|e| corrupt(format!("a node: {e}")))?;
            let id = <[u8; 32]>::try_from(id.as_slice())
                .map(NodeId)
                .map_err(|_| corrupt("a node id".into()))?;
            if Node::id_of(&bytes) != id {
                return Err(corrupt(format!("node {id:?} does not hash to its id")));
            }
            let idx = start + segment.len() as u32;
            let parent_refs = match node.format {
                NodeFormat::V1 => Vec::new(),
                NodeFormat::V2 => node
                    .parents
                    .iter()
                    .map(|p| {
                        let &(at, author, seq) = placed.get(p).ok_or_else(|| {
                            corrupt(format!("node {id:?} stored before a parent"))
                        })?;
                        Ok(if at >= start {
                            ParentRef::InPack((at - start) as usize)
                        } else {
                            ParentRef::Held(author, seq)
                        })
                    })
                    .collect::<Result<_, StoreError>>()?,
            };
            placed.insert(id, (idx, node.author, node.seq));
            if let Some(sig) = sig {
                let sig = <[u8; 64]>::try_from(sig.as_slice())
                    .map_err(|_| corrupt("a signature".into()))?;
                sigs.push((segment.len(), Signature(sig)));
            }
            segment.push(RawNode { node, parent_refs });
            content += bytes.len();
            if segment.len() == MAX_SEGMENT_NODES as usize || content >= MAX_SEGMENT_CONTENT {
                content = 0;
                flush(&mut segment, &mut sigs, &mut start)?;
            }
        }
        flush(&mut segment, &mut sigs, &mut start)?;
        drop(rows);
        let mut stmt = tx
            .prepare("SELECT id FROM outbox_v1 WHERE room = ?1 ORDER BY pos")
            .map_err(sql)?;
        let ids = stmt
            .query_map([key], |row| row.get::<_, Vec<u8>>(0))
            .map_err(sql)?;
        for id in ids {
            let id = id.map_err(sql)?;
            let id = <[u8; 32]>::try_from(id.as_slice())
                .map(NodeId)
                .map_err(|_| corrupt("an outbox id".into()))?;
            // An outbox entry for a node never stored holds nothing to send.
            if let Some(&(_, _, seq)) = placed.get(&id) {
                tx.execute(
                    "INSERT OR IGNORE INTO outbox_v2 (room, seq) VALUES (?1, ?2)",
                    params![key, seq as i64],
                )
                .map_err(sql)?;
            }
        }
        tx.execute(
            "UPDATE rooms_v1 SET node_count = ?2 WHERE key = ?1",
            params![key, start],
        )
        .map_err(sql)?;
    }
    tx.execute_batch("DROP TABLE nodes_v1; DROP TABLE outbox_v1;")
        .map_err(sql)
}

fn insert_segment(
    tx: &Connection,
    room: i64,
    start: u32,
    count: u32,
    pack: &[u8],
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO segments_v2 (room, start, count, pack, checksum) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            room,
            start,
            count,
            pack,
            &blake3::hash(pack).as_bytes()[..]
        ])
    })
    .map_err(sql)?;
    Ok(())
}

/// The write connection and what it caches, used by the current leader.
struct Writer {
    conn: Connection,
    /// Room name -> key, as committed (rooms are never deleted).
    rooms: HashMap<RoomId, i64>,
    stats: Arc<Counters>,
    /// Tests only: writing metadata under this key panics mid-transaction.
    #[cfg(test)]
    panic_on: Option<String>,
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
                let (merges, batches): (Vec<&Ticket>, Vec<&Ticket>) = group
                    .iter()
                    .partition(|t| matches!(t.write, Write::Merge { .. }));
                self.stats
                    .batches
                    .fetch_add(batches.len() as u64, Ordering::Relaxed);
                self.stats
                    .merges
                    .fetch_add(merges.len() as u64, Ordering::Relaxed);
            }
            // The rolled-back transaction may have created rooms or counted
            // nodes that the cache now holds.
            Err(_) => self.rooms.clear(),
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
                Write::Commit { room, batch } => {
                    apply_batch(&tx, &mut self.rooms, room, batch)?;
                }
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
                Write::Merge {
                    room,
                    replaced,
                    merged,
                    folded,
                } => apply_merge(&tx, *room, replaced, merged, folded)?,
            }
        }
        tx.commit().map_err(sql)
    }
}

/// Applies one batch inside the group's transaction, in the order every
/// backend uses: segment, signatures, outbox additions and removals,
/// checkpoint.
fn apply_batch(
    tx: &Connection,
    rooms: &mut HashMap<RoomId, i64>,
    room: &RoomId,
    batch: &Batch,
) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let key = match rooms.get(room) {
        Some(&key) => key,
        None => {
            let key = match room_key(tx, room)? {
                Some(key) => key,
                None => create_room(tx, room)?,
            };
            rooms.insert(room.clone(), key);
            key
        }
    };
    // Read in the transaction, not cached: another process sharing the
    // file may have appended since this one last wrote.
    let stored = node_count(tx, key)?;
    check_expected(stored, batch.expect_nodes)?;
    let mut count = stored;
    let append = appended(stored, &batch.segments)?;
    for segment in &append {
        insert_segment(tx, key, segment.start, segment.len, &segment.pack)?;
        count += u64::from(segment.len);
    }
    if !append.is_empty() {
        tx.prepare_cached("UPDATE rooms_v1 SET node_count = ?2 WHERE key = ?1")
            .and_then(|mut stmt| stmt.execute(params![key, count as i64]))
            .map_err(sql)?;
    }
    if !batch.signatures.is_empty() {
        let mut sign = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO signatures_v2 (room, node, sig) VALUES (?1, ?2, ?3)",
            )
            .map_err(sql)?;
        for (node, sig) in &batch.signatures {
            if u64::from(*node) < count {
                sign.execute(params![key, node, &sig.0[..]]).map_err(sql)?;
            }
        }
    }
    if !batch.outbox_add.is_empty() {
        let mut add = tx
            .prepare_cached("INSERT OR IGNORE INTO outbox_v2 (room, seq) VALUES (?1, ?2)")
            .map_err(sql)?;
        for seq in &batch.outbox_add {
            add.execute(params![key, *seq as i64]).map_err(sql)?;
        }
    }
    if !batch.outbox_remove.is_empty() {
        let mut remove = tx
            .prepare_cached("DELETE FROM outbox_v2 WHERE room = ?1 AND seq = ?2")
            .map_err(sql)?;
        for seq in &batch.outbox_remove {
            remove.execute(params![key, *seq as i64]).map_err(sql)?;
        }
    }
    if let Some(checkpoint) = &batch.checkpoint {
        let nodes = syncline_core::checkpoint::header(checkpoint).map_or(0, |h| h.nodes as i64);
        tx.prepare_cached(
            "INSERT INTO checkpoints_v2 (room, nodes, bytes) VALUES (?1, ?2, ?3) \
             ON CONFLICT (room) DO UPDATE SET nodes = excluded.nodes, bytes = excluded.bytes",
        )
        .and_then(|mut stmt| stmt.execute(params![key, nodes, checkpoint]))
        .map_err(sql)?;
    }
    Ok(())
}

/// Swaps merged segments in if the ones they replace are still stored as
/// they were (a merge computed from an older state does nothing).
fn apply_merge(
    tx: &Connection,
    room: i64,
    replaced: &[Replaced],
    merged: &Segment,
    folded: &[u32],
) -> Result<(), StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT count, checksum FROM segments_v2 WHERE room = ?1 AND start = ?2")
        .map_err(sql)?;
    for r in replaced {
        let stored: Option<(u32, Vec<u8>)> = stmt
            .query([room, i64::from(r.start)])
            .and_then(|mut rows| {
                rows.next()?
                    .map(|row| Ok((row.get(0)?, row.get(1)?)))
                    .transpose()
            })
            .map_err(sql)?;
        if stored.is_none_or(|(count, checksum)| count != r.count || checksum != r.checksum) {
            return Ok(());
        }
    }
    let mut delete = tx
        .prepare_cached("DELETE FROM segments_v2 WHERE room = ?1 AND start = ?2")
        .map_err(sql)?;
    for r in replaced {
        delete.execute(params![room, r.start]).map_err(sql)?;
    }
    insert_segment(tx, room, merged.start, merged.len, &merged.pack)?;
    let mut unfold = tx
        .prepare_cached("DELETE FROM signatures_v2 WHERE room = ?1 AND node = ?2")
        .map_err(sql)?;
    for node in folded {
        unfold.execute(params![room, node]).map_err(sql)?;
    }
    Ok(())
}

fn create_room(tx: &Connection, room: &RoomId) -> Result<i64, StoreError> {
    tx.prepare_cached("INSERT INTO rooms_v1 (name, node_count) VALUES (?1, 0)")
        .and_then(|mut stmt| stmt.execute([room.as_str()]))
        .map_err(sql)?;
    let key = tx.last_insert_rowid();
    if key > MAX_ROOM_KEY {
        return Err(StoreError::Io(format!(
            "cannot create room {room}: the store holds the most rooms it supports"
        )));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::thread;

    use syncline_core::{Keypair, Room, Value};

    use super::*;
    use crate::conformance::{held, test_nodes, test_segment, test_signature};

    fn room(name: &str) -> RoomId {
        RoomId::new(name).unwrap()
    }

    fn open(path: &Path) -> SqliteStore {
        SqliteStore::open(path, SqliteOptions::default()).unwrap()
    }

    /// Appends `count` nodes of `tag` to `room` as one segment.
    fn append(store: &SqliteStore, room: &RoomId, tag: u8, count: u32) {
        let start = store.node_count(room).unwrap() as u32;
        store
            .commit(
                room,
                Batch {
                    segments: vec![test_segment(room, tag, start, count)],
                    ..Batch::default()
                },
            )
            .unwrap();
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
    fn a_hand_made_version_1_file_migrates_to_segments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let notes = room("notes");
        let (ka, kb) = (Keypair::from_seed([1; 32]), Keypair::from_seed([2; 32]));
        let mut source = Room::new(notes.clone());
        for i in 0..5u64 {
            let key = if i == 2 { &kb } else { &ka };
            let mut tx = source.begin(key.author(), 100 + i);
            tx.text_insert("/t", 0, "ab").unwrap();
            tx.set("/f", "v", Value::Int(i as i64)).unwrap();
            tx.commit().unwrap();
        }
        let dag = source.dag();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SHIPPED_V1).unwrap();
            conn.execute("INSERT INTO rooms_v1 VALUES (1, 'notes', 5)", [])
                .unwrap();
            for idx in 0..dag.next_idx() {
                let sig = (idx == 3).then(|| ka.sign(&dag.id(idx)).0.to_vec());
                conn.execute(
                    "INSERT INTO nodes_v1 VALUES (?1, ?2, ?3, ?4)",
                    params![
                        (1i64 << 32) + i64::from(idx),
                        &dag.id(idx).0[..],
                        dag.node(idx).encode(),
                        sig
                    ],
                )
                .unwrap();
            }
            for idx in [4, 1] {
                conn.execute(
                    "INSERT INTO outbox_v1 (room, id) VALUES (1, ?1)",
                    [&dag.id(idx).0[..]],
                )
                .unwrap();
            }
            conn.execute("INSERT INTO meta_v1 VALUES ('identity', x'0102')", [])
                .unwrap();
        }

        let store = open(&path);
        let stored = store.load(&notes).unwrap();
        assert_eq!(stored.segments.len(), 1);
        let seen = held(&notes, &stored);
        let expected: Vec<_> = (0..5).map(|i| (*dag.author(i), dag.seq(i))).collect();
        assert_eq!(seen.nodes, expected);
        assert_eq!(seen.signatures.keys().copied().collect::<Vec<_>>(), [3]);
        // The outbox's ids became the seqs of those nodes (by the local
        // author, as every outbox entry is).
        assert_eq!(stored.outbox, vec![dag.seq(1), dag.seq(4)]);
        assert_eq!(store.rooms().unwrap(), vec![notes.clone()]);
        assert_eq!(store.get_meta("identity").unwrap(), Some(vec![1, 2]));
        // The history replays to the same room, ids and all.
        let replayed = Room::from_segments(notes.clone(), stored.segments).unwrap();
        assert_eq!(replayed.state_hash(), source.state_hash());
        assert_eq!(replayed.dag().id_index(), dag.id_index());
        // Schema 1's tables are gone; the room goes on.
        let tables: i64 = store
            .inner
            .read(|conn| {
                conn.query_row(
                    "SELECT count(*) FROM sqlite_schema WHERE name IN ('nodes_v1', 'outbox_v1')",
                    [],
                    |row| row.get(0),
                )
                .map_err(sql)
            })
            .unwrap();
        assert_eq!(tables, 0);
        store
            .commit(
                &notes,
                Batch {
                    segments: vec![source.dag().segment(4..5, 3)],
                    ..Batch::default()
                },
            )
            .unwrap();
        assert_eq!(store.node_count(&notes).unwrap(), 5, "a replay is skipped");
    }

    #[test]
    fn refuses_a_file_from_a_newer_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.db");
        drop(open(&path));
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

    fn log_step(tx: &Transaction<'_>) -> Result<(), StoreError> {
        tx.execute("INSERT INTO log SELECT max(step) + 10 FROM log", [])
            .map_err(sql)?;
        Ok(())
    }

    #[test]
    fn migrations_apply_in_order_from_the_files_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
        let step = |sql, data| Migration { sql, data };
        let steps = [
            step("CREATE TABLE log (step INTEGER);", None),
            step("INSERT INTO log VALUES (2);", Some(log_step as _)),
            step("INSERT INTO log VALUES (3);", None),
        ];
        assert!(!migrate(&mut conn, &steps[..1]).unwrap());
        conn.execute("INSERT INTO log VALUES (1)", []).unwrap();
        // From version 1: data moves, so the file is worth vacuuming.
        assert!(migrate(&mut conn, &steps).unwrap());
        // Already current: nothing runs again.
        assert!(!migrate(&mut conn, &steps).unwrap());
        let log: Vec<i64> = conn
            .prepare("SELECT step FROM log ORDER BY rowid")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(log, [1, 2, 12, 3]);
        let version = |conn: &Connection| -> i64 {
            conn.pragma_query_value(None, "user_version", |row| row.get(0))
                .unwrap()
        };
        assert_eq!(version(&conn), 3);
        // A failing migration leaves the file at its old version.
        let broken = [
            step(steps[0].sql, None),
            step(steps[1].sql, None),
            step(steps[2].sql, None),
            step("INSERT INTO missing VALUES (4);", None),
        ];
        assert!(migrate(&mut conn, &broken).is_err());
        assert_eq!(version(&conn), 3);
    }

    #[test]
    fn one_store_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = open(&path);
        assert!(matches!(
            SqliteStore::open(&path, SqliteOptions::default()),
            Err(StoreError::Io(_))
        ));
        drop(store);
        open(&path);
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
        // No merger: its writes would share the queue checked below.
        let options = SqliteOptions {
            merge_in_background: false,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&dir.path().join("store.db"), options).unwrap();
        thread::scope(|scope| {
            for t in 0..16u8 {
                let store = &store;
                scope.spawn(move || {
                    let own = room(&format!("room-{t}"));
                    for _ in 0..20 {
                        append(store, &own, t, 2);
                    }
                });
            }
        });
        for t in 0..16u8 {
            let own = room(&format!("room-{t}"));
            let stored = store.load(&own).unwrap();
            assert_eq!(
                held(&own, &stored).nodes,
                test_nodes(t, 0, 40),
                "thread {t}"
            );
        }
        let stats = store.stats();
        assert_eq!(stats.batches, 16 * 20);
        assert!(stats.transactions <= stats.batches);
        // Every leader passed leadership on or gave it up: the next writer
        // leads at once.
        let queue = store.inner.queue.lock().unwrap();
        assert!(queue.waiting.is_empty() && !queue.leading);
    }

    #[test]
    fn queued_commits_share_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let options = SqliteOptions {
            merge_in_background: false,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&path, options).unwrap();
        let blocker = block_writer(&path);
        thread::scope(|scope| {
            for t in 0..8u8 {
                let store = &store;
                scope.spawn(move || append(store, &room(&format!("grouped-{t}")), t, 3));
            }
            // Let every commit reach the queue (or the blocked writer).
            thread::sleep(Duration::from_millis(300));
            blocker.execute_batch("COMMIT").unwrap();
        });
        for t in 0..8u8 {
            assert_eq!(store.node_count(&room(&format!("grouped-{t}"))).unwrap(), 3);
        }
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
        let store = open(&path);
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
            let good = scope.spawn(|| {
                store.commit(
                    &r,
                    Batch {
                        segments: vec![test_segment(&r, 1, 0, 5)],
                        ..Batch::default()
                    },
                )
            });
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
        let store = open(&path);
        let r = room("panicky");
        append(&store, &r, 1, 3);
        store.inner.writer.lock().unwrap().panic_on = Some("panic".to_owned());
        let blocker = block_writer(&path);
        let batch = |start, count| Batch {
            segments: vec![test_segment(&r, 1, start, count)],
            ..Batch::default()
        };
        let results = thread::scope(|scope| {
            let store = &store;
            let first = scope.spawn(move || store.put_meta("first", b"1"));
            thread::sleep(Duration::from_millis(100));
            // Queued behind `first`: one group, whose leader panics while
            // writing `panic`.
            let group = [
                scope.spawn(|| store.commit(&r, batch(3, 2))),
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
            for _ in 0..4 {
                let (store, r, batch) = (&store, &r, &batch);
                scope.spawn(move || {
                    let result = store.commit(r, batch(3, 1));
                    assert!(matches!(result, Err(StoreError::Closed)), "{result:?}");
                });
            }
        });
        // Reads go on, and see only what was acknowledged.
        assert_eq!(store.node_count(&r).unwrap(), 3);
        assert_eq!(store.get_meta("first").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get_meta("second").unwrap(), None);
        drop(store);
        let store = open(&path);
        assert_eq!(
            held(&r, &store.load(&r).unwrap()).nodes,
            test_nodes(1, 0, 3)
        );
        store.put_meta("second", b"2").unwrap();
    }

    #[test]
    fn the_merge_policy_merges_runs_of_one_size_class() {
        let seg = |start: u32, count: u32| Indexed {
            start,
            count,
            bytes: u64::from(count) * 10,
        };
        // Seven small segments wait for an eighth.
        let seven: Vec<Indexed> = (0..7).map(|i| seg(i, 1)).collect();
        assert_eq!(merge_run(&seven), None);
        let index: Vec<Indexed> = (0..8).map(|i| seg(i, 1)).collect();
        assert_eq!(merge_run(&index), Some(0..8));
        // A large segment first, then a full run of small ones.
        let mut index = vec![seg(0, 64)];
        index.extend((0..9).map(|i| seg(64 + i, 2)));
        assert_eq!(merge_run(&index), Some(1..9));
        // Eight of the largest class are never merged.
        let top: Vec<Indexed> = (0..8).map(|i| seg(i * 4096, 4096)).collect();
        assert_eq!(merge_run(&top), None);
        // Merging stops short of MAX_SEGMENT_NODES.
        let big: Vec<Indexed> = (0..8).map(|i| seg(i * 3000, 3000)).collect();
        let fit = (MAX_SEGMENT_NODES / 3000) as usize;
        assert!((2..8).contains(&fit));
        assert_eq!(merge_run(&big), Some(0..fit));
        // And short of MAX_MERGED_BYTES: segments of large nodes.
        let heavy: Vec<Indexed> = (0..8)
            .map(|i| Indexed {
                start: i * 4,
                count: 4,
                bytes: MAX_MERGED_BYTES / 3,
            })
            .collect();
        assert_eq!(merge_run(&heavy), Some(0..3));
        let too_heavy: Vec<Indexed> = (0..8)
            .map(|i| Indexed {
                start: i,
                count: 1,
                bytes: MAX_MERGED_BYTES,
            })
            .collect();
        assert_eq!(merge_run(&too_heavy), None);
    }

    #[test]
    fn segments_merge_into_fewer_smaller_ones_and_hold_the_same_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let options = SqliteOptions {
            merge_in_background: false,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&path, options).unwrap();
        let r = room("merging");
        for i in 0..200 {
            let start = store.node_count(&r).unwrap() as u32;
            store
                .commit(
                    &r,
                    Batch {
                        segments: vec![test_segment(&r, 1, start, 1 + i % 3)],
                        signatures: vec![(start, test_signature(u64::from(start)))],
                        ..Batch::default()
                    },
                )
                .unwrap();
        }
        let before = store.load(&r).unwrap();
        let bytes_before = store.room_bytes(&r).unwrap();
        assert_eq!(bytes_before.segments, 200);
        store.settle().unwrap();
        let after = store.load(&r).unwrap();
        let bytes_after = store.room_bytes(&r).unwrap();
        assert_eq!(
            held(&r, &after),
            held(&r, &before),
            "the same nodes and signatures"
        );
        assert!(store.stats().merges > 0);
        assert!(bytes_after.segments < 12, "{bytes_after:?}");
        assert!(
            bytes_after.history * 4 < bytes_before.history,
            "{bytes_after:?} vs {bytes_before:?}"
        );
        // Signatures were folded into the merged segments.
        assert!(after.signatures.len() < before.signatures.len());
        // A merge computed from a state that changed since does nothing.
        let stale = Write::Merge {
            room: store
                .inner
                .read(|conn| room_key(conn, &r))
                .unwrap()
                .unwrap(),
            replaced: vec![Replaced {
                start: 0,
                count: after.segments[0].len,
                checksum: [0; 32],
            }],
            merged: test_segment(&r, 9, 0, after.segments[0].len),
            folded: Vec::new(),
        };
        store.inner.write(stale).unwrap();
        assert_eq!(store.load(&r).unwrap(), after);
    }

    #[test]
    fn the_merger_thread_merges_after_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("store.db"));
        let r = room("background");
        for _ in 0..64 {
            append(&store, &r, 1, 1);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.room_bytes(&r).unwrap().segments > 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "the merger did not merge"
            );
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            held(&r, &store.load(&r).unwrap()).nodes,
            test_nodes(1, 0, 64)
        );
    }

    #[test]
    fn a_segment_that_fails_its_checksum_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = open(&path);
        let r = room("damaged");
        append(&store, &r, 1, 5);
        drop(store);
        Connection::open(&path)
            .unwrap()
            .execute_batch("UPDATE segments_v2 SET pack = zeroblob(length(pack))")
            .unwrap();
        let store = open(&path);
        match store.load(&r) {
            Err(StoreError::Corrupt(message)) => assert!(message.contains("checksum")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn dropping_the_store_closes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let store = open(&path);
        append(&store, &room("r"), 1, 3);
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
            .query_row("SELECT sum(count) FROM segments_v2", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 3);
    }
}
