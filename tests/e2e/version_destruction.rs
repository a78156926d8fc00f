//! Retiring one key version (issue 18 items 2, 3 and the version states of
//! item 5), against a real server and SoftHSM2: ScheduleKeyVersionDestruction
//! (primary refused, window bounds, the recent-use guard and its audited
//! override), RestoreKeyVersion within the window, destruction by the
//! scheduler (the HSM object or the wrapped blob is gone; blobs fail with
//! the distinct "was destroyed" FAILED_PRECONDITION, never "invalid
//! ciphertext"), and the re-encrypt-only state (Decrypt refused, ReEncrypt
//! allowed). The window is reached as key-deletion tests do: a scheduler
//! pass "as of" a later time (`run_scheduler_pass_at`).

use std::time::{SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_storage::KekHandle;
use kms_tests::{TestEnv, TestServer, run_cli};
use tonic::Code;

use super::{create_key, ctx, decrypt, encrypt};

const DAY_MS: u64 = 86_400_000;

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

async fn rotate(server: &TestServer, key: &str) -> u32 {
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.to_owned(),
        })
        .await
        .expect("rotate")
        .into_inner()
        .new_version
        .expect("new version")
        .version
}

async fn schedule(
    server: &TestServer,
    key: &str,
    version: u32,
    days: Option<u32>,
    override_recent_use: bool,
) -> Result<pb::ScheduleKeyVersionDestructionResponse, tonic::Status> {
    server
        .keys()
        .schedule_key_version_destruction(pb::ScheduleKeyVersionDestructionRequest {
            key_id: key.to_owned(),
            version,
            pending_window_days: days,
            override_recent_use,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn version_state(server: &TestServer, key: &str, version: u32) -> pb::KeyVersion {
    server
        .keys()
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.to_owned(),
            ..Default::default()
        })
        .await
        .expect("list versions")
        .into_inner()
        .versions
        .into_iter()
        .find(|v| v.version == version)
        .expect("version listed")
}

async fn audit_events(
    server: &TestServer,
    key: &str,
    operation: pb::Operation,
) -> Vec<pb::AuditEvent> {
    server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: key.to_owned(),
            operation: operation as i32,
            ..Default::default()
        })
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

/// Asserts the distinct refusal of a blob under a destroyed version.
fn assert_destroyed(status: &tonic::Status, key: &str, version: u32) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let expected = format!("key version {version} of key {key} was destroyed at 20");
    assert!(status.message().contains(&expected), "{}", status.message());
}

