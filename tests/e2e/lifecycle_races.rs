//! Lifecycle races (issue 13, item 1): every pair of conflicting key and
//! version state changes, run at the same moment on two threads against the
//! in-process service (a fresh SoftHSM2 token and RocksDB directory per
//! test), [`ROUNDS`] times each, with the catalogue's invariants checked
//! after every round:
//!
//! - the primary version is ENABLED (else every Encrypt fails);
//! - version numbers run 1..=latest without gaps, none left pending;
//! - a key pending deletion got no new version and no new primary after
//!   the deletion was scheduled;
//! - a deletion that was cancelled is never carried out.
//!
//! Before the fix, `RotateKey` racing `DisableKeyVersion(new version)` left a
//! DISABLED primary, and `SetPrimaryVersion(v)` racing
//! `DisableKeyVersion(v)` let both succeed: the version state change checked
//! a key record read before it took the key's lock.

use std::collections::HashMap;
use std::sync::Barrier;

use kms::error::KmsError;
use kms::service::{CreateKeyInput, EncryptInput, KeyView, KmsService, RequestMeta};
use kms_storage::{KeyRecord, KeyState, VersionRecord, VersionState};
use kms_tests::TestEnv;

const ROUNDS: usize = 100;

fn meta() -> RequestMeta {
    RequestMeta {
        principal: "anonymous".into(),
        peer: "lifecycle-races".into(),
        request_id: "race".into(),
    }
}

/// A service over a fresh token and database, and a key with `versions`
/// enabled versions whose primary is version 1.
fn service_with_key(env: &TestEnv, versions: u32) -> (KmsService, String) {
    let mut config = env.config();
    // What is tested is the order of state changes, not durability: skip
    // the fsyncs of the audit log and the token directory (the catalogue's
    // own writes stay synced) so that 100 rounds take seconds.
    config.audit.sync = false;
    config.hsm.sync_token_dir = None;
    let service = KmsService::open(&config).expect("open service");
    let key = new_key(&service, versions);
    (service, key)
}

/// A key with `versions` enabled versions whose primary is version 1.
fn new_key(service: &KmsService, versions: u32) -> String {
    let key = service
        .create_key(&meta(), CreateKeyInput::default())
        .expect("create key")
        .record
        .id
        .to_string();
    for _ in 1..versions {
        service.rotate_key(&meta(), &key).expect("rotate");
    }
    service
        .set_primary_version(&meta(), &key, 1)
        .expect("primary 1");
    key
}

/// Rounds per key in the rotation tests: then the key is deleted (its KEKs
/// destroyed) and a fresh one takes over, so that the token does not fill
/// up with hundreds of KEKs (SoftHSM2's object searches slow down with
/// every object, and each rotation searches).
const ROUNDS_PER_KEY: usize = 25;

/// Deletes `key` for good (scheduler pass after the waiting period) and
/// returns a fresh key with `versions` versions, every [`ROUNDS_PER_KEY`]
/// rounds; otherwise returns `key`.
fn renew(service: &KmsService, key: String, round: usize, versions: u32) -> String {
    if round == 0 || !round.is_multiple_of(ROUNDS_PER_KEY) {
        return key;
    }
    service
        .schedule_key_deletion(&meta(), &key, Some(7))
        .expect("schedule retirement");
    let pass = service.run_scheduler_pass_at(now_ms() + 8 * 86_400_000);
    assert_eq!((pass.deleted, pass.failed), (1, 0), "{pass:?}");
    new_key(service, versions)
}

/// Runs `a` and `b` on two threads released by one barrier.
fn race<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            barrier.wait();
            a()
        });
        let second = s.spawn(|| {
            barrier.wait();
            b()
        });
        (
            first.join().expect("first thread"),
            second.join().expect("second thread"),
        )
    })
}

