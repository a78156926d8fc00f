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
//!
//! Key ids have a fixed length ([`crate::KeyId`] validates them), so a key id is
//! a safe prefix for the per-key column families.
//!
//! The catalogue's side of this layout is pinned by a checked-in database and
//! a byte-for-byte golden file (`tests/catalogue_fixture.rs`), the audit
//! records' by golden vectors (`tests/golden.rs`): a change that would make an
//! existing database unreadable fails them.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StorageError;

/// The format this build writes. Bump it (and write a migration) for any change
/// to the layout above or to a record encoding.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format this build can read.
pub const MIN_FORMAT_VERSION: u32 = 1;

/// Column family of database metadata (the format version).
pub const CF_DEFAULT: &str = "default";
/// Column family of key records, by key id.
pub const CF_KEYS: &str = "keys";
/// Column family of version records, by `key id ‖ u32 BE version`.
pub const CF_VERSIONS: &str = "versions";
/// Column family indexing pending versions (empty values).
pub const CF_PENDING: &str = "pending";
/// Column family mapping an alias to its key id.
pub const CF_ALIASES: &str = "aliases";
/// Column family indexing a key's aliases (`key id ‖ alias`, empty values).
pub const CF_ALIASES_BY_KEY: &str = "aliases_by_key";
/// Column family of reserved GCM invocation counts (u64 BE) per version.
pub const CF_GCM_COUNTERS: &str = "gcm_counters";
/// Column family of audit records, by u64 BE sequence number.
pub const CF_AUDIT: &str = "audit";
/// Column family of audit checkpoints, by the sequence number they certify.
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

/// Key of the wrapped catalogue-integrity HMAC key in the default column
/// family (`WrappedServiceKey`, version byte + JSON). Absent until the
/// service first runs with wrapped key versions; older builds ignore it, so
/// it needs no format version bump.
pub const META_INTEGRITY_KEY: &[u8] = b"integrity_key";

/// Key of the wrapped audit checkpoint HMAC key in the default column
/// family (`WrappedServiceKey`, version byte + JSON). Written only by a
/// deployment whose first start had a root key; a deployment whose
/// checkpoint key is the token object `kms-audit-hmac/v1` never gets one.
/// Older builds ignore it, so it needs no format version bump.
pub const META_CHECKPOINT_KEY: &[u8] = b"audit_checkpoint_key";

/// First byte of every catalogue record value (followed by JSON).
pub(crate) const CATALOGUE_RECORD_V1: u8 = 1;

/// Encodes a catalogue record value: [`CATALOGUE_RECORD_V1`] followed by the JSON of `v`.
pub(crate) fn encode_record<T: Serialize>(
    what: &'static str,
    v: &T,
) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![CATALOGUE_RECORD_V1];
    serde_json::to_writer(&mut out, v)
        .map_err(|source| StorageError::Serialize { what, source })?;
    Ok(out)
}

/// Decodes a catalogue record value written by [`encode_record`]; `cf` and
/// `key` only name the record in the error.
pub(crate) fn decode_record<T: DeserializeOwned>(
    cf: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&CATALOGUE_RECORD_V1, json)) => {
            serde_json::from_slice(json).map_err(|source| StorageError::CorruptJson {
                cf,
                key_hex: hex::encode(key),
                source,
            })
        }
        _ => Err(StorageError::Corrupt {
            cf,
            key_hex: hex::encode(key),
            reason: "unknown record version byte",
        }),
    }
}

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

/// The sequence number of an audit key; `None` if it is not 8 bytes.
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
