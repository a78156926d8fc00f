//! Bearer tokens for callers without client certificates.
//!
//! Configuration holds only the SHA-256 digest of each token, so a leaked
//! configuration file does not leak credentials. Tokens are high-entropy
//! random strings (see [`generate_token`]), so a plain digest is enough: there
//! is nothing to brute-force. Lookups compare the presented token's digest
//! with every configured digest in constant time and never stop early, so
//! timing reveals neither which token matched nor how much of it.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Configured tokens: (principal, SHA-256 of the token).
pub struct TokenStore {
    entries: Vec<(String, [u8; 32])>,
}

impl TokenStore {
    pub fn new(entries: Vec<(String, [u8; 32])>) -> Self {
        TokenStore { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal whose token this is, if any.
    pub fn principal_of(&self, presented: &[u8]) -> Option<&str> {
        let digest = token_digest(presented);
        let mut found = None;
        for (principal, expected) in &self.entries {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(principal.as_str());
            }
        }
        found
    }
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not secrets, but there is no reason to print them either.
        f.debug_struct("TokenStore")
            .field(
                "principals",
                &self.entries.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

pub fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// A new random token: "kms_" + 43 base64url characters (256 bits).
pub fn generate_token() -> Result<Zeroizing<String>, ring::error::Unspecified> {
    use base64::Engine as _;
    use ring::rand::SecureRandom;
    let mut bytes = Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new().fill(bytes.as_mut())?;
    let mut token = Zeroizing::new(String::from("kms_"));
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes.as_ref(), &mut token);
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matching_principal_is_found_among_many() {
        let store = TokenStore::new(vec![
            ("a".into(), token_digest(b"token-a")),
            ("b".into(), token_digest(b"token-b")),
        ]);
        assert_eq!(store.principal_of(b"token-b"), Some("b"));
        assert_eq!(store.principal_of(b"token-a"), Some("a"));
        assert_eq!(store.principal_of(b"token-c"), None);
        assert_eq!(store.principal_of(b""), None);
        assert!(!format!("{store:?}").contains(&hex::encode(token_digest(b"token-a"))));
    }

    #[test]
    fn generated_tokens_are_distinct_and_long() {
        let a = generate_token().expect("random");
        let b = generate_token().expect("random");
        assert_ne!(*a, *b);
        assert_eq!(a.len(), 4 + 43);
        assert!(a.starts_with("kms_"));
    }
}
