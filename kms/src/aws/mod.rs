//! The AWS KMS API door (`[aws_api]`): the AWS KMS JSON 1.1 protocol
//! (`POST /`, `Content-Type: application/x-amz-json-1.1`,
//! `X-Amz-Target: TrentService.<Operation>`, blobs base64 in JSON, errors
//! as `{"__type", "message"}`) over HTTP/1.1 on its own port, so that boto3,
//! the AWS CLI and the AWS Encryption SDK work unchanged against kms.
//!
//! Each request: drain check → method, path and body size → operation name
//! → SigV4 ([`sigv4`], access keys from [`credentials`]) → the same
//! admission limits as gRPC → a thin handler ([`operations`]) over the same
//! domain service, audited exactly as the gRPC operation it corresponds to
//! (TagResource as TagKey, EnableKeyRotation as SetRotationPolicy, ...),
//! under the principal the access key maps to.
//!
//! Signature failures with a known access key are audited as denials
//! (PERMISSION_DENIED, under that key's principal); requests with no
//! signature or an unknown access key are logged only (no principal to
//! record, and an anonymous flood must not fill the audit log). Every
//! signature failure gets the same answer ([`AwsError::signature`]).
//! This module never logs plaintext, data keys or secrets.

pub mod credentials;
pub mod error;
mod operations;
pub mod sigv4;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use kms_storage::KeyId;
use tokio_stream::StreamExt;

pub use credentials::AwsCredentials;
pub use error::AwsError;

use crate::auth::admission::Admission;
use crate::config::AwsApiConfig;
use crate::grpc::Rpc;
use crate::server::drain::Drain;
use crate::server::incoming::LimitedStream;
use crate::service::{KmsService, Operation, RequestMeta};

/// The AWS JSON 1.1 content type, of requests and responses.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// The `X-Amz-Target` prefix of AWS KMS operations.
pub const TARGET_PREFIX: &str = "TrentService.";
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// ARNs of this server: `arn:aws:kms:<region>:<account>:key/<id>` and
/// `...:alias/<name>`.
#[derive(Debug, Clone)]
pub struct Arns {
    region: String,
    account_id: String,
}

impl Arns {
    pub fn new(region: &str, account_id: &str) -> Arns {
        Arns {
            region: region.to_owned(),
            account_id: account_id.to_owned(),
        }
    }

    fn prefix(&self) -> String {
        format!("arn:aws:kms:{}:{}:", self.region, self.account_id)
    }

    /// The key ARN of `id`.
    pub fn key(&self, id: &KeyId) -> String {
        format!("{}key/{id}", self.prefix())
    }

    /// The alias ARN of `alias/<name>`.
    pub fn alias(&self, alias: &str) -> String {
        format!("{}{alias}", self.prefix())
    }

    /// What a request's `KeyId` names, as the domain service resolves keys:
    /// a key id or `alias/<name>` as given; a key ARN or alias ARN of this
    /// region and account reduced to the id or alias. Any other ARN is
    /// passed on unchanged, and the handlers answer it NotFoundException
    /// (`operations::Call::valid`): no key of another region or account is
    /// here.
    pub fn key_ref(&self, key: &str) -> String {
        match key.strip_prefix(&self.prefix()) {
            Some(rest) => match rest.strip_prefix("key/") {
                Some(id) => id.to_owned(),
                None if rest.starts_with("alias/") => rest.to_owned(),
                None => key.to_owned(),
            },
            None => key.to_owned(),
        }
    }
}

/// Everything a request needs: the service, the access keys, the limits.
#[derive(Debug)]
pub struct AwsApi {
    service: Arc<KmsService>,
    credentials: AwsCredentials,
    admission: Arc<Admission>,
    drain: Drain,
    arns: Arns,
    region: String,
    max_body_bytes: usize,
    request_timeout: Duration,
}

