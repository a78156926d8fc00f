//! `kms-bench soak`: does the server's memory stay flat under load? Runs
//! Encrypt (32 B) at a fixed concurrency against a fresh `kms serve --dev`
//! child for a number of requests, reading the child's VmRSS every
//! `--sample-every` requests, and reports the growth between the first
//! sample past the warm-up (20% of the requests) and the last, and over the
//! second half alone: RocksDB's memtable fills and is flushed (a sawtooth of
//! tens of MiB) before the RSS settles, so the second-half figure is the one
//! that tells a leak from a cache filling up.
//!
//! Bounded by the request count and by `--max-seconds`, whichever comes first.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::load::{Limits, drive_async};
use crate::machine::{Machine, build_profile, git_commit, now_utc};
use crate::server::{CpuProbe, ServerProcess, locate_kms_binary, peak_rss_kib, rss_kib};
use crate::workloads::{Fixture, SMALL, Workload, connect};

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Encrypt requests to send in total.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Read the server's RSS after every this many requests.
    #[arg(long, default_value_t = 100_000)]
    sample_every: u64,
    /// Concurrent client tasks.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Client tasks per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    tasks_per_channel: usize,
    /// Stop (and report what was measured) after this many seconds.
    #[arg(long, default_value_t = 1800.0)]
    max_seconds: f64,
    /// Write the series as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the server's temporary data directory goes.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The kms binary to start (default: `kms` next to kms-bench).
    #[arg(long)]
    kms_binary: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Sample {
    requests: u64,
    seconds: f64,
    /// Requests per second over the chunk that ended here.
    chunk_ops_per_sec: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct SoakReport {
    tool: &'static str,
    date: String,
    git_commit: Option<String>,
    machine: Machine,
    build: &'static str,
    concurrency: usize,
    requests_planned: u64,
    requests_done: u64,
    samples: Vec<Sample>,
    /// RSS growth from the first sample at or past 20% of the requests to the last.
    growth_kib: Option<i64>,
    growth_bytes_per_request: Option<f64>,
    /// The same from the first sample at or past half of the requests.
    second_half_growth_kib: Option<i64>,
    second_half_growth_bytes_per_request: Option<f64>,
    errors: u64,
    stopped_by_time: bool,
}

pub fn run(args: &SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.requests > 0 && args.sample_every > 0,
        "--requests and --sample-every must be positive"
    );
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    anyhow::ensure!(
        args.tasks_per_channel > 0,
        "--tasks-per-channel must be positive"
    );
    anyhow::ensure!(args.max_seconds > 0.0, "--max-seconds must be positive");
    let kms = locate_kms_binary(args.kms_binary.as_deref())?;
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("kms-bench-soak-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a data directory under {}", parent.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kms-bench")
        .build()
        .context("starting the async runtime")?;
    let server = ServerProcess::start(&kms, dir.path(), true)?;
    let pid = server.pid();
    let rss = || rss_kib(pid).context("reading the server's RSS");
    let peak = || peak_rss_kib(pid).context("reading the server's peak RSS");

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.max_seconds);
    let mut samples = vec![Sample {
        requests: 0,
        seconds: 0.0,
        chunk_ops_per_sec: 0.0,
        rss_kib: rss()?,
        peak_rss_kib: peak()?,
    }];
    let mut errors = 0;
    let mut done = 0;
    let mut stopped_by_time = false;
    runtime.block_on(async {
        let channels = connect(
            &server.endpoint(),
            args.concurrency.div_ceil(args.tasks_per_channel),
        )
        .await?;
        let fixture = Arc::new(Fixture::create(&channels[0], 1).await?);
        let workload = Workload::Encrypt { bytes: SMALL };
        eprintln!(
            "kms-bench soak: {} x {} at c={} against pid {pid}, RSS every {} requests",
            args.requests,
            workload.name(1),
            args.concurrency,
            args.sample_every
        );
        while done < args.requests {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                stopped_by_time = true;
                break;
            }
            let chunk = args.sample_every.min(args.requests - done);
            let m = drive_async(
                fixture.calls(workload, &channels, args.concurrency),
                &Limits {
                    warmup: Duration::ZERO,
                    duration: left,
                    max_calls: chunk,
                },
                &CpuProbe::new(Some(pid)),
            )
            .await?;
            // Failed calls are requests too (they reach the server); they are
            // reported, and a soak with failures is not a clean result.
            done += m.calls + m.errors;
            errors += m.errors;
            if let Some(message) = &m.first_error {
                eprintln!(
                    "kms-bench soak: {} failed calls, first: {message}",
                    m.errors
                );
            }
            let sample = Sample {
                requests: done,
                seconds: start.elapsed().as_secs_f64(),
                chunk_ops_per_sec: m.calls as f64 / m.elapsed.as_secs_f64().max(1e-9),
                rss_kib: rss()?,
                peak_rss_kib: peak()?,
            };
            eprintln!(
                "kms-bench soak: {:>9} requests  {:>7.1} s  {:>8.0} ops/s  RSS {:>8} KiB",
                sample.requests, sample.seconds, sample.chunk_ops_per_sec, sample.rss_kib
            );
            samples.push(sample);
        }
        anyhow::Ok(())
    })?;
    drop(server);

    let growth = |fraction: u64| {
        let from = samples
            .iter()
            .find(|s| s.requests > 0 && s.requests * fraction >= args.requests)?;
        let to = samples.last()?;
        (to.requests > from.requests).then(|| {
            let kib = to.rss_kib as i64 - from.rss_kib as i64;
            let per_request = kib as f64 * 1024.0 / (to.requests - from.requests) as f64;
            (from.requests, to.requests, kib, per_request)
        })
    };
    let (from_fifth, from_half) = (growth(5), growth(2));
    let report = SoakReport {
        tool: "kms-bench soak",
        date: now_utc(),
        git_commit: git_commit(),
        machine: Machine::current(),
        build: build_profile(),
        concurrency: args.concurrency,
        requests_planned: args.requests,
        requests_done: done,
        samples,
        growth_kib: from_fifth.map(|g| g.2),
        growth_bytes_per_request: from_fifth.map(|g| g.3),
        second_half_growth_kib: from_half.map(|g| g.2),
        second_half_growth_bytes_per_request: from_half.map(|g| g.3),
        errors,
        stopped_by_time,
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Server RSS under Encrypt 32B at c={}, {} build, {}:",
        report.concurrency, report.build, report.date
    )?;
    writeln!(
        out,
        "{:>10} {:>9} {:>10} {:>10} {:>10}",
        "requests", "seconds", "ops/s", "RSS MiB", "peak MiB"
    )?;
    for s in &report.samples {
        writeln!(
            out,
            "{:>10} {:>9.1} {:>10.0} {:>10.1} {:>10.1}",
            s.requests,
            s.seconds,
            s.chunk_ops_per_sec,
            s.rss_kib as f64 / 1024.0,
            s.peak_rss_kib as f64 / 1024.0
        )?;
    }
    for growth in [from_fifth, from_half] {
        match growth {
            Some((a, b, kib, per_request)) => writeln!(
                out,
                "RSS growth from {a} to {b} requests: {kib} KiB ({per_request:.3} bytes per request)"
            )?,
            None => writeln!(out, "not enough samples for a growth figure")?,
        }
    }
    if report.stopped_by_time {
        writeln!(out, "stopped by --max-seconds after {done} requests")?;
    }
    out.flush()?;
    if let Some(path) = &args.json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(errors == 0, "{errors} requests failed during the soak");
    Ok(())
}
