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

use super::group_commit::{Failure, SealedCheckpoint, Writer, corrupt};
use super::record::{AuditEvent, AuditRecord, Checkpoint, WitnessedHead};
use crate::db::Db;
use crate::schema::{self, CF_AUDIT, CF_AUDIT_CHECKPOINTS};
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

pub(super) fn encode_checkpoint(cp: &Checkpoint) -> Result<Vec<u8>, Failure> {
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

    /// The witness record due before a checkpoint: the other nodes' heads,
    /// if this node witnesses and has read one it has not witnessed yet.
    fn witness_due(&self) -> Option<Vec<WitnessedHead>> {
        let heads = self.witness.as_ref()?.peers.snapshot();
        heads
            .iter()
            .any(|h| self.last_witnessed.get(&h.node) != Some(&h.seq))
            .then_some(heads)
    }

    /// A checkpoint of the chain ending at `seq`/`head`, preceded, on a
    /// cluster node, by a witness record (which the checkpoint then
    /// certifies). Nothing is written yet.
    pub(super) fn seal_checkpoint(
        &self,
        seq: u64,
        time: u64,
        head: &[u8; 32],
    ) -> Result<SealedCheckpoint, Failure> {
        let witness = match self.witness_due() {
            None => None,
            Some(heads) => {
                match AuditRecord::seal_with_witness(
                    seq + 1,
                    time,
                    AuditEvent::witness(),
                    heads.clone(),
                    *head,
                ) {
                    Ok((rec, bytes)) => Some((heads, (rec.seq, rec.hash, bytes))),
                    Err(e) => {
                        // Only an absurd node id or MAC gets here; the
                        // checkpoint itself must not fail because of a peer.
                        tracing::warn!(error = %e, "audit witness record not written");
                        None
                    }
                }
            }
        };
        let (cseq, chead) = witness
            .as_ref()
            .map_or((seq, *head), |(_, (s, h, _))| (*s, *h));
        let checkpoint = self.make_checkpoint(cseq, time, &chead)?;
        Ok(SealedCheckpoint {
            witness,
            checkpoint,
        })
    }

    /// After a batch holding checkpoint `made` (and witness records of
    /// `witnessed`) is durable: remember what was witnessed and hand the
    /// checkpoint over for publishing.
    pub(super) fn checkpoint_done(
        &mut self,
        witnessed: Vec<WitnessedHead>,
        made: Option<&Checkpoint>,
    ) {
        for h in witnessed {
            self.last_witnessed.insert(h.node, h.seq);
        }
        if let (Some(w), Some(cp)) = (&self.witness, made) {
            (w.on_checkpoint)(cp);
        }
    }

    /// A checkpoint of the current head in a batch of its own (timer, shutdown).
    pub(super) fn standalone_checkpoint(&mut self, why: &'static str) {
        if self.since_checkpoint == 0 || self.poisoned() {
            return;
        }
        let time = self.next_time();
        let result = self
            .seal_checkpoint(self.last_seq, time, &self.head)
            .and_then(|sc| {
                let mut wb = WriteBatch::default();
                if let Some((_, (wseq, _, bytes))) = &sc.witness {
                    wb.put_cf(self.cf(CF_AUDIT)?, schema::seq_key(*wseq), bytes);
                }
                let cf = self.cf(CF_AUDIT_CHECKPOINTS)?;
                wb.put_cf(
                    cf,
                    schema::seq_key(sc.checkpoint.seq),
                    encode_checkpoint(&sc.checkpoint)?,
                );
                self.write(wb)?;
                Ok(sc)
            });
        match result {
            Ok(sc) => {
                self.since_checkpoint = 0;
                self.last_time = time;
                self.last_checkpoint_at = Instant::now();
                let mut witnessed = Vec::new();
                if let Some((heads, (wseq, whash, _))) = sc.witness {
                    self.last_seq = wseq;
                    self.head = whash;
                    *self
                        .shared
                        .head
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = (wseq, whash);
                    self.shared.committed.send_replace(wseq);
                    witnessed = heads;
                }
                self.checkpoint_done(witnessed, Some(&sc.checkpoint));
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
}