#[tokio::test]
async fn the_primary_is_refused_and_the_window_is_1_to_30_days_default_7() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "retire").await;

    let status = schedule(&server, &key, 1, None, false)
        .await
        .expect_err("primary");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("version 1 is the primary version"),
        "{}",
        status.message()
    );
    rotate(&server, &key).await;
    for days in [0, 31] {
        let status = schedule(&server, &key, 1, Some(days), false)
            .await
            .expect_err("window out of range");
        assert_eq!(status.code(), Code::InvalidArgument, "{days} days");
    }
    assert_eq!(
        version_state(&server, &key, 1).await.state,
        pb::KeyVersionState::Enabled as i32,
        "a refused request changes nothing"
    );
    // Named by an alias, a refused request is still audited under the key id.
    server
        .keys()
        .create_alias(pb::CreateAliasRequest {
            alias_name: "alias/retire".to_owned(),
            target_key_id: key.clone(),
        })
        .await
        .expect("alias");
    let status = schedule(&server, "alias/retire", 1, Some(0), false)
        .await
        .expect_err("0 days");
    assert_eq!(status.code(), Code::InvalidArgument);
    let refusals = audit_events(&server, &key, pb::Operation::ScheduleKeyVersionDestruction).await;
    assert_eq!(
        refusals
            .iter()
            .filter(|e| e.result_code == Code::InvalidArgument as i32)
            .count(),
        3,
        "0, 31 and the alias's 0 days, all under the key id: {refusals:?}"
    );
    let before = now_ms();
    let scheduled = schedule(&server, &key, 1, None, false)
        .await
        .expect("schedule");
    assert_eq!(scheduled.pending_window_days, 7);
    let version = scheduled.key_version.expect("version");
    assert_eq!(
        version.state,
        pb::KeyVersionState::ScheduledDestruction as i32
    );
    let at = version.destroy_time.expect("destroy time");
    let at_ms = u64::try_from(at.seconds).expect("seconds") * 1000;
    assert!(
        at_ms + 1000 >= before + 7 * DAY_MS && at_ms <= now_ms() + 7 * DAY_MS,
        "destruction in 7 days"
    );
    for days in [1, 30] {
        let version = schedule(&server, &key, 1, Some(days), false)
            .await
            .expect("bounds are allowed")
            .key_version
            .expect("version");
        let at = version.destroy_time.expect("destroy time").seconds;
        let expected = i64::try_from(now_ms() / 1000).expect("s") + i64::from(days) * 86_400;
        assert!((at - expected).abs() < 120, "{days} days");
    }
    // Still the primary after rotation: version 2 cannot be scheduled.
    let status = schedule(&server, &key, 2, Some(1), false)
        .await
        .expect_err("new primary");
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn restore_within_the_window_makes_the_version_disabled_and_the_scheduler_spares_it() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "restore").await;
    let blob = encrypt(&server, &key, b"keep me", &[("app", "r")])
        .await
        .ciphertext_blob;
    rotate(&server, &key).await;
    schedule(&server, &key, 1, Some(3), false)
        .await
        .expect("schedule");

    // Scheduled: the version refuses use at once (not "invalid ciphertext").
    let status = decrypt(&server, &blob, &[("app", "r")])
        .await
        .expect_err("scheduled");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("scheduled for destruction"),
        "{}",
        status.message()
    );
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + 2 * DAY_MS);
    assert_eq!((pass.versions_destroyed, pass.failed), (0, 0), "{pass:?}");

    // The CLI restores it: DISABLED, then enable-version makes it usable.
    let endpoint = server.endpoint.clone();
    let k = key.clone();
    let restored = tokio::task::spawn_blocking(move || {
        run_cli(
            &endpoint,
            &["--json", "key", "restore-version", &k, "1"],
            b"",
        )
    })
    .await
    .expect("join");
    assert!(restored.0, "restore-version: {}", restored.2);
    let json: serde_json::Value = serde_json::from_slice(&restored.1).expect("json");
    assert_eq!(json["state"], "DISABLED", "{json}");
    assert_eq!(
        version_state(&server, &key, 1).await.state,
        pb::KeyVersionState::Disabled as i32
    );
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + 4 * DAY_MS);
    assert_eq!(
        (pass.versions_destroyed, pass.failed),
        (0, 0),
        "restored: spared"
    );
    server
        .keys()
        .enable_key_version(pb::EnableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("enable");
    assert_eq!(
        decrypt(&server, &blob, &[("app", "r")])
            .await
            .expect("usable again")
            .plaintext,
        b"keep me"
    );
    // Only a scheduled version can be restored.
    let status = server
        .keys()
        .restore_key_version(pb::RestoreKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect_err("not scheduled");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("is not scheduled for destruction (it is enabled)"),
        "{}",
        status.message()
    );
    assert!(
        server
            .service()
            .hsm()
            .key_exists(&kms_hsm::ObjectId::new(format!("{key}/v1").into_bytes()).expect("id"))
            .expect("search"),
        "a restored version keeps its KEK"
    );
}

