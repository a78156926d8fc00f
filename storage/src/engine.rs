//! The RocksDB engine of the catalogue (single node, the embedded default):
//! each [`Table`] is the column family of the same name, every commit one
//! synced `WriteBatch`.
//!
//! One process owns the database (RocksDB's lock file) and the catalogue
//! serialises its writers, so a commit can never find that another write
//! came in since its reads: the compare-and-set of [`CatalogueEngine::commit`]
//! holds by construction, and the generation is a process-local counter
//! (it only invalidates the catalogue's decoded-record cache).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kms_catalogue::{
    Batch, CatalogueEngine, Fence, Op, ScanFn, StorageError, Table, UsageRow, schema::version_key,
};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::db::Db;
use crate::schema::{CF_GCM_COUNTERS, CF_USAGE, usage_watermark_key};

/// The catalogue engine over the node's RocksDB database.
#[derive(Debug)]
pub(crate) struct RocksEngine {
    db: Arc<Db>,
    generation: AtomicU64,
}

impl RocksEngine {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        RocksEngine {
            db,
            generation: AtomicU64::new(0),
        }
    }
}

impl CatalogueEngine for RocksEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get(table.name(), key)
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        f: &mut ScanFn<'_>,
    ) -> Result<(), StorageError> {
        let start = after.unwrap_or(prefix);
        let iter = self.db.db.iterator_cf(
            self.db.cf(table.name())?,
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

    fn last_key(&self, table: Table, prefix: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let cf = self.db.cf(table.name())?;
        let mut it = if prefix.is_empty() {
            self.db.db.iterator_cf(cf, IteratorMode::End)
        } else {
            // Seek to the greatest key ≤ `prefix ‖ FF…`: every key of the
            // catalogue that starts with `prefix` continues with ASCII (an
            // alias name) or a 4-byte version, so 8 bytes of 0xFF sort after
            // all of them.
            let mut upper = prefix.to_vec();
            upper.extend_from_slice(&[0xFF; 8]);
            self.db
                .db
                .iterator_cf(cf, IteratorMode::From(&upper, Direction::Reverse))
        };
        let Some(item) = it.next() else {
            return Ok(None);
        };
        let (k, _) = item.map_err(StorageError::db("iterate"))?;
        Ok(k.starts_with(prefix).then(|| k.to_vec()))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn check_fresh(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn begin_write(&self) -> Result<u64, StorageError> {
        Ok(self.generation())
    }

    fn commit(&self, _read_at: u64, batch: Batch) -> Result<(), StorageError> {
        let mut wb = WriteBatch::default();
        for op in &batch.ops {
            match op {
                Op::Put { table, key, value } => wb.put_cf(self.db.cf(table.name())?, key, value),
                Op::Delete { table, key } => wb.delete_cf(self.db.cf(table.name())?, key),
            }
        }
        let result = self.db.write_synced(wb);
        // After the write, whether or not it succeeded: records decoded
        // before it are stale either way.
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    fn counter_get(&self, key: &[u8]) -> Result<u64, StorageError> {
        match self.db.get(CF_GCM_COUNTERS, key)? {
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

    fn counter_reserve(&self, key: &[u8], expected: u64, new: u64) -> Result<bool, StorageError> {
        // The catalogue's counters call this under their own mutex, and one
        // process owns the database, so nothing can change the value
        // between this read and the write.
        if self.counter_get(key)? != expected {
            return Ok(false);
        }
        let mut wb = WriteBatch::default();
        wb.put_cf(self.db.cf(CF_GCM_COUNTERS)?, key, new.to_be_bytes());
        self.db.write_synced(wb)?;
        Ok(true)
    }

    fn leadership(&self, job: &str) -> Result<Option<Fence>, StorageError> {
        Ok(Some(Fence {
            job: job.to_owned(),
            token: 0,
        }))
    }

    fn usage_put(
        &self,
        node: &str,
        rows: &[(String, u32, Vec<u8>)],
        watermark: u64,
    ) -> Result<(), StorageError> {
        // One synced batch per flush (never per request): rows and the
        // watermark together.
        let cf = self.db.cf(CF_USAGE)?;
        let mut wb = WriteBatch::default();
        for (key_id, version, value) in rows {
            let mut k = version_key(key_id, *version);
            k.extend_from_slice(node.as_bytes());
            wb.put_cf(cf, k, value);
        }
        wb.put_cf(cf, usage_watermark_key(node), watermark.to_be_bytes());
        self.db.write_synced(wb)
    }

    fn usage_rows(&self, key_id: &str) -> Result<Vec<UsageRow>, StorageError> {
        let prefix = key_id.as_bytes();
        let iter = self.db.db.iterator_cf(
            self.db.cf(CF_USAGE)?,
            IteratorMode::From(prefix, Direction::Forward),
        );
        let mut rows = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(StorageError::db("iterate"))?;
            let Some(rest) = k.strip_prefix(prefix) else {
                break;
            };
            let corrupt = || StorageError::Corrupt {
                cf: CF_USAGE,
                key_hex: hex::encode(&k),
                reason: "usage key is not key id ‖ version ‖ node",
            };
            let (version, node) = rest.split_at_checked(4).ok_or_else(corrupt)?;
            let version = u32::from_be_bytes(version.try_into().map_err(|_| corrupt())?);
            let node = std::str::from_utf8(node).map_err(|_| corrupt())?;
            rows.push(UsageRow {
                node: node.to_owned(),
                version,
                value: v.to_vec(),
            });
        }
        Ok(rows)
    }

    fn usage_watermark(&self, node: &str) -> Result<u64, StorageError> {
        let key = usage_watermark_key(node);
        match self.db.get(CF_USAGE, &key)? {
            None => Ok(0),
            Some(v) => Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(
                |_| StorageError::Corrupt {
                    cf: CF_USAGE,
                    key_hex: hex::encode(&key),
                    reason: "usage watermark is not 8 bytes",
                },
            )?)),
        }
    }
}
