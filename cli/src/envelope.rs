//! `kms envelope encrypt|decrypt|rewrap`: client-side envelope encryption of files and
//! stdin/stdout of any size in constant memory, with kms-client (a fresh data
//! key from GenerateDataKey per message; format in the README, "Client library
//! and envelope format").
//!
//! Output to a file goes to a temporary file beside it (mode 0600) that is
//! renamed into place only when the whole envelope has been written or
//! verified, so a failed decryption never leaves a partial plaintext under the
//! requested name. On stdout, a failure after some output is reported, and the
//! output must be discarded.
//!
//! Never: print the data key, the plaintext or the token.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use kms_client::envelope::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE};
use kms_client::{EncryptionContext, Envelope, EnvelopeError, FormatVersion, KmsClient};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::{ClientOptions, IoArgs, parse};

/// Deadline of each GenerateDataKey / Decrypt call (the data itself never
/// travels to the server, so this does not grow with the input).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `kms envelope ...`
#[derive(Debug, clap::Subcommand)]
pub enum EnvelopeCommand {
    /// Encrypt a file or stdin of any size under a fresh data key of KEY.
    Encrypt(EnvelopeEncryptArgs),
    /// Decrypt an envelope made by `kms envelope encrypt`.
    Decrypt(EnvelopeDecryptArgs),
    /// Move envelope files to a key's primary version: only the wrapped data
    /// key in each header changes (BatchReEncrypt), the data is kept as is.
    Rewrap(super::rewrap::EnvelopeRewrapArgs),
}

/// Arguments of `kms envelope encrypt`.
#[derive(Debug, clap::Args)]
pub struct EnvelopeEncryptArgs {
    /// Key id ("key-...") or alias ("alias/<name>") that wraps the data key.
    #[arg(long, value_name = "KEY")]
    pub key: String,
    /// Encryption context entry, needed again to decrypt; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub context: Vec<(String, String)>,
    /// Where the input comes from and the output goes (`--in`, `--out`).
    #[command(flatten)]
    pub io: IoArgs,
    /// Plaintext bytes per authenticated chunk (1 to 16 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CHUNK_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CHUNK_SIZE)))]
    pub chunk_size: u32,
    /// Envelope format version: 2 (the default) can be rewrapped after a
    /// rotation; 1 only for readers older than format version 2.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(1..=2))]
    pub format_version: u8,
}

/// Arguments of `kms envelope decrypt`.
#[derive(Debug, clap::Args)]
pub struct EnvelopeDecryptArgs {
    /// Require the data key to have been wrapped by this key id or alias
    /// (default: whichever key the envelope names).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Encryption context entry given to encrypt; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub context: Vec<(String, String)>,
    /// Where the input comes from and the output goes (`--in`, `--out`).
    #[command(flatten)]
    pub io: IoArgs,
}

pub(crate) async fn run(command: EnvelopeCommand, options: &ClientOptions) -> anyhow::Result<()> {
    match command {
        EnvelopeCommand::Encrypt(args) => encrypt(args, options).await,
        EnvelopeCommand::Decrypt(args) => decrypt(args, options).await,
        EnvelopeCommand::Rewrap(args) => super::rewrap::run(args, options).await,
    }
}

async fn encrypt(args: EnvelopeEncryptArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let context = context(args.context)?;
    let output = Output::open(args.io.output.as_deref(), true).await?;
    let mut input = open_input(args.io.input.as_deref()).await?;
    let format = FormatVersion::from_byte(args.format_version)
        .with_context(|| format!("--format-version {} is not 1 or 2", args.format_version))?;
    let envelope = Envelope::new(connect(options).await?)
        .with_chunk_size(args.chunk_size)?
        .with_format_version(format);
    output
        .finish(async |mut writer| {
            envelope
                .encrypt(&args.key, &context, &mut input, &mut writer)
                .await
                .map(|_| ())
        })
        .await
        .context("envelope encryption failed")
}

async fn decrypt(args: EnvelopeDecryptArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let context = context(args.context)?;
    let output = Output::open(args.io.output.as_deref(), false).await?;
    let mut input = open_input(args.io.input.as_deref()).await?;
    let envelope = Envelope::new(connect(options).await?);
    output
        .finish(async |mut writer| {
            envelope
                .decrypt(args.key.as_deref(), &context, &mut input, &mut writer)
                .await
                .map(|_| ())
        })
        .await
        .context("envelope decryption failed")
}

fn context(pairs: Vec<(String, String)>) -> anyhow::Result<EncryptionContext> {
    let map = parse::pairs_to_map(pairs, "encryption context")?;
    Ok(EncryptionContext::new(map)?)
}

pub(crate) async fn connect(options: &ClientOptions) -> anyhow::Result<KmsClient> {
    super::connect_with(
        super::client_config(options)?.with_call_timeout(CALL_TIMEOUT),
        options,
    )
    .await
}

