//! The working-key cache: wrapped key versions (`KekHandle::Wrapped`)
//! unwrapped into the HSM on first use and kept there, as handles, for the
//! requests that follow (design note `hierarchy-and-cluster.md` §1.5.3
//! "Use", §1.7 items 6 and 9).
//!
//! - All working keys live on one `KeyHolder` (one long-lived session),
//!   together with the catalogue-integrity HMAC key, unwrapped from its own
//!   blob when the holder is opened.
//! - Entries are keyed by (key id, version, SHA-256 of the whole wrapped
//!   record: root epoch, mechanism, blob and MAC), so a record that changes
//!   (re-wrapped under a new root, or tampered with) is a new entry and is
//!   MAC-checked before it is unwrapped.
//! - Bounded LRU of `capacity` entries: evicting an entry destroys its HSM
//!   object as soon as no request still uses it (the last `Arc` drops).
//!   Session objects on the holder are therefore at most `capacity` + the
//!   keys of requests in flight + 1 (the integrity key).
//! - Single flight: concurrent misses of one entry unwrap once; the others
//!   wait on the entry's lock and then share the result.
//! - A hit stays on the calling thread (a hash lookup and a lock). A miss
//!   (an HMAC verify and an unwrap in the HSM, ~100 µs on SoftHSM2, or a
//!   wait for another request's unwrap of the same entry) runs through
//!   `tokio::task::block_in_place` when called on a worker of a
//!   multi-threaded runtime (the server's key-use path runs its work inline
//!   on the executor: `grpc::Rpc::key_use`), so that the worker's other
//!   tasks move to another thread meanwhile.
//! - A version that stops being usable (disabled, its key disabled,
//!   scheduled for deletion or deleted) is evicted at once ([`WorkingKeys::evict`]),
//!   its HSM object destroyed when the last request using it ends; a miss
//!   re-checks usability after filling its entry, so a request that read the
//!   version as usable just before the change cannot leave it cached.
//! - `HsmError::WorkingKeyStale` from any call (session or login lost,
//!   module re-initialised, object gone) drops every entry and the holder;
//!   the next use opens a new holder and unwraps again. A request retries
//!   once, so a holder loss is invisible to callers.
//! - The record's MAC is verified inside the HSM before every unwrap; a
//!   mismatch, an unknown mechanism and a blob the HSM rejects
//!   (`HsmError::CorruptWrappedKey`) are "catalogue record corrupt", never
//!   a lost device, and leave nothing cached.
//!
//! What it must never do: hold or log key bytes (it holds handles only),
//! use a blob whose MAC did not verify, or destroy an object of another
//! holder (a retired holder's keys die with its session instead).
//!
//! Used by the service for every `KekHandle::Wrapped` version (Encrypt,
//! Decrypt, ReEncrypt, GenerateDataKey) and to create wrapped versions.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kms_hsm::{
    Hsm, HsmError, KeyHolder, KeyPurpose, RootVariant, WorkingKey, WrapMechanism, WrappedKey,
};
use kms_storage::{KekHandle, KeyId};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::config::MAX_WORKING_KEY_CACHE;

/// Why a working key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum WorkingKeyError {
    /// The version's KEK is not a wrapped blob (a legacy token object):
    /// the caller should not have come here.
    #[error("version {version} of key {key_id} is not a wrapped key version")]
    NotWrapped { key_id: KeyId, version: u32 },

    /// The record names a wrapping mechanism this build does not know.
    #[error(
        "catalogue record of version {version} of key {key_id} is corrupt: unknown wrapping mechanism {code:#x}"
    )]
    UnknownMechanism {
        key_id: KeyId,
        version: u32,
        code: u64,
    },

    /// The record's MAC does not verify: the blob was moved from another
    /// key or version, or any field was altered.
    #[error(
        "catalogue record of version {version} of key {key_id} is corrupt: its MAC does not verify"
    )]
    MacMismatch { key_id: KeyId, version: u32 },

    /// The HSM rejected the blob (`HsmError::CorruptWrappedKey`): tampered,
    /// truncated, or wrapped under another root.
    #[error(
        "catalogue record of version {version} of key {key_id} is corrupt: its blob does not unwrap"
    )]
    CorruptBlob {
        key_id: KeyId,
        version: u32,
        #[source]
        source: HsmError,
    },

    /// Any other HSM failure (after the one retry on `WorkingKeyStale`).
    #[error("HSM operation on a working key failed")]
    Hsm(#[source] HsmError),
}

impl WorkingKeyError {
    /// Whether the catalogue record is at fault ("catalogue record
    /// corrupt": INTERNAL and audited, never "device lost"; issue 14 item 3).
    pub(crate) fn is_corrupt_record(&self) -> bool {
        matches!(
            self,
            WorkingKeyError::UnknownMechanism { .. }
                | WorkingKeyError::MacMismatch { .. }
                | WorkingKeyError::CorruptBlob { .. }
        )
    }
}

type Result<T, E = WorkingKeyError> = std::result::Result<T, E>;

/// Tests only: runs just before an unwrap, given the arrivals counter.
#[cfg(test)]
type UnwrapHook = Box<dyn Fn(&AtomicU64) + Send + Sync>;

/// (key id, version, SHA-256 of the wrapped record).
type CacheKey = (KeyId, u32, [u8; 32]);

/// What the cache has counted since it was made (tests, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CacheCounters {
    /// Blobs unwrapped into working keys (misses that reached the HSM).
    pub unwraps: u64,
    /// Holders opened (1 + the number of holder losses recovered from).
    pub holders_opened: u64,
    /// Entries evicted to stay within the capacity.
    pub evictions: u64,
    /// Uses served from the cache without an unwrap.
    pub hits: u64,
    /// Entries evicted because their version stopped being usable.
    pub revoked: u64,
}