#[tokio::test]
async fn the_scheduler_destroys_a_token_object_version_and_its_blobs_fail_by_name() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "destroy").await;
    let blob = encrypt(&server, &key, b"doomed", &[]).await.ciphertext_blob;
    rotate(&server, &key).await;
    let kek = kms_hsm::ObjectId::new(format!("{key}/v1").into_bytes()).expect("id");
    assert!(server.service().hsm().key_exists(&kek).expect("search"));

    // The CLI schedules (1 day); the scheduler destroys once the day passed.
    let endpoint = server.endpoint.clone();
    let k = key.clone();
    let scheduled = tokio::task::spawn_blocking(move || {
        run_cli(
            &endpoint,
            &[
                "--json",
                "key",
                "schedule-version-destruction",
                &k,
                "1",
                "--days",
                "1",
            ],
            b"",
        )
    })
    .await
    .expect("join");
    assert!(scheduled.0, "schedule-version-destruction: {}", scheduled.2);
    let json: serde_json::Value = serde_json::from_slice(&scheduled.1).expect("json");
    assert_eq!(json["state"], "SCHEDULED_DESTRUCTION", "{json}");
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + DAY_MS / 2);
    assert_eq!(pass.versions_destroyed, 0, "not due yet");
    assert!(server.service().hsm().key_exists(&kek).expect("search"));
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + 2 * DAY_MS);
    assert_eq!((pass.versions_destroyed, pass.failed), (1, 0), "{pass:?}");

    // The KEK is gone from the token (a PKCS#11 object search).
    assert!(!server.service().hsm().key_exists(&kek).expect("search"));
    // The version stays as a tombstone; its blobs fail by name.
    let listed = version_state(&server, &key, 1).await;
    assert_eq!(listed.state, pb::KeyVersionState::Destroyed as i32);
    assert!(listed.destroy_time.is_some());
    let status = decrypt(&server, &blob, &[]).await.expect_err("destroyed");
    assert_destroyed(&status, &key, 1);
    let status = server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob.clone(),
            destination_key_id: key.clone(),
            ..Default::default()
        })
        .await
        .expect_err("re-encrypt from a destroyed version");
    assert_destroyed(&status, &key, 1);
    // Final: neither restore nor enable brings it back; a second pass is idle.
    let status = server
        .keys()
        .restore_key_version(pb::RestoreKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect_err("restore a destroyed version");
    assert_destroyed(&status, &key, 1);
    let status = server
        .keys()
        .enable_key_version(pb::EnableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect_err("enable a destroyed version");
    assert_destroyed(&status, &key, 1);
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + 3 * DAY_MS);
    assert_eq!((pass.versions_destroyed, pass.failed), (0, 0));
    // The key itself is untouched: the primary encrypts and decrypts.
    let fresh = encrypt(&server, &key, b"alive", &[]).await;
    assert_eq!(fresh.key_version, 2);
    assert_eq!(
        decrypt(&server, &fresh.ciphertext_blob, &[])
            .await
            .expect("primary")
            .plaintext,
        b"alive"
    );
    // The destruction is audited as the service's own work.
    let events = audit_events(&server, &key, pb::Operation::DestroyKeyVersion).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].principal, "system");
    assert_eq!(events[0].key_version, 1);
    assert_eq!(events[0].result_code, 0);
}

