//! The ciphertext blob: a self-describing, versioned container around one AES-GCM
//! ciphertext made by a KEK in the HSM.
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0x4B ('K')
//! 1       1     format version 0x01
//! 2       1     algorithm 0x01 = AES-256-GCM (96-bit IV, 128-bit tag)
//! 3       1     L = key id length in bytes (1..=64)
//! 4       L     key id, printable ASCII (0x21..=0x7E), e.g. "key-" + 32 lowercase hex
//! 4+L     4     key version, u32 big-endian, >= 1
//! 8+L     12    IV
//! 20+L    n+16  AES-GCM ciphertext ‖ 16-byte tag
//! ```
//!
//! The AES-GCM AAD is the header — bytes `[0 .. 8+L]` — followed by the canonical
//! encoding of the encryption context ([`crate::encryption_context`]). So a blob
//! whose magic, format, algorithm, key id or key version was altered, or that is
//! presented with a different context, fails tag verification even if it still
//! parses. The IV is deliberately not in the AAD: GCM already authenticates it (it
//! determines the counter blocks and the tag mask), so a changed IV fails the tag
//! check anyway, and leaving it out keeps the AAD computable before the HSM picks
//! the IV.
//!
//! This module only lays out and parses bytes; it performs no cryptography (the HSM
//! generates the IV and computes ciphertext ‖ tag) and never sees plaintext. Parse
//! failures of every kind are one [`CiphertextError`] whose message is always
//! "invalid ciphertext", so that callers learn nothing about which check failed.

use std::fmt;

use crate::encryption_context::EncryptionContext;

/// First byte of every blob ('K').
pub const MAGIC: u8 = 0x4B;
/// The blob format version this module writes and reads.
pub const FORMAT_VERSION: u8 = 0x01;
/// Length of the AES-GCM IV (96 bits, the only size the service uses).
pub const IV_LEN: usize = 12;
/// Length of the AES-GCM tag (128 bits, the only size the service accepts).
pub const TAG_LEN: usize = 16;
/// Longest key id a blob can carry.
pub const MAX_KEY_ID_LEN: usize = 64;
/// Header bytes besides the key id: magic, format, algorithm, L, key version.
const FIXED_HEADER_LEN: usize = 4 + 4;

/// The encryption algorithm of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// AES-256-GCM with a 96-bit IV and a 128-bit tag.
    Aes256Gcm,
}

impl Algorithm {
    /// The algorithm's byte in the header.
    pub const fn id(self) -> u8 {
        match self {
            Self::Aes256Gcm => 0x01,
        }
    }

    fn from_id(id: u8) -> Option<Self> {
        match id {
            0x01 => Some(Self::Aes256Gcm),
            _ => None,
        }
    }
}

/// The authenticated header of a blob: which key version and algorithm made it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    key_id: String,
    key_version: u32,
    algorithm: Algorithm,
}

/// A [`Header`] could not be built: the key id or version cannot be represented in
/// the format. Only the service's own key records feed [`Header::new`], so this is
/// an internal error, never a caller's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The key id is empty, longer than [`MAX_KEY_ID_LEN`] bytes, or has a byte
    /// outside printable ASCII.
    #[error("key id cannot be stored in a ciphertext blob (1..=64 printable ASCII bytes)")]
    InvalidKeyId,
    /// Key version 0 does not exist.
    #[error("key version must be at least 1")]
    ZeroKeyVersion,
}

impl Header {
    /// A header for a ciphertext made by version `key_version` of key `key_id`.
    pub fn new(
        key_id: impl Into<String>,
        key_version: u32,
        algorithm: Algorithm,
    ) -> Result<Self, HeaderError> {
        let key_id = key_id.into();
        if !is_valid_key_id(key_id.as_bytes()) {
            return Err(HeaderError::InvalidKeyId);
        }
        if key_version == 0 {
            return Err(HeaderError::ZeroKeyVersion);
        }
        Ok(Self {
            key_id,
            key_version,
            algorithm,
        })
    }

