//! Every RPC's documented request rules, one invalid input at a time, and
//! the audit trail of each refusal.
//!
//! Each case sends one request with its own `x-request-id`, expects the
//! status code the proto documents (and, for INVALID_ARGUMENT, the field's
//! name in the message), and afterwards the audit log must hold exactly one
//! record for that request id, whatever refused it: the gRPC handler's
//! conversions, the service's checks or the catalogue. A refusal decided
//! outside the audited path shows up here as a missing record.

use std::collections::HashMap;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};
use tonic::{Code, Request, Status};

use super::{create_key, ctx, encrypt};

/// A request carrying `id` as its request id.
fn with_id<T>(id: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii id"));
    request
}

fn seconds(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn timestamp_in(seconds_from_now: i64) -> Option<prost_types::Timestamp> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    Some(prost_types::Timestamp {
        seconds: i64::try_from(now).expect("seconds") + seconds_from_now,
        nanos: 0,
    })
}

/// Runs the cases and remembers which request ids were sent.
struct Cases {
    sent: Vec<String>,
    /// Cases that did not get the documented answer (reported together).
    wrong: Vec<String>,
}

impl Cases {
    /// One case: `call` must fail with `code`; for INVALID_ARGUMENT the
    /// message must name `field`.
    async fn refused<T, F>(&mut self, id: &str, code: Code, field: &str, call: F)
    where
        T: std::fmt::Debug,
        F: Future<Output = Result<T, Status>>,
    {
        self.sent.push(id.to_owned());
        match call.await {
            Ok(reply) => self.wrong.push(format!("{id}: accepted: {reply:?}")),
            Err(status) if status.code() != code => {
                self.wrong
                    .push(format!("{id}: expected {code:?}, got {status:?}"));
            }
            Err(status) if code == Code::InvalidArgument && !status.message().contains(field) => {
                self.wrong
                    .push(format!("{id}: message should name {field}: {status:?}"));
            }
            Err(_) => {}
        }
    }

    /// One case that the proto documents as allowed.
    async fn accepted<T, F>(&mut self, id: &str, call: F) -> T
    where
        F: Future<Output = Result<T, Status>>,
    {
        self.sent.push(id.to_owned());
        call.await.unwrap_or_else(|e| panic!("{id}: {e:?}"))
    }
}

