//! The Syncline relay server as a library (`syncline serve` only parses
//! arguments and calls [`Server::bind`] and [`Server::run`]).
//!
//! Clients connect over WebSocket (`/ws`, binary frames, one envelope per
//! frame; many rooms' sessions over one connection, told apart by the
//! envelope's session id). Each loaded room is a task (`rooms.rs`) that owns
//! a [`syncline_hub::RoomHub`]: the room's durable history and its server
//! sessions, which persists every node a frame inserted before anything is
//! acknowledged or relayed, and relays inserted nodes to the room's other
//! sessions (each filtered by its subscription). The hub's blocking work
//! runs on a bounded pool; rooms load on demand and unload when idle.
//!
//! Every resource a peer can make the relay spend has a bound in
//! [`Config`], with a metric and a typed refusal (`docs/security.md`).
//!
//! `GET /healthz` answers `ok`; `GET /metrics` is Prometheus text, for an
//! admin token or on [`Config::metrics_listen`] (`admin.rs`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use syncline_core::auth::{Policy, RoomPattern};
use syncline_core::proto::session::Config as SessionConfig;
use syncline_core::{AuthorId, Keypair};
use syncline_postgres::{PgOptions, PgStore};
use syncline_store::{Replica, SqliteOptions, SqliteStore, Store};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// A key blobs are encrypted with at rest (for [`Config::blob_keys`]).
pub use syncline_store::BlobKey;

pub use fleet::BusError;

mod admin;
mod blob_http;
mod conn;
mod fleet;
mod limits;
mod rooms;
mod telemetry;

use limits::ConnLimits;
use rooms::Rooms;

