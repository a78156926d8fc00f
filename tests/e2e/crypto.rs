//! Envelope encryption end to end.

use kms_proto::v1 as pb;
use kms_tests::TestEnv;
use tonic::Code;

use super::{create_key, ctx, decrypt, encrypt};

#[tokio::test]
async fn encrypt_decrypt_round_trip_with_context_and_without_key_id() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "round trip").await;
    let sealed = encrypt(
        &server,
        &key,
        b"attack at dawn",
        &[("tenant", "acme"), ("purpose", "test")],
    )
    .await;
    assert_eq!(sealed.key_id, key);
    assert_eq!(sealed.key_version, 1);
    assert!(!sealed.ciphertext_blob.windows(6).any(|w| w == b"attack"));

    // Context order does not matter; no key id is needed.
    let opened = decrypt(
        &server,
        &sealed.ciphertext_blob,
        &[("purpose", "test"), ("tenant", "acme")],
    )
    .await
    .expect("decrypt");
    assert_eq!(opened.plaintext, b"attack at dawn");
    assert_eq!(opened.key_id, key);
    assert_eq!(opened.key_version, 1);
}

#[tokio::test]
async fn every_tampering_gives_the_same_generic_error() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "tamper").await;
    let context = [("tenant", "acme")];
    let blob = encrypt(&server, &key, b"0123456789abcdef0123456789abcdef", &context)
        .await
        .ciphertext_blob;

    let expect_generic = |result: Result<pb::DecryptResponse, tonic::Status>, what: String| {
        let status = result.expect_err(&what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(status.message(), "invalid ciphertext", "{what}");
    };
    // A flipped bit at every byte position.
    for i in 0..blob.len() {
        let mut bad = blob.clone();
        bad[i] ^= 0x01;
        expect_generic(
            decrypt(&server, &bad, &context).await,
            format!("bit flip at byte {i}"),
        );
    }
    // Truncation at every length.
    for len in 0..blob.len() {
        expect_generic(
            decrypt(&server, &blob[..len], &context).await,
            format!("truncated to {len}"),
        );
    }
    // Appended garbage.
    let mut longer = blob.clone();
    longer.push(0);
    expect_generic(
        decrypt(&server, &longer, &context).await,
        "one byte appended".into(),
    );
    // Wrong, missing and extra context.
    expect_generic(
        decrypt(&server, &blob, &[("tenant", "other")]).await,
        "wrong context value".into(),
    );
    expect_generic(decrypt(&server, &blob, &[]).await, "missing context".into());
    expect_generic(
        decrypt(&server, &blob, &[("tenant", "acme"), ("x", "y")]).await,
        "extra context".into(),
    );
    // The genuine blob still works.
    assert!(decrypt(&server, &blob, &context).await.is_ok());
}

#[tokio::test]
async fn a_blob_cannot_be_decrypted_as_another_key() {
    let env = TestEnv::new();
    let server = env.start().await;
    let a = create_key(&server, "a").await;
    let b = create_key(&server, "b").await;
    server
        .keys()
        .create_alias(pb::CreateAliasRequest {
            alias_name: "alias/b".into(),
            target_key_id: b.clone(),
        })
        .await
        .expect("alias");
    let blob = encrypt(&server, &a, b"for a only", &[])
        .await
        .ciphertext_blob;
    for named in [b.as_str(), "alias/b"] {
        let status = server
            .crypto()
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&[]),
                key_id: named.to_owned(),
            })
            .await
            .expect_err("key confusion");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid ciphertext");
    }
    // Naming the right key (by id) works.
    let ok = server
        .crypto()
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob,
            encryption_context: ctx(&[]),
            key_id: a.clone(),
        })
        .await
        .expect("right key");
    assert_eq!(ok.into_inner().plaintext, b"for a only");
}

