//! The key catalogue: round trips, two-phase versions, aliases, pagination,
//! read-modify-write, tombstones, counters, format version.

use std::collections::BTreeMap;

use kms_storage::{
    Alias, KekHandle, KeyId, KeyOrigin, KeySpec, KeyState, NewKey, RotationPolicy, Storage,
    StorageError, StorageOptions, VersionState, schema,
};

use crate::{open, raw_db};

fn kid(n: u8) -> KeyId {
    KeyId::from_random([n; 16])
}

fn kek(id: &KeyId, v: u32) -> KekHandle {
    KekHandle::HsmObject {
        object_id: format!("{id}/{v}").into_bytes(),
    }
}

fn new_key(id: &KeyId, aliases: &[&str]) -> NewKey {
    NewKey {
        id: id.clone(),
        description: format!("key {id}"),
        tags: BTreeMap::from([("team".to_owned(), "payments".to_owned())]),
        spec: KeySpec::Aes256Gcm,
        state: KeyState::Enabled,
        rotation: RotationPolicy::Every {
            period_secs: 86_400,
        },
        next_rotation_at_ms: Some(5_000),
        aliases: aliases.iter().map(|a| Alias::parse(a).unwrap()).collect(),
    }
}

fn create(s: &Storage, n: u8, aliases: &[&str]) -> KeyId {
    let id = kid(n);
    s.catalogue()
        .create_key(new_key(&id, aliases), kek(&id, 1), 1_000)
        .unwrap();
    s.catalogue().commit_version(&id, 1, 1_001).unwrap();
    id
}

#[test]
fn create_commit_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = kid(1);
    {
        let s = open(dir.path());
        let c = s.catalogue();
        let (key, ver) = c
            .create_key(new_key(&id, &["alias/app"]), kek(&id, 1), 1_000)
            .unwrap();
        assert_eq!(key.primary_version, None);
        assert_eq!(ver.state, VersionState::Pending);
        assert_eq!(c.get_key(&id).unwrap().unwrap(), key);
        let pending = c.list_pending_versions().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].kek, kek(&id, 1));

        let (key, ver) = c.commit_version(&id, 1, 2_000).unwrap();
        assert_eq!(key.primary_version, Some(1));
        assert_eq!(key.updated_at_ms, 2_000);
        assert_eq!(ver.state, VersionState::Enabled);
        assert!(c.list_pending_versions().unwrap().is_empty());
        // Committing twice is refused.
        assert!(matches!(
            c.commit_version(&id, 1, 2_001),
            Err(StorageError::VersionNotPending { version: 1, .. })
        ));
    }
    // Everything survives a close and reopen.
    let s = open(dir.path());
    let c = s.catalogue();
    let key = c.get_key(&id).unwrap().unwrap();
    assert_eq!(key.primary_version, Some(1));
    assert_eq!(key.tags["team"], "payments");
    assert_eq!(
        key.rotation,
        RotationPolicy::Every {
            period_secs: 86_400
        }
    );
    assert_eq!(key.next_rotation_at_ms, Some(5_000));
    assert_eq!(key.created_at_ms, 1_000);
    assert_eq!(c.resolve_key("alias/app").unwrap().unwrap().id, id);
    assert_eq!(c.resolve_key(id.as_str()).unwrap().unwrap().id, id);
    assert!(c.resolve_key("alias/nope").unwrap().is_none());
    assert!(matches!(
        c.resolve_key("nonsense"),
        Err(StorageError::InvalidKeyId { .. })
    ));
    let v = c.get_version(&id, 1).unwrap().unwrap();
    assert_eq!(v.state, VersionState::Enabled);
    assert_eq!(v.kek, kek(&id, 1));
    // Ids are never reused.
    assert!(matches!(
        c.create_key(new_key(&id, &[]), kek(&id, 1), 3_000),
        Err(StorageError::KeyExists { .. })
    ));
}

