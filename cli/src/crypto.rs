//! `kms encrypt`, `kms decrypt` and `kms data-key`: the Crypto service on files
//! and stdin/stdout.
//!
//! Plaintext and data keys live only in `Zeroizing` buffers that are allocated
//! once at their final size (so no reallocation leaves a copy behind) and are
//! written only to the requested output. They never appear in an error, a log
//! line or a `Debug` output; errors name sizes and paths, never contents. (Copies
//! inside tonic's encode and decode buffers are beyond this module's reach.)
#![allow(clippy::print_stdout)]

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal as _, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kms_proto::v1 as pb;
use zeroize::Zeroizing;

use super::{ClientOptions, connect, output, parse};

/// The plaintext limit of a server with the default configuration.
const DEFAULT_SERVER_PLAINTEXT_LIMIT: usize = 4 * 1024;
/// The largest plaintext limit a server can be configured with; bigger inputs are
/// refused before they are sent.
const MAX_PLAINTEXT_INPUT: usize = 64 * 1024;
/// A ciphertext blob is the plaintext plus a small header; anything bigger than
/// this (as raw bytes or base64 text) cannot be one.
const MAX_CIPHERTEXT_INPUT: usize = 1024 * 1024;
/// Extra room for JSON syntax and escaping around the fields of a secret document.
const JSON_OVERHEAD: usize = 512;

/// Where the input comes from and where the output goes.
#[derive(Debug, clap::Args)]
pub struct IoArgs {
    /// Read the input from FILE; "-" or absent: stdin.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Write the output to FILE; "-" or absent: stdout.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Arguments of `kms encrypt`.
#[derive(Debug, clap::Args)]
pub struct EncryptArgs {
    /// Key id ("key-...") or alias ("alias/<name>").
    #[arg(long, value_name = "KEY")]
    pub key: String,
    /// Encryption context entry, needed again to decrypt; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub context: Vec<(String, String)>,
    /// Where the input comes from and the output goes (`--in`, `--out`).
    #[command(flatten)]
    pub io: IoArgs,
    /// Write the ciphertext blob as base64 text instead of raw bytes.
    #[arg(long)]
    pub base64: bool,
}

/// Arguments of `kms decrypt`.
#[derive(Debug, clap::Args)]
pub struct DecryptArgs {
    /// Key id or alias the blob must have been made with (default: the key the
    /// blob names).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Encryption context entry given to encrypt; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub context: Vec<(String, String)>,
    /// Where the input comes from and the output goes (`--in`, `--out`).
    #[command(flatten)]
    pub io: IoArgs,
    /// Read the ciphertext blob as base64 text instead of raw bytes.
    #[arg(long)]
    pub base64: bool,
}

/// Standard data key sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataKeySpecArg {
    /// 32-byte key (AES-256).
    #[value(name = "aes-256")]
    Aes256,
    /// 16-byte key (AES-128).
    #[value(name = "aes-128")]
    Aes128,
}

/// Arguments of `kms data-key`.
#[derive(Debug, clap::Args)]
pub struct DataKeyArgs {
    /// Key id ("key-...") or alias ("alias/<name>") that encrypts the data key.
    #[arg(long, value_name = "KEY")]
    pub key: String,
    /// Data key size [default: aes-256].
    #[arg(long, value_enum, conflicts_with = "bytes")]
    pub spec: Option<DataKeySpecArg>,
    /// Data key size in bytes, 1 to 1024, instead of --spec.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub bytes: Option<u32>,
    /// Encryption context entry bound to the encrypted data key; repeat for several.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub context: Vec<(String, String)>,
    /// Only return the encrypted data key (GenerateDataKeyWithoutPlaintext).
    #[arg(long)]
    pub no_plaintext: bool,
}

