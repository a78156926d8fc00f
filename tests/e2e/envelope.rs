//! kms-client against a real server (SoftHSM2 token, RocksDB, gRPC on
//! loopback): envelope round trips with data keys from GenerateDataKey,
//! decryption after a key rotation, caching limits counted in KMS calls,
//! retries on UNAVAILABLE for idempotent calls only, the `kms envelope` CLI,
//! the independent Python decryptor on a CLI-made file and on the golden
//! vectors, and a large generated stream in bounded memory.

use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kms_client::envelope::{self, EnvelopeError};
use kms_client::{
    CacheLimits, ClientConfig, DataKeyCache, EncryptionContext, Envelope, KmsClient, RetryPolicy,
    proto as pb,
};
use kms_tests::{TestEnv, TestServer, run_cli};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::create_key;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/envelope_check.py");
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../client/tests/golden");

async fn client(server: &TestServer) -> KmsClient {
    KmsClient::connect(ClientConfig::new(server.endpoint.clone()))
        .await
        .expect("connect kms-client")
}

fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(pairs.iter().copied()).expect("context")
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 253) as u8).collect()
}

async fn seal(
    envelope: &Envelope,
    key: &str,
    context: &EncryptionContext,
    plain: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    envelope
        .encrypt(key, context, &mut &plain[..], &mut out)
        .await
        .expect("envelope encrypt");
    out
}

async fn open(
    envelope: &Envelope,
    context: &EncryptionContext,
    sealed: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let mut out = Vec::new();
    envelope
        .decrypt(None, context, &mut &sealed[..], &mut out)
        .await
        .map(|_| out)
}

#[tokio::test]
async fn envelope_round_trips_through_the_kms_and_survive_rotation() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "envelope").await;
    let other_key = create_key(&server, "other").await;
    let kms = client(&server).await;
    let envelope = Envelope::new(kms.clone());
    let context = ctx(&[("tenant", "acme"), ("file", "orders.csv")]);
    let mut sealed_before = Vec::new();
    for len in [0, 1, 65_535, 65_536, 65_537, 3 * 65_536, 3 * (1 << 20) + 7] {
        let plain = data(len);
        let sealed = seal(&envelope, &key, &context, &plain).await;
        assert!(
            open(&envelope, &context, &sealed).await.expect("decrypt") == plain,
            "len {len}"
        );
        sealed_before.push((plain, sealed));
    }
    // One GenerateDataKey per message, one Decrypt per decryption.
    let stats = envelope.stats();
    assert_eq!((stats.generate_data_key_calls, stats.decrypt_calls), (7, 7));

    let (plain, sealed) = &sealed_before[3];
    // Wrong context: refused locally (header) ...
    let wrong = ctx(&[("tenant", "evil"), ("file", "orders.csv")]);
    assert!(matches!(
        open(&envelope, &wrong, sealed).await,
        Err(EnvelopeError::Invalid)
    ));
    // ... and by the KMS, which bound the data key to the context.
    let header = envelope::read_header(&mut &sealed[..])
        .await
        .expect("header");
    let refused = kms
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: header.wrapped_data_key().to_vec(),
            encryption_context: wrong.to_proto_map(),
            key_id: String::new(),
        })
        .await
        .expect_err("wrong context");
    assert_eq!(refused.code(), Some(tonic::Code::InvalidArgument));
    // A required key that did not wrap the data key.
    let mut out = Vec::new();
    let result = envelope
        .decrypt(Some(&other_key), &context, &mut &sealed[..], &mut out)
        .await;
    assert!(matches!(result, Err(EnvelopeError::Invalid)), "{result:?}");
    assert!(out.is_empty());
    let mut out = Vec::new();
    envelope
        .decrypt(Some(&key), &context, &mut &sealed[..], &mut out)
        .await
        .expect("the right key");
    assert!(out == *plain);

    // Rotation: new messages use version 2, old ones still decrypt.
    kms.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate");
    let fresh = seal(&envelope, &key, &context, b"after rotation").await;
    let version = |sealed: Vec<u8>| {
        let kms = kms.clone();
        let context = context.clone();
        async move {
            let header = envelope::read_header(&mut &sealed[..])
                .await
                .expect("header");
            kms.decrypt(pb::DecryptRequest {
                ciphertext_blob: header.wrapped_data_key().to_vec(),
                encryption_context: context.to_proto_map(),
                key_id: String::new(),
            })
            .await
            .expect("unwrap")
            .key_version
        }
    };
    assert_eq!(version(fresh.clone()).await, 2);
    assert_eq!(version(sealed.clone()).await, 1);
    for (plain, sealed) in &sealed_before {
        assert!(
            open(&envelope, &context, sealed)
                .await
                .expect("after rotation")
                == *plain
        );
    }
    assert_eq!(
        open(&envelope, &context, &fresh).await.expect("new"),
        b"after rotation"
    );
}