fn is_stdio(path: Option<&Path>) -> bool {
    path.is_none_or(|p| p == Path::new("-"))
}

async fn open_input(path: Option<&Path>) -> anyhow::Result<Box<dyn AsyncRead + Unpin + Send>> {
    if is_stdio(path) {
        return Ok(Box::new(tokio::io::stdin()));
    }
    let path = path.unwrap_or(Path::new("-"));
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open --in {}", path.display()))?;
    Ok(Box::new(tokio::io::BufReader::with_capacity(1 << 16, file)))
}

/// Where the result goes: stdout, or a temporary file renamed to the requested
/// path on success and removed on failure.
enum Output {
    Stdout,
    File { temp: PathBuf, path: PathBuf },
}

impl Output {
    async fn open(path: Option<&Path>, binary: bool) -> anyhow::Result<Output> {
        if is_stdio(path) {
            if binary && std::io::stdout().is_terminal() {
                anyhow::bail!(
                    "refusing to write a binary envelope to the terminal; use --out FILE"
                );
            }
            return Ok(Output::Stdout);
        }
        let path = path.unwrap_or(Path::new("-")).to_path_buf();
        let name = path
            .file_name()
            .with_context(|| format!("--out {} names no file", path.display()))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".partial-{}", std::process::id()));
        let temp = path.with_file_name(temp_name);
        Ok(Output::File { temp, path })
    }

    /// Runs `work` on the writer, then publishes (file) or flushes (stdout).
    async fn finish(
        self,
        work: impl AsyncFnOnce(&mut (dyn AsyncWrite + Unpin + Send)) -> Result<(), EnvelopeError>,
    ) -> anyhow::Result<()> {
        match self {
            Output::Stdout => {
                let mut stdout = tokio::io::stdout();
                let result = work(&mut stdout).await;
                stdout.flush().await.context("writing to stdout")?;
                Ok(result?)
            }
            Output::File { temp, path } => {
                let file = create_private(&temp)?;
                let mut writer = tokio::io::BufWriter::with_capacity(1 << 16, file);
                let result = match work(&mut writer).await {
                    Ok(()) => writer.flush().await.map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                let result = match result {
                    Ok(()) => writer
                        .into_inner()
                        .sync_all()
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => tokio::fs::rename(&temp, &path)
                        .await
                        .with_context(|| format!("cannot create --out {}", path.display())),
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&temp).await;
                        Err(e)
                    }
                }
            }
        }
    }
}

/// A new file readable by its owner only (it may hold plaintext).
fn create_private(path: &Path) -> anyhow::Result<tokio::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(tokio::fs::File::from_std(file))
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
        command: EnvelopeCommand,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("kms").chain(args.iter().copied()))
    }

    #[test]
    fn encrypt_needs_a_key_and_bounds_the_chunk_size() {
        assert!(parse(&["encrypt"]).is_err());
        assert!(parse(&["encrypt", "--key", "k", "--chunk-size", "0"]).is_err());
        assert!(parse(&["encrypt", "--key", "k", "--chunk-size", "16777217"]).is_err());
        let cli = parse(&[
            "encrypt",
            "--key",
            "alias/a",
            "--context",
            "t=a=b",
            "--in",
            "-",
            "--out",
            "x.kmse",
        ])
        .expect("parses");
        let EnvelopeCommand::Encrypt(args) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(args.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(args.format_version, 2);
        assert!(parse(&["encrypt", "--key", "k", "--format-version", "3"]).is_err());
        assert_eq!(args.context, [("t".to_owned(), "a=b".to_owned())]);
        assert_eq!(args.io.output.as_deref(), Some(Path::new("x.kmse")));
    }

    #[test]
    fn decrypt_key_is_optional_and_contexts_must_be_unique() {
        let cli = parse(&["decrypt", "--context", "a=1", "--context", "a=2"]).expect("parses");
        let EnvelopeCommand::Decrypt(args) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert!(args.key.is_none());
        assert!(context(args.context).is_err(), "duplicate context key");
        assert!(context(vec![("k".into(), String::new())]).is_ok());
    }

    #[test]
    fn client_config_carries_the_endpoint_and_never_prints_the_token() {
        let dir = tempfile_dir();
        let token = dir.join("token");
        std::fs::write(&token, "tok-91ab-secret\n").expect("write token");
        let cli = parse(&[
            "--endpoint",
            "http://127.0.0.1:9",
            "--token-file",
            token.to_str().expect("utf8"),
            "decrypt",
        ])
        .expect("parses");
        let config = crate::client_config(&cli.options).expect("config");
        assert_eq!(config.endpoint(), "http://127.0.0.1:9");
        let out = format!("{config:?}");
        assert!(
            !out.contains("tok-91ab") && out.contains("REDACTED"),
            "{out}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kms-envelope-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