/// Checks the invariants that hold in every state and returns the state.
fn check(service: &KmsService, key: &str, what: &str) -> (KeyRecord, Vec<VersionRecord>) {
    let (record, versions) = service
        .list_key_versions(&meta(), key)
        .unwrap_or_else(|e| panic!("{what}: list versions: {e}"));
    let numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
    assert_eq!(
        numbers,
        (1..=record.latest_version).collect::<Vec<_>>(),
        "{what}: version numbers are not 1..=latest"
    );
    assert!(
        versions.iter().all(|v| v.state != VersionState::Pending),
        "{what}: a version was left pending: {versions:?}"
    );
    let primary = record
        .primary_version
        .unwrap_or_else(|| panic!("{what}: no primary"));
    let state = versions[primary as usize - 1].state;
    assert_eq!(
        state,
        VersionState::Enabled,
        "{what}: primary version {primary} is {state:?}"
    );
    (record, versions)
}

fn version_state(versions: &[VersionRecord], n: u32) -> VersionState {
    versions[n as usize - 1].state
}

/// What a key pending deletion must still look like: the versions and
/// primary it had when the deletion was scheduled.
fn check_frozen(record: &KeyRecord, scheduled: &KeyView, what: &str) {
    assert!(
        matches!(record.state, KeyState::PendingDeletion { .. }),
        "{what}: {:?}",
        record.state
    );
    assert_eq!(
        record.latest_version, scheduled.record.latest_version,
        "{what}: a key pending deletion got a new version"
    );
    assert_eq!(
        record.primary_version, scheduled.record.primary_version,
        "{what}: a key pending deletion got a new primary"
    );
}

/// Back to an enabled key (the test's reset between rounds).
fn undo_deletion(service: &KmsService, key: &str) {
    service
        .cancel_key_deletion(&meta(), key)
        .expect("cancel deletion");
    service.enable_key(&meta(), key).expect("enable key");
}

#[test]
fn rotate_races_disable_of_the_version_it_creates() {
    let env = TestEnv::new();
    let (service, mut key) = service_with_key(&env, 2);
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        key = renew(&service, key, round, 2);
        let (before, _) = check(&service, &key, &what);
        let new = before.latest_version + 1;
        let (rotated, disabled) = race(
            || service.rotate_key(&meta(), &key),
            || service.disable_key_version(&meta(), &key, new),
        );
        let rotated = rotated.unwrap_or_else(|e| panic!("{what}: rotate: {e}"));
        assert_eq!(rotated.version, new, "{what}");
        // Before the rotation the version does not exist; after it, it is
        // the primary: the disable can never succeed.
        match disabled {
            Err(KmsError::VersionNotFound { .. } | KmsError::PrimaryVersionDisable { .. }) => {}
            other => panic!("{what}: disable of the new version: {other:?}"),
        }
        let (after, _) = check(&service, &key, &what);
        assert_eq!(after.primary_version, Some(new), "{what}");
    }
}

#[test]
fn set_primary_races_disable_of_the_same_version() {
    let env = TestEnv::new();
    let (service, key) = service_with_key(&env, 2);
    let mut outcomes = [0usize; 2];
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        let (primary_set, disabled) = race(
            || service.set_primary_version(&meta(), &key, 2),
            || service.disable_key_version(&meta(), &key, 2),
        );
        assert!(
            primary_set.is_ok() != disabled.is_ok(),
            "{what}: exactly one must win: {primary_set:?} / {disabled:?}"
        );
        outcomes[usize::from(disabled.is_ok())] += 1;
        let (record, versions) = check(&service, &key, &what);
        // Reset: version 1 primary, version 2 enabled.
        if record.primary_version == Some(2) {
            service
                .set_primary_version(&meta(), &key, 1)
                .expect("primary 1");
        }
        if version_state(&versions, 2) == VersionState::Disabled {
            service
                .enable_key_version(&meta(), &key, 2)
                .expect("enable 2");
        }
    }
    eprintln!(
        "set-primary won {}, disable won {}",
        outcomes[0], outcomes[1]
    );
}

