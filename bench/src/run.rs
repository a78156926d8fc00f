//! `kms-bench run`: the service against its two ceilings, in one invocation,
//! on one fresh SoftHSM2 token.
//!
//! 1. Start `kms serve --dev` as a child on 127.0.0.1 with a fresh data dir
//!    (or use `--endpoint`), audit synced as in production.
//! 2. hsm-raw: AES-256-GCM straight to the server's own token (kms-hsm's
//!    `baseline`), encrypt and decrypt of 32 bytes, at each concurrency as
//!    that many threads.
//! 3. grpc-noop: the gRPC health check against the same server.
//! 4. The service rows at each concurrency as that many client tasks.
//! 5. A second server with `--unsafe-audit-no-sync`; a few rows measured on
//!    the synced and the unsynced server back to back, reported as a ratio.
//!
//! Every row is bounded in time and count and stops by itself.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kms_hsm::PinSource;
use kms_hsm::baseline::{Baseline, BaselineOp};
use kms_hsm::softhsm::SoftHsmHome;
use tonic::transport::Channel;

use crate::load::{Limits, drive_async, drive_threads};
use crate::machine::{Machine, build_profile, git_commit, now_utc};
use crate::report::{
    Audit, GRPC_NOOP, HSM_RAW_DECRYPT, HSM_RAW_ENCRYPT, Kind, Report, Row, Settings, SyncPair,
    evaluate_targets, fill_ratios, print, print_comparison,
};
use crate::server::{CpuProbe, ServerProcess, locate_kms_binary, rss_kib};
use crate::workloads::{Fixture, SMALL, Workload, connect};

/// Label of the dev-mode token (`kms serve --dev`).
const DEV_TOKEN_LABEL: &str = "kms-dev";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Seconds measured per row, after the warm-up [default: 3, --quick: 0.3].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up per row (calls made, not counted) [default: 0.5, --quick: 0.1].
    #[arg(long)]
    warmup: Option<f64>,
    /// Calls counted per row at most (a batch call counts once).
    #[arg(long, default_value_t = 1_000_000)]
    max_ops: u64,
    /// Concurrencies: client tasks for gRPC rows, threads for hsm-raw rows
    /// [default: 1,8,32,128, --quick: 1,8].
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Items per call of the batch rows.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Measure every row this many times and report the run with the median
    /// ops/s (all runs' ops/s are in the JSON): steadier figures on a noisy
    /// machine, for before/after comparisons.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Client tasks per HTTP/2 connection: c tasks share ceil(c / N) connections.
    #[arg(long, default_value_t = 8)]
    tasks_per_channel: usize,
    /// Run only rows whose name starts with one of these (comma separated,
    /// case-insensitive; e.g. "Encrypt 32B,Batch,grpc-noop"). The baselines
    /// still run for the ratio columns unless --no-baselines.
    #[arg(long, value_delimiter = ',')]
    filter: Vec<String>,
    /// Do not add the hsm-raw and grpc-noop rows that --filter left out.
    #[arg(long)]
    no_baselines: bool,
    /// A smoke run with tiny durations (checks the tool works; not a measurement).
    #[arg(long)]
    quick: bool,
    /// Skip the comparison with a second, unsynced server.
    #[arg(long)]
    no_unsynced: bool,
    /// Rows measured on both the synced and the unsynced server.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Encrypt 32B,GenerateDataKey AES-256"
    )]
    unsynced_rows: Vec<String>,
    /// Concurrency of the synced/unsynced comparison [default: 32, or the
    /// largest of --concurrency when 32 is not among them].
    #[arg(long)]
    unsynced_concurrency: Option<usize>,
    /// Write every row, the machine, the settings and the targets as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// An earlier --json file: print ops/s and p99 before and after per row.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Where the servers' temporary data directories go (default: the system
    /// temp dir). Put it on the disk the service would use: on tmpfs an
    /// fsync is free and the synced numbers mean nothing.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The kms binary to start (default: `kms` next to kms-bench).
    #[arg(long)]
    kms_binary: Option<PathBuf>,
    /// Measure an already-running server instead of starting one. The
    /// hsm-raw rows then need --softhsm-conf and --pin-file (and the
    /// unsynced comparison is skipped).
    #[arg(long)]
    endpoint: Option<String>,
    /// With --endpoint: the server's pid, for its CPU time and RSS.
    #[arg(long, requires = "endpoint")]
    server_pid: Option<u32>,
    /// With --endpoint: the SoftHSM2 configuration of the server's token.
    #[arg(long, requires = "endpoint")]
    softhsm_conf: Option<PathBuf>,
    /// With --endpoint: the label of the server's token.
    #[arg(long, requires = "endpoint", default_value = DEV_TOKEN_LABEL)]
    token_label: String,
    /// With --endpoint: a file holding the token's user PIN.
    #[arg(long, requires = "endpoint")]
    pin_file: Option<PathBuf>,
}

