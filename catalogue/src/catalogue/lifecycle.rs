//! Every catalogue write that moves a key or a version through its
//! lifecycle: creation, two-phase version creation (pending, then committed or
//! discarded), state changes and the final tombstone.
//!
//! Each is one synced write under the catalogue lock, and checks the
//! transition against the state it read under that lock. Whatever the caller
//! asks, no write here breaks these invariants:
//!
//! - a key's primary version is an `Enabled` version (it cannot be disabled,
//!   scheduled for destruction or destroyed while primary);
//! - a key pending deletion (or deleted) gets no new version and no primary
//!   change, and a key with a version being created cannot be scheduled for
//!   deletion (that version would arrive after the schedule);
//! - version numbers are allocated once, in order, and never reused.

use crate::engine::{Batch, Table};

use super::Catalogue;
use crate::error::StorageError;
use crate::keys::{
    KekHandle, KeyId, KeyOrigin, KeyRecord, KeyState, NewKey, VersionRecord, VersionState,
};
use crate::schema;

impl Catalogue {
    /// Creates a key and its first version (version 1, `Pending`) plus any
    /// aliases, in one synced write. Commit the version with
    /// [`Catalogue::commit_version`] once its KEK exists in the HSM.
    ///
    /// # Errors
    ///
    /// [`StorageError::KeyExists`] if the id was ever used;
    /// [`StorageError::AliasExists`] if one of the aliases names a key already;
    /// [`StorageError::KeyPendingDeletion`] or [`StorageError::ImmutableField`]
    /// (`state`) for a new key that is pending deletion or deleted (it would
    /// get a version); [`StorageError::Db`] if RocksDB fails. Nothing is
    /// written on error.
    pub fn create_key(
        &self,
        new: NewKey,
        first_kek: KekHandle,
        now_ms: u64,
    ) -> Result<(KeyRecord, VersionRecord), StorageError> {
        self.create_key_with(new, first_kek, now_ms, false)
    }

    /// Creates a key whose first version (version 1) is `Enabled` and
    /// primary at once, plus any aliases, in one synced write: for a KEK
    /// that exists before the write and needs no HSM object (a wrapped
    /// version, `KekHandle::Wrapped`, whose MAC binds it to version 1).
    /// A crash before the write leaves nothing behind; no pending state.
    ///
    /// # Errors
    ///
    /// As [`Catalogue::create_key`]. Nothing is written on error.
    pub fn create_key_enabled(
        &self,
        new: NewKey,
        first_kek: KekHandle,
        now_ms: u64,
    ) -> Result<(KeyRecord, VersionRecord), StorageError> {
        self.create_key_with(new, first_kek, now_ms, true)
    }

    fn create_key_with(
        &self,
        new: NewKey,
        first_kek: KekHandle,
        now_ms: u64,
        enabled: bool,
    ) -> Result<(KeyRecord, VersionRecord), StorageError> {
        let (key, version) =
            self.create_key_records(new, KeyOrigin::Kms, Some((first_kek, enabled)), now_ms)?;
        // Always Some: `first` was given. (No panic path in library code.)
        let version = version.ok_or(StorageError::ImmutableField { field: "version" })?;
        Ok((key, version))
    }

    /// Creates a key of origin `External` with no version (it awaits its
    /// first `ImportKeyMaterial`: AWS `PendingImport`), plus any aliases,
    /// in one synced write. `primary_version` stays `None` and
    /// `latest_version` 0 until [`Catalogue::add_enabled_version_of`] adds
    /// an imported version.
    ///
    /// # Errors
    ///
    /// As [`Catalogue::create_key`]. Nothing is written on error.
    pub fn create_key_pending_import(
        &self,
        new: NewKey,
        now_ms: u64,
    ) -> Result<KeyRecord, StorageError> {
        self.create_key_records(new, KeyOrigin::External, None, now_ms)
            .map(|(key, _)| key)
    }

