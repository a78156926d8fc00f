//! Root rotation's side of the catalogue (issue 14 item 5; design note
//! `hierarchy-and-cluster.md` §1.5.3 "Root rotation"): paging through every
//! version record, counting wrapped records per root epoch, and the
//! compare-and-set writes that put a record re-wrapped under a new root in
//! place of the one that was read.
//!
//! What it must never do: write over a record that changed since the caller
//! read it (a version disabled, destroyed or re-wrapped in between keeps
//! its new state: the caller re-reads and decides again), re-wrap a
//! destroyed version (that would extend its life past its root's
//! destruction), or change anything of a version but its KEK handle.

use std::collections::BTreeMap;

use crate::engine::{Batch, Table};

use super::Catalogue;
use crate::error::StorageError;
use crate::keys::{KekHandle, KeyId, VersionRecord, VersionState, WrappedServiceKey};
use crate::schema::{
    self, CF_DEFAULT, CF_VERSIONS, META_ACTIVE_ROOT, decode_record, encode_record,
};

/// The value of [`META_ACTIVE_ROOT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ActiveRoot {
    epoch: u32,
}

/// Where a version scan resumes (after the last record it returned).
/// Opaque; valid across restarts of the scan but not meant to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionCursor(Vec<u8>);

impl VersionCursor {
    /// The cursor of a scan that resumes after `version` of `key_id`.
    pub fn after(key_id: &KeyId, version: u32) -> VersionCursor {
        VersionCursor(schema::version_key(key_id.as_str(), version))
    }
}

/// One page of [`Catalogue::scan_versions`].
#[derive(Debug, Clone)]
pub struct VersionScan {
    /// Version records in (key id, version) order, at most the limit asked
    /// for, each with its current GCM invocation count.
    pub items: Vec<VersionRecord>,
    /// Where the next page starts; `None` once the scan reached the end.
    pub next: Option<VersionCursor>,
}

/// Wrapped version records (`KekHandle::Wrapped`) that name one root epoch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EpochReferences {
    /// Versions not destroyed (enabled, disabled, scheduled for
    /// destruction): they need their root, so it must not be destroyed.
    pub live_versions: u64,
    /// Destroyed versions whose record still holds a blob under the epoch.
    /// They do not keep the root alive: destroying the root is what makes
    /// their blobs (here and in every backup) unusable for good.
    pub destroyed_versions: u64,
}

/// The outcome of a compare-and-set write.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Swap<T> {
    /// The record was as expected and now holds the new value (returned).
    Replaced(T),
    /// The record changed since it was read: nothing was written. The
    /// current record (`None`: it is gone) for the caller to decide again.
    Changed(Option<T>),
}

/// Whether two version records are the same record, the GCM invocation
/// count aside (it is kept apart from the record and moves with every
/// encryption, so it would make every busy version look changed).
fn same_record(a: &VersionRecord, b: &VersionRecord) -> bool {
    a.key_id == b.key_id
        && a.version == b.version
        && a.state == b.state
        && a.kek == b.kek
        && a.created_at_ms == b.created_at_ms
        && a.updated_at_ms == b.updated_at_ms
}

impl Catalogue {
    /// Up to `limit` (1 to [`crate::MAX_PAGE_SIZE`]) version records of every
    /// key, in (key id, version) order, starting after `after` (from the
    /// beginning with `None`). Takes no lock: records written meanwhile may
    /// or may not be seen.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] or
    /// [`StorageError::CorruptJson`] if a stored record does not decode.
    pub fn scan_versions(
        &self,
        after: Option<&VersionCursor>,
        limit: usize,
    ) -> Result<VersionScan, StorageError> {
        let limit = super::clamp_limit(limit);
        let mut items = Vec::new();
        let mut last = None;
        self.scan(
            Table::Versions,
            b"",
            after.map(|c| c.0.as_slice()),
            |k, v| {
                let mut ver: VersionRecord = decode_record(CF_VERSIONS, k, v)?;
                ver.gcm_invocations = self.counters().current(self.engine(), k)?;
                items.push(ver);
                last = Some(k.to_vec());
                Ok(items.len() < limit)
            },
        )?;
        let next = if items.len() < limit {
            None
        } else {
            last.map(VersionCursor)
        };
        Ok(VersionScan { items, next })
    }

    /// How many wrapped version records name each root epoch (a full scan
    /// of the versions: for operators and for the check before a root is
    /// destroyed, not for the request path). Epochs no record names are
    /// absent.
    ///
    /// # Errors
    ///
    /// As [`Catalogue::scan_versions`].
    pub fn wrapped_versions_per_epoch(
        &self,
    ) -> Result<BTreeMap<u32, EpochReferences>, StorageError> {
        let mut counts: BTreeMap<u32, EpochReferences> = BTreeMap::new();
        self.scan(Table::Versions, b"", None, |k, v| {
            let ver: VersionRecord = decode_record(CF_VERSIONS, k, v)?;
            if let KekHandle::Wrapped {
                root_epoch, blob, ..
            } = ver.kek
            {
                let entry = counts.entry(root_epoch).or_default();
                if matches!(ver.state, VersionState::Destroyed { .. }) {
                    // A blob erased by a replayed destruction (restore) is
                    // no blob any more.
                    if !blob.is_empty() {
                        entry.destroyed_versions += 1;
                    }
                } else {
                    entry.live_versions += 1;
                }
            }
            Ok(true)
        })?;
        Ok(counts)
    }

