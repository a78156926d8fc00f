//! The key catalogue: keys, versions, aliases and the pending-version index.
//!
//! Every change that touches more than one record is one synced `WriteBatch`.
//! Writers are serialised by one catalogue-wide mutex, which makes every
//! read-modify-write here (including the `update_*` closures) a compare-and-set
//! against concurrent catalogue writers in this process; catalogue writes are
//! rare, so one lock costs nothing. Reads take no lock.
//!
//! Never stores key material: versions record where their KEK lives, not the KEK.

use std::sync::{Arc, Mutex, MutexGuard};

use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::db::Db;
use crate::error::StorageError;
use crate::gcm_counter::GcmCounters;
use crate::keys::{
    Alias, KekHandle, KeyId, KeyRecord, KeyState, NewKey, Page, VersionRecord, VersionState,
};
use crate::record_cache::{Generation, RecordCache};
use crate::schema::{self, CF_ALIASES, CF_ALIASES_BY_KEY, CF_KEYS, CF_PENDING, CF_VERSIONS};

/// Largest page a listing returns, whatever the caller asks for.
pub const MAX_PAGE_SIZE: usize = 1000;

/// An alias and the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasEntry {
    pub alias: Alias,
    pub key_id: KeyId,
}

/// The key catalogue. Obtain it with [`crate::Storage::catalogue`].
#[derive(Debug)]
pub struct Catalogue {
    db: Arc<Db>,
    write_lock: Mutex<()>,
    counters: GcmCounters,
    /// Bumped after every catalogue write: invalidates the decoded records.
    generation: Generation,
    keys: RecordCache<KeyId, KeyRecord>,
    versions: RecordCache<Vec<u8>, VersionRecord>,
}

pub(crate) fn encode_record<T: Serialize>(
    what: &'static str,
    v: &T,
) -> Result<Vec<u8>, StorageError> {
    let mut out = vec![schema::CATALOGUE_RECORD_V1];
    serde_json::to_writer(&mut out, v)
        .map_err(|source| StorageError::Serialize { what, source })?;
    Ok(out)
}

pub(crate) fn decode_record<T: DeserializeOwned>(
    cf: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&schema::CATALOGUE_RECORD_V1, json)) => {
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

fn clamp_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE_SIZE)
}

impl Catalogue {
    pub(crate) fn new(db: Arc<Db>, gcm_reservation_block: u64) -> Self {
        Catalogue {
            counters: GcmCounters::new(gcm_reservation_block),
            db,
            write_lock: Mutex::new(()),
            generation: Generation::new(),
            keys: RecordCache::new(),
            versions: RecordCache::new(),
        }
    }

