//! Key object templates and their verification.
//!
//! SoftHSM2's defaults are unsafe (a non-private token key is stored in
//! plaintext on disk even when sensitive), so every attribute that matters is
//! set explicitly, and after generation the security-relevant attributes are
//! read back: a token that silently ignored part of the template is refused.

use std::fmt;

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};

use crate::error::{HsmError, Result};

/// The CKA_ID of a key object. The service names objects after the key
/// version they hold (e.g. `key-…/v3`); it is not secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectId(Vec<u8>);

impl ObjectId {
    pub fn new(id: impl Into<Vec<u8>>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() || id.len() > 128 {
            return Err(HsmError::InvalidArgument(
                "object id must be 1 to 128 bytes",
            ));
        }
        Ok(ObjectId(id))
    }

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

/// Attributes common to every key we create: a private, sensitive,
/// non-extractable, immutable token object.
fn common(id: &ObjectId) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Id(id.0.clone()),
        Attribute::Label(id.0.clone()),
    ]
}

/// The full generation template for a key of `purpose`.
pub(crate) fn template(purpose: KeyPurpose, id: &ObjectId) -> Vec<Attribute> {
    let mut attributes = common(id);
    match purpose {
        KeyPurpose::Kek => attributes.extend([
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
        ]),
        KeyPurpose::Hmac => attributes.extend([
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32.into()),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ]),
    }
    attributes
}

/// The boolean attributes read back after generation, with required values.
pub(crate) fn required_flags(purpose: KeyPurpose) -> Vec<(AttributeType, &'static str, bool)> {
    let mut flags = vec![
        (AttributeType::Token, "CKA_TOKEN", true),
        (AttributeType::Private, "CKA_PRIVATE", true),
        (AttributeType::Sensitive, "CKA_SENSITIVE", true),
        (AttributeType::Extractable, "CKA_EXTRACTABLE", false),
        (AttributeType::Modifiable, "CKA_MODIFIABLE", false),
        (AttributeType::Wrap, "CKA_WRAP", false),
        (AttributeType::Unwrap, "CKA_UNWRAP", false),
        (AttributeType::Derive, "CKA_DERIVE", false),
        // Proof that the key was born in the HSM and never left it.
        (AttributeType::AlwaysSensitive, "CKA_ALWAYS_SENSITIVE", true),
        (
            AttributeType::NeverExtractable,
            "CKA_NEVER_EXTRACTABLE",
            true,
        ),
        (AttributeType::Local, "CKA_LOCAL", true),
    ];
    let (encrypt, sign) = match purpose {
        KeyPurpose::Kek => (true, false),
        KeyPurpose::Hmac => (false, true),
    };
    flags.extend([
        (AttributeType::Encrypt, "CKA_ENCRYPT", encrypt),
        (AttributeType::Decrypt, "CKA_DECRYPT", encrypt),
        (AttributeType::Sign, "CKA_SIGN", sign),
        (AttributeType::Verify, "CKA_VERIFY", sign),
    ]);
    flags
}

/// Checks read-back attributes against `required_flags`. A flag the token did
/// not return at all counts as a violation: we cannot prove it holds.
pub(crate) fn verify_flags(
    purpose: KeyPurpose,
    id: &ObjectId,
    read_back: &[Attribute],
) -> Result<()> {
    for (kind, name, expected) in required_flags(purpose) {
        let actual = read_back
            .iter()
            .find_map(|attribute| bool_of(attribute, kind));
        if actual != Some(expected) {
            return Err(HsmError::TemplateViolation {
                id: id.to_string(),
                attribute: name,
                expected,
            });
        }
    }
    Ok(())
}

fn bool_of(attribute: &Attribute, kind: AttributeType) -> Option<bool> {
    let (actual_kind, value) = match attribute {
        Attribute::Token(v) => (AttributeType::Token, *v),
        Attribute::Private(v) => (AttributeType::Private, *v),
        Attribute::Sensitive(v) => (AttributeType::Sensitive, *v),
        Attribute::Extractable(v) => (AttributeType::Extractable, *v),
        Attribute::Modifiable(v) => (AttributeType::Modifiable, *v),
        Attribute::Wrap(v) => (AttributeType::Wrap, *v),
        Attribute::Unwrap(v) => (AttributeType::Unwrap, *v),
        Attribute::Derive(v) => (AttributeType::Derive, *v),
        Attribute::AlwaysSensitive(v) => (AttributeType::AlwaysSensitive, *v),
        Attribute::NeverExtractable(v) => (AttributeType::NeverExtractable, *v),
        Attribute::Local(v) => (AttributeType::Local, *v),
        Attribute::Encrypt(v) => (AttributeType::Encrypt, *v),
        Attribute::Decrypt(v) => (AttributeType::Decrypt, *v),
        Attribute::Sign(v) => (AttributeType::Sign, *v),
        Attribute::Verify(v) => (AttributeType::Verify, *v),
        _ => return None,
    };
    (actual_kind == kind).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_template_sets_every_attribute_design_requires() {
        let id = ObjectId::new(b"key-1/v1".to_vec()).expect("id");
        let t = template(KeyPurpose::Kek, &id);
        for required in [
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
        ] {
            assert!(t.contains(&required), "template lacks {required:?}");
        }
    }

    #[test]
    fn verification_refuses_a_missing_or_wrong_flag() {
        let id = ObjectId::new(b"k".to_vec()).expect("id");
        let good: Vec<Attribute> = required_flags(KeyPurpose::Kek)
            .into_iter()
            .map(|(kind, _, value)| match kind {
                AttributeType::Token => Attribute::Token(value),
                AttributeType::Private => Attribute::Private(value),
                AttributeType::Sensitive => Attribute::Sensitive(value),
                AttributeType::Extractable => Attribute::Extractable(value),
                AttributeType::Modifiable => Attribute::Modifiable(value),
                AttributeType::Wrap => Attribute::Wrap(value),
                AttributeType::Unwrap => Attribute::Unwrap(value),
                AttributeType::Derive => Attribute::Derive(value),
                AttributeType::AlwaysSensitive => Attribute::AlwaysSensitive(value),
                AttributeType::NeverExtractable => Attribute::NeverExtractable(value),
                AttributeType::Local => Attribute::Local(value),
                AttributeType::Encrypt => Attribute::Encrypt(value),
                AttributeType::Decrypt => Attribute::Decrypt(value),
                AttributeType::Sign => Attribute::Sign(value),
                AttributeType::Verify => Attribute::Verify(value),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        verify_flags(KeyPurpose::Kek, &id, &good).expect("all flags right");

        let mut imported = good.clone();
        imported.retain(|a| !matches!(a, Attribute::Local(_)));
        imported.push(Attribute::Local(false));
        let err = verify_flags(KeyPurpose::Kek, &id, &imported).expect_err("LOCAL false");
        assert!(err.to_string().contains("CKA_LOCAL"), "{err}");

        let mut missing = good;
        missing.retain(|a| !matches!(a, Attribute::NeverExtractable(_)));
        let err = verify_flags(KeyPurpose::Kek, &id, &missing).expect_err("flag absent");
        assert!(err.to_string().contains("CKA_NEVER_EXTRACTABLE"), "{err}");
    }
}