#[test]
fn versions_two_phase_rotate_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = create(&s, 2, &[]);

    let v2 = c.add_pending_version(&id, 3_000, |v| kek(&id, v)).unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.kek, kek(&id, 2));
    // The primary does not move until commit.
    assert_eq!(c.get_key(&id).unwrap().unwrap().primary_version, Some(1));
    let pending: Vec<u32> = c
        .list_pending_versions()
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(pending, vec![2]);

    let discarded = c.discard_version(&id, 2, 3_100).unwrap();
    assert_eq!(
        discarded.state,
        VersionState::Destroyed {
            destroyed_at_ms: 3_100
        }
    );
    assert!(c.list_pending_versions().unwrap().is_empty());
    // A discarded number is never reused.
    let v3 = c.add_pending_version(&id, 3_200, |v| kek(&id, v)).unwrap();
    assert_eq!(v3.version, 3);
    let (key, _) = c.commit_version(&id, 3, 3_300).unwrap();
    assert_eq!(key.primary_version, Some(3));
    assert_eq!(key.latest_version, 3);

    let versions: Vec<(u32, VersionState)> = c
        .list_versions(&id)
        .unwrap()
        .iter()
        .map(|v| (v.version, v.state))
        .collect();
    assert_eq!(
        versions,
        vec![
            (1, VersionState::Enabled),
            (
                2,
                VersionState::Destroyed {
                    destroyed_at_ms: 3_100
                }
            ),
            (3, VersionState::Enabled)
        ]
    );
    // Another key's versions do not leak into this listing.
    let other = create(&s, 3, &[]);
    assert_eq!(c.list_versions(&other).unwrap().len(), 1);
    assert!(matches!(
        c.discard_version(&id, 9, 1),
        Err(StorageError::VersionNotFound { version: 9, .. })
    ));
}

#[test]
fn version_state_transitions() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = create(&s, 4, &[]);
    // Version 1 must stop being the primary before it can leave Enabled.
    c.add_pending_version(&id, 9, |v| kek(&id, v)).unwrap();
    c.commit_version(&id, 2, 9).unwrap();
    let v = c
        .set_version_state(&id, 1, VersionState::Disabled, 10)
        .unwrap();
    assert_eq!(v.state, VersionState::Disabled);
    assert_eq!(
        c.get_version(&id, 1).unwrap().unwrap().state,
        VersionState::Disabled
    );
    // Nothing becomes pending again; pending versions move only by commit/discard.
    assert!(matches!(
        c.set_version_state(&id, 1, VersionState::Pending, 11),
        Err(StorageError::InvalidVersionTransition { .. })
    ));
    c.add_pending_version(&id, 12, |v| kek(&id, v)).unwrap();
    assert!(matches!(
        c.set_version_state(&id, 3, VersionState::Enabled, 13),
        Err(StorageError::InvalidVersionTransition { .. })
    ));
    // Destroyed is final.
    c.set_version_state(
        &id,
        1,
        VersionState::Destroyed {
            destroyed_at_ms: 14,
        },
        14,
    )
    .unwrap();
    assert!(matches!(
        c.set_version_state(&id, 1, VersionState::Enabled, 15),
        Err(StorageError::InvalidVersionTransition { .. })
    ));
    // The KEK handle is fixed.
    let r = c.update_version(&id, 3, 16, |v| {
        v.kek = kek(&id, 7);
        Ok::<_, StorageError>(())
    });
    assert!(r.is_err());
}

