//! Catalogue reads: keys and versions by id, listings, and the pending
//! versions for start-up reconciliation. Reads take no lock; decoded key and
//! version records are served from the record cache while no write has
//! committed since they were read.
//!
//! Listings are paged by the caller, one call per page, while other requests
//! keep writing. So that paging always terminates (issue 13), each listing
//! takes an upper bound fixed at its first page: keys by creation time
//! (`created_until_ms`), aliases by name (`until`, the last name that existed
//! at the first page; aliases record no creation time). Version numbers are
//! bounded by the caller (they only grow).

use crate::engine::Table;

use super::{AliasEntry, Catalogue, clamp_limit};
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
        let generation = self.engine().generation();
        if let Some(record) = self.inner.keys.get(id, generation) {
            return Ok(Some(record));
        }
        let k = id.as_str().as_bytes();
        let Some(bytes) = self.engine().get(Table::Keys, k)? else {
            return Ok(None);
        };
        let record: KeyRecord = decode_record(CF_KEYS, k, &bytes)?;
        self.inner.keys.put(id.clone(), generation, record.clone());
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
        self.list_keys_created_until(page_token, u64::MAX, limit)
    }

    /// As [`Catalogue::list_keys`], but only keys created at or before
    /// `created_until_ms` (unix milliseconds): a listing that passes the time
    /// of its first page with every page never returns a key created after
    /// that millisecond, and so terminates however fast keys are created. (Key
    /// ids are random, so new keys land anywhere in id order; creation time is
    /// the only bound the catalogue records. A key created within the same
    /// millisecond as the first page, after it, may still be listed.)
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn list_keys_created_until(
        &self,
        page_token: Option<&str>,
        created_until_ms: u64,
        limit: usize,
    ) -> Result<Page<KeyRecord>, StorageError> {
        let limit = clamp_limit(limit);
        let mut items: Vec<KeyRecord> = Vec::new();
        let mut more = false;
        self.scan(Table::Keys, b"", page_token.map(str::as_bytes), |k, v| {
            let record = decode_record::<KeyRecord>(CF_KEYS, k, v)?;
            if record.created_at_ms > created_until_ms {
                return Ok(true);
            }
            if items.len() == limit {
                more = true;
                return Ok(false);
            }
            items.push(record);
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

    /// The greatest alias name, of all aliases or of those of `key`; `None`
    /// when there is none. The bound of an alias listing (see
    /// [`Catalogue::list_aliases_until`]).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::InvalidAlias`] if a stored entry is malformed.
    pub fn last_alias(&self, key: Option<&KeyId>) -> Result<Option<Alias>, StorageError> {
        let (table, prefix) = match key {
            None => (Table::Aliases, Vec::new()),
            Some(id) => (Table::AliasesByKey, id.as_str().as_bytes().to_vec()),
        };
        let cf = table.name();
        let Some(k) = self.engine().last_key(table, &prefix)? else {
            return Ok(None);
        };
        let name = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StorageError::Corrupt {
            cf,
            key_hex: hex::encode(&k),
            reason: "alias is not UTF-8",
        })?;
        Ok(Some(Alias::parse(name)?))
    }

    /// As [`Catalogue::list_aliases`], but only names up to and including
    /// `until` (the last name at the listing's first page, from
    /// [`Catalogue::last_alias`]): the listing then terminates however many
    /// aliases are created while it pages, and never returns an alias named
    /// beyond its first page's last one. (An alias created meanwhile between
    /// two existing names ahead of the cursor is listed: aliases record no
    /// creation time.)
    ///
    /// # Errors
    ///
    /// As [`Catalogue::list_aliases`].
    pub fn list_aliases_until(
        &self,
        key: Option<&KeyId>,
        page_token: Option<&str>,
        until: &Alias,
        limit: usize,
    ) -> Result<Page<AliasEntry>, StorageError> {
        let mut page = self.list_aliases(key, page_token, limit)?;
        let before = page.items.len();
        page.items.retain(|entry| entry.alias <= *until);
        if page.items.len() < before || page.items.last().is_some_and(|e| e.alias == *until) {
            page.next_page_token = None;
        }
        Ok(page)
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
        let generation = self.engine().generation();
        let mut ver = match self.inner.versions.get(&k, generation) {
            Some(ver) => ver,
            None => {
                let Some(bytes) = self.engine().get(Table::Versions, &k)? else {
                    return Ok(None);
                };
                let ver: VersionRecord = decode_record(CF_VERSIONS, &k, &bytes)?;
                self.inner.versions.put(k.clone(), generation, ver.clone());
                ver
            }
        };
        // The count lives in the counters, not the record: never cached.
        ver.gcm_invocations = self.counters().current(self.engine(), &k)?;
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
        self.scan(Table::Versions, id.as_str().as_bytes(), None, |k, v| {
            let mut ver: VersionRecord = decode_record(CF_VERSIONS, k, v)?;
            ver.gcm_invocations = self.counters().current(self.engine(), k)?;
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
        self.scan(Table::Pending, b"", None, |k, _| {
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
