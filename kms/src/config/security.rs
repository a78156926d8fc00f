//! The security half of the configuration: TLS on the gRPC port, who the
//! callers are (`[auth]`), and the abuse limits per principal.
//!
//! ```toml
//! [server.tls]
//! cert_file = "/etc/kms/tls/server.pem"
//! key_file = "/etc/kms/tls/server.key"
//! client_ca_file = "/etc/kms/tls/clients-ca.pem"   # mTLS
//! client_cert = "required"                         # or "optional" (tokens without certs)
//! crl_files = ["/etc/kms/tls/clients-ca.crl"]      # PEM or DER; checked on every handshake
//!
//! [auth]
//! admins = ["spiffe://example.org/ops/*"]
//! auditors = ["spiffe://example.org/security/auditor"]
//!
//! [[auth.tokens]]
//! principal = "batch-job"
//! sha256 = "<64 hex digits: sha256 of the token>"  # `kms token new` prints both
//!
//! [[auth.default_grants]]                          # for keys without a policy
//! principal = "spiffe://example.org/ns/prod/*"
//! permissions = ["describe"]
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use kms_storage::{Grant, KeyPolicy, Permission};
use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::auth::admission::PrincipalLimits;
use crate::auth::is_valid_principal;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    client_cert: Option<String>,
    #[serde(default)]
    crl_files: Vec<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    admins: Vec<String>,
    #[serde(default)]
    auditors: Vec<String>,
    anonymous_principal: Option<String>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    default_grants: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    principal: String,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    principal: String,
    permissions: Vec<String>,
    #[serde(default)]
    required_context: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrincipalLimits {
    pub(super) requests_per_second: Option<f64>,
    pub(super) burst: Option<u32>,
    pub(super) max_in_flight: Option<usize>,
}

/// TLS on the gRPC port.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates are verified against this CA (mTLS).
    pub client_ca_file: Option<PathBuf>,
    /// With a client CA: refuse connections without a client certificate.
    pub client_cert_required: bool,
    /// Certificate revocation lists (PEM or DER files) of the client CA
    /// (and of any intermediate CA between it and client certificates).
    /// With any configured, every client certificate chain is checked
    /// against them and a chain whose revocation status they do not cover is
    /// refused (as OpenSSL's CRL_CHECK_ALL does). Re-read on reload.
    pub crl_files: Vec<PathBuf>,
}

/// Who the callers are and what the roles are.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub admins: Vec<String>,
    pub auditors: Vec<String>,
    /// Principal of callers without credentials: plaintext loopback only.
    pub anonymous_principal: Option<String>,
    /// (principal, SHA-256 of the token).
    pub tokens: Vec<(String, [u8; 32])>,
    /// Policy of keys that have none.
    pub default_policy: KeyPolicy,
}

impl AuthSettings {
    /// Development and tests on plaintext loopback: callers without
    /// credentials are `principal`, an administrator, and keys without a
    /// policy allow every principal everything. Never for production.
    pub fn local_development(principal: &str) -> AuthSettings {
        AuthSettings {
            admins: vec![principal.to_owned()],
            auditors: Vec::new(),
            anonymous_principal: Some(principal.to_owned()),
            tokens: Vec::new(),
            default_policy: KeyPolicy {
                grants: vec![Grant {
                    principal: "*".to_owned(),
                    permissions: Permission::ALL.into(),
                    required_context: BTreeMap::new(),
                }],
            },
        }
    }
}

pub(super) fn validate_tls(raw: Option<RawTls>) -> Result<Option<TlsSettings>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let client_cert_required = match raw.client_cert.as_deref() {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => {
            return Err(invalid(
                "server.tls.client_cert",
                format!("{other:?}: expected \"required\" or \"optional\""),
            ));
        }
    };
    if raw.client_ca_file.is_none() && raw.client_cert.is_some() {
        return Err(invalid(
            "server.tls.client_cert",
            "needs server.tls.client_ca_file (the CA that signs client certificates)",
        ));
    }
    if raw.client_ca_file.is_none() && !raw.crl_files.is_empty() {
        return Err(invalid(
            "server.tls.crl_files",
            "needs server.tls.client_ca_file (revocation lists apply to client certificates)",
        ));
    }
    Ok(Some(TlsSettings {
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        client_ca_file: raw.client_ca_file,
        client_cert_required,
        crl_files: raw.crl_files,
    }))
}