    /// Every change to keys, versions and aliases goes through here: one
    /// synced batch, then the decoded records read before it are invalid.
    fn commit(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let result = self.db.write_synced(batch);
        self.generation.bump();
        result
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data (the state is in the database), so a panic
        // in another writer leaves nothing inconsistent behind.
        self.write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    // ---- keys -------------------------------------------------------------

    /// Creates a key and its first version (version 1, `Pending`) plus any
    /// aliases, in one synced write. Commit the version with
    /// [`Catalogue::commit_version`] once its KEK exists in the HSM.
    pub fn create_key(
        &self,
        new: NewKey,
        first_kek: KekHandle,
        now_ms: u64,
    ) -> Result<(KeyRecord, VersionRecord), StorageError> {
        let _guard = self.lock();
        if self.db.get(CF_KEYS, new.id.as_str().as_bytes())?.is_some() {
            return Err(StorageError::KeyExists {
                id: new.id.to_string(),
            });
        }
        let mut aliases = new.aliases;
        aliases.sort();
        aliases.dedup();
        for alias in &aliases {
            if self
                .db
                .get(CF_ALIASES, alias.as_str().as_bytes())?
                .is_some()
            {
                return Err(StorageError::AliasExists {
                    alias: alias.to_string(),
                });
            }
        }
        let key = KeyRecord {
            id: new.id,
            description: new.description,
            tags: new.tags,
            spec: new.spec,
            state: new.state,
            primary_version: None,
            latest_version: 1,
            rotation: new.rotation,
            next_rotation_at_ms: new.next_rotation_at_ms,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            policy: None,
        };
        let version = VersionRecord {
            key_id: key.id.clone(),
            version: 1,
            state: VersionState::Pending,
            kek: first_kek,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            gcm_invocations: 0,
        };
        let mut batch = WriteBatch::default();
        self.put_key(&mut batch, &key)?;
        self.put_version(&mut batch, &version)?;
        batch.put_cf(
            self.db.cf(CF_PENDING)?,
            schema::version_key(key.id.as_str(), 1),
            [],
        );
        for alias in &aliases {
            self.put_alias(&mut batch, alias, &key.id)?;
        }
        self.commit(batch)?;
        Ok((key, version))
    }

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
    /// the previous page.
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

    /// Read-modify-write of a key under the catalogue lock. `f` may refuse the
    /// change by returning an error (nothing is written). The id, creation time
    /// and `latest_version` cannot change; a new `primary_version` must name an
    /// enabled version. Tombstones cannot be updated.
    pub fn update_key<E: From<StorageError>>(
        &self,
        id: &KeyId,
        now_ms: u64,
        f: impl FnOnce(&mut KeyRecord) -> Result<(), E>,
    ) -> Result<KeyRecord, E> {
        let _guard = self.lock();
        let old = self.require_live_key(id)?;
        let mut new = old.clone();
        f(&mut new)?;
        if new.id != old.id {
            return Err(StorageError::ImmutableField { field: "id" }.into());
        }
        if new.created_at_ms != old.created_at_ms {
            return Err(StorageError::ImmutableField {
                field: "created_at_ms",
            }
            .into());
        }
        if new.latest_version != old.latest_version {
            return Err(StorageError::ImmutableField {
                field: "latest_version",
            }
            .into());
        }
        if matches!(new.state, KeyState::Deleted { .. }) {
            // Tombstoning must also destroy versions and drop aliases.
            return Err(StorageError::ImmutableField { field: "state" }.into());
        }
        if new.primary_version != old.primary_version {
            let Some(v) = new.primary_version else {
                return Err(StorageError::ImmutableField {
                    field: "primary_version",
                }
                .into());
            };
            let ver = self.require_version(id, v)?;
            if ver.state != VersionState::Enabled {
                return Err(StorageError::InvalidVersionTransition {
                    id: id.to_string(),
                    version: v,
                }
                .into());
            }
        }
        new.updated_at_ms = now_ms;
        let mut batch = WriteBatch::default();
        self.put_key(&mut batch, &new)?;
        self.commit(batch)?;
        Ok(new)
    }

    /// Turns a key into a tombstone in one synced write: state `Deleted`, every
    /// version `Destroyed`, pending markers and aliases removed. Call it after
    /// the KEKs have been destroyed in the HSM.
    pub fn finalize_key_deletion(
        &self,
        id: &KeyId,
        now_ms: u64,
    ) -> Result<KeyRecord, StorageError> {
        let _guard = self.lock();
        let mut key = self.require_live_key(id)?;
        let mut batch = WriteBatch::default();
        for mut ver in self.list_versions(id)? {
            if !matches!(ver.state, VersionState::Destroyed { .. }) {
                ver.state = VersionState::Destroyed {
                    destroyed_at_ms: now_ms,
                };
                ver.updated_at_ms = now_ms;
                self.put_version(&mut batch, &ver)?;
            }
            batch.delete_cf(
                self.db.cf(CF_PENDING)?,
                schema::version_key(id.as_str(), ver.version),
            );
        }
        for entry in self.aliases_of(id)? {
            batch.delete_cf(self.db.cf(CF_ALIASES)?, entry.alias.as_str().as_bytes());
            batch.delete_cf(
                self.db.cf(CF_ALIASES_BY_KEY)?,
                schema::alias_by_key(id.as_str(), entry.alias.as_str()),
            );
        }
        key.state = KeyState::Deleted {
            deleted_at_ms: now_ms,
        };
        key.updated_at_ms = now_ms;
        self.put_key(&mut batch, &key)?;
        self.commit(batch)?;
        Ok(key)
    }

    // ---- versions -----------------------------------------------------------

    /// Allocates the next version number and records it as `Pending` (synced).
    /// `kek` receives the new version number and says where its KEK will live.
    pub fn add_pending_version(
        &self,
        id: &KeyId,
        now_ms: u64,
        kek: impl FnOnce(u32) -> KekHandle,
    ) -> Result<VersionRecord, StorageError> {
        let _guard = self.lock();
        let mut key = self.require_live_key(id)?;
        let v = key
            .latest_version
            .checked_add(1)
            .ok_or_else(|| StorageError::VersionsExhausted { id: id.to_string() })?;
        key.latest_version = v;
        key.updated_at_ms = now_ms;
        let version = VersionRecord {
            key_id: id.clone(),
            version: v,
            state: VersionState::Pending,
            kek: kek(v),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            gcm_invocations: 0,
        };
        let mut batch = WriteBatch::default();
        self.put_key(&mut batch, &key)?;
        self.put_version(&mut batch, &version)?;
        batch.put_cf(
            self.db.cf(CF_PENDING)?,
            schema::version_key(id.as_str(), v),
            [],
        );
        self.commit(batch)?;
        Ok(version)
    }

    /// Second phase of version creation: the pending version becomes `Enabled`
    /// and the key's primary, in one synced write.
    pub fn commit_version(
        &self,
        id: &KeyId,
        version: u32,
        now_ms: u64,
    ) -> Result<(KeyRecord, VersionRecord), StorageError> {
        let _guard = self.lock();
        let mut key = self.require_live_key(id)?;
        let mut ver = self.require_pending(id, version)?;
        ver.state = VersionState::Enabled;
        ver.updated_at_ms = now_ms;
        key.primary_version = Some(version);
        key.updated_at_ms = now_ms;
        let mut batch = WriteBatch::default();
        self.put_key(&mut batch, &key)?;
        self.put_version(&mut batch, &ver)?;
        batch.delete_cf(
            self.db.cf(CF_PENDING)?,
            schema::version_key(id.as_str(), version),
        );
        self.commit(batch)?;
        Ok((key, ver))
    }

    /// Abandons a pending version (its KEK was never made, or was destroyed):
    /// it becomes `Destroyed` and its number is never reused.
    pub fn discard_version(
        &self,
        id: &KeyId,
        version: u32,
        now_ms: u64,
    ) -> Result<VersionRecord, StorageError> {
        let _guard = self.lock();
        let mut ver = self.require_pending(id, version)?;
        ver.state = VersionState::Destroyed {
            destroyed_at_ms: now_ms,
        };
        ver.updated_at_ms = now_ms;
        let mut batch = WriteBatch::default();
        self.put_version(&mut batch, &ver)?;
        batch.delete_cf(
            self.db.cf(CF_PENDING)?,
            schema::version_key(id.as_str(), version),
        );
        self.commit(batch)?;
        Ok(ver)
    }

    /// Every pending version in the database, for start-up reconciliation.
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

    /// All versions of a key, in ascending version order.
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

    /// Read-modify-write of a version under the catalogue lock. The key id,
    /// number, KEK handle and creation time cannot change; pending versions
    /// change only through commit/discard; `Destroyed` is final.
    pub fn update_version<E: From<StorageError>>(
        &self,
        id: &KeyId,
        version: u32,
        now_ms: u64,
        f: impl FnOnce(&mut VersionRecord) -> Result<(), E>,
    ) -> Result<VersionRecord, E> {
        let _guard = self.lock();
        self.require_live_key(id)?;
        let old = self.require_version(id, version)?;
        let mut new = old.clone();
        f(&mut new)?;
        if new.key_id != old.key_id || new.version != old.version {
            return Err(StorageError::ImmutableField { field: "version" }.into());
        }
        if new.kek != old.kek {
            return Err(StorageError::ImmutableField { field: "kek" }.into());
        }
        if new.created_at_ms != old.created_at_ms {
            return Err(StorageError::ImmutableField {
                field: "created_at_ms",
            }
            .into());
        }
        let bad = match (old.state, new.state) {
            (VersionState::Pending, _) | (_, VersionState::Pending) => old.state != new.state,
            (VersionState::Destroyed { .. }, _) => old.state != new.state,
            _ => false,
        };
        if bad || old.state == VersionState::Pending {
            return Err(StorageError::InvalidVersionTransition {
                id: id.to_string(),
                version,
            }
            .into());
        }
        new.updated_at_ms = now_ms;
        new.gcm_invocations = old.gcm_invocations;
        let mut batch = WriteBatch::default();
        self.put_version(&mut batch, &new)?;
        self.commit(batch)?;
        Ok(new)
    }

    /// Sets a committed version's state (Enabled, Disabled, ScheduledDestruction, Destroyed).
    pub fn set_version_state(
        &self,
        id: &KeyId,
        version: u32,
        state: VersionState,
        now_ms: u64,
    ) -> Result<VersionRecord, StorageError> {
        self.update_version(id, version, now_ms, |v| {
            v.state = state;
            Ok::<(), StorageError>(())
        })
    }

    /// Counts `n` AES-GCM invocations of a version and returns the total so far.
    /// See [`GcmCounters`](crate::gcm_counter) for why this is cheap and never
    /// under-counts across crashes.
    pub fn add_gcm_invocations(
        &self,
        id: &KeyId,
        version: u32,
        n: u64,
    ) -> Result<u64, StorageError> {
        let k = schema::version_key(id.as_str(), version);
        self.counters.add(&self.db, &k, n, || {
            if self.db.get(CF_VERSIONS, &k)?.is_some() {
                Ok(())
            } else {
                Err(StorageError::VersionNotFound {
                    id: id.to_string(),
                    version,
                })
            }
        })
    }

    // ---- aliases ------------------------------------------------------------

    /// Creates an alias for a live key; fails if the alias exists.
    pub fn create_alias(&self, alias: &Alias, id: &KeyId) -> Result<(), StorageError> {
        let _guard = self.lock();
        if self.get_alias(alias)?.is_some() {
            return Err(StorageError::AliasExists {
                alias: alias.to_string(),
            });
        }
        self.require_live_key(id)?;
        let mut batch = WriteBatch::default();
        self.put_alias(&mut batch, alias, id)?;
        self.commit(batch)
    }

    /// Points an existing alias at another live key.
    pub fn update_alias(&self, alias: &Alias, id: &KeyId) -> Result<(), StorageError> {
        let _guard = self.lock();
        let old = self
            .get_alias(alias)?
            .ok_or_else(|| StorageError::AliasNotFound {
                alias: alias.to_string(),
            })?;
        self.require_live_key(id)?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(
            self.db.cf(CF_ALIASES_BY_KEY)?,
            schema::alias_by_key(old.as_str(), alias.as_str()),
        );
        self.put_alias(&mut batch, alias, id)?;
        self.commit(batch)
    }

    pub fn delete_alias(&self, alias: &Alias) -> Result<(), StorageError> {
        let _guard = self.lock();
        let old = self
            .get_alias(alias)?
            .ok_or_else(|| StorageError::AliasNotFound {
                alias: alias.to_string(),
            })?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.db.cf(CF_ALIASES)?, alias.as_str().as_bytes());
        batch.delete_cf(
            self.db.cf(CF_ALIASES_BY_KEY)?,
            schema::alias_by_key(old.as_str(), alias.as_str()),
        );
        self.commit(batch)
    }