#[tokio::test]
async fn the_scheduler_erases_a_wrapped_versions_blob_from_the_catalogue() {
    let env = TestEnv::new();
    super::wrapped::init_root(&env);
    let server = env.start().await;
    let key = create_key(&server, "wrapped-destroy").await;
    let blob = encrypt(&server, &key, b"wrapped doomed", &[])
        .await
        .ciphertext_blob;
    // Decrypt once so that the working key is cached (then it must go too).
    decrypt(&server, &blob, &[]).await.expect("decrypt");
    rotate(&server, &key).await;
    let key_id = kms_storage::KeyId::parse(&key).expect("key id");
    let record = |server: &TestServer| {
        server
            .service()
            .catalogue()
            .get_version(&key_id, 1)
            .expect("read")
            .expect("version 1")
    };
    assert!(
        matches!(&record(&server).kek, KekHandle::Wrapped { blob, .. } if !blob.is_empty()),
        "version 1 is wrapped"
    );
    // It decrypted just now: only an override schedules it.
    schedule(&server, &key, 1, Some(1), true)
        .await
        .expect("schedule");
    let pass = server
        .service()
        .run_scheduler_pass_at(now_ms() + 2 * DAY_MS);
    assert_eq!((pass.versions_destroyed, pass.failed), (1, 0), "{pass:?}");

    let destroyed = record(&server);
    assert!(
        matches!(destroyed.state, kms_storage::VersionState::Destroyed { .. }),
        "{:?}",
        destroyed.state
    );
    match &destroyed.kek {
        KekHandle::Wrapped { blob, mac, .. } => {
            assert!(blob.is_empty(), "the wrapped key material is erased");
            assert_eq!(mac, &[0; 32]);
        }
        other => panic!("expected a wrapped handle, got {other:?}"),
    }
    let status = decrypt(&server, &blob, &[]).await.expect_err("destroyed");
    assert_destroyed(&status, &key, 1);
    // The primary (wrapped too) still works.
    let fresh = encrypt(&server, &key, b"alive", &[]).await;
    assert_eq!(
        decrypt(&server, &fresh.ciphertext_blob, &[])
            .await
            .expect("primary")
            .plaintext,
        b"alive"
    );
}

#[tokio::test]
async fn the_guard_refuses_a_recently_used_version_with_its_last_use_and_the_override_is_audited() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "guarded").await;
    let unused = create_key(&server, "unused").await;
    let blob = encrypt(&server, &key, b"in use", &[]).await.ciphertext_blob;
    decrypt(&server, &blob, &[])
        .await
        .expect("decrypt: a use of version 1");
    rotate(&server, &key).await;
    rotate(&server, &unused).await;

    let status = schedule(&server, &key, 1, None, false)
        .await
        .expect_err("used within the quiet period");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let message = status.message();
    assert!(
        message.contains("version 1 of key") && message.contains("was last used to decrypt at 20"),
        "{message}"
    );
    assert!(message.contains("quiet period of 30 days"), "{message}");
    assert!(message.contains("override_recent_use"), "{message}");
    // The time is RFC 3339 (UTC) and within the last minutes.
    let at = message
        .split("decrypt at ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("time in message");
    let parsed: prost_types::Timestamp = at.parse().expect("RFC 3339 time");
    let at_ms = u64::try_from(parsed.seconds).expect("s") * 1000;
    assert!(at_ms <= now_ms() && at_ms + 600_000 >= now_ms(), "{at}");
    assert_eq!(
        version_state(&server, &key, 1).await.state,
        pb::KeyVersionState::Enabled as i32
    );

    // A version never used is scheduled without override.
    schedule(&server, &unused, 1, None, false)
        .await
        .expect("unused version");

    // The override schedules it, audited under its own operation.
    let scheduled = schedule(&server, &key, 1, None, true)
        .await
        .expect("override");
    assert_eq!(
        scheduled.key_version.expect("version").state,
        pb::KeyVersionState::ScheduledDestruction as i32
    );
    let overrides = audit_events(
        &server,
        &key,
        pb::Operation::ScheduleKeyVersionDestructionOverrideRecentUse,
    )
    .await;
    assert_eq!(overrides.len(), 1, "{overrides:?}");
    assert_eq!((overrides[0].key_version, overrides[0].result_code), (1, 0));
    let refused = audit_events(&server, &key, pb::Operation::ScheduleKeyVersionDestruction).await;
    assert_eq!(refused.len(), 1, "the refusal is audited: {refused:?}");
    assert_eq!(refused[0].result_code, Code::FailedPrecondition as i32);
}

#[tokio::test]
async fn a_quiet_period_of_0_days_turns_the_guard_off() {
    let env = TestEnv::new();
    let mut config = env.config();
    config.lifecycle.version_destruction_quiet_period_days = 0;
    let server = env.start_with(config).await;
    let key = create_key(&server, "no-guard").await;
    let blob = encrypt(&server, &key, b"in use", &[]).await.ciphertext_blob;
    decrypt(&server, &blob, &[]).await.expect("decrypt");
    rotate(&server, &key).await;
    schedule(&server, &key, 1, None, false)
        .await
        .expect("no guard");
}