/// What this invocation runs, resolved from the arguments.
#[derive(Debug)]
struct Plan {
    limits: Limits,
    concurrency: Vec<usize>,
    unsynced_concurrency: usize,
    filter: Vec<String>,
    with_baselines: bool,
    batch: usize,
    tasks_per_channel: usize,
    repeat: usize,
}

impl Plan {
    fn new(args: &RunArgs) -> anyhow::Result<Plan> {
        let (duration, warmup, concurrency) = if args.quick {
            (0.3, 0.1, vec![1, 8])
        } else {
            (3.0, 0.5, vec![1, 8, 32, 128])
        };
        let duration = args.duration.unwrap_or(duration);
        let warmup = args.warmup.unwrap_or(warmup);
        let concurrency = args.concurrency.clone().unwrap_or(concurrency);
        anyhow::ensure!(
            duration > 0.0 && duration <= 3600.0,
            "--duration must be in (0, 3600]"
        );
        anyhow::ensure!(
            (0.0..=600.0).contains(&warmup),
            "--warmup must be in [0, 600]"
        );
        anyhow::ensure!(
            !concurrency.is_empty() && concurrency.iter().all(|&c| (1..=4096).contains(&c)),
            "--concurrency must list values from 1 to 4096"
        );
        anyhow::ensure!(args.max_ops > 0, "--max-ops must be positive");
        anyhow::ensure!(
            (1..=1000).contains(&args.batch),
            "--batch must be 1 to 1000 (the server's default limit)"
        );
        anyhow::ensure!(
            args.tasks_per_channel > 0,
            "--tasks-per-channel must be positive"
        );
        anyhow::ensure!(
            (1..=100).contains(&args.repeat),
            "--repeat must be 1 to 100"
        );
        let largest = concurrency.iter().copied().max().unwrap_or(1);
        let unsynced_concurrency = args.unsynced_concurrency.unwrap_or(
            if concurrency.contains(&crate::report::TARGET_CONCURRENCY) {
                crate::report::TARGET_CONCURRENCY
            } else {
                largest
            },
        );
        let filter: Vec<String> = args
            .filter
            .iter()
            .map(|f| f.trim().to_lowercase())
            .filter(|f| !f.is_empty())
            .collect();
        let mut plan = Plan {
            limits: Limits {
                warmup: Duration::from_secs_f64(warmup),
                duration: Duration::from_secs_f64(duration),
                max_calls: args.max_ops,
            },
            concurrency,
            unsynced_concurrency,
            filter,
            with_baselines: false,
            batch: args.batch,
            tasks_per_channel: args.tasks_per_channel,
            repeat: args.repeat,
        };
        let any_service = Workload::service_rows()
            .iter()
            .any(|w| plan.selected(&w.name(plan.batch)));
        plan.with_baselines = !args.no_baselines && any_service;
        Ok(plan)
    }

    /// Prefix match: "Encrypt" selects the Encrypt rows, not ReEncrypt,
    /// BatchEncrypt or "hsm-raw encrypt".
    fn selected(&self, name: &str) -> bool {
        let name = name.to_lowercase();
        self.filter.is_empty() || self.filter.iter().any(|f| name.starts_with(f.as_str()))
    }

    fn baseline_selected(&self, name: &str) -> bool {
        self.with_baselines || self.selected(name)
    }

    fn channels_for(&self, tasks: usize) -> usize {
        tasks.div_ceil(self.tasks_per_channel)
    }
}

/// How the bench reaches the server's token for the hsm-raw rows.
#[derive(Debug)]
struct TokenAccess {
    label: String,
    pin_file: PathBuf,
}

/// The server the rows run against.
#[derive(Debug)]
struct UnderTest {
    endpoint: String,
    pid: Option<u32>,
    /// Keeps a child server alive (killed on drop).
    _process: Option<ServerProcess>,
}

