//! The sync protocol without I/O: the envelope and messages of
//! `docs/protocol.md`, and the session state machines that speak them.

pub mod message;
pub mod scope;
mod send_queue;
pub mod session;