/// The working-key cache's figures since start (metrics
/// `kms_working_keys`, `kms_working_key_events_total`; kms-bench's hit rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WorkingKeyStats {
    /// Working keys cached now (session objects in the HSM, besides the
    /// integrity key and keys of evicted entries still in use).
    pub cached: u64,
    /// The most kept (`hsm.working_key_cache`).
    pub capacity: u64,
    /// Uses served from the cache.
    pub hits: u64,
    /// Misses that unwrapped a blob in the HSM.
    pub unwraps: u64,
    /// Entries evicted to stay within the capacity.
    pub capacity_evictions: u64,
    /// Entries evicted because their version or key stopped being usable.
    pub unusable_evictions: u64,
}

impl super::KmsService {
    /// The working-key cache's figures; `None` when the token has no root
    /// key (no wrapped versions).
    pub fn working_key_stats(&self) -> Option<WorkingKeyStats> {
        self.wrapped.as_ref().map(|wrapped| {
            let keys = &wrapped.keys;
            let counters = keys.counters();
            let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
            WorkingKeyStats {
                cached: count(keys.len()),
                capacity: count(keys.capacity()),
                hits: counters.hits,
                unwraps: counters.unwraps,
                capacity_evictions: counters.evictions,
                unusable_evictions: counters.revoked,
            }
        })
    }
}

/// The cache; see the module docs.
pub(crate) struct WorkingKeys {
    hsm: Arc<Hsm>,
    variant: RootVariant,
    /// The catalogue-integrity HMAC key, wrapped (unwrapped per holder);
    /// replaced when root rotation re-wraps it (`set_integrity`).
    integrity: Mutex<WrappedKey>,
    capacity: usize,
    state: Mutex<State>,
    unwraps: AtomicU64,
    holders_opened: AtomicU64,
    evictions: AtomicU64,
    hits: AtomicU64,
    revoked: AtomicU64,
    /// Requests that reached an entry's lock (so tests can wait until
    /// every thread of a single-flight test is queued on one entry).
    arrivals: AtomicU64,
    /// Called with `arrivals` just before an unwrap (tests only).
    #[cfg(test)]
    before_unwrap: Mutex<Option<UnwrapHook>>,
}

impl std::fmt::Debug for WorkingKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkingKeys")
            .field("capacity", &self.capacity)
            .field("variant", &self.variant)
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

struct State {
    /// `None` until first use and after a holder loss.
    generation: Option<Arc<Generation>>,
    entries: HashMap<CacheKey, Entry>,
    /// Last use → entry: the first is the least recently used.
    order: BTreeMap<u64, CacheKey>,
    tick: u64,
    next_generation: u64,
}

struct Entry {
    slot: Arc<Slot>,
    tick: u64,
}

/// One entry's single-flight cell: whoever finds it empty unwraps while
/// holding its lock; the others queue on the lock and find it filled.
#[derive(Default)]
struct Slot {
    key: Mutex<Option<Arc<CachedKey>>>,
}

/// One holder and the integrity key on it. Dropping it closes the holder's
/// session, which destroys every working key on it.
struct Generation {
    number: u64,
    holder: KeyHolder,
    integrity: WorkingKey,
    /// Set when the holder is dropped from the cache after a loss: its keys
    /// are not destroyed one by one (their handles may be dead, or reused
    /// by the token); they die with the holder's session.
    retired: AtomicBool,
}

/// A working key in use by requests; destroyed (unless its holder was
/// retired) when the cache and the last request have let go of it.
struct CachedKey {
    /// `None` only while being dropped.
    key: Option<WorkingKey>,
    generation: Arc<Generation>,
    /// Set when unwrapped; cleared by the request that unwrapped it once it
    /// has re-checked usability (`WorkingKeys::lease`).
    fresh: AtomicBool,
}

impl Drop for CachedKey {
    fn drop(&mut self) {
        if let Some(key) = self.key.take()
            && !self.generation.retired.load(Ordering::Acquire)
        {
            // Best effort: a failure leaves the object to die with the
            // holder's session (bounded by the number of failures).
            if let Err(error) = self.generation.holder.destroy(key) {
                tracing::debug!(%error, "working key not destroyed on eviction");
            }
        }
    }
}

impl WorkingKeys {
    /// A cache of at most `capacity` working keys (1 to `hsm.working_key_cache`'s
    /// [`MAX_WORKING_KEY_CACHE`]; other values are clamped)
    /// on holders of `hsm`, unwrapping under roots of `variant`.
    /// `integrity` is the catalogue-integrity HMAC key's blob. Opens no
    /// holder yet: the first use does.
    pub(crate) fn new(
        hsm: Arc<Hsm>,
        variant: RootVariant,
        integrity: WrappedKey,
        capacity: usize,
    ) -> WorkingKeys {
        WorkingKeys {
            hsm,
            variant,
            integrity: Mutex::new(integrity),
            capacity: capacity.clamp(1, MAX_WORKING_KEY_CACHE),
            state: Mutex::new(State {
                generation: None,
                entries: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                next_generation: 1,
            }),
            unwraps: AtomicU64::new(0),
            holders_opened: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            #[cfg(test)]
            before_unwrap: Mutex::new(None),
        }
    }

    /// What the cache has counted so far.
    pub(crate) fn counters(&self) -> CacheCounters {
        CacheCounters {
            unwraps: self.unwraps.load(Ordering::Relaxed),
            holders_opened: self.holders_opened.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
        }
    }

