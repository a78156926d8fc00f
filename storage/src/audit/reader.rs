//! Reading the audit log: single records, filtered paginated queries and JSON
//! lines export. Read-only; works while a writer is appending.

use std::io::Write;
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode};

use super::record::{AuditRecord, Checkpoint};
use crate::db::Db;
use crate::schema::{self, CF_AUDIT, CF_AUDIT_CHECKPOINTS};
use kms_catalogue::StorageError;

/// Records to examine per query page at most (bounds the time one call takes).
pub const MAX_SCAN_PER_PAGE: usize = 100_000;

/// Which records a query returns. Every set field must match; time bounds are
/// inclusive `from_micros` and exclusive `to_micros`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records at or after this time, unix microseconds.
    pub from_micros: Option<u64>,
    /// Records before this time, unix microseconds.
    pub to_micros: Option<u64>,
    /// Records naming this key id (as named in the request).
    pub key_id: Option<String>,
    /// Records of this principal.
    pub principal: Option<String>,
    /// Records of this operation, e.g. `"Encrypt"`.
    pub operation: Option<String>,
}

impl AuditFilter {
    /// Whether `r` matches every set field.
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.from_micros.is_none_or(|t| r.time_micros >= t)
            && self.to_micros.is_none_or(|t| r.time_micros < t)
            && self
                .key_id
                .as_ref()
                .is_none_or(|k| r.event.key_id.as_ref() == Some(k))
            && self
                .principal
                .as_ref()
                .is_none_or(|p| r.event.principal == *p)
            && self
                .operation
                .as_ref()
                .is_none_or(|o| r.event.operation == *o)
    }
}

/// One page of query results in sequence order. If `next_after` is set, pass it
/// as `after` to continue (the page may be short when the scan budget ran out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The matching records, in sequence order.
    pub records: Vec<AuditRecord>,
    /// The last sequence number examined, when there may be more.
    pub next_after: Option<u64>,
}

/// Read access to the audit log. Obtain it with [`crate::Storage::audit_reader`].
#[derive(Debug, Clone)]
pub struct AuditReader {
    pub(crate) db: Arc<Db>,
}

pub(crate) fn decode_record_at(k: &[u8], v: &[u8]) -> Result<AuditRecord, StorageError> {
    AuditRecord::decode(v).map_err(|reason| StorageError::Corrupt {
        cf: CF_AUDIT,
        key_hex: hex::encode(k),
        reason,
    })
}

