//! [`PgStore`]: the [`Store`] on PostgreSQL, for a fleet of relays that
//! share rooms (`syncline serve --postgres URL`).
//!
//! The history format is the SQLite store's: a room is its segments
//! (consecutive nodes as one pack, stored as bytes), the signatures beside
//! them, the outbox and the last checkpoint; the conformance suite of
//! `syncline-store` is the one definition of the rules both follow.
//!
//! **Any relay may append to any room.** A room's node count is where its
//! last segment ends (segments are consecutive and never merged here), so
//! an append is an insert: a batch of segments continuing the count this
//! store last saw goes in one statement, inserted only if the room still
//! holds that count; two writers appending at one start collide on the
//! segments' key and the later is refused, nothing of it written. Any
//! other batch reads the count in its transaction and applies the batch
//! by the shared rules
//! ([`appended`], [`check_expected`]): a replay of nodes stored already is
//! skipped (inserts are idempotent), a segment that would leave a gap or
//! overlap is refused, and a batch written for a history another relay
//! has since extended is refused (`expect_nodes`), so its writer reloads
//! the tail and applies what it missed first.
//!
//! **Durable before acknowledged.** A commit returns once PostgreSQL has
//! committed it (`synchronous_commit` as the server has it: on by
//! default, which flushes the WAL).
//!
//! **Locks across relays.** [`Store::lock`] is a PostgreSQL advisory lock
//! on the name (a session lock, on a connection of a pool of its own, so a
//! lock holder's commit never waits for a connection a lock holder has):
//! a relay about to append to a room takes the room's lock, catches up
//! with the tail other relays stored, then commits, so its batch is never
//! refused as stale. The lock ends with its connection, so a relay that
//! dies (or loses the database) releases what it held; connections ask
//! the server to probe them (TCP keepalives, and `tcp_user_timeout` for
//! data left unacknowledged), so a relay cut off by a partition releases
//! its locks within about half a minute. Waiting for a lock times out
//! ([`PgOptions::lock_timeout`]).
//!
//! Connections come from a small pool ([`PgOptions::connections`]); one
//! that fails is dropped, and the next call opens another. Every call
//! runs on the caller's thread (the relay calls stores on its blocking
//! pool), every query has a statement timeout, and waiting for a pooled
//! connection has one too.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use postgres::{Client, NoTls, Statement, Transaction};
use syncline_core::{RoomId, Signature};
use syncline_store::{
    Batch, MAX_SEGMENT_NODES, RoomBytes, Segment, Store, StoreError, StoreLock, StoredRoom,
    StoredTail, appended, check_expected,
};

/// The schema this version writes; older ones are migrated on open.
const SCHEMA: i32 = 3;

