//! Wrapped key versions: the one attribute table from which a version's
//! generation template, its unwrap template and its read-back check derive,
//! and the session-level calls that generate, wrap, unwrap and re-wrap
//! versions under a root (design note `hierarchy-and-cluster.md` §1.5.1,
//! §1.5.3, §1.5.4, §1.7 items 4-5).
//!
//! A version lives in the catalogue only as a 40-byte `CKM_AES_KEY_WRAP`
//! (RFC 3394) blob under a root, and in the HSM only as a private,
//! sensitive session object. Unwrapped keys are never `CKA_LOCAL`,
//! `ALWAYS_SENSITIVE` or `NEVER_EXTRACTABLE` (PKCS#11 `C_UnwrapKey`), so the
//! table does not ask for them.
//!
//! What it must never do: read `CKA_VALUE`, keep a working key that did not
//! read back as the table says, or report a blob that fails to unwrap as a
//! lost device.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::error::{HsmError, Operation, Result, from_cryptoki};
use crate::objects::KeyPurpose;
use crate::root::RootVariant;

/// Length of a wrapped 32-byte key under `CKM_AES_KEY_WRAP`, in bytes:
/// the key plus RFC 3394's 8-byte integrity block.
pub const WRAPPED_KEY_LEN: usize = 40;

/// The mechanism a blob was wrapped with, recorded in every catalogue
/// record so that other mechanisms can be added later (design note §1.5.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WrapMechanism {
    /// `CKM_AES_KEY_WRAP` (0x2109), RFC 3394 without padding.
    AesKeyWrap,
}

impl WrapMechanism {
    /// The PKCS#11 mechanism number (`CKM_AES_KEY_WRAP` = 0x2109).
    pub fn code(self) -> u64 {
        match self {
            WrapMechanism::AesKeyWrap => 0x2109,
        }
    }

    /// The mechanism with PKCS#11 number `code`, if the layer knows it.
    pub fn from_code(code: u64) -> Option<WrapMechanism> {
        match code {
            0x2109 => Some(WrapMechanism::AesKeyWrap),
            _ => None,
        }
    }
}

/// A key version wrapped under a root: what the catalogue stores. Not
/// secret (only the root can unwrap it, and only into the HSM), but not
/// authenticated to a key or version either: the catalogue MACs
/// `mac_input` with an HSM HMAC key (design note §1.5.2). `Debug` shows
/// the blob's length only: blob + root = a usable key for any PIN holder,
/// so blobs belong in the catalogue, not in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The epoch of the root it is wrapped under (`kms-root/<epoch>`).
    pub root_epoch: u32,
    /// The wrapping mechanism.
    pub mechanism: WrapMechanism,
    /// The wrapped key, `WRAPPED_KEY_LEN` bytes for `AesKeyWrap`.
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("root_epoch", &self.root_epoch)
            .field("mechanism", &self.mechanism)
            .field("blob", &format_args!("[{} bytes]", self.blob.len()))
            .finish()
    }
}

/// Domain separation for `WrappedKey::mac_input`.
const MAC_INPUT_CONTEXT: &[u8] = b"kms wrapped key record v1\0";

impl WrappedKey {
    /// The bytes the catalogue's integrity HMAC covers, binding the blob to
    /// `key_id` and `version` (design note §1.5.2: AES-KW has no associated
    /// data, so without it a blob could be moved to another key or version):
    ///
    /// `"kms wrapped key record v1\0" ‖ u32 len ‖ key_id ‖ u32 version ‖
    /// u32 root_epoch ‖ u64 mechanism ‖ u32 len ‖ blob`, integers big-endian.
    ///
    /// # Errors
    /// `InvalidArgument` if `key_id` or the blob is longer than `u32::MAX` bytes.
    pub fn mac_input(&self, key_id: &[u8], version: u32) -> Result<Vec<u8>> {
        let len = |bytes: &[u8]| {
            u32::try_from(bytes.len())
                .map(u32::to_be_bytes)
                .map_err(|_| HsmError::InvalidArgument("MAC input field longer than 4 GiB"))
        };
        let mut out =
            Vec::with_capacity(MAC_INPUT_CONTEXT.len() + 28 + key_id.len() + self.blob.len());
        out.extend_from_slice(MAC_INPUT_CONTEXT);
        out.extend_from_slice(&len(key_id)?);
        out.extend_from_slice(key_id);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&self.root_epoch.to_be_bytes());
        out.extend_from_slice(&self.mechanism.code().to_be_bytes());
        out.extend_from_slice(&len(&self.blob)?);
        out.extend_from_slice(&self.blob);
        Ok(out)
    }
}

