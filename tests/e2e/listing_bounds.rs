//! Listings over sets that grow while they are read (issue 13, item 2): every
//! List RPC pages through a set bounded at its first page, so paging always
//! terminates and never returns what did not exist when it started. Page
//! tokens are opaque and validated: a foreign or forged one is INVALID_ARGUMENT.

use kms_proto::v1 as pb;
use kms_storage::AuditFilter;
use kms_tests::{TestEnv, TestServer};
use tonic::Code;

use super::{create_key, encrypt};

/// More pages than any listing below can legitimately take: reaching it
/// means the listing did not terminate.
const PAGE_CAP: usize = 200;

/// The sequence numbers of the records matching `filter`, read straight from
/// the log (no RPC, so reading them adds no record).
fn sequences_matching(server: &TestServer, filter: &AuditFilter) -> Vec<u64> {
    let mut out = Vec::new();
    server
        .service()
        .export_audit(filter, &mut out)
        .expect("export");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("json line");
            value["seq"].as_u64().expect("seq")
        })
        .collect()
}

/// Pages through ListAuditEvents one event at a time; `None` if it did not
/// end within [`PAGE_CAP`] pages.
async fn page_audit_one_by_one(
    server: &TestServer,
    template: pb::ListAuditEventsRequest,
) -> Option<Vec<u64>> {
    let mut audit = server.audit();
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..PAGE_CAP {
        let reply = audit
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: token.clone(),
                ..template.clone()
            })
            .await
            .expect("list")
            .into_inner();
        seen.extend(reply.events.iter().map(|e| e.sequence));
        if reply.next_page_token.is_empty() {
            return Some(seen);
        }
        token = reply.next_page_token;
    }
    None
}

