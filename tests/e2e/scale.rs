//! Scale of wrapped key versions (issue 14 items 3 and 7), against a real
//! service on a fresh SoftHSM2 token with a root key:
//! - 10,000 keys fit in a token holding only the root and the audit HMAC
//!   key, plus at most the working-key cache's worth of session objects;
//! - a version that stops being usable (disabled, its key disabled or
//!   scheduled for deletion) is evicted from the cache at once: its session
//!   object is destroyed, not left until LRU eviction.
//!
//! Objects are counted in the token itself: session objects through a new
//! PKCS#11 session of this process (`KeyHolder::session_object_count`),
//! token objects as SoftHSM2's object files.

use std::path::Path;

use kms_hsm::PinSource;
use kms_proto::v1 as pb;
use kms_tests::{TestEnv, TestServer};

use super::{create_key, decrypt, encrypt};

/// Creates the root of epoch 1 on `env`'s token with `kms hsm init-root`
/// (another process: the ceremony logs in as the security officer).
fn init_root(env: &TestEnv) {
    let PinSource::File(so_pin) = env.token.so_pin_source() else {
        panic!("the test token keeps its SO PIN in a file");
    };
    let output = std::process::Command::new(kms_tests::kms_binary())
        .args(["hsm", "init-root", "--module"])
        .arg(env.token.module_path())
        .args(["--label", env.token.label(), "--so-pin-file"])
        .arg(&so_pin)
        .env("KMS_LOG", "warn")
        .output()
        .expect("kms hsm init-root");
    assert!(
        output.status.success(),
        "init-root failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Session objects of this process on the server's token, counted from a
/// new session (any session's objects are visible to it).
fn session_objects(server: &TestServer) -> usize {
    server
        .service()
        .hsm()
        .key_holder()
        .expect("holder")
        .session_object_count()
        .expect("count")
}

/// Token objects: SoftHSM2 keeps one `<uuid>.object` file per token object
/// (`token.object` is the token's own metadata).
fn token_objects(token_dir: &Path) -> usize {
    std::fs::read_dir(token_dir)
        .expect("token dir")
        .filter(|f| {
            let path = f.as_ref().expect("file").path();
            path.extension().is_some_and(|e| e == "object")
                && path.file_name().is_some_and(|n| n != "token.object")
        })
        .count()
}

/// Runtime: about 30 s on a 2-core machine (10,000 synced key creations,
/// 32 at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_wrapped_keys_leave_the_token_with_a_handful_of_objects() {
    const KEYS: usize = 10_000;
    const CACHE: usize = 256;
    const SAMPLE: usize = 600;
    const CREATORS: usize = 32;
    let env = TestEnv::new();
    init_root(&env);
    let mut config = env.config();
    config.working_key_cache = CACHE;
    let server = env.start_with(config).await;
    // The root and the audit checkpoint HMAC key.
    let before = token_objects(env.token_dir());
    assert!(before <= 2, "{before} token objects before any key");

    let mut creators = tokio::task::JoinSet::new();
    for c in 0..CREATORS {
        let mut keys = server.keys();
        creators.spawn(async move {
            let mut ids = Vec::new();
            for i in (c..KEYS).step_by(CREATORS) {
                let id = keys
                    .create_key(pb::CreateKeyRequest {
                        description: format!("scale {i}"),
                        ..Default::default()
                    })
                    .await
                    .expect("CreateKey")
                    .into_inner()
                    .key_metadata
                    .expect("metadata")
                    .key_id;
                ids.push(id);
            }
            ids
        });
    }
    let mut keys = Vec::with_capacity(KEYS);
    while let Some(ids) = creators.join_next().await {
        keys.extend(ids.expect("creator"));
    }
    assert_eq!(keys.len(), KEYS);

    // Use a sample larger than the cache (every 16th key), each once, and
    // decrypt a few of them again (they were evicted meanwhile).
    let sample: Vec<&String> = keys.iter().step_by(KEYS / SAMPLE).take(SAMPLE).collect();
    assert_eq!(sample.len(), SAMPLE);
    let mut blobs = Vec::new();
    for key in &sample {
        blobs.push(
            encrypt(&server, key, key.as_bytes(), &[])
                .await
                .ciphertext_blob,
        );
    }
    for (key, blob) in sample.iter().zip(&blobs).take(8) {
        let plain = decrypt(&server, blob, &[]).await.expect("decrypt");
        assert_eq!(plain.plaintext, key.as_bytes());
    }

    assert_eq!(
        token_objects(env.token_dir()),
        before,
        "no token object per key or version"
    );
    let stats = server.service().working_key_stats().expect("wrapped");
    assert_eq!(stats.cached, CACHE as u64);
    assert!(
        stats.capacity_evictions >= (SAMPLE - CACHE) as u64,
        "{stats:?}"
    );
    // The cached working keys, the catalogue-integrity HMAC key and, where
    // it is wrapped, the audit checkpoint key; no request is in flight, so
    // nothing evicted is still alive.
    let service_keys = 1 + usize::from(server.service().checkpoint_key_is_wrapped());
    assert_eq!(session_objects(&server), CACHE + service_keys);
    server.stop().await;
}

async fn set_version(server: &TestServer, key: &str, version: u32, enabled: bool) {
    let mut keys = server.keys();
    if enabled {
        keys.enable_key_version(pb::EnableKeyVersionRequest {
            key_id: key.to_owned(),
            version,
        })
        .await
        .expect("EnableKeyVersion");
    } else {
        keys.disable_key_version(pb::DisableKeyVersionRequest {
            key_id: key.to_owned(),
            version,
        })
        .await
        .expect("DisableKeyVersion");
    }
}

#[tokio::test]
async fn a_version_that_stops_being_usable_is_evicted_from_the_hsm_at_once() {
    let env = TestEnv::new();
    init_root(&env);
    let server = env.start().await;
    let key = create_key(&server, "evicted").await;
    // The holder and its integrity key exist now; the new version's working
    // key was destroyed after wrapping.
    let base = session_objects(&server);
    let first = encrypt(&server, &key, b"under v1", &[]).await;
    assert_eq!(session_objects(&server), base + 1);
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate");
    encrypt(&server, &key, b"under v2", &[]).await;
    assert_eq!(session_objects(&server), base + 2);

    // Disabling version 1 destroys its working key now.
    set_version(&server, &key, 1, false).await;
    assert_eq!(session_objects(&server), base + 1, "disabled version");
    set_version(&server, &key, 1, true).await;
    let plain = decrypt(&server, &first.ciphertext_blob, &[])
        .await
        .expect("v1 again");
    assert_eq!(plain.plaintext, b"under v1");
    assert_eq!(session_objects(&server), base + 2);

    // Disabling the key evicts all of its versions.
    server
        .keys()
        .disable_key(pb::DisableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("disable");
    assert_eq!(session_objects(&server), base, "disabled key");
    server
        .keys()
        .enable_key(pb::EnableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("enable");
    encrypt(&server, &key, b"again", &[]).await;
    assert_eq!(session_objects(&server), base + 1);

    // So does scheduling its deletion.
    server
        .keys()
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: key.clone(),
            pending_window_days: Some(7),
        })
        .await
        .expect("schedule deletion");
    assert_eq!(session_objects(&server), base, "key pending deletion");
    let stats = server.service().working_key_stats().expect("wrapped");
    assert_eq!(stats.unusable_evictions, 4, "{stats:?}");
    server.stop().await;
}
