//! Named bounds. Every length that comes off the wire or the disk is checked
//! against one of these before anything is sized from it.

/// Largest room id, in bytes.
pub const MAX_ROOM_ID_BYTES: usize = 128;
/// Largest canonical node encoding, in bytes.
pub const MAX_NODE_BYTES: usize = 256 * 1024;
/// Most operations in one node.
pub const MAX_OPS_PER_NODE: usize = 4096;
/// Most parents of one node (a merge of this many concurrent heads).
pub const MAX_PARENTS: usize = 64;
/// Longest entry name or field name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest string, byte string or text insert inside a node.
pub const MAX_STRING_BYTES: usize = 128 * 1024;
/// Deepest nesting of arrays and maps in a value.
pub const MAX_VALUE_DEPTH: usize = 16;
/// Most elements in one array or map value.
pub const MAX_COLLECTION_LEN: usize = 16 * 1024;
/// Most dimensions of a vector value.
pub const MAX_VECTOR_DIMS: usize = 8192;
/// Longest fractional-index position key.
pub const MAX_POSITION_BYTES: usize = 64;
/// Longest MIME type of a blob reference.
pub const MAX_MIME_BYTES: usize = 255;
/// Most spans in one text delete.
pub const MAX_DELETE_SPANS: usize = 4096;
/// Most characters one node may delete (across all its spans): bounds the
/// work a single node can ask for. Larger deletions take several nodes.
pub const MAX_DELETED_CHARS_PER_NODE: u64 = 1 << 20;
/// Latest wall time a clock may carry (about the year 10889): keeps every
/// clock step far from overflow, whatever a peer sends.
pub const MAX_HLC_WALL_MS: u64 = 1 << 48;
/// Most nodes in one pack.
pub const MAX_NODES_PER_PACK: usize = 1 << 20;
/// Most content (as `content_bytes` counts it) of an author's nodes in a
/// pack before the signed node that vouches for them: honest packers sign
/// every [`crate::room::SIGNED_CONTENT`] bytes, so a relay can always cut
/// what it received into frames.
pub const MAX_UNSIGNED_RUN: usize = 1 << 20;
/// Largest pack body once decompressed.
pub const MAX_PACK_BYTES: usize = 64 * 1024 * 1024;
/// A compressed pack body may declare at most this many times its
/// compressed size (or [`MAX_INFLATE_FLOOR`], whichever is more), so what a
/// peer makes a receiver inflate follows what it sent: a few kilobytes
/// cannot become 64 MiB. Packers store a body raw when its compression
/// would exceed the ratio.
pub const MAX_INFLATE_RATIO: usize = 32;
/// Bodies up to this size decompress whatever their ratio (a store's
/// segments and a session's packs stay below it; a whole history exported
/// as one pack may be stored raw).
pub const MAX_INFLATE_FLOOR: usize = 8 << 20;

/// The most a compressed body of `compressed` bytes may inflate to.
pub const fn max_inflated(compressed: usize) -> usize {
    let by_ratio = compressed.saturating_mul(MAX_INFLATE_RATIO);
    let allowed = if by_ratio > MAX_INFLATE_FLOOR {
        by_ratio
    } else {
        MAX_INFLATE_FLOOR
    };
    if allowed < MAX_PACK_BYTES {
        allowed
    } else {
        MAX_PACK_BYTES
    }
}
/// Most nodes held while waiting for their parents, per room.
pub const MAX_PENDING_NODES: usize = 100_000;
