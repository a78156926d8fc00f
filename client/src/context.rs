//! The encryption context: a caller-supplied string → string map bound to
//! ciphertext as AES-GCM additional authenticated data, and its canonical byte
//! encoding.
//!
//! This is the one definition of that encoding. The client binds it into an
//! envelope header (and the KMS binds the same context to the wrapped data key);
//! the service (`kms::encryption_context`) uses this very type for its ciphertext
//! blobs (README, "Ciphertext format") and digests it into the audit log. Golden
//! vectors pin it: `kms/tests/golden/envelope_v1.json` (made by an independent
//! Python implementation) and `client/tests/golden/`.
//!
//! ```text
//! u32 BE  entry count
//! then for each entry, sorted by key bytes (keys are unique and non-empty):
//!   u32 BE  key length    ‖ key bytes (UTF-8)
//!   u32 BE  value length  ‖ value bytes (UTF-8)
//! ```
//!
//! The encoding is injective — every field is length-prefixed and the entry count
//! is explicit, so the bytes parse back to exactly one map — and the sort makes it
//! independent of the order in which the caller listed the entries. A ciphertext
//! made under one context can therefore never be opened under another.
//!
//! Context values are not secret by contract but may hold personal data: `Debug`
//! prints the keys only, and no error names a value.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Largest canonical encoding, in bytes, that [`EncryptionContext::new`] and an
/// envelope header accept (64 KiB). The service applies its own configured
/// limit (8 KiB by default), usually the tighter one.
pub const MAX_ENCODED_LEN: usize = 64 * 1024;

/// Size, in bytes, of the entry count and of each length prefix.
const LEN_PREFIX: usize = 4;

/// Why a context, or its encoding, was refused. The messages name no value, so
/// they are safe to return to a caller (the service answers INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// A key is the empty string.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// The same key was given twice (only possible from a list of pairs; a map
    /// cannot hold duplicates).
    #[error("encryption context has a duplicate key")]
    DuplicateKey,
    /// The canonical encoding would exceed the limit.
    #[error("encryption context is too large ({encoded_len} bytes encoded, limit {limit})")]
    TooLarge {
        /// Size, in bytes, the canonical encoding would have (saturated at
        /// `usize::MAX`).
        encoded_len: usize,
        /// The limit, in bytes, it was checked against.
        limit: usize,
    },
    /// Bytes that are not the canonical encoding of any context.
    #[error("not a canonical encryption context encoding")]
    NotCanonical,
}

