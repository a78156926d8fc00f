//! kms-cli: the client commands of the `kms` binary (`kms key|alias|encrypt|
//! decrypt|data-key|envelope|re-encrypt|audit ...`), each a thin caller of one or a few
//! kms.v1 RPCs on a running server, through [`kms_client::KmsClient`] (TLS,
//! bearer token, deadlines and retries come from there).
//!
//! This crate is a client: it depends on kms-client and kms-proto only, never
//! on the server's crates, RocksDB or cryptoki. The server-side operator
//! commands (`kms serve`, `kms hsm ...`, `kms token new`) live in the `kms`
//! crate, which hands every other subcommand to [`run`].
//!
//! Output goes to stdout: aligned tables for people by default, JSON with
//! `--json` for scripts. A failed RPC is returned as a [`kms_client::Error`]
//! whose Display is `CODE_NAME: message` (e.g. `NOT_FOUND: key alias/x not
//! found`); `main` prints it (escaped with [`sanitize`]) and exits non-zero.
//!
//! Never: print, log or put in an error the plaintext or data-key bytes that pass
//! through `encrypt`, `decrypt` and `data-key`; those live in `Zeroizing` buffers
//! and are written only to the requested output.
#![warn(missing_docs)]
#![allow(clippy::print_stdout)]

mod admin;
mod aliases;
mod audit;
mod audit_cluster;
mod backup;
mod crypto;
mod envelope;
mod hsm;
mod import;
mod keys;
mod output;
mod parse;
mod policy;
mod reencrypt;
mod rewrap;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use kms_client::{BearerToken, ClientConfig, ClientIdentity, KmsClient};
use zeroize::Zeroizing;

pub use admin::AdminCommand;
pub use aliases::{AliasCommand, AliasNameArg, AliasTargetArgs, ListAliasesArgs};
pub use audit::{AuditCommand, AuditExportArgs, AuditListArgs, AuditTailArgs};
pub use backup::{request_backup, run_backup_create};
pub use crypto::{DataKeyArgs, DataKeySpecArg, DecryptArgs, EncryptArgs, IoArgs};
pub use envelope::{EnvelopeCommand, EnvelopeDecryptArgs, EnvelopeEncryptArgs};
pub use hsm::{DestroyRootArgs, HsmCommand, run_hsm};
pub use keys::{
    CreateKeyArgs, KeyArg, KeyCommand, ListKeysArgs, RotationPolicyArgs, ScheduleDeletionArgs,
    TagArgs, UntagArgs, UpdateDescriptionArgs, VersionArgs,
};
pub use output::sanitize;
pub use policy::{GrantArgs, PolicyCommand, PolicyKeyArg, RevokeArgs, SetPolicyArgs};
pub use reencrypt::ReEncryptArgs;
pub use rewrap::EnvelopeRewrapArgs;

/// How long to wait for the TCP/HTTP2 connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for one RPC; the server has its own, usually shorter, limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Options shared by every client command. Under their own heading in
/// `--help`: they are global, so they are listed for `kms serve` and `kms hsm`
/// too, where they have no effect.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Client options (commands that talk to a server)")]
pub struct ClientOptions {
    /// gRPC endpoint of the kms server.
    #[arg(
        long,
        env = "KMS_ENDPOINT",
        default_value = "http://127.0.0.1:7443",
        global = true
    )]
    pub endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// File holding a bearer token (the token itself may instead be in the
    /// KMS_TOKEN environment variable; never on the command line).
    #[arg(long, env = "KMS_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signs the server's certificate; implies TLS.
    #[arg(long, env = "KMS_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs --client-key.
    #[arg(long, env = "KMS_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "KMS_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the endpoint's host).
    #[arg(long, env = "KMS_TLS_SERVER_NAME", global = true)]
    pub tls_server_name: Option<String>,
}

