//! Envelope format version 1: the header layout, its parsing, and the key and
//! nonce derivations. The README ("Client library and envelope format") is the
//! normative description; this file must match it byte for byte (the golden
//! vectors check that).
//!
//! ```text
//! offset    size  field
//! 0         4     magic "KMSE" (4B 4D 53 45)
//! 4         1     format version 0x01
//! 5         1     suite 0x01: HKDF-SHA256 → AES-256-GCM, STREAM nonces, 16-byte tags
//! 6         4     chunk size S, u32 BE, 1 ..= 16 MiB (plaintext bytes per full chunk)
//! 10        32    message id, random per message
//! 42        2     W, u16 BE, 1 ..= 4096: length of the wrapped data key
//! 44        W     wrapped data key (GenerateDataKey's ciphertext_blob)
//! 44+W      4     C, u32 BE, 4 ..= 65536: length of the encryption context
//! 48+W      C     canonical encoding of the encryption context
//! ```
//!
//! Never: derive a message key without the full header, or reuse a message id.

use aes_gcm::aead::{OsRng, rand_core::RngCore as _};
use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::context::{EncryptionContext, MAX_ENCODED_LEN};
use crate::data_key::DataKey;

/// The first four bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"KMSE";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// HKDF-SHA256 → AES-256-GCM with STREAM nonces and 16-byte tags.
pub const SUITE: u8 = 1;
/// Bytes before the wrapped data key (magic to wrapped-key length).
pub const FIXED_PREFIX_LEN: usize = 44;
/// Length of the random message id, in bytes.
pub const MESSAGE_ID_LEN: usize = 32;
/// Smallest and largest chunk sizes, in plaintext bytes. The upper bound caps
/// what a decryptor allocates for a chunk before anything is authenticated.
pub const MIN_CHUNK_SIZE: u32 = 1;
/// Largest chunk size (16 MiB); see [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// The chunk size used unless the caller picks another one (64 KiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
/// Largest wrapped data key accepted, in bytes (a service blob for a 32-byte
/// key is ~104 bytes).
pub const MAX_WRAPPED_KEY_LEN: usize = 4096;
/// AES-GCM tag length, in bytes.
pub const TAG_LEN: usize = 16;
/// Chunks per message: indexes 0 ..= 2^32 − 1 (the final chunk included).
pub const MAX_CHUNKS: u64 = 1 << 32;
/// HKDF info label; the full header follows it.
pub const KEY_LABEL: &[u8] = b"kms-envelope-v1 message key";

/// A parsed (or freshly built) envelope header and its exact bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    chunk_size: u32,
    message_id: [u8; MESSAGE_ID_LEN],
    wrapped_data_key: Vec<u8>,
    context: EncryptionContext,
    bytes: Vec<u8>,
}

/// Why a header could not be built (caller errors; reading errors are generic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The chunk size is outside 1 ..= 16 MiB.
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    /// The wrapped data key is empty or longer than [`MAX_WRAPPED_KEY_LEN`].
    #[error("wrapped data key is {0} bytes, expected 1..={MAX_WRAPPED_KEY_LEN}")]
    WrappedKeyLength(usize),
}

impl Header {
    /// A header for a new message with a random message id. `chunk_size` is in
    /// plaintext bytes per full chunk.
    ///
    /// # Errors
    /// [`HeaderError::ChunkSize`] if `chunk_size` is outside 1 ..= 16 MiB;
    /// [`HeaderError::WrappedKeyLength`] if `wrapped_data_key` is empty or longer
    /// than [`MAX_WRAPPED_KEY_LEN`] bytes.
    pub fn new(
        chunk_size: u32,
        wrapped_data_key: Vec<u8>,
        context: EncryptionContext,
    ) -> Result<Self, HeaderError> {
        let mut message_id = [0u8; MESSAGE_ID_LEN];
        OsRng.fill_bytes(&mut message_id);
        Self::with_message_id(chunk_size, message_id, wrapped_data_key, context)
    }