#[test]
fn alias_uniqueness_and_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let a = create(&s, 10, &["alias/shared", "alias/a-only"]);
    // An alias can name only one key, whether given at creation or later.
    let b = kid(11);
    assert!(matches!(
        c.create_key(new_key(&b, &["alias/shared"]), kek(&b, 1), 1),
        Err(StorageError::AliasExists { .. })
    ));
    // ... and the failed creation left nothing behind.
    assert!(c.get_key(&b).unwrap().is_none());
    let b = create(&s, 11, &["alias/b"]);
    let shared = Alias::parse("alias/shared").unwrap();
    assert!(matches!(
        c.create_alias(&shared, &b),
        Err(StorageError::AliasExists { .. })
    ));
    assert!(matches!(
        c.create_alias(&Alias::parse("alias/ghost").unwrap(), &kid(99)),
        Err(StorageError::KeyNotFound { .. })
    ));

    // Repoint, then the per-key listings follow.
    c.update_alias(&shared, &b).unwrap();
    assert_eq!(c.get_alias(&shared).unwrap(), Some(b.clone()));
    let of_a: Vec<String> = c
        .list_aliases(Some(&a), None, 100)
        .unwrap()
        .items
        .iter()
        .map(|e| e.alias.to_string())
        .collect();
    assert_eq!(of_a, vec!["alias/a-only"]);
    let of_b: Vec<String> = c
        .list_aliases(Some(&b), None, 100)
        .unwrap()
        .items
        .iter()
        .map(|e| e.alias.to_string())
        .collect();
    assert_eq!(of_b, vec!["alias/b", "alias/shared"]);

    c.delete_alias(&shared).unwrap();
    assert!(c.get_alias(&shared).unwrap().is_none());
    assert!(matches!(
        c.delete_alias(&shared),
        Err(StorageError::AliasNotFound { .. })
    ));
    // Once deleted, the name is free again.
    c.create_alias(&shared, &a).unwrap();
    assert_eq!(c.resolve_key("alias/shared").unwrap().unwrap().id, a);
    let all: Vec<(String, KeyId)> = c
        .list_aliases(None, None, 100)
        .unwrap()
        .items
        .into_iter()
        .map(|e| (e.alias.to_string(), e.key_id))
        .collect();
    assert_eq!(
        all,
        vec![
            ("alias/a-only".to_owned(), a.clone()),
            ("alias/b".to_owned(), b.clone()),
            ("alias/shared".to_owned(), a.clone())
        ]
    );
}

#[test]
fn listings_are_paginated_and_ordered() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let mut ids: Vec<KeyId> = (0..25u8).rev().map(|n| create(&s, n, &[])).collect();
    ids.sort();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = c.list_keys(token.as_deref(), 10).unwrap();
        assert!(page.items.len() <= 10);
        pages += 1;
        seen.extend(page.items.into_iter().map(|k| k.id));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    // Exactly one full page: no empty trailing page is promised.
    let page = c.list_keys(None, 25).unwrap();
    assert_eq!(page.items.len(), 25);
    assert_eq!(page.next_page_token, None);

    for i in 0..7 {
        c.create_alias(&Alias::parse(&format!("alias/x{i}")).unwrap(), &ids[0])
            .unwrap();
    }
    let p1 = c.list_aliases(Some(&ids[0]), None, 3).unwrap();
    let p2 = c
        .list_aliases(Some(&ids[0]), p1.next_page_token.as_deref(), 3)
        .unwrap();
    let p3 = c
        .list_aliases(Some(&ids[0]), p2.next_page_token.as_deref(), 3)
        .unwrap();
    let names: Vec<String> = [p1.items, p2.items, p3.items.clone()]
        .concat()
        .iter()
        .map(|e| e.alias.to_string())
        .collect();
    assert_eq!(
        names,
        (0..7).map(|i| format!("alias/x{i}")).collect::<Vec<_>>()
    );
    assert_eq!(p3.items.len(), 1);
    assert_eq!(p3.next_page_token, None);
}

#[derive(Debug)]
enum AppError {
    Storage(StorageError),
    Refused,
}
impl From<StorageError> for AppError {
    fn from(e: StorageError) -> Self {
        AppError::Storage(e)
    }
}

