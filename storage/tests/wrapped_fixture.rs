//! Golden vectors of version records whose KEK is a `KekHandle::Wrapped`
//! blob (design note `hierarchy-and-cluster.md` §1.5.2), the way
//! `catalogue_fixture.rs` pins every record kind that existed before it.
//!
//! `tests/golden/wrapped_versions_v1.json` holds the version column family
//! of a database written by [`populate`] (today's code, fixed times and
//! bytes), key and value byte for byte. Today's code must write exactly
//! these bytes; the golden records must decode to the hand-written
//! [`expected_versions`] and encode back to exactly the golden JSON.
//! `catalogue_fixture.rs` keeps proving that records written before this
//! variant existed (`HsmObject`) decode unchanged.
//!
//! A change of the encoding fails these tests on purpose: blobs on disk
//! must stay readable. Regenerate only for a deliberate format change:
//!
//! ```text
//! cargo test -p kms-storage --all-features --test storage -- --ignored wrapped_fixture::regenerate
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use kms_storage::{
    KekHandle, KeyId, KeyOrigin, KeySpec, KeyState, NewKey, RotationPolicy, Storage, VersionRecord,
    VersionState, schema,
};
use serde_json::{Value, json};

use crate::open;

const GOLDEN_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/wrapped_versions_v1.json"
);

/// Base time of the fixture, unix milliseconds.
const T0: u64 = 1_770_000_000_000;
/// The key both wrapped versions belong to.
const KEY_W: &str = "key-000000000000000000000000000000f1";
/// `CKM_AES_KEY_WRAP`.
const AES_KEY_WRAP: u64 = 0x2109;

fn id() -> KeyId {
    KeyId::parse(KEY_W).unwrap()
}

/// A 40-byte blob and a 32-byte MAC per version, distinct and fixed: the
/// bytes only have to be stable, not to unwrap (nothing here has a root).
fn wrapped(version: u32) -> KekHandle {
    let seed = u8::try_from(version).unwrap() * 0x40;
    KekHandle::Wrapped {
        root_epoch: version, // version 1 under root 1, version 2 under root 2
        mechanism: AES_KEY_WRAP,
        blob: (0..40u8).map(|i| seed.wrapping_add(i)).collect(),
        mac: std::array::from_fn(|i| 0xf0 ^ seed ^ u8::try_from(i).unwrap()),
    }
}

/// Writes the fixture with today's code: a key whose first version is
/// wrapped under root 1 and whose second, after a rotation, under root 2.
fn populate(s: &Storage) {
    let c = s.catalogue();
    c.create_key(
        NewKey {
            id: id(),
            description: "wrapped".into(),
            tags: BTreeMap::new(),
            spec: KeySpec::Aes256Gcm,
            state: KeyState::Enabled,
            rotation: RotationPolicy::Manual,
            next_rotation_at_ms: None,
            aliases: Vec::new(),
        },
        wrapped(1),
        T0,
    )
    .unwrap();
    c.commit_version(&id(), 1, T0 + 1).unwrap();
    c.add_pending_version(&id(), T0 + 2, wrapped).unwrap();
    c.commit_version(&id(), 2, T0 + 3).unwrap();
}

/// The version records of the fixture, written out by hand from the steps
/// of [`populate`] (not computed by the code under test).
fn expected_versions() -> Vec<VersionRecord> {
    let record = |version, created, updated| VersionRecord {
        key_id: id(),
        version,
        state: VersionState::Enabled,
        kek: wrapped(version),
        origin: KeyOrigin::Kms,
        created_at_ms: created,
        updated_at_ms: updated,
        gcm_invocations: 0,
    };
    vec![record(1, T0, T0 + 1), record(2, T0 + 2, T0 + 3)]
}

