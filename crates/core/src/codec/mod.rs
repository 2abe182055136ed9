//! Encodings: the strict MessagePack subset used for canonical bytes.

pub mod mp;
