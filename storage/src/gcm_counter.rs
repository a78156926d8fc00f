//! Per-version AES-GCM invocation counters, on the encrypt hot path.
//!
//! Strategy: *reserve ahead, count in memory*. The persisted value in the
//! `gcm_counters` column family is a reservation, always at least the number of
//! invocations actually made. Counting takes a process-wide mutex and bumps an
//! in-memory total; only when the total would pass the reservation is a new
//! block reserved with one synced write. After a crash or restart the count
//! resumes from the reservation, so it can over-count by at most one block per
//! version per restart, and can never go backwards or under-count: the safe
//! direction for the NIST SP 800-38D random-IV limit the service enforces.
//!
//! A limit given to [`GcmCounters::add`] is checked under the same mutex as
//! the count, so concurrent encryptions can never together pass it: an
//! invocation that would is refused and not counted.

use std::collections::HashMap;
use std::sync::Mutex;

use rocksdb::WriteBatch;

use crate::db::Db;
use crate::error::StorageError;
use crate::schema::CF_GCM_COUNTERS;

#[derive(Debug, Clone, Copy)]
struct Lease {
    used: u64,
    reserved: u64,
}

#[derive(Debug)]
pub(crate) struct GcmCounters {
    block: u64,
    leases: Mutex<HashMap<Vec<u8>, Lease>>,
}

fn read_persisted(db: &Db, key: &[u8]) -> Result<u64, StorageError> {
    match db.get(CF_GCM_COUNTERS, key)? {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(
            |_| StorageError::Corrupt {
                cf: CF_GCM_COUNTERS,
                key_hex: hex::encode(key),
                reason: "counter is not 8 bytes",
            },
        )?)),
    }
}

impl GcmCounters {
    pub(crate) fn new(block: u64) -> Self {
        GcmCounters {
            block: block.max(1),
            leases: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Lease>> {
        // A lease only ever grows and is persisted before it is used, so state
        // left by a panicking holder is still a valid upper bound.
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `n` invocations and returns the running total, or `None` (and
    /// counts nothing) if the total would pass `limit`. `exists` is called
    /// once per version per process, before its first count.
    pub(crate) fn add(
        &self,
        db: &Db,
        key: &[u8],
        n: u64,
        limit: u64,
        exists: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<Option<u64>, StorageError> {
        let mut leases = self.lock();
        let lease = match leases.get(key) {
            Some(l) => *l,
            None => {
                exists()?;
                let p = read_persisted(db, key)?;
                Lease {
                    used: p,
                    reserved: p,
                }
            }
        };
        let used = lease.used.saturating_add(n);
        if used > limit {
            // Remember what was read, so the next call does not re-read it.
            leases.insert(key.to_vec(), lease);
            return Ok(None);
        }
        let mut reserved = lease.reserved;
        if used > reserved {
            reserved = used.saturating_add(self.block);
            let mut batch = WriteBatch::default();
            batch.put_cf(db.cf(CF_GCM_COUNTERS)?, key, reserved.to_be_bytes());
            db.write_synced(batch)?;
        }
        leases.insert(key.to_vec(), Lease { used, reserved });
        Ok(Some(used))
    }

    /// The current count: the in-memory total if this process has counted,
    /// otherwise the persisted reservation (an upper bound).
    pub(crate) fn current(&self, db: &Db, key: &[u8]) -> Result<u64, StorageError> {
        if let Some(l) = self.lock().get(key) {
            return Ok(l.used);
        }
        read_persisted(db, key)
    }
}