    /// Entries cached now (at most the capacity).
    pub(crate) fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// The most entries kept (`hsm.working_key_cache`, clamped).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Evicts the working keys of `key_id` (only of `version` if given): to
    /// be called once a version or key stops being usable (disabled,
    /// scheduled for deletion, deleted), after the catalogue change is
    /// written. Each HSM object is destroyed when the last request still
    /// using it ends (at once if none). Returns how many entries were
    /// evicted. Cost: one pass over the cached entries (at most the capacity).
    pub(crate) fn evict(&self, key_id: &KeyId, version: Option<u32>) -> usize {
        let evicted: Vec<Entry> = {
            let mut state = self.state.lock();
            let doomed: Vec<CacheKey> = state
                .entries
                .keys()
                .filter(|(id, v, _)| id == key_id && version.is_none_or(|wanted| wanted == *v))
                .cloned()
                .collect();
            doomed
                .iter()
                .filter_map(|cache_key| {
                    let entry = state.entries.remove(cache_key)?;
                    state.order.remove(&entry.tick);
                    Some(entry)
                })
                .collect()
        };
        let count = evicted.len();
        self.revoked.fetch_add(count as u64, Ordering::Relaxed);
        // Outside the state lock: a last drop destroys an HSM object.
        drop(evicted);
        count
    }

    /// Runs `work` with the working key of version `version` of `key_id`,
    /// whose catalogue KEK handle is `kek`, unwrapping it first on a miss
    /// (after verifying the record's MAC). If `work` or the unwrap reports
    /// `WorkingKeyStale`, drops the cache and the holder and tries once
    /// more on a new holder. `work` may run twice; it is given the holder
    /// so that it can call `Hsm::encrypt_with`/`decrypt_with`.
    ///
    /// `still_usable` is asked, after a miss has filled the entry, whether
    /// the version is still usable (the catalogue, read again); if not, the
    /// entry is evicted (this request still completes: its own check came
    /// before the change). It closes the race with [`WorkingKeys::evict`]:
    /// either the change is seen here, or the eviction that follows the
    /// change sees the entry.
    ///
    /// # Errors
    /// `NotWrapped` for a non-wrapped handle; `UnknownMechanism`,
    /// `MacMismatch`, `CorruptBlob` for a corrupt record (nothing cached);
    /// `Hsm` for any other HSM error, including a second `WorkingKeyStale`.
    pub(crate) fn with_key<T>(
        &self,
        key_id: &KeyId,
        version: u32,
        kek: &KekHandle,
        still_usable: impl Fn() -> bool,
        work: impl Fn(&KeyHolder, &WorkingKey) -> Result<T, HsmError>,
    ) -> Result<T> {
        let record = Record::parse(key_id, version, kek)?;
        let mut retried = false;
        loop {
            let outcome = self.lease(&record, &still_usable).and_then(|cached| {
                let Some(key) = cached.key.as_ref() else {
                    return Err(WorkingKeyError::Hsm(HsmError::WorkingKeyStale));
                };
                work(&cached.generation.holder, key).map_err(|e| {
                    if matches!(e, HsmError::WorkingKeyStale) {
                        self.retire(cached.generation.number);
                    }
                    WorkingKeyError::Hsm(e)
                })
            });
            match outcome {
                Err(WorkingKeyError::Hsm(HsmError::WorkingKeyStale)) if !retried => retried = true,
                other => return other,
            }
        }
    }