/// One row of the version table.
struct VersionRow {
    value: Attribute,
    name: &'static str,
    /// In the generation template and its read-back only. SoftHSM2 refuses
    /// `CKA_VALUE_LEN` in an AES unwrap template (§1.3), and then reports
    /// `CKA_VALUE_LEN=0` for the unwrapped key (seen on 2.6.1); the length
    /// of a working key is guaranteed instead by the blob's (40 bytes under
    /// RFC 3394 = a 32-byte key, checked before unwrapping).
    generate_only: bool,
}

fn row(value: Attribute, name: &'static str) -> VersionRow {
    VersionRow {
        value,
        name,
        generate_only: false,
    }
}

/// THE version table (design note §1.5.1, "Version key"): the attributes
/// every working key of `purpose` under a root of `variant` carries. Every
/// value of the root's `CKA_UNWRAP_TEMPLATE` appears here with the same
/// value (SoftHSM2 checks rather than merges). `CKA_MODIFIABLE` is last
/// (SoftHSM2 bug #707, §1.7 item 5).
fn version_rows(purpose: KeyPurpose, variant: RootVariant) -> Vec<VersionRow> {
    let (key_type, crypt, sign) = match purpose {
        KeyPurpose::Kek => (KeyType::AES, true, false),
        KeyPurpose::Hmac => (KeyType::GENERIC_SECRET, false, true),
    };
    let mut rows = vec![
        row(Attribute::Class(ObjectClass::SECRET_KEY), "CKA_CLASS"),
        row(Attribute::KeyType(key_type), "CKA_KEY_TYPE"),
        VersionRow {
            value: Attribute::ValueLen(32.into()),
            name: "CKA_VALUE_LEN",
            generate_only: true,
        },
        row(Attribute::Token(false), "CKA_TOKEN"),
        row(Attribute::Private(true), "CKA_PRIVATE"),
        row(Attribute::Sensitive(true), "CKA_SENSITIVE"),
    ];
    match variant {
        RootVariant::Trusted => rows.extend([
            row(Attribute::Extractable(true), "CKA_EXTRACTABLE"),
            row(Attribute::WrapWithTrusted(true), "CKA_WRAP_WITH_TRUSTED"),
        ]),
        RootVariant::NonExtractable => {
            rows.push(row(Attribute::Extractable(false), "CKA_EXTRACTABLE"));
        }
    }
    rows.extend([
        row(Attribute::Encrypt(crypt), "CKA_ENCRYPT"),
        row(Attribute::Decrypt(crypt), "CKA_DECRYPT"),
        row(Attribute::Sign(sign), "CKA_SIGN"),
        row(Attribute::Verify(sign), "CKA_VERIFY"),
        row(Attribute::Wrap(false), "CKA_WRAP"),
        row(Attribute::Unwrap(false), "CKA_UNWRAP"),
        row(Attribute::Derive(false), "CKA_DERIVE"),
        row(Attribute::Copyable(false), "CKA_COPYABLE"),
        row(Attribute::Modifiable(false), "CKA_MODIFIABLE"),
    ]);
    rows
}

/// Which call a template is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// `C_GenerateKey`.
    Generate,
    /// `C_UnwrapKey`.
    Unwrap,
}

