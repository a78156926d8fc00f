//! The results of `kms-bench run`: rows, ratios, the issue-5 targets, the
//! human table, the JSON file, and the comparison with an earlier JSON file.
//!
//! Row names are stable (they key `--compare`); the JSON layout only grows.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::load::Measurement;
use crate::machine::Machine;
use crate::server::CPU_TICK;

/// What a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// AES-GCM straight to the token (the HSM ceiling).
    HsmRaw,
    /// The gRPC health check (the transport ceiling).
    GrpcNoop,
    /// A kms RPC.
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Audit {
    Synced,
    Unsynced,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub kind: Kind,
    /// The server's audit mode (service and grpc-noop rows).
    pub audit: Option<Audit>,
    /// Client tasks (gRPC rows) or threads (hsm-raw rows).
    pub concurrency: usize,
    pub items_per_call: u64,
    pub calls: u64,
    pub items: u64,
    pub seconds: f64,
    pub calls_per_sec: f64,
    /// Items per second: the "ops/s" of the table (= calls/s except batches).
    pub items_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// items/s ÷ hsm-raw encrypt items/s at the same concurrency.
    pub vs_hsm_raw: Option<f64>,
    /// calls/s ÷ grpc-noop calls/s at the same concurrency (service rows).
    pub vs_grpc_noop: Option<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU time per counted call over the window, bench process and server.
    pub client_cpu_us_per_call: Option<f64>,
    pub server_cpu_us_per_call: Option<f64>,
    /// The server's VmRSS right after the row.
    pub server_rss_kib: Option<u64>,
    /// ops/s of every run of the row (`--repeat`); the row reports the median run.
    #[serde(default)]
    pub runs_items_per_sec: Vec<f64>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Row {
    pub fn new(
        name: String,
        kind: Kind,
        audit: Option<Audit>,
        concurrency: usize,
        items_per_call: u64,
        m: &Measurement,
        server_rss_kib: Option<u64>,
    ) -> Row {
        let seconds = m.elapsed.as_secs_f64();
        let per_sec = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let cpu_per_call = |ticks: u64| {
            (m.calls > 0).then(|| (ticks as f64 * CPU_TICK.as_micros() as f64) / m.calls as f64)
        };
        Row {
            name,
            kind,
            audit,
            concurrency,
            items_per_call,
            calls: m.calls,
            items: m.items,
            seconds,
            calls_per_sec: per_sec(m.calls),
            items_per_sec: per_sec(m.items),
            p50_us: us(m.latency.value_at_quantile(0.50)),
            p99_us: us(m.latency.value_at_quantile(0.99)),
            p999_us: us(m.latency.value_at_quantile(0.999)),
            max_us: us(m.latency.max()),
            mean_us: m.latency.mean() / 1000.0,
            vs_hsm_raw: None,
            vs_grpc_noop: None,
            errors: m.errors,
            first_error: m.first_error.clone(),
            client_cpu_us_per_call: cpu_per_call(m.client_cpu_ticks),
            server_cpu_us_per_call: m.server_cpu_ticks.and_then(cpu_per_call),
            server_rss_kib,
            runs_items_per_sec: Vec::new(),
        }
    }

    /// The key rows are matched by across runs.
    pub fn key(&self) -> (String, Option<Audit>, usize) {
        (self.name.clone(), self.audit, self.concurrency)
    }
}

/// Fills the ratio columns from the baseline rows of the same concurrency.
pub fn fill_ratios(rows: &mut [Row]) {
    let lookup = |rows: &[Row], name: &str, c: usize| {
        rows.iter()
            .find(|r| r.name == name && r.concurrency == c && r.calls > 0)
            .map(|r| r.items_per_sec)
    };
    let baselines: Vec<(usize, Option<f64>, Option<f64>)> = rows
        .iter()
        .map(|r| {
            (
                r.concurrency,
                lookup(rows, HSM_RAW_ENCRYPT, r.concurrency),
                lookup(rows, GRPC_NOOP, r.concurrency),
            )
        })
        .collect();
    for (row, (_, hsm, noop)) in rows.iter_mut().zip(baselines) {
        if row.kind == Kind::HsmRaw && row.name == HSM_RAW_ENCRYPT {
            continue;
        }
        row.vs_hsm_raw = hsm.filter(|v| *v > 0.0).map(|v| row.items_per_sec / v);
        if row.kind == Kind::Service {
            row.vs_grpc_noop = noop.filter(|v| *v > 0.0).map(|v| row.calls_per_sec / v);
        }
    }
}

pub const HSM_RAW_ENCRYPT: &str = "hsm-raw encrypt 32B";
pub const HSM_RAW_DECRYPT: &str = "hsm-raw decrypt 32B";
pub const GRPC_NOOP: &str = "grpc-noop";

/// A synced row and an unsynced row measured back to back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncPair {
    pub name: String,
    pub concurrency: usize,
    pub synced_items_per_sec: f64,
    pub unsynced_items_per_sec: f64,
    pub synced_p99_us: f64,
    pub unsynced_p99_us: f64,
    /// synced ÷ unsynced.
    pub ratio: f64,
}