fn records_by_request_id(server: &TestServer) -> HashMap<String, Vec<serde_json::Value>> {
    let mut export = Vec::new();
    server
        .service()
        .export_audit(&Default::default(), &mut export)
        .expect("export");
    let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for line in String::from_utf8(export).expect("utf8").lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("json");
        let id = record["request_id"].as_str().unwrap_or_default().to_owned();
        by_id.entry(id).or_default().push(record);
    }
    by_id
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one table of cases, one per documented rule
async fn every_documented_request_rule_is_enforced_and_every_refusal_is_audited() {
    let env = TestEnv::new();
    let server = env.start().await;
    let mut keys = server.keys();
    let mut crypto = server.crypto();
    let mut audit = server.audit();
    let key = create_key(&server, "contracts").await;
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: key.clone(),
    })
    .await
    .expect("rotate to version 2");
    let disabled = create_key(&server, "disabled").await;
    keys.disable_key(pb::DisableKeyRequest {
        key_id: disabled.clone(),
    })
    .await
    .expect("disable");
    keys.create_alias(pb::CreateAliasRequest {
        alias_name: "alias/contracts".into(),
        target_key_id: key.clone(),
    })
    .await
    .expect("alias");
    let blob = encrypt(&server, &key, b"data", &[]).await.ciphertext_blob;
    let mut cases = Cases {
        sent: Vec::new(),
        wrong: Vec::new(),
    };
    let ia = Code::InvalidArgument;

    // CreateKey.
    let create = |spec: pb::KeySpec, period: Option<prost_types::Duration>| pb::CreateKeyRequest {
        key_spec: spec as i32,
        rotation_period: period,
        ..Default::default()
    };
    cases
        .refused(
            "create-spec",
            ia,
            "key_spec",
            keys.create_key(with_id(
                "create-spec",
                pb::CreateKeyRequest {
                    key_spec: 99,
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "create-period-zero",
            ia,
            "rotation_period",
            keys.create_key(with_id(
                "create-period-zero",
                create(pb::KeySpec::Unspecified, seconds(0)),
            )),
        )
        .await;
    cases
        .refused(
            "create-period-negative",
            ia,
            "rotation_period",
            keys.create_key(with_id(
                "create-period-negative",
                create(pb::KeySpec::Aes256Gcm, seconds(-86_400)),
            )),
        )
        .await;
    cases
        .refused(
            "create-period-fraction",
            ia,
            "rotation_period",
            keys.create_key(with_id(
                "create-period-fraction",
                create(
                    pb::KeySpec::Aes256Gcm,
                    Some(prost_types::Duration {
                        seconds: 86_400,
                        nanos: 5,
                    }),
                ),
            )),
        )
        .await;
    cases
        .refused(
            "create-description",
            ia,
            "description",
            keys.create_key(with_id(
                "create-description",
                pb::CreateKeyRequest {
                    description: "d".repeat(8193),
                    ..Default::default()
                },
            )),
        )
        .await;

    // "up to 8192 characters": characters, not bytes.
    cases
        .accepted(
            "create-description-8192-chars",
            keys.create_key(with_id(
                "create-description-8192-chars",
                pb::CreateKeyRequest {
                    description: "é".repeat(8192),
                    ..Default::default()
                },
            )),
        )
        .await;

    // Reads and lists.
    cases
        .refused(
            "describe-empty",
            ia,
            "key",
            keys.describe_key(with_id("describe-empty", pb::DescribeKeyRequest::default())),
        )
        .await;
    cases
        .refused(
            "list-keys-size",
            ia,
            "page_size",
            keys.list_keys(with_id(
                "list-keys-size",
                pb::ListKeysRequest {
                    page_size: -1,
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "list-keys-token",
            ia,
            "page_token",
            keys.list_keys(with_id(
                "list-keys-token",
                pb::ListKeysRequest {
                    page_token: "not a token".into(),
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "list-versions-size",
            ia,
            "page_size",
            keys.list_key_versions(with_id(
                "list-versions-size",
                pb::ListKeyVersionsRequest {
                    key_id: key.clone(),
                    page_size: -5,
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "list-versions-token",
            ia,
            "page_token",
            keys.list_key_versions(with_id(
                "list-versions-token",
                pb::ListKeyVersionsRequest {
                    key_id: key.clone(),
                    page_token: "x".into(),
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "list-aliases-size",
            ia,
            "page_size",
            keys.list_aliases(with_id(
                "list-aliases-size",
                pb::ListAliasesRequest {
                    page_size: -1,
                    ..Default::default()
                },
            )),
        )
        .await;

    // Metadata changes.
    cases
        .refused(
            "describe-long",
            ia,
            "description",
            keys.update_key_description(with_id(
                "describe-long",
                pb::UpdateKeyDescriptionRequest {
                    key_id: key.clone(),
                    description: "d".repeat(8193),
                },
            )),
        )
        .await;
    cases
        .refused(
            "tag-empty",
            ia,
            "tags",
            keys.tag_key(with_id(
                "tag-empty",
                pb::TagKeyRequest {
                    key_id: key.clone(),
                    tags: HashMap::new(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "untag-empty",
            ia,
            "tag_keys",
            keys.untag_key(with_id(
                "untag-empty",
                pb::UntagKeyRequest {
                    key_id: key.clone(),
                    tag_keys: Vec::new(),
                },
            )),
        )
        .await;

    // Key states.
    cases
        .refused(
            "enable-malformed",
            ia,
            "alias",
            keys.enable_key(with_id(
                "enable-malformed",
                pb::EnableKeyRequest {
                    key_id: "alias/bad name!".into(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "disable-unknown",
            Code::NotFound,
            "",
            keys.disable_key(with_id(
                "disable-unknown",
                pb::DisableKeyRequest {
                    key_id: "alias/nobody".into(),
                },
            )),
        )
        .await;
    for (id, days) in [("deletion-6-days", 6), ("deletion-31-days", 31)] {
        cases
            .refused(
                id,
                ia,
                "pending_window_days",
                keys.schedule_key_deletion(with_id(
                    id,
                    pb::ScheduleKeyDeletionRequest {
                        key_id: key.clone(),
                        pending_window_days: Some(days),
                    },
                )),
            )
            .await;
    }
    cases
        .refused(
            "cancel-not-pending",
            Code::FailedPrecondition,
            "",
            keys.cancel_key_deletion(with_id(
                "cancel-not-pending",
                pb::CancelKeyDeletionRequest {
                    key_id: key.clone(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "rotate-disabled",
            Code::FailedPrecondition,
            "",
            keys.rotate_key(with_id(
                "rotate-disabled",
                pb::RotateKeyRequest {
                    key_id: disabled.clone(),
                },
            )),
        )
        .await;

    // SetRotationPolicy: every documented rule of both fields.
    let policy = |period, next| pb::SetRotationPolicyRequest {
        key_id: key.clone(),
        rotation_period: period,
        next_rotation_time: next,
    };
    cases
        .refused(
            "policy-next-without-period",
            ia,
            "next_rotation_time",
            keys.set_rotation_policy(with_id(
                "policy-next-without-period",
                policy(None, timestamp_in(3600)),
            )),
        )
        .await;
    cases
        .refused(
            "policy-period-zero",
            ia,
            "rotation_period",
            keys.set_rotation_policy(with_id("policy-period-zero", policy(seconds(0), None))),
        )
        .await;
    cases
        .refused(
            "policy-period-short",
            ia,
            "rotation_period",
            keys.set_rotation_policy(with_id("policy-period-short", policy(seconds(60), None))),
        )
        .await;
    cases
        .refused(
            "policy-next-past",
            ia,
            "next_rotation_time",
            keys.set_rotation_policy(with_id(
                "policy-next-past",
                policy(seconds(86_400), timestamp_in(-60)),
            )),
        )
        .await;
    cases
        .refused(
            "policy-next-beyond-period",
            ia,
            "next_rotation_time",
            keys.set_rotation_policy(with_id(
                "policy-next-beyond-period",
                policy(seconds(86_400), timestamp_in(2 * 86_400)),
            )),
        )
        .await;
    // Refused after the alias resolved: the record names the key's id.
    cases
        .refused(
            "policy-via-alias",
            ia,
            "next_rotation_time",
            keys.set_rotation_policy(with_id(
                "policy-via-alias",
                pb::SetRotationPolicyRequest {
                    key_id: "alias/contracts".into(),
                    rotation_period: seconds(86_400),
                    next_rotation_time: timestamp_in(-60),
                },
            )),
        )
        .await;
    let wanted = timestamp_in(3600).expect("timestamp");
    let set = cases
        .accepted(
            "policy-next-honoured",
            keys.set_rotation_policy(with_id(
                "policy-next-honoured",
                policy(seconds(7 * 86_400), Some(wanted)),
            )),
        )
        .await
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(
        set.next_rotation_time.map(|t| t.seconds),
        Some(wanted.seconds),
        "next_rotation_time is used as given"
    );
    assert_eq!(set.rotation_period.map(|d| d.seconds), Some(7 * 86_400));
    let unset = cases
        .accepted(
            "policy-off",
            keys.set_rotation_policy(with_id("policy-off", policy(None, None))),
        )
        .await
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert!(unset.rotation_period.is_none() && unset.next_rotation_time.is_none());

    // Versions.
    cases
        .refused(
            "enable-version-zero",
            ia,
            "version",
            keys.enable_key_version(with_id(
                "enable-version-zero",
                pb::EnableKeyVersionRequest {
                    key_id: key.clone(),
                    version: 0,
                },
            )),
        )
        .await;
    cases
        .refused(
            "disable-version-zero",
            ia,
            "version",
            keys.disable_key_version(with_id(
                "disable-version-zero",
                pb::DisableKeyVersionRequest {
                    key_id: key.clone(),
                    version: 0,
                },
            )),
        )
        .await;
    cases
        .refused(
            "disable-primary",
            Code::FailedPrecondition,
            "",
            keys.disable_key_version(with_id(
                "disable-primary",
                pb::DisableKeyVersionRequest {
                    key_id: key.clone(),
                    version: 2,
                },
            )),
        )
        .await;
    cases
        .refused(
            "primary-zero",
            ia,
            "version",
            keys.set_primary_version(with_id(
                "primary-zero",
                pb::SetPrimaryVersionRequest {
                    key_id: key.clone(),
                    version: 0,
                },
            )),
        )
        .await;
    cases
        .refused(
            "primary-unknown",
            Code::NotFound,
            "",
            keys.set_primary_version(with_id(
                "primary-unknown",
                pb::SetPrimaryVersionRequest {
                    key_id: key.clone(),
                    version: 9,
                },
            )),
        )
        .await;

    // Aliases.
    cases
        .refused(
            "alias-to-alias",
            ia,
            "target_key_id",
            keys.create_alias(with_id(
                "alias-to-alias",
                pb::CreateAliasRequest {
                    alias_name: "alias/second".into(),
                    target_key_id: "alias/contracts".into(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "alias-exists",
            Code::AlreadyExists,
            "",
            keys.create_alias(with_id(
                "alias-exists",
                pb::CreateAliasRequest {
                    alias_name: "alias/contracts".into(),
                    target_key_id: key.clone(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "alias-update-unknown",
            Code::NotFound,
            "",
            keys.update_alias(with_id(
                "alias-update-unknown",
                pb::UpdateAliasRequest {
                    alias_name: "alias/nobody".into(),
                    target_key_id: key.clone(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "alias-delete-malformed",
            ia,
            "alias",
            keys.delete_alias(with_id(
                "alias-delete-malformed",
                pb::DeleteAliasRequest {
                    alias_name: "no-prefix".into(),
                },
            )),
        )
        .await;

    // Policies.
    cases
        .refused(
            "get-policy-empty",
            ia,
            "key",
            keys.get_key_policy(with_id(
                "get-policy-empty",
                pb::GetKeyPolicyRequest::default(),
            )),
        )
        .await;
    cases
        .refused(
            "put-policy-malformed",
            ia,
            "",
            keys.put_key_policy(with_id(
                "put-policy-malformed",
                pb::PutKeyPolicyRequest {
                    key_id: key.clone(),
                    policy: Some(pb::KeyPolicy {
                        grants: vec![pb::Grant {
                            principal: "someone".into(),
                            permissions: vec![999],
                            ..Default::default()
                        }],
                    }),
                },
            )),
        )
        .await;

    // Crypto.
    cases
        .refused(
            "encrypt-empty",
            ia,
            "plaintext",
            crypto.encrypt(with_id(
                "encrypt-empty",
                pb::EncryptRequest {
                    key_id: key.clone(),
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "encrypt-large",
            ia,
            "plaintext",
            crypto.encrypt(with_id(
                "encrypt-large",
                pb::EncryptRequest {
                    key_id: key.clone(),
                    plaintext: vec![1; 4097],
                    encryption_context: ctx(&[]),
                },
            )),
        )
        .await;
    cases
        .refused(
            "decrypt-garbage",
            ia,
            "ciphertext",
            crypto.decrypt(with_id(
                "decrypt-garbage",
                pb::DecryptRequest {
                    ciphertext_blob: vec![7; 40],
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "decrypt-wrong-context",
            ia,
            "ciphertext",
            crypto.decrypt(with_id(
                "decrypt-wrong-context",
                pb::DecryptRequest {
                    ciphertext_blob: blob.clone(),
                    encryption_context: ctx(&[("a", "b")]),
                    key_id: String::new(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "data-key-no-length",
            ia,
            "key_spec",
            crypto.generate_data_key(with_id(
                "data-key-no-length",
                pb::GenerateDataKeyRequest {
                    key_id: key.clone(),
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "data-key-np-no-length",
            ia,
            "key_spec",
            crypto.generate_data_key_without_plaintext(with_id(
                "data-key-np-no-length",
                pb::GenerateDataKeyWithoutPlaintextRequest {
                    key_id: key.clone(),
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "re-encrypt-no-destination",
            ia,
            "key",
            crypto.re_encrypt(with_id(
                "re-encrypt-no-destination",
                pb::ReEncryptRequest {
                    ciphertext_blob: blob.clone(),
                    ..Default::default()
                },
            )),
        )
        .await;
    for (id, n) in [("random-zero", 0), ("random-large", 1025)] {
        cases
            .refused(
                id,
                ia,
                "number_of_bytes",
                crypto.generate_random(with_id(
                    id,
                    pb::GenerateRandomRequest { number_of_bytes: n },
                )),
            )
            .await;
    }
    cases
        .refused(
            "batch-encrypt-empty",
            ia,
            "entries",
            crypto.batch_encrypt(with_id(
                "batch-encrypt-empty",
                pb::BatchEncryptRequest {
                    key_id: key.clone(),
                    entries: Vec::new(),
                },
            )),
        )
        .await;
    cases
        .refused(
            "batch-decrypt-empty",
            ia,
            "entries",
            crypto.batch_decrypt(with_id(
                "batch-decrypt-empty",
                pb::BatchDecryptRequest::default(),
            )),
        )
        .await;
    cases
        .refused(
            "batch-data-key-empty",
            ia,
            "entries",
            crypto.batch_generate_data_key(with_id(
                "batch-data-key-empty",
                pb::BatchGenerateDataKeyRequest {
                    key_id: key.clone(),
                    entries: Vec::new(),
                },
            )),
        )
        .await;

    let over_limit = kms::config::DEFAULT_MAX_BATCH + 1;
    cases
        .refused(
            "batch-encrypt-over-limit",
            ia,
            "entries",
            crypto.batch_encrypt(with_id(
                "batch-encrypt-over-limit",
                pb::BatchEncryptRequest {
                    key_id: key.clone(),
                    entries: vec![
                        pb::BatchEncryptEntry {
                            plaintext: b"x".to_vec(),
                            encryption_context: ctx(&[]),
                        };
                        over_limit
                    ],
                },
            )),
        )
        .await;

    // Documented idempotence and defaults.
    let enabled = cases
        .accepted(
            "enable-enabled",
            keys.enable_key(with_id(
                "enable-enabled",
                pb::EnableKeyRequest {
                    key_id: key.clone(),
                },
            )),
        )
        .await
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(enabled.state, pb::KeyState::Enabled as i32);
    // "changes nothing": not even the update time.
    let before = keys
        .describe_key(pb::DescribeKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("describe")
        .into_inner()
        .key_metadata
        .expect("metadata");
    let again = keys
        .enable_key(pb::EnableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("enable again")
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(again.update_time, before.update_time);
    let still_disabled = cases
        .accepted(
            "disable-disabled",
            keys.disable_key(with_id(
                "disable-disabled",
                pb::DisableKeyRequest {
                    key_id: disabled.clone(),
                },
            )),
        )
        .await
        .into_inner()
        .key_metadata
        .expect("metadata");
    assert_eq!(still_disabled.state, pb::KeyState::Disabled as i32);
    let scheduled = cases
        .accepted(
            "deletion-default-window",
            keys.schedule_key_deletion(with_id(
                "deletion-default-window",
                pb::ScheduleKeyDeletionRequest {
                    key_id: disabled.clone(),
                    pending_window_days: None,
                },
            )),
        )
        .await
        .into_inner();
    assert_eq!(scheduled.pending_window_days, 30, "unset means 30 days");

    // Audit listing.
    cases
        .refused(
            "audit-size",
            ia,
            "page_size",
            audit.list_audit_events(with_id(
                "audit-size",
                pb::ListAuditEventsRequest {
                    page_size: -1,
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "audit-operation",
            ia,
            "operation",
            audit.list_audit_events(with_id(
                "audit-operation",
                pb::ListAuditEventsRequest {
                    operation: 4242,
                    ..Default::default()
                },
            )),
        )
        .await;
    cases
        .refused(
            "audit-token",
            ia,
            "page_token",
            audit.list_audit_events(with_id(
                "audit-token",
                pb::ListAuditEventsRequest {
                    page_token: "zz".into(),
                    ..Default::default()
                },
            )),
        )
        .await;

    assert!(cases.wrong.is_empty(), "{:#?}", cases.wrong);

    cases
        .refused(
            "audit-range-inverted",
            ia,
            "to_sequence",
            audit.list_audit_events(with_id(
                "audit-range-inverted",
                pb::ListAuditEventsRequest {
                    from_sequence: 5,
                    to_sequence: 2,
                    ..Default::default()
                },
            )),
        )
        .await;

    // Exactly one record per request, naming the key where the request named one.
    let records = records_by_request_id(&server);
    let mut missing = Vec::new();
    for id in &cases.sent {
        match records.get(id).map(Vec::len) {
            Some(1) => {}
            Some(n) => panic!("{id}: {n} audit records, expected exactly one"),
            None => missing.push(id.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "requests without an audit record: {missing:?}"
    );
    for id in [
        "tag-empty",
        "policy-period-zero",
        "policy-via-alias",
        "list-versions-token",
        "enable-version-zero",
    ] {
        let record = &records[id][0];
        assert_eq!(record["result"], "INVALID_ARGUMENT", "{id}: {record}");
        assert_eq!(record["key_id"], key.as_str(), "{id}: {record}");
    }
    server.stop().await;
}

/// Error messages say each thing once: a cause that is an error's `source`
/// is not also spliced into its message (the CLI prints the whole chain).
/// Before: "cannot listen on ADDR: Address already in use (os error 98):
/// Address already in use (os error 98)".
#[test]
fn a_port_in_use_is_reported_once_naming_the_address() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let data = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(kms_tests::kms_binary())
        .args([
            "serve",
            "--dev",
            "--listen",
            &addr.to_string(),
            "--data-dir",
        ])
        .arg(data.path())
        .env("KMS_LOG", "warn")
        .output()
        .expect("run kms serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    let line = error_lines[0];
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    assert_eq!(line.matches("already in use").count(), 1, "{line}");
    drop(held);
}

/// The CLI says each cause once: the transport's errors repeat their own
/// sources ("tcp connect error: tcp connect error: Connection refused").
#[test]
fn a_refused_connection_is_reported_once() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let (ok, _, stderr) = kms_tests::run_cli(&format!("http://{closed}"), &["key", "list"], b"");
    assert!(!ok);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
    assert_eq!(line.matches("tcp connect error").count(), 1, "{line}");

    // A URL without a scheme is a setting to fix, not a server to start.
    let (ok, _, stderr) = kms_tests::run_cli(&closed.to_string(), &["key", "list"], b"");
    assert!(!ok);
    assert!(
        stderr.contains("must start with http:// or https://"),
        "{stderr}"
    );
    assert!(!stderr.contains("is `kms serve` running"), "{stderr}");
}