/// Every entry of the version column family of the (closed) database at
/// `dir`, as the golden file's JSON. Opened read-only.
fn dump(dir: &Path) -> Value {
    let opts = rocksdb::Options::default();
    let cfs = rocksdb::DB::list_cf(&opts, dir).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&opts, dir, cfs, false).unwrap();
    let handle = db.cf_handle(schema::CF_VERSIONS).unwrap();
    let versions: Vec<Value> = db
        .iterator_cf(handle, rocksdb::IteratorMode::Start)
        .map(|item| {
            let (k, v) = item.unwrap();
            let (&record_version, text) = v.split_first().unwrap();
            json!({
                "key_hex": hex::encode(&k),
                "record_version": record_version,
                "record_json": std::str::from_utf8(text).unwrap(),
            })
        })
        .collect();
    json!({
        "comment": "The version column family of a catalogue holding one key with two \
                    KekHandle::Wrapped versions, written by tests/wrapped_fixture.rs. Values \
                    are the byte record_version followed by record_json.",
        "format_version": schema::FORMAT_VERSION,
        "versions": versions,
    })
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(GOLDEN_PATH).unwrap()).unwrap()
}

#[test]
fn todays_code_writes_exactly_the_golden_wrapped_versions() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        populate(&s);
        // And reads them back through the catalogue.
        let c = s.catalogue();
        assert_eq!(c.list_versions(&id()).unwrap(), expected_versions());
    }
    assert_eq!(dump(dir.path()), golden());
    // After a reopen, too.
    let s = open(dir.path());
    assert_eq!(
        s.catalogue().get_version(&id(), 2).unwrap().as_ref(),
        expected_versions().get(1)
    );
}

#[test]
fn golden_wrapped_versions_decode_to_the_expected_structs_and_back() {
    let g = golden();
    assert_eq!(g["format_version"], schema::FORMAT_VERSION);
    let entries = g["versions"].as_array().unwrap();
    let expected = expected_versions();
    assert_eq!(entries.len(), expected.len());
    for (entry, want) in entries.iter().zip(&expected) {
        assert_eq!(entry["record_version"], 1, "{entry}");
        let text = entry["record_json"].as_str().unwrap();
        let decoded: VersionRecord = serde_json::from_str(text).unwrap();
        assert_eq!(&decoded, want);
        assert_eq!(serde_json::to_string(want).unwrap(), text, "{want:?}");
        let mut key = want.key_id.as_str().as_bytes().to_vec();
        key.extend_from_slice(&want.version.to_be_bytes());
        assert_eq!(entry["key_hex"], hex::encode(key));
    }
    // The handle's own shape, spelled out: a reader of the file should not
    // need the code to know what a wrapped record holds.
    let first: Value = serde_json::from_str(entries[0]["record_json"].as_str().unwrap()).unwrap();
    let kek = &first["kek"];
    assert_eq!(kek["kind"], "Wrapped");
    assert_eq!(kek["root_epoch"], 1);
    assert_eq!(kek["mechanism"], AES_KEY_WRAP);
    assert_eq!(kek["blob"].as_str().unwrap().len(), 80);
    assert_eq!(kek["mac"].as_str().unwrap().len(), 64);
}

#[test]
fn a_wrapped_handle_with_a_mac_of_the_wrong_length_does_not_decode() {
    let good = serde_json::to_value(wrapped(1)).unwrap();
    for bad_mac in [
        "",
        "00",
        &"ab".repeat(31),
        &"ab".repeat(33),
        &"zz".repeat(32),
    ] {
        let mut bad = good.clone();
        bad["mac"] = bad_mac.into();
        assert!(
            serde_json::from_value::<KekHandle>(bad).is_err(),
            "mac {bad_mac:?} decoded"
        );
    }
    assert_eq!(
        serde_json::from_value::<KekHandle>(good).unwrap(),
        wrapped(1)
    );
}

/// Rewrites the golden file from [`populate`]. Run only to change the
/// format on purpose (see the module doc).
#[test]
#[ignore = "rewrites the wrapped-version golden file"]
fn regenerate() {
    let tmp = tempfile::tempdir().unwrap();
    populate(&open(tmp.path()));
    std::fs::write(
        GOLDEN_PATH,
        serde_json::to_string_pretty(&dump(tmp.path())).unwrap() + "\n",
    )
    .unwrap();
}
