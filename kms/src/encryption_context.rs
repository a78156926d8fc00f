//! The encryption context on the server side: the caller-supplied string → string
//! map bound to a ciphertext blob as AES-GCM additional authenticated data.
//!
//! The context, its validation and its canonical encoding are defined once, in
//! [`kms_client::context`] (the client binds the same encoding into its envelopes);
//! this module only adds what is the service's own: the configured size limit in
//! the constructor ([`EncryptionContext::new`]) and the digest the audit log stores
//! instead of the context ([`context_digest`]). The encoding goes into the AAD after
//! the blob header (see [`crate::ciphertext`]); `kms/tests/ciphertext_golden.rs` pins it
//! to independently generated vectors.
//!
//! This module holds no secrets and does no cryptography besides SHA-256 for the
//! audit digest. Context values are not secret by contract, but they may hold
//! personal data, so `Debug` prints only the keys and the audit log stores only
//! [`context_digest`].

use std::fmt;
use std::ops::Deref;

use sha2::{Digest as _, Sha256};

pub use kms_client::context::ContextError;

/// Default limit on the canonical encoding of a context, in bytes (the service's
/// configured limit may differ).
pub const DEFAULT_MAX_ENCODED_LEN: usize = 8 * 1024;

/// A validated encryption context: [`kms_client::EncryptionContext`] built against
/// the service's configured size limit. It dereferences to the client type for
/// everything else (`len`, `get`, `iter`, `encoded_len`, `encode_into`,
/// `canonical_bytes`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(kms_client::EncryptionContext);

impl EncryptionContext {
    /// The empty context (encodes as four zero bytes).
    pub fn empty() -> Self {
        Self(kms_client::EncryptionContext::empty())
    }

    /// Validates `entries` (for example the proto's `map<string, string>`) into a
    /// context whose canonical encoding is at most `max_encoded_len` bytes.
    ///
    /// # Errors
    /// As [`kms_client::EncryptionContext::with_limit`]: [`ContextError::EmptyKey`],
    /// [`ContextError::DuplicateKey`], or [`ContextError::TooLarge`] when the
    /// encoding would exceed `max_encoded_len`. The messages name no value.
    pub fn new<I, K, V>(entries: I, max_encoded_len: usize) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        kms_client::EncryptionContext::with_limit(entries, max_encoded_len).map(Self)
    }

    /// The shared client type this context wraps.
    pub fn as_client(&self) -> &kms_client::EncryptionContext {
        &self.0
    }
}

impl Deref for EncryptionContext {
    type Target = kms_client::EncryptionContext;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Keys only (the client type's `Debug`): values may be personal data.
impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// SHA-256 of the canonical encoding: what the audit log records instead of the
/// context itself.
pub fn context_digest(ctx: &EncryptionContext) -> [u8; 32] {
    Sha256::digest(ctx.canonical_bytes()).into()
}

// The encoding's own tests (layout, order, injectivity, limits) live with it in
// kms-client; these check what the service adds.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ctx(entries: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(entries.iter().copied(), DEFAULT_MAX_ENCODED_LEN)
            .expect("valid test input")
    }

    #[test]
    fn empty_context_is_four_zero_bytes() {
        assert_eq!(EncryptionContext::empty().canonical_bytes(), [0, 0, 0, 0]);
        assert_eq!(ctx(&[]), EncryptionContext::empty());
        assert_eq!(EncryptionContext::empty().encoded_len(), 4);
    }

    #[test]
    fn encoding_is_the_client_encoding() {
        let pairs = [("tenant", "acme"), ("app", "")];
        let client = kms_client::EncryptionContext::new(pairs).expect("valid");
        assert_eq!(ctx(&pairs).canonical_bytes(), client.canonical_bytes());
        assert_eq!(ctx(&pairs).as_client(), &client);
    }

    #[test]
    fn the_configured_limit_applies_to_the_whole_encoding() {
        // 4 (count) + 4 + 1 (key) + 4 + 3 (value) = 16 bytes.
        let entries = [("k", "vvv")];
        assert_eq!(
            EncryptionContext::new(entries, 16)
                .expect("valid test input")
                .encoded_len(),
            16
        );
        assert_eq!(
            EncryptionContext::new(entries, 15),
            Err(ContextError::TooLarge {
                encoded_len: 16,
                limit: 15
            })
        );
        let big = "x".repeat(DEFAULT_MAX_ENCODED_LEN);
        assert!(matches!(
            EncryptionContext::new([("k", big.as_str())], DEFAULT_MAX_ENCODED_LEN),
            Err(ContextError::TooLarge { .. })
        ));
        assert_eq!(
            EncryptionContext::new([("", "v")], DEFAULT_MAX_ENCODED_LEN),
            Err(ContextError::EmptyKey)
        );
        assert_eq!(
            EncryptionContext::new([("k", "1"), ("k", "2")], DEFAULT_MAX_ENCODED_LEN),
            Err(ContextError::DuplicateKey)
        );
    }

    #[test]
    fn error_messages_name_no_value() {
        let secretish = "v".repeat(100);
        let err =
            EncryptionContext::new([("k", secretish.as_str())], 10).expect_err("must be refused");
        assert!(!err.to_string().contains("vvv"));
    }

    #[test]
    fn debug_prints_keys_but_not_values() {
        let out = format!("{:?}", ctx(&[("tenant", "alice@example.com")]));
        assert!(out.contains("tenant"));
        assert!(!out.contains("alice"));
    }

    #[test]
    fn digest_is_sha256_of_the_encoding() {
        // SHA-256 of 00000000, computed independently (sha256sum).
        assert_eq!(
            hex::encode(context_digest(&EncryptionContext::empty())),
            "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        );
    }

    #[test]
    fn digest_is_independent_of_insertion_order_and_injective() {
        let forward = ctx(&[("alpha", "1"), ("beta", "2"), ("gamma", "3")]);
        let from_hash_map: HashMap<String, String> = [
            ("gamma".to_owned(), "3".to_owned()),
            ("alpha".to_owned(), "1".to_owned()),
            ("beta".to_owned(), "2".to_owned()),
        ]
        .into();
        let hashed = EncryptionContext::new(from_hash_map, DEFAULT_MAX_ENCODED_LEN)
            .expect("valid test input");
        assert_eq!(context_digest(&forward), context_digest(&hashed));
        assert_ne!(
            context_digest(&ctx(&[("a", "bc")])),
            context_digest(&ctx(&[("ab", "c")]))
        );
    }
}
