//! `kms re-encrypt`: moves a file (or stdin) of ciphertext blobs to the
//! primary version of a key with BatchReEncrypt, through kms-client's
//! [`ReEncryptJob`] (line formats, failure handling and the checkpoint are
//! described there): one output line per input line, in order, resumable
//! after any interruption by running the same command again.
//!
//! A progress bar (lines, rate, ETA) goes to stderr when stderr is a
//! terminal and `--json` is not given. The summary goes to stdout: a table,
//! or one JSON object with `--json`. Lines that failed are copied unchanged
//! to the output and make the command exit non-zero after the summary.
//!
//! Never: print blob bytes or context values of the input.

use std::io::{BufRead, BufReader, IsTerminal as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kms_client::reencrypt::{DEFAULT_BATCH_SIZE, JobProgress};
use kms_client::{ReEncryptJob, ReEncryptSummary};

use super::ClientOptions;
use super::output::sanitize;

/// Failures listed by the table summary (all of the kept ones with `--json`).
const FAILURES_SHOWN: usize = 20;

/// Arguments of `kms re-encrypt`.
#[derive(Debug, clap::Args)]
pub struct ReEncryptArgs {
    /// Input: one blob per line, either base64 or a JSON object
    /// {"ciphertext_blob": "<base64>", "encryption_context": {...}}; "-" for stdin.
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Output file: the new blobs, one line per input line, same order and form.
    #[arg(long = "out", value_name = "FILE")]
    pub output: PathBuf,
    /// Move every blob to the primary version of this key id or alias
    /// (default: each blob to the primary version of its own key).
    #[arg(long, value_name = "KEY")]
    pub destination_key: Option<String>,
    /// Checkpoint file (default: the output path followed by ".checkpoint").
    /// Present when the command starts: the run resumes from it.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Lines per BatchReEncrypt call (at most the server's limits.max_batch_items).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH_SIZE as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// How long to keep retrying while the server is unavailable, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub unavailable_patience: u64,
}

pub(crate) async fn run(args: ReEncryptArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let checkpoint = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| ReEncryptJob::default_checkpoint(&args.output));
    let mut job = ReEncryptJob::new(&args.output, &checkpoint)
        .batch_size(args.batch_size as usize)
        .unavailable_patience(Duration::from_secs(args.unavailable_patience));
    if let Some(key) = &args.destination_key {
        job = job.destination_key(key.clone());
    }
    let from_stdin = args.input.as_os_str() == "-";
    let show_progress = !options.json && std::io::stderr().is_terminal();
    // The bar's length: the input's lines, when it is a file (one quick pass).
    let total = if show_progress && !from_stdin {
        Some(count_lines(&args.input)?)
    } else {
        None
    };
    let bar = show_progress.then(|| progress_bar(total));
    let client = super::connect_patiently(
        options,
        Duration::from_secs(args.unavailable_patience),
        || super::client_config(options),
    )
    .await?;
    if let Some(key) = &args.destination_key {
        check_destination(&client, key).await?;
    }
    let mut started = false;
    // Lines covered by the last checkpoint (the callback runs right after
    // each one): what an interruption keeps.
    let checkpointed = std::cell::Cell::new(0u64);
    let on_progress = |p: &JobProgress| {
        checkpointed.set(p.lines_done);
        if let Some(bar) = &bar {
            bar.set_position(p.lines_done);
            if !started {
                // Rate and ETA from this run's own pace, not the resumed lines.
                bar.reset_eta();
                bar.reset_elapsed();
                started = true;
            }
            bar.set_message(format!(
                "moved {} · current {} · failed {}",
                p.moved, p.already_current, p.failed
            ));
        }
    };
    let input: Box<dyn BufRead> = if from_stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(&args.input)
            .with_context(|| format!("cannot open --in {}", args.input.display()))?;
        Box::new(BufReader::new(file))
    };
    // Ctrl-C stops between two awaits of the job: whatever it wrote after
    // the last checkpoint is dropped by the resume (as after a crash), so
    // stopping here loses nothing; it only says so instead of dying.
    let result = tokio::select! {
        result = job.run(&client, input, on_progress) => result,
        _ = tokio::signal::ctrl_c() => {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            anyhow::bail!(
                "interrupted: {} lines are done and checkpointed; run the same command again to resume from {}",
                checkpointed.get(),
                checkpoint.display()
            );
        }
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = match result {
        Ok(summary) => summary,
        Err(error) if error.is_resumable() => {
            return Err(anyhow::Error::new(error).context(format!(
                "re-encryption stopped; {} lines are done and checkpointed: once the cause below is fixed, run the same command again to resume from {}",
                checkpointed.get(),
                checkpoint.display()
            )));
        }
        Err(error) => return Err(anyhow::Error::new(error).context("re-encryption refused")),
    };
    print_summary(&summary, options.json)?;
    if summary.failed > 0 {
        anyhow::bail!(
            "{} of {} lines failed; they are copied unchanged to {}",
            summary.failed,
            summary.lines,
            args.output.display()
        );
    }
    Ok(())
}

