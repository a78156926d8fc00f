//! The domain error of the service. Each variant knows its result code (a
//! gRPC code, also what the audit log records); `From<KmsError> for
//! tonic::Status` (in `grpc`) is the one step that turns it into a status.
//!
//! Display is what callers see: it never carries plaintext, key material,
//! PINs, or detail about why a ciphertext failed, and for server-side
//! failures (INTERNAL, UNAVAILABLE) it is a generic sentence. The detail
//! stays in the `#[source]` chain and is logged once, at the request
//! boundary, inside the request's span (see `grpc::Rpc`), or by the
//! background task that met it. Conversions here never log.

use kms_hsm::HsmError;
use kms_storage::{KeyId, ResultCode, StorageError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// A request field is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// Any ciphertext failure: tampered, truncated, foreign, wrong context,
    /// wrong key. Deliberately says nothing more.
    #[error("invalid ciphertext")]
    InvalidCiphertext,

    /// No key with this id or alias, as the caller named it.
    #[error("key {key} not found")]
    KeyNotFound { key: String },

    /// The key has no such version.
    #[error("version {version} of key {key_id} not found")]
    VersionNotFound { key_id: KeyId, version: u32 },

    /// No such alias.
    #[error("alias {alias} not found")]
    AliasNotFound { alias: String },

    /// A key with this id exists already (ids are never reused).
    #[error("key {key_id} already exists")]
    KeyExists { key_id: KeyId },

    /// The alias points to a key already.
    #[error("alias {alias} already exists")]
    AliasExists { alias: String },

    /// The key exists but is disabled.
    #[error("key {key_id} is disabled")]
    KeyDisabled { key_id: KeyId },

    /// The key is scheduled for deletion and cannot be used.
    #[error("key {key_id} is pending deletion")]
    KeyPendingDeletion { key_id: KeyId },

    /// The key was deleted; only its tombstone remains.
    #[error("key {key_id} is deleted")]
    KeyDeleted { key_id: KeyId },

    /// The key is in a state this build does not know.
    #[error("key {key_id} is in an unknown state")]
    KeyStateUnknown { key_id: KeyId },

    /// CancelKeyDeletion of a key that is not pending deletion.
    #[error("key {key_id} is not pending deletion")]
    NotPendingDeletion { key_id: KeyId },

    /// The key has no primary version (its first is still being created).
    #[error("key {key_id} has no primary version")]
    NoPrimaryVersion { key_id: KeyId },

    /// The key version named by the ciphertext (or request) is not usable.
    #[error("version {version} of key {key_id} is {state}")]
    VersionUnusable {
        key_id: KeyId,
        version: u32,
        state: &'static str,
    },

    /// A blob (or request) names a key version whose KEK was destroyed
    /// (at the end of its destruction window, or a discarded creation):
    /// distinct from "invalid ciphertext", so that the owner of the blob
    /// learns why it will never decrypt again (issue 18 item 2).
    #[error("key version {version} of key {key_id} was destroyed at {}", rfc3339_ms(*destroyed_at_ms))]
    VersionDestroyed {
        key_id: KeyId,
        version: u32,
        /// When the version was destroyed, unix milliseconds.
        destroyed_at_ms: u64,
    },

    /// ScheduleKeyVersionDestruction of a version that decrypted within
    /// the configured quiet period
    /// (`lifecycle.version_destruction_quiet_period_days`), without
    /// `override_recent_use` (issue 18 item 2, the guard).
    #[error(
        "version {version} of key {key_id} was last used to decrypt at {}, within the quiet period of {quiet_period_days} days; move what still uses it (ReEncrypt) or set override_recent_use (CLI: --override-recent-use; audited) to schedule its destruction anyway",
        rfc3339_ms(*last_decrypt_ms)
    )]
    VersionRecentlyUsed {
        key_id: KeyId,
        version: u32,
        /// The version's last decrypt-side use, unix milliseconds.
        last_decrypt_ms: u64,
        /// The configured quiet period, days.
        quiet_period_days: u32,
    },

    /// DisableKeyVersion of the primary version.
    #[error(
        "version {version} is the primary version of key {key_id}; rotate or set another primary first"
    )]
    PrimaryVersionDisable { key_id: KeyId, version: u32 },

    /// A version state change the catalogue does not allow.
    #[error("version {version} of key {key_id} cannot make that state change")]
    VersionTransition { key_id: KeyId, version: u32 },

    /// A key's version numbers are exhausted.
    #[error("key {key_id} has no version numbers left")]
    VersionsExhausted { key_id: KeyId },

    /// The key has a version being created (a rotation in progress, or one
    /// a crash interrupted): it cannot be scheduled for deletion until that
    /// version is committed or discarded. Retry.
    #[error("version {version} of key {key_id} is being created; retry")]
    VersionBeingCreated { key_id: KeyId, version: u32 },

    /// Encrypt-side use of a key version that has reached the configured
    /// hard limit of AES-GCM invocations (`rotation.gcm_invocation_hard_limit`,
    /// below the 2^32 that NIST SP 800-38D §8.3 allows with random 96-bit
    /// IVs). Decryption with the version still works; encryption needs a
    /// new primary version (rotation, automatic at the soft limit).
    #[error(
        "version {version} of key {key_id} has reached its limit of {limit} AES-GCM encryptions (NIST SP 800-38D); rotate the key"
    )]
    GcmInvocationLimit {
        key_id: KeyId,
        version: u32,
        /// The configured hard limit, invocations.
        limit: u64,
    },

    /// A scheduled rotation found, under the key's lock, that someone else
    /// rotated first (the scheduler treats this as nothing to do).
    #[error("rotation no longer due")]
    RotationNotDue,

    /// The HSM is unreachable; the service fails closed.
    #[error("the HSM is unavailable")]
    HsmUnavailable {
        #[source]
        source: Option<HsmError>,
    },

    /// This cluster node cannot prove its view of the key catalogue recent
    /// (no linearizable read of etcd within Δ, no quorum): it fails closed
    /// (design note §2.3.3, I3/I8). The message says so and nothing more;
    /// the cause is logged.
    #[error("the key catalogue is unavailable on this node")]
    CatalogueUnavailable {
        #[source]
        source: Option<StorageError>,
    },

    /// A catalogue change kept losing races with other nodes' changes
    /// (after `kms_catalogue::MAX_WRITE_ATTEMPTS`), or a background job's
    /// write found another node leading the job: nothing was changed;
    /// the caller may retry.
    #[error("the key catalogue changed concurrently; nothing was changed, retry")]
    CatalogueConflict,

    /// The audit log cannot record the request, so it was not carried out
    /// (or its result was withheld).
    #[error("the audit log is unavailable")]
    AuditUnavailable {
        #[source]
        source: Option<StorageError>,
    },

    /// The principal may not do this. Names the principal and what was
    /// refused (both known to the caller), never why a grant did not match.
    #[error("{principal} is not allowed to {action}")]
    PermissionDenied { principal: String, action: String },

    /// An operator's configuration reload was refused; the running
    /// configuration is unchanged. The reason names the field and file (the
    /// caller is an administrator). Not a `#[source]`: the Display already
    /// says it, and a chain would say it twice.
    #[error("configuration not reloaded: {0}")]
    ReloadRefused(std::sync::Arc<crate::server::reload::ReloadError>),

    /// A root-key administration request on a server that holds no root
    /// key (wrapped key versions are off: every version is a token object).
    #[error("the server holds no root key: wrapped key versions are off")]
    NoRootKey,

    /// DestroyRoot of the active root: new versions are wrapped under it.
    #[error(
        "root epoch {epoch} is the active root (new key versions are wrapped under it); rotate the root first (kms hsm rotate-root, then kms admin reload)"
    )]
    RootActive { epoch: u32 },

    /// DestroyRoot of a root that catalogue records still reference: they
    /// would become undecryptable. The root re-wrap job moves them to the
    /// active root; `kms hsm roots` shows how many remain.
    #[error(
        "root epoch {epoch} is still referenced by {versions} key version(s) and {service_keys} service key(s); wait until the re-wrap job has moved them to the active root (kms hsm roots shows 0)"
    )]
    RootInUse {
        epoch: u32,
        /// Key versions (not destroyed) wrapped under the epoch.
        versions: u64,
        /// Service keys (e.g. the catalogue-integrity key) wrapped under it.
        service_keys: u64,
    },

    /// Cluster: adopting a root epoch for wrapping (or destroying one) is
    /// refused because some registered nodes' HSMs do not hold it (issue
    /// 15; design note §1.5, per-node HSMs): versions wrapped under it would
    /// not decrypt on those nodes.
    #[error(
        "root epoch {epoch} (kms-root/{epoch}) is not in the HSM of cluster node(s) {nodes}; clone that root into their HSMs (the HSM vendor's key cloning, never a new key), run `kms admin reload` on them, then retry: until then the cluster keeps wrapping under its current root"
    )]
    RootNotOnEveryNode {
        epoch: u32,
        /// The node ids lacking it, comma-separated.
        nodes: String,
    },

    /// Cluster: DestroyRoot of an epoch some nodes still wrap new versions
    /// under (or that have not said what they wrap under).
    #[error(
        "root epoch {epoch} is still the wrapping root of cluster node(s) {nodes}; run `kms admin reload` on them so that they adopt the cluster's active root, then retry"
    )]
    RootStillWrapping {
        epoch: u32,
        /// The node ids, comma-separated.
        nodes: String,
    },

    /// Cluster: the catalogue's active root epoch is not in this node's HSM.
    #[error(
        "the cluster's active root epoch {epoch} (kms-root/{epoch}) is not in this node's HSM; clone that root into it (the HSM vendor's key cloning) and run `kms admin reload`"
    )]
    RootMissingOnThisNode { epoch: u32 },

    /// No root of this epoch on the token.
    #[error("no root key of epoch {epoch} on the token")]
    RootNotFound { epoch: u32 },

    /// The service is saturated.
    #[error("{what}")]
    ResourceExhausted { what: &'static str },

    /// CreateBackup on a server whose configuration has no `[backup] dir`.
    #[error(
        "backups are off: the server's configuration has no [backup] dir; on a single node, stop the server and use kms backup create --data-dir"
    )]
    BackupNotConfigured,

    /// Writing a backup failed (I/O, checkpoint); the cause is logged.
    #[error("internal error")]
    Backup {
        #[source]
        source: crate::backup::BackupError,
    },

    /// Bring your own key refused (issue 14 item 6): the refusal says what
    /// and what to do; see `service::import::ImportRefusal`.
    #[error(transparent)]
    Import(#[from] crate::service::ImportRefusal),

    /// An HSM operation failed for a reason other than unavailability.
    #[error("internal error")]
    Hsm {
        #[source]
        source: HsmError,
    },

    /// A key version's wrapped catalogue record failed its checks: its MAC
    /// does not verify (a blob moved to another key or version, or any field
    /// altered), its mechanism is unknown, or the HSM rejects its blob
    /// (tampered, truncated, another root). INTERNAL and audited like every
    /// failure; never reported as a lost device (issue 14 item 3). The
    /// cause names the key and version (logged once, at the boundary).
    #[error("catalogue record corrupt")]
    CatalogueRecordCorrupt {
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A storage operation failed unexpectedly.
    #[error("internal error")]
    Storage {
        #[source]
        source: StorageError,
    },

    /// Anything else; `what` says what broke (server-side only).
    #[error("internal error")]
    Internal { what: &'static str },
}

impl KmsError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        KmsError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The gRPC code of this error, as recorded in the audit log.
    pub fn code(&self) -> ResultCode {
        match self {
            KmsError::InvalidArgument { .. } | KmsError::InvalidCiphertext => {
                ResultCode::InvalidArgument
            }
            KmsError::KeyNotFound { .. }
            | KmsError::VersionNotFound { .. }
            | KmsError::AliasNotFound { .. } => ResultCode::NotFound,
            KmsError::KeyExists { .. } | KmsError::AliasExists { .. } => ResultCode::AlreadyExists,
            KmsError::KeyDisabled { .. }
            | KmsError::KeyPendingDeletion { .. }
            | KmsError::KeyDeleted { .. }
            | KmsError::KeyStateUnknown { .. }
            | KmsError::NotPendingDeletion { .. }
            | KmsError::NoPrimaryVersion { .. }
            | KmsError::VersionUnusable { .. }
            | KmsError::VersionDestroyed { .. }
            | KmsError::VersionRecentlyUsed { .. }
            | KmsError::PrimaryVersionDisable { .. }
            | KmsError::VersionTransition { .. }
            | KmsError::VersionsExhausted { .. }
            | KmsError::VersionBeingCreated { .. }
            | KmsError::GcmInvocationLimit { .. }
            | KmsError::RotationNotDue
            | KmsError::ReloadRefused(_)
            | KmsError::NoRootKey
            | KmsError::RootActive { .. }
            | KmsError::RootInUse { .. }
            | KmsError::RootNotOnEveryNode { .. }
            | KmsError::RootStillWrapping { .. }
            | KmsError::RootMissingOnThisNode { .. }
            | KmsError::BackupNotConfigured => ResultCode::FailedPrecondition,
            KmsError::RootNotFound { .. } => ResultCode::NotFound,
            KmsError::HsmUnavailable { .. }
            | KmsError::AuditUnavailable { .. }
            | KmsError::CatalogueUnavailable { .. } => ResultCode::Unavailable,
            KmsError::CatalogueConflict => ResultCode::Aborted,
            KmsError::ResourceExhausted { .. } => ResultCode::ResourceExhausted,
            KmsError::Import(refusal) => refusal.code(),
            KmsError::PermissionDenied { .. } => ResultCode::PermissionDenied,
            KmsError::Hsm { .. }
            | KmsError::CatalogueRecordCorrupt { .. }
            | KmsError::Storage { .. }
            | KmsError::Backup { .. }
            | KmsError::Internal { .. } => ResultCode::Internal,
        }
    }

    /// Whether this is the server's failure (INTERNAL, UNAVAILABLE) rather
    /// than the caller's: such errors are logged with their cause.
    pub fn is_server_side(&self) -> bool {
        matches!(self.code(), ResultCode::Internal | ResultCode::Unavailable)
    }

    /// The same answer for another caller or batch item: every field the
    /// caller sees, without the cause (which belongs to the first, and is
    /// logged with it). Errors holding a cause are not `Clone`.
    pub fn same_answer(&self) -> KmsError {
        match self {
            KmsError::InvalidArgument { field, reason } => KmsError::InvalidArgument {
                field,
                reason: reason.clone(),
            },
            KmsError::InvalidCiphertext => KmsError::InvalidCiphertext,
            KmsError::KeyNotFound { key } => KmsError::KeyNotFound { key: key.clone() },
            KmsError::VersionNotFound { key_id, version } => KmsError::VersionNotFound {
                key_id: key_id.clone(),
                version: *version,
            },
            KmsError::AliasNotFound { alias } => KmsError::AliasNotFound {
                alias: alias.clone(),
            },
            KmsError::KeyExists { key_id } => KmsError::KeyExists {
                key_id: key_id.clone(),
            },
            KmsError::AliasExists { alias } => KmsError::AliasExists {
                alias: alias.clone(),
            },
            KmsError::KeyDisabled { key_id } => KmsError::KeyDisabled {
                key_id: key_id.clone(),
            },
            KmsError::KeyPendingDeletion { key_id } => KmsError::KeyPendingDeletion {
                key_id: key_id.clone(),
            },
            KmsError::KeyDeleted { key_id } => KmsError::KeyDeleted {
                key_id: key_id.clone(),
            },
            KmsError::KeyStateUnknown { key_id } => KmsError::KeyStateUnknown {
                key_id: key_id.clone(),
            },
            KmsError::NotPendingDeletion { key_id } => KmsError::NotPendingDeletion {
                key_id: key_id.clone(),
            },
            KmsError::NoPrimaryVersion { key_id } => KmsError::NoPrimaryVersion {
                key_id: key_id.clone(),
            },
            KmsError::VersionUnusable {
                key_id,
                version,
                state,
            } => KmsError::VersionUnusable {
                key_id: key_id.clone(),
                version: *version,
                state,
            },
            KmsError::VersionDestroyed {
                key_id,
                version,
                destroyed_at_ms,
            } => KmsError::VersionDestroyed {
                key_id: key_id.clone(),
                version: *version,
                destroyed_at_ms: *destroyed_at_ms,
            },
            KmsError::VersionRecentlyUsed {
                key_id,
                version,
                last_decrypt_ms,
                quiet_period_days,
            } => KmsError::VersionRecentlyUsed {
                key_id: key_id.clone(),
                version: *version,
                last_decrypt_ms: *last_decrypt_ms,
                quiet_period_days: *quiet_period_days,
            },
            KmsError::PrimaryVersionDisable { key_id, version } => {
                KmsError::PrimaryVersionDisable {
                    key_id: key_id.clone(),
                    version: *version,
                }
            }
            KmsError::VersionTransition { key_id, version } => KmsError::VersionTransition {
                key_id: key_id.clone(),
                version: *version,
            },
            KmsError::VersionsExhausted { key_id } => KmsError::VersionsExhausted {
                key_id: key_id.clone(),
            },
            KmsError::VersionBeingCreated { key_id, version } => KmsError::VersionBeingCreated {
                key_id: key_id.clone(),
                version: *version,
            },
            KmsError::GcmInvocationLimit {
                key_id,
                version,
                limit,
            } => KmsError::GcmInvocationLimit {
                key_id: key_id.clone(),
                version: *version,
                limit: *limit,
            },
            KmsError::RotationNotDue => KmsError::RotationNotDue,
            KmsError::NoRootKey => KmsError::NoRootKey,
            KmsError::RootActive { epoch } => KmsError::RootActive { epoch: *epoch },
            KmsError::RootInUse {
                epoch,
                versions,
                service_keys,
            } => KmsError::RootInUse {
                epoch: *epoch,
                versions: *versions,
                service_keys: *service_keys,
            },
            KmsError::RootNotFound { epoch } => KmsError::RootNotFound { epoch: *epoch },
            KmsError::RootNotOnEveryNode { epoch, nodes } => KmsError::RootNotOnEveryNode {
                epoch: *epoch,
                nodes: nodes.clone(),
            },
            KmsError::RootStillWrapping { epoch, nodes } => KmsError::RootStillWrapping {
                epoch: *epoch,
                nodes: nodes.clone(),
            },
            KmsError::RootMissingOnThisNode { epoch } => {
                KmsError::RootMissingOnThisNode { epoch: *epoch }
            }
            KmsError::ReloadRefused(reason) => {
                KmsError::ReloadRefused(std::sync::Arc::clone(reason))
            }
            KmsError::HsmUnavailable { .. } => KmsError::HsmUnavailable { source: None },
            KmsError::AuditUnavailable { .. } => KmsError::AuditUnavailable { source: None },
            KmsError::CatalogueUnavailable { .. } => {
                KmsError::CatalogueUnavailable { source: None }
            }
            KmsError::CatalogueConflict => KmsError::CatalogueConflict,
            KmsError::PermissionDenied { principal, action } => KmsError::PermissionDenied {
                principal: principal.clone(),
                action: action.clone(),
            },
            KmsError::ResourceExhausted { what } => KmsError::ResourceExhausted { what },
            KmsError::Import(refusal) => KmsError::Import(refusal.clone()),
            KmsError::Hsm { .. } => KmsError::Internal {
                what: "HSM operation failed (cause logged with an earlier item)",
            },
            KmsError::CatalogueRecordCorrupt { .. } => {
                KmsError::CatalogueRecordCorrupt { source: None }
            }
            KmsError::Storage { .. } => KmsError::Internal {
                what: "storage operation failed (cause logged with an earlier item)",
            },
            KmsError::BackupNotConfigured => KmsError::BackupNotConfigured,
            KmsError::Backup { .. } => KmsError::Internal {
                what: "backup failed (cause logged with an earlier item)",
            },
            KmsError::Internal { what } => KmsError::Internal { what },
        }
    }

    /// Display of this error with its whole cause chain, for server-side
    /// logs only (never sent to a caller).
    pub fn chain(&self) -> Chain<'_> {
        Chain(self)
    }
}

