//! `kms envelope rewrap`: moves envelope files to the primary version of a
//! key through kms-client's [`Rewrapper`] (what changes, atomic replacement,
//! version 1 refusal and resuming are described there): only the wrapped data
//! key in each header changes, the data after the header is kept byte for
//! byte. Running the same command again after an interruption is the resume:
//! files already rewrapped come back "already current".
//!
//! A progress bar (files, rate, ETA) goes to stderr when stderr is a terminal
//! and `--json` is not given. The summary goes to stdout: a table, or one
//! JSON object with `--json`. Failed files (left untouched) make the command
//! exit non-zero after the summary.
//!
//! Never: print wrapped keys, context values or file contents.

use std::io::{BufRead, IsTerminal as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kms_client::envelope::rewrap::{DEFAULT_BATCH_SIZE, FileOutcome, FileResult};
use kms_client::{RewrapSummary, Rewrapper};

use super::ClientOptions;
use super::output::sanitize;

/// Failures listed by the table summary (all of them with `--json`).
const FAILURES_SHOWN: usize = 20;

/// Arguments of `kms envelope rewrap`.
#[derive(Debug, clap::Args)]
pub struct EnvelopeRewrapArgs {
    /// Envelope files to rewrap (or give --in).
    #[arg(
        value_name = "FILE",
        required_unless_present = "list",
        conflicts_with = "list"
    )]
    pub files: Vec<PathBuf>,
    /// A file listing the envelope files, one path per line ("-" for stdin);
    /// blank lines are skipped.
    #[arg(long = "in", value_name = "LIST")]
    pub list: Option<PathBuf>,
    /// Rewrap to the primary version of this key id or alias (default: each
    /// file to the primary version of the key that wrapped its data key).
    #[arg(long, value_name = "KEY")]
    pub destination_key: Option<String>,
    /// Files per BatchReEncrypt call (at most the server's limits.max_batch_items).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH_SIZE as u32,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: u32,
    /// How long to keep retrying while the server is unavailable, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub unavailable_patience: u64,
}

pub(crate) async fn run(args: EnvelopeRewrapArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let files = match &args.list {
        Some(list) => read_list(list)?,
        None => args.files.clone(),
    };
    let mut rewrapper = Rewrapper::new(
        super::connect_patiently(
            options,
            Duration::from_secs(args.unavailable_patience),
            || Ok(super::client_config(options)?.with_call_timeout(super::envelope::CALL_TIMEOUT)),
        )
        .await?,
    )
    .batch_size(args.batch_size as usize)
    .unavailable_patience(Duration::from_secs(args.unavailable_patience));
    if let Some(key) = &args.destination_key {
        rewrapper = rewrapper.destination_key(key.clone());
    }
    let show_progress = !options.json && std::io::stderr().is_terminal();
    let bar = show_progress.then(|| progress_bar(files.len() as u64));
    let (mut rewrapped, mut current, mut failed) = (0u64, 0u64, 0u64);
    let on_file = |result: &FileResult| {
        match result.outcome {
            FileOutcome::Rewrapped { .. } => rewrapped += 1,
            FileOutcome::AlreadyCurrent { .. } => current += 1,
            _ => failed += 1,
        }
        if let Some(bar) = &bar {
            bar.inc(1);
            bar.set_message(format!(
                "rewrapped {rewrapped} · current {current} · failed {failed}"
            ));
        }
    };
    let result = rewrapper.rewrap_files(files, on_file).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = result.context(
        "rewrap stopped; files done so far are done: run the same command again to finish",
    )?;
    print_summary(&summary, options.json)?;
    if summary.failed > 0 {
        anyhow::bail!(
            "{} of {} files failed (left as they were)",
            summary.failed,
            summary.files
        );
    }
    Ok(())
}

/// The paths of LIST (or stdin for "-"), one per line, blank lines skipped.
fn read_list(list: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let read = |reader: &mut dyn BufRead| -> anyhow::Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for (number, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("cannot read --in line {}", number + 1))?;
            let line = line.trim_end_matches('\r');
            if !line.trim().is_empty() {
                paths.push(PathBuf::from(line));
            }
        }
        Ok(paths)
    };
    if list.as_os_str() == "-" {
        return read(&mut std::io::stdin().lock());
    }
    let file = std::fs::File::open(list)
        .with_context(|| format!("cannot open --in {}", list.display()))?;
    read(&mut std::io::BufReader::new(file))
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{wide_bar} {pos}/{len} files · {per_sec} · ETA {eta} · {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn print_summary(summary: &RewrapSummary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
        return Ok(());
    }
    println!("files            {}", summary.files);
    println!("rewrapped        {}", summary.rewrapped);
    println!("already current  {}", summary.already_current);
    println!("failed           {}", summary.failed);
    for failure in summary.failures.iter().take(FAILURES_SHOWN) {
        println!(
            "  {}: {}: {}",
            sanitize(&failure.path),
            failure.code,
            sanitize(&failure.message)
        );
    }
    if summary.failures.len() > FAILURES_SHOWN {
        println!("  ... (--json lists them all)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        options: ClientOptions,
        #[command(subcommand)]
        command: super::super::EnvelopeCommand,
    }

    fn parse(args: &[&str]) -> Result<EnvelopeRewrapArgs, clap::Error> {
        let cli =
            TestCli::try_parse_from(["kms", "rewrap"].into_iter().chain(args.iter().copied()))?;
        match cli.command {
            super::super::EnvelopeCommand::Rewrap(args) => Ok(args),
            other => panic!("wrong command: {other:?}"),
        }
    }

    #[test]
    fn files_or_a_list_but_not_both_nor_neither() {
        assert!(parse(&[]).is_err(), "nothing to rewrap");
        assert!(parse(&["--in", "list", "a.kmse"]).is_err(), "both");
        assert!(parse(&["a.kmse", "--batch-size", "0"]).is_err());
        let args = parse(&["a.kmse", "b.kmse", "--destination-key", "alias/new"]).expect("files");
        assert_eq!(args.files.len(), 2);
        assert_eq!(args.batch_size, DEFAULT_BATCH_SIZE as u32);
        assert_eq!(args.destination_key.as_deref(), Some("alias/new"));
        let args = parse(&["--in", "-", "--batch-size", "7"]).expect("list");
        assert_eq!(args.list.as_deref(), Some(std::path::Path::new("-")));
        assert_eq!(args.batch_size, 7);
    }

    #[test]
    fn a_list_skips_blank_lines_and_keeps_spaces_inside_names() {
        let dir = std::env::temp_dir().join(format!("kms-rewrap-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let list = dir.join("list");
        std::fs::write(&list, "a.kmse\n\n  \nwith space.kmse\r\nlast").expect("write");
        let paths = read_list(&list).expect("read");
        assert_eq!(
            paths,
            [
                PathBuf::from("a.kmse"),
                PathBuf::from("with space.kmse"),
                PathBuf::from("last")
            ]
        );
        assert!(read_list(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