impl AwsApi {
    pub fn new(
        service: Arc<KmsService>,
        settings: &AwsApiConfig,
        credentials: AwsCredentials,
        admission: Arc<Admission>,
        drain: Drain,
        max_body_bytes: usize,
        request_timeout: Duration,
    ) -> AwsApi {
        AwsApi {
            service,
            credentials,
            admission,
            drain,
            arns: Arns::new(&settings.region, &settings.account_id),
            region: settings.region.clone(),
            max_body_bytes,
            request_timeout,
        }
    }
}

/// Serves HTTP/1.1 on the accepted connections until `stop` turns true;
/// then stops accepting, asks every open connection to close after its
/// request in flight, and returns once they have.
pub async fn serve(
    api: Arc<AwsApi>,
    mut incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<LimitedStream>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                None => break,
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let peer = stream
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let api = Arc::clone(&api);
        let mut stop = stop.clone();
        connections.spawn(async move {
            let respond = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let api = Arc::clone(&api);
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handle(&api, &peer, request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), respond);
            tokio::pin!(connection);
            let stopping = async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            };
            tokio::select! {
                _ = connection.as_mut() => return,
                () = stopping => {}
            }
            // Finish the request in flight, then close.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// The AWS operation named by `X-Amz-Target`, and the audit operation it is
/// recorded as (None: not offered).
fn audit_operation(name: &str) -> Option<Operation> {
    Some(match name {
        "Encrypt" => Operation::Encrypt,
        "Decrypt" => Operation::Decrypt,
        "ReEncrypt" => Operation::ReEncrypt,
        "GenerateDataKey" => Operation::GenerateDataKey,
        "GenerateDataKeyWithoutPlaintext" => Operation::GenerateDataKeyWithoutPlaintext,
        "GenerateRandom" => Operation::GenerateRandom,
        "CreateKey" => Operation::CreateKey,
        "DescribeKey" | "GetKeyRotationStatus" | "ListResourceTags" => Operation::DescribeKey,
        "ListKeys" => Operation::ListKeys,
        "EnableKey" => Operation::EnableKey,
        "DisableKey" => Operation::DisableKey,
        "ScheduleKeyDeletion" => Operation::ScheduleKeyDeletion,
        "CancelKeyDeletion" => Operation::CancelKeyDeletion,
        "UpdateKeyDescription" => Operation::UpdateKeyDescription,
        "CreateAlias" => Operation::CreateAlias,
        "UpdateAlias" => Operation::UpdateAlias,
        "DeleteAlias" => Operation::DeleteAlias,
        "ListAliases" => Operation::ListAliases,
        "TagResource" => Operation::TagKey,
        "UntagResource" => Operation::UntagKey,
        "EnableKeyRotation" | "DisableKeyRotation" => Operation::SetRotationPolicy,
        "RotateKeyOnDemand" => Operation::RotateKey,
        "ListKeyRotations" => Operation::ListKeyVersions,
        "GetParametersForImport" => Operation::GetParametersForImport,
        "ImportKeyMaterial" => Operation::ImportKeyMaterial,
        _ => return None,
    })
}

fn request_id_of(parts: &http::request::Parts) -> String {
    parts
        .headers
        .get("amz-sdk-invocation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::grpc::is_sane_request_id(v))
        .map_or_else(crate::grpc::new_request_id, str::to_owned)
}

/// One request, answered (never an HTTP-level error).
async fn handle(
    api: &AwsApi,
    peer: &str,
    request: http::Request<Incoming>,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let request_id = request_id_of(&parts);
    let mut response = match answer(api, peer, &request_id, parts, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Ok(value) = http::HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-amzn-requestid", value);
    }
    response
}

async fn answer(
    api: &AwsApi,
    peer: &str,
    request_id: &str,
    parts: http::request::Parts,
    body: Incoming,
) -> Result<http::Response<Full<Bytes>>, AwsError> {
    if api.drain.is_draining() {
        return Err(AwsError::new(
            "ServiceUnavailableException",
            "the server is shutting down; retry",
        )
        .with_status(http::StatusCode::SERVICE_UNAVAILABLE));
    }
    if parts.method != http::Method::POST || parts.uri.path() != "/" {
        return Err(AwsError::new(
            "UnknownOperationException",
            "the AWS KMS API is POST / with X-Amz-Target",
        )
        .with_status(http::StatusCode::NOT_FOUND));
    }
    let body = match Limited::new(body, api.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(AwsError::new(
                "RequestEntityTooLargeException",
                format!("request bodies are limited to {} bytes", api.max_body_bytes),
            )
            .with_status(http::StatusCode::PAYLOAD_TOO_LARGE));
        }
    };
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(TARGET_PREFIX))
        .ok_or_else(|| AwsError::new("UnknownOperationException", "no TrentService X-Amz-Target"))?
        .to_owned();
    // Who is calling: the signature first, before anything about the
    // operation is revealed or done.
    let verified = sigv4::verify(
        &parts,
        &body,
        sigv4::Expectations {
            region: &api.region,
            service: "kms",
            now: SystemTime::now(),
        },
        |id| api.credentials.secret(id),
    );
    let principal = match verified {
        Ok(verified) => api
            .credentials
            .principal(&verified.access_key_id)
            .map(str::to_owned)
            .ok_or_else(AwsError::signature)?,
        Err(reason) => {
            refuse_signature(api, peer, request_id, &parts, &target, &reason).await;
            return Err(AwsError::signature());
        }
    };
    let Some(operation) = audit_operation(&target) else {
        tracing::debug!(principal = %principal, operation = %target, "unsupported AWS KMS operation");
        return Err(AwsError::unsupported(&target));
    };
    let _permit = api.admission.admit(&principal).map_err(|refusal| {
        tracing::info!(peer = %peer, principal = %principal, reason = %refusal, "request not admitted");
        AwsError::new("ThrottlingException", refusal.to_string())
    })?;
    let rpc = Rpc::with_meta(
        operation,
        RequestMeta {
            principal,
            peer: peer.to_owned(),
            request_id: request_id.to_owned(),
        },
    );
    let call = operations::Call {
        rpc: &rpc,
        service: &api.service,
        arns: &api.arns,
    };
    let reply = tokio::time::timeout(
        api.request_timeout,
        operations::dispatch(&call, &target, &body),
    )
    .await
    .map_err(|_| {
        AwsError::new("DependencyTimeoutException", "the request timed out")
            .with_status(http::StatusCode::SERVICE_UNAVAILABLE)
    })??;
    let mut response = http::Response::new(Full::new(Bytes::from(reply.to_string())));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    Ok(response)
}

