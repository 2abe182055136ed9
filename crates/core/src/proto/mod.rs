//! The sync protocol without I/O: the envelope and messages of
//! `docs/protocol.md`.

pub mod message;
