//! Catalogue reads: keys and versions by id, listings, and the pending
//! versions for start-up reconciliation. Reads take no lock; decoded key and
//! version records are served from the record cache while no write has
//! committed since they were read.

use super::{Catalogue, clamp_limit};
use crate::error::StorageError;
use crate::keys::{Alias, KeyId, KeyRecord, Page, VersionRecord};
use crate::schema::{self, CF_KEYS, CF_PENDING, CF_VERSIONS, decode_record};

impl Catalogue {
    /// The key record with this id (tombstones included), if any.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StorageError> {
        let generation = self.generation.current();
        if let Some(record) = self.keys.get(id, generation) {
            return Ok(Some(record));
        }
        let k = id.as_str().as_bytes();
        let Some(bytes) = self.db.get(CF_KEYS, k)? else {
            return Ok(None);
        };
        let record: KeyRecord = decode_record(CF_KEYS, k, &bytes)?;
        self.keys.put(id.clone(), generation, record.clone());
        Ok(Some(record))
    }

    /// Looks a key up by id (`key-…`) or alias (`alias/…`).
    ///
    /// # Errors
    ///
    /// [`StorageError::InvalidKeyId`] or [`StorageError::InvalidAlias`] if
    /// `id_or_alias` is neither; [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn resolve_key(&self, id_or_alias: &str) -> Result<Option<KeyRecord>, StorageError> {
        if id_or_alias.starts_with("alias/") {
            let alias = Alias::parse(id_or_alias)?;
            match self.get_alias(&alias)? {
                Some(id) => self.get_key(&id),
                None => Ok(None),
            }
        } else {
            self.get_key(&KeyId::parse(id_or_alias)?)
        }
    }

    /// Keys ordered by id, tombstones included. `page_token` is the last id of
    /// the previous page; `limit` is clamped to 1..=[`crate::MAX_PAGE_SIZE`].
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn list_keys(
        &self,
        page_token: Option<&str>,
        limit: usize,
    ) -> Result<Page<KeyRecord>, StorageError> {
        let limit = clamp_limit(limit);
        let mut items = Vec::new();
        let mut more = false;
        self.scan(CF_KEYS, b"", page_token.map(str::as_bytes), |k, v| {
            if items.len() == limit {
                more = true;
                return Ok(false);
            }
            items.push(decode_record::<KeyRecord>(CF_KEYS, k, v)?);
            Ok(true)
        })?;
        let next_page_token = if more {
            items.last().map(|k| k.id.to_string())
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    /// A version record, with its current GCM invocation count, if it exists.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode (or its counter is malformed).
    pub fn get_version(
        &self,
        id: &KeyId,
        version: u32,
    ) -> Result<Option<VersionRecord>, StorageError> {
        let k = schema::version_key(id.as_str(), version);
        let generation = self.generation.current();
        let mut ver = match self.versions.get(&k, generation) {
            Some(ver) => ver,
            None => {
                let Some(bytes) = self.db.get(CF_VERSIONS, &k)? else {
                    return Ok(None);
                };
                let ver: VersionRecord = decode_record(CF_VERSIONS, &k, &bytes)?;
                self.versions.put(k.clone(), generation, ver.clone());
                ver
            }
        };
        // The count lives in the counters, not the record: never cached.
        ver.gcm_invocations = self.counters.current(&self.db, &k)?;
        Ok(Some(ver))
    }

    /// All versions of a key, in ascending version order (empty for an unknown key).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn list_versions(&self, id: &KeyId) -> Result<Vec<VersionRecord>, StorageError> {
        let mut out = Vec::new();
        self.scan(CF_VERSIONS, id.as_str().as_bytes(), None, |k, v| {
            let mut ver: VersionRecord = decode_record(CF_VERSIONS, k, v)?;
            ver.gcm_invocations = self.counters.current(&self.db, k)?;
            out.push(ver);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every pending version in the database, for start-up reconciliation.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode; [`StorageError::VersionNotFound`] if the
    /// pending index names a version that does not exist.
    pub fn list_pending_versions(&self) -> Result<Vec<VersionRecord>, StorageError> {
        let mut out = Vec::new();
        self.scan(CF_PENDING, b"", None, |k, _| {
            let (id, v) = schema::decode_version_key(k).ok_or_else(|| StorageError::Corrupt {
                cf: CF_PENDING,
                key_hex: hex::encode(k),
                reason: "malformed version key",
            })?;
            let id = KeyId::parse(id)?;
            out.push(self.require_version(&id, v)?);
            Ok(true)
        })?;
        Ok(out)
    }
}
