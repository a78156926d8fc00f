//! Key objects: their ids, what they are for, and the one attribute table
//! from which both the generation template and its read-back check derive.
//!
//! SoftHSM2's defaults are unsafe (a non-private token key is stored in
//! plaintext on disk even when sensitive), so every attribute that matters is
//! set explicitly, and after generation every attribute that was set is read
//! back and compared, together with the ones only the token can set
//! (ALWAYS_SENSITIVE, NEVER_EXTRACTABLE, LOCAL: proof that the key was born in
//! the HSM and never left it). A token that silently ignored part of the
//! template is refused. Nothing here ever reads CKA_VALUE.

use std::fmt;

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};

use crate::error::{HsmError, Result};

/// The CKA_ID of a key object. The service names objects after the key
/// version they hold (e.g. `key-…/v3`); it is not secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectId(Vec<u8>);

impl ObjectId {
    /// An id of 1 to 128 bytes.
    ///
    /// # Errors
    /// `HsmError::InvalidArgument` if `id` is empty or longer than 128 bytes.
    pub fn new(id: impl Into<Vec<u8>>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() || id.len() > 128 {
            return Err(HsmError::InvalidArgument(
                "object id must be 1 to 128 bytes",
            ));
        }
        Ok(ObjectId(id))
    }

    /// An id the layer itself built and knows to be 1 to 128 bytes long.
    pub(crate) fn from_trusted(id: Vec<u8>) -> Self {
        debug_assert!(!id.is_empty() && id.len() <= 128);
        ObjectId(id)
    }

    /// The raw CKA_ID bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if text.chars().all(|c| c.is_ascii_graphic()) => f.write_str(text),
            _ => write!(f, "0x{}", hex::encode(&self.0)),
        }
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// What a key object is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPurpose {
    /// An AES-256 key-encrypting key used with AES-GCM.
    Kek,
    /// An HMAC-SHA256 key (audit checkpoints).
    Hmac,
}

/// Who gives an attribute its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Set in the `C_GenerateKey` template.
    Template,
    /// Computed by the token; only read back.
    Token,
}

/// One row of the attribute table: the value a key object must carry.
#[derive(Debug, Clone)]
pub(crate) struct KeyAttribute {
    /// The attribute with its required value.
    value: Attribute,
    /// The PKCS#11 name, for errors and operators.
    name: &'static str,
    /// The required value as an operator reads it (for errors).
    expected: &'static str,
    source: Source,
}

fn flag(value: Attribute, name: &'static str, source: Source) -> KeyAttribute {
    let expected = match bool_value(&value) {
        Some(true) => "true",
        Some(false) => "false",
        // Only boolean attributes are built with `flag`.
        None => "a boolean",
    };
    KeyAttribute {
        value,
        name,
        expected,
        source,
    }
}

/// THE table: every attribute a key object of `purpose` named `id` must
/// carry. The template is its `Template` rows; the read-back check is all of
/// its rows.
pub(crate) fn key_attributes(purpose: KeyPurpose, id: &ObjectId) -> Vec<KeyAttribute> {
    use Source::{Template, Token};
    let (key_type, key_type_name) = match purpose {
        KeyPurpose::Kek => (KeyType::AES, "CKK_AES"),
        KeyPurpose::Hmac => (KeyType::GENERIC_SECRET, "CKK_GENERIC_SECRET"),
    };
    let (encrypt, sign) = match purpose {
        KeyPurpose::Kek => (true, false),
        KeyPurpose::Hmac => (false, true),
    };
    vec![
        KeyAttribute {
            value: Attribute::Class(ObjectClass::SECRET_KEY),
            name: "CKA_CLASS",
            expected: "CKO_SECRET_KEY",
            source: Template,
        },
        KeyAttribute {
            value: Attribute::KeyType(key_type),
            name: "CKA_KEY_TYPE",
            expected: key_type_name,
            source: Template,
        },
        KeyAttribute {
            value: Attribute::ValueLen(32.into()),
            name: "CKA_VALUE_LEN",
            expected: "32 (bytes)",
            source: Template,
        },
        KeyAttribute {
            value: Attribute::Id(id.0.clone()),
            name: "CKA_ID",
            expected: "the requested object id",
            source: Template,
        },
        KeyAttribute {
            value: Attribute::Label(id.0.clone()),
            name: "CKA_LABEL",
            expected: "the requested object id",
            source: Template,
        },
        // A private, sensitive, non-extractable, immutable token object.
        flag(Attribute::Token(true), "CKA_TOKEN", Template),
        flag(Attribute::Private(true), "CKA_PRIVATE", Template),
        flag(Attribute::Sensitive(true), "CKA_SENSITIVE", Template),
        flag(Attribute::Extractable(false), "CKA_EXTRACTABLE", Template),
        flag(Attribute::Modifiable(false), "CKA_MODIFIABLE", Template),
        flag(Attribute::Copyable(false), "CKA_COPYABLE", Template),
        flag(Attribute::Wrap(false), "CKA_WRAP", Template),
        flag(Attribute::Unwrap(false), "CKA_UNWRAP", Template),
        flag(Attribute::Derive(false), "CKA_DERIVE", Template),
        // One use only: AES-GCM for a KEK, HMAC for an HMAC key.
        flag(Attribute::Encrypt(encrypt), "CKA_ENCRYPT", Template),
        flag(Attribute::Decrypt(encrypt), "CKA_DECRYPT", Template),
        flag(Attribute::Sign(sign), "CKA_SIGN", Template),
        flag(Attribute::Verify(sign), "CKA_VERIFY", Template),
        // Proof that the key was born in the HSM and never left it.
        flag(
            Attribute::AlwaysSensitive(true),
            "CKA_ALWAYS_SENSITIVE",
            Token,
        ),
        flag(
            Attribute::NeverExtractable(true),
            "CKA_NEVER_EXTRACTABLE",
            Token,
        ),
        flag(Attribute::Local(true), "CKA_LOCAL", Token),
    ]
}

