//! kms-storage: the only crate that talks to RocksDB.
//!
//! It holds the single-node engine of the key catalogue (the catalogue's
//! rules are kms-catalogue's, over this crate's RocksDB engine) and the
//! tamper-evident audit log (group-commit writer,
//! hash chain, MACed checkpoints, verification, query and export).
//!
//! The API is blocking (no async runtime); the service calls it from blocking
//! worker threads. No rocksdb type appears in a public signature. It never
//! stores key material, plaintext, ciphertexts or encryption contexts: versions
//! record where their KEK lives, and audit records hold only a context digest.

#![warn(missing_docs)]

mod audit;
mod db;
mod engine;
pub mod schema;
mod storage;
#[cfg(feature = "testing")]
pub mod testing;

pub use audit::{
    AppendHandle, AuditConfig, AuditEvent, AuditFilter, AuditLog, AuditPage, AuditReader,
    AuditRecord, AuditStats, CHECKPOINT_FORMAT_V1, Checkpoint, DurableFn, GENESIS_HASH,
    MAX_FIELD_LEN, MAX_SCAN_PER_PAGE, MAX_WITNESSED_HEADS, MacFn, RECORD_FORMAT_V1,
    RECORD_FORMAT_WITNESS, ResultCode, VerifyFailure, VerifyFailureReason, VerifyMacFn,
    VerifyOptions, VerifyReport, VerifyStart, WITNESS_OPERATION, WitnessBoard, WitnessCheck,
    WitnessOutcome, WitnessedHead, Witnessing,
};
// The catalogue (and its error type) is kms-catalogue's, over this crate's
// RocksDB engine; re-exported so that callers name one crate.
pub use kms_catalogue::{
    Alias, AliasEntry, AuditHead, Catalogue, CatalogueEngine, ClusterView, EpochReferences, Fence,
    Grant, KekHandle, KeyId, KeyOrigin, KeyPolicy, KeyRecord, KeySpec, KeyState, MAX_PAGE_SIZE,
    NewKey, NodeRoots, Page, PeerRoots, Permission, RotationPolicy, Swap, UsageRecord, UsageRow,
    VersionCursor, VersionRecord, VersionScan, VersionState, WrappedServiceKey, with_fence,
};
pub use kms_catalogue::{CallbackError, DbError, StorageError};
pub use storage::{Storage, StorageOptions};