/// The client commands (each talks to a running `kms serve`).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Manage keys: create, list, describe, rotate, enable/disable, delete, versions, tags.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage aliases ("alias/<name>" pointers to keys).
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Encrypt a small input (up to the server's plaintext limit, 4 KiB by default).
    Encrypt(EncryptArgs),
    /// Decrypt a ciphertext blob made by encrypt or data-key.
    Decrypt(DecryptArgs),
    /// Generate a data key for local (envelope) encryption of larger data.
    DataKey(DataKeyArgs),
    /// Envelope-encrypt or decrypt files and stdin of any size (kms-client).
    #[command(subcommand)]
    Envelope(EnvelopeCommand),
    /// Move a file of ciphertext blobs to a key's primary version (BatchReEncrypt), resumably.
    ReEncrypt(ReEncryptArgs),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Operator actions on the running server (administrators only).
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// Runs one client command against the server named in `options`.
///
/// # Errors
/// A [`kms_client::Error`] when the server cannot be reached or answers with a
/// non-OK status; otherwise the command's own failure (unreadable input file,
/// malformed policy file, output that cannot be written), with context naming
/// the file or argument.
pub async fn run(command: Command, options: &ClientOptions) -> anyhow::Result<()> {
    match command {
        Command::Key(command) => keys::run(command, options).await,
        Command::Alias(command) => aliases::run(command, options).await,
        Command::Encrypt(args) => crypto::encrypt(args, options).await,
        Command::Decrypt(args) => crypto::decrypt(args, options).await,
        Command::DataKey(args) => crypto::data_key(args, options).await,
        Command::Envelope(command) => envelope::run(command, options).await,
        Command::ReEncrypt(args) => reencrypt::run(args, options).await,
        Command::Audit(command) => audit::run(command, options).await,
        Command::Admin(command) => admin::run(command, options).await,
    }
}

/// Pagination: the token for the next page, or `None` after the last page. A
/// server that hands back the token it was given would loop forever; refuse it.
pub(crate) fn next_page_token(current: &str, next: String) -> anyhow::Result<Option<String>> {
    if next.is_empty() {
        Ok(None)
    } else if next == current {
        anyhow::bail!("the server returned the same page token twice; giving up")
    } else {
        Ok(Some(next))
    }
}

/// A field the server must fill in a successful reply.
pub(crate) fn required<T>(field: Option<T>, name: &str) -> anyhow::Result<T> {
    field.ok_or_else(|| anyhow::anyhow!("the server's reply has no {name}"))
}

/// The kms-client settings for the global client options: endpoint, TLS
/// (--ca-cert, --client-cert/--client-key, --tls-server-name) and the bearer
/// token (KMS_TOKEN or --token-file). Every command connects through these.
pub(crate) fn client_config(options: &ClientOptions) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::new(options.endpoint.clone())
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_call_timeout(REQUEST_TIMEOUT);
    let token: Option<Zeroizing<String>> = match &options.token_file {
        Some(path) => Some(Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --token-file {}", path.display()))?,
        )),
        None => std::env::var("KMS_TOKEN").ok().map(Zeroizing::new),
    };
    if let Some(token) = token {
        config = config.with_bearer_token(BearerToken::new(token.trim())?);
    }
    if let Some(ca) = &options.ca_cert {
        config = config.with_ca_pem(read_pem(ca, "--ca-cert")?);
    }
    if let (Some(cert), Some(key)) = (&options.client_cert, &options.client_key) {
        let key = Zeroizing::new(read_pem(key, "--client-key")?);
        config = config.with_client_identity(ClientIdentity::from_pem(
            read_pem(cert, "--client-cert")?,
            key.as_slice(),
        ));
    }
    if let Some(name) = &options.tls_server_name {
        config = config.with_domain_name(name.clone());
    }
    Ok(config)
}

