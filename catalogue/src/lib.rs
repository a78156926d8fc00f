//! kms-catalogue: the key catalogue of kms, over any storage engine.
//!
//! Holds the catalogue's records (keys, versions, aliases, wrapped service
//! keys), the rules of the key lifecycle, the root re-wrap compare-and-sets
//! and the GCM invocation budgets, written once over [`CatalogueEngine`]:
//! the interface both engines implement (RocksDB in `kms-storage` for a
//! single node, etcd in `kms-storage-etcd` for a cluster). This crate knows
//! neither engine (TiKV's `engine_traits` idea), so no rule of the catalogue
//! is implemented twice.
//!
//! The API is blocking; the service calls it from blocking worker threads.
//! It never stores key material, plaintext, ciphertexts or encryption
//! contexts: versions record where their KEK lives (a token object or a
//! blob wrapped under an HSM root), not the KEK.

#![warn(missing_docs)]

mod catalogue;
pub mod engine;
mod error;
mod gcm_counter;
mod keys;
mod record_cache;
pub mod schema;
mod usage;

pub use catalogue::{
    AliasEntry, Catalogue, EpochReferences, MAX_PAGE_SIZE, MAX_WRITE_ATTEMPTS, Swap, VersionCursor,
    VersionScan, with_fence,
};
pub use engine::{
    AuditHead, Batch, CatalogueEngine, ClusterView, Fence, NodeRoots, Op, PeerRoots, ScanFn, Table,
};
pub use error::{CallbackError, DbError, StorageError};
pub use keys::{
    Alias, Grant, KekHandle, KeyId, KeyOrigin, KeyPolicy, KeyRecord, KeySpec, KeyState, NewKey,
    Page, Permission, RotationPolicy, VersionRecord, VersionState, WrappedServiceKey,
};
pub use usage::{USAGE_TABLE, UsageRecord, UsageRow};