    /// The one write that creates a key: its record, its aliases and, with
    /// `first` = (KEK, enabled), version 1 (enabled and primary, or pending
    /// creation); without `first` (a key awaiting imported material) no
    /// version, `latest_version` 0 and no primary. Under the catalogue lock;
    /// nothing is written on error.
    fn create_key_records(
        &self,
        new: NewKey,
        origin: KeyOrigin,
        first: Option<(KekHandle, bool)>,
        now_ms: u64,
    ) -> Result<(KeyRecord, Option<VersionRecord>), StorageError> {
        match new.state {
            KeyState::PendingDeletion { .. } => {
                return Err(StorageError::KeyPendingDeletion { id: new.id });
            }
            KeyState::Deleted { .. } => {
                return Err(StorageError::ImmutableField { field: "state" });
            }
            _ => {}
        }
        self.write(|w| {
            // A conflicted attempt runs again: each works on its own copy.
            let new = new.clone();
            let first = first.clone();
            if self
                .engine()
                .get(Table::Keys, new.id.as_str().as_bytes())?
                .is_some()
            {
                return Err(StorageError::KeyExists { id: new.id.clone() });
            }
            let mut aliases = new.aliases;
            aliases.sort();
            aliases.dedup();
            for alias in &aliases {
                if self
                    .engine()
                    .get(Table::Aliases, alias.as_str().as_bytes())?
                    .is_some()
                {
                    return Err(StorageError::AliasExists {
                        alias: alias.to_string(),
                    });
                }
            }
            let enabled = first.as_ref().is_some_and(|(_, enabled)| *enabled);
            let key = KeyRecord {
                id: new.id,
                description: new.description,
                tags: new.tags,
                spec: new.spec,
                state: new.state,
                primary_version: enabled.then_some(1),
                latest_version: u32::from(first.is_some()),
                rotation: new.rotation,
                next_rotation_at_ms: new.next_rotation_at_ms,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                policy: None,
                origin,
            };
            let version = first.map(|(kek, enabled)| VersionRecord {
                key_id: key.id.clone(),
                version: 1,
                origin,
                state: if enabled {
                    VersionState::Enabled
                } else {
                    VersionState::Pending
                },
                kek,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                gcm_invocations: 0,
            });
            let mut batch = Batch::default();
            self.put_key(&mut batch, &key)?;
            if let Some(version) = &version {
                self.put_version(&mut batch, version)?;
                if version.state == VersionState::Pending {
                    batch.put(Table::Pending, schema::version_key(key.id.as_str(), 1), []);
                }
            }
            for alias in &aliases {
                self.put_alias(&mut batch, alias, &key.id)?;
            }
            self.commit(w, batch)?;
            Ok((key, version))
        })
    }

