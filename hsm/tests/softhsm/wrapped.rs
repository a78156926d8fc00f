//! The wrapped-key hierarchy against real SoftHSM2 tokens (design note
//! `hierarchy-and-cluster.md` §1.5, §1.7, §1.8): root creation and read-back,
//! the behavioural root probe on good and defective roots, every attack of
//! §1.5.5 and §1.7 played by a PIN holder, round trips through working
//! copies, root rotation, corrupt blobs, the HSM HMAC, and (printed, not
//! asserted) session-object vs token-object encrypt throughput.

use std::time::Instant;

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use kms_hsm::testing::TestToken;
use kms_hsm::{
    Hsm, HsmError, KeyHolder, KeyPurpose, Pin, RootDefect, RootSpec, RootVariant, WRAPPED_KEY_LEN,
    WrapMechanism, WrappedKey, create_defective_root_for_tests, create_root, root_id,
};

const T: RootVariant = RootVariant::Trusted;
const N: RootVariant = RootVariant::NonExtractable;

fn so_pin(token: &TestToken) -> Pin {
    token.so_pin_source().read().expect("SO PIN")
}

fn user_pin(token: &TestToken) -> Pin {
    token.pin_source().read().expect("user PIN")
}

/// The ceremony PIN for `variant`: SO for T, user for N.
fn ceremony_pin(token: &TestToken, variant: RootVariant) -> Pin {
    match variant {
        RootVariant::Trusted => so_pin(token),
        _ => user_pin(token),
    }
}

/// A fresh token with proper roots of `epochs` (created before any `Hsm`
/// logs the user in: one user type per application), opened.
fn token_with_roots(variant: RootVariant, epochs: &[u32]) -> (TestToken, Hsm) {
    let token = TestToken::new();
    for &epoch in epochs {
        create_root(
            token.module_path(),
            token.label(),
            &ceremony_pin(&token, variant),
            &RootSpec::for_softhsm(epoch, variant),
        )
        .expect("create root");
    }
    let hsm = token.open();
    (token, hsm)
}

fn flag(flags: &[(&'static str, bool)], name: &str) -> bool {
    flags
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("{name} not reported in {flags:?}"))
}

fn root_handle(session: &Session, epoch: u32) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Id(root_id(epoch).as_bytes().to_vec())])
        .expect("find root");
    assert_eq!(found.len(), 1);
    found[0]
}

fn check_failed(result: kms_hsm::Result<RootVariant>) -> &'static str {
    match result {
        Err(HsmError::RootCheckFailed { check, .. }) => check,
        other => panic!("expected RootCheckFailed, got {other:?}"),
    }
}

#[test]
fn a_root_reads_back_with_its_wrap_and_unwrap_templates() {
    let token = TestToken::new();
    let spec = RootSpec::for_softhsm(1, T);
    create_root(token.module_path(), token.label(), &so_pin(&token), &spec).expect("root");
    let again = create_root(token.module_path(), token.label(), &so_pin(&token), &spec);
    assert!(
        matches!(again, Err(HsmError::ObjectExists { ref id }) if id == "kms-root/1"),
        "{again:?}"
    );
    let hsm = token.open();
    let holder = hsm.key_holder().expect("holder");
    let info = holder.root_info(1).expect("root info");
    for (name, expected) in [
        ("CKA_TOKEN", true),
        ("CKA_PRIVATE", false), // SoftHSM2: the SO cannot create private objects
        ("CKA_SENSITIVE", true),
        ("CKA_EXTRACTABLE", false),
        ("CKA_TRUSTED", true),
        ("CKA_MODIFIABLE", false),
        ("CKA_COPYABLE", false),
        ("CKA_WRAP", true),
        ("CKA_UNWRAP", true),
        ("CKA_ENCRYPT", false),
        ("CKA_DECRYPT", false),
        ("CKA_SIGN", false),
        ("CKA_VERIFY", false),
        ("CKA_DERIVE", false),
    ] {
        assert_eq!(flag(&info.flags, name), expected, "{name}");
    }
    assert!(info.only_aes_key_wrap);
    assert!(
        !info.value_readable,
        "CKA_VALUE of the root must not be readable"
    );
    let mut wrap = info.wrap_template.expect("CKA_WRAP_TEMPLATE");
    wrap.sort();
    assert_eq!(
        wrap,
        [
            ("CKA_CLASS=CKO_SECRET_KEY", true),
            ("CKA_SENSITIVE", true),
            ("CKA_TOKEN", false),
            ("CKA_WRAP_WITH_TRUSTED", true),
        ]
    );
    let mut unwrap = info.unwrap_template.expect("CKA_UNWRAP_TEMPLATE");
    unwrap.sort();
    assert_eq!(
        unwrap,
        [
            ("CKA_DERIVE", false),
            ("CKA_PRIVATE", true),
            ("CKA_SENSITIVE", true),
            ("CKA_TOKEN", false),
            ("CKA_UNWRAP", false),
            ("CKA_WRAP", false),
            ("CKA_WRAP_WITH_TRUSTED", true),
        ]
    );

    // Variant N: user-made, private, untrusted, and its unwrap template forces
    // EXTRACTABLE=false instead of WRAP_WITH_TRUSTED.
    let (_token_n, hsm_n) = token_with_roots(N, &[4]);
    let info = hsm_n
        .key_holder()
        .expect("holder")
        .root_info(4)
        .expect("info");
    assert!(flag(&info.flags, "CKA_PRIVATE"));
    assert!(!flag(&info.flags, "CKA_TRUSTED"));
    let unwrap = info.unwrap_template.expect("CKA_UNWRAP_TEMPLATE");
    assert!(unwrap.contains(&("CKA_EXTRACTABLE", false)), "{unwrap:?}");
    assert!(!unwrap.iter().any(|(n, _)| *n == "CKA_WRAP_WITH_TRUSTED"));
}

