//! Golden fixtures of the catalogue's on-disk records (keys, versions, aliases,
//! policies, KEK handles, pending markers, GCM counters, the format version),
//! the way `golden.rs` pins the audit record encoding.
//!
//! Two artefacts, both written by [`populate`] (today's code, fixed times):
//!
//! - `tests/fixtures/catalogue_v1/`: a small RocksDB database directory (plus
//!   three audit records and their checkpoints). [`fixture_reads_back_exactly`]
//!   opens a *copy* of it (the checked-in files are never opened, let alone
//!   written) and reads every record back against hand-written expectations.
//! - `tests/golden/catalogue_v1.json`: every catalogue entry of that database,
//!   key and value, byte for byte (catalogue records as their JSON text behind
//!   the record version byte). Today's code must write exactly these bytes,
//!   the golden records must decode to the expected structs, and the structs
//!   must encode to exactly the golden JSON.
//!
//! A serde rename (or any other change of a record's encoding or of a key
//! layout) fails these tests: that is the point. An existing database must stay
//! readable, so such a change needs a new format version and a migration, not
//! a regenerated fixture. Regenerate only when the format changes on purpose
//! (and keep the old fixture as a migration test):
//!
//! ```text
//! cargo test -p kms-storage --all-features --test storage -- --ignored catalogue_fixture::regenerate
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kms_storage::{
    Alias, AliasEntry, AuditConfig, Grant, KekHandle, KeyId, KeyOrigin, KeyPolicy, KeyRecord,
    KeySpec, KeyState, NewKey, Permission, RotationPolicy, Storage, StorageError, VerifyOptions,
    VersionRecord, VersionState, schema,
};
use serde_json::{Value, json};

use crate::{MAC_KEY, event, mac_fn, open, verify_mac};

const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/catalogue_v1");
const GOLDEN_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/catalogue_v1.json"
);

/// Base time of the fixture, unix milliseconds.
const T0: u64 = 1_760_000_000_000;
const DAY_MS: u64 = 86_400_000;
/// GCM invocations counted on key A version 2 by [`populate`].
const A2_GCM_COUNT: u64 = 7;
/// The persisted reservation after that count: the count plus one default block (4096).
const A2_GCM_RESERVED: u64 = A2_GCM_COUNT + 4096;
/// Audit records appended by [`populate`] (checkpoint every 2, plus the final one).
const AUDIT_RECORDS: u64 = 3;

/// Key A: two versions (1 disabled, 2 primary), two aliases, a policy, GCM counted.
const KEY_A: &str = "key-0000000000000000000000000000000a";
/// Key B: pending deletion, one alias created after the key.
const KEY_B: &str = "key-0000000000000000000000000000000b";
/// Key C: starts disabled; version 1 scheduled for destruction, 2 primary,
/// 3 pending, 4 discarded.
const KEY_C: &str = "key-0000000000000000000000000000000c";
/// Key D: deleted (a tombstone); its alias is gone.
const KEY_D: &str = "key-0000000000000000000000000000000d";
/// Key E: its first version is still pending (no primary version).
const KEY_E: &str = "key-0000000000000000000000000000000e";

fn id(s: &str) -> KeyId {
    KeyId::parse(s).unwrap()
}

fn alias(s: &str) -> Alias {
    Alias::parse(s).unwrap()
}

