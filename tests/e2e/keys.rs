//! Key lifecycle end to end: every KeyManagement RPC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_tests::TestEnv;
use tonic::Code;

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

#[tokio::test]
async fn key_catalogue_rpcs() {
    let env = TestEnv::new();
    let server = env.start().await;
    let mut keys = server.keys();

    let created = keys
        .create_key(pb::CreateKeyRequest {
            description: "orders database".into(),
            key_spec: pb::KeySpec::Aes256Gcm as i32,
            tags: ctx(&[("team", "payments")]),
            rotation_period: Some(prost_types::Duration {
                seconds: 90 * 86_400,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .key_metadata
        .expect("metadata");
    let id = created.key_id.clone();
    assert!(id.starts_with("key-") && id.len() == 36, "{id}");
    assert_eq!(created.state, pb::KeyState::Enabled as i32);
    assert_eq!(created.primary_version, 1);
    assert_eq!(
        created.rotation_period.as_ref().map(|d| d.seconds),
        Some(90 * 86_400)
    );
    assert!(created.next_rotation_time.is_some());

    // Aliases: create, describe by alias, uniqueness, update, list, delete.
    keys.create_alias(pb::CreateAliasRequest {
        alias_name: "alias/orders".into(),
        target_key_id: id.clone(),
    })
    .await
    .expect("alias");
    let status = keys
        .create_alias(pb::CreateAliasRequest {
            alias_name: "alias/orders".into(),
            target_key_id: id.clone(),
        })
        .await
        .expect_err("duplicate alias");
    assert_eq!(status.code(), Code::AlreadyExists);
    let status = keys
        .create_alias(pb::CreateAliasRequest {
            alias_name: "orders".into(),
            target_key_id: id.clone(),
        })
        .await
        .expect_err("alias without prefix");
    assert_eq!(status.code(), Code::InvalidArgument);
    let described = keys
        .describe_key(pb::DescribeKeyRequest {
            key_id: "alias/orders".into(),
        })
        .await
        .expect("describe by alias")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(described.key_id, id);
    assert_eq!(described.aliases, vec!["alias/orders".to_owned()]);
    assert_eq!(described.description, "orders database");

    let other = create_key(&server, "other").await;
    keys.update_alias(pb::UpdateAliasRequest {
        alias_name: "alias/orders".into(),
        target_key_id: other.clone(),
    })
    .await
    .expect("update alias");
    let aliases = keys
        .list_aliases(pb::ListAliasesRequest::default())
        .await
        .expect("list aliases")
        .into_inner()
        .aliases;
    assert_eq!(aliases.len(), 1);
    assert_eq!(aliases[0].target_key_id, other);
    keys.delete_alias(pb::DeleteAliasRequest {
        alias_name: "alias/orders".into(),
    })
    .await
    .expect("delete alias");
    let status = keys
        .describe_key(pb::DescribeKeyRequest {
            key_id: "alias/orders".into(),
        })
        .await
        .expect_err("deleted alias");
    assert_eq!(status.code(), Code::NotFound);

    // Description and tags.
    let updated = keys
        .update_key_description(pb::UpdateKeyDescriptionRequest {
            key_id: id.clone(),
            description: "orders v2".into(),
        })
        .await
        .expect("describe")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(updated.description, "orders v2");
    let tagged = keys
        .tag_key(pb::TagKeyRequest {
            key_id: id.clone(),
            tags: ctx(&[("env", "prod")]),
        })
        .await
        .expect("tag")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(tagged.tags.len(), 2);
    let untagged = keys
        .untag_key(pb::UntagKeyRequest {
            key_id: id.clone(),
            tag_keys: vec!["team".into()],
        })
        .await
        .expect("untag")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(untagged.tags, ctx(&[("env", "prod")]));

    // Rotation policy and versions.
    keys.set_rotation_policy(pb::SetRotationPolicyRequest {
        key_id: id.clone(),
        rotation_period: None,
        next_rotation_time: None,
    })
    .await
    .expect("no rotation");
    let status = keys
        .set_rotation_policy(pb::SetRotationPolicyRequest {
            key_id: id.clone(),
            rotation_period: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            next_rotation_time: None,
        })
        .await
        .expect_err("period too short");
    assert_eq!(status.code(), Code::InvalidArgument);
    keys.rotate_key(pb::RotateKeyRequest { key_id: id.clone() })
        .await
        .expect("rotate");
    let versions = keys
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("versions")
        .into_inner()
        .versions;
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(versions[1].primary && !versions[0].primary);
    let paged = keys
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: id.clone(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(paged.versions.len(), 1);
    // Page tokens are opaque (issue 13): follow it to the second, last page.
    assert!(!paged.next_page_token.is_empty());
    let last = keys
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: id.clone(),
            page_size: 1,
            page_token: paged.next_page_token.clone(),
        })
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(
        last.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2]
    );
    assert!(last.next_page_token.is_empty());

    // Listing with pagination.
    for i in 0..3 {
        create_key(&server, &format!("extra {i}")).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = keys
            .list_keys(pb::ListKeysRequest {
                page_size: 2,
                page_token: token.clone(),
                include_deleted: false,
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "ordered by id");

    // A key without its own policy reports the empty policy (service default).
    let policy = keys
        .get_key_policy(pb::GetKeyPolicyRequest { key_id: id })
        .await
        .expect("policy")
        .into_inner()
        .policy
        .expect("policy");
    assert!(policy.grants.is_empty());
}

#[tokio::test]
async fn deletion_has_a_waiting_period_can_be_cancelled_and_leaves_a_tombstone() {
    let env = TestEnv::new();
    let server = env.start().await;
    let mut keys = server.keys();
    let key = create_key(&server, "doomed").await;
    let blob = encrypt(&server, &key, b"last words", &[])
        .await
        .ciphertext_blob;

    for days in [6, 31] {
        let status = keys
            .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
                key_id: key.clone(),
                pending_window_days: Some(days),
            })
            .await
            .expect_err("window out of range");
        assert_eq!(status.code(), Code::InvalidArgument, "{days} days");
    }
    let scheduled = keys
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: key.clone(),
            pending_window_days: None,
        })
        .await
        .expect("schedule")
        .into_inner();
    assert_eq!(scheduled.pending_window_days, 30);
    let metadata = scheduled.key_metadata.expect("metadata");
    assert_eq!(metadata.state, pb::KeyState::PendingDeletion as i32);
    let at = metadata.deletion_time.expect("deletion time");
    let expected = (now_ms() / 1000) as i64 + 30 * 86_400;
    assert!((at.seconds - expected).abs() < 120, "deletion in 30 days");

    // Pending deletion: unusable, but nothing destroyed yet.
    let status = decrypt(&server, &blob, &[])
        .await
        .expect_err("pending deletion");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let passed = server
        .service()
        .run_scheduler_pass_at(now_ms() + Duration::from_secs(29 * 86_400).as_millis() as u64);
    assert_eq!(passed.deleted, 0, "deleted before the waiting period ended");

    // Cancel: the key comes back disabled, then can be enabled and used.
    let cancelled = keys
        .cancel_key_deletion(pb::CancelKeyDeletionRequest {
            key_id: key.clone(),
        })
        .await
        .expect("cancel")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(cancelled.state, pb::KeyState::Disabled as i32);
    keys.enable_key(pb::EnableKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("enable");
    assert_eq!(
        decrypt(&server, &blob, &[])
            .await
            .expect("usable again")
            .plaintext,
        b"last words"
    );

    // Schedule again with 7 days and let the scheduler run after the date.
    keys.schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
        key_id: key.clone(),
        pending_window_days: Some(7),
    })
    .await
    .expect("schedule 7 days");
    let passed = server
        .service()
        .run_scheduler_pass_at(now_ms() + Duration::from_secs(8 * 86_400).as_millis() as u64);
    assert_eq!(passed.deleted, 1);
    let described = keys
        .describe_key(pb::DescribeKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("tombstone stays describable")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(described.state, pb::KeyState::Deleted as i32);
    let status = decrypt(&server, &blob, &[]).await.expect_err("deleted");
    assert_eq!(status.code(), Code::FailedPrecondition);
    // Its KEK is gone from the HSM.
    assert!(
        !server
            .service()
            .hsm()
            .key_exists(&kms_hsm::ObjectId::new(format!("{key}/v1").into_bytes()).expect("id"))
            .expect("search")
    );
    // A tombstone cannot be revived.
    let status = keys
        .enable_key(pb::EnableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect_err("revive");
    assert_eq!(status.code(), Code::FailedPrecondition);
    // Listing hides it unless asked.
    let listed = keys
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.keys.iter().all(|k| k.key_id != key));
    let listed = keys
        .list_keys(pb::ListKeysRequest {
            include_deleted: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.keys.iter().any(|k| k.key_id == key));
}

#[tokio::test]
async fn scheduled_rotation_happens_once_per_period() {
    let env = TestEnv::new();
    let server = env.start().await;
    let mut keys = server.keys();
    let key = keys
        .create_key(pb::CreateKeyRequest {
            description: "auto".into(),
            rotation_period: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .key_id;
    let service = server.service();
    assert_eq!(service.run_scheduler_pass().rotated, 0, "not due yet");
    let later = now_ms() + 2 * 86_400_000;
    assert_eq!(service.run_scheduler_pass_at(later).rotated, 1);
    // The same moment again: already rotated, no double rotation.
    assert_eq!(service.run_scheduler_pass_at(later).rotated, 0);
    let primary = keys
        .describe_key(pb::DescribeKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("describe")
        .into_inner()
        .key_metadata
        .expect("metadata")
        .primary_version;
    assert_eq!(primary, 2);
}
