//! The encryption context on the client side: a string → string map bound to an
//! envelope (in its header) and to the wrapped data key (by the KMS), and its
//! canonical byte encoding — the same encoding the service uses for ciphertext
//! blobs (README, "Ciphertext format"), so one definition serves both:
//!
//! ```text
//! u32 BE  entry count
//! then for each entry, sorted by key bytes (keys are unique and non-empty):
//!   u32 BE  key length    ‖ key bytes (UTF-8)
//!   u32 BE  value length  ‖ value bytes (UTF-8)
//! ```
//!
//! Context values are not secret by contract but may hold personal data:
//! `Debug` prints the keys only.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Largest canonical encoding an envelope header accepts (the server's own limit,
/// 8 KiB by default, is usually the tighter one).
pub const MAX_ENCODED_LEN: usize = 64 * 1024;

/// Why a context was refused. Names no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// A key is the empty string.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// The same key was given twice.
    #[error("encryption context has a duplicate key")]
    DuplicateKey,
    /// The canonical encoding would exceed [`MAX_ENCODED_LEN`].
    #[error(
        "encryption context is too large ({encoded_len} bytes encoded, limit {MAX_ENCODED_LEN})"
    )]
    TooLarge {
        /// Size the encoding would have (saturated).
        encoded_len: usize,
    },
    /// Bytes that are not the canonical encoding of any context.
    #[error("not a canonical encryption context encoding")]
    NotCanonical,
}

/// A validated encryption context (sorted, unique non-empty keys, bounded size).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext {
    // `str`'s Ord is the byte order of UTF-8, which the encoding requires.
    entries: BTreeMap<String, String>,
}

impl EncryptionContext {
    /// The empty context (encodes as four zero bytes).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Validates `entries` into a context.
    pub fn new<I, K, V>(entries: I) -> Result<Self, ContextError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        let mut encoded_len: usize = 4;
        for (key, value) in entries {
            let (key, value) = (key.into(), value.into());
            if key.is_empty() {
                return Err(ContextError::EmptyKey);
            }
            encoded_len = encoded_len
                .saturating_add(8)
                .saturating_add(key.len())
                .saturating_add(value.len());
            if encoded_len > MAX_ENCODED_LEN {
                return Err(ContextError::TooLarge { encoded_len });
            }
            if map.insert(key, value).is_some() {
                return Err(ContextError::DuplicateKey);
            }
        }
        Ok(Self { entries: map })
    }

    /// Parses a canonical encoding; anything else (unsorted or duplicate keys,
    /// trailing bytes, bad UTF-8, a short field) is refused, so that one context
    /// has exactly one encoding.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self, ContextError> {
        if bytes.len() > MAX_ENCODED_LEN {
            return Err(ContextError::TooLarge {
                encoded_len: bytes.len(),
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
        Ok(Self { entries })
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

    /// Entries in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The canonical encoding (see the module documentation).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_len(&mut out, self.entries.len());
        for (key, value) in &self.entries {
            put_len(&mut out, key.len());
            out.extend_from_slice(key.as_bytes());
            put_len(&mut out, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// The map the proto requests carry.
    pub fn to_proto_map(&self) -> HashMap<String, String> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Keys only: values may be personal data.
impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionContext")
            .field("keys", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // `new` bounds the whole encoding by MAX_ENCODED_LEN, far below u32::MAX.
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
    use super::*;

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
        assert_eq!(
            EncryptionContext::from_canonical_bytes(&bytes).expect("parses"),
            ctx
        );
        let a = EncryptionContext::new([("a", "bc")]).expect("valid");
        let b = EncryptionContext::new([("ab", "c")]).expect("valid");
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(EncryptionContext::empty().canonical_bytes(), [0, 0, 0, 0]);
    }

    #[test]
    fn invalid_contexts_and_encodings_are_refused() {
        assert_eq!(
            EncryptionContext::new([("", "v")]),
            Err(ContextError::EmptyKey)
        );
        assert_eq!(
            EncryptionContext::new([("k", "1"), ("k", "2")]),
            Err(ContextError::DuplicateKey)
        );
        let huge = "x".repeat(MAX_ENCODED_LEN);
        assert!(matches!(
            EncryptionContext::new([("k", huge.as_str())]),
            Err(ContextError::TooLarge { .. })
        ));
        let good = EncryptionContext::new([("a", "1"), ("b", "2")])
            .expect("valid")
            .canonical_bytes();
        // Trailing byte, truncation, unsorted keys.
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(EncryptionContext::from_canonical_bytes(&trailing).is_err());
        assert!(EncryptionContext::from_canonical_bytes(&good[..good.len() - 1]).is_err());
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
        assert!(EncryptionContext::from_canonical_bytes(&unsorted).is_err());
    }

    #[test]
    fn debug_shows_keys_not_values() {
        let ctx = EncryptionContext::new([("patient", "Jane Roe")]).expect("valid");
        let out = format!("{ctx:?}");
        assert!(out.contains("patient") && !out.contains("Jane"), "{out}");
    }
}
