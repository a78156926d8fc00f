//! `kms-bench envelope`: client-side envelope encryption (kms-client) against
//! the ceiling it cannot beat, raw single-shot AES-256-GCM over the same bytes
//! on the same machine, as MB/s and ratios; then the KMS requests data-key
//! caching saves, against a real server (`--endpoint`, or a `kms serve --dev`
//! child started here).
//!
//! The crypto rows use a fixed data key and no KMS: they measure the format
//! (chunking, per-chunk tags, HKDF, copies through the stream), not the
//! network. MB is 10^6 bytes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kms_client::envelope::{decrypt_with_data_key, encrypt_with_data_key};
use kms_client::{
    CacheLimits, ClientConfig, DataKey, DataKeyCache, EncryptionContext, Envelope, KmsClient,
    baseline, proto as pb,
};

use crate::server::{ServerProcess, locate_kms_binary};

/// Arguments of `kms-bench envelope`.
#[derive(Debug, clap::Args)]
pub struct EnvelopeArgs {
    /// Input sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 256])]
    sizes_mib: Vec<u64>,
    /// Envelope chunk size in bytes.
    #[arg(long, default_value_t = kms_client::envelope::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Minimum measuring time per cell (repeats small inputs).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// kms server for the caching rows; default: start `kms serve --dev`.
    #[arg(long)]
    endpoint: Option<String>,
    /// The `kms` binary for the dev server (default: next to kms-bench).
    #[arg(long)]
    kms_binary: Option<PathBuf>,
    /// Skip the caching rows (no server needed).
    #[arg(long)]
    no_server: bool,
    /// Messages encrypted (and decrypted) in the caching rows.
    #[arg(long, default_value_t = 500)]
    messages: u64,
    /// Plaintext bytes per message in the caching rows.
    #[arg(long, default_value_t = 4096)]
    message_bytes: u64,
    /// Messages per cached data key (N) in the caching rows.
    #[arg(long, default_value_t = 100)]
    cache_messages: u64,
}

pub fn run(args: &EnvelopeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "envelope vs raw AES-256-GCM, one thread, chunk {} B, {}",
        args.chunk_size,
        crate::machine::build_profile()
    )?;
    writeln!(
        out,
        "| input | envelope encrypt MB/s | raw seal MB/s | ratio | envelope decrypt MB/s | raw open MB/s | ratio |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for &mib in &args.sizes_mib {
        let row = runtime.block_on(crypto_row(mib << 20, args))?;
        writeln!(
            out,
            "| {mib} MiB | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} |",
            row.env_seal,
            row.raw_seal,
            row.env_seal / row.raw_seal,
            row.env_open,
            row.raw_open,
            row.env_open / row.raw_open
        )?;
        out.flush()?;
    }
    if args.no_server {
        return Ok(());
    }
    let data_dir = tempfile::tempdir().context("temp data dir")?;
    let (_server, endpoint) = match &args.endpoint {
        Some(endpoint) => (None, endpoint.clone()),
        None => {
            let kms = locate_kms_binary(args.kms_binary.as_deref())?;
            let server = ServerProcess::start(&kms, data_dir.path(), true)?;
            let endpoint = server.endpoint();
            (Some(server), endpoint)
        }
    };
    let rows = runtime.block_on(caching_rows(&endpoint, args))?;
    writeln!(out)?;
    writeln!(
        out,
        "data-key caching: {} messages of {} B, N = {} messages per key (B = 1 GiB, T = 5 min)",
        args.messages, args.message_bytes, args.cache_messages
    )?;
    writeln!(
        out,
        "| cache | GenerateDataKey calls | encrypt msgs/s | Decrypt calls | decrypt msgs/s |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for row in &rows {
        writeln!(
            out,
            "| {} | {} | {:.0} | {} | {:.0} |",
            row.name, row.generate_calls, row.encrypt_rate, row.decrypt_calls, row.decrypt_rate
        )?;
    }
    if let [off, on] = rows.as_slice() {
        writeln!(
            out,
            "requests saved by caching: {} of {} GenerateDataKey, {} of {} Decrypt",
            off.generate_calls - on.generate_calls,
            off.generate_calls,
            off.decrypt_calls - on.decrypt_calls,
            off.decrypt_calls
        )?;
    }
    Ok(())
}

struct CryptoRow {
    env_seal: f64,
    raw_seal: f64,
    env_open: f64,
    raw_open: f64,
}

/// The fastest of repeated runs: at least two, and until `seconds` passed.
struct Best {
    started: Instant,
    seconds: f64,
    best: Duration,
    runs: u32,
}

impl Best {
    fn new(seconds: f64) -> Self {
        Best {
            started: Instant::now(),
            seconds,
            best: Duration::MAX,
            runs: 0,
        }
    }