pub(crate) async fn encrypt(args: EncryptArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let context = parse::pairs_to_map(args.context, "encryption context")?;
    let to_stdout = is_stdio(args.io.output.as_deref());
    if to_stdout && !args.base64 && !options.json && io::stdout().is_terminal() {
        anyhow::bail!(
            "refusing to write a binary ciphertext blob to the terminal; use --out FILE or --base64"
        );
    }
    let mut plaintext = read_input(args.io.input.as_deref(), "plaintext", MAX_PLAINTEXT_INPUT)?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the input is larger than {MAX_PLAINTEXT_INPUT} bytes; {}",
                too_large_hint()
            )
        })?;
    if plaintext.is_empty() {
        anyhow::bail!("the input is empty: nothing to encrypt");
    }
    let size = plaintext.len();
    let client = connect(options).await?;
    let request = pb::EncryptRequest {
        key_id: args.key,
        // Moved, not copied: the only copy left is the one tonic encodes.
        plaintext: std::mem::take(&mut *plaintext),
        encryption_context: context,
    };
    let reply = match client.encrypt(request).await {
        Ok(reply) => reply,
        Err(error) => {
            if error.code() == Some(tonic::Code::InvalidArgument)
                && size > DEFAULT_SERVER_PLAINTEXT_LIMIT
            {
                eprintln!("hint: the input is {size} bytes; {}", too_large_hint());
            }
            return Err(error.into());
        }
    };
    let text;
    let bytes: &[u8] = if options.json {
        let document = serde_json::json!({
            "key_id": reply.key_id,
            "key_version": reply.key_version,
            "ciphertext_blob": BASE64.encode(reply.ciphertext_blob.as_slice()),
        });
        text = format!("{}\n", serde_json::to_string_pretty(&document)?);
        text.as_bytes()
    } else if args.base64 {
        text = format!("{}\n", BASE64.encode(reply.ciphertext_blob.as_slice()));
        text.as_bytes()
    } else {
        &reply.ciphertext_blob
    };
    write_output(args.io.output.as_deref(), bytes, false)
}

pub(crate) async fn decrypt(args: DecryptArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let context = parse::pairs_to_map(args.context, "encryption context")?;
    let input = read_input(args.io.input.as_deref(), "ciphertext", MAX_CIPHERTEXT_INPUT)?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the input is larger than {MAX_CIPHERTEXT_INPUT} bytes: not a kms ciphertext blob"
            )
        })?;
    let looks_like_base64 = !input.is_empty() && is_base64_text(&input);
    let blob = if args.base64 {
        decode_base64(&input)?
    } else {
        input.to_vec()
    };
    if blob.is_empty() {
        anyhow::bail!("the input is empty: no ciphertext blob to decrypt");
    }
    let client = connect(options).await?;
    let request = pb::DecryptRequest {
        ciphertext_blob: blob,
        encryption_context: context,
        key_id: args.key.unwrap_or_default(),
    };
    let mut reply = match client.decrypt(request).await {
        Ok(reply) => reply,
        Err(error) => {
            if error.code() == Some(tonic::Code::InvalidArgument)
                && !args.base64
                && looks_like_base64
            {
                eprintln!("hint: the input looks like base64 text; did you mean --base64?");
            }
            return Err(error.into());
        }
    };
    // Take ownership of the decoded plaintext so that it is erased when dropped.
    let plaintext = Zeroizing::new(std::mem::take(&mut reply.plaintext));
    if options.json {
        let encoded = base64_secret(&plaintext);
        let document = SecretJson {
            key_id: &reply.key_id,
            key_version: reply.key_version,
            ciphertext_blob: None,
            plaintext: Some(&encoded),
        };
        write_output(args.io.output.as_deref(), &document.to_bytes()?, true)
    } else {
        write_output(args.io.output.as_deref(), &plaintext, true)
    }
}

pub(crate) async fn data_key(args: DataKeyArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let encryption_context = parse::pairs_to_map(args.context, "encryption context")?;
    let spec = match args.spec.unwrap_or(DataKeySpecArg::Aes256) {
        DataKeySpecArg::Aes256 => pb::DataKeySpec::Aes256,
        DataKeySpecArg::Aes128 => pb::DataKeySpec::Aes128,
    };
    let client = connect(options).await?;
    let (key_id, key_version, ciphertext_blob, plaintext) = if args.no_plaintext {
        use pb::generate_data_key_without_plaintext_request::Length;
        let length = match args.bytes {
            Some(n) => Length::NumberOfBytes(n),
            None => Length::KeySpec(spec as i32),
        };
        let reply = client
            .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                key_id: args.key,
                encryption_context,
                length: Some(length),
            })
            .await?;
        (reply.key_id, reply.key_version, reply.ciphertext_blob, None)
    } else {
        use pb::generate_data_key_request::Length;
        let length = match args.bytes {
            Some(n) => Length::NumberOfBytes(n),
            None => Length::KeySpec(spec as i32),
        };
        let mut reply = client
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: args.key,
                encryption_context,
                length: Some(length),
            })
            .await?;
        let plaintext = Zeroizing::new(std::mem::take(&mut reply.plaintext));
        (
            reply.key_id,
            reply.key_version,
            reply.ciphertext_blob,
            Some(plaintext),
        )
    };
    let blob = BASE64.encode(ciphertext_blob.as_slice());
    let encoded = plaintext.as_ref().map(|p| base64_secret(p.as_slice()));
    let text = if options.json {
        SecretJson {
            key_id: &key_id,
            key_version,
            ciphertext_blob: Some(&blob),
            plaintext: encoded.as_deref().map(String::as_str),
        }
        .to_bytes()?
    } else {
        data_key_text(
            &key_id,
            key_version,
            &blob,
            encoded.as_deref().map(String::as_str),
        )
    };
    write_output(None, &text, true)
}

