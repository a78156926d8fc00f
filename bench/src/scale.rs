//! `kms-bench scale`: wrapped key versions at scale (issue 14 item 7), in
//! one invocation, on one dev data directory:
//!
//! 1. A server started with `--token-object-versions` creates one key whose
//!    version is a token object; the server measured afterwards (default
//!    dev mode, new versions wrapped under the root, `--working-key-cache`
//!    as given) holds both kinds. Rows: Encrypt 32B through a token-object
//!    key and through a wrapped key (a session working key), and their ratio.
//! 2. `--keys` keys (10,000) are created, `--create-concurrency` at a time.
//! 3. First use: one Encrypt on each of `--cold` keys never used before, one
//!    call at a time (each is an unwrap in the HSM: checked against the
//!    server's counters), p50/p99, next to the same call on a warm key.
//! 4. Encrypt 32B on a key drawn at random among all `--keys` with a cache
//!    of `--working-key-cache` (smaller): ops/s, p50/p99, and the hit rate
//!    from the server's `kms_working_key_events_total`.
//! 5. h2load (Debian's nghttp2-client), HTTP/2 with a prepared gRPC body
//!    (5-byte frame prefix + protobuf request, `content-type:
//!    application/grpc`, `te: trailers`) against the same server: the
//!    server's CPU time per call (utime+stime of /proc/PID/stat before and
//!    after ÷ calls) for the gRPC no-op (health check), Encrypt under the
//!    wrapped and the token-object key, and Decrypt under the wrapped key.
//!    h2load counts HTTP 200 even for gRPC errors, so every row checks
//!    that the server's `kms_requests_total{code="OK"}` grew by exactly the calls h2load completed, and by nothing else. The
//!    raw HSM's CPU time per AES-GCM encrypt (kms-hsm's baseline on the
//!    same token, one thread in this process) gives the overhead ratio:
//!    server CPU per Encrypt ÷ (server CPU per no-op + raw HSM per call).
//!
//! Every step is bounded in count or time; the children are killed on exit.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use kms_hsm::PinSource;
use kms_hsm::baseline::{Baseline, BaselineOp};
use kms_hsm::softhsm::SoftHsmHome;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use prost::Message;
use tonic::transport::Channel;

use crate::load::{AsyncCall, Limits, Measurement, drive_async, drive_threads};
use crate::server::{CPU_TICK, CpuProbe, ServerProcess, locate_kms_binary};
use crate::workloads::{SMALL, connect};

/// One line of the report on stdout; a failed write (stdout closed) is
/// ignored rather than failing the measurements.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const ENCRYPT_PATH: &str = "/kms.v1.Crypto/Encrypt";
const DECRYPT_PATH: &str = "/kms.v1.Crypto/Decrypt";
const NOOP_PATH: &str = "/grpc.health.v1.Health/Check";

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    /// Keys created for the random-key row.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// The server's working-key cache (`--working-key-cache` of kms serve --dev).
    #[arg(long, default_value_t = 1024)]
    working_key_cache: usize,
    /// Keys used once each for the first-use (cold) row (at most --keys).
    #[arg(long, default_value_t = 1000)]
    cold: usize,
    /// Concurrent CreateKey calls while making the keys.
    #[arg(long, default_value_t = 64)]
    create_concurrency: usize,
    /// Client tasks of the gRPC rows.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds measured per gRPC row (after 0.5 s of warm-up).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Requests per h2load row.
    #[arg(long, default_value_t = 30_000)]
    h2load_requests: u64,
    /// h2load clients (connections) and streams per connection.
    #[arg(long, default_value_t = 4)]
    h2load_clients: usize,
    #[arg(long, default_value_t = 32)]
    h2load_streams: usize,
    /// Skip the h2load rows.
    #[arg(long)]
    no_h2load: bool,
    /// Where the data directory goes (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The kms binary to start (default: `kms` next to kms-bench).
    #[arg(long)]
    kms_binary: Option<PathBuf>,
}

fn encrypt_request(key_id: &str) -> pb::EncryptRequest {
    pb::EncryptRequest {
        key_id: key_id.to_owned(),
        plaintext: vec![0xa5; SMALL],
        encryption_context: [("app".to_owned(), "kms-bench".to_owned())].into(),
    }
}

/// Encrypt under one key, again and again.
struct FixedEncrypt {
    crypto: CryptoClient<Channel>,
    request: pb::EncryptRequest,
}

impl AsyncCall for FixedEncrypt {
    async fn call(&mut self) -> Result<u64, String> {
        self.crypto
            .encrypt(self.request.clone())
            .await
            .map(|_| 1)
            .map_err(|s| format!("Encrypt: {:?}: {}", s.code(), s.message()))
    }
}

