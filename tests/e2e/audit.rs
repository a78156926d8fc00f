//! The audit trail end to end: one durable record per request, verifiable.

use kms_proto::v1 as pb;
use kms_tests::TestEnv;
use tonic::Code;

use super::{create_key, decrypt, encrypt};

#[tokio::test]
async fn every_request_leaves_exactly_one_record_and_the_chain_verifies() {
    let env = TestEnv::new();
    let server = env.start().await;
    let mut audit = server.audit();
    let before = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .events
        .len();
    // before: nothing but this listing itself may exist (it is recorded after it ran).
    assert_eq!(before, 0);

    let key = create_key(&server, "audited").await; // 1 (+1 for the listing above)
    let blob = encrypt(&server, &key, b"p", &[("a", "b")])
        .await
        .ciphertext_blob; // 2
    decrypt(&server, &blob, &[("a", "b")])
        .await
        .expect("decrypt"); // 3
    let status = decrypt(&server, &blob, &[("a", "wrong")])
        .await
        .expect_err("bad context"); // 4
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = server
        .crypto()
        .encrypt(pb::EncryptRequest {
            key_id: "alias/missing".into(),
            plaintext: b"x".to_vec(),
            encryption_context: Default::default(),
        })
        .await
        .expect_err("unknown alias"); // 5
    assert_eq!(status.code(), Code::NotFound);

    let events = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .events;
    let ops: Vec<(pb::Operation, i32)> = events
        .iter()
        .map(|e| {
            (
                pb::Operation::try_from(e.operation).expect("op"),
                e.result_code,
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            (pb::Operation::ListAuditEvents, 0),
            (pb::Operation::CreateKey, 0),
            (pb::Operation::Encrypt, 0),
            (pb::Operation::Decrypt, 0),
            (pb::Operation::Decrypt, Code::InvalidArgument as i32),
            (pb::Operation::Encrypt, Code::NotFound as i32),
        ]
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1, "gapless sequence");
        assert_eq!(e.principal, "anonymous");
        assert!(e.peer.starts_with("127.0.0.1:"), "peer {}", e.peer);
        assert!(!e.request_id.is_empty());
        assert_eq!(e.hash.len(), 32);
    }
    // Key uses name the canonical key and version; the context appears only as a digest.
    assert_eq!(events[2].key_id, key);
    assert_eq!(events[2].key_version, 1);
    assert_eq!(events[2].context_digest.len(), 32);
    assert_eq!(events[3].context_digest, events[2].context_digest);
    assert_ne!(events[4].context_digest, events[2].context_digest);
    assert_eq!(events[5].key_id, "alias/missing");

    // Filters.
    let encrypts = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            operation: pb::Operation::Encrypt as i32,
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner()
        .events;
    assert_eq!(encrypts.len(), 2);
    let for_key = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: key.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("filter")
        .into_inner()
        .events;
    assert_eq!(for_key.len(), 4);
    // By alias: the key the alias names.
    server
        .keys()
        .create_alias(pb::CreateAliasRequest {
            alias_name: "alias/audited".into(),
            target_key_id: key.clone(),
        })
        .await
        .expect("alias");
    let by_alias = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            key_id: "alias/audited".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("filter by alias")
        .into_inner()
        .events;
    assert!(by_alias.len() >= 5, "{}", by_alias.len());
    assert!(by_alias.iter().all(|e| e.key_id == key));
    // Pagination.
    let page = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    assert_eq!(page.events.len(), 2);
    assert!(!page.next_page_token.is_empty());

    let verified = audit
        .verify_audit_log(pb::VerifyAuditLogRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.valid, "{verified:?}");
    assert!(verified.events_verified >= 6);
}

#[tokio::test]
async fn checkpoints_are_maced_in_the_hsm_and_verified() {
    let env = TestEnv::new();
    let server = env.start().await; // checkpoint every 50 records
    let key = create_key(&server, "many").await;
    for i in 0..120u32 {
        encrypt(&server, &key, &i.to_be_bytes(), &[]).await;
    }
    let report = server.service().verify_chain(None).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert!(report.checkpoints_verified >= 2, "{report:?}");
}
