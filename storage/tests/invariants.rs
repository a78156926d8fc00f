//! The catalogue's lifecycle invariants, refused at the storage layer
//! whoever asks (issue 13, item 1): the primary version is always enabled;
//! a key pending deletion gets no new version and no primary change (and a
//! key with a version being created cannot become pending deletion); version
//! numbers are never reused. Each refusal writes nothing.

use std::collections::BTreeMap;
use std::path::Path;

use kms_storage::{
    KekHandle, KeyId, KeyRecord, KeySpec, KeyState, NewKey, RotationPolicy, Storage, StorageError,
    VersionState, schema,
};

use crate::{open, raw_db};

fn kek(id: &KeyId, v: u32) -> KekHandle {
    KekHandle::HsmObject {
        object_id: format!("{id}/{v}").into_bytes(),
    }
}

fn new_key(id: &KeyId, state: KeyState) -> NewKey {
    NewKey {
        id: id.clone(),
        description: String::new(),
        tags: BTreeMap::new(),
        spec: KeySpec::Aes256Gcm,
        state,
        rotation: RotationPolicy::Manual,
        next_rotation_at_ms: None,
        aliases: Vec::new(),
    }
}

/// A key with `versions` enabled versions; the last one is primary.
fn key_with_versions(s: &Storage, n: u8, versions: u32) -> KeyId {
    let c = s.catalogue();
    let id = KeyId::from_random([n; 16]);
    c.create_key(new_key(&id, KeyState::Enabled), kek(&id, 1), 1_000)
        .unwrap();
    c.commit_version(&id, 1, 1_001).unwrap();
    for _ in 1..versions {
        let v = c.add_pending_version(&id, 1_002, |v| kek(&id, v)).unwrap();
        c.commit_version(&id, v.version, 1_003).unwrap();
    }
    id
}

fn schedule_deletion(s: &Storage, id: &KeyId) -> Result<KeyRecord, StorageError> {
    s.catalogue().update_key(id, 2_000, |k| {
        k.state = KeyState::PendingDeletion {
            delete_at_ms: 9_000,
        };
        Ok::<_, StorageError>(())
    })
}

#[test]
fn the_primary_version_never_leaves_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 1, 2);
    for state in [
        VersionState::Disabled,
        VersionState::ScheduledDestruction { destroy_at_ms: 5 },
        VersionState::Destroyed { destroyed_at_ms: 5 },
    ] {
        assert!(
            matches!(
                c.set_version_state(&id, 2, state, 1_500),
                Err(StorageError::PrimaryNotEnabled { version: 2, .. })
            ),
            "{state:?}"
        );
    }
    assert_eq!(
        c.get_version(&id, 2).unwrap().unwrap().state,
        VersionState::Enabled
    );
    // Any other version may be disabled, and then cannot become primary.
    c.set_version_state(&id, 1, VersionState::Disabled, 1_600)
        .unwrap();
    let r = c.update_key(&id, 1_700, |k| {
        k.primary_version = Some(1);
        Ok::<_, StorageError>(())
    });
    assert!(matches!(
        r,
        Err(StorageError::InvalidVersionTransition { version: 1, .. })
    ));
    assert_eq!(c.get_key(&id).unwrap().unwrap().primary_version, Some(2));
    // Once another version is primary, the old one may leave Enabled.
    c.set_version_state(&id, 1, VersionState::Enabled, 1_800)
        .unwrap();
    c.update_key(&id, 1_900, |k| {
        k.primary_version = Some(1);
        Ok::<_, StorageError>(())
    })
    .unwrap();
    c.set_version_state(&id, 2, VersionState::Disabled, 2_000)
        .unwrap();
}

#[test]
fn a_key_pending_deletion_gets_no_new_version_and_no_new_primary() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 2, 2);
    let scheduled = schedule_deletion(&s, &id).unwrap();
    assert!(matches!(
        c.add_pending_version(&id, 3_000, |v| kek(&id, v)),
        Err(StorageError::KeyPendingDeletion { .. })
    ));
    let r = c.update_key(&id, 3_100, |k| {
        k.primary_version = Some(1);
        Ok::<_, StorageError>(())
    });
    assert!(matches!(r, Err(StorageError::KeyPendingDeletion { .. })));
    assert_eq!(c.get_key(&id).unwrap().unwrap(), scheduled);
    assert_eq!(c.list_versions(&id).unwrap().len(), 2);
    // Nor in the same write that schedules the deletion.
    let other = key_with_versions(&s, 3, 2);
    let r = c.update_key(&other, 3_200, |k| {
        k.state = KeyState::PendingDeletion {
            delete_at_ms: 9_000,
        };
        k.primary_version = Some(1);
        Ok::<_, StorageError>(())
    });
    assert!(matches!(r, Err(StorageError::KeyPendingDeletion { .. })));
    assert_eq!(c.get_key(&other).unwrap().unwrap().state, KeyState::Enabled);
    // A key cannot be created pending deletion (its first version would be new).
    let born = KeyId::from_random([4; 16]);
    let state = KeyState::PendingDeletion {
        delete_at_ms: 9_000,
    };
    assert!(matches!(
        c.create_key(new_key(&born, state), kek(&born, 1), 3_300),
        Err(StorageError::KeyPendingDeletion { .. })
    ));
    assert!(c.get_key(&born).unwrap().is_none());
}