    /// HMAC-SHA256 of `wrapped`'s catalogue MAC input for `key_id` and
    /// `version` under the catalogue-integrity key: the `mac` of a new
    /// `KekHandle::Wrapped` record (design note §1.5.2). Retries once on a
    /// holder loss, like `with_key`.
    ///
    /// # Errors
    /// `Hsm` (`InvalidArgument` for fields over 4 GiB, or the HSM's error).
    pub(crate) fn mac_record(
        &self,
        key_id: &KeyId,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<[u8; 32]> {
        let input = wrapped
            .mac_input(key_id.as_str().as_bytes(), version)
            .map_err(WorkingKeyError::Hsm)?;
        let mut retried = false;
        loop {
            let generation = self.generation()?;
            match generation.holder.hmac_sign(&generation.integrity, &input) {
                Err(HsmError::WorkingKeyStale) if !retried => {
                    self.retire(generation.number);
                    retried = true;
                }
                other => return other.map_err(WorkingKeyError::Hsm),
            }
        }
    }

    /// Generates a new key version of `purpose` inside the HSM, wraps it
    /// under the root of `epoch` and returns the blob (design note §1.5.3
    /// "Create"). The working key is destroyed at once: the version is
    /// unwrapped again on first use, through its MAC-checked record. Runs on
    /// the cache's holder; retries once on a holder loss.
    ///
    /// # Errors
    /// `Hsm` (a missing root is `ObjectNotFound`; the HSM's error otherwise).
    pub(crate) fn generate_wrapped(&self, epoch: u32, purpose: KeyPurpose) -> Result<WrappedKey> {
        let mut retried = false;
        loop {
            let generation = self.generation()?;
            match generation
                .holder
                .generate_version(epoch, purpose, self.variant)
            {
                Err(HsmError::WorkingKeyStale) if !retried => {
                    self.retire(generation.number);
                    retried = true;
                }
                Err(e) => return Err(WorkingKeyError::Hsm(e)),
                Ok((wrapped, key)) => {
                    // Best effort: a failure leaves it to die with the holder.
                    if let Err(error) = generation.holder.destroy(key) {
                        tracing::debug!(%error, "new working key not destroyed");
                    }
                    return Ok(wrapped);
                }
            }
        }
    }

    /// Replaces the integrity key's blob by the same key wrapped under
    /// another root (root rotation), for the next holder to unwrap. The
    /// current holder's unwrapped copy stays valid (same key).
    pub(crate) fn set_integrity(&self, wrapped: WrappedKey) {
        *self.integrity.lock() = wrapped;
    }

    /// The current generation, opening a holder (and unwrapping the
    /// integrity key on it) if there is none. Runs under the state lock:
    /// this is rare (first use, holder loss) and every request needs it.
    fn generation(&self) -> Result<Arc<Generation>> {
        let mut state = self.state.lock();
        self.generation_locked(&mut state)
    }

    fn generation_locked(&self, state: &mut State) -> Result<Arc<Generation>> {
        if let Some(generation) = &state.generation {
            return Ok(Arc::clone(generation));
        }
        let holder = self.hsm.key_holder().map_err(WorkingKeyError::Hsm)?;
        let wrapped = self.integrity.lock().clone();
        let integrity = holder
            .unwrap(&wrapped, KeyPurpose::Hmac, self.variant)
            .map_err(WorkingKeyError::Hsm)?;
        self.holders_opened.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(Generation {
            number: state.next_generation,
            holder,
            integrity,
            retired: AtomicBool::new(false),
        });
        state.next_generation += 1;
        state.generation = Some(Arc::clone(&generation));
        Ok(generation)
    }

    /// Drops the holder of generation `number` and every entry, unless that
    /// was done already (by another request that met the same loss).
    fn retire(&self, number: u64) {
        let dropped = {
            let mut state = self.state.lock();
            match &state.generation {
                Some(generation) if generation.number == number => {
                    generation.retired.store(true, Ordering::Release);
                    state.order.clear();
                    let entries = std::mem::take(&mut state.entries);
                    (state.generation.take(), entries)
                }
                _ => return,
            }
        };
        tracing::info!(
            generation = number,
            "working-key holder lost; working keys will be unwrapped again"
        );
        // Dropped outside the state lock: the last drop closes a session.
        drop(dropped);
    }

    /// The cached working key for `record`: a hit inline, a miss (which
    /// unwraps, or waits for another request's unwrap) off the executor.
    fn lease(
        &self,
        record: &Record<'_>,
        still_usable: &dyn Fn() -> bool,
    ) -> Result<Arc<CachedKey>> {
        if let Some(cached) = self.hit(record) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached);
        }
        let cached = off_executor(|| self.lease_slow(record))?;
        if cached.fresh.swap(false, Ordering::AcqRel) && !still_usable() {
            self.evict(record.key_id, Some(record.version));
        }
        Ok(cached)
    }

    /// The cached working key for `record` if it is there and ready (its
    /// entry made more recently used); `None` sends the caller to the slow
    /// path. Never waits on an unwrap in progress.
    fn hit(&self, record: &Record<'_>) -> Option<Arc<CachedKey>> {
        let (slot, generation) = {
            let mut state = self.state.lock();
            let generation = Arc::clone(state.generation.as_ref()?);
            state.tick += 1;
            let tick = state.tick;
            let entry = state.entries.get_mut(&record.cache_key)?;
            let old = std::mem::replace(&mut entry.tick, tick);
            let slot = Arc::clone(&entry.slot);
            state.order.remove(&old);
            state.order.insert(tick, record.cache_key.clone());
            (slot, generation)
        };
        let filled = slot.key.try_lock()?;
        let cached = filled.as_ref()?;
        Arc::ptr_eq(&cached.generation, &generation).then(|| Arc::clone(cached))
    }

    /// The miss path of `lease`: may open a holder, wait on the entry's
    /// lock and unwrap (blocking HSM calls).
    fn lease_slow(&self, record: &Record<'_>) -> Result<Arc<CachedKey>> {
        let (slot, generation) = self.entry(record)?;
        self.arrivals.fetch_add(1, Ordering::AcqRel);
        let mut filled = slot.key.lock();
        if let Some(cached) = filled.as_ref()
            && Arc::ptr_eq(&cached.generation, &generation)
        {
            return Ok(Arc::clone(cached));
        }
        match self.unwrap(record, &generation) {
            Ok(key) => {
                let cached = Arc::new(CachedKey {
                    key: Some(key),
                    generation,
                    fresh: AtomicBool::new(true),
                });
                *filled = Some(Arc::clone(&cached));
                Ok(cached)
            }
            Err(error) => {
                // Nothing cached for a record that does not unwrap.
                let removed = {
                    let mut state = self.state.lock();
                    match state.entries.get(&record.cache_key) {
                        Some(entry) if Arc::ptr_eq(&entry.slot, &slot) => {
                            let tick = entry.tick;
                            state.order.remove(&tick);
                            state.entries.remove(&record.cache_key)
                        }
                        _ => None,
                    }
                };
                drop(filled);
                drop(removed);
                if matches!(error, WorkingKeyError::Hsm(HsmError::WorkingKeyStale)) {
                    self.retire(generation.number);
                }
                Err(error)
            }
        }
    }

    /// The entry of `record` (made, and the LRU trimmed, on a miss) and the
    /// generation it belongs to.
    fn entry(&self, record: &Record<'_>) -> Result<(Arc<Slot>, Arc<Generation>)> {
        let mut evicted = Vec::new();
        let found = {
            let mut state = self.state.lock();
            let generation = self.generation_locked(&mut state)?;
            state.tick += 1;
            let tick = state.tick;
            let slot = if let Some(entry) = state.entries.get_mut(&record.cache_key) {
                let old = std::mem::replace(&mut entry.tick, tick);
                let slot = Arc::clone(&entry.slot);
                state.order.remove(&old);
                slot
            } else {
                let slot = Arc::new(Slot::default());
                state.entries.insert(
                    record.cache_key.clone(),
                    Entry {
                        slot: Arc::clone(&slot),
                        tick,
                    },
                );
                while state.entries.len() > self.capacity {
                    let Some((_, oldest)) = state.order.pop_first() else {
                        break;
                    };
                    if let Some(entry) = state.entries.remove(&oldest) {
                        evicted.push(entry);
                    }
                }
                slot
            };
            state.order.insert(tick, record.cache_key.clone());
            (slot, generation)
        };
        self.evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        // Outside the state lock: the last drop of a working key destroys
        // it in the HSM (unless a request still uses it).
        drop(evicted);
        Ok(found)
    }

    /// Verifies the record's MAC, then unwraps its blob on `generation`.
    fn unwrap(&self, record: &Record<'_>, generation: &Generation) -> Result<WorkingKey> {
        let input = record
            .wrapped
            .mac_input(record.key_id.as_str().as_bytes(), record.version)
            .map_err(WorkingKeyError::Hsm)?;
        let verified = generation
            .holder
            .hmac_verify(&generation.integrity, &input, record.mac)
            .map_err(WorkingKeyError::Hsm)?;
        if !verified {
            return Err(WorkingKeyError::MacMismatch {
                key_id: record.key_id.clone(),
                version: record.version,
            });
        }
        #[cfg(test)]
        if let Some(hook) = self.before_unwrap.lock().as_ref() {
            hook(&self.arrivals);
        }
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        generation
            .holder
            .unwrap(&record.wrapped, KeyPurpose::Kek, self.variant)
            .map_err(|e| match e {
                HsmError::CorruptWrappedKey { .. } => WorkingKeyError::CorruptBlob {
                    key_id: record.key_id.clone(),
                    version: record.version,
                    source: e,
                },
                other => WorkingKeyError::Hsm(other),
            })
    }
}

