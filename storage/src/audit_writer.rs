//! The audit log's group-commit writer.
//!
//! Callers on any thread hand events to one writer thread over a channel. The
//! writer drains whatever has queued up (up to `max_batch`), assigns sequence
//! numbers, chains the hashes, adds any checkpoints that fall due, and commits
//! the lot with ONE RocksDB write (fsynced when `sync` is on). Only then is each
//! caller released with its sequence number: an acknowledged record is durable.
//! While one batch is being fsynced the next one queues, so the cost of an
//! fsync is shared by every request that arrived meanwhile.
//!
//! Fail closed: if a write fails, the log is poisoned and that batch and every
//! later append fail until the log is reopened ([`crate::Storage::open_audit_log`]).
//! A failing checkpoint MAC (HSM unavailable) fails the batch that needed the
//! checkpoint without writing anything, and does not poison the log.
//!
//! Checkpoints live in their own column family, keyed by the sequence of the
//! record whose hash they certify, and are written in the same batch as that
//! record. One is written after every `checkpoint_every_records` records
//! (counted across restarts), when `checkpoint_interval` has passed with
//! records uncertified, and on clean shutdown.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions};

use crate::audit_record::{AuditEvent, AuditRecord, Checkpoint, GENESIS_HASH};
use crate::db::Db;
use crate::error::{CallbackError, DbError, StorageError};
use crate::schema::{self, CF_AUDIT, CF_AUDIT_CHECKPOINTS};

/// Computes the MAC of a checkpoint message (the service does HMAC-SHA256 in the HSM).
pub type MacFn = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, CallbackError> + Send + Sync>;

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

type Outcome = Result<u64, StorageError>;

enum Completion {
    Wait(Sender<Outcome>),
    Callback(Box<dyn FnOnce(Outcome) + Send>),
}

impl Completion {
    fn complete(self, outcome: Outcome) {
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

struct Request {
    /// One event, or the events of a batch call: a group is sealed with
    /// consecutive sequence numbers and written whole or not at all.
    events: Vec<AuditEvent>,
    done: Completion,
}

#[derive(Debug)]
struct Shared {
    poisoned: AtomicBool,
    /// Committed write batches, the writes (records, checkpoints) in them,
    /// and the time spent committing them: for metrics.
    batches: AtomicU64,
    batch_writes: AtomicU64,
    commit_micros: AtomicU64,
    /// Sequence and hash of the last durable record (0 and zeros when empty).
    head: Mutex<(u64, [u8; 32])>,
    /// Test hook: make the next batch write fail inside RocksDB.
    #[cfg(test)]
    fail_next_write: AtomicBool,
}

/// Group-commit totals of an open audit log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Committed write batches (each one synced write when `sync` is on).
    pub batches: u64,
    /// Records and checkpoints written in them.
    pub writes: u64,
    /// Time spent in the batch writes (including fsync), microseconds.
    pub commit_micros: u64,
}

/// A pending append; [`AppendHandle::wait`] blocks until the record is durable.
#[derive(Debug)]
pub struct AppendHandle {
    rx: Receiver<Outcome>,
}

impl AppendHandle {
    /// Blocks until the record is durable and returns its sequence number.
    pub fn wait(self) -> Result<u64, StorageError> {
        self.rx.recv().unwrap_or(Err(StorageError::AuditClosed))
    }
}

/// The open audit log writer. Dropping it drains queued appends, writes a final
/// checkpoint and stops the writer thread.
pub struct AuditLog {
    tx: Option<Sender<Request>>,
    shared: Arc<Shared>,
    db: Arc<Db>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("poisoned", &self.is_poisoned())
            .field("head_seq", &self.head().0)
            .finish()
    }
}