/// Schema 1. Names are prefixed so that the tables can live in a database
/// shared with others.
const MIGRATION_1: &str = "
CREATE TABLE syncline_rooms (
    key BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    node_count BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE syncline_segments (
    room BIGINT NOT NULL REFERENCES syncline_rooms (key),
    start BIGINT NOT NULL,
    count BIGINT NOT NULL,
    pack BYTEA NOT NULL,
    PRIMARY KEY (room, start)
);
CREATE TABLE syncline_signatures (
    room BIGINT NOT NULL REFERENCES syncline_rooms (key),
    node BIGINT NOT NULL,
    sig BYTEA NOT NULL,
    PRIMARY KEY (room, node)
);
CREATE TABLE syncline_outbox (
    room BIGINT NOT NULL REFERENCES syncline_rooms (key),
    seq BIGINT NOT NULL,
    PRIMARY KEY (room, seq)
);
CREATE TABLE syncline_checkpoints (
    room BIGINT PRIMARY KEY REFERENCES syncline_rooms (key),
    bytes BYTEA NOT NULL
);
CREATE TABLE syncline_meta (
    key TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
";

/// Schema 2: the nodes a checkpoint covers, beside it (a catch-up reads
/// it without the checkpoint's bytes); filled for stored checkpoints by
/// [`migrate`].
const MIGRATION_2: &str = "ALTER TABLE syncline_checkpoints ADD COLUMN nodes BIGINT";

/// Schema 3: a room's node count is read from its last segment (an index
/// probe) instead of kept in its row, and the tables appended to on every
/// commit lose their foreign keys (a check locks the room's row, a write
/// of its own per append; the store creates a room's row before anything
/// refers to it, and never deletes one), so an append is one insert, as
/// cheap as an insert gets.
const MIGRATION_3: &str = "ALTER TABLE syncline_rooms DROP COLUMN node_count; \
    ALTER TABLE syncline_segments DROP CONSTRAINT syncline_segments_room_fkey; \
    ALTER TABLE syncline_signatures DROP CONSTRAINT syncline_signatures_room_fkey";

/// The advisory lock space of [`Store::lock`] ("SYNE": the lock's name
/// hashed is the other half of the key).
const LOCK_SPACE: i32 = 1398361669;

/// [`Store::lock`], and its release.
const LOCK: &str = "SELECT pg_advisory_lock($1, hashtext($2))";
const UNLOCK: &str = "SELECT pg_advisory_unlock($1, hashtext($2))";

/// The nodes room `r` holds: where its last segment ends (segments are
/// consecutive from node 0 and never merged here), NULL without any.
macro_rules! count_of {
    ($room:literal) => {
        concat!(
            "(SELECT s.start + s.count FROM syncline_segments s WHERE s.room = ",
            $room,
            " ORDER BY s.start DESC LIMIT 1)"
        )
    };
}

/// The names and node counts of the stored rooms among names `$1`.
const ROOM_COUNTS: &str = concat!(
    "SELECT r.name, coalesce(",
    count_of!("r.key"),
    ", 0) FROM syncline_rooms r WHERE r.name = ANY($1)"
);

/// What is stored of room `$1` from node `$2` on, in one statement (one
/// snapshot, one round trip), as rows of (kind, a, b, bytes): 0 a segment
/// (start, count, pack) holding node `$2` or later, 1 a signature (node,
/// -, sig) of node `$2` or later, 2 an outbox seq, 3 the nodes the
/// checkpoint covers, 4 the room's key and node count. The segment holding
/// node `$2` starts at most [`MAX_SEGMENT_NODES`] before it (the store
/// refuses longer ones), which bounds the index range read.
const TAIL: &str = concat!(
    "WITH r AS (SELECT key FROM syncline_rooms WHERE name = $1) \
     SELECT 0, s.start, s.count, s.pack FROM syncline_segments s, r \
         WHERE s.room = r.key AND s.start > $2::BIGINT - $3::BIGINT AND s.start + s.count > $2 \
     UNION ALL SELECT 1, g.node, 0::BIGINT, g.sig FROM syncline_signatures g, r \
         WHERE g.room = r.key AND g.node >= $2 \
     UNION ALL SELECT 2, o.seq, 0::BIGINT, NULL::BYTEA FROM syncline_outbox o, r \
         WHERE o.room = r.key \
     UNION ALL SELECT 3, coalesce(c.nodes, 0), 0::BIGINT, NULL::BYTEA \
         FROM syncline_checkpoints c, r WHERE c.room = r.key \
     UNION ALL SELECT 4, r.key, coalesce(",
    count_of!("r.key"),
    ", 0), NULL::BYTEA FROM r"
);

/// Creates a room's row if need be; its key. No row lock: appends are
/// ordered by the segments' primary key alone (a row lock would cost a
/// write per commit, and take turns with fast appends for nothing). Empty
/// when another writer's first commit to the room made the row after this
/// statement's snapshot: asked again, it is there.
const ROOM_KEY: &str = "WITH made AS ( \
        INSERT INTO syncline_rooms (name) VALUES ($1) ON CONFLICT (name) DO NOTHING \
        RETURNING key) \
    SELECT key FROM made UNION ALL SELECT key FROM syncline_rooms WHERE name = $1 LIMIT 1";

/// The room's node count (`$1`: its key).
const COUNT: &str = concat!("SELECT coalesce(", count_of!("$1"), ", 0)");

/// Appends segments (starts, lengths, packs as arrays). Two writers
/// appending at one start collide on the key: the later fails
/// (`unique_violation`), nothing of its statement written.
const APPEND: &str = "INSERT INTO syncline_segments (room, start, count, pack) \
    SELECT $1, * FROM unnest($2::BIGINT[], $3::BIGINT[], $4::BYTEA[])";

/// [`APPEND`] in one statement of its own, if the room still holds `$2`
/// nodes: as many rows as segments if it did, none if not.
const FAST_APPEND: &str = concat!(
    "INSERT INTO syncline_segments (room, start, count, pack) \
     SELECT $1, * FROM unnest($3::BIGINT[], $4::BIGINT[], $5::BYTEA[]) \
     WHERE coalesce(",
    count_of!("$1"),
    ", 0) = $2"
);

/// [`FAST_APPEND`] of one segment (most commits), without the arrays.
const FAST_APPEND_ONE: &str = concat!(
    "INSERT INTO syncline_segments (room, start, count, pack) \
     SELECT $1, $3, $4, $5 WHERE coalesce(",
    count_of!("$1"),
    ", 0) = $2"
);

/// `unique_violation`: another writer appended at the same start first.
const UNIQUE_VIOLATION: &str = "23505";

/// Adds signatures (the first held for a node stays).
const SIGN: &str = "INSERT INTO syncline_signatures (room, node, sig) \
    SELECT $1, * FROM unnest($2::BIGINT[], $3::BYTEA[]) ON CONFLICT DO NOTHING";

const OUTBOX_ADD: &str = "INSERT INTO syncline_outbox (room, seq) \
    SELECT $1, unnest($2::BIGINT[]) ON CONFLICT DO NOTHING";

const OUTBOX_REMOVE: &str = "DELETE FROM syncline_outbox WHERE room = $1 AND seq = ANY($2)";

/// Stores a checkpoint unless the stored one covers more nodes (relays of
/// a fleet unloading a room write what each holds; the fullest stays).
const PUT_CHECKPOINT: &str = "INSERT INTO syncline_checkpoints (room, bytes, nodes) \
    VALUES ($1, $2, $3) \
    ON CONFLICT (room) DO UPDATE SET bytes = EXCLUDED.bytes, nodes = EXCLUDED.nodes \
    WHERE coalesce(syncline_checkpoints.nodes, 0) <= EXCLUDED.nodes";

/// Rooms a store remembers the last count of ([`PgStore::fast_append`]);
/// past it the memory starts afresh (a forgotten room's next append takes
/// the general path once).
const SEEN_ROOMS: usize = 65_536;

/// How a [`PgStore`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections the store opens at most; callers beyond wait.
    pub connections: usize,
    /// How long one statement may run before PostgreSQL cancels it.
    pub statement_timeout: Duration,
    /// How long opening a connection, or waiting for a pooled one, may
    /// take.
    pub connect_timeout: Duration,
    /// Connections held by [`Store::lock`] at most (a relay holds one per
    /// room step running: its `room_workers`); lockers beyond wait.
    pub lock_connections: usize,
    /// How long taking a lock may wait (a [`Store::lock`] held elsewhere,
    /// a row): past it the call fails, and a relay's room closes its
    /// sessions `overloaded` rather than hold a worker.
    pub lock_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            connections: 8,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            lock_connections: 8,
            lock_timeout: Duration::from_secs(10),
        }
    }
}