/// Runs blocking HSM work: through `block_in_place` on a worker thread of
/// a multi-threaded tokio runtime (the worker's queued tasks move to another
/// thread meanwhile), directly anywhere else (a blocking-pool thread, a
/// plain thread; on a current-thread runtime `block_in_place` would panic,
/// and there is no other worker to hand the tasks to anyway).
fn off_executor<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// A `KekHandle::Wrapped` of one version, parsed.
struct Record<'a> {
    key_id: &'a KeyId,
    version: u32,
    wrapped: WrappedKey,
    mac: &'a [u8],
    cache_key: CacheKey,
}

impl<'a> Record<'a> {
    fn parse(key_id: &'a KeyId, version: u32, kek: &'a KekHandle) -> Result<Record<'a>> {
        let KekHandle::Wrapped {
            root_epoch,
            mechanism,
            blob,
            mac,
        } = kek
        else {
            return Err(WorkingKeyError::NotWrapped {
                key_id: key_id.clone(),
                version,
            });
        };
        let Some(mechanism_kind) = WrapMechanism::from_code(*mechanism) else {
            return Err(WorkingKeyError::UnknownMechanism {
                key_id: key_id.clone(),
                version,
                code: *mechanism,
            });
        };
        let mut digest = Sha256::new();
        digest.update(root_epoch.to_be_bytes());
        digest.update(mechanism.to_be_bytes());
        digest.update((blob.len() as u64).to_be_bytes());
        digest.update(blob);
        digest.update(mac);
        Ok(Record {
            key_id,
            version,
            wrapped: WrappedKey {
                root_epoch: *root_epoch,
                mechanism: mechanism_kind,
                blob: blob.clone(),
            },
            mac,
            cache_key: (key_id.clone(), version, digest.finalize().into()),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Against real SoftHSM2 tokens (one per test), with a root of variant
    //! T made in an SO ceremony before the `Hsm` logs in.

    use std::time::{Duration, Instant};

    use kms_hsm::testing::TestToken;
    use kms_hsm::{RootSpec, create_root};

    use super::*;

    const T: RootVariant = RootVariant::Trusted;
    const AAD: &[u8] = b"aad";

    struct Fixture {
        _token: TestToken,
        hsm: Arc<Hsm>,
        cache: WorkingKeys,
        key_id: KeyId,
        /// Blobs of versions 1..=n made by a holder that is gone, so the
        /// only session objects left are the cache's.
        blobs: Vec<WrappedKey>,
    }

    impl Fixture {
        fn new(capacity: usize, versions: u32) -> Fixture {
            let token = TestToken::new();
            let so_pin = token.so_pin_source().read().expect("SO PIN");
            create_root(
                token.module_path(),
                token.label(),
                &so_pin,
                &RootSpec::for_softhsm(1, T),
            )
            .expect("create root");
            let hsm = Arc::new(token.open());
            let maker = hsm.key_holder().expect("holder");
            let (integrity, _) = maker
                .generate_version(1, KeyPurpose::Hmac, T)
                .expect("integrity key");
            let blobs = (0..versions)
                .map(|_| {
                    maker
                        .generate_version(1, KeyPurpose::Kek, T)
                        .expect("version")
                        .0
                })
                .collect();
            drop(maker); // closes its session: its working copies are gone
            let cache = WorkingKeys::new(Arc::clone(&hsm), T, integrity, capacity);
            Fixture {
                _token: token,
                hsm,
                cache,
                key_id: KeyId::from_random([0x42; 16]),
                blobs,
            }
        }

        /// The catalogue handle of version `v`, MACed by the cache's key.
        fn kek(&self, v: u32) -> KekHandle {
            let wrapped = &self.blobs[v as usize - 1];
            KekHandle::Wrapped {
                root_epoch: wrapped.root_epoch,
                mechanism: wrapped.mechanism.code(),
                blob: wrapped.blob.clone(),
                mac: self
                    .cache
                    .mac_record(&self.key_id, v, wrapped)
                    .expect("mac"),
            }
        }

        /// Encrypts and decrypts through the cache with version `v`.
        fn round_trip(&self, v: u32) {
            let kek = self.kek(v);
            let data = [v as u8; 17];
            let sealed = self
                .cache
                .with_key(
                    &self.key_id,
                    v,
                    &kek,
                    || true,
                    |holder, key| self.hsm.encrypt_with(holder, key, AAD, &data),
                )
                .expect("encrypt");
            let plain = self
                .cache
                .with_key(
                    &self.key_id,
                    v,
                    &kek,
                    || true,
                    |holder, key| {
                        self.hsm.decrypt_with(
                            holder,
                            key,
                            &sealed.iv,
                            AAD,
                            &sealed.ciphertext_and_tag,
                        )
                    },
                )
                .expect("decrypt");
            assert_eq!(&plain[..], &data);
        }

        /// Session objects of this process on the token (any session).
        fn objects(&self) -> usize {
            self.cache
                .generation()
                .expect("generation")
                .holder
                .session_object_count()
                .expect("count")
        }

        fn unwraps(&self) -> u64 {
            self.cache.counters().unwraps
        }
    }

    #[test]
    fn hits_misses_and_lru_eviction_destroy_the_evicted_objects() {
        let f = Fixture::new(2, 3);
        // The integrity key only.
        assert_eq!(f.objects(), 1);
        // (version used, unwraps so far, evictions so far)
        let steps = [
            (1, 1, 0),
            (2, 2, 0),
            (1, 2, 0), // hit
            (3, 3, 1), // evicts 2, the least recently used
            (1, 3, 1), // hit: 1 was used more recently than 2
            (2, 4, 2), // miss again; evicts 3
            (2, 4, 2),
        ];
        for (v, unwraps, evictions) in steps {
            f.round_trip(v);
            let counters = f.cache.counters();
            assert_eq!(counters.unwraps, unwraps, "after using v{v}");
            assert_eq!(counters.evictions, evictions, "after using v{v}");
            assert!(f.cache.len() <= 2);
            // Evicted objects are destroyed: never more than the capacity
            // plus the integrity key, with no request in flight.
            assert!(f.objects() <= 2 + 1, "after using v{v}: {}", f.objects());
        }
        assert_eq!(f.objects(), 3);
        assert_eq!(f.cache.counters().holders_opened, 1);
    }

    #[test]
    fn a_key_evicted_while_in_use_is_destroyed_when_its_last_request_ends() {
        let f = Fixture::new(1, 2);
        let (kek1, kek2) = (f.kek(1), f.kek(2));
        let inside = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek1,
                || true,
                |holder, key| {
                    // Version 2 evicts version 1 while this request uses it.
                    f.round_trip(2);
                    assert_eq!(f.cache.counters().evictions, 1);
                    // Still usable, and still an object: capacity + in flight + integrity.
                    let sealed = f.hsm.encrypt_with(holder, key, AAD, b"in use")?;
                    Ok((f.objects(), sealed))
                },
            )
            .expect("use v1");
        assert_eq!(inside.0, 1 + 1 + 1);
        // The request is over: version 1's object is gone.
        assert_eq!(f.objects(), 1 + 1);
        // And using it again unwraps it again (evicting 2).
        let plain = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek1,
                || true,
                |holder, key| {
                    f.hsm
                        .decrypt_with(holder, key, &inside.1.iv, AAD, &inside.1.ciphertext_and_tag)
                },
            )
            .expect("decrypt");
        assert_eq!(&plain[..], b"in use");
        assert_eq!(f.unwraps(), 3);
        assert_eq!(f.objects(), 1 + 1);
        drop(kek2);
    }