#[test]
fn proper_roots_pass_the_probe_and_it_leaves_nothing_behind() {
    let (_token, hsm) = token_with_roots(T, &[1]);
    let holder = hsm.key_holder().expect("holder");
    assert_eq!(holder.verify_root(1, Some(T)).expect("probe T"), T);
    assert_eq!(holder.verify_root(1, None).expect("detect"), T);
    assert_eq!(holder.session_object_count().expect("count"), 0);
    let missing = holder.verify_root(9, None);
    assert!(
        matches!(missing, Err(HsmError::ObjectNotFound { ref id }) if id == "kms-root/9"),
        "{missing:?}"
    );

    let (_token, hsm) = token_with_roots(N, &[1]);
    let holder = hsm.key_holder().expect("holder");
    assert_eq!(holder.verify_root(1, None).expect("detect"), N);
    assert_eq!(holder.verify_root(1, Some(N)).expect("probe N"), N);
    // An N root is not trusted: it cannot serve a domain that needs rotation.
    assert_eq!(
        check_failed(holder.verify_root(1, Some(T))),
        "a WRAP_WITH_TRUSTED version wraps under the root (the root is CKA_TRUSTED)"
    );
    assert_eq!(holder.session_object_count().expect("count"), 0);
}

#[test]
fn defective_roots_fail_the_probe_naming_the_check() {
    let token = TestToken::new();
    let make = |epoch, defect| {
        create_defective_root_for_tests(
            token.module_path(),
            token.label(),
            &so_pin(&token),
            &RootSpec::for_softhsm(epoch, T),
            defect,
        )
        .expect("defective root");
    };
    make(1, RootDefect::NoUnwrapTemplate);
    make(2, RootDefect::DecryptAllowed);
    make(3, RootDefect::NotTrusted);
    let hsm = token.open();
    let holder = hsm.key_holder().expect("holder");
    // (a) Without an unwrap template a PIN holder unwraps blobs as readable keys.
    for expected in [Some(T), None] {
        assert_eq!(
            check_failed(holder.verify_root(1, expected)),
            "unwrapping a blob as non-sensitive is refused"
        );
    }
    // (b) The wrap/decrypt attack. SoftHSM2 2.6.1 offers CKM_AES_KEY_WRAP
    // for C_Wrap/UnwrapKey only, not C_Decrypt, and the root's allowed
    // mechanisms exclude the rest, so the behavioural C_Decrypt checks pass
    // there and the attribute check is the one that catches it.
    assert_eq!(
        check_failed(holder.verify_root(2, Some(T))),
        "the root reads back CKA_ENCRYPT=false and CKA_DECRYPT=false"
    );
    // (c) Untrusted: versions that may leave only under a trusted key do not wrap.
    assert_eq!(
        check_failed(holder.verify_root(3, Some(T))),
        "a WRAP_WITH_TRUSTED version wraps under the root (the root is CKA_TRUSTED)"
    );
    // Every throw-away object, including the ones the failed checks made, is gone.
    assert_eq!(holder.session_object_count().expect("count"), 0);
}

/// Unwrap templates a PIN holder might try (design note §1.5.5, §1.7 item 1).
fn attack_templates(purpose_type: KeyType) -> Vec<(&'static str, Vec<Attribute>)> {
    let base = |extra: &[Attribute]| {
        let mut t = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(purpose_type),
        ];
        t.extend_from_slice(extra);
        t
    };
    vec![
        ("minimal template", base(&[])),
        (
            "readable: extractable, non-sensitive",
            base(&[Attribute::Extractable(true), Attribute::Sensitive(false)]),
        ),
        (
            "non-sensitive with the rest of the root's unwrap template",
            base(&[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(false),
                Attribute::WrapWithTrusted(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ]),
        ),
        (
            "WRAP_WITH_TRUSTED=false",
            base(&[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::WrapWithTrusted(false),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ]),
        ),
        (
            "token object",
            base(&[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ]),
        ),
        (
            "a key that can wrap",
            base(&[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::WrapWithTrusted(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ]),
        ),
    ]
}

fn value_of(session: &Session, handle: ObjectHandle) -> Option<Vec<u8>> {
    match session.get_attributes(handle, &[AttributeType::Value]) {
        Ok(values) => values.into_iter().find_map(|a| match a {
            Attribute::Value(v) if !v.is_empty() => Some(v),
            _ => None,
        }),
        Err(_) => None,
    }
}

/// A PIN holder's own AES key that can wrap (an "ordinary user key").
fn attacker_wrapping_key(session: &Session) -> ObjectHandle {
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Extractable(true),
                Attribute::Sensitive(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Decrypt(true),
            ],
        )
        .expect("attacker key")
}

