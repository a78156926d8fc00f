//! The raw AES-256-GCM that kms-bench compares envelope throughput with: one
//! single-shot seal (or open) over a whole buffer, no chunks, no key
//! derivation. It lives here rather than in the bench so that both sides of
//! the ratio are compiled in the same crate with the same optimization level
//! (AES-GCM is generic code, instantiated where it is used).
//! Not for protecting data: it does nothing about nonces.

use aes_gcm::aead::{AeadInPlace as _, KeyInit as _};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};

/// Encrypts `buf` in place and returns the tag, or `None` if `buf` exceeds
/// GCM's 64 GiB limit.
pub fn aes_256_gcm_seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    buf: &mut [u8],
) -> Option<[u8; 16]> {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
        .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", buf)
        .ok()
        .map(Into::into)
}

/// Verifies `tag` and decrypts `buf` in place; false if the tag does not match.
pub fn aes_256_gcm_open_in_place(
    key: &[u8; 32],
    nonce: &[u8; 12],
    buf: &mut [u8],
    tag: &[u8; 16],
) -> bool {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
        .decrypt_in_place_detached(Nonce::from_slice(nonce), b"", buf, Tag::from_slice(tag))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips_and_a_flipped_bit_fails() {
        let mut buf = b"raw baseline".to_vec();
        let tag = aes_256_gcm_seal_in_place(&[1; 32], &[2; 12], &mut buf).expect("seal");
        assert_ne!(buf, b"raw baseline");
        let mut copy = buf.clone();
        assert!(aes_256_gcm_open_in_place(
            &[1; 32], &[2; 12], &mut copy, &tag
        ));
        assert_eq!(copy, b"raw baseline");
        buf[0] ^= 1;
        assert!(!aes_256_gcm_open_in_place(
            &[1; 32], &[2; 12], &mut buf, &tag
        ));
    }
}
