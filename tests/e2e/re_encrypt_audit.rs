//! ReEncrypt moves data into its destination key, so the audit log must let
//! an auditor who follows that key see it (issue 13, item 5): ReEncrypt
//! leaves, in one audit group, the record naming the source key and version
//! and a second record naming the destination key and the version it used
//! (same request id, consecutive sequence numbers). A failed attempt whose
//! destination was resolved is recorded under the destination too.

use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};
use tonic::{Code, Request};

use super::{create_key, ctx, encrypt};

fn with_id<T>(id: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii id"));
    request
}

async fn events_of(server: &TestServer, key: &str) -> Vec<pb::AuditEvent> {
    server
        .audit()
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: key.to_owned(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

fn re_encrypts(events: &[pb::AuditEvent], request_id: &str) -> Vec<pb::AuditEvent> {
    events
        .iter()
        .filter(|e| e.operation == pb::Operation::ReEncrypt as i32 && e.request_id == request_id)
        .cloned()
        .collect()
}

#[tokio::test]
async fn re_encrypt_is_audited_under_the_destination_key_and_version() {
    let env = TestEnv::new();
    let server = env.start().await;
    let source = create_key(&server, "source").await;
    let destination = create_key(&server, "destination").await;
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: destination.clone(),
        })
        .await
        .expect("rotate the destination to version 2");
    let blob = encrypt(&server, &source, b"moving", &[("app", "a")])
        .await
        .ciphertext_blob;

    let moved = server
        .crypto()
        .re_encrypt(with_id(
            "move-a-to-b",
            pb::ReEncryptRequest {
                ciphertext_blob: blob.clone(),
                source_encryption_context: ctx(&[("app", "a")]),
                destination_key_id: destination.clone(),
                destination_encryption_context: ctx(&[("app", "b")]),
                ..Default::default()
            },
        ))
        .await
        .expect("re-encrypt")
        .into_inner();
    assert_eq!(moved.key_id, destination);

    // Following the destination key finds the move, with the version used.
    let under_destination = re_encrypts(&events_of(&server, &destination).await, "move-a-to-b");
    assert_eq!(under_destination.len(), 1, "{under_destination:?}");
    let to = &under_destination[0];
    assert_eq!(to.key_id, destination);
    assert_eq!(to.key_version, 2);
    assert_eq!(to.result_code, Code::Ok as i32);
    // Following the source key finds it too, naming the source version.
    let under_source = re_encrypts(&events_of(&server, &source).await, "move-a-to-b");
    assert_eq!(under_source.len(), 1, "{under_source:?}");
    let from = &under_source[0];
    assert_eq!(
        (from.key_id.as_str(), from.key_version),
        (source.as_str(), 1)
    );
    // One group: consecutive records, the source first; different contexts.
    assert_eq!(to.sequence, from.sequence + 1);
    assert_ne!(to.context_digest, from.context_digest);

    // A refused move into the destination is visible under it as well.
    let status = server
        .crypto()
        .re_encrypt(with_id(
            "move-refused",
            pb::ReEncryptRequest {
                ciphertext_blob: blob,
                source_encryption_context: ctx(&[("app", "wrong")]),
                destination_key_id: destination.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("wrong source context");
    assert_eq!(status.code(), Code::InvalidArgument);
    let refused = re_encrypts(&events_of(&server, &destination).await, "move-refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].result_code, Code::InvalidArgument as i32);

    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    server.stop().await;
}
