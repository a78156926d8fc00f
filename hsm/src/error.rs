//! The one error type of the HSM layer.
//!
//! Errors carry the PKCS#11 operation and return code so that operators can
//! tell a missing mechanism from a dead token, but they never carry PINs, key
//! material or plaintext: nothing secret ever reaches this module.

use std::fmt;
use std::path::PathBuf;

/// The PKCS#11 (or layer-level) operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    LoadModule,
    Initialize,
    Finalize,
    ListSlots,
    TokenInfo,
    MechanismList,
    OpenSession,
    Login,
    InitToken,
    InitPin,
    GenerateKey,
    FindObjects,
    GetAttributes,
    DestroyObject,
    Encrypt,
    Decrypt,
    Sign,
    Verify,
    GenerateRandom,
    SyncTokenDirectory,
    ReadPin,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Operation::LoadModule => "load PKCS#11 module",
            Operation::Initialize => "C_Initialize",
            Operation::Finalize => "C_Finalize",
            Operation::ListSlots => "C_GetSlotList",
            Operation::TokenInfo => "C_GetTokenInfo",
            Operation::MechanismList => "C_GetMechanismList",
            Operation::OpenSession => "C_OpenSession",
            Operation::Login => "C_Login",
            Operation::InitToken => "C_InitToken",
            Operation::InitPin => "C_InitPIN",
            Operation::GenerateKey => "C_GenerateKey",
            Operation::FindObjects => "C_FindObjects",
            Operation::GetAttributes => "C_GetAttributeValue",
            Operation::DestroyObject => "C_DestroyObject",
            Operation::Encrypt => "C_Encrypt",
            Operation::Decrypt => "C_Decrypt",
            Operation::Sign => "C_Sign",
            Operation::Verify => "C_Verify",
            Operation::GenerateRandom => "C_GenerateRandom",
            Operation::SyncTokenDirectory => "sync token directory",
            Operation::ReadPin => "read PIN",
        };
        f.write_str(name)
    }
}

/// A PKCS#11 return code, by its specification name (e.g. `CKR_GENERAL_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnCode(String);

impl ReturnCode {
    pub fn name(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_cryptoki(rv: cryptoki::error::RvError) -> Self {
        // cryptoki's Debug gives the CamelCase variant ("GeneralError"); the
        // PKCS#11 name operators search for is "CKR_GENERAL_ERROR".
        let camel = format!("{rv:?}");
        let mut name = String::from("CKR_");
        for (i, ch) in camel.chars().enumerate() {
            if ch.is_ascii_uppercase() && i > 0 {
                name.push('_');
            }
            name.push(ch.to_ascii_uppercase());
        }
        ReturnCode(name)
    }
}

impl fmt::Display for ReturnCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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

/// Errors of the HSM layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded (wrong path, not a PKCS#11 library).
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad { path: PathBuf, reason: String },

    /// A PKCS#11 call returned an error.
    #[error("{operation} failed: {code}")]
    Pkcs11 {
        operation: Operation,
        code: ReturnCode,
    },

    /// The cryptoki wrapper failed before or after the PKCS#11 call (e.g. an
    /// integer conversion); no return code exists.
    #[error("{operation} failed in the PKCS#11 wrapper: {reason}")]
    Wrapper {
        operation: Operation,
        reason: String,
    },

    /// No initialized token carries the configured label.
    #[error("no initialized token with label {label:?} in PKCS#11 module {module}")]
    TokenNotFound { label: String, module: PathBuf },

    /// More than one token carries the configured label: refuse to guess.
    #[error("{count} tokens carry label {label:?}; token labels must be unique")]
    TokenLabelAmbiguous { label: String, count: usize },

    /// The token lacks a mechanism (or a capability of it) the service needs.
    #[error("token {label:?} lacks required mechanism {mechanism} ({capability})")]
    MechanismMissing {
        label: String,
        mechanism: &'static str,
        capability: &'static str,
    },

    /// The PIN could not be read from its configured source. The PIN itself is never shown.
    #[error("cannot read the HSM PIN from {source_description}: {reason}")]
    PinUnavailable {
        source_description: String,
        reason: String,
    },

    /// The token refused the PIN.
    #[error("the token refused the PIN (CKR_PIN_INCORRECT or locked)")]
    PinRejected,

    /// No key object with this CKA_ID exists on the token.
    #[error("no key object with id {id} on the token")]
    ObjectNotFound { id: String },

    /// A key object with this CKA_ID already exists; ids are never reused.
    #[error("a key object with id {id} already exists on the token")]
    ObjectExists { id: String },

    /// More than one object carries the same CKA_ID: the token is inconsistent.
    #[error("{count} objects carry id {id}; refusing to pick one")]
    ObjectAmbiguous { id: String, count: usize },

    /// A generated key did not read back with a required attribute value.
    #[error("key object {id} violates the key template: {attribute} should be {expected}")]
    TemplateViolation {
        id: String,
        attribute: &'static str,
        expected: bool,
    },