/// The template for `stage`, optionally with one attribute replaced by
/// `altered` (the probe's attacks). In variant N a freshly generated version
/// must be extractable once, to be wrapped; it is destroyed right after
/// (`generate_version`) and only its non-extractable unwrapped copy is used.
pub(crate) fn template(
    purpose: KeyPurpose,
    variant: RootVariant,
    stage: Stage,
    altered: Option<&Attribute>,
) -> Vec<Attribute> {
    version_rows(purpose, variant)
        .into_iter()
        .filter(|r| stage == Stage::Generate || !r.generate_only)
        .map(|r| {
            let kind = r.value.attribute_type();
            match altered {
                Some(a) if a.attribute_type() == kind => a.clone(),
                _ if stage == Stage::Generate
                    && variant == RootVariant::NonExtractable
                    && kind == AttributeType::Extractable =>
                {
                    Attribute::Extractable(true)
                }
                _ => r.value,
            }
        })
        .collect()
}

/// `C_GenerateKey` of a version as a session object (no read-back).
pub(crate) fn generate_raw(
    session: &Session,
    purpose: KeyPurpose,
    variant: RootVariant,
) -> Result<ObjectHandle> {
    let mechanism = match purpose {
        KeyPurpose::Kek => Mechanism::AesKeyGen,
        KeyPurpose::Hmac => Mechanism::GenericSecretKeyGen,
    };
    session
        .generate_key(
            &mechanism,
            &template(purpose, variant, Stage::Generate, None),
        )
        .map_err(|e| from_cryptoki(Operation::GenerateKey, e))
}

/// `C_UnwrapKey(CKM_AES_KEY_WRAP, root, blob)` with the unwrap template
/// (optionally altered), unmapped: the probe only asks whether it worked.
pub(crate) fn unwrap_raw(
    session: &Session,
    root: ObjectHandle,
    blob: &[u8],
    purpose: KeyPurpose,
    variant: RootVariant,
    altered: Option<&Attribute>,
) -> cryptoki::error::Result<ObjectHandle> {
    session.unwrap_key(
        &Mechanism::AesKeyWrap,
        root,
        blob,
        &template(purpose, variant, Stage::Unwrap, altered),
    )
}

/// Reads back every row of the table for `stage` on `handle` (what that
/// stage's template set), and that `CKA_VALUE` is not readable.
///
/// # Errors
/// `TemplateViolation` naming the first attribute that is missing or
/// differs (or `CKA_VALUE` if the value came back); the PKCS#11 error of
/// `C_GetAttributeValue`.
pub(crate) fn check_working(
    session: &Session,
    handle: ObjectHandle,
    purpose: KeyPurpose,
    variant: RootVariant,
    stage: Stage,
) -> Result<()> {
    let rows: Vec<VersionRow> = version_rows(purpose, variant)
        .into_iter()
        .filter(|r| stage == Stage::Generate || !r.generate_only)
        .collect();
    let types: Vec<AttributeType> = rows.iter().map(|r| r.value.attribute_type()).collect();
    let read_back = session
        .get_attributes(handle, &types)
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
    let violation = |attribute: &'static str, expected: &'static str| HsmError::TemplateViolation {
        id: "working key".into(),
        attribute,
        expected,
    };
    for required in &rows {
        let kind = required.value.attribute_type();
        if read_back.iter().find(|a| a.attribute_type() == kind) != Some(&required.value) {
            return Err(violation(
                required.name,
                "the value of the version table (design note §1.5.1)",
            ));
        }
    }
    // cryptoki drops attributes the token refuses (CKR_ATTRIBUTE_SENSITIVE).
    let value = session.get_attributes(handle, &[AttributeType::Value]);
    if matches!(value, Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(bytes) if !bytes.is_empty())))
    {
        return Err(violation("CKA_VALUE", "not readable"));
    }
    Ok(())
}

