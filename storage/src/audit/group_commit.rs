//! The audit writer thread (group commit) and its configuration. The handle
//! callers use is `writer::AuditLog`.
//!
//! The writer drains whatever has queued up (up to `max_batch` records),
//! assigns sequence numbers, chains the hashes, adds any checkpoints that fall
//! due, and commits the lot with ONE RocksDB write (fsynced when `sync` is on).
//! While one batch is being fsynced the next one queues, so the cost of an
//! fsync is shared by every request that arrived meanwhile. A failed write
//! poisons the log; nothing after it is written until the log is reopened.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use super::checkpoint::encode_checkpoint;
use super::record::{AuditEvent, AuditRecord, Checkpoint, GENESIS_HASH, WitnessedHead};
use crate::db::Db;
use crate::schema::{self, CF_AUDIT, CF_AUDIT_CHECKPOINTS};
use kms_catalogue::{CallbackError, DbError, StorageError};

/// Computes the MAC of a checkpoint message (the service does HMAC-SHA256 in the HSM).
pub type MacFn = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, CallbackError> + Send + Sync>;

/// Cross-node witnessing of a cluster node's audit log (design note
/// §2.3.6): at every checkpoint the writer first writes a witness record of
/// the other nodes' latest heads (when it has read one newer than it last
/// witnessed), so that the checkpoint certifies it, and afterwards hands the
/// checkpoint to `on_checkpoint` for publishing. A single node has none: its
/// log is exactly what it was without this.
pub struct Witnessing {
    /// The other nodes' latest heads as this node last read them; whoever
    /// reads them from the cluster keeps it current.
    pub peers: Arc<WitnessBoard>,
    /// Called on the writer thread after each checkpoint is durable. It must
    /// return at once (hand the checkpoint to another thread): publishing
    /// never blocks or fails the audit writer.
    pub on_checkpoint: Box<dyn Fn(&Checkpoint) + Send + Sync>,
}

impl std::fmt::Debug for Witnessing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witnessing")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// The other nodes' latest audit heads, shared between whoever reads them
/// from the cluster and the audit writer, which witnesses them.
#[derive(Debug, Default)]
pub struct WitnessBoard {
    heads: Mutex<Vec<WitnessedHead>>,
}

impl WitnessBoard {
    /// Replaces the heads (one per other node; this node's own is left out by the caller).
    pub fn replace(&self, mut heads: Vec<WitnessedHead>) {
        // One order, whatever order the cluster returned them in.
        heads.sort_by(|a, b| a.node.cmp(&b.node));
        *self
            .heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = heads;
    }

    /// The heads held now.
    pub fn snapshot(&self) -> Vec<WitnessedHead> {
        self.heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Called on the writer thread with the records of each batch once they are
/// durable, in sequence order, before any of their submitters is released
/// (so that whoever is told a request succeeded can also see what the
/// callback did with it). It must be quick: the writer waits for it. Never
/// called for records that were not written.
pub type DurableFn = Box<dyn Fn(&[AuditRecord]) + Send + Sync>;

/// Configuration of the audit writer.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// fsync every batch (default true). Off only for benchmarks: an unsynced
    /// record can be lost by a power failure after it was acknowledged.
    pub sync: bool,
    /// Write a checkpoint after this many records (0 = never by count).
    pub checkpoint_every_records: u64,
    /// Write a checkpoint when this much time has passed with records not yet
    /// covered by one (None = never by time).
    pub checkpoint_interval: Option<Duration>,
    /// Most records per write batch.
    pub max_batch: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sync: true,
            checkpoint_every_records: 1000,
            checkpoint_interval: Some(Duration::from_secs(60)),
            max_batch: 1024,
        }
    }
}

/// A record's sequence number once durable, or why it is not.
pub(super) type Outcome = Result<u64, StorageError>;

/// How a request's submitter learns its outcome.
pub(super) enum Completion {
    Wait(Sender<Outcome>),
    Callback(Box<dyn FnOnce(Outcome) + Send>),
}

impl Completion {
    pub(super) fn complete(self, outcome: Outcome) {
        match self {
            // The caller may have stopped waiting; nothing to do then.
            Completion::Wait(tx) => drop(tx.send(outcome)),
            Completion::Callback(f) => {
                if catch_unwind(AssertUnwindSafe(|| f(outcome))).is_err() {
                    tracing::error!("audit append callback panicked");
                }
            }
        }
    }
}