#[test]
fn rotate_races_schedule_deletion() {
    let env = TestEnv::new();
    let (service, mut key) = service_with_key(&env, 1);
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        key = renew(&service, key, round, 1);
        let (before, _) = check(&service, &key, &what);
        let (rotated, scheduled) = race(
            || service.rotate_key(&meta(), &key),
            || service.schedule_key_deletion(&meta(), &key, Some(7)),
        );
        let scheduled = scheduled.unwrap_or_else(|e| panic!("{what}: schedule: {e}"));
        let (record, _) = check(&service, &key, &what);
        check_frozen(&record, &scheduled, &what);
        match rotated {
            // The rotation came first: the schedule saw its version.
            Ok(v) => assert_eq!(v.version, scheduled.record.latest_version, "{what}"),
            Err(KmsError::KeyPendingDeletion { .. }) => {
                assert_eq!(record.latest_version, before.latest_version, "{what}");
            }
            Err(e) => panic!("{what}: rotate: {e}"),
        }
        undo_deletion(&service, &key);
    }
}

#[test]
fn rotate_races_rotate() {
    let env = TestEnv::new();
    let (service, mut key) = service_with_key(&env, 1);
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        key = renew(&service, key, round, 1);
        let (before, _) = check(&service, &key, &what);
        let (a, b) = race(
            || service.rotate_key(&meta(), &key),
            || service.rotate_key(&meta(), &key),
        );
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("{what}: {e}")).version,
            b.unwrap_or_else(|e| panic!("{what}: {e}")).version,
        );
        let mut made = [a, b];
        made.sort_unstable();
        let latest = before.latest_version;
        assert_eq!(made, [latest + 1, latest + 2], "{what}: version numbers");
        let (record, _) = check(&service, &key, &what);
        assert_eq!(record.primary_version, Some(latest + 2), "{what}");
    }
}

#[test]
fn disable_key_races_set_primary() {
    let env = TestEnv::new();
    let (service, key) = service_with_key(&env, 2);
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        let target = if round % 2 == 0 { 2 } else { 1 };
        let (disabled, primary_set) = race(
            || service.disable_key(&meta(), &key),
            || service.set_primary_version(&meta(), &key, target),
        );
        disabled.unwrap_or_else(|e| panic!("{what}: disable key: {e}"));
        primary_set.unwrap_or_else(|e| panic!("{what}: set primary: {e}"));
        let (record, _) = check(&service, &key, &what);
        assert_eq!(record.state, KeyState::Disabled, "{what}");
        assert_eq!(record.primary_version, Some(target), "{what}");
        service.enable_key(&meta(), &key).expect("enable key");
    }
}

#[test]
fn enable_version_races_schedule_deletion() {
    let env = TestEnv::new();
    let (service, key) = service_with_key(&env, 2);
    service
        .disable_key_version(&meta(), &key, 2)
        .expect("disable 2");
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        let (enabled, scheduled) = race(
            || service.enable_key_version(&meta(), &key, 2),
            || service.schedule_key_deletion(&meta(), &key, Some(7)),
        );
        enabled.unwrap_or_else(|e| panic!("{what}: enable version: {e}"));
        let scheduled = scheduled.unwrap_or_else(|e| panic!("{what}: schedule: {e}"));
        let (record, versions) = check(&service, &key, &what);
        check_frozen(&record, &scheduled, &what);
        assert_eq!(version_state(&versions, 2), VersionState::Enabled, "{what}");
        undo_deletion(&service, &key);
        service
            .disable_key_version(&meta(), &key, 2)
            .expect("disable 2");
    }
}

#[test]
fn set_primary_races_schedule_deletion() {
    let env = TestEnv::new();
    let (service, key) = service_with_key(&env, 2);
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        let (before, _) = check(&service, &key, &what);
        let target = if before.primary_version == Some(1) {
            2
        } else {
            1
        };
        let (primary_set, scheduled) = race(
            || service.set_primary_version(&meta(), &key, target),
            || service.schedule_key_deletion(&meta(), &key, Some(7)),
        );
        let scheduled = scheduled.unwrap_or_else(|e| panic!("{what}: schedule: {e}"));
        let (record, _) = check(&service, &key, &what);
        check_frozen(&record, &scheduled, &what);
        match primary_set {
            Ok(_) => assert_eq!(record.primary_version, Some(target), "{what}"),
            Err(KmsError::KeyPendingDeletion { .. }) => {
                assert_eq!(record.primary_version, before.primary_version, "{what}");
            }
            Err(e) => panic!("{what}: set primary: {e}"),
        }
        undo_deletion(&service, &key);
    }
}