/// Generates a version of `purpose` as a session object on `session`,
/// wraps it under `root` (of `epoch`) and returns the blob and the live
/// working key (design note §1.5.3 "Create"). In variant T the generated
/// object is the working key; in variant N it is destroyed after wrapping
/// and replaced by its non-extractable unwrapped copy. Nothing is left on
/// the token on error.
pub(crate) fn generate_version(
    session: &Session,
    root: ObjectHandle,
    epoch: u32,
    purpose: KeyPurpose,
    variant: RootVariant,
) -> Result<(WrappedKey, ObjectHandle)> {
    let generated = generate_raw(session, purpose, variant)?;
    let wrapped = (|| {
        if variant == RootVariant::Trusted {
            check_working(session, generated, purpose, variant, Stage::Generate)?;
        }
        wrap(session, root, epoch, generated)
    })();
    let wrapped = match wrapped {
        Ok(wrapped) => wrapped,
        Err(e) => {
            let _ = session.destroy_object(generated);
            return Err(e);
        }
    };
    match variant {
        RootVariant::Trusted => Ok((wrapped, generated)),
        RootVariant::NonExtractable => {
            session
                .destroy_object(generated)
                .map_err(|e| from_cryptoki(Operation::DestroyObject, e))?;
            let working = unwrap_version(session, root, &wrapped, purpose, variant)?;
            Ok((wrapped, working))
        }
    }
}

/// `C_WrapKey(CKM_AES_KEY_WRAP, root, key)`, checking the blob length.
pub(crate) fn wrap(
    session: &Session,
    root: ObjectHandle,
    epoch: u32,
    key: ObjectHandle,
) -> Result<WrappedKey> {
    let blob = session
        .wrap_key(&Mechanism::AesKeyWrap, root, key)
        .map_err(|e| from_cryptoki(Operation::WrapKey, e))?;
    if blob.len() != WRAPPED_KEY_LEN {
        return Err(HsmError::Wrapper {
            operation: Operation::WrapKey,
            reason: format!(
                "CKM_AES_KEY_WRAP returned {} bytes, not {WRAPPED_KEY_LEN}",
                blob.len()
            ),
        });
    }
    Ok(WrappedKey {
        root_epoch: epoch,
        mechanism: WrapMechanism::AesKeyWrap,
        blob,
    })
}

/// Unwraps `wrapped` under `root` into a working session object with the
/// table's unwrap template, reads it back and refuses (destroying it) on
/// any mismatch (design note §1.5.1 "Working copy on first use").
///
/// # Errors
/// `CorruptWrappedKey` for a blob of the wrong length or one the token
/// rejects as invalid (SoftHSM2: `CKR_GENERAL_ERROR`; others
/// `CKR_WRAPPED_KEY_INVALID`/`_LEN_RANGE`); `TemplateViolation` on a
/// read-back mismatch; otherwise the classified PKCS#11 error.
pub(crate) fn unwrap_version(
    session: &Session,
    root: ObjectHandle,
    wrapped: &WrappedKey,
    purpose: KeyPurpose,
    variant: RootVariant,
) -> Result<ObjectHandle> {
    let corrupt = HsmError::CorruptWrappedKey {
        root_epoch: wrapped.root_epoch,
    };
    if wrapped.mechanism != WrapMechanism::AesKeyWrap || wrapped.blob.len() != WRAPPED_KEY_LEN {
        return Err(corrupt);
    }
    let handle = unwrap_raw(session, root, &wrapped.blob, purpose, variant, None)
        .map_err(|e| unwrap_error(e, wrapped.root_epoch))?;
    if let Err(e) = check_working(session, handle, purpose, variant, Stage::Unwrap) {
        let _ = session.destroy_object(handle);
        return Err(e);
    }
    Ok(handle)
}

