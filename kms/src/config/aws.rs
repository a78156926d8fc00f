//! `[aws_api]`: the AWS KMS JSON 1.1 listener (`crate::aws`), with SigV4
//! credentials mapped to our principals.
//!
//! ```toml
//! [aws_api]
//! listen = "127.0.0.1:4599"        # its own port (HTTP/1.1, AWS JSON 1.1)
//! region = "us-east-1"             # what ARNs and SigV4 credential scopes name
//! account_id = "111122223333"      # 12 digits, used in ARNs
//! # tls = { cert_file = "...", key_file = "..." }   # as [server.tls]
//!
//! [[aws_api.credentials]]
//! access_key_id = "AKIAEXAMPLEKEY000001"
//! secret_file = "/etc/kms/aws/app-1.secret"   # mode 0600: never in this file or argv
//! principal = "app-1"                         # what key policies and the audit log name
//! ```
//!
//! The secret files are read when the listener starts (`aws::credentials`),
//! never here: this configuration holds paths only, so its Debug is safe.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::security::{self, RawTls, TlsSettings};
use super::{ConfigError, invalid, parse_addr};

/// The `[aws_api]` section, validated.
#[derive(Debug, Clone)]
pub struct AwsApiConfig {
    /// Where the AWS KMS API listens (plain HTTP/1.1 unless `tls`).
    pub listen: SocketAddr,
    /// TLS on the AWS port, with the same settings and reload rules as
    /// `[server.tls]` (the files are read at start).
    pub tls: Option<TlsSettings>,
    /// The region ARNs name and SigV4 credential scopes must name
    /// (`<date>/<region>/kms/aws4_request`).
    pub region: String,
    /// The 12-digit account id ARNs name (`arn:aws:kms:<region>:<account>:key/<id>`).
    pub account_id: String,
    /// Access keys and the principals they map to.
    pub credentials: Vec<AwsCredentialConfig>,
}

/// One `[[aws_api.credentials]]` entry: an access key id, the file that
/// holds its secret, and the principal requests signed with it act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsCredentialConfig {
    /// 16 to 128 characters of `[A-Z0-9]` (AWS's access key id alphabet).
    pub access_key_id: String,
    /// A file of mode 0600 (no group or other bits) holding the secret
    /// access key alone, or an AWS shared-credentials file whose
    /// `aws_secret_access_key` is the secret.
    pub secret_file: PathBuf,
    /// The principal (as `[auth]` and key policies name principals).
    pub principal: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAwsApi {
    listen: String,
    region: Option<String>,
    account_id: Option<String>,
    tls: Option<RawTls>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    access_key_id: String,
    secret_file: PathBuf,
    principal: String,
}

/// The region ARNs name unless configured.
pub const DEFAULT_AWS_REGION: &str = "us-east-1";
/// The account id ARNs name unless configured (AWS's documentation example).
pub const DEFAULT_AWS_ACCOUNT_ID: &str = "111122223333";