/// How a relay runs, and what it lets a peer spend.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the embedded SQLite store lives.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Session timers and sizes.
    pub session: SessionConfig,
    /// Unload a room that has had no session for this long.
    pub room_idle: Duration,
    /// Most rooms loaded at once. Past it, rooms without sessions unload
    /// and a `hello` for another room is refused with `overloaded`.
    pub max_rooms: usize,
    /// Room steps (load, batch, timers) running at once, each on a thread
    /// of the blocking pool.
    pub room_workers: usize,
    /// Bytes of frames waiting in one room's inbox; a connection that
    /// cannot queue a frame within `inbox_wait` is closed `overloaded`.
    pub room_inbox_bytes: usize,
    /// See `room_inbox_bytes`.
    pub inbox_wait: Duration,
    /// Bytes of frames a timer sweep of one room produces before the room
    /// checks its inbox again (catch-ups take turns with `hello`s).
    pub slice_bytes: usize,
    /// Bytes queued for one connection; past it the connection is closed
    /// `lagging` (its client reconnects and catches up).
    pub outbound_queue_bytes: usize,
    /// Bytes queued for all connections together: past it, the connection
    /// whose frame does not fit is closed `lagging`.
    pub outbound_total_bytes: usize,
    /// Bytes that packs being stepped may inflate to, for all rooms
    /// together (what each declares, at most 32 times its size or 8 MiB,
    /// and at most 64 MiB): a batch waits until its share is free.
    pub inflate_budget_bytes: usize,
    /// A write to a peer that takes longer than this closes it `lagging`.
    pub write_timeout: Duration,
    /// Most connections open at once (keep it below the process's file
    /// descriptor limit).
    pub max_connections: usize,
    /// Most connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// A connection must send its HTTP request headers within this.
    pub upgrade_timeout: Duration,
    /// A WebSocket connection must open a session within this.
    pub session_wait: Duration,
    /// Most sessions one connection opens.
    pub max_sessions_per_conn: usize,
    /// Most sessions the connections of one IP address open together
    /// (keep it below `max_rooms`, so one peer cannot fill the rooms).
    pub max_sessions_per_ip: usize,
    /// Frame bytes per second one connection may send, on average...
    pub peer_bytes_per_sec: u64,
    /// ...and at most at once; past it, the connection is closed
    /// `rate_limited`.
    pub peer_burst_bytes: u64,
    /// Bytes of history (and checkpoint) one room may hold; past it, a
    /// session that sends a pack is closed `quota_exceeded`.
    pub max_room_bytes: u64,
    /// Bytes the store's files may take; past it, every room refuses packs
    /// with `quota_exceeded` (checked every second).
    pub max_store_bytes: u64,
    /// Bytes of blobs the relay keeps (`data_dir/blobs`); past it, a
    /// `blob-put` is refused `quota_exceeded`.
    pub max_blob_bytes: u64,
    /// Keys blobs are encrypted with at rest (none: stored in the clear);
    /// the last is the one new blobs use, the others read older blobs.
    pub blob_keys: Vec<BlobKey>,
    /// Keep rooms in this PostgreSQL database
    /// (`postgres://user@host:port/db`) instead of `data_dir/relay.db`
    /// (the data directory still holds blobs and the key file). Any
    /// number of relays may share one database and its rooms: a fleet.
    pub postgres: Option<String>,
    /// With `postgres`: the NATS server (`nats://host:4222`) relays of the
    /// fleet tell one another of their commits through (`None`: they
    /// learn of them by [`Config::fleet_poll`] alone).
    pub nats: Option<String>,
    /// The subject prefix of the fleet's notices (fleets sharing a NATS
    /// server use prefixes of their own).
    pub nats_prefix: String,
    /// With `postgres`: how often the relay checks its loaded rooms
    /// against the database, catching up with writes whose notice it
    /// missed (or every write, without NATS).
    pub fleet_poll: Duration,
    /// How long a direct blob URL (`blob-grant`) may be used; `None`: the
    /// relay serves no URLs (blobs move over sessions only).
    pub blob_url_ttl: Option<Duration>,
    /// How often the relay removes blobs no room ever referenced...
    pub blob_gc_every: Duration,
    /// ...once they are this old (an upload whose node is still to come
    /// is kept this long).
    pub blob_gc_grace: Duration,
    /// Presence updates one session may send at once...
    pub presence_burst: u32,
    /// ...and per second, sustained; past it, an update is dropped with
    /// `error{rate_limited}` (the session goes on).
    pub presence_per_sec: u32,
    /// Nodes per second one connection may have inserted, on average...
    pub peer_nodes_per_sec: u64,
    /// ...and at most at once; past it, the connection is closed
    /// `rate_limited` (after the batch that went past: what it inserted is
    /// durable and acknowledged).
    pub peer_burst_nodes: u64,
    /// Rooms anyone may open, read and write (with a proven key, no
    /// capability); every other room is locked. Default: every room (`*`).
    pub open_rooms: Vec<RoomPattern>,
    /// Serve open rooms on an address other peers can reach. Without it,
    /// binding a non-loopback address with any open room fails with
    /// [`RelayError::OpenOnNetwork`]: lock them, or say so.
    pub open_on_network: bool,
    /// Keys besides the relay's own whose capabilities it trusts (an app
    /// backend minting tokens with `syncline_core::auth`).
    pub trusted_keys: Vec<AuthorId>,
    /// A loopback address serving `/metrics` (and `/healthz`) without a
    /// token; on the main address `/metrics` needs an admin token.
    pub metrics_listen: Option<SocketAddr>,
    /// At shutdown, how long rooms may take to close their sessions and
    /// write checkpoints before the server stops anyway.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Config {
        let session = SessionConfig::default();
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Config {
            data_dir: PathBuf::from("./syncline-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            room_idle: Duration::from_secs(30),
            max_rooms: 10_000,
            room_workers: (2 * workers).max(4),
            room_inbox_bytes: 4 * session.max_frame,
            inbox_wait: Duration::from_secs(5),
            slice_bytes: 1 << 20,
            outbound_queue_bytes: 4 * session.max_frame,
            outbound_total_bytes: 512 << 20,
            inflate_budget_bytes: 256 << 20,
            write_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            upgrade_timeout: Duration::from_secs(5),
            session_wait: Duration::from_secs(10),
            max_sessions_per_conn: 256,
            max_sessions_per_ip: 1024,
            peer_bytes_per_sec: 32 << 20,
            peer_burst_bytes: 64 << 20,
            shutdown_grace: Duration::from_millis(1500),
            max_room_bytes: 4 << 30,
            max_blob_bytes: 10 << 30,
            blob_keys: Vec::new(),
            postgres: None,
            nats: None,
            nats_prefix: "syncline".to_owned(),
            fleet_poll: Duration::from_secs(1),
            blob_url_ttl: Some(Duration::from_secs(60)),
            blob_gc_every: Duration::from_secs(3600),
            blob_gc_grace: Duration::from_secs(24 * 3600),
            presence_burst: 10,
            presence_per_sec: 5,
            open_rooms: vec![RoomPattern::parse("*").expect("* is a room pattern")],
            open_on_network: false,
            trusted_keys: Vec::new(),
            metrics_listen: None,
            peer_nodes_per_sec: 20_000,
            peer_burst_nodes: 200_000,
            max_store_bytes: u64::MAX,
            session,
        }
    }
}

