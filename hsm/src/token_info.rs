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
//! this module calls `C_GetTokenInfo` again through `cryptoki-sys` (cryptoki
//! offers no public access to the function list) and reads only the label and
//! the flags. That call is the crate's only `unsafe` besides setting
//! `SOFTHSM2_CONF`.
//!
//! What it must never do: call into a module whose `C_Initialize` has not run
//! or whose `C_Finalize` may run concurrently (callers hold the module's read
//! lock), or keep the function-list pointer past the library handle that
//! guarantees it.

use std::path::Path;

use cryptoki::context::Pkcs11;
use cryptoki::slot::Slot;

use crate::error::{HsmError, Operation, Result, from_cryptoki};

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

/// `C_GetTokenInfo` straight through the module's function list, keeping only
/// the label and `CKF_TOKEN_INITIALIZED`.
#[allow(unsafe_code)]
fn read_raw(module_path: &Path, slot_id: u64) -> Result<TokenSummary> {
    use cryptoki::context::Function;
    use cryptoki::error::Rv;
    use cryptoki_sys::{CK_FUNCTION_LIST, CK_TOKEN_INFO, CKF_TOKEN_INITIALIZED};

    let wrapper = |reason: &str| HsmError::Wrapper {
        operation: Operation::TokenInfo,
        reason: reason.to_owned(),
    };
    // SAFETY: loading a shared library runs its initialisers. This is the
    // library cryptoki already loaded for `context` (the caller passes the
    // same path, and the dynamic loader returns the already-loaded object
    // and bumps its reference count), so no initialiser runs again and
    // dropping `library` at the end only drops that extra reference.
    let library =
        unsafe { cryptoki_sys::Pkcs11::new(module_path) }.map_err(|e| HsmError::ModuleLoad {
            path: module_path.to_owned(),
            reason: e.to_string(),
        })?;
    let get_function_list = library
        .C_GetFunctionList
        .as_ref()
        .map_err(|_| wrapper("the module exports no C_GetFunctionList"))?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid, writable pointer slot; C_GetFunctionList
    // stores a pointer to the module's own function table in it (PKCS#11
    // v2.40 §5.2) and may be called at any time, even before C_Initialize.
    let rv = unsafe { get_function_list(&mut list) };
    Rv::from(rv)
        .into_result(Function::GetFunctionList)
        .map_err(|e| from_cryptoki(Operation::TokenInfo, e))?;
    // SAFETY: `list`, when not null, points at the module's static function
    // table, which stays valid while the library is loaded (`library` is
    // alive until the end of this function). Reading one field copies a
    // function pointer.
    let get_token_info = unsafe { list.as_ref() }
        .and_then(|list| list.C_GetTokenInfo)
        .ok_or_else(|| wrapper("the module's function list has no C_GetTokenInfo"))?;
    let mut info = CK_TOKEN_INFO::default();
    // SAFETY: `info` is a properly sized and aligned, writable CK_TOKEN_INFO
    // that outlives the call; the module is initialized and cannot be
    // finalized concurrently because the caller holds the module's read lock
    // (see `crate::module`); C_GetTokenInfo is thread-safe in a module
    // initialized with CKF_OS_LOCKING_OK.
    let rv = unsafe { get_token_info(slot_id, &mut info) };
    Rv::from(rv)
        .into_result(Function::GetTokenInfo)
        .map_err(|e| from_cryptoki(Operation::TokenInfo, e))?;
    Ok(TokenSummary {
        label: unpad(&info.label),
        initialized: info.flags & CKF_TOKEN_INITIALIZED != 0,
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
