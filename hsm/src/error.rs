//! The one error type of the HSM layer.
//!
//! Errors carry the PKCS#11 operation and return code so that operators can
//! tell a missing mechanism from a dead token, but they never carry PINs, key
//! material or plaintext: nothing secret ever reaches this module. Return
//! codes are classified by their typed value (see `return_code`), never by
//! their text.

use std::fmt;
use std::path::PathBuf;

use crate::return_code::FailureClass;
pub use crate::return_code::ReturnCode;

/// The PKCS#11 (or layer-level) operation that failed or was measured.
///
/// `Display` gives the PKCS#11 function name (`C_Encrypt`), which is also the
/// `op` label of the service's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// Loading the PKCS#11 shared library.
    LoadModule,
    /// `C_Initialize`.
    Initialize,
    /// `C_Finalize`.
    Finalize,
    /// `C_GetSlotList`.
    ListSlots,
    /// `C_GetTokenInfo`.
    TokenInfo,
    /// `C_GetMechanismList` / `C_GetMechanismInfo`.
    MechanismList,
    /// `C_OpenSession`.
    OpenSession,
    /// `C_Login`.
    Login,
    /// `C_InitToken`.
    InitToken,
    /// `C_InitPIN`.
    InitPin,
    /// `C_GenerateKey` (and the test-only `C_CreateObject` import).
    GenerateKey,
    /// `C_FindObjects` (with its `Init`/`Final`).
    FindObjects,
    /// `C_GetAttributeValue`.
    GetAttributes,
    /// `C_DestroyObject`.
    DestroyObject,
    /// `C_Encrypt` (AES-GCM).
    Encrypt,
    /// `C_Decrypt` (AES-GCM).
    Decrypt,
    /// `C_Sign` (HMAC-SHA256).
    Sign,
    /// `C_Verify` (HMAC-SHA256).
    Verify,
    /// `C_GenerateRandom`.
    GenerateRandom,
    /// fsync of the SoftHSM2 token directory.
    SyncTokenDirectory,
    /// Reading the PIN from its source.
    ReadPin,
    /// `C_WrapKey` (a key version under a root, `CKM_AES_KEY_WRAP`).
    WrapKey,
    /// `C_UnwrapKey` (a wrapped key version into a working session object).
    UnwrapKey,
    /// `C_GenerateKeyPair` (an RSA import key pair).
    GenerateKeyPair,
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
            Operation::WrapKey => "C_WrapKey",
            Operation::UnwrapKey => "C_UnwrapKey",
            Operation::GenerateKeyPair => "C_GenerateKeyPair",
        };
        f.write_str(name)
    }
}

/// Which random number generator failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RngSource {
    /// The token's generator (`C_GenerateRandom`, or a `CKR_RANDOM_*` code).
    Token(ReturnCode),
    /// The host's system generator, which chooses the AES-GCM IVs.
    Host,
}

impl fmt::Display for RngSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RngSource::Token(code) => write!(f, "token generator: {code}"),
            RngSource::Host => f.write_str("host system generator"),
        }
    }
}

/// A slot the token lookup examined and did not take.
#[derive(Debug)]
pub struct ExaminedSlot {
    /// The module's slot id (`CK_SLOT_ID`), as `pkcs11-tool -L` shows it in
    /// parentheses.
    pub slot_id: u64,
    /// Why the slot's token was not the one asked for.
    pub rejection: SlotRejection,
}

/// Why the token lookup did not take a slot.
#[derive(Debug)]
#[non_exhaustive]
pub enum SlotRejection {
    /// The token is initialized and carries another label.
    LabelDiffers {
        /// The token's label, without its padding.
        label: String,
    },
    /// The token is not initialized (`CKF_TOKEN_INITIALIZED` is clear), so
    /// its label means nothing.
    NotInitialized,
    /// The token's `CK_TOKEN_INFO` could not be read, even tolerantly
    /// (e.g. `CKR_TOKEN_NOT_PRESENT` when it was removed after listing).
    InfoUnreadable(Box<HsmError>),
}

impl fmt::Display for ExaminedSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {}: ", self.slot_id)?;
        match &self.rejection {
            SlotRejection::LabelDiffers { label } => write!(f, "label is {label:?}"),
            SlotRejection::NotInitialized => f.write_str("token not initialized"),
            SlotRejection::InfoUnreadable(cause) => write!(f, "token info unreadable: {cause}"),
        }
    }
}

