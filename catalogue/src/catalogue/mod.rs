//! The key catalogue: keys, versions, aliases and the pending-version index.
//!
//! Every change is one [`Batch`] committed by the engine atomically and
//! durably, and only if nothing changed since the write read the state it
//! checked ([`CatalogueEngine::commit`], compare-and-set on the engine's
//! generation). Writers in one process are serialised by one catalogue-wide
//! mutex, so on a single node a write never conflicts; in a cluster a write
//! that lost a race with another node's is re-read, re-checked and retried
//! here ([`MAX_WRITE_ATTEMPTS`]). Catalogue writes are rare (management
//! operations), so neither costs anything that matters. Reads take no lock.
//!
//! Never stores key material: versions record where their KEK lives, not the KEK.
//!
//! The catalogue refuses any write that would break an invariant of the key
//! lifecycle, whoever asks (see `lifecycle`): a key's primary version is
//! always `Enabled`; a key pending deletion (or deleted) gets no new version
//! and no primary change; version numbers are never reused.
//!
//! This file holds the catalogue's plumbing (lock, commit, cache, scans);
//! `lifecycle` its writes, `reads` its reads and `aliases` the alias index.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::engine::{Batch, CatalogueEngine, Fence, Table};
use crate::error::StorageError;
use crate::gcm_counter::GcmCounters;
use crate::keys::{KeyId, KeyRecord, KeyState, VersionRecord, VersionState, WrappedServiceKey};
use crate::record_cache::RecordCache;
use crate::schema::{self, META_CHECKPOINT_KEY, META_INTEGRITY_KEY, encode_record};

mod aliases;
mod lifecycle;
mod reads;
mod restore;
mod rewrap;

pub use crate::keys::MAX_PAGE_SIZE;
pub use aliases::AliasEntry;
pub use rewrap::{EpochReferences, Swap, VersionCursor, VersionScan};

/// How many times a write that conflicted with another node's is re-read
/// and retried before [`StorageError::WriteConflict`] reaches the caller.
/// Conflicts need two nodes changing the catalogue in the same moment; 16
/// attempts in a row lose only under a sustained storm of writes.
pub const MAX_WRITE_ATTEMPTS: u32 = 16;

/// The key catalogue over a [`CatalogueEngine`]. Cheap to clone (an `Arc`
/// inside); clones share the engine, the write lock and the caches.
#[derive(Debug, Clone)]
pub struct Catalogue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Arc<dyn CatalogueEngine>,
    write_lock: Mutex<()>,
    counters: GcmCounters,
    keys: RecordCache<KeyId, KeyRecord>,
    versions: RecordCache<Vec<u8>, VersionRecord>,
}

thread_local! {
    /// The fence of the background job running on this thread, if any
    /// (see [`with_fence`]).
    static THREAD_FENCE: std::cell::RefCell<Option<Fence>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with every catalogue write made on this thread carrying
/// `fence`: for a background job (scheduled rotation and deletion, root
/// re-wrap), whose writes must not commit once another node leads the job
/// (they fail with [`StorageError::Fenced`]; design note §2.3.3, I6). The
/// job's work runs synchronously on its own thread, so a thread-scoped
/// fence reaches every write it makes, however deep in the service, without
/// threading a handle through every call. The previous fence is restored
/// when `f` returns or panics.
pub fn with_fence<T>(fence: Fence, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Fence>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            THREAD_FENCE.with(|cell| *cell.borrow_mut() = previous);
        }
    }
    let previous = THREAD_FENCE.with(|cell| cell.borrow_mut().replace(fence));
    let _restore = Restore(previous);
    f()
}

/// One attempt of a read-modify-write: the generation its reads are checked
/// against, whether it reached its commit, and whether that commit lost a
/// race (then the attempt is retried).
pub(crate) struct Write {
    read_at: u64,
    committing: Cell<bool>,
    conflicted: Cell<bool>,
}

fn clamp_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE_SIZE)
}

