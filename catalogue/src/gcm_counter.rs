//! Per-version AES-GCM invocation counters, on the encrypt hot path.
//!
//! Strategy: *reserve ahead, count in memory*. The stored value of a
//! version's counter (table `gcm_counters`) is the ceiling of all
//! reservations ever made for it, on any node: always at least the number of
//! invocations actually made. A process owns the range `[next, end)` it
//! reserved last and counts within it under a process-wide mutex; only when
//! a count would pass `end` does it reserve a new block with one
//! compare-and-set of the stored ceiling from `c` to `c + block` (retried on
//! a lost race). So the ranges of all nodes are disjoint and their sum never
//! exceeds the ceiling (design note §2.3.3, I5). After a crash or restart a
//! process starts a new range at the ceiling: the unused rest of its old
//! range counts as used. Counts can over-count by at most one block per
//! version per restart, never go backwards and never under-count: the safe
//! direction for the NIST SP 800-38D random-IV limit the service enforces.
//!
//! A limit given to [`GcmCounters::add`] is checked under the same mutex as
//! the count and before any reservation, so concurrent encryptions can never
//! together pass it, on one node or across nodes (a reservation never raises
//! the ceiling past the limit): an invocation that would is refused and not
//! counted.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::engine::CatalogueEngine;
use crate::error::StorageError;

/// How many lost compare-and-set races in a row a reservation tolerates
/// before it reports the contention as [`StorageError::WriteConflict`].
const MAX_RESERVE_ATTEMPTS: u32 = 64;

/// The range of invocation numbers this process owns: `[next, end)`.
#[derive(Debug, Clone, Copy)]
struct Lease {
    next: u64,
    end: u64,
}

#[derive(Debug)]
pub(crate) struct GcmCounters {
    block: u64,
    leases: Mutex<HashMap<Vec<u8>, Lease>>,
}

impl GcmCounters {
    pub(crate) fn new(block: u64) -> Self {
        GcmCounters {
            block: block.max(1),
            leases: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Lease>> {
        // A lease only shrinks from the front and is reserved before it is
        // used, so state left by a panicking holder is still within a
        // reserved range.
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds `n` invocations and returns the running total (the number of the
    /// last invocation counted, counting every node's reservations), or
    /// `None` (and counts nothing) if the total would pass `limit`. `exists`
    /// is called once per version per process, before its first reservation.
    pub(crate) fn add(
        &self,
        engine: &dyn CatalogueEngine,
        key: &[u8],
        n: u64,
        limit: u64,
        exists: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<Option<u64>, StorageError> {
        let mut leases = self.lock();
        if let Some(lease) = leases.get_mut(key) {
            let next = lease.next.saturating_add(n);
            if next <= lease.end {
                if next > limit {
                    return Ok(None);
                }
                lease.next = next;
                return Ok(Some(next));
            }
        } else {
            exists()?;
        }
        // The owned range cannot take `n` more: reserve a new block at the
        // stored ceiling.
        for _ in 0..MAX_RESERVE_ATTEMPTS {
            let ceiling = engine.counter_get(key)?;
            let next = ceiling.saturating_add(n);
            if next > limit {
                // Remember the ceiling, so the next call does not re-read
                // it before finding the same.
                leases.insert(
                    key.to_vec(),
                    Lease {
                        next: ceiling,
                        end: ceiling,
                    },
                );
                return Ok(None);
            }
            let end = next.saturating_add(self.block).min(limit.max(next));
            if engine.counter_reserve(key, ceiling, end)? {
                leases.insert(key.to_vec(), Lease { next, end });
                return Ok(Some(next));
            }
        }
        Err(StorageError::WriteConflict)
    }

    /// The current count: the next invocation number of this process's
    /// range if it has counted, otherwise the stored ceiling (an upper bound).
    pub(crate) fn current(
        &self,
        engine: &dyn CatalogueEngine,
        key: &[u8],
    ) -> Result<u64, StorageError> {
        if let Some(l) = self.lock().get(key) {
            return Ok(l.next);
        }
        engine.counter_get(key)
    }
}