#[tokio::test]
async fn rotation_keeps_old_ciphertexts_decryptable_and_reencrypt_moves_them() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "rotating").await;
    let v1 = encrypt(&server, &key, b"written under v1", &[("k", "v")]).await;
    assert_eq!(v1.key_version, 1);

    let rotated = server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.new_version.expect("version").version, 2);
    assert_eq!(rotated.key_metadata.expect("metadata").primary_version, 2);

    let v2 = encrypt(&server, &key, b"written under v2", &[("k", "v")]).await;
    assert_eq!(v2.key_version, 2);
    // Both decrypt: rotation never requires re-encryption.
    assert_eq!(
        decrypt(&server, &v1.ciphertext_blob, &[("k", "v")])
            .await
            .expect("v1")
            .plaintext,
        b"written under v1"
    );
    assert_eq!(
        decrypt(&server, &v2.ciphertext_blob, &[("k", "v")])
            .await
            .expect("v2")
            .plaintext,
        b"written under v2"
    );

    // ReEncrypt moves the v1 ciphertext to v2 (and may change the context).
    let moved = server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: v1.ciphertext_blob.clone(),
            source_encryption_context: ctx(&[("k", "v")]),
            source_key_id: String::new(),
            destination_key_id: key.clone(),
            destination_encryption_context: ctx(&[("k", "new")]),
        })
        .await
        .expect("re-encrypt")
        .into_inner();
    assert_eq!(moved.source_key_version, 1);
    assert_eq!(moved.key_version, 2);
    assert_eq!(
        decrypt(&server, &moved.ciphertext_blob, &[("k", "new")])
            .await
            .expect("moved")
            .plaintext,
        b"written under v1"
    );

    // ReEncrypt to another key.
    let other = create_key(&server, "other").await;
    let to_other = server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: v2.ciphertext_blob.clone(),
            source_encryption_context: ctx(&[("k", "v")]),
            source_key_id: key.clone(),
            destination_key_id: other.clone(),
            destination_encryption_context: ctx(&[]),
        })
        .await
        .expect("re-encrypt to other key")
        .into_inner();
    assert_eq!(to_other.key_id, other);
    assert_eq!(
        decrypt(&server, &to_other.ciphertext_blob, &[])
            .await
            .expect("other")
            .plaintext,
        b"written under v2"
    );

    // Disabling an old version refuses its ciphertexts distinctly, and
    // re-enabling brings them back.
    server
        .keys()
        .disable_key_version(pb::DisableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("disable v1");
    let status = decrypt(&server, &v1.ciphertext_blob, &[("k", "v")])
        .await
        .expect_err("disabled version");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        decrypt(&server, &v2.ciphertext_blob, &[("k", "v")])
            .await
            .is_ok()
    );
    // The primary version cannot be disabled.
    let status = server
        .keys()
        .disable_key_version(pb::DisableKeyVersionRequest {
            key_id: key.clone(),
            version: 2,
        })
        .await
        .expect_err("primary");
    assert_eq!(status.code(), Code::FailedPrecondition);
    server
        .keys()
        .enable_key_version(pb::EnableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("enable v1");
    assert!(
        decrypt(&server, &v1.ciphertext_blob, &[("k", "v")])
            .await
            .is_ok()
    );

    // Setting v1 primary again makes Encrypt use it.
    server
        .keys()
        .set_primary_version(pb::SetPrimaryVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("set primary");
    assert_eq!(encrypt(&server, &key, b"x", &[]).await.key_version, 1);
}

#[tokio::test]
async fn disabled_keys_refuse_every_use_with_failed_precondition() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "to disable").await;
    let blob = encrypt(&server, &key, b"secret", &[]).await.ciphertext_blob;
    server
        .keys()
        .disable_key(pb::DisableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("disable");
    let status = server
        .crypto()
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[]),
        })
        .await
        .expect_err("encrypt with disabled key");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("disabled"),
        "{}",
        status.message()
    );
    let status = decrypt(&server, &blob, &[])
        .await
        .expect_err("decrypt with disabled key");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = server
        .crypto()
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            encryption_context: ctx(&[]),
            length: Some(pb::generate_data_key_request::Length::KeySpec(
                pb::DataKeySpec::Aes256 as i32,
            )),
        })
        .await
        .expect_err("data key with disabled key");
    assert_eq!(status.code(), Code::FailedPrecondition);

    server
        .keys()
        .enable_key(pb::EnableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("enable");
    assert_eq!(
        decrypt(&server, &blob, &[])
            .await
            .expect("enabled again")
            .plaintext,
        b"secret"
    );
}

