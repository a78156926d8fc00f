//! `kms-bench cluster`: what running kms as a cluster over etcd costs,
//! against a single node on the same machine, in one invocation.
//!
//! Both targets are already running (`scripts/bench-cluster.sh` starts them):
//! `--endpoints A,B,C` are the cluster's nodes, `--single S` a single-node
//! server. Every row is measured on the single node and on the cluster back
//! to back (so the machine's drift hits both alike), with the same load code
//! as `kms-bench run` (`load::drive_async`, `workloads::Fixture`):
//!
//! - Encrypt 32B, Decrypt 32B, GenerateDataKey AES-256 at `--concurrency`
//!   client tasks (default 32): the data path, served from each node's
//!   in-memory catalogue view and working-key cache.
//! - CreateKey at `--write-concurrency` tasks (default 4): a catalogue write,
//!   one RocksDB batch on the single node, one etcd transaction comparing and
//!   bumping the catalogue generation on the cluster (design note §2.3), so
//!   concurrent writers on different nodes also race and retry.
//!
//! On the cluster, client task `i` uses endpoint `i mod N` (round-robin), so
//! every node serves an equal share of the tasks. The keys the rows use are
//! created through the first endpoint; before measuring, every endpoint must
//! have served an Encrypt, a Decrypt and a GenerateDataKey with them (a node
//! learns of a new key through its etcd watch, within the staleness bound),
//! else the run fails instead of counting that lag as errors.
//!
//! Every row is bounded in time and count and stops by itself.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kms_proto::v1 as pb;
use kms_proto::v1::key_management_client::KeyManagementClient;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::load::{AsyncCall, Limits, drive_async};
use crate::machine::{Machine, build_profile, git_commit, now_utc};
use crate::report::{Kind, Row, Settings};
use crate::run::{median, progress};
use crate::server::CpuProbe;
use crate::workloads::{Fixture, Workload, connect};

/// Row name of the catalogue-write row (stable: it keys the JSON).
pub const CREATE_KEY: &str = "CreateKey";

/// How long every endpoint may take to serve the freshly created bench keys:
/// longer than the cluster's largest staleness bound (60 s, README "Running
/// a cluster"), so that a node that is merely slow to apply the watch is not
/// reported as broken.
const VISIBLE_WITHIN: Duration = Duration::from_secs(65);

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// The cluster's nodes, comma separated (`host:port` or `http://host:port`).
    /// Client tasks are spread round-robin over them.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// A single-node server (no `[cluster]`) on the same machine, to compare with.
    #[arg(long)]
    single: String,
    /// Client tasks of the Encrypt, Decrypt and GenerateDataKey rows.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Client tasks of the CreateKey row (a catalogue write: low, as in use).
    #[arg(long, default_value_t = 4)]
    write_concurrency: usize,
    /// Seconds measured per row and target, after the warm-up [default: 3, --quick: 0.3].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of warm-up per row and target [default: 0.5, --quick: 0.1].
    #[arg(long)]
    warmup: Option<f64>,
    /// Calls counted per row at most.
    #[arg(long, default_value_t = 1_000_000)]
    max_ops: u64,
    /// Measure every row this many times on each target (alternating) and
    /// report the median run of each.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Client tasks per HTTP/2 connection: c tasks share ceil(c / N)
    /// connections on the single node, and as many spread over the nodes
    /// (at least one per node).
    #[arg(long, default_value_t = 8)]
    tasks_per_channel: usize,
    /// A smoke run with tiny durations and concurrency 8 (checks the tool
    /// works; not a measurement).
    #[arg(long)]
    quick: bool,
    /// Write both targets' rows, the ratios, the machine and the settings as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What this invocation runs, resolved from the arguments.
#[derive(Debug)]
struct Plan {
    limits: Limits,
    concurrency: usize,
    write_concurrency: usize,
    repeat: usize,
    tasks_per_channel: usize,
}

