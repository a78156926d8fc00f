//! Root rotation's catalogue writes (issue 14 item 5): the compare-and-set
//! that puts a re-wrapped version record (or service key) in place of the
//! one that was read never overwrites a record changed in between, never
//! re-wraps a destroyed version, and the scans see every version.

use std::collections::BTreeMap;

use kms_storage::{
    KekHandle, KeyId, KeySpec, KeyState, NewKey, RotationPolicy, Storage, StorageError, Swap,
    VersionState, WrappedServiceKey, schema,
};

use crate::open;

fn kid(n: u8) -> KeyId {
    KeyId::from_random([n; 16])
}

/// A wrapped handle under `epoch`; `seed` makes blob and MAC distinct.
fn wrapped(epoch: u32, seed: u8) -> KekHandle {
    KekHandle::Wrapped {
        root_epoch: epoch,
        mechanism: 0x2109,
        blob: vec![seed; 40],
        mac: [seed ^ 0x5a; 32],
    }
}

fn new_key(id: &KeyId) -> NewKey {
    NewKey {
        id: id.clone(),
        description: String::new(),
        tags: BTreeMap::new(),
        spec: KeySpec::Aes256Gcm,
        state: KeyState::Enabled,
        rotation: RotationPolicy::Manual,
        next_rotation_at_ms: None,
        aliases: Vec::new(),
    }
}

/// A key with `versions` wrapped versions under epoch 1 (version 2 primary
/// when there are two or more).
fn key_with_versions(s: &Storage, n: u8, versions: u32) -> KeyId {
    let id = kid(n);
    let c = s.catalogue();
    c.create_key_enabled(new_key(&id), wrapped(1, n), 1_000)
        .unwrap();
    for v in 2..=versions {
        c.add_enabled_version::<StorageError>(&id, 1_000 + u64::from(v), |v| {
            Ok(wrapped(1, n.wrapping_add(u8::try_from(v).unwrap())))
        })
        .unwrap();
    }
    id
}

#[test]
fn a_version_changed_between_read_and_write_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 1, 2);
    // The job reads version 1 ...
    let read = c.get_version(&id, 1).unwrap().unwrap();
    // ... an administrator disables it meanwhile ...
    c.set_version_state(&id, 1, VersionState::Disabled, 5_000)
        .unwrap();
    // ... and the job's write, against what it read, writes nothing.
    let swap = c.replace_version_kek(&read, wrapped(2, 0xee)).unwrap();
    let Swap::Changed(Some(current)) = swap else {
        panic!("expected a conflict, got {swap:?}");
    };
    assert_eq!(current.state, VersionState::Disabled);
    assert_eq!(current.kek, read.kek);
    let stored = c.get_version(&id, 1).unwrap().unwrap();
    assert_eq!(stored.state, VersionState::Disabled);
    assert_eq!(stored.kek, read.kek, "the stale write must not land");

    // Against the record read again, it lands, and keeps the new state.
    let swap = c.replace_version_kek(&current, wrapped(2, 0xee)).unwrap();
    let Swap::Replaced(new) = swap else {
        panic!("expected the write, got {swap:?}");
    };
    let stored = c.get_version(&id, 1).unwrap().unwrap();
    assert_eq!(stored, new);
    assert_eq!(stored.state, VersionState::Disabled);
    assert_eq!(stored.kek, wrapped(2, 0xee));
    assert_eq!(stored.updated_at_ms, current.updated_at_ms);
    assert_eq!(stored.created_at_ms, read.created_at_ms);

    // A second write against the now stale record is refused too (the
    // record was re-wrapped in between: e.g. by another pass).
    let swap = c.replace_version_kek(&current, wrapped(3, 0xdd)).unwrap();
    assert!(matches!(swap, Swap::Changed(Some(_))), "{swap:?}");
    assert_eq!(
        c.get_version(&id, 1).unwrap().unwrap().kek,
        wrapped(2, 0xee)
    );
}

#[test]
fn encryptions_counted_meanwhile_are_not_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 2, 1);
    let read = c.get_version(&id, 1).unwrap().unwrap();
    c.add_gcm_invocations(&id, 1, 7).unwrap();
    let swap = c.replace_version_kek(&read, wrapped(2, 0x11)).unwrap();
    assert!(matches!(swap, Swap::Replaced(_)), "{swap:?}");
    let stored = c.get_version(&id, 1).unwrap().unwrap();
    assert_eq!(stored.kek, wrapped(2, 0x11));
    assert!(stored.gcm_invocations >= 7);
}

