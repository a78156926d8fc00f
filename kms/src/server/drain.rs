//! Graceful shutdown's first step: once the server is draining, requests
//! that arrive on connections still open (before the client has seen the
//! HTTP/2 GOAWAY) are answered UNAVAILABLE at once, so that clients retry
//! elsewhere and the requests in flight are the only ones left to finish.
//! Health checks and reflection still answer. The Kubernetes plugin sockets
//! share the same drain.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tonic::Status;

/// Only calls to our own services (kms.v1 and the Kubernetes plugin API,
/// package v2) are refused while draining.
const REFUSED_PREFIXES: [&str; 2] = ["/kms.v1.", "/v2."];

/// Whether the server is draining; shared by the layer and the shutdown.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    draining: Arc<AtomicBool>,
}

impl Drain {
    /// From now on, new kms.v1 requests are answered UNAVAILABLE.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

impl<S> tower::Layer<S> for Drain {
    type Service = DrainService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            drain: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrainService<S> {
    inner: S,
    drain: Drain,
}

impl<S, B, R> tower::Service<http::Request<B>> for DrainService<S>
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if self.drain.is_draining() && REFUSED_PREFIXES.iter().any(|p| path.starts_with(p)) {
            let response =
                Status::unavailable("the server is shutting down; retry").into_http::<R>();
            return Box::pin(std::future::ready(Ok(response)));
        }
        Box::pin(self.inner.call(request))
    }
}
