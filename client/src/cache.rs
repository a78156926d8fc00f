//! Data-key caching, off by default (like the AWS Encryption SDK's caching
//! materials manager).
//!
//! Encrypt side: one data key per (key id, encryption context) is reused for at
//! most `max_messages` messages, `max_bytes` plaintext bytes and `max_age`, then
//! dropped; a message whose length is unknown never uses the cache, because the
//! byte budget could not be charged before encrypting it. Decrypt side: a bounded
//! map from (wrapped data key, context, expected key) to the unwrapped data key,
//! entries also expiring after `max_age`.
//!
//! Each map holds at most `capacity` entries, least recently used evicted first.
//! Data keys never leave the cache: callers get a closure run under the lock to
//! derive their per-message key, so an evicted key is zeroized the moment it is
//! removed (DataKey zeroizes on drop). Hits, misses and evictions are counted.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::data_key::DataKey;

/// How much one cached data key may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Messages encrypted under one data key (N), at least 1.
    pub max_messages: u64,
    /// Plaintext bytes encrypted under one data key (B), summed over messages.
    pub max_bytes: u64,
    /// Time a data key stays usable after it was generated or unwrapped (T).
    pub max_age: Duration,
    /// Entries per map (encrypt and decrypt each), at least 1.
    pub capacity: usize,
}

impl Default for CacheLimits {
    /// 1,000 messages, 1 GiB, 5 minutes, 100 entries.
    fn default() -> Self {
        CacheLimits {
            max_messages: 1000,
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(300),
            capacity: 100,
        }
    }
}