/// Whether `id` is an access key id we accept: 16 to 128 characters of
/// `[A-Z0-9]` (the IAM API's AccessKeyId pattern, `[\w]+` of 16-128, narrowed
/// to what AWS issues).
pub fn is_valid_access_key_id(id: &str) -> bool {
    (16..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Whether `region` looks like an AWS region name (`us-east-1`): 1 to 32
/// lowercase letters, digits and dashes.
fn is_valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Validates `[aws_api]`: a listen address, a region and 12-digit account,
/// each access key id well-formed and used once, each principal valid.
pub(super) fn validate(raw: Option<RawAwsApi>) -> Result<Option<AwsApiConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let listen = parse_addr("aws_api.listen", &raw.listen)?;
    let region = raw.region.unwrap_or_else(|| DEFAULT_AWS_REGION.to_owned());
    if !is_valid_region(&region) {
        return Err(invalid(
            "aws_api.region",
            "must be 1 to 32 lowercase letters, digits and dashes (e.g. us-east-1)",
        ));
    }
    let account_id = raw
        .account_id
        .unwrap_or_else(|| DEFAULT_AWS_ACCOUNT_ID.to_owned());
    if account_id.len() != 12 || !account_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("aws_api.account_id", "must be 12 digits"));
    }
    let tls = security::validate_tls(raw.tls)?;
    let mut credentials: Vec<AwsCredentialConfig> = Vec::with_capacity(raw.credentials.len());
    for entry in raw.credentials {
        if !is_valid_access_key_id(&entry.access_key_id) {
            return Err(invalid(
                "aws_api.credentials.access_key_id",
                "must be 16 to 128 characters of A-Z and 0-9",
            ));
        }
        if credentials
            .iter()
            .any(|c| c.access_key_id == entry.access_key_id)
        {
            return Err(invalid(
                "aws_api.credentials.access_key_id",
                format!("{} is configured twice", entry.access_key_id),
            ));
        }
        if !crate::auth::is_valid_principal(&entry.principal) {
            return Err(invalid(
                "aws_api.credentials.principal",
                format!("{:?} is not a valid principal", entry.principal),
            ));
        }
        credentials.push(AwsCredentialConfig {
            access_key_id: entry.access_key_id,
            secret_file: entry.secret_file,
            principal: entry.principal,
        });
    }
    Ok(Some(AwsApiConfig {
        listen,
        tls,
        region,
        account_id,
        credentials,
    }))
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    const BASE: &str = r#"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "kms"
pin_file = "/etc/kms/pin"

[storage]
data_dir = "/var/lib/kms"
"#;

    fn parse(aws: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{BASE}\n{aws}"))
    }

    #[test]
    fn the_aws_api_section_is_optional_and_validated() {
        assert!(parse("").expect("no [aws_api]").aws_api.is_none());
        let config = parse(
            r#"
[aws_api]
listen = "127.0.0.1:4599"

[[aws_api.credentials]]
access_key_id = "AKIAEXAMPLEKEY000001"
secret_file = "/etc/kms/aws/app.secret"
principal = "app-1"
"#,
        )
        .expect("valid");
        let aws = config.aws_api.expect("[aws_api]");
        assert_eq!(aws.listen.to_string(), "127.0.0.1:4599");
        assert_eq!(aws.region, super::DEFAULT_AWS_REGION);
        assert_eq!(aws.account_id, super::DEFAULT_AWS_ACCOUNT_ID);
        assert_eq!(aws.credentials.len(), 1);
        assert_eq!(aws.credentials[0].principal, "app-1");

        let entry = |id: &str| {
            format!(
                "[[aws_api.credentials]]\naccess_key_id = \"{id}\"\nsecret_file = \"/s\"\nprincipal = \"p\"\n"
            )
        };
        let cases = [
            (
                "[aws_api]\nlisten = \"nowhere\"\n".to_owned(),
                "aws_api.listen",
            ),
            (
                "[aws_api]\nlisten = \"127.0.0.1:1\"\naccount_id = \"12345\"\n".to_owned(),
                "aws_api.account_id",
            ),
            (
                "[aws_api]\nlisten = \"127.0.0.1:1\"\nregion = \"US East\"\n".to_owned(),
                "aws_api.region",
            ),
            (
                format!("[aws_api]\nlisten = \"127.0.0.1:1\"\n{}", entry("short")),
                "aws_api.credentials.access_key_id",
            ),
            (
                format!(
                    "[aws_api]\nlisten = \"127.0.0.1:1\"\n{}{}",
                    entry("AKIAEXAMPLEKEY000001"),
                    entry("AKIAEXAMPLEKEY000001")
                ),
                "aws_api.credentials.access_key_id",
            ),
        ];
        for (text, field) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid { field: named, .. }) => {
                    assert_eq!(named, field, "{text}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // The secret itself is never accepted in the configuration.
        assert!(matches!(
            parse(
                "[aws_api]\nlisten = \"127.0.0.1:1\"\n[[aws_api.credentials]]\naccess_key_id = \"AKIAEXAMPLEKEY000001\"\nsecret_access_key = \"x\"\nprincipal = \"p\"\nsecret_file = \"/s\"\n"
            ),
            Err(ConfigError::Parse { .. })
        ));
    }
}
