//! [`PgStore`]: the [`Store`] on PostgreSQL, for a fleet of relays that
//! share rooms (`syncline serve --postgres URL`).
//!
//! The history format is the SQLite store's: a room is its segments
//! (consecutive nodes as one pack, stored as bytes), the signatures beside
//! them, the outbox and the last checkpoint; the conformance suite of
//! `syncline-store` is the one definition of the rules both follow.
//!
//! **Any relay may append to any room.** A commit takes the room's row
//! lock (`INSERT … ON CONFLICT DO UPDATE` on `syncline_rooms`) for its
//! transaction, reads the node count under it, and applies the batch by
//! the shared rules ([`appended`], [`check_expected`]): a replay of nodes
//! stored already is skipped (inserts are idempotent), a segment that
//! would leave a gap or overlap is refused, and a batch written for a
//! history another relay has since extended is refused (`expect_nodes`),
//! so its writer reloads the tail and applies what it missed first.
//!
//! **Durable before acknowledged.** A commit returns once PostgreSQL has
//! committed it (`synchronous_commit` as the server has it: on by
//! default, which flushes the WAL).
//!
//! Connections come from a small pool ([`PgOptions::connections`]); one
//! that fails is dropped, and the next call opens another. Every call
//! runs on the caller's thread (the relay calls stores on its blocking
//! pool), and every query has a statement timeout.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use postgres::{Client, NoTls, Statement, Transaction};
use syncline_core::{RoomId, Signature};
use syncline_store::{
    Batch, RoomBytes, Segment, Store, StoreError, StoredRoom, StoredTail, appended, check_expected,
};

/// The schema this version writes; older ones are migrated on open.
const SCHEMA: i32 = 1;

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

/// Creates a room's row if need be and locks it; its key and node count.
const LOCK_ROOM: &str = "INSERT INTO syncline_rooms (name) VALUES ($1) \
    ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING key, node_count";

/// Appends segments (starts, lengths, packs as arrays) and sets the room's
/// node count.
const APPEND: &str = "WITH appended AS ( \
        INSERT INTO syncline_segments (room, start, count, pack) \
        SELECT $1, * FROM unnest($2::BIGINT[], $3::BIGINT[], $4::BYTEA[])) \
    UPDATE syncline_rooms SET node_count = $5 WHERE key = $1";

/// [`APPEND`] in one statement of its own, if the room still holds `$2`
/// nodes: 1 if it did (and the segments went in), 0 if not (nothing did).
const FAST_APPEND: &str = "WITH moved AS ( \
        UPDATE syncline_rooms SET node_count = $3 WHERE key = $1 AND node_count = $2 \
        RETURNING key), \
    appended AS ( \
        INSERT INTO syncline_segments (room, start, count, pack) \
        SELECT $1, * FROM unnest($4::BIGINT[], $5::BIGINT[], $6::BYTEA[]) \
        WHERE EXISTS (SELECT 1 FROM moved)) \
    SELECT count(*) FROM moved";

/// Adds signatures (the first held for a node stays).
const SIGN: &str = "INSERT INTO syncline_signatures (room, node, sig) \
    SELECT $1, * FROM unnest($2::BIGINT[], $3::BYTEA[]) ON CONFLICT DO NOTHING";

const OUTBOX_ADD: &str = "INSERT INTO syncline_outbox (room, seq) \
    SELECT $1, unnest($2::BIGINT[]) ON CONFLICT DO NOTHING";

const OUTBOX_REMOVE: &str = "DELETE FROM syncline_outbox WHERE room = $1 AND seq = ANY($2)";

const PUT_CHECKPOINT: &str = "INSERT INTO syncline_checkpoints (room, bytes) VALUES ($1, $2) \
    ON CONFLICT (room) DO UPDATE SET bytes = EXCLUDED.bytes";

/// How a [`PgStore`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections the store opens at most; callers beyond wait.
    pub connections: usize,
    /// How long one statement may run before PostgreSQL cancels it.
    pub statement_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            connections: 8,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
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

