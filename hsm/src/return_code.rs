//! PKCS#11 return codes: the typed value cryptoki reports, its
//! specification name (for display only), and what the recovery policy
//! makes of it.
//!
//! Classification matches `RvError` variants, never text: the `CKR_*` name
//! is derived here for operators to read and search for, and nothing
//! decides anything by comparing it. A new cryptoki variant fails to compile
//! in `name` until someone has decided what it is called and how it is
//! classified.

use std::fmt;

use cryptoki::error::RvError;

/// A PKCS#11 return code (`CK_RV`) from a failed call.
///
/// Opaque: it holds cryptoki's typed value so that kms-hsm classifies by
/// variant, and shows itself by its specification name (e.g.
/// `CKR_GENERAL_ERROR`). No cryptoki type appears in its public API.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReturnCode(RvError);

/// What the recovery logic should do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureClass {
    /// The session or its login is gone: reopen and log in again, once.
    SessionLost,
    /// The token or device is gone: fail closed, re-initialize with backoff.
    DeviceLost,
    /// Anything else: report it as it is.
    Other,
}

impl ReturnCode {
    pub(crate) fn new(rv: RvError) -> Self {
        ReturnCode(rv)
    }

    /// `CKR_CRYPTOKI_NOT_INITIALIZED`: the module has no live context.
    pub(crate) fn not_initialized() -> Self {
        ReturnCode(RvError::CryptokiNotInitialized)
    }

    /// `CKR_TOKEN_NOT_PRESENT`: what the layer reports when it fails closed
    /// without a return code of its own (token directory gone, backoff).
    pub(crate) fn token_not_present() -> Self {
        ReturnCode(RvError::TokenNotPresent)
    }

    /// What recovery does about this code. The sets follow PKCS#11 v3.1 §5.1
    /// (the same reading as parsec's `to_response_status`): codes that mean
    /// the session handle or its login is gone are retried on a new session;
    /// codes that mean the slot, token or library is gone make the layer fail
    /// closed and re-initialize; everything else is the request's own failure.
    pub(crate) fn class(self) -> FailureClass {
        match self.0 {
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            // Handles die with the session that found them (and with a
            // re-initialization): find the object again on a new session.
            | RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid => FailureClass::SessionLost,
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            // "Some horrible, unrecoverable error" (PKCS#11 §5.1): SoftHSM2
            // returns it when its token directory vanishes. On the decrypt
            // path it is mapped to "invalid ciphertext" before it gets here.
            | RvError::GeneralError => FailureClass::DeviceLost,
            _ => FailureClass::Other,
        }
    }

    /// Whether the code says an object or key handle is invalid
    /// (`CKR_OBJECT_HANDLE_INVALID`, `CKR_KEY_HANDLE_INVALID`).
    pub(crate) fn is_invalid_handle(self) -> bool {
        matches!(
            self.0,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid
        )
    }

    /// Whether the code reports the token's random number generator
    /// (`CKR_RANDOM_SEED_NOT_SUPPORTED`, `CKR_RANDOM_NO_RNG`).
    pub(crate) fn is_rng_failure(self) -> bool {
        matches!(
            self.0,
            RvError::RandomSeedNotSupported | RvError::RandomNoRng
        )
    }