impl Plan {
    fn new(args: &ClusterArgs) -> anyhow::Result<Plan> {
        let (duration, warmup) = if args.quick { (0.3, 0.1) } else { (3.0, 0.5) };
        let duration = args.duration.unwrap_or(duration);
        let warmup = args.warmup.unwrap_or(warmup);
        let concurrency = if args.quick {
            args.concurrency.min(8)
        } else {
            args.concurrency
        };
        anyhow::ensure!(
            duration > 0.0 && duration <= 3600.0,
            "--duration must be in (0, 3600]"
        );
        anyhow::ensure!(
            (0.0..=600.0).contains(&warmup),
            "--warmup must be in [0, 600]"
        );
        for (flag, c) in [
            ("--concurrency", concurrency),
            ("--write-concurrency", args.write_concurrency),
        ] {
            anyhow::ensure!((1..=4096).contains(&c), "{flag} must be 1 to 4096");
        }
        anyhow::ensure!(args.max_ops > 0, "--max-ops must be positive");
        anyhow::ensure!(
            (1..=100).contains(&args.repeat),
            "--repeat must be 1 to 100"
        );
        anyhow::ensure!(
            args.tasks_per_channel > 0,
            "--tasks-per-channel must be positive"
        );
        Ok(Plan {
            limits: Limits {
                warmup: Duration::from_secs_f64(warmup),
                duration: Duration::from_secs_f64(duration),
                max_calls: args.max_ops,
            },
            concurrency,
            write_concurrency: args.write_concurrency,
            repeat: args.repeat,
            tasks_per_channel: args.tasks_per_channel,
        })
    }
}

/// `host:port` becomes `http://host:port`; a URL is kept as given.
fn endpoint_url(endpoint: &str) -> anyhow::Result<String> {
    let endpoint = endpoint.trim();
    anyhow::ensure!(!endpoint.is_empty(), "an empty endpoint");
    Ok(if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    })
}

/// Channels to `nodes` endpoints, interleaved: `[n0, n1, .., n0, n1, ..]`,
/// `per_node` of each. With [`Fixture::calls`] giving task `i` channel
/// `i mod len` and `len` a multiple of `nodes`, task `i` lands on node `i mod
/// nodes`: round-robin over the nodes.
fn interleave<T: Clone>(per_endpoint: Vec<Vec<T>>) -> Vec<T> {
    let per_node = per_endpoint.iter().map(Vec::len).min().unwrap_or(0);
    (0..per_node)
        .flat_map(|i| per_endpoint.iter().map(move |node| node[i].clone()))
        .collect()
}

/// One measured target: its channels and the bench keys.
#[derive(Debug)]
struct Target {
    label: &'static str,
    /// Interleaved over the target's endpoints (see [`interleave`]).
    channels: Vec<Channel>,
    endpoints: usize,
    fixture: Arc<Fixture>,
}

