//! [`KmsClient`]: one typed async method per kms.v1 RPC over a shared HTTP/2
//! channel, each call with the configured deadline and bearer token, and
//! retried (UNAVAILABLE only, idempotent calls only; see [`crate::retry`]).
//!
//! Never: log or put in an error the request or reply bodies (they may carry
//! plaintext or data keys) or the token.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kms_proto::v1 as pb;
use kms_proto::v1::admin_client::AdminClient;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use tonic::transport::Channel;

use crate::Error;
use crate::config::{BearerToken, ClientConfig};
use crate::retry::{Idempotency, RetryPolicy};

/// Counters of one client (and its clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// RPC attempts sent, retries included.
    pub attempts: u64,
    /// Attempts that were retries after UNAVAILABLE.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    retries: AtomicU64,
}

/// A typed client of the three kms.v1 services. Cheap to clone; clones share the
/// connection and the counters.
#[derive(Clone)]
pub struct KmsClient {
    endpoint: Arc<str>,
    channel: Channel,
    token: Option<Arc<BearerToken>>,
    call_timeout: Duration,
    retry: RetryPolicy,
    counters: Arc<Counters>,
}

impl fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("call_timeout", &self.call_timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

/// One method per RPC: `$name` is both the generated client's method and ours.
macro_rules! rpcs {
    ($( $client:ident $name:ident $rpc:literal $idem:ident : $req:ident => $resp:ident; )*) => {
        impl KmsClient {
            $(
                #[doc = concat!("Calls `", $rpc, "` (", stringify!($idem), ").")]
                #[doc = ""]
                #[doc = "# Errors"]
                #[doc = "[`Error::Rpc`] with the gRPC status if the server (or the transport)"]
                #[doc = "answers non-OK, after retries for a retryable call;"]
                #[doc = "[`Error::InvalidToken`] if the bearer token is not a valid header value."]
                pub async fn $name(&self, request: pb::$req) -> Result<pb::$resp, Error> {
                    let channel = self.channel.clone();
                    self.call($rpc, Idempotency::$idem, request, move |request| {
                        let mut client = $client::new(channel.clone());
                        async move { client.$name(request).await }
                    })
                    .await
                }
            )*
        }
    };
}

rpcs! {
    KeyManagementClient create_key "CreateKey" Once: CreateKeyRequest => CreateKeyResponse;
    KeyManagementClient describe_key "DescribeKey" Retryable: DescribeKeyRequest => DescribeKeyResponse;
    KeyManagementClient list_keys "ListKeys" Retryable: ListKeysRequest => ListKeysResponse;
    KeyManagementClient update_key_description "UpdateKeyDescription" Once: UpdateKeyDescriptionRequest => UpdateKeyDescriptionResponse;
    KeyManagementClient tag_key "TagKey" Once: TagKeyRequest => TagKeyResponse;
    KeyManagementClient untag_key "UntagKey" Once: UntagKeyRequest => UntagKeyResponse;
    KeyManagementClient enable_key "EnableKey" Once: EnableKeyRequest => EnableKeyResponse;
    KeyManagementClient disable_key "DisableKey" Once: DisableKeyRequest => DisableKeyResponse;
    KeyManagementClient schedule_key_deletion "ScheduleKeyDeletion" Once: ScheduleKeyDeletionRequest => ScheduleKeyDeletionResponse;
    KeyManagementClient cancel_key_deletion "CancelKeyDeletion" Once: CancelKeyDeletionRequest => CancelKeyDeletionResponse;
    KeyManagementClient rotate_key "RotateKey" Once: RotateKeyRequest => RotateKeyResponse;
    KeyManagementClient set_rotation_policy "SetRotationPolicy" Once: SetRotationPolicyRequest => SetRotationPolicyResponse;
    KeyManagementClient list_key_versions "ListKeyVersions" Retryable: ListKeyVersionsRequest => ListKeyVersionsResponse;
    KeyManagementClient enable_key_version "EnableKeyVersion" Once: EnableKeyVersionRequest => EnableKeyVersionResponse;
    KeyManagementClient disable_key_version "DisableKeyVersion" Once: DisableKeyVersionRequest => DisableKeyVersionResponse;
    KeyManagementClient set_primary_version "SetPrimaryVersion" Once: SetPrimaryVersionRequest => SetPrimaryVersionResponse;
    KeyManagementClient schedule_key_version_destruction "ScheduleKeyVersionDestruction" Once: ScheduleKeyVersionDestructionRequest => ScheduleKeyVersionDestructionResponse;
    KeyManagementClient restore_key_version "RestoreKeyVersion" Once: RestoreKeyVersionRequest => RestoreKeyVersionResponse;
    KeyManagementClient set_key_version_re_encrypt_only "SetKeyVersionReEncryptOnly" Once: SetKeyVersionReEncryptOnlyRequest => SetKeyVersionReEncryptOnlyResponse;
    KeyManagementClient create_alias "CreateAlias" Once: CreateAliasRequest => CreateAliasResponse;
    KeyManagementClient update_alias "UpdateAlias" Once: UpdateAliasRequest => UpdateAliasResponse;
    KeyManagementClient delete_alias "DeleteAlias" Once: DeleteAliasRequest => DeleteAliasResponse;
    KeyManagementClient list_aliases "ListAliases" Retryable: ListAliasesRequest => ListAliasesResponse;
    KeyManagementClient get_key_policy "GetKeyPolicy" Retryable: GetKeyPolicyRequest => GetKeyPolicyResponse;
    KeyManagementClient put_key_policy "PutKeyPolicy" Once: PutKeyPolicyRequest => PutKeyPolicyResponse;
    KeyManagementClient get_parameters_for_import "GetParametersForImport" Once: GetParametersForImportRequest => GetParametersForImportResponse;
    KeyManagementClient import_key_material "ImportKeyMaterial" Once: ImportKeyMaterialRequest => ImportKeyMaterialResponse;
    KeyManagementClient get_key_last_usage "GetKeyLastUsage" Retryable: GetKeyLastUsageRequest => GetKeyLastUsageResponse;
    CryptoClient encrypt "Encrypt" Retryable: EncryptRequest => EncryptResponse;
    CryptoClient decrypt "Decrypt" Retryable: DecryptRequest => DecryptResponse;
    CryptoClient generate_data_key "GenerateDataKey" Retryable: GenerateDataKeyRequest => GenerateDataKeyResponse;
    CryptoClient generate_data_key_without_plaintext "GenerateDataKeyWithoutPlaintext" Retryable: GenerateDataKeyWithoutPlaintextRequest => GenerateDataKeyWithoutPlaintextResponse;
    CryptoClient re_encrypt "ReEncrypt" Retryable: ReEncryptRequest => ReEncryptResponse;
    CryptoClient generate_random "GenerateRandom" Retryable: GenerateRandomRequest => GenerateRandomResponse;
    CryptoClient batch_encrypt "BatchEncrypt" Retryable: BatchEncryptRequest => BatchEncryptResponse;
    CryptoClient batch_decrypt "BatchDecrypt" Retryable: BatchDecryptRequest => BatchDecryptResponse;
    CryptoClient batch_generate_data_key "BatchGenerateDataKey" Retryable: BatchGenerateDataKeyRequest => BatchGenerateDataKeyResponse;
    CryptoClient batch_re_encrypt "BatchReEncrypt" Retryable: BatchReEncryptRequest => BatchReEncryptResponse;
    AuditClient list_audit_events "ListAuditEvents" Retryable: ListAuditEventsRequest => ListAuditEventsResponse;
    AuditClient verify_audit_log "VerifyAuditLog" Retryable: VerifyAuditLogRequest => VerifyAuditLogResponse;
    AdminClient reload "Reload" Once: ReloadRequest => ReloadResponse;
    AdminClient list_roots "ListRoots" Retryable: ListRootsRequest => ListRootsResponse;
    AdminClient destroy_root "DestroyRoot" Once: DestroyRootRequest => DestroyRootResponse;
    AdminClient create_backup "CreateBackup" Once: CreateBackupRequest => CreateBackupResponse;
}

impl KmsClient {
    /// Connects now; fails if the server cannot be reached.
    ///
    /// # Errors
    /// As [`ClientConfig::tonic_endpoint`] for settings it refuses, and
    /// [`Error::Connect`] if the connection (TCP, TLS handshake) fails within the
    /// connect timeout.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        let endpoint = config.tonic_endpoint()?;
        let channel = endpoint.connect().await.map_err(|source| Error::Connect {
            endpoint: config.endpoint.clone(),
            source,
        })?;
        Ok(Self::with_channel(config, channel))
    }

    /// Connects on the first call (and reconnects as needed); an unreachable
    /// server then shows up as UNAVAILABLE, which retryable calls retry.
    ///
    /// # Errors
    /// As [`ClientConfig::tonic_endpoint`] for settings it refuses.
    pub fn connect_lazy(config: ClientConfig) -> Result<Self, Error> {
        let channel = config.tonic_endpoint()?.connect_lazy();
        Ok(Self::with_channel(config, channel))
    }

    fn with_channel(config: ClientConfig, channel: Channel) -> Self {
        KmsClient {
            endpoint: config.endpoint.into(),
            channel,
            token: config.token.map(Arc::new),
            call_timeout: config.call_timeout,
            retry: config.retry,
            counters: Arc::new(Counters::default()),
        }
    }

    /// Attempts and retries so far.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            attempts: self.counters.attempts.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
        }
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Opens a `WatchAuditEvents` stream: every audit event from
    /// `from_sequence` on (0 means from the first), in sequence order without
    /// gaps or duplicates, first those already logged, then each new one as it
    /// is committed. The stream has no deadline and is not retried: after an
    /// error (UNAVAILABLE when the server restarts), open a new one from the
    /// last sequence received + 1 to resume without gaps or duplicates.
    ///
    /// # Errors
    /// [`Error::Rpc`] if the server refuses the stream (PERMISSION_DENIED for a
    /// caller who is neither auditor nor administrator, UNAVAILABLE if it cannot
    /// be reached); [`Error::InvalidToken`] if the bearer token is not a valid
    /// header value.
    pub async fn watch_audit_events(&self, from_sequence: u64) -> Result<AuditEventStream, Error> {
        const RPC: &str = "WatchAuditEvents";
        self.counters.attempts.fetch_add(1, Ordering::Relaxed);
        let request = self.untimed_request(pb::WatchAuditEventsRequest { from_sequence })?;
        let stream = AuditClient::new(self.channel.clone())
            .watch_audit_events(request)
            .await
            .map_err(|status| rpc_error(RPC, &status))?
            .into_inner();
        Ok(AuditEventStream { inner: stream })
    }

    /// Wraps a message with the deadline and the token.
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = self.untimed_request(message)?;
        request.set_timeout(self.call_timeout);
        Ok(request)
    }

    /// Wraps a message with the token, without a deadline (for streams that
    /// last until cancelled).
    fn untimed_request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.header_value()?);
        }
        Ok(request)
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: &'static str,
        idempotency: Idempotency,
        message: Req,
        mut send: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let max_attempts = match idempotency {
            Idempotency::Retryable => self.retry.max_attempts.max(1),
            Idempotency::Once => 1,
        };
        let mut pending = Some(message);
        let mut attempt = 1;
        loop {
            // The last attempt moves the message instead of copying it, so a
            // non-retried call never duplicates its plaintext.
            let message = if attempt < max_attempts {
                pending.clone()
            } else {
                pending.take()
            };
            let Some(message) = message else {
                unreachable!("the message is only taken by the last attempt");
            };
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            match send(self.request(message)?).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status)
                    if status.code() == tonic::Code::Unavailable && attempt < max_attempts =>
                {
                    let sleep = self.retry.backoff(attempt);
                    tracing::debug!(rpc, attempt, ?sleep, "UNAVAILABLE; retrying");
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(sleep).await;
                    attempt += 1;
                }
                Err(status) => {
                    return Err(Error::Rpc {
                        rpc,
                        code: status.code(),
                        message: crate::error::status_message(&status),
                        attempts: attempt,
                    });
                }
            }
        }
    }
}

fn rpc_error(rpc: &'static str, status: &tonic::Status) -> Error {
    Error::Rpc {
        rpc,
        code: status.code(),
        message: crate::error::status_message(status),
        attempts: 1,
    }
}

/// An open `WatchAuditEvents` stream (from [`KmsClient::watch_audit_events`]).
/// Dropping it cancels the stream.
#[derive(Debug)]
pub struct AuditEventStream {
    inner: tonic::Streaming<pb::WatchAuditEventsResponse>,
}

impl AuditEventStream {
    /// The next event, waiting for it to be committed; `Ok(None)` if the server
    /// ended the stream.
    ///
    /// # Errors
    /// [`Error::Rpc`] when the stream fails (UNAVAILABLE when the server shuts
    /// down or the connection breaks: resume from the last sequence received
    /// + 1); [`Error::MissingField`] for a message without an event.
    pub async fn next(&mut self) -> Result<Option<pb::AuditEvent>, Error> {
        match self.inner.message().await {
            Ok(Some(message)) => message.event.map(Some).ok_or(Error::MissingField {
                rpc: "WatchAuditEvents",
                field: "event",
            }),
            Ok(None) => Ok(None),
            Err(status) => Err(rpc_error("WatchAuditEvents", &status)),
        }
    }
}
