//! The service keys of a deployment with a root (issue 14 item 2): the audit
//! checkpoint HMAC key is wrapped under the root (meta record
//! `audit_checkpoint_key`) when the deployment's first start has a root,
//! and stays the token object `kms-audit-hmac/v1` where that exists; the
//! chain verifies either way, across restarts. A broken or swapped
//! service-key record refuses start, naming the record.

use kms::service::KmsService;
use kms_proto::v1 as pb;
use kms_storage::WrappedServiceKey;
use kms_storage::schema::{META_CHECKPOINT_KEY, META_INTEGRITY_KEY};
use kms_tests::{DevServerProcess, TestEnv, TestServer, run_cli};

use super::wrapped::{init_root, token_objects};

/// Labels of the token objects of `env`'s token, seen from another process.
fn token_labels(env: &TestEnv) -> Vec<String> {
    let kms_hsm::PinSource::File(pin) = env.token.pin_source() else {
        panic!("the test token keeps its PIN in a file");
    };
    kms_tests::token_object_labels(None, env.token.module_path(), env.token.label(), &pin)
}
use super::{create_key, decrypt, encrypt};

/// Enough requests for at least one checkpoint (the test config makes one
/// every 50 records), then a decrypt of each ciphertext.
async fn load(server: &TestServer, key: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut made = Vec::new();
    for i in 0..n {
        let plaintext = format!("message {i}").into_bytes();
        let reply = encrypt(server, key, &plaintext, &[]).await;
        made.push((plaintext, reply.ciphertext_blob));
    }
    made
}

fn verify_offline(server: &TestServer) -> kms_storage::VerifyReport {
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "chain must verify: {report:?}");
    report
}