/// Encrypt under a key drawn at random (xorshift64*, seeded per task).
struct RandomEncrypt {
    crypto: CryptoClient<Channel>,
    keys: Arc<Vec<String>>,
    state: u64,
}

impl AsyncCall for RandomEncrypt {
    async fn call(&mut self) -> Result<u64, String> {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let draw = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let index = usize::try_from(draw % self.keys.len() as u64).unwrap_or(0);
        self.crypto
            .encrypt(encrypt_request(&self.keys[index]))
            .await
            .map(|_| 1)
            .map_err(|s| format!("Encrypt: {:?}: {}", s.code(), s.message()))
    }
}

async fn create_key(keys: &mut KeyManagementClient<Channel>, what: &str) -> anyhow::Result<String> {
    keys.create_key(pb::CreateKeyRequest {
        description: what.to_owned(),
        ..Default::default()
    })
    .await
    .map_err(|s| anyhow::anyhow!("CreateKey: {s}"))?
    .into_inner()
    .key_metadata
    .map(|m| m.key_id)
    .context("CreateKey returned no metadata")
}

/// The server's metrics, scraped over HTTP/1.1 (`Connection: close`).
#[derive(Debug, Clone)]
struct Scrape {
    /// Metric line (name and labels) → value.
    lines: BTreeMap<String, f64>,
}

impl Scrape {
    fn take(addr: SocketAddr) -> anyhow::Result<Scrape> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to metrics on {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: kms\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .context("no metrics body")?;
        let lines = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Ok(Scrape { lines })
    }

    fn value(&self, line: &str) -> f64 {
        self.lines.get(line).copied().unwrap_or(0.0)
    }

    fn event(&self, event: &str) -> f64 {
        self.value(&format!(
            "kms_working_key_events_total{{event=\"{event}\"}}"
        ))
    }

    /// (calls answered OK, calls answered anything else) of the RPC `path`.
    fn rpc_codes(&self, path: &str) -> (f64, f64) {
        let prefix = format!("kms_requests_total{{rpc=\"{path}\",code=\"");
        let mut ok = 0.0;
        let mut other = 0.0;
        for (line, value) in &self.lines {
            if let Some(rest) = line.strip_prefix(&prefix) {
                if rest.starts_with("OK\"") {
                    ok += value;
                } else {
                    other += value;
                }
            }
        }
        (ok, other)
    }
}

/// The dev server of this run, with its metrics endpoint.
struct Server {
    process: ServerProcess,
    metrics: SocketAddr,
}

fn start(kms: &Path, data: &Path, args: &[String]) -> anyhow::Result<Server> {
    let mut all = vec!["--metrics-listen".to_owned(), "127.0.0.1:0".to_owned()];
    all.extend_from_slice(args);
    let process = ServerProcess::start_with(kms, data, true, &all)?;
    let metrics = process
        .metrics
        .context("the server printed no metrics address")?;
    eprintln!(
        "kms-bench scale: server pid {} on {}",
        process.pid(),
        process.endpoint()
    );
    Ok(Server { process, metrics })
}

fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn cpu_us_per_call(ticks: Option<u64>, calls: u64) -> Option<f64> {
    let ticks = ticks?;
    (calls > 0).then(|| ticks as f64 * CPU_TICK.as_secs_f64() * 1e6 / calls as f64)
}

fn print_row(name: &str, c: usize, m: &Measurement) {
    let secs = m.elapsed.as_secs_f64().max(1e-9);
    let cpu = cpu_us_per_call(m.server_cpu_ticks, m.calls)
        .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
    say!(
        "{name:<44} c={c:<4} {:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs  server CPU {cpu:>6} µs/call{}",
        m.calls as f64 / secs,
        micros(m.latency.value_at_quantile(0.5)),
        micros(m.latency.value_at_quantile(0.99)),
        if m.errors > 0 {
            format!(
                "  {} FAILED: {}",
                m.errors,
                m.first_error.as_deref().unwrap_or("?")
            )
        } else {
            String::new()
        }
    );
}