    /// Canonical id of the key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Version of the key (>= 1).
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// Encryption algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Length of the encoded header, `8 + L`.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + self.key_id.len()
    }

    /// Appends the header bytes (`[0 .. 8+L]` of the blob) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // `new` guarantees 1..=64, so the length fits in a byte.
        let key_id_len = u8::try_from(self.key_id.len()).unwrap_or(u8::MAX);
        out.extend_from_slice(&[MAGIC, FORMAT_VERSION, self.algorithm.id(), key_id_len]);
        out.extend_from_slice(self.key_id.as_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
    }

    /// The header bytes: the prefix of both the blob and the AAD.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// The AES-GCM AAD for a ciphertext under this header and `context`: the header
    /// bytes followed by the context's canonical encoding.
    pub fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len() + context.encoded_len());
        self.encode_into(&mut out);
        context.encode_into(&mut out);
        out
    }
}

/// Assembles a blob from its header, the IV the HSM chose and the HSM's output
/// (ciphertext ‖ 16-byte tag, exactly as returned by C_Encrypt with CKM_AES_GCM).
pub fn seal_blob(header: &Header, iv: &[u8; IV_LEN], ct_and_tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.encoded_len() + IV_LEN + ct_and_tag.len());
    header.encode_into(&mut out);
    out.extend_from_slice(iv);
    out.extend_from_slice(ct_and_tag);
    out
}

/// A blob split into its parts, borrowing from the input. Parsing succeeded, so the
/// header is well formed; whether the blob is authentic is only known once the HSM
/// has verified the tag with [`CiphertextBlob::aad`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiphertextBlob<'a> {
    header: Header,
    header_bytes: &'a [u8],
    iv: [u8; IV_LEN],
    ct_and_tag: &'a [u8],
}

impl<'a> CiphertextBlob<'a> {
    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header bytes exactly as they appear in the blob (`[0 .. 8+L]`). The
    /// header encoding has no redundancy, so this always equals
    /// `self.header().encode()`.
    pub fn header_bytes(&self) -> &'a [u8] {
        self.header_bytes
    }

    /// The 96-bit IV.
    pub fn iv(&self) -> &[u8; IV_LEN] {
        &self.iv
    }

    /// The ciphertext followed by the 16-byte tag (at least 16 bytes).
    pub fn ct_and_tag(&self) -> &'a [u8] {
        self.ct_and_tag
    }

    /// Length of the plaintext this blob decrypts to.
    pub fn plaintext_len(&self) -> usize {
        self.ct_and_tag.len() - TAG_LEN
    }

    /// The AES-GCM AAD to decrypt with: header bytes ‖ canonical `context`.
    pub fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_bytes.len() + context.encoded_len());
        out.extend_from_slice(self.header_bytes);
        context.encode_into(&mut out);
        out
    }
}

/// Splits a blob into header, IV and ciphertext ‖ tag, checking everything that can
/// be checked without the key. Every failure is the same [`CiphertextError`].
pub fn parse_blob(blob: &[u8]) -> Result<CiphertextBlob<'_>, CiphertextError> {
    use InvalidReason as R;

    let fixed = blob.get(..4).ok_or(CiphertextError::new(R::Truncated))?;
    let (magic, format, algorithm, key_id_len) = (fixed[0], fixed[1], fixed[2], fixed[3]);
    if magic != MAGIC {
        return Err(CiphertextError::new(R::BadMagic));
    }
    if format != FORMAT_VERSION {
        return Err(CiphertextError::new(R::UnsupportedFormatVersion));
    }
    let algorithm =
        Algorithm::from_id(algorithm).ok_or(CiphertextError::new(R::UnsupportedAlgorithm))?;
    let key_id_len = usize::from(key_id_len);
    if key_id_len == 0 || key_id_len > MAX_KEY_ID_LEN {
        return Err(CiphertextError::new(R::BadKeyIdLength));
    }

    let header_len = FIXED_HEADER_LEN + key_id_len;
    let header_bytes = blob
        .get(..header_len)
        .ok_or(CiphertextError::new(R::Truncated))?;
    let key_id = &header_bytes[4..4 + key_id_len];
    if !is_valid_key_id(key_id) {
        return Err(CiphertextError::new(R::BadKeyIdByte));
    }
    let mut version_bytes = [0u8; 4];
    version_bytes.copy_from_slice(&header_bytes[4 + key_id_len..]);
    let key_version = u32::from_be_bytes(version_bytes);
    if key_version == 0 {
        return Err(CiphertextError::new(R::ZeroKeyVersion));
    }

    let rest = &blob[header_len..];
    let (iv, ct_and_tag) = rest
        .split_first_chunk::<IV_LEN>()
        .ok_or(CiphertextError::new(R::Truncated))?;
    if ct_and_tag.len() < TAG_LEN {
        return Err(CiphertextError::new(R::CiphertextTooShort));
    }

    // The key id bytes were just checked to be printable ASCII, hence UTF-8.
    let key_id = std::str::from_utf8(key_id)
        .map_err(|_| CiphertextError::new(R::BadKeyIdByte))?
        .to_owned();
    Ok(CiphertextBlob {
        header: Header {
            key_id,
            key_version,
            algorithm,
        },
        header_bytes,
        iv: *iv,
        ct_and_tag,
    })
}

