//! Finding root keys on a token and reporting what the token says about
//! them (for `kms hsm roots`, operators and tests). Never reads `CKA_VALUE`
//! except to report that it is *not* readable.

use std::path::Path;

use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{CKA_UNWRAP_TEMPLATE, CKA_WRAP_TEMPLATE};

use super::root_id;
use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::hsm::RootInfo;
use crate::objects::ObjectId;
use crate::raw::RawModule;

/// What the token reports about the root at `handle` (`KeyHolder::root_info`).
pub(crate) fn root_info(
    module_path: &Path,
    session: &Session,
    handle: ObjectHandle,
) -> Result<RootInfo> {
    const FLAGS: [AttributeType; 14] = [
        AttributeType::Token,
        AttributeType::Private,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::Trusted,
        AttributeType::Modifiable,
        AttributeType::Copyable,
        AttributeType::Wrap,
        AttributeType::Unwrap,
        AttributeType::Encrypt,
        AttributeType::Decrypt,
        AttributeType::Sign,
        AttributeType::Verify,
        AttributeType::Derive,
    ];
    let read = session
        .get_attributes(handle, &FLAGS)
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
    let flags = read.iter().filter_map(describe).collect();
    let mechanisms = session
        .get_attributes(handle, &[AttributeType::AllowedMechanisms])
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
    let only_aes_key_wrap = mechanisms
        == [Attribute::AllowedMechanisms(vec![
            MechanismType::AES_KEY_WRAP,
        ])];
    let value_readable = matches!(
        session.get_attributes(handle, &[AttributeType::Value]),
        Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(bytes) if !bytes.is_empty()))
    );
    let raw = RawModule::load(module_path)?;
    let template = |kind| -> Result<Option<Vec<(&'static str, bool)>>> {
        Ok(raw
            .read_template(session, handle, kind)?
            .map(|attributes| attributes.iter().filter_map(describe).collect()))
    };
    Ok(RootInfo {
        flags,
        wrap_template: template(CKA_WRAP_TEMPLATE)?,
        unwrap_template: template(CKA_UNWRAP_TEMPLATE)?,
        only_aes_key_wrap,
        value_readable,
    })
}

/// An attribute as an operator reads it: boolean attributes by name and
/// value; `CKA_CLASS=CKO_SECRET_KEY` as a named `true`; others `None`.
fn describe(attribute: &Attribute) -> Option<(&'static str, bool)> {
    Some(match attribute {
        Attribute::Class(class) => (
            "CKA_CLASS=CKO_SECRET_KEY",
            *class == ObjectClass::SECRET_KEY,
        ),
        Attribute::Token(v) => ("CKA_TOKEN", *v),
        Attribute::Private(v) => ("CKA_PRIVATE", *v),
        Attribute::Sensitive(v) => ("CKA_SENSITIVE", *v),
        Attribute::Extractable(v) => ("CKA_EXTRACTABLE", *v),
        Attribute::Trusted(v) => ("CKA_TRUSTED", *v),
        Attribute::WrapWithTrusted(v) => ("CKA_WRAP_WITH_TRUSTED", *v),
        Attribute::Modifiable(v) => ("CKA_MODIFIABLE", *v),
        Attribute::Copyable(v) => ("CKA_COPYABLE", *v),
        Attribute::Wrap(v) => ("CKA_WRAP", *v),
        Attribute::Unwrap(v) => ("CKA_UNWRAP", *v),
        Attribute::Encrypt(v) => ("CKA_ENCRYPT", *v),
        Attribute::Decrypt(v) => ("CKA_DECRYPT", *v),
        Attribute::Sign(v) => ("CKA_SIGN", *v),
        Attribute::Verify(v) => ("CKA_VERIFY", *v),
        Attribute::Derive(v) => ("CKA_DERIVE", *v),
        _ => return None,
    })
}

/// Every secret key with `CKA_ID` = `id`.
pub(super) fn find_by_id(session: &Session, id: &ObjectId) -> Result<Vec<ObjectHandle>> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(id.as_bytes().to_vec()),
        ])
        .map_err(|e| from_cryptoki(Operation::FindObjects, e))
}

/// The epochs of every secret key whose `CKA_ID` is `kms-root/<decimal>`, ascending.
pub(crate) fn root_epochs(session: &Session) -> Result<Vec<u32>> {
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .map_err(|e| from_cryptoki(Operation::FindObjects, e))?;
    let mut epochs = Vec::new();
    for key in keys {
        let ids = session
            .get_attributes(key, &[AttributeType::Id])
            .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
        for id in ids {
            if let Attribute::Id(bytes) = id {
                let epoch = bytes
                    .strip_prefix(b"kms-root/")
                    .and_then(|digits| std::str::from_utf8(digits).ok())
                    .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|digits| digits.parse::<u32>().ok());
                epochs.extend(epoch);
            }
        }
    }
    epochs.sort_unstable();
    epochs.dedup();
    Ok(epochs)
}

/// The handle of the root of `epoch` on `session`.
///
/// # Errors
/// `ObjectNotFound`/`ObjectAmbiguous` for a missing or duplicated root; the
/// PKCS#11 error of the search.
pub(crate) fn find_root(session: &Session, epoch: u32) -> Result<ObjectHandle> {
    let id = root_id(epoch);
    match find_by_id(session, &id)?.as_slice() {
        [handle] => Ok(*handle),
        [] => Err(HsmError::ObjectNotFound { id: id.to_string() }),
        many => Err(HsmError::ObjectAmbiguous {
            id: id.to_string(),
            count: many.len(),
        }),
    }
}