    #[test]
    fn concurrent_misses_of_one_version_unwrap_it_once() {
        const THREADS: u64 = 6;
        let f = Fixture::new(4, 1);
        let kek = f.kek(1);
        // The one thread that unwraps waits until every thread has missed
        // and reached the entry: without single flight each would unwrap.
        *f.cache.before_unwrap.lock() = Some(Box::new(|arrivals: &AtomicU64| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while arrivals.load(Ordering::Acquire) < THREADS {
                assert!(Instant::now() < deadline, "threads never all arrived");
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (f, kek) = (&f, &kek);
                scope.spawn(move || {
                    f.cache
                        .with_key(
                            &f.key_id,
                            1,
                            kek,
                            || true,
                            |holder, key| f.hsm.encrypt_with(holder, key, AAD, &t.to_be_bytes()),
                        )
                        .expect("encrypt");
                });
            }
        });
        assert_eq!(f.cache.arrivals.load(Ordering::Acquire), THREADS);
        assert_eq!(f.unwraps(), 1);
        assert_eq!(f.objects(), 1 + 1);
    }

    #[test]
    fn a_working_key_lost_behind_the_caches_back_is_unwrapped_again_transparently() {
        let f = Fixture::new(4, 2);
        let (kek1, kek2) = (f.kek(1), f.kek(2));
        let sealed = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek1,
                || true,
                |holder, key| f.hsm.encrypt_with(holder, key, AAD, b"before the loss"),
            )
            .expect("encrypt");
        f.round_trip(2);
        assert_eq!((f.unwraps(), f.cache.counters().holders_opened), (2, 1));
        // What a lost holder session or a re-initialised module does to a
        // working key: its handle stops working (here: destroyed).
        f.cache
            .with_key(
                &f.key_id,
                1,
                &kek1,
                || true,
                |holder, key| {
                    holder.attack_session_for_tests(Some(key), |session, handle| {
                        session
                            .destroy_object(handle.expect("handle"))
                            .expect("destroy behind the cache's back");
                    })
                },
            )
            .expect("attack");
        // The next use meets WorkingKeyStale, drops the holder and every
        // entry, opens a new holder and unwraps again: the caller sees none
        // of it.
        let plain = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek1,
                || true,
                |holder, key| {
                    f.hsm
                        .decrypt_with(holder, key, &sealed.iv, AAD, &sealed.ciphertext_and_tag)
                },
            )
            .expect("decrypt after the loss");
        assert_eq!(&plain[..], b"before the loss");
        assert_eq!((f.unwraps(), f.cache.counters().holders_opened), (3, 2));
        // The old holder's session is closed: no leaked objects (version 2
        // was dropped with it and is not cached any more).
        assert_eq!(f.cache.len(), 1);
        assert_eq!(f.objects(), 1 + 1);
        f.round_trip(2);
        assert_eq!(f.unwraps(), 4);
        drop(kek2);
    }

    /// After a logout the working keys are gone (`CKR_KEY_HANDLE_INVALID`,
    /// reported as stale without the pool reconnecting); `Hsm::key_holder`
    /// sees that its new session is not logged in and logs in again
    /// through the pool, so the retry unwraps on a logged-in holder.
    #[test]
    fn a_lost_login_is_recovered_from_transparently() {
        let f = Fixture::new(4, 1);
        let kek = f.kek(1);
        let sealed = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek,
                || true,
                |holder, key| f.hsm.encrypt_with(holder, key, AAD, b"before the logout"),
            )
            .expect("encrypt");
        // C_Logout on any session logs the whole application out: every
        // private session object (all working keys) is gone.
        f.cache
            .with_key(
                &f.key_id,
                1,
                &kek,
                || true,
                |holder, _| {
                    holder.attack_session_for_tests(None, |session, _| {
                        session.logout().expect("logout");
                    })
                },
            )
            .expect("attack");
        let plain = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek,
                || true,
                |holder, key| {
                    f.hsm
                        .decrypt_with(holder, key, &sealed.iv, AAD, &sealed.ciphertext_and_tag)
                },
            )
            .expect("decrypt after the logout");
        assert_eq!(&plain[..], b"before the logout");
        assert_eq!((f.unwraps(), f.cache.counters().holders_opened), (2, 2));
        assert_eq!(f.objects(), 1 + 1);
    }

    #[test]
    fn a_corrupt_blob_is_its_own_error_and_nothing_is_cached() {
        let f = Fixture::new(4, 1);
        let mut tampered = f.blobs[0].clone();
        tampered.blob[7] ^= 0x01;
        let mut truncated = f.blobs[0].clone();
        truncated.blob.pop();
        for wrapped in [tampered, truncated] {
            // A valid MAC, so the HSM itself judges the blob.
            let kek = KekHandle::Wrapped {
                root_epoch: wrapped.root_epoch,
                mechanism: wrapped.mechanism.code(),
                blob: wrapped.blob.clone(),
                mac: f.cache.mac_record(&f.key_id, 1, &wrapped).expect("mac"),
            };
            let e = f
                .cache
                .with_key(&f.key_id, 1, &kek, || true, |_, _| Ok(()))
                .expect_err("corrupt blob");
            assert!(
                matches!(
                    e,
                    WorkingKeyError::CorruptBlob {
                        source: HsmError::CorruptWrappedKey { root_epoch: 1 },
                        version: 1,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(e.is_corrupt_record());
            assert_eq!(f.cache.len(), 0);
            assert_eq!(f.objects(), 1);
        }
        assert!(!f.hsm.is_down(), "a corrupt record is not a lost device");
        assert_eq!(f.cache.counters().holders_opened, 1);
        // The genuine record still works.
        f.round_trip(1);
    }

    #[test]
    fn a_record_whose_mac_does_not_verify_is_refused_before_any_unwrap() {
        let f = Fixture::new(4, 2);
        let genuine = f.kek(1);
        let KekHandle::Wrapped {
            root_epoch,
            mechanism,
            blob,
            mac,
        } = genuine.clone()
        else {
            unreachable!("fixture records are wrapped")
        };
        let other_key = KeyId::from_random([0x43; 16]);
        let mut bad_mac = mac;
        bad_mac[0] ^= 0x80;
        let swapped_blob = f.blobs[1].blob.clone();
        let cases: [(&str, &KeyId, u32, KekHandle); 5] = [
            ("moved to another version", &f.key_id, 2, genuine.clone()),
            ("moved to another key", &other_key, 1, genuine.clone()),
            (
                "another version's blob",
                &f.key_id,
                1,
                KekHandle::Wrapped {
                    root_epoch,
                    mechanism,
                    blob: swapped_blob,
                    mac,
                },
            ),
            (
                "another root epoch",
                &f.key_id,
                1,
                KekHandle::Wrapped {
                    root_epoch: 2,
                    mechanism,
                    blob: blob.clone(),
                    mac,
                },
            ),
            (
                "altered MAC",
                &f.key_id,
                1,
                KekHandle::Wrapped {
                    root_epoch,
                    mechanism,
                    blob: blob.clone(),
                    mac: bad_mac,
                },
            ),
        ];
        for (what, key_id, version, kek) in cases {
            let e = f
                .cache
                .with_key(key_id, version, &kek, || true, |_, _| Ok(()))
                .expect_err(what);
            assert!(
                matches!(e, WorkingKeyError::MacMismatch { version: v, .. } if v == version),
                "{what}: {e:?}"
            );
            assert!(e.is_corrupt_record(), "{what}");
        }
        let unknown = KekHandle::Wrapped {
            root_epoch,
            mechanism: 0x210A,
            blob,
            mac,
        };
        let e = f
            .cache
            .with_key(&f.key_id, 1, &unknown, || true, |_, _| Ok(()))
            .expect_err("unknown mechanism");
        assert!(
            matches!(e, WorkingKeyError::UnknownMechanism { code: 0x210A, .. }),
            "{e:?}"
        );
        let legacy = KekHandle::HsmObject {
            object_id: b"key/v1".to_vec(),
        };
        let e = f
            .cache
            .with_key(&f.key_id, 1, &legacy, || true, |_, _| Ok(()))
            .expect_err("token object");
        assert!(matches!(e, WorkingKeyError::NotWrapped { .. }), "{e:?}");
        assert!(!e.is_corrupt_record());
        // Nothing was unwrapped or cached.
        assert_eq!(f.unwraps(), 0);
        assert_eq!(f.cache.len(), 0);
        assert_eq!(f.objects(), 1);
        f.round_trip(1);
        assert_eq!(f.unwraps(), 1);
    }

    /// Issue 14 item 3: a miss (an unwrap, ~100 µs) must not hold up the
    /// executor thread it was called on (the key-use path runs inline on
    /// a worker). On a runtime with one worker, the unwrap waits for a task
    /// queued behind it on that runtime: if the miss ran on the worker, the
    /// task could never run (the wait gives up after 30 s and the test fails).
    #[test]
    fn a_miss_runs_off_the_executor_so_queued_tasks_keep_running() {
        let f = Arc::new(Fixture::new(4, 1));
        let kek = f.kek(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let queued_task_ran = Arc::new(AtomicBool::new(false));
        let seen_during_unwrap = Arc::new(AtomicBool::new(false));
        {
            let (ran, seen) = (
                Arc::clone(&queued_task_ran),
                Arc::clone(&seen_during_unwrap),
            );
            *f.cache.before_unwrap.lock() = Some(Box::new(move |_: &AtomicU64| {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !ran.load(Ordering::Acquire) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                seen.store(ran.load(Ordering::Acquire), Ordering::Release);
            }));
        }
        runtime.block_on(async {
            let (fixture, kek) = (Arc::clone(&f), kek.clone());
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let miss = tokio::spawn(async move {
                let _ = started_tx.send(());
                fixture
                    .cache
                    .with_key(
                        &fixture.key_id,
                        1,
                        &kek,
                        || true,
                        |holder, key| fixture.hsm.encrypt_with(holder, key, AAD, b"miss"),
                    )
                    .map(|_| ())
            });
            // The miss is on the only worker now; this task queues behind it.
            started_rx.await.expect("miss task started");
            let ran = Arc::clone(&queued_task_ran);
            let queued = tokio::spawn(async move { ran.store(true, Ordering::Release) });
            miss.await.expect("join").expect("encrypt");
            queued.await.expect("join");
        });
        assert!(
            seen_during_unwrap.load(Ordering::Acquire),
            "a task queued on the runtime could not run while the miss unwrapped"
        );
        // A hit is served inline (counted as a hit, no second unwrap).
        *f.cache.before_unwrap.lock() = None;
        runtime.block_on(async {
            f.cache
                .with_key(&f.key_id, 1, &kek, || true, |_, _| Ok(()))
                .expect("hit");
        });
        assert_eq!((f.unwraps(), f.cache.counters().hits), (1, 1));
    }

    /// Issue 14 item 3: a version that stops being usable is evicted at
    /// once, its HSM object destroyed (at the end of the last request using
    /// it), not left until LRU eviction.
    #[test]
    fn evicting_a_version_destroys_its_object_at_once_or_when_its_last_request_ends() {
        let f = Fixture::new(8, 3);
        for v in 1..=3 {
            f.round_trip(v);
        }
        assert_eq!(f.objects(), 1 + 3);
        assert_eq!(f.cache.evict(&f.key_id, Some(2)), 1);
        assert_eq!(f.objects(), 1 + 2);
        assert_eq!(f.cache.len(), 2);
        // Evicted while a request uses it: destroyed when that request ends.
        let kek1 = f.kek(1);
        let inside = f
            .cache
            .with_key(
                &f.key_id,
                1,
                &kek1,
                || true,
                |_, _| {
                    assert_eq!(f.cache.evict(&f.key_id, None), 2);
                    Ok(f.objects())
                },
            )
            .expect("use v1");
        assert_eq!(inside, 1 + 1);
        assert_eq!(f.objects(), 1);
        assert_eq!(f.cache.len(), 0);
        assert_eq!(f.cache.counters().revoked, 3);
        // Another key's entries are left alone.
        f.round_trip(3);
        assert_eq!(f.cache.evict(&KeyId::from_random([0x77; 16]), None), 0);
        assert_eq!(f.objects(), 1 + 1);
    }

    /// A miss whose version was made unusable while it unwrapped (the
    /// catalogue re-read says so) does not stay cached: the request
    /// completes, and the object is destroyed as it ends.
    #[test]
    fn a_miss_that_finds_its_version_no_longer_usable_is_not_kept() {
        let f = Fixture::new(8, 1);
        let kek = f.kek(1);
        f.cache
            .with_key(
                &f.key_id,
                1,
                &kek,
                || false,
                |holder, key| f.hsm.encrypt_with(holder, key, AAD, b"last use"),
            )
            .expect("the request itself completes");
        assert_eq!(f.cache.len(), 0);
        assert_eq!(f.objects(), 1);
        // A hit does not re-check (the catalogue check of the request did).
        f.round_trip(1);
        f.cache
            .with_key(&f.key_id, 1, &kek, || false, |_, _| Ok(()))
            .expect("hit");
        assert_eq!(f.cache.len(), 1);
    }

    #[test]
    fn debug_and_errors_show_no_blob_or_mac_bytes() {
        let f = Fixture::new(4, 1);
        let kek = f.kek(1);
        f.round_trip(1);
        let KekHandle::Wrapped { blob, mac, .. } = &kek else {
            unreachable!("fixture records are wrapped")
        };
        let e = f
            .cache
            .with_key(
                &KeyId::from_random([1; 16]),
                1,
                &kek,
                || true,
                |_, _| Ok(()),
            )
            .expect_err("moved");
        for text in [format!("{:?}", f.cache), format!("{e:?}"), format!("{e}")] {
            assert!(!text.contains(&hex::encode(blob)), "{text}");
            assert!(!text.contains(&hex::encode(mac)), "{text}");
            assert!(!text.contains(&hex::encode(&blob[..8])), "{text}");
        }
    }
}