    /// A header with a chosen message id: golden vectors only. Reusing a message
    /// id with the same data key repeats (key, nonce) pairs.
    pub(crate) fn with_message_id(
        chunk_size: u32,
        message_id: [u8; MESSAGE_ID_LEN],
        wrapped_data_key: Vec<u8>,
        context: EncryptionContext,
    ) -> Result<Self, HeaderError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(HeaderError::ChunkSize(chunk_size));
        }
        let wrapped_len = u16::try_from(wrapped_data_key.len())
            .ok()
            .filter(|len| (1..=MAX_WRAPPED_KEY_LEN).contains(&usize::from(*len)))
            .ok_or(HeaderError::WrappedKeyLength(wrapped_data_key.len()))?;
        let encoded_context = context.canonical_bytes();
        // EncryptionContext bounds its encoding by MAX_ENCODED_LEN (64 KiB).
        let context_len = u32::try_from(encoded_context.len()).unwrap_or(u32::MAX);
        let mut bytes = Vec::with_capacity(FIXED_PREFIX_LEN + 4 + wrapped_data_key.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.push(VERSION);
        bytes.push(SUITE);
        bytes.extend_from_slice(&chunk_size.to_be_bytes());
        bytes.extend_from_slice(&message_id);
        bytes.extend_from_slice(&wrapped_len.to_be_bytes());
        bytes.extend_from_slice(&wrapped_data_key);
        bytes.extend_from_slice(&context_len.to_be_bytes());
        bytes.extend_from_slice(&encoded_context);
        Ok(Header {
            chunk_size,
            message_id,
            wrapped_data_key,
            context,
            bytes,
        })
    }

    /// Plaintext bytes per full chunk.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The random message id.
    pub fn message_id(&self) -> &[u8; MESSAGE_ID_LEN] {
        &self.message_id
    }

    /// The wrapped data key (a kms ciphertext blob; decrypt it with the context).
    pub fn wrapped_data_key(&self) -> &[u8] {
        &self.wrapped_data_key
    }

    /// The encryption context stored in the header.
    pub fn context(&self) -> &EncryptionContext {
        &self.context
    }

    /// The exact header bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The per-message AES-256 key: HKDF-SHA256(IKM = data key, salt = message
    /// id, info = label ‖ header). A cached data key reused across messages thus
    /// gives every message its own key, and any header change changes the key.
    pub(crate) fn message_key(&self, data_key: &DataKey) -> Zeroizing<[u8; 32]> {
        let hkdf = Hkdf::<Sha256>::new(Some(&self.message_id), data_key.expose_secret());
        let mut okm = Zeroizing::new([0u8; 32]);
        let mut info = Vec::with_capacity(KEY_LABEL.len() + self.bytes.len());
        info.extend_from_slice(KEY_LABEL);
        info.extend_from_slice(&self.bytes);
        // 32 bytes is far below HKDF-SHA256's 255 × 32 output limit.
        if hkdf.expand(&info, okm.as_mut_slice()).is_err() {
            unreachable!("HKDF-SHA256 can always expand 32 bytes");
        }
        okm
    }

    /// The AAD of every chunk: SHA-256 of the header (32 bytes, so per-chunk
    /// GHASH cost does not grow with the context).
    pub(crate) fn chunk_aad(&self) -> [u8; 32] {
        Sha256::digest(&self.bytes).into()
    }
}

/// The fixed 44-byte prefix, parsed: (chunk size, message id, W).
pub(crate) fn parse_prefix(prefix: &[u8; FIXED_PREFIX_LEN]) -> Option<(u32, [u8; 32], usize)> {
    if prefix[0..4] != MAGIC || prefix[4] != VERSION || prefix[5] != SUITE {
        return None;
    }
    let chunk_size = u32::from_be_bytes(prefix[6..10].try_into().ok()?);
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return None;
    }
    let message_id: [u8; 32] = prefix[10..42].try_into().ok()?;
    let wrapped_len = usize::from(u16::from_be_bytes(prefix[42..44].try_into().ok()?));
    if !(1..=MAX_WRAPPED_KEY_LEN).contains(&wrapped_len) {
        return None;
    }
    Some((chunk_size, message_id, wrapped_len))
}

/// The context length field, checked: 4 ..= 64 KiB.
pub(crate) fn parse_context_len(field: [u8; 4]) -> Option<usize> {
    let len = usize::try_from(u32::from_be_bytes(field)).ok()?;
    (4..=MAX_ENCODED_LEN).contains(&len).then_some(len)
}

/// Rebuilds a header from its parsed parts; `None` unless the parts re-encode
/// to exactly the bytes read (a non-canonical context is refused).
pub(crate) fn assemble(
    chunk_size: u32,
    message_id: [u8; 32],
    wrapped_data_key: Vec<u8>,
    encoded_context: &[u8],
) -> Option<Header> {
    let context = EncryptionContext::from_canonical_bytes(encoded_context).ok()?;
    Header::with_message_id(chunk_size, message_id, wrapped_data_key, context).ok()
}

