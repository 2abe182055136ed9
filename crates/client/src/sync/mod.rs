//! Background sync: one WebSocket to a relay carrying one session per room,
//! driven by a thread with its own tokio runtime (`engine.rs`); the
//! [`SyncHandle`] an app holds reads its status, waits for it (blocking or
//! async), and adds and removes rooms while it runs.
//!
//! The engine tries the endpoints in priority order; when a connection
//! fails or ends it waits (exponential backoff with jitter, reset by a
//! successful handshake) and starts again with a fresh handshake and
//! difference per room, so whatever was missed is caught up. Incoming
//! nodes are persisted before they are acknowledged (`with_room`), and
//! local commits reach the session directly from [`Room::transact`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use futures_util::Stream;
use syncline_core::auth::Capability;
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::Config as SessionConfig;
use tokio::sync::{Notify, watch};

use crate::lock::EngineLock;
use crate::replica::{Error, Replica, Room};

mod engine;

/// How to sync.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// WebSocket URLs of relays (`ws://host:port/ws`), tried in this order.
    pub endpoints: Vec<String>,
    /// First delay after a failure; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest delay between attempts.
    pub max_backoff: Duration,
    /// How long a connection attempt (TCP, TLS and the WebSocket upgrade)
    /// may take before the next endpoint is tried.
    pub connect_timeout: Duration,
    /// Session timers and sizes.
    pub session: SessionConfig,
    /// Where the capability for locked rooms comes from (`None`: open
    /// rooms only). Asked at every connection, so a source that fetches a
    /// fresh token refreshes an expired one: a session closed with
    /// `token_expired` reconnects with the next token, and the outbox
    /// resends whatever was not acknowledged.
    pub token: Option<TokenSource>,
    /// Move blob bytes over the relay's direct HTTP URLs when it serves
    /// them (faster for large blobs; every group is still checked), else
    /// over the session. A transfer whose URL fails goes on over the
    /// session.
    pub blob_urls: bool,
    /// Referenced blobs to fetch without being asked (`None`: a blob is
    /// fetched only by [`crate::Room::fetch_blob`]).
    pub prefetch: Option<Prefetch>,
}

/// Which referenced blobs the engine fetches as soon as it sees them:
/// those of at most `max_bytes` held by entries at paths matching one of
/// `paths` (`/photos/**`; `*` matches within one name; no patterns: every
/// path). Checked after each catch-up and as remote changes arrive (at
/// most once a second per room).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prefetch {
    /// The largest blob fetched.
    pub max_bytes: u64,
    /// Path patterns.
    pub paths: Vec<String>,
}

/// Where a room's capability token comes from: one token (`sl1.…`) for
/// every room, or a callback asked for each room at each connection (an
/// app fetching a fresh one from its backend), which may answer `None`
/// for an open room.
#[derive(Clone)]
pub struct TokenSource(TokenFn);

type TokenFn = Arc<dyn Fn(&str) -> Result<Option<String>, String> + Send + std::marker::Sync>;

impl TokenSource {
    /// Always this token.
    pub fn fixed(token: impl Into<String>) -> TokenSource {
        let token = token.into();
        TokenSource(Arc::new(move |_| Ok(Some(token.clone()))))
    }

    /// Calls `refresh(room)` for a token at each connection; an error is
    /// reported in [`Status::last_error`] and the connection retried after
    /// the backoff.
    ///
    /// ```no_run
    /// # fn fetch_token_from_backend(room: &str) -> Result<String, String> { Ok(room.into()) }
    /// let mut options = syncline::SyncOptions::new(&["ws://127.0.0.1:7700/ws"]);
    /// options.token = Some(syncline::TokenSource::refresh(|room| {
    ///     fetch_token_from_backend(room).map(Some)
    /// }));
    /// ```
    pub fn refresh(
        refresh: impl Fn(&str) -> Result<Option<String>, String> + Send + std::marker::Sync + 'static,
    ) -> TokenSource {
        TokenSource(Arc::new(refresh))
    }

    /// The token to present for `room` now, decoded.
    fn current(&self, room: &str) -> Result<Option<Vec<u8>>, String> {
        let Some(token) = (self.0)(room).map_err(|e| format!("no token for {room}: {e}"))? else {
            return Ok(None);
        };
        let cap =
            Capability::from_token(&token).map_err(|e| format!("bad token for {room}: {e}"))?;
        Ok(Some(cap.encode()))
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("TokenSource(..)")
    }
}

impl SyncOptions {
    /// Defaults for `endpoints`.
    pub fn new(endpoints: &[&str]) -> SyncOptions {
        SyncOptions {
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            session: SessionConfig::default(),
            token: None,
            blob_urls: true,
            prefetch: None,
        }
    }
}