/// The `C_GenerateKey` template for a key of `purpose`: the table's
/// `Template` rows.
pub(crate) fn template(purpose: KeyPurpose, id: &ObjectId) -> Vec<Attribute> {
    key_attributes(purpose, id)
        .into_iter()
        .filter(|a| a.source == Source::Template)
        .map(|a| a.value)
        .collect()
}

/// The attributes read back after generation: every row of the table.
pub(crate) fn read_back_types(purpose: KeyPurpose, id: &ObjectId) -> Vec<AttributeType> {
    key_attributes(purpose, id)
        .iter()
        .map(|a| a.value.attribute_type())
        .collect()
}

/// Checks read-back attributes against the table. An attribute the token did
/// not return at all counts as a violation: we cannot prove it holds.
///
/// # Errors
/// `HsmError::TemplateViolation` naming the first attribute that is missing
/// or differs.
pub(crate) fn verify(purpose: KeyPurpose, id: &ObjectId, read_back: &[Attribute]) -> Result<()> {
    for required in key_attributes(purpose, id) {
        let kind = required.value.attribute_type();
        let actual = read_back.iter().find(|a| a.attribute_type() == kind);
        if actual != Some(&required.value) {
            return Err(HsmError::TemplateViolation {
                id: id.to_string(),
                attribute: required.name,
                expected: required.expected,
            });
        }
    }
    Ok(())
}

/// The table's boolean attributes as the token reported them, by PKCS#11
/// name (for `Hsm::key_object_info`; what to show an operator). Whether the
/// object is sound is `KeyObjectInfo::conforms`, judged by `verify` against
/// the same table.
pub(crate) fn reported_flags(
    purpose: KeyPurpose,
    id: &ObjectId,
    read_back: &[Attribute],
) -> Vec<(&'static str, bool)> {
    key_attributes(purpose, id)
        .iter()
        .filter(|required| bool_value(&required.value).is_some())
        .filter_map(|required| {
            let kind = required.value.attribute_type();
            read_back
                .iter()
                .find(|a| a.attribute_type() == kind)
                .and_then(bool_value)
                .map(|value| (required.name, value))
        })
        .collect()
}

