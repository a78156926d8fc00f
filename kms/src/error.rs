//! The domain error of the service. Each variant knows its result code (a
//! gRPC code, also what the audit log records); `grpc::status` turns it into
//! a `tonic::Status`. Messages are safe to send to callers: they never carry
//! plaintext, key material, PINs, or detail about why a ciphertext failed.
//! Internal detail (HSM return codes, database errors) is logged once,
//! server-side, where the error is created.

use kms_storage::{ResultCode, StorageError};

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// A request field is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// Any ciphertext failure: tampered, truncated, foreign, wrong context,
    /// wrong key. Deliberately says nothing more.
    #[error("invalid ciphertext")]
    InvalidCiphertext,

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("{what} already exists")]
    AlreadyExists { what: String },

    /// The key exists but is disabled.
    #[error("key {key_id} is disabled")]
    KeyDisabled { key_id: String },

    /// The key is scheduled for deletion and cannot be used.
    #[error("key {key_id} is pending deletion")]
    KeyPendingDeletion { key_id: String },

    /// The key was deleted; only its tombstone remains.
    #[error("key {key_id} is deleted")]
    KeyDeleted { key_id: String },

    /// The key version named by the ciphertext (or request) is not usable.
    #[error("version {version} of key {key_id} is {state}")]
    VersionUnusable {
        key_id: String,
        version: u32,
        state: &'static str,
    },

    /// The operation is not allowed in the current state.
    #[error("{reason}")]
    FailedPrecondition { reason: String },

    /// The HSM is unreachable; the service fails closed.
    #[error("the HSM is unavailable")]
    HsmUnavailable,

    /// The audit log cannot record the request, so it was not carried out
    /// (or its result was withheld).
    #[error("the audit log is unavailable")]
    AuditUnavailable,

    /// The principal may not do this. Names the principal and what was
    /// refused (both known to the caller), never why a grant did not match.
    #[error("{principal} is not allowed to {action}")]
    PermissionDenied { principal: String, action: String },

    /// The service is saturated.
    #[error("{what}")]
    ResourceExhausted { what: &'static str },

    /// Anything else. The detail was logged server-side.
    #[error("internal error")]
    Internal,
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
            KmsError::NotFound { .. } => ResultCode::NotFound,
            KmsError::AlreadyExists { .. } => ResultCode::AlreadyExists,
            KmsError::KeyDisabled { .. }
            | KmsError::KeyPendingDeletion { .. }
            | KmsError::KeyDeleted { .. }
            | KmsError::VersionUnusable { .. }
            | KmsError::FailedPrecondition { .. } => ResultCode::FailedPrecondition,
            KmsError::HsmUnavailable | KmsError::AuditUnavailable => ResultCode::Unavailable,
            KmsError::ResourceExhausted { .. } => ResultCode::ResourceExhausted,
            KmsError::PermissionDenied { .. } => ResultCode::PermissionDenied,
            KmsError::Internal => ResultCode::Internal,
        }
    }
}

impl From<kms_hsm::HsmError> for KmsError {
    fn from(error: kms_hsm::HsmError) -> Self {
        use kms_hsm::HsmError;
        match error {
            HsmError::InvalidCiphertext => KmsError::InvalidCiphertext,
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "HSM unavailable");
                KmsError::HsmUnavailable
            }
            e => {
                tracing::error!(error = %e, "HSM operation failed");
                KmsError::Internal
            }
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
            StorageError::KeyExists { id } => KmsError::AlreadyExists {
                what: format!("key {id}"),
            },
            StorageError::KeyNotFound { id } => KmsError::NotFound {
                what: format!("key {id}"),
            },
            StorageError::KeyDeleted { id } => KmsError::KeyDeleted { key_id: id },
            StorageError::AliasExists { alias } => KmsError::AlreadyExists {
                what: format!("alias {alias}"),
            },
            StorageError::AliasNotFound { alias } => KmsError::NotFound {
                what: format!("alias {alias}"),
            },
            StorageError::VersionNotFound { id, version } => KmsError::NotFound {
                what: format!("version {version} of key {id}"),
            },
            StorageError::InvalidVersionTransition { id, version } => {
                KmsError::FailedPrecondition {
                    reason: format!("version {version} of key {id} cannot make that state change"),
                }
            }
            StorageError::VersionsExhausted { id } => KmsError::FailedPrecondition {
                reason: format!("key {id} has no version numbers left"),
            },
            StorageError::AuditPoisoned
            | StorageError::AuditWrite { .. }
            | StorageError::AuditClosed => {
                tracing::error!(error = %error, "audit log unavailable");
                KmsError::AuditUnavailable
            }
            other => {
                tracing::error!(error = %other, "storage operation failed");
                KmsError::Internal
            }
        }
    }
}

pub type Result<T, E = KmsError> = std::result::Result<T, E>;