pub(super) fn validate_auth(
    raw: RawAuth,
    listen: SocketAddr,
    tls: Option<&TlsSettings>,
) -> Result<AuthSettings, ConfigError> {
    // Anyone who reaches a plaintext port could read bearer tokens off the
    // wire or call as anonymous: plaintext is for this machine only.
    if tls.is_none() && !listen.ip().is_loopback() {
        return Err(invalid(
            "server.listen",
            format!(
                "{listen} is not a loopback address: a non-loopback listener needs [server.tls]"
            ),
        ));
    }
    if let Some(anonymous) = &raw.anonymous_principal {
        if tls.is_some() || !listen.ip().is_loopback() {
            return Err(invalid(
                "auth.anonymous_principal",
                "allowed only on a plaintext loopback listener (development)",
            ));
        }
        if !is_valid_principal(anonymous) {
            return Err(invalid(
                "auth.anonymous_principal",
                "must be 1 to 1024 printable ASCII characters without spaces",
            ));
        }
    }
    for (field, list) in [
        ("auth.admins", &raw.admins),
        ("auth.auditors", &raw.auditors),
    ] {
        if let Some(bad) = list.iter().find(|p| !is_valid_principal(p)) {
            return Err(invalid(
                field,
                format!("{bad:?} is not a valid principal pattern (printable ASCII, no spaces)"),
            ));
        }
    }
    let mut tokens = Vec::with_capacity(raw.tokens.len());
    for token in raw.tokens {
        if !is_valid_principal(&token.principal) || token.principal.contains('*') {
            return Err(invalid(
                "auth.tokens.principal",
                format!("{:?} is not a valid principal", token.principal),
            ));
        }
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(&token.sha256, &mut digest).is_err() {
            return Err(invalid(
                "auth.tokens.sha256",
                format!(
                    "for principal {}: expected 64 hex digits (the SHA-256 of the token, never the token)",
                    token.principal
                ),
            ));
        }
        if tokens.iter().any(|(_, d)| *d == digest) {
            return Err(invalid(
                "auth.tokens.sha256",
                format!(
                    "for principal {}: the same token is configured twice",
                    token.principal
                ),
            ));
        }
        tokens.push((token.principal, digest));
    }
    let mtls = tls.is_some_and(|t| t.client_ca_file.is_some());
    if tls.is_some() && !mtls && tokens.is_empty() {
        return Err(invalid(
            "auth.tokens",
            "with TLS and no server.tls.client_ca_file, callers can only authenticate with bearer tokens: configure at least one",
        ));
    }
    let grants = raw
        .default_grants
        .into_iter()
        .map(|g| {
            grant(
                "auth.default_grants",
                g.principal,
                &g.permissions,
                g.required_context,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AuthSettings {
        admins: raw.admins,
        auditors: raw.auditors,
        anonymous_principal: raw.anonymous_principal,
        tokens,
        default_policy: KeyPolicy { grants },
    })
}

/// One validated grant (shared with the CLI's policy files).
pub fn grant(
    field: &'static str,
    principal: String,
    permissions: &[String],
    required_context: BTreeMap<String, String>,
) -> Result<Grant, ConfigError> {
    if !is_valid_principal(&principal) {
        return Err(invalid(
            field,
            format!("{principal:?} is not a valid principal pattern (printable ASCII, no spaces)"),
        ));
    }
    if permissions.is_empty() {
        return Err(invalid(
            field,
            format!("grant for {principal}: no permissions"),
        ));
    }
    let permissions = permissions
        .iter()
        .map(|name| {
            Permission::parse(name).ok_or_else(|| {
                invalid(
                    field,
                    format!(
                        "grant for {principal}: unknown permission {name:?} (one of: {})",
                        Permission::ALL.map(Permission::as_str).join(", ")
                    ),
                )
            })
        })
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok(Grant {
        principal,
        permissions,
        required_context,
    })
}

pub(super) fn validate_principal_limits(
    raw: RawPrincipalLimits,
) -> Result<PrincipalLimits, ConfigError> {
    let requests_per_second = match raw.requests_per_second {
        None => None,
        Some(rate) if rate.is_finite() && rate > 0.0 && rate <= 1e7 => Some(rate),
        Some(_) => {
            return Err(invalid(
                "limits.per_principal.requests_per_second",
                "must be above 0 and at most 10000000 (omit for no limit)",
            ));
        }
    };
    let burst = raw.burst.map_or_else(
        || requests_per_second.map_or(1.0, |r| r.ceil().max(1.0)),
        f64::from,
    );
    if burst < 1.0 {
        return Err(invalid("limits.per_principal.burst", "must be at least 1"));
    }
    if raw.max_in_flight == Some(0) {
        return Err(invalid(
            "limits.per_principal.max_in_flight",
            "must be at least 1 (omit for no limit)",
        ));
    }
    Ok(PrincipalLimits {
        requests_per_second,
        burst,
        max_in_flight: raw.max_in_flight,
    })
}