#[tokio::test]
async fn data_key_caching_respects_message_byte_and_age_limits() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "cache").await;
    let kms = client(&server).await;
    let context = ctx(&[("tenant", "acme")]);
    let limits = |max_messages, max_bytes, max_age| CacheLimits {
        max_messages,
        max_bytes,
        max_age,
        capacity: 10,
    };

    // N = 3 messages per data key: 10 messages need 4 GenerateDataKey calls.
    let cache = Arc::new(DataKeyCache::new(limits(
        3,
        1 << 30,
        Duration::from_secs(60),
    )));
    let envelope = Envelope::new(kms.clone()).with_cache(Arc::clone(&cache));
    let attempts_before = kms.stats().attempts;
    let mut sealed = Vec::new();
    for i in 0..10 {
        let plain = data(100 + i);
        let mut out = Vec::new();
        envelope
            .encrypt_sized(
                &key,
                &context,
                plain.len() as u64,
                &mut &plain[..],
                &mut out,
            )
            .await
            .expect("encrypt");
        sealed.push((plain, out));
    }
    assert_eq!(envelope.stats().generate_data_key_calls, 4);
    assert_eq!(
        kms.stats().attempts - attempts_before,
        4,
        "RPCs actually sent"
    );
    let stats = cache.stats();
    assert_eq!((stats.encrypt_hits, stats.encrypt_misses), (6, 4));
    let mut distinct = std::collections::HashSet::new();
    for (_, s) in &sealed {
        let header = envelope::read_header(&mut &s[..]).await.expect("header");
        distinct.insert(header.wrapped_data_key().to_vec());
    }
    assert_eq!(distinct.len(), 4);
    // Decrypting: one unwrap per distinct data key, then cache hits.
    for (plain, s) in &sealed {
        assert!(open(&envelope, &context, s).await.expect("decrypt") == *plain);
    }
    assert_eq!(envelope.stats().decrypt_calls, 4);
    assert_eq!(cache.stats().decrypt_hits, 6);
    // A cached unwrapped key is still bound to its context.
    assert!(matches!(
        open(&envelope, &ctx(&[("tenant", "evil")]), &sealed[0].1).await,
        Err(EnvelopeError::Invalid)
    ));

    // B = 1000 bytes per data key, 400-byte messages: two per key.
    let cache = Arc::new(DataKeyCache::new(limits(
        100,
        1000,
        Duration::from_secs(60),
    )));
    let envelope = Envelope::new(kms.clone()).with_cache(Arc::clone(&cache));
    for _ in 0..6 {
        let plain = data(400);
        envelope
            .encrypt_sized(&key, &context, 400, &mut &plain[..], &mut Vec::new())
            .await
            .expect("encrypt");
    }
    assert_eq!(envelope.stats().generate_data_key_calls, 3);
    // A declared length that is wrong is refused.
    let result = envelope
        .encrypt_sized(&key, &context, 10, &mut &data(11)[..], &mut Vec::new())
        .await;
    assert!(
        matches!(result, Err(EnvelopeError::LengthMismatch)),
        "{result:?}"
    );

    // T = 300 ms: a key older than that is not reused.
    let cache = Arc::new(DataKeyCache::new(limits(
        100,
        1 << 30,
        Duration::from_millis(300),
    )));
    let envelope = Envelope::new(kms.clone()).with_cache(Arc::clone(&cache));
    for pause in [0, 0, 400] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        envelope
            .encrypt_sized(&key, &context, 3, &mut &b"abc"[..], &mut Vec::new())
            .await
            .expect("encrypt");
    }
    assert_eq!(envelope.stats().generate_data_key_calls, 2);

    // Unknown length: never cached.
    for _ in 0..3 {
        envelope
            .encrypt(&key, &context, &mut &b"abc"[..], &mut Vec::new())
            .await
            .expect("encrypt");
    }
    assert_eq!(envelope.stats().generate_data_key_calls, 5);
}