#[test]
fn update_key_is_read_modify_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = create(&s, 20, &[]);
    let k = c
        .update_key(&id, 7_000, |k| {
            k.description = "new".into();
            k.state = KeyState::Disabled;
            Ok::<_, AppError>(())
        })
        .unwrap();
    assert_eq!(k.updated_at_ms, 7_000);
    assert_eq!(c.get_key(&id).unwrap().unwrap(), k);

    // A refusal from the closure writes nothing.
    let r = c.update_key(&id, 8_000, |k| {
        k.description = "lost".into();
        Err::<(), _>(AppError::Refused)
    });
    assert!(matches!(r, Err(AppError::Refused)));
    assert_eq!(c.get_key(&id).unwrap().unwrap().description, "new");

    // Fixed fields, and primaries that are not enabled versions, are refused.
    let r = c.update_key(&id, 8_000, |k| {
        k.id = kid(21);
        Ok::<_, AppError>(())
    });
    assert!(matches!(
        r,
        Err(AppError::Storage(StorageError::ImmutableField {
            field: "id"
        }))
    ));
    c.add_pending_version(&id, 8_100, |v| kek(&id, v)).unwrap();
    let r = c.update_key(&id, 8_200, |k| {
        k.primary_version = Some(2);
        Ok::<_, AppError>(())
    });
    assert!(matches!(
        r,
        Err(AppError::Storage(
            StorageError::InvalidVersionTransition { .. }
        ))
    ));

    // Concurrent read-modify-writes do not lose updates.
    std::thread::scope(|sc| {
        for t in 0..8 {
            let c = s.catalogue();
            let id = &id;
            sc.spawn(move || {
                for i in 0..20 {
                    c.update_key(id, 9_000, |k| {
                        k.tags.insert(format!("t{t}-{i}"), String::new());
                        Ok::<_, StorageError>(())
                    })
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(c.get_key(&id).unwrap().unwrap().tags.len(), 1 + 8 * 20);
}

#[test]
fn deleted_key_stays_as_a_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = create(&s, 30, &["alias/doomed"]);
    c.add_pending_version(&id, 2_000, |v| kek(&id, v)).unwrap();
    // Only a key pending deletion becomes a tombstone, and none can be
    // scheduled while a version is being created.
    c.discard_version(&id, 2, 2_100).unwrap();
    c.update_key(&id, 2_200, |k| {
        k.state = KeyState::PendingDeletion {
            delete_at_ms: 9_000,
        };
        Ok::<_, StorageError>(())
    })
    .unwrap();
    // A key whose first version is still pending (its creation failed) goes
    // at once, pending marker included.
    let unborn = kid(31);
    c.create_key(new_key(&unborn, &[]), kek(&unborn, 1), 2_300)
        .unwrap();
    c.finalize_key_deletion(&unborn, 2_400).unwrap();
    let k = c.finalize_key_deletion(&id, 9_000).unwrap();
    assert_eq!(
        k.state,
        KeyState::Deleted {
            deleted_at_ms: 9_000
        }
    );
    let k = c.get_key(&id).unwrap().unwrap();
    assert_eq!(
        k.state,
        KeyState::Deleted {
            deleted_at_ms: 9_000
        }
    );
    let states: Vec<VersionState> = c
        .list_versions(&id)
        .unwrap()
        .iter()
        .map(|v| v.state)
        .collect();
    assert_eq!(
        states,
        [
            VersionState::Destroyed {
                destroyed_at_ms: 9_000
            },
            // Discarded before the deletion was scheduled.
            VersionState::Destroyed {
                destroyed_at_ms: 2_100
            }
        ]
    );
    assert!(c.list_pending_versions().unwrap().is_empty());
    assert!(c.resolve_key("alias/doomed").unwrap().is_none());
    assert!(matches!(
        c.update_key(&id, 9_001, |_| Ok::<_, StorageError>(())),
        Err(StorageError::KeyDeleted { .. })
    ));
    assert!(matches!(
        c.create_alias(&Alias::parse("alias/again").unwrap(), &id),
        Err(StorageError::KeyDeleted { .. })
    ));
    assert!(matches!(
        c.create_key(new_key(&id, &[]), kek(&id, 1), 9_002),
        Err(StorageError::KeyExists { .. })
    ));
    // Tombstones are still listed.
    assert_eq!(c.list_keys(None, 10).unwrap().items.len(), 2);
}

#[test]
fn gcm_counter_never_goes_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions {
        gcm_reservation_block: 100,
        ..StorageOptions::default()
    };
    let id = kid(40);
    let before;
    {
        let s = Storage::open(dir.path(), &opts).unwrap();
        s.catalogue()
            .create_key(new_key(&id, &[]), kek(&id, 1), 1)
            .unwrap();
        s.catalogue().commit_version(&id, 1, 2).unwrap();
        let c = s.catalogue();
        assert_eq!(c.add_gcm_invocations(&id, 1, 10).unwrap(), 10);
        assert_eq!(c.add_gcm_invocations(&id, 1, 5).unwrap(), 15);
        // Concurrent counting loses nothing.
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..250 {
                        c.add_gcm_invocations(&id, 1, 1).unwrap();
                    }
                });
            }
        });
        before = c.get_version(&id, 1).unwrap().unwrap().gcm_invocations;
        assert_eq!(before, 1_015);
        assert!(matches!(
            c.add_gcm_invocations(&id, 7, 1),
            Err(StorageError::VersionNotFound { .. })
        ));
    }
    // After a restart the count resumes from the reservation: never below what was used.
    let s = Storage::open(dir.path(), &opts).unwrap();
    let c = s.catalogue();
    let after = c.get_version(&id, 1).unwrap().unwrap().gcm_invocations;
    assert!(after >= before, "{after} < {before}");
    assert!(after <= before + 100, "over-count bounded by one block");
    assert_eq!(c.add_gcm_invocations(&id, 1, 1).unwrap(), after + 1);
}