/// The KEK handle of a version: a CKA_ID of the key id's last byte and the version.
fn kek(key: &str, version: u32) -> KekHandle {
    let last = u8::from_str_radix(&key[key.len() - 2..], 16).unwrap();
    let mut object_id = vec![0xc0, last];
    object_id.extend_from_slice(&version.to_be_bytes());
    KekHandle::HsmObject { object_id }
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn policy_a() -> KeyPolicy {
    KeyPolicy {
        grants: vec![
            Grant {
                principal: "spiffe://prod/payments/*".into(),
                permissions: BTreeSet::from([
                    Permission::Encrypt,
                    Permission::Decrypt,
                    Permission::GenerateDataKey,
                ]),
                required_context: tags(&[("tenant", "acme")]),
            },
            Grant {
                principal: "admin".into(),
                permissions: Permission::ALL.into_iter().collect(),
                required_context: BTreeMap::new(),
            },
        ],
    }
}

/// Writes the fixture's catalogue with today's code. Deterministic: every
/// time is given, every id and KEK handle is fixed.
fn populate(s: &Storage) {
    let c = s.catalogue();
    let new_key = |key: &str, description: &str, state, rotation, next, aliases: &[&str]| NewKey {
        id: id(key),
        description: description.into(),
        tags: if key == KEY_A {
            tags(&[("env", "prod"), ("team", "payments")])
        } else {
            BTreeMap::new()
        },
        spec: KeySpec::Aes256Gcm,
        state,
        rotation,
        next_rotation_at_ms: next,
        aliases: aliases.iter().map(|a| alias(a)).collect(),
    };

    // A
    let a = id(KEY_A);
    c.create_key(
        new_key(
            KEY_A,
            "payments ledger",
            KeyState::Enabled,
            RotationPolicy::Every {
                period_secs: 7_776_000,
            },
            Some(T0 + 90 * DAY_MS),
            &["alias/payments/ledger", "alias/payments"],
        ),
        kek(KEY_A, 1),
        T0,
    )
    .unwrap();
    c.commit_version(&a, 1, T0 + 1).unwrap();
    c.add_pending_version(&a, T0 + 2, |v| kek(KEY_A, v))
        .unwrap();
    c.commit_version(&a, 2, T0 + 3).unwrap();
    c.set_version_state(&a, 1, VersionState::Disabled, T0 + 4)
        .unwrap();
    c.update_key(&a, T0 + 5, |k| {
        k.policy = Some(policy_a());
        Ok::<(), StorageError>(())
    })
    .unwrap();
    assert_eq!(
        c.add_gcm_invocations(&a, 2, A2_GCM_COUNT).unwrap(),
        A2_GCM_COUNT
    );

    // B
    let b = id(KEY_B);
    c.create_key(
        new_key(
            KEY_B,
            "",
            KeyState::Enabled,
            RotationPolicy::Manual,
            None,
            &[],
        ),
        kek(KEY_B, 1),
        T0 + 10,
    )
    .unwrap();
    c.commit_version(&b, 1, T0 + 11).unwrap();
    c.create_alias(&alias("alias/retiring"), &b).unwrap();
    c.update_key(&b, T0 + 12, |k| {
        k.state = KeyState::PendingDeletion {
            delete_at_ms: T0 + 7 * DAY_MS,
        };
        Ok::<(), StorageError>(())
    })
    .unwrap();

    // C
    let cid = id(KEY_C);
    c.create_key(
        new_key(
            KEY_C,
            "batch exports",
            KeyState::Disabled,
            RotationPolicy::Manual,
            None,
            &[],
        ),
        kek(KEY_C, 1),
        T0 + 20,
    )
    .unwrap();
    c.commit_version(&cid, 1, T0 + 21).unwrap();
    c.add_pending_version(&cid, T0 + 22, |v| kek(KEY_C, v))
        .unwrap();
    c.commit_version(&cid, 2, T0 + 23).unwrap();
    c.set_version_state(
        &cid,
        1,
        VersionState::ScheduledDestruction {
            destroy_at_ms: T0 + 30 * DAY_MS,
        },
        T0 + 24,
    )
    .unwrap();
    c.add_pending_version(&cid, T0 + 25, |v| kek(KEY_C, v))
        .unwrap();
    c.add_pending_version(&cid, T0 + 26, |v| kek(KEY_C, v))
        .unwrap();
    c.discard_version(&cid, 4, T0 + 27).unwrap();

    // D
    let d = id(KEY_D);
    c.create_key(
        new_key(
            KEY_D,
            "gone",
            KeyState::Enabled,
            RotationPolicy::Manual,
            None,
            &["alias/old"],
        ),
        kek(KEY_D, 1),
        T0 + 30,
    )
    .unwrap();
    c.commit_version(&d, 1, T0 + 31).unwrap();
    // Only a key pending deletion is deleted (the final record is the same).
    c.update_key(&d, T0 + 31, |k| {
        k.state = KeyState::PendingDeletion {
            delete_at_ms: T0 + 32,
        };
        Ok::<_, kms_storage::StorageError>(())
    })
    .unwrap();
    c.finalize_key_deletion(&d, T0 + 32).unwrap();

    // E
    c.create_key(
        new_key(
            KEY_E,
            "being created",
            KeyState::Enabled,
            RotationPolicy::Manual,
            None,
            &[],
        ),
        kek(KEY_E, 1),
        T0 + 40,
    )
    .unwrap();

    // A few audit records, so the fixture holds every record kind. Their
    // times are the wall clock: they are checked by decoding and verifying,
    // and their byte format by golden.rs.
    let log = s
        .open_audit_log(
            AuditConfig {
                checkpoint_every_records: 2,
                checkpoint_interval: None,
                ..AuditConfig::default()
            },
            mac_fn(MAC_KEY),
        )
        .unwrap();
    for i in 1..=AUDIT_RECORDS {
        assert_eq!(log.append(event(i)).unwrap(), i);
    }
}

fn key_record(
    key: &str,
    description: &str,
    state: KeyState,
    versions: (Option<u32>, u32),
    rotation: (RotationPolicy, Option<u64>),
    times: (u64, u64),
) -> KeyRecord {
    KeyRecord {
        id: id(key),
        description: description.into(),
        tags: BTreeMap::new(),
        spec: KeySpec::Aes256Gcm,
        state,
        primary_version: versions.0,
        latest_version: versions.1,
        rotation: rotation.0,
        next_rotation_at_ms: rotation.1,
        created_at_ms: times.0,
        updated_at_ms: times.1,
        // Records written before origins existed decode as generated keys.
        origin: KeyOrigin::Kms,
        policy: None,
    }
}

/// Every key record of the fixture, in id order. Written out by hand from
/// the steps of [`populate`], not computed by the code under test.
fn expected_keys() -> Vec<KeyRecord> {
    let mut a = key_record(
        KEY_A,
        "payments ledger",
        KeyState::Enabled,
        (Some(2), 2),
        (
            RotationPolicy::Every {
                period_secs: 7_776_000,
            },
            Some(T0 + 90 * DAY_MS),
        ),
        (T0, T0 + 5),
    );
    a.tags = tags(&[("env", "prod"), ("team", "payments")]);
    a.policy = Some(policy_a());
    vec![
        a,
        key_record(
            KEY_B,
            "",
            KeyState::PendingDeletion {
                delete_at_ms: T0 + 7 * DAY_MS,
            },
            (Some(1), 1),
            (RotationPolicy::Manual, None),
            (T0 + 10, T0 + 12),
        ),
        key_record(
            KEY_C,
            "batch exports",
            KeyState::Disabled,
            (Some(2), 4),
            (RotationPolicy::Manual, None),
            (T0 + 20, T0 + 26),
        ),
        key_record(
            KEY_D,
            "gone",
            KeyState::Deleted {
                deleted_at_ms: T0 + 32,
            },
            (Some(1), 1),
            (RotationPolicy::Manual, None),
            (T0 + 30, T0 + 32),
        ),
        key_record(
            KEY_E,
            "being created",
            KeyState::Enabled,
            (None, 1),
            (RotationPolicy::Manual, None),
            (T0 + 40, T0 + 40),
        ),
    ]
}

fn version(key: &str, v: u32, state: VersionState, created: u64, updated: u64) -> VersionRecord {
    VersionRecord {
        key_id: id(key),
        version: v,
        state,
        kek: kek(key, v),
        origin: KeyOrigin::Kms,
        created_at_ms: created,
        updated_at_ms: updated,
        gcm_invocations: 0,
    }
}

/// Every version record of the fixture, in (key id, version) order, with the
/// GCM count the catalogue reports after a reopen (the persisted reservation).
fn expected_versions() -> Vec<VersionRecord> {
    let mut a2 = version(KEY_A, 2, VersionState::Enabled, T0 + 2, T0 + 3);
    a2.gcm_invocations = A2_GCM_RESERVED;
    vec![
        version(KEY_A, 1, VersionState::Disabled, T0, T0 + 4),
        a2,
        version(KEY_B, 1, VersionState::Enabled, T0 + 10, T0 + 11),
        version(
            KEY_C,
            1,
            VersionState::ScheduledDestruction {
                destroy_at_ms: T0 + 30 * DAY_MS,
            },
            T0 + 20,
            T0 + 24,
        ),
        version(KEY_C, 2, VersionState::Enabled, T0 + 22, T0 + 23),
        version(KEY_C, 3, VersionState::Pending, T0 + 25, T0 + 25),
        version(
            KEY_C,
            4,
            VersionState::Destroyed {
                destroyed_at_ms: T0 + 27,
            },
            T0 + 26,
            T0 + 27,
        ),
        version(
            KEY_D,
            1,
            VersionState::Destroyed {
                destroyed_at_ms: T0 + 32,
            },
            T0 + 30,
            T0 + 32,
        ),
        version(KEY_E, 1, VersionState::Pending, T0 + 40, T0 + 40),
    ]
}

fn expected_aliases() -> Vec<AliasEntry> {
    [
        ("alias/payments", KEY_A),
        ("alias/payments/ledger", KEY_A),
        ("alias/retiring", KEY_B),
    ]
    .into_iter()
    .map(|(a, k)| AliasEntry {
        alias: alias(a),
        key_id: id(k),
    })
    .collect()
}

/// Copies the checked-in fixture into a fresh temporary directory: RocksDB
/// writes to any directory it opens, and the checked-in files must not change.
fn fixture_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for entry in std::fs::read_dir(FIXTURE_DIR).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        copied += 1;
    }
    assert!(copied > 0, "fixture {FIXTURE_DIR} is empty");
    tmp
}

