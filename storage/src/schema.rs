//! The on-disk layout: every column family name, every key encoding and the
//! database format version live here and nowhere else.
//!
//! Layout (format version 1):
//!
//! | column family     | key                                  | value                                   |
//! |-------------------|--------------------------------------|-----------------------------------------|
//! | `default`         | `b"format_version"`                  | u32 big-endian                          |
//! | `default`         | `b"integrity_key"`                   | wrapped integrity HMAC key (version byte + JSON) |
//! | `default`         | `b"audit_checkpoint_key"`            | wrapped audit checkpoint HMAC key (version byte + JSON) |
//! | `keys`            | key id (ASCII, 36 bytes)             | key record (version byte + JSON)        |
//! | `versions`        | key id ‖ u32 BE version               | version record (version byte + JSON)    |
//! | `pending`         | key id ‖ u32 BE version               | empty: index of pending versions        |
//! | `aliases`         | alias (ASCII)                        | key id (ASCII)                          |
//! | `aliases_by_key`  | key id ‖ alias                       | empty: index of a key's aliases         |
//! | `gcm_counters`    | key id ‖ u32 BE version               | u64 BE: reserved GCM invocations        |
//! | `audit`           | u64 BE sequence (first is 1)         | audit record, binary (see audit/record) |
//! | `audit_checkpoints`| u64 BE sequence of the covered head | checkpoint record, binary               |
//! | `usage`           | key id ‖ u32 BE version ‖ node id     | use record (version byte + JSON, `UsageRecord`) |
//! | `usage`           | `0xFF` ‖ `b"watermark/"` ‖ node id    | u64 BE: audit sequence the stored records cover |
//!
//! Key ids have a fixed length ([`crate::KeyId`] validates them), so a key id is
//! a safe prefix for the per-key column families.
//!
//! The catalogue's side of this layout is pinned by a checked-in database and
//! a byte-for-byte golden file (`tests/catalogue_fixture.rs`), the audit
//! records' by golden vectors (`tests/golden.rs`): a change that would make an
//! existing database unreadable fails them.

/// The format this build writes. Bump it (and write a migration) for any change
/// to the layout above or to a record encoding.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format this build can read.
pub const MIN_FORMAT_VERSION: u32 = 1;

pub use kms_catalogue::schema::{
    CF_ALIASES, CF_ALIASES_BY_KEY, CF_DEFAULT, CF_GCM_COUNTERS, CF_KEYS, CF_PENDING, CF_VERSIONS,
    META_CHECKPOINT_KEY, META_INTEGRITY_KEY,
};
pub(crate) use kms_catalogue::schema::{decode_record, encode_record, version_key};

/// Column family of audit records, by u64 BE sequence number.
pub const CF_AUDIT: &str = "audit";
/// Column family of audit checkpoints, by the sequence number they certify.
pub const CF_AUDIT_CHECKPOINTS: &str = "audit_checkpoints";

/// Column family of per-version use records (issue 18), written in batches
/// by the service outside the catalogue's commits. Added without a format
/// bump: a database without it gets it created empty, and older builds
/// open it and ignore it.
pub const CF_USAGE: &str = kms_catalogue::USAGE_TABLE;

/// Every column family of the current format.
pub const ALL_CFS: [&str; 10] = [
    CF_DEFAULT,
    CF_KEYS,
    CF_VERSIONS,
    CF_PENDING,
    CF_ALIASES,
    CF_ALIASES_BY_KEY,
    CF_GCM_COUNTERS,
    CF_AUDIT,
    CF_AUDIT_CHECKPOINTS,
    CF_USAGE,
];

/// Key of a node's usage watermark in [`CF_USAGE`]: the 0xFF byte sorts
/// after every key id (ASCII), so it never falls in a key's prefix.
pub(crate) fn usage_watermark_key(node: &str) -> Vec<u8> {
    let mut k = b"\xffwatermark/".to_vec();
    k.extend_from_slice(node.as_bytes());
    k
}

/// Key of the format version in the default column family.
pub const META_FORMAT_VERSION: &[u8] = b"format_version";

/// Audit records and checkpoints are keyed by the big-endian sequence number,
/// so RocksDB's byte order is sequence order.
pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of an audit key; `None` if it is not 8 bytes.
pub(crate) fn decode_seq_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_key_round_trip_and_order() {
        assert!(seq_key(255) < seq_key(256));
        assert_eq!(decode_seq_key(&seq_key(42)), Some(42));
        assert_eq!(decode_seq_key(b"short"), None);
    }
}
