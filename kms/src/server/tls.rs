//! The rustls configuration of the gRPC port, from PEM files.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use zeroize::Zeroizing;

use crate::config::TlsSettings;

use super::ServerError;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub fn server_tls_config(settings: &TlsSettings) -> Result<ServerTlsConfig, ServerError> {
    let cert = read(&settings.cert_file)?;
    // The private key is wiped from our buffer once rustls has parsed it.
    let key = Zeroizing::new(read(&settings.key_file)?);
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key.as_slice()))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca_file) = &settings.client_ca_file {
        config = config
            .client_ca_root(Certificate::from_pem(read(ca_file)?))
            .client_auth_optional(!settings.client_cert_required);
    }
    Ok(config)
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::TlsFile {
        path: path.to_owned(),
        source,
    })
}
