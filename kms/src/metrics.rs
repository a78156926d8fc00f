//! Prometheus metrics, served on a separate port (`server.metrics_listen`).
//!
//! - `kms_requests_total{rpc, code}` and `kms_request_duration_seconds{rpc}`:
//!   every gRPC call, by method path and gRPC status;
//! - `kms_hsm_sessions{state="open|idle"}` and `kms_hsm_pool_size`: the
//!   session pool, sampled at scrape time;
//! - `kms_hsm_expensive_calls{state}`: C_FindObjects searches and sessions
//!   opened, which must stay flat under load;
//! - `kms_hsm_operations_total{op}` and `kms_hsm_operation_seconds_total{op}`:
//!   HSM calls and time spent in them (rate of one over the other = latency);
//! - `kms_audit_batches_total`, `kms_audit_batch_writes_total`,
//!   `kms_audit_commit_seconds_total`: group commit (writes per batch = batch
//!   size, seconds per batch = commit latency).
//!
//! Labels never carry request content.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::service::KmsService;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCodeLabels {
    rpc: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The metrics of one server.
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcCodeLabels, Counter>,
    durations: Family<RpcLabels, Histogram>,
    sessions: Family<StateLabels, Gauge>,
    pool_size: Gauge,
    hsm_counters: Family<StateLabels, Gauge>,
    hsm_operations: Family<OpLabels, Counter>,
    hsm_operation_micros: Family<OpLabels, Counter>,
    audit_batches: Counter,
    audit_batch_writes: Counter,
    audit_commit_micros: Counter,
    /// Method paths that get their own label; anything else is "other", so a
    /// client sending made-up paths cannot grow the label set without bound.
    known_rpcs: std::collections::HashSet<String>,
}

/// "/package.Service/Method" of every method in our descriptor sets (the
/// kms.v1 API and grpc.health.v1), plus the reflection streams.
fn known_rpcs() -> std::collections::HashSet<String> {
    use prost::Message as _;
    let mut known = std::collections::HashSet::new();
    for set in [
        kms_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let name = service.name.unwrap_or_default();
                for method in service.method {
                    known.insert(format!(
                        "/{package}.{name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
    }
    known.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned());
    known.insert("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".to_owned());
    known
}

/// Advances a counter to a sampled monotonic total.
fn advance(counter: &Counter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kms");
        let requests = Family::<RpcCodeLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        let durations = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~3 s
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "gRPC request latency",
            durations.clone(),
        );
        let sessions = Family::<StateLabels, Gauge>::default();
        registry.register(
            "hsm_sessions",
            "HSM sessions open for work, and idle",
            sessions.clone(),
        );
        let pool_size = Gauge::default();
        registry.register(
            "hsm_pool_size",
            "configured HSM session pool size",
            pool_size.clone(),
        );
        let hsm_counters = Family::<StateLabels, Gauge>::default();
        registry.register(
            "hsm_expensive_calls",
            "C_FindObjects searches and sessions opened since start (flat under load)",
            hsm_counters.clone(),
        );
        let hsm_operations = Family::<OpLabels, Counter>::default();
        registry.register(
            "hsm_operations",
            "HSM operations by PKCS#11 function",
            hsm_operations.clone(),
        );
        let hsm_operation_micros = Family::<OpLabels, Counter>::default();
        registry.register(
            "hsm_operation_microseconds",
            "time spent in HSM operations, by PKCS#11 function",
            hsm_operation_micros.clone(),
        );
        let audit_batches = Counter::default();
        registry.register(
            "audit_batches",
            "audit group-commit batches written",
            audit_batches.clone(),
        );
        let audit_batch_writes = Counter::default();
        registry.register(
            "audit_batch_writes",
            "audit records and checkpoints written in those batches",
            audit_batch_writes.clone(),
        );
        let audit_commit_micros = Counter::default();
        registry.register(
            "audit_commit_microseconds",
            "time spent committing audit batches (fsync included)",
            audit_commit_micros.clone(),
        );
        Metrics {
            registry,
            requests,
            durations,
            sessions,
            pool_size,
            hsm_counters,
            hsm_operations,
            hsm_operation_micros,
            audit_batches,
            audit_batch_writes,
            audit_commit_micros,
            known_rpcs: known_rpcs(),
        }
    }

    fn observe(&self, rpc: &str, code: &str, seconds: f64) {
        let rpc = if self.known_rpcs.contains(rpc) {
            rpc
        } else {
            "other"
        };
        self.requests
            .get_or_create(&RpcCodeLabels {
                rpc: rpc.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.durations
            .get_or_create(&RpcLabels {
                rpc: rpc.to_owned(),
            })
            .observe(seconds);
    }

    /// The text exposition, sampling the HSM gauges now.
    pub fn render(&self, service: &KmsService) -> String {
        let usage = service.hsm().pool_usage();
        let counters = service.hsm().counters();
        self.pool_size
            .set(i64::try_from(usage.size).unwrap_or(i64::MAX));
        self.sessions
            .get_or_create(&StateLabels { state: "open" })
            .set(i64::try_from(usage.open).unwrap_or(i64::MAX));
        self.sessions
            .get_or_create(&StateLabels { state: "idle" })
            .set(i64::try_from(usage.idle).unwrap_or(i64::MAX));
        self.hsm_counters
            .get_or_create(&StateLabels {
                state: "object_searches",
            })
            .set(i64::try_from(counters.object_searches).unwrap_or(i64::MAX));
        self.hsm_counters
            .get_or_create(&StateLabels {
                state: "sessions_opened",
            })
            .set(i64::try_from(counters.sessions_opened).unwrap_or(i64::MAX));
        for stats in service.hsm().operation_stats() {
            let labels = OpLabels {
                op: stats.operation.to_string(),
            };
            advance(&self.hsm_operations.get_or_create(&labels), stats.calls);
            advance(
                &self.hsm_operation_micros.get_or_create(&labels),
                stats.total_micros,
            );
        }
        let audit = service.audit_stats();
        advance(&self.audit_batches, audit.batches);
        advance(&self.audit_batch_writes, audit.writes);
        advance(&self.audit_commit_micros, audit.commit_micros);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            return String::new();
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. A tiny
/// HTTP/1.1 responder: one request per connection, bounded header size.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, service: Arc<KmsService>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let response = if head.starts_with(b"GET /metrics ")
                || head.starts_with(b"GET /metrics?")
            {
                let body = metrics.render(&service);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// A tower layer recording every gRPC call.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = request.uri().path().to_owned();
        let started = Instant::now();
        let metrics = Arc::clone(&self.metrics);
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            // Errors come back "trailers-only": grpc-status in the headers.
            // A success carries its status in the trailers, sent later.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", |c| kms_proto::code_name(tonic::Code::from_i32(c))),
                Err(_) => "TRANSPORT_ERROR",
            };
            metrics.observe(&rpc, code, started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_methods_get_their_own_label() {
        let known = known_rpcs();
        for path in [
            "/kms.v1.Crypto/Encrypt",
            "/kms.v1.KeyManagement/PutKeyPolicy",
            "/kms.v1.Audit/VerifyAuditLog",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(known.contains(path), "{path}");
        }
        assert!(!known.contains("/kms.v1.Crypto/MadeUp"));
        let metrics = Metrics::new();
        for i in 0..100 {
            metrics.observe(&format!("/x.Y/Z{i}"), "UNIMPLEMENTED", 0.001);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("encode");
        assert!(!text.contains("/x.Y/Z"), "made-up paths became labels");
        assert!(text.contains("rpc=\"other\""), "{text}");
    }
}
