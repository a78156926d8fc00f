//! Test-only tampering with a stopped database (feature `testing`): lets the
//! end-to-end tests prove that `kms audit verify` detects what an attacker
//! with write access to the data directory could do. Never enabled in the
//! service's own build.

use std::path::Path;

use crate::schema::{CF_AUDIT, CF_AUDIT_CHECKPOINTS};
use kms_catalogue::{DbError, StorageError};

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

/// Erases the tail of the audit log of the (closed) database at `dir`: every
/// record after `keep` and every checkpoint after `keep`, as someone with
/// write access to the data directory could, so that the remaining chain
/// still verifies on its own. Returns the number of records erased.
pub fn truncate_audit_log(dir: &Path, keep: u64) -> Result<u64, StorageError> {
    let db_error = |e| StorageError::Db {
        op: "testing::truncate_audit_log",
        source: DbError::new(e),
    };
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).map_err(db_error)?;
    let db = rocksdb::DB::open_cf(&opts, dir, cfs).map_err(db_error)?;
    let mut erased = 0;
    for name in [CF_AUDIT, CF_AUDIT_CHECKPOINTS] {
        let cf = db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily { name })?;
        let from = keep.saturating_add(1).to_be_bytes();
        let keys: Vec<Box<[u8]>> = db
            .iterator_cf(
                cf,
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            )
            .map(|item| item.map(|(k, _)| k))
            .collect::<Result<_, _>>()
            .map_err(db_error)?;
        for k in &keys {
            db.delete_cf(cf, k).map_err(db_error)?;
        }
        if name == CF_AUDIT {
            erased = keys.len() as u64;
        }
    }
    db.flush().map_err(db_error)?;
    Ok(erased)
}

/// Rewrites the KEK handle of version `version` of `key_id` in the (closed)
/// database at `dir` with `tamper` (e.g. flip a bit of a wrapped blob or
/// MAC), as someone with write access to the data directory could. Returns
/// false if the version does not exist.
pub fn tamper_with_version_kek(
    dir: &Path,
    key_id: &crate::KeyId,
    version: u32,
    tamper: impl FnOnce(&mut crate::KekHandle),
) -> Result<bool, StorageError> {
    use crate::schema::{CF_VERSIONS, decode_record, encode_record, version_key};
    let db_error = |e| StorageError::Db {
        op: "testing::tamper_with_version_kek",
        source: DbError::new(e),
    };
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).map_err(db_error)?;
    let db = rocksdb::DB::open_cf(&opts, dir, cfs).map_err(db_error)?;
    let cf = db
        .cf_handle(CF_VERSIONS)
        .ok_or(StorageError::MissingColumnFamily { name: CF_VERSIONS })?;
    let key = version_key(key_id.as_str(), version);
    let Some(value) = db.get_cf(cf, &key).map_err(db_error)? else {
        return Ok(false);
    };
    let mut record: crate::VersionRecord = decode_record(CF_VERSIONS, &key, &value)?;
    tamper(&mut record.kek);
    db.put_cf(cf, &key, encode_record("version", &record)?)
        .map_err(db_error)?;
    db.flush().map_err(db_error)?;
    Ok(true)
}

/// Rewrites the wrapped service-key meta record `name` (e.g.
/// `schema::META_INTEGRITY_KEY`, `schema::META_CHECKPOINT_KEY`) in the
/// (closed) database at `dir` with `tamper`: `Some` replaces the record,
/// `None` deletes it. Returns false if the record does not exist.
pub fn tamper_with_service_key(
    dir: &Path,
    name: &[u8],
    tamper: impl FnOnce(crate::WrappedServiceKey) -> Option<crate::WrappedServiceKey>,
) -> Result<bool, StorageError> {
    use crate::schema::{CF_DEFAULT, decode_record, encode_record};
    let db_error = |e| StorageError::Db {
        op: "testing::tamper_with_service_key",
        source: DbError::new(e),
    };
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).map_err(db_error)?;
    let db = rocksdb::DB::open_cf(&opts, dir, cfs).map_err(db_error)?;
    let cf = db
        .cf_handle(CF_DEFAULT)
        .ok_or(StorageError::MissingColumnFamily { name: CF_DEFAULT })?;
    let Some(value) = db.get_cf(cf, name).map_err(db_error)? else {
        return Ok(false);
    };
    let record: crate::WrappedServiceKey = decode_record(CF_DEFAULT, name, &value)?;
    match tamper(record) {
        Some(record) => db
            .put_cf(cf, name, encode_record("service key", &record)?)
            .map_err(db_error)?,
        None => db.delete_cf(cf, name).map_err(db_error)?,
    }
    db.flush().map_err(db_error)?;
    Ok(true)
}

/// The wrapped service-key meta record `name` of the (closed) database at
/// `dir`, if present.
pub fn read_service_key(
    dir: &Path,
    name: &[u8],
) -> Result<Option<crate::WrappedServiceKey>, StorageError> {
    let mut found = None;
    tamper_with_service_key(dir, name, |record| {
        found = Some(record.clone());
        Some(record)
    })?;
    Ok(found)
}