/// Refuses at once a destination that does not exist or is not enabled:
/// otherwise every line would fail on its own (each refusal audited) and
/// the output would be a copy of the input. A caller who may not describe
/// the key is not refused here: BatchReEncrypt decides.
async fn check_destination(client: &kms_client::KmsClient, key: &str) -> anyhow::Result<()> {
    let described = client
        .describe_key(kms_proto::v1::DescribeKeyRequest {
            key_id: key.to_owned(),
        })
        .await;
    match described {
        Ok(reply) => {
            let state = reply.key_metadata.map(|m| m.state).unwrap_or_default();
            if state != kms_proto::v1::KeyState::Enabled as i32 {
                anyhow::bail!(
                    "re-encryption refused: the destination key {key} is {}, not ENABLED; nothing was changed",
                    super::output::key_state_name(state)
                );
            }
            Ok(())
        }
        Err(error)
            if matches!(
                error.code(),
                Some(tonic::Code::NotFound | tonic::Code::InvalidArgument)
            ) =>
        {
            Err(anyhow::Error::new(error).context(format!(
                "re-encryption refused: no destination key {key}; nothing was changed"
            )))
        }
        Err(_) => Ok(()),
    }
}

fn count_lines(path: &std::path::Path) -> anyhow::Result<u64> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open --in {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let (mut lines, mut last) = (0, None);
    loop {
        let buffer = reader
            .fill_buf()
            .with_context(|| format!("cannot read --in {}", path.display()))?;
        let Some(&end) = buffer.last() else {
            // A last line without a newline is a line too.
            return Ok(lines + u64::from(last.is_some_and(|b| b != b'\n')));
        };
        lines += buffer.iter().filter(|b| **b == b'\n').count() as u64;
        last = Some(end);
        let len = buffer.len();
        reader.consume(len);
    }
}

fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            indicatif::ProgressBar::new(total),
            "{wide_bar} {pos}/{len} lines · {per_sec} · ETA {eta} · {msg}",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {pos} lines · {per_sec} · {msg}",
        ),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn print_summary(summary: &ReEncryptSummary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    println!("lines            {}", summary.lines);
    if summary.resumed_from > 0 {
        println!("resumed at line  {}", summary.resumed_from + 1);
    }
    println!("moved            {}", summary.moved);
    println!("already current  {}", summary.already_current);
    println!("failed           {}", summary.failed);
    if summary.blank > 0 {
        println!("blank            {}", summary.blank);
    }
    for failure in summary.failures.iter().take(FAILURES_SHOWN) {
        println!(
            "  line {}: {}: {}",
            failure.line,
            failure.code,
            sanitize(&failure.message)
        );
    }
    if summary.failed as usize > FAILURES_SHOWN {
        println!("  ... (--json lists up to the first 1000)");
    }
    Ok(())
}