#[test]
fn newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    {
        let mut db = raw_db(dir.path());
        db.put(
            schema::META_FORMAT_VERSION,
            (schema::FORMAT_VERSION + 1).to_be_bytes(),
        )
        .unwrap();
        // A newer format may also have column families we do not know.
        db.create_cf("from_the_future", &rocksdb::Options::default())
            .unwrap();
    }
    let err = Storage::open(dir.path(), &StorageOptions::default()).unwrap_err();
    assert!(
        matches!(err, StorageError::FormatTooNew { found, supported }
            if found == schema::FORMAT_VERSION + 1 && supported == schema::FORMAT_VERSION),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer"));
}

#[test]
fn missing_database_is_not_created_when_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions {
        create_if_missing: false,
        ..StorageOptions::default()
    };
    assert!(Storage::open(&dir.path().join("nope"), &opts).is_err());
}

#[test]
fn key_policies_survive_a_reopen_and_old_records_have_none() {
    use kms_storage::{Grant, KeyPolicy, Permission};
    let dir = tempfile::tempdir().unwrap();
    let policy = KeyPolicy {
        grants: vec![Grant {
            principal: "spiffe://example.org/billing/*".into(),
            permissions: [Permission::Encrypt, Permission::Describe].into(),
            required_context: BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]),
        }],
    };
    let id = {
        let s = open(dir.path());
        let id = create(&s, 30, &[]);
        // A key created without a policy uses the service default (None).
        assert_eq!(s.catalogue().get_key(&id).unwrap().unwrap().policy, None);
        s.catalogue()
            .update_key(&id, 9_000, |k| {
                k.policy = Some(policy.clone());
                Ok::<_, AppError>(())
            })
            .unwrap();
        id
    };
    let s = open(dir.path());
    assert_eq!(
        s.catalogue().get_key(&id).unwrap().unwrap().policy,
        Some(policy)
    );
    // Permission names are the documented kebab-case ones.
    for p in Permission::ALL {
        assert_eq!(Permission::parse(p.as_str()), Some(p));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            format!("\"{}\"", p.as_str())
        );
    }
}