    /// Read-modify-write of a key under the catalogue lock. `f` may refuse the
    /// change by returning an error (nothing is written); a change that
    /// leaves the record as it was writes nothing either (the record,
    /// `updated_at_ms` included, is returned unchanged). The id, creation time
    /// and `latest_version` cannot change; a new `primary_version` must name an
    /// enabled version, and cannot be set on a key pending deletion (before or
    /// after `f`); a key with a version being created cannot become pending
    /// deletion. Tombstones cannot be updated. Returns the new record.
    ///
    /// # Errors
    ///
    /// `f`'s own error; [`StorageError::KeyNotFound`] or
    /// [`StorageError::KeyDeleted`]; [`StorageError::ImmutableField`] if `f`
    /// changed a fixed field (or set the state to `Deleted`: use
    /// [`Catalogue::finalize_key_deletion`]); [`StorageError::VersionNotFound`] or
    /// [`StorageError::InvalidVersionTransition`] for a new primary version that
    /// is not an enabled version; [`StorageError::PrimaryNotEnabled`] if the
    /// unchanged primary is not enabled (a damaged record);
    /// [`StorageError::KeyPendingDeletion`] for a primary change of a key
    /// pending deletion; [`StorageError::VersionBeingCreated`] for scheduling
    /// the deletion of a key with a pending version; [`StorageError::Db`] if
    /// RocksDB fails.
    pub fn update_key<E: From<StorageError>>(
        &self,
        id: &KeyId,
        now_ms: u64,
        mut f: impl FnMut(&mut KeyRecord) -> Result<(), E>,
    ) -> Result<KeyRecord, E> {
        self.write(|w| {
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
            let pending_deletion =
                |k: &KeyRecord| matches!(k.state, KeyState::PendingDeletion { .. });
            if new.primary_version != old.primary_version {
                let Some(v) = new.primary_version else {
                    return Err(StorageError::ImmutableField {
                        field: "primary_version",
                    }
                    .into());
                };
                if pending_deletion(&old) || pending_deletion(&new) {
                    return Err(StorageError::KeyPendingDeletion { id: id.clone() }.into());
                }
                let ver = self.require_version(id, v)?;
                if ver.state != VersionState::Enabled {
                    return Err(StorageError::InvalidVersionTransition {
                        id: id.clone(),
                        version: v,
                    }
                    .into());
                }
            } else {
                self.require_enabled_primary(&new)?;
            }
            if pending_deletion(&new)
                && !pending_deletion(&old)
                && let Some(version) = self.pending_version_of(id)?
            {
                return Err(StorageError::VersionBeingCreated {
                    id: id.clone(),
                    version,
                }
                .into());
            }
            if new == old {
                // Nothing changed (enabling an enabled key, re-applying the same
                // tags): no write, and `updated_at_ms` keeps meaning "last change".
                return Ok(old);
            }
            new.updated_at_ms = now_ms;
            let mut batch = Batch::default();
            self.put_key(&mut batch, &new)?;
            // In a cluster the write returns only once no node can act on the
            // old record (a disable, a tighter policy: design note I4).
            self.commit(w, batch)?;
            Ok(new)
        })
    }

    /// Turns a key into a tombstone in one synced write: state `Deleted`, every
    /// version `Destroyed`, pending markers and aliases removed. Call it after
    /// the KEKs have been destroyed in the HSM. Only a key pending deletion,
    /// or one that never had a primary version (its creation failed), can
    /// be deleted.
    ///
    /// # Errors
    ///
    /// [`StorageError::KeyNotFound`] or [`StorageError::KeyDeleted`];
    /// [`StorageError::NotPendingDeletion`] for a key with a primary version
    /// that is not pending deletion (e.g. its deletion was cancelled);
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn finalize_key_deletion(
        &self,
        id: &KeyId,
        now_ms: u64,
    ) -> Result<KeyRecord, StorageError> {
        self.write(|w| {
            let mut key = self.require_live_key(id)?;
            if key.primary_version.is_some()
                && !matches!(key.state, KeyState::PendingDeletion { .. })
            {
                return Err(StorageError::NotPendingDeletion { id: id.clone() });
            }
            let mut batch = Batch::default();
            for mut ver in self.list_versions(id)? {
                if !matches!(ver.state, VersionState::Destroyed { .. }) {
                    ver.state = VersionState::Destroyed {
                        destroyed_at_ms: now_ms,
                    };
                    ver.updated_at_ms = now_ms;
                    self.put_version(&mut batch, &ver)?;
                }
                batch.delete(
                    Table::Pending,
                    schema::version_key(id.as_str(), ver.version),
                );
            }
            for entry in self.aliases_of(id)? {
                batch.delete(Table::Aliases, entry.alias.as_str().as_bytes());
                batch.delete(
                    Table::AliasesByKey,
                    schema::alias_by_key(id.as_str(), entry.alias.as_str()),
                );
            }
            key.state = KeyState::Deleted {
                deleted_at_ms: now_ms,
            };
            key.updated_at_ms = now_ms;
            self.put_key(&mut batch, &key)?;
            self.commit(w, batch)?;
            Ok(key)
        })
    }

