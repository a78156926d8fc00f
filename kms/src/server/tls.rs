//! The rustls configuration of the gRPC port, built from the files named in
//! `[server.tls]`: the server certificate chain and key, the client CA and
//! the client CAs' revocation lists. Everything is read and checked here, so
//! a configuration that builds is one that serves: the key must match the
//! certificate, the CA file must hold a usable CA, every CRL must parse.
//!
//! The result is one immutable `rustls::ServerConfig`; a reload builds a new
//! one and swaps it in ([`SharedTls`]) for new connections, while existing
//! connections keep the configuration they were accepted with.
//!
//! Never logs or returns key bytes: errors name files, not contents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer,
};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use zeroize::Zeroizing;

use crate::config::TlsSettings;

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS configuration new connections are accepted with; replaced as a
/// whole by a reload.
#[derive(Debug, Clone)]
pub struct SharedTls {
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl SharedTls {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        SharedTls {
            current: Arc::new(RwLock::new(config)),
        }
    }

    /// The configuration for a connection accepted now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read())
    }

    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        *self.current.write() = config;
    }
}

/// Why `[server.tls]` cannot be put in force. Names the field and the file,
/// never file contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("server.tls.{field}: cannot read {path}")]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("server.tls.{field}: {path} is not valid PEM/DER: {reason}")]
    Malformed {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("server.tls.{field}: {path} holds no {what}")]
    Empty {
        field: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error(
        "server.tls.cert_file {cert} and server.tls.key_file {key} are not a usable pair: {reason}"
    )]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        reason: rustls::Error,
    },
    #[error("server.tls.client_ca_file {path}: no usable CA certificate in it")]
    ClientCa { path: PathBuf },
    /// CRLs are configured, but some client CA issued none of them: every
    /// client under that CA would be refused (revocation status unknown).
    #[error(
        "server.tls.crl_files: {uncovered} of the {total} CA certificate(s) in server.tls.client_ca_file {path} issued none of the configured CRLs; with CRLs configured, every client under such a CA would be refused"
    )]
    CrlCoverage {
        path: PathBuf,
        uncovered: usize,
        total: usize,
    },
    #[error("server.tls: cannot build the client certificate verifier: {reason}")]
    Verifier {
        reason: rustls::server::VerifierBuilderError,
    },
    #[error("server.tls: {reason}")]
    Protocol { reason: rustls::Error },
}

/// Reads every file `settings` names and builds the server configuration
/// (ring provider, TLS 1.2 and 1.3, ALPN h2 for gRPC).
///
/// # Errors
/// [`TlsError`], naming the field and file, if a file cannot be read or
/// parsed, the key does not match the certificate, the CA file holds no CA,
/// or a CRL is invalid.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("cert_file", &settings.cert_file)?;
    let key = private_key(&settings.key_file)?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|reason| TlsError::Protocol { reason })?;
    let builder = match &settings.client_ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _ignored) =
                roots.add_parsable_certificates(certificates("client_ca_file", ca_file)?);
            if added == 0 {
                return Err(TlsError::ClientCa {
                    path: ca_file.clone(),
                });
            }
            let mut crls = Vec::new();
            for path in &settings.crl_files {
                crls.extend(revocation_lists(path)?);
            }
            if !crls.is_empty() {
                check_crl_coverage(ca_file, &roots, &crls)?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            if !crls.is_empty() {
                // Default depth (the whole chain) and unknown status refused:
                // a configured CRL that does not cover a chain is an error to
                // see, not a silent pass.
                verifier = verifier.with_crls(crls);
            }
            if !settings.client_cert_required {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|reason| TlsError::Verifier { reason })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // `with_single_cert` checks that the key matches the certificate.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|reason| TlsError::Identity {
            cert: settings.cert_file.clone(),
            key: settings.key_file.clone(),
            reason,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn read(field: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsError::Read {
            field,
            path: path.to_owned(),
            source,
        })
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// The certificates of a PEM file (or one DER certificate).
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(field, path)?;
    let certs = if is_pem(&bytes) {
        CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Malformed {
                field,
                path: path.to_owned(),
                reason: e.to_string(),
            })?
    } else {
        vec![CertificateDer::from(bytes.to_vec())]
    };
    if certs.is_empty() {
        return Err(TlsError::Empty {
            field,
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1). The file's bytes
/// are wiped once parsed.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read("key_file", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            field: "key_file",
            path: path.to_owned(),
            what: "private key",
        },
        // The pem error never quotes the file's contents.
        other => TlsError::Malformed {
            field: "key_file",
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// With CRLs configured the verifier refuses a chain whose revocation status
/// it cannot tell, so a client CA that issued none of the CRLs would lock
/// out all of its clients (administrators included, until a SIGHUP with a
/// fixed file). Refuse such a configuration instead. (CRLs of intermediate
/// CAs cannot be checked here: the intermediates are not configured.)
///
/// # Errors
/// [`TlsError::CrlCoverage`] naming how many client CAs are uncovered.
fn check_crl_coverage(
    ca_file: &Path,
    roots: &rustls::RootCertStore,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<(), TlsError> {
    // Both sides are the DER value of the X.509 Name, as webpki compares
    // a CRL's issuer with a certificate's issuer.
    let issuers: Vec<Vec<u8>> = crls
        .iter()
        .filter_map(|crl| webpki::BorrowedCertRevocationList::from_der(crl.as_ref()).ok())
        .map(|crl| webpki::CertRevocationList::from(crl).issuer().to_vec())
        .collect();
    let uncovered = roots
        .roots
        .iter()
        .filter(|anchor| {
            !issuers
                .iter()
                .any(|issuer| issuer[..] == anchor.subject[..])
        })
        .count();
    if uncovered > 0 {
        return Err(TlsError::CrlCoverage {
            path: ca_file.to_owned(),
            uncovered,
            total: roots.roots.len(),
        });
    }
    Ok(())
}

/// The CRLs of a PEM file (one or more `X509 CRL` blocks) or one DER CRL,
/// each checked to parse so that an error names its file.
fn revocation_lists(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read("crl_files", path)?;
    let malformed = |reason: String| TlsError::Malformed {
        field: "crl_files",
        path: path.to_owned(),
        reason,
    };
    let crls = if is_pem(&bytes) {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| malformed(e.to_string()))?
    } else {
        vec![CertificateRevocationListDer::from(bytes.to_vec())]
    };
    if crls.is_empty() {
        return Err(TlsError::Empty {
            field: "crl_files",
            path: path.to_owned(),
            what: "certificate revocation list",
        });
    }
    for crl in &crls {
        webpki::BorrowedCertRevocationList::from_der(crl.as_ref())
            .map_err(|e| malformed(format!("{e:?}")))?;
    }
    Ok(crls)
}