fn read_pem(path: &std::path::Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Connects to the server with the global options' settings.
pub(crate) async fn connect(options: &ClientOptions) -> anyhow::Result<KmsClient> {
    connect_with(client_config(options)?, options).await
}

/// Connects with `config` (the global options' settings, possibly adjusted by
/// the command), naming the usual remedy when the server is not there.
pub(crate) async fn connect_with(
    config: ClientConfig,
    options: &ClientOptions,
) -> anyhow::Result<KmsClient> {
    KmsClient::connect(config)
        .await
        .map_err(|e| connect_error(e, options))
}

/// A failed connection as the CLI says it: only a failed connection
/// suggests a server that is not there; a refused setting (scheme, TLS
/// files, token) is said as it is.
fn connect_error(error: kms_client::Error, options: &ClientOptions) -> anyhow::Error {
    match error {
        e @ kms_client::Error::Connect { .. } => anyhow::Error::new(e).context(format!(
            "is `kms serve` running? set --endpoint or KMS_ENDPOINT ({})",
            options.endpoint
        )),
        e => e.into(),
    }
}

/// [`connect_with`] for long jobs (`kms re-encrypt`, `kms envelope rewrap`)
/// that promise to wait out a restarting server: a refused connection is
/// retried (every 0.5 s, saying so once on stderr) for up to `patience`;
/// any other failure, or the last refusal, is returned as `connect_with`
/// returns it.
///
/// `config` builds the settings for each attempt (they hold secrets, which
/// are not copied).
pub(crate) async fn connect_patiently(
    options: &ClientOptions,
    patience: std::time::Duration,
    config: impl Fn() -> anyhow::Result<ClientConfig>,
) -> anyhow::Result<KmsClient> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match KmsClient::connect(config()?).await {
            Ok(client) => return Ok(client),
            Err(kms_client::Error::Connect { .. }) if started.elapsed() < patience => {
                if !said {
                    eprintln!(
                        "kms: cannot connect to {}; retrying for up to {} s (--unavailable-patience)",
                        options.endpoint,
                        patience.as_secs()
                    );
                    said = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(error) => return Err(connect_error(error, options)),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    /// Stand-in for the binary's parser: the client commands and options as main
    /// wires them.
    #[derive(Debug, Parser)]
    #[command(name = "kms")]
    struct TestCli {
        #[command(flatten)]
        options: ClientOptions,
        #[command(subcommand)]
        command: Command,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("kms").chain(args.iter().copied()))
    }

    #[test]
    fn command_definitions_are_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn global_options_are_accepted_after_the_subcommand() {
        let cli =
            parse(&["key", "list", "--json", "--endpoint", "http://[::1]:9"]).expect("parses");
        assert!(cli.options.json);
        assert_eq!(cli.options.endpoint, "http://[::1]:9");
        assert!(matches!(cli.command, Command::Key(KeyCommand::List(_))));
    }

    #[test]
    fn key_create_collects_tags_and_alias() {
        let cli = parse(&[
            "key",
            "create",
            "--description",
            "payments",
            "--tag",
            "env=prod",
            "--tag",
            "team=a=b",
            "--rotation-period-days",
            "90",
            "--alias",
            "alias/payments",
        ])
        .expect("parses");
        let Command::Key(KeyCommand::Create(args)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(args.description, "payments");
        assert_eq!(
            args.tags,
            vec![
                ("env".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "a=b".to_owned())
            ]
        );
        assert_eq!(args.rotation_period_days, Some(90));
        assert_eq!(args.alias.as_deref(), Some("alias/payments"));
    }

    #[test]
    fn malformed_pairs_are_rejected_by_the_parser() {
        assert!(parse(&["key", "create", "--tag", "novalue"]).is_err());
        assert!(parse(&["encrypt", "--key", "k", "--context", "=v"]).is_err());
        assert!(parse(&["key", "tag", "k", "a=1", "b"]).is_err());
    }

    #[test]
    fn rotation_policy_needs_exactly_one_of_period_and_none() {
        assert!(parse(&["key", "rotation-policy", "k"]).is_err());
        assert!(
            parse(&[
                "key",
                "rotation-policy",
                "k",
                "--none",
                "--period-days",
                "3"
            ])
            .is_err()
        );
        assert!(parse(&["key", "rotation-policy", "k", "--period-days", "0"]).is_err());
        assert!(parse(&["key", "rotation-policy", "k", "--none"]).is_ok());
        assert!(parse(&["key", "rotation-policy", "k", "--period-days", "30"]).is_ok());
    }

    #[test]
    fn data_key_spec_and_bytes_are_exclusive() {
        assert!(
            parse(&[
                "data-key", "--key", "k", "--spec", "aes-128", "--bytes", "8"
            ])
            .is_err()
        );
        assert!(parse(&["data-key", "--key", "k", "--spec", "aes-512"]).is_err());
        let cli =
            parse(&["data-key", "--key", "k", "--bytes", "64", "--no-plaintext"]).expect("parses");
        let Command::DataKey(args) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(args.bytes, Some(64));
        assert!(args.no_plaintext);
    }

    #[test]
    fn encrypt_takes_in_and_out_paths_and_requires_a_key() {
        assert!(parse(&["encrypt"]).is_err());
        let cli = parse(&[
            "encrypt", "--key", "alias/a", "--in", "-", "--out", "blob.bin",
        ])
        .expect("parses");
        let Command::Encrypt(args) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(args.key, "alias/a");
        assert_eq!(args.io.input.as_deref(), Some(std::path::Path::new("-")));
        assert_eq!(
            args.io.output.as_deref(),
            Some(std::path::Path::new("blob.bin"))
        );
    }

    #[test]
    fn audit_list_parses_operation_and_times() {
        let cli = parse(&[
            "audit",
            "list",
            "--operation",
            "ReEncrypt",
            "--since",
            "2026-01-01T00:00:00Z",
            "--limit",
            "5",
        ])
        .expect("parses");
        let Command::Audit(AuditCommand::List(args)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(args.operation, Some(kms_proto::v1::Operation::ReEncrypt));
        assert_eq!(args.since.map(|t| t.seconds), Some(1_767_225_600));
        assert!(parse(&["audit", "list", "--operation", "Frobnicate"]).is_err());
        assert!(parse(&["audit", "list", "--since", "yesterday"]).is_err());
    }

    #[test]
    fn page_tokens_end_on_empty_and_never_repeat() {
        assert_eq!(next_page_token("", String::new()).expect("last page"), None);
        assert_eq!(
            next_page_token("", "t1".into()).expect("next"),
            Some("t1".to_owned())
        );
        assert_eq!(
            next_page_token("t1", "t2".into()).expect("next"),
            Some("t2".to_owned())
        );
        assert!(next_page_token("t1", "t1".into()).is_err());
    }
}
