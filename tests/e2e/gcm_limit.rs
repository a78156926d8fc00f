//! The hard AES-GCM ceiling (issue 13, item 6): with random 96-bit IVs NIST
//! SP 800-38D §8.3 allows at most 2^32 invocations per key. The scheduler
//! rotates a version at the soft limit (`rotation.gcm_invocation_limit`);
//! at the hard limit (`rotation.gcm_invocation_hard_limit`) encrypt-side use
//! of the version is refused with FAILED_PRECONDITION, so that encryption
//! stops there when rotation fails instead of going on. Small configured
//! limits, the in-process service over a real SoftHSM2 token and RocksDB.

use std::collections::HashMap;

use kms::config::Config;
use kms::error::KmsError;
use kms::service::{
    CreateKeyInput, DataKeyForm, DataKeyInput, DataKeySize, DecryptInput, EncryptInput, Encrypted,
    KmsService, RequestMeta,
};
use kms_hsm::{KeyPurpose, ObjectId};
use kms_storage::ResultCode;
use kms_tests::TestEnv;

const SOFT: u64 = 3;
const HARD: u64 = 5;

fn meta() -> RequestMeta {
    RequestMeta {
        principal: "anonymous".into(),
        peer: "gcm-limit".into(),
        request_id: "gcm".into(),
    }
}

fn config(env: &TestEnv) -> Config {
    let mut config = env.config();
    config.rotation.gcm_invocation_limit = SOFT;
    config.rotation.gcm_invocation_hard_limit = HARD;
    config
}

fn encrypt(service: &KmsService, key: &str) -> Result<Encrypted, KmsError> {
    service.finish(service.encrypt(
        &meta(),
        EncryptInput {
            key: key.to_owned(),
            plaintext: b"counted".to_vec().into(),
            context: HashMap::new(),
        },
    ))
}

fn assert_ceiling(result: Result<Encrypted, KmsError>, key: &str, version: u32) {
    match result {
        Err(e @ KmsError::GcmInvocationLimit { .. }) => {
            assert_eq!(e.code(), ResultCode::FailedPrecondition);
            let message = e.to_string();
            for needle in [
                key,
                &format!("version {version}"),
                "NIST SP 800-38D",
                "5 AES-GCM",
            ] {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
        }
        other => panic!("expected the GCM ceiling for version {version}, got {other:?}"),
    }
}

fn create_key(service: &KmsService) -> String {
    service
        .create_key(&meta(), CreateKeyInput::default())
        .expect("create key")
        .record
        .id
        .to_string()
}

#[test]
fn encryption_stops_at_the_hard_limit_and_rotation_at_the_soft_limit_restores_it() {
    let env = TestEnv::new();
    let service = KmsService::open(&config(&env)).expect("open");
    let key = create_key(&service);
    let mut blobs = Vec::new();
    for n in 1..=HARD {
        let encrypted = encrypt(&service, &key).unwrap_or_else(|e| panic!("encrypt {n}: {e}"));
        assert_eq!(encrypted.key_version, 1);
        blobs.push(encrypted.blob);
    }
    assert_ceiling(encrypt(&service, &key), &key, 1);
    // Every encrypt-side use of the version is refused, not only Encrypt.
    let data_key = service.finish(service.generate_data_key(
        &meta(),
        DataKeyInput {
            key: key.clone(),
            size: DataKeySize::Aes256,
            context: HashMap::new(),
            form: DataKeyForm::WithoutPlaintext,
        },
    ));
    assert!(
        matches!(
            data_key,
            Err(KmsError::GcmInvocationLimit { version: 1, .. })
        ),
        "{data_key:?}"
    );
    // A refusal counts nothing: the version stays at the limit.
    let (_, versions) = service.list_key_versions(&meta(), &key).expect("versions");
    assert_eq!(versions[0].gcm_invocations, HARD);
    // Decryption is not an invocation of the encryption budget.
    let decrypted = service
        .finish(service.decrypt(
            &meta(),
            DecryptInput {
                blob: blobs[0].clone(),
                context: HashMap::new(),
                expected_key: None,
            },
        ))
        .expect("decrypt at the ceiling");
    assert_eq!(decrypted.plaintext.as_slice(), b"counted");

    // The soft limit was passed: the scheduler rotates, and encryption
    // works again under the new primary.
    let pass = service.run_scheduler_pass();
    assert_eq!((pass.rotated, pass.failed), (1, 0));
    let encrypted = encrypt(&service, &key).expect("encrypt after rotation");
    assert_eq!(encrypted.key_version, 2);

    // The scheduler's rotation is audited as the service's own work
    // (audit.proto): OPERATION_AUTOMATIC_ROTATION, principal "system", no
    // peer, a request id of its own.
    let mut export = Vec::new();
    service
        .export_audit(&Default::default(), &mut export)
        .expect("export");
    let rotations: Vec<serde_json::Value> = String::from_utf8(export)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["operation"] == "AutomaticRotation")
        .collect();
    assert_eq!(rotations.len(), 1, "{rotations:?}");
    let rotation = &rotations[0];
    assert_eq!(rotation["principal"], "system", "{rotation}");
    assert_eq!(rotation["peer"], "", "{rotation}");
    assert_eq!(rotation["key_version"], 2, "{rotation}");
    assert!(
        rotation["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("scheduled-rotation-") && id.len() > 19),
        "{rotation}"
    );
}

#[test]
fn when_rotation_fails_encryption_stops_at_the_hard_limit() {
    let env = TestEnv::new();
    let service = KmsService::open(&config(&env)).expect("open");
    let key = create_key(&service);
    // Something already holds the HSM id of the next version's KEK: the
    // scheduled rotation cannot generate it and fails (a real HSM refusal).
    let squatter = ObjectId::new(format!("{key}/v2").into_bytes()).expect("id");
    service
        .hsm()
        .generate_key(KeyPurpose::Kek, &squatter)
        .expect("squat the next KEK id");
    for n in 1..=SOFT {
        encrypt(&service, &key).unwrap_or_else(|e| panic!("encrypt {n}: {e}"));
    }
    let pass = service.run_scheduler_pass();
    assert_eq!((pass.rotated, pass.failed), (0, 1), "rotation must fail");
    // Past the soft limit encryption goes on, up to the hard limit, and no further.
    for n in SOFT + 1..=HARD {
        let encrypted = encrypt(&service, &key).unwrap_or_else(|e| panic!("encrypt {n}: {e}"));
        assert_eq!(encrypted.key_version, 1);
    }
    for _ in 0..3 {
        assert_ceiling(encrypt(&service, &key), &key, 1);
    }
    let (record, versions) = service.list_key_versions(&meta(), &key).expect("versions");
    assert_eq!(record.primary_version, Some(1));
    assert_eq!(versions[0].gcm_invocations, HARD);
    // Concurrent callers cannot pass the ceiling together either: after the
    // next successful rotation, HARD encryptions from many threads at once
    // leave exactly HARD counted on the new version.
    let pass = service.run_scheduler_pass();
    assert_eq!(pass.rotated, 1, "the retry rotates to version 3");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2 * HARD)
            .map(|_| s.spawn(|| encrypt(&service, &key)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
    assert_eq!(accepted, HARD, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, KmsError::GcmInvocationLimit { version: 3, .. }))
    );
}