fn now_micros() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl AuditLog {
    pub(crate) fn start(
        db: Arc<Db>,
        config: AuditConfig,
        mac: MacFn,
    ) -> Result<AuditLog, StorageError> {
        let (last_seq, head, last_time) = read_head(&db)?;
        let last_cp = last_checkpoint_seq(&db)?;
        let shared = Arc::new(Shared {
            poisoned: AtomicBool::new(false),
            batches: AtomicU64::new(0),
            batch_writes: AtomicU64::new(0),
            commit_micros: AtomicU64::new(0),
            head: Mutex::new((last_seq, head)),
            #[cfg(test)]
            fail_next_write: AtomicBool::new(false),
        });
        let writer = Writer {
            db: Arc::clone(&db),
            max_batch: config.max_batch.max(1),
            config,
            mac,
            shared: Arc::clone(&shared),
            last_seq,
            head,
            last_time,
            since_checkpoint: last_seq.saturating_sub(last_cp.unwrap_or(0)),
            last_checkpoint_at: Instant::now(),
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kms-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|_| StorageError::AuditClosed)?;
        Ok(AuditLog {
            tx: Some(tx),
            shared,
            db,
            thread: Some(thread),
        })
    }

    fn send(&self, events: Vec<AuditEvent>, done: Completion) -> Result<(), StorageError> {
        for event in &events {
            event.validate()?;
        }
        if self.is_poisoned() {
            return Err(StorageError::AuditPoisoned);
        }
        let tx = self.tx.as_ref().ok_or(StorageError::AuditClosed)?;
        tx.send(Request { events, done })
            .map_err(|_| StorageError::AuditClosed)
    }

    /// Appends a record and blocks until it is durable; returns its sequence number.
    pub fn append(&self, event: AuditEvent) -> Result<u64, StorageError> {
        self.submit(event)?.wait()
    }

    /// Queues a record and returns at once; wait on the handle for durability.
    pub fn submit(&self, event: AuditEvent) -> Result<AppendHandle, StorageError> {
        self.submit_group(vec![event])
    }

    /// Queues the records of one batch call as a group: they get consecutive
    /// sequence numbers, go into the same write, and are durable (or fail)
    /// together. One hand-off to the writer and one wake-up for the whole
    /// group, instead of one per record. The handle yields the last record's
    /// sequence number (the log's head when `events` is empty).
    pub fn submit_group(&self, events: Vec<AuditEvent>) -> Result<AppendHandle, StorageError> {
        let (tx, rx) = mpsc::channel();
        self.send(events, Completion::Wait(tx))?;
        Ok(AppendHandle { rx })
    }

    /// Queues a record; `done` runs on the writer thread once the record is
    /// durable (or has failed). It must be quick and must not block on the log.
    /// If queueing itself fails, the error is returned and `done` is not called.
    pub fn submit_with_callback(
        &self,
        event: AuditEvent,
        done: impl FnOnce(Result<u64, StorageError>) + Send + 'static,
    ) -> Result<(), StorageError> {
        self.send(vec![event], Completion::Callback(Box::new(done)))
    }

    /// Totals since the log was opened, for metrics: average batch size is
    /// `writes / batches`, average commit latency `commit_micros / batches`.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            writes: self.shared.batch_writes.load(Ordering::Relaxed),
            commit_micros: self.shared.commit_micros.load(Ordering::Relaxed),
        }
    }

    /// Whether a write failure has poisoned the log (reopen it to recover).
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Sequence number and hash of the last durable record (0 and zeros when empty).
    pub fn head(&self) -> (u64, [u8; 32]) {
        *self
            .shared
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.shared.fail_next_write.store(true, Ordering::Release);
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("audit writer thread panicked");
        }
        self.db.audit_writer_open.store(false, Ordering::Release);
    }
}

fn corrupt(cf: &'static str, key: &[u8], reason: &'static str) -> StorageError {
    StorageError::Corrupt {
        cf,
        key_hex: hex::encode(key),
        reason,
    }
}