#[test]
fn fixture_reads_back_exactly() {
    let dir = fixture_copy();
    let s = open(dir.path());
    let c = s.catalogue();

    let keys = c.list_keys(None, 100).unwrap();
    assert_eq!(keys.items, expected_keys());
    assert_eq!(keys.next_page_token, None);
    for key in expected_keys() {
        assert_eq!(c.get_key(&key.id).unwrap().as_ref(), Some(&key));
    }

    let versions = expected_versions();
    for key in expected_keys() {
        let of_key: Vec<VersionRecord> = versions
            .iter()
            .filter(|v| v.key_id == key.id)
            .cloned()
            .collect();
        assert_eq!(c.list_versions(&key.id).unwrap(), of_key, "{}", key.id);
        for v in &of_key {
            assert_eq!(c.get_version(&key.id, v.version).unwrap().as_ref(), Some(v));
        }
    }

    let pending: Vec<VersionRecord> = versions
        .iter()
        .filter(|v| v.state == VersionState::Pending)
        .cloned()
        .collect();
    assert_eq!(pending.len(), 2);
    assert_eq!(c.list_pending_versions().unwrap(), pending);

    let aliases = c.list_aliases(None, None, 100).unwrap();
    assert_eq!(aliases.items, expected_aliases());
    assert_eq!(
        c.list_aliases(Some(&id(KEY_A)), None, 100).unwrap().items,
        expected_aliases()[..2]
    );
    assert!(
        c.list_aliases(Some(&id(KEY_D)), None, 100)
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(c.get_alias(&alias("alias/old")).unwrap(), None);
    assert_eq!(
        c.resolve_key("alias/retiring").unwrap().map(|k| k.id),
        Some(id(KEY_B))
    );

    // The counter resumes from the reservation and keeps counting.
    assert_eq!(
        c.add_gcm_invocations(&id(KEY_A), 2, 1).unwrap(),
        A2_GCM_RESERVED + 1
    );

    // The audit log: records decode, the chain and checkpoints verify.
    let reader = s.audit_reader();
    for seq in 1..=AUDIT_RECORDS {
        let record = reader.get(seq).unwrap().unwrap();
        assert_eq!(record.seq, seq);
        assert_eq!(record.event, event(seq));
    }
    assert!(reader.get(AUDIT_RECORDS + 1).unwrap().is_none());
    let report = reader
        .verify(&VerifyOptions::default(), &verify_mac)
        .unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, AUDIT_RECORDS);
    // One checkpoint after record 2, and the final one at shutdown.
    assert_eq!(report.checkpoints_verified, 2, "{report:?}");
    assert_eq!(report.last_checkpoint_seq, Some(AUDIT_RECORDS));

    // Appending continues the chain of the fixture.
    let log = s
        .open_audit_log(crate::config(100), mac_fn(MAC_KEY))
        .unwrap();
    assert_eq!(log.append(event(9)).unwrap(), AUDIT_RECORDS + 1);
}

