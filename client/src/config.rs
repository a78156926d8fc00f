//! How to reach and authenticate to a kms server: endpoint, TLS or mTLS, bearer
//! token, timeouts and the retry policy.
//!
//! Never: print the bearer token or the client's private key. Both live in
//! zeroizing buffers with a redacted `Debug`, and neither type is `Clone`.

use std::fmt;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::retry::RetryPolicy;

/// Default time allowed to establish the connection (10 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline of one call attempt, 30 s (sent as `grpc-timeout` and
/// enforced locally too).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A bearer token, sent as `authorization: Bearer <token>` metadata.
pub struct BearerToken(Zeroizing<String>);

impl BearerToken {
    /// Wraps `token`, which must be visible ASCII without spaces (a header value).
    ///
    /// # Errors
    /// [`crate::Error::InvalidToken`] if `token` is empty or holds anything but
    /// visible ASCII. The error does not echo the token.
    pub fn new(token: impl Into<String>) -> Result<Self, crate::Error> {
        let token = Zeroizing::new(token.into());
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::Error::InvalidToken);
        }
        Ok(BearerToken(token))
    }

    /// The `authorization` header value (marked sensitive so that http's own
    /// Debug and HPACK indexing leave it out).
    ///
    /// # Errors
    /// [`crate::Error::InvalidToken`] if the value is not a valid header value
    /// (not reachable for a token [`BearerToken::new`] accepted).
    pub fn header_value(
        &self,
    ) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, crate::Error> {
        let text = Zeroizing::new(format!("Bearer {}", self.0.as_str()));
        let mut value = tonic::metadata::MetadataValue::try_from(text.as_str())
            .map_err(|_| crate::Error::InvalidToken)?;
        value.set_sensitive(true);
        Ok(value)
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken([REDACTED])")
    }
}

/// A client certificate and its private key (PEM), for mutual TLS.
pub struct ClientIdentity {
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
}

impl ClientIdentity {
    /// The certificate chain and private key, both PEM.
    pub fn from_pem(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        ClientIdentity {
            cert_pem: cert_pem.into(),
            key_pem: Zeroizing::new(key_pem.into()),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("[{} bytes]", self.cert_pem.len()))
            .field("key_pem", &format_args!("[REDACTED]"))
            .finish()
    }
}