/// `ms` (unix milliseconds) as an RFC 3339 UTC time, for messages
/// (`prost_types::Timestamp` prints RFC 3339).
fn rfc3339_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// Formats an error and its sources as `error: cause: cause`.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a KmsError);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            // The caller-facing text of these says nothing; name what broke.
            KmsError::Internal { what } => write!(f, "internal error: {what}")?,
            other => write!(f, "{other}")?,
        }
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl From<HsmError> for KmsError {
    fn from(error: HsmError) -> Self {
        match error {
            HsmError::InvalidCiphertext => KmsError::InvalidCiphertext,
            HsmError::ImportMaterialInvalid => {
                KmsError::Import(crate::service::ImportRefusal::MaterialInvalid)
            }
            HsmError::ImportAlgorithmUnsupported { algorithm, .. } => {
                KmsError::Import(crate::service::ImportRefusal::AlgorithmUnsupported { algorithm })
            }
            e if e.is_unavailable() => KmsError::HsmUnavailable { source: Some(e) },
            e => KmsError::Hsm { source: e },
        }
    }
}

impl From<StorageError> for KmsError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::InvalidKeyId { .. } => KmsError::invalid(
                "key_id",
                "expected a key id (key-<32 hex digits>) or alias/<name>",
            ),
            StorageError::InvalidAlias { .. } => KmsError::invalid(
                "alias",
                "expected alias/<name> with 1-250 characters from [A-Za-z0-9/_-]",
            ),
            StorageError::KeyExists { id } => KmsError::KeyExists { key_id: id },
            StorageError::KeyNotFound { id } => KmsError::KeyNotFound {
                key: id.to_string(),
            },
            StorageError::KeyDeleted { id } => KmsError::KeyDeleted { key_id: id },
            StorageError::AliasExists { alias } => KmsError::AliasExists { alias },
            StorageError::AliasNotFound { alias } => KmsError::AliasNotFound { alias },
            StorageError::VersionNotFound { id, version } => KmsError::VersionNotFound {
                key_id: id,
                version,
            },
            StorageError::InvalidVersionTransition { id, version } => KmsError::VersionTransition {
                key_id: id,
                version,
            },
            StorageError::VersionsExhausted { id } => KmsError::VersionsExhausted { key_id: id },
            StorageError::OriginMismatch { id } => {
                KmsError::Import(crate::service::ImportRefusal::OriginMismatch { key_id: id })
            }
            // The catalogue's own invariant refusals (the service checks
            // first; these answer a caller the same way if it did not).
            StorageError::PrimaryNotEnabled { id, version } => KmsError::PrimaryVersionDisable {
                key_id: id,
                version,
            },
            StorageError::KeyPendingDeletion { id } => KmsError::KeyPendingDeletion { key_id: id },
            StorageError::NotPendingDeletion { id } => KmsError::NotPendingDeletion { key_id: id },
            StorageError::VersionBeingCreated { id, version } => KmsError::VersionBeingCreated {
                key_id: id,
                version,
            },
            e @ StorageError::Unavailable { .. } => {
                KmsError::CatalogueUnavailable { source: Some(e) }
            }
            StorageError::WriteConflict | StorageError::Fenced { .. } => {
                KmsError::CatalogueConflict
            }
            e @ (StorageError::AuditPoisoned
            | StorageError::AuditWrite { .. }
            | StorageError::AuditClosed) => KmsError::AuditUnavailable { source: Some(e) },
            other => KmsError::Storage { source: other },
        }
    }
}

