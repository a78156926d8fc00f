//! Prometheus metrics, served on a separate port (`server.metrics_listen`).
//!
//! - `kms_requests_total{rpc, code}` and `kms_request_duration_seconds{rpc}`:
//!   every gRPC call, by method path and gRPC status;
//! - `kms_hsm_sessions{state="open|idle"}` and `kms_hsm_pool_size`: the
//!   session pool;
//! - `kms_hsm_expensive_calls{state}`: C_FindObjects searches and sessions
//!   opened, which must stay flat under load;
//! - `kms_hsm_operations_total{op}` and `kms_hsm_operation_microseconds_total{op}`:
//!   HSM calls and time spent in them (rate of one over the other = latency);
//! - `kms_working_keys{state="cached|capacity"}` and
//!   `kms_working_key_events_total{event="hit|unwrap|capacity_eviction|unusable_eviction"}`:
//!   the working-key cache of wrapped key versions (absent without a root key);
//!   hit rate = hit / (hit + unwrap);
//! - `kms_audit_batches_total`, `kms_audit_batch_writes_total`,
//!   `kms_audit_commit_microseconds_total`: group commit (writes per batch =
//!   batch size, time per batch = commit latency);
//! - `kms_audit_heads_published_total`, `kms_audit_head_publish_failures_total`,
//!   `kms_audit_head_read_failures_total`: a cluster node's audit head
//!   publishing at its checkpoints (absent on a single node).
//!
//! The request metrics are recorded as calls complete ([`MetricsLayer`]); the
//! others are read from the HSM and the audit writer when a scrape encodes them
//! (a prometheus-client [`Collector`], [`SampledMetrics`]), so nothing copies them
//! in by hand. The endpoint is hyper's HTTP/1.1 server ([`serve`]).
//!
//! Labels never carry request content.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::service::KmsService;

/// Prefix of every metric name.
const PREFIX: &str = "kms";
/// `Content-Type` of the exposition (the Prometheus text format).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
/// How long a scraper may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a request head, in bytes (hyper's minimum buffer size).
const MAX_REQUEST_HEAD: usize = 8192;

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
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The request metrics of one server, recorded by [`MetricsLayer`] as calls
/// complete. The sampled metrics are [`SampledMetrics`].
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcCodeLabels, Counter>,
    durations: Family<RpcLabels, Histogram>,
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
    /// Empty request metrics, registered under the `kms_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
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
        Metrics {
            registry,
            requests,
            durations,
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
}

/// What a scrape answers: the request metrics and a registry holding the
/// [`SampledMetrics`] collector.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    sampled: Registry,
}

impl Scrape {
    fn new(metrics: Arc<Metrics>, sampled: SampledMetrics) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(sampled));
        Scrape {
            metrics,
            sampled: registry,
        }
    }

    /// The text exposition; the sampled metrics are read now, while encoding.
    fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        let encoded = encode_registry(&mut out, &self.metrics.registry)
            .and_then(|()| encode_registry(&mut out, &self.sampled))
            .and_then(|()| encode_eof(&mut out));
        // Writing to a String cannot fail; an encoder error would be a bug in a
        // collector, and a partial exposition would mislead, so answer nothing.
        if encoded.is_err() {
            return String::new();
        }
        out
    }
}

/// The values of the sampled metrics at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sample {
    /// Configured HSM session pool size, sessions open for work, idle sessions.
    pool_size: u64,
    sessions_open: u64,
    sessions_idle: u64,
    /// C_FindObjects searches and sessions opened since start.
    object_searches: u64,
    sessions_opened: u64,
    /// Per PKCS#11 function: (name, calls, total microseconds), since start.
    operations: Vec<(String, u64, u64)>,
    /// Audit group commit since start: batches, writes in them, microseconds.
    audit_batches: u64,
    audit_batch_writes: u64,
    audit_commit_micros: u64,
    /// The working-key cache, if the service has wrapped versions.
    working_keys: Option<crate::service::WorkingKeyStats>,
    /// A cluster node's audit head publishing (none on a single node).
    audit_publish: Option<crate::service::audit_witness::PublishCounts>,
}