/// One of the issue-5 part-3 targets, evaluated on this run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub target: String,
    pub measured: Option<f64>,
    pub threshold: f64,
    /// `None` when this run lacks the rows to say.
    pub met: Option<bool>,
    pub detail: String,
}

/// The concurrency at which issue 5 sets its targets.
pub const TARGET_CONCURRENCY: usize = 32;

pub fn evaluate_targets(rows: &[Row], pairs: &[SyncPair]) -> Vec<Target> {
    let c = TARGET_CONCURRENCY;
    let service = |name: &str| {
        rows.iter().find(|r| {
            r.kind == Kind::Service
                && r.audit == Some(Audit::Synced)
                && r.concurrency == c
                && r.name.starts_with(name)
        })
    };
    let mut targets = Vec::new();
    for name in ["Encrypt 32B", "Encrypt 1KiB", "GenerateDataKey AES-256"] {
        let measured = service(name).and_then(|r| r.vs_grpc_noop);
        targets.push(Target {
            target: format!("{name} at c={c} ≥ 50% of grpc-noop"),
            measured,
            threshold: 0.5,
            met: measured.map(|v| v >= 0.5),
            detail: "calls/s ÷ grpc-noop calls/s".into(),
        });
    }
    let batch = service("BatchGenerateDataKey");
    let measured = batch.and_then(|r| r.vs_hsm_raw);
    targets.push(Target {
        target: format!("BatchGenerateDataKey at c={c} ≥ 50% of hsm-raw encrypt, per item"),
        measured,
        threshold: 0.5,
        met: measured.map(|v| v >= 0.5),
        detail: "items/s ÷ hsm-raw encrypt ops/s at the same concurrency".into(),
    });
    let worst = rows
        .iter()
        .filter(|r| {
            r.kind == Kind::Service
                && r.audit == Some(Audit::Synced)
                && r.concurrency == c
                && r.items_per_call == 1
                && r.calls > 0
        })
        .max_by(|a, b| a.p99_us.total_cmp(&b.p99_us));
    targets.push(Target {
        target: format!("p99 at c={c} < 5 ms"),
        measured: worst.map(|r| r.p99_us / 1000.0),
        threshold: 5.0,
        met: worst.map(|r| r.p99_us < 5000.0),
        detail: worst.map_or_else(
            || "no single-item service row at this concurrency".into(),
            |r| format!("worst single-item row: {} (ms)", r.name),
        ),
    });
    let cheapest = pairs.iter().min_by(|a, b| a.ratio.total_cmp(&b.ratio));
    targets.push(Target {
        target: "synced audit costs < 15% vs unsynced".into(),
        measured: cheapest.map(|p| 1.0 - p.ratio),
        threshold: 0.15,
        met: cheapest.map(|p| p.ratio > 0.85),
        detail: cheapest.map_or_else(
            || "no synced/unsynced pair measured".into(),
            |p| {
                format!(
                    "worst pair: {} c={} (1 - synced÷unsynced)",
                    p.name, p.concurrency
                )
            },
        ),
    });
    targets
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub duration_s: f64,
    pub warmup_s: f64,
    pub max_calls_per_row: u64,
    pub concurrency: Vec<usize>,
    pub batch_items: usize,
    pub tasks_per_channel: usize,
    /// Runs per row; each row is the median run.
    #[serde(default = "one")]
    pub repeat: usize,
    pub server: String,
    pub build: String,
    pub data_dir_parent: Option<String>,
    pub quick: bool,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub date: String,
    pub git_commit: Option<String>,
    pub machine: Machine,
    pub settings: Settings,
    pub rows: Vec<Row>,
    pub audit_sync: Vec<SyncPair>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read_json(path: &Path) -> anyhow::Result<Report> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
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

fn latency(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

fn audit_label(a: Option<Audit>) -> &'static str {
    match a {
        Some(Audit::Synced) => "sync",
        Some(Audit::Unsynced) => "nosync",
        None => "",
    }
}

pub fn print(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let s = &report.settings;
    writeln!(
        out,
        "kms-bench {} — {} — {} — {} CPUs ({}) — {} build",
        report.version,
        report.date,
        report.git_commit.as_deref().unwrap_or("no git"),
        report.machine.nproc,
        report.machine.cpu_model.as_deref().unwrap_or("?"),
        s.build,
    )?;
    writeln!(
        out,
        "{} s per row after {} s warm-up (at most {} calls), median of {} run(s), server {}, {} client tasks per HTTP/2 connection",
        s.duration_s, s.warmup_s, s.max_calls_per_row, s.repeat, s.server, s.tasks_per_channel
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<34} {:>4} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>13} {:>7} {:>6}",
        "row",
        "c",
        "audit",
        "ops/s",
        "calls/s",
        "p50 µs",
        "p99 µs",
        "p99.9µs",
        "÷hsm",
        "÷noop",
        "cpu µs/call",
        "rss MiB",
        "errors"
    )?;
    writeln!(out, "{}", "-".repeat(140))?;
    let mut previous: Option<&str> = None;
    for r in &report.rows {
        if previous.is_some_and(|p| p != r.name) {
            writeln!(out)?;
        }
        previous = Some(&r.name);
        let cpu = match (r.client_cpu_us_per_call, r.server_cpu_us_per_call) {
            (Some(c), Some(s)) => format!("{c:.0}+{s:.0}"),
            (Some(c), None) => format!("{c:.0}"),
            _ => "-".into(),
        };
        writeln!(
            out,
            "{:<34} {:>4} {:>6} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>13} {:>7} {:>6}",
            r.name,
            r.concurrency,
            audit_label(r.audit),
            thousands(r.items_per_sec),
            thousands(r.calls_per_sec),
            latency(r.p50_us),
            latency(r.p99_us),
            latency(r.p999_us),
            opt(r.vs_hsm_raw, |v| format!("{v:.2}")),
            opt(r.vs_grpc_noop, |v| format!("{v:.2}")),
            cpu,
            opt(r.server_rss_kib.map(|k| k as f64), |k| format!(
                "{:.0}",
                k / 1024.0
            )),
            r.errors,
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "ops/s counts items (a batch call of N items is N ops); ÷hsm = ops/s ÷ hsm-raw encrypt ops/s, ÷noop = calls/s ÷ grpc-noop calls/s, both at the same concurrency; cpu = bench process + server per call."
    )?;
    if !report.audit_sync.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "Audit sync cost (synced and unsynced servers measured back to back):"
        )?;
        writeln!(
            out,
            "{:<34} {:>4} {:>12} {:>12} {:>15} {:>15} {:>16}",
            "row",
            "c",
            "synced ops/s",
            "unsynced",
            "synced p99 µs",
            "unsynced p99",
            "synced÷unsynced"
        )?;
        for p in &report.audit_sync {
            writeln!(
                out,
                "{:<34} {:>4} {:>12} {:>12} {:>15} {:>15} {:>16.2}",
                p.name,
                p.concurrency,
                thousands(p.synced_items_per_sec),
                thousands(p.unsynced_items_per_sec),
                latency(p.synced_p99_us),
                latency(p.unsynced_p99_us),
                p.ratio
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "Targets (issue 5, part 3):")?;
    for t in &report.targets {
        let verdict = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "n/a   ",
        };
        writeln!(
            out,
            "  {verdict} {:<62} measured {:>6} (threshold {}; {})",
            t.target,
            opt(t.measured, |v| format!("{v:.2}")),
            t.threshold,
            t.detail
        )?;
    }
    for note in &report.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