/// Maps a failed `C_UnwrapKey`: integrity and length failures of the blob
/// are a corrupt catalogue record, never a lost device (SoftHSM2 answers a
/// failed RFC 3394 check with `CKR_GENERAL_ERROR`, which elsewhere means
/// the device is gone; design note §1.7 item 5). Session losses keep their
/// class.
fn unwrap_error(error: cryptoki::error::Error, root_epoch: u32) -> HsmError {
    match error {
        cryptoki::error::Error::Pkcs11(
            RvError::GeneralError
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange,
            _,
        ) => HsmError::CorruptWrappedKey { root_epoch },
        other => from_cryptoki(Operation::UnwrapKey, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwrap_templates_hold_every_root_unwrap_template_value_and_end_with_modifiable() {
        for variant in [RootVariant::Trusted, RootVariant::NonExtractable] {
            for purpose in [KeyPurpose::Kek, KeyPurpose::Hmac] {
                let t = template(purpose, variant, Stage::Unwrap, None);
                for forced in crate::root::unwrap_template(variant) {
                    assert!(
                        t.contains(&forced),
                        "{variant:?} {purpose:?} lacks {forced:?}"
                    );
                }
                assert_eq!(t.last(), Some(&Attribute::Modifiable(false)));
                assert!(
                    t.iter()
                        .all(|a| a.attribute_type() != AttributeType::ValueLen),
                    "SoftHSM2 refuses CKA_VALUE_LEN in an AES unwrap template"
                );
                let g = template(purpose, variant, Stage::Generate, None);
                assert!(g.contains(&Attribute::ValueLen(32.into())));
                assert!(g.contains(&Attribute::Extractable(true)), "wrappable once");
            }
        }
        let altered = template(
            KeyPurpose::Kek,
            RootVariant::Trusted,
            Stage::Unwrap,
            Some(&Attribute::Sensitive(false)),
        );
        assert!(altered.contains(&Attribute::Sensitive(false)));
        assert!(!altered.contains(&Attribute::Sensitive(true)));
    }

    /// Golden vector: the catalogue MAC input is a disk format.
    #[test]
    fn mac_input_golden_vector() {
        let wrapped = WrappedKey {
            root_epoch: 7,
            mechanism: WrapMechanism::AesKeyWrap,
            blob: vec![0xAB; 3],
        };
        let input = wrapped.mac_input(b"key-1", 2).expect("mac input");
        assert_eq!(
            hex::encode(input),
            concat!(
                "6b6d732077726170706564206b6579207265636f7264207631", // "kms wrapped key record v1"
                "00",
                "00000005",
                "6b65792d31",
                "00000002",
                "00000007",
                "0000000000002109",
                "00000003",
                "ababab"
            )
        );
        assert_eq!(
            WrapMechanism::from_code(0x2109),
            Some(WrapMechanism::AesKeyWrap)
        );
        assert_eq!(WrapMechanism::from_code(0x210A), None);
        assert_eq!(
            format!("{wrapped:?}"),
            "WrappedKey { root_epoch: 7, mechanism: AesKeyWrap, blob: [3 bytes] }"
        );
    }

    #[test]
    fn general_error_on_unwrap_is_a_corrupt_record_not_a_lost_device() {
        use cryptoki::context::Function;
        for rv in [
            RvError::GeneralError,
            RvError::WrappedKeyInvalid,
            RvError::WrappedKeyLenRange,
        ] {
            let e = unwrap_error(cryptoki::error::Error::Pkcs11(rv, Function::UnwrapKey), 3);
            assert!(
                matches!(e, HsmError::CorruptWrappedKey { root_epoch: 3 }),
                "{rv:?}: {e:?}"
            );
            assert!(!e.is_unavailable());
            assert_eq!(e.class(), crate::return_code::FailureClass::Other);
        }
        let lost = unwrap_error(
            cryptoki::error::Error::Pkcs11(RvError::SessionHandleInvalid, Function::UnwrapKey),
            3,
        );
        assert_eq!(lost.class(), crate::return_code::FailureClass::SessionLost);
    }
}
