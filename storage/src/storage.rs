//! The [`Storage`] facade: the one public entry point that opens a database
//! and hands out its catalogue, audit readers and the audit writer.
//!
//! It owns no state of its own beyond the shared [`Db`] handle, so the
//! modules behind it depend on `db`, never on this file.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::audit::{AuditConfig, AuditLog, AuditReader, DurableFn, MacFn, Witnessing};
use crate::db::Db;
use crate::engine::RocksEngine;
use kms_catalogue::Catalogue;
use kms_catalogue::StorageError;

/// Options for [`Storage::open`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Create the database if the directory holds none (default true).
    pub create_if_missing: bool,
    /// GCM invocations reserved per synced counter write (default 4096; see
    /// [`Catalogue::add_gcm_invocations`]). A crash can over-count a version
    /// by at most this many invocations; 0 is treated as 1.
    pub gcm_reservation_block: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            create_if_missing: true,
            gcm_reservation_block: 4096,
        }
    }
}

/// An open kms database: the key catalogue and the audit log.
///
/// Cheap to share: clone the `Arc` it lives in, or hand out
/// [`Storage::catalogue`] and [`Storage::audit_reader`].
#[derive(Debug)]
pub struct Storage {
    db: Arc<Db>,
    catalogue: Catalogue,
}

impl Storage {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    ///
    /// [`StorageError::FormatTooNew`] if the database was written by a newer
    /// format and [`StorageError::FormatTooOld`] if by a format this build no
    /// longer reads, both before touching anything in it;
    /// [`StorageError::Db`] if RocksDB cannot open the directory (missing and
    /// `create_if_missing` off, locked by another process, I/O error);
    /// [`StorageError::Corrupt`] if the stored format version is malformed.
    pub fn open(path: &Path, options: &StorageOptions) -> Result<Storage, StorageError> {
        let db = Arc::new(Db::open(path, options.create_if_missing)?);
        let engine = Arc::new(RocksEngine::new(Arc::clone(&db)));
        let catalogue = Catalogue::new(engine, options.gcm_reservation_block);
        Ok(Storage { db, catalogue })
    }

    /// The key catalogue.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// Read access to the audit log (query, export, verify); usable while a writer is open.
    pub fn audit_reader(&self) -> AuditReader {
        AuditReader::new(Arc::clone(&self.db))
    }

    /// Writes a consistent point-in-time copy of the whole database (key
    /// catalogue and audit log together, as of one instant) to `dir`, while
    /// the database stays open and keeps serving: a RocksDB checkpoint
    /// (memtables flushed first, SST files hard-linked when `dir` is on the
    /// same file system, copied otherwise). The copy is itself a database
    /// that [`Storage::open`] opens. `dir` must not exist yet; its parent
    /// must.
    ///
    /// # Errors
    ///
    /// [`StorageError::Db`] (operation `"checkpoint"`) if RocksDB cannot
    /// write the copy: `dir` exists, its parent is missing, or an I/O error.
    pub fn create_checkpoint(&self, dir: &Path) -> Result<(), StorageError> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&self.db.db)
            .map_err(StorageError::db("checkpoint"))?;
        checkpoint
            .create_checkpoint(dir)
            .map_err(StorageError::db("checkpoint"))
    }

    /// Starts the audit log's group-commit writer. Only one may be open at a
    /// time; dropping it (or reopening after a poisoning) releases the slot.
    ///
    /// # Errors
    ///
    /// [`StorageError::AuditAlreadyOpen`] if a writer is open on this
    /// database; [`StorageError::Db`] or [`StorageError::Corrupt`] if the
    /// log's head (last record and checkpoint) cannot be read;
    /// [`StorageError::AuditClosed`] if the writer thread cannot be started.
    pub fn open_audit_log(
        &self,
        config: AuditConfig,
        mac: MacFn,
    ) -> Result<AuditLog, StorageError> {
        self.open_audit_log_witnessed(config, mac, None)
    }

    /// [`Storage::open_audit_log`] for a cluster node whose log witnesses the
    /// other nodes' heads and publishes its own at every checkpoint (design
    /// note §2.3.6); `None` is exactly [`Storage::open_audit_log`].
    ///
    /// # Errors
    ///
    /// As [`Storage::open_audit_log`].
    pub fn open_audit_log_witnessed(
        &self,
        config: AuditConfig,
        mac: MacFn,
        witness: Option<Witnessing>,
    ) -> Result<AuditLog, StorageError> {
        self.open_audit_log_observed(config, mac, witness, None)
    }

    /// [`Storage::open_audit_log_witnessed`] with `on_durable`, which sees
    /// the records of every batch once they are durable, in sequence order,
    /// on the writer thread, before their submitters are released (the
    /// service counts key version uses with it). `None` is exactly
    /// [`Storage::open_audit_log_witnessed`].
    ///
    /// # Errors
    ///
    /// As [`Storage::open_audit_log`].
    pub fn open_audit_log_observed(
        &self,
        config: AuditConfig,
        mac: MacFn,
        witness: Option<Witnessing>,
        on_durable: Option<DurableFn>,
    ) -> Result<AuditLog, StorageError> {
        if self
            .db
            .audit_writer_open
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(StorageError::AuditAlreadyOpen);
        }
        let log = AuditLog::start(Arc::clone(&self.db), config, mac, witness, on_durable);
        if log.is_err() {
            self.db.audit_writer_open.store(false, Ordering::Release);
        }
        log
    }
}
