//! Audit checkpoints: when the writer certifies the head of the hash chain
//! with a MAC, and how.
//!
//! Checkpoints live in their own column family, keyed by the sequence of the
//! record whose hash they certify, and are written in the same batch as that
//! record. One is written after every `checkpoint_every_records` records
//! (counted across restarts), when `checkpoint_interval` has passed with
//! records uncertified, and on clean shutdown. A failing MAC (HSM unavailable)
//! fails the batch that needed the checkpoint; a timed one is best effort.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rocksdb::{IteratorMode, WriteBatch};

use super::group_commit::{Failure, Writer, corrupt};
use super::record::Checkpoint;
use crate::db::Db;
use crate::schema::{self, CF_AUDIT_CHECKPOINTS};
use kms_catalogue::StorageError;

/// The sequence number the newest checkpoint certifies; `None` if there is none.
pub(super) fn last_checkpoint_seq(db: &Db) -> Result<Option<u64>, StorageError> {
    let mut it = db
        .db
        .iterator_cf(db.cf(CF_AUDIT_CHECKPOINTS)?, IteratorMode::End);
    match it.next() {
        None => Ok(None),
        Some(item) => {
            let (k, _) = item.map_err(StorageError::db("read audit checkpoint"))?;
            Ok(Some(schema::decode_seq_key(&k).ok_or_else(|| {
                corrupt(CF_AUDIT_CHECKPOINTS, &k, "bad key")
            })?))
        }
    }
}

fn encode_checkpoint(cp: &Checkpoint) -> Result<Vec<u8>, Failure> {
    cp.encode().map_err(|_| Failure::MacTooLong(cp.mac.len()))
}

impl Writer {
    pub(super) fn checkpoint_deadline(&self) -> Option<Instant> {
        let interval = self.config.checkpoint_interval?;
        (self.since_checkpoint > 0 && !self.poisoned()).then(|| self.last_checkpoint_at + interval)
    }

    fn make_checkpoint(&self, seq: u64, time: u64, head: &[u8; 32]) -> Result<Checkpoint, Failure> {
        let msg = Checkpoint::mac_message(seq, time, head);
        let mac = (self.mac)(&msg).map_err(|e| Failure::Mac(seq, Arc::from(e)))?;
        Ok(Checkpoint {
            seq,
            time_micros: time,
            head_hash: *head,
            mac,
        })
    }

    /// A checkpoint of the current head in a batch of its own (timer, shutdown).
    pub(super) fn standalone_checkpoint(&mut self, why: &'static str) {
        if self.since_checkpoint == 0 || self.poisoned() {
            return;
        }
        let time = self.next_time();
        let result = self
            .make_checkpoint(self.last_seq, time, &self.head)
            .and_then(|cp| {
                let mut wb = WriteBatch::default();
                let cf = self.cf(CF_AUDIT_CHECKPOINTS)?;
                wb.put_cf(cf, schema::seq_key(cp.seq), encode_checkpoint(&cp)?);
                self.write(wb)
            });
        match result {
            Ok(()) => {
                self.since_checkpoint = 0;
                self.last_time = time;
                self.last_checkpoint_at = Instant::now();
            }
            Err(Failure::Write(e)) => {
                tracing::error!(error = %e, why, "audit checkpoint write failed; poisoning the audit log");
                self.shared.poisoned.store(true, Ordering::Release);
            }
            Err(f) => {
                tracing::warn!(error = %f.to_error(), why, "audit checkpoint not written");
                // Retry after another interval rather than spinning.
                self.last_checkpoint_at = Instant::now();
            }
        }
    }

    pub(super) fn checkpoint_into(
        &self,
        wb: &mut WriteBatch,
        cf: &rocksdb::ColumnFamily,
        seq: u64,
        time: u64,
        head: &[u8; 32],
    ) -> Result<(), Failure> {
        let cp = self.make_checkpoint(seq, time, head)?;
        wb.put_cf(cf, schema::seq_key(seq), encode_checkpoint(&cp)?);
        Ok(())
    }
}
