//! The `kms` binary: the server (`kms serve`), the server-side operator
//! commands (`kms hsm ...`, `kms token new`, `kms backup ...`) and, through the kms-cli crate,
//! every client command. Thin by design: parse arguments, set up logging, run,
//! print the error chain and exit non-zero on failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kms::config::Config;
use kms::service::KmsService;

#[derive(Debug, Parser)]
#[command(
    name = "kms",
    version,
    about = "HSM-backed key management service and its client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: kms_cli::ClientOptions,
    /// Log filter (tracing env-filter syntax), e.g. "info" or "kms=debug".
    /// (cryptoki reports mechanisms it has no name for at ERROR level while
    /// the token is probed: noise, hidden by default.)
    #[arg(
        help_heading = "Logging",
        long,
        env = "KMS_LOG",
        default_value = "info,cryptoki::mechanism=off",
        global = true
    )]
    log: String,
    /// Log as JSON lines.
    #[arg(help_heading = "Logging", long, global = true)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Bearer tokens for callers without client certificates.
    #[command(subcommand)]
    Token(kms::operator::token::TokenCommand),
    /// HSM provisioning and root keys (PINs from files, never argv): the
    /// ceremonies act on the token; `roots`/`destroy-root` ask the server.
    #[command(subcommand)]
    Hsm(kms::operator::hsm::HsmCommand),
    /// Backups of the catalogue and audit log (`create`: the running server,
    /// or a stopped one's data directory) and their restore (server stopped).
    #[command(subcommand)]
    Backup(kms::operator::backup::BackupCommand),
    #[command(flatten)]
    Client(kms_cli::Command),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML). Not needed with --dev.
    #[arg(long, short, env = "KMS_CONFIG", required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// The embedded default: a SoftHSM2 token and RocksDB under --data-dir,
    /// created on first run, loopback only.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// Data directory of dev mode.
    #[arg(long, default_value = "./.kms-data", requires = "dev")]
    data_dir: PathBuf,
    /// Listen address of dev mode (loopback only).
    #[arg(long, default_value = kms::config::DEFAULT_LISTEN, requires = "dev")]
    listen: SocketAddr,
    /// Dev mode: also serve the Kubernetes KMS v2 plugin API on this Unix
    /// socket (mode 0600), for the key alias/kubernetes (created if missing).
    #[arg(long, value_name = "PATH", requires = "dev")]
    kubernetes_socket: Option<PathBuf>,
    /// Dev mode: also serve the AWS KMS API (JSON 1.1, SigV4) on this
    /// address (loopback only); its access key, mapped to the dev
    /// principal, is written to <data-dir>/aws-credentials (mode 0600).
    #[arg(long, value_name = "ADDR", requires = "dev")]
    aws_api_listen: Option<SocketAddr>,
    /// Benchmarks only (kms-bench's synced/unsynced comparison): acknowledge
    /// requests before their audit records reach the disk. Dev mode only.
    #[arg(long, hide = true, requires = "dev")]
    unsafe_audit_no_sync: bool,
    /// Dev mode: serve Prometheus metrics on this address (loopback only).
    #[arg(long, requires = "dev")]
    metrics_listen: Option<SocketAddr>,
    /// Dev mode: working keys kept in the HSM (`hsm.working_key_cache`,
    /// 1 to 100000; default 1024).
    #[arg(long, requires = "dev")]
    working_key_cache: Option<usize>,
    /// Benchmarks only (kms-bench scale): new key versions are token objects,
    /// as before wrapped versions (`hsm.wrapped_versions = false`). Dev mode only.
    #[arg(long, hide = true, requires = "dev")]
    token_object_versions: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log, cli.log_json);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `kms audit export | head`: the reader has what it wanted. Quiet, as
        // for any Unix filter whose output pipe closed.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain may hold a server's message: no terminal control
            // characters reach the terminal.
            let chain = kms_client::join_causes(e.chain().map(ToString::to_string));
            eprintln!("error: {}", kms_cli::sanitize(&chain));
            ExitCode::FAILURE
        }
    }
}

