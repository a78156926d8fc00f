//! The on-disk layout: every column family name, every key encoding and the
//! database format version live here and nowhere else.
//!
//! Layout (format version 1):
//!
//! | column family     | key                                  | value                                   |
//! |-------------------|--------------------------------------|-----------------------------------------|
//! | `default`         | `b"format_version"`                  | u32 big-endian                          |
//! | `keys`            | key id (ASCII, 36 bytes)             | key record (version byte + JSON)        |
//! | `versions`        | key id ‖ u32 BE version               | version record (version byte + JSON)    |
//! | `pending`         | key id ‖ u32 BE version               | empty: index of pending versions        |
//! | `aliases`         | alias (ASCII)                        | key id (ASCII)                          |
//! | `aliases_by_key`  | key id ‖ alias                       | empty: index of a key's aliases         |
//! | `gcm_counters`    | key id ‖ u32 BE version               | u64 BE: reserved GCM invocations        |
//! | `audit`           | u64 BE sequence (first is 1)         | audit record, binary (see audit_record) |
//! | `audit_checkpoints`| u64 BE sequence of the covered head | checkpoint record, binary               |
//!
//! Key ids have a fixed length ([`crate::KeyId`] validates them), so a key id is
//! a safe prefix for the per-key column families.

/// The format this build writes. Bump it (and write a migration) for any change
/// to the layout above or to a record encoding.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format this build can read.
pub const MIN_FORMAT_VERSION: u32 = 1;

pub const CF_DEFAULT: &str = "default";
pub const CF_KEYS: &str = "keys";
pub const CF_VERSIONS: &str = "versions";
pub const CF_PENDING: &str = "pending";
pub const CF_ALIASES: &str = "aliases";
pub const CF_ALIASES_BY_KEY: &str = "aliases_by_key";
pub const CF_GCM_COUNTERS: &str = "gcm_counters";
pub const CF_AUDIT: &str = "audit";
pub const CF_AUDIT_CHECKPOINTS: &str = "audit_checkpoints";

/// Every column family of the current format.
pub const ALL_CFS: [&str; 9] = [
    CF_DEFAULT,
    CF_KEYS,
    CF_VERSIONS,
    CF_PENDING,
    CF_ALIASES,
    CF_ALIASES_BY_KEY,
    CF_GCM_COUNTERS,
    CF_AUDIT,
    CF_AUDIT_CHECKPOINTS,
];

/// Key of the format version in the default column family.
pub const META_FORMAT_VERSION: &[u8] = b"format_version";

/// First byte of every catalogue record value (followed by JSON).
pub(crate) const CATALOGUE_RECORD_V1: u8 = 1;

/// `key id ‖ u32 BE version`: the key of a version, its pending marker and its counter.
pub(crate) fn version_key(key_id: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(key_id.len() + 4);
    k.extend_from_slice(key_id.as_bytes());
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Splits a version key into the key id and version.
pub(crate) fn decode_version_key(k: &[u8]) -> Option<(&str, u32)> {
    let split = k.len().checked_sub(4)?;
    let (id, v) = k.split_at(split);
    let id = std::str::from_utf8(id).ok()?;
    let v = u32::from_be_bytes(v.try_into().ok()?);
    Some((id, v))
}

/// `key id ‖ alias`: the index entry listing a key's aliases.
pub(crate) fn alias_by_key(key_id: &str, alias: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key_id.len() + alias.len());
    k.extend_from_slice(key_id.as_bytes());
    k.extend_from_slice(alias.as_bytes());
    k
}

/// Audit records and checkpoints are keyed by the big-endian sequence number,
/// so RocksDB's byte order is sequence order.
pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn decode_seq_key(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_key_round_trip_and_order() {
        let id = "key-0123456789abcdef0123456789abcdef";
        let k = version_key(id, 258);
        assert_eq!(decode_version_key(&k), Some((id, 258)));
        assert!(version_key(id, 2) < version_key(id, 10));
        assert!(seq_key(255) < seq_key(256));
        assert_eq!(decode_seq_key(&seq_key(42)), Some(42));
        assert_eq!(decode_seq_key(b"short"), None);
    }
}