#[test]
fn fixture_holds_exactly_the_golden_entries() {
    let dir = fixture_copy();
    assert_eq!(dump(dir.path()), golden());
}

#[test]
fn todays_code_writes_exactly_the_golden_entries() {
    let dir = tempfile::tempdir().unwrap();
    populate(&open(dir.path()));
    assert_eq!(dump(dir.path()), golden());
}

#[test]
fn golden_records_decode_to_the_expected_structs_and_back() {
    let g = golden();
    let cfs = &g["column_families"];
    let keys = cfs[schema::CF_KEYS].as_array().unwrap();
    let expected = expected_keys();
    assert_eq!(keys.len(), expected.len());
    for (entry, want) in keys.iter().zip(&expected) {
        let text = record_json(entry);
        let decoded: KeyRecord = serde_json::from_str(text).unwrap();
        assert_eq!(&decoded, want);
        assert_eq!(serde_json::to_string(want).unwrap(), text, "{}", want.id);
        assert_eq!(entry["key"], want.id.as_str());
    }

    let versions = cfs[schema::CF_VERSIONS].as_array().unwrap();
    let expected = expected_versions();
    assert_eq!(versions.len(), expected.len());
    for (entry, want) in versions.iter().zip(&expected) {
        let text = record_json(entry);
        let decoded: VersionRecord = serde_json::from_str(text).unwrap();
        // The GCM count is stored apart from the record (`#[serde(skip)]`).
        let want = VersionRecord {
            gcm_invocations: 0,
            ..want.clone()
        };
        assert_eq!(decoded, want);
        assert_eq!(serde_json::to_string(&want).unwrap(), text, "{want:?}");
        let mut key = want.key_id.as_str().as_bytes().to_vec();
        key.extend_from_slice(&want.version.to_be_bytes());
        assert_eq!(entry["key_hex"], hex::encode(key));
    }
}