/// The human form of a data key: aligned `Label  value` lines. Built directly in a
/// zeroizing buffer rather than through output::Table, which keeps plain Strings.
fn data_key_text(
    key_id: &str,
    version: u32,
    blob: &str,
    plaintext: Option<&str>,
) -> Zeroizing<Vec<u8>> {
    let key_id = output::sanitize(key_id);
    let capacity = key_id.len() + blob.len() + plaintext.map_or(0, str::len) + 128;
    let mut text = Zeroizing::new(Vec::with_capacity(capacity));
    let mut line = |label: &str, value: &str| {
        text.extend_from_slice(format!("{label:<15}  ").as_bytes());
        text.extend_from_slice(value.as_bytes());
        text.push(b'\n');
    };
    line("Key ID", &key_id);
    line("Key version", &version.to_string());
    line("Ciphertext blob", blob);
    if let Some(plaintext) = plaintext {
        line("Plaintext key", plaintext);
    }
    text
}

/// A JSON document that may carry a secret (decrypted plaintext or a data key, in
/// base64). No `Debug`, on purpose.
#[derive(serde::Serialize)]
struct SecretJson<'a> {
    key_id: &'a str,
    key_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ciphertext_blob: Option<&'a str>,
    // Last, so that no reallocation can happen after the secret is written.
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<&'a str>,
}

impl SecretJson<'_> {
    /// The pretty-printed document and a newline, in a zeroizing buffer that is
    /// large enough from the start.
    fn to_bytes(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        // Worst case of JSON escaping is six bytes per byte of key id (\u00XX).
        let capacity = JSON_OVERHEAD
            + 6 * self.key_id.len()
            + self.ciphertext_blob.map_or(0, str::len)
            + self.plaintext.map_or(0, str::len);
        let mut buffer = Zeroizing::new(Vec::with_capacity(capacity));
        serde_json::to_writer_pretty(&mut *buffer, self)?;
        buffer.push(b'\n');
        Ok(buffer)
    }
}

/// Base64 of a secret, in a zeroizing string allocated at its final size.
fn base64_secret(secret: &[u8]) -> Zeroizing<String> {
    let capacity = base64::encoded_len(secret.len(), true).unwrap_or(0);
    let mut encoded = Zeroizing::new(String::with_capacity(capacity));
    BASE64.encode_string(secret, &mut encoded);
    encoded
}

fn too_large_hint() -> String {
    format!(
        "Encrypt takes at most the server's plaintext limit ({} KiB by default). For larger \
         data, use envelope encryption: `kms data-key --key KEY` returns a data key to \
         encrypt the data locally, and its ciphertext blob to store beside the data",
        DEFAULT_SERVER_PLAINTEXT_LIMIT / 1024
    )
}

/// "-" or no path: stdin / stdout.
fn is_stdio(path: Option<&Path>) -> bool {
    path.is_none_or(|p| p.as_os_str() == "-")
}

