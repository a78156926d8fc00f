//! Wrapped key versions (issue 14) in a running service: `kms serve --dev`
//! stores new versions wrapped under its root key (no token object per
//! version), they survive a restart (the working-key cache starts empty and
//! unwraps again), token-object versions keep decrypting when wrapped
//! versions are turned on, and a tampered wrapped record is "catalogue
//! record corrupt" (INTERNAL, audited), never UNAVAILABLE.

use std::path::Path;

use kms_hsm::PinSource;
use kms_proto::v1 as pb;
use kms_tests::{DevServerProcess, TestEnv, run_cli};

use super::{create_key, decrypt, encrypt};

fn cli_ok(endpoint: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let (ok, stdout, stderr) = run_cli(endpoint, args, stdin);
    assert!(ok, "kms {args:?} failed: {stderr}");
    stdout
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("json")
}

/// (version, held_as, root_epoch) of every version of `key`, per the CLI.
fn held_as(endpoint: &str, key: &str) -> Vec<(u64, String, u64)> {
    let out = json(&cli_ok(endpoint, &["--json", "key", "versions", key], b""));
    out.as_array()
        .expect("array")
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().expect("version"),
                v["held_as"].as_str().expect("held_as").to_owned(),
                v["root_epoch"].as_u64().expect("root_epoch"),
            )
        })
        .collect()
}

/// Token objects of the dev token: SoftHSM2 keeps one `<uuid>.object` file
/// per token object (session objects never reach the disk).
pub(super) fn token_objects(data_dir: &Path) -> usize {
    let tokens = data_dir.join("softhsm").join("tokens");
    std::fs::read_dir(&tokens)
        .expect("tokens dir")
        .map(|token| token.expect("entry").path())
        .filter(|p| p.is_dir())
        .flat_map(|dir| std::fs::read_dir(dir).expect("token dir"))
        .filter(|f| {
            let path = f.as_ref().expect("file").path();
            // `token.object` is the token's own metadata, not an object.
            path.extension().is_some_and(|e| e == "object")
                && path.file_name().is_some_and(|n| n != "token.object")
        })
        .count()
}

#[test]
fn dev_mode_stores_new_versions_wrapped_and_they_survive_a_restart() {
    let data = tempfile::tempdir().expect("data dir");
    let mut server = DevServerProcess::start(data.path());
    let ep = server.endpoint();
    let created = json(&cli_ok(&ep, &["--json", "key", "create"], b""));
    let key = created["key_id"].as_str().expect("key id").to_owned();
    let first = cli_ok(&ep, &["encrypt", "--key", &key], b"under v1");
    cli_ok(&ep, &["key", "rotate", &key], b"");
    let second = cli_ok(&ep, &["encrypt", "--key", &key], b"under v2");
    assert_eq!(
        held_as(&ep, &key),
        vec![(1, "WRAPPED".into(), 1), (2, "WRAPPED".into(), 1)]
    );
    assert_eq!(cli_ok(&ep, &["decrypt"], &first), b"under v1");
    assert_eq!(cli_ok(&ep, &["decrypt"], &second), b"under v2");

    // The token holds the root only, whatever the number of keys and
    // versions: no token object per version, and the audit checkpoint key
    // is wrapped too (issue 14 item 2).
    assert_eq!(token_objects(data.path()), 1);
    for _ in 0..5 {
        let other = json(&cli_ok(&ep, &["--json", "key", "create"], b""));
        let id = other["key_id"].as_str().expect("key id").to_owned();
        cli_ok(&ep, &["key", "rotate", &id], b"");
    }
    assert_eq!(token_objects(data.path()), 1);

    // A restart: the cache starts empty, every version is unwrapped again.
    server.terminate();
    let server = DevServerProcess::start(data.path());
    let ep = server.endpoint();
    assert_eq!(cli_ok(&ep, &["decrypt"], &first), b"under v1");
    assert_eq!(cli_ok(&ep, &["decrypt"], &second), b"under v2");
    cli_ok(&ep, &["key", "rotate", &key], b"");
    let third = cli_ok(&ep, &["encrypt", "--key", &key], b"under v3");
    assert_eq!(cli_ok(&ep, &["decrypt"], &third), b"under v3");
    assert_eq!(cli_ok(&ep, &["decrypt"], &first), b"under v1");
    assert_eq!(held_as(&ep, &key).len(), 3);
    assert_eq!(token_objects(data.path()), 1);
}

