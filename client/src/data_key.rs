//! [`DataKey`]: a 256-bit data key in plaintext, as GenerateDataKey or Decrypt
//! return it. Private bytes, no `Clone`, redacted `Debug`, zeroized on drop.

use std::fmt;

use zeroize::{Zeroize as _, ZeroizeOnDrop, Zeroizing};

/// Length of an envelope data key, in bytes (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// A plaintext data key. Never printed, never cloned, erased when dropped.
#[derive(ZeroizeOnDrop)]
pub struct DataKey([u8; DATA_KEY_LEN]);

/// The KMS returned a data key of the wrong length; holds that length, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("data key is {0} bytes, expected {DATA_KEY_LEN}")]
pub struct DataKeyLengthError(pub usize);

impl DataKey {
    /// Takes the key out of `bytes` and erases `bytes` (whatever its length).
    ///
    /// # Errors
    /// [`DataKeyLengthError`] if `bytes` is not [`DATA_KEY_LEN`] bytes long
    /// (`bytes` is erased all the same).
    pub fn from_vec(mut bytes: Vec<u8>) -> Result<Self, DataKeyLengthError> {
        let result = <[u8; DATA_KEY_LEN]>::try_from(bytes.as_slice())
            .map(DataKey)
            .map_err(|_| DataKeyLengthError(bytes.len()));
        bytes.zeroize();
        result
    }

    /// A key from raw bytes (tests, golden vectors, benchmarks).
    pub fn from_bytes(bytes: [u8; DATA_KEY_LEN]) -> Self {
        let bytes = Zeroizing::new(bytes);
        DataKey(*bytes)
    }

    /// The key bytes. Do not copy them anywhere that is not erased.
    pub fn expose_secret(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_length_is_checked() {
        let key = DataKey::from_bytes([0xAB; DATA_KEY_LEN]);
        let out = format!("{key:?} {key:#?}");
        assert!(
            !out.contains("171") && !out.to_lowercase().contains("ab,"),
            "{out}"
        );
        assert!(out.contains("REDACTED"));
        assert_eq!(
            DataKey::from_vec(vec![1; 16]).map(|_| ()),
            Err(DataKeyLengthError(16))
        );
        assert_eq!(
            DataKey::from_vec(vec![7; 32])
                .expect("32 bytes")
                .expose_secret(),
            &[7; 32]
        );
    }
}
