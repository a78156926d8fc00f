//! Bring your own key (issue 14 item 6): RSA import key pairs generated in
//! the HSM, and the RSA-OAEP unwrap of a caller's 32-byte AES key straight
//! into a sensitive session object that is then wrapped under the root, so
//! the key material exists in clear only at the external party and inside
//! the HSM (model: AWS KMS `GetParametersForImport`/`ImportKeyMaterial`).
//!
//! Import key pairs are **session objects** on a `KeyHolder`, lost on
//! restart or holder loss. They cannot be kept as blobs under the root:
//! the root may wrap only secret keys (`CKA_WRAP_TEMPLATE` requires
//! `CKA_CLASS=CKO_SECRET_KEY`), only with `CKM_AES_KEY_WRAP` (an RSA
//! private key's PKCS#8 encoding is not a multiple of 8 bytes, so it would
//! need the padded mechanism, which `CKA_ALLOWED_MECHANISMS` forbids), and
//! anything unwrapped under it gets `CKA_UNWRAP=false`, which an import key
//! needs to be true. The hsm tests check the first of these on SoftHSM2.
//!
//! What it must never do: let the import private key or the imported key
//! leave the HSM, or keep an imported key object that failed a check.

use cryptoki::error::RvError;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;

use crate::error::{HsmError, Operation, Result, ReturnCode, from_cryptoki};
use crate::objects::KeyPurpose;
use crate::root::RootVariant;
use crate::wrapped::{self, Stage, WRAPPED_KEY_LEN, WrapMechanism, WrappedKey};

/// How the external party wraps its key material: RSAES-OAEP (RFC 8017
/// §7.1) with MGF1 over the same hash and an empty label, under the import
/// public key. The names are AWS KMS's `AlgorithmSpec` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OaepHash {
    /// `RSAES_OAEP_SHA_1`: SHA-1 and MGF1-SHA-1 (the only one SoftHSM2
    /// 2.6.1 unwraps with; design note §1.3).
    Sha1,
    /// `RSAES_OAEP_SHA_256`: SHA-256 and MGF1-SHA-256.
    Sha256,
}

impl OaepHash {
    /// The AWS KMS name (`RSAES_OAEP_SHA_1`, `RSAES_OAEP_SHA_256`).
    pub fn name(self) -> &'static str {
        match self {
            OaepHash::Sha1 => "RSAES_OAEP_SHA_1",
            OaepHash::Sha256 => "RSAES_OAEP_SHA_256",
        }
    }

    fn params(self) -> PkcsOaepParams<'static> {
        let (hash, mgf) = match self {
            OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
            OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        };
        PkcsOaepParams::new(hash, mgf, PkcsOaepSource::empty())
    }
}

/// The size of an import key pair (AWS KMS `WrappingKeySpec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImportKeySpec {
    /// `RSA_2048`.
    Rsa2048,
    /// `RSA_3072`.
    Rsa3072,
    /// `RSA_4096`.
    Rsa4096,
}

impl ImportKeySpec {
    /// The modulus length, bits.
    pub fn bits(self) -> u64 {
        match self {
            ImportKeySpec::Rsa2048 => 2048,
            ImportKeySpec::Rsa3072 => 3072,
            ImportKeySpec::Rsa4096 => 4096,
        }
    }

    /// The AWS KMS name (`RSA_2048`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ImportKeySpec::Rsa2048 => "RSA_2048",
            ImportKeySpec::Rsa3072 => "RSA_3072",
            ImportKeySpec::Rsa4096 => "RSA_4096",
        }
    }
}

/// The public exponent of every import key pair: F4 = 65537.
const PUBLIC_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];

/// The private half's attributes: a session object usable only to unwrap
/// with RSA-OAEP (no PKCS#1 v1.5, whose padding oracle would let a caller
/// decrypt other ciphertexts; no decrypt, which would hand the caller's key
/// out in clear), never readable or extractable. `CKA_MODIFIABLE` last
/// (SoftHSM2 bug #707). One table for the template and its read-back.
fn private_rows() -> Vec<(Attribute, &'static str)> {
    vec![
        (Attribute::Token(false), "CKA_TOKEN"),
        (Attribute::Private(true), "CKA_PRIVATE"),
        (Attribute::Sensitive(true), "CKA_SENSITIVE"),
        (Attribute::Extractable(false), "CKA_EXTRACTABLE"),
        (Attribute::Unwrap(true), "CKA_UNWRAP"),
        (Attribute::Decrypt(false), "CKA_DECRYPT"),
        (Attribute::Sign(false), "CKA_SIGN"),
        (Attribute::Derive(false), "CKA_DERIVE"),
        (
            Attribute::AllowedMechanisms(vec![MechanismType::RSA_PKCS_OAEP]),
            "CKA_ALLOWED_MECHANISMS",
        ),
        (Attribute::Modifiable(false), "CKA_MODIFIABLE"),
    ]
}

