//! gRPC handlers: decode and validate the request, run the domain operation
//! on a blocking thread, encode the reply. This is the only module that turns
//! errors into `tonic::Status`.

mod admin;
mod audit;
pub mod auth_layer;
mod convert;
mod crypto;
mod key_management;
pub mod kubernetes;

use std::sync::Arc;

use kms_proto::v1 as pb;
use kms_storage::ResultCode;
use tonic::{Code, Request, Status};
use tracing::{Instrument, Span};

use crate::error::KmsError;
use crate::service::{Deferred, KmsService, Operation, RequestMeta, operation};

pub use admin::AdminApi;
pub use audit::{AuditApi, WatchRevoke, WatchStop};
pub use crypto::CryptoApi;
pub use key_management::KeyManagementApi;
pub use kubernetes::{KubernetesApi, PeerCredLayer};

/// Metadata header carrying the caller's request id (echoed back).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The one conversion of a domain error into a status: the code through
/// its numeric value (the audit log's `ResultCode` numbers are gRPC's), the
/// message from Display, which is caller-safe by construction (generic for
/// INTERNAL and UNAVAILABLE; see `error.rs`). No side effects: logging is
/// the request boundary's job ([`Rpc`]).
impl From<KmsError> for Status {
    fn from(error: KmsError) -> Status {
        Status::new(status_code(error.code()), error.to_string())
    }
}

/// A storage `ResultCode` as a `tonic::Code` (same numbers, 0-16).
pub(crate) fn status_code(code: ResultCode) -> Code {
    Code::from(i32::from(code.as_u8()))
}

/// One RPC in flight: its audit identity and its tracing span. Every
/// handler starts one, runs its domain work through it and answers through
/// it, so that every log line about the request (the service's, the HSM
/// layer's, the error's) carries rpc, request id and principal, and a
/// failure is logged once, with its cause, where the request is known.
#[derive(Debug)]
pub(crate) struct Rpc {
    pub(crate) meta: RequestMeta,
    operation: Operation,
    span: Span,
}

impl Rpc {
    /// The audit identity of a request (the principal the authentication
    /// layer established, the peer address, the caller's request id if sane
    /// or ours) and its span.
    ///
    /// # Errors
    /// UNAUTHENTICATED if the request did not pass the authentication layer.
    pub(crate) fn start<T>(rpc: Operation, request: &Request<T>) -> Result<Rpc, Status> {
        Ok(Rpc::with_meta(rpc, request_meta(request)?))
    }

    /// An RPC whose audit identity the caller established (a door with its
    /// own notion of peer and request id: the Kubernetes plugin socket).
    pub(crate) fn with_meta(rpc: Operation, meta: RequestMeta) -> Rpc {
        let span = tracing::info_span!(
            "rpc",
            rpc = operation::name(rpc),
            request_id = %meta.request_id,
            principal = %meta.principal,
        );
        Rpc {
            meta,
            operation: rpc,
            span,
        }
    }

