//! The per-version use record (issue 18): how often, and when last, one
//! node used one key version to encrypt and to decrypt.
//!
//! It is written often (batched by the service, every few seconds), so it
//! never goes through the catalogue's generation compare-and-set
//! ([`crate::CatalogueEngine::commit`]): each node stores only its own
//! records with plain puts ([`crate::CatalogueEngine::usage_put`]) and
//! readers aggregate over nodes ([`UsageRecord::merge`]). It is never part
//! of a backup: it is derived from the audit log.
//!
//! Value: [`crate::schema::CATALOGUE_RECORD_V1`] followed by JSON, as every
//! catalogue record; pinned by the golden vector `tests/golden/usage_v1.bin`.

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::schema::{decode_record, encode_record};

/// One node's uses of one key version. Counts only grow and times only
/// move forward ([`UsageRecord::merge`] is a max/sum join), so a record
/// never goes backwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Successful encrypt-side uses (Encrypt, GenerateDataKey*, ReEncrypt
    /// destination, their batch forms, Kubernetes and AWS encrypt).
    pub encrypt_count: u64,
    /// Successful decrypt-side uses (Decrypt, ReEncrypt source, their batch
    /// forms, Kubernetes and AWS decrypt).
    pub decrypt_count: u64,
    /// Time of the last counted encrypt-side use, unix milliseconds (the
    /// audit record's commit time); absent if none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_encrypt_ms: Option<u64>,
    /// Time of the last counted decrypt-side use, unix milliseconds;
    /// absent if none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decrypt_ms: Option<u64>,
    /// The sequence number of the writing node's audit log up to which
    /// (inclusive) this record counts every use of the version: start-up
    /// replays only later audit records into it, so a use is counted
    /// exactly once even across a crash. Meaningful only on its own node.
    pub through_seq: u64,
}

impl UsageRecord {
    /// Adds `other`'s uses to this one: counts are summed (saturating),
    /// times and `through_seq` take the maximum. Used to combine nodes and
    /// to apply a node's not yet stored uses.
    pub fn merge(&mut self, other: &UsageRecord) {
        self.encrypt_count = self.encrypt_count.saturating_add(other.encrypt_count);
        self.decrypt_count = self.decrypt_count.saturating_add(other.decrypt_count);
        self.last_encrypt_ms = max_opt(self.last_encrypt_ms, other.last_encrypt_ms);
        self.last_decrypt_ms = max_opt(self.last_decrypt_ms, other.last_decrypt_ms);
        self.through_seq = self.through_seq.max(other.through_seq);
    }

    /// The stored value (version byte + JSON).
    ///
    /// # Errors
    ///
    /// [`StorageError::Serialize`] (never for this type).
    pub fn encode(&self) -> Result<Vec<u8>, StorageError> {
        encode_record("usage record", self)
    }

    /// Decodes a stored value; `key` only names the record in errors.
    ///
    /// # Errors
    ///
    /// [`StorageError::Corrupt`]/[`StorageError::CorruptJson`] if malformed.
    pub fn decode(key: &[u8], bytes: &[u8]) -> Result<UsageRecord, StorageError> {
        decode_record(USAGE_TABLE, key, bytes)
    }
}

/// The name of the usage namespace in errors and on disk (the RocksDB
/// column family `usage`, the etcd prefix `usage/`).
pub const USAGE_TABLE: &str = "usage";

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// One stored use record as [`crate::CatalogueEngine::usage_rows`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The node that wrote it (`""` on a single node).
    pub node: String,
    /// The key version.
    pub version: u32,
    /// The stored value ([`UsageRecord::decode`]).
    pub value: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_counts_and_keeps_the_latest_times() {
        let mut a = UsageRecord {
            encrypt_count: 2,
            decrypt_count: 0,
            last_encrypt_ms: Some(10),
            last_decrypt_ms: None,
            through_seq: 5,
        };
        a.merge(&UsageRecord {
            encrypt_count: 1,
            decrypt_count: 3,
            last_encrypt_ms: Some(7),
            last_decrypt_ms: Some(9),
            through_seq: 4,
        });
        assert_eq!(
            a,
            UsageRecord {
                encrypt_count: 3,
                decrypt_count: 3,
                last_encrypt_ms: Some(10),
                last_decrypt_ms: Some(9),
                through_seq: 5,
            }
        );
        let bytes = a.encode().expect("encode");
        assert_eq!(UsageRecord::decode(b"k", &bytes).expect("decode"), a);
        assert!(UsageRecord::decode(b"k", b"\x02{}").is_err());
    }
}