/// Everything a PIN holder might try to get a version's bytes, on a
/// logged-in `session`; returns what worked (empty = nothing leaked).
fn attempt_leaks(
    session: &Session,
    root: ObjectHandle,
    wrapped: &WrappedKey,
    working: ObjectHandle,
    key_type: KeyType,
    variant: RootVariant,
) -> Vec<String> {
    let mut leaks = Vec::new();
    let mut templates = attack_templates(key_type);
    if variant == N {
        templates.push((
            "extractable",
            vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(key_type),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ],
        ));
    }
    for (name, template) in templates {
        if let Ok(h) = session.unwrap_key(&Mechanism::AesKeyWrap, root, &wrapped.blob, &template) {
            leaks.push(format!("unwrap as {name} succeeded"));
            if let Some(value) = value_of(session, h) {
                leaks.push(format!("read {} key bytes", value.len()));
            }
            let _ = session.destroy_object(h);
        }
    }
    // The wrap/decrypt attack: the root as a decryption key.
    for (mechanism, input) in [
        (Mechanism::AesKeyWrap, &wrapped.blob[..]),
        (Mechanism::AesEcb, &wrapped.blob[..32]),
    ] {
        if session.decrypt(&mechanism, root, input).is_ok() {
            leaks.push("C_Decrypt with the root succeeded".into());
        }
    }
    // Reading the value of the working key or the root.
    for (what, h) in [("working key", working), ("root", root)] {
        if value_of(session, h).is_some() {
            leaks.push(format!("CKA_VALUE of the {what} readable"));
        }
    }
    // Exporting the working key under the attacker's own key,
    // then decrypting the blob with it.
    let own = attacker_wrapping_key(session);
    if let Ok(blob) = session.wrap_key(&Mechanism::AesKeyWrap, own, working) {
        leaks.push(format!(
            "working key wrapped under an ordinary key ({} bytes)",
            blob.len()
        ));
    }
    let _ = session.destroy_object(own);
    // Loosening the working key's attributes.
    for loosen in [
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(false),
    ] {
        if session
            .update_attributes(working, std::slice::from_ref(&loosen))
            .is_ok()
            && value_of(session, working).is_some()
        {
            leaks.push(format!("{loosen:?} made the value readable"));
        }
    }
    if session
        .update_attributes(working, &[Attribute::Sensitive(false)])
        .is_ok()
    {
        leaks.push("CKA_SENSITIVE of the working key cleared".into());
    }
    leaks
}

#[test]
fn a_pin_holder_cannot_obtain_key_bytes_by_any_unwrap_or_wrap() {
    for variant in [T, N] {
        let (_token, hsm) = token_with_roots(variant, &[1]);
        let holder = hsm.key_holder().expect("holder");
        for purpose in [KeyPurpose::Kek, KeyPurpose::Hmac] {
            let (wrapped, working) = holder
                .generate_version(1, purpose, variant)
                .expect("version");
            let key_type = match purpose {
                KeyPurpose::Kek => KeyType::AES,
                KeyPurpose::Hmac => KeyType::GENERIC_SECRET,
            };
            let leaked = holder
                .attack_session_for_tests(Some(&working), |session, handle| {
                    let root = root_handle(session, 1);
                    let handle = handle.expect("handle");
                    attempt_leaks(session, root, &wrapped, handle, key_type, variant)
                })
                .expect("attack session");
            assert!(leaked.is_empty(), "{variant:?} {purpose:?}: {leaked:?}");
            holder.destroy(working).expect("destroy");
        }
        // Nothing the attacks tried stayed behind.
        assert_eq!(holder.session_object_count().expect("count"), 0);
    }
}

/// The control for the test above: against a root without an unwrap
/// template the same attacks read the key (design note §1.7 item 1), so
/// the attacks are real and the template is what stops them.
#[test]
fn without_an_unwrap_template_the_same_attacks_read_the_key() {
    let token = TestToken::new();
    create_defective_root_for_tests(
        token.module_path(),
        token.label(),
        &so_pin(&token),
        &RootSpec::for_softhsm(1, T),
        RootDefect::NoUnwrapTemplate,
    )
    .expect("root without unwrap template");
    let hsm = token.open();
    let holder = hsm.key_holder().expect("holder");
    let (wrapped, working) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version");
    let leaked = holder
        .attack_session_for_tests(Some(&working), |session, handle| {
            let root = root_handle(session, 1);
            let handle = handle.expect("handle");
            attempt_leaks(session, root, &wrapped, handle, KeyType::AES, T)
        })
        .expect("attack session");
    assert!(
        leaked.contains(&"read 32 key bytes".to_string()),
        "{leaked:?}"
    );
}

#[test]
fn encrypt_decrypt_round_trip_through_a_working_copy_unwrapped_from_its_blob() {
    for variant in [T, N] {
        let (_token, hsm) = token_with_roots(variant, &[1]);
        let (wrapped, sealed) = {
            let holder = hsm.key_holder().expect("holder");
            let (wrapped, live) = holder
                .generate_version(1, KeyPurpose::Kek, variant)
                .expect("version");
            assert_eq!(wrapped.blob.len(), WRAPPED_KEY_LEN);
            assert_eq!(wrapped.root_epoch, 1);
            assert_eq!(wrapped.mechanism, WrapMechanism::AesKeyWrap);
            let sealed = holder
                .encrypt(&live, b"aad", b"secret data")
                .expect("encrypt");
            (wrapped, sealed)
            // The holder's session closes here: the generated key is gone.
        };
        let holder = hsm.key_holder().expect("second holder");
        assert_eq!(holder.session_object_count().expect("count"), 0);
        let copy = holder
            .unwrap(&wrapped, KeyPurpose::Kek, variant)
            .expect("unwrap");
        let plain = holder
            .decrypt(&copy, &sealed.iv, b"aad", &sealed.ciphertext_and_tag)
            .expect("decrypt");
        assert_eq!(&plain[..], b"secret data");
        assert!(matches!(
            holder.decrypt(&copy, &sealed.iv, b"other aad", &sealed.ciphertext_and_tag),
            Err(HsmError::InvalidCiphertext)
        ));
        // A working key is usable only on its own holder.
        let other = hsm.key_holder().expect("third holder");
        assert!(matches!(
            other.encrypt(&copy, b"", b"x"),
            Err(HsmError::InvalidArgument(_))
        ));
        // A blob carries no attributes (design note §1.7 item 2): it unwraps
        // as whatever the caller asks for, here an HMAC key. Only the
        // catalogue MAC (`WrappedKey::mac_input`) binds a blob to its record.
        let as_hmac = holder
            .unwrap(&wrapped, KeyPurpose::Hmac, variant)
            .expect("a blob has no type of its own");
        assert!(holder.encrypt(&as_hmac, b"", b"x").is_err());
        holder.destroy(as_hmac).expect("destroy");
        assert_eq!(holder.session_object_count().expect("count"), 1);
        holder.destroy(copy).expect("destroy");
        assert_eq!(holder.session_object_count().expect("count"), 0);
    }
}