/// The value of a boolean attribute; `None` for every other attribute.
fn bool_value(attribute: &Attribute) -> Option<bool> {
    match attribute {
        Attribute::Token(v)
        | Attribute::Private(v)
        | Attribute::Sensitive(v)
        | Attribute::Extractable(v)
        | Attribute::Modifiable(v)
        | Attribute::Copyable(v)
        | Attribute::Wrap(v)
        | Attribute::Unwrap(v)
        | Attribute::Derive(v)
        | Attribute::AlwaysSensitive(v)
        | Attribute::NeverExtractable(v)
        | Attribute::Local(v)
        | Attribute::Encrypt(v)
        | Attribute::Decrypt(v)
        | Attribute::Sign(v)
        | Attribute::Verify(v) => Some(*v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PURPOSES: [KeyPurpose; 2] = [KeyPurpose::Kek, KeyPurpose::Hmac];

    fn id() -> ObjectId {
        ObjectId::new(b"key-1/v1".to_vec()).expect("id")
    }

    /// What a conforming token reports: exactly the table.
    fn conforming(purpose: KeyPurpose) -> Vec<Attribute> {
        key_attributes(purpose, &id())
            .into_iter()
            .map(|a| a.value)
            .collect()
    }

    /// The same attribute with a different value.
    fn altered(attribute: &Attribute) -> Attribute {
        match attribute {
            Attribute::Class(_) => Attribute::Class(ObjectClass::DATA),
            Attribute::KeyType(_) => Attribute::KeyType(KeyType::DES3),
            Attribute::ValueLen(_) => Attribute::ValueLen(16.into()),
            Attribute::Id(_) => Attribute::Id(b"key-2/v1".to_vec()),
            Attribute::Label(_) => Attribute::Label(b"other".to_vec()),
            Attribute::Token(v) => Attribute::Token(!v),
            Attribute::Private(v) => Attribute::Private(!v),
            Attribute::Sensitive(v) => Attribute::Sensitive(!v),
            Attribute::Extractable(v) => Attribute::Extractable(!v),
            Attribute::Modifiable(v) => Attribute::Modifiable(!v),
            Attribute::Copyable(v) => Attribute::Copyable(!v),
            Attribute::Wrap(v) => Attribute::Wrap(!v),
            Attribute::Unwrap(v) => Attribute::Unwrap(!v),
            Attribute::Derive(v) => Attribute::Derive(!v),
            Attribute::AlwaysSensitive(v) => Attribute::AlwaysSensitive(!v),
            Attribute::NeverExtractable(v) => Attribute::NeverExtractable(!v),
            Attribute::Local(v) => Attribute::Local(!v),
            Attribute::Encrypt(v) => Attribute::Encrypt(!v),
            Attribute::Decrypt(v) => Attribute::Decrypt(!v),
            Attribute::Sign(v) => Attribute::Sign(!v),
            Attribute::Verify(v) => Attribute::Verify(!v),
            other => panic!("no alteration for {other:?}; add one"),
        }
    }

    #[test]
    fn kek_template_sets_every_attribute_design_requires() {
        let t = template(KeyPurpose::Kek, &id());
        for required in [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Id(b"key-1/v1".to_vec()),
        ] {
            assert!(t.contains(&required), "template lacks {required:?}");
        }
        // Only the token may set these; a template that tried would fail.
        for kind in [
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Local,
            AttributeType::Value,
        ] {
            assert!(t.iter().all(|a| a.attribute_type() != kind), "{kind:?}");
        }
    }

    #[test]
    fn every_template_attribute_is_read_back_and_checked() {
        for purpose in PURPOSES {
            let id = id();
            let read = read_back_types(purpose, &id);
            let template = template(purpose, &id);
            assert!(template.contains(&Attribute::Copyable(false)));
            for attribute in &template {
                assert!(
                    read.contains(&attribute.attribute_type()),
                    "{purpose:?}: {attribute:?} is set but never read back"
                );
            }
            // And the provenance attributes are read back, required true.
            for must_be_true in [
                Attribute::AlwaysSensitive(true),
                Attribute::NeverExtractable(true),
                Attribute::Local(true),
            ] {
                assert!(
                    conforming(purpose).contains(&must_be_true),
                    "{must_be_true:?}"
                );
            }
            assert!(
                !read.contains(&AttributeType::Value),
                "never read CKA_VALUE"
            );
        }
    }

    #[test]
    fn verification_refuses_every_missing_or_wrong_attribute() {
        for purpose in PURPOSES {
            let id = id();
            verify(purpose, &id, &conforming(purpose)).expect("conforming token");
            for row in key_attributes(purpose, &id) {
                let kind = row.value.attribute_type();

                let mut missing = conforming(purpose);
                missing.retain(|a| a.attribute_type() != kind);
                let err = verify(purpose, &id, &missing).expect_err("absent");
                assert!(
                    matches!(err, HsmError::TemplateViolation { attribute, .. } if attribute == row.name),
                    "{purpose:?} {}: {err}",
                    row.name
                );

                let wrong: Vec<Attribute> = conforming(purpose)
                    .iter()
                    .map(|a| {
                        if a.attribute_type() == kind {
                            altered(a)
                        } else {
                            a.clone()
                        }
                    })
                    .collect();
                let err = verify(purpose, &id, &wrong).expect_err("wrong value");
                assert!(err.to_string().contains(row.name), "{err}");
                assert!(err.to_string().contains(row.expected), "{err}");
            }
        }
        let err = verify(
            KeyPurpose::Kek,
            &id(),
            &conforming(KeyPurpose::Kek)
                .into_iter()
                .map(|a| {
                    if a == Attribute::Local(true) {
                        Attribute::Local(false)
                    } else {
                        a
                    }
                })
                .collect::<Vec<_>>(),
        )
        .expect_err("imported key");
        assert_eq!(
            err.to_string(),
            "key object key-1/v1 violates the key template: CKA_LOCAL should be true"
        );
    }

    #[test]
    fn reported_flags_are_the_tables_booleans() {
        let flags = reported_flags(KeyPurpose::Hmac, &id(), &conforming(KeyPurpose::Hmac));
        assert_eq!(flags.len(), 16);
        assert!(flags.contains(&("CKA_SIGN", true)));
        assert!(flags.contains(&("CKA_ENCRYPT", false)));
        assert!(flags.contains(&("CKA_LOCAL", true)));
        assert!(flags.contains(&("CKA_COPYABLE", false)));
    }
}