impl UnderTest {
    fn child(process: ServerProcess) -> UnderTest {
        // For profiling (perf record -p PID) while the rows run.
        eprintln!(
            "kms-bench: server pid {} on {}",
            process.pid(),
            process.endpoint()
        );
        UnderTest {
            endpoint: process.endpoint(),
            pid: Some(process.pid()),
            _process: Some(process),
        }
    }

    fn probe(&self) -> CpuProbe {
        CpuProbe::new(self.pid)
    }

    fn rss(&self) -> Option<u64> {
        self.pid.and_then(rss_kib)
    }
}

/// A connected server: its channels and the keys/requests of every row.
#[derive(Debug)]
struct Session {
    server: UnderTest,
    channels: Vec<Channel>,
    fixture: Arc<Fixture>,
}

impl Session {
    async fn open(server: UnderTest, plan: &Plan) -> anyhow::Result<Session> {
        let largest = plan.concurrency.iter().copied().max().unwrap_or(1);
        let most = plan
            .channels_for(largest)
            .max(plan.channels_for(plan.unsynced_concurrency));
        let channels = connect(&server.endpoint, most).await?;
        let fixture = Arc::new(
            Fixture::create(&channels[0], plan.batch)
                .await
                .context("creating the bench keys")?,
        );
        Ok(Session {
            server,
            channels,
            fixture,
        })
    }

    /// `plan.repeat` runs of a row; the median one, with every run's ops/s.
    async fn measure(
        &self,
        plan: &Plan,
        workload: Workload,
        concurrency: usize,
        audit: Audit,
    ) -> anyhow::Result<Row> {
        let mut runs = Vec::with_capacity(plan.repeat);
        for _ in 0..plan.repeat {
            runs.push(
                self.measure_once(plan, workload, concurrency, audit)
                    .await?,
            );
        }
        median(runs)
    }

    async fn measure_once(
        &self,
        plan: &Plan,
        workload: Workload,
        concurrency: usize,
        audit: Audit,
    ) -> anyhow::Result<Row> {
        let channels = &self.channels[..plan.channels_for(concurrency)];
        let calls = self.fixture.calls(workload, channels, concurrency);
        let m = drive_async(calls, &plan.limits, &self.server.probe()).await?;
        let kind = if workload == Workload::HealthCheck {
            Kind::GrpcNoop
        } else {
            Kind::Service
        };
        let items_per_call = if workload.is_batch() {
            plan.batch as u64
        } else {
            1
        };
        Ok(Row::new(
            workload.name(plan.batch),
            kind,
            Some(audit),
            concurrency,
            items_per_call,
            &m,
            self.server.rss(),
        ))
    }
}

/// The run with the median ops/s, carrying every run's ops/s and the
/// failures of all runs (a failure in any run must not hide).
pub(crate) fn median(mut runs: Vec<Row>) -> anyhow::Result<Row> {
    let all: Vec<f64> = runs.iter().map(|r| r.items_per_sec).collect();
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    let first_error = runs.iter().find_map(|r| r.first_error.clone());
    runs.sort_by(|a, b| a.items_per_sec.total_cmp(&b.items_per_sec));
    let middle = runs.len() / 2;
    let mut row = runs
        .into_iter()
        .nth(middle)
        .context("a row needs at least one run")?;
    row.errors = errors;
    row.first_error = first_error;
    row.runs_items_per_sec = all;
    Ok(row)
}

pub(crate) fn progress(row: &Row) {
    let errors = if row.errors > 0 {
        format!(
            ", {} FAILED calls: {}",
            row.errors,
            row.first_error.as_deref().unwrap_or("?")
        )
    } else {
        String::new()
    };
    eprintln!(
        "kms-bench: {:<34} c={:<4} {:>10.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs{errors}",
        row.name, row.concurrency, row.items_per_sec, row.p50_us, row.p99_us
    );
}