#[tokio::test]
async fn a_deployment_whose_first_start_has_a_root_wraps_its_checkpoint_key() {
    let env = TestEnv::new();
    init_root(&env);
    let server = env.start().await;
    assert!(server.service().checkpoint_key_is_wrapped());
    let key = create_key(&server, "checkpointed").await;
    let made = load(&server, &key, 60).await;
    assert!(verify_offline(&server).checkpoints_verified >= 1);
    server.stop().await;

    let stored = kms_storage::testing::read_service_key(&env.db_dir(), META_CHECKPOINT_KEY)
        .expect("read")
        .expect("the wrapped checkpoint key is stored");
    assert_eq!(stored.root_epoch, 1);
    assert_eq!(stored.blob.len(), 40);
    // The token holds the root only: no token object for the checkpoint key.
    assert_eq!(token_labels(&env), vec!["kms-root/1"]);

    // After a restart the key is unwrapped again and verifies every
    // checkpoint made before (offline and through the RPC).
    let server = env.start().await;
    assert!(server.service().checkpoint_key_is_wrapped());
    let before = verify_offline(&server);
    assert!(before.checkpoints_verified >= 2, "{before:?}");
    let (plaintext, blob) = &made[0];
    assert_eq!(
        &decrypt(&server, blob, &[])
            .await
            .expect("decrypt")
            .plaintext,
        plaintext
    );
    let online = server
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(online.valid, "{online:?}");
    assert!(online.checkpoints_verified >= 2, "{online:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_token_object_checkpoint_key_is_kept_when_a_root_appears() {
    let env = TestEnv::new();
    let server = env.start().await;
    assert!(!server.service().checkpoint_key_is_wrapped());
    let key = create_key(&server, "before the root").await;
    load(&server, &key, 55).await;
    let before = verify_offline(&server);
    server.stop().await;

    init_root(&env);
    let server = env.start().await;
    // No silent migration: the chain keeps its key.
    assert!(!server.service().checkpoint_key_is_wrapped());
    load(&server, &key, 55).await;
    let after = verify_offline(&server);
    assert!(
        after.checkpoints_verified > before.checkpoints_verified,
        "{before:?} {after:?}"
    );
    server.stop().await;
    assert!(
        kms_storage::testing::read_service_key(&env.db_dir(), META_CHECKPOINT_KEY)
            .expect("read")
            .is_none(),
        "no wrapped checkpoint key is made for a deployment that has the token key"
    );
    // The key's first version (a token object from before the root), the
    // kept checkpoint key and the root.
    assert_eq!(
        token_labels(&env),
        vec![
            format!("{key}/v1"),
            "kms-audit-hmac/v1".into(),
            "kms-root/1".into()
        ]
    );
    let server = env.start().await;
    verify_offline(&server);
    server.stop().await;
}

/// The error chain `KmsService::open` gives for `env`, which must fail.
async fn refused_start(env: &TestEnv) -> String {
    let config = env.config();
    let outcome = tokio::task::spawn_blocking(move || KmsService::open(&config).map(drop))
        .await
        .expect("join");
    let error = outcome.expect_err("start must be refused");
    let mut chain = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

fn set_record(env: &TestEnv, name: &[u8], record: &WrappedServiceKey) {
    let record = record.clone();
    assert!(
        kms_storage::testing::tamper_with_service_key(&env.db_dir(), name, move |_| Some(record))
            .expect("tamper")
    );
}

#[tokio::test]
async fn a_broken_or_swapped_service_key_record_refuses_start_naming_it() {
    let env = TestEnv::new();
    init_root(&env);
    let server = env.start().await;
    let key = create_key(&server, "service keys").await;
    load(&server, &key, 55).await;
    server.stop().await;
    let read = |name| {
        kms_storage::testing::read_service_key(&env.db_dir(), name)
            .expect("read")
            .expect("stored")
    };
    let integrity = read(META_INTEGRITY_KEY);
    let checkpoint = read(META_CHECKPOINT_KEY);

    let flipped = |record: &WrappedServiceKey| {
        let mut record = record.clone();
        record.blob[7] ^= 1;
        record
    };
    let truncated = |record: &WrappedServiceKey| {
        let mut record = record.clone();
        record.blob.truncate(32);
        record
    };
    let other_root = |record: &WrappedServiceKey| WrappedServiceKey {
        root_epoch: 9,
        ..record.clone()
    };
    let cases: Vec<(&str, &[u8], WrappedServiceKey, &str)> = vec![
        (
            "integrity blob tampered",
            META_INTEGRITY_KEY,
            flipped(&integrity),
            "catalogue meta record integrity_key is refused: its blob does not unwrap",
        ),
        (
            "integrity blob truncated",
            META_INTEGRITY_KEY,
            truncated(&integrity),
            "catalogue meta record integrity_key is refused: its blob does not unwrap",
        ),
        (
            "integrity blob under a root the token lacks",
            META_INTEGRITY_KEY,
            other_root(&integrity),
            "catalogue meta record integrity_key is refused: its blob does not unwrap",
        ),
        (
            "integrity mechanism unknown",
            META_INTEGRITY_KEY,
            WrappedServiceKey {
                mechanism: 0x210B,
                ..integrity.clone()
            },
            "catalogue meta record integrity_key is refused: it names an unknown wrapping mechanism",
        ),
        (
            "checkpoint blob tampered",
            META_CHECKPOINT_KEY,
            flipped(&checkpoint),
            "catalogue meta record audit_checkpoint_key is refused: its blob does not unwrap",
        ),
        (
            // A valid blob under the same root, of another key: unwraps
            // fine, but does not verify the log's first checkpoint.
            "checkpoint blob swapped for the integrity key's",
            META_CHECKPOINT_KEY,
            integrity.clone(),
            "catalogue meta record audit_checkpoint_key is refused: it does not verify the audit log's first checkpoint",
        ),
    ];
    for (what, name, bad, expected) in cases {
        let good = if name == META_INTEGRITY_KEY {
            &integrity
        } else {
            &checkpoint
        };
        set_record(&env, name, &bad);
        let chain = refused_start(&env).await;
        assert!(chain.contains(expected), "{what}: {chain}");
        set_record(&env, name, good);
    }

    // Restored: starts, and everything still verifies and decrypts.
    let server = env.start().await;
    verify_offline(&server);
    let reply = encrypt(&server, &key, b"after", &[]).await;
    assert_eq!(
        decrypt(&server, &reply.ciphertext_blob, &[])
            .await
            .expect("decrypt")
            .plaintext,
        b"after"
    );
    server.stop().await;
}

fn cli_ok(endpoint: &str, args: &[&str]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(endpoint, args, b"");
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

#[test]
fn dev_mode_checkpoint_key_is_wrapped_and_kms_audit_verify_passes_after_restarts() {
    let data = tempfile::tempdir().expect("data dir");
    let mut server = DevServerProcess::start(data.path());
    let ep = server.endpoint();
    cli_ok(&ep, &["key", "create"]);
    // The root only: the checkpoint key is a session object.
    assert_eq!(token_objects(data.path()), 1);
    assert_eq!(
        kms_tests::dev_token_object_labels(data.path()),
        vec!["kms-root/1"]
    );
    server.terminate();
    for _ in 0..2 {
        // A clean stop writes a checkpoint, which the next start checks.
        let mut server = DevServerProcess::start(data.path());
        let ep = server.endpoint();
        let out = cli_ok(&ep, &["--json", "audit", "verify"]);
        let report: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(report["valid"], true, "{report}");
        assert!(
            report["checkpoints_verified"].as_u64().expect("count") >= 1,
            "{report}"
        );
        server.terminate();
    }
    assert_eq!(token_objects(data.path()), 1);
}
