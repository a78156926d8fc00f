//! The encryption context: a caller-supplied string → string map that is bound to a
//! ciphertext as AES-GCM additional authenticated data, and its canonical byte
//! encoding.
//!
//! The canonical encoding is what goes into the AAD (after the blob header, see
//! [`crate::envelope`]) and what the audit log digests. It must be injective — two
//! different maps never encode alike — so that a ciphertext made under one context
//! can never be decrypted under another:
//!
//! ```text
//! u32 BE  entry count
//! then for each entry, sorted by key bytes (keys are unique):
//!   u32 BE  key length    ‖ key bytes (UTF-8)
//!   u32 BE  value length  ‖ value bytes (UTF-8)
//! ```
//!
//! Every field is length-prefixed and the entry count is explicit, so the bytes
//! parse back to exactly one map; the sort makes the encoding independent of the
//! order in which the caller listed the entries.
//!
//! This module holds no secrets and does no cryptography besides SHA-256 for the
//! audit digest. Context values are not secret by contract, but they may hold
//! personal data, so `Debug` prints only the keys and the audit log stores only
//! [`context_digest`].

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest as _, Sha256};

/// Default limit on the canonical encoding of a context, in bytes (the service's
/// configured limit may differ).
pub const DEFAULT_MAX_ENCODED_LEN: usize = 8 * 1024;

/// Size of the entry count and of each length prefix.
const LEN_PREFIX: usize = 4;

/// Why a caller-supplied encryption context was refused. The messages are safe to
/// return to the caller (INVALID_ARGUMENT): they name no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// A key is the empty string.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// The same key was supplied twice (only possible from a list of pairs; a map
    /// cannot hold duplicates).
    #[error("encryption context has a duplicate key")]
    DuplicateKey,
    /// The canonical encoding would exceed the configured limit.
    #[error("encryption context is too large ({encoded_len} bytes encoded, limit {limit})")]
    TooLarge {
        /// Size the canonical encoding would have (saturated at `usize::MAX`).
        encoded_len: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// A validated encryption context: unique non-empty UTF-8 keys, UTF-8 values, and a
/// canonical encoding no longer than the limit it was validated against.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionContext {
    /// Sorted by key bytes: `str`'s `Ord` is the lexicographic order of the UTF-8
    /// bytes, which is exactly the order the canonical encoding requires.
    entries: BTreeMap<String, String>,
    encoded_len: usize,
}

impl EncryptionContext {
    /// The empty context (encodes as four zero bytes).
    pub fn empty() -> Self {
        Self {
            entries: BTreeMap::new(),
            encoded_len: LEN_PREFIX,
        }
    }

    /// Validates `entries` (for example the proto's `map<string, string>`) into a
    /// context whose canonical encoding is at most `max_encoded_len` bytes.
    ///
    /// UTF-8 validity is guaranteed by the `String` type (prost rejects invalid
    /// UTF-8 in proto `string` fields while decoding the request).
    pub fn new<I, K, V>(entries: I, max_encoded_len: usize) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        let mut encoded_len = LEN_PREFIX;
        for (key, value) in entries {
            let (key, value) = (key.into(), value.into());
            if key.is_empty() {
                return Err(ContextError::EmptyKey);
            }
            // Saturating: an absurd input must hit the limit, not wrap around.
            encoded_len = encoded_len
                .saturating_add(2 * LEN_PREFIX)
                .saturating_add(key.len())
                .saturating_add(value.len());
            // Checked as we go, so a huge context is refused before it is all copied.
            if encoded_len > max_encoded_len {
                return Err(ContextError::TooLarge {
                    encoded_len,
                    limit: max_encoded_len,
                });
            }
            if map.insert(key, value).is_some() {
                return Err(ContextError::DuplicateKey);
            }
        }
        // Each length is at most encoded_len, but the u32 prefixes need them to fit
        // in 32 bits whatever limit the caller chose.
        if encoded_len > max_encoded_len || u32::try_from(encoded_len).is_err() {
            return Err(ContextError::TooLarge {
                encoded_len,
                limit: max_encoded_len,
            });
        }
        Ok(Self {
            entries: map,
            encoded_len,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the context has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// Entries in canonical (key byte) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Length of [`Self::canonical_bytes`].
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// Appends the canonical encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len);
        put_len(out, self.entries.len());
        for (key, value) in &self.entries {
            put_len(out, key.len());
            out.extend_from_slice(key.as_bytes());
            put_len(out, value.len());
            out.extend_from_slice(value.as_bytes());
        }
    }

    /// The canonical encoding (see the module documentation).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len);
        self.encode_into(&mut out);
        out
    }
}