impl Sample {
    /// Reads the HSM pool and counters and the audit writer's statistics.
    fn of(service: &KmsService) -> Sample {
        let usage = service.hsm().pool_usage();
        let counters = service.hsm().counters();
        let audit = service.audit_stats();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Sample {
            pool_size: count(usage.size),
            sessions_open: count(usage.open),
            sessions_idle: count(usage.idle),
            object_searches: counters.object_searches,
            sessions_opened: counters.sessions_opened,
            operations: service
                .hsm()
                .operation_stats()
                .into_iter()
                .map(|s| (s.operation.to_string(), s.calls, s.total_micros))
                .collect(),
            audit_batches: audit.batches,
            audit_batch_writes: audit.writes,
            audit_commit_micros: audit.commit_micros,
            working_keys: service.working_key_stats(),
            audit_publish: service.audit_publish_counts(),
        }
    }

    /// Writes every sampled metric (names without the `kms_` prefix, which the
    /// registry adds; counters get `_total` from the encoder).
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let mut sessions = encoder.encode_descriptor(
            "hsm_sessions",
            "HSM sessions open for work, and idle",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [("open", self.sessions_open), ("idle", self.sessions_idle)] {
            gauge(value).encode(sessions.encode_family(&StateLabels { state })?)?;
        }
        gauge(self.pool_size).encode(encoder.encode_descriptor(
            "hsm_pool_size",
            "configured HSM session pool size",
            None,
            MetricType::Gauge,
        )?)?;
        let mut expensive = encoder.encode_descriptor(
            "hsm_expensive_calls",
            "C_FindObjects searches and sessions opened since start (flat under load)",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [
            ("object_searches", self.object_searches),
            ("sessions_opened", self.sessions_opened),
        ] {
            gauge(value).encode(expensive.encode_family(&StateLabels { state })?)?;
        }
        let mut operations = encoder.encode_descriptor(
            "hsm_operations",
            "HSM operations by PKCS#11 function",
            None,
            MetricType::Counter,
        )?;
        for (op, calls, _) in &self.operations {
            let labels = OpLabels { op: op.clone() };
            ConstCounter::new(*calls).encode(operations.encode_family(&labels)?)?;
        }
        let mut micros = encoder.encode_descriptor(
            "hsm_operation_microseconds",
            "time spent in HSM operations, by PKCS#11 function",
            None,
            MetricType::Counter,
        )?;
        for (op, _, total_micros) in &self.operations {
            let labels = OpLabels { op: op.clone() };
            ConstCounter::new(*total_micros).encode(micros.encode_family(&labels)?)?;
        }
        for (name, help, value) in [
            (
                "audit_batches",
                "audit group-commit batches written",
                self.audit_batches,
            ),
            (
                "audit_batch_writes",
                "audit records and checkpoints written in those batches",
                self.audit_batch_writes,
            ),
            (
                "audit_commit_microseconds",
                "time spent committing audit batches (fsync included)",
                self.audit_commit_micros,
            ),
        ] {
            ConstCounter::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        if let Some(p) = &self.audit_publish {
            for (name, help, value) in [
                (
                    "audit_heads_published",
                    "audit chain heads this cluster node published at its checkpoints",
                    p.published,
                ),
                (
                    "audit_head_publish_failures",
                    "audit chain heads that could not be published (the next checkpoint retries)",
                    p.publish_failures,
                ),
                (
                    "audit_head_read_failures",
                    "failed reads of the other nodes' audit heads (or malformed heads skipped)",
                    p.read_failures,
                ),
            ] {
                ConstCounter::new(value).encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    MetricType::Counter,
                )?)?;
            }
        }
        if let Some(keys) = &self.working_keys {
            let mut cached = encoder.encode_descriptor(
                "working_keys",
                "working keys (unwrapped key versions) cached in the HSM, and the cache's capacity",
                None,
                MetricType::Gauge,
            )?;
            for (state, value) in [("cached", keys.cached), ("capacity", keys.capacity)] {
                gauge(value).encode(cached.encode_family(&StateLabels { state })?)?;
            }
            let mut events = encoder.encode_descriptor(
                "working_key_events",
                "working-key cache hits, unwraps (misses) and evictions since start",
                None,
                MetricType::Counter,
            )?;
            for (event, value) in [
                ("hit", keys.hits),
                ("unwrap", keys.unwraps),
                ("capacity_eviction", keys.capacity_evictions),
                ("unusable_eviction", keys.unusable_evictions),
            ] {
                ConstCounter::new(value).encode(events.encode_family(&EventLabels { event })?)?;
            }
        }
        Ok(())
    }
}