/// What a submitter hands to the writer thread.
pub(super) struct Request {
    /// One event, or the events of a batch call: a group is sealed with
    /// consecutive sequence numbers and written whole or not at all.
    pub(super) events: Vec<AuditEvent>,
    pub(super) done: Completion,
}

/// State shared by the handle and the writer thread.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) poisoned: AtomicBool,
    /// Committed write batches, the writes (records, checkpoints) in them,
    /// and the time spent committing them: for metrics.
    pub(super) batches: AtomicU64,
    pub(super) batch_writes: AtomicU64,
    pub(super) commit_micros: AtomicU64,
    /// Sequence and hash of the last durable record (0 and zeros when empty).
    pub(super) head: Mutex<(u64, [u8; 32])>,
    /// The sequence number of the last durable record, published after each
    /// committed batch, for followers of the log (`AuditLog::subscribe`):
    /// they wait on it instead of polling. Closed when the writer stops.
    pub(super) committed: tokio::sync::watch::Sender<u64>,
    /// Test hook: make the next batch write fail inside RocksDB.
    #[cfg(test)]
    pub(super) fail_next_write: AtomicBool,
}

fn now_micros() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub(super) fn corrupt(cf: &'static str, key: &[u8], reason: &'static str) -> StorageError {
    StorageError::Corrupt {
        cf,
        key_hex: hex::encode(key),
        reason,
    }
}

/// The last record's (sequence, hash, time); (0, zeros, 0) for an empty log.
pub(super) fn read_head(db: &Db) -> Result<(u64, [u8; 32], u64), StorageError> {
    let mut it = db.db.iterator_cf(db.cf(CF_AUDIT)?, IteratorMode::End);
    match it.next() {
        None => Ok((0, GENESIS_HASH, 0)),
        Some(item) => {
            let (k, v) = item.map_err(StorageError::db("read audit head"))?;
            let seq = schema::decode_seq_key(&k).ok_or_else(|| corrupt(CF_AUDIT, &k, "bad key"))?;
            let rec = AuditRecord::decode(&v).map_err(|reason| corrupt(CF_AUDIT, &k, reason))?;
            if rec.seq != seq {
                return Err(corrupt(CF_AUDIT, &k, "sequence does not match key"));
            }
            Ok((seq, rec.hash, rec.time_micros))
        }
    }
}

/// The writer thread's state: the chain head it extends and the
/// checkpoint bookkeeping.
pub(super) struct Writer {
    pub(super) db: Arc<Db>,
    pub(super) config: AuditConfig,
    pub(super) max_batch: usize,
    pub(super) mac: MacFn,
    pub(super) shared: Arc<Shared>,
    pub(super) last_seq: u64,
    pub(super) head: [u8; 32],
    pub(super) last_time: u64,
    pub(super) since_checkpoint: u64,
    pub(super) last_checkpoint_at: Instant,
    /// Cluster witnessing (`None` on a single node).
    pub(super) witness: Option<Witnessing>,
    /// Per other node, the head sequence this log last witnessed since the
    /// writer started (a restart witnesses the current heads again).
    pub(super) last_witnessed: std::collections::BTreeMap<String, u64>,
    /// Sees every durable record (`Storage::open_audit_log_observed`).
    pub(super) on_durable: Option<DurableFn>,
}

/// A checkpoint ready to go into a batch, with the witness record that
/// precedes it (cluster nodes only).
pub(super) struct SealedCheckpoint {
    pub(super) witness: Option<(Vec<WitnessedHead>, Staged)>,
    pub(super) checkpoint: Checkpoint,
}

