//! The audit log writer's handle: [`AuditLog`] hands events to one writer
//! thread (see `group_commit`) and releases each caller once its record is
//! durable.
//!
//! Callers on any thread hand events to the writer over a channel; the writer
//! commits whatever has queued up with one RocksDB write (fsynced when `sync`
//! is on). Only then is each caller released with its sequence number: an
//! acknowledged record is durable.
//!
//! Fail closed: if a write fails, the log is poisoned and that batch and every
//! later append fail until the log is reopened ([`crate::Storage::open_audit_log`]).
//! A failing checkpoint MAC (HSM unavailable) fails the batch that needed the
//! checkpoint without writing anything, and does not poison the log.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::checkpoint::last_checkpoint_seq;
use super::group_commit::{
    AuditConfig, Completion, DurableFn, MacFn, Outcome, Request, Shared, Witnessing, Writer,
    read_head,
};
use super::record::AuditEvent;
use crate::db::Db;
use kms_catalogue::StorageError;

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
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditWrite`] if the batch holding it failed (the log is
    /// now poisoned); [`StorageError::CheckpointMac`] if a checkpoint due in that
    /// batch could not be MACed (nothing was written, the log is not poisoned);
    /// [`StorageError::AuditPoisoned`] if an earlier failure poisoned the log;
    /// [`StorageError::AuditClosed`] if the writer stopped first.
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

impl AuditLog {
    pub(crate) fn start(
        db: Arc<Db>,
        config: AuditConfig,
        mac: MacFn,
        witness: Option<Witnessing>,
        on_durable: Option<DurableFn>,
    ) -> Result<AuditLog, StorageError> {
        let (last_seq, head, last_time) = read_head(&db)?;
        let last_cp = last_checkpoint_seq(&db)?;
        let shared = Arc::new(Shared {
            poisoned: AtomicBool::new(false),
            batches: AtomicU64::new(0),
            batch_writes: AtomicU64::new(0),
            commit_micros: AtomicU64::new(0),
            head: Mutex::new((last_seq, head)),
            committed: tokio::sync::watch::Sender::new(last_seq),
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
            witness,
            last_witnessed: std::collections::BTreeMap::new(),
            on_durable,
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
    ///
    /// # Errors
    ///
    /// As [`AuditLog::submit`] and [`AppendHandle::wait`].
    pub fn append(&self, event: AuditEvent) -> Result<u64, StorageError> {
        self.submit(event)?.wait()
    }

    /// Queues a record and returns at once; wait on the handle for durability.
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] if an event does not fit the format;
    /// [`StorageError::AuditPoisoned`] after a write failure (reopen the log);
    /// [`StorageError::AuditClosed`] if the writer has stopped.
    pub fn submit(&self, event: AuditEvent) -> Result<AppendHandle, StorageError> {
        self.submit_group(vec![event])
    }

    /// Queues the records of one batch call as a group: they get consecutive
    /// sequence numbers, go into the same write, and are durable (or fail)
    /// together. One hand-off to the writer and one wake-up for the whole
    /// group, instead of one per record. The handle yields the last record's
    /// sequence number (the log's head when `events` is empty).
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] if an event does not fit the format;
    /// [`StorageError::AuditPoisoned`] after a write failure (reopen the log);
    /// [`StorageError::AuditClosed`] if the writer has stopped.
    /// Nothing of the group is queued on error.
    pub fn submit_group(&self, events: Vec<AuditEvent>) -> Result<AppendHandle, StorageError> {
        let (tx, rx) = mpsc::channel();
        self.send(events, Completion::Wait(tx))?;
        Ok(AppendHandle { rx })
    }

    /// Queues a record; `done` runs on the writer thread once the record is
    /// durable (or has failed). It must be quick and must not block on the log.
    /// If queueing itself fails, the error is returned and `done` is not called.
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditFieldTooLong`] if an event does not fit the format;
    /// [`StorageError::AuditPoisoned`] after a write failure (reopen the log);
    /// [`StorageError::AuditClosed`] if the writer has stopped.
    pub fn submit_with_callback(
        &self,
        event: AuditEvent,
        done: impl FnOnce(Result<u64, StorageError>) + Send + 'static,
    ) -> Result<(), StorageError> {
        self.submit_group_with_callback(vec![event], done)
    }

    /// Queues the records of one request as a group (as
    /// [`AuditLog::submit_group`]: consecutive, durable or failed together);
    /// `done` runs on the writer thread with the last record's sequence
    /// number once they are durable (or have failed). It must be quick and
    /// must not block on the log. If queueing itself fails, the error is
    /// returned and `done` is not called.
    ///
    /// # Errors
    ///
    /// As [`AuditLog::submit_with_callback`].
    pub fn submit_group_with_callback(
        &self,
        events: Vec<AuditEvent>,
        done: impl FnOnce(Result<u64, StorageError>) + Send + 'static,
    ) -> Result<(), StorageError> {
        self.send(events, Completion::Callback(Box::new(done)))
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

    /// Follows the log: the receiver holds the sequence number of the last
    /// durable record (0 when empty) and is notified after every committed
    /// batch, so a follower reads records up to that number with an
    /// [`crate::AuditReader`] and then waits for the next change, without
    /// polling. Every record up to the published number is readable when it
    /// is published. The channel closes (`changed()` fails) when the writer
    /// stops, i.e. when this log is dropped.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.committed.subscribe()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{CallbackError, ResultCode, Storage, StorageOptions, VerifyOptions};

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
        bad.principal = "p".repeat(crate::MAX_FIELD_LEN + 1);
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

    #[test]
    fn followers_are_told_each_committed_sequence_and_when_the_writer_stops() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), &StorageOptions::default()).unwrap();
        {
            let log = s.open_audit_log(AuditConfig::default(), mac()).unwrap();
            log.append(event(1)).unwrap();
        }
        let log = s.open_audit_log(AuditConfig::default(), mac()).unwrap();
        let mut rx = log.subscribe();
        // Starts at the head found on disk, with nothing new to see.
        assert_eq!(*rx.borrow_and_update(), 1);
        assert!(!rx.has_changed().unwrap());
        let seq = log
            .submit_group((2..5).map(event).collect())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(seq, 4);
        assert!(rx.has_changed().unwrap());
        let published = *rx.borrow_and_update();
        assert_eq!(published, 4);
        // Everything up to the published number is readable.
        let page = s
            .audit_reader()
            .query_range(&crate::AuditFilter::default(), None, published, 100)
            .unwrap();
        assert_eq!(
            page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(page.next_after, None);
        drop(log);
        assert!(rx.has_changed().is_err(), "closed when the writer stops");
    }
}