impl Catalogue {
    /// A catalogue over `engine`. `gcm_reservation_block` is how many GCM
    /// invocations one counter reservation covers (0 is treated as 1; see
    /// [`Catalogue::add_gcm_invocations`]).
    pub fn new(engine: Arc<dyn CatalogueEngine>, gcm_reservation_block: u64) -> Self {
        Catalogue {
            inner: Arc::new(Inner {
                engine,
                write_lock: Mutex::new(()),
                counters: GcmCounters::new(gcm_reservation_block),
                keys: RecordCache::new(),
                versions: RecordCache::new(),
            }),
        }
    }

    /// The engine under this catalogue (freshness, leadership, cluster view).
    pub fn engine(&self) -> &dyn CatalogueEngine {
        self.inner.engine.as_ref()
    }

    /// Ok if this node may use keys now (see [`CatalogueEngine::check_fresh`]).
    ///
    /// # Errors
    ///
    /// [`StorageError::Unavailable`] when a cluster node cannot prove its
    /// view recent.
    pub fn check_fresh(&self) -> Result<(), StorageError> {
        self.engine().check_fresh()
    }

    fn counters(&self) -> &GcmCounters {
        &self.inner.counters
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data (the state is in the engine), so a panic
        // in another writer leaves nothing inconsistent behind.
        self.inner
            .write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs one read-modify-write under the catalogue lock: `f` reads what
    /// it checks, builds a batch and hands it to [`Catalogue::commit`]. If
    /// that commit lost a race with another node, `f` runs again on the
    /// fresh state (at most [`MAX_WRITE_ATTEMPTS`] times in all), so every
    /// check is made against the state the write commits over.
    fn write<T, E: From<StorageError>>(
        &self,
        mut f: impl FnMut(&Write) -> Result<T, E>,
    ) -> Result<T, E> {
        let _guard = self.lock();
        let mut attempt = 1;
        loop {
            let w = Write {
                read_at: self.engine().begin_write()?,
                committing: Cell::new(false),
                conflicted: Cell::new(false),
            };
            let result = f(&w);
            // A check that failed before the commit may have read a state
            // that changed under it: a cluster node's view follows other
            // nodes' commits while `f` reads, so its reads can span two
            // generations (a key record from one, its versions from the
            // next). Such a failure is a lost race like a conflicting
            // commit: retry on the fresh state. (On a single node the
            // generation cannot move under the lock, so nothing changes.)
            let stale =
                result.is_err() && !w.committing.get() && self.engine().generation() != w.read_at;
            if result.is_err() && (w.conflicted.get() || stale) && attempt < MAX_WRITE_ATTEMPTS {
                attempt += 1;
                continue;
            }
            return result;
        }
    }

    /// Commits the batch of write attempt `w` (see [`Catalogue::write`]).
    ///
    /// Every change waits until every node holds it (`batch.revokes`; on a
    /// cluster: every registered node applied it, or Δ + margin passed):
    /// revocations must (design note I4), and a key or version created on
    /// one node must be usable on every node once the call returns, not
    /// "not found" on a node whose watch is a few milliseconds behind.
    fn commit(&self, w: &Write, mut batch: Batch) -> Result<(), StorageError> {
        batch.fence = THREAD_FENCE.with(|cell| cell.borrow().clone());
        batch.revokes = true;
        w.committing.set(true);
        let result = self.engine().commit(w.read_at, batch);
        if matches!(result, Err(StorageError::WriteConflict)) {
            w.conflicted.set(true);
        }
        result
    }

    /// Counts `n` AES-GCM invocations of a version and returns the total so far.
    /// See [`GcmCounters`](crate::gcm_counter) for why this is cheap and never
    /// under-counts across crashes. After a restart the total resumes from
    /// the persisted reservation, so it can exceed the real count by at most
    /// one [`crate::StorageOptions::gcm_reservation_block`].
    ///
    /// # Errors
    ///
    /// [`StorageError::VersionNotFound`] (checked on a version's first count
    /// in this process); [`StorageError::Db`] if the reservation cannot be
    /// written; [`StorageError::Corrupt`] if the stored counter is malformed.
    pub fn add_gcm_invocations(
        &self,
        id: &KeyId,
        version: u32,
        n: u64,
    ) -> Result<u64, StorageError> {
        // Nothing passes u64::MAX (the count saturates), so this always counts.
        Ok(self
            .add_gcm_invocations_up_to(id, version, n, u64::MAX)?
            .unwrap_or(u64::MAX))
    }

    /// Like [`Catalogue::add_gcm_invocations`], but refuses to pass `limit`:
    /// returns `None`, and counts nothing, if the total would exceed it. The
    /// check and the count are one step under the counters' mutex, so
    /// concurrent callers never pass the limit together (the service's hard
    /// ceiling below NIST SP 800-38D §8.3's 2^32 invocations per key).
    ///
    /// # Errors
    ///
    /// As [`Catalogue::add_gcm_invocations`].
    pub fn add_gcm_invocations_up_to(
        &self,
        id: &KeyId,
        version: u32,
        n: u64,
        limit: u64,
    ) -> Result<Option<u64>, StorageError> {
        let k = schema::version_key(id.as_str(), version);
        self.counters().add(self.engine(), &k, n, limit, || {
            if self.engine().get(Table::Versions, &k)?.is_some() {
                Ok(())
            } else {
                Err(StorageError::VersionNotFound {
                    id: id.clone(),
                    version,
                })
            }
        })
    }

    /// The wrapped catalogue-integrity HMAC key, if one was stored.
    ///
    /// # Errors
    ///
    /// [`StorageError::Corrupt`]/[`StorageError::CorruptJson`] for an
    /// undecodable record; [`StorageError::Db`] if RocksDB fails.
    pub fn integrity_key(&self) -> Result<Option<WrappedServiceKey>, StorageError> {
        self.service_key(META_INTEGRITY_KEY)
    }

    /// Stores `key` as the catalogue-integrity HMAC key unless one is
    /// stored already (one synced write under the catalogue lock), and
    /// returns the one stored: the first writer wins, so every version MAC
    /// is made under one key.
    ///
    /// # Errors
    ///
    /// As [`Catalogue::integrity_key`].
    pub fn init_integrity_key(
        &self,
        key: WrappedServiceKey,
    ) -> Result<WrappedServiceKey, StorageError> {
        self.init_service_key(META_INTEGRITY_KEY, "integrity key", key)
    }

    /// The wrapped audit checkpoint HMAC key, if one was stored (meta
    /// record `schema::META_CHECKPOINT_KEY`; absent for deployments whose
    /// checkpoint key is a token object).
    ///
    /// # Errors
    ///
    /// As [`Catalogue::integrity_key`].
    pub fn checkpoint_key(&self) -> Result<Option<WrappedServiceKey>, StorageError> {
        self.service_key(META_CHECKPOINT_KEY)
    }

    /// Stores `key` as the audit checkpoint HMAC key unless one is stored
    /// already, and returns the one stored (first writer wins, like
    /// [`Catalogue::init_integrity_key`]).
    ///
    /// # Errors
    ///
    /// As [`Catalogue::integrity_key`].
    pub fn init_checkpoint_key(
        &self,
        key: WrappedServiceKey,
    ) -> Result<WrappedServiceKey, StorageError> {
        self.init_service_key(META_CHECKPOINT_KEY, "checkpoint key", key)
    }

    fn init_service_key(
        &self,
        name: &'static [u8],
        what: &'static str,
        key: WrappedServiceKey,
    ) -> Result<WrappedServiceKey, StorageError> {
        self.write(|w| {
            if let Some(existing) = self.service_key(name)? {
                return Ok(existing);
            }
            let mut batch = Batch::default();
            batch.put(Table::Meta, name, encode_record(what, &key)?);
            self.commit(w, batch)?;
            Ok(key.clone())
        })
    }

    fn require_live_key(&self, id: &KeyId) -> Result<KeyRecord, StorageError> {
        let key = self
            .get_key(id)?
            .ok_or_else(|| StorageError::KeyNotFound { id: id.clone() })?;
        if matches!(key.state, KeyState::Deleted { .. }) {
            return Err(StorageError::KeyDeleted { id: id.clone() });
        }
        Ok(key)
    }

    fn require_version(&self, id: &KeyId, version: u32) -> Result<VersionRecord, StorageError> {
        self.get_version(id, version)?
            .ok_or_else(|| StorageError::VersionNotFound {
                id: id.clone(),
                version,
            })
    }

    fn require_pending(&self, id: &KeyId, version: u32) -> Result<VersionRecord, StorageError> {
        let ver = self.require_version(id, version)?;
        if ver.state != VersionState::Pending {
            return Err(StorageError::VersionNotPending {
                id: id.clone(),
                version,
            });
        }
        Ok(ver)
    }

    /// The number of a version of `id` being created (pending), if any.
    fn pending_version_of(&self, id: &KeyId) -> Result<Option<u32>, StorageError> {
        let mut found = None;
        self.scan(Table::Pending, id.as_str().as_bytes(), None, |k, _| {
            found = schema::decode_version_key(k).map(|(_, v)| v);
            Ok(false)
        })?;
        Ok(found)
    }

    /// Refuses a key record whose primary version is not an `Enabled`
    /// version (the first invariant of the catalogue).
    fn require_enabled_primary(&self, key: &KeyRecord) -> Result<(), StorageError> {
        let Some(v) = key.primary_version else {
            return Ok(());
        };
        if self.require_version(&key.id, v)?.state != VersionState::Enabled {
            return Err(StorageError::PrimaryNotEnabled {
                id: key.id.clone(),
                version: v,
            });
        }
        Ok(())
    }

    fn put_key(&self, batch: &mut Batch, key: &KeyRecord) -> Result<(), StorageError> {
        batch.put(
            Table::Keys,
            key.id.as_str().as_bytes(),
            encode_record("key", key)?,
        );
        Ok(())
    }

    fn put_version(&self, batch: &mut Batch, ver: &VersionRecord) -> Result<(), StorageError> {
        batch.put(
            Table::Versions,
            schema::version_key(ver.key_id.as_str(), ver.version),
            encode_record("version", ver)?,
        );
        Ok(())
    }

    /// Walks `table` in key order over keys starting with `prefix`,
    /// beginning after `after` (exclusive) if given, until `f` returns false.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        self.engine().scan(table, prefix, after, &mut f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{CF_DEFAULT, decode_record};

    /// Golden vector: the on-disk encoding of the integrity key record.
    /// A change here makes existing databases unreadable.
    #[test]
    fn integrity_key_record_encoding_is_pinned() {
        let key = WrappedServiceKey {
            root_epoch: 1,
            mechanism: 0x2109,
            blob: (0u8..40).collect(),
        };
        let bytes = encode_record("integrity key", &key).expect("encode");
        let expected = concat!(
            "\u{1}",
            r#"{"root_epoch":1,"mechanism":8457,"#,
            r#""blob":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324252627"}"#
        );
        assert_eq!(bytes, expected.as_bytes());
        let back: WrappedServiceKey =
            decode_record(CF_DEFAULT, META_INTEGRITY_KEY, &bytes).expect("decode");
        assert_eq!(back, key);
        assert_eq!(
            format!("{key:?}"),
            "WrappedServiceKey { root_epoch: 1, mechanism: 0x2109, blob: [40 bytes] }"
        );
    }

    /// Golden vector: the on-disk encoding of the audit checkpoint key
    /// record (same encoding as the integrity key, its own meta key).
    #[test]
    fn checkpoint_key_record_encoding_is_pinned() {
        let key = WrappedServiceKey {
            root_epoch: 7,
            mechanism: 0x2109,
            blob: (40u8..80).collect(),
        };
        let bytes = encode_record("checkpoint key", &key).expect("encode");
        let expected = concat!(
            "\u{1}",
            r#"{"root_epoch":7,"mechanism":8457,"#,
            r#""blob":"28292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f"}"#
        );
        assert_eq!(bytes, expected.as_bytes());
        let back: WrappedServiceKey =
            decode_record(CF_DEFAULT, META_CHECKPOINT_KEY, &bytes).expect("decode");
        assert_eq!(back, key);
        assert_eq!(META_CHECKPOINT_KEY, b"audit_checkpoint_key");
    }
}