/// The [`Store`] on a PostgreSQL database (see the module docs).
pub struct PgStore {
    config: postgres::Config,
    options: PgOptions,
    /// Idle connections, and how many are open in all.
    pool: Mutex<(Vec<Conn>, usize)>,
    /// Each room's key and node count as this store last committed it:
    /// the next append to it goes in one round trip if no other writer
    /// moved it on ([`PgStore::fast_append`]).
    seen: Mutex<HashMap<RoomId, (i64, u64)>>,
    returned: Condvar,
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
        None => StoreError::Io(format!("postgres: {e}")),
    }
}

/// A room's number as stored (`BIGINT`).
fn int(n: u64) -> i64 {
    i64::try_from(n).expect("counts fit in a BIGINT")
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`)
    /// and creates or migrates Syncline's tables.
    pub fn open(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Io(format!("postgres URL {url:?}: {e}")))?;
        config
            .connect_timeout(options.connect_timeout)
            .options(&format!(
                "-c statement_timeout={}",
                options.statement_timeout.as_millis()
            ))
            .application_name("syncline");
        let store = PgStore {
            config,
            options,
            pool: Mutex::new((Vec::new(), 0)),
            seen: Mutex::new(HashMap::new()),
            returned: Condvar::new(),
        };
        store.with(|conn| migrate(&mut conn.client))?;
        Ok(store)
    }

    /// Runs `f` on a pooled connection; a connection that failed is not
    /// pooled again. Calls block: from async code, call them on a blocking
    /// thread (`spawn_blocking`).
    fn with<R>(&self, f: impl FnOnce(&mut Conn) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut conn = self.take()?;
        let result = f(&mut conn);
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if conn.client.is_closed() {
            pool.1 -= 1;
            off_thread(conn);
        } else {
            pool.0.push(conn);
        }
        self.returned.notify_one();
        result
    }

    fn take(&self) -> Result<Conn, StoreError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(conn) = pool.0.pop() {
                return Ok(conn);
            }
            if pool.1 < self.options.connections.max(1) {
                pool.1 += 1;
                drop(pool);
                let opened = self.config.connect(NoTls).map_err(sql);
                if opened.is_err() {
                    self.pool.lock().unwrap_or_else(|p| p.into_inner()).1 -= 1;
                }
                return opened.map(|client| Conn {
                    client,
                    statements: HashMap::new(),
                });
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
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

    /// Claims the database for one relay: `Ok(None)` if another holds it.
    /// The claim (a session advisory lock on a connection of its own)
    /// lasts as long as the returned [`Claim`] and ends with its process.
    pub fn claim(&self) -> Result<Option<Claim>, StoreError> {
        let mut claim = Claim {
            config: self.config.clone(),
            client: None,
        };
        Ok(claim.renew()?.then_some(claim))
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

/// One relay's hold on a database ([`PgStore::claim`]): released when
/// dropped, or when its connection ends (PostgreSQL restarted): see
/// [`Claim::renew`].
pub struct Claim {
    config: postgres::Config,
    client: Option<Client>,
}

impl Claim {
    /// Checks that the claim still holds, taking it again on a new
    /// connection if its connection ended: `Ok(false)` if another relay
    /// took the database meanwhile (this one must stop serving it).
    pub fn renew(&mut self) -> Result<bool, StoreError> {
        if let Some(client) = &mut self.client
            && client.simple_query("SELECT 1").is_ok()
        {
            return Ok(true);
        }
        off_thread(self.client.take());
        let mut client = self.config.connect(NoTls).map_err(sql)?;
        let held: bool = client
            .query_one("SELECT pg_try_advisory_lock(1398361668)", &[])
            .map_err(sql)?
            .get(0);
        if held {
            self.client = Some(client);
        } else {
            off_thread(client);
        }
        Ok(held)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        off_thread(self.client.take());
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        off_thread(std::mem::take(&mut pool.0));
    }
}

/// Drops `value` (connections, each with the runtime of the blocking
/// client) on a thread of its own: dropping a runtime inside an async
/// task panics, and a relay drops its store from one.
fn off_thread<T: Send + 'static>(value: T) {
    std::thread::spawn(move || drop(value));
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").finish_non_exhaustive()
    }
}

/// Creates the tables, or migrates older ones, once: relays starting
/// together take an advisory lock.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(sql)?;
    // "SYNC" as a number: the lock is Syncline's.
    tx.execute("SELECT pg_advisory_xact_lock(1398361667)", &[])
        .map_err(sql)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS syncline_schema (version INT NOT NULL)")
        .map_err(sql)?;
    let version: Option<i32> = tx
        .query_opt("SELECT version FROM syncline_schema", &[])
        .map_err(sql)?
        .map(|row| row.get(0));
    match version {
        None => {
            tx.batch_execute(MIGRATION_1).map_err(sql)?;
            tx.execute(
                "INSERT INTO syncline_schema (version) VALUES ($1)",
                &[&SCHEMA],
            )
            .map_err(sql)?;
        }
        Some(SCHEMA) => {}
        Some(v) => {
            return Err(StoreError::Corrupt(format!(
                "the database holds Syncline schema {v}; this version reads {SCHEMA}"
            )));
        }
    }
    tx.commit().map_err(sql)
}

/// The room's key and node count, if it is stored.
fn room_row(tx: &mut Transaction<'_>, room: &RoomId) -> Result<Option<(i64, u64)>, StoreError> {
    Ok(tx
        .query_opt(
            "SELECT key, node_count FROM syncline_rooms WHERE name = $1",
            &[&room.as_str()],
        )
        .map_err(sql)?
        .map(|row| (row.get(0), row.get::<_, i64>(1) as u64)))
}

fn segments_from(
    tx: &mut Transaction<'_>,
    key: i64,
    from: u64,
) -> Result<Vec<Segment>, StoreError> {
    tx.query(
        "SELECT start, count, pack FROM syncline_segments \
         WHERE room = $1 AND start + count > $2 ORDER BY start",
        &[&key, &int(from)],
    )
    .map_err(sql)?
    .iter()
    .map(|row| {
        let (start, count): (i64, i64) = (row.get(0), row.get(1));
        let pack: Vec<u8> = row.get(2);
        Ok(Segment {
            start: u32::try_from(start).map_err(|_| corrupt("segment start"))?,
            len: u32::try_from(count).map_err(|_| corrupt("segment length"))?,
            pack: pack.into_boxed_slice(),
        })
    })
    .collect()
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} out of range"))
}

fn signatures_from(
    tx: &mut Transaction<'_>,
    key: i64,
    from: u64,
) -> Result<Vec<(u32, Signature)>, StoreError> {
    tx.query(
        "SELECT node, sig FROM syncline_signatures WHERE room = $1 AND node >= $2 ORDER BY node",
        &[&key, &int(from)],
    )
    .map_err(sql)?
    .iter()
    .map(|row| {
        let node = u32::try_from(row.get::<_, i64>(0)).map_err(|_| corrupt("node number"))?;
        let sig: Vec<u8> = row.get(1);
        let sig = <[u8; 64]>::try_from(sig.as_slice())
            .map_err(|_| StoreError::Corrupt(format!("signature of {} bytes", sig.len())))?;
        Ok((node, Signature(sig)))
    })
    .collect()
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
    /// transaction): the room's count is moved on only if it is still what
    /// was seen, and the segments go in only if it was. `None` when the
    /// batch or the room is not for this path (or another writer moved the
    /// room on): the caller takes the general one.
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
        let starts: Vec<i64> = new.iter().map(|s| i64::from(s.start)).collect();
        let lens: Vec<i64> = new.iter().map(|s| i64::from(s.len)).collect();
        let packs: Vec<&[u8]> = new.iter().map(|s| &s.pack[..]).collect();
        let moved: i64 = self.with(|conn| {
            let statement = conn.prepared(FAST_APPEND)?;
            Ok(conn
                .client
                .query_one(
                    &statement,
                    &[&key, &int(seen), &int(count), &starts, &lens, &packs],
                )
                .map_err(sql)?
                .get(0))
        })?;
        if moved == 1 {
            self.saw(room, key, count);
            Ok(Some(Ok(())))
        } else {
            Ok(None)
        }
    }

    fn seen_lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoomId, (i64, u64)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This store saw `room` (key `key`) hold `count` nodes.
    fn saw(&self, room: &RoomId, key: i64, count: u64) {
        self.seen_lock().insert(room.clone(), (key, count));
    }
}

impl Store for PgStore {
    fn commit(&self, room: &RoomId, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(done) = self.fast_append(room, &batch)? {
            return done;
        }
        self.with(|conn| {
            let lock_room = conn.prepared(LOCK_ROOM)?;
            let append = conn.prepared(APPEND)?;
            let sign = conn.prepared(SIGN)?;
            let outbox_add = conn.prepared(OUTBOX_ADD)?;
            let outbox_remove = conn.prepared(OUTBOX_REMOVE)?;
            let put_checkpoint = conn.prepared(PUT_CHECKPOINT)?;
            let mut tx = conn.client.transaction().map_err(sql)?;
            // The room's row, locked until the commit: one writer per room
            // at a time, whichever relay it runs on.
            let row = tx.query_one(&lock_room, &[&room.as_str()]).map_err(sql)?;
            let (key, stored): (i64, i64) = (row.get(0), row.get(1));
            let stored = stored as u64;
            check_expected(stored, batch.expect_nodes)?;
            let new = appended(stored, &batch.segments)?;
            let count = new.last().map_or(stored, |s| u64::from(s.start + s.len));
            if !new.is_empty() {
                // Every new segment and the room's count, in one statement.
                let starts: Vec<i64> = new.iter().map(|s| i64::from(s.start)).collect();
                let lens: Vec<i64> = new.iter().map(|s| i64::from(s.len)).collect();
                let packs: Vec<&[u8]> = new.iter().map(|s| &s.pack[..]).collect();
                tx.execute(&append, &[&key, &starts, &lens, &packs, &int(count)])
                    .map_err(sql)?;
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
                tx.execute(&put_checkpoint, &[&key, checkpoint])
                    .map_err(sql)?;
            }
            tx.commit().map_err(sql)?;
            self.saw(room, key, count);
            Ok(())
        })
    }

    fn load(&self, room: &RoomId) -> Result<StoredRoom, StoreError> {
        self.read(|tx| {
            let Some((key, _)) = room_row(tx, room)? else {
                return Ok(StoredRoom::default());
            };
            Ok(StoredRoom {
                segments: segments_from(tx, key, 0)?,
                signatures: signatures_from(tx, key, 0)?,
                checkpoint: checkpoint(tx, key)?,
                outbox: outbox(tx, key)?,
            })
        })
    }

    fn load_tail(&self, room: &RoomId, from: u64) -> Result<StoredTail, StoreError> {
        self.read(|tx| {
            let Some((key, _)) = room_row(tx, room)? else {
                return Ok(StoredTail::default());
            };
            let checkpointed = checkpoint(tx, key)?
                .as_deref()
                .and_then(|c| syncline_core::checkpoint::header(c).ok())
                .map_or(0, |h| h.nodes);
            Ok(StoredTail {
                segments: segments_from(tx, key, from)?,
                signatures: signatures_from(tx, key, from)?,
                outbox: outbox(tx, key)?,
                checkpointed,
            })
        })
    }

    fn node_count(&self, room: &RoomId) -> Result<u64, StoreError> {
        self.read(|tx| Ok(room_row(tx, room)?.map_or(0, |(_, n)| n)))
    }

    fn room_bytes(&self, room: &RoomId) -> Result<RoomBytes, StoreError> {
        self.read(|tx| {
            let Some((key, _)) = room_row(tx, room)? else {
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
                "SELECT name FROM syncline_rooms WHERE node_count > 0 ORDER BY name COLLATE \"C\"",
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