/// Why the relay could not start or stopped.
#[derive(Debug, Error)]
pub enum RelayError {
    /// A non-loopback address with open rooms and without
    /// [`Config::open_on_network`]: anyone who reaches it could read and
    /// write them.
    #[error(
        "refusing to serve open rooms ({rooms}) on {addr}: anyone who reaches this address \
         could read and write them; leave rooms locked (drop --open-room), or pass --open \
         to serve open rooms anyway"
    )]
    OpenOnNetwork {
        /// The address.
        addr: SocketAddr,
        /// The open room patterns.
        rooms: String,
    },
    /// `nats` without `postgres`: a fleet shares its rooms through one
    /// database.
    #[error(
        "--nats needs --postgres: relays of a fleet share their rooms through one PostgreSQL \
         database, and NATS only tells them when it changed"
    )]
    NatsWithoutPostgres,
    /// The fleet's bus could not start.
    #[error(transparent)]
    Bus(#[from] fleet::BusError),
    /// The data directory could not be created.
    #[error("cannot use data directory {dir}: {source}")]
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `metrics_listen` on an address others can reach: metrics without a
    /// token belong on loopback.
    #[error(
        "refusing to serve metrics without a token on {0}: use a loopback address \
         (127.0.0.1:PORT), or scrape /metrics on the main address with an admin token"
    )]
    MetricsOnNetwork(SocketAddr),
    /// The relay's key file could not be read or written.
    #[error(
        "relay key file {path}: {source} (`syncline serve --data DIR` writes it on its first run)"
    )]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] syncline_store::StoreError),
    /// The blob store could not be opened.
    #[error("cannot open the blob store: {0}")]
    Blobs(#[from] syncline_store::BlobStoreError),
    /// The relay identity could not be read or made.
    #[error("cannot open the relay identity: {0}")]
    Identity(#[from] syncline_store::ReplicaError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A bound relay, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    /// What the store takes on disk, for `max_store_bytes`.
    store: StoreSize,
    /// The fleet's bus (with `nats`).
    bus: Option<fleet::Bus>,
    rooms: Arc<Rooms>,
    config: Config,
    server_key: AuthorId,
    metrics_listener: Option<TcpListener>,
}

impl Server {
    /// Opens the store under `config.data_dir` (creating it) and binds the
    /// listening socket.
    pub async fn bind(config: Config) -> Result<Server, RelayError> {
        if !config.listen.ip().is_loopback()
            && !config.open_rooms.is_empty()
            && !config.open_on_network
        {
            let rooms: Vec<&str> = config.open_rooms.iter().map(RoomPattern::as_str).collect();
            return Err(RelayError::OpenOnNetwork {
                addr: config.listen,
                rooms: rooms.join(", "),
            });
        }
        if let Some(addr) = config.metrics_listen
            && !addr.ip().is_loopback()
        {
            return Err(RelayError::MetricsOnNetwork(addr));
        }
        if config.nats.is_some() && config.postgres.is_none() {
            return Err(RelayError::NatsWithoutPostgres);
        }
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| RelayError::DataDir {
            dir: dir.clone(),
            source,
        })?;
        // Stores block: opened on a blocking thread.
        let (postgres, db_dir, workers) =
            (config.postgres.clone(), dir.clone(), config.room_workers);
        let opened =
            tokio::task::spawn_blocking(move || open_store(postgres.as_deref(), &db_dir, workers))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let Opened { store, size, key } = opened?;
        let (fleet, bus) = match &config.nats {
            Some(url) => {
                let (fleet, bus) = fleet::connect(url, &config.nats_prefix).await?;
                (fleet, Some(bus))
            }
            None => (fleet::Fleet::alone(), None),
        };
        write_key_file(&dir, &key)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RelayError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RelayError::Listen { addr, source })?,
            ),
            None => None,
        };
        telemetry::install();
        let server_key = key.author();
        let blobs = Arc::new(syncline_store::BlobStore::open(
            &dir.join("blobs"),
            syncline_store::BlobStoreOptions {
                max_bytes: config.max_blob_bytes,
                keys: config.blob_keys.clone(),
                current_key: config.blob_keys.last().map(|k| k.id),
                ..syncline_store::BlobStoreOptions::default()
            },
        )?);
        let grants = config
            .blob_url_ttl
            .map(|ttl| Arc::new(blob_http::Grants::new(&key.seed(), ttl)));
        let rooms = Rooms::new(store, blobs, grants, key, config.clone(), fleet);
        Ok(Server {
            listener,
            store: size,
            bus,
            rooms,
            config,
            server_key,
            metrics_listener,
        })
    }

    /// The key of the relay whose data directory is `data_dir` (its
    /// `relay.key`, written by its first run): `syncline token issue`
    /// signs with it, also while the relay runs.
    pub fn key_in(data_dir: &std::path::Path) -> Result<Keypair, RelayError> {
        let path = data_dir.join(KEY_FILE);
        let failed = |source| RelayError::KeyFile {
            path: path.clone(),
            source,
        };
        let text = std::fs::read_to_string(&path).map_err(failed)?;
        let seed = syncline_core::ids::from_hex::<32>(text.trim()).ok_or_else(|| {
            failed(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not 64 hex digits",
            ))
        })?;
        Ok(Keypair::from_seed(seed))
    }

    /// Revokes capability `id` at the relay whose data directory is
    /// `data_dir` (appends it to the `revoked` list there): a running relay
    /// refuses it and closes the sessions resting on it within a second.
    /// (For a fleet, [`Server::revoke_in_database`] reaches every relay.)
    pub fn revoke_in(data_dir: &std::path::Path, id: &[u8; 16]) -> std::io::Result<()> {
        admin::append_revoked(data_dir, id)
    }

    /// Revokes capability `id` for every relay on the PostgreSQL database
    /// at `url` (a fleet): each refuses it, and closes the sessions
    /// resting on it, within a second. Blocks: call it from a thread, not
    /// from async code.
    pub fn revoke_in_database(url: &str, id: &[u8; 16]) -> Result<(), RelayError> {
        let store = PgStore::open_existing(url, PgOptions::default())?;
        Ok(admin::revoke_in_store(&store, id)?)
    }

    /// The relay's public key: capabilities it issues (and that name it as
    /// their root) are trusted here.
    pub fn public_key(&self) -> AuthorId {
        self.server_key
    }

    /// The address `/metrics` is served on without a token, if
    /// [`Config::metrics_listen`] asked for one (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref()?.local_addr().ok()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every session with
    /// `shutting_down` (everything acknowledged is already durable) and
    /// returns once the rooms are unloaded, or after
    /// [`Config::shutdown_grace`] whatever they are doing.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RelayError> {
        let config = self.config;
        let store = self.rooms.store();
        let mut revoked = admin::read_revoked(&config.data_dir);
        revoked.extend(
            tokio::task::spawn_blocking(move || admin::stored_revoked(store.as_ref()))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?,
        );
        let policy = Policy {
            open: config.open_rooms.clone(),
            roots: self.rooms.roots().to_vec(),
            revoked,
        };
        let state = Arc::new(conn::State::new(
            self.rooms.clone(),
            config.clone(),
            policy,
            self.server_key,
        ));
        let app = Router::new()
            .route("/ws", get(conn::upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(admin::metrics))
            .route("/admin/invites", axum::routing::post(admin::create_invite))
            .route("/invites/redeem", axum::routing::post(admin::redeem_invite))
            .with_state(state.clone());
        let app = match self.rooms.blob_http(config.write_timeout) {
            Some(blobs) => app.merge(
                Router::new()
                    .route("/blobs/{hash}", get(blob_http::get).put(blob_http::put))
                    .with_state(blobs),
            ),
            None => app,
        };
        let revocations =
            tokio::spawn(admin::watch_revoked(state.clone(), config.data_dir.clone()));
        let metrics_listener = match self.metrics_listener {
            Some(listener) => {
                let app = Router::new()
                    .route("/metrics", get(telemetry::render))
                    .route("/healthz", get(|| async { "ok" }));
                Some(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        warn!(error = %e, "the metrics listener failed");
                    }
                }))
            }
            None => None,
        };
        let limits = ConnLimits::new(
            config.max_connections,
            config.max_connections_per_ip,
            config.max_sessions_per_ip,
        );
        let (stop, stopping) = watch::channel(false);
        let blob_gc = tokio::spawn(collect_blob_garbage(
            self.rooms.blobs(),
            config.blob_gc_every,
            config.blob_gc_grace,
        ));
        let quota = tokio::spawn(watch_store_size(
            self.store.clone(),
            self.rooms.clone(),
            config.max_store_bytes,
        ));
        let fleet = match &self.store {
            StoreSize::Postgres(pg) => Some(tokio::spawn({
                info!(
                    notices = config.nats.as_ref().map_or("none (polling alone)".to_owned(), |_| {
                        format!("NATS, subjects {}.room.*", config.nats_prefix)
                    }),
                    poll = ?config.fleet_poll,
                    "rooms shared with every relay on this PostgreSQL database"
                );
                fleet::run(self.rooms.clone(), pg.clone(), self.bus, config.fleet_poll)
            })),
            StoreSize::Sqlite(_) => None,
        };
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            while connections.try_join_next().is_some() {}
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to close.
                    warn!(error = %e, "cannot accept a connection");
                    metrics::counter!(telemetry::REFUSED, "why" => "accept").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match limits.admit(addr.ip()) {
                Ok(slot) => slot,
                Err(full) => {
                    debug!(%addr, why = full.as_str(), "connection refused");
                    metrics::counter!(telemetry::REFUSED, "why" => full.as_str()).increment(1);
                    continue;
                }
            };
            // Frames are small and answer one another: without TCP_NODELAY
            // a welcome can sit behind the peer's delayed ACK for 40 ms.
            if let Err(e) = tcp.set_nodelay(true) {
                warn!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
            let app = app.clone();
            let upgrade_timeout = config.upgrade_timeout;
            let mut stopping = stopping.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |mut request| {
                    request.extensions_mut().insert(slot.clone());
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, request).await }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(upgrade_timeout);
                let served = http
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades();
                let mut served = std::pin::pin!(served);
                tokio::select! {
                    served = served.as_mut() => {
                        // A peer that never finished its request (the
                        // header timeout), or sent one that does not parse.
                        if let Err(e) = served {
                            debug!(%addr, error = %e, "HTTP connection failed");
                            metrics::counter!(telemetry::CONNECTIONS_CLOSED, "reason" => "http")
                                .increment(1);
                        }
                    }
                    () = stopped(&mut stopping) => {
                        served.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_millis(200), served).await;
                    }
                }
            });
        }
        quota.abort();
        blob_gc.abort();
        if let Some(fleet) = fleet {
            fleet.abort();
        }
        revocations.abort();
        if let Some(m) = metrics_listener {
            m.abort();
        }
        info!("shutting down: closing sessions");
        // Rooms close their sessions (queueing `close` frames), then the
        // connections end, flushing them within their write timeout.
        self.rooms.shutdown(config.shutdown_grace).await;
        state.close_all().await;
        stop.send_replace(true);
        // HTTP connections that never upgraded end gracefully.
        let drained = async { while connections.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
        Ok(())
    }
}