/// Prints every row present in both reports: ops/s and p99 before and after.
pub fn print_comparison(out: &mut impl Write, old: &Report, new: &Report) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "Compared with {} ({}):",
        old.date,
        old.git_commit.as_deref().unwrap_or("no git")
    )?;
    writeln!(
        out,
        "{:<34} {:>4} {:>6} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7}",
        "row", "c", "audit", "old ops/s", "new ops/s", "new÷old", "old p99", "new p99", "new÷old"
    )?;
    for r in &new.rows {
        let Some(o) = old.rows.iter().find(|o| o.key() == r.key()) else {
            continue;
        };
        let ratio = |new: f64, old: f64| {
            if old > 0.0 {
                format!("{:.2}", new / old)
            } else {
                "-".into()
            }
        };
        writeln!(
            out,
            "{:<34} {:>4} {:>6} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7}",
            r.name,
            r.concurrency,
            audit_label(r.audit),
            thousands(o.items_per_sec),
            thousands(r.items_per_sec),
            ratio(r.items_per_sec, o.items_per_sec),
            latency(o.p99_us),
            latency(r.p99_us),
            ratio(r.p99_us, o.p99_us),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, kind: Kind, c: usize, items_per_sec: f64, calls_per_sec: f64) -> Row {
        Row {
            name: name.into(),
            kind,
            audit: (kind != Kind::HsmRaw).then_some(Audit::Synced),
            concurrency: c,
            items_per_call: (items_per_sec / calls_per_sec) as u64,
            calls: 10,
            items: 10,
            seconds: 1.0,
            calls_per_sec,
            items_per_sec,
            p50_us: 1.0,
            p99_us: 2.0,
            p999_us: 3.0,
            max_us: 4.0,
            mean_us: 1.0,
            vs_hsm_raw: None,
            vs_grpc_noop: None,
            errors: 0,
            first_error: None,
            client_cpu_us_per_call: None,
            server_cpu_us_per_call: None,
            server_rss_kib: None,
            runs_items_per_sec: Vec::new(),
        }
    }

    #[test]
    fn ratios_use_the_baselines_of_the_same_concurrency_and_count_batch_items() {
        let mut rows = vec![
            row(HSM_RAW_ENCRYPT, Kind::HsmRaw, 8, 40_000.0, 40_000.0),
            row(HSM_RAW_ENCRYPT, Kind::HsmRaw, 32, 20_000.0, 20_000.0),
            row(GRPC_NOOP, Kind::GrpcNoop, 32, 40_000.0, 40_000.0),
            row("Encrypt 32B", Kind::Service, 32, 10_000.0, 10_000.0),
            row(
                "BatchGenerateDataKey 100xAES-256",
                Kind::Service,
                32,
                15_000.0,
                150.0,
            ),
        ];
        fill_ratios(&mut rows);
        assert_eq!(rows[0].vs_hsm_raw, None);
        assert_eq!(rows[3].vs_hsm_raw, Some(0.5));
        assert_eq!(rows[3].vs_grpc_noop, Some(0.25));
        assert_eq!(rows[4].vs_hsm_raw, Some(0.75));
        assert_eq!(rows[4].vs_grpc_noop, Some(150.0 / 40_000.0));
        assert_eq!(rows[2].vs_grpc_noop, None);
        assert_eq!(rows[2].vs_hsm_raw, Some(2.0));

        let targets = evaluate_targets(&rows, &[]);
        let encrypt = &targets[0];
        assert_eq!(encrypt.met, Some(false));
        let batch = targets
            .iter()
            .find(|t| t.target.starts_with("BatchGenerateDataKey"))
            .expect("batch target");
        assert_eq!(batch.met, Some(true));
        let sync = targets.last().expect("sync target");
        assert_eq!(sync.met, None);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}