#[test]
fn root_rotation_rewraps_a_working_copy_and_the_new_blob_decrypts_old_data() {
    let (_token, hsm) = token_with_roots(T, &[1, 2]);
    let holder = hsm.key_holder().expect("holder");
    let kek = kms_hsm::ObjectId::new(b"legacy/v1".to_vec()).expect("id");
    hsm.generate_key(KeyPurpose::Kek, &kek)
        .expect("a legacy token-object KEK");
    assert_eq!(holder.root_epochs().expect("epochs"), [1, 2]);
    let (old, live) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version");
    let sealed = holder
        .encrypt(&live, b"", b"before rotation")
        .expect("encrypt");
    drop(holder);

    let holder = hsm.key_holder().expect("holder");
    let copy = holder.unwrap(&old, KeyPurpose::Kek, T).expect("unwrap old");
    let new = holder.rewrap(&copy, 2).expect("re-wrap under epoch 2");
    assert_eq!(new.root_epoch, 2);
    assert_ne!(new.blob, old.blob);
    drop(holder);

    let holder = hsm.key_holder().expect("holder");
    let copy = holder.unwrap(&new, KeyPurpose::Kek, T).expect("unwrap new");
    let plain = holder
        .decrypt(&copy, &sealed.iv, b"", &sealed.ciphertext_and_tag)
        .expect("decrypt with the re-wrapped version");
    assert_eq!(&plain[..], b"before rotation");

    // Variant N cannot rotate: working keys are not extractable.
    let (_token, hsm) = token_with_roots(N, &[1, 2]);
    let holder = hsm.key_holder().expect("holder");
    let (_, live) = holder
        .generate_version(1, KeyPurpose::Kek, N)
        .expect("version");
    let refused = holder.rewrap(&live, 2);
    assert!(
        matches!(refused, Err(HsmError::Pkcs11 { ref code, .. }) if code.name() == "CKR_KEY_UNEXTRACTABLE"),
        "{refused:?}"
    );
}

#[test]
fn tampered_truncated_and_swapped_blobs_are_corrupt_records_not_a_lost_device() {
    let (_token, hsm) = token_with_roots(T, &[1, 2]);
    let holder = hsm.key_holder().expect("holder");
    let (wrapped, live) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version");
    holder.destroy(live).expect("destroy");

    let mut cases: Vec<(&str, WrappedKey)> = Vec::new();
    for position in [0, 7, 8, 39] {
        let mut tampered = wrapped.clone();
        tampered.blob[position] ^= 0x01;
        cases.push(("tampered", tampered));
    }
    for len in [39, 32, 0] {
        let mut truncated = wrapped.clone();
        truncated.blob.truncate(len);
        cases.push(("truncated", truncated));
    }
    let mut longer = wrapped.clone();
    longer.blob.extend_from_slice(&[0; 8]);
    cases.push(("extended", longer));
    // Swapped to another root: the blob names epoch 2 but was made under 1.
    let swapped = WrappedKey {
        root_epoch: 2,
        ..wrapped.clone()
    };
    cases.push(("swapped root", swapped));
    for (what, case) in cases {
        let e = holder.unwrap(&case, KeyPurpose::Kek, T).expect_err(what);
        assert!(
            matches!(e, HsmError::CorruptWrappedKey { root_epoch } if root_epoch == case.root_epoch),
            "{what}: {e:?}"
        );
        assert!(!e.is_unavailable(), "{what}");
        assert_eq!(
            e.to_string(),
            format!(
                "catalogue record corrupt: the wrapped key does not unwrap under root kms-root/{}",
                case.root_epoch
            )
        );
    }
    // Nothing was created, and the layer is not failing closed.
    assert_eq!(holder.session_object_count().expect("count"), 0);
    assert!(!hsm.is_down());
    hsm.ping().expect("HSM still up");
    let copy = holder
        .unwrap(&wrapped, KeyPurpose::Kek, T)
        .expect("the genuine blob still unwraps");
    holder.encrypt(&copy, b"", b"x").expect("and works");
}

#[test]
fn hsm_hmac_over_catalogue_records_is_stable_and_detects_swapped_blobs() {
    let (_token, hsm) = token_with_roots(T, &[1]);
    let holder = hsm.key_holder().expect("holder");
    let (mac_blob, mac_key) = holder
        .generate_version(1, KeyPurpose::Hmac, T)
        .expect("catalogue HMAC key");
    let (a, _) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version a");
    let (b, _) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version b");
    let record_a = a.mac_input(b"key-a", 1).expect("input");
    let mac = holder.hmac_sign(&mac_key, &record_a).expect("mac");
    assert_eq!(holder.hmac_sign(&mac_key, &record_a).expect("again"), mac);
    assert!(
        holder
            .hmac_verify(&mac_key, &record_a, &mac)
            .expect("verify")
    );
    // Moving a blob to another key, version or record is detected by the MAC.
    for other in [
        b.mac_input(b"key-a", 1).expect("swapped blob"),
        a.mac_input(b"key-b", 1).expect("other key"),
        a.mac_input(b"key-a", 2).expect("other version"),
    ] {
        assert!(!holder.hmac_verify(&mac_key, &other, &mac).expect("verify"));
    }
    assert!(
        !holder
            .hmac_verify(&mac_key, &record_a, &mac[..31])
            .expect("short")
    );
    // An AES working key cannot MAC.
    let (_, aes) = holder.generate_version(1, KeyPurpose::Kek, T).expect("aes");
    assert!(holder.hmac_sign(&aes, b"x").is_err());
    drop(holder);

    // Stable across unwraps: the same key from its blob on another holder.
    let holder = hsm.key_holder().expect("holder");
    let copy = holder
        .unwrap(&mac_blob, KeyPurpose::Hmac, T)
        .expect("unwrap MAC key");
    assert_eq!(holder.hmac_sign(&copy, &record_a).expect("mac"), mac);
    assert!(
        holder.encrypt(&copy, b"", b"x").is_err(),
        "an HMAC key cannot encrypt"
    );
}

