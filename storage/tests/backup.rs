//! What backups need of the storage layer: a checkpoint of a database that
//! keeps being written is a consistent database of its own, and the
//! catalogue's restore operations (design note §1.6) replay a destruction,
//! put back versions and keys, reserve version numbers and keep a marker.

use std::collections::BTreeMap;

use kms_storage::{
    AuditConfig, KekHandle, KeyId, KeySpec, KeyState, NewKey, RotationPolicy, StorageError,
    VersionState,
};

use crate::{MAC_KEY, event, mac_fn, open};

fn kid(n: u8) -> KeyId {
    KeyId::from_random([n; 16])
}

fn wrapped(v: u32) -> KekHandle {
    KekHandle::Wrapped {
        root_epoch: 1,
        mechanism: 0x2109,
        blob: vec![v as u8; 40],
        mac: [7; 32],
    }
}

fn new_key(id: &KeyId, n: u8) -> NewKey {
    NewKey {
        id: id.clone(),
        description: String::new(),
        tags: BTreeMap::new(),
        spec: KeySpec::Aes256Gcm,
        state: KeyState::Enabled,
        rotation: RotationPolicy::Manual,
        next_rotation_at_ms: None,
        aliases: vec![kms_storage::Alias::parse(&format!("alias/k{n}")).unwrap()],
    }
}

fn create_wrapped(s: &kms_storage::Storage, n: u8) -> KeyId {
    let id = kid(n);
    s.catalogue()
        .create_key_enabled(new_key(&id, n), wrapped(1), 1_000)
        .unwrap();
    id
}

#[test]
fn a_checkpoint_taken_while_writing_is_a_consistent_database() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("live"));
    let log = s
        .open_audit_log(AuditConfig::default(), mac_fn(MAC_KEY))
        .unwrap();
    let id = create_wrapped(&s, 1);
    for i in 0..20 {
        log.append(event(i)).unwrap();
    }
    let copy_dir = dir.path().join("copy");
    s.create_checkpoint(&copy_dir).unwrap();
    // The live database moves on; the copy does not.
    s.catalogue()
        .add_enabled_version(&id, 2_000, |v| Ok::<_, StorageError>(wrapped(v)))
        .unwrap();
    log.append(event(99)).unwrap();
    // A checkpoint refuses an existing directory.
    assert!(s.create_checkpoint(&copy_dir).is_err());

    let copy = open(&copy_dir);
    assert_eq!(copy.audit_reader().last_seq().unwrap(), 20);
    assert_eq!(
        copy.audit_reader().get(20).unwrap().unwrap(),
        s.audit_reader().get(20).unwrap().unwrap()
    );
    let key = copy.catalogue().get_key(&id).unwrap().unwrap();
    assert_eq!((key.primary_version, key.latest_version), (Some(1), 1));
    assert_eq!(
        s.catalogue().get_key(&id).unwrap().unwrap().latest_version,
        2
    );
}

#[test]
fn a_replayed_destruction_tombstones_the_key_and_erases_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    let id = create_wrapped(&s, 2);
    c.add_enabled_version(&id, 2_000, |v| Ok::<_, StorageError>(wrapped(v)))
        .unwrap();
    assert_eq!(c.wrapped_versions_per_epoch().unwrap()[&1].live_versions, 2);

    // Enabled in the backup: replayed whatever its state.
    assert!(c.replay_key_destruction(&id, 3_000).unwrap());
    let key = c.get_key(&id).unwrap().unwrap();
    assert_eq!(
        key.state,
        KeyState::Deleted {
            deleted_at_ms: 3_000
        }
    );
    for version in c.list_versions(&id).unwrap() {
        assert!(matches!(version.state, VersionState::Destroyed { .. }));
        let KekHandle::Wrapped { blob, mac, .. } = version.kek else {
            panic!("not wrapped");
        };
        assert!(
            blob.is_empty() && mac == [0; 32],
            "a destroyed blob survived"
        );
    }
    assert!(c.list_aliases(None, None, 100).unwrap().items.is_empty());
    let counts = c.wrapped_versions_per_epoch().unwrap();
    assert_eq!(
        (counts[&1].live_versions, counts[&1].destroyed_versions),
        (0, 0)
    );
    // Twice, or for an unknown key: nothing to do.
    assert!(!c.replay_key_destruction(&id, 4_000).unwrap());
    assert!(!c.replay_key_destruction(&kid(9), 4_000).unwrap());
}

#[test]
fn versions_and_keys_put_back_and_numbers_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let newer = open(&dir.path().join("newer"));
    let id = create_wrapped(&newer, 3);
    for t in [2_000, 2_100] {
        newer
            .catalogue()
            .add_enabled_version(&id, t, |v| Ok::<_, StorageError>(wrapped(v)))
            .unwrap();
    }
    let later_key = create_wrapped(&newer, 4);
    let versions = newer.catalogue().list_versions(&id).unwrap();
    let later_versions = newer.catalogue().list_versions(&later_key).unwrap();
    let later_record = newer.catalogue().get_key(&later_key).unwrap().unwrap();

    let older = open(&dir.path().join("older"));
    create_wrapped(&older, 3);
    let c = older.catalogue();
    // Versions 2 and 3 put back (1 is there already); 5 reserved.
    assert_eq!(
        c.restore_versions(&id, &versions, 5, 3_000).unwrap(),
        [2, 3]
    );
    let key = c.get_key(&id).unwrap().unwrap();
    assert_eq!((key.primary_version, key.latest_version), (Some(1), 5));
    assert_eq!(c.get_version(&id, 3).unwrap().unwrap(), versions[2]);
    let (_, next) = c
        .add_enabled_version(&id, 4_000, |v| Ok::<_, StorageError>(wrapped(v)))
        .unwrap();
    assert_eq!(next.version, 6, "a reserved number was reused");
    // A key created later comes back whole, once.
    assert!(c.restore_key(&later_record, &later_versions).unwrap());
    assert!(!c.restore_key(&later_record, &later_versions).unwrap());
    assert_eq!(c.get_key(&later_key).unwrap().unwrap(), later_record);
    // Its primary must come with it.
    let mut orphan = later_record.clone();
    orphan.id = kid(5);
    assert!(matches!(
        c.restore_key(&orphan, &[]),
        Err(StorageError::PrimaryNotEnabled { .. })
    ));
}

#[test]
fn the_restore_marker_round_trips_and_clears() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s.catalogue();
    assert_eq!(c.restore_marker::<serde_json::Value>().unwrap(), None);
    let marker = serde_json::json!({"backup_id": "ab", "replayed": ["k"]});
    c.set_restore_marker(&marker).unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(
        s.catalogue().restore_marker::<serde_json::Value>().unwrap(),
        Some(marker)
    );
    s.catalogue().clear_restore_marker().unwrap();
    assert_eq!(
        s.catalogue().restore_marker::<serde_json::Value>().unwrap(),
        None
    );
}
