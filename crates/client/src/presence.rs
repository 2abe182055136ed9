//! Presence: who else is in a room right now (ephemeral, never in
//! history). An app shows its own with [`Room::set_presence`] (sent while
//! the room syncs, again after each reconnection) and reads others' with
//! [`Room::peers`] and [`Room::presence_events`].

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use syncline_core::AuthorId;
use syncline_core::proto::message::{MAX_PRESENCE_DATA, MAX_PRESENCE_MESSAGE, PresenceStatus};

use crate::replica::{Error, Room, session_now};

/// Presence events a feed holds before it drops new ones (the app reads
/// [`Room::peers`] for the state).
pub const PRESENCE_QUEUE: usize = 1024;

/// Another session in the room, as it shows itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its key (hex).
    pub peer: String,
    /// Which of the room's sessions (one key may have several).
    pub client: u64,
    /// Online, away or busy.
    pub status: PresenceStatus,
    /// For people.
    pub message: String,
    /// App data (a cursor, a selection).
    pub data: Vec<u8>,
}

/// What happened to a peer's presence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceKind {
    /// It showed itself.
    Joined,
    /// It changed what it shows.
    Updated,
    /// It left (or the connection to the relay ended).
    Left,
}

/// A peer joined, changed or left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    /// The room.
    pub room: String,
    /// What happened.
    pub kind: PresenceKind,
    /// The peer (as it showed itself last, for `Left`).
    pub peer: Peer,
}

/// A room's presence events from when it was made until it is dropped.
#[derive(Debug)]
pub struct PresenceFeed {
    rx: Receiver<PresenceEvent>,
}

impl PresenceFeed {
    /// The next event, waiting for it.
    pub fn recv(&self) -> Option<PresenceEvent> {
        self.rx.recv().ok()
    }

    /// The next event, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<PresenceEvent, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&self) -> Option<PresenceEvent> {
        self.rx.try_recv().ok()
    }
}

impl Iterator for PresenceFeed {
    type Item = PresenceEvent;

    fn next(&mut self) -> Option<PresenceEvent> {
        self.recv()
    }
}

/// A room's presence: its own, the peers shown, and who listens.
#[derive(Debug, Default)]
pub(crate) struct RoomPresence {
    /// What this replica shows here (sent while connected).
    pub(crate) own: Option<(PresenceStatus, String, Vec<u8>)>,
    peers: BTreeMap<u64, Peer>,
    feeds: Vec<SyncSender<PresenceEvent>>,
}

impl RoomPresence {
    /// A peer's presence arrived: records it and tells the feeds.
    pub(crate) fn heard(
        &mut self,
        room: &str,
        peer: AuthorId,
        client: u64,
        status: PresenceStatus,
        message: String,
        data: Vec<u8>,
    ) {
        let shown = Peer {
            peer: peer.to_string(),
            client,
            status,
            message,
            data,
        };
        let kind = if status == PresenceStatus::Offline {
            match self.peers.remove(&client) {
                Some(_) => PresenceKind::Left,
                None => return,
            }
        } else if self.peers.insert(client, shown.clone()).is_some() {
            PresenceKind::Updated
        } else {
            PresenceKind::Joined
        };
        self.tell(PresenceEvent {
            room: room.to_owned(),
            kind,
            peer: shown,
        });
    }

    /// The connection to the relay ended: every peer is gone from here.
    pub(crate) fn disconnected(&mut self, room: &str) {
        for (_, peer) in std::mem::take(&mut self.peers) {
            self.tell(PresenceEvent {
                room: room.to_owned(),
                kind: PresenceKind::Left,
                peer,
            });
        }
    }

    fn tell(&mut self, event: PresenceEvent) {
        self.feeds.retain(|f| match f.try_send(event.clone()) {
            Ok(()) | Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

impl Room {
    /// Shows this replica's presence in the room to the other sessions in
    /// it (`Offline` withdraws it): a status, a message for people (at most
    /// 256 bytes) and app data (a cursor; at most 4 KiB). Sent while the
    /// room syncs, and again after each reconnection; never in history.
    ///
    /// ```
    /// use syncline::PresenceStatus;
    /// let notes = syncline::Replica::in_memory()?.room("notes")?;
    /// notes.set_presence(PresenceStatus::Busy, "in a meeting", b"")?;
    /// assert!(notes.peers().is_empty(), "no one else is connected");
    /// # Ok::<(), syncline::Error>(())
    /// ```
    pub fn set_presence(
        &self,
        status: PresenceStatus,
        message: &str,
        data: &[u8],
    ) -> Result<(), Error> {
        if message.len() > MAX_PRESENCE_MESSAGE || data.len() > MAX_PRESENCE_DATA {
            return Err(Error::Presence {
                why: "the message is at most 256 bytes and the data at most 4 KiB",
            });
        }
        {
            let mut state = self.shared.lock();
            state.presence.own = (status != PresenceStatus::Offline)
                .then(|| (status, message.to_owned(), data.to_vec()));
            if let Some(link) = state.session.as_mut()
                && link.session().is_open()
            {
                link.send_presence(session_now(), status, message, data);
            }
        }
        self.shared.wake_engine();
        Ok(())
    }

    /// The other sessions showing presence in the room now (empty while
    /// not connected).
    pub fn peers(&self) -> Vec<Peer> {
        self.shared
            .lock()
            .presence
            .peers
            .values()
            .cloned()
            .collect()
    }

    /// Peers joining, changing and leaving, from now until the feed is
    /// dropped.
    pub fn presence_events(&self) -> PresenceFeed {
        let (tx, rx) = std::sync::mpsc::sync_channel(PRESENCE_QUEUE);
        self.shared.lock().presence.feeds.push(tx);
        PresenceFeed { rx }
    }
}