#[test]
fn working_keys_encrypt_on_pooled_sessions_in_parallel_and_stale_keys_do_not_reconnect() {
    let (_token, hsm) = token_with_roots(T, &[1]);
    let holder = hsm.key_holder().expect("holder");
    let (_, key) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version");
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let (hsm, holder, key) = (&hsm, &holder, &key);
            scope.spawn(move || {
                for i in 0..50u8 {
                    let data = [t, i];
                    let sealed = hsm
                        .encrypt_with(holder, key, b"aad", &data)
                        .expect("encrypt");
                    // Decrypt on the holder's own session: same key object.
                    let plain = holder
                        .decrypt(key, &sealed.iv, b"aad", &sealed.ciphertext_and_tag)
                        .expect("decrypt");
                    assert_eq!(&plain[..], &data);
                }
            });
        }
    });
    let opened = hsm.counters().sessions_opened;
    let (_, gone) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version");
    let sealed = hsm
        .encrypt_with(&holder, &gone, b"", b"x")
        .expect("encrypt");
    // Destroyed behind the WorkingKey's back (as if its holder session died).
    holder
        .attack_session_for_tests(Some(&gone), |session, handle| {
            session
                .destroy_object(handle.expect("handle"))
                .expect("destroy");
        })
        .expect("session");
    let e = hsm
        .decrypt_with(&holder, &gone, &sealed.iv, b"", &sealed.ciphertext_and_tag)
        .expect_err("destroyed key");
    assert!(matches!(e, HsmError::WorkingKeyStale), "{e:?}");
    assert!(!hsm.is_down());
    assert_eq!(hsm.counters().sessions_opened, opened, "no reconnect");
}

/// AES-256-GCM of 1 KiB, `ops` times, on one session with `key`; ops/s.
fn gcm_ops_per_second(session: &Session, key: ObjectHandle, ops: u32) -> f64 {
    let data = [0x5Au8; 1024];
    let started = Instant::now();
    for i in 0..ops {
        let mut iv = [0u8; 12];
        iv[..4].copy_from_slice(&i.to_be_bytes());
        let params = GcmParams::new(&mut iv, b"", 128.into()).expect("params");
        session
            .encrypt(&Mechanism::AesGcm(params), key, &data)
            .expect("encrypt");
    }
    f64::from(ops) / started.elapsed().as_secs_f64()
}

/// Measures, and prints (run with `--no-capture`), AES-GCM throughput of a
/// working key (session object) vs a token-object KEK on one session, and
/// the first-use unwrap latency. Asserts only that both keys work.
#[test]
// The figures are this test's output (issue 14 item 7 asks for them).
#[allow(clippy::print_stdout)]
fn measure_session_working_key_vs_token_object_encrypt_throughput() {
    let (_token, hsm) = token_with_roots(T, &[1]);
    let token_kek = kms_hsm::ObjectId::new(b"bench/token-kek".to_vec()).expect("id");
    hsm.generate_key(KeyPurpose::Kek, &token_kek)
        .expect("token KEK");
    let holder: KeyHolder = hsm.key_holder().expect("holder");
    let (wrapped, working) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version");
    const OPS: u32 = 2000;
    let (session_rates, token_rates) = holder
        .attack_session_for_tests(Some(&working), |session, working| {
            let working = working.expect("handle");
            let token = session
                .find_objects(&[Attribute::Id(token_kek.as_bytes().to_vec())])
                .expect("find")[0];
            // Warm up, then alternate so drift hits both alike.
            gcm_ops_per_second(session, working, 200);
            gcm_ops_per_second(session, token, 200);
            let mut s = Vec::new();
            let mut t = Vec::new();
            for _ in 0..3 {
                s.push(gcm_ops_per_second(session, working, OPS));
                t.push(gcm_ops_per_second(session, token, OPS));
            }
            (s, t)
        })
        .expect("measure");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, t) = (median(session_rates), median(token_rates));
    // First-use cost: unwrap + attribute read-back, then destroy.
    let rounds = 200u32;
    let started = Instant::now();
    for _ in 0..rounds {
        let copy = holder.unwrap(&wrapped, KeyPurpose::Kek, T).expect("unwrap");
        holder.destroy(copy).expect("destroy");
    }
    let unwrap_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    // Through the facade's session pool, one thread: what the service pays.
    let data = [0x5Au8; 1024];
    let pooled = |f: &dyn Fn()| {
        f();
        let started = Instant::now();
        for _ in 0..OPS {
            f();
        }
        f64::from(OPS) / started.elapsed().as_secs_f64()
    };
    let pool_session = pooled(&|| {
        hsm.encrypt_with(&holder, &working, b"", &data)
            .map(drop)
            .expect("encrypt_with")
    });
    let pool_token = pooled(&|| {
        hsm.encrypt(&token_kek, b"", &data)
            .map(drop)
            .expect("encrypt")
    });
    println!(
        "through the Hsm pool, 1 KiB: encrypt_with(working key) {pool_session:.0} ops/s, \
         encrypt(token-object KEK) {pool_token:.0} ops/s, ratio {:.2}",
        pool_session / pool_token
    );
    println!(
        "AES-256-GCM 1 KiB, one session, {OPS} ops x3 (median): session working key {s:.0} ops/s \
         ({:.1} us/op), token-object KEK {t:.0} ops/s ({:.1} us/op), ratio {:.2}; \
         first-use unwrap+read-back+destroy {unwrap_us:.1} us",
        1e6 / s,
        1e6 / t,
        s / t
    );
    assert!(s > 0.0 && t > 0.0);
}