/// The file beside the store holding the relay's key seed (hex), readable
/// by its owner only.
pub(crate) const KEY_FILE: &str = "relay.key";

/// Writes the relay's key to [`KEY_FILE`] unless it is there: tools that
/// sign for the relay read it there while the store is locked by the
/// running relay.
fn write_key_file(dir: &std::path::Path, key: &Keypair) -> Result<(), RelayError> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        return Ok(());
    }
    let failed = |source| RelayError::KeyFile {
        path: path.clone(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(failed)?;
    std::io::Write::write_all(
        &mut file,
        format!("{}\n", syncline_core::ids::to_hex(&key.seed())).as_bytes(),
    )
    .and_then(|()| file.sync_all())
    .map_err(failed)
}

/// Every `every`, removes the blobs no room ever referenced that are
/// older than `grace` (see `BlobStore::collect_unreferenced`).
async fn collect_blob_garbage(
    blobs: Arc<syncline_store::BlobStore>,
    every: Duration,
    grace: Duration,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticks.tick().await;
        let store = blobs.clone();
        let collected = tokio::task::spawn_blocking(move || {
            store.collect_unreferenced(grace, std::time::SystemTime::now())
        })
        .await;
        match collected {
            Ok(Ok(removed)) => {
                metrics::counter!(telemetry::BLOBS_COLLECTED).increment(removed.len() as u64);
                if !removed.is_empty() {
                    info!(blobs = removed.len(), "removed blobs no room references");
                }
            }
            Ok(Err(e @ syncline_store::BlobStoreError::NoRefIndex)) => {
                warn!(error = %e, "blob garbage collection is off");
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "blob garbage collection failed; trying again later"),
            Err(e) => warn!(error = %e, "blob garbage collection panicked"),
        }
    }
}