/// The slot list of `TokenNotFound`'s message.
struct ExaminedList<'a>(&'a [ExaminedSlot]);

impl fmt::Display for ExaminedList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the module lists no slot with a token");
        }
        f.write_str("examined ")?;
        for (i, slot) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{slot}")?;
        }
        Ok(())
    }
}

/// Errors of the HSM layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded (wrong path, not a PKCS#11 library).
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// The module path as configured (or canonicalized).
        path: PathBuf,
        /// What the loader reported.
        reason: String,
    },

    /// A PKCS#11 call returned an error that is neither a lost device nor
    /// a verdict on the caller's input.
    #[error("{operation} failed: {code}")]
    Pkcs11 {
        /// The call that failed.
        operation: Operation,
        /// Its return code.
        code: ReturnCode,
    },

    /// The cryptoki wrapper failed before or after the PKCS#11 call (e.g. an
    /// integer conversion); no return code exists.
    #[error("{operation} failed in the PKCS#11 wrapper: {reason}")]
    Wrapper {
        /// The call being made.
        operation: Operation,
        /// What the wrapper reported.
        reason: String,
    },

    /// No initialized token carries the configured label. The message lists
    /// every slot with a token that was examined and why it was not taken.
    #[error("no initialized token with label {label:?} in PKCS#11 module {module} ({})", ExaminedList(.examined))]
    TokenNotFound {
        /// The configured token label.
        label: String,
        /// The module searched.
        module: PathBuf,
        /// Every slot with a token that was examined, in the module's order.
        examined: Vec<ExaminedSlot>,
    },

    /// More than one token carries the configured label: refuse to guess.
    #[error("{count} tokens carry label {label:?}; token labels must be unique")]
    TokenLabelAmbiguous {
        /// The configured token label.
        label: String,
        /// How many initialized tokens carry it.
        count: usize,
    },

    /// The token lacks a mechanism (or a capability of it) the service needs.
    #[error("token {label:?} lacks required mechanism {mechanism} ({capability})")]
    MechanismMissing {
        /// The token's label.
        label: String,
        /// The mechanism's PKCS#11 name, e.g. `CKM_AES_GCM`.
        mechanism: &'static str,
        /// What the service needs it to do.
        capability: &'static str,
    },

    /// The PIN could not be read from its configured source. The PIN itself is never shown.
    #[error("cannot read the HSM PIN from {source_description}: {reason}")]
    PinUnavailable {
        /// The source (file path or variable name), never the PIN.
        source_description: String,
        /// Why it could not be read.
        reason: String,
    },

    /// The token refused the PIN.
    #[error("the token refused the PIN (CKR_PIN_INCORRECT or locked)")]
    PinRejected,

    /// No key object with this CKA_ID exists on the token.
    #[error("no key object with id {id} on the token")]
    ObjectNotFound {
        /// The CKA_ID, as `ObjectId` displays it.
        id: String,
    },

    /// A key object with this CKA_ID already exists; ids are never reused.
    #[error("a key object with id {id} already exists on the token")]
    ObjectExists {
        /// The CKA_ID, as `ObjectId` displays it.
        id: String,
    },

    /// More than one object carries the same CKA_ID: the token is inconsistent.
    #[error("{count} objects carry id {id}; refusing to pick one")]
    ObjectAmbiguous {
        /// The CKA_ID, as `ObjectId` displays it.
        id: String,
        /// How many objects carry it.
        count: usize,
    },

    /// A generated key did not read back with a required attribute value.
    #[error("key object {id} violates the key template: {attribute} should be {expected}")]
    TemplateViolation {
        /// The CKA_ID, as `ObjectId` displays it.
        id: String,
        /// The attribute's PKCS#11 name, e.g. `CKA_LOCAL`.
        attribute: &'static str,
        /// The value it must have, as an operator reads it (`true`, `CKK_AES`, …).
        expected: &'static str,
    },

    /// The ciphertext, IV, tag or AAD did not verify. Deliberately says no more.
    #[error("invalid ciphertext")]
    InvalidCiphertext,

    /// A random number generator failed: the token's (any failure of
    /// `C_GenerateRandom` other than a lost session or device, or a
    /// `CKR_RANDOM_*` code from any call) or the host's (choosing an IV).
    /// Nothing that needed the randomness was done.
    #[error("random number generation failed in {operation} ({generator})")]
    RngFailed {
        /// The operation that needed randomness.
        operation: Operation,
        /// Which generator failed, with the token's return code if it was the token.
        generator: RngSource,
    },

    /// The HSM is unreachable (token removed, device error, re-initializing).
    /// The service fails closed until it returns.
    #[error("the HSM is unavailable ({operation}: {code})")]
    Unavailable {
        /// The call that found it unreachable.
        operation: Operation,
        /// The code it answered with (`CKR_TOKEN_NOT_PRESENT` when the layer
        /// fails fast during backoff or finds the token's storage gone).
        code: ReturnCode,
    },

    /// Every session of the pool stayed busy for the configured wait.
    #[error("all {size} HSM sessions stayed busy for {waited_ms} ms")]
    PoolExhausted {
        /// The pool size.
        size: usize,
        /// How long the caller waited, in milliseconds.
        waited_ms: u64,
    },

    /// Syncing the SoftHSM token directory to disk failed.
    #[error("cannot sync token directory {path}")]
    TokenSync {
        /// The file or directory that could not be synced.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The SoftHSM2 home (configuration file or token directory) could not
    /// be created.
    #[error("cannot set up SoftHSM2 at {path}")]
    SoftHsmSetup {
        /// The file or directory that could not be created or written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The configuration is unusable.
    #[error("invalid HSM configuration: {field}: {reason}")]
    Config {
        /// The configuration field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A request argument is outside what the layer accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),

    /// The root key of `epoch` failed one of the behavioural checks of the
    /// start-up probe (design note §1.5.5): wrapped mode must not be used
    /// with it. `check` says, for an operator, what should have held.
    #[error("root key kms-root/{epoch} failed the check: {check}")]
    RootCheckFailed {
        /// The root's epoch (its `CKA_ID` is `kms-root/<epoch>`).
        epoch: u32,
        /// The check that failed, e.g. "unwrapping a blob as non-sensitive is refused".
        check: &'static str,
    },

    /// The token holds no root key (`kms-root/<epoch>`): root rotation adds
    /// a root after the highest existing one, so there must be one
    /// (`kms hsm init-root` makes the first).
    #[error(
        "the token has no root key (kms-root/<epoch>); create the first with `kms hsm init-root`"
    )]
    NoRoot,

    /// `init_root` on a token that already holds root keys (the epochs it
    /// can see, ascending): a second first root would bypass root
    /// rotation's ordering and variant rules. Add roots with `rotate_root`.
    #[error(
        "the token already holds root key(s) {}; add the next one with `kms hsm rotate-root`, which keeps the variant and the epoch order",
        .epochs.iter().map(|e| format!("kms-root/{e}")).collect::<Vec<_>>().join(", ")
    )]
    RootExists {
        /// The root epochs found, ascending.
        epochs: Vec<u32>,
    },

    /// Root rotation was asked of a variant-N root (no `CKA_WRAP_WITH_TRUSTED`;
    /// design note §1.5.1). Rotating means re-wrapping every key version
    /// under the new root inside the HSM (`C_WrapKey` of the unwrapped
    /// version), and variant N unwraps versions as non-extractable precisely
    /// so that they can never be wrapped again: its versions are tied to
    /// their root for good.
    #[error(
        "root key kms-root/{epoch} is variant N (no CKA_WRAP_WITH_TRUSTED): root rotation needs trusted wrapping, because re-wrapping a key version under a new root exports it from the HSM wrapped (C_WrapKey), and a variant-N root unwraps versions as non-extractable so that they never leave the HSM again"
    )]
    RootRotationUnsupported {
        /// The epoch of the active (highest) root.
        epoch: u32,
    },

    /// A wrapped key (a catalogue record's blob) does not unwrap under the
    /// root it names: it was tampered with, truncated, or belongs to another
    /// root. This is a corrupt catalogue record, never a lost device
    /// (SoftHSM2 reports a failed RFC 3394 integrity check as
    /// `CKR_GENERAL_ERROR`; design note §1.7 item 5). Nothing was created.
    #[error(
        "catalogue record corrupt: the wrapped key does not unwrap under root kms-root/{root_epoch}"
    )]
    CorruptWrappedKey {
        /// The epoch of the root the record names.
        root_epoch: u32,
    },

    /// A working key's holder session is gone (closed, or the module was
    /// re-initialized): its session objects died with it. Unwrap the blob
    /// again on a new `KeyHolder`.
    #[error("the working key's holder session is gone; unwrap it again")]
    WorkingKeyStale,

    /// The HSM refused the RSA-OAEP parameters of an import: it does not
    /// support `algorithm` (SoftHSM2 2.6.1 unwraps with
    /// `RSAES_OAEP_SHA_1` only; design note §1.3). Nothing was created.
    #[error("the HSM does not support the wrapping algorithm {algorithm} ({code})")]
    ImportAlgorithmUnsupported {
        /// The AWS KMS name of the algorithm, e.g. `RSAES_OAEP_SHA_256`.
        algorithm: &'static str,
        /// What the HSM answered.
        code: ReturnCode,
    },

    /// Imported key material did not decrypt under the import key pair, or
    /// is not a 32-byte key. Nothing was created.
    #[error("the encrypted key material does not decrypt to a 32-byte key under the import key")]
    ImportMaterialInvalid,
}