#[tokio::test]
async fn a_re_encrypt_only_version_refuses_decrypt_and_allows_re_encrypt() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "compromised").await;
    let context = [("tenant", "t1")];
    let blob = encrypt(&server, &key, b"move me", &context)
        .await
        .ciphertext_blob;
    rotate(&server, &key).await;

    // The primary cannot enter the state.
    let status = server
        .keys()
        .set_key_version_re_encrypt_only(pb::SetKeyVersionReEncryptOnlyRequest {
            key_id: key.clone(),
            version: 2,
        })
        .await
        .expect_err("primary");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("primary"), "{}", status.message());

    // The CLI puts version 1 in it.
    let endpoint = server.endpoint.clone();
    let k = key.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_cli(
            &endpoint,
            &["--json", "key", "re-encrypt-only-version", &k, "1"],
            b"",
        )
    })
    .await
    .expect("join");
    assert!(out.0, "re-encrypt-only-version: {}", out.2);
    let json: serde_json::Value = serde_json::from_slice(&out.1).expect("json");
    assert_eq!(json["state"], "REENCRYPT_ONLY", "{json}");

    // Decrypt (and a batch decrypt) are refused, naming the state.
    let status = decrypt(&server, &blob, &context)
        .await
        .expect_err("decrypt");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("re-encrypt only"),
        "{}",
        status.message()
    );
    let batch = server
        .crypto()
        .batch_decrypt(pb::BatchDecryptRequest {
            entries: vec![pb::BatchDecryptEntry {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(&context),
            }],
            key_id: String::new(),
        })
        .await
        .expect("batch decrypt")
        .into_inner();
    match &batch.results[0].outcome {
        Some(pb::batch_decrypt_result::Outcome::Error(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32, "{e:?}");
        }
        other => panic!("expected a refused item, got {other:?}"),
    }
    // It cannot become primary.
    let status = server
        .keys()
        .set_primary_version(pb::SetPrimaryVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect_err("primary from re-encrypt only");
    assert_eq!(status.code(), Code::FailedPrecondition);

    // ReEncrypt moves the blob to the primary.
    let moved = server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob.clone(),
            source_encryption_context: ctx(&context),
            destination_key_id: key.clone(),
            destination_encryption_context: ctx(&context),
            ..Default::default()
        })
        .await
        .expect("re-encrypt from a re-encrypt-only version")
        .into_inner();
    assert_eq!((moved.source_key_version, moved.key_version), (1, 2));
    assert_eq!(
        decrypt(&server, &moved.ciphertext_blob, &context)
            .await
            .expect("moved blob")
            .plaintext,
        b"move me"
    );
    // Both requests are audited: the refusal (primary) and the change.
    let results: Vec<i32> = audit_events(&server, &key, pb::Operation::SetKeyVersionReEncryptOnly)
        .await
        .iter()
        .map(|e| e.result_code)
        .collect();
    assert_eq!(results, [Code::FailedPrecondition as i32, 0]);

    // DisableKeyVersion leaves the state (and refuses ReEncrypt too);
    // EnableKeyVersion makes it decrypt again.
    server
        .keys()
        .disable_key_version(pb::DisableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("disable");
    let status = server
        .crypto()
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob.clone(),
            source_encryption_context: ctx(&context),
            destination_key_id: key.clone(),
            destination_encryption_context: ctx(&context),
            ..Default::default()
        })
        .await
        .expect_err("disabled");
    assert_eq!(status.code(), Code::FailedPrecondition);
    server
        .keys()
        .enable_key_version(pb::EnableKeyVersionRequest {
            key_id: key.clone(),
            version: 1,
        })
        .await
        .expect("enable");
    assert_eq!(
        decrypt(&server, &blob, &context)
            .await
            .expect("enabled")
            .plaintext,
        b"move me"
    );
}