/// Counters of a cache (monotonic since it was created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Encryptions that reused a cached data key.
    pub encrypt_hits: u64,
    /// Encryptions that needed a new data key (GenerateDataKey).
    pub encrypt_misses: u64,
    /// Decryptions that found the unwrapped data key in the cache.
    pub decrypt_hits: u64,
    /// Decryptions that had to unwrap the data key (Decrypt).
    pub decrypt_misses: u64,
    /// Keys removed because a limit was reached, they expired or the map was full.
    pub evictions: u64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct EncryptSlot {
    pub(crate) key_id: String,
    pub(crate) context: Vec<u8>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct DecryptSlot {
    pub(crate) wrapped: Vec<u8>,
    pub(crate) context: Vec<u8>,
    pub(crate) expected_key: String,
}

struct EncryptEntry {
    data_key: DataKey,
    wrapped: Vec<u8>,
    created: Instant,
    messages: u64,
    bytes: u64,
    last_used: u64,
}

struct DecryptEntry {
    data_key: DataKey,
    created: Instant,
    last_used: u64,
}

#[derive(Default)]
struct Maps {
    encrypt: HashMap<EncryptSlot, EncryptEntry>,
    decrypt: HashMap<DecryptSlot, DecryptEntry>,
    tick: u64,
}

/// A cache of data keys shared by the envelope operations of one client.
pub struct DataKeyCache {
    limits: CacheLimits,
    maps: Mutex<Maps>,
    encrypt_hits: AtomicU64,
    encrypt_misses: AtomicU64,
    decrypt_hits: AtomicU64,
    decrypt_misses: AtomicU64,
    evictions: AtomicU64,
}

impl DataKeyCache {
    /// An empty cache with `limits` (zero counts are raised to 1).
    pub fn new(limits: CacheLimits) -> Self {
        DataKeyCache {
            limits: CacheLimits {
                max_messages: limits.max_messages.max(1),
                capacity: limits.capacity.max(1),
                ..limits
            },
            maps: Mutex::new(Maps::default()),
            encrypt_hits: AtomicU64::new(0),
            encrypt_misses: AtomicU64::new(0),
            decrypt_hits: AtomicU64::new(0),
            decrypt_misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            encrypt_hits: self.encrypt_hits.load(Ordering::Relaxed),
            encrypt_misses: self.encrypt_misses.load(Ordering::Relaxed),
            decrypt_hits: self.decrypt_hits.load(Ordering::Relaxed),
            decrypt_misses: self.decrypt_misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Keys held now (encrypt, decrypt).
    pub fn len(&self) -> (usize, usize) {
        let maps = self.lock();
        (maps.encrypt.len(), maps.decrypt.len())
    }

    /// True if no key is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Drops (and zeroizes) every cached key.
    pub fn clear(&self) {
        let mut maps = self.lock();
        let removed = maps.encrypt.len() + maps.decrypt.len();
        maps.encrypt.clear();
        maps.decrypt.clear();
        self.count_evictions(removed);
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // A panic under the lock cannot leave a map half-updated in a way that
        // matters (entries are inserted or removed whole).
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_evictions(&self, n: usize) {
        self.evictions.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Charges one message of `size` bytes to the cached key of `slot` and runs
    /// `use_key(data key, wrapped key)` under the lock, if a key is cached and
    /// within every limit. A key that cannot take this message is dropped.
    pub(crate) fn use_for_encrypt<T>(
        &self,
        slot: &EncryptSlot,
        size: u64,
        now: Instant,
        use_key: impl FnOnce(&DataKey, &[u8]) -> T,
    ) -> Option<T> {
        let limits = self.limits;
        let mut maps = self.lock();
        maps.tick += 1;
        let tick = maps.tick;
        let usable = maps.encrypt.get(slot).map(|entry| {
            now.saturating_duration_since(entry.created) < limits.max_age
                && entry.messages < limits.max_messages
                && entry.bytes.saturating_add(size) <= limits.max_bytes
        });
        match usable {
            Some(true) => {}
            Some(false) => {
                maps.encrypt.remove(slot);
                self.count_evictions(1);
                self.encrypt_misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            None => {
                self.encrypt_misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let entry = maps.encrypt.get_mut(slot)?;
        entry.messages += 1;
        entry.bytes += size;
        entry.last_used = tick;
        let result = use_key(&entry.data_key, &entry.wrapped);
        let exhausted = entry.messages >= limits.max_messages || entry.bytes >= limits.max_bytes;
        if exhausted {
            maps.encrypt.remove(slot);
            self.count_evictions(1);
        }
        self.encrypt_hits.fetch_add(1, Ordering::Relaxed);
        Some(result)
    }

    /// Whether a message of `size` bytes may ever use the cache.
    pub(crate) fn accepts(&self, size: u64) -> bool {
        size <= self.limits.max_bytes
    }

    /// Caches a freshly generated key that has just encrypted one message of
    /// `size` bytes (unless that message used up its budget already).
    pub(crate) fn insert_for_encrypt(
        &self,
        slot: EncryptSlot,
        data_key: DataKey,
        wrapped: Vec<u8>,
        size: u64,
        now: Instant,
    ) {
        let limits = self.limits;
        if limits.max_messages <= 1 || size >= limits.max_bytes || limits.max_age.is_zero() {
            return;
        }
        let mut maps = self.lock();
        maps.tick += 1;
        let entry = EncryptEntry {
            data_key,
            wrapped,
            created: now,
            messages: 1,
            bytes: size,
            last_used: maps.tick,
        };
        maps.encrypt.insert(slot, entry);
        let evicted = evict_lru(&mut maps.encrypt, limits.capacity, |e| e.last_used);
        self.count_evictions(evicted);
    }

    /// Runs `use_key` on the unwrapped data key cached for `slot`, if it has not
    /// expired.
    pub(crate) fn use_for_decrypt<T>(
        &self,
        slot: &DecryptSlot,
        now: Instant,
        use_key: impl FnOnce(&DataKey) -> T,
    ) -> Option<T> {
        let max_age = self.limits.max_age;
        let mut maps = self.lock();
        maps.tick += 1;
        let tick = maps.tick;
        let fresh = maps
            .decrypt
            .get(slot)
            .map(|entry| now.saturating_duration_since(entry.created) < max_age);
        match fresh {
            Some(true) => {}
            Some(false) => {
                maps.decrypt.remove(slot);
                self.count_evictions(1);
                self.decrypt_misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            None => {
                self.decrypt_misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let entry = maps.decrypt.get_mut(slot)?;
        entry.last_used = tick;
        self.decrypt_hits.fetch_add(1, Ordering::Relaxed);
        Some(use_key(&entry.data_key))
    }

    /// Caches an unwrapped data key.
    pub(crate) fn insert_for_decrypt(&self, slot: DecryptSlot, data_key: DataKey, now: Instant) {
        if self.limits.max_age.is_zero() {
            return;
        }
        let mut maps = self.lock();
        maps.tick += 1;
        let entry = DecryptEntry {
            data_key,
            created: now,
            last_used: maps.tick,
        };
        maps.decrypt.insert(slot, entry);
        let evicted = evict_lru(&mut maps.decrypt, self.limits.capacity, |e| e.last_used);
        self.count_evictions(evicted);
    }
}

/// Removes least recently used entries until at most `capacity` remain; returns
/// how many were removed. Linear scan: capacities are small (hundreds).
fn evict_lru<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    capacity: usize,
    last_used: impl Fn(&V) -> u64,
) -> usize {
    let mut removed = 0;
    while map.len() > capacity {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, v)| last_used(v))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&oldest);
        removed += 1;
    }
    removed
}

impl fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (encrypt, decrypt) = self.len();
        f.debug_struct("DataKeyCache")
            .field("limits", &self.limits)
            .field("encrypt_entries", &encrypt)
            .field("decrypt_entries", &decrypt)
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str) -> EncryptSlot {
        EncryptSlot {
            key_id: name.to_owned(),
            context: vec![0, 0, 0, 0],
        }
    }

    fn dslot(name: &str) -> DecryptSlot {
        DecryptSlot {
            wrapped: name.as_bytes().to_vec(),
            context: vec![0, 0, 0, 0],
            expected_key: String::new(),
        }
    }

    fn key(byte: u8) -> DataKey {
        DataKey::from_bytes([byte; 32])
    }

    /// Which key (by its first byte) a cached encryption would use, if any.
    fn use_enc(cache: &DataKeyCache, name: &str, size: u64, now: Instant) -> Option<u8> {
        cache.use_for_encrypt(&slot(name), size, now, |k, _| k.expose_secret()[0])
    }

    fn limits(max_messages: u64, max_bytes: u64, secs: u64, capacity: usize) -> CacheLimits {
        CacheLimits {
            max_messages,
            max_bytes,
            max_age: Duration::from_secs(secs),
            capacity,
        }
    }

    #[test]
    fn a_data_key_serves_at_most_max_messages() {
        let cache = DataKeyCache::new(limits(3, u64::MAX, 60, 10));
        let now = Instant::now();
        assert_eq!(use_enc(&cache, "k", 10, now), None);
        cache.insert_for_encrypt(slot("k"), key(1), vec![9], 10, now);
        assert_eq!(use_enc(&cache, "k", 10, now), Some(1));
        assert_eq!(use_enc(&cache, "k", 10, now), Some(1));
        // Three messages used it (the one that generated it included): gone.
        assert_eq!(cache.len(), (0, 0));
        assert_eq!(use_enc(&cache, "k", 10, now), None);
        let stats = cache.stats();
        assert_eq!((stats.encrypt_hits, stats.encrypt_misses), (2, 2));
        assert_eq!(stats.evictions, 1);
    }

    #[test]
    fn a_data_key_serves_at_most_max_bytes() {
        let cache = DataKeyCache::new(limits(100, 100, 60, 10));
        let now = Instant::now();
        assert!(cache.accepts(100) && !cache.accepts(101));
        cache.insert_for_encrypt(slot("k"), key(1), vec![9], 40, now);
        assert_eq!(use_enc(&cache, "k", 40, now), Some(1)); // 80 bytes
        assert_eq!(use_enc(&cache, "k", 40, now), None); // would be 120
        assert_eq!(cache.len(), (0, 0));
        // A message that uses the whole budget by itself is never cached.
        cache.insert_for_encrypt(slot("k"), key(2), vec![9], 100, now);
        assert_eq!(cache.len(), (0, 0));
        // Exactly reaching the budget is allowed, then the key is dropped.
        cache.insert_for_encrypt(slot("k"), key(3), vec![9], 60, now);
        assert_eq!(use_enc(&cache, "k", 40, now), Some(3));
        assert_eq!(cache.len(), (0, 0));
    }

    #[test]
    fn keys_expire_after_max_age() {
        let cache = DataKeyCache::new(limits(100, u64::MAX, 10, 10));
        let now = Instant::now();
        cache.insert_for_encrypt(slot("k"), key(1), vec![9], 1, now);
        cache.insert_for_decrypt(dslot("w"), key(2), now);
        let soon = now + Duration::from_secs(9);
        assert_eq!(use_enc(&cache, "k", 1, soon), Some(1));
        assert_eq!(
            cache.use_for_decrypt(&dslot("w"), soon, |k| k.expose_secret()[0]),
            Some(2)
        );
        let late = now + Duration::from_secs(10);
        assert_eq!(use_enc(&cache, "k", 1, late), None);
        assert_eq!(cache.use_for_decrypt(&dslot("w"), late, |_| ()), None);
        assert!(cache.is_empty());
        let stats = cache.stats();
        assert_eq!((stats.decrypt_hits, stats.decrypt_misses), (1, 1));
        assert_eq!(stats.evictions, 2);
    }

    #[test]
    fn each_map_is_bounded_and_evicts_the_least_recently_used() {
        let cache = DataKeyCache::new(limits(100, u64::MAX, 60, 2));
        let now = Instant::now();
        cache.insert_for_encrypt(slot("a"), key(1), vec![9], 1, now);
        cache.insert_for_encrypt(slot("b"), key(2), vec![9], 1, now);
        assert_eq!(use_enc(&cache, "a", 1, now), Some(1));
        cache.insert_for_encrypt(slot("c"), key(3), vec![9], 1, now);
        assert_eq!(cache.len().0, 2);
        assert_eq!(
            use_enc(&cache, "b", 1, now),
            None,
            "b was least recently used"
        );
        assert_eq!(use_enc(&cache, "a", 1, now), Some(1));
        assert_eq!(use_enc(&cache, "c", 1, now), Some(3));

        for (i, name) in ["w1", "w2", "w3"].iter().enumerate() {
            cache.insert_for_decrypt(dslot(name), key(i as u8), now);
        }
        assert_eq!(cache.len().1, 2);
        assert_eq!(cache.use_for_decrypt(&dslot("w1"), now, |_| ()), None);
        assert_eq!(cache.stats().evictions, 2);
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn one_message_per_key_disables_encrypt_caching_and_debug_has_no_keys() {
        let cache = DataKeyCache::new(limits(1, u64::MAX, 60, 10));
        cache.insert_for_encrypt(slot("k"), key(0xAB), vec![9], 1, Instant::now());
        assert_eq!(cache.len(), (0, 0));
        cache.insert_for_decrypt(dslot("w"), key(0xAB), Instant::now());
        let out = format!("{cache:?}");
        assert!(!out.contains("171") && !out.contains("ab, ab"), "{out}");
        assert!(out.contains("decrypt_entries: 1"), "{out}");
    }
}
