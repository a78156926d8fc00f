//! kms-storage: the only crate that talks to RocksDB.
//!
//! It holds the key catalogue (keys, versions, aliases, pending versions, GCM
//! invocation counters) and the tamper-evident audit log (group-commit writer,
//! hash chain, MACed checkpoints, verification, query and export).
//!
//! The API is blocking (no async runtime); the service calls it from blocking
//! worker threads. No rocksdb type appears in a public signature. It never
//! stores key material, plaintext, ciphertexts or encryption contexts: versions
//! record where their KEK lives, and audit records hold only a context digest.

#![warn(missing_docs)]

mod audit;
mod catalogue;
mod db;
mod error;
mod gcm_counter;
mod keys;
mod record_cache;
pub mod schema;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;

pub use audit::{
    AppendHandle, AuditConfig, AuditEvent, AuditFilter, AuditLog, AuditPage, AuditReader,
    AuditRecord, AuditStats, CHECKPOINT_FORMAT_V1, Checkpoint, GENESIS_HASH, MAX_FIELD_LEN,
    MAX_SCAN_PER_PAGE, MacFn, RECORD_FORMAT_V1, ResultCode, VerifyFailure, VerifyFailureReason,
    VerifyMacFn, VerifyOptions, VerifyReport, VerifyStart,
};
pub use catalogue::{
    AliasEntry, Catalogue, EpochReferences, MAX_PAGE_SIZE, Swap, VersionCursor, VersionScan,
};
pub use error::{CallbackError, DbError, StorageError};
pub use keys::{
    Alias, Grant, KekHandle, KeyId, KeyOrigin, KeyPolicy, KeyRecord, KeySpec, KeyState, NewKey,
    Page, Permission, RotationPolicy, VersionRecord, VersionState, WrappedServiceKey,
};
pub use storage::{Storage, StorageOptions};