/// 1..=64 bytes of printable ASCII without space (0x21..=0x7E).
fn is_valid_key_id(key_id: &[u8]) -> bool {
    (1..=MAX_KEY_ID_LEN).contains(&key_id.len()) && key_id.iter().all(u8::is_ascii_graphic)
}

/// A blob is not a well-formed ciphertext of this service. Its `Display` is always
/// exactly "invalid ciphertext", whatever the reason, and is what the caller sees;
/// the reason is for server-side debug logs only ([`CiphertextError::reason`] and
/// `Debug`). A blob that parses but fails the tag check, or that names another key,
/// must be reported with this same error (see [`CiphertextError::authentication_failed`]).
#[derive(Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid ciphertext")]
pub struct CiphertextError {
    reason: InvalidReason,
}

impl CiphertextError {
    fn new(reason: InvalidReason) -> Self {
        Self { reason }
    }

    /// For the decrypt path: the blob parsed but the HSM rejected the tag (tampered
    /// blob or wrong encryption context).
    pub fn authentication_failed() -> Self {
        Self::new(InvalidReason::AuthenticationFailed)
    }

    /// For the decrypt path: the blob names a key other than the one the caller
    /// required.
    pub fn key_mismatch() -> Self {
        Self::new(InvalidReason::KeyMismatch)
    }

    /// Why the blob was refused. For debug logs only; never send it to the caller.
    pub fn reason(&self) -> InvalidReason {
        self.reason
    }
}

impl fmt::Debug for CiphertextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CiphertextError")
            .field("reason", &self.reason)
            .finish()
    }
}