#[test]
fn rotate_races_disable_of_the_old_primary_and_set_primary() {
    let env = TestEnv::new();
    let (service, mut key) = service_with_key(&env, 1);
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        key = renew(&service, key, round, 1);
        let (before, _) = check(&service, &key, &what);
        let old = before.primary_version.expect("primary");
        let (rotated, disabled) = race(
            || service.rotate_key(&meta(), &key),
            || service.disable_key_version(&meta(), &key, old),
        );
        rotated.unwrap_or_else(|e| panic!("{what}: rotate: {e}"));
        // Allowed only once the rotation made another version primary.
        match disabled {
            Ok(_) | Err(KmsError::PrimaryVersionDisable { .. }) => {}
            Err(e) => panic!("{what}: disable old primary: {e}"),
        }
        let (_, versions) = check(&service, &key, &what);
        if version_state(&versions, old) == VersionState::Disabled {
            service
                .enable_key_version(&meta(), &key, old)
                .expect("enable old");
        }
        // And a manual primary change racing the next rotation.
        let (primary_set, rotated) = race(
            || service.set_primary_version(&meta(), &key, old),
            || service.rotate_key(&meta(), &key),
        );
        primary_set.unwrap_or_else(|e| panic!("{what}: set primary: {e}"));
        rotated.unwrap_or_else(|e| panic!("{what}: rotate: {e}"));
        check(&service, &key, &what);
    }
}

#[test]
fn cancel_deletion_races_the_scheduled_deletion() {
    let env = TestEnv::new();
    let (service, _) = service_with_key(&env, 1);
    let later = now_ms() + 8 * 86_400_000;
    let mut outcomes = [0usize; 2];
    for round in 0..ROUNDS {
        let what = format!("round {round}");
        let key = service
            .create_key(&meta(), CreateKeyInput::default())
            .expect("create key")
            .record
            .id
            .to_string();
        service
            .schedule_key_deletion(&meta(), &key, Some(7))
            .expect("schedule");
        let (cancelled, pass) = race(
            || service.cancel_key_deletion(&meta(), &key),
            || service.run_scheduler_pass_at(later),
        );
        assert_eq!(pass.failed, 0, "{what}: {pass:?}");
        let (record, _) = service
            .list_key_versions(&meta(), &key)
            .expect("list versions");
        match cancelled {
            Ok(_) => {
                // The key lives on, with its KEK: usable once enabled.
                assert_eq!(record.state, KeyState::Disabled, "{what}");
                assert_eq!(pass.deleted, 0, "{what}");
                check(&service, &key, &what);
                service.enable_key(&meta(), &key).expect("enable key");
                let encrypted = service.finish(service.encrypt(
                    &meta(),
                    EncryptInput {
                        key: key.clone(),
                        plaintext: b"still here".to_vec().into(),
                        context: HashMap::new(),
                    },
                ));
                assert!(encrypted.is_ok(), "{what}: {encrypted:?}");
                outcomes[0] += 1;
            }
            Err(KmsError::NotPendingDeletion { .. } | KmsError::KeyDeleted { .. }) => {
                assert!(
                    matches!(record.state, KeyState::Deleted { .. }),
                    "{what}: {:?}",
                    record.state
                );
                assert_eq!(pass.deleted, 1, "{what}");
                outcomes[1] += 1;
            }
            Err(e) => panic!("{what}: cancel: {e}"),
        }
    }
    eprintln!("cancel won {}, deletion won {}", outcomes[0], outcomes[1]);
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    u64::try_from(since.as_millis()).expect("ms")
}
