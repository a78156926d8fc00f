//! kms-bench: measures kms against its ceilings, one subcommand per measurement.
//! Each subcommand lives in its own module; main only parses and dispatches.

mod audit;
mod cluster;
mod envelope;
mod load;
mod machine;
mod report;
mod run;
mod scale;
mod server;
mod soak;
mod workloads;

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
    /// The service vs. the raw HSM and a gRPC no-op, at several concurrencies:
    /// ops/s, p50/p99/p99.9, ratios, audit synced vs. unsynced, targets.
    Run(Box<run::RunArgs>),
    /// Server RSS over many Encrypt requests (1M by default): is it flat?
    Soak(soak::SoakArgs),
    /// Audit log appends/s: synced group commit vs. unsynced, at several writer counts.
    Audit(audit::AuditArgs),
    /// Wrapped key versions at scale: token-object vs wrapped key, first-use
    /// unwrap latency, a random key among 10,000 with a smaller cache, and
    /// server CPU per call under h2load with the overhead ratio.
    Scale(Box<scale::ScaleArgs>),
    /// Envelope encryption (kms-client) vs raw AES-GCM in MB/s, and KMS calls saved by caching.
    Envelope(envelope::EnvelopeArgs),
    /// A kms cluster (--endpoints, tasks round-robin over the nodes) against
    /// a single node (--single) on the same machine: Encrypt, Decrypt,
    /// GenerateDataKey and a catalogue write (CreateKey), with ratios.
    Cluster(Box<cluster::ClusterArgs>),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Audit(args) => audit::run(&args),
        Command::Envelope(args) => envelope::run(&args),
        Command::Scale(args) => scale::run(&args),
        Command::Cluster(args) => cluster::run(&args),
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
