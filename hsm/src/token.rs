//! Finding a token by label, probing its mechanisms, and initializing new
//! tokens (for the embedded SoftHSM2 default and the test harness).

use std::path::Path;

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::MechanismType;
use cryptoki::session::UserType;
use cryptoki::slot::Slot;

use crate::config::Pin;
use crate::error::{ExaminedSlot, HsmError, Operation, Result, SlotRejection, from_cryptoki};
use crate::token_info;

/// Finds the one initialized token whose label is `label`. Slots are looked up
/// afresh each time because slot ids are not stable across restarts.
///
/// Every slot with a token is examined; a slot that is not taken is recorded
/// with the reason (`SlotRejection`), so that `TokenNotFound` says what was
/// there instead of hiding a token whose information could not be read.
/// `module` must be the path of the library `context` was created from.
pub(crate) fn find_token(context: &Pkcs11, label: &str, module: &Path) -> Result<Slot> {
    let slots = context
        .get_slots_with_token()
        .map_err(|e| from_cryptoki(Operation::ListSlots, e))?;
    let mut found = Vec::new();
    let mut examined = Vec::new();
    for slot in slots {
        let rejection = match token_info::read(context, module, slot) {
            Ok(token) if !token.initialized => SlotRejection::NotInitialized,
            Ok(token) if token.label == label => {
                found.push(slot);
                continue;
            }
            Ok(token) => SlotRejection::LabelDiffers { label: token.label },
            Err(cause) => SlotRejection::InfoUnreadable(Box::new(cause)),
        };
        examined.push(ExaminedSlot {
            slot_id: slot.id(),
            rejection,
        });
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(HsmError::TokenNotFound {
            label: label.to_owned(),
            module: module.to_owned(),
            examined,
        }),
        many => Err(HsmError::TokenLabelAmbiguous {
            label: label.to_owned(),
            count: many.len(),
        }),
    }
}

/// A mechanism the service needs, and what it needs it for.
struct Requirement {
    mechanism: MechanismType,
    name: &'static str,
    capability: &'static str,
    check: fn(&cryptoki::mechanism::MechanismInfo) -> bool,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        mechanism: MechanismType::AES_KEY_GEN,
        name: "CKM_AES_KEY_GEN",
        capability: "generate 256-bit AES keys",
        // PKCS#11 sizes AES keys in bytes; some tokens report bits.
        check: |info| {
            let sizes = info.min_key_size()..=info.max_key_size();
            info.generate() && (sizes.contains(&32) || sizes.contains(&256))
        },
    },
    Requirement {
        mechanism: MechanismType::AES_GCM,
        name: "CKM_AES_GCM",
        capability: "encrypt and decrypt",
        check: |info| info.encrypt() && info.decrypt(),
    },
    Requirement {
        mechanism: MechanismType::GENERIC_SECRET_KEY_GEN,
        name: "CKM_GENERIC_SECRET_KEY_GEN",
        capability: "generate HMAC keys",
        check: |info| info.generate(),
    },
    Requirement {
        mechanism: MechanismType::SHA256_HMAC,
        name: "CKM_SHA256_HMAC",
        capability: "sign and verify",
        check: |info| info.sign() && info.verify(),
    },
];

/// Checks that the token offers every mechanism the service uses, and says
/// which one is missing otherwise.
pub(crate) fn probe_mechanisms(context: &Pkcs11, slot: Slot, label: &str) -> Result<()> {
    let available = context
        .get_mechanism_list(slot)
        .map_err(|e| from_cryptoki(Operation::MechanismList, e))?;
    for requirement in REQUIREMENTS {
        let missing = || HsmError::MechanismMissing {
            label: label.to_owned(),
            mechanism: requirement.name,
            capability: requirement.capability,
        };
        if !available.contains(&requirement.mechanism) {
            return Err(missing());
        }
        let info = context
            .get_mechanism_info(slot, requirement.mechanism)
            .map_err(|e| from_cryptoki(Operation::MechanismList, e))?;
        let ok = (requirement.check)(&info);
        if !ok {
            return Err(missing());
        }
    }
    Ok(())
}

/// Whether an initialized token labelled `label` exists in the module
/// (loading the module if this process has not yet).
///
/// # Errors
/// `ModuleLoad`, `TokenLabelAmbiguous`, or the PKCS#11 error of listing slots.
pub fn token_exists(module_path: &Path, label: &str) -> Result<bool> {
    let module = crate::module::module(module_path)?;
    let state = module.read();
    match find_token(state.context()?, label, module_path) {
        Ok(_) => Ok(true),
        Err(HsmError::TokenNotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Initializes a fresh token in the first slot without one, sets the SO and
/// user PINs, and returns nothing secret. Used by `kms serve --dev` and the
/// test harness; never on a configured production HSM.
///
/// # Errors
/// `Config` if the label is not 1 to 32 bytes, is already taken, or the
/// module offers no uninitialized token; `ModuleLoad`; or the PKCS#11 error
/// of the call that failed (C_InitToken, C_Login as SO, C_InitPIN).
pub fn initialize_token(
    module_path: &Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<()> {
    if label.is_empty() || label.len() > 32 {
        return Err(HsmError::Config {
            field: "token_label",
            reason: "must be 1 to 32 bytes".into(),
        });
    }
    let module = crate::module::module(module_path)?;
    let state = module.read();
    let context = state.context()?;
    if find_token(context, label, module_path).is_ok() {
        return Err(HsmError::Config {
            field: "token_label",
            reason: format!("a token labelled {label:?} already exists"),
        });
    }
    let slots = context
        .get_slots_with_token()
        .map_err(|e| from_cryptoki(Operation::ListSlots, e))?;
    let mut free = None;
    for slot in slots {
        match token_info::read(context, module_path, slot) {
            Ok(token) if !token.initialized => {
                free = Some(slot);
                break;
            }
            Ok(_) => {}
            // Not a candidate (e.g. removed after listing), but not silently.
            Err(error) => {
                tracing::warn!(slot = slot.id(), %error, "skipping a slot whose token info is unreadable");
            }
        }
    }
    let slot = free.ok_or(HsmError::Config {
        field: "module_path",
        reason: "the module offers no uninitialized token to set up".into(),
    })?;
    context
        .init_token(slot, &so_pin.to_auth_pin(), label)
        .map_err(|e| from_cryptoki(Operation::InitToken, e))?;
    let session = context
        .open_rw_session(slot)
        .map_err(|e| from_cryptoki(Operation::OpenSession, e))?;
    session
        .login(UserType::So, Some(&so_pin.to_auth_pin()))
        .map_err(|e| from_cryptoki(Operation::Login, e))?;
    session
        .init_pin(&user_pin.to_auth_pin())
        .map_err(|e| from_cryptoki(Operation::InitPin, e))?;
    let _ = session.logout();
    Ok(())
}