/// The STREAM nonce of chunk `index`: the index as an 11-byte big-endian
/// integer, then 0x01 for the final chunk or 0x00 for any other.
pub(crate) fn chunk_nonce(index: u64, last: bool) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[3..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    nonce
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("chunk_size", &self.chunk_size)
            .field("wrapped_data_key_len", &self.wrapped_data_key.len())
            .field("context", &self.context)
            .field("len", &self.bytes.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let ctx = EncryptionContext::new([("tenant", "acme")]).expect("ctx");
        Header::with_message_id(4096, [7; 32], vec![9; 100], ctx).expect("header")
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        let h = header();
        let b = h.as_bytes();
        assert_eq!(&b[0..6], b"KMSE\x01\x01");
        assert_eq!(&b[6..10], &4096u32.to_be_bytes());
        assert_eq!(&b[10..42], &[7; 32]);
        assert_eq!(&b[42..44], &100u16.to_be_bytes());
        assert_eq!(&b[44..144], &[9; 100][..]);
        let ctx_len = u32::from_be_bytes(b[144..148].try_into().expect("4"));
        assert_eq!(usize::try_from(ctx_len).expect("fits"), b.len() - 148);
        let prefix: [u8; FIXED_PREFIX_LEN] = b[..44].try_into().expect("44");
        assert_eq!(parse_prefix(&prefix), Some((4096, [7; 32], 100)));
        let again = assemble(4096, [7; 32], vec![9; 100], &b[148..]).expect("assembles");
        assert_eq!(again, h);
    }

    #[test]
    fn bad_fields_are_refused() {
        let ctx = EncryptionContext::empty;
        assert_eq!(
            Header::new(0, vec![1], ctx()),
            Err(HeaderError::ChunkSize(0))
        );
        assert!(Header::new(MAX_CHUNK_SIZE + 1, vec![1], ctx()).is_err());
        assert!(Header::new(MAX_CHUNK_SIZE, vec![1], ctx()).is_ok());
        assert_eq!(
            Header::new(16, vec![], ctx()),
            Err(HeaderError::WrappedKeyLength(0))
        );
        assert!(Header::new(16, vec![0; MAX_WRAPPED_KEY_LEN + 1], ctx()).is_err());
        let good: [u8; FIXED_PREFIX_LEN] = header().as_bytes()[..44].try_into().expect("44");
        for (offset, value) in [(0, b'X'), (4, 2), (5, 2), (6, 0xFF), (42, 0x20)] {
            let mut bad = good;
            bad[offset] = value;
            assert_eq!(parse_prefix(&bad), None, "offset {offset}");
        }
        let mut zero_chunk = good;
        zero_chunk[6..10].copy_from_slice(&[0; 4]);
        assert_eq!(parse_prefix(&zero_chunk), None);
        assert_eq!(parse_context_len([0, 0, 0, 3]), None);
        assert_eq!(parse_context_len([0, 1, 0, 1]), None);
        assert_eq!(parse_context_len([0, 1, 0, 0]), Some(65536));
    }

    #[test]
    fn nonces_encode_index_and_final_flag() {
        assert_eq!(chunk_nonce(0, false), [0; 12]);
        assert_eq!(chunk_nonce(1, true)[10..], [1, 1]);
        assert_eq!(
            chunk_nonce(MAX_CHUNKS - 1, true),
            [0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 1]
        );
    }

    #[test]
    fn the_message_key_depends_on_every_header_byte_and_the_message_id() {
        let key = DataKey::from_bytes([1; 32]);
        let h = header();
        let ctx = EncryptionContext::new([("tenant", "acme")]).expect("ctx");
        let other_id =
            Header::with_message_id(4096, [8; 32], vec![9; 100], ctx.clone()).expect("header");
        let other_chunk =
            Header::with_message_id(4097, [7; 32], vec![9; 100], ctx).expect("header");
        assert_ne!(*h.message_key(&key), *other_id.message_key(&key));
        assert_ne!(*h.message_key(&key), *other_chunk.message_key(&key));
        assert_eq!(*h.message_key(&key), *header().message_key(&key));
        assert_ne!(h.chunk_aad(), other_chunk.chunk_aad());
    }
}
