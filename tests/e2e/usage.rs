//! Per-version use records (issue 18, item 1): every successful key use is
//! counted on its version and side (encrypt or decrypt), with the time of
//! the last one, shown by GetKeyLastUsage, ListKeyVersions and DescribeKey;
//! counts survive a graceful restart and a SIGKILL (replayed from the audit
//! log) and never go backwards.

use std::time::{SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_proto::v1::key_management_client::KeyManagementClient;
use kms_tests::{DevServerProcess, TestEnv, TestServer};
use tonic::transport::Channel;

use super::{create_key, ctx, decrypt, encrypt};

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

fn ms(ts: Option<&prost_types::Timestamp>) -> Option<u64> {
    ts.map(|t| {
        u64::try_from(t.seconds).expect("seconds") * 1000
            + u64::try_from(t.nanos).expect("nanos") / 1_000_000
    })
}

/// (encrypt count, decrypt count) of every version, by GetKeyLastUsage.
async fn counts(keys: &mut KeyManagementClient<Channel>, key: &str) -> Vec<(u32, u64, u64)> {
    let reply = last_usage(keys, key, 0).await;
    reply
        .versions
        .iter()
        .map(|v| {
            let u = v.usage.expect("usage");
            (v.version, u.encrypt_count, u.decrypt_count)
        })
        .collect()
}

async fn last_usage(
    keys: &mut KeyManagementClient<Channel>,
    key: &str,
    version: u32,
) -> pb::GetKeyLastUsageResponse {
    keys.get_key_last_usage(pb::GetKeyLastUsageRequest {
        key_id: key.to_owned(),
        version,
    })
    .await
    .expect("GetKeyLastUsage")
    .into_inner()
}

async fn gdk(server: &TestServer, key: &str) -> pb::GenerateDataKeyResponse {
    server
        .crypto()
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.to_owned(),
            encryption_context: ctx(&[("app", "u")]),
            length: Some(pb::generate_data_key_request::Length::NumberOfBytes(32)),
        })
        .await
        .expect("GenerateDataKey")
        .into_inner()
}

async fn gdk_without_plaintext(server: &TestServer, key: &str) -> Vec<u8> {
    server
        .crypto()
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            key_id: key.to_owned(),
            encryption_context: ctx(&[("app", "u")]),
            length: Some(
                pb::generate_data_key_without_plaintext_request::Length::NumberOfBytes(32),
            ),
        })
        .await
        .expect("GenerateDataKeyWithoutPlaintext")
        .into_inner()
        .ciphertext_blob
}

async fn re_encrypt(server: &TestServer, blob: &[u8], destination: &str) -> Vec<u8> {
    server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob.to_vec(),
            source_encryption_context: ctx(&[("app", "u")]),
            destination_key_id: destination.to_owned(),
            destination_encryption_context: ctx(&[("app", "u")]),
            ..Default::default()
        })
        .await
        .expect("ReEncrypt")
        .into_inner()
        .ciphertext_blob
}

