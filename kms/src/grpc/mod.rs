//! gRPC handlers: decode and validate the request, run the domain operation
//! on a blocking thread, encode the reply. This is the only module that turns
//! errors into `tonic::Status`.

mod audit;
pub mod auth_layer;
mod convert;
mod crypto;
mod key_management;

use std::sync::Arc;

use tonic::{Code, Request, Status};

use crate::error::KmsError;
use crate::service::{Deferred, KmsService, RequestMeta};

pub use audit::AuditApi;
pub use crypto::CryptoApi;
pub use key_management::KeyManagementApi;

/// Metadata header carrying the caller's request id (echoed back).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

impl From<KmsError> for Status {
    fn from(error: KmsError) -> Status {
        let code = match error.code() {
            kms_storage::ResultCode::InvalidArgument => Code::InvalidArgument,
            kms_storage::ResultCode::NotFound => Code::NotFound,
            kms_storage::ResultCode::AlreadyExists => Code::AlreadyExists,
            kms_storage::ResultCode::FailedPrecondition => Code::FailedPrecondition,
            kms_storage::ResultCode::Unavailable => Code::Unavailable,
            kms_storage::ResultCode::ResourceExhausted => Code::ResourceExhausted,
            kms_storage::ResultCode::PermissionDenied => Code::PermissionDenied,
            kms_storage::ResultCode::Unauthenticated => Code::Unauthenticated,
            kms_storage::ResultCode::DeadlineExceeded => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        // Display of KmsError is caller-safe by construction (see error.rs).
        Status::new(code, error.to_string())
    }
}

/// The audit identity of a request: the principal the authentication layer
/// established, the peer address, and the caller's request id (if sane) or ours.
pub(crate) fn request_meta<T>(request: &Request<T>) -> Result<RequestMeta, Status> {
    // Every kms.v1 route passes the authentication layer; a request without
    // its mark is refused rather than given some default identity.
    let principal = request
        .extensions()
        .get::<auth_layer::Authenticated>()
        .map(|a| a.principal.clone())
        .ok_or_else(|| Status::unauthenticated("missing credentials"))?;
    let peer = request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    let request_id = request
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(new_request_id, str::to_owned);
    Ok(RequestMeta {
        principal,
        peer,
        request_id,
    })
}

fn new_request_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return "unavailable".to_owned();
    }
    hex::encode(bytes)
}

/// Runs blocking domain work (HSM and RocksDB calls) off the async executor.
pub(crate) async fn blocking<T: Send + 'static>(
    service: &Arc<KmsService>,
    work: impl FnOnce(&KmsService) -> Result<T, KmsError> + Send + 'static,
) -> Result<T, Status> {
    let service = Arc::clone(service);
    match tokio::task::spawn_blocking(move || work(&service)).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => {
            tracing::error!(error = %e, "blocking task failed");
            Err(Status::internal("internal error"))
        }
    }
}

/// Runs a key-use operation (Encrypt, Decrypt, GenerateDataKey, ReEncrypt)
/// and waits for its audit record without holding a thread.
///
/// The work itself runs on the calling executor thread: on this path it is
/// one HSM call with a cached handle and a few catalogue reads (tens of µs;
/// once per 4096 encryptions of a key version also one synced write that
/// reserves the next block of GCM invocation counts),
/// cheaper than the two thread hand-offs of `spawn_blocking`, which measured
/// as the largest cost per request. While the HSM is recovering (calls may
/// then wait on reconnects) the work goes to a blocking thread instead.
pub(crate) async fn key_use<T: Send + 'static>(
    service: &Arc<KmsService>,
    work: impl FnOnce(&KmsService) -> Deferred<T> + Send + 'static,
) -> Result<T, Status> {
    let deferred = if service.hsm().is_down() {
        let owned = Arc::clone(service);
        match tokio::task::spawn_blocking(move || work(&owned)).await {
            Ok(deferred) => deferred,
            Err(e) => {
                tracing::error!(error = %e, "blocking task failed");
                return Err(Status::internal("internal error"));
            }
        }
    } else {
        work(service)
    };
    service.finish_async(deferred).await.map_err(Status::from)
}

/// Adds the request id to a response.
pub(crate) fn respond<T>(message: T, meta: &RequestMeta) -> tonic::Response<T> {
    let mut response = tonic::Response::new(message);
    if let Ok(value) = meta.request_id.parse() {
        response.metadata_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Page sizes: 0 means the default; anything above the maximum is clamped.
pub(crate) fn page_size(requested: i32) -> Result<usize, Status> {
    match requested {
        0 => Ok(100),
        n if n < 0 => Err(Status::invalid_argument(
            "invalid page_size: must not be negative",
        )),
        n => Ok(usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(kms_storage::MAX_PAGE_SIZE)),
    }
}

pub(crate) fn page_token(token: &str) -> Option<&str> {
    (!token.is_empty()).then_some(token)
}
