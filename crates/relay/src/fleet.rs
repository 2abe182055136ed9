//! A fleet: relays sharing rooms through one PostgreSQL database
//! (`--postgres`), telling one another of their commits through NATS
//! (`--nats`).
//!
//! The database is the record; the bus is only the fast way to hear that
//! it changed. A relay that committed nodes to a room publishes a notice
//! (its id and the room's node count) on the room's subject; a relay that
//! holds the room loaded and is behind that count catches up from the
//! database (`RoomHub::catch_up`) and relays what it learns to its
//! sessions. Notices carry no history, so a forged or stale one costs a
//! read, never a wrong node. Whatever the bus loses (NATS restarted, a
//! relay cut off, a notice dropped because the bus lagged), the periodic
//! check finds: every [`Config::fleet_poll`] one query reads the counts
//! of every loaded room, and rooms behind catch up. Without NATS, that
//! check is how relays learn of each other's writes.
//!
//! Subjects: `PREFIX.room.NAME` with the room name in unpadded base64url,
//! so a name holding `.` (a subject's token separator) stays one token and
//! no name can reach into another's subject.
//!
//! [`Config::fleet_poll`]: crate::Config::fleet_poll

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use syncline_core::RoomId;
use syncline_postgres::PgStore;
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::rooms::Rooms;
use crate::telemetry;

/// Notices waiting to be published, at most (past it they are dropped:
/// the other relays' periodic check finds the writes).
const NOTICE_QUEUE: usize = 4096;

/// How long the first connection to NATS may take.
const NATS_CONNECT: Duration = Duration::from_secs(5);

/// A notice's payload: the publisher's id, then the room's node count.
const NOTICE_BYTES: usize = 16 + 8;

/// Where a relay tells the others of its commits.
#[derive(Debug)]
pub(crate) struct Fleet {
    /// Notices for the publishing task (`None`: no bus).
    notices: Option<mpsc::Sender<(RoomId, u64)>>,
}

impl Fleet {
    /// A relay alone with its store: nothing to tell.
    pub(crate) fn alone() -> Fleet {
        Fleet { notices: None }
    }

    /// Says that `room` holds `nodes` nodes in the database now.
    pub(crate) fn stored(&self, room: &RoomId, nodes: u64) {
        let Some(notices) = &self.notices else {
            return;
        };
        if notices.try_send((room.clone(), nodes)).is_err() {
            metrics::counter!(telemetry::FLEET_NOTICES, "way" => "dropped").increment(1);
        }
    }
}

/// A connection to NATS and what to do with it.
#[derive(Debug)]
pub(crate) struct Bus {
    client: async_nats::Client,
    prefix: String,
    id: [u8; 16],
    notices: mpsc::Receiver<(RoomId, u64)>,
    /// Notified when the connection comes back: notices were missed.
    reconnected: Arc<Notify>,
}

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The subject prefix is not NATS subject tokens.
    #[error(
        "NATS subject prefix {0:?}: use dot-separated tokens of letters, digits, '-' and '_' \
         (like syncline or acme.sync)"
    )]
    Prefix(String),
    /// The URL is not a NATS server's.
    #[error("--nats {url:?} is not a NATS URL ({why}): use nats://HOST:PORT")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The first connection failed.
    #[error("cannot connect to NATS at {url}: {why} (is nats-server running there?)")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
}

/// Connects to NATS at `url` (the first connection must succeed; later
/// losses are retried for ever) and returns the relay's side of the bus
/// and the bus itself, to [`run`].
pub(crate) async fn connect(url: &str, prefix: &str) -> Result<(Fleet, Bus), BusError> {
    if !valid_prefix(prefix) {
        return Err(BusError::Prefix(prefix.to_owned()));
    }
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the OS random number generator is available");
    let reconnected = Arc::new(Notify::new());
    let told = reconnected.clone();
    let connecting = async_nats::ConnectOptions::new()
        .name("syncline-relay")
        .connection_timeout(NATS_CONNECT)
        .event_callback(move |event| {
            let told = told.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        info!("connected to NATS: checking every loaded room");
                        metrics::gauge!(telemetry::FLEET_BUS_CONNECTED).set(1.0);
                        told.notify_one();
                    }
                    async_nats::Event::Disconnected => {
                        warn!(
                            "lost NATS: relays learn of each other's writes by polling meanwhile"
                        );
                        metrics::gauge!(telemetry::FLEET_BUS_CONNECTED).set(0.0);
                    }
                    other => info!(event = %other, "NATS"),
                }
            }
        })
        .connect(url);
    let client = tokio::time::timeout(NATS_CONNECT, connecting)
        .await
        .map_err(|_| BusError::Connect {
            url: url.to_owned(),
            why: format!("no answer within {NATS_CONNECT:?}"),
        })?
        .map_err(|e| match e.kind() {
            async_nats::ConnectErrorKind::ServerParse => BusError::Url {
                url: url.to_owned(),
                why: e.to_string(),
            },
            _ => BusError::Connect {
                url: url.to_owned(),
                why: e.to_string(),
            },
        })?;
    metrics::gauge!(telemetry::FLEET_BUS_CONNECTED).set(1.0);
    let (tx, notices) = mpsc::channel(NOTICE_QUEUE);
    Ok((
        Fleet { notices: Some(tx) },
        Bus {
            client,
            prefix: prefix.to_owned(),
            id,
            notices,
            reconnected,
        },
    ))
}

