//! BatchReEncrypt (issue 18, item 3): each item exactly as ReEncrypt (its
//! own error, authorization on the key inside its blob), all records in one
//! audit group, and blobs already under the destination's primary version
//! handed back unchanged as already current.

use kms_proto::v1 as pb;
use kms_tests::TestEnv;
use pb::batch_re_encrypt_result::Outcome;
use tonic::{Code, Request};

use super::{create_key, ctx, decrypt, encrypt};

fn entry(blob: &[u8], context: &[(&str, &str)]) -> pb::BatchReEncryptEntry {
    pb::BatchReEncryptEntry {
        ciphertext_blob: blob.to_vec(),
        source_encryption_context: ctx(context),
        destination_encryption_context: ctx(context),
    }
}

#[tokio::test]
async fn batch_re_encrypt_fails_items_alone_and_audits_one_group() {
    let env = TestEnv::new();
    let server = env.start().await;
    let source = create_key(&server, "source").await;
    let destination = create_key(&server, "destination").await;
    let locked = create_key(&server, "no re-encrypt-from for anyone").await;
    let disabled = create_key(&server, "version 1 disabled").await;
    let mut keys = server.keys();
    // `locked` lets its caller encrypt and decrypt, but not re-encrypt from it.
    keys.put_key_policy(pb::PutKeyPolicyRequest {
        key_id: locked.clone(),
        policy: Some(pb::KeyPolicy {
            grants: vec![pb::Grant {
                principal: "*".to_owned(),
                permissions: vec![
                    pb::Permission::Encrypt as i32,
                    pb::Permission::Decrypt as i32,
                ],
                required_encryption_context: Default::default(),
            }],
        }),
    })
    .await
    .expect("policy");
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: destination.clone(),
    })
    .await
    .expect("destination to version 2");

    let good = encrypt(&server, &source, b"good", &[("app", "a")]).await;
    let wrong_context = encrypt(&server, &source, b"ctx", &[("app", "a")]).await;
    let unauthorized = encrypt(&server, &locked, b"locked", &[]).await;
    let old = encrypt(&server, &disabled, b"old", &[]).await;
    let current = encrypt(&server, &destination, b"current", &[("app", "c")]).await;
    assert_eq!(current.key_version, 2);
    let also_good = encrypt(&server, &source, b"also good", &[]).await;
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: disabled.clone(),
    })
    .await
    .expect("rotate");
    keys.disable_key_version(pb::DisableKeyVersionRequest {
        key_id: disabled.clone(),
        version: 1,
    })
    .await
    .expect("disable version 1");

    let mut bad_blob = good.ciphertext_blob.clone();
    let last = bad_blob.len() - 1;
    bad_blob[last] ^= 1;
    let mut request = Request::new(pb::BatchReEncryptRequest {
        destination_key_id: destination.clone(),
        source_key_id: String::new(),
        entries: vec![
            entry(&good.ciphertext_blob, &[("app", "a")]),
            entry(&bad_blob, &[("app", "a")]),
            entry(&wrong_context.ciphertext_blob, &[("app", "b")]),
            entry(&unauthorized.ciphertext_blob, &[]),
            entry(&old.ciphertext_blob, &[]),
            entry(&current.ciphertext_blob, &[("app", "c")]),
            entry(&also_good.ciphertext_blob, &[]),
        ],
    });
    request
        .metadata_mut()
        .insert("x-request-id", "batch-move".parse().expect("ascii"));
    let results = server
        .crypto()
        .batch_re_encrypt(request)
        .await
        .expect("the batch itself succeeds")
        .into_inner()
        .results;
    assert_eq!(results.len(), 7);
    let outcome = |i: usize| results[i].outcome.clone().expect("outcome");
    let code_of = |i: usize| match outcome(i) {
        Outcome::Error(status) => Code::from(status.code),
        Outcome::Result(item) => panic!("item {i} succeeded: {item:?}"),
    };
    assert_eq!(code_of(1), Code::InvalidArgument);
    assert_eq!(code_of(2), Code::InvalidArgument);
    assert_eq!(code_of(3), Code::PermissionDenied);
    assert_eq!(code_of(4), Code::FailedPrecondition);
    for (i, plaintext, context) in [
        (0, &b"good"[..], &[("app", "a")][..]),
        (6, b"also good", &[]),
    ] {
        let Outcome::Result(item) = outcome(i) else {
            panic!("item {i} failed: {:?}", outcome(i));
        };
        assert!(!item.already_current);
        assert_eq!(
            (item.source_key_id.as_str(), item.source_key_version),
            (source.as_str(), 1)
        );
        assert_eq!(
            (item.key_id.as_str(), item.key_version),
            (destination.as_str(), 2)
        );
        let opened = decrypt(&server, &item.ciphertext_blob, context)
            .await
            .expect("the new blob decrypts");
        assert_eq!(opened.plaintext, plaintext);
        assert_eq!(
            (opened.key_id, opened.key_version),
            (destination.clone(), 2)
        );
    }
    // Already under the destination's primary version: the same bytes back.
    let Outcome::Result(kept) = outcome(5) else {
        panic!("already-current item failed: {:?}", outcome(5));
    };
    assert!(kept.already_current);
    assert_eq!(kept.ciphertext_blob, current.ciphertext_blob);
    assert_eq!(
        (kept.key_id.as_str(), kept.key_version),
        (destination.as_str(), 2)
    );

    // One audit group: per item its source record then (once the destination
    // was resolved) its destination record, request ids "<id>#<item>",
    // consecutive sequence numbers.
    let events = server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: pb::Operation::BatchReEncrypt as i32,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .events;
    assert_eq!(events.len(), 14, "{events:?}");
    for pair in events.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1, "{events:?}");
    }
    let expected_codes = [
        Code::Ok,
        Code::InvalidArgument,
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::FailedPrecondition,
        Code::Ok,
        Code::Ok,
    ];
    let source_keys = [
        &source,
        &source,
        &source,
        &locked,
        &disabled,
        &destination,
        &source,
    ];
    for (i, pair) in events.chunks(2).enumerate() {
        let id = format!("batch-move#{i}");
        assert_eq!(pair[0].request_id, id);
        assert_eq!(pair[1].request_id, id);
        assert_eq!(pair[0].result_code, expected_codes[i] as i32, "item {i}");
        assert_eq!(&pair[0].key_id, source_keys[i], "item {i}");
        // An already-current item encrypts nothing: its destination
        // record names no version (not an encrypt-side use).
        let destination_version = if i == 5 { 0 } else { 2 };
        assert_eq!(
            (pair[1].key_id.as_str(), pair[1].key_version),
            (destination.as_str(), destination_version),
            "item {i}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn batch_re_encrypt_without_a_destination_moves_each_blob_within_its_key() {
    let env = TestEnv::new();
    let server = env.start().await;
    let a = create_key(&server, "a").await;
    let b = create_key(&server, "b").await;
    let under_a = encrypt(&server, &a, b"in a", &[]).await;
    let under_b = encrypt(&server, &b, b"in b", &[("t", "1")]).await;
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest { key_id: a.clone() })
        .await
        .expect("rotate a");
    let results = server
        .crypto()
        .batch_re_encrypt(pb::BatchReEncryptRequest {
            entries: vec![
                entry(&under_a.ciphertext_blob, &[]),
                entry(&under_b.ciphertext_blob, &[("t", "1")]),
                entry(b"not a blob", &[]),
            ],
            ..Default::default()
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    let items: Vec<Outcome> = results
        .into_iter()
        .map(|r| r.outcome.expect("outcome"))
        .collect();
    let Outcome::Result(moved) = &items[0] else {
        panic!("{:?}", items[0]);
    };
    assert_eq!(
        (
            moved.key_id.as_str(),
            moved.key_version,
            moved.already_current
        ),
        (a.as_str(), 2, false)
    );
    let Outcome::Result(kept) = &items[1] else {
        panic!("{:?}", items[1]);
    };
    assert_eq!(
        (kept.key_id.as_str(), kept.key_version, kept.already_current),
        (b.as_str(), 1, true)
    );
    let Outcome::Error(status) = &items[2] else {
        panic!("{:?}", items[2]);
    };
    assert_eq!(Code::from(status.code), Code::InvalidArgument);
    // Above the batch limit: the whole call is refused.
    let status = server
        .crypto()
        .batch_re_encrypt(pb::BatchReEncryptRequest {
            entries: vec![entry(&under_a.ciphertext_blob, &[]); 1001],
            ..Default::default()
        })
        .await
        .expect_err("too many entries");
    assert_eq!(status.code(), Code::InvalidArgument);
    server.stop().await;
}
