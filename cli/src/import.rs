//! `kms key import-parameters` and `kms key import`: bring your own key
//! (GetParametersForImport + ImportKeyMaterial).
//!
//! Two ways: (1) offline, for an external party that keeps its key
//! elsewhere: `import-parameters KEY --out-dir D` writes the import public
//! key (DER and PEM) and the token; the party wraps its 32-byte key with
//! RSA-OAEP (e.g. `openssl pkeyutl -encrypt -pubin -inkey D/public_key.pem
//! -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha1
//! -pkeyopt rsa_mgf1_md:sha1`) and `import KEY --wrapped-material F
//! --import-token D/import_token.bin` sends it. (2) one step:
//! `import KEY --key-material-file F` does all of it here, wrapping with the
//! RustCrypto `rsa` crate; the material exists in clear in this process
//! only (zeroized after wrapping) and in the file the operator gave.
//!
//! Never prints or logs the key material.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use kms_proto::v1 as pb;
use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};
use serde_json::json;
use zeroize::Zeroizing;

use super::output;
use super::{ClientOptions, connect, required};

/// The length of an AES-256 key, the only material kms imports.
const KEY_MATERIAL_LEN: usize = 32;

/// `--wrapping-algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum WrappingAlgorithm {
    /// RSAES-OAEP with SHA-1 and MGF1-SHA-1 (supported by every HSM, SoftHSM2 included).
    #[value(name = "RSAES_OAEP_SHA_1")]
    RSAES_OAEP_SHA_1,
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256 (where the HSM supports it).
    #[value(name = "RSAES_OAEP_SHA_256")]
    RSAES_OAEP_SHA_256,
}

impl WrappingAlgorithm {
    fn proto(self) -> pb::WrappingAlgorithm {
        match self {
            WrappingAlgorithm::RSAES_OAEP_SHA_1 => pb::WrappingAlgorithm::RsaesOaepSha1,
            WrappingAlgorithm::RSAES_OAEP_SHA_256 => pb::WrappingAlgorithm::RsaesOaepSha256,
        }
    }
}

/// `--wrapping-key-spec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum WrappingKeySpec {
    /// 2048-bit RSA.
    #[value(name = "RSA_2048")]
    RSA_2048,
    /// 3072-bit RSA.
    #[value(name = "RSA_3072")]
    RSA_3072,
    /// 4096-bit RSA.
    #[value(name = "RSA_4096")]
    RSA_4096,
}

impl WrappingKeySpec {
    fn proto(self) -> pb::WrappingKeySpec {
        match self {
            WrappingKeySpec::RSA_2048 => pb::WrappingKeySpec::Rsa2048,
            WrappingKeySpec::RSA_3072 => pb::WrappingKeySpec::Rsa3072,
            WrappingKeySpec::RSA_4096 => pb::WrappingKeySpec::Rsa4096,
        }
    }
}

/// Arguments of `kms key import-parameters`.
#[derive(Debug, clap::Args)]
pub struct ImportParametersArgs {
    /// Key id or alias of a key created with `--origin external`.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Directory to write public_key.der, public_key.pem and import_token.bin into
    /// (created if missing; existing files are not overwritten).
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,
    /// How the material will be wrapped.
    #[arg(long, value_enum, default_value = "RSAES_OAEP_SHA_1")]
    pub wrapping_algorithm: WrappingAlgorithm,
    /// Size of the import key pair.
    #[arg(long, value_enum, default_value = "RSA_3072")]
    pub wrapping_key_spec: WrappingKeySpec,
    /// How long the parameters stay valid, seconds (1-86400; default 86400).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub valid_for_secs: Option<u32>,
}

/// Arguments of `kms key import`.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("material").required(true).args(["wrapped_material", "key_material_file"])
))]
pub struct ImportArgs {
    /// Key id or alias of a key created with `--origin external`.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// The 32-byte key, RSA-OAEP-wrapped under the public key of
    /// `import-parameters` (raw bytes). Needs --import-token.
    #[arg(long, value_name = "FILE", requires = "import_token")]
    pub wrapped_material: Option<PathBuf>,
    /// The import_token.bin written by `import-parameters`.
    #[arg(long, value_name = "FILE", requires = "wrapped_material")]
    pub import_token: Option<PathBuf>,
    /// One step: a file holding exactly the 32 raw bytes of the key. The CLI gets
    /// fresh import parameters, wraps the key locally and imports it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["wrapped_material", "import_token"])]
    pub key_material_file: Option<PathBuf>,
    /// The algorithm the material is (to be) wrapped with.
    #[arg(long, value_enum, default_value = "RSAES_OAEP_SHA_1")]
    pub wrapping_algorithm: WrappingAlgorithm,
    /// One step only: size of the import key pair.
    #[arg(long, value_enum, default_value = "RSA_3072")]
    pub wrapping_key_spec: WrappingKeySpec,
}

