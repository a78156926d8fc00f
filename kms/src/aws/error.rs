//! AWS KMS errors: `{"__type": "<Name>Exception", "message": "..."}` with
//! the HTTP status AWS uses (the AWS KMS API Reference, "Errors" of each
//! operation; client errors are 400, KMSInternalException 500,
//! DependencyTimeoutException 503). The one place a [`KmsError`] becomes an
//! AWS error; the message is the error's Display, which is caller-safe by
//! construction (generic for server-side failures).

use bytes::Bytes;
use http_body_util::Full;
use kms_storage::ResultCode;

use crate::error::KmsError;

/// An AWS KMS error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    /// The `__type` (botocore's `Error.Code`), e.g. `NotFoundException`.
    pub kind: &'static str,
    pub status: http::StatusCode,
    pub message: String,
}

/// The one answer to every authentication failure: it says nothing about
/// which part failed (key id, scope, date, headers, body or signature).
pub const SIGNATURE_MESSAGE: &str = "The request signature we calculated does not match the signature you provided, or the request is not signed with a known access key within the allowed time.";

impl AwsError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> AwsError {
        AwsError {
            kind,
            status: http::StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    pub fn with_status(mut self, status: http::StatusCode) -> AwsError {
        self.status = status;
        self
    }

    /// `ValidationException` (400).
    pub fn validation(message: impl Into<String>) -> AwsError {
        AwsError::new("ValidationException", message)
    }

    /// The refusal of a request whose signature was not accepted.
    pub fn signature() -> AwsError {
        AwsError::new("InvalidSignatureException", SIGNATURE_MESSAGE)
    }

    /// An operation kms does not offer, named.
    pub fn unsupported(operation: &str) -> AwsError {
        AwsError::new(
            "UnsupportedOperationException",
            format!("{operation} is not supported by this kms server"),
        )
    }

    /// The JSON 1.1 response.
    pub fn into_response(self) -> http::Response<Full<Bytes>> {
        let body = serde_json::json!({ "__type": self.kind, "message": self.message });
        let mut response = http::Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(super::CONTENT_TYPE),
        );
        response
    }
}

impl From<KmsError> for AwsError {
    fn from(error: KmsError) -> AwsError {
        use http::StatusCode;
        let message = error.to_string();
        let kind = match &error {
            KmsError::InvalidCiphertext => "InvalidCiphertextException",
            KmsError::KeyNotFound { .. }
            | KmsError::VersionNotFound { .. }
            | KmsError::AliasNotFound { .. }
            | KmsError::KeyDeleted { .. } => "NotFoundException",
            KmsError::KeyExists { .. } | KmsError::AliasExists { .. } => "AlreadyExistsException",
            KmsError::KeyDisabled { .. } => "DisabledException",
            KmsError::PermissionDenied { .. } => "AccessDeniedException",
            KmsError::ResourceExhausted { .. } => "LimitExceededException",
            KmsError::HsmUnavailable { .. } | KmsError::AuditUnavailable { .. } => {
                return AwsError::new("DependencyTimeoutException", message)
                    .with_status(StatusCode::SERVICE_UNAVAILABLE);
            }
            // AWS answers a malformed key identifier as it answers an
            // unknown one ("Invalid keyId"), and a Marker it did not issue
            // with InvalidMarkerException (ListKeys, ListAliases,
            // ListKeyRotations "Errors"); the field names are the domain's
            // typed constants (`KmsError::invalid`).
            KmsError::InvalidArgument {
                field: "key_id", ..
            } => "NotFoundException",
            KmsError::InvalidArgument {
                field: "page_token",
                ..
            } => "InvalidMarkerException",
            KmsError::InvalidArgument { .. } => "ValidationException",
            KmsError::Import(refusal) => import_exception(refusal),
            other => match other.code() {
                ResultCode::InvalidArgument => "ValidationException",
                ResultCode::NotFound => "NotFoundException",
                ResultCode::AlreadyExists => "AlreadyExistsException",
                ResultCode::FailedPrecondition => "KMSInvalidStateException",
                ResultCode::PermissionDenied => "AccessDeniedException",
                ResultCode::ResourceExhausted => "LimitExceededException",
                ResultCode::Unavailable => {
                    return AwsError::new("DependencyTimeoutException", message)
                        .with_status(StatusCode::SERVICE_UNAVAILABLE);
                }
                _ => {
                    return AwsError::new("KMSInternalException", message)
                        .with_status(StatusCode::INTERNAL_SERVER_ERROR);
                }
            },
        };
        AwsError::new(kind, message)
    }
}

