//! Opening the database: column families, format version check, and the small
//! helpers every other module uses to reach RocksDB. Nothing here is public
//! except [`Storage`] and [`StorageOptions`].

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::audit_reader::AuditReader;
use crate::audit_writer::{AuditConfig, AuditLog, MacFn};
use crate::catalogue::Catalogue;
use crate::error::StorageError;
use crate::schema;

/// Options for [`Storage::open`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Create the database if the directory holds none (default true).
    pub create_if_missing: bool,
    /// GCM invocations reserved per synced counter write (see [`Catalogue::add_gcm_invocations`]).
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

/// The database handle shared by the catalogue, the audit writer and readers.
#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) db: DB,
    /// Only one audit writer per database: two would fork the hash chain.
    pub(crate) audit_writer_open: AtomicBool,
}

impl Db {
    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily { name })
    }

    pub(crate) fn get(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        self.db
            .get_cf(self.cf(cf)?, key)
            .map_err(StorageError::db("get"))
    }

    /// Every metadata change goes through here: one atomic batch, fsynced.
    pub(crate) fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(StorageError::db("write"))
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
    /// Fails with [`StorageError::FormatTooNew`] if the database was written by
    /// a newer format, before touching anything in it.
    pub fn open(path: &Path, options: &StorageOptions) -> Result<Storage, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(options.create_if_missing);
        opts.create_missing_column_families(true);
        // Column families a newer format added must still be opened, or RocksDB
        // refuses the open before we can give the clear "too new" error.
        let existing = if path.join("CURRENT").exists() {
            DB::list_cf(&opts, path).map_err(StorageError::db("list column families"))?
        } else {
            Vec::new()
        };
        let mut names: Vec<String> = schema::ALL_CFS.iter().map(|s| (*s).to_owned()).collect();
        for name in existing {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let cfs = names
            .into_iter()
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(StorageError::db("open"))?;
        let db = Arc::new(Db {
            db,
            audit_writer_open: AtomicBool::new(false),
        });
        check_format(&db)?;
        let catalogue = Catalogue::new(Arc::clone(&db), options.gcm_reservation_block);
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

    /// Starts the audit log's group-commit writer. Only one may be open at a
    /// time; dropping it (or reopening after a poisoning) releases the slot.
    pub fn open_audit_log(
        &self,
        config: AuditConfig,
        mac: MacFn,
    ) -> Result<AuditLog, StorageError> {
        if self
            .db
            .audit_writer_open
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(StorageError::AuditAlreadyOpen);
        }
        let log = AuditLog::start(Arc::clone(&self.db), config, mac);
        if log.is_err() {
            self.db.audit_writer_open.store(false, Ordering::Release);
        }
        log
    }
}

fn check_format(db: &Db) -> Result<(), StorageError> {
    let stored = db.get(schema::CF_DEFAULT, schema::META_FORMAT_VERSION)?;
    match stored {
        None => {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                db.cf(schema::CF_DEFAULT)?,
                schema::META_FORMAT_VERSION,
                schema::FORMAT_VERSION.to_be_bytes(),
            );
            db.write_synced(batch)
        }
        Some(bytes) => {
            let found = u32::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                StorageError::Corrupt {
                    cf: schema::CF_DEFAULT,
                    key_hex: hex::encode(schema::META_FORMAT_VERSION),
                    reason: "format version is not 4 bytes",
                }
            })?);
            if found > schema::FORMAT_VERSION {
                Err(StorageError::FormatTooNew {
                    found,
                    supported: schema::FORMAT_VERSION,
                })
            } else if found < schema::MIN_FORMAT_VERSION {
                Err(StorageError::FormatTooOld {
                    found,
                    supported: schema::MIN_FORMAT_VERSION,
                })
            } else {
                Ok(())
            }
        }
    }
}