/// `kms key import-parameters`.
pub(crate) async fn import_parameters(
    args: ImportParametersArgs,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    // The files are checked before asking: new parameters supersede the
    // key's outstanding ones, so a request whose answer cannot be saved
    // would cancel a token the user may still hold.
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let der = args.out_dir.join("public_key.der");
    let pem = args.out_dir.join("public_key.pem");
    let token = args.out_dir.join("import_token.bin");
    for path in [&der, &pem, &token] {
        if path.exists() {
            anyhow::bail!(
                "{} exists: choose another --out-dir (nothing was requested; outstanding import parameters stay valid)",
                path.display()
            );
        }
    }
    let reply = connect(options)
        .await?
        .get_parameters_for_import(pb::GetParametersForImportRequest {
            key_id: args.key,
            wrapping_algorithm: args.wrapping_algorithm.proto() as i32,
            wrapping_key_spec: args.wrapping_key_spec.proto() as i32,
            valid_for: args.valid_for_secs.map(|s| prost_types::Duration {
                seconds: i64::from(s),
                nanos: 0,
            }),
        })
        .await?;
    write_new(&der, &reply.public_key)?;
    write_new(&pem, pem_of(&reply.public_key).as_bytes())?;
    write_new(&token, &reply.import_token)?;
    let valid_to = output::time_cell(reply.parameters_valid_to.as_ref());
    if options.json {
        output::emit_json(&json!({
            "key_id": reply.key_id,
            "public_key_der": der,
            "public_key_pem": pem,
            "import_token": token,
            "parameters_valid_to": output::time_json(reply.parameters_valid_to.as_ref()),
            "wrapping_algorithm": format!("{:?}", args.wrapping_algorithm),
        }))
    } else {
        output::emit(&format!(
            "Import parameters for {} (valid to {valid_to}, or until kms restarts):\n  public key  {} (DER), {} (PEM)\n  token       {}\nWrap the 32-byte key with {:?} under the public key, then run\n  kms key import {} --wrapped-material FILE --import-token {}{}\n",
            reply.key_id,
            der.display(),
            pem.display(),
            token.display(),
            args.wrapping_algorithm,
            reply.key_id,
            token.display(),
            match args.wrapping_algorithm {
                WrappingAlgorithm::RSAES_OAEP_SHA_1 => "",
                WrappingAlgorithm::RSAES_OAEP_SHA_256 => " --wrapping-algorithm RSAES_OAEP_SHA_256",
            },
        ))
    }
}

/// `kms key import`.
pub(crate) async fn import(args: ImportArgs, options: &ClientOptions) -> anyhow::Result<()> {
    let client = connect(options).await?;
    let (key_id, token, wrapped) = match (
        &args.key_material_file,
        &args.wrapped_material,
        &args.import_token,
    ) {
        (Some(material), _, _) => {
            let material = read_material(material)?;
            let params = client
                .get_parameters_for_import(pb::GetParametersForImportRequest {
                    key_id: args.key.clone(),
                    wrapping_algorithm: args.wrapping_algorithm.proto() as i32,
                    wrapping_key_spec: args.wrapping_key_spec.proto() as i32,
                    valid_for: None,
                })
                .await?;
            let wrapped = wrap(&params.public_key, &material, args.wrapping_algorithm)?;
            (params.key_id, params.import_token, wrapped)
        }
        (None, Some(wrapped), Some(token)) => (
            args.key.clone(),
            read(token, "--import-token")?,
            read(wrapped, "--wrapped-material")?,
        ),
        _ => anyhow::bail!("give --key-material-file, or --wrapped-material with --import-token"),
    };
    let reply = client
        .import_key_material(pb::ImportKeyMaterialRequest {
            key_id,
            import_token: token,
            encrypted_key_material: wrapped,
            wrapping_algorithm: args.wrapping_algorithm.proto() as i32,
        })
        .await?;
    let metadata = required(reply.key_metadata, "key metadata")?;
    let version = required(reply.new_version, "new version")?;
    if options.json {
        output::emit_json(&json!({
            "key_id": metadata.key_id,
            "new_version": version.version,
            "primary_version": metadata.primary_version,
            "state": output::key_state_name(metadata.state),
        }))
    } else {
        output::emit(&format!(
            "Imported key material into {}: version {} (origin EXTERNAL) is now primary.\n",
            metadata.key_id, version.version
        ))
    }
}

/// RSA-OAEP of `material` under the DER SubjectPublicKeyInfo `spki`.
fn wrap(spki: &[u8], material: &[u8], algorithm: WrappingAlgorithm) -> anyhow::Result<Vec<u8>> {
    let public = RsaPublicKey::from_public_key_der(spki)
        .context("the server's import public key is not an RSA SubjectPublicKeyInfo")?;
    let padding = match algorithm {
        WrappingAlgorithm::RSAES_OAEP_SHA_1 => Oaep::new::<sha1::Sha1>(),
        WrappingAlgorithm::RSAES_OAEP_SHA_256 => Oaep::new::<rsa::sha2::Sha256>(),
    };
    public
        .encrypt(&mut rsa::rand_core::OsRng, padding, material)
        .context("RSA-OAEP wrapping of the key material failed")
}

/// The key material file: exactly 32 raw bytes.
fn read_material(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let material = Zeroizing::new(read(path, "--key-material-file")?);
    if material.len() != KEY_MATERIAL_LEN {
        anyhow::bail!(
            "--key-material-file {} holds {} bytes; an AES-256 key is exactly {KEY_MATERIAL_LEN} raw bytes",
            path.display(),
            material.len()
        );
    }
    Ok(material)
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Writes a new file; refuses to overwrite (old parameters are a mistake
/// waiting to happen).
fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// PEM "PUBLIC KEY" (RFC 7468 §13) of a DER SubjectPublicKeyInfo.
fn pem_of(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_wraps_at_64_columns_and_round_trips_through_the_rsa_crate() {
        use rsa::pkcs8::EncodePublicKey;
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).expect("key");
        let der = private
            .to_public_key()
            .to_public_key_der()
            .expect("der")
            .into_vec();
        let pem = pem_of(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let parsed = RsaPublicKey::from_public_key_pem(&pem).expect("PEM parses");
        assert_eq!(parsed, private.to_public_key());
        let material = [7u8; 32];
        let wrapped = wrap(&der, &material, WrappingAlgorithm::RSAES_OAEP_SHA_1).expect("wrap");
        let back = private
            .decrypt(Oaep::new::<sha1::Sha1>(), &wrapped)
            .expect("unwrap");
        assert_eq!(back, material);
    }
}
