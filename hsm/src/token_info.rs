//! Reading what the token lookup needs of a token's `CK_TOKEN_INFO` (its
//! label and whether it is initialized), tolerating fields that real modules
//! fill in ways cryptoki's parser rejects.
//!
//! cryptoki's `get_token_info` parses every field, and fails as a whole when
//! one of them is malformed. openCryptoki 3.8's software token (Debian 12)
//! sets `CKF_CLOCK_ON_TOKEN` but fills `utcTime` with `"hh:mm:ss"` rather than
//! PKCS#11's `YYYYMMDDhhmmss00` (PKCS#11 v2.40 §3.2 `CK_TOKEN_INFO`), so
//! cryptoki answers `ParseIntError` for a token that is perfectly usable. When
//! the module itself answered `CKR_OK` but cryptoki could not parse the answer,
//! this module calls `C_GetTokenInfo` again through `crate::raw` (cryptoki
//! offers no public access to the function list) and reads only the label and
//! the flags. Callers hold the module's read lock, so the module cannot be
//! finalized during the call.

use std::path::Path;

use cryptoki::context::Pkcs11;
use cryptoki::slot::Slot;

use crate::error::{Operation, Result, from_cryptoki};
use crate::raw::RawModule;

/// What the token lookup reads of one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenSummary {
    /// The label without its blank (or NUL) padding.
    pub(crate) label: String,
    /// `CKF_TOKEN_INITIALIZED`.
    pub(crate) initialized: bool,
}

/// Reads the label and initialized flag of the token in `slot`.
///
/// Tries cryptoki's parser first; if the module answered but cryptoki could
/// not parse a field (any error that carries no PKCS#11 return code), reads
/// the raw `CK_TOKEN_INFO` of the library at `module_path`, which must be the
/// library `context` was created from. The caller holds the module's read lock.
///
/// # Errors
/// The PKCS#11 error of `C_GetTokenInfo` (e.g. `Unavailable` with
/// `CKR_TOKEN_NOT_PRESENT`); if the raw read is needed and fails, `ModuleLoad`
/// or the error of the raw call.
pub(crate) fn read(context: &Pkcs11, module_path: &Path, slot: Slot) -> Result<TokenSummary> {
    match context.get_token_info(slot) {
        Ok(info) => Ok(TokenSummary {
            label: unpad(info.label().as_bytes()),
            initialized: info.token_initialized(),
        }),
        Err(e @ cryptoki::error::Error::Pkcs11(..)) => Err(from_cryptoki(Operation::TokenInfo, e)),
        Err(parse) => {
            tracing::debug!(
                slot = slot.id(),
                error = %parse,
                "cryptoki cannot parse this token's CK_TOKEN_INFO; reading label and flags only"
            );
            read_raw(module_path, slot.id())
        }
    }
}

/// A blank-padded PKCS#11 UTF-8 field as text: invalid UTF-8 is replaced
/// (labels are compared, never trusted), trailing blanks and NULs dropped
/// (PKCS#11 pads with blanks; some modules pad with NULs).
fn unpad(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

/// `C_GetTokenInfo` straight through the module's function list
/// (`crate::raw`), keeping only the label and `CKF_TOKEN_INITIALIZED`.
fn read_raw(module_path: &Path, slot_id: u64) -> Result<TokenSummary> {
    let info = RawModule::load(module_path)?.token_info(slot_id)?;
    Ok(TokenSummary {
        label: unpad(&info.label),
        initialized: info.flags & cryptoki_sys::CKF_TOKEN_INITIALIZED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_lose_blank_and_nul_padding_and_survive_bad_utf8() {
        assert_eq!(unpad(b"ockkms                          "), "ockkms");
        assert_eq!(unpad(b"ockkms\0\0\0\0"), "ockkms");
        assert_eq!(unpad(b"a b  "), "a b");
        assert_eq!(unpad(b"\xffkms "), "\u{fffd}kms");
        assert_eq!(unpad(b"    "), "");
    }
}