    /// The live key `id` and the number its next version gets, checked as
    /// every version creation needs (call under the catalogue lock).
    ///
    /// # Errors
    /// As [`Catalogue::add_pending_version`].
    fn next_version(&self, id: &KeyId) -> Result<(KeyRecord, u32), StorageError> {
        let key = self.require_live_key(id)?;
        if matches!(key.state, KeyState::PendingDeletion { .. }) {
            return Err(StorageError::KeyPendingDeletion { id: id.clone() });
        }
        let v = key
            .latest_version
            .checked_add(1)
            .ok_or_else(|| StorageError::VersionsExhausted { id: id.clone() })?;
        if self.get_version(id, v)?.is_some() {
            return Err(StorageError::VersionExists {
                id: id.clone(),
                version: v,
            });
        }
        Ok((key, v))
    }

    /// Allocates the next version number and records it as `Pending` (synced).
    /// `kek` receives the new version number and says where its KEK will live.
    ///
    /// # Errors
    ///
    /// [`StorageError::KeyNotFound`] or [`StorageError::KeyDeleted`];
    /// [`StorageError::KeyPendingDeletion`] for a key pending deletion;
    /// [`StorageError::VersionsExhausted`] after `u32::MAX` versions;
    /// [`StorageError::VersionExists`] if a record already holds the next
    /// number (a damaged database: numbers are never reused);
    /// [`StorageError::Db`] if RocksDB fails.
    pub fn add_pending_version(
        &self,
        id: &KeyId,
        now_ms: u64,
        mut kek: impl FnMut(u32) -> KekHandle,
    ) -> Result<VersionRecord, StorageError> {
        self.write(|w| {
            let (mut key, v) = self.next_version(id)?;
            if !key.origin.is_kms() {
                return Err(StorageError::OriginMismatch { id: id.clone() });
            }
            key.latest_version = v;
            key.updated_at_ms = now_ms;
            let version = VersionRecord {
                key_id: id.clone(),
                version: v,
                origin: KeyOrigin::Kms,
                state: VersionState::Pending,
                kek: kek(v),
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                gcm_invocations: 0,
            };
            let mut batch = Batch::default();
            self.put_key(&mut batch, &key)?;
            self.put_version(&mut batch, &version)?;
            batch.put(Table::Pending, schema::version_key(id.as_str(), v), []);
            self.commit(w, batch)?;
            Ok(version)
        })
    }

    /// One-step version creation for a KEK that needs no HSM object (a
    /// wrapped version): under the catalogue lock, allocates the next
    /// version number, asks `kek` for the version's KEK handle for that
    /// number (a wrapped record's MAC covers it), and writes the version
    /// `Enabled` and primary, with the key's `latest_version`, in one synced
    /// write. Same invariants as [`Catalogue::add_pending_version`] (key
    /// live and not pending deletion; numbers never reused); no pending
    /// state, so a crash before the write leaves nothing behind. `kek` runs
    /// under the catalogue lock: keep it short (one HSM HMAC).
    ///
    /// # Errors
    ///
    /// `kek`'s own error (nothing written); otherwise as
    /// [`Catalogue::add_pending_version`].
    pub fn add_enabled_version<E: From<StorageError>>(
        &self,
        id: &KeyId,
        now_ms: u64,
        kek: impl FnMut(u32) -> Result<KekHandle, E>,
    ) -> Result<(KeyRecord, VersionRecord), E> {
        self.add_enabled_version_of(id, KeyOrigin::Kms, now_ms, kek)
    }