/// Whether an error was caused by writing to a closed pipe (EPIPE), directly
/// or through serde_json's writer.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let kind = cause
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| cause.downcast_ref::<serde_json::Error>()?.io_error_kind());
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a log collector gets plain
    // text that grep and parsers can read.
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(command) => kms::operator::token::run(command),
        Command::Hsm(command) => kms::operator::hsm::run(command, &cli.client),
        Command::Backup(command) => kms::operator::backup::run(command, &cli.client),
        Command::Client(command) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(kms_cli::run(command, &cli.client))
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before the PIN is read or any key material exists in this process.
    let hardening = kms::hardening::harden_process();
    tracing::info!(
        core_dumps_disabled = hardening.core_dumps_disabled,
        not_dumpable = hardening.not_dumpable,
        "process hardening"
    );
    // Dev-mode preparation sets SOFTHSM2_CONF, which must happen before any
    // other thread exists: before the runtime is built.
    let (config, config_file, banner) = if args.dev {
        if !args.listen.ip().is_loopback() {
            anyhow::bail!(kms::dev::DevError::NotLoopback(args.listen));
        }
        let layout = kms::dev::prepare_environment(&args.data_dir).context("preparing dev mode")?;
        let module = kms_hsm_module();
        let created = kms::dev::initialize_dev_token(&layout, &module)
            .context("setting up the SoftHSM2 token")?;
        // Before the service opens the token: the ceremony logs in as SO.
        if kms::dev::ensure_dev_root(&layout, &module).context("creating the dev root key")? {
            tracing::info!(
                epoch = kms::dev::DEV_ROOT_EPOCH,
                "created the dev token's root key"
            );
        }
        let mut config = kms::dev::dev_config(&layout, &module, args.listen)?;
        if let Some(socket) = &args.kubernetes_socket {
            // An absolute path, as in a configuration file (the apiserver's
            // endpoint names it that way too).
            let socket = std::path::absolute(socket)
                .with_context(|| format!("--kubernetes-socket {}", socket.display()))?;
            config
                .kubernetes
                .push(kms::dev::kubernetes_listener(&socket));
        }
        if let Some(addr) = args.aws_api_listen {
            config.aws_api = Some(kms::dev::aws_api_config(&layout, addr)?);
        }
        if args.unsafe_audit_no_sync {
            tracing::warn!(
                "--unsafe-audit-no-sync: audit records are not synced; a crash loses acknowledged records"
            );
            config.audit.sync = false;
        }
        if let Some(addr) = args.metrics_listen {
            if !addr.ip().is_loopback() {
                anyhow::bail!(kms::dev::DevError::NotLoopback(addr));
            }
            config.server.metrics_listen = Some(addr);
        }
        if let Some(size) = args.working_key_cache {
            anyhow::ensure!(
                (1..=kms::config::MAX_WORKING_KEY_CACHE).contains(&size),
                "--working-key-cache must be 1 to {}",
                kms::config::MAX_WORKING_KEY_CACHE
            );
            config.working_key_cache = size;
        }
        if args.token_object_versions {
            config.wrapped_versions = Some(false);
        }
        let note = if created { "created" } else { "reused" };
        (
            config,
            None,
            format!("dev mode, data {note} in {}", layout.data_dir.display()),
        )
    } else {
        let path = args.config.context("--config is required without --dev")?;
        let config = Config::load(&path)?;
        let banner = format!("config {}", path.display());
        (config, Some(path), banner)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kms-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let open_config = config.clone();
        let dev_kubernetes_key = args.dev && !config.kubernetes.is_empty();
        let service = tokio::task::spawn_blocking(move || {
            let service = KmsService::open(&open_config)?;
            if dev_kubernetes_key && kms::dev::ensure_kubernetes_key(&service)? {
                tracing::info!(
                    key = kms::dev::DEV_KUBERNETES_KEY,
                    "created the Kubernetes plugin key"
                );
            }
            anyhow::Ok(service)
        })
        .await
        .context("opening the service")??;
        let mut server = kms::server::start_with(&config, Arc::new(service), config_file).await?;
        server.reload_on_sighup();
        let mut metrics = server
            .metrics_addr
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default();
        if let Some(addr) = server.aws_addr {
            let tls = config.aws_api.as_ref().is_some_and(|a| a.tls.is_some());
            metrics.push_str(&format!(
                ", AWS KMS API on {}",
                kms::aws::describe(addr, tls)
            ));
        }
        for plugin in &config.kubernetes {
            metrics.push_str(&format!(
                ", Kubernetes KMS plugin on unix://{}",
                plugin.socket.display()
            ));
        }
        #[allow(clippy::print_stdout)]
        {
            println!("kms listening on {} ({banner}{metrics})", server.addr);
        }
        server.serve_until(shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn kms_hsm_module() -> PathBuf {
    kms_hsm::softhsm2_module_path()
}
