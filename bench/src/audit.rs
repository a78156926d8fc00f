//! `kms-bench audit`: audit appends per second through kms-storage's
//! group-commit writer, with every batch fsynced (as the service runs) and
//! with sync off (the ceiling: same code path, no fsync), at several numbers
//! of concurrent writer threads. Each cell uses a fresh database.
//!
//! Put `--dir` on the disk the service will use: on tmpfs an fsync costs
//! nothing and the comparison means nothing.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kms_storage::{AuditConfig, AuditEvent, MacFn, ResultCode, Storage, StorageOptions};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Seconds to measure each cell.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent writer threads, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    threads: Vec<usize>,
    /// Directory in which the temporary databases are created (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Checkpoint every this many records (the MAC here is a stand-in, not an HSM call).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Cell {
    appends: u64,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

#[derive(Debug, Serialize)]
struct Row {
    threads: usize,
    synced: Cell,
    unsynced: Cell,
    /// synced ops/s divided by unsynced ops/s.
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    seconds_per_cell: f64,
    checkpoint_every: u64,
    rows: Vec<Row>,
}

fn event(thread: usize, i: u64) -> AuditEvent {
    AuditEvent {
        principal: format!("bench-client-{thread}"),
        peer: "127.0.0.1:40000".into(),
        request_id: format!("{thread}-{i}"),
        operation: "Encrypt".into(),
        key_id: Some("key-00112233445566778899aabbccddeeff".into()),
        key_version: Some(1),
        context_digest: Some([7; 32]),
        result: ResultCode::Ok,
        latency_micros: 150,
    }
}

/// A stand-in MAC: the service computes HMAC-SHA256 in the HSM, once per
/// `checkpoint_every` records, which is negligible next to the fsyncs.
fn stand_in_mac() -> MacFn {
    Box::new(|msg: &[u8]| Ok(msg.iter().rev().take(32).copied().collect()))
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    u64::from(sorted[idx.min(sorted.len() - 1)])
}

fn measure(args: &AuditArgs, threads: usize, sync: bool) -> anyhow::Result<Cell> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("kms-bench-audit-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary database under {}", parent.display()))?;
    let storage =
        Storage::open(dir.path(), &StorageOptions::default()).context("opening the database")?;
    let log = storage
        .open_audit_log(
            AuditConfig {
                sync,
                checkpoint_every_records: args.checkpoint_every,
                ..AuditConfig::default()
            },
            stand_in_mac(),
        )
        .context("opening the audit log")?;
    let stop = AtomicBool::new(false);
    let duration = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let per_thread: Vec<anyhow::Result<Vec<u32>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (log, stop) = (&log, &stop);
                sc.spawn(move || -> anyhow::Result<Vec<u32>> {
                    let mut lat = Vec::with_capacity(1 << 16);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        log.append(event(t, i)).context("audit append")?;
                        lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                        i += 1;
                    }
                    Ok(lat)
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("writer thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for lat in per_thread {
        all.extend(lat?);
    }
    drop(log);
    all.sort_unstable();
    let appends = all.len() as u64;
    Ok(Cell {
        appends,
        ops_per_sec: appends as f64 / elapsed,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
    })
}

pub fn run(args: &AuditArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    anyhow::ensure!(
        args.threads.iter().all(|&t| t > 0),
        "--threads must be positive"
    );
    let mut rows = Vec::new();
    for &threads in &args.threads {
        let synced = measure(args, threads, true)?;
        let unsynced = measure(args, threads, false)?;
        let ratio = if unsynced.ops_per_sec > 0.0 {
            synced.ops_per_sec / unsynced.ops_per_sec
        } else {
            0.0
        };
        rows.push(Row {
            threads,
            synced,
            unsynced,
            ratio,
        });
    }
    let report = Report {
        bench: "audit",
        seconds_per_cell: args.seconds,
        checkpoint_every: args.checkpoint_every,
        rows,
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &report)?;
    }
    Ok(())
}

fn print_table(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    writeln!(
        out,
        "audit appends/s: group commit, one writer thread, {} s per cell, checkpoint every {} records",
        r.seconds_per_cell, r.checkpoint_every
    )?;
    writeln!(
        out,
        "{:>7} | {:>12} | {:>13} | {:>14} | {:>13} | {:>15}",
        "writers", "synced ops/s", "p50/p99 µs", "unsynced ops/s", "p50/p99 µs", "synced/unsynced"
    )?;
    writeln!(out, "{}", "-".repeat(90))?;
    for row in &r.rows {
        writeln!(
            out,
            "{:>7} | {:>12.0} | {:>13} | {:>14.0} | {:>13} | {:>15.2}",
            row.threads,
            row.synced.ops_per_sec,
            format!("{}/{}", row.synced.p50_us, row.synced.p99_us),
            row.unsynced.ops_per_sec,
            format!("{}/{}", row.unsynced.p50_us, row.unsynced.p99_us),
            row.ratio
        )?;
    }
    Ok(())
}