/// The attacks of design note §1.7 items 3, 7 and 11 that
/// `attempt_leaks` does not play, and the routes around the unwrap
/// template through other PKCS#11 functions: a PIN holder making a trusted
/// key of its own (only the SO may set `CKA_TRUSTED`) and exporting the
/// working key under it; exporting the root itself; using the root with
/// any mechanism but `CKM_AES_KEY_WRAP` (`CKM_AES_KEY_WRAP_PAD` 0x210A,
/// ECB, CBC: wrap, unwrap or encrypt); copying the working key with looser
/// attributes (`C_CopyObject`); deriving a readable key from it
/// (`C_DeriveKey`). Each must fail, in both variants, and leave nothing.
#[test]
fn a_pin_holder_cannot_leak_keys_through_trust_copy_derive_or_other_mechanisms() {
    for variant in [T, N] {
        let (_token, hsm) = token_with_roots(variant, &[1]);
        let holder = hsm.key_holder().expect("holder");
        let (wrapped, working) = holder
            .generate_version(1, KeyPurpose::Kek, variant)
            .expect("version");
        let leaked = holder
            .attack_session_for_tests(Some(&working), |session, handle| {
                let root = root_handle(session, 1);
                let working = handle.expect("handle");
                let mut leaks: Vec<String> = Vec::new();

                // §1.7 item 11: CKA_TRUSTED is the SO's alone.
                let trusted_own = session.generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(false),
                        Attribute::Extractable(true),
                        Attribute::Sensitive(false),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Trusted(true),
                    ],
                );
                if let Ok(h) = trusted_own {
                    leaks.push("a PIN holder generated a CKA_TRUSTED key".into());
                    if session.wrap_key(&Mechanism::AesKeyWrap, h, working).is_ok() {
                        leaks.push("working key wrapped under the PIN holder's trusted key".into());
                    }
                    let _ = session.destroy_object(h);
                }
                // SoftHSM2 2.6.1 leaves the half-made object of the refused
                // C_GenerateKey behind (as a session object of the caller):
                // it must not be trusted nor able to take the working key.
                let session_objects = session
                    .find_objects(&[Attribute::Token(false)])
                    .expect("find session objects");
                for h in session_objects.into_iter().filter(|&h| h != working) {
                    let trusted = session
                        .get_attributes(h, &[AttributeType::Trusted])
                        .ok()
                        .into_iter()
                        .flatten()
                        .any(|a| matches!(a, Attribute::Trusted(true)));
                    if trusted {
                        leaks.push("a refused C_GenerateKey left a CKA_TRUSTED key".into());
                    }
                    if session.wrap_key(&Mechanism::AesKeyWrap, h, working).is_ok() {
                        leaks.push("working key wrapped under a left-over object".into());
                    }
                    let _ = session.destroy_object(h);
                }
                let own = attacker_wrapping_key(session);
                if session
                    .update_attributes(own, &[Attribute::Trusted(true)])
                    .is_ok()
                {
                    leaks.push("a PIN holder set CKA_TRUSTED on its own key".into());
                }
                if session
                    .wrap_key(&Mechanism::AesKeyWrap, own, working)
                    .is_ok()
                {
                    leaks.push("working key wrapped under an ordinary key".into());
                }

                // The root never leaves, under any key.
                for (what, wrapping) in [("the PIN holder's key", own), ("itself", root)] {
                    for mechanism in [Mechanism::AesKeyWrap, Mechanism::AesKeyWrapPad] {
                        if session.wrap_key(&mechanism, wrapping, root).is_ok() {
                            leaks.push(format!("root wrapped under {what} with {mechanism:?}"));
                        }
                    }
                }

                // §1.7 items 3 and 7: the root works with CKM_AES_KEY_WRAP only.
                let mut legit = vec![
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                ];
                legit.push(match variant {
                    RootVariant::Trusted => Attribute::WrapWithTrusted(true),
                    _ => Attribute::Extractable(false),
                });
                legit.extend([
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                ]);
                for mechanism in [
                    Mechanism::AesKeyWrapPad,
                    Mechanism::AesEcb,
                    Mechanism::AesCbc([0; 16]),
                ] {
                    if session.wrap_key(&mechanism, root, working).is_ok() {
                        leaks.push(format!(
                            "working key wrapped under the root with {mechanism:?}"
                        ));
                    }
                    if let Ok(h) = session.unwrap_key(&mechanism, root, &wrapped.blob, &legit) {
                        leaks.push(format!("blob unwrapped under the root with {mechanism:?}"));
                        let _ = session.destroy_object(h);
                    }
                    if session.encrypt(&mechanism, root, &[0u8; 32]).is_ok() {
                        leaks.push(format!("C_Encrypt with the root and {mechanism:?}"));
                    }
                }

                // C_CopyObject with looser attributes (CKA_COPYABLE=false).
                for loosen in [
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::WrapWithTrusted(false),
                    Attribute::Token(true),
                    Attribute::Private(true),
                ] {
                    if let Ok(h) = session.copy_object(working, std::slice::from_ref(&loosen)) {
                        leaks.push(format!("working key copied with {loosen:?}"));
                        if value_of(session, h).is_some() {
                            leaks.push("the copy's CKA_VALUE is readable".into());
                        }
                        let _ = session.destroy_object(h);
                    }
                }

                // C_DeriveKey from the working key (CKA_DERIVE=false) into a
                // readable key.
                let readable = [
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                ];
                let data = [0u8; 32];
                for mechanism in [
                    Mechanism::ConcatenateBaseAndKey(own),
                    Mechanism::AesCbcEncryptData(
                        cryptoki::mechanism::ekdf::AesCbcDeriveParams::new([0; 16], &data),
                    ),
                ] {
                    if let Ok(h) = session.derive_key(&mechanism, working, &readable) {
                        leaks.push(format!(
                            "a key derived from the working key with {mechanism:?}"
                        ));
                        if value_of(session, h).is_some() {
                            leaks.push("the derived key's CKA_VALUE is readable".into());
                        }
                        let _ = session.destroy_object(h);
                    }
                }
                let _ = session.destroy_object(own);
                leaks
            })
            .expect("attack session");
        assert!(leaked.is_empty(), "{variant:?}: {leaked:?}");
        holder.destroy(working).expect("destroy");
        assert_eq!(holder.session_object_count().expect("count"), 0);
    }
}