/// What the sync engine is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Connected, with every room's handshake done.
    pub connected: bool,
    /// The endpoint in use (or last tried).
    pub endpoint: Option<String>,
    /// Every room has everything the server had at its handshake.
    pub caught_up: bool,
    /// Local nodes not yet acknowledged as durable by the server.
    pub unacknowledged: usize,
    /// Nodes of the current catch-ups still to arrive (known once each
    /// room's difference is).
    pub catching_up: u64,
    /// When the server last acknowledged nodes as durable.
    pub last_ack: Option<SystemTime>,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// The relay refused access to a room (`unauthorized`, or
    /// `token_expired` and the token source gave no fresh one): retrying
    /// with the same token will not help. Cleared by a handshake.
    pub refused: Option<String>,
    /// Some room's session on the current connection may only read (its
    /// token lacks `write`): local changes there stay in the outbox.
    pub read_only: bool,
    /// An answer retrying will not change: the last endpoint tried is no
    /// Syncline relay there (an HTTP 404 or another refusal of the
    /// WebSocket upgrade). Cleared by a handshake.
    pub fatal: Option<String>,
    /// Connection attempts that failed since the last handshake.
    pub failures: u32,
    /// While waiting to try again: how long the wait is.
    pub retry_in: Option<Duration>,
    /// Blobs of the synced rooms still to upload.
    pub blobs_uploading: usize,
    /// Blobs being fetched (asked for, or wanted by the prefetch policy)
    /// and not yet held whole.
    pub blobs_fetching: usize,
    /// Why the relay last refused a blob upload (a quota, access).
    pub blob_refused: Option<String>,
}

/// `url` as the engine dials it: `ws://` or `wss://`, a host, and a path
/// (`/ws` when none is given).
pub fn normalize_endpoint(url: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Url {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let trimmed = url.trim();
    let rest = match trimmed.split_once("://") {
        Some(("ws" | "wss", rest)) => rest,
        Some(("http" | "https", _)) => {
            return Err(bad("use ws:// (or wss://), e.g. ws://127.0.0.1:7700/ws"));
        }
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme}:// is not a WebSocket; use ws://HOST:PORT/ws"
            )));
        }
        None => return Err(bad("no scheme; use ws://HOST:PORT/ws")),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(bad("no host; use ws://HOST:PORT/ws"));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(bad(&format!("port {port:?} is not a number")));
    }
    let path = if path.is_empty() { "ws" } else { path };
    let scheme = trimmed.split_once("://").map_or("ws", |(s, _)| s);
    Ok(format!("{scheme}://{host}/{path}"))
}

/// What the handle and the engine thread share.
struct Shared {
    replica: Replica,
    /// The rooms to sync: the engine opens and closes sessions to match.
    rooms: Mutex<Vec<Room>>,
    /// Set when `rooms` changed since the engine last matched it.
    rooms_changed: AtomicBool,
    /// Sessions of rooms removed, for the engine to close.
    closing: Mutex<Vec<syncline_hub::ClientLink>>,
    options: SyncOptions,
    /// What the engine says of itself (the room counts are added when read).
    status: Mutex<Status>,
    /// Signalled whenever the status may have changed.
    status_changed: Condvar,
    /// The last status published, for async readers.
    published: watch::Sender<Status>,
    wake: Arc<Notify>,
    stop: AtomicBool,
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rooms(&self) -> Vec<Room> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The engine's status with the rooms' counts now.
    fn current(&self) -> Status {
        let mut status = self.status().clone();
        let rooms = self.rooms();
        status.unacknowledged = rooms.iter().map(|r| r.unacknowledged().unwrap_or(0)).sum();
        for room in &rooms {
            let state = room.shared.lock();
            status.blobs_uploading += state.transfers.uploading();
            status.blobs_fetching += state.transfers.fetching();
            if let Some(why) = &state.transfers.refused {
                status.blob_refused = Some(why.clone());
            }
        }
        status.catching_up = rooms
            .iter()
            .filter_map(|r| {
                Some(
                    r.shared
                        .lock()
                        .session
                        .as_ref()?
                        .session()
                        .catchup_remaining(),
                )
            })
            .sum();
        status
    }

    /// Tells waiting readers the status may have changed.
    fn publish(&self) {
        let now = self.current();
        self.published.send_if_modified(|last| {
            let changed = *last != now;
            *last = now;
            changed
        });
        self.status_changed.notify_all();
    }
}

/// A running sync; stops when dropped.
pub struct SyncHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// This process runs the replica's one sync engine while it holds it.
    engine: Option<EngineLock>,
}