    pub fn get_alias(&self, alias: &Alias) -> Result<Option<KeyId>, StorageError> {
        let k = alias.as_str().as_bytes();
        let Some(v) = self.db.get(CF_ALIASES, k)? else {
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
    /// is the last alias of the previous page.
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
                self.scan(CF_ALIASES, b"", page_token.map(str::as_bytes), |k, v| {
                    let entry = decode_alias_entry(k, v)?;
                    Ok(take(&mut items, entry))
                })?;
            }
            Some(id) => {
                let start = page_token.map(|t| schema::alias_by_key(id.as_str(), t));
                self.scan(
                    CF_ALIASES_BY_KEY,
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

    // ---- helpers ------------------------------------------------------------

    fn aliases_of(&self, id: &KeyId) -> Result<Vec<AliasEntry>, StorageError> {
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

    fn require_live_key(&self, id: &KeyId) -> Result<KeyRecord, StorageError> {
        let key = self
            .get_key(id)?
            .ok_or_else(|| StorageError::KeyNotFound { id: id.to_string() })?;
        if matches!(key.state, KeyState::Deleted { .. }) {
            return Err(StorageError::KeyDeleted { id: id.to_string() });
        }
        Ok(key)
    }

    fn require_version(&self, id: &KeyId, version: u32) -> Result<VersionRecord, StorageError> {
        self.get_version(id, version)?
            .ok_or_else(|| StorageError::VersionNotFound {
                id: id.to_string(),
                version,
            })
    }

    fn require_pending(&self, id: &KeyId, version: u32) -> Result<VersionRecord, StorageError> {
        let ver = self.require_version(id, version)?;
        if ver.state != VersionState::Pending {
            return Err(StorageError::VersionNotPending {
                id: id.to_string(),
                version,
            });
        }
        Ok(ver)
    }

    fn put_key(&self, batch: &mut WriteBatch, key: &KeyRecord) -> Result<(), StorageError> {
        batch.put_cf(
            self.db.cf(CF_KEYS)?,
            key.id.as_str().as_bytes(),
            encode_record("key", key)?,
        );
        Ok(())
    }

    fn put_version(&self, batch: &mut WriteBatch, ver: &VersionRecord) -> Result<(), StorageError> {
        batch.put_cf(
            self.db.cf(CF_VERSIONS)?,
            schema::version_key(ver.key_id.as_str(), ver.version),
            encode_record("version", ver)?,
        );
        Ok(())
    }

    fn put_alias(
        &self,
        batch: &mut WriteBatch,
        alias: &Alias,
        id: &KeyId,
    ) -> Result<(), StorageError> {
        batch.put_cf(
            self.db.cf(CF_ALIASES)?,
            alias.as_str().as_bytes(),
            id.as_str().as_bytes(),
        );
        batch.put_cf(
            self.db.cf(CF_ALIASES_BY_KEY)?,
            schema::alias_by_key(id.as_str(), alias.as_str()),
            [],
        );
        Ok(())
    }

    /// Walks `cf` in key order over keys starting with `prefix`, beginning
    /// after `after` (exclusive) if given, until `f` returns false.
    fn scan(
        &self,
        cf: &'static str,
        prefix: &[u8],
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        let start = after.unwrap_or(prefix);
        let iter = self.db.db.iterator_cf(
            self.db.cf(cf)?,
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(StorageError::db("iterate"))?;
            if !k.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|a| *a == *k) {
                continue;
            }
            if !f(&k, &v)? {
                break;
            }
        }
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
