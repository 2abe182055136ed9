//! The Syncline relay server as a library (`syncline serve` only parses
//! arguments and calls [`Server::bind`] and [`Server::run`]).
//!
//! Clients connect over WebSocket (`/ws`, binary frames, one envelope per
//! frame; many rooms' sessions over one connection, told apart by the
//! envelope's session id). Each loaded room is an actor on its own thread
//! (`rooms.rs`): it owns the room's durable history and its sessions, runs
//! the sans-IO sessions of `syncline_core::proto::session`, persists every
//! node a frame inserted before anything is acknowledged or relayed, and
//! relays inserted nodes to the room's other sessions (each filtered by its
//! subscription). Rooms load on demand and unload when idle. Blocking
//! storage work stays on the room threads; connections are tokio tasks.
//!
//! `GET /healthz` answers `ok`; `GET /metrics` is Prometheus text.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use syncline_core::proto::session::Config as SessionConfig;
use syncline_store::{Replica, SqliteOptions, SqliteStore, Store};
use thiserror::Error;
use tokio::net::TcpListener;

mod conn;
mod rooms;
mod telemetry;

use rooms::Rooms;

/// How a relay runs.
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
    /// Frames queued for one connection before it counts as lagging and
    /// is closed (its client reconnects and catches up).
    pub outbound_queue: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./syncline-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            session: SessionConfig::default(),
            room_idle: Duration::from_secs(30),
            outbound_queue: 1024,
        }
    }
}

/// Why the relay could not start or stopped.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The data directory could not be created.
    #[error("cannot use data directory {dir}: {source}")]
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] syncline_store::StoreError),
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
    /// Serving failed.
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

/// A bound relay, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    rooms: Arc<Rooms>,
    config: Config,
}

impl Server {
    /// Opens the store under `config.data_dir` (creating it) and binds the
    /// listening socket.
    pub async fn bind(config: Config) -> Result<Server, RelayError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| RelayError::DataDir {
            dir: dir.clone(),
            source,
        })?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
            &dir.join("relay.db"),
            SqliteOptions::default(),
        )?);
        let key = Replica::open_with_os_identity(store.clone())?.key().clone();
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| RelayError::Listen {
                    addr: config.listen,
                    source,
                })?;
        telemetry::install();
        let rooms = Rooms::new(store, key, config.clone());
        Ok(Server {
            listener,
            rooms,
            config,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every session with
    /// `shutting_down` (everything acknowledged is already durable) and
    /// returns once the rooms are unloaded.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RelayError> {
        let state = Arc::new(conn::State::new(self.rooms.clone(), self.config.clone()));
        let app = Router::new()
            .route("/ws", get(conn::upgrade))
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(telemetry::render))
            .with_state(state.clone());
        let rooms = self.rooms.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: closing sessions");
            // Closing the sessions ends the WebSocket connections, which
            // lets the HTTP server finish.
            let rooms = rooms.clone();
            let _ = tokio::task::spawn_blocking(move || rooms.shutdown()).await;
            state.close_all();
        };
        // Frames are small and answer one another: without TCP_NODELAY a
        // welcome can sit behind the peer's delayed ACK for 40 ms.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await
            .map_err(RelayError::Serve)?;
        let rooms = self.rooms.clone();
        let _ = tokio::task::spawn_blocking(move || rooms.shutdown()).await;
        Ok(())
    }
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
