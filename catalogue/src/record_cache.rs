//! Decoded key and version records for the request path.
//!
//! Every Encrypt/Decrypt reads its key record and one version record; from
//! RocksDB that is two point reads and two JSON decodes per request (about 6%
//! of the server's CPU under load). Records change only through the
//! catalogue's own writes, so the catalogue keeps the decoded records here
//! and invalidates all of them on every write.
//!
//! Invalidation is the engine's generation, which changes after each
//! catalogue write has committed (whether or not it succeeded) and, in a
//! cluster, whenever another node's write reaches this node's view. A reader takes the
//! generation *before* it reads the database and files what it read under
//! it; an entry is used only while its generation is still current. So an
//! entry can never be older than the last committed write: a record read
//! before that write's commit carries a generation the write's bump has
//! already made stale.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{PoisonError, RwLock};

/// Entries kept per map at most; a full map is emptied and refilled by the
/// reads that follow (the hot keys return at once).
const MAX_ENTRIES: usize = 4096;

/// Decoded records by key, each filed under the generation it was read at.
#[derive(Debug)]
pub(crate) struct RecordCache<K, V> {
    entries: RwLock<HashMap<K, (u64, V)>>,
}

impl<K: Eq + Hash, V: Clone> RecordCache<K, V> {
    pub(crate) fn new() -> Self {
        RecordCache {
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The value filed under `generation`, if that is the one it was read at.
    pub(crate) fn get<Q>(&self, key: &Q, generation: u64) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        match entries.get(key) {
            Some((filed, value)) if *filed == generation => Some(value.clone()),
            _ => None,
        }
    }

    /// Files `value`, read from the database after `generation` was taken.
    pub(crate) fn put(&self, key: K, generation: u64, value: V) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            entries.clear();
        }
        entries.insert(key, (generation, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_used_only_under_the_generation_it_was_read_at() {
        let mut generation = 0u64;
        let cache: RecordCache<String, u32> = RecordCache::new();
        let g = generation;
        cache.put("k".into(), g, 1);
        assert_eq!(cache.get("k", generation), Some(1));
        generation += 1;
        assert_eq!(cache.get("k", generation), None);
        // A value read before the bump but filed after it is never used.
        cache.put("k".into(), g, 2);
        assert_eq!(cache.get("k", generation), None);
        cache.put("k".into(), generation, 3);
        assert_eq!(cache.get("k", generation), Some(3));
    }

    #[test]
    fn a_full_cache_starts_over_instead_of_growing() {
        let cache: RecordCache<u32, u32> = RecordCache::new();
        for i in 0..u32::try_from(MAX_ENTRIES).unwrap_or(u32::MAX) {
            cache.put(i, 0, i);
        }
        assert_eq!(cache.get(&7, 0), Some(7));
        cache.put(u32::MAX, 0, 1);
        assert_eq!(cache.get(&7, 0), None);
        assert_eq!(cache.get(&u32::MAX, 0), Some(1));
    }
}