    /// [`Catalogue::add_enabled_version`] for a version of `origin`: an
    /// imported version (`External`) is stored the same way, enabled and
    /// primary in one write, and only on a key whose origin is `External`.
    ///
    /// # Errors
    ///
    /// [`StorageError::OriginMismatch`] if `origin` is not the key's;
    /// otherwise as [`Catalogue::add_enabled_version`]. Nothing is written
    /// on error.
    pub fn add_enabled_version_of<E: From<StorageError>>(
        &self,
        id: &KeyId,
        origin: KeyOrigin,
        now_ms: u64,
        mut kek: impl FnMut(u32) -> Result<KekHandle, E>,
    ) -> Result<(KeyRecord, VersionRecord), E> {
        self.write(|w| {
            let (mut key, v) = self.next_version(id)?;
            if key.origin != origin {
                return Err(StorageError::OriginMismatch { id: id.clone() }.into());
            }
            let version = VersionRecord {
                key_id: id.clone(),
                version: v,
                origin,
                state: VersionState::Enabled,
                kek: kek(v)?,
                created_at_ms: now_ms,
                updated_at_ms: now_ms,
                gcm_invocations: 0,
            };
            key.latest_version = v;
            key.primary_version = Some(v);
            key.updated_at_ms = now_ms;
            let mut batch = Batch::default();
            self.put_key(&mut batch, &key)?;
            self.put_version(&mut batch, &version)?;
            self.commit(w, batch)?;
            Ok((key, version))
        })
    }

    /// Second phase of version creation: the pending version becomes `Enabled`
    /// and the key's primary, in one synced write.
    ///
    /// # Errors
    ///
    /// [`StorageError::KeyNotFound`] or [`StorageError::KeyDeleted`];
    /// [`StorageError::KeyPendingDeletion`] for a key pending deletion (its
    /// primary cannot change: discard the version instead);
    /// [`StorageError::VersionNotFound`]; [`StorageError::VersionNotPending`] if
    /// the version was already committed or discarded; [`StorageError::Db`] if
    /// RocksDB fails.
    pub fn commit_version(
        &self,
        id: &KeyId,
        version: u32,
        now_ms: u64,
    ) -> Result<(KeyRecord, VersionRecord), StorageError> {
        self.write(|w| {
            let mut key = self.require_live_key(id)?;
            if matches!(key.state, KeyState::PendingDeletion { .. }) {
                return Err(StorageError::KeyPendingDeletion { id: id.clone() });
            }
            let mut ver = self.require_pending(id, version)?;
            ver.state = VersionState::Enabled;
            ver.updated_at_ms = now_ms;
            key.primary_version = Some(version);
            key.updated_at_ms = now_ms;
            let mut batch = Batch::default();
            self.put_key(&mut batch, &key)?;
            self.put_version(&mut batch, &ver)?;
            batch.delete(Table::Pending, schema::version_key(id.as_str(), version));
            self.commit(w, batch)?;
            Ok((key, ver))
        })
    }

    /// Abandons a pending version (its KEK was never made, or was destroyed):
    /// it becomes `Destroyed` and its number is never reused.
    ///
    /// # Errors
    ///
    /// [`StorageError::VersionNotFound`]; [`StorageError::VersionNotPending`];
    /// [`StorageError::Db`] if RocksDB fails.
    pub fn discard_version(
        &self,
        id: &KeyId,
        version: u32,
        now_ms: u64,
    ) -> Result<VersionRecord, StorageError> {
        self.write(|w| {
            let mut ver = self.require_pending(id, version)?;
            ver.state = VersionState::Destroyed {
                destroyed_at_ms: now_ms,
            };
            ver.updated_at_ms = now_ms;
            let mut batch = Batch::default();
            self.put_version(&mut batch, &ver)?;
            batch.delete(Table::Pending, schema::version_key(id.as_str(), version));
            self.commit(w, batch)?;
            Ok(ver)
        })
    }