#[test]
fn a_key_with_a_version_being_created_cannot_become_pending_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 5, 1);
    c.add_pending_version(&id, 3_000, |v| kek(&id, v)).unwrap();
    assert!(matches!(
        schedule_deletion(&s, &id),
        Err(StorageError::VersionBeingCreated { version: 2, .. })
    ));
    assert_eq!(c.get_key(&id).unwrap().unwrap().state, KeyState::Enabled);
    c.discard_version(&id, 2, 3_100).unwrap();
    schedule_deletion(&s, &id).unwrap();
}

/// Rewrites a stored key record in the closed database at `dir`: what an
/// older build could have left (a pending version under a key pending
/// deletion).
fn forge_key(dir: &Path, id: &KeyId, f: impl FnOnce(&mut KeyRecord)) {
    let db = raw_db(dir);
    let cf = db.cf_handle(schema::CF_KEYS).unwrap();
    let bytes = db.get_cf(cf, id.as_str()).unwrap().unwrap();
    let mut record: KeyRecord = serde_json::from_slice(&bytes[1..]).unwrap();
    f(&mut record);
    let mut out = vec![bytes[0]];
    serde_json::to_writer(&mut out, &record).unwrap();
    db.put_cf(cf, id.as_str(), out).unwrap();
    db.flush().unwrap();
}

#[test]
fn a_pending_version_of_a_key_pending_deletion_is_never_committed() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let s = open(dir.path());
        let id = key_with_versions(&s, 6, 1);
        s.catalogue()
            .add_pending_version(&id, 3_000, |v| kek(&id, v))
            .unwrap();
        id
    };
    forge_key(dir.path(), &id, |k| {
        k.state = KeyState::PendingDeletion {
            delete_at_ms: 9_000,
        };
    });
    let s = open(dir.path());
    let c = s.catalogue();
    assert!(matches!(
        c.commit_version(&id, 2, 3_100),
        Err(StorageError::KeyPendingDeletion { .. })
    ));
    let key = c.get_key(&id).unwrap().unwrap();
    assert_eq!(key.primary_version, Some(1));
    // What remains possible is discarding it.
    c.discard_version(&id, 2, 3_200).unwrap();
}

#[test]
fn version_numbers_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let s = open(dir.path());
        let c = s.catalogue();
        let id = key_with_versions(&s, 7, 2);
        // A discarded number stays taken.
        c.add_pending_version(&id, 3_000, |v| kek(&id, v)).unwrap();
        c.discard_version(&id, 3, 3_100).unwrap();
        let v = c.add_pending_version(&id, 3_200, |v| kek(&id, v)).unwrap();
        assert_eq!(v.version, 4);
        c.commit_version(&id, 4, 3_300).unwrap();
        // latest_version cannot be moved back by an update.
        let r = c.update_key(&id, 3_400, |k| {
            k.latest_version = 1;
            Ok::<_, StorageError>(())
        });
        assert!(matches!(
            r,
            Err(StorageError::ImmutableField {
                field: "latest_version"
            })
        ));
        id
    };
    // A damaged key record whose latest_version is behind its versions:
    // the next number is taken, so nothing is allocated.
    forge_key(dir.path(), &id, |k| k.latest_version = 3);
    let s = open(dir.path());
    let c = s.catalogue();
    assert!(matches!(
        c.add_pending_version(&id, 3_500, |v| kek(&id, v)),
        Err(StorageError::VersionExists { version: 4, .. })
    ));
    assert_eq!(
        c.get_version(&id, 4).unwrap().unwrap().state,
        VersionState::Enabled
    );
    // Key ids are not reused either, even after deletion.
    schedule_deletion(&s, &id).unwrap();
    c.finalize_key_deletion(&id, 4_000).unwrap();
    assert!(matches!(
        c.create_key(new_key(&id, KeyState::Enabled), kek(&id, 1), 4_100),
        Err(StorageError::KeyExists { .. })
    ));
}

#[test]
fn only_a_key_pending_deletion_becomes_a_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = key_with_versions(&s, 8, 1);
    // A usable key (or one whose deletion was cancelled) is not deleted.
    assert!(matches!(
        c.finalize_key_deletion(&id, 2_000),
        Err(StorageError::NotPendingDeletion { .. })
    ));
    assert_eq!(
        c.get_version(&id, 1).unwrap().unwrap().state,
        VersionState::Enabled
    );
    schedule_deletion(&s, &id).unwrap();
    c.finalize_key_deletion(&id, 2_100).unwrap();
    // A key whose first version never got made may go at once.
    let unborn = KeyId::from_random([9; 16]);
    c.create_key(new_key(&unborn, KeyState::Enabled), kek(&unborn, 1), 3_000)
        .unwrap();
    c.discard_version(&unborn, 1, 3_100).unwrap();
    c.finalize_key_deletion(&unborn, 3_200).unwrap();
}