/// Reads the whole input, up to `limit` bytes, into a zeroizing buffer allocated
/// once. `Ok(None)` if the input is longer than `limit`.
fn read_input(
    path: Option<&Path>,
    what: &str,
    limit: usize,
) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    if is_stdio(path) {
        let stdin = io::stdin();
        if stdin.is_terminal() {
            eprintln!("Reading the {what} from the terminal; end it with Ctrl-D.");
        }
        read_bounded(&mut stdin.lock(), limit).context("cannot read stdin")
    } else {
        let path = path.unwrap_or(Path::new("-"));
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        read_bounded(&mut file, limit).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn read_bounded(source: &mut dyn Read, limit: usize) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    let mut buffer = Zeroizing::new(vec![0u8; limit.saturating_add(1)]);
    let mut len = 0;
    while len < buffer.len() {
        match source.read(&mut buffer[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if len > limit {
        return Ok(None);
    }
    buffer.truncate(len);
    Ok(Some(buffer))
}

/// True if `input` is nothing but base64 characters and whitespace, i.e. probably
/// a blob someone forgot to pass `--base64` for.
fn is_base64_text(input: &[u8]) -> bool {
    input.iter().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') || b.is_ascii_whitespace()
    })
}

/// Decodes base64 text, ignoring whitespace and line breaks.
fn decode_base64(input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let compact: Vec<u8> = input
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    BASE64
        .decode(compact)
        .context("the input is not valid base64 (--base64 was given)")
}

/// Writes the output to stdout or to a file. Files that receive a secret are
/// created readable by their owner only.
fn write_output(path: Option<&Path>, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    if is_stdio(path) {
        let mut stdout = io::stdout().lock();
        stdout
            .write_all(bytes)
            .and_then(|()| stdout.flush())
            .context("cannot write to stdout")
    } else {
        let path = path.unwrap_or(Path::new("-"));
        let mut open = OpenOptions::new();
        open.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt as _;
            open.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut file = open
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(bytes)
            .and_then(|()| file.flush())
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads_return_the_input_or_none_when_too_long() {
        let read = |input: &[u8], limit| read_bounded(&mut &input[..], limit).expect("reads");
        assert_eq!(
            read(b"hello", 5).as_deref().map(Vec::as_slice),
            Some(&b"hello"[..])
        );
        assert_eq!(
            read(b"hello", 10).as_deref().map(Vec::as_slice),
            Some(&b"hello"[..])
        );
        assert_eq!(read(b"", 10).as_deref().map(Vec::as_slice), Some(&b""[..]));
        assert!(read(b"hello!", 5).is_none());
    }

    #[test]
    fn bounded_reads_do_not_reallocate() {
        let input = vec![7u8; 4096];
        let buffer = read_bounded(&mut &input[..], 8192)
            .expect("reads")
            .expect("fits");
        assert_eq!(buffer.len(), 4096);
        // Allocated once at limit + 1: no growth, hence no stale copies.
        assert_eq!(buffer.capacity(), 8193);
    }

    #[test]
    fn stdio_is_dash_or_absent() {
        assert!(is_stdio(None));
        assert!(is_stdio(Some(Path::new("-"))));
        assert!(!is_stdio(Some(Path::new("blob.bin"))));
        assert!(!is_stdio(Some(Path::new("./-"))));
    }

    #[test]
    fn base64_input_may_be_wrapped() {
        assert_eq!(decode_base64(b"aGVs\nbG8=\n").expect("decodes"), b"hello");
        assert!(decode_base64(b"not base64!").is_err());
        assert!(is_base64_text(b"aGVsbG8=\n"));
        assert!(!is_base64_text(b"\x01\x02binary"));
    }

    #[test]
    fn secret_json_omits_absent_fields_and_keeps_order() {
        let document = SecretJson {
            key_id: "key-1",
            key_version: 3,
            ciphertext_blob: None,
            plaintext: Some("aGVsbG8="),
        };
        let bytes = document.to_bytes().expect("serializes");
        assert_eq!(
            std::str::from_utf8(&bytes).expect("utf-8"),
            "{\n  \"key_id\": \"key-1\",\n  \"key_version\": 3,\n  \"plaintext\": \"aGVsbG8=\"\n}\n"
        );
        let without = SecretJson {
            key_id: "key-1",
            key_version: 1,
            ciphertext_blob: Some("YmxvYg=="),
            plaintext: None,
        };
        let value: serde_json::Value =
            serde_json::from_slice(&without.to_bytes().expect("serializes")).expect("parses");
        assert_eq!(value["ciphertext_blob"], "YmxvYg==");
        assert!(value.get("plaintext").is_none());
    }

    #[test]
    fn secret_json_buffer_is_allocated_once() {
        let plaintext = "A".repeat(1400);
        let long_id = "\u{1}".repeat(100);
        let document = SecretJson {
            key_id: &long_id,
            key_version: 1,
            ciphertext_blob: Some("YmxvYg=="),
            plaintext: Some(&plaintext),
        };
        let bytes = document.to_bytes().expect("serializes");
        let expected_capacity = JSON_OVERHEAD + 600 + 8 + 1400;
        assert_eq!(bytes.capacity(), expected_capacity);
    }

    #[test]
    fn data_key_text_is_aligned_and_optional_plaintext() {
        let text = data_key_text("key-1", 2, "YmxvYg==", Some("a2V5"));
        assert_eq!(
            std::str::from_utf8(&text).expect("utf-8"),
            "Key ID           key-1\n\
             Key version      2\n\
             Ciphertext blob  YmxvYg==\n\
             Plaintext key    a2V5\n"
        );
        let text = data_key_text("key-1", 2, "YmxvYg==", None);
        assert!(
            !std::str::from_utf8(&text)
                .expect("utf-8")
                .contains("Plaintext")
        );
    }

    #[test]
    fn base64_secret_is_exactly_sized() {
        let encoded = base64_secret(b"hello");
        assert_eq!(encoded.as_str(), "aGVsbG8=");
        assert_eq!(encoded.capacity(), 8);
    }

    #[test]
    fn too_large_hint_points_to_data_key() {
        assert!(too_large_hint().contains("kms data-key"));
        assert!(too_large_hint().contains("4 KiB"));
    }

    #[test]
    fn secret_outputs_are_created_owner_only() {
        let dir = std::env::temp_dir().join(format!("kms-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("plaintext.bin");
        write_output(Some(&path), b"secret", true).expect("writes");
        assert_eq!(std::fs::read(&path).expect("reads back"), b"secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
