//! Access keys of the AWS KMS API: access key id → (principal, secret),
//! the secrets read from files of mode 0600 when the listener starts, and
//! dev mode's generated key (`<data-dir>/aws-credentials`).
//!
//! Secrets are held zeroizing, never cloned, and their Debug is redacted;
//! nothing here logs a secret or puts one in an error.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::config::{AwsCredentialConfig, is_valid_access_key_id};

/// Why the configured secrets could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("cannot read the AWS secret key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the AWS secret key file {path} is readable by group or others (mode {mode:#o}); make it 0600"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "the AWS secret key file {path} holds no secret key (16 to 128 printable characters, alone or as aws_secret_access_key)"
    )]
    Malformed { path: PathBuf },
}

/// A secret access key: zeroized on drop, never cloned, redacted in Debug.
pub struct SecretAccessKey(Zeroizing<Vec<u8>>);

impl SecretAccessKey {
    fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretAccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

#[derive(Debug)]
struct Entry {
    principal: String,
    secret: SecretAccessKey,
}

/// The access keys the listener accepts.
#[derive(Debug, Default)]
pub struct AwsCredentials {
    keys: HashMap<String, Entry>,
}

impl AwsCredentials {
    /// Reads every entry's secret file.
    ///
    /// # Errors
    /// [`CredentialError`] naming the file: unreadable, readable by group
    /// or others, or holding no well-formed secret.
    pub fn load(entries: &[AwsCredentialConfig]) -> Result<AwsCredentials, CredentialError> {
        let mut keys = HashMap::with_capacity(entries.len());
        for entry in entries {
            let secret = read_secret_file(&entry.secret_file)?;
            keys.insert(
                entry.access_key_id.clone(),
                Entry {
                    principal: entry.principal.clone(),
                    secret,
                },
            );
        }
        Ok(AwsCredentials { keys })
    }

    /// The principal an access key maps to.
    pub fn principal(&self, access_key_id: &str) -> Option<&str> {
        self.keys.get(access_key_id).map(|e| e.principal.as_str())
    }

    /// The secret of an access key (for SigV4 verification only).
    pub(super) fn secret(&self, access_key_id: &str) -> Option<&[u8]> {
        self.keys.get(access_key_id).map(|e| e.secret.expose())
    }

    /// How many access keys are configured.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no access key is configured (then every request is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn is_valid_secret(secret: &str) -> bool {
    (16..=128).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic())
}

/// The value of `name = value` in an AWS shared-credentials (INI) file,
/// from its first profile that has it.
fn ini_value<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == name).then(|| value.trim())
    })
}

/// Reads a secret file: mode 0600 or stricter; either the secret alone or
/// a shared-credentials file with `aws_secret_access_key`.
fn read_secret_file(path: &Path) -> Result<SecretAccessKey, CredentialError> {
    let read_error = |source| CredentialError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read_error)?);
    let secret = ini_value(&text, "aws_secret_access_key").unwrap_or_else(|| text.trim());
    if !is_valid_secret(secret) {
        return Err(CredentialError::Malformed {
            path: path.to_owned(),
        });
    }
    Ok(SecretAccessKey(Zeroizing::new(secret.as_bytes().to_vec())))
}

/// The access key id of an AWS shared-credentials file (dev mode's).
///
/// # Errors
/// The file cannot be read, or names no valid `aws_access_key_id`.
pub fn access_key_id_of(path: &Path) -> std::io::Result<String> {
    let text = Zeroizing::new(std::fs::read_to_string(path)?);
    ini_value(&text, "aws_access_key_id")
        .filter(|id| is_valid_access_key_id(id))
        .map(str::to_owned)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no valid aws_access_key_id in the file",
            )
        })
}

/// Dev mode: creates `path` (mode 0600, AWS shared-credentials format,
/// profile `default`) with a fresh access key id (`AKIA` and 16 characters
/// of A-Z2-7) and a 40-character secret, unless it exists. Returns the
/// access key id in the file.
///
/// # Errors
/// The file cannot be created or read, or the random generator failed.
pub fn ensure_dev_credentials(path: &Path) -> std::io::Result<String> {
    use ring::rand::SecureRandom;
    if path.exists() {
        return access_key_id_of(path);
    }
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    const SECRET_ALPHABET: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut random = Zeroizing::new([0u8; 56]);
    ring::rand::SystemRandom::new()
        .fill(random.as_mut())
        .map_err(|_| std::io::Error::other("system random generator failed"))?;
    let id: String = std::iter::once("AKIA".to_owned())
        .chain(
            random[..16]
                .iter()
                .map(|b| char::from(BASE32[usize::from(b % 32)]).to_string()),
        )
        .collect();
    let secret: Zeroizing<String> = Zeroizing::new(
        random[16..]
            .iter()
            .map(|b| char::from(SECRET_ALPHABET[usize::from(b % 64)]))
            .collect(),
    );
    let content = Zeroizing::new(format!(
        "# kms serve --dev --aws-api-listen: the dev principal's AWS access key.\n[default]\naws_access_key_id = {id}\naws_secret_access_key = {}\n",
        secret.as_str()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content.as_bytes())?;
    file.sync_all()?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kms-aws-cred-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn dev_credentials_are_0600_and_load_back_with_a_redacted_debug() {
        let dir = scratch("dev");
        let path = dir.join("aws-credentials");
        let id = ensure_dev_credentials(&path).expect("create");
        assert!(is_valid_access_key_id(&id), "{id}");
        assert_eq!(ensure_dev_credentials(&path).expect("reuse"), id);
        let mode = std::fs::metadata(&path).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        let secret = ini_value(&text, "aws_secret_access_key").expect("secret");
        assert_eq!(secret.len(), 40);
        let loaded = AwsCredentials::load(&[AwsCredentialConfig {
            access_key_id: id.clone(),
            secret_file: path.clone(),
            principal: "dev".into(),
        }])
        .expect("load");
        assert_eq!(loaded.principal(&id), Some("dev"));
        assert_eq!(loaded.secret(&id), Some(secret.as_bytes()));
        let debug = format!("{loaded:?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("[REDACTED]"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn secret_files_readable_by_others_or_malformed_are_refused() {
        let dir = scratch("perm");
        let path = dir.join("secret");
        std::fs::write(&path, "abcdefghijklmnopqrstuvwxyz0123456789ABCD\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let entry = AwsCredentialConfig {
            access_key_id: "AKIAAAAAAAAAAAAAAAAA".into(),
            secret_file: path.clone(),
            principal: "p".into(),
        };
        let error = AwsCredentials::load(std::slice::from_ref(&entry)).expect_err("0644");
        assert!(matches!(
            error,
            CredentialError::Permissions { mode: 0o644, .. }
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let loaded = AwsCredentials::load(std::slice::from_ref(&entry)).expect("0600");
        assert_eq!(
            loaded.secret("AKIAAAAAAAAAAAAAAAAA"),
            Some(&b"abcdefghijklmnopqrstuvwxyz0123456789ABCD"[..])
        );
        std::fs::write(&path, "short\n").expect("write");
        assert!(matches!(
            AwsCredentials::load(std::slice::from_ref(&entry)),
            Err(CredentialError::Malformed { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