/// A validated encryption context: unique non-empty UTF-8 keys, UTF-8 values, and
/// a canonical encoding no longer than the limit it was validated against.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionContext {
    /// Sorted by key bytes: `str`'s `Ord` is the lexicographic order of the UTF-8
    /// bytes, which is exactly the order the canonical encoding requires.
    entries: BTreeMap<String, String>,
    /// Length of the canonical encoding, in bytes (fits in a `u32`).
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

    /// Validates `entries` into a context whose canonical encoding is at most
    /// [`MAX_ENCODED_LEN`] bytes.
    ///
    /// # Errors
    /// [`ContextError::EmptyKey`] if a key is empty, [`ContextError::DuplicateKey`]
    /// if a key appears twice, [`ContextError::TooLarge`] if the encoding would
    /// exceed [`MAX_ENCODED_LEN`].
    pub fn new<I, K, V>(entries: I) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::with_limit(entries, MAX_ENCODED_LEN)
    }

    /// Validates `entries` (for example the proto's `map<string, string>`) into a
    /// context whose canonical encoding is at most `max_encoded_len` bytes: what
    /// the service does with its configured limit.
    ///
    /// UTF-8 validity is guaranteed by the `String` type (prost rejects invalid
    /// UTF-8 in proto `string` fields while decoding).
    ///
    /// # Errors
    /// [`ContextError::EmptyKey`] if a key is empty, [`ContextError::DuplicateKey`]
    /// if a key appears twice, [`ContextError::TooLarge`] if the encoding would
    /// exceed `max_encoded_len` or `u32::MAX` bytes. Checked entry by entry, so a
    /// huge context is refused before it is all copied.
    pub fn with_limit<I, K, V>(entries: I, max_encoded_len: usize) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let too_large = |encoded_len| ContextError::TooLarge {
            encoded_len,
            limit: max_encoded_len,
        };
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
            if encoded_len > max_encoded_len {
                return Err(too_large(encoded_len));
            }
            if map.insert(key, value).is_some() {
                return Err(ContextError::DuplicateKey);
            }
        }
        // Each length is at most encoded_len, but the u32 prefixes need them to fit
        // in 32 bits whatever limit the caller chose.
        if encoded_len > max_encoded_len || u32::try_from(encoded_len).is_err() {
            return Err(too_large(encoded_len));
        }
        Ok(Self {
            entries: map,
            encoded_len,
        })
    }

    /// Parses a canonical encoding of at most [`MAX_ENCODED_LEN`] bytes.
    ///
    /// # Errors
    /// [`ContextError::TooLarge`] if `bytes` is longer than [`MAX_ENCODED_LEN`];
    /// [`ContextError::NotCanonical`] for anything that is not exactly the
    /// canonical encoding of one context (unsorted, duplicate or empty keys,
    /// trailing bytes, bad UTF-8, a short field), so that one context has
    /// exactly one encoding.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self, ContextError> {
        if bytes.len() > MAX_ENCODED_LEN {
            return Err(ContextError::TooLarge {
                encoded_len: bytes.len(),
                limit: MAX_ENCODED_LEN,
            });
        }
        let mut rest = bytes;
        let count = take_u32(&mut rest)?;
        let mut entries = BTreeMap::new();
        let mut previous: Option<String> = None;
        for _ in 0..count {
            let key = take_str(&mut rest)?;
            let value = take_str(&mut rest)?;
            if key.is_empty() || previous.as_deref().is_some_and(|p| p >= key.as_str()) {
                return Err(ContextError::NotCanonical);
            }
            previous = Some(key.clone());
            entries.insert(key, value);
        }
        if !rest.is_empty() {
            return Err(ContextError::NotCanonical);
        }
        Ok(Self {
            entries,
            encoded_len: bytes.len(),
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

    /// Length, in bytes, of [`Self::canonical_bytes`].
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// Appends the canonical encoding (see the module documentation) to `out`.
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

    /// The map the proto requests carry (`map<string, string>`).
    pub fn to_proto_map(&self) -> HashMap<String, String> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
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

/// Writes a length that validation has already bounded by `u32::MAX`.
fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths are bounded by encoded_len, which `with_limit` checked fits in a u32.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, ContextError> {
    let (head, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(ContextError::NotCanonical)?;
    *rest = tail;
    Ok(u32::from_be_bytes(*head))
}

fn take_str(rest: &mut &[u8]) -> Result<String, ContextError> {
    let len = usize::try_from(take_u32(rest)?).map_err(|_| ContextError::NotCanonical)?;
    if len > rest.len() {
        return Err(ContextError::NotCanonical);
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    String::from_utf8(head.to_vec()).map_err(|_| ContextError::NotCanonical)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// The service's default limit, used by the tests that came from its side.
    const SERVER_LIMIT: usize = 8 * 1024;

    fn ctx(entries: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(entries.iter().copied()).expect("valid test input")
    }

    #[test]
    fn empty_context_is_four_zero_bytes() {
        assert_eq!(EncryptionContext::empty().canonical_bytes(), [0, 0, 0, 0]);
        assert_eq!(ctx(&[]), EncryptionContext::empty());
        assert_eq!(EncryptionContext::default(), EncryptionContext::empty());
        assert_eq!(EncryptionContext::empty().encoded_len(), 4);
        assert_eq!(
            EncryptionContext::from_canonical_bytes(&[0, 0, 0, 0]),
            Ok(EncryptionContext::empty())
        );
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
        let mut appended = vec![0xff];
        c.encode_into(&mut appended);
        assert_eq!(appended[0], 0xff);
        assert_eq!(&appended[1..], expected.as_slice());
    }

    #[test]
    fn encoding_is_sorted_length_prefixed_and_injective() {
        let ctx = EncryptionContext::new([("tenant", "acme"), ("app", "")]).expect("valid");
        let bytes = ctx.canonical_bytes();
        let expected: Vec<u8> = [
            &[0, 0, 0, 2][..],
            &[0, 0, 0, 3],
            b"app",
            &[0, 0, 0, 0],
            &[0, 0, 0, 6],
            b"tenant",
            &[0, 0, 0, 4],
            b"acme",
        ]
        .concat();
        assert_eq!(bytes, expected);
        let parsed = EncryptionContext::from_canonical_bytes(&bytes).expect("parses");
        assert_eq!(parsed, ctx);
        assert_eq!(parsed.encoded_len(), bytes.len());
        let a = EncryptionContext::new([("a", "bc")]).expect("valid");
        let b = EncryptionContext::new([("ab", "c")]).expect("valid");
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
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
        let hashed =
            EncryptionContext::with_limit(from_hash_map, SERVER_LIMIT).expect("valid test input");
        assert_eq!(forward.canonical_bytes(), backward.canonical_bytes());
        assert_eq!(forward.canonical_bytes(), hashed.canonical_bytes());
        assert_eq!(hashed.to_proto_map(), forward.to_proto_map());
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
        }
    }

    #[test]
    fn empty_key_is_refused_empty_value_is_not() {
        assert_eq!(
            EncryptionContext::new([("", "v")]),
            Err(ContextError::EmptyKey)
        );
        assert_eq!(
            EncryptionContext::with_limit([("", "v")], SERVER_LIMIT),
            Err(ContextError::EmptyKey)
        );
        assert_eq!(ctx(&[("k", "")]).get("k"), Some(""));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        assert_eq!(
            EncryptionContext::new([("k", "1"), ("k", "2")]),
            Err(ContextError::DuplicateKey)
        );
        assert_eq!(
            EncryptionContext::with_limit([("k", "1"), ("k", "2")], SERVER_LIMIT),
            Err(ContextError::DuplicateKey)
        );
    }

    #[test]
    fn size_limit_applies_to_the_whole_encoding() {
        // 4 (count) + 4 + 1 (key) + 4 + 3 (value) = 16 bytes.
        let entries = [("k", "vvv")];
        assert_eq!(
            EncryptionContext::with_limit(entries, 16)
                .expect("valid test input")
                .encoded_len(),
            16
        );
        assert_eq!(
            EncryptionContext::with_limit(entries, 15),
            Err(ContextError::TooLarge {
                encoded_len: 16,
                limit: 15
            })
        );
        let big = "x".repeat(SERVER_LIMIT);
        assert!(matches!(
            EncryptionContext::with_limit([("k", big.as_str())], SERVER_LIMIT),
            Err(ContextError::TooLarge { .. })
        ));
        // The client's own limit is MAX_ENCODED_LEN, for building and parsing.
        let huge = "x".repeat(MAX_ENCODED_LEN);
        assert!(matches!(
            EncryptionContext::new([("k", huge.as_str())]),
            Err(ContextError::TooLarge {
                limit: MAX_ENCODED_LEN,
                ..
            })
        ));
        assert!(matches!(
            EncryptionContext::from_canonical_bytes(&vec![0; MAX_ENCODED_LEN + 1]),
            Err(ContextError::TooLarge { .. })
        ));
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        let good = EncryptionContext::new([("a", "1"), ("b", "2")])
            .expect("valid")
            .canonical_bytes();
        // Trailing byte, truncation, unsorted keys.
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            EncryptionContext::from_canonical_bytes(&trailing),
            Err(ContextError::NotCanonical)
        );
        assert_eq!(
            EncryptionContext::from_canonical_bytes(&good[..good.len() - 1]),
            Err(ContextError::NotCanonical)
        );
        let unsorted: Vec<u8> = [
            &[0, 0, 0, 2][..],
            &[0, 0, 0, 1],
            b"b",
            &[0, 0, 0, 1],
            b"2",
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 1],
            b"1",
        ]
        .concat();
        assert_eq!(
            EncryptionContext::from_canonical_bytes(&unsorted),
            Err(ContextError::NotCanonical)
        );
        // Duplicate key, empty key, invalid UTF-8.
        let one = |key: &[u8]| -> Vec<u8> {
            [
                &[0, 0, 0, 1][..],
                &[0, 0, 0, key.len() as u8],
                key,
                &[0, 0, 0, 0],
            ]
            .concat()
        };
        let duplicate: Vec<u8> = [
            &[0, 0, 0, 2][..],
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 0],
            &[0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 0],
        ]
        .concat();
        for bad in [duplicate, one(b""), one(&[0xff])] {
            assert_eq!(
                EncryptionContext::from_canonical_bytes(&bad),
                Err(ContextError::NotCanonical)
            );
        }
    }

    #[test]
    fn error_messages_name_no_value() {
        let secretish = "v".repeat(100);
        let err = EncryptionContext::with_limit([("k", secretish.as_str())], 10)
            .expect_err("must be refused");
        assert!(!err.to_string().contains("vvv"));
        assert_eq!(
            err.to_string(),
            "encryption context is too large (113 bytes encoded, limit 10)"
        );
    }

    #[test]
    fn debug_prints_keys_but_not_values() {
        let out = format!("{:?}", ctx(&[("tenant", "alice@example.com")]));
        assert!(out.contains("tenant"));
        assert!(!out.contains("alice"));
        let out = format!("{:?}", ctx(&[("patient", "Jane Roe")]));
        assert!(out.contains("patient") && !out.contains("Jane"), "{out}");
    }
}