/// A pooled connection, with the statements prepared on it (a statement
/// prepared once is a round trip saved on every commit).
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn prepared(&mut self, query: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(query) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(query).map_err(sql)?;
        self.statements.insert(query, statement.clone());
        Ok(statement)
    }
}

/// Connections to one database, opened as needed up to a bound.
struct Pool {
    /// Idle connections, and how many are open in all.
    conns: Mutex<(Vec<Conn>, usize)>,
    returned: Condvar,
    most: usize,
}

impl Pool {
    fn new(most: usize) -> Pool {
        Pool {
            conns: Mutex::new((Vec::new(), 0)),
            returned: Condvar::new(),
            most: most.max(1),
        }
    }

    /// An idle connection, a new one if fewer than the bound are open,
    /// else the first returned within `config`'s connect timeout.
    fn take(&self, config: &postgres::Config) -> Result<Conn, StoreError> {
        let wait = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let deadline = std::time::Instant::now() + wait;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = conns.0.pop() {
                return Ok(conn);
            }
            if conns.1 < self.most {
                conns.1 += 1;
                drop(conns);
                let opened = config.connect(NoTls).map_err(sql);
                if opened.is_err() {
                    self.conns.lock().unwrap_or_else(|p| p.into_inner()).1 -= 1;
                    // A slot is free again: a waiter may open it.
                    self.returned.notify_one();
                }
                return opened.map(|client| Conn {
                    client,
                    statements: HashMap::new(),
                });
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Io(format!(
                    "postgres: all {} connections stayed busy for {wait:?}",
                    self.most
                )));
            }
            conns = self
                .returned
                .wait_timeout(conns, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Gives `conn` back (closing it instead if it failed).
    fn give(&self, conn: Conn) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if conn.client.is_closed() {
            conns.1 -= 1;
            off_thread(conn);
        } else {
            conns.0.push(conn);
        }
        self.returned.notify_one();
    }

    /// Closes a connection taken from the pool instead of giving it back.
    fn discard(&self, conn: Conn) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).1 -= 1;
        off_thread(conn);
        self.returned.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        off_thread(std::mem::take(&mut conns.0));
    }
}