/// Generates an RSA import key pair of `spec` as session objects, reads
/// the public half, destroys it, checks the private half against its table
/// and returns the private handle and the public key as a DER
/// `SubjectPublicKeyInfo` (RFC 5280 §4.1, `rsaEncryption`, RFC 8017 A.1.1).
/// Nothing is left on the token on error.
pub(crate) fn generate_pair(
    session: &Session,
    spec: ImportKeySpec,
) -> Result<(ObjectHandle, Vec<u8>)> {
    let public_template = [
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::ModulusBits(spec.bits().into()),
        Attribute::PublicExponent(PUBLIC_EXPONENT.to_vec()),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Verify(false),
    ];
    let private_template: Vec<Attribute> = private_rows().into_iter().map(|(a, _)| a).collect();
    let (public, private) = session
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &public_template,
            &private_template,
        )
        .map_err(|e| from_cryptoki(Operation::GenerateKeyPair, e))?;
    let spki = (|| {
        let read = session
            .get_attributes(
                public,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
        let mut modulus = None;
        let mut exponent = None;
        for attribute in read {
            match attribute {
                Attribute::Modulus(n) => modulus = Some(n),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        match (modulus, exponent) {
            (Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => Ok(rsa_spki_der(&n, &e)),
            _ => Err(HsmError::Wrapper {
                operation: Operation::GetAttributes,
                reason: "the import public key has no modulus or exponent".into(),
            }),
        }
    })()
    .and_then(|spki| check_private(session, private).map(|()| spki));
    // The public half is not needed in the HSM: the caller gets its bytes.
    let _ = session.destroy_object(public);
    match spki {
        Ok(spki) => Ok((private, spki)),
        Err(e) => {
            let _ = session.destroy_object(private);
            Err(e)
        }
    }
}

/// Reads every row of the private table back from `handle`.
///
/// # Errors
/// `TemplateViolation` naming the first attribute that differs.
fn check_private(session: &Session, handle: ObjectHandle) -> Result<()> {
    let rows = private_rows();
    let types: Vec<AttributeType> = rows.iter().map(|(a, _)| a.attribute_type()).collect();
    let read = session
        .get_attributes(handle, &types)
        .map_err(|e| from_cryptoki(Operation::GetAttributes, e))?;
    for (required, name) in rows {
        let kind = required.attribute_type();
        if read.iter().find(|a| a.attribute_type() == kind) != Some(&required) {
            return Err(HsmError::TemplateViolation {
                id: "import key".into(),
                attribute: name,
                expected: "the value of the import key table",
            });
        }
    }
    Ok(())
}

/// `C_UnwrapKey(CKM_RSA_PKCS_OAEP(hash), private, encrypted)` into an
/// AES session object with the version table's unwrap template (in variant
/// N extractable once, to be wrapped), checks it (variant T: the whole
/// working-key read-back), wraps it under `root` (of `epoch`) with
/// `CKM_AES_KEY_WRAP` and destroys it. Returns the blob for the catalogue;
/// the version is unwrapped from it on first use like any other.
///
/// # Errors
/// `ImportAlgorithmUnsupported` if the HSM refuses the OAEP parameters
/// (SoftHSM2 2.6.1 for SHA-256: `CKR_ARGUMENTS_BAD`);
/// `ImportMaterialInvalid` if `encrypted` does not decrypt under the key
/// pair or is not a 32-byte key; `TemplateViolation` on a read-back
/// mismatch; otherwise the classified PKCS#11 error.
pub(crate) fn import_version(
    session: &Session,
    private: ObjectHandle,
    hash: OaepHash,
    encrypted: &[u8],
    root: ObjectHandle,
    epoch: u32,
    variant: RootVariant,
) -> Result<WrappedKey> {
    let handle = unwrap_imported(session, private, hash, encrypted, variant)?;
    let outcome = (|| {
        let blob = session
            .wrap_key(&Mechanism::AesKeyWrap, root, handle)
            .map_err(|e| match e {
                // Not a multiple of 8 bytes (RFC 3394): not a 32-byte key.
                cryptoki::error::Error::Pkcs11(
                    RvError::KeySizeRange | RvError::WrappedKeyLenRange | RvError::DataLenRange,
                    _,
                ) => HsmError::ImportMaterialInvalid,
                other => from_cryptoki(Operation::WrapKey, other),
            })?;
        if blob.len() != WRAPPED_KEY_LEN {
            // 40 bytes under RFC 3394 is a 32-byte key; anything else is an
            // AES-128/192 key or other length, which kms does not hold.
            return Err(HsmError::ImportMaterialInvalid);
        }
        Ok(WrappedKey {
            root_epoch: epoch,
            mechanism: WrapMechanism::AesKeyWrap,
            blob,
        })
    })();
    // The imported object is never kept: the version is used through its
    // MAC-checked blob, like every wrapped version.
    let _ = session.destroy_object(handle);
    outcome
}

/// The first half of [`import_version`]: the OAEP `C_UnwrapKey` into a
/// session object with the version table's unwrap template (variant N:
/// extractable once), its read-back (variant T: the whole working-key
/// table, value unreadable) and the AES-256 probe. Destroys the object on
/// any failure.
///
/// # Errors
/// As [`import_version`].
pub(crate) fn unwrap_imported(
    session: &Session,
    private: ObjectHandle,
    hash: OaepHash,
    encrypted: &[u8],
    variant: RootVariant,
) -> Result<ObjectHandle> {
    let extractable_once = Attribute::Extractable(true);
    let altered = (variant == RootVariant::NonExtractable).then_some(&extractable_once);
    let template = wrapped::template(KeyPurpose::Kek, variant, Stage::Unwrap, altered);
    let handle = session
        .unwrap_key(
            &Mechanism::RsaPkcsOaep(hash.params()),
            private,
            encrypted,
            &template,
        )
        .map_err(|e| oaep_error(e, hash))?;
    let checked = (|| {
        if variant == RootVariant::Trusted {
            wrapped::check_working(session, handle, KeyPurpose::Kek, variant, Stage::Unwrap)?;
        }
        probe_aes_256(session, handle)
    })();
    match checked {
        Ok(()) => Ok(handle),
        Err(e) => {
            let _ = session.destroy_object(handle);
            Err(e)
        }
    }
}

/// Refuses an imported key that is not a usable AES key: one AES-256-GCM
/// encryption of nothing (random IV, output discarded) must work. Needed
/// because the token reports no length for an unwrapped key (SoftHSM2:
/// `CKA_VALUE_LEN` = 0) and `CKM_AES_KEY_WRAP` zero-pads a secret key to a
/// multiple of 8 bytes, so 25 to 31 bytes of material would wrap to the
/// same 40-byte blob as 32 and silently become another key; SoftHSM2
/// refuses AES with a key of any length but 16, 24 or 32 bytes. (16 and 24
/// pass this probe and are refused by the blob's length.)
///
/// # Errors
/// `ImportMaterialInvalid`; a lost session keeps its class.
fn probe_aes_256(session: &Session, handle: ObjectHandle) -> Result<()> {
    use cryptoki::mechanism::aead::GcmParams;
    use ring::rand::SecureRandom;
    let mut iv = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut iv)
        .map_err(|_| HsmError::host_rng(Operation::Encrypt))?;
    let params = GcmParams::new(&mut iv, &[], 128.into())
        .map_err(|e| from_cryptoki(Operation::Encrypt, e))?;
    match session.encrypt(&Mechanism::AesGcm(params), handle, &[]) {
        Ok(tag) if tag.len() == 16 => Ok(()),
        Ok(_) => Err(HsmError::ImportMaterialInvalid),
        Err(e) => match from_cryptoki(Operation::Encrypt, e) {
            lost if lost.class() == crate::return_code::FailureClass::SessionLost => Err(lost),
            _ => Err(HsmError::ImportMaterialInvalid),
        },
    }
}

/// Maps a failed OAEP `C_UnwrapKey`: refused parameters name the algorithm
/// (the HSM does not support it); a ciphertext that does not decrypt, or
/// decrypts to something that cannot be an AES key, is invalid material,
/// never a lost device (SoftHSM2 answers some of these with
/// `CKR_GENERAL_ERROR`). Session losses keep their class.
fn oaep_error(error: cryptoki::error::Error, hash: OaepHash) -> HsmError {
    match error {
        cryptoki::error::Error::Pkcs11(
            rv @ (RvError::ArgumentsBad
            | RvError::MechanismParamInvalid
            | RvError::MechanismInvalid),
            _,
        ) => HsmError::ImportAlgorithmUnsupported {
            algorithm: hash.name(),
            code: ReturnCode::new(rv),
        },
        cryptoki::error::Error::Pkcs11(
            RvError::GeneralError
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::KeySizeRange
            | RvError::AttributeValueInvalid
            | RvError::DataLenRange
            | RvError::DataInvalid,
            _,
        ) => HsmError::ImportMaterialInvalid,
        other => from_cryptoki(Operation::UnwrapKey, other),
    }
}

/// DER `SubjectPublicKeyInfo` of an RSA public key (RFC 5280 §4.1.1.2
/// `AlgorithmIdentifier` rsaEncryption with NULL parameters, RFC 8017
/// A.1.1 `RSAPublicKey`), from the big-endian modulus and exponent.
pub(crate) fn rsa_spki_der(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let mut rsa_public_key = der_integer(modulus);
    rsa_public_key.extend(der_integer(exponent));
    let rsa_public_key = der_tlv(0x30, &rsa_public_key);
    // 1.2.840.113549.1.1.1 rsaEncryption, then NULL.
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x00]; // no unused bits
    bits.extend(rsa_public_key);
    let mut body = ALGORITHM.to_vec();
    body.extend(der_tlv(0x03, &bits));
    der_tlv(0x30, &body)
}

/// A DER INTEGER of an unsigned big-endian value (leading zeros dropped,
/// one zero added if the high bit is set, so it stays positive).
fn der_integer(unsigned: &[u8]) -> Vec<u8> {
    let first = unsigned
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(unsigned.len());
    let mut content = Vec::with_capacity(unsigned.len() + 1);
    match unsigned.get(first) {
        None => content.push(0),
        Some(&b) if b & 0x80 != 0 => content.push(0),
        Some(_) => {}
    }
    content.extend_from_slice(&unsigned[first..]);
    der_tlv(0x02, &content)
}

/// Tag, DER definite length, content.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vector: a small key's SPKI, checked by hand against RFC 5280
    /// (real keys are parsed by the `rsa` crate and Python `cryptography`
    /// in the hsm and e2e tests).
    #[test]
    fn spki_der_golden_vector() {
        let spki = rsa_spki_der(&[0x00, 0xc1, 0x02], &PUBLIC_EXPONENT);
        assert_eq!(
            hex::encode(spki),
            concat!(
                "301e",                           // SEQUENCE, 30 bytes
                "300d06092a864886f70d0101010500", // rsaEncryption, NULL
                "030d00",                         // BIT STRING, 13 bytes, 0 unused
                "300a",                           // RSAPublicKey
                "020300c102",                     // n: high bit set, one zero added
                "0203010001"                      // e = 65537
            )
        );
        assert_eq!(der_tlv(0x04, &[0u8; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(der_tlv(0x04, &[0u8; 513])[..4], [0x04, 0x82, 0x02, 0x01]);
        assert_eq!(der_integer(&[0, 0]), [0x02, 0x01, 0x00]);
    }

    #[test]
    fn refused_oaep_parameters_name_the_algorithm_and_bad_material_is_not_a_lost_device() {
        use cryptoki::context::Function;
        let e = oaep_error(
            cryptoki::error::Error::Pkcs11(RvError::ArgumentsBad, Function::UnwrapKey),
            OaepHash::Sha256,
        );
        assert!(
            matches!(
                e,
                HsmError::ImportAlgorithmUnsupported {
                    algorithm: "RSAES_OAEP_SHA_256",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("RSAES_OAEP_SHA_256"), "{e}");
        let e = oaep_error(
            cryptoki::error::Error::Pkcs11(RvError::GeneralError, Function::UnwrapKey),
            OaepHash::Sha1,
        );
        assert!(matches!(e, HsmError::ImportMaterialInvalid), "{e:?}");
        assert!(!e.is_unavailable());
    }
}