impl AuditReader {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        AuditReader { db }
    }

    /// The record with sequence number `seq`, if present.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] if a
    /// stored record does not decode.
    pub fn get(&self, seq: u64) -> Result<Option<AuditRecord>, StorageError> {
        let k = schema::seq_key(seq);
        self.db
            .get(CF_AUDIT, &k)?
            .map(|v| decode_record_at(&k, &v))
            .transpose()
    }

    /// The highest sequence number stored (0 when empty).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] if a
    /// stored key does not decode.
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        let mut it = self
            .db
            .db
            .iterator_cf(self.db.cf(CF_AUDIT)?, IteratorMode::End);
        match it.next() {
            None => Ok(0),
            Some(item) => {
                let (k, _) = item.map_err(StorageError::db("iterate audit"))?;
                schema::decode_seq_key(&k).ok_or_else(|| StorageError::Corrupt {
                    cf: CF_AUDIT,
                    key_hex: hex::encode(&k),
                    reason: "bad key",
                })
            }
        }
    }

    /// Records matching `filter` with sequence numbers greater than `after`, at
    /// most `limit` of them: [`AuditReader::query_range`] without an upper bound.
    ///
    /// # Errors
    ///
    /// As [`AuditReader::query_range`].
    pub fn query(
        &self,
        filter: &AuditFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditPage, StorageError> {
        self.query_range(filter, after, u64::MAX, limit)
    }

    /// Records matching `filter` with sequence numbers greater than `after`
    /// and at most `until`, at most `limit` of them. Scans in sequence order;
    /// since record times never decrease along the chain, the scan stops at
    /// the end of the time range. `limit` is clamped to
    /// 1..=[`crate::MAX_PAGE_SIZE`]; at most [`MAX_SCAN_PER_PAGE`] records are
    /// examined per call.
    ///
    /// A paged listing passes the same `until` with every page (the log's
    /// [`AuditReader::last_seq`] at its first page): the log grows while it is
    /// read (reading it is audited too), and only a fixed bound makes the
    /// listing terminate and return just the records that existed when it
    /// started. `next_after` is `None` once `until` has been examined.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] if a
    /// stored record does not decode.
    pub fn query_range(
        &self,
        filter: &AuditFilter,
        after: Option<u64>,
        until: u64,
        limit: usize,
    ) -> Result<AuditPage, StorageError> {
        let limit = limit.clamp(1, kms_catalogue::MAX_PAGE_SIZE);
        let start = after.map_or(1, |a| a.saturating_add(1));
        let mut records = Vec::new();
        let mut last_seen = None;
        let mut exhausted = true;
        if start > until {
            return Ok(AuditPage {
                records,
                next_after: None,
            });
        }
        let key = schema::seq_key(start);
        let it = self.db.db.iterator_cf(
            self.db.cf(CF_AUDIT)?,
            IteratorMode::From(&key, Direction::Forward),
        );
        for (scanned, item) in it.enumerate() {
            if records.len() == limit || scanned == MAX_SCAN_PER_PAGE {
                exhausted = false;
                break;
            }
            let (k, v) = item.map_err(StorageError::db("iterate audit"))?;
            let rec = decode_record_at(&k, &v)?;
            if rec.seq > until {
                break;
            }
            last_seen = Some(rec.seq);
            if filter.to_micros.is_some_and(|t| rec.time_micros >= t) {
                break;
            }
            if filter.matches(&rec) {
                records.push(rec);
            }
        }
        Ok(AuditPage {
            records,
            next_after: if exhausted {
                None
            } else {
                last_seen.filter(|&seen| seen < until)
            },
        })
    }

    /// Writes every record matching `filter` as one JSON object per line;
    /// returns how many were written. Records appended while it runs are not
    /// written (the export ends at the last record that existed when it began).
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] if a
    /// stored record does not decode.
    /// [`StorageError::Export`] if writing to `out` fails (what was written stays written).
    pub fn export_jsonl(
        &self,
        filter: &AuditFilter,
        out: &mut dyn Write,
    ) -> Result<u64, StorageError> {
        let mut after = None;
        let mut n = 0u64;
        let until = self.last_seq()?;
        loop {
            let page = self.query_range(filter, after, until, kms_catalogue::MAX_PAGE_SIZE)?;
            for rec in &page.records {
                serde_json::to_writer(&mut *out, rec).map_err(|source| {
                    StorageError::Serialize {
                        what: "audit record",
                        source,
                    }
                })?;
                out.write_all(b"\n")
                    .map_err(|source| StorageError::Export { source })?;
                n += 1;
            }
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        out.flush()
            .map_err(|source| StorageError::Export { source })?;
        Ok(n)
    }

    /// Checkpoints with sequence numbers greater than `after`, at most `limit`.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] if RocksDB fails; [`StorageError::Corrupt`] if a
    /// stored checkpoint does not decode.
    pub fn checkpoints(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Checkpoint>, StorageError> {
        let start = schema::seq_key(after.map_or(0, |a| a.saturating_add(1)));
        let it = self.db.db.iterator_cf(
            self.db.cf(CF_AUDIT_CHECKPOINTS)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it.take(limit) {
            let (k, v) = item.map_err(StorageError::db("iterate audit checkpoints"))?;
            out.push(
                Checkpoint::decode(&v).map_err(|reason| StorageError::Corrupt {
                    cf: CF_AUDIT_CHECKPOINTS,
                    key_hex: hex::encode(&k),
                    reason,
                })?,
            );
        }
        Ok(out)
    }
}
