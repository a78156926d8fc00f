//! Who is calling and what they may do, without any gRPC types:
//!
//! - [`tokens`]: bearer tokens, configured only as SHA-256 digests and
//!   compared in constant time;
//! - [`certs`]: the principal named by a verified client certificate;
//! - [`Authenticator`]: credentials of one request → its principal;
//! - [`policy`]: the grant language (principal patterns, permissions, required
//!   encryption-context entries) and the administrator/auditor roles;
//! - [`admission`]: global and per-principal concurrency caps and rate limits.
//!
//! The gRPC layer (`grpc::auth_layer`) applies these before any handler runs.

pub mod admission;
pub mod certs;
pub mod policy;
pub mod tokens;

use std::sync::Arc;

use parking_lot::RwLock;
use tokens::TokenStore;

/// Why a request's credentials were not accepted. The Display is what the
/// caller sees: it never echoes the presented token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: present a client certificate or an authorization bearer token")]
    NoCredentials,
    #[error("malformed authorization header: expected \"Bearer <token>\"")]
    MalformedAuthorization,
    #[error("invalid bearer token")]
    UnknownToken,
    #[error("the client certificate names no usable principal (URI SAN, DNS SAN or CN)")]
    UnusableCertificate,
}

/// Turns the credentials of a request into its principal.
///
/// The tokens and the anonymous principal can be replaced while the server
/// runs (configuration reload): each request authenticates against one
/// consistent snapshot.
#[derive(Debug)]
pub struct Authenticator {
    current: RwLock<Arc<Credentials>>,
}

/// What [`Authenticator`] checks against.
#[derive(Debug)]
struct Credentials {
    tokens: TokenStore,
    /// Given to callers without credentials (dev mode and tests on loopback
    /// without TLS only; configuration validation enforces that).
    anonymous_principal: Option<String>,
}

impl Authenticator {
    pub fn new(tokens: TokenStore, anonymous_principal: Option<String>) -> Self {
        Authenticator {
            current: RwLock::new(Arc::new(Credentials {
                tokens,
                anonymous_principal,
            })),
        }
    }

    /// Puts new tokens and anonymous principal in force for every later
    /// request; requests already authenticated are unaffected.
    pub fn replace(&self, tokens: TokenStore, anonymous_principal: Option<String>) {
        *self.current.write() = Arc::new(Credentials {
            tokens,
            anonymous_principal,
        });
    }

    /// `authorization`: the raw `authorization` header, if any.
    /// `client_certificate`: the DER leaf certificate the TLS layer verified
    /// against the configured client CA, if any.
    ///
    /// A presented bearer token must be valid (an invalid token is never
    /// ignored in favour of a certificate); otherwise the certificate names
    /// the principal; otherwise the anonymous principal, if configured.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        client_certificate: Option<&[u8]>,
    ) -> Result<String, AuthError> {
        let current = Arc::clone(&self.current.read());
        if let Some(header) = authorization {
            let token = bearer_token(header).ok_or(AuthError::MalformedAuthorization)?;
            return current
                .tokens
                .principal_of(token)
                .map(str::to_owned)
                .ok_or(AuthError::UnknownToken);
        }
        if let Some(der) = client_certificate {
            return certs::principal_from_certificate(der)
                .map_err(|_| AuthError::UnusableCertificate);
        }
        current
            .anonymous_principal
            .clone()
            .ok_or(AuthError::NoCredentials)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 6750).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A principal or principal pattern is printable ASCII without spaces, at most
/// 1 KiB: what certificates and configuration can name, and safe to log.
pub fn is_valid_principal(text: &str) -> bool {
    !text.is_empty() && text.len() <= 1024 && text.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator(anonymous: Option<&str>) -> Authenticator {
        let tokens = TokenStore::new(vec![(
            "batch-job".to_owned(),
            tokens::token_digest(b"s3cret-token-value"),
        )]);
        Authenticator::new(tokens, anonymous.map(str::to_owned))
    }

    #[test]
    fn a_valid_bearer_token_names_its_principal() {
        let a = authenticator(None);
        assert_eq!(
            a.authenticate(Some(b"Bearer s3cret-token-value"), None),
            Ok("batch-job".to_owned())
        );
        assert_eq!(
            a.authenticate(Some(b"bearer   s3cret-token-value "), None),
            Ok("batch-job".to_owned())
        );
    }

    #[test]
    fn bad_tokens_are_refused_and_never_fall_back() {
        let a = authenticator(Some("anonymous"));
        assert_eq!(
            a.authenticate(Some(b"Bearer wrong"), None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(
            a.authenticate(Some(b"Basic dXNlcjpwYXNz"), None),
            Err(AuthError::MalformedAuthorization)
        );
        assert_eq!(
            a.authenticate(Some(b"Bearer "), None),
            Err(AuthError::MalformedAuthorization)
        );
        // The error text never contains what was presented.
        let shown = a
            .authenticate(Some(b"Bearer not-a-real-token"), None)
            .expect_err("refused")
            .to_string();
        assert!(!shown.contains("not-a-real-token"), "{shown}");
    }

    #[test]
    fn without_credentials_only_a_configured_anonymous_principal_passes() {
        assert_eq!(
            authenticator(None).authenticate(None, None),
            Err(AuthError::NoCredentials)
        );
        assert_eq!(
            authenticator(Some("dev")).authenticate(None, None),
            Ok("dev".to_owned())
        );
    }

    #[test]
    fn replaced_credentials_apply_to_later_requests_only() {
        let a = authenticator(Some("dev"));
        a.replace(
            TokenStore::new(vec![("job-b".to_owned(), tokens::token_digest(b"token-b"))]),
            None,
        );
        assert_eq!(
            a.authenticate(Some(b"Bearer s3cret-token-value"), None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(
            a.authenticate(Some(b"Bearer token-b"), None),
            Ok("job-b".to_owned())
        );
        assert_eq!(a.authenticate(None, None), Err(AuthError::NoCredentials));
    }

    #[test]
    fn principals_are_printable_ascii() {
        assert!(is_valid_principal(
            "spiffe://example.org/ns/prod/sa/billing"
        ));
        assert!(!is_valid_principal(""));
        assert!(!is_valid_principal("two words"));
        assert!(!is_valid_principal("bell\u{7}"));
        assert!(!is_valid_principal(&"x".repeat(1025)));
    }
}
