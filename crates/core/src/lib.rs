//! Sans-IO core of Syncline: the history model (ids, keys, the hybrid logical
//! clock, the canonical node encoding, compact packs, validation and the DAG)
//! and the document CRDT materialized from it.
//!
//! **Architecture Invariant:** nothing in this crate performs I/O, reads the
//! clock or reads the OS random number generator. Time and key material are
//! arguments.

pub mod auth;
pub mod blob;
pub mod checkpoint;
pub mod codec;
pub mod dag;
pub mod doc;
pub mod hlc;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod node;
pub mod op;
pub mod pack;
pub mod proto;
pub mod recon;
pub mod room;
pub mod value;

pub use dag::{Dag, NodeIdx, VerifiedNode};
pub use doc::Doc;
pub use hlc::{Hlc, HlcClock};
pub use ids::{AuthorId, EntryId, NodeId, RoomId, Signature};
pub use keys::Keypair;
pub use node::Node;
pub use op::{CharRef, CharSpan, EntryKind, Op};
pub use room::{Room, Transaction};
pub use value::{BlobRef, Value, Vector};
