//! kms-bench: measures kms against its ceilings, one subcommand per measurement.
//! Each subcommand lives in its own module; main only parses and dispatches.

mod audit;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kms-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Audit log appends/s: synced group commit vs. unsynced, at several writer counts.
    Audit(audit::AuditArgs),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Audit(args) => audit::run(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