/// The last record's (sequence, hash, time); (0, zeros, 0) for an empty log.
fn read_head(db: &Db) -> Result<(u64, [u8; 32], u64), StorageError> {
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

fn last_checkpoint_seq(db: &Db) -> Result<Option<u64>, StorageError> {
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

struct Writer {
    db: Arc<Db>,
    config: AuditConfig,
    max_batch: usize,
    mac: MacFn,
    shared: Arc<Shared>,
    last_seq: u64,
    head: [u8; 32],
    last_time: u64,
    since_checkpoint: u64,
    last_checkpoint_at: Instant,
}

enum Failure {
    Mac(u64, Arc<dyn std::error::Error + Send + Sync + 'static>),
    Write(DbError),
    MissingCf(&'static str),
    MacTooLong(usize),
}

impl Failure {
    fn to_error(&self) -> StorageError {
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
                max: crate::audit_record::MAX_FIELD_LEN,
            },
        }
    }
}

fn encode_checkpoint(cp: &Checkpoint) -> Result<Vec<u8>, Failure> {
    cp.encode().map_err(|_| Failure::MacTooLong(cp.mac.len()))
}

impl Writer {
    fn run(mut self, rx: Receiver<Request>) {
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

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, Failure> {
        self.db.cf(name).map_err(|_| Failure::MissingCf(name))
    }

    fn poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    fn checkpoint_deadline(&self) -> Option<Instant> {
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

    fn write(&self, batch: WriteBatch) -> Result<(), Failure> {
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

    fn next_time(&self) -> u64 {
        now_micros().max(self.last_time)
    }

    /// A checkpoint of the current head in a batch of its own (timer, shutdown).
    fn standalone_checkpoint(&mut self, why: &'static str) {
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
        for req in reqs.drain(..) {
            if failure.is_some() {
                sealed.push((req.done, Ok(0)));
                continue;
            }
            // Seal the whole request first: a group that cannot be sealed
            // entirely is refused without taking a sequence number.
            let staged = match seal_group(req.events, seq, time, head) {
                Ok(staged) => staged,
                Err(e) => {
                    sealed.push((req.done, Err(e)));
                    continue;
                }
            };
            for (record_seq, hash, bytes) in staged {
                wb.put_cf(cf_audit, schema::seq_key(record_seq), bytes);
                seq = record_seq;
                head = hash;
                since += 1;
                if every > 0 && since >= every && failure.is_none() {
                    match self.checkpoint_into(&mut wb, cf_cp, seq, time, &head) {
                        Ok(()) => {
                            since = 0;
                            checkpointed = true;
                        }
                        Err(f) => failure = Some(f),
                    }
                }
            }
            sealed.push((req.done, Ok(seq)));
        }
        if failure.is_none()
            && since > 0
            && self
                .config
                .checkpoint_interval
                .is_some_and(|i| self.last_checkpoint_at.elapsed() >= i)
        {
            match self.checkpoint_into(&mut wb, cf_cp, seq, time, &head) {
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
        for (done, r) in sealed {
            done.complete(r);
        }
    }

    fn checkpoint_into(
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

/// A sealed record waiting for its write: sequence, chain hash, stored bytes.
type Staged = (u64, [u8; 32], Vec<u8>);

/// Seals `events` as the records after `seq`/`head`.
fn seal_group(
    events: Vec<AuditEvent>,
    mut seq: u64,
    time: u64,
    mut head: [u8; 32],
) -> Result<Vec<Staged>, StorageError> {
    let mut staged = Vec::with_capacity(events.len());
    for event in events {
        seq += 1;
        let (record, bytes) = AuditRecord::seal(seq, time, event, head)?;
        head = record.hash;
        staged.push((seq, head, bytes));
    }
    Ok(staged)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::audit_record::ResultCode;
    use crate::audit_verify::VerifyOptions;
    use crate::db::{Storage, StorageOptions};

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            principal: "p".into(),
            peer: "127.0.0.1:1".into(),
            request_id: format!("r{i}"),
            operation: "Encrypt".into(),
            key_id: None,
            key_version: None,
            context_digest: None,
            result: ResultCode::Ok,
            latency_micros: i,
        }
    }

    fn mac() -> MacFn {
        Box::new(|m: &[u8]| Ok(m.to_vec()))
    }

    fn verify_mac(m: &[u8], mac: &[u8]) -> Result<bool, CallbackError> {
        Ok(m == mac)
    }

    #[test]
    fn write_failure_poisons_until_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), &StorageOptions::default()).unwrap();
        let cfg = AuditConfig {
            checkpoint_every_records: 2,
            ..AuditConfig::default()
        };
        {
            let log = s.open_audit_log(cfg.clone(), mac()).unwrap();
            assert_eq!(log.append(event(1)).unwrap(), 1);
            log.fail_next_write();
            // The failing batch: a real error from RocksDB, and the caller is told.
            assert!(matches!(
                log.append(event(2)),
                Err(StorageError::AuditWrite { .. })
            ));
            assert!(log.is_poisoned());
            // Fail closed: every later append fails too, although writes would work now.
            for i in 3..6 {
                assert!(matches!(
                    log.append(event(i)),
                    Err(StorageError::AuditPoisoned)
                ));
            }
            let (tx, rx) = mpsc::channel();
            assert!(matches!(
                log.submit_with_callback(event(6), move |r| tx.send(r.is_ok()).unwrap()),
                Err(StorageError::AuditPoisoned)
            ));
            assert!(rx.try_recv().is_err(), "callback not called when refused");
            assert_eq!(log.head().0, 1);
        }
        // Nothing of the failed batch reached the disk; reopening recovers.
        assert!(s.audit_reader().get(2).unwrap().is_none());
        let log = s.open_audit_log(cfg, mac()).unwrap();
        assert!(!log.is_poisoned());
        assert_eq!(log.append(event(7)).unwrap(), 2);
        assert_eq!(log.append(event(8)).unwrap(), 3);
        drop(log);
        let report = s
            .audit_reader()
            .verify(&VerifyOptions::default(), &verify_mac)
            .unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.records, 3);
        assert_eq!(s.audit_reader().get(2).unwrap().unwrap().event, event(7));
    }

    #[test]
    fn a_group_gets_consecutive_sequence_numbers_and_checkpoints_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), &StorageOptions::default()).unwrap();
        let cfg = AuditConfig {
            checkpoint_every_records: 3,
            ..AuditConfig::default()
        };
        let log = s.open_audit_log(cfg, mac()).unwrap();
        assert_eq!(log.append(event(1)).unwrap(), 1);
        let group: Vec<AuditEvent> = (2..9).map(event).collect();
        // The handle yields the last record's sequence number.
        assert_eq!(log.submit_group(group).unwrap().wait().unwrap(), 8);
        assert_eq!(log.append(event(9)).unwrap(), 9);
        // An empty group writes nothing and reports the head.
        assert_eq!(log.submit_group(Vec::new()).unwrap().wait().unwrap(), 9);
        // A group with one invalid event is refused whole, before queueing.
        let mut bad = event(10);
        bad.principal = "p".repeat(crate::audit_record::MAX_FIELD_LEN + 1);
        assert!(matches!(
            log.submit_group(vec![event(10), bad]),
            Err(StorageError::AuditFieldTooLong { .. })
        ));
        assert_eq!(log.append(event(11)).unwrap(), 10);
        drop(log);
        let reader = s.audit_reader();
        for seq in 1..=10 {
            let expected = if seq == 10 { 11 } else { seq };
            assert_eq!(reader.get(seq).unwrap().unwrap().event, event(expected));
        }
        let report = reader
            .verify(&VerifyOptions::default(), &verify_mac)
            .unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.records, 10);
        // Checkpoints at 3, 6 and 9 (two inside the group), plus the final one at 10.
        assert_eq!(report.checkpoints_verified, 4, "{report:?}");
        assert_eq!(report.last_checkpoint_seq, Some(10));
    }
}