    /// The ciphertext, IV, tag or AAD did not verify. Deliberately says no more.
    #[error("invalid ciphertext")]
    InvalidCiphertext,

    /// The HSM is unreachable (token removed, device error, re-initializing).
    /// The service fails closed until it returns.
    #[error("the HSM is unavailable ({operation}: {code})")]
    Unavailable {
        operation: Operation,
        code: ReturnCode,
    },

    /// Every session of the pool stayed busy for the configured wait.
    #[error("all {size} HSM sessions stayed busy for {waited_ms} ms")]
    PoolExhausted { size: usize, waited_ms: u64 },

    /// Syncing the SoftHSM token directory to disk failed.
    #[error("cannot sync token directory {path}: {source}")]
    TokenSync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The configuration is unusable.
    #[error("invalid HSM configuration: {field}: {reason}")]
    Config { field: &'static str, reason: String },

    /// A request argument is outside what the layer accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
}

impl HsmError {
    /// True when the HSM itself is unreachable; callers map this to UNAVAILABLE.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. } | HsmError::PoolExhausted { .. }
        )
    }

    pub(crate) fn class(&self) -> FailureClass {
        match self {
            HsmError::Pkcs11 { code, .. } | HsmError::Unavailable { code, .. } => {
                classify(code.name())
            }
            _ => FailureClass::Other,
        }
    }
}

fn classify(code: &str) -> FailureClass {
    match code {
        "CKR_SESSION_HANDLE_INVALID"
        | "CKR_SESSION_CLOSED"
        | "CKR_USER_NOT_LOGGED_IN"
        | "CKR_OBJECT_HANDLE_INVALID"
        | "CKR_KEY_HANDLE_INVALID" => FailureClass::SessionLost,
        "CKR_DEVICE_REMOVED"
        | "CKR_TOKEN_NOT_PRESENT"
        | "CKR_TOKEN_NOT_RECOGNIZED"
        | "CKR_DEVICE_ERROR"
        | "CKR_DEVICE_MEMORY"
        | "CKR_SLOT_ID_INVALID"
        | "CKR_CRYPTOKI_NOT_INITIALIZED"
        // "Some horrible, unrecoverable error" (PKCS#11 §5.1): SoftHSM2 returns
        // it when its token directory vanishes. On the decrypt path it is
        // mapped to "invalid ciphertext" before it gets here.
        | "CKR_GENERAL_ERROR" => FailureClass::DeviceLost,
        _ => FailureClass::Other,
    }
}

/// Converts a cryptoki error for `operation` into the layer's error.
pub(crate) fn from_cryptoki(operation: Operation, err: cryptoki::error::Error) -> HsmError {
    use cryptoki::error::{Error, RvError};
    match err {
        Error::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _) => HsmError::PinRejected,
        Error::Pkcs11(rv, _) => {
            let code = ReturnCode::from_cryptoki(rv);
            if classify(code.name()) == FailureClass::DeviceLost {
                HsmError::Unavailable { operation, code }
            } else {
                HsmError::Pkcs11 { operation, code }
            }
        }
        other => HsmError::Wrapper {
            operation,
            reason: other.to_string(),
        },
    }
}

pub type Result<T, E = HsmError> = std::result::Result<T, E>;

impl ReturnCode {
    pub(crate) fn not_initialized() -> Self {
        ReturnCode("CKR_CRYPTOKI_NOT_INITIALIZED".into())
    }

    pub(crate) fn token_not_present() -> Self {
        ReturnCode("CKR_TOKEN_NOT_PRESENT".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_codes_use_pkcs11_names() {
        let code = ReturnCode::from_cryptoki(cryptoki::error::RvError::GeneralError);
        assert_eq!(code.name(), "CKR_GENERAL_ERROR");
        let code = ReturnCode::from_cryptoki(cryptoki::error::RvError::SessionHandleInvalid);
        assert_eq!(code.name(), "CKR_SESSION_HANDLE_INVALID");
    }

    #[test]
    fn device_errors_are_unavailable_and_session_errors_are_retried() {
        use cryptoki::context::Function;
        use cryptoki::error::{Error, RvError};
        let gone = from_cryptoki(
            Operation::Encrypt,
            Error::Pkcs11(RvError::DeviceRemoved, Function::Encrypt),
        );
        assert!(gone.is_unavailable());
        assert_eq!(gone.class(), FailureClass::DeviceLost);
        let lost = from_cryptoki(
            Operation::Encrypt,
            Error::Pkcs11(RvError::SessionHandleInvalid, Function::Encrypt),
        );
        assert!(!lost.is_unavailable());
        assert_eq!(lost.class(), FailureClass::SessionLost);
        let pin = from_cryptoki(
            Operation::Login,
            Error::Pkcs11(RvError::PinIncorrect, Function::Login),
        );
        assert!(matches!(pin, HsmError::PinRejected));
    }
}