impl HsmError {
    /// True when the HSM itself is unreachable; callers map this to UNAVAILABLE.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. } | HsmError::PoolExhausted { .. }
        )
    }

    /// What recovery does about this error: only a PKCS#11 return code can
    /// mean a lost session or device.
    pub(crate) fn class(&self) -> FailureClass {
        match self {
            HsmError::Pkcs11 { code, .. } | HsmError::Unavailable { code, .. } => code.class(),
            _ => FailureClass::Other,
        }
    }

    /// The host's generator failed while `operation` needed randomness.
    pub(crate) fn host_rng(operation: Operation) -> HsmError {
        HsmError::RngFailed {
            operation,
            generator: RngSource::Host,
        }
    }
}

/// Converts a cryptoki error for `operation` into the layer's error,
/// classifying the return code by its variant.
pub(crate) fn from_cryptoki(operation: Operation, err: cryptoki::error::Error) -> HsmError {
    use cryptoki::error::{Error, RvError};
    match err {
        Error::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _) => HsmError::PinRejected,
        Error::Pkcs11(rv, _) => {
            let code = ReturnCode::new(rv);
            match code.class() {
                FailureClass::DeviceLost => HsmError::Unavailable { operation, code },
                // A lost session is retried whatever the call was.
                FailureClass::SessionLost => HsmError::Pkcs11 { operation, code },
                FailureClass::Other
                    if code.is_rng_failure() || operation == Operation::GenerateRandom =>
                {
                    HsmError::RngFailed {
                        operation,
                        generator: RngSource::Token(code),
                    }
                }
                FailureClass::Other => HsmError::Pkcs11 { operation, code },
            }
        }
        other => HsmError::Wrapper {
            operation,
            reason: other.to_string(),
        },
    }
}

