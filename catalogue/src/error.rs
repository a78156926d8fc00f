//! The one error type of the catalogue and of both storage engines.
//!
//! Variants carry typed fields (ids, sequence numbers, table names) so the
//! service can map them to gRPC statuses without matching on text. An
//! engine's own error (RocksDB's, etcd's) is wrapped in [`DbError`] so that
//! no engine type appears in a public signature.

use std::sync::Arc;

use crate::keys::KeyId;

/// A failed call into the storage engine (wrapped so that the engine's
/// error type stays private to the engine's crate).
#[derive(Debug, Clone)]
pub struct DbError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl DbError {
    /// Wraps an engine's error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(e))
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DbError {}

/// An error reported by a caller-supplied callback (the checkpoint MAC or its verifier).
pub type CallbackError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in kms-storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database engine failed (I/O error, corruption detected by RocksDB, ...).
    #[error("database operation {op} failed")]
    Db {
        /// The operation that failed (e.g. `"get"`, `"write"`, `"open"`).
        op: &'static str,
        /// The engine's error.
        #[source]
        source: DbError,
    },
    /// A cluster node cannot prove its catalogue view recent, or cannot
    /// reach a quorum of the shared store: it refuses rather than act on a
    /// state that may have been revoked (design note §2.3.3, I3/I8).
    #[error("catalogue unavailable: {reason}")]
    Unavailable {
        /// Why, in words fit for an operator (never a secret).
        reason: String,
    },
    /// Another catalogue write committed since this one read its state;
    /// nothing was applied. The catalogue retries such writes itself.
    #[error("catalogue write conflicted with a concurrent write")]
    WriteConflict,
    /// A background job's write carried a fencing token this node no longer
    /// holds (another node leads the job now); nothing was applied.
    #[error("background job {job} is no longer led by this node")]
    Fenced {
        /// The job's name.
        job: String,
    },
    /// The database was written by a newer version of kms (refuse rather than misread it).
    #[error(
        "database format version {found} is newer than the newest this build supports ({supported}); upgrade kms"
    )]
    FormatTooNew {
        /// The format version stored in the database.
        found: u32,
        /// The newest format this build reads ([`crate::schema::FORMAT_VERSION`]).
        supported: u32,
    },
    /// The database has a format version this build can no longer read.
    #[error(
        "database format version {found} is older than the oldest this build supports ({supported})"
    )]
    FormatTooOld {
        /// The format version stored in the database.
        found: u32,
        /// The oldest format this build reads ([`crate::schema::MIN_FORMAT_VERSION`]).
        supported: u32,
    },
    /// A column family the schema requires is missing after open.
    #[error("column family {name} is missing")]
    MissingColumnFamily {
        /// The column family's name (see [`crate::schema`]).
        name: &'static str,
    },
    /// A stored key or value could not be decoded.
    #[error("corrupt record in column family {cf} at key {key_hex}: {reason}")]
    Corrupt {
        /// The column family holding the record.
        cf: &'static str,
        /// The record's key, hex-encoded (keys hold no secrets).
        key_hex: String,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// A stored JSON record could not be decoded.
    #[error("corrupt JSON record in column family {cf} at key {key_hex}")]
    CorruptJson {
        /// The column family holding the record.
        cf: &'static str,
        /// The record's key, hex-encoded.
        key_hex: String,
        /// The JSON decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be serialized (never expected for our own types).
    #[error("could not serialize a {what} record")]
    Serialize {
        /// The kind of record (`"key"`, `"version"`).
        what: &'static str,
        /// The JSON encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// Not a well-formed key id (`key-` followed by 32 lowercase hex digits).
    #[error("invalid key id {value:?}")]
    InvalidKeyId {
        /// The rejected text.
        value: String,
    },
    /// Not a well-formed alias (`alias/` followed by 1-250 of `[A-Za-z0-9/_-]`).
    #[error("invalid alias {value:?}")]
    InvalidAlias {
        /// The rejected text.
        value: String,
    },
    /// A key with this id already exists (ids are never reused, even after deletion).
    #[error("key {id} already exists")]
    KeyExists {
        /// The key id.
        id: KeyId,
    },
    /// No key with this id exists.
    #[error("key {id} not found")]
    KeyNotFound {
        /// The key id.
        id: KeyId,
    },
    /// The key is a tombstone; it can no longer be changed or aliased.
    #[error("key {id} is deleted")]
    KeyDeleted {
        /// The key id.
        id: KeyId,
    },
    /// The alias already names a key (move it with `update_alias`).
    #[error("alias {alias} already exists")]
    AliasExists {
        /// The alias.
        alias: String,
    },
    /// No such alias.
    #[error("alias {alias} not found")]
    AliasNotFound {
        /// The alias.
        alias: String,
    },
    /// The key has no version with this number.
    #[error("version {version} of key {id} not found")]
    VersionNotFound {
        /// The key id.
        id: KeyId,
        /// The version number.
        version: u32,
    },
    /// The operation requires a pending version (commit/discard of two-phase creation).
    #[error("version {version} of key {id} is not pending")]
    VersionNotPending {
        /// The key id.
        id: KeyId,
        /// The version number.
        version: u32,
    },
    /// Pending versions may only be committed or discarded, not moved to another state.
    #[error("version {version} of key {id}: invalid state change")]
    InvalidVersionTransition {
        /// The key id.
        id: KeyId,
        /// The version number.
        version: u32,
    },
    /// A write would leave the key's primary version in a state other than
    /// `Enabled` (disabling, scheduling or destroying the primary, or naming
    /// a version that is not enabled as primary). Catalogue invariant.
    #[error("version {version} of key {id} is the primary version and must stay enabled")]
    PrimaryNotEnabled {
        /// The key id.
        id: KeyId,
        /// The primary version's number.
        version: u32,
    },
    /// The key is pending deletion: it gets no new version and its primary
    /// version does not change. Catalogue invariant.
    #[error("key {id} is pending deletion; its versions and primary cannot change")]
    KeyPendingDeletion {
        /// The key id.
        id: KeyId,
    },
    /// The key has a version being created (pending): it cannot be scheduled
    /// for deletion until that version is committed or discarded, or a key
    /// pending deletion would get a new version. Catalogue invariant.
    #[error("version {version} of key {id} is being created")]
    VersionBeingCreated {
        /// The key id.
        id: KeyId,
        /// The pending version's number.
        version: u32,
    },
    /// Only a key pending deletion (or one that never got a usable version)
    /// can become a tombstone: a cancelled deletion must not be carried out.
    /// Catalogue invariant.
    #[error("key {id} is not pending deletion")]
    NotPendingDeletion {
        /// The key id.
        id: KeyId,
    },
    /// A version record already exists at the number the catalogue was about
    /// to allocate (version numbers are never reused): the key record's
    /// `latest_version` is behind its versions, which only a damaged
    /// database can cause.
    #[error("version {version} of key {id} already exists")]
    VersionExists {
        /// The key id.
        id: KeyId,
        /// The version number.
        version: u32,
    },
    /// An update closure tried to change a field that is fixed at creation.
    #[error("field {field} cannot be changed")]
    ImmutableField {
        /// The field's name in the record.
        field: &'static str,
    },
    /// A version of one origin for a key of the other: an imported version
    /// for a key kms generates, or a generated one for a key of origin
    /// `External` (whose material only its owner can supply).
    #[error("key {id} has another origin than the version being added")]
    OriginMismatch {
        /// The key id.
        id: KeyId,
    },
    /// A key's version numbers are exhausted (u32::MAX versions).
    #[error("key {id} has no version numbers left")]
    VersionsExhausted {
        /// The key id.
        id: KeyId,
    },
    /// An audit event field exceeds what the record format can hold.
    #[error("audit field {field} is {len} bytes long; the maximum is {max}")]
    AuditFieldTooLong {
        /// The field's name.
        field: &'static str,
        /// Its length, bytes.
        len: usize,
        /// The longest the format holds, bytes ([`crate::MAX_FIELD_LEN`]).
        max: usize,
    },
    /// A previous audit write failed; the log refuses every append until it is reopened.
    #[error("the audit log is poisoned by an earlier write failure; reopen it")]
    AuditPoisoned,
    /// The audit batch holding this record could not be written; the log is now poisoned.
    #[error("audit write failed; the log is now poisoned")]
    AuditWrite {
        /// RocksDB's error.
        #[source]
        source: DbError,
    },
    /// The audit writer has shut down.
    #[error("the audit log is closed")]
    AuditClosed,
    /// Only one audit writer may be open per database (two would fork the chain).
    #[error("an audit log writer is already open on this database")]
    AuditAlreadyOpen,
    /// The checkpoint MAC callback failed; the batch was not written (nothing is poisoned).
    #[error("computing the MAC of audit checkpoint {seq} failed")]
    CheckpointMac {
        /// Sequence number of the record the checkpoint would certify.
        seq: u64,
        /// The MAC callback's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The checkpoint verifier callback itself failed (not a bad MAC: an unusable verifier).
    #[error("verifying the MAC of audit checkpoint {seq} failed")]
    CheckpointVerifier {
        /// Sequence number of the checkpoint being verified.
        seq: u64,
        /// The verifier callback's error.
        #[source]
        source: CallbackError,
    },
    /// Writing an export failed.
    #[error("writing the audit export failed")]
    Export {
        /// The writer's error.
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Wraps an engine error from operation `op` (`"get"`, `"write"`, ...).
    pub fn db<E: std::error::Error + Send + Sync + 'static>(
        op: &'static str,
    ) -> impl FnOnce(E) -> StorageError {
        move |e| StorageError::Db {
            op,
            source: DbError::new(e),
        }
    }
}