/// The metrics sampled at scrape time (HSM session pool, expensive-call and
/// operation counters, audit group commit): a prometheus-client [`Collector`]
/// that reads its source each time the registry is encoded.
pub struct SampledMetrics {
    sample: Box<dyn Fn() -> Sample + Send + Sync>,
}

impl SampledMetrics {
    /// Samples `service`'s HSM and audit writer on every scrape.
    pub fn of_service(service: Arc<KmsService>) -> Self {
        SampledMetrics {
            sample: Box::new(move || Sample::of(&service)),
        }
    }
}

impl std::fmt::Debug for SampledMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SampledMetrics")
    }
}

impl Collector for SampledMetrics {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        (self.sample)().encode(encoder)
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped, with hyper's
/// HTTP/1.1 server: one request per connection, the request head bounded in
/// size ([`MAX_REQUEST_HEAD`]) and time ([`HEADER_READ_TIMEOUT`]). Any other
/// method or path is answered 404.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, service: Arc<KmsService>) {
    let scrape = Arc::new(Scrape::new(metrics, SampledMetrics::of_service(service)));
    serve_exposition(listener, move || scrape.render()).await;
}

/// The HTTP side of [`serve`], over any source of the exposition text.
async fn serve_exposition<F>(listener: TcpListener, render: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let respond = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let response = respond(&request, &*render);
                async move { Ok::<_, Infallible>(response) }
            });
            // A failed connection concerns only that scraper: nothing to report.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), respond)
                .await;
        });
    }
}