impl Target {
    async fn open(
        label: &'static str,
        endpoints: &[String],
        plan: &Plan,
    ) -> anyhow::Result<Target> {
        let most = plan.concurrency.max(plan.write_concurrency);
        let per_node = most
            .div_ceil(plan.tasks_per_channel)
            .div_ceil(endpoints.len())
            .max(1);
        let mut per_endpoint = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            per_endpoint.push(connect(endpoint, per_node).await?);
        }
        let channels = interleave(per_endpoint);
        // The keys are created through the first endpoint; the others learn
        // of them through the catalogue (etcd watch on a cluster).
        let fixture = Arc::new(
            Fixture::create(&channels[0], 1)
                .await
                .with_context(|| format!("creating the bench keys on {}", endpoints[0]))?,
        );
        let target = Target {
            label,
            channels,
            endpoints: endpoints.len(),
            fixture,
        };
        target.wait_until_served(endpoints).await?;
        Ok(target)
    }

    /// Waits until every endpoint serves each data-path row once with the
    /// bench keys (see the module doc), for at most [`VISIBLE_WITHIN`].
    async fn wait_until_served(&self, endpoints: &[String]) -> anyhow::Result<()> {
        let deadline = Instant::now() + VISIBLE_WITHIN;
        for (node, endpoint) in endpoints.iter().enumerate() {
            for workload in data_rows() {
                let channel = &self.channels[node..=node];
                let mut call = self
                    .fixture
                    .calls(workload, channel, 1)
                    .pop()
                    .context("no call built")?;
                loop {
                    match call.call().await {
                        Ok(_) => break,
                        Err(e) if Instant::now() >= deadline => anyhow::bail!(
                            "{} endpoint {endpoint} does not serve {} with the bench keys \
                             after {} s: {e}",
                            self.label,
                            workload.name(1),
                            VISIBLE_WITHIN.as_secs()
                        ),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        }
        Ok(())
    }

    /// The first `ceil(tasks / per_channel)` channels, rounded up to a whole
    /// number of rounds over the endpoints (so that round-robin holds).
    fn channels_for(&self, tasks: usize, plan: &Plan) -> &[Channel] {
        let wanted = tasks
            .div_ceil(plan.tasks_per_channel)
            .div_ceil(self.endpoints)
            .max(1)
            * self.endpoints;
        &self.channels[..wanted.min(self.channels.len())]
    }

    async fn measure_once(&self, plan: &Plan, row: &RowSpec) -> anyhow::Result<Row> {
        let probe = CpuProbe::new(None);
        let (name, concurrency, m) = match row {
            RowSpec::Data(workload) => {
                let channels = self.channels_for(plan.concurrency, plan);
                let calls = self.fixture.calls(*workload, channels, plan.concurrency);
                let m = drive_async(calls, &plan.limits, &probe).await?;
                (workload.name(1), plan.concurrency, m)
            }
            RowSpec::CreateKey => {
                let channels = self.channels_for(plan.write_concurrency, plan);
                let calls: Vec<CreateKeyCall> = (0..plan.write_concurrency)
                    .map(|i| CreateKeyCall {
                        client: KeyManagementClient::new(channels[i % channels.len()].clone()),
                    })
                    .collect();
                let m = drive_async(calls, &plan.limits, &probe).await?;
                (CREATE_KEY.to_owned(), plan.write_concurrency, m)
            }
        };
        Ok(Row::new(
            name,
            Kind::Service,
            None,
            concurrency,
            1,
            &m,
            None,
        ))
    }
}

/// The data-path rows, in table order.
fn data_rows() -> [Workload; 3] {
    [
        Workload::Encrypt { bytes: 32 },
        Workload::Decrypt,
        Workload::GenerateDataKey,
    ]
}

/// One row of the comparison.
#[derive(Debug, Clone, Copy)]
enum RowSpec {
    Data(Workload),
    CreateKey,
}

/// One client task's CreateKey call: a new key each time (the catalogue
/// grows by one key and one wrapped version per call).
#[derive(Debug)]
struct CreateKeyCall {
    client: KeyManagementClient<Channel>,
}

impl CreateKeyCall {
    async fn run(&mut self) -> Result<u64, String> {
        let key = self
            .client
            .create_key(pb::CreateKeyRequest {
                description: "kms-bench cluster catalogue write".to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("CreateKey: {:?}: {}", s.code(), s.message()))?
            .into_inner()
            .key_metadata
            .ok_or_else(|| "CreateKey: no metadata".to_owned())?;
        if key.key_id.is_empty() {
            return Err("CreateKey: empty key id".to_owned());
        }
        Ok(1)
    }
}

impl AsyncCall for CreateKeyCall {
    fn call(&mut self) -> impl Future<Output = Result<u64, String>> + Send + '_ {
        self.run()
    }
}

/// A row measured on both targets, with the cluster's cost as ratios.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterPair {
    pub name: String,
    pub concurrency: usize,
    pub single_items_per_sec: f64,
    pub cluster_items_per_sec: f64,
    /// cluster ÷ single ops/s (1.0 = no cost; `None` when the single node
    /// counted nothing).
    pub ops_ratio: Option<f64>,
    pub single_p50_us: f64,
    pub cluster_p50_us: f64,
    pub single_p99_us: f64,
    pub cluster_p99_us: f64,
    /// cluster ÷ single p99 latency.
    pub p99_ratio: Option<f64>,
    pub single_errors: u64,
    pub cluster_errors: u64,
}

fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

impl ClusterPair {
    fn new(single: &Row, cluster: &Row) -> ClusterPair {
        ClusterPair {
            name: single.name.clone(),
            concurrency: single.concurrency,
            single_items_per_sec: single.items_per_sec,
            cluster_items_per_sec: cluster.items_per_sec,
            ops_ratio: ratio(cluster.items_per_sec, single.items_per_sec),
            single_p50_us: single.p50_us,
            cluster_p50_us: cluster.p50_us,
            single_p99_us: single.p99_us,
            cluster_p99_us: cluster.p99_us,
            p99_ratio: ratio(cluster.p99_us, single.p99_us),
            single_errors: single.errors,
            cluster_errors: cluster.errors,
        }
    }
}

/// The JSON of `kms-bench cluster --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterReport {
    pub tool: String,
    pub version: String,
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: Machine,
    pub settings: Settings,
    pub single_endpoint: String,
    pub cluster_endpoints: Vec<String>,
    /// Every row as `kms-bench run` reports it, per target.
    pub single: Vec<Row>,
    pub cluster: Vec<Row>,
    pub pairs: Vec<ClusterPair>,
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn print(out: &mut impl Write, report: &ClusterReport) -> std::io::Result<()> {
    let s = &report.settings;
    writeln!(
        out,
        "kms-bench {} cluster — {} — {} — {} CPUs ({}) — {} build",
        report.version,
        report.date,
        report.git_commit.as_deref().unwrap_or("no git"),
        report.machine.nproc,
        report.machine.cpu_model.as_deref().unwrap_or("?"),
        s.build,
    )?;
    writeln!(
        out,
        "{} s per row and target after {} s warm-up, median of {} run(s); single {} vs cluster {} (tasks round-robin over the nodes)",
        s.duration_s,
        s.warmup_s,
        s.repeat,
        report.single_endpoint,
        report.cluster_endpoints.join(",")
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<24} {:>4} {:>10} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9}",
        "row",
        "c",
        "single/s",
        "cluster/s",
        "c÷s",
        "p50 s µs",
        "p50 c µs",
        "p99 s µs",
        "p99 c µs",
        "p99 c÷s",
        "errors s/c"
    )?;
    writeln!(out, "{}", "-".repeat(112))?;
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    for p in &report.pairs {
        writeln!(
            out,
            "{:<24} {:>4} {:>10} {:>10} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7} {:>9}",
            p.name,
            p.concurrency,
            thousands(p.single_items_per_sec),
            thousands(p.cluster_items_per_sec),
            opt(p.ops_ratio),
            p.single_p50_us,
            p.cluster_p50_us,
            p.single_p99_us,
            p.cluster_p99_us,
            opt(p.p99_ratio),
            format!("{}/{}", p.single_errors, p.cluster_errors),
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "c÷s = cluster ops/s ÷ single-node ops/s (below 1: the cluster's cost); p99 c÷s = cluster p99 ÷ single p99. Both targets share this machine's {} CPUs with the bench client.",
        report.machine.nproc
    )?;
    Ok(())
}

