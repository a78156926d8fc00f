//! Restarts keep everything: keys, versions, aliases, ciphertexts, the audit chain.

use kms_proto::v1 as pb;
use kms_tests::TestEnv;

use super::{create_key, decrypt, encrypt};

#[tokio::test]
async fn a_restart_keeps_keys_ciphertexts_and_the_audit_chain() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "durable").await;
    server
        .keys()
        .create_alias(pb::CreateAliasRequest {
            alias_name: "alias/durable".into(),
            target_key_id: key.clone(),
        })
        .await
        .expect("alias");
    let v1 = encrypt(&server, "alias/durable", b"before restart", &[("x", "1")]).await;
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate");
    let v2 = encrypt(&server, &key, b"after rotation", &[]).await;
    let head_before = server.service().verify_chain(None).expect("verify").records;
    server.stop().await;

    let server = env.start().await;
    assert_eq!(
        decrypt(&server, &v1.ciphertext_blob, &[("x", "1")])
            .await
            .expect("v1")
            .plaintext,
        b"before restart"
    );
    assert_eq!(
        decrypt(&server, &v2.ciphertext_blob, &[])
            .await
            .expect("v2")
            .plaintext,
        b"after rotation"
    );
    let described = server
        .keys()
        .describe_key(pb::DescribeKeyRequest {
            key_id: "alias/durable".into(),
        })
        .await
        .expect("describe")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(described.key_id, key);
    assert_eq!(described.primary_version, 2);
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert!(
        report.records > head_before,
        "the chain continues across the restart"
    );
}

#[tokio::test]
async fn a_tampered_audit_record_is_detected_after_restart() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "tamper target").await;
    for i in 0..10u8 {
        encrypt(&server, &key, &[i + 1], &[]).await;
    }
    server.stop().await;
    assert!(kms_storage::testing::flip_bit_in_audit_record(&env.db_dir(), 5).expect("tamper"));

    let server = env.start().await;
    let verified = server
        .audit()
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("verify runs")
        .into_inner();
    assert!(!verified.valid, "tampering went unnoticed: {verified:?}");
    assert_eq!(verified.first_invalid_sequence, 5, "{verified:?}");
}

/// Threads of this process with the given name (Linux: /proc/self/task/*/comm).
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("task list")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[tokio::test]
async fn dropping_a_server_stops_its_scheduler_thread_before_returning() {
    // The scheduler thread holds the service (database, audit log). If it
    // outlived the server, a process exiting right after would race
    // RocksDB's static destructors ("pthread lock: Invalid argument").
    let env = TestEnv::new();
    let server = env.start().await;
    // The thread names itself once it runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while threads_named("kms-scheduler") == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(threads_named("kms-scheduler"), 1);
    let started = std::time::Instant::now();
    drop(server);
    // Joined: gone at once (allowing the kernel a moment to reap the task,
    // far less than the 200 ms steps the scheduler used to sleep in).
    let reaped = std::time::Instant::now() + std::time::Duration::from_millis(50);
    while threads_named("kms-scheduler") > 0 && std::time::Instant::now() < reaped {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(threads_named("kms-scheduler"), 0);
    // Woken, not waited out: the scheduler interval here is an hour.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