impl std::fmt::Debug for SyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncHandle")
            .field("status", &self.status())
            .finish()
    }
}

impl Replica {
    /// Syncs `rooms` with the relay at `endpoints` (tried in order) in the
    /// background.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), syncline::Error> {
    /// let replica = syncline::Replica::open("./my-replica")?;
    /// // Tried in order; ws://HOST:PORT means ws://HOST:PORT/ws.
    /// let sync = replica.connect(&["ws://relay-a:7700", "ws://relay-b:7700"], &["notes"])?;
    /// sync.flush(std::time::Duration::from_secs(10))?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect(&self, endpoints: &[&str], rooms: &[&str]) -> Result<SyncHandle, Error> {
        self.connect_with(SyncOptions::new(endpoints), rooms)
    }

    /// [`Replica::connect`] with explicit options. Fails with
    /// [`Error::SyncRunning`] if another process syncs this replica, and
    /// with [`Error::Url`] for an endpoint that can never work.
    pub fn connect_with(&self, options: SyncOptions, rooms: &[&str]) -> Result<SyncHandle, Error> {
        if options.endpoints.is_empty() {
            return Err(Error::NoEndpoint);
        }
        if let Some(prefetch) = &options.prefetch {
            Scope::parse(&prefetch.paths).map_err(|source| Error::Pattern {
                pattern: prefetch.paths.join(" "),
                source,
            })?;
        }
        let mut options = options;
        options.endpoints = options
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e))
            .collect::<Result<_, _>>()?;
        let rooms = rooms
            .iter()
            .map(|r| self.room(r))
            .collect::<Result<Vec<Room>, Error>>()?;
        let engine = self.locks().engine()?;
        let wake = Arc::new(Notify::new());
        for room in &rooms {
            room.shared.set_wake(Some(wake.clone()));
        }
        let shared = Arc::new(Shared {
            replica: self.clone(),
            rooms: Mutex::new(rooms),
            rooms_changed: AtomicBool::new(false),
            closing: Mutex::new(Vec::new()),
            options,
            status: Mutex::new(Status::default()),
            status_changed: Condvar::new(),
            published: watch::Sender::new(Status::default()),
            wake,
            stop: AtomicBool::new(false),
        });
        let driven = shared.clone();
        let thread = std::thread::Builder::new()
            .name("syncline sync".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(engine::run(driven));
            })
            .map_err(Error::Thread)?;
        Ok(SyncHandle {
            shared,
            thread: Some(thread),
            engine,
        })
    }
}

/// Whether `status` says everything is synced.
fn settled(status: &Status) -> bool {
    status.connected
        && status.caught_up
        && status.unacknowledged == 0
        && status.blobs_uploading == 0
}

impl SyncHandle {
    /// The engine's status now.
    ///
    /// ```no_run
    /// # fn show(sync: &syncline::SyncHandle) {
    /// let status = sync.status();
    /// if !status.connected {
    ///     eprintln!("offline: {:?}, retrying in {:?}", status.last_error, status.retry_in);
    /// }
    /// # }
    /// ```
    pub fn status(&self) -> Status {
        self.shared.current()
    }