    /// Compare-and-set of a version's KEK handle, for root rotation: under
    /// the catalogue lock, if the stored record is still `expected` (GCM
    /// count aside), replaces its `kek` with `kek` (a blob re-wrapped under
    /// another root, with its new MAC) in one synced write and returns the
    /// new record; otherwise writes nothing and returns the current record.
    /// Nothing else changes: `updated_at_ms` dates the version's last
    /// lifecycle change, and how it is held is not one.
    ///
    /// # Errors
    ///
    /// [`StorageError::ImmutableField`] (`kek`) unless both the stored and
    /// the new handle are `KekHandle::Wrapped` (a token-object version is
    /// never turned into a blob here, nor the reverse);
    /// [`StorageError::InvalidVersionTransition`] for a pending or destroyed
    /// version (a destroyed version is never re-wrapped: its blob must die
    /// with its root); [`StorageError::KeyNotFound`] or
    /// [`StorageError::KeyDeleted`]; [`StorageError::Db`];
    /// [`StorageError::Corrupt`]/[`StorageError::CorruptJson`].
    pub fn replace_version_kek(
        &self,
        expected: &VersionRecord,
        kek: KekHandle,
    ) -> Result<Swap<VersionRecord>, StorageError> {
        self.write(|w| {
            let k = schema::version_key(expected.key_id.as_str(), expected.version);
            let Some(bytes) = self.engine().get(Table::Versions, &k)? else {
                return Ok(Swap::Changed(None));
            };
            let mut current: VersionRecord = decode_record(CF_VERSIONS, &k, &bytes)?;
            current.gcm_invocations = self.counters().current(self.engine(), &k)?;
            if !same_record(&current, expected) {
                return Ok(Swap::Changed(Some(current)));
            }
            if !matches!(current.kek, KekHandle::Wrapped { .. })
                || !matches!(kek, KekHandle::Wrapped { .. })
            {
                return Err(StorageError::ImmutableField { field: "kek" });
            }
            if matches!(
                current.state,
                VersionState::Pending | VersionState::Destroyed { .. }
            ) {
                return Err(StorageError::InvalidVersionTransition {
                    id: current.key_id,
                    version: current.version,
                });
            }
            self.require_live_key(&current.key_id)?;
            let mut new = current;
            new.kek = kek.clone();
            let mut batch = Batch::default();
            self.put_version(&mut batch, &new)?;
            self.commit(w, batch)?;
            Ok(Swap::Replaced(new))
        })
    }

    /// A wrapped service key stored under the metadata key `meta_key`
    /// (e.g. [`schema::META_INTEGRITY_KEY`]), if one was stored.
    ///
    /// # Errors
    ///
    /// [`StorageError::Corrupt`]/[`StorageError::CorruptJson`] for an
    /// undecodable record; [`StorageError::Db`] if RocksDB fails.
    pub fn service_key(
        &self,
        meta_key: &'static [u8],
    ) -> Result<Option<WrappedServiceKey>, StorageError> {
        self.engine()
            .get(Table::Meta, meta_key)?
            .map(|bytes| decode_record(CF_DEFAULT, meta_key, &bytes))
            .transpose()
    }

    /// Compare-and-set of the wrapped service key under `meta_key`, for
    /// root rotation: under the catalogue lock, if the stored record is
    /// still `expected`, stores `new` (one synced write); otherwise writes
    /// nothing and returns the current record.
    ///
    /// # Errors
    ///
    /// As [`Catalogue::service_key`].
    pub fn replace_service_key(
        &self,
        meta_key: &'static [u8],
        expected: &WrappedServiceKey,
        new: WrappedServiceKey,
    ) -> Result<Swap<WrappedServiceKey>, StorageError> {
        self.write(|w| {
            let current = self.service_key(meta_key)?;
            if current.as_ref() != Some(expected) {
                return Ok(Swap::Changed(current));
            }
            let mut batch = Batch::default();
            batch.put(Table::Meta, meta_key, encode_record("service key", &new)?);
            self.commit(w, batch)?;
            Ok(Swap::Replaced(new.clone()))
        })
    }

    /// The cluster's active root epoch ([`META_ACTIVE_ROOT`]), from this
    /// node's view; `None` if none was recorded (a single node, or a
    /// cluster before its first node started).
    ///
    /// # Errors
    ///
    /// `Db` if the engine fails; `Corrupt` if the record is malformed.
    pub fn active_root(&self) -> Result<Option<u32>, StorageError> {
        Ok(self
            .engine()
            .get(Table::Meta, META_ACTIVE_ROOT)?
            .map(|bytes| decode_record::<ActiveRoot>(CF_DEFAULT, META_ACTIVE_ROOT, &bytes))
            .transpose()?
            .map(|r| r.epoch))
    }

    /// Compare-and-set of the cluster's active root epoch, in one catalogue
    /// transaction: if it is still `expected` (`None`: never recorded),
    /// records `new`; otherwise writes nothing and returns the current one.
    /// The caller checks first that every node holds `new` (the catalogue
    /// cannot see the HSMs).
    ///
    /// # Errors
    ///
    /// As [`Catalogue::active_root`]; those of a catalogue write
    /// (`Unavailable` without quorum).
    pub fn set_active_root(
        &self,
        expected: Option<u32>,
        new: u32,
    ) -> Result<Swap<u32>, StorageError> {
        self.write(|w| {
            let current = self.active_root()?;
            if current != expected {
                return Ok(Swap::Changed(current));
            }
            let mut batch = Batch::default();
            batch.put(
                Table::Meta,
                META_ACTIVE_ROOT,
                encode_record("active root", &ActiveRoot { epoch: new })?,
            );
            self.commit(w, batch)?;
            Ok(Swap::Replaced(new))
        })
    }
}