#[tokio::test]
async fn unavailable_is_retried_for_idempotent_calls_only() {
    // A port with nothing listening (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
    };
    let kms = KmsClient::connect_lazy(
        ClientConfig::new(format!("http://{addr}"))
            .with_retry(policy)
            .with_connect_timeout(Duration::from_secs(2)),
    )
    .expect("lazy client");
    let error = kms
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect_err("nothing listens");
    assert_eq!(error.code(), Some(tonic::Code::Unavailable), "{error}");
    assert_eq!(
        kms.stats(),
        kms_client::ClientStats {
            attempts: 3,
            retries: 2
        }
    );
    let error = kms
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect_err("nothing listens");
    assert_eq!(error.code(), Some(tonic::Code::Unavailable));
    assert_eq!(kms.stats().attempts, 4, "a mutation is sent once");

    // A server that comes up while an idempotent call is retrying.
    let env = TestEnv::new();
    let mut config = env.config();
    config.server.listen = addr;
    let patient = KmsClient::connect_lazy(ClientConfig::new(format!("http://{addr}")).with_retry(
        RetryPolicy {
            max_attempts: 200,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(50),
        },
    ))
    .expect("lazy client");
    let call = tokio::spawn({
        let patient = patient.clone();
        async move { patient.list_keys(pb::ListKeysRequest::default()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = env.start_with(config).await;
    call.await
        .expect("join")
        .expect("succeeds once the server is up");
    assert!(patient.stats().retries >= 1, "{:?}", patient.stats());
    drop(server);
}

fn cli_ok(endpoint: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(endpoint, args, stdin);
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

#[tokio::test]
async fn the_cli_round_trips_files_and_stdin_and_python_decrypts_its_output() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "cli envelope").await;
    server
        .keys()
        .create_alias(pb::CreateAliasRequest {
            alias_name: "alias/files".into(),
            target_key_id: key.clone(),
        })
        .await
        .expect("alias");
    let work = tempfile::tempdir().expect("work dir");
    let path = |name: &str| work.path().join(name).to_str().expect("utf8").to_owned();
    let plain = data(200_000);
    std::fs::write(path("plain"), &plain).expect("write plaintext");
    let endpoint = server.endpoint.clone();
    let (plain_path, sealed_path, opened_path) = (path("plain"), path("sealed"), path("opened"));
    let plain_copy = plain.clone();
    tokio::task::spawn_blocking(move || {
        let ep = &endpoint;
        cli_ok(
            ep,
            &[
                "envelope",
                "encrypt",
                "--key",
                "alias/files",
                "--context",
                "tenant=acme",
                "--chunk-size",
                "4096",
                "--in",
                &plain_path,
                "--out",
                &sealed_path,
            ],
            b"",
        );
        cli_ok(
            ep,
            &[
                "envelope",
                "decrypt",
                "--context",
                "tenant=acme",
                "--in",
                &sealed_path,
                "--out",
                &opened_path,
            ],
            b"",
        );
        assert!(std::fs::read(&opened_path).expect("opened") == plain_copy);
        // stdin → stdout both ways.
        let sealed = cli_ok(
            ep,
            &["envelope", "encrypt", "--key", "alias/files"],
            &plain_copy[..50_000],
        );
        let opened = cli_ok(
            ep,
            &["envelope", "decrypt", "--key", "alias/files"],
            &sealed,
        );
        assert!(opened == plain_copy[..50_000]);
        // Wrong context: failure, and no output file left behind.
        let refused = format!("{opened_path}.refused");
        let (ok, _, stderr) = run_cli(
            ep,
            &[
                "envelope",
                "decrypt",
                "--context",
                "tenant=evil",
                "--in",
                &sealed_path,
                "--out",
                &refused,
            ],
            b"",
        );
        assert!(!ok && stderr.contains("invalid envelope"), "{stderr}");
        assert!(!std::path::Path::new(&refused).exists());
        let leftovers: Vec<_> =
            std::fs::read_dir(std::path::Path::new(&refused).parent().expect("dir"))
                .expect("list")
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains("partial"))
                .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    })
    .await
    .expect("cli");

    // The independent check: the data key (unwrapped through the Decrypt RPC,
    // as any holder of the envelope and the context could) and the README's
    // format description are all the Python script has.
    let sealed = std::fs::read(path("sealed")).expect("sealed");
    let header = envelope::read_header(&mut &sealed[..])
        .await
        .expect("header");
    assert_eq!(header.chunk_size(), 4096);
    let data_key = client(&server)
        .await
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: header.wrapped_data_key().to_vec(),
            encryption_context: ctx(&[("tenant", "acme")]).to_proto_map(),
            key_id: String::new(),
        })
        .await
        .expect("unwrap")
        .plaintext;
    let data_key = hex::encode(data_key);
    let (sealed_path, python_out) = (path("sealed"), path("python.out"));
    let run = move |context: &str| {
        Command::new("python3")
            .args([
                SCRIPT,
                "decrypt",
                "--data-key",
                &data_key,
                "--in",
                &sealed_path,
            ])
            .args(["--out", &python_out, "--context", context])
            .output()
            .expect("run python3 (scripts/setup.sh installs cryptography)")
    };
    let output = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run("tenant=acme")
    })
    .await
    .expect("join");
    assert!(
        output.status.success(),
        "python: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(std::fs::read(path("python.out")).expect("python output") == plain);
    let output = tokio::task::spawn_blocking(move || run("tenant=evil"))
        .await
        .expect("join");
    assert!(!output.status.success(), "python accepted a wrong context");
}