#[tokio::test]
async fn data_keys_random_and_batches() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "data keys").await;
    let mut crypto = server.crypto();

    let dk = crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            encryption_context: ctx(&[("file", "a")]),
            length: Some(pb::generate_data_key_request::Length::KeySpec(
                pb::DataKeySpec::Aes256 as i32,
            )),
        })
        .await
        .expect("data key")
        .into_inner();
    assert_eq!(dk.plaintext.len(), 32);
    let opened = decrypt(&server, &dk.ciphertext_blob, &[("file", "a")])
        .await
        .expect("decrypt data key");
    assert_eq!(opened.plaintext, dk.plaintext);

    let dk16 = crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            encryption_context: ctx(&[]),
            length: Some(pb::generate_data_key_request::Length::NumberOfBytes(16)),
        })
        .await
        .expect("16-byte data key")
        .into_inner();
    assert_eq!(dk16.plaintext.len(), 16);

    let without = crypto
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            key_id: key.clone(),
            encryption_context: ctx(&[]),
            length: Some(
                pb::generate_data_key_without_plaintext_request::Length::KeySpec(
                    pb::DataKeySpec::Aes128 as i32,
                ),
            ),
        })
        .await
        .expect("without plaintext")
        .into_inner();
    assert_eq!(
        decrypt(&server, &without.ciphertext_blob, &[])
            .await
            .expect("decrypt")
            .plaintext
            .len(),
        16
    );

    for bad in [
        None,
        Some(pb::generate_data_key_request::Length::NumberOfBytes(0)),
        Some(pb::generate_data_key_request::Length::NumberOfBytes(4096)),
        Some(pb::generate_data_key_request::Length::KeySpec(0)),
    ] {
        let status = crypto
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.clone(),
                encryption_context: ctx(&[]),
                length: bad,
            })
            .await
            .expect_err("bad length");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }

    let random = crypto
        .generate_random(pb::GenerateRandomRequest {
            number_of_bytes: 64,
        })
        .await
        .expect("random")
        .into_inner();
    assert_eq!(random.random_bytes.len(), 64);
    let status = crypto
        .generate_random(pb::GenerateRandomRequest { number_of_bytes: 0 })
        .await
        .expect_err("zero bytes");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Batches: per-item results.
    let batch = crypto
        .batch_encrypt(pb::BatchEncryptRequest {
            key_id: key.clone(),
            entries: vec![
                pb::BatchEncryptEntry {
                    plaintext: b"one".to_vec(),
                    encryption_context: ctx(&[("i", "1")]),
                },
                pb::BatchEncryptEntry {
                    plaintext: Vec::new(),
                    encryption_context: ctx(&[]),
                },
                pb::BatchEncryptEntry {
                    plaintext: b"three".to_vec(),
                    encryption_context: ctx(&[]),
                },
            ],
        })
        .await
        .expect("batch encrypt")
        .into_inner();
    assert_eq!(batch.results.len(), 3);
    let blobs: Vec<Option<Vec<u8>>> = batch
        .results
        .into_iter()
        .map(|r| match r.outcome {
            Some(pb::batch_encrypt_result::Outcome::Result(ok)) => Some(ok.ciphertext_blob),
            Some(pb::batch_encrypt_result::Outcome::Error(e)) => {
                assert_eq!(e.code, Code::InvalidArgument as i32);
                None
            }
            None => panic!("empty outcome"),
        })
        .collect();
    assert!(blobs[0].is_some() && blobs[1].is_none() && blobs[2].is_some());

    let mut corrupt = blobs[2].clone().expect("blob");
    corrupt[30] ^= 1;
    let decrypted = crypto
        .batch_decrypt(pb::BatchDecryptRequest {
            key_id: String::new(),
            entries: vec![
                pb::BatchDecryptEntry {
                    ciphertext_blob: blobs[0].clone().expect("blob"),
                    encryption_context: ctx(&[("i", "1")]),
                },
                pb::BatchDecryptEntry {
                    ciphertext_blob: corrupt,
                    encryption_context: ctx(&[]),
                },
            ],
        })
        .await
        .expect("batch decrypt")
        .into_inner();
    match &decrypted.results[0].outcome {
        Some(pb::batch_decrypt_result::Outcome::Result(ok)) => assert_eq!(ok.plaintext, b"one"),
        other => panic!("item 0: {other:?}"),
    }
    match &decrypted.results[1].outcome {
        Some(pb::batch_decrypt_result::Outcome::Error(e)) => {
            assert_eq!(e.message, "invalid ciphertext")
        }
        other => panic!("item 1: {other:?}"),
    }

    let keys = crypto
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key.clone(),
            entries: (0..100)
                .map(|_| pb::BatchGenerateDataKeyEntry {
                    encryption_context: ctx(&[]),
                    length: Some(pb::batch_generate_data_key_entry::Length::KeySpec(
                        pb::DataKeySpec::Aes256 as i32,
                    )),
                })
                .collect(),
        })
        .await
        .expect("batch data keys")
        .into_inner();
    assert_eq!(keys.results.len(), 100);
    assert!(keys.results.iter().all(|r| matches!(
        r.outcome,
        Some(pb::batch_generate_data_key_result::Outcome::Result(_))
    )));

    // Empty batch refused.
    let status = crypto
        .batch_encrypt(pb::BatchEncryptRequest {
            key_id: key,
            entries: vec![],
        })
        .await
        .expect_err("empty batch");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn limits_on_plaintext_and_context_and_unknown_keys() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "limits").await;
    let mut crypto = server.crypto();
    let big = vec![7u8; 4097];
    let status = crypto
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: big,
            encryption_context: ctx(&[]),
        })
        .await
        .expect_err("too big");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("GenerateDataKey"),
        "{}",
        status.message()
    );
    assert!(
        crypto
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: vec![1u8; 4096],
                encryption_context: ctx(&[])
            })
            .await
            .is_ok()
    );

    let huge_value = "v".repeat(9000);
    let status = crypto
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[("k", huge_value.as_str())]),
        })
        .await
        .expect_err("context too big");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = crypto
        .encrypt(pb::EncryptRequest {
            key_id: key.clone(),
            plaintext: b"x".to_vec(),
            encryption_context: ctx(&[("", "v")]),
        })
        .await
        .expect_err("empty context key");
    assert_eq!(status.code(), Code::InvalidArgument);

    for (name, code) in [
        ("key-00000000000000000000000000000000", Code::NotFound),
        ("alias/nope", Code::NotFound),
        ("not-a-key", Code::InvalidArgument),
        ("", Code::InvalidArgument),
    ] {
        let status = crypto
            .encrypt(pb::EncryptRequest {
                key_id: name.into(),
                plaintext: b"x".to_vec(),
                encryption_context: ctx(&[]),
            })
            .await
            .expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
    }
}

