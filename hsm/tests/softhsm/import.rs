//! Bring your own key against real SoftHSM2 tokens (issue 14 item 6): an
//! external party (the `rsa` crate) wraps 32 known bytes under the import
//! public key the HSM hands out; the HSM unwraps them into a session object,
//! wraps that under the root; the blob's working key encrypts, and the known
//! bytes decrypt that ciphertext in software: the imported material is the
//! key in use. Plus every refusal, and why import key pairs cannot be kept
//! as blobs under the root.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use kms_hsm::testing::TestToken;
use kms_hsm::{
    HsmError, ImportKeySpec, KeyPurpose, OaepHash, RootSpec, RootVariant, WRAPPED_KEY_LEN,
    create_root,
};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rsa::pkcs8::DecodePublicKey;
use rsa::{Oaep, RsaPublicKey};

fn token_with_root(variant: RootVariant) -> (TestToken, kms_hsm::Hsm) {
    let token = TestToken::new();
    let pin = match variant {
        RootVariant::Trusted => token.so_pin_source().read().expect("SO PIN"),
        _ => token.pin_source().read().expect("user PIN"),
    };
    create_root(
        token.module_path(),
        token.label(),
        &pin,
        &RootSpec::for_softhsm(1, variant),
    )
    .expect("create root");
    let hsm = token.open();
    (token, hsm)
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new().fill(&mut bytes).expect("random");
    bytes
}

fn oaep_sha1(spki: &[u8], material: &[u8]) -> Vec<u8> {
    let public = RsaPublicKey::from_public_key_der(spki).expect("SPKI parses");
    public
        .encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new::<sha1::Sha1>(),
            material,
        )
        .expect("OAEP encrypt")
}

#[test]
fn imported_material_is_the_key_the_hsm_encrypts_with() {
    for variant in [RootVariant::Trusted, RootVariant::NonExtractable] {
        let (_token, hsm) = token_with_root(variant);
        let holder = hsm.key_holder().expect("holder");
        for spec in [ImportKeySpec::Rsa2048, ImportKeySpec::Rsa3072] {
            let (key, spki) = holder.generate_import_key(spec).expect("import key pair");
            let public = RsaPublicKey::from_public_key_der(&spki).expect("SPKI parses");
            assert_eq!(
                rsa::traits::PublicKeyParts::size(&public) * 8,
                spec.bits() as usize
            );
            // Only the private half stays in the HSM.
            assert_eq!(holder.session_object_count().expect("count"), 1);
            let material: [u8; 32] = random();
            let wrapped = holder
                .import_version(
                    &key,
                    OaepHash::Sha1,
                    &oaep_sha1(&spki, &material),
                    1,
                    variant,
                )
                .expect("import");
            assert_eq!(wrapped.blob.len(), WRAPPED_KEY_LEN);
            // The imported object is not kept.
            assert_eq!(holder.session_object_count().expect("count"), 1);
            // The blob unwraps like any version (with the attribute read-back
            // of the version table: sensitive, private, session,
            // WRAP_WITH_TRUSTED (T) / non-extractable (N), value unreadable).
            let working = holder
                .unwrap(&wrapped, KeyPurpose::Kek, variant)
                .expect("unwrap the imported version");
            let sealed = holder
                .encrypt(&working, b"aad", b"imported secret")
                .expect("encrypt");
            let known = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &material).expect("key"));
            let mut in_out = sealed.ciphertext_and_tag.clone();
            let iv: [u8; 12] = sealed.iv.as_slice().try_into().expect("96-bit IV");
            let plain = known
                .open_in_place(
                    Nonce::assume_unique_for_key(iv),
                    Aad::from(b"aad"),
                    &mut in_out,
                )
                .expect("the known material decrypts what the HSM encrypted");
            assert_eq!(plain, b"imported secret");
            holder.destroy(working).expect("destroy");
            holder.destroy_import_key(key).expect("destroy import key");
            assert_eq!(holder.session_object_count().expect("count"), 0);
        }
    }
}

#[test]
fn sha256_is_refused_by_name_and_bad_material_is_invalid_leaving_nothing() {
    let (_token, hsm) = token_with_root(RootVariant::Trusted);
    let holder = hsm.key_holder().expect("holder");
    let (key, spki) = holder
        .generate_import_key(ImportKeySpec::Rsa2048)
        .expect("import key pair");
    let public = RsaPublicKey::from_public_key_der(&spki).expect("SPKI parses");
    let material: [u8; 32] = random();
    let sha256 = public
        .encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new::<rsa::sha2::Sha256>(),
            &material,
        )
        .expect("OAEP-SHA-256 encrypt");
    // SoftHSM2 2.6.1 does OAEP with SHA-1 only (design note §1.3).
    match holder.import_version(&key, OaepHash::Sha256, &sha256, 1, RootVariant::Trusted) {
        Err(e @ HsmError::ImportAlgorithmUnsupported { algorithm, .. }) => {
            assert_eq!(algorithm, "RSAES_OAEP_SHA_256");
            assert!(e.to_string().contains("does not support"), "{e}");
        }
        other => panic!("expected ImportAlgorithmUnsupported, got {other:?}"),
    }
    // Wrapped with SHA-256 but presented as SHA-1: does not decrypt.
    let garbage: [u8; 256] = random();
    for (what, encrypted) in [
        ("other hash", sha256),
        ("garbage", garbage.to_vec()),
        ("empty", Vec::new()),
        ("16 bytes", oaep_sha1(&spki, &random::<16>())),
        ("33 bytes", oaep_sha1(&spki, &random::<33>())),
        ("31 bytes", oaep_sha1(&spki, &random::<31>())),
        ("40 bytes", oaep_sha1(&spki, &random::<40>())),
    ] {
        match holder.import_version(&key, OaepHash::Sha1, &encrypted, 1, RootVariant::Trusted) {
            Err(HsmError::ImportMaterialInvalid) => {}
            other => panic!("{what}: expected ImportMaterialInvalid, got {other:?}"),
        }
        assert_eq!(
            holder.session_object_count().expect("count"),
            1,
            "{what}: only the import key remains"
        );
    }
    // The pair still works after refusals.
    holder
        .import_version(
            &key,
            OaepHash::Sha1,
            &oaep_sha1(&spki, &material),
            1,
            RootVariant::Trusted,
        )
        .expect("import");
    // An import key is usable on its own holder only.
    let other = hsm.key_holder().expect("second holder");
    assert!(matches!(
        other.import_version(&key, OaepHash::Sha1, &[0; 256], 1, RootVariant::Trusted),
        Err(HsmError::InvalidArgument(_))
    ));
}