/// A signature failure: logged; and, when the access key is one of ours,
/// audited as a denial under its principal for the operation named.
async fn refuse_signature(
    api: &AwsApi,
    peer: &str,
    request_id: &str,
    parts: &http::request::Parts,
    target: &str,
    reason: &sigv4::SigV4Error,
) {
    let principal = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|h| sigv4::parse_authorization(h.as_bytes()).ok())
        .and_then(|a| {
            api.credentials
                .principal(&a.access_key_id)
                .map(str::to_owned)
        });
    tracing::info!(peer = %peer, reason = %reason, principal = principal.as_deref().unwrap_or(""), "AWS KMS API request refused: signature not accepted");
    let (Some(principal), Some(operation)) = (principal, audit_operation(target)) else {
        return;
    };
    let meta = RequestMeta {
        principal: principal.clone(),
        peer: peer.to_owned(),
        request_id: request_id.to_owned(),
    };
    let denial = crate::error::KmsError::PermissionDenied {
        principal,
        action: format!("call {target}: request signature not accepted"),
    };
    let refused = api
        .service
        .refuse_deferred::<()>(&meta, operation, "", denial);
    // The answer is the same whatever the audit outcome; a failure to
    // record is the audit log's own error, logged there.
    let _ = api.service.finish_async(refused).await;
}

/// The address the listener is bound to, for banners and tests.
pub fn describe(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}