#[tokio::test]
async fn paging_audit_events_by_key_or_principal_terminates_at_the_records_that_existed() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "paged").await;
    for _ in 0..3 {
        encrypt(&server, &key, b"p", &[]).await;
    }

    // By key: each listing call is itself recorded under the key it filters by.
    let by_key = AuditFilter {
        key_id: Some(key.clone()),
        ..AuditFilter::default()
    };
    let existing = sequences_matching(&server, &by_key);
    assert_eq!(existing.len(), 4, "CreateKey and three Encrypts");
    let listed = page_audit_one_by_one(
        &server,
        pb::ListAuditEventsRequest {
            key_id: key.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("paging by key did not terminate");
    assert_eq!(listed, existing);
    // The listing calls were recorded (after the records they listed).
    assert!(sequences_matching(&server, &by_key).len() > existing.len());

    // By principal: every call is recorded under the caller's principal.
    let by_principal = AuditFilter {
        principal: Some("anonymous".to_owned()),
        ..AuditFilter::default()
    };
    let existing = sequences_matching(&server, &by_principal);
    // CreateKey, three Encrypts and the listing calls by key above.
    assert!(existing.len() > 6, "{existing:?}");
    let listed = page_audit_one_by_one(
        &server,
        pb::ListAuditEventsRequest {
            principal: "anonymous".to_owned(),
            ..Default::default()
        },
    )
    .await
    .expect("paging by principal did not terminate");
    assert_eq!(listed, existing);
}

#[tokio::test]
async fn audit_events_by_sequence_range() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "range").await; // 1
    for _ in 0..6 {
        encrypt(&server, &key, b"p", &[]).await; // 2..=7
    }
    let mut audit = server.audit();
    let list = |from_sequence, to_sequence, page_size| pb::ListAuditEventsRequest {
        from_sequence,
        to_sequence,
        page_size,
        ..Default::default()
    };
    let reply = audit
        .list_audit_events(list(3, 5, 0))
        .await
        .expect("range")
        .into_inner();
    let seqs: Vec<u64> = reply.events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert!(reply.next_page_token.is_empty());

    // Paged, open-ended: from 6 to the end of the log as of the first page.
    let mut seqs = Vec::new();
    let mut token = String::new();
    for _ in 0..PAGE_CAP {
        let reply = audit
            .list_audit_events(pb::ListAuditEventsRequest {
                page_token: token.clone(),
                ..list(6, 0, 1)
            })
            .await
            .expect("range page")
            .into_inner();
        seqs.extend(reply.events.iter().map(|e| e.sequence));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
    }
    // 6, 7 and the first range call (8) existed at the first page; the
    // paging calls themselves (9, ...) come after it.
    assert_eq!(seqs, vec![6, 7, 8]);

    // A range beyond the end is empty, not an error; an inverted one is refused.
    let reply = audit
        .list_audit_events(list(1_000, 0, 0))
        .await
        .expect("beyond the end")
        .into_inner();
    assert!(reply.events.is_empty());
    let refused = audit
        .list_audit_events(list(5, 4, 0))
        .await
        .expect_err("inverted range");
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn page_tokens_are_opaque_and_checked() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "tokens").await;
    for _ in 0..3 {
        encrypt(&server, &key, b"p", &[]).await;
    }
    let mut audit = server.audit();
    let mut keys = server.keys();
    let first = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("first page")
        .into_inner();
    let audit_token = first.next_page_token;
    assert!(!audit_token.is_empty());
    // Not a bare sequence number any more.
    assert!(audit_token.parse::<u64>().is_err(), "{audit_token}");

    let refused = |result: Result<tonic::Response<_>, tonic::Status>| match result {
        Ok(_) => panic!("a bad page token was accepted"),
        Err(status) => status.code(),
    };
    for bad in ["3", "garbage", "v1!", &audit_token[..audit_token.len() - 2]] {
        let code = refused(
            audit
                .list_audit_events(pb::ListAuditEventsRequest {
                    page_token: bad.to_owned(),
                    ..Default::default()
                })
                .await
                .map(|r| r.map(|_| ())),
        );
        assert_eq!(code, Code::InvalidArgument, "{bad}");
    }
    // The same token with other filters: refused, not silently reinterpreted.
    let code = refused(
        audit
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: audit_token.clone(),
                key_id: key.clone(),
                ..Default::default()
            })
            .await
            .map(|r| r.map(|_| ())),
    );
    assert_eq!(code, Code::InvalidArgument);
    // A ListKeys token is bound to include_deleted: a listing of live keys
    // cannot be continued as a listing of tombstones, or the reverse.
    create_key(&server, "tokens-2").await;
    for include_deleted in [false, true] {
        let first = keys
            .list_keys(pb::ListKeysRequest {
                page_size: 1,
                include_deleted,
                ..Default::default()
            })
            .await
            .expect("first ListKeys page")
            .into_inner();
        assert!(!first.next_page_token.is_empty());
        let code = refused(
            keys.list_keys(pb::ListKeysRequest {
                page_size: 1,
                page_token: first.next_page_token,
                include_deleted: !include_deleted,
            })
            .await
            .map(|r| r.map(|_| ())),
        );
        assert_eq!(
            code,
            Code::InvalidArgument,
            "include_deleted {include_deleted}"
        );
    }
    // A token of one listing is refused by another.
    let code = refused(
        keys.list_keys(pb::ListKeysRequest {
            page_size: 1,
            page_token: audit_token.clone(),
            ..Default::default()
        })
        .await
        .map(|r| r.map(|_| ())),
    );
    assert_eq!(code, Code::InvalidArgument);
    let code = refused(
        keys.list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.clone(),
            page_size: 1,
            page_token: audit_token.clone(),
        })
        .await
        .map(|r| r.map(|_| ())),
    );
    assert_eq!(code, Code::InvalidArgument);
}