    fn more(&self) -> bool {
        self.runs < 2 || self.started.elapsed().as_secs_f64() < self.seconds
    }

    fn record(&mut self, since: Instant) {
        self.best = self.best.min(since.elapsed());
        self.runs += 1;
    }

    fn mb_per_s(&self, bytes: u64) -> f64 {
        bytes as f64 / self.best.as_secs_f64() / 1e6
    }
}

async fn crypto_row(len: u64, args: &EnvelopeArgs) -> anyhow::Result<CryptoRow> {
    let size = usize::try_from(len)?;
    let plain: Vec<u8> = (0..size).map(|i| (i * 131 % 251) as u8).collect();
    let key_bytes = [7u8; 32];
    let key = DataKey::from_bytes(key_bytes);
    let context = EncryptionContext::new([("tenant", "bench")])?;
    let wrapped = vec![0xA5; 104];

    let mut sealed = Vec::with_capacity(size + size / 1000 + 4096);
    let mut timer = Best::new(args.seconds);
    while timer.more() {
        sealed.clear();
        let t = Instant::now();
        encrypt_with_data_key(
            &key,
            wrapped.clone(),
            &context,
            args.chunk_size,
            &mut &plain[..],
            &mut sealed,
        )
        .await?;
        timer.record(t);
    }
    let env_seal = timer.mb_per_s(len);

    let mut opened = Vec::with_capacity(size);
    let mut timer = Best::new(args.seconds);
    while timer.more() {
        opened.clear();
        let t = Instant::now();
        decrypt_with_data_key(&key, &context, &mut &sealed[..], &mut opened).await?;
        timer.record(t);
    }
    let env_open = timer.mb_per_s(len);
    anyhow::ensure!(opened == plain, "envelope round trip differs");

    let mut buf = plain.clone();
    let nonce = [1u8; 12];
    let mut tag = [0u8; 16];
    let mut timer = Best::new(args.seconds);
    while timer.more() {
        let t = Instant::now();
        tag = baseline::aes_256_gcm_seal_in_place(&key_bytes, &nonce, &mut buf)
            .context("raw seal")?;
        timer.record(t);
    }
    let raw_seal = timer.mb_per_s(len);

    // Each open needs a valid tag: re-seal in between, untimed.
    let mut timer = Best::new(args.seconds);
    while timer.more() {
        let t = Instant::now();
        let ok = baseline::aes_256_gcm_open_in_place(&key_bytes, &nonce, &mut buf, &tag);
        timer.record(t);
        anyhow::ensure!(ok, "raw open failed");
        tag = baseline::aes_256_gcm_seal_in_place(&key_bytes, &nonce, &mut buf)
            .context("raw seal")?;
    }
    let raw_open = timer.mb_per_s(len);
    Ok(CryptoRow {
        env_seal,
        raw_seal,
        env_open,
        raw_open,
    })
}

struct CachingRow {
    name: &'static str,
    generate_calls: u64,
    encrypt_rate: f64,
    decrypt_calls: u64,
    decrypt_rate: f64,
}

async fn caching_rows(endpoint: &str, args: &EnvelopeArgs) -> anyhow::Result<Vec<CachingRow>> {
    let kms = KmsClient::connect(ClientConfig::new(endpoint)).await?;
    let key_id = kms
        .create_key(pb::CreateKeyRequest {
            description: "kms-bench envelope caching".into(),
            ..Default::default()
        })
        .await?
        .key_metadata
        .context("CreateKey reply without metadata")?
        .key_id;
    let context = EncryptionContext::new([("tenant", "bench")])?;
    let plain = vec![0x5Au8; usize::try_from(args.message_bytes)?];
    let mut rows = Vec::new();
    for name in ["off", "on"] {
        let mut envelope = Envelope::new(kms.clone());
        if name == "on" {
            envelope = envelope.with_cache(Arc::new(DataKeyCache::new(CacheLimits {
                max_messages: args.cache_messages,
                ..CacheLimits::default()
            })));
        }
        let mut sealed = Vec::new();
        let started = Instant::now();
        for _ in 0..args.messages {
            let mut out = Vec::new();
            envelope
                .encrypt_sized(
                    &key_id,
                    &context,
                    args.message_bytes,
                    &mut &plain[..],
                    &mut out,
                )
                .await?;
            sealed.push(out);
        }
        let encrypt_rate = args.messages as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for message in &sealed {
            envelope
                .decrypt(None, &context, &mut &message[..], &mut Vec::new())
                .await?;
        }
        let decrypt_rate = args.messages as f64 / started.elapsed().as_secs_f64();
        let stats = envelope.stats();
        rows.push(CachingRow {
            name,
            generate_calls: stats.generate_data_key_calls,
            encrypt_rate,
            decrypt_calls: stats.decrypt_calls,
            decrypt_rate,
        });
    }
    Ok(rows)
}
