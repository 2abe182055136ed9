//! Presence in a room hub: who is here, ephemeral, never in history.
//!
//! A session that sends `presence` becomes present (the hub remembers its
//! last status, message and app data); the hub relays each change to the
//! room's other open sessions that asked for presence, gives a session
//! that opens the presence of those already here (and their keys in its
//! `welcome`), and says `offline` for a present session that ends, however
//! it ends (close, disconnect, lagging, idle timeout). Updates are rate
//! limited per session by a token bucket on the hub's clock: one past the
//! budget is refused with `error{rate_limited}` and dropped; the session
//! goes on.

use syncline_core::AuthorId;
use syncline_core::proto::message::{Envelope, Message, PresenceStatus, Reason};

/// What a present session shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shown {
    pub(crate) status: PresenceStatus,
    pub(crate) message: String,
    pub(crate) data: Vec<u8>,
}

/// A session's presence: its key, its number among the room's sessions,
/// what it shows, and its update budget.
#[derive(Debug)]
pub(crate) struct Presence {
    pub(crate) peer: AuthorId,
    pub(crate) client: u64,
    pub(crate) shown: Option<Shown>,
    /// Updates it may still send, in thousandths (refilled with time).
    budget_milli: u64,
    refilled_at: u64,
}

impl Presence {
    pub(crate) fn new(peer: AuthorId, client: u64, burst: u32, now: u64) -> Presence {
        Presence {
            peer,
            client,
            shown: None,
            budget_milli: u64::from(burst) * 1000,
            refilled_at: now,
        }
    }

    /// Takes one update from the budget (`burst` at most, refilled at
    /// `per_sec`); false if there is none left.
    pub(crate) fn take(&mut self, now: u64, burst: u32, per_sec: u32) -> bool {
        let elapsed = now.saturating_sub(self.refilled_at);
        self.refilled_at = now;
        self.budget_milli =
            (self.budget_milli + elapsed * u64::from(per_sec)).min(u64::from(burst) * 1000);
        if self.budget_milli >= 1000 {
            self.budget_milli -= 1000;
            true
        } else {
            false
        }
    }

    /// The frame telling session `to` what this presence shows (`offline`
    /// when it shows nothing).
    pub(crate) fn frame(&self, to: u64) -> Vec<u8> {
        let (status, message, data) = match &self.shown {
            Some(s) => (s.status, s.message.clone(), s.data.clone()),
            None => (PresenceStatus::Offline, String::new(), Vec::new()),
        };
        Envelope::frame(
            to,
            0,
            Message::Presence {
                peer: self.peer,
                client: self.client,
                status,
                message,
                data,
            },
        )
    }
}

/// The `error` refusing an update past the budget.
pub(crate) fn refused_frame(to: u64, per_sec: u32) -> Vec<u8> {
    Envelope::frame(
        to,
        0,
        Message::Error {
            code: Reason::RateLimited,
            message: format!("presence updates come faster than {per_sec} a second: dropped"),
            related: 0,
        },
    )
}
