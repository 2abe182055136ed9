//! Identifiers: nodes, authors, rooms, entries, and the signature type.

use std::fmt;

use thiserror::Error;

use crate::limits::MAX_ROOM_ID_BYTES;

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// A hasher for maps keyed by ids (and small tuples of ids and integers).
///
/// Ids are BLAKE3 output or public keys, so their bits are already uniform;
/// this hasher only folds words together. It has a fixed key: core code
/// never reads the OS random number generator, and the same inputs give the
/// same table layout on every run.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // FxHash's step: cheap, and a bijection of the previous state.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// Builds [`IdHasher`]s.
pub type IdBuildHasher = std::hash::BuildHasherDefault<IdHasher>;
/// A hash map keyed by ids.
pub type IdMap<K, V> = std::collections::HashMap<K, V, IdBuildHasher>;
/// A hash set of ids.
pub type IdSet<K> = std::collections::HashSet<K, IdBuildHasher>;

/// Lower-case hexadecimal of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses lower- or upper-case hexadecimal into exactly `N` bytes.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                // The bytes are a hash or a public key: any eight are
                // already uniform, so hashing more would only cost time.
                let mut word = [0u8; 8];
                word.copy_from_slice(&self.0[..8]);
                state.write_u64(u64::from_le_bytes(word));
            }
        }

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Parses the hexadecimal form printed by `Display`.
            pub fn from_hex(s: &str) -> Option<Self> {
                from_hex::<$len>(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                // Eight hex digits identify a value in logs without drowning them.
                write_hex(f, &self.0[..4])?;
                write!(f, "…)")
            }
        }
    };
}

byte_id!(
    /// BLAKE3-256 of a node's canonical encoding.
    NodeId,
    32
);
byte_id!(
    /// An author (device or user identity): an Ed25519 public key.
    AuthorId,
    32
);
byte_id!(
    /// An entry of the document tree. Path-created entries derive it from
    /// (parent, name); unique entries from (node id, op index).
    EntryId,
    32
);
byte_id!(
    /// An Ed25519 signature.
    Signature,
    64
);

impl EntryId {
    /// The root of every room's tree.
    pub const ROOT: EntryId = EntryId([0; 32]);
    /// Where deleted entries are moved (Kleppmann's trash): never visible.
    pub const TRASH: EntryId = EntryId([0xff; 32]);

    /// The id of the entry named `name` under `parent` when created by path,
    /// so that replicas creating the same path concurrently agree.
    pub fn derived(parent: &EntryId, name: &str) -> EntryId {
        let mut h = blake3::Hasher::new_derive_key("syncline 2026 entry by path");
        h.update(&parent.0);
        h.update(name.as_bytes());
        EntryId(*h.finalize().as_bytes())
    }

    /// The id of the entry created by op `op_index` of the node with
    /// (`author`, `seq`). That pair names exactly one node (equivocation is
    /// refused), and unlike the node id it is known while the node is still
    /// being built, so a transaction can use the entry it just created.
    pub fn unique(author: &AuthorId, seq: u64, op_index: u32) -> EntryId {
        let mut h = blake3::Hasher::new_derive_key("syncline 2026 unique entry");
        h.update(&author.0);
        h.update(&seq.to_be_bytes());
        h.update(&op_index.to_be_bytes());
        EntryId(*h.finalize().as_bytes())
    }
}

/// Why a room id was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum RoomIdError {
    /// Empty or longer than [`MAX_ROOM_ID_BYTES`].
    #[error("room id must be 1 to {MAX_ROOM_ID_BYTES} bytes")]
    Length,
    /// A character outside `[A-Za-z0-9._:/-]`.
    #[error("room id may only contain letters, digits and . _ : / -")]
    Character,
}

/// A room: a document or namespace with its own history DAG. Cheap to
/// clone (every node carries one).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(std::sync::Arc<str>);

impl RoomId {
    /// Validates and wraps a room name. The alphabet is restricted so that a
    /// room id is safe in a URL, a file name and a log line.
    pub fn new(name: &str) -> Result<RoomId, RoomIdError> {
        if name.is_empty() || name.len() > MAX_ROOM_ID_BYTES {
            return Err(RoomIdError::Length);
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
        {
            return Err(RoomIdError::Character);
        }
        Ok(RoomId(name.into()))
    }

    /// The room name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let id = NodeId([0xab; 32]);
        assert_eq!(NodeId::from_hex(&id.to_string()), Some(id));
        assert_eq!(NodeId::from_hex("zz"), None);
        assert_eq!(to_hex(&[0, 255]), "00ff");
    }

    #[test]
    fn room_ids_are_validated() {
        assert!(RoomId::new("projects/alpha-1").is_ok());
        assert_eq!(RoomId::new(""), Err(RoomIdError::Length));
        assert_eq!(RoomId::new("a b"), Err(RoomIdError::Character));
        assert_eq!(
            RoomId::new(&"a".repeat(MAX_ROOM_ID_BYTES + 1)),
            Err(RoomIdError::Length)
        );
    }

    #[test]
    fn derived_entries_depend_on_parent_and_name() {
        let a = EntryId::derived(&EntryId::ROOT, "notes");
        assert_eq!(a, EntryId::derived(&EntryId::ROOT, "notes"));
        assert_ne!(a, EntryId::derived(&a, "notes"));
        assert_ne!(a, EntryId::unique(&AuthorId([0; 32]), 1, 0));
    }
}