#[tokio::test]
async fn python_decrypts_the_golden_vectors_and_refuses_the_invalid_ones() {
    // v1 (the original set) and v2 (golden/v2, with a rewrapped vector).
    for (dir, valid, invalid) in [(GOLDEN.to_owned(), 6, 7), (format!("{GOLDEN}/v2"), 7, 9)] {
        let output = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || {
                Command::new("python3")
                    .args([SCRIPT, "golden", &dir])
                    .output()
            }
        })
        .await
        .expect("join")
        .expect("run python3 (scripts/setup.sh installs cryptography)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{dir}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            stdout.lines().filter(|l| l.starts_with("ok valid")).count(),
            valid,
            "{dir}: {stdout}"
        );
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.starts_with("ok invalid"))
                .count(),
            invalid,
            "{dir}: {stdout}"
        );
    }
}

/// A deterministic stream of `len` bytes made on the fly: byte i depends on i
/// (and on a 4 KiB block of pseudo-random data), never buffered whole.
struct Generated {
    block: Arc<Vec<u8>>,
    offset: u64,
    len: u64,
}

impl Generated {
    fn new(len: u64) -> Self {
        let mut x: u32 = 0x9E37_79B9;
        let block = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        Generated {
            block: Arc::new(block),
            offset: 0,
            len,
        }
    }

    /// Writes the bytes at `offset ..` into `out`.
    fn fill(block: &[u8], offset: u64, out: &mut [u8]) {
        let mut at = 0;
        while at < out.len() {
            let pos = offset + at as u64;
            let start = (pos % 4096) as usize;
            let n = (4096 - start).min(out.len() - at);
            out[at..at + n].copy_from_slice(&block[start..start + n]);
            // Vary per 4 KiB block so that swapped blocks would be noticed.
            if start == 0 {
                out[at] ^= (pos / 4096) as u8;
            }
            at += n;
        }
    }
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (self.len - self.offset).min(buf.remaining() as u64) as usize;
        let out = buf.initialize_unfilled_to(n);
        Generated::fill(&self.block, self.offset, out);
        buf.advance(n);
        self.offset += n as u64;
        Poll::Ready(Ok(()))
    }
}