    /// The status each time it changes (first the status now), until the
    /// sync stops. Any async runtime can poll it.
    ///
    /// ```no_run
    /// # async fn watch(sync: &syncline::SyncHandle) {
    /// use futures_util::StreamExt;
    /// let mut updates = std::pin::pin!(sync.status_updates());
    /// while let Some(status) = updates.next().await {
    ///     println!("connected: {}, unacknowledged: {}", status.connected, status.unacknowledged);
    /// }
    /// # }
    /// ```
    pub fn status_updates(&self) -> impl Stream<Item = Status> + Send + 'static {
        let rx = self.shared.published.subscribe();
        let first = self.status();
        futures_util::stream::unfold((rx, Some(first)), |(mut rx, first)| async move {
            if let Some(status) = first {
                return Some((status, (rx, None)));
            }
            rx.changed().await.ok()?;
            let status = rx.borrow_and_update().clone();
            Some((status, (rx, None)))
        })
    }

    /// Waits until every local node of the synced rooms is acknowledged as
    /// durable by the server, every blob queued for upload is held by it,
    /// and every room has caught up; fails with
    /// [`Error::Timeout`] after `timeout`.
    ///
    /// ```no_run
    /// # fn save(sync: &syncline::SyncHandle) -> Result<(), syncline::Error> {
    /// match sync.flush(std::time::Duration::from_secs(5)) {
    ///     Ok(()) => println!("the server holds everything"),
    ///     Err(syncline::Error::Timeout { unacknowledged, .. }) => {
    ///         println!("{unacknowledged} changes wait for the server")
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if settled(&status) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timed_out(timeout, status));
            }
            // Woken by the engine when something changes; the cap re-reads
            // counts that change without it (another process's commit).
            let guard = self.shared.status();
            let wait = (deadline - now).min(Duration::from_millis(100));
            let _ = self
                .shared
                .status_changed
                .wait_timeout(guard, wait)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// [`SyncHandle::flush`], awaited: needs a tokio runtime with its
    /// timer enabled.
    ///
    /// ```no_run
    /// # async fn save(sync: &syncline::SyncHandle) -> Result<(), syncline::Error> {
    /// sync.flush_async(std::time::Duration::from_secs(10)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn flush_async(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.published.subscribe();
        loop {
            let status = self.status();
            if settled(&status) {
                return Ok(());
            }
            let wait = (deadline - tokio::time::Instant::now()).min(Duration::from_millis(100));
            match tokio::time::timeout(wait, rx.changed()).await {
                Ok(Ok(())) => {}
                // The engine stopped: the status no longer changes.
                Ok(Err(_)) if tokio::time::Instant::now() >= deadline => {
                    return Err(timed_out(timeout, self.status()));
                }
                Ok(Err(_)) => tokio::time::sleep(wait).await,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(timed_out(timeout, self.status()));
                }
                Err(_) => {}
            }
        }
    }

    /// Starts syncing room `name` too, over the running connection.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), syncline::Error> {
    /// let replica = syncline::Replica::open("./my-replica")?;
    /// let sync = replica.connect(&["ws://127.0.0.1:7700/ws"], &["notes"])?;
    /// sync.add_room("drafts")?;
    /// sync.remove_room("notes");
    /// assert_eq!(sync.rooms(), ["drafts"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn add_room(&self, name: &str) -> Result<(), Error> {
        let room = self.shared.replica.room(name)?;
        {
            let mut rooms = self.shared.rooms.lock().unwrap_or_else(|p| p.into_inner());
            if rooms.iter().any(|r| r.name() == name) {
                return Ok(());
            }
            room.shared.set_wake(Some(self.shared.wake.clone()));
            rooms.push(room);
        }
        self.shared.rooms_changed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Stops syncing room `name`: changes made after this returns stay
    /// local (its session closes; its data stays). Returns whether it was
    /// synced.
    pub fn remove_room(&self, name: &str) -> bool {
        let removed = {
            let mut rooms = self.shared.rooms.lock().unwrap_or_else(|p| p.into_inner());
            let at = rooms.iter().position(|r| r.name() == name);
            at.map(|i| rooms.remove(i))
        };
        let Some(room) = removed else {
            return false;
        };
        room.shared.set_wake(None);
        // Detached now, so that no later commit reaches it; the engine
        // sends what it queued before, and its close.
        let taken = {
            let mut state = room.shared.lock();
            state.presence.disconnected(room.name());
            state.session.take()
        };
        if let Some(link) = taken {
            self.shared
                .closing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(link);
        }
        {
            self.shared.rooms_changed.store(true, Ordering::SeqCst);
            self.shared.wake.notify_one();
        }
        true
    }

    /// The rooms synced.
    pub fn rooms(&self) -> Vec<String> {
        self.shared
            .rooms()
            .iter()
            .map(|r| r.name().to_owned())
            .collect()
    }

    /// Stops syncing (also done on drop).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for room in self.shared.rooms() {
            room.shared.set_wake(None);
            room.shared.lock().session = None;
        }
        self.shared.publish();
        // Another process may sync the replica from now on.
        self.engine.take();
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The timeout error for a wait of `waited` that ended at `status`.
fn timed_out(waited: Duration, status: Status) -> Error {
    Error::Timeout {
        waited,
        connected: status.connected,
        unacknowledged: status.unacknowledged,
        last_error: status.last_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_default_to_ws() {
        assert_eq!(
            normalize_endpoint("ws://127.0.0.1:7700").unwrap(),
            "ws://127.0.0.1:7700/ws"
        );
        assert_eq!(
            normalize_endpoint(" wss://relay.example/sync/ws ").unwrap(),
            "wss://relay.example/sync/ws"
        );
        assert_eq!(
            normalize_endpoint("ws://[::1]:7700/ws").unwrap(),
            "ws://[::1]:7700/ws"
        );
        for bad in [
            "http://h:1/ws",
            "h:1",
            "ftp://h/ws",
            "ws:///ws",
            "ws://h:port/ws",
        ] {
            assert!(
                matches!(normalize_endpoint(bad), Err(Error::Url { .. })),
                "{bad:?}"
            );
        }
    }
}
