//! Errors of the typed client. Messages carry codes, server messages and
//! endpoints, never tokens, keys or plaintext.

/// A failed client operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint URL or its TLS settings were refused by the transport.
    #[error("invalid endpoint {endpoint:?}")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// An `https://` endpoint without a CA certificate.
    #[error("an https endpoint needs a CA certificate (PEM)")]
    TlsNeedsCa,
    /// TLS settings for an `http://` endpoint.
    #[error("TLS settings need an https:// endpoint")]
    TlsNeedsHttps,
    /// A bearer token with a plaintext endpoint that is not on this machine.
    #[error(
        "refusing to send a bearer token over plaintext to a non-loopback endpoint: use https://"
    )]
    TokenNeedsTls,
    /// The connection could not be established.
    #[error("cannot connect to the kms server at {endpoint}")]
    Connect {
        /// The endpoint as configured.
        endpoint: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The bearer token is empty or not a valid header value.
    #[error("the bearer token must be non-empty visible ASCII")]
    InvalidToken,
    /// The server (or the transport) answered with a non-OK status.
    #[error("{rpc} failed: {code:?}: {message} (after {attempts} attempt(s))")]
    Rpc {
        /// The RPC name, e.g. `GenerateDataKey`.
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message as the server wrote it.
        message: String,
        /// Attempts made (more than 1 only for retryable calls).
        attempts: u32,
    },
    /// A successful reply lacks a field the client needs.
    #[error("the server's {rpc} reply has no {field}")]
    MissingField {
        /// The RPC name.
        rpc: &'static str,
        /// The missing field.
        field: &'static str,
    },
}

impl Error {
    /// The gRPC status code of an [`Error::Rpc`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}