#[tokio::test]
async fn each_kind_of_use_is_counted_on_its_version_and_side_and_survives_a_restart() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "used").await;
    let other = create_key(&server, "destination").await;
    let mut keys = server.keys();
    let started = now_ms();

    // Never used: zeros, no times.
    let unused = last_usage(&mut keys, &key, 1).await;
    let u = unused.usage.expect("usage");
    assert_eq!((u.encrypt_count, u.decrypt_count), (0, 0));
    assert!(u.last_encrypt_time.is_none() && u.last_decrypt_time.is_none());

    // Encrypt: v1 encrypt 1.
    let blob = encrypt(&server, &key, b"one", &[("app", "u")])
        .await
        .ciphertext_blob;
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 1, 0)]);
    // Decrypt: v1 decrypt 1.
    decrypt(&server, &blob, &[("app", "u")])
        .await
        .expect("Decrypt");
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 1, 1)]);
    // A failed decrypt (wrong context) is not a use.
    assert!(decrypt(&server, &blob, &[("app", "x")]).await.is_err());
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 1, 1)]);
    // GenerateDataKey and its WithoutPlaintext twin: encrypt-side.
    let data_key = gdk(&server, &key).await;
    let wrapped = gdk_without_plaintext(&server, &key).await;
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 3, 1)]);
    // Unwrapping both data keys: decrypt-side.
    decrypt(&server, &data_key.ciphertext_blob, &[("app", "u")])
        .await
        .expect("unwrap");
    decrypt(&server, &wrapped, &[("app", "u")])
        .await
        .expect("unwrap");
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 3, 3)]);

    // Batch forms: one use per successful item.
    let batch = server
        .crypto()
        .batch_encrypt(pb::BatchEncryptRequest {
            key_id: key.clone(),
            entries: (0..3)
                .map(|i| pb::BatchEncryptEntry {
                    plaintext: vec![i; 8],
                    encryption_context: ctx(&[("app", "u")]),
                })
                .collect(),
        })
        .await
        .expect("BatchEncrypt")
        .into_inner();
    let blobs: Vec<Vec<u8>> = batch
        .results
        .into_iter()
        .map(|r| match r.outcome {
            Some(pb::batch_encrypt_result::Outcome::Result(e)) => e.ciphertext_blob,
            other => panic!("batch item failed: {other:?}"),
        })
        .collect();
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 6, 3)]);
    server
        .crypto()
        .batch_decrypt(pb::BatchDecryptRequest {
            key_id: String::new(),
            entries: blobs
                .iter()
                .map(|b| pb::BatchDecryptEntry {
                    ciphertext_blob: b.clone(),
                    encryption_context: ctx(&[("app", "u")]),
                })
                // One item fails (wrong context): not counted.
                .chain(std::iter::once(pb::BatchDecryptEntry {
                    ciphertext_blob: blobs[0].clone(),
                    encryption_context: ctx(&[("app", "wrong")]),
                }))
                .collect(),
        })
        .await
        .expect("BatchDecrypt");
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 6, 6)]);
    server
        .crypto()
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key.clone(),
            entries: (0..2)
                .map(|_| pb::BatchGenerateDataKeyEntry {
                    encryption_context: ctx(&[("app", "u")]),
                    length: Some(pb::batch_generate_data_key_entry::Length::NumberOfBytes(32)),
                })
                .collect(),
        })
        .await
        .expect("BatchGenerateDataKey");
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 8, 6)]);

    // Rotate; ReEncrypt a version-1 blob into the key itself (source v1
    // decrypt, destination v2 encrypt) and into another key.
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate");
    let moved = re_encrypt(&server, &blob, &key).await;
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 8, 7), (2, 1, 0)]);
    re_encrypt(&server, &moved, &other).await;
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 8, 7), (2, 1, 1)]);
    assert_eq!(counts(&mut keys, &other).await, vec![(1, 1, 0)]);

    // Times: within the test's run, per side and version.
    let v1 = last_usage(&mut keys, &key, 1).await;
    assert_eq!(v1.versions.len(), 1);
    let u1 = v1.usage.expect("usage");
    let done = now_ms();
    for t in [
        ms(u1.last_encrypt_time.as_ref()),
        ms(u1.last_decrypt_time.as_ref()),
    ] {
        let t = t.expect("a last-use time");
        assert!(
            (started.saturating_sub(5)..=done + 5).contains(&t),
            "{t} not in {started}..{done}"
        );
    }
    // The key's total sums its versions.
    let whole = last_usage(&mut keys, &key, 0).await.usage.expect("usage");
    assert_eq!((whole.encrypt_count, whole.decrypt_count), (9, 8));
    // ListKeyVersions and DescribeKey show the same.
    let listed = keys
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.clone(),
            ..Default::default()
        })
        .await
        .expect("list versions")
        .into_inner();
    let listed: Vec<_> = listed
        .versions
        .iter()
        .map(|v| {
            let u = v.usage.expect("usage");
            (v.version, u.encrypt_count, u.decrypt_count)
        })
        .collect();
    assert_eq!(listed, vec![(1, 8, 7), (2, 1, 1)]);
    let described = keys
        .describe_key(pb::DescribeKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("describe")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .usage
        .expect("usage");
    assert_eq!((described.encrypt_count, described.decrypt_count), (9, 8));
    // An unknown version is NOT_FOUND.
    let missing = keys
        .get_key_last_usage(pb::GetKeyLastUsageRequest {
            key_id: key.clone(),
            version: 9,
        })
        .await
        .expect_err("no version 9");
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // A graceful restart keeps everything, times included.
    let before = last_usage(&mut keys, &key, 0).await;
    server.stop().await;
    let server = env.start().await;
    let mut keys = server.keys();
    assert_eq!(last_usage(&mut keys, &key, 0).await, before);
    // And counting goes on from there.
    encrypt(&server, &key, b"after", &[("app", "u")]).await;
    assert_eq!(counts(&mut keys, &key).await, vec![(1, 8, 7), (2, 2, 1)]);
    server.stop().await;
}

#[tokio::test]
async fn get_key_last_usage_is_audited() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "audited").await;
    let mut keys = server.keys();
    last_usage(&mut keys, &key, 1).await;
    let events = server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: key.clone(),
            operation: pb::Operation::GetKeyLastUsage as i32,
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list audit events")
        .into_inner()
        .events;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].key_version, 1);
    server.stop().await;
}

