//! Aliases: `alias/…` names for keys, and the per-key index of them.
//!
//! An alias names one live key; the `aliases` column family maps the alias to
//! the key id and `aliases_by_key` lists a key's aliases, both changed in the
//! same synced write.

use crate::engine::{Batch, Table};

use super::{Catalogue, MAX_PAGE_SIZE, clamp_limit};
use crate::error::StorageError;
use crate::keys::{Alias, KeyId, Page};
use crate::schema::{self, CF_ALIASES, CF_ALIASES_BY_KEY};

/// An alias and the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasEntry {
    /// The alias (`alias/…`).
    pub alias: Alias,
    /// The key it names.
    pub key_id: KeyId,
}

impl Catalogue {
    /// Creates an alias for a live key (one synced write).
    ///
    /// # Errors
    ///
    /// [`StorageError::AliasExists`] if the alias names a key already;
    /// [`StorageError::KeyNotFound`] or [`StorageError::KeyDeleted`] if `id` is
    /// not a live key; [`StorageError::Db`] if RocksDB fails.
    pub fn create_alias(&self, alias: &Alias, id: &KeyId) -> Result<(), StorageError> {
        self.write(|w| {
            if self.get_alias(alias)?.is_some() {
                return Err(StorageError::AliasExists {
                    alias: alias.to_string(),
                });
            }
            self.require_live_key(id)?;
            let mut batch = Batch::default();
            self.put_alias(&mut batch, alias, id)?;
            self.commit(w, batch)
        })
    }

    /// Points an existing alias at another live key (one synced write).
    ///
    /// # Errors
    ///
    /// [`StorageError::AliasNotFound`] if the alias does not exist;
    /// [`StorageError::KeyNotFound`] or [`StorageError::KeyDeleted`] if `id` is
    /// not a live key; [`StorageError::Db`] if RocksDB fails.
    pub fn update_alias(&self, alias: &Alias, id: &KeyId) -> Result<(), StorageError> {
        self.write(|w| {
            let old = self
                .get_alias(alias)?
                .ok_or_else(|| StorageError::AliasNotFound {
                    alias: alias.to_string(),
                })?;
            self.require_live_key(id)?;
            let mut batch = Batch::default();
            batch.delete(
                Table::AliasesByKey,
                schema::alias_by_key(old.as_str(), alias.as_str()),
            );
            self.put_alias(&mut batch, alias, id)?;
            self.commit(w, batch)
        })
    }

    /// Deletes an alias (one synced write); the key it named is untouched.
    ///
    /// # Errors
    ///
    /// [`StorageError::AliasNotFound`] if the alias does not exist;
    /// [`StorageError::Db`] if RocksDB fails.
    pub fn delete_alias(&self, alias: &Alias) -> Result<(), StorageError> {
        self.write(|w| {
            let old = self
                .get_alias(alias)?
                .ok_or_else(|| StorageError::AliasNotFound {
                    alias: alias.to_string(),
                })?;
            let mut batch = Batch::default();
            batch.delete(Table::Aliases, alias.as_str().as_bytes());
            batch.delete(
                Table::AliasesByKey,
                schema::alias_by_key(old.as_str(), alias.as_str()),
            );
            self.commit(w, batch)
        })
    }

    /// The key an alias names, if the alias exists.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::InvalidKeyId`] if the stored key id is malformed.
    pub fn get_alias(&self, alias: &Alias) -> Result<Option<KeyId>, StorageError> {
        let k = alias.as_str().as_bytes();
        let Some(v) = self.engine().get(Table::Aliases, k)? else {
            return Ok(None);
        };
        let s = std::str::from_utf8(&v).map_err(|_| StorageError::Corrupt {
            cf: CF_ALIASES,
            key_hex: hex::encode(k),
            reason: "key id is not UTF-8",
        })?;
        Ok(Some(KeyId::parse(s)?))
    }

    /// Aliases ordered by name, all of them or those of one key. `page_token`
    /// is the last alias of the previous page; `limit` is clamped to
    /// 1..=[`MAX_PAGE_SIZE`].
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`],
    /// [`StorageError::InvalidAlias`] or [`StorageError::InvalidKeyId`] if a
    /// stored entry is malformed.
    pub fn list_aliases(
        &self,
        key: Option<&KeyId>,
        page_token: Option<&str>,
        limit: usize,
    ) -> Result<Page<AliasEntry>, StorageError> {
        let limit = clamp_limit(limit);
        let mut items: Vec<AliasEntry> = Vec::new();
        let mut more = false;
        let mut take = |items: &mut Vec<AliasEntry>, entry: AliasEntry| {
            if items.len() == limit {
                more = true;
                false
            } else {
                items.push(entry);
                true
            }
        };
        match key {
            None => {
                self.scan(
                    Table::Aliases,
                    b"",
                    page_token.map(str::as_bytes),
                    |k, v| {
                        let entry = decode_alias_entry(k, v)?;
                        Ok(take(&mut items, entry))
                    },
                )?;
            }
            Some(id) => {
                let start = page_token.map(|t| schema::alias_by_key(id.as_str(), t));
                self.scan(
                    Table::AliasesByKey,
                    id.as_str().as_bytes(),
                    start.as_deref(),
                    |k, _| {
                        let alias =
                            decode_alias(CF_ALIASES_BY_KEY, k, &k[KeyId::LEN.min(k.len())..])?;
                        Ok(take(
                            &mut items,
                            AliasEntry {
                                alias,
                                key_id: id.clone(),
                            },
                        ))
                    },
                )?;
            }
        }
        let next_page_token = if more {
            items.last().map(|e| e.alias.to_string())
        } else {
            None
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    pub(super) fn aliases_of(&self, id: &KeyId) -> Result<Vec<AliasEntry>, StorageError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.list_aliases(Some(id), token.as_deref(), MAX_PAGE_SIZE)?;
            out.extend(page.items);
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    pub(super) fn put_alias(
        &self,
        batch: &mut Batch,
        alias: &Alias,
        id: &KeyId,
    ) -> Result<(), StorageError> {
        batch.put(
            Table::Aliases,
            alias.as_str().as_bytes(),
            id.as_str().as_bytes(),
        );
        batch.put(
            Table::AliasesByKey,
            schema::alias_by_key(id.as_str(), alias.as_str()),
            [],
        );
        Ok(())
    }
}

fn decode_alias(cf: &'static str, key: &[u8], name: &[u8]) -> Result<Alias, StorageError> {
    let s = std::str::from_utf8(name).map_err(|_| StorageError::Corrupt {
        cf,
        key_hex: hex::encode(key),
        reason: "alias is not UTF-8",
    })?;
    Alias::parse(s)
}

fn decode_alias_entry(k: &[u8], v: &[u8]) -> Result<AliasEntry, StorageError> {
    let alias = decode_alias(CF_ALIASES, k, k)?;
    let id = std::str::from_utf8(v).map_err(|_| StorageError::Corrupt {
        cf: CF_ALIASES,
        key_hex: hex::encode(k),
        reason: "key id is not UTF-8",
    })?;
    Ok(AliasEntry {
        alias,
        key_id: KeyId::parse(id)?,
    })
}
