//! What a restore of a catalogue backup needs (design note
//! `hierarchy-and-cluster.md` §1.6): replaying a key destruction recorded
//! after the backup, putting back version records the backup lacks (from the
//! catalogue being replaced) and reserving version numbers used after the
//! backup, and the marker that makes the next start finish the restore
//! before serving. Only `kms backup restore` (server stopped) and the
//! service's start-up call these; they bypass the lifecycle rules that
//! requests obey (a destruction is replayed whatever state the backup
//! holds), never the invariants of the records themselves.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Catalogue;
use crate::engine::{Batch, Table};
use crate::error::StorageError;
use crate::keys::{KekHandle, KeyId, KeyRecord, KeyState, VersionRecord, VersionState};
use crate::schema::{self, CF_DEFAULT, META_RESTORE_PENDING, decode_record, encode_record};

impl Catalogue {
    /// Replays the destruction of key `id` recorded after a backup: if the
    /// key is live (any state but `Deleted`), it becomes a tombstone in one
    /// write, as [`Catalogue::finalize_key_deletion`] makes it (every
    /// version `Destroyed`, pending markers and aliases removed), whatever
    /// its state in the backup, and the blob of every destroyed wrapped
    /// version is erased from its record (emptied, MAC zeroed: it must not
    /// outlive the destruction in this catalogue). Returns whether anything
    /// changed (false for an unknown or already deleted key).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if the engine fails; [`StorageError::Corrupt`]
    /// or [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn replay_key_destruction(&self, id: &KeyId, now_ms: u64) -> Result<bool, StorageError> {
        self.write(|w| {
            let Some(mut key) = self.get_key(id)? else {
                return Ok(false);
            };
            let mut batch = Batch::default();
            let mut changed = !matches!(key.state, KeyState::Deleted { .. });
            for mut ver in self.list_versions(id)? {
                let mut new = ver.clone();
                if !matches!(new.state, VersionState::Destroyed { .. }) {
                    new.state = VersionState::Destroyed {
                        destroyed_at_ms: now_ms,
                    };
                    new.updated_at_ms = now_ms;
                }
                if let KekHandle::Wrapped { blob, mac, .. } = &mut new.kek {
                    blob.clear();
                    *mac = [0; 32];
                }
                if new != ver {
                    changed = true;
                    ver = new;
                    self.put_version(&mut batch, &ver)?;
                }
                batch.delete(
                    Table::Pending,
                    schema::version_key(id.as_str(), ver.version),
                );
            }
            if !changed {
                return Ok(false);
            }
            for entry in self.aliases_of(id)? {
                batch.delete(Table::Aliases, entry.alias.as_str().as_bytes());
                batch.delete(
                    Table::AliasesByKey,
                    schema::alias_by_key(id.as_str(), entry.alias.as_str()),
                );
            }
            if !matches!(key.state, KeyState::Deleted { .. }) {
                key.state = KeyState::Deleted {
                    deleted_at_ms: now_ms,
                };
            }
            key.updated_at_ms = now_ms;
            self.put_key(&mut batch, &key)?;
            self.commit(w, batch)?;
            Ok(true)
        })
    }

    /// Puts back version records of key `id` that the catalogue lacks
    /// (versions created after the backup it was restored from, read from
    /// the catalogue it replaces), unchanged and never as the primary, and
    /// raises the key's `latest_version` to at least `reserve_through` and
    /// past every version put back, so that no version number used after the
    /// backup is allocated again. Versions the catalogue already holds, and
    /// versions of another key, are left alone. A deleted key is left alone
    /// too. Returns the numbers put back.
    ///
    /// # Errors
    ///
    /// [`StorageError::KeyNotFound`]; [`StorageError::Db`] if the engine
    /// fails; [`StorageError::Corrupt`]/[`StorageError::CorruptJson`] if a
    /// stored record does not decode.
    pub fn restore_versions(
        &self,
        id: &KeyId,
        versions: &[VersionRecord],
        reserve_through: u32,
        now_ms: u64,
    ) -> Result<Vec<u32>, StorageError> {
        self.write(|w| {
            let mut key = self
                .get_key(id)?
                .ok_or_else(|| StorageError::KeyNotFound { id: id.clone() })?;
            if matches!(key.state, KeyState::Deleted { .. }) {
                return Ok(Vec::new());
            }
            let mut batch = Batch::default();
            let mut put_back = Vec::new();
            let mut latest = key.latest_version.max(reserve_through);
            for ver in versions {
                if ver.key_id != *id
                    || ver.state == VersionState::Pending
                    || self.get_version(id, ver.version)?.is_some()
                {
                    continue;
                }
                self.put_version(&mut batch, ver)?;
                put_back.push(ver.version);
                latest = latest.max(ver.version);
            }
            if latest == key.latest_version && put_back.is_empty() {
                return Ok(put_back);
            }
            key.latest_version = latest;
            key.updated_at_ms = now_ms;
            self.put_key(&mut batch, &key)?;
            self.commit(w, batch)?;
            Ok(put_back)
        })
    }

    /// Puts back a key the catalogue lacks (created after the backup it was
    /// restored from, read from the catalogue it replaces) with its
    /// versions, records unchanged; its aliases are not put back (a name
    /// may have moved since). Returns false, writing nothing, if a key with
    /// this id exists.
    ///
    /// # Errors
    ///
    /// [`StorageError::PrimaryNotEnabled`] if the key's primary version is
    /// not among `versions` as `Enabled`; [`StorageError::Db`] if the engine
    /// fails; [`StorageError::Corrupt`]/[`StorageError::CorruptJson`] if a
    /// stored record does not decode.
    pub fn restore_key(
        &self,
        key: &KeyRecord,
        versions: &[VersionRecord],
    ) -> Result<bool, StorageError> {
        self.write(|w| {
            if self.get_key(&key.id)?.is_some() {
                return Ok(false);
            }
            if let Some(primary) = key.primary_version
                && !versions
                    .iter()
                    .any(|v| v.version == primary && v.state == VersionState::Enabled)
            {
                return Err(StorageError::PrimaryNotEnabled {
                    id: key.id.clone(),
                    version: primary,
                });
            }
            let mut batch = Batch::default();
            self.put_key(&mut batch, key)?;
            for ver in versions {
                if ver.key_id == key.id && ver.state != VersionState::Pending {
                    self.put_version(&mut batch, ver)?;
                }
            }
            self.commit(w, batch)?;
            Ok(true)
        })
    }

    /// The pending-restore marker (`schema::META_RESTORE_PENDING`), if a
    /// restore left one for the next start to act on.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if the engine fails;
    /// [`StorageError::Corrupt`]/[`StorageError::CorruptJson`] if it does
    /// not decode as `T`.
    pub fn restore_marker<T: DeserializeOwned>(&self) -> Result<Option<T>, StorageError> {
        self.engine()
            .get(Table::Meta, META_RESTORE_PENDING)?
            .map(|bytes| decode_record(CF_DEFAULT, META_RESTORE_PENDING, &bytes))
            .transpose()
    }

    /// Stores `marker` as the pending-restore marker (one synced write),
    /// replacing any.
    ///
    /// # Errors
    ///
    /// [`StorageError::Serialize`]; [`StorageError::Db`] if the engine fails.
    pub fn set_restore_marker<T: Serialize>(&self, marker: &T) -> Result<(), StorageError> {
        let value = encode_record("restore marker", marker)?;
        self.write(|w| {
            let mut batch = Batch::default();
            batch.put(Table::Meta, META_RESTORE_PENDING, value.clone());
            self.commit(w, batch)
        })
    }

    /// Removes the pending-restore marker (one synced write): the restore
    /// is complete.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if the engine fails.
    pub fn clear_restore_marker(&self) -> Result<(), StorageError> {
        self.write(|w| {
            let mut batch = Batch::default();
            batch.delete(Table::Meta, META_RESTORE_PENDING);
            self.commit(w, batch)
        })
    }
}