/// Why import key pairs are session objects, not blobs under the root: the
/// root refuses to wrap an RSA private key, with either AES wrap mechanism.
#[test]
fn the_root_cannot_wrap_an_rsa_private_key() {
    let (_token, hsm) = token_with_root(RootVariant::Trusted);
    let holder = hsm.key_holder().expect("holder");
    let results = holder
        .attack_session_for_tests(None, |session, _| {
            let (public, private) = session
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ModulusBits(2048.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                    ],
                    &[
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(true),
                        Attribute::WrapWithTrusted(true),
                        Attribute::Unwrap(true),
                    ],
                )
                .expect("RSA pair");
            let root = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Id(kms_hsm::root_id(1).as_bytes().to_vec()),
                ])
                .expect("find root")[0];
            let results = [Mechanism::AesKeyWrap, Mechanism::AesKeyWrapPad]
                .map(|m| session.wrap_key(&m, root, private).map(|blob| blob.len()));
            session.destroy_object(public).expect("destroy");
            session.destroy_object(private).expect("destroy");
            results
        })
        .expect("raw session");
    for result in results {
        assert!(
            result.is_err(),
            "the root wrapped an RSA private key: {result:?}"
        );
    }
}

/// The OAEP-unwrapped object itself (before it is wrapped under the root):
/// read back as a sensitive, private session object whose value cannot be
/// read, extractable only under a trusted key (variant T: wrapping it under
/// an ordinary user key is refused, under the root it works), and it is the
/// caller's key (the known bytes decrypt what it encrypts).
#[test]
fn the_oaep_unwrapped_object_is_sensitive_and_leaves_only_under_a_trusted_key() {
    let (_token, hsm) = token_with_root(RootVariant::Trusted);
    let holder = hsm.key_holder().expect("holder");
    let (key, spki) = holder
        .generate_import_key(ImportKeySpec::Rsa2048)
        .expect("import key pair");
    let material: [u8; 32] = random();
    let imported = holder
        .unwrap_imported_for_tests(
            &key,
            OaepHash::Sha1,
            &oaep_sha1(&spki, &material),
            RootVariant::Trusted,
        )
        .expect("OAEP unwrap");
    let (attributes, value, user_wrap, root_wrap) = holder
        .attack_session_for_tests(Some(&imported), |session, handle| {
            let handle = handle.expect("handle");
            use cryptoki::object::AttributeType as A;
            let attributes = session
                .get_attributes(
                    handle,
                    &[
                        A::Token,
                        A::Private,
                        A::Sensitive,
                        A::Extractable,
                        A::WrapWithTrusted,
                        A::Encrypt,
                        A::Wrap,
                        A::Unwrap,
                        A::Derive,
                    ],
                )
                .expect("read back");
            let value = session
                .get_attributes(handle, &[A::Value])
                .ok()
                .and_then(|v| {
                    v.into_iter().find_map(|a| match a {
                        Attribute::Value(bytes) if !bytes.is_empty() => Some(bytes),
                        _ => None,
                    })
                });
            // An ordinary (untrusted) wrapping key made by the PIN holder.
            let user_key = session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ValueLen(32.into()),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                    ],
                )
                .expect("user key");
            let user_wrap = session.wrap_key(&Mechanism::AesKeyWrap, user_key, handle);
            session.destroy_object(user_key).expect("destroy");
            let root = session
                .find_objects(&[Attribute::Id(kms_hsm::root_id(1).as_bytes().to_vec())])
                .expect("find root")[0];
            let root_wrap = session.wrap_key(&Mechanism::AesKeyWrap, root, handle);
            (attributes, value, user_wrap, root_wrap)
        })
        .expect("raw session");
    for expected in [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ] {
        assert!(
            attributes.contains(&expected),
            "{expected:?} not in {attributes:?}"
        );
    }
    assert_eq!(value, None, "CKA_VALUE must not be readable");
    assert!(
        matches!(
            user_wrap,
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::KeyNotWrappable,
                _
            ))
        ),
        "wrapping under an untrusted key: {user_wrap:?}"
    );
    assert_eq!(
        root_wrap.expect("wrap under the trusted root").len(),
        WRAPPED_KEY_LEN
    );
    // It is the caller's key.
    let sealed = holder.encrypt(&imported, b"", b"mine").expect("encrypt");
    let known = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &material).expect("key"));
    let mut in_out = sealed.ciphertext_and_tag.clone();
    let iv: [u8; 12] = sealed.iv.as_slice().try_into().expect("96-bit IV");
    let plain = known
        .open_in_place(Nonce::assume_unique_for_key(iv), Aad::empty(), &mut in_out)
        .expect("the known material decrypts");
    assert_eq!(plain, b"mine");
    holder.destroy(imported).expect("destroy");
    holder.destroy_import_key(key).expect("destroy import key");
    assert_eq!(holder.session_object_count().expect("count"), 0);
}