#[test]
fn cached_records_never_outlive_a_committed_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = create(&s, 30, &[]);
    // Version 2 is the primary, so version 1 may toggle (the primary stays enabled).
    c.add_pending_version(&id, 1_002, |v| kek(&id, v)).unwrap();
    c.commit_version(&id, 2, 1_003).unwrap();
    let set_description = |n: u64| {
        c.update_key(&id, 10_000 + n, |k| {
            k.description = n.to_string();
            Ok::<_, StorageError>(())
        })
        .unwrap();
    };
    set_description(0);
    // The last update that has returned; a read that starts after it must see it.
    let committed = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    let floor = committed.load(Ordering::Acquire);
                    let seen: u64 = c
                        .get_key(&id)
                        .unwrap()
                        .unwrap()
                        .description
                        .parse()
                        .unwrap();
                    assert!(seen >= floor, "read {seen} after {floor} was committed");
                    c.get_version(&id, 1).unwrap().unwrap();
                }
            });
        }
        for n in 1..=200u64 {
            set_description(n);
            committed.store(n, Ordering::Release);
            assert_eq!(c.get_key(&id).unwrap().unwrap().description, n.to_string());
            let state = if n % 2 == 0 {
                VersionState::Enabled
            } else {
                VersionState::Disabled
            };
            c.set_version_state(&id, 1, state, 20_000 + n).unwrap();
            assert_eq!(c.get_version(&id, 1).unwrap().unwrap().state, state);
        }
        done.store(true, Ordering::Release);
    });
    // The GCM count is never served from the cache.
    c.get_version(&id, 1).unwrap();
    c.add_gcm_invocations(&id, 1, 5).unwrap();
    assert_eq!(c.get_version(&id, 1).unwrap().unwrap().gcm_invocations, 5);
}

/// The two wrapped service keys (issue 14) are separate meta records: the
/// first stored of each wins, and storing one never touches the other.
#[test]
fn service_key_records_are_separate_and_the_first_writer_wins() {
    use kms_storage::WrappedServiceKey;
    let dir = tempfile::tempdir().unwrap();
    let record = |epoch: u32, fill: u8| WrappedServiceKey {
        root_epoch: epoch,
        mechanism: 0x2109,
        blob: vec![fill; 40],
    };
    {
        let s = Storage::open(dir.path(), &StorageOptions::default()).unwrap();
        let c = s.catalogue();
        assert_eq!(c.checkpoint_key().unwrap(), None);
        assert_eq!(
            c.init_checkpoint_key(record(1, 0xc1)).unwrap(),
            record(1, 0xc1)
        );
        assert_eq!(c.integrity_key().unwrap(), None);
        assert_eq!(
            c.init_integrity_key(record(1, 0x11)).unwrap(),
            record(1, 0x11)
        );
        // A second writer gets the stored record back, unchanged.
        assert_eq!(
            c.init_checkpoint_key(record(2, 0xc2)).unwrap(),
            record(1, 0xc1)
        );
        assert_eq!(
            c.init_integrity_key(record(2, 0x12)).unwrap(),
            record(1, 0x11)
        );
    }
    let s = Storage::open(dir.path(), &StorageOptions::default()).unwrap();
    assert_eq!(
        s.catalogue().checkpoint_key().unwrap(),
        Some(record(1, 0xc1))
    );
    assert_eq!(
        s.catalogue().integrity_key().unwrap(),
        Some(record(1, 0x11))
    );
}