    /// The specification name of the code, e.g. `CKR_GENERAL_ERROR`; for
    /// display only. Vendor-defined codes are `CKR_VENDOR_DEFINED` and codes
    /// cryptoki does not know are `CKR_UNKNOWN` (`Display` adds the value).
    pub fn name(&self) -> &'static str {
        match self.0 {
            RvError::Cancel => "CKR_CANCEL",
            RvError::HostMemory => "CKR_HOST_MEMORY",
            RvError::SlotIdInvalid => "CKR_SLOT_ID_INVALID",
            RvError::GeneralError => "CKR_GENERAL_ERROR",
            RvError::FunctionFailed => "CKR_FUNCTION_FAILED",
            RvError::ArgumentsBad => "CKR_ARGUMENTS_BAD",
            RvError::NoEvent => "CKR_NO_EVENT",
            RvError::NeedToCreateThreads => "CKR_NEED_TO_CREATE_THREADS",
            RvError::CantLock => "CKR_CANT_LOCK",
            RvError::AttributeReadOnly => "CKR_ATTRIBUTE_READ_ONLY",
            RvError::AttributeSensitive => "CKR_ATTRIBUTE_SENSITIVE",
            RvError::AttributeTypeInvalid => "CKR_ATTRIBUTE_TYPE_INVALID",
            RvError::AttributeValueInvalid => "CKR_ATTRIBUTE_VALUE_INVALID",
            RvError::ActionProhibited => "CKR_ACTION_PROHIBITED",
            RvError::DataInvalid => "CKR_DATA_INVALID",
            RvError::DataLenRange => "CKR_DATA_LEN_RANGE",
            RvError::DeviceError => "CKR_DEVICE_ERROR",
            RvError::DeviceMemory => "CKR_DEVICE_MEMORY",
            RvError::DeviceRemoved => "CKR_DEVICE_REMOVED",
            RvError::EncryptedDataInvalid => "CKR_ENCRYPTED_DATA_INVALID",
            RvError::EncryptedDataLenRange => "CKR_ENCRYPTED_DATA_LEN_RANGE",
            RvError::FunctionCanceled => "CKR_FUNCTION_CANCELED",
            RvError::FunctionNotParallel => "CKR_FUNCTION_NOT_PARALLEL",
            RvError::FunctionNotSupported => "CKR_FUNCTION_NOT_SUPPORTED",
            RvError::CurveNotSupported => "CKR_CURVE_NOT_SUPPORTED",
            RvError::KeyHandleInvalid => "CKR_KEY_HANDLE_INVALID",
            RvError::KeySizeRange => "CKR_KEY_SIZE_RANGE",
            RvError::KeyTypeInconsistent => "CKR_KEY_TYPE_INCONSISTENT",
            RvError::KeyNotNeeded => "CKR_KEY_NOT_NEEDED",
            RvError::KeyChanged => "CKR_KEY_CHANGED",
            RvError::KeyNeeded => "CKR_KEY_NEEDED",
            RvError::KeyIndigestible => "CKR_KEY_INDIGESTIBLE",
            RvError::KeyFunctionNotPermitted => "CKR_KEY_FUNCTION_NOT_PERMITTED",
            RvError::KeyNotWrappable => "CKR_KEY_NOT_WRAPPABLE",
            RvError::KeyUnextractable => "CKR_KEY_UNEXTRACTABLE",
            RvError::MechanismInvalid => "CKR_MECHANISM_INVALID",
            RvError::MechanismParamInvalid => "CKR_MECHANISM_PARAM_INVALID",
            RvError::ObjectHandleInvalid => "CKR_OBJECT_HANDLE_INVALID",
            RvError::OperationActive => "CKR_OPERATION_ACTIVE",
            RvError::OperationNotInitialized => "CKR_OPERATION_NOT_INITIALIZED",
            RvError::PinIncorrect => "CKR_PIN_INCORRECT",
            RvError::PinInvalid => "CKR_PIN_INVALID",
            RvError::PinLenRange => "CKR_PIN_LEN_RANGE",
            RvError::PinExpired => "CKR_PIN_EXPIRED",
            RvError::PinLocked => "CKR_PIN_LOCKED",
            RvError::SessionClosed => "CKR_SESSION_CLOSED",
            RvError::SessionCount => "CKR_SESSION_COUNT",
            RvError::SessionHandleInvalid => "CKR_SESSION_HANDLE_INVALID",
            RvError::SessionParallelNotSupported => "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
            RvError::SessionReadOnly => "CKR_SESSION_READ_ONLY",
            RvError::SessionExists => "CKR_SESSION_EXISTS",
            RvError::SessionReadOnlyExists => "CKR_SESSION_READ_ONLY_EXISTS",
            RvError::SessionReadWriteSoExists => "CKR_SESSION_READ_WRITE_SO_EXISTS",
            RvError::SignatureInvalid => "CKR_SIGNATURE_INVALID",
            RvError::SignatureLenRange => "CKR_SIGNATURE_LEN_RANGE",
            RvError::TemplateIncomplete => "CKR_TEMPLATE_INCOMPLETE",
            RvError::TemplateInconsistent => "CKR_TEMPLATE_INCONSISTENT",
            RvError::TokenNotPresent => "CKR_TOKEN_NOT_PRESENT",
            RvError::TokenNotRecognized => "CKR_TOKEN_NOT_RECOGNIZED",
            RvError::TokenWriteProtected => "CKR_TOKEN_WRITE_PROTECTED",
            RvError::UnwrappingKeyHandleInvalid => "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
            RvError::UnwrappingKeySizeRange => "CKR_UNWRAPPING_KEY_SIZE_RANGE",
            RvError::UnwrappingKeyTypeInconsistent => "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
            RvError::UserAlreadyLoggedIn => "CKR_USER_ALREADY_LOGGED_IN",
            RvError::UserNotLoggedIn => "CKR_USER_NOT_LOGGED_IN",
            RvError::UserPinNotInitialized => "CKR_USER_PIN_NOT_INITIALIZED",
            RvError::UserTypeInvalid => "CKR_USER_TYPE_INVALID",
            RvError::UserAnotherAlreadyLoggedIn => "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
            RvError::UserTooManyTypes => "CKR_USER_TOO_MANY_TYPES",
            RvError::WrappedKeyInvalid => "CKR_WRAPPED_KEY_INVALID",
            RvError::WrappedKeyLenRange => "CKR_WRAPPED_KEY_LEN_RANGE",
            RvError::WrappingKeyHandleInvalid => "CKR_WRAPPING_KEY_HANDLE_INVALID",
            RvError::WrappingKeySizeRange => "CKR_WRAPPING_KEY_SIZE_RANGE",
            RvError::WrappingKeyTypeInconsistent => "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
            RvError::RandomSeedNotSupported => "CKR_RANDOM_SEED_NOT_SUPPORTED",
            RvError::RandomNoRng => "CKR_RANDOM_NO_RNG",
            RvError::DomainParamsInvalid => "CKR_DOMAIN_PARAMS_INVALID",
            RvError::BufferTooSmall => "CKR_BUFFER_TOO_SMALL",
            RvError::SavedStateInvalid => "CKR_SAVED_STATE_INVALID",
            RvError::InformationSensitive => "CKR_INFORMATION_SENSITIVE",
            RvError::StateUnsaveable => "CKR_STATE_UNSAVEABLE",
            RvError::CryptokiNotInitialized => "CKR_CRYPTOKI_NOT_INITIALIZED",
            RvError::CryptokiAlreadyInitialized => "CKR_CRYPTOKI_ALREADY_INITIALIZED",
            RvError::MutexBad => "CKR_MUTEX_BAD",
            RvError::MutexNotLocked => "CKR_MUTEX_NOT_LOCKED",
            RvError::NewPinMode => "CKR_NEW_PIN_MODE",
            RvError::NextOtp => "CKR_NEXT_OTP",
            RvError::ExceededMaxIterations => "CKR_EXCEEDED_MAX_ITERATIONS",
            RvError::FipsSelfTestFailed => "CKR_FIPS_SELF_TEST_FAILED",
            RvError::LibraryLoadFailed => "CKR_LIBRARY_LOAD_FAILED",
            RvError::PinTooWeak => "CKR_PIN_TOO_WEAK",
            RvError::PublicKeyInvalid => "CKR_PUBLIC_KEY_INVALID",
            RvError::FunctionRejected => "CKR_FUNCTION_REJECTED",
            RvError::VendorDefined(_) => "CKR_VENDOR_DEFINED",
            RvError::UnknownErrorCode(_) => "CKR_UNKNOWN",
        }
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            RvError::VendorDefined(value) | RvError::UnknownErrorCode(value) => {
                write!(f, "{}({value:#x})", self.name())
            }
            _ => f.write_str(self.name()),
        }
    }
}