#[tokio::test]
async fn catalogue_listings_do_not_grow_while_they_are_paged() {
    let env = TestEnv::new();
    let server = env.start().await;
    let mut keys = server.keys();

    // ListKeys: keys created after the first page are not listed.
    let mut existing = Vec::new();
    for i in 0..3 {
        existing.push(create_key(&server, &format!("k{i}")).await);
    }
    existing.sort();
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut created = 0;
    for _ in 0..PAGE_CAP {
        let reply = keys
            .list_keys(pb::ListKeysRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list keys")
            .into_inner();
        listed.extend(reply.keys.into_iter().map(|k| k.key_id));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
        // Two new keys per page: one of them likely sorts after the cursor.
        create_key(&server, "late").await;
        create_key(&server, "late").await;
        created += 2;
    }
    assert!(created > 0);
    assert_eq!(listed, existing);

    // ListKeyVersions: versions made by rotations after the first page are not listed.
    let key = existing[0].clone();
    for _ in 0..2 {
        keys.rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate");
    }
    let mut versions = Vec::new();
    let mut token = String::new();
    for _ in 0..PAGE_CAP {
        let reply = keys
            .list_key_versions(pb::ListKeyVersionsRequest {
                key_id: key.clone(),
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .expect("list versions")
            .into_inner();
        versions.extend(reply.versions.iter().map(|v| v.version));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
        keys.rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate while paging");
    }
    assert_eq!(versions, vec![1, 2, 3]);

    // ListAliases: aliases carry no creation time, so the bound is the last
    // name that existed at the first page: aliases named beyond it are not
    // listed, and the listing terminates however many are created.
    for name in ["alias/b", "alias/d"] {
        keys.create_alias(pb::CreateAliasRequest {
            alias_name: name.to_owned(),
            target_key_id: key.clone(),
        })
        .await
        .expect("create alias");
    }
    let mut aliases = Vec::new();
    let mut token = String::new();
    for page in 0..PAGE_CAP {
        let reply = keys
            .list_aliases(pb::ListAliasesRequest {
                key_id: key.clone(),
                page_size: 1,
                page_token: token.clone(),
            })
            .await
            .expect("list aliases")
            .into_inner();
        aliases.extend(reply.aliases.into_iter().map(|a| a.alias_name));
        if reply.next_page_token.is_empty() {
            break;
        }
        token = reply.next_page_token;
        keys.create_alias(pb::CreateAliasRequest {
            alias_name: format!("alias/z{page:03}"),
            target_key_id: key.clone(),
        })
        .await
        .expect("create alias while paging");
    }
    assert_eq!(aliases, vec!["alias/b".to_owned(), "alias/d".to_owned()]);
    // A key without aliases (its neighbours in the index have some): empty.
    let reply = keys
        .list_aliases(pb::ListAliasesRequest {
            key_id: existing[1].clone(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("list aliases of a key without any")
        .into_inner();
    assert!(reply.aliases.is_empty(), "{:?}", reply.aliases);
    assert!(reply.next_page_token.is_empty());
}

/// An audit token whose bound was pushed past the log's end (so that paging
/// would follow the log forever) and an oversized token are refused.
/// Before: the forged bound kept paging through events written after the
/// first page.
#[tokio::test]
async fn forged_or_oversized_audit_page_tokens_are_refused() {
    use base64::Engine as _;
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "forged").await;
    for _ in 0..3 {
        encrypt(&server, &key, b"x", &[]).await;
    }
    let mut audit = server.audit();
    let first = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("first page")
        .into_inner();
    let token = first.next_page_token;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut bytes = b64
        .decode(token.strip_prefix("v1.").expect("v1 token"))
        .expect("base64");
    // listing (1) ‖ scope (8) ‖ after (8) ‖ until (8): raise the bound.
    assert_eq!(bytes.len(), 25, "token layout changed");
    bytes[17..25].copy_from_slice(&(1u64 << 62).to_be_bytes());
    let forged = format!("v1.{}", b64.encode(&bytes));
    for bad in [forged, format!("v1.{}", "A".repeat(100_000))] {
        let status = audit
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1,
                page_token: bad,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .contains("not a token from a previous page"),
            "{status:?}"
        );
    }
    server.stop().await;
}