    /// Read-modify-write of a version under the catalogue lock. The key id,
    /// number, KEK handle and creation time cannot change; pending versions
    /// change only through commit/discard; `Destroyed` is final; the key's
    /// primary version stays `Enabled` (checked against the key record read
    /// under the same lock).
    ///
    /// # Errors
    ///
    /// `f`'s own error; [`StorageError::KeyNotFound`] or
    /// [`StorageError::KeyDeleted`]; [`StorageError::VersionNotFound`];
    /// [`StorageError::ImmutableField`] if `f` changed a fixed field;
    /// [`StorageError::InvalidVersionTransition`] for a pending version or a
    /// move into or out of `Pending` or out of `Destroyed`;
    /// [`StorageError::PrimaryNotEnabled`] for the primary version leaving
    /// `Enabled`; [`StorageError::Db`] if RocksDB fails.
    pub fn update_version<E: From<StorageError>>(
        &self,
        id: &KeyId,
        version: u32,
        now_ms: u64,
        mut f: impl FnMut(&mut VersionRecord) -> Result<(), E>,
    ) -> Result<VersionRecord, E> {
        self.write(|w| {
            let key = self.require_live_key(id)?;
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
                    id: id.clone(),
                    version,
                }
                .into());
            }
            if key.primary_version == Some(version) && new.state != VersionState::Enabled {
                return Err(StorageError::PrimaryNotEnabled {
                    id: id.clone(),
                    version,
                }
                .into());
            }
            new.updated_at_ms = now_ms;
            new.gcm_invocations = old.gcm_invocations;
            let mut batch = Batch::default();
            self.put_version(&mut batch, &new)?;
            self.commit(w, batch)?;
            Ok(new)
        })
    }

    /// Sets a committed version's state (Enabled, Disabled, ScheduledDestruction, Destroyed).
    ///
    /// # Errors
    ///
    /// As [`Catalogue::update_version`].
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

    /// The end of a version's destruction window (issue 18 item 2): a
    /// version `ScheduledDestruction` and due at `due_by_ms` (its
    /// `destroy_at_ms` is not later) becomes `Destroyed { destroyed_at_ms:
    /// now_ms }` in one synced write, and a
    /// wrapped version's blob and MAC are erased from the record (the blob
    /// is the key material, wrapped: with it gone, no root can bring the
    /// version back). An `HsmObject` version keeps its handle (the object
    /// id is not secret); the caller destroys the object in the HSM first.
    /// The record stays as a tombstone, so blobs under the version are
    /// refused by name. This is the one write that may change `kek`.
    ///
    /// Returns `None`, writing nothing, when the version (read under the
    /// catalogue lock) is not scheduled for destruction or not due: a
    /// restore or a later schedule since the caller looked wins.
    ///
    /// # Errors
    ///
    /// [`StorageError::KeyNotFound`] or [`StorageError::KeyDeleted`];
    /// [`StorageError::VersionNotFound`]; [`StorageError::PrimaryNotEnabled`]
    /// if the version is the key's primary (a damaged record: scheduling
    /// refuses the primary); [`StorageError::Db`] if the engine fails.
    pub fn destroy_version(
        &self,
        id: &KeyId,
        version: u32,
        due_by_ms: u64,
        now_ms: u64,
    ) -> Result<Option<VersionRecord>, StorageError> {
        self.write(|w| {
            let key = self.require_live_key(id)?;
            let mut ver = self.require_version(id, version)?;
            let due = matches!(
                ver.state,
                VersionState::ScheduledDestruction { destroy_at_ms } if destroy_at_ms <= due_by_ms
            );
            if !due {
                return Ok(None);
            }
            if key.primary_version == Some(version) {
                return Err(StorageError::PrimaryNotEnabled {
                    id: id.clone(),
                    version,
                });
            }
            ver.state = VersionState::Destroyed {
                destroyed_at_ms: now_ms,
            };
            ver.updated_at_ms = now_ms;
            if let KekHandle::Wrapped { blob, mac, .. } = &mut ver.kek {
                blob.clear();
                *mac = [0; 32];
            }
            let mut batch = Batch::default();
            self.put_version(&mut batch, &ver)?;
            // In a cluster the write returns once every node holds it
            // (design note I4): no node decrypts under the version after.
            self.commit(w, batch)?;
            Ok(Some(ver))
        })
    }
}