impl fmt::Debug for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReturnCode({self})")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::raw::c_ulong;

    use cryptoki::error::Rv;

    use super::*;

    /// Every return code cryptoki names, with the value PKCS#11 gives it:
    /// all `CK_RV` values below `CKR_VENDOR_DEFINED` that cryptoki maps to a
    /// named variant (PKCS#11 v3.1 uses values up to 0x1B8).
    fn every_named_code() -> Vec<(c_ulong, RvError)> {
        (1..0x1000)
            .filter_map(|value: c_ulong| match Rv::from(value) {
                Rv::Error(RvError::UnknownErrorCode(_)) | Rv::Ok => None,
                Rv::Error(rv) => Some((value, rv)),
            })
            .collect()
    }

    #[test]
    fn every_named_code_has_its_own_ckr_name() {
        let codes = every_named_code();
        assert_eq!(codes.len(), 93, "cryptoki 0.12 names 93 return codes");
        let mut seen: HashMap<&'static str, c_ulong> = HashMap::new();
        for (value, rv) in codes {
            let name = ReturnCode(rv).name();
            assert!(name.starts_with("CKR_"), "{value:#x}: {name}");
            assert_ne!(name, "CKR_UNKNOWN", "{value:#x}");
            if let Some(other) = seen.insert(name, value) {
                panic!("{name} names both {other:#x} and {value:#x}");
            }
        }
    }

    #[test]
    fn names_are_the_specification_names() {
        for (value, name) in [
            (0x05, "CKR_GENERAL_ERROR"),
            (0x06, "CKR_FUNCTION_FAILED"),
            (0x30, "CKR_DEVICE_ERROR"),
            (0x32, "CKR_DEVICE_REMOVED"),
            (0x40, "CKR_ENCRYPTED_DATA_INVALID"),
            (0x60, "CKR_KEY_HANDLE_INVALID"),
            (0x82, "CKR_OBJECT_HANDLE_INVALID"),
            (0xA0, "CKR_PIN_INCORRECT"),
            (0xB0, "CKR_SESSION_CLOSED"),
            (0xB3, "CKR_SESSION_HANDLE_INVALID"),
            (0xC0, "CKR_SIGNATURE_INVALID"),
            (0xE0, "CKR_TOKEN_NOT_PRESENT"),
            (0x101, "CKR_USER_NOT_LOGGED_IN"),
            (0x120, "CKR_RANDOM_SEED_NOT_SUPPORTED"),
            (0x121, "CKR_RANDOM_NO_RNG"),
            (0x190, "CKR_CRYPTOKI_NOT_INITIALIZED"),
        ] {
            let Rv::Error(rv) = Rv::from(value as c_ulong) else {
                panic!("{value:#x} is not an error");
            };
            assert_eq!(ReturnCode(rv).name(), name);
            assert_eq!(ReturnCode(rv).to_string(), name);
        }
        let vendor = ReturnCode(RvError::VendorDefined(0x8000_0042));
        assert_eq!(vendor.name(), "CKR_VENDOR_DEFINED");
        assert_eq!(vendor.to_string(), "CKR_VENDOR_DEFINED(0x80000042)");
        assert_eq!(
            format!("{vendor:?}"),
            "ReturnCode(CKR_VENDOR_DEFINED(0x80000042))"
        );
    }

    /// The classification of every named code, variant by variant: the
    /// session-level and device-level sets are exactly these, and every
    /// other code is the request's own failure.
    #[test]
    fn every_code_is_classified_by_its_variant() {
        let session_lost = [
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::UserNotLoggedIn,
            RvError::ObjectHandleInvalid,
            RvError::KeyHandleInvalid,
        ];
        let device_lost = [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::TokenNotRecognized,
            RvError::DeviceError,
            RvError::DeviceMemory,
            RvError::SlotIdInvalid,
            RvError::CryptokiNotInitialized,
            RvError::GeneralError,
        ];
        let rng = [RvError::RandomSeedNotSupported, RvError::RandomNoRng];
        let mut classified = 0;
        for (value, rv) in every_named_code() {
            let code = ReturnCode(rv);
            let expected = if session_lost.contains(&rv) {
                FailureClass::SessionLost
            } else if device_lost.contains(&rv) {
                FailureClass::DeviceLost
            } else {
                FailureClass::Other
            };
            assert_eq!(code.class(), expected, "{value:#x} {code}");
            assert_eq!(code.is_rng_failure(), rng.contains(&rv), "{code}");
            classified += 1;
        }
        assert_eq!(classified, 93);
        for rv in [
            RvError::VendorDefined(0x8000_0001),
            RvError::UnknownErrorCode(0x7777),
        ] {
            assert_eq!(ReturnCode(rv).class(), FailureClass::Other);
        }
    }
}