pub type Result<T, E = KmsError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_errors_keep_their_cause_but_show_callers_a_generic_message() {
        let error = KmsError::from(StorageError::MissingColumnFamily { name: "keys" });
        assert_eq!(error.to_string(), "internal error");
        assert_eq!(error.code(), ResultCode::Internal);
        assert_eq!(
            error.chain().to_string(),
            "internal error: column family keys is missing"
        );
        let again = error.same_answer();
        assert_eq!(again.to_string(), "internal error");
        assert_eq!(again.code(), ResultCode::Internal);

        let audit = KmsError::from(StorageError::AuditPoisoned);
        assert_eq!(audit.to_string(), "the audit log is unavailable");
        assert_eq!(audit.code(), ResultCode::Unavailable);
        assert!(std::error::Error::source(&audit).is_some());
    }

    #[test]
    fn caller_errors_keep_their_messages() {
        let key_id = KeyId::from_random([1; 16]);
        let cases = [
            (
                KmsError::from(StorageError::KeyNotFound { id: key_id.clone() }),
                format!("key {key_id} not found"),
            ),
            (
                KmsError::from(StorageError::VersionNotFound {
                    id: key_id.clone(),
                    version: 3,
                }),
                format!("version 3 of key {key_id} not found"),
            ),
            (
                KmsError::VersionDestroyed {
                    key_id: key_id.clone(),
                    version: 4,
                    destroyed_at_ms: 1_767_225_600_250,
                },
                format!("key version 4 of key {key_id} was destroyed at 2026-01-01T00:00:00.250Z"),
            ),
            (
                KmsError::PrimaryVersionDisable {
                    key_id: key_id.clone(),
                    version: 2,
                },
                format!(
                    "version 2 is the primary version of key {key_id}; rotate or set another primary first"
                ),
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
            assert_eq!(error.same_answer().to_string(), message);
        }
    }
}
