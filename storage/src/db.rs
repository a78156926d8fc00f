//! Opening the database: column families, format version check, and the small
//! helpers every other module uses to reach RocksDB. Nothing here is public;
//! the public face is [`crate::Storage`]. Depends on no other module of the
//! crate but `error` and `schema`.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::schema;
use kms_catalogue::StorageError;

/// The database handle shared by the catalogue, the audit writer and readers.
#[derive(Debug)]
pub(crate) struct Db {
    pub(crate) db: DB,
    /// Only one audit writer per database: two would fork the hash chain.
    pub(crate) audit_writer_open: AtomicBool,
}

impl Db {
    /// Opens (or creates) the database at `path` with every column family of
    /// the schema (and any a newer format added), then checks the format version.
    pub(crate) fn open(path: &Path, create_if_missing: bool) -> Result<Db, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(create_if_missing);
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
        let db = Db {
            db,
            audit_writer_open: AtomicBool::new(false),
        };
        check_format(&db)?;
        Ok(db)
    }

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