/// Bring your own key: a key of origin EXTERNAL starts with no version,
/// takes imported versions only (never generated ones), each enabled and
/// primary in one write, and all of it survives a reopen.
#[test]
fn external_keys_start_without_a_version_and_take_imported_versions_only() {
    let dir = tempfile::tempdir().unwrap();
    let id = kid(40);
    {
        let s = open(dir.path());
        let c = s.catalogue();
        let key = c
            .create_key_pending_import(new_key(&id, &["alias/byok"]), 1_000)
            .unwrap();
        assert_eq!(key.origin, KeyOrigin::External);
        assert_eq!((key.primary_version, key.latest_version), (None, 0));
        assert!(c.list_versions(&id).unwrap().is_empty());
        assert_eq!(c.resolve_key("alias/byok").unwrap().unwrap(), key);
        // Generated versions (rotation) are refused, both ways.
        assert!(matches!(
            c.add_enabled_version::<StorageError>(&id, 1_001, |v| Ok(kek(&id, v))),
            Err(StorageError::OriginMismatch { .. })
        ));
        assert!(matches!(
            c.add_pending_version(&id, 1_001, |v| kek(&id, v)),
            Err(StorageError::OriginMismatch { .. })
        ));
        let (key, v1) = c
            .add_enabled_version_of::<StorageError>(&id, KeyOrigin::External, 1_002, |v| {
                Ok(kek(&id, v))
            })
            .unwrap();
        assert_eq!((v1.version, v1.origin), (1, KeyOrigin::External));
        assert_eq!(v1.state, VersionState::Enabled);
        assert_eq!((key.primary_version, key.latest_version), (Some(1), 1));
        let (key, v2) = c
            .add_enabled_version_of::<StorageError>(&id, KeyOrigin::External, 1_003, |v| {
                Ok(kek(&id, v))
            })
            .unwrap();
        assert_eq!((v2.version, key.primary_version), (2, Some(2)));
        // And a generated key takes no imported version.
        let other = create(&s, 41, &[]);
        assert!(matches!(
            c.add_enabled_version_of::<StorageError>(&other, KeyOrigin::External, 1_004, |v| {
                Ok(kek(&other, v))
            }),
            Err(StorageError::OriginMismatch { .. })
        ));
        assert!(matches!(
            c.create_key_pending_import(new_key(&id, &[]), 1_005),
            Err(StorageError::KeyExists { .. })
        ));
    }
    let s = open(dir.path());
    let c = s.catalogue();
    let key = c.get_key(&id).unwrap().unwrap();
    assert_eq!(key.origin, KeyOrigin::External);
    let versions = c.list_versions(&id).unwrap();
    assert_eq!(versions.len(), 2);
    assert!(versions.iter().all(|v| v.origin == KeyOrigin::External));
}

/// Use records (issue 18) in the RocksDB engine: a key's rows come back by
/// key (another key's do not), a put replaces the node's value, the
/// watermark is per node, and all of it survives a reopen.
#[test]
fn usage_records_round_trip_by_key_and_survive_reopen() {
    use kms_storage::UsageRecord;
    let dir = tempfile::tempdir().unwrap();
    let record = |n: u64| UsageRecord {
        encrypt_count: n,
        decrypt_count: 0,
        last_encrypt_ms: Some(n),
        last_decrypt_ms: None,
        through_seq: n,
    };
    let (a, b) = (kid(1), kid(2));
    {
        let s = open(dir.path());
        let e = s.catalogue().engine();
        assert_eq!(e.usage_watermark("").unwrap(), 0);
        assert!(e.usage_rows(a.as_str()).unwrap().is_empty());
        e.usage_put(
            "",
            &[
                (a.as_str().to_owned(), 1, record(1).encode().unwrap()),
                (a.as_str().to_owned(), 2, record(2).encode().unwrap()),
                (b.as_str().to_owned(), 1, record(3).encode().unwrap()),
            ],
            10,
        )
        .unwrap();
        e.usage_put(
            "",
            &[(a.as_str().to_owned(), 1, record(5).encode().unwrap())],
            11,
        )
        .unwrap();
    }
    let s = open(dir.path());
    let e = s.catalogue().engine();
    let mut rows: Vec<(String, u32, UsageRecord)> = e
        .usage_rows(a.as_str())
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.node,
                r.version,
                UsageRecord::decode(b"k", &r.value).unwrap(),
            )
        })
        .collect();
    rows.sort_by_key(|r| r.1);
    assert_eq!(
        rows,
        vec![(String::new(), 1, record(5)), (String::new(), 2, record(2))]
    );
    assert_eq!(e.usage_rows(b.as_str()).unwrap().len(), 1);
    assert_eq!(e.usage_watermark("").unwrap(), 11);
    assert_eq!(e.usage_watermark("other-node").unwrap(), 0);
}