/// The control for the derive and copy attacks above: on a key of the PIN
/// holder's own that allows derivation, the same `C_DeriveKey` does give a
/// readable key on this SoftHSM2, so the attack is real and the working
/// key's `CKA_DERIVE=false` is what stops it.
#[test]
fn the_derive_attack_works_on_a_key_that_allows_it() {
    let (_token, hsm) = token_with_roots(T, &[1]);
    let holder = hsm.key_holder().expect("holder");
    let read = holder
        .attack_session_for_tests(None, |session, _| {
            let base = session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(false),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Derive(true),
                    ],
                )
                .expect("base key");
            let data = [0u8; 32];
            let derived = session
                .derive_key(
                    &Mechanism::AesCbcEncryptData(
                        cryptoki::mechanism::ekdf::AesCbcDeriveParams::new([0; 16], &data),
                    ),
                    base,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(false),
                        Attribute::Sensitive(false),
                        Attribute::Extractable(true),
                    ],
                )
                .expect("derive from a key with CKA_DERIVE=true");
            let value = value_of(session, derived);
            let _ = session.destroy_object(derived);
            let _ = session.destroy_object(base);
            value
        })
        .expect("attack session");
    assert_eq!(read.map(|v| v.len()), Some(32));
}

/// `rotate_root` (root rotation's ceremony, issue 14 item 5) adds the next
/// epoch with the variant of the highest, verified by the probe; a version
/// re-wrapped under it survives the destruction of its old root, and the
/// old blob is dead with it.
#[test]
fn rotate_root_adds_the_next_epoch_and_a_rewrapped_version_outlives_the_old_root() {
    let (token, hsm) = token_with_roots(T, &[1]);
    let holder = hsm.key_holder().expect("holder");
    let (old_blob, key) = holder
        .generate_version(1, KeyPurpose::Kek, T)
        .expect("version under epoch 1");
    let sealed = holder
        .encrypt(&key, b"aad", b"made under epoch 1")
        .expect("encrypt");
    holder.destroy(key).expect("destroy");
    drop(holder);
    // The ceremony logs in as the user and the SO: no other login in this
    // process (a separate process in production).
    drop(hsm);
    let rotated = kms_hsm::rotate_root(
        token.module_path(),
        token.label(),
        &so_pin(&token),
        &user_pin(&token),
        false,
    )
    .expect("rotate root");
    assert_eq!(
        (rotated.previous, rotated.epoch, rotated.variant),
        (1, 2, T)
    );

    let hsm = token.open();
    let holder = hsm.key_holder().expect("holder");
    assert_eq!(holder.root_epochs().expect("epochs"), vec![1, 2]);
    assert_eq!(holder.verify_root(2, Some(T)).expect("probe"), T);
    assert!(holder.has_root(2).expect("has 2"));
    assert!(!holder.has_root(3).expect("has 3"));

    let copy = holder
        .unwrap(&old_blob, KeyPurpose::Kek, T)
        .expect("unwrap under 1");
    let new_blob = holder.rewrap(&copy, 2).expect("re-wrap under 2");
    holder.destroy(copy).expect("destroy copy");
    assert_eq!(new_blob.root_epoch, 2);
    assert_ne!(new_blob.blob, old_blob.blob);

    holder.destroy_root(1).expect("destroy root 1");
    assert!(!holder.has_root(1).expect("has 1"));
    assert_eq!(holder.root_epochs().expect("epochs"), vec![2]);
    let working = holder
        .unwrap(&new_blob, KeyPurpose::Kek, T)
        .expect("unwrap under 2");
    let plain = holder
        .decrypt(&working, &sealed.iv, b"aad", &sealed.ciphertext_and_tag)
        .expect("decrypt");
    assert_eq!(&plain[..], b"made under epoch 1");
    // The old blob died with its root.
    assert!(
        matches!(
            holder.unwrap(&old_blob, KeyPurpose::Kek, T),
            Err(HsmError::ObjectNotFound { .. })
        ),
        "a blob under a destroyed root must not unwrap"
    );
    assert!(matches!(
        holder.destroy_root(1),
        Err(HsmError::ObjectNotFound { .. })
    ));
}

