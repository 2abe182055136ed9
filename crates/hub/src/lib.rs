//! The relay core, without I/O: what every driver of sync sessions over a
//! durable room does, written once.
//!
//! [`RoomHub`] is one room on a server: its durable history and the server
//! sessions of every connection in it. A driver hands it batches of
//! decoded envelopes; the hub steps the sessions, persists what the batch
//! inserted in one write, and only then acknowledges and relays it, and
//! queues frames per connection. [`ClientLink`] is the client half: one
//! client session over a local durable room, persisting what arrives
//! before it is acknowledged and dropping from the outbox what the server
//! holds.
//!
//! The relay (`syncline-relay`) drives hubs from its connections, the SDK
//! drives client links from its WebSocket, and the simulator drives both
//! under its faults with a virtual clock: time is always an argument, in
//! milliseconds, and nothing here reads a clock, a socket or the OS RNG.

mod blobs;
mod client;
mod govern;
mod presence;
mod room;

pub use blobs::{BlobUrls, MAX_GROUPS_PER_NEED};
pub use client::ClientLink;
pub use govern::govern;
pub use room::{End, HubConfig, HubEvent, Input, RoomHub, SessionKey};