/// The [`Store`] on a PostgreSQL database (see the module docs).
pub struct PgStore {
    config: postgres::Config,
    pool: Pool,
    /// Connections holding (or about to hold) [`Store::lock`]s.
    lockers: Pool,
    /// Each room's key and node count as this store last committed or
    /// read it: the next append to it goes in one round trip if no other
    /// writer moved it on ([`PgStore::fast_append`]). At most
    /// [`SEEN_ROOMS`] rooms.
    seen: Mutex<HashMap<RoomId, (i64, u64)>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

fn sql(e: postgres::Error) -> StoreError {
    // The server's own words say what is wrong ("database … does not
    // exist"); the error's Display alone says only "db error".
    match e.as_db_error() {
        Some(db) => StoreError::Io(format!("postgres: {} ({})", db.message(), db.code().code())),
        // "error connecting to server" alone hides why ("Connection
        // refused"): the source says.
        None => match std::error::Error::source(&e) {
            Some(why) => StoreError::Io(format!("postgres: {e}: {why}")),
            None => StoreError::Io(format!("postgres: {e}")),
        },
    }
}

/// Segments as the arrays [`APPEND`] and [`FAST_APPEND`] take: starts,
/// lengths, packs.
fn columns<'a>(segments: &[&'a Segment]) -> (Vec<i64>, Vec<i64>, Vec<&'a [u8]>) {
    (
        segments.iter().map(|s| i64::from(s.start)).collect(),
        segments.iter().map(|s| i64::from(s.len)).collect(),
        segments.iter().map(|s| &s.pack[..]).collect(),
    )
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code() == UNIQUE_VIOLATION)
}

