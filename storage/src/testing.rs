//! Test-only tampering with a stopped database (feature `testing`): lets the
//! end-to-end tests prove that `kms audit verify` detects what an attacker
//! with write access to the data directory could do. Never enabled in the
//! service's own build.

use std::path::Path;

use crate::error::{DbError, StorageError};
use crate::schema::CF_AUDIT;

/// Flips one bit in the last byte of audit record `seq` in the (closed)
/// database at `dir`. Returns false if the record does not exist.
pub fn flip_bit_in_audit_record(dir: &Path, seq: u64) -> Result<bool, StorageError> {
    let db_error = |e| StorageError::Db {
        op: "testing::flip_bit_in_audit_record",
        source: DbError::new(e),
    };
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).map_err(db_error)?;
    let db = rocksdb::DB::open_cf(&opts, dir, cfs).map_err(db_error)?;
    let cf = db
        .cf_handle(CF_AUDIT)
        .ok_or(StorageError::MissingColumnFamily { name: CF_AUDIT })?;
    let key = seq.to_be_bytes();
    let Some(mut value) = db.get_cf(cf, key).map_err(db_error)? else {
        return Ok(false);
    };
    if let Some(last) = value.last_mut() {
        *last ^= 0x01;
    }
    db.put_cf(cf, key, value).map_err(db_error)?;
    db.flush().map_err(db_error)?;
    Ok(true)
}