/// Compares what is written with the generated stream, keeping nothing.
struct Verifier {
    block: Arc<Vec<u8>>,
    offset: u64,
    scratch: Vec<u8>,
    mismatch: bool,
}

impl AsyncWrite for Verifier {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.scratch.resize(buf.len(), 0);
        Generated::fill(&this.block, this.offset, &mut this.scratch);
        this.mismatch |= this.scratch != buf;
        this.offset += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Peak resident set size of this process so far (nextest runs each test in
/// its own process).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The "done when": a 1 GiB file, encrypted from a generated stream
/// (never held in memory), decrypted after the key was rotated, with the
/// process's peak RSS growing by a few MiB at most.
#[tokio::test]
async fn a_1_gib_file_round_trips_in_bounded_memory_across_a_key_rotation() {
    const LEN: u64 = 1 << 30;
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "large").await;
    let kms = client(&server).await;
    let envelope = Envelope::new(kms.clone());
    let context = ctx(&[("tenant", "acme")]);
    // Warm up (connection, first data key) before measuring.
    let warm = seal(&envelope, &key, &context, b"warm").await;
    open(&envelope, &context, &warm).await.expect("warm");
    let before = peak_rss_kib();

    let dir = tempfile::tempdir().expect("temp dir");
    let sealed_path = dir.path().join("large.kmse");
    let mut source = Generated::new(LEN);
    let block = Arc::clone(&source.block);
    let started = std::time::Instant::now();
    let file = tokio::fs::File::create(&sealed_path).await.expect("create");
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 16, file);
    let summary = envelope
        .encrypt(&key, &context, &mut source, &mut writer)
        .await
        .expect("encrypt");
    assert_eq!(summary.plaintext_len, LEN);
    drop(writer);
    let encrypt_time = started.elapsed();
    let size = std::fs::metadata(&sealed_path).expect("stat").len();
    assert_eq!(
        size,
        summary.header.as_bytes().len() as u64 + LEN + 16 * (LEN / 65_536 + 1)
    );

    kms.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate");

    let started = std::time::Instant::now();
    let file = tokio::fs::File::open(&sealed_path).await.expect("open");
    let mut reader = tokio::io::BufReader::with_capacity(1 << 16, file);
    let mut verifier = Verifier {
        block,
        offset: 0,
        scratch: Vec::new(),
        mismatch: false,
    };
    let summary = envelope
        .decrypt(Some(&key), &context, &mut reader, &mut verifier)
        .await
        .expect("decrypt after rotation");
    let decrypt_time = started.elapsed();
    assert_eq!(summary.plaintext_len, LEN);
    assert_eq!(verifier.offset, LEN);
    assert!(!verifier.mismatch, "decrypted stream differs");
    let growth = peak_rss_kib().saturating_sub(before);
    eprintln!(
        "1 GiB: encrypted to a file in {encrypt_time:?}, decrypted after rotation in \
         {decrypt_time:?}; peak RSS grew by {growth} KiB"
    );
    assert!(
        growth < 32 * 1024,
        "peak RSS grew by {growth} KiB for a 1 GiB file"
    );
}