/// Root rotation is refused, and nothing is created, for a variant-N root
/// (no trusted wrapping), with a wrong security-officer PIN, and on a
/// token without a root.
#[test]
fn rotate_root_refuses_variant_n_a_wrong_so_pin_and_a_token_without_root() {
    let epochs_of = |token: &TestToken| {
        let hsm = token.open();
        let holder = hsm.key_holder().expect("holder");
        holder.root_epochs().expect("epochs")
    };

    let (token, hsm) = token_with_roots(N, &[1]);
    drop(hsm);
    let refused = kms_hsm::rotate_root(
        token.module_path(),
        token.label(),
        &so_pin(&token),
        &user_pin(&token),
        false,
    );
    assert!(
        matches!(refused, Err(HsmError::RootRotationUnsupported { epoch: 1 })),
        "{refused:?}"
    );
    let message = refused.expect_err("refused").to_string();
    assert!(message.contains("needs trusted wrapping"), "{message}");
    assert_eq!(epochs_of(&token), vec![1]);

    let (token, hsm) = token_with_roots(T, &[1]);
    drop(hsm);
    let refused = kms_hsm::rotate_root(
        token.module_path(),
        token.label(),
        &Pin::new("not-the-so-pin"),
        &user_pin(&token),
        false,
    );
    assert!(matches!(refused, Err(HsmError::PinRejected)), "{refused:?}");
    assert_eq!(epochs_of(&token), vec![1]);

    let token = TestToken::new();
    let refused = kms_hsm::rotate_root(
        token.module_path(),
        token.label(),
        &so_pin(&token),
        &user_pin(&token),
        false,
    );
    assert!(matches!(refused, Err(HsmError::NoRoot)), "{refused:?}");
    assert!(epochs_of(&token).is_empty());
}

/// `init_root` makes only a token's first root: on a token that holds one,
/// a second "first" root of another variant or out of epoch order (which
/// would make the next start unwrap service keys under the wrong root) is
/// refused naming the roots found, and nothing is created.
#[test]
fn init_root_refuses_a_token_that_already_holds_a_root() {
    let epochs_of = |token: &TestToken| {
        let hsm = token.open();
        let holder = hsm.key_holder().expect("holder");
        holder.root_epochs().expect("epochs")
    };
    let (token, hsm) = token_with_roots(T, &[1]);
    drop(hsm);
    for (variant, pin, epoch) in [
        (N, user_pin(&token), 7),
        (T, so_pin(&token), 2),
        (T, so_pin(&token), 1),
    ] {
        let refused = kms_hsm::init_root(
            token.module_path(),
            token.label(),
            &pin,
            &RootSpec::for_softhsm(epoch, variant),
        );
        assert!(
            matches!(&refused, Err(HsmError::RootExists { epochs }) if epochs == &[1]),
            "{variant:?} epoch {epoch}: {refused:?}"
        );
        let message = refused.expect_err("refused").to_string();
        assert!(
            message.contains("kms-root/1") && message.contains("rotate-root"),
            "{message}"
        );
    }
    assert_eq!(epochs_of(&token), vec![1]);

    // On an empty token it is the first root.
    let token = TestToken::new();
    kms_hsm::init_root(
        token.module_path(),
        token.label(),
        &so_pin(&token),
        &RootSpec::for_softhsm(1, T),
    )
    .expect("first root");
    assert_eq!(epochs_of(&token), vec![1]);
}

/// The cluster tests' root (design note §1.5.1 note *2): the same known
/// value SO-imported on several tokens is one root. A version generated and
/// wrapped on token A unwraps on token B and decrypts what A encrypted, in
/// both directions; a token whose root holds another value refuses the blob.
/// The imported root has the generated root's attributes and passes the
/// server's start-up probe as variant T.
#[test]
fn the_same_test_root_imported_on_two_tokens_unwraps_the_same_blobs() {
    use kms_hsm::testing::import_test_root;
    let value = [0x5au8; 32];
    let other_value = [0xa5u8; 32];
    let tokens: Vec<TestToken> = (0..3).map(|_| TestToken::new()).collect();
    for (token, value) in tokens.iter().zip([&value, &value, &other_value]) {
        import_test_root(
            token.module_path(),
            token.label(),
            &so_pin(token),
            &user_pin(token),
            1,
            value,
        )
        .expect("import test root");
    }
    let again = import_test_root(
        tokens[0].module_path(),
        tokens[0].label(),
        &so_pin(&tokens[0]),
        &user_pin(&tokens[0]),
        1,
        &value,
    );
    assert!(
        matches!(again, Err(HsmError::ObjectExists { ref id }) if id == "kms-root/1"),
        "{again:?}"
    );
    let hsms: Vec<Hsm> = tokens.iter().map(TestToken::open).collect();
    let holders: Vec<KeyHolder> = hsms
        .iter()
        .map(|h| h.key_holder().expect("holder"))
        .collect();
    for holder in &holders {
        assert_eq!(holder.verify_root(1, None).expect("probe"), T);
        let info = holder.root_info(1).expect("root info");
        assert!(flag(&info.flags, "CKA_TRUSTED"));
        assert!(!flag(&info.flags, "CKA_EXTRACTABLE"));
        assert!(!flag(&info.flags, "CKA_MODIFIABLE"));
        assert!(!info.value_readable);
    }
    for (from, to) in [(0, 1), (1, 0)] {
        let (wrapped, key) = holders[from]
            .generate_version(1, KeyPurpose::Kek, T)
            .expect("generate version");
        let sealed = holders[from]
            .encrypt(&key, b"aad", b"one root, two tokens")
            .expect("encrypt");
        let copy = holders[to]
            .unwrap(&wrapped, KeyPurpose::Kek, T)
            .expect("unwrap on the other token");
        let opened = holders[to]
            .decrypt(&copy, &sealed.iv, b"aad", &sealed.ciphertext_and_tag)
            .expect("decrypt on the other token");
        assert_eq!(&opened[..], b"one root, two tokens");
        let foreign = holders[2].unwrap(&wrapped, KeyPurpose::Kek, T);
        assert!(
            matches!(foreign, Err(HsmError::CorruptWrappedKey { .. })),
            "a root with another value must refuse the blob: {foreign:?}"
        );
    }
}
