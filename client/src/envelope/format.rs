//! Envelope formats versions 1 and 2: the header layout (the same, byte for
//! byte, in both), its parsing, and the key and nonce derivations. The README
//! ("Envelope format, version 1" and "version 2") is the normative
//! description; this file must match it byte for byte (the golden vectors
//! under client/tests/golden/ and golden/v2/ check that).
//!
//! ```text
//! offset    size  field
//! 0         4     magic "KMSE" (4B 4D 53 45)
//! 4         1     format version 0x01 or 0x02
//! 5         1     suite 0x01: HKDF-SHA256 → AES-256-GCM, STREAM nonces, 16-byte tags
//! 6         4     chunk size S, u32 BE, 1 ..= 16 MiB (plaintext bytes per full chunk)
//! 10        32    message id, random per message
//! 42        2     W, u16 BE, 1 ..= 4096: length of the wrapped data key
//! 44        W     wrapped data key (GenerateDataKey's ciphertext_blob)
//! 44+W      4     C, u32 BE, 4 ..= 65536: length of the encryption context
//! 48+W      C     canonical encoding of the encryption context
//! ```
//!
//! # What the message key and the chunk AAD cover
//! - Version 1: the *full header*, wrapped data key included. Replacing the
//!   wrapped key (a rewrap after rotation) changes the message key, so the
//!   body would have to be encrypted again.
//! - Version 2: the *bound header* = the header without the W field and the
//!   wrapped data key (magic ‖ version ‖ suite ‖ S ‖ message id ‖ C ‖
//!   context), and the label "kms-envelope-v2 message key". The wrapped key
//!   can then be replaced and the body kept byte for byte
//!   (`kms envelope rewrap`).
//!
//! Why leaving the wrapped key out of the derivation is safe: the wrapped key
//! is a kms ciphertext blob, authenticated by kms itself (AES-GCM under the
//! key version's KEK, with the encryption context — the same context the
//! bound header carries — in its AAD), and only kms can unwrap it. A
//! substituted wrapped key that kms refuses is an invalid envelope; one that
//! unwraps to another data key gives another message key, so chunk 0 fails
//! its tag; one that unwraps to the *same* data key can only have been made by
//! someone allowed to re-encrypt that data key under kms (ReEncrypt with the
//! same context), and is exactly a rewrap. Every other header byte (version,
//! suite, chunk size, message id, context) still changes the message key and
//! the AAD. Consequence: with a data key held locally
//! ([`super::decrypt_with_data_key`]) nothing checks a version 2 header's
//! wrapped key; through kms (`Envelope::decrypt`) the Decrypt RPC does.
//!
//! Never: derive a message key without the bound header, or reuse a message
//! id.

use aes_gcm::aead::{OsRng, rand_core::RngCore as _};
use hkdf::Hkdf;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::context::{EncryptionContext, MAX_ENCODED_LEN};
use crate::data_key::DataKey;

/// The first four bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"KMSE";
/// Format version 1: message key and chunk AAD over the full header.
pub const VERSION_1: u8 = 1;
/// Format version 2: message key and chunk AAD over the bound header (the
/// header without W and the wrapped data key), so the wrapped key can change.
pub const VERSION_2: u8 = 2;
/// The format version this code writes (both versions are read).
pub const VERSION: u8 = VERSION_2;
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
/// HKDF info label of version 1 (27 ASCII bytes); the full header follows it.
pub const KEY_LABEL_V1: &[u8] = b"kms-envelope-v1 message key";
/// HKDF info label of version 2 (27 ASCII bytes); the bound header follows it.
pub const KEY_LABEL_V2: &[u8] = b"kms-envelope-v2 message key";

/// An envelope format version (the byte at offset 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum FormatVersion {
    /// Version 1: the wrapped data key is bound into the message key, so it
    /// cannot be replaced without encrypting the body again. Written only for
    /// readers that predate version 2 (kms-client before `kms envelope
    /// rewrap`).
    V1,
    /// Version 2 (the default): the wrapped data key can be replaced (rewrap)
    /// and the body kept.
    #[default]
    V2,
}

impl FormatVersion {
    /// The version byte (1 or 2).
    pub fn byte(self) -> u8 {
        match self {
            FormatVersion::V1 => VERSION_1,
            FormatVersion::V2 => VERSION_2,
        }
    }