fn hsm_raw_rows(
    plan: &Plan,
    access: &TokenAccess,
    probe: &CpuProbe,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let wanted: Vec<(BaselineOp, &str)> = [
        (BaselineOp::Encrypt, HSM_RAW_ENCRYPT),
        (BaselineOp::Decrypt, HSM_RAW_DECRYPT),
    ]
    .into_iter()
    .filter(|(_, name)| plan.baseline_selected(name))
    .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let pin = PinSource::File(access.pin_file.clone())
        .read()
        .context("reading the token PIN")?;
    let baseline = Baseline::open(&kms_hsm::softhsm2_module_path(), &access.label, &pin)
        .context("opening the token for the hsm-raw baseline")?;
    drop(pin);
    for (op, name) in wanted {
        for &threads in &plan.concurrency {
            let mut runs = Vec::with_capacity(plan.repeat);
            for _ in 0..plan.repeat {
                let m = drive_threads(
                    threads,
                    &plan.limits,
                    probe,
                    |_| Ok(baseline.worker(op, SMALL)?),
                    |worker| worker.call().map(|()| 1).map_err(|e| e.to_string()),
                )?;
                runs.push(Row::new(
                    name.to_owned(),
                    Kind::HsmRaw,
                    None,
                    threads,
                    1,
                    &m,
                    None,
                ));
            }
            let row = median(runs)?;
            progress(&row);
            rows.push(row);
        }
    }
    Ok(())
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    let mut notes = Vec::new();
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let new_data_dir = |prefix: &str| {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .with_context(|| format!("creating a data directory under {}", parent.display()))
    };

    // Everything that sets the environment happens before any thread exists.
    let synced_dir = match &args.endpoint {
        Some(_) => None,
        None => Some(new_data_dir("kms-bench-synced-")?),
    };
    let access = match (&synced_dir, &args.softhsm_conf, &args.pin_file) {
        (Some(dir), _, _) => {
            // The server creates these on start; SoftHSM2 reads them only
            // when the module is loaded, after the server is up.
            let softhsm = SoftHsmHome::new(dir.path().join("softhsm"));
            softhsm.use_config()?;
            Some(TokenAccess {
                label: DEV_TOKEN_LABEL.to_owned(),
                pin_file: softhsm.root().join("user.pin"),
            })
        }
        (None, Some(conf), Some(pin_file)) => {
            kms_hsm::softhsm::use_config(conf)?;
            Some(TokenAccess {
                label: args.token_label.clone(),
                pin_file: pin_file.clone(),
            })
        }
        (None, _, _) => {
            notes.push(
                "hsm-raw rows skipped: --endpoint without --softhsm-conf and --pin-file".into(),
            );
            None
        }
    };
    let kms = match &args.endpoint {
        Some(_) => None,
        None => Some(locate_kms_binary(args.kms_binary.as_deref())?),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kms-bench")
        .build()
        .context("starting the async runtime")?;

    let synced = match (&args.endpoint, &kms, &synced_dir) {
        (Some(endpoint), _, _) => UnderTest {
            endpoint: endpoint.clone(),
            pid: args.server_pid,
            _process: None,
        },
        (None, Some(kms), Some(dir)) => {
            UnderTest::child(ServerProcess::start(kms, dir.path(), true)?)
        }
        _ => anyhow::bail!("no server to measure"),
    };
    let server_label = match &args.endpoint {
        Some(endpoint) => format!("{endpoint} (given)"),
        None => format!("kms serve --dev child on {}", synced.endpoint),
    };

    let mut rows = Vec::new();
    if let Some(access) = &access {
        hsm_raw_rows(&plan, access, &synced.probe(), &mut rows)?;
    }

    let mut pairs = Vec::new();
    runtime.block_on(async {
        let session = Session::open(synced, &plan).await?;
        if plan.baseline_selected(GRPC_NOOP) {
            for &c in &plan.concurrency {
                let row = session
                    .measure(&plan, Workload::HealthCheck, c, Audit::Synced)
                    .await?;
                progress(&row);
                rows.push(row);
            }
        }
        for workload in Workload::service_rows() {
            if !plan.selected(&workload.name(plan.batch)) {
                continue;
            }
            for &c in &plan.concurrency {
                let row = session.measure(&plan, workload, c, Audit::Synced).await?;
                progress(&row);
                rows.push(row);
            }
        }

        let compared: Vec<Workload> = Workload::service_rows()
            .into_iter()
            .filter(|w| {
                let name = w.name(plan.batch);
                plan.selected(&name) && args.unsynced_rows.iter().any(|u| u.trim() == name)
            })
            .collect();
        match (&kms, args.no_unsynced || compared.is_empty()) {
            (_, true) => {}
            (None, false) => {
                notes.push("audit sync comparison skipped: needs a child server".into())
            }
            (Some(kms), false) => {
                let dir = new_data_dir("kms-bench-unsynced-")?;
                let process = ServerProcess::start(kms, dir.path(), false)?;
                let unsynced = Session::open(UnderTest::child(process), &plan).await?;
                let c = plan.unsynced_concurrency;
                for workload in compared {
                    // Back to back, so that the machine's drift hits both alike.
                    let (mut on, mut off) = (Vec::new(), Vec::new());
                    for _ in 0..plan.repeat {
                        on.push(
                            session
                                .measure_once(&plan, workload, c, Audit::Synced)
                                .await?,
                        );
                        off.push(
                            unsynced
                                .measure_once(&plan, workload, c, Audit::Unsynced)
                                .await?,
                        );
                    }
                    let (on, off) = (median(on)?, median(off)?);
                    progress(&off);
                    pairs.push(SyncPair {
                        name: on.name.clone(),
                        concurrency: c,
                        synced_items_per_sec: on.items_per_sec,
                        unsynced_items_per_sec: off.items_per_sec,
                        synced_p99_us: on.p99_us,
                        unsynced_p99_us: off.p99_us,
                        ratio: if off.items_per_sec > 0.0 {
                            on.items_per_sec / off.items_per_sec
                        } else {
                            0.0
                        },
                    });
                    rows.push(off);
                }
                drop(unsynced);
                drop(dir);
            }
        }
        anyhow::Ok(())
    })?;
    drop(synced_dir);

    fill_ratios(&mut rows);
    let targets = evaluate_targets(&rows, &pairs);
    let report = Report {
        tool: "kms-bench run".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        date: now_utc(),
        git_commit: git_commit(),
        machine: Machine::current(),
        settings: Settings {
            duration_s: plan.limits.duration.as_secs_f64(),
            warmup_s: plan.limits.warmup.as_secs_f64(),
            max_calls_per_row: plan.limits.max_calls,
            concurrency: plan.concurrency.clone(),
            batch_items: plan.batch,
            tasks_per_channel: plan.tasks_per_channel,
            repeat: plan.repeat,
            server: server_label,
            build: build_profile().into(),
            data_dir_parent: args
                .endpoint
                .is_none()
                .then(|| parent.display().to_string()),
            quick: args.quick,
        },
        rows,
        audit_sync: pairs,
        targets,
        notes,
    };
    let mut out = std::io::stdout().lock();
    print(&mut out, &report)?;
    if let Some(path) = &args.compare {
        let old = Report::read_json(path)?;
        print_comparison(&mut out, &old, &report)?;
    }
    out.flush()?;
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    let failed: Vec<String> = report
        .rows
        .iter()
        .filter(|r| r.errors > 0 || r.calls == 0)
        .map(|r| format!("{} c={}", r.name, r.concurrency))
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "rows with failed calls or no call counted: {}",
        failed.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(ops: f64, errors: u64) -> Row {
        let mut row = Row::new(
            "Encrypt 32B".into(),
            Kind::Service,
            Some(Audit::Synced),
            8,
            1,
            &crate::load::Measurement {
                calls: 1,
                items: 1,
                elapsed: Duration::from_secs(1),
                latency: hdrhistogram::Histogram::new(3).expect("histogram"),
                errors,
                first_error: (errors > 0).then(|| "boom".to_owned()),
                client_cpu_ticks: 0,
                server_cpu_ticks: None,
            },
            None,
        );
        row.items_per_sec = ops;
        row
    }

    #[test]
    fn median_run_keeps_every_runs_ops_and_every_failure() {
        let row = median(vec![
            run_with(300.0, 0),
            run_with(100.0, 2),
            run_with(200.0, 0),
        ])
        .expect("median");
        assert_eq!(row.items_per_sec, 200.0);
        assert_eq!(row.runs_items_per_sec, [300.0, 100.0, 200.0]);
        assert_eq!(row.errors, 2);
        assert_eq!(row.first_error.as_deref(), Some("boom"));
        assert!(median(Vec::new()).is_err());
    }

    #[test]
    fn filter_selects_by_prefix() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["run", "--filter", "Encrypt 32B,batch"]);
        let plan = Plan::new(&cli.expect("args").run).expect("plan");
        assert!(plan.selected("Encrypt 32B"));
        assert!(plan.selected("BatchDecrypt 100x32B"));
        assert!(!plan.selected("ReEncrypt 32B"));
        assert!(!plan.selected("hsm-raw encrypt 32B"));
        assert!(plan.with_baselines);
        assert!(plan.baseline_selected(GRPC_NOOP));
    }
}