/// Why [`parse_blob`] (or the decrypt path) refused a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvalidReason {
    /// The blob ends before the header, the IV or the tag is complete.
    Truncated,
    /// The first byte is not [`MAGIC`].
    BadMagic,
    /// The format version byte is not [`FORMAT_VERSION`].
    UnsupportedFormatVersion,
    /// The algorithm byte names no known algorithm.
    UnsupportedAlgorithm,
    /// The key id length byte is 0 or greater than [`MAX_KEY_ID_LEN`].
    BadKeyIdLength,
    /// The key id has a byte outside printable ASCII.
    BadKeyIdByte,
    /// The key version is 0.
    ZeroKeyVersion,
    /// Fewer than [`TAG_LEN`] bytes follow the IV.
    CiphertextTooShort,
    /// The AES-GCM tag did not verify (set by the decrypt path, not by parsing).
    AuthenticationFailed,
    /// The blob names another key than the caller required (set by the decrypt path).
    KeyMismatch,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption_context::DEFAULT_MAX_ENCODED_LEN;

    const KEY_ID: &str = "key-0123456789abcdef0123456789abcdef";
    const IV: [u8; IV_LEN] = [
        0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB,
    ];

    fn header() -> Header {
        Header::new(KEY_ID, 7, Algorithm::Aes256Gcm).expect("valid test input")
    }

    /// A blob with a 5-byte "ciphertext" and a 16-byte "tag" (layout only).
    fn sample_blob() -> Vec<u8> {
        let ct_and_tag: Vec<u8> = (0u8..21).map(|b| b.wrapping_mul(11)).collect();
        seal_blob(&header(), &IV, &ct_and_tag)
    }

    fn reason(blob: &[u8]) -> InvalidReason {
        parse_blob(blob).expect_err("must be refused").reason()
    }

    #[test]
    fn layout_matches_the_documented_table() {
        let blob = sample_blob();
        let l = KEY_ID.len();
        assert_eq!(blob[0], 0x4B);
        assert_eq!(blob[1], 0x01);
        assert_eq!(blob[2], 0x01);
        assert_eq!(usize::from(blob[3]), l);
        assert_eq!(&blob[4..4 + l], KEY_ID.as_bytes());
        assert_eq!(&blob[4 + l..8 + l], &[0, 0, 0, 7]);
        assert_eq!(&blob[8 + l..20 + l], &IV);
        assert_eq!(blob.len(), 20 + l + 21);
        assert_eq!(header().encode(), &blob[..8 + l]);
    }

    #[test]
    fn round_trip() {
        let blob = sample_blob();
        let parsed = parse_blob(&blob).expect("valid test input");
        assert_eq!(parsed.header(), &header());
        assert_eq!(parsed.header_bytes(), header().encode().as_slice());
        assert_eq!(parsed.iv(), &IV);
        assert_eq!(parsed.ct_and_tag(), &blob[20 + KEY_ID.len()..]);
        assert_eq!(parsed.plaintext_len(), 5);

        let ctx = EncryptionContext::new([("purpose", "test")], DEFAULT_MAX_ENCODED_LEN)
            .expect("valid test input");
        assert_eq!(parsed.aad(&ctx), header().aad(&ctx));
        let mut expected_aad = header().encode();
        expected_aad.extend_from_slice(&ctx.canonical_bytes());
        assert_eq!(parsed.aad(&ctx), expected_aad);
    }

    #[test]
    fn round_trip_edge_values() {
        let long_id = "k".repeat(MAX_KEY_ID_LEN);
        for (id, version) in [("k", 1), (long_id.as_str(), u32::MAX), ("!~", 0x0102_0304)] {
            let h = Header::new(id, version, Algorithm::Aes256Gcm).expect("valid test input");
            let blob = seal_blob(&h, &IV, &[0; TAG_LEN]);
            let parsed = parse_blob(&blob).expect("valid test input");
            assert_eq!(parsed.header(), &h);
            assert_eq!(parsed.plaintext_len(), 0);
        }
    }

    #[test]
    fn header_new_refuses_unrepresentable_values() {
        let too_long = "k".repeat(MAX_KEY_ID_LEN + 1);
        for bad in [
            "",
            too_long.as_str(),
            "key 1",
            "key-é",
            "key-\n",
            "key-\u{7f}",
        ] {
            assert_eq!(
                Header::new(bad, 1, Algorithm::Aes256Gcm),
                Err(HeaderError::InvalidKeyId),
                "{bad:?}"
            );
        }
        assert_eq!(
            Header::new(KEY_ID, 0, Algorithm::Aes256Gcm),
            Err(HeaderError::ZeroKeyVersion)
        );
    }

    #[test]
    fn every_truncation_is_refused_or_shortens_the_ciphertext() {
        let blob = sample_blob();
        let full = parse_blob(&blob).expect("valid test input");
        let min_len = 20 + KEY_ID.len() + TAG_LEN;
        for len in 0..blob.len() {
            let cut = &blob[..len];
            match parse_blob(cut) {
                Err(err) => {
                    assert!(len < min_len, "length {len} refused: {err:?}");
                    let expected = if len >= 20 + KEY_ID.len() {
                        InvalidReason::CiphertextTooShort
                    } else {
                        InvalidReason::Truncated
                    };
                    assert_eq!(err.reason(), expected, "length {len}");
                }
                Ok(parsed) => {
                    // Only the ciphertext was cut: same header, a shorter ct ‖ tag,
                    // so the last 16 bytes are not the tag and GCM must fail.
                    assert!(len >= min_len, "length {len} parsed");
                    assert_eq!(parsed.header(), full.header());
                    assert!(parsed.ct_and_tag().len() < full.ct_and_tag().len());
                }
            }
        }
    }

    #[test]
    fn every_flipped_header_byte_is_refused_or_changes_the_aad() {
        let blob = sample_blob();
        let original = parse_blob(&blob).expect("valid test input");
        let ctx = EncryptionContext::empty();
        let header_len = header().encoded_len();
        for pos in 0..blob.len() {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut tampered = blob.clone();
                tampered[pos] ^= mask;
                match parse_blob(&tampered) {
                    Err(_) => assert!(pos < header_len, "byte {pos} refused"),
                    Ok(parsed) if pos < header_len => {
                        assert_ne!(parsed.header(), original.header(), "byte {pos}");
                        assert_ne!(parsed.aad(&ctx), original.aad(&ctx), "byte {pos}");
                    }
                    Ok(parsed) if pos < header_len + IV_LEN => {
                        // GCM authenticates the IV itself.
                        assert_ne!(parsed.iv(), original.iv(), "byte {pos}");
                    }
                    Ok(parsed) => {
                        assert_ne!(parsed.ct_and_tag(), original.ct_and_tag(), "byte {pos}");
                    }
                }
            }
        }
    }

    #[test]
    fn header_fields_are_validated() {
        let blob = sample_blob();
        let l = KEY_ID.len();
        let with = |pos: usize, value: u8| {
            let mut b = blob.clone();
            b[pos] = value;
            b
        };
        assert_eq!(reason(&with(0, b'k')), InvalidReason::BadMagic);
        assert_eq!(
            reason(&with(1, 0x02)),
            InvalidReason::UnsupportedFormatVersion
        );
        assert_eq!(
            reason(&with(1, 0x00)),
            InvalidReason::UnsupportedFormatVersion
        );
        assert_eq!(reason(&with(2, 0x00)), InvalidReason::UnsupportedAlgorithm);
        assert_eq!(reason(&with(2, 0x02)), InvalidReason::UnsupportedAlgorithm);
        assert_eq!(reason(&with(3, 0)), InvalidReason::BadKeyIdLength);
        assert_eq!(reason(&with(3, 65)), InvalidReason::BadKeyIdLength);
        assert_eq!(reason(&with(3, 0xFF)), InvalidReason::BadKeyIdLength);
        assert_eq!(reason(&with(4, b' ')), InvalidReason::BadKeyIdByte);
        assert_eq!(reason(&with(4 + l - 1, 0x00)), InvalidReason::BadKeyIdByte);
        assert_eq!(reason(&with(5, 0xC3)), InvalidReason::BadKeyIdByte);
        let mut zero_version = blob.clone();
        zero_version[4 + l..8 + l].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(reason(&zero_version), InvalidReason::ZeroKeyVersion);
        assert_eq!(reason(&[]), InvalidReason::Truncated);
    }

    #[test]
    fn a_shorter_length_byte_still_parses_but_changes_the_header() {
        // L one smaller: the last key id byte becomes part of the version, and so
        // on. Parsing may succeed, but the header (hence the AAD) differs.
        let blob = sample_blob();
        let mut tampered = blob.clone();
        tampered[3] -= 1;
        let parsed = parse_blob(&tampered).expect("valid test input");
        assert_ne!(
            parsed.header(),
            parse_blob(&blob).expect("valid test input").header()
        );
        assert_ne!(
            parsed.header_bytes(),
            parse_blob(&blob).expect("valid test input").header_bytes()
        );
    }

    #[test]
    fn every_error_displays_the_same_generic_message() {
        let blob = sample_blob();
        let mut errors = vec![
            parse_blob(&[]).expect_err("must be refused"),
            parse_blob(&[0x00; 64]).expect_err("must be refused"),
            parse_blob(&blob[..blob.len() - 20]).expect_err("must be refused"),
            CiphertextError::authentication_failed(),
            CiphertextError::key_mismatch(),
        ];
        let mut bad_version = blob.clone();
        bad_version[1] = 9;
        errors.push(parse_blob(&bad_version).expect_err("must be refused"));
        for err in errors {
            assert_eq!(err.to_string(), "invalid ciphertext");
            assert_eq!(format!("{err:#}"), "invalid ciphertext");
            assert!(std::error::Error::source(&err).is_none());
        }
    }
}