fn hsm_random_calls(server: &kms_tests::TestServer) -> u64 {
    server
        .service()
        .hsm()
        .operation_stats()
        .iter()
        .find(|s| s.operation == kms_hsm::Operation::GenerateRandom)
        .map_or(0, |s| s.calls)
}

fn batch_of(contexts: &[&[(&str, &str)]]) -> Vec<pb::BatchGenerateDataKeyEntry> {
    contexts
        .iter()
        .map(|c| pb::BatchGenerateDataKeyEntry {
            encryption_context: ctx(c),
            length: Some(pb::batch_generate_data_key_entry::Length::KeySpec(
                pb::DataKeySpec::Aes256 as i32,
            )),
        })
        .collect()
}

#[tokio::test]
async fn a_batch_of_data_keys_draws_hsm_randomness_once_and_never_for_denied_items() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "batch randomness").await;
    // The caller may generate (and decrypt) data keys only with tenant=acme
    // in the context.
    server
        .keys()
        .put_key_policy(pb::PutKeyPolicyRequest {
            key_id: key.clone(),
            policy: Some(pb::KeyPolicy {
                grants: vec![pb::Grant {
                    principal: "anonymous".to_owned(),
                    permissions: vec![
                        pb::Permission::GenerateDataKey as i32,
                        pb::Permission::Decrypt as i32,
                    ],
                    required_encryption_context: ctx(&[("tenant", "acme")]),
                }],
            }),
        })
        .await
        .expect("policy");
    let mut crypto = server.crypto();
    let before = hsm_random_calls(&server);
    let denied = crypto
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key.clone(),
            entries: batch_of(&[&[("tenant", "other")], &[], &[("tenant", "evil")]]),
        })
        .await
        .expect("batch")
        .into_inner();
    use pb::batch_generate_data_key_result::Outcome;
    assert!(denied.results.iter().all(|r| matches!(
        &r.outcome,
        Some(Outcome::Error(e)) if e.code == Code::PermissionDenied as i32
    )));
    assert_eq!(
        hsm_random_calls(&server),
        before,
        "randomness drawn for a denied caller"
    );

    let acme: &[(&str, &str)] = &[("tenant", "acme")];
    let mixed = crypto
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key.clone(),
            entries: batch_of(&[&[], acme, acme, &[("tenant", "x")], acme]),
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(
        hsm_random_calls(&server),
        before + 1,
        "one HSM call per batch"
    );
    let issued: Vec<&pb::GenerateDataKeyResponse> = mixed
        .results
        .iter()
        .filter_map(|r| match &r.outcome {
            Some(Outcome::Result(key)) => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(issued.len(), 3);
    assert!(issued.iter().all(|k| k.plaintext.len() == 32));
    // Distinct slices of the pool, and each one is the key in its blob.
    let (a, b, c) = (
        &issued[0].plaintext,
        &issued[1].plaintext,
        &issued[2].plaintext,
    );
    assert!(a != b && b != c && a != c);
    for key in issued {
        let opened = decrypt(&server, &key.ciphertext_blob, acme)
            .await
            .expect("the data key decrypts");
        assert_eq!(opened.plaintext, key.plaintext);
    }
}