/// The AWS exception of an import refusal (the ImportKeyMaterial and
/// GetParametersForImport "Errors" sections of the AWS KMS API Reference).
fn import_exception(refusal: &crate::service::ImportRefusal) -> &'static str {
    use crate::service::ImportRefusal;
    match refusal {
        ImportRefusal::TokenExpired => "ExpiredImportTokenException",
        ImportRefusal::UnknownToken
        | ImportRefusal::TokenUsed
        | ImportRefusal::TokenSuperseded
        | ImportRefusal::TokenForOtherKey { .. } => "InvalidImportTokenException",
        ImportRefusal::MaterialInvalid => "InvalidCiphertextException",
        ImportRefusal::OriginMismatch { .. }
        | ImportRefusal::RotateExternal { .. }
        | ImportRefusal::AlgorithmUnsupported { .. } => "UnsupportedOperationException",
        ImportRefusal::PendingImport { .. } => "KMSInvalidStateException",
        ImportRefusal::TooManyOutstanding => "LimitExceededException",
        _ => match refusal.code() {
            ResultCode::InvalidArgument => "ValidationException",
            _ => "KMSInvalidStateException",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_storage::KeyId;

    #[test]
    fn domain_errors_map_to_the_aws_exceptions_clients_expect() {
        let key_id = KeyId::from_random([7; 16]);
        let cases: Vec<(KmsError, &str, u16)> = vec![
            (
                KmsError::InvalidCiphertext,
                "InvalidCiphertextException",
                400,
            ),
            // Issue 18: a destroyed or re-encrypt-only version is a state
            // the key is in, never a bad ciphertext.
            (
                KmsError::VersionDestroyed {
                    key_id: key_id.clone(),
                    version: 1,
                    destroyed_at_ms: 1,
                },
                "KMSInvalidStateException",
                400,
            ),
            (
                KmsError::VersionUnusable {
                    key_id: key_id.clone(),
                    version: 1,
                    state: "re-encrypt only (it decrypts only as the source of ReEncrypt)",
                },
                "KMSInvalidStateException",
                400,
            ),
            (
                KmsError::VersionRecentlyUsed {
                    key_id: key_id.clone(),
                    version: 1,
                    last_decrypt_ms: 1,
                    quiet_period_days: 30,
                },
                "KMSInvalidStateException",
                400,
            ),
            (
                KmsError::KeyNotFound { key: "k".into() },
                "NotFoundException",
                400,
            ),
            (
                KmsError::KeyDeleted {
                    key_id: key_id.clone(),
                },
                "NotFoundException",
                400,
            ),
            (
                KmsError::KeyDisabled {
                    key_id: key_id.clone(),
                },
                "DisabledException",
                400,
            ),
            (
                KmsError::KeyPendingDeletion {
                    key_id: key_id.clone(),
                },
                "KMSInvalidStateException",
                400,
            ),
            (
                KmsError::AliasExists {
                    alias: "alias/a".into(),
                },
                "AlreadyExistsException",
                400,
            ),
            (KmsError::invalid("x", "y"), "ValidationException", 400),
            (
                KmsError::invalid("key_id", "malformed"),
                "NotFoundException",
                400,
            ),
            (
                KmsError::invalid("page_token", "not ours"),
                "InvalidMarkerException",
                400,
            ),
            (
                KmsError::PermissionDenied {
                    principal: "p".into(),
                    action: "a".into(),
                },
                "AccessDeniedException",
                400,
            ),
            (
                KmsError::HsmUnavailable { source: None },
                "DependencyTimeoutException",
                503,
            ),
            (
                KmsError::Internal {
                    what: "secret detail",
                },
                "KMSInternalException",
                500,
            ),
        ];
        for (error, kind, status) in cases {
            let aws = AwsError::from(error);
            assert_eq!((aws.kind, aws.status.as_u16()), (kind, status));
            assert!(!aws.message.contains("secret detail"));
        }
    }
}