/// 200 with the exposition for `GET /metrics` (any query), else an empty 404.
fn respond<B>(
    request: &http::Request<B>,
    render: &dyn Fn() -> String,
) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::new()));
    if request.method() == http::Method::GET && request.uri().path() == "/metrics" {
        *response.body_mut() = Full::new(Bytes::from(render()));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(CONTENT_TYPE),
        );
    } else {
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        // Explicit, so that a HEAD gets it too (hyper omits it there).
        response.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("0"),
        );
    }
    response
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
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

    fn sample(audit_batches: u64) -> Sample {
        Sample {
            pool_size: 4,
            sessions_open: 3,
            sessions_idle: 1,
            object_searches: 7,
            sessions_opened: 5,
            operations: vec![
                ("C_GenerateKey".to_owned(), 2, 1500),
                ("C_Encrypt".to_owned(), 9, 300),
            ],
            audit_batches,
            audit_batch_writes: 12,
            audit_commit_micros: 4000,
            working_keys: Some(crate::service::WorkingKeyStats {
                cached: 10,
                capacity: 1024,
                hits: 90,
                unwraps: 11,
                capacity_evictions: 1,
                unusable_evictions: 2,
            }),
            audit_publish: Some(crate::service::audit_witness::PublishCounts {
                published: 6,
                publish_failures: 1,
                read_failures: 2,
            }),
        }
    }

    /// A scrape whose audit batch count is read from `batches` at encode time.
    fn scrape(batches: Arc<AtomicU64>) -> Scrape {
        let sampled = SampledMetrics {
            sample: Box::new(move || sample(batches.load(Ordering::Relaxed))),
        };
        Scrape::new(Arc::new(Metrics::new()), sampled)
    }

    #[test]
    fn sampled_metrics_are_read_when_the_scrape_is_encoded() {
        let batches = Arc::new(AtomicU64::new(0));
        let scrape = scrape(Arc::clone(&batches));
        scrape
            .metrics
            .observe("/kms.v1.Crypto/Encrypt", "OK", 0.001);
        let first = scrape.render();
        for line in [
            "kms_requests_total{rpc=\"/kms.v1.Crypto/Encrypt\",code=\"OK\"} 1\n",
            "# TYPE kms_hsm_sessions gauge\n",
            "kms_hsm_sessions{state=\"open\"} 3\n",
            "kms_hsm_sessions{state=\"idle\"} 1\n",
            "# TYPE kms_hsm_pool_size gauge\n",
            "kms_hsm_pool_size 4\n",
            "kms_hsm_expensive_calls{state=\"object_searches\"} 7\n",
            "kms_hsm_expensive_calls{state=\"sessions_opened\"} 5\n",
            "# TYPE kms_hsm_operations counter\n",
            "kms_hsm_operations_total{op=\"C_GenerateKey\"} 2\n",
            "kms_hsm_operations_total{op=\"C_Encrypt\"} 9\n",
            "kms_hsm_operation_microseconds_total{op=\"C_GenerateKey\"} 1500\n",
            "kms_hsm_operation_microseconds_total{op=\"C_Encrypt\"} 300\n",
            "kms_audit_batches_total 0\n",
            "kms_audit_heads_published_total 6\n",
            "kms_audit_head_publish_failures_total 1\n",
            "kms_audit_head_read_failures_total 2\n",
            "kms_audit_batch_writes_total 12\n",
            "kms_audit_commit_microseconds_total 4000\n",
            "kms_working_keys{state=\"cached\"} 10\n",
            "kms_working_keys{state=\"capacity\"} 1024\n",
            "kms_working_key_events_total{event=\"hit\"} 90\n",
            "kms_working_key_events_total{event=\"unwrap\"} 11\n",
            "kms_working_key_events_total{event=\"capacity_eviction\"} 1\n",
            "kms_working_key_events_total{event=\"unusable_eviction\"} 2\n",
        ] {
            assert!(first.contains(line), "missing {line:?} in\n{first}");
        }
        assert!(first.ends_with("# EOF\n"), "{first}");
        assert_eq!(first.matches("# EOF").count(), 1, "{first}");
        // Nothing is copied in: the next scrape sees the new value.
        batches.store(41, Ordering::Relaxed);
        let second = scrape.render();
        assert!(second.contains("kms_audit_batches_total 41\n"), "{second}");
        assert!(!second.contains("kms_audit_batches_total 0\n"), "{second}");
    }

    /// Sends `request` to a fresh endpoint and reads until the server closes.
    /// I/O errors are ignored (the server may reset a connection it refused
    /// before reading it all): the callers check what came back.
    async fn exchange(request: &[u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let scrape = scrape(Arc::new(AtomicU64::new(3)));
        let server = tokio::spawn(serve_exposition(listener, move || scrape.render()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = stream.write_all(request).await;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .expect("the server closes the connection after one response");
        server.abort();
        String::from_utf8_lossy(&response).into_owned()
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition_and_closes() {
        for path in ["/metrics", "/metrics?name=kms"] {
            let response =
                exchange(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
            assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
            assert_eq!(header(&response, "content-type"), Some(CONTENT_TYPE));
            assert_eq!(header(&response, "connection"), Some("close"));
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, body)| body)
                .expect("body");
            assert_eq!(
                header(&response, "content-length"),
                Some(body.len().to_string().as_str())
            );
            assert!(body.contains("kms_audit_batches_total 3\n"), "{body}");
            assert!(body.ends_with("# EOF\n"), "{body}");
        }
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_not_found() {
        for request in [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let response = exchange(request.as_bytes()).await;
            assert!(
                response.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{request:?}: {response}"
            );
            assert_eq!(
                header(&response, "content-length"),
                Some("0"),
                "{request:?}"
            );
            assert!(!response.contains("kms_"), "{request:?}: {response}");
        }
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_get_no_exposition() {
        let oversized = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(2 * MAX_REQUEST_HEAD)
        );
        for request in ["not http at all\r\n\r\n", oversized.as_str()] {
            let response = exchange(request.as_bytes()).await;
            assert!(!response.contains("kms_"), "{response}");
            assert!(!response.starts_with("HTTP/1.1 200"), "{response}");
        }
    }
}