pub fn run(args: &ClusterArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    let cluster_endpoints: Vec<String> = args
        .endpoints
        .iter()
        .map(|e| endpoint_url(e))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        !cluster_endpoints.is_empty(),
        "--endpoints needs at least one endpoint"
    );
    let single_endpoint = endpoint_url(&args.single)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kms-bench")
        .build()
        .context("starting the async runtime")?;

    let specs: Vec<RowSpec> = data_rows()
        .into_iter()
        .map(RowSpec::Data)
        .chain([RowSpec::CreateKey])
        .collect();
    let (single_rows, cluster_rows) = runtime.block_on(async {
        let single = Target::open("single", std::slice::from_ref(&single_endpoint), &plan).await?;
        let cluster = Target::open("cluster", &cluster_endpoints, &plan).await?;
        let (mut single_rows, mut cluster_rows) = (Vec::new(), Vec::new());
        for spec in &specs {
            // Back to back, alternating, so that drift hits both alike.
            let (mut on_single, mut on_cluster) = (Vec::new(), Vec::new());
            for _ in 0..plan.repeat {
                on_single.push(single.measure_once(&plan, spec).await?);
                on_cluster.push(cluster.measure_once(&plan, spec).await?);
            }
            for (label, runs, rows) in [
                (single.label, on_single, &mut single_rows),
                (cluster.label, on_cluster, &mut cluster_rows),
            ] {
                let row = median(runs)?;
                eprint!("{label:>7} ");
                progress(&row);
                rows.push(row);
            }
        }
        anyhow::Ok((single_rows, cluster_rows))
    })?;

    let pairs = single_rows
        .iter()
        .zip(&cluster_rows)
        .map(|(s, c)| ClusterPair::new(s, c))
        .collect();
    let report = ClusterReport {
        tool: "kms-bench cluster".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        date: now_utc(),
        git_commit: git_commit(),
        machine: Machine::current(),
        settings: Settings {
            duration_s: plan.limits.duration.as_secs_f64(),
            warmup_s: plan.limits.warmup.as_secs_f64(),
            max_calls_per_row: plan.limits.max_calls,
            concurrency: vec![plan.concurrency, plan.write_concurrency],
            batch_items: 1,
            tasks_per_channel: plan.tasks_per_channel,
            repeat: plan.repeat,
            server: format!(
                "single {single_endpoint} vs cluster {}",
                cluster_endpoints.join(",")
            ),
            build: build_profile().into(),
            data_dir_parent: None,
            quick: args.quick,
        },
        single_endpoint,
        cluster_endpoints,
        single: single_rows,
        cluster: cluster_rows,
        pairs,
    };
    let mut out = std::io::stdout().lock();
    print(&mut out, &report)?;
    out.flush()?;
    if let Some(path) = &args.json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: Vec<String> = report
        .single
        .iter()
        .chain(&report.cluster)
        .zip(
            std::iter::repeat_n("single", report.single.len())
                .chain(std::iter::repeat_n("cluster", report.cluster.len())),
        )
        .filter(|(r, _)| r.errors > 0 || r.calls == 0)
        .map(|(r, target)| format!("{target} {} c={}", r.name, r.concurrency))
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

    #[test]
    fn endpoints_get_a_scheme_only_when_they_lack_one() {
        assert_eq!(
            endpoint_url(" 127.0.0.1:50051").expect("url"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            endpoint_url("https://kms.example:443").expect("url"),
            "https://kms.example:443"
        );
        assert!(endpoint_url("").is_err());
    }

    #[test]
    fn interleaved_channels_put_task_i_on_node_i_mod_n() {
        let channels = interleave(vec![vec!["a0", "a1"], vec!["b0", "b1"], vec!["c0", "c1"]]);
        assert_eq!(channels, ["a0", "b0", "c0", "a1", "b1", "c1"]);
        // As Fixture::calls assigns them, over a prefix of whole rounds.
        let nodes: Vec<char> = (0..7)
            .map(|i| channels[..3][i % 3].chars().next().unwrap_or('?'))
            .collect();
        assert_eq!(nodes, ['a', 'b', 'c', 'a', 'b', 'c', 'a']);
    }

    #[test]
    fn ratios_are_cluster_over_single_and_absent_without_a_single_figure() {
        assert_eq!(ratio(50.0, 200.0), Some(0.25));
        assert_eq!(ratio(50.0, 0.0), None);
    }

    #[test]
    fn quick_caps_concurrency_and_shortens_rows() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            cluster: ClusterArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "cluster",
            "--endpoints",
            "a:1,b:2",
            "--single",
            "c:3",
            "--quick",
        ])
        .expect("args");
        assert_eq!(cli.cluster.endpoints, ["a:1", "b:2"]);
        let plan = Plan::new(&cli.cluster).expect("plan");
        assert_eq!(plan.concurrency, 8);
        assert_eq!(plan.write_concurrency, 4);
        assert_eq!(plan.limits.duration, Duration::from_millis(300));
    }
}