/// Creates the root of epoch 1 on `env`'s token with `kms hsm init-root`
/// (another process: the ceremony logs in as the security officer).
pub(super) fn init_root(env: &TestEnv) {
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

async fn versions(server: &kms_tests::TestServer, key: &str) -> Vec<(i32, u32)> {
    server
        .keys()
        .list_key_versions(pb::ListKeyVersionsRequest {
            key_id: key.to_owned(),
            ..Default::default()
        })
        .await
        .expect("versions")
        .into_inner()
        .versions
        .iter()
        .map(|v| (v.protection, v.root_epoch))
        .collect()
}

#[tokio::test]
async fn token_object_versions_keep_decrypting_after_wrapped_versions_are_turned_on() {
    let env = TestEnv::new();
    let server = env.start().await;
    let key = create_key(&server, "from before the root").await;
    let old = encrypt(&server, &key, b"token object", &[("a", "1")]).await;
    let token_object = pb::KeyVersionProtection::TokenObject as i32;
    let wrapped = pb::KeyVersionProtection::Wrapped as i32;
    assert_eq!(versions(&server, &key).await, vec![(token_object, 0)]);
    server.stop().await;

    init_root(&env);
    let server = env.start().await;
    let plain = decrypt(&server, &old.ciphertext_blob, &[("a", "1")])
        .await
        .expect("old version decrypts");
    assert_eq!(plain.plaintext, b"token object");
    server
        .keys()
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        })
        .await
        .expect("rotate");
    assert_eq!(
        versions(&server, &key).await,
        vec![(token_object, 0), (wrapped, 1)]
    );
    let new = encrypt(&server, &key, b"wrapped", &[]).await;
    assert_eq!(new.key_version, 2);
    assert_eq!(
        decrypt(&server, &new.ciphertext_blob, &[])
            .await
            .expect("new")
            .plaintext,
        b"wrapped"
    );
    assert_eq!(
        decrypt(&server, &old.ciphertext_blob, &[("a", "1")])
            .await
            .expect("old again")
            .plaintext,
        b"token object"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_tampered_wrapped_record_is_catalogue_record_corrupt_and_audited() {
    let env = TestEnv::new();
    init_root(&env);
    let server = env.start().await;
    let key = create_key(&server, "tamper target").await;
    let blob = encrypt(&server, &key, b"secret", &[]).await.ciphertext_blob;
    server.stop().await;
    let key_id = kms_storage::KeyId::parse(&key).expect("id");

    for (what, tamper) in [
        (
            "mac",
            Box::new(|kek: &mut kms_storage::KekHandle| {
                if let kms_storage::KekHandle::Wrapped { mac, .. } = kek {
                    mac[0] ^= 1;
                }
            }) as Box<dyn Fn(&mut kms_storage::KekHandle)>,
        ),
        (
            "blob",
            Box::new(|kek: &mut kms_storage::KekHandle| {
                if let kms_storage::KekHandle::Wrapped { mac, blob, .. } = kek {
                    // Undo the MAC flip: only the blob is altered now.
                    mac[0] ^= 1;
                    blob[5] ^= 1;
                }
            }),
        ),
    ] {
        assert!(
            kms_storage::testing::tamper_with_version_kek(&env.db_dir(), &key_id, 1, tamper)
                .expect("tamper")
        );
        let server = env.start().await;
        let status = decrypt(&server, &blob, &[])
            .await
            .expect_err("a tampered record must not decrypt");
        assert_eq!(status.code(), tonic::Code::Internal, "{what}: {status:?}");
        assert_eq!(status.message(), "catalogue record corrupt", "{what}");
        let events = server
            .audit()
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner()
            .events;
        assert!(
            events
                .iter()
                .any(|e| e.operation == pb::Operation::Decrypt as i32
                    && e.key_id == key
                    && e.result_code == tonic::Code::Internal as i32),
            "{what}: no INTERNAL Decrypt record in {events:?}"
        );
        server.stop().await;
    }
}