    /// The version of a version byte, if it is one this code reads.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            VERSION_1 => Some(FormatVersion::V1),
            VERSION_2 => Some(FormatVersion::V2),
            _ => None,
        }
    }
}

/// A parsed (or freshly built) envelope header and its exact bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    version: FormatVersion,
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
    /// A version 2 header for a new message with a random message id.
    /// `chunk_size` is in plaintext bytes per full chunk.
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
        Self::new_with_version(FormatVersion::V2, chunk_size, wrapped_data_key, context)
    }

    /// A header of format `version` for a new message with a random message id.
    ///
    /// # Errors
    /// As [`Header::new`].
    pub fn new_with_version(
        version: FormatVersion,
        chunk_size: u32,
        wrapped_data_key: Vec<u8>,
        context: EncryptionContext,
    ) -> Result<Self, HeaderError> {
        let mut message_id = [0u8; MESSAGE_ID_LEN];
        OsRng.fill_bytes(&mut message_id);
        Self::with_message_id(version, chunk_size, message_id, wrapped_data_key, context)
    }

    /// This header with another wrapped data key and every other field (the
    /// version and the message id included) unchanged: a rewrap. For a
    /// version 2 header the message key and the chunk AAD are unchanged, so
    /// the body stays valid; for version 1 they change (callers must refuse).
    ///
    /// # Errors
    /// [`HeaderError::WrappedKeyLength`] as in [`Header::new`].
    pub(crate) fn with_wrapped_data_key(
        &self,
        wrapped_data_key: Vec<u8>,
    ) -> Result<Self, HeaderError> {
        Self::with_message_id(
            self.version,
            self.chunk_size,
            self.message_id,
            wrapped_data_key,
            self.context.clone(),
        )
    }

    /// A header with a chosen message id: golden vectors and rewraps only.
    /// Reusing a message id with the same data key for another body repeats
    /// (key, nonce) pairs.
    pub(crate) fn with_message_id(
        version: FormatVersion,
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
        bytes.push(version.byte());
        bytes.push(SUITE);
        bytes.extend_from_slice(&chunk_size.to_be_bytes());
        bytes.extend_from_slice(&message_id);
        bytes.extend_from_slice(&wrapped_len.to_be_bytes());
        bytes.extend_from_slice(&wrapped_data_key);
        bytes.extend_from_slice(&context_len.to_be_bytes());
        bytes.extend_from_slice(&encoded_context);
        Ok(Header {
            version,
            chunk_size,
            message_id,
            wrapped_data_key,
            context,
            bytes,
        })
    }

    /// The format version.
    pub fn version(&self) -> FormatVersion {
        self.version
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

    /// The bytes the message key and the chunk AAD cover: version 1, the full
    /// header; version 2, the bound header (magic ‖ version ‖ suite ‖ S ‖
    /// message id ‖ C ‖ context: the header without bytes 42 .. 44+W).
    pub fn authenticated_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.version {
            FormatVersion::V1 => std::borrow::Cow::Borrowed(&self.bytes),
            FormatVersion::V2 => {
                let wrapped_end = FIXED_PREFIX_LEN + self.wrapped_data_key.len();
                let mut bound =
                    Vec::with_capacity(self.bytes.len() - 2 - self.wrapped_data_key.len());
                bound.extend_from_slice(&self.bytes[..FIXED_PREFIX_LEN - 2]);
                bound.extend_from_slice(&self.bytes[wrapped_end..]);
                std::borrow::Cow::Owned(bound)
            }
        }
    }

    /// The per-message AES-256 key: HKDF-SHA256(IKM = data key, salt = message
    /// id, info = label ‖ authenticated bytes), label "kms-envelope-v1 message
    /// key" over the full header (v1) or "kms-envelope-v2 message key" over the
    /// bound header (v2). A cached data key reused across messages thus gives
    /// every message its own key, and any change to an authenticated byte
    /// changes the key.
    pub(crate) fn message_key(&self, data_key: &DataKey) -> Zeroizing<[u8; 32]> {
        let hkdf = Hkdf::<Sha256>::new(Some(&self.message_id), data_key.expose_secret());
        let mut okm = Zeroizing::new([0u8; 32]);
        let label = match self.version {
            FormatVersion::V1 => KEY_LABEL_V1,
            FormatVersion::V2 => KEY_LABEL_V2,
        };
        let covered = self.authenticated_bytes();
        let mut info = Vec::with_capacity(label.len() + covered.len());
        info.extend_from_slice(label);
        info.extend_from_slice(&covered);
        // 32 bytes is far below HKDF-SHA256's 255 × 32 output limit.
        if hkdf.expand(&info, okm.as_mut_slice()).is_err() {
            unreachable!("HKDF-SHA256 can always expand 32 bytes");
        }
        okm
    }

    /// The AAD of every chunk: SHA-256 of the authenticated bytes (32 bytes, so
    /// per-chunk GHASH cost does not grow with the context).
    pub(crate) fn chunk_aad(&self) -> [u8; 32] {
        Sha256::digest(self.authenticated_bytes()).into()
    }
}