/// TLS settings for an `https://` endpoint.
pub struct TlsSettings {
    ca_pem: Vec<u8>,
    identity: Option<ClientIdentity>,
    domain_name: Option<String>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_pem", &format_args!("[{} bytes]", self.ca_pem.len()))
            .field("identity", &self.identity)
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

/// Everything needed to connect a [`crate::KmsClient`].
#[derive(Debug)]
pub struct ClientConfig {
    pub(crate) endpoint: String,
    pub(crate) tls: Option<TlsSettings>,
    pub(crate) token: Option<BearerToken>,
    pub(crate) connect_timeout: Duration,
    pub(crate) call_timeout: Duration,
    pub(crate) retry: RetryPolicy,
}

impl ClientConfig {
    /// A plaintext (`http://`) or TLS (`https://`, then set a CA) endpoint with
    /// default timeouts and retry policy, no credentials.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            tls: None,
            token: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            retry: RetryPolicy::default(),
        }
    }

    /// Trust the server certificates signed by this CA (PEM). Needed for
    /// `https://` endpoints: this build has no system or bundled roots.
    pub fn with_ca_pem(mut self, ca_pem: impl Into<Vec<u8>>) -> Self {
        let tls = self.tls.get_or_insert_with(TlsSettings::empty);
        tls.ca_pem = ca_pem.into();
        self
    }

    /// Present this certificate and key (mutual TLS).
    pub fn with_client_identity(mut self, identity: ClientIdentity) -> Self {
        self.tls.get_or_insert_with(TlsSettings::empty).identity = Some(identity);
        self
    }

    /// Verify the server certificate against this name instead of the
    /// endpoint's host.
    pub fn with_domain_name(mut self, name: impl Into<String>) -> Self {
        self.tls.get_or_insert_with(TlsSettings::empty).domain_name = Some(name.into());
        self
    }

    /// Send this bearer token with every call.
    pub fn with_bearer_token(mut self, token: BearerToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Time allowed to establish the connection (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline of each call attempt, retries each getting their own (default
    /// [`DEFAULT_CALL_TIMEOUT`]).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Retry policy for idempotent calls that fail with UNAVAILABLE.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The `authorization` header these settings send, if any.
    ///
    /// # Errors
    /// As [`BearerToken::header_value`].
    pub fn authorization_header(
        &self,
    ) -> Result<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>, crate::Error> {
        self.token
            .as_ref()
            .map(BearerToken::header_value)
            .transpose()
    }

    /// The tonic endpoint these settings describe (TLS, timeouts; refuses a
    /// token over plaintext to a non-loopback address). For callers that use
    /// the generated clients directly, with [`ClientConfig::authorization_header`].
    ///
    /// # Errors
    /// [`crate::Error::EndpointScheme`] unless the URL starts with `http://`
    /// or `https://`; [`crate::Error::Endpoint`] if the URL or the TLS
    /// settings are refused by the transport; [`crate::Error::TlsNeedsCa`] for an `https://` endpoint
    /// without a CA; [`crate::Error::TlsNeedsHttps`] for TLS settings on an
    /// `http://` endpoint; [`crate::Error::TokenNeedsTls`] for a bearer token
    /// over plaintext to a host other than loopback. Nothing is connected yet.
    pub fn tonic_endpoint(&self) -> Result<tonic::transport::Endpoint, crate::Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let invalid = |source| crate::Error::Endpoint {
            endpoint: self.endpoint.clone(),
            source,
        };
        // Only gRPC's two schemes: anything else ("127.0.0.1:7443",
        // "ftp://…") would otherwise fail later as a connection error, or
        // be dialled as plaintext.
        if !self.endpoint.starts_with("http://") && !self.endpoint.starts_with("https://") {
            return Err(crate::Error::EndpointScheme {
                endpoint: self.endpoint.clone(),
            });
        }
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(invalid)?
            .connect_timeout(self.connect_timeout)
            .timeout(self.call_timeout);
        let https = self.endpoint.starts_with("https://");
        if self.token.is_some() && !https && !endpoint_is_loopback(endpoint.uri()) {
            return Err(crate::Error::TokenNeedsTls);
        }
        match &self.tls {
            None if https => return Err(crate::Error::TlsNeedsCa),
            None => {}
            Some(_) if !https => return Err(crate::Error::TlsNeedsHttps),
            Some(tls) => {
                if tls.ca_pem.is_empty() {
                    return Err(crate::Error::TlsNeedsCa);
                }
                let mut config =
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                if let Some(identity) = &tls.identity {
                    config = config.identity(Identity::from_pem(
                        &identity.cert_pem,
                        identity.key_pem.as_slice(),
                    ));
                }
                if let Some(name) = &tls.domain_name {
                    config = config.domain_name(name.clone());
                }
                endpoint = endpoint.tls_config(config).map_err(invalid)?;
            }
        }
        Ok(endpoint)
    }
}

/// Whether `uri` names a loopback host (`localhost`, 127.0.0.0/8, ::1), where
/// a plaintext connection never leaves the machine.
fn endpoint_is_loopback(uri: &tonic::codegen::http::Uri) -> bool {
    uri.host().is_some_and(|host| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

impl TlsSettings {
    fn empty() -> Self {
        TlsSettings {
            ca_pem: Vec::new(),
            identity: None,
            domain_name: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token_or_the_private_key() {
        let config = ClientConfig::new("https://kms.internal:7443")
            .with_ca_pem(b"-----BEGIN CERTIFICATE-----\nCA\n".to_vec())
            .with_client_identity(ClientIdentity::from_pem(
                b"CERT".to_vec(),
                b"-----BEGIN PRIVATE KEY-----\nsecret-key-material-9f2c\n".to_vec(),
            ))
            .with_bearer_token(BearerToken::new("tok-5e7a1c-very-secret").expect("token"));
        let out = format!("{config:?} {config:#?}");
        assert!(!out.contains("tok-5e7a1c"), "{out}");
        assert!(!out.contains("secret-key-material"), "{out}");
        assert!(
            out.contains("REDACTED") && out.contains("kms.internal"),
            "{out}"
        );
    }

    #[test]
    fn tokens_must_be_header_safe_and_tls_needs_https_and_a_ca() {
        assert!(BearerToken::new("").is_err());
        assert!(BearerToken::new("has space").is_err());
        assert!(BearerToken::new("line\nbreak").is_err());
        let token = BearerToken::new("abc.def-123").expect("token");
        let value = token.header_value().expect("header");
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().expect("ascii"), "Bearer abc.def-123");
        assert!(matches!(
            ClientConfig::new("https://h:1").tonic_endpoint(),
            Err(crate::Error::TlsNeedsCa)
        ));
        assert!(matches!(
            ClientConfig::new("http://h:1")
                .with_ca_pem(b"x".to_vec())
                .tonic_endpoint(),
            Err(crate::Error::TlsNeedsHttps)
        ));
        assert!(
            ClientConfig::new("http://127.0.0.1:1")
                .tonic_endpoint()
                .is_ok()
        );
        assert!(matches!(
            ClientConfig::new("not a url").tonic_endpoint(),
            Err(crate::Error::EndpointScheme { .. })
        ));
        assert!(matches!(
            ClientConfig::new("ftp://127.0.0.1:1").tonic_endpoint(),
            Err(crate::Error::EndpointScheme { .. })
        ));
        assert!(matches!(
            ClientConfig::new("http://[not a host").tonic_endpoint(),
            Err(crate::Error::Endpoint { .. })
        ));
    }
}