    /// Runs blocking domain work (HSM and RocksDB calls) off the async
    /// executor, inside the request's span.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        service: &Arc<KmsService>,
        work: impl FnOnce(&KmsService, &RequestMeta) -> Result<T, KmsError> + Send + 'static,
    ) -> Result<T, Status> {
        self.blocking_domain(service, work)
            .await
            .map_err(|e| self.fail(e))
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
        &self,
        service: &Arc<KmsService>,
        work: impl FnOnce(&KmsService, &RequestMeta) -> Deferred<T> + Send + 'static,
    ) -> Result<T, Status> {
        self.key_use_domain(service, work)
            .await
            .map_err(|e| self.fail(e))
    }

    /// A value converted from the request, or, if the conversion refused the
    /// request (a malformed field, an unsupported value), that refusal: it
    /// is audited like any other (one record, naming `named_key` if the
    /// request named one, "" if not), logged, and returned as the status.
    /// Every check a handler makes before the domain call goes through here,
    /// so that no request leaves without its audit record.
    pub(crate) async fn valid<T>(
        &self,
        service: &Arc<KmsService>,
        named_key: &str,
        converted: Result<T, KmsError>,
    ) -> Result<T, Status> {
        let error = match converted {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let refused = service.refuse_deferred::<()>(&self.meta, self.operation, named_key, error);
        match service
            .finish_async(refused)
            .instrument(self.span.clone())
            .await
        {
            Err(error) => Err(self.fail(error)),
            // refuse_deferred never succeeds; kept total rather than panicking.
            Ok(()) => Err(self.fail(KmsError::invalid("request", "refused"))),
        }
    }

    /// [`Rpc::blocking`] for a door that maps domain errors itself (the
    /// AWS KMS API): the error is returned unlogged, for the caller to log
    /// once with [`Rpc::log_failure`] as it answers.
    pub(crate) async fn blocking_domain<T: Send + 'static>(
        &self,
        service: &Arc<KmsService>,
        work: impl FnOnce(&KmsService, &RequestMeta) -> Result<T, KmsError> + Send + 'static,
    ) -> Result<T, KmsError> {
        let service = Arc::clone(service);
        let meta = self.meta.clone();
        let span = self.span.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            work(&service, &meta)
        })
        .instrument(self.span.clone())
        .await;
        joined.unwrap_or_else(|e| Err(self.join_failed(&e)))
    }

    /// [`Rpc::key_use`] for a door that maps domain errors itself (see
    /// [`Rpc::blocking_domain`]).
    pub(crate) async fn key_use_domain<T: Send + 'static>(
        &self,
        service: &Arc<KmsService>,
        work: impl FnOnce(&KmsService, &RequestMeta) -> Deferred<T> + Send + 'static,
    ) -> Result<T, KmsError> {
        let deferred = if service.hsm().is_down() {
            let owned = Arc::clone(service);
            let meta = self.meta.clone();
            let span = self.span.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                work(&owned, &meta)
            })
            .await;
            match joined {
                Ok(deferred) => deferred,
                Err(e) => return Err(self.join_failed(&e)),
            }
        } else {
            let _entered = self.span.enter();
            work(service, &self.meta)
        };
        service
            .finish_async(deferred)
            .instrument(self.span.clone())
            .await
    }

    /// [`Rpc::valid`] for a door that maps domain errors itself: a refused
    /// conversion is audited (one record, naming `named_key`) and returned
    /// unlogged.
    pub(crate) async fn valid_domain<T>(
        &self,
        service: &Arc<KmsService>,
        named_key: &str,
        converted: Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let error = match converted {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let refused = service.refuse_deferred::<()>(&self.meta, self.operation, named_key, error);
        match service
            .finish_async(refused)
            .instrument(self.span.clone())
            .await
        {
            Err(error) => Err(error),
            Ok(()) => Err(KmsError::invalid("request", "refused")),
        }
    }

    /// Logs a failed request's error once, in the span (as [`Rpc::fail`]
    /// does), for doors that answer in their own error shape.
    pub(crate) fn log_failure(&self, error: &KmsError) {
        self.log(error);
    }

    fn join_failed(&self, error: &tokio::task::JoinError) -> KmsError {
        let _entered = self.span.enter();
        tracing::error!(%error, "blocking task failed");
        KmsError::Internal {
            what: "blocking task failed",
        }
    }

    /// The status for a failed request, logged once here, in the span:
    /// server-side failures with their whole cause chain, the caller's
    /// mistakes and refusals at debug level (the audit log has them).
    pub(crate) fn fail(&self, error: KmsError) -> Status {
        self.log(&error);
        Status::from(error)
    }

    /// The status of one failed batch item (logged like a request's error).
    pub(crate) fn item_status(&self, error: KmsError) -> pb::ItemStatus {
        let status = self.fail(error);
        pb::ItemStatus {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }
    }

    fn log(&self, error: &KmsError) {
        let _entered = self.span.enter();
        match error.code() {
            ResultCode::Unavailable => {
                tracing::warn!(error = %error.chain(), "request failed: unavailable");
            }
            ResultCode::Internal => tracing::error!(error = %error.chain(), "request failed"),
            code => tracing::debug!(code = code.as_str(), error = %error, "request refused"),
        }
    }

    /// The request's span (for work that outlives the handler, e.g. a stream).
    pub(crate) fn span(&self) -> Span {
        self.span.clone()
    }

    /// The reply, with the request id in its metadata.
    pub(crate) fn respond<T>(&self, message: T) -> Result<tonic::Response<T>, Status> {
        let mut response = tonic::Response::new(message);
        if let Ok(value) = self.meta.request_id.parse() {
            response.metadata_mut().insert(REQUEST_ID_HEADER, value);
        }
        Ok(response)
    }
}

/// The audit identity of a request: the principal the authentication layer
/// established, the peer address, and the caller's request id (if sane) or ours.
fn request_meta<T>(request: &Request<T>) -> Result<RequestMeta, Status> {
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
        .filter(|v| is_sane_request_id(v))
        .map_or_else(new_request_id, str::to_owned);
    Ok(RequestMeta {
        principal,
        peer,
        request_id,
    })
}

/// Whether a caller's request id is recorded as given: 1 to 128 printable
/// ASCII characters, no spaces (else the server makes one).
pub(crate) fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

pub(crate) fn new_request_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return "unavailable".to_owned();
    }
    hex::encode(bytes)
}

/// Page sizes: 0 means the default (100); anything above the maximum
/// ([`kms_storage::MAX_PAGE_SIZE`]) is clamped.
///
/// # Errors
/// INVALID_ARGUMENT for a negative size.
pub(crate) fn page_size(requested: i32) -> Result<usize, KmsError> {
    match requested {
        0 => Ok(100),
        n if n < 0 => Err(KmsError::invalid("page_size", "must not be negative")),
        n => Ok(usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(kms_storage::MAX_PAGE_SIZE)),
    }
}

/// A request's optional string field (page token, filter): empty means absent.
/// Page tokens themselves are opaque, versioned and bound to their listing
/// and filters; the service decodes and checks them (`service::page_token`)
/// inside the audited path, so a bad token is recorded like any refusal.
pub(crate) fn page_token(token: &str) -> Option<&str> {
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_are_grpc_codes_by_number_and_by_name() {
        let mut seen = 0;
        for number in 0..=u8::MAX {
            let Some(code) = ResultCode::from_u8(number) else {
                continue;
            };
            seen += 1;
            let status = status_code(code);
            assert_eq!(status as i32, i32::from(number));
            assert_eq!(code.as_str(), kms_proto::code_name(status), "{number}");
        }
        assert_eq!(seen, 17);
    }
}