/// The fixed 44-byte prefix of a version 1 or 2 header, parsed: (version,
/// chunk size, message id, W).
pub(crate) fn parse_prefix(
    prefix: &[u8; FIXED_PREFIX_LEN],
) -> Option<(FormatVersion, u32, [u8; 32], usize)> {
    if prefix[0..4] != MAGIC || prefix[5] != SUITE {
        return None;
    }
    let version = FormatVersion::from_byte(prefix[4])?;
    let chunk_size = u32::from_be_bytes(prefix[6..10].try_into().ok()?);
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return None;
    }
    let message_id: [u8; 32] = prefix[10..42].try_into().ok()?;
    let wrapped_len = usize::from(u16::from_be_bytes(prefix[42..44].try_into().ok()?));
    if !(1..=MAX_WRAPPED_KEY_LEN).contains(&wrapped_len) {
        return None;
    }
    Some((version, chunk_size, message_id, wrapped_len))
}

/// The context length field, checked: 4 ..= 64 KiB.
pub(crate) fn parse_context_len(field: [u8; 4]) -> Option<usize> {
    let len = usize::try_from(u32::from_be_bytes(field)).ok()?;
    (4..=MAX_ENCODED_LEN).contains(&len).then_some(len)
}

/// Rebuilds a header from its parsed parts; `None` unless the parts re-encode
/// to exactly the bytes read (a non-canonical context is refused).
pub(crate) fn assemble(
    version: FormatVersion,
    chunk_size: u32,
    message_id: [u8; 32],
    wrapped_data_key: Vec<u8>,
    encoded_context: &[u8],
) -> Option<Header> {
    let context = EncryptionContext::from_canonical_bytes(encoded_context).ok()?;
    Header::with_message_id(version, chunk_size, message_id, wrapped_data_key, context).ok()
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
            .field("version", &self.version)
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

    fn header_of(version: FormatVersion) -> Header {
        let ctx = EncryptionContext::new([("tenant", "acme")]).expect("ctx");
        Header::with_message_id(version, 4096, [7; 32], vec![9; 100], ctx).expect("header")
    }

    fn header() -> Header {
        header_of(FormatVersion::V1)
    }

    #[test]
    fn layout_matches_the_documented_offsets_in_both_versions() {
        for (version, byte) in [(FormatVersion::V1, 1u8), (FormatVersion::V2, 2)] {
            let h = header_of(version);
            let b = h.as_bytes();
            assert_eq!(&b[0..6], &[b'K', b'M', b'S', b'E', byte, 1]);
            assert_eq!(&b[6..10], &4096u32.to_be_bytes());
            assert_eq!(&b[10..42], &[7; 32]);
            assert_eq!(&b[42..44], &100u16.to_be_bytes());
            assert_eq!(&b[44..144], &[9; 100][..]);
            let ctx_len = u32::from_be_bytes(b[144..148].try_into().expect("4"));
            assert_eq!(usize::try_from(ctx_len).expect("fits"), b.len() - 148);
            let prefix: [u8; FIXED_PREFIX_LEN] = b[..44].try_into().expect("44");
            assert_eq!(parse_prefix(&prefix), Some((version, 4096, [7; 32], 100)));
            let again =
                assemble(version, 4096, [7; 32], vec![9; 100], &b[148..]).expect("assembles");
            assert_eq!(again, h);
            assert_eq!(h.version(), version);
        }
        // The bound header of v2 is the header without W and the wrapped key;
        // v1 authenticates the full header.
        let v2 = header_of(FormatVersion::V2);
        let b = v2.as_bytes();
        let mut bound = b[..42].to_vec();
        bound.extend_from_slice(&b[144..]);
        assert_eq!(*v2.authenticated_bytes(), bound[..]);
        assert_eq!(*header().authenticated_bytes(), *header().as_bytes());
        // Writers write v2.
        let fresh = Header::new(16, vec![1], EncryptionContext::empty()).expect("header");
        assert_eq!(fresh.as_bytes()[4], VERSION_2);
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
        for (offset, value) in [(0, b'X'), (4, 0), (4, 3), (5, 2), (6, 0xFF), (42, 0x20)] {
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
        let v1 = FormatVersion::V1;
        let other_id =
            Header::with_message_id(v1, 4096, [8; 32], vec![9; 100], ctx.clone()).expect("header");
        let other_chunk =
            Header::with_message_id(v1, 4097, [7; 32], vec![9; 100], ctx).expect("header");
        assert_ne!(*h.message_key(&key), *other_id.message_key(&key));
        assert_ne!(*h.message_key(&key), *other_chunk.message_key(&key));
        assert_eq!(*h.message_key(&key), *header().message_key(&key));
        assert_ne!(h.chunk_aad(), other_chunk.chunk_aad());
        // v1 binds the wrapped key: another one gives another key and AAD.
        let rewrapped = h.with_wrapped_data_key(vec![3; 120]).expect("rewrap");
        assert_ne!(*h.message_key(&key), *rewrapped.message_key(&key));
        assert_ne!(h.chunk_aad(), rewrapped.chunk_aad());
    }

    /// Rebuilds a header from (possibly altered) bytes: `None` if they do not
    /// parse.
    fn reparse(bytes: &[u8]) -> Option<Header> {
        let prefix: [u8; FIXED_PREFIX_LEN] = bytes.get(..FIXED_PREFIX_LEN)?.try_into().ok()?;
        let (version, chunk_size, message_id, w) = parse_prefix(&prefix)?;
        let c_at = FIXED_PREFIX_LEN + w;
        let c = parse_context_len(bytes.get(c_at..c_at + 4)?.try_into().ok()?)?;
        (bytes.len() == c_at + 4 + c).then_some(())?;
        assemble(
            version,
            chunk_size,
            message_id,
            bytes[FIXED_PREFIX_LEN..c_at].to_vec(),
            &bytes[c_at + 4..],
        )
    }

    #[test]
    fn the_v2_message_key_ignores_the_wrapped_key_and_depends_on_every_other_byte() {
        let key = DataKey::from_bytes([1; 32]);
        let ctx = EncryptionContext::new([("tenant", "acme"), ("file", "a.csv")]).expect("context");
        let h = Header::with_message_id(FormatVersion::V2, 4096, [7; 32], vec![9; 100], ctx)
            .expect("header");
        let (k, aad) = (*h.message_key(&key), h.chunk_aad());
        // Any other wrapped key, of any length: the same key and AAD.
        for wrapped in [vec![9; 100], vec![0; 100], vec![1], vec![0xEE; 4096]] {
            let other = h.with_wrapped_data_key(wrapped).expect("rewrap");
            assert_eq!(*other.message_key(&key), k);
            assert_eq!(other.chunk_aad(), aad);
            assert_eq!(other.message_id(), h.message_id());
        }
        // Every bit of every other byte (magic, version, suite, S, message id,
        // C, context): either no longer a header, or another key and AAD.
        let bytes = h.as_bytes();
        let wrapped = 42..144;
        let mut changed = 0;
        for at in (0..bytes.len()).filter(|at| !wrapped.contains(at)) {
            for bit in 0..8 {
                let mut bad = bytes.to_vec();
                bad[at] ^= 1 << bit;
                if let Some(other) = reparse(&bad) {
                    assert_ne!(*other.message_key(&key), k, "bit {bit} of byte {at}");
                    assert_ne!(other.chunk_aad(), aad, "bit {bit} of byte {at}");
                    changed += 1;
                }
            }
        }
        // The message id alone has 256 bits that all reparse.
        assert!(changed >= 256, "{changed}");
        // The same header as v1 (only the version byte differs): another key.
        let mut as_v1 = bytes.to_vec();
        as_v1[4] = VERSION_1;
        let v1 = reparse(&as_v1).expect("a v1 header");
        assert_ne!(*v1.message_key(&key), k);
        assert_ne!(v1.chunk_aad(), aad);
        // Another data key: another message key.
        assert_ne!(*h.message_key(&DataKey::from_bytes([2; 32])), k);
    }
}
