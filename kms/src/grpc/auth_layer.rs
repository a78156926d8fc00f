//! Authentication and admission for every kms.v1 call, before any handler
//! (and before the request body is decoded): the caller's credentials become
//! its principal, the admission limits are applied, and the principal travels
//! to the handler in the request extensions. Health checks and reflection
//! stay open (they reveal nothing but the public API shape).
//!
//! Refusals here are answered at once (UNAUTHENTICATED or RESOURCE_EXHAUSTED)
//! and are not audit records: no key is touched, and an unauthenticated flood
//! must not be able to fill the audit log. They are logged and counted in the
//! request metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::server::TcpConnectInfo;

use crate::auth::Authenticator;
use crate::auth::admission::Admission;
use crate::auth::certs::ClientCertificates;

/// The authenticated principal of a request (in its extensions).
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: String,
}

/// Only calls to our own services are authenticated.
const PROTECTED_PREFIX: &str = "/kms.v1.";

#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
    admission: Arc<Admission>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>, admission: Arc<Admission>) -> Self {
        AuthLayer {
            authenticator,
            admission,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !request.uri().path().starts_with(PROTECTED_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        let peer = peer_of(&request);
        let principal = {
            let authorization = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes);
            let leaf = request
                .extensions()
                .get::<ClientCertificates>()
                .and_then(ClientCertificates::leaf);
            self.layer.authenticator.authenticate(authorization, leaf)
        };
        let principal = match principal {
            Ok(principal) => principal,
            Err(e) => {
                tracing::info!(peer = %peer, path = request.uri().path(), reason = %e, "unauthenticated request refused");
                return refuse(Status::unauthenticated(e.to_string()));
            }
        };
        let permit = match self.layer.admission.admit(&principal) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::info!(peer = %peer, principal = %principal, reason = %refusal, "request not admitted");
                return refuse(Status::resource_exhausted(refusal.to_string()));
            }
        };
        request.extensions_mut().insert(Authenticated { principal });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(permit);
            response
        })
    }
}

/// A refusal answered by the layer itself, before any handler: `status`
/// as a gRPC response (HTTP 200 with grpc-status in the headers).
pub(super) fn refuse<R, E>(
    status: Status,
) -> Pin<Box<dyn Future<Output = Result<http::Response<R>, E>> + Send>>
where
    R: Default + Send + 'static,
    E: Send + 'static,
{
    let response = status.into_http::<R>();
    Box::pin(std::future::ready(Ok(response)))
}

fn peer_of<B>(request: &http::Request<B>) -> String {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string())
}