pub fn run(args: &ScaleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.keys >= 1, "--keys must be at least 1");
    anyhow::ensure!(
        (1..=100_000).contains(&args.working_key_cache),
        "--working-key-cache must be 1 to 100000"
    );
    anyhow::ensure!(args.cold <= args.keys, "--cold must be at most --keys");
    anyhow::ensure!(
        args.duration > 0.0 && args.duration <= 3600.0,
        "--duration must be in (0, 3600]"
    );
    anyhow::ensure!(
        args.create_concurrency >= 1 && args.concurrency >= 1,
        "concurrencies must be positive"
    );
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("kms-bench-scale-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a data directory under {}", parent.display()))?;
    // Before any thread exists: SoftHSM2 reads this when the baseline loads it.
    let softhsm = SoftHsmHome::new(data.path().join("softhsm"));
    softhsm.use_config()?;
    let pin_file = softhsm.root().join("user.pin");
    let kms = locate_kms_binary(args.kms_binary.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kms-bench")
        .build()
        .context("starting the async runtime")?;
    let limits = Limits {
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs_f64(args.duration),
        max_calls: 10_000_000,
    };
    let cache_arg = vec![
        "--working-key-cache".to_owned(),
        args.working_key_cache.to_string(),
    ];

    say!(
        "kms-bench scale: {} keys, working-key cache {}, {} client tasks, {} s per row",
        args.keys,
        args.working_key_cache,
        args.concurrency,
        args.duration
    );
    // 1. A token-object key, made by a server that stores versions so.
    let token_object_key = {
        let mut legacy = cache_arg.clone();
        legacy.push("--token-object-versions".to_owned());
        let server = start(&kms, data.path(), &legacy)?;
        let key = runtime.block_on(async {
            let channel = connect(&server.process.endpoint(), 1).await?;
            create_key(
                &mut KeyManagementClient::new(channel[0].clone()),
                "token object",
            )
            .await
        })?;
        drop(server);
        key
    };
    let server = start(&kms, data.path(), &cache_arg)?;
    let pid = server.process.pid();
    let probe = CpuProbe::new(Some(pid));

    let outcome: anyhow::Result<(String, Vec<u8>)> = runtime.block_on(async {
        let channels = connect(
            &server.process.endpoint(),
            args.concurrency.max(args.create_concurrency).div_ceil(8),
        )
        .await?;
        let mut keys_client = KeyManagementClient::new(channels[0].clone());
        let wrapped_key = create_key(&mut keys_client, "wrapped").await?;
        let fixed = |key: &str, c: usize| -> Vec<FixedEncrypt> {
            (0..c)
                .map(|i| FixedEncrypt {
                    crypto: CryptoClient::new(channels[i % channels.len()].clone()),
                    request: encrypt_request(key),
                })
                .collect()
        };
        // 1. Token object vs wrapped session key, back to back.
        let token = drive_async(fixed(&token_object_key, args.concurrency), &limits, &probe).await?;
        print_row("Encrypt 32B, token-object key", args.concurrency, &token);
        let wrapped = drive_async(fixed(&wrapped_key, args.concurrency), &limits, &probe).await?;
        print_row("Encrypt 32B, wrapped key (session object)", args.concurrency, &wrapped);
        let rate = |m: &Measurement| m.calls as f64 / m.elapsed.as_secs_f64().max(1e-9);
        let token_cpu = cpu_us_per_call(token.server_cpu_ticks, token.calls);
        let wrapped_cpu = cpu_us_per_call(wrapped.server_cpu_ticks, wrapped.calls);
        say!(
            "  wrapped ÷ token-object: ops/s {:.2}x, server CPU per call {}",
            rate(&wrapped) / rate(&token).max(1e-9),
            match (wrapped_cpu, token_cpu) {
                (Some(w), Some(t)) if t > 0.0 => format!("{:.2}x", w / t),
                _ => "-".to_owned(),
            }
        );

        // 2. The keys, created concurrently.
        let started = Instant::now();
        let mut creators = tokio::task::JoinSet::new();
        for c in 0..args.create_concurrency {
            let mut client = KeyManagementClient::new(channels[c % channels.len()].clone());
            let share: Vec<usize> = (c..args.keys).step_by(args.create_concurrency).collect();
            creators.spawn(async move {
                let mut ids = Vec::with_capacity(share.len());
                for i in share {
                    ids.push(create_key(&mut client, &format!("scale {i}")).await?);
                }
                anyhow::Ok(ids)
            });
        }
        let mut keys = Vec::with_capacity(args.keys);
        while let Some(ids) = creators.join_next().await {
            keys.extend(ids??);
        }
        let took = started.elapsed().as_secs_f64();
        say!(
            "CreateKey x{} ({} at a time): {took:.1} s, {:.0} keys/s",
            keys.len(),
            args.create_concurrency,
            keys.len() as f64 / took.max(1e-9)
        );

        // 3. First use (cold) vs warm, one call at a time.
        let mut crypto = CryptoClient::new(channels[0].clone());
        let mut cold = Histogram::<u64>::new(3)?;
        let before = Scrape::take(server.metrics)?;
        for key in keys.iter().take(args.cold) {
            let t = Instant::now();
            crypto
                .encrypt(encrypt_request(key))
                .await
                .map_err(|s| anyhow::anyhow!("Encrypt: {s}"))?;
            cold.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
        let after = Scrape::take(server.metrics)?;
        let unwraps = after.event("unwrap") - before.event("unwrap");
        let mut warm = Histogram::<u64>::new(3)?;
        for _ in 0..args.cold.max(100) {
            let t = Instant::now();
            crypto
                .encrypt(encrypt_request(&wrapped_key))
                .await
                .map_err(|s| anyhow::anyhow!("Encrypt: {s}"))?;
            warm.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
        let q = |h: &Histogram<u64>, p: f64| micros(h.value_at_quantile(p));
        say!(
            "Encrypt 32B, first use of a key (cold)     c=1    {:>6} calls  p50 {:>8.1} µs  p99 {:>8.1} µs  ({unwraps:.0} unwraps counted by the server)",
            cold.len(),
            q(&cold, 0.5),
            q(&cold, 0.99)
        );
        say!(
            "Encrypt 32B, warm key                      c=1    {:>6} calls  p50 {:>8.1} µs  p99 {:>8.1} µs  (first-use cost ≈ {:.1} µs at p50)",
            warm.len(),
            q(&warm, 0.5),
            q(&warm, 0.99),
            q(&cold, 0.5) - q(&warm, 0.5)
        );
        anyhow::ensure!(
            unwraps as u64 == cold.len(),
            "the cold row made {unwraps} unwraps for {} first uses",
            cold.len()
        );

        // 4. A random key among all of them, the cache smaller than that.
        let keys = Arc::new(keys);
        let calls: Vec<RandomEncrypt> = (0..args.concurrency)
            .map(|i| RandomEncrypt {
                crypto: CryptoClient::new(channels[i % channels.len()].clone()),
                keys: Arc::clone(&keys),
                state: 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1),
            })
            .collect();
        let before = Scrape::take(server.metrics)?;
        let random = drive_async(calls, &limits, &probe).await?;
        let after = Scrape::take(server.metrics)?;
        print_row(
            &format!("Encrypt 32B, random key of {}", keys.len()),
            args.concurrency,
            &random,
        );
        let hits = after.event("hit") - before.event("hit");
        let misses = after.event("unwrap") - before.event("unwrap");
        say!(
            "  working-key cache {}: hit rate {:.1}% ({hits:.0} hits, {misses:.0} unwraps, warm-up included; {:.1}% expected for uniform draws)",
            args.working_key_cache,
            100.0 * hits / (hits + misses).max(1.0),
            100.0 * (args.working_key_cache as f64 / keys.len() as f64).min(1.0)
        );
        for m in [&token, &wrapped, &random] {
            anyhow::ensure!(m.errors == 0 && m.calls > 0, "a row failed or counted nothing");
        }
        let blob = crypto
            .encrypt(encrypt_request(&wrapped_key))
            .await
            .map_err(|s| anyhow::anyhow!("Encrypt: {s}"))?
            .into_inner()
            .ciphertext_blob;
        anyhow::Ok((wrapped_key, blob))
    });
    let (wrapped_key, blob) = outcome?;

    if args.no_h2load {
        return Ok(());
    }
    // 5. h2load rows and the raw HSM.
    let work = tempfile::tempdir().context("a directory for the h2load bodies")?;
    let rows: [(&str, &str, Vec<u8>); 4] = [
        ("gRPC no-op (health check)", NOOP_PATH, Vec::new()),
        (
            "Encrypt 32B, wrapped key",
            ENCRYPT_PATH,
            encrypt_request(&wrapped_key).encode_to_vec(),
        ),
        (
            "Encrypt 32B, token-object key",
            ENCRYPT_PATH,
            encrypt_request(&token_object_key).encode_to_vec(),
        ),
        (
            "Decrypt 32B, wrapped key",
            DECRYPT_PATH,
            pb::DecryptRequest {
                ciphertext_blob: blob,
                encryption_context: [("app".to_owned(), "kms-bench".to_owned())].into(),
                key_id: String::new(),
            }
            .encode_to_vec(),
        ),
    ];
    let mut per_call = Vec::new();
    say!(
        "h2load: {} requests per row, {} connections x {} streams",
        args.h2load_requests,
        args.h2load_clients,
        args.h2load_streams
    );
    for (name, path, message) in rows {
        let body = work.path().join(format!("{}.grpc", path.replace('/', "_")));
        std::fs::write(&body, grpc_frame(&message)?)?;
        let us = h2load_row(args, &server, &probe, name, path, &body)?;
        per_call.push(us);
    }
    let raw = raw_hsm_cpu_per_call(&pin_file, &probe)?;
    say!("hsm-raw encrypt 32B (token object, 1 thread): {raw:.1} µs CPU per call");
    let (noop, encrypt, token, decrypt) = (per_call[0], per_call[1], per_call[2], per_call[3]);
    say!(
        "overhead ratio: Encrypt (wrapped) {encrypt:.1} ÷ (no-op {noop:.1} + raw HSM {raw:.1}) = {:.2}; Encrypt (token object) {:.2}; Decrypt (wrapped) {:.2} (issue 14 target ≤ 1.5)",
        encrypt / (noop + raw),
        token / (noop + raw),
        decrypt / (noop + raw)
    );
    drop(server);
    Ok(())
}

/// A gRPC message frame: uncompressed flag, big-endian length, message.
fn grpc_frame(message: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u32::try_from(message.len()).context("message over 4 GiB")?;
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    Ok(frame)
}

/// Runs h2load against `path` and returns the server's CPU µs per call,
/// after checking that every call succeeded at the gRPC level.
fn h2load_row(
    args: &ScaleArgs,
    server: &Server,
    probe: &CpuProbe,
    name: &str,
    path: &str,
    body: &Path,
) -> anyhow::Result<f64> {
    let url = format!("{}{path}", server.process.endpoint());
    let codes_before = Scrape::take(server.metrics)?.rpc_codes(path);
    let cpu_before = probe.sample();
    let output = Command::new("h2load")
        .arg("-n")
        .arg(args.h2load_requests.to_string())
        .arg("-c")
        .arg(args.h2load_clients.to_string())
        .arg("-m")
        .arg(args.h2load_streams.to_string())
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(&url)
        .output()
        .context("running h2load (Debian package nghttp2-client; scripts/setup.sh installs it)")?;
    let (_, server_ticks) = probe.sample().since(&cpu_before);
    let codes_after = Scrape::take(server.metrics)?.rpc_codes(path);
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "h2load failed: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let succeeded = h2load_field(&text, "requests:", "succeeded")?;
    let ok_2xx = h2load_field(&text, "status codes:", "2xx")?;
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .unwrap_or("?")
        .to_owned();
    let ok = codes_after.0 - codes_before.0;
    let bad = codes_after.1 - codes_before.1;
    anyhow::ensure!(
        succeeded == args.h2load_requests && ok_2xx == succeeded,
        "{name}: h2load completed {succeeded} of {} requests ({ok_2xx} HTTP 2xx)\n{text}",
        args.h2load_requests
    );
    anyhow::ensure!(
        ok as u64 == succeeded && bad == 0.0,
        "{name}: the server answered {ok} calls OK and {bad} otherwise for {succeeded} requests"
    );
    let us = cpu_us_per_call(server_ticks, succeeded).context("no server CPU reading")?;
    say!(
        "{name:<44} h2load {rate:>9} req/s  server CPU {us:>6.1} µs/call  ({succeeded} calls, all grpc-status 0)"
    );
    Ok(us)
}

/// `N <label>` in the h2load output line starting with `line`.
fn h2load_field(text: &str, line: &str, label: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(line))
        .and_then(|rest| {
            rest.split(',').find_map(|part| {
                let (n, what) = part.trim().split_once(' ')?;
                (what == label).then(|| n.parse().ok()).flatten()
            })
        })
        .with_context(|| format!("no \"{label}\" in h2load's \"{line}\" line:\n{text}"))
}

/// CPU time of this process per raw AES-256-GCM encrypt of 32 bytes
/// (kms-hsm's baseline on the server's token, one thread, 2 s).
fn raw_hsm_cpu_per_call(pin_file: &Path, probe: &CpuProbe) -> anyhow::Result<f64> {
    let pin = PinSource::File(pin_file.to_owned())
        .read()
        .context("reading the token PIN")?;
    let baseline = Baseline::open(&kms_hsm::softhsm2_module_path(), "kms-dev", &pin)
        .context("opening the token for the hsm-raw baseline")?;
    drop(pin);
    let limits = Limits {
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(2),
        max_calls: 10_000_000,
    };
    let m = drive_threads(
        1,
        &limits,
        probe,
        |_| Ok(baseline.worker(BaselineOp::Encrypt, SMALL)?),
        |worker| worker.call().map(|()| 1).map_err(|e| e.to_string()),
    )?;
    anyhow::ensure!(m.errors == 0 && m.calls > 0, "the raw HSM row failed");
    cpu_us_per_call(Some(m.client_cpu_ticks), m.calls).context("no CPU reading")
}