/// Why a batch was not written (turned into the callers' error).
pub(super) enum Failure {
    Mac(u64, Arc<dyn std::error::Error + Send + Sync + 'static>),
    Write(DbError),
    MissingCf(&'static str),
    MacTooLong(usize),
}

impl Failure {
    pub(super) fn to_error(&self) -> StorageError {
        match self {
            Failure::Mac(seq, e) => StorageError::CheckpointMac {
                seq: *seq,
                source: Arc::clone(e),
            },
            Failure::Write(e) => StorageError::AuditWrite { source: e.clone() },
            Failure::MissingCf(name) => StorageError::MissingColumnFamily { name },
            Failure::MacTooLong(len) => StorageError::AuditFieldTooLong {
                field: "checkpoint mac",
                len: *len,
                max: super::record::MAX_FIELD_LEN,
            },
        }
    }
}

impl Writer {
    pub(super) fn run(mut self, rx: Receiver<Request>) {
        let mut batch: Vec<Request> = Vec::with_capacity(self.max_batch);
        loop {
            let first = match self.checkpoint_deadline() {
                None => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(r) => Some(r),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let Some(first) = first else {
                self.standalone_checkpoint("timed");
                continue;
            };
            // At most `max_batch` records per write (a group may overshoot
            // alone: it is never split).
            let mut records = first.events.len();
            batch.push(first);
            while records < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => {
                        records += r.events.len();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
        self.standalone_checkpoint("final");
    }

    pub(super) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, Failure> {
        self.db.cf(name).map_err(|_| Failure::MissingCf(name))
    }

    pub(super) fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    pub(super) fn write(&self, batch: WriteBatch) -> Result<(), Failure> {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.config.sync);
        #[cfg(test)]
        if self.shared.fail_next_write.swap(false, Ordering::AcqRel) {
            // A genuine RocksDB write error: sync without a WAL is refused.
            wo.set_sync(true);
            wo.disable_wal(true);
        }
        let writes = batch.len() as u64;
        let started = Instant::now();
        self.db
            .db
            .write_opt(batch, &wo)
            .map_err(|e| Failure::Write(DbError::new(e)))?;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        self.shared
            .batch_writes
            .fetch_add(writes, Ordering::Relaxed);
        self.shared
            .commit_micros
            .fetch_add(micros, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn next_time(&self) -> u64 {
        now_micros().max(self.last_time)
    }

    fn commit(&mut self, reqs: &mut Vec<Request>) {
        if self.poisoned() {
            for r in reqs.drain(..) {
                r.done.complete(Err(StorageError::AuditPoisoned));
            }
            return;
        }
        let mut wb = WriteBatch::default();
        let mut sealed: Vec<(Completion, Result<u64, StorageError>)> =
            Vec::with_capacity(reqs.len());
        // The records for `on_durable`, kept only if someone looks.
        let mut observed: Option<Vec<AuditRecord>> = self.on_durable.as_ref().map(|_| Vec::new());
        let time = self.next_time();
        let mut seq = self.last_seq;
        let mut head = self.head;
        let mut since = self.since_checkpoint;
        let mut failure: Option<Failure> = None;
        let mut checkpointed = false;
        let cfs = self
            .cf(CF_AUDIT)
            .and_then(|a| Ok((a, self.cf(CF_AUDIT_CHECKPOINTS)?)));
        let (cf_audit, cf_cp) = match cfs {
            Ok(c) => c,
            Err(f) => {
                for r in reqs.drain(..) {
                    r.done.complete(Err(f.to_error()));
                }
                return;
            }
        };
        let every = self.config.checkpoint_every_records;
        // The last checkpoint of this batch and the heads witnessed in it.
        let mut made: Option<Checkpoint> = None;
        let mut witnessed: Vec<WitnessedHead> = Vec::new();
        let mut put_checkpoint = |wb: &mut WriteBatch,
                                  sc: SealedCheckpoint,
                                  seq: &mut u64,
                                  head: &mut [u8; 32]|
         -> Result<(), Failure> {
            if let Some((heads, (wseq, whash, bytes))) = sc.witness {
                wb.put_cf(cf_audit, schema::seq_key(wseq), bytes);
                *seq = wseq;
                *head = whash;
                witnessed.extend(heads);
            }
            wb.put_cf(
                cf_cp,
                schema::seq_key(sc.checkpoint.seq),
                encode_checkpoint(&sc.checkpoint)?,
            );
            made = Some(sc.checkpoint);
            Ok(())
        };
        for req in reqs.drain(..) {
            if failure.is_some() {
                sealed.push((req.done, Ok(0)));
                continue;
            }
            // Seal the whole request first: a group that cannot be sealed
            // entirely is refused without taking a sequence number.
            let staged = match seal_group(req.events, seq, time, head, observed.as_mut()) {
                Ok(staged) => staged,
                Err(e) => {
                    sealed.push((req.done, Err(e)));
                    continue;
                }
            };
            let mut due = false;
            for (record_seq, hash, bytes) in staged {
                wb.put_cf(cf_audit, schema::seq_key(record_seq), bytes);
                seq = record_seq;
                head = hash;
                since += 1;
                if every > 0 && since >= every && failure.is_none() {
                    if self.witness.is_some() {
                        // A witness record goes between groups, never
                        // inside one (a group's sequence numbers are
                        // consecutive): checkpoint when the group ends.
                        due = true;
                        continue;
                    }
                    match self
                        .seal_checkpoint(seq, time, &head)
                        .and_then(|sc| put_checkpoint(&mut wb, sc, &mut seq, &mut head))
                    {
                        Ok(()) => {
                            since = 0;
                            checkpointed = true;
                        }
                        Err(f) => failure = Some(f),
                    }
                }
            }
            let last = seq;
            if due && failure.is_none() {
                match self
                    .seal_checkpoint(seq, time, &head)
                    .and_then(|sc| put_checkpoint(&mut wb, sc, &mut seq, &mut head))
                {
                    Ok(()) => {
                        since = 0;
                        checkpointed = true;
                    }
                    Err(f) => failure = Some(f),
                }
            }
            sealed.push((req.done, Ok(last)));
        }
        if failure.is_none()
            && since > 0
            && self
                .config
                .checkpoint_interval
                .is_some_and(|i| self.last_checkpoint_at.elapsed() >= i)
        {
            match self
                .seal_checkpoint(seq, time, &head)
                .and_then(|sc| put_checkpoint(&mut wb, sc, &mut seq, &mut head))
            {
                Ok(()) => {
                    since = 0;
                    checkpointed = true;
                }
                // A timed checkpoint is best effort: write the records without it.
                Err(f) => tracing::warn!(error = %f.to_error(), "timed audit checkpoint skipped"),
            }
        }
        if failure.is_none()
            && !wb.is_empty()
            && let Err(f) = self.write(wb)
        {
            if let Failure::Write(e) = &f {
                tracing::error!(error = %e, "audit write failed; poisoning the audit log");
            }
            self.shared.poisoned.store(true, Ordering::Release);
            failure = Some(f);
        }
        if let Some(f) = &failure {
            for (done, r) in sealed {
                done.complete(match r {
                    Ok(_) => Err(f.to_error()),
                    Err(e) => Err(e),
                });
            }
            return;
        }
        self.last_seq = seq;
        self.head = head;
        self.last_time = time;
        self.since_checkpoint = since;
        if checkpointed {
            self.last_checkpoint_at = Instant::now();
        }
        *self
            .shared
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (seq, head);
        // After the write: a follower woken by this reads every record up to
        // `seq`. (send_replace: publishing never fails for want of followers.)
        self.shared.committed.send_replace(seq);
        // Before the callers are released (a quick hand-off), so that a
        // caller who saw its record durable sees its checkpoint handed over.
        self.checkpoint_done(witnessed, made.as_ref());
        if let (Some(f), Some(records)) = (&self.on_durable, &observed)
            && !records.is_empty()
            && catch_unwind(AssertUnwindSafe(|| f(records))).is_err()
        {
            tracing::error!("audit durable-records callback panicked");
        }
        for (done, r) in sealed {
            done.complete(r);
        }
    }
}

/// A sealed record waiting for its write: sequence, chain hash, stored bytes.
pub(super) type Staged = (u64, [u8; 32], Vec<u8>);

/// Seals `events` as the records after `seq`/`head`; appends the records
/// to `keep` if given (only when the whole group sealed).
fn seal_group(
    events: Vec<AuditEvent>,
    mut seq: u64,
    time: u64,
    mut head: [u8; 32],
    keep: Option<&mut Vec<AuditRecord>>,
) -> Result<Vec<Staged>, StorageError> {
    let mut staged = Vec::with_capacity(events.len());
    let mut records = Vec::new();
    for event in events {
        seq += 1;
        let (record, bytes) = AuditRecord::seal(seq, time, event, head)?;
        head = record.hash;
        staged.push((seq, head, bytes));
        if keep.is_some() {
            records.push(record);
        }
    }
    if let Some(keep) = keep {
        keep.append(&mut records);
    }
    Ok(staged)
}