/// The JSON text of a catalogue record entry of the golden file; its value on
/// disk is the record version byte (1) followed by this text.
fn record_json(entry: &Value) -> &str {
    assert_eq!(entry["record_version"], 1, "{entry}");
    entry["record_json"].as_str().unwrap()
}

/// Column families pinned byte for byte: all but the audit log's, whose
/// records carry wall-clock times (their encoding is pinned by golden.rs),
/// and the use records derived from it (pinned by kms-catalogue's golden
/// vector; the fixture database predates them).
fn pinned_cfs() -> impl Iterator<Item = &'static str> {
    schema::ALL_CFS.into_iter().filter(|cf| {
        ![
            schema::CF_AUDIT,
            schema::CF_AUDIT_CHECKPOINTS,
            schema::CF_USAGE,
        ]
        .contains(cf)
    })
}

/// Every entry of the pinned column families of the (closed) database at
/// `dir`, as the golden file's JSON. Opened read-only.
fn dump(dir: &Path) -> Value {
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&opts, dir, cfs, false).unwrap();
    let mut out = serde_json::Map::new();
    for cf in pinned_cfs() {
        let handle = db.cf_handle(cf).unwrap();
        let entries: Vec<Value> = db
            .iterator_cf(handle, rocksdb::IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.unwrap();
                dump_entry(cf, &k, &v)
            })
            .collect();
        out.insert(cf.to_owned(), Value::Array(entries));
    }
    json!({
        "comment": "Every entry of the catalogue column families of tests/fixtures/catalogue_v1, \
                    written by tests/catalogue_fixture.rs. Keys are text when printable, else hex; \
                    catalogue records are the byte record_version followed by record_json.",
        "format_version": schema::FORMAT_VERSION,
        "column_families": out,
    })
}

fn dump_entry(cf: &str, k: &[u8], v: &[u8]) -> Value {
    let mut e = serde_json::Map::new();
    match std::str::from_utf8(k) {
        Ok(text) if text.bytes().all(|b| b.is_ascii_graphic()) => {
            e.insert("key".into(), text.into())
        }
        _ => e.insert("key_hex".into(), hex::encode(k).into()),
    };
    let is_record = cf == schema::CF_KEYS || cf == schema::CF_VERSIONS;
    match v.split_first() {
        Some((&version, json)) if is_record => {
            e.insert("record_version".into(), version.into());
            e.insert(
                "record_json".into(),
                std::str::from_utf8(json).unwrap().into(),
            );
        }
        _ => {
            e.insert("value_hex".into(), hex::encode(v).into());
        }
    }
    Value::Object(e)
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(GOLDEN_PATH).unwrap()).unwrap()
}

/// Rewrites the fixture database and the golden file from [`populate`]. Run
/// only to change the format on purpose (see the module doc).
#[test]
#[ignore = "rewrites the catalogue fixture and golden file"]
fn regenerate() {
    let tmp = tempfile::tempdir().unwrap();
    populate(&open(tmp.path()));
    // Move everything from the write-ahead log into one small table file per
    // column family, so the fixture is a few files and no log to replay.
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, tmp.path()).unwrap();
        let db = rocksdb::DB::open_cf(&opts, tmp.path(), &cfs).unwrap();
        for cf in &cfs {
            db.flush_cf(db.cf_handle(cf).unwrap()).unwrap();
        }
    }
    let golden = dump(tmp.path());
    let fixture = PathBuf::from(FIXTURE_DIR);
    if fixture.exists() {
        std::fs::remove_dir_all(&fixture).unwrap();
    }
    std::fs::create_dir_all(&fixture).unwrap();
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        // The info log and the options file are not needed to open a database.
        if name.starts_with("LOG") || name.starts_with("OPTIONS") {
            continue;
        }
        std::fs::copy(entry.path(), fixture.join(&name)).unwrap();
    }
    std::fs::write(
        GOLDEN_PATH,
        serde_json::to_string_pretty(&golden).unwrap() + "\n",
    )
    .unwrap();
}