#[test]
fn destroyed_and_token_object_versions_are_never_rewrapped() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 3, 2);
    c.set_version_state(
        &id,
        1,
        VersionState::Destroyed {
            destroyed_at_ms: 9_000,
        },
        9_000,
    )
    .unwrap();
    let destroyed = c.get_version(&id, 1).unwrap().unwrap();
    let error = c
        .replace_version_kek(&destroyed, wrapped(2, 0x22))
        .unwrap_err();
    assert!(
        matches!(
            error,
            StorageError::InvalidVersionTransition { version: 1, .. }
        ),
        "{error:?}"
    );
    assert_eq!(c.get_version(&id, 1).unwrap().unwrap().kek, destroyed.kek);

    // A token-object version is not turned into a blob, nor a blob into one.
    let legacy = kid(4);
    c.create_key(
        new_key(&legacy),
        KekHandle::HsmObject {
            object_id: b"legacy/1".to_vec(),
        },
        1_000,
    )
    .unwrap();
    c.commit_version(&legacy, 1, 1_001).unwrap();
    let record = c.get_version(&legacy, 1).unwrap().unwrap();
    let error = c
        .replace_version_kek(&record, wrapped(2, 0x33))
        .unwrap_err();
    assert!(
        matches!(error, StorageError::ImmutableField { field: "kek" }),
        "{error:?}"
    );
    let live = c.get_version(&id, 2).unwrap().unwrap();
    let error = c
        .replace_version_kek(
            &live,
            KekHandle::HsmObject {
                object_id: b"x".to_vec(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(error, StorageError::ImmutableField { field: "kek" }),
        "{error:?}"
    );
}

#[test]
fn scans_see_every_version_and_count_wrapped_ones_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let mut ids = Vec::new();
    for n in 10..15 {
        ids.push(key_with_versions(&s, n, 3));
    }
    // Pages of 4 over 15 versions: every version once, in order.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = c.scan_versions(cursor.as_ref(), 4).unwrap();
        assert!(page.items.len() <= 4);
        seen.extend(page.items.iter().map(|v| (v.key_id.clone(), v.version)));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<(KeyId, u32)> = ids
        .iter()
        .flat_map(|id| (1..=3).map(move |v| (id.clone(), v)))
        .collect();
    expected.sort();
    assert_eq!(seen, expected);

    let counts = c.wrapped_versions_per_epoch().unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[&1].live_versions, 15);
    // One re-wrapped, one destroyed: the counts follow.
    let first = c.get_version(&ids[0], 1).unwrap().unwrap();
    assert!(matches!(
        c.replace_version_kek(&first, wrapped(2, 0x44)).unwrap(),
        Swap::Replaced(_)
    ));
    c.set_version_state(
        &ids[1],
        1,
        VersionState::Destroyed {
            destroyed_at_ms: 9_000,
        },
        9_000,
    )
    .unwrap();
    let counts = c.wrapped_versions_per_epoch().unwrap();
    assert_eq!(counts[&1].live_versions, 13);
    assert_eq!(counts[&1].destroyed_versions, 1);
    assert_eq!(counts[&2].live_versions, 1);
}

#[test]
fn a_service_key_changed_between_read_and_write_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let first = WrappedServiceKey {
        root_epoch: 1,
        mechanism: 0x2109,
        blob: vec![1; 40],
    };
    c.init_integrity_key(first.clone()).unwrap();
    assert_eq!(
        c.service_key(schema::META_INTEGRITY_KEY).unwrap(),
        Some(first.clone())
    );
    let second = WrappedServiceKey {
        root_epoch: 2,
        blob: vec![2; 40],
        ..first.clone()
    };
    let swap = c
        .replace_service_key(schema::META_INTEGRITY_KEY, &first, second.clone())
        .unwrap();
    assert_eq!(swap, Swap::Replaced(second.clone()));
    // A writer that still holds `first` writes nothing.
    let third = WrappedServiceKey {
        root_epoch: 3,
        blob: vec![3; 40],
        ..first.clone()
    };
    let swap = c
        .replace_service_key(schema::META_INTEGRITY_KEY, &first, third)
        .unwrap();
    assert_eq!(swap, Swap::Changed(Some(second.clone())));
    assert_eq!(c.integrity_key().unwrap(), Some(second));
}

#[test]
fn the_active_root_record_is_a_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    assert_eq!(c.active_root().unwrap(), None);
    assert_eq!(c.set_active_root(None, 1).unwrap(), Swap::Replaced(1));
    assert_eq!(c.active_root().unwrap(), Some(1));
    // A proposer that read nothing (or an older epoch) writes nothing.
    assert_eq!(c.set_active_root(None, 3).unwrap(), Swap::Changed(Some(1)));
    assert_eq!(
        c.set_active_root(Some(2), 3).unwrap(),
        Swap::Changed(Some(1))
    );
    assert_eq!(c.set_active_root(Some(1), 2).unwrap(), Swap::Replaced(2));
    assert_eq!(c.active_root().unwrap(), Some(2));
}