/// The layer's result type.
pub type Result<T, E = HsmError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use cryptoki::context::Function;
    use cryptoki::error::{Error, RvError};

    use super::*;

    fn pkcs11(operation: Operation, rv: RvError) -> HsmError {
        from_cryptoki(operation, Error::Pkcs11(rv, Function::Encrypt))
    }

    #[test]
    fn device_errors_are_unavailable_and_session_errors_are_retried() {
        let gone = pkcs11(Operation::Encrypt, RvError::DeviceRemoved);
        assert!(gone.is_unavailable());
        assert_eq!(gone.class(), FailureClass::DeviceLost);
        let lost = pkcs11(Operation::Encrypt, RvError::SessionHandleInvalid);
        assert!(!lost.is_unavailable());
        assert_eq!(lost.class(), FailureClass::SessionLost);
        let pin = from_cryptoki(
            Operation::Login,
            Error::Pkcs11(RvError::PinIncorrect, Function::Login),
        );
        assert!(matches!(pin, HsmError::PinRejected));
    }

    /// The error each class of return code becomes, per variant.
    #[test]
    fn each_return_code_becomes_the_error_of_its_class() {
        for rv in [
            RvError::DeviceRemoved,
            RvError::DeviceError,
            RvError::DeviceMemory,
            RvError::TokenNotPresent,
            RvError::TokenNotRecognized,
            RvError::SlotIdInvalid,
            RvError::CryptokiNotInitialized,
            RvError::GeneralError,
        ] {
            for operation in [Operation::Encrypt, Operation::GenerateRandom] {
                let e = pkcs11(operation, rv);
                assert!(
                    matches!(e, HsmError::Unavailable { operation: o, .. } if o == operation),
                    "{rv:?}: {e:?}"
                );
                assert_eq!(e.class(), FailureClass::DeviceLost);
            }
        }
        for rv in [
            RvError::SessionHandleInvalid,
            RvError::SessionClosed,
            RvError::UserNotLoggedIn,
            RvError::ObjectHandleInvalid,
            RvError::KeyHandleInvalid,
        ] {
            for operation in [Operation::Sign, Operation::GenerateRandom] {
                let e = pkcs11(operation, rv);
                assert!(matches!(e, HsmError::Pkcs11 { .. }), "{rv:?}: {e:?}");
                assert_eq!(e.class(), FailureClass::SessionLost, "{rv:?}");
                assert!(!e.is_unavailable());
            }
        }
        for rv in [
            RvError::MechanismInvalid,
            RvError::KeyFunctionNotPermitted,
            RvError::FunctionFailed,
            RvError::VendorDefined(0x8000_0001),
        ] {
            let e = pkcs11(Operation::Encrypt, rv);
            assert!(matches!(e, HsmError::Pkcs11 { .. }), "{rv:?}: {e:?}");
            assert_eq!(e.class(), FailureClass::Other);
            assert!(!e.is_unavailable());
        }
        for rv in [RvError::PinIncorrect, RvError::PinLocked] {
            assert!(matches!(
                pkcs11(Operation::Login, rv),
                HsmError::PinRejected
            ));
        }
    }

    #[test]
    fn rng_failures_are_their_own_variant() {
        // CKR_RANDOM_* from any call, and any other failure of C_GenerateRandom.
        for (operation, rv) in [
            (Operation::GenerateRandom, RvError::RandomNoRng),
            (Operation::GenerateKey, RvError::RandomNoRng),
            (Operation::GenerateRandom, RvError::RandomSeedNotSupported),
            (Operation::GenerateRandom, RvError::FunctionFailed),
        ] {
            let e = pkcs11(operation, rv);
            match &e {
                HsmError::RngFailed {
                    operation: o,
                    generator: RngSource::Token(code),
                } => {
                    assert_eq!(*o, operation);
                    assert_eq!(*code, ReturnCode::new(rv));
                }
                other => panic!("{rv:?} in {operation}: {other:?}"),
            }
            assert_eq!(e.class(), FailureClass::Other);
            assert!(!e.is_unavailable());
        }
        let e = pkcs11(Operation::GenerateRandom, RvError::RandomNoRng);
        assert_eq!(
            e.to_string(),
            "random number generation failed in C_GenerateRandom (token generator: CKR_RANDOM_NO_RNG)"
        );
        let host = HsmError::host_rng(Operation::Encrypt);
        assert_eq!(
            host.to_string(),
            "random number generation failed in C_Encrypt (host system generator)"
        );
    }

    #[test]
    fn token_not_found_names_each_slot_and_why_it_was_not_taken() {
        let err = HsmError::TokenNotFound {
            label: "kms".into(),
            module: PathBuf::from("/m.so"),
            examined: vec![
                ExaminedSlot {
                    slot_id: 3,
                    rejection: SlotRejection::LabelDiffers {
                        label: "other".into(),
                    },
                },
                ExaminedSlot {
                    slot_id: 7,
                    rejection: SlotRejection::NotInitialized,
                },
                ExaminedSlot {
                    slot_id: 9,
                    rejection: SlotRejection::InfoUnreadable(Box::new(pkcs11(
                        Operation::TokenInfo,
                        RvError::TokenNotRecognized,
                    ))),
                },
            ],
        };
        assert_eq!(
            err.to_string(),
            "no initialized token with label \"kms\" in PKCS#11 module /m.so (examined \
             slot 3: label is \"other\"; slot 7: token not initialized; \
             slot 9: token info unreadable: the HSM is unavailable \
             (C_GetTokenInfo: CKR_TOKEN_NOT_RECOGNIZED))"
        );
        let none = HsmError::TokenNotFound {
            label: "kms".into(),
            module: PathBuf::from("/m.so"),
            examined: Vec::new(),
        };
        assert_eq!(
            none.to_string(),
            "no initialized token with label \"kms\" in PKCS#11 module /m.so \
             (the module lists no slot with a token)"
        );
    }

    #[test]
    fn messages_name_the_operation_and_the_ckr_code() {
        let e = pkcs11(Operation::Encrypt, RvError::KeyFunctionNotPermitted);
        assert_eq!(
            e.to_string(),
            "C_Encrypt failed: CKR_KEY_FUNCTION_NOT_PERMITTED"
        );
        let e = pkcs11(Operation::Decrypt, RvError::DeviceRemoved);
        assert_eq!(
            e.to_string(),
            "the HSM is unavailable (C_Decrypt: CKR_DEVICE_REMOVED)"
        );
    }
}