/// Serves the fleet until the relay stops: publishes this relay's notices
/// (with a bus), hears the others', and checks every `poll` that no loaded
/// room is behind the database.
pub(crate) async fn run(rooms: Arc<Rooms>, pg: Arc<PgStore>, bus: Option<Bus>, poll: Duration) {
    let mut tasks = tokio::task::JoinSet::new();
    // A reconnection to NATS (notices were missed) checks at once.
    let check_now = match bus {
        Some(Bus {
            client,
            prefix,
            id,
            notices,
            reconnected,
        }) => {
            tasks.spawn(publish(client.clone(), prefix.clone(), id, notices));
            tasks.spawn(hear(client, prefix, id, rooms.clone()));
            reconnected
        }
        None => Arc::new(Notify::new()),
    };
    tasks.spawn(check_behind(rooms, pg, poll, check_now));
    // The tasks run until the relay stops; one that ends early is a bug
    // the log must show (the others, and the poll, go on).
    while let Some(ended) = tasks.join_next().await {
        match ended {
            Ok(()) => warn!("a fleet task ended early"),
            Err(e) => tracing::error!(error = %e, "a fleet task failed"),
        }
    }
}

/// Publishes notices in the order the rooms stored them.
async fn publish(
    client: async_nats::Client,
    prefix: String,
    id: [u8; 16],
    mut notices: mpsc::Receiver<(RoomId, u64)>,
) {
    while let Some((room, nodes)) = notices.recv().await {
        let mut payload = Vec::with_capacity(NOTICE_BYTES);
        payload.extend_from_slice(&id);
        payload.extend_from_slice(&nodes.to_be_bytes());
        // While NATS is away the client buffers a bounded number of
        // messages; a publish that cannot even queue is dropped.
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            client.publish(subject(&prefix, &room), payload.into()),
        )
        .await;
        let way = match sent {
            Ok(Ok(())) => "sent",
            _ => "dropped",
        };
        metrics::counter!(telemetry::FLEET_NOTICES, "way" => way).increment(1);
    }
}

/// Hears the other relays' notices: a loaded room behind catches up.
async fn hear(client: async_nats::Client, prefix: String, id: [u8; 16], rooms: Arc<Rooms>) {
    let mut notices = loop {
        match client.subscribe(format!("{prefix}.room.*")).await {
            Ok(subscriber) => break subscriber,
            Err(e) => {
                warn!(error = %e, "cannot subscribe to NATS yet: polling meanwhile");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    while let Some(message) = notices.next().await {
        let Some(room) = room_of(&prefix, &message.subject) else {
            continue;
        };
        let Some((from, nodes)) = parse_notice(&message.payload) else {
            continue;
        };
        if from == id {
            continue;
        }
        metrics::counter!(telemetry::FLEET_NOTICES, "way" => "heard").increment(1);
        rooms.stored_elsewhere(&room, nodes);
    }
}

/// Every `every` (or when `now` is notified), reads the node counts of the
/// loaded rooms in one query; those behind catch up.
async fn check_behind(rooms: Arc<Rooms>, pg: Arc<PgStore>, every: Duration, now: Arc<Notify>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = now.notified() => {}
        }
        let loaded = rooms.loaded_rooms();
        if loaded.is_empty() {
            continue;
        }
        let pg = pg.clone();
        let counts = tokio::task::spawn_blocking(move || pg.node_counts(&loaded)).await;
        match counts {
            Ok(Ok(counts)) => {
                for (room, nodes) in counts {
                    if rooms.stored_elsewhere(&room, nodes) {
                        metrics::counter!(telemetry::FLEET_BEHIND).increment(1);
                    }
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot check the rooms against the database"),
            Err(e) => {
                tracing::error!(error = %e, "checking the rooms against the database panicked")
            }
        }
    }
}

/// A room's subject.
fn subject(prefix: &str, room: &RoomId) -> String {
    format!(
        "{prefix}.room.{}",
        URL_SAFE_NO_PAD.encode(room.as_str().as_bytes())
    )
}

/// The room a subject names, if it is one of [`subject`]'s.
fn room_of(prefix: &str, subject: &str) -> Option<RoomId> {
    let encoded = subject.strip_prefix(prefix)?.strip_prefix(".room.")?;
    let name = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    RoomId::new(std::str::from_utf8(&name).ok()?).ok()
}

fn parse_notice(payload: &[u8]) -> Option<([u8; 16], u64)> {
    if payload.len() != NOTICE_BYTES {
        return None;
    }
    let (id, nodes) = payload.split_at(16);
    Some((
        id.try_into().ok()?,
        u64::from_be_bytes(nodes.try_into().ok()?),
    ))
}

/// Whether `prefix` is dot-separated tokens of `[A-Za-z0-9_-]`.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    prefix.split('.').all(|token| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_map_to_one_subject_token_and_back() {
        for name in ["plain", "a.b.c", "team/doc:1", "...", "-._:/", "a"] {
            let room = RoomId::new(name).unwrap();
            let subject = subject("acme.sync", &room);
            let token = subject.strip_prefix("acme.sync.room.").unwrap();
            assert!(
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{name:?} became {subject:?}"
            );
            assert_eq!(room_of("acme.sync", &subject), Some(room));
        }
        assert_eq!(room_of("acme.sync", "other.room.YQ"), None);
        assert_eq!(room_of("acme.sync", "acme.sync.room.!!"), None);
    }

    #[test]
    fn notices_parse_back_and_garbage_is_ignored() {
        let mut payload = vec![7u8; 16];
        payload.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(parse_notice(&payload), Some(([7; 16], 42)));
        assert_eq!(parse_notice(&payload[1..]), None);
        assert_eq!(parse_notice(b""), None);
    }

    #[test]
    fn prefixes_are_subject_tokens() {
        assert!(valid_prefix("syncline"));
        assert!(valid_prefix("acme.sync-1"));
        for bad in ["", "a..b", "a.*", "a b", ">", "a."] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }
}