/// A room's number as stored (`BIGINT`).
fn int(n: u64) -> i64 {
    i64::try_from(n).expect("counts fit in a BIGINT")
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`)
    /// and creates or migrates Syncline's tables.
    pub fn open(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(url, options)?;
        store.with(|conn| migrate(&mut conn.client))?;
        Ok(store)
    }

    /// A store on the database at `url`, its tables as they are.
    fn connect(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Io(format!("postgres URL {url:?}: {e}")))?;
        // The server probes an idle connection after 10 s, every 5 s,
        // three times, and gives up on one whose data stays unacknowledged
        // for 25 s: the locks of a relay cut off end within ~25 s.
        config
            .connect_timeout(options.connect_timeout)
            .options(&format!(
                "-c statement_timeout={} -c lock_timeout={} -c tcp_keepalives_idle=10 \
                 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
                 -c tcp_user_timeout=25000",
                options.statement_timeout.as_millis(),
                options.lock_timeout.as_millis()
            ))
            .application_name("syncline");
        let store = PgStore {
            config,
            pool: Pool::new(options.connections),
            lockers: Pool::new(options.lock_connections),
            seen: Mutex::new(HashMap::new()),
        };
        Ok(store)
    }

    /// Connects to a database a relay of this version already set up, and
    /// creates or migrates nothing: an error if it holds no Syncline
    /// tables or another schema (tools pointed at the wrong database must
    /// not set one up).
    pub fn open_existing(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(url, options)?;
        let version: Option<i32> = store.with(|conn| {
            let exists: bool = conn
                .client
                .query_one("SELECT to_regclass('syncline_schema') IS NOT NULL", &[])
                .map_err(sql)?
                .get(0);
            if !exists {
                return Ok(None);
            }
            Ok(conn
                .client
                .query_opt("SELECT version FROM syncline_schema", &[])
                .map_err(sql)?
                .map(|row| row.get(0)))
        })?;
        match version {
            Some(SCHEMA) => Ok(store),
            Some(v) => Err(StoreError::Corrupt(format!(
                "the database holds Syncline schema {v}; this version reads {SCHEMA} \
                 (start a relay of this version on it first)"
            ))),
            None => Err(StoreError::Corrupt(
                "no Syncline tables in this database (is it the relays' database?)".into(),
            )),
        }
    }

    /// Runs `f` on a pooled connection; a connection that failed is not
    /// pooled again. Calls block: from async code, call them on a blocking
    /// thread (`spawn_blocking`).
    fn with<R>(&self, f: impl FnOnce(&mut Conn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut conn = self.pool.take(&self.config)?;
        let result = f(&mut conn);
        self.pool.give(conn);
        result
    }

    /// Bytes the database takes on disk (`pg_database_size`).
    pub fn database_bytes(&self) -> Result<u64, StoreError> {
        self.with(|conn| {
            let bytes: i64 = conn
                .client
                .query_one("SELECT pg_database_size(current_database())", &[])
                .map_err(sql)?
                .get(0);
            Ok(bytes as u64)
        })
    }

    /// The node counts of those of `rooms` that are stored, in one query
    /// per 10,000 rooms: a relay of a fleet checks its loaded rooms
    /// against what the others stored.
    pub fn node_counts(&self, rooms: &[RoomId]) -> Result<Vec<(RoomId, u64)>, StoreError> {
        let mut counts = Vec::with_capacity(rooms.len());
        for chunk in rooms.chunks(10_000) {
            let names: Vec<&str> = chunk.iter().map(RoomId::as_str).collect();
            let rows = self.with(|conn| {
                let statement = conn.prepared(ROOM_COUNTS)?;
                conn.client.query(&statement, &[&names]).map_err(sql)
            })?;
            for row in rows {
                let name: String = row.get(0);
                let room = RoomId::new(&name)
                    .map_err(|e| StoreError::Corrupt(format!("room name {name:?}: {e}")))?;
                let nodes =
                    u64::try_from(row.get::<_, i64>(1)).map_err(|_| corrupt("node count"))?;
                counts.push((room, nodes));
            }
        }
        Ok(counts)
    }

    /// Runs `f` in a transaction that reads one snapshot.
    fn read<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.with(|conn| {
            let mut tx = conn
                .client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(sql)?;
            let out = f(&mut tx)?;
            tx.commit().map_err(sql)?;
            Ok(out)
        })
    }
}

/// A held [`Store::lock`]: its connection, given back once unlocked.
struct Held<'a> {
    store: &'a PgStore,
    conn: Option<Conn>,
    name: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let unlocked = conn.prepared(UNLOCK).and_then(|unlock| {
            conn.client
                .query_one(&unlock, &[&LOCK_SPACE, &self.name])
                .map_err(sql)
        });
        match unlocked {
            Ok(row) if row.get::<_, bool>(0) => self.store.lockers.give(conn),
            // Not held after all, or the connection failed: closing it
            // releases whatever it holds.
            _ => self.store.lockers.discard(conn),
        }
    }
}

/// Drops `value` (connections, each with the runtime of the blocking
/// client) on a thread of its own: dropping a runtime inside an async
/// task panics, and a relay drops its store from one.
fn off_thread<T: Send + 'static>(value: T) {
    std::thread::spawn(move || drop(value));
}

/// Creates the tables, or migrates older ones, once: relays starting
/// together take an advisory lock.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(sql)?;
    // Another relay migrating holds the lock as long as it takes (each
    // statement within the statement timeout).
    tx.batch_execute("SET LOCAL lock_timeout = 0")
        .map_err(sql)?;
    // "SYNC" as a number: the lock is Syncline's.
    tx.execute("SELECT pg_advisory_xact_lock(1398361667)", &[])
        .map_err(sql)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS syncline_schema (version INT NOT NULL)")
        .map_err(sql)?;
    let version: Option<i32> = tx
        .query_opt("SELECT version FROM syncline_schema", &[])
        .map_err(sql)?
        .map(|row| row.get(0));
    let mut at = match version {
        None => {
            tx.batch_execute(MIGRATION_1).map_err(sql)?;
            tx.execute("INSERT INTO syncline_schema (version) VALUES (1)", &[])
                .map_err(sql)?;
            1
        }
        Some(v) if v > SCHEMA => {
            return Err(StoreError::Corrupt(format!(
                "the database holds Syncline schema {v}; this version reads {SCHEMA}"
            )));
        }
        Some(v) => v,
    };
    if at < SCHEMA {
        // Relays of versions before fleets held the database with this
        // lock; one still running would fail every write once migrated.
        let older_running = !tx
            .query_one("SELECT pg_try_advisory_xact_lock(1398361668)", &[])
            .map_err(sql)?
            .get::<_, bool>(0);
        if older_running {
            return Err(StoreError::Io(format!(
                "a relay of an older version (schema {at}) is serving this database: \
                 stop it before starting this version, which migrates the schema to {SCHEMA}"
            )));
        }
    }
    if at == 1 {
        tx.batch_execute(MIGRATION_2).map_err(sql)?;
        // A hundred checkpoints at a time: memory stays bounded.
        loop {
            let rows = tx
                .query(
                    "SELECT room, bytes FROM syncline_checkpoints WHERE nodes IS NULL \
                     ORDER BY room LIMIT 100",
                    &[],
                )
                .map_err(sql)?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let (room, bytes): (i64, Vec<u8>) = (row.get(0), row.get(1));
                tx.execute(
                    "UPDATE syncline_checkpoints SET nodes = $2 WHERE room = $1",
                    &[&room, &checkpoint_nodes(&bytes)],
                )
                .map_err(sql)?;
            }
        }
        at = 2;
    }
    if at == 2 {
        tx.batch_execute(MIGRATION_3).map_err(sql)?;
        at = 3;
    }
    debug_assert_eq!(at, SCHEMA, "every migration ran");
    tx.execute("UPDATE syncline_schema SET version = $1", &[&at])
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

/// The nodes a checkpoint covers (0 for one that does not read: a room
/// loading it replays its history instead).
fn checkpoint_nodes(bytes: &[u8]) -> i64 {
    syncline_core::checkpoint::header(bytes).map_or(0, |h| int(h.nodes))
}

/// The room's key, if it is stored.
fn room_key(tx: &mut Transaction<'_>, room: &RoomId) -> Result<Option<i64>, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT key FROM syncline_rooms WHERE name = $1",
            &[&room.as_str()],
        )
        .map_err(sql)?
        .map(|row| row.get(0)))
}

/// Every segment of room `key`, in order.
fn segments(tx: &mut Transaction<'_>, key: i64) -> Result<Vec<Segment>, StoreError> {
    tx.query(
        "SELECT start, count, pack FROM syncline_segments WHERE room = $1 ORDER BY start",
        &[&key],
    )
    .map_err(sql)?
    .iter()
    .map(|row| segment(row.get(0), row.get(1), row.get(2)))
    .collect()
}

/// A segment as its row stores it.
fn segment(start: i64, len: i64, pack: Vec<u8>) -> Result<Segment, StoreError> {
    Ok(Segment {
        start: u32::try_from(start).map_err(|_| corrupt("segment start"))?,
        len: u32::try_from(len).map_err(|_| corrupt("segment length"))?,
        pack: pack.into_boxed_slice(),
    })
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} out of range"))
}

/// Every signature stored beside room `key`'s segments, by node.
fn signatures(tx: &mut Transaction<'_>, key: i64) -> Result<Vec<(u32, Signature)>, StoreError> {
    tx.query(
        "SELECT node, sig FROM syncline_signatures WHERE room = $1 ORDER BY node",
        &[&key],
    )
    .map_err(sql)?
    .iter()
    .map(|row| {
        let node = u32::try_from(row.get::<_, i64>(0)).map_err(|_| corrupt("node number"))?;
        Ok((node, signature(row.get(1))?))
    })
    .collect()
}

fn signature(bytes: Vec<u8>) -> Result<Signature, StoreError> {
    <[u8; 64]>::try_from(bytes.as_slice())
        .map(Signature)
        .map_err(|_| StoreError::Corrupt(format!("signature of {} bytes", bytes.len())))
}

fn outbox(tx: &mut Transaction<'_>, key: i64) -> Result<Vec<u64>, StoreError> {
    Ok(tx
        .query(
            "SELECT seq FROM syncline_outbox WHERE room = $1 ORDER BY seq",
            &[&key],
        )
        .map_err(sql)?
        .iter()
        .map(|row| row.get::<_, i64>(0) as u64)
        .collect())
}

fn checkpoint(tx: &mut Transaction<'_>, key: i64) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT bytes FROM syncline_checkpoints WHERE room = $1",
            &[&key],
        )
        .map_err(sql)?
        .map(|row| row.get(0)))
}

impl PgStore {
    /// A batch of segments only, continuing the history this store last
    /// saw the room at, in one statement (one round trip, its own
    /// transaction): inserted only if the room's last segment still ends
    /// where it was seen to, all of it or nothing. `None` when the batch or
    /// the room is not for this path, or another writer appended first: the
    /// caller takes the general one.
    fn fast_append(
        &self,
        room: &RoomId,
        batch: &Batch,
    ) -> Result<Option<Result<(), StoreError>>, StoreError> {
        let only_segments = batch.signatures.is_empty()
            && batch.outbox_add.is_empty()
            && batch.outbox_remove.is_empty()
            && batch.checkpoint.is_none()
            && !batch.segments.is_empty();
        if !only_segments {
            return Ok(None);
        }
        let Some(&(key, seen)) = self.seen_lock().get(room) else {
            return Ok(None);
        };
        if batch.expect_nodes.is_some_and(|e| e != seen) {
            return Ok(None);
        }
        // The general rules decide what continues `seen`; anything else
        // (a replay, a gap) takes the general path.
        let Ok(new) = appended(seen, &batch.segments) else {
            return Ok(None);
        };
        if new.len() != batch.segments.len() {
            return Ok(None);
        }
        let count = new.last().map_or(seen, |s| u64::from(s.start + s.len));
        let inserted = self.with(|conn| {
            let executed = match &new[..] {
                [one] => {
                    let statement = conn.prepared(FAST_APPEND_ONE)?;
                    let (start, len) = (i64::from(one.start), i64::from(one.len));
                    conn.client.execute(
                        &statement,
                        &[&key, &int(seen), &start, &len, &&one.pack[..]],
                    )
                }
                _ => {
                    let statement = conn.prepared(FAST_APPEND)?;
                    let (starts, lens, packs) = columns(&new);
                    conn.client
                        .execute(&statement, &[&key, &int(seen), &starts, &lens, &packs])
                }
            };
            match executed {
                Ok(rows) => Ok(rows),
                // Another writer appended first: the general path says
                // what of this batch is a replay and what is stale.
                Err(e) if is_unique_violation(&e) => Ok(0),
                Err(e) => Err(sql(e)),
            }
        })?;
        if inserted == new.len() as u64 {
            self.saw(room, key, count);
            Ok(Some(Ok(())))
        } else {
            debug_assert_eq!(inserted, 0, "all of a batch's segments or none");
            Ok(None)
        }
    }

    fn seen_lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoomId, (i64, u64)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This store saw `room` (key `key`) hold `count` nodes.
    fn saw(&self, room: &RoomId, key: i64, count: u64) {
        let mut seen = self.seen_lock();
        if seen.len() >= SEEN_ROOMS && !seen.contains_key(room) {
            seen.clear();
        }
        seen.insert(room.clone(), (key, count));
    }
}

impl Store for PgStore {
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // A tail read finds a node's segment within this reach (`TAIL`).
        if let Some(long) = batch.segments.iter().find(|s| s.len > MAX_SEGMENT_NODES) {
            return Err(StoreError::Invalid(format!(
                "a segment of {} nodes: at most {MAX_SEGMENT_NODES}",
                long.len
            )));
        }
        if let Some(done) = self.fast_append(room, &batch)? {
            return done;
        }
        self.with(|conn| {
            let room_key = conn.prepared(ROOM_KEY)?;
            let count_nodes = conn.prepared(COUNT)?;
            let append = conn.prepared(APPEND)?;
            let sign = conn.prepared(SIGN)?;
            let outbox_add = conn.prepared(OUTBOX_ADD)?;
            let outbox_remove = conn.prepared(OUTBOX_REMOVE)?;
            let put_checkpoint = conn.prepared(PUT_CHECKPOINT)?;
            let mut tx = conn.client.transaction().map_err(sql)?;
            let mut key = None;
            for _ in 0..2 {
                if let Some(row) = tx.query_opt(&room_key, &[&room.as_str()]).map_err(sql)? {
                    key = Some(row.get::<_, i64>(0));
                    break;
                }
            }
            let key = key.ok_or_else(|| {
                StoreError::Invalid(format!("another writer is creating {room}: try again"))
            })?;
            let stored: i64 = tx.query_one(&count_nodes, &[&key]).map_err(sql)?.get(0);
            let stored = u64::try_from(stored).map_err(|_| corrupt("node count"))?;
            check_expected(stored, batch.expect_nodes)?;
            let new = appended(stored, &batch.segments)?;
            let count = new.last().map_or(stored, |s| u64::from(s.start + s.len));
            if !new.is_empty() {
                // Every new segment in one statement.
                let (starts, lens, packs) = columns(&new);
                match tx.execute(&append, &[&key, &starts, &lens, &packs]) {
                    Ok(_) => {}
                    // Another writer appended at this start first: this
                    // batch was written for a stale history.
                    Err(e) if is_unique_violation(&e) => {
                        return Err(StoreError::Invalid(format!(
                            "another writer appended to {room} at node {stored} meanwhile"
                        )));
                    }
                    Err(e) => return Err(sql(e)),
                }
            }
            let (nodes, sigs): (Vec<i64>, Vec<&[u8]>) = batch
                .signatures
                .iter()
                .filter(|(node, _)| u64::from(*node) < count)
                .map(|(node, sig)| (i64::from(*node), &sig.0[..]))
                .unzip();
            if !nodes.is_empty() {
                tx.execute(&sign, &[&key, &nodes, &sigs]).map_err(sql)?;
            }
            if !batch.outbox_add.is_empty() {
                let seqs: Vec<i64> = batch.outbox_add.iter().map(|s| int(*s)).collect();
                tx.execute(&outbox_add, &[&key, &seqs]).map_err(sql)?;
            }
            if !batch.outbox_remove.is_empty() {
                let seqs: Vec<i64> = batch.outbox_remove.iter().map(|s| int(*s)).collect();
                tx.execute(&outbox_remove, &[&key, &seqs]).map_err(sql)?;
            }
            if let Some(checkpoint) = &batch.checkpoint {
                tx.execute(
                    &put_checkpoint,
                    &[&key, checkpoint, &checkpoint_nodes(checkpoint)],
                )
                .map_err(sql)?;
            }
            tx.commit().map_err(sql)?;
            self.saw(room, key, count);
            Ok(())
        })
    }

    fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        self.read(|tx| {
            let Some(key) = room_key(tx, room)? else {
                return Ok(StoredRoom::default());
            };
            Ok(StoredRoom {
                segments: segments(tx, key)?,
                signatures: signatures(tx, key)?,
                checkpoint: checkpoint(tx, key)?,
                outbox: outbox(tx, key)?,
            })
        })
    }

    fn load_tail(&self, room: &RoomId, from: u64) -> Result<StoredTail, StoreError> {
        let rows = self.with(|conn| {
            let statement = conn.prepared(TAIL)?;
            let reach = i64::from(MAX_SEGMENT_NODES);
            conn.client
                .query(&statement, &[&room.as_str(), &int(from), &reach])
                .map_err(sql)
        })?;
        let mut tail = StoredTail::default();
        let count = |n: i64, what: &str| u64::try_from(n).map_err(|_| corrupt(what));
        for row in rows {
            let (kind, a, b): (i32, i64, i64) = (row.get(0), row.get(1), row.get(2));
            match kind {
                0 => tail.segments.push(segment(a, b, row.get(3))?),
                1 => {
                    let node = u32::try_from(a).map_err(|_| corrupt("node number"))?;
                    tail.signatures.push((node, signature(row.get(3))?));
                }
                2 => tail.outbox.push(count(a, "outbox seq")?),
                3 => tail.checkpointed = count(a, "checkpoint coverage")?,
                4 => self.saw(room, a, count(b, "node count")?),
                other => return Err(StoreError::Corrupt(format!("tail row of kind {other}"))),
            }
        }
        tail.segments.sort_unstable_by_key(|s| s.start);
        tail.signatures.sort_unstable_by_key(|(node, _)| *node);
        tail.outbox.sort_unstable();
        Ok(tail)
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        let counts = self.node_counts(std::slice::from_ref(room))?;
        Ok(counts.first().map_or(0, |(_, nodes)| *nodes))
    }

    fn lock(&self, name: &str) -> Result<Option<StoreLock<'_>>, StoreError> {
        let mut conn = self.lockers.take(&self.config)?;
        let taken = conn.prepared(LOCK).and_then(|lock| {
            conn.client
                .execute(&lock, &[&LOCK_SPACE, &name])
                .map_err(sql)
        });
        match taken {
            Ok(_) => Ok(Some(Box::new(Held {
                store: self,
                conn: Some(conn),
                name: name.to_owned(),
            }))),
            Err(e) => {
                self.lockers.give(conn);
                Err(e)
            }
        }
    }

    fn room_bytes(&self, room: &RoomId) -> Result<RoomBytes, StoreError> {
        self.read(|tx| {
            let Some(key) = room_key(tx, room)? else {
                return Ok(RoomBytes::default());
            };
            let row = tx
                .query_one(
                    "SELECT \
                       (SELECT count(*) FROM syncline_segments WHERE room = $1), \
                       (SELECT coalesce(sum(length(pack)), 0)::BIGINT FROM syncline_segments WHERE room = $1), \
                       (SELECT coalesce(sum(length(sig)), 0)::BIGINT FROM syncline_signatures WHERE room = $1), \
                       (SELECT coalesce(sum(length(bytes)), 0)::BIGINT FROM syncline_checkpoints WHERE room = $1)",
                    &[&key],
                )
                .map_err(sql)?;
            let (segments, history, signatures, checkpoint): (i64, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            Ok(RoomBytes {
                history: (history + signatures) as u64,
                checkpoint: checkpoint as u64,
                segments: segments as u64,
            })
        })
    }

    fn rooms(&self) -> Result<Vec<RoomId>, StoreError> {
        self.read(|tx| {
            // Byte order, as `RoomId` sorts (not the database's collation).
            tx.query(
                "SELECT r.name FROM syncline_rooms r \
                 WHERE EXISTS (SELECT 1 FROM syncline_segments s WHERE s.room = r.key) \
                 ORDER BY r.name COLLATE \"C\"",
                &[],
            )
            .map_err(sql)?
            .iter()
            .map(|row| {
                let name: String = row.get(0);
                RoomId::new(&name)
                    .map_err(|e| StoreError::Corrupt(format!("room name {name:?}: {e}")))
            })
            .collect()
        })
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|tx| {
            Ok(tx
                .query_opt("SELECT value FROM syncline_meta WHERE key = $1", &[&key])
                .map_err(sql)?
                .map(|row| row.get(0)))
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.client
                .execute(
                    "INSERT INTO syncline_meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&key, &value],
                )
                .map_err(sql)?;
            Ok(())
        })
    }
}