impl Default for EncryptionContext {
    fn default() -> Self {
        Self::empty()
    }
}

/// Keys only: values may be personal data and never go to logs.
impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionContext")
            .field("keys", &self.entries.keys().collect::<Vec<_>>())
            .field("encoded_len", &self.encoded_len)
            .finish()
    }
}

/// SHA-256 of the canonical encoding: what the audit log records instead of the
/// context itself.
pub fn context_digest(ctx: &EncryptionContext) -> [u8; 32] {
    Sha256::digest(ctx.canonical_bytes()).into()
}

/// Writes a length that validation has already bounded by `u32::MAX`.
fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths are bounded by encoded_len, which `new` checked fits in a u32.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

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
    fn encoding_layout_is_count_then_sorted_length_prefixed_entries() {
        let c = ctx(&[("b", "2"), ("a", "xy")]);
        let expected: Vec<u8> = [
            &[0, 0, 0, 2][..],
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 2],
            b"xy",
            &[0, 0, 0, 1],
            b"b",
            &[0, 0, 0, 1],
            b"2",
        ]
        .concat();
        assert_eq!(c.canonical_bytes(), expected);
        assert_eq!(c.encoded_len(), expected.len());
    }

    #[test]
    fn encoding_is_independent_of_insertion_order() {
        let forward = ctx(&[("alpha", "1"), ("beta", "2"), ("gamma", "3")]);
        let backward = ctx(&[("gamma", "3"), ("beta", "2"), ("alpha", "1")]);
        let from_hash_map: HashMap<String, String> = [
            ("beta".to_owned(), "2".to_owned()),
            ("gamma".to_owned(), "3".to_owned()),
            ("alpha".to_owned(), "1".to_owned()),
        ]
        .into();
        let hashed = EncryptionContext::new(from_hash_map, DEFAULT_MAX_ENCODED_LEN)
            .expect("valid test input");
        assert_eq!(forward.canonical_bytes(), backward.canonical_bytes());
        assert_eq!(forward.canonical_bytes(), hashed.canonical_bytes());
        assert_eq!(context_digest(&forward), context_digest(&hashed));
    }

    #[test]
    fn sort_is_by_key_bytes_not_by_chars_or_case() {
        // 'Z' (0x5A) < 'a' (0x61) < 'é' (0xC3 0xA9) as UTF-8 bytes.
        let c = ctx(&[("é", "3"), ("a", "2"), ("Z", "1")]);
        let keys: Vec<&str> = c.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["Z", "a", "é"]);
        let bytes = c.canonical_bytes();
        assert_eq!(&bytes[8..9], b"Z");
    }

    #[test]
    fn different_maps_encode_differently() {
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: &[(Pairs, Pairs)] = &[
            // Moving the key/value boundary.
            (&[("a", "bc")], &[("ab", "c")]),
            // Empty map vs a map holding an empty value.
            (&[], &[("k", "")]),
            // Entry boundaries.
            (
                &[("a", "b"), ("c", "d")],
                &[("a", "b\0\0\0\x01c\0\0\0\x01d")],
            ),
            // Value swapped between keys.
            (&[("a", "1"), ("b", "2")], &[("a", "2"), ("b", "1")]),
            // A prefix of the other map.
            (&[("a", "1")], &[("a", "1"), ("b", "")]),
            // Case matters.
            (&[("K", "v")], &[("k", "v")]),
        ];
        for (left, right) in cases {
            let (l, r) = (ctx(left), ctx(right));
            assert_ne!(
                l.canonical_bytes(),
                r.canonical_bytes(),
                "{left:?} vs {right:?}"
            );
            assert_ne!(context_digest(&l), context_digest(&r));
        }
    }

    #[test]
    fn empty_key_is_refused_empty_value_is_not() {
        assert_eq!(
            EncryptionContext::new([("", "v")], DEFAULT_MAX_ENCODED_LEN),
            Err(ContextError::EmptyKey)
        );
        assert_eq!(ctx(&[("k", "")]).get("k"), Some(""));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        assert_eq!(
            EncryptionContext::new([("k", "1"), ("k", "2")], DEFAULT_MAX_ENCODED_LEN),
            Err(ContextError::DuplicateKey)
        );
    }

    #[test]
    fn size_limit_applies_to_the_whole_encoding() {
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
            hex_string(&context_digest(&EncryptionContext::empty())),
            "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119"
        );
    }

    fn hex_string(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
