//! Backups of a single node's catalogue and audit log, and their restore
//! (issue 15 item 4; design note `hierarchy-and-cluster.md` §1.6).
//!
//! - `create`: a consistent copy of the RocksDB database (a checkpoint:
//!   catalogue and audit log as of one instant, taken while the server
//!   serves) plus `manifest.json` ([`Manifest`]: format version, creation
//!   time, audit head, the root epochs the catalogue references, node id,
//!   SHA-256 of every file).
//! - `restore`: with the server stopped, verifies the manifest, refuses a
//!   backup whose root epochs the HSM no longer holds, installs the copy,
//!   replays the destructions recorded after the backup (the ledger: the
//!   audit log of the data directory being replaced and/or an audit export)
//!   and leaves a marker so that the next start rotates every key (restored
//!   GCM counters are not trusted) and audits the restore before serving
//!   (`service::restore`).
//!
//! - `cluster`: a cluster's backup (an etcd snapshot of the catalogue plus
//!   every node's audit log) and the catalogue part of its restore.
//!
//! A backup holds key blobs: usable only together with the HSM's root keys,
//! but treat it as key material's container all the same. Nothing here
//! logs or prints a blob.

mod cluster;
mod create;
mod ledger;
mod manifest;
mod restore;

use std::path::PathBuf;

pub use cluster::{
    CLUSTER_MANIFEST_FILE, CLUSTER_MANIFEST_FORMAT, ClusterManifest, ClusterRestoreOptions,
    ClusterRestoreReport, CreatedClusterBackup, ETCD_SNAPSHOT, NodeEntry, NodeLedger,
    VerifiedClusterBackup, create_cluster_backup, restore_cluster, verify_cluster,
};
pub use create::{
    CreatedBackup, create_backup, node_id, referenced_epochs as referenced_root_epochs,
};
pub use ledger::{DESTRUCTION_OPERATIONS, LedgerEntry};
pub use manifest::verify;
pub use manifest::{FileEntry, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, VerifiedBackup};
pub use restore::{
    RestoreMarker, RestoreOptions, RestoreReport, restore_backup, short_id as restore_short_id,
};

/// Why a backup or a restore failed. Messages name the file, epoch or key
/// involved; none holds key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The target directory exists and is not an empty directory.
    #[error("{path} exists and is not an empty directory")]
    TargetNotEmpty { path: PathBuf },
    /// A file system operation failed.
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database (live, checkpoint or restored copy) failed.
    #[error("{what}")]
    Storage {
        what: &'static str,
        #[source]
        source: kms_storage::StorageError,
    },
    /// The manifest cannot be read or is not one this build understands.
    #[error("manifest {path} is unusable: {reason}")]
    ManifestInvalid { path: PathBuf, reason: String },
    /// A file of the backup does not match the manifest (changed, missing,
    /// added): the backup was damaged or tampered with; nothing was restored.
    #[error("backup file {file} does not match the manifest: {reason}; nothing was restored")]
    FileMismatch { file: String, reason: &'static str },
    /// A root epoch the backed-up catalogue references is not in the HSM
    /// (destroyed, or another HSM): its key versions could never be
    /// decrypted. Design note §1.6 rule 3.
    #[error(
        "the backup references root key epoch {epoch} (kms-root/{epoch}), which no longer exists in the HSM; nothing was restored"
    )]
    RootEpochMissing { epoch: u32 },
    /// The HSM could not be opened or asked for its roots.
    #[error("HSM")]
    Hsm(#[source] kms_hsm::HsmError),
    /// The data directory holds something and `--force-replace` was not given.
    #[error(
        "data directory {path} is not empty; pass --force-replace to keep it aside (its audit log is then the ledger of destructions to replay)"
    )]
    DataDirNotEmpty { path: PathBuf },
    /// A node of a cluster backup did not write its part, or wrote it where
    /// this process cannot read it.
    #[error("node {endpoint}: {reason}; nothing was kept")]
    NodeBackup { endpoint: String, reason: String },
    /// Two endpoints of a cluster backup are the same node, or a node id is
    /// not usable as a directory name.
    #[error("node {node} answered twice (or its id is not a plain name); nothing was kept")]
    DuplicateNode { node: String },
    /// A node of the cluster backup has no ledger: its audit records after
    /// the backup could hold destructions that must be replayed (§1.6 rule 1).
    #[error(
        "no ledger for node {node}: pass its data directory (--node {node}=DIR) or its audit export (--node-export {node}=FILE); nothing was restored"
    )]
    NodeLedgerMissing { node: String },
    /// An audit export given as ledger cannot be read.
    #[error("audit export {path}, line {line}: {reason}")]
    LedgerInvalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl BackupError {
    fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| BackupError::Io { what, path, source }
    }

    fn storage(what: &'static str) -> impl FnOnce(kms_storage::StorageError) -> Self {
        move |source| BackupError::Storage { what, source }
    }
}
