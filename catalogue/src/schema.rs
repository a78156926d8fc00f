//! The catalogue's record layout, common to every engine: table names,
//! key encodings and the record value encoding. An engine maps each
//! [`Table`](crate::Table) to its own namespace (a RocksDB column family of
//! the same name; an etcd prefix `<root>/<name>/`) and stores keys and values
//! byte for byte, so a record is the same bytes in either engine.
//!
//! | table             | key                                  | value                                   |
//! |-------------------|--------------------------------------|-----------------------------------------|
//! | `default` (meta)  | `b"integrity_key"`                   | wrapped integrity HMAC key (version byte + JSON) |
//! | `default` (meta)  | `b"audit_checkpoint_key"`            | wrapped audit checkpoint HMAC key (version byte + JSON) |
//! | `default` (meta)  | `b"restore_pending"`                 | pending-restore marker (version byte + JSON) |
//! | `default` (meta)  | `b"roots/active"`                    | cluster's active root epoch (version byte + JSON) |
//! | `keys`            | key id (ASCII, 36 bytes)             | key record (version byte + JSON)        |
//! | `versions`        | key id ‖ u32 BE version               | version record (version byte + JSON)    |
//! | `pending`         | key id ‖ u32 BE version               | empty: index of pending versions        |
//! | `aliases`         | alias (ASCII)                        | key id (ASCII)                          |
//! | `aliases_by_key`  | key id ‖ alias                       | empty: index of a key's aliases         |
//! | `gcm_counters`    | key id ‖ u32 BE version               | u64 BE: reserved GCM invocations        |
//!
//! Key ids have a fixed length ([`crate::KeyId`] validates them), so a key id
//! is a safe prefix for the per-key tables.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::Table;
use crate::error::StorageError;

/// Table of database metadata (RocksDB's `default` column family).
pub const CF_DEFAULT: &str = Table::Meta.name();
/// Table of key records, by key id.
pub const CF_KEYS: &str = Table::Keys.name();
/// Table of version records, by `key id ‖ u32 BE version`.
pub const CF_VERSIONS: &str = Table::Versions.name();
/// Table indexing pending versions (empty values).
pub const CF_PENDING: &str = Table::Pending.name();
/// Table mapping an alias to its key id.
pub const CF_ALIASES: &str = Table::Aliases.name();
/// Table indexing a key's aliases (`key id ‖ alias`, empty values).
pub const CF_ALIASES_BY_KEY: &str = Table::AliasesByKey.name();
/// Table of reserved GCM invocation counts (u64 BE) per version.
pub const CF_GCM_COUNTERS: &str = Table::GcmCounters.name();

/// Key of the wrapped catalogue-integrity HMAC key in the meta table
/// (`WrappedServiceKey`, version byte + JSON). Absent until the service
/// first runs with wrapped key versions; older builds ignore it, so it
/// needs no format version bump.
pub const META_INTEGRITY_KEY: &[u8] = b"integrity_key";

/// Key of the wrapped audit checkpoint HMAC key in the meta table
/// (`WrappedServiceKey`, version byte + JSON). Written only by a
/// deployment whose first start had a root key; a deployment whose
/// checkpoint key is the token object `kms-audit-hmac/v1` never gets one.
/// Older builds ignore it, so it needs no format version bump.
pub const META_CHECKPOINT_KEY: &[u8] = b"audit_checkpoint_key";

/// Key of the pending-restore marker in the meta table (version byte +
/// JSON, written by `kms backup restore`): while present, the service's
/// next start rotates every key and records the restore in the audit log
/// before it serves, then removes it (design note §1.6). Older builds
/// ignore it, so it needs no format version bump.
pub const META_RESTORE_PENDING: &[u8] = b"restore_pending";

/// Key of the cluster's active root epoch in the meta table (version
/// byte, then JSON `{"epoch": N}`): the epoch every node wraps new versions under.
/// Written only in a cluster, by one catalogue transaction once every
/// registered node's HSM holds the epoch (design note §1.5, issue 15); a
/// single node keeps its active epoch in memory (the highest verified root
/// on its token). Older builds ignore it, so it needs no format version bump.
pub const META_ACTIVE_ROOT: &[u8] = b"roots/active";

/// First byte of every catalogue record value (followed by JSON).
pub const CATALOGUE_RECORD_V1: u8 = 1;

/// Encodes a catalogue record value: [`CATALOGUE_RECORD_V1`] followed by the JSON of `v`.
///
/// # Errors
///
/// [`StorageError::Serialize`] if `v` cannot be serialized (never for our types).
pub fn encode_record<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![CATALOGUE_RECORD_V1];
    serde_json::to_writer(&mut out, v)
        .map_err(|source| StorageError::Serialize { what, source })?;
    Ok(out)
}

/// Decodes a catalogue record value written by [`encode_record`]; `cf` and
/// `key` only name the record in the error.
///
/// # Errors
///
/// [`StorageError::Corrupt`] for an unknown version byte,
/// [`StorageError::CorruptJson`] for undecodable JSON.
pub fn decode_record<T: DeserializeOwned>(
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
pub fn version_key(key_id: &str, version: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(key_id.len() + 4);
    k.extend_from_slice(key_id.as_bytes());
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Splits a version key into the key id and version.
pub fn decode_version_key(k: &[u8]) -> Option<(&str, u32)> {
    let split = k.len().checked_sub(4)?;
    let (id, v) = k.split_at(split);
    let id = std::str::from_utf8(id).ok()?;
    let v = u32::from_be_bytes(v.try_into().ok()?);
    Some((id, v))
}

/// `key id ‖ alias`: the index entry listing a key's aliases.
pub fn alias_by_key(key_id: &str, alias: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key_id.len() + alias.len());
    k.extend_from_slice(key_id.as_bytes());
    k.extend_from_slice(alias.as_bytes());
    k
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
        assert_eq!(decode_version_key(b"abc"), None);
    }
}