/// What [`open_store`] opened.
struct Opened {
    store: Arc<dyn Store>,
    size: StoreSize,
    key: Keypair,
}

/// The relay's store (PostgreSQL at `postgres`, else SQLite in `dir`),
/// where its size is read, and the relay's key (a fleet's, shared by its
/// relays: the first to start makes it).
fn open_store(
    postgres: Option<&str>,
    dir: &std::path::Path,
    workers: usize,
) -> Result<Opened, RelayError> {
    let (store, size): (Arc<dyn Store>, StoreSize) = match postgres {
        None => {
            let sqlite = Arc::new(SqliteStore::open(
                &dir.join("relay.db"),
                SqliteOptions::default(),
            )?);
            (sqlite.clone(), StoreSize::Sqlite(sqlite))
        }
        Some(url) => {
            // A connection per room step running, for its lock and for its
            // queries, and a few for everything else.
            let options = PgOptions {
                connections: workers + 4,
                lock_connections: workers + 4,
                ..PgOptions::default()
            };
            let pg = Arc::new(PgStore::open(url, options)?);
            (pg.clone(), StoreSize::Postgres(pg))
        }
    };
    // Relays starting together make one identity, not one each (the
    // lock's name is no room's: room names hold no spaces).
    let key = {
        let _one_at_a_time = store.lock("syncline identity")?;
        Replica::open_with_os_identity(store.clone())?.key().clone()
    };
    Ok(Opened { store, size, key })
}

/// Where the store's size on disk is read.
#[derive(Clone, Debug)]
enum StoreSize {
    Sqlite(Arc<SqliteStore>),
    Postgres(Arc<PgStore>),
}

impl StoreSize {
    fn bytes(&self) -> u64 {
        match self {
            StoreSize::Sqlite(s) => s.file_bytes(),
            // An unreadable size counts as none: the next look may read it.
            StoreSize::Postgres(p) => p.database_bytes().unwrap_or(0),
        }
    }
}

/// Checks every second whether the store passed `max` bytes on disk, and
/// tells the rooms.
async fn watch_store_size(store: StoreSize, rooms: Arc<Rooms>, max: u64) {
    loop {
        let s = store.clone();
        let bytes = tokio::task::spawn_blocking(move || s.bytes())
            .await
            .unwrap_or(0);
        metrics::gauge!(telemetry::STORE_BYTES).set(bytes as f64);
        let full = bytes >= max;
        let was = rooms
            .store_full
            .swap(full, std::sync::atomic::Ordering::Relaxed);
        if full && !was {
            warn!(
                bytes,
                max, "the store is out of its quota: packs are refused"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Completes once `stop` says `true`.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Completes on SIGINT or SIGTERM (what `syncline serve` waits for).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