async fn connect(server: &DevServerProcess) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// SIGKILL right after the uses (long before the flush interval of the dev
/// configuration, 5 s): the restarted process replays them from the audit
/// log, exactly once, however often it is killed.
#[tokio::test]
async fn uses_survive_sigkill_exactly_once_and_never_go_backwards() {
    let data = tempfile::tempdir().expect("data dir");
    let mut key = String::new();
    let mut blob = Vec::new();
    let mut expected = (0u64, 0u64);
    let mut last_times = (0u64, 0u64);
    for round in 0..4 {
        let server = DevServerProcess::start(data.path());
        let channel = connect(&server).await;
        let mut keys = KeyManagementClient::new(channel.clone());
        let mut crypto = CryptoClient::new(channel);
        if round == 0 {
            key = keys
                .create_key(pb::CreateKeyRequest::default())
                .await
                .expect("create")
                .into_inner()
                .key_metadata
                .expect("metadata")
                .key_id;
        }
        // What the previous process counted, all of it, after its SIGKILL.
        let usage = last_usage(&mut keys, &key, 1).await.usage.expect("usage");
        assert_eq!(
            (usage.encrypt_count, usage.decrypt_count),
            expected,
            "round {round}"
        );
        let times = (
            ms(usage.last_encrypt_time.as_ref()).unwrap_or(0),
            ms(usage.last_decrypt_time.as_ref()).unwrap_or(0),
        );
        assert!(
            times.0 >= last_times.0 && times.1 >= last_times.1,
            "round {round}"
        );
        last_times = times;
        for _ in 0..3 {
            blob = crypto
                .encrypt(pb::EncryptRequest {
                    key_id: key.clone(),
                    plaintext: b"kill".to_vec(),
                    encryption_context: Default::default(),
                })
                .await
                .expect("encrypt")
                .into_inner()
                .ciphertext_blob;
        }
        for _ in 0..2 {
            crypto
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: blob.clone(),
                    ..Default::default()
                })
                .await
                .expect("decrypt");
        }
        expected = (expected.0 + 3, expected.1 + 2);
        // Seen at once by the node that did it, before any flush.
        let usage = last_usage(&mut keys, &key, 1).await.usage.expect("usage");
        assert_eq!((usage.encrypt_count, usage.decrypt_count), expected);
        server.kill();
    }
}

/// `kms key last-usage` (JSON and table) and `kms key versions` against a
/// real `kms serve --dev` process.
#[tokio::test]
async fn the_cli_shows_last_usage_and_versions_with_their_uses() {
    let data = tempfile::tempdir().expect("data dir");
    let server = DevServerProcess::start(data.path());
    let channel = connect(&server).await;
    let mut keys = KeyManagementClient::new(channel.clone());
    let mut crypto = CryptoClient::new(channel);
    let key = keys
        .create_key(pb::CreateKeyRequest::default())
        .await
        .expect("create")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    for _ in 0..2 {
        crypto
            .encrypt(pb::EncryptRequest {
                key_id: key.clone(),
                plaintext: b"cli".to_vec(),
                encryption_context: Default::default(),
            })
            .await
            .expect("encrypt");
    }
    let endpoint = server.endpoint();
    let (json, table, versions) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let (ok, stdout, stderr) = kms_tests::run_cli(&endpoint, args, b"");
            assert!(ok, "kms {args:?} failed: {stderr}");
            String::from_utf8(stdout).expect("utf8")
        };
        (
            run(&["--json", "key", "last-usage", &key, "--version", "1"]),
            run(&["key", "last-usage", &key]),
            run(&["key", "versions", &key]),
        )
    })
    .await
    .expect("cli");
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(json["usage"]["encrypt_count"], 2, "{json}");
    assert_eq!(json["usage"]["decrypt_count"], 0, "{json}");
    assert!(json["usage"]["last_encrypt_time"].is_string(), "{json}");
    assert!(json["usage"]["last_decrypt_time"].is_null(), "{json}");
    assert_eq!(json["versions"][0]["version"], 1, "{json}");
    assert!(
        table.contains("Encrypts") && table.contains("LAST DECRYPT"),
        "{table}"
    );
    let header = versions.lines().next().expect("header");
    assert!(
        header.contains("LAST ENCRYPT") && header.contains("DECRYPTS"),
        "{versions}"
    );
    let row: Vec<&str> = versions
        .lines()
        .nth(1)
        .expect("row")
        .split_whitespace()
        .collect();
    // ..., LAST ENCRYPT (a time), ENCRYPTS 2, LAST DECRYPT -, DECRYPTS 0.
    assert_eq!(&row[row.len() - 3..], ["2", "-", "0"], "{versions}");
}
