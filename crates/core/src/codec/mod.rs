//! Encodings: the strict MessagePack subset used for canonical bytes, and
//! the varints of compact packs.

pub mod mp;
pub mod varint;