/// kms-client's TLS, mTLS and bearer-token settings against a server that
/// requires credentials (issue 6): an mTLS administrator creates a key and
/// grants a token principal GenerateDataKey and Decrypt; the token holder
/// then envelope-encrypts; callers without or with a wrong credential, and a
/// plaintext client, are refused, and refusals are not retried.
#[tokio::test]
async fn the_client_speaks_mtls_and_bearer_tokens_to_a_secure_server() {
    use kms::auth::tokens::token_digest;
    use kms::config::{AuthSettings, TlsSettings};
    use kms_client::{BearerToken, ClientIdentity};
    use kms_tests::pki::TestCa;

    const ADMIN: &str = "spiffe://test.kms/ops/admin";
    const JOB: &str = "envelope-job";
    const TOKEN: &str = "kms_envelope-token-0123456789abcdefghijklmnop";

    let env = TestEnv::new();
    let pki_dir = tempfile::tempdir().expect("pki dir");
    let ca = TestCa::new(pki_dir.path(), "kms");
    let server_files = ca.server();
    let admin_files = ca.client("admin", ADMIN);
    let mut config = env.config();
    config.server.tls = Some(TlsSettings {
        cert_file: server_files.cert.clone(),
        key_file: server_files.key.clone(),
        client_ca_file: Some(ca.ca_file()),
        client_cert_required: false,
        crl_files: Vec::new(),
    });
    config.auth = AuthSettings {
        admins: vec![ADMIN.to_owned()],
        auditors: Vec::new(),
        anonymous_principal: None,
        tokens: vec![(JOB.to_owned(), token_digest(TOKEN.as_bytes()))],
        default_policy: Default::default(),
    };
    let server = env.start_with(config).await;
    assert!(
        server.endpoint.starts_with("https://"),
        "{}",
        server.endpoint
    );
    let ca_pem = std::fs::read(ca.ca_file()).expect("ca");
    let tls = |config: ClientConfig| {
        config
            .with_ca_pem(ca_pem.clone())
            .with_domain_name("localhost")
    };

    let admin = KmsClient::connect(
        tls(ClientConfig::new(server.endpoint.clone())).with_client_identity(
            ClientIdentity::from_pem(
                std::fs::read(&admin_files.cert).expect("cert"),
                std::fs::read(&admin_files.key).expect("key"),
            ),
        ),
    )
    .await
    .expect("mTLS connect");
    let key = admin
        .create_key(pb::CreateKeyRequest {
            description: "envelope over tls".into(),
            ..Default::default()
        })
        .await
        .expect("the admin creates keys")
        .key_metadata
        .expect("metadata")
        .key_id;
    admin
        .put_key_policy(pb::PutKeyPolicyRequest {
            key_id: key.clone(),
            policy: Some(pb::KeyPolicy {
                grants: vec![pb::Grant {
                    principal: JOB.to_owned(),
                    permissions: vec![
                        pb::Permission::GenerateDataKey as i32,
                        pb::Permission::Decrypt as i32,
                    ],
                    required_encryption_context: Default::default(),
                }],
            }),
        })
        .await
        .expect("the admin sets the policy");

    let job = KmsClient::connect(
        tls(ClientConfig::new(server.endpoint.clone()))
            .with_bearer_token(BearerToken::new(TOKEN).expect("token")),
    )
    .await
    .expect("TLS connect");
    let envelope = Envelope::new(job.clone());
    let context = ctx(&[("tenant", "acme")]);
    let plain = data(100_000);
    let sealed = seal(&envelope, &key, &context, &plain).await;
    assert!(open(&envelope, &context, &sealed).await.expect("decrypt") == plain);
    // The token holder may not manage keys: PERMISSION_DENIED, sent once.
    let before = job.stats().attempts;
    let denied = job
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect_err("not an admin");
    assert_eq!(
        denied.code(),
        Some(tonic::Code::PermissionDenied),
        "{denied}"
    );
    assert_eq!(job.stats().attempts - before, 1);

    // No credentials, or a wrong token: refused, not retried.
    for token in [None, Some("kms_wrong-token-0123456789abcdefghijklmnopq")] {
        let mut config = tls(ClientConfig::new(server.endpoint.clone()));
        if let Some(token) = token {
            config = config.with_bearer_token(BearerToken::new(token).expect("token"));
        }
        let stranger = KmsClient::connect(config).await.expect("TLS connect");
        let result = Envelope::new(stranger.clone())
            .encrypt(&key, &context, &mut &b"x"[..], &mut Vec::new())
            .await;
        let Err(EnvelopeError::Kms(error)) = result else {
            panic!("expected a KMS refusal, got {result:?}");
        };
        assert_eq!(error.code(), Some(tonic::Code::Unauthenticated), "{error}");
        assert_eq!(
            stranger.stats(),
            kms_client::ClientStats {
                attempts: 1,
                retries: 0
            }
        );
    }
    // A plaintext client cannot talk to the TLS port.
    let plaintext = ClientConfig::new(server.endpoint.replacen("https://", "http://", 1))
        .with_retry(RetryPolicy::none());
    let plaintext = KmsClient::connect_lazy(plaintext).expect("lazy");
    assert!(
        plaintext
            .list_keys(pb::ListKeysRequest::default())
            .await
            .is_err()
    );
}
